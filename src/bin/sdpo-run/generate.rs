//! `sdpo-run generate`: a completion of one prompt, greedy or sampled, with the CPU
//! engine's KV cache. The prompt is wrapped as a one-message user conversation by the
//! model's chat template (the demo model's: `<s>` + the text), as training data is.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use sdpo::data::records::{Text, TextPair};
use sdpo::data::tokenize::PairTokenizer;
use sdpo::engine::cpu::CpuEngine;
use sdpo::generate::{generate, GenOptions};

use crate::train::load_model;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A model folder with tokenizer.json (e.g. runs/demo/sdpo-easy-to-hard/step-3).
    #[arg(long)]
    pub model: PathBuf,
    /// The user's message, e.g. `123+456=` for the demo model.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenize the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A PEFT LoRA adapter folder applied over --model (e.g. runs/lora/step-2).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    sdpo::generate::check_temperature(args.temperature).context("--temperature")?;
    let (cfg, w) = load_model(&args.model, None)?;
    let specs = sdpo::LlamaWeights::specs(&cfg);
    if let Some((s, _)) = specs.iter().zip(w.tensors()).find(|(_, t)| t.iter().any(|x| !x.is_finite())) {
        anyhow::bail!(
            "{}: tensor `{}` holds NaN or inf values; the checkpoint is damaged (or saved from a diverged run)",
            args.model.display(),
            s.name
        );
    }
    let ids = prompt_ids(&args.model, &args.prompt, args.raw)?;
    let tok_path = args.model.join("tokenizer.json");
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let engine = match &args.adapter {
        Some(dir) => CpuEngine::with_adapter(cfg.clone(), w, sdpo::lora::Adapter::load(dir, &cfg)?)?,
        None => CpuEngine::new(cfg.clone(), w)?,
    };
    let opts = GenOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
        stop: sdpo::generate::eos_token_ids(&args.model, &cfg)?,
    };
    let out = generate(&engine, &ids, &opts).with_context(|| format!("generating from {}", args.model.display()))?;
    let text = tokenizer.decode(&out, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    println!("{text}");
    Ok(())
}

/// The prompt's ids exactly as training tokenizes a prompt: a one-message user
/// conversation through the model's chat template (plain text with `--raw` or when the
/// model has none), cut where the answer would start.
fn prompt_ids(model: &std::path::Path, prompt: &str, raw: bool) -> Result<Vec<u32>> {
    let tok = PairTokenizer::load(model, None).context("generate needs the model folder's tokenizer")?;
    let chat = !raw && tok.has_chat_template();
    let text = |role: &str, t: &str| {
        if chat {
            Text::Chat(vec![serde_json::json!({"role": role, "content": t})])
        } else {
            Text::Plain(t.to_string())
        }
    };
    // The answers are placeholders: only the prompt part of the tokenized pair is used.
    let pair = TextPair {
        prompt: text("user", prompt),
        chosen: text("assistant", "a"),
        rejected: text("assistant", "b"),
        tools: None,
        source: String::new(),
    };
    let ids = tok.tokenize(&pair).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.prompt;
    anyhow::ensure!(!ids.is_empty(), "the prompt tokenizes to nothing");
    Ok(ids)
}
