// RMSNorm, forward and backward (Llama's LlamaRMSNorm, no bias).
//
// Math, per row x of length H:
//   rstd = 1 / sqrt(mean(x²) + eps)        x̂ = x · rstd        y = x̂ ∘ w
//   backward: dx = rstd · (w∘dy − x̂ · mean(w∘dy∘x̂))           dw += Σ_rows dy ∘ x̂
// Layouts: x [n, H] f32 (the residual stream is kept in f32), w [H] bf16, y [n, H] bf16
// (it feeds a GEMM), rstd [n] f32 (kept for backward), dy [n, H] f32 (a GEMM's fp32
// output), dx [n, H] f32 (= or += into the residual gradient), dw [H] f32 (+=).
// Work split: one warp per row, 8 rows per 256-thread block, 16-byte accesses (H % 8 == 0).
// Backward sums its rows' dy∘x̂ in shared memory (H floats per block) and adds that once
// per block into dw with atomics; the grid is sized by the launcher to a few blocks per SM.
// Bytes per call: forward reads 4nH + 2H, writes 2nH + 4n; backward reads 4nH·2 (dy, x;
// the second pass hits L2) + 2H, writes 4nH (8nH when accumulating). FLOPs: ~4nH / ~10nH.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256, 1) rmsnorm_forward(
    __nv_bfloat16* __restrict__ y, float* __restrict__ rstd, const float* __restrict__ x,
    const __nv_bfloat16* __restrict__ w, int n, int hidden, float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const float* xr = x + (size_t)row * hidden;
    float ss = 0.f;
    for (int c = lane * 8; c < hidden; c += 256) {
        float v[8];
        load8(xr + c, v);
#pragma unroll
        for (int i = 0; i < 8; i++) ss += v[i] * v[i];
    }
    const float r = rsqrtf(warp_sum(ss) * __frcp_rn((float)hidden) + eps);
    __nv_bfloat16* yr = y + (size_t)row * hidden;
    for (int c = lane * 8; c < hidden; c += 256) {
        float v[8], wv[8];
        load8(xr + c, v);
        load8(w + c, wv);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = v[i] * r * wv[i];
        store8(yr + c, v);
    }
    if (lane == 0) rstd[row] = r;
}

// `accumulate` != 0: dx += result (the residual stream's gradient); else dx = result.
// Dynamic shared memory: hidden floats.
extern "C" __global__ void __launch_bounds__(256) rmsnorm_backward(
    float* __restrict__ dx, float* __restrict__ dw, const float* __restrict__ dy, const float* __restrict__ x,
    const __nv_bfloat16* __restrict__ w, const float* __restrict__ rstd, int n, int hidden, int accumulate) {
    SDPO_DYNAMIC_SMEM(smem);
    float* dw_acc = reinterpret_cast<float*>(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dw_acc[c] = 0.f;
    __syncthreads();
    for (int row = blockIdx.x * n_warps + warp; row < n; row += gridDim.x * n_warps) {
        const float* xr = x + (size_t)row * hidden;
        const float* dyr = dy + (size_t)row * hidden;
        const float r = rstd[row];
        float dot = 0.f;  // Σ w∘dy∘x̂
        for (int c = lane * 8; c < hidden; c += 256) {
            float xv[8], dv[8], wv[8];
            load8(xr + c, xv);
            load8(dyr + c, dv);
            load8(w + c, wv);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float xh = xv[i] * r;
                dot += wv[i] * dv[i] * xh;
                atomicAdd(&dw_acc[c + i], dv[i] * xh);
            }
        }
        const float mean = warp_sum(dot) * __frcp_rn((float)hidden);
        float* dxr = dx + (size_t)row * hidden;
        for (int c = lane * 8; c < hidden; c += 256) {
            float xv[8], dv[8], wv[8], out[8];
            load8(xr + c, xv);
            load8(dyr + c, dv);
            load8(w + c, wv);
            if (accumulate) load8(dxr + c, out);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float g = r * (wv[i] * dv[i] - xv[i] * r * mean);
                out[i] = accumulate ? out[i] + g : g;
            }
            store8(dxr + c, out);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) atomicAdd(&dw[c], dw_acc[c]);
}
