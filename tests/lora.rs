//! LoRA: the PEFT adapter folder (read, written, refused), PEFT's initialisation, and the
//! CPU engine with an adapter against PEFT + TRL (tests/fixtures/lora, made by
//! tools/make_lora_fixtures.py).
//!
//! Tolerances, argued as in tests/parity.rs: log-probs and the loss 1e-5 relative (fp32 on
//! both sides, sums in different orders carry ~1e-6); adapter gradients ‖a − b‖ / ‖b‖ ≤ 1e-4
//! per tensor (a wrong scale, transpose or missing path is O(1)).

use std::path::{Path, PathBuf};

use sdpo::config::LlamaConfig;
use sdpo::data::pretokenized::read_pairs;
use sdpo::dpo::{LossConfig, LossKind, Metrics};
use sdpo::engine::cpu::CpuEngine;
use sdpo::lora::{Adapter, LoraConfig, LoraWeights, Module, CONFIG_FILE, WEIGHTS_FILE};
use sdpo::weights::load_tensors_f32;
use sdpo::{Engine, Layout, LlamaWeights, PairBatch, PairExample, PairLogps};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn config(model: &str) -> LlamaConfig {
    LlamaConfig::from_path(&fixture(&format!("{model}/policy"))).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A copy of a fixture adapter with `edit` applied to its adapter_config.json.
fn edited_adapter(case: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(&format!("lora/{case}/adapter"));
    std::fs::copy(src.join(WEIGHTS_FILE), dir.path().join(WEIGHTS_FILE)).unwrap();
    let mut raw = read_json(&src.join(CONFIG_FILE));
    edit(raw.as_object_mut().unwrap());
    std::fs::write(dir.path().join(CONFIG_FILE), serde_json::to_string(&raw).unwrap()).unwrap();
    dir
}

// --- the adapter folder

#[test]
fn reads_peft_adapters() {
    let a = Adapter::load(&fixture("lora/gqa_r4_qv/adapter"), &config("gqa")).unwrap();
    assert_eq!((a.config.r, a.config.alpha, a.config.use_rslora), (4, 8.0, false));
    assert_eq!(a.config.targets, vec![Module::QProj, Module::VProj]);
    assert_eq!(a.base_model, "gqa/policy");
    let q = a.weights.layers[1][Module::QProj.index()].as_ref().unwrap();
    assert_eq!((q.a.len(), q.b.len()), (4 * 32, 32 * 4));
    assert!(a.weights.layers[0][Module::OProj.index()].is_none());

    // all-linear: PEFT saves the expanded module paths; the tensors say which.
    let a = Adapter::load(&fixture("lora/gqa_r4_all_rslora/adapter"), &config("gqa")).unwrap();
    assert_eq!(a.config.targets, Module::ALL.to_vec());
    assert!(a.config.use_rslora);
    assert_eq!(a.config.scale(), 8.0); // 16 / √4
}

#[test]
fn a_saved_adapter_reads_back_and_is_peft_shaped() {
    let cfg = config("llama3");
    let a = Adapter::load(&fixture("lora/llama3_r4_mixed/adapter"), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("step-1");
    a.save(&out).unwrap();
    assert_eq!(Adapter::load(&out, &cfg).unwrap(), a);
    let raw = read_json(&out.join(CONFIG_FILE));
    assert_eq!(raw["peft_type"], "LORA");
    assert_eq!(raw["task_type"], "CAUSAL_LM");
    assert_eq!(raw["bias"], "none");
    assert_eq!(raw["lora_alpha"], 16);
    assert_eq!(raw["target_modules"], serde_json::json!(["k_proj", "o_proj", "gate_proj", "down_proj"]));
    // The same keys and values as PEFT's own file.
    let ours = sdpo::weights::load_tensors_f32(&out.join(WEIGHTS_FILE)).unwrap();
    let peft = sdpo::weights::load_tensors_f32(&fixture("lora/llama3_r4_mixed/adapter").join(WEIGHTS_FILE)).unwrap();
    assert_eq!(ours, peft);
    // Saving again replaces the folder whole.
    a.save(&out).unwrap();
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
}

#[test]
fn fresh_adapters_are_initialised_as_peft_does() {
    let cfg = config("gqa");
    let lc = LoraConfig::new(8, None, &["all-linear".into()], 0.0, false).unwrap();
    let w = LoraWeights::init(&cfg, &lc, 7);
    assert_eq!(w, LoraWeights::init(&cfg, &lc, 7), "seeded");
    assert_ne!(w, LoraWeights::init(&cfg, &lc, 8));
    for (l, layer) in w.layers.iter().enumerate() {
        for m in Module::ALL {
            let p = layer[m.index()].as_ref().unwrap();
            let (din, dout) = m.dims(&cfg);
            assert_eq!((p.a.len(), p.b.len()), (8 * din, dout * 8));
            assert!(p.b.iter().all(|&x| x == 0.0), "lora_B starts at zero");
            // kaiming_uniform_(a=√5) on [r, in]: U(−1/√in, 1/√in), variance bound²/3.
            let bound = 1.0 / (din as f64).sqrt();
            assert!(p.a.iter().all(|&x| (x as f64).abs() <= bound), "layer {l} {m:?}: outside ±1/√in");
            let max = p.a.iter().fold(0f64, |acc, &x| acc.max((x as f64).abs()));
            assert!(max > 0.9 * bound, "layer {l} {m:?}: max |A| {max} should reach near {bound}");
            let var = p.a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / p.a.len() as f64;
            let want = bound * bound / 3.0;
            assert!((var / want - 1.0).abs() < 0.25, "layer {l} {m:?}: variance {var}, want {want}");
        }
    }
}

#[test]
fn unsupported_adapters_are_refused_naming_the_field() {
    let cfg = config("gqa");
    type Edit = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("`bias` is \"all\"", Box::new(|c| drop(c.insert("bias".into(), "all".into())))),
        ("`use_dora` is true", Box::new(|c| drop(c.insert("use_dora".into(), true.into())))),
        (
            "`modules_to_save` is set",
            Box::new(|c| drop(c.insert("modules_to_save".into(), serde_json::json!(["lm_head"])))),
        ),
        (
            "`alpha_pattern` is set",
            Box::new(|c| drop(c.insert("alpha_pattern".into(), serde_json::json!({"q_proj": 4})))),
        ),
        ("`peft_type` is \"IA3\"", Box::new(|c| drop(c.insert("peft_type".into(), "IA3".into())))),
        ("has shape [4, 32], expected [2, 32]", Box::new(|c| drop(c.insert("r".into(), 2.into())))),
    ];
    for (want, edit) in cases {
        let dir = edited_adapter("gqa_r4_qv", edit);
        let err = Adapter::load(dir.path(), &cfg).unwrap_err().to_string();
        assert!(err.contains(want), "want `{want}` in: {err}");
        let file = if want.contains("shape") { WEIGHTS_FILE } else { CONFIG_FILE };
        assert!(err.contains(file), "the error names {file}: {err}");
    }

    // An adapter on a module sdpo does not adapt (the LM head).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("lora/gqa_r4_qv/adapter").join(CONFIG_FILE), dir.path().join(CONFIG_FILE)).unwrap();
    let key = "base_model.model.lm_head.lora_A.weight".to_string();
    sdpo::weights::save_tensors_f32(&dir.path().join(WEIGHTS_FILE), &[(key, vec![4, 32], &[0f32; 128][..])]).unwrap();
    let err = Adapter::load(dir.path(), &cfg).unwrap_err().to_string();
    assert!(err.contains("lm_head.lora_A") && err.contains(WEIGHTS_FILE), "{err}");

    // Another model's adapter: the shapes do not fit.
    let err = Adapter::load(&fixture("lora/gqa_r4_qv/adapter"), &config("odd")).unwrap_err().to_string();
    assert!(err.contains("has shape") && err.contains("another model"), "{err}");
}

// --- the CPU engine against PEFT + TRL

fn sigmoid() -> LossConfig {
    LossConfig { kind: LossKind::Sigmoid, beta: 0.1, label_smoothing: 0.0, sft_weight: 0.0 }
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// The largest relative error of `got` against `want`; panics above `tol`.
fn check_rel(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst: f64 = 0.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1e-30);
        assert!(err <= tol, "{what}[{i}]: got {g}, want {w} (relative error {err:.2e} > {tol:.0e})");
        worst = worst.max(err);
    }
    worst
}

