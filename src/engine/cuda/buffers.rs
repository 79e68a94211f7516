//! The engine's device buffers beside the parameters: the activations a training forward
//! keeps for the backward (`Acts`), the LM head's (`Head`), and the memory that a training
//! step's three phases use in turn (`Shared`).
//!
//! Each set of per-token buffers is declared once (`token_buffers!`): its fields, their
//! element types and elements per token. The allocation and the placement in shared
//! memory come from that one declaration, and the bytes that `memory.rs` plans from the
//! same constructors run with `Alloc::Count`, which counts what they would allocate.

use std::mem::size_of;

use super::kernels::{null, Bf16, DPtr};
use super::memory::qkv_dim;
use super::{DBuf, Gpu};
use crate::config::LlamaConfig;
use crate::error::Result;

/// The sizes the buffer tables are written in, and whether the buffers are for training.
struct Dims {
    hidden: usize,
    inter: usize,
    q_dim: usize,
    qkv_dim: usize,
    n_heads: usize,
    train: bool,
}

impl Dims {
    fn new(cfg: &LlamaConfig, train: bool) -> Self {
        let (hidden, inter, q_dim, n_heads) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.n_heads);
        Dims { hidden, inter, q_dim, qkv_dim: qkv_dim(cfg), n_heads, train }
    }

    /// `n` for training, 0 (a null view, nothing allocated) for forward-only use.
    fn train_only(&self, n: usize) -> usize {
        if self.train {
            n
        } else {
            0
        }
    }
}

/// Where the buffers come from.
#[derive(Clone, Copy)]
pub enum Alloc<'a> {
    /// This device (or the simulator).
    On(&'a Gpu),
    /// Nowhere: every view is null and the pools count the bytes (`memory_plan`).
    Count,
}

/// Owns device allocations, which the engine addresses through `DPtr` views, and counts
/// their bytes.
#[derive(Default)]
struct Pool {
    f32s: Vec<DBuf<f32>>,
    u16s: Vec<DBuf<u16>>,
    bytes: usize,
}

/// An element type of the buffer tables.
trait Elem: Sized {
    fn alloc(pool: &mut Pool, gpu: &Gpu, len: usize) -> Result<DPtr<Self>>;
}

impl Elem for f32 {
    fn alloc(pool: &mut Pool, gpu: &Gpu, len: usize) -> Result<DPtr<f32>> {
        let s = gpu.alloc::<f32>(len)?;
        let p = gpu.ptr(&s).slice(0, len)?;
        pool.f32s.push(s);
        Ok(p)
    }
}

impl Elem for Bf16 {
    fn alloc(pool: &mut Pool, gpu: &Gpu, len: usize) -> Result<DPtr<Bf16>> {
        let s = gpu.alloc::<u16>(len)?;
        let p = gpu.ptr(&s).slice(0, len)?;
        pool.u16s.push(s);
        Ok(p)
    }
}

impl Pool {
    /// `len` elements of `T`; none (a null view) for 0 or `Alloc::Count`.
    fn take<T: Elem>(&mut self, on: Alloc, len: usize) -> Result<DPtr<T>> {
        self.bytes += len * size_of::<T>();
        match on {
            Alloc::On(gpu) if len > 0 => T::alloc(self, gpu, len),
            _ => Ok(null()),
        }
    }
}

