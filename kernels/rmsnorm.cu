// RMSNorm, forward and backward (Llama's LlamaRMSNorm, no bias).
//
// Math, per row x of length H:
//   rstd = 1 / sqrt(mean(x²) + eps)        x̂ = x · rstd        y = x̂ ∘ w
//   backward: dx = rstd · (w∘dy − x̂ · mean(w∘dy∘x̂))           dw += Σ_rows dy ∘ x̂
// Layouts: x [n, H] f32 (the residual stream is kept in f32), w [H] bf16, y [n, H] bf16
// (it feeds a GEMM), rstd [n] f32 and x̂ [n, H] bf16 (optional output: what the engine
// keeps for backward instead of x, half the bytes), dy [n, H] f32 (a GEMM's fp32 output),
// dx [n, H] f32 (= or += into the residual gradient), dw [H] f32 (+=), and optionally
// dx16 [n, H] bf16: bf16(dx) after the = or +=, the next GEMMs' input, rounded to nearest
// even as the cast kernel (cast_f32_bf16) rounds, so no separate cast is launched.
// The backward (rmsnorm_backward_from_xhat) takes x̂ (bf16) and rstd, not x;
// rmsnorm_forward_from_xhat gives y again from x̂ for the backward's weight gradients:
// bf16(x̂_bf16 ∘ w), which can differ from the forward's bf16(x̂ ∘ w) in the last bit
// (rounded twice).
// Work split: forward, one warp per row, 8 rows per 256-thread block, 16-byte accesses
// (H % 8 == 0). Backward, a block takes batches of 8 rows (grid-stride; the launcher
// sizes the grid to 2 blocks per SM): one warp per row computes the row's mean(w∘dy∘x̂),
// then each thread runs down the batch over its own float4 columns, writing dx and
// summing dy∘x̂ in registers; its partial dw for those columns lives in shared memory that
// only it touches (dw_acc, H floats), read and written once per batch, and is added into
// dw once per block with one global atomic per column. No shared-memory atomics: one
// conflict-free float4 read-modify-write per 4 columns per 8 rows, where an atomic per
// element (nH per call) would put a warp's 32 lanes on 4 banks and all 8 warps on the
// same addresses. The cost is registers (96: phase 2 loads 4 rows at a time, 8-12 float4 per thread in
// flight), 2 blocks per SM, which is all the launcher's grid puts on an SM.
// Bytes per call: forward reads 4nH + 2H, writes 2nH + 4n (+ 2nH with x̂); backward reads
// 4nH·2 + 2nH·2 (dy f32, x̂ bf16; the second reads come a batch later at most and hit L2) +
// 2H per row in phase 1 and per batch in phase 2 (L1/L2), writes 4nH (+ 2nH with dx16;
// a separate cast would read 4nH and write 2nH) and reads 4nH more when accumulating. x, dy,
// dx move in 16-byte coalesced accesses, dx16 in 8-byte ones, w in 16 bytes in phase 1
// and 8 bytes in phase 2 (4 columns per thread, so that a warp's x/dy/dx accesses are 512
// contiguous bytes). rmsnorm_forward_from_xhat: reads 2nH + 2H, writes 2nH. FLOPs:
// ~4nH / ~10nH.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256, 1) rmsnorm_forward(
    __nv_bfloat16* __restrict__ y, float* __restrict__ rstd, __nv_bfloat16* __restrict__ xhat,
    const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, int n, int hidden, float eps) {
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
        for (int i = 0; i < 8; i++) v[i] *= r;
        if (xhat != nullptr) store8(xhat + (size_t)row * hidden + c, v);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] *= wv[i];
        store8(yr + c, v);
    }
    if (lane == 0) rstd[row] = r;
}

// y = x̂ ∘ w from the forward's bf16 x̂: one thread per 8 consecutive elements.
extern "C" __global__ void __launch_bounds__(256) rmsnorm_forward_from_xhat(
    __nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ xhat, const __nv_bfloat16* __restrict__ w,
    int n, int hidden) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (long long)n * hidden) return;
    float v[8], wv[8];
    load8(xhat + i, v);
    load8(w + (int)(i % hidden), wv);
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] *= wv[k];
    store8(y + i, v);
}

// Backward, batch by batch (RMS_BATCH rows; batch b of the grid-stride loop):
//   phase 1: one warp per row computes mean = Σ(w∘dy∘x̂)/H and keeps it and rstd in
//            shared memory (double-buffered by batch parity, so one barrier per batch: a
//            warp writing batch b+1's slots has passed the barrier of batch b, which every
//            thread reaches only after finishing batch b−1's phase 2, the last reader of
//            those slots);
//   phase 2: thread t owns columns 4t, 4t+4·blockDim, … (one float4 each) and runs down
//            the batch's rows: dx for those columns, and dy∘x̂ summed in registers, added
//            once per batch into dw_acc[c..c+4], shared memory that only thread t touches.
// A batch's rows past n (only in the last batch) reread row n−1 (L1 hits) and add
// nothing to dw and store nothing (a branch after the loads, uniform across the block);
// no branch stands before the loads, which the compiler issues for a group of RMS_GROUP
// rows at once.
// `accumulate` != 0: dx += result (the residual stream's gradient); else dx = result.
// dx16 != null: bf16(dx) as stored, written beside it (8-byte stores).
// Dynamic shared memory: hidden floats.
#define RMS_BATCH 8
#define RMS_GROUP 4  // rows of a batch whose loads phase 2 issues together

