//! The built-in demo: a preference task with exact answers and graded difficulty.
//!
//! Task: addition, `<s>12+7=` → `19</s>`. Chosen = the correct sum; rejected = a plausible
//! wrong one: the sum with a dropped carry (digits added without carrying) when that
//! differs, otherwise the sum with one digit off by one. Sources by the operands' number
//! of digits (`1-digit`, `2-digit`, `3-digit`), so difficulty is graded: a small model
//! learns single digits first and multi-digit carries last.
//!
//! The tokenizer is character-level: `<unk>` 0, `<s>` 1, `</s>` 2, `0`–`9` 3–12, `+` 13,
//! `=` 14, `<pad>` 15 (demo/tokenizer.json is the same vocabulary as a Hugging Face
//! WordLevel tokenizer, so transformers loads the folder).
//!
//! The model (demo/, embedded in the binary) is a 2-layer Llama with hidden size 64,
//! trained by this crate's `sft` loss on correct answers (README: "The demo model").

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::LlamaConfig;
use crate::data::batcher::{rng_for, shuffle};
use crate::data::PairExample;
use crate::dpo::LossConfig;
use crate::engine::cpu::CpuEngine;
use crate::engine::{AdamWConfig, Engine};
use crate::error::{Error, Result};
use crate::generate::{generate, GenOptions};
use crate::outputs::{Existing, FolderKind, OutputFolder};
use crate::partition::PartitionKind;
use crate::report;
use crate::sdpo::{self, ReferenceMode, RunSummary, SdpoOptions};
use crate::train::{Schedule, TrainOptions};
use crate::weights::{LlamaWeights, SplitMix64};

pub const CONFIG_JSON: &str = include_str!("../demo/config.json");
pub const TOKENIZER_JSON: &str = include_str!("../demo/tokenizer.json");
pub const TOKENIZER_CONFIG_JSON: &str = include_str!("../demo/tokenizer_config.json");
pub const SPECIAL_TOKENS_MAP_JSON: &str = include_str!("../demo/special_tokens_map.json");
pub const MODEL_SAFETENSORS: &[u8] = include_bytes!("../demo/model.safetensors");

// --- tokenizer

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
const CHARS: &str = "0123456789+=";

/// Character ids; `None` for a character outside the vocabulary.
pub fn encode(text: &str) -> Option<Vec<u32>> {
    text.chars().map(|c| CHARS.find(c).map(|i| i as u32 + 3)).collect()
}

/// Text of ids, special tokens (`<unk>`, `<s>`, `</s>`, `<pad>`) dropped; an id outside the
/// vocabulary shows as `<unk:ID>` rather than vanishing, so a bad id stays visible.
pub fn decode(ids: &[u32]) -> String {
    let mut text = String::new();
    for &id in ids {
        match id {
            3..=14 => text.push(CHARS.as_bytes()[id as usize - 3] as char),
            0..=2 | 15 => {}
            _ => text.push_str(&format!("<unk:{id}>")),
        }
    }
    text
}

/// The model's view of a prompt: `<s>` then the characters. Chat form: the demo's chat
/// template is `bos + user content`, so a user message `12+7=` gives the same ids.
pub fn prompt_ids(a: u64, b: u64) -> Vec<u32> {
    let mut v = vec![BOS];
    v.extend(encode(&format!("{a}+{b}=")).expect("digits"));
    v
}

pub fn answer_ids(n: u64) -> Vec<u32> {
    let mut v = encode(&n.to_string()).expect("digits");
    v.push(EOS);
    v
}

// --- the task

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
    pub digits: u32,
}

impl Problem {
    pub fn source(&self) -> String {
        format!("{}-digit", self.digits)
    }
    pub fn answer(&self) -> u64 {
        self.a + self.b
    }
}

