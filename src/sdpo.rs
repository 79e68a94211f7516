//! The stepwise driver: for t = 1..T, the reference is M_{t−1}, the policy starts from
//! M_{t−1}, DPO on chunk D_t gives M_t, which is saved and evaluated (partition.rs makes
//! the chunks).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, RunState, StateData};
use crate::config::LlamaConfig;
use crate::data::PairExample;
use crate::dpo::{LossConfig, Metrics, PairLogps};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::partition::{partition, partition_report, Partition, PartitionKind};
use crate::train::{
    sequence_logps_all, train_chunk, updates_per_chunk, ChunkPosition, Reference, ScheduleSpan, StepRecord,
    TrainOptions, Where,
};
use crate::weights::{save_model, LlamaWeights};

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
    /// Also write every metrics line as a TensorBoard event into `out/tensorboard/`.
    pub tensorboard: bool,
    /// A LoRA run: the base (M_0's weights) is frozen and held once, M_t = base ⊕
    /// adapter_t, and this is adapter_0 (fresh, or an SFT adapter). Step t starts from
    /// adapter_{t−1}, its reference is base ⊕ adapter_{t−1} (a fresh adapter's B is zero,
    /// so at t = 1 that is the base itself), and step-t/ is a PEFT adapter folder.
    pub lora: Option<Adapter>,
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
    /// M_T's weights; `None` in a LoRA run, whose M_T is step-T/'s adapter over the base
    /// (the base is not copied out of the engine).
    pub final_weights: Option<LlamaWeights>,
}

/// Builds an engine on given weights, with a LoRA adapter when one is given (the CLI
/// passes `engine::open` or `engine::open_lora` with its `--device`).
pub type EngineFactory<'a> = &'a dyn Fn(&LlamaConfig, LlamaWeights, Option<Adapter>) -> Result<Box<dyn Engine>>;

/// Appends JSON lines to metrics.jsonl, tracking its length for resume, and each line's
/// event to the TensorBoard writer when there is one.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    bytes: u64,
    tensorboard: Option<crate::tensorboard::EventWriter>,
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
        let mut log = MetricsLog { file, path: path.to_path_buf(), bytes, tensorboard: None };
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
        match &mut self.tensorboard {
            Some(tb) => tb.write(v),
            None => Ok(()),
        }
    }

    /// One update: TRL's names plus where it sits in the run.
    fn update(&mut self, t: usize, chunk: &str, global_step: u64, pos: &ChunkPosition, rec: &StepRecord) -> Result<()> {
        let mut line = serde_json::to_value(rec).expect("record serialises");
        let serde_json::Value::Object(place) = serde_json::json!({"sdpo/step": t, "sdpo/chunk": chunk,
            "train/global_step": global_step, "sdpo/update": pos.updates})
        else {
            unreachable!("json! of braces is an object")
        };
        line.as_object_mut().expect("a record is an object").extend(place);
        self.write(&line)
    }

    /// M_0 on the eval set (step 0: γ only, every comparison is with itself).
    fn eval_init(&mut self, r: &EvalRecord) -> Result<()> {
        self.write(&serde_json::json!({"sdpo/step": 0, "eval/mean_gamma": r.mean_gamma,
            "eval/logps/chosen": r.logps_chosen, "eval/logps/rejected": r.logps_rejected,
            "eval/gamma_accuracy": r.gamma_accuracy, "eval/n_pairs": r.n_pairs}))
    }

    /// M_t on the eval set, against M_0 and M_{t−1}.
    fn eval(&mut self, t: usize, chunk: &str, r: &EvalRecord) -> Result<()> {
        self.write(&serde_json::json!({"sdpo/step": t, "sdpo/chunk": chunk,
            "eval/rewards/accuracies": r.vs_init.accuracy, "eval/rewards/margins": r.vs_init.margin,
            "eval/rewards/accuracies_vs_prev": r.vs_prev.accuracy, "eval/rewards/margins_vs_prev": r.vs_prev.margin,
            "eval/mean_gamma": r.mean_gamma, "eval/gamma_accuracy": r.gamma_accuracy, "eval/n_pairs": r.n_pairs,
            "eval/logps/chosen": r.logps_chosen, "eval/logps/rejected": r.logps_rejected}))
    }
}

/// A step's progress bar (hidden with `quiet`) and the means its summary line reports.
struct StepProgress {
    bar: indicatif::ProgressBar,
    loss_sum: f64,
    acc_sum: f64,
    updates: u64,
    pairs: usize,
}

