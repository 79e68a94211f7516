//! Model parameters in fp32, in Hugging Face layout: every linear weight is `[out, in]`
//! row-major, as `nn.Linear` stores it. The same struct holds gradients and AdamW
//! moments, so everything that walks "all parameters" walks `LlamaWeights::tensors`.

use crate::config::LlamaConfig;

#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>, // [hidden]
    pub q_proj: Vec<f32>,     // [n_heads*head_dim, hidden]
    pub k_proj: Vec<f32>,     // [n_kv_heads*head_dim, hidden]
    pub v_proj: Vec<f32>,     // [n_kv_heads*head_dim, hidden]
    pub o_proj: Vec<f32>,     // [hidden, n_heads*head_dim]
    pub post_norm: Vec<f32>,  // [hidden]
    pub gate_proj: Vec<f32>,  // [intermediate, hidden]
    pub up_proj: Vec<f32>,    // [intermediate, hidden]
    pub down_proj: Vec<f32>,  // [hidden, intermediate]
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaWeights {
    pub embed: Vec<f32>, // [vocab, hidden]
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>, // [hidden]
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<Vec<f32>>, // [vocab, hidden]
}

/// One parameter's Hugging Face name and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl LlamaWeights {
    /// Every parameter of `cfg`, in the fixed order that `tensors` and `tensors_mut` use.
    pub fn specs(cfg: &LlamaConfig) -> Vec<TensorSpec> {
        let (h, i, q, kv, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
        let spec = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
        let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h])];
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}");
            out.push(spec(format!("{p}.input_layernorm.weight"), vec![h]));
            out.push(spec(format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push(spec(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push(spec(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push(spec(format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push(spec(format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push(spec(format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push(spec(format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push(spec(format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(spec("model.norm.weight".into(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(spec("lm_head.weight".into(), vec![v, h]));
        }
        out
    }

    /// All parameters set to `value` (zeros for gradients and moments, ones for norms).
    pub fn filled(cfg: &LlamaConfig, value: f32) -> Self {
        let (h, i, q, kv, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
        let layer = LayerWeights {
            input_norm: vec![value; h],
            q_proj: vec![value; q * h],
            k_proj: vec![value; kv * h],
            v_proj: vec![value; kv * h],
            o_proj: vec![value; h * q],
            post_norm: vec![value; h],
            gate_proj: vec![value; i * h],
            up_proj: vec![value; i * h],
            down_proj: vec![value; h * i],
        };
        LlamaWeights {
            embed: vec![value; v * h],
            layers: vec![layer; cfg.n_layers],
            norm: vec![value; h],
            lm_head: (!cfg.tie_word_embeddings).then(|| vec![value; v * h]),
        }
    }

    pub fn zeros(cfg: &LlamaConfig) -> Self {
        Self::filled(cfg, 0.0)
    }

    /// Random weights for benchmarks and tests: normals of std 0.02 from a seeded
    /// generator, norms at 1 (the usual Llama initialisation). Each run of `CHUNK`
    /// elements of a tensor has its own stream, seeded from (seed, tensor, run), so the
    /// tensors fill in parallel (a 1B model in seconds, not a minute) and the values do not
    /// depend on the thread count.
    pub fn random(cfg: &LlamaConfig, seed: u64) -> Self {
        const CHUNK: usize = 1 << 16;
        let mut w = Self::zeros(cfg);
        let norm_names = |n: &str| n.ends_with("layernorm.weight") || n == "model.norm.weight";
        let specs = Self::specs(cfg);
        for (i, (spec, t)) in specs.iter().zip(w.tensors_mut()).enumerate() {
            if norm_names(&spec.name) {
                t.fill(1.0);
                continue;
            }
            t.par_chunks_mut(CHUNK).enumerate().for_each(|(c, run)| {
                let mut rng = SplitMix64(SplitMix64(seed ^ ((i as u64) << 40) ^ c as u64).next_u64());
                run.iter_mut().for_each(|x| *x = 0.02 * rng.normal());
            });
        }
        w
    }

    /// The parameters in `specs` order.
    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        let mut out = vec![&self.embed];
        for l in &self.layers {
            out.extend([
                &l.input_norm,
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.post_norm,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]);
        }
        out.push(&self.norm);
        out.extend(self.lm_head.as_ref());
        out
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![&mut self.embed];
        for l in &mut self.layers {
            out.extend([
                &mut l.input_norm,
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.post_norm,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]);
        }
        out.push(&mut self.norm);
        out.extend(self.lm_head.as_mut());
        out
    }

    /// The LM head matrix: its own, or the embedding when tied.
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    pub fn numel(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }

    /// True when every value is finite.
    pub fn all_finite(&self) -> bool {
        self.tensors().iter().all(|t| t.iter().all(|x| x.is_finite()))
    }
}

/// A tiny deterministic generator (SplitMix64) with a Box–Muller normal, so random
/// weights need no extra dependency and are reproducible everywhere.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    /// `n` normal values of standard deviation `std`.
    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| std * self.normal()).collect()
    }
}

// --- loading and saving Hugging Face checkpoints ---------------------------------------
//
// Reading: `model.safetensors`, or the shards named by `model.safetensors.index.json`,
// memory-mapped; f32, bf16 and f16 tensors are converted to f32. The checkpoint must hold
// exactly the parameters `specs(cfg)` lists, with exactly those shapes, with two
// tolerated extras:
// - `*.rotary_emb.inv_freq`: a buffer old transformers versions saved; it is derived from
//   the config, so it is ignored.
// - `lm_head.weight` in a checkpoint whose config ties the embeddings: some exporters
//   write the tied matrix twice. It is accepted when it equals `model.embed_tokens.weight`
//   value for value, and rejected otherwise, because the config and the file then
//   disagree about which matrix the model uses.
//
// Writing: the fp32 masters are rounded to the storage dtype round-to-nearest-even (as
// `tensor.to(torch.bfloat16)` does), and the folder is made crash-safe by writing it
// under a temporary sibling name and renaming it into place: a checkpoint folder that
// exists is complete.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use crate::config::DType;
use crate::error::{Error, Result};

/// Files copied from the source model's folder into every saved checkpoint, when present,
/// so the checkpoint is a complete Hugging Face model folder.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; a checkpoint modified by another process while
        // we read it is outside what any loader can guard against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(MappedFile { path: path.to_path_buf(), mmap })
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            Error::file(&self.path, format!("not a valid safetensors file ({e}); the file is corrupt or truncated"))
        })
    }
}

/// The safetensors files of a model folder: the single file, or the shards of the index.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::file(&index, "missing the `weight_map` object (tensor name -> shard file)"))?;
        let mut shards: Vec<String> = Vec::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::file(&index, format!("weight_map[`{name}`] must be a file name, found {shard}"))
            })?;
            // A shard is a file inside the model folder: an index must not point a loader
            // at files elsewhere (`../x.safetensors`, `/abs/x.safetensors`).
            let inside = Path::new(shard).components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || shard.is_empty() {
                return Err(Error::file(
                    &index,
                    format!(
                        "weight_map[`{name}`] names the shard `{shard}`, which is not a file inside the model \
                         folder; shards are file names relative to {} (e.g. `model-00001-of-00002.safetensors`)",
                        dir.display()
                    ),
                ));
            }
            if !shards.iter().any(|s| s == shard) {
                shards.push(shard.to_string());
            }
        }
        shards.sort();
        let mut out = Vec::new();
        for s in shards {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(Error::file(
                    &index,
                    format!(
                        "shard `{s}` named in weight_map is missing from {}; copy the whole model folder",
                        dir.display()
                    ),
                ));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        " (it has pytorch_model.bin: convert it with `model.save_pretrained(dir, safe_serialization=True)`)"
    } else {
        ""
    };
    Err(Error::file(dir, format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder{hint}")))
}

fn st_dtype_name(d: StDtype) -> String {
    format!("{d:?}")
}

/// Whether `to_f32` reads this dtype.
fn convertible(dtype: StDtype) -> bool {
    matches!(dtype, StDtype::F32 | StDtype::BF16 | StDtype::F16)
}

/// Converts a little-endian f32/bf16/f16 tensor to f32; `None` for other dtypes.
fn to_f32(dtype: StDtype, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    const CHUNK: usize = 1 << 16;
    match dtype {
        StDtype::F32 => out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * 4)).for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }),
        StDtype::BF16 => out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * 2)).for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *x = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }),
        StDtype::F16 => out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * 2)).for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *x = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }),
        _ => return None,
    }
    Some(())
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// The config.json fields a tensor's shape (or presence, with `presence`) comes from, as
/// advice to append to an error about that tensor.
fn config_fields_hint(name: &str, presence: bool) -> String {
    let fields = if presence && name.starts_with("model.layers.") {
        "num_hidden_layers"
    } else if name.ends_with("embed_tokens.weight") || name == "lm_head.weight" {
        "vocab_size, hidden_size"
    } else if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
        "hidden_size"
    } else if name.contains("q_proj") || name.contains("o_proj") {
        "hidden_size, num_attention_heads, head_dim"
    } else if name.contains("k_proj") || name.contains("v_proj") {
        "hidden_size, num_key_value_heads, head_dim"
    } else if name.contains("mlp.") {
        "hidden_size, intermediate_size"
    } else {
        return String::new();
    };
    format!(" (check config.json's {fields}: is it this checkpoint's config?)")
}

