//! `sdpo-run debug-step`: one training step's numbers, for inspection and for comparing an
//! engine with another implementation. Runs the reference forward and the policy's forward
//! and backward on every pair of a pre-tokenized file as one batch, and writes
//! `DIR/metrics.json` (the loss, TRL's metrics, per-pair log-probs and rewards) and
//! `DIR/grads.safetensors` (the fp32 gradient of the mean loss for every parameter, under its
//! Hugging Face name). No optimizer step is taken and no weights are written.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use sdpo::config::{DType, LlamaConfig};
use sdpo::data::pretokenized::read_pairs;
use sdpo::dpo::{pair_loss, LossConfig, LossKind, Metrics};
use sdpo::engine::{self, Device};
use sdpo::lora::Adapter;
use sdpo::outputs::{self, Existing, FolderKind, OutputFolder};
use sdpo::weights::{save_model, save_tensors_f32, write_file_atomic};
use sdpo::{Layout, LlamaWeights, PairBatch, PairExample};

use crate::train::LayoutName;

#[derive(Args, Debug)]
pub struct DebugStepArgs {
    /// The policy: a Hugging Face model folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// The frozen reference model folder; defaults to the model itself.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Pre-tokenized pairs, JSONL with prompt_ids / chosen_ids / rejected_ids.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub beta: f64,
    #[arg(long, value_enum, default_value_t = LossKind::Sigmoid)]
    pub loss: LossKind,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub label_smoothing: f64,
    #[arg(long, value_enum, default_value_t = LayoutName::Shared)]
    pub layout: LayoutName,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Output folder (created): metrics.json and grads.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output of an earlier debug-step in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Also write the model as loaded back out with `save_model` (a Hugging Face folder,
    /// new or empty), for tools/check_checkpoint.py to load in transformers.
    #[arg(long)]
    pub save_model: Option<PathBuf>,
    /// A PEFT LoRA adapter over --model: the policy is --model ⊕ it, only the adapter has
    /// gradients (grads.safetensors under PEFT's keys).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A PEFT LoRA adapter over --reference (default: the bare reference).
    #[arg(long)]
    pub reference_adapter: Option<PathBuf>,
    /// Storage dtype of `--save-model`.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub save_dtype: DTypeArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

fn load(dir: &std::path::Path, what: &str) -> Result<(LlamaConfig, LlamaWeights)> {
    let cfg = LlamaConfig::from_path(dir).with_context(|| format!("reading the {what}'s config"))?;
    let w = LlamaWeights::load(dir, &cfg).with_context(|| format!("loading the {what}'s weights"))?;
    Ok((cfg, w))
}

pub fn run(args: DebugStepArgs) -> Result<()> {
    let loss_cfg =
        LossConfig { kind: args.loss, beta: args.beta, label_smoothing: args.label_smoothing, sft_weight: 0.0 };
    loss_cfg.check()?;
    let reference_dir = args.reference.clone().unwrap_or_else(|| args.model.clone());
    let mut inputs = vec![args.model.as_path(), reference_dir.as_path(), args.data.as_path()];
    inputs.extend(args.adapter.iter().chain(&args.reference_adapter).map(PathBuf::as_path));
    ensure!(
        args.adapter.is_none() || args.save_model.is_none(),
        "--save-model with --adapter: the base is not trained; `sdpo-run merge` writes base ⊕ adapter"
    );
    outputs::check_not_input(&args.out, "--out", &inputs)?;
    if let Some(dir) = &args.save_model {
        outputs::check_not_input(dir, "--save-model", &inputs)?;
        let non_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        ensure!(
            !non_empty && !dir.is_file(),
            "--save-model {}: exists and is not an empty folder; choose a new folder",
            dir.display()
        );
    }
    let existing = if args.overwrite { Existing::Replace } else { Existing::Refuse };
    let folder = OutputFolder::claim(&args.out, FolderKind::DebugStep, existing, "pass --overwrite to replace it")?;
    let result = step(&args, &reference_dir, &loss_cfg, &folder);
    if result.is_err() {
        // A folder this run created and left empty goes; an earlier output stays.
        folder.abandon(|_| false);
    }
    result
}

/// The step itself, once `folder` (--out) is held.
fn step(args: &DebugStepArgs, reference_dir: &Path, loss_cfg: &LossConfig, folder: &OutputFolder) -> Result<()> {
    let (cfg, weights) = load(&args.model, "model")?;
    let (ref_cfg, ref_weights) = load(reference_dir, "reference")?;
    ensure!(
        ref_cfg.vocab_size == cfg.vocab_size,
        "the reference {} has vocab_size {}, the model {} has {}: they must share a tokenizer",
        reference_dir.display(),
        ref_cfg.vocab_size,
        args.model.display(),
        cfg.vocab_size
    );
    let pairs = read_pairs(&args.data, cfg.vocab_size).context("reading the pairs")?;
    let layout: Layout = args.layout.into();
    let refs: Vec<&PairExample> = pairs.iter().collect();
    let batch = PairBatch::new(&refs, layout).context("packing the pairs into a batch")?;

    let open = |cfg: sdpo::LlamaConfig, w, adapter: &Option<PathBuf>| -> Result<Box<dyn sdpo::Engine>> {
        Ok(match adapter {
            Some(dir) => {
                let a = Adapter::load(dir, &cfg)?;
                engine::open_lora(args.device, cfg, w, a)?
            }
            None => engine::open(args.device, cfg, w)?,
        })
    };
    let reference = {
        let mut e = open(ref_cfg, ref_weights, &args.reference_adapter).context("starting the reference engine")?;
        e.sequence_logps(&batch).context("reference forward pass")?
    };
    if let Some(dir) = &args.save_model {
        let dtype = match args.save_dtype {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        };
        save_model(dir, &cfg, &weights, dtype, Some(&args.model))
            .with_context(|| format!("saving the model to {}", dir.display()))?;
    }
    let mut e = open(cfg.clone(), weights, &args.adapter).context("starting the engine")?;
    let policy =
        e.train_step(&batch, &reference, loss_cfg, 1.0 / pairs.len() as f64).context("forward and backward")?;
    // Every trained tensor's gradient by name: the model's, or the adapter's under PEFT's keys.
    let named: Vec<(String, Vec<usize>, Vec<f32>)> = if args.adapter.is_some() {
        let g = e.adapter_grads().context("reading the gradients")?;
        g.specs().into_iter().zip(g.tensors()).map(|(s, t)| (s.name, s.shape, t.clone())).collect()
    } else {
        let g = e.grads().context("reading the gradients")?;
        let specs = LlamaWeights::specs(&cfg);
        specs.into_iter().zip(g.tensors()).map(|(s, t)| (s.name, s.shape, t.clone())).collect()
    };

    let metrics = Metrics::from_pairs(&policy, &reference, loss_cfg);
    let per_pair: Vec<Value> = policy
        .iter()
        .zip(&reference)
        .zip(&pairs)
        .map(|((p, r), ex)| {
            let l = pair_loss(p, r, loss_cfg);
            json!({
                "policy_chosen_logp": p.chosen, "policy_rejected_logp": p.rejected,
                "reference_chosen_logp": r.chosen, "reference_rejected_logp": r.rejected,
                "reward_chosen": l.reward_chosen, "reward_rejected": l.reward_rejected,
                "loss": l.loss, "chosen_tokens": p.chosen_tokens, "rejected_tokens": p.rejected_tokens,
                "source": ex.source,
            })
        })
        .collect();
    let grad_norm = named.iter().flat_map(|t| t.2.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();

    let mut out = serde_json::to_value(&metrics)?;
    let o = out.as_object_mut().expect("Metrics serialises to an object");
    o.insert("loss_type".into(), serde_json::to_value(args.loss)?);
    o.insert("beta".into(), json!(args.beta));
    o.insert("label_smoothing".into(), json!(args.label_smoothing));
    o.insert("layout".into(), json!(format!("{:?}", args.layout).to_lowercase()));
    o.insert("device".into(), json!(e.device_name()));
    o.insert("grad_norm".into(), json!(grad_norm));
    o.insert("n_tokens".into(), json!(batch.n_tokens()));
    o.insert("pairs".into(), Value::Array(per_pair));

    // Each file atomically, metrics.json last: a folder with metrics.json is complete.
    folder.clear()?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        named.iter().map(|(n, s, t)| (n.clone(), s.clone(), t.as_slice())).collect();
    let grads_path = args.out.join("grads.safetensors");
    save_tensors_f32(&grads_path, &tensors).with_context(|| format!("writing {}", grads_path.display()))?;
    let metrics_path = args.out.join("metrics.json");
    let text = serde_json::to_string_pretty(&out)? + "\n";
    write_file_atomic(&metrics_path, text.as_bytes())?;

    println!(
        "{} pairs, {} tokens on {}: loss {:.6} (rewards/margins {:.6}, accuracy {:.3}), grad norm {:.6}",
        pairs.len(),
        batch.n_tokens(),
        e.device_name(),
        metrics.loss,
        metrics.rewards_margins,
        metrics.rewards_accuracies,
        grad_norm
    );
    println!("wrote {} and {}", metrics_path.display(), grads_path.display());
    Ok(())
}
