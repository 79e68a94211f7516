//! The kernel and engine checks shared by tests/gpu.rs (on a GPU) and tests/kernel_sim.rs
//! (the kernels' own source on the CPU simulator): every CUDA kernel against the CPU op of
//! the same name (src/engine/cpu/ops.rs) on random inputs, forward and backward, and a
//! whole CudaEngine step against the CpuEngine. Each check takes the `Gpu` (or a way to
//! open the engine) it runs on.
//!
//! Tolerances: ‖gpu − cpu‖ / ‖cpu‖, one per kind of quantity (`TOL`, `F32_TOL`,
//! `ADAMW_TOL`). The CPU reference gets the same bf16-rounded inputs as the kernel, so
//! what remains is the kernel's own rounding and summation order, while a wrong index,
//! mask or missing term gives errors of order 1. Outputs are poisoned with NaN before
//! every launch, so an element the kernel forgets to write fails the check.
#![allow(dead_code)] // each test target uses its own subset

use std::path::{Path, PathBuf};

use sdpo::config::LlamaConfig;
use sdpo::data::pretokenized::read_pairs;
use sdpo::data::{Layout, PairBatch, PairExample};
use sdpo::dpo::{LossConfig, LossKind};
use sdpo::engine::cpu::ops;
use sdpo::engine::cpu::CpuEngine;
use sdpo::engine::cuda::gemm::GemmShape;
use sdpo::engine::cuda::kernels::{null, AttnDims, AttnMaskDev, Bf16, DPtr};
use sdpo::engine::cuda::model::CudaEngine;
use sdpo::engine::cuda::{from_bf16, join_master, split_master, to_bf16, Gpu};
use sdpo::weights::SplitMix64;
use sdpo::{AdamWConfig, Engine, LlamaWeights, PairLogps};

/// An output rounded to bf16 or computed through bf16 intermediates (DESIGN.md,
/// Numerics): 2^-9 ≈ 2e-3 relative per rounding, a few roundings deep, and the fp32
/// summation order. Worst measured, on the simulator and on an H200 alike: 2.9e-3
/// (attention's dk).
pub const TOL: f64 = 1e-2;

/// An fp32 output of the same inputs through fp32 arithmetic alone (log-sum-exps, rstd,
/// scatter-adds, cuBLASLt's fp32 outputs): only the order of the sums, over up to 1,000
/// terms here, and the device's division and square root differ, 6e-8 relative per
/// operation. Worst measured: 1.0e-6 on an H200 (cuBLASLt's dx), 9.3e-8 on the simulator
/// (attention's lse).
pub const F32_TOL: f64 = 1e-5;

/// AdamW's fp32 master weights and moments: a few fp32 operations per element and no
/// sums. Worst measured: 7.5e-8 on an H200; 0 on the simulator, whose arithmetic is the
/// CPU's.
pub const ADAMW_TOL: f64 = 1e-6;

/// Values as the device stores them (bf16), back in f32: the CPU reference's inputs.
pub fn bf(x: &[f32]) -> Vec<f32> {
    from_bf16(&to_bf16(x))
}

pub fn rel_err(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (want {})", got[i], want[i]);
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (g, &w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// `got` against `want` within `TOL` (a bf16 quantity).
pub fn check(what: &str, got: &[f32], want: &[f32]) {
    check_within(what, got, want, TOL);
}

pub fn check_within(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(what, got, want);
    println!("{what:<48} rel err {e:.2e}");
    assert!(e <= tol, "{what}: ‖gpu − cpu‖/‖cpu‖ = {e:.3e} > {tol}");
}

/// f32 NaN / bf16 NaN bit patterns written over outputs before a launch.
pub fn poison_f32(g: &Gpu, p: DPtr<f32>) {
    g.write(p, &vec![f32::NAN; p.len]).unwrap();
}
pub fn poison_bf16(g: &Gpu, p: DPtr<Bf16>) {
    g.write(p, &vec![0x7fc0u16; p.len]).unwrap();
}

pub fn down_bf16(g: &Gpu, p: DPtr<Bf16>) -> Vec<f32> {
    from_bf16(&g.download(p).unwrap())
}

// --- embedding

pub fn embedding(g: &Gpu) {
    let mut rng = SplitMix64(4);
    let (vocab, hidden) = (50usize, 64usize);
    let tokens: Vec<u32> = (0..77u32).map(|i| (i * 7 + i / 3) % vocab as u32).collect(); // repeats
    let table = bf(&rng.normals(vocab * hidden, 1.0));
    let dout = rng.normals(tokens.len() * hidden, 1.0);
    let mut out = vec![0f32; tokens.len() * hidden];
    ops::embedding_forward(&mut out, &tokens, &table, hidden);
    let mut dtable = vec![0f32; vocab * hidden];
    ops::embedding_backward(&mut dtable, &dout, &tokens, hidden, None);
    let (t_d, tok_d, do_d) =
        (g.upload(&to_bf16(&table)).unwrap(), g.upload(&tokens).unwrap(), g.upload(&dout).unwrap());
    let o_d = g.alloc::<f32>(tokens.len() * hidden).unwrap();
    let dt_d = g.alloc::<f32>(vocab * hidden).unwrap();
    poison_f32(g, g.ptr(&o_d));
    g.k.embedding_forward(g.ptr(&o_d), g.ptr(&t_d), g.ptr(&tok_d), hidden).unwrap();
    assert_eq!(g.download(g.ptr(&o_d)).unwrap(), out, "embedding gather is exact");
    g.k.embedding_backward(g.ptr(&dt_d), g.ptr(&do_d), g.ptr(&tok_d), hidden, None).unwrap();
    check_within("embedding backward (scatter-add)", &g.download(g.ptr(&dt_d)).unwrap(), &dtable, F32_TOL);

    // With a padding row: a token that occurs several times, its row left exactly as it was.
    let pad = tokens[3];
    assert!(tokens.iter().filter(|&&t| t == pad).count() > 1);
    let mut dtable = vec![0f32; vocab * hidden];
    ops::embedding_backward(&mut dtable, &dout, &tokens, hidden, Some(pad));
    let dt_d = g.alloc::<f32>(vocab * hidden).unwrap();
    g.k.embedding_backward(g.ptr(&dt_d), g.ptr(&do_d), g.ptr(&tok_d), hidden, Some(pad)).unwrap();
    let got = g.download(g.ptr(&dt_d)).unwrap();
    let row = pad as usize * hidden..(pad as usize + 1) * hidden;
    assert!(got[row].iter().all(|&x| x == 0.0), "embedding backward: the padding row gets no gradient");
    check_within("embedding backward (padding row)", &got, &dtable, F32_TOL);
}

// --- rmsnorm

pub fn rmsnorm(g: &Gpu) {
    // (5, 300, 1032): backward batches of 8 rows, ~5 per block on the simulator's grid of 8,
    // the last batch half full, and a second float4 column sweep only threads 0-1 take part in.
    let cases = [(1u64, 1usize, 64usize), (2, 37, 264), (3, 130, 1024), (4, 7, 4096), (5, 300, 1032)];
    for (seed, n, hidden) in cases {
        let mut rng = SplitMix64(seed);
        let x = rng.normals(n * hidden, 1.0);
        let w = bf(&rng.normals(hidden, 1.0));
        let dy = rng.normals(n * hidden, 1.0);
        let eps = 1e-5;
        let (mut y, mut rstd) = (vec![0f32; n * hidden], vec![0f32; n]);
        ops::rmsnorm_forward(&mut y, &mut rstd, &x, &w, hidden, eps);
        let (mut dx, mut dw) = (vec![0f32; n * hidden], vec![0f32; hidden]);
        ops::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, hidden);

        let (x_d, w_d, dy_d) = (g.upload(&x).unwrap(), g.upload(&to_bf16(&w)).unwrap(), g.upload(&dy).unwrap());
        let (y_d, xhat_d, y2_d) = (
            g.alloc::<Bf16>(n * hidden).unwrap(),
            g.alloc::<Bf16>(n * hidden).unwrap(),
            g.alloc::<Bf16>(n * hidden).unwrap(),
        );
        let rstd_d = g.alloc::<f32>(n).unwrap();
        let dx_d = g.alloc::<f32>(n * hidden).unwrap();
        let dw_d = g.alloc::<f32>(hidden).unwrap();
        let tag = format!("rmsnorm n={n} h={hidden}");
        // Without x̂ (the reference and eval passes), then with it (training).
        for with_xhat in [false, true] {
            for p in [g.ptr(&y_d), g.ptr(&xhat_d)] {
                poison_bf16(g, p);
            }
            poison_f32(g, g.ptr(&rstd_d));
            let xh = if with_xhat { g.ptr(&xhat_d) } else { null() };
            g.k.rmsnorm_forward(g.ptr(&y_d), g.ptr(&rstd_d), xh, g.ptr(&x_d), g.ptr(&w_d), n, hidden, eps).unwrap();
            check(&format!("{tag} y"), &down_bf16(g, g.ptr(&y_d)), &y);
            check_within(&format!("{tag} rstd"), &g.download(g.ptr(&rstd_d)).unwrap(), &rstd, F32_TOL);
            if !with_xhat {
                assert!(down_bf16(g, g.ptr(&xhat_d)).iter().all(|v| v.is_nan()), "{tag}: x̂ written through null");
            }
        }
        let xhat: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * rstd[i / hidden]).collect();
        check(&format!("{tag} xhat"), &down_bf16(g, g.ptr(&xhat_d)), &xhat);
        // y again from x̂ (the backward's xn): bf16(bf16(x̂)·w), bit for bit its CPU twin's
        // on the kernel's own x̂ bits rounded once, and within one bf16 rounding of the forward's y.
        poison_bf16(g, g.ptr(&y2_d));
        g.k.rmsnorm_forward_from_xhat(g.ptr(&y2_d), g.ptr(&xhat_d), g.ptr(&w_d), n, hidden).unwrap();
        let mut want = vec![0f32; n * hidden];
        ops::rmsnorm_forward_from_xhat(&mut want, &down_bf16(g, g.ptr(&xhat_d)), &w, hidden);
        let want: Vec<f32> = want.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(down_bf16(g, g.ptr(&y2_d)), want, "{tag}: rmsnorm_forward_from_xhat");
        check(&format!("{tag} y from x̂"), &down_bf16(g, g.ptr(&y2_d)), &y);

        let (dx16_d, cast_d) = (g.alloc::<Bf16>(n * hidden).unwrap(), g.alloc::<Bf16>(n * hidden).unwrap());
        poison_f32(g, g.ptr(&dx_d));
        g.k.zero(g.ptr(&dw_d)).unwrap();
        // The backward from the forward's bf16 x̂, against the CPU op's from f32 x.
        let args = (g.ptr(&dx_d), g.ptr(&dw_d), g.ptr(&dy_d), g.ptr(&xhat_d), g.ptr(&w_d), g.ptr(&rstd_d));
        let backward = |dx16: DPtr<Bf16>, accumulate: bool| {
            if dx16.ptr != 0 {
                poison_bf16(g, dx16);
            }
            g.k.rmsnorm_backward_from_xhat(args.0, dx16, args.1, args.2, args.3, args.4, args.5, n, hidden, accumulate)
                .unwrap();
        };
        // dx16 is the cast kernel's bf16 of the dx just stored, bit for bit (the engine runs
        // the GEMMs on it in place of that cast's output).
        let dx16_is_the_cast = |what: &str| {
            poison_bf16(g, g.ptr(&cast_d));
            g.k.cast_f32_bf16(g.ptr(&cast_d), g.ptr(&dx_d), n * hidden).unwrap();
            let (got, want) = (g.download(g.ptr(&dx16_d)).unwrap(), g.download(g.ptr(&cast_d)).unwrap());
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{tag}: {what}: dx16 differs from cast(dx) in {diff} of {} elements", want.len());
        };
        backward(g.ptr(&dx16_d), false);
        check(&format!("{tag} dx"), &g.download(g.ptr(&dx_d)).unwrap(), &dx);
        check(&format!("{tag} dw"), &g.download(g.ptr(&dw_d)).unwrap(), &dw);
        dx16_is_the_cast("dx =");
        // Accumulating into the residual gradient: dx += …, dw += … again; dx16 of the sum.
        backward(g.ptr(&dx16_d), true);
        let times = |k: f32, v: &[f32]| v.iter().map(|x| k * x).collect::<Vec<_>>();
        check(&format!("{tag} dx accumulated"), &g.download(g.ptr(&dx_d)).unwrap(), &times(2.0, &dx));
        check(&format!("{tag} dw accumulated"), &g.download(g.ptr(&dw_d)).unwrap(), &times(2.0, &dw));
        dx16_is_the_cast("dx +=");
        // Without dx16 (layer 0's input norm): dx and dw as before, the old dx16 untouched.
        let before = g.download(g.ptr(&dx16_d)).unwrap();
        backward(null(), true);
        check(&format!("{tag} dx accumulated, no dx16"), &g.download(g.ptr(&dx_d)).unwrap(), &times(3.0, &dx));
        check(&format!("{tag} dw accumulated, no dx16"), &g.download(g.ptr(&dw_d)).unwrap(), &times(3.0, &dw));
        assert_eq!(g.download(g.ptr(&dx16_d)).unwrap(), before, "{tag}: dx16 written with a null dx16");
    }
}

