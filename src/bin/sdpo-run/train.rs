//! `sdpo-run train`: sDPO (or plain DPO with `--steps 1`, or SFT with `--loss sft`) from
//! flags or a `--config run.toml` (flags override the file). The resolved configuration is
//! written to `<out>/run.toml`; a run is resumed with `--resume` and the same settings.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use sdpo::checkpoint::{Inputs, INPUTS_FILE};
use sdpo::config::LlamaConfig;
use sdpo::data::{load_pairs, DataOptions};
use sdpo::dpo::{LossConfig, LossKind};
use sdpo::engine::{self, AdamWConfig, Device, Engine};
use sdpo::lora::{Adapter, LoraConfig, LoraWeights};
use sdpo::outputs::{self, Existing, FolderKind, OutputFolder};
use sdpo::partition::{split_eval, PartitionKind};
use sdpo::sdpo::{ReferenceMode, RunSummary, SdpoOptions};
use sdpo::train::{Schedule, TrainOptions};
use sdpo::weights::write_file_atomic;
use sdpo::{Layout, LlamaWeights, PairExample};

/// The batch layout as the subcommands' `--layout` and run.toml spell it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutName {
    /// `[prompt | chosen | rejected]` per pair, the prompt computed once.
    #[default]
    Shared,
    /// `[prompt | chosen]` and `[prompt | rejected]` as two sequences, as TRL does.
    Concatenated,
}

impl From<LayoutName> for Layout {
    fn from(l: LayoutName) -> Layout {
        match l {
            LayoutName::Shared => Layout::Shared,
            LayoutName::Concatenated => Layout::Concatenated,
        }
    }
}

/// Where the metrics go besides metrics.jsonl (TRL's `report_to`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// metrics.jsonl only.
    #[default]
    None,
    /// Also TensorBoard event files in `<out>/tensorboard/`, written as training goes.
    Tensorboard,
}

/// The resolved run configuration, as run.toml holds it. Defaults follow Zephyr / TRL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub eval_data: Vec<PathBuf>,
    pub eval_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    pub partition: PartitionKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    pub length_normalize: bool,
    pub loss: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub sft_weight: f64,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub epochs: usize,
    pub batch_pairs: usize,
    pub micro_batch_tokens: usize,
    pub layout: LayoutName,
    pub weight_decay: f64,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub seed: u64,
    pub save_every: u64,
    pub reference: ReferenceMode,
    pub carry_optimizer: bool,
    pub carry_schedule: bool,
    pub device: Device,
    pub report_to: ReportTo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_init: Option<u64>,
    // How records are read and tokenized (the `DataOptions` flags), so that run.toml holds
    // everything that decides the token ids trained on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_length: Option<usize>,
    pub prompt_field: String,
    pub chosen_field: String,
    pub rejected_field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_field: Option<String>,
    pub source_field: String,
    // LoRA: the base (--model) is frozen and an adapter trains (see `lora_adapter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora_targets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    pub use_rslora: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

impl Default for RunConfig {
    fn default() -> Self {
        let t = TrainOptions::default();
        let a = AdamWConfig::default();
        let d = DataOptions::default();
        RunConfig {
            model: None,
            data: Vec::new(),
            eval_data: Vec::new(),
            eval_fraction: 0.0,
            out: None,
            partition: PartitionKind::Sources,
            steps: None,
            length_normalize: false,
            loss: LossKind::Sigmoid,
            beta: t.loss.beta,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            lr: t.lr,
            warmup_ratio: t.warmup_ratio,
            schedule: t.schedule,
            epochs: t.epochs,
            batch_pairs: t.batch_pairs,
            micro_batch_tokens: t.micro_batch_tokens,
            layout: LayoutName::Shared,
            weight_decay: a.weight_decay,
            max_grad_norm: a.max_grad_norm.unwrap_or(0.0),
            adam_beta1: a.beta1,
            adam_beta2: a.beta2,
            adam_eps: a.eps,
            seed: t.seed,
            save_every: 0,
            reference: ReferenceMode::Precomputed,
            carry_optimizer: false,
            carry_schedule: false,
            device: Device::Auto,
            report_to: ReportTo::None,
            random_init: None,
            chat_template: d.chat_template,
            max_length: d.max_length,
            max_prompt_length: d.max_prompt_length,
            prompt_field: d.prompt_field,
            chosen_field: d.chosen_field,
            rejected_field: d.rejected_field,
            system_field: d.system_field,
            source_field: d.source_field,
            lora_r: None,
            lora_alpha: None,
            lora_targets: Vec::new(),
            lora_dropout: None,
            use_rslora: false,
            adapter: None,
        }
    }
}

