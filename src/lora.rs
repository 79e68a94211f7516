//! LoRA adapters as PEFT makes, saves and loads them. A targeted linear `y = x·Wᵀ`
//! becomes `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with `A` (`lora_A`) `[r, in]`, `B` (`lora_B`)
//! `[out, r]` and `s = α/r`, or `α/√r` with rsLoRA; `W` stays frozen.
//!
//! A fresh adapter is initialised as PEFT's `reset_lora_parameters` does: `A` by
//! `kaiming_uniform_(a=√5)`, which is U(−1/√in, 1/√in), drawn here from a seeded
//! SplitMix64 (so the values are not torch's, the distribution is), and `B` zero, so
//! base ⊕ fresh adapter computes exactly the base.
//!
//! On disk an adapter is a folder: `adapter_config.json` (`peft_type` "LORA", `r`,
//! `lora_alpha`, `target_modules`, …) and `adapter_model.safetensors` keyed as
//! `base_model.model.model.layers.<l>.<self_attn|mlp>.<module>.lora_<A|B>.weight`.
//! What sdpo cannot compute (biases, DoRA, per-module ranks or alphas, modules saved
//! whole, adapters on other modules) is refused naming the file and field.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{DType, LlamaConfig};
use crate::error::{Error, Result};
use crate::weights::{
    load_tensors_f32, write_folder_atomic, write_safetensors, write_synced, LlamaWeights, SplitMix64, TensorSpec,
};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's default `lora_alpha`.
pub const DEFAULT_ALPHA: f64 = 8.0;

/// The linear layers of a Llama decoder layer that an adapter can target, in the order
/// of `Module::index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];

    /// The module's name in Hugging Face's Llama (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn path(self) -> String {
        let parent = if self.index() < 4 { "self_attn" } else { "mlp" };
        format!("{parent}.{}", self.name())
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// `(in, out)` features of the base linear.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, i, q, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        match self {
            Module::QProj => (h, q),
            Module::KProj | Module::VProj => (h, kv),
            Module::OProj => (q, h),
            Module::GateProj | Module::UpProj => (h, i),
            Module::DownProj => (i, h),
        }
    }
}

/// The hyper-parameters of an adapter, as PEFT's `LoraConfig` names them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Sorted, without repeats.
    pub targets: Vec<Module>,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Seeds the dropout masks (`dropout_mask`); sdpo-run's, not part of PEFT's config.
    #[serde(default)]
    pub dropout_seed: u64,
}

impl LoraConfig {
    /// A config from command-line style arguments: `targets` are module names, or the one
    /// word `all-linear` (every linear layer but the LM head, as PEFT reads it).
    pub fn new(r: usize, alpha: Option<f64>, targets: &[String], dropout: f64, use_rslora: bool) -> Result<Self> {
        let targets = parse_targets(targets).map_err(|e| Error::invalid(format!("--lora-targets: {e}")))?;
        let c = LoraConfig { r, alpha: alpha.unwrap_or(DEFAULT_ALPHA), targets, dropout, use_rslora, dropout_seed: 0 };
        c.check().map_err(Error::invalid)?;
        Ok(c)
    }

    /// Refuses values outside their meaningful ranges, naming the flag.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.r == 0 {
            return Err("--lora-r must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("--lora-alpha must be a finite number > 0, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("--lora-dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.targets.is_empty() {
            return Err("--lora-targets names no module".into());
        }
        Ok(())
    }

    /// The factor on `B·A`: α/r, or α/√r with rsLoRA (computed in f64, as PEFT's Python float).
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }
}

/// Module names (or `all-linear`) to the sorted set of modules; an unknown name is an
/// error listing the known ones.
fn parse_targets(names: &[String]) -> std::result::Result<Vec<Module>, String> {
    let mut out = Vec::new();
    for name in names.iter().flat_map(|n| n.split(',')).map(str::trim).filter(|n| !n.is_empty()) {
        if name.eq_ignore_ascii_case("all-linear") {
            out.extend(Module::ALL);
            continue;
        }
        out.push(Module::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = Module::ALL.iter().map(|m| m.name()).collect();
            format!("unknown target module `{name}`; sdpo targets {} or all-linear", known.join(", "))
        })?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// SplitMix64's output function: a 64-bit mix of `z`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// The dropout mask of module `m`'s adapter input in `layer`, `[n, in]` row-major: each
/// element is 0 (dropped, probability `p`) or 1/(1−p), as `nn.Dropout` in training. Element
/// (row, col) is kept iff `u ≥ p` with `u = (h >> 11) / 2⁵³`,
/// `h = mix64(k ^ ((7·layer + index(m)) << 40) ^ (row·in + col))`,
/// `k = mix64(seed + 0x9E3779B97F4A7C15·(draw + 1))`: a function of its coordinates alone,
/// so any engine (and tools/make_lora_fixtures.py) draws the same mask. PEFT's own masks
/// come from torch's generator and differ.
pub fn dropout_mask(seed: u64, draw: u64, layer: usize, m: Module, n: usize, din: usize, p: f64) -> Vec<f32> {
    let k = mix64(seed.wrapping_add(0x9E3779B97F4A7C15u64.wrapping_mul(draw.wrapping_add(1))));
    let k = k ^ (((7 * layer + m.index()) as u64) << 40);
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..n * din)
        .map(|e| {
            let u = (mix64(k ^ e as u64) >> 11) as f64 / (1u64 << 53) as f64;
            if u >= p {
                keep
            } else {
                0.0
            }
        })
        .collect()
}

