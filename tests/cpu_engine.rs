//! The CPU engine as a whole, on small random models with deliberately odd sizes
//! (hidden 12, head_dim 6 so q_dim 24 ≠ hidden, intermediate 20, vocab 37, GQA 2:1).
//!
//! The independent reference is `RefModel` below: a naive f64 Llama written straight from
//! the transformers definition, one token and one (query, key) pair at a time, using the
//! batch's `attends` rule. Its finite differences (f64, step 1e-6) give gradients exact to
//! ~1e-9, so every tolerance here measures only the engine's fp32 rounding.

use sdpo::data::{Layout, PairBatch, PairExample, CHOSEN};
use sdpo::dpo::{pair_loss, LossConfig, LossKind, Metrics, PairLogps};
use sdpo::engine::cpu::CpuEngine;
use sdpo::engine::{self, AdamWConfig, Device, Engine};
use sdpo::weights::{LlamaWeights, SplitMix64};
use sdpo::{Error, LlamaConfig};

fn config(tied: bool, n_kv_heads: usize) -> LlamaConfig {
    LlamaConfig::from_json(serde_json::json!({
        "model_type": "llama",
        "hidden_size": 12,
        "intermediate_size": 20,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": n_kv_heads,
        "head_dim": 6,
        "vocab_size": 37,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500.0,
        "tie_word_embeddings": tied,
    }))
    .unwrap()
}

/// Random weights large enough (std 0.3, norms 1 ± 0.2) that the logits are far from
/// uniform and every gradient is well above rounding noise.
fn weights(cfg: &LlamaConfig, seed: u64) -> LlamaWeights {
    let mut w = LlamaWeights::random(cfg, seed);
    let mut rng = SplitMix64(seed ^ 0xABCD);
    for (spec, t) in LlamaWeights::specs(cfg).iter().zip(w.tensors_mut()) {
        let is_norm = spec.shape.len() == 1;
        for x in t.iter_mut() {
            *x = if is_norm { 1.0 + 0.2 * rng.normal() } else { *x * 15.0 };
        }
    }
    w
}