impl RunConfig {
    pub fn train_options(&self) -> TrainOptions {
        TrainOptions {
            loss: LossConfig {
                kind: self.loss,
                beta: self.beta,
                label_smoothing: self.label_smoothing,
                sft_weight: self.sft_weight,
            },
            adamw: AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_eps,
                weight_decay: self.weight_decay,
                max_grad_norm: (self.max_grad_norm != 0.0).then_some(self.max_grad_norm),
            },
            lr: self.lr,
            warmup_ratio: self.warmup_ratio,
            schedule: self.schedule,
            epochs: self.epochs,
            batch_pairs: self.batch_pairs,
            micro_batch_tokens: self.micro_batch_tokens,
            layout: self.layout.into(),
            seed: self.seed,
        }
    }

    pub fn data_options(&self) -> DataOptions {
        DataOptions {
            chat_template: self.chat_template.clone(),
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            prompt_field: self.prompt_field.clone(),
            chosen_field: self.chosen_field.clone(),
            rejected_field: self.rejected_field.clone(),
            system_field: self.system_field.clone(),
            source_field: self.source_field.clone(),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the run configuration serialises to TOML")
    }
}

/// Flags; each one given overrides the config file (and the file overrides the defaults).
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// A run.toml with any of the settings below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The starting model M_0: a Hugging Face folder (config.json + safetensors).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: preference records (JSONL / JSON / parquet; prompt / chosen /
    /// rejected as text or messages, or pre-tokenized prompt_ids / chosen_ids /
    /// rejected_ids). Each file is a source unless records name theirs.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Held-out evaluation data (same formats); evaluated after every sDPO step.
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Hold out this share of --data for evaluation instead (seeded).
    #[arg(long, allow_negative_numbers = true)]
    pub eval_fraction: Option<f64>,
    /// Output folder: step-1 … step-T, metrics.jsonl, partition.json, run.toml.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How the data is split into chunks D_1 … D_T [default: sources].
    #[arg(long, value_enum)]
    pub partition: Option<PartitionKind>,
    /// T, the number of sDPO steps (for `sources`: the number of sources).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Rank pairs by per-token mean log-probs (difficulty partition).
    #[arg(long)]
    pub length_normalize: bool,
    /// Loss [default: sigmoid]; `sft` trains on the chosen answers only.
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// β [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub label_smoothing: Option<f64>,
    /// Adds this weight times the chosen answers' NLL (TRL's rpo_alpha).
    #[arg(long, allow_negative_numbers = true)]
    pub sft_weight: Option<f64>,
    /// Peak learning rate [default: 5e-7].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Warmup share of each step's updates [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_ratio: Option<f64>,
    /// Decay after warmup [default: linear].
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Epochs over each chunk [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Pairs per optimiser update (global batch) [default: 32].
    #[arg(long)]
    pub batch_pairs: Option<usize>,
    /// Token budget of one micro-batch [default: 4096].
    #[arg(long)]
    pub micro_batch_tokens: Option<usize>,
    #[arg(long, value_enum)]
    pub layout: Option<LayoutName>,
    /// AdamW weight decay [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Gradient clipping (global L2 norm; 0 = off) [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    pub max_grad_norm: Option<f64>,
    /// Seed for shuffling, random partitions and eval splits [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a resumable state every N updates (0 = only at the end of each step).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// precomputed: score each chunk with M_{t−1} first, then hold one model; inline: a
    /// second engine holds M_{t−1}.
    #[arg(long, value_enum)]
    pub reference: Option<ReferenceMode>,
    /// Keep AdamW's moments from one sDPO step to the next (default: fresh per step).
    #[arg(long)]
    pub carry_optimizer: bool,
    /// One learning-rate schedule over all steps (default: a fresh one per step).
    #[arg(long)]
    pub carry_schedule: bool,
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Also write the metrics as TensorBoard event files in <out>/tensorboard/ [default: none].
    #[arg(long, value_enum)]
    pub report_to: Option<ReportTo>,
    /// Start from random weights (this seed) with --model's config.json (for SFT from scratch).
    #[arg(long)]
    pub random_init: Option<u64>,
    /// Continue the run in --out from its last complete state, with the same settings
    /// (--lr may be lowered) and the same model and data. With `--config RUN/run.toml` and
    /// no --out, the run folder is the one holding that run.toml.
    #[arg(long)]
    pub resume: bool,
    /// Replace an earlier sdpo-run run in --out: only a folder sdpo-run marked as a run,
    /// and in it only the entries a run writes.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// How records are read and tokenized (saved in run.toml like the other settings; a
    /// field-name flag left at its default does not override the file).
    #[command(flatten)]
    pub data_options: DataOptions,
    /// LoRA: train a rank-R adapter over the frozen --model (PEFT's LoRA; step-t/ is a
    /// PEFT adapter folder). CPU engine only for now.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA's α; the adapter is scaled by α/r (α/√r with --use-rslora) [default: 8, as PEFT].
    #[arg(long, allow_negative_numbers = true)]
    pub lora_alpha: Option<f64>,
    /// The linear layers to adapt, comma-separated: q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj, or all-linear [default: q_proj,v_proj, as PEFT for Llama].
    #[arg(long, num_args = 1..)]
    pub lora_targets: Vec<String>,
    /// Dropout on the adapters' input, masks seeded by --seed [default: 0, or --adapter's].
    #[arg(long, allow_negative_numbers = true)]
    pub lora_dropout: Option<f64>,
    /// Scale the adapter by α/√r (rsLoRA) instead of α/r.
    #[arg(long)]
    pub use_rslora: bool,
    /// Start from this PEFT adapter folder (e.g. an SFT adapter, M_0 = --model ⊕ it); its
    /// adapter_config.json gives r, α and the targets.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Testing aid: corrupt the policy with NaN before this process's k-th update (1-based).
    #[arg(long, hide = true)]
    pub debug_nan_at: Option<u64>,
    /// Testing aid: sleep this many milliseconds after every update.
    #[arg(long, hide = true, default_value_t = 0)]
    pub debug_sleep_ms: u64,
}

