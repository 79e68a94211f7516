//! The Llama model on the CPU in fp32: forward over a `PairBatch` keeping what backward
//! needs, a hand-written backward, the DPO step, AdamW, and a KV-cache decoder for text
//! generation. Every op is in `ops.rs`; this file only strings them together.
//!
//! Per layer (pre-norm residual blocks, as `LlamaDecoderLayer`):
//! `xn1 = rmsnorm(x)`, `q,k,v = rope(xn1·Wqᵀ), rope(xn1·Wkᵀ), xn1·Wvᵀ`, `att = attention(q,k,v)`,
//! `x_mid = x + att·Woᵀ`, `xn2 = rmsnorm(x_mid)`, `act = silu(xn2·Wgᵀ)·(xn2·Wuᵀ)`,
//! `x_out = x_mid + act·Wdᵀ`. Then `xf = rmsnorm(x_L)` and the log-probs of the target rows.
//!
//! With a LoRA adapter (`with_adapter`) the base is frozen: each adapted linear adds
//! `s·(x·Aᵀ)·Bᵀ` to its output, backward computes the activation gradients through the
//! base and both adapter matrices' gradients, and AdamW walks the adapter alone.
//!
//! Threads: rayon's global pool (`RAYON_NUM_THREADS` sets its size).

use crate::config::LlamaConfig;
use crate::data::PairBatch;
use crate::dpo::{target_grads, LossConfig, PairLogps};
use crate::engine::{check_inputs, AdamState, AdamWConfig, Engine};
use crate::error::{Error, Result};
use crate::lora::{Adapter, LoraConfig, LoraPair, LoraWeights, Module};
use crate::weights::{LayerWeights, LlamaWeights};

use super::ops::{self, AttnMask, AttnShape};
use crate::data::LogpPlan;

// --- engine state

pub struct CpuEngine {
    cfg: LlamaConfig,
    w: LlamaWeights,
    train: Trainable,
    inv_freq: Vec<f32>,
    /// Activation and gradient buffers kept from the last step and resized for the next,
    /// so a step does not pay for fresh pages (every op overwrites its whole output).
    spare_acts: Vec<LayerActs>,
    spare_back: Option<BackScratch>,
}

/// What trains, with its gradients and AdamW state.
enum Trainable {
    /// Every weight.
    Full { grads: LlamaWeights, opt: Option<AdamState> },
    /// A LoRA adapter over the frozen weights.
    Lora(LoraState),
}

struct LoraState {
    config: LoraConfig,
    scale: f32,
    w: LoraWeights,
    grads: LoraWeights,
    opt: Option<AdamState<LoraWeights>>,
    /// Off: the model is the bare base (a fresh adapter's reference).
    enabled: bool,
    /// Training steps since the last update: with the update count, which dropout masks
    /// a training forward draws.
    micro: u64,
}

/// Where a training forward draws one layer's dropout masks (`lora::dropout_mask`).
#[derive(Clone, Copy)]
struct DropKey {
    seed: u64,
    draw: u64,
    layer: usize,
    p: f64,
}

/// One layer's adapters as the forward and backward use them.
type LayerAdapter = [Option<LoraPair>; 7];

/// What one layer's forward keeps for its backward (`n` rows each).
#[derive(Default)]
struct LayerActs {
    x: Vec<f32>,     // [n, hidden] layer input
    rstd1: Vec<f32>, // [n]
    xn1: Vec<f32>,   // [n, hidden]
    q: Vec<f32>,     // [n, q_dim] after RoPE
    k: Vec<f32>,     // [n, kv_dim] after RoPE
    v: Vec<f32>,     // [n, kv_dim]
    att: Vec<f32>,   // [n, q_dim] attention output, before o_proj
    lse: Vec<f32>,   // [n, n_heads]
    x_mid: Vec<f32>, // [n, hidden]
    rstd2: Vec<f32>, // [n]
    xn2: Vec<f32>,   // [n, hidden]
    gate: Vec<f32>,  // [n, intermediate]
    up: Vec<f32>,    // [n, intermediate]
    act: Vec<f32>,   // [n, intermediate]
    /// Per adapted module (by `Module::index`): `x·Aᵀ`, `[n, r]` (`x` after dropout).
    xa: [Vec<f32>; 7],
    /// Per adapted module: its dropout mask `[n, in]` (empty without dropout).
    drop: [Vec<f32>; 7],
}

impl LayerActs {
    /// Buffers for `n` rows: `spare`'s storage when there is one (stale values, which the
    /// forward overwrites), else fresh.
    fn take(spare: &mut Vec<LayerActs>, cfg: &LlamaConfig, n: usize) -> Self {
        let mut a = spare.pop().unwrap_or_default();
        a.resize(cfg, n);
        a
    }

