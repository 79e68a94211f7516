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
//! Files: `params.rs` lays the parameters out in the flat buffers and names their views
//! (`Params`, `LayerParams`); `buffers.rs` holds the activation, LM-head and shared
//! buffers; `memory.rs` plans what they take (`memory_plan`) and whether a micro-batch
//! fits; `profile.rs` times each op category where the launchers run; this file is the
//! engine: forward, backward and the optimizer step over those named buffers.
//!
//! Data flow of one layer (row-major [tokens, features]; f32 unless marked bf16):
//!   xn1 (bf16) = rmsnorm(x)        qkv (bf16) = xn1·[Wq;Wk;Wv]ᵀ    rope(q), rope(k) in place
//!   att (bf16), lse = attention(q, k, v)                  x += att·Woᵀ  (x_mid)
//!   xn2 (bf16) = rmsnorm(x_mid)    gu = [gate | up] (bf16) = xn2·[Wg;Wu]ᵀ
//!   act (bf16) = silu(gate)·up     x += act·Wdᵀ  (x_out)
//! (q/k/v and gate/up are one GEMM each: their weights are adjacent rows of the flat
//! buffer, and the weight gradient of each pair is one GEMM into the adjacent gradients.)
//! Backward walks it in reverse with the residual gradient in f32 and a bf16 copy of it
//! as GEMM input (written by each norm's backward beside its f32 dx); dv's strided f32→bf16
//! copy is copy_strided_f32_bf16 (the rope_backward kernel rotating by 0). Saved per
//! layer: rstd and x̂ = x·rstd (bf16) of each norm, qkv, att, lse, and gu; not the f32
//! residual stream (the GEMMs add into it in place; the norms' backward takes x̂), not
//! act (swiglu_backward writes it again before the down projection's weight gradient
//! needs it) and not xn1, xn2 (rmsnorm_forward_from_xhat writes them again from x̂ before the weight
//! gradients of the GEMMs after the norm). At Llama 3.2 1B that is 51,336 of the 84,104
//! bytes per token and layer a copy of everything would take.

use std::time::Instant;

use super::buffers::{Acts, Alloc, Head, Shared};
use super::gemm::GemmShape;
use super::kernels::{null, AttnDims, AttnMaskDev, Bf16, DPtr, RMSNORM_MAX_HIDDEN};
use super::memory::{batch_bytes, head_chunk_rows, plan, qkv_dim, room_error};
pub use super::memory::{memory_plan, MemoryPlan};
use super::params::{ParamLayout, Params};
use super::{join_master, split_master, DBuf, Gpu};
use crate::config::LlamaConfig;
use crate::data::{LogpPlan, PairBatch};
use crate::dpo::{target_grads, LossConfig, PairLogps};
use crate::engine::profile::{Category, Profile};
use crate::engine::{check_inputs, AdamState, AdamWConfig, Engine};
use crate::error::{Error, Result};
use crate::weights::LlamaWeights;

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

/// The 16-bit remainder that, joined with the bf16 working copy `wbf`, gives the exact
/// fp32 master weights (kernels/adamw.cu). A forward-only engine reads `wbf` alone and
/// keeps the remainder off the device until the first training step.
enum Remainder {
    /// Zero: the weights last set are bf16 values (a bf16 checkpoint's, the frozen
    /// reference's), so `wbf` is the master; nothing more is held.
    Zero,
    /// A forward-only engine's remainder of the weights last set, in host memory.
    Host(Vec<u16>),
    /// On the device, from the first training step on (`ensure_grad`); `adamw_step`
    /// updates it with `wbf`.
    Device(DBuf<u16>),
}

impl Remainder {
    fn on_device(&self) -> bool {
        matches!(self, Remainder::Device(_))
    }
}

pub struct CudaEngine {
    cfg: LlamaConfig,
    gpu: Gpu,
    /// Where each tensor lies in the flat buffers (`wbf`, the remainder, `grad`, `moments`).
    layout: ParamLayout,
    /// The fp32 master weights, as two halves: `wbf`, the bf16 working copy the GEMMs
    /// read (each master rounded), and `remainder`, the 16 bits that make it exact: 4
    /// bytes per parameter, not 6 for an fp32 master and a bf16 copy. A forward-only
    /// engine (reference, eval, scoring) holds `wbf` alone on the device, 2 bytes per
    /// parameter: its forwards read nothing else.
    wbf: DBuf<Bf16>,
    remainder: Remainder,
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
            remainder: Remainder::Zero,
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

