//! Every malformed input gets its own message naming the file (and line, field or tensor),
//! and saved checkpoints load back exactly. Broken inputs are made from the PyTorch
//! fixtures in a temporary folder, so no broken file needs to be committed.

use std::path::{Path, PathBuf};

use sdpo::config::{DType, LlamaConfig, RopeScaling};
use sdpo::data::pretokenized::{read_pairs, write_pairs};
use sdpo::weights::{load_tensors_f32, save_model, save_tensors_f32};
use sdpo::{LlamaWeights, PairExample};
use serde_json::{json, Value};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn config_json(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(model).join("reference/config.json")).unwrap()).unwrap()
}

fn config_err(v: Value) -> String {
    match LlamaConfig::from_json(v) {
        Ok(_) => panic!("config should have been rejected"),
        Err(e) => e,
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

// --- config.json -----------------------------------------------------------------------

#[test]
fn config_errors_name_the_field() {
    let base = config_json("gqa");
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    assert_has(&config_err(with("model_type", json!("mistral"))), &["model_type `mistral`", "Llama"]);
    assert_has(&config_err(with("attention_bias", json!(true))), &["attention_bias", "bias"]);
    assert_has(&config_err(with("sliding_window", json!(4096))), &["sliding_window", "4096"]);
    let mut c = base.clone();
    c["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0});
    assert_has(&config_err(c), &["rope type `yarn`", "llama3"]);
    let mut c = base.clone();
    c.as_object_mut().unwrap().remove("hidden_size");
    assert_has(&config_err(c), &["missing field `hidden_size`"]);
    assert_has(&config_err(with("bos_token_id", json!("<s>"))), &["bos_token_id"]);

    // The file-level error names config.json.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let e = LlamaConfig::from_path(dir.path()).unwrap_err().to_string();
    assert_has(&e, &["config.json", "not valid JSON"]);
}

#[test]
fn config_accepts_both_transformers_generations() {
    // bos/eos as an int or as a list
    let mut c = config_json("gqa");
    c["eos_token_id"] = json!([2, 7]);
    c["bos_token_id"] = json!(1);
    let cfg = LlamaConfig::from_json(c).unwrap();
    assert_eq!((cfg.bos_token_ids, cfg.eos_token_ids), (vec![1], vec![2, 7]));

    // transformers 5: rope_theta inside rope_parameters (what the fixture has)
    let cfg = LlamaConfig::from_path(&fixture("llama3/reference")).unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert_eq!((cfg.head_dim, cfg.n_heads, cfg.n_kv_heads), (16, 4, 1));

    // transformers 4.x: rope_theta at the top level, scaling in rope_scaling with `type`
    let mut c = config_json("llama3");
    let o = c.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.insert("rope_theta".into(), json!(250000.0));
    o.insert(
        "rope_scaling".into(),
        json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}),
    );
    let cfg = LlamaConfig::from_json(c).unwrap();
    assert_eq!(cfg.rope_theta, 250000.0);
    assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }));
}

// --- safetensors -------------------------------------------------------------------------

/// The reference of `model` as (config, weights, [(name, shape, data)]).
fn reference(model: &str) -> (LlamaConfig, LlamaWeights) {
    let dir = fixture(&format!("{model}/reference"));
    let cfg = LlamaConfig::from_path(&dir).unwrap();
    let w = LlamaWeights::load(&dir, &cfg).unwrap();
    (cfg, w)
}

fn named(cfg: &LlamaConfig, w: &LlamaWeights) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    LlamaWeights::specs(cfg).into_iter().zip(w.tensors()).map(|(s, t)| (s.name, s.shape, t.clone())).collect()
}

/// A model folder with the fixture's config and the given tensors in model.safetensors.
fn folder_with(model: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> (tempfile::TempDir, LlamaConfig) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(&format!("{model}/reference/config.json")), dir.path().join("config.json")).unwrap();
    let views: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice())).collect();
    save_tensors_f32(&dir.path().join("model.safetensors"), &views).unwrap();
    let cfg = LlamaConfig::from_path(dir.path()).unwrap();
    (dir, cfg)
}