    fn new(cfg: &LlamaConfig, n: usize) -> Self {
        Self::take(&mut Vec::new(), cfg, n)
    }

    fn resize(&mut self, cfg: &LlamaConfig, n: usize) {
        let (h, i, q, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        for (buf, len) in [
            (&mut self.x, n * h),
            (&mut self.rstd1, n),
            (&mut self.xn1, n * h),
            (&mut self.q, n * q),
            (&mut self.k, n * kv),
            (&mut self.v, n * kv),
            (&mut self.att, n * q),
            (&mut self.lse, n * cfg.n_heads),
            (&mut self.x_mid, n * h),
            (&mut self.rstd2, n),
            (&mut self.xn2, n * h),
            (&mut self.gate, n * i),
            (&mut self.up, n * i),
            (&mut self.act, n * i),
        ] {
            buf.resize(len, 0.0);
        }
    }
}

/// A forward pass: per-layer activations (empty without gradients), the final norm's
/// input and output, and the log-probs of every target.
struct Forward {
    layers: Vec<LayerActs>,
    x_last: Vec<f32>,
    rstd_f: Vec<f32>,
    xf: Vec<f32>,
    plan: LogpPlan,
    logp: Vec<f32>,
    lse_head: Vec<f32>,
}

/// Keys and values of the tokens decoded so far, per layer `[len, kv_dim]`, after RoPE.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Checks every tensor's length against `LlamaWeights::specs(cfg)`.
fn check_shapes(cfg: &LlamaConfig, w: &LlamaWeights, what: &str) -> Result<()> {
    let specs = LlamaWeights::specs(cfg);
    if w.layers.len() != cfg.n_layers {
        return Err(Error::invalid(format!(
            "{what}: {} layers, but config.json says num_hidden_layers = {}",
            w.layers.len(),
            cfg.n_layers
        )));
    }
    if w.lm_head.is_some() == cfg.tie_word_embeddings {
        return Err(Error::invalid(format!(
            "{what}: `lm_head.weight` is {} but config.json has tie_word_embeddings = {}",
            if w.lm_head.is_some() { "present" } else { "missing" },
            cfg.tie_word_embeddings
        )));
    }
    for (spec, t) in specs.iter().zip(w.tensors()) {
        if t.len() != spec.numel() {
            return Err(Error::invalid(format!(
                "{what}: tensor `{}` has {} values, expected {} (shape {:?} from config.json); \
                 the weights do not belong to this config",
                spec.name,
                t.len(),
                spec.numel(),
                spec.shape
            )));
        }
    }
    Ok(())
}

/// Checks that every adapter of `w` has rank `r` and its module's sizes in `cfg`.
fn check_adapter(cfg: &LlamaConfig, r: usize, w: &LoraWeights, what: &str) -> Result<()> {
    if w.layers.len() != cfg.n_layers {
        return Err(Error::invalid(format!("{what}: {} layers, the model has {}", w.layers.len(), cfg.n_layers)));
    }
    for (l, layer) in w.layers.iter().enumerate() {
        for (m, p) in Module::ALL.iter().zip(layer) {
            let (din, dout) = m.dims(cfg);
            if let Some(p) = p.as_ref().filter(|p| p.a.len() != r * din || p.b.len() != dout * r) {
                return Err(Error::invalid(format!(
                    "{what}: layer {l} {}: lora_A has {} values and lora_B {}, expected r·in = {} and out·r = {}",
                    m.name(),
                    p.a.len(),
                    p.b.len(),
                    r * din,
                    dout * r
                )));
            }
        }
    }
    Ok(())
}

impl CpuEngine {
    pub fn new(cfg: LlamaConfig, weights: LlamaWeights) -> Result<Self> {
        check_shapes(&cfg, &weights, "CpuEngine::new")?;
        let train = Trainable::Full { grads: LlamaWeights::zeros(&cfg), opt: None };
        Ok(Self::build(cfg, weights, train))
    }

    /// The frozen base `weights` with a LoRA `adapter`, which is what trains.
    pub fn with_adapter(cfg: LlamaConfig, weights: LlamaWeights, adapter: Adapter) -> Result<Self> {
        check_shapes(&cfg, &weights, "CpuEngine::with_adapter")?;
        adapter.config.check().map_err(Error::invalid)?;
        if adapter.weights.r != adapter.config.r {
            return Err(Error::invalid(format!(
                "CpuEngine::with_adapter: the adapter's tensors have rank {}, its config r = {}",
                adapter.weights.r, adapter.config.r
            )));
        }
        check_adapter(&cfg, adapter.config.r, &adapter.weights, "CpuEngine::with_adapter")?;
        let lora = LoraState {
            scale: adapter.config.scale(),
            config: adapter.config,
            grads: adapter.weights.zeros_like(),
            w: adapter.weights,
            opt: None,
            enabled: true,
            micro: 0,
        };
        Ok(Self::build(cfg, weights, Trainable::Lora(lora)))
    }

