//! sDPO: partitioning the preference data into chunks D_1 … D_T, and the stepwise driver
//! (for t = 1..T: reference = M_{t−1}, policy initialised from M_{t−1}, DPO on D_t → M_t).
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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, RunState, StateData};
use crate::config::LlamaConfig;
use crate::data::batcher::{rng_for, shuffle};
use crate::data::PairExample;
use crate::dpo::{LossConfig, Metrics, PairLogps};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::train::{
    sequence_logps_all, train_chunk, updates_per_chunk, ChunkPosition, Reference, ScheduleSpan, TrainOptions, Where,
};
use crate::weights::{save_model, LlamaWeights};

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

// --- the stepwise driver

/// Where the reference log-probs of a step come from (`--reference`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceMode {
    /// One forward pass over the chunk with M_{t−1} before training; one model in memory.
    #[default]
    Precomputed,
    /// A second engine holds M_{t−1} and scores every micro-batch beside the policy.
    Inline,
}

/// Everything the driver needs besides the data and the model.
#[derive(Clone, Debug)]
pub struct SdpoOptions {
    pub train: TrainOptions,
    pub partition: PartitionKind,
    pub steps: Option<usize>,
    pub length_normalize: bool,
    pub reference: ReferenceMode,
    pub carry_optimizer: bool,
    pub carry_schedule: bool,
    /// Save a resumable state every this many updates (0: only at the end of each step).
    pub save_every: u64,
    /// The output folder: step-t/, metrics.jsonl, partition.json, state-*/.
    pub out: PathBuf,
    /// Continue from the newest state in `out`.
    pub resume: bool,
    /// Copy tokenizer files from here into each step-t/ folder.
    pub tokenizer_from: Option<PathBuf>,
    /// No progress bar and no per-step lines (the demo prints its own).
    pub quiet: bool,
    /// Testing aid: put a NaN into the policy's weights before this global update (1-based).
    pub inject_nan_at: Option<u64>,
    /// Testing aid: sleep this long after every update (so a test can kill a run mid-step).
    pub debug_sleep_ms: u64,
}

/// Reward accuracy and margin of a model against a reference on the eval set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Versus {
    pub accuracy: f64,
    pub margin: f64,
}

/// Evaluation of M_t on the eval set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub n_pairs: usize,
    /// Against M_0 (the SFT model).
    pub vs_init: Versus,
    /// Against M_{t−1} (this step's reference).
    pub vs_prev: Versus,
    /// Mean γ_Mt = log π(chosen) − log π(rejected): the paper's Figure 2 quantity.
    pub mean_gamma: f64,
    /// Share of pairs with γ_Mt > 0.
    pub gamma_accuracy: f64,
    /// Mean log π_Mt of the chosen and of the rejected answers (DPO can lower both).
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

/// Compares per-pair log-probs of a model against a reference.
pub fn versus(model: &[PairLogps], reference: &[PairLogps], beta: f64) -> Versus {
    let m = Metrics::from_pairs(model, reference, &LossConfig { beta, ..LossConfig::default() });
    Versus { accuracy: m.rewards_accuracies, margin: m.rewards_margins }
}

pub fn eval_record(step: usize, model: &[PairLogps], init: &[PairLogps], prev: &[PairLogps], beta: f64) -> EvalRecord {
    let n = model.len().max(1) as f64;
    EvalRecord {
        step,
        n_pairs: model.len(),
        vs_init: versus(model, init, beta),
        vs_prev: versus(model, prev, beta),
        mean_gamma: model.iter().map(PairLogps::gamma).sum::<f64>() / n,
        gamma_accuracy: model.iter().filter(|l| l.gamma() > 0.0).count() as f64 / n,
        logps_chosen: model.iter().map(|l| l.chosen).sum::<f64>() / n,
        logps_rejected: model.iter().map(|l| l.rejected).sum::<f64>() / n,
    }
}

/// One sDPO step's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct StepSummary {
    pub step: usize,
    pub chunk: String,
    pub n_pairs: usize,
    pub updates: u64,
    /// Mean training loss and reward accuracy over the step's updates (this process's).
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub eval: Option<EvalRecord>,
    pub seconds: f64,
}

