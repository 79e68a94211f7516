//! `LlamaConfig` from a Hugging Face `config.json`, as transformers 4.x and 5.x write it.
//!
//! Anything this engine does not implement (another architecture, attention or MLP bias,
//! a sliding window, an unknown rope type) is rejected with an error naming the field,
//! never silently computed wrong.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Storage dtype of a checkpoint (`torch_dtype` / `dtype`); checkpoints are saved back in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
}

/// transformers' LlamaConfig default for a config.json without `max_position_embeddings`.
pub const DEFAULT_MAX_POSITION_EMBEDDINGS: usize = 2048;

/// How rotary frequencies are derived from `rope_theta` (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Dynamic NTK: the default frequencies for positions below `max_position_embeddings`,
    /// which is all it ever sees here (`engine::check_inputs` refuses positions beyond it).
    Dynamic,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// The embedding row that gets no gradient from the input lookup (transformers'
    /// `nn.Embedding(padding_idx = pad_token_id)`); a negative id counts from the end.
    pub pad_token_id: Option<u32>,
    pub bos_token_ids: Vec<u32>,
    pub eos_token_ids: Vec<u32>,
    pub dtype: DType,
    /// The file as read, written back (with `dtype` updated) when a checkpoint is saved.
    pub raw: Value,
}

