//! `sdpo-run report`: one self-contained HTML page (inline SVG, no script, no network)
//! with the curves, mean γ per step, eval tables and configurations of one or more run
//! folders, overlaid for comparison.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use sdpo::outputs;
use sdpo::report::{load_runs, write, INPUTS};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run folders (each with a metrics.jsonl; run.toml and partition.json when present).
    #[arg(num_args = 1.., required = true)]
    pub runs: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists (never one of the run folders' files).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let inputs: Vec<PathBuf> = args.runs.iter().flat_map(|d| INPUTS.map(|f| d.join(f))).collect();
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    outputs::check_output_file(&args.out, "--out", &inputs, args.overwrite)?;
    let runs = load_runs(&args.runs)?;
    write(&runs, &args.out)?;
    println!("report of {} run(s): {}", runs.len(), args.out.display());
    Ok(())
}
