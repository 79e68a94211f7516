//! The checks of tests/kernel_checks on the kernel simulator (src/engine/cuda/sim.rs): the
//! kernels' own source, compiled for the CPU by the system C++ compiler, run thread by
//! thread — every kernel against its CPU op, and whole CudaEngine steps against the
//! CpuEngine; then what is particular to the engine without a device (refusals, the
//! profiler's wall-clock sections). Runs in CI, where there is no GPU. Every kernel check
//! runs twice, with the warps of each block run in forward and in reverse order, each as
//! far as it can go before the next: a read of shared memory that no barrier orders after
//! the write it needs sees stale data in one of the two orders and fails its check
//! (removing any of the attention kernels' necessary barriers fails `attention`).
//!
//! What this cannot show (tests/gpu.rs on a device does): speed, the device's fast-math
//! and tensor-core rounding, and races between blocks (blocks run one at a time here).
#![cfg(feature = "cuda")]

mod kernel_checks;

use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;

use sdpo::config::LlamaConfig;
use sdpo::engine::cuda::model::CudaEngine;
use sdpo::engine::cuda::sim::KernelSim;
use sdpo::engine::cuda::Gpu;
use sdpo::LlamaWeights;

fn sim() -> &'static KernelSim {
    static SIM: OnceLock<KernelSim> = OnceLock::new();
    SIM.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-sim");
        KernelSim::build(&dir).unwrap_or_else(|e| panic!("building the kernel simulator: {e}"))
    })
}

/// Runs `check` on the simulator in both thread orders.
fn both_orders(check: impl Fn(&Gpu)) {
    for s in [sim().clone(), sim().reversed()] {
        check(&Gpu::sim(s));
    }
}

fn engine_on(s: &KernelSim) -> impl Fn(LlamaConfig, LlamaWeights) -> CudaEngine + '_ {
    move |cfg, w| CudaEngine::with_gpu(cfg, w, Gpu::sim(s.clone())).unwrap()
}

#[test]
fn embedding_matches_cpu() {
    both_orders(kernel_checks::embedding);
}

#[test]
fn rmsnorm_matches_cpu() {
    both_orders(kernel_checks::rmsnorm);
}

#[test]
fn rope_matches_cpu() {
    both_orders(kernel_checks::rope);
}

#[test]
fn attention_matches_cpu() {
    both_orders(kernel_checks::attention);
}

#[test]
fn swiglu_matches_cpu() {
    both_orders(kernel_checks::swiglu);
}

#[test]
fn logprobs_matches_cpu() {
    both_orders(kernel_checks::logprobs);
}

#[test]
fn adamw_matches_cpu() {
    both_orders(kernel_checks::adamw);
}

#[test]
fn grad_norm_matches_cpu() {
    both_orders(kernel_checks::grad_norm);
}

#[test]
fn casts_matches_cpu() {
    both_orders(kernel_checks::casts);
}

// --- the simulator's ldmatrix and cp.async, pinned by kernels/sim/selftest.cu

/// Launches one of the simulator's self-test kernels on a single warp; the error text on
/// failure.
fn selftest(s: &KernelSim, name: &str, smem: u32, args: &[u64]) -> Result<(), String> {
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: smem };
    // SAFETY: every pointer argument addresses a live host buffer of the extent the kernel
    // reads or writes (32 rows of the sizes below); the argument kinds match its declaration.
    unsafe { s.launch(name, &cfg, args) }.map_err(|e| e.to_string())
}

