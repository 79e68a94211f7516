//! What sdpo-run never does, through the real binary: delete or overwrite what it did not
//! write (--overwrite on a user's folder, an output that holds or is an input), let two
//! processes write one run folder, resume on other data or a foreign state, accept flags
//! outside their ranges, or keep a diverged state as the last good one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sdpo::checkpoint;
use sdpo::data::pretokenized::write_pairs;
use sdpo::demo::demo_data;
use sdpo::weights::save_model;
use sdpo::{LlamaConfig, LlamaWeights};

const BIN: &str = env!("CARGO_BIN_EXE_sdpo-run");

/// A tiny model folder and two data files in a fresh temporary folder.
fn setup() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::from_json(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    }))
    .unwrap();
    save_model(&root.path().join("model"), &cfg, &LlamaWeights::random(&cfg, 9), cfg.dtype, None).unwrap();
    let d = demo_data(2, 8, 4, 0);
    write_pairs(&root.path().join("train.jsonl"), &d.train).unwrap();
    write_pairs(&root.path().join("eval.jsonl"), &d.eval).unwrap();
    root
}

/// `train` on the setup's model and data (24 pairs, 3 sources, 4 per update: 6 updates).
fn train(root: &Path, out: &Path, extra: &[&str]) -> Command {
    train_from(root, &root.join("model"), out, extra)
}

fn train_from(root: &Path, model: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(root);
    c.args(["train", "--quiet", "--model"]).arg(model);
    c.arg("--data").arg(root.join("train.jsonl"));
    c.arg("--eval-data").arg(root.join("eval.jsonl"));
    c.arg("--out").arg(out);
    c.args(["--lr", "1e-3", "--batch-pairs", "4", "--micro-batch-tokens", "64", "--save-every", "1"]);
    c.args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn fails_with(out: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got success: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in ({}): {err}", out.status);
    }
}

fn succeeds(out: Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut all = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                all.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    all
}

/// Fails if a file of `before` is gone or changed, unless `allowed` says it may be.
fn assert_kept(before: &BTreeMap<PathBuf, Vec<u8>>, allowed: impl Fn(&Path) -> bool) {
    for (p, bytes) in before {
        if allowed(p) {
            continue;
        }
        let now = std::fs::read(p).unwrap_or_else(|e| panic!("{} was removed: {e}", p.display()));
        assert!(now == *bytes, "{} was changed", p.display());
    }
}

#[test]
fn overwrite_never_deletes_a_folder_sdpo_run_did_not_write() {
    let root = setup();
    let r = root.path();
    // a user's project folder: their config named run.toml, their model and data
    std::fs::write(r.join("run.toml"), "lr = 1e-3\n").unwrap();
    std::fs::write(r.join("notes.txt"), "mine\n").unwrap();
    let before = snapshot(r);
    fails_with(
        train(r, Path::new("."), &["--config", "run.toml", "--overwrite"]).output().unwrap(),
        &["holds an input"],
    );
    let p = r.join("p");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(p.join("run.toml"), "beta = 0.2\n").unwrap();
    std::fs::write(p.join("weights.bin"), "precious").unwrap();
    let before_p = snapshot(&p);
    fails_with(train(r, &p, &["--overwrite"]).output().unwrap(), &["sdpo-run did not write it"]);
    assert_kept(&before, |_| false);
    assert_kept(&before_p, |_| false);
}

