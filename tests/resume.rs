//! Crash safety, through the real binary: a run killed with SIGKILL mid-step and resumed
//! ends bitwise equal to an uninterrupted run, its TensorBoard events holding each metrics
//! line once; a NaN stops a run with a message naming the step, and the last good state
//! and step folders still load.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sdpo::checkpoint;
use sdpo::data::pretokenized::write_pairs;
use sdpo::demo::demo_data;
use sdpo::weights::save_model;
use sdpo::{LlamaConfig, LlamaWeights};

const BIN: &str = env!("CARGO_BIN_EXE_sdpo-run");

/// A tiny model folder and a data file in a fresh temporary folder.
fn setup(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("sdpo-resume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let cfg = LlamaConfig::from_json(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    }))
    .unwrap();
    save_model(&root.join("model"), &cfg, &LlamaWeights::random(&cfg, 9), cfg.dtype, None).unwrap();
    let d = demo_data(2, 24, 5, 0);
    write_pairs(&root.join("train.jsonl"), &d.train).unwrap();
    write_pairs(&root.join("eval.jsonl"), &d.eval).unwrap();
    root
}

fn train_cmd(root: &Path, out: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["train", "--quiet", "--model"]).arg(root.join("model"));
    c.arg("--data").arg(root.join("train.jsonl"));
    c.arg("--eval-data").arg(root.join("eval.jsonl"));
    c.arg("--out").arg(root.join(out));
    // 72 pairs in 3 sources of 24, 4 per update, 2 epochs: 12 updates per step, 36 in all.
    c.args(["--partition", "sources", "--lr", "1e-2", "--batch-pairs", "4", "--epochs", "2"]);
    c.args(["--micro-batch-tokens", "40", "--save-every", "5", "--seed", "3"]);
    c.args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn bytes(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs to the end uninterrupted; then again, killed with SIGKILL inside step 2 and
/// resumed; the step folders must be identical to the byte.
fn kill_and_resume(name: &str, extra: &[&str]) {
    let root = setup(name);
    let full = train_cmd(&root, "full", extra).output().unwrap();
    assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));

    // Slowed down (20 ms per update) so that the kill lands inside step 2.
    let slow = [extra, &["--debug-sleep-ms", "20"]].concat();
    let mut child = train_cmd(&root, "killed", &slow).spawn().unwrap();
    let out = root.join("killed");
    let t0 = Instant::now();
    loop {
        let st = checkpoint::latest(&out).unwrap().map(|d| std::fs::read_to_string(d.join("state.json")).unwrap());
        if let Some(text) = st {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if v["sdpo_step"] == 2 && v["step_done"] == false {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no mid-step state of step 2 appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A few updates past that state, which the resume must drop from metrics.jsonl and the events.
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(!out.join("step-3").exists(), "the run was killed before it finished");

    let resumed = train_cmd(&root, "killed", &[extra, &["--resume"]].concat()).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let weights = if extra.contains(&"--lora-r") { "adapter_model.safetensors" } else { "model.safetensors" };
    for t in 1..=3 {
        let f = format!("step-{t}/{weights}");
        assert!(bytes(root.join("full").join(&f)) == bytes(out.join(&f)), "{f} differs after resume");
    }
    // metrics.jsonl has each update once: as many lines as the uninterrupted run's.
    let lines = |d: &str| std::fs::read_to_string(root.join(d).join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines("full"), lines("killed"));
    assert!(out.join("report.html").is_file(), "every run ends with its report page");
    if extra.contains(&"tensorboard") {
        check_events(&out);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The TensorBoard events of the killed process and of the resumed one, read in name
/// order as TensorBoard reads them, hold each metrics.jsonl line once, with its numbers.
fn check_events(out: &Path) {
    let files = sdpo::tensorboard::event_files(&out.join("tensorboard")).unwrap();
    assert_eq!(files.len(), 2, "one event file per process: {files:?}");
    let events: Vec<Vec<(String, f32)>> = files
        .iter()
        .flat_map(|f| sdpo::tensorboard::read_events(f).unwrap())
        .filter(|e| e.file_version.is_none())
        .map(|e| e.scalars)
        .collect();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(events.len(), text.lines().count(), "one event per line, none twice");
    for (i, (e, line)) in events.iter().zip(text.lines()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let want: Vec<(&String, f64)> =
            v.as_object().unwrap().iter().filter_map(|(k, x)| Some((k, x.as_f64()?))).collect();
        assert_eq!(e.len(), want.len(), "line {}: {e:?} vs {want:?}", i + 1);
        for ((tag, x), (key, w)) in e.iter().zip(&want) {
            // float32 of the logged number; the JSON parse may sit one f64 ulp away.
            assert!(
                tag == *key && (f64::from(*x) - w).abs() <= w.abs() * 2f64.powi(-23),
                "line {}: {tag} {x} vs {key} {w}",
                i + 1
            );
        }
    }
}

#[test]
fn sigkill_mid_step_then_resume_is_bitwise_equal() {
    kill_and_resume("kill", &["--report-to", "tensorboard"]);
}

/// The same with every piece of state in play: the inline reference's weights, AdamW
/// moments carried across steps, and one schedule over all steps.
#[test]
fn sigkill_and_resume_with_inline_reference_and_carried_optimizer() {
    kill_and_resume("kill-inline", &["--reference", "inline", "--carry-optimizer", "--carry-schedule"]);
}

/// A LoRA run with dropout: the states hold the adapter and its moments (carried across
/// steps), not the frozen base, and the resumed run draws the same dropout masks.
#[test]
fn sigkill_and_resume_a_lora_run() {
    kill_and_resume(
        "kill-lora",
        &["--lora-r", "4", "--lora-targets", "all-linear", "--lora-dropout", "0.1", "--carry-optimizer"],
    );
}

#[test]
fn existing_output_is_not_overwritten_without_a_flag() {
    let root = setup("clobber");
    let first = train_cmd(&root, "run", &[]).output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let again = train_cmd(&root, "run", &[]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    // --resume with different settings is refused, naming run.toml
    let changed = train_cmd(&root, "run", &["--beta", "0.2", "--resume"]).output().unwrap();
    assert!(!changed.status.success());
    assert!(String::from_utf8_lossy(&changed.stderr).contains("run.toml"));
    // so is a different way of reading the data (run.toml holds the data options too)
    let changed = train_cmd(&root, "run", &["--max-length", "64", "--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success() && err.contains("max_length = 64"), "{err}");
    // a run that fails before training anything leaves no folder that would need --overwrite
    let failed = train_cmd(&root, "failed", &["--steps", "1000"]).output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success() && err.contains("--steps"), "{err}");
    assert!(!root.join("failed").exists());
    // a --data path that is not a file is named, with what data files are
    let missing = train_cmd(&root, "missing", &["--data", "nope.jsonl"]).output().unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("nope.jsonl: no such file") && err.contains("records"), "{err}");
    assert!(!root.join("missing").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn nan_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let root = setup("nan");
    // NaN put into the weights before global update 16 (step 2's 4th update), after the
    // state of update 15 was saved (--save-every 5). Update 16 starts from that state's
    // weights as far as the driver can tell, so that state is dropped and step 1's last (update 12) kept.
    let run = train_cmd(&root, "nan", &["--debug-nan-at", "16"]).output().unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("non-finite") && err.contains("sDPO step 2") && err.contains("optimiser step 4"), "{err}");
    let out = root.join("nan");
    let cfg = LlamaConfig::from_path(&root.join("model")).unwrap();
    let (st, data) = checkpoint::load(&checkpoint::latest(&out).unwrap().unwrap(), &cfg, None).unwrap();
    assert!(data.weights.unwrap().all_finite());
    assert_eq!((st.sdpo_step, st.step_done, st.total_updates), (1, true, 12), "the last good state");
    assert!(err.contains("keeps the state after update 12") && err.contains("--resume --lr LOWER"), "{err}");
    let m1 = LlamaWeights::load(&out.join("step-1"), &cfg).unwrap();
    assert!(m1.all_finite());
    // the stopped run has its report page too, with the curves up to the divergence
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(page.contains("data-key=\"train/grad_norm\""), "no gradient-norm curve in the report");
    // and it resumes: the NaN was a one-off, so the run now completes.
    let resumed = train_cmd(&root, "nan", &["--resume"]).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(LlamaWeights::load(&out.join("step-3"), &cfg).unwrap().all_finite());
    let _ = std::fs::remove_dir_all(&root);
}
