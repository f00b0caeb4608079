// Host emulator of the CUDA features fwd_sm80.cu and fwd_naive.cu use, run over
// the real kernel sources (see gen.py): every CUDA thread is a fiber; ldmatrix,
// mma.sync, shuffles, barriers and cp.async are emulated and each case is
// checked against an f64 reference (../emu-common/check.h). Driven by
// tests/emulated_sm80.rs.
//
// What is checked besides the result: reads/writes outside the tensors,
// stray writes into O's padding and LSE's guards, shared-memory overruns,
// bank conflicts, and the ordering of every shared-memory access (see
// "shared-memory ordering" below): an access that overlaps a cp.async copy
// not yet waited for and published by a barrier, or a plain access that
// races with another thread's, is an emulator error whatever the timing.
//
// Options:
//   --kernel=sm80|naive        which kernel table
//   --land=lazy|eager|random   cp.async data lands at the wait, at issue, or at
//                              a random point in between
//   --order=shuffle|fixed      random or fixed warp order
//   --cases=all|quick|none|neg|mods  fixed case set (neg: the negative
//                              control's; mods: ALiBi and attention sinks)
//   --random=N --seed=S        N seeded random cases
//   --round=exact|hw           hw: ex2.approx with its documented error, and
//                              mma accumulation truncated and jittered
//   --only=SUBSTR              only kernels whose name contains SUBSTR
//   --cases=bwd-config         print the tiled backward's threads and shared memory per bucket
//   --bwd=CASE --bwd-out=ANSWER [--det=1]
//                              instead: one backward case file through the
//                              tiled backward (kernels/bwd_sm80.cu), see run_bwd
#include "shim.h"
#include "../emu-common/check.h"
#include "kernels/fwd_sm80.cu"
#undef FA_KERNEL
#undef FA_SHAPE
#undef FA_CFG
#include "kernels/fwd_naive.cu"
#include "kernels/bwd_sm80.cu"
#include "../emu-common/bwd_case.h"
#include <string>

// ------------------------------------------------------------------ options
enum Land { LAND_LAZY, LAND_EAGER, LAND_RANDOM };
static Land land = LAND_LAZY;
static bool shuffle_order = true;
static bool hw_round = false;
static std::mt19937 rng(1);
static uint64_t noise_state = 0x9e3779b97f4a7c15ull;
static long errors = 0;
static long ldsm_conflicts = 0, ldsm_phases = 0;
static long n_ctas = 0, n_cp_async = 0, n_checked = 0;

#define FAIL(...)                                        \
    do {                                                 \
        if (errors++ < 20) {                             \
            fprintf(stderr, "EMU ERROR: " __VA_ARGS__);  \
            fprintf(stderr, "\n");                       \
        }                                                \
    } while (0)

