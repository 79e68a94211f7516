//! The engine's device buffers beside the parameters: the activations a training forward
//! keeps for the backward (`Acts`), the LM head's (`Head`), and the memory that a training
//! step's three phases use in turn (`Shared`); what each takes is `memory.rs`'s plan.

use super::kernels::{null, Bf16, DPtr};
use super::memory::{back_bytes, qkv_dim, shared_bytes};
use super::{DBuf, Gpu};
use crate::config::LlamaConfig;
use crate::error::Result;

/// Owns device allocations; the engine addresses them through `DPtr` views.
#[derive(Default)]
pub struct Pool {
    pub f32s: Vec<DBuf<f32>>,
    pub u16s: Vec<DBuf<u16>>,
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
pub struct LayerActs {
    pub rstd1: DPtr<f32>,
    pub qkv: DPtr<Bf16>,
    pub att: DPtr<Bf16>,
    pub lse: DPtr<f32>,
    /// The two norms' inputs normalized, x·rstd (bf16), for their backward (null in the
    /// forward-only set).
    pub xhat1: DPtr<Bf16>,
    pub xhat2: DPtr<Bf16>,
    pub rstd2: DPtr<f32>,
    /// [gate | up] `[cap, 2·intermediate]`: the fused GEMM's output, swiglu's input.
    pub gu: DPtr<Bf16>,
}

/// Activations for up to `cap` tokens: every layer's after a training forward, one
/// layer's set for forward-only use (reference log-probs, eval, scoring), where each
/// layer's activations die with it.
pub struct Acts {
    pub cap: usize,
    pub layers: Vec<LayerActs>,
    pub rstd_f: DPtr<f32>,
    pub xf: DPtr<Bf16>,
    pub role: Role,
    _pool: Pool,
}

pub enum Role {
    /// A forward-only set owns its working buffers.
    Forward(Work),
    /// A training set keeps the final norm's x̂ for the backward, and takes its working
    /// buffers from `Shared`.
    Train { xhat_f: DPtr<Bf16> },
}

/// The working buffers of the layer at hand (for `cap` tokens).
#[derive(Clone, Copy)]
pub struct Work {
    /// The residual stream (f32), which the attention and MLP output GEMMs add into in
    /// place. The backward does not read it: the norms keep x̂ (bf16) and rstd instead.
    pub x: DPtr<f32>,
    /// rmsnorm(x) of the norm at hand (bf16): the forward writes it for the GEMMs after
    /// the norm, the backward writes it again from x̂ (rmsnorm_apply) for their weight
    /// gradients, instead of keeping two per layer.
    pub xn: DPtr<Bf16>,
    /// silu(gate)·up of the layer at hand: the forward writes it, the backward writes it
    /// again (swiglu_backward) instead of keeping one per layer.
    pub act: DPtr<Bf16>,
}

impl Acts {
    /// Activations for `cap` tokens (a multiple of 64); `train`: every layer's, with the
    /// norms' x̂.
    pub fn new(g: &Gpu, cfg: &LlamaConfig, cap: usize, train: bool) -> Result<Self> {
        let (h, i, qd, nh) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.n_heads);
        let qkvd = qkv_dim(cfg);
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
        Ok(Acts { cap, layers, rstd_f: p.f32(g, cap)?, xf: p.bf16(g, cap * h)?, role, _pool: p })
    }

    pub fn training(&self) -> bool {
        matches!(self.role, Role::Train { .. })
    }
}

/// The layers' backward buffers for `cap` tokens, views into `Shared`.
#[derive(Clone, Copy)]
pub struct BackActs {
    pub dx: DPtr<f32>,
    pub dx16: DPtr<Bf16>,
    pub dxn: DPtr<f32>,
    pub dxf: DPtr<f32>,
    pub dact: DPtr<Bf16>,
    /// [dgate | dup], the layout of `gu`.
    pub dgu: DPtr<Bf16>,
    pub datt: DPtr<Bf16>,
    pub delta: DPtr<f32>,
    pub dqkv32: DPtr<f32>,
    pub dqkv16: DPtr<Bf16>,
}

/// LM-head buffers for up to `rows` rows (grow-only): the rows gathered from xf, and one
/// chunk's fp32 logits.
pub struct Head {
    pub rows: usize,
    pub chunk: usize,
    /// `[rows, h]`: the gather's f32 output in forward, dlogits·W in backward.
    pub xr32: DPtr<f32>,
    pub xr16: DPtr<Bf16>,
    pub logits: DPtr<f32>,
    _pool: Pool,
}

impl Head {
    /// For `rows` head rows, `chunk` of them per logits chunk.
    pub fn new(g: &Gpu, cfg: &LlamaConfig, rows: usize, chunk: usize) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut p = Pool::default();
        Ok(Head {
            rows,
            chunk,
            xr32: p.f32(g, rows * h)?,
            xr16: p.bf16(g, rows * h)?,
            logits: p.f32(g, chunk * v)?,
            _pool: p,
        })
    }
}

/// Training only (grow-only): memory that three phases of a training step use in turn.
/// The layers' forward: `Work` (x from the start, xn and act after the backward's
/// buffers). The LM head: every row's softmax (bf16 `[rows, V]`, from the start), turned
/// into dlogits in place by the backward. The layers' backward, once the head's two GEMMs
/// have read dlogits: `BackActs` from the start, and xn and act again. Each phase's
/// buffers are dead in the others (one stream, in order), so it takes the largest phase,
/// not their sum. Its token capacity `cap` is the activations'.
pub struct Shared {
    pub rows: usize,
    pub cap: usize,
    pub mem: DPtr<u16>,
    _pool: Pool,
}

impl Shared {
    /// For `rows` head rows and `cap` tokens.
    pub fn new(g: &Gpu, cfg: &LlamaConfig, rows: usize, cap: usize) -> Result<Self> {
        let mut pool = Pool::default();
        let mem = pool.bf16(g, shared_bytes(cfg, rows, cap) / 2)?;
        Ok(Shared { rows, cap, mem, _pool: pool })
    }

    /// The softmax of `rows` rows of `vocab`.
    pub fn probs(&self, rows: usize, vocab: usize) -> Result<DPtr<Bf16>> {
        self.mem.cast(0, rows * vocab)
    }

    /// The working buffers of a training set: x from the start (over the backward's
    /// buffers, which are dead while it lives), xn and act after the backward's buffers.
    pub fn work(&self, cfg: &LlamaConfig) -> Result<Work> {
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
    pub fn back(&self, cfg: &LlamaConfig) -> Result<BackActs> {
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