    fn build(cfg: LlamaConfig, w: LlamaWeights, train: Trainable) -> Self {
        let inv_freq = cfg.inv_freq();
        CpuEngine { cfg, w, train, inv_freq, spare_acts: Vec::new(), spare_back: None }
    }

    /// The adapter in use and its scale, when there is one and it is on.
    fn active_adapter(&self) -> Option<(&LoraWeights, f32)> {
        match &self.train {
            Trainable::Lora(s) if s.enabled => Some((&s.w, s.scale)),
            _ => None,
        }
    }

    /// A training forward's dropout draw (layer 0), when the adapter has dropout: the
    /// update count and the training steps since, so a resumed run draws the same masks.
    fn dropout_key(&self) -> Option<DropKey> {
        match &self.train {
            Trainable::Lora(s) if s.enabled && s.config.dropout > 0.0 => {
                let updates = s.opt.as_ref().map_or(0, |o| o.step);
                let draw = (updates << 20) | s.micro;
                Some(DropKey { seed: s.config.dropout_seed, draw, layer: 0, p: s.config.dropout })
            }
            _ => None,
        }
    }

    fn lora_mut(&mut self) -> Result<&mut LoraState> {
        match &mut self.train {
            Trainable::Lora(s) => Ok(s),
            Trainable::Full { .. } => Err(crate::engine::no_adapter()),
        }
    }

    fn lora(&self) -> Result<&LoraState> {
        match &self.train {
            Trainable::Lora(s) => Ok(s),
            Trainable::Full { .. } => Err(crate::engine::no_adapter()),
        }
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape { n_heads: self.cfg.n_heads, n_kv_heads: self.cfg.n_kv_heads, head_dim: self.cfg.head_dim }
    }

    // --- forward

    /// Runs the model over the batch; keeps every layer's activations when `keep`.
    /// Layer buffers come from (and, without `keep`, go back to) `spare`.
    fn forward(&self, batch: &PairBatch, keep: bool, spare: &mut Vec<LayerActs>) -> Forward {
        let cfg = &self.cfg;
        let (n, h) = (batch.n_tokens(), cfg.hidden_size);
        let mask = AttnMask::of(batch);
        let mut layers = Vec::with_capacity(if keep { cfg.n_layers } else { 0 });
        let mut scratch = (!keep).then(|| LayerActs::take(spare, cfg, n));
        let mut x = vec![0f32; n * h];
        ops::embedding_forward(&mut x, &batch.tokens, &self.w.embed, h);
        let adapter = self.active_adapter();
        let drop = if keep { self.dropout_key() } else { None };
        for (l, lw) in self.w.layers.iter().enumerate() {
            let mut a = match scratch.take() {
                Some(a) => a,
                None => LayerActs::take(spare, cfg, n),
            };
            std::mem::swap(&mut a.x, &mut x);
            let ad = adapter.map(|(w, s)| (&w.layers[l], s, drop.map(|d| DropKey { layer: l, ..d })));
            self.layer_forward(lw, ad, &mut a, &mut x, &batch.positions, mask, None);
            if keep {
                layers.push(a);
            } else {
                scratch = Some(a);
            }
        }
        spare.extend(scratch);
        let mut rstd_f = vec![0f32; n];
        let mut xf = vec![0f32; n * h];
        ops::rmsnorm_forward(&mut xf, &mut rstd_f, &x, &self.w.norm, h, cfg.rms_norm_eps);
        let plan = LogpPlan::new(&batch.targets);
        let mut logp = vec![0f32; plan.slot.len()];
        let mut lse_head = vec![0f32; plan.rows.len()];
        ops::logprobs_forward_with_head(&mut logp, &mut lse_head, &xf, self.w.lm_head(), &plan, h, cfg.vocab_size);
        Forward { layers, x_last: x, rstd_f, xf, plan, logp, lse_head }
    }