// Uniform in [-1, 1): the rounding noise of --round=hw, independent of the
// scheduling rng so that thread order and rounding can vary separately.
static double noise() {
    noise_state ^= noise_state << 13; noise_state ^= noise_state >> 7; noise_state ^= noise_state << 17;
    return (double)(noise_state >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

// ------------------------------------------------------------------ scheduler
enum { RUN, WAIT_WARP, WAIT_BAR, DONE };
enum { OP_SHFL = 1, OP_SHFL_IDX, OP_LDSM, OP_LDSM_T, OP_MMA_F16, OP_MMA_BF16, OP_SYNCWARP };

struct Copy { uint32_t dst; const unsigned char *src; uint32_t bytes; int seq; bool landed; uint32_t size = 16; };

struct Lane {
    ucontext_t ctx;     // fiber context where emu_switch is not available
    void *sp = nullptr; // saved stack pointer (emu_switch)
    std::vector<char> stack;
    int op = 0;
    uint32_t addr = 0;
    float fval = 0;
    int ival = 0;
    uint32_t a[4], b[2];
    float c[4];
    uint32_t r[4];
    float d[4];
    float fout;
    std::vector<Copy> open;
    std::deque<std::vector<Copy>> groups;
    int seq = 0;                                // cp.async copies issued
    int done_seq = 0;                           // copies 1..done_seq completed (waited for)
    std::vector<std::pair<int, int>> done_at;   // (done_seq, CTA epoch of that wait)
    int shared_calls = 0;                       // emu_shared_alloc calls so far
    int last_add_epoch = -1;                    // CTA epoch of this thread's last dQ atomicAdd
};

unsigned char *emu_smem;
uint3 blockIdx;
uint3 gridDim;  // set by the backward's launches (its reversed grid)
static std::vector<Lane> lanes;
static uint8_t lstate[1024];  // each lane's RUN/WAIT_*/DONE, apart from Lane: the scheduler scans it every step
static int cur = -1;
static int n_threads = 0;
static void (*kernel_fn)(FaFwdParams);
static FaFwdParams kernel_params;
static void (*bwd_fn)(FaBwdParams) = nullptr;  // set: the lanes run this (--bwd) instead
static FaBwdParams bwd_params;
static size_t smem_bytes = 0;
struct Range { const unsigned char *lo, *hi; };
static std::vector<Range> readable;
static Range writable;
static std::vector<Range> writable_more;  // --bwd: the gradients and the workspace
static std::vector<size_t> shared_offsets;  // naive kernel: offset of each static array
static size_t shared_top = 0;

uint3 emu_thread_idx() { return make_uint3(cur, 0, 0); }

// Fiber switches: swapcontext makes a signal-mask system call each time, which
// was most of the emulator's run time; on x86-64 a few instructions that swap
// the callee-saved registers and the stack pointer do the same job.
#if defined(__x86_64__)
extern "C" void emu_switch(void **save_sp, void *load_sp);
asm(".text\n.globl emu_switch\n.type emu_switch,@function\nemu_switch:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
    "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n");
static void *sched_sp;
static void lane_entry();
static void start_fiber(Lane &L) {
    uintptr_t top = ((uintptr_t)(L.stack.data() + L.stack.size())) & ~(uintptr_t)15;
    void **sp = (void **)(top - 64);
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;   // r15 .. rbp
    sp[6] = (void *)&lane_entry;                   // where `ret` goes
    sp[7] = nullptr;                               // lane_entry's return address (never used)
    L.sp = sp;
}
static void to_scheduler() { emu_switch(&lanes[cur].sp, sched_sp); }
static void to_lane(int i) { cur = i; emu_switch(&sched_sp, lanes[i].sp); }
static void lane_exit() { void *dead; emu_switch(&dead, sched_sp); }
#else
static ucontext_t sched_ctx;
static void lane_entry();
static void start_fiber(Lane &L) {
    getcontext(&L.ctx);
    L.ctx.uc_stack.ss_sp = L.stack.data();
    L.ctx.uc_stack.ss_size = L.stack.size();
    L.ctx.uc_link = nullptr;
    makecontext(&L.ctx, lane_entry, 0);
}
static void to_scheduler() { swapcontext(&lanes[cur].ctx, &sched_ctx); }
static void to_lane(int i) { cur = i; swapcontext(&sched_ctx, &lanes[i].ctx); }
static void lane_exit() { setcontext(&sched_ctx); }
#endif
static void block_on(int state) {
    lstate[cur] = state;
    to_scheduler();
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) FAIL("partial shfl mask");
    Lane &L = lanes[cur];
    L.op = OP_SHFL; L.fval = v; L.ival = lane_mask;
    block_on(WAIT_WARP);
    return lanes[cur].fout;
}
float __shfl_sync(unsigned mask, float v, int src_lane) {
    if (mask != 0xffffffffu) FAIL("partial shfl mask");
    if (src_lane < 0 || src_lane > 31) FAIL("shfl source lane %d", src_lane);  // the kernels never rely on wrapping
    Lane &L = lanes[cur];
    L.op = OP_SHFL_IDX; L.fval = v; L.ival = src_lane & 31;
    block_on(WAIT_WARP);
    return lanes[cur].fout;
}
void __syncthreads() { block_on(WAIT_BAR); }
void __syncwarp(unsigned) { lanes[cur].op = OP_SYNCWARP; block_on(WAIT_WARP); }

// ------------------------------------------------------------------ numerics
static bool is_sub(float x) { return x != 0.f && fabsf(x) < FLT_MIN; }

// ex2.approx.ftz.f32: subnormal inputs and results flush to zero; PTX documents
// a maximum relative error of 2^-22 for the approximation, which --round=hw
// applies with a random sign and size.
float emu_ex2(float x) {
    if (is_sub(x)) x = 0.f;
    float y = exp2f(x);
    if (hw_round && std::isfinite(y) && y != 0.f) y = (float)((double)y * (1.0 + noise() * 0x1p-22));
    if (is_sub(y)) y = 0.f;
    return y;
}
// __fdividef: 0 for 2^126 < |b| < 2^128 (CUDA's documented behaviour), else
// a / b within 2 ulp (--round=hw).
float __fdividef(float a, float b) {
    if (fabsf(b) > 0x1p126f && std::isfinite(b)) return 0.f;
    float y = a / b;
    if (hw_round && std::isfinite(y) && y != 0.f) y = (float)((double)y * (1.0 + noise() * 0x1p-23));
    return y;
}

// f32 rounding toward zero of an exactly computed double.
static float to_f32_rz(double s) {
    float f = (float)s;
    if (std::isfinite(f) && fabs((double)f) > fabs(s)) f = nextafterf(f, 0.f);
    return f;
}

// ------------------------------------------------------------------ shared-memory ordering
// Per 4-byte granule of shared memory: the last write (thread, CTA epoch, warp
// epoch, and for a cp.async its sequence number in the issuing thread) and the
// reads since. The CTA epoch counts completed __syncthreads, a warp's epoch its
// completed __syncwarp. Rules (conservative readings of the PTX memory model):
//  - a cp.async copy is in flight until its thread's cp.async.wait_group covers
//    it; then its data is visible to that thread, and to others only after a
//    __syncthreads that follows the wait;
//  - plain accesses by different threads are ordered by a __syncthreads, or
//    within a warp by a __syncwarp; ldmatrix counts as a read by the whole warp
//    (its data goes to every lane), so it is ordered with a lane's own plain
//    write only by a __syncwarp.
// Any access that overlaps an unordered write, and any write (plain or a new
// cp.async) that overlaps an unordered read, is reported.
struct Gran {
    long cta = -1;    // the CTA this entry belongs to: older entries read as fresh
    int w_thread = -1, w_E = 0, w_we = 0, w_seq = 0;
    int r_E = -1, r_we = 0, r_thread = -1;
    uint32_t r_warps = 0;
};
static std::vector<Gran> shadow;
static int cta_epoch = 0;
static std::vector<int> warp_epoch;

static int completion_epoch(const Lane &U, int seq) {
    for (auto &d : U.done_at)
        if (d.first >= seq) return d.second;
    return INT32_MAX;
}

// who: the accessing thread; collective: a warp-wide ldmatrix (who is the lane
// that gave the address).
static void shadow_access(uint32_t off, uint32_t n, int who, bool collective, bool write, int seq,
                          const char *what) {
    if (off % 4 || n % 4) { FAIL("%s: unaligned shared access at %u (%u bytes)", what, off, n); return; }
    if (off + n > smem_bytes) { FAIL("%s: shared access %u..%u past %zu bytes", what, off, off + n, smem_bytes); return; }
    const int warp = who / 32, we = warp_epoch[warp];
    const int reader = collective ? -2 : who;
    for (uint32_t g = off / 4; g < (off + n) / 4; ++g) {
        Gran &s = shadow[g];
        if (s.cta != n_ctas) { s = Gran(); s.cta = n_ctas; }
        ++n_checked;
        if (s.w_thread >= 0) {
            if (s.w_seq > 0) {
                const Lane &U = lanes[s.w_thread];
                if (s.w_seq > U.done_seq) {
                    FAIL("%s by thread %d overlaps shared bytes %u.. of a cp.async of thread %d still in flight "
                         "(no cp.async.wait_group covers it yet)", what, who, g * 4, s.w_thread);
                    return;
                }
                if (!(s.w_thread == who && !collective) && !(completion_epoch(U, s.w_seq) < cta_epoch)) {
                    FAIL("%s by thread %d overlaps shared bytes %u.. of a cp.async of thread %d that was waited "
                         "for but not yet published by a __syncthreads", what, who, g * 4, s.w_thread);
                    return;
                }
            } else {
                const bool ordered = s.w_E < cta_epoch || (s.w_thread == who && !collective) ||
                                     (s.w_thread / 32 == warp && s.w_we < we);
                if (!ordered) {
                    FAIL("%s by thread %d races with a plain write of thread %d to shared bytes %u.. "
                         "(no barrier between)", what, who, s.w_thread, g * 4);
                    return;
                }
            }
        }
        if (write) {
            if (s.r_E == cta_epoch) {
                const bool other_warp = (s.r_warps & ~(1u << warp)) != 0;
                const bool same_warp = (s.r_warps & (1u << warp)) && s.r_we == we && s.r_thread != who;
                if (other_warp || same_warp) {
                    FAIL("%s by thread %d overwrites shared bytes %u.. that %s read without a barrier between",
                         what, who, g * 4, other_warp ? "another warp" : "another lane (or ldmatrix) of its warp");
                    return;
                }
            }
            s = Gran();
            s.cta = n_ctas;
            s.w_thread = who; s.w_E = cta_epoch; s.w_we = we; s.w_seq = seq;
        } else if (s.r_E != cta_epoch || (s.r_warps == (1u << warp) && s.r_we != we)) {
            s.r_E = cta_epoch; s.r_we = we; s.r_warps = 1u << warp; s.r_thread = reader;
        } else {
            s.r_warps |= 1u << warp;
            if (s.r_thread != reader) s.r_thread = -1;
            s.r_we = we;
        }
    }
}

void emu_mem_access(const void *p, size_t bytes, bool write) {
    const unsigned char *c = (const unsigned char *)p;
    if (c >= emu_smem && c < emu_smem + smem_bytes + 1024) {
        shadow_access((uint32_t)(c - emu_smem), (uint32_t)bytes, cur, false, write, 0, write ? "store" : "load");
        return;
    }
    if (write) {
        bool ok = c >= writable.lo && c + bytes <= writable.hi;
        for (auto &r : writable_more) ok |= c >= r.lo && c + bytes <= r.hi;
        if (!ok) FAIL("global store outside O's allocation (thread %d)", cur);
    } else {
        bool ok = false;
        for (auto &r : readable) ok |= c >= r.lo && c + bytes <= r.hi;
        if (!ok) FAIL("global load outside Q/K/V (thread %d)", cur);
    }
}

void *emu_shared_alloc(size_t bytes) {
    Lane &L = lanes[cur];
    const size_t k = L.shared_calls++;
    if (k == shared_offsets.size()) {
        shared_offsets.push_back(shared_top);
        shared_top += (bytes + 15) / 16 * 16;
        if (shared_top > smem_bytes) FAIL("static shared arrays exceed %zu bytes", smem_bytes);
    }
    return emu_smem + shared_offsets[k];
}

// ------------------------------------------------------------------ cp.async
static void do_copy(Copy &c) {
    if (c.landed) return;
    if (c.bytes) memcpy(emu_smem + c.dst, c.src, c.size);
    else memset(emu_smem + c.dst, 0, c.size);
    c.landed = true;
}

// The block table of the running case (see emu_table_read in shim.h).
static const int32_t *table_lo = nullptr, *table_hi = nullptr;
int32_t emu_table_read(const int32_t *table, int64_t i) {
    const int32_t *e = table + i;
    if (e < table_lo || e >= table_hi) { FAIL("block_table read outside the table (entry %lld)", (long long)i); return 0; }
    if (*e < 0) FAIL("block_table entry %lld read: not a page of the sequence (-1)", (long long)i);
    return *e;
}

// cp.async of `size` bytes (16: .cg tiles; 4: .ca rows of LSE and D):
// both addresses aligned to the size, src_bytes all or nothing.
static void cp_async(uint32_t dst, const void *src, uint32_t bytes, uint32_t size) {
    if (dst % size || dst + size > smem_bytes) { FAIL("cp.async dst %u out of smem (%zu)", dst, smem_bytes); return; }
    if (bytes != 0 && bytes != size) FAIL("cp.async bytes %u of %u", bytes, size);
    const unsigned char *s = (const unsigned char *)src;
    if ((uintptr_t)s % size) FAIL("cp.async src misaligned");
    if (bytes) {
        bool ok = false;
        for (auto &r : readable) ok |= s >= r.lo && s + size <= r.hi;
        if (!ok) { FAIL("cp.async reads outside the kernel's inputs (thread %d)", cur); return; }
    }
    Lane &L = lanes[cur];
    Copy c{dst, s, bytes, ++L.seq, false, size};
    ++n_cp_async;
    shadow_access(dst, size, cur, false, true, c.seq, "cp.async");
    if (land == LAND_EAGER) do_copy(c);
    L.open.push_back(c);
}
void emu_cp_async_16(uint32_t dst, const void *src, uint32_t bytes) { cp_async(dst, src, bytes, 16); }
void emu_cp_async_4(uint32_t dst, const void *src, uint32_t bytes) { cp_async(dst, src, bytes, 4); }
void emu_cp_async_commit() {
    Lane &L = lanes[cur];
    L.groups.push_back(std::move(L.open));
    L.open.clear();
}
static void complete_group(Lane &L) {
    for (auto &c : L.groups.front()) {
        do_copy(c);
        L.done_seq = std::max(L.done_seq, c.seq);
    }
    L.done_at.push_back({L.done_seq, cta_epoch});
    L.groups.pop_front();
}
void emu_cp_async_wait(int n) {
    Lane &L = lanes[cur];
    while ((int)L.groups.size() > n) complete_group(L);
}
// --land=random: some copy of some thread lands now (data only; it is still
// in flight for the ordering rules until its wait).
static void land_something() {
    Lane &L = lanes[rng() % n_threads];
    auto *g = !L.groups.empty() ? &L.groups[rng() % L.groups.size()] : &L.open;
    if (!g->empty()) do_copy((*g)[rng() % g->size()]);
}

// ------------------------------------------------------------------ backward: atomics and turns
float atomicAdd(float *p, float v) {
    emu_mem_access(p, 4, true);
    lanes[cur].last_add_epoch = cta_epoch;
    const float old = *p;
    *p = old + v;
    return old;
}
unsigned atomicAdd(uint32_t *p, unsigned v) {
    emu_mem_access(p, 4, true);
    const unsigned old = *p;
    *p = old + v;
    return old;
}
void __nanosleep(unsigned) {
    FAIL("a CTA waits for a dQ turn that no CTA started before it passes (thread %d, block %u,%u,%u): "
         "on a GPU it could wait forever", cur, blockIdx.x, blockIdx.y, blockIdx.z);
    exit(1);
}
uint32_t emu_dynamic_smem_bytes() { return (uint32_t)smem_bytes; }
void __trap() {
    FAIL("__trap (thread %d, block %u,%u,%u)", cur, blockIdx.x, blockIdx.y, blockIdx.z);
    exit(1);
}
int emu_ld_acquire(const int32_t *p) {
    emu_mem_access(p, 4, false);
    return *p;
}
// A turn passed: every thread's dQ adds must be ordered before the release,
// by a barrier completed since each thread's last add (on a GPU the next
// CTA could otherwise add first; here adds land at once, so only the
// barrier's absence can be seen).
void emu_red_release_add1(int32_t *p) {
    emu_mem_access(p, 4, true);
    for (size_t i = 0; i < lanes.size() && i < (size_t)n_threads; ++i)
        if (lanes[i].last_add_epoch >= cta_epoch) {
            FAIL("dQ turn passed by thread %d before thread %zu's adds were ordered by a barrier", cur, i);
            break;
        }
    ++*p;
}

// ------------------------------------------------------------------ warp collectives
void emu_ldsm(uint32_t (&r)[4], uint32_t addr, bool trans) {
    Lane &L = lanes[cur];
    L.op = trans ? OP_LDSM_T : OP_LDSM; L.addr = addr;
    block_on(WAIT_WARP);
    for (int i = 0; i < 4; ++i) r[i] = lanes[cur].r[i];
}
void emu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
    Lane &L = lanes[cur];
    L.op = bf16 ? OP_MMA_BF16 : OP_MMA_F16;
    for (int i = 0; i < 4; ++i) { L.a[i] = a[i]; L.c[i] = d[i]; }
    L.b[0] = b0; L.b[1] = b1;
    block_on(WAIT_WARP);
    for (int i = 0; i < 4; ++i) d[i] = lanes[cur].d[i];
}

static void exec_warp(int w) {
    Lane *W = &lanes[w * 32];
    const int op = W[0].op;
    for (int l = 1; l < 32; ++l)
        if (W[l].op != op) { FAIL("divergent warp collective in warp %d (%d vs %d)", w, op, W[l].op); break; }
    if (op == OP_SHFL) {
        for (int l = 0; l < 32; ++l) W[l].fout = W[l ^ W[l].ival].fval;
    } else if (op == OP_SHFL_IDX) {
        for (int l = 0; l < 32; ++l) W[l].fout = W[W[l].ival].fval;
    } else if (op == OP_LDSM || op == OP_LDSM_T) {
        for (int m = 0; m < 4; ++m) {
            uint16_t mat[8][8];
            int slots = 0;
            for (int row = 0; row < 8; ++row) {
                uint32_t a = W[8 * m + row].addr;
                if (a % 16 || a + 16 > smem_bytes) { FAIL("ldmatrix address %u out of smem", a); a = 0; }
                shadow_access(a, 16, w * 32 + 8 * m + row, true, false, 0, "ldmatrix");
                memcpy(mat[row], emu_smem + a, 16);
                slots |= 1 << ((a / 16) % 8);
            }
            ldsm_phases++;
            if (slots != 0xff) ldsm_conflicts++;
            for (int t = 0; t < 32; ++t) {
                uint16_t lo, hi;
                if (op == OP_LDSM) { lo = mat[t / 4][2 * (t % 4)]; hi = mat[t / 4][2 * (t % 4) + 1]; }
                else { lo = mat[2 * (t % 4)][t / 4]; hi = mat[2 * (t % 4) + 1][t / 4]; }
                W[t].r[m] = lo | ((uint32_t)hi << 16);
            }
        }
    } else if (op == OP_MMA_F16 || op == OP_MMA_BF16) {
        const bool bf = op == OP_MMA_BF16;
        float A[16][16], B[16][8], C[16][8];
        for (int t = 0; t < 32; ++t) {
            const int g = t / 4, c = 2 * (t % 4);
            for (int e = 0; e < 2; ++e) {
                A[g][c + e] = h2f(W[t].a[0] >> (16 * e), bf);
                A[g + 8][c + e] = h2f(W[t].a[1] >> (16 * e), bf);
                A[g][c + 8 + e] = h2f(W[t].a[2] >> (16 * e), bf);
                A[g + 8][c + 8 + e] = h2f(W[t].a[3] >> (16 * e), bf);
                B[c + e][g] = h2f(W[t].b[0] >> (16 * e), bf);
                B[c + 8 + e][g] = h2f(W[t].b[1] >> (16 * e), bf);
                C[g][c + e] = W[t].c[e];
                C[g + 8][c + e] = W[t].c[2 + e];
            }
        }
        float D[16][8];
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                if (!hw_round) {
                    float s = C[i][j];
                    for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
                    D[i][j] = s;
                } else {
                    // Tensor cores add exact products in blocks (8 for f16/bf16
                    // on sm80) to the aligned accumulator and truncate: each
                    // block is summed exactly here, rounded toward zero, then
                    // moved by up to one more ulp either way.
                    float s = C[i][j];
                    for (int k0 = 0; k0 < 16; k0 += 8) {
                        double e = s;
                        for (int k = k0; k < k0 + 8; ++k) e += (double)A[i][k] * B[k][j];
                        s = to_f32_rz(e);
                        const double u = noise();
                        if (std::isfinite(s) && s != 0.f && fabs(u) > 0.5) s = nextafterf(s, u > 0 ? INFINITY : -INFINITY);
                    }
                    D[i][j] = s;
                }
            }
        for (int t = 0; t < 32; ++t) {
            const int g = t / 4, c = 2 * (t % 4);
            W[t].d[0] = D[g][c]; W[t].d[1] = D[g][c + 1];
            W[t].d[2] = D[g + 8][c]; W[t].d[3] = D[g + 8][c + 1];
        }
    } else if (op == OP_SYNCWARP) {
        warp_epoch[w]++;
    } else {
        FAIL("unknown op %d", op);
    }
    for (int l = 0; l < 32; ++l) lstate[w * 32 + l] = RUN;
}

