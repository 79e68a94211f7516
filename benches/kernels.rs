//! Every op of the CPU engine (`engine/cpu/ops.rs`) and every CUDA kernel launcher
//! (`engine/cuda/kernels.rs`) with the engine's cuBLASLt GEMMs (`engine/cuda/gemm.rs`),
//! forward and backward, on the layer shapes of Llama 3.2 1B (hidden 2048, intermediate
//! 8192, 32 heads / 8 kv of 64, vocab 128256) and Llama 3 8B (4096, 14336, 32 / 8 of 128,
//! vocab 128256).
//!
//! CPU: scaled down in tokens so two cores finish in a few minutes: 256 rows (one pair:
//! prompt 128, answers 64 and 64, in the shared layout) for the memory-bound ops and
//! attention, 64 rows for the linears (the gemm crate's FLOP/s is flat from about 64 rows
//! on) and 4 LM-head rows for the log-probs (a vocabulary of 128256 makes each row 0.5 to
//! 1 GFLOP).
//!
//! CUDA (groups `cuda/<shape>/...`, after the CPU groups of the same shape): a micro-batch
//! the engine trains on, 4096 rows (8 pairs: prompt 256, answers 128 and 128, shared
//! layout), bf16 where the engine keeps bf16, and the calls the engine makes: the fused
//! q/k/v projection, o, gate (up is the same GEMM) and down, each with its output type and
//! β; the LM head on 256 rows (half the engine's chunk, which is 512 rows, ~64M fp32
//! logits, at this vocabulary) and the log-softmax kernel on its logits; AdamW and the gradient norm over one layer's
//! parameters. Launches are asynchronous, so a sample is `iters` launches between two
//! stream synchronisations. Without a GPU (or without the `cuda` feature) one line says
//! `CUDA benchmarks skipped: <why>` and only the CPU benchmarks run.
//!
//! Throughput, as criterion prints it:
//! - memory-bound ops (RMSNorm, RoPE, SwiGLU, embedding, casts, log-softmax on
//!   given logits, AdamW, gradient norm): bytes, the least each call must read and write
//!   once (inputs read, outputs written; in-place buffers and `+=` gradients both), so
//!   "GiB/s" is achieved bandwidth;
//! - GEMMs, attention and the CPU's LM head + log-softmax + gather: criterion's "elements"
//!   are FLOPs, so "Gelem/s" reads GFLOP/s. FLOPs are those the op executes: a linear's
//!   backward 4·n·in·out; attention 4·d per attended (query, key) and head forward, 10·d
//!   backward (q·k recomputed, dP, dQ, dK, dV); the CPU LM head 2·rows·V·h forward,
//!   6·rows·V·h backward (the logits are recomputed). On the CPU the log-softmax + gather
//!   is fused with the LM-head GEMM, which dominates it, hence FLOP/s; on CUDA the GEMM
//!   (`linear lm_head`) and the kernel (`logprobs kernel`, memory-bound) are separate rows.
//!
//! Last, a table: the fastest call of every benchmark that ran, in GB/s or TFLOP/s
//! (decimal units), the CPU op and the CUDA kernel of the same name side by side.
//!
//! `cargo bench --bench kernels [-- <filter>]` (`-- cuda/` for the CUDA side only);
//! RAYON_NUM_THREADS sets the CPU thread count.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use sdpo::bench::{attended_pairs, synthetic_pairs, Shape};
use sdpo::data::LogpPlan;
use sdpo::data::{Layout, PairBatch};
use sdpo::engine::cpu::ops::{self, AttnMask, AttnShape};
use sdpo::weights::SplitMix64;
use sdpo::LlamaConfig;

const TOKENS_PROMPT: usize = 128;
const TOKENS_ANSWER: usize = 64;
/// LM-head rows: one pair of prompt 2 and answers 2 and 3 has 1 + 1 + 2 = 4 of them.
const HEAD_PAIR: (usize, usize, usize) = (2, 2, 3);
/// Rows of the linear-layer GEMMs.
const GEMM_ROWS: usize = 64;

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    SplitMix64(seed).normals(n, scale)
}

const F32: u64 = 4;

// --- timing and the summary

/// What one call does: the bytes it must move, or the FLOPs it executes.
#[derive(Clone, Copy, Debug)]
enum Work {
    Bytes(u64),
    Flops(u64),
}