    /// One decoder layer from `a.x` to `x_out`, with the layer's adapters, their scale and
    /// dropout draw when given; writes everything `a` keeps. With a KV cache (`decode`), the layer's keys
    /// and values are appended to it and the queries attend over all of it.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        lw: &LayerWeights,
        ad: Option<(&LayerAdapter, f32, Option<DropKey>)>,
        a: &mut LayerActs,
        x_out: &mut [f32],
        pos: &[u32],
        mask: AttnMask,
        cache: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    ) {
        let cfg = &self.cfg;
        let (n, h) = (pos.len(), cfg.hidden_size);
        // y = x·Wᵀ, plus s·(x·Aᵀ)·Bᵀ where the module is adapted.
        let linear = |m: Module, y: &mut [f32], (xa, mask): (&mut Vec<f32>, &mut Vec<f32>), x: &[f32], w: &[f32]| {
            let (din, dout) = m.dims(cfg);
            ops::linear_forward(y, x, w, n, din, dout);
            let Some((p, s, drop)) = ad.and_then(|(l, s, d)| l[m.index()].as_ref().map(|p| (p, s, d))) else {
                return;
            };
            let r = p.a.len() / din;
            xa.resize(n * r, 0.0);
            match drop {
                Some(k) => {
                    *mask = crate::lora::dropout_mask(k.seed, k.draw, k.layer, m, n, din, k.p);
                    let xd: Vec<f32> = x.iter().zip(mask.iter()).map(|(v, k)| v * k).collect();
                    ops::lora_forward(y, xa, &xd, &p.a, &p.b, s, n, din, dout, r);
                }
                None => {
                    mask.clear();
                    ops::lora_forward(y, xa, x, &p.a, &p.b, s, n, din, dout, r);
                }
            }
        };
        let [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d] = &mut a.xa;
        let [d_q, d_k, d_v, d_o, d_g, d_u, d_d] = &mut a.drop;
        ops::rmsnorm_forward(&mut a.xn1, &mut a.rstd1, &a.x, &lw.input_norm, h, cfg.rms_norm_eps);
        linear(Module::QProj, &mut a.q, (xa_q, d_q), &a.xn1, &lw.q_proj);
        linear(Module::KProj, &mut a.k, (xa_k, d_k), &a.xn1, &lw.k_proj);
        linear(Module::VProj, &mut a.v, (xa_v, d_v), &a.xn1, &lw.v_proj);
        ops::rope_forward(&mut a.q, pos, &self.inv_freq, cfg.n_heads, cfg.head_dim);
        ops::rope_forward(&mut a.k, pos, &self.inv_freq, cfg.n_kv_heads, cfg.head_dim);
        match cache {
            Some((k, v)) => {
                k.extend_from_slice(&a.k);
                v.extend_from_slice(&a.v);
                ops::attention_forward(&mut a.att, &mut a.lse, &a.q, k, v, mask, self.attn_shape());
            }
            None => ops::attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, mask, self.attn_shape()),
        }
        linear(Module::OProj, &mut a.x_mid, (xa_o, d_o), &a.att, &lw.o_proj);
        add_into(&mut a.x_mid, &a.x);
        ops::rmsnorm_forward(&mut a.xn2, &mut a.rstd2, &a.x_mid, &lw.post_norm, h, cfg.rms_norm_eps);
        linear(Module::GateProj, &mut a.gate, (xa_g, d_g), &a.xn2, &lw.gate_proj);
        linear(Module::UpProj, &mut a.up, (xa_u, d_u), &a.xn2, &lw.up_proj);
        ops::swiglu_forward(&mut a.act, &a.gate, &a.up);
        linear(Module::DownProj, x_out, (xa_d, d_d), &a.act, &lw.down_proj);
        add_into(x_out, &a.x_mid);
    }

    // --- backward

    /// Back-propagates `dlogp` (one value per target) through the model, adding into the
    /// gradient buffers.
    /// With a LoRA adapter the base's weights get no gradient: only the activation
    /// gradients flow through them, and the adapter's gradients are added.
    fn backward(&mut self, batch: &PairBatch, f: &Forward, dlogp: &[f32]) {
        let CpuEngine { cfg, w, train, inv_freq, spare_back, .. } = self;
        let (n, h, v) = (batch.n_tokens(), cfg.hidden_size, cfg.vocab_size);
        let (mut full, mut lora) = match train {
            Trainable::Full { grads, .. } => (Some(grads), None),
            Trainable::Lora(s) => (None, Some(s)),
        };
        let mut dxf = vec![0f32; n * h];
        match full.as_deref_mut() {
            Some(grads) => {
                let head_grad = match grads.lm_head.as_mut() {
                    Some(g) => g,
                    None => &mut grads.embed, // tied: the LM head is the embedding
                };
                let (xf, head) = (&f.xf, w.lm_head());
                ops::logprobs_backward_with_head(&mut dxf, head_grad, dlogp, xf, head, &f.lse_head, &f.plan, h, v);
            }
            None => {
                ops::logprobs_backward_with_head_dx(&mut dxf, dlogp, &f.xf, w.lm_head(), &f.lse_head, &f.plan, h, v)
            }
        }
        let mut dx = vec![0f32; n * h];
        match full.as_deref_mut() {
            Some(grads) => ops::rmsnorm_backward(&mut dx, &mut grads.norm, &dxf, &f.x_last, &w.norm, &f.rstd_f, h),
            None => ops::rmsnorm_backward_dx(&mut dx, &dxf, &f.x_last, &w.norm, &f.rstd_f, h),
        }
        let mut s = spare_back.take().unwrap_or_default();
        s.resize(cfg, n);
        let mask = AttnMask::of(batch);
        for l in (0..cfg.n_layers).rev() {
            let g = full.as_deref_mut().map(|g| &mut g.layers[l]);
            let ad = lora.as_deref_mut().map(|st| LayerLoraGrads {
                w: &st.w.layers[l],
                g: &mut st.grads.layers[l],
                scale: st.scale,
            });
            layer_backward(cfg, inv_freq, &w.layers[l], g, ad, &f.layers[l], &mut dx, &mut s, batch, mask);
        }
        // The pad token's row gets its LM-head share above (when tied), none from the lookup.
        if let Some(grads) = full {
            ops::embedding_backward(&mut grads.embed, &dx, &batch.tokens, h, cfg.pad_token_id);
        }
        *spare_back = Some(s);
    }

    // --- generation

    pub fn new_cache(&self) -> KvCache {
        KvCache { len: 0, k: vec![Vec::new(); self.cfg.n_layers], v: vec![Vec::new(); self.cfg.n_layers] }
    }

    /// Appends `tokens` to the cache (positions continue from `cache.len`, causal attention
    /// over everything cached) and returns the logits of the last token, `[vocab]`.
    /// Panics when `tokens` is empty or holds an id outside the vocabulary.
    pub fn decode(&self, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
        let cfg = &self.cfg;
        assert!(!tokens.is_empty(), "decode needs at least one token");
        assert!(tokens.iter().all(|&t| (t as usize) < cfg.vocab_size), "decode: token id outside the vocabulary");
        let (n, h) = (tokens.len(), cfg.hidden_size);
        let n_k = cache.len + n;
        let pos: Vec<u32> = (cache.len..n_k).map(|p| p as u32).collect();
        // one causal group over the cache and the new tokens
        let (group_start, group, branch) = (vec![0, n_k as u32], vec![0u32; n_k], vec![0u8; n_k]);
        let mask = AttnMask { group_start: &group_start, group: &group, branch: &branch };
        let mut a = LayerActs::new(cfg, n);
        let mut x = vec![0f32; n * h];
        ops::embedding_forward(&mut x, tokens, &self.w.embed, h);
        let adapter = self.active_adapter();
        for (l, ((lw, k), v)) in self.w.layers.iter().zip(&mut cache.k).zip(&mut cache.v).enumerate() {
            std::mem::swap(&mut a.x, &mut x);
            let ad = adapter.map(|(w, s)| (&w.layers[l], s, None));
            self.layer_forward(lw, ad, &mut a, &mut x, &pos, mask, Some((k, v)));
        }
        cache.len = n_k;
        let last = &x[(n - 1) * h..];
        let (mut xf, mut rstd) = (vec![0f32; h], vec![0f32; 1]);
        ops::rmsnorm_forward(&mut xf, &mut rstd, last, &self.w.norm, h, cfg.rms_norm_eps);
        let mut logits = vec![0f32; cfg.vocab_size];
        ops::linear_forward(&mut logits, &xf, self.w.lm_head(), 1, h, cfg.vocab_size);
        logits
    }
}

