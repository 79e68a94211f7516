//! One DPO run on one chunk: reference log-probs, epochs of global batches split into
//! micro-batches, the learning-rate schedule, AdamW with clipping, metrics.
//!
//! The reference is either precomputed (one `sequence_logps` pass over the chunk with
//! M_{t−1} before training starts, so only one model is in memory) or computed inline by
//! a second engine that holds the frozen reference beside the policy.
//!
//! Learning rate at optimiser step k (0-based, the k-th update), as transformers'
//! `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` with the
//! scheduler stepped after each update: warmup W = ceil(ratio · total) steps rising as
//! k / W, then linear decay (total − k) / (total − W) or cosine 0.5 · (1 + cos(π · progress)).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::batcher::{epoch_plan, BatcherConfig, GlobalBatch};
use crate::data::progress::Progress;
use crate::data::{Layout, PairBatch, PairExample};
use crate::dpo::{LossConfig, Metrics, PairLogps};
use crate::engine::{AdamWConfig, Engine};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Linear,
    Cosine,
    Constant,
}

/// The learning rate of update `step` (0-based) out of `total`.
pub fn lr_at(peak: f64, schedule: Schedule, warmup_ratio: f64, step: u64, total: u64) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as u64;
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1) as f64;
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (total.saturating_sub(step) as f64 / rest).max(0.0),
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / rest;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    peak * factor
}

/// What one DPO run on a chunk needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub loss: LossConfig,
    pub adamw: AdamWConfig,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub epochs: usize,
    pub batch_pairs: usize,
    pub micro_batch_tokens: usize,
    pub layout: Layout,
    pub seed: u64,
}

impl Default for TrainOptions {
    /// Zephyr's recipe as TRL runs it (the sDPO paper's setting).
    fn default() -> Self {
        TrainOptions {
            loss: LossConfig::default(),
            adamw: AdamWConfig::default(),
            lr: 5e-7,
            warmup_ratio: 0.1,
            schedule: Schedule::Linear,
            epochs: 1,
            batch_pairs: 32,
            micro_batch_tokens: 4096,
            layout: Layout::Shared,
            seed: 42,
        }
    }
}

/// Tokens a pair occupies in `layout`.
pub fn layout_len(p: &PairExample, layout: Layout) -> usize {
    match layout {
        Layout::Shared => p.shared_len(),
        Layout::Concatenated => 2 * p.prompt.len() + p.chosen.len() + p.rejected.len(),
    }
}

/// Per-pair log-probs of `pairs` under the engine's current weights, in the given order,
/// packed in order into micro-batches of at most `budget` tokens.
pub fn sequence_logps_all(
    engine: &mut dyn Engine,
    pairs: &[&PairExample],
    budget: usize,
    layout: Layout,
) -> Result<Vec<PairLogps>> {
    sequence_logps_all_with_progress(engine, pairs, budget, layout, None)
}

/// `sequence_logps_all` with progress lines on stderr named `what` (e.g. "scoring the
/// reference"), in tokens scored, for passes that run long (`data::progress::Progress`);
/// `None` (e.g. `--quiet`) prints nothing.
pub fn sequence_logps_all_with_progress(
    engine: &mut dyn Engine,
    pairs: &[&PairExample],
    budget: usize,
    layout: Layout,
    what: Option<&'static str>,
) -> Result<Vec<PairLogps>> {
    let total = pairs.iter().map(|p| layout_len(p, layout)).sum();
    let progress = Progress::new(what.unwrap_or(""), "tokens", total, what.is_some());
    let mut out = Vec::with_capacity(pairs.len());
    let mut start = 0;
    while start < pairs.len() {
        let mut end = start + 1;
        let mut tokens = layout_len(pairs[start], layout);
        while end < pairs.len() && tokens + layout_len(pairs[end], layout) <= budget {
            tokens += layout_len(pairs[end], layout);
            end += 1;
        }
        let batch = PairBatch::new(&pairs[start..end], layout)?;
        out.extend(engine.sequence_logps(&batch)?);
        progress.add(tokens);
        start = end;
    }
    progress.finish();
    Ok(out)
}

/// Where the reference log-probs come from.
pub enum Reference<'a> {
    /// One per pair of the chunk, in chunk order.
    Precomputed(&'a [PairLogps]),
    /// A second engine holding the frozen reference.
    Inline(&'a mut dyn Engine),
}

/// Position inside one chunk's run: the next global batch to train, and updates taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPosition {
    pub epoch: usize,
    pub batch: usize,
    /// Updates taken in this chunk's run.
    pub updates: u64,
}

/// The learning-rate schedule a chunk's run follows: its own (offset 0, total = its
/// updates), or with `--carry-schedule` one span over all sDPO steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleSpan {
    pub offset: u64,
    pub total: u64,
}

/// One optimiser step's record, logged under TRL's names.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    #[serde(flatten)]
    pub metrics: Metrics,
    #[serde(rename = "train/learning_rate")]
    pub lr: f64,
    #[serde(rename = "train/grad_norm")]
    pub grad_norm: f64,
    #[serde(rename = "train/tokens_per_second")]
    pub tokens_per_second: f64,
    pub epoch: f64,
    #[serde(skip)]
    pub tokens: usize,
    #[serde(skip)]
    pub seconds: f64,
}

/// Updates one chunk's run takes.
pub fn updates_per_chunk(n_pairs: usize, opts: &TrainOptions) -> u64 {
    (opts.epochs * crate::data::batcher::batches_per_epoch(n_pairs, opts.batch_pairs)) as u64
}

/// Where a run stands, for error messages.
#[derive(Clone, Copy, Debug)]
pub struct Where {
    pub sdpo_step: usize,
}

