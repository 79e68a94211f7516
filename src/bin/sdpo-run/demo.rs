//! `sdpo-run demo` (also what `sdpo-run` with no arguments runs): the built-in addition
//! task, DPO vs sDPO (random chunks) vs sDPO (easy to hard) from the shipped SFT model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use sdpo::data::pretokenized::write_pairs;
use sdpo::demo::{demo_data, exact_match, run_demo, DemoOptions};

/// Sizes of the demo's data (per source: 1-, 2- and 3-digit sums).
const TRAIN_PER_SOURCE: usize = 1024;
const EVAL_PER_SOURCE: usize = 100;
const SFT_PER_SOURCE: usize = 4000;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the runs go. A folder the demo wrote before is replaced; any other
    /// non-empty folder is refused.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Show each run's progress and per-step lines.
    #[arg(long)]
    pub verbose: bool,
    /// Only write the demo's data as pre-tokenized JSONL (sft.jsonl, train.jsonl,
    /// eval.jsonl) into this folder, for `sdpo-run train` (see README: the demo model).
    /// A non-empty folder is refused unless --overwrite is given.
    #[arg(long)]
    pub write_data: Option<PathBuf>,
    /// With --write-data: replace the three files in a folder that holds only them.
    #[arg(long, requires = "write_data")]
    pub overwrite: bool,
    /// Only print a model's greedy exact-match accuracy on the demo's held-out sums.
    #[arg(long)]
    pub score: Option<PathBuf>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            out: PathBuf::from("runs/demo"),
            seed: 0,
            verbose: false,
            write_data: None,
            overwrite: false,
            score: None,
        }
    }
}

/// What --write-data writes, in the order of `DemoData`'s sft, train and eval sets.
const DATA_FILES: [&str; 3] = ["sft.jsonl", "train.jsonl", "eval.jsonl"];

/// Checks the --write-data folder before any work: missing or empty is fine; a non-empty
/// one needs --overwrite, and even then may hold nothing but the files the demo writes.
fn check_data_dir(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--write-data: {} exists and is not a folder: choose another --write-data folder", dir.display());
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "--write-data: {} exists and is not empty: choose another --write-data folder, or pass \
             --overwrite to replace its {}",
            dir.display(),
            DATA_FILES.join(", ")
        );
    }
    if let Some(other) = names.iter().find(|n| !DATA_FILES.contains(&n.as_str())) {
        bail!(
            "--overwrite: {} holds {other}, which `demo --write-data` does not write; refusing to write \
             there: choose another --write-data folder",
            dir.display()
        );
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<()> {
    if let Some(dir) = &args.score {
        let cfg = sdpo::LlamaConfig::from_path(dir)?;
        let w = sdpo::LlamaWeights::load(dir, &cfg)?;
        let d = demo_data(args.seed, TRAIN_PER_SOURCE, EVAL_PER_SOURCE, 0);
        let e = exact_match(&cfg, &w, &d.eval_problems)?;
        println!(
            "greedy exact match on {} held-out sums: 1-digit {:.3}, 2-digit {:.3}, 3-digit {:.3}, all {:.3}",
            d.eval_problems.len(),
            e[0],
            e[1],
            e[2],
            e[3]
        );
        return Ok(());
    }
    if let Some(dir) = &args.write_data {
        check_data_dir(dir, args.overwrite)?;
        let d = demo_data(args.seed, TRAIN_PER_SOURCE, EVAL_PER_SOURCE, SFT_PER_SOURCE);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // each file is written to a temporary sibling and renamed into place
        for (name, pairs) in [(DATA_FILES[0], &d.sft), (DATA_FILES[1], &d.train), (DATA_FILES[2], &d.eval)] {
            write_pairs(&dir.join(name), pairs)?;
        }
        println!(
            "wrote {} SFT examples, {} training pairs and {} eval pairs to {}",
            d.sft.len(),
            d.train.len(),
            d.eval.len(),
            dir.display()
        );
        return Ok(());
    }
    run_demo(&DemoOptions {
        out: args.out,
        seed: args.seed,
        quiet_runs: !args.verbose,
        train_per_source: TRAIN_PER_SOURCE,
        eval_per_source: EVAL_PER_SOURCE,
    })?;
    Ok(())
}
