//! LoRA: the PEFT adapter folder (read, written, refused), PEFT's initialisation, and the
//! CPU engine with an adapter against PEFT + TRL (tests/fixtures/lora, made by
//! tools/make_lora_fixtures.py).
//!
//! Tolerances, argued as in tests/parity.rs: log-probs and the loss 1e-5 relative (fp32 on
//! both sides, sums in different orders carry ~1e-6); adapter gradients ‖a − b‖ / ‖b‖ ≤ 1e-4
//! per tensor (a wrong scale, transpose or missing path is O(1)).

use std::path::{Path, PathBuf};

use sdpo::config::LlamaConfig;
use sdpo::lora::{Adapter, LoraConfig, LoraWeights, Module, CONFIG_FILE, WEIGHTS_FILE};
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
    let cases: Vec<(&str, Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>)> = vec![
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
