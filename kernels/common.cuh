// Shared helpers for every kernel file: bf16 <-> f32 in 16-byte vectors, warp and block
// reductions, and the tensor-core wrappers attention uses (mma.sync, ldmatrix, cp.async),
// each inline PTX on the device and a call into the kernel simulator under SDPO_SIM.
//
// Conventions (all kernels):
// - activations are row-major, one row per token; `*_stride` arguments count elements;
// - bf16 storage, fp32 arithmetic and accumulation everywhere;
// - vector paths move 16 bytes per thread (8 bf16 or 4 f32) and need 16-byte aligned rows,
//   which the launchers in src/engine/cuda/kernels.rs check before launching.
#pragma once

#ifdef SDPO_SIM
#include "sim/cuda_sim.h"  // the kernel simulator: this source run on the CPU
#define SDPO_DYNAMIC_SMEM(name) unsigned char* name = sdpo_sim_dynamic_smem()
#else
#include <cuda_bf16.h>
#define SDPO_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// NVRTC has no <stdint.h>.
typedef unsigned int u32;

#define SDPO_DEVICE static __device__ __forceinline__

// NVRTC has no <math.h> macros; nvcc may define them already.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// --- bf16 vectors

// Eight bf16 values in one 16-byte load, widened to f32.
SDPO_DEVICE void load8(const __nv_bfloat16* p, float (&f)[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// Eight f32 values rounded to bf16 (round to nearest even) in one 16-byte store.
SDPO_DEVICE void store8(__nv_bfloat16* p, const float (&f)[8]) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// Eight f32 values as two 16-byte loads.
SDPO_DEVICE void load8(const float* p, float (&f)[8]) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

SDPO_DEVICE void store8(float* p, const float (&f)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

// Two f32 packed into one 32-bit register of two bf16 (low half = a), the operand format
// of mma.sync.
SDPO_DEVICE u32 pack_bf16(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}

// Two separate bf16 (low half = lo) packed into one register.
SDPO_DEVICE u32 pack_raw(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (u32)__bfloat16_as_ushort(lo) | ((u32)__bfloat16_as_ushort(hi) << 16);
}

// --- vector atomics: f32 adds into global memory

// sm_90 adds 2 or 4 consecutive floats with one atomic (global memory, the address aligned
// to 8 or 16 bytes: the launchers check); earlier GPUs take 2 or 4 scalar atomics. The
// simulator runs the vector form and fails a launch on a misaligned address.
#if defined(SDPO_SIM) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define SDPO_VECTOR_ATOMICS 1
#endif

SDPO_DEVICE void atomic_add2(float* dst, float a, float b) {
#ifdef SDPO_VECTOR_ATOMICS
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
}

SDPO_DEVICE void atomic_add4(float* dst, float a, float b, float c, float d) {
#ifdef SDPO_VECTOR_ATOMICS
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(a, b, c, d));
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
    atomicAdd(dst + 2, c);
    atomicAdd(dst + 3, d);
#endif
}

// --- warp votes and fast math

// Whether `p` holds in every lane of the warp (all 32 lanes must call it): __all_sync on
// the device, shuffles on the simulator, which has no vote.
SDPO_DEVICE bool warp_all(bool p) {
#ifdef SDPO_SIM
    int v = p;
    for (int o = 16; o > 0; o >>= 1) v &= __shfl_xor_sync(0xffffffffu, v, o);
    return v != 0;
#else
    return __all_sync(0xffffffffu, p);
#endif
}

// 2^x by ex2.approx.ftz: one MUFU instruction, where exp2f (ex2.approx without .ftz, as
// these kernels compile without fast math) adds the range scaling that keeps subnormal
// results; here a result below 2^−126 is 0, on the simulator too. exp2_ftz(−inf) = 0.
SDPO_DEVICE float exp2_ftz(float x) {
#ifdef SDPO_SIM
    const float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.f : r;
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
#endif
}

// --- reductions

SDPO_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

SDPO_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `scratch` holds 32 floats of shared memory and may be reused after return.
SDPO_DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

SDPO_DEVICE float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// --- tensor cores

// D = A·B + D for one m16n8k16 tile, bf16 inputs, f32 accumulators (sm_80+). Fragment
// layouts (PTX ISA, "mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   a[0]: A[g][2t..2t+1]   a[1]: A[g+8][2t..2t+1]   a[2]: A[g][2t+8..]   a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]   b[1]: B[2t+8..2t+9][g]
//   d[0..1]: D[g][2t..2t+1]                          d[2..3]: D[g+8][2t..2t+1]
SDPO_DEVICE void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#ifdef SDPO_SIM
    sdpo_sim_mma_bf16_16816(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// --- shared-memory fragment loads and asynchronous copies (sm_80+)

// ldmatrix.m8n8.x4 (.trans): four 8×8 bf16 matrices from shared memory, a warp collective
// (every lane must call it, with the same variant). Lanes 8j..8j+7 pass the addresses of
// rows 0..7 of matrix j (16 bytes each, 16-byte aligned); lane l gets in r[j] matrix j's
// (row l/4, columns 2(l%4)..+1), i.e. the layout of an mma A or B fragment register; with
// .trans it gets (rows 2(l%4)..+1, column l/4), the fragment of the transposed matrix.
SDPO_DEVICE void ldmatrix_x4(u32 (&r)[4], const __nv_bfloat16* row) {
#ifdef SDPO_SIM
    sdpo_sim_ldmatrix(r, 4, 0, row);
#else
    const u32 a = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

SDPO_DEVICE void ldmatrix_x4_trans(u32 (&r)[4], const __nv_bfloat16* row) {
#ifdef SDPO_SIM
    sdpo_sim_ldmatrix(r, 4, 1, row);
#else
    const u32 a = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// Two matrices: only lanes 0..15's addresses are read (the others' are ignored).
SDPO_DEVICE void ldmatrix_x2_trans(u32 (&r)[2], const __nv_bfloat16* row) {
#ifdef SDPO_SIM
    sdpo_sim_ldmatrix(r, 2, 1, row);
#else
    const u32 a = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
#endif
}

// 16 bytes global -> shared without passing through registers (cp.async.cg: cached in L2
// only); with valid = false the destination is zero-filled and nothing is read (src_size
// 0), so rows past the end need no branch around the instruction, only an in-range
// pointer. Both addresses 16-byte aligned. The copy lands some time before the
// cp_async_wait that retires its group; other threads see it only after a barrier that
// follows that wait.
SDPO_DEVICE void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef SDPO_SIM
    sdpo_sim_cp_async16(smem_dst, gmem_src, valid);
#else
    const u32 d = (u32)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem_src), "r"(valid ? 16 : 0)
                 : "memory");
#endif
}

// Closes the group of this thread's cp.async issued since the last commit (possibly empty).
SDPO_DEVICE void cp_async_commit() {
#ifdef SDPO_SIM
    sdpo_sim_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
SDPO_DEVICE void cp_async_wait() {
#ifdef SDPO_SIM
    sdpo_sim_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
