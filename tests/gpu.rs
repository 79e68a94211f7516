//! GPU tests: one small launch (`gpu_smoke`), the device's ceilings, and the checks of
//! tests/kernel_checks (every CUDA kernel against its CPU op, a whole CudaEngine step
//! against the CpuEngine) on a real device (kernel speed: benches/kernels.rs). Those that
//! need a device are `#[ignore]`d: run them on a GPU host with `--ignored` (tools/gpu-check.sh
//! runs each in its own process). Asked to run without a GPU they fail, saying
//! why, rather than pass. The same checks run in CI on the kernel simulator
//! (tests/kernel_sim.rs); what only a device shows is speed and the device's own
//! arithmetic (fast exp, tensor-core accumulation order, concurrent atomics).
#![cfg(feature = "cuda")]

mod kernel_checks;

use sdpo::bench::{datasheet, Datasheet};
use sdpo::config::LlamaConfig;
use sdpo::engine::cuda::gemm::GemmShape;
use sdpo::engine::cuda::kernels::Bf16;
use sdpo::engine::cuda::model::CudaEngine;
use sdpo::engine::cuda::{from_bf16, to_bf16, Gpu};
use sdpo::weights::SplitMix64;
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
fn embedding_matches_cpu() {
    kernel_checks::embedding(&gpu());
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
fn attention_matches_cpu() {
    kernel_checks::attention(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn swiglu_matches_cpu() {
    kernel_checks::swiglu(&gpu());
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
fn casts_matches_cpu() {
    kernel_checks::casts(&gpu());
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

// --- the first launch and the ceilings: what tools/gpu-check.sh runs first

/// One small kernel launch: does anything run at all? Opening the GPU compiles every
/// kernel for the device (NVRTC) or reads it from the kernel cache, so in gpu-check.sh this
/// test also fills the cache that the other tests' processes read.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_smoke() {
    let t = std::time::Instant::now();
    let g = gpu();
    let ready_s = t.elapsed().as_secs_f64();
    // Not a multiple of the kernel's 8 values per thread: the tail path runs too.
    let n = 4099;
    let mut rng = SplitMix64(7);
    let x: Vec<f32> = (0..n).map(|_| (rng.uniform() as f32 - 0.5) * 1e3).collect();
    let (xd, yd) = (g.upload(&x).unwrap(), g.alloc::<Bf16>(n).unwrap());
    g.k.cast_f32_bf16(g.ptr(&yd), g.ptr(&xd), n).unwrap();
    let got = from_bf16(&g.download(g.ptr(&yd)).unwrap());
    let want = from_bf16(&to_bf16(&x));
    let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("SMOKE device={:?} kernels_ready_s={ready_s:.1} elements={n} cast_max_err={max_err}", g.name);
    // Both round to nearest even: every value the same.
    assert_eq!(got, want, "cast_f32_bf16 on the device differs from the host's rounding");
}

/// The measured copy bandwidth and bf16 GEMM rate as fractions of `device`'s datasheet
/// (`None` for a device without figures), or why they are not plausible: each must lie
/// within [0.5, 1.05] of the datasheet. Below, the device is throttled or the measurement
/// waits on something else; above, the timing missed work (an unsynchronised stream).
fn ceiling_fractions(device: &str, copy_bps: f64, gemm_flops: f64) -> Result<Option<(f64, f64)>, String> {
    if !(copy_bps.is_finite() && copy_bps > 0.0 && gemm_flops.is_finite() && gemm_flops > 0.0) {
        return Err(format!("copy {copy_bps} B/s, GEMM {gemm_flops} FLOP/s: not positive, finite figures"));
    }
    let Some(Datasheet { bf16_flops: peak, bandwidth }) = datasheet(device) else {
        return Ok(None);
    };
    let (copy, gemm) = (copy_bps / bandwidth, gemm_flops / peak);
    for (what, f, sheet) in [("copy bandwidth", copy, bandwidth / 1e9), ("bf16 GEMM rate", gemm, peak / 1e12)] {
        if !(0.5..=1.05).contains(&f) {
            return Err(format!(
                "{device}: the {what} is {f:.2} of the datasheet's {sheet:.0} (GB/s, TFLOP/s), outside [0.5, 1.05]"
            ));
        }
    }
    Ok(Some((copy, gemm)))
}

#[test]
fn ceiling_fractions_reject_implausible_figures() {
    // An H200 here: 4.3 TB/s copied, 788 TFLOP/s on random bf16 operands (KINDS.md's readings).
    let (copy, gemm) = ceiling_fractions("NVIDIA H200", 4.3e12, 788e12).unwrap().unwrap();
    assert!((copy - 0.896).abs() < 1e-3 && (gemm - 0.796).abs() < 1e-3, "{copy} {gemm}");
    // Faster than the datasheet: the timing missed work.
    assert!(ceiling_fractions("NVIDIA H200", 9.0e12, 788e12).is_err());
    assert!(ceiling_fractions("NVIDIA H200", 4.3e12, 1200e12).is_err());
    // Far slower: throttled, or not what was meant to be measured.
    assert!(ceiling_fractions("NVIDIA H200", 4.3e12, 300e12).is_err());
    assert!(ceiling_fractions("NVIDIA H100 PCIe", 0.5e12, 600e12).is_err());
    assert!(ceiling_fractions("NVIDIA H200", f64::NAN, 788e12).is_err());
    // A device without datasheet figures: nothing to compare with.
    assert_eq!(ceiling_fractions("NVIDIA RTX 6000 Ada Generation", 0.9e12, 350e12), Ok(None));
}

/// The device's ceilings, which the benchmarks are read against: a device-to-device copy
/// and a bf16 GEMM, on random (not zero) data, each within a plausible band of the
/// datasheet (`ceiling_fractions`).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_ceilings() {
    let mut g = gpu();
    let mut rng = SplitMix64(11);
    // Device-to-device copy of 2 GiB, filled with a random 64 MiB block: bandwidth =
    // 2·bytes / time (read + write).
    let (bytes, block) = (2usize << 30, 64usize << 20);
    let a = g.alloc::<u8>(bytes).unwrap();
    let b = g.alloc::<u8>(bytes).unwrap();
    let (pa, pb) = (g.ptr(&a), g.ptr(&b));
    let random: Vec<u8> = (0..block / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    for k in 0..bytes / block {
        g.write(pa.slice(k * block, block).unwrap(), &random).unwrap();
    }
    let copy = |g: &Gpu| g.copy(pb, pa, bytes).unwrap();
    copy(&g);
    g.sync().unwrap();
    let reps = 20;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        copy(&g);
    }
    g.sync().unwrap();
    let copy_bps = 2.0 * bytes as f64 * reps as f64 / t.elapsed().as_secs_f64();
    drop((a, b));

    // bf16 GEMM 8192³ with fp32 accumulation, bf16 out, on standard-normal-ish operands.
    let s = 8192usize;
    let host: Vec<f32> = (0..s * s).map(|_| (rng.uniform() as f32 - 0.5) * 3.5).collect();
    let x = g.upload(&to_bf16(&host)).unwrap();
    drop(host);
    let y = g.alloc::<Bf16>(s * s).unwrap();
    let (px, py) = (g.ptr(&x), g.ptr(&y));
    let shape = GemmShape::new(s, s, s, false, true);
    g.gemm.gemm_bf16(py, px, px, &shape, 1.0, 0.0).unwrap();
    g.sync().unwrap();
    let reps = 30;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        g.gemm.gemm_bf16(py, px, px, &shape, 1.0, 0.0).unwrap();
    }
    g.sync().unwrap();
    let gemm_flops = 2.0 * (s * s * s) as f64 * reps as f64 / t.elapsed().as_secs_f64();

    let sheet = datasheet(&g.name);
    let bandwidth = sheet.map_or(f64::NAN, |d| d.bandwidth);
    let peak = sheet.map_or(f64::NAN, |d| d.bf16_flops);
    println!(
        "CEILING device={:?} copy_GBps={:.0} copy_datasheet_GBps={:.0} copy_fraction={:.3} bf16_gemm_TFLOPs={:.0} \
         gemm_datasheet_TFLOPs={:.0} gemm_fraction={:.3}",
        g.name,
        copy_bps / 1e9,
        bandwidth / 1e9,
        copy_bps / bandwidth,
        gemm_flops / 1e12,
        peak / 1e12,
        gemm_flops / peak
    );
    match ceiling_fractions(&g.name, copy_bps, gemm_flops) {
        Ok(Some(_)) => {}
        Ok(None) => println!("{}: no datasheet figures in benches/devices.json; band not checked", g.name),
        Err(why) => panic!("{why}"),
    }
}
