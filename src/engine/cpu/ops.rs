//! The Llama ops in plain fp32 Rust, one pub function per op, forward and backward side
//! by side, named like the CUDA kernels they are the reference for
//! (`<op>_forward`, `<op>_backward`). Outputs come first, then inputs, then sizes.
//!
//! Layouts (all row-major, one row per token of the batch, `n` rows):
//! - activations `[n, hidden]`; q `[n, n_heads, head_dim]`; k, v `[n, n_kv_heads, head_dim]`;
//! - linear weights `[out, in]` as `nn.Linear` stores them: `y = x·Wᵀ`, `dX = dY·W`, `dW += dYᵀ·X`;
//! - attention's logsumexp `[n, n_heads]`, kept by forward for backward.
//!
//! Gradient rule (as in llm.c): **parameter gradients use `+=`** (they accumulate over
//! micro-batches until the optimizer step), **activation gradients use `=`** (each backward
//! overwrites its output). The one exception is `linear_backward`'s `dx_add` flag, for an
//! input that fans out into several linears (q/k/v, gate/up), whose gradients are summed.
//!
//! Math, matching transformers' fp32 numerics:
//! - RMSNorm: `y = (x · rsqrt(mean(x²) + eps)) · w`
//! - RoPE (half split, `rotate_half`): with `θ_i = pos · inv_freq[i]` (f32) and `d2 = head_dim/2`,
//!   `y_i = x_i cos θ_i − x_{i+d2} sin θ_i`, `y_{i+d2} = x_{i+d2} cos θ_i + x_i sin θ_i`
//! - attention: `softmax(q·kᵀ / sqrt(head_dim))·v` under the pair mask (`PairBatch::attends`);
//!   query head h reads kv head `h / (n_heads / n_kv_heads)` (GQA without copying K/V)
//! - SwiGLU: `silu(gate) · up`, `silu(g) = g / (1 + e^{−g})`
//! - log-probs: `log_softmax(x·W_headᵀ)[token]`, only on the rows that predict a target,
//!   in chunks of rows so full-vocabulary logits never exist for the whole batch
//! - AdamW: exactly `torch.optim.AdamW` (single-tensor path); clipping as `clip_grad_norm_`.
//!
//! How the work is split (rayon's global pool):
//! - linears: `gemm` (row-major, strides for the transposes), threaded inside;
//! - attention: 64-row tiles (`ATTN_TILE`) from each group's start. Forward: one task per
//!   (query tile, head): `S = Q·Kᵀ` and `P·V` as GEMMs over the key tiles the mask does not rule
//!   out (tiles of rejected queries × chosen keys are skipped), the exact mask applied per row
//!   as a few branch runs. Backward: one task per (group, kv head), so dk/dv need no atomics;
//! - elementwise ops: chunks of rows; exp is `exp_f32` (branch-free, vectorises, ≤ 2 ulp) and
//!   the hot loops also run as AVX2 code where the CPU has it (`simd`, bit-identical results);
//! - the LM head: chunks of target rows; backward recomputes each chunk's logits.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::data::LogpPlan;
use crate::engine::profile::{self, Category};

// --- helpers

/// Sum of `a[i]·b[i]`; eight independent accumulators so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `e^x` in f32 to within 2 ulp (Cephes' `expf`: `x = n·ln2 + r` with a two-part ln 2, a
/// degree-6 polynomial for `e^r`, `2^n` put in the exponent bits), branch-free so that loops
/// over it vectorise, which libm's `expf` does not. Below −87.3 it gives 0 (so `e^−∞ = 0`);
/// above 88 it saturates at `e^88` (our arguments are ≤ 0 except in SiLU, where a saturated
/// `e^{−g}` still gives σ(g) = 0 to f32 precision); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer in the low bits
    let xc = x.clamp(-87.336_54, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    let z = e * f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.336_54 {
        0.0
    } else {
        z
    }
}

/// `Σ x`, in eight interleaved partial sums (vectorises; the order differs from a plain loop).
#[inline]
fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let rest: f32 = c.remainder().iter().sum();
    for ch in c {
        for j in 0..8 {
            acc[j] += ch[j];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

/// `Σ e^(z − shift)` accumulated in f64 (eight partial sums), for a log-sum-exp over a
/// vocabulary row.
#[inline]
fn sum_exp_f64(z: &[f32], shift: f32) -> f64 {
    let mut acc = [0f64; 8];
    let c = z.chunks_exact(8);
    let rest: f64 = c.remainder().iter().map(|&v| exp_f32(v - shift) as f64).sum();
    for ch in c {
        for j in 0..8 {
            acc[j] += exp_f32(ch[j] - shift) as f64;
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// Runs `f` compiled for AVX2 when the CPU has it (the crate targets baseline x86-64, whose
/// SSE2 vectors are half as wide). No FMA is enabled, so results are bit-identical either way.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method (not `.0`) so closures capture the whole `SendPtr`, which is `Sync`.
    #[inline]
    fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, `dst` row-major and contiguous, `a` and `b` given
/// by their row and column strides (so transposes cost nothing).
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(dst.len() >= m * n, "matmul: dst too small");
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs, "matmul: lhs too small");
    assert!(n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs, "matmul: rhs too small");
    let threads = rayon::current_num_threads();
    // Below ~32³ multiply-adds the thread hand-off costs more than it saves.
    let par = threads > 1 && m * n * k >= 1 << 15;
    // SAFETY: the asserts above keep every index gemm touches inside the three slices;
    // dst does not alias a or b (distinct borrows).
    unsafe { gemm_raw(dst.as_mut_ptr(), n, accumulate, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, m, n, k, par) }
}

/// `dst (+)= a · b` on raw pointers with row strides for `dst` (column stride 1).
///
/// # Safety
/// Every element addressed through the strides must lie inside its allocation, `dst` must
/// not overlap `a` or `b`, and no other thread may touch the elements of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    m: usize,
    n: usize,
    k: usize,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    let par = if parallel { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

// --- linear (no bias): y = x·Wᵀ

/// `y[n, out] = x[n, in] · W[out, in]ᵀ`
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], n: usize, in_dim: usize, out_dim: usize) {
    let _p = profile::scope(Category::Gemm);
    assert_eq!(w.len(), out_dim * in_dim, "linear_forward: weight shape");
    matmul(y, false, x, in_dim, 1, w, 1, in_dim, n, out_dim, in_dim);
}

/// `dX (=|+=) dY · W` (`+=` when `dx_add`), and `dW += dYᵀ · X`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    in_dim: usize,
    out_dim: usize,
    dx_add: bool,
) {
    let _p = profile::scope(Category::Gemm);
    assert_eq!(dw.len(), out_dim * in_dim, "linear_backward: weight gradient shape");
    matmul(dx, dx_add, dy, out_dim, 1, w, in_dim, 1, n, in_dim, out_dim);
    matmul(dw, true, dy, 1, out_dim, x, in_dim, 1, out_dim, in_dim, n);
}

/// `dX (=|+=) dY · W` alone: the backward through a frozen linear (no weight gradient).
pub fn linear_backward_dx(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    n: usize,
    in_dim: usize,
    out_dim: usize,
    dx_add: bool,
) {
    let _p = profile::scope(Category::Gemm);
    assert_eq!(w.len(), out_dim * in_dim, "linear_backward_dx: weight shape");
    matmul(dx, dx_add, dy, out_dim, 1, w, in_dim, 1, n, in_dim, out_dim);
}

// --- LoRA beside a linear: y += s·(x·Aᵀ)·Bᵀ, A [r, in], B [out, r]

/// `xa[n, r] = x·Aᵀ` (kept for backward), then `y[n, out] += s·xa·Bᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    y: &mut [f32],
    xa: &mut [f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    n: usize,
    in_dim: usize,
    out_dim: usize,
    r: usize,
) {
    let _p = profile::scope(Category::Gemm);
    assert!(a.len() == r * in_dim && b.len() == out_dim * r && xa.len() == n * r, "lora_forward: shapes");
    matmul(xa, false, x, in_dim, 1, a, 1, in_dim, n, r, in_dim);
    let xs: Vec<f32> = xa.iter().map(|v| v * scale).collect();
    matmul(y, true, &xs, r, 1, b, 1, r, n, out_dim, r);
}

/// With `dz = s·dY·B` `[n, r]`: `dB += s·dYᵀ·xa`, `dA += dzᵀ·x`, `dX += (dz·A)∘mask` (always
/// `+=`: the frozen linear's own `dX` comes first). With dropout, `x` is the adapter's
/// input after it (`x∘mask`) and `mask` its scaled mask; without, `mask` is `None`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dx: &mut [f32],
    da: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    xa: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    mask: Option<&[f32]>,
    n: usize,
    in_dim: usize,
    out_dim: usize,
    r: usize,
) {
    let _p = profile::scope(Category::Gemm);
    assert!(da.len() == r * in_dim && db.len() == out_dim * r && xa.len() == n * r, "lora_backward: shapes");
    let mut dz = vec![0f32; n * r];
    matmul(&mut dz, false, dy, out_dim, 1, b, r, 1, n, r, out_dim);
    dz.iter_mut().for_each(|v| *v *= scale);
    let xs: Vec<f32> = xa.iter().map(|v| v * scale).collect();
    matmul(db, true, dy, 1, out_dim, &xs, r, 1, out_dim, r, n);
    matmul(da, true, &dz, 1, r, x, in_dim, 1, r, in_dim, n);
    match mask {
        None => matmul(dx, true, &dz, r, 1, a, in_dim, 1, n, in_dim, r),
        Some(mask) => {
            let mut d = vec![0f32; n * in_dim];
            matmul(&mut d, false, &dz, r, 1, a, in_dim, 1, n, in_dim, r);
            dx.iter_mut().zip(&d).zip(mask).for_each(|((x, d), m)| *x += d * m);
        }
    }
}

