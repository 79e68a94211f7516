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
//!   peak where benches/devices.json knows it.
//! - peak memory: on the CPU the process's peak resident set (`VmHWM`), read before the
//!   second ceiling measurement (the first runs before the model exists, in 48 MB); on
//!   CUDA the engine's report (`Engine::peak_memory_bytes`): device memory in use beyond
//!   the CUDA context's, as `torch.cuda.max_memory_allocated` leaves the context out.
//!
//! On the CPU, shapes of a billion parameters and more are refused without `force`: their
//! fp32 weights, gradients and AdamW moments alone need 16 bytes per parameter (20 GB for
//! Llama 3.2 1B) and a step would take many minutes.
//!
//! `run_attention` (`sdpo-run bench --attention`) times attention alone, as PyTorch's
//! `scaled_dot_product_attention(is_causal=True)` computes it (`tools/compare_torch.py
//! --attention` times that): B causal sequences of S tokens, expressed in the pair mask
//! (`causal_batch`), forward and backward, median of the timed calls; FLOPs by the causal
//! count FlashAttention's benchmarks use (`AttentionSizes::flops_forward`).

use std::time::Instant;

use serde::Serialize;

use crate::config::LlamaConfig;
use crate::data::{Layout, PairBatch, PairExample, PROMPT};
use crate::dpo::LossConfig;
use crate::engine::profile::Profile;
use crate::engine::{self, AdamWConfig, Device, Engine};
use crate::error::{Error, Result};
use crate::weights::{LlamaWeights, SplitMix64};

// --- shapes

/// Every shape's config.json, shared with tools/compare_torch.py.
const SHAPES_JSON: &str = include_str!("../benches/shapes.json");

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

    /// The config.json of the shape (rope settings included, so RoPE costs what it costs),
    /// from benches/shapes.json, the table tools/compare_torch.py reads too.
    pub fn config_json(self) -> serde_json::Value {
        let table: serde_json::Value = serde_json::from_str(SHAPES_JSON).expect("benches/shapes.json is JSON");
        table[self.name()]["config"].clone()
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

/// The datasheet figures of each device, shared with tests/gpu.rs and tools/compare_torch.py.
const DEVICES_JSON: &str = include_str!("../benches/devices.json");

/// A device's vendor datasheet figures (benches/devices.json).
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
pub struct Datasheet {
    /// Dense bf16 tensor-core FLOP/s.
    pub bf16_flops: f64,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
}

/// The datasheet of the first device in benches/devices.json whose name fragment
/// `device` contains, where known.
pub fn datasheet(device: &str) -> Option<Datasheet> {
    #[derive(serde::Deserialize)]
    struct Entry {
        name: String,
        #[serde(flatten)]
        sheet: Datasheet,
    }
    #[derive(serde::Deserialize)]
    struct Table {
        devices: Vec<Entry>,
    }
    let table: Table = serde_json::from_str(DEVICES_JSON).expect("benches/devices.json is a device table");
    table.devices.into_iter().find(|e| device.contains(&e.name)).map(|e| e.sheet)
}

/// The vendor's dense bf16 tensor-core peak (FLOP/s) for a device name, where known.
pub fn datasheet_peak(device: &str) -> Option<f64> {
    datasheet(device).map(|d| d.bf16_flops)
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
    /// (sdpo-run, CUDA) what the engine's buffers take by `memory_plan`, the allocation
    /// code's own count: the peak less this is cuBLASLt's workspace, the kernel modules
    /// and the batch uploads.
    pub planned_mem_bytes: Option<u64>,
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
        (eng.peak_memory_bytes(), "device memory used beyond the CUDA context (cuMemGetInfo), peak".to_string())
    };
    #[cfg(feature = "cuda")]
    let planned_mem_bytes = (!on_cpu).then(|| {
        let rows = crate::data::LogpPlan::new(&batch.targets).rows.len();
        crate::engine::cuda::model::memory_plan(&cfg, batch.n_tokens(), rows, true).total()
    });
    #[cfg(not(feature = "cuda"))]
    let planned_mem_bytes = None;
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
        planned_mem_bytes,
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
        if let Some(b) = self.planned_mem_bytes {
            s += &format!(
                "  planned {:.1} MiB (the engine's buffers; the rest of the peak is cuBLASLt and the modules)\n",
                b as f64 / 1048576.0
            );
        }
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

// --- attention alone: forward + backward, against PyTorch SDPA's flash backend

/// Sizes of `sdpo-run bench --attention`: `batch` independent causal sequences of
/// `seq_len` tokens, `heads` query heads sharing `kv_heads` key/value heads of `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AttentionSizes {
    #[serde(rename = "B")]
    pub batch: usize,
    #[serde(rename = "S")]
    pub seq_len: usize,
    #[serde(rename = "H")]
    pub heads: usize,
    #[serde(rename = "Hkv")]
    pub kv_heads: usize,
    #[serde(rename = "D")]
    pub head_dim: usize,
}