#[test]
fn overwrite_replaces_only_a_run_and_only_its_own_entries() {
    let root = setup();
    let r = root.path();
    let out = r.join("runs/x");
    succeeds(
        train(r, &out, &["--steps", "1", "--partition", "random", "--report-to", "tensorboard"]).output().unwrap(),
    );
    assert!(out.join("report.html").is_file() && out.join("tensorboard").is_dir());
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    // the starting model inside the folder being replaced: refused, nothing touched
    let before = snapshot(r);
    fails_with(train_from(r, &out.join("step-1"), &out, &["--overwrite"]).output().unwrap(), &["holds an input"]);
    assert_kept(&before, |_| false);
    // an output inside the model folder, or the data file itself: refused
    fails_with(train(r, &r.join("model/out"), &[]).output().unwrap(), &["inside an input folder"]);
    fails_with(train(r, &r.join("train.jsonl"), &[]).output().unwrap(), &["is also an input"]);
    // a plain --overwrite replaces the run's entries and keeps the user's file
    succeeds(train(r, &out, &["--overwrite", "--steps", "2", "--partition", "random"]).output().unwrap());
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine\n");
    assert!(out.join("step-2/model.safetensors").is_file());
    assert!(!out.join("tensorboard").exists(), "the earlier run's events went with it");
    assert_kept(&before, |p| p.starts_with(&out) && !p.ends_with("notes.txt"));
    // a report page is written beside the run's inputs, never over one of them
    let report = |to: &Path, extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("report").arg(&out).arg("--out").arg(to).args(extra);
        c.output().unwrap()
    };
    fails_with(report(&out.join("metrics.jsonl"), &["--overwrite"]), &["is also an input"]);
    fails_with(report(&out.join("report.html"), &[]), &["--overwrite"]);
    succeeds(report(&out.join("report.html"), &["--overwrite"]));
    succeeds(report(&r.join("compare.html"), &[]));
}

#[test]
fn other_commands_never_write_over_their_inputs() {
    let root = setup();
    let r = root.path();
    let before = snapshot(r);
    let part = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["partition", "--partition", "random", "--steps", "2", "--model"]).arg(r.join("model"));
        c.arg("--data").arg(r.join("train.jsonl")).arg("--out").arg(out).args(extra);
        c.output().unwrap()
    };
    fails_with(part(&r.join("train.jsonl"), &["--overwrite"]), &["is also an input"]);
    succeeds(part(&r.join("p.json"), &[]));
    fails_with(part(&r.join("p.json"), &[]), &["--overwrite"]);
    succeeds(part(&r.join("p.json"), &["--overwrite"]));
    let prep = |out: &Path| {
        let mut c = Command::new(BIN);
        c.args(["prepare", "--overwrite", "--model"]).arg(r.join("model"));
        c.arg("--data").arg(r.join("train.jsonl")).arg("--out").arg(out);
        c.output().unwrap()
    };
    fails_with(prep(&r.join("train.jsonl")), &["is also an input"]);
    let debug = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["debug-step", "--model"]).arg(r.join("model"));
        c.arg("--data").arg(r.join("train.jsonl")).args(extra);
        c.output().unwrap()
    };
    let model = r.join("model");
    let m = model.to_str().unwrap();
    fails_with(debug(&["--out", "d1", "--save-model", m]), &["--save-model", "is also an input"]);
    std::fs::create_dir(r.join("mine")).unwrap();
    std::fs::write(r.join("mine/a.txt"), "mine").unwrap();
    let mine = r.join("mine");
    fails_with(debug(&["--out", mine.to_str().unwrap()]), &["not empty"]);
    fails_with(debug(&["--out", mine.to_str().unwrap(), "--overwrite"]), &["sdpo-run did not write it"]);
    let d = r.join("d");
    succeeds(debug(&["--out", d.to_str().unwrap()]));
    fails_with(debug(&["--out", d.to_str().unwrap()]), &["--overwrite"]);
    succeeds(debug(&["--out", d.to_str().unwrap(), "--overwrite"]));
    assert_kept(&before, |_| false);
    assert_eq!(std::fs::read_to_string(r.join("mine/a.txt")).unwrap(), "mine");
}

