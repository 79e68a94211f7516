//! The flat parameter layout: every tensor of `LlamaWeights::specs`, in that order, at its
//! offset in one buffer (the bf16 weights, their remainder, the gradients and the AdamW
//! moments all use it), and named views of a buffer laid out that way.
//!
//! A layer's q, k, v are adjacent rows of one `[q_dim + 2·kv_dim, hidden]` matrix and its
//! gate, up of one `[2·intermediate, hidden]` matrix, so each pair runs as one GEMM (and
//! its weight gradient as one GEMM into the adjacent gradients); one AdamW or grad-norm
//! launch covers many tensors.

use std::collections::HashMap;

use super::kernels::DPtr;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::weights::LlamaWeights;

/// Elements `offset..offset + len` of a flat parameter buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

/// One layer's parameters as the kernels and GEMMs take them (the CPU engine's
/// `LayerWeights`, with q|k|v and gate|up fused).
#[derive(Clone, Copy)]
pub struct LayerParams<T> {
    /// `input_layernorm` `[hidden]`.
    pub attn_norm: T,
    /// `[Wq; Wk; Wv]` `[q_dim + 2·kv_dim, hidden]`.
    pub wqkv: T,
    /// `o_proj` `[hidden, q_dim]`.
    pub wo: T,
    /// `post_attention_layernorm` `[hidden]`.
    pub mlp_norm: T,
    /// `[Wgate; Wup]` `[2·intermediate, hidden]`.
    pub w_gate_up: T,
    /// `down_proj` `[hidden, intermediate]`.
    pub w_down: T,
}

/// The model's parameters, by name, as views of one flat buffer.
pub struct Params<T> {
    /// `[vocab, hidden]`.
    pub embed: T,
    pub layers: Vec<LayerParams<T>>,
    /// `[hidden]`.
    pub final_norm: T,
    /// `[vocab, hidden]`: its own tensor, or the tied embedding.
    pub lm_head: T,
}

impl<T: Copy> Params<T> {
    fn map<U>(&self, f: impl Fn(T) -> Result<U>) -> Result<Params<U>> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerParams {
                    attn_norm: f(l.attn_norm)?,
                    wqkv: f(l.wqkv)?,
                    wo: f(l.wo)?,
                    mlp_norm: f(l.mlp_norm)?,
                    w_gate_up: f(l.w_gate_up)?,
                    w_down: f(l.w_down)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Params { embed: f(self.embed)?, layers, final_norm: f(self.final_norm)?, lm_head: f(self.lm_head)? })
    }
}

/// Where a config's tensors lie in the flat parameter buffers.
pub struct ParamLayout {
    /// Per tensor in `specs` order: its name and span.
    pub tensors: Vec<(String, Span)>,
    /// Elements of each flat buffer.
    pub total: usize,
    pub named: Params<Span>,
}

/// Elements a tensor of `numel` takes in the flat parameter buffers: padded to a multiple
/// of 8, so that every tensor starts 32-byte aligned in f32 and 16-byte aligned in bf16.
fn padded(numel: usize) -> usize {
    numel.div_ceil(8) * 8
}

impl ParamLayout {
    pub fn new(cfg: &LlamaConfig) -> Result<Self> {
        let mut tensors = Vec::new();
        let mut total = 0;
        for s in LlamaWeights::specs(cfg) {
            let len = s.numel();
            tensors.push((s.name, Span { offset: total, len }));
            total += padded(len);
        }
        let index: HashMap<&str, Span> = tensors.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let one = |name: &str| {
            index.get(name).copied().ok_or_else(|| Error::Cuda(format!("no tensor `{name}` in the parameter layout")))
        };
        // Tensors that run as one GEMM: adjacent, with no padding between them.
        let fused = |names: &[String]| -> Result<Span> {
            let first = one(&names[0])?;
            let mut len = 0;
            for name in names {
                let s = one(name)?;
                if s.offset != first.offset + len {
                    return Err(Error::Cuda(format!("{names:?} are not adjacent in the flat parameter buffers")));
                }
                len += s.len;
            }
            Ok(Span { offset: first.offset, len })
        };
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let p = |t: &str| format!("model.layers.{l}.{t}.weight");
                Ok(LayerParams {
                    attn_norm: one(&p("input_layernorm"))?,
                    wqkv: fused(&[p("self_attn.q_proj"), p("self_attn.k_proj"), p("self_attn.v_proj")])?,
                    wo: one(&p("self_attn.o_proj"))?,
                    mlp_norm: one(&p("post_attention_layernorm"))?,
                    w_gate_up: fused(&[p("mlp.gate_proj"), p("mlp.up_proj")])?,
                    w_down: one(&p("mlp.down_proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        let embed = one("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings { embed } else { one("lm_head.weight")? };
        let named = Params { embed, layers, final_norm: one("model.norm.weight")?, lm_head };
        Ok(ParamLayout { tensors, total, named })
    }

    /// Elements of the flat parameter buffers of `cfg`.
    pub fn total_of(cfg: &LlamaConfig) -> usize {
        LlamaWeights::specs(cfg).iter().map(|s| padded(s.numel())).sum()
    }

    /// The named views of `buf`, a flat buffer of this layout.
    pub fn views<T>(&self, buf: DPtr<T>) -> Result<Params<DPtr<T>>> {
        self.named.map(|s| buf.slice(s.offset, s.len))
    }
}