// --- embedding

/// `out[t] = embed[tokens[t]]`
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], embed: &[f32], hidden: usize) {
    let _p = profile::scope(Category::NormElementwise);
    out.par_chunks_mut(hidden).zip(tokens.par_iter()).for_each(|(row, &tok)| {
        let t = tok as usize * hidden;
        row.copy_from_slice(&embed[t..t + hidden]);
    });
}

/// `dembed[tokens[t]] += dout[t]` (a scatter-add: a token may repeat), except for the
/// `padding` row, which gets nothing: PyTorch's `nn.Embedding(padding_idx)`, which
/// transformers builds with `pad_token_id`.
pub fn embedding_backward(dembed: &mut [f32], dout: &[f32], tokens: &[u32], hidden: usize, padding: Option<u32>) {
    let _p = profile::scope(Category::NormElementwise);
    for (row, &tok) in dout.chunks_exact(hidden).zip(tokens) {
        if Some(tok) == padding {
            continue;
        }
        let t = tok as usize * hidden;
        for (d, g) in dembed[t..t + hidden].iter_mut().zip(row) {
            *d += g;
        }
    }
}

// --- RMSNorm

/// `out = (x · rstd) · w` per row with `rstd = rsqrt(mean(x²) + eps)`, kept in `rstd[n]`.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], hidden: usize, eps: f32) {
    let _p = profile::scope(Category::NormElementwise);
    out.par_chunks_mut(hidden).zip(rstd.par_iter_mut()).zip(x.par_chunks(hidden)).for_each(|((o, r), xr)| {
        let ms = (xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / hidden as f64) as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        *r = rs;
        for ((oi, &xi), &wi) in o.iter_mut().zip(xr).zip(w) {
            *oi = (xi * rs) * wi;
        }
    });
}

/// `out = x̂ ∘ w` per row from the forward's normalized `x̂ = x·rstd`: the CUDA engine's
/// backward gets its weight gradients' input again this way (from the bf16 x̂ it keeps);
/// the CPU engine keeps `out` itself and does not call it.
pub fn rmsnorm_forward_from_xhat(out: &mut [f32], xhat: &[f32], w: &[f32], hidden: usize) {
    let _p = profile::scope(Category::NormElementwise);
    out.par_chunks_mut(hidden).zip(xhat.par_chunks(hidden)).for_each(|(o, xr)| {
        for ((oi, &xi), &wi) in o.iter_mut().zip(xr).zip(w) {
            *oi = xi * wi;
        }
    });
}

/// With `x̂ = x·rstd`: `dx = rstd · (w∘dy − x̂ · mean(w∘dy∘x̂))` (=), `dw += Σ_rows dy∘x̂`.
pub fn rmsnorm_backward(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], hidden: usize) {
    rmsnorm_backward_opt(dx, Some(dw), dy, x, w, rstd, hidden)
}

/// `rmsnorm_backward`'s `dx` alone: the backward through a frozen norm.
pub fn rmsnorm_backward_dx(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], hidden: usize) {
    rmsnorm_backward_opt(dx, None, dy, x, w, rstd, hidden)
}

fn rmsnorm_backward_opt(
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    hidden: usize,
) {
    let _p = profile::scope(Category::NormElementwise);
    dx.par_chunks_mut(hidden).zip(dy.par_chunks(hidden)).zip(x.par_chunks(hidden)).zip(rstd.par_iter()).for_each(
        |(((dxr, dyr), xr), &rs)| {
            let mut s = 0f64;
            for ((&g, &xi), &wi) in dyr.iter().zip(xr).zip(w) {
                s += (g * wi) as f64 * (xi * rs) as f64;
            }
            let c = (s / hidden as f64) as f32;
            for (((d, &g), &xi), &wi) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                *d = rs * (g * wi - xi * rs * c);
            }
        },
    );
    // dw: columns are independent, rows are summed; split the columns across threads.
    let Some(dw) = dw else { return };
    let n = rstd.len();
    let cols = hidden.div_ceil(rayon::current_num_threads().max(1)).max(64);
    dw.par_chunks_mut(cols).enumerate().for_each(|(ci, dwc)| {
        let c0 = ci * cols;
        for t in 0..n {
            let (dyr, xr, rs) = (&dy[t * hidden + c0..], &x[t * hidden + c0..], rstd[t]);
            for (j, d) in dwc.iter_mut().enumerate() {
                *d += dyr[j] * (xr[j] * rs);
            }
        }
    });
}

// --- RoPE

/// cos and sin of `positions[t] · inv_freq[i]`, `[n, head_dim/2]` each, in f32 as transformers does.
pub fn rope_table(positions: &[u32], inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0f32; positions.len() * half];
    let mut sin = vec![0f32; positions.len() * half];
    cos.par_chunks_mut(half.max(1)).zip(sin.par_chunks_mut(half.max(1))).zip(positions.par_iter()).for_each(
        |((c, s), &p)| {
            for i in 0..half {
                let theta = p as f32 * inv_freq[i];
                c[i] = theta.cos();
                s[i] = theta.sin();
            }
        },
    );
    (cos, sin)
}

/// Rotates every head of `x [n, n_heads, head_dim]` in place by its row's position.
pub fn rope_forward(x: &mut [f32], positions: &[u32], inv_freq: &[f32], n_heads: usize, head_dim: usize) {
    let _p = profile::scope(Category::NormElementwise);
    rope_apply(x, positions, inv_freq, n_heads, head_dim, 1.0);
}