struct Case {
    base_dir: PathBuf,
    cfg: LlamaConfig,
    base: LlamaWeights,
    adapter: Adapter,
    pairs: Vec<PairExample>,
    expected: Value,
}

fn case(name: &str) -> Case {
    let expected = read_json(&fixture(&format!("lora/{name}/expected.json")));
    let base_dir = fixture(expected["base"].as_str().unwrap());
    let cfg = LlamaConfig::from_path(&base_dir).unwrap();
    let base = LlamaWeights::load(&base_dir, &cfg).unwrap();
    let mut adapter = Adapter::load(&fixture(&format!("lora/{name}/adapter")), &cfg).unwrap();
    adapter.config.dropout_seed = expected["dropout_seed"].as_u64().unwrap_or(0);
    let pairs = read_pairs(&fixture(expected["pairs_file"].as_str().unwrap()), cfg.vocab_size).unwrap();
    Case { base_dir, cfg, base, adapter, pairs, expected }
}

fn chosen(v: &[PairLogps]) -> Vec<f64> {
    v.iter().map(|p| p.chosen).collect()
}

fn rejected(v: &[PairLogps]) -> Vec<f64> {
    v.iter().map(|p| p.rejected).collect()
}

/// Reference and policy log-probs, the loss and every adapter gradient against PEFT's;
/// returns the worst relative errors (log-probs and loss, gradients).
fn check_case(name: &str, layout: Layout) -> (f64, f64) {
    let c = case(name);
    let e = &c.expected;
    let refs: Vec<&PairExample> = c.pairs.iter().collect();
    let batch = PairBatch::new(&refs, layout).unwrap();
    let mut engine = CpuEngine::with_adapter(c.cfg.clone(), c.base.clone(), c.adapter.clone()).unwrap();
    let tag = format!("{name} {layout:?}");

    let reference_from_base = e["reference"] == "base";
    engine.set_adapter_enabled(!reference_from_base).unwrap();
    let reference = engine.sequence_logps(&batch).unwrap();
    engine.set_adapter_enabled(true).unwrap();
    let mut worst =
        check_rel(&format!("{tag} reference chosen"), &chosen(&reference), &numbers(&e["reference_chosen_logp"]), 1e-5);
    worst = worst.max(check_rel(
        &format!("{tag} reference rejected"),
        &rejected(&reference),
        &numbers(&e["reference_rejected_logp"]),
        1e-5,
    ));

    let policy = engine.train_step(&batch, &reference, &sigmoid(), 1.0 / c.pairs.len() as f64).unwrap();
    worst = worst.max(check_rel(
        &format!("{tag} policy chosen"),
        &chosen(&policy),
        &numbers(&e["policy_chosen_logp"]),
        1e-5,
    ));
    worst = worst.max(check_rel(
        &format!("{tag} policy rejected"),
        &rejected(&policy),
        &numbers(&e["policy_rejected_logp"]),
        1e-5,
    ));
    let loss = Metrics::from_pairs(&policy, &reference, &sigmoid()).loss;
    worst = worst.max(check_rel(&format!("{tag} loss"), &[loss], &[e["loss"].as_f64().unwrap()], 1e-5));

    // Every adapter gradient, by PEFT's key; nothing else has one.
    assert!(engine.grads().is_err(), "the base is frozen");
    let grads = engine.adapter_grads().unwrap();
    let want = load_tensors_f32(&fixture(&format!("lora/{name}/grads.safetensors"))).unwrap();
    let specs = grads.specs();
    assert_eq!(specs.len(), want.len(), "{tag}: adapter tensors");
    let mut worst_grad: f64 = 0.0;
    for (s, got) in specs.iter().zip(grads.tensors()) {
        let (shape, b) = &want[&s.name];
        assert_eq!(shape, &s.shape, "{tag}: {}", s.name);
        let num: f64 = got.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        assert!(den > 0.0, "{tag}: {} has a zero gradient in the fixture", s.name);
        let rel = num.sqrt() / den.sqrt();
        assert!(rel <= 1e-4, "{tag}: {} relative error {rel:.2e} > 1e-4", s.name);
        worst_grad = worst_grad.max(rel);
    }
    eprintln!("{tag}: worst log-prob/loss relative error {worst:.2e}, worst adapter gradient {worst_grad:.2e}");
    (worst, worst_grad)
}