/// One targeted linear's adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>, // [r, in]
    pub b: Vec<f32>, // [out, r]
}

/// Every adapter of a model: per decoder layer, one slot per `Module` (by `Module::index`).
/// The same struct holds gradients and AdamW moments.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraWeights {
    pub r: usize,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

/// The key PEFT saves a tensor under: `base_model.model.model.layers.<l>.<path>.lora_<A|B>.weight`.
pub fn peft_key(layer: usize, m: Module, which: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.lora_{which}.weight", m.path())
}

impl LoraWeights {
    /// Zeros for every target of `lc` in every layer.
    pub fn zeros(cfg: &LlamaConfig, lc: &LoraConfig) -> Self {
        let layer = || {
            std::array::from_fn(|i| {
                let m = Module::ALL[i];
                lc.targets.contains(&m).then(|| {
                    let (din, dout) = m.dims(cfg);
                    LoraPair { a: vec![0.0; lc.r * din], b: vec![0.0; dout * lc.r] }
                })
            })
        };
        LoraWeights { r: lc.r, layers: (0..cfg.n_layers).map(|_| layer()).collect() }
    }

    /// A fresh adapter as PEFT initialises one: `A` ~ U(−1/√in, 1/√in), `B` = 0.
    pub fn init(cfg: &LlamaConfig, lc: &LoraConfig, seed: u64) -> Self {
        let mut w = Self::zeros(cfg, lc);
        let mut rng = SplitMix64(seed);
        for p in w.layers.iter_mut().flatten().flatten() {
            let bound = 1.0 / ((p.a.len() / lc.r) as f64).sqrt();
            for x in &mut p.a {
                *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
        }
        w
    }

    /// Zeros shaped as `self` (gradients, moments).
    pub fn zeros_like(&self) -> Self {
        let z = |p: &LoraPair| LoraPair { a: vec![0.0; p.a.len()], b: vec![0.0; p.b.len()] };
        let layers = self.layers.iter().map(|l| std::array::from_fn(|i| l[i].as_ref().map(z))).collect();
        LoraWeights { r: self.r, layers }
    }

    /// Every tensor's PEFT key and shape, in the order of `tensors` (layer, module, A then B).
    pub fn specs(&self) -> Vec<TensorSpec> {
        let (r, mut out) = (self.r, Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            for (m, p) in Module::ALL.iter().zip(layer) {
                if let Some(p) = p {
                    out.push(TensorSpec { name: peft_key(l, *m, 'A'), shape: vec![r, p.a.len() / r] });
                    out.push(TensorSpec { name: peft_key(l, *m, 'B'), shape: vec![p.b.len() / r, r] });
                }
            }
        }
        out
    }

    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        self.layers.iter().flatten().flatten().flat_map(|p| [&p.a, &p.b]).collect()
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.layers.iter_mut().flatten().flatten().flat_map(|p| [&mut p.a, &mut p.b]).collect()
    }

    pub fn numel(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }

    /// Whether `other` has an adapter, of the same size, exactly where `self` has one.
    pub fn same_shape(&self, other: &LoraWeights) -> bool {
        self.r == other.r
            && self.layers.len() == other.layers.len()
            && self.layers.iter().zip(&other.layers).all(|(x, y)| {
                x.iter().zip(y).all(|(p, q)| match (p, q) {
                    (Some(p), Some(q)) => p.a.len() == q.a.len() && p.b.len() == q.b.len(),
                    (None, None) => true,
                    _ => false,
                })
            })
    }
}

// --- the adapter folder

/// An adapter with its config, as read from or written to a PEFT folder.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub config: LoraConfig,
    pub weights: LoraWeights,
    /// `base_model_name_or_path`: the model the adapter was trained on (informational).
    pub base_model: String,
}