/// The transpose of the rotation (rotation by −θ), in place on the gradient.
pub fn rope_backward(dx: &mut [f32], positions: &[u32], inv_freq: &[f32], n_heads: usize, head_dim: usize) {
    let _p = profile::scope(Category::NormElementwise);
    rope_apply(dx, positions, inv_freq, n_heads, head_dim, -1.0);
}

fn rope_apply(x: &mut [f32], positions: &[u32], inv_freq: &[f32], n_heads: usize, head_dim: usize, sign: f32) {
    let half = head_dim / 2;
    assert_eq!(inv_freq.len(), half, "rope: inv_freq must have head_dim/2 entries");
    assert_eq!(x.len(), positions.len() * n_heads * head_dim, "rope: x shape");
    let (cos, sin) = rope_table(positions, inv_freq);
    x.par_chunks_mut(n_heads * head_dim).enumerate().for_each(|(t, row)| {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for head in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b, si) = (lo[i], hi[i], sign * s[i]);
                lo[i] = a * c[i] - b * si;
                hi[i] = b * c[i] + a * si;
            }
        }
    });
}

// --- attention

/// Which keys a query sees: the pair mask of `PairBatch` (see `PairBatch::attends`).
#[derive(Clone, Copy, Debug)]
pub struct AttnMask<'a> {
    /// `group_start[g]..group_start[g+1]` are the rows of group g.
    pub group_start: &'a [u32],
    /// Per key row.
    pub group: &'a [u32],
    pub branch: &'a [u8],
}

impl<'a> AttnMask<'a> {
    pub fn of(batch: &'a crate::data::PairBatch) -> Self {
        AttnMask { group_start: &batch.group_start, group: &batch.group, branch: &batch.branch }
    }