#[test]
fn lora_matches_peft_r4_q_v() {
    check_case("gqa_r4_qv", Layout::Shared);
    check_case("gqa_r4_qv", Layout::Concatenated);
}

#[test]
fn lora_matches_peft_all_linear_rslora_from_an_adapter() {
    check_case("gqa_r4_all_rslora", Layout::Shared);
}

#[test]
fn lora_matches_peft_llama3_mixed_targets() {
    check_case("llama3_r4_mixed", Layout::Shared);
}

#[test]
fn lora_matches_peft_r8_tied_mlp_rslora() {
    check_case("tied_r8_mlp_rslora", Layout::Shared);
}

/// Dropout 0.25 on q, v and down_proj, PEFT given sdpo's masks (see make_lora_fixtures.py).
#[test]
fn lora_matches_peft_with_dropout_masks() {
    let (_, worst_grad) = check_case("gqa_r4_dropout", Layout::Shared);
    assert!(worst_grad <= 1e-4);
    // The masks matter: without them (p = 0) the same adapter's gradients differ.
    let mut c = case("gqa_r4_dropout");
    c.adapter.config.dropout = 0.0;
    let refs: Vec<&PairExample> = c.pairs.iter().collect();
    let batch = PairBatch::new(&refs, Layout::Shared).unwrap();
    let mut engine = CpuEngine::with_adapter(c.cfg.clone(), c.base.clone(), c.adapter).unwrap();
    let policy = engine.train_step(&batch, &engine_reference(&c.expected), &sigmoid(), 0.2).unwrap();
    let want = numbers(&c.expected["policy_chosen_logp"]);
    assert!(chosen(&policy).iter().zip(&want).any(|(g, w)| (g - w).abs() > 1e-3 * w.abs()));
}