impl AttentionSizes {
    /// The GPU sizes: head dim 128, sequence 2048, causal (4 sequences of 32 heads, so the
    /// GPU is full, as in FlashAttention's own benchmarks).
    pub const CUDA_DEFAULT: AttentionSizes =
        AttentionSizes { batch: 4, seq_len: 2048, heads: 32, kv_heads: 32, head_dim: 128 };
    /// The same heads on a quarter of the sequence, one of them: a few seconds on two cores.
    pub const CPU_DEFAULT: AttentionSizes =
        AttentionSizes { batch: 1, seq_len: 512, heads: 32, kv_heads: 32, head_dim: 128 };

    pub fn n_tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// (query, key) pairs a causal mask lets through, per head: `B·S(S+1)/2`.
    pub fn attended(&self) -> u64 {
        let s = self.seq_len as u64;
        self.batch as u64 * s * (s + 1) / 2
    }

    /// Forward FLOPs: `4·D` per attended (query, key) pair and head (q·k and p·v), the
    /// causal count FlashAttention's benchmarks and ours both use.
    pub fn flops_forward(&self) -> f64 {
        4.0 * (self.head_dim * self.heads) as f64 * self.attended() as f64
    }

    /// Backward FLOPs: 2.5× forward (FlashAttention's convention: q·k recomputed, dP, dQ,
    /// dK, dV are five GEMMs to forward's two).
    pub fn flops_backward(&self) -> f64 {
        2.5 * self.flops_forward()
    }

    /// Refuses sizes the op (or, with `cuda`, the kernels) cannot run, naming the flag.
    pub fn check(&self, cuda: bool) -> Result<()> {
        for (flag, v) in [
            ("--batch", self.batch),
            ("--seq-len", self.seq_len),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--head-dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("bench --attention: {flag} must be at least 1")));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::invalid(format!(
                "bench --attention: --heads {} is not a multiple of --kv-heads {} (each kv head serves the same \
                 number of query heads); use --kv-heads {} or a divisor of it",
                self.heads, self.kv_heads, self.heads
            )));
        }
        if cuda {
            #[cfg(feature = "cuda")]
            {
                let dims = crate::engine::cuda::kernels::ATTENTION_HEAD_DIMS;
                if !dims.contains(&self.head_dim) {
                    return Err(Error::invalid(format!(
                        "bench --attention: --head-dim {} on CUDA: the attention kernels are compiled for head dims \
                         {dims:?}; pick one of those, or --device cpu",
                        self.head_dim
                    )));
                }
            }
            // The kernels index rows and elements with 32-bit integers.
            let elems = self.n_tokens() as u128 * (self.heads * self.head_dim) as u128;
            if elems >= 1 << 31 {
                return Err(Error::invalid(format!(
                    "bench --attention: {} tokens x {} heads x {} dims = {elems} elements per tensor; the CUDA \
                     kernels index with 32 bits (under 2^31): lower --batch or --seq-len",
                    self.n_tokens(),
                    self.heads,
                    self.head_dim
                )));
            }
        }
        Ok(())
    }
}