/// `dst += src`
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Gradient buffers for one layer's backward, reused across layers.
#[derive(Default)]
struct BackScratch {
    tmp: Vec<f32>,   // [n, hidden]
    dxn: Vec<f32>,   // [n, hidden]
    dact: Vec<f32>,  // [n, intermediate]
    dgate: Vec<f32>, // [n, intermediate]
    dup: Vec<f32>,   // [n, intermediate]
    datt: Vec<f32>,  // [n, q_dim]
    dq: Vec<f32>,    // [n, q_dim]
    dk: Vec<f32>,    // [n, kv_dim]
    dv: Vec<f32>,    // [n, kv_dim]
}

impl BackScratch {
    /// Resizes every buffer to `n` rows (stale values: each op overwrites its output).
    fn resize(&mut self, cfg: &LlamaConfig, n: usize) {
        let (h, i, q, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        for (buf, len) in [
            (&mut self.tmp, n * h),
            (&mut self.dxn, n * h),
            (&mut self.dact, n * i),
            (&mut self.dgate, n * i),
            (&mut self.dup, n * i),
            (&mut self.datt, n * q),
            (&mut self.dq, n * q),
            (&mut self.dk, n * kv),
            (&mut self.dv, n * kv),
        ] {
            buf.resize(len, 0.0);
        }
    }
}

/// One layer's adapters with their gradients, for the backward.
struct LayerLoraGrads<'a> {
    w: &'a LayerAdapter,
    g: &'a mut LayerAdapter,
    scale: f32,
}