fn pairs(seed: u64, n: usize, vocab: u32) -> Vec<PairExample> {
    let mut rng = SplitMix64(seed);
    let ids = |len: usize, rng: &mut SplitMix64| (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
    (0..n)
        .map(|_| {
            let (lp, lc, lr) = (1 + rng.next_u64() % 5, 1 + rng.next_u64() % 4, 1 + rng.next_u64() % 4);
            PairExample {
                prompt: ids(lp as usize, &mut rng),
                chosen: ids(lc as usize, &mut rng),
                rejected: ids(lr as usize, &mut rng),
                source: String::new(),
            }
        })
        .collect()
}

fn batch(p: &[PairExample], layout: Layout) -> PairBatch {
    PairBatch::new(&p.iter().collect::<Vec<_>>(), layout).unwrap()
}

/// A reference that differs from the policy, so the loss is not at its symmetric point.
fn shifted(policy: &[PairLogps]) -> Vec<PairLogps> {
    policy
        .iter()
        .enumerate()
        .map(|(i, p)| PairLogps { chosen: p.chosen + 0.4 - 0.3 * i as f64, rejected: p.rejected - 0.2, ..*p })
        .collect()
}

/// ‖a − b‖ / ‖b‖
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

// --- the naive f64 reference model

struct RefModel {
    cfg: LlamaConfig,
    t: Vec<Vec<f64>>, // parameters in `LlamaWeights::specs` order
}

impl RefModel {
    fn new(cfg: &LlamaConfig, w: &LlamaWeights) -> Self {
        RefModel { cfg: cfg.clone(), t: w.tensors().iter().map(|t| t.iter().map(|&x| x as f64).collect()).collect() }
    }

    fn rmsnorm(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.cfg.rms_norm_eps as f64).sqrt();
        x.iter().zip(w).map(|(a, b)| a * r * b).collect()
    }

    /// `W[out, in] · x`
    fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
        w.chunks(x.len()).map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    }

    fn rope(&self, x: &mut [f64], pos: u32) {
        let (hd, inv) = (self.cfg.head_dim, self.cfg.inv_freq());
        for head in x.chunks_mut(hd) {
            let orig = head.to_vec();
            for i in 0..hd / 2 {
                let th = (pos as f32 * inv[i]) as f64;
                head[i] = orig[i] * th.cos() - orig[i + hd / 2] * th.sin();
                head[i + hd / 2] = orig[i + hd / 2] * th.cos() + orig[i] * th.sin();
            }
        }
    }

    /// Final normed hidden state of every row; `attends(q, k)` is the mask.
    fn hidden(&self, tokens: &[u32], pos: &[u32], attends: &dyn Fn(usize, usize) -> bool) -> Vec<Vec<f64>> {
        let c = &self.cfg;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.n_heads, c.n_kv_heads);
        let mut x: Vec<Vec<f64>> = tokens.iter().map(|&t| self.t[0][t as usize * h..][..h].to_vec()).collect();
        for l in 0..c.n_layers {
            let p = &self.t[1 + 9 * l..1 + 9 * (l + 1)];
            let xn: Vec<Vec<f64>> = x.iter().map(|r| self.rmsnorm(r, &p[0])).collect();
            let mut q: Vec<Vec<f64>> = xn.iter().map(|r| Self::matvec(&p[1], r)).collect();
            let mut k: Vec<Vec<f64>> = xn.iter().map(|r| Self::matvec(&p[2], r)).collect();
            let v: Vec<Vec<f64>> = xn.iter().map(|r| Self::matvec(&p[3], r)).collect();
            for (i, &ps) in pos.iter().enumerate() {
                self.rope(&mut q[i], ps);
                self.rope(&mut k[i], ps);
            }
            for i in 0..x.len() {
                let mut att = vec![0f64; nh * hd];
                for hh in 0..nh {
                    let g = hh / (nh / nkv);
                    let keys: Vec<usize> = (0..x.len()).filter(|&j| attends(i, j)).collect();
                    let s: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            (0..hd).map(|d| q[i][hh * hd + d] * k[j][g * hd + d]).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|a| (a - mx).exp()).sum();
                    for (&j, &sj) in keys.iter().zip(&s) {
                        for d in 0..hd {
                            att[hh * hd + d] += (sj - mx).exp() / z * v[j][g * hd + d];
                        }
                    }
                }
                let o = Self::matvec(&p[4], &att);
                let xm: Vec<f64> = x[i].iter().zip(&o).map(|(a, b)| a + b).collect();
                let xn2 = self.rmsnorm(&xm, &p[5]);
                let (gt, up) = (Self::matvec(&p[6], &xn2), Self::matvec(&p[7], &xn2));
                let act: Vec<f64> = gt.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let d = Self::matvec(&p[8], &act);
                x[i] = xm.iter().zip(&d).map(|(a, b)| a + b).collect();
            }
        }
        let norm = &self.t[1 + 9 * c.n_layers];
        x.iter().map(|r| self.rmsnorm(r, norm)).collect()
    }

    fn logits(&self, row: &[f64]) -> Vec<f64> {
        let head = if self.cfg.tie_word_embeddings { &self.t[0] } else { &self.t[2 + 9 * self.cfg.n_layers] };
        Self::matvec(head, row)
    }

    /// Log-prob of every target of the batch.
    fn target_logps(&self, b: &PairBatch) -> Vec<f64> {
        let xf = self.hidden(&b.tokens, &b.positions, &|q, k| b.attends(q, k));
        b.targets
            .iter()
            .map(|t| {
                let lg = self.logits(&xf[t.row as usize]);
                let mx = lg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lg[t.token as usize] - mx - lg.iter().map(|z| (z - mx).exp()).sum::<f64>().ln()
            })
            .collect()
    }

    fn pair_logps(&self, b: &PairBatch) -> Vec<PairLogps> {
        let mut out = vec![PairLogps::default(); b.n_pairs];
        for (t, lp) in b.targets.iter().zip(self.target_logps(b)) {
            let p = &mut out[t.pair as usize];
            if t.branch == CHOSEN {
                p.chosen += lp;
                p.chosen_tokens += 1;
            } else {
                p.rejected += lp;
                p.rejected_tokens += 1;
            }
        }
        out
    }

    fn loss(&self, b: &PairBatch, reference: &[PairLogps], cfg: &LossConfig, scale: f64) -> f64 {
        self.pair_logps(b).iter().zip(reference).map(|(p, r)| pair_loss(p, r, cfg).loss).sum::<f64>() * scale
    }
}

