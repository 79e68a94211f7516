//! GPU parity tests: the checks of tests/kernel_checks (every CUDA kernel against its CPU
//! op, a whole CudaEngine step against the CpuEngine) on a real device, then the device's
//! ceilings and kernel timings. All are `#[ignore]`d: run them on a GPU host with
//! `--ignored` (tools/gpu-check.sh does). Asked to run without a GPU they fail, saying
//! why, rather than pass. The same checks run in CI on the kernel simulator
//! (tests/kernel_sim.rs); what only a device shows is speed and the device's own
//! arithmetic (fast exp, tensor-core accumulation order, concurrent atomics).
#![cfg(feature = "cuda")]

mod kernel_checks;

use kernel_checks::randn;
use sdpo::config::LlamaConfig;
use sdpo::data::{Layout, PairBatch, PairExample};
use sdpo::engine::cuda::gemm::GemmShape;
use sdpo::engine::cuda::kernels::{AttnDims, AttnMaskDev, Bf16};
use sdpo::engine::cuda::model::CudaEngine;
use sdpo::engine::cuda::{to_bf16, Gpu};
use sdpo::weights::SplitMix64;
use sdpo::LlamaWeights;

fn gpu() -> Gpu {
    match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => panic!("this test needs a CUDA GPU and could not get one: {e}"),
    }
}

