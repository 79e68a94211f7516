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
// - forward: a block of 4 warps per (128-query tile, head); each warp owns 32 query rows
//   as two m16 row blocks, so every K or V B-fragment load (ldmatrix.x4: two n8 fragments,
//   512 bytes per warp) feeds 4 mmas, not 2. 64-key tiles of K and V, from the first key
//   of the tile's first group up to its last query, double-buffered in dynamic shared
//   memory: cp.async brings tile i+1 into one stage while the warps compute on tile i in
//   the other. Each tile is worked on in two 32-key steps (S = Q·Kᵀ, mask, online softmax
//   in the exp2 domain, O += P·V): with 64-key steps the D = 128 kernel spilled. For
//   D ≤ 64 Q's A fragments are loaded once into registers (the Q tile staged in K/V stage
//   1); at D = 128 they do not fit next to the 128 O accumulators, so the Q tile stays in
//   shared memory and its fragments are loaded in the S loop (as FlashAttention-2 does).
//   Shared memory (ATTENTION_FORWARD_SMEM below): 2·2·64·(D+8)·2 bytes of K/V stages,
//   + 128·(D+8)·2 for Q at D = 128, + metadata: 102.75 KB at D = 128, 36.75 KB at D = 64.
//   Shared-memory bytes per mma (counted from the code): 128 in both products for D ≤ 64
//   (it would be 256 with 16 rows per warp); at D = 128, 256 in S (a Q and a K load per 4
//   mmas each) and 128 in P·V, 192 on average. At mma.sync rates an H100/H200 SM does one
//   m16n8k16 (4096 FLOPs) per ~1-1.5 clocks and shared memory delivers 128 bytes per
//   clock, so 256 B/mma holds an inner loop to about half the tensor-core rate.
//   Occupancy (cuda_compile, theoretical): sm_90 2/3/4/5 blocks per SM at D = 128/64/32/16;
//   sm_80 1/2/4/5 (D = 128 limited by shared memory: 102.75 KB per block).
//   The mask: the kernel is bound by instruction issue, not by its mmas (Nsight Compute
//   on an H200, D = 64 training shape: 128 mmas per warp and tile among ~2600 issued
//   instructions, the integer pipe the busiest), so the mask costs as little as the data
//   allow. Where a warp's 32 rows share one (group, branch) and so do the tile's 64 keys
//   (every tile inside a segment; tiles straddling a segment boundary are the exception)
//   the warp's mask bits follow from causality alone, a closed form per row; a thread
//   all of whose bits are set (all of them, where the tile's last key precedes the warp's
//   first row) masks no element. Other tiles evaluate the pair mask per (row, key). The softmax takes
//   one FFMA and one ex2.approx.ftz per score (exp2(s·sl2 − m), exp2_ftz in common.cuh).
//   Skipping: each thread's 64 mask bits are computed once per tile; a tile no query of the
//   block sees is skipped by all warps after its metadata is read (its copy was issued a
//   tile earlier and is not saved), and a warp none of whose 32 rows sees it only waits at
//   the barrier. For one pair of prompt 256 + answers 512 + 512 in the shared layout the
//   computed area is 1/0.933 of the visible pairs (skipping whole 128-query blocks only
//   would give 1/0.873).
// - backward: a block of 4 warps per (64-key tile, kv head); each warp owns 16 keys and
//   keeps their dK and dV in registers while it walks every query head of the kv group
//   and every 32-query tile that can see the keys (from the tile itself to the end of
//   its last key's group). dQ goes through a bf16 dS tile in shared memory and an mma
//   with K, then f32 atomics (a pair of columns per 8-byte atomic on sm_90). The (head,
//   query tile) steps are double-buffered: cp.async brings step i+1's Q and dO tiles into
//   one stage while the warps compute on step i's in the other (K and V land with step
//   0's tiles, in the first copy group), and the query metadata (mask, lse, D) of step
//   i+1 is read into registers of threads 0-31 during step i and stored to shared memory
//   at the top of step i+1. A step no key of the block sees is skipped after its metadata
//   is read; its tiles were copied a step earlier, like the forward's. Shared memory
//   (ATTENTION_BACKWARD_SMEM below): K, V, 2 stages of Q and dO, dS, metadata,
//   (2·64·(D+8) + 2·2·32·(D+8) + 32·72)·2 + (3·32 + 64)·4 bytes: 73.1 KB at D = 128. As in the forward, a warp whose 16 keys share one (group,
//   branch) with a step's 32 queries, all after its last key, evaluates no mask for that
//   step (D ≥ 64; at D ≤ 32 the test costs spills under the 96-register bound).
//   Occupancy (cuda_compile, theoretical): 2/3/5/5 blocks per SM at D = 128/64/32/16 on
//   sm_90 and sm_80 (registers; D ≤ 32 held there by __launch_bounds__' second value, see
//   ATTENTION_BACKWARD).
// - attention_backward_delta: head_dim / 8 lanes per (token, head) row, 16 bytes each, so
//   every load instruction reads whole consecutive rows (one thread per row read 16 of
//   each 32-byte sector per load, and its 0.97-wave grid left SMs idle).
// - every mma operand comes from shared memory by ldmatrix (x4: one A fragment or two B
//   fragments; .trans where the operand is stored [k][n]: V, dO and Q in dV/dK, K in dQ).
// Cost per call, with A = visible (query, key) pairs per head: forward 4·A·D FLOPs per
// head, backward 10·A·D; bytes ≈ the q/k/v/o/dO tensors once each plus K/V (forward) or
// Q/dO (backward) re-read per tile from L2.
// Checked by the kernel simulator (src/engine/cuda/sim.rs, tests/kernel_sim.rs); its speed
// is a GPU's to measure (BENCHMARKS.md).
// Limits of this design: one 16-key block per warp in the backward (at D = 128 it uses
// 236-241 registers, so a second does not fit); mma.sync, not sm_90a's wgmma and TMA;
// the D = 64 forward on sm_80 takes 178 registers, 2 blocks per SM (bounded to 168 for
// 3, it spills); 64-key score steps at D = 128 (S at 128 B/mma) need more registers than
// the pair mask leaves; at D = 128 on sm_80 the double-buffered K/V stages allow 1 block per SM (a
// single-buffered schedule, K's copy under P·V and V's under S as in FlashAttention-2,
// would fit 2); the dS tile is written with scalar bf16 stores.
#include "common.cuh"