/// Defaults, then the config file, then the flags.
pub fn resolve(args: &TrainArgs) -> Result<RunConfig> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<RunConfig>(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
                .context("the config file's keys are the flags' long names with `_` for `-`")?
        }
        None => RunConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = args.$f.clone() { c.$f = v; } )* };
    }
    set!(
        eval_fraction,
        partition,
        loss,
        beta,
        label_smoothing,
        sft_weight,
        lr,
        warmup_ratio,
        schedule,
        epochs,
        batch_pairs,
        micro_batch_tokens,
        layout,
        weight_decay,
        max_grad_norm,
        seed,
        save_every,
        reference,
        device,
        report_to
    );
    // Optional settings: a flag that is given replaces the file's value.
    macro_rules! set_given {
        ($src:expr; $($f:ident),*) => { $( if $src.$f.is_some() { c.$f = $src.$f.clone(); } )* };
    }
    set_given!(args; model, out, steps, random_init, lora_r, lora_alpha, lora_dropout, adapter);
    if !args.lora_targets.is_empty() {
        c.lora_targets = args.lora_targets.clone();
    }
    c.use_rslora |= args.use_rslora;
    if !args.data.is_empty() {
        c.data = args.data.clone();
    }
    if !args.eval_data.is_empty() {
        c.eval_data = args.eval_data.clone();
    }
    // clap fills the field-name flags with their defaults, so only a value that differs
    // from the default can be told apart from "not given".
    let (d, given) = (DataOptions::default(), &args.data_options);
    for (now, flag, default) in [
        (&mut c.prompt_field, &given.prompt_field, &d.prompt_field),
        (&mut c.chosen_field, &given.chosen_field, &d.chosen_field),
        (&mut c.rejected_field, &given.rejected_field, &d.rejected_field),
        (&mut c.source_field, &given.source_field, &d.source_field),
    ] {
        if flag != default {
            now.clone_from(flag);
        }
    }
    set_given!(given; chat_template, max_length, max_prompt_length, system_field);
    c.length_normalize |= args.length_normalize;
    c.carry_optimizer |= args.carry_optimizer;
    c.carry_schedule |= args.carry_schedule;
    // With --resume and no --out, a run.toml read from a run folder names that folder,
    // wherever it has moved since.
    if let (true, None, Some(config)) = (args.resume, &args.out, &args.config) {
        let dir = config.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if outputs::is_marked(dir, FolderKind::Run) {
            c.out = Some(dir.to_path_buf());
        }
    }
    c.train_options().check()?;
    ensure!((0.0..1.0).contains(&c.eval_fraction), "--eval-fraction must be in [0, 1), got {}", c.eval_fraction);
    ensure!(c.steps != Some(0), "--steps must be at least 1");
    if c.lora_r.is_none() {
        let set = [
            ("--lora-alpha", c.lora_alpha.is_some()),
            ("--lora-targets", !c.lora_targets.is_empty()),
            ("--use-rslora", c.use_rslora),
        ];
        if let Some((flag, _)) = set.iter().find(|(_, on)| *on) {
            ensure!(
                c.adapter.is_none(),
                "{flag} with --adapter: the adapter's adapter_config.json sets r, α, the targets and rsLoRA"
            );
            bail!("{flag} needs --lora-r (a LoRA run) or --adapter");
        }
        ensure!(c.lora_dropout.is_none() || c.adapter.is_some(), "--lora-dropout needs --lora-r or --adapter");
    } else {
        ensure!(
            c.adapter.is_none(),
            "--lora-r with --adapter: the adapter's adapter_config.json sets its rank; pass one of them"
        );
    }
    Ok(c)
}

