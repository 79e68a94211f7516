//! `sdpo-run`: the command line. Each subcommand lives in its own module beside this file.

mod bench;
mod debug_step;
mod demo;
mod eval;
mod generate;
mod merge;
mod partition;
mod prepare;
mod report;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Tokenization (prepare, train --data) allocates many small strings per token from several
// threads; with mimalloc `prepare` takes 1.8x less CPU time than with glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sdpo-run", version, about = "Stepwise DPO (sDPO) for Llama models")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The built-in demo (what `sdpo-run` alone runs): DPO vs sDPO on an addition task.
    Demo(demo::DemoArgs),
    /// sDPO training: partition the data, then DPO step by step (T = 1 is plain DPO).
    Train(Box<train::TrainArgs>),
    /// Write the chunk assignment sDPO would use, without training.
    Partition(partition::PartitionArgs),
    /// A model against a reference on preference pairs: reward accuracy, margins, mean γ.
    Eval(eval::EvalArgs),
    /// Complete a prompt with a model (greedy or sampled).
    Generate(generate::GenerateArgs),
    /// One step's numbers (loss, metrics, per-pair log-probs, gradients) for inspection.
    DebugStep(debug_step::DebugStepArgs),
    /// Training speed on a model of a published shape: tokens/s, MFU, peak memory, time split.
    Bench(bench::BenchArgs),
    /// Preference records (JSONL/JSON/parquet, text or chat) -> pre-tokenized pairs, as TRL tokenizes them.
    Prepare(prepare::PrepareArgs),
    /// An HTML page of one or more runs: curves, mean γ per step, eval tables, run.toml.
    Report(report::ReportArgs),
    /// A base model and a PEFT LoRA adapter merged into one Hugging Face model folder.
    Merge(merge::MergeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo::run(demo::DemoArgs::default()),
        Some(Command::Demo(args)) => demo::run(args),
        Some(Command::Train(args)) => train::run(*args),
        Some(Command::Partition(args)) => partition::run(args),
        Some(Command::Eval(args)) => eval::run(args),
        Some(Command::Generate(args)) => generate::run(args),
        Some(Command::DebugStep(args)) => debug_step::run(args),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Prepare(args)) => prepare::run(args),
        Some(Command::Report(args)) => report::run(args),
        Some(Command::Merge(args)) => merge::run(args),
    };
    // One line a user can act on: the context chain, without a backtrace.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
