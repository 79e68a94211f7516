//! `CudaEngine`: the Llama forward and hand-written backward on one GPU, from the kernels
//! in kernels/*.cu and cuBLASLt GEMMs, implementing `Engine` like the CPU reference.
//!
//! Precision: bf16 weights (a working copy) and bf16 GEMM inputs; fp32 master weights
//! (exact, as the working copy plus a 16-bit remainder), AdamW moments and gradients; the
//! residual stream, its gradient and the LM-head logits in fp32; every kernel accumulates
//! in fp32.
//!
//! Memory: the parameters, gradients and moments live in flat buffers in
//! `LlamaWeights::specs` order (so q/k/v and gate/up of a layer are adjacent and one
//! AdamW or grad-norm launch covers many tensors); activations are allocated for the
//! largest micro-batch seen and reused (grow-only); the LM head runs over the target rows
//! only, its fp32 logits in chunks of rows; a training forward keeps every row's softmax
//! in bf16 (2·V bytes per row), so the backward needs no second logits GEMM and runs the
//! two head GEMMs once over all rows, not once per chunk (each re-reading and re-writing
//! the fp32 head gradient: 1 GB at Llama 3.2 1B's vocabulary). The layers' working
//! buffers use its memory before it is written, and their backward buffers once those two
//! GEMMs have read it (`Shared`).
//!
//! Data flow of one layer (row-major [tokens, features]; f32 unless marked bf16):
//!   xn1 (bf16) = rmsnorm(x)        qkv (bf16) = xn1·[Wq;Wk;Wv]ᵀ    rope(q), rope(k) in place
//!   att (bf16), lse = attention(q, k, v)                  x += att·Woᵀ  (x_mid)
//!   xn2 (bf16) = rmsnorm(x_mid)    gu = [gate | up] (bf16) = xn2·[Wg;Wu]ᵀ
//!   act (bf16) = silu(gate)·up     x += act·Wdᵀ  (x_out)
//! (q/k/v and gate/up are one GEMM each: their weights are adjacent rows of the flat
//! buffer, and the weight gradient of each pair is one GEMM into the adjacent gradients.)
//! Backward walks it in reverse with the residual gradient in f32 and a bf16 copy of it
//! as GEMM input (written by each norm's backward beside its f32 dx); strided f32→bf16
//! copies reuse rope_backward with a zero frequency table (a rotation by 0). Saved per
//! layer: rstd and x̂ = x·rstd (bf16) of each norm, qkv, att, lse, and gu; not the f32
//! residual stream (the GEMMs add into it in place; the norms' backward takes x̂), not
//! act (swiglu_backward writes it again before the down projection's weight gradient
//! needs it) and not xn1, xn2 (rmsnorm_apply writes them again from x̂ before the weight
//! gradients of the GEMMs after the norm). At Llama 3.2 1B that is 51,336 of the 84,104 bytes per token and
//! layer a copy of everything would take.

use std::time::Instant;

use super::gemm::GemmShape;
use super::kernels::{null, AttnDims, AttnMaskDev, Bf16, DPtr, RMSNORM_MAX_HIDDEN};
use super::params::{ParamLayout, Params};
use super::{gb, join_master, split_master, DBuf, Gpu};
use crate::config::LlamaConfig;
use crate::data::PairBatch;
use crate::dpo::{target_grads, LossConfig, PairLogps};
use crate::engine::cpu::ops::LogpPlan;
use crate::engine::profile::{Category, Profile};
use crate::engine::{check_inputs, AdamState, AdamWConfig, Engine};
use crate::error::{Error, Result};
use crate::weights::LlamaWeights;

/// Owns device allocations; the engine addresses them through `DPtr` views.
#[derive(Default)]
struct Pool {
    f32s: Vec<DBuf<f32>>,
    u16s: Vec<DBuf<u16>>,
}

impl Pool {
    fn f32(&mut self, gpu: &Gpu, len: usize) -> Result<DPtr<f32>> {
        let s = gpu.alloc::<f32>(len)?;
        let p = gpu.ptr(&s).slice(0, len)?;
        self.f32s.push(s);
        Ok(p)
    }
    fn bf16(&mut self, gpu: &Gpu, len: usize) -> Result<DPtr<Bf16>> {
        let s = gpu.alloc::<u16>(len)?;
        let p = gpu.ptr(&s).slice(0, len)?;
        self.u16s.push(s);
        Ok(p)
    }
}

/// One layer's saved activations (for `cap` tokens).
#[derive(Clone, Copy)]
struct LayerActs {
    rstd1: DPtr<f32>,
    qkv: DPtr<Bf16>,
    att: DPtr<Bf16>,
    lse: DPtr<f32>,
    /// The two norms' inputs normalized, x·rstd (bf16), for their backward (null in the
    /// forward-only set).
    xhat1: DPtr<Bf16>,
    xhat2: DPtr<Bf16>,
    rstd2: DPtr<f32>,
    /// [gate | up] `[cap, 2·intermediate]`: the fused GEMM's output, swiglu's input.
    gu: DPtr<Bf16>,
}

/// Activations for up to `cap` tokens: every layer's after a training forward, one
/// layer's set for forward-only use (reference log-probs, eval, scoring), where each
/// layer's activations die with it.
struct Acts {
    cap: usize,
    layers: Vec<LayerActs>,
    rstd_f: DPtr<f32>,
    xf: DPtr<Bf16>,
    role: Role,
    _pool: Pool,
}

enum Role {
    /// A forward-only set owns its working buffers.
    Forward(Work),
    /// A training set keeps the final norm's x̂ for the backward, and takes its working
    /// buffers from `Shared`.
    Train { xhat_f: DPtr<Bf16> },
}

/// The working buffers of the layer at hand (for `cap` tokens).
#[derive(Clone, Copy)]
struct Work {
    /// The residual stream (f32), which the attention and MLP output GEMMs add into in
    /// place. The backward does not read it: the norms keep x̂ (bf16) and rstd instead.
    x: DPtr<f32>,
    /// rmsnorm(x) of the norm at hand (bf16): the forward writes it for the GEMMs after
    /// the norm, the backward writes it again from x̂ (rmsnorm_apply) for their weight
    /// gradients, instead of keeping two per layer.
    xn: DPtr<Bf16>,
    /// silu(gate)·up of the layer at hand: the forward writes it, the backward writes it
    /// again (swiglu_backward) instead of keeping one per layer.
    act: DPtr<Bf16>,
}

impl Acts {
    fn training(&self) -> bool {
        matches!(self.role, Role::Train { .. })
    }
}

/// The layers' backward buffers for `cap` tokens, views into `Shared`.
#[derive(Clone, Copy)]
struct BackActs {
    dx: DPtr<f32>,
    dx16: DPtr<Bf16>,
    dxn: DPtr<f32>,
    dxf: DPtr<f32>,
    dact: DPtr<Bf16>,
    /// [dgate | dup], the layout of `gu`.
    dgu: DPtr<Bf16>,
    datt: DPtr<Bf16>,
    delta: DPtr<f32>,
    dqkv32: DPtr<f32>,
    dqkv16: DPtr<Bf16>,
}