/// The fixture's reference log-probs as the engine takes them.
fn engine_reference(e: &Value) -> Vec<PairLogps> {
    let (c, r) = (numbers(&e["reference_chosen_logp"]), numbers(&e["reference_rejected_logp"]));
    c.iter()
        .zip(&r)
        .map(|(&chosen, &rejected)| PairLogps { chosen, rejected, chosen_tokens: 1, rejected_tokens: 1 })
        .collect()
}

#[test]
fn a_fresh_adapter_computes_the_base_and_updates_only_itself() {
    let c = case("gqa_r4_qv");
    let refs: Vec<&PairExample> = c.pairs.iter().collect();
    let batch = PairBatch::new(&refs, Layout::Shared).unwrap();
    let base_logps = CpuEngine::new(c.cfg.clone(), c.base.clone()).unwrap().sequence_logps(&batch).unwrap();
    let lc = LoraConfig::new(4, Some(8.0), &["all-linear".into()], 0.0, false).unwrap();
    let fresh = Adapter::fresh(&c.cfg, lc, 1, c.base_dir.display().to_string());
    let mut engine = CpuEngine::with_adapter(c.cfg.clone(), c.base.clone(), fresh.clone()).unwrap();
    assert_eq!(engine.sequence_logps(&batch).unwrap(), base_logps, "B = 0: base ⊕ fresh adapter is the base");

    let reference = base_logps.clone();
    engine.train_step(&batch, &reference, &sigmoid(), 0.2).unwrap();
    let g = engine.adapter_grads().unwrap();
    // With B = 0 the gradient reaches B only; A's is B-weighted, so zero.
    for p in g.layers.iter().flatten().flatten() {
        assert!(p.a.iter().all(|&x| x == 0.0) && p.b.iter().any(|&x| x != 0.0));
    }
    let opt = sdpo::AdamWConfig::default();
    engine.optimizer_step(&opt, 1e-3).unwrap();
    assert_eq!(engine.weights().unwrap(), c.base, "the base does not move");
    let after = engine.adapter().unwrap().unwrap();
    assert_ne!(after, fresh.weights, "the adapter moves");
    assert_ne!(engine.sequence_logps(&batch).unwrap(), base_logps);
    engine.set_adapter_enabled(false).unwrap();
    assert_eq!(engine.sequence_logps(&batch).unwrap(), base_logps, "disabled: the bare base");
    assert!(engine.train_step(&batch, &reference, &sigmoid(), 0.2).is_err(), "a disabled adapter does not train");
}