// --- tests

#[test]
fn logps_match_the_naive_f64_model() {
    for (tied, layout) in [(false, Layout::Shared), (true, Layout::Shared), (false, Layout::Concatenated)] {
        let cfg = config(tied, 2);
        let w = weights(&cfg, 11);
        let p = pairs(5, 4, 37);
        let b = batch(&p, layout);
        let want = RefModel::new(&cfg, &w).pair_logps(&b);
        let got = CpuEngine::new(cfg, w).unwrap().sequence_logps(&b).unwrap();
        for (g, r) in got.iter().zip(&want) {
            // per-token log-probs of a few units, f32 rounding ~1e-7 each: 1e-5 relative
            assert!((g.chosen - r.chosen).abs() <= 1e-5 * r.chosen.abs(), "{tied} {layout:?}: {g:?} vs {r:?}");
            assert!((g.rejected - r.rejected).abs() <= 1e-5 * r.rejected.abs(), "{tied} {layout:?}");
            assert_eq!((g.chosen_tokens, g.rejected_tokens), (r.chosen_tokens, r.rejected_tokens));
        }
    }
}

/// A few parameters of every tensor against f64 finite differences of the loss.
#[test]
fn gradients_match_finite_differences_of_the_f64_model() {
    for (tied, n_kv) in [(false, 2), (true, 1), (false, 4)] {
        let cfg = config(tied, n_kv);
        let w = weights(&cfg, 21);
        let b = batch(&pairs(7, 3, 37), Layout::Shared);
        let loss = LossConfig { kind: LossKind::Sigmoid, beta: 0.5, label_smoothing: 0.1, sft_weight: 0.3 };
        let scale = 1.0 / 3.0;
        let mut model = RefModel::new(&cfg, &w);
        let reference = shifted(&model.pair_logps(&b));

        let mut eng = CpuEngine::new(cfg.clone(), w).unwrap();
        eng.train_step(&b, &reference, &loss, scale).unwrap();
        let grads = eng.grads().unwrap();

        let mut rng = SplitMix64(3);
        for (ti, (spec, g)) in LlamaWeights::specs(&cfg).iter().zip(grads.tensors()).enumerate() {
            let gmax = g.iter().fold(0f32, |a, &x| a.max(x.abs())) as f64;
            assert!(gmax > 1e-4, "{}: gradient is (nearly) zero", spec.name);
            // the three largest entries and three random ones
            let mut idx: Vec<usize> = (0..g.len()).collect();
            idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            idx.truncate(3);
            idx.extend((0..3).map(|_| (rng.next_u64() % g.len() as u64) as usize));
            for &i in &idx {
                let x0 = model.t[ti][i];
                let e = 1e-6;
                model.t[ti][i] = x0 + e;
                let lp = model.loss(&b, &reference, &loss, scale);
                model.t[ti][i] = x0 - e;
                let lm = model.loss(&b, &reference, &loss, scale);
                model.t[ti][i] = x0;
                let want = (lp - lm) / (2.0 * e);
                // fp32 forward+backward: errors of ~1e-6 of the tensor's gradient scale
                assert!(
                    (g[i] as f64 - want).abs() <= 1e-4 * gmax + 1e-9,
                    "tied {tied} n_kv {n_kv}: {}[{i}]: engine {} vs finite differences {want} (max |g| {gmax})",
                    spec.name,
                    g[i]
                );
            }
        }
    }
}

