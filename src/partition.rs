//! Partitioning the preference data into sDPO's chunks D_1 … D_T, and the held-out eval split.
//!
//! Partitions (`--partition`):
//! - `sources`: each data source is one chunk, ordered by the initial model's reward
//!   accuracy on it, highest (easiest) first, as the paper orders OpenOrca before
//!   UltraFeedback. With M_0 as both target and reference every implicit reward is zero,
//!   so the paper's "reward accuracy of the initial model" is read as the share of the
//!   source's pairs with γ = log π_M0(chosen|x) − log π_M0(rejected|x) > 0 (ties broken by
//!   source name).
//! - `difficulty`: per pair, ranked by M_0's γ (per-token means with `--length-normalize`),
//!   easiest (largest γ) first, cut into T chunks of equal size (the first chunks get one
//!   more pair when T does not divide the count).
//! - `random`: a seeded shuffle, cut into T chunks.
//! - `in-order`: the pairs as given, cut into T chunks.

use serde::{Deserialize, Serialize};

use crate::data::batcher::{rng_for, shuffle};
use crate::data::PairExample;
use crate::dpo::PairLogps;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionKind {
    #[default]
    Sources,
    Difficulty,
    Random,
    InOrder,
}

impl PartitionKind {
    /// Whether this partition needs the initial model's log-probs of every pair.
    pub fn needs_scores(self) -> bool {
        matches!(self, PartitionKind::Sources | PartitionKind::Difficulty)
    }
}

/// One chunk: its pairs (indices into the data) and what M_0 thinks of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub name: String,
    pub pairs: Vec<usize>,
    /// Share of the chunk's pairs with γ_M0 > 0 (when scores were computed).
    pub accuracy: Option<f64>,
    /// Mean γ_M0 over the chunk (when scores were computed).
    pub mean_gamma: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    pub kind: PartitionKind,
    pub chunks: Vec<Chunk>,
    /// Per pair: the score it was ranked by (γ, or its per-token form), when computed.
    pub scores: Option<Vec<f64>>,
}

impl Partition {
    /// The chunk each pair belongs to (0-based), per pair.
    pub fn assignment(&self, n_pairs: usize) -> Vec<usize> {
        let mut a = vec![usize::MAX; n_pairs];
        for (c, chunk) in self.chunks.iter().enumerate() {
            for &i in &chunk.pairs {
                a[i] = c;
            }
        }
        a
    }
}

/// The score a pair is ranked by: γ, or with `length_normalize` the difference of
/// per-token mean log-probs.
pub fn pair_score(lp: &PairLogps, length_normalize: bool) -> f64 {
    if length_normalize {
        lp.chosen / lp.chosen_tokens.max(1) as f64 - lp.rejected / lp.rejected_tokens.max(1) as f64
    } else {
        lp.gamma()
    }
}

