//! The CPU engine against PyTorch (tests/fixtures, made by tools/make_fixtures.py): for every
//! fixture model and both batch layouts, log-probs, losses, rewards, every gradient tensor,
//! the gradient norm and the weights after one AdamW step. Also `sdpo-run debug-step` on a
//! fixture, compared with the same references.
//!
//! Tolerances (DESIGN.md's parity targets), argued:
//! - log-probs and losses: 1e-5 relative. Both sides are fp32 with different summation
//!   orders; a sum of ~15 log-softmax terms of magnitude ~5 carries ~1e-6 relative noise.
//! - rewards β·(π − ref) are differences of nearly equal log-probs, so the relative error of
//!   the inputs shows up amplified: they are compared in absolute terms, β·1e-5·(|π| + |ref|).
//! - gradients: ‖a − b‖ / ‖b‖ ≤ 1e-4 per tensor; fp32 backward through two layers with
//!   reductions in different orders is ~1e-6, so 1e-4 leaves room but catches any real bug
//!   (a wrong mask, scale or transpose is O(1)).
//! - weights after AdamW: 1e-6 absolute. At the first step AdamW moves every weight by
//!   lr·g/(|g| + eps) ≈ ±lr = 1e-3 whatever the size of g, so a relative error of the update
//!   is an absolute error of the weight of size 1e-3·(relative error); only gradients within
//!   a few orders of eps (1e-8) could change the update by more than 1e-7, and weight decay
//!   multiplies by (1 − 1e-5), exact to fp32 rounding (~3e-8 at these magnitudes). A relative
//!   tolerance would be wrong here: weights near 0 get a full ±1e-3 step. Elements whose
//!   gradient is below 1e-6 (cancellation; one in a few thousand) are ill-conditioned and
//!   only bounded, see below.

use std::path::{Path, PathBuf};

use sdpo::config::LlamaConfig;
use sdpo::data::pretokenized::read_pairs;
use sdpo::dpo::{LossConfig, LossKind, Metrics};
use sdpo::engine::cpu::CpuEngine;
use sdpo::weights::load_tensors_f32;
use sdpo::{AdamWConfig, Engine, Layout, LlamaWeights, PairBatch, PairExample, PairLogps};
use serde_json::Value;

const MODELS: [&str; 6] = ["gqa", "tied", "llama3", "odd", "pad", "eps32"];

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

struct Fixture {
    cfg: LlamaConfig,
    policy: LlamaWeights,
    reference: LlamaWeights,
    pairs: Vec<PairExample>,
    expected: Value,
}

fn load(model: &str) -> Fixture {
    let cfg = LlamaConfig::from_path(&fixture(&format!("{model}/policy"))).unwrap();
    let policy = LlamaWeights::load(&fixture(&format!("{model}/policy")), &cfg).unwrap();
    let reference = LlamaWeights::load(&fixture(&format!("{model}/reference")), &cfg).unwrap();
    let pairs = read_pairs(&fixture(&format!("{model}/pairs.jsonl")), cfg.vocab_size).unwrap();
    let expected =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{model}/expected.json"))).unwrap()).unwrap();
    Fixture { cfg, policy, reference, pairs, expected }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn assert_rel(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-30);
    assert!(err <= tol, "{what}: got {got}, want {want} (relative error {err:.2e} > {tol:.0e})");
}

fn assert_abs(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (|diff| {:.2e} > {tol:.1e})",
        (got - want).abs()
    );
}

/// ‖a − b‖ / ‖b‖ of every tensor of `w` against the file's, by HF name; returns the worst.
fn compare_tensors(what: &str, cfg: &LlamaConfig, w: &LlamaWeights, file: &Path, rel_tol: f64) -> f64 {
    let want = load_tensors_f32(file).unwrap();
    let specs = LlamaWeights::specs(cfg);
    assert_eq!(
        want.len(),
        specs.len(),
        "{what}: {} tensors in {}, model has {}",
        want.len(),
        file.display(),
        specs.len()
    );
    let mut worst: f64 = 0.0;
    for (s, got) in specs.iter().zip(w.tensors()) {
        let (shape, b) = &want[&s.name];
        assert_eq!(shape, &s.shape, "{what}: {}", s.name);
        let (mut num, mut den) = (0f64, 0f64);
        for (x, y) in got.iter().zip(b) {
            num += (*x as f64 - *y as f64).powi(2);
            den += (*y as f64).powi(2);
        }
        let rel = num.sqrt() / den.sqrt().max(1e-30);
        assert!(rel <= rel_tol, "{what}: {} relative error {rel:.2e} > {rel_tol:.0e}", s.name);
        worst = worst.max(rel);
    }
    worst
}

