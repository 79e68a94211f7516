// Fused log-softmax + gather over the vocabulary, forward and backward, for the rows of one
// LM-head chunk (only rows that predict completion tokens reach it; see PairBatch).
//
// Math, per row r with logits z (length V) and up to two targets t_0, t_1 (the last
// prompt row predicts both the first chosen and the first rejected token):
//   lse_r = log Σ_v exp(z_v)                logp_{r,j} = z_{t_j} − lse_r
//   backward, with G_r = Σ_j dlogp_{r,j}:   dz_v = Σ_{j: t_j = v} dlogp_{r,j} − G_r·exp(z_v − lse_r)
// Layouts: logits [rows, ld] f32 (the LM-head GEMM's fp32 output, ld ≥ V); targets
// [rows, 2] i32 token ids (−1 = no target); logp [rows, 2] f32 (0 where no target);
// lse [rows] f32; dlogp [rows, 2] f32; dlogits [rows, ld_out] bf16 (it feeds the two
// backward GEMMs). The target columns are handled by the thread that owns them, so a row
// whose two targets are the same token gets both contributions without a race.
// Work split: one 512-thread block per row; each thread keeps a running (max, sum) over
// its columns (one pass, online softmax), merged across the block. Each thread loads
// UNROLL = 4 float4 (float4 columns c, c+512, c+1024, c+1536: every load stays coalesced
// across the warp) before using any, then, in the forward, takes their max and rescales
// its sum once per 16 values (one exp per value plus one, no data-dependent branch per
// value). In flight: up to 64 bytes per thread, 32 KB per block, ~64 KB per H200 SM at
// the ~2 blocks/SM a ~261-row chunk gives (was 16 KB; Little's law at 4.8 TB/s and
// ~650 ns asks ~25 KB). ptxas 12.9 (sm_90a, 32 registers) keeps all four loads ahead of
// their use in the forward; in the backward it issues two ahead and the other two as the
// first two are consumed (its register target; the driver's JIT makes the final schedule
// from our PTX). Expected to move these kernels closer to copy bandwidth: not measured on
// a GPU. Tails: float4 columns past the last full group of 4·512 go one float4 at a time;
// the V % 4 columns after the last float4, and every column when ld (or ld_out) is not a
// multiple of 4, go as scalars, 4 loads per thread at a time.
// Bytes per call: forward 4·rows·V read; backward 4·rows·V read + 2·rows·V written.
// FLOPs: ~3·rows·V (exp dominates) each way.
#include "common.cuh"

// Merges a running (max, sum of exp(z − max)) pair with another.
SDPO_DEVICE void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;  // both empty
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

// Block-wide (max, sum) merge; every thread gets the row's log-sum-exp.
SDPO_DEVICE float block_lse(float m, float s) {
    __shared__ float sm[32], ss[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < n_warps ? sm[lane] : -INFINITY;
    s = lane < n_warps ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    return m + logf(s);
}

SDPO_DEVICE void online_add(float& m, float& s, float z) {
    if (z > m) {
        s = s * __expf(m - z) + 1.f;
        m = z;
    } else {
        s += __expf(z - m);
    }
}

// online_add over N values at once: one max, at most one rescale, N exps and no
// data-dependent branch per value (the same sum up to fp32 rounding).
template <int N>
SDPO_DEVICE void online_add_n(float& m, float& s, const float (&z)[N]) {
    float mx = z[0];
#pragma unroll
    for (int k = 1; k < N; k++) mx = fmaxf(mx, z[k]);
    if (mx > m) {
        s *= __expf(m - mx);
        m = mx;
    }
#pragma unroll
    for (int k = 0; k < N; k++) s += __expf(z[k] - m);
}

// Independent 16-byte loads issued per thread before any is used (see the top comment).
constexpr int UNROLL = 4;

extern "C" __global__ void __launch_bounds__(512) logprobs_forward(
    float* __restrict__ logp, float* __restrict__ lse, const float* __restrict__ logits, const int* __restrict__ targets,
    int rows, int vocab, int ld) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* z = logits + (size_t)r * ld;
    const int step = blockDim.x;
    float m = -INFINITY, s = 0.f;
    int c = threadIdx.x;  // a float4 index, then a column index
    if ((ld & 3) == 0) {
        const float4* z4 = reinterpret_cast<const float4*>(z);
        const int n4 = vocab / 4;
        for (; c + (UNROLL - 1) * step < n4; c += UNROLL * step) {
            float v[4 * UNROLL];
#pragma unroll
            for (int k = 0; k < UNROLL; k++) {
                const float4 q = z4[c + k * step];
                v[4 * k] = q.x, v[4 * k + 1] = q.y, v[4 * k + 2] = q.z, v[4 * k + 3] = q.w;
            }
            online_add_n(m, s, v);
        }
#pragma unroll 1
        for (; c < n4; c += step) {  // at most UNROLL − 1 times
            const float4 q = z4[c];
            const float v[4] = {q.x, q.y, q.z, q.w};
            online_add_n(m, s, v);
        }
        c = 4 * n4 + threadIdx.x;
    }
    for (; c + 3 * step < vocab; c += 4 * step) {
        const float v[4] = {z[c], z[c + step], z[c + 2 * step], z[c + 3 * step]};
        online_add_n(m, s, v);
    }
#pragma unroll 1
    for (; c < vocab; c += step) online_add(m, s, z[c]);  // at most 3 times
    const float l = block_lse(m, s);
    if (threadIdx.x < 2) {
        const int t = targets[2 * r + threadIdx.x];
        logp[2 * r + threadIdx.x] = t >= 0 ? z[t] - l : 0.f;
    }
    if (threadIdx.x == 0) lse[r] = l;
}