/// Trains `engine` on `chunk` from `start` to the end of the last epoch. `on_update` runs
/// after every update (logging, checkpoints) with the position after it. A non-finite
/// loss or gradient norm stops the run with an error naming the step and batch.
#[allow(clippy::too_many_arguments)]
pub fn train_chunk(
    engine: &mut dyn Engine,
    mut reference: Reference<'_>,
    chunk: &[&PairExample],
    opts: &TrainOptions,
    span: ScheduleSpan,
    start: ChunkPosition,
    at: Where,
    on_update: &mut dyn FnMut(&mut dyn Engine, &ChunkPosition, &StepRecord) -> Result<()>,
) -> Result<()> {
    if let Reference::Precomputed(r) = &reference {
        if r.len() != chunk.len() {
            return Err(Error::invalid(format!("{} reference log-probs for {} pairs", r.len(), chunk.len())));
        }
    }
    let lengths: Vec<usize> = chunk.iter().map(|p| layout_len(p, opts.layout)).collect();
    let bcfg = BatcherConfig {
        batch_pairs: opts.batch_pairs,
        micro_batch_tokens: opts.micro_batch_tokens,
        seed: opts.seed,
        shuffle: true,
    };
    let mut pos = start;
    let per_epoch = crate::data::batcher::batches_per_epoch(chunk.len(), opts.batch_pairs);
    let mut plan: (usize, Vec<GlobalBatch>) = (usize::MAX, Vec::new());
    while pos.epoch < opts.epochs {
        if plan.0 != pos.epoch {
            plan = (pos.epoch, epoch_plan(&lengths, &bcfg, pos.epoch)?);
        }
        if pos.batch >= plan.1.len() {
            pos.epoch += 1;
            pos.batch = 0;
            continue;
        }
        let t0 = Instant::now();
        let lr = lr_at(opts.lr, opts.schedule, opts.warmup_ratio, span.offset + pos.updates, span.total);
        let (metrics, tokens) = accumulate(engine, &mut reference, chunk, &plan.1[pos.batch], opts)?;
        let fail = |what: &str, value: f64| {
            Error::invalid(format!(
                "non-finite {what} ({value}) at sDPO step {}, optimiser step {} (epoch {}, batch {}): \
                 stopping; the last good checkpoint is kept. Lower the learning rate, or check the \
                 data and the model for NaN/inf",
                at.sdpo_step,
                pos.updates + 1,
                pos.epoch + 1,
                pos.batch + 1
            ))
        };
        if !metrics.loss.is_finite() {
            return Err(fail("loss", metrics.loss));
        }
        let grad_norm = engine.optimizer_step(&opts.adamw, lr)?;
        if !grad_norm.is_finite() {
            return Err(fail("gradient norm", grad_norm));
        }
        pos.batch += 1;
        pos.updates += 1;
        let seconds = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            metrics,
            lr,
            grad_norm,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            epoch: pos.epoch as f64 + pos.batch as f64 / per_epoch as f64,
            tokens,
            seconds,
        };
        if pos.batch == plan.1.len() {
            pos.epoch += 1;
            pos.batch = 0;
        }
        on_update(engine, &pos, &rec)?;
    }
    Ok(())
}

/// Forward + backward over one global batch's micro-batches; returns the batch's metrics
/// and its token count.
fn accumulate(
    engine: &mut dyn Engine,
    reference: &mut Reference<'_>,
    chunk: &[&PairExample],
    batch: &GlobalBatch,
    opts: &TrainOptions,
) -> Result<(Metrics, usize)> {
    let scale = batch.loss_scale();
    let (mut pol, mut refs) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for micro in &batch.micro {
        let pairs: Vec<&PairExample> = micro.iter().map(|&i| chunk[i]).collect();
        let pb = PairBatch::new(&pairs, opts.layout)?;
        tokens += pb.n_tokens();
        let r: Vec<PairLogps> = match reference {
            Reference::Precomputed(all) => micro.iter().map(|&i| all[i]).collect(),
            Reference::Inline(e) => e.sequence_logps(&pb)?,
        };
        pol.extend(engine.train_step(&pb, &r, &opts.loss, scale)?);
        refs.extend(r);
    }
    Ok((Metrics::from_pairs(&pol, &refs, &opts.loss), tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_transformers() {
        // get_linear_schedule_with_warmup(num_warmup_steps=ceil(0.1*25)=3, num_training_steps=25):
        // lr_lambda(k) = k/3 for k < 3, else (25-k)/22.
        let lrs: Vec<f64> = (0..25).map(|k| lr_at(1.0, Schedule::Linear, 0.1, k, 25)).collect();
        assert_eq!(lrs[0], 0.0);
        assert!((lrs[1] - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(lrs[3], 1.0);
        assert!((lrs[4] - 21.0 / 22.0).abs() < 1e-15);
        assert!((lrs[24] - 1.0 / 22.0).abs() < 1e-15);
    }

    #[test]
    fn cosine_schedule_matches_transformers() {
        // get_cosine_schedule_with_warmup(warmup=2, total=20, num_cycles=0.5):
        // 0.5*(1+cos(pi*(k-2)/18)) after warmup.
        let k = 11;
        let expect = 0.5 * (1.0 + (std::f64::consts::PI * 9.0 / 18.0).cos());
        assert!((lr_at(2.0, Schedule::Cosine, 0.1, k, 20) - 2.0 * expect).abs() < 1e-15);
        assert_eq!(lr_at(2.0, Schedule::Cosine, 0.1, 2, 20), 2.0);
        assert_eq!(lr_at(2.0, Schedule::Cosine, 0.1, 1, 20), 1.0);
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        assert_eq!(lr_at(3.0, Schedule::Linear, 0.0, 0, 10), 3.0);
        assert_eq!(lr_at(3.0, Schedule::Constant, 0.0, 9, 10), 3.0);
    }
}