namespace {

// Dynamic shared memory per block, bytes, of the kernels for D = 16, 32, 64, 128 (their
// layouts: attention_forward_impl, attention_backward_impl). This table is the one
// statement of these sizes: the launchers read these two lines (src/engine/cuda/kernels.rs,
// attention_smem), and each kernel static_asserts that its layout ends exactly here.
constexpr int ATTENTION_FORWARD_SMEM[4] = {13056, 21248, 37632, 105216};
constexpr int ATTENTION_BACKWARD_SMEM[4] = {17536, 25728, 42112, 74880};

// The index of head dim D in the tables above.
template <int D>
constexpr int HEAD_DIM_INDEX = D == 16 ? 0 : D == 32 ? 1 : D == 64 ? 2 : D == 128 ? 3 : -1;

constexpr int PAD = 8;  // bf16 elements of row padding: 16 bytes, keeps fragment loads conflict-free
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

SDPO_DEVICE int token_meta(const unsigned int* group, const unsigned char* branch, int t, int n) {
    return t < n ? (int)(group[t] * 4u + branch[t]) : -1;
}

// PairBatch::attends on packed metadata: k ≤ q and k's (group, branch) is q's own or its
// group's branch 0. A row ≥ n (−1) matches no key ≥ 0 (−1 & ~3 = −4), and a key ≥ n is
// excluded by km ≥ 0.
SDPO_DEVICE bool visible(int qm, int km, int q, int k) {
    return k <= q && km >= 0 && (km == qm || km == (qm & ~3));
}

// Whether a (group, branch) qm sees keys of (group, branch) km at all, causality aside.
SDPO_DEVICE bool meta_sees(int qm, int km) { return km >= 0 && (km == qm || km == (qm & ~3)); }

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

// Rows row0..row0+ROWS−1 of a [n, stride] bf16 matrix (columns col0..col0+D−1) into
// shared memory with row pitch D + PAD, by cp.async (common.cuh): issued here, landed once
// the caller's cp_async_wait retires the group it commits them in. Rows ≥ n are
// zero-filled; their source pointer is row 0's, in range but not read.
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

constexpr int FWD_BM = 128, FWD_BN = 64, FWD_WM = FWD_BM / 4;  // FWD_WM: query rows per warp

// From this head dim on, the Q tile stays in shared memory and its A fragments are loaded
// (ldmatrix) in the S = Q·Kᵀ loop: at D = 128 the O accumulators of a warp's 32 rows take
// 128 registers and Q's fragments would take 64 more. Below it, Q's fragments are loaded
// once into registers (the Q tile staged in K/V stage 1).
constexpr int FWD_Q_SMEM_MIN_D = 128;
// Keys per score / softmax / P·V step: half a tile. With 64-key steps the scores of 32 rows
// take 64 registers: the D = 128 kernel spills (ptxas 12.9: 255 registers and 16-192 bytes
// of stack, depending on how the mask is written) and the D = 64 one takes 220-255
// registers. With Q's fragments in registers, smaller steps cost no extra shared-memory
// traffic, only a second rescale of the accumulators per tile.
constexpr int FWD_KSTEP = 32;

template <int D>
SDPO_DEVICE void attention_forward_impl(
    __nv_bfloat16* __restrict__ o, float* __restrict__ lse, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v, const unsigned int* __restrict__ group,
    const unsigned char* __restrict__ branch, const unsigned int* __restrict__ group_start, int n, int n_heads,
    int n_kv_heads, int q_stride, int kv_stride, int o_stride, float scale) {
    constexpr int LD = D + PAD, TILE = FWD_BN * LD;
    constexpr bool Q_SMEM = D >= FWD_Q_SMEM_MIN_D;
    constexpr int KSTEP = FWD_KSTEP;
    static_assert(FWD_BN % KSTEP == 0 && KSTEP % 16 == 0, "whole k16 steps in a tile");
    static_assert(FWD_BM <= 2 * FWD_BN, "the Q tile is staged in K/V stage 1 when it does not stay in shared memory");
    static_assert(FWD_BN == 64 && FWD_WM == 32, "the uniform-metadata test: two keys and one row per lane");
    SDPO_DYNAMIC_SMEM(smem);
    // Stage s: K at stages + 2·s·TILE, V right after it ([FWD_BN keys][LD] each), so one
    // stage is 2·FWD_BN contiguous rows.
    __nv_bfloat16* stages = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* Qs = Q_SMEM ? stages + 4 * TILE : stages + 2 * TILE;  // [FWD_BM queries][LD]
    int* qmeta = reinterpret_cast<int*>(stages + 4 * TILE + (Q_SMEM ? FWD_BM * LD : 0));
    int* kmeta = qmeta + FWD_BM;
    static_assert((4 * TILE + (Q_SMEM ? FWD_BM * LD : 0)) * 2 + (FWD_BM + FWD_BN) * 4 ==
                      ATTENTION_FORWARD_SMEM[HEAD_DIM_INDEX<D>],
                  "the layout above ends where ATTENTION_FORWARD_SMEM says");

    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const int q0 = blockIdx.x * FWD_BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wr = warp * FWD_WM;  // this warp's first row in the tile; row block rb: rows wr + 16·rb ..
    const int ar = lane_row16(lane), ac = lane_col8(lane), br = lane_row8x2(lane), bc = lane_col8x2(lane);

    // Key tiles from the first key of the tile's first group up to its last query (keys
    // after it are never seen); there is at least one, since that group starts ≤ q0.
    const int k_end = min(q0 + FWD_BM, n);
    const int kb0 = (int)group_start[group[q0]] / FWD_BN * FWD_BN;
    const __nv_bfloat16* k_head = k + (size_t)kvh * D;
    const __nv_bfloat16* v_head = v + (size_t)kvh * D;

    // Copy groups, oldest first: the Q tile, the first K/V tile (stage 0), then one per
    // iteration for the tile after it. Where Q goes into registers it does so as soon as it
    // lands, while the first K/V tile is still on its way.
    load_rows_async<D, FWD_BM>(Qs, q + (size_t)h * D, q_stride, q0, n);
    cp_async_commit();
    load_rows_async<D, FWD_BN>(stages, k_head, kv_stride, kb0, n);
    load_rows_async<D, FWD_BN>(stages + TILE, v_head, kv_stride, kb0, n);
    cp_async_commit();
    if (threadIdx.x < FWD_BM) qmeta[threadIdx.x] = token_meta(group, branch, q0 + threadIdx.x, n);
    cp_async_wait<1>();  // this thread's share of the Q tile has landed ...
    __syncthreads();     // ... and everyone's is visible, with qmeta
    u32 qf[Q_SMEM ? 1 : 2][Q_SMEM ? 1 : D / 16][4];
    if constexpr (!Q_SMEM) {
#pragma unroll
        for (int rb = 0; rb < 2; rb++) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) ldmatrix_x4(qf[rb][kk], Qs + (wr + 16 * rb + ar) * LD + kk * 16 + ac);
        }
        __syncthreads();  // stage 1 is free for the first prefetch
    }
    // The (group, branch) all 32 rows of this warp share, when they do and are < n; else −1.
    const int row_meta = warp_all(qmeta[wr + lane] == qmeta[wr]) ? qmeta[wr] : -1;

    // This thread's rows: row block rb, half i (fragment rows g and g + 8) is tile row
    // wr + 16·rb + 8·i + g. Their metadata is re-read from qmeta when needed: kept in
    // registers it pushed the D = 128 kernel into spilling.
    float acc[2][D / 8][4];
