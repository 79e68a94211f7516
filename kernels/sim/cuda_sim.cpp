// The fiber scheduler behind cuda_sim.h: blocks one after another, each thread of a block a
// fiber, rendezvous at barriers, shuffles, mma.sync and ldmatrix; cp.async queued per
// thread. See cuda_sim.h for the model.
#include "cuda_sim.h"

#include <stdio.h>

#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// --- execution contexts: a stack pointer and a switch that saves the callee-saved state.
// x86-64 has its own few instructions (the simulator switches millions of times per test;
// swapcontext would add a signal-mask system call to each); elsewhere, <ucontext.h>.
#if defined(__x86_64__)
extern "C" void sdpo_sim_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl sdpo_sim_switch
    .type sdpo_sim_switch, @function
sdpo_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sdpo_sim_switch, .-sdpo_sim_switch
)");

namespace sdpo_sim {
struct Context {
    void* sp = nullptr;
};
// A context that starts `entry` (which never returns) on `stack`.
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
    uintptr_t top = ((uintptr_t)stack.data() + stack.size()) & ~(uintptr_t)15;
    uint64_t* frame = (uint64_t*)(top - 16);  // `ret` pops this: entry starts with rsp ≡ 8 (mod 16)
    frame[0] = (uint64_t)entry;
    frame[1] = 0;
    for (int i = 1; i <= 6; i++) frame[-i] = 0;  // rbp, rbx, r12..r15
    uint32_t* csr = (uint32_t*)(frame - 7);
    csr[0] = 0x1f80;  // default MXCSR
    csr[1] = 0x037f;  // default x87 control word
    c.sp = frame - 7;
}
inline void switch_context(Context& save, Context& load) { sdpo_sim_switch(&save.sp, load.sp); }
}  // namespace sdpo_sim
#else
#include <ucontext.h>
namespace sdpo_sim {
struct Context {
    ucontext_t uc;
};
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack.data();
    c.uc.uc_stack.ss_size = stack.size();
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
}  // namespace sdpo_sim
#endif