impl StepProgress {
    fn new(quiet: bool, t: usize, steps: usize, chunk: &str, updates: u64, start: u64) -> Self {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(updates);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} updates {msg} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("step {t}/{steps} ({chunk})"));
            b.set_position(start);
            b
        };
        StepProgress { bar, loss_sum: 0.0, acc_sum: 0.0, updates: 0, pairs: 0 }
    }

    fn update(&mut self, pos: &ChunkPosition, rec: &StepRecord) {
        self.loss_sum += rec.metrics.loss;
        self.acc_sum += rec.metrics.rewards_accuracies;
        self.updates += 1;
        self.pairs += rec.metrics.n_pairs;
        self.bar.set_position(pos.updates);
        self.bar.set_message(format!(
            "{} pairs, loss {:.4}, acc {:.2}, {:.0} tok/s",
            self.pairs, rec.metrics.loss, rec.metrics.rewards_accuracies, rec.tokens_per_second
        ));
    }

    /// Mean training loss and reward accuracy over this process's updates of the step.
    fn finish(self) -> (f64, f64) {
        self.bar.finish_and_clear();
        let n = self.updates.max(1) as f64;
        (self.loss_sum / n, self.acc_sum / n)
    }
}

/// Writes resume states and keeps the newest one that is known good: an older state is
/// removed only once an update from the newer state's weights has passed the divergence
/// checks (`confirm`), so after a divergence the state it started from can be dropped.
struct Checkpointer<'a> {
    out: &'a Path,
    cfg: &'a LlamaConfig,
    unconfirmed: bool,
}

