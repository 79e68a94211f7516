//! `sdpo-run bench`: how fast one engine trains, on a model of a published shape with
//! random weights and random tokens (nothing is downloaded).
//!
//! What is timed, after `warmup` untimed rounds: `steps` reference passes
//! (`sequence_logps`) and `steps` training steps (`train_step` + `optimizer_step`) on one
//! micro-batch of `pairs_per_step` pairs of `prompt_len + 2·answer_len` tokens each.
//!
//! Counting (the same for `tools/compare_torch.py`, so their ratios mean the same work):
//! - a pair's tokens are `prompt_len + 2·answer_len` (the prompt once), whatever the
//!   layout or the implementation: tokens/s ratios are pairs/s ratios;
//! - model FLOPs are those the task needs in the shared layout, with no recomputation:
//!   per layer row `2·N_body` forward (`N_body` = matmul parameters without the LM head),
//!   per LM-head row (a row that predicts a completion token) `2·V·h`, and per attended
//!   (query, key) pair, layer and head `4·head_dim` (q·k and p·v); a training step is three
//!   times its forward (backward = 2× forward). For whole sequences this is DESIGN.md's
//!   `6·N` per token plus attention; DESIGN.md's `6·L·h·d·T` attention term is PaLM's, with
//!   T the context length, which is `12·L·h·d` per key actually attended under a causal
//!   mask (about T/2 keys per token): we count the keys the pair mask lets through.
//! - MFU = achieved model FLOP/s over a ceiling measured in the same run: on the CPU the
//!   best of six large fp32 GEMMs by the `gemm` crate on all threads (three before the
//!   timed steps, three after); on CUDA the
//!   engine's own GEMM (`Engine::gemm_peak_flops`). `mfu_datasheet` uses the vendor's dense
//!   peak where this file knows it.
//! - peak memory: on the CPU the process's peak resident set (`VmHWM`), read before the
//!   second ceiling measurement (the first runs before the model exists, in 48 MB); on
//!   CUDA the engine's report (`Engine::peak_memory_bytes`).
//!
//! On the CPU, shapes of a billion parameters and more are refused without `force`: their
//! fp32 weights, gradients and AdamW moments alone need 16 bytes per parameter (20 GB for
//! Llama 3.2 1B) and a step would take many minutes.

use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::config::LlamaConfig;
use crate::data::{Layout, PairBatch, PairExample, PROMPT};
use crate::dpo::LossConfig;
use crate::engine::profile::Profile;
use crate::engine::{self, AdamWConfig, Device, Engine};
use crate::error::{Error, Result};
use crate::weights::{LlamaWeights, SplitMix64};

// --- shapes

