//! `sdpo-run prepare`: preference records (JSONL / JSON / parquet; text, conversations,
//! implicit prompts) -> pre-tokenized pairs JSONL, tokenized exactly as TRL's DPOTrainer
//! tokenizes them. Prints a summary of what was read, kept, dropped and cut.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use sdpo::data::{load_pairs, pretokenized, DataOptions};

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Model directory: tokenizer.json, tokenizer_config.json (chat template, special
    /// tokens) or chat_template.jinja, and config.json (vocab_size) for pre-tokenized input.
    #[arg(long)]
    pub model: PathBuf,
    /// Record files (.jsonl, .json, .parquet); each file's stem is its pairs' default source
    /// (files with one stem in different folders get `folder/stem`).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Output: pre-tokenized pairs JSONL (prompt_ids, chosen_ids, rejected_ids, source).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists (never an input).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub data_options: DataOptions,
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let mut inputs: Vec<&Path> = vec![&args.model];
    inputs.extend(args.data.iter().chain(&args.data_options.chat_template).map(PathBuf::as_path));
    sdpo::outputs::check_output_file(&args.out, "--out", &inputs, args.overwrite)?;
    let t0 = Instant::now();
    let (pairs, summary) = load_pairs(&args.data, &args.data_options, &args.model, true)?;
    let secs = t0.elapsed().as_secs_f64();
    eprint!("{summary}");
    if pairs.is_empty() {
        bail!("no pair survived: nothing written to {}", args.out.display());
    }
    pretokenized::write_pairs(&args.out, &pairs).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} pairs to {} ({secs:.2} s reading and tokenizing, {:.0} pairs/s)",
        pairs.len(),
        args.out.display(),
        summary.read as f64 / secs.max(1e-9)
    );
    Ok(())
}
