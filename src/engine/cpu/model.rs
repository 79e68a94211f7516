//! The Llama model on the CPU in fp32: forward over a `PairBatch` keeping what backward
//! needs, a hand-written backward, the DPO step, AdamW, and a KV-cache decoder for text
//! generation. Every op is in `ops.rs`; this file only strings them together.
//!
//! Per layer (pre-norm residual blocks, as `LlamaDecoderLayer`):
//! `xn1 = rmsnorm(x)`, `q,k,v = rope(xn1·Wqᵀ), rope(xn1·Wkᵀ), xn1·Wvᵀ`, `att = attention(q,k,v)`,
//! `x_mid = x + att·Woᵀ`, `xn2 = rmsnorm(x_mid)`, `act = silu(xn2·Wgᵀ)·(xn2·Wuᵀ)`,
//! `x_out = x_mid + act·Wdᵀ`. Then `xf = rmsnorm(x_L)` and the log-probs of the target rows.
//!
//! Threads: rayon's global pool (`RAYON_NUM_THREADS` sets its size).

use crate::config::LlamaConfig;
use crate::data::PairBatch;
use crate::dpo::{target_grads, LossConfig, PairLogps};
use crate::engine::{check_inputs, AdamState, AdamWConfig, Engine};
use crate::error::{Error, Result};
use crate::weights::{LayerWeights, LlamaWeights};

use super::ops::{self, AttnMask, AttnShape};
use crate::data::LogpPlan;

// --- engine state

pub struct CpuEngine {
    cfg: LlamaConfig,
    w: LlamaWeights,
    grads: LlamaWeights,
    opt: Option<AdamState>,
    inv_freq: Vec<f32>,
    /// Activation and gradient buffers kept from the last step and resized for the next,
    /// so a step does not pay for fresh pages (every op overwrites its whole output).
    spare_acts: Vec<LayerActs>,
    spare_back: Option<BackScratch>,
}

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