impl LlamaWeights {
    /// Loads the weights of the Hugging Face model folder `dir` for `cfg` (read from the
    /// same folder's config.json). See the section comment for what is accepted.
    pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        let mapped: Vec<MappedFile> = files.iter().map(|p| MappedFile::open(p)).collect::<Result<_>>()?;
        let parsed: Vec<SafeTensors<'_>> = mapped.iter().map(MappedFile::parse).collect::<Result<_>>()?;

        // name -> (file index, view); a name in two files is an error, not a silent choice.
        let mut views = BTreeMap::new();
        for (fi, st) in parsed.iter().enumerate() {
            for (name, view) in st.iter() {
                if let Some((prev, _)) = views.insert(name.to_string(), (fi, view)) {
                    return Err(Error::file(
                        &files[fi],
                        format!(
                            "tensor `{name}` is also in {}; a checkpoint holds each tensor once",
                            files[prev].display()
                        ),
                    ));
                }
            }
        }
        let where_ = |name: &str| -> &Path { views.get(name).map(|(fi, _)| files[*fi].as_path()).unwrap_or(dir) };

        // Every name, shape and dtype is checked against the config before anything is
        // sized from it: a config that does not belong to these weights (an 8B config beside
        // a small checkpoint) is an error naming the tensor, not an allocation failure.
        let specs = Self::specs(cfg);
        for spec in &specs {
            let Some((fi, view)) = views.get(&spec.name) else {
                let file = if files.len() == 1 { files[0].clone() } else { dir.join(INDEX_FILE) };
                return Err(Error::file(
                    file,
                    format!(
                        "missing tensor `{}` (expected shape {}); the checkpoint does not match config.json{}",
                        spec.name,
                        shape_str(&spec.shape),
                        config_fields_hint(&spec.name, true)
                    ),
                ));
            };
            if view.shape() != spec.shape.as_slice() {
                return Err(Error::file(
                    &files[*fi],
                    format!(
                        "tensor `{}` has shape {} in this file, but config.json implies {}; the checkpoint and \
                         its config disagree{}",
                        spec.name,
                        shape_str(view.shape()),
                        shape_str(&spec.shape),
                        config_fields_hint(&spec.name, false)
                    ),
                ));
            }
            if !convertible(view.dtype()) {
                return Err(Error::file(
                    &files[*fi],
                    format!(
                        "tensor `{}` has dtype {}; supported dtypes are F32, BF16 and F16 (convert the checkpoint, \
                         e.g. `model.to(torch.bfloat16).save_pretrained(dir)`)",
                        spec.name,
                        st_dtype_name(view.dtype())
                    ),
                ));
            }
        }
        let known: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        for (name, (_, view)) in &views {
            if known.contains(name.as_str()) || name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            if name == "lm_head.weight" && cfg.tie_word_embeddings {
                if view.shape() == [cfg.vocab_size, cfg.hidden_size] {
                    continue; // compared with the embedding once both are read
                }
                return Err(Error::file(
                    where_(name),
                    format!(
                        "tensor `lm_head.weight` has shape {}, but config.json says `tie_word_embeddings: true` \
                         with an embedding of {}; set it to false if the LM head is a separate matrix",
                        shape_str(view.shape()),
                        shape_str(&[cfg.vocab_size, cfg.hidden_size])
                    ),
                ));
            }
            return Err(Error::file(
                where_(name),
                format!(
                    "unexpected tensor `{name}` (shape {}): sdpo's Llama has no such parameter (biases, adapters and \
                     other architectures are not supported); merge or remove it before loading{}",
                    shape_str(view.shape()),
                    if name.starts_with("model.layers.") { config_fields_hint(name, true) } else { String::new() }
                ),
            ));
        }