/// `pad_token_id` set: its embedding row gets no gradient from the lookup (PyTorch's
/// `nn.Embedding(padding_idx)`, which transformers builds), but a tied LM head's share
/// still reaches it. Checked against the same model untied, with the LM head a copy of
/// the embedding and no padding: the tied gradient is the sum of that model's embedding
/// and LM-head gradients, except on the padding row, which holds the LM head's alone.
#[test]
fn the_pad_tokens_row_gets_no_gradient_from_the_lookup() {
    let pad = 5u32;
    let with_pad = |tied: bool| {
        let mut c = config(tied, 2).raw;
        c["pad_token_id"] = pad.into();
        LlamaConfig::from_json(c).unwrap()
    };
    let mut p = pairs(7, 3, 37);
    p[0].prompt.push(pad); // the pad token occurs in a prompt and in both answers
    p[1].chosen.insert(0, pad);
    p[2].rejected.insert(0, pad);
    let b = batch(&p, Layout::Shared);
    let loss = LossConfig { kind: LossKind::Sigmoid, beta: 0.5, label_smoothing: 0.0, sft_weight: 0.0 };
    let grads = |cfg: LlamaConfig, w: LlamaWeights| {
        let reference = shifted(&CpuEngine::new(cfg.clone(), w.clone()).unwrap().sequence_logps(&b).unwrap());
        let mut eng = CpuEngine::new(cfg, w).unwrap();
        eng.train_step(&b, &reference, &loss, 1.0).unwrap();
        eng.grads().unwrap()
    };
    let h = 12;
    let row = pad as usize * h..(pad as usize + 1) * h;

    // Untied: the padding row is exactly zero, everything else as without padding.
    let w = weights(&config(false, 2), 21);
    let plain = grads(config(false, 2), w.clone());
    let padded = grads(with_pad(false), w);
    assert!(plain.embed[row.clone()].iter().any(|&x| x != 0.0), "the pad token must occur in the batch");
    assert!(padded.embed[row.clone()].iter().all(|&x| x == 0.0), "untied: the padding row gets no gradient");
    for (i, (a, b)) in padded.tensors().into_iter().zip(plain.tensors()).enumerate() {
        let other_rows = |t: &[f32]| if i == 0 { [&t[..row.start], &t[row.end..]].concat() } else { t.to_vec() };
        assert_eq!(other_rows(a), other_rows(b), "untied: tensor {i} changes with padding");
    }

    // Tied: the padding row is the LM head's share of the untied twin.
    let tied_w = weights(&config(true, 2), 21);
    let mut untied_w = tied_w.clone();
    untied_w.lm_head = Some(tied_w.embed.clone());
    let split = grads(config(false, 2), untied_w);
    let tied = grads(with_pad(true), tied_w);
    let head = split.lm_head.as_ref().unwrap();
    let want: Vec<f32> =
        (0..37 * h).map(|i| if row.contains(&i) { head[i] } else { head[i] + split.embed[i] }).collect();
    assert!(rel(&tied.embed, &want) < 1e-6, "tied: {:.2e}", rel(&tied.embed, &want));
    assert!(rel(&tied.embed[row.clone()], &head[row]) < 1e-6, "tied: the padding row is the LM head's share");
}

#[test]
fn shared_and_concatenated_layouts_agree() {
    let cfg = config(false, 2);
    let w = weights(&cfg, 31);
    let p = pairs(9, 5, 37);
    let loss = LossConfig::default();
    let mut out = Vec::new();
    for layout in [Layout::Shared, Layout::Concatenated] {
        let mut eng = CpuEngine::new(cfg.clone(), w.clone()).unwrap();
        let b = batch(&p, layout);
        let pol = eng.sequence_logps(&b).unwrap();
        let reference = shifted(&pol);
        let pol2 = eng.train_step(&b, &reference, &loss, 0.2).unwrap();
        assert_eq!(pol, pol2, "train_step and sequence_logps compute the same forward");
        out.push((pol, eng.grads().unwrap()));
    }
    let ((ps, gs), (pc, gc)) = (&out[0], &out[1]);
    for (a, b) in ps.iter().zip(pc) {
        assert!((a.chosen - b.chosen).abs() <= 1e-6 * b.chosen.abs(), "{a:?} vs {b:?}");
        assert!((a.rejected - b.rejected).abs() <= 1e-6 * b.rejected.abs(), "{a:?} vs {b:?}");
    }
    for ((spec, a), b) in LlamaWeights::specs(&cfg).iter().zip(gs.tensors()).zip(gc.tensors()) {
        assert!(rel(a, b) < 1e-5, "{}: {}", spec.name, rel(a, b));
    }
}

