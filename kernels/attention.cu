// Fused causal attention with the pair mask, forward and backward (flash-attention style:
// scores never reach device memory), on tensor cores (mma.sync m16n8k16 bf16 -> f32).
//
// Math, per query row q and head h (kv head g = h / (n_heads / n_kv_heads), GQA by
// indexing, K/V never copied), over the keys k the pair mask lets q see:
//   s_k = scale · q_h·k_g            lse_q = log Σ_k exp(s_k)          o = Σ_k exp(s_k − lse_q) v_k
//   backward: P = exp(s − lse), dP = dO·Vᵀ, D_q = dO_q·o_q (attention_backward_delta),
//   dS = P∘(dP − D), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO
// Mask (PairBatch::attends): q sees k iff k ≤ q, group(k) = group(q) and (branch(k) = 0 or
// branch(k) = branch(q)). Each token's (group, branch) is packed as group·4 + branch in
// shared memory; rows ≥ n are masked and loaded as zeros.
// Layouts: q [n, q_stride], k and v [n, kv_stride], o [n, o_stride], dO [n, do_stride]
// bf16, head h at column h·D; lse and D [n, n_heads] f32; dq [n, dq_stride] f32 (added to
// with atomics: the launcher zeroes it), dk and dv [n, dkv_stride] f32 (=). group [n] u32,
// branch [n] u8, group_start [n_groups + 1] u32. D ∈ {16, 32, 64, 128} (one kernel each).
// Work split:
// - forward: a block of 4 warps per (64-query tile, head); each warp owns 16 query rows,
//   Q fragments in registers; 64-key tiles of K and V, from the first key of the tile's
//   first group up to its last query, double-buffered in dynamic shared memory: cp.async
//   brings tile i+1 into one stage while the warps compute on tile i in the other (two
//   stages: 68.5 KB at D = 128, which does not lower occupancy: registers already limit
//   it to 2 blocks per SM on sm_80 and sm_90). Online softmax in the exp2 domain; a key
//   tile no query of the block can see is skipped after its metadata is read (rejected
//   queries skip the chosen answer's tiles); its copy is not saved, it was issued while
//   the previous tile was computed.
// - backward: a block of 4 warps per (64-key tile, kv head); each warp owns 16 keys and
//   keeps their dK and dV in registers while it walks every query head of the kv group
//   and every 32-query tile that can see the keys (from the tile itself to the end of
//   its last key's group). dQ goes through a bf16 dS tile in shared memory and an mma
//   with K, then f32 atomics. Q/dO tiles are loaded synchronously (only other resident
//   blocks hide that latency).
// - every mma operand comes from shared memory by ldmatrix (x4: one A fragment or two B
//   fragments; .trans where the operand is stored [k][n]: V, dO and Q in dV/dK, K in dQ).
// Cost per call, with A = visible (query, key) pairs per head: forward 4·A·D FLOPs per
// head, backward 10·A·D; bytes ≈ the q/k/v/o/dO tensors once each plus K/V (forward) or
// Q/dO (backward) re-read per tile from L2.
// Checked without a GPU by the kernel simulator (src/engine/cuda/sim.rs, tests/kernel_sim.rs).
// None of this has been timed on a GPU: ldmatrix (fewer shared-memory instructions per
// mma) and the forward's copy/compute overlap are expected to help, unmeasured.
// Next steps (not yet done): cp.async double buffering of the backward's Q/dO tiles (at
// D = 128 it needs 73.1 KB of shared memory and the kernel is at 236-239 registers);
// wgmma with TMA loads on sm_90a; the dS tile is still written with scalar bf16 stores.
#include "common.cuh"