        let mut w = Self::zeros(cfg);
        for (spec, dst) in specs.iter().zip(w.tensors_mut()) {
            let (_, view) = &views[&spec.name];
            to_f32(view.dtype(), view.data(), dst).expect("dtype checked above");
        }
        if let Some((_, view)) = views.get("lm_head.weight").filter(|_| cfg.tie_word_embeddings) {
            // Some exporters write the tied matrix twice: fine if it is the same matrix.
            let mut head = vec![0f32; cfg.vocab_size * cfg.hidden_size];
            let same = to_f32(view.dtype(), view.data(), &mut head).is_some()
                && head.iter().zip(&w.embed).all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return Err(Error::file(
                    where_("lm_head.weight"),
                    "tensor `lm_head.weight` differs from `model.embed_tokens.weight`, but config.json says \
                     `tie_word_embeddings: true`; set it to false if the LM head is a separate matrix",
                ));
            }
        }
        Ok(w)
    }

    /// Checks that every tensor has the length `cfg` implies.
    pub fn check_shapes(&self, cfg: &LlamaConfig) -> Result<()> {
        let specs = Self::specs(cfg);
        let tensors = self.tensors();
        if specs.len() != tensors.len() {
            return Err(Error::invalid(format!(
                "weights have {} tensors, the config implies {} (is tie_word_embeddings right?)",
                tensors.len(),
                specs.len()
            )));
        }
        for (s, t) in specs.iter().zip(tensors) {
            if s.numel() != t.len() {
                return Err(Error::invalid(format!(
                    "tensor `{}` has {} values, expected {} (shape {})",
                    s.name,
                    t.len(),
                    s.numel(),
                    shape_str(&s.shape)
                )));
            }
        }
        Ok(())
    }
}

