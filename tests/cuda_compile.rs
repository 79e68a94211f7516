//! Every CUDA kernel compiles with NVRTC to sm_80 and sm_90a cubins, no GPU needed.
//!
//! Runs in CI (which installs the NVRTC pip wheels; see .ci/run). Prints each kernel's
//! registers, stack frame and spills, and fails on a compile error, on a missing kernel
//! that a launcher in src/engine/cuda/kernels.rs expects, or on any spill or stack frame
//! in the attention, logprobs, rmsnorm and adamw kernels (local memory there would cost
//! more than the whole kernel should). Without NVRTC the test fails, saying how to get it.
#![cfg(feature = "cuda")]

use sdpo::engine::cuda::kernels::KERNEL_NAMES;
use sdpo::engine::cuda::nvrtc::{self, Nvrtc, Output, INSTALL_HINT};
use sdpo::engine::cuda::{KERNEL_HEADERS, KERNEL_SOURCES};

/// Files whose kernels must run entirely from registers and shared memory.
const NO_LOCAL_MEMORY: &[&str] = &["attention.cu", "logprobs.cu", "rmsnorm.cu", "adamw.cu"];

#[test]
fn every_kernel_compiles_for_sm80_and_sm90a_without_spills() {
    let nv = Nvrtc::load().unwrap_or_else(|e| panic!("{e}"));
    let include = nvrtc::include_dirs();
    let missing = nvrtc::missing_headers(&include);
    assert!(missing.is_empty(), "CUDA headers {missing:?} not found in {include:?}; {INSTALL_HINT}");
    assert!(!KERNEL_SOURCES.is_empty(), "no kernels/*.cu embedded: build.rs did not run?");
    println!("NVRTC {}.{} from {}", nv.version.0, nv.version.1, nv.path);

    let mut failures = Vec::new();
    println!("{:<8} {:<16} {:<34} {:>5} {:>6} {:>7}", "arch", "file", "kernel", "regs", "stack", "spills");
    for arch in ["sm_80", "sm_90a"] {
        for (file, src) in KERNEL_SOURCES {
            let opts = nvrtc::options(arch, &include, true);
            let compiled = match nv.compile(file, src, KERNEL_HEADERS, &opts, Output::Cubin) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{arch} {file}: {e}"));
                    continue;
                }
            };
            let report = nvrtc::ptxas_report(&compiled.log);
            for k in &report {
                let spills = k.spill_stores + k.spill_loads;
                println!("{arch:<8} {file:<16} {:<34} {:>5} {:>6} {:>7}", k.name, k.registers, k.stack_bytes, spills);
                if NO_LOCAL_MEMORY.contains(file) && (k.stack_bytes > 0 || spills > 0) {
                    failures.push(format!(
                        "{arch} {file}: {} uses local memory ({} bytes stack, {} spill stores, {} spill loads)",
                        k.name, k.stack_bytes, k.spill_stores, k.spill_loads
                    ));
                }
            }
            for (kfile, name) in KERNEL_NAMES {
                if kfile == file && !report.iter().any(|k| k.name == *name) {
                    failures.push(format!("{arch} {file}: no kernel `{name}` (a launcher expects it)"));
                }
            }
        }
    }
    for (kfile, name) in KERNEL_NAMES {
        if !KERNEL_SOURCES.iter().any(|(f, _)| f == kfile) {
            failures.push(format!("kernels/{kfile} (for `{name}`) is not embedded"));
        }
    }
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}