#pragma unroll
    for (int rb = 0; rb < 2; rb++) {
#pragma unroll
        for (int j = 0; j < D / 8; j++) acc[rb][j][0] = acc[rb][j][1] = acc[rb][j][2] = acc[rb][j][3] = 0.f;
    }
    float m[2][2], l[2][2];
#pragma unroll
    for (int rb = 0; rb < 2; rb++) m[rb][0] = m[rb][1] = -INFINITY, l[rb][0] = l[rb][1] = 0.f;
    const float sl2 = scale * LOG2E;

    for (int kb = kb0, st = 0; kb < k_end; kb += FWD_BN, st ^= 1) {
        // Prefetch the next tile into the other stage, which no thread reads any more (the
        // barrier that ended the previous iteration, or its skip's __syncthreads_or, came
        // after the last read); the group is empty after the last tile, so the wait below
        // always leaves exactly the prefetch in flight.
        if (kb + FWD_BN < k_end) {
            __nv_bfloat16* next = stages + (st ^ 1) * 2 * TILE;
            load_rows_async<D, FWD_BN>(next, k_head, kv_stride, kb + FWD_BN, n);
            load_rows_async<D, FWD_BN>(next + TILE, v_head, kv_stride, kb + FWD_BN, n);
        }
        cp_async_commit();
        if (threadIdx.x < FWD_BN) kmeta[threadIdx.x] = token_meta(group, branch, kb + threadIdx.x, n);
        cp_async_wait<1>();  // this thread's share of tile kb has landed ...
        __syncthreads();     // ... and everyone's is visible, with kmeta
        const __nv_bfloat16* Kt = stages + st * 2 * TILE;
        const __nv_bfloat16* Vt = Kt + TILE;

        // The mask as bits: bit 16·i + 2·j + c of vis[rb] is (row wr + 16·rb + 8·i + g, key
        // j·8 + 2·t4 + c), the positions of this thread's score elements. The warp's lanes
        // cover its 32 rows × 64 keys between them, so the warp sees the tile iff a lane has
        // a bit set. A tile no warp sees is skipped by all; otherwise a warp that sees none
        // of it only waits at the closing barrier (on the causal diagonal, across branches).
        // Where the warp's rows share one (group, branch) and so do the tile's keys (every
        // tile of a segment that does not straddle a boundary), the bits are causal only:
        // row r sees keys kc ≤ t = q0 + r − kb, which among this thread's positions (kc =
        // 8·j + 2·t4 + c, increasing with 2·j + c) are the first n0 + n1, n_c = #{j: kc ≤ t}.
        u32 vis[2] = {0u, 0u};
        const int tile_meta = kmeta[0];
        if (row_meta >= 0 && warp_all(kmeta[lane] == tile_meta && kmeta[lane + 32] == tile_meta)) {
            if (meta_sees(row_meta, tile_meta)) {
#pragma unroll
                for (int rb = 0; rb < 2; rb++) {
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        const int t = q0 + wr + 16 * rb + 8 * i + g - kb - 2 * t4;
                        const int n0 = min(max((t + 8) >> 3, 0), 8), n1 = min(max((t + 7) >> 3, 0), 8);
                        vis[rb] |= ((1u << (n0 + n1)) - 1u) << (16 * i);
                    }
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < FWD_BN / 8; j++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const int kc = j * 8 + 2 * t4 + c, km = kmeta[kc];
#pragma unroll
                    for (int rb = 0; rb < 2; rb++) {
#pragma unroll
                        for (int i = 0; i < 2; i++) {
                            const int qr = wr + 16 * rb + 8 * i + g;
                            vis[rb] |= (u32)visible(qmeta[qr], km, q0 + qr, kb + kc) << (16 * i + 2 * j + c);
                        }
                    }
                }
            }
        }
        u32 sees = vis[0] | vis[1];
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) sees |= __shfl_xor_sync(0xffffffffu, sees, off);
        if (!__syncthreads_or(sees != 0u)) continue;

        if (sees) {
            // Two steps of KSTEP keys, not unrolled, so that the compiler does not
            // interleave their registers.
#pragma unroll 1
            for (int j0 = 0; j0 < FWD_BN / 8; j0 += KSTEP / 8) {
                // S = Q·Kᵀ for this warp's 2 × 16 rows × KSTEP keys: each pair of K B
                // fragments feeds both row blocks (4 mmas per ldmatrix).
                float s[2][KSTEP / 8][4];
#pragma unroll
                for (int rb = 0; rb < 2; rb++) {
#pragma unroll
                    for (int j = 0; j < KSTEP / 8; j++) s[rb][j][0] = s[rb][j][1] = s[rb][j][2] = s[rb][j][3] = 0.f;
                }
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    u32 qa[2][4];
#pragma unroll
                    for (int rb = 0; rb < 2; rb++) {
                        if constexpr (Q_SMEM) {
                            ldmatrix_x4(qa[rb], Qs + (wr + 16 * rb + ar) * LD + kk * 16 + ac);
                        } else {
#pragma unroll
                            for (int c = 0; c < 4; c++) qa[rb][c] = qf[rb][kk][c];
                        }
                    }
#pragma unroll
                    for (int j = 0; j < KSTEP / 8; j += 2) {
                        u32 b[4];  // keys (j0+j)·8.. and (j0+j+1)·8.., dims kk·16..: two B fragments
                        ldmatrix_x4(b, Kt + ((j0 + j) * 8 + br) * LD + kk * 16 + bc);
                        const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
                        for (int rb = 0; rb < 2; rb++) {
                            mma_bf16_16816(s[rb][j], qa[rb], b0);
                            mma_bf16_16816(s[rb][j + 1], qa[rb], b1);
                        }
                    }
                }
                // Per row block: mask (unless every bit is set), online softmax in
                // the log2 domain (the running max m in scaled units, exp2(s·sl2 − m) one FFMA
                // and one ex2 per element); then P packed into A fragments (two n8 score tiles
                // form one k16 fragment).
                u32 pa[2][KSTEP / 16][4];
#pragma unroll
                for (int rb = 0; rb < 2; rb++) {
                    if (vis[rb] != 0xffffffffu) {
                        const u32 bits = vis[rb] >> (2 * j0);
#pragma unroll
                        for (int j = 0; j < KSTEP / 8; j++) {
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                if (!((bits >> (16 * (e >> 1) + 2 * j + (e & 1))) & 1u)) s[rb][j][e] = -INFINITY;
                            }
                        }
                    }
                    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                    for (int j = 0; j < KSTEP / 8; j++) {
                        mx[0] = fmaxf(mx[0], fmaxf(s[rb][j][0], s[rb][j][1]));
                        mx[1] = fmaxf(mx[1], fmaxf(s[rb][j][2], s[rb][j][3]));
                    }
                    float base[2], al[2], ps[2] = {0.f, 0.f};
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                        const float mn = fmaxf(m[rb][i], mx[i] * sl2);  // sl2 > 0: max(s)·sl2 = max(s·sl2)
                        // A row with nothing visible yet keeps base 0 so that exp2(−inf − base) = 0, not NaN.
                        base[i] = mn == -INFINITY ? 0.f : mn;
                        al[i] = exp2_ftz(m[rb][i] - base[i]);
                        m[rb][i] = mn;
                    }