/// Model shapes for benchmarks, from the published config.json files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// 4.2M parameters: hidden 256, intermediate 768, 4 layers, 4 heads / 2 kv heads of
    /// 64, vocabulary 4096, tied. Defined here, for quick runs and tests.
    Tiny,
    /// JackFram/llama-160m: hidden 768, intermediate 3072, 12 layers, 12 heads, vocabulary 32000.
    #[value(name = "llama-160m")]
    Llama160m,
    /// meta-llama/Llama-3.2-1B: hidden 2048, intermediate 8192, 16 layers, 32 heads / 8 kv, tied.
    #[value(name = "llama-1b")]
    Llama1b,
    /// meta-llama/Llama-3.2-3B: hidden 3072, intermediate 8192, 28 layers, 24 heads / 8 kv, tied.
    #[value(name = "llama-3b")]
    Llama3b,
    /// meta-llama/Meta-Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32 heads / 8 kv.
    #[value(name = "llama-8b")]
    Llama8b,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::Llama160m => "llama-160m",
            Shape::Llama1b => "llama-1b",
            Shape::Llama3b => "llama-3b",
            Shape::Llama8b => "llama-8b",
        }
    }

    /// The config.json of the shape (rope settings included, so RoPE costs what it costs).
    pub fn config_json(self) -> serde_json::Value {
        let llama3_rope = |factor: f64| {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        };
        let (h, i, l, nh, nkv, v, tied, theta, rope) = match self {
            Shape::Tiny => (256, 768, 4, 4, 2, 4096, true, 10000.0, json!(null)),
            Shape::Llama160m => (768, 3072, 12, 12, 12, 32000, false, 10000.0, json!(null)),
            Shape::Llama1b => (2048, 8192, 16, 32, 8, 128256, true, 500000.0, llama3_rope(32.0)),
            Shape::Llama3b => (3072, 8192, 28, 24, 8, 128256, true, 500000.0, llama3_rope(32.0)),
            Shape::Llama8b => (4096, 14336, 32, 32, 8, 128256, false, 500000.0, llama3_rope(8.0)),
        };
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": h, "intermediate_size": i, "num_hidden_layers": l,
            "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": v,
            "tie_word_embeddings": tied, "rope_theta": theta, "rope_scaling": rope,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "hidden_act": "silu",
        })
    }

    pub fn config(self) -> LlamaConfig {
        LlamaConfig::from_json(self.config_json()).expect("the built-in shapes are valid configs")
    }

    /// Whether the CPU engine runs this shape without `--force`.
    pub fn fits_cpu(self) -> bool {
        matches!(self, Shape::Tiny | Shape::Llama160m)
    }
}

// --- the batch and its FLOPs

/// `n_pairs` pairs of random tokens: prompt `prompt_len`, both answers `answer_len`.
pub fn synthetic_pairs(
    cfg: &LlamaConfig,
    n_pairs: usize,
    prompt_len: usize,
    answer_len: usize,
    seed: u64,
) -> Vec<PairExample> {
    let mut rng = SplitMix64(seed);
    let mut ids = |n: usize| (0..n).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect::<Vec<u32>>();
    (0..n_pairs)
        .map(|_| PairExample {
            prompt: ids(prompt_len),
            chosen: ids(answer_len),
            rejected: ids(answer_len),
            source: "bench".into(),
        })
        .collect()
}

/// (query, key) pairs the batch's attention mask lets through, summed over query rows.
/// Counted per group with running counts of prompt, chosen and rejected rows, so it does
/// not use `PairBatch::attends` (which the tests check it against).
pub fn attended_pairs(batch: &PairBatch) -> u64 {
    let mut total = 0u64;
    for g in batch.group_start.windows(2) {
        let mut seen = [0u64; 3]; // rows so far in this group, per branch
        for r in g[0] as usize..g[1] as usize {
            let b = batch.branch[r] as usize;
            seen[b] += 1;
            total += if b == PROMPT as usize { seen[0] } else { seen[0] + seen[b] };
        }
    }
    total
}

/// Model FLOPs of one pass over a batch (see the module comment for what counts).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Flops {
    /// Rows through the decoder layers.
    pub layer_rows: u64,
    /// Rows through the LM head (distinct rows that predict a completion token).
    pub head_rows: u64,
    /// Attended (query, key) pairs per layer and head.
    pub attended: u64,
    /// Forward only (the reference pass).
    pub forward: f64,
    /// Forward and backward (a training step; the optimizer's few FLOPs per parameter are
    /// not counted).
    pub train: f64,
}

pub fn flops(cfg: &LlamaConfig, batch: &PairBatch) -> Flops {
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let body = cfg.matmul_params() as f64 - head;
    let layer_rows = batch.n_tokens() as u64;
    let mut rows: Vec<u32> = batch.targets.iter().map(|t| t.row).collect();
    rows.sort_unstable();
    rows.dedup();
    let head_rows = rows.len() as u64;
    let attended = attended_pairs(batch);
    let attn_per_pair = (cfg.n_layers * cfg.n_heads * cfg.head_dim) as f64 * 4.0;
    let forward = 2.0 * body * layer_rows as f64 + 2.0 * head * head_rows as f64 + attn_per_pair * attended as f64;
    Flops { layer_rows, head_rows, attended, forward, train: 3.0 * forward }
}

