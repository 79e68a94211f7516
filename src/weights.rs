//! Model parameters in fp32, in Hugging Face layout: every linear weight is `[out, in]`
//! row-major, as `nn.Linear` stores it. The same struct holds gradients and AdamW
//! moments, so everything that walks "all parameters" walks `LlamaWeights::tensors`.

use crate::config::LlamaConfig;

#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>, // [hidden]
    pub q_proj: Vec<f32>,     // [n_heads*head_dim, hidden]
    pub k_proj: Vec<f32>,     // [n_kv_heads*head_dim, hidden]
    pub v_proj: Vec<f32>,     // [n_kv_heads*head_dim, hidden]
    pub o_proj: Vec<f32>,     // [hidden, n_heads*head_dim]
    pub post_norm: Vec<f32>,  // [hidden]
    pub gate_proj: Vec<f32>,  // [intermediate, hidden]
    pub up_proj: Vec<f32>,    // [intermediate, hidden]
    pub down_proj: Vec<f32>,  // [hidden, intermediate]
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaWeights {
    pub embed: Vec<f32>, // [vocab, hidden]
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>, // [hidden]
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<Vec<f32>>, // [vocab, hidden]
}

/// One parameter's Hugging Face name and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl LlamaWeights {
    /// Every parameter of `cfg`, in the fixed order that `tensors` and `tensors_mut` use.
    pub fn specs(cfg: &LlamaConfig) -> Vec<TensorSpec> {
        let (h, i, q, kv, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
        let spec = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
        let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h])];
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}");
            out.push(spec(format!("{p}.input_layernorm.weight"), vec![h]));
            out.push(spec(format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push(spec(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push(spec(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push(spec(format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push(spec(format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push(spec(format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push(spec(format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push(spec(format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(spec("model.norm.weight".into(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(spec("lm_head.weight".into(), vec![v, h]));
        }
        out
    }

    /// All parameters set to `value` (zeros for gradients and moments, ones for norms).
    pub fn filled(cfg: &LlamaConfig, value: f32) -> Self {
        let (h, i, q, kv, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
        let layer = LayerWeights {
            input_norm: vec![value; h],
            q_proj: vec![value; q * h],
            k_proj: vec![value; kv * h],
            v_proj: vec![value; kv * h],
            o_proj: vec![value; h * q],
            post_norm: vec![value; h],
            gate_proj: vec![value; i * h],
            up_proj: vec![value; i * h],
            down_proj: vec![value; h * i],
        };
        LlamaWeights {
            embed: vec![value; v * h],
            layers: vec![layer; cfg.n_layers],
            norm: vec![value; h],
            lm_head: (!cfg.tie_word_embeddings).then(|| vec![value; v * h]),
        }
    }

    pub fn zeros(cfg: &LlamaConfig) -> Self {
        Self::filled(cfg, 0.0)
    }

    /// Random weights for benchmarks and tests: normals of std 0.02 from a seeded
    /// generator, norms at 1 (the usual Llama initialisation).
    pub fn random(cfg: &LlamaConfig, seed: u64) -> Self {
        let mut w = Self::zeros(cfg);
        let mut rng = SplitMix64(seed);
        let norm_names = |n: &str| n.ends_with("layernorm.weight") || n == "model.norm.weight";
        let specs = Self::specs(cfg);
        for (spec, t) in specs.iter().zip(w.tensors_mut()) {
            if norm_names(&spec.name) {
                t.fill(1.0);
            } else {
                t.iter_mut().for_each(|x| *x = 0.02 * rng.normal());
            }
        }
        w
    }

    /// The parameters in `specs` order.
    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        let mut out = vec![&self.embed];
        for l in &self.layers {
            out.extend([
                &l.input_norm,
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.post_norm,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]);
        }
        out.push(&self.norm);
        out.extend(self.lm_head.as_ref());
        out
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![&mut self.embed];
        for l in &mut self.layers {
            out.extend([
                &mut l.input_norm,
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.post_norm,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]);
        }
        out.push(&mut self.norm);
        out.extend(self.lm_head.as_mut());
        out
    }

    /// The LM head matrix: its own, or the embedding when tied.
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    pub fn numel(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }

    /// True when every value is finite.
    pub fn all_finite(&self) -> bool {
        self.tensors().iter().all(|t| t.iter().all(|x| x.is_finite()))
    }
}

/// A tiny deterministic generator (SplitMix64) with a Box–Muller normal, so random
/// weights need no extra dependency and are reproducible everywhere.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}