    fn max_group_len(&self) -> usize {
        self.group_start.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Rows per attention tile, for queries and keys alike. Tiles start at each group's first
/// row, so in a `[prompt | chosen | rejected]` group a tile rarely straddles two branches.
pub const ATTN_TILE: usize = 64;

/// The branches present in rows `r0..r1`, as a bit set.
fn branch_bits(branch: &[u8], r0: usize, r1: usize) -> u8 {
    branch[r0..r1].iter().fold(0, |acc, &b| acc | 1 << b)
}

/// The key ranges of `gs..q1` a query tile with branch bits `qbits` may attend to, as merged
/// runs of whole `ATTN_TILE` tiles: those holding prompt keys or keys of one of its
/// branches. (Conservative: the exact rule is applied per element; this only skips whole
/// masked tiles, such as the chosen keys of rejected queries.)
fn key_spans(spans: &mut Vec<(usize, usize)>, branch: &[u8], gs: usize, q1: usize, qbits: u8) {
    spans.clear();
    for k0 in (gs..q1).step_by(ATTN_TILE) {
        let k1 = (k0 + ATTN_TILE).min(q1);
        let kbits = branch_bits(branch, k0, k1);
        if kbits & 1 != 0 || kbits & qbits != 0 {
            match spans.last_mut() {
                Some(last) if last.1 == k0 => last.1 = k1,
                _ => spans.push((k0, k1)),
            }
        }
    }
}

/// Runs of rows with the same branch in `r0..r1`, as `(start, end, branch)`: the mask of a
/// query row is then a few contiguous segments instead of a test per key.
fn branch_runs(runs: &mut Vec<(usize, usize, u8)>, branch: &[u8], r0: usize, r1: usize) {
    runs.clear();
    for (r, &b) in branch.iter().enumerate().take(r1).skip(r0) {
        match runs.last_mut() {
            Some(last) if last.2 == b => last.1 = r + 1,
            _ => runs.push((r, r + 1, b)),
        }
    }
}

/// Query tiles `(group start, first row, end row)`: aligned on `ATTN_TILE` from each group's
/// start, covering rows `from..` (the query rows).
fn query_tiles(mask: &AttnMask, from: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for w in mask.group_start.windows(2) {
        let (gs, ge) = (w[0] as usize, w[1] as usize);
        for t0 in (gs..ge).step_by(ATTN_TILE) {
            let t1 = (t0 + ATTN_TILE).min(ge);
            if t1 > from {
                out.push((gs, t0.max(from), t1));
            }
        }
    }
    out
}

/// `out[q, h] = Σ_k softmax_k(q_h·k_g / sqrt(d)) v_g` over the keys the mask allows,
/// `g = h / (n_heads / n_kv_heads)`; `lse[q, h]` keeps the log-sum-exp of the scaled scores.
///
/// `q` holds the last `n_q` rows of the `n_k` key rows (`n_q = n_k` in training; fewer
/// when decoding against a cache). The mask is indexed by key row.
///
/// Work: one task per (query tile, head). Scores `S = Q·Kᵀ` and `P·V` are GEMMs over the
/// key tiles the mask does not rule out entirely; the exact rule is applied inside them.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: AttnMask,
    shape: AttnShape,
) {
    let _p = profile::scope(Category::Attention);
    let (qd, kvd, hd, nh) = (shape.q_dim(), shape.kv_dim(), shape.head_dim, shape.n_heads);
    let n_k = k.len() / kvd;
    let n_q = q.len() / qd;
    assert!(shape.n_heads.is_multiple_of(shape.n_kv_heads) && n_q <= n_k && v.len() == k.len(), "attention: shapes");
    assert!(out.len() == q.len() && lse.len() == n_q * nh && mask.group.len() == n_k, "attention: shapes");
    assert!(mask.group_start.last().map(|&e| e as usize) == Some(n_k), "attention: groups must cover the keys");
    let scale = 1.0 / (hd as f32).sqrt();
    let offset = n_k - n_q;
    let tiles = query_tiles(&mask, offset);
    let max_span = mask.max_group_len();
    let (pout, plse) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    (0..tiles.len() * nh).into_par_iter().for_each_init(
        || (vec![0f32; ATTN_TILE.min(n_q) * max_span], Vec::new(), Vec::new()),
        |(s, spans, runs), task| {
            let ((gs, t0, t1), h) = (tiles[task / nh], task % nh);
            let g = h / shape.group_size();
            let (m, span) = (t1 - t0, t1 - gs);
            let s = &mut s[..m * span];
            key_spans(spans, mask.branch, gs, t1, branch_bits(mask.branch, t0, t1));
            branch_runs(runs, mask.branch, gs, t1);
            let qp = q[(t0 - offset) * qd + h * hd..].as_ptr();
            for &(k0, k1) in spans.iter() {
                // SAFETY: S[:, k0-gs..k1-gs] lies in `s` (m rows of `span`); Q rows t0..t1 of
                // head h and K rows k0..k1 of kv head g lie in `q` and `k`.
                unsafe {
                    let kp = k[k0 * kvd + g * hd..].as_ptr();
                    gemm_raw(s[k0 - gs..].as_mut_ptr(), span, false, qp, qd, 1, kp, 1, kvd, m, k1 - k0, hd, false);
                }
            }
            simd(|| {
                for i in 0..m {
                    let (t, bt) = (t0 + i, mask.branch[t0 + i]);
                    let row = &mut s[i * span..(i + 1) * span];
                    // visible keys always lie in `spans`, so only computed scores are read
                    let mut mx = f32::NEG_INFINITY;
                    for &(a, b, br) in runs.iter().take_while(|r| r.0 <= t) {
                        let seg = &mut row[a - gs..b.min(t + 1) - gs];
                        if br == 0 || br == bt {
                            for x in seg.iter_mut() {
                                *x *= scale;
                                mx = mx.max(*x);
                            }
                        } else {
                            seg.fill(f32::NEG_INFINITY);
                        }
                    }
                    row[t + 1 - gs..].fill(f32::NEG_INFINITY);
                    row.iter_mut().for_each(|x| *x = exp_f32(*x - mx));
                    let sum = sum_f32(row);
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                    // SAFETY: (row t, head h) of lse belongs to this task alone.
                    unsafe { *plse.at((t - offset) * nh + h) = mx + sum.ln() };
                }
            });
            for (i, &(k0, k1)) in spans.iter().enumerate() {
                // SAFETY: out rows t0..t1, head h belong to this task alone; P and V in bounds.
                unsafe {
                    let (op, vp) = (pout.at((t0 - offset) * qd + h * hd), v[k0 * kvd + g * hd..].as_ptr());
                    gemm_raw(op, qd, i > 0, s[k0 - gs..].as_ptr(), span, 1, vp, kvd, 1, m, hd, k1 - k0, false);
                }
            }
        },
    );
}

/// Gradients of `attention_forward` (n_q = n_k): with `P = exp(s − lse)`, `dP = dout·vᵀ`,
/// `D = rowsum(dout∘out)`, `dS = P∘(dP − D)`: `dq = scale·dS·k`, `dk = scale·dSᵀ·q`,
/// `dv = Pᵀ·dout`. All three are overwritten (=). One task per (group, kv head): those
/// write disjoint rows/columns of dq, dk, dv; inside, the same tiles as forward.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    mask: AttnMask,
    shape: AttnShape,
) {
    let _p = profile::scope(Category::Attention);
    let (qd, kvd, hd, nh, nkv) = (shape.q_dim(), shape.kv_dim(), shape.head_dim, shape.n_heads, shape.n_kv_heads);
    let n = q.len() / qd;
    assert!(k.len() == n * kvd && v.len() == k.len() && dk.len() == k.len() && dv.len() == v.len(), "attention");
    assert!(dq.len() == q.len() && dout.len() == q.len() && out.len() == q.len() && lse.len() == n * nh);
    assert!(mask.group.len() == n && mask.group_start.last().map(|&e| e as usize) == Some(n), "attention: groups");
    let scale = 1.0 / (hd as f32).sqrt();
    dk.fill(0.0);
    dv.fill(0.0);
    let (pdq, pdk, pdv) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let n_groups = mask.group_start.len() - 1;
    let max_span = mask.max_group_len();
    (0..n_groups * nkv).into_par_iter().for_each_init(
        || (vec![0f32; ATTN_TILE * max_span], vec![0f32; ATTN_TILE * max_span], Vec::new(), Vec::new()),
        |(p, ds, spans, runs), task| {
            let (grp, g) = (task / nkv, task % nkv);
            let (gs, ge) = (mask.group_start[grp] as usize, mask.group_start[grp + 1] as usize);
            branch_runs(runs, mask.branch, gs, ge);
            for h in g * shape.group_size()..(g + 1) * shape.group_size() {
                for t0 in (gs..ge).step_by(ATTN_TILE) {
                    let t1 = (t0 + ATTN_TILE).min(ge);
                    let (m, span) = (t1 - t0, t1 - gs);
                    let (p, ds) = (&mut p[..m * span], &mut ds[..m * span]);
                    key_spans(spans, mask.branch, gs, t1, branch_bits(mask.branch, t0, t1));
                    let (qp, dop) = (q[t0 * qd + h * hd..].as_ptr(), dout[t0 * qd + h * hd..].as_ptr());
                    // S = Q·Kᵀ and dP = dO·Vᵀ on the key spans forward computed
                    for &(k0, k1) in spans.iter() {
                        let ko = k0 * kvd + g * hd;
                        let (kp, vp, n) = (k[ko..].as_ptr(), v[ko..].as_ptr(), k1 - k0);
                        // SAFETY: all in bounds (as in forward); p and ds are this task's scratch.
                        unsafe {
                            gemm_raw(p[k0 - gs..].as_mut_ptr(), span, false, qp, qd, 1, kp, 1, kvd, m, n, hd, false);
                            gemm_raw(ds[k0 - gs..].as_mut_ptr(), span, false, dop, qd, 1, vp, 1, kvd, m, n, hd, false);
                        }
                    }
                    simd(|| {
                        for i in 0..m {
                            let (t, bt) = (t0 + i, mask.branch[t0 + i]);
                            let (l, o) = (lse[t * nh + h], t * qd + h * hd);
                            let dd = dot(&dout[o..o + hd], &out[o..o + hd]);
                            let (pr, dr) = (&mut p[i * span..(i + 1) * span], &mut ds[i * span..(i + 1) * span]);
                            for &(a, b, br) in runs.iter().take_while(|r| r.0 <= t) {
                                let (j0, j1) = (a - gs, b.min(t + 1) - gs);
                                if br == 0 || br == bt {
                                    for j in j0..j1 {
                                        pr[j] = exp_f32(pr[j] * scale - l);
                                        dr[j] = pr[j] * (dr[j] - dd) * scale;
                                    }
                                } else {
                                    pr[j0..j1].fill(0.0);
                                    dr[j0..j1].fill(0.0);
                                }
                            }
                            pr[t + 1 - gs..].fill(0.0);
                            dr[t + 1 - gs..].fill(0.0);
                        }
                    });
                    for (i, &(k0, k1)) in spans.iter().enumerate() {
                        let (ko, n) = (k0 * kvd + g * hd, k1 - k0);
                        let (pds, pp) = (ds[k0 - gs..].as_ptr(), p[k0 - gs..].as_ptr());
                        // SAFETY: dq rows t0..t1 of head h, dk/dv rows k0..k1 of kv head g are
                        // written by this task alone (its group, its kv head).
                        unsafe {
                            let (dqp, kp) = (pdq.at(t0 * qd + h * hd), k[ko..].as_ptr());
                            gemm_raw(dqp, qd, i > 0, pds, span, 1, kp, kvd, 1, m, hd, n, false);
                            gemm_raw(pdk.at(ko), kvd, true, pds, 1, span, qp, qd, 1, n, hd, m, false);
                            gemm_raw(pdv.at(ko), kvd, true, pp, 1, span, dop, qd, 1, n, hd, m, false);
                        }
                    }
                }
            }
        },
    );
}

// --- SwiGLU

/// `out = silu(gate) · up`
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let _p = profile::scope(Category::NormElementwise);
    out.par_chunks_mut(4096).zip(gate.par_chunks(4096)).zip(up.par_chunks(4096)).for_each(|((o, g), u)| {
        simd(|| {
            for ((oi, &gi), &ui) in o.iter_mut().zip(g).zip(u) {
                *oi = gi / (1.0 + exp_f32(-gi)) * ui;
            }
        })
    });
}

/// `dgate = dout·up·σ(g)(1 + g(1 − σ(g)))`, `dup = dout·silu(g)` (both =).
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    let _p = profile::scope(Category::NormElementwise);
    assert!(
        dup.len() == dgate.len() && dout.len() == dgate.len() && gate.len() == dgate.len() && up.len() == dgate.len()
    );
    dgate.par_chunks_mut(4096).zip(dup.par_chunks_mut(4096)).enumerate().for_each(|(c, (dg, du))| {
        let o = c * 4096;
        let (g, u, d) = (&gate[o..o + dg.len()], &up[o..o + dg.len()], &dout[o..o + dg.len()]);
        simd(|| {
            for i in 0..dg.len() {
                let sg = 1.0 / (1.0 + exp_f32(-g[i]));
                dg[i] = d[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
                du[i] = d[i] * g[i] * sg;
            }
        });
    });
}

// --- log-probs (LM head + log-softmax + gather)