static void lane_entry() {
    if (bwd_fn) bwd_fn(bwd_params);
    else kernel_fn(kernel_params);
    lstate[cur] = DONE;
    lane_exit();
}

static void run_cta(int threads) {
    n_threads = threads;
    ++n_ctas;
    if ((int)lanes.size() < threads) lanes.resize(threads);
    for (int i = 0; i < threads; ++i) {
        Lane &L = lanes[i];
        // Stacks are kept from CTA to CTA: allocating them is most of the cost.
        if (L.stack.empty()) L.stack.resize(256 * 1024);
        lstate[i] = RUN; L.op = 0;
        L.open.clear(); L.groups.clear();
        L.seq = 0; L.done_seq = 0; L.done_at.clear(); L.shared_calls = 0; L.last_add_epoch = -1;
        start_fiber(L);
    }
    if (shadow.size() < smem_bytes / 4) shadow.resize(smem_bytes / 4);
    cta_epoch = 0;
    warp_epoch.assign(threads / 32, 0);
    shared_offsets.clear();
    shared_top = 0;
    const int warps = threads / 32;
    std::vector<int> cand;
    for (;;) {
        // warps that can make progress: some lane runnable, or a complete warp collective
        cand.clear();
        for (int w = 0; w < warps; ++w) {
            int run = 0, ww = 0;
            for (int l = 0; l < 32; ++l) {
                run += lstate[w * 32 + l] == RUN;
                ww += lstate[w * 32 + l] == WAIT_WARP;
            }
            if (run || ww == 32) cand.push_back(w);
        }
        if (land == LAND_RANDOM && rng() % 4 == 0) land_something();
        if (cand.empty()) {
            int nbar = 0, ndone = 0, nw = 0;
            for (int i = 0; i < threads; ++i) {
                nbar += lstate[i] == WAIT_BAR; ndone += lstate[i] == DONE; nw += lstate[i] == WAIT_WARP;
            }
            if (ndone == threads) break;
            if (nbar == threads) {
                for (int i = 0; i < threads; ++i) lstate[i] = RUN;
                cta_epoch++;
                continue;
            }
            FAIL("deadlock: %d at barrier, %d in warp ops, %d done", nbar, nw, ndone);
            exit(1);
        }
        const int w = shuffle_order ? cand[rng() % cand.size()] : cand[0];
        int ww = 0;
        for (int l = 0; l < 32; ++l) ww += lstate[w * 32 + l] == WAIT_WARP;
        if (ww == 32) { exec_warp(w); continue; }
        for (int l = 0; l < 32; ++l)
            if (lstate[w * 32 + l] == RUN) {
                to_lane(w * 32 + l);
            }
    }
    // A copy never waited for lands in the shared memory of a finished CTA:
    // at best wasted bandwidth, at worst a sign of a miscounted ring.
    for (int i = 0; i < threads; ++i) {
        Lane &L = lanes[i];
        if (!L.open.empty()) FAIL("thread %d exits with uncommitted cp.async copies", i);
        for (auto &g : L.groups)
            if (!g.empty()) { FAIL("thread %d exits with cp.async copies never waited for", i); break; }
    }
}

