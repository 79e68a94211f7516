//! `sdpo-run generate`: a completion of one prompt, greedy or sampled, with the CPU
//! engine's KV cache. The prompt is wrapped as a one-message user conversation by the
//! model's chat template; for the demo's character-level model that is `<s>` + the text.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

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
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (cfg, w) = load_model(&args.model, None)?;
    let tok_path = args.model.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))
        .context("generate needs the model folder's tokenizer.json")?;
    let text = if args.raw { args.prompt.clone() } else { apply_template(&args.model, &args.prompt)? };
    let enc = tokenizer.encode(text.as_str(), args.raw).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let ids = enc.get_ids().to_vec();
    anyhow::ensure!(!ids.is_empty(), "the prompt tokenizes to nothing");
    let engine = CpuEngine::new(cfg.clone(), w)?;
    let opts = GenOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
        stop: cfg.eos_token_ids.clone(),
    };
    let out = generate(&engine, &ids, &opts);
    let text = tokenizer.decode(&out, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    println!("{text}");
    Ok(())
}

/// The chat-templated prompt. The demo's template is `bos_token + content` (the only
/// form this renders directly); other templates need the data module's Jinja renderer.
fn apply_template(dir: &std::path::Path, prompt: &str) -> Result<String> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(prompt.to_string());
    };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let token = |k: &str| -> String {
        match &v[k] {
            serde_json::Value::String(s) => s.clone(),
            o => o["content"].as_str().unwrap_or("").to_string(),
        }
    };
    match v["chat_template"].as_str() {
        None => Ok(prompt.to_string()),
        Some(t) if t == DEMO_TEMPLATE => Ok(format!("{}{prompt}", token("bos_token"))),
        Some(_) => anyhow::bail!(
            "{}: this chat template needs the Jinja renderer, not available here yet; pass --raw with the \
             formatted prompt",
            path.display()
        ),
    }
}

const DEMO_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}";
