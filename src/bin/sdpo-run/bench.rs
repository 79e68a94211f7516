//! `sdpo-run bench`: training throughput, MFU, peak memory and the time split of one
//! engine on a model of a published shape with random weights (see `sdpo::bench`).
//! Prints one JSON line (the keys are documented on `sdpo::bench::BenchReport` and at the
//! top of tools/compare_torch.py), then a short table on stderr.
//!
//! `sdpo-run bench --attention`: causal attention alone, forward and backward
//! (`sdpo::bench::run_attention`; keys on `AttentionReport`), against which
//! `tools/compare_torch.py --attention` times PyTorch's SDPA.

use anyhow::Result;
use clap::Args;

use sdpo::bench::{self, AttentionOptions, BenchOptions, Shape};
use sdpo::engine::Device;

use crate::train::LayoutName;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model shape (random weights). Default: tiny on the CPU, llama-1b on CUDA.
    #[arg(long, value_enum, conflicts_with = "attention")]
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
    /// Timed steps (each: one reference pass and one training step are timed; with
    /// --attention: timed calls of the forward, the backward, and both, median reported).
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
    /// Time causal attention alone (forward, backward, both) instead of training: B
    /// sequences of S tokens. Default sizes: B 4, S 2048, 32 heads of 128 on CUDA (as
    /// FlashAttention's benchmarks); B 1, S 512 on the CPU, which finishes in seconds.
    #[arg(long)]
    pub attention: bool,
    /// --attention: sequences (B).
    #[arg(long, requires = "attention")]
    pub batch: Option<usize>,
    /// --attention: tokens per sequence (S).
    #[arg(long, requires = "attention")]
    pub seq_len: Option<usize>,
    /// --attention: query heads (H, default 32).
    #[arg(long, requires = "attention")]
    pub heads: Option<usize>,
    /// --attention: key/value heads (default: as many as --heads).
    #[arg(long, requires = "attention")]
    pub kv_heads: Option<usize>,
    /// --attention: head dimension (D, default 128; CUDA: 16, 32, 64 or 128).
    #[arg(long, requires = "attention")]
    pub head_dim: Option<usize>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.attention {
        return run_attention(args);
    }
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

fn run_attention(args: BenchArgs) -> Result<()> {
    let opts = AttentionOptions {
        device: args.device,
        batch: args.batch,
        seq_len: args.seq_len,
        heads: args.heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
    };
    let report = bench::run_attention(&opts)?;
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
