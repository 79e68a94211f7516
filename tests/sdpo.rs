//! The stepwise driver on a tiny Llama: step t's reference is exactly M_{t−1}, step t is
//! plain DPO from M_{t−1} on chunk t, T = 1 is plain DPO (checked against a hand-written
//! loop), partitions from a real model's γ, and saved steps reload in the loader.

use std::cell::RefCell;
use std::path::PathBuf;

use sdpo::data::batcher::{epoch_plan, BatcherConfig};
use sdpo::demo::demo_data;
use sdpo::dpo::{LossConfig, PairLogps};
use sdpo::engine::cpu::CpuEngine;
use sdpo::engine::Engine;
use sdpo::lora::{Adapter, LoraConfig};
use sdpo::partition::{partition, PartitionKind};
use sdpo::sdpo::{run, ReferenceMode, SdpoOptions};
use sdpo::train::{lr_at, sequence_logps_all, Schedule, TrainOptions};
use sdpo::{AdamWConfig, Layout, LlamaConfig, LlamaWeights, PairBatch, PairExample};

fn tiny_cfg() -> LlamaConfig {
    LlamaConfig::from_json(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2
    }))
    .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdpo-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn train_opts() -> TrainOptions {
    TrainOptions {
        loss: LossConfig::default(),
        adamw: AdamWConfig::default(),
        lr: 1e-2,
        warmup_ratio: 0.1,
        schedule: Schedule::Linear,
        epochs: 2,
        batch_pairs: 8,
        micro_batch_tokens: 60,
        layout: Layout::Shared,
        seed: 5,
    }
}

fn opts(out: PathBuf, kind: PartitionKind, steps: Option<usize>) -> SdpoOptions {
    SdpoOptions {
        train: train_opts(),
        partition: kind,
        steps,
        length_normalize: false,
        reference: ReferenceMode::Precomputed,
        carry_optimizer: false,
        carry_schedule: false,
        save_every: 0,
        out,
        resume: false,
        tokenizer_from: None,
        quiet: true,
        tensorboard: false,
        lora: None,
    }
}

fn cpu(c: &LlamaConfig, w: LlamaWeights, adapter: Option<Adapter>) -> sdpo::Result<Box<dyn Engine>> {
    Ok(match adapter {
        Some(a) => Box::new(CpuEngine::with_adapter(c.clone(), w, a)?),
        None => Box::new(CpuEngine::new(c.clone(), w)?),
    })
}

fn data() -> (Vec<PairExample>, Vec<PairExample>) {
    let d = demo_data(1, 16, 6, 0);
    (d.train, d.eval)
}

fn max_rel_diff(a: &LlamaWeights, b: &LlamaWeights) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        for (p, q) in x.iter().zip(y.iter()) {
            num = num.max((p - q).abs() as f64);
            den = den.max(q.abs() as f64);
        }
    }
    num / den
}