#[test]
fn lora_asks_for_the_cpu_engine() {
    let c = case("gqa_r4_qv");
    let err = sdpo::engine::open_lora(sdpo::engine::Device::Cuda, c.cfg, c.base, c.adapter).err().unwrap();
    assert!(err.to_string().contains("pass --device cpu"), "{err}");
}

// --- `sdpo-run train --lora-r`, through the binary

const BIN: &str = env!("CARGO_BIN_EXE_sdpo-run");

fn sdpo_run(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn lora_training_writes_peft_steps_and_leaves_the_base_alone() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("base");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama3/policy").join(f), model.join(f)).unwrap();
    }
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let data = fixture("llama3/pairs.jsonl");
    let out = root.path().join("run");
    let train = |extra: &[&str]| {
        let mut a: Vec<&std::ffi::OsStr> =
            ["train", "--quiet", "--device", "cpu", "--model"].map(|s| s.as_ref()).to_vec();
        a.extend([model.as_os_str(), "--data".as_ref(), data.as_os_str(), "--out".as_ref(), out.as_os_str()]);
        for s in
            ["--partition", "in-order", "--steps", "2", "--batch-pairs", "2", "--lr", "1e-2", "--warmup-ratio", "0"]
        {
            a.push(s.as_ref());
        }
        a.extend(extra.iter().map(|s| s.as_ref() as &std::ffi::OsStr));
        sdpo_run(&a)
    };
    let lora = ["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,o_proj,down_proj", "--use-rslora"];
    let r = train(&lora);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before, "the base's bytes are unchanged");

    let cfg = config("llama3");
    let mut prev = None;
    for t in 1..=2 {
        let dir = out.join(format!("step-{t}"));
        let a = Adapter::load(&dir, &cfg).unwrap();
        assert_eq!(a.config.targets, vec![Module::QProj, Module::OProj, Module::DownProj]);
        assert!(a.config.use_rslora && a.config.r == 4 && a.config.alpha == 8.0);
        assert!(!dir.join("model.safetensors").exists());
        assert!(prev.as_ref() != Some(&a.weights), "step {t} trains the adapter");
        prev = Some(a.weights);
    }
    let toml = std::fs::read_to_string(out.join("run.toml")).unwrap();
    assert!(toml.contains("lora_r = 4") && toml.contains("use_rslora = true"), "{toml}");

    // The run folder is protected as a full fine-tuning run's is; a resume must keep the
    // LoRA settings; from step-1's adapter is another run.
    let again = train(&lora);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let mut other = lora.to_vec();
    other[1] = "8";
    other.push("--resume");
    let resumed = train(&other);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(!resumed.status.success() && err.contains("lora_r = 8"), "{err}");
    let alone = train(&["--lora-alpha", "8", "--overwrite"]);
    assert!(String::from_utf8_lossy(&alone.stderr).contains("--lora-alpha needs --lora-r"));
    let both = train(&["--lora-r", "4", "--adapter", "x", "--overwrite"]);
    assert!(String::from_utf8_lossy(&both.stderr).contains("--lora-r with --adapter"));
    let dropout = train(&[&lora[..], &["--lora-dropout", "0.1", "--overwrite"]].concat());
    assert!(dropout.status.success(), "{}", String::from_utf8_lossy(&dropout.stderr));
    assert_eq!(Adapter::load(&out.join("step-1"), &cfg).unwrap().config.dropout, 0.1);
    let step1 = out.join("step-1");
    let inside = train(&["--adapter", step1.to_str().unwrap(), "--overwrite", "--lora-dropout", "0"]);
    assert!(!inside.status.success(), "an input inside --out is refused");
    let sft = root.path().join("sft-adapter");
    Adapter::load(&step1, &cfg).unwrap().save(&sft).unwrap();
    let from_sft = train(&["--adapter", sft.to_str().unwrap(), "--overwrite", "--lora-dropout", "0"]);
    assert!(from_sft.status.success(), "{}", String::from_utf8_lossy(&from_sft.stderr));
    let a = Adapter::load(&out.join("step-1"), &cfg).unwrap();
    assert_eq!(a.config.targets, vec![Module::QProj, Module::OProj, Module::DownProj]);
}

