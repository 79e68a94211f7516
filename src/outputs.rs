//! Where sdpo-run writes, and the rules that keep it from losing a user's files.
//!
//! - An output is never an input: it is not an input path, does not hold one, and does
//!   not lie inside an input folder (`check_not_input`).
//! - A folder is written only when it is empty or new, or, when the user asks to replace
//!   it, when it carries the marker (`MARKER`) that sdpo-run leaves in every output folder
//!   of that kind. Replacing removes only the entries that kind writes (`FolderKind::writes`),
//!   never the folder itself and never anything else in it.
//! - One process at a time holds an output folder: `OutputFolder::claim` takes an advisory
//!   lock on `LOCK` inside it and keeps it until the `OutputFolder` is dropped (or the
//!   process dies), and a second claim fails at once naming the holder's pid.
//! - A single output file (`check_output_file`) is replaced only with `--overwrite`, and
//!   never when it is an input.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The marker file in every output folder: JSON naming the kind, the process and time
/// that made it. Nobody writes it by hand; a `run.toml` or any other name a user might
/// also have is not a marker.
pub const MARKER: &str = ".sdpo-output";
/// The lock file: locked while a process writes the folder; holds that process's pid.
pub const LOCK: &str = ".sdpo-lock";
/// The marker older demo runs left; still accepted as a demo folder's.
const LEGACY_DEMO_MARKER: &str = ".sdpo-demo";

/// What an output folder holds; its marker records it, and `--overwrite` replaces only a
/// folder of the same kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolderKind {
    /// `sdpo-run train`: run.toml, inputs.json, partition.json, metrics.jsonl, report.html,
    /// step-*/, state-*/, tensorboard/.
    Run,
    /// `sdpo-run demo`: base/, one run folder per recipe, summary.txt, report.html.
    Demo,
    /// `sdpo-run debug-step --out`: metrics.json, grads.safetensors.
    DebugStep,
    /// `sdpo-run merge --out`: a Hugging Face model folder (config.json, model.safetensors,
    /// the tokenizer files).
    Model,
}

impl FolderKind {
    fn name(self) -> &'static str {
        match self {
            FolderKind::Run => "train run",
            FolderKind::Demo => "demo",
            FolderKind::DebugStep => "debug-step output",
            FolderKind::Model => "merged model",
        }
    }

    /// Whether `entry`, a name directly inside a folder of this kind, is one this kind
    /// writes (its files, its folders, and the temporary siblings of its atomic writes).
    pub fn writes(self, entry: &str) -> bool {
        if entry == MARKER || entry == LOCK {
            return true;
        }
        // Atomic writes go through `.NAME.tmp-…` / `.NAME.old-…` siblings; a state through `.tmp-state-…`.
        let base = entry
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once(".tmp-").or_else(|| rest.rsplit_once(".old-")))
            .map_or(entry, |(name, _)| name);
        let numbered = |prefix: &str| {
            base.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        match self {
            FolderKind::Run => {
                matches!(
                    base,
                    "run.toml" | "inputs.json" | "partition.json" | "metrics.jsonl" | "report.html" | "tensorboard"
                ) || numbered("step-")
                    || numbered("state-")
                    || entry.starts_with(".tmp-state-")
            }
            FolderKind::Demo => {
                matches!(base, "base" | "summary.txt" | "report.html" | "dpo" | "sdpo-random" | "sdpo-easy-to-hard")
                    || entry == LEGACY_DEMO_MARKER
            }
            FolderKind::DebugStep => matches!(base, "metrics.json" | "grads.safetensors"),
            FolderKind::Model => {
                matches!(base, "config.json" | "model.safetensors") || crate::weights::TOKENIZER_FILES.contains(&base)
            }
        }
    }

    fn from_marker(text: &str) -> Option<FolderKind> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        [FolderKind::Run, FolderKind::Demo, FolderKind::DebugStep, FolderKind::Model]
            .into_iter()
            .find(|k| v.get("kind").and_then(|s| s.as_str()) == Some(k.name()))
    }
}