// ------------------------------------------------------------------ test harness
enum KernKind { SM80, NAIVE };
struct Kern { const char *name; void (*fn)(FaFwdParams); int hd, bm, bn, threads, smem; bool bf16; KernKind kind; };
// One entry per FA_KERNEL line of the kernel files (gen.py extracts them).
#undef FA_KERNEL
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid) \
    {#name, name, head_dim, block_m, block_n, threads, smem, std::is_same<FA_DTYPE(dtype), __nv_bfloat16>::value, SM80},
static Kern sm80_kerns[] = {
#include "kernels/sm80_table.inc"
    {nullptr, nullptr, 0, 0, 0, 0, 0, false, SM80}};
#undef FA_KERNEL
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid) \
    {#name, name, head_dim, block_m, block_n, threads, smem, std::is_same<FA_DTYPE(dtype), __nv_bfloat16>::value, NAIVE},
static Kern naive_kerns[] = {
#include "kernels/naive_table.inc"
    {nullptr, nullptr, 0, 0, 0, 0, 0, false, NAIVE}};
static std::vector<const Kern *> kerns;

static uint16_t f2h(float f, bool bf16) {
    if (bf16) { __nv_bfloat16 b = __float2bfloat16_rn(f); uint16_t u; memcpy(&u, &b, 2); return u; }
    __half h = __float2half_rn(f); uint16_t u; memcpy(&u, &h, 2); return u;
}

// Score modifiers of a case (DESIGN.md 1b, params.h).
struct ModSpec {
    int alibi = 0;         // 0: none; 1: a slope per query head ([Hq]); 2: per batch entry and head ([B, Hq])
    float slope_mul = 1;   // slopes are slope_mul * 2^(-8 (h + 1) / Hq) (ALiBi's), times a random
                           // factor in [0.5, 1.5) per entry with 2
    int sink = 0;          // 0: none; 1: a sink per query head drawn from N(0, 2); 2: as 1, with
                           // the even heads' at 6, far above the scores (it dominates their rows;
                           // not more: O's values must stay normal f16 numbers)
};

// The slope and sink arrays of a case, NaN around and (per batch entry)
// between the entries: a kernel that indexes them wrongly reads NaN.
struct Mods {
    std::vector<float> slopes, sinkv;
    int64_t bs = 0;  // alibi_batch_stride
    void make(const ModSpec &m, int B, int Hq, std::mt19937 &g) {
        const int guard = 8;
        std::uniform_real_distribution<float> U(0.5f, 1.5f);
        std::normal_distribution<float> N(0.f, 2.f);
        slopes.clear(); sinkv.clear(); bs = 0;
        if (m.alibi) {
            const int entries = m.alibi == 2 ? B : 1;
            bs = m.alibi == 2 ? Hq + 3 : 0;
            slopes.assign(2 * guard + (size_t)entries * (Hq + 3), NAN);
            for (int b = 0; b < entries; ++b)
                for (int h = 0; h < Hq; ++h)
                    slopes[guard + b * (Hq + 3) + h] =
                        m.slope_mul * exp2f(-8.f * (h + 1) / Hq) * (m.alibi == 2 ? U(g) : 1.f);
        }
        if (m.sink) {
            sinkv.assign(2 * guard + Hq, NAN);
            for (int h = 0; h < Hq; ++h) sinkv[guard + h] = m.sink == 2 && h % 2 == 0 ? 6.f : N(g);
        }
    }
    // Batch entry b's slopes (b = 0 for a problem of the whole batch).
    const float *alibi(int b = 0) const { return slopes.empty() ? nullptr : slopes.data() + 8 + b * bs; }
    const float *sinks() const { return sinkv.empty() ? nullptr : sinkv.data() + 8; }
    void set(FaFwdParams &p) const { p.alibi_slopes = alibi(); p.alibi_batch_stride = bs; p.sinks = sinks(); }
    // The f64 check of the whole batch (b < 0) or of batch entry b alone.
    void set(EmuProblem &e, int b = -1) const {
        e.alibi = alibi(b < 0 ? 0 : b);
        e.alibi_bs = b < 0 ? bs : 0;
        e.sinks = sinks();
    }
};
static std::string mod_name(const ModSpec &m) {
    std::string s;
    if (m.alibi) s += std::string(" alibi") + (m.alibi == 2 ? "[B,H]" : "[H]") + "x" + std::to_string(m.slope_mul).substr(0, 4);
    if (m.sink) s += m.sink == 2 ? " sink(dominant)" : " sink";
    return s;
}

struct Case {
    int B, Hq, Hk, Lq, Lk, D, wl, wr;
    float softcap;
    bool bhsd;        // Q and K in BHSD (V and O take the other layout)
    int pad;          // extra elements per row/head slot (each tensor adds its own on top)
    float amp;        // Q and K amplitude
    bool lse;
    float scale = 0;  // 0: 1/sqrt(D)
    bool top_left = false;  // mask aligned to the top-left corner instead of bottom-right
    ModSpec mod = {};
};

// Each tensor its own layout and strides (K != V, Q != O), all padded: a kernel
// that uses one tensor's strides for another reads or writes the wrong place.
struct Layout { int64_t bs, rs, hs; size_t n; };
static Layout layout_of(const Case &cs, int H, int L, int which) {
    const bool bhsd = which < 2 ? cs.bhsd : !cs.bhsd;        // Q, K | V, O
    const int64_t row = cs.D + cs.pad + 8 * which;
    const int64_t gap = 8 * (which + 1);
    Layout l;
    if (!bhsd) { l.hs = row; l.rs = H * row + gap; l.bs = (int64_t)L * l.rs + gap; }
    else { l.rs = row; l.hs = (int64_t)L * row + gap; l.bs = H * l.hs + gap; }
    l.n = (size_t)cs.B * l.bs + 8;
    return l;
}

// Runs every CTA of the launch: batch entries (last first when
// `last_first`, so a CTA that writes past its sequence's end is overwritten
// by nothing and shows), heads, row blocks. Shared memory starts as garbage
// (NaN-ish bit patterns) for every CTA and has a guard that must survive.
static bool decode_row(const Kern *k);
static void run_grid(const Kern *kn, const FaFwdParams &p, int B, int H, int Lq, bool last_first) {
    // `_decode` rows (GQA packing): a CTA per KV head, rows = queries x heads per KV head.
    if (decode_row(kn)) {
        H = p.heads_kv;
        Lq *= p.q_per_kv;
    }
    // The naive kernel's static arrays: q_s, p_s and scratch, with room to spare.
    smem_bytes = kn->kind == NAIVE ? 4096 : kn->smem;
    const int guard_bytes = 1024;
    std::vector<unsigned char> smem_buf(smem_bytes + guard_bytes + 128);
    emu_smem = smem_buf.data() + (128 - (uintptr_t)smem_buf.data() % 128) % 128;
    kernel_fn = kn->fn;
    kernel_params = p;
    for (int i = 0; i < B; ++i)
        for (int h = 0; h < H; ++h)
            // Split-KV: row block * num_splits + split in x (params.h).
            for (int mb = 0; mb < (Lq + kn->bm - 1) / kn->bm * (p.num_splits > 1 ? p.num_splits : 1); ++mb) {
                memset(emu_smem, 0xff, smem_bytes);
                memset(emu_smem + smem_bytes, 0xab, guard_bytes);
                blockIdx = make_uint3(mb, h, last_first ? B - 1 - i : i);
                run_cta(kn->threads);
                for (int g = 0; g < guard_bytes; ++g)
                    if (emu_smem[smem_bytes + g] != 0xab) { FAIL("shared memory written past smem bytes"); break; }
            }
    emu_smem = nullptr;
}

// Which checks failed, named so that the negative control can say what caught a bug.
static std::string failed_checks(const EmuCheck &c, bool bf16, bool lse, long stray) {
    std::string why;
    auto fail = [&](const char *w) { why += why.empty() ? w : std::string(",") + w; };
    if (!c.ok) fail("non-finite-or-empty-row");
    if (!(c.rel() <= emu_o_tol(bf16))) fail("O-rel-L2");
    if (!(c.row_rel <= emu_row_tol(bf16))) fail("O-row");
    if (lse && !(c.lse_rel <= kEmuLseTol)) fail("LSE");
    if (stray) fail("stray-writes");
    if (errors) fail("emu-error");
    return why;
}

// One sequence's check folded into its batch's: norms add, the worst rows stay.
static void fold(EmuCheck &all, const EmuCheck &c) {
    all.ok = all.ok && c.ok;
    all.err2 += c.err2;
    all.ref2 += c.ref2;
    all.row_rel = std::max(all.row_rel, c.row_rel);
    all.lse_rel = std::max(all.lse_rel, c.lse_rel);
}

static bool run_case_on(const Kern *kn, const Case &cs, bool bf16, unsigned seed, bool verbose) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const Layout lq = layout_of(cs, cs.Hq, cs.Lq, 0), lk = layout_of(cs, cs.Hk, cs.Lk, 1),
                 lv = layout_of(cs, cs.Hk, cs.Lk, 2), lo = layout_of(cs, cs.Hq, cs.Lq, 3);
    // Inputs: NaN (0xffff in both dtypes) outside the view, so that reading
    // padding or a guard shows in O; a guard before each tensor too.
    const int in_guard = 64;
    auto fill = [&](std::vector<uint16_t> &buf, const Layout &l, int H, int L, float amp) {
        buf.assign(l.n + 2 * in_guard, 0xffff);
        uint16_t *t = buf.data() + in_guard;
        for (int b = 0; b < cs.B; ++b)
            for (int i = 0; i < L; ++i)
                for (int h = 0; h < H; ++h)
                    for (int d = 0; d < cs.D; ++d) t[b * l.bs + i * l.rs + h * l.hs + d] = f2h(U(g) * amp, bf16);
        return t;
    };
    std::vector<uint16_t> qbuf, kbuf, vbuf;
    const uint16_t *q = fill(qbuf, lq, cs.Hq, cs.Lq, cs.amp), *k = fill(kbuf, lk, cs.Hk, cs.Lk, cs.amp),
                   *v = fill(vbuf, lv, cs.Hk, cs.Lk, 1.f);
    // LSE's guard covers a whole row block written past seqlen_q.
    const int guard = 256;
    std::vector<uint16_t> o(lo.n + 2 * guard, 0xffff);
    uint16_t *O = o.data() + guard;
    // LSE strided too: [B, Hq, Lq] or, with bhsd, [Hq, B, Lq], rows padded.
    const int64_t lse_row = cs.Lq + 8;
    const int64_t lseh = cs.bhsd ? cs.B * lse_row + 16 : lse_row, lseb = cs.bhsd ? lse_row : cs.Hq * lse_row + 16;
    std::vector<float> lse((size_t)(cs.bhsd ? cs.Hq * lseh : cs.B * lseb) + 2 * guard, NAN);
    float *LSE = lse.data() + guard;

    readable.clear();
    for (auto *buf : {&qbuf, &kbuf, &vbuf})
        readable.push_back({(const unsigned char *)buf->data(), (const unsigned char *)(buf->data() + buf->size())});
    writable = {(const unsigned char *)o.data(), (const unsigned char *)(o.data() + o.size())};

    FaFwdParams p{};
    p.q = q; p.k = k; p.v = v; p.o = O; p.lse = cs.lse ? LSE : nullptr;
    p.q_batch_stride = lq.bs; p.q_row_stride = lq.rs; p.q_head_stride = lq.hs;
    p.k_batch_stride = lk.bs; p.k_row_stride = lk.rs; p.k_head_stride = lk.hs;
    p.v_batch_stride = lv.bs; p.v_row_stride = lv.rs; p.v_head_stride = lv.hs;
    p.o_batch_stride = lo.bs; p.o_row_stride = lo.rs; p.o_head_stride = lo.hs;
    p.batch = cs.B; p.heads_q = cs.Hq; p.heads_kv = cs.Hk; p.q_per_kv = cs.Hq / cs.Hk;
    p.seqlen_q = cs.Lq; p.seqlen_k = cs.Lk; p.head_dim = cs.D;
    p.diag_offset = cs.top_left ? 0 : cs.Lk - cs.Lq;  // bottom-right unless the case says top-left
    p.lse_batch_stride = lseb; p.lse_head_stride = lseh;
    p.window_left = cs.wl; p.window_right = cs.wr;
    p.scale = cs.scale != 0 ? cs.scale : 1.f / sqrtf((float)cs.D); p.softcap = cs.softcap;
    Mods mods;
    mods.make(cs.mod, cs.B, cs.Hq, g);
    mods.set(p);

    run_grid(kn, p, cs.B, cs.Hq, cs.Lq, false);

    EmuProblem ep{cs.B, cs.Hq, cs.Hk, cs.Lq, cs.Lk, cs.D, cs.wl, cs.wr, (double)p.scale, (double)cs.softcap, bf16, cs.lse,
                  q, k, v, O, LSE, lq.bs, lq.rs, lq.hs, lk.bs, lk.rs, lk.hs, lv.bs, lv.rs, lv.hs, lo.bs, lo.rs, lo.hs};
    ep.top_left = cs.top_left;
    ep.lseb = lseb; ep.lseh = lseh;
    mods.set(ep);
    const EmuCheck chk = emu_check_against_reference(ep, verbose);
    const double rel = chk.rel();
    // Outside the view and LSE's guards everything keeps its poison.
    const long stray = emu_count_stray(ep, o.data(), o.size(), lse, guard);
    const std::string why = failed_checks(chk, bf16, cs.lse, stray);
    const bool ok = why.empty();
    printf("%s %-28s B%d Hq%2d Hk%d Lq%4d Lk%4d D%3d w(%d,%d)%s%s scale %.3g cap %.3g %s pad%d amp%.0f lse%d: "
           "rel %.2e row %.2e lse %.2e stray %ld\n",
           ok ? "ok  " : ("FAIL[" + why + "]").c_str(), kn->name, cs.B, cs.Hq, cs.Hk, cs.Lq, cs.Lk, cs.D, cs.wl, cs.wr,
           cs.top_left ? " top-left" : "", mod_name(cs.mod).c_str(), p.scale, cs.softcap, cs.bhsd ? "BHSD" : "BSHD", cs.pad, cs.amp, cs.lse,
           rel, chk.row_rel, chk.lse_rel, stray);
    return ok;
}

// A packed (varlen) batch: sequences of their own lengths laid end to end in
// [T, H, D] tensors (each with its own padded strides, BSHD or BHSD), LSE
// [Hq, Tq] with padded rows. CTAs run last sequence first, so a CTA that
// writes past its sequence's end is overwritten by nothing and shows.
struct VarCase {
    std::vector<int> lq, lk, used;  // used: seqused_k, empty for none
    int Hq, Hk, D, wl, wr;
    float softcap, scale;
    bool bhsd, top_left;
    int pad;
    ModSpec mod = {};
};

