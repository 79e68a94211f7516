//! The DPO loss family and its metrics, shared by both engines. Computed in f64 from
//! per-sequence log-probs; an engine back-propagates `d_chosen` / `d_rejected` (the loss's
//! derivative with respect to the policy's chosen / rejected log-probs) into the model.
//!
//! With h = (π_c − ref_c) − (π_r − ref_r) (the difference of log-ratios):
//! - `sigmoid`: −(1−ε)·log σ(β h) − ε·log σ(−β h)  (DPO; ε = label smoothing, cDPO)
//! - `ipo`:     (h − 1/(2β))², on log-probs averaged per token, as TRL does
//! - `hinge`:   max(0, 1 − β h)
//! - `sft`:     −π_c / |y_c|, the mean token NLL of the chosen answer
//!
//! `sft_weight` adds α·(−π_c / |y_c|) to any of them (TRL's `rpo_alpha`).
//!
//! Rewards are β·(π − ref) on summed log-probs for every loss, as TRL 1.16 logs them.
//! Differences from TRL, on purpose: `sft` is the mean over pairs of each pair's mean
//! token NLL (TRL averages over all chosen tokens of a micro-batch, which is not
//! decomposable per pair and so would change with the micro-batch split); label
//! smoothing is the cDPO form on `sigmoid` (TRL 1.16 has it under `robust`/`exo_pair`).

use serde::{Deserialize, Serialize};

use crate::data::{PairBatch, CHOSEN};

/// Summed completion log-probs of one pair and their token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

impl PairLogps {
    /// γ = log π(chosen|x) − log π(rejected|x): the quantity the sDPO paper's reference
    /// bound is about.
    pub fn gamma(&self) -> f64 {
        self.chosen - self.rejected
    }

    /// Per pair, the sum (in f64) of its targets' log-probs per branch, and their counts;
    /// `logp` holds one value per `batch.targets` entry.
    pub fn sum_targets(batch: &PairBatch, logp: &[f32]) -> Vec<PairLogps> {
        let mut out = vec![PairLogps::default(); batch.n_pairs];
        for (t, &lp) in batch.targets.iter().zip(logp) {
            let p = &mut out[t.pair as usize];
            if t.branch == CHOSEN {
                p.chosen += lp as f64;
                p.chosen_tokens += 1;
            } else {
                p.rejected += lp as f64;
                p.rejected_tokens += 1;
            }
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    #[default]
    Sigmoid,
    Ipo,
    Hinge,
    Sft,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub kind: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub sft_weight: f64,
}

impl LossConfig {
    /// Refuses settings outside their meaningful ranges, naming the flag.
    pub fn check(&self) -> crate::Result<()> {
        let bad =
            |flag: &str, v: f64, want: &str| Err(crate::Error::invalid(format!("--{flag} must be {want}, got {v}")));
        if !(self.beta > 0.0 && self.beta <= MAX_BETA) {
            return bad("beta", self.beta, &format!("in (0, {MAX_BETA}] (DPO uses 0.01 to 1)"));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad("label-smoothing", self.label_smoothing, "in [0, 0.5)");
        }
        if !(self.sft_weight >= 0.0 && self.sft_weight.is_finite()) {
            return bad("sft-weight", self.sft_weight, "a finite number >= 0");
        }
        Ok(())
    }
}

/// β beyond this turns every reward into ±∞ in f64 for any real log-ratio.
pub const MAX_BETA: f64 = 100.0;

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { kind: LossKind::Sigmoid, beta: 0.1, label_smoothing: 0.0, sft_weight: 0.0 }
    }
}

/// One pair's loss, its derivatives, and the implicit rewards β·(π − ref).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

/// log σ(x) without overflow for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// σ(x) without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}

pub fn pair_loss(policy: &PairLogps, reference: &PairLogps, cfg: &LossConfig) -> PairLoss {
    let beta = cfg.beta;
    let (nc, nr) = (policy.chosen_tokens.max(1) as f64, policy.rejected_tokens.max(1) as f64);
    // IPO works on per-token averages; its derivatives carry the 1/|y| back.
    let (sc, sr) = if cfg.kind == LossKind::Ipo { (1.0 / nc, 1.0 / nr) } else { (1.0, 1.0) };
    let (pc, pr) = (policy.chosen * sc, policy.rejected * sr);
    let (rc, rr) = (reference.chosen * sc, reference.rejected * sr);
    let h = (pc - rc) - (pr - rr);

    // dL/dh for the preference losses; the sft loss has no preference term.
    let (mut loss, dh) = match cfg.kind {
        LossKind::Sigmoid => {
            let eps = cfg.label_smoothing;
            let z = beta * h;
            let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
            // d/dz: −(1−ε)·σ(−z) + ε·σ(z)
            (loss, beta * (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)))
        }
        LossKind::Ipo => {
            let d = h - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d)
        }
        LossKind::Hinge => {
            let m = 1.0 - beta * h;
            if m > 0.0 {
                (m, -beta)
            } else {
                (0.0, 0.0)
            }
        }
        LossKind::Sft => (0.0, 0.0),
    };
    let mut d_chosen = dh * sc;
    let d_rejected = -dh * sr;

    let nll_weight = cfg.sft_weight + if cfg.kind == LossKind::Sft { 1.0 } else { 0.0 };
    if nll_weight != 0.0 {
        loss += nll_weight * (-policy.chosen / nc);
        d_chosen += -nll_weight / nc;
    }
    PairLoss {
        loss,
        d_chosen,
        d_rejected,
        reward_chosen: beta * (policy.chosen - reference.chosen),
        reward_rejected: beta * (policy.rejected - reference.rejected),
    }
}

