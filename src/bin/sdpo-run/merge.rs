//! `sdpo-run merge`: a base model and a PEFT LoRA adapter folded into one Hugging Face
//! model folder (`W += s·B·A`, as PEFT's `merge_and_unload`), in the base's dtype.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use sdpo::lora::{merge_into, Adapter};
use sdpo::outputs::{self, Existing, FolderKind, OutputFolder};
use sdpo::weights::write_model_files;

use crate::train::load_model;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model the adapter was trained on (a Hugging Face folder).
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter folder (e.g. out/step-2 of a LoRA run).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The merged model's folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a merged model sdpo-run wrote there before.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: MergeArgs) -> Result<()> {
    outputs::check_not_input(&args.out, "--out", &[args.model.as_path(), args.adapter.as_path()])?;
    let existing = if args.overwrite { Existing::Replace } else { Existing::Refuse };
    let folder = OutputFolder::claim(&args.out, FolderKind::Model, existing, "pass --overwrite to replace it")?;
    let result = (|| -> Result<()> {
        let (cfg, mut w) = load_model(&args.model, None)?;
        let adapter = Adapter::load(&args.adapter, &cfg)?;
        merge_into(&cfg, &mut w, &adapter);
        folder.clear()?;
        write_model_files(&args.out, &cfg, &w, cfg.dtype, Some(&args.model))
            .with_context(|| format!("writing {}", args.out.display()))
    })();
    if result.is_err() {
        folder.abandon(|_| false);
    }
    result
}