#[test]
fn inline_reference_at_step_t_is_exactly_the_previous_model() {
    let cfg = tiny_cfg();
    let m0 = LlamaWeights::random(&cfg, 3);
    let (train, eval) = data();
    let out = tmp("inline-ref");
    let mut o = opts(out.clone(), PartitionKind::Random, Some(3));
    o.reference = ReferenceMode::Inline;
    let created: RefCell<Vec<LlamaWeights>> = RefCell::new(Vec::new());
    let spy = |c: &LlamaConfig, w: LlamaWeights, a: Option<Adapter>| {
        created.borrow_mut().push(w.clone());
        cpu(c, w, a)
    };
    let summary = run(&o, &cfg, m0.clone(), &train, &eval, &spy).unwrap();
    let created = created.into_inner();
    // engines made: the policy (M_0), then one reference per step: M_0, M_1, M_2
    assert_eq!(created.len(), 4);
    assert_eq!(created[1], m0);
    for t in 1..3 {
        let dir = out.join(format!("step-{t}"));
        let mt = LlamaWeights::load(&dir, &LlamaConfig::from_path(&dir).unwrap()).unwrap();
        assert_eq!(created[t + 1], mt, "the reference of step {} is M_{t} as saved", t + 1);
        assert_ne!(mt, m0);
    }
    // and the log-probs a reference engine gives are those of the saved M_{t−1}
    let chunk: Vec<&PairExample> = summary.partition.chunks[2].pairs.iter().map(|&i| &train[i]).collect();
    let m2 = LlamaWeights::load(&out.join("step-2"), &cfg).unwrap();
    let a = sequence_logps_all(cpu(&cfg, created[3].clone(), None).unwrap().as_mut(), &chunk, 60, Layout::Shared, None)
        .unwrap();
    let b = sequence_logps_all(cpu(&cfg, m2, None).unwrap().as_mut(), &chunk, 60, Layout::Shared, None).unwrap();
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn step_t_is_plain_dpo_from_the_previous_model_on_chunk_t() {
    let cfg = tiny_cfg();
    let m0 = LlamaWeights::random(&cfg, 4);
    let (train, eval) = data();
    let out = tmp("stepwise");
    let summary = run(&opts(out.clone(), PartitionKind::InOrder, Some(2)), &cfg, m0, &train, &eval, &cpu).unwrap();
    // The first update of every step starts with policy == reference: loss ln 2, zero
    // rewards. Not to the bit: the reference pass packs pairs into other micro-batches than
    // training does, and the CPU engine's fp32 sums depend on the batch's shape at the
    // ~1e-7 relative level, so log-probs of ~10 tokens agree to ~1e-6 and β·that to 1e-7.
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let firsts: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["sdpo/update"] == 1)
        .collect();
    assert_eq!(firsts.len(), 2);
    for v in &firsts {
        assert!((v["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{v}");
        assert!(v["rewards/margins"].as_f64().unwrap().abs() < 1e-6, "{v}");
    }
    // Step 2 alone, as a T = 1 run from out/step-1 on chunk 2, gives the same M_2.
    let m1 = LlamaWeights::load(&out.join("step-1"), &cfg).unwrap();
    let chunk2: Vec<PairExample> = summary.partition.chunks[1].pairs.iter().map(|&i| train[i].clone()).collect();
    let out2 = tmp("stepwise-2");
    let alone = run(&opts(out2.clone(), PartitionKind::InOrder, Some(1)), &cfg, m1, &chunk2, &[], &cpu).unwrap();
    assert_eq!(alone.final_weights, summary.final_weights);
    // Saved steps reload in the Rust loader, bit for bit.
    let m2 = LlamaWeights::load(&out.join("step-2"), &cfg).unwrap();
    assert_eq!(Some(m2), summary.final_weights);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out2);
}

/// The first update of each step, from metrics.jsonl.
fn first_updates(out: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["sdpo/update"] == 1)
        .collect()
}