/// Tensors by name: (shape, values).
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every tensor of one safetensors file as f32 (f32/bf16/f16 on disk), keyed by name:
/// for gradients, fixtures and tools that need no model config.
pub fn load_tensors_f32(path: &Path) -> Result<NamedTensors> {
    let mapped = MappedFile::open(path)?;
    let st = mapped.parse()?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let mut data = vec![0f32; view.shape().iter().product()];
        to_f32(view.dtype(), view.data(), &mut data).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{name}` has dtype {}; supported are F32, BF16 and F16", st_dtype_name(view.dtype())),
            )
        })?;
        out.insert(name.to_string(), (view.shape().to_vec(), data));
    }
    Ok(out)
}

// --- writing -----------------------------------------------------------------------------

fn st_dtype(d: DType) -> (&'static str, usize) {
    match d {
        DType::F32 => ("F32", 4),
        DType::BF16 => ("BF16", 2),
        DType::F16 => ("F16", 2),
    }
}

/// `x` in `dtype`, little-endian, rounded to nearest even (NaN stays NaN).
fn encode(x: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() * st_dtype(dtype).1);
    match dtype {
        DType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::BF16 => x.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
        DType::F16 => x.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
    }
    out
}

/// Writes a safetensors file at `path` (which must not be read by anyone yet: callers
/// write to a temporary name), tensors in the given order, header padded to 8 bytes,
/// metadata `{"format": "pt"}` as transformers expects, then fsyncs it.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &[usize], &[f32])], dtype: DType) -> Result<()> {
    let (dname, size) = st_dtype(dtype);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::invalid(format!(
                "tensor `{name}`: shape {} needs {n} values, got {}",
                shape_str(shape),
                data.len()
            )));
        }
        if header.contains_key(*name) {
            return Err(Error::invalid(format!("tensor `{name}` given twice")));
        }
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dname, "shape": shape, "data_offsets": [offset, offset + n * size] }),
        );
        offset += n * size;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("a JSON map serialises");
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = |e| Error::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for (_, _, data) in tensors {
        out.write_all(&encode(data, dtype)).map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);
    file.sync_all().map_err(io)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

/// A sibling of `path` with a name no other writer uses: `.<name>.<tag>-<pid>-<n>`.
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: expected a file or folder name", path.display())))?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{tag}-{}-{n}", name.to_string_lossy(), std::process::id())))
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// Saves a Hugging Face model folder at `dir` that transformers loads unchanged:
/// config.json (`cfg.to_json(dtype)`), model.safetensors in `dtype`, and the tokenizer
/// files (`TOKENIZER_FILES`) found in `copy_from`, crash-safe (`write_folder_atomic`).
pub fn save_model(
    dir: &Path,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    dtype: DType,
    copy_from: Option<&Path>,
) -> Result<()> {
    write_folder_atomic(dir, |tmp| write_model_files(tmp, cfg, w, dtype, copy_from))
}

/// Writes the files of a Hugging Face model folder into the existing folder `dir`, each
/// one atomically (a temporary sibling renamed into place): config.json, model.safetensors
/// in `dtype`, and the tokenizer files found in `copy_from`.
pub fn write_model_files(
    dir: &Path,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    dtype: DType,
    copy_from: Option<&Path>,
) -> Result<()> {
    w.check_shapes(cfg)?;
    let text = serde_json::to_string_pretty(&cfg.to_json(dtype)).expect("a JSON value serialises") + "\n";
    write_file_atomic(&dir.join("config.json"), text.as_bytes())?;

    let specs = LlamaWeights::specs(cfg);
    let tensors: Vec<(&str, &[usize], &[f32])> =
        specs.iter().zip(w.tensors()).map(|(s, t)| (s.name.as_str(), s.shape.as_slice(), t.as_slice())).collect();
    let path = dir.join(SINGLE_FILE);
    let tmp = sibling(&path, "tmp")?;
    if let Err(e) = write_safetensors(&tmp, &tensors, dtype) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;

    if let Some(src) = copy_from {
        for name in TOKENIZER_FILES {
            let from = src.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                write_file_atomic(&dir.join(name), &bytes)?;
            }
        }
    }
    fsync_dir(dir)
}

/// Makes the folder `dir` crash-safe: `fill` writes its files into a temporary sibling
/// folder, which is fsynced and renamed into place; an existing `dir` is replaced by
/// renames only, so whatever folder exists at `dir` is complete.
pub fn write_folder_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = sibling(dir, "tmp")?;
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp).and_then(|_| fsync_dir(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    // Replace by renames: the old folder moves aside, the new one moves in, the old one goes.
    let old = if dir.exists() {
        let old = sibling(dir, "old")?;
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        Some(old)
    } else {
        None
    };
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    fsync_dir(&parent)?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` and fsyncs the file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` atomically: a temporary sibling file, fsynced, renamed over
/// `path`. On failure `path` is untouched and the temporary file removed.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp")?;
    if let Err(e) = write_synced(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync_dir(&parent_of(path))
}

/// Writes fp32 tensors (e.g. grads.safetensors) atomically: a temporary sibling file,
/// fsynced, renamed over `path`.
pub fn save_tensors_f32(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let tmp = sibling(path, "tmp")?;
    let views: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), *d)).collect();
    if let Err(e) = write_safetensors(&tmp, &views, DType::F32) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync_dir(&parent_of(path))
}