extern "C" __global__ void __launch_bounds__(512) logprobs_backward(
    __nv_bfloat16* __restrict__ dlogits, const float* __restrict__ logits, const float* __restrict__ lse,
    const int* __restrict__ targets, const float* __restrict__ dlogp, int rows, int vocab, int ld, int ld_out) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* z = logits + (size_t)r * ld;
    __nv_bfloat16* dz = dlogits + (size_t)r * ld_out;
    const int t0 = targets[2 * r], t1 = targets[2 * r + 1];
    const float g0 = t0 >= 0 ? dlogp[2 * r] : 0.f, g1 = t1 >= 0 ? dlogp[2 * r + 1] : 0.f;
    const float G = g0 + g1, l = lse[r];
    auto grad = [&](int c, float zc) {
        float d = -G * __expf(zc - l);
        if (c == t0) d += g0;
        if (c == t1) d += g1;
        return d;
    };
    // Columns 4·c4 .. 4·c4+3 from one float4 of logits, stored as one 8-byte bf16 group.
    auto grad4 = [&](int c4, float4 v) {
        const int b = 4 * c4;
        uint2 out;
        out.x = pack_bf16(grad(b, v.x), grad(b + 1, v.y));
        out.y = pack_bf16(grad(b + 2, v.z), grad(b + 3, v.w));
        *reinterpret_cast<uint2*>(dz + b) = out;
    };
    const int step = blockDim.x;
    int c = threadIdx.x;  // a float4 index, then a column index
    if ((ld & 3) == 0 && (ld_out & 3) == 0) {
        const float4* z4 = reinterpret_cast<const float4*>(z);
        const int n4 = vocab / 4;
        for (; c + (UNROLL - 1) * step < n4; c += UNROLL * step) {
            float4 v[UNROLL];
#pragma unroll
            for (int k = 0; k < UNROLL; k++) v[k] = z4[c + k * step];
#pragma unroll
            for (int k = 0; k < UNROLL; k++) grad4(c + k * step, v[k]);
        }
#pragma unroll 1
        for (; c < n4; c += step) grad4(c, z4[c]);  // at most UNROLL − 1 times
        c = 4 * n4 + threadIdx.x;
    }
    for (; c + 3 * step < vocab; c += 4 * step) {
        const float v[4] = {z[c], z[c + step], z[c + 2 * step], z[c + 3 * step]};
#pragma unroll
        for (int k = 0; k < 4; k++) dz[c + k * step] = __float2bfloat16(grad(c + k * step, v[k]));
    }
#pragma unroll 1
    for (; c < vocab; c += step) dz[c] = __float2bfloat16(grad(c, z[c]));  // at most 3 times
}