/// A struct of buffers of `cap` tokens each, from one table: `field: type = |d| elements
/// per token` (`d`: `Dims`). It gives `bytes_per_token`, `alloc` (one allocation each,
/// in table order, from a pool) and `place` (one after another in shared memory, in table
/// order).
macro_rules! token_buffers {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty = |$d:ident| $per_token:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy)]
        pub struct $name {
            $($(#[$fm])* pub $field: DPtr<$ty>,)*
        }

        impl $name {
            /// Bytes per token.
            #[allow(dead_code)]
            fn bytes_per_token(d: &Dims) -> usize {
                0 $(+ { #[allow(unused_variables)] let $d = d; $per_token } * size_of::<$ty>())*
            }

            /// Each buffer its own allocation (a null view where it has no elements).
            #[allow(dead_code)]
            fn alloc(pool: &mut Pool, on: Alloc, d: &Dims, cap: usize) -> Result<Self> {
                Ok($name { $($field: pool.take::<$ty>(on, cap * { #[allow(unused_variables)] let $d = d; $per_token })?,)* })
            }

            /// The buffers one after another in `mem` from byte `*at`, which moves past them.
            #[allow(dead_code)]
            fn place(mem: DPtr<u16>, at: &mut usize, d: &Dims, cap: usize) -> Result<Self> {
                Ok($name {
                    $($field: {
                        let len = cap * { #[allow(unused_variables)] let $d = d; $per_token };
                        let p = mem.cast(*at / 2, len)?;
                        *at += len * size_of::<$ty>();
                        p
                    },)*
                })
            }
        }
    };
}

token_buffers! {
    /// One layer's saved activations.
    LayerActs {
        rstd1: f32 = |d| 1,
        qkv: Bf16 = |d| d.qkv_dim,
        att: Bf16 = |d| d.q_dim,
        lse: f32 = |d| d.n_heads,
        /// The two norms' inputs normalized, x·rstd (bf16), for their backward (null in the
        /// forward-only set).
        xhat1: Bf16 = |d| d.train_only(d.hidden),
        xhat2: Bf16 = |d| d.train_only(d.hidden),
        rstd2: f32 = |d| 1,
        /// [gate | up] `[cap, 2·intermediate]`: the fused GEMM's output, swiglu's input.
        gu: Bf16 = |d| 2 * d.inter,
    }
}

token_buffers! {
    /// The final norm's: rstd, its output (the LM head's input) and, for training, x̂.
    FinalNorm {
        rstd_f: f32 = |d| 1,
        xf: Bf16 = |d| d.hidden,
        xhat_f: Bf16 = |d| d.train_only(d.hidden),
    }
}

token_buffers! {
    /// The working buffers of the layer at hand.
    Work {
        /// The residual stream (f32), which the attention and MLP output GEMMs add into in
        /// place. The backward does not read it: the norms keep x̂ (bf16) and rstd instead.
        x: f32 = |d| d.hidden,
        /// rmsnorm(x) of the norm at hand (bf16): the forward writes it for the GEMMs after
        /// the norm, the backward writes it again from x̂ (rmsnorm_forward_from_xhat) for their weight
        /// gradients, instead of keeping two per layer.
        xn: Bf16 = |d| d.hidden,
        /// silu(gate)·up of the layer at hand: the forward writes it, the backward writes
        /// it again (swiglu_backward) instead of keeping one per layer.
        act: Bf16 = |d| d.inter,
    }
}

token_buffers! {
    /// The layers' backward buffers, views into `Shared`.
    BackActs {
        dx: f32 = |d| d.hidden,
        dxn: f32 = |d| d.hidden,
        dxf: f32 = |d| d.hidden,
        delta: f32 = |d| d.n_heads,
        dqkv32: f32 = |d| d.qkv_dim,
        dx16: Bf16 = |d| d.hidden,
        dact: Bf16 = |d| d.inter,
        /// [dgate | dup], the layout of `gu`.
        dgu: Bf16 = |d| 2 * d.inter,
        datt: Bf16 = |d| d.q_dim,
        dqkv16: Bf16 = |d| d.qkv_dim,
    }
}

/// Activations for up to `cap` tokens: every layer's after a training forward, one
/// layer's set for forward-only use (reference log-probs, eval, scoring), where each
/// layer's activations die with it.
pub struct Acts {
    pub cap: usize,
    pub layers: Vec<LayerActs>,
    pub fin: FinalNorm,
    /// A forward-only set's working buffers; a training set takes them from `Shared`.
    pub work: Option<Work>,
    /// Owns `layers` (`MemoryPlan::saved_activations`).
    saved: Pool,
    /// Owns `work` and `fin` (`MemoryPlan::scratch`).
    scratch: Pool,
}

impl Acts {
    /// Activations for `cap` tokens (a multiple of 64); `train`: every layer's, with the
    /// norms' x̂.
    pub fn new(on: Alloc, cfg: &LlamaConfig, cap: usize, train: bool) -> Result<Self> {
        let d = Dims::new(cfg, train);
        let (mut saved, mut scratch) = (Pool::default(), Pool::default());
        let n_sets = if train { cfg.n_layers } else { 1 };
        let layers = (0..n_sets).map(|_| LayerActs::alloc(&mut saved, on, &d, cap)).collect::<Result<_>>()?;
        let work = if train { None } else { Some(Work::alloc(&mut scratch, on, &d, cap)?) };
        let fin = FinalNorm::alloc(&mut scratch, on, &d, cap)?;
        Ok(Acts { cap, layers, fin, work, saved, scratch })
    }

    pub fn training(&self) -> bool {
        self.work.is_none()
    }

    /// Bytes of the layers' activations (kept for the backward in training).
    pub fn saved_bytes(&self) -> usize {
        self.saved.bytes
    }

    /// Bytes of the final norm's buffers and, forward only, the working buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.bytes
    }
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
    pool: Pool,
}

impl Head {
    /// For `rows` head rows, `chunk` of them per logits chunk.
    pub fn new(on: Alloc, cfg: &LlamaConfig, rows: usize, chunk: usize) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut p = Pool::default();
        Ok(Head {
            rows,
            chunk,
            xr32: p.take(on, rows * h)?,
            xr16: p.take(on, rows * h)?,
            logits: p.take(on, chunk * v)?,
            pool: p,
        })
    }

    pub fn bytes(&self) -> usize {
        self.pool.bytes
    }
}

/// Training only (grow-only): memory that three phases of a training step use in turn.
/// The layers' forward: `Work`. The LM head: every row's softmax (bf16 `[rows, V]`, from
/// the start), turned into dlogits in place by the backward. The layers' backward, once
/// the head's two GEMMs have read dlogits: `BackActs` from the start, and `Work`'s xn and
/// act again. Each phase's buffers are dead in the others (one stream, in order), so it
/// takes the largest phase, not their sum. `Work` lies where xn and act follow the
/// backward's buffers and x (which the backward does not use) is the last of them. Its
/// token capacity `cap` is the activations'.
pub struct Shared {
    pub rows: usize,
    pub cap: usize,
    pub mem: DPtr<u16>,
    pool: Pool,
}

impl Shared {
    /// For `rows` head rows and `cap` tokens: the softmax, or the backward's buffers with
    /// `Work` ending after them, whichever is larger.
    pub fn new(on: Alloc, cfg: &LlamaConfig, rows: usize, cap: usize) -> Result<Self> {
        let d = Dims::new(cfg, true);
        let bytes =
            (rows * cfg.vocab_size * size_of::<Bf16>()).max(cap * (Self::work_at(&d) + Work::bytes_per_token(&d)));
        let mut pool = Pool::default();
        let mem = pool.take(on, bytes / size_of::<u16>())?;
        Ok(Shared { rows, cap, mem, pool })
    }

    pub fn bytes(&self) -> usize {
        self.pool.bytes
    }

    /// Bytes per token where `Work` starts: x ends where the backward's buffers end.
    fn work_at(d: &Dims) -> usize {
        BackActs::bytes_per_token(d) - size_of::<f32>() * d.hidden
    }

    /// The softmax of `rows` rows of `vocab`.
    pub fn probs(&self, rows: usize, vocab: usize) -> Result<DPtr<Bf16>> {
        self.mem.cast(0, rows * vocab)
    }

    /// The working buffers of a training set.
    pub fn work(&self, cfg: &LlamaConfig) -> Result<Work> {
        let d = Dims::new(cfg, true);
        Work::place(self.mem, &mut (Self::work_at(&d) * self.cap), &d, self.cap)
    }

    /// The backward's buffers, one after another from the start (each a whole number of
    /// 256-byte blocks at `cap`, a multiple of 64, so no padding between them).
    pub fn back(&self, cfg: &LlamaConfig) -> Result<BackActs> {
        BackActs::place(self.mem, &mut 0, &Dims::new(cfg, true), self.cap)
    }
}
