//! What a trainer needs from a device. Two engines implement it: `cpu` (fp32, the
//! reference) and `cuda` (bf16 kernels). Gradients accumulate across `train_step` calls
//! until `optimizer_step`, so a global batch split into micro-batches gives exactly the
//! update of one large batch: each micro-batch passes `loss_scale = 1 / pairs_in_global_batch`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profile;

use serde::{Deserialize, Serialize};

use crate::config::{LlamaConfig, RopeScaling};
use crate::data::PairBatch;
use crate::dpo::{LossConfig, PairLogps};
use crate::error::{Error, Result};
use crate::lora::{Adapter, LoraWeights};
use crate::weights::LlamaWeights;

/// Which engine `open` builds. `Auto`: the GPU when there is one and it can run the model,
/// else the CPU.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Builds the engine for `device` on `weights` (checked against `cfg`, tensor by tensor).
pub fn open(device: Device, cfg: LlamaConfig, weights: LlamaWeights) -> Result<Box<dyn Engine>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuEngine::new(cfg, weights)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda => Ok(Box::new(cuda::model::CudaEngine::new(cfg, weights, 0)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(Error::NoGpu("this build has no CUDA engine (feature `cuda` is off)".into())),
        // The GPU when there is one and it can run this model; else, quietly, the CPU.
        Device::Auto => {
            #[cfg(feature = "cuda")]
            if cuda::gpu_unavailable().is_none() && cuda::model::unsupported(&cfg).is_none() {
                return Ok(Box::new(cuda::model::CudaEngine::new(cfg, weights, 0)?));
            }
            Ok(Box::new(cpu::CpuEngine::new(cfg, weights)?))
        }
    }
}

/// Builds the engine for `device` on the frozen base `weights` with the LoRA `adapter`
/// (`lora.rs`), which is what trains. LoRA runs on the CPU engine: `Auto` picks it.
pub fn open_lora(device: Device, cfg: LlamaConfig, weights: LlamaWeights, adapter: Adapter) -> Result<Box<dyn Engine>> {
    match device {
        Device::Cpu | Device::Auto => Ok(Box::new(cpu::CpuEngine::with_adapter(cfg, weights, adapter)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda => Err(cuda::lora_unsupported()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(Error::NoGpu("this build has no CUDA engine (feature `cuda` is off)".into())),
    }
}

/// The error of an engine asked for LoRA work without an adapter.
pub(crate) fn no_adapter() -> Error {
    Error::invalid("this engine holds no LoRA adapter (it fine-tunes every weight); open it with engine::open_lora")
}

/// AdamW with decoupled weight decay and bias correction, as `torch.optim.AdamW`;
/// gradients are clipped to `max_grad_norm` (global L2 norm) first when it is set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// Hugging Face Trainer's defaults.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) }
    }
}

impl AdamWConfig {
    /// The decay for the tensor `name`: none for the RMSNorm weights, which the Hugging
    /// Face Trainer puts in its no-decay group (with biases, which Llama has none of).
    pub fn decay_of(&self, name: &str) -> f64 {
        if name.contains("norm") {
            0.0
        } else {
            self.weight_decay
        }
    }

    /// Refuses settings outside their meaningful ranges, naming the flag.
    pub fn check(&self) -> crate::Result<()> {
        let bad =
            |flag: &str, v: f64, want: &str| Err(crate::Error::invalid(format!("--{flag} must be {want}, got {v}")));
        for (flag, v) in [("adam-beta1", self.beta1), ("adam-beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(flag, v, "in [0, 1)");
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("adam-eps", self.eps, "a finite number > 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight-decay", self.weight_decay, "a finite number >= 0");
        }
        match self.max_grad_norm {
            Some(n) if !(n > 0.0 && n.is_finite()) => {
                bad("max-grad-norm", n, "a finite number >= 0 (0 turns clipping off)")
            }
            _ => Ok(()),
        }
    }
}

/// AdamW's state: first and second moments and the number of updates taken; of every
/// weight (`LlamaWeights`) or of a LoRA adapter (`LoraWeights`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState<W = LlamaWeights> {
    pub m: W,
    pub v: W,
    pub step: u64,
}

/// What both engines refuse before any work: an empty batch, a token outside `cfg`'s
/// vocabulary (a tokenizer that does not match the model), and, for a training step,
/// reference log-probs that are not one per pair.
pub fn check_inputs(cfg: &LlamaConfig, batch: &PairBatch, reference: Option<&[PairLogps]>) -> Result<()> {
    if batch.n_tokens() == 0 || batch.targets.is_empty() {
        return Err(Error::invalid("empty batch: no tokens or no completion targets"));
    }
    if let Some((row, &tok)) = batch.tokens.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab_size) {
        return Err(Error::invalid(format!(
            "token id {tok} (batch row {row}) is outside the model's vocabulary of {}; \
             the tokenizer does not match the model",
            cfg.vocab_size
        )));
    }
    // Dynamic NTK rope changes its frequencies past max_position_embeddings; below it, it
    // is the default rope that both engines compute.
    if cfg.rope_scaling == RopeScaling::Dynamic {
        if let Some(&p) = batch.positions.iter().find(|&&p| p as usize >= cfg.max_position_embeddings) {
            return Err(Error::invalid(format!(
                "position {p} is past max_position_embeddings ({}), where this model's dynamic rope \
                 rescales its frequencies, which sdpo does not; cut the data with --max-length",
                cfg.max_position_embeddings
            )));
        }
    }
    match reference {
        Some(r) if r.len() != batch.n_pairs => Err(Error::invalid(format!(
            "train_step: {} reference log-prob pairs for a batch of {} pairs",
            r.len(),
            batch.n_pairs
        ))),
        _ => Ok(()),
    }
}

