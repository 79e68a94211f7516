//! `tools/gpu-check.sh --dry-run`, end to end: the whole GPU check against the stub programs
//! of tools/gpu-check-stubs/ (one test hangs, one crashes, one panics), every time limit
//! divided by 20. What the run leaves must be what a GPU host hands back from one call
//! (at most 8 files of at most 16 MiB, at most two folders down, plain names), a bad test
//! must cost one row, and the run must end inside its budget. Needs bash, python3, tar and
//! gzip; no GPU, no PyTorch, no network.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

struct DryRun {
    out: tempfile::TempDir,
    code: Option<i32>,
    wall: Duration,
    stdout: String,
}

/// Runs the dry run into a fresh folder, with GPU_CHECK_BUDGET = `budget_s` when given.
fn dry_run(budget_s: Option<u32>) -> DryRun {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("bash");
    cmd.args(["tools/gpu-check.sh", "--dry-run"])
        .env("GPU_CHECK_OUT", out.path())
        .env("GPU_CHECK_TIME_DIV", "20")
        .env_remove("GPU_CHECK_BUDGET")
        .env_remove("LD_LIBRARY_PATH");
    if let Some(b) = budget_s {
        cmd.env("GPU_CHECK_BUDGET", b.to_string());
    }
    let t = Instant::now();
    let o = cmd.output().expect("bash runs");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    DryRun { out, code: o.status.code(), wall: t.elapsed(), stdout }
}

/// Every file under `dir`: its path relative to `dir`, and its size.
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let (path, meta) = (e.path(), e.metadata().unwrap());
            if meta.is_dir() {
                todo.push(path);
            } else {
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// What a GPU host hands back from $OUT: at most 8 files, each at most 16 MiB, none more than
/// two folders down, every file and folder named in letters, digits, '.', '_' and '-'.
fn assert_returnable(r: &DryRun) {
    let files = files(r.out.path());
    assert!(!files.is_empty() && files.len() <= 8, "{} files: {files:?}", files.len());
    for (path, size) in &files {
        assert!(*size <= 16 << 20, "{} is {size} bytes", path.display());
        assert!(path.components().count() <= 3, "{} is more than two folders down", path.display());
        for part in path.components() {
            let name = part.as_os_str().to_string_lossy();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{} has a name a GPU host does not hand back",
                path.display()
            );
        }
    }
}

