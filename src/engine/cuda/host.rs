//! Host emulation of every kernel and of the GEMM, behind the same launchers: `Gpu::host()`
//! runs the whole CUDA engine (its buffers, strides, chunking and launch sequence) on the
//! CPU, so `tests/cuda_host.rs` checks `CudaEngine`'s bookkeeping against the CPU engine on
//! machines with no GPU. Each function reproduces its kernel's contract — inputs read as
//! the kernel reads them (bf16 or f32, with row strides), outputs rounded to the kernel's
//! output dtype, `=` versus `+=` — computed with the CPU ops or a plain loop. It says
//! nothing about the kernels' own arithmetic: tests/gpu.rs checks that on a GPU.
//!
//! Safety: a `DPtr` in host mode holds a host address from `HostMem`; launchers have
//! checked every length before calling here. Inputs are copied out before outputs are
//! written, so in-place calls (rope, residual) never alias a live borrow.

// Launchers mirror their kernels' argument lists (outputs, inputs, sizes).
#![allow(clippy::too_many_arguments)]

use half::bf16;

use super::kernels::{AttnDims, AttnMaskDev, Bf16, DPtr};
use crate::engine::cpu::ops;

/// Host memory addressed like device memory (a raw pointer and a length), for plain
/// numbers only, followed by a red zone of `RED_ZONE` bytes holding a signalling NaN of the
/// element's size (a huge value as an index): a kernel (simulated or emulated) that reads
/// past the end of a buffer reads NaN, which no check lets pass, and one that writes past
/// it is reported when the buffer is dropped. (Arithmetic on the NaN quiets it, so even a
/// NaN written back past the end differs from the pattern.)
pub struct HostMem<T> {
    ptr: *mut T,
    len: usize,
}

const RED_ZONE: usize = 256;

/// One element of the red zone, little-endian: signalling NaNs (bf16 0x7fa5, f32
/// 0x7fa5a5a5, f64 0x7ff5a5a5a5a5a5a5) and 0xa5 for bytes.
fn red_pattern(size: usize) -> &'static [u8] {
    match size {
        2 => &[0xa5, 0x7f],
        4 => &[0xa5, 0xa5, 0xa5, 0x7f],
        8 => &[0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xf5, 0x7f],
        _ => &[0xa5],
    }
}

fn red_zone<T>() -> impl Iterator<Item = u8> {
    red_pattern(std::mem::size_of::<T>()).iter().copied().cycle().take(RED_ZONE)
}

impl<T> HostMem<T> {
    fn layout(len: usize) -> (usize, std::alloc::Layout) {
        let bytes = len * std::mem::size_of::<T>();
        let align = std::mem::align_of::<T>().max(64);
        (bytes, std::alloc::Layout::from_size_align(bytes + RED_ZONE, align).expect("host buffer size overflows"))
    }

    /// `len` (at least 1) elements, each `init(i)`.
    fn new_with(len: usize, init: impl Fn(usize) -> T) -> Self {
        let len = len.max(1);
        let (bytes, layout) = Self::layout(len);
        // SAFETY: `layout` has a non-zero size; every element is written before use and
        // the red zone lies inside the allocation.
        unsafe {
            let p = std::alloc::alloc(layout);
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            red_zone::<T>().enumerate().for_each(|(i, b)| p.add(bytes + i).write(b));
            let ptr = p as *mut T;
            (0..len).for_each(|i| ptr.add(i).write(init(i)));
            HostMem { ptr, len }
        }
    }
}

impl<T: Clone + Default> HostMem<T> {
    pub fn zeroed(len: usize) -> Self {
        Self::new_with(len, |_| T::default())
    }
    pub fn from_slice(s: &[T]) -> Self {
        Self::new_with(s.len(), |i| s.get(i).cloned().unwrap_or_default())
    }
}