fn random_problem(digits: u32, rng: &mut SplitMix64) -> Problem {
    let lo = if digits == 1 { 0 } else { 10u64.pow(digits - 1) };
    let hi = 10u64.pow(digits);
    let draw = |rng: &mut SplitMix64| lo + rng.next_u64() % (hi - lo);
    Problem { a: draw(rng), b: draw(rng), digits }
}

/// Digit-wise sum without carries (what a model that forgot carrying answers).
pub fn dropped_carry(a: u64, b: u64) -> u64 {
    let (mut a, mut b, mut place, mut out) = (a, b, 1, 0);
    while a > 0 || b > 0 {
        out += ((a % 10 + b % 10) % 10) * place;
        a /= 10;
        b /= 10;
        place *= 10;
    }
    out
}

/// A plausible wrong answer: the dropped-carry sum when it differs (half the time), else
/// the correct sum with one digit moved up or down by one (never a leading zero).
pub fn wrong_answer(p: &Problem, rng: &mut SplitMix64) -> u64 {
    let right = p.answer();
    let dc = dropped_carry(p.a, p.b);
    if dc != right && rng.uniform() < 0.5 {
        return dc;
    }
    let digits: Vec<u8> = right.to_string().bytes().map(|c| c - b'0').collect();
    loop {
        let mut d = digits.clone();
        let k = (rng.next_u64() % d.len() as u64) as usize;
        let up = rng.uniform() < 0.5;
        d[k] = if up { (d[k] + 1) % 10 } else { (d[k] + 9) % 10 };
        if d.len() > 1 && d[0] == 0 {
            continue;
        }
        let v = d.iter().fold(0u64, |acc, &x| acc * 10 + x as u64);
        if v != right {
            return v;
        }
    }
}

pub fn pair_for(p: &Problem, rng: &mut SplitMix64) -> PairExample {
    PairExample {
        prompt: prompt_ids(p.a, p.b),
        chosen: answer_ids(p.answer()),
        rejected: answer_ids(wrong_answer(p, rng)),
        source: p.source(),
    }
}

/// The demo's data: SFT examples (correct answers; their `rejected` is unused by the sft
/// loss), preference pairs for DPO, and eval pairs whose 2- and 3-digit problems appear in
/// neither (1-digit sums, only 100 of them, are evaluated on 30 that training also sees).
pub struct DemoData {
    pub sft: Vec<PairExample>,
    pub train: Vec<PairExample>,
    pub eval: Vec<PairExample>,
    pub eval_problems: Vec<Problem>,
}

pub fn demo_data(seed: u64, train_per_source: usize, eval_per_source: usize, sft_per_source: usize) -> DemoData {
    let mut rng = rng_for(seed, 0xDE30);
    let mut eval_problems = Vec::new();
    let mut held: HashSet<(u64, u64)> = HashSet::new();
    // 1-digit: there are only 100 such sums, facts to memorise rather than a rule to
    // generalise, so the 30 evaluated ones stay in the training data (their eval pairs
    // still get fresh wrong answers). 2- and 3-digit eval problems are held out.
    let mut singles: Vec<Problem> = (0..100).map(|i| Problem { a: i / 10, b: i % 10, digits: 1 }).collect();
    shuffle(&mut singles, &mut rng);
    eval_problems.extend(singles.iter().take(30.min(eval_per_source)));
    for digits in [2, 3] {
        let mut n = 0;
        while n < eval_per_source {
            let p = random_problem(digits, &mut rng);
            if held.insert((p.a, p.b)) {
                eval_problems.push(p);
                n += 1;
            }
        }
    }
    let fresh = |digits: u32, rng: &mut SplitMix64| loop {
        let p = random_problem(digits, rng);
        if !held.contains(&(p.a, p.b)) {
            return p;
        }
    };
    let (mut sft, mut train) = (Vec::new(), Vec::new());
    for digits in [1, 2, 3] {
        for _ in 0..train_per_source {
            let p = fresh(digits, &mut rng);
            train.push(pair_for(&p, &mut rng));
        }
    }
    // The SFT set comes from its own stream, so the preference data does not depend on its size.
    let mut sft_rng = rng_for(seed, 0x5F7);
    for digits in [1, 2, 3] {
        for _ in 0..sft_per_source {
            let p = fresh(digits, &mut sft_rng);
            sft.push(pair_for(&p, &mut sft_rng));
        }
    }
    // Eval pairs: a few wrong answers per held-out problem, so 1-digit has enough pairs.
    let mut eval = Vec::new();
    for digits in [1, 2, 3] {
        let probs: Vec<&Problem> = eval_problems.iter().filter(|p| p.digits == digits).collect();
        for k in 0..eval_per_source {
            eval.push(pair_for(probs[k % probs.len()], &mut rng));
        }
    }
    shuffle(&mut train, &mut rng);
    shuffle(&mut sft, &mut sft_rng);
    DemoData { sft, train, eval, eval_problems }
}