    /// The gradient buffer (`ensure_grad` allocated it).
    fn grad(&self) -> &DBuf<f32> {
        self.grad.as_ref().expect("ensure_grad ran before any gradient use")
    }

    /// The named views of the gradient buffer (`ensure_grad` allocated it).
    fn dw(&self) -> &Params<DPtr<f32>> {
        self.dw.as_ref().expect("ensure_grad ran before any gradient use")
    }

    /// Makes the engine trainable: the gradients, and the weights' remainder on the device
    /// (a forward-only engine holds the bf16 copy alone).
    fn ensure_grad(&mut self) -> Result<()> {
        if !self.remainder.on_device() {
            let lo = self.gpu.alloc::<u16>(self.layout.total)?;
            if let Remainder::Host(host) = &self.remainder {
                self.gpu.write(self.gpu.ptr(&lo), host)?;
            }
            self.remainder = Remainder::Device(lo);
            self.note_memory();
        }
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
        self.acts = Some(Acts::new(Alloc::On(&self.gpu), &self.cfg, cap, train)?);
        self.note_memory();
        Ok(())
    }

    /// Fails with what to change when the buffers a micro-batch of `n` tokens and `rows`
    /// head rows needs (beyond those already held, which a regrowth frees first) do not fit
    /// in the device's free memory; the simulator has no limit.
    fn check_room(&self, n: usize, rows: usize, train: bool) -> Result<()> {
        let (cap, head_rows) = (self.acts.as_ref().map_or(0, |a| a.cap), self.head.as_ref().map_or(0, |h| h.rows));
        let shared = self.shared.as_ref().map_or(0, |s| s.bytes() as u64);
        let trained = self.acts.as_ref().is_some_and(|a| a.training());
        // What is held now (as planned for the kind of pass it was made for; a regrowth
        // frees it first), and what this pass holds, with the gradients (this step) and
        // moments (the first update) that training adds if not allocated yet.
        let now = plan(&self.cfg, self.layout.total, cap, head_rows, trained);
        let held = now.saved_activations + now.scratch + now.head + shared;
        let (n, rows, train) = (n.max(cap), rows.max(head_rows), train || trained);
        let after = plan(&self.cfg, self.layout.total, n, rows, train);
        let missing = |absent: bool, bytes: u64| if train && absent { bytes } else { 0 };
        // The master's 16-bit remainder, allocated with the gradients.
        let remainder = (self.layout.total * std::mem::size_of::<u16>()) as u64;
        let pending = missing(!self.remainder.on_device(), remainder)
            + missing(self.grad.is_none(), after.grads)
            + missing(self.moments.is_none(), after.moments);
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
        self.head = Some(Head::new(Alloc::On(&self.gpu), &self.cfg, rows, self.head_chunk.min(rows))?);
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
        self.shared = Some(Shared::new(Alloc::On(&self.gpu), &self.cfg, rows, cap)?);
        self.note_memory();
        Ok(())
    }

    fn upload_batch(&self, batch: &PairBatch) -> Result<BatchDev> {
        let g = &self.gpu;
        let plan = LogpPlan::new(&batch.targets);
        Ok(BatchDev {
            tokens: g.upload(&batch.tokens)?,
            positions: g.upload(&batch.positions)?,
            group: g.upload(&batch.group)?,
            branch: g.upload(&batch.branch)?,
            group_start: g.upload(&batch.group_start)?,
            rows: g.upload(&plan.rows)?,
            targets: g.upload(&plan.row_tokens())?,
            row_logp: g.alloc::<f32>(2 * plan.rows.len())?,
            plan,
        })
    }