/// LM-head buffers for up to `rows` rows (grow-only): the rows gathered from xf, and one
/// chunk's fp32 logits.
struct Head {
    rows: usize,
    chunk: usize,
    /// `[rows, h]`: the gather's f32 output in forward, dlogits·W in backward.
    xr32: DPtr<f32>,
    xr16: DPtr<Bf16>,
    logits: DPtr<f32>,
    _pool: Pool,
}

/// Training only (grow-only): memory that three phases of a training step use in turn.
/// The layers' forward: `Work` (x from the start, xn and act after the backward's
/// buffers). The LM head: every row's softmax (bf16 `[rows, V]`, from the start), turned
/// into dlogits in place by the backward. The layers' backward, once the head's two GEMMs
/// have read dlogits: `BackActs` from the start, and xn and act again. Each phase's
/// buffers are dead in the others (one stream, in order), so it takes the largest phase,
/// not their sum. Its token capacity `cap` is the activations'.
struct Shared {
    rows: usize,
    cap: usize,
    mem: DPtr<u16>,
    _pool: Pool,
}

impl Shared {
    /// The softmax of `rows` rows of `vocab`.
    fn probs(&self, rows: usize, vocab: usize) -> Result<DPtr<Bf16>> {
        self.mem.cast(0, rows * vocab)
    }

    /// The working buffers of a training set: x from the start (over the backward's
    /// buffers, which are dead while it lives), xn and act after the backward's buffers.
    fn work(&self, cfg: &LlamaConfig) -> Result<Work> {
        let (h, i, cap) = (cfg.hidden_size, cfg.intermediate_size, self.cap);
        let after = back_bytes(cfg) * cap / 2; // in bf16 elements
        Ok(Work {
            x: self.mem.cast(0, cap * h)?,
            xn: self.mem.cast(after, cap * h)?,
            act: self.mem.cast(after + cap * h, cap * i)?,
        })
    }

    /// The backward's buffers, one after another from the start (each a whole number of
    /// 256-byte blocks at `cap`, a multiple of 64, so no padding between them).
    fn back(&self, cfg: &LlamaConfig) -> Result<BackActs> {
        let (h, i, qd, qkvd, nh) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), qkv_dim(cfg), cfg.n_heads);
        let cap = self.cap;
        let mut at = 0; // in bf16 elements
        let mut take = |elems: usize, size: usize| {
            let start = at;
            at += elems * size / 2;
            start
        };
        let m = self.mem;
        let back = BackActs {
            dx: m.cast(take(cap * h, 4), cap * h)?,
            dxn: m.cast(take(cap * h, 4), cap * h)?,
            dxf: m.cast(take(cap * h, 4), cap * h)?,
            delta: m.cast(take(cap * nh, 4), cap * nh)?,
            dqkv32: m.cast(take(cap * qkvd, 4), cap * qkvd)?,
            dx16: m.cast(take(cap * h, 2), cap * h)?,
            dact: m.cast(take(cap * i, 2), cap * i)?,
            dgu: m.cast(take(cap * 2 * i, 2), cap * 2 * i)?,
            datt: m.cast(take(cap * qd, 2), cap * qd)?,
            dqkv16: m.cast(take(cap * qkvd, 2), cap * qkvd)?,
        };
        debug_assert_eq!(at, back_bytes(cfg) * cap / 2, "`work` places xn right after these");
        Ok(back)
    }
}

/// Width of a layer's fused q|k|v projection.
fn qkv_dim(cfg: &LlamaConfig) -> usize {
    cfg.q_dim() + 2 * cfg.kv_dim()
}

/// Batch data on the device.
struct BatchDev {
    tokens: DBuf<u32>,
    positions: DBuf<u32>,
    group: DBuf<u32>,
    branch: DBuf<u8>,
    group_start: DBuf<u32>,
    plan: LogpPlan,
    rows: DBuf<u32>,
    /// Per head row: its (up to) two target tokens, −1 for none.
    targets: DBuf<i32>,
    row_logp: DBuf<f32>,
}

pub struct CudaEngine {
    cfg: LlamaConfig,
    gpu: Gpu,
    /// Where each tensor lies in the flat buffers (`wbf`, `master_lo`, `grad`, `moments`).
    layout: ParamLayout,
    /// The fp32 master weights, as two halves: `wbf`, the bf16 working copy the GEMMs
    /// read (each master rounded), and `master_lo`, the 16-bit remainder that makes it
    /// exact (kernels/adamw.cu): 4 bytes per parameter, not 6 for an fp32 master and a
    /// bf16 copy.
    wbf: DBuf<Bf16>,
    master_lo: DBuf<u16>,
    /// The weights the kernels and GEMMs read: named views of `wbf`.
    w: Params<DPtr<Bf16>>,
    /// fp32 gradients, from the first training step on (forward-only engines hold none).
    grad: Option<DBuf<f32>>,
    /// Named views of `grad`.
    dw: Option<Params<DPtr<f32>>>,
    moments: Option<(DBuf<f32>, DBuf<f32>, u64)>,
    inv_freq: DBuf<f32>,
    zero_freq: DBuf<f32>,
    norm_partial: DBuf<f64>,
    norm_out: DBuf<f64>,
    acts: Option<Acts>,
    head: Option<Head>,
    /// Rows per LM-head logits chunk (`head_chunk_rows` unless set).
    head_chunk: usize,
    shared: Option<Shared>,
    peak_bytes: u64,
}

/// Why the CUDA engine cannot run a model of this config (`None`: it can).
pub fn unsupported(cfg: &LlamaConfig) -> Option<String> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    if h % 8 != 0 || i % 8 != 0 || h > RMSNORM_MAX_HIDDEN {
        return Some(format!(
            "the CUDA engine needs hidden_size ({h}) and intermediate_size ({i}) to be multiples of 8, hidden_size ≤ {RMSNORM_MAX_HIDDEN}"
        ));
    }
    if !super::kernels::ATTENTION_HEAD_DIMS.contains(&hd) {
        return Some(format!(
            "the CUDA attention kernels are compiled for head_dim {:?}, this model has {hd}",
            super::kernels::ATTENTION_HEAD_DIMS
        ));
    }
    None
}

/// Rows per LM-head logits chunk: about 64M fp32 logits (256 MB) at a time, in whole
/// 64-row tiles of the GEMM: 512 rows at a 128K vocabulary, where each chunk's GEMM does
/// ~340 FLOPs per byte it moves (the bf16 head weight read, the f32 logits written; an
/// H200 is compute-bound above ~206 (989 TFLOP/s over 4.8 TB/s), where 256-row chunks sat).
fn head_chunk_rows(vocab: usize) -> usize {
    ((64usize << 20) / vocab.max(1) / 64 * 64).clamp(64, 8192)
}