impl Work {
    /// Criterion's throughput: bytes, or FLOPs as "elements" (Gelem/s reads GFLOP/s).
    fn throughput(self) -> Throughput {
        match self {
            Work::Bytes(b) => Throughput::Bytes(b),
            Work::Flops(f) => Throughput::Elements(f),
        }
    }

    /// The rate of a call taking `secs`, in decimal units.
    fn rate(self, secs: f64) -> String {
        match self {
            Work::Bytes(b) => format!("{} GB/s", sig3(b as f64 / secs / 1e9)),
            Work::Flops(f) => format!("{} TFLOP/s", sig3(f as f64 / secs / 1e12)),
        }
    }
}

/// `x` with three significant digits (no exponent).
fn sig3(x: f64) -> String {
    let decimals = if x > 0.0 { (2 - x.log10().floor() as i32).max(0) as usize } else { 0 };
    format!("{x:.decimals$}")
}

fn duration(secs: f64) -> String {
    match secs {
        s if s < 1e-3 => format!("{} µs", sig3(s * 1e6)),
        s if s < 1.0 => format!("{} ms", sig3(s * 1e3)),
        s => format!("{} s", sig3(s)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Cpu,
    Cuda,
}

/// One op of one shape: its fastest call on each side that ran it.
struct Row {
    shape: &'static str,
    op: String,
    cpu: Option<(f64, Work)>,
    cuda: Option<(f64, Work)>,
}

/// The fastest call of every benchmark that ran, printed as one table at the end.
#[derive(Default)]
struct Summary {
    rows: Vec<Row>,
}

impl Summary {
    fn record(&mut self, shape: &'static str, op: String, side: Side, secs: f64, work: Work) {
        let i = match self.rows.iter().position(|r| r.shape == shape && r.op == op) {
            Some(i) => i,
            None => {
                self.rows.push(Row { shape, op, cpu: None, cuda: None });
                self.rows.len() - 1
            }
        };
        let row = &mut self.rows[i];
        *match side {
            Side::Cpu => &mut row.cpu,
            Side::Cuda => &mut row.cuda,
        } = Some((secs, work));
    }

    fn print(&self) {
        if self.rows.is_empty() {
            return;
        }
        let cell = |x: Option<(f64, Work)>| match x {
            Some((s, w)) => format!("{:>9}  {:>16}", duration(s), w.rate(s)),
            None => format!("{:>27}", "-"),
        };
        println!();
        println!("Fastest call per benchmark (GB/s: bytes each call must move; TFLOP/s: FLOPs it executes).");
        println!(
            "CPU: {} threads, 256 rows (linears 64, LM head 4 rows with its GEMM); CUDA: 4096 rows, LM head 256 rows.",
            rayon::current_num_threads()
        );
        println!("{:<9} {:<36} {:>27} {:>27}", "shape", "op", "cpu", "cuda");
        for r in &self.rows {
            println!("{:<9} {:<36} {} {}", r.shape, r.op, cell(r.cpu), cell(r.cuda));
        }
    }
}

/// Where a shape's benchmarks run: CPU or CUDA, and for CUDA how to wait for the device
/// (a launch returns before its kernel ends).
#[derive(Clone, Copy)]
struct Place<'s> {
    side: Side,
    shape: Shape,
    sync: Option<&'s dyn Fn()>,
}

impl<'s> Place<'s> {
    /// Criterion group `[cuda/]<shape>/<family><note>`; `family` names the op in the summary.
    fn group<'a, 'c>(self, c: &'c mut Criterion, sum: &'a mut Summary, family: &str, note: &str) -> Group<'a, 'c>
    where
        's: 'a,
    {
        let prefix = if self.side == Side::Cuda { "cuda/" } else { "" };
        let mut inner = c.benchmark_group(format!("{prefix}{}/{family}{note}", self.shape.name()));
        inner
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(500));
        Group { inner, sum, shape: self.shape.name(), family: family.into(), side: self.side, sync: self.sync }
    }
}

/// A criterion group whose benchmarks also report their fastest call to the summary.
struct Group<'a, 'c> {
    inner: BenchmarkGroup<'c, WallTime>,
    sum: &'a mut Summary,
    shape: &'static str,
    family: String,
    side: Side,
    sync: Option<&'a dyn Fn()>,
}

