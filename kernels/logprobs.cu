// Fused log-softmax + gather over the vocabulary for the LM-head rows (only rows that
// predict completion tokens reach it; see PairBatch), and its backward.
//
// Math, per row r with logits z (length V) and up to two targets t_0, t_1 (the last
// prompt row predicts both the first chosen and the first rejected token):
//   lse_r = log Σ_v exp(z_v)     logp_{r,j} = z_{t_j} − lse_r     p_v = exp(z_v − lse_r)
//   backward, with G_r = Σ_j dlogp_{r,j}:   dz_v = Σ_{j: t_j = v} dlogp_{r,j} − G_r·p_v
// The forward runs chunk by chunk over the LM-head GEMM's fp32 logits; in training it
// also writes p in bf16 for every row (probs, null otherwise), and the backward turns
// probs into dlogits in place once the loss has given dlogp: the backward needs neither
// the logits again (no second LM-head GEMM) nor the chunks (one pair of head GEMMs over
// all rows instead of one per chunk, each re-reading and re-writing the fp32 head
// gradient). At the target columns the backward uses p = exp(logp) in f32, so 1 − p stays
// accurate for a confident model (bf16 p near 1 is only 2^-9-accurate). Elsewhere p is
// rounded to bf16 twice (probs, then dlogits): ≤ 2^-8 relative per element.
// Layouts: logits [rows, ld] f32; targets [rows, 2] i32 token ids (−1 = no target); logp
// [rows, 2] f32 (0 where no target); lse [rows] f32 (optional: null skips it); probs /
// dlogits [rows, ld_p] bf16;
// dlogp [rows, 2] f32. The target columns are handled by the thread that owns them, so a
// row whose two targets are the same token gets both contributions without a race.
// Work split: one 512-thread block per row; each thread keeps a running (max, sum) over
// its columns (one pass, online softmax), merged across the block. Each thread loads
// UNROLL = 4 vectors (float4 columns c, c+512, c+1024, c+1536 in the forward's first pass;
// 8-column groups in the probs pass and the backward: every load stays coalesced across
// the warp) before using any, then, in the first pass, takes their max and rescales its
// sum once per 16 values (one exp per value plus one, no data-dependent branch per value).
// In flight per thread: 64 bytes (first pass: 4 float4), 128 (probs pass: 4 × 8 f32), 64
// (backward: 4 × 8 bf16); 32–64 KB per block, 2–3 blocks per H200 SM (Little's law at
// 4.8 TB/s and ~650 ns asks ~25 KB per SM), enough by that count to stream at close
// to copy bandwidth. Tails: vectors past the last
// full group of 4·512 go one at a time; the columns after the last vector, and every
// column when ld (or ld_p) is not a multiple of 4 (8 for the bf16 passes), go as scalars.
// Bytes per row: forward 4·V read, plus 4·V read + 2·V written with probs; backward 2·V
// read + 2·V written. FLOPs: ~3·V (exp dominates) per pass.
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

SDPO_DEVICE float as_f32(float x) { return x; }
SDPO_DEVICE float as_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// out[c] = bf16(f(c, in[c])) for the block's row, c < vocab: 8-column vectors (UNROLL of
// them loaded per thread before any is used) when `vec`, scalars after the last vector
// and everywhere otherwise. `in` may be `out` (each element is read, then written, by
// the same thread).
template <typename T, typename F>
SDPO_DEVICE void map_row_bf16(__nv_bfloat16* out, const T* in, int vocab, bool vec, F f) {
    const int step = blockDim.x;
    int c = threadIdx.x;  // an 8-column group, then a column
    if (vec) {
        const int n8 = vocab / 8;
        for (; c + (UNROLL - 1) * step < n8; c += UNROLL * step) {
            float v[UNROLL][8];
#pragma unroll
            for (int k = 0; k < UNROLL; k++) load8(in + 8 * (c + k * step), v[k]);
#pragma unroll
            for (int k = 0; k < UNROLL; k++) {
#pragma unroll
                for (int e = 0; e < 8; e++) v[k][e] = f(8 * (c + k * step) + e, v[k][e]);
                store8(out + 8 * (c + k * step), v[k]);
            }
        }
#pragma unroll 1
        for (; c < n8; c += step) {  // at most UNROLL − 1 times
            float v[8];
            load8(in + 8 * c, v);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = f(8 * c + e, v[e]);
            store8(out + 8 * c, v);
        }
        c = 8 * n8 + threadIdx.x;
    }
#pragma unroll 1
    for (; c < vocab; c += step) out[c] = __float2bfloat16(f(c, as_f32(in[c])));
}

extern "C" __global__ void __launch_bounds__(512) logprobs_forward(
    float* __restrict__ logp, float* __restrict__ lse, __nv_bfloat16* __restrict__ probs,
    const float* __restrict__ logits, const int* __restrict__ targets, int rows, int vocab, int ld, int ld_p) {
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
    if (threadIdx.x == 0 && lse != nullptr) lse[r] = l;
    if (probs == nullptr) return;
    // Second pass (training): the row's softmax in bf16, for the backward.
    const bool vec = (ld & 7) == 0 && (ld_p & 7) == 0;
    map_row_bf16(probs + (size_t)r * ld_p, z, vocab, vec, [&](int, float x) { return __expf(x - l); });
}

// In place: probs (the forward's bf16 softmax) in, dlogits out.
extern "C" __global__ void __launch_bounds__(512) logprobs_backward(
    __nv_bfloat16* __restrict__ dz_rows, const float* __restrict__ logp, const int* __restrict__ targets,
    const float* __restrict__ dlogp, int rows, int vocab, int ld) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    __nv_bfloat16* dz = dz_rows + (size_t)r * ld;
    const int t0 = targets[2 * r], t1 = targets[2 * r + 1];
    const float g0 = t0 >= 0 ? dlogp[2 * r] : 0.f, g1 = t1 >= 0 ? dlogp[2 * r + 1] : 0.f;
    // The target columns' probabilities in f32 from their log-probs (1 − p must not come
    // from a bf16 p near 1).
    const float p0 = t0 >= 0 ? expf(logp[2 * r]) : 0.f, p1 = t1 >= 0 ? expf(logp[2 * r + 1]) : 0.f;
    const float G = g0 + g1;
    auto grad = [&](int c, float p) {
        if (c == t0) p = p0;
        else if (c == t1) p = p1;
        float d = -G * p;
        if (c == t0) d += g0;
        if (c == t1) d += g1;
        return d;
    };
    map_row_bf16(dz, dz, vocab, (ld & 7) == 0, grad);
}