/// Device memory the engine allocates for a model, by part, in bytes: what `with_gpu`, the
/// first `optimizer_step` and the grow-only activation, LM-head and softmax buffers take
/// for micro-batches of up to `tokens` tokens and `head_rows` LM-head rows. Left out:
/// cuBLASLt's workspace and the kernel modules (allocated by the libraries), each batch's
/// uploads (~20 bytes per token), and buffers under a megabyte (rotary tables,
/// gradient-norm partials). tests/kernel_sim.rs checks it against the allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// Master weights (bf16 working copy + 16-bit remainder).
    pub weights: u64,
    /// fp32 gradients (from the first training step).
    pub grads: u64,
    /// AdamW's fp32 m and v (from the first optimizer step).
    pub moments: u64,
    /// What every layer keeps for the backward (forward only: one layer's buffers).
    pub saved_activations: u64,
    /// The final norm's output, and the residual stream and one layer's working buffers
    /// (forward only: training keeps those in `softmax_or_backward`).
    pub scratch: u64,
    /// The gathered head rows and one chunk of fp32 logits.
    pub head: u64,
    /// The bf16 softmax of every head row, in memory that the layers' working buffers use
    /// before it is written and, with the backward's buffers, after the head's backward has
    /// read it: the largest of the three (training only).
    pub softmax_or_backward: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights
            + self.grads
            + self.moments
            + self.saved_activations
            + self.scratch
            + self.head
            + self.softmax_or_backward
    }
}

/// The memory plan of a model of `cfg` (see `MemoryPlan`); `train` adds the gradients, the
/// moments, every layer's activations, the softmax and the backward's buffers, which
/// forward-only use (reference log-probs, eval, scoring) does not allocate.
pub fn memory_plan(cfg: &LlamaConfig, tokens: usize, head_rows: usize, train: bool) -> MemoryPlan {
    plan(cfg, ParamLayout::total_of(cfg), tokens, head_rows, train)
}

/// `memory_plan` for `params` elements of flat parameter buffers.
fn plan(cfg: &LlamaConfig, params: usize, tokens: usize, head_rows: usize, train: bool) -> MemoryPlan {
    let (h, i, qd, nh, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.n_heads, cfg.vocab_size);
    let qkvd = qkv_dim(cfg);
    let cap = tokens.next_multiple_of(64);
    let chunk = head_chunk_rows(v).min(head_rows);
    let (f32b, bf16b) = (4, 2);
    let t = |x: usize| if train { x } else { 0 };
    // Per token (ensure_acts): `LayerActs` (one set per layer, or one without x̂ in all),
    // `Acts`' single buffers: rstd and the output of the final norm, and either its x̂
    // (training) or `Work` (x, xn, act: forward only).
    let layer = f32b * (2 + nh) + bf16b * (qkvd + qd + 2 * i) + t(bf16b * 2 * h);
    let work = f32b * h + bf16b * (h + i);
    let single = f32b + bf16b * h + if train { bf16b * h } else { work };
    let b = |x: usize| x as u64;
    MemoryPlan {
        weights: b(params * 2 * 2),
        grads: b(t(params * f32b)),
        moments: b(t(params * 2 * f32b)),
        saved_activations: b(cap * if train { cfg.n_layers } else { 1 } * layer),
        scratch: b(cap * single),
        head: b(head_rows * h * (f32b + bf16b) + chunk * v * f32b),
        softmax_or_backward: b(t(shared_bytes(cfg, head_rows, cap))),
    }
}

/// Bytes of `Shared` for `rows` head rows and `cap` tokens: the softmax, or the backward's
/// buffers with xn and act, whichever is larger (x fits inside the backward's buffers).
fn shared_bytes(cfg: &LlamaConfig, rows: usize, cap: usize) -> usize {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    (rows * cfg.vocab_size * 2).max(cap * (back_bytes(cfg) + 2 * (h + i)))
}

/// Bytes per token of the backward's buffers (`BackActs`).
fn back_bytes(cfg: &LlamaConfig) -> usize {
    let (h, i, qd, nh) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.n_heads);
    let qkvd = qkv_dim(cfg);
    4 * (3 * h + nh + qkvd) + 2 * (h + 3 * i + qd + qkvd)
}

/// The part of a plan that grows with the micro-batch.
fn batch_bytes(p: &MemoryPlan) -> u64 {
    p.saved_activations + p.scratch + p.head + p.softmax_or_backward
}

/// Why a micro-batch of `n` tokens and `rows` head rows does not fit in `available`
/// bytes (`None`: it does), and the most tokens (in 64s) that would, at the same share of
/// head rows.
fn room_error(cfg: &LlamaConfig, n: usize, rows: usize, train: bool, available: u64) -> Option<String> {
    let params = ParamLayout::total_of(cfg);
    let full = plan(cfg, params, n, rows, train);
    let need = batch_bytes(&full);
    if need <= available {
        return None;
    }
    let fit = |k: usize| batch_bytes(&plan(cfg, params, k, (k * rows).div_ceil(n), train)) <= available;
    // Nearly linear in the tokens (one logits chunk is not): start from the linear
    // estimate and step down.
    let mut k = (n as f64 * available as f64 / need as f64) as usize / 64 * 64;
    while k > 0 && !fit(k) {
        k -= 64;
    }
    let advice = if k > 0 {
        format!("lower --micro-batch-tokens to {k} or less")
    } else {
        "not even 64 tokens fit beside the model's weights, gradients and AdamW state: train a smaller model".into()
    };
    Some(format!(
        "a micro-batch of {n} tokens needs {} of device memory (saved activations {}, scratch {}, LM head {}, \
         softmax / backward buffers {}), and {} are free beside the model's state ({}); {advice}",
        gb(need),
        gb(full.saved_activations),
        gb(full.scratch),
        gb(full.head),
        gb(full.softmax_or_backward),
        gb(available),
        gb(full.weights + full.grads + full.moments),
    ))
}

impl CudaEngine {
    /// Opens GPU `ordinal` and uploads `weights` (checked against `cfg`).
    pub fn new(cfg: LlamaConfig, weights: LlamaWeights, ordinal: usize) -> Result<Self> {
        // No GPU first (Error::NoGpu), then whether this model fits the kernels.
        if let Some(why) = super::gpu_unavailable() {
            return Err(Error::NoGpu(why));
        }
        if let Some(why) = unsupported(&cfg) {
            return Err(Error::invalid(format!("{why}; use --device cpu")));
        }
        Self::with_gpu(cfg, weights, Gpu::open(ordinal)?)
    }

    /// The engine on a given `Gpu`: a device or the kernel simulator
    /// (`Gpu::sim`, the kernels' own source run on the CPU).
    pub fn with_gpu(cfg: LlamaConfig, weights: LlamaWeights, gpu: Gpu) -> Result<Self> {
        if let Some(why) = unsupported(&cfg) {
            return Err(Error::invalid(why));
        }
        let hd = cfg.head_dim;
        let layout = ParamLayout::new(&cfg)?;
        let wbf = gpu.alloc::<Bf16>(layout.total)?;
        let master_lo = gpu.alloc::<u16>(layout.total)?;
        let w = layout.views(gpu.ptr(&wbf))?;
        let inv_freq = gpu.upload(&cfg.inv_freq())?;
        let zero_freq = gpu.upload(&vec![0f32; hd / 2])?;
        let norm_partial = gpu.alloc::<f64>(gpu.k.grad_norm_blocks())?;
        let norm_out = gpu.alloc::<f64>(1)?;
        let head_chunk = head_chunk_rows(cfg.vocab_size);
        let mut e = CudaEngine {
            cfg,
            gpu,
            layout,
            wbf,
            master_lo,
            w,
            grad: None,
            dw: None,
            moments: None,
            inv_freq,
            zero_freq,
            norm_partial,
            norm_out,
            acts: None,
            head: None,
            head_chunk,
            shared: None,
            peak_bytes: 0,
        };
        e.set_weights(&weights)?;
        e.note_memory();
        Ok(e)
    }