/// Rows per LM-head chunk of the CPU engine: about 4M logits (16 MB) at a time.
pub fn head_chunk_rows(vocab: usize) -> usize {
    ((1 << 22) / vocab.max(1)).clamp(1, 256)
}

/// Copies the chunk's rows of `x` into `xc` (contiguous) and computes `logits = xc·Wᵀ`.
fn head_chunk(xc: &mut [f32], logits: &mut [f32], x: &[f32], w: &[f32], rows: &[u32], hidden: usize, vocab: usize) {
    for (dst, &r) in xc.chunks_exact_mut(hidden).zip(rows) {
        dst.copy_from_slice(&x[r as usize * hidden..(r as usize + 1) * hidden]);
    }
    linear_forward(logits, xc, w, rows.len(), hidden, vocab);
}

/// `logp[t] = logits[row(t), token(t)] − lse[row(t)]` with `logits = x·W_headᵀ`;
/// `lse[slot]` is kept for backward. The LM-head GEMM is inside (`_with_head`): the CUDA
/// engine runs that GEMM apart and its `logprobs_forward` kernel takes the logits.
pub fn logprobs_forward_with_head(
    logp: &mut [f32],
    lse: &mut [f32],
    x: &[f32],
    w: &[f32],
    plan: &LogpPlan,
    hidden: usize,
    vocab: usize,
) {
    let _p = profile::scope(Category::LmHead);
    assert!(logp.len() == plan.slot.len() && lse.len() == plan.rows.len() && w.len() == vocab * hidden);
    let chunk = head_chunk_rows(vocab);
    let mut xc = vec![0f32; chunk * hidden];
    let mut logits = vec![0f32; chunk * vocab];
    for (c, rows) in plan.rows.chunks(chunk).enumerate() {
        let r0 = c * chunk;
        head_chunk(&mut xc, &mut logits, x, w, rows, hidden, vocab);
        lse[r0..r0 + rows.len()].par_iter_mut().zip(logits.par_chunks(vocab)).for_each(|(l, lg)| {
            *l = simd(|| {
                let mx = lg.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                mx + sum_exp_f64(lg, mx).ln() as f32
            });
        });
        for (j, rt) in plan.row_targets[r0..r0 + rows.len()].iter().enumerate() {
            for &ti in rt.iter().filter(|&&ti| ti != u32::MAX) {
                let ti = ti as usize;
                logp[ti] = logits[j * vocab + plan.tokens[ti] as usize] - lse[r0 + j];
            }
        }
    }
}

/// With `G_r = Σ dlogp` over row r's targets: `dlogits[r, v] = 1[v = token]·dlogp − G_r·softmax_v`,
/// recomputed chunk by chunk; `dx` rows that predict a target are overwritten with
/// `dlogits·W`, every other row is set to 0 (=); `dw += dlogitsᵀ·x`. The CUDA engine's
/// `logprobs_backward` kernel gives `dlogits` alone; the two GEMMs are its caller's.
#[allow(clippy::too_many_arguments)]
pub fn logprobs_backward_with_head(
    dx: &mut [f32],
    dw: &mut [f32],
    dlogp: &[f32],
    x: &[f32],
    w: &[f32],
    lse: &[f32],
    plan: &LogpPlan,
    hidden: usize,
    vocab: usize,
) {
    assert_eq!(dw.len(), vocab * hidden, "logprobs_backward_with_head: weight gradient shape");
    logprobs_backward_opt(dx, Some(dw), dlogp, x, w, lse, plan, hidden, vocab)
}

/// `logprobs_backward_with_head`'s `dx` alone: the backward through a frozen LM head.
#[allow(clippy::too_many_arguments)]
pub fn logprobs_backward_with_head_dx(
    dx: &mut [f32],
    dlogp: &[f32],
    x: &[f32],
    w: &[f32],
    lse: &[f32],
    plan: &LogpPlan,
    hidden: usize,
    vocab: usize,
) {
    logprobs_backward_opt(dx, None, dlogp, x, w, lse, plan, hidden, vocab)
}

#[allow(clippy::too_many_arguments)]
fn logprobs_backward_opt(
    dx: &mut [f32],
    mut dw: Option<&mut [f32]>,
    dlogp: &[f32],
    x: &[f32],
    w: &[f32],
    lse: &[f32],
    plan: &LogpPlan,
    hidden: usize,
    vocab: usize,
) {
    let _p = profile::scope(Category::LmHead);
    assert!(dlogp.len() == plan.slot.len() && lse.len() == plan.rows.len() && w.len() == vocab * hidden);
    dx.fill(0.0);
    let chunk = head_chunk_rows(vocab);
    let mut xc = vec![0f32; chunk * hidden];
    let mut logits = vec![0f32; chunk * vocab];
    let mut dxc = vec![0f32; chunk * hidden];
    for (c, rows) in plan.rows.chunks(chunk).enumerate() {
        let r0 = c * chunk;
        let m = rows.len();
        head_chunk(&mut xc, &mut logits, x, w, rows, hidden, vocab);
        logits[..m * vocab].par_chunks_mut(vocab).enumerate().for_each(|(j, lg)| {
            let rt = plan.row_targets[r0 + j];
            let gsum: f32 = rt.iter().filter(|&&t| t != u32::MAX).map(|&t| dlogp[t as usize]).sum();
            let l = lse[r0 + j];
            simd(|| lg.iter_mut().for_each(|z| *z = -gsum * exp_f32(*z - l)));
            for &t in rt.iter().filter(|&&t| t != u32::MAX) {
                lg[plan.tokens[t as usize] as usize] += dlogp[t as usize];
            }
        });
        let (dl, xr) = (&logits[..m * vocab], &xc[..m * hidden]);
        match dw.as_deref_mut() {
            Some(dw) => linear_backward(&mut dxc, dw, dl, xr, w, m, hidden, vocab, false),
            None => linear_backward_dx(&mut dxc, dl, w, m, hidden, vocab, false),
        }
        for (src, &r) in dxc.chunks_exact(hidden).zip(rows) {
            dx[r as usize * hidden..(r as usize + 1) * hidden].copy_from_slice(src);
        }
    }
}

// --- optimizer

/// One `torch.optim.AdamW` step (single-tensor path) on one tensor, `step` counting from 1:
/// `p ← p·(1 − lr·wd)`; `m ← m + (1−β1)(g − m)`; `v ← β2·v + (1−β2)g²`;
/// `p ← p − (lr/bc1)·m / (sqrt(v)/sqrt(bc2) + eps)` with `bc_i = 1 − β_i^step`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
) {
    let _p = profile::scope(Category::Optimizer);
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len(), "adamw: lengths differ");
    // torch turns the Python-float scalars into f32 where they meet f32 tensors.
    let decay = (1.0 - lr * weight_decay) as f32;
    let (w1, b2, w2) = ((1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt() as f32;
    let step_size = (lr / bc1) as f32;
    let eps = eps as f32;
    const CH: usize = 1 << 14;
    p.par_chunks_mut(CH).zip(m.par_chunks_mut(CH)).zip(v.par_chunks_mut(CH)).zip(g.par_chunks(CH)).for_each(
        |(((p, m), v), g)| {
            // `decay` is exactly 1 without weight decay, so the product changes nothing then
            simd(|| {
                for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    *p *= decay;
                    *m += w1 * (g - *m);
                    *v = *v * b2 + w2 * g * g;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * (*m / denom);
                }
            });
        },
    );
}