#[test]
fn sigmoid_loss_at_policy_equal_reference_is_ln2() {
    let cfg = config(true, 2);
    let mut eng = CpuEngine::new(cfg.clone(), weights(&cfg, 41)).unwrap();
    let b = batch(&pairs(3, 3, 37), Layout::Shared);
    let reference = eng.sequence_logps(&b).unwrap();
    let loss = LossConfig::default();
    let policy = eng.train_step(&b, &reference, &loss, 1.0 / 3.0).unwrap();
    let m = Metrics::from_pairs(&policy, &reference, &loss);
    assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-12, "{}", m.loss);
    assert_eq!(m.rewards_margins, 0.0);
}

#[test]
fn gradient_accumulation_over_1_2_4_micro_batches_gives_the_same_update() {
    let cfg = config(false, 2);
    let w = weights(&cfg, 51);
    let p = pairs(13, 8, 37);
    let loss = LossConfig { beta: 0.3, ..Default::default() };
    let opt = AdamWConfig { weight_decay: 0.05, max_grad_norm: Some(0.5), ..Default::default() };
    let reference =
        shifted(&CpuEngine::new(cfg.clone(), w.clone()).unwrap().sequence_logps(&batch(&p, Layout::Shared)).unwrap());
    let mut results = Vec::new();
    for micro in [1usize, 2, 4] {
        let mut eng = CpuEngine::new(cfg.clone(), w.clone()).unwrap();
        let per = p.len() / micro;
        for m in 0..micro {
            let b = batch(&p[m * per..(m + 1) * per], Layout::Shared);
            eng.train_step(&b, &reference[m * per..(m + 1) * per], &loss, 1.0 / p.len() as f64).unwrap();
        }
        let grads = eng.grads().unwrap();
        let norm = eng.optimizer_step(&opt, 1e-3).unwrap();
        assert!(eng.grads().unwrap().tensors().iter().all(|t| t.iter().all(|&x| x == 0.0)), "grads zeroed");
        results.push((grads, norm, eng.weights().unwrap()));
    }
    let (g1, n1, w1) = &results[0];
    assert!(*n1 > 0.5, "the clip must be active in this test ({n1})");
    for (g, n, wt) in &results[1..] {
        // sums of the same terms in another order: fp32 reassociation, ~1e-7
        assert!((n - n1).abs() <= 1e-5 * n1);
        for ((spec, a), b) in LlamaWeights::specs(&cfg).iter().zip(g.tensors()).zip(g1.tensors()) {
            assert!(rel(a, b) < 1e-5, "{} grad: {}", spec.name, rel(a, b));
        }
        // compare the AdamW updates w_after − w_before, per tensor
        for (((spec, a), b), w0) in
            LlamaWeights::specs(&cfg).iter().zip(wt.tensors()).zip(w1.tensors()).zip(w.tensors())
        {
            let da: Vec<f32> = a.iter().zip(w0.iter()).map(|(x, y)| x - y).collect();
            let db: Vec<f32> = b.iter().zip(w0.iter()).map(|(x, y)| x - y).collect();
            // an update of ~lr = 1e-3 on weights of ~0.3 keeps ~4 significant digits
            // after the subtraction: 1e-3 relative
            assert!(rel(&da, &db) < 1e-3, "{} update: {}", spec.name, rel(&da, &db));
        }
    }
}