impl Group<'_, '_> {
    fn run(&mut self, id: &str, work: Work, mut f: impl FnMut()) {
        self.inner.throughput(work.throughput());
        let sync = self.sync;
        let mut best = f64::INFINITY;
        self.inner.bench_function(id, |b| {
            b.iter_custom(|iters| {
                if let Some(s) = sync {
                    s();
                }
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                if let Some(s) = sync {
                    s();
                }
                let d = t.elapsed();
                best = best.min(d.as_secs_f64() / iters as f64);
                d
            })
        });
        // Infinite: the filter left this benchmark out.
        if best.is_finite() {
            self.sum.record(self.shape, format!("{} {id}", self.family), self.side, best, work);
        }
    }
}

// --- the CPU ops

fn bench_shape(c: &mut Criterion, sum: &mut Summary, shape: Shape) {
    let cfg: LlamaConfig = shape.config();
    let (h, im, nh, nkv, hd, v) =
        (cfg.hidden_size, cfg.intermediate_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let pairs = synthetic_pairs(&cfg, 1, TOKENS_PROMPT, TOKENS_ANSWER, 3);
    let batch = PairBatch::new(&[&pairs[0]], Layout::Shared).unwrap();
    let n = batch.n_tokens();
    let inv_freq = cfg.inv_freq();
    let cpu = Place { side: Side::Cpu, shape, sync: None };

    // --- memory-bound: RMSNorm, RoPE, SwiGLU, embedding
    {
        let mut g = cpu.group(c, sum, "rmsnorm", "");
        let x = randn(n * h, 1, 1.0);
        let w = randn(h, 2, 1.0);
        let dy = randn(n * h, 3, 1.0);
        let (mut out, mut rstd, mut dx, mut dw) = (vec![0f32; n * h], vec![0f32; n], vec![0f32; n * h], vec![0f32; h]);
        g.run("forward", Work::Bytes(F32 * (2 * n * h + h + n) as u64), || {
            ops::rmsnorm_forward(&mut out, &mut rstd, &x, &w, h, 1e-5)
        });
        g.run("backward", Work::Bytes(F32 * (3 * n * h + 3 * h + n) as u64), || {
            ops::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, h)
        });
    }
    {
        let mut g = cpu.group(c, sum, "rope", "");
        let mut q = randn(n * qd, 4, 1.0);
        // read and write every q element; the positions and the frequency table besides
        let bytes = Work::Bytes(F32 * (2 * n * qd + n + hd / 2) as u64);
        g.run("forward (q heads)", bytes, || ops::rope_forward(&mut q, &batch.positions, &inv_freq, nh, hd));
        g.run("backward (q heads)", bytes, || ops::rope_backward(&mut q, &batch.positions, &inv_freq, nh, hd));
    }
    {
        let mut g = cpu.group(c, sum, "swiglu", "");
        let (gate, up, dout) = (randn(n * im, 5, 1.0), randn(n * im, 6, 1.0), randn(n * im, 7, 1.0));
        let (mut out, mut dgate, mut dup) = (vec![0f32; n * im], vec![0f32; n * im], vec![0f32; n * im]);
        g.run("forward", Work::Bytes(F32 * 3 * (n * im) as u64), || ops::swiglu_forward(&mut out, &gate, &up));
        g.run("backward", Work::Bytes(F32 * 5 * (n * im) as u64), || {
            ops::swiglu_backward(&mut dgate, &mut dup, &dout, &gate, &up)
        });
    }
    {
        // The embedding table and its gradient are vocabulary-sized (1 GB and 2 GB in fp32),
        // but a call touches only the batch's rows.
        let mut g = cpu.group(c, sum, "embedding", "");
        let table = vec![0.01f32; v * h];
        let mut dtable = vec![0f32; v * h];
        let dout = randn(n * h, 8, 1.0);
        let mut out = vec![0f32; n * h];
        g.run("forward", Work::Bytes(F32 * (2 * n * h + n) as u64), || {
            ops::embedding_forward(&mut out, &batch.tokens, &table, h)
        });
        g.run("backward", Work::Bytes(F32 * (3 * n * h + n) as u64), || {
            ops::embedding_backward(&mut dtable, &dout, &batch.tokens, h, None)
        });
    }

    // --- GEMMs: the linears of one layer (k, v and o are q's shape, smaller or transposed)
    for (lin, in_dim, out_dim) in [("q_proj", h, qd), ("gate_proj", h, im), ("down_proj", im, h)] {
        let n = GEMM_ROWS;
        let mut g = cpu.group(c, sum, &format!("linear {lin}"), &format!(" [{n}x{in_dim}]x[{out_dim}x{in_dim}]T"));
        let x = randn(n * in_dim, 9, 1.0);
        let w = randn(out_dim * in_dim, 10, 0.02);
        let dy = randn(n * out_dim, 11, 1.0);
        let (mut y, mut dx, mut dw) = (vec![0f32; n * out_dim], vec![0f32; n * in_dim], vec![0f32; out_dim * in_dim]);
        let f = (2 * n * in_dim * out_dim) as u64;
        g.run("forward", Work::Flops(f), || ops::linear_forward(&mut y, &x, &w, n, in_dim, out_dim));
        g.run("backward", Work::Flops(2 * f), || {
            ops::linear_backward(&mut dx, &mut dw, &dy, &x, &w, n, in_dim, out_dim, false)
        });
    }

    // --- attention under the pair mask
    {
        let mut g = cpu.group(c, sum, "attention", &format!(" ({n} rows, one pair)"));
        let (q, k, vv) = (randn(n * qd, 12, 1.0), randn(n * kvd, 13, 1.0), randn(n * kvd, 14, 1.0));
        let dout = randn(n * qd, 15, 1.0);
        let (mut out, mut lse) = (vec![0f32; n * qd], vec![0f32; n * nh]);
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mask = AttnMask::of(&batch);
        let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
        let per_dim = attended_pairs(&batch) * nh as u64 * hd as u64;
        g.run("forward", Work::Flops(4 * per_dim), || {
            ops::attention_forward(&mut out, &mut lse, &q, &k, &vv, mask, shape)
        });
        g.run("backward", Work::Flops(10 * per_dim), || {
            ops::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &vv, &out, &lse, mask, shape)
        });
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
        let mut g = cpu.group(c, sum, "logprobs", &format!(" ({rows} rows x vocab {v})"));
        let f = (2 * rows * v * h) as u64;
        g.run("forward", Work::Flops(f), || ops::logprobs_forward_with_head(&mut logp, &mut lse, &x, &w, &plan, h, v));
        g.run("backward", Work::Flops(3 * f), || {
            ops::logprobs_backward_with_head(&mut dx, &mut dw, &dlogp, &x, &w, &lse, &plan, h, v)
        });
    }

    // --- optimizer, on one q_proj-sized tensor
    {
        let len = h * qd;
        let mut g = cpu.group(c, sum, "optimizer", &format!(" ({len} params)"));
        let (mut p, mut m, mut vv) = (randn(len, 18, 0.02), vec![0f32; len], vec![0f32; len]);
        let grad = randn(len, 19, 1e-3);
        let mut step = 0u64;
        // p, m, v read and written, g read
        g.run("adamw_step", Work::Bytes(F32 * 7 * len as u64), || {
            step += 1;
            ops::adamw_step(&mut p, &mut m, &mut vv, &grad, 1e-5, 0.9, 0.999, 1e-8, 0.01, step)
        });
        g.run("grad_norm", Work::Bytes(F32 * len as u64), || {
            black_box(ops::grad_norm(&[&grad]));
        });
    }
}

