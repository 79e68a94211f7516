// Element-wise kernels: SwiGLU, embedding gather / scatter-add, casts. (The residual adds
// are the GEMMs' epilogue: cuBLASLt D = A·B + C.)
//
// Math:
//   swiglu:    out = silu(g)·u = g·σ(g)·u
//              dg = dout·u·σ(g)·(1 + g·(1 − σ(g)))      du = dout·silu(g)      (both =)
//              the backward also writes out again (bit for bit the forward's: the same
//              expression), so the engine keeps gate|up per layer but not out
//   embedding: out[t] = table[token[t]]                 dtable[token[t]] += dout[t]
//              except where token[t] == padding (PyTorch's padding_idx, transformers'
//              pad_token_id): that row gets nothing from the lookup; padding < 0 is none
//   casts:     f32 <-> bf16 (round to nearest even)
// Layouts: swiglu's gate and up are one bf16 matrix gu [rows, 2I], gate in columns 0..I
// and up in I..2I of each row (one GEMM's output, xn·[Wg; Wu]ᵀ), and its gradient dgu the
// same; out, dout [rows, I] bf16. Casts: flat arrays of `count` elements. Embedding table
// [vocab, H] bf16, its gradient [vocab, H] f32, rows [n, H] f32 (the residual stream).
// Work split: one thread per 8 consecutive elements (16-byte accesses). SwiGLU: grid
// (rows, column blocks), thread t of column block b takes columns 8·(256b + t) .. +8 of
// its row in out and the same columns of gate and of up (I % 8 == 0, so a group never
// straddles gate and up; no division to find the row). Casts: a tail shorter than 8 goes
// element by element. Embedding: one thread per (token, 8 columns).
// Bytes per call (c = rows·I for swiglu, count for casts): swiglu fwd 6c (gu read, out
// written), bwd 12c (gu, dout read; dgu, out written); casts 6c; embedding fwd 6nH (+4n),
// bwd 8nH read-modify-write through L2 atomics (two 16-byte atomics per thread on sm_90,
// eight scalar ones on sm_80).
#include "common.cuh"

SDPO_DEVICE float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// Launched with grid (rows, ceil(I / 8 / 256)) and 256 threads; I % 8 == 0.
extern "C" __global__ void __launch_bounds__(256) swiglu_forward(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gu, int rows, int inter) {
    const int row = blockIdx.x, c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (row >= rows || c >= inter) return;
    const __nv_bfloat16* gr = gu + (size_t)row * 2 * inter;
    float g[8], u[8];
    load8(gr + c, g);
    load8(gr + inter + c, u);
#pragma unroll
    for (int k = 0; k < 8; k++) g[k] = g[k] * sigmoidf_(g[k]) * u[k];
    store8(out + (size_t)row * inter + c, g);
}

// The forward's grid and layout.
extern "C" __global__ void __launch_bounds__(256) swiglu_backward(
    __nv_bfloat16* __restrict__ dgu, __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ dout,
    const __nv_bfloat16* __restrict__ gu, int rows, int inter) {
    const int row = blockIdx.x, c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (row >= rows || c >= inter) return;
    const size_t g_off = (size_t)row * 2 * inter + c, o_off = (size_t)row * inter + c;
    float g[8], u[8], d[8], o[8];
    load8(gu + g_off, g);
    load8(gu + g_off + inter, u);
    load8(dout + o_off, d);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const float s = sigmoidf_(g[k]);
        o[k] = g[k] * s * u[k];  // the forward's expression
        const float dg = d[k] * u[k] * s * (1.f + g[k] * (1.f - s));
        u[k] = d[k] * g[k] * s;
        g[k] = dg;
    }
    store8(dgu + g_off, g);
    store8(dgu + g_off + inter, u);
    store8(out + o_off, o);
}

// hidden % 8 == 0.
extern "C" __global__ void __launch_bounds__(256) embedding_forward(
    float* __restrict__ out, const __nv_bfloat16* __restrict__ table, const unsigned int* __restrict__ tokens, int n,
    int hidden) {
    const int per_row = hidden / 8;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * per_row) return;
    const int t = (int)(idx / per_row), c = (int)(idx % per_row) * 8;
    float v[8];
    load8(table + (size_t)tokens[t] * hidden + c, v);
    store8(out + (size_t)t * hidden + c, v);
}

// dtable += scatter(dout), row `padding` excepted; a token may repeat, hence atomics.
// hidden % 8 == 0.
extern "C" __global__ void __launch_bounds__(256) embedding_backward(
    float* __restrict__ dtable, const float* __restrict__ dout, const unsigned int* __restrict__ tokens, int n,
    int hidden, int padding) {
    const int per_row = hidden / 8;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * per_row) return;
    const int t = (int)(idx / per_row), c = (int)(idx % per_row) * 8;
    if ((long long)tokens[t] == padding) return;
    float v[8];
    load8(dout + (size_t)t * hidden + c, v);
    float* dst = dtable + (size_t)tokens[t] * hidden + c;
    atomic_add4(dst, v[0], v[1], v[2], v[3]);
    atomic_add4(dst + 4, v[4], v[5], v[6], v[7]);
}

extern "C" __global__ void __launch_bounds__(256) cast_f32_bf16(
    __nv_bfloat16* __restrict__ out, const float* __restrict__ in, long long count) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i + 8 <= count) {
        float a[8];
        load8(in + i, a);
        store8(out + i, a);
    } else {
        for (long long k = i; k < count; k++) out[k] = __float2bfloat16(in[k]);
    }
}

extern "C" __global__ void __launch_bounds__(256) cast_bf16_f32(
    float* __restrict__ out, const __nv_bfloat16* __restrict__ in, long long count) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i + 8 <= count) {
        float a[8];
        load8(in + i, a);
        store8(out + i, a);
    } else {
        for (long long k = i; k < count; k++) out[k] = __bfloat162float(in[k]);
    }
}