namespace sdpo_sim {
namespace {

constexpr size_t STACK_BYTES = 256 * 1024;

// What a warp's lanes are doing together; lanes at different collectives is an error.
// ldmatrix carries its variant: LDMATRIX + 2·num + trans.
enum Op { NONE, SHFL, MMA, LDMATRIX };

// One cp.async of 16 bytes, waiting for its group to be retired.
struct AsyncCopy {
    void* dst;
    const void* src;
    bool valid;
};

struct Fiber {
    Context ctx;
    std::vector<char> stack;
    dim3 tid;
    int warp = 0, lane = 0;
    bool done = false;
    const unsigned* wait_on = nullptr;  // a generation counter this fiber waits to change
    unsigned wait_gen = 0;
    // cp.async copies not yet performed, in issue order; group_end[i] = copies in groups
    // 0..i (committed groups, oldest first); copies past the last end are uncommitted.
    std::vector<AsyncCopy> copies;
    std::vector<size_t> group_end;
};

struct Warp {
    unsigned gen = 0, arrived = 0, live = 0;
    int op = NONE;
    uint64_t slot[32];
    unsigned a[32][4], b[32][2];
};

struct State {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Context scheduler;
    Fiber* cur = nullptr;
    unsigned live = 0, block_gen = 0, block_arrived = 0;
    int or_acc = 0, or_result = 0;
    std::vector<unsigned char> dyn_smem;
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    bool failed = false;
    char error[400];
};

thread_local State S;

void yield() { switch_context(S.cur->ctx, S.scheduler); }

[[noreturn]] void fail(const char* what) {
    Fiber* f = S.cur;
    snprintf(S.error, sizeof S.error, "thread (%u,%u,%u): %s", f->tid.x, f->tid.y, f->tid.z, what);
    S.failed = true;
    f->done = true;
    switch_context(f->ctx, S.scheduler);  // never resumed
    __builtin_unreachable();
}

void wait_while(const unsigned* gen, unsigned g) {
    S.cur->wait_on = gen;
    S.cur->wait_gen = g;
    while (*gen == g) yield();
    S.cur->wait_on = nullptr;
}

// Releases the block barrier once every live thread has arrived; exited threads count as
// arrived (as on sm_70+).
void release_block_if_complete() {
    if (S.block_arrived > 0 && S.block_arrived >= S.live) {
        S.block_arrived = 0;
        S.or_result = S.or_acc;
        S.or_acc = 0;
        S.block_gen++;
    }
}

void block_barrier(int predicate) {
    const unsigned g = S.block_gen;
    S.or_acc |= predicate;
    S.block_arrived++;
    release_block_if_complete();
    if (S.block_gen == g) wait_while(&S.block_gen, g);
}

void warp_barrier(int op) {
    Warp& w = S.warps[S.cur->warp];
    if (w.live != 32) fail("warp collective (shuffle, mma or ldmatrix) with exited or missing lanes");
    if (w.arrived == 0) w.op = op;
    if (w.op != op) fail("the lanes of a warp reached different collectives (shuffle, mma, ldmatrix variants)");
    const unsigned g = w.gen;
    if (++w.arrived == w.live) {
        w.arrived = 0;
        w.gen++;
        return;
    }
    wait_while(&w.gen, g);
}

// Every fiber starts here and, once the kernel returns, hands control back for good.
void fiber_main() {
    S.body(S.ctx);
    Fiber* f = S.cur;
    if (!f->copies.empty()) fail("exited with cp.async copies never retired by cp.async.wait_group");
    f->done = true;
    S.live--;
    S.warps[f->warp].live--;
    if (S.warps[f->warp].arrived > 0) fail("exited while other lanes of its warp wait at a collective");
    release_block_if_complete();
    switch_context(f->ctx, S.scheduler);  // never resumed
    __builtin_unreachable();
}

float bf16_half(unsigned reg, int high) {
    __nv_bfloat16 h{(unsigned short)(high ? reg >> 16 : reg & 0xffffu)};
    return __bfloat162float(h);
}

// Runs one block to completion; false on an error (S.error set).
bool run_block(unsigned n_threads, bool reverse) {
    S.live = n_threads;
    S.block_gen = S.block_arrived = 0;
    S.or_acc = S.or_result = 0;
    S.warps.assign((n_threads + 31) / 32, Warp{});
    for (unsigned i = 0; i < n_threads; i++) S.warps[i / 32].live++;
    std::fill(S.dyn_smem.begin(), S.dyn_smem.end(), 0xff);
    for (unsigned i = 0; i < n_threads; i++) {
        Fiber& f = S.fibers[i];
        f.tid = {i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
        f.warp = i / 32;
        f.lane = i % 32;
        f.done = false;
        f.wait_on = nullptr;
        f.copies.clear();
        f.group_end.clear();
        make_context(f.ctx, f.stack, fiber_main);
    }
    // Warp by warp (forward or reverse), each run as far as it can go before the next: the
    // warps of a block drift as far apart as barriers allow, which is what exposes a
    // missing barrier. Lanes of a warp meet at every shuffle and mma.
    const unsigned n_warps = (unsigned)S.warps.size();
    for (;;) {
        bool alive = false, ran = false;
        for (unsigned wi = 0; wi < n_warps; wi++) {
            const unsigned w = reverse ? n_warps - 1 - wi : wi;
            const unsigned lanes = std::min(32u, n_threads - 32 * w);
            for (bool warp_ran = true; warp_ran;) {
                warp_ran = false;
                for (unsigned j = 0; j < lanes; j++) {
                    Fiber& f = S.fibers[32 * w + (reverse ? lanes - 1 - j : j)];
                    if (f.done) continue;
                    alive = true;
                    if (f.wait_on && *f.wait_on == f.wait_gen) continue;
                    S.cur = &f;
                    threadIdx = f.tid;
                    switch_context(S.scheduler, f.ctx);
                    ran = warp_ran = true;
                    if (S.failed) return false;
                }
            }
        }
        if (!alive) return true;
        if (!ran) {
            snprintf(S.error, sizeof S.error, "deadlock: %u live threads all wait at barriers that cannot complete",
                     S.live);
            return false;
        }
    }
}

}  // namespace

int run_grid(Launch* l, void (*body)(void*), void* ctx) {
    blockDim = {l->block[0], l->block[1], l->block[2]};
    gridDim = {l->grid[0], l->grid[1], l->grid[2]};
    const unsigned n_threads = blockDim.x * blockDim.y * blockDim.z;
    if (n_threads == 0 || n_threads > 1024) {
        snprintf(l->error, sizeof l->error, "block of %u threads (1 to 1024)", n_threads);
        return 1;
    }
    if (S.fibers.size() < n_threads) S.fibers.resize(n_threads);
    for (unsigned i = 0; i < n_threads; i++)
        if (S.fibers[i].stack.empty()) S.fibers[i].stack.resize(STACK_BYTES);
    S.dyn_smem.assign(l->smem_bytes, 0xff);
    S.body = body;
    S.ctx = ctx;
    S.failed = false;
    // Blocks in order, or (reverse) in reverse order: a kernel whose blocks read what other
    // blocks of the same launch write depends on the order and fails one of the two.
    const unsigned n_blocks = gridDim.x * gridDim.y * gridDim.z;
    for (unsigned j = 0; j < n_blocks; j++) {
        const unsigned b = l->reverse ? n_blocks - 1 - j : j;
        blockIdx = {b % gridDim.x, b / gridDim.x % gridDim.y, b / (gridDim.x * gridDim.y)};
        if (!run_block(n_threads, l->reverse != 0)) {
            snprintf(l->error, sizeof l->error, "block (%u,%u,%u), %s", blockIdx.x, blockIdx.y, blockIdx.z, S.error);
            return 1;
        }
    }
    return 0;
}

}  // namespace sdpo_sim

using sdpo_sim::S;

void __syncthreads() { sdpo_sim::block_barrier(0); }

int __syncthreads_or(int predicate) {
    sdpo_sim::block_barrier(predicate != 0);
    return S.or_result;
}

uint64_t sdpo_sim_shfl_xor(uint64_t v, int lane_mask) {
    sdpo_sim::Warp& w = S.warps[S.cur->warp];
    const int lane = S.cur->lane;
    w.slot[lane] = v;
    sdpo_sim::warp_barrier(sdpo_sim::SHFL);
    const uint64_t out = w.slot[(lane ^ lane_mask) & 31];
    sdpo_sim::warp_barrier(sdpo_sim::SHFL);
    return out;
}

// PTX ISA, "Matrix Fragments for mma.m16n8k16" (.bf16), with groupID g = lane >> 2 and
// threadID_in_group t = lane & 3: A (16×16, row) register r of lane holds two elements of
// row g + 8·(r & 1), columns 2t + 8·(r >> 1) + {0, 1} (low half first); B (16×8, col)
// register r holds rows 2t + 8r + {0, 1} of column g; C/D element i is row g + 8·(i >> 1),
// column 2t + (i & 1).
void sdpo_sim_mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    sdpo_sim::Warp& w = S.warps[S.cur->warp];
    const int lane = S.cur->lane;
    memcpy(w.a[lane], a, sizeof a);
    memcpy(w.b[lane], b, sizeof b);
    sdpo_sim::warp_barrier(sdpo_sim::MMA);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; k++) {
            // A[row][k]: lane (row % 8)·4 + (k % 8) / 2, register (row / 8) + 2·(k / 8).
            const float av = sdpo_sim::bf16_half(w.a[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)], k & 1);
            // B[k][col]: lane col·4 + (k % 8) / 2, register k / 8.
            const float bv = sdpo_sim::bf16_half(w.b[col * 4 + ((k & 7) >> 1)][k >> 3], k & 1);
            acc += av * bv;
        }
        d[i] = acc;
    }
    sdpo_sim::warp_barrier(sdpo_sim::MMA);
}

