//! One DPO training step (train_step + optimizer_step) and one reference pass
//! (sequence_logps) of the CPU engine on a small random Llama: hidden 256, intermediate 688,
//! 4 layers, 8 heads / 4 kv heads, vocab 2048; 4 pairs of prompt 64 + chosen 64 +
//! rejected 64 tokens in the shared layout (768 rows).
//!
//! `cargo bench --bench cpu_step`; RAYON_NUM_THREADS sets the thread count.

use criterion::{criterion_group, criterion_main, Criterion};
use sdpo::data::{Layout, PairBatch, PairExample};
use sdpo::dpo::LossConfig;
use sdpo::engine::cpu::CpuEngine;
use sdpo::engine::{AdamWConfig, Engine};
use sdpo::weights::{LlamaWeights, SplitMix64};
use sdpo::LlamaConfig;

fn setup() -> (CpuEngine, PairBatch) {
    let cfg = LlamaConfig::from_json(serde_json::json!({
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
    }))
    .unwrap();
    let w = LlamaWeights::random(&cfg, 1);
    let mut rng = SplitMix64(2);
    let mut ids = |n: usize| (0..n).map(|_| (rng.next_u64() % 2048) as u32).collect::<Vec<u32>>();
    let pairs: Vec<PairExample> = (0..4)
        .map(|_| PairExample { prompt: ids(64), chosen: ids(64), rejected: ids(64), source: String::new() })
        .collect();
    let batch = PairBatch::new(&pairs.iter().collect::<Vec<_>>(), Layout::Shared).unwrap();
    (CpuEngine::new(cfg, w).unwrap(), batch)
}

fn bench(c: &mut Criterion) {
    let (mut eng, batch) = setup();
    let reference = eng.sequence_logps(&batch).unwrap();
    let (loss, opt) = (LossConfig::default(), AdamWConfig::default());
    // where a step's time goes (engine::profile), printed once before criterion's timing
    eng.set_profiling(true);
    let reps = 3;
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        eng.train_step(&batch, &reference, &loss, 0.25).unwrap();
        eng.optimizer_step(&opt, 1e-6).unwrap();
    }
    let wall = t0.elapsed().as_secs_f64() / reps as f64;
    if let Some(p) = eng.take_profile() {
        let ms = |s: f64| s * 1e3 / reps as f64;
        eprintln!(
            "cpu_step profile per train+optimizer step: wall {:.1} ms; attention {:.1}, gemm {:.1}, \
             lm_head {:.1}, norm/elementwise {:.1}, optimizer {:.1} ms",
            wall * 1e3,
            ms(p.attention_s),
            ms(p.gemm_s),
            ms(p.lm_head_logprobs_s),
            ms(p.norm_elementwise_s),
            ms(p.optimizer_s)
        );
    }
    eng.set_profiling(false);

    let mut g = c.benchmark_group("cpu_step");
    g.sample_size(10);
    g.bench_function("train_step+optimizer_step (4 pairs x 192 tokens)", |b| {
        b.iter(|| {
            eng.train_step(&batch, &reference, &loss, 0.25).unwrap();
            eng.optimizer_step(&opt, 1e-6).unwrap()
        })
    });
    g.bench_function("sequence_logps (4 pairs x 192 tokens)", |b| b.iter(|| eng.sequence_logps(&batch).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
