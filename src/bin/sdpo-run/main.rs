//! `sdpo-run`: the command line. Each subcommand lives in its own module beside this file.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sdpo-run", version, about = "Stepwise DPO (sDPO) for Llama models")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => {
            println!("sdpo-run: no command yet");
            Ok(())
        }
    }
}