unsigned char* sdpo_sim_dynamic_smem() { return S.dyn_smem.data(); }

// PTX ISA, "Warp-level matrix load instruction: ldmatrix" (.m8n8 .b16): lanes 8j..8j+7
// give the addresses of rows 0..7 of matrix j (16 bytes each, 16-byte aligned); lane l
// receives in r[j] the elements (row l/4, columns 2(l%4) and 2(l%4)+1) of matrix j, low
// half first, or with .trans those of the transposed matrix: (rows 2(l%4) and 2(l%4)+1,
// column l/4).
void sdpo_sim_ldmatrix(unsigned* r, int num, int trans, const void* row) {
    sdpo_sim::Warp& w = S.warps[S.cur->warp];
    const int lane = S.cur->lane;
    if (lane < 8 * num && (uintptr_t)row % 16 != 0) sdpo_sim::fail("ldmatrix row address not 16-byte aligned");
    w.slot[lane] = (uint64_t)(uintptr_t)row;
    const int op = sdpo_sim::LDMATRIX + 2 * num + (trans != 0);
    sdpo_sim::warp_barrier(op);
    for (int j = 0; j < num; j++) {
        unsigned short e[2];
        for (int h = 0; h < 2; h++) {
            const int rr = trans ? 2 * (lane & 3) + h : lane >> 2;  // row of the stored matrix
            const int cc = trans ? lane >> 2 : 2 * (lane & 3) + h;  // its column
            memcpy(&e[h], (const unsigned char*)(uintptr_t)w.slot[8 * j + rr] + 2 * cc, 2);
        }
        r[j] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }
    sdpo_sim::warp_barrier(op);
}

