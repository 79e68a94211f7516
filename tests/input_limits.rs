//! Limits on what an input can cost, and inputs that used to be taken silently: a config
//! that does not fit the checkpoint, index shards outside the model folder, templates that
//! never end, sequences longer than the model's positions, ids outside the vocabulary, a
//! byte order mark, two files with one stem, a chat template given for plain text, and
//! `generate` with a prompt, temperature or weights it cannot use.

use std::path::{Path, PathBuf};
use std::process::Command;

use sdpo::data::{load_pairs, DataOptions};
use sdpo::engine::cpu::CpuEngine;
use sdpo::generate::{generate, GenOptions};
use sdpo::weights::save_model;
use sdpo::{LlamaConfig, LlamaWeights};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_sdpo-run");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_fixtures() -> PathBuf {
    root().join("tests/fixtures/data")
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdpo-limits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

// --- weights against config.json ---------------------------------------------------------

/// The demo checkpoint beside the config of a much larger model.
fn demo_with_config(name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let dir = scratch(name);
    copy_dir(&root().join("demo"), &dir);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    write_json(&dir.join("config.json"), &cfg);
    dir
}

#[test]
fn an_8b_config_beside_small_weights_names_the_tensor_and_the_fields() {
    // Llama 3 8B's shape.
    let dir = demo_with_config("8b", |c| {
        for (k, v) in [
            ("hidden_size", 4096),
            ("intermediate_size", 14336),
            ("num_hidden_layers", 32),
            ("num_attention_heads", 32),
            ("num_key_value_heads", 8),
            ("head_dim", 128),
            ("vocab_size", 128256),
            ("max_position_embeddings", 8192),
        ] {
            c[k] = json!(v);
        }
        c["tie_word_embeddings"] = json!(false);
    });
    let cfg = LlamaConfig::from_path(&dir).unwrap();
    let e = LlamaWeights::load(&dir, &cfg).unwrap_err().to_string();
    assert_has(
        &e,
        &[
            "model.safetensors",
            "`model.embed_tokens.weight`",
            "shape [16, 64] in this file",
            "config.json implies [128256, 4096]",
            "vocab_size, hidden_size",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn weights_are_checked_before_anything_is_sized_from_the_config() {
    // 2^24 x 2^20 floats is 64 TiB for the embedding alone: sizing a buffer from this config
    // aborts the process, so the command must refuse it from the file's headers first.
    let dir = demo_with_config("huge", |c| {
        c["vocab_size"] = json!(1u64 << 24);
        c["hidden_size"] = json!(1u64 << 20);
        c["head_dim"] = json!(1u64 << 18);
    });
    let out = Command::new(BIN).args(["generate", "--prompt", "1+1=", "--model"]).arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a clean error exit, not an abort: {err}");
    assert_has(&err, &["`model.embed_tokens.weight`", "[16, 64]", "[16777216, 1048576]", "vocab_size, hidden_size"]);
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn index_shards_outside_the_model_folder_are_refused() {
    let base = scratch("shards");
    let model = base.join("model");
    copy_dir(&root().join("tests/fixtures/gqa/policy"), &model);
    let cfg = LlamaConfig::from_path(&model).unwrap();
    // The second shard moves next to the folder; the index points at it there.
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let shard = "model-00002-of-00003.safetensors";
    std::fs::rename(model.join(shard), outside.join(shard)).unwrap();
    let index_path = model.join("model.safetensors.index.json");
    let index: Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    for target in [format!("../outside/{shard}"), outside.join(shard).display().to_string()] {
        let mut v = index.clone();
        for (_, s) in v["weight_map"].as_object_mut().unwrap() {
            if s == shard {
                *s = json!(target);
            }
        }
        write_json(&index_path, &v);
        let e = LlamaWeights::load(&model, &cfg).unwrap_err().to_string();
        assert_has(&e, &["model.safetensors.index.json", &format!("`{target}`"), "not a file inside the model folder"]);
    }
    let _ = std::fs::remove_dir_all(&base);
}

// --- chat templates ----------------------------------------------------------------------

fn conversation_file(dir: &Path, content: &str) -> PathBuf {
    let rec = json!({
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    });
    let path = dir.join("conv.jsonl");
    std::fs::write(&path, format!("{rec}\n")).unwrap();
    path
}

#[test]
fn a_template_that_loops_for_minutes_is_stopped_with_its_file_named() {
    let dir = scratch("fuel");
    let data = conversation_file(&dir, "q");
    let t = dir.join("slow.jinja");
    // 10^8 iterations: minutes of rendering per record without a bound.
    std::fs::write(
        &t,
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}{{ messages[0].content }}",
    )
    .unwrap();
    let o = DataOptions { chat_template: Some(t), ..DataOptions::default() };
    let t0 = std::time::Instant::now();
    let e = load_pairs(&[data], &o, &data_fixtures().join("bpe"), true).unwrap_err().to_string();
    assert_has(&e, &["conv.jsonl:1:", "slow.jinja", "took too long"]);
    assert!(t0.elapsed().as_secs() < 60, "stopped in {:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_real_template_renders_a_megabyte_conversation_within_the_bound() {
    let dir = scratch("fuel-big");
    let data = conversation_file(&dir, &"many words here ".repeat(1 << 16));
    let o =
        DataOptions { chat_template: Some(data_fixtures().join("templates/llama3.jinja")), ..DataOptions::default() };
    let (pairs, _) = load_pairs(&[data], &o, &data_fixtures().join("bpe"), true).unwrap();
    assert_eq!(pairs.len(), 1);
    assert!(pairs[0].prompt.len() > 100_000, "{}", pairs[0].prompt.len());
    let _ = std::fs::remove_dir_all(&dir);
}

// --- sequence lengths and ids against config.json ------------------------------------------

/// The bpe fixture tokenizer with a config.json holding `config`.
fn bpe_model_with(name: &str, config: Value) -> PathBuf {
    let dir = scratch(name);
    copy_dir(&data_fixtures().join("bpe"), &dir);
    write_json(&dir.join("config.json"), &config);
    dir
}

#[test]
fn sequences_longer_than_the_model_are_refused_with_max_length_advice() {
    let model = bpe_model_with("maxpos", json!({"vocab_size": 800, "max_position_embeddings": 64}));
    let data = model.join("long.jsonl");
    let short = json!({"prompt": "Say yes", "chosen": " yes", "rejected": " no"});
    let long = json!({"prompt": "Say yes", "chosen": " yes".repeat(200), "rejected": " no"});
    std::fs::write(&data, format!("{short}\n{long}\n")).unwrap();
    let e = load_pairs(std::slice::from_ref(&data), &DataOptions::default(), &model, true).unwrap_err().to_string();
    assert_has(
        &e,
        &["long.jsonl:2:", "prompt + chosen is", "max_position_embeddings (64", "1 of the 2 pairs", "--max-length 64"],
    );
    // a --max-length above the model's length is named as the cause
    let o = DataOptions { max_length: Some(1000), ..DataOptions::default() };
    let e = load_pairs(std::slice::from_ref(&data), &o, &model, true).unwrap_err().to_string();
    assert_has(&e, &["long.jsonl:2:", "--max-length 1000 is above it"]);

    // With --max-length the ids are TRL's truncation, exactly as without the limit check.
    let o = DataOptions { max_length: Some(64), ..DataOptions::default() };
    let (got, summary) = load_pairs(std::slice::from_ref(&data), &o, &model, true).unwrap();
    let (trl, _) = load_pairs(&[data], &o, &data_fixtures().join("bpe"), true).unwrap();
    assert_eq!(got, trl);
    assert_eq!((summary.kept, summary.truncated), (2, 1));
    assert_eq!(got[1].prompt.len() + got[1].chosen.len(), 64);
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn tokenized_ids_outside_the_models_vocabulary_are_refused() {
    // The bpe tokenizer has 800 tokens; a model with 100 cannot embed most of them.
    let model = bpe_model_with("vocab", json!({"vocab_size": 100, "max_position_embeddings": 4096}));
    let data = model.join("v.jsonl");
    std::fs::write(&data, "{\"prompt\": \"Say yes\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n").unwrap();
    let e = load_pairs(&[data], &DataOptions::default(), &model, true).unwrap_err().to_string();
    assert_has(&e, &["v.jsonl:1:", "outside the model's vocabulary (vocab_size 100)", "config.json"]);
    let _ = std::fs::remove_dir_all(&model);
}

// --- records -------------------------------------------------------------------------------

#[test]
fn a_byte_order_mark_is_skipped() {
    let dir = scratch("bom");
    let rec = r#"{"prompt": "Say yes", "chosen": " yes", "rejected": " no"}"#;
    let files = [
        ("plain.jsonl", format!("{rec}\n")),
        ("bom.jsonl", format!("\u{feff}{rec}\n")),
        ("bom.json", format!("\u{feff}[{rec}]")),
    ];
    let mut got = Vec::new();
    for (name, text) in &files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let (pairs, _) = load_pairs(&[path], &DataOptions::default(), &data_fixtures().join("bpe"), true).unwrap();
        got.push(pairs.into_iter().map(|p| (p.prompt, p.chosen, p.rejected)).collect::<Vec<_>>());
    }
    assert_eq!(got[0], got[1]);
    assert_eq!(got[0], got[2]);
    // pre-tokenized files too
    let path = dir.join("ids.jsonl");
    std::fs::write(&path, "\u{feff}{\"prompt_ids\": [1], \"chosen_ids\": [2], \"rejected_ids\": [3]}\n").unwrap();
    assert_eq!(sdpo::data::pretokenized::read_pairs(&path, 10).unwrap().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn files_with_one_stem_keep_separate_sources() {
    let dir = scratch("stems");
    let rec = r#"{"prompt": "Say yes", "chosen": " yes", "rejected": " no"}"#;
    let mut files = Vec::new();
    for sub in ["easy", "hard"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        let p = dir.join(sub).join("train.jsonl");
        std::fs::write(&p, format!("{rec}\n{rec}\n")).unwrap();
        files.push(p);
    }
    let other = dir.join("other.jsonl");
    std::fs::write(&other, format!("{rec}\n")).unwrap();
    files.push(other);
    let (pairs, summary) = load_pairs(&files, &DataOptions::default(), &data_fixtures().join("bpe"), true).unwrap();
    let sources: Vec<&str> = pairs.iter().map(|p| p.source.as_str()).collect();
    assert_eq!(sources, ["easy/train", "easy/train", "hard/train", "hard/train", "other"]);
    let text = summary.to_string();
    assert_has(&text, &["default source `easy/train`", "default source `hard/train`", "same stem"]);
    // the same file twice is named, not merged or read twice
    let twice = [files[0].clone(), files[0].clone()];
    let e = load_pairs(&twice, &DataOptions::default(), &data_fixtures().join("bpe"), true).unwrap_err().to_string();
    assert_has(&e, &["train.jsonl", "given twice"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_chat_template_given_for_plain_text_is_reported_as_not_applied() {
    let files = [data_fixtures().join("records/standard.jsonl"), data_fixtures().join("records/conversational.json")];
    let o =
        DataOptions { chat_template: Some(data_fixtures().join("templates/chatml.jinja")), ..DataOptions::default() };
    let (_, summary) = load_pairs(&files, &o, &data_fixtures().join("bpe"), true).unwrap();
    let n_plain = summary.files[0].1;
    assert_eq!(summary.template_not_applied, n_plain);
    assert_has(&summary.to_string(), &["--chat-template is not applied", "plain-text records", "as in TRL"]);
    // without --chat-template there is nothing to say
    let (_, summary) = load_pairs(&files, &DataOptions::default(), &data_fixtures().join("bpe"), true).unwrap();
    assert_eq!(summary.template_not_applied, 0);
    assert!(!summary.to_string().contains("not applied"));
}

// --- generate ------------------------------------------------------------------------------

fn generate_cli(model: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(["generate", "--model"]).arg(model).args(extra).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_refuses_what_it_cannot_answer() {
    let demo = root().join("demo");
    for t in ["--temperature=-1", "--temperature=NaN", "--temperature=inf"] {
        let (code, stdout, err) = generate_cli(&demo, &["--prompt", "1+1=", t]);
        assert_eq!(code, Some(1), "{t}: {err}");
        assert!(stdout.is_empty(), "{t}: {stdout:?}");
        assert_has(&err, &["--temperature", "expected 0 (greedy) or a positive number"]);
    }
    // the demo model has 64 positions
    let long = "1+".repeat(40) + "1=";
    let (code, stdout, err) = generate_cli(&demo, &["--prompt", &long]);
    assert_eq!(code, Some(1), "{err}");
    assert!(stdout.is_empty(), "{stdout:?}");
    assert_has(&err, &["max_position_embeddings is 64", "shorten the prompt"]);

    // NaN weights
    let dir = scratch("nan");
    let cfg = LlamaConfig::from_path(&demo).unwrap();
    let mut w = LlamaWeights::load(&demo, &cfg).unwrap();
    w.layers[1].down_proj[5] = f32::NAN;
    save_model(&dir.join("m"), &cfg, &w, cfg.dtype, Some(&demo)).unwrap();
    let (code, stdout, err) = generate_cli(&dir.join("m"), &["--prompt", "1+1="]);
    assert_eq!(code, Some(1), "{err}");
    assert!(stdout.is_empty(), "{stdout:?}");
    assert_has(&err, &["`model.layers.1.mlp.down_proj.weight`", "NaN or inf"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_in_the_library_checks_its_inputs_and_the_logits() {
    let demo = root().join("demo");
    let cfg = LlamaConfig::from_path(&demo).unwrap();
    let w = LlamaWeights::load(&demo, &cfg).unwrap();
    let opts = GenOptions { max_new_tokens: 4, temperature: 0.0, seed: 0, stop: vec![] };
    let engine = CpuEngine::new(cfg.clone(), w.clone()).unwrap();
    assert_eq!(generate(&engine, &[1, 3, 4], &opts).unwrap().len(), 4);
    let nan = GenOptions { temperature: f64::NAN, ..opts.clone() };
    assert!(generate(&engine, &[1, 3], &nan).unwrap_err().to_string().contains("temperature NaN"));
    let e = generate(&engine, &vec![3; 64], &opts).unwrap_err().to_string();
    assert_has(&e, &["64 tokens", "max_position_embeddings is 64"]);
    let e = generate(&engine, &[1, 16], &opts).unwrap_err().to_string();
    assert_has(&e, &["token id 16", "vocab_size 16"]);
    assert!(generate(&engine, &[], &opts).is_err());

    let mut bad = w;
    bad.norm[0] = f32::INFINITY;
    let engine = CpuEngine::new(cfg, bad).unwrap();
    let e = generate(&engine, &[1, 3], &opts).unwrap_err().to_string();
    assert_has(&e, &["logits at position 1 are not finite"]);
}

// --- progress ------------------------------------------------------------------------------

#[test]
fn progress_speaks_only_for_long_passes_and_never_when_quiet() {
    use sdpo::data::progress::Progress;
    let p = Progress::new("testing", "items", 10, true);
    let quiet = Progress::new("testing", "items", 10, false);
    p.add(1);
    quiet.add(1);
    assert!(!p.printed(), "nothing within the first two seconds");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    p.add(1);
    quiet.add(1);
    assert!(p.printed() && !quiet.printed());
}