// --- ceilings and memory

/// fp32 FLOP/s of the best of `reps` `n×n×n` GEMMs through the CPU engine's own linear
/// layer (`ops::linear_forward`: the gemm crate on rayon's threads), after one untimed run.
pub fn cpu_gemm_flops(n: usize, reps: usize) -> f64 {
    let mut rng = SplitMix64(7);
    let a: Vec<f32> = (0..n * n).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..n * n).map(|_| rng.normal()).collect();
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let t0 = Instant::now();
        crate::engine::cpu::ops::linear_forward(&mut c, &a, &b, n, n, n);
        if rep > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best
}

/// This process's peak resident set size (`VmHWM` in /proc/self/status), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The vendor's dense bf16 tensor-core peak (FLOP/s) for a device name, where known.
pub fn datasheet_peak(device: &str) -> Option<f64> {
    // (name fragment, dense bf16 FLOP/s); more specific fragments first.
    const TABLE: &[(&str, f64)] =
        &[("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.05e12)];
    TABLE.iter().find(|(k, _)| device.contains(k)).map(|&(_, f)| f)
}

/// Whether the NVIDIA driver reports a GPU (in a build without the CUDA engine: whether
/// the driver lists one in /proc).
pub fn gpu_present() -> bool {
    #[cfg(feature = "cuda")]
    return crate::engine::cuda::gpu_unavailable().is_none();
    #[cfg(not(feature = "cuda"))]
    return std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut d| d.next().is_some());
}

// --- the run

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// `None`: tiny on the CPU, llama-1b on CUDA.
    pub shape: Option<Shape>,
    pub device: Device,
    pub micro_batch_tokens: usize,
    pub prompt_len: usize,
    pub answer_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub layout: Layout,
    /// Run shapes of a billion parameters and more on the CPU.
    pub force: bool,
    /// Side of the square GEMM that measures the CPU ceiling.
    pub ceiling_gemm: usize,
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            shape: None,
            device: Device::Auto,
            micro_batch_tokens: 2048,
            prompt_len: 128,
            answer_len: 128,
            steps: 10,
            warmup: 2,
            layout: Layout::Shared,
            force: false,
            ceiling_gemm: 2048,
            seed: 1,
        }
    }
}

/// Seconds per timed step, by category; `other_s` is the step's wall time the engine's
/// categories do not cover (residual adds, DPO loss, bookkeeping, timer overhead).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Split {
    pub attention_s: f64,
    pub gemm_s: f64,
    pub lm_head_logprobs_s: f64,
    pub norm_elementwise_s: f64,
    pub optimizer_s: f64,
    pub other_s: f64,
}

/// One line of JSON: the keys `tools/compare_torch.py` also prints are marked (common).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// (common) "sdpo-run"; compare_torch.py prints "pytorch-eager" / "pytorch-compile".
    pub tool: String,
    /// (common)
    pub shape: String,
    /// (common) the engine's device description.
    pub device: String,
    /// (common) "fp32" (CPU engine) or "bf16" (CUDA engine).
    pub dtype: String,
    pub layout: String,
    pub threads: usize,
    pub params: usize,
    pub matmul_params: usize,
    /// (common) the sizes.
    pub micro_batch_tokens: usize,
    pub prompt_len: usize,
    pub answer_len: usize,
    pub pairs_per_step: usize,
    /// (common) `pairs_per_step · (prompt_len + 2·answer_len)`.
    pub tokens_per_step: usize,
    pub steps: usize,
    pub warmup: usize,
    /// (common) mean seconds of one timed training step (train_step + optimizer_step).
    pub train_step_s: f64,
    /// (common)
    pub train_tokens_per_s: f64,
    /// (common)
    pub train_pairs_per_s: f64,
    /// (common) mean seconds of one reference pass (sequence_logps).
    pub ref_step_s: f64,
    /// (common)
    pub ref_tokens_per_s: f64,
    /// (common) pairs per second of DPO with precomputed reference log-probs: one
    /// reference pass plus one training step per micro-batch.
    pub dpo_pairs_per_s: f64,
    /// (common)
    pub train_flops_per_step: f64,
    /// (common)
    pub ref_flops_per_step: f64,
    /// (common) achieved model TFLOP/s of the training step.
    pub train_tflops: f64,
    /// (common) achieved model TFLOP/s of the reference pass.
    pub ref_tflops: f64,
    /// (common) the ceiling measured in this run, TFLOP/s, and what it is.
    pub ceiling_tflops: Option<f64>,
    pub ceiling: String,
    /// (common) train_tflops / ceiling_tflops.
    pub mfu: Option<f64>,
    /// (common)
    pub datasheet_tflops: Option<f64>,
    /// (common)
    pub mfu_datasheet: Option<f64>,
    /// (common) bytes, and how they were measured.
    pub peak_mem_bytes: Option<u64>,
    pub peak_mem: String,
    /// Per timed training step; `None` where the engine does not profile.
    pub split: Option<Split>,
}