namespace {

constexpr int PAD = 8;  // bf16 elements of row padding: 16 bytes, keeps fragment loads conflict-free
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

SDPO_DEVICE int token_meta(const unsigned int* group, const unsigned char* branch, int t, int n) {
    return t < n ? (int)(group[t] * 4u + branch[t]) : -1;
}

SDPO_DEVICE bool visible(int qm, int km, int q, int k) {
    return qm >= 0 && km >= 0 && k <= q && (qm >> 2) == (km >> 2) && ((km & 3) == 0 || (km & 3) == (qm & 3));
}

// Rows row0..row0+ROWS−1 of a [n, stride] bf16 matrix (columns col0..col0+D−1) into
// shared memory with row pitch D + PAD; rows ≥ n become zeros.
template <int D, int ROWS>
SDPO_DEVICE void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int stride, int row0, int n) {
    constexpr int VPR = D / 8;
    for (int i = threadIdx.x; i < ROWS * VPR; i += blockDim.x) {
        const int r = i / VPR, c = (i % VPR) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < n) v = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * stride + c);
        *reinterpret_cast<uint4*>(dst + r * (D + PAD) + c) = v;
    }
}

// Fragments come out of shared memory by ldmatrix (common.cuh), one x4 per A fragment or
// per pair of B fragments. Two lane-to-row-address patterns cover every use here:
// - "A" (lane_row16, lane_col8): matrices (rows 0-7 | 8-15) × (columns 0-7 | 8-15), in the
//   order of the A fragment's registers; with .trans on a [k][n] tile it gives the B
//   fragments of two adjacent n8 tiles (registers {0,1} and {2,3});
// - "B" (lane_row8x2, lane_col8x2): rows 0-7 with columns 0-7 and 8-15, then rows 8-15
//   likewise: on an [n][k] tile, the B fragments of two adjacent n8 tiles without .trans.
// Rows are D + PAD elements apart, 2D + 16 bytes: a multiple of 16, so every row address is
// 16-byte aligned, and 4 mod 8 words past a multiple of 32 banks, so the eight rows one
// 8×8 matrix reads start in eight different 4-bank groups (r·(D/2 + 4) mod 32 over
// r = 0..7 is 4·r·odd mod 32: all distinct): each matrix is one conflict-free wavefront.
// The dS tile's 72-element rows (144 bytes, 36 words) satisfy the same argument.
SDPO_DEVICE int lane_row16(int lane) { return lane & 15; }
SDPO_DEVICE int lane_col8(int lane) { return (lane >> 4) * 8; }
SDPO_DEVICE int lane_row8x2(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
SDPO_DEVICE int lane_col8x2(int lane) { return ((lane >> 3) & 1) * 8; }

// The same rows by cp.async (common.cuh): issued here, landed once the caller's
// cp_async_wait retires the group it commits them in. Rows ≥ n are zero-filled; their
// source pointer is row 0's, in range but not read.
template <int D, int ROWS>
SDPO_DEVICE void load_rows_async(__nv_bfloat16* dst, const __nv_bfloat16* src, int stride, int row0, int n) {
    constexpr int VPR = D / 8;
    for (int i = threadIdx.x; i < ROWS * VPR; i += blockDim.x) {
        const int r = i / VPR, c = (i % VPR) * 8;
        const bool in = row0 + r < n;
        cp_async16(dst + r * (D + PAD) + c, src + (size_t)(in ? row0 + r : 0) * stride + c, in);
    }
}

// --- forward

constexpr int FWD_BM = 64, FWD_BN = 64;

// Dynamic shared memory of the forward kernel (the launcher computes the same): two stages
// of the K and V tiles and the query and key metadata, 2·2·64·(D+8)·2 + (64 + 64)·4 bytes;
// 68.5 KB for D = 128, so the launcher raises the kernel's limit above the default 48 KB.

template <int D>
SDPO_DEVICE void attention_forward_impl(
    __nv_bfloat16* __restrict__ o, float* __restrict__ lse, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v, const unsigned int* __restrict__ group,
    const unsigned char* __restrict__ branch, const unsigned int* __restrict__ group_start, int n, int n_heads,
    int n_kv_heads, int q_stride, int kv_stride, int o_stride, float scale) {
    constexpr int LD = D + PAD, TILE = FWD_BN * LD;
    static_assert(FWD_BM <= FWD_BN, "the Q tile is staged in a K stage");
    SDPO_DYNAMIC_SMEM(smem);
    __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem);  // [2 stages][FWD_BN keys][LD]
    __nv_bfloat16* Vs = Ks + 2 * TILE;                            // [2 stages][FWD_BN keys][LD]
    int* qmeta = reinterpret_cast<int*>(Vs + 2 * TILE);
    int* kmeta = qmeta + FWD_BM;

    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const int q0 = blockIdx.x * FWD_BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wr = warp * 16;  // this warp's first row in the tile
    const int r0 = q0 + wr + g, r1 = r0 + 8;

    // Key tiles from the first key of the tile's first group up to its last query (keys
    // after it are never seen); there is at least one, since that group starts ≤ q0.
    const int k_end = min(q0 + FWD_BM, n);
    const int kb0 = (int)group_start[group[q0]] / FWD_BN * FWD_BN;
    const __nv_bfloat16* k_head = k + (size_t)kvh * D;
    const __nv_bfloat16* v_head = v + (size_t)kvh * D;

    // Copy groups, oldest first: the Q tile (staged in K stage 1), the first K/V tile
    // (stage 0), then one per iteration for the tile after it. Q goes into A fragments as
    // soon as it lands, while the first K/V tile is still on its way.
    load_rows_async<D, FWD_BM>(Ks + TILE, q + (size_t)h * D, q_stride, q0, n);
    cp_async_commit();
    load_rows_async<D, FWD_BN>(Ks, k_head, kv_stride, kb0, n);
    load_rows_async<D, FWD_BN>(Vs, v_head, kv_stride, kb0, n);
    cp_async_commit();
    if (threadIdx.x < FWD_BM) qmeta[threadIdx.x] = token_meta(group, branch, q0 + threadIdx.x, n);
    cp_async_wait<1>();  // this thread's share of the Q tile has landed ...
    __syncthreads();     // ... and everyone's is visible
    const int ar = lane_row16(lane), ac = lane_col8(lane), br = lane_row8x2(lane), bc = lane_col8x2(lane);
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) ldmatrix_x4(qf[kk], Ks + TILE + (wr + ar) * LD + kk * 16 + ac);
    const int qm0 = qmeta[wr + g], qm1 = qmeta[wr + g + 8];
    __syncthreads();  // stage 1 is free for the first prefetch

    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const float sl2 = scale * LOG2E;

    for (int kb = kb0, st = 0; kb < k_end; kb += FWD_BN, st ^= 1) {
        // Prefetch the next tile into the other stage, which no thread reads any more (the
        // barrier that ended the previous iteration, or its skip's __syncthreads_or, came
        // after the last read); the group is empty after the last tile, so the wait below
        // always leaves exactly the prefetch in flight.
        if (kb + FWD_BN < k_end) {
            load_rows_async<D, FWD_BN>(Ks + (st ^ 1) * TILE, k_head, kv_stride, kb + FWD_BN, n);
            load_rows_async<D, FWD_BN>(Vs + (st ^ 1) * TILE, v_head, kv_stride, kb + FWD_BN, n);
        }
        cp_async_commit();
        if (threadIdx.x < FWD_BN) kmeta[threadIdx.x] = token_meta(group, branch, kb + threadIdx.x, n);
        cp_async_wait<1>();  // this thread's share of tile kb has landed ...
        __syncthreads();     // ... and everyone's is visible, with kmeta
        const __nv_bfloat16* Kt = Ks + st * TILE;
        const __nv_bfloat16* Vt = Vs + st * TILE;
        // Does any query of the block see any key of the tile? (each thread checks 32 pairs)
        int any = 0;
        {
            const int qi = threadIdx.x & (FWD_BM - 1), kh = (threadIdx.x / FWD_BM) * 32;
            const int qm = qmeta[qi];
            for (int j = 0; j < 32 && !any; j++) any = visible(qm, kmeta[kh + j], q0 + qi, kb + kh + j);
        }
        if (!__syncthreads_or(any)) continue;

        // S = Q·Kᵀ for this warp's 16 rows × 64 keys.
        float s[FWD_BN / 8][4];
#pragma unroll
        for (int j = 0; j < FWD_BN / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int j = 0; j < FWD_BN / 8; j += 2) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 b[4];  // keys j·8.. and (j+1)·8.., dims kk·16..: two B fragments
                ldmatrix_x4(b, Kt + (j * 8 + br) * LD + kk * 16 + bc);
                const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_bf16_16816(s[j], qf[kk], b0);
                mma_bf16_16816(s[j + 1], qf[kk], b1);
            }
        }
        // Mask, scale into the log2 domain, running max.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < FWD_BN / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int kc = j * 8 + 2 * t4 + (e & 1);
                const bool vis = e < 2 ? visible(qm0, kmeta[kc], r0, kb + kc) : visible(qm1, kmeta[kc], r1, kb + kc);
                s[j][e] = vis ? s[j][e] * sl2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with nothing visible yet keeps base 0 so that exp2(−inf − base) = 0, not NaN.
        const float b0 = mn0 == -INFINITY ? 0.f : mn0, b1 = mn1 == -INFINITY ? 0.f : mn1;
        const float al0 = exp2f(m0 - b0), al1 = exp2f(m1 - b1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int j = 0; j < FWD_BN / 8; j++) {
            s[j][0] = exp2f(s[j][0] - b0);
            s[j][1] = exp2f(s[j][1] - b0);
            s[j][2] = exp2f(s[j][2] - b1);
            s[j][3] = exp2f(s[j][3] - b1);
            ps0 += s[j][0] + s[j][1];
            ps1 += s[j][2] + s[j][3];
        }
        // Per-thread partial row sums: the quad's lanes share the row's scale factors, so
        // the sum over the quad is taken once at the end.
        l0 = l0 * al0 + ps0;
        l1 = l1 * al1 + ps1;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            acc[j][0] *= al0;
            acc[j][1] *= al0;
            acc[j][2] *= al1;
            acc[j][3] *= al1;
        }
        // O += P·V: P from the score accumulators (two n8 tiles form one k16 A fragment).
