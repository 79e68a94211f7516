// The CUDA device environment the kernels use, for running their unchanged source on the
// CPU (the kernel simulator: src/engine/cuda/sim.rs builds it, tests/kernel_sim.rs runs
// every kernel and the whole engine on it). common.cuh includes this file instead of
// <cuda_bf16.h> when SDPO_SIM is defined; nothing here is compiled for a GPU.
//
// Model: each thread of a block is a fiber (its own stack and context); the blocks of a
// grid run one after another. A fiber runs until it reaches a rendezvous — __syncthreads,
// a warp shuffle, mma.sync — and waits there until every live thread of its block (or lane
// of its warp) has arrived. Fibers run one at a time: warp by warp, each warp as far as it
// can go (to a __syncthreads) before the next, so warps drift as far apart as the barriers
// allow. `Launch::reverse` reverses the order of blocks, warps and lanes: a kernel that
// reads shared memory another warp writes with no barrier in between, or global memory
// another block of the same launch writes, gives wrong results in one of the two orders.
// A warp whose lanes reach different collectives, a collective with exited lanes, and a
// barrier that can never complete are reported as errors instead of hanging.
//
// ldmatrix is a warp rendezvous like mma.sync (every lane gives a row address, then reads
// its fragment); cp.async copies are queued per thread and performed only when a
// wait_group retires them, which is a schedule the device may also choose, so a missing
// wait (or a missing barrier after it) reads the poisoned destination.
//
// Arithmetic: bf16 conversions round to nearest even as on the device; mma.sync sums the
// exact bf16 products in f32; __expf and friends are the C library's (more exact than the
// device's fast paths, which the tolerances allow for).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one simulated device per OS thread
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// One simulated device per OS thread: launches from different threads do not share state.
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// --- bf16

struct __nv_bfloat16 {
    unsigned short bits;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                  // nearest even
    return {(unsigned short)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

// --- fast math (exact versions)

inline float __expf(float x) { return expf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// --- atomics (blocks and threads never run at the same time: plain read-modify-write)

inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}
inline double atomicAdd(double* p, double v) {
    double old = *p;
    *p = old + v;
    return old;
}
// sm_90's vector forms (global memory, address aligned to the vector's size; the
// simulator fails the launch otherwise): v[i] added to p[i] for i < n.
void sdpo_sim_atomic_add_f32(float* p, const float* v, int n);
inline float2 atomicAdd(float2* p, float2 v) {
    const float2 old = *p;
    sdpo_sim_atomic_add_f32(&p->x, &v.x, 2);
    return old;
}
inline float4 atomicAdd(float4* p, float4 v) {
    const float4 old = *p;
    sdpo_sim_atomic_add_f32(&p->x, &v.x, 4);
    return old;
}

// --- rendezvous (cuda_sim.cpp)

void __syncthreads();
int __syncthreads_or(int predicate);
// Every lane of the warp writes `v`, then reads lane (own ^ lane_mask)'s value.
uint64_t sdpo_sim_shfl_xor(uint64_t v, int lane_mask);
// D += A·B for one m16n8k16 bf16 tile, fragments laid out as the PTX ISA specifies
// (independently of the comment in common.cuh).
void sdpo_sim_mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]);
// The launch's dynamic shared memory, filled with 0xff (NaN in bf16 and f32) per block.
unsigned char* sdpo_sim_dynamic_smem();
// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16: `row` is this lane's row address
// (lanes 8j..8j+7 give rows 0..7 of matrix j; only the first 8·num lanes' are read, and
// each must be 16-byte aligned); r[j] receives matrix j's elements as the PTX ISA lays
// them out (see cuda_sim.cpp).
void sdpo_sim_ldmatrix(unsigned* r, int num, int trans, const void* row);
// cp.async.cg 16 bytes (zeros when !valid), commit_group, wait_group n. A copy poisons its
// destination (0xff) when issued and writes it only when a wait_group retires its group:
// a read before the wait, or a write of the old contents' readers racing the copy, sees
// NaN. A thread that exits with copies pending is an error.
void sdpo_sim_cp_async16(void* smem_dst, const void* gmem_src, int valid);
void sdpo_sim_cp_async_commit();
void sdpo_sim_cp_async_wait(int n);

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof(T));
    raw = sdpo_sim_shfl_xor(raw, lane_mask);
    T out;
    memcpy(&out, &raw, sizeof(T));
    return out;
}

// --- launching: one exported entry point per kernel (SDPO_SIM_EXPORT in the wrapper files)

#include <utility>

namespace sdpo_sim {

// Shared with src/engine/cuda/sim.rs (#[repr(C)] Launch).
struct Launch {
    unsigned grid[3];
    unsigned block[3];
    unsigned smem_bytes;
    int reverse;
    char error[512];
};

// Runs `body(ctx)` as every thread of every block of the grid; 0, or 1 with `error` set.
int run_grid(Launch* launch, void (*body)(void*), void* ctx);

// `params[i]` points at argument i, as cuLaunchKernel's kernelParams do.
template <typename... A, size_t... I>
void call(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}

template <typename... A>
int launch(Launch* l, void** params, void (*kernel)(A...)) {
    struct Ctx {
        void (*kernel)(A...);
        void** params;
    } ctx{kernel, params};
    return run_grid(
        l, [](void* p) { auto* c = static_cast<Ctx*>(p); call(c->kernel, c->params, std::index_sequence_for<A...>{}); },
        &ctx);
}

}  // namespace sdpo_sim

#define SDPO_SIM_EXPORT(name) \
    extern "C" int sdpo_sim_##name(sdpo_sim::Launch* l, void** params) { return sdpo_sim::launch(l, params, name); }