// --- rope

pub fn rope(g: &Gpu) {
    // head_dim 64: the 16-byte path; 12: element by element. Row stride wider than the heads
    // (a fused qkv buffer) on the second case.
    for (seed, n, nh, hd, extra) in [(1u64, 33usize, 4usize, 64usize, 0usize), (2, 17, 3, 12, 24), (3, 5, 2, 128, 8)] {
        let mut rng = SplitMix64(seed);
        let stride = nh * hd + extra;
        let positions: Vec<u32> = (0..n as u32).map(|i| i * 37 % 5000).collect();
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let x = bf(&rng.normals(n * stride, 1.0));
        let dy = rng.normals(n * stride, 1.0);
        let compact = |v: &[f32]| -> Vec<f32> { v.chunks(stride).flat_map(|r| r[..nh * hd].to_vec()).collect() };
        let mut want = compact(&x);
        ops::rope_forward(&mut want, &positions, &inv_freq, nh, hd);
        let mut dwant = compact(&dy);
        ops::rope_backward(&mut dwant, &positions, &inv_freq, nh, hd);

        let x_d = g.upload(&to_bf16(&x)).unwrap();
        let pos_d = g.upload(&positions).unwrap();
        let f_d = g.upload(&inv_freq).unwrap();
        g.k.rope_forward(g.ptr(&x_d), g.ptr(&pos_d), g.ptr(&f_d), n, nh, hd, stride).unwrap();
        check(&format!("rope n={n} h={nh} d={hd} forward"), &compact(&down_bf16(g, g.ptr(&x_d))), &want);

        let dy_d = g.upload(&dy).unwrap();
        let dx_d = g.alloc::<Bf16>(n * stride).unwrap();
        poison_bf16(g, g.ptr(&dx_d));
        g.k.rope_backward(g.ptr(&dx_d), g.ptr(&dy_d), g.ptr(&pos_d), g.ptr(&f_d), n, nh, hd, stride, stride).unwrap();
        check(&format!("rope n={n} h={nh} d={hd} backward"), &compact(&down_bf16(g, g.ptr(&dx_d))), &dwant);

        // The strided copy (dv's, in the engine): every value of dy rounded once to bf16.
        let zero_d = g.upload(&vec![0f32; hd / 2]).unwrap();
        poison_bf16(g, g.ptr(&dx_d));
        g.k.copy_strided_f32_bf16(g.ptr(&dx_d), g.ptr(&dy_d), g.ptr(&pos_d), g.ptr(&zero_d), n, nh, hd, stride, stride)
            .unwrap();
        let copied: Vec<f32> = compact(&dy).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(compact(&down_bf16(g, g.ptr(&dx_d))), copied, "rope n={n} h={nh} d={hd}: copy_strided_f32_bf16");
    }
}

// --- attention

pub fn random_batch(rng: &mut SplitMix64, n_pairs: usize, max_len: usize, layout: Layout) -> PairBatch {
    let len = |rng: &mut SplitMix64| 1 + (rng.next_u64() % max_len as u64) as usize;
    let lengths: Vec<[usize; 3]> = (0..n_pairs).map(|_| [len(rng), len(rng), len(rng)]).collect();
    batch_of(&lengths, layout)
}

/// Pairs of the given (prompt, chosen, rejected) lengths.
pub fn batch_of(lengths: &[[usize; 3]], layout: Layout) -> PairBatch {
    let tokens = |len: usize| (0..len as u32).collect();
    let pairs: Vec<PairExample> = lengths
        .iter()
        .map(|&[p, c, r]| PairExample {
            prompt: tokens(p),
            chosen: tokens(c),
            rejected: tokens(r),
            source: String::new(),
        })
        .collect();
    let refs: Vec<&PairExample> = pairs.iter().collect();
    PairBatch::new(&refs, layout).unwrap()
}

#[allow(clippy::too_many_arguments)] // the case's shape, spelled out at each call
fn attention_case(
    g: &Gpu,
    seed: u64,
    n_pairs: usize,
    max_len: usize,
    layout: Layout,
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let mut rng = SplitMix64(seed);
    let batch = random_batch(&mut rng, n_pairs, max_len, layout);
    attention_batch_case(g, &mut rng, &batch, layout, nh, nkv, hd);
}

/// The kernels against the CPU engine on `batch`, with random q, k, v and dO.
fn attention_batch_case(
    g: &Gpu,
    rng: &mut SplitMix64,
    batch: &PairBatch,
    layout: Layout,
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let n = batch.n_tokens();
    let (qd, kvd) = (nh * hd, nkv * hd);
    let q = bf(&rng.normals(n * qd, 1.0));
    let k = bf(&rng.normals(n * kvd, 1.0));
    let v = bf(&rng.normals(n * kvd, 1.0));
    let dout = bf(&rng.normals(n * qd, 1.0));
    let shape = ops::AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
    let mask = ops::AttnMask::of(batch);
    let (mut out, mut lse) = (vec![0f32; n * qd], vec![0f32; n * nh]);
    ops::attention_forward(&mut out, &mut lse, &q, &k, &v, mask, shape);
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
    ops::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, mask, shape);

    let up16 = |x: &[f32]| g.upload(&to_bf16(x)).unwrap();
    let (q_d, k_d, v_d, do_d) = (up16(&q), up16(&k), up16(&v), up16(&dout));
    let group_d = g.upload(&batch.group).unwrap();
    let branch_d = g.upload(&batch.branch).unwrap();
    let gs_d = g.upload(&batch.group_start).unwrap();
    let m = AttnMaskDev { group: g.ptr(&group_d), branch: g.ptr(&branch_d), group_start: g.ptr(&gs_d) };
    let o_d = g.alloc::<Bf16>(n * qd).unwrap();
    let lse_d = g.alloc::<f32>(n * nh).unwrap();
    let delta_d = g.alloc::<f32>(n * nh).unwrap();
    let dq_d = g.alloc::<f32>(n * qd).unwrap();
    let dk_d = g.alloc::<f32>(n * kvd).unwrap();
    let dv_d = g.alloc::<f32>(n * kvd).unwrap();
    let d = AttnDims {
        n_tokens: n,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        q_stride: qd,
        kv_stride: kvd,
        o_stride: qd,
    };
    poison_bf16(g, g.ptr(&o_d));
    poison_f32(g, g.ptr(&lse_d));
    g.k.attention_forward(g.ptr(&o_d), g.ptr(&lse_d), g.ptr(&q_d), g.ptr(&k_d), g.ptr(&v_d), &m, &d).unwrap();
    let tag = format!("attention {layout:?} n={n} h={nh}/{nkv} d={hd}");
    check(&format!("{tag} out"), &down_bf16(g, g.ptr(&o_d)), &out);
    check_within(&format!("{tag} lse"), &g.download(g.ptr(&lse_d)).unwrap(), &lse, F32_TOL);

    for p in [g.ptr(&delta_d), g.ptr(&dq_d), g.ptr(&dk_d), g.ptr(&dv_d)] {
        poison_f32(g, p);
    }
    g.k.attention_backward_delta(g.ptr(&delta_d), g.ptr(&do_d), g.ptr(&o_d), &d).unwrap();
    g.k.attention_backward(
        g.ptr(&dq_d),
        g.ptr(&dk_d),
        g.ptr(&dv_d),
        qd,
        kvd,
        g.ptr(&do_d),
        g.ptr(&q_d),
        g.ptr(&k_d),
        g.ptr(&v_d),
        g.ptr(&lse_d),
        g.ptr(&delta_d),
        &m,
        &d,
    )
    .unwrap();
    check(&format!("{tag} dq"), &g.download(g.ptr(&dq_d)).unwrap(), &dq);
    check(&format!("{tag} dk"), &g.download(g.ptr(&dk_d)).unwrap(), &dk);
    check(&format!("{tag} dv"), &g.download(g.ptr(&dv_d)).unwrap(), &dv);
}

/// Attention forward and backward on random packed batches.
pub fn attention(g: &Gpu) {
    // (seed, pairs, max part length, layout, heads, kv heads, head dim): lengths are random,
    // so token counts are odd and not multiples of the 64-row tiles; several pairs packed.
    let cases = [
        (1, 1, 5, Layout::Shared, 2, 2, 64),
        (2, 3, 40, Layout::Shared, 4, 2, 64),
        (3, 4, 70, Layout::Shared, 8, 2, 128),
        (4, 2, 100, Layout::Shared, 4, 1, 128),
        (5, 5, 30, Layout::Concatenated, 4, 4, 64),
        (6, 3, 50, Layout::Shared, 4, 4, 32),
        (7, 1, 200, Layout::Shared, 2, 1, 64),
        (8, 3, 25, Layout::Shared, 4, 1, 16),
    ];
    for (seed, pairs, len, layout, nh, nkv, hd) in cases {
        attention_case(g, seed, pairs, len, layout, nh, nkv, hd);
    }
    // Segments of whole 64-token tiles, as in the benchmark's shapes: most warps' rows and
    // tiles' keys share one (group, branch), the kernels' unmasked and causal-only paths
    // (the random lengths above mostly take the general, per-element one); the second
    // pair starts at token 320, inside a 128-query block, and its last segment ends
    // mid-tile.
    let lengths = [[64, 128, 128], [128, 64, 150]];
    for (seed, nh, nkv, hd) in [(9, 4, 2, 64), (10, 2, 1, 128)] {
        let mut rng = SplitMix64(seed);
        attention_batch_case(g, &mut rng, &batch_of(&lengths, Layout::Shared), Layout::Shared, nh, nkv, hd);
    }
}