/// ldmatrix against the PTX ISA's layout, written out here rather than taken from
/// cuda_sim.cpp: lane l receives, of matrix j (rows 8j..8j+7 of a 32×8 tile whose row r
/// lane r addressed), elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) in the low and high
/// half of register j, or with .trans (2(l%4), l/4) and (2(l%4)+1, l/4). A row address
/// off 16-byte alignment and lanes at different ldmatrix variants are errors.
#[test]
fn simulator_ldmatrix_has_the_ptx_fragment_layout() {
    let m: Vec<u16> = (1..=256).collect(); // distinct bit patterns: element (r, c) = 8r + c + 1
    let at = |r: usize, c: usize| m[8 * r + c] as u32;
    let run = |variant: i32, skew: i32| -> Result<Vec<u32>, String> {
        let mut out = vec![0u32; 128];
        let args = [out.as_mut_ptr() as u64, m.as_ptr() as u64, variant as u32 as u64, skew as u32 as u64];
        selftest(sim(), "sim_selftest_ldmatrix", 32 * 16 * 2, &args).map(|()| out)
    };
    for (variant, trans, num) in [(0, false, 4), (1, true, 4), (2, true, 2)] {
        let out = run(variant, 0).unwrap();
        for l in 0..32 {
            for j in 0..num {
                let (lo, hi) = if trans {
                    (at(8 * j + 2 * (l % 4), l / 4), at(8 * j + 2 * (l % 4) + 1, l / 4))
                } else {
                    (at(8 * j + l / 4, 2 * (l % 4)), at(8 * j + l / 4, 2 * (l % 4) + 1))
                };
                assert_eq!(out[4 * l + j], lo | hi << 16, "variant {variant}, lane {l}, register {j}");
            }
        }
    }
    let err = run(0, 4).unwrap_err(); // every row 8 bytes past a 16-byte boundary
    assert!(err.contains("ldmatrix row address not 16-byte aligned"), "{err}");
    let err = run(3, 0).unwrap_err(); // even lanes x4, odd lanes x4.trans
    assert!(err.contains("different collectives"), "{err}");
}

/// cp.async: 16-byte copies, zero-filled past `n_valid`, land when a wait_group retires
/// their group and are visible to other threads after the barrier that follows; a read
/// of a copy still in flight sees the poison (NaN); exiting with copies pending and a
/// misaligned destination are errors.
#[test]
fn simulator_cp_async_lands_only_when_waited_for() {
    let src: Vec<f32> = (0..128).map(|i| i as f32 + 0.5).collect();
    let n_valid = 20;
    let run = |s: &KernelSim, mode: i32| -> Result<Vec<f32>, String> {
        let mut out = vec![0f32; 128];
        let args = [out.as_mut_ptr() as u64, src.as_ptr() as u64, n_valid as u64, mode as u32 as u64];
        selftest(s, "sim_selftest_cp_async", 32 * 16, &args).map(|()| out)
    };
    // Thread t reads row 31 − t, which thread 31 − t copied.
    let row = |out: &[f32], t: usize| out[4 * t..4 * t + 4].to_vec();
    let want = |t: usize| {
        let r = 31 - t;
        if r < n_valid {
            src[4 * r..4 * r + 4].to_vec()
        } else {
            vec![0.0; 4]
        }
    };
    for s in [sim().clone(), sim().reversed()] {
        let out = run(&s, 0).unwrap();
        (0..32).for_each(|t| assert_eq!(row(&out, t), want(t), "thread {t}"));
    }
    // Only the first group (rows 0..15) waited for; thread t reads its own row t.
    for s in [sim().clone(), sim().reversed()] {
        let out = run(&s, 1).unwrap();
        for t in 0..32 {
            if t < 16 {
                assert_eq!(row(&out, t), src[4 * t..4 * t + 4], "thread {t}");
            } else {
                assert!(
                    row(&out, t).iter().all(|x| x.is_nan()),
                    "thread {t} read its copy in flight: {:?}",
                    row(&out, t)
                );
            }
        }
    }
    let err = run(sim(), 2).unwrap_err();
    assert!(err.contains("exited with cp.async copies never retired"), "{err}");
    let err = run(sim(), 3).unwrap_err();
    assert!(err.contains("cp.async of 16 bytes with an address not 16-byte aligned"), "{err}");
}

// The engine checks compose kernels already checked in both orders: forward order only.