// --- the model

/// Writes the embedded demo model folder (config, weights, tokenizer) to `dir`.
pub fn write_model_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in [
        ("config.json", CONFIG_JSON.as_bytes()),
        ("tokenizer.json", TOKENIZER_JSON.as_bytes()),
        ("tokenizer_config.json", TOKENIZER_CONFIG_JSON.as_bytes()),
        ("special_tokens_map.json", SPECIAL_TOKENS_MAP_JSON.as_bytes()),
        ("model.safetensors", MODEL_SAFETENSORS),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Exact-match accuracy of greedy answers, per source (1-, 2-, 3-digit) and overall.
pub fn exact_match(cfg: &LlamaConfig, w: &LlamaWeights, problems: &[Problem]) -> Result<[f64; 4]> {
    let engine = CpuEngine::new(cfg.clone(), w.clone())?;
    let opts = GenOptions { max_new_tokens: 6, temperature: 0.0, seed: 0, stop: vec![EOS] };
    let mut right = [0usize; 4];
    let mut total = [0usize; 4];
    for p in problems {
        let out = generate(&engine, &prompt_ids(p.a, p.b), &opts)?;
        let ok = out == answer_ids(p.answer());
        let k = p.digits as usize - 1;
        right[k] += ok as usize;
        total[k] += 1;
        right[3] += ok as usize;
        total[3] += 1;
    }
    Ok(std::array::from_fn(|k| right[k] as f64 / total[k].max(1) as f64))
}

// --- the demo itself

pub struct DemoOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub quiet_runs: bool,
    pub train_per_source: usize,
    pub eval_per_source: usize,
}

/// The options every demo run shares: the paper's β and warmup, a learning rate for a
/// model this small (5e-7 would not move it), batch 32 pairs, one epoch.
pub fn demo_train_options(seed: u64) -> TrainOptions {
    TrainOptions {
        loss: LossConfig { beta: 0.1, ..LossConfig::default() },
        adamw: AdamWConfig::default(),
        lr: 1e-4,
        warmup_ratio: 0.1,
        schedule: Schedule::Linear,
        epochs: 1,
        batch_pairs: 32,
        micro_batch_tokens: 2048,
        layout: crate::data::Layout::Shared,
        seed,
    }
}

pub struct DemoRun {
    pub name: &'static str,
    pub summary: RunSummary,
    pub exact_after: [f64; 4],
    pub seconds: f64,
}

