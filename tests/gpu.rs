//! GPU parity tests: the checks of tests/kernel_checks (every CUDA kernel against its CPU
//! op, a whole CudaEngine step against the CpuEngine) on a real device, then the device's
//! ceilings (kernel speed: benches/kernels.rs). All are `#[ignore]`d: run them on a GPU host with
//! `--ignored` (tools/gpu-check.sh does). Asked to run without a GPU they fail, saying
//! why, rather than pass. The same checks run in CI on the kernel simulator
//! (tests/kernel_sim.rs); what only a device shows is speed and the device's own
//! arithmetic (fast exp, tensor-core accumulation order, concurrent atomics).
#![cfg(feature = "cuda")]

mod kernel_checks;

use sdpo::config::LlamaConfig;
use sdpo::engine::cuda::gemm::GemmShape;
use sdpo::engine::cuda::kernels::Bf16;
use sdpo::engine::cuda::model::CudaEngine;
use sdpo::engine::cuda::Gpu;
use sdpo::LlamaWeights;

fn gpu() -> Gpu {
    match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => panic!("this test needs a CUDA GPU and could not get one: {e}"),
    }
}

fn open_engine(cfg: LlamaConfig, w: LlamaWeights) -> CudaEngine {
    match CudaEngine::new(cfg, w, 0) {
        Ok(e) => e,
        Err(e) => panic!("this test needs a CUDA GPU and could not get one: {e}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu() {
    kernel_checks::attention(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_matches_cpu() {
    kernel_checks::rmsnorm(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_matches_cpu() {
    kernel_checks::rope(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logprobs_matches_cpu() {
    kernel_checks::logprobs(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_matches_cpu() {
    kernel_checks::adamw(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grad_norm_matches_cpu() {
    kernel_checks::grad_norm(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_matches_cpu() {
    kernel_checks::elementwise(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_matches_cpu_linear() {
    kernel_checks::gemm(&mut gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_matches_cpu_engine_on_random_models() {
    kernel_checks::engine_on_random_models(&open_engine);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_matches_cpu_engine_on_fixtures() {
    kernel_checks::engine_on_fixtures(&open_engine);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sdpo_demo_two_steps_matches_cpu_engine() {
    kernel_checks::sdpo_demo_two_steps(&open_engine);
}

// --- ceilings (measured, not asserted): what tools/gpu-check.sh reports first

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_ceilings() {
    let mut g = gpu();
    // Device-to-device copy of 2 GiB: bandwidth = 2·bytes / time (read + write).
    let bytes = 2usize << 30;
    let a = g.alloc::<u8>(bytes).unwrap();
    let b = g.alloc::<u8>(bytes).unwrap();
    let (pa, pb) = (g.ptr(&a), g.ptr(&b));
    let copy = |g: &Gpu| g.copy(pb, pa, bytes).unwrap();
    copy(&g);
    g.sync().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..10 {
        copy(&g);
    }
    g.sync().unwrap();
    let copy_gbs = 2.0 * bytes as f64 * 10.0 / t.elapsed().as_secs_f64() / 1e9;
    drop((a, b));

    // bf16 GEMM 8192³ with fp32 accumulation, bf16 out.
    let s = 8192usize;
    let x = g.alloc::<Bf16>(s * s).unwrap();
    let y = g.alloc::<Bf16>(s * s).unwrap();
    let (px, py) = (g.ptr(&x), g.ptr(&y));
    let shape = GemmShape::new(s, s, s, false, true);
    g.gemm.gemm_bf16(py, px, px, &shape, 1.0, 0.0).unwrap();
    g.sync().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        g.gemm.gemm_bf16(py, px, px, &shape, 1.0, 0.0).unwrap();
    }
    g.sync().unwrap();
    let tflops = 2.0 * (s * s * s) as f64 * 20.0 / t.elapsed().as_secs_f64() / 1e12;
    println!("CEILING device={} copy_GBps={copy_gbs:.0} bf16_gemm_TFLOPs={tflops:.0}", g.name);
    assert!(copy_gbs > 0.0 && tflops > 0.0);
}