    fn dims(&self, n: usize) -> AttnDims {
        let c = &self.cfg;
        let qkvd = qkv_dim(c);
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
        let work = match a.work {
            Some(w) => w,
            None => self.shared.as_ref().expect("allocated above").work(&cfg)?,
        };
        let (x, xn, act) = (work.x.slice(0, n * h)?, work.xn, work.act);
        // What only the backward reads (the norms' x̂) is written in training only.
        let keep = |p: DPtr<Bf16>| if train { p } else { null() };
        let (layers, rstd_f, xf, xhat_f) = (a.layers.clone(), a.fin.rstd_f, a.fin.xf, a.fin.xhat_f);
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
        let xf = self.acts.as_ref().expect("allocated in forward").fin.xf;
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
        Ok(b.plan.to_targets(&row_logp))
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
        let xhat_f = a.fin.xhat_f.slice(0, n * h)?; // a training forward made a training set
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
        let rstd_f = a.fin.rstd_f;

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
        g.k.embedding_backward(dxf, dxr, g.ptr(&b.rows), h, None)?; // scatter back to the rows
        drop(head);
        let g = &self.gpu;
        let (gnorm, wnorm) = (self.dw().final_norm, self.w.final_norm);
        // dx16: the last layer's MLP input gradient, for its GEMMs.
        g.k.rmsnorm_backward_from_xhat(dx, dx16, gnorm, dxf, xhat_f, wnorm, rstd_f, n, h, false)?;

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
            self.gpu.k.rmsnorm_forward_from_xhat(xn, xhat2, lw.mlp_norm, n, h)?; // this layer's xn2 again
            let gm = &mut self.gpu.gemm;
            // [dWg; dWu] += [dgate | dup]ᵀ·xn2, into the adjacent gradients.
            gm.gemm_f32(lg.w_gate_up, dgu, xn, &GemmShape::new(2 * i, h, n, true, false), 1.0, 1.0)?;
            let k = &self.gpu.k;
            k.rmsnorm_backward_from_xhat(dx, dx16, lg.mlp_norm, dxn, xhat2, lw.mlp_norm, la.rstd2, n, h, true)?;

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
            k.copy_strided_f32_bf16(dv16, dv32, pos, zero, n, cfg.n_kv_heads, cfg.head_dim, qkvd, qkvd)?;
            let gm = &mut self.gpu.gemm;
            gm.gemm_f32(dxn, dqkv16, lw.wqkv, &GemmShape::new(n, h, qkvd, false, false), 1.0, 0.0)?;
            let xhat1 = la.xhat1.slice(0, n * h)?;
            self.gpu.k.rmsnorm_forward_from_xhat(xn, xhat1, lw.attn_norm, n, h)?; // this layer's xn1 again
            self.gpu.gemm.gemm_f32(lg.wqkv, dqkv16, xn, &GemmShape::new(qkvd, h, n, true, false), 1.0, 1.0)?;
            // dx16 for the next (lower) layer's MLP; layer 0's dx goes to the f32 embedding
            // backward only.
            let dx16_next = if l > 0 { dx16 } else { null() };
            let k = &self.gpu.k;
            k.rmsnorm_backward_from_xhat(dx, dx16_next, lg.attn_norm, dxn, xhat1, lw.attn_norm, la.rstd1, n, h, true)?;
        }
        let g = &self.gpu;
        g.k.embedding_backward(self.dw().embed, dx, g.ptr(&b.tokens), h, self.cfg.pad_token_id)?;
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
        self.backward(&b, n, &b.plan.to_rows(&dlogp, 0.0))?;
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
        let Remainder::Device(lo) = &self.remainder else {
            unreachable!("ensure_grad moved the remainder to the device")
        };
        let (hp, lp, gp) = (self.gpu.ptr(&self.wbf), self.gpu.ptr(lo), self.gpu.ptr(self.grad()));
        // Runs of adjacent tensors with the same weight decay go in one launch (padding
        // between tensors is zero in every buffer and stays zero).
        let tensors = &self.layout.tensors;
        let wd_of = |i: usize| opt.decay_of(&tensors[i].0);
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
            self.gpu.k.adamw_step(
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
        // adamw_step zeroed the gradients it read; the padding between tensors is zero.
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

    /// The fp32 master weights; on a forward-only engine, the weights last set: the bf16
    /// copy widened when they were bf16 values (the frozen reference's case), joined with
    /// the remainder kept in host memory otherwise.
    fn weights(&self) -> Result<LlamaWeights> {
        let hi = self.gpu.download(self.gpu.ptr(&self.wbf))?;
        let lo = match &self.remainder {
            Remainder::Device(lo) => self.gpu.download(self.gpu.ptr(lo))?,
            Remainder::Host(lo) => lo.clone(),
            Remainder::Zero => vec![0; hi.len()],
        };
        Ok(self.unflatten(&join_master(&hi, &lo)))
    }

    fn set_weights(&mut self, w: &LlamaWeights) -> Result<()> {
        let (hi, lo) = split_master(&self.flatten(w, "set_weights")?);
        self.gpu.write(self.gpu.ptr(&self.wbf), &hi)?;
        match &self.remainder {
            Remainder::Device(dev) => self.gpu.write(self.gpu.ptr(dev), &lo)?,
            _ if lo.iter().any(|&r| r != 0) => self.remainder = Remainder::Host(lo),
            _ => self.remainder = Remainder::Zero,
        }
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