// --- swiglu

/// `[rows, 2·inter]` with `a` in each row's first `inter` columns and `b` in the rest: the
/// layout of the engine's fused gate|up GEMM output.
fn side_by_side(a: &[f32], b: &[f32], inter: usize) -> Vec<f32> {
    a.chunks(inter).zip(b.chunks(inter)).flat_map(|(ra, rb)| ra.iter().chain(rb).copied()).collect()
}

pub fn swiglu(g: &Gpu) {
    swiglu_backward_out_is_the_forwards(g);
    let mut rng = SplitMix64(3);
    // (rows, inter): inter = 24 is three 8-column groups (a gate/up boundary mix-up or a
    // row stride of inter instead of 2·inter shows at once); 2056 is 257 groups, so the
    // second column block of each row has one live thread; 1 row of 8, the smallest.
    for (rows, inter) in [(1usize, 8usize), (5, 24), (33, 2056)] {
        let count = rows * inter;
        let gate = bf(&rng.normals(count, 2.0));
        let up = bf(&rng.normals(count, 1.0));
        let dout = bf(&rng.normals(count, 1.0));
        let mut out = vec![0f32; count];
        ops::swiglu_forward(&mut out, &gate, &up);
        let (mut dg, mut du) = (vec![0f32; count], vec![0f32; count]);
        ops::swiglu_backward(&mut dg, &mut du, &dout, &gate, &up);
        let gu_d = g.upload(&to_bf16(&side_by_side(&gate, &up, inter))).unwrap();
        let d_d = g.upload(&to_bf16(&dout)).unwrap();
        let (o_d, o2_d, dgu_d) =
            (g.alloc::<Bf16>(count).unwrap(), g.alloc::<Bf16>(count).unwrap(), g.alloc::<Bf16>(2 * count).unwrap());
        let (o, o2, dgu) = (g.ptr(&o_d), g.ptr(&o2_d), g.ptr(&dgu_d));
        for p in [o, o2, dgu] {
            poison_bf16(g, p);
        }
        let tag = format!("swiglu rows={rows} inter={inter}");
        g.k.swiglu_forward(o, g.ptr(&gu_d), rows, inter).unwrap();
        g.k.swiglu_backward(dgu, o2, g.ptr(&d_d), g.ptr(&gu_d), rows, inter).unwrap();
        check(&format!("{tag} out"), &down_bf16(g, o), &out);
        assert_eq!(g.download(o2).unwrap(), g.download(o).unwrap(), "{tag}: backward's out differs");
        // dgate and dup checked apart, each in its column block of every row.
        let got = down_bf16(g, dgu);
        let block = |half: usize| -> Vec<f32> {
            got.chunks(2 * inter).flat_map(|r| r[half * inter..(half + 1) * inter].to_vec()).collect()
        };
        check(&format!("{tag} dgate"), &block(0), &dg);
        check(&format!("{tag} dup"), &block(1), &du);
    }
}

/// The engine keeps swiglu_backward's copy of act in place of the forward's: the same
/// bits. A different f32 rounding (a reassociated product changes ~1/3 of the f32
/// results by an ulp) shows in bf16 only where the value sits within an ulp of a bf16
/// rounding midpoint, ~2^-16 of those: 2M elements give ~10 such flips, where the
/// 65K of `swiglu` gave 0–2.
fn swiglu_backward_out_is_the_forwards(g: &Gpu) {
    let (rows, inter) = (683usize, 3072usize); // 2.1M outputs
    let count = rows * inter;
    let mut rng = SplitMix64(31);
    let gate = rng.normals(count, 2.0);
    let up = rng.normals(count, 1.0);
    let gu_d = g.upload(&to_bf16(&side_by_side(&gate, &up, inter))).unwrap();
    let dout_d = g.upload(&to_bf16(&rng.normals(count, 1.0))).unwrap();
    let (gu, dout) = (g.ptr(&gu_d), g.ptr(&dout_d));
    let outs = [count, count, 2 * count].map(|len| g.alloc::<Bf16>(len).unwrap());
    let [o, o2, dgu] = outs.each_ref().map(|b| g.ptr(b));
    g.k.swiglu_forward(o, gu, rows, inter).unwrap();
    g.k.swiglu_backward(dgu, o2, dout, gu, rows, inter).unwrap();
    let (a, b) = (g.download(o2).unwrap(), g.download(o).unwrap());
    let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(diff, 0, "swiglu n={count}: backward's out differs from the forward's in {diff} elements");
}

// --- logprobs (+ the LM-head GEMMs around it)

pub fn logprobs(g: &Gpu) {
    for (seed, pairs, vocab, hidden) in [(1u64, 2usize, 1000usize, 64usize), (2, 3, 4099, 128), (3, 1, 32000, 64)] {
        let mut rng = SplitMix64(seed);
        let batch = random_batch(&mut rng, pairs, 20, Layout::Shared);
        // Real tokens below the vocabulary; a shared first token on some pairs makes a row
        // whose two targets are the same column.
        let mut targets = batch.targets.clone();
        for t in &mut targets {
            t.token = (rng.next_u64() % vocab as u64) as u32;
        }
        let plan = sdpo::data::LogpPlan::new(&targets);
        let n = batch.n_tokens();
        let x = bf(&rng.normals(n * hidden, 1.0));
        let w = bf(&rng.normals(vocab * hidden, 0.5));
        let dlogp = rng.normals(targets.len(), 1.0);
        let (mut logp, mut lse) = (vec![0f32; targets.len()], vec![0f32; plan.rows.len()]);
        ops::logprobs_forward_with_head(&mut logp, &mut lse, &x, &w, &plan, hidden, vocab);
        let (mut dx, mut dw) = (vec![0f32; n * hidden], vec![0f32; vocab * hidden]);
        ops::logprobs_backward_with_head(&mut dx, &mut dw, &dlogp, &x, &w, &lse, &plan, hidden, vocab);

        // The kernel's input: logits of the plan's rows (computed here in f32, the CPU way).
        let rows = plan.rows.len();
        let xr: Vec<f32> =
            plan.rows.iter().flat_map(|&r| x[r as usize * hidden..(r as usize + 1) * hidden].to_vec()).collect();
        let mut logits = vec![0f32; rows * vocab];
        ops::linear_forward(&mut logits, &xr, &w, rows, hidden, vocab);
        let tgt = plan.row_tokens();
        let dl = plan.to_rows(&dlogp, 0.0);
        let logits_d = g.upload(&logits).unwrap();
        let tgt_d = g.upload(&tgt).unwrap();
        let dl_d = g.upload(&dl).unwrap();
        let logp_d = g.alloc::<f32>(2 * rows).unwrap();
        let lse_d = g.alloc::<f32>(rows).unwrap();
        let probs_d = g.alloc::<Bf16>(rows * vocab).unwrap();
        let tag = format!("logprobs rows={rows} V={vocab}");
        // With lse and without probs, then as the engine trains: probs and no lse (whose
        // buffer must stay poisoned).
        for with_probs in [false, true] {
            poison_f32(g, g.ptr(&logp_d));
            poison_f32(g, g.ptr(&lse_d));
            poison_bf16(g, g.ptr(&probs_d));
            let (p, ls) = if with_probs { (g.ptr(&probs_d), null()) } else { (null(), g.ptr(&lse_d)) };
            let (lp, z, tg) = (g.ptr(&logp_d), g.ptr(&logits_d), g.ptr(&tgt_d));
            g.k.logprobs_forward(lp, ls, p, z, tg, rows, vocab, vocab, vocab).unwrap();
            let row_logp = g.download(g.ptr(&logp_d)).unwrap();
            check(&format!("{tag} logp"), &plan.to_targets(&row_logp), &logp);
            let lse_got = g.download(g.ptr(&lse_d)).unwrap();
            if with_probs {
                assert!(lse_got.iter().all(|x| x.is_nan()), "{tag}: lse written through a null pointer");
            } else {
                check_within(&format!("{tag} lse"), &lse_got, &lse, F32_TOL);
            }
        }
        // probs against the CPU op's lse.
        let want: Vec<f32> =
            logits.chunks(vocab).zip(&lse).flat_map(|(z, &l)| z.iter().map(move |&x| (x - l).exp())).collect();
        check(&format!("{tag} probs"), &down_bf16(g, g.ptr(&probs_d)), &want);

        let a = (g.ptr(&probs_d), g.ptr(&logp_d), g.ptr(&tgt_d), g.ptr(&dl_d));
        g.k.logprobs_backward(a.0, a.1, a.2, a.3, rows, vocab, vocab).unwrap();
        let dlogits = down_bf16(g, g.ptr(&probs_d));
        // Back through the head on the host, to land on the CPU op's outputs.
        let (mut dxr, mut dw_got) = (vec![0f32; rows * hidden], vec![0f32; vocab * hidden]);
        ops::linear_backward(&mut dxr, &mut dw_got, &dlogits, &xr, &w, rows, hidden, vocab, false);
        let mut dx_got = vec![0f32; n * hidden];
        for (j, &r) in plan.rows.iter().enumerate() {
            dx_got[r as usize * hidden..(r as usize + 1) * hidden].copy_from_slice(&dxr[j * hidden..(j + 1) * hidden]);
        }
        check(&format!("{tag} dx (via dlogits)"), &dx_got, &dx);
        check(&format!("{tag} dw (via dlogits)"), &dw_got, &dw);
    }
    logprobs_padded_rows(g);
}