fn summary(r: &DryRun) -> Value {
    let text = std::fs::read_to_string(r.out.path().join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

/// The budget in seconds of this run (the limits divided by 20), checked against the
/// script's own clock and the wall clock around it (bash and the clean-up on top).
fn assert_within_budget(r: &DryRun, s: &Value) {
    let (budget, elapsed) = (s["budget_s"].as_f64().unwrap(), s["elapsed_s"].as_f64().unwrap());
    assert!(elapsed <= budget, "the run took {elapsed} s of its {budget} s budget");
    assert!(r.wall.as_secs_f64() <= budget + 3.0, "the dry run took {:?} for a {budget} s budget", r.wall);
}

/// (name, status, key figure) of each row of table.txt.
fn rows(r: &DryRun) -> Vec<(String, String, String)> {
    let table = std::fs::read_to_string(r.out.path().join("table.txt")).expect("table.txt");
    table
        .lines()
        .skip(2)
        .map(|l| {
            let mut parts = l.split_whitespace();
            let (name, status) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
            let figure = parts.skip(1).collect::<Vec<_>>().join(" ");
            (name, status, figure)
        })
        .collect()
}

#[test]
fn dry_run_returns_four_files_and_a_bad_test_costs_one_row() {
    let r = dry_run(None);
    // 1: the three failing stubs; 2 would be a usage error, anything else a broken script.
    assert_eq!(r.code, Some(1), "output:\n{}", r.stdout);
    assert_returnable(&r);
    let names: Vec<String> = files(r.out.path()).iter().map(|(p, _)| p.display().to_string()).collect();
    assert_eq!(names, ["env.txt", "logs.tgz", "summary.json", "table.txt"]);

    let rows = rows(&r);
    let status = |name: &str| {
        let row = rows.iter().find(|(n, _, _)| n == name);
        row.unwrap_or_else(|| panic!("no row {name} in {rows:?}")).1.clone()
    };
    assert_eq!(status("rope_matches_cpu"), "TIMEOUT(3s)");
    assert_eq!(status("adamw_matches_cpu"), "CRASH(SEGV)");
    assert_eq!(status("swiglu_matches_cpu"), "FAIL(rc=101)");
    // Each cost its own row: every other test and step ran after them and passed.
    let bad = ["rope_matches_cpu", "adamw_matches_cpu", "swiglu_matches_cpu"];
    let others: Vec<_> = rows.iter().filter(|(n, _, _)| !bad.contains(&n.as_str())).collect();
    assert!(others.iter().all(|(_, s, _)| s == "ok" || s.starts_with("skipped(budget)")), "{rows:?}");
    let after_hang = rows.iter().skip_while(|(n, _, _)| n != "rope_matches_cpu").skip(1);
    let ran: Vec<&str> = after_hang.filter(|(_, s, _)| s == "ok").map(|(n, _, _)| n.as_str()).collect();
    for step in [
        "logprobs_matches_cpu",
        "gemm_matches_cpu_linear",
        "train-bench",
        "torch",
        "attention-torch",
        "ncu-attention",
        "kernels-8b",
    ] {
        assert!(ran.contains(&step), "{step} did not run after the hang: {rows:?}");
    }
    // Every GPU test of tests/gpu.rs has its row, gpu_smoke first.
    let listed = rows.iter().skip_while(|(n, _, _)| n != "gpu-tests-list").skip(1);
    let tests: Vec<&str> = listed.take_while(|(n, _, _)| n != "train-bench").map(|(n, _, _)| n.as_str()).collect();
    let source = std::fs::read_to_string("tests/gpu.rs").unwrap();
    assert_eq!(tests.len(), source.matches("#[ignore = \"needs a CUDA GPU\"]").count(), "{tests:?}");
    assert_eq!(tests[..2], ["gpu_smoke", "gpu_ceilings"]);
    // The panic's message is the failed test's key figure.
    let panicked = rows.iter().find(|(n, _, _)| n == "swiglu_matches_cpu").unwrap();
    assert!(panicked.2.starts_with("swiglu backward: rel err 1.9e-01"), "{panicked:?}");

    let s = summary(&r);
    assert_within_budget(&r, &s);
    assert_eq!(s["complete"], true);
    assert_eq!(s["ceilings"]["copy_GBps"], 4312.0);
    assert_eq!(s["tests"]["rope_matches_cpu"]["status"], "TIMEOUT(3s)");
    assert_eq!(s["tests"]["attention_matches_cpu"]["max_rel_err"], 3.1e-3);
    let tokens = s["ratios"]["torch"]["train_tokens_per_s"].as_f64().unwrap();
    assert!((tokens - 11800.0 / 9400.0).abs() < 1e-3, "sdpo-run over PyTorch: {tokens}");
    assert_eq!(s["ratios"]["torch"]["against"], "train-bench");
    let peak = s["memory"]["train-bench"]["peak_over_planned"].as_f64().unwrap();
    assert!((peak - 30.9 / 28.6).abs() < 1e-3, "{peak}");
    assert_eq!(s["kernels"]["kernels-1b"].as_array().map(Vec::len), Some(3));
    // The toolkit's tools wrap the project's binaries: compute-sanitizer's closing line and
    // ncu's per-launch figures reach the summary.
    assert_eq!(status("racecheck"), "ok");
    assert_eq!(status("memcheck"), "ok");
    assert_eq!(s["sanitizers"]["memcheck"]["summary"], "ERROR SUMMARY: 0 errors");
    let launches = s["profiles"]["ncu-attention-1b"].as_array().expect("ncu-attention-1b's launches");
    assert_eq!(launches.len(), 2);
    assert_eq!(launches[1]["kernel"], "attention_backward_hd128");
    assert_eq!(launches[1]["duration_us"], 2270.0);
    assert_eq!(launches[0]["occupancy_pct"], 12.14);
    // The library search: the toolkit first, the pip wheels' folder for what it lacks.
    let libs = &s["env"]["libraries"];
    assert!(libs["libnvrtc"].as_str().unwrap().ends_with("/fake/cuda/lib64/libnvrtc.so.13"), "{libs}");
    assert!(libs["libnccl"].as_str().unwrap().contains("/fake/site/nvidia/cu13/lib/libnccl.so.2"), "{libs}");

    // Every step's log is in the tarball, the hung test's too.
    let tar = Command::new("tar").arg("-tzf").arg(r.out.path().join("logs.tgz")).output().unwrap();
    let listing = String::from_utf8_lossy(&tar.stdout);
    for (name, status, _) in &rows {
        if !status.starts_with("skipped") {
            assert!(listing.contains(&format!("logs/{name}.log")), "no log of {name} in logs.tgz:\n{listing}");
        }
    }
}

#[test]
fn dry_run_keeps_a_short_budget() {
    // 200 s is 10 s at a twentieth: the hung test takes 3 of them, and the steps that no
    // longer fit are skipped.
    let r = dry_run(Some(200));
    assert_eq!(r.code, Some(1), "output:\n{}", r.stdout);
    assert_returnable(&r);
    let s = summary(&r);
    assert_within_budget(&r, &s);
    assert_eq!(s["complete"], true);
    let rows = rows(&r);
    assert_eq!(rows.last().map(|r| r.1.as_str()), Some("skipped(budget)"), "{rows:?}");
    let hang = rows.iter().find(|r| r.0 == "rope_matches_cpu").unwrap();
    assert!(hang.1.starts_with("TIMEOUT"), "{rows:?}");
}
