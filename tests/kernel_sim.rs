//! The checks of tests/kernel_checks on the kernel simulator (src/engine/cuda/sim.rs): the
//! kernels' own source, compiled for the CPU by the system C++ compiler, run thread by
//! thread — every kernel against its CPU op, and whole CudaEngine steps against the
//! CpuEngine. Runs in CI, where there is no GPU. Every check runs twice, with each block's
//! threads scheduled in forward and in reverse order between barriers: a read of shared
//! memory that is not ordered by a barrier after the write it needs sees different data
//! in one of the two orders and fails its check.
//!
//! What this cannot show (tests/gpu.rs on a device does): speed, the device's fast-math
//! and tensor-core rounding, and races between blocks (blocks run one at a time here).
#![cfg(feature = "cuda")]

mod kernel_checks;

use std::sync::OnceLock;

use sdpo::config::LlamaConfig;
use sdpo::engine::cuda::model::CudaEngine;
use sdpo::engine::cuda::sim::KernelSim;
use sdpo::engine::cuda::Gpu;
use sdpo::LlamaWeights;

fn sim() -> &'static KernelSim {
    static SIM: OnceLock<KernelSim> = OnceLock::new();
    SIM.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-sim");
        KernelSim::build(&dir).unwrap_or_else(|e| panic!("building the kernel simulator: {e}"))
    })
}

/// Runs `check` on the simulator in both thread orders.
fn both_orders(check: impl Fn(&Gpu)) {
    for s in [sim().clone(), sim().reversed()] {
        check(&Gpu::sim(s));
    }
}

fn engine_on(s: &KernelSim) -> impl Fn(LlamaConfig, LlamaWeights) -> CudaEngine + '_ {
    move |cfg, w| CudaEngine::with_gpu(cfg, w, Gpu::sim(s.clone())).unwrap()
}

#[test]
fn attention_matches_cpu() {
    both_orders(kernel_checks::attention);
}

#[test]
fn rmsnorm_matches_cpu() {
    both_orders(kernel_checks::rmsnorm);
}

#[test]
fn rope_matches_cpu() {
    both_orders(kernel_checks::rope);
}

#[test]
fn logprobs_matches_cpu() {
    both_orders(kernel_checks::logprobs);
}

#[test]
fn adamw_matches_cpu() {
    both_orders(kernel_checks::adamw);
}

#[test]
fn grad_norm_matches_cpu() {
    both_orders(kernel_checks::grad_norm);
}

#[test]
fn elementwise_matches_cpu() {
    both_orders(kernel_checks::elementwise);
}

#[test]
fn engine_matches_cpu_engine_on_random_models() {
    for s in [sim().clone(), sim().reversed()] {
        kernel_checks::engine_on_random_models(&engine_on(&s));
    }
}

#[test]
fn engine_matches_cpu_engine_on_fixtures() {
    for s in [sim().clone(), sim().reversed()] {
        kernel_checks::engine_on_fixtures(&engine_on(&s));
    }
}

/// Two sDPO steps of the demo on both engines; forward thread order only (the run takes
/// about 10 s on the simulator, the engine checks above already run both orders).
#[test]
fn sdpo_demo_two_steps_matches_cpu_engine() {
    kernel_checks::sdpo_demo_two_steps(&engine_on(sim()));
}
