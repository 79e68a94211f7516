//! `sdpo-run eval`: a model against a reference on preference pairs: reward accuracy and
//! margin (β·(log-ratio chosen − log-ratio rejected)), and each model's mean γ, overall and
//! per source.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use sdpo::dpo::PairLogps;
use sdpo::engine::{self, Device};
use sdpo::sdpo::versus;
use sdpo::train::{check_micro_batch_tokens, sequence_logps_all};
use sdpo::LossConfig;
use sdpo::PairExample;

use crate::train::{load_data, load_model, LayoutName};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The model to evaluate (e.g. out/step-2).
    #[arg(long)]
    pub model: PathBuf,
    /// The reference (e.g. the SFT model, or out/step-1).
    #[arg(long)]
    pub reference: PathBuf,
    /// Preference records (or pre-tokenized pairs), tokenized for --model.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub beta: f64,
    #[arg(long, default_value_t = 4096)]
    pub micro_batch_tokens: usize,
    #[arg(long, value_enum, default_value_t = LayoutName::Shared)]
    pub layout: LayoutName,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    #[command(flatten)]
    pub data_options: sdpo::data::DataOptions,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A PEFT LoRA adapter folder applied over --model (e.g. runs/lora/step-2).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A PEFT LoRA adapter folder applied over --reference (e.g. runs/lora/step-1).
    #[arg(long)]
    pub reference_adapter: Option<PathBuf>,
}

fn mean_gamma(v: &[PairLogps]) -> f64 {
    v.iter().map(PairLogps::gamma).sum::<f64>() / v.len().max(1) as f64
}

pub fn run(args: EvalArgs) -> Result<()> {
    LossConfig { beta: args.beta, ..LossConfig::default() }.check()?;
    check_micro_batch_tokens(args.micro_batch_tokens)?;
    let (cfg, w) = load_model(&args.model, None)?;
    let (rcfg, rw) = load_model(&args.reference, None)?;
    anyhow::ensure!(
        rcfg.vocab_size == cfg.vocab_size,
        "the reference {} has vocab_size {}, the model {} has {}: they must share a tokenizer",
        args.reference.display(),
        rcfg.vocab_size,
        args.model.display(),
        cfg.vocab_size
    );
    let pairs = load_data(&args.data, &args.data_options, &args.model, false)?;
    let refs: Vec<&PairExample> = pairs.iter().collect();
    let score = |cfg: sdpo::LlamaConfig, w, adapter: &Option<PathBuf>| -> Result<Vec<PairLogps>> {
        let mut e = match adapter {
            Some(dir) => {
                let a = sdpo::lora::Adapter::load(dir, &cfg)?;
                engine::open_lora(args.device, cfg, w, a)?
            }
            None => engine::open(args.device, cfg, w)?,
        };
        Ok(sequence_logps_all(e.as_mut(), &refs, args.micro_batch_tokens, args.layout.into(), Some("scoring"))?)
    };
    let m = score(cfg, w, &args.adapter)?;
    let r = score(rcfg, rw, &args.reference_adapter)?;
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, p) in pairs.iter().enumerate() {
        groups.entry(p.source.clone()).or_default().push(i);
    }
    let mut rows = vec![("all".to_string(), (0..pairs.len()).collect::<Vec<_>>())];
    if groups.len() > 1 {
        rows.extend(groups);
    }
    let mut out = Vec::new();
    for (name, idx) in rows {
        let mi: Vec<PairLogps> = idx.iter().map(|&i| m[i]).collect();
        let ri: Vec<PairLogps> = idx.iter().map(|&i| r[i]).collect();
        let v = versus(&mi, &ri, args.beta);
        out.push(json!({"source": name, "n_pairs": idx.len(), "rewards/accuracies": v.accuracy,
            "rewards/margins": v.margin, "model/mean_gamma": mean_gamma(&mi), "reference/mean_gamma": mean_gamma(&ri)}));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<16} {:>6} {:>9} {:>9} {:>12} {:>12}",
            "source", "pairs", "accuracy", "margin", "γ model", "γ reference"
        );
        for o in &out {
            println!(
                "{:<16} {:>6} {:>9.3} {:>9.3} {:>12.3} {:>12.3}",
                o["source"].as_str().unwrap_or(""),
                o["n_pairs"],
                o["rewards/accuracies"].as_f64().unwrap_or(f64::NAN),
                o["rewards/margins"].as_f64().unwrap_or(f64::NAN),
                o["model/mean_gamma"].as_f64().unwrap_or(f64::NAN),
                o["reference/mean_gamma"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}