impl Adapter {
    /// A fresh adapter (`LoraWeights::init`) for `cfg`'s model.
    pub fn fresh(cfg: &LlamaConfig, config: LoraConfig, seed: u64, base_model: String) -> Self {
        let weights = LoraWeights::init(cfg, &config, seed);
        Adapter { config, weights, base_model }
    }

    /// Reads the PEFT adapter folder `dir` for a base model of config `cfg`.
    pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let cpath = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cpath).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::file(
                    &cpath,
                    "missing: a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
                )
            } else {
                Error::io(&cpath, e)
            }
        })?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&cpath, format!("not valid JSON ({e}); is this a PEFT adapter folder?")))?;
        let (config, base_model) = parse_config(&raw).map_err(|msg| Error::file(&cpath, msg))?;

        let wpath = dir.join(WEIGHTS_FILE);
        if !wpath.is_file() {
            return Err(Error::file(
                &wpath,
                "missing: the adapter's weights (adapter_model.bin is not read; save with safetensors)",
            ));
        }
        let tensors = load_tensors_f32(&wpath)?;
        let mut weights = LoraWeights { r: config.r, layers: (0..cfg.n_layers).map(|_| Default::default()).collect() };
        let mut halves = std::collections::BTreeMap::new();
        for (key, (shape, data)) in tensors {
            let (layer, m, which) = parse_key(&key, cfg.n_layers).map_err(|msg| Error::file(&wpath, msg))?;
            let (din, dout) = m.dims(cfg);
            let want = if which == 'A' { [config.r, din] } else { [dout, config.r] };
            if shape != want {
                return Err(Error::file(
                    &wpath,
                    format!(
                        "tensor `{key}` has shape {shape:?}, expected {want:?} (r = {} from {CONFIG_FILE}, \
                         the base's {} is [{dout}, {din}]); the adapter belongs to another model or rank",
                        config.r,
                        m.name()
                    ),
                ));
            }
            halves.insert((layer, m, which), data);
        }
        for ((layer, m, which), data) in &halves {
            let other = if *which == 'A' { 'B' } else { 'A' };
            let Some(pair) = halves.get(&(*layer, *m, other)) else {
                return Err(Error::file(&wpath, format!("tensor `{}` is missing", peft_key(*layer, *m, other))));
            };
            if *which == 'A' {
                weights.layers[*layer][m.index()] = Some(LoraPair { a: data.clone(), b: pair.clone() });
            }
        }
        if weights.numel() == 0 {
            return Err(Error::file(&wpath, "holds no lora_A / lora_B tensor"));
        }
        let mut config = config;
        config.targets =
            Module::ALL.into_iter().filter(|m| weights.layers.iter().any(|l| l[m.index()].is_some())).collect();
        Ok(Adapter { config, weights, base_model })
    }

    /// Writes the adapter as a PEFT folder at `dir`, crash-safe (`write_folder_atomic`);
    /// the tensors in f32.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let c = &self.config;
        let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 { json!(c.alpha as i64) } else { json!(c.alpha) };
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": c.r,
            "lora_alpha": alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.use_rslora,
            "target_modules": c.targets.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "bias": "none",
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        let specs = self.weights.specs();
        let tensors: Vec<(&str, &[usize], &[f32])> = specs
            .iter()
            .zip(self.weights.tensors())
            .map(|(s, t)| (s.name.as_str(), s.shape.as_slice(), t.as_slice()))
            .collect();
        write_folder_atomic(dir, |tmp| {
            let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises") + "\n";
            write_synced(&tmp.join(CONFIG_FILE), text.as_bytes())?;
            write_safetensors(&tmp.join(WEIGHTS_FILE), &tensors, DType::F32)
        })
    }
}

/// Folds the adapter into `w` (the base it belongs to): `W += s·B·A` for every adapted
/// linear, as PEFT's `merge_and_unload` does, so the result computes base ⊕ adapter.
pub fn merge_into(cfg: &LlamaConfig, w: &mut LlamaWeights, adapter: &Adapter) {
    let s = adapter.config.scale();
    let r = adapter.weights.r;
    for (lw, layer) in w.layers.iter_mut().zip(&adapter.weights.layers) {
        for (m, p) in Module::ALL.iter().zip(layer) {
            let Some(p) = p else { continue };
            let (din, dout) = m.dims(cfg);
            let target = match m {
                Module::QProj => &mut lw.q_proj,
                Module::KProj => &mut lw.k_proj,
                Module::VProj => &mut lw.v_proj,
                Module::OProj => &mut lw.o_proj,
                Module::GateProj => &mut lw.gate_proj,
                Module::UpProj => &mut lw.up_proj,
                Module::DownProj => &mut lw.down_proj,
            };
            // delta[o, i] = Σ_k B[o, k]·A[k, i], as linear_forward(B, Aᵀ).
            let mut at = vec![0f32; din * r];
            for k in 0..r {
                for i in 0..din {
                    at[i * r + k] = p.a[k * din + i];
                }
            }
            let mut delta = vec![0f32; dout * din];
            crate::engine::cpu::ops::linear_forward(&mut delta, &p.b, &at, dout, r, din);
            for (x, d) in target.iter_mut().zip(&delta) {
                *x += s * d;
            }
        }
    }
}