static bool run_varlen_on(const Kern *kn, const VarCase &vc, bool bf16, unsigned seed) {
    const int n = (int)vc.lq.size();
    std::vector<int> cu_q(n + 1, 0), cu_k(n + 1, 0);
    for (int b = 0; b < n; ++b) { cu_q[b + 1] = cu_q[b] + vc.lq[b]; cu_k[b + 1] = cu_k[b] + vc.lk[b]; }
    const int tq = cu_q[n], tk = cu_k[n];
    int max_q = 0, max_k = 0;
    for (int b = 0; b < n; ++b) {
        max_q = std::max(max_q, vc.lq[b]);
        max_k = std::max(max_k, vc.used.empty() ? vc.lk[b] : vc.used[b]);
    }
    // The packed tensors are one sequence of all tokens.
    Case cs{1, vc.Hq, vc.Hk, tq, tk, vc.D, vc.wl, vc.wr, vc.softcap, vc.bhsd, vc.pad, 1.f, true, vc.scale, vc.top_left};
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const Layout lq = layout_of(cs, vc.Hq, tq, 0), lk = layout_of(cs, vc.Hk, tk, 1), lv = layout_of(cs, vc.Hk, tk, 2),
                 lo = layout_of(cs, vc.Hq, tq, 3);
    const int in_guard = 64;
    auto fill = [&](std::vector<uint16_t> &buf, const Layout &l, int H, int L) {
        buf.assign(l.n + 2 * in_guard, 0xffff);
        uint16_t *t = buf.data() + in_guard;
        for (int i = 0; i < L; ++i)
            for (int h = 0; h < H; ++h)
                for (int d = 0; d < vc.D; ++d) t[i * l.rs + h * l.hs + d] = f2h(U(g), bf16);
        return t;
    };
    std::vector<uint16_t> qbuf, kbuf, vbuf;
    const uint16_t *q = fill(qbuf, lq, vc.Hq, tq), *k = fill(kbuf, lk, vc.Hk, tk), *v = fill(vbuf, lv, vc.Hk, tk);
    const int guard = 256;
    std::vector<uint16_t> o(lo.n + 2 * guard, 0xffff);
    uint16_t *O = o.data() + guard;
    const int64_t lse_row = tq + 8;  // LSE [Hq, Tq], rows padded
    std::vector<float> lse((size_t)vc.Hq * lse_row + 2 * guard, NAN);
    float *LSE = lse.data() + guard;
    readable.clear();
    for (auto *buf : {&qbuf, &kbuf, &vbuf})
        readable.push_back({(const unsigned char *)buf->data(), (const unsigned char *)(buf->data() + buf->size())});
    writable = {(const unsigned char *)o.data(), (const unsigned char *)(o.data() + o.size())};

    FaFwdParams p{};
    p.q = q; p.k = k; p.v = v; p.o = O; p.lse = LSE;
    p.q_row_stride = lq.rs; p.q_head_stride = lq.hs;  // batch strides 0: one sequence of all tokens
    p.k_row_stride = lk.rs; p.k_head_stride = lk.hs;
    p.v_row_stride = lv.rs; p.v_head_stride = lv.hs;
    p.o_row_stride = lo.rs; p.o_head_stride = lo.hs;
    p.lse_head_stride = lse_row;
    p.batch = n; p.heads_q = vc.Hq; p.heads_kv = vc.Hk; p.q_per_kv = vc.Hq / vc.Hk;
    p.seqlen_q = max_q; p.seqlen_k = max_k; p.head_dim = vc.D;
    // What the host passes (the longest lengths' diagonal); each sequence must use its own.
    p.diag_offset = vc.top_left ? 0 : max_k - max_q;
    p.window_left = vc.wl; p.window_right = vc.wr;
    p.scale = vc.scale != 0 ? vc.scale : 1.f / sqrtf((float)vc.D); p.softcap = vc.softcap;
    p.cu_seqlens_q = cu_q.data(); p.cu_seqlens_k = cu_k.data();
    p.seqused_k = vc.used.empty() ? nullptr : vc.used.data();
    p.top_left = vc.top_left;
    Mods mods;
    mods.make(vc.mod, n, vc.Hq, g);
    mods.set(p);

    run_grid(kn, p, n, vc.Hq, max_q, true);

    // Each sequence against the reference as a rectangular problem of its own.
    EmuCheck all;
    for (int b = 0; b < n; ++b) {
        const int q0 = cu_q[b], k0 = cu_k[b];
        const int lkb = vc.used.empty() ? vc.lk[b] : vc.used[b];
        EmuProblem ep{1, vc.Hq, vc.Hk, vc.lq[b], lkb, vc.D, vc.wl, vc.wr, (double)p.scale, (double)vc.softcap, bf16, true,
                      q + q0 * lq.rs, k + k0 * lk.rs, v + k0 * lv.rs, O + q0 * lo.rs, LSE + q0,
                      0, lq.rs, lq.hs, 0, lk.rs, lk.hs, 0, lv.rs, lv.hs, 0, lo.rs, lo.hs};
        ep.top_left = vc.top_left;
        ep.lseb = 1; ep.lseh = lse_row;  // batch 1: the batch stride is never stepped
        mods.set(ep, b);
        fold(all, emu_check_against_reference(ep, true));
    }
    EmuProblem whole{1, vc.Hq, vc.Hk, tq, tk, vc.D, -1, -1, 1.0, 0.0, bf16, true, q, k, v, O, LSE,
                     0, lq.rs, lq.hs, 0, lk.rs, lk.hs, 0, lv.rs, lv.hs, 0, lo.rs, lo.hs};
    whole.lseb = 1; whole.lseh = lse_row;
    const long stray = emu_count_stray(whole, o.data(), o.size(), lse, guard);
    const double rel = all.rel(), row_rel = all.row_rel, lse_rel = all.lse_rel;
    const std::string why = failed_checks(all, bf16, true, stray);
    std::string lens;
    for (int b = 0; b < n; ++b)
        lens += std::to_string(vc.lq[b]) + ":" + std::to_string(vc.lk[b]) +
                (vc.used.empty() ? "" : "/" + std::to_string(vc.used[b])) + " ";
    printf("%s %-28s varlen [%s] Hq%d Hk%d D%d w(%d,%d)%s%s cap %.3g %s: rel %.2e row %.2e lse %.2e stray %ld\n",
           why.empty() ? "ok  " : ("FAIL[" + why + "]").c_str(), kn->name, lens.c_str(), vc.Hq, vc.Hk, vc.D, vc.wl,
           vc.wr, vc.top_left ? " top-left" : "", mod_name(vc.mod).c_str(), vc.softcap, vc.bhsd ? "BHSD" : "BSHD", rel, row_rel, lse_rel, stray);
    return why.empty();
}

// A KV cache: Q [B, Lq, Hq, D]; K/V dense [B_c, L_max, Hk, D] read through
// cache_batch_idx (a permutation with a spare row), or pages [n, page, Hk, D]
// through a shuffled block table whose unused entries are -1. Cache slots no
// sequence uses hold NaN, so reading one shows in O.
struct CacheCase {
    std::vector<int> lens;  // cache_seqlens
    int Lq, Hq, Hk, D, wl, wr;
    int page;               // 0: dense
    bool top_left;
    int splits = 0;         // > 1: split-KV into an f32 workspace, then the combine (merge.cuh)
    ModSpec mod = {};
};

static bool run_cache_on(const Kern *kn, const CacheCase &cc, bool bf16, unsigned seed) {
    const int B = (int)cc.lens.size();
    int l_max = 1;
    for (int l : cc.lens) l_max = std::max(l_max, l);
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    // Q and O with their own padded layouts (as the rectangular cases).
    Case cs{B, cc.Hq, cc.Hk, cc.Lq, l_max, cc.D, cc.wl, cc.wr, 0.f, false, 8, 1.f, true, 0.f, cc.top_left};
    const Layout lq = layout_of(cs, cc.Hq, cc.Lq, 0), lo = layout_of(cs, cc.Hq, cc.Lq, 3);
    std::vector<uint16_t> qbuf(lq.n + 128, 0xffff);
    uint16_t *q = qbuf.data() + 64;
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < cc.Lq; ++i)
            for (int h = 0; h < cc.Hq; ++h)
                for (int d = 0; d < cc.D; ++d) q[b * lq.bs + i * lq.rs + h * lq.hs + d] = f2h(U(g), bf16);
    // The caches: entries of `rows` rows, row stride Hk*D + 8 (K) / + 16 (V).
    const bool paged = cc.page > 0;
    const int rows = paged ? cc.page : l_max;
    int per_seq = 0, entries;
    std::vector<int> table, idx;
    if (paged) {
        per_seq = (l_max + cc.page - 1) / cc.page + 1;  // a spare -1 entry ends every row
        entries = B * per_seq + 2;
        std::vector<int> ids(entries);
        for (int i = 0; i < entries; ++i) ids[i] = i;
        std::shuffle(ids.begin(), ids.end(), g);
        table.assign(B * per_seq, -1);
        for (int b = 0; b < B; ++b)
            for (int j = 0; j < (cc.lens[b] + cc.page - 1) / cc.page; ++j) table[b * per_seq + j] = ids[b * per_seq + j];
    } else {
        entries = B + 1;
        idx.resize(B);
        for (int b = 0; b < B; ++b) idx[b] = (b + 1) % entries;  // every sequence in another row; row 0 unused if B < entries
    }
    const int64_t krs = cc.Hk * cc.D + 8, vrs = cc.Hk * cc.D + 16;
    std::vector<uint16_t> kc((size_t)entries * rows * krs + 64, 0xffff), vc((size_t)entries * rows * vrs + 64, 0xffff);
    // Sequence-major dense copies for the reference, and the cache filled through the tables.
    std::vector<std::vector<uint16_t>> kd(B), vd(B);
    for (int b = 0; b < B; ++b) {
        kd[b].resize((size_t)cc.lens[b] * cc.Hk * cc.D);
        vd[b].resize(kd[b].size());
        for (int j = 0; j < cc.lens[b]; ++j) {
            const int64_t ke = paged ? (int64_t)table[b * per_seq + j / cc.page] * rows + j % cc.page : (int64_t)idx[b] * rows + j;
            for (int h = 0; h < cc.Hk; ++h)
                for (int d = 0; d < cc.D; ++d) {
                    const uint16_t kx = f2h(U(g), bf16), vx = f2h(U(g), bf16);
                    kc[ke * krs + h * cc.D + d] = kx;
                    vc[ke * vrs + h * cc.D + d] = vx;
                    kd[b][((size_t)j * cc.Hk + h) * cc.D + d] = kx;
                    vd[b][((size_t)j * cc.Hk + h) * cc.D + d] = vx;
                }
        }
    }
    const int guard = 256;
    std::vector<uint16_t> o(lo.n + 2 * guard, 0xffff);
    uint16_t *O = o.data() + guard;
    const int64_t lse_row = cc.Lq + 8, lseb = cc.Hq * lse_row + 16;
    std::vector<float> lse((size_t)B * lseb + 2 * guard, NAN);
    float *LSE = lse.data() + guard;
    readable.clear();
    for (auto *buf : {&qbuf, &kc, &vc})
        readable.push_back({(const unsigned char *)buf->data(), (const unsigned char *)(buf->data() + buf->size())});
    writable = {(const unsigned char *)o.data(), (const unsigned char *)(o.data() + o.size())};

    FaFwdParams p{};
    p.q = q; p.k = kc.data(); p.v = vc.data(); p.o = O; p.lse = LSE;
    p.q_batch_stride = lq.bs; p.q_row_stride = lq.rs; p.q_head_stride = lq.hs;
    p.k_batch_stride = rows * krs; p.k_row_stride = krs; p.k_head_stride = cc.D;
    p.v_batch_stride = rows * vrs; p.v_row_stride = vrs; p.v_head_stride = cc.D;
    p.o_batch_stride = lo.bs; p.o_row_stride = lo.rs; p.o_head_stride = lo.hs;
    p.lse_batch_stride = lseb; p.lse_head_stride = lse_row;
    p.batch = B; p.heads_q = cc.Hq; p.heads_kv = cc.Hk; p.q_per_kv = cc.Hq / cc.Hk;
    p.seqlen_q = cc.Lq; p.seqlen_k = l_max; p.head_dim = cc.D;
    p.diag_offset = cc.top_left ? 0 : l_max - cc.Lq;  // the host's: each sequence must use its own
    p.window_left = cc.wl; p.window_right = cc.wr;
    p.scale = 1.f / sqrtf((float)cc.D);
    p.seqused_k = cc.lens.data();
    p.top_left = cc.top_left;
    if (paged) { p.block_table = table.data(); p.block_table_stride = per_seq; p.page_size = cc.page; }
    else p.cache_batch_idx = idx.data();
    table_lo = table.data();
    table_hi = table.data() + table.size();
    Mods mods;
    mods.make(cc.mod, B, cc.Hq, g);
    mods.set(p);

    // Split-KV: the kernel writes only the workspace (poisoned; O must keep
    // its poison until the combine), then the combine kernel's row function
    // writes O and LSE from it.
    const int64_t part_o = (int64_t)B * cc.Lq * cc.Hq * cc.D, part_l = (int64_t)B * cc.Hq * cc.Lq;
    std::vector<float> o_acc, l_acc;
    p.num_splits = cc.splits;  // 0 and 1: no split
    if (cc.splits > 1) {
        o_acc.assign((size_t)cc.splits * part_o, NAN);
        l_acc.assign((size_t)cc.splits * part_l, NAN);
        p.num_splits = cc.splits;
        p.o_accum = o_acc.data();
        p.lse_accum = l_acc.data();
        writable = {(const unsigned char *)o_acc.data(), (const unsigned char *)(o_acc.data() + o_acc.size())};
    }
    run_grid(kn, p, B, cc.Hq, cc.Lq, true);
    if (cc.splits > 1) {
        for (size_t x = 0; x < l_acc.size(); ++x)
            if (std::isnan(l_acc[x])) {
                FAIL("split-KV: workspace LSE %zu not written", x);
                break;
            }
        FaMergeParams m{};
        m.part[0] = FaMergePart{o_acc.data(), l_acc.data(), (int64_t)cc.Lq * cc.Hq * cc.D, (int64_t)cc.Hq * cc.D, cc.D,
                                (int64_t)cc.Hq * cc.Lq, cc.Lq};
        m.strided = 1;
        m.o_part_stride = part_o;
        m.lse_part_stride = part_l;
        m.o = O; m.lse = LSE;
        m.o_batch_stride = lo.bs; m.o_row_stride = lo.rs; m.o_head_stride = lo.hs;
        m.lse_batch_stride = lseb; m.lse_head_stride = lse_row;
        m.parts = cc.splits; m.batch = B; m.seqlen = cc.Lq; m.heads = cc.Hq; m.head_dim = cc.D;
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < cc.Lq; ++i)
                for (int h = 0; h < cc.Hq; ++h)
                    for (int lane = 0; lane < 32; ++lane) {
                        if (bf16) fa_merge_row<fa_bf16, float>(m, b, i, h, lane);
                        else fa_merge_row<fa_f16, float>(m, b, i, h, lane);
                    }
    }
    EmuCheck all;
    for (int b = 0; b < B; ++b) {
        const int64_t kr = cc.Hk * cc.D;
        EmuProblem ep{1, cc.Hq, cc.Hk, cc.Lq, cc.lens[b], cc.D, cc.wl, cc.wr, (double)p.scale, 0.0, bf16, true,
                      q + b * lq.bs, kd[b].data(), vd[b].data(), O + b * lo.bs, LSE + b * lseb,
                      0, lq.rs, lq.hs, 0, kr, cc.D, 0, kr, cc.D, 0, lo.rs, lo.hs};
        ep.top_left = cc.top_left;
        ep.lseb = lseb; ep.lseh = lse_row;
        mods.set(ep, b);
        fold(all, emu_check_against_reference(ep, true));
    }
    EmuProblem whole{B, cc.Hq, cc.Hk, cc.Lq, 0, cc.D, -1, -1, 1.0, 0.0, bf16, true, q, nullptr, nullptr, O, LSE,
                     lq.bs, lq.rs, lq.hs, 0, 0, 0, 0, 0, 0, lo.bs, lo.rs, lo.hs};
    whole.lseb = lseb; whole.lseh = lse_row;
    const long stray = emu_count_stray(whole, o.data(), o.size(), lse, guard);
    const double rel = all.rel(), row_rel = all.row_rel, lse_rel = all.lse_rel;
    const std::string why = failed_checks(all, bf16, true, stray);
    std::string lens;
    for (int l : cc.lens) lens += std::to_string(l) + " ";
    printf("%s %-28s cache %s%s [%s] Lq%d Hq%d Hk%d D%d w(%d,%d)%s%s: rel %.2e row %.2e lse %.2e stray %ld\n",
           why.empty() ? "ok  " : ("FAIL[" + why + "]").c_str(), kn->name,
           paged ? ("paged" + std::to_string(cc.page)).c_str() : "dense",
           cc.splits > 1 ? (" split" + std::to_string(cc.splits)).c_str() : "", lens.c_str(), cc.Lq, cc.Hq, cc.Hk, cc.D,
           cc.wl, cc.wr, cc.top_left ? " top-left" : "", mod_name(cc.mod).c_str(), rel, row_rel, lse_rel, stray);
    return why.empty();
}