/// Splits `pairs` into chunks. `m0` holds the initial model's log-probs of every pair and
/// is required by `sources` and `difficulty`. `steps` is T; for `sources` it may be
/// `None` (T = number of sources) and otherwise must equal the number of sources.
pub fn partition(
    pairs: &[PairExample],
    kind: PartitionKind,
    steps: Option<usize>,
    seed: u64,
    m0: Option<&[PairLogps]>,
    length_normalize: bool,
) -> Result<Partition> {
    let n = pairs.len();
    if n == 0 {
        return Err(Error::invalid("no training pairs to partition"));
    }
    if let Some(m0) = m0 {
        if m0.len() != n {
            return Err(Error::invalid(format!("{} scores for {n} pairs", m0.len())));
        }
    }
    let scores: Option<Vec<f64>> = m0.map(|m| m.iter().map(|lp| pair_score(lp, length_normalize)).collect());
    let need_scores = || {
        scores.as_ref().ok_or_else(|| Error::invalid(format!("partition {kind:?} needs the initial model's scores")))
    };
    let steps_or_err = || -> Result<usize> {
        let t = steps.unwrap_or(1);
        if t == 0 || t > n {
            return Err(Error::invalid(format!("--steps {t}: need 1 ≤ T ≤ number of pairs ({n})")));
        }
        Ok(t)
    };

    let mut chunks: Vec<Chunk> = match kind {
        PartitionKind::Sources => {
            let s = need_scores()?;
            let mut names: Vec<&str> = pairs.iter().map(|p| p.source.as_str()).collect();
            names.sort();
            names.dedup();
            if let Some(t) = steps {
                if t != names.len() {
                    return Err(Error::invalid(format!(
                        "--partition sources makes one chunk per data source, and the data has {} ({}), \
                         but --steps is {t}: drop --steps or use --partition difficulty/random",
                        names.len(),
                        names.join(", ")
                    )));
                }
            }
            let mut chunks: Vec<Chunk> = names
                .iter()
                .map(|name| {
                    let idx: Vec<usize> = (0..n).filter(|&i| pairs[i].source == *name).collect();
                    chunk_with_stats(name.to_string(), idx, Some(s))
                })
                .collect();
            // Highest accuracy first; the stable sort keeps name order on ties.
            chunks.sort_by(|a, b| b.accuracy.unwrap().total_cmp(&a.accuracy.unwrap()));
            return Ok(Partition { kind, chunks, scores });
        }
        PartitionKind::Difficulty => {
            let s = need_scores()?;
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            cut(&order, steps_or_err()?)
        }
        PartitionKind::Random => {
            let mut order: Vec<usize> = (0..n).collect();
            shuffle(&mut order, &mut rng_for(seed, 0x5D90));
            cut(&order, steps_or_err()?)
        }
        PartitionKind::InOrder => cut(&(0..n).collect::<Vec<_>>(), steps_or_err()?),
    }
    .into_iter()
    .enumerate()
    .map(|(c, idx)| chunk_with_stats(format!("chunk-{}", c + 1), idx, None))
    .collect();
    if let Some(s) = &scores {
        for c in &mut chunks {
            *c = chunk_with_stats(std::mem::take(&mut c.name), std::mem::take(&mut c.pairs), Some(s));
        }
    }
    Ok(Partition { kind, chunks, scores })
}

fn chunk_with_stats(name: String, pairs: Vec<usize>, scores: Option<&[f64]>) -> Chunk {
    let stats = scores.filter(|_| !pairs.is_empty()).map(|s| {
        let k = pairs.len() as f64;
        let acc = pairs.iter().filter(|&&i| s[i] > 0.0).count() as f64 / k;
        let mean = pairs.iter().map(|&i| s[i]).sum::<f64>() / k;
        (acc, mean)
    });
    Chunk { name, pairs, accuracy: stats.map(|s| s.0), mean_gamma: stats.map(|s| s.1) }
}

/// Cuts `order` into `t` consecutive chunks whose sizes differ by at most one.
fn cut(order: &[usize], t: usize) -> Vec<Vec<usize>> {
    let (q, r) = (order.len() / t, order.len() % t);
    let mut out = Vec::with_capacity(t);
    let mut start = 0;
    for c in 0..t {
        let len = q + usize::from(c < r);
        out.push(order[start..start + len].to_vec());
        start += len;
    }
    out
}

/// Splits off a held-out eval set: a seeded `fraction` of the pairs (at least one when
/// fraction > 0). Returns (train, eval).
pub fn split_eval(pairs: Vec<PairExample>, fraction: f64, seed: u64) -> (Vec<PairExample>, Vec<PairExample>) {
    if fraction <= 0.0 || pairs.len() < 2 {
        return (pairs, Vec::new());
    }
    let n_eval = ((pairs.len() as f64 * fraction).round() as usize).clamp(1, pairs.len() - 1);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    shuffle(&mut order, &mut rng_for(seed, 0xE7A1));
    let mut is_eval = vec![false; pairs.len()];
    order[..n_eval].iter().for_each(|&i| is_eval[i] = true);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, p) in pairs.into_iter().enumerate() {
        if is_eval[i] {
            eval.push(p)
        } else {
            train.push(p)
        }
    }
    (train, eval)
}