/// A LoRA run's adapter_0: `--adapter`'s, or a fresh one from the --lora-* settings
/// (seeded by --seed); `None` when the run fine-tunes every weight.
fn lora_adapter(c: &RunConfig, cfg: &LlamaConfig, model: &Path) -> Result<Option<Adapter>> {
    let base_model = model.display().to_string();
    let mut adapter = match (&c.adapter, c.lora_r) {
        (Some(dir), _) => Adapter { base_model, ..Adapter::load(dir, cfg)? },
        (None, Some(r)) => {
            let targets = if c.lora_targets.is_empty() { vec!["q_proj,v_proj".into()] } else { c.lora_targets.clone() };
            let lc = LoraConfig::new(r, c.lora_alpha, &targets, c.lora_dropout.unwrap_or(0.0), c.use_rslora)?;
            Adapter::fresh(cfg, lc, c.seed, base_model)
        }
        (None, None) => return Ok(None),
    };
    if let Some(p) = c.lora_dropout {
        adapter.config.dropout = p;
        adapter.config.check().map_err(anyhow::Error::msg)?;
    }
    adapter.config.dropout_seed = c.seed;
    Ok(Some(adapter))
}

/// Loads pairs from files (JSONL / JSON / parquet records, text or conversations, or
/// pre-tokenized ids), tokenized for the model in `model_dir` with its chat template.
pub fn load_data(files: &[PathBuf], opts: &DataOptions, model_dir: &Path, quiet: bool) -> Result<Vec<PairExample>> {
    for f in files {
        ensure!(
            f.is_file(),
            "{}: {}; data files are preference records (JSONL / JSON / parquet) or pre-tokenized JSONL",
            f.display(),
            if f.exists() { "not a file" } else { "no such file" }
        );
    }
    let (pairs, summary) = load_pairs(files, opts, model_dir, !quiet)?;
    if !quiet {
        eprintln!("{summary}");
    }
    anyhow::ensure!(!pairs.is_empty(), "no pairs left in {files:?} after tokenization and truncation");
    Ok(pairs)
}