#[test]
fn lora_step_t_starts_from_and_is_referenced_to_adapter_t_minus_1() {
    let cfg = tiny_cfg();
    let base = LlamaWeights::random(&cfg, 4);
    let (train, eval) = data();
    let out = tmp("lora-stepwise");
    let lc = LoraConfig::new(4, Some(16.0), &["all-linear".into()], 0.0, false).unwrap();
    let fresh = Adapter::fresh(&cfg, lc, 7, "tiny".into());
    let mut o = opts(out.clone(), PartitionKind::InOrder, Some(2));
    o.lora = Some(fresh.clone());
    let summary = run(&o, &cfg, base.clone(), &train, &eval, &cpu).unwrap();
    assert!(summary.final_weights.is_none(), "a LoRA run hands back no copy of the base");

    // Each step's first update has policy == reference (loss ln 2, zero rewards, to fp32
    // batch-shape noise as in step_t_is_plain_dpo_from_the_previous_model_on_chunk_t):
    // at t = 1 base ⊕ fresh adapter, which is the base; at t = 2 base ⊕ adapter_1.
    let firsts = first_updates(&out);
    assert_eq!(firsts.len(), 2);
    for v in &firsts {
        assert!((v["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{v}");
        assert!(v["rewards/margins"].as_f64().unwrap().abs() < 1e-6, "{v}");
    }
    let chunk =
        |t: usize| -> Vec<&PairExample> { summary.partition.chunks[t].pairs.iter().map(|&i| &train[i]).collect() };
    let logps = |a: Option<Adapter>, pairs: &[&PairExample]| {
        sequence_logps_all(cpu(&cfg, base.clone(), a).unwrap().as_mut(), pairs, 60, Layout::Shared, None).unwrap()
    };
    // t = 1: the reference is exactly the base's log-probs.
    assert_eq!(logps(Some(fresh.clone()), &chunk(0)), logps(None, &chunk(0)));
    // t = 2: base ⊕ adapter_1 differs from the base far beyond that noise, so the zero
    // rewards above show the reference was base ⊕ adapter_1, not the bare base.
    let a1 = Adapter::load(&out.join("step-1"), &cfg).unwrap();
    assert_ne!(a1.weights, fresh.weights);
    let (with_a1, bare) = (logps(Some(a1.clone()), &chunk(1)), logps(None, &chunk(1)));
    let gap = with_a1.iter().zip(&bare).map(|(x, y)| (x.chosen - y.chosen).abs()).fold(0.0, f64::max);
    assert!(gap > 1e-3, "adapter_1 moves the chunk-2 log-probs by {gap}");

    // Step 2 alone, a T = 1 run from the saved adapter_1 on chunk 2, ends at the same adapter_2.
    let chunk2: Vec<PairExample> = chunk(1).into_iter().cloned().collect();
    let out2 = tmp("lora-stepwise-2");
    let mut o2 = opts(out2.clone(), PartitionKind::InOrder, Some(1));
    o2.lora = Some(a1);
    run(&o2, &cfg, base.clone(), &chunk2, &[], &cpu).unwrap();
    let a2 = Adapter::load(&out.join("step-2"), &cfg).unwrap();
    assert_eq!(Adapter::load(&out2.join("step-1"), &cfg).unwrap().weights, a2.weights);
    assert_eq!(a2.config, fresh.config);
    assert!(!out.join("step-2/model.safetensors").exists(), "a LoRA step is an adapter folder");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out2);
}

/// Plain DPO written out by hand: the reference precomputed from M_0, the batcher's
/// global batches, each micro-batch's gradient scaled by 1 / pairs in its global batch,
/// transformers' linear warmup schedule, AdamW. The micro-batches are the driver's (that
/// one large batch gives the same gradient is the engine's own test): AdamW turns
/// rounding-level gradient differences on near-zero gradients into full ±lr steps, so
/// only the same summation order allows an exact comparison.
fn plain_dpo(cfg: &LlamaConfig, m0: &LlamaWeights, pairs: &[PairExample], o: &TrainOptions) -> LlamaWeights {
    let mut e = CpuEngine::new(cfg.clone(), m0.clone()).unwrap();
    let all: Vec<&PairExample> = pairs.iter().collect();
    let refs = sequence_logps_all(&mut e, &all, o.micro_batch_tokens, Layout::Shared, None).unwrap();
    let lengths: Vec<usize> = pairs.iter().map(|p| p.shared_len()).collect();
    let bcfg = BatcherConfig {
        batch_pairs: o.batch_pairs,
        micro_batch_tokens: o.micro_batch_tokens,
        seed: o.seed,
        shuffle: true,
    };
    let total = (pairs.len().div_ceil(o.batch_pairs) * o.epochs) as u64;
    let mut k = 0;
    for epoch in 0..o.epochs {
        for b in epoch_plan(&lengths, &bcfg, epoch).unwrap() {
            let n: usize = b.micro.iter().map(Vec::len).sum();
            for micro in &b.micro {
                let batch_pairs: Vec<&PairExample> = micro.iter().map(|&i| &pairs[i]).collect();
                let r: Vec<PairLogps> = micro.iter().map(|&i| refs[i]).collect();
                let pb = PairBatch::new(&batch_pairs, Layout::Shared).unwrap();
                e.train_step(&pb, &r, &o.loss, 1.0 / n as f64).unwrap();
            }
            e.optimizer_step(&o.adamw, lr_at(o.lr, o.schedule, o.warmup_ratio, k, total)).unwrap();
            k += 1;
        }
    }
    e.weights().unwrap()
}

#[test]
fn one_step_equals_plain_dpo() {
    let cfg = tiny_cfg();
    let m0 = LlamaWeights::random(&cfg, 6);
    let (train, _) = data();
    let out = tmp("t1");
    let s = run(&opts(out.clone(), PartitionKind::InOrder, Some(1)), &cfg, m0.clone(), &train, &[], &cpu).unwrap();
    let expect = plain_dpo(&cfg, &m0, &train, &train_opts());
    let got = s.final_weights.unwrap();
    assert!(got == expect, "max relative difference {}", max_rel_diff(&got, &expect));
    assert!(max_rel_diff(&got, &m0) > 1e-3, "training moved the weights");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn partitions_from_a_real_models_gamma() {
    let cfg = tiny_cfg();
    let m0 = LlamaWeights::random(&cfg, 7);
    let (train, _) = data();
    let mut e = CpuEngine::new(cfg, m0).unwrap();
    let refs: Vec<&PairExample> = train.iter().collect();
    let lp = sequence_logps_all(&mut e, &refs, 100, Layout::Shared, None).unwrap();
    let g: Vec<f64> = lp.iter().map(PairLogps::gamma).collect();
    let diff = partition(&train, PartitionKind::Difficulty, Some(4), 0, Some(&lp), false).unwrap();
    // every γ in chunk c is ≥ every γ in chunk c+1
    for w in diff.chunks.windows(2) {
        let low = w[0].pairs.iter().map(|&i| g[i]).fold(f64::INFINITY, f64::min);
        let high = w[1].pairs.iter().map(|&i| g[i]).fold(f64::NEG_INFINITY, f64::max);
        assert!(low >= high);
    }
    let src = partition(&train, PartitionKind::Sources, None, 0, Some(&lp), false).unwrap();
    assert_eq!(src.chunks.len(), 3);
    let accs: Vec<f64> = src.chunks.iter().map(|c| c.accuracy.unwrap()).collect();
    assert!(accs.windows(2).all(|w| w[0] >= w[1]), "{accs:?}");
    for c in &src.chunks {
        let expect = c.pairs.iter().filter(|&&i| g[i] > 0.0).count() as f64 / c.pairs.len() as f64;
        assert_eq!(c.accuracy.unwrap(), expect);
        assert!(c.pairs.iter().all(|&i| train[i].source == c.name));
    }
}

#[test]
fn carried_schedule_continues_across_steps_and_fresh_one_restarts() {
    let cfg = tiny_cfg();
    let m0 = LlamaWeights::random(&cfg, 8);
    let (train, _) = data();
    let first_lrs = |carry: bool| -> Vec<f64> {
        let out = tmp(if carry { "carry" } else { "fresh" });
        let mut o = opts(out.clone(), PartitionKind::InOrder, Some(2));
        o.carry_schedule = carry;
        o.carry_optimizer = carry;
        run(&o, &cfg, m0.clone(), &train, &[], &cpu).unwrap();
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let _ = std::fs::remove_dir_all(&out);
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["sdpo/update"] == 1)
            .map(|v| v["train/learning_rate"].as_f64().unwrap())
            .collect()
    };
    // 48 pairs, 2 chunks of 24, 8 per update, 2 epochs: 6 updates per step, 12 in all.
    let o = train_opts();
    assert_eq!(first_lrs(false), vec![0.0, 0.0], "a fresh warmup starts every step at 0");
    assert_eq!(first_lrs(true), vec![0.0, lr_at(o.lr, o.schedule, o.warmup_ratio, 6, 12)]);
}

const BIN: &str = env!("CARGO_BIN_EXE_sdpo-run");

/// Greedy answers of the shipped demo model through the chat template and the KV cache,
/// against transformers 5.24 (`apply_chat_template(..., add_generation_prompt=True)` then
/// `generate(do_sample=False)` on the demo/ folder): the same tokens, wrong sums included.
#[test]
fn generate_matches_transformers_on_the_demo_model() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/demo");
    for (prompt, expect) in [("3+4=", "7"), ("58+67=", "125"), ("123+456=", "576"), ("907+385=", "1298")] {
        let out = std::process::Command::new(BIN)
            .args(["generate", "--model", demo, "--prompt", prompt, "--max-new-tokens", "8"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expect, "{prompt}");
    }
}

/// The whole demo, as `cargo run --release` runs it (smaller data to stay quick): three
/// runs with their step folders, a summary, the marker that lets a rerun replace the
/// folder, and a refusal to write into a folder the demo did not make.
#[test]
fn demo_runs_reruns_and_refuses_foreign_folders() {
    use sdpo::demo::{run_demo, DemoOptions};
    let out = tmp("demo");
    let o = DemoOptions { out: out.clone(), seed: 0, quiet_runs: true, train_per_source: 128, eval_per_source: 30 };
    let report = run_demo(&o).unwrap();
    for name in ["dpo", "sdpo-random", "sdpo-easy-to-hard"] {
        assert!(report.contains(name), "{report}");
    }
    assert!(out.join("dpo/step-1/model.safetensors").is_file());
    assert!(out.join("sdpo-easy-to-hard/step-3/tokenizer.json").is_file());
    assert!(out.join("summary.txt").is_file());
    // easy to hard: the 1-digit chunk (which the SFT model gets right) comes first
    assert!(report.contains("chunks: 1-digit"), "{report}");
    run_demo(&o).unwrap(); // a rerun replaces its own folder
    let foreign = tmp("demo-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let err = run_demo(&DemoOptions { out: foreign.clone(), ..o }).unwrap_err().to_string();
    assert!(err.contains("sdpo-run did not write it"), "{err}");
    assert!(foreign.join("notes.txt").is_file());
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&foreign);
}

/// `demo --write-data`: writes the three JSONL files into a new folder, refuses a non-empty
/// one (naming it and the way out) without touching it, and with --overwrite replaces only
/// a folder that holds nothing but its own files.
#[test]
fn demo_write_data_refuses_non_empty_folders() {
    let write_data = |dir: &std::path::Path, overwrite: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["demo", "--write-data"]).arg(dir);
        if overwrite {
            cmd.arg("--overwrite");
        }
        cmd.output().unwrap()
    };
    let files = ["sft.jsonl", "train.jsonl", "eval.jsonl"];

    let foreign = tmp("write-data-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    for overwrite in [false, true] {
        let out = write_data(&foreign, overwrite);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--overwrite {overwrite}: {err}");
        assert!(err.contains(&foreign.display().to_string()) && err.contains("choose another --write-data"), "{err}");
        assert_eq!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap(), "mine");
        assert!(files.iter().all(|f| !foreign.join(f).exists()), "nothing written on refusal");
    }

    let dir = tmp("write-data");
    let out = write_data(&dir, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 4000 SFT, 1024 training and 100 eval examples per source (1-, 2-, 3-digit)
    for (f, n) in files.iter().zip([12000, 3072, 300]) {
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap().lines().count(), n, "{f}");
    }
    std::fs::write(dir.join("train.jsonl"), "stale\n").unwrap();
    let out = write_data(&dir, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("train.jsonl")).unwrap(), "stale\n");
    let out = write_data(&dir, true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.join("train.jsonl")).unwrap().lines().count(), 3072);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "no temporary files left behind: {names:?}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&foreign);
}