pub fn partition_report(p: &Partition, pairs: &[PairExample]) -> serde_json::Value {
    let assignment = p.assignment(pairs.len());
    let per_pair: Vec<serde_json::Value> = (0..pairs.len())
        .map(|i| {
            serde_json::json!({"pair": i, "chunk": assignment[i] + 1, "source": pairs[i].source,
                "score": p.scores.as_ref().map(|s| s[i])})
        })
        .collect();
    let mut v = serde_json::to_value(p).expect("partition serialises");
    v["assignment"] = serde_json::Value::Array(per_pair);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(source: &str) -> PairExample {
        PairExample { prompt: vec![1], chosen: vec![2], rejected: vec![3], source: source.into() }
    }
    fn lp(gamma: f64) -> PairLogps {
        PairLogps { chosen: gamma - 5.0, rejected: -5.0, chosen_tokens: 1, rejected_tokens: 1 }
    }

    #[test]
    fn sources_are_ordered_by_m0_accuracy() {
        // source "a": 1/3 pairs with γ > 0; "b": 2/2; "c": 1/2.
        let pairs = [ex("a"), ex("b"), ex("a"), ex("c"), ex("b"), ex("a"), ex("c")];
        let g = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0, -0.5].map(lp);
        let p = partition(&pairs, PartitionKind::Sources, None, 0, Some(&g), false).unwrap();
        let names: Vec<&str> = p.chunks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a"]);
        assert_eq!(p.chunks[0].pairs, [1, 4]);
        assert_eq!(p.chunks[2].pairs, [0, 2, 5]);
        assert_eq!(p.chunks[1].accuracy, Some(0.5));
        assert!((p.chunks[2].mean_gamma.unwrap() - (-2.0 / 3.0)).abs() < 1e-12);
        assert_eq!(p.assignment(7), [2, 0, 2, 1, 0, 2, 1]);
        assert!(partition(&pairs, PartitionKind::Sources, Some(2), 0, Some(&g), false).is_err());
    }

    #[test]
    fn difficulty_puts_largest_gamma_first() {
        let pairs: Vec<PairExample> = (0..7).map(|_| ex("x")).collect();
        let g = [0.3, -4.0, 2.0, 1.0, -1.0, 5.0, 0.0].map(lp);
        let p = partition(&pairs, PartitionKind::Difficulty, Some(3), 0, Some(&g), false).unwrap();
        let chunks: Vec<Vec<usize>> = p.chunks.iter().map(|c| c.pairs.clone()).collect();
        assert_eq!(chunks, vec![vec![5, 2, 3], vec![0, 6], vec![4, 1]]);
        assert_eq!(p.chunks[0].accuracy, Some(1.0));
        assert_eq!(p.chunks[2].accuracy, Some(0.0));
    }

    #[test]
    fn length_normalisation_changes_the_ranking() {
        let pairs = [ex("x"), ex("x")];
        // pair 0: γ = 2 over 10 chosen tokens; pair 1: γ = 1 over 1 token.
        let a = PairLogps { chosen: -8.0, rejected: -10.0, chosen_tokens: 10, rejected_tokens: 10 };
        let b = PairLogps { chosen: -1.0, rejected: -2.0, chosen_tokens: 1, rejected_tokens: 1 };
        let raw = partition(&pairs, PartitionKind::Difficulty, Some(2), 0, Some(&[a, b]), false).unwrap();
        let norm = partition(&pairs, PartitionKind::Difficulty, Some(2), 0, Some(&[a, b]), true).unwrap();
        assert_eq!(raw.chunks[0].pairs, [0]);
        assert_eq!(norm.chunks[0].pairs, [1]);
    }

    #[test]
    fn random_and_in_order() {
        let pairs: Vec<PairExample> = (0..10).map(|_| ex("x")).collect();
        let io = partition(&pairs, PartitionKind::InOrder, Some(3), 0, None, false).unwrap();
        let chunks: Vec<Vec<usize>> = io.chunks.iter().map(|c| c.pairs.clone()).collect();
        assert_eq!(chunks, vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]);
        let r1 = partition(&pairs, PartitionKind::Random, Some(2), 11, None, false).unwrap();
        let r2 = partition(&pairs, PartitionKind::Random, Some(2), 11, None, false).unwrap();
        let r3 = partition(&pairs, PartitionKind::Random, Some(2), 12, None, false).unwrap();
        assert_eq!(r1, r2);
        assert_ne!(r1, r3);
        let mut all: Vec<usize> = r1.chunks.iter().flat_map(|c| c.pairs.clone()).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(r1.chunks[0].pairs.len(), 5);
        assert!(partition(&pairs, PartitionKind::Difficulty, Some(2), 0, None, false).is_err());
    }
}
