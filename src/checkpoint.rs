//! Crash-safe training state, for `--resume`.
//!
//! A state is a folder `<out>/state-<seq>/` holding everything needed to continue a run
//! bit for bit: `state.json` (counters and position), `weights.safetensors` (the policy,
//! fp32), `adam.safetensors` (AdamW moments, when there are any), `ref_logps.bin` (the
//! reference log-probs of the current chunk), `eval_init.bin` / `eval_prev.bin` (the eval
//! set's log-probs under M_0 and M_{t−1}) and, with an inline reference,
//! `reference.safetensors` (M_{t−1}, fp32).
//!
//! Writing: everything goes to a hidden temporary folder, each file is fsynced, the folder
//! is fsynced and renamed to `state-<seq>`, and the parent is fsynced. Older states are
//! removed by `prune`, which the driver calls only once an update from the new state's
//! weights has passed the divergence checks: a state whose weights make the next update
//! diverge is dropped (`discard`) and the one before it stays. A crash at any instant
//! leaves at least one complete `state-*` folder; `latest` picks the one with the highest
//! sequence number. Temporary folders left by a crash are removed on the next save.
//!
//! `inputs.json` (`Inputs`) records what a run trains on — each data file's content hash,
//! the tokenized pairs, the starting model — so that `--resume` refuses other inputs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use std::hash::Hasher;
use twox_hash::XxHash3_64;

use crate::config::LlamaConfig;
use crate::data::PairExample;
use crate::dpo::PairLogps;
use crate::engine::AdamState;
use crate::error::{Error, Result};
use crate::lora::{Adapter, LoraWeights};
use crate::train::ChunkPosition;
use crate::weights::{load_tensors_f32, save_tensors_f32, LlamaWeights};

/// Counters and position of a run; `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format: u32,
    /// Sequence number of this state (the folder's name).
    pub seq: u64,
    /// The sDPO step (1-based) this state belongs to.
    pub sdpo_step: usize,
    /// True when step `sdpo_step` finished (M_t saved and evaluated); the next one starts fresh.
    pub step_done: bool,
    /// Where step `sdpo_step`'s run stands (meaningless when `step_done`).
    pub position: ChunkPosition,
    /// Updates over the whole run, all steps.
    pub total_updates: u64,
    /// Length of metrics.jsonl when the state was written; resume truncates to it.
    pub metrics_bytes: u64,
}

pub const FORMAT: u32 = 1;

impl RunState {
    /// A run that has trained nothing yet.
    pub fn start() -> RunState {
        RunState {
            format: FORMAT,
            seq: 0,
            sdpo_step: 0,
            step_done: true,
            position: ChunkPosition::default(),
            total_updates: 0,
            metrics_bytes: 0,
        }
    }

    /// The next state: inside step `t` at `position`, metrics.jsonl `metrics_bytes` long.
    pub fn mid_step(&mut self, t: usize, position: ChunkPosition, metrics_bytes: u64) {
        *self = RunState { seq: self.seq + 1, sdpo_step: t, step_done: false, position, metrics_bytes, ..*self };
    }

    /// The next state: step `t` done (M_t saved and evaluated).
    pub fn step_finished(&mut self, t: usize, metrics_bytes: u64) {
        self.mid_step(t, ChunkPosition::default(), metrics_bytes);
        self.step_done = true;
    }
}

/// Everything a state holds besides `RunState`.
#[derive(Clone, Debug, PartialEq)]
pub struct StateData {
    /// The policy's weights; `None` in a LoRA run, whose base is frozen (the run's --model).
    pub weights: Option<LlamaWeights>,
    pub adam: Option<AdamState>,
    /// A LoRA run's adapter (`adapter.safetensors`, PEFT's keys) and its AdamW state.
    pub adapter: Option<LoraWeights>,
    pub adapter_adam: Option<AdamState<LoraWeights>>,
    pub ref_logps: Vec<PairLogps>,
    pub eval_init: Vec<PairLogps>,
    pub eval_prev: Vec<PairLogps>,
    pub reference: Option<LlamaWeights>,
}

impl StateData {
    /// Before the first step: M_0's eval log-probs, nothing else yet (the policy's
    /// weights live in the engine until a state is written).
    pub fn start(eval_init: Vec<PairLogps>) -> StateData {
        StateData {
            weights: None,
            adam: None,
            adapter: None,
            adapter_adam: None,
            ref_logps: Vec::new(),
            eval_prev: eval_init.clone(),
            eval_init,
            reference: None,
        }
    }
}