/// Runs the demo and returns its report (also written to `<out>/summary.txt`).
pub fn run_demo(opts: &DemoOptions) -> Result<String> {
    let t0 = Instant::now();
    // A folder an earlier demo wrote is replaced (its entries only); any other non-empty one is refused.
    let folder = OutputFolder::claim(&opts.out, FolderKind::Demo, Existing::Replace, "")?;
    folder.clear()?;
    let base = opts.out.join("base");
    write_model_folder(&base)?;
    let cfg = LlamaConfig::from_path(&base)?;
    let m0 = LlamaWeights::load(&base, &cfg)?;
    let data = demo_data(opts.seed, opts.train_per_source, opts.eval_per_source, 0);
    let exact_before = exact_match(&cfg, &m0, &data.eval_problems)?;
    let factory = |c: &LlamaConfig, w: LlamaWeights, _: Option<crate::lora::Adapter>| -> Result<Box<dyn Engine>> {
        Ok(Box::new(CpuEngine::new(c.clone(), w)?))
    };

    let mut report = String::new();
    let mut say = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    say(format!(
        "sdpo demo: addition with a 2-layer Llama (hidden 64, {} parameters); {} training pairs \
         (1-, 2-, 3-digit sums, {} each), {} held-out pairs, {} held-out problems for greedy answers",
        m0.numel(),
        data.train.len(),
        data.train.len() / 3,
        data.eval.len(),
        data.eval_problems.len()
    ));
    let base_opts = demo_train_options(opts.seed);
    say(format!(
        "recipe: β {}, lr {:e} peak, warmup {}, linear decay, {} pairs per update, {} epoch; fresh AdamW and schedule per step",
        base_opts.loss.beta, base_opts.lr, base_opts.warmup_ratio, base_opts.batch_pairs, base_opts.epochs
    ));
    let runs: [(&'static str, PartitionKind, Option<usize>); 3] = [
        ("dpo", PartitionKind::Random, Some(1)),
        ("sdpo-random", PartitionKind::Random, Some(3)),
        ("sdpo-easy-to-hard", PartitionKind::Sources, None),
    ];
    let mut results = Vec::new();
    for (name, kind, steps) in runs {
        let t1 = Instant::now();
        let sopts = SdpoOptions {
            train: base_opts.clone(),
            partition: kind,
            steps,
            length_normalize: false,
            reference: ReferenceMode::Precomputed,
            carry_optimizer: false,
            carry_schedule: false,
            save_every: 0,
            out: opts.out.join(name),
            resume: false,
            tokenizer_from: Some(base.clone()),
            quiet: opts.quiet_runs,
            tensorboard: false,
            lora: None,
        };
        let summary = sdpo::run(&sopts, &cfg, m0.clone(), &data.train, &data.eval, &factory)?;
        let exact_after =
            exact_match(&cfg, summary.final_weights.as_ref().expect("a full fine-tuning run"), &data.eval_problems)?;
        results.push(DemoRun { name, summary, exact_after, seconds: t1.elapsed().as_secs_f64() });
    }

    let m0_gamma = results[0].summary.eval_init.as_ref().map(|e| e.mean_gamma).unwrap_or(f64::NAN);
    say(String::new());
    say(format!("M_0 (SFT): held-out mean γ {m0_gamma:.3}; greedy exact match {}", fmt_exact(&exact_before)));
    for r in &results {
        let chunks: Vec<String> = r
            .summary
            .partition
            .chunks
            .iter()
            .map(|c| match c.accuracy {
                Some(a) => format!("{} (M_0 acc {:.2})", c.name, a),
                None => format!("{} ({} pairs)", c.name, c.pairs.len()),
            })
            .collect();
        say(String::new());
        say(format!("{} — chunks: {}  [{:.1}s]", r.name, chunks.join(" → "), r.seconds));
        let gammas: Vec<String> = std::iter::once(format!("M_0 {m0_gamma:.2}"))
            .chain(
                r.summary
                    .steps
                    .iter()
                    .filter_map(|s| s.eval.as_ref().map(|e| format!("M_{} {:.2}", s.step, e.mean_gamma))),
            )
            .collect();
        say(format!("  mean γ per step:        {}", gammas.join(", ")));
        if let Some(e) = r.summary.steps.last().and_then(|s| s.eval.as_ref()) {
            say(format!(
                "  held-out reward acc:    {:.3} vs M_0 (margin {:.3}); γ > 0 on {:.3} of pairs",
                e.vs_init.accuracy, e.vs_init.margin, e.gamma_accuracy
            ));
            if let Some(i) = &r.summary.eval_init {
                say(format!(
                    "  held-out mean log π:    chosen {:.3} → {:.3}, rejected {:.3} → {:.3}",
                    i.logps_chosen, e.logps_chosen, i.logps_rejected, e.logps_rejected
                ));
            }
        }
        say(format!("  exact match before:     {}", fmt_exact(&exact_before)));
        say(format!("  exact match after:      {}", fmt_exact(&r.exact_after)));
    }
    let best = results.iter().max_by(|a, b| a.exact_after[3].total_cmp(&b.exact_after[3])).expect("three runs");
    let dirs: Vec<PathBuf> = results.iter().map(|r| opts.out.join(r.name)).collect();
    let page = opts.out.join(report::FILE);
    report::write(&report::load_runs(&dirs)?, &page)?;
    say(String::new());
    say(format!(
        "best greedy exact match: {} ({:.3} overall). Runs are in {}; total {:.1}s",
        best.name,
        best.exact_after[3],
        opts.out.display(),
        t0.elapsed().as_secs_f64()
    ));
    say(format!("report (curves, mean γ per step, eval tables): {}", page.display()));
    let path = opts.out.join("summary.txt");
    std::fs::write(&path, &report).map_err(|e| Error::io(&path, e))?;
    Ok(report)
}

fn fmt_exact(e: &[f64; 4]) -> String {
    format!("1-digit {:.2}, 2-digit {:.2}, 3-digit {:.2}, all {:.3}", e[0], e[1], e[2], e[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_roundtrip_matches_tokenizer_json() {
        // The ids tokenizer.json assigns (checked there with transformers: "12+7=" → 4 5 13 10 14).
        assert_eq!(encode("12+7="), Some(vec![4, 5, 13, 10, 14]));
        assert_eq!(decode(&[1, 4, 5, 13, 10, 14, 2]), "12+7=");
        assert_eq!(encode("1a"), None);
        assert_eq!(decode(&[0, 4, 15]), "1", "<unk> and <pad> are special tokens, dropped like <s> and </s>");
        let v: serde_json::Value = serde_json::from_str(TOKENIZER_JSON).unwrap();
        for (c, id) in CHARS.chars().zip(3..) {
            assert_eq!(v["model"]["vocab"][c.to_string()], id);
        }
    }

    #[test]
    fn decode_is_total_and_shows_ids_outside_the_vocabulary() {
        assert_eq!(decode(&[]), "");
        // 16 is the first id past the vocabulary (vocab_size 16 in demo/config.json)
        assert_eq!(decode(&[4, 16, 5, u32::MAX]), format!("1<unk:16>2<unk:{}>", u32::MAX));
    }

    #[test]
    fn wrong_answers_are_wrong_and_plausible() {
        assert_eq!(dropped_carry(58, 67), 15);
        assert_eq!(dropped_carry(7, 5), 2);
        let mut rng = SplitMix64(3);
        for _ in 0..2000 {
            let p = random_problem(3, &mut rng);
            let w = wrong_answer(&p, &mut rng);
            assert_ne!(w, p.answer());
            // same number of digits, or the dropped carry (which may lose the leading 1)
            let same_len = w.to_string().len() == p.answer().to_string().len();
            assert!(same_len || w == dropped_carry(p.a, p.b), "{p:?} {w}");
        }
    }

    #[test]
    fn eval_problems_are_held_out() {
        let d = demo_data(0, 200, 50, 100);
        let held: HashSet<Vec<u32>> =
            d.eval_problems.iter().filter(|p| p.digits > 1).map(|p| prompt_ids(p.a, p.b)).collect();
        assert!(d.train.iter().chain(&d.sft).all(|p| !held.contains(&p.prompt)));
        assert_eq!(d.train.len(), 600);
        assert_eq!(d.eval.len(), 150);
        let n1 = d.train.iter().filter(|p| p.source == "1-digit").count();
        assert_eq!(n1, 200);
    }
}
