//! Preference data against TRL: the token ids `load_pairs` produces must equal the ids
//! transformers 5 + TRL 1.16 produce for the same records (tests/fixtures/data/expected.json,
//! made by tools/make_data_fixtures.py with TRL's own DPOTrainer preprocessing), for every
//! record format x tokenizer x chat template. Token ids are integers: equality is exact.
//! Then every kind of bad input, each an error naming file, line or record, and field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use sdpo::data::prepare::DROP_PROMPT_FILLS;
use sdpo::data::{load_pairs, DataOptions, PairExample};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn as_pairs(v: &Value) -> Vec<PairExample> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| PairExample {
            prompt: ids(&r["prompt_ids"]),
            chosen: ids(&r["chosen_ids"]),
            rejected: ids(&r["rejected_ids"]),
            source: r.get("source").and_then(Value::as_str).unwrap_or("").to_string(),
        })
        .collect()
}

const FILES: [&str; 5] =
    ["standard.jsonl", "conversational.json", "implicit_conv.parquet", "implicit_text.jsonl", "orca.parquet"];

fn options_for(file: &str, template: Option<&str>) -> DataOptions {
    let mut o = DataOptions {
        chat_template: template.map(|t| fixtures().join("templates").join(format!("{t}.jinja"))),
        ..DataOptions::default()
    };
    if file == "orca.parquet" {
        o.prompt_field = "question".into();
        o.system_field = Some("system".into());
    }
    o
}

fn assert_same(got: &[PairExample], want: &[PairExample], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of pairs");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.prompt, w.prompt, "{what}: pair {i} prompt");
        assert_eq!(g.chosen, w.chosen, "{what}: pair {i} chosen");
        assert_eq!(g.rejected, w.rejected, "{what}: pair {i} rejected");
        assert_eq!(g.source, w.source, "{what}: pair {i} source");
    }
}

#[test]
fn ids_equal_trl_for_every_format_tokenizer_and_template() {
    let exp = expected();
    let mut checked = 0;
    for tok in ["bpe", "spm"] {
        for template in ["llama3", "chatml", "zephyr", "llama2"] {
            for file in FILES {
                let key = format!("{tok}/{template}/{file}");
                let want = as_pairs(&exp[&key]);
                let opts = options_for(file, Some(template));
                let path = fixtures().join("records").join(file);
                let (got, summary) = load_pairs(&[path], &opts, &fixtures().join(tok), true).unwrap();
                assert_same(&got, &want, &key);
                assert_eq!(summary.read, want.len(), "{key}");
                assert!(summary.dropped.is_empty(), "{key}: {summary}");
                checked += got.len();
            }
        }
    }
    assert!(checked > 80, "{checked}");
}

#[test]
fn shared_heads_are_tokenized_once_only_where_exact() {
    // The byte-level BPE fixture cuts conversations after special tokens (and its ids equal
    // TRL's above); the Metaspace one (prepend_scheme "first") must tokenize whole texts.
    use sdpo::data::tokenize::PairTokenizer;
    assert!(PairTokenizer::load(&fixtures().join("bpe"), None).unwrap().splits_at_special_tokens());
    assert!(!PairTokenizer::load(&fixtures().join("spm"), None).unwrap().splits_at_special_tokens());
}

#[test]
fn the_model_directorys_own_template_is_used() {
    // bpe/tokenizer_config.json holds the Llama 3 template; spm/ has chat_template.jinja (Zephyr).
    let exp = expected();
    for (tok, template) in [("bpe", "llama3"), ("spm", "zephyr")] {
        let file = "conversational.json";
        let (got, _) =
            load_pairs(&[fixtures().join("records").join(file)], &options_for(file, None), &fixtures().join(tok), true)
                .unwrap();
        assert_same(&got, &as_pairs(&exp[&format!("{tok}/{template}/{file}")]), tok);
    }
}

#[test]
fn several_files_keep_order_and_sources_and_count_identical_pairs() {
    let exp = expected();
    let files: Vec<PathBuf> = ["standard.jsonl", "conversational.json", "pretokenized.jsonl"]
        .iter()
        .map(|f| fixtures().join("records").join(f))
        .collect();
    let (got, summary) = load_pairs(&files, &DataOptions::default(), &fixtures().join("bpe"), true).unwrap();
    let mut want = as_pairs(&exp["bpe/llama3/standard.jsonl"]);
    want.extend(as_pairs(&exp["bpe/llama3/conversational.json"]));
    // pretokenized.jsonl: the first two standard pairs; one without source (the stem), one "pre"
    let mut pre = as_pairs(&exp["bpe/llama3/standard.jsonl"])[..2].to_vec();
    pre[0].source = "pretokenized".into();
    pre[1].source = "pre".into();
    want.extend(pre);
    assert_same(&got, &want, "three files");
    assert_eq!((summary.read, summary.kept, summary.pretokenized), (10, 10, 2));
    // "The sky col" + "or is blue": the prompt's last token merges into the answer's
    assert_eq!(summary.boundary_moved, 1, "{summary}");
    // "Say yes" -> " yes" / " yes" in both the standard and the conversational file
    assert_eq!(summary.identical, 2, "{summary}");
    let tokens: u64 = got.iter().map(|p| p.shared_len() as u64).sum();
    assert_eq!(summary.pair.total, tokens);
}