fn sigmoid() -> LossConfig {
    LossConfig { kind: LossKind::Sigmoid, beta: 0.1, label_smoothing: 0.0, sft_weight: 0.0 }
}

fn check_model(model: &str, layout: Layout) {
    let fx = load(model);
    let e = &fx.expected;
    let beta = f(&e["beta"]);
    let refs: Vec<&PairExample> = fx.pairs.iter().collect();
    let batch = PairBatch::new(&refs, layout).unwrap();
    let n = fx.pairs.len();

    let mut reference_engine = CpuEngine::new(fx.cfg.clone(), fx.reference.clone()).unwrap();
    let reference = reference_engine.sequence_logps(&batch).unwrap();
    let mut engine = CpuEngine::new(fx.cfg.clone(), fx.policy.clone()).unwrap();
    let policy = engine.train_step(&batch, &reference, &sigmoid(), 1.0 / n as f64).unwrap();

    let tag = format!("{model} {layout:?}");
    for (i, (p, r)) in policy.iter().zip(&reference).enumerate() {
        let x = &e["pairs"][i];
        assert_rel(&format!("{tag} pair {i} policy chosen"), p.chosen, f(&x["policy_chosen_logp"]), 1e-5);
        assert_rel(&format!("{tag} pair {i} policy rejected"), p.rejected, f(&x["policy_rejected_logp"]), 1e-5);
        assert_rel(&format!("{tag} pair {i} reference chosen"), r.chosen, f(&x["reference_chosen_logp"]), 1e-5);
        assert_rel(&format!("{tag} pair {i} reference rejected"), r.rejected, f(&x["reference_rejected_logp"]), 1e-5);
        assert_eq!(p.chosen_tokens as u64, x["chosen_tokens"].as_u64().unwrap());
        assert_eq!(p.rejected_tokens as u64, x["rejected_tokens"].as_u64().unwrap());
        let tol_c = beta * 1e-5 * (p.chosen.abs() + r.chosen.abs());
        let tol_r = beta * 1e-5 * (p.rejected.abs() + r.rejected.abs());
        assert_abs(
            &format!("{tag} pair {i} reward chosen"),
            beta * (p.chosen - r.chosen),
            f(&x["reward_chosen"]),
            tol_c,
        );
        assert_abs(
            &format!("{tag} pair {i} reward rejected"),
            beta * (p.rejected - r.rejected),
            f(&x["reward_rejected"]),
            tol_r,
        );
    }

    // Losses: the mean and every pair, for each loss TRL computed.
    for (kind, name) in [(LossKind::Sigmoid, "sigmoid"), (LossKind::Ipo, "ipo"), (LossKind::Hinge, "hinge")] {
        let cfg = LossConfig { kind, ..sigmoid() };
        let m = Metrics::from_pairs(&policy, &reference, &cfg);
        assert_rel(&format!("{tag} {name} loss"), m.loss, f(&e["losses"][name]["loss"]), 1e-5);
        for (i, (p, r)) in policy.iter().zip(&reference).enumerate() {
            let l = sdpo::dpo::pair_loss(p, r, &cfg).loss;
            assert_rel(&format!("{tag} {name} loss pair {i}"), l, f(&e["losses"][name]["per_pair"][i]), 1e-5);
        }
    }
    let m = Metrics::from_pairs(&policy, &reference, &sigmoid());
    let em = &e["metrics"];
    assert_rel(&format!("{tag} logps/chosen"), m.logps_chosen, f(&em["logps/chosen"]), 1e-5);
    assert_rel(&format!("{tag} logps/rejected"), m.logps_rejected, f(&em["logps/rejected"]), 1e-5);
    assert_abs(&format!("{tag} rewards/accuracies"), m.rewards_accuracies, f(&em["rewards/accuracies"]), 1e-12);

    // Gradients of the mean sigmoid loss.
    let grads = engine.grads().unwrap();
    let worst = compare_tensors(
        &format!("{tag} grads"),
        &fx.cfg,
        &grads,
        &fixture(&format!("{model}/grads.safetensors")),
        1e-4,
    );
    eprintln!("{tag}: worst gradient relative error {worst:.2e}");

    // One AdamW step, clipping as the fixture did.
    let a = &e["adamw"];
    let opt = AdamWConfig {
        beta1: f(&a["beta1"]),
        beta2: f(&a["beta2"]),
        eps: f(&a["eps"]),
        weight_decay: f(&a["weight_decay"]),
        max_grad_norm: a["max_grad_norm"].as_f64(),
    };
    let norm = engine.optimizer_step(&opt, f(&a["lr"])).unwrap();
    assert_rel(&format!("{tag} grad norm"), norm, f(&a["grad_norm"]), 1e-5);
    let after = engine.weights().unwrap();
    let want = load_tensors_f32(&fixture(&format!("{model}/adamw.safetensors"))).unwrap();
    let torch_grads = load_tensors_f32(&fixture(&format!("{model}/grads.safetensors"))).unwrap();
    let lr = f(&a["lr"]);
    // The gradient AdamW saw in torch: clipped as clip_grad_norm_ does.
    let clip = opt.max_grad_norm.map_or(1.0, |m| (m / (f(&a["grad_norm"]) + 1e-6)).min(1.0));
    let (mut worst, mut ill_conditioned, mut total): (f64, usize, usize) = (0.0, 0, 0);
    for (s, got) in LlamaWeights::specs(&fx.cfg).iter().zip(after.tensors()) {
        let g = &torch_grads[&s.name].1;
        for (j, (x, y)) in got.iter().zip(&want[&s.name].1).enumerate() {
            let d = (*x as f64 - *y as f64).abs();
            total += 1;
            // Where |g| is near eps the update lr·g/(|g|+eps) turns fp32 noise in g (~1e-9
            // here) into up to lr·δ/eps: below |g| = 1e-6 the step's size is rounding noise,
            // so only its bound (at most lr, plus the decay) is checked, and such elements
            // must be rare. Exact zeros (embedding rows of absent tokens) are exact on both sides.
            if g[j] != 0.0 && (g[j] as f64 * clip).abs() < 1e-6 {
                ill_conditioned += 1;
                assert!(d <= 2.0 * lr + 1e-6, "{tag} AdamW {}[{j}] (|g| < 1e-6): got {x}, want {y}", s.name);
                continue;
            }
            assert!(d <= 1e-6, "{tag} AdamW {}[{j}]: got {x}, want {y} (grad {})", s.name, g[j]);
            worst = worst.max(d);
        }
    }
    assert!(ill_conditioned * 1000 <= total, "{tag}: {ill_conditioned} of {total} gradients in (0, 1e-6)");
    eprintln!("{tag}: worst |weight − torch| after AdamW {worst:.2e} ({ill_conditioned} elements with 0 < |g| < 1e-6)");
}

