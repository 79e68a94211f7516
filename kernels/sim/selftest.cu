// Kernels that exercise the simulator's ldmatrix and cp.async directly, through the
// wrappers in common.cuh (tests/kernel_sim.rs compares their outputs with the PTX ISA's
// layouts written out in Rust, and checks the errors). Built into the simulator only
// (src/engine/cuda/sim.rs), never for a device: the attention kernels are what uses these
// instructions there.
#include "../common.cuh"

// One warp. `m` (32 rows × 8 bf16, row-major) goes to shared memory by cp.async with a row
// pitch of 16 elements; then lane l passes row l (+ `skew` elements) to the ldmatrix
// `variant`: 0 x4, 1 x4.trans, 2 x2.trans, 3 x4 on even lanes and x4.trans on odd ones
// (a divergent collective). out[4·l + j] = r[j] (x2: j < 2, the rest left alone).
extern "C" __global__ void sim_selftest_ldmatrix(u32* out, const __nv_bfloat16* m, int variant, int skew) {
    SDPO_DYNAMIC_SMEM(smem);
    __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem);
    const int l = threadIdx.x;
    cp_async16(tile + l * 16, m + l * 8, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const __nv_bfloat16* row = tile + l * 16 + skew;
    u32 r[4];
    if (variant == 0 || (variant == 3 && l % 2 == 0)) {
        ldmatrix_x4(r, row);
    } else if (variant == 1 || variant == 3) {
        ldmatrix_x4_trans(r, row);
    } else {
        u32 r2[2];
        ldmatrix_x2_trans(r2, row);
        r[0] = r2[0];
        r[1] = r2[1];
        r[2] = out[4 * l + 2];
        r[3] = out[4 * l + 3];
    }
    for (int j = 0; j < 4; j++) out[4 * l + j] = r[j];
}

// One warp; thread t copies row t (4 floats) of `src` into shared memory, zero-filled when
// t ≥ n_valid, in two groups (rows < 16, then the rest); then thread t writes shared row
// 31 − t (another thread's copy) to out[4t..]. mode 0: wait for both groups and
// __syncthreads before reading (correct); 1: only cp.async.wait_group 1, and thread t
// reads its own row t (so rows ≥ 16, of the second group, are still in flight when read,
// in any schedule), then wait_group 0 before exit; 2: no wait at all; 3: a destination
// 8 bytes off alignment.
extern "C" __global__ void sim_selftest_cp_async(float* out, const float* src, int n_valid, int mode) {
    SDPO_DYNAMIC_SMEM(smem);
    float* rows = reinterpret_cast<float*>(smem);
    const int t = threadIdx.x;
    float* dst = rows + t * 4 + (mode == 3 ? 2 : 0);
    const float* from = src + (t < n_valid ? t : 0) * 4;  // in range even when not read
    if (t < 16) cp_async16(dst, from, t < n_valid);
    cp_async_commit();
    if (t >= 16) cp_async16(dst, from, t < n_valid);
    cp_async_commit();
    if (mode == 0) cp_async_wait<0>();
    if (mode == 1) cp_async_wait<1>();
    __syncthreads();
    const int r = mode == 1 ? t : 31 - t;
    for (int i = 0; i < 4; i++) out[t * 4 + i] = rows[r * 4 + i];
    if (mode == 1) cp_async_wait<0>();
}
