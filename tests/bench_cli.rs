//! `sdpo-run bench` end to end on the CPU: one JSON line with the documented keys and sane
//! values. No timing is asserted (the machine is shared); only signs, ranges and the
//! relations between the numbers that hold whatever the speed.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sdpo-run")).arg("bench").args(args).output().expect("runs sdpo-run")
}

/// The keys tools/compare_torch.py prints too (its header documents them).
const COMMON_KEYS: &[&str] = &[
    "tool",
    "shape",
    "device",
    "dtype",
    "micro_batch_tokens",
    "prompt_len",
    "answer_len",
    "pairs_per_step",
    "tokens_per_step",
    "steps",
    "warmup",
    "train_step_s",
    "train_tokens_per_s",
    "train_pairs_per_s",
    "ref_step_s",
    "ref_tokens_per_s",
    "dpo_pairs_per_s",
    "train_flops_per_step",
    "ref_flops_per_step",
    "train_tflops",
    "ref_tflops",
    "ceiling_tflops",
    "mfu",
    "datasheet_tflops",
    "mfu_datasheet",
    "peak_mem_bytes",
];

#[test]
fn tiny_on_cpu_prints_one_json_line() {
    let out = bench(&[
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--micro-batch-tokens",
        "1000",
        "--prompt-len",
        "100",
        "--answer-len",
        "60",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sdpo-run bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be exactly one JSON line: {stdout}");
    let j: Value = serde_json::from_str(lines[0]).expect("valid JSON");
    for k in COMMON_KEYS.iter().chain(&["split", "layout", "threads", "commit"]) {
        assert!(j.get(k).is_some(), "missing key `{k}` in {j}");
    }
    let num = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("`{k}` is not a number: {j}"));
    assert_eq!(j["tool"], "sdpo-run");
    assert_eq!(j["shape"], "tiny");
    assert_eq!(j["dtype"], "fp32");
    assert!(j["device"].as_str().unwrap().starts_with("cpu"));
    // 1000 tokens hold 4 pairs of 100 + 2·60 = 220 tokens (880).
    assert_eq!((num("pairs_per_step"), num("tokens_per_step")), (4.0, 880.0));
    for k in ["train_tokens_per_s", "train_pairs_per_s", "ref_tokens_per_s", "dpo_pairs_per_s", "ceiling_tflops"] {
        assert!(num(k).is_finite() && num(k) > 0.0, "`{k}` must be positive: {j}");
    }
    let mfu = num("mfu");
    // Not `<= 1`: the ceiling is timed in the same run, and a burst of load from other
    // tests during those GEMMs can push a true MFU of ~0.6 past 1. A FLOP-count blunder
    // (a missing or extra factor of the layer count or vocabulary) lands far outside (0, 3].
    assert!(mfu > 0.0 && mfu <= 3.0, "MFU must be in (0, 3]: {mfu}");
    // The relations between the numbers.
    let rel = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(rel(num("train_tokens_per_s"), 880.0 / num("train_step_s")));
    assert!(rel(num("train_flops_per_step"), 3.0 * num("ref_flops_per_step")));
    assert!(rel(num("mfu"), num("train_tflops") / num("ceiling_tflops")));
    assert!(j["datasheet_tflops"].is_null() && j["mfu_datasheet"].is_null(), "no datasheet peak for a CPU");
    assert!(num("peak_mem_bytes") > 1e6, "peak RSS of a process that built a model: {j}");
    // The split covers the step: every part non-negative, and the parts add up to at
    // least the step's time (other_s is the remainder, clamped at 0).
    let split = j["split"].as_object().expect("the CPU engine profiles");
    let parts: Vec<f64> = split.values().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(parts.len(), 6);
    assert!(parts.iter().all(|&p| p >= 0.0));
    assert!(parts.iter().sum::<f64>() >= num("train_step_s") * (1.0 - 1e-9));
    assert!(split["gemm_s"].as_f64().unwrap() > 0.0 && split["attention_s"].as_f64().unwrap() > 0.0);
    assert!(stderr.contains("MFU"), "the table goes to stderr: {stderr}");
}

#[test]
fn big_shapes_are_refused_on_cpu() {
    let out = bench(&["--shape", "llama-8b", "--device", "cpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--force") && stderr.contains("llama-8b"), "{stderr}");
}

#[test]
fn a_pair_must_fit_the_micro_batch() {
    let out = bench(&["--shape", "tiny", "--device", "cpu", "--micro-batch-tokens", "100", "--prompt-len", "64"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--micro-batch-tokens 100"), "{stderr}");
}

/// The concatenated layout does more work for the same pairs, but the task (and so the
/// FLOPs that MFU divides by, and the token count) is the same as in the shared layout.
#[test]
fn both_layouts_count_the_same_task() {
    let run = |layout: &str| -> Value {
        let out = bench(&[
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--micro-batch-tokens",
            "200",
            "--prompt-len",
            "40",
            "--answer-len",
            "30",
            "--layout",
            layout,
            "--ceiling-gemm",
            "256",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("one JSON line")
    };
    let (shared, concat) = (run("shared"), run("concatenated"));
    assert_eq!(shared["layout"], "shared");
    assert_eq!(concat["layout"], "concatenated");
    for k in ["pairs_per_step", "tokens_per_step", "train_flops_per_step", "ref_flops_per_step"] {
        assert_eq!(shared[k], concat[k], "`{k}` differs between layouts");
    }
    assert_eq!(shared["tokens_per_step"], 200);
}

// --- `sdpo-run bench --attention`

/// The keys `tools/compare_torch.py --attention` prints too.
const ATTENTION_KEYS: &[&str] = &[
    "kind",
    "tool",
    "device",
    "dtype",
    "causal",
    "B",
    "S",
    "H",
    "Hkv",
    "D",
    "steps",
    "warmup",
    "fwd_ms",
    "bwd_ms",
    "fwd_bwd_ms",
    "flops_fwd",
    "flops_bwd",
    "flops_fwd_bwd",
    "tflops_fwd",
    "tflops_bwd",
    "tflops_fwd_bwd",
    "check_rel_err",
];

#[test]
fn attention_on_cpu_prints_one_json_line() {
    let out = bench(&[
        "--attention",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq-len",
        "96",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "32",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sdpo-run bench --attention failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be exactly one JSON line: {stdout}");
    let j: Value = serde_json::from_str(lines[0]).expect("valid JSON");
    for k in ATTENTION_KEYS.iter().chain(&["threads", "commit"]) {
        assert!(j.get(k).is_some(), "missing key `{k}` in {j}");
    }
    let num = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("`{k}` is not a number: {j}"));
    assert_eq!(
        (j["kind"].as_str(), j["tool"].as_str(), j["dtype"].as_str()),
        (Some("attention"), Some("sdpo-run"), Some("fp32"))
    );
    assert_eq!([num("B"), num("S"), num("H"), num("Hkv"), num("D")], [2.0, 96.0, 4.0, 2.0, 32.0]);
    for k in ["fwd_ms", "bwd_ms", "fwd_bwd_ms", "tflops_fwd", "tflops_bwd", "tflops_fwd_bwd"] {
        assert!(num(k).is_finite() && num(k) > 0.0, "`{k}` must be positive: {j}");
    }
    // Causal FLOPs: 4·D·H per attended pair, B·S(S+1)/2 = 2·96·97/2 = 9312 pairs per head;
    // backward 2.5× forward.
    let fwd = 4.0 * 32.0 * 4.0 * 9312.0;
    assert_eq!((num("flops_fwd"), num("flops_bwd"), num("flops_fwd_bwd")), (fwd, 2.5 * fwd, 3.5 * fwd));
    let rel = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(rel(num("tflops_fwd"), fwd / (num("fwd_ms") * 1e-3) / 1e12), "{j}");
    assert!(rel(num("tflops_fwd_bwd"), 3.5 * fwd / (num("fwd_bwd_ms") * 1e-3) / 1e12), "{j}");
    // fp32 against the f64 definition (src/bench.rs `attention_check`).
    assert!(num("check_rel_err") < 1e-4, "{j}");
    assert!(stderr.contains("forward + backward"), "the table goes to stderr: {stderr}");
}

#[test]
fn attention_refuses_bad_sizes() {
    let fails_with = |args: &[&str], want: &str| {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail: {stderr}");
        assert!(stderr.contains(want), "{args:?}: expected `{want}` in: {stderr}");
    };
    fails_with(&["--attention", "--device", "cpu", "--seq-len", "0"], "--seq-len must be at least 1");
    fails_with(
        &["--attention", "--device", "cpu", "--heads", "3", "--kv-heads", "2"],
        "not a multiple of --kv-heads 2",
    );
    // Checked before looking for a GPU, so it fails the same with or without one.
    #[cfg(feature = "cuda")]
    fails_with(&["--attention", "--device", "cuda", "--head-dim", "96"], "--head-dim 96 on CUDA");
    // The attention sizes mean nothing to the training benchmark.
    fails_with(&["--seq-len", "128"], "--attention");
    fails_with(&["--attention", "--shape", "tiny"], "--shape");
}

#[test]
fn attention_on_cuda_without_a_gpu_fails_fast() {
    if sdpo::bench::gpu_present() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let t0 = std::time::Instant::now();
    let out = bench(&["--attention", "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no CUDA GPU"), "{stderr}");
    // Before filling 4 × 33M random inputs (seconds): the check comes first.
    assert!(t0.elapsed().as_secs_f64() < 5.0, "took {:?}", t0.elapsed());
}

/// The CUDA path of `bench --attention` (buffers, strides, the causal mask on the device,
/// the output check) on the kernel simulator: the kernels' own code run on the CPU. Its
/// times mean nothing; its output check must pass.
#[cfg(feature = "cuda")]
#[test]
fn attention_cuda_path_on_the_kernel_simulator() {
    use sdpo::bench::{attention_cuda, AttentionSizes};
    use sdpo::engine::cuda::sim::KernelSim;
    use sdpo::engine::cuda::Gpu;
    // A directory of its own: tests/kernel_sim.rs may be building the same library at once.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-kernel-sim");
    let sim = KernelSim::build(&dir).unwrap_or_else(|e| panic!("building the kernel simulator: {e}"));
    // Two sequences of 80 (over one 64-row tile), 4 query heads on 2 kv heads.
    let z = AttentionSizes { batch: 2, seq_len: 80, heads: 4, kv_heads: 2, head_dim: 32 };
    let t = attention_cuda(&Gpu::sim(sim), &z, 1, 0, 1).unwrap();
    eprintln!("kernel simulator: {t:?}");
    assert!(t.check_rel_err < 2e-2, "{t:?}");
    assert!(t.fwd_s > 0.0 && t.bwd_s > 0.0 && t.fwd_bwd_s > 0.0, "{t:?}");
}