#[test]
fn truncation_matches_trl_and_is_counted() {
    let exp = expected();
    let t = &exp["truncation"];
    let max_length = t["max_length"].as_u64().unwrap() as usize;
    let n_in = t["n_in"].as_u64().unwrap() as usize;
    let mut want = as_pairs(&t["pairs"]);
    let mut opts = options_for("conversational.json", Some("llama3"));
    opts.max_length = Some(max_length);
    let path = fixtures().join("records/conversational.json");
    let (got, summary) = load_pairs(std::slice::from_ref(&path), &opts, &fixtures().join("bpe"), true).unwrap();
    // TRL's fixture pairs carry no source; ours do.
    for (w, g) in want.iter_mut().zip(&got) {
        w.source = g.source.clone();
    }
    assert_same(&got, &want, "truncated");
    assert_eq!(summary.dropped.get(DROP_PROMPT_FILLS).copied().unwrap_or(0), n_in - want.len(), "{summary}");
    // every kept pair shorter than the untruncated one was counted as truncated
    let (full, _) =
        load_pairs(&[path], &options_for("conversational.json", Some("llama3")), &fixtures().join("bpe"), true)
            .unwrap();
    let cut =
        got.iter().filter(|g| full.iter().any(|f| f.prompt == g.prompt && f.shared_len() > g.shared_len())).count();
    assert!(cut > 0);
    assert_eq!(summary.truncated, cut, "{summary}");
    for p in &got {
        assert!(p.prompt.len() + p.chosen.len() <= max_length && p.prompt.len() + p.rejected.len() <= max_length);
    }
}

// --- bad input ---------------------------------------------------------------------------

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdpo-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_for(name: &str, contents: &[u8], opts: &DataOptions) -> String {
    let dir = scratch(name);
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    let e = load_pairs(&[path], opts, &fixtures().join("bpe"), true).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    e
}

const GOOD: &str = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;

fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "error {e:?} should contain {p:?}");
    }
}