pub struct RunSummary {
    pub partition: Partition,
    pub eval_init: Option<EvalRecord>,
    pub steps: Vec<StepSummary>,
    pub final_weights: LlamaWeights,
}

/// Builds an engine on given weights (the CLI passes `engine::open` with its `--device`).
pub type EngineFactory<'a> = &'a dyn Fn(&LlamaConfig, LlamaWeights) -> Result<Box<dyn Engine>>;

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

/// Appends JSON lines to metrics.jsonl, tracking its length for resume.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    bytes: u64,
}

impl MetricsLog {
    fn open(path: &Path, truncate_to: Option<u64>) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let bytes = match truncate_to {
            Some(n) => {
                file.set_len(n).map_err(|e| Error::io(path, e))?;
                n
            }
            None => {
                file.set_len(0).map_err(|e| Error::io(path, e))?;
                0
            }
        };
        let mut log = MetricsLog { file, path: path.to_path_buf(), bytes };
        use std::io::Seek;
        log.file.seek(std::io::SeekFrom::Start(bytes)).map_err(|e| Error::io(&log.path, e))?;
        Ok(log)
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        let line = serde_json::to_string(v).expect("JSON value serialises") + "\n";
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.bytes += line.len() as u64;
        Ok(())
    }
}

fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Runs sDPO: partitions `train`, then for t = 1..T trains M_t from M_{t−1} on chunk t
/// with M_{t−1} as the frozen reference, saves `out/step-t/`, and evaluates on `eval`.
pub fn run(
    opts: &SdpoOptions,
    cfg: &LlamaConfig,
    m0: LlamaWeights,
    train: &[PairExample],
    eval: &[PairExample],
    factory: EngineFactory<'_>,
) -> Result<RunSummary> {
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let beta = opts.train.loss.beta;
    let (budget, layout) = (opts.train.micro_batch_tokens, opts.train.layout);
    let eval_refs: Vec<&PairExample> = eval.iter().collect();
    let train_refs: Vec<&PairExample> = train.iter().collect();

    // Where to start: the newest complete state, or the beginning.
    let resumed_dir = if opts.resume { checkpoint::latest(out)? } else { None };
    let resumed = match &resumed_dir {
        Some(dir) => Some(checkpoint::load(dir, cfg)?),
        None => None,
    };

    let mut engine = factory(cfg, m0)?;

    // Eval log-probs of M_0 (saved in every state, so a resume does not need M_0 again).
    let eval_init: Vec<PairLogps> = match &resumed {
        Some((_, d)) => d.eval_init.clone(),
        None => sequence_logps_all(engine.as_mut(), &eval_refs, budget, layout)?,
    };

    // The partition, written once; a resume reads it back so the chunks cannot change.
    let part_path = out.join("partition.json");
    let partition: Partition = if resumed.is_some() && part_path.exists() {
        let text = std::fs::read_to_string(&part_path).map_err(|e| Error::io(&part_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::file(&part_path, format!("not a partition: {e}")))?
    } else {
        let scores = if opts.partition.needs_scores() {
            Some(sequence_logps_all(engine.as_mut(), &train_refs, budget, layout)?)
        } else {
            None
        };
        let p =
            partition(train, opts.partition, opts.steps, opts.train.seed, scores.as_deref(), opts.length_normalize)?;
        write_json(&part_path, &partition_report(&p, train))?;
        p
    };
    if partition.chunks.iter().flat_map(|c| &c.pairs).any(|&i| i >= train.len()) {
        return Err(Error::file(&part_path, "refers to pairs beyond the data: resume with the same data"));
    }
    let steps = partition.chunks.len();
    if !opts.quiet {
        eprintln!(
            "sdpo: {} training pairs in {steps} chunk(s) (--partition {}); eval on {} pairs",
            train.len(),
            serde_json::to_value(opts.partition).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            eval.len()
        );
        for (t, c) in partition.chunks.iter().enumerate() {
            let acc = c.accuracy.map(|a| format!(", M_0 accuracy (γ > 0) {:.3}", a)).unwrap_or_default();
            eprintln!("  step {}: {} ({} pairs{acc})", t + 1, c.name, c.pairs.len());
        }
    }

    let updates: Vec<u64> = partition.chunks.iter().map(|c| updates_per_chunk(c.pairs.len(), &opts.train)).collect();
    let all_updates: u64 = updates.iter().sum();
    if let (Some(dir), Some((st, _))) = (&resumed_dir, &resumed) {
        check_state(dir, st, out, &updates)?;
    }

    let (mut st, mut data, mut first_step) = match resumed {
        Some((st, data)) => {
            engine.set_weights(&data.weights)?;
            engine.set_optimizer_state(data.adam.clone())?;
            let first = if st.step_done { st.sdpo_step + 1 } else { st.sdpo_step };
            (st, data, first)
        }
        None => {
            let st = RunState {
                format: checkpoint::FORMAT,
                seq: 0,
                sdpo_step: 0,
                step_done: true,
                position: ChunkPosition::default(),
                total_updates: 0,
                metrics_bytes: 0,
            };
            let data = StateData {
                weights: LlamaWeights::zeros(cfg),
                adam: None,
                ref_logps: Vec::new(),
                eval_prev: eval_init.clone(),
                eval_init: eval_init.clone(),
                reference: None,
            };
            (st, data, 1)
        }
    };
    let mut log = MetricsLog::open(&out.join("metrics.jsonl"), opts.resume.then_some(st.metrics_bytes))?;
    let eval_init_rec = (!eval.is_empty()).then(|| eval_record(0, &eval_init, &eval_init, &eval_init, beta));
    if first_step == 1 && st.total_updates == 0 {
        if let Some(r) = &eval_init_rec {
            log.write(&serde_json::json!({"sdpo/step": 0, "eval/mean_gamma": r.mean_gamma,
                "eval/logps/chosen": r.logps_chosen, "eval/logps/rejected": r.logps_rejected,
                "eval/gamma_accuracy": r.gamma_accuracy, "eval/n_pairs": r.n_pairs}))?;
        }
    }
    if first_step > steps {
        first_step = steps + 1;
    }

    // States older than the newest are removed once an update from the newest's weights
    // has passed the divergence checks (checkpoint.rs).
    let mut prune_pending = false;
    let mut summaries = Vec::new();
    for t in first_step..=steps {
        let chunk_info = &partition.chunks[t - 1];
        let chunk: Vec<&PairExample> = chunk_info.pairs.iter().map(|&i| &train[i]).collect();
        let t0 = std::time::Instant::now();
        let fresh = st.sdpo_step != t || st.step_done;
        let start = if fresh {
            if !opts.carry_optimizer {
                engine.set_optimizer_state(None)?;
            }
            // M_{t−1} is the policy's current weights: score the chunk with it (or keep a copy).
            match opts.reference {
                ReferenceMode::Precomputed => {
                    data.ref_logps = sequence_logps_all(engine.as_mut(), &chunk, budget, layout)?;
                    data.reference = None;
                }
                ReferenceMode::Inline => {
                    data.ref_logps = Vec::new();
                    data.reference = Some(engine.weights()?);
                }
            }
            ChunkPosition::default()
        } else {
            st.position
        };
        let mut ref_engine = match (&opts.reference, &data.reference) {
            (ReferenceMode::Inline, Some(w)) => Some(factory(cfg, w.clone())?),
            (ReferenceMode::Inline, None) => {
                return Err(Error::invalid("inline reference: the state has no reference weights"))
            }
            _ => None,
        };
        let span = if opts.carry_schedule {
            ScheduleSpan { offset: updates[..t - 1].iter().sum(), total: all_updates }
        } else {
            ScheduleSpan { offset: 0, total: updates[t - 1] }
        };

        let bar = if opts.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(updates[t - 1]);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} updates {msg} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("step {t}/{steps} ({})", chunk_info.name));
            b.set_position(start.updates);
            b
        };
        let (mut loss_sum, mut acc_sum, mut n_upd, mut pairs_done) = (0.0, 0.0, 0u64, 0usize);
        let ref_logps = std::mem::take(&mut data.ref_logps);
        let reference = match ref_engine.as_mut() {
            Some(e) => Reference::Inline(e.as_mut()),
            None => Reference::Precomputed(&ref_logps),
        };
        let n_epochs = opts.train.epochs;
        let result = train_chunk(
            engine.as_mut(),
            reference,
            &chunk,
            &opts.train,
            span,
            start,
            Where { sdpo_step: t },
            &mut |eng, pos, rec| {
                if prune_pending {
                    checkpoint::prune(out)?;
                    prune_pending = false;
                }
                st.total_updates += 1;
                loss_sum += rec.metrics.loss;
                acc_sum += rec.metrics.rewards_accuracies;
                n_upd += 1;
                pairs_done += rec.metrics.n_pairs;
                let line = merge(
                    serde_json::to_value(rec).expect("record serialises"),
                    serde_json::json!({"sdpo/step": t, "sdpo/chunk": chunk_info.name,
                        "train/global_step": st.total_updates, "sdpo/update": pos.updates}),
                );
                log.write(&line)?;
                bar.set_position(pos.updates);
                bar.set_message(format!(
                    "{pairs_done} pairs, loss {:.4}, acc {:.2}, {:.0} tok/s",
                    rec.metrics.loss, rec.metrics.rewards_accuracies, rec.tokens_per_second
                ));
                let unfinished = pos.epoch < n_epochs;
                if opts.save_every > 0 && st.total_updates % opts.save_every == 0 && unfinished {
                    st.seq += 1;
                    st.sdpo_step = t;
                    st.step_done = false;
                    st.position = *pos;
                    st.metrics_bytes = log.bytes;
                    let snapshot = StateData {
                        weights: eng.weights()?,
                        adam: eng.optimizer_state()?,
                        ref_logps: ref_logps.clone(),
                        eval_init: data.eval_init.clone(),
                        eval_prev: data.eval_prev.clone(),
                        reference: data.reference.clone(),
                    };
                    checkpoint::save(out, cfg, &st, &snapshot)?;
                    prune_pending = true;
                }
                if opts.debug_sleep_ms > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(opts.debug_sleep_ms));
                }
                if let Some(k) = opts.inject_nan_at {
                    if st.total_updates + 1 == k {
                        let mut w = eng.weights()?;
                        w.embed[0] = f32::NAN;
                        w.norm.iter_mut().for_each(|x| *x = f32::NAN);
                        eng.set_weights(&w)?;
                    }
                }
                Ok(())
            },
        );
        bar.finish_and_clear();
        match result {
            Err(Error::Diverged(msg)) => {
                return Err(Error::Diverged(format!("{msg}. {}", keep_state_before(out, st.total_updates)?)))
            }
            r => r?,
        }
        drop(ref_engine);

        // M_t: save it as a Hugging Face folder, evaluate it, then record the step as done.
        let mt = engine.weights()?;
        let step_dir = out.join(format!("step-{t}"));
        save_model(&step_dir, cfg, &mt, cfg.dtype, opts.tokenizer_from.as_deref())?;
        let eval_rec = if eval.is_empty() {
            None
        } else {
            let pol = sequence_logps_all(engine.as_mut(), &eval_refs, budget, layout)?;
            let r = eval_record(t, &pol, &data.eval_init, &data.eval_prev, beta);
            log.write(&serde_json::json!({"sdpo/step": t, "sdpo/chunk": chunk_info.name,
                "eval/rewards/accuracies": r.vs_init.accuracy, "eval/rewards/margins": r.vs_init.margin,
                "eval/rewards/accuracies_vs_prev": r.vs_prev.accuracy, "eval/rewards/margins_vs_prev": r.vs_prev.margin,
                "eval/mean_gamma": r.mean_gamma, "eval/gamma_accuracy": r.gamma_accuracy, "eval/n_pairs": r.n_pairs,
                "eval/logps/chosen": r.logps_chosen, "eval/logps/rejected": r.logps_rejected}))?;
            data.eval_prev = pol;
            Some(r)
        };
        st.seq += 1;
        st.sdpo_step = t;
        st.step_done = true;
        st.position = ChunkPosition::default();
        st.metrics_bytes = log.bytes;
        data.weights = mt;
        data.adam = if opts.carry_optimizer { engine.optimizer_state()? } else { None };
        data.ref_logps = Vec::new();
        data.reference = None;
        checkpoint::save(out, cfg, &st, &data)?;
        prune_pending = true;

        let s = StepSummary {
            step: t,
            chunk: chunk_info.name.clone(),
            n_pairs: chunk.len(),
            updates: updates[t - 1],
            train_loss: loss_sum / n_upd.max(1) as f64,
            train_accuracy: acc_sum / n_upd.max(1) as f64,
            eval: eval_rec,
            seconds: t0.elapsed().as_secs_f64(),
        };
        if !opts.quiet {
            eprintln!("{}", step_line(&s));
        }
        summaries.push(s);
    }
    checkpoint::prune(out)?;
    let final_weights = if first_step > steps { data.weights } else { engine.weights()? };
    Ok(RunSummary { partition, eval_init: eval_init_rec, steps: summaries, final_weights })
}