#[test]
fn gqa_matches_pytorch() {
    check_model("gqa", Layout::Shared);
    check_model("gqa", Layout::Concatenated);
}

#[test]
fn tied_matches_pytorch() {
    check_model("tied", Layout::Shared);
    check_model("tied", Layout::Concatenated);
}

#[test]
fn llama3_rope_matches_pytorch() {
    check_model("llama3", Layout::Shared);
    check_model("llama3", Layout::Concatenated);
}

#[test]
fn odd_sizes_match_pytorch() {
    check_model("odd", Layout::Shared);
    check_model("odd", Layout::Concatenated);
}

/// pad_token_id = eos_token_id = 2 with tied embeddings, eos in every answer and in some
/// prompts: row 2 of the embedding gets the LM head's share of the gradient and none from
/// the lookup, as `nn.Embedding(padding_idx)` gives it.
#[test]
fn pad_token_row_matches_pytorch() {
    let fx = load("pad");
    assert_eq!((fx.cfg.pad_token_id, fx.cfg.eos_token_ids.as_slice()), (Some(2), &[2][..]));
    check_model("pad", Layout::Shared);
    check_model("pad", Layout::Concatenated);
}

/// rms_norm_eps stored as float32(0.01) written as a double: the norms use it as torch does.
#[test]
fn float32_rms_norm_eps_matches_pytorch() {
    let fx = load("eps32");
    assert_eq!(fx.cfg.rms_norm_eps, 0.01f32);
    check_model("eps32", Layout::Shared);
    check_model("eps32", Layout::Concatenated);
}

#[test]
fn fixtures_list_is_complete() {
    for m in MODELS {
        assert!(fixture(m).join("expected.json").is_file(), "{m}");
    }
}