impl LlamaConfig {
    /// Reads `<dir>/config.json` (or the file itself when given a file).
    pub fn from_path(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::file(path, "not found: expected a Hugging Face model folder holding config.json"));
        }
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        if !file.exists() {
            return Err(Error::file(&file, "not found: a Hugging Face model folder needs its config.json"));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::file(&file, format!("not valid JSON: {e}")))?;
        Self::from_json(raw).map_err(|msg| Error::file(&file, msg))
    }

    /// Parses a config.json value; the error is a message naming the field.
    pub fn from_json(raw: Value) -> std::result::Result<Self, String> {
        let obj = raw.as_object().ok_or("expected a JSON object")?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let uint = |k: &str| -> std::result::Result<usize, String> {
            let v = get(k).ok_or_else(|| format!("missing field `{k}`"))?;
            v.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| format!("field `{k}` must be a positive integer, found {v}"))
        };
        let boolean = |k: &str, default: bool| -> std::result::Result<bool, String> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| format!("field `{k}` must be true or false, found {v}")),
            }
        };

        let model_type = get("model_type").and_then(Value::as_str).unwrap_or("llama");
        if model_type != "llama" {
            return Err(format!(
                "model_type `{model_type}` is not supported: sdpo implements the Llama architecture only"
            ));
        }
        if let Some(archs) = get("architectures").and_then(Value::as_array) {
            if let Some(a) = archs.iter().filter_map(Value::as_str).find(|a| *a != "LlamaForCausalLM") {
                return Err(format!("architecture `{a}` is not supported: expected LlamaForCausalLM"));
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if boolean(flag, false)? {
                return Err(format!("`{flag}: true` is not supported: sdpo's Llama has no bias terms"));
            }
        }
        if let Some(w) = get("sliding_window") {
            return Err(format!("`sliding_window: {w}` is not supported: sdpo attends over the whole sequence"));
        }
        // transformers' ACT2FN maps both names to the same SiLU.
        if let Some(act) = get("hidden_act") {
            if !matches!(act.as_str(), Some("silu" | "swish")) {
                return Err(format!("`hidden_act: {act}` is not supported: expected \"silu\" (SwiGLU)"));
            }
        }
        if let Some(p) = get("attention_dropout") {
            if p.as_f64() != Some(0.0) {
                return Err(format!(
                    "`attention_dropout: {p}` is not supported: transformers drops attention weights at random \
                     while training (TRL's disable_dropout does not reach it); set it to 0.0"
                ));
            }
        }
        if let Some(q) = get("quantization_config") {
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown");
            return Err(format!(
                "`quantization_config` ({method}) is not supported: sdpo trains float32, bfloat16 or float16 weights"
            ));
        }

        let hidden_size = uint("hidden_size")?;
        let n_heads = uint("num_attention_heads")?;
        let n_kv_heads = if get("num_key_value_heads").is_some() { uint("num_key_value_heads")? } else { n_heads };
        if n_heads % n_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv_heads})"
            ));
        }
        let head_dim = if get("head_dim").is_some() {
            uint("head_dim")?
        } else if hidden_size % n_heads == 0 {
            hidden_size / n_heads
        } else {
            return Err(format!(
                "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({n_heads}); set `head_dim`"
            ));
        };
        if head_dim % 2 != 0 {
            return Err(format!("head_dim ({head_dim}) must be even for rotary embeddings"));
        }

        // transformers 5 moves rope settings into `rope_parameters`; 4.x has `rope_theta`
        // at the top level and an optional `rope_scaling` object.
        let rope_params = get("rope_parameters").or_else(|| get("rope_scaling")).filter(|v| v.is_object());
        let rope_theta = get("rope_theta")
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")))
            .map(|v| v.as_f64().ok_or_else(|| format!("`rope_theta` must be a number, found {v}")))
            .transpose()?
            .unwrap_or(10000.0);
        let rope_scaling = match rope_params {
            None => RopeScaling::Default,
            Some(p) => parse_rope(p)?,
        };

        let rms_norm_eps = match get("rms_norm_eps") {
            None => 1e-6,
            Some(v) => v.as_f64().ok_or_else(|| format!("`rms_norm_eps` must be a number, found {v}"))? as f32,
        };
        let dtype = match get("torch_dtype").or_else(|| get("dtype")).and_then(Value::as_str) {
            None | Some("float32") => DType::F32,
            Some("bfloat16") => DType::BF16,
            Some("float16") => DType::F16,
            Some(other) => {
                return Err(format!("dtype `{other}` is not supported: expected float32, bfloat16 or float16"))
            }
        };

        let vocab_size = uint("vocab_size")?;
        let pad_token_id = match get("pad_token_id") {
            None => None,
            Some(v) => Some(padding_row(v, vocab_size)?),
        };

        Ok(LlamaConfig {
            hidden_size,
            intermediate_size: uint("intermediate_size")?,
            n_layers: uint("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: if get("max_position_embeddings").is_some() {
                uint("max_position_embeddings")?
            } else {
                DEFAULT_MAX_POSITION_EMBEDDINGS
            },
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: boolean("tie_word_embeddings", false)?,
            pad_token_id,
            // Absent, transformers' LlamaConfig takes bos 1 and eos 2; null is none.
            bos_token_ids: match obj.get("bos_token_id") {
                None => vec![1],
                v => token_ids(v.filter(|v| !v.is_null()), "bos_token_id")?,
            },
            eos_token_ids: match obj.get("eos_token_id") {
                None => vec![2],
                v => token_ids(v.filter(|v| !v.is_null()), "eos_token_id")?,
            },
            dtype,
            raw,
        })
    }

    /// Rotary inverse frequencies, `head_dim / 2` of them, as transformers computes them
    /// (float32, then rescaled by the rope type).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> =
            (0..d / 2).map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32) as f64).collect();
        match self.rope_scaling {
            RopeScaling::Default | RopeScaling::Dynamic => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers' `~(wavelen < high) & ~(wavelen > low)`; wavelengths are finite.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Parameters that go through matrix multiplies (LM head included, tied or not):
    /// the N of DESIGN.md's 6·N FLOPs per trained token.
    pub fn matmul_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let per_layer = h * self.q_dim() * 2 + h * self.kv_dim() * 2 + 3 * h * i;
        self.n_layers * per_layer + self.vocab_size * h
    }

    /// The config.json to write beside saved weights.
    pub fn to_json(&self, dtype: DType) -> Value {
        let mut v = self.raw.clone();
        if let Some(o) = v.as_object_mut() {
            let key = if o.contains_key("dtype") { "dtype" } else { "torch_dtype" };
            o.insert(key.into(), Value::from(dtype.hf_name()));
        }
        v
    }
}

