//! Every op of the CPU engine (`engine/cpu/ops.rs`), forward and backward, on the layer
//! shapes of Llama 3.2 1B (hidden 2048, intermediate 8192, 32 heads / 8 kv of 64, vocab
//! 128256) and Llama 3 8B (4096, 14336, 32 / 8 of 128, vocab 128256), scaled down in
//! tokens so two CPU cores finish in a few minutes: 256 rows (one pair: prompt 128,
//! answers 64 and 64, in the shared layout) for the memory-bound ops and attention, 64
//! rows for the linears (the gemm crate's FLOP/s is flat from about 64 rows on) and 4
//! LM-head rows for the log-probs (a vocabulary of 128256 makes each row 0.5 to 1 GFLOP).
//!
//! Throughput, as criterion prints it:
//! - memory-bound ops (RMSNorm, RoPE, SwiGLU, embedding, AdamW, gradient norm): bytes, the
//!   least each call must read and write once (inputs read, outputs written; in-place
//!   buffers and `+=` gradients both), so "GiB/s" is achieved bandwidth;
//! - GEMMs, attention and the LM head + log-softmax + gather: criterion's "elements" are
//!   FLOPs, so "Gelem/s" reads GFLOP/s. FLOPs are those the op executes: a linear's
//!   backward 4·n·in·out; attention 4·d per attended (query, key) and head forward, 10·d
//!   backward (q·k recomputed, dP, dQ, dK, dV); the LM head 2·rows·V·h forward, 6·rows·V·h
//!   backward (the logits are recomputed). On the CPU the log-softmax + gather is fused
//!   with the LM-head GEMM, which dominates it, hence FLOP/s (the CUDA kernel takes the
//!   logits from cuBLASLt and is memory-bound: bytes there).
//!
//! The CUDA kernels are timed on the GPU by tests/gpu.rs `kernel_timings` (through the
//! launchers of `engine/cuda/kernels.rs`, same conventions), which tools/gpu-check.sh runs;
//! without a GPU this prints one line saying the CUDA side is skipped.
//!
//! `cargo bench --bench kernels [-- <filter>]`; RAYON_NUM_THREADS sets the CPU thread count.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use sdpo::bench::{attended_pairs, gpu_present, synthetic_pairs, Shape};
use sdpo::data::{Layout, PairBatch};
use sdpo::engine::cpu::ops::{self, AttnMask, AttnShape, LogpPlan};
use sdpo::weights::SplitMix64;
use sdpo::LlamaConfig;

const TOKENS_PROMPT: usize = 128;
const TOKENS_ANSWER: usize = 64;
/// LM-head rows: one pair of prompt 2 and answers 2 and 3 has 1 + 1 + 2 = 4 of them.
const HEAD_PAIR: (usize, usize, usize) = (2, 2, 3);
/// Rows of the linear-layer GEMMs.
const GEMM_ROWS: usize = 64;

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| scale * rng.normal()).collect()
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(500));
    g
}

const F32: u64 = 4;