/// The model folder's config and weights (or random weights with `random_init`).
pub fn load_model(dir: &Path, random_init: Option<u64>) -> Result<(LlamaConfig, LlamaWeights)> {
    let cfg = LlamaConfig::from_path(dir)?;
    let w = match random_init {
        Some(seed) => LlamaWeights::random(&cfg, seed),
        None => LlamaWeights::load(dir, &cfg)?,
    };
    Ok((cfg, w))
}

/// The settings of the run in `out` (its run.toml), checked against `now` for a resume:
/// everything must match but the output folder (a run folder can move) and the learning
/// rate (lowered to get past a divergence). Returns the configuration to go on with, and
/// rewrites run.toml when either changed.
fn resume_config(out: &Path, now: RunConfig) -> Result<RunConfig> {
    let run_toml = out.join("run.toml");
    ensure!(run_toml.is_file(), "--resume: {} has no run.toml: nothing to resume", out.display());
    let text = std::fs::read_to_string(&run_toml).with_context(|| format!("reading {}", run_toml.display()))?;
    let saved: RunConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", run_toml.display()))?;
    let fixed = RunConfig { out: now.out.clone(), lr: now.lr, ..saved.clone() };
    if fixed != now {
        let (was, is) = (saved.to_toml(), now.to_toml());
        let changed: Vec<String> = is.lines().filter(|l| !was.lines().any(|w| w == *l)).map(String::from).collect();
        let gone: Vec<String> = was.lines().filter(|l| !is.lines().any(|w| w == *l)).map(String::from).collect();
        bail!(
            "--resume: the settings differ from {} (the run being resumed): now {}; then {}. Resume with the \
             same flags, or with `--config {} --resume` (only --lr may change)",
            run_toml.display(),
            changed.join(", "),
            gone.join(", "),
            run_toml.display()
        );
    }
    if now != saved {
        if now.lr != saved.lr {
            eprintln!("--resume: learning rate {} from here on (the run began with {})", now.lr, saved.lr);
        }
        write_file_atomic(&run_toml, now.to_toml().as_bytes())?;
    }
    Ok(now)
}

/// Entries that mean a run trained something: a failed start removes the rest.
fn is_result(name: &str) -> bool {
    name == "metrics.jsonl" || name.starts_with("step-") || name.starts_with("state-")
}

pub fn run(args: TrainArgs) -> Result<()> {
    let c = resolve(&args)?;
    let model = c.model.clone().context("--model is required (a Hugging Face model folder)")?;
    let out = c.out.clone().context("--out is required (the run's output folder)")?;
    ensure!(!c.data.is_empty(), "--data is required (preference records or pre-tokenized JSONL files)");
    ensure!(!(args.resume && args.overwrite), "--resume and --overwrite contradict each other: pass one");
    let mut inputs: Vec<&Path> = vec![&model];
    inputs.extend(c.data.iter().chain(&c.eval_data).chain(&c.chat_template).chain(&c.adapter).map(PathBuf::as_path));
    outputs::check_not_input(&out, "--out", &inputs)?;
    let existing = match (args.resume, args.overwrite) {
        (true, _) => Existing::Keep,
        (false, true) => Existing::Replace,
        (false, false) => Existing::Refuse,
    };
    let folder = OutputFolder::claim(
        &out,
        FolderKind::Run,
        existing,
        "pass --resume to continue that run, --overwrite to replace it",
    )?;
    let result = run_in(&args, c, &folder);
    if result.is_err() && !args.resume {
        // A run that failed before it trained anything leaves nothing that would need --overwrite.
        folder.abandon(is_result);
    }
    result
}