/// Writes state `st` under `out` atomically; older states stay until `prune`.
pub fn save(out: &Path, cfg: &LlamaConfig, st: &RunState, data: &StateData) -> Result<PathBuf> {
    remove_stale_temps(out);
    let dir = out.join(format!("state-{:08}", st.seq));
    let tmp = out.join(format!(".tmp-state-{:08}-{}", st.seq, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let json = serde_json::to_string_pretty(st).expect("state serialises") + "\n";
    write_synced(&tmp.join("state.json"), json.as_bytes())?;
    if let Some(w) = &data.weights {
        save_weights(&tmp.join("weights.safetensors"), cfg, w, "")?;
    }
    if let Some(a) = &data.adapter {
        let mut parts = vec![("", a)];
        if let Some(adam) = &data.adapter_adam {
            parts.extend([("m.", &adam.m), ("v.", &adam.v)]);
        }
        let mut tensors = Vec::new();
        for (prefix, w) in parts {
            for (s, t) in w.specs().into_iter().zip(w.tensors()) {
                tensors.push((format!("{prefix}{}", s.name), s.shape, t.as_slice()));
            }
        }
        save_tensors_f32(&tmp.join("adapter.safetensors"), &tensors)?;
        if let Some(adam) = &data.adapter_adam {
            write_synced(&tmp.join("adapter_adam_step.txt"), format!("{}\n", adam.step).as_bytes())?;
        }
    }
    if let Some(adam) = &data.adam {
        let specs = LlamaWeights::specs(cfg);
        let mut tensors = Vec::new();
        for (prefix, w) in [("m.", &adam.m), ("v.", &adam.v)] {
            for (s, t) in specs.iter().zip(w.tensors()) {
                tensors.push((format!("{prefix}{}", s.name), s.shape.clone(), t.as_slice()));
            }
        }
        save_tensors_f32(&tmp.join("adam.safetensors"), &tensors)?;
        write_synced(&tmp.join("adam_step.txt"), format!("{}\n", adam.step).as_bytes())?;
    }
    if let Some(r) = &data.reference {
        save_weights(&tmp.join("reference.safetensors"), cfg, r, "")?;
    }
    write_synced(&tmp.join("ref_logps.bin"), &logps_bytes(&data.ref_logps))?;
    write_synced(&tmp.join("eval_init.bin"), &logps_bytes(&data.eval_init))?;
    write_synced(&tmp.join("eval_prev.bin"), &logps_bytes(&data.eval_prev))?;
    fsync_dir(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    fsync_dir(out)?;
    Ok(dir)
}

/// Removes every state older than the newest.
pub fn prune(out: &Path) -> Result<()> {
    let states = list(out)?;
    let Some(newest) = states.iter().map(|(seq, _)| *seq).max() else { return Ok(()) };
    for (seq, old) in states {
        if seq < newest {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(())
}

/// Removes the newest state (its weights diverged); returns the one now newest, if any.
pub fn discard_newest(out: &Path) -> Result<Option<PathBuf>> {
    if let Some(dir) = latest(out)? {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        fsync_dir(out)?;
    }
    latest(out)
}

/// Reads the counters of a state folder (`state.json`) without its tensors.
pub fn read_state(dir: &Path) -> Result<RunState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let st: RunState = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not a run state: {e}")))?;
    if st.format != FORMAT {
        return Err(Error::file(
            &path,
            format!("state format {} is not {FORMAT}: written by another version", st.format),
        ));
    }
    Ok(st)
}

/// The newest complete state folder under `out`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list(out)?.into_iter().max_by_key(|(seq, _)| *seq).map(|(_, p)| p))
}

/// Loads a state folder written by `save`.
/// A LoRA run's state holds `adapter.safetensors` (shaped as `adapter`, the run's starting
/// adapter) and no weights.
pub fn load(dir: &Path, cfg: &LlamaConfig, adapter: Option<&LoraWeights>) -> Result<(RunState, StateData)> {
    let st = read_state(dir)?;
    let (weights, adapter, adapter_adam) = match adapter {
        None => (Some(load_weights(&dir.join("weights.safetensors"), cfg, "")?), None, None),
        Some(shape) => {
            let path = dir.join("adapter.safetensors");
            let mut all = load_tensors_f32(&path)?;
            let a = take_adapter(&path, &mut all, shape, "")?;
            let step_path = dir.join("adapter_adam_step.txt");
            let adam = if step_path.exists() {
                let text = std::fs::read_to_string(&step_path).map_err(|e| Error::io(&step_path, e))?;
                let step = text.trim().parse().map_err(|_| Error::file(&step_path, "expected an integer"))?;
                let m = take_adapter(&path, &mut all, shape, "m.")?;
                Some(AdamState { m, v: take_adapter(&path, &mut all, shape, "v.")?, step })
            } else {
                None
            };
            (None, Some(a), adam)
        }
    };
    let adam_path = dir.join("adam.safetensors");
    let adam = if adam_path.exists() {
        let step_path = dir.join("adam_step.txt");
        let step_text = std::fs::read_to_string(&step_path).map_err(|e| Error::io(&step_path, e))?;
        let step = step_text.trim().parse().map_err(|_| Error::file(&step_path, "expected an integer"))?;
        Some(AdamState { m: load_weights(&adam_path, cfg, "m.")?, v: load_weights(&adam_path, cfg, "v.")?, step })
    } else {
        None
    };
    let ref_path = dir.join("reference.safetensors");
    let reference = if ref_path.exists() { Some(load_weights(&ref_path, cfg, "")?) } else { None };
    Ok((
        st,
        StateData {
            weights,
            adam,
            adapter,
            adapter_adam,
            reference,
            ref_logps: read_logps(&dir.join("ref_logps.bin"))?,
            eval_init: read_logps(&dir.join("eval_init.bin"))?,
            eval_prev: read_logps(&dir.join("eval_prev.bin"))?,
        },
    ))
}

/// What a run trains on, written once to `<out>/inputs.json`; a resume computes it again
/// and refuses to go on if anything differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// The starting model M_0: its configuration and every weight.
    pub model: String,
    /// Each data file (training, then eval) as given, with its size and content hash.
    pub files: Vec<FileDigest>,
    /// The tokenized training and eval pairs, in order (partition.json indexes them).
    pub train_pairs: PairsDigest,
    pub eval_pairs: PairsDigest,
    /// A LoRA run's starting adapter: its config and every weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub bytes: u64,
    pub xxh3: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairsDigest {
    pub count: usize,
    pub xxh3: String,
}

pub const INPUTS_FILE: &str = "inputs.json";

impl Inputs {
    /// Hashes the inputs: each file's bytes, the pairs' ids and sources, M_0's config and
    /// weights (xxh3, several GB/s: seconds for an 8B model).
    pub fn of(
        cfg: &LlamaConfig,
        m0: &LlamaWeights,
        files: &[PathBuf],
        train: &[PairExample],
        eval: &[PairExample],
        adapter: Option<&Adapter>,
    ) -> Result<Inputs> {
        let mut h = XxHash3_64::new();
        h.write(format!("{cfg:?}").as_bytes());
        for t in m0.tensors() {
            h.write_usize(t.len());
            // SAFETY: an f32 slice read as its bytes (u8 has no alignment or validity rules);
            // the hash is compared only with hashes made on the same machine's byte order.
            h.write(unsafe {
                std::slice::from_raw_parts(t.as_ptr().cast::<u8>(), std::mem::size_of_val(t.as_slice()))
            });
        }
        let model = format!("{:016x}", h.finish());
        let adapter = adapter.map(|a| {
            let mut h = XxHash3_64::new();
            h.write(format!("{:?}", a.config).as_bytes());
            for t in a.weights.tensors() {
                h.write_usize(t.len());
                t.iter().for_each(|x| h.write_u32(x.to_bits()));
            }
            format!("{:016x}", h.finish())
        });
        let files = files.iter().map(|p| file_digest(p)).collect::<Result<Vec<_>>>()?;
        Ok(Inputs { model, files, train_pairs: pairs_digest(train), eval_pairs: pairs_digest(eval), adapter })
    }

    pub fn save(&self, out: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("inputs serialise") + "\n";
        crate::weights::write_file_atomic(&out.join(INPUTS_FILE), text.as_bytes())
    }

    /// The record a run folder holds, if it has one (runs started before it was kept have none).
    pub fn load(out: &Path) -> Result<Option<Inputs>> {
        let path = out.join(INPUTS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| Error::file(&path, format!("not an inputs record: {e}")))
    }

    /// What differs between the inputs a run started with (`self`) and `now`, one line each.
    pub fn differences(&self, now: &Inputs) -> Vec<String> {
        let mut out = Vec::new();
        if self.model != now.model {
            out.push("the starting model (--model) has other weights or another config.json".to_string());
        }
        if self.adapter != now.adapter {
            out.push("the starting LoRA adapter (--adapter or the --lora-* settings) differs".to_string());
        }
        let paths = |v: &[FileDigest]| v.iter().map(|f| f.path.clone()).collect::<Vec<_>>();
        if paths(&self.files) != paths(&now.files) {
            out.push(format!("the data files were {:?}, now {:?}", paths(&self.files), paths(&now.files)));
        } else {
            for (a, b) in self.files.iter().zip(&now.files) {
                if a != b {
                    out.push(format!(
                        "{} changed: {} bytes (xxh3 {}) when the run began, {} bytes (xxh3 {}) now",
                        a.path.display(),
                        a.bytes,
                        a.xxh3,
                        b.bytes,
                        b.xxh3
                    ));
                }
            }
        }
        for (what, a, b) in
            [("training", &self.train_pairs, &now.train_pairs), ("eval", &self.eval_pairs, &now.eval_pairs)]
        {
            if a != b {
                out.push(format!(
                    "the tokenized {what} pairs differ ({} pairs, xxh3 {} then; {} pairs, xxh3 {} now): \
                     the data, the tokenizer or the data-reading options changed",
                    a.count, a.xxh3, b.count, b.xxh3
                ));
            }
        }
        out
    }
}

/// A file's size and xxh3, read in 1 MiB pieces (data files can be larger than memory allows twice).
fn file_digest(path: &Path) -> Result<FileDigest> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let (mut h, mut buf, mut bytes) = (XxHash3_64::new(), vec![0u8; 1 << 20], 0u64);
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest { path: path.to_path_buf(), bytes, xxh3: format!("{:016x}", h.finish()) })
}

fn pairs_digest(pairs: &[PairExample]) -> PairsDigest {
    let mut h = XxHash3_64::new();
    for p in pairs {
        for ids in [&p.prompt, &p.chosen, &p.rejected] {
            h.write_usize(ids.len());
            ids.iter().for_each(|&t| h.write_u32(t));
        }
        h.write(p.source.as_bytes());
        h.write_u8(0xff);
    }
    PairsDigest { count: pairs.len(), xxh3: format!("{:016x}", h.finish()) }
}

fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(Error::io(out, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(seq) = name.strip_prefix("state-").and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().join("state.json").is_file() {
                found.push((seq, entry.path()));
            }
        }
    }
    Ok(found)
}