pub trait Engine {
    fn config(&self) -> &LlamaConfig;

    /// A short description of the device, for logs ("cpu (2 threads)", "NVIDIA H200").
    fn device_name(&self) -> String;

    /// Per-pair completion log-probs, without gradients (reference, eval, partition).
    fn sequence_logps(&mut self, batch: &PairBatch) -> Result<Vec<PairLogps>>;

    /// Forward and backward on one micro-batch: adds the gradient of
    /// `loss_scale · Σ_pairs loss(pair)` to the gradient buffers, and returns the
    /// policy's per-pair log-probs (from which the trainer computes metrics).
    fn train_step(
        &mut self,
        batch: &PairBatch,
        reference: &[PairLogps],
        loss: &LossConfig,
        loss_scale: f64,
    ) -> Result<Vec<PairLogps>>;

    /// Clips, applies one AdamW update at learning rate `lr`, zeroes the gradients.
    /// Returns the global gradient norm before clipping.
    fn optimizer_step(&mut self, opt: &AdamWConfig, lr: f64) -> Result<f64>;

    fn zero_grads(&mut self);

    /// The accumulated gradients, fp32, in parameter layout.
    fn grads(&self) -> Result<LlamaWeights>;

    /// The current weights (fp32 masters).
    fn weights(&self) -> Result<LlamaWeights>;

    /// Replaces the weights; gradients are zeroed, optimizer state is kept.
    fn set_weights(&mut self, w: &LlamaWeights) -> Result<()>;

    /// AdamW moments, for checkpoints and resume; `None` before the first update.
    fn optimizer_state(&self) -> Result<Option<AdamState>>;

    /// Restores (or with `None`, resets) the optimizer state.
    fn set_optimizer_state(&mut self, state: Option<AdamState>) -> Result<()>;

    // --- LoRA (`open_lora`): the base above is frozen and the adapter trains. An engine
    // without an adapter answers `adapter` with `None` and the rest with an error.

    /// The adapter's weights; `None` when the engine fine-tunes every weight.
    fn adapter(&self) -> Result<Option<LoraWeights>> {
        Ok(None)
    }

    /// Replaces the adapter's weights (same targets and rank); gradients are zeroed,
    /// optimizer state is kept.
    fn set_adapter(&mut self, a: &LoraWeights) -> Result<()> {
        let _ = a;
        Err(no_adapter())
    }

    /// Turns the adapter off (the bare base: the reference of a fresh adapter) or back on.
    fn set_adapter_enabled(&mut self, on: bool) -> Result<()> {
        let _ = on;
        Err(no_adapter())
    }

    /// The adapter's accumulated gradients.
    fn adapter_grads(&self) -> Result<LoraWeights> {
        Err(no_adapter())
    }

    /// The adapter's AdamW moments; `None` before the first update.
    fn adapter_optimizer_state(&self) -> Result<Option<AdamState<LoraWeights>>> {
        Err(no_adapter())
    }

    /// Restores (or with `None`, resets) the adapter's optimizer state.
    fn set_adapter_optimizer_state(&mut self, state: Option<AdamState<LoraWeights>>) -> Result<()> {
        let _ = state;
        Err(no_adapter())
    }

    /// Starts (`true`) or stops timing ops by category (`profile.rs`), from zero;
    /// returns whether this engine can. Profiling may slow the engine down a little.
    fn set_profiling(&mut self, on: bool) -> bool {
        let _ = on;
        false
    }

    /// The time per category since profiling started or was last taken (then restarts
    /// from zero); `None` where the engine does not profile or profiling is off.
    fn take_profile(&mut self) -> Option<profile::Profile> {
        None
    }

    /// Peak device memory allocated so far, in bytes, where the engine tracks it
    /// (`sdpo-run bench` reads the process's peak RSS for the CPU engine instead).
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// FLOP/s of a large GEMM in the engine's compute dtype on its device, measured now:
    /// the ceiling of `sdpo-run bench`'s MFU (`None`: not measured by this engine).
    fn gemm_peak_flops(&mut self) -> Option<f64> {
        None
    }
}