fn load_err(dir: &Path, cfg: &LlamaConfig) -> String {
    LlamaWeights::load(dir, cfg).expect_err("load should fail").to_string()
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let (cfg, w) = reference("gqa");
    let mut t = named(&cfg, &w);
    t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight");
    let (dir, cfg) = folder_with("gqa", &t);
    assert_has(
        &load_err(dir.path(), &cfg),
        &["model.safetensors", "missing tensor `model.layers.1.mlp.up_proj.weight`", "[64, 32]"],
    );
}

#[test]
fn misshaped_tensor_gives_found_and_expected() {
    let (cfg, w) = reference("gqa");
    let mut t = named(&cfg, &w);
    let k = t.iter_mut().find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight").unwrap();
    k.1 = vec![32, 16]; // transposed
    let (dir, cfg) = folder_with("gqa", &t);
    assert_has(
        &load_err(dir.path(), &cfg),
        &[
            "`model.layers.0.self_attn.k_proj.weight`",
            "shape [32, 16]",
            "config.json implies [16, 32]",
            "num_key_value_heads",
        ],
    );
}

#[test]
fn unexpected_tensors_are_rejected_but_known_buffers_ignored() {
    let (cfg, w) = reference("gqa");
    let mut t = named(&cfg, &w);
    t.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), vec![4], vec![1.0; 4]));
    let (dir, cfg2) = folder_with("gqa", &t);
    assert_eq!(LlamaWeights::load(dir.path(), &cfg2).unwrap(), w, "inv_freq buffers are ignored");

    t.push(("model.layers.0.self_attn.q_proj.bias".into(), vec![32], vec![0.0; 32]));
    let (dir, cfg2) = folder_with("gqa", &t);
    assert_has(&load_err(dir.path(), &cfg2), &["unexpected tensor `model.layers.0.self_attn.q_proj.bias`", "[32]"]);
}

#[test]
fn tied_lm_head_is_accepted_only_when_it_equals_the_embedding() {
    let (cfg, w) = reference("tied");
    assert!(cfg.tie_word_embeddings && w.lm_head.is_none());
    let mut t = named(&cfg, &w);
    t.push(("lm_head.weight".into(), vec![cfg.vocab_size, cfg.hidden_size], w.embed.clone()));
    let (dir, cfg2) = folder_with("tied", &t);
    assert_eq!(LlamaWeights::load(dir.path(), &cfg2).unwrap(), w);

    t.last_mut().unwrap().2[5] += 1.0;
    let (dir, cfg2) = folder_with("tied", &t);
    assert_has(&load_err(dir.path(), &cfg2), &["lm_head.weight", "tie_word_embeddings"]);
}

