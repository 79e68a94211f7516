// Rotary position embedding, forward and backward, from position ids and an inv_freq table.
//
// Math (transformers' rotate_half convention), per head vector x of length D, half = D/2,
// i < half, θ_i = position · inv_freq[i] (f32 product, then accurate sincosf, as
// transformers computes cos/sin in f32):
//   y[i] = x[i]·cos θ_i − x[i+half]·sin θ_i        y[i+half] = x[i+half]·cos θ_i + x[i]·sin θ_i
//   backward is the rotation by −θ: dx[i] = dy[i]·cos + dy[i+half]·sin,
//                                   dx[i+half] = dy[i+half]·cos − dy[i]·sin
// The rope type (default, linear, llama3) only changes inv_freq, computed on the host
// (LlamaConfig::inv_freq), so one kernel serves all three.
// Layouts: x [n, stride] bf16, head h of token t at x + t·stride + h·D (q, k or a fused qkv
// buffer); positions [n] u32; inv_freq [half] f32. Backward reads dy [n, in_stride] f32
// (the attention kernel's fp32 gradient) and writes dx [n, out_stride] bf16 (a GEMM input).
// Work split: one thread per (token, head, 8 consecutive i) when half % 8 == 0 (16-byte
// accesses to both halves), else one thread per (token, head, i).
// Bytes per call: forward 4·n·H·D (read + write bf16); backward 6·n·H·D. FLOPs ~6·n·H·D
// plus n·H·D/2 sincos.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) rope_forward(
    __nv_bfloat16* __restrict__ x, const unsigned int* __restrict__ positions, const float* __restrict__ inv_freq,
    int n, int n_heads, int head_dim, int stride) {
    const int half = head_dim / 2;
    const int vec = (half % 8 == 0) ? 8 : 1;
    const int per_head = half / vec;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * n_heads * per_head) return;
    const int j = (int)(idx % per_head) * vec;
    const int h = (int)((idx / per_head) % n_heads);
    const int t = (int)(idx / ((long long)per_head * n_heads));
    __nv_bfloat16* p = x + (size_t)t * stride + (size_t)h * head_dim;
    const float pos = (float)positions[t];
    if (vec == 8) {
        float a[8], b[8];
        load8(p + j, a);
        load8(p + j + half, b);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float s, c;
            sincosf(pos * inv_freq[j + i], &s, &c);
            const float lo = a[i] * c - b[i] * s, hi = b[i] * c + a[i] * s;
            a[i] = lo;
            b[i] = hi;
        }
        store8(p + j, a);
        store8(p + j + half, b);
    } else {
        float s, c;
        sincosf(pos * inv_freq[j], &s, &c);
        const float a = __bfloat162float(p[j]), b = __bfloat162float(p[j + half]);
        p[j] = __float2bfloat16(a * c - b * s);
        p[j + half] = __float2bfloat16(b * c + a * s);
    }
}

extern "C" __global__ void __launch_bounds__(256) rope_backward(
    __nv_bfloat16* __restrict__ dx, const float* __restrict__ dy, const unsigned int* __restrict__ positions,
    const float* __restrict__ inv_freq, int n, int n_heads, int head_dim, int out_stride, int in_stride) {
    const int half = head_dim / 2;
    const int vec = (half % 8 == 0) ? 8 : 1;
    const int per_head = half / vec;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * n_heads * per_head) return;
    const int j = (int)(idx % per_head) * vec;
    const int h = (int)((idx / per_head) % n_heads);
    const int t = (int)(idx / ((long long)per_head * n_heads));
    const float* g = dy + (size_t)t * in_stride + (size_t)h * head_dim;
    __nv_bfloat16* o = dx + (size_t)t * out_stride + (size_t)h * head_dim;
    const float pos = (float)positions[t];
    if (vec == 8) {
        float a[8], b[8];
        load8(g + j, a);
        load8(g + j + half, b);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float s, c;
            sincosf(pos * inv_freq[j + i], &s, &c);
            const float lo = a[i] * c + b[i] * s, hi = b[i] * c - a[i] * s;
            a[i] = lo;
            b[i] = hi;
        }
        store8(o + j, a);
        store8(o + j + half, b);
    } else {
        float s, c;
        sincosf(pos * inv_freq[j], &s, &c);
        const float a = g[j], b = g[j + half];
        o[j] = __float2bfloat16(a * c + b * s);
        o[j + half] = __float2bfloat16(b * c - a * s);
    }
}