    fn note_memory(&mut self) {
        if let Some((used, _)) = self.gpu.mem_used() {
            self.peak_bytes = self.peak_bytes.max(used);
        }
    }

    // --- parameters

    /// Tensor `i` (in `specs` order) of a flat buffer.
    fn tensor_f32(&self, buf: &DBuf<f32>, i: usize) -> Result<DPtr<f32>> {
        let t = self.layout.tensors[i].1;
        self.gpu.ptr(buf).slice(t.offset, t.len)
    }

    /// The gradient buffer (`ensure_grad` allocated it).
    fn grad(&self) -> &DBuf<f32> {
        self.grad.as_ref().expect("ensure_grad ran before any gradient use")
    }

    /// The named views of the gradient buffer (`ensure_grad` allocated it).
    fn dw(&self) -> &Params<DPtr<f32>> {
        self.dw.as_ref().expect("ensure_grad ran before any gradient use")
    }

    fn ensure_grad(&mut self) -> Result<()> {
        if self.grad.is_none() {
            let grad = self.gpu.alloc::<f32>(self.layout.total)?;
            self.dw = Some(self.layout.views(self.gpu.ptr(&grad))?);
            self.grad = Some(grad);
            self.note_memory();
        }
        Ok(())
    }

    fn download_weights(&self, buf: &DBuf<f32>) -> Result<LlamaWeights> {
        Ok(self.unflatten(&self.gpu.download(self.gpu.ptr(buf))?))
    }

    /// The tensors of a flat buffer's contents.
    fn unflatten(&self, flat: &[f32]) -> LlamaWeights {
        let mut w = LlamaWeights::zeros(&self.cfg);
        for (t, (_, s)) in w.tensors_mut().into_iter().zip(&self.layout.tensors) {
            t.copy_from_slice(&flat[s.offset..s.offset + s.len]);
        }
        w
    }

    fn flatten(&self, w: &LlamaWeights, what: &str) -> Result<Vec<f32>> {
        let specs = LlamaWeights::specs(&self.cfg);
        let tensors = w.tensors();
        if tensors.len() != specs.len() {
            return Err(Error::invalid(format!(
                "{what}: {} tensors, this config has {} (layers or tied LM head differ)",
                tensors.len(),
                specs.len()
            )));
        }
        let mut flat = vec![0f32; self.layout.total];
        for ((t, s), (_, span)) in tensors.iter().zip(&specs).zip(&self.layout.tensors) {
            let (o, l) = (span.offset, span.len);
            if t.len() != l {
                return Err(Error::invalid(format!(
                    "{what}: tensor `{}` has {} values, expected {l} (shape {:?})",
                    s.name,
                    t.len(),
                    s.shape
                )));
            }
            flat[o..o + l].copy_from_slice(t);
        }
        Ok(flat)
    }

    // --- buffers