// Four bf16 (8 bytes) widened to f32.
SDPO_DEVICE float4 load4(const __nv_bfloat16* p) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}

// Four f32 rounded to bf16 (round to nearest even, as store8) in one 8-byte store.
SDPO_DEVICE void store4(__nv_bfloat16* p, float4 v) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
}

extern "C" __global__ void __launch_bounds__(256) rmsnorm_backward_from_xhat(
    float* __restrict__ dx, __nv_bfloat16* __restrict__ dx16, float* __restrict__ dw, const float* __restrict__ dy,
    const __nv_bfloat16* __restrict__ xhat, const __nv_bfloat16* __restrict__ w, const float* __restrict__ rstd, int n,
    int hidden, int accumulate) {
    SDPO_DYNAMIC_SMEM(smem);
    float* dw_acc = reinterpret_cast<float*>(smem);
    __shared__ float s_rstd[2][RMS_BATCH], s_mean[2][RMS_BATCH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int c0 = threadIdx.x * 4, c_step = blockDim.x * 4;
    for (int c = c0; c < hidden; c += c_step) *reinterpret_cast<float4*>(dw_acc + c) = make_float4(0.f, 0.f, 0.f, 0.f);
    int buf = 0;
    for (int base = blockIdx.x * RMS_BATCH; base < n; base += gridDim.x * RMS_BATCH, buf ^= 1) {
        for (int r = warp; r < RMS_BATCH; r += n_warps) {
            const int row = base + r;
            float rs = 0.f, mean = 0.f;
            if (row < n) {
                const __nv_bfloat16* xr = xhat + (size_t)row * hidden;
                const float* dyr = dy + (size_t)row * hidden;
                rs = rstd[row];
                float dot = 0.f;  // Σ w∘dy∘x̂
                for (int c = lane * 8; c < hidden; c += 256) {
                    float xv[8], dv[8], wv[8];
                    load8(xr + c, xv);
                    load8(dyr + c, dv);
                    load8(w + c, wv);
#pragma unroll
                    for (int i = 0; i < 8; i++) dot += wv[i] * dv[i] * xv[i];
                }
                mean = warp_sum(dot) * __frcp_rn((float)hidden);
            }
            if (lane == 0) {
                s_rstd[buf][r] = rs;
                s_mean[buf][r] = mean;
            }
        }
        __syncthreads();
        for (int c = c0; c < hidden; c += c_step) {
            const float4 wv = load4(w + c);
            float4 acc = *reinterpret_cast<const float4*>(dw_acc + c);
#pragma unroll
            for (int r0 = 0; r0 < RMS_BATCH; r0 += RMS_GROUP) {
                // A group's loads first (8 or 12 of 16 bytes in flight per thread), then its math.
                float4 xv[RMS_GROUP], dv[RMS_GROUP], o[RMS_GROUP];
#pragma unroll
                for (int r = 0; r < RMS_GROUP; r++) {
                    const size_t off = (size_t)min(base + r0 + r, n - 1) * hidden + c;
                    xv[r] = load4(xhat + off);
                    dv[r] = *reinterpret_cast<const float4*>(dy + off);
                    if (accumulate) o[r] = *reinterpret_cast<const float4*>(dx + off);
                }
#pragma unroll
                for (int r = 0; r < RMS_GROUP; r++) {
                    const float rs = s_rstd[buf][r0 + r], mean = s_mean[buf][r0 + r];
                    const int row = base + r0 + r;
                    if (row >= n) continue;
                    float4 g;
                    g.x = rs * (wv.x * dv[r].x - xv[r].x * mean);
                    g.y = rs * (wv.y * dv[r].y - xv[r].y * mean);
                    g.z = rs * (wv.z * dv[r].z - xv[r].z * mean);
                    g.w = rs * (wv.w * dv[r].w - xv[r].w * mean);
                    acc.x += dv[r].x * xv[r].x;
                    acc.y += dv[r].y * xv[r].y;
                    acc.z += dv[r].z * xv[r].z;
                    acc.w += dv[r].w * xv[r].w;
                    if (accumulate) {
                        g.x += o[r].x;
                        g.y += o[r].y;
                        g.z += o[r].z;
                        g.w += o[r].w;
                    }
                    *reinterpret_cast<float4*>(dx + (size_t)row * hidden + c) = g;
                    if (dx16 != nullptr) store4(dx16 + (size_t)row * hidden + c, g);
                }
            }
            *reinterpret_cast<float4*>(dw_acc + c) = acc;
        }
    }
    __syncthreads();  // dw_acc is added column-contiguously across threads below
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) atomicAdd(&dw[c], dw_acc[c]);
}