/// `adapter_config.json` to a `LoraConfig` (targets filled in from the tensors later) and
/// `base_model_name_or_path`; what sdpo cannot compute is an error naming the field.
fn parse_config(raw: &Value) -> std::result::Result<(LoraConfig, String), String> {
    let field = |k: &str| raw.get(k).filter(|v| !v.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(format!(
                "`peft_type` is {}, expected \"LORA\"; sdpo reads LoRA adapters only",
                other.map_or("missing".into(), |s| format!("{s:?}"))
            ))
        }
    }
    let r = field("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or("`r` must be a positive integer")?;
    let alpha = match field("lora_alpha") {
        None => DEFAULT_ALPHA,
        Some(v) => v.as_f64().filter(|a| a.is_finite() && *a > 0.0).ok_or("`lora_alpha` must be a number > 0")?,
    };
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(v) => v.as_f64().filter(|p| (0.0..1.0).contains(p)).ok_or("`lora_dropout` must be in [0, 1)")?,
    };
    let flag = |k: &str| -> std::result::Result<bool, String> {
        match field(k) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or(format!("`{k}` must be true or false")),
        }
    };
    let use_rslora = flag("use_rslora")?;
    for k in ["use_dora", "lora_bias", "fan_in_fan_out"] {
        if flag(k)? {
            return Err(format!("`{k}` is true; sdpo computes plain LoRA only (no DoRA, no LoRA bias, Linear layers)"));
        }
    }
    if let Some(b) = field("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return Err(format!("`bias` is {b:?}; sdpo trains no biases (Llama's linears have none): use \"none\""));
    }
    let non_empty = |v: &Value| match v {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    };
    for k in ["modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices", "target_parameters"] {
        if field(k).is_some_and(non_empty) {
            return Err(format!(
                "`{k}` is set; sdpo supports one rank and alpha for every adapted linear and no module trained whole"
            ));
        }
    }
    if field("layer_replication").is_some() {
        return Err("`layer_replication` is set; sdpo adapts the base's own layers only".into());
    }
    let base = field("base_model_name_or_path").and_then(Value::as_str).unwrap_or_default().to_string();
    let config = LoraConfig { r: r as usize, alpha, targets: Vec::new(), dropout, use_rslora, dropout_seed: 0 };
    Ok((config, base))
}

/// `base_model.model.model.layers.<l>.<self_attn|mlp>.<module>.lora_<A|B>.weight` to its
/// parts; anything else is an error naming the key.
fn parse_key(key: &str, n_layers: usize) -> std::result::Result<(usize, Module, char), String> {
    let unsupported = || {
        format!(
            "tensor `{key}` is not one sdpo can apply: it reads lora_A / lora_B of the decoder layers' \
             q/k/v/o/gate/up/down_proj, keyed `base_model.model.model.layers.<l>.<self_attn|mlp>.<module>.lora_A.weight`"
        )
    };
    let rest = key.strip_prefix("base_model.model.model.layers.").ok_or_else(unsupported)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [layer, parent, module, which, "weight"] = parts[..] else { return Err(unsupported()) };
    let layer: usize = layer.parse().map_err(|_| unsupported())?;
    let m = Module::from_name(module).ok_or_else(unsupported)?;
    let which = match which {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return Err(unsupported()),
    };
    if m.path() != format!("{parent}.{module}") {
        return Err(unsupported());
    }
    if layer >= n_layers {
        return Err(format!("tensor `{key}`: layer {layer}, but the base has {n_layers} layers"));
    }
    Ok((layer, m, which))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_peft_names() {
        let t = |s: &[&str]| parse_targets(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&["v_proj,q_proj", "q_proj"]).unwrap(), vec![Module::QProj, Module::VProj]);
        assert_eq!(t(&["all-linear"]).unwrap(), Module::ALL.to_vec());
        assert!(t(&["lm_head"]).unwrap_err().contains("unknown target module `lm_head`"));
    }

    #[test]
    fn scale_is_alpha_over_r_or_its_root() {
        let c = |rs| LoraConfig {
            r: 16,
            alpha: 32.0,
            targets: vec![Module::QProj],
            dropout: 0.0,
            use_rslora: rs,
            dropout_seed: 0,
        };
        assert_eq!(c(false).scale(), 2.0);
        assert_eq!(c(true).scale(), 8.0);
    }
}