#[test]
fn optimizer_step_is_clipped_adamw_without_decay_on_norms() {
    let cfg = config(true, 2);
    let w0 = weights(&cfg, 61);
    let mut eng = CpuEngine::new(cfg.clone(), w0.clone()).unwrap();
    let b = batch(&pairs(17, 3, 37), Layout::Shared);
    let reference = shifted(&eng.sequence_logps(&b).unwrap());
    let opt = AdamWConfig { beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1, max_grad_norm: Some(0.01) };
    let (lr, specs) = (2e-2, LlamaWeights::specs(&cfg));
    let mut want: Vec<Vec<f64>> = w0.tensors().iter().map(|t| t.iter().map(|&x| x as f64).collect()).collect();
    let mut m: Vec<Vec<f64>> = want.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut v = m.clone();
    for step in 1..=2 {
        eng.train_step(&b, &reference, &LossConfig::default(), 1.0 / 3.0).unwrap();
        let g = eng.grads().unwrap();
        let norm = g.tensors().iter().flat_map(|t| t.iter()).map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let got_norm = eng.optimizer_step(&opt, lr).unwrap();
        assert!((got_norm - norm).abs() <= 1e-9 * norm, "returns the norm before clipping");
        let clip = (0.01 / (norm + 1e-6)).min(1.0);
        assert!(clip < 1.0);
        let (bc1, bc2) = (1.0 - opt.beta1.powi(step), 1.0 - opt.beta2.powi(step));
        for (ti, (spec, gt)) in specs.iter().zip(g.tensors()).enumerate() {
            let wd = if spec.name.contains("norm") { 0.0 } else { opt.weight_decay };
            for i in 0..gt.len() {
                let gi = gt[i] as f64 * clip;
                want[ti][i] *= 1.0 - lr * wd;
                m[ti][i] = opt.beta1 * m[ti][i] + (1.0 - opt.beta1) * gi;
                v[ti][i] = opt.beta2 * v[ti][i] + (1.0 - opt.beta2) * gi * gi;
                want[ti][i] -= lr / bc1 * m[ti][i] / (v[ti][i].sqrt() / bc2.sqrt() + opt.eps);
            }
        }
    }
    assert_eq!(eng.optimizer_state().unwrap().unwrap().step, 2);
    for ((spec, got), want) in specs.iter().zip(eng.weights().unwrap().tensors()).zip(&want) {
        // f32 parameters of ~0.3 hold ~3e-8 absolute; the f32 update path adds ~1e-7 of lr
        let err = got.iter().zip(want).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-6, "{}: max error {err}", spec.name);
    }
    eng.set_optimizer_state(None).unwrap();
    assert!(eng.optimizer_state().unwrap().is_none());
}

#[test]
fn kv_cache_decode_matches_a_full_forward() {
    let cfg = config(false, 2);
    let w = weights(&cfg, 71);
    let eng = CpuEngine::new(cfg.clone(), w.clone()).unwrap();
    let tokens: Vec<u32> = vec![3, 17, 0, 36, 5, 5, 22, 9, 1];
    // all at once
    let full = eng.decode(&mut eng.new_cache(), &tokens);
    // in pieces: 4 tokens, then 1, then 4
    let mut cache = eng.new_cache();
    eng.decode(&mut cache, &tokens[..4]);
    eng.decode(&mut cache, &tokens[4..5]);
    let inc = eng.decode(&mut cache, &tokens[5..]);
    assert_eq!(cache.len, tokens.len());
    assert!(rel(&inc, &full) < 1e-6, "{}", rel(&inc, &full));
    // and the f64 model's causal forward
    let model = RefModel::new(&cfg, &w);
    let pos: Vec<u32> = (0..tokens.len() as u32).collect();
    let xf = model.hidden(&tokens, &pos, &|q, k| k <= q);
    let want: Vec<f32> = model.logits(xf.last().unwrap()).iter().map(|&x| x as f32).collect();
    assert!(rel(&full, &want) < 1e-5, "{}", rel(&full, &want));
}