/// `batch` causal sequences of `seq_len` tokens in the engine's pair mask: each sequence is
/// its own group and every token is a prompt token (branch 0). The mask's rule (see
/// `PairBatch::attends`) then reduces to `same sequence && k <= q`: exactly causal. No
/// completion tokens, so no log-prob targets.
pub fn causal_batch(batch: usize, seq_len: usize) -> PairBatch {
    let n = batch * seq_len;
    PairBatch {
        layout: Layout::Shared,
        n_pairs: 0,
        tokens: vec![0; n],
        positions: (0..n).map(|r| (r % seq_len) as u32).collect(),
        group: (0..n).map(|r| (r / seq_len) as u32).collect(),
        branch: vec![PROMPT; n],
        group_start: (0..=batch).map(|g| (g * seq_len) as u32).collect(),
        targets: Vec::new(),
    }
}

/// `len` normal values: a random block of 65537 (a prime) repeated, so that 100M-element
/// operands are cheap to fill and no row (of fewer than 65537 elements) repeats within itself.
fn tiled_normal(len: usize, seed: u64) -> Vec<f32> {
    let block = SplitMix64(seed).normals(65537.min(len), 1.0);
    block.iter().copied().cycle().take(len).collect()
}

/// q, k, v, dO of the attention benchmark (both tools draw standard normals, as torch.randn).
struct AttentionInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl AttentionInputs {
    fn new(z: &AttentionSizes, seed: u64) -> Self {
        let (n, qd, kvd) = (z.n_tokens(), z.heads * z.head_dim, z.kv_heads * z.head_dim);
        AttentionInputs {
            q: tiled_normal(n * qd, seed),
            k: tiled_normal(n * kvd, seed + 1),
            v: tiled_normal(n * kvd, seed + 2),
            dout: tiled_normal(n * qd, seed + 3),
        }
    }

    /// The values as bf16 bits for the device (q, k, v, dO), each tensor replaced by its
    /// bf16 rounding so that the output check sees what the kernels see.
    #[cfg(feature = "cuda")]
    fn round_to_bf16(&mut self) -> [Vec<crate::engine::cuda::kernels::Bf16>; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.dout].map(|x| {
            let bits = crate::engine::cuda::to_bf16(x);
            *x = crate::engine::cuda::from_bf16(&bits);
            bits
        })
    }
}