fn parse_rope(p: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f64, String> {
        p.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope `{kind}` needs a number `{k}` in rope_scaling / rope_parameters"))
    };
    if let Some(f) = p.get("partial_rotary_factor").filter(|f| f.as_f64() != Some(1.0)) {
        return Err(format!("`partial_rotary_factor: {f}` is not supported: sdpo rotates the whole head_dim"));
    }
    let why = match kind {
        "yarn" | "longrope" => Some("it also scales cos and sin by an attention factor, which the kernels do not"),
        "proportional" => Some("it leaves part of each head unrotated"),
        _ => None,
    };
    if let Some(why) = why {
        return Err(format!(
            "rope type `{kind}` (rope_scaling / rope_parameters) is not supported: {why}; \
             sdpo implements default, dynamic (within max_position_embeddings), linear and llama3"
        ));
    }
    match kind {
        "default" => Ok(RopeScaling::Default),
        "dynamic" => Ok(RopeScaling::Dynamic),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope type `{other}` (rope_scaling / rope_parameters) is not supported: expected default, dynamic, linear or llama3"
        )),
    }
}

/// `pad_token_id` as PyTorch's `nn.Embedding` takes its `padding_idx`: within
/// `[-vocab_size, vocab_size)`, a negative one counting from the end.
fn padding_row(v: &Value, vocab_size: usize) -> std::result::Result<u32, String> {
    let id = v.as_i64().ok_or_else(|| format!("`pad_token_id` must be an integer token id, found {v}"))?;
    let vocab = vocab_size as i64;
    if !(-vocab..vocab).contains(&id) {
        return Err(format!(
            "`pad_token_id: {id}` is outside the vocabulary (vocab_size {vocab_size}); transformers refuses it too \
             (nn.Embedding's padding_idx must lie in [-{vocab_size}, {vocab_size})): set it to a token id or null"
        ));
    }
    Ok(id.rem_euclid(vocab) as u32)
}