#[test]
fn a_merged_model_computes_base_plus_adapter() {
    for name in ["gqa_r4_all_rslora", "tied_r8_mlp_rslora"] {
        let c = case(name);
        let refs: Vec<&PairExample> = c.pairs.iter().collect();
        let batch = PairBatch::new(&refs, Layout::Shared).unwrap();
        let mut merged = c.base.clone();
        sdpo::lora::merge_into(&c.cfg, &mut merged, &c.adapter);
        let got = CpuEngine::new(c.cfg.clone(), merged).unwrap().sequence_logps(&batch).unwrap();
        let e = &c.expected;
        check_rel(&format!("{name} merged chosen"), &chosen(&got), &numbers(&e["policy_chosen_logp"]), 1e-5);
        check_rel(&format!("{name} merged rejected"), &rejected(&got), &numbers(&e["policy_rejected_logp"]), 1e-5);
    }

    // Through the binary: a Hugging Face folder, protected as other outputs are.
    let c = case("gqa_r4_qv");
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("merged");
    let adapter = fixture("lora/gqa_r4_qv/adapter");
    let merge = |extra: &[&str]| {
        let mut a: Vec<&std::ffi::OsStr> = vec!["merge".as_ref(), "--model".as_ref(), c.base_dir.as_os_str()];
        a.extend(["--adapter".as_ref(), adapter.as_os_str(), "--out".as_ref(), out.as_os_str()]);
        a.extend(extra.iter().map(|s| s.as_ref() as &std::ffi::OsStr));
        sdpo_run(&a)
    };
    let r = merge(&[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut want = c.base.clone();
    sdpo::lora::merge_into(&c.cfg, &mut want, &c.adapter);
    assert_eq!(LlamaWeights::load(&out, &LlamaConfig::from_path(&out).unwrap()).unwrap(), want);
    let again = merge(&[]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    assert!(merge(&["--overwrite"]).status.success());

    // `eval --reference-adapter`: the merged model against base ⊕ adapter has zero margin
    // (to fp32 rounding), against the bare base not.
    let data = fixture("gqa/pairs.jsonl");
    let margin = |reference_adapter: Option<&Path>| {
        let mut a: Vec<&std::ffi::OsStr> =
            vec!["eval".as_ref(), "--json".as_ref(), "--device".as_ref(), "cpu".as_ref()];
        a.extend(["--model".as_ref(), out.as_os_str(), "--reference".as_ref(), c.base_dir.as_os_str()]);
        a.extend(["--data".as_ref(), data.as_os_str()]);
        if let Some(dir) = reference_adapter {
            a.extend(["--reference-adapter".as_ref(), dir.as_os_str()]);
        }
        let r = sdpo_run(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let v: Value = serde_json::from_slice(&r.stdout).unwrap();
        v[0]["rewards/margins"].as_f64().unwrap()
    };
    assert!(margin(Some(&adapter)).abs() < 1e-5);
    assert!(margin(None).abs() > 1e-3);
}

#[test]
fn debug_step_with_an_adapter_matches_peft() {
    for name in ["gqa_r4_qv", "gqa_r4_all_rslora"] {
        let c = case(name);
        let e = &c.expected;
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("dbg");
        let (adapter, data) = (fixture(&format!("lora/{name}/adapter")), fixture(e["pairs_file"].as_str().unwrap()));
        let mut a: Vec<&std::ffi::OsStr> = vec!["debug-step".as_ref(), "--device".as_ref(), "cpu".as_ref()];
        a.extend(["--model".as_ref(), c.base_dir.as_os_str(), "--adapter".as_ref(), adapter.as_os_str()]);
        a.extend(["--data".as_ref(), data.as_os_str(), "--out".as_ref(), out.as_os_str()]);
        if e["reference"] == "adapter" {
            a.extend(["--reference-adapter".as_ref(), adapter.as_os_str()]);
        }
        let r = sdpo_run(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let m = read_json(&out.join("metrics.json"));
        let col =
            |k: &str| -> Vec<f64> { m["pairs"].as_array().unwrap().iter().map(|p| p[k].as_f64().unwrap()).collect() };
        for k in ["policy_chosen_logp", "policy_rejected_logp", "reference_chosen_logp", "reference_rejected_logp"] {
            check_rel(&format!("{name} debug-step {k}"), &col(k), &numbers(&e[k]), 1e-5);
        }
        check_rel(
            &format!("{name} debug-step loss"),
            &[m["loss"].as_f64().unwrap()],
            &[e["loss"].as_f64().unwrap()],
            1e-5,
        );
        let got = load_tensors_f32(&out.join("grads.safetensors")).unwrap();
        let want = load_tensors_f32(&fixture(&format!("lora/{name}/grads.safetensors"))).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "PEFT's keys, nothing else");
        for (k, (shape, w)) in &want {
            let g = &got[k];
            assert_eq!(&g.0, shape);
            let num: f64 = g.1.iter().zip(w).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
            let den: f64 = w.iter().map(|y| (*y as f64).powi(2)).sum();
            assert!(num.sqrt() <= 1e-4 * den.sqrt(), "{name}: {k}");
        }
    }
}

#[test]
fn partition_scores_base_plus_adapter() {
    let c = case("gqa_r4_qv");
    let e = &c.expected;
    let (adapter, data) = (fixture("lora/gqa_r4_qv/adapter"), fixture("gqa/pairs.jsonl"));
    let mut a: Vec<&std::ffi::OsStr> = vec!["partition".as_ref(), "--device".as_ref(), "cpu".as_ref()];
    a.extend(["--model".as_ref(), c.base_dir.as_os_str(), "--adapter".as_ref(), adapter.as_os_str()]);
    a.extend(["--data".as_ref(), data.as_os_str()]);
    a.extend(["--partition", "difficulty", "--steps", "5"].map(|s| s.as_ref() as &std::ffi::OsStr));
    let r = sdpo_run(&a);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let p: Value = serde_json::from_slice(&r.stdout).unwrap();
    // One pair per chunk, easiest (largest γ of base ⊕ adapter, as PEFT computes it) first.
    let gamma: Vec<f64> =
        numbers(&e["policy_chosen_logp"]).iter().zip(numbers(&e["policy_rejected_logp"])).map(|(c, r)| c - r).collect();
    let mut order: Vec<usize> = (0..gamma.len()).collect();
    order.sort_by(|&i, &j| gamma[j].total_cmp(&gamma[i]));
    for (chunk, &i) in p["chunks"].as_array().unwrap().iter().zip(&order) {
        assert_eq!(chunk["pairs"][0].as_u64().unwrap() as usize, i);
        let g = chunk["mean_gamma"].as_f64().unwrap();
        assert!((g - gamma[i]).abs() <= 1e-5 * gamma[i].abs().max(1.0), "pair {i}: γ {g}, PEFT {}", gamma[i]);
    }
}