#[test]
fn malformed_json_names_the_line() {
    let e = err_for("bad.jsonl", format!("{GOOD}\n{{\"prompt\": \"p\", \n").as_bytes(), &DataOptions::default());
    assert_has(&e, &["bad.jsonl:2:", "malformed JSON"]);
    let e = err_for("bad.json", b"[\n {\"prompt\": \"p\",\n  \"chosen\": ]\n", &DataOptions::default());
    assert_has(&e, &["bad.json:3:", "malformed JSON"]);
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let e = err_for(
        "m.jsonl",
        format!("{GOOD}\n{GOOD}\n{{\"prompt\": \"p\", \"chosen\": \"a\"}}\n").as_bytes(),
        &DataOptions::default(),
    );
    assert_has(&e, &["m.jsonl:3:", "missing field `rejected`", "--rejected-field"]);
    let e = err_for("t.jsonl", br#"{"prompt": "p", "chosen": 5, "rejected": "b"}"#, &DataOptions::default());
    assert_has(&e, &["t.jsonl:1:", "`chosen` must be a string or a list of messages, found a number"]);
    let e = err_for(
        "s.json",
        br#"[{"prompt": "p", "chosen": "a", "rejected": "b", "source": 3}]"#,
        &DataOptions::default(),
    );
    assert_has(&e, &["s.json: record 1:", "`source` must be a string"]);
    // mapped field names appear in the message
    let o = DataOptions { prompt_field: "question".into(), ..DataOptions::default() };
    let e = err_for("q.jsonl", GOOD.as_bytes(), &o);
    assert_has(&e, &["q.jsonl:1:", "missing field `question`", "--prompt-field"]);
}

#[test]
fn empty_answers_are_errors() {
    let e = err_for("e.jsonl", br#"{"prompt": "p", "chosen": "", "rejected": "b"}"#, &DataOptions::default());
    assert_has(&e, &["e.jsonl:1:", "`chosen` is empty"]);
    let e = err_for("e2.jsonl", br#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": []}"#, &DataOptions::default());
    assert_has(&e, &["e2.jsonl:1:", "`rejected` is an empty list"]);
}

#[test]
fn conversation_without_assistant_turn() {
    let rec = br#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let e = err_for("c.jsonl", rec, &DataOptions::default());
    assert_has(&e, &["c.jsonl:1:", "conversation `chosen` has no assistant turn"]);
}

#[test]
fn invalid_utf8_names_the_line() {
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"caf\xe9\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
    let e = err_for("u.jsonl", &bytes, &DataOptions::default());
    assert_has(&e, &["u.jsonl:2:", "invalid UTF-8"]);
}

#[test]
fn template_errors_carry_raise_exception_message() {
    // Llama 2's template refuses two user turns in a row.
    let rec = br#"{"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let mut o =
        DataOptions { chat_template: Some(fixtures().join("templates/llama2.jinja")), ..DataOptions::default() };
    let e = err_for("r.jsonl", format!("{}\n", std::str::from_utf8(rec).unwrap()).as_bytes(), &o);
    assert_has(
        &e,
        &["r.jsonl:1:", "chat template", "Conversation roles must alternate user/assistant/user/assistant/..."],
    );
    // a template that does not compile is reported with its file before any record is read
    let dir = scratch("badtemplate");
    let t = dir.join("broken.jinja");
    std::fs::write(&t, "{% for m in messages %}{{ m.content }}").unwrap();
    o.chat_template = Some(t);
    let e = load_pairs(&[fixtures().join("records/conversational.json")], &o, &fixtures().join("bpe"), true)
        .unwrap_err()
        .to_string();
    assert_has(&e, &["broken.jinja", "does not compile"]);
}

#[test]
fn validation_comes_before_tokenization() {
    // Record 1 would fail in the template, record 3 is malformed: the malformed record is
    // reported, because every record is checked before any is tokenized.
    let bad_roles = r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let o = DataOptions { chat_template: Some(fixtures().join("templates/llama2.jinja")), ..DataOptions::default() };
    let e = err_for("v.jsonl", format!("{bad_roles}\n{GOOD}\n{{oops\n").as_bytes(), &o);
    assert_has(&e, &["v.jsonl:3:", "malformed JSON"]);
}

#[test]
fn missing_or_corrupt_tokenizer() {
    let dir = scratch("notok");
    let data = fixtures().join("records/standard.jsonl");
    let e = load_pairs(std::slice::from_ref(&data), &DataOptions::default(), &dir, true).unwrap_err().to_string();
    assert_has(&e, &["tokenizer.json", "missing"]);
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\", \"model\": 7}").unwrap();
    let e = load_pairs(&[data], &DataOptions::default(), &dir, true).unwrap_err().to_string();
    assert_has(&e, &["tokenizer.json", "not a valid tokenizer.json"]);
    // pre-tokenized data needs no tokenizer, only the vocabulary size (config.json)
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("config.json"), "{\"vocab_size\": 1000}").unwrap();
    let (pairs, _) =
        load_pairs(&[fixtures().join("records/pretokenized.jsonl")], &DataOptions::default(), &dir, true).unwrap();
    assert_eq!(pairs.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pretokenized_ids_outside_the_vocabulary() {
    // the bpe fixture has 800 tokens
    let rec = br#"{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [800]}"#;
    let e = err_for("ids.jsonl", rec, &DataOptions::default());
    assert_has(&e, &["ids.jsonl:1:", "`rejected_ids[0]` = 800", "outside the model's vocabulary"]);
}

#[test]
fn parquet_with_the_wrong_columns() {
    let e = load_pairs(
        &[fixtures().join("records/bad_columns.parquet")],
        &DataOptions::default(),
        &fixtures().join("bpe"),
        true,
    )
    .unwrap_err()
    .to_string();
    assert_has(&e, &["bad_columns.parquet", "no column `chosen`", "question, answer", "--chosen-field"]);
    let e = err_for("fake.parquet", b"PAR1 this is not parquet", &DataOptions::default());
    assert_has(&e, &["fake.parquet", "not a readable parquet file"]);
}

// --- the command --------------------------------------------------------------------------

#[test]
fn prepare_writes_pretokenized_pairs_and_refuses_to_overwrite() {
    let dir = scratch("cli");
    let out = dir.join("pairs.jsonl");
    // `sdpo-run prepare` on `files` into `out`, with `extra` flags.
    let run = |files: &[std::path::PathBuf], extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdpo-run"))
            .args(["prepare", "--model"])
            .arg(fixtures().join("spm"))
            .arg("--data")
            .args(files)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    // no record has an `instruction` field: the first file's first record is named
    let bad = [fixtures().join("records/standard.jsonl"), fixtures().join("records/orca.parquet")];
    let r = run(&bad, &["--prompt-field", "instruction"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert_has(&err, &["standard.jsonl:1:", "missing field `instruction`", "--prompt-field"]);
    assert!(!out.exists(), "nothing is written on error");

    let files = [fixtures().join("records/standard.jsonl"), fixtures().join("records/conversational.json")];
    let r = run(&files, &["--max-length", "1000"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_has(&String::from_utf8_lossy(&r.stderr), &["pairs read 8, kept 8", "chosen == rejected (kept) 2"]);
    let written = sdpo::data::pretokenized::read_pairs(&out, 600).unwrap();
    let (want, _) = load_pairs(&files, &DataOptions::default(), &fixtures().join("spm"), true).unwrap();
    assert_eq!(written, want);
    // a second run must not clobber it
    std::fs::write(&out, "keep me\n").unwrap();
    let r = run(&files, &[]);
    assert!(!r.status.success());
    assert_has(&String::from_utf8_lossy(&r.stderr), &["exists", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me\n");
    let r = run(&files, &["--overwrite"]);
    assert!(r.status.success());
    assert_eq!(sdpo::data::pretokenized::read_pairs(&out, 600).unwrap(), want);
    let _ = std::fs::remove_dir_all(&dir);
}
