//! What the CUDA engine allocates, by part (`MemoryPlan`), and whether a micro-batch fits
//! in the device's free memory (`room_error`).

use std::mem::size_of;

use super::buffers::{Acts, Alloc, Head, Shared};
use super::gb;
use super::kernels::Bf16;
use super::params::ParamLayout;
use crate::config::LlamaConfig;

/// Width of a layer's fused q|k|v projection.
pub fn qkv_dim(cfg: &LlamaConfig) -> usize {
    cfg.q_dim() + 2 * cfg.kv_dim()
}

/// Rows per LM-head logits chunk: about 64M fp32 logits (256 MB) at a time, in whole
/// 64-row tiles of the GEMM: 512 rows at a 128K vocabulary, where each chunk's GEMM does
/// ~340 FLOPs per byte it moves (the bf16 head weight read, the f32 logits written; an
/// H200 is compute-bound above ~206 (989 TFLOP/s over 4.8 TB/s), where 256-row chunks sat).
pub fn head_chunk_rows(vocab: usize) -> usize {
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
    /// The weights: for training the fp32 master (bf16 working copy + 16-bit remainder, 4
    /// bytes per parameter), forward only the bf16 copy alone (2 bytes per parameter).
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

/// The memory plan of a model of `cfg` (see `MemoryPlan`); `train` adds the weights'
/// remainder, the gradients, the moments, every layer's activations, the softmax and the
/// backward's buffers, which forward-only use (reference log-probs, eval, scoring) does not
/// allocate.
pub fn memory_plan(cfg: &LlamaConfig, tokens: usize, head_rows: usize, train: bool) -> MemoryPlan {
    plan(cfg, ParamLayout::total_of(cfg), tokens, head_rows, train)
}

/// `memory_plan` for `params` elements of flat parameter buffers.
pub fn plan(cfg: &LlamaConfig, params: usize, tokens: usize, head_rows: usize, train: bool) -> MemoryPlan {
    let cap = tokens.next_multiple_of(64);
    let chunk = head_chunk_rows(cfg.vocab_size).min(head_rows);
    let t = |x: usize| if train { x } else { 0 };
    // The buffers' constructors, counting what they would allocate.
    let counted = "counting allocates nothing, so cannot fail";
    let acts = Acts::new(Alloc::Count, cfg, cap, train).expect(counted);
    let head = Head::new(Alloc::Count, cfg, head_rows, chunk).expect(counted);
    let shared = || Shared::new(Alloc::Count, cfg, head_rows, cap).expect(counted).bytes();
    let (f32b, b) = (size_of::<f32>(), |x: usize| x as u64);
    MemoryPlan {
        weights: b(params * size_of::<Bf16>() * if train { 2 } else { 1 }),
        grads: b(t(params * f32b)),
        moments: b(t(params * 2 * f32b)),
        saved_activations: b(acts.saved_bytes()),
        scratch: b(acts.scratch_bytes()),
        head: b(head.bytes()),
        softmax_or_backward: b(if train { shared() } else { 0 }),
    }
}

/// The part of a plan that grows with the micro-batch.
pub fn batch_bytes(p: &MemoryPlan) -> u64 {
    p.saved_activations + p.scratch + p.head + p.softmax_or_backward
}

/// Why a micro-batch of `n` tokens and `rows` head rows does not fit in `available`
/// bytes (`None`: it does), and the most tokens (in 64s) that would, at the same share of
/// head rows.
pub fn room_error(cfg: &LlamaConfig, n: usize, rows: usize, train: bool, available: u64) -> Option<String> {
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
}