// --- the CUDA kernels

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use sdpo::engine::cuda::gemm::{GemmShape, OutType};
    use sdpo::engine::cuda::kernels::{null, AttnDims, AttnMaskDev, Bf16};
    use sdpo::engine::cuda::{to_bf16, DBuf, Gpu};

    /// The micro-batch: 8 pairs of prompt 256 and answers 128 + 128, 4096 rows shared.
    const PAIRS: usize = 8;
    const PROMPT: usize = 256;
    const ANSWER: usize = 128;
    /// LM-head rows timed: half of one of the engine's logits chunks (512 rows at V 128256).
    const HEAD_ROWS: usize = 256;
    const BF16: u64 = 2;

    /// The GPU, or why there is none to benchmark on.
    pub fn open() -> Result<Gpu, String> {
        if let Some(why) = sdpo::engine::cuda::gpu_unavailable() {
            return Err(why);
        }
        Gpu::open(0).map_err(|e| format!("opening GPU 0 failed: {e}"))
    }

    /// `len` values in [-scale, scale): a random block of 65537 (a prime) repeated, so that
    /// a billion-element operand is cheap to fill and no row shorter than the block
    /// repeats within itself. Random, not zero, operands: a GEMM's power draw (and so its
    /// clock) depends on the bits it multiplies.
    fn tiled(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        let block: Vec<f32> =
            (0..65537).map(|_| scale * ((rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)).collect();
        block.iter().copied().cycle().take(len).collect()
    }

    fn rand16(g: &Gpu, len: usize, seed: u64) -> DBuf<Bf16> {
        g.upload(&to_bf16(&tiled(len, seed, 1.0))).unwrap()
    }

    fn rand32(g: &Gpu, len: usize, seed: u64, scale: f32) -> DBuf<f32> {
        g.upload(&tiled(len, seed, scale)).unwrap()
    }

    /// One linear layer as the engine calls it: forward y = x·Wᵀ (β = 1 where y adds onto
    /// the residual stream), backward dx = dy·W and dW += dyᵀ·x (f32).
    struct Linear {
        name: &'static str,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        y: OutType,
        y_beta: f32,
        dx: OutType,
    }

    pub fn bench_shape(c: &mut Criterion, sum: &mut Summary, gpu: &mut Gpu, shape: Shape) {
        let cfg = shape.config();
        let (h, im, nh, nkv, hd, v) =
            (cfg.hidden_size, cfg.intermediate_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let qkvd = qd + 2 * kvd;
        let pairs = synthetic_pairs(&cfg, PAIRS, PROMPT, ANSWER, 3);
        let batch = PairBatch::new(&pairs.iter().collect::<Vec<_>>(), Layout::Shared).unwrap();
        let n = batch.n_tokens();
        let stream = gpu.stream.clone().expect("Gpu::open has a stream");
        let sync = move || stream.synchronize().expect("synchronising the CUDA stream");
        let sync: &dyn Fn() = &sync;
        let rows_note = format!(" ({n} rows)");
        let place = Place { side: Side::Cuda, shape, sync: Some(sync) };
        let u = |x: usize| x as u64;

        // --- memory-bound: RMSNorm, RoPE, SwiGLU, embedding, casts
        {
            let g = &*gpu;
            let mut gr = place.group(c, sum, "rmsnorm", &rows_note);
            let x = rand32(g, n * h, 1, 1.0);
            let w = rand16(g, h, 2);
            let dy = rand32(g, n * h, 3, 1.0);
            let (y, rstd) = (g.alloc::<Bf16>(n * h).unwrap(), g.alloc::<f32>(n).unwrap());
            let (dx, dw) = (g.alloc::<f32>(n * h).unwrap(), g.alloc::<f32>(h).unwrap());
            let dx16 = g.alloc::<Bf16>(n * h).unwrap();
            let xhat = g.alloc::<Bf16>(n * h).unwrap();
            let (xp, wp, yp, rp, xhp) = (g.ptr(&x), g.ptr(&w), g.ptr(&y), g.ptr(&rstd), g.ptr(&xhat));
            // training: x read (f32), y and x̂ written (bf16), w read, rstd written
            gr.run("forward", Work::Bytes(F32 * u(n * h + n) + BF16 * u(2 * n * h + h)), || {
                g.k.rmsnorm_forward(yp, rp, xhp, xp, wp, n, h, 1e-5).unwrap()
            });
            // the backward's xn: x̂ read, y written (bf16), w read
            gr.run("apply", Work::Bytes(BF16 * u(2 * n * h + h)), || {
                g.k.rmsnorm_forward_from_xhat(yp, xhp, wp, n, h).unwrap()
            });
            // As the engine runs it: dx += (read and written) and dy read (f32), x̂ read and
            // bf16(dx) written (bf16), rstd read, w read, dw +=
            let (dxp, dx16p, dwp, dyp) = (g.ptr(&dx), g.ptr(&dx16), g.ptr(&dw), g.ptr(&dy));
            gr.run("backward", Work::Bytes(F32 * u(3 * n * h + n + 2 * h) + BF16 * u(2 * n * h + h)), || {
                g.k.rmsnorm_backward_from_xhat(dxp, dx16p, dwp, dyp, xhp, wp, rp, n, h, true).unwrap()
            });
        }
        {
            let g = &*gpu;
            let mut gr = place.group(c, sum, "rope", &rows_note);
            let qkv = rand16(g, n * qkvd, 4);
            let dqkv = rand32(g, n * qkvd, 5, 1.0);
            let pos = g.upload(&batch.positions).unwrap();
            let freq = g.upload(&cfg.inv_freq()).unwrap();
            let (qp, dp, pp, fp) = (g.ptr(&qkv), g.ptr(&dqkv), g.ptr(&pos), g.ptr(&freq));
            // q heads of the fused [n, q + 2kv] rows, in place (bf16 read and written);
            // backward reads f32 dq and writes bf16, as the engine does. Positions and
            // the frequency table besides.
            let side = F32 * u(n + hd / 2);
            gr.run("forward (q heads)", Work::Bytes(2 * BF16 * u(n * qd) + side), || {
                g.k.rope_forward(qp, pp, fp, n, nh, hd, qkvd).unwrap()
            });
            gr.run("backward (q heads)", Work::Bytes((F32 + BF16) * u(n * qd) + side), || {
                g.k.rope_backward(qp, dp, pp, fp, n, nh, hd, qkvd, qkvd).unwrap()
            });
        }
        {
            let g = &*gpu;
            let mut gr = place.group(c, sum, "swiglu", &rows_note);
            let cnt = n * im;
            // gate|up as the fused GEMM writes them: [n, 2·intermediate]
            let (gu, dout) = (rand16(g, 2 * cnt, 6), rand16(g, cnt, 8));
            let (out, dgu) = (g.alloc::<Bf16>(cnt).unwrap(), g.alloc::<Bf16>(2 * cnt).unwrap());
            let (gup, op) = (g.ptr(&gu), g.ptr(&out));
            // gate, up read; out written
            gr.run("forward", Work::Bytes(3 * BF16 * u(cnt)), || g.k.swiglu_forward(op, gup, n, im).unwrap());
            let (dgup, dop) = (g.ptr(&dgu), g.ptr(&dout));
            // gate, up, dout read; dgate, dup and out (again) written
            gr.run("backward", Work::Bytes(6 * BF16 * u(cnt)), || {
                g.k.swiglu_backward(dgup, op, dop, gup, n, im).unwrap()
            });
        }
        {
            // Vocabulary-sized table (bf16) and gradient (f32); a call touches the batch's rows.
            let g = &*gpu;
            let mut gr = place.group(c, sum, "embedding", &rows_note);
            let table = rand16(g, v * h, 9);
            let dtable = g.alloc::<f32>(v * h).unwrap();
            let tokens = g.upload(&batch.tokens).unwrap();
            let dout = rand32(g, n * h, 10, 1.0);
            let out = g.alloc::<f32>(n * h).unwrap();
            let (tp, dtp, kp, dop, op) = (g.ptr(&table), g.ptr(&dtable), g.ptr(&tokens), g.ptr(&dout), g.ptr(&out));
            // rows read (bf16), written (f32), token ids read
            gr.run("forward", Work::Bytes(BF16 * u(n * h) + F32 * u(n * h + n)), || {
                g.k.embedding_forward(op, tp, kp, h).unwrap()
            });
            // dout read, gradient rows read and written
            gr.run("backward", Work::Bytes(F32 * u(3 * n * h + n)), || {
                g.k.embedding_backward(dtp, dop, kp, h, None).unwrap()
            });
        }
        {
            let g = &*gpu;
            let mut gr = place.group(c, sum, "casts", &rows_note);
            let cnt = n * h;
            let (x, y) = (rand32(g, cnt, 11, 1.0), rand16(g, cnt, 12));
            let (x16, x32) = (g.alloc::<Bf16>(cnt).unwrap(), g.alloc::<f32>(cnt).unwrap());
            let (xp, yp, x16p, x32p) = (g.ptr(&x), g.ptr(&y), g.ptr(&x16), g.ptr(&x32));
            gr.run("cast_f32_bf16", Work::Bytes((F32 + BF16) * u(cnt)), || g.k.cast_f32_bf16(x16p, xp, cnt).unwrap());
            gr.run("cast_bf16_f32", Work::Bytes((F32 + BF16) * u(cnt)), || g.k.cast_bf16_f32(x32p, yp, cnt).unwrap());
        }

        // --- GEMMs: the engine's calls, per layer and for HEAD_ROWS LM-head rows
        let (f32o, bf16o) = (OutType::F32, OutType::Bf16);
        let linears = [
            Linear { name: "qkv_proj", rows: n, in_dim: h, out_dim: qkvd, y: bf16o, y_beta: 0.0, dx: f32o },
            Linear { name: "o_proj", rows: n, in_dim: qd, out_dim: h, y: f32o, y_beta: 1.0, dx: bf16o },
            Linear { name: "gate_proj", rows: n, in_dim: h, out_dim: im, y: bf16o, y_beta: 0.0, dx: f32o },
            Linear { name: "down_proj", rows: n, in_dim: im, out_dim: h, y: f32o, y_beta: 1.0, dx: bf16o },
            Linear { name: "lm_head", rows: HEAD_ROWS, in_dim: h, out_dim: v, y: f32o, y_beta: 0.0, dx: f32o },
        ];
        for l in &linears {
            let (rows, in_dim, out_dim) = (l.rows, l.in_dim, l.out_dim);
            let note = format!(" [{rows}x{in_dim}]x[{out_dim}x{in_dim}]T");
            let mut gr = place.group(c, sum, &format!("linear {}", l.name), &note);
            let g = &*gpu;
            let (x, w, dy) =
                (rand16(g, rows * in_dim, 13), rand16(g, out_dim * in_dim, 14), rand16(g, rows * out_dim, 15));
            // f32-sized outputs hold either output type
            let (y, dx, dw) = (
                g.alloc::<f32>(rows * out_dim).unwrap(),
                g.alloc::<f32>(rows * in_dim).unwrap(),
                g.alloc::<f32>(out_dim * in_dim).unwrap(),
            );
            let (xp, wp, dyp, yp, dxp, dwp) = (g.ptr(&x), g.ptr(&w), g.ptr(&dy), g.ptr(&y), g.ptr(&dx), g.ptr(&dw));
            let gemm = &mut gpu.gemm;
            let f = 2 * u(rows * in_dim * out_dim);
            let fwd = GemmShape::new(rows, out_dim, in_dim, false, true);
            gr.run("forward", Work::Flops(f), || gemm.gemm(yp.ptr, yp.len, l.y, xp, wp, &fwd, 1.0, l.y_beta).unwrap());
            let (bwd_x, bwd_w) = (
                GemmShape::new(rows, in_dim, out_dim, false, false),
                GemmShape::new(out_dim, in_dim, rows, true, false),
            );
            gr.run("backward", Work::Flops(2 * f), || {
                gemm.gemm(dxp.ptr, dxp.len, l.dx, dyp, wp, &bwd_x, 1.0, 0.0).unwrap();
                gemm.gemm(dwp.ptr, dwp.len, OutType::F32, dyp, xp, &bwd_w, 1.0, 1.0).unwrap();
            });
        }

        // --- attention under the pair mask (q, k, v in the fused rows, as the engine has them)
        {
            let g = &*gpu;
            let mut gr = place.group(c, sum, "attention", &format!(" ({n} rows, {PAIRS} pairs)"));
            let qkv = rand16(g, n * qkvd, 16);
            let qp = g.ptr(&qkv);
            let (q, k, vv) = (qp, qp.slice(qd, qp.len - qd).unwrap(), qp.slice(qd + kvd, qp.len - qd - kvd).unwrap());
            let (group_d, branch_d, start_d) = (
                g.upload(&batch.group).unwrap(),
                g.upload(&batch.branch).unwrap(),
                g.upload(&batch.group_start).unwrap(),
            );
            let mask = AttnMaskDev { group: g.ptr(&group_d), branch: g.ptr(&branch_d), group_start: g.ptr(&start_d) };
            let d = AttnDims {
                n_tokens: n,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                q_stride: qkvd,
                kv_stride: qkvd,
                o_stride: qd,
            };
            let (o, lse) = (g.alloc::<Bf16>(n * qd).unwrap(), g.alloc::<f32>(n * nh).unwrap());
            let (op, lp) = (g.ptr(&o), g.ptr(&lse));
            let dout = rand16(g, n * qd, 17);
            let (delta, dqkv) = (g.alloc::<f32>(n * nh).unwrap(), g.alloc::<f32>(n * qkvd).unwrap());
            let (dop, delp, dp) = (g.ptr(&dout), g.ptr(&delta), g.ptr(&dqkv));
            let (dk, dv) = (dp.slice(qd, dp.len - qd).unwrap(), dp.slice(qd + kvd, dp.len - qd - kvd).unwrap());
            let per_dim = attended_pairs(&batch) * u(nh * hd);
            // The backward reads the forward's o and lse: one forward first, whatever the filter.
            g.k.attention_forward(op, lp, q, k, vv, &mask, &d).unwrap();
            gr.run("forward", Work::Flops(4 * per_dim), || g.k.attention_forward(op, lp, q, k, vv, &mask, &d).unwrap());
            gr.run("backward", Work::Flops(10 * per_dim), || {
                g.k.attention_backward_delta(delp, dop, op, &d).unwrap();
                g.k.attention_backward(dp, dk, dv, qkvd, qkvd, dop, q, k, vv, lp, delp, &mask, &d).unwrap();
            });
        }

        // --- log-softmax + gather on HEAD_ROWS rows of logits (the GEMM is `linear lm_head`)
        {
            let g = &*gpu;
            let rows = HEAD_ROWS;
            let mut gr = place.group(c, sum, "logprobs kernel", &format!(" ({rows} rows x vocab {v})"));
            let logits = rand32(g, rows * v, 18, 8.0);
            // Per row its (up to) two targets: every other row has one.
            let targets: Vec<i32> =
                (0..2 * rows).map(|i| if i % 4 == 3 { -1 } else { (i * 7919 % v) as i32 }).collect();
            let tg = g.upload(&targets).unwrap();
            let (logp, lse) = (g.alloc::<f32>(2 * rows).unwrap(), g.alloc::<f32>(rows).unwrap());
            let dlogp = rand32(g, 2 * rows, 19, 1.0);
            let probs = g.alloc::<Bf16>(rows * v).unwrap();
            let (lgp, tgp, lpp, lsp, dlp, pp) =
                (g.ptr(&logits), g.ptr(&tg), g.ptr(&logp), g.ptr(&lse), g.ptr(&dlogp), g.ptr(&probs));
            // logits read; per row targets, log-probs, lse (and dlogp) besides
            let per_row = F32 * u(5 * rows);
            gr.run("forward", Work::Bytes(F32 * u(rows * v) + per_row), || {
                g.k.logprobs_forward(lpp, lsp, null(), lgp, tgp, rows, v, v, v).unwrap()
            });
            // training: logits read twice (f32), probs written (bf16)
            gr.run("forward + probs", Work::Bytes((2 * F32 + BF16) * u(rows * v) + per_row), || {
                g.k.logprobs_forward(lpp, lsp, pp, lgp, tgp, rows, v, v, v).unwrap()
            });
            // probs read, dlogits written in their place (bf16; the values drift from call
            // to call, the work does not)
            gr.run("backward", Work::Bytes(2 * BF16 * u(rows * v) + per_row), || {
                g.k.logprobs_backward(pp, lpp, tgp, dlp, rows, v, v).unwrap()
            });
        }

        // --- optimizer over one layer's parameters
        {
            let g = &*gpu;
            let np = 2 * h + h * qkvd + qd * h + 3 * h * im;
            let mut gr = place.group(c, sum, "optimizer", &format!(" ({np} params, one layer)"));
            // Zeros: AdamW and the norm do the same work whatever the values.
            let (m, vm, grad) = (g.alloc::<f32>(np).unwrap(), g.alloc::<f32>(np).unwrap(), g.alloc::<f32>(np).unwrap());
            let (hi, lo) = (g.alloc::<Bf16>(np).unwrap(), g.alloc::<u16>(np).unwrap());
            let (hp, lp, mp, vp, gp) = (g.ptr(&hi), g.ptr(&lo), g.ptr(&m), g.ptr(&vm), g.ptr(&grad));
            let (out, partial) = (g.alloc::<f64>(1).unwrap(), g.alloc::<f64>(g.k.grad_norm_blocks()).unwrap());
            let (outp, partp) = (g.ptr(&out), g.ptr(&partial));
            // the master's two 16-bit halves, m, v read and written, g read and zeroed
            gr.run("adamw_step", Work::Bytes(F32 * u(8 * np)), || {
                g.k.adamw_step(hp, lp, mp, vp, gp, 1.0, 1e-5, 0.9, 0.999, 1e-8, 0.01, 1).unwrap()
            });
            gr.run("grad_norm", Work::Bytes(F32 * u(np)), || g.k.grad_norm(outp, partp, gp, false).unwrap());
        }
    }
}

fn kernels(c: &mut Criterion) {
    let mut sum = Summary::default();
    #[cfg(feature = "cuda")]
    let mut gpu = cuda::open().map_err(|why| println!("CUDA benchmarks skipped: {why}")).ok();
    #[cfg(not(feature = "cuda"))]
    println!("CUDA benchmarks skipped: this build has no CUDA engine (feature `cuda` is off)");
    for shape in [Shape::Llama1b, Shape::Llama8b] {
        bench_shape(c, &mut sum, shape);
        #[cfg(feature = "cuda")]
        if let Some(g) = gpu.as_mut() {
            cuda::bench_shape(c, &mut sum, g, shape);
        }
    }
    sum.print();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
