//! The batcher: which pairs go into which optimiser step, and how each step's pairs are
//! packed into micro-batches that fit a token budget.
//!
//! One epoch over a chunk is a seeded shuffle of its pairs, cut into global batches of
//! `batch_pairs` consecutive pairs (the last one may be smaller, as a PyTorch DataLoader
//! without `drop_last`). A global batch is one optimiser step. Its pairs are sorted by
//! length and packed greedily into micro-batches of at most `micro_batch_tokens` tokens,
//! so pairs of similar length share a micro-batch. Every micro-batch is trained with
//! `loss_scale = 1 / pairs in the global batch`, and gradients accumulate until the
//! optimiser step: the update is that of the mean loss over the global batch, exactly as
//! if it were one batch (up to the order of floating-point sums).
//!
//! The plan is a pure function of (lengths, config, epoch): resuming at (epoch, global
//! batch index) needs no saved generator state.

use crate::error::{Error, Result};
use crate::weights::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatcherConfig {
    /// Pairs per optimiser step.
    pub batch_pairs: usize,
    /// Token budget of one micro-batch (in the layout's length, see `PairBatch`).
    pub micro_batch_tokens: usize,
    pub seed: u64,
    /// Shuffle the pairs every epoch (true for training); false keeps the given order.
    pub shuffle: bool,
}

/// One optimiser step's pairs, as micro-batches of indices into the chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalBatch {
    pub micro: Vec<Vec<usize>>,
}

impl GlobalBatch {
    pub fn n_pairs(&self) -> usize {
        self.micro.iter().map(Vec::len).sum()
    }

    /// The factor each micro-batch's summed loss gets, so the step's loss is the mean
    /// over the global batch.
    pub fn loss_scale(&self) -> f64 {
        1.0 / self.n_pairs() as f64
    }
}

/// Optimiser steps in one epoch over `n_pairs` pairs.
pub fn batches_per_epoch(n_pairs: usize, batch_pairs: usize) -> usize {
    n_pairs.div_ceil(batch_pairs.max(1))
}

/// A generator for `(seed, stream)`: streams (epochs, sDPO steps) get unrelated sequences.
pub fn rng_for(seed: u64, stream: u64) -> SplitMix64 {
    let mut mix = SplitMix64(seed ^ stream.wrapping_mul(0xD1B54A32D192ED03));
    SplitMix64(mix.next_u64())
}

/// Fisher–Yates shuffle with a `SplitMix64`; the same seed gives the same order everywhere.
pub fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        // Multiply-shift keeps the draw unbiased enough for any realistic length.
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

/// The global batches of one epoch over pairs of the given lengths (`lengths[i]` = tokens
/// pair i occupies in the batch layout).
pub fn epoch_plan(lengths: &[usize], cfg: &BatcherConfig, epoch: usize) -> Result<Vec<GlobalBatch>> {
    if cfg.batch_pairs == 0 || cfg.micro_batch_tokens == 0 {
        return Err(Error::invalid("batch_pairs and micro_batch_tokens must be at least 1"));
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if cfg.shuffle {
        shuffle(&mut order, &mut rng_for(cfg.seed, epoch as u64));
    }
    Ok(order.chunks(cfg.batch_pairs).map(|pairs| pack(pairs, lengths, cfg.micro_batch_tokens)).collect())
}

/// Packs one global batch's pairs into micro-batches, longest first. A pair longer than
/// the budget gets a micro-batch of its own: it cannot be split, and refusing it would
/// make one long example fail a whole run.
pub fn pack(pairs: &[usize], lengths: &[usize], budget: usize) -> GlobalBatch {
    let mut sorted = pairs.to_vec();
    sorted.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut micro: Vec<Vec<usize>> = Vec::new();
    let mut tokens = 0;
    for i in sorted {
        match micro.last_mut() {
            Some(last) if tokens + lengths[i] <= budget => {
                last.push(i);
                tokens += lengths[i];
            }
            _ => {
                micro.push(vec![i]);
                tokens = lengths[i];
            }
        }
    }
    GlobalBatch { micro }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(batch_pairs: usize, budget: usize, seed: u64) -> BatcherConfig {
        BatcherConfig { batch_pairs, micro_batch_tokens: budget, seed, shuffle: true }
    }

    #[test]
    fn every_pair_once_per_epoch_under_budget() {
        let lengths: Vec<usize> = (0..103).map(|i| 5 + (i * 37) % 50).collect();
        let plan = epoch_plan(&lengths, &cfg(16, 120, 7), 0).unwrap();
        assert_eq!(plan.len(), batches_per_epoch(103, 16));
        assert_eq!(plan.len(), 7);
        let mut seen: Vec<usize> = plan.iter().flat_map(|b| b.micro.iter().flatten().copied()).collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        for (k, b) in plan.iter().enumerate() {
            assert_eq!(b.n_pairs(), if k < 6 { 16 } else { 103 - 96 });
            for m in &b.micro {
                assert!(m.iter().map(|&i| lengths[i]).sum::<usize>() <= 120);
            }
        }
        // loss scales of a full batch add up to one mean over its pairs
        assert_eq!(plan[0].loss_scale(), 1.0 / 16.0);
    }

    #[test]
    fn deterministic_and_epochs_differ() {
        let lengths = vec![10; 64];
        let a = epoch_plan(&lengths, &cfg(8, 40, 3), 1).unwrap();
        assert_eq!(a, epoch_plan(&lengths, &cfg(8, 40, 3), 1).unwrap());
        assert_ne!(a, epoch_plan(&lengths, &cfg(8, 40, 3), 2).unwrap());
        assert_ne!(a, epoch_plan(&lengths, &cfg(8, 40, 4), 1).unwrap());
    }

    #[test]
    fn similar_lengths_share_micro_batches_and_long_pairs_stand_alone() {
        let lengths = vec![3, 50, 4, 49, 200, 5];
        let b = pack(&[0, 1, 2, 3, 4, 5], &lengths, 100);
        assert_eq!(b.micro, vec![vec![4], vec![1, 3], vec![5, 2, 0]]);
    }

    #[test]
    fn unshuffled_keeps_order() {
        let plan = epoch_plan(&[1, 1, 1, 1, 1], &BatcherConfig { shuffle: false, ..cfg(2, 10, 0) }, 0).unwrap();
        let order: Vec<Vec<usize>> = plan.iter().map(|b| b.micro.concat()).collect();
        assert_eq!(order, vec![vec![0, 1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn shuffle_is_a_permutation_and_roughly_uniform() {
        // Position of element 0 over many seeds: each of 4 slots should get ~1/4.
        let mut counts = [0usize; 4];
        for s in 0..4000 {
            let mut v = [0, 1, 2, 3];
            shuffle(&mut v, &mut rng_for(s, 0));
            counts[v.iter().position(|&x| x == 0).unwrap()] += 1;
        }
        // 1000 expected per slot; binomial std ≈ 27, so ±150 is > 5 sigma.
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }
}