#pragma unroll
        for (int kk = 0; kk < FWD_BN / 16; kk++) {
            const u32 a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                   pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int j = 0; j < D / 8; j += 2) {
                u32 b[4];  // keys kk·16.., dims j·8.. and (j+1)·8.., transposed: two B fragments
                ldmatrix_x4_trans(b, Vt + (kk * 16 + ar) * LD + j * 8 + ac);
                const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_bf16_16816(acc[j], a, b0);
                mma_bf16_16816(acc[j + 1], a, b1);
            }
        }
        __syncthreads();
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (r0 < n) {
        __nv_bfloat16* orow = o + (size_t)r0 * o_stride + (size_t)h * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < D / 8; j++)
            *reinterpret_cast<u32*>(orow + j * 8) = pack_bf16(acc[j][0] * inv0, acc[j][1] * inv0);
        if (t4 == 0) lse[(size_t)r0 * n_heads + h] = (m0 + log2f(l0)) * LN2;
    }
    if (r1 < n) {
        __nv_bfloat16* orow = o + (size_t)r1 * o_stride + (size_t)h * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < D / 8; j++)
            *reinterpret_cast<u32*>(orow + j * 8) = pack_bf16(acc[j][2] * inv1, acc[j][3] * inv1);
        if (t4 == 0) lse[(size_t)r1 * n_heads + h] = (m1 + log2f(l1)) * LN2;
    }
}