/// A safetensors file with one tensor in a dtype we do not read, written by hand.
fn write_raw(path: &Path, tensors: &[(&str, &str, Vec<usize>, usize)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (name, dtype, shape, size) in tensors {
        let n = shape.iter().product::<usize>() * size;
        header.insert(name.to_string(), json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(vec![0u8; off]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unsupported_dtype_is_named() {
    let cfg = LlamaConfig::from_path(&fixture("gqa/reference")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("gqa/reference/config.json"), dir.path().join("config.json")).unwrap();
    let specs = LlamaWeights::specs(&cfg);
    let t: Vec<(&str, &str, Vec<usize>, usize)> = specs
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                if s.name == "model.norm.weight" { "F64" } else { "F32" },
                s.shape.clone(),
                if s.name == "model.norm.weight" { 8 } else { 4 },
            )
        })
        .collect();
    write_raw(&dir.path().join("model.safetensors"), &t);
    assert_has(&load_err(dir.path(), &cfg), &["`model.norm.weight`", "dtype F64", "F32, BF16 and F16"]);
}

#[test]
fn corrupt_header_and_missing_files() {
    let cfg = LlamaConfig::from_path(&fixture("gqa/reference")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.extend(b"{\"model.norm.weight\": {\"dtype\": \"F32\", garbage garbage garbage garbage}");
    std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
    assert_has(&load_err(dir.path(), &cfg), &["model.safetensors", "not a valid safetensors file"]);

    std::fs::write(dir.path().join("model.safetensors"), b"abc").unwrap();
    assert_has(&load_err(dir.path(), &cfg), &["model.safetensors", "not a valid safetensors file"]);

    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_has(&load_err(dir.path(), &cfg), &["no model.safetensors or model.safetensors.index.json"]);
}

#[test]
fn sharded_checkpoint_loads_and_a_missing_shard_is_named() {
    let src = fixture("gqa/policy");
    let cfg = LlamaConfig::from_path(&src).unwrap();
    let w = LlamaWeights::load(&src, &cfg).unwrap();
    // Independent of the index: the union of the shards, read file by file.
    let mut all = std::collections::BTreeMap::new();
    for i in 1..=3 {
        all.extend(load_tensors_f32(&src.join(format!("model-0000{i}-of-00003.safetensors"))).unwrap());
    }
    assert_eq!(all.len(), LlamaWeights::specs(&cfg).len());
    for (s, t) in LlamaWeights::specs(&cfg).iter().zip(w.tensors()) {
        assert_eq!(&all[&s.name].1, t, "{}", s.name);
    }

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&src, dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    assert_has(
        &load_err(dir.path(), &cfg),
        &["model.safetensors.index.json", "shard `model-00002-of-00003.safetensors`", "missing"],
    );
}

// --- save -> load ------------------------------------------------------------------------

/// bf16 round-to-nearest-even by integer arithmetic (the formula torch's c10::BFloat16 uses),
/// independent of the `half` crate the saver uses.
fn bf16_rne(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

#[test]
fn save_load_round_trip_f32_exact_and_bf16_rounded_to_nearest_even() {
    let (cfg, mut w) = reference("gqa");
    // Values exactly halfway between two bf16 numbers: ties go to the even mantissa.
    let tie_down = f32::from_bits(0x3F80_8000); // 1 + 2^-8: between 1.0 (even) and 1 + 2^-7
    let tie_up = f32::from_bits(0x3F81_8000); // between 1 + 2^-7 (odd) and 1 + 2^-6 (even)
    w.norm[0] = tie_down;
    w.norm[1] = tie_up;
    w.norm[2] = f32::from_bits(0x3F80_8001); // just above the tie: rounds up
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("tokenizer.json"), "{\"fake\": true}").unwrap();
    std::fs::write(src.path().join("chat_template.jinja"), "{{ messages }}").unwrap();

    let out = tempfile::tempdir().unwrap();
    let f32_dir = out.path().join("ckpt-f32");
    save_model(&f32_dir, &cfg, &w, DType::F32, Some(src.path())).unwrap();
    let cfg2 = LlamaConfig::from_path(&f32_dir).unwrap();
    assert_eq!(cfg2.dtype, DType::F32);
    assert_eq!(LlamaWeights::load(&f32_dir, &cfg2).unwrap(), w, "f32 round trip is exact");
    assert_eq!(std::fs::read_to_string(f32_dir.join("tokenizer.json")).unwrap(), "{\"fake\": true}");
    assert!(f32_dir.join("chat_template.jinja").is_file() && !f32_dir.join("special_tokens_map.json").exists());

    let bf_dir = out.path().join("ckpt-bf16");
    save_model(&bf_dir, &cfg, &w, DType::BF16, None).unwrap();
    let cfg3 = LlamaConfig::from_path(&bf_dir).unwrap();
    assert_eq!(cfg3.dtype, DType::BF16);
    let back = LlamaWeights::load(&bf_dir, &cfg3).unwrap();
    assert_eq!(back.norm[0], 1.0);
    assert_eq!(back.norm[1].to_bits(), 0x3F82_0000);
    assert_eq!(back.norm[2].to_bits(), 0x3F81_0000);
    for (a, b) in w.tensors().iter().zip(back.tensors()) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(bf16_rne(*x).to_bits(), y.to_bits());
        }
    }

    // Saving over an existing folder replaces it whole and leaves no temporary siblings.
    save_model(&f32_dir, &cfg, &back, DType::F32, None).unwrap();
    assert_eq!(LlamaWeights::load(&f32_dir, &cfg).unwrap(), back);
    assert!(!f32_dir.join("tokenizer.json").exists(), "the old folder's files are gone");
    let names: Vec<String> =
        std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn torch_bf16_checkpoint_is_its_f32_rounded_to_nearest_even() {
    // tied/reference_bf16 was written by torch (`model.to(torch.bfloat16)`), so this checks
    // the bf16 reader, and that our rounding is torch's, on 20k values.
    let (cfg, w) = reference("tied");
    let dir = fixture("tied/reference_bf16");
    let cfg_bf = LlamaConfig::from_path(&dir).unwrap();
    assert_eq!(cfg_bf.dtype, DType::BF16);
    let bf = LlamaWeights::load(&dir, &cfg).unwrap();
    for (a, b) in w.tensors().iter().zip(bf.tensors()) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(bf16_rne(*x).to_bits(), y.to_bits());
        }
    }
}

