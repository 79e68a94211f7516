//! `sdpo-run demo` (also what `sdpo-run` with no arguments runs): the built-in addition
//! task, DPO vs sDPO (random chunks) vs sDPO (easy to hard) from the shipped SFT model.

use std::path::PathBuf;

use anyhow::Result;
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
    #[arg(long)]
    pub write_data: Option<PathBuf>,
    /// Only print a model's greedy exact-match accuracy on the demo's held-out sums.
    #[arg(long)]
    pub score: Option<PathBuf>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs { out: PathBuf::from("runs/demo"), seed: 0, verbose: false, write_data: None, score: None }
    }
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
        let d = demo_data(args.seed, TRAIN_PER_SOURCE, EVAL_PER_SOURCE, SFT_PER_SOURCE);
        std::fs::create_dir_all(dir)?;
        write_pairs(&dir.join("sft.jsonl"), &d.sft)?;
        write_pairs(&dir.join("train.jsonl"), &d.train)?;
        write_pairs(&dir.join("eval.jsonl"), &d.eval)?;
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