void sdpo_sim_atomic_add_f32(float* p, const float* v, int n) {
    if ((uintptr_t)p % (4 * n) != 0) sdpo_sim::fail(n == 2 ? "float2 atomicAdd not 8-byte aligned" : "float4 atomicAdd not 16-byte aligned");
    for (int i = 0; i < n; i++) p[i] += v[i];
}

void sdpo_sim_cp_async16(void* smem_dst, const void* gmem_src, int valid) {
    if ((uintptr_t)smem_dst % 16 != 0 || (valid && (uintptr_t)gmem_src % 16 != 0))
        sdpo_sim::fail("cp.async of 16 bytes with an address not 16-byte aligned");
    memset(smem_dst, 0xff, 16);  // undefined until retired: NaN for any early reader
    S.cur->copies.push_back({smem_dst, gmem_src, valid != 0});
}

void sdpo_sim_cp_async_commit() {
    sdpo_sim::Fiber* f = S.cur;
    f->group_end.push_back(f->copies.size());
}

// Retires every committed group but the newest n: performs their copies, in issue order.
void sdpo_sim_cp_async_wait(int n) {
    sdpo_sim::Fiber* f = S.cur;
    if ((int)f->group_end.size() <= n) return;
    const size_t n_retire = f->group_end.size() - n, done = f->group_end[n_retire - 1];
    for (size_t i = 0; i < done; i++) {
        const sdpo_sim::AsyncCopy& c = f->copies[i];
        if (c.valid)
            memcpy(c.dst, c.src, 16);
        else
            memset(c.dst, 0, 16);
    }
    f->copies.erase(f->copies.begin(), f->copies.begin() + done);
    f->group_end.erase(f->group_end.begin(), f->group_end.begin() + n_retire);
    for (size_t& e : f->group_end) e -= done;
}
