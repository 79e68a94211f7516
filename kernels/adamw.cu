// Fused AdamW over fp32 master weights held as two 16-bit halves, and the global
// gradient norm.
//
// Math (torch.optim.AdamW, single-tensor path, step counted from 1; the host folds the
// scalars into f32 exactly as torch does where Python floats meet f32 tensors):
//   g ← g·grad_scale            (clip_grad_norm_: grad_scale = min(1, max_norm/(norm + 1e-6)))
//   p ← p·decay                 decay = 1 − lr·wd
//   m ← m + (1 − β1)(g − m)     v ← β2·v + (1 − β2)·g²
//   p ← p − step_size · m / (sqrt(v)/bc2_sqrt + eps)
//   with step_size = lr / (1 − β1^step), bc2_sqrt = sqrt(1 − β2^step)
// then g is zeroed: one pass over memory, where clipping, the update and a memset of the
// gradients would each take one.
// Master weights: an fp32 p is stored as hi = its bits + 0x8000, top half (p rounded to
// bf16, ties away from zero: the bf16 working copy the GEMMs read) and lo = the bits minus
// hi << 16 (a signed 16-bit remainder, in [−0x8000, 0x7fff]). hi << 16 + lo gives the bits
// back exactly (32-bit wrapping arithmetic), so p is fp32 to the last bit while the
// working copy costs nothing extra: 4 bytes per parameter, not the 6 of an fp32 master
// beside a bf16 copy. The working copy differs from round-to-nearest-even only on exact ties
// (low half 0x8000: one value in 65,536), by one bf16 ulp. src/engine/cuda/mod.rs
// (split_master, join_master) is the host's side of the same format.
// grad_norm: Σ g² in f64, one partial sum per block; grad_norm_reduce adds the blocks'
// partial sums; the host takes the square root.
// Layouts: flat arrays of `count` elements (a tensor, or all parameters at once): p_hi,
// p_lo 16-bit, m, v, g f32. Work split: one thread per 4 elements (16-byte f32 accesses,
// 8-byte halves) in a grid-stride loop of 256-thread blocks. Both grids are one wave: as
// many blocks as the driver's occupancy query says fit on the SMs at once (the launchers
// in src/engine/cuda/kernels.rs). In grad_norm each thread issues 4 independent 16-byte
// loads, one grid stride apart, before summing them in order: 64 bytes in flight per
// thread where one load at a time gives 16, as DRAM latency asks ~25 KB in flight per SM
// (ptxas 12.9 keeps all four ahead at 32 registers on sm_90a); what is left past the last
// group of 4 strides goes one float4 at a time.
// Bytes per call: AdamW reads 16·count (hi, lo, m, v, g), writes 16·count (hi, lo, m, v,
// g zeroed): 32 bytes per parameter; ~12 FLOPs per parameter. grad_norm reads 4·count.
#include "common.cuh"

SDPO_DEVICE float master_join(u32 hi, u32 lo) {
    return __uint_as_float((hi << 16) + (u32)(int)(short)(unsigned short)lo);
}

// (hi, lo) of p, each in the low 16 bits.
SDPO_DEVICE void master_split(float p, u32& hi, u32& lo) {
    const u32 bits = __float_as_uint(p);
    hi = (bits + 0x8000u) >> 16;
    lo = (bits - (hi << 16)) & 0xffffu;
}

SDPO_DEVICE void adamw_one(float& p, float& m, float& v, float g, float decay, float w1, float b2, float w2,
                           float step_size, float bc2_sqrt, float eps) {
    p *= decay;
    m += w1 * (g - m);
    v = v * b2 + w2 * g * g;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    p -= step_size * (m / denom);
}

extern "C" __global__ void __launch_bounds__(256) adamw_step(
    unsigned short* __restrict__ p_hi, unsigned short* __restrict__ p_lo, float* __restrict__ m,
    float* __restrict__ v, float* __restrict__ g, long long count, float grad_scale, float decay, float w1, float b2,
    float w2, float step_size, float bc2_sqrt, float eps) {
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < count; i += stride) {
        if (i + 4 <= count) {
            const uint2 hv = *reinterpret_cast<const uint2*>(p_hi + i), lv = *reinterpret_cast<const uint2*>(p_lo + i);
            float p[4] = {master_join(hv.x & 0xffffu, lv.x & 0xffffu), master_join(hv.x >> 16, lv.x >> 16),
                          master_join(hv.y & 0xffffu, lv.y & 0xffffu), master_join(hv.y >> 16, lv.y >> 16)};
            float4 mv = *reinterpret_cast<float4*>(m + i), vv = *reinterpret_cast<float4*>(v + i);
            const float4 gv = *reinterpret_cast<const float4*>(g + i);
            adamw_one(p[0], mv.x, vv.x, gv.x * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            adamw_one(p[1], mv.y, vv.y, gv.y * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            adamw_one(p[2], mv.z, vv.z, gv.z * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            adamw_one(p[3], mv.w, vv.w, gv.w * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            u32 h[4], l[4];
#pragma unroll
            for (int k = 0; k < 4; k++) master_split(p[k], h[k], l[k]);
            *reinterpret_cast<uint2*>(p_hi + i) = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
            *reinterpret_cast<uint2*>(p_lo + i) = make_uint2(l[0] | (l[1] << 16), l[2] | (l[3] << 16));
            *reinterpret_cast<float4*>(m + i) = mv;
            *reinterpret_cast<float4*>(v + i) = vv;
            *reinterpret_cast<float4*>(g + i) = make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
            for (long long k = i; k < count; k++) {
                float p = master_join(p_hi[k], p_lo[k]);
                adamw_one(p, m[k], v[k], g[k] * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
                u32 h, l;
                master_split(p, h, l);
                p_hi[k] = (unsigned short)h;
                p_lo[k] = (unsigned short)l;
                g[k] = 0.f;
            }
        }
    }
}

SDPO_DEVICE double block_sum_f64(double v) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// partial[blockIdx.x] = Σ g² over this block's grid-stride share.
extern "C" __global__ void __launch_bounds__(256) grad_norm(
    double* __restrict__ partial, const float* __restrict__ g, long long count) {
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    for (; i + 3 * stride + 4 <= count; i += 4 * stride) {
        float4 v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = *reinterpret_cast<const float4*>(g + i + k * stride);
#pragma unroll
        for (const float4& w : v) acc += (double)w.x * w.x + (double)w.y * w.y + (double)w.z * w.z + (double)w.w * w.w;
    }
    for (; i < count; i += stride) {
        if (i + 4 <= count) {
            const float4 v = *reinterpret_cast<const float4*>(g + i);
            acc += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        } else {
            for (long long k = i; k < count; k++) acc += (double)g[k] * g[k];
        }
    }
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] (+)= Σ partial; one block. `accumulate` lets several tensors share one total.
extern "C" __global__ void __launch_bounds__(256) grad_norm_reduce(
    double* __restrict__ out, const double* __restrict__ partial, int n, int accumulate) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}