#pragma unroll
                    for (int j = 0; j < KSTEP / 8; j++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            s[rb][j][e] = exp2_ftz(fmaf(s[rb][j][e], sl2, -base[e >> 1]));
                            ps[e >> 1] += s[rb][j][e];
                        }
                    }
                    // Per-thread partial row sums: the quad's lanes share the row's scale
                    // factors, so the sum over the quad is taken once at the end.
#pragma unroll
                    for (int i = 0; i < 2; i++) l[rb][i] = l[rb][i] * al[i] + ps[i];
#pragma unroll
                    for (int j = 0; j < D / 8; j++) {
                        acc[rb][j][0] *= al[0];
                        acc[rb][j][1] *= al[0];
                        acc[rb][j][2] *= al[1];
                        acc[rb][j][3] *= al[1];
                    }
#pragma unroll
                    for (int kk = 0; kk < KSTEP / 16; kk++) {
                        pa[rb][kk][0] = pack_bf16(s[rb][2 * kk][0], s[rb][2 * kk][1]);
                        pa[rb][kk][1] = pack_bf16(s[rb][2 * kk][2], s[rb][2 * kk][3]);
                        pa[rb][kk][2] = pack_bf16(s[rb][2 * kk + 1][0], s[rb][2 * kk + 1][1]);
                        pa[rb][kk][3] = pack_bf16(s[rb][2 * kk + 1][2], s[rb][2 * kk + 1][3]);
                    }
                }
                // O += P·V: each pair of V B fragments feeds both row blocks.