// --- backward

constexpr int BWD_BN = 64, BWD_BM = 32;

// Dynamic shared memory of the backward kernel (the launcher computes the same):
// (2·64·(D+8) + 2·32·(D+8) + 32·72)·2 + (3·32 + 64)·4 bytes; 56.1 KB for D = 128, so the
// launcher raises the kernel's dynamic shared-memory limit above the default 48 KB.

template <int D>
SDPO_DEVICE void attention_backward_impl(
    float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, const __nv_bfloat16* __restrict__ dout,
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const float* __restrict__ lse, const float* __restrict__ delta, const unsigned int* __restrict__ group,
    const unsigned char* __restrict__ branch, const unsigned int* __restrict__ group_start, int n, int n_heads,
    int n_kv_heads, int q_stride, int kv_stride, int do_stride, int dq_stride, int dkv_stride, float scale) {
    constexpr int LD = D + PAD, LDS = BWD_BN + PAD;
    SDPO_DYNAMIC_SMEM(smem);
    __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* Vs = Ks + BWD_BN * LD;
    __nv_bfloat16* Qs = Vs + BWD_BN * LD;
    __nv_bfloat16* dOs = Qs + BWD_BM * LD;
    __nv_bfloat16* dSs = dOs + BWD_BM * LD;  // [BWD_BM queries][BWD_BN keys]
    float* lse_s = reinterpret_cast<float*>(dSs + BWD_BM * LDS);
    float* delta_s = lse_s + BWD_BM;
    int* qmeta = reinterpret_cast<int*>(delta_s + BWD_BM);
    int* kmeta = qmeta + BWD_BM;

    const int kvh = blockIdx.y, group_size = n_heads / n_kv_heads;
    const int k0 = blockIdx.x * BWD_BN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wk = warp * 16;  // this warp's first key in the tile
    const float sl2 = scale * LOG2E;
    const int ar = lane_row16(lane), ac = lane_col8(lane), br = lane_row8x2(lane), bc = lane_col8x2(lane);

    load_rows<D, BWD_BN>(Ks, k + (size_t)kvh * D, kv_stride, k0, n);
    load_rows<D, BWD_BN>(Vs, v + (size_t)kvh * D, kv_stride, k0, n);
    if (threadIdx.x < BWD_BN) kmeta[threadIdx.x] = token_meta(group, branch, k0 + threadIdx.x, n);
    __syncthreads();
    const int km0 = kmeta[wk + g], km1 = kmeta[wk + g + 8];
    const int kr0 = k0 + wk + g, kr1 = kr0 + 8;

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        dk_acc[j][0] = dk_acc[j][1] = dk_acc[j][2] = dk_acc[j][3] = 0.f;
        dv_acc[j][0] = dv_acc[j][1] = dv_acc[j][2] = dv_acc[j][3] = 0.f;
    }

    // Queries that can see these keys: from the first key to the end of the last key's group.
    const int k_last = min(k0 + BWD_BN, n) - 1;
    const int q_end = (int)group_start[group[k_last] + 1];

    for (int h = kvh * group_size; h < (kvh + 1) * group_size; h++) {
        for (int q0 = k0; q0 < q_end; q0 += BWD_BM) {
            load_rows<D, BWD_BM>(Qs, q + (size_t)h * D, q_stride, q0, n);
            load_rows<D, BWD_BM>(dOs, dout + (size_t)h * D, do_stride, q0, n);
            if (threadIdx.x < BWD_BM) {
                const int t = q0 + threadIdx.x;
                qmeta[threadIdx.x] = token_meta(group, branch, t, n);
                lse_s[threadIdx.x] = t < n ? lse[(size_t)t * n_heads + h] * LOG2E : 0.f;
                delta_s[threadIdx.x] = t < n ? delta[(size_t)t * n_heads + h] : 0.f;
            }
            __syncthreads();
            int any = 0;
            {
                const int qi = threadIdx.x & (BWD_BM - 1), kq = (threadIdx.x / BWD_BM) * 16;
                const int qm = qmeta[qi];
                for (int j = 0; j < 16 && !any; j++) any = visible(qm, kmeta[kq + j], q0 + qi, k0 + kq + j);
            }
            if (!__syncthreads_or(any)) continue;

            // Sᵀ = K·Qᵀ (16 keys × 32 queries per warp) and dPᵀ = V·dOᵀ.
            float s[BWD_BM / 8][4], dp[BWD_BM / 8][4];
#pragma unroll
            for (int j = 0; j < BWD_BM / 8; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
                dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 af[4], vf[4];
                ldmatrix_x4(af, Ks + (wk + ar) * LD + kk * 16 + ac);
                ldmatrix_x4(vf, Vs + (wk + ar) * LD + kk * 16 + ac);
#pragma unroll
                for (int j = 0; j < BWD_BM / 8; j += 2) {
                    u32 bq[4], bd[4];  // queries j·8.. and (j+1)·8..: two B fragments each
                    ldmatrix_x4(bq, Qs + (j * 8 + br) * LD + kk * 16 + bc);
                    ldmatrix_x4(bd, dOs + (j * 8 + br) * LD + kk * 16 + bc);
                    const u32 bq0[2] = {bq[0], bq[1]}, bq1[2] = {bq[2], bq[3]};
                    const u32 bd0[2] = {bd[0], bd[1]}, bd1[2] = {bd[2], bd[3]};
                    mma_bf16_16816(s[j], af, bq0);
                    mma_bf16_16816(s[j + 1], af, bq1);
                    mma_bf16_16816(dp[j], vf, bd0);
                    mma_bf16_16816(dp[j + 1], vf, bd1);
                }
            }
            // Pᵀ and dSᵀ = Pᵀ∘(dPᵀ − D); element e of tile j: key row g (+8 for e ≥ 2),
            // query column j·8 + 2·t4 + (e & 1).
#pragma unroll
            for (int j = 0; j < BWD_BM / 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = j * 8 + 2 * t4 + (e & 1);
                    const bool vis = e < 2 ? visible(qmeta[qc], km0, q0 + qc, kr0) : visible(qmeta[qc], km1, q0 + qc, kr1);
                    const float p = vis ? exp2f(s[j][e] * sl2 - lse_s[qc]) : 0.f;
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - delta_s[qc]);
                }
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q (scale applied at the end); k-dim = queries.
#pragma unroll
            for (int kk = 0; kk < BWD_BM / 16; kk++) {
                const u32 ap[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                const u32 as[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]),
                                        pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                                        pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                        pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
                for (int j = 0; j < D / 8; j += 2) {
                    u32 bd[4], bq[4];  // queries kk·16.., dims j·8.. and (j+1)·8.., transposed
                    ldmatrix_x4_trans(bd, dOs + (kk * 16 + ar) * LD + j * 8 + ac);
                    ldmatrix_x4_trans(bq, Qs + (kk * 16 + ar) * LD + j * 8 + ac);
                    const u32 bd0[2] = {bd[0], bd[1]}, bd1[2] = {bd[2], bd[3]};
                    const u32 bq0[2] = {bq[0], bq[1]}, bq1[2] = {bq[2], bq[3]};
                    mma_bf16_16816(dv_acc[j], ap, bd0);
                    mma_bf16_16816(dv_acc[j + 1], ap, bd1);
                    mma_bf16_16816(dk_acc[j], as, bq0);
                    mma_bf16_16816(dk_acc[j + 1], as, bq1);
                }
            }
            // dS (scaled) into shared memory as [query][key] for dQ = dS·K.
#pragma unroll
            for (int j = 0; j < BWD_BM / 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = j * 8 + 2 * t4 + (e & 1), kc = wk + g + (e >= 2 ? 8 : 0);
                    dSs[qc * LDS + kc] = __float2bfloat16(dp[j][e] * scale);
                }
            }
            __syncthreads();
            {
                // Warp w: queries (w & 1)·16.., head-dim columns (w >> 1)·D/2.. ; k-dim = 64 keys.
                const int wq = (warp & 1) * 16, wd = (warp >> 1) * (D / 2);
                float dqa[D / 16][4];
#pragma unroll
                for (int j = 0; j < D / 16; j++) dqa[j][0] = dqa[j][1] = dqa[j][2] = dqa[j][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < BWD_BN / 16; kk++) {
                    u32 a[4];
                    ldmatrix_x4(a, dSs + (wq + ar) * LDS + kk * 16 + ac);
                    const __nv_bfloat16* kb = Ks + (kk * 16 + ar) * LD + wd;  // keys kk·16.., transposed
#pragma unroll
                    for (int j = 0; j + 1 < D / 16; j += 2) {
                        u32 b[4];
                        ldmatrix_x4_trans(b, kb + j * 8 + ac);
                        const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                        mma_bf16_16816(dqa[j], a, b0);
                        mma_bf16_16816(dqa[j + 1], a, b1);
                    }
                    if ((D / 16) % 2 == 1) {  // D = 16: one n8 tile per warp, an x2 load
                        u32 b[2];
                        ldmatrix_x2_trans(b, kb + (D / 16 - 1) * 8);
                        mma_bf16_16816(dqa[D / 16 - 1], a, b);
                    }
                }
                const int qa = q0 + wq + g, qb = qa + 8;
#pragma unroll
                for (int j = 0; j < D / 16; j++) {
                    const int c = h * D + wd + j * 8 + 2 * t4;
                    if (qa < n) {
                        atomicAdd(dq + (size_t)qa * dq_stride + c, dqa[j][0]);
                        atomicAdd(dq + (size_t)qa * dq_stride + c + 1, dqa[j][1]);
                    }
                    if (qb < n) {
                        atomicAdd(dq + (size_t)qb * dq_stride + c, dqa[j][2]);
                        atomicAdd(dq + (size_t)qb * dq_stride + c + 1, dqa[j][3]);
                    }
                }
            }
            __syncthreads();
        }
    }

    // This block alone owns keys k0..k0+63 of kv head kvh: plain stores.
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        const int c = kvh * D + j * 8 + 2 * t4;
        if (kr0 < n) {
            *reinterpret_cast<float2*>(dk + (size_t)kr0 * dkv_stride + c) = make_float2(dk_acc[j][0] * scale, dk_acc[j][1] * scale);
            *reinterpret_cast<float2*>(dv + (size_t)kr0 * dkv_stride + c) = make_float2(dv_acc[j][0], dv_acc[j][1]);
        }
        if (kr1 < n) {
            *reinterpret_cast<float2*>(dk + (size_t)kr1 * dkv_stride + c) = make_float2(dk_acc[j][2] * scale, dk_acc[j][3] * scale);
            *reinterpret_cast<float2*>(dv + (size_t)kr1 * dkv_stride + c) = make_float2(dv_acc[j][2], dv_acc[j][3]);
        }
    }
}

}  // namespace