#[test]
fn engine_matches_cpu_engine_on_random_models() {
    kernel_checks::engine_on_random_models(&engine_on(sim()));
}

#[test]
fn engine_matches_cpu_engine_on_fixtures() {
    kernel_checks::engine_on_fixtures(&engine_on(sim()));
}

/// Two sDPO steps of the demo on both engines; forward thread order only (the run takes
/// about 10 s on the simulator, the engine checks above already run both orders).
#[test]
fn sdpo_demo_two_steps_matches_cpu_engine() {
    kernel_checks::sdpo_demo_two_steps(&engine_on(sim()));
}

#[test]
fn cuda_engine_refuses_models_its_kernels_do_not_cover() {
    // The fixtures with head_dim 8 and intermediate 52: refused with the reason, never
    // computed wrong.
    for model in ["gqa", "tied", "odd"] {
        let dir = kernel_checks::fixture(&format!("{model}/policy"));
        let cfg = LlamaConfig::from_path(&dir).unwrap();
        let w = LlamaWeights::load(&dir, &cfg).unwrap();
        let why = sdpo::engine::cuda::model::unsupported(&cfg).expect("a model the kernels do not cover");
        let err = CudaEngine::with_gpu(cfg, w, Gpu::sim(sim().clone())).err().expect("refused");
        println!("fixture {model}: {err}");
        assert!(err.to_string().contains(&why), "{err}");
    }
}

/// Profiling on the simulator (wall-clock sections; on a GPU the same sections are timed
/// by CUDA events): a training step charges time to every category, the sections never
/// overlap, so their sum is at most the step's wall time; a forward pass alone charges
/// nothing to the optimiser; `take_profile` restarts from zero; off, it is `None`.
#[test]
fn cuda_engine_profiles_a_step_by_category() {
    use sdpo::dpo::LossConfig;
    use sdpo::engine::profile::Category;
    use sdpo::{AdamWConfig, Engine};
    use std::time::Instant;

    let cfg = small_config(2, true);
    let w = LlamaWeights::random(&cfg, 3);
    let batch = small_batch(3, 7);
    let mut eng = CudaEngine::with_gpu(cfg, w, Gpu::sim(sim().clone())).unwrap();
    assert_eq!(eng.take_profile(), None, "profiling is off by default");
    let reference = eng.sequence_logps(&batch).unwrap();
    let loss = LossConfig::default();

    assert!(eng.set_profiling(true));
    let t = Instant::now();
    eng.train_step(&batch, &reference, &loss, 1.0).unwrap();
    eng.optimizer_step(&AdamWConfig::default(), 1e-3).unwrap();
    let wall = t.elapsed().as_secs_f64();
    let p = eng.take_profile().expect("profiling is on");
    println!("step {wall:.4} s, profile {p:?}");
    for c in Category::ALL {
        assert!(p.get(c) > 0.0, "{}: no time charged ({p:?})", c.name());
    }
    assert!(p.total_s() <= wall, "sections sum to {} s, more than the step's {wall} s", p.total_s());

    let p = eng.take_profile().unwrap();
    assert_eq!(p.total_s(), 0.0, "take_profile must restart from zero: {p:?}");
    eng.sequence_logps(&batch).unwrap();
    let p = eng.take_profile().unwrap();
    assert_eq!(p.optimizer_s, 0.0, "a forward pass has no optimiser time: {p:?}");
    assert!(p.attention_s > 0.0 && p.gemm_s > 0.0 && p.lm_head_logprobs_s > 0.0, "{p:?}");

    eng.set_profiling(false);
    eng.train_step(&batch, &reference, &loss, 1.0).unwrap();
    assert_eq!(eng.take_profile(), None, "profiling was turned off");
}