/// The backward of `y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)` for module `m`: `dx (=|+=) dy·W` through
/// the base, plus the adapter's path; `dW += dyᵀ·x` when the base trains (`gw`).
#[allow(clippy::too_many_arguments)]
fn linear_backward_any(
    m: Module,
    cfg: &LlamaConfig,
    dx: &mut [f32],
    dx_add: bool,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    gw: Option<&mut Vec<f32>>,
    ad: &mut Option<LayerLoraGrads>,
    (xa, mask): (&[f32], &[f32]),
) {
    let (din, dout) = m.dims(cfg);
    let n = dy.len() / dout;
    match gw {
        Some(gw) => ops::linear_backward(dx, gw, dy, x, w, n, din, dout, dx_add),
        None => ops::linear_backward_dx(dx, dy, w, n, din, dout, dx_add),
    }
    if let Some(ad) = ad {
        if let (Some(p), Some(g)) = (&ad.w[m.index()], &mut ad.g[m.index()]) {
            let r = p.a.len() / din;
            if mask.is_empty() {
                ops::lora_backward(dx, &mut g.a, &mut g.b, dy, x, xa, &p.a, &p.b, ad.scale, None, n, din, dout, r);
            } else {
                let xd: Vec<f32> = x.iter().zip(mask).map(|(v, k)| v * k).collect();
                let (s, mask) = (ad.scale, Some(mask));
                ops::lora_backward(dx, &mut g.a, &mut g.b, dy, &xd, xa, &p.a, &p.b, s, mask, n, din, dout, r);
            }
        }
    }
}

/// One layer's backward: `dx` comes in as the gradient of the layer's output and leaves
/// as the gradient of its input; parameter gradients are added into `g` (the base's, when
/// it trains) and `ad` (the adapter's).
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    cfg: &LlamaConfig,
    inv_freq: &[f32],
    lw: &LayerWeights,
    mut g: Option<&mut LayerWeights>,
    mut ad: Option<LayerLoraGrads>,
    a: &LayerActs,
    dx: &mut [f32],
    s: &mut BackScratch,
    batch: &PairBatch,
    mask: AttnMask,
) {
    let h = cfg.hidden_size;
    let pos = &batch.positions;
    let [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d] = &a.xa;
    let [d_q, d_k, d_v, d_o, d_g, d_u, d_d] = &a.drop;
    let norm_backward =
        |dx: &mut [f32], gw: Option<&mut Vec<f32>>, dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]| match gw {
            Some(gw) => ops::rmsnorm_backward(dx, gw, dy, x, w, rstd, h),
            None => ops::rmsnorm_backward_dx(dx, dy, x, w, rstd, h),
        };
    // MLP: x_out = x_mid + down(silu(gate(xn2)) · up(xn2))
    let gw = g.as_deref_mut().map(|g| &mut g.down_proj);
    linear_backward_any(Module::DownProj, cfg, &mut s.dact, false, dx, &a.act, &lw.down_proj, gw, &mut ad, (xa_d, d_d));
    ops::swiglu_backward(&mut s.dgate, &mut s.dup, &s.dact, &a.gate, &a.up);
    let gw = g.as_deref_mut().map(|g| &mut g.gate_proj);
    linear_backward_any(
        Module::GateProj,
        cfg,
        &mut s.dxn,
        false,
        &s.dgate,
        &a.xn2,
        &lw.gate_proj,
        gw,
        &mut ad,
        (xa_g, d_g),
    );
    let gw = g.as_deref_mut().map(|g| &mut g.up_proj);
    linear_backward_any(Module::UpProj, cfg, &mut s.dxn, true, &s.dup, &a.xn2, &lw.up_proj, gw, &mut ad, (xa_u, d_u));
    let gw = g.as_deref_mut().map(|g| &mut g.post_norm);
    norm_backward(&mut s.tmp, gw, &s.dxn, &a.x_mid, &lw.post_norm, &a.rstd2);
    add_into(dx, &s.tmp); // dx is now d x_mid

    // attention: x_mid = x + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1)))
    let gw = g.as_deref_mut().map(|g| &mut g.o_proj);
    linear_backward_any(Module::OProj, cfg, &mut s.datt, false, dx, &a.att, &lw.o_proj, gw, &mut ad, (xa_o, d_o));
    let shape = AttnShape { n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
    ops::attention_backward(&mut s.dq, &mut s.dk, &mut s.dv, &s.datt, &a.q, &a.k, &a.v, &a.att, &a.lse, mask, shape);
    ops::rope_backward(&mut s.dq, pos, inv_freq, cfg.n_heads, cfg.head_dim);
    ops::rope_backward(&mut s.dk, pos, inv_freq, cfg.n_kv_heads, cfg.head_dim);
    let gw = g.as_deref_mut().map(|g| &mut g.q_proj);
    linear_backward_any(Module::QProj, cfg, &mut s.dxn, false, &s.dq, &a.xn1, &lw.q_proj, gw, &mut ad, (xa_q, d_q));
    let gw = g.as_deref_mut().map(|g| &mut g.k_proj);
    linear_backward_any(Module::KProj, cfg, &mut s.dxn, true, &s.dk, &a.xn1, &lw.k_proj, gw, &mut ad, (xa_k, d_k));
    let gw = g.as_deref_mut().map(|g| &mut g.v_proj);
    linear_backward_any(Module::VProj, cfg, &mut s.dxn, true, &s.dv, &a.xn1, &lw.v_proj, gw, &mut ad, (xa_v, d_v));
    let gw = g.map(|g| &mut g.input_norm);
    norm_backward(&mut s.tmp, gw, &s.dxn, &a.x, &lw.input_norm, &a.rstd1);
    add_into(dx, &s.tmp);
}