#pragma unroll
                for (int kk = 0; kk < KSTEP / 16; kk++) {
#pragma unroll
                    for (int j = 0; j < D / 8; j += 2) {
                        u32 b[4];  // keys j0·8 + kk·16.., dims j·8.. and (j+1)·8.., transposed: two B fragments
                        ldmatrix_x4_trans(b, Vt + (j0 * 8 + kk * 16 + ar) * LD + j * 8 + ac);
                        const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
                        for (int rb = 0; rb < 2; rb++) {
                            mma_bf16_16816(acc[rb][j], pa[rb][kk], b0);
                            mma_bf16_16816(acc[rb][j + 1], pa[rb][kk], b1);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int rb = 0; rb < 2; rb++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float sum = l[rb][i];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            const int r = q0 + wr + 16 * rb + 8 * i + g;
            if (r < n) {
                __nv_bfloat16* orow = o + (size_t)r * o_stride + (size_t)h * D + 2 * t4;
#pragma unroll
                for (int j = 0; j < D / 8; j++)
                    *reinterpret_cast<u32*>(orow + j * 8) = pack_bf16(acc[rb][j][2 * i] * inv, acc[rb][j][2 * i + 1] * inv);
                if (t4 == 0) lse[(size_t)r * n_heads + h] = (m[rb][i] + log2f(sum)) * LN2;
            }
        }
    }
}