// The sm80 `_paged` rows are what the dispatcher gives paged caches, and
// only those: rectangular and packed cases skip them, paged cases run only
// them (and the naive kernel).
static bool paged_row(const Kern *k) {
    const size_t n = strlen(k->name);
    return n > 6 && strcmp(k->name + n - 6, "_paged") == 0;
}
// The `_decode` rows: GQA packing, dense and paged caches; they get the cache
// cases (and nothing else, as from the dispatcher).
static bool decode_row(const Kern *k) {
    const size_t n = strlen(k->name);
    return n > 7 && strcmp(k->name + n - 7, "_decode") == 0;
}

static int bucket_of(int D) {
    const int b[] = {32, 64, 96, 128, 160, 192, 224, 256};
    for (int x : b) if (D <= x) return x;
    return -1;
}

// Every kernel of the case's bucket and dtype: the default and its variants
// (the naive kernel serves every head dim).
static int fails = 0;
static void run_case(const Case &cs, bool bf16, unsigned seed, bool verbose) {
    const int hd = bucket_of(cs.D);
    bool ok = true;
    int ran = 0;
    for (const Kern *k : kerns)
        if ((k->kind == NAIVE || k->hd == hd) && k->bf16 == bf16 && !paged_row(k) && !decode_row(k)) {
            ok = run_case_on(k, cs, bf16, seed, verbose) && ok;
            ++ran;
        }
    fails += !ok;
}

static const Kern *first_kernel(int hd, bool bf16) {
    for (const Kern *k : kerns)
        if ((k->kind == NAIVE || k->hd == hd) && k->bf16 == bf16) return k;
    return nullptr;
}

static void run_varlen(const VarCase &vc, bool bf16, unsigned seed) {
    const int hd = bucket_of(vc.D);
    bool ok = true;
    for (const Kern *k : kerns)
        if ((k->kind == NAIVE || k->hd == hd) && k->bf16 == bf16 && !paged_row(k) && !decode_row(k))
            ok = run_varlen_on(k, vc, bf16, seed) && ok;
    fails += !ok;
}

static void run_cache(const CacheCase &cc, bool bf16, unsigned seed) {
    const int hd = bucket_of(cc.D);
    bool ok = true;
    for (const Kern *k : kerns)
        if ((k->kind == NAIVE || k->hd == hd) && k->bf16 == bf16 &&
            (k->kind == NAIVE || decode_row(k) || paged_row(k) == (cc.page > 0)) &&
            !(cc.splits > 1 && k->kind == NAIVE))  // split-KV: the sm80 kernels only
            ok = run_cache_on(k, cc, bf16, seed) && ok;
    fails += !ok;
}

// KV caches, dense and paged: pages of 1, 3 and 16 rows (the sm80 kernels'
// per-row gather), block_n and 2 block_n (one page lookup per tile), and 24
// (a multiple of neither: the gather, pages straddling tiles). Lengths 0, 1,
// one short of a tile and past it; queries fewer and more than the keys.
static void cache_cases(int D, bool bf, unsigned &seed, bool naive) {
    const Kern *k = first_kernel(bucket_of(D), bf);
    if (!k) return;
    const int BN = naive ? 64 : k->bn;
    for (int page : std::vector<int>{0, 1, 3, 16, 24, BN, 2 * BN}) {
        const CacheCase cases[] = {
            {{2 * BN - 1, 0, 5, BN + 1}, 4, 8, 2, D, -1, 0, page, false},
            {{70, 1, 33}, 40, 6, 3, D, 9, 2, page, true},
        };
        for (const CacheCase &cc : cases) run_cache(cc, bf, seed++);
    }
    // Split-KV decode steps: 1 and 3 queries over several key tiles, 2, 3
    // and 7 splits (more splits than some sequences have tiles: empty
    // shares), lengths 0, 1 and one short of a tile, dense and paged.
    if (!naive)
        for (int page : std::vector<int>{0, 16, BN}) {
            const CacheCase cases[] = {
                {{4 * BN - 1, 0, 1, 2 * BN + 3}, 1, 8, 2, D, -1, 0, page, false, 3},
                {{5 * BN + 7, 40, BN - 1}, 3, 12, 3, D, -1, 0, page, false, 7},
                {{3 * BN, 2 * BN + 9}, 2, 4, 1, D, BN + 5, 0, page, true, 2},
            };
            for (const CacheCase &cc : cases) run_cache(cc, bf, seed++);
        }
    // GQA-packed tiles (the `_decode` rows): 43 queries x 3 heads = 129 rows,
    // so one query's heads straddle two row blocks; 33 x 4 with a window.
    // Pages of 3 and 24 rows: shorter than a loader pass, and longer but
    // not dividing a tile (the gather's two ways of stepping its page), at
    // the three pass heights (16 rows at hd64, 8 at hd128, 4 at hd256;
    // every bucket would cost CI about a minute).
    const bool pass_heights = D == 64 || D == 128 || D == 256;
    if (!naive)
        for (int page : pass_heights ? std::vector<int>{0, 3, 16, 24} : std::vector<int>{0, 16}) {
            const CacheCase cases[] = {
                {{300, 17, 1}, 43, 9, 3, D, -1, 0, page, false},
                {{200, 130}, 33, 16, 4, D, 20, 3, page, false, 3},
            };
            for (const CacheCase &cc : cases) run_cache(cc, bf, seed++);
        }
}

// Packed batches: empty sequences, one-token ones, lengths one short of a
// tile and crossing tiles, Lq > Lk and Lq < Lk in one batch (each sequence
// its own diagonal), seqused_k below the stored keys, GQA 4:1 with 3 KV heads.
static void varlen_cases(int D, bool bf, unsigned &seed, bool naive) {
    const Kern *k = first_kernel(bucket_of(D), bf);
    if (!k) return;
    const int BM = naive ? 16 : k->bm, BN = naive ? 64 : k->bn;
    const VarCase cases[] = {
        {{BM - 1, 0, 1, BM + 3}, {2 * BN - 1, 5, 0, BN + 1}, {}, 12, 3, D, -1, 0, 0.f, 0.3f, false, false, 8},
        {{7, BM + 1, 0, 3}, {BN + 2, 10, 4, 2 * BN}, {BN, 9, 0, 17}, 4, 1, D, -1, -1, 0.f, 0.f, true, false, 0},
        {{20, 1, 33}, {9, 40, 70}, {}, 2, 2, D, 6, 3, 7.f, -0.7f, false, true, 16},
    };
    for (const VarCase &vc : cases) run_varlen(vc, bf, seed++);
}


// Per bucket and dtype: the shapes where tile arithmetic goes wrong (Lq one
// short of block_m, Lk one short of a multiple of block_n), GQA 4:1 with several KV
// heads (8:2, 12:3), custom and negative scales, scores in the
// hundreds and thousands, and softcaps from 1e-30 to f32's largest.
static void bucket_cases(int hd, bool bf, unsigned &seed, bool verbose, bool naive) {
    const Kern *k = first_kernel(hd, bf);
    if (!k) return;
    const int BM = naive ? 128 : k->bm, BN = naive ? 64 : k->bn;
    const int lk_edge = BN * ((200 + BN - 1) / BN) - 1;   // ≡ -1 mod block_n, several tiles
    const int d_in = hd == 32 ? 24 : hd - 8;             // a head dim inside the bucket
    const int lq = naive ? 37 : BM - 1;                  // the naive kernel runs a CTA per row
    Case cases[] = {
        {2, 8, 2, lq, lk_edge, hd, -1, -1, 0.f, false, 8, 1.f, true, 0.3f},     // GQA 4:1 x2, tile edges, full
        {1, 12, 3, lq, lk_edge + 40, d_in, 40, 7, 0.f, true, 0, 1.f, true, -0.7f},  // GQA 4:1 x3, window, negative scale
        {1, 4, 1, 70, 3 * BN - 1, hd, -1, 0, 0.f, false, 8, 30.f, true, 1.7f},   // scores in the thousands, causal
        {1, 2, 2, 60, 2 * BN + 5, hd, -1, -1, 0.f, true, 0, 40.f, true},         // scores in the hundreds
        {1, 3, 1, 50, 90, hd, -1, 0, 20.f, false, 0, 3.f, true, 1.7f},           // softcap with a custom scale
        {1, 2, 1, 40, 90, hd, -1, 0, 2000.f, true, 0, 30.f, true, 1.7f},         // softcap near scores in the thousands
        {1, 2, 1, 33, 77, hd, -1, -1, 1e6f, false, 8, 2.f, true},                // softcaps far above the scores
        {1, 2, 1, 33, 77, hd, -1, -1, 1e38f, false, 0, 2.f, true},
        {1, 2, 1, 33, 77, hd, -1, -1, 3.4028235e38f, true, 0, 2.f, true},
        {1, 2, 1, 33, 77, hd, -1, -1, 1e-30f, false, 0, 2.f, true},              // tiny softcap: every score ~ +-c
    };
    for (auto &c : cases) run_case(c, bf, seed++, verbose);
}