/// How a claim treats a folder that already has entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse it.
    Refuse,
    /// Accept it if it carries this kind's marker; `clear` will empty it.
    Replace,
    /// Accept it as it is (resuming a run in it).
    Keep,
}

/// An output folder this process holds the lock of.
#[derive(Debug)]
pub struct OutputFolder {
    path: PathBuf,
    kind: FolderKind,
    /// Whether this process created the folder (so a failed start can remove it).
    created: bool,
    /// Whether `clear` ran: only then are the kind's entries this process's to remove.
    cleared: std::cell::Cell<bool>,
    _lock: File,
}

impl OutputFolder {
    /// Claims `dir` for output of `kind`: creates it if missing, takes its lock (failing
    /// at once if another process holds it) and checks what is in it against `existing`.
    /// Removes nothing: `clear` does that, once the inputs have loaded. `hint` is what
    /// the user can pass instead (e.g. "pass --resume to continue that run, --overwrite to
    /// replace it"), shown when a non-empty folder is refused.
    pub fn claim(dir: &Path, kind: FolderKind, existing: Existing, hint: &str) -> Result<OutputFolder> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::file(dir, "exists and is not a folder: choose another output folder"));
        }
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock = lock(dir)?;
        let foreign: Vec<String> = entries(dir)?.into_iter().filter(|n| n != LOCK).collect();
        if !foreign.is_empty() {
            match existing {
                Existing::Keep => {}
                Existing::Refuse => {
                    return Err(Error::file(dir, format!("exists and is not empty: {hint}, or choose another folder")))
                }
                Existing::Replace => {
                    let found = marker_kind(dir);
                    if found != Some(kind) {
                        let why = match found {
                            Some(other) => format!("it is a {} folder, not a {}", other.name(), kind.name()),
                            None => format!("it has no {MARKER} marker, so sdpo-run did not write it"),
                        };
                        return Err(Error::file(
                            dir,
                            format!(
                                "refusing to replace it: {why}. sdpo-run only replaces folders it wrote; \
                                 choose another folder, or remove this one yourself"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(OutputFolder { path: dir.to_path_buf(), kind, created, cleared: false.into(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the entries an earlier output of this kind left (and only those), then
    /// writes the marker.
    pub fn clear(&self) -> Result<()> {
        for name in entries(&self.path)? {
            if name != LOCK && self.kind.writes(&name) {
                remove(&self.path.join(name))?;
            }
        }
        let marker = serde_json::json!({
            "kind": self.kind.name(),
            "written_by": format!("sdpo-run {}", env!("CARGO_PKG_VERSION")),
            "pid": std::process::id(),
            "created_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        let path = self.path.join(MARKER);
        std::fs::write(&path, format!("{marker}\n")).map_err(|e| Error::io(&path, e))?;
        self.cleared.set(true);
        Ok(())
    }

    /// After a failure: unless an entry holds a result (`is_result`), removes what this
    /// process wrote since `clear`, and the folder itself if this process created it and
    /// nothing else is left in it. Before `clear`, an earlier output stays untouched.
    pub fn abandon(&self, is_result: impl Fn(&str) -> bool) {
        let Ok(names) = entries(&self.path) else { return };
        if names.iter().any(|n| is_result(n)) {
            return;
        }
        if self.cleared.get() {
            for name in names.iter().filter(|n| self.kind.writes(n) && n.as_str() != LOCK) {
                let _ = remove(&self.path.join(name));
            }
        }
        if self.created && entries(&self.path).is_ok_and(|n| n.iter().all(|n| n == LOCK)) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Whether `dir` carries the marker of `kind`.
pub fn is_marked(dir: &Path, kind: FolderKind) -> bool {
    marker_kind(dir) == Some(kind)
}

fn marker_kind(dir: &Path) -> Option<FolderKind> {
    if let Ok(text) = std::fs::read_to_string(dir.join(MARKER)) {
        return FolderKind::from_marker(&text);
    }
    dir.join(LEGACY_DEMO_MARKER).is_file().then_some(FolderKind::Demo)
}

/// Opens and locks `dir/LOCK`, writing this process's pid into it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                pid => format!("another sdpo-run process (pid {pid})"),
            };
            return Err(Error::file(
                dir,
                format!("is in use by {holder}; wait for it to finish or stop it, or choose another folder"),
            ));
        }
        Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    f.set_len(0).and_then(|()| f.rewind()).map_err(|e| Error::io(&path, e))?;
    writeln!(f, "{}", std::process::id()).and_then(|()| f.flush()).map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn remove(path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
        .map_err(|e| Error::io(path, e))
}

// --- outputs against inputs

/// `path` made absolute with symlinks resolved as far as it exists, the rest (which does
/// not exist yet) appended with `.` and `..` applied.
fn resolve(path: &Path) -> PathBuf {
    let abs =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canon) = existing.canonicalize() {
            let mut out = canon;
            for c in rest.iter().rev() {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses an output path (`flag` names it in the message) that is one of `inputs`,
/// holds one of them, or lies inside an input folder.
pub fn check_not_input(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    let o = resolve(out);
    for input in inputs {
        let i = resolve(input);
        let problem = if o == i {
            "is also an input"
        } else if i.starts_with(&o) {
            "holds an input"
        } else if o.starts_with(&i) {
            "lies inside an input folder"
        } else {
            continue;
        };
        return Err(Error::invalid(format!(
            "{flag} {}: {problem} ({}); sdpo-run never writes over what it reads: choose an output \
             outside the model and data",
            out.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Checks an output file before any work: not an input, not a folder, and replaced only
/// with `overwrite`. Writes nothing.
pub fn check_output_file(path: &Path, flag: &str, inputs: &[&Path], overwrite: bool) -> Result<()> {
    check_not_input(path, flag, inputs)?;
    if path.is_dir() {
        return Err(Error::invalid(format!("{flag} {}: is a folder; give a file name", path.display())));
    }
    if path.exists() && !overwrite {
        return Err(Error::invalid(format!(
            "{flag} {}: exists; pass --overwrite to replace it, or choose another file",
            path.display()
        )));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "{flag} {}: the folder {} does not exist; create it or choose another file",
            path.display(),
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_entries_are_recognised_by_name() {
        let k = FolderKind::Run;
        for name in [
            "run.toml",
            "step-1",
            "step-12",
            "state-00000003",
            ".tmp-state-00000004-77",
            ".run.toml.tmp-5-0",
            "report.html",
            ".report.html.tmp-5-0",
            "tensorboard",
        ] {
            assert!(k.writes(name), "{name}");
        }
        for name in ["model.safetensors", "step-", "step-x", "notes.txt", "data.jsonl", ".git", "state-1a"] {
            assert!(!k.writes(name), "{name}");
        }
        assert!(!FolderKind::DebugStep.writes("run.toml"));
        assert!(FolderKind::Demo.writes("report.html") && !FolderKind::DebugStep.writes("report.html"));
    }

    #[test]
    fn outputs_inside_or_around_inputs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("runs/x/step-2");
        std::fs::create_dir_all(&model).unwrap();
        let data = d.path().join("data.jsonl");
        std::fs::write(&data, "").unwrap();
        let inputs = [model.as_path(), data.as_path()];
        for bad in [d.path().join("runs/x"), d.path().to_path_buf(), model.join("out"), data.clone()] {
            assert!(check_not_input(&bad, "--out", &inputs).is_err(), "{}", bad.display());
        }
        // `..` and a path through a not-yet-existing folder resolve before comparing
        assert!(check_not_input(&d.path().join("new/../runs"), "--out", &inputs).is_err());
        assert!(check_not_input(&d.path().join("runs/y"), "--out", &inputs).is_ok());
        assert!(check_not_input(&d.path().join("data.jsonl.out"), "--out", &inputs).is_ok());
    }
}