// --- backward

constexpr int BWD_BN = 64, BWD_BM = 32;

// What the backward needs of query row t at head h besides its Q and dO rows: its
// (group, branch) as token_meta packs it, lse in the log2 domain and D; a row ≥ n gets −1
// (masked) and zeros.
struct BwdQueryMeta {
    int meta;
    float lse2, delta;
};

SDPO_DEVICE BwdQueryMeta bwd_query_meta(const float* lse, const float* delta, const unsigned int* group,
                                        const unsigned char* branch, int t, int h, int n, int n_heads) {
    if (t >= n) return {-1, 0.f, 0.f};
    return {token_meta(group, branch, t, n), lse[(size_t)t * n_heads + h] * LOG2E, delta[(size_t)t * n_heads + h]};
}

template <int D>
SDPO_DEVICE void attention_backward_impl(
    float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, const __nv_bfloat16* __restrict__ dout,
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const float* __restrict__ lse, const float* __restrict__ delta, const unsigned int* __restrict__ group,
    const unsigned char* __restrict__ branch, const unsigned int* __restrict__ group_start, int n, int n_heads,
    int n_kv_heads, int q_stride, int kv_stride, int do_stride, int dq_stride, int dkv_stride, float scale) {
    constexpr int LD = D + PAD, LDS = BWD_BN + PAD, QTILE = BWD_BM * LD;
    SDPO_DYNAMIC_SMEM(smem);
    __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* Vs = Ks + BWD_BN * LD;
    // Stage s: Q at stages + 2·s·QTILE, dO right after it ([BWD_BM queries][LD] each).
    __nv_bfloat16* stages = Vs + BWD_BN * LD;
    __nv_bfloat16* dSs = stages + 4 * QTILE;  // [BWD_BM queries][BWD_BN keys]
    float* lse_s = reinterpret_cast<float*>(dSs + BWD_BM * LDS);
    float* delta_s = lse_s + BWD_BM;
    int* qmeta = reinterpret_cast<int*>(delta_s + BWD_BM);
    int* kmeta = qmeta + BWD_BM;
    static_assert((2 * BWD_BN * LD + 4 * QTILE + BWD_BM * LDS) * 2 + (3 * BWD_BM + BWD_BN) * 4 ==
                      ATTENTION_BACKWARD_SMEM[HEAD_DIM_INDEX<D>],
                  "the layout above ends where ATTENTION_BACKWARD_SMEM says");
    static_assert(BWD_BM == 32, "one query of a step per lane (the step's uniform-metadata test)");

    const int kvh = blockIdx.y, group_size = n_heads / n_kv_heads;
    const int k0 = blockIdx.x * BWD_BN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wk = warp * 16;  // this warp's first key in the tile
    const float sl2 = scale * LOG2E;
    const int ar = lane_row16(lane), ac = lane_col8(lane), br = lane_row8x2(lane), bc = lane_col8x2(lane);

    // The walk: every query head h0.. of the kv group, and in each the 32-query tiles that
    // can see these keys, from the first key to the end of the last key's group; step it
    // is head h0 + it / n_qt, tile k0 + (it % n_qt)·BWD_BM.
    const int k_last = min(k0 + BWD_BN, n) - 1;
    const int q_end = (int)group_start[group[k_last] + 1];
    const int n_qt = (q_end - k0 + BWD_BM - 1) / BWD_BM, n_it = group_size * n_qt, h0 = kvh * group_size;

    // Copy groups, oldest first: K, V and step 0's Q and dO (stage 0); then one per step
    // for the step after it. A step's query metadata is read into registers a step ahead
    // (only threads < BWD_BM) and stored to shared memory at the top of its own step.
    load_rows_async<D, BWD_BN>(Ks, k + (size_t)kvh * D, kv_stride, k0, n);
    load_rows_async<D, BWD_BN>(Vs, v + (size_t)kvh * D, kv_stride, k0, n);
    load_rows_async<D, BWD_BM>(stages, q + (size_t)h0 * D, q_stride, k0, n);
    load_rows_async<D, BWD_BM>(stages + QTILE, dout + (size_t)h0 * D, do_stride, k0, n);
    cp_async_commit();
    BwdQueryMeta qm_next = {-1, 0.f, 0.f};
    if (threadIdx.x < BWD_BM) qm_next = bwd_query_meta(lse, delta, group, branch, k0 + threadIdx.x, h0, n, n_heads);
    if (threadIdx.x < BWD_BN) kmeta[threadIdx.x] = token_meta(group, branch, k0 + threadIdx.x, n);
    __syncthreads();  // kmeta is visible
    const int km0 = kmeta[wk + g], km1 = kmeta[wk + g + 8];
    const int kr0 = k0 + wk + g, kr1 = kr0 + 8;
    // The (group, branch) all 16 keys of this warp share, when they do and are < n; else −1.
    // Not at D ≤ 32, where the whole-block path costs the spills that the 96-register bound
    // (5 blocks per SM) leaves no room for.
    const int key_meta = D >= 64 && warp_all(km0 == kmeta[wk] && km1 == kmeta[wk]) ? kmeta[wk] : -1;

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        dk_acc[j][0] = dk_acc[j][1] = dk_acc[j][2] = dk_acc[j][3] = 0.f;
        dv_acc[j][0] = dv_acc[j][1] = dv_acc[j][2] = dv_acc[j][3] = 0.f;
    }

    for (int it = 0, st = 0; it < n_it; it++, st ^= 1) {
        const int h = h0 + it / n_qt, q0 = k0 + (it % n_qt) * BWD_BM;
        // Prefetch step it + 1's tiles into the other stage, which no thread reads any more
        // (the previous step's barrier before dQ, or its skip's __syncthreads_or, came after
        // its last read); the group is empty after the last step, so the wait below always
        // leaves exactly the prefetch in flight. Step it's tiles are visible to all after
        // the barrier below; __syncthreads_or would do for them, the barrier is for the
        // metadata the skip test reads.
        const bool more = it + 1 < n_it;
        const int nh = h0 + (it + 1) / n_qt, nq0 = k0 + ((it + 1) % n_qt) * BWD_BM;
        if (more) {
            __nv_bfloat16* next = stages + (st ^ 1) * 2 * QTILE;
            load_rows_async<D, BWD_BM>(next, q + (size_t)nh * D, q_stride, nq0, n);
            load_rows_async<D, BWD_BM>(next + QTILE, dout + (size_t)nh * D, do_stride, nq0, n);
        }
        cp_async_commit();
        if (threadIdx.x < BWD_BM) {
            qmeta[threadIdx.x] = qm_next.meta;
            lse_s[threadIdx.x] = qm_next.lse2;
            delta_s[threadIdx.x] = qm_next.delta;
            if (more) qm_next = bwd_query_meta(lse, delta, group, branch, nq0 + threadIdx.x, nh, n, n_heads);
        }
        cp_async_wait<1>();  // this thread's share of step it's tiles has landed ...
        __syncthreads();     // ... and everyone's is visible, with the metadata
        const __nv_bfloat16* Qs = stages + st * 2 * QTILE;
        const __nv_bfloat16* dOs = Qs + QTILE;
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
        // query column j·8 + 2·t4 + (e & 1), bit 4·j + e of `vis`. Where the warp's keys
        // and the step's queries each share one (group, branch) that sees the other and
        // the last key precedes the first query, the warp sees the whole 16 × 32 block and
        // evaluates no mask (every step of a query tile past the keys, inside a segment).
        bool whole = false;
        if (key_meta >= 0) {
            const int qm = qmeta[0];
            whole = warp_all(qmeta[lane] == qm) && meta_sees(qm, key_meta) && k0 + wk + 15 <= q0;
        }
        u32 vis = 0xffffffffu;
        if (!whole) {
            vis = 0u;
#pragma unroll
            for (int j = 0; j < BWD_BM / 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = j * 8 + 2 * t4 + (e & 1);
                    const bool v = e < 2 ? visible(qmeta[qc], km0, q0 + qc, kr0) : visible(qmeta[qc], km1, q0 + qc, kr1);
                    vis |= (u32)v << (4 * j + e);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < BWD_BM / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qc = j * 8 + 2 * t4 + (e & 1);
                const float p = (vis >> (4 * j + e)) & 1u ? exp2_ftz(fmaf(s[j][e], sl2, -lse_s[qc])) : 0.f;
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
                if (qa < n) atomic_add2(dq + (size_t)qa * dq_stride + c, dqa[j][0], dqa[j][1]);
                if (qb < n) atomic_add2(dq + (size_t)qb * dq_stride + c, dqa[j][2], dqa[j][3]);
            }
        }
        // Redundant by our reading (the simulator passes without it), kept in case a GPU
        // needs it: the barrier before dQ already follows this step's last reads of stage st
        // and of the query metadata, and dS is next written after the next step's first barrier.
        __syncthreads();
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

// The forward's second bound (blocks per SM) holds D = 64 on sm_90 to 168 registers, 3
// blocks per SM (without it ptxas takes 170: 2); on sm_80 the kernel takes 178 unbounded
// (2 blocks) and spills under the bound.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FORWARD_HD64_MIN_BLOCKS 3
#else
#define FORWARD_HD64_MIN_BLOCKS 1
#endif

#define ATTENTION_FORWARD(D, MIN_BLOCKS)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) attention_forward_hd##D(                                     \
        __nv_bfloat16* o, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,     \
        const unsigned int* group, const unsigned char* branch, const unsigned int* group_start, int n,            \
        int n_heads, int n_kv_heads, int q_stride, int kv_stride, int o_stride, float scale) {                      \
        attention_forward_impl<D>(o, lse, q, k, v, group, branch, group_start, n, n_heads, n_kv_heads, q_stride,  \
                                  kv_stride, o_stride, scale);                                                    \
    }