/// The global L2 norm of all gradients (accumulated in f64).
pub fn grad_norm(grads: &[&[f32]]) -> f64 {
    let _p = profile::scope(Category::Optimizer);
    grads
        .iter()
        .map(|g| g.par_chunks(1 << 14).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max_norm / (norm + 1e-6)`
/// when that is below 1. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let _p = profile::scope(Category::Optimizer);
    let norm = grad_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let c = coef as f32;
        for g in grads.iter_mut() {
            g.par_chunks_mut(1 << 14).for_each(|ch| ch.iter_mut().for_each(|x| *x *= c));
        }
    }
    norm
}

// --- tests: every op against a naive f64 reference; every backward against central
// differences of that f64 reference.
//
// Tolerances: the f64 references and their finite differences (step 1e-6, truncation
// ~1e-12, rounding ~1e-10 relative) are exact for our purpose, so what the tests measure is
// the f32 ops' own rounding: sums of at most a few hundred f32 products, ~1e-7 per
// operation, i.e. a relative error (‖a−b‖/‖b‖) of a few 1e-7. We allow 1e-5, which still
// catches any wrong index, sign or missing term (those give errors of order 1).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Layout, LogpTarget, PairBatch, PairExample};
    use crate::weights::SplitMix64;

    const TOL: f64 = 1e-5;

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// ‖a − b‖ / ‖b‖
    fn rel(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// Central differences of `f` at `x`.
    fn fd(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
        let mut xp = x.to_vec();
        (0..x.len())
            .map(|i| {
                let e = 1e-6 * x[i].abs().max(1.0);
                xp[i] = x[i] + e;
                let a = f(&xp);
                xp[i] = x[i] - e;
                let b = f(&xp);
                xp[i] = x[i];
                (a - b) / (2.0 * e)
            })
            .collect()
    }

    fn dotf64(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn batch(rng: &mut SplitMix64, n_pairs: usize, layout: Layout) -> PairBatch {
        let mut len = |lo: u64, hi: u64| (lo + rng.next_u64() % (hi - lo + 1)) as usize;
        let pairs: Vec<PairExample> = (0..n_pairs)
            .map(|p| PairExample {
                prompt: (0..len(1, 4)).map(|i| (p + i) as u32).collect(),
                chosen: (0..len(1, 3)).map(|i| i as u32).collect(),
                rejected: (0..len(1, 3)).map(|i| 2 + i as u32).collect(),
                source: String::new(),
            })
            .collect();
        PairBatch::new(&pairs.iter().collect::<Vec<_>>(), layout).unwrap()
    }

    #[test]
    fn exp_f32_is_within_2_ulp() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -87.0 + 175.0 * i as f64 / 400_000.0; // [-87, 88]
            let (got, want) = (exp_f32(x as f32) as f64, (x as f32 as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // 2 ulp of f32 is 2·2^-23 ≈ 2.4e-7 relative
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(1000.0).is_finite());
    }

    #[test]
    fn linear_matches_naive_and_accumulates() {
        let mut rng = SplitMix64(1);
        let (n, i, o) = (7, 19, 11);
        let (x, w, dy) = (rng.normals(n * i, 1.0), rng.normals(o * i, 1.0), rng.normals(n * o, 1.0));
        let mut y = vec![0f32; n * o];
        linear_forward(&mut y, &x, &w, n, i, o);
        let yr: Vec<f64> =
            (0..n * o).map(|e| (0..i).map(|kk| x[e / o * i + kk] as f64 * w[e % o * i + kk] as f64).sum()).collect();
        assert!(rel(&y, &yr) < TOL);
        // dx = dY·W, overwriting, then accumulating; dw += dYᵀ·X on top of what is there
        let (dx0, dw0) = (rng.normals(n * i, 1.0), rng.normals(o * i, 1.0));
        for dx_add in [false, true] {
            let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
            linear_backward(&mut dx, &mut dw, &dy, &x, &w, n, i, o, dx_add);
            let dxr: Vec<f64> = (0..n * i)
                .map(|e| {
                    let s: f64 = (0..o).map(|j| dy[e / i * o + j] as f64 * w[j * i + e % i] as f64).sum();
                    s + if dx_add { dx0[e] as f64 } else { 0.0 }
                })
                .collect();
            let dwr: Vec<f64> = (0..o * i)
                .map(|e| {
                    dw0[e] as f64 + (0..n).map(|t| dy[t * o + e / i] as f64 * x[t * i + e % i] as f64).sum::<f64>()
                })
                .collect();
            assert!(rel(&dx, &dxr) < TOL && rel(&dw, &dwr) < TOL, "dx_add {dx_add}");
        }
    }

    #[test]
    fn embedding_scatter_adds_repeated_tokens() {
        let mut rng = SplitMix64(2);
        let (v, h) = (9, 5);
        let embed = rng.normals(v * h, 1.0);
        let tokens = [3u32, 0, 3, 8, 3];
        let mut out = vec![0f32; tokens.len() * h];
        embedding_forward(&mut out, &tokens, &embed, h);
        assert_eq!(&out[2 * h..3 * h], &embed[3 * h..4 * h]);
        let dout = rng.normals(tokens.len() * h, 1.0);
        let mut de = vec![1f32; v * h];
        embedding_backward(&mut de, &dout, &tokens, h, None);
        for j in 0..h {
            let want = 1.0 + dout[j] as f64 + dout[2 * h + j] as f64 + dout[4 * h + j] as f64;
            assert!((de[3 * h + j] as f64 - want).abs() < 1e-6);
            assert_eq!(de[h + j], 1.0); // token 1 never appears
        }
    }

    /// The padding row is left as it was, however often its token occurs; the other rows
    /// get their scatter-add as without padding.
    #[test]
    fn embedding_backward_skips_the_padding_row() {
        let mut rng = SplitMix64(3);
        let (v, h) = (9, 5);
        let tokens = [3u32, 0, 3, 8, 3, 0];
        let dout = rng.normals(tokens.len() * h, 1.0);
        let mut plain = vec![1f32; v * h];
        embedding_backward(&mut plain, &dout, &tokens, h, None);
        let mut padded = vec![1f32; v * h];
        embedding_backward(&mut padded, &dout, &tokens, h, Some(3));
        assert!(padded[3 * h..4 * h].iter().all(|&x| x == 1.0), "the padding row gets no gradient");
        assert_ne!(plain[3 * h..4 * h], padded[3 * h..4 * h]);
        for r in (0..v).filter(|&r| r != 3) {
            assert_eq!(plain[r * h..(r + 1) * h], padded[r * h..(r + 1) * h], "row {r}");
        }
    }

    fn rmsnorm_ref(x: &[f64], w: &[f64], h: usize, eps: f64) -> Vec<f64> {
        x.chunks(h)
            .flat_map(|r| {
                let rs = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
                r.iter().zip(w).map(move |(v, wi)| v * rs * wi).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let mut rng = SplitMix64(3);
        let (n, h, eps) = (5, 37, 1e-5f32);
        let x = rng.normals(n * h, 1.5);
        let w: Vec<f32> = (0..h).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        let dy = rng.normals(n * h, 1.0);
        let (mut y, mut rstd) = (vec![0f32; n * h], vec![0f32; n]);
        rmsnorm_forward(&mut y, &mut rstd, &x, &w, h, eps);
        assert!(rel(&y, &rmsnorm_ref(&f64s(&x), &f64s(&w), h, eps as f64)) < TOL);

        let (mut dx, mut dw) = (vec![7f32; n * h], vec![0.5f32; h]);
        rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, h);
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let dxr = fd(|xx| dotf64(&rmsnorm_ref(xx, &wd, h, eps as f64), &dyd), &xd);
        let dwr: Vec<f64> =
            fd(|ww| dotf64(&rmsnorm_ref(&xd, ww, h, eps as f64), &dyd), &wd).iter().map(|g| g + 0.5).collect();
        assert!(rel(&dx, &dxr) < TOL, "dx {}", rel(&dx, &dxr));
        assert!(rel(&dw, &dwr) < TOL, "dw {}", rel(&dw, &dwr));
    }

    fn rope_ref(x: &[f64], pos: &[u32], inv_freq: &[f32], nh: usize, hd: usize) -> Vec<f64> {
        let half = hd / 2;
        let mut y = x.to_vec();
        for (t, &p) in pos.iter().enumerate() {
            for h in 0..nh {
                let o = (t * nh + h) * hd;
                for i in 0..half {
                    let th = (p as f32 * inv_freq[i]) as f64; // the angle is formed in f32, as in transformers
                    let (a, b) = (x[o + i], x[o + i + half]);
                    y[o + i] = a * th.cos() - b * th.sin();
                    y[o + i + half] = b * th.cos() + a * th.sin();
                }
            }
        }
        y
    }

    #[test]
    fn rope_forward_and_backward() {
        let mut rng = SplitMix64(4);
        let (nh, hd) = (3, 10);
        let pos = [0u32, 1, 2, 7, 3, 1000];
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let x = rng.normals(pos.len() * nh * hd, 1.0);
        let mut y = x.clone();
        rope_forward(&mut y, &pos, &inv_freq, nh, hd);
        assert!(rel(&y, &rope_ref(&f64s(&x), &pos, &inv_freq, nh, hd)) < TOL);
        // position 0 is the identity
        assert_eq!(&y[..nh * hd], &x[..nh * hd]);
        let dy = rng.normals(y.len(), 1.0);
        let mut dx = dy.clone();
        rope_backward(&mut dx, &pos, &inv_freq, nh, hd);
        let dxr = fd(|xx| dotf64(&rope_ref(xx, &pos, &inv_freq, nh, hd), &f64s(&dy)), &f64s(&x));
        assert!(rel(&dx, &dxr) < TOL);
    }

    /// Naive attention: for every (query, key) pair, the rule `PairBatch::attends`.
    fn attention_ref(q: &[f64], k: &[f64], v: &[f64], b: &PairBatch, s: AttnShape) -> Vec<f64> {
        let (n, hd) = (b.n_tokens(), s.head_dim);
        let mut out = vec![0f64; q.len()];
        for t in 0..n {
            for h in 0..s.n_heads {
                let g = h / (s.n_heads / s.n_kv_heads);
                let qv = &q[(t * s.n_heads + h) * hd..][..hd];
                let keys: Vec<usize> = (0..n).filter(|&kk| b.attends(t, kk)).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&kk| dotf64(qv, &k[(kk * s.n_kv_heads + g) * hd..][..hd]) / (hd as f64).sqrt())
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for (&kk, &x) in keys.iter().zip(&sc) {
                    let p = (x - mx).exp() / z;
                    for d in 0..hd {
                        out[(t * s.n_heads + h) * hd + d] += p * v[(kk * s.n_kv_heads + g) * hd + d];
                    }
                }
            }
        }
        out
    }

    /// Random q, k, v for `n` tokens of shape `s`.
    fn random_qkv(rng: &mut SplitMix64, n: usize, s: AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (rng.normals(n * s.q_dim(), 1.0), rng.normals(n * s.kv_dim(), 1.0), rng.normals(n * s.kv_dim(), 1.0))
    }

    #[test]
    fn attention_matches_naive_mask_for_gqa_1_2_4_and_both_layouts() {
        let mut rng = SplitMix64(5);
        for (n_kv, layout) in [(4, Layout::Shared), (2, Layout::Shared), (1, Layout::Shared), (2, Layout::Concatenated)]
        {
            let s = AttnShape { n_heads: 4, n_kv_heads: n_kv, head_dim: 6 };
            let b = batch(&mut rng, 3, layout);
            let n = b.n_tokens();
            let (q, k, v) = random_qkv(&mut rng, n, s);
            let (mut out, mut lse) = (vec![9f32; q.len()], vec![9f32; n * s.n_heads]);
            attention_forward(&mut out, &mut lse, &q, &k, &v, AttnMask::of(&b), s);
            let (qd, kd, vd) = (f64s(&q), f64s(&k), f64s(&v));
            assert!(rel(&out, &attention_ref(&qd, &kd, &vd, &b, s)) < TOL, "forward n_kv {n_kv} {layout:?}");

            let dout = rng.normals(q.len(), 1.0);
            let dod = f64s(&dout);
            let (mut dq, mut dk, mut dv) = (vec![9f32; q.len()], vec![9f32; k.len()], vec![9f32; v.len()]);
            attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, AttnMask::of(&b), s);
            let dqr = fd(|x| dotf64(&attention_ref(x, &kd, &vd, &b, s), &dod), &qd);
            let dkr = fd(|x| dotf64(&attention_ref(&qd, x, &vd, &b, s), &dod), &kd);
            let dvr = fd(|x| dotf64(&attention_ref(&qd, &kd, x, &b, s), &dod), &vd);
            assert!(rel(&dq, &dqr) < TOL, "dq n_kv {n_kv} {layout:?}: {}", rel(&dq, &dqr));
            assert!(rel(&dk, &dkr) < TOL, "dk n_kv {n_kv} {layout:?}: {}", rel(&dk, &dkr));
            assert!(rel(&dv, &dvr) < TOL, "dv n_kv {n_kv} {layout:?}: {}", rel(&dv, &dvr));
        }
    }

    /// Groups longer than `ATTN_TILE`: several query and key tiles per group, whole
    /// masked tiles skipped (the chosen keys of rejected queries). Backward is checked by
    /// central differences along random directions (a full finite-difference gradient of
    /// ~400 rows would be slow): `Σ g·u` against `(L(x+εu) − L(x−εu)) / 2ε`.
    #[test]
    fn attention_over_several_tiles_per_group() {
        let mut rng = SplitMix64(12);
        let ex = |p: usize, c: usize, r: usize| PairExample {
            prompt: vec![1; p],
            chosen: vec![2; c],
            rejected: vec![3; r],
            source: String::new(),
        };
        let pairs = [ex(70, 65, 60), ex(1, 1, 2), ex(64, 64, 64), ex(5, 130, 3)];
        for layout in [Layout::Shared, Layout::Concatenated] {
            let b = PairBatch::new(&pairs.iter().collect::<Vec<_>>(), layout).unwrap();
            let s = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 4 };
            let n = b.n_tokens();
            let (q, k, v) = random_qkv(&mut rng, n, s);
            let (mut out, mut lse) = (vec![9f32; q.len()], vec![9f32; n * s.n_heads]);
            attention_forward(&mut out, &mut lse, &q, &k, &v, AttnMask::of(&b), s);
            let (qd, kd, vd) = (f64s(&q), f64s(&k), f64s(&v));
            assert!(rel(&out, &attention_ref(&qd, &kd, &vd, &b, s)) < TOL, "forward {layout:?}");

            let dout = rng.normals(q.len(), 1.0);
            let dod = f64s(&dout);
            let (mut dq, mut dk, mut dv) = (vec![9f32; q.len()], vec![9f32; k.len()], vec![9f32; v.len()]);
            attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, AttnMask::of(&b), s);
            let loss = |q: &[f64], k: &[f64], v: &[f64]| dotf64(&attention_ref(q, k, v, &b, s), &dod);
            let shift = |x: &[f64], u: &[f64], e: f64| x.iter().zip(u).map(|(a, b)| a + e * b).collect::<Vec<_>>();
            for _ in 0..3 {
                let e = 1e-5;
                let u: Vec<f64> = (0..q.len()).map(|_| rng.normal() as f64).collect();
                let want = (loss(&shift(&qd, &u, e), &kd, &vd) - loss(&shift(&qd, &u, -e), &kd, &vd)) / (2.0 * e);
                let got = dotf64(&f64s(&dq), &u);
                assert!((got - want).abs() < TOL * want.abs().max(1.0), "dq·u {layout:?}: {got} vs {want}");
                let u: Vec<f64> = (0..k.len()).map(|_| rng.normal() as f64).collect();
                let want = (loss(&qd, &shift(&kd, &u, e), &vd) - loss(&qd, &shift(&kd, &u, -e), &vd)) / (2.0 * e);
                let got = dotf64(&f64s(&dk), &u);
                assert!((got - want).abs() < TOL * want.abs().max(1.0), "dk·u {layout:?}: {got} vs {want}");
                let want = (loss(&qd, &kd, &shift(&vd, &u, e)) - loss(&qd, &kd, &shift(&vd, &u, -e))) / (2.0 * e);
                let got = dotf64(&f64s(&dv), &u);
                assert!((got - want).abs() < TOL * want.abs().max(1.0), "dv·u {layout:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn attention_with_fewer_queries_than_keys_matches_the_full_call() {
        // decoding: the last n_q rows attend causally over all n_k rows
        let mut rng = SplitMix64(6);
        let s = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 8 };
        let (n_k, n_q) = (11, 3);
        let (gs, grp, br) = (vec![0, n_k as u32], vec![0u32; n_k], vec![0u8; n_k]);
        let mask = AttnMask { group_start: &gs, group: &grp, branch: &br };
        let (q, k, v) = (rng.normals(n_k * 32, 1.0), rng.normals(n_k * 16, 1.0), rng.normals(n_k * 16, 1.0));
        let (mut full, mut lf) = (vec![0f32; n_k * 32], vec![0f32; n_k * 4]);
        attention_forward(&mut full, &mut lf, &q, &k, &v, mask, s);
        let (mut part, mut lp) = (vec![0f32; n_q * 32], vec![0f32; n_q * 4]);
        attention_forward(&mut part, &mut lp, &q[(n_k - n_q) * 32..], &k, &v, mask, s);
        assert_eq!(&part[..], &full[(n_k - n_q) * 32..]);
    }

    fn swiglu_ref(g: &[f64], u: &[f64]) -> Vec<f64> {
        g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let mut rng = SplitMix64(7);
        let n = 5000; // more than one parallel chunk
        let (g, u, dy) = (rng.normals(n, 3.0), rng.normals(n, 1.0), rng.normals(n, 1.0));
        let mut y = vec![0f32; n];
        swiglu_forward(&mut y, &g, &u);
        let (gd, ud, dyd) = (f64s(&g), f64s(&u), f64s(&dy));
        assert!(rel(&y, &swiglu_ref(&gd, &ud)) < TOL);
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        swiglu_backward(&mut dg, &mut du, &dy, &g, &u);
        // elementwise: the derivative of element i only depends on element i
        let dgr: Vec<f64> =
            (0..n).map(|i| fd(|x| swiglu_ref(x, &ud[i..i + 1])[0] * dyd[i], &gd[i..i + 1])[0]).collect();
        let dur: Vec<f64> = (0..n).map(|i| swiglu_ref(&gd[i..i + 1], &[1.0])[0] * dyd[i]).collect();
        assert!(rel(&dg, &dgr) < TOL && rel(&du, &dur) < TOL);
    }

    fn logprobs_ref(x: &[f64], w: &[f64], targets: &[LogpTarget], h: usize, v: usize) -> Vec<f64> {
        targets
            .iter()
            .map(|t| {
                let xr = &x[t.row as usize * h..][..h];
                let logits: Vec<f64> = (0..v).map(|j| dotf64(xr, &w[j * h..][..h])).collect();
                let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + logits.iter().map(|z| (z - mx).exp()).sum::<f64>().ln();
                logits[t.token as usize] - lse
            })
            .collect()
    }

    #[test]
    fn logprobs_forward_and_backward_with_shared_rows() {
        let mut rng = SplitMix64(8);
        let b = batch(&mut rng, 3, Layout::Shared);
        let (n, h, v) = (b.n_tokens(), 7, 23);
        let targets: Vec<LogpTarget> =
            b.targets.iter().map(|t| LogpTarget { token: (t.token * 5 + t.row) % v as u32, ..*t }).collect();
        let plan = LogpPlan::new(&targets);
        assert!(plan.rows.len() < targets.len(), "the last prompt row carries two targets");
        let (x, w) = (rng.normals(n * h, 1.0), rng.normals(v * h, 1.0));
        let (mut logp, mut lse) = (vec![0f32; targets.len()], vec![0f32; plan.rows.len()]);
        logprobs_forward_with_head(&mut logp, &mut lse, &x, &w, &plan, h, v);
        let (xd, wd) = (f64s(&x), f64s(&w));
        assert!(rel(&logp, &logprobs_ref(&xd, &wd, &targets, h, v)) < TOL);

        let dlogp = rng.normals(targets.len(), 1.0);
        let dl = f64s(&dlogp);
        let (mut dx, mut dw) = (vec![3f32; n * h], vec![0.25f32; v * h]);
        logprobs_backward_with_head(&mut dx, &mut dw, &dlogp, &x, &w, &lse, &plan, h, v);
        let dxr = fd(|xx| dotf64(&logprobs_ref(xx, &wd, &targets, h, v), &dl), &xd);
        let dwr: Vec<f64> =
            fd(|ww| dotf64(&logprobs_ref(&xd, ww, &targets, h, v), &dl), &wd).iter().map(|g| g + 0.25).collect();
        assert!(rel(&dx, &dxr) < TOL, "dx {}", rel(&dx, &dxr));
        assert!(rel(&dw, &dwr) < TOL, "dw {}", rel(&dw, &dwr));
    }

    #[test]
    fn adamw_matches_the_torch_formula() {
        let mut rng = SplitMix64(9);
        let n = 40000; // several parallel chunks
        let (lr, b1, b2, eps, wd) = (3e-3, 0.9, 0.95, 1e-8, 0.1);
        let mut p = rng.normals(n, 1.0);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut pr, mut mr, mut vr) = (f64s(&p), vec![0f64; n], vec![0f64; n]);
        for step in 1..=3u64 {
            let g = rng.normals(n, 0.1);
            adamw_step(&mut p, &mut m, &mut v, &g, lr, b1, b2, eps, wd, step);
            let (bc1, bc2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for i in 0..n {
                let gi = g[i] as f64;
                pr[i] *= 1.0 - lr * wd;
                mr[i] = b1 * mr[i] + (1.0 - b1) * gi;
                vr[i] = b2 * vr[i] + (1.0 - b2) * gi * gi;
                pr[i] -= lr / bc1 * mr[i] / (vr[i].sqrt() / bc2.sqrt() + eps);
            }
        }
        // f32 state vs f64 formula: the moments carry ~1e-7 relative rounding, the update
        // is lr-sized, so parameters agree to ~1e-7 absolute.
        let max_err = p.iter().zip(&pr).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(max_err < 1e-6, "{max_err}");
        assert!(rel(&m, &mr) < TOL && rel(&v, &vr) < TOL);
    }

    #[test]
    fn clipping_scales_only_above_the_limit() {
        let (mut a, mut b) = (vec![3f32, 0.0], vec![4f32]);
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert_eq!(norm, 5.0);
        let c = 1.0 / (5.0 + 1e-6);
        assert!((a[0] as f64 - 3.0 * c).abs() < 1e-7 && (b[0] as f64 - 4.0 * c).abs() < 1e-7);
        let mut d = vec![0.3f32, 0.4];
        assert!((clip_grad_norm(&mut [&mut d[..]], 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(d, vec![0.3, 0.4]);
    }
}