/// The kernels' 16-byte paths with rows padded past V (ld, ld_p > V, multiples of 8) and
/// every tail at once: V = 2·(4·512)·4 + 600·4 + 3 has two full groups of 4 float4 per
/// thread, 600 float4 left over and 3 scalar columns (for the bf16 passes: one full group
/// of 4 8-column vectors, 300 left over, 3 scalar columns). The padding holds NaN (a read
/// past V poisons lse) and the probs/dlogits padding must stay poisoned (a write past V).
/// Reference in f64 straight from the formulas in logprobs.cu; targets: a repeated tail
/// column, one in the left-over float4s with no second target, and no first target.
fn logprobs_padded_rows(g: &Gpu) {
    let (rows, vocab, ld, ld_p) = (3usize, 18787usize, 18792usize, 18800usize);
    let mut rng = SplitMix64(4);
    let mut logits = vec![f32::NAN; rows * ld];
    for r in 0..rows {
        logits[r * ld..r * ld + vocab].copy_from_slice(&rng.normals(vocab, 2.0));
    }
    let tgt = [vocab as i32 - 1, vocab as i32 - 1, 16401, -1, -1, 0];
    // Every row's model is confident: p ≈ 0.99 on its (first) target, where bf16 p (spacing
    // 2^-8 near 1) would put 1 − p off by up to 20%; the backward must use the f32 log-prob
    // there. The targets sit in the scalar tail (row 0, both targets), the left-over
    // vectors (row 1) and the first full vector group (row 2).
    let confident = [(0usize, vocab - 1), (1, 16401), (2, 0)];
    for &(r, t) in &confident {
        let z = &mut logits[r * ld..r * ld + vocab];
        let others: f64 = z.iter().enumerate().filter(|&(v, _)| v != t).map(|(_, &x)| (x as f64).exp()).sum();
        z[t] = (99.0 * others).ln() as f32;
    }
    let dl = rng.normals(2 * rows, 1.0);
    let (mut logp, mut lse) = (vec![0f32; 2 * rows], vec![0f32; rows]);
    let (mut p, mut dz) = (vec![0f32; rows * vocab], vec![0f32; rows * vocab]);
    for r in 0..rows {
        let z = &logits[r * ld..r * ld + vocab];
        let l = z.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        lse[r] = l as f32;
        let mut gsum = 0f64;
        for j in 0..2 {
            let t = tgt[2 * r + j];
            if t >= 0 {
                logp[2 * r + j] = (z[t as usize] as f64 - l) as f32;
                gsum += dl[2 * r + j] as f64;
            }
        }
        for v in 0..vocab {
            let hit: f64 = (0..2).filter(|&j| tgt[2 * r + j] == v as i32).map(|j| dl[2 * r + j] as f64).sum();
            p[r * vocab + v] = (z[v] as f64 - l).exp() as f32;
            dz[r * vocab + v] = (hit - gsum * (z[v] as f64 - l).exp()) as f32;
        }
    }
    let (logits_d, tgt_d, dl_d) = (g.upload(&logits).unwrap(), g.upload(&tgt).unwrap(), g.upload(&dl).unwrap());
    let (logp_d, lse_d) = (g.alloc::<f32>(2 * rows).unwrap(), g.alloc::<f32>(rows).unwrap());
    let probs_d = g.alloc::<Bf16>(rows * ld_p).unwrap();
    poison_f32(g, g.ptr(&logp_d));
    poison_f32(g, g.ptr(&lse_d));
    poison_bf16(g, g.ptr(&probs_d));
    let tag = format!("logprobs rows={rows} V={vocab} ld={ld} ld_p={ld_p}");
    let (lp, ls, pp, tg) = (g.ptr(&logp_d), g.ptr(&lse_d), g.ptr(&probs_d), g.ptr(&tgt_d));
    g.k.logprobs_forward(lp, ls, pp, g.ptr(&logits_d), tg, rows, vocab, ld, ld_p).unwrap();
    check(&format!("{tag} logp"), &g.download(lp).unwrap(), &logp);
    check_within(&format!("{tag} lse"), &g.download(ls).unwrap(), &lse, F32_TOL);
    // Row r's first vocab columns; asserts the padding after them is still poisoned.
    let unpadded = |all: Vec<f32>, what: &str| -> Vec<f32> {
        assert!(
            (0..rows).all(|r| all[r * ld_p + vocab..(r + 1) * ld_p].iter().all(|x| x.is_nan())),
            "{tag}: {what} wrote past V"
        );
        (0..rows).flat_map(|r| all[r * ld_p..r * ld_p + vocab].to_vec()).collect()
    };
    check(&format!("{tag} probs"), &unpadded(down_bf16(g, pp), "probs"), &p);
    g.k.logprobs_backward(pp, lp, tg, g.ptr(&dl_d), rows, vocab, ld_p).unwrap();
    let got = unpadded(down_bf16(g, pp), "dlogits");
    check(&format!("{tag} dlogits"), &got, &dz);
    for (r, t) in confident {
        let i = r * vocab + t;
        let e = ((got[i] - dz[i]) as f64 / dz[i] as f64).abs();
        println!("{tag} row {r}: confident target's dlogit {} vs {} (rel err {e:.1e})", got[i], dz[i]);
        assert!(e <= TOL, "{tag} row {r}: confident target's dlogit {} vs {}", got[i], dz[i]);
    }
}

// --- adamw + grad norm

pub fn adamw(g: &Gpu) {
    master_halves_round_trip();
    for (seed, n, wd, scale) in [(1u64, 1001usize, 0.0f64, 1.0f32), (2, 4096, 0.1, 0.37)] {
        let mut rng = SplitMix64(seed);
        let mut p = rng.normals(n, 0.02);
        let p0 = p.clone();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (hi, lo) = split_master(&p);
        let (hi_d, lo_d) = (g.upload(&hi).unwrap(), g.upload(&lo).unwrap());
        let m_d = g.upload(&m).unwrap();
        let v_d = g.upload(&v).unwrap();
        let g_d = g.alloc::<f32>(n).unwrap();
        let (lr, b1, b2, eps) = (1e-3, 0.9, 0.999, 1e-8);
        for step in 1..=3u64 {
            let grad = rng.normals(n, 1e-3);
            let scaled: Vec<f32> = grad.iter().map(|x| x * scale).collect();
            ops::adamw_step(&mut p, &mut m, &mut v, &scaled, lr, b1, b2, eps, wd, step);
            g.write(g.ptr(&g_d), &grad).unwrap();
            let a = (g.ptr(&hi_d), g.ptr(&lo_d), g.ptr(&m_d), g.ptr(&v_d), g.ptr(&g_d));
            g.k.adamw_step(a.0, a.1, a.2, a.3, a.4, scale, lr, b1, b2, eps, wd, step).unwrap();
            let tag = format!("adamw n={n} wd={wd} scale={scale} step {step}");
            let got_hi = g.download(g.ptr(&hi_d)).unwrap();
            let got = join_master(&got_hi, &g.download(g.ptr(&lo_d)).unwrap());
            check_within(&format!("{tag} p"), &got, &p, ADAMW_TOL);
            // The update itself, not drowned by p: a lost or doubled step fails here. Its
            // error is p's times |p|/|p − p₀| (~7 here): F32_TOL (measured ≤ 8.7e-7, H200).
            let delta = |x: &[f32]| x.iter().zip(&p0).map(|(a, b)| a - b).collect::<Vec<_>>();
            check_within(&format!("{tag} p − p₀"), &delta(&got), &delta(&p), F32_TOL);
            check_within(&format!("{tag} m"), &g.download(g.ptr(&m_d)).unwrap(), &m, ADAMW_TOL);
            check_within(&format!("{tag} v"), &g.download(g.ptr(&v_d)).unwrap(), &v, ADAMW_TOL);
            // The working copy against the CPU's p rounded to bf16: one bf16 step (2^-8)
            // apart on values at an exact tie, which the copy rounds away from zero and
            // half::bf16 to even (measured 9.4e-5: about one value in 4,096); 1e-3 allows
            // one value in 15.
            check_within(&format!("{tag} bf16 copy"), &from_bf16(&got_hi), &bf(&p), 1e-3);
            assert!(g.download(g.ptr(&g_d)).unwrap().iter().all(|&x| x == 0.0), "{tag}: gradient not zeroed");
        }
    }
}

/// The master weights' two halves give every fp32 bit pattern back, and the high half is
/// the value rounded to bf16: to nearest, ties away from zero (against half::bf16's
/// nearest-even rounding, which differs only on exact ties).
fn master_halves_round_trip() {
    let mut rng = SplitMix64(11);
    let mut bits: Vec<u32> = (0..200_000).map(|_| rng.next_u64() as u32).collect();
    for e in [0u32, 0x0000_8000, 0x3f80_8000, 0x3f81_8000, 0xbf80_8000, 0x7f7f_ffff, 0x8000_0001, 0x7f80_0000] {
        bits.push(e);
        bits.push(e.wrapping_add(1));
        bits.push(e.wrapping_sub(1));
    }
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let (hi, lo) = split_master(&x);
    let back = join_master(&hi, &lo);
    for (k, &b) in bits.iter().enumerate() {
        assert_eq!(back[k].to_bits(), b, "master {b:#010x} split into {:#06x}, {:#06x}", hi[k], lo[k]);
        if x[k].is_nan() {
            continue;
        }
        let rne = to_bf16(&[x[k]])[0];
        if b & 0xffff == 0x8000 {
            assert_eq!(hi[k] as u32, (b >> 16) + 1, "master {b:#010x}: a tie rounds away from zero");
        } else {
            assert_eq!(hi[k], rne, "master {b:#010x}: the working copy is the nearest bf16");
        }
    }
}

pub fn grad_norm(g: &Gpu) {
    let mut rng = SplitMix64(9);
    let a = rng.normals(100_003, 1.0);
    let b = rng.normals(17, 3.0);
    let want = ops::grad_norm(&[&a, &b]);
    let (a_d, b_d) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    let out = g.alloc::<f64>(1).unwrap();
    let partial = g.alloc::<f64>(g.k.grad_norm_blocks()).unwrap();
    g.k.grad_norm(g.ptr(&out), g.ptr(&partial), g.ptr(&a_d), false).unwrap();
    g.k.grad_norm(g.ptr(&out), g.ptr(&partial), g.ptr(&b_d), true).unwrap();
    let got = g.download(g.ptr(&out)).unwrap()[0].sqrt();
    println!("grad_norm gpu {got} cpu {want}");
    // f64 sums of the same squares: only the order differs.
    assert!((got - want).abs() <= 1e-9 * want, "grad norm {got} vs {want}");
}

// --- casts

pub fn casts(g: &Gpu) {
    let mut rng = SplitMix64(5);
    // The sizes of `swiglu`'s checks, with a tail of 3 (element by element).
    for count in [8usize + 3, 5 * 24 + 3, 33 * 2056 + 3] {
        let want = rng.normals(count, 1.0);
        let x_d = g.upload(&want).unwrap();
        let c16 = g.alloc::<Bf16>(count).unwrap();
        poison_bf16(g, g.ptr(&c16));
        g.k.cast_f32_bf16(g.ptr(&c16), g.ptr(&x_d), count).unwrap();
        let bits = g.download(g.ptr(&c16)).unwrap();
        assert_eq!(bits, to_bf16(&want), "cast f32→bf16 must round to nearest even like half::bf16");
        let c32 = g.alloc::<f32>(count).unwrap();
        poison_f32(g, g.ptr(&c32));
        g.k.cast_bf16_f32(g.ptr(&c32), g.ptr(&c16), count).unwrap();
        assert_eq!(g.download(g.ptr(&c32)).unwrap(), from_bf16(&bits), "cast bf16→f32 is exact");
    }
}

// --- cuBLASLt