// The backward's second bound (blocks per SM) holds D ≤ 32 to 96 registers, 5 blocks per
// SM: without it ptxas takes 124 registers at D = 32 (4 blocks per SM on sm_90) and 88 at
// D = 16; at 96 nothing spills. At D = 64 and 128 the bound is what the registers give
// anyway (159-162 and 236-239 of 255).
#define ATTENTION_BACKWARD(D, MIN_BLOCKS)                                                                          \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) attention_backward_hd##D(                        \
        float* dq, float* dk, float* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q,                        \
        const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* delta,                      \
        const unsigned int* group, const unsigned char* branch, const unsigned int* group_start, int n,            \
        int n_heads, int n_kv_heads, int q_stride, int kv_stride, int do_stride, int dq_stride, int dkv_stride,    \
        float scale) {                                                                                             \
        attention_backward_impl<D>(dq, dk, dv, dout, q, k, v, lse, delta, group, branch, group_start, n, n_heads,  \
                                   n_kv_heads, q_stride, kv_stride, do_stride, dq_stride, dkv_stride, scale);      \
    }

ATTENTION_FORWARD(16, 1)
ATTENTION_FORWARD(32, 1)
ATTENTION_FORWARD(64, FORWARD_HD64_MIN_BLOCKS)
ATTENTION_FORWARD(128, 1)
ATTENTION_BACKWARD(16, 5)
ATTENTION_BACKWARD(32, 5)
ATTENTION_BACKWARD(64, 3)
ATTENTION_BACKWARD(128, 2)