/// `memory_plan` is what the engine allocates: after a reference pass (forward only) and
/// after a training step and an optimizer step on the simulator, the bytes requested
/// through `Gpu::alloc` against the plan, which leaves out only the gradient-norm partials
/// (f64 per block, and the sum) and each batch's log-prob output (2 f32 per head row, one
/// per forward). Twice: with the backward's buffers larger than the softmax (vocabulary
/// 203) and smaller (8000, as at Llama sizes), which sizes `Shared` either way.
#[test]
fn cuda_engine_allocates_its_memory_plan() {
    use sdpo::data::LogpPlan;
    use sdpo::dpo::LossConfig;
    use sdpo::engine::cuda::model::memory_plan;
    use sdpo::{AdamWConfig, Engine};

    // An untied LM head; 68 tokens: not a whole number of 64-token activation blocks.
    let batch = small_batch(4, 5);
    let (tokens, rows) = (batch.n_tokens(), LogpPlan::new(&batch.targets).rows.len());
    let small = (Gpu::sim(sim().clone()).k.grad_norm_blocks() + 1) as u64 * 8;
    let per_batch = rows as u64 * 8;
    for (vocab, softmax_larger) in [(203, false), (8000, true)] {
        let mut cfg = small_config(3, false);
        cfg.vocab_size = vocab;
        let mut eng =
            CudaEngine::with_gpu(cfg.clone(), LlamaWeights::random(&cfg, 5), Gpu::sim(sim().clone())).unwrap();
        let reference = eng.sequence_logps(&batch).unwrap();
        let plan = memory_plan(&cfg, tokens, rows, false);
        println!("vocabulary {vocab}, {tokens} tokens, {rows} head rows; forward only: {plan:?}");
        assert_eq!(eng.allocated_bytes(), plan.total() + small + per_batch, "forward-only allocations vs {plan:?}");
        let (forward, forward_weights) = (plan.total(), plan.weights);
        assert_eq!(2 * forward_weights, memory_plan(&cfg, tokens, rows, true).weights, "bf16 copy vs fp32 master");
        eng.train_step(&batch, &reference, &LossConfig::default(), 1.0).unwrap();
        eng.optimizer_step(&AdamWConfig::default(), 1e-3).unwrap();
        let plan = memory_plan(&cfg, tokens, rows, true);
        println!("training: {plan:?}");
        let softmax = (rows * vocab * 2) as u64;
        assert_eq!(plan.softmax_or_backward == softmax, softmax_larger, "{plan:?}");
        // Training allocates everything but the weights' bf16 copy and the LM head again:
        // the forward-only pass held the copy alone (2 bytes per parameter, the remainder
        // comes with training), one layer's activations and no backward buffers (the
        // counter keeps the bytes of buffers since freed).
        let trained = forward + plan.total() - forward_weights - plan.head;
        assert_eq!(eng.allocated_bytes(), trained + small + 2 * per_batch, "training allocations vs {plan:?}");
    }
}

#[test]
fn cuda_engine_forward_only_holds_bf16_weights_and_trains_as_trainable() {
    kernel_checks::forward_only_engine_trains_as_a_trainable_one(&engine_on(sim()));
}

/// A model of hidden 64 (4 heads of 16, 2 KV heads, vocabulary 203) for the engine tests.
fn small_config(layers: usize, tied: bool) -> LlamaConfig {
    LlamaConfig::from_json(serde_json::json!({"hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 203, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied}))
    .unwrap()
}

/// `n` pairs of prompts from `prompt` tokens up, shared layout.
fn small_batch(n: u32, prompt: u32) -> sdpo::PairBatch {
    let ps: Vec<sdpo::PairExample> = (0..n)
        .map(|i| sdpo::PairExample {
            prompt: (0..prompt + i).collect(),
            chosen: (10..15 + i).collect(),
            rejected: (20..24).collect(),
            source: String::new(),
        })
        .collect();
    let refs: Vec<&sdpo::PairExample> = ps.iter().collect();
    sdpo::PairBatch::new(&refs, sdpo::Layout::Shared).unwrap()
}