fn open_engine(cfg: LlamaConfig, w: LlamaWeights) -> CudaEngine {
    match CudaEngine::new(cfg, w, 0) {
        Ok(e) => e,
        Err(e) => panic!("this test needs a CUDA GPU and could not get one: {e}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu() {
    kernel_checks::attention(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_matches_cpu() {
    kernel_checks::rmsnorm(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_matches_cpu() {
    kernel_checks::rope(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logprobs_matches_cpu() {
    kernel_checks::logprobs(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_matches_cpu() {
    kernel_checks::adamw(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grad_norm_matches_cpu() {
    kernel_checks::grad_norm(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_matches_cpu() {
    kernel_checks::elementwise(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_matches_cpu_linear() {
    kernel_checks::gemm(&mut gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_matches_cpu_engine_on_random_models() {
    kernel_checks::engine_on_random_models(&open_engine);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_matches_cpu_engine_on_fixtures() {
    kernel_checks::engine_on_fixtures(&open_engine);
}

// --- ceilings (measured, not asserted): what tools/gpu-check.sh reports first

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_ceilings() {
    let mut g = gpu();
    // Device-to-device copy of 2 GiB: bandwidth = 2·bytes / time (read + write).
    let bytes = 2usize << 30;
    let a = g.alloc::<u8>(bytes).unwrap();
    let b = g.alloc::<u8>(bytes).unwrap();
    let (pa, pb) = (g.ptr(&a), g.ptr(&b));
    let copy = |g: &Gpu| g.copy(pb, pa, bytes).unwrap();
    copy(&g);
    g.sync().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..10 {
        copy(&g);
    }
    g.sync().unwrap();
    let copy_gbs = 2.0 * bytes as f64 * 10.0 / t.elapsed().as_secs_f64() / 1e9;
    drop((a, b));

    // bf16 GEMM 8192³ with fp32 accumulation, bf16 out.
    let s = 8192usize;
    let x = g.alloc::<Bf16>(s * s).unwrap();
    let y = g.alloc::<Bf16>(s * s).unwrap();
    let (px, py) = (g.ptr(&x), g.ptr(&y));
    let shape = GemmShape::new(s, s, s, false, true);
    g.gemm.gemm_bf16(py, px, px, &shape, 1.0, 0.0).unwrap();
    g.sync().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        g.gemm.gemm_bf16(py, px, px, &shape, 1.0, 0.0).unwrap();
    }
    g.sync().unwrap();
    let tflops = 2.0 * (s * s * s) as f64 * 20.0 / t.elapsed().as_secs_f64() / 1e12;
    println!("CEILING device={} copy_GBps={copy_gbs:.0} bf16_gemm_TFLOPs={tflops:.0}", g.name);
    assert!(copy_gbs > 0.0 && tflops > 0.0);
}

// --- kernel timings (printed, not asserted): tools/gpu-check.sh collects the BENCH lines

/// Mean seconds per call of `f` over `iters` calls after one warm-up call.
fn time_it(g: &Gpu, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    g.sync().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    g.sync().unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}

fn report_bytes(name: &str, secs: f64, bytes: f64) {
    println!("BENCH {name:<34} {:>9.1} us {:>8.0} GB/s", secs * 1e6, bytes / secs / 1e9);
}

fn report_flops(name: &str, secs: f64, flops: f64) {
    println!("BENCH {name:<34} {:>9.1} us {:>8.1} TFLOP/s", secs * 1e6, flops / secs / 1e12);
}

/// Every kernel on the shapes of one Llama 3 8B layer (hidden 4096, intermediate 14336,
/// 32 / 8 heads of 128, vocabulary 128256) over a micro-batch of 8 pairs of prompt 256 and
/// answers 128 + 128 in the shared layout (4096 tokens), the LM head on 256 rows, AdamW
/// and the gradient norm on 100M parameters. Bytes are the least each call must move
/// (each kernel's top comment); attention FLOPs count the visible (query, key) pairs only.
#[test]
#[ignore = "needs a CUDA GPU"]
fn kernel_timings() {
    let g = gpu();
    let (h, i, nh, nkv, hd, vocab) = (4096usize, 14336usize, 32usize, 8usize, 128usize, 128256usize);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let pairs: Vec<PairExample> = (0..8)
        .map(|p| PairExample {
            prompt: vec![p; 256],
            chosen: vec![1; 128],
            rejected: vec![2; 128],
            source: String::new(),
        })
        .collect();
    let refs: Vec<&PairExample> = pairs.iter().collect();
    let batch = PairBatch::new(&refs, Layout::Shared).unwrap();
    let n = batch.n_tokens();
    let iters = 10;
    let mut rng = SplitMix64(1);

    // attention
    let qkv = g.upload(&to_bf16(&randn(&mut rng, n * (qd + 2 * kvd), 1.0))).unwrap();
    let qkvp = g.ptr(&qkv);
    let (q, k, v) = (qkvp, qkvp.slice(qd, qkvp.len - qd).unwrap(), qkvp.slice(qd + kvd, qkvp.len - qd - kvd).unwrap());
    let group_d = g.upload(&batch.group).unwrap();
    let branch_d = g.upload(&batch.branch).unwrap();
    let gs_d = g.upload(&batch.group_start).unwrap();
    let m = AttnMaskDev { group: g.ptr(&group_d), branch: g.ptr(&branch_d), group_start: g.ptr(&gs_d) };
    let d = AttnDims {
        n_tokens: n,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        q_stride: qd + 2 * kvd,
        kv_stride: qd + 2 * kvd,
        o_stride: qd,
    };
    let visible: usize = (0..batch.n_groups())
        .map(|gi| {
            let (a, b) = (batch.group_start[gi] as usize, batch.group_start[gi + 1] as usize);
            (a..b).map(|qq| (a..=qq).filter(|&kk| batch.attends(qq, kk)).count()).sum::<usize>()
        })
        .sum();
    let o = g.alloc::<Bf16>(n * qd).unwrap();
    let lse = g.alloc::<f32>(n * nh).unwrap();
    let t = time_it(&g, iters, || g.k.attention_forward(g.ptr(&o), g.ptr(&lse), q, k, v, &m, &d).unwrap());
    report_flops("attention_forward (8B layer)", t, 4.0 * (visible * nh * hd) as f64);
    let dout = g.upload(&to_bf16(&randn(&mut rng, n * qd, 1.0))).unwrap();
    let delta = g.alloc::<f32>(n * nh).unwrap();
    let dqkv = g.alloc::<f32>(n * (qd + 2 * kvd)).unwrap();
    let dp = g.ptr(&dqkv);
    let (dk, dv) = (dp.slice(qd, dp.len - qd).unwrap(), dp.slice(qd + kvd, dp.len - qd - kvd).unwrap());
    let s = qd + 2 * kvd;
    let t = time_it(&g, iters, || {
        g.k.attention_backward_delta(g.ptr(&delta), g.ptr(&dout), g.ptr(&o), &d).unwrap();
        g.k.attention_backward(dp, dk, dv, s, s, g.ptr(&dout), q, k, v, g.ptr(&lse), g.ptr(&delta), &m, &d).unwrap();
    });
    report_flops("attention_backward (8B layer)", t, 10.0 * (visible * nh * hd) as f64);

    // rmsnorm
    let x = g.upload(&randn(&mut rng, n * h, 1.0)).unwrap();
    let w = g.upload(&to_bf16(&vec![1.0; h])).unwrap();
    let y = g.alloc::<Bf16>(n * h).unwrap();
    let rstd = g.alloc::<f32>(n).unwrap();
    let t =
        time_it(&g, iters, || g.k.rmsnorm_forward(g.ptr(&y), g.ptr(&rstd), g.ptr(&x), g.ptr(&w), n, h, 1e-5).unwrap());
    report_bytes("rmsnorm_forward", t, (6 * n * h + 2 * h + 4 * n) as f64);
    let dx = g.alloc::<f32>(n * h).unwrap();
    let dw = g.alloc::<f32>(h).unwrap();
    let t = time_it(&g, iters, || {
        let a = (g.ptr(&dx), g.ptr(&dw), g.ptr(&x), g.ptr(&x), g.ptr(&w), g.ptr(&rstd));
        g.k.rmsnorm_backward(a.0, a.1, a.2, a.3, a.4, a.5, n, h, true).unwrap()
    });
    report_bytes("rmsnorm_backward (dx +=)", t, (16 * n * h) as f64);

    // rope on q and k in the fused buffer
    let pos = g.upload(&batch.positions).unwrap();
    let freq =
        g.upload(&(0..hd / 2).map(|j| 1.0 / 500000f32.powf(2.0 * j as f32 / hd as f32)).collect::<Vec<_>>()).unwrap();
    let t = time_it(&g, iters, || {
        g.k.rope_forward(q, g.ptr(&pos), g.ptr(&freq), n, nh, hd, s).unwrap();
        g.k.rope_forward(k, g.ptr(&pos), g.ptr(&freq), n, nkv, hd, s).unwrap();
    });
    report_bytes("rope_forward (q and k)", t, (4 * n * (qd + kvd)) as f64);

    // swiglu
    let c = n * i;
    let gate = g.upload(&to_bf16(&randn(&mut rng, c, 1.0))).unwrap();
    let out = g.alloc::<Bf16>(c).unwrap();
    let t = time_it(&g, iters, || g.k.swiglu_forward(g.ptr(&out), g.ptr(&gate), g.ptr(&gate), c).unwrap());
    report_bytes("swiglu_forward", t, (6 * c) as f64);
    let (dg, du) = (g.alloc::<Bf16>(c).unwrap(), g.alloc::<Bf16>(c).unwrap());
    let t = time_it(&g, iters, || {
        g.k.swiglu_backward(g.ptr(&dg), g.ptr(&du), g.ptr(&out), g.ptr(&gate), g.ptr(&gate), c).unwrap()
    });
    report_bytes("swiglu_backward", t, (10 * c) as f64);

    // embedding
    let table = g.alloc::<Bf16>(vocab * h).unwrap();
    let toks = g.upload(&(0..n as u32).map(|t| t * 31 % vocab as u32).collect::<Vec<_>>()).unwrap();
    let t = time_it(&g, iters, || g.k.embedding_forward(g.ptr(&x), g.ptr(&table), g.ptr(&toks), h).unwrap());
    report_bytes("embedding_forward", t, (6 * n * h) as f64);

    // log-probs on one LM-head chunk
    let rows = 256;
    let logits = g.upload(&randn(&mut rng, rows * vocab, 2.0)).unwrap();
    let tg = g.upload(&(0..2 * rows as i32).map(|t| if t % 2 == 0 { t * 7 } else { -1 }).collect::<Vec<_>>()).unwrap();
    let (lp, ls) = (g.alloc::<f32>(2 * rows).unwrap(), g.alloc::<f32>(rows).unwrap());
    let t = time_it(&g, iters, || {
        g.k.logprobs_forward(g.ptr(&lp), g.ptr(&ls), g.ptr(&logits), g.ptr(&tg), rows, vocab, vocab).unwrap()
    });
    report_bytes("logprobs_forward (256 x 128256)", t, (4 * rows * vocab) as f64);
    let dlog = g.alloc::<Bf16>(rows * vocab).unwrap();
    let t = time_it(&g, iters, || {
        let a = (g.ptr(&dlog), g.ptr(&logits), g.ptr(&ls), g.ptr(&tg), g.ptr(&lp));
        g.k.logprobs_backward(a.0, a.1, a.2, a.3, a.4, rows, vocab, vocab, vocab).unwrap()
    });
    report_bytes("logprobs_backward (256 x 128256)", t, (6 * rows * vocab) as f64);

    // AdamW and the gradient norm over 100M parameters
    let np = 100_000_000usize;
    let (p, m1, v1, gr) = (
        g.alloc::<f32>(np).unwrap(),
        g.alloc::<f32>(np).unwrap(),
        g.alloc::<f32>(np).unwrap(),
        g.alloc::<f32>(np).unwrap(),
    );
    let pb = g.alloc::<Bf16>(np).unwrap();
    let t = time_it(&g, iters, || {
        let a = (g.ptr(&p), g.ptr(&m1), g.ptr(&v1), g.ptr(&pb), g.ptr(&gr));
        g.k.adamw_update(a.0, a.1, a.2, a.3, a.4, 1.0, 1e-5, 0.9, 0.999, 1e-8, 0.0, 1, true).unwrap()
    });
    report_bytes("adamw_update (100M)", t, (34 * np) as f64);
    let (no, part) = (g.alloc::<f64>(1).unwrap(), g.alloc::<f64>(g.k.grad_norm_blocks()).unwrap());
    let t = time_it(&g, iters, || g.k.grad_norm(g.ptr(&no), g.ptr(&part), g.ptr(&gr), false).unwrap());
    report_bytes("grad_norm (100M)", t, (4 * np) as f64);
}