    /// Activations for `n` tokens; `train`: every layer's, with the norms' x̂.
    fn ensure_acts(&mut self, n: usize, train: bool) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.cap >= n && (a.training() || !train)) {
            return Ok(());
        }
        let cap = n.max(self.acts.as_ref().map_or(0, |a| a.cap)).next_multiple_of(64);
        let train = train || self.acts.as_ref().is_some_and(|a| a.training());
        self.acts = None; // free the old set first
        let cfg = &self.cfg;
        let (h, i, qd, nh) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.n_heads);
        let qkvd = qkv_dim(cfg);
        let g = &self.gpu;
        let mut p = Pool::default();
        // x̂ (bf16, cap × hidden), for training only.
        let xhat = |p: &mut Pool| if train { p.bf16(g, cap * h) } else { Ok(null()) };
        let n_sets = if train { cfg.n_layers } else { 1 };
        let mut layers = Vec::with_capacity(n_sets);
        for _ in 0..n_sets {
            layers.push(LayerActs {
                rstd1: p.f32(g, cap)?,
                qkv: p.bf16(g, cap * qkvd)?,
                att: p.bf16(g, cap * qd)?,
                lse: p.f32(g, cap * nh)?,
                xhat1: xhat(&mut p)?,
                xhat2: xhat(&mut p)?,
                rstd2: p.f32(g, cap)?,
                gu: p.bf16(g, cap * 2 * i)?,
            });
        }
        let role = match train {
            true => Role::Train { xhat_f: xhat(&mut p)? },
            false => Role::Forward(Work { x: p.f32(g, cap * h)?, xn: p.bf16(g, cap * h)?, act: p.bf16(g, cap * i)? }),
        };
        self.acts = Some(Acts { cap, layers, rstd_f: p.f32(g, cap)?, xf: p.bf16(g, cap * h)?, role, _pool: p });
        self.note_memory();
        Ok(())
    }

    /// Fails with what to change when the buffers a micro-batch of `n` tokens and `rows`
    /// head rows needs (beyond those already held, which a regrowth frees first) do not fit
    /// in the device's free memory; the simulator has no limit.
    fn check_room(&self, n: usize, rows: usize, train: bool) -> Result<()> {
        let (cap, head_rows) = (self.acts.as_ref().map_or(0, |a| a.cap), self.head.as_ref().map_or(0, |h| h.rows));
        let shared = self.shared.as_ref().map_or(0, |s| 2 * s.mem.len as u64);
        let trained = self.acts.as_ref().is_some_and(|a| a.training());
        // What is held now (as planned for the kind of pass it was made for; a regrowth
        // frees it first), and what this pass holds, with the gradients (this step) and
        // moments (the first update) that training adds if not allocated yet.
        let now = plan(&self.cfg, self.layout.total, cap, head_rows, trained);
        let held = now.saved_activations + now.scratch + now.head + shared;
        let (n, rows, train) = (n.max(cap), rows.max(head_rows), train || trained);
        let after = plan(&self.cfg, self.layout.total, n, rows, train);
        let missing = |absent: bool, bytes: u64| if train && absent { bytes } else { 0 };
        let pending = missing(self.grad.is_none(), after.grads) + missing(self.moments.is_none(), after.moments);
        if batch_bytes(&after) + pending <= held {
            return Ok(()); // nothing grows
        }
        let Some(free) = self.gpu.mem_free() else {
            return Ok(()); // the simulator
        };
        match room_error(&self.cfg, n, rows, train, (free + held).saturating_sub(pending)) {
            None => Ok(()),
            Some(why) => Err(Error::invalid(why)),
        }
    }

    fn ensure_head(&mut self, rows: usize) -> Result<()> {
        if self.head.as_ref().is_some_and(|hb| hb.rows >= rows) {
            return Ok(());
        }
        self.head = None;
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let chunk = self.head_chunk.min(rows);
        let g = &self.gpu;
        let mut p = Pool::default();
        self.head = Some(Head {
            rows,
            chunk,
            xr32: p.f32(g, rows * h)?,
            xr16: p.bf16(g, rows * h)?,
            logits: p.f32(g, chunk * v)?,
            _pool: p,
        });
        self.note_memory();
        Ok(())
    }

    /// Bytes this engine's `Gpu` has allocated so far (see `memory_plan`).
    pub fn allocated_bytes(&self) -> u64 {
        self.gpu.allocated_bytes()
    }

    /// Rows per LM-head logits chunk (default: ~256 MB of fp32 logits, `head_chunk_rows`):
    /// fewer rows hold less memory and launch more, smaller GEMMs.
    pub fn set_head_chunk_rows(&mut self, rows: usize) {
        self.head_chunk = rows.max(1);
        self.head = None;
    }

    /// `Shared` for `rows` head rows and the activations' token capacity.
    fn ensure_shared(&mut self, rows: usize) -> Result<()> {
        let cap = self.acts.as_ref().map_or(0, |a| a.cap);
        let (rows, cap) = match &self.shared {
            Some(s) if s.rows >= rows && s.cap >= cap => return Ok(()),
            Some(s) => (rows.max(s.rows), cap.max(s.cap)),
            None => (rows, cap),
        };
        self.shared = None;
        let mut pool = Pool::default();
        let mem = pool.bf16(&self.gpu, shared_bytes(&self.cfg, rows, cap) / 2)?;
        self.shared = Some(Shared { rows, cap, mem, _pool: pool });
        self.note_memory();
        Ok(())
    }

    fn upload_batch(&self, batch: &PairBatch) -> Result<BatchDev> {
        let g = &self.gpu;
        let plan = LogpPlan::new(&batch.targets);
        let mut targets = vec![-1i32; 2 * plan.rows.len()];
        for (r, rt) in plan.row_targets.iter().enumerate() {
            for (j, &ti) in rt.iter().enumerate() {
                if ti != u32::MAX {
                    targets[2 * r + j] = plan.tokens[ti as usize] as i32;
                }
            }
        }
        Ok(BatchDev {
            tokens: g.upload(&batch.tokens)?,
            positions: g.upload(&batch.positions)?,
            group: g.upload(&batch.group)?,
            branch: g.upload(&batch.branch)?,
            group_start: g.upload(&batch.group_start)?,
            rows: g.upload(&plan.rows)?,
            targets: g.upload(&targets)?,
            row_logp: g.alloc::<f32>(2 * plan.rows.len())?,
            plan,
        })
    }

    fn dims(&self, n: usize) -> AttnDims {
        let c = &self.cfg;
        let qkvd = c.q_dim() + 2 * c.kv_dim();
        AttnDims {
            n_tokens: n,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            q_stride: qkvd,
            kv_stride: qkvd,
            o_stride: c.q_dim(),
        }
    }

    // --- forward

    /// Runs the model over the batch and the LM head over its target rows; leaves the
    /// per-row log-probs in `b.row_logp`.
    fn forward(&mut self, b: &BatchDev, n: usize, train: bool) -> Result<()> {
        self.gpu.prof.drop_open();
        self.check_room(n, b.plan.rows.len(), train)?;
        self.ensure_acts(n, train)?;
        self.ensure_head(b.plan.rows.len())?;
        if self.acts.as_ref().is_some_and(|a| a.training()) {
            // A forward-only pass on a training set too: its working buffers are there.
            self.ensure_shared(if train { b.plan.rows.len() } else { 0 })?;
        }
        let cfg = self.cfg.clone();
        let (h, i, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let qkvd = qkv_dim(&cfg);
        let eps = cfg.rms_norm_eps;
        let a = self.acts.as_ref().expect("allocated above");
        let (work, xhat_f) = match a.role {
            Role::Forward(w) => (w, null()),
            Role::Train { xhat_f } => (self.shared.as_ref().expect("allocated above").work(&cfg)?, xhat_f),
        };
        let (x, xn, act) = (work.x.slice(0, n * h)?, work.xn, work.act);
        // What only the backward reads (the norms' x̂) is written in training only.
        let keep = |p: DPtr<Bf16>| if train { p } else { null() };
        let (layers, rstd_f, xf) = (a.layers.clone(), a.rstd_f, a.xf);
        let g = &self.gpu;
        let tokens = g.ptr(&b.tokens);
        let pos = g.ptr(&b.positions);
        let freq = g.ptr(&self.inv_freq);
        let mask = AttnMaskDev { group: g.ptr(&b.group), branch: g.ptr(&b.branch), group_start: g.ptr(&b.group_start) };
        let d = self.dims(n);

        // The residual adds are the GEMMs' (x += …, in place).
        g.k.embedding_forward(x, self.w.embed, tokens, h)?;
        for l in 0..cfg.n_layers {
            // Forward only: one set of buffers serves every layer in turn.
            let la = &layers[if train { l } else { 0 }];
            let lw = self.w.layers[l];
            let k = &self.gpu.k;
            k.rmsnorm_forward(xn, la.rstd1, keep(la.xhat1), x, lw.attn_norm, n, h, eps)?;
            self.gpu.gemm.gemm_bf16(la.qkv, xn, lw.wqkv, &GemmShape::new(n, qkvd, h, false, true), 1.0, 0.0)?;
            let k = &self.gpu.k;
            k.rope_forward(la.qkv, pos, freq, n, cfg.n_heads, cfg.head_dim, qkvd)?;
            k.rope_forward(la.qkv.slice(qd, la.qkv.len - qd)?, pos, freq, n, cfg.n_kv_heads, cfg.head_dim, qkvd)?;
            let (q, kk, v) =
                (la.qkv, la.qkv.slice(qd, la.qkv.len - qd)?, la.qkv.slice(qd + kvd, la.qkv.len - qd - kvd)?);
            k.attention_forward(la.att, la.lse, q, kk, v, &mask, &d)?;
            self.gpu.gemm.gemm_f32(x, la.att, lw.wo, &GemmShape::new(n, h, qd, false, true), 1.0, 1.0)?; // x_mid
            let k = &self.gpu.k;
            k.rmsnorm_forward(xn, la.rstd2, keep(la.xhat2), x, lw.mlp_norm, n, h, eps)?;
            self.gpu.gemm.gemm_bf16(la.gu, xn, lw.w_gate_up, &GemmShape::new(n, 2 * i, h, false, true), 1.0, 0.0)?;
            self.gpu.k.swiglu_forward(act, la.gu, n, i)?;
            self.gpu.gemm.gemm_f32(x, act, lw.w_down, &GemmShape::new(n, h, i, false, true), 1.0, 1.0)?;
        }
        self.gpu.k.rmsnorm_forward(xf, rstd_f, keep(xhat_f), x, self.w.final_norm, n, h, eps)?;
        self.head_forward(b, train)
    }

    /// The LM head over the batch's head rows: gathered from xf, then chunk by chunk the
    /// logits and their log-probs (and, in training, the softmax kept for the backward).
    fn head_forward(&mut self, b: &BatchDev, train: bool) -> Result<()> {
        let _head = self.gpu.prof.scope(Category::LmHead);
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let total = b.plan.rows.len();
        let hb = self.head.as_ref().expect("allocated in forward");
        let (xr32, xr16, logits, chunk) = (hb.xr32.slice(0, total * h)?, hb.xr16, hb.logits, hb.chunk);
        let xf = self.acts.as_ref().expect("allocated in forward").xf;
        let probs = match train {
            true => Some(self.shared.as_ref().expect("allocated in forward").probs(total, v)?),
            false => None,
        };
        let g = &self.gpu;
        // A row gather is an embedding lookup into xf.
        g.k.embedding_forward(xr32, xf, g.ptr(&b.rows), h)?;
        g.k.cast_f32_bf16(xr16, xr32, total * h)?;
        let w = self.w.lm_head;
        for r0 in (0..total).step_by(chunk) {
            let rows = chunk.min(total - r0);
            let shape = GemmShape::new(rows, v, h, false, true);
            self.gpu.gemm.gemm_f32(logits, xr16.slice(r0 * h, rows * h)?, w, &shape, 1.0, 0.0)?;
            let g = &self.gpu;
            let logp = g.ptr(&b.row_logp).slice(2 * r0, 2 * rows)?;
            let tgt = g.ptr(&b.targets).slice(2 * r0, 2 * rows)?;
            let p = match probs {
                Some(p) => p.slice(r0 * v, rows * v)?,
                None => null(),
            };
            g.k.logprobs_forward(logp, null(), p, logits, tgt, rows, v, v, v)?;
        }
        Ok(())
    }

    /// Per-target log-probs (in `batch.targets` order) from the per-row results.
    fn target_logps(&self, b: &BatchDev) -> Result<Vec<f32>> {
        let row_logp = self.gpu.download(self.gpu.ptr(&b.row_logp))?;
        let mut out = vec![0f32; b.plan.slot.len()];
        for (r, rt) in b.plan.row_targets.iter().enumerate() {
            for (j, &ti) in rt.iter().enumerate() {
                if ti != u32::MAX {
                    out[ti as usize] = row_logp[2 * r + j];
                }
            }
        }
        Ok(out)
    }

    // --- backward

    /// Back-propagates per-row `dlogp [rows, 2]` through the head and the model, adding
    /// into the gradient buffer.
    fn backward(&mut self, b: &BatchDev, n: usize, dlogp_rows: &[f32]) -> Result<()> {
        let cfg = self.cfg.clone();
        let (h, i, qd, kvd, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
        let qkvd = qkv_dim(&cfg);
        let dl_dev = self.gpu.upload(dlogp_rows)?;
        let a = self.acts.as_ref().expect("forward ran");
        let Role::Train { xhat_f } = a.role else { unreachable!("a training forward made a training set") };
        let xhat_f = xhat_f.slice(0, n * h)?;
        let shared = self.shared.as_ref().expect("a training forward allocated it");
        // The backward's buffers, xn and act share the softmax's memory: nothing below
        // writes them before the head's two GEMMs have read dlogits (one stream, in order).
        let (bk, work) = (shared.back(&cfg)?, shared.work(&cfg)?);
        let layers = a.layers.clone();
        let (dx, dx16, dxn, dxf) =
            (bk.dx.slice(0, n * h)?, bk.dx16.slice(0, n * h)?, bk.dxn.slice(0, n * h)?, bk.dxf.slice(0, n * h)?);
        let (dact, dgu) = (bk.dact.slice(0, n * i)?, bk.dgu.slice(0, n * 2 * i)?);
        let (xn, act) = (work.xn.slice(0, n * h)?, work.act.slice(0, n * i)?);
        let (datt, delta, dqkv32, dqkv16) = (bk.datt, bk.delta, bk.dqkv32, bk.dqkv16);
        let rstd_f = a.rstd_f;

        // LM head over all its rows at once, from the forward's softmax: dlogits in place
        // of it, the rows' dxf = dlogits·W, dW_head += dlogitsᵀ·x.
        let head = self.gpu.prof.scope(Category::LmHead);
        let total = b.plan.rows.len();
        let dlogits = shared.probs(total, v)?;
        let hb = self.head.as_ref().expect("forward ran");
        let (dxr, xr16) = (hb.xr32.slice(0, total * h)?, hb.xr16.slice(0, total * h)?);
        let (head_grad, w_head) = (self.dw().lm_head, self.w.lm_head);
        let g = &self.gpu;
        let (logp, tgt) = (g.ptr(&b.row_logp), g.ptr(&b.targets));
        g.k.logprobs_backward(dlogits, logp, tgt, g.ptr(&dl_dev), total, v, v)?;
        let gm = &mut self.gpu.gemm;
        gm.gemm_f32(dxr, dlogits, w_head, &GemmShape::new(total, h, v, false, false), 1.0, 0.0)?;
        gm.gemm_f32(head_grad, dlogits, xr16, &GemmShape::new(v, h, total, true, false), 1.0, 1.0)?;
        let g = &self.gpu;
        g.k.zero(dxf)?;
        g.k.embedding_backward(dxf, dxr, g.ptr(&b.rows), h)?; // scatter back to the rows
        drop(head);
        let g = &self.gpu;
        let (gnorm, wnorm) = (self.dw().final_norm, self.w.final_norm);
        // dx16: the last layer's MLP input gradient, for its GEMMs.
        g.k.rmsnorm_backward(dx, dx16, gnorm, dxf, xhat_f, wnorm, rstd_f, n, h, false)?;

        let pos = g.ptr(&b.positions);
        let (freq, zero) = (g.ptr(&self.inv_freq), g.ptr(&self.zero_freq));
        let mask = AttnMaskDev { group: g.ptr(&b.group), branch: g.ptr(&b.branch), group_start: g.ptr(&b.group_start) };
        let d = self.dims(n);
        for l in (0..cfg.n_layers).rev() {
            let (la, lw, lg) = (layers[l], self.w.layers[l], self.dw().layers[l]);
            // MLP: x_out = x_mid + act·Wdᵀ, act = silu(gate)·up, [gate | up] = xn2·[Wg;Wu]ᵀ.
            // dx16 = bf16(dx): the norm backward before this wrote it.
            let gm = &mut self.gpu.gemm;
            gm.gemm_bf16(dact, dx16, lw.w_down, &GemmShape::new(n, i, h, false, false), 1.0, 0.0)?;
            let gu = la.gu.slice(0, n * 2 * i)?;
            self.gpu.k.swiglu_backward(dgu, act, dact, gu, n, i)?; // act: this layer's again
            let gm = &mut self.gpu.gemm;
            gm.gemm_f32(lg.w_down, dx16, act, &GemmShape::new(h, i, n, true, false), 1.0, 1.0)?;
            // dxn = dgate·Wg + dup·Wu as one GEMM over K = 2·intermediate.
            gm.gemm_f32(dxn, dgu, lw.w_gate_up, &GemmShape::new(n, h, 2 * i, false, false), 1.0, 0.0)?;
            let xhat2 = la.xhat2.slice(0, n * h)?;
            self.gpu.k.rmsnorm_apply(xn, xhat2, lw.mlp_norm, n, h)?; // this layer's xn2 again
            let gm = &mut self.gpu.gemm;
            // [dWg; dWu] += [dgate | dup]ᵀ·xn2, into the adjacent gradients.
            gm.gemm_f32(lg.w_gate_up, dgu, xn, &GemmShape::new(2 * i, h, n, true, false), 1.0, 1.0)?;
            let k = &self.gpu.k;
            k.rmsnorm_backward(dx, dx16, lg.mlp_norm, dxn, xhat2, lw.mlp_norm, la.rstd2, n, h, true)?;

            // attention: x_mid = x + att·Woᵀ (dx16 = bf16(dx) from the norm above)
            let gm = &mut self.gpu.gemm;
            gm.gemm_bf16(datt, dx16, lw.wo, &GemmShape::new(n, qd, h, false, false), 1.0, 0.0)?;
            gm.gemm_f32(lg.wo, dx16, la.att, &GemmShape::new(h, qd, n, true, false), 1.0, 1.0)?;
            let k = &self.gpu.k;
            k.attention_backward_delta(delta, datt, la.att, &d)?;
            let (q, kk, vv) =
                (la.qkv, la.qkv.slice(qd, la.qkv.len - qd)?, la.qkv.slice(qd + kvd, la.qkv.len - qd - kvd)?);
            let dk32 = dqkv32.slice(qd, dqkv32.len - qd)?;
            let dv32 = dqkv32.slice(qd + kvd, dqkv32.len - qd - kvd)?;
            k.attention_backward(dqkv32, dk32, dv32, qkvd, qkvd, datt, q, kk, vv, la.lse, delta, &mask, &d)?;
            // dq, dk back through RoPE; dv copied (rotation by 0) — all into bf16 dqkv.
            let k = &self.gpu.k;
            k.rope_backward(dqkv16, dqkv32, pos, freq, n, cfg.n_heads, cfg.head_dim, qkvd, qkvd)?;
            let dk16 = dqkv16.slice(qd, dqkv16.len - qd)?;
            k.rope_backward(dk16, dk32, pos, freq, n, cfg.n_kv_heads, cfg.head_dim, qkvd, qkvd)?;
            let dv16 = dqkv16.slice(qd + kvd, dqkv16.len - qd - kvd)?;
            k.rope_backward(dv16, dv32, pos, zero, n, cfg.n_kv_heads, cfg.head_dim, qkvd, qkvd)?;
            let gm = &mut self.gpu.gemm;
            gm.gemm_f32(dxn, dqkv16, lw.wqkv, &GemmShape::new(n, h, qkvd, false, false), 1.0, 0.0)?;
            let xhat1 = la.xhat1.slice(0, n * h)?;
            self.gpu.k.rmsnorm_apply(xn, xhat1, lw.attn_norm, n, h)?; // this layer's xn1 again
            self.gpu.gemm.gemm_f32(lg.wqkv, dqkv16, xn, &GemmShape::new(qkvd, h, n, true, false), 1.0, 1.0)?;
            // dx16 for the next (lower) layer's MLP; layer 0's dx goes to the f32 embedding
            // backward only.
            let dx16_next = if l > 0 { dx16 } else { null() };
            let k = &self.gpu.k;
            k.rmsnorm_backward(dx, dx16_next, lg.attn_norm, dxn, xhat1, lw.attn_norm, la.rstd1, n, h, true)?;
        }
        let g = &self.gpu;
        g.k.embedding_backward(self.tensor_f32(self.grad(), 0)?, dx, g.ptr(&b.tokens), h)?;
        Ok(())
    }

    /// Global L2 norm of the gradient buffer (padding is zero, so it does not count).
    fn grad_norm(&mut self) -> Result<f64> {
        let g = &self.gpu;
        g.k.grad_norm(g.ptr(&self.norm_out), g.ptr(&self.norm_partial), g.ptr(self.grad()), false)?;
        Ok(g.download(g.ptr(&self.norm_out))?[0].sqrt())
    }

    /// Times a large bf16 GEMM (8192³, f32 accumulate, bf16 out): the compute ceiling.
    /// The operand is random (`gemm_peak_operand`), not zeros: on zeros the tensor cores
    /// draw less power and clock higher, which would overstate the ceiling (benches/kernels.rs
    /// fills its operands for the same reason).
    fn measure_gemm_peak(&mut self) -> Result<f64> {
        let s = 8192usize;
        let host = gemm_peak_operand(s * s);
        let a = self.gpu.upload(&host)?;
        drop(host);
        let c = self.gpu.alloc::<u16>(s * s)?;
        let (ap, cp) = (self.gpu.ptr(&a), self.gpu.ptr(&c));
        let shape = GemmShape::new(s, s, s, false, true);
        self.gpu.gemm.gemm_bf16(cp, ap, ap, &shape, 1.0, 0.0)?; // warm-up, algorithm choice
        self.gpu.sync()?;
        let iters = 10;
        let t = Instant::now();
        for _ in 0..iters {
            self.gpu.gemm.gemm_bf16(cp, ap, ap, &shape, 1.0, 0.0)?;
        }
        self.gpu.sync()?;
        Ok(2.0 * (s * s * s) as f64 * iters as f64 / t.elapsed().as_secs_f64())
    }
}

impl Engine for CudaEngine {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn device_name(&self) -> String {
        format!("{} ({})", self.gpu.name, self.gpu.k.arch)
    }

    fn sequence_logps(&mut self, batch: &PairBatch) -> Result<Vec<PairLogps>> {
        check_inputs(&self.cfg, batch, None)?;
        let b = self.upload_batch(batch)?;
        self.forward(&b, batch.n_tokens(), false)?;
        let logp = self.target_logps(&b)?;
        self.gpu.prof.collect()?;
        self.note_memory();
        Ok(PairLogps::sum_targets(batch, &logp))
    }

    fn train_step(
        &mut self,
        batch: &PairBatch,
        reference: &[PairLogps],
        loss: &LossConfig,
        loss_scale: f64,
    ) -> Result<Vec<PairLogps>> {
        check_inputs(&self.cfg, batch, Some(reference))?;
        let b = self.upload_batch(batch)?;
        let n = batch.n_tokens();
        self.forward(&b, n, true)?;
        self.ensure_grad()?;
        let logp = self.target_logps(&b)?;
        let policy = PairLogps::sum_targets(batch, &logp);
        let dlogp = target_grads(batch, &policy, reference, loss, loss_scale);
        let mut dl_rows = vec![0f32; 2 * b.plan.rows.len()];
        for (r, rt) in b.plan.row_targets.iter().enumerate() {
            for (j, &ti) in rt.iter().enumerate() {
                if ti != u32::MAX {
                    dl_rows[2 * r + j] = dlogp[ti as usize];
                }
            }
        }
        self.backward(&b, n, &dl_rows)?;
        self.gpu.sync()?;
        self.gpu.prof.collect()?;
        self.note_memory();
        Ok(policy)
    }

    /// Clips as torch's `clip_grad_norm_` and updates as `torch.optim.AdamW`, with no
    /// weight decay on `*norm*` tensors (HF Trainer), like the CPU engine.
    fn optimizer_step(&mut self, opt: &AdamWConfig, lr: f64) -> Result<f64> {
        self.gpu.prof.drop_open();
        self.ensure_grad()?; // no training step yet: zero gradients
        let norm = self.grad_norm()?;
        if !norm.is_finite() {
            self.zero_grads();
            return Err(Error::invalid(format!(
                "gradient norm is {norm}: the update was skipped; lower the learning rate or check the data"
            )));
        }
        let scale = match opt.max_grad_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0) as f32,
            None => 1.0,
        };
        if self.moments.is_none() {
            let m = self.gpu.alloc::<f32>(self.layout.total)?;
            let v = self.gpu.alloc::<f32>(self.layout.total)?;
            self.moments = Some((m, v, 0));
            self.note_memory();
        }
        let step = {
            let mo = self.moments.as_mut().expect("set above");
            mo.2 += 1;
            mo.2
        };
        let (m, v, _) = self.moments.as_ref().expect("set above");
        let (mp, vp) = (self.gpu.ptr(m), self.gpu.ptr(v));
        let (hp, lp, gp) = (self.gpu.ptr(&self.wbf), self.gpu.ptr(&self.master_lo), self.gpu.ptr(self.grad()));
        // Runs of adjacent tensors with the same weight decay go in one launch (padding
        // between tensors is zero in every buffer and stays zero).
        let tensors = &self.layout.tensors;
        let wd_of = |i: usize| if tensors[i].0.contains("norm") { 0.0 } else { opt.weight_decay };
        let mut i = 0;
        while i < tensors.len() {
            let wd = wd_of(i);
            let mut j = i;
            while j + 1 < tensors.len() && wd_of(j + 1) == wd {
                j += 1;
            }
            let start = tensors[i].1.offset;
            let end = tensors[j].1.offset + tensors[j].1.len;
            let len = end - start;
            self.gpu.k.adamw_update(
                hp.slice(start, len)?,
                lp.slice(start, len)?,
                mp.slice(start, len)?,
                vp.slice(start, len)?,
                gp.slice(start, len)?,
                scale,
                lr,
                opt.beta1,
                opt.beta2,
                opt.eps,
                wd,
                step,
            )?;
            i = j + 1;
        }
        // adamw_update zeroed the gradients it read; the padding between tensors is zero.
        self.gpu.sync()?;
        self.gpu.prof.collect()?;
        Ok(norm)
    }

    fn zero_grads(&mut self) {
        if let Some(grad) = &self.grad {
            // A failed memset leaves a CUDA error that the next call reports.
            let _ = self.gpu.k.zero(self.gpu.ptr(grad));
        }
    }

    fn grads(&self) -> Result<LlamaWeights> {
        match &self.grad {
            Some(grad) => self.download_weights(grad),
            None => Ok(LlamaWeights::zeros(&self.cfg)),
        }
    }

    fn weights(&self) -> Result<LlamaWeights> {
        let (hi, lo) = (self.gpu.download(self.gpu.ptr(&self.wbf))?, self.gpu.download(self.gpu.ptr(&self.master_lo))?);
        Ok(self.unflatten(&join_master(&hi, &lo)))
    }

    fn set_weights(&mut self, w: &LlamaWeights) -> Result<()> {
        let (hi, lo) = split_master(&self.flatten(w, "set_weights")?);
        self.gpu.write(self.gpu.ptr(&self.wbf), &hi)?;
        self.gpu.write(self.gpu.ptr(&self.master_lo), &lo)?;
        self.zero_grads();
        self.gpu.sync()
    }

    fn optimizer_state(&self) -> Result<Option<AdamState>> {
        match &self.moments {
            None => Ok(None),
            Some((m, v, step)) => {
                Ok(Some(AdamState { m: self.download_weights(m)?, v: self.download_weights(v)?, step: *step }))
            }
        }
    }

    fn set_optimizer_state(&mut self, state: Option<AdamState>) -> Result<()> {
        match state {
            None => self.moments = None,
            Some(s) => {
                let (fm, fv) = (self.flatten(&s.m, "optimizer state (m)")?, self.flatten(&s.v, "optimizer state (v)")?);
                let (m, v) = (self.gpu.upload(&fm)?, self.gpu.upload(&fv)?);
                self.moments = Some((m, v, s.step));
            }
        }
        Ok(())
    }

    /// Sections of the step timed by CUDA events on the stream (wall clock on the
    /// simulator); see `profile.rs`.
    fn set_profiling(&mut self, on: bool) -> bool {
        self.gpu.prof.reset(on);
        true
    }

    fn take_profile(&mut self) -> Option<Profile> {
        if !self.gpu.prof.is_on() {
            return None;
        }
        // Steps collect as they end; this only reads what a failed step left (or fails).
        self.gpu.prof.collect().ok()?;
        Some(self.gpu.prof.take())
    }

    fn peak_memory_bytes(&self) -> Option<u64> {
        self.gpu.k.on_device().then_some(self.peak_bytes)
    }

    fn gemm_peak_flops(&mut self) -> Option<f64> {
        if !self.gpu.k.on_device() {
            return None;
        }
        self.measure_gemm_peak().ok()
    }
}