// --- pre-tokenized pairs -----------------------------------------------------------------

fn pairs_err(text: &str, vocab: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    std::fs::write(&path, text).unwrap();
    read_pairs(&path, vocab).expect_err("should fail").to_string()
}

const GOOD: &str = r#"{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}"#;

#[test]
fn pairs_errors_give_file_and_line() {
    let e = pairs_err(&format!("{GOOD}\n\n{{\"prompt_ids\": [1,\n"), 10);
    assert_has(&e, &["prefs.jsonl:3:", "malformed JSON"]);
    let e = pairs_err(&format!("{GOOD}\n{{\"prompt_ids\": [1], \"rejected_ids\": [2]}}\n"), 10);
    assert_has(&e, &["prefs.jsonl:2:", "missing field `chosen_ids`"]);
    let e = pairs_err(
        &format!("{GOOD}\n{GOOD}\n{{\"prompt_ids\": [1], \"chosen_ids\": [3, 10], \"rejected_ids\": [2]}}\n"),
        10,
    );
    assert_has(&e, &["prefs.jsonl:3:", "`chosen_ids[1]` = 10", "vocab_size 10", "another model"]);
    let e = pairs_err(&format!("{{\"prompt_ids\": [1], \"chosen_ids\": [3], \"rejected_ids\": []}}\n{GOOD}\n"), 10);
    assert_has(&e, &["prefs.jsonl:1:", "`rejected_ids` is empty"]);
    let e = pairs_err(r#"{"prompt_ids": [1, "2"], "chosen_ids": [3], "rejected_ids": [4]}"#, 10);
    assert_has(&e, &["prefs.jsonl:1:", "`prompt_ids[1]`", "non-negative integers"]);
}

#[test]
fn pairs_round_trip_and_fixture_reads() {
    let pairs = read_pairs(&fixture("gqa/pairs.jsonl"), 128).unwrap();
    assert_eq!(pairs.len(), 5);
    assert_eq!(pairs.iter().map(|p| p.prompt.len()).collect::<Vec<_>>(), vec![1, 12, 5, 8, 3]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let mut mine = pairs.clone();
    mine.push(PairExample { prompt: vec![5], chosen: vec![6], rejected: vec![7], source: "other".into() });
    write_pairs(&path, &mine).unwrap();
    assert_eq!(read_pairs(&path, 128).unwrap(), mine);
    // no `source`: the file stem
    std::fs::write(&path, format!("\n{GOOD}\n\n")).unwrap();
    assert_eq!(read_pairs(&path, 10).unwrap()[0].source, "out");
}

#[test]
fn f16_round_trip_is_within_half_an_ulp_and_mismatched_weights_are_refused() {
    let (cfg, w) = reference("odd");
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("ckpt-f16");
    save_model(&dir, &cfg, &w, DType::F16, None).unwrap();
    let cfg2 = LlamaConfig::from_path(&dir).unwrap();
    assert_eq!(cfg2.dtype, DType::F16);
    let back = LlamaWeights::load(&dir, &cfg2).unwrap();
    // Weights here are |x| < 1 and > 2^-14 mostly (normal f16): rounding to nearest keeps
    // the relative error within 2^-11; subnormals within half their spacing 2^-25.
    for (a, b) in w.tensors().iter().zip(back.tensors()) {
        for (x, y) in a.iter().zip(b) {
            let err = (x - y).abs();
            assert!(err <= x.abs() * 2f32.powi(-11) || err <= 2f32.powi(-25), "{x} -> {y}");
        }
    }
    // Rounding what is already f16 changes nothing.
    save_model(&dir, &cfg, &back, DType::F16, None).unwrap();
    assert_eq!(LlamaWeights::load(&dir, &cfg2).unwrap(), back);

    let mut wrong = w.clone();
    wrong.layers[1].down_proj.pop();
    let e = save_model(&out.path().join("bad"), &cfg, &wrong, DType::F32, None).unwrap_err().to_string();
    assert_has(&e, &["model.layers.1.mlp.down_proj.weight"]);
    assert!(!out.path().join("bad").exists());
}