// ALiBi and attention sinks (DESIGN.md 1b) on every row family: rectangular
// (dense rows, _99k rows, variants), packed, dense and paged caches (per-tile
// pages and the gather), the _decode rows, split-KV with 1, 3 and 11 splits
// (empty shares). Slopes per head (ALiBi's 2^(-8h/H)) and per batch entry,
// also 4x and 16x larger; sinks from N(0, 2) and ones that dominate their
// rows; rows and whole row blocks that see no key (O = 0, LSE = sink).
static void mod_cases(bool naive, unsigned &seed, bool neg) {
    const ModSpec head_sink{1, 1.f, 1}, batch{2, 4.f, 0}, head_dominant{1, 1.f, 2}, batch_sink{2, 1.f, 1},
        sink_only{0, 1.f, 1}, large{1, 16.f, 0};
    std::vector<int> dims = {32, 64, 128, 224};
    if (naive || neg) dims = {64};
    for (int bf = 0; bf < 2; ++bf)
        for (int hd : dims) {
            const Kern *k = first_kernel(hd, bf);
            if (!k || (bf && hd != 64 && hd != 128)) continue;
            const int BM = naive ? 16 : k->bm, BN = naive ? 64 : k->bn;
            const int lq = naive ? 9 : BM - 1;
            Case cs[] = {
                // GQA 4:1 with 2 KV heads, tile edges, full mask (unmasked tiles), custom scale
                {1, 8, 2, lq, 2 * BN - 1, hd, -1, -1, 0.f, false, 8, 1.f, true, 0.3f, false, head_sink},
                // softcap then ALiBi (per batch entry, larger slopes), causal, Lq < Lk
                {2, 4, 1, naive ? 20 : 50, 2 * BN + 5, hd - 8, -1, 0, 20.f, true, 0, 3.f, true, 1.7f, false, batch},
                // causal window, Lq < Lk, a sink that dominates
                {1, 2, 1, naive ? 30 : 100, 150, hd, 20, 0, 0.f, false, 8, 1.f, true, 0.f, false, head_dominant},
                // causal Lq > Lk: empty rows, and a first row block that sees no key at all
                {1, 2, 1, naive ? 40 : BM + 40, 30, hd, -1, 0, 0.f, true, 0, 1.f, true, 0.f, false, batch_sink},
                // top-left window, Lq > Lk; steep slopes (no sink: a row whose keys all lie
                // far off would have O below f16's range, whatever the kernel)
                {2, 4, 2, naive ? 25 : 90, 60, hd, 10, 3, 0.f, false, 0, 1.f, true, 0.f, true, large},
                // no keys at all: every row's LSE is its sink
                {1, 2, 1, 40, 0, hd, -1, -1, 0.f, false, 0, 1.f, true, 0.f, false, sink_only},
            };
            for (auto &c : cs)
                if (!neg || &c - cs < 4) run_case(c, bf, seed++, true);
        }
    // Packed batches and caches (bucket 64 both dtypes, 128 f16; 32: its
    // _paged row only).
    for (int bf = 0; bf < 2; ++bf)
        for (int D : naive || neg ? std::vector<int>{64} : std::vector<int>{32, 64, 128}) {
            const Kern *k = first_kernel(bucket_of(D), bf);
            if (!k || (bf && D != 64)) continue;
            const int BM = naive ? 16 : k->bm, BN = naive ? 64 : k->bn;
            if (D != 32) {
                VarCase vcs[] = {
                    {{BM - 1, 0, 1, BM + 3}, {2 * BN - 1, 5, 0, BN + 1}, {}, 12, 3, D, -1, 0, 0.f, 0.3f, false, false, 8,
                     batch_sink},
                    {{20, 1, 33}, {9, 40, 70}, {}, 4, 2, D, 6, 3, 7.f, -0.7f, false, true, 16, head_dominant},
                };
                for (auto &vc : vcs) run_varlen(vc, bf, seed++);
            }
            for (int page : D == 32 ? std::vector<int>{16, BN} : std::vector<int>{0, 16, BN}) {
                CacheCase ccs[] = {
                    {{2 * BN - 1, 0, 5, BN + 1}, 4, 8, 2, D, -1, 0, page, false, 1, batch_sink},
                    // 3 query heads per KV head: a _decode tile's rows 8 apart have other heads
                    {{70, 1, 33}, 40, 9, 3, D, 9, 2, page, true, 0, head_dominant},
                };
                for (auto &cc : ccs) run_cache(cc, bf, seed++);
                if (naive) continue;
                // Split-KV: the sink in the first share only; 11 splits leave
                // empty shares (and a sequence of no key).
                CacheCase split[] = {
                    {{4 * BN - 1, 0, 1, 2 * BN + 3}, 1, 8, 2, D, -1, 0, page, false, 3, head_sink},
                    {{5 * BN + 7, 40, BN - 1}, 3, 12, 3, D, -1, 0, page, false, 11, batch_sink},
                };
                for (auto &cc : split) run_cache(cc, bf, seed++);
            }
        }
}

static Case random_case(std::mt19937 &r, bool naive) {
    Case c{};
    c.B = 1 + r() % 2; c.Hk = 1 + r() % 3; c.Hq = c.Hk * (1 + r() % 5);
    const int lmax = naive ? 80 : 300;
    c.Lq = 1 + r() % lmax; c.Lk = r() % 10 == 0 ? 0 : 1 + r() % lmax;
    c.D = 8 * (1 + r() % 32);
    c.wl = r() % 2 ? -1 : (int)(r() % 150); c.wr = r() % 2 ? -1 : (int)(r() % 150);
    c.softcap = r() % 4 == 0 ? 5.f + r() % 50 : 0.f;
    c.bhsd = r() % 2; c.pad = 8 * (r() % 3); c.amp = r() % 5 == 0 ? 20.f : 1.f; c.lse = r() % 5 != 0;
    const float scales[] = {0.f, 0.f, 0.3f, 1.7f, -0.5f};
    c.scale = scales[r() % 5];
    c.top_left = r() % 4 == 0;
    // ALiBi or a sink, not both: with both, a row whose nearest visible key
    // lies far off (Lq > Lk, windows) has O far below f16's range, whatever
    // the kernel does (mod_cases combines them where O stays representable).
    if (r() % 3 == 0) {
        if (r() % 2) c.mod = ModSpec{1 + int(r() % 2), r() % 2 ? 8.f : 1.f, 0};
        else c.mod = ModSpec{0, 1.f, 1 + int(r() % 2)};
    }
    return c;
}

// ------------------------------------------------------------------ the tiled backward (--bwd)
// One case file of tests/backward_numerics.rs (../emu-common/bwd_case.h)
// through the three kernels of kernels/bwd_sm80.cu, as src/ops/backward.rs
// launches them, then the baseline's sink-gradient thread (host call) when
// asked. The workspace starts as NaN/garbage: the first kernel must set all
// of it that the others read; with sinks, the sink-gradient kernel after
// them. --det=1: deterministic mode. The main kernel's CTAs run in a
// shuffled order in both modes (deterministic mode's tickets, not blockIdx,
// set the order its turns rely on).
struct BwdKern { int hd; bool bf16; void (*fn)(FaBwdParams); int threads, smem; };
static const BwdKern bwd_kerns[] = {
    {64, false, fa_bwd_sm80_f16_hd64, Sm80BwdCfg<64>::kThreads, Sm80BwdCfg<64>::kSmemBytes},
    {128, false, fa_bwd_sm80_f16_hd128, Sm80BwdCfg<128>::kThreads, Sm80BwdCfg<128>::kSmemBytes},
    {256, false, fa_bwd_sm80_f16_hd256, Sm80BwdCfg<256>::kThreads, Sm80BwdCfg<256>::kSmemBytes},
    {64, true, fa_bwd_sm80_bf16_hd64, Sm80BwdCfg<64>::kThreads, Sm80BwdCfg<64>::kSmemBytes},
    {128, true, fa_bwd_sm80_bf16_hd128, Sm80BwdCfg<128>::kThreads, Sm80BwdCfg<128>::kSmemBytes},
    {256, true, fa_bwd_sm80_bf16_hd256, Sm80BwdCfg<256>::kThreads, Sm80BwdCfg<256>::kSmemBytes},
};

static void run_bwd_grid(void (*fn)(FaBwdParams), const FaBwdParams &p, uint3 grid, int threads, int smem,
                         bool shuffled) {
    smem_bytes = smem > 0 ? smem : 16;
    const int guard_bytes = 1024;
    std::vector<unsigned char> smem_buf(smem_bytes + guard_bytes + 128);
    emu_smem = smem_buf.data() + (128 - (uintptr_t)smem_buf.data() % 128) % 128;
    bwd_fn = fn;
    bwd_params = p;
    gridDim = grid;
    std::vector<uint3> order;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) order.push_back(make_uint3(x, y, z));
    if (shuffled) std::shuffle(order.begin(), order.end(), rng);
    for (const uint3 &blk : order) {
        memset(emu_smem, 0xff, smem_bytes);
        memset(emu_smem + smem_bytes, 0xab, guard_bytes);
        blockIdx = blk;
        run_cta(threads);
        for (int g = 0; g < guard_bytes; ++g)
            if (emu_smem[smem_bytes + g] != 0xab) { FAIL("shared memory written past smem bytes"); break; }
    }
    bwd_fn = nullptr;
    emu_smem = nullptr;
}