// --- the Engine trait

impl Engine for CpuEngine {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn sequence_logps(&mut self, batch: &PairBatch) -> Result<Vec<PairLogps>> {
        check_inputs(&self.cfg, batch, None)?;
        let mut spare = std::mem::take(&mut self.spare_acts);
        let f = self.forward(batch, false, &mut spare);
        self.spare_acts = spare;
        Ok(PairLogps::sum_targets(batch, &f.logp))
    }

    fn train_step(
        &mut self,
        batch: &PairBatch,
        reference: &[PairLogps],
        loss: &LossConfig,
        loss_scale: f64,
    ) -> Result<Vec<PairLogps>> {
        check_inputs(&self.cfg, batch, Some(reference))?;
        if let Trainable::Lora(st) = &self.train {
            if !st.enabled {
                return Err(Error::invalid("train_step: the LoRA adapter is off; turn it on to train it"));
            }
        }
        let mut spare = std::mem::take(&mut self.spare_acts);
        let f = self.forward(batch, true, &mut spare);
        let policy = PairLogps::sum_targets(batch, &f.logp);
        let dlogp = target_grads(batch, &policy, reference, loss, loss_scale);
        self.backward(batch, &f, &dlogp);
        if let Trainable::Lora(st) = &mut self.train {
            st.micro += 1;
        }
        spare.extend(f.layers);
        self.spare_acts = spare;
        Ok(policy)
    }

    /// Clips (torch's `clip_grad_norm_`), then AdamW as HF Trainer sets it up: no weight
    /// decay on the RMSNorm weights (Trainer's `get_decay_parameter_names` excludes every
    /// `*norm*` parameter), decay on LoRA's matrices. A non-finite gradient norm is an
    /// error: the weights are left untouched and the gradients zeroed.
    fn optimizer_step(&mut self, opt: &AdamWConfig, lr: f64) -> Result<f64> {
        let result = match &mut self.train {
            Trainable::Full { grads, opt: state } => {
                let specs = LlamaWeights::specs(&self.cfg);
                let zeros = || LlamaWeights::zeros(&self.cfg);
                adamw(opt, lr, &specs, self.w.tensors_mut(), grads.tensors_mut(), state, zeros)
            }
            Trainable::Lora(st) => {
                let specs = st.w.specs();
                let shape = st.w.zeros_like();
                let zeros = || shape.clone();
                adamw(opt, lr, &specs, st.w.tensors_mut(), st.grads.tensors_mut(), &mut st.opt, zeros)
            }
        };
        self.zero_grads();
        result
    }

    fn zero_grads(&mut self) {
        let grads = match &mut self.train {
            Trainable::Full { grads, .. } => grads.tensors_mut(),
            Trainable::Lora(st) => {
                st.micro = 0;
                st.grads.tensors_mut()
            }
        };
        for g in grads {
            g.fill(0.0);
        }
    }

    fn grads(&self) -> Result<LlamaWeights> {
        match &self.train {
            Trainable::Full { grads, .. } => Ok(grads.clone()),
            Trainable::Lora(_) => {
                Err(Error::invalid("grads: the base is frozen under a LoRA adapter; see adapter_grads"))
            }
        }
    }

    fn weights(&self) -> Result<LlamaWeights> {
        Ok(self.w.clone())
    }

    fn set_weights(&mut self, w: &LlamaWeights) -> Result<()> {
        check_shapes(&self.cfg, w, "set_weights")?;
        self.w = w.clone();
        self.zero_grads();
        Ok(())
    }