// --- entry points, one per head dim

#define ATTENTION_FORWARD(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) attention_forward_hd##D(                                     \
        __nv_bfloat16* o, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,     \
        const unsigned int* group, const unsigned char* branch, const unsigned int* group_start, int n,            \
        int n_heads, int n_kv_heads, int q_stride, int kv_stride, int o_stride, float scale) {                      \
        attention_forward_impl<D>(o, lse, q, k, v, group, branch, group_start, n, n_heads, n_kv_heads, q_stride,  \
                                  kv_stride, o_stride, scale);                                                    \
    }

#define ATTENTION_BACKWARD(D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_hd##D(                                    \
        float* dq, float* dk, float* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q,                        \
        const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* delta,                      \
        const unsigned int* group, const unsigned char* branch, const unsigned int* group_start, int n,            \
        int n_heads, int n_kv_heads, int q_stride, int kv_stride, int do_stride, int dq_stride, int dkv_stride,    \
        float scale) {                                                                                             \
        attention_backward_impl<D>(dq, dk, dv, dout, q, k, v, lse, delta, group, branch, group_start, n, n_heads,  \
                                   n_kv_heads, q_stride, kv_stride, do_stride, dq_stride, dkv_stride, scale);     \
    }

ATTENTION_FORWARD(16)
ATTENTION_FORWARD(32)
ATTENTION_FORWARD(64)
ATTENTION_FORWARD(128)
ATTENTION_BACKWARD(16)
ATTENTION_BACKWARD(32)
ATTENTION_BACKWARD(64)
ATTENTION_BACKWARD(128)

// D_q = Σ_d dO[q, h, d]·O[q, h, d], [n, n_heads] f32: one thread per (token, head).
extern "C" __global__ void __launch_bounds__(256) attention_backward_delta(
    float* __restrict__ delta, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ o, int n,
    int n_heads, int head_dim, int do_stride, int o_stride) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * n_heads) return;
    const int t = (int)(idx / n_heads), h = (int)(idx % n_heads);
    const __nv_bfloat16* a = dout + (size_t)t * do_stride + (size_t)h * head_dim;
    const __nv_bfloat16* b = o + (size_t)t * o_stride + (size_t)h * head_dim;
    float acc = 0.f;
    for (int c = 0; c < head_dim; c += 8) {
        float x[8], y[8];
        load8(a + c, x);
        load8(b + c, y);
#pragma unroll
        for (int i = 0; i < 8; i++) acc += x[i] * y[i];
    }
    delta[idx] = acc;
}