#[test]
fn a_second_process_on_a_run_folder_is_refused_at_once() {
    let root = setup();
    let r = root.path();
    let out = r.join("run");
    let mut first = train(r, &out, &["--debug-sleep-ms", "300"]).spawn().unwrap();
    let t0 = Instant::now();
    while checkpoint::latest(&out).unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the first run never saved a state");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = first.id().to_string();
    fails_with(train(r, &out, &["--overwrite"]).output().unwrap(), &["in use", &pid]);
    fails_with(train(r, &out, &["--resume", "--debug-sleep-ms", "300"]).output().unwrap(), &["in use", &pid]);
    assert!(first.wait().unwrap().success(), "the first run is undisturbed");
    // once it has ended, the folder is free again
    succeeds(train(r, &out, &["--resume", "--debug-sleep-ms", "300"]).output().unwrap());
}

#[test]
fn resume_refuses_other_data_and_foreign_states() {
    let root = setup();
    let r = root.path();
    let out = r.join("run");
    // stopped by a NaN before update 4: states of updates 2 (kept) and 3 (dropped)
    fails_with(train(r, &out, &["--debug-nan-at", "4"]).output().unwrap(), &["non-finite"]);
    let data = r.join("train.jsonl");
    let original = std::fs::read_to_string(&data).unwrap();
    // chosen and rejected swapped: as many pairs, flipped labels
    let swapped: String = original
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            let c = o.remove("chosen_ids").unwrap();
            let j = o.insert("rejected_ids".into(), c).unwrap();
            o.insert("chosen_ids".into(), j);
            v.to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, &swapped).unwrap();
    fails_with(train(r, &out, &["--resume"]).output().unwrap(), &["train.jsonl changed", "tokenized training pairs"]);
    std::fs::write(&data, original.clone() + original.lines().next().unwrap() + "\n").unwrap();
    fails_with(train(r, &out, &["--resume"]).output().unwrap(), &["train.jsonl changed"]);
    std::fs::write(&data, &original).unwrap();
    // a hand-edited state claiming more steps than the run has
    let state = checkpoint::latest(&out).unwrap().unwrap().join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sdpo_step"] = 9.into();
    std::fs::write(&state, v.to_string()).unwrap();
    fails_with(train(r, &out, &["--resume"]).output().unwrap(), &["state.json", "outside the run's 3 step(s)"]);
    std::fs::write(&state, text).unwrap();
    // moved, then resumed through its own run.toml with no --out: it finishes where it now is
    let moved = r.join("moved");
    std::fs::rename(&out, &moved).unwrap();
    succeeds(resume(r, &moved, &[]));
    assert!(moved.join("step-3/model.safetensors").is_file() && !out.exists());
}

#[test]
fn flags_out_of_range_are_refused_before_anything_is_written() {
    let root = setup();
    let r = root.path();
    let out = r.join("run");
    for (flags, needle) in [
        (&["--micro-batch-tokens", "0"][..], "--micro-batch-tokens"),
        (&["--weight-decay", "-1"], "--weight-decay"),
        (&["--label-smoothing", "0.6"], "--label-smoothing"),
        (&["--max-grad-norm", "-1"], "--max-grad-norm"),
        (&["--max-grad-norm", "NaN"], "--max-grad-norm"),
        (&["--sft-weight", "-1"], "--sft-weight"),
        (&["--beta", "1e30"], "--beta must be in (0, 100]"),
        (&["--beta", "-1"], "--beta must be in (0, 100]"),
        (&["--steps", "0"], "--steps"),
    ] {
        let run = train(r, &out, flags).output().unwrap();
        assert!(!run.status.success(), "{flags:?} was accepted");
        fails_with(run, &[needle]);
        assert!(!out.exists(), "{flags:?} wrote {}", out.display());
    }
    let mut c = Command::new(BIN);
    c.args(["eval", "--beta", "0", "--model"]).arg(r.join("model")).arg("--reference").arg(r.join("model"));
    c.arg("--data").arg(r.join("eval.jsonl"));
    fails_with(c.output().unwrap(), &["--beta must be in (0, 100]"]);
}

/// `train --resume` through the run's own run.toml, with `extra` flags.
fn resume(root: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.current_dir(root).args(["train", "--quiet", "--resume", "--config"]).arg(out.join("run.toml")).args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c.output().unwrap()
}