#[test]
fn new_names_the_tensor_with_a_wrong_shape() {
    let cfg = config(false, 2);
    let mut w = weights(&cfg, 81);
    w.layers[1].k_proj.pop();
    let err = CpuEngine::new(cfg.clone(), w).err().expect("a short tensor is rejected").to_string();
    assert!(err.contains("model.layers.1.self_attn.k_proj.weight"), "{err}");
    let mut w = weights(&cfg, 81);
    w.lm_head = None;
    let err = CpuEngine::new(cfg, w).err().unwrap().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn open_gives_the_cpu_engine_without_a_gpu() {
    let cfg = config(true, 2);
    let w = weights(&cfg, 91);
    // Auto falls back to the CPU only where there is no GPU; Cpu is always the CPU.
    #[cfg(feature = "cuda")]
    let gpu = sdpo::engine::cuda::gpu_unavailable().is_none();
    #[cfg(not(feature = "cuda"))]
    let gpu = false;
    let devices: &[Device] = if gpu { &[Device::Cpu] } else { &[Device::Auto, Device::Cpu] };
    for &d in devices {
        let mut e = engine::open(d, cfg.clone(), w.clone()).unwrap();
        assert!(e.device_name().starts_with("cpu"));
        let b = batch(&pairs(1, 2, 37), Layout::Shared);
        assert_eq!(e.sequence_logps(&b).unwrap().len(), 2);
    }
    if !gpu {
        assert!(matches!(engine::open(Device::Cuda, cfg, w), Err(Error::NoGpu(_))));
    }
}

/// Refused before any work (engine::check_inputs, which the CUDA engine shares): a token
/// outside the vocabulary, and a training step whose reference is not one pair per pair.
#[test]
fn bad_inputs_are_an_error() {
    let cfg = config(true, 2);
    let mut eng = CpuEngine::new(cfg.clone(), weights(&cfg, 93)).unwrap();
    let mut p = pairs(1, 1, 37);
    p[0].chosen[0] = 37;
    let err = eng.sequence_logps(&batch(&p, Layout::Shared)).unwrap_err().to_string();
    assert!(err.contains("37") && err.contains("vocabulary"), "{err}");

    let p = pairs(2, 2, 32);
    let b = batch(&p, Layout::Shared);
    let one = shifted(&eng.sequence_logps(&batch(&p[..1], Layout::Shared)).unwrap());
    let err = eng.train_step(&b, &one, &LossConfig::default(), 1.0).unwrap_err().to_string();
    assert!(err.contains("1 reference log-prob pairs for a batch of 2 pairs"), "{err}");

    // A dynamic rope is the default one below max_position_embeddings, and refused past it.
    let mut raw = config(true, 2).raw;
    raw["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
    raw["max_position_embeddings"] = 6.into();
    let dynamic = LlamaConfig::from_json(raw).unwrap();
    let mut eng = CpuEngine::new(dynamic.clone(), weights(&dynamic, 93)).unwrap();
    let p = pairs(3, 8, 37);
    let longest = p.iter().map(|x| x.prompt.len() + x.chosen.len().max(x.rejected.len())).max().unwrap();
    assert!(longest > 6, "the pairs reach past position 5");
    let err = eng.sequence_logps(&batch(&p, Layout::Shared)).unwrap_err().to_string();
    assert!(err.contains("past max_position_embeddings (6)") && err.contains("--max-length"), "{err}");
    let short: Vec<PairExample> =
        p.into_iter().filter(|x| x.prompt.len() + x.chosen.len().max(x.rejected.len()) <= 6).collect();
    assert!(!short.is_empty());
    eng.sequence_logps(&batch(&short, Layout::Shared)).unwrap();
}

/// The engine keeps its activation buffers between steps; a smaller batch after a larger
/// one must not see the larger one's stale values. Same inputs, same op order: the results
/// are bit-identical to a fresh engine's.
#[test]
fn reused_buffers_do_not_leak_between_batches() {
    let cfg = config(false, 2);
    let w = weights(&cfg, 101);
    let (big, small) = (batch(&pairs(21, 6, 37), Layout::Shared), batch(&pairs(22, 2, 37), Layout::Concatenated));
    assert!(big.n_tokens() > small.n_tokens());
    let loss = LossConfig::default();
    let mut fresh = CpuEngine::new(cfg.clone(), w.clone()).unwrap();
    let ref_small = shifted(&CpuEngine::new(cfg.clone(), w.clone()).unwrap().sequence_logps(&small).unwrap());
    let want = fresh.train_step(&small, &ref_small, &loss, 0.5).unwrap();
    let want_grads = fresh.grads().unwrap();

    let mut used = CpuEngine::new(cfg, w).unwrap();
    let ref_big = shifted(&used.sequence_logps(&big).unwrap());
    used.train_step(&big, &ref_big, &loss, 0.5).unwrap();
    used.zero_grads();
    assert_eq!(used.sequence_logps(&small).unwrap(), want);
    assert_eq!(used.train_step(&small, &ref_small, &loss, 0.5).unwrap(), want);
    assert!(used.grads().unwrap() == want_grads, "gradients differ after a larger batch");
}
