//! Where a step's time goes: wall time per category of op, for `sdpo-run bench`.
//!
//! The CPU engine's ops (`engine/cpu/ops.rs`) open a `scope(Category)` at their top. While
//! profiling is enabled, the outermost scope on the calling thread adds its duration to a
//! process-wide counter; nested scopes count nothing, so the LM head's GEMM is counted
//! once, under `LmHead`, not again under `Gemm`. Ops run their threads inside (rayon), so
//! the wall time of the calling thread is the op's time. Disabled, a scope costs one
//! relaxed atomic load.
//!
//! The counters are global (one per process): profile one engine at a time. The CUDA
//! engine, whose kernels run asynchronously, does not use them: it cuts its stream into
//! sections with CUDA events, reads them after each step synchronises, and reports
//! through the same `Profile` struct (wall-clock sections on the kernel simulator; see
//! `engine/cuda/profile.rs`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The categories of `Profile`, one per op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// Causal attention under the pair mask, forward and backward.
    Attention,
    /// The linear layers (q, k, v, o, gate, up, down), forward and backward.
    Gemm,
    /// LM head + log-softmax + gather over the target rows (its GEMMs included).
    LmHead,
    /// RMSNorm, RoPE, SwiGLU, embedding gather / scatter-add.
    NormElementwise,
    /// Gradient norm, clipping, AdamW.
    Optimizer,
}

const N_CATEGORIES: usize = 5;

impl Category {
    pub const ALL: [Category; N_CATEGORIES] =
        [Category::Attention, Category::Gemm, Category::LmHead, Category::NormElementwise, Category::Optimizer];

    pub fn name(self) -> &'static str {
        match self {
            Category::Attention => "attention",
            Category::Gemm => "gemm",
            Category::LmHead => "lm_head_logprobs",
            Category::NormElementwise => "norm_elementwise",
            Category::Optimizer => "optimizer",
        }
    }
}

/// Seconds spent per category since profiling was last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Profile {
    pub attention_s: f64,
    pub gemm_s: f64,
    pub lm_head_logprobs_s: f64,
    pub norm_elementwise_s: f64,
    pub optimizer_s: f64,
}

impl Profile {
    pub fn get(&self, c: Category) -> f64 {
        match c {
            Category::Attention => self.attention_s,
            Category::Gemm => self.gemm_s,
            Category::LmHead => self.lm_head_logprobs_s,
            Category::NormElementwise => self.norm_elementwise_s,
            Category::Optimizer => self.optimizer_s,
        }
    }

    fn slot(&mut self, c: Category) -> &mut f64 {
        match c {
            Category::Attention => &mut self.attention_s,
            Category::Gemm => &mut self.gemm_s,
            Category::LmHead => &mut self.lm_head_logprobs_s,
            Category::NormElementwise => &mut self.norm_elementwise_s,
            Category::Optimizer => &mut self.optimizer_s,
        }
    }

    /// Sum over the categories.
    pub fn total_s(&self) -> f64 {
        Category::ALL.iter().map(|&c| self.get(c)).sum()
    }
}

// --- the process-wide collector used by the CPU ops

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; N_CATEGORIES] = [const { AtomicU64::new(0) }; N_CATEGORIES];

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Turns collection on or off; either way the counters start again from zero.
pub fn enable(on: bool) {
    reset();
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn reset() {
    NANOS.iter().for_each(|n| n.store(0, Ordering::Relaxed));
}

/// The time collected so far (since `enable` or `reset`).
pub fn collected() -> Profile {
    let mut p = Profile::default();
    for (i, &c) in Category::ALL.iter().enumerate() {
        *p.slot(c) = Duration::from_nanos(NANOS[i].load(Ordering::Relaxed)).as_secs_f64();
    }
    p
}

/// Times the enclosing op until the guard drops (see the module comment).
#[must_use = "the scope times until it is dropped: bind it with `let _p = ...`"]
pub struct Scope {
    start: Option<(Instant, Category)>,
}

#[inline]
pub fn scope(c: Category) -> Scope {
    if !ENABLED.load(Ordering::Relaxed) || INSIDE.with(|i| i.replace(true)) {
        return Scope { start: None };
    }
    Scope { start: Some((Instant::now(), c)) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((t0, c)) = self.start {
            let i = Category::ALL.iter().position(|&x| x == c).unwrap();
            NANOS[i].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            INSIDE.with(|i| i.set(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nested scopes count nothing (only the outermost times); nothing is timed while
    /// disabled. The counters are global and other tests' ops may add to them while this
    /// one has them enabled, so only lower bounds are checked on the sums (`sleep` lasts
    /// at least what it is asked); the structure is checked on the guards themselves.
    #[test]
    fn nested_scopes_count_once() {
        enable(false);
        assert!(scope(Category::Gemm).start.is_none());
        enable(true);
        {
            let outer = scope(Category::LmHead);
            assert!(outer.start.is_some());
            std::thread::sleep(Duration::from_millis(20));
            let inner = scope(Category::Gemm);
            assert!(inner.start.is_none(), "a nested scope must not time");
        }
        {
            let p = scope(Category::Optimizer);
            assert!(p.start.is_some(), "the outer scope's drop must clear the nesting flag");
            std::thread::sleep(Duration::from_millis(10));
        }
        let p = collected();
        enable(false);
        assert!(p.lm_head_logprobs_s >= 0.020, "{p:?}");
        assert!(p.optimizer_s >= 0.010, "{p:?}");
        assert!(p.total_s() >= p.lm_head_logprobs_s + p.optimizer_s);
    }
}