#[test]
fn a_diverged_run_keeps_a_sane_state_and_resumes_with_a_lower_lr() {
    let root = setup();
    let r = root.path();
    let out = r.join("run");
    fails_with(train(r, &out, &["--debug-nan-at", "4"]).output().unwrap(), &["non-finite"]);
    // Resumed from update 2 (the end of step 1; 2 updates per step) with lr 1e10. Step 2's
    // first update has lr 0 (warmup), its second moves every weight by about 1e10 (Adam),
    // so step 3's first update diverges: the state after update 4 is dropped, 3's kept.
    fails_with(resume(r, &out, &["--lr", "1e10"]), &["at sDPO step 3, optimiser step 1", "after update 3"]);
    let cfg = LlamaConfig::from_path(&r.join("model")).unwrap();
    let m0 = LlamaWeights::load(&r.join("model"), &cfg).unwrap();
    let biggest = |w: &LlamaWeights| w.tensors().iter().flat_map(|t| t.iter()).fold(0f32, |m, x| m.max(x.abs()));
    let (st, data) = checkpoint::load(&checkpoint::latest(&out).unwrap().unwrap(), &cfg, None).unwrap();
    assert_eq!(st.total_updates, 3);
    assert!(biggest(data.weights.as_ref().unwrap()) < 2.0 * biggest(&m0), "a blown-up state was kept");
    // a lower --lr is the one change a resume accepts; the run then finishes
    succeeds(resume(r, &out, &["--lr", "1e-3"]));
    assert!(LlamaWeights::load(&out.join("step-3"), &cfg).unwrap().all_finite());
    fails_with(resume(r, &out, &["--beta", "0.3"]), &["beta = 0.3", "only --lr may change"]);
}

/// Random trees: inputs inside, around and beside --out, a marked run among them; train
/// with --overwrite and partition with --overwrite into random places. Whatever each
/// command does, every file that was there before and is not a run's own entry inside
/// the --out it replaced is still there, unchanged.
#[test]
fn no_command_removes_a_path_it_did_not_create() {
    let root = setup();
    let r = root.path();
    succeeds(train(r, &r.join("old-run"), &["--steps", "1", "--partition", "random"]).output().unwrap());
    std::fs::create_dir_all(r.join("proj/sub")).unwrap();
    std::fs::write(r.join("proj/run.toml"), "lr = 1.0\n").unwrap();
    std::fs::write(r.join("proj/sub/step-1"), "a user's file named like a step").unwrap();
    std::fs::write(r.join("old-run/notes.txt"), "mine").unwrap();
    let candidates =
        [".", "proj", "proj/sub", "model", "model/x", "old-run", "old-run/step-1", "fresh/a", "train.jsonl"];
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..8 {
        let before = snapshot(r);
        let out = r.join(candidates[next(candidates.len())]);
        let model = [r.join("model"), r.join("old-run/step-1")][next(2)].clone();
        let (replaced_run, result) = if next(2) == 0 {
            let mut c = train_from(r, &model, &out, &["--overwrite", "--steps", "1", "--partition", "random"]);
            let was_run = out.join(".sdpo-output").is_file();
            (was_run, c.output().unwrap())
        } else {
            let mut c = Command::new(BIN);
            c.args(["partition", "--overwrite", "--partition", "random", "--steps", "2", "--model"]).arg(&model);
            c.arg("--data").arg(r.join("train.jsonl")).arg("--out").arg(out.join("p.json"));
            (false, c.output().unwrap())
        };
        let kind = sdpo::outputs::FolderKind::Run;
        assert_kept(&before, |p| {
            let own_entry = p.strip_prefix(&out).ok().and_then(|rest| rest.components().next());
            let own_entry = own_entry.map(|c| c.as_os_str().to_string_lossy().into_owned());
            (replaced_run && own_entry.is_some_and(|e| kind.writes(&e))) || p == out.join("p.json")
        });
        let _ = result;
    }
}