fn remove_stale_temps(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-state-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The adapter tensors `prefix` + PEFT key out of `all`, shaped as `shape`.
fn take_adapter(
    path: &Path,
    all: &mut crate::weights::NamedTensors,
    shape: &LoraWeights,
    prefix: &str,
) -> Result<LoraWeights> {
    let mut w = shape.zeros_like();
    for (s, t) in w.specs().into_iter().zip(w.tensors_mut()) {
        let name = format!("{prefix}{}", s.name);
        let (got, data) = all
            .remove(&name)
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing: the state is incomplete")))?;
        if got != s.shape {
            return Err(Error::file(path, format!("tensor `{name}` has shape {got:?}, expected {:?}", s.shape)));
        }
        *t = data;
    }
    Ok(w)
}

fn save_weights(path: &Path, cfg: &LlamaConfig, w: &LlamaWeights, prefix: &str) -> Result<()> {
    let specs = LlamaWeights::specs(cfg);
    let tensors: Vec<(String, Vec<usize>, &[f32])> = specs
        .iter()
        .zip(w.tensors())
        .map(|(s, t)| (format!("{prefix}{}", s.name), s.shape.clone(), t.as_slice()))
        .collect();
    save_tensors_f32(path, &tensors)
}

fn load_weights(path: &Path, cfg: &LlamaConfig, prefix: &str) -> Result<LlamaWeights> {
    let mut all = load_tensors_f32(path)?;
    let mut w = LlamaWeights::zeros(cfg);
    for (s, t) in LlamaWeights::specs(cfg).iter().zip(w.tensors_mut()) {
        let name = format!("{prefix}{}", s.name);
        let (shape, data) = all
            .remove(&name)
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing: the state is incomplete")))?;
        if shape != s.shape {
            return Err(Error::file(path, format!("tensor `{name}` has shape {shape:?}, expected {:?}", s.shape)));
        }
        *t = data;
    }
    Ok(w)
}

/// Log-probs as little-endian records of 32 bytes: chosen and rejected as f64 bit
/// patterns (exact), then the two token counts as u64.
fn logps_bytes(v: &[PairLogps]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 32);
    for lp in v {
        out.extend(lp.chosen.to_bits().to_le_bytes());
        out.extend(lp.rejected.to_bits().to_le_bytes());
        out.extend((lp.chosen_tokens as u64).to_le_bytes());
        out.extend((lp.rejected_tokens as u64).to_le_bytes());
    }
    out
}

