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

impl TrainOptions {
    /// Refuses settings outside their meaningful ranges, naming the flag; every command
    /// checks its options here before it writes anything.
    pub fn check(&self) -> Result<()> {
        self.loss.check()?;
        self.adamw.check()?;
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(format!("--lr must be a finite number >= 0, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(Error::invalid(format!("--warmup-ratio must be in [0, 1), got {}", self.warmup_ratio)));
        }
        if self.epochs == 0 || self.batch_pairs == 0 {
            return Err(Error::invalid("--epochs and --batch-pairs must be at least 1"));
        }
        check_micro_batch_tokens(self.micro_batch_tokens)
    }
}

/// `--micro-batch-tokens` must be at least 1 (a longer pair still forms a micro-batch alone).
pub fn check_micro_batch_tokens(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("--micro-batch-tokens must be at least 1"));
    }
    Ok(())
}

/// Tokens a pair occupies in `layout`.
pub fn layout_len(p: &PairExample, layout: Layout) -> usize {
    match layout {
        Layout::Shared => p.shared_len(),
        Layout::Concatenated => 2 * p.prompt.len() + p.chosen.len() + p.rejected.len(),
    }
}

/// Per-pair log-probs of `pairs` under the engine's current weights, in the given order,
/// packed in order into micro-batches of at most `budget` tokens. With `progress`, a pass
/// that runs long prints progress lines on stderr under that name (e.g. "scoring the
/// reference"), in tokens scored (`data::progress::Progress`); `None` prints nothing.
pub fn sequence_logps_all(
    engine: &mut dyn Engine,
    pairs: &[&PairExample],
    budget: usize,
    layout: Layout,
    progress: Option<&'static str>,
) -> Result<Vec<PairLogps>> {
    let total = pairs.iter().map(|p| layout_len(p, layout)).sum();
    let progress = Progress::new(progress.unwrap_or(""), "tokens", total, progress.is_some());
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

/// Stops a run whose loss or gradient norm is non-finite or explodes relative to the run
/// so far: a loss over `LOSS_JUMP`·max(1, its median so far) — the floor of 1 keeps a run
/// whose loss has fallen near 0 from stopping at an ordinary batch — or a gradient norm
/// over `GRAD_JUMP`·its median so far. Healthy runs vary by far less; a learning rate that
/// blows the weights up trips one of them on the next update, before its state is kept.
#[derive(Default)]
struct DivergenceGuard {
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
}

const LOSS_JUMP: f64 = 100.0;
const GRAD_JUMP: f64 = 1000.0;

impl DivergenceGuard {
    /// Why `loss` means divergence, if it does; else records it.
    fn loss(&mut self, loss: f64) -> Option<String> {
        let limit = median(&self.losses).map_or(f64::INFINITY, |m| LOSS_JUMP * m.max(1.0));
        Self::check(&mut self.losses, loss, limit, "loss")
    }

    fn grad_norm(&mut self, norm: f64) -> Option<String> {
        let limit = median(&self.grad_norms).filter(|&m| m > 0.0).map_or(f64::INFINITY, |m| GRAD_JUMP * m);
        Self::check(&mut self.grad_norms, norm, limit, "gradient norm")
    }

    /// What is wrong with `value`, if anything; else records it.
    fn check(history: &mut Vec<f64>, value: f64, limit: f64, what: &str) -> Option<String> {
        if !value.is_finite() {
            return Some(format!("non-finite {what} ({value})"));
        }
        if value > limit {
            return Some(format!("{what} exploded: {value:.3e}, over {limit:.3e} (from its median so far)"));
        }
        history.push(value);
        None
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

/// Trains `engine` on `chunk` from `start` to the end of the last epoch. `on_update` runs
/// after every update (logging, checkpoints) with the position after it. A loss or
/// gradient norm that is non-finite or explodes (`DivergenceGuard`) stops the run with
/// `Error::Diverged`, naming the step and batch, before `on_update` sees that update.
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
    let mut guard = DivergenceGuard::default();
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
        let fail = |what: String| {
            Error::Diverged(format!(
                "{what} at sDPO step {}, optimiser step {} (epoch {}, batch {}): stopping before this \
                 update is saved. Lower the learning rate, or check the data and the model for NaN/inf",
                at.sdpo_step,
                pos.updates + 1,
                pos.epoch + 1,
                pos.batch + 1
            ))
        };
        if let Some(what) = guard.loss(metrics.loss) {
            return Err(fail(what));
        }
        let grad_norm = engine.optimizer_step(&opts.adamw, lr)?;
        if let Some(what) = guard.grad_norm(grad_norm) {
            return Err(fail(what));
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
    fn the_guard_stops_explosions_only() {
        let mut g = DivergenceGuard::default();
        for (loss, norm) in [(0.69, 3.0), (0.5, 40.0), (0.01, 0.5), (2.0, 12.0)] {
            assert_eq!((g.loss(loss), g.grad_norm(norm)), (None, None));
        }
        // median loss 0.5 -> limit 100 (the floor of 1); median norm 12 -> limit 12000
        assert!(g.loss(99.0).is_none() && g.loss(101.0).is_some());
        assert!(g.grad_norm(11_000.0).is_none() && g.grad_norm(13_000.0).is_some());
        assert!(g.loss(f64::NAN).is_some() && g.grad_norm(f64::INFINITY).is_some());
        // the first update has no history (IPO's loss starts at 1/(2β)²): only non-finite values stop it
        assert!(DivergenceGuard::default().grad_norm(1e12).is_none());
        assert!(DivergenceGuard::default().loss(2500.0).is_none());
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        assert_eq!(lr_at(3.0, Schedule::Linear, 0.0, 0, 10), 3.0);
        assert_eq!(lr_at(3.0, Schedule::Constant, 0.0, 9, 10), 3.0);
    }
}