/// The run, once `folder` (the --out folder) is held.
fn run_in(args: &TrainArgs, c: RunConfig, folder: &OutputFolder) -> Result<()> {
    let (model, out) = (c.model.clone().unwrap_or_default(), folder.path().to_path_buf());
    let c = if args.resume { resume_config(&out, c)? } else { c };
    let (cfg, m0) = load_model(&model, c.random_init)?;
    let data_options = c.data_options();
    let data = load_data(&c.data, &data_options, &model, args.quiet)?;
    let (train, eval) = if c.eval_data.is_empty() {
        split_eval(data, c.eval_fraction, c.seed)
    } else {
        (data, load_data(&c.eval_data, &data_options, &model, args.quiet)?)
    };
    let files: Vec<PathBuf> = c.data.iter().chain(&c.eval_data).cloned().collect();
    let adapter = lora_adapter(&c, &cfg, &model)?;
    let fingerprint = Inputs::of(&cfg, &m0, &files, &train, &eval, adapter.as_ref())?;
    if args.resume {
        match Inputs::load(&out)? {
            Some(then) => {
                let diff = then.differences(&fingerprint);
                ensure!(
                    diff.is_empty(),
                    "--resume: the inputs differ from those {} was trained on: {}. Resume with the run's own \
                     model and data, or start a new run (another --out)",
                    out.display(),
                    diff.join("; ")
                );
            }
            None => eprintln!(
                "--resume: {} has no {INPUTS_FILE} (a run from an older sdpo-run): the data cannot be checked",
                out.display()
            ),
        }
    } else {
        // Only now, with every input loaded: an old run in --out goes (--overwrite).
        folder.clear()?;
        write_file_atomic(&out.join("run.toml"), c.to_toml().as_bytes())?;
        fingerprint.save(&out)?;
    }
    let opts = SdpoOptions {
        train: c.train_options(),
        partition: c.partition,
        steps: c.steps,
        length_normalize: c.length_normalize,
        reference: c.reference,
        carry_optimizer: c.carry_optimizer,
        carry_schedule: c.carry_schedule,
        save_every: c.save_every,
        out: out.clone(),
        resume: args.resume,
        tokenizer_from: Some(model.clone()),
        quiet: args.quiet,
        tensorboard: c.report_to == ReportTo::Tensorboard,
        lora: adapter,
    };
    let device = c.device;
    let faults = Faults { nan_at: args.debug_nan_at, sleep_ms: args.debug_sleep_ms };
    let factory =
        move |cfg: &LlamaConfig, w: LlamaWeights, adapter: Option<Adapter>| -> sdpo::Result<Box<dyn Engine>> {
            let e = match adapter {
                Some(a) => engine::open_lora(device, cfg.clone(), w, a)?,
                None => engine::open(device, cfg.clone(), w)?,
            };
            Ok(if faults.any() { Box::new(FaultyEngine { inner: e, faults, updates: 0 }) } else { e })
        };
    let t0 = std::time::Instant::now();
    let result = sdpo::sdpo::run(&opts, &cfg, m0, &train, &eval, &factory);
    // Every run ends with its report page, a failed one too: its curves show what went wrong.
    let report = sdpo::report::write_for_run(&out);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let diverged = matches!(e, sdpo::Error::Diverged(_));
            if diverged && sdpo::checkpoint::latest(&out).ok().flatten().is_some() {
                bail!(
                    "{e}\nto continue: sdpo-run train --config {} --resume --lr LOWER",
                    out.join("run.toml").display()
                );
            }
            return Err(e.into());
        }
    };
    print_summary(&summary, &out, t0.elapsed().as_secs_f64());
    match report {
        Ok(path) => println!("report: {}", path.display()),
        Err(e) => eprintln!("warning: the report page was not written: {e}"),
    }
    Ok(())
}