fn read_logps(path: &Path) -> Result<Vec<PairLogps>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() % 32 != 0 {
        return Err(Error::file(path, format!("{} bytes is not a whole number of 32-byte records", bytes.len())));
    }
    let word = |c: &[u8], k: usize| u64::from_le_bytes(c[8 * k..8 * k + 8].try_into().unwrap());
    Ok(bytes
        .chunks_exact(32)
        .map(|c| PairLogps {
            chosen: f64::from_bits(word(c, 0)),
            rejected: f64::from_bits(word(c, 1)),
            chosen_tokens: word(c, 2) as usize,
            rejected_tokens: word(c, 3) as usize,
        })
        .collect())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_cfg() -> LlamaConfig {
        LlamaConfig::from_json(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11
        }))
        .unwrap()
    }

    #[test]
    fn save_load_roundtrip_is_exact_and_keeps_one_state() {
        let cfg = tiny_cfg();
        let out = std::env::temp_dir().join(format!("sdpo-ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let lp = |c: f64| PairLogps { chosen: c, rejected: -1.0 / 3.0, chosen_tokens: 3, rejected_tokens: 7 };
        let data = StateData {
            weights: Some(LlamaWeights::random(&cfg, 1)),
            adam: Some(AdamState { m: LlamaWeights::random(&cfg, 2), v: LlamaWeights::random(&cfg, 3), step: 17 }),
            adapter: None,
            adapter_adam: None,
            ref_logps: vec![lp(0.1), lp(-2.0 / 7.0)],
            eval_init: vec![lp(f64::MIN_POSITIVE)],
            eval_prev: vec![],
            reference: None,
        };
        let mut st = RunState {
            format: FORMAT,
            seq: 1,
            sdpo_step: 2,
            step_done: false,
            position: ChunkPosition { epoch: 1, batch: 3, updates: 9 },
            total_updates: 20,
            metrics_bytes: 1234,
        };
        save(&out, &cfg, &st, &data).unwrap();
        st.seq = 2;
        let dir = save(&out, &cfg, &st, &data).unwrap();
        assert_eq!(latest(&out).unwrap(), Some(dir.clone()));
        assert_eq!(list(&out).unwrap().len(), 2, "the older state stays until pruned");
        st.seq = 3;
        save(&out, &cfg, &st, &data).unwrap();
        assert_eq!(discard_newest(&out).unwrap(), Some(dir.clone()), "discarding falls back to the one before");
        prune(&out).unwrap();
        assert_eq!(list(&out).unwrap(), vec![(2, dir.clone())], "pruning keeps the newest only");
        st.seq = 2;
        let (st2, data2) = load(&dir, &cfg, None).unwrap();
        assert_eq!(st2, st);
        assert_eq!(data2, data);

        // A LoRA state: the adapter and its moments, no weights.
        let lc = crate::lora::LoraConfig::new(2, None, &["q_proj,down_proj".into()], 0.0, false).unwrap();
        let a = |seed| crate::lora::LoraWeights::init(&cfg, &lc, seed);
        let lora = StateData {
            weights: None,
            adam: None,
            adapter: Some(a(1)),
            adapter_adam: Some(AdamState { m: a(2), v: a(3), step: 5 }),
            ..data
        };
        st.seq = 4;
        let dir = save(&out, &cfg, &st, &lora).unwrap();
        assert!(!dir.join("weights.safetensors").exists());
        assert_eq!(load(&dir, &cfg, Some(&a(0))).unwrap().1, lora);
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn an_unrenamed_temp_folder_is_not_a_state() {
        let out = std::env::temp_dir().join(format!("sdpo-ckpt-tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(out.join(".tmp-state-00000005-1")).unwrap();
        std::fs::write(out.join(".tmp-state-00000005-1/state.json"), "{}").unwrap();
        assert_eq!(latest(&out).unwrap(), None);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
