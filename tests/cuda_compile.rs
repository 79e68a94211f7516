//! Every CUDA kernel compiles with NVRTC to sm_80 and sm_90a cubins, no GPU needed.
//!
//! Runs in CI (which installs the NVRTC pip wheels; see .ci/run). Prints each kernel's
//! registers, stack frame, spills, static and the most dynamic shared memory a launch asks
//! for (`dynamic_smem_limit`), block size and its
//! theoretical occupancy (blocks per SM, % of the SM's warps, the resource that limits
//! it; tests/occupancy). Fails on a compile error, on a missing kernel that a
//! launcher in src/engine/cuda/kernels.rs expects, on a kernel without
//! `__launch_bounds__`, on any spill or stack frame in the attention, logprobs, rmsnorm
//! and adamw kernels (local memory there would cost more than the whole kernel should),
//! and on a kernel of which not one block fits on an H100/H200 SM (too many registers ×
//! threads, or too much shared memory: the launch would fail). Without NVRTC the test
//! fails, saying how to get it.
#![cfg(feature = "cuda")]

mod occupancy;

use occupancy::{occupancy, KernelUse, SmLimits};
use sdpo::engine::cuda::kernels::{dynamic_smem_limit, KERNEL_NAMES};
use sdpo::engine::cuda::nvrtc::{self, Nvrtc, Output, INSTALL_HINT};
use sdpo::engine::cuda::sim::declarations::{kernel_signatures, KernelSignature};
use sdpo::engine::cuda::{KERNEL_HEADERS, KERNEL_SOURCES};

/// Files whose kernels must run entirely from registers and shared memory.
const NO_LOCAL_MEMORY: &[&str] = &["attention.cu", "logprobs.cu", "rmsnorm.cu", "adamw.cu"];

/// The declaration of `kernel`.
fn signature<'a>(sigs: &'a [KernelSignature], kernel: &str) -> Option<&'a KernelSignature> {
    sigs.iter().find(|s| s.names(kernel))
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90a_without_spills() {
    let nv = Nvrtc::load().unwrap_or_else(|e| panic!("{e}"));
    let include = nvrtc::include_dirs();
    let missing = nvrtc::missing_headers(&include);
    assert!(missing.is_empty(), "CUDA headers {missing:?} not found in {include:?}; {INSTALL_HINT}");
    assert!(!KERNEL_SOURCES.is_empty(), "no kernels/*.cu embedded: build.rs did not run?");
    let sigs = kernel_signatures().unwrap_or_else(|e| panic!("{e}"));
    println!("NVRTC {}.{} from {}", nv.version.0, nv.version.1, nv.path);
    // Block = the kernel's __launch_bounds__, the block size every launcher uses (a larger
    // one is refused by check_launch); occupancy is theoretical, not measured.
    println!(
        "{:<7} {:<15} {:<25} {:>4} {:>5} {:>6} {:>6} {:>6} {:>5} {:>6} {:>5}  limiter",
        "arch", "file", "kernel", "regs", "stack", "spills", "smem", "dyn", "block", "blk/SM", "occ%"
    );

    let mut failures = Vec::new();
    for arch in ["sm_80", "sm_90a"] {
        let sm = SmLimits::for_arch(arch).expect("limits for every arch compiled here");
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
                if NO_LOCAL_MEMORY.contains(file) && (k.stack_bytes > 0 || spills > 0) {
                    failures.push(format!(
                        "{arch} {file}: {} uses local memory ({} bytes stack, {} spill stores, {} spill loads)",
                        k.name, k.stack_bytes, k.spill_stores, k.spill_loads
                    ));
                }
                let Some(block) = signature(sigs, &k.name).and_then(|s| s.max_threads) else {
                    failures.push(format!("{arch} {file}: {} has no __launch_bounds__ (block size unknown)", k.name));
                    continue;
                };
                let used = KernelUse {
                    registers: k.registers,
                    threads_per_block: block,
                    static_smem: k.static_smem,
                    dynamic_smem: dynamic_smem_limit(&k.name),
                    barriers: k.barriers,
                };
                let occ = occupancy(sm, &used);
                println!(
                    "{arch:<7} {file:<15} {:<25} {:>4} {:>5} {:>6} {:>6} {:>6} {:>5} {:>6} {:>5.1}  {}",
                    k.name,
                    k.registers,
                    k.stack_bytes,
                    spills,
                    k.static_smem,
                    used.dynamic_smem,
                    block,
                    occ.blocks_per_sm,
                    occ.percent(),
                    occ.limiter_text()
                );
                if sm.name == "sm_90" && occ.blocks_per_sm == 0 {
                    failures.push(format!(
                        "{arch} {file}: {} cannot launch on an H100/H200 SM: {used:?} fits 0 blocks ({})",
                        k.name,
                        occ.limiter_text()
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