/// The hidden testing flags: faults a test puts into a run through the binary.
#[derive(Clone, Copy)]
struct Faults {
    nan_at: Option<u64>,
    sleep_ms: u64,
}

impl Faults {
    fn any(&self) -> bool {
        self.nan_at.is_some() || self.sleep_ms > 0
    }
}

/// An engine that sleeps after every update (so a test can kill a run mid-step) and puts a
/// NaN into its weights before update `nan_at` (after the state of the update before it
/// was saved), and otherwise is the engine it wraps.
struct FaultyEngine {
    inner: Box<dyn Engine>,
    faults: Faults,
    updates: u64,
}

impl Engine for FaultyEngine {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn sequence_logps(&mut self, batch: &sdpo::PairBatch) -> sdpo::Result<Vec<sdpo::PairLogps>> {
        self.inner.sequence_logps(batch)
    }
    fn train_step(
        &mut self,
        batch: &sdpo::PairBatch,
        reference: &[sdpo::PairLogps],
        loss: &sdpo::LossConfig,
        loss_scale: f64,
    ) -> sdpo::Result<Vec<sdpo::PairLogps>> {
        if self.faults.nan_at == Some(self.updates + 1) {
            let mut w = self.inner.weights()?;
            w.embed[0] = f32::NAN;
            w.norm.iter_mut().for_each(|x| *x = f32::NAN);
            self.inner.set_weights(&w)?;
        }
        self.inner.train_step(batch, reference, loss, loss_scale)
    }
    fn optimizer_step(&mut self, opt: &AdamWConfig, lr: f64) -> sdpo::Result<f64> {
        let norm = self.inner.optimizer_step(opt, lr)?;
        self.updates += 1;
        std::thread::sleep(std::time::Duration::from_millis(self.faults.sleep_ms));
        Ok(norm)
    }
    fn zero_grads(&mut self) {
        self.inner.zero_grads()
    }
    fn grads(&self) -> sdpo::Result<LlamaWeights> {
        self.inner.grads()
    }
    fn weights(&self) -> sdpo::Result<LlamaWeights> {
        self.inner.weights()
    }
    fn set_weights(&mut self, w: &LlamaWeights) -> sdpo::Result<()> {
        self.inner.set_weights(w)
    }
    fn optimizer_state(&self) -> sdpo::Result<Option<sdpo::engine::AdamState>> {
        self.inner.optimizer_state()
    }
    fn set_optimizer_state(&mut self, state: Option<sdpo::engine::AdamState>) -> sdpo::Result<()> {
        self.inner.set_optimizer_state(state)
    }
    fn adapter(&self) -> sdpo::Result<Option<LoraWeights>> {
        self.inner.adapter()
    }
    fn set_adapter(&mut self, a: &LoraWeights) -> sdpo::Result<()> {
        self.inner.set_adapter(a)
    }
    fn set_adapter_enabled(&mut self, on: bool) -> sdpo::Result<()> {
        self.inner.set_adapter_enabled(on)
    }
    fn adapter_grads(&self) -> sdpo::Result<LoraWeights> {
        self.inner.adapter_grads()
    }
    fn adapter_optimizer_state(&self) -> sdpo::Result<Option<sdpo::engine::AdamState<LoraWeights>>> {
        self.inner.adapter_optimizer_state()
    }
    fn set_adapter_optimizer_state(&mut self, state: Option<sdpo::engine::AdamState<LoraWeights>>) -> sdpo::Result<()> {
        self.inner.set_adapter_optimizer_state(state)
    }
}