/// After a divergence at update `done + 1` of the run: drops the newest state if its
/// weights are what that update started from, and says which state is kept.
fn keep_state_before(out: &Path, done: u64) -> Result<String> {
    let mut newest = checkpoint::latest(out)?;
    if let Some(dir) = &newest {
        if checkpoint::read_state(dir)?.total_updates == done {
            newest = checkpoint::discard_newest(out)?;
        }
    }
    Ok(match newest {
        Some(dir) => {
            let st = checkpoint::read_state(&dir)?;
            format!(
                "The run folder keeps the state after update {} (sDPO step {}); --resume continues from it, and \
                 accepts a lower --lr",
                st.total_updates, st.sdpo_step
            )
        }
        None => "No state from before it is kept: start again (--overwrite) with a lower --lr".to_string(),
    })
}

/// Refuses a resume state that does not fit the run it sits in (a hand-edited or
/// foreign state.json): its step and position must lie inside the partition, the
/// models of the steps it calls done must exist, and metrics.jsonl must be as long as
/// it says.
fn check_state(dir: &Path, st: &RunState, out: &Path, updates: &[u64]) -> Result<()> {
    let path = dir.join("state.json");
    let bad = |msg: String| {
        Err(Error::file(
            &path,
            format!("{msg}: this state does not belong to this run (edited, or copied from another run); remove it to resume from an earlier one, or start again with --overwrite"),
        ))
    };
    let steps = updates.len();
    if st.sdpo_step == 0 || st.sdpo_step > steps {
        return bad(format!("sdpo_step {} is outside the run's {steps} step(s)", st.sdpo_step));
    }
    if !st.step_done && st.position.updates >= updates[st.sdpo_step - 1] {
        return bad(format!(
            "position.updates {} is not below step {}'s {} updates",
            st.position.updates,
            st.sdpo_step,
            updates[st.sdpo_step - 1]
        ));
    }
    if st.total_updates > updates.iter().sum::<u64>() {
        return bad(format!(
            "total_updates {} is more than the run's {}",
            st.total_updates,
            updates.iter().sum::<u64>()
        ));
    }
    let done = if st.step_done { st.sdpo_step } else { st.sdpo_step - 1 };
    if let Some(t) = (1..=done).find(|t| !out.join(format!("step-{t}")).join("config.json").is_file()) {
        return bad(format!(
            "it counts step {t} as done, but {} holds no model",
            out.join(format!("step-{t}")).display()
        ));
    }
    let metrics = out.join("metrics.jsonl");
    let len = std::fs::metadata(&metrics).map(|m| m.len()).unwrap_or(0);
    if st.metrics_bytes > len {
        return bad(format!("metrics_bytes {} is more than {}'s {len} bytes", st.metrics_bytes, metrics.display()));
    }
    Ok(())
}

/// One line per finished step, for logs.
pub fn step_line(s: &StepSummary) -> String {
    let mut line = format!(
        "step {} ({}, {} pairs, {} updates, {:.1}s): train loss {:.4}, train reward acc {:.3}",
        s.step, s.chunk, s.n_pairs, s.updates, s.seconds, s.train_loss, s.train_accuracy
    );
    if let Some(e) = &s.eval {
        line += &format!(
            "; eval acc vs M_0 {:.3} (margin {:.3}), vs M_{} {:.3}, mean γ {:.3}",
            e.vs_init.accuracy,
            e.vs_init.margin,
            s.step - 1,
            e.vs_prev.accuracy,
            e.mean_gamma
        );
    }
    line
}

/// The partition as written to partition.json: chunks, and per pair its chunk and score.
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

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON serialises") + "\n";
    crate::weights::write_file_atomic(path, text.as_bytes())
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