/// cuBLASLt against the CPU linear layer (device only: elsewhere the GEMM is host.rs's).
pub fn gemm(g: &mut Gpu) {
    let mut rng = SplitMix64(5);
    for (n, din, dout) in [(1usize, 64usize, 96usize), (37, 128, 200), (300, 512, 1000)] {
        let x = bf(&rng.normals(n * din, 1.0));
        let w = bf(&rng.normals(dout * din, 0.1));
        let dy = bf(&rng.normals(n * dout, 1.0));
        let mut y = vec![0f32; n * dout];
        ops::linear_forward(&mut y, &x, &w, n, din, dout);
        let (mut dx, mut dw) = (vec![0f32; n * din], vec![1f32; dout * din]);
        ops::linear_backward(&mut dx, &mut dw, &dy, &x, &w, n, din, dout, false);

        let (x_d, w_d, dy_d) =
            (g.upload(&to_bf16(&x)).unwrap(), g.upload(&to_bf16(&w)).unwrap(), g.upload(&to_bf16(&dy)).unwrap());
        let y_d = g.alloc::<f32>(n * dout).unwrap();
        let y16_d = g.alloc::<Bf16>(n * dout).unwrap();
        let dx_d = g.alloc::<f32>(n * din).unwrap();
        let dw_d = g.upload(&vec![1f32; dout * din]).unwrap(); // accumulates onto 1s, as dW += does
        poison_f32(g, g.ptr(&y_d));
        poison_f32(g, g.ptr(&dx_d));
        let (xp, wp, dyp) = (g.ptr(&x_d), g.ptr(&w_d), g.ptr(&dy_d));
        let (yp, y16p, dxp, dwp) = (g.ptr(&y_d), g.ptr(&y16_d), g.ptr(&dx_d), g.ptr(&dw_d));
        g.gemm.gemm_f32(yp, xp, wp, &GemmShape::new(n, dout, din, false, true), 1.0, 0.0).unwrap();
        g.gemm.gemm_bf16(y16p, xp, wp, &GemmShape::new(n, dout, din, false, true), 1.0, 0.0).unwrap();
        g.gemm.gemm_f32(dxp, dyp, wp, &GemmShape::new(n, din, dout, false, false), 1.0, 0.0).unwrap();
        g.gemm.gemm_f32(dwp, dyp, xp, &GemmShape::new(dout, din, n, true, false), 1.0, 1.0).unwrap();
        let tag = format!("gemm n={n} in={din} out={dout}");
        check_within(&format!("{tag} y = x·Wᵀ (f32)"), &g.download(yp).unwrap(), &y, F32_TOL);
        check(&format!("{tag} y = x·Wᵀ (bf16)"), &down_bf16(g, y16p), &y);
        check_within(&format!("{tag} dx = dy·W"), &g.download(dxp).unwrap(), &dx, F32_TOL);
        check_within(&format!("{tag} dW += dyᵀ·x"), &g.download(dwp).unwrap(), &dw, F32_TOL);

        // The residual add, in place as the forward does it: r += x·Wᵀ.
        let r = rng.normals(n * dout, 1.0);
        let want: Vec<f32> = y.iter().zip(&r).map(|(a, b)| a + b).collect();
        let r_d = g.upload(&r).unwrap();
        g.gemm.gemm_f32(g.ptr(&r_d), xp, wp, &GemmShape::new(n, dout, din, false, true), 1.0, 1.0).unwrap();
        check_within(&format!("{tag} r += x·Wᵀ"), &g.download(g.ptr(&r_d)).unwrap(), &want, F32_TOL);
    }
}

// --- whole engine

fn check_logps(what: &str, got: &[PairLogps], want: &[PairLogps]) {
    let flat = |v: &[PairLogps]| v.iter().flat_map(|p| [p.chosen as f32, p.rejected as f32]).collect::<Vec<_>>();
    check(what, &flat(got), &flat(want));
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.chosen_tokens, g.rejected_tokens), (w.chosen_tokens, w.rejected_tokens), "{what}: token counts");
    }
}

/// One batch through both engines: log-probs, every gradient tensor accumulated over two
/// micro-batches, the gradient norm, AdamW's first moment, and log-probs again after one
/// AdamW step. `grad_tol` bounds each gradient tensor and the first moment.
fn engines_agree(
    tag: &str,
    cfg: &LlamaConfig,
    weights: &LlamaWeights,
    pairs: &[PairExample],
    layout: Layout,
    grad_tol: f64,
    open: &dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine,
) {
    // The reference computes with the bf16-rounded weights the CUDA engine uses (its fp32
    // masters stay exact): what remains is the rounding of activations and of the
    // attention's P and dS tiles to bf16 (on the simulator: ≤ 1e-2 on the random models,
    // ≤ 1.6e-2 on the hidden-32 fixture).
    let mut rounded = weights.clone();
    for t in rounded.tensors_mut() {
        t.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
    }
    let mut cpu = CpuEngine::new(cfg.clone(), rounded).unwrap();
    let mut gpu = open(cfg.clone(), weights.clone());
    println!("{tag}: {}", gpu.device_name());
    let refs: Vec<&PairExample> = pairs.iter().collect();
    let batch = PairBatch::new(&refs, layout).unwrap();
    let want = cpu.sequence_logps(&batch).unwrap();
    check_logps(&format!("{tag} {layout:?} sequence_logps"), &gpu.sequence_logps(&batch).unwrap(), &want);

    // A reference a little below the policy on chosen and above on rejected, so the
    // loss is away from its symmetric point and every gradient is non-trivial.
    let reference: Vec<PairLogps> =
        want.iter().map(|p| PairLogps { chosen: p.chosen - 0.7, rejected: p.rejected + 0.4, ..*p }).collect();
    // Hinge with its margin open: dL/dπ = ∓β exactly, whatever bf16 does to the log-probs
    // (the sigmoid loss would turn a 1e-3 log-prob difference into a few percent of every
    // gradient, hiding what this test looks for).
    let loss = LossConfig { kind: LossKind::Hinge, beta: 0.1, ..Default::default() };
    // Two micro-batches of half weight: the second adds onto the first's gradients.
    let scale = 0.5 / pairs.len() as f64;
    for _ in 0..2 {
        let pc = cpu.train_step(&batch, &reference, &loss, scale).unwrap();
        let pg = gpu.train_step(&batch, &reference, &loss, scale).unwrap();
        check_logps(&format!("{tag} {layout:?} train_step logps"), &pg, &pc);
    }
    let (gc, gg) = (cpu.grads().unwrap(), gpu.grads().unwrap());
    for ((spec, a), b) in LlamaWeights::specs(cfg).iter().zip(gg.tensors()).zip(gc.tensors()) {
        let e = rel_err(&format!("{tag} grad {}", spec.name), a, b);
        println!("{tag} {layout:?} grad {:<40} rel err {e:.2e}", spec.name);
        assert!(e <= grad_tol, "{tag} {layout:?} grad {}: {e:.3e} > {grad_tol}", spec.name);
    }
    // AdamW in its linear regime: at step 1 the update is lr·g/(|g| + eps), which for the
    // usual eps = 1e-8 is lr·sign(g) — a gradient element near zero whose bf16 rounding
    // flips its sign moves its weight by 2·lr, and the log-probs after the step differ by
    // far more than the gradients do (4.9e-2 measured on the llama3 fixture). With eps = 1
    // (≫ |g|) the update is ≈ lr·g, so the gradient tolerance carries over; lr = 2 makes the
    // step big enough that the log-probs move beyond the tolerance (checked below).
    // AdamW's own arithmetic is checked exactly by `adamw`.
    let opt = AdamWConfig { weight_decay: 0.01, eps: 1.0, max_grad_norm: None, ..Default::default() };
    let (nc, ng) = (cpu.optimizer_step(&opt, 2.0).unwrap(), gpu.optimizer_step(&opt, 2.0).unwrap());
    println!("{tag} {layout:?} grad norm gpu {ng} cpu {nc}");
    assert!(((ng - nc) / nc).abs() <= TOL, "{tag}: grad norm {ng} vs {nc}");
    assert!(gpu.grads().unwrap().tensors().iter().all(|t| t.iter().all(|&x| x == 0.0)), "gradients not zeroed");
    // The first moment after one step is (1 − β1)·g: the gradient again, read back from
    // the optimizer state the engine would checkpoint.
    let (sc, sg) = (cpu.optimizer_state().unwrap().unwrap(), gpu.optimizer_state().unwrap().unwrap());
    assert_eq!(sc.step, sg.step, "{tag}: optimizer step count");
    for ((spec, a), b) in LlamaWeights::specs(cfg).iter().zip(sg.m.tensors()).zip(sc.m.tensors()) {
        let e = rel_err(&format!("{tag} AdamW m {}", spec.name), a, b);
        assert!(e <= grad_tol, "{tag} {layout:?} AdamW m {}: {e:.3e} > {grad_tol}", spec.name);
    }
    let after = cpu.sequence_logps(&batch).unwrap();
    let flat = |v: &[PairLogps]| v.iter().flat_map(|p| [p.chosen as f32, p.rejected as f32]).collect::<Vec<_>>();
    let moved = rel_err("log-probs moved by the step", &flat(&after), &flat(&want));
    println!("{tag} {layout:?} log-probs moved by the AdamW step: {moved:.2e}");
    // At least twice the tolerance (measured 3.3e-2 to 3.4e-1; the engines then differ by
    // 2e-4 to 2.2e-3).
    assert!(moved > 2.0 * TOL, "{tag}: the AdamW step moved the log-probs by only {moved:.2e}");
    check_logps(&format!("{tag} {layout:?} logps after AdamW"), &gpu.sequence_logps(&batch).unwrap(), &after);
    println!("{tag}: peak device memory {:?} bytes", gpu.peak_memory_bytes());
}

