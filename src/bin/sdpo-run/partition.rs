//! `sdpo-run partition`: the chunks sDPO would train on, without training. Writes JSON:
//! each chunk (name, pairs, M_0's accuracy γ > 0 and mean γ on it) and each pair's chunk
//! and score.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use sdpo::engine::{self, Device};
use sdpo::outputs;
use sdpo::partition::{partition, partition_report, PartitionKind};
use sdpo::train::{check_micro_batch_tokens, sequence_logps_all};
use sdpo::weights::write_file_atomic;
use sdpo::PairExample;

use crate::train::{load_data, load_model, LayoutName};

#[derive(Args, Debug)]
pub struct PartitionArgs {
    /// The initial model M_0 (scores pairs for `sources` and `difficulty`).
    #[arg(long)]
    pub model: PathBuf,
    /// Preference records (or pre-tokenized pairs); each file is a source unless records name theirs.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = PartitionKind::Sources)]
    pub partition: PartitionKind,
    /// T (for `sources`: leave unset, one chunk per source).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub length_normalize: bool,
    #[arg(long, default_value_t = 4096)]
    pub micro_batch_tokens: usize,
    #[arg(long, value_enum, default_value_t = LayoutName::Shared)]
    pub layout: LayoutName,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    #[command(flatten)]
    pub data_options: sdpo::data::DataOptions,
    /// Write the JSON here (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists (never an input).
    #[arg(long)]
    pub overwrite: bool,
    /// A PEFT LoRA adapter over --model: M_0 = --model ⊕ it.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

pub fn run(args: PartitionArgs) -> Result<()> {
    // Before the scoring pass, not after it: a wrong --out should cost nothing.
    if let Some(path) = &args.out {
        let mut inputs: Vec<&Path> = vec![&args.model];
        inputs.extend(
            args.data.iter().chain(&args.data_options.chat_template).chain(&args.adapter).map(PathBuf::as_path),
        );
        outputs::check_output_file(path, "--out", &inputs, args.overwrite)?;
    }
    check_micro_batch_tokens(args.micro_batch_tokens)?;
    let (cfg, w) = load_model(&args.model, None)?;
    let pairs = load_data(&args.data, &args.data_options, &args.model, false)?;
    let scores = if args.partition.needs_scores() {
        let mut e = match &args.adapter {
            Some(dir) => engine::open_lora(args.device, cfg.clone(), w, sdpo::lora::Adapter::load(dir, &cfg)?)?,
            None => engine::open(args.device, cfg.clone(), w)?,
        };
        let refs: Vec<&PairExample> = pairs.iter().collect();
        Some(sequence_logps_all(
            e.as_mut(),
            &refs,
            args.micro_batch_tokens,
            args.layout.into(),
            Some("scoring the pairs with M_0"),
        )?)
    } else {
        None
    };
    let p = partition(&pairs, args.partition, args.steps, args.seed, scores.as_deref(), args.length_normalize)?;
    for (t, c) in p.chunks.iter().enumerate() {
        let acc = c
            .accuracy
            .map(|a| format!(", M_0 accuracy (γ > 0) {a:.3}, mean γ {:.3}", c.mean_gamma.unwrap_or(f64::NAN)));
        eprintln!("chunk {}: {} ({} pairs{})", t + 1, c.name, c.pairs.len(), acc.unwrap_or_default());
    }
    let text = serde_json::to_string_pretty(&partition_report(&p, &pairs))? + "\n";
    match &args.out {
        Some(path) => write_file_atomic(path, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(())
}