/// What an engine back-propagates: the derivative of `loss_scale · Σ_pairs loss` with
/// respect to each target's log-prob, one value per `batch.targets` entry.
pub fn target_grads(
    batch: &PairBatch,
    policy: &[PairLogps],
    reference: &[PairLogps],
    cfg: &LossConfig,
    loss_scale: f64,
) -> Vec<f32> {
    let d: Vec<(f64, f64)> = policy
        .iter()
        .zip(reference)
        .map(|(p, r)| {
            let l = pair_loss(p, r, cfg);
            (loss_scale * l.d_chosen, loss_scale * l.d_rejected)
        })
        .collect();
    batch
        .targets
        .iter()
        .map(|t| {
            let (dc, dr) = d[t.pair as usize];
            (if t.branch == CHOSEN { dc } else { dr }) as f32
        })
        .collect()
}

/// Metrics over a set of pairs, under TRL's names.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    /// Share of pairs with reward_chosen > reward_rejected (strictly).
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    pub n_pairs: usize,
}

impl Metrics {
    /// Means over pairs of the loss, rewards and policy log-probs.
    pub fn from_pairs(policy: &[PairLogps], reference: &[PairLogps], cfg: &LossConfig) -> Self {
        assert_eq!(policy.len(), reference.len(), "one reference per policy pair");
        let n = policy.len();
        let mut m = Metrics { n_pairs: n, ..Default::default() };
        if n == 0 {
            return m;
        }
        for (p, r) in policy.iter().zip(reference) {
            let l = pair_loss(p, r, cfg);
            m.loss += l.loss;
            m.rewards_chosen += l.reward_chosen;
            m.rewards_rejected += l.reward_rejected;
            m.rewards_accuracies += f64::from(l.reward_chosen > l.reward_rejected);
            m.logps_chosen += p.chosen;
            m.logps_rejected += p.rejected;
        }
        let inv = 1.0 / n as f64;
        m.loss *= inv;
        m.rewards_chosen *= inv;
        m.rewards_rejected *= inv;
        m.rewards_accuracies *= inv;
        m.logps_chosen *= inv;
        m.logps_rejected *= inv;
        m.rewards_margins = m.rewards_chosen - m.rewards_rejected;
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(c: f64, r: f64) -> PairLogps {
        PairLogps { chosen: c, rejected: r, chosen_tokens: 4, rejected_tokens: 2 }
    }

    #[test]
    fn sigmoid_loss_at_reference_is_ln2() {
        let p = lp(-12.0, -9.0);
        let l = pair_loss(&p, &p, &LossConfig::default());
        assert!((l.loss - std::f64::consts::LN_2).abs() < 1e-15);
        // dL/dπ_c = −β·σ(0) = −0.05
        assert!((l.d_chosen + 0.05).abs() < 1e-15 && (l.d_rejected - 0.05).abs() < 1e-15);
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let (p, r) = (lp(-10.0, -11.5), lp(-10.7, -10.9));
        for kind in [LossKind::Sigmoid, LossKind::Ipo, LossKind::Hinge, LossKind::Sft] {
            let cfg = LossConfig { kind, beta: 0.3, label_smoothing: 0.1, sft_weight: 0.2 };
            let l = pair_loss(&p, &r, &cfg);
            let e = 1e-6;
            let fc = (pair_loss(&lp(p.chosen + e, p.rejected), &r, &cfg).loss
                - pair_loss(&lp(p.chosen - e, p.rejected), &r, &cfg).loss)
                / (2.0 * e);
            let fr = (pair_loss(&lp(p.chosen, p.rejected + e), &r, &cfg).loss
                - pair_loss(&lp(p.chosen, p.rejected - e), &r, &cfg).loss)
                / (2.0 * e);
            assert!((fc - l.d_chosen).abs() < 1e-8, "{kind:?} chosen {fc} vs {}", l.d_chosen);
            assert!((fr - l.d_rejected).abs() < 1e-8, "{kind:?} rejected {fr} vs {}", l.d_rejected);
        }
    }

    #[test]
    fn rewards_use_summed_log_ratios_for_every_loss() {
        let (p, r) = (lp(-10.0, -11.5), lp(-10.7, -10.9));
        for kind in [LossKind::Sigmoid, LossKind::Ipo, LossKind::Hinge, LossKind::Sft] {
            let l = pair_loss(&p, &r, &LossConfig { kind, beta: 0.5, ..Default::default() });
            assert!((l.reward_chosen - 0.5 * 0.7).abs() < 1e-12 && (l.reward_rejected + 0.5 * 0.6).abs() < 1e-12);
        }
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert_eq!(log_sigmoid(-1000.0), -1000.0);
        assert!(log_sigmoid(1000.0) == 0.0);
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-16);
    }

    #[test]
    fn accuracy_is_strict() {
        let p = [lp(-1.0, -2.0), lp(-3.0, -3.0)];
        let m = Metrics::from_pairs(&p, &[lp(-1.0, -1.0), lp(-3.0, -3.0)], &LossConfig::default());
        assert_eq!(m.rewards_accuracies, 0.5);
    }
}