fn layout_name(l: Layout) -> &'static str {
    match l {
        Layout::Shared => "shared",
        Layout::Concatenated => "concatenated",
    }
}

/// Builds the engine, or explains why not. `Auto` takes CUDA when the driver reports a GPU
/// and the CUDA engine opens, else the CPU.
fn open_engine(opts: &BenchOptions) -> Result<(Shape, Box<dyn Engine>)> {
    let cuda_wanted = match opts.device {
        Device::Cuda => true,
        Device::Cpu => false,
        Device::Auto => cfg!(feature = "cuda") && gpu_present(),
    };
    if cuda_wanted {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda, Some(why)) = (opts.device, crate::engine::cuda::gpu_unavailable()) {
            return Err(Error::NoGpu(why)); // before minutes of building random weights
        }
        let shape = opts.shape.unwrap_or(Shape::Llama1b);
        let cfg = shape.config();
        match engine::open(Device::Cuda, cfg.clone(), LlamaWeights::random(&cfg, opts.seed)) {
            Ok(e) => return Ok((shape, e)),
            Err(e) if opts.device == Device::Cuda => return Err(e),
            Err(e) => eprintln!("sdpo-run bench: CUDA engine unavailable ({e}); using the CPU"),
        }
    }
    let shape = opts.shape.unwrap_or(Shape::Tiny);
    if !shape.fits_cpu() && !opts.force {
        return Err(Error::invalid(format!(
            "--shape {} on the CPU needs {:.0} GB for fp32 weights, gradients and AdamW moments and minutes \
             per step; benchmark it with --device cuda, or pass --force to run it on the CPU anyway \
             (tiny and llama-160m are the CPU shapes)",
            shape.name(),
            16.0 * LlamaWeights::specs(&shape.config()).iter().map(|s| s.numel()).sum::<usize>() as f64 / 1e9
        )));
    }
    let cfg = shape.config();
    Ok((shape, engine::open(Device::Cpu, cfg.clone(), LlamaWeights::random(&cfg, opts.seed))?))
}

pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let pair_tokens = opts.prompt_len + 2 * opts.answer_len;
    if opts.prompt_len == 0 || opts.answer_len == 0 {
        return Err(Error::invalid("--prompt-len and --answer-len must be at least 1"));
    }
    if opts.steps == 0 {
        return Err(Error::invalid("--steps must be at least 1"));
    }
    let n_pairs = opts.micro_batch_tokens / pair_tokens;
    if n_pairs == 0 {
        return Err(Error::invalid(format!(
            "--micro-batch-tokens {} does not hold one pair of {pair_tokens} tokens (prompt {} + 2 answers of {}); \
             raise it or shorten --prompt-len / --answer-len",
            opts.micro_batch_tokens, opts.prompt_len, opts.answer_len
        )));
    }
    let (shape, mut eng) = open_engine(opts)?;
    let cfg = eng.config().clone();
    let on_cpu = eng.device_name().starts_with("cpu");
    // The CPU ceiling is measured before and after the timed steps and the better kept, so
    // that a burst of load from other processes during one measurement does not lower it.
    let ceiling_before = on_cpu.then(|| cpu_gemm_flops(opts.ceiling_gemm, 3));
    let pairs = synthetic_pairs(&cfg, n_pairs, opts.prompt_len, opts.answer_len, opts.seed + 1);
    let refs: Vec<&PairExample> = pairs.iter().collect();
    let batch = PairBatch::new(&refs, opts.layout)?;
    let count = flops(&cfg, &PairBatch::new(&refs, Layout::Shared)?);

    let (loss, adamw) = (LossConfig::default(), AdamWConfig::default());
    // A learning rate small enough that the random model stays where it is.
    let lr = 1e-7;
    let reference = eng.sequence_logps(&batch)?;
    let train = |eng: &mut Box<dyn Engine>| -> Result<()> {
        eng.train_step(&batch, &reference, &loss, 1.0 / n_pairs as f64)?;
        eng.optimizer_step(&adamw, lr)?;
        Ok(())
    };
    for _ in 0..opts.warmup {
        eng.sequence_logps(&batch)?;
        train(&mut eng)?;
    }
    let t0 = Instant::now();
    for _ in 0..opts.steps {
        std::hint::black_box(eng.sequence_logps(&batch)?);
    }
    let ref_step_s = t0.elapsed().as_secs_f64() / opts.steps as f64;
    let profiling = eng.set_profiling(true);
    let t0 = Instant::now();
    for _ in 0..opts.steps {
        train(&mut eng)?;
    }
    let train_step_s = t0.elapsed().as_secs_f64() / opts.steps as f64;
    let profile = if profiling { eng.take_profile() } else { None };
    eng.set_profiling(false);

    let (peak_mem_bytes, peak_mem) = if on_cpu {
        (peak_rss_bytes(), "VmHWM: peak resident set of the process".to_string())
    } else {
        (eng.peak_memory_bytes(), "the engine's peak device allocation".to_string())
    };
    let (ceiling_flops, ceiling) = if on_cpu {
        let n = opts.ceiling_gemm;
        let best = cpu_gemm_flops(n, 3).max(ceiling_before.unwrap_or(0.0));
        (
            Some(best),
            format!(
                "fp32 {n}x{n}x{n} GEMM (gemm crate, {} threads), best of 3 before and 3 after the steps",
                rayon::current_num_threads()
            ),
        )
    } else {
        (eng.gemm_peak_flops(), "the engine's large bf16 GEMM".to_string())
    };
    let device = eng.device_name();
    let datasheet = if on_cpu { None } else { datasheet_peak(&device) };
    let train_flops_s = count.train / train_step_s;
    let tokens = n_pairs * pair_tokens;
    let split = profile.map(|p: Profile| {
        let per = |s: f64| s / opts.steps as f64;
        Split {
            attention_s: per(p.attention_s),
            gemm_s: per(p.gemm_s),
            lm_head_logprobs_s: per(p.lm_head_logprobs_s),
            norm_elementwise_s: per(p.norm_elementwise_s),
            optimizer_s: per(p.optimizer_s),
            other_s: (train_step_s - per(p.total_s())).max(0.0),
        }
    });
    Ok(BenchReport {
        tool: "sdpo-run".into(),
        shape: shape.name().into(),
        device,
        dtype: if on_cpu { "fp32" } else { "bf16" }.into(),
        layout: layout_name(opts.layout).into(),
        threads: if on_cpu { rayon::current_num_threads() } else { 0 },
        params: LlamaWeights::specs(&cfg).iter().map(|s| s.numel()).sum(),
        matmul_params: cfg.matmul_params(),
        micro_batch_tokens: opts.micro_batch_tokens,
        prompt_len: opts.prompt_len,
        answer_len: opts.answer_len,
        pairs_per_step: n_pairs,
        tokens_per_step: tokens,
        steps: opts.steps,
        warmup: opts.warmup,
        train_step_s,
        train_tokens_per_s: tokens as f64 / train_step_s,
        train_pairs_per_s: n_pairs as f64 / train_step_s,
        ref_step_s,
        ref_tokens_per_s: tokens as f64 / ref_step_s,
        dpo_pairs_per_s: n_pairs as f64 / (ref_step_s + train_step_s),
        train_flops_per_step: count.train,
        ref_flops_per_step: count.forward,
        train_tflops: train_flops_s / 1e12,
        ref_tflops: count.forward / ref_step_s / 1e12,
        ceiling_tflops: ceiling_flops.map(|f| f / 1e12),
        ceiling,
        mfu: ceiling_flops.map(|f| train_flops_s / f),
        datasheet_tflops: datasheet.map(|f| f / 1e12),
        mfu_datasheet: datasheet.map(|f| train_flops_s / f),
        peak_mem_bytes,
        peak_mem,
        split,
    })
}