/// The engine's log-probs of the bf16 reference are those of its rounded weights: a loader
/// check end to end (the bf16 file is torch's).
#[test]
fn bf16_reference_loads_to_rounded_weights() {
    let fx = load("tied");
    let bf = LlamaWeights::load(&fixture("tied/reference_bf16"), &fx.cfg).unwrap();
    let refs: Vec<&PairExample> = fx.pairs.iter().collect();
    let batch = PairBatch::new(&refs, Layout::Shared).unwrap();
    let lp: Vec<PairLogps> = CpuEngine::new(fx.cfg.clone(), bf).unwrap().sequence_logps(&batch).unwrap();
    // bf16 weights change log-probs by ~1e-2 relative, not more: a wrong byte order or
    // dtype would give garbage.
    for (i, p) in lp.iter().enumerate() {
        let want = f(&fx.expected["pairs"][i]["reference_chosen_logp"]);
        assert!((p.chosen - want).abs() / want.abs() < 3e-2, "pair {i}: {} vs {want}", p.chosen);
    }
}

// --- sdpo-run debug-step ------------------------------------------------------------------

fn debug_step(model: &str, layout: &str, out: &Path) -> Value {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sdpo-run"))
        .args(["debug-step", "--device", "cpu", "--layout", layout, "--beta", "0.1", "--loss", "sigmoid"])
        .arg("--model")
        .arg(fixture(&format!("{model}/policy")))
        .arg("--reference")
        .arg(fixture(&format!("{model}/reference")))
        .arg("--data")
        .arg(fixture(&format!("{model}/pairs.jsonl")))
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "sdpo-run debug-step failed on {model}");
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn debug_step_binary_matches_pytorch() {
    for (model, layout) in [("gqa", "shared"), ("odd", "concatenated")] {
        let fx = load(model);
        let dir = tempfile::tempdir().unwrap();
        let m = debug_step(model, layout, dir.path());
        let e = &fx.expected;
        let tag = format!("debug-step {model} {layout}");
        for key in ["loss", "logps/chosen", "logps/rejected"] {
            assert_rel(&format!("{tag} {key}"), f(&m[key]), f(&e["metrics"][key]), 1e-5);
        }
        assert_abs(
            &format!("{tag} accuracy"),
            f(&m["rewards/accuracies"]),
            f(&e["metrics"]["rewards/accuracies"]),
            1e-12,
        );
        assert_rel(&format!("{tag} grad_norm"), f(&m["grad_norm"]), f(&e["adamw"]["grad_norm"]), 1e-5);
        for (i, (got, want)) in m["pairs"].as_array().unwrap().iter().zip(e["pairs"].as_array().unwrap()).enumerate() {
            for key in
                ["policy_chosen_logp", "policy_rejected_logp", "reference_chosen_logp", "reference_rejected_logp"]
            {
                assert_rel(&format!("{tag} pair {i} {key}"), f(&got[key]), f(&want[key]), 1e-5);
            }
            // rewards: absolute, as in check_model
            let tol = 0.1 * 1e-5 * (f(&want["policy_chosen_logp"]).abs() + f(&want["reference_chosen_logp"]).abs());
            assert_abs(
                &format!("{tag} pair {i} reward_chosen"),
                f(&got["reward_chosen"]),
                f(&want["reward_chosen"]),
                tol,
            );
        }
        // grads.safetensors holds every parameter under its HF name, fp32.
        let grads = load_tensors_f32(&dir.path().join("grads.safetensors")).unwrap();
        let mut w = LlamaWeights::zeros(&fx.cfg);
        for (s, t) in LlamaWeights::specs(&fx.cfg).iter().zip(w.tensors_mut()) {
            let (shape, data) = &grads[&s.name];
            assert_eq!(shape, &s.shape);
            t.copy_from_slice(data);
        }
        assert_eq!(grads.len(), LlamaWeights::specs(&fx.cfg).len());
        compare_tensors(&tag, &fx.cfg, &w, &fixture(&format!("{model}/grads.safetensors")), 1e-4);
    }
}

#[test]
fn debug_step_reports_bad_data_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt_ids\": [1], \"chosen_ids\": [2], \"rejected_ids\": [3]}\n{\"prompt_ids\": [1], \"chosen_ids\": [500], \"rejected_ids\": [3]}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdpo-run"))
        .args(["debug-step", "--device", "cpu"])
        .arg("--model")
        .arg(fixture("tied/policy"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("out"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2:") && err.contains("vocab_size 96"), "{err}");
    assert!(!dir.path().join("out").exists(), "nothing is written when the input is bad");
}