fn bench_shape(c: &mut Criterion, shape: Shape) {
    let cfg: LlamaConfig = shape.config();
    let name = shape.name();
    let (h, im, nh, nkv, hd, v) =
        (cfg.hidden_size, cfg.intermediate_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let pairs = synthetic_pairs(&cfg, 1, TOKENS_PROMPT, TOKENS_ANSWER, 3);
    let batch = PairBatch::new(&[&pairs[0]], Layout::Shared).unwrap();
    let n = batch.n_tokens();
    let inv_freq = cfg.inv_freq();

    // --- memory-bound: RMSNorm, RoPE, SwiGLU, embedding
    {
        let mut g = group(c, &format!("{name}/rmsnorm"));
        let x = randn(n * h, 1, 1.0);
        let w = randn(h, 2, 1.0);
        let dy = randn(n * h, 3, 1.0);
        let (mut out, mut rstd, mut dx, mut dw) = (vec![0f32; n * h], vec![0f32; n], vec![0f32; n * h], vec![0f32; h]);
        g.throughput(Throughput::Bytes(F32 * (2 * n * h + h + n) as u64));
        g.bench_function("forward", |b| b.iter(|| ops::rmsnorm_forward(&mut out, &mut rstd, &x, &w, h, 1e-5)));
        g.throughput(Throughput::Bytes(F32 * (3 * n * h + 3 * h + n) as u64));
        g.bench_function("backward", |b| b.iter(|| ops::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, h)));
        g.finish();
    }
    {
        let mut g = group(c, &format!("{name}/rope"));
        let mut q = randn(n * qd, 4, 1.0);
        // read and write every q element; the positions and the frequency table besides
        g.throughput(Throughput::Bytes(F32 * (2 * n * qd + n + hd / 2) as u64));
        g.bench_function("forward (q heads)", |b| {
            b.iter(|| ops::rope_forward(&mut q, &batch.positions, &inv_freq, nh, hd))
        });
        g.bench_function("backward (q heads)", |b| {
            b.iter(|| ops::rope_backward(&mut q, &batch.positions, &inv_freq, nh, hd))
        });
        g.finish();
    }
    {
        let mut g = group(c, &format!("{name}/swiglu"));
        let (gate, up, dout) = (randn(n * im, 5, 1.0), randn(n * im, 6, 1.0), randn(n * im, 7, 1.0));
        let (mut out, mut dgate, mut dup) = (vec![0f32; n * im], vec![0f32; n * im], vec![0f32; n * im]);
        g.throughput(Throughput::Bytes(F32 * 3 * (n * im) as u64));
        g.bench_function("forward", |b| b.iter(|| ops::swiglu_forward(&mut out, &gate, &up)));
        g.throughput(Throughput::Bytes(F32 * 5 * (n * im) as u64));
        g.bench_function("backward", |b| b.iter(|| ops::swiglu_backward(&mut dgate, &mut dup, &dout, &gate, &up)));
        g.finish();
    }
    {
        // The embedding table and its gradient are vocabulary-sized (1 GB and 2 GB in fp32),
        // but a call touches only the batch's rows.
        let mut g = group(c, &format!("{name}/embedding"));
        let table = vec![0.01f32; v * h];
        let mut dtable = vec![0f32; v * h];
        let dout = randn(n * h, 8, 1.0);
        let mut out = vec![0f32; n * h];
        g.throughput(Throughput::Bytes(F32 * (2 * n * h + n) as u64));
        g.bench_function("forward", |b| b.iter(|| ops::embedding_forward(&mut out, &batch.tokens, &table, h)));
        g.throughput(Throughput::Bytes(F32 * (3 * n * h + n) as u64));
        g.bench_function("backward", |b| b.iter(|| ops::embedding_backward(&mut dtable, &dout, &batch.tokens, h)));
        g.finish();
    }

    // --- GEMMs: the linears of one layer (k, v and o are q's shape, smaller or transposed)
    for (lin, in_dim, out_dim) in [("q_proj", h, qd), ("gate_proj", h, im), ("down_proj", im, h)] {
        let n = GEMM_ROWS;
        let mut g = group(c, &format!("{name}/linear {lin} [{n}x{in_dim}]x[{out_dim}x{in_dim}]T"));
        let x = randn(n * in_dim, 9, 1.0);
        let w = randn(out_dim * in_dim, 10, 0.02);
        let dy = randn(n * out_dim, 11, 1.0);
        let (mut y, mut dx, mut dw) = (vec![0f32; n * out_dim], vec![0f32; n * in_dim], vec![0f32; out_dim * in_dim]);
        let f = 2 * n * in_dim * out_dim;
        g.throughput(Throughput::Elements(f as u64));
        g.bench_function("forward", |b| b.iter(|| ops::linear_forward(&mut y, &x, &w, n, in_dim, out_dim)));
        g.throughput(Throughput::Elements(2 * f as u64));
        g.bench_function("backward", |b| {
            b.iter(|| ops::linear_backward(&mut dx, &mut dw, &dy, &x, &w, n, in_dim, out_dim, false))
        });
        g.finish();
    }

    // --- attention under the pair mask
    {
        let mut g = group(c, &format!("{name}/attention ({n} rows, one pair)"));
        let (q, k, vv) = (randn(n * qd, 12, 1.0), randn(n * kvd, 13, 1.0), randn(n * kvd, 14, 1.0));
        let dout = randn(n * qd, 15, 1.0);
        let (mut out, mut lse) = (vec![0f32; n * qd], vec![0f32; n * nh]);
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mask = AttnMask::of(&batch);
        let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
        let per_dim = (attended_pairs(&batch) * nh as u64 * hd as u64) as f64;
        g.throughput(Throughput::Elements((4.0 * per_dim) as u64));
        g.bench_function("forward", |b| {
            b.iter(|| ops::attention_forward(&mut out, &mut lse, &q, &k, &vv, mask, shape))
        });
        g.throughput(Throughput::Elements((10.0 * per_dim) as u64));
        g.bench_function("backward", |b| {
            b.iter(|| ops::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &vv, &out, &lse, mask, shape))
        });
        g.finish();
    }

    // --- LM head + log-softmax + gather
    {
        let (pp, pc, pr) = HEAD_PAIR;
        let hp = synthetic_pairs(&cfg, 1, pp, pc, 4);
        let mut p = hp[0].clone();
        p.rejected = synthetic_pairs(&cfg, 1, 1, pr, 5)[0].chosen.clone();
        let hb = PairBatch::new(&[&p], Layout::Shared).unwrap();
        let plan = LogpPlan::new(&hb.targets);
        let rows = plan.rows.len();
        let hn = hb.n_tokens();
        let x = randn(hn * h, 16, 1.0);
        let w = randn(v * h, 17, 0.02);
        let mut dw = vec![0f32; v * h];
        let (mut logp, mut lse) = (vec![0f32; plan.slot.len()], vec![0f32; rows]);
        let dlogp = vec![0.5f32; plan.slot.len()];
        let mut dx = vec![0f32; hn * h];
        let mut g = group(c, &format!("{name}/logprobs ({rows} rows x vocab {v})"));
        let f = 2 * rows * v * h;
        g.throughput(Throughput::Elements(f as u64));
        g.bench_function("forward", |b| b.iter(|| ops::logprobs_forward(&mut logp, &mut lse, &x, &w, &plan, h, v)));
        g.throughput(Throughput::Elements(3 * f as u64));
        g.bench_function("backward", |b| {
            b.iter(|| ops::logprobs_backward(&mut dx, &mut dw, &dlogp, &x, &w, &lse, &plan, h, v))
        });
        g.finish();
    }

    // --- optimizer, on one q_proj-sized tensor
    {
        let len = h * qd;
        let mut g = group(c, &format!("{name}/optimizer ({len} params)"));
        let (mut p, mut m, mut vv) = (randn(len, 18, 0.02), vec![0f32; len], vec![0f32; len]);
        let grad = randn(len, 19, 1e-3);
        let mut step = 0u64;
        // p, m, v read and written, g read
        g.throughput(Throughput::Bytes(F32 * 7 * len as u64));
        g.bench_function("adamw_update", |b| {
            b.iter(|| {
                step += 1;
                ops::adamw_update(&mut p, &mut m, &mut vv, &grad, 1e-5, 0.9, 0.999, 1e-8, 0.01, step)
            })
        });
        g.throughput(Throughput::Bytes(F32 * len as u64));
        g.bench_function("grad_norm", |b| b.iter(|| ops::grad_norm(&[&grad])));
        g.finish();
    }
}

fn kernels(c: &mut Criterion) {
    if !gpu_present() {
        println!("CUDA benchmarks skipped: no GPU");
    } else {
        println!(
            "CUDA kernels: timed on Llama 3 8B layer shapes by tests/gpu.rs `kernel_timings` (its BENCH lines, \
             collected by tools/gpu-check.sh), with the same byte and FLOP conventions as here"
        );
    }
    for shape in [Shape::Llama1b, Shape::Llama8b] {
        bench_shape(c, shape);
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