impl<T> HostMem<T> {
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Drop for HostMem<T> {
    fn drop(&mut self) {
        let (bytes, layout) = Self::layout(self.len);
        // SAFETY: `ptr` came from `alloc(layout)` in `new_with`; the elements are plain
        // numbers (no drop glue).
        let intact = unsafe {
            let p = self.ptr as *mut u8;
            let intact = std::slice::from_raw_parts(p.add(bytes), RED_ZONE).iter().copied().eq(red_zone::<T>());
            std::alloc::dealloc(p, layout);
            intact
        };
        if !intact && !std::thread::panicking() {
            panic!("a kernel wrote past the end of a host buffer of {} × {} bytes", self.len, std::mem::size_of::<T>());
        }
    }
}

fn b2f(x: Bf16) -> f32 {
    bf16::from_bits(x).to_f32()
}
fn f2b(x: f32) -> Bf16 {
    bf16::from_f32(x).to_bits()
}

unsafe fn at<T: Copy>(p: DPtr<T>, i: usize) -> T {
    *(p.ptr as *const T).add(i)
}
unsafe fn put<T>(p: DPtr<T>, i: usize, v: T) {
    *(p.ptr as *mut T).add(i) = v;
}
unsafe fn read<T: Copy>(p: DPtr<T>, n: usize) -> Vec<T> {
    std::slice::from_raw_parts(p.ptr as *const T, n).to_vec()
}

/// Rows `0..n` of width `w` and row stride `stride`, widened to f32.
unsafe fn rows16(p: DPtr<Bf16>, n: usize, w: usize, stride: usize) -> Vec<f32> {
    (0..n).flat_map(|r| (0..w).map(move |c| b2f(at(p, r * stride + c)))).collect()
}
unsafe fn rows32(p: DPtr<f32>, n: usize, w: usize, stride: usize) -> Vec<f32> {
    (0..n).flat_map(|r| (0..w).map(move |c| at(p, r * stride + c))).collect()
}
unsafe fn put_rows16(p: DPtr<Bf16>, v: &[f32], n: usize, w: usize, stride: usize) {
    for r in 0..n {
        for c in 0..w {
            put(p, r * stride + c, f2b(v[r * w + c]));
        }
    }
}
unsafe fn put_rows32(p: DPtr<f32>, v: &[f32], n: usize, w: usize, stride: usize) {
    for r in 0..n {
        for c in 0..w {
            put(p, r * stride + c, v[r * w + c]);
        }
    }
}

pub(crate) unsafe fn zero<T>(p: DPtr<T>) {
    std::ptr::write_bytes(p.ptr as *mut T, 0, p.len);
}

// --- attention.cu

struct HostMask {
    group: Vec<u32>,
    branch: Vec<u8>,
    group_start: Vec<u32>,
}

unsafe fn mask(m: &AttnMaskDev, n: usize) -> HostMask {
    HostMask { group: read(m.group, n), branch: read(m.branch, n), group_start: read(m.group_start, m.group_start.len) }
}

pub(crate) unsafe fn attention_forward(
    o: DPtr<Bf16>,
    lse: DPtr<f32>,
    q: DPtr<Bf16>,
    k: DPtr<Bf16>,
    v: DPtr<Bf16>,
    m: &AttnMaskDev,
    d: &AttnDims,
) {
    let n = d.n_tokens;
    let (qd, kvd) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    let hm = mask(m, n);
    let am = ops::AttnMask { group_start: &hm.group_start, group: &hm.group, branch: &hm.branch };
    let shape = ops::AttnShape { n_heads: d.n_heads, n_kv_heads: d.n_kv_heads, head_dim: d.head_dim };
    let (qv, kv, vv) = (rows16(q, n, qd, d.q_stride), rows16(k, n, kvd, d.kv_stride), rows16(v, n, kvd, d.kv_stride));
    let (mut out, mut l) = (vec![0f32; n * qd], vec![0f32; n * d.n_heads]);
    ops::attention_forward(&mut out, &mut l, &qv, &kv, &vv, am, shape);
    put_rows16(o, &out, n, qd, d.o_stride);
    put_rows32(lse, &l, n, d.n_heads, d.n_heads);
}

pub(crate) unsafe fn attention_backward_delta(delta: DPtr<f32>, dout: DPtr<Bf16>, o: DPtr<Bf16>, d: &AttnDims) {
    let (n, qd) = (d.n_tokens, d.n_heads * d.head_dim);
    let (a, b) = (rows16(dout, n, qd, d.o_stride), rows16(o, n, qd, d.o_stride));
    for t in 0..n {
        for h in 0..d.n_heads {
            let r = t * qd + h * d.head_dim..t * qd + (h + 1) * d.head_dim;
            put(delta, t * d.n_heads + h, a[r.clone()].iter().zip(&b[r]).map(|(x, y)| x * y).sum());
        }
    }
}

/// The backward kernel's contract: P = exp(s − lse), dS = P∘(dP − delta); dq (=), dk, dv (=).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_backward(
    dq: DPtr<f32>,
    dk: DPtr<f32>,
    dv: DPtr<f32>,
    dq_stride: usize,
    dkv_stride: usize,
    dout: DPtr<Bf16>,
    q: DPtr<Bf16>,
    k: DPtr<Bf16>,
    v: DPtr<Bf16>,
    lse: DPtr<f32>,
    delta: DPtr<f32>,
    m: &AttnMaskDev,
    d: &AttnDims,
) {
    let (n, hd, nh) = (d.n_tokens, d.head_dim, d.n_heads);
    let (qd, kvd) = (nh * hd, d.n_kv_heads * hd);
    let hm = mask(m, n);
    let (qv, kv, vv) = (rows16(q, n, qd, d.q_stride), rows16(k, n, kvd, d.kv_stride), rows16(v, n, kvd, d.kv_stride));
    let dov = rows16(dout, n, qd, d.o_stride);
    let (l, dl) = (read(lse, n * nh), read(delta, n * nh));
    let (mut gq, mut gk, mut gv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
    let scale = 1.0 / (hd as f32).sqrt();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for t in 0..n {
        let start = hm.group_start[hm.group[t] as usize] as usize;
        for h in 0..nh {
            let g = h / (nh / d.n_kv_heads);
            let qo = t * qd + h * hd;
            for key in start..=t {
                let (bk, bq) = (hm.branch[key], hm.branch[t]);
                if hm.group[key] != hm.group[t] || !(bk == 0 || bk == bq) {
                    continue;
                }
                let ko = key * kvd + g * hd;
                let p = (dot(&qv[qo..qo + hd], &kv[ko..ko + hd]) * scale - l[t * nh + h]).exp();
                let dp = dot(&dov[qo..qo + hd], &vv[ko..ko + hd]);
                let ds = p * (dp - dl[t * nh + h]) * scale;
                for j in 0..hd {
                    gq[qo + j] += ds * kv[ko + j];
                    gk[ko + j] += ds * qv[qo + j];
                    gv[ko + j] += p * dov[qo + j];
                }
            }
        }
    }
    put_rows32(dq, &gq, n, qd, dq_stride);
    put_rows32(dk, &gk, n, kvd, dkv_stride);
    put_rows32(dv, &gv, n, kvd, dkv_stride);
}

// --- rmsnorm.cu

pub(crate) unsafe fn rmsnorm_forward(
    y: DPtr<Bf16>,
    rstd: DPtr<f32>,
    x: DPtr<f32>,
    w: DPtr<Bf16>,
    n: usize,
    h: usize,
    eps: f32,
) {
    let (xv, wv) = (read(x, n * h), rows16(w, 1, h, h));
    let (mut out, mut r) = (vec![0f32; n * h], vec![0f32; n]);
    ops::rmsnorm_forward(&mut out, &mut r, &xv, &wv, h, eps);
    put_rows16(y, &out, n, h, h);
    put_rows32(rstd, &r, 1, n, n);
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rmsnorm_backward(
    dx: DPtr<f32>,
    dw: DPtr<f32>,
    dy: DPtr<f32>,
    x: DPtr<f32>,
    w: DPtr<Bf16>,
    rstd: DPtr<f32>,
    n: usize,
    h: usize,
    accumulate: bool,
) {
    let (dyv, xv, wv, r) = (read(dy, n * h), read(x, n * h), rows16(w, 1, h, h), read(rstd, n));
    let (mut g, mut gw) = (vec![0f32; n * h], vec![0f32; h]);
    ops::rmsnorm_backward(&mut g, &mut gw, &dyv, &xv, &wv, &r, h);
    for (i, gi) in g.iter().enumerate() {
        put(dx, i, if accumulate { at(dx, i) + gi } else { *gi });
    }
    for (i, gi) in gw.iter().enumerate() {
        put(dw, i, at(dw, i) + gi);
    }
}

// --- rope.cu

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rope_forward(
    x: DPtr<Bf16>,
    positions: DPtr<u32>,
    inv_freq: DPtr<f32>,
    n: usize,
    n_heads: usize,
    head_dim: usize,
    stride: usize,
) {
    let mut v = rows16(x, n, n_heads * head_dim, stride);
    ops::rope_forward(&mut v, &read(positions, n), &read(inv_freq, head_dim / 2), n_heads, head_dim);
    put_rows16(x, &v, n, n_heads * head_dim, stride);
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rope_backward(
    dx: DPtr<Bf16>,
    dy: DPtr<f32>,
    positions: DPtr<u32>,
    inv_freq: DPtr<f32>,
    n: usize,
    n_heads: usize,
    head_dim: usize,
    out_stride: usize,
    in_stride: usize,
) {
    let mut v = rows32(dy, n, n_heads * head_dim, in_stride);
    ops::rope_backward(&mut v, &read(positions, n), &read(inv_freq, head_dim / 2), n_heads, head_dim);
    put_rows16(dx, &v, n, n_heads * head_dim, out_stride);
}

// --- logprobs.cu

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn logprobs_forward(
    logp: DPtr<f32>,
    lse: DPtr<f32>,
    logits: DPtr<f32>,
    targets: DPtr<i32>,
    rows: usize,
    vocab: usize,
    ld: usize,
) {
    for r in 0..rows {
        let z = rows32(logits.slice(r * ld, vocab).expect("checked"), 1, vocab, vocab);
        let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let l = mx + z.iter().map(|&x| ((x - mx) as f64).exp()).sum::<f64>().ln() as f32;
        put(lse, r, l);
        for j in 0..2 {
            let t = at(targets, 2 * r + j);
            put(logp, 2 * r + j, if t >= 0 { z[t as usize] - l } else { 0.0 });
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn logprobs_backward(
    dlogits: DPtr<Bf16>,
    logits: DPtr<f32>,
    lse: DPtr<f32>,
    targets: DPtr<i32>,
    dlogp: DPtr<f32>,
    rows: usize,
    vocab: usize,
    ld: usize,
    ld_out: usize,
) {
    for r in 0..rows {
        let (t0, t1) = (at(targets, 2 * r), at(targets, 2 * r + 1));
        let g0 = if t0 >= 0 { at(dlogp, 2 * r) } else { 0.0 };
        let g1 = if t1 >= 0 { at(dlogp, 2 * r + 1) } else { 0.0 };
        let l = at(lse, r);
        for c in 0..vocab {
            let mut d = -(g0 + g1) * (at(logits, r * ld + c) - l).exp();
            if c as i32 == t0 {
                d += g0;
            }
            if c as i32 == t1 {
                d += g1;
            }
            put(dlogits, r * ld_out + c, f2b(d));
        }
    }
}

// --- adamw.cu

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn adamw_update(
    p: DPtr<f32>,
    m: DPtr<f32>,
    v: DPtr<f32>,
    p_bf16: DPtr<Bf16>,
    g: DPtr<f32>,
    grad_scale: f32,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
    zero_grad: bool,
) {
    let n = p.len;
    let (mut pv, mut mv, mut vv) = (read(p, n), read(m, n), read(v, n));
    let gv: Vec<f32> = read(g, n).iter().map(|x| x * grad_scale).collect();
    ops::adamw_update(&mut pv, &mut mv, &mut vv, &gv, lr, beta1, beta2, eps, weight_decay, step);
    put_rows32(p, &pv, 1, n, n);
    put_rows32(m, &mv, 1, n, n);
    put_rows32(v, &vv, 1, n, n);
    if p_bf16.ptr != 0 {
        put_rows16(p_bf16, &pv, 1, n, n);
    }
    if zero_grad {
        zero(g);
    }
}

pub(crate) unsafe fn grad_norm(out: DPtr<f64>, g: DPtr<f32>, accumulate: bool) {
    let s: f64 = read(g, g.len).iter().map(|&x| x as f64 * x as f64).sum();
    put(out, 0, if accumulate { at(out, 0) + s } else { s });
}

// --- elementwise.cu

pub(crate) unsafe fn swiglu_forward(out: DPtr<Bf16>, gate: DPtr<Bf16>, up: DPtr<Bf16>, count: usize) {
    let (g, u) = (rows16(gate, 1, count, count), rows16(up, 1, count, count));
    let mut o = vec![0f32; count];
    ops::swiglu_forward(&mut o, &g, &u);
    put_rows16(out, &o, 1, count, count);
}

pub(crate) unsafe fn swiglu_backward(
    dgate: DPtr<Bf16>,
    dup: DPtr<Bf16>,
    dout: DPtr<Bf16>,
    gate: DPtr<Bf16>,
    up: DPtr<Bf16>,
    count: usize,
) {
    let (g, u, d) = (rows16(gate, 1, count, count), rows16(up, 1, count, count), rows16(dout, 1, count, count));
    let (mut dg, mut du) = (vec![0f32; count], vec![0f32; count]);
    ops::swiglu_backward(&mut dg, &mut du, &d, &g, &u);
    put_rows16(dgate, &dg, 1, count, count);
    put_rows16(dup, &du, 1, count, count);
}

pub(crate) unsafe fn embedding_forward(out: DPtr<f32>, table: DPtr<Bf16>, tokens: DPtr<u32>, h: usize) {
    for (t, &tok) in read(tokens, tokens.len).iter().enumerate() {
        for c in 0..h {
            put(out, t * h + c, b2f(at(table, tok as usize * h + c)));
        }
    }
}

pub(crate) unsafe fn embedding_backward(dtable: DPtr<f32>, dout: DPtr<f32>, tokens: DPtr<u32>, h: usize) {
    for (t, &tok) in read(tokens, tokens.len).iter().enumerate() {
        for c in 0..h {
            let i = tok as usize * h + c;
            put(dtable, i, at(dtable, i) + at(dout, t * h + c));
        }
    }
}

pub(crate) unsafe fn residual_forward(x: DPtr<f32>, y: DPtr<Bf16>, count: usize) {
    for i in 0..count {
        put(x, i, at(x, i) + b2f(at(y, i)));
    }
}

pub(crate) unsafe fn cast_f32_bf16(out: DPtr<Bf16>, input: DPtr<f32>, count: usize) {
    for i in 0..count {
        put(out, i, f2b(at(input, i)));
    }
}

pub(crate) unsafe fn cast_bf16_f32(out: DPtr<f32>, input: DPtr<Bf16>, count: usize) {
    for i in 0..count {
        put(out, i, b2f(at(input, i)));
    }
}

// --- GEMM (row-major contract of gemm::GemmShape)

/// `c = alpha·op(a)·op(b) + beta·c` with bf16 inputs, f32 accumulation, f32 or bf16 `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    c: u64,
    c_bf16: bool,
    a: DPtr<Bf16>,
    b: DPtr<Bf16>,
    s: &super::gemm::GemmShape,
    alpha: f32,
    beta: f32,
) {
    let ea = |i: usize, l: usize| b2f(if s.trans_a { at(a, l * s.lda + i) } else { at(a, i * s.lda + l) });
    let eb = |l: usize, j: usize| b2f(if s.trans_b { at(b, j * s.ldb + l) } else { at(b, l * s.ldb + j) });
    let a_rows: Vec<Vec<f32>> = (0..s.m).map(|i| (0..s.k).map(|l| ea(i, l)).collect()).collect();
    let b_cols: Vec<Vec<f32>> = (0..s.n).map(|j| (0..s.k).map(|l| eb(l, j)).collect()).collect();
    for (i, ar) in a_rows.iter().enumerate() {
        for (j, bc) in b_cols.iter().enumerate() {
            let acc = alpha * ar.iter().zip(bc).map(|(x, y)| x * y).sum::<f32>();
            let idx = i * s.ldc + j;
            if c_bf16 {
                let p: DPtr<Bf16> = DPtr::from_raw(c, idx + 1);
                let old = if beta != 0.0 { beta * b2f(at(p, idx)) } else { 0.0 };
                put(p, idx, f2b(acc + old));
            } else {
                let p: DPtr<f32> = DPtr::from_raw(c, idx + 1);
                let old = if beta != 0.0 { beta * at(p, idx) } else { 0.0 };
                put(p, idx, acc + old);
            }
        }
    }
}