/// `len` random bf16 values (bits) with |v| in [0.5, 1): sign and 7 mantissa bits from
/// xorshift64, exponent 126. Products of such values summed over k = 8192 stay far from
/// bf16's range limits.
fn gemm_peak_operand(len: usize) -> Vec<Bf16> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as u16 & 0x807f) | 0x3f00
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Shape;

    /// Llama 3 8B on an H200 (139 GiB, ~0.7 GB of it the context, cuBLASLt and the
    /// modules): micro-batches of pairs of prompt 256 + answers 512 (1,280 tokens, 1,024
    /// head rows each).
    #[test]
    fn a_micro_batch_too_large_for_the_device_names_one_that_fits() {
        let cfg = Shape::Llama8b.config();
        let state = |p: &MemoryPlan| p.weights + p.grads + p.moments;
        let plan = |pairs: usize| memory_plan(&cfg, 1280 * pairs, 1024 * pairs, true);
        let available = (139u64 << 30) - 700_000_000 - state(&plan(1));
        assert_eq!(room_error(&cfg, 4 * 1280, 4 * 1024, true, available), None, "4 pairs fit: {:?}", plan(4));
        let why = room_error(&cfg, 8 * 1280, 8 * 1024, true, available).expect("8 pairs do not fit");
        println!("{why}");
        let fits: usize =
            why.split("to ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).expect("a token count");
        assert!((4 * 1280..8 * 1280).contains(&fits), "{fits}");
        // Those tokens fit, and 64 more do not (at the same share of head rows).
        assert_eq!(room_error(&cfg, fits, (fits * 4).div_ceil(5), true, available), None);
        assert!(room_error(&cfg, fits + 64, ((fits + 64) * 4).div_ceil(5), true, available).is_some());
        let why = room_error(&cfg, 1280, 1024, true, 100_000_000).expect("0.1 GB holds no micro-batch");
        assert!(why.contains("train a smaller model"), "{why}");
    }

    #[test]
    fn gemm_peak_operand_is_random_and_in_range() {
        let v = super::super::from_bf16(&gemm_peak_operand(1 << 16));
        assert!(v.iter().all(|x| (0.5..1.0).contains(&x.abs())), "a value outside ±[0.5, 1)");
        let neg = v.iter().filter(|x| **x < 0.0).count() as f64 / v.len() as f64;
        assert!((0.45..0.55).contains(&neg), "negative share {neg}"); // 65536 fair signs: σ ≈ 0.002
        let mut distinct: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 256, "every sign × 7-bit mantissa appears");
    }
}