pub(crate) fn token_ids(v: Option<&Value>, field: &str) -> std::result::Result<Vec<u32>, String> {
    let bad = |v: &Value| format!("`{field}` must be a token id or a list of them, found {v}");
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|n| n as u32).ok_or_else(|| bad(x))).collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).ok_or_else(|| bad(x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "attention_dropout": 0.0, "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": 2})
    }

    fn with(field: &str, v: Value) -> std::result::Result<LlamaConfig, String> {
        let mut c = base();
        c[field] = v;
        LlamaConfig::from_json(c)
    }

    /// Every field DESIGN.md's table marks as refused, one case each: the error names the
    /// field (or the value it refuses).
    #[test]
    fn refused_fields_are_errors_that_name_them() {
        let rope = |kind: &str| json!({"rope_type": kind, "factor": 2.0, "original_max_position_embeddings": 64});
        let cases = [
            ("model_type", json!("mistral"), "model_type `mistral`"),
            ("architectures", json!(["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
            ("attention_bias", json!(true), "`attention_bias: true`"),
            ("mlp_bias", json!(true), "`mlp_bias: true`"),
            ("sliding_window", json!(4096), "`sliding_window: 4096`"),
            ("hidden_act", json!("gelu"), "`hidden_act: \"gelu\"`"),
            ("attention_dropout", json!(0.1), "`attention_dropout: 0.1`"),
            ("quantization_config", json!({"quant_method": "gptq"}), "`quantization_config` (gptq)"),
            ("rope_scaling", rope("yarn"), "rope type `yarn`"),
            ("rope_scaling", rope("longrope"), "rope type `longrope`"),
            ("rope_parameters", rope("proportional"), "rope type `proportional`"),
            ("rope_parameters", rope("su"), "rope type `su`"),
            (
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
                "`partial_rotary_factor: 0.5`",
            ),
            ("rope_scaling", json!({"type": "linear"}), "needs a number `factor`"),
            ("pad_token_id", json!(100), "`pad_token_id: 100`"),
            ("pad_token_id", json!(-101), "`pad_token_id: -101`"),
            ("pad_token_id", json!("<pad>"), "`pad_token_id` must be an integer"),
            ("eos_token_id", json!([2, "x"]), "`eos_token_id` must be a token id"),
            ("bos_token_id", json!(-1), "`bos_token_id` must be a token id"),
            ("torch_dtype", json!("float8_e4m3fn"), "dtype `float8_e4m3fn`"),
            ("head_dim", json!(7), "head_dim (7) must be even"),
            ("num_key_value_heads", json!(3), "multiple of num_key_value_heads (3)"),
            ("tie_word_embeddings", json!("yes"), "`tie_word_embeddings` must be true or false"),
        ];
        for (field, v, want) in cases {
            let err = with(field, v.clone()).err().unwrap_or_else(|| panic!("{field}: {v} was accepted"));
            assert!(err.contains(want), "{field}: {v}: {err}");
        }
    }

    /// Values transformers' Llama computes the same as the defaults: accepted.
    #[test]
    fn equivalent_values_are_accepted() {
        assert!(with("hidden_act", json!("swish")).is_ok(), "ACT2FN's swish is nn.SiLU");
        assert!(with("attention_dropout", json!(0)).is_ok());
        assert!(with("pretraining_tp", json!(4)).is_ok(), "transformers 5's Llama does not read it");
        let linear = json!({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0});
        assert_eq!(with("rope_scaling", linear).unwrap().rope_scaling, RopeScaling::Linear { factor: 2.0 });
        // dynamic NTK at seq_len = max_position_embeddings: base·(factor − (factor − 1))^… = base
        let dynamic = with("rope_scaling", json!({"rope_type": "dynamic", "factor": 3.7})).unwrap();
        assert_eq!(dynamic.inv_freq(), LlamaConfig::from_json(base()).unwrap().inv_freq());
        assert_eq!(with("eos_token_id", json!([2, 7])).unwrap().eos_token_ids, [2, 7]);
        assert_eq!(with("eos_token_id", Value::Null).unwrap().eos_token_ids, Vec::<u32>::new());
        let mut c = base();
        c.as_object_mut().unwrap().retain(|k, _| !k.ends_with("_token_id"));
        let c = LlamaConfig::from_json(c).unwrap();
        assert_eq!((c.bos_token_ids, c.eos_token_ids), (vec![1], vec![2]), "LlamaConfig's defaults");
    }

    /// nn.Embedding's padding_idx: within the vocabulary, a negative one from the end.
    #[test]
    fn pad_token_id_is_a_row_of_the_embedding() {
        assert_eq!(base()["pad_token_id"], Value::Null);
        assert_eq!(LlamaConfig::from_json(base()).unwrap().pad_token_id, None);
        assert_eq!(with("pad_token_id", json!(2)).unwrap().pad_token_id, Some(2));
        assert_eq!(with("pad_token_id", json!(-1)).unwrap().pad_token_id, Some(99));
        assert_eq!(with("pad_token_id", json!(-100)).unwrap().pad_token_id, Some(0));
    }

    /// rms_norm_eps is used in float32, as torch adds a Python float to a float32 tensor:
    /// 1e-5 and its float32 value written as a double are the same eps.
    #[test]
    fn rms_norm_eps_is_rounded_to_float32() {
        let a = with("rms_norm_eps", json!(1e-5)).unwrap().rms_norm_eps;
        let b = with("rms_norm_eps", json!(9.999999747378752e-06)).unwrap().rms_norm_eps;
        assert_eq!(a.to_bits(), b.to_bits());
        assert_eq!(a as f64, 9.999999747378752e-06);
    }
}