pub fn print_summary(s: &RunSummary, out: &Path, seconds: f64) {
    println!("step  chunk                 pairs  updates  train loss  train acc  eval acc vs M_0  vs M_t-1  mean γ");
    if let Some(e) = &s.eval_init {
        println!(
            "{:<4}  {:<20}  {:>5}  {:>7}  {:>10}  {:>9}  {:>15}  {:>8}  {:>7.3}",
            0, "M_0", "", "", "", "", "", "", e.mean_gamma
        );
    }
    for st in &s.steps {
        let (a0, ap, g) = match &st.eval {
            Some(e) => (
                format!("{:.3}", e.vs_init.accuracy),
                format!("{:.3}", e.vs_prev.accuracy),
                format!("{:.3}", e.mean_gamma),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<4}  {:<20}  {:>5}  {:>7}  {:>10.4}  {:>9.3}  {:>15}  {:>8}  {:>7}",
            st.step, st.chunk, st.n_pairs, st.updates, st.train_loss, st.train_accuracy, a0, ap, g
        );
    }
    println!(
        "models in {}/step-1 … step-{}; metrics in {}/metrics.jsonl ({seconds:.1}s)",
        out.display(),
        s.partition.chunks.len(),
        out.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn flags_override_the_config_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("sdpo-runtoml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, "lr = 1e-6\nbeta = 0.2\npartition = \"difficulty\"\nsteps = 3\ndata = [\"a.jsonl\"]\n")
            .unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap(), "--beta", "0.3", "--carry-schedule"]);
        let c = resolve(&cli.args).unwrap();
        assert_eq!((c.lr, c.beta, c.steps, c.partition), (1e-6, 0.3, Some(3), PartitionKind::Difficulty));
        assert!(c.carry_schedule && !c.carry_optimizer);
        assert_eq!(c.data, vec![PathBuf::from("a.jsonl")]);
        // untouched settings keep Zephyr/TRL's defaults
        assert_eq!((c.warmup_ratio, c.batch_pairs, c.epochs, c.max_grad_norm), (0.1, 32, 1, 1.0));
        // the written run.toml reads back to the same configuration
        assert_eq!(toml::from_str::<RunConfig>(&c.to_toml()).unwrap(), c);
        // data-reading settings: the file's, unless a flag gives another value
        std::fs::write(&path, "prompt_field = \"question\"\nmax_length = 512\nsystem_field = \"system\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap(), "--max-length", "256"]);
        let c = resolve(&cli.args).unwrap();
        let d = c.data_options();
        assert_eq!(
            (d.prompt_field.as_str(), d.max_length, d.system_field.as_deref()),
            ("question", Some(256), Some("system"))
        );
        assert_eq!((d.chosen_field.as_str(), d.chat_template), ("chosen", None));
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap(), "--prompt-field", "instruction"]);
        assert_eq!(resolve(&cli.args).unwrap().prompt_field, "instruction");
        assert_eq!(toml::from_str::<RunConfig>(&c.to_toml()).unwrap(), c);
        // without any of them, run.toml keeps DataOptions' defaults
        let d = RunConfig::default().data_options();
        let want = DataOptions::default();
        assert_eq!(
            (d.prompt_field, d.source_field, d.max_length),
            (want.prompt_field, want.source_field, want.max_length)
        );
        // so is where the metrics go
        std::fs::write(&path, "report_to = \"tensorboard\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        assert_eq!(resolve(&cli.args).unwrap().report_to, ReportTo::Tensorboard);
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap(), "--report-to", "none"]);
        assert_eq!(resolve(&cli.args).unwrap().report_to, ReportTo::None);
        // an unknown key is an error that names it
        std::fs::write(&path, "learning_rate = 1e-6\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        let err = format!("{:#}", resolve(&cli.args).unwrap_err());
        assert!(err.contains("learning_rate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