impl BenchReport {
    /// A short human-readable table (the JSON line has everything).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let opt = |v: Option<f64>, scale: f64, unit: &str| match v {
            Some(x) => format!("{:.3}{unit}", x * scale),
            None => "n/a".into(),
        };
        s += &format!(
            "shape {} on {} ({}, {} layout): {} pairs x {} tokens = {} tokens per step, {} timed steps\n",
            self.shape,
            self.device,
            self.dtype,
            self.layout,
            self.pairs_per_step,
            self.prompt_len + 2 * self.answer_len,
            self.tokens_per_step,
            self.steps
        );
        s += &format!(
            "  training step     {:>9.4} s  {:>10.1} tokens/s  {:>8.3} pairs/s  {:>8.4} TFLOP/s\n",
            self.train_step_s, self.train_tokens_per_s, self.train_pairs_per_s, self.train_tflops
        );
        s += &format!(
            "  reference pass    {:>9.4} s  {:>10.1} tokens/s  {:>8.3} pairs/s  {:>8.4} TFLOP/s\n",
            self.ref_step_s,
            self.ref_tokens_per_s,
            self.pairs_per_step as f64 / self.ref_step_s,
            self.ref_tflops
        );
        s += &format!("  DPO (ref + train) {:>8.3} pairs/s\n", self.dpo_pairs_per_s);
        s += &format!(
            "  MFU {} of {} TFLOP/s ({}); datasheet MFU {}\n",
            opt(self.mfu, 100.0, "%"),
            opt(self.ceiling_tflops, 1.0, ""),
            self.ceiling,
            opt(self.mfu_datasheet, 100.0, "%")
        );
        s += &format!(
            "  peak memory {} ({})\n",
            self.peak_mem_bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            self.peak_mem
        );
        if let Some(sp) = &self.split {
            let parts = [
                ("attention", sp.attention_s),
                ("GEMMs", sp.gemm_s),
                ("LM head + log-probs", sp.lm_head_logprobs_s),
                ("norms/elementwise", sp.norm_elementwise_s),
                ("optimiser", sp.optimizer_s),
                ("other", sp.other_s),
            ];
            let total: f64 = parts.iter().map(|p| p.1).sum::<f64>().max(1e-12);
            s += "  training step split:";
            for (name, t) in parts {
                s += &format!(" {name} {:.1}%", 100.0 * t / total);
            }
            s += "\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_cfg() -> LlamaConfig {
        LlamaConfig::from_json(json!({
            "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10,
        }))
        .unwrap()
    }

    fn pair(p: usize, c: usize, r: usize) -> PairExample {
        PairExample { prompt: vec![1; p], chosen: vec![2; c], rejected: vec![3; r], source: String::new() }
    }

    /// Brute force over every (q, k) with the batch's own rule.
    fn attended_brute(b: &PairBatch) -> u64 {
        let n = b.n_tokens();
        (0..n).map(|q| (0..n).filter(|&k| b.attends(q, k)).count() as u64).sum()
    }

    #[test]
    fn attended_pairs_by_hand() {
        // One pair, prompt 3, chosen 2, rejected 1. Prompt rows see 1, 2, 3 keys; chosen
        // rows see the prompt + 1, + 2 = 4, 5; the rejected row sees the prompt + itself = 4.
        let p = pair(3, 2, 1);
        let b = PairBatch::new(&[&p], Layout::Shared).unwrap();
        assert_eq!(attended_pairs(&b), 1 + 2 + 3 + 4 + 5 + 4);
        // Concatenated: [p p p c c] (1+2+3+4+5) and [p p p r] (1+2+3+4).
        let b = PairBatch::new(&[&p], Layout::Concatenated).unwrap();
        assert_eq!(attended_pairs(&b), 15 + 10);
        // Several pairs of other lengths against the brute force.
        let ps = [pair(5, 3, 4), pair(1, 1, 1), pair(7, 2, 6)];
        for layout in [Layout::Shared, Layout::Concatenated] {
            let b = PairBatch::new(&ps.iter().collect::<Vec<_>>(), layout).unwrap();
            assert_eq!(attended_pairs(&b), attended_brute(&b));
        }
    }

    #[test]
    fn flops_by_hand() {
        // hidden 8, intermediate 12, 2 layers, 4 heads / 2 kv heads of 2, vocab 10:
        // per layer q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate/up/down 3·8·12 = 480; body 960;
        // head 10·8 = 80.
        let cfg = small_cfg();
        assert_eq!(cfg.matmul_params(), 960 + 80);
        // One pair, prompt 3, chosen 2, rejected 1: 6 layer rows; LM-head rows: the last
        // prompt row (predicts both first tokens) and the first chosen row = 2;
        // attended (q, k) = 19 (see above).
        let p = pair(3, 2, 1);
        let b = PairBatch::new(&[&p], Layout::Shared).unwrap();
        let f = flops(&cfg, &b);
        assert_eq!((f.layer_rows, f.head_rows, f.attended), (6, 2, 19));
        // forward: 2·960·6 + 2·80·2 + 4·(2 layers · 4 heads · 2 dims)·19 = 11520 + 320 + 1216
        assert_eq!(f.forward, 13056.0);
        assert_eq!(f.train, 3.0 * 13056.0);
    }

    #[test]
    fn shapes_match_the_published_sizes() {
        // Parameter counts of the published models (embedding counted once when tied).
        let total = |s: Shape| LlamaWeights::specs(&s.config()).iter().map(|t| t.numel()).sum::<usize>();
        assert_eq!(total(Shape::Llama1b), 1_235_814_400);
        assert_eq!(total(Shape::Llama3b), 3_212_749_824);
        assert_eq!(total(Shape::Llama8b), 8_030_261_248);
        assert_eq!(Shape::Llama1b.config().head_dim, 64);
        assert_eq!(Shape::Llama3b.config().head_dim, 128);
        assert!(Shape::Tiny.fits_cpu() && !Shape::Llama1b.fits_cpu());
    }

    #[test]
    fn datasheet_lookup() {
        assert_eq!(datasheet_peak("NVIDIA H200"), Some(989.4e12));
        assert_eq!(datasheet_peak("NVIDIA H100 PCIe"), Some(756.0e12));
        assert_eq!(datasheet_peak("cpu (2 threads)"), None);
    }

    #[test]
    fn refuses_big_shapes_on_cpu() {
        let opts = BenchOptions { shape: Some(Shape::Llama8b), device: Device::Cpu, ..Default::default() };
        let err = run(&opts).expect_err("llama-8b on the CPU without --force must be refused").to_string();
        assert!(err.contains("--force") && err.contains("--device cuda"), "{err}");
    }
}