    fn optimizer_state(&self) -> Result<Option<AdamState>> {
        match &self.train {
            Trainable::Full { opt, .. } => Ok(opt.clone()),
            Trainable::Lora(_) => Err(Error::invalid(
                "optimizer_state: under a LoRA adapter only the adapter trains; see adapter_optimizer_state",
            )),
        }
    }

    /// `None` resets the optimizer of whatever trains (the weights or the adapter).
    fn set_optimizer_state(&mut self, state: Option<AdamState>) -> Result<()> {
        match (&mut self.train, state) {
            (Trainable::Full { opt, .. }, Some(s)) => {
                check_shapes(&self.cfg, &s.m, "optimizer state (first moments)")?;
                check_shapes(&self.cfg, &s.v, "optimizer state (second moments)")?;
                *opt = Some(s);
            }
            (Trainable::Full { opt, .. }, None) => *opt = None,
            (Trainable::Lora(st), None) => st.opt = None,
            (Trainable::Lora(_), Some(_)) => return Err(Error::invalid(
                "set_optimizer_state: under a LoRA adapter only the adapter trains; see set_adapter_optimizer_state",
            )),
        }
        Ok(())
    }

    fn adapter(&self) -> Result<Option<LoraWeights>> {
        Ok(self.lora().ok().map(|st| st.w.clone()))
    }

    fn set_adapter(&mut self, a: &LoraWeights) -> Result<()> {
        let st = self.lora_mut()?;
        if !a.same_shape(&st.w) {
            return Err(Error::invalid("set_adapter: the adapter's targets or rank differ from the engine's"));
        }
        st.w = a.clone();
        self.zero_grads();
        Ok(())
    }

    fn set_adapter_enabled(&mut self, on: bool) -> Result<()> {
        self.lora_mut()?.enabled = on;
        Ok(())
    }

    fn adapter_grads(&self) -> Result<LoraWeights> {
        Ok(self.lora()?.grads.clone())
    }

    fn adapter_optimizer_state(&self) -> Result<Option<AdamState<LoraWeights>>> {
        Ok(self.lora()?.opt.clone())
    }

    fn set_adapter_optimizer_state(&mut self, state: Option<AdamState<LoraWeights>>) -> Result<()> {
        let st = self.lora_mut()?;
        if let Some(s) = &state {
            if !s.m.same_shape(&st.w) || !s.v.same_shape(&st.w) {
                return Err(Error::invalid("adapter optimizer state: its shapes differ from the adapter's"));
            }
        }
        st.opt = state;
        Ok(())
    }

    /// The ops time themselves (`engine::profile`, process-wide counters).
    fn set_profiling(&mut self, on: bool) -> bool {
        crate::engine::profile::enable(on);
        true
    }

    fn take_profile(&mut self) -> Option<crate::engine::profile::Profile> {
        let p = crate::engine::profile::enabled().then(crate::engine::profile::collected);
        crate::engine::profile::reset();
        p
    }
}

/// Clipping and one AdamW update of `params` (named by `specs`, in the same order) from
/// `grads`; the moments are made by `zeros` at the first update. Returns the gradient norm
/// before clipping; a non-finite one is an error and nothing moves.
fn adamw<W>(
    opt: &AdamWConfig,
    lr: f64,
    specs: &[crate::weights::TensorSpec],
    params: Vec<&mut Vec<f32>>,
    mut grads: Vec<&mut Vec<f32>>,
    state: &mut Option<AdamState<W>>,
    zeros: impl Fn() -> W,
) -> Result<f64>
where
    W: TensorList,
{
    let norm = match opt.max_grad_norm {
        Some(max) => ops::clip_grad_norm(&mut grads.iter_mut().map(|g| &mut g[..]).collect::<Vec<_>>(), max),
        None => ops::grad_norm(&grads.iter().map(|g| &g[..]).collect::<Vec<_>>()),
    };
    if !norm.is_finite() {
        return Err(Error::invalid(format!(
            "gradient norm is {norm}: the update was skipped; lower the learning rate or check the data"
        )));
    }
    let state = state.get_or_insert_with(|| AdamState { m: zeros(), v: zeros(), step: 0 });
    state.step += 1;
    let moments = state.m.tensors_mut().into_iter().zip(state.v.tensors_mut());
    for ((spec, (p, g)), (m, v)) in specs.iter().zip(params.into_iter().zip(grads)).zip(moments) {
        let wd = opt.decay_of(&spec.name);
        ops::adamw_step(p, m, v, g, lr, opt.beta1, opt.beta2, opt.eps, wd, state.step);
    }
    Ok(norm)
}

/// Parameters as a list of tensors, in a fixed order.
trait TensorList {
    fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>>;
}

impl TensorList for LlamaWeights {
    fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        LlamaWeights::tensors_mut(self)
    }
}

impl TensorList for LoraWeights {
    fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        LoraWeights::tensors_mut(self)
    }
}
