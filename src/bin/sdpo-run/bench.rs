//! `sdpo-run bench`: training throughput, MFU, peak memory and the time split of one
//! engine on a model of a published shape with random weights (see `sdpo::bench`).
//! Prints one JSON line (the keys are documented on `sdpo::bench::BenchReport` and at the
//! top of tools/compare_torch.py), then a short table on stderr.

use anyhow::Result;
use clap::Args;

use sdpo::bench::{self, BenchOptions, Shape};
use sdpo::engine::Device;

use crate::train::LayoutName;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model shape (random weights). Default: tiny on the CPU, llama-1b on CUDA.
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Token budget of the micro-batch: it holds as many whole pairs of
    /// prompt-len + 2·answer-len tokens as fit.
    #[arg(long, default_value_t = 2048)]
    pub micro_batch_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Length of each answer (chosen and rejected).
    #[arg(long, default_value_t = 128)]
    pub answer_len: usize,
    /// Timed steps (each: one reference pass and one training step are timed).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed rounds before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = LayoutName::Shared)]
    pub layout: LayoutName,
    /// Run llama-1b and larger on the CPU anyway (16 bytes per parameter, minutes per step).
    #[arg(long)]
    pub force: bool,
    /// Side of the square fp32 GEMM that measures the CPU ceiling for MFU.
    #[arg(long, default_value_t = 2048)]
    pub ceiling_gemm: usize,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let opts = BenchOptions {
        shape: args.shape,
        device: args.device,
        micro_batch_tokens: args.micro_batch_tokens,
        prompt_len: args.prompt_len,
        answer_len: args.answer_len,
        steps: args.steps,
        warmup: args.warmup,
        layout: args.layout.into(),
        force: args.force,
        ceiling_gemm: args.ceiling_gemm,
        seed: args.seed,
    };
    let report = bench::run(&opts)?;
    let mut line = serde_json::to_value(&report)?;
    line["commit"] = git_commit().map_or(serde_json::Value::Null, serde_json::Value::from);
    println!("{}", serde_json::to_string(&line)?);
    eprint!("{}", report.table());
    Ok(())
}

/// The checkout's commit, when run from one (for BENCHMARKS.md entries).
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
