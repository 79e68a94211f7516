//! Text generation with the CPU engine's KV cache: greedy (temperature 0) or sampling
//! from softmax(logits / temperature) with a seeded generator.

use std::path::Path;

use serde_json::Value;

use crate::config::{token_ids, LlamaConfig};
use crate::engine::cpu::CpuEngine;
use crate::error::{Error, Result};
use crate::weights::SplitMix64;

#[derive(Clone, Debug, PartialEq)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (the first of equal maxima).
    pub temperature: f64,
    pub seed: u64,
    /// Generation stops after producing one of these (it is included in the output).
    pub stop: Vec<u32>,
}

/// A sampling temperature is 0 (greedy) or a finite positive number.
pub fn check_temperature(t: f64) -> Result<()> {
    if t.is_finite() && t >= 0.0 {
        return Ok(());
    }
    Err(Error::invalid(format!("temperature {t}: expected 0 (greedy) or a positive number")))
}

/// The tokens generated after `prompt` (at most `max_new_tokens`, ending at a stop token
/// when one is produced, or at the model's `max_position_embeddings`). Errors, rather than
/// an empty or arbitrary answer: an empty prompt, a prompt that leaves no position for a
/// new token, a temperature that is not 0 or a positive number, and non-finite logits.
pub fn generate(engine: &CpuEngine, prompt: &[u32], opts: &GenOptions) -> Result<Vec<u32>> {
    check_temperature(opts.temperature)?;
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt has no tokens"));
    }
    let vocab = engine_vocab(engine);
    if let Some(id) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::invalid(format!(
            "the prompt holds the token id {id}, outside the model's vocabulary (vocab_size {vocab}): the \
             tokenizer and the model do not match"
        )));
    }
    let max_pos = engine_max_len(engine);
    if opts.max_new_tokens > 0 && prompt.len() >= max_pos {
        return Err(Error::invalid(format!(
            "the prompt is {} tokens, and the model's max_position_embeddings is {max_pos}: no position is left \
             for a new token; shorten the prompt",
            prompt.len()
        )));
    }
    let mut cache = engine.new_cache();
    let mut rng = SplitMix64(opts.seed);
    let mut out = Vec::new();
    let mut logits = engine.decode(&mut cache, prompt);
    while out.len() < opts.max_new_tokens && prompt.len() + out.len() < max_pos {
        if let Some(bad) = logits.iter().find(|l| !l.is_finite()) {
            return Err(Error::invalid(format!(
                "the model's logits at position {} are not finite ({bad}): its weights hold NaN or inf, or overflow; \
                 check the checkpoint",
                prompt.len() + out.len() - 1
            )));
        }
        let next = pick(&logits, opts.temperature, &mut rng);
        out.push(next);
        if opts.stop.contains(&next) {
            break;
        }
        logits = engine.decode(&mut cache, &[next]);
    }
    Ok(out)
}

/// The ids that end generation, as transformers' `generate` takes them: the model
/// folder's generation_config.json when there is one (its `eos_token_id`, an id or a list;
/// none there means generation stops only at its length), else config.json's `eos_token_id`.
pub fn eos_token_ids(model: &Path, cfg: &LlamaConfig) -> Result<Vec<u32>> {
    let file = model.join("generation_config.json");
    if !file.is_file() {
        return Ok(cfg.eos_token_ids.clone());
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&file, format!("not valid JSON: {e}")))?;
    token_ids(v.get("eos_token_id").filter(|x| !x.is_null()), "eos_token_id").map_err(|m| Error::file(&file, m))
}

fn engine_max_len(engine: &CpuEngine) -> usize {
    use crate::engine::Engine;
    engine.config().max_position_embeddings
}

fn engine_vocab(engine: &CpuEngine) -> usize {
    use crate::engine::Engine;
    engine.config().vocab_size
}

/// Greedy argmax, or a draw from softmax(logits / temperature).
pub fn pick(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    if temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    (logits.len() - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(eos: Value) -> LlamaConfig {
        LlamaConfig::from_json(serde_json::json!({"hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10, "eos_token_id": eos}))
        .unwrap()
    }

    /// generation_config.json's list wins over config.json's id, as transformers loads it;
    /// without the file, config.json's.
    #[test]
    fn eos_ids_come_from_generation_config_json() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(serde_json::json!(2));
        assert_eq!(eos_token_ids(dir.path(), &cfg).unwrap(), [2]);
        let gen = dir.path().join("generation_config.json");
        std::fs::write(&gen, r#"{"bos_token_id": 1, "eos_token_id": [7, 2]}"#).unwrap();
        assert_eq!(eos_token_ids(dir.path(), &cfg).unwrap(), [7, 2]);
        std::fs::write(&gen, r#"{"eos_token_id": null}"#).unwrap();
        assert_eq!(eos_token_ids(dir.path(), &cfg).unwrap(), Vec::<u32>::new());
        std::fs::write(&gen, r#"{"eos_token_id": "</s>"}"#).unwrap();
        let err = eos_token_ids(dir.path(), &cfg).unwrap_err().to_string();
        assert!(err.contains("generation_config.json") && err.contains("`eos_token_id`"), "{err}");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = SplitMix64(0);
        assert_eq!(pick(&[0.1, 2.0, 2.0, -1.0], 0.0, &mut rng), 1);
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // logits ln 1, ln 3 at temperature 1: probabilities 1/4 and 3/4.
        let mut rng = SplitMix64(5);
        let logits = [0.0f32, 3f32.ln()];
        let n = 20000;
        let ones = (0..n).filter(|_| pick(&logits, 1.0, &mut rng) == 1).count() as f64 / n as f64;
        // binomial std = sqrt(0.75·0.25/20000) ≈ 0.003: 0.02 is more than 6 sigma.
        assert!((ones - 0.75).abs() < 0.02, "{ones}");
        // temperature 0.5 squares the odds: 9:1.
        let ones = (0..n).filter(|_| pick(&logits, 0.5, &mut rng) == 1).count() as f64 / n as f64;
        assert!((ones - 0.9).abs() < 0.02, "{ones}");
    }
}