impl Checkpointer<'_> {
    fn save(&mut self, st: &RunState, data: &StateData) -> Result<()> {
        checkpoint::save(self.out, self.cfg, st, data)?;
        self.unconfirmed = true;
        Ok(())
    }

    /// An update from the newest state's weights passed: the older states can go.
    fn confirm(&mut self) -> Result<()> {
        if std::mem::take(&mut self.unconfirmed) {
            checkpoint::prune(self.out)?;
        }
        Ok(())
    }

    /// After a divergence at update `done + 1` of the run: drops the newest state if its
    /// weights are what that update started from, and says which state is kept.
    fn keep_state_before(&self, done: u64) -> Result<String> {
        let mut newest = checkpoint::latest(self.out)?;
        if let Some(dir) = &newest {
            if checkpoint::read_state(dir)?.total_updates == done {
                newest = checkpoint::discard_newest(self.out)?;
            }
        }
        Ok(match newest {
            Some(dir) => {
                let st = checkpoint::read_state(&dir)?;
                format!(
                    "The run folder keeps the state after update {} (sDPO step {}); --resume continues from it, \
                     and accepts a lower --lr",
                    st.total_updates, st.sdpo_step
                )
            }
            None => "No state from before it is kept: start again (--overwrite) with a lower --lr".to_string(),
        })
    }
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
    // A forward pass over many pairs, with progress lines unless quiet.
    let scoring = |e: &mut dyn Engine, pairs: &[&PairExample], what: &'static str| {
        sequence_logps_all(e, pairs, budget, layout, (!opts.quiet).then_some(what))
    };

    // Where to start: the newest complete state, or the beginning.
    let resumed_dir = if opts.resume { checkpoint::latest(out)? } else { None };
    let resumed = match &resumed_dir {
        Some(dir) => Some(checkpoint::load(dir, cfg, opts.lora.as_ref().map(|a| &a.weights))?),
        None => None,
    };
    if opts.lora.is_some() && opts.reference == ReferenceMode::Inline {
        return Err(Error::invalid(
            "--reference inline with LoRA: the reference is precomputed from base ⊕ adapter_{t−1}; \
             drop --reference inline",
        ));
    }

    let mut engine = factory(cfg, m0, opts.lora.clone())?;

    // Eval log-probs of M_0 (saved in every state, so a resume does not need M_0 again).
    let eval_init: Vec<PairLogps> = match &resumed {
        Some((_, d)) => d.eval_init.clone(),
        None => scoring(engine.as_mut(), &eval_refs, "scoring the eval pairs with M_0")?,
    };

    // The partition, written once; a resume reads it back so the chunks cannot change.
    let part_path = out.join("partition.json");
    let partition: Partition = if resumed.is_some() && part_path.exists() {
        let text = std::fs::read_to_string(&part_path).map_err(|e| Error::io(&part_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::file(&part_path, format!("not a partition: {e}")))?
    } else {
        let scores = if opts.partition.needs_scores() {
            Some(scoring(engine.as_mut(), &train_refs, "scoring the training pairs with M_0")?)
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
            match (&data.weights, &data.adapter) {
                (_, Some(a)) => {
                    engine.set_adapter(a)?;
                    engine.set_adapter_optimizer_state(data.adapter_adam.clone())?;
                }
                (Some(w), None) => {
                    engine.set_weights(w)?;
                    engine.set_optimizer_state(data.adam.clone())?;
                }
                (None, None) => return Err(Error::invalid("the state holds neither weights nor an adapter")),
            }
            let first = if st.step_done { st.sdpo_step + 1 } else { st.sdpo_step };
            (st, data, first)
        }
        None => (RunState::start(), StateData::start(eval_init.clone()), 1),
    };
    let mut log = MetricsLog::open(&out.join("metrics.jsonl"), opts.resume.then_some(st.metrics_bytes))?;
    if opts.tensorboard {
        log.tensorboard = Some(crate::tensorboard::EventWriter::open(&out.join(crate::tensorboard::DIR), &log.path)?);
    }
    let eval_init_rec = (!eval.is_empty()).then(|| eval_record(0, &eval_init, &eval_init, &eval_init, beta));
    if first_step == 1 && st.total_updates == 0 {
        if let Some(r) = &eval_init_rec {
            log.eval_init(r)?;
        }
    }
    if first_step > steps {
        first_step = steps + 1;
    }

    let mut checkpointer = Checkpointer { out, cfg, unconfirmed: false };
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
                    data.ref_logps = scoring(engine.as_mut(), &chunk, "scoring the chunk with the reference")?;
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
            (ReferenceMode::Inline, Some(w)) => Some(factory(cfg, w.clone(), None)?),
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
        let mut progress = StepProgress::new(opts.quiet, t, steps, &chunk_info.name, updates[t - 1], start.updates);
        let ref_logps = std::mem::take(&mut data.ref_logps);
        let reference = match ref_engine.as_mut() {
            Some(e) => Reference::Inline(e.as_mut()),
            None => Reference::Precomputed(&ref_logps),
        };
        let result = train_chunk(
            engine.as_mut(),
            reference,
            &chunk,
            &opts.train,
            span,
            start,
            Where { sdpo_step: t },
            &mut |eng, pos, rec| {
                checkpointer.confirm()?;
                st.total_updates += 1;
                log.update(t, &chunk_info.name, st.total_updates, pos, rec)?;
                progress.update(pos, rec);
                let unfinished = pos.epoch < opts.train.epochs;
                if opts.save_every > 0 && st.total_updates % opts.save_every == 0 && unfinished {
                    st.mid_step(t, *pos, log.bytes);
                    let lora = eng.adapter()?;
                    let snapshot = StateData {
                        weights: if lora.is_some() { None } else { Some(eng.weights()?) },
                        adam: if lora.is_some() { None } else { eng.optimizer_state()? },
                        adapter_adam: if lora.is_some() { eng.adapter_optimizer_state()? } else { None },
                        adapter: lora,
                        ref_logps: ref_logps.clone(),
                        eval_init: data.eval_init.clone(),
                        eval_prev: data.eval_prev.clone(),
                        reference: data.reference.clone(),
                    };
                    checkpointer.save(&st, &snapshot)?;
                }
                Ok(())
            },
        );
        let (train_loss, train_accuracy) = progress.finish();
        match result {
            Err(Error::Diverged(msg)) => {
                return Err(Error::Diverged(format!("{msg}. {}", checkpointer.keep_state_before(st.total_updates)?)))
            }
            r => r?,
        }
        drop(ref_engine);

        // M_t: save it as a Hugging Face folder (LoRA: a PEFT adapter folder), evaluate it,
        // then record the step as done.
        let step_dir = out.join(format!("step-{t}"));
        match &opts.lora {
            Some(a0) => {
                let weights = engine.adapter()?.ok_or_else(|| Error::invalid("the engine lost its adapter"))?;
                Adapter { weights, ..a0.clone() }.save(&step_dir)?;
            }
            None => save_model(&step_dir, cfg, &engine.weights()?, cfg.dtype, opts.tokenizer_from.as_deref())?,
        }
        let eval_rec = if eval.is_empty() {
            None
        } else {
            let pol = scoring(engine.as_mut(), &eval_refs, "scoring the eval pairs")?;
            let r = eval_record(t, &pol, &data.eval_init, &data.eval_prev, beta);
            log.eval(t, &chunk_info.name, &r)?;
            data.eval_prev = pol;
            Some(r)
        };
        st.step_finished(t, log.bytes);
        if opts.lora.is_some() {
            data.adapter = engine.adapter()?;
            data.adapter_adam = if opts.carry_optimizer { engine.adapter_optimizer_state()? } else { None };
        } else {
            data.weights = Some(engine.weights()?);
            data.adam = if opts.carry_optimizer { engine.optimizer_state()? } else { None };
        }
        data.ref_logps = Vec::new();
        data.reference = None;
        checkpointer.save(&st, &data)?;

        let s = StepSummary {
            step: t,
            chunk: chunk_info.name.clone(),
            n_pairs: chunk.len(),
            updates: updates[t - 1],
            train_loss,
            train_accuracy,
            eval: eval_rec,
            seconds: t0.elapsed().as_secs_f64(),
        };
        if !opts.quiet {
            eprintln!("{}", step_line(&s));
        }
        summaries.push(s);
    }
    checkpoint::prune(out)?;
    let final_weights = match data.weights {
        _ if opts.lora.is_some() => None,
        Some(w) if first_step > steps => Some(w),
        _ => Some(engine.weights()?),
    };
    Ok(RunSummary { partition, eval_init: eval_init_rec, steps: summaries, final_weights })
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
    // A model folder holds config.json, a LoRA step's adapter folder adapter_config.json.
    let saved = |t: usize| {
        let dir = out.join(format!("step-{t}"));
        dir.join("config.json").is_file() || dir.join(crate::lora::CONFIG_FILE).is_file()
    };
    if let Some(t) = (1..=done).find(|&t| !saved(t)) {
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
fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON serialises") + "\n";
    crate::weights::write_file_atomic(path, text.as_bytes())
}