fn random_pairs(seed: u64, n: usize, vocab: usize, max_len: usize) -> Vec<PairExample> {
    let mut rng = SplitMix64(seed);
    let seq = |rng: &mut SplitMix64| -> Vec<u32> {
        let len = 1 + (rng.next_u64() % max_len as u64) as usize;
        (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
    };
    (0..n)
        .map(|_| {
            let prompt = seq(&mut rng);
            let chosen = seq(&mut rng);
            // Some pairs share the first answer token: a row with two identical targets.
            let mut rejected = seq(&mut rng);
            if rng.next_u64().is_multiple_of(2) {
                rejected[0] = chosen[0];
            }
            PairExample { prompt, chosen, rejected, source: String::new() }
        })
        .collect()
}

/// A whole step on four random models (GQA + llama3 rope + head dim 64; MHA + tied + head
/// dim 128; GQA + head dim 16; MHA + tied + llama3 rope + head dim 32), both layouts.
/// `open` makes the CUDA engine under test.
pub fn engine_on_random_models(open: &dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine) {
    let configs = [
        // GQA 2, head_dim 64, llama3 rope, untied.
        serde_json::json!({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        // MHA, head_dim 128, tied embeddings.
        serde_json::json!({"hidden_size": 256, "intermediate_size": 344, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 515, "tie_word_embeddings": true}),
        // GQA 2, head_dim 16, default rope, untied.
        serde_json::json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 203,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0}),
        // MHA, head_dim 32, llama3 rope, tied.
        serde_json::json!({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 150, "tie_word_embeddings": true,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        // Model 2 with a vocabulary of 8000: the softmax outgrows the backward's buffers, so
        // the layers' working and backward buffers lie inside its memory, as at Llama
        // sizes (the models above have it the other way round).
        serde_json::json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 8000,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0}),
    ];
    for (i, c) in configs.into_iter().enumerate() {
        let cfg = LlamaConfig::from_json(c).unwrap();
        // The usual initialisation (std 0.02), norm weights away from exactly 1 so their
        // gradients matter. (Larger weights mean larger logits, whose bf16 rounding moves
        // the softmax more: 5× gave ~1.3e-2.)
        let mut w = LlamaWeights::random(&cfg, 7 + i as u64);
        let mut r = SplitMix64(100 + i as u64);
        for (s, t) in LlamaWeights::specs(&cfg).iter().zip(w.tensors_mut()) {
            if s.name.contains("norm") {
                t.iter_mut().for_each(|x| *x = 1.0 + 0.1 * r.normal());
            }
        }
        let pairs = random_pairs(11 + i as u64, 5, cfg.vocab_size, 90);
        // Models 0, 1 and 3 run the LM head in several logits chunks (the default at these
        // vocabularies is one), the last one partial; model 0's vocabulary (1000) takes the
        // kernels' vector paths, 515 and 150 the scalar ones.
        let chunked = |c: LlamaConfig, w: LlamaWeights| {
            let mut e = open(c, w);
            e.set_head_chunk_rows(64);
            e
        };
        let open_i: &dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine = if i != 2 { &chunked } else { open };
        for layout in [Layout::Shared, Layout::Concatenated] {
            engines_agree(&format!("random model {i}"), &cfg, &w, &pairs, layout, TOL, open_i);
        }
    }
}

/// tests/fixtures under the working directory (the GPU host runs the prebuilt binary from
/// the repository root, elsewhere than where it was built), else where it was built.
pub fn fixture(rel: &str) -> PathBuf {
    let local = Path::new("tests/fixtures");
    let root =
        if local.is_dir() { local.to_path_buf() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures") };
    root.join(rel)
}

/// A whole step on the fixture models the CUDA engine supports, both layouts.
pub fn engine_on_fixtures(open: &dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine) {
    // The fixtures the CUDA engine can run (head_dim 16 and multiples of 8); the others
    // (head_dim 8, intermediate 52) are refused by CudaEngine (tests/kernel_sim.rs).
    let mut ran = 0;
    for model in ["gqa", "tied", "llama3", "odd", "pad", "eps32"] {
        let cfg = LlamaConfig::from_path(&fixture(&format!("{model}/policy"))).unwrap();
        let w = LlamaWeights::load(&fixture(&format!("{model}/policy")), &cfg).unwrap();
        if let Some(why) = sdpo::engine::cuda::model::unsupported(&cfg) {
            println!("fixture {model}: not for the CUDA engine ({why})");
            continue;
        }
        let pairs = read_pairs(&fixture(&format!("{model}/pairs.jsonl")), cfg.vocab_size).unwrap();
        for layout in [Layout::Shared, Layout::Concatenated] {
            // hidden_size 32: activation rounding averages over few terms; ≤ 1.6e-2 measured.
            engines_agree(&format!("fixture {model}"), &cfg, &w, &pairs, layout, 2e-2, open);
        }
        ran += 1;
    }
    assert!(ran >= 1, "no fixture model fits the CUDA engine");
}

// --- a 2-step sDPO run of the demo

/// The most bf16 rounding changes a value by, relative (half its widest spacing, 2^-7): the
/// least a bf16 engine can be expected to agree to.
const BF16_ROUNDING: f64 = 1.0 / 256.0;
/// CPU runs from M_0 perturbed at bf16's size, whose spread sets the tolerances.
const PERTURBED_RUNS: u64 = 8;
/// Tolerance of a logged number: this many times its spread over the perturbed runs, plus
/// a floor of one bf16 rounding of the log-probs behind it. See `sdpo_demo_two_steps`.
const SPREAD_FACTOR: f64 = 6.0;
/// Tolerance of the weight changes M_t − M_0: this many times their spread.
const WEIGHT_SPREAD_FACTOR: f64 = 2.0;

/// `w` with every weight scaled by 1 + u·2^-8, u uniform in [−1, 1], from draw `draw`.
fn perturbed(w: &LlamaWeights, draw: u64) -> LlamaWeights {
    let mut rng = SplitMix64(1000 + draw);
    let mut moved = w.clone();
    for t in moved.tensors_mut() {
        t.iter_mut().for_each(|x| *x *= 1.0 + (2.0 * rng.uniform() as f32 - 1.0) * BF16_ROUNDING as f32);
    }
    moved
}

/// Per update, in order: the (policy, reference) log-probs of every pair it trained on.
type Noted = std::rc::Rc<std::cell::RefCell<Vec<Vec<(PairLogps, PairLogps)>>>>;

/// The CPU engine, noting what each update trained on: metrics.jsonl holds means, and
/// whether a reward accuracy may differ depends on the pairs' margins.
struct Noting {
    inner: CpuEngine,
    pending: Vec<(PairLogps, PairLogps)>,
    noted: Noted,
}

impl Engine for Noting {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn sequence_logps(&mut self, batch: &PairBatch) -> sdpo::Result<Vec<PairLogps>> {
        self.inner.sequence_logps(batch)
    }
    fn train_step(
        &mut self,
        batch: &PairBatch,
        reference: &[PairLogps],
        loss: &LossConfig,
        loss_scale: f64,
    ) -> sdpo::Result<Vec<PairLogps>> {
        let policy = self.inner.train_step(batch, reference, loss, loss_scale)?;
        self.pending.extend(policy.iter().copied().zip(reference.iter().copied()));
        Ok(policy)
    }
    fn optimizer_step(&mut self, opt: &AdamWConfig, lr: f64) -> sdpo::Result<f64> {
        self.noted.borrow_mut().push(std::mem::take(&mut self.pending));
        self.inner.optimizer_step(opt, lr)
    }
    fn zero_grads(&mut self) {
        self.inner.zero_grads()
    }
    fn grads(&self) -> sdpo::Result<LlamaWeights> {
        self.inner.grads()
    }
    fn weights(&self) -> sdpo::Result<LlamaWeights> {
        self.inner.weights()
    }
    fn set_weights(&mut self, w: &LlamaWeights) -> sdpo::Result<()> {
        self.inner.set_weights(w)
    }
    fn optimizer_state(&self) -> sdpo::Result<Option<sdpo::engine::AdamState>> {
        self.inner.optimizer_state()
    }
    fn set_optimizer_state(&mut self, state: Option<sdpo::engine::AdamState>) -> sdpo::Result<()> {
        self.inner.set_optimizer_state(state)
    }
}

/// One sDPO run: its summary, metrics.jsonl's lines, its models M_1 and M_2 and, on the
/// CPU engine, what its updates trained on.
struct DemoRun {
    summary: sdpo::sdpo::RunSummary,
    lines: Vec<serde_json::Value>,
    steps: Vec<LlamaWeights>,
    noted: Vec<Vec<(PairLogps, PairLogps)>>,
}

impl DemoRun {
    /// metrics.jsonl's lines that have `key` (update lines, eval lines).
    fn lines_with(&self, key: &str) -> Vec<&serde_json::Value> {
        self.lines.iter().filter(|v| v.get(key).is_some()).collect()
    }
}

/// Runs sDPO into `out`, on the CUDA engine `open` makes or, without one, on the CPU engine.
fn demo_run(
    opts: &sdpo::sdpo::SdpoOptions,
    out: &Path,
    m0: &LlamaWeights,
    data: &sdpo::demo::DemoData,
    cuda: Option<&dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine>,
) -> DemoRun {
    let noted = Noted::default();
    let factory = |c: &LlamaConfig, w: LlamaWeights, _: Option<sdpo::lora::Adapter>| -> sdpo::Result<Box<dyn Engine>> {
        Ok(match cuda {
            Some(open) => {
                let engine = open(c.clone(), w);
                println!("CUDA engine on {}", engine.device_name());
                Box::new(engine)
            }
            None => {
                let inner = CpuEngine::new(c.clone(), w)?;
                Box::new(Noting { inner, pending: Vec::new(), noted: noted.clone() })
            }
        })
    };
    let opts = sdpo::sdpo::SdpoOptions { out: out.to_path_buf(), ..opts.clone() };
    let cfg = LlamaConfig::from_json(serde_json::from_str(sdpo::demo::CONFIG_JSON).unwrap()).unwrap();
    let t0 = std::time::Instant::now();
    let summary = sdpo::sdpo::run(&opts, &cfg, m0.clone(), &data.train, &data.eval, &factory)
        .unwrap_or_else(|e| panic!("sDPO run into {}: {e}", out.display()));
    let seconds = t0.elapsed().as_secs_f64();
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let step = |t: usize| LlamaWeights::load(&out.join(format!("step-{t}")), &cfg).unwrap();
    let steps = vec![step(1), step(2)];
    assert_eq!(summary.final_weights.as_ref(), steps.last(), "{}: the final weights are M_2", out.display());
    if cuda.is_some() {
        println!("CUDA run: {seconds:.2}s");
    }
    let lines = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    DemoRun { summary, lines, steps, noted: noted.take() }
}

/// ‖(a − m0) − (b − m0)‖ / ‖b − m0‖: how far two trainings from `m0` ended apart, as a
/// share of how far `b` moved.
fn change_rel_err(a: &LlamaWeights, b: &LlamaWeights, m0: &LlamaWeights) -> f64 {
    let flat = |w: &LlamaWeights| -> Vec<f32> {
        w.tensors().iter().zip(m0.tensors()).flat_map(|(t, z)| t.iter().zip(z.iter()).map(|(x, y)| x - y)).collect()
    };
    rel_err("weight change", &flat(a), &flat(b))
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

/// How far `others` lie from `main` at most.
fn spread(main: f64, others: impl Iterator<Item = f64>) -> f64 {
    others.map(|x| (x - main).abs()).fold(0.0, f64::max)
}

/// |cuda − cpu| ≤ `SPREAD_FACTOR` · spread + floor.
fn within(what: &str, cuda: f64, cpu: f64, spread: f64, floor: f64) {
    let (d, tol) = ((cuda - cpu).abs(), SPREAD_FACTOR * spread + floor);
    println!("{what:<42} cpu {cpu:>10.5} cuda {cuda:>10.5} |Δ| {d:.2e} spread {spread:.2e} tol {tol:.2e}");
    assert!(d <= tol, "{what}: CUDA {cuda} vs CPU {cpu}: |Δ| = {d:.3e} > {tol:.3e}");
}

/// A share of pairs with a positive value (reward accuracy, γ > 0), given per pair the CPU
/// run's value and its tolerance: the runs may count differently the pairs whose value is
/// within its tolerance of zero. Returns the share's tolerance.
fn share_within(what: &str, cuda: f64, cpu: f64, values_and_tols: &[(f64, f64)]) -> f64 {
    let unsure = values_and_tols.iter().filter(|(v, t)| v.abs() <= *t).count();
    let tol = unsure as f64 / values_and_tols.len() as f64;
    let d = (cuda - cpu).abs();
    println!("{what:<42} cpu {cpu:>10.5} cuda {cuda:>10.5} |Δ| {d:.2e} tol {tol:.2e} ({unsure} pairs near 0)");
    assert!(d <= tol + 1e-9, "{what}: CUDA {cuda} vs CPU {cpu}: |Δ| = {d:.3e} > {tol:.3e}");
    tol
}

/// One bf16 rounding of a pair's two log-probs: the floor of its γ's tolerance.
fn gamma_floor(l: &PairLogps) -> f64 {
    BF16_ROUNDING * (l.chosen.abs() + l.rejected.abs())
}

/// A pair's margin β[(π − ref)_chosen − (π − ref)_rejected].
fn margin(beta: f64, pol: &PairLogps, reference: &PairLogps) -> f64 {
    beta * ((pol.chosen - reference.chosen) - (pol.rejected - reference.rejected))
}

/// A pair's margin on the CPU run and its tolerance, from the same pair's margins on the
/// perturbed runs (`others`) and a floor of one bf16 rounding of its four log-probs.
fn margin_and_tol(
    beta: f64,
    (pol, reference): (&PairLogps, &PairLogps),
    others: impl Iterator<Item = (PairLogps, PairLogps)>,
) -> (f64, f64) {
    let m = margin(beta, pol, reference);
    let size = pol.chosen.abs() + pol.rejected.abs() + reference.chosen.abs() + reference.rejected.abs();
    let s = spread(m, others.map(|(p, r)| margin(beta, &p, &r)));
    (m, SPREAD_FACTOR * s + beta * BF16_ROUNDING * size)
}

/// The built-in demo — its SFT model, its addition pairs, its recipe, its easy-to-hard
/// partition (one chunk per source, ordered by M_0's share of pairs with γ > 0) — shrunk
/// to two sources of 24 pairs (2-digit, then 3-digit sums: two sDPO steps) and 24 eval
/// pairs, run by `sdpo::sdpo::run` on the CPU engine and on the CUDA engine `open` makes.
/// Compared: M_0's γ per pair, the ranking by it (what `--partition difficulty` would
/// cut), the chunks and their order; every update's training metrics; every step's eval
/// numbers; the weights M_1 and M_2.
///
/// Tolerances come from the CPU engine itself: `PERTURBED_RUNS` more CPU runs from M_0 with
/// every weight scaled by 1 + u·2^-8 (u uniform in [−1, 1]: up to bf16's largest rounding
/// error, standing in for the bf16 engine's rounding). How far a number moves over those
/// runs — its spread — is how well bf16 precision determines it, and that varies a lot:
/// M_0's γ of most pairs moves by hundredths of a nat, but that of 87+40 = 127 over the
/// rejected 227 (γ 17.4, resting on one logit gap the hidden state barely resolves) by 1.7,
/// and the bf16 engine gives 19.0 (simulator) and 19.4 (a host emulation with exact attention). Training then
/// amplifies differences: AdamW's first updates are about lr·sign(gradient) per weight, so
/// a weight whose gradient is near zero moves either way; the perturbed runs' weight
/// changes M_t − M_0 end up to 0.19 apart (relative) from the CPU run's, their gradient
/// norms up to 40 %. On the simulator (and a host emulation), CUDA − CPU was a median 1.1
/// and at most 3.7 times a logged number's spread: `SPREAD_FACTOR` 6, plus a floor of one
/// bf16 rounding of the log-probs behind the number, which matters only where policy =
/// reference at a step's start (the CPU runs give exactly zero rewards there, the bf16
/// engine its rounding of two packings of one batch). A share (reward accuracy, γ > 0) may
/// differ by the pairs whose value is within its tolerance, by the same rule, of zero. The
/// weight changes, a norm over all weights and so a steady spread, were 0.05–0.19 apart on
/// the bf16 engine: `WEIGHT_SPREAD_FACTOR` 2 (an untrained run is 1 apart, an unrelated
/// change √2).
///
/// Batches of 8 pairs, 2 epochs: 6 updates per step, the first at the warmup's lr 0. lr
/// 1e-3 instead of the demo's 1e-4: with 5 moving updates per step instead of the demo's
/// 32, the model must still move well beyond bf16's resolution (checked).
pub fn sdpo_demo_two_steps(open: &dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine) {
    use sdpo::partition::PartitionKind;
    use sdpo::sdpo::{ReferenceMode, SdpoOptions};
    let tmp = std::env::temp_dir().join(format!("sdpo-demo-two-steps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let base = tmp.join("base");
    sdpo::demo::write_model_folder(&base).unwrap();
    let cfg = LlamaConfig::from_path(&base).unwrap();
    if let Some(why) = sdpo::engine::cuda::model::unsupported(&cfg) {
        panic!("the demo model does not fit the CUDA engine: {why}");
    }
    // M_0: the demo model rounded to bf16, what the CUDA engine computes with (its fp32
    // masters keep these values), so both runs start from the same model.
    let mut m0 = LlamaWeights::load(&base, &cfg).unwrap();
    for t in m0.tensors_mut() {
        t.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
    }
    // Two of the demo's three sources, so two steps (the eval set keeps all three).
    let mut data = sdpo::demo::demo_data(0, 24, 8, 0);
    data.train.retain(|p| p.source != "1-digit");
    let mut train = sdpo::demo::demo_train_options(0);
    (train.batch_pairs, train.epochs, train.lr) = (8, 2, 1e-3);
    let (beta, budget) = (train.loss.beta, train.micro_batch_tokens);
    assert_eq!(train.layout, Layout::Shared);
    let opts = SdpoOptions {
        train,
        partition: PartitionKind::Sources,
        steps: Some(2),
        length_normalize: false,
        reference: ReferenceMode::Precomputed,
        carry_optimizer: false,
        carry_schedule: false,
        save_every: 0,
        out: PathBuf::new(),
        resume: false,
        tokenizer_from: None,
        quiet: true,
        tensorboard: false,
        lora: None,
    };
    let t0 = std::time::Instant::now();
    let cpu = demo_run(&opts, &tmp.join("cpu"), &m0, &data, None);
    let runs: Vec<DemoRun> = (0..PERTURBED_RUNS)
        .map(|k| demo_run(&opts, &tmp.join(format!("cpu-perturbed-{k}")), &perturbed(&m0, k), &data, None))
        .collect();
    println!("{} CPU runs: {:.2}s", 1 + runs.len(), t0.elapsed().as_secs_f64());
    let gpu = demo_run(&opts, &tmp.join("cuda"), &m0, &data, Some(open));

    // --- the partition: M_0's γ per pair, the ranking by it, the chunks and their order
    let (train_refs, eval_refs): (Vec<&PairExample>, Vec<&PairExample>) =
        (data.train.iter().collect(), data.eval.iter().collect());
    let logps_of = |w: &LlamaWeights, pairs: &[&PairExample]| {
        let mut e = CpuEngine::new(cfg.clone(), w.clone()).unwrap();
        sdpo::train::sequence_logps_all(&mut e, pairs, budget, Layout::Shared, None).unwrap()
    };
    let m0_train = logps_of(&m0, &train_refs);
    let scores = |r: &DemoRun| r.summary.partition.scores.clone().expect("M_0's scores");
    let (sc, sg, others) = (scores(&cpu), scores(&gpu), runs.iter().map(scores).collect::<Vec<_>>());
    let n = data.train.len();
    for i in 0..n {
        assert!((m0_train[i].gamma() - sc[i]).abs() <= 1e-9 * sc[i].abs().max(1.0), "pair {i}: the CPU run's M_0");
    }
    let score_tol: Vec<f64> = (0..n)
        .map(|i| SPREAD_FACTOR * spread(sc[i], others.iter().map(|s| s[i])) + gamma_floor(&m0_train[i]))
        .collect();
    let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let worst = (0..n).map(|i| (sg[i] - sc[i]).abs() / score_tol[i]).fold(0.0, f64::max);
    println!(
        "M_0's γ per pair (partition scores): ‖Δ‖/‖cpu‖ {:.2e}; the worst pair at {worst:.2} of its tolerance",
        rel_err("partition scores", &to32(&sg), &to32(&sc))
    );
    let i = (0..n).max_by(|&a, &b| score_tol[a].total_cmp(&score_tol[b])).unwrap();
    let (p, text) = (&data.train[i], sdpo::demo::decode);
    println!(
        "the least determined: pair {i} ({} {} over {}), M_0's γ CPU {:.3} (spread {:.3}), CUDA {:.3}",
        text(&p.prompt),
        text(&p.chosen),
        text(&p.rejected),
        sc[i],
        spread(sc[i], others.iter().map(|s| s[i])),
        sg[i]
    );
    for i in 0..n {
        let (d, tol) = ((sg[i] - sc[i]).abs(), score_tol[i]);
        assert!(d <= tol, "pair {i}: M_0's γ CUDA {} vs CPU {}: |Δ| {d:.3e} > {tol:.3e}", sg[i], sc[i]);
    }
    // Two pairs may swap ranks only when their CPU γ are within their tolerances.
    let rank = |s: &[f64]| {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let mut r = vec![0usize; n];
        order.iter().enumerate().for_each(|(k, &i)| r[i] = k);
        r
    };
    let (rc, rg) = (rank(&sc), rank(&sg));
    let mut swaps = 0;
    for i in 0..n {
        for j in 0..n {
            if rc[i] < rc[j] && rg[i] > rg[j] {
                swaps += 1;
                let gap = sc[i] - sc[j];
                assert!(gap <= score_tol[i] + score_tol[j], "pairs {i}, {j} swapped ranks, CPU γ {gap:.4} apart");
            }
        }
    }
    println!("ranking by M_0's γ: {swaps} pairs of pairs swapped, each within tolerance");
    // The chunks: one per source, pairs in the data's order, ordered by M_0's share of
    // γ > 0. The order must be the CPU run's, and the CPU run must leave it no room:
    // chunk shares apart by more than their tolerances (or tied with names in order).
    let (pc, pg) = (&cpu.summary.partition, &gpu.summary.partition);
    let names = |p: &sdpo::partition::Partition| p.chunks.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert!(
        runs.iter().all(|r| names(&r.summary.partition) == names(pc)),
        "perturbed CPU runs order the chunks otherwise"
    );
    assert_eq!(pc.chunks.len(), 2);
    let mut ranges = Vec::new();
    for (k, (a, b)) in pc.chunks.iter().zip(&pg.chunks).enumerate() {
        assert_eq!((&a.name, &a.pairs), (&b.name, &b.pairs), "chunk {}", k + 1);
        let tag = format!("chunk {} ({})", k + 1, a.name);
        let gammas: Vec<(f64, f64)> = a.pairs.iter().map(|&i| (sc[i], score_tol[i])).collect();
        let acc = a.accuracy.expect("M_0's share");
        let tol = share_within(&format!("{tag} M_0 share γ > 0"), b.accuracy.unwrap(), acc, &gammas);
        ranges.push(((acc - tol).max(0.0), (acc + tol).min(1.0)));
        let gamma = a.mean_gamma.expect("M_0's mean γ");
        let s = spread(gamma, runs.iter().map(|r| r.summary.partition.chunks[k].mean_gamma.unwrap()));
        let floor = mean(a.pairs.iter().map(|&i| gamma_floor(&m0_train[i])));
        within(&format!("{tag} M_0 mean γ"), b.mean_gamma.unwrap(), gamma, s, floor);
    }
    let (first, second) = (&pc.chunks[0].name, &pc.chunks[1].name);
    let (lo, hi) = (ranges[0].0, ranges[1].1);
    assert!(lo > hi || (lo == hi && first < second), "the chunk order is within rounding: choose other data");

    // --- every update's training metrics
    let numbers = |r: &DemoRun, key: &str| -> Vec<f64> {
        r.lines_with("sdpo/update").iter().map(|v| v[key].as_f64().unwrap()).collect()
    };
    let (uc, ug) = (cpu.lines_with("sdpo/update"), gpu.lines_with("sdpo/update"));
    assert_eq!((uc.len(), ug.len(), cpu.noted.len()), (12, 12, 12), "2 steps × 6 updates, logged and noted");
    for (u, ((c, g), pairs)) in uc.iter().zip(&ug).zip(&cpu.noted).enumerate() {
        for key in ["sdpo/step", "sdpo/update", "sdpo/chunk", "n_pairs", "epoch", "train/learning_rate"] {
            assert_eq!(c[key], g[key], "{key}");
        }
        let (pol, reference): (Vec<PairLogps>, Vec<PairLogps>) = pairs.iter().copied().unzip();
        let again = sdpo::dpo::Metrics::from_pairs(&pol, &reference, &opts.train.loss);
        assert!((again.loss - c["loss"].as_f64().unwrap()).abs() < 1e-12, "the noted pairs are the logged update's");
        let tag = format!("step {} update {}", c["sdpo/step"], c["sdpo/update"]);
        let f = |key: &str| c[key].as_f64().unwrap();
        let compare = |key: &str, floor: f64| {
            let s = spread(f(key), runs.iter().map(|r| numbers(r, key)[u]));
            within(&format!("{tag} {key}"), g[key].as_f64().unwrap(), f(key), s, floor)
        };
        // Floors: one bf16 rounding of the log-probs behind each number (the reference's
        // means from the rewards: ref = π − r/β).
        let (lc, lr) = (f("logps/chosen").abs(), f("logps/rejected").abs());
        let refc = (f("logps/chosen") - f("rewards/chosen") / beta).abs();
        let refr = (f("logps/rejected") - f("rewards/rejected") / beta).abs();
        compare("logps/chosen", BF16_ROUNDING * lc);
        compare("logps/rejected", BF16_ROUNDING * lr);
        compare("rewards/chosen", beta * BF16_ROUNDING * (lc + refc));
        compare("rewards/rejected", beta * BF16_ROUNDING * (lr + refr));
        compare("rewards/margins", beta * BF16_ROUNDING * (lc + refc + lr + refr));
        compare("loss", beta * BF16_ROUNDING * (lc + refc + lr + refr)); // |d(−log σ(m))/dm| ≤ 1
        compare("train/grad_norm", BF16_ROUNDING * f("train/grad_norm"));
        let margins: Vec<(f64, f64)> = (0..pairs.len())
            .map(|p| margin_and_tol(beta, (&pairs[p].0, &pairs[p].1), runs.iter().map(|r| r.noted[u][p])))
            .collect();
        let key = "rewards/accuracies";
        share_within(&format!("{tag} {key}"), g[key].as_f64().unwrap(), f(key), &margins);
    }

    // --- every step's eval, with the CPU run's per-pair eval log-probs of M_0, M_1, M_2
    let eval_numbers = |r: &DemoRun, key: &str| -> Vec<f64> {
        // M_0's line has no rewards (NaN here, never read)
        r.lines_with("eval/mean_gamma").iter().map(|v| v[key].as_f64().unwrap_or(f64::NAN)).collect()
    };
    let (ec, eg) = (cpu.lines_with("eval/mean_gamma"), gpu.lines_with("eval/mean_gamma"));
    assert_eq!((ec.len(), eg.len()), (3, 3), "eval of M_0, M_1, M_2");
    // Per run (the CPU run, then the perturbed ones), per model, per pair.
    let eval_logps = |m0: &LlamaWeights, r: &DemoRun| -> Vec<Vec<PairLogps>> {
        [m0, &r.steps[0], &r.steps[1]].iter().map(|w| logps_of(w, &eval_refs)).collect()
    };
    let ev = eval_logps(&m0, &cpu);
    let ev_runs: Vec<Vec<Vec<PairLogps>>> =
        runs.iter().enumerate().map(|(k, r)| eval_logps(&perturbed(&m0, k as u64), r)).collect();
    for (t, (c, g)) in ec.iter().zip(&eg).enumerate() {
        assert_eq!((&c["sdpo/step"], &c["eval/n_pairs"]), (&g["sdpo/step"], &g["eval/n_pairs"]));
        let f = |key: &str| c[key].as_f64().unwrap();
        let recomputed = mean(ev[t].iter().map(PairLogps::gamma));
        assert!((recomputed - f("eval/mean_gamma")).abs() < 1e-9, "M_{t}'s eval log-probs recomputed");
        let tag = format!("eval M_{t}");
        let s = |key: &str| spread(f(key), runs.iter().map(|r| eval_numbers(r, key)[t]));
        let compare =
            |key: &str, floor: f64| within(&format!("{tag} {key}"), g[key].as_f64().unwrap(), f(key), s(key), floor);
        let (lc, lr) = (f("eval/logps/chosen").abs(), f("eval/logps/rejected").abs());
        compare("eval/mean_gamma", BF16_ROUNDING * (lc + lr));
        compare("eval/logps/chosen", BF16_ROUNDING * lc);
        compare("eval/logps/rejected", BF16_ROUNDING * lr);
        let gammas: Vec<(f64, f64)> = (0..ev[t].len())
            .map(|j| {
                let (p, s) = (&ev[t][j], spread(ev[t][j].gamma(), ev_runs.iter().map(|e| e[t][j].gamma())));
                (p.gamma(), SPREAD_FACTOR * s + gamma_floor(p))
            })
            .collect();
        let key = "eval/gamma_accuracy";
        share_within(&format!("{tag} {key}"), g[key].as_f64().unwrap(), f(key), &gammas);
        if t == 0 {
            continue;
        }
        for (r, suffix) in [(0, ""), (t - 1, "_vs_prev")] {
            let floor = mean(ev[t].iter().zip(&ev[r]).map(|(p, q)| {
                beta * BF16_ROUNDING * (p.chosen.abs() + p.rejected.abs() + q.chosen.abs() + q.rejected.abs())
            }));
            compare(&format!("eval/rewards/margins{suffix}"), floor);
            let margins: Vec<(f64, f64)> = (0..ev[t].len())
                .map(|j| margin_and_tol(beta, (&ev[t][j], &ev[r][j]), ev_runs.iter().map(|e| (e[t][j], e[r][j]))))
                .collect();
            let key = format!("eval/rewards/accuracies{suffix}");
            share_within(&format!("{tag} {key}"), g[&key].as_f64().unwrap(), f(&key), &margins);
        }
    }

    // --- the weights M_1 and M_2: what training changed, which must be well beyond bf16's
    // resolution, or none of the above compared trained models
    for t in 0..2 {
        let (wc, wg) = (&cpu.steps[t], &gpu.steps[t]);
        let e = change_rel_err(wg, wc, &m0);
        let s = runs.iter().map(|r| change_rel_err(&r.steps[t], wc, &m0)).fold(0.0, f64::max);
        let moved = change_rel_err(wc, &m0, &LlamaWeights::zeros(&cfg));
        let tol = WEIGHT_SPREAD_FACTOR * s;
        println!(
            "M_{} − M_0 (‖·‖ {moved:.2e} of ‖M_0‖): CUDA vs CPU rel err {e:.3e} spread {s:.3e} tol {tol:.3e}",
            t + 1
        );
        assert!(
            moved > 2.0 * BF16_ROUNDING,
            "M_{}: training moved the weights by only {moved:.2e} of their norm",
            t + 1
        );
        assert!(e <= tol, "M_{}: the weight changes are {e:.3} apart (relative) > {tol:.3}", t + 1);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A forward-only engine holds the bf16 weights alone (2 bytes per parameter) and still
/// gives back the fp32 weights it was given; once it trains, its results are bit for bit
/// those of an engine that was trainable when its weights were set (the remainder on the
/// device then). Bf16-valued weights keep nothing beside the copy.
pub fn forward_only_engine_trains_as_a_trainable_one(open: &dyn Fn(LlamaConfig, LlamaWeights) -> CudaEngine) {
    let cfg = LlamaConfig::from_json(serde_json::json!({"hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 203, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    .unwrap();
    let params: usize = LlamaWeights::specs(&cfg).iter().map(|s| s.numel().div_ceil(8) * 8).sum();
    let w = LlamaWeights::random(&cfg, 21);
    let pairs = random_pairs(22, 4, cfg.vocab_size, 60);
    let refs: Vec<&PairExample> = pairs.iter().collect();
    let batch = PairBatch::new(&refs, Layout::Shared).unwrap();
    let (loss, opt) = (LossConfig::default(), AdamWConfig::default());
    let bits = |w: &LlamaWeights| w.tensors().iter().flat_map(|t| t.iter().map(|x| x.to_bits())).collect::<Vec<_>>();

    // Built, then a forward: the weights' allocation is the bf16 copy (beside it only the
    // rotary tables' uploads, which `allocated_bytes` does not count, and the grad-norm
    // partials).
    let mut fwd = open(cfg.clone(), w.clone());
    let small = (fwd.allocated_bytes() - 2 * params as u64) as usize;
    assert!(small < 4096, "{} bytes allocated for {params} parameters", fwd.allocated_bytes());
    let reference = fwd.sequence_logps(&batch).unwrap();
    assert_eq!(bits(&fwd.weights().unwrap()), bits(&w), "a forward-only engine's weights are those set");

    // An engine that has trained (the remainder on the device), given `w` afresh.
    let mut trained = open(cfg.clone(), LlamaWeights::random(&cfg, 23));
    trained.train_step(&batch, &reference, &loss, 1.0).unwrap();
    trained.optimizer_step(&opt, 1e-3).unwrap();
    trained.set_weights(&w).unwrap();
    trained.set_optimizer_state(None).unwrap();

    for step in 0..2 {
        let a = fwd.train_step(&batch, &reference, &loss, 1.0).unwrap();
        let b = trained.train_step(&batch, &reference, &loss, 1.0).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "step {step}: policy log-probs");
        let (na, nb) = (fwd.optimizer_step(&opt, 1e-3).unwrap(), trained.optimizer_step(&opt, 1e-3).unwrap());
        assert_eq!(na.to_bits(), nb.to_bits(), "step {step}: gradient norm");
        assert_eq!(bits(&fwd.weights().unwrap()), bits(&trained.weights().unwrap()), "step {step}: weights");
    }

    // Bf16-valued weights: a forward-only engine's weights are its copy widened.
    let mut w16 = w.clone();
    w16.tensors_mut().into_iter().for_each(|t| t.iter_mut().for_each(|x| *x = bf(&[*x])[0]));
    let e = open(cfg.clone(), w16.clone());
    assert_eq!(e.allocated_bytes() as usize, 2 * params + small);
    assert_eq!(bits(&e.weights().unwrap()), bits(&w16));
}