static int run_bwd(const char *in, const char *out, bool det) {
    static BwdCase c;
    read_bwd_case(in, c);
    FaBwdParams p = c.p;
    const FaFwdParams &f = p.fwd;
    const int hd = f.head_dim <= 64 ? 64 : f.head_dim <= 128 ? 128 : 256;
    const BwdKern *k = nullptr;
    for (auto &bk : bwd_kerns)
        if (bk.hd == hd && bk.bf16 == c.bf16) k = &bk;
    if (!k || f.head_dim > 256) { fprintf(stderr, "no tiled backward kernel for head_dim %d\n", f.head_dim); return 2; }
    // Tokens: the packed total, or B * Lq.
    const int64_t tokens = c.cu_q.empty() ? (int64_t)f.batch * f.seqlen_q : c.cu_q.back();
    const int64_t rows = tokens * f.heads_q;
    const int blk = FA_BWD_SM80_BLOCK, q_blocks = (f.seqlen_q + blk - 1) / blk;
    std::vector<float> accum(rows * f.head_dim + 1, NAN), delta(rows + 1, NAN);
    std::vector<int32_t> turns((int64_t)f.batch * f.heads_q * q_blocks + 1, 0x5a5a5a5a);
    std::vector<uint32_t> ticket(2, 0x5a5a5a5a);  // the counter, then a guard
    p.dq_accum = accum.data(), p.delta = delta.data(), p.dq_turns = turns.data(), p.deterministic = det;
    p.dq_ticket = ticket.data();
    auto range = [](const void *lo, size_t bytes) { return Range{(const unsigned char *)lo, (const unsigned char *)lo + bytes}; };
    readable.clear();
    for (BwdTensor *t : {&c.q, &c.k, &c.v, &c.o, &c.d_o}) readable.push_back(range(t->data.data(), 2 * t->data.size()));
    for (auto *v : {&c.lse, &c.slopes, &c.sinks, &accum, &delta}) readable.push_back(range(v->data(), 4 * v->size()));
    for (auto *v : {&c.cu_q, &c.cu_k}) readable.push_back(range(v->data(), 4 * v->size()));
    readable.push_back(range(turns.data(), 4 * turns.size()));
    writable = {nullptr, nullptr};
    writable_more.clear();
    for (BwdTensor *t : {&c.dq, &c.dk, &c.dv}) writable_more.push_back(range(t->data.data(), 2 * t->data.size()));
    writable_more.push_back(range(accum.data(), 4 * (accum.size() - 1)));
    writable_more.push_back(range(delta.data(), 4 * (delta.size() - 1)));
    writable_more.push_back(range(turns.data(), 4 * (turns.size() - 1)));
    writable_more.push_back(range(ticket.data(), 4));
    void (*pre)(FaBwdParams) = c.bf16 ? fa_bwd_sm80_pre_bf16 : fa_bwd_sm80_pre_f16;
    void (*dq)(FaBwdParams) = c.bf16 ? fa_bwd_sm80_dq_bf16 : fa_bwd_sm80_dq_f16;
    const unsigned B = f.batch, Hq = f.heads_q, Hk = f.heads_kv;
    if (f.seqlen_q > 0) run_bwd_grid(pre, p, make_uint3((f.seqlen_q + 3) / 4, Hq, B), 128, 0, true);
    const uint3 grid = make_uint3((f.seqlen_k + blk - 1) / blk, Hk, B);
    // Shuffled in both modes: deterministic mode takes its order from tickets.
    if (f.seqlen_k > 0) run_bwd_grid(k->fn, p, grid, k->threads, k->smem, true);
    if (det && f.seqlen_q > 0 && f.seqlen_k > 0 && ticket[0] != grid.x * grid.y * grid.z)
        FAIL("ticket counter ends at %u for %u CTAs", ticket[0], grid.x * grid.y * grid.z);
    if (f.seqlen_q > 0) run_bwd_grid(dq, p, make_uint3((f.seqlen_q + 3) / 4, Hq, B), 128, 0, true);
    if (det)
        for (int64_t bh = 0; bh < (int64_t)B * Hq; ++bh)
            for (int m = 0; m < q_blocks; ++m) {
                // Every turn counter of a query block with rows (a packed
                // batch's shorter sequences have fewer) ends at the number of
                // key blocks that visited it.
                const int b = (int)(bh / Hq);
                const int lq = c.cu_q.empty() ? f.seqlen_q : c.cu_q[b + 1] - c.cu_q[b];
                if (m * blk >= lq) continue;
                const int32_t t = turns[bh * q_blocks + m];
                if (t < 0 || t > (f.seqlen_k + blk - 1) / blk) FAIL("turn counter %lld ends at %d", (long long)(bh * q_blocks + m), t);
            }
    if (turns.back() != 0x5a5a5a5a || ticket.back() != 0x5a5a5a5a || !std::isnan(accum.back()) || !std::isnan(delta.back()))
        FAIL("workspace written past its end");
    if (c.want_dsinks) {
        writable_more.push_back(range(c.dsinks.data(), 4 * c.dsinks.size()));
        run_bwd_grid(c.bf16 ? fa_bwd_sm80_dsink_bf16 : fa_bwd_sm80_dsink_f16, p, make_uint3(Hq, 1, 1),
                     FA_BWD_SM80_DSINK_THREADS, 32, true);
    }
    printf("bwd: %ld CTAs, %ld cp.async, ldmatrix phases %ld (bank conflicts %ld), %ld emulator errors\n", n_ctas,
           n_cp_async, ldsm_phases, ldsm_conflicts, errors);
    if (errors) return 1;
    return write_bwd_answer(out, c);
}

int main(int argc, char **argv) {
    std::string kernel = "sm80", cases = "all", only, bwd_in, bwd_out;
    bool det = false;
    int n_random = 0;
    unsigned seed_arg = 1;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto val = [&](const char *key) { return a.rfind(key, 0) == 0 ? a.substr(strlen(key)) : std::string("\x01"); };
        std::string v;
        if ((v = val("--kernel=")) != "\x01") kernel = v;
        else if ((v = val("--land=")) != "\x01") land = v == "eager" ? LAND_EAGER : v == "random" ? LAND_RANDOM : LAND_LAZY;
        else if ((v = val("--order=")) != "\x01") shuffle_order = v != "fixed";
        else if ((v = val("--cases=")) != "\x01") cases = v;
        else if ((v = val("--random=")) != "\x01") n_random = atoi(v.c_str());
        else if ((v = val("--seed=")) != "\x01") seed_arg = atoi(v.c_str());
        else if ((v = val("--round=")) != "\x01") hw_round = v == "hw";
        else if ((v = val("--only=")) != "\x01") only = v;
        else if ((v = val("--bwd=")) != "\x01") bwd_in = v;
        else if ((v = val("--bwd-out=")) != "\x01") bwd_out = v;
        else if ((v = val("--det=")) != "\x01") det = v == "1";
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    rng.seed(seed_arg);
    noise_state ^= seed_arg * 0x2545F4914F6CDD1Dull;
    if (!bwd_in.empty()) return run_bwd(bwd_in.c_str(), bwd_out.c_str(), det);
    if (cases == "bwd-config") {
        // The tiled backward's launch configuration, for the host to compare with its own.
        for (auto &bk : bwd_kerns)
            if (!bk.bf16) printf("hd%d threads %d smem %d\n", bk.hd, bk.threads, bk.smem);
        return 0;
    }
    const bool naive = kernel == "naive";
    for (Kern *k = naive ? naive_kerns : sm80_kerns; k->name; ++k)
        if (only.empty() || strstr(k->name, only.c_str())) kerns.push_back(k);
    if (kerns.empty()) { fprintf(stderr, "no kernel matches\n"); return 2; }
    const bool verbose = true;
    unsigned seed = 7;
    const std::vector<int> buckets = {32, 64, 96, 128, 160, 192, 224, 256};
    if (cases == "all" || cases == "quick") {
        const bool quick = cases == "quick";
        // Every bucket, both dtypes: a mixed case (GQA, odd lengths, causal + Lq != Lk, lse)
        std::vector<int> dims = {8, 32, 40, 64, 72, 96, 128, 136, 160, 192, 200, 224, 256};
        if (naive) dims = {8, 40, 64, 136, 256};
        for (int bf = 0; bf < 2; ++bf)
            for (int D : dims) {
                Case c{1, 2, 1, naive ? 20 : 77, 150, D, -1, 0, 0.f, false, 0, 1.f, true};
                run_case(c, bf, seed++, verbose);
            }
        for (int bf = 0; bf < 2; ++bf)
            for (int hd : buckets) {
                if (naive && hd != 64 && hd != 256) continue;
                if (quick && hd != 64 && hd != 128) continue;
                bucket_cases(hd, bf, seed, verbose, naive);
            }
        // Masks and shapes on a few buckets
        for (int D : {64, 128, 40, 256, 32, 96}) {
            if ((quick || naive) && D != 96 && D != 64) continue;
            for (int bf = 0; bf < 2; ++bf) {
                const int s = naive ? 3 : 1;  // the naive kernel: fewer query rows
                Case cs[] = {
                    {1, 1, 1, 130 / s, 200, D, -1, -1, 0.f, false, 0, 1.f, true},   // full, tail tiles
                    {2, 2, 2, 200 / s, 90 / s, D, -1, 0, 0.f, true, 8, 1.f, true},  // causal Lq > Lk: empty rows, BHSD, padding
                    {1, 2, 1, 150 / s, 260, D, 20, 5, 0.f, false, 16, 1.f, true},   // window both sides
                    {1, 1, 1, 64, 64, D, 0, 0, 0.f, false, 0, 1.f, true},           // diagonal only
                    {1, 1, 1, 100 / s, 300, D, 3, -1, 0.f, false, 0, 1.f, false},   // left window, right unbounded, no lse
                    {1, 3, 1, 129 / s, 129, D, -1, -1, 30.f, false, 0, 3.f, true},  // softcap
                    {1, 1, 1, 40, 0, D, -1, -1, 0.f, false, 0, 1.f, true},          // no keys at all
                    {1, 1, 1, 70, 70, D, -1, -1, 0.f, false, 0, 40.f, true},        // huge logits
                    {1, 1, 1, 1, 1, D, -1, -1, 0.f, false, 0, 1.f, true},           // single element
                    {1, 1, 1, 300 / s, 20, D, 5, 2, 0.f, false, 0, 1.f, true},      // tiny window, Lq >> Lk
                    {1, 2, 1, 90 / s, 200, D, -1, 0, 0.f, false, 0, 1.f, true, 0.f, true},  // top-left causal, Lq < Lk
                    {1, 1, 1, 200 / s, 70, D, 10, 3, 0.f, true, 8, 1.f, true, 0.f, true},   // top-left window, Lq > Lk
                };
                for (auto &c : cs) run_case(c, bf, seed++, verbose);
            }
        }
    }
    if (cases == "all" || cases == "quick" || cases == "varlen") {
        // Packed batches: a few buckets (the naive kernel: one).
        for (int bf = 0; bf < 2; ++bf)
            for (int D : {64, 128, 40, 256, 96}) {
                if ((naive || cases == "quick") && D != 64) continue;
                varlen_cases(D, bf, seed, naive);
                cache_cases(D, bf, seed, naive);
            }
    }
    if (cases == "mods") mod_cases(naive, seed, false);
    if (cases == "neg") {
        // The negative control's cases: few and small, each aimed at a class
        // of injected bug (tests/emulated_sm80.rs lists them).
        for (int bf = 0; bf < 2; ++bf)
            for (int hd : {64, 128}) {
                if (!first_kernel(hd, bf)) continue;
                const int BN = naive ? 64 : first_kernel(hd, bf)->bn;
                const int lq = naive ? 9 : 65;
                Case cs[] = {
                    {1, 8, 2, lq, 2 * BN - 1, hd, -1, -1, 0.f, false, 0, 1.f, true, 0.3f},  // GQA, tile edge, scale, strides
                    {1, 2, 1, naive ? 30 : 100, 150, hd, 20, 5, 0.f, false, 8, 1.f, true},  // window edges
                    {1, 1, 1, naive ? 20 : 200, 50, hd, -1, 0, 0.f, true, 0, 1.f, true},   // empty rows, no-key blocks
                    {1, 2, 1, naive ? 10 : 40, 90, hd, -1, -1, 5.f, false, 0, 3.f, true}, // softcap
                };
                for (auto &c : cs) run_case(c, bf, seed++, verbose);
            }
        for (int bf = 0; bf < 2; ++bf) {
            varlen_cases(64, bf, seed, naive);
            cache_cases(64, bf, seed, naive);
        }
        mod_cases(naive, seed, true);
    } else if (cases != "none" && cases != "all" && cases != "quick" && cases != "varlen" && cases != "mods") {
        fprintf(stderr, "unknown case set %s\n", cases.c_str());
        return 2;
    }
    if (n_random) {
        std::mt19937 r(seed_arg);
        for (int it = 0; it < n_random; ++it) {
            const Case c = random_case(r, naive);
            const bool bf = r() % 2;
            run_case(c, bf, seed++, true);
        }
    }
    printf("stats: %ld CTAs, %ld cp.async, %ld shared granule checks\n", n_ctas, n_cp_async, n_checked);
    printf("ldmatrix phases %ld, with bank conflicts %ld\n", ldsm_phases, ldsm_conflicts);
    printf("%s %s: %d failing cases, %ld emulator errors\n", kernel.c_str(), cases.c_str(), fails, errors);
    return fails || errors;
}