impl CpuEngine {
    pub fn new(cfg: LlamaConfig, weights: LlamaWeights) -> Result<Self> {
        check_shapes(&cfg, &weights, "CpuEngine::new")?;
        let grads = LlamaWeights::zeros(&cfg);
        let inv_freq = cfg.inv_freq();
        Ok(CpuEngine { cfg, w: weights, grads, opt: None, inv_freq, spare_acts: Vec::new(), spare_back: None })
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
        for lw in &self.w.layers {
            let mut a = match scratch.take() {
                Some(a) => a,
                None => LayerActs::take(spare, cfg, n),
            };
            std::mem::swap(&mut a.x, &mut x);
            self.layer_forward(lw, &mut a, &mut x, &batch.positions, mask, None);
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

    /// One decoder layer on `a.x`; writes everything `a` keeps and the output to `x_out`.
    /// One layer from `a.x` to `x_out`. With a KV cache (`decode`), the layer's keys and
    /// values are appended to it and the queries attend over all of it.
    fn layer_forward(
        &self,
        lw: &LayerWeights,
        a: &mut LayerActs,
        x_out: &mut [f32],
        pos: &[u32],
        mask: AttnMask,
        cache: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    ) {
        let cfg = &self.cfg;
        let (n, h, i, qd, kvd) = (pos.len(), cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        ops::rmsnorm_forward(&mut a.xn1, &mut a.rstd1, &a.x, &lw.input_norm, h, cfg.rms_norm_eps);
        ops::linear_forward(&mut a.q, &a.xn1, &lw.q_proj, n, h, qd);
        ops::linear_forward(&mut a.k, &a.xn1, &lw.k_proj, n, h, kvd);
        ops::linear_forward(&mut a.v, &a.xn1, &lw.v_proj, n, h, kvd);
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
        ops::linear_forward(&mut a.x_mid, &a.att, &lw.o_proj, n, qd, h);
        add_into(&mut a.x_mid, &a.x);
        ops::rmsnorm_forward(&mut a.xn2, &mut a.rstd2, &a.x_mid, &lw.post_norm, h, cfg.rms_norm_eps);
        ops::linear_forward(&mut a.gate, &a.xn2, &lw.gate_proj, n, h, i);
        ops::linear_forward(&mut a.up, &a.xn2, &lw.up_proj, n, h, i);
        ops::swiglu_forward(&mut a.act, &a.gate, &a.up);
        ops::linear_forward(x_out, &a.act, &lw.down_proj, n, i, h);
        add_into(x_out, &a.x_mid);
    }

    // --- backward

    /// Back-propagates `dlogp` (one value per target) through the model, adding into the
    /// gradient buffers.
    fn backward(&mut self, batch: &PairBatch, f: &Forward, dlogp: &[f32]) {
        let CpuEngine { cfg, w, grads, inv_freq, spare_back, .. } = self;
        let (n, h) = (batch.n_tokens(), cfg.hidden_size);
        let mut dxf = vec![0f32; n * h];
        let head_grad = match grads.lm_head.as_mut() {
            Some(g) => g,
            None => &mut grads.embed, // tied: the LM head is the embedding
        };
        ops::logprobs_backward_with_head(
            &mut dxf,
            head_grad,
            dlogp,
            &f.xf,
            w.lm_head(),
            &f.lse_head,
            &f.plan,
            h,
            cfg.vocab_size,
        );
        let mut dx = vec![0f32; n * h];
        ops::rmsnorm_backward(&mut dx, &mut grads.norm, &dxf, &f.x_last, &w.norm, &f.rstd_f, h);
        let mut s = spare_back.take().unwrap_or_default();
        s.resize(cfg, n);
        let mask = AttnMask::of(batch);
        for l in (0..cfg.n_layers).rev() {
            layer_backward(
                cfg,
                inv_freq,
                &w.layers[l],
                &mut grads.layers[l],
                &f.layers[l],
                &mut dx,
                &mut s,
                batch,
                mask,
            );
        }
        // The pad token's row gets its LM-head share above (when tied), none from the lookup.
        ops::embedding_backward(&mut grads.embed, &dx, &batch.tokens, h, cfg.pad_token_id);
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
        for ((lw, k), v) in self.w.layers.iter().zip(&mut cache.k).zip(&mut cache.v) {
            std::mem::swap(&mut a.x, &mut x);
            self.layer_forward(lw, &mut a, &mut x, &pos, mask, Some((k, v)));
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

/// One layer's backward: `dx` comes in as the gradient of the layer's output and leaves
/// as the gradient of its input; parameter gradients are added into `g`.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    cfg: &LlamaConfig,
    inv_freq: &[f32],
    lw: &LayerWeights,
    g: &mut LayerWeights,
    a: &LayerActs,
    dx: &mut [f32],
    s: &mut BackScratch,
    batch: &PairBatch,
    mask: AttnMask,
) {
    let (n, h, i, qd, kvd) = (batch.n_tokens(), cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
    let pos = &batch.positions;
    // MLP: x_out = x_mid + down(silu(gate(xn2)) · up(xn2))
    ops::linear_backward(&mut s.dact, &mut g.down_proj, dx, &a.act, &lw.down_proj, n, i, h, false);
    ops::swiglu_backward(&mut s.dgate, &mut s.dup, &s.dact, &a.gate, &a.up);
    ops::linear_backward(&mut s.dxn, &mut g.gate_proj, &s.dgate, &a.xn2, &lw.gate_proj, n, h, i, false);
    ops::linear_backward(&mut s.dxn, &mut g.up_proj, &s.dup, &a.xn2, &lw.up_proj, n, h, i, true);
    ops::rmsnorm_backward(&mut s.tmp, &mut g.post_norm, &s.dxn, &a.x_mid, &lw.post_norm, &a.rstd2, h);
    add_into(dx, &s.tmp); // dx is now d x_mid
                          // attention: x_mid = x + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1)))
    ops::linear_backward(&mut s.datt, &mut g.o_proj, dx, &a.att, &lw.o_proj, n, qd, h, false);
    let shape = AttnShape { n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
    ops::attention_backward(&mut s.dq, &mut s.dk, &mut s.dv, &s.datt, &a.q, &a.k, &a.v, &a.att, &a.lse, mask, shape);
    ops::rope_backward(&mut s.dq, pos, inv_freq, cfg.n_heads, cfg.head_dim);
    ops::rope_backward(&mut s.dk, pos, inv_freq, cfg.n_kv_heads, cfg.head_dim);
    ops::linear_backward(&mut s.dxn, &mut g.q_proj, &s.dq, &a.xn1, &lw.q_proj, n, h, qd, false);
    ops::linear_backward(&mut s.dxn, &mut g.k_proj, &s.dk, &a.xn1, &lw.k_proj, n, h, kvd, true);
    ops::linear_backward(&mut s.dxn, &mut g.v_proj, &s.dv, &a.xn1, &lw.v_proj, n, h, kvd, true);
    ops::rmsnorm_backward(&mut s.tmp, &mut g.input_norm, &s.dxn, &a.x, &lw.input_norm, &a.rstd1, h);
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
        let mut spare = std::mem::take(&mut self.spare_acts);
        let f = self.forward(batch, true, &mut spare);
        let policy = PairLogps::sum_targets(batch, &f.logp);
        let dlogp = target_grads(batch, &policy, reference, loss, loss_scale);
        self.backward(batch, &f, &dlogp);
        spare.extend(f.layers);
        self.spare_acts = spare;
        Ok(policy)
    }

    /// Clips (torch's `clip_grad_norm_`), then AdamW as HF Trainer sets it up: no weight
    /// decay on the RMSNorm weights (Trainer's `get_decay_parameter_names` excludes every
    /// `*norm*` parameter). A non-finite gradient norm is an error: the weights are left
    /// untouched and the gradients zeroed.
    fn optimizer_step(&mut self, opt: &AdamWConfig, lr: f64) -> Result<f64> {
        let norm = match opt.max_grad_norm {
            Some(max) => ops::clip_grad_norm(
                &mut self.grads.tensors_mut().into_iter().map(|g| &mut g[..]).collect::<Vec<_>>(),
                max,
            ),
            None => ops::grad_norm(&self.grads.tensors().into_iter().map(|g| &g[..]).collect::<Vec<_>>()),
        };
        if !norm.is_finite() {
            self.zero_grads();
            return Err(Error::invalid(format!(
                "gradient norm is {norm}: the update was skipped; lower the learning rate or check the data"
            )));
        }
        let cfg = &self.cfg;
        let state = self.opt.get_or_insert_with(|| AdamState {
            m: LlamaWeights::zeros(cfg),
            v: LlamaWeights::zeros(cfg),
            step: 0,
        });
        state.step += 1;
        let specs = LlamaWeights::specs(cfg);
        let params = self.w.tensors_mut().into_iter().zip(self.grads.tensors());
        let moments = state.m.tensors_mut().into_iter().zip(state.v.tensors_mut());
        for ((spec, (p, g)), (m, v)) in specs.iter().zip(params).zip(moments) {
            let wd = opt.decay_of(&spec.name);
            ops::adamw_step(p, m, v, g, lr, opt.beta1, opt.beta2, opt.eps, wd, state.step);
        }
        self.zero_grads();
        Ok(norm)
    }

    fn zero_grads(&mut self) {
        for g in self.grads.tensors_mut() {
            g.fill(0.0);
        }
    }

    fn grads(&self) -> Result<LlamaWeights> {
        Ok(self.grads.clone())
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
        Ok(self.opt.clone())
    }

    fn set_optimizer_state(&mut self, state: Option<AdamState>) -> Result<()> {
        if let Some(s) = &state {
            check_shapes(&self.cfg, &s.m, "optimizer state (first moments)")?;
            check_shapes(&self.cfg, &s.v, "optimizer state (second moments)")?;
        }
        self.opt = state;
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