// D_q = Σ_d dO[q, h, d]·O[q, h, d], [n, n_heads] f32. Each (token, head) row is read by
// head_dim / 8 adjacent lanes, 16 bytes each (a power of two ≤ 32: the launcher checks), so
// a warp's loads cover whole consecutive rows (with the rows of a token adjacent, 512
// contiguous bytes per load instruction), and the lanes' partial sums meet by xor shuffles
// within their group.
extern "C" __global__ void __launch_bounds__(256) attention_backward_delta(
    float* __restrict__ delta, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ o, int n,
    int n_heads, int head_dim, int do_stride, int o_stride) {
    const int lanes = head_dim / 8, rows_per_block = blockDim.x / lanes;
    const long long row = (long long)blockIdx.x * rows_per_block + threadIdx.x / lanes;
    const bool live = row < (long long)n * n_heads;
    float acc = 0.f;
    if (live) {
        const int t = (int)(row / n_heads), h = (int)(row % n_heads), c = (int)(threadIdx.x % lanes) * 8;
        float x[8], y[8];
        load8(dout + (size_t)t * do_stride + (size_t)h * head_dim + c, x);
        load8(o + (size_t)t * o_stride + (size_t)h * head_dim + c, y);
#pragma unroll
        for (int i = 0; i < 8; i++) acc += x[i] * y[i];
    }
    for (int off = lanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (live && threadIdx.x % lanes == 0) delta[row] = acc;
}