/// Relative L2 error of attention outputs against plain causal softmax attention in f64,
/// written from the definition (not through the pair mask): query rows 0, 1, 2, a quarter,
/// half, three quarters and the last two of the first sequence at head 0 and of the last
/// sequence at the last head. `o_row(token, head)` reads one output row of `head_dim`.
fn attention_check(
    z: &AttentionSizes,
    x: &AttentionInputs,
    mut o_row: impl FnMut(usize, usize) -> Result<Vec<f32>>,
) -> Result<f64> {
    let (s, d) = (z.seq_len, z.head_dim);
    let (qd, kvd, scale) = (z.heads * d, z.kv_heads * d, 1.0 / (d as f64).sqrt());
    let mut rows = vec![0, 1, 2, s / 4, s / 2, 3 * s / 4, s.saturating_sub(2), s - 1];
    rows.retain(|&t| t < s);
    rows.sort_unstable();
    rows.dedup();
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (seq, h) in [(0, 0), (z.batch - 1, z.heads - 1)] {
        let g = h / (z.heads / z.kv_heads);
        for &t in &rows {
            let row = seq * s + t;
            let qv = &x.q[row * qd + h * d..][..d];
            let keys = seq * s..=row;
            let scores: Vec<f64> = keys
                .clone()
                .map(|k| {
                    scale * qv.iter().zip(&x.k[k * kvd + g * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|sc| (sc - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            let got = o_row(row, h)?;
            for (e, &got) in got.iter().enumerate().take(d) {
                let want: f64 =
                    keys.clone().zip(&w).map(|(k, wk)| wk * x.v[k * kvd + g * d + e] as f64).sum::<f64>() / sum;
                err2 += (got as f64 - want).powi(2);
                ref2 += want * want;
            }
        }
    }
    Ok((err2 / ref2.max(1e-300)).sqrt())
}

/// Median seconds of `steps` calls of `f`, after `warmup` untimed ones; `sync` waits for
/// the device before and after each timed call (a no-op on the CPU).
fn median_secs(
    steps: usize,
    warmup: usize,
    sync: &dyn Fn() -> Result<()>,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps {
        sync()?;
        let t0 = Instant::now();
        f()?;
        sync()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    let m = t.len() / 2;
    Ok(if t.len() % 2 == 1 { t[m] } else { 0.5 * (t[m - 1] + t[m]) })
}

/// What one attention benchmark measured: median seconds, and the check of its output.
#[derive(Clone, Copy, Debug)]
pub struct AttentionTimes {
    pub fwd_s: f64,
    /// Backward alone, on the forward's saved output and log-sum-exp.
    pub bwd_s: f64,
    /// Forward then backward, timed as one region.
    pub fwd_bwd_s: f64,
    /// `attention_check`'s relative error of the forward output.
    pub check_rel_err: f64,
}

/// The CPU op (`ops::attention_forward` / `attention_backward`, fp32) on `causal_batch`.
pub fn attention_cpu(z: &AttentionSizes, steps: usize, warmup: usize, seed: u64) -> Result<AttentionTimes> {
    use crate::engine::cpu::ops::{self, AttnMask, AttnShape};
    z.check(false)?;
    let batch = causal_batch(z.batch, z.seq_len);
    let mask = AttnMask::of(&batch);
    let shape = AttnShape { n_heads: z.heads, n_kv_heads: z.kv_heads, head_dim: z.head_dim };
    let (n, qd, kvd) = (z.n_tokens(), z.heads * z.head_dim, z.kv_heads * z.head_dim);
    let x = AttentionInputs::new(z, seed);
    let (mut out, mut lse) = (vec![0f32; n * qd], vec![0f32; n * z.heads]);
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
    ops::attention_forward(&mut out, &mut lse, &x.q, &x.k, &x.v, mask, shape);
    let check_rel_err = attention_check(z, &x, |row, h| Ok(out[row * qd + h * z.head_dim..][..z.head_dim].to_vec()))?;
    // fp32 throughout, against f64: a reordered sum over ≤ S keys, far under 1e-4.
    if check_rel_err > 1e-4 {
        return Err(Error::invalid(format!(
            "the CPU attention op differs from plain causal attention by {check_rel_err:.2e} (relative): its \
             timing would not mean anything"
        )));
    }
    let no_sync = || Ok(());
    let fwd_s = median_secs(steps, warmup, &no_sync, || {
        ops::attention_forward(&mut out, &mut lse, &x.q, &x.k, &x.v, mask, shape);
        Ok(())
    })?;
    let bwd_s = median_secs(steps, warmup, &no_sync, || {
        ops::attention_backward(&mut dq, &mut dk, &mut dv, &x.dout, &x.q, &x.k, &x.v, &out, &lse, mask, shape);
        Ok(())
    })?;
    let mut fwd_bwd = || {
        ops::attention_forward(&mut out, &mut lse, &x.q, &x.k, &x.v, mask, shape);
        ops::attention_backward(&mut dq, &mut dk, &mut dv, &x.dout, &x.q, &x.k, &x.v, &out, &lse, mask, shape);
        Ok(())
    };
    let fwd_bwd_s = median_secs(steps, warmup, &no_sync, &mut fwd_bwd)?;
    std::hint::black_box((&dq, &dk, &dv));
    Ok(AttentionTimes { fwd_s, bwd_s, fwd_bwd_s, check_rel_err })
}

/// The CUDA kernels (`Kernels::attention_forward`; backward = `attention_backward_delta` +
/// `attention_backward`, which zeroes dq first) on `causal_batch`, in bf16 with separate
/// contiguous q, k, v, o, dO (`[tokens, heads·D]`) and f32 dq, dk, dv, as the engine keeps
/// them. On `Gpu::sim` it runs the kernels' code on the CPU (the times then mean nothing).
#[cfg(feature = "cuda")]
pub fn attention_cuda(
    gpu: &crate::engine::cuda::Gpu,
    z: &AttentionSizes,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> Result<AttentionTimes> {
    use crate::engine::cuda::from_bf16;
    use crate::engine::cuda::kernels::{AttnDims, AttnMaskDev};
    z.check(true)?;
    let batch = causal_batch(z.batch, z.seq_len);
    let (n, qd, kvd) = (z.n_tokens(), z.heads * z.head_dim, z.kv_heads * z.head_dim);
    let mut x = AttentionInputs::new(z, seed);
    let [q, k, v, dout] = x.round_to_bf16();
    let (q, k, v, dout) = (gpu.upload(&q)?, gpu.upload(&k)?, gpu.upload(&v)?, gpu.upload(&dout)?);
    let (group, branch, start) =
        (gpu.upload(&batch.group)?, gpu.upload(&batch.branch)?, gpu.upload(&batch.group_start)?);
    let mask = AttnMaskDev { group: gpu.ptr(&group), branch: gpu.ptr(&branch), group_start: gpu.ptr(&start) };
    let d = AttnDims {
        n_tokens: n,
        n_heads: z.heads,
        n_kv_heads: z.kv_heads,
        head_dim: z.head_dim,
        q_stride: qd,
        kv_stride: kvd,
        o_stride: qd,
    };
    let (o, lse, delta) = (gpu.alloc::<u16>(n * qd)?, gpu.alloc::<f32>(n * z.heads)?, gpu.alloc::<f32>(n * z.heads)?);
    let (dq, dk, dv) = (gpu.alloc::<f32>(n * qd)?, gpu.alloc::<f32>(n * kvd)?, gpu.alloc::<f32>(n * kvd)?);
    let (qp, kp, vp, dop) = (gpu.ptr(&q), gpu.ptr(&k), gpu.ptr(&v), gpu.ptr(&dout));
    let (op, lp, delp) = (gpu.ptr(&o), gpu.ptr(&lse), gpu.ptr(&delta));
    let (dqp, dkp, dvp) = (gpu.ptr(&dq), gpu.ptr(&dk), gpu.ptr(&dv));
    let forward = || gpu.k.attention_forward(op, lp, qp, kp, vp, &mask, &d);
    let backward = || {
        gpu.k.attention_backward_delta(delp, dop, op, &d)?;
        gpu.k.attention_backward(dqp, dkp, dvp, qd, kvd, dop, qp, kp, vp, lp, delp, &mask, &d)
    };
    forward()?;
    let check_rel_err = attention_check(z, &x, |row, h| {
        Ok(from_bf16(&gpu.download(op.slice(row * qd + h * z.head_dim, z.head_dim)?)?))
    })?;
    // bf16 output (2^-9 relative rounding) and P rounded to bf16 for P·V (2^-9 per weight,
    // partly cancelling): a few 1e-3. A wrong mask or head mapping is O(1) on early rows.
    if check_rel_err > 2e-2 {
        return Err(Error::Cuda(format!(
            "attention_forward_hd{} differs from plain causal attention by {check_rel_err:.2e} (relative, \
             tolerance 2e-2): its timing would not mean anything",
            z.head_dim
        )));
    }
    let sync = || gpu.sync();
    let fwd_s = median_secs(steps, warmup, &sync, forward)?;
    let bwd_s = median_secs(steps, warmup, &sync, backward)?;
    let fwd_bwd_s = median_secs(steps, warmup, &sync, || {
        forward()?;
        backward()
    })?;
    Ok(AttentionTimes { fwd_s, bwd_s, fwd_bwd_s, check_rel_err })
}

#[derive(Clone, Debug)]
pub struct AttentionOptions {
    pub device: Device,
    /// Each `None`: `AttentionSizes::CUDA_DEFAULT` or `CPU_DEFAULT`'s value for the device.
    pub batch: Option<usize>,
    pub seq_len: Option<usize>,
    pub heads: Option<usize>,
    /// `None`: as many as `heads`.
    pub kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
}

/// One JSON line of `sdpo-run bench --attention`; `tools/compare_torch.py --attention`
/// prints the same keys (tool "pytorch-sdpa-flash" / "pytorch-sdpa").
#[derive(Clone, Debug, Serialize)]
pub struct AttentionReport {
    /// "attention" (the training benchmark's lines have no `kind`).
    pub kind: String,
    pub tool: String,
    pub device: String,
    /// "fp32" (CPU op) or "bf16" (CUDA kernels: bf16 q, k, v, o, dO; f32 dq, dk, dv).
    pub dtype: String,
    pub causal: bool,
    #[serde(flatten)]
    pub sizes: AttentionSizes,
    pub threads: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Median milliseconds of the forward, the backward alone, and forward + backward.
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub fwd_bwd_ms: f64,
    pub flops_fwd: f64,
    pub flops_bwd: f64,
    pub flops_fwd_bwd: f64,
    pub tflops_fwd: f64,
    pub tflops_bwd: f64,
    pub tflops_fwd_bwd: f64,
    /// How FLOPs are counted and times taken, in words.
    pub flop_count: String,
    pub timing: String,
    /// Relative L2 error of sampled output rows against plain causal attention in f64.
    pub check_rel_err: f64,
}

pub fn run_attention(opts: &AttentionOptions) -> Result<AttentionReport> {
    if opts.steps == 0 {
        return Err(Error::invalid("--steps must be at least 1"));
    }
    let cuda = match opts.device {
        Device::Cuda => true,
        Device::Cpu => false,
        Device::Auto => cfg!(feature = "cuda") && gpu_present(),
    };
    let base = if cuda { AttentionSizes::CUDA_DEFAULT } else { AttentionSizes::CPU_DEFAULT };
    let heads = opts.heads.unwrap_or(base.heads);
    let z = AttentionSizes {
        batch: opts.batch.unwrap_or(base.batch),
        seq_len: opts.seq_len.unwrap_or(base.seq_len),
        heads,
        kv_heads: opts.kv_heads.unwrap_or(heads),
        head_dim: opts.head_dim.unwrap_or(base.head_dim),
    };
    z.check(cuda)?;
    let (device, dtype, threads, t) = if cuda {
        #[cfg(not(feature = "cuda"))]
        return Err(Error::NoGpu("this build has no CUDA engine (feature `cuda` is off)".into()));
        #[cfg(feature = "cuda")]
        {
            let gpu = crate::engine::cuda::Gpu::open(0)?;
            let t = attention_cuda(&gpu, &z, opts.steps, opts.warmup, opts.seed)?;
            (gpu.name.clone(), "bf16", 0, t)
        }
    } else {
        let threads = rayon::current_num_threads();
        let t = attention_cpu(&z, opts.steps, opts.warmup, opts.seed)?;
        (format!("cpu ({threads} threads)"), "fp32", threads, t)
    };
    let (f_fwd, f_bwd) = (z.flops_forward(), z.flops_backward());
    Ok(AttentionReport {
        kind: "attention".into(),
        tool: "sdpo-run".into(),
        device,
        dtype: dtype.into(),
        causal: true,
        sizes: z,
        threads,
        steps: opts.steps,
        warmup: opts.warmup,
        fwd_ms: t.fwd_s * 1e3,
        bwd_ms: t.bwd_s * 1e3,
        fwd_bwd_ms: t.fwd_bwd_s * 1e3,
        flops_fwd: f_fwd,
        flops_bwd: f_bwd,
        flops_fwd_bwd: f_fwd + f_bwd,
        tflops_fwd: f_fwd / t.fwd_s / 1e12,
        tflops_bwd: f_bwd / t.bwd_s / 1e12,
        tflops_fwd_bwd: (f_fwd + f_bwd) / t.fwd_bwd_s / 1e12,
        flop_count: "forward 4*D*H per attended (query, key), B*S*(S+1)/2 of them; backward 2.5x forward".into(),
        timing: format!(
            "median of {} calls after {} untimed, wall clock{}",
            opts.steps,
            opts.warmup,
            if cuda { ", stream synchronised before and after each" } else { "" }
        ),
        check_rel_err: t.check_rel_err,
    })
}

impl AttentionReport {
    pub fn table(&self) -> String {
        let z = &self.sizes;
        let mut s = format!(
            "causal attention on {} ({}): B {} x S {}, {} heads / {} kv of {}, median of {} calls (output check: rel err {:.1e})\n",
            self.device, self.dtype, z.batch, z.seq_len, z.heads, z.kv_heads, z.head_dim, self.steps, self.check_rel_err
        );
        for (name, ms, tf) in [
            ("forward", self.fwd_ms, self.tflops_fwd),
            ("backward", self.bwd_ms, self.tflops_bwd),
            ("forward + backward", self.fwd_bwd_ms, self.tflops_fwd_bwd),
        ] {
            s += &format!("  {name:<19} {ms:>10.3} ms  {tf:>9.3} TFLOP/s\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        // the table has every shape, and nothing else
        let table: serde_json::Value = serde_json::from_str(SHAPES_JSON).unwrap();
        let all = <Shape as clap::ValueEnum>::value_variants();
        assert_eq!(table.as_object().unwrap().len(), all.len());
        assert!(all.iter().all(|s| s.config_json().is_object()));
    }

    #[test]
    fn datasheet_lookup() {
        assert_eq!(datasheet("NVIDIA H200"), Some(Datasheet { bf16_flops: 989.4e12, bandwidth: 4.8e12 }));
        // The more specific fragment first: an H100 PCIe is not an SXM H100.
        assert_eq!(datasheet_peak("NVIDIA H100 PCIe"), Some(756.0e12));
        assert_eq!(datasheet("NVIDIA H100 80GB HBM3").map(|d| d.bandwidth), Some(3.35e12));
        assert_eq!(datasheet_peak("cpu (2 threads)"), None);
    }

    #[test]
    fn causal_batch_is_exactly_causal() {
        // The pair mask's rule on `causal_batch` against the definition: same sequence, k ≤ q.
        let (nb, s) = (3, 7);
        let b = causal_batch(nb, s);
        for q in 0..nb * s {
            for k in 0..nb * s {
                assert_eq!(b.attends(q, k), q / s == k / s && k <= q, "query {q}, key {k}");
            }
        }
        let z = AttentionSizes { batch: nb, seq_len: s, heads: 1, kv_heads: 1, head_dim: 1 };
        assert_eq!((attended_pairs(&b), z.attended()), (3 * 28, 3 * 28));

        // The CPU op under `AttnMask::of` that batch against softmax attention written from the
        // definition, every row and head, 2 query heads per kv head; 70 rows per sequence
        // cross the op's 64-row tiles.
        use crate::engine::cpu::ops::{attention_forward, AttnMask, AttnShape};
        let z = AttentionSizes { batch: 3, seq_len: 70, heads: 4, kv_heads: 2, head_dim: 8 };
        let (n, qd, kvd, d) = (z.n_tokens(), 32, 16, 8);
        let x = AttentionInputs::new(&z, 5);
        let b = causal_batch(z.batch, z.seq_len);
        let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: d };
        let (mut out, mut lse) = (vec![0f32; n * qd], vec![0f32; n * 4]);
        attention_forward(&mut out, &mut lse, &x.q, &x.k, &x.v, AttnMask::of(&b), shape);
        let mut worst = 0f64;
        for row in 0..n {
            let seq_start = row / z.seq_len * z.seq_len;
            for h in 0..4 {
                let g = h / 2;
                let dotqk = |k: usize| {
                    (0..d).map(|e| x.q[row * qd + h * d + e] as f64 * x.k[k * kvd + g * d + e] as f64).sum::<f64>()
                };
                let w: Vec<f64> = (seq_start..=row).map(|k| (dotqk(k) / (d as f64).sqrt()).exp()).collect();
                let sum: f64 = w.iter().sum();
                for e in 0..d {
                    let want =
                        (seq_start..=row).zip(&w).map(|(k, wk)| wk * x.v[k * kvd + g * d + e] as f64).sum::<f64>()
                            / sum;
                    worst = worst.max((out[row * qd + h * d + e] as f64 - want).abs());
                }
            }
        }
        // fp32 sums of ≤ 70 terms of |v| ~ 1 against f64: ~1e-6.
        assert!(worst < 1e-5, "CPU op on the causal batch vs the definition: max abs error {worst}");

        // `attention_check` agrees, and sees a mask that lets the sequences see each other
        // (one sequence of 210 rows: the last sequence's rows then average over more keys).
        fn rows(o: &[f32], qd: usize, d: usize) -> impl FnMut(usize, usize) -> Result<Vec<f32>> + '_ {
            move |row, h| Ok(o[row * qd + h * d..][..d].to_vec())
        }
        assert!(attention_check(&z, &x, rows(&out, qd, d)).unwrap() < 1e-5);
        let leaky = causal_batch(1, n);
        attention_forward(&mut out, &mut lse, &x.q, &x.k, &x.v, AttnMask::of(&leaky), shape);
        let err = attention_check(&z, &x, rows(&out, qd, d)).unwrap();
        assert!(err > 0.1, "the check must see sequences attending to each other: {err}");
    }

    #[test]
    fn attention_flops_and_sizes() {
        // B 2, S 3: 2·(1+2+3) = 12 attended pairs per head; forward 4·D·H·12 with D 16, H 4.
        let z = AttentionSizes { batch: 2, seq_len: 3, heads: 4, kv_heads: 2, head_dim: 16 };
        assert_eq!(z.attended(), 12);
        assert_eq!((z.flops_forward(), z.flops_backward()), (3072.0, 7680.0));
        // The aim's sizes: 4·128·32 · 4·2048·2049/2 = 137.5 GFLOP forward.
        assert_eq!(AttentionSizes::CUDA_DEFAULT.flops_forward(), 137_506_062_336.0);
        assert!(z.check(false).is_ok() && z.check(true).is_ok());
        let err = |z: AttentionSizes, cuda: bool| z.check(cuda).unwrap_err().to_string();
        assert!(err(AttentionSizes { seq_len: 0, ..z }, false).contains("--seq-len"));
        assert!(err(AttentionSizes { heads: 3, kv_heads: 2, ..z }, false).contains("--kv-heads 2"));
        assert!(AttentionSizes { head_dim: 96, ..z }.check(false).is_ok(), "the CPU op takes any head dim");
        #[cfg(feature = "cuda")]
        assert!(err(AttentionSizes { head_dim: 96, ..z }, true).contains("--head-dim 96"));
        let huge = AttentionSizes { batch: 64, seq_len: 8192, heads: 32, kv_heads: 8, head_dim: 128 };
        assert!(err(huge, true).contains("32 bits"));
    }

    #[test]
    fn refuses_big_shapes_on_cpu() {
        let opts = BenchOptions { shape: Some(Shape::Llama8b), device: Device::Cpu, ..Default::default() };
        let err = run(&opts).expect_err("llama-8b on the CPU without --force must be refused").to_string();
        assert!(err.contains("--force") && err.contains("--device cuda"), "{err}");
    }
}
