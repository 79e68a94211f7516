// Fused AdamW over fp32 master weights, and the global gradient norm.
//
// Math (torch.optim.AdamW, single-tensor path, step counted from 1; the host folds the
// scalars into f32 exactly as torch does where Python floats meet f32 tensors):
//   g ← g·grad_scale            (clip_grad_norm_: grad_scale = min(1, max_norm/(norm + 1e-6)))
//   p ← p·decay                 decay = 1 − lr·wd
//   m ← m + (1 − β1)(g − m)     v ← β2·v + (1 − β2)·g²
//   p ← p − step_size · m / (sqrt(v)/bc2_sqrt + eps)
//   with step_size = lr / (1 − β1^step), bc2_sqrt = sqrt(1 − β2^step)
// then the bf16 working copy of p is written (when given) and g is zeroed (when asked),
// so one pass over memory replaces four.
// grad_norm: Σ g² in f64, per block (grad_norm_forward) then over blocks
// (grad_norm_forward_reduce); the host takes the square root.
// Layouts: flat f32 arrays of `count` elements (a tensor, or all parameters at once);
// p_bf16 flat bf16. Work split: one thread per 4 elements (16-byte f32 accesses) in a
// grid-stride loop; grad_norm uses a grid of a few blocks per SM (the launcher's
// grad_norm_blocks: 4 per SM, where the registers would let 8 stay resident) and
// 256-thread blocks, and each thread issues 4 independent 16-byte loads, one grid stride
// apart, before summing them in the same order as before (64 bytes in flight per thread,
// 64 KB per SM at 4 blocks, where one load per iteration gave 16 KB; ptxas 12.9 keeps all
// four ahead at 32 registers on sm_90a; the effect on speed is expected, not measured on a
// GPU); what is left past the last group of 4 strides goes one float4 at a time.
// Bytes per call: AdamW reads 16·count, writes 12·count + 2·count (bf16) + 4·count (zeroed
// g): 34 bytes per parameter; ~12 FLOPs per parameter. grad_norm reads 4·count.
#include "common.cuh"

SDPO_DEVICE void adamw_one(float& p, float& m, float& v, float g, float decay, float w1, float b2, float w2,
                           float step_size, float bc2_sqrt, float eps) {
    p *= decay;
    m += w1 * (g - m);
    v = v * b2 + w2 * g * g;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    p -= step_size * (m / denom);
}

extern "C" __global__ void __launch_bounds__(256) adamw_update(
    float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, __nv_bfloat16* __restrict__ p_bf16,
    float* __restrict__ g, long long count, float grad_scale, float decay, float w1, float b2, float w2,
    float step_size, float bc2_sqrt, float eps, int zero_grad) {
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < count; i += stride) {
        if (i + 4 <= count) {
            float4 pv = *reinterpret_cast<float4*>(p + i), mv = *reinterpret_cast<float4*>(m + i);
            float4 vv = *reinterpret_cast<float4*>(v + i);
            const float4 gv = *reinterpret_cast<const float4*>(g + i);
            adamw_one(pv.x, mv.x, vv.x, gv.x * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            adamw_one(pv.y, mv.y, vv.y, gv.y * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            adamw_one(pv.z, mv.z, vv.z, gv.z * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            adamw_one(pv.w, mv.w, vv.w, gv.w * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
            *reinterpret_cast<float4*>(p + i) = pv;
            *reinterpret_cast<float4*>(m + i) = mv;
            *reinterpret_cast<float4*>(v + i) = vv;
            if (p_bf16) {
                uint2 out;
                out.x = pack_bf16(pv.x, pv.y);
                out.y = pack_bf16(pv.z, pv.w);
                *reinterpret_cast<uint2*>(p_bf16 + i) = out;
            }
            if (zero_grad) *reinterpret_cast<float4*>(g + i) = make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
            for (long long k = i; k < count; k++) {
                adamw_one(p[k], m[k], v[k], g[k] * grad_scale, decay, w1, b2, w2, step_size, bc2_sqrt, eps);
                if (p_bf16) p_bf16[k] = __float2bfloat16(p[k]);
                if (zero_grad) g[k] = 0.f;
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
extern "C" __global__ void __launch_bounds__(256) grad_norm_forward(
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
extern "C" __global__ void __launch_bounds__(256) grad_norm_forward_reduce(
    double* __restrict__ out, const double* __restrict__ partial, int n, int accumulate) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}
