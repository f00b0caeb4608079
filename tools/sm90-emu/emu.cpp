// Host emulator of the sm_90a features kernels/fwd_sm90.cu uses, run over the
// real kernel source (gen.py translates its inline PTX into the emu_* calls
// of shim.h). Driven by tests/emulated_sm90.rs.
//
// What is modelled, from the PTX ISA rather than from the kernel's own index
// arithmetic:
//  * every CUDA thread is a fiber; warp collectives (shuffles, votes,
//    bar.sync/bar.arrive) and warpgroup collectives (wgmma.*, setmaxnreg)
//    are rendezvous points; warps run in random order;
//  * wgmma.mma_async m64nNk16 (f16/bf16 -> f32): A from registers (ISA
//    register-fragment layout) or from a shared-memory descriptor, B from a
//    descriptor, K-major or MN-major, addresses from the ISA's canonical
//    layouts ((8,m),(T,2k)) / ((T,8,m),(8,k)) and the Swizzle<3,4,3> of the
//    absolute shared address; commit/wait groups; results either at issue or
//    only at the retiring wait_group, with the accumulators poisoned and the
//    operands re-read and compared in between;
//  * cp.async.bulk.tensor (tile mode) through our own encoding of the tensor
//    map (the launcher mirrors src/params.rs::tma_spec), 128B
//    swizzle, zero fill out of bounds, complete_tx landing at issue, at a
//    random later point, or as late as possible;
//  * mbarrier init/arrive/expect_tx/try_wait.parity with phases, pending
//    arrivals and tx-count, and their misuse; named barriers with counts;
//    setmaxnreg with a register pool;
//  * bounds of every shared, global and tensor-map access; poisoned outputs;
//    a deadlock report naming where every warp waits;
//  * the generic/async proxy split, coarsely: a shadow copy of shared memory
//    holds what the async proxy (TMA, wgmma) is known to see; TMA copies
//    write both, fence.proxy.async (by any thread) copies the generic view
//    into it, and a wgmma operand read or a TMA destination whose bytes
//    ordinary stores changed since is reported. Ordinary stores into the
//    destination of an in-flight TMA copy are reported when it lands.
//
// Not modelled: the kernel's ordinary C++ loads and stores run natively
// (only guard bytes, poisoned outputs and the byte comparisons above see
// them, and threads interleave only at emulated instructions); which thread
// fenced (one fence covers every thread's stores here, the hardware wants a
// fence by each writer); the rest of the memory model (acquire/release)
// beyond the orderings above; nvcc's register allocation (the empty asm pins
// are no-ops); the tensor cores' and ex2.approx's actual rounding (by default
// products are exact, sums in double, ex2 correctly rounded; --round=real
// makes each as inexact as the ISA allows instead, see emu_perturb); clusters
// and multicast.
#include "shim.h"
#include "../emu-common/check.h"
#include "kernels/fwd_sm90.cu"

#include <ucontext.h>
#include <sys/mman.h>
#include <signal.h>
#include <unistd.h>
#include <cstdarg>
#include <vector>
#include <deque>
#include <map>
#include <string>
#include <algorithm>
#include <random>
#include <cfloat>

#ifndef FA_GRID_TILES
#define FA_GRID_TILES 0
#define FA_GRID_PERSISTENT 1
#endif

// ================================================================== options
enum { TMA_EAGER, TMA_RANDOM, TMA_LAZY };
enum { WG_AT_ISSUE, WG_AT_WAIT };
static struct {
    int tma = TMA_LAZY;
    int wgmma = WG_AT_WAIT;
    bool shuffle = true;
    bool oob_skip_empty = false;  // alternative reading: a box wholly out of bounds completes 0 bytes
    int sms = 2;                  // grid of FA_GRID_PERSISTENT kernels
    int random = 0;               // extra random cases
    unsigned seed = 1;
    std::string cases = "all";
    std::string only;             // run kernels whose name contains this
    bool real_round = false;      // realistic rounding (see emu_perturb)
    bool stop_on_fail = false;    // exit at the first failing case
} opt;
static std::mt19937 rng(1);
static std::mt19937 rng_round(1);  // its own stream: rounding must not change the thread schedule

// --round=real: results that the hardware does not round exactly come out
// `ulps` units in the last place off, in a random direction; zeros, infinities,
// NaN and subnormals are left alone (the special values are exact in the ISA).
float emu_perturb(float y, int ulps) {
    if (!opt.real_round || !std::isnormal(y)) return y;
    const float dir = rng_round() & 1 ? INFINITY : -INFINITY;
    for (int i = 0; i < ulps; ++i) y = nextafterf(y, dir);
    return y;
}
static unsigned rnd(unsigned n) { return n ? rng() % n : 0; }

// ================================================================== errors
static long errors_total = 0;
static int case_errors = 0;
static char cta_desc[160] = "";
static int cur = -1;  // running fiber (CUDA thread), -1 in the scheduler
static bool cta_abort = false;

static void emu_fail(const char *fmt, ...) {
    errors_total++;
    if (case_errors++ < 12) {
        char buf[600];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        if (cur >= 0)
            fprintf(stdout, "  EMU ERROR [%s, thread %d (warp %d lane %d)]: %s\n", cta_desc, cur, cur / 32, cur % 32, buf);
        else
            fprintf(stdout, "  EMU ERROR [%s]: %s\n", cta_desc, buf);
    }
}
#define FAIL(...) emu_fail(__VA_ARGS__)

static struct Stats {
    long wgmma = 0, wgmma_rs = 0, wgmma_trans_b = 0, tma = 0, tma_partial = 0, tma_empty = 0, phases = 0, ctas = 0;
    long persistent_multi = 0, persistent_mixed = 0;  // persistent launches with more tiles than CTAs; with keyless tiles too
} stats;

// ================================================================== fibers and threads
enum State { RUN, BLK_WARP, BLK_WG, BLK_MBAR, BLK_NBAR, DONE };
enum Op {
    OP_NONE,
    W_SHFL, W_VOTE, W_SYNCWARP, W_BAR, W_ELECT,         // warp collectives
    G_FENCE, G_COMMIT, G_WAIT, G_MMA, G_SETMAXNREG,     // warpgroup collectives
};
static const char *op_name(int op) {
    static const char *n[] = {"-", "shfl", "vote", "syncwarp", "bar", "elect.sync", "wgmma.fence", "wgmma.commit_group",
                              "wgmma.wait_group", "wgmma.mma_async", "setmaxnreg"};
    return n[op];
}

struct Lane {
    ucontext_t ctx;
    State st = RUN;
    int op = OP_NONE;
    const char *mn = nullptr;
    // collective arguments and results
    uint32_t mask = 0, u = 0, res = 0;
    int mode = 0, arg = 0, width = 32, count = 0;
    uint32_t id = 0;
    // wgmma issue (pointers into the issuing frame, valid while blocked)
    float *const *dptr = nullptr;
    int nd = 0, na = 0;
    const uint32_t *avals = nullptr;
    const uint32_t *const *aptrs = nullptr;
    bool a_regs = false, scale_d = false;
    uint64_t da = 0, db = 0;
    int sa = 1, sb = 1, ta = 0, tb = 0;
    // mbarrier wait
    uint32_t wbar = 0;
    uint64_t wparity = 0;
    std::vector<std::pair<uint32_t, int64_t>> last_phase;  // barrier -> phase this thread last saw complete
    uint64_t seen_gen = 0;  // named-barrier completions this thread has waited for
    // cp.async.bulk store groups
    std::vector<int> bulk_open;
    std::deque<std::vector<int>> bulk_groups;
};

static int nthreads = 0;
static std::vector<Lane> lanes;
static std::vector<int> runq;
static ucontext_t sched_ctx;
static std::vector<char *> stacks;
static const size_t kStack = 256 * 1024;
static std::vector<int> warp_blk, warp_done, wg_blk, wg_done;
static void (*kernel_fn)(FaFwdSm90Params);
static FaFwdSm90Params kernel_params;

uint3 blockIdx, gridDim, blockDim;
uint3 emu_thread_idx() {
    if (cur < 0) { fprintf(stderr, "threadIdx outside a thread\n"); abort(); }
    return make_uint3(cur, 0, 0);
}

static void make_runnable(int id) {
    lanes[id].st = RUN;
    runq.push_back(id);
}
// The running thread stops here until the scheduler resumes it.
static void block_as(State s) {
    Lane &L = lanes[cur];
    L.st = s;
    const int me = cur;
    swapcontext(&L.ctx, &sched_ctx);
    cur = me;
}
// Lets another thread run at an emulated instruction boundary, so that
// arrivals, copies and waits interleave in many orders.
static void maybe_yield() {
    if (!opt.shuffle || cur < 0 || rnd(3)) return;
    runq.push_back(cur);
    block_as(RUN);
}

void emu_sched_point() { maybe_yield(); }

static void lane_main() {
    kernel_fn(kernel_params);
    lanes[cur].st = DONE;
    swapcontext(&lanes[cur].ctx, &sched_ctx);
    abort();  // never resumed
}

// ================================================================== shared memory window
static unsigned char *win = nullptr;     // the whole shared window
static uint32_t dyn_off = 0, dyn_size = 0;  // dynamic shared memory within it
static const uint32_t kGuard = 1024;
static std::vector<uint16_t> tma_pending;  // per byte: in-flight TMA writes
static std::vector<uint16_t> wg_readers;   // per byte: in-flight wgmma reads
static std::vector<unsigned char> async_view;  // shared memory as the async proxy is known to see it

unsigned char *emu_dynamic_smem() { return win + dyn_off; }
size_t emu_cvta_to_shared(const void *p) {
    const unsigned char *c = (const unsigned char *)p;
    if (c < win || c >= win + dyn_off + dyn_size + kGuard) FAIL("cvta.to.shared of a pointer outside shared memory");
    return (size_t)(c - win);
}
static bool in_dyn(uint64_t a, uint64_t n) { return a >= dyn_off && a + n <= (uint64_t)dyn_off + dyn_size; }

// ================================================================== mbarriers
struct MBar {
    int idx = 0;
    uint32_t expected = 0;
    int64_t pending = 0, tx = 0;
    int64_t phase = 0;  // completed phases
    int init_thread = -1;
    uint64_t init_gen = 0;  // named-barrier completions at init
    bool fenced = false;    // fence.mbarrier_init by the initialiser since init
    int inflight = 0;       // TMA copies that will complete_tx on it
    std::vector<int> waiters;
};
static std::map<uint32_t, MBar> mbars;
static uint64_t bar_gen = 0;  // completed named barriers (bar.sync/__syncthreads), any id

static void mbar_sign(uint32_t a, const MBar &b) {
    // Our own pattern in the barrier's 8 bytes: a generic store over a live
    // barrier shows as a changed pattern.
    uint64_t sig = 0x4d42415200000000ull | (uint64_t)b.idx;
    memcpy(win + a, &sig, 8);
}
static bool mbar_sign_ok(uint32_t a, const MBar &b) {
    uint64_t sig = 0x4d42415200000000ull | (uint64_t)b.idx, got;
    memcpy(&got, win + a, 8);
    return got == sig;
}
static bool overlaps_mbar(uint32_t a, uint32_t n) {
    auto it = mbars.lower_bound(a >= 7 ? a - 7 : 0);
    return it != mbars.end() && it->first < a + n;
}
static MBar *get_mbar(uint32_t a, const char *what) {
    auto it = mbars.find(a);
    if (it == mbars.end()) {
        FAIL("%s on shared address 0x%x, which holds no initialised mbarrier", what, a);
        return nullptr;
    }
    MBar &b = it->second;
    if (!mbar_sign_ok(a, b)) FAIL("mbarrier #%d at 0x%x was overwritten by an ordinary store", b.idx, a);
    // The init must reach other threads through a barrier they passed
    // after it (fence.mbarrier_init + bar.sync in the ISA's pattern).
    if (cur >= 0 && cur != b.init_thread && lanes[cur].seen_gen <= b.init_gen)
        FAIL("%s on mbarrier #%d before a barrier made its init visible to this thread", what, b.idx);
    return &b;
}
static void mbar_maybe_complete(MBar &b) {
    if (b.pending == 0 && b.tx == 0) {
        b.phase++;
        b.pending = b.expected;
        stats.phases++;
        for (int w : b.waiters) make_runnable(w);
        b.waiters.clear();
    }
}
static void mbar_check_tx_range(MBar &b) {
    if (b.tx > (1 << 20) - 1 || b.tx < -((1 << 20) - 1))
        FAIL("mbarrier #%d tx-count %lld outside the ISA range +-(2^20-1)", b.idx, (long long)b.tx);
}

void emu_mbarrier_init(const char *mn, uint32_t a, uint32_t count) {
    if (a % 8 || !in_dyn(a, 8)) { FAIL("mbarrier.init at 0x%x: not 8-byte aligned inside dynamic shared memory", a); return; }
    if (count < 1 || count > (1u << 20) - 1) FAIL("mbarrier.init count %u outside [1, 2^20-1]", count);
    auto it = mbars.find(a);
    if (it != mbars.end() && (it->second.inflight || !it->second.waiters.empty()))
        FAIL("mbarrier.init over mbarrier #%d while it has waiters or copies in flight", it->second.idx);
    if (tma_pending[a] || wg_readers[a]) FAIL("mbarrier.init over bytes an async operation is using");
    MBar b;
    b.idx = it != mbars.end() ? it->second.idx : (int)mbars.size();
    b.expected = count;
    b.pending = count;
    b.init_thread = cur;
    b.init_gen = bar_gen;
    mbars[a] = b;
    mbar_sign(a, mbars[a]);
    (void)mn;
    maybe_yield();
}

uint64_t emu_mbarrier_arrive(const char *mn, uint32_t a, uint32_t count, uint32_t tx) {
    if (strstr(mn, "shared::cluster")) FAIL("%s: cluster-scope barriers are not emulated", mn);
    MBar *b = get_mbar(a, "mbarrier.arrive");
    if (!b) return 0;
    const uint64_t token = (uint64_t)b->phase;
    // arrive.expect_tx: the expect-tx happens before the arrive-on.
    if (tx) {
        b->tx += tx;
        mbar_check_tx_range(*b);
    }
    if (b->pending < (int64_t)count) {
        FAIL("mbarrier #%d: arrival beyond the expected count in phase %lld (pending %lld, arriving %u)", b->idx,
             (long long)b->phase, (long long)b->pending, count);
        b->pending = 0;
    } else {
        b->pending -= count;
    }
    mbar_maybe_complete(*b);
    maybe_yield();
    return token;
}

void emu_mbarrier_tx(const char *mn, uint32_t a, uint32_t tx) {
    MBar *b = get_mbar(a, mn);
    if (!b) return;
    if (strstr(mn, "expect_tx")) b->tx += tx;
    else {
        b->tx -= tx;
        if (b->tx < 0 && b->pending == 0) FAIL("mbarrier #%d: complete_tx beyond the bytes expected", b->idx);
    }
    mbar_check_tx_range(*b);
    mbar_maybe_complete(*b);
}

// try_wait.parity is only defined for the current (incomplete) phase and the
// one just before it (ISA, mbarrier.test_wait/try_wait). Each thread's
// intended phase follows from the last one it saw complete on this barrier:
// the same parity again is a re-poll of that phase, the other parity the next
// one. A wait whose intended phase is two or more behind the barrier, or
// ahead of the current one, is reported: the hardware's parity answer aliases.
static int64_t *thread_last_phase(uint32_t a) {
    for (auto &e : lanes[cur].last_phase)
        if (e.first == a) return &e.second;
    return nullptr;
}
static bool parity_check(MBar &b, uint32_t a, uint32_t parity, const char *mn) {
    const bool done = (uint32_t)(b.phase & 1) != parity;
    int64_t *last = thread_last_phase(a);
    int64_t want;
    if (!last) want = done ? b.phase - 1 : b.phase;  // first wait: what the hardware reads it as
    else want = ((*last & 1) == (int64_t)parity) ? *last : *last + 1;
    if (b.phase - want >= 2)
        FAIL("%s on mbarrier #%d: waits for phase %lld (parity %u) but the barrier already completed phase %lld: "
             "two phases behind, the parity test aliases",
             mn, b.idx, (long long)want, parity, (long long)b.phase - 1);
    if (want > b.phase)
        FAIL("%s on mbarrier #%d: waits for phase %lld, ahead of the current phase %lld (wrong parity?)", mn, b.idx,
             (long long)want, (long long)b.phase);
    return done;
}
static void record_phase(uint32_t a, int64_t ph) {
    if (int64_t *p = thread_last_phase(a)) *p = ph;
    else lanes[cur].last_phase.push_back({a, ph});
}

bool emu_mbarrier_wait(const char *mn, uint32_t a, uint64_t x) {
    MBar *b = get_mbar(a, mn);
    if (!b) return true;
    const bool parity = strstr(mn, ".parity") != nullptr;
    const bool blocking = strstr(mn, "try_wait") != nullptr;
    if (parity && x > 1) FAIL("%s: phaseParity %llu is not 0 or 1", mn, (unsigned long long)x);
    auto complete = [&]() {
        if (parity) return parity_check(*b, a, (uint32_t)x, mn);
        return b->phase > (int64_t)x;  // state token = phase at arrival
    };
    bool done = complete();
    if (!done && blocking) {
        lanes[cur].wbar = a;
        lanes[cur].wparity = x;
        b->waiters.push_back(cur);
        block_as(BLK_MBAR);
        b = &mbars[a];
        done = complete();
    }
    if (done) {
        if (parity) record_phase(a, ((b->phase & 1) != (int64_t)x) ? b->phase - 1 : b->phase - 2);
        maybe_yield();
    }
    return done;
}

static void mbars_by_thread_fenced(int t) {
    for (auto &e : mbars)
        if (e.second.init_thread == t) e.second.fenced = true;
}

void emu_fence(const char *mn) {
    // Fences order memory; every emulated access is already ordered, so only
    // the bookkeeping that other checks rely on happens here.
    if (strstr(mn, "mbarrier_init")) mbars_by_thread_fenced(cur);
    // A proxy fence (for shared memory, or all state spaces): the async proxy
    // now sees what ordinary stores wrote (of every thread: coarse, see top).
    if (strstr(mn, "proxy.async") && !strstr(mn, ".global")) memcpy(async_view.data(), win, async_view.size());
    maybe_yield();
}

// ================================================================== warp collectives
static void warp_collective(int op) {
    lanes[cur].op = op;
    block_as(BLK_WARP);
}

uint32_t emu_shfl(int mode, unsigned mask, uint32_t v, int arg, int width) {
    if (mask != 0xffffffffu) FAIL("shuffle with partial mask 0x%x is not emulated", mask);
    if (width != 32) FAIL("shuffle width %d is not emulated", width);
    Lane &L = lanes[cur];
    L.mode = mode; L.mask = mask; L.u = v; L.arg = arg;
    warp_collective(W_SHFL);
    return lanes[cur].res;
}
uint32_t emu_vote(int mode, unsigned mask, int pred) {
    if (mask != 0xffffffffu) FAIL("vote with partial mask 0x%x is not emulated", mask);
    Lane &L = lanes[cur];
    L.mode = mode; L.mask = mask; L.u = pred != 0;
    warp_collective(W_VOTE);
    return lanes[cur].res;
}
void __syncwarp(unsigned mask) {
    if (mask != 0xffffffffu) FAIL("__syncwarp with partial mask is not emulated");
    warp_collective(W_SYNCWARP);
}
bool emu_elect_sync(const char *mn, uint32_t mask, uint32_t *laneid) {
    if (mask != 0xffffffffu) FAIL("%s with partial mask is not emulated", mn);
    lanes[cur].mask = mask;
    warp_collective(W_ELECT);
    *laneid = 0;
    return cur % 32 == 0;
}

// Named barriers: bar.sync/bar.arrive execute per warp (the ISA counts a
// warp's arrival as 32 threads); the barrier completes when `count` threads
// have arrived, releasing the warps that wait on it.
struct NBar { int count = 0, arrived = 0; };
static NBar nbars[16];

void emu_bar(const char *mn, uint32_t id, int count) {
    Lane &L = lanes[cur];
    L.id = id;
    L.count = count;
    L.mode = strstr(mn, ".arrive") ? 0 : 1;  // 1: sync
    L.mn = mn;
    warp_collective(W_BAR);
}
void __syncthreads() { emu_bar("bar.sync", 0, -1); }

static void exec_warp(int w) {
    Lane *W = &lanes[w * 32];
    const int op = W[0].op;
    for (int l = 1; l < 32; ++l)
        if (W[l].op != op || W[l].mode != W[0].mode) {
            FAIL("warp %d diverged at a warp collective: lane 0 at %s, lane %d at %s", w, op_name(op), l, op_name(W[l].op));
            break;
        }
    for (int l = 0; l < 32; ++l) W[l].op = OP_NONE;
    switch (op) {
    case W_SHFL:
        for (int l = 0; l < 32; ++l) {
            int src = l;
            switch (W[l].mode) {
            case EMU_SHFL_XOR: src = l ^ W[l].arg; break;
            case EMU_SHFL_IDX: src = W[l].arg & 31; break;
            case EMU_SHFL_DOWN: src = l + W[l].arg; break;
            case EMU_SHFL_UP: src = l - W[l].arg; break;
            }
            W[l].res = (src < 0 || src > 31) ? W[l].u : W[src].u;
        }
        break;
    case W_VOTE: {
        uint32_t ballot = 0;
        for (int l = 0; l < 32; ++l) ballot |= (W[l].u & 1) << l;
        for (int l = 0; l < 32; ++l)
            W[l].res = W[l].mode == EMU_VOTE_ALL ? ballot == 0xffffffffu : W[l].mode == EMU_VOTE_ANY ? ballot != 0 : ballot;
        break;
    }
    case W_BAR: {
        const uint32_t id = W[0].id;
        int count = W[0].count < 0 ? nthreads : W[0].count;
        for (int l = 1; l < 32; ++l)
            if (W[l].id != id || W[l].count != W[0].count) { FAIL("warp %d: lanes disagree on bar id/count", w); break; }
        if (id > 15) { FAIL("%s: barrier id %u > 15", W[0].mn, id); break; }
        if (count <= 0 || count % 32 || count > nthreads) {
            FAIL("%s %u, %d: the thread count must be a positive multiple of 32, at most the CTA's %d", W[0].mn, id, count, nthreads);
            count = nthreads;
        }
        NBar &B = nbars[id];
        if (B.arrived && B.count != count)
            FAIL("named barrier %u: used with %d threads while %d threads of a %d-thread use have arrived", id, count, B.arrived, B.count);
        B.count = count;
        B.arrived += 32;
        const bool sync = W[0].mode == 1;
        for (int l = 0; l < 32; ++l) {
            W[l].id = id;
            if (sync) W[l].st = BLK_NBAR;
            else make_runnable(w * 32 + l);
        }
        if (B.arrived >= B.count) {
            B.arrived = 0;
            bar_gen++;
            for (int t = 0; t < nthreads; ++t)
                if (lanes[t].st == BLK_NBAR && lanes[t].id == id) {
                    lanes[t].seen_gen = bar_gen;
                    make_runnable(t);
                }
        }
        return;
    }
    default:
        break;
    }
    for (int l = 0; l < 32; ++l) make_runnable(w * 32 + l);
}

// ================================================================== warpgroup collectives

struct MmaOp {
    int n = 0;
    bool bf16 = false, a_regs = false, scale_d = false, chained = false;
    uint64_t da = 0, db = 0;
    int sa = 1, sb = 1, ta = 0, tb = 0;
    std::vector<float *> d;              // 128 x n/2
    std::vector<uint32_t> a_issue;       // 128 x 4
    std::vector<const uint32_t *> a_ptr; // 128 x 4
    std::vector<float> c_issue;          // 128 x n/2
    std::vector<float> A, B;             // 64x16 and 16xN as read at issue
    std::vector<uint32_t> reads;         // shared addresses of every operand element
};
struct Track {  // registers a wgmma wrote or read
    std::vector<float *> fp;
    std::vector<const uint32_t *> up;
    std::vector<uint32_t> snap;          // bit patterns at the last fence / completion
    uint64_t write_epoch = 0;            // fence epoch when a wgmma last wrote them
    bool written = false;
};
struct WG {
    std::vector<MmaOp *> open;
    std::deque<std::vector<MmaOp *>> groups;
    uint64_t fence_epoch = 0;
    std::map<const void *, Track> acc, areg;
    int regs = 0;
};
static std::vector<WG> wgs;
static int reg_pool = 0;  // registers released by setmaxnreg.dec, not yet claimed

static const uint32_t kPoison = 0x7fdead00u;  // NaN: accumulators while a wgmma owns them

static void wg_collective(int op) {
    lanes[cur].op = op;
    block_as(BLK_WG);
}
void emu_wgmma_fence(const char *mn) { lanes[cur].mn = mn; wg_collective(G_FENCE); }
void emu_wgmma_commit(const char *mn) { lanes[cur].mn = mn; wg_collective(G_COMMIT); }
void emu_wgmma_wait(const char *mn, int n) { lanes[cur].mn = mn; lanes[cur].arg = n; wg_collective(G_WAIT); }
void emu_setmaxnreg(const char *mn, uint32_t regs) {
    lanes[cur].mn = mn;
    lanes[cur].u = regs;
    lanes[cur].mode = strstr(mn, ".inc") ? 1 : 0;
    wg_collective(G_SETMAXNREG);
}
void emu_wgmma_mma_async(const char *mn, float *const *d, int nd, bool a_regs, const uint32_t *av,
                         const uint32_t *const *ap, int na, uint64_t da, uint64_t db, bool scale_d, int sa, int sb,
                         int ta, int tb) {
    Lane &L = lanes[cur];
    L.mn = mn; L.dptr = d; L.nd = nd; L.a_regs = a_regs; L.avals = av; L.aptrs = ap; L.na = na;
    L.da = da; L.db = db; L.scale_d = scale_d; L.sa = sa; L.sb = sb; L.ta = ta; L.tb = tb;
    wg_collective(G_MMA);
}

// Shared address of element (mn, k) of a 16-bit operand (mn indexes M or N,
// k the 16 K elements of one instruction) through a matrix descriptor, per
// the ISA's canonical layouts (T = 8 elements = 16 bytes):
//   K-major  swizzle W bytes: ((8,m),(T,2k)) : ((W/16*T, SBO), (1, T))
//   K-major  no swizzle:      ((8,m),(T,2k)) : ((1T, SBO), (1, LBO))
//   MN-major swizzle W bytes: ((T,W/16,m),(8,k)) : ((1, T, LBO), (W/16*T, SBO))
//   MN-major no swizzle:      ((T,1,m),(8,k)) : ((1, T, SBO), (1T, LBO))
// then the swizzle Swizzle<log2(W/16),4,3> applied to the absolute shared
// address (bits [4,4+b) ^= bits [7,7+b)), base offset 0.
static bool desc_addr(uint64_t desc, bool mn_major, int mn, int k, uint32_t &out) {
    const uint32_t start = (uint32_t)(desc & 0x3fff) << 4;
    const uint32_t lbo = (uint32_t)((desc >> 16) & 0x3fff) << 4;
    const uint32_t sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
    const int mode = (int)(desc >> 62);
    const uint32_t W = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;  // swizzle bytes
    uint32_t off;
    if (!mn_major) {
        if (W) off = (mn % 8) * W + (mn / 8) * sbo + 2 * k;
        else off = (mn % 8) * 16 + (mn / 8) * sbo + 2 * (k % 8) + (k / 8) * lbo;
    } else {
        if (W) off = 2 * (mn % (W / 2)) + (mn / (W / 2)) * lbo + (k % 8) * W + (k / 8) * sbo;
        else off = 2 * (mn % 8) + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo;
    }
    uint32_t a = start + off;
    if (W) {
        const uint32_t bits = W == 128 ? 7 : W == 64 ? 3 : 1;
        a ^= ((a >> 7) & bits) << 4;
    }
    out = a;
    return true;
}

static bool check_desc(uint64_t desc, const char *which) {
    if ((desc >> 49) & 7) { FAIL("wgmma %s descriptor: non-zero base offset is not emulated", which); return false; }
    return true;
}

// Reads the operands of one wgmma from shared memory (and registers) into
// dense A[64][16], B[16][N].
static void gather(MmaOp &op, std::vector<float> &A, std::vector<float> &B, std::vector<uint32_t> *reads,
                   const uint32_t *aregs) {
    A.assign(64 * 16, 0.f);
    B.assign(16 * op.n, 0.f);
    // One report per kind and operand read, not one per element.
    int64_t outside = -1, undelivered = -1, on_mbar = -1, unfenced = -1;
    auto rd = [&](uint32_t a) -> float {
        if (a % 2 || !in_dyn(a, 2)) {
            if (outside < 0) outside = a;
            return NAN;
        }
        if ((tma_pending[a] || tma_pending[a + 1]) && undelivered < 0) undelivered = a;
        if (reads) {
            if (on_mbar < 0 && overlaps_mbar(a, 2)) on_mbar = a;
            if (unfenced < 0 && memcmp(win + a, &async_view[a], 2)) unfenced = a;
            reads->push_back(a);
        }
        uint16_t v;
        memcpy(&v, win + a, 2);
        return h2f(v, op.bf16);
    };
    if (op.a_regs) {
        // Register fragment of A (m64nNk16, 16-bit): thread t = 32w + l holds
        // a[r] = A[16w + l/4 + 8(r%2)][2(l%4) + 8(r/2) + {0,1}], low half first.
        for (int t = 0; t < 128; ++t) {
            const int w = t / 32, l = t % 32;
            for (int r = 0; r < 4; ++r) {
                const uint32_t v = aregs[t * 4 + r];
                const int row = 16 * w + l / 4 + 8 * (r % 2), col = 2 * (l % 4) + 8 * (r / 2);
                A[row * 16 + col] = h2f((uint16_t)(v & 0xffff), op.bf16);
                A[row * 16 + col + 1] = h2f((uint16_t)(v >> 16), op.bf16);
            }
        }
    } else {
        for (int m = 0; m < 64; ++m)
            for (int k = 0; k < 16; ++k) {
                uint32_t a;
                desc_addr(op.da, op.ta != 0, m, k, a);
                A[m * 16 + k] = rd(a);
            }
    }
    for (int n = 0; n < op.n; ++n)
        for (int k = 0; k < 16; ++k) {
            uint32_t a;
            desc_addr(op.db, op.tb != 0, n, k, a);
            B[k * op.n + n] = rd(a);
        }
    if (outside >= 0) FAIL("wgmma operand element at 0x%llx outside dynamic shared memory", (long long)outside);
    if (undelivered >= 0)
        FAIL("wgmma reads shared bytes at 0x%llx that an in-flight TMA copy has not delivered (waited on the wrong "
             "phase?)", (long long)undelivered);
    if (on_mbar >= 0) FAIL("wgmma operand at 0x%llx overlaps an mbarrier", (long long)on_mbar);
    if (unfenced >= 0)
        FAIL("wgmma reads shared bytes at 0x%llx that ordinary stores changed with no fence.proxy.async since: the "
             "async proxy need not see them", (long long)unfenced);
}

// D[m][n] = sa*A x sb*B + C, written to the threads' registers in the ISA's
// accumulator layout: d[4i + 2h + e] of thread 32w + l is
// D[16w + l/4 + 8h][8i + 2(l%4) + e].
static void compute(MmaOp &op, const std::vector<float> &A, const std::vector<float> &B, const float *C) {
    const int N = op.n, nd = N / 2;
    for (int t = 0; t < 128; ++t) {
        const int w = t / 32, l = t % 32;
        for (int j = 0; j < nd; ++j) {
            const int i = j / 4, h = (j / 2) % 2, e = j % 2;
            const int m = 16 * w + l / 4 + 8 * h, n = 8 * i + 2 * (l % 4) + e;
            double s = 0;
            for (int k = 0; k < 16; ++k) s += (double)(op.sa * A[m * 16 + k]) * (op.sb * B[k * N + n]);
            const double exact = (C ? (double)C[t * nd + j] : 0.0) + s;
            float r = (float)exact;
            if (opt.real_round) {
                // Tensor cores do not round each k16 step to nearest: model it as
                // truncation toward zero, then one more ulp either way, so every
                // step loses up to 2 ulp with a bias, as a long chain of them does.
                if (fabs((double)r) > fabs(exact)) r = nextafterf(r, 0.f);
                r = emu_perturb(r, 1);
            }
            *op.d[t * nd + j] = r;
        }
    }
}

static void snapshot(Track &tr) {
    tr.snap.resize(std::max(tr.fp.size(), tr.up.size()));
    for (size_t i = 0; i < tr.fp.size(); ++i) memcpy(&tr.snap[i], tr.fp[i], 4);
    for (size_t i = 0; i < tr.up.size(); ++i) tr.snap[i] = *tr.up[i];
}
static bool same_as_snapshot(const Track &tr) {
    for (size_t i = 0; i < tr.fp.size(); ++i) if (memcmp(&tr.snap[i], tr.fp[i], 4)) return false;
    for (size_t i = 0; i < tr.up.size(); ++i) if (tr.snap[i] != *tr.up[i]) return false;
    return true;
}

static void retire(WG &g, MmaOp *op) {
    const int nd = op->n / 2;
    if (opt.wgmma == WG_AT_WAIT) {
        std::vector<float> C;
        if (!op->chained) {
            for (size_t i = 0; i < op->d.size(); ++i) {
                uint32_t b;
                memcpy(&b, op->d[i], 4);
                if (b != kPoison) {
                    FAIL("accumulator registers of an in-flight wgmma were written before its wait_group (thread %zu)", i / nd);
                    break;
                }
            }
            C = op->c_issue;
        } else {
            C.resize(op->d.size());
            for (size_t i = 0; i < op->d.size(); ++i) C[i] = *op->d[i];  // the previous wgmma of the chain
        }
        std::vector<uint32_t> areg = op->a_issue;
        if (op->a_regs)
            for (size_t i = 0; i < areg.size(); ++i)
                if (op->a_ptr[i]) {
                    if (*op->a_ptr[i] != op->a_issue[i]) {
                        FAIL("A-fragment registers of an in-flight wgmma were modified before its wait_group (thread %zu)", i / 4);
                        for (size_t j = 0; j < areg.size(); ++j) if (op->a_ptr[j]) areg[j] = *op->a_ptr[j];
                        break;
                    }
                }
        std::vector<float> A, B;
        gather(*op, A, B, nullptr, areg.data());
        if (memcmp(A.data(), op->A.data(), A.size() * 4) || memcmp(B.data(), op->B.data(), B.size() * 4))
            FAIL("shared-memory operands of a wgmma changed between its issue and its wait_group");
        compute(*op, A, B, op->scale_d || op->chained ? C.data() : nullptr);
    }
    for (uint32_t a : op->reads) { wg_readers[a]--; wg_readers[a + 1]--; }
    Track &tr = g.acc[op->d[0]];
    snapshot(tr);
    tr.write_epoch = g.fence_epoch;
    tr.written = true;
    delete op;
}

static bool parse_mma(const char *mn, int &n, bool &bf16) {
    const char *s = strstr(mn, ".m64n");
    int m = 0, k = 0;
    if (!s || sscanf(s, ".m%dn%dk%d", &m, &n, &k) != 3 || m != 64 || k != 16 || n % 8 || n < 8 || n > 256) {
        FAIL("%s: only m64nNk16 shapes are emulated", mn);
        return false;
    }
    if (strstr(mn, ".f32.bf16.bf16")) bf16 = true;
    else if (strstr(mn, ".f32.f16.f16")) bf16 = false;
    else { FAIL("%s: only f32 += f16/bf16 is emulated", mn); return false; }
    return true;
}

static void issue_mma(int gi) {
    WG &g = wgs[gi];
    Lane *T = &lanes[gi * 128];
    const Lane &L0 = T[0];
    for (int t = 1; t < 128; ++t) {
        const Lane &L = T[t];
        if (strcmp(L.mn, L0.mn) || L.nd != L0.nd || L.da != L0.da || L.db != L0.db || L.scale_d != L0.scale_d ||
            L.sa != L0.sa || L.sb != L0.sb || L.ta != L0.ta || L.tb != L0.tb || L.a_regs != L0.a_regs) {
            FAIL("wgmma.mma_async operands differ across the warpgroup (thread %d vs %d): descriptors, shape and "
                 "immediates must be warpgroup-uniform", gi * 128, gi * 128 + t);
            break;
        }
    }
    MmaOp *op = new MmaOp;
    if (!parse_mma(L0.mn, op->n, op->bf16)) { delete op; return; }
    const int nd = op->n / 2;
    if (L0.nd != nd) FAIL("%s takes %d accumulator registers, got %d", L0.mn, nd, L0.nd);
    op->a_regs = L0.a_regs; op->scale_d = L0.scale_d; op->da = L0.da; op->db = L0.db;
    op->sa = L0.sa; op->sb = L0.sb; op->ta = L0.ta; op->tb = L0.tb;
    if ((op->sa != 1 && op->sa != -1) || (op->sb != 1 && op->sb != -1)) FAIL("imm-scale must be 1 or -1");
    if (op->a_regs && (L0.na != 4 || op->ta)) FAIL("A in registers: 4 registers, no transpose");
    if ((!op->a_regs && !check_desc(op->da, "A")) || !check_desc(op->db, "B")) { delete op; return; }
    stats.wgmma++;
    stats.wgmma_rs += op->a_regs;
    stats.wgmma_trans_b += op->tb != 0;
    if (g.fence_epoch == 0) FAIL("wgmma.mma_async before any wgmma.fence of this warpgroup");
    op->d.resize(128 * nd);
    for (int t = 0; t < 128; ++t)
        for (int j = 0; j < nd; ++j) op->d[t * nd + j] = T[t].dptr[j];
    if (op->a_regs) {
        op->a_issue.resize(512);
        op->a_ptr.resize(512);
        for (int t = 0; t < 128; ++t)
            for (int r = 0; r < 4; ++r) { op->a_issue[t * 4 + r] = T[t].avals[r]; op->a_ptr[t * 4 + r] = T[t].aptrs[r]; }
    }
    // Same accumulators as a wgmma still in flight: the ISA orders such a
    // chain (same shape) without a fence; the C input is that wgmma's D.
    auto in_flight = [&](auto fn) {
        for (MmaOp *o : g.open) fn(o);
        for (auto &grp : g.groups) for (MmaOp *o : grp) fn(o);
    };
    in_flight([&](MmaOp *o) {
        if (o->d[0] == op->d[0]) {
            if (o->n != op->n || o->d != op->d) FAIL("in-flight wgmmas share some but not all accumulator registers");
            op->chained = true;
        }
    });
    // wgmma.fence must separate the threads' own accesses to these registers
    // from a wgmma that uses them (ISA, wgmma.fence).
    auto it = g.acc.find(op->d[0]);
    if (!op->chained && it != g.acc.end() && it->second.written) {
        Track &tr = it->second;
        if (tr.write_epoch >= g.fence_epoch)
            FAIL("no wgmma.fence between the threads' use of a wgmma's results and the next wgmma on those accumulators");
        else if (op->scale_d && !same_as_snapshot(tr))
            FAIL("accumulator registers were modified after the last wgmma.fence and before the wgmma that reads them");
    }
    if (it == g.acc.end()) {
        Track &tr = g.acc[op->d[0]];
        tr.fp = op->d;
    }
    if (op->a_regs && op->a_ptr[0]) {
        auto ia = g.areg.find(op->a_ptr[0]);
        if (ia != g.areg.end()) {
            if (!same_as_snapshot(ia->second))
                FAIL("A-fragment registers were written after the last wgmma.fence and before the wgmma that reads them");
        } else {
            Track &tr = g.areg[op->a_ptr[0]];
            bool all = true;
            for (auto p : op->a_ptr) all &= p != nullptr;
            if (all) tr.up = op->a_ptr;
        }
        snapshot(g.areg[op->a_ptr[0]]);
    }
    gather(*op, op->A, op->B, &op->reads, op->a_issue.data());
    for (uint32_t a : op->reads) { wg_readers[a]++; wg_readers[a + 1]++; }
    if (opt.wgmma == WG_AT_ISSUE) {
        std::vector<float> C(op->d.size());
        for (size_t i = 0; i < C.size(); ++i) C[i] = *op->d[i];
        compute(*op, op->A, op->B, op->scale_d ? C.data() : nullptr);
    } else if (!op->chained) {
        op->c_issue.resize(op->d.size());
        for (size_t i = 0; i < op->d.size(); ++i) {
            op->c_issue[i] = *op->d[i];
            memcpy(op->d[i], &kPoison, 4);
        }
    }
    g.open.push_back(op);
}

static void exec_wg(int gi) {
    Lane *T = &lanes[gi * 128];
    const int op = T[0].op;
    for (int t = 1; t < 128; ++t)
        if (T[t].op != op) {
            FAIL("warpgroup %d diverged: thread %d at %s, thread %d at %s", gi, gi * 128, op_name(op), gi * 128 + t,
                 op_name(T[t].op));
            cta_abort = true;
            return;
        }
    WG &g = wgs[gi];
    switch (op) {
    case G_FENCE:
        g.fence_epoch++;
        for (auto &e : g.acc) snapshot(e.second);
        for (auto &e : g.areg) snapshot(e.second);
        break;
    case G_COMMIT:
        g.groups.push_back(g.open);
        g.open.clear();
        break;
    case G_WAIT: {
        const int n = T[0].arg;
        for (int t = 1; t < 128; ++t) if (T[t].arg != n) { FAIL("wgmma.wait_group: N differs across the warpgroup"); break; }
        if (n < 0 || n > 7) FAIL("wgmma.wait_group %d: N must be an immediate in [0, 7]", n);
        while ((int)g.groups.size() > std::max(n, 0)) {
            for (MmaOp *o : g.groups.front()) retire(g, o);
            g.groups.pop_front();
        }
        break;
    }
    case G_MMA:
        issue_mma(gi);
        break;
    case G_SETMAXNREG: {
        const uint32_t r = T[0].u;
        const bool inc = T[0].mode == 1;
        for (int t = 1; t < 128; ++t)
            if (T[t].u != r || T[t].mode != T[0].mode) { FAIL("setmaxnreg differs across the warpgroup"); break; }
        if (r % 8 || r < 24 || r > 256) FAIL("%s %u: the count must be a multiple of 8 in [24, 256]", T[0].mn, r);
        if (inc && (int)r < g.regs) FAIL("setmaxnreg.inc %u below the current %d", r, g.regs);
        if (!inc && (int)r > g.regs) FAIL("setmaxnreg.dec %u above the current %d", r, g.regs);
        const int delta = ((int)r - g.regs) * 128;
        if (inc && delta > reg_pool) return;  // waits (blocked) until registers are released
        reg_pool -= delta;
        g.regs = (int)r;
        break;
    }
    default:
        FAIL("unknown warpgroup op");
    }
    for (int t = 0; t < 128; ++t) T[t].op = OP_NONE;
    for (int t = 0; t < 128; ++t) make_runnable(gi * 128 + t);
}

// ================================================================== tensor maps and TMA
// What our launcher stores in FaTensorMap::opaque: the fields of
// cuTensorMapEncodeTiled (the real CUtensorMap is opaque, so the emulator
// cannot decode one; the kernel only passes &P.tma_x through).
struct EmuTensorMap {
    uint64_t magic;
    uint64_t addr;
    uint64_t dims[4];
    uint64_t strides[3];  // bytes, dims 1..3
    uint32_t box[4];
    uint32_t estr[4];
    uint32_t rank, esize, swizzle_bytes, interleave, oob_nan;
};
static_assert(sizeof(EmuTensorMap) <= sizeof(FaTensorMap), "fits the 128-byte map");
static const uint64_t kMapMagic = 0x50414d524f534e45ull;

// cuTensorMapEncodeTiled's documented requirements (cuda.h), for the
// subset we emulate (rank <= 4, no interleave, element strides 1).
static const char *encode_tiled(FaTensorMap *out, uint32_t esize, uint32_t rank, const void *addr, const uint64_t *dims,
                                const uint64_t *strides, const uint32_t *box, const uint32_t *estr, uint32_t swizzle_bytes) {
    if ((uintptr_t)out % 64) return "tensorMap not 64-byte aligned";
    if (rank < 1 || rank > 4) return "rank outside the emulated 1..4";
    if ((uintptr_t)addr % 16) return "globalAddress not 16-byte aligned";
    for (uint32_t i = 0; i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (1ull << 32)) return "globalDim must be in [1, 2^32]";
        if (box[i] == 0 || box[i] > 256) return "boxDim must be in [1, 256]";
        if (estr[i] != 1) return "elementStrides other than 1 are not emulated";
    }
    for (uint32_t i = 0; i + 1 < rank; ++i)
        if (strides[i] % 16 || strides[i] >= (1ull << 40)) return "globalStrides must be multiples of 16 below 2^40";
    if (box[0] * esize % 16) return "boxDim[0] * elementSize must be a multiple of 16 bytes";
    if (swizzle_bytes && box[0] * esize > swizzle_bytes) return "the box's inner dimension exceeds the swizzle span";
    EmuTensorMap m{};
    m.magic = kMapMagic;
    m.addr = (uint64_t)(uintptr_t)addr;
    m.rank = rank;
    m.esize = esize;
    m.swizzle_bytes = swizzle_bytes;
    for (uint32_t i = 0; i < rank; ++i) { m.dims[i] = dims[i]; m.box[i] = box[i]; m.estr[i] = estr[i]; }
    for (uint32_t i = 0; i + 1 < rank; ++i) m.strides[i] = strides[i];
    memset(out, 0, sizeof *out);
    memcpy(out, &m, sizeof m);
    return nullptr;
}

// Mirror of src/params.rs::tma_spec (encoded by src/device/launch.rs, one map
// per tensor from its own layout): a [B, S, H, D] tensor
// (strides in elements, batch/seq/heads) as rank 4, dims innermost first
// {D, max(S,1), H, B}, byte strides {row, head, batch} (a dimension of extent
// 1 gets the extent of what is inside it), box {64, rows, 1, 1}, 128B
// swizzle, zero fill.
static FaTensorMap encode_like_rust(const void *ptr, int64_t B, int64_t S, int64_t H, int64_t D, int64_t sb, int64_t ss,
                                    int64_t sh, uint32_t rows) {
    const uint64_t shape[3] = {(uint64_t)B, (uint64_t)S, (uint64_t)H};
    const int64_t str[3] = {sb, ss, sh};
    auto stride = [&](int i, uint64_t inner) -> uint64_t {
        if (shape[i] > 1) return (uint64_t)str[i] * 2;
        uint64_t x = std::min<uint64_t>(std::max<uint64_t>(inner, 16), (1ull << 40) - 16);
        return (x + 15) / 16 * 16;
    };
    const uint64_t s1 = std::max<uint64_t>(S, 1);
    const uint64_t row = stride(1, D * 2), head = stride(2, row * s1), batch = stride(0, head * H);
    const uint64_t dims[4] = {(uint64_t)D, s1, (uint64_t)H, (uint64_t)B};
    const uint64_t strides[3] = {row, head, batch};
    const uint32_t box[4] = {64, rows, 1, 1}, estr[4] = {1, 1, 1, 1};
    FaTensorMap m;
    if (const char *e = encode_tiled(&m, 2, 4, ptr, dims, strides, box, estr, 128)) {
        printf("  tensor map encoding rejected: %s\n", e);
        errors_total++;
        case_errors++;
    }
    return m;
}

// The block table of the running case (see emu_table_read in shim.h).
static const int32_t *table_lo = nullptr, *table_hi = nullptr;
int32_t emu_table_read(const int32_t *table, int64_t i) {
    const int32_t *e = table + i;
    if (e < table_lo || e >= table_hi) { FAIL("block_table read outside the table (entry %lld)", (long long)i); return 0; }
    if (*e < 0) FAIL("block_table entry %lld read: not a page of the sequence (-1)", (long long)i);
    return *e;
}

struct Range { const unsigned char *lo, *hi; };
static std::vector<Range> readable, writable;

struct TmaCopy {
    EmuTensorMap map;
    int32_t c[4];
    uint32_t smem, bytes, bar;
    bool empty;  // no element in bounds
    std::vector<unsigned char> before;  // the destination bytes at issue, in for_box order
};
static std::vector<TmaCopy> inflight;

static const EmuTensorMap *get_map(uint64_t p, const char *mn) {
    const EmuTensorMap *m = (const EmuTensorMap *)(uintptr_t)p;
    if (p % 64 || !m || m->magic != kMapMagic) {
        FAIL("%s: operand is not the address of a tensor map built by the launcher", mn);
        return nullptr;
    }
    return m;
}
void emu_prefetch_tensormap(const char *mn, uint64_t p) { get_map(p, mn); }

// Visits every element of the box at coords c: smem byte offset within the
// box (dense rows of box[0] elements), global address, in bounds.
template <typename F>
static void for_box(const EmuTensorMap &m, const int32_t *c, F fn) {
    uint32_t box[4] = {1, 1, 1, 1};
    for (uint32_t i = 0; i < m.rank; ++i) box[i] = m.box[i];
    const uint32_t rowbytes = box[0] * m.esize;
    uint32_t row = 0;
    for (uint32_t e3 = 0; e3 < box[3]; ++e3)
        for (uint32_t e2 = 0; e2 < box[2]; ++e2)
            for (uint32_t e1 = 0; e1 < box[1]; ++e1, ++row) {
                const int64_t x[4] = {0, (int64_t)c[1] + e1, (int64_t)c[2] + e2, (int64_t)c[3] + e3};
                bool rin = true;
                uint64_t base = m.addr;
                for (uint32_t i = 1; i < m.rank; ++i) {
                    rin &= x[i] >= 0 && x[i] < (int64_t)m.dims[i];
                    base += (uint64_t)x[i] * m.strides[i - 1];
                }
                for (uint32_t e0 = 0; e0 < box[0]; ++e0) {
                    const int64_t x0 = (int64_t)c[0] + e0;
                    const bool in = rin && x0 >= 0 && x0 < (int64_t)m.dims[0];
                    fn(row * rowbytes + e0 * m.esize, in, (const unsigned char *)(uintptr_t)(base + x0 * m.esize));
                }
            }
}
// The 128B (64B, 32B) swizzle as the hardware applies it: the 16-byte chunk
// index (address bits 4..6) XOR the row within the 1024-byte atom (bits
// 7..9) of the absolute shared address.
static uint32_t swz(uint32_t a, uint32_t W) {
    if (!W) return a;
    const uint32_t bits = W == 128 ? 7 : W == 64 ? 3 : 1;
    return a ^ (((a >> 7) & bits) << 4);
}

static void complete_tx(uint32_t a, uint32_t bytes) {
    auto it = mbars.find(a);
    if (it == mbars.end()) { FAIL("TMA completes on a barrier that no longer exists"); return; }
    MBar &b = it->second;
    b.inflight--;
    b.tx -= bytes;
    if (b.tx < 0 && b.pending == 0)
        FAIL("mbarrier #%d: tx-count underflow (%lld): more bytes completed than this phase expects", b.idx, (long long)b.tx);
    mbar_check_tx_range(b);
    mbar_maybe_complete(b);
}

static void land(TmaCopy &t) {
    const uint32_t W = t.map.swizzle_bytes;
    const bool skip = t.empty && opt.oob_skip_empty;
    size_t k = 0;
    int64_t raced = -1;
    for_box(t.map, t.c, [&](uint32_t off, bool in, const unsigned char *g) {
        const uint32_t a = swz(t.smem + off, W);
        for (uint32_t b = 0; b < t.map.esize; ++b) tma_pending[a + b]--;
        if (raced < 0 && memcmp(win + a, &t.before[k], t.map.esize)) raced = a;
        k += t.map.esize;
        if (skip) return;
        if (in) memcpy(win + a, g, t.map.esize);
        else memset(win + a, 0, t.map.esize);  // zero fill (FLOAT_OOB_FILL_NONE)
        memcpy(&async_view[a], win + a, t.map.esize);
    });
    if (raced >= 0)
        FAIL("ordinary stores wrote shared byte 0x%llx while a TMA copy into it was in flight (buffer handed back "
             "to the producer too early?)", (long long)raced);
    complete_tx(t.bar, skip ? 0 : t.bytes);
}
static void land_one(size_t i) {
    TmaCopy t = inflight[i];
    inflight.erase(inflight.begin() + i);
    land(t);
}

void emu_tma_load(const char *mn, uint32_t dst, uint64_t mp, const int32_t *c, int n, uint32_t bar) {
    if (strstr(mn, ".im2col") || strstr(mn, ".multicast") || strstr(mn, "gather4") || strstr(mn, "cache_hint")) {
        FAIL("%s: only plain tile-mode loads are emulated", mn);
        return;
    }
    if (!strstr(mn, ".mbarrier::complete_tx::bytes")) { FAIL("%s: completion mechanism not emulated", mn); return; }
    char dim[8];
    snprintf(dim, sizeof dim, ".%dd.", n);
    if (!strstr(mn, dim)) FAIL("%s: the dimension modifier disagrees with %d coordinates", mn, n);
    const EmuTensorMap *m = get_map(mp, mn);
    if (!m) return;
    if ((int)m->rank != n) { FAIL("%s: %d coordinates for a rank-%u tensor map", mn, n, m->rank); return; }
    MBar *b = get_mbar(bar, mn);
    if (!b) return;
    if (!b->fenced) FAIL("%s: mbarrier #%d is used by the async proxy without fence.mbarrier_init after its init", mn, b->idx);
    uint32_t bytes = m->esize;
    for (uint32_t i = 0; i < m->rank; ++i) bytes *= m->box[i];
    if (dst % 128 || (m->swizzle_bytes == 128 && dst % 1024)) {
        FAIL("%s: shared destination 0x%x is not aligned to 128 bytes (1024 with 128B swizzle)", mn, dst);
        return;
    }
    if (m->swizzle_bytes && m->box[0] * m->esize != m->swizzle_bytes) {
        FAIL("%s: boxes narrower than the swizzle span are not emulated", mn);
        return;
    }
    if (!in_dyn(dst, bytes)) { FAIL("%s: box of %u bytes at 0x%x outside dynamic shared memory", mn, bytes, dst); return; }
    if (overlaps_mbar(dst, bytes)) FAIL("%s: box at 0x%x overlaps an mbarrier", mn, dst);
    TmaCopy t;
    t.map = *m;
    memcpy(t.c, c, 4 * n);
    for (int i = n; i < 4; ++i) t.c[i] = 0;
    t.smem = dst; t.bytes = bytes; t.bar = bar;
    long in_count = 0, total = 0;
    bool war = false, waw = false, oob_read = false, unfenced = false;
    for_box(t.map, t.c, [&](uint32_t off, bool in, const unsigned char *g) {
        const uint32_t a = swz(dst + off, m->swizzle_bytes);
        for (uint32_t k = 0; k < m->esize; ++k) {
            war |= wg_readers[a + k] != 0;
            waw |= tma_pending[a + k] != 0;
            unfenced |= win[a + k] != async_view[a + k];
            tma_pending[a + k]++;
            t.before.push_back(win[a + k]);
        }
        total++;
        if (in) {
            in_count++;
            bool ok = false;
            for (auto &r : readable) ok |= g >= r.lo && g + m->esize <= r.hi;
            oob_read |= !ok;
        }
    });
    if (war) FAIL("%s: overwrites shared memory that an in-flight wgmma still reads (slot released too early?)", mn);
    if (waw) FAIL("%s: overwrites shared memory another in-flight TMA copy is writing", mn);
    if (unfenced)
        FAIL("%s: overwrites shared bytes that ordinary stores changed with no fence.proxy.async since (the two "
             "proxies' writes are unordered)", mn);
    if (oob_read) FAIL("%s: reads global memory outside the Q/K/V tensors (coords %d,%d,%d,%d)", mn, c[0], c[1], c[2], c[3]);
    t.empty = in_count == 0;
    stats.tma++;
    stats.tma_partial += in_count && in_count < total;
    stats.tma_empty += t.empty;
    b->inflight++;
    if (opt.tma == TMA_EAGER) land(t);
    else inflight.push_back(t);
    maybe_yield();
}

// TMA stores (smem -> global, bulk-group completion): not used by today's
// kernel; emulated so an epilogue through tma_o would run, with writes
// limited to the O view.
struct StoreOp { EmuTensorMap map; int32_t c[4]; uint32_t src; };
static std::vector<StoreOp> stores;
static void do_store(const StoreOp &s) {
    for_box(s.map, s.c, [&](uint32_t off, bool in, const unsigned char *g) {
        const uint32_t a = swz(s.src + off, s.map.swizzle_bytes);
        if (!in) return;  // out-of-bounds elements are not written
        bool ok = false;
        for (auto &r : writable) ok |= g >= r.lo && g + s.map.esize <= r.hi;
        if (!ok) { FAIL("TMA store writes global memory outside O"); return; }
        memcpy((void *)g, win + a, s.map.esize);
    });
}
void emu_tma_store(const char *mn, uint64_t mp, const int32_t *c, int n, uint32_t src) {
    if (!strstr(mn, ".bulk_group")) { FAIL("%s: only bulk_group stores are emulated", mn); return; }
    const EmuTensorMap *m = get_map(mp, mn);
    if (!m || (int)m->rank != n) return;
    uint32_t bytes = m->esize;
    for (uint32_t i = 0; i < m->rank; ++i) bytes *= m->box[i];
    if (src % 128 || !in_dyn(src, bytes)) { FAIL("%s: bad shared source 0x%x", mn, src); return; }
    StoreOp s{*m, {0, 0, 0, 0}, src};
    memcpy(s.c, c, 4 * n);
    if (opt.tma == TMA_EAGER) { do_store(s); return; }
    stores.push_back(s);
    lanes[cur].bulk_open.push_back((int)stores.size() - 1);
}
void emu_bulk_commit(const char *) {
    Lane &L = lanes[cur];
    L.bulk_groups.push_back(L.bulk_open);
    L.bulk_open.clear();
}
void emu_bulk_wait(const char *, int n) {
    Lane &L = lanes[cur];
    while ((int)L.bulk_groups.size() > n) {
        for (int i : L.bulk_groups.front()) do_store(stores[i]);
        L.bulk_groups.pop_front();
    }
}

float emu_ex2_approx(const char *mn, float x) {
    // ex2.approx.ftz: subnormal inputs and results flush to zero.
    if (strstr(mn, ".ftz") && std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
    float y = exp2f(x);
    if (strstr(mn, ".ftz") && std::fpclassify(y) == FP_SUBNORMAL) y = 0.f;
    // PTX ISA (ex2): "The maximum ulp error is 2 ulp from correctly rounded
    // result across the full range of inputs"; --round=real takes all of it.
    return emu_perturb(y, 2);
}
float emu_tanh_approx(const char *, float x) { return tanhf(x); }

// ================================================================== scheduler
static void deadlock_report() {
    printf("  EMU DEADLOCK [%s]: every live thread is blocked and no copy is in flight\n", cta_desc);
    for (int w = 0; w < nthreads / 32; ++w) {
        std::map<std::string, int> what;
        for (int l = 0; l < 32; ++l) {
            const Lane &L = lanes[w * 32 + l];
            char buf[240];
            switch (L.st) {
            case DONE: snprintf(buf, sizeof buf, "exited"); break;
            case BLK_WARP: snprintf(buf, sizeof buf, "at warp collective %s", op_name(L.op)); break;
            case BLK_WG:
                snprintf(buf, sizeof buf, "at warpgroup collective %s (%d of 128 threads there)%s", op_name(L.op),
                         wg_blk[w / 4], L.op == G_SETMAXNREG ? " waiting for registers" : "");
                break;
            case BLK_NBAR: snprintf(buf, sizeof buf, "in bar.sync %u (%d of %d threads arrived)", L.id,
                                    nbars[L.id].arrived, nbars[L.id].count); break;
            case BLK_MBAR: {
                const MBar &b = mbars[L.wbar];
                snprintf(buf, sizeof buf,
                         "in mbarrier.try_wait parity %llu on mbarrier #%d (smem 0x%x): phase %lld, %lld of %u "
                         "arrivals pending, tx-count %lld",
                         (unsigned long long)L.wparity, b.idx, L.wbar, (long long)b.phase, (long long)b.pending,
                         b.expected, (long long)b.tx);
                break;
            }
            default: snprintf(buf, sizeof buf, "runnable"); break;
            }
            what[buf]++;
        }
        for (auto &e : what) printf("    warp %2d (warpgroup %d): %2d lanes %s\n", w, w / 4, e.second, e.first.c_str());
    }
}

static void after_block(int id) {
    Lane &L = lanes[id];
    const int w = id / 32, g = id / 128;
    if (L.st == BLK_WARP) warp_blk[w]++;
    if (L.st == BLK_WG) wg_blk[g]++;
    if (L.st == DONE) { warp_done[w]++; wg_done[g]++; }
    if (warp_blk[w] && warp_blk[w] + warp_done[w] == 32) {
        if (warp_done[w]) {
            FAIL("warp %d: a full-warp collective (%s) while %d lanes have exited", w, op_name(lanes[w * 32 + (id % 32)].op), warp_done[w]);
            cta_abort = true;
            return;
        }
        warp_blk[w] = 0;
        exec_warp(w);
    }
    if (wg_blk[g] && wg_blk[g] + wg_done[g] == 128) {
        if (wg_done[g]) {
            FAIL("warpgroup %d: a warpgroup collective while %d threads have exited", g, wg_done[g]);
            cta_abort = true;
            return;
        }
        wg_blk[g] = 0;
        exec_wg(g);
        if (lanes[g * 128].st == BLK_WG) wg_blk[g] = 128;  // setmaxnreg.inc still waiting
    }
}

static void retry_setmaxnreg() {
    for (size_t g = 0; g < wgs.size(); ++g)
        if (wg_blk[g] == 128 && lanes[g * 128].op == G_SETMAXNREG) {
            wg_blk[g] = 0;
            exec_wg((int)g);
            if (lanes[g * 128].st == BLK_WG) wg_blk[g] = 128;
        }
}

static void alloc_stacks(int n) {
    while ((int)stacks.size() < n) {
        const long page = sysconf(_SC_PAGESIZE);
        char *p = (char *)mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { perror("mmap"); exit(2); }
        mprotect(p, page, PROT_NONE);  // overflow guard
        stacks.push_back(p + page);
    }
}

// Runs one CTA to completion; false if it had to be abandoned.
static bool run_cta(int threads, int regs_at_launch) {
    nthreads = threads;
    lanes.assign(threads, Lane());
    alloc_stacks(threads);
    runq.clear();
    warp_blk.assign(threads / 32, 0); warp_done.assign(threads / 32, 0);
    wg_blk.assign((threads + 127) / 128, 0); wg_done.assign((threads + 127) / 128, 0);
    wgs.assign((threads + 127) / 128, WG());
    for (auto &g : wgs) g.regs = regs_at_launch;
    reg_pool = 0;
    mbars.clear();
    bar_gen = 0;
    for (auto &b : nbars) b = NBar();
    inflight.clear();
    stores.clear();
    cta_abort = false;
    for (int i = 0; i < threads; ++i) {
        Lane &L = lanes[i];
        getcontext(&L.ctx);
        L.ctx.uc_stack.ss_sp = stacks[i];
        L.ctx.uc_stack.ss_size = kStack;
        L.ctx.uc_link = nullptr;
        makecontext(&L.ctx, lane_main, 0);
        runq.push_back(i);
    }
    stats.ctas++;
    for (;;) {
        if (cta_abort) return false;
        if (!inflight.empty() && opt.tma == TMA_RANDOM && rnd(8) == 0) land_one(rnd(inflight.size()));
        if (runq.empty()) {
            int done = 0;
            for (auto &L : lanes) done += L.st == DONE;
            if (done == threads && !inflight.empty())
                FAIL("CTA exits with %zu TMA copies in flight that no thread waited for", inflight.size());
            if (!inflight.empty()) {  // nothing else can happen: a copy lands
                land_one(opt.shuffle ? rnd(inflight.size()) : 0);
                continue;
            }
            if (done == threads) break;
            deadlock_report();
            errors_total++;
            case_errors++;
            return false;
        }
        const size_t k = opt.shuffle ? rnd(runq.size()) : 0;
        const int id = runq[k];
        runq[k] = runq.back();
        runq.pop_back();
        if (lanes[id].st != RUN) continue;
        const int pool_before = reg_pool;
        cur = id;
        swapcontext(&sched_ctx, &lanes[id].ctx);
        cur = -1;
        if (lanes[id].st != RUN) after_block(id);
        if (reg_pool != pool_before) retry_setmaxnreg();
    }
    // Everything asynchronous must be finished when the CTA exits.
    for (auto &g : wgs)
        if (!g.open.empty() || !g.groups.empty()) FAIL("CTA exits with wgmma operations not retired by a wait_group");
    for (auto &L : lanes)
        if (!L.bulk_open.empty() || !L.bulk_groups.empty()) FAIL("CTA exits with TMA stores not waited for");
    for (int i = 0; i < 16; ++i)
        if (nbars[i].arrived) FAIL("named barrier %d left with %d of %d threads arrived", i, nbars[i].arrived, nbars[i].count);
    for (auto &e : mbars) {
        if (!mbar_sign_ok(e.first, e.second)) FAIL("mbarrier #%d overwritten by an ordinary store", e.second.idx);
        if (e.second.tx) FAIL("mbarrier #%d: CTA exits with tx-count %lld (bytes expected, never delivered)", e.second.idx, (long long)e.second.tx);
    }
    return true;
}

// ================================================================== harness
struct Kern { const char *name; void (*fn)(FaFwdSm90Params); bool bf16; int hd, bm, bn, threads, smem, grid; };
#define EMU_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid) \
    {#name, name, std::is_same<FA_DTYPE(dtype), __nv_bfloat16>::value, head_dim, block_m, block_n, threads, smem, grid},
static Kern kerns[] = {
#include "kernels/sm90_table.inc"
};

static uint16_t f2h(float f, bool bf16) {
    uint16_t u;
    if (bf16) { __nv_bfloat16 b = __float2bfloat16_rn(f); memcpy(&u, &b, 2); }
    else { __half h = __float2half_rn(f); memcpy(&u, &h, 2); }
    return u;
}

enum { LAY_BSHD, LAY_BHSD, LAY_SBHD };
static const char *lay_name(int k) { return k == LAY_BSHD ? "BSHD" : k == LAY_BHSD ? "BHSD" : "SBHD"; }
struct Case {
    int B, Hq, Hk, Lq, Lk, D, wl, wr;
    float softcap;
    int layout;  // LAY_*: BSHD (0, false), BHSD (1, true) or SBHD
    int pad;    // extra elements per row / head slot: non-contiguous strides
    float amp;  // input amplitude
    bool lse;
    const char *what;
    bool top_left = false;  // mask aligned to the top-left corner instead of bottom-right
    float scale = 0.f;  // 0: the default 1/sqrt(D)
    // Every tensor its own layout: Q, K, V, O take the layouts (layout + t) % 3
    // of BSHD, BHSD, SBHD and pad + 8t extra elements per row, so no two of
    // them share a batch, row or head stride (a kernel that addresses one
    // tensor with another's strides reads or writes the wrong elements).
    bool own = false;
    // Score modifiers (DESIGN.md 1b): ALiBi (MOD_NONE, ALIBI_HEAD, ALIBI_BATCH)
    // with slopes `alibi_x` times the usual 2^(-8(h+1)/Hq), and a sink per
    // query head (MOD_NONE, SINK_NORMAL, SINK_DOMINANT); see make_modifiers.
    int alibi = 0;
    float alibi_x = 1.f;
    int sinks = 0;
};

// ALiBi slopes and sink logits of a case, and the pointers the kernel and the
// f64 check take. ALIBI_HEAD: [Hq], the usual geometric slopes
// 2^(-8(h+1)/Hq) times `x`; ALIBI_BATCH: [B, Hq] at a padded batch stride
// (Hq + 3, NaN in the gaps: a kernel that ignores the stride or reads past a
// row gets NaN), each entry's slopes varied by up to +-50 %. SINK_NORMAL:
// N(0, 2) logits; SINK_DOMINANT: 8 + h / 4, above every row's sum of
// scores here (e^8 ~ 3000 keys' worth of e^0), so O shrinks and LSE ~ sink.
enum { MOD_NONE = 0, ALIBI_HEAD = 1, ALIBI_BATCH = 2, SINK_NORMAL = 1, SINK_DOMINANT = 2 };
struct Modifiers {
    std::vector<float> slopes, sinks;
    int64_t alibi_bs = 0;
    const float *alibi() const { return slopes.empty() ? nullptr : slopes.data(); }
    const float *sink() const { return sinks.empty() ? nullptr : sinks.data(); }
};
static Modifiers make_modifiers(int alibi, float x, int sinks, int B, int Hq, std::mt19937 &g) {
    Modifiers m;
    std::uniform_real_distribution<float> vary(0.5f, 1.5f);
    if (alibi == ALIBI_HEAD) {
        for (int h = 0; h < Hq; ++h) m.slopes.push_back(x * exp2f(-8.f * (h + 1) / Hq));
    } else if (alibi == ALIBI_BATCH) {
        m.alibi_bs = Hq + 3;
        m.slopes.assign((size_t)B * m.alibi_bs, NAN);
        for (int b = 0; b < B; ++b)
            for (int h = 0; h < Hq; ++h) m.slopes[b * m.alibi_bs + h] = x * exp2f(-8.f * (h + 1) / Hq) * vary(g);
    }
    std::normal_distribution<float> normal(0.f, 2.f);
    for (int h = 0; h < Hq && sinks; ++h) m.sinks.push_back(sinks == SINK_NORMAL ? normal(g) : 8.f + 0.25f * h);
    return m;
}
static std::string modifiers_desc(const Modifiers &m) {
    std::string d;
    if (m.alibi()) d += m.alibi_bs ? " alibi[B,H]" : " alibi[H]";
    if (m.sink()) d += " sinks";
    return d;
}

static void alarm_handler(int) {
    const char msg[] = "EMU WATCHDOG: a case ran too long (a thread spinning without ever waiting?)\n";
    if (write(1, msg, sizeof msg - 1) < 0) {}
    _exit(3);
}

// Runs every CTA of `grid` (shuffled shared base, NaN-filled dynamic shared
// memory, the launch's register budget). False if a CTA was abandoned.
static bool launch_grid(const Kern &kn, const FaFwdSm90Params &P, uint3 grid) {
    // The shared window: [0, dyn_off) stands for whatever precedes the
    // dynamic array, then the table's dynamic bytes, then a guard.
    static unsigned char *window = nullptr;
    const uint32_t win_bytes = 1024 + 256 * 1024 + kGuard;
    if (!window) window = (unsigned char *)aligned_alloc(4096, win_bytes);
    win = window;
    dyn_size = kn.smem;
    tma_pending.assign(win_bytes, 0);
    async_view.assign(win_bytes, 0);
    wg_readers.assign(win_bytes, 0);
    kernel_fn = kn.fn;
    kernel_params = P;
    gridDim = grid;
    const int regs_at_launch = (65536 / kn.threads) / 8 * 8;  // __launch_bounds__(threads, 1)
    blockDim = make_uint3(kn.threads, 1, 1);
    bool ran_ok = true;
    alarm(120);
    for (unsigned z = 0; z < gridDim.z && ran_ok; ++z)
        for (unsigned y = 0; y < gridDim.y && ran_ok; ++y)
            for (unsigned x = 0; x < gridDim.x && ran_ok; ++x) {
                dyn_off = opt.shuffle ? 16 * rnd(64) : 0;
                memset(win, 0xab, win_bytes);
                memset(win + dyn_off, 0xff, dyn_size);  // garbage (f16/bf16 NaN) in every CTA
                memcpy(async_view.data(), win, win_bytes);  // both proxies agree at launch
                blockIdx = make_uint3(x, y, z);
                snprintf(cta_desc, sizeof cta_desc, "%s CTA (%u,%u,%u)", kn.name, x, y, z);
                ran_ok = run_cta(kn.threads, regs_at_launch);
                for (uint32_t i = 0; i < win_bytes; ++i)
                    if ((i < dyn_off || i >= dyn_off + dyn_size) && win[i] != 0xab) {
                        FAIL("ordinary store to shared memory outside the dynamic allocation (offset %d)", (int)i - (int)dyn_off);
                        break;
                    }
            }
    alarm(0);
    return ran_ok;
}

static bool run_case_on(const Kern &kn, const Case &cs, unsigned seed) {
    case_errors = 0;
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const bool bf16 = kn.bf16;
    // Strides in elements of tensor t (0 Q, 1 K, 2 V, 3 O). BSHD: row =
    // H*(D+pad); BHSD: row = D+pad; SBHD: batch = H*(D+pad) + 8 pad, row =
    // B*batch. Padding between batches / heads too, so that no stride is the
    // product of the others.
    int lay[4];
    auto strides = [&](int t, int H, int L, int64_t &bs, int64_t &rs, int64_t &hs) {
        const int pad = cs.pad + (cs.own ? 8 * t : 0);
        const int kind = lay[t] = cs.own ? (cs.layout + t) % 3 : cs.layout;
        const int64_t rowlen = cs.D + pad;
        if (kind == LAY_BSHD) { hs = rowlen; rs = H * rowlen; bs = (int64_t)L * rs + 8 * pad; }
        else if (kind == LAY_BHSD) { rs = rowlen; hs = (int64_t)L * rowlen + 8 * pad; bs = H * hs; }
        else { hs = rowlen; bs = H * rowlen + 8 * pad; rs = cs.B * bs; }
    };
    int64_t qb, qr, qh, kb, kr, kh, vb, vr, vh, ob, orr, oh;
    strides(0, cs.Hq, cs.Lq, qb, qr, qh);
    strides(1, cs.Hk, cs.Lk, kb, kr, kh);
    strides(2, cs.Hk, cs.Lk, vb, vr, vh);
    strides(3, cs.Hq, cs.Lq, ob, orr, oh);
    // Exactly the elements the views span (plus nothing): any TMA read past
    // them is outside the tensor.
    auto span = [&](int H, int L, int64_t bs, int64_t rs, int64_t hs) -> size_t {
        if (L == 0) return 8;
        return (size_t)((cs.B - 1) * bs + (int64_t)(L - 1) * rs + (int64_t)(H - 1) * hs + cs.D);
    };
    const size_t qn = span(cs.Hq, cs.Lq, qb, qr, qh), kn_ = span(cs.Hk, cs.Lk, kb, kr, kh),
                 vn = span(cs.Hk, cs.Lk, vb, vr, vh);
    auto alloc16 = [](size_t n) { return std::vector<uint16_t>(n + 8); };
    std::vector<uint16_t> qv = alloc16(qn), kv = alloc16(kn_), vv = alloc16(vn);
    // 16-byte aligned bases, as the Rust side requires for TMA.
    auto base16 = [](std::vector<uint16_t> &v) { return v.data() + ((16 - (uintptr_t)v.data() % 16) % 16) / 2; };
    uint16_t *q = base16(qv), *k = base16(kv), *v = base16(vv);
    for (size_t i = 0; i < qn; ++i) q[i] = f2h(U(g) * cs.amp, bf16);
    for (size_t i = 0; i < kn_; ++i) k[i] = f2h(U(g) * cs.amp, bf16);
    for (size_t i = 0; i < vn; ++i) v[i] = f2h(U(g), bf16);
    const size_t on = span(cs.Hq, cs.Lq, ob, orr, oh);
    // Guards around O and LSE as large as a tile's rows past the end could
    // reach (the kernel's ordinary stores run natively: a write beyond the
    // guards would corrupt the emulator's heap instead of being counted).
    const int64_t o_guard = 64 + (int64_t)kn.bm * std::max<int64_t>(orr, cs.D);
    const int guard = 64 + kn.bm;
    std::vector<uint16_t> ov(on + 2 * o_guard + 8, 0xffff);
    uint16_t *O = ov.data() + o_guard + ((16 - (uintptr_t)(ov.data() + o_guard) % 16) % 16) / 2;
    // LSE [B, Hq, Lq] with unit row stride; with own layouts, padded head
    // and batch strides (gaps that must keep their NaN).
    const int64_t lse_hs = cs.Lq + (cs.own ? 8 : 0), lse_bs = cs.Hq * lse_hs + (cs.own ? 24 : 0);
    std::vector<float> lse((size_t)((cs.B - 1) * lse_bs + (cs.Hq - 1) * lse_hs + cs.Lq) + 2 * guard, NAN);
    float *LSE = lse.data() + guard;

    readable = {{(const unsigned char *)q, (const unsigned char *)(q + qn)},
                {(const unsigned char *)k, (const unsigned char *)(k + kn_)},
                {(const unsigned char *)v, (const unsigned char *)(v + vn)}};
    writable = {{(const unsigned char *)O, (const unsigned char *)(O + on)}};

    FaFwdSm90Params P;
    memset(&P, 0, sizeof P);
    FaFwdParams &p = P.p;
    p.q = q; p.k = k; p.v = v; p.o = O; p.lse = cs.lse ? LSE : nullptr;
    p.q_batch_stride = qb; p.q_row_stride = qr; p.q_head_stride = qh;
    p.k_batch_stride = kb; p.k_row_stride = kr; p.k_head_stride = kh;
    p.v_batch_stride = vb; p.v_row_stride = vr; p.v_head_stride = vh;
    p.o_batch_stride = ob; p.o_row_stride = orr; p.o_head_stride = oh;
    p.batch = cs.B; p.heads_q = cs.Hq; p.heads_kv = cs.Hk; p.q_per_kv = cs.Hq / cs.Hk;
    p.seqlen_q = cs.Lq; p.seqlen_k = cs.Lk; p.head_dim = cs.D;
    p.diag_offset = cs.top_left ? 0 : cs.Lk - cs.Lq;  // bottom-right unless the case says top-left
    p.lse_batch_stride = lse_bs; p.lse_head_stride = lse_hs;
    // The host clamps finite windows to at most Lq + Lk (params.h).
    p.window_left = cs.wl < 0 ? -1 : std::min(cs.wl, cs.Lq + cs.Lk);
    p.window_right = cs.wr < 0 ? -1 : std::min(cs.wr, cs.Lq + cs.Lk);
    p.scale = cs.scale != 0.f ? cs.scale : 1.f / sqrtf((float)cs.D); p.softcap = cs.softcap;
    const Modifiers mods = make_modifiers(cs.alibi, cs.alibi_x, cs.sinks, cs.B, cs.Hq, g);
    p.alibi_slopes = mods.alibi(); p.alibi_batch_stride = mods.alibi_bs; p.sinks = mods.sink();
    P.tma_q = encode_like_rust(q, cs.B, cs.Lq, cs.Hq, cs.D, qb, qr, qh, kn.bm);
    P.tma_k = encode_like_rust(k, cs.B, cs.Lk, cs.Hk, cs.D, kb, kr, kh, kn.bn);
    P.tma_v = encode_like_rust(v, cs.B, cs.Lk, cs.Hk, cs.D, vb, vr, vh, kn.bn);
    P.tma_o = encode_like_rust(O, cs.B, cs.Lq, cs.Hq, cs.D, ob, orr, oh, kn.bm);

    uint3 grid;
    const int m_tiles = (cs.Lq + kn.bm - 1) / kn.bm;
    if (kn.grid == FA_GRID_PERSISTENT) {
        const int tiles = m_tiles * cs.Hq * cs.B;
        grid = make_uint3(std::min(opt.sms, tiles), 1, 1);
        // Coverage: CTAs that loop, and whether some row blocks see no key
        // at all (from the case's band, not from the kernel's schedule).
        if (tiles > (int)grid.x) {
            stats.persistent_multi++;
            int keyless = 0;
            for (int mb = 0; mb < m_tiles; ++mb) {
                bool any = false;
                for (int i = mb * kn.bm; i < std::min(cs.Lq, (mb + 1) * kn.bm) && !any; ++i) {
                    const int off = p.diag_offset;
                    const int lo = std::max(0, cs.wl < 0 ? 0 : i + off - cs.wl);
                    const int hi = std::min(cs.Lk, cs.wr < 0 ? cs.Lk : i + off + cs.wr + 1);
                    any = lo < hi;
                }
                keyless += !any;
            }
            stats.persistent_mixed += keyless > 0 && keyless < m_tiles;
        }
    } else {
        grid = make_uint3(m_tiles, cs.Hq, cs.B);
    }
    const bool ran_ok = launch_grid(kn, P, grid);

    // f64 reference
    EmuProblem ep{cs.B, cs.Hq, cs.Hk, cs.Lq, cs.Lk, cs.D, cs.wl, cs.wr, (double)p.scale, (double)cs.softcap, bf16, cs.lse,
                  q, k, v, O, LSE, qb, qr, qh, kb, kr, kh, vb, vr, vh, ob, orr, oh};
    ep.top_left = cs.top_left;
    ep.alibi = mods.alibi(); ep.alibi_bs = mods.alibi_bs; ep.sinks = mods.sink();
    ep.lseb = lse_bs;  // check.h reads the strided LSE and checks its gaps and guards
    ep.lseh = lse_hs;
    const EmuCheck chk = emu_check_against_reference(ep, true);
    bool ok = ran_ok && chk.ok;
    // Outside the view and LSE's guards everything keeps its poison.
    const long stray = emu_count_stray(ep, ov.data(), ov.size(), lse, guard);
    if (stray) { ok = false; printf("  %ld stray writes outside O's view / LSE\n", stray); }
    const double rel = chk.rel();
    // Which checks failed, named on the FAIL line (the negative control's table).
    std::string checks;
    auto failed = [&](const char *what) { checks += checks.empty() ? "" : ", "; checks += what; ok = false; };
    if (!ran_ok) failed("run abandoned");
    if (case_errors) failed("emulator errors");
    if (!chk.ok) failed("non-finite O / empty-row O or LSE");
    if (stray) failed("stray writes");
    if (!(rel <= emu_o_tol(bf16))) failed("O rel L2");
    if (!(chk.row_rel <= emu_row_tol(bf16))) failed("O worst row");
    if (cs.lse && !(chk.lse_rel <= kEmuLseTol)) failed("LSE");
    const std::string why = checks.empty() ? "" : " [failed: " + checks + "]";
    char layout[32];
    if (cs.own) snprintf(layout, sizeof layout, "%s/%s/%s/%s", lay_name(lay[0]), lay_name(lay[1]), lay_name(lay[2]), lay_name(lay[3]));
    else snprintf(layout, sizeof layout, "%s", lay_name(lay[0]));
    printf("%-4s %-24s %-24s B%d Hq%d Hk%d Lq%4d Lk%4d D%3d w(%d,%d) scale %.3g cap %.3g%s %s pad%d amp%.0f lse%d: rel %.2e row %.2e lse %.2e%s\n",
           ok ? "ok" : "FAIL", kn.name, cs.what, cs.B, cs.Hq, cs.Hk, cs.Lq, cs.Lk, cs.D, cs.wl, cs.wr, (double)p.scale,
           (double)cs.softcap, modifiers_desc(mods).c_str(), layout, cs.pad, cs.amp, cs.lse, rel, chk.row_rel,
           chk.lse_rel, why.c_str());
    if (!ok && opt.stop_on_fail) {
        printf("first failing case: %s, %s: %s\n", kn.name, cs.what, checks.c_str());
        printf("--stop-on-fail: 1 failing case, %ld emulator errors\n", errors_total);
        fflush(stdout);
        _exit(1);
    }
    fflush(stdout);
    return ok;
}

// Packed (varlen) batches and KV caches (DESIGN.md section 1b), through the
// same maps the Rust launcher encodes: a packed tensor is one batch entry of
// all tokens, a dense cache [entries, L_max, Hk, D] is read through
// cache_batch_idx (every sequence in another entry), a paged one
// [pages, page, Hk, D] through a shuffled block table (unused entries -1).
// Keys no sequence may see hold NaN: a packed sequence's rows past its
// seqused_k, a cache's unwritten slots. The last key tile of a sequence
// reads them (or the next sequence's keys), so a kernel that lets one into
// P V shows it in O. CTAs run in grid order; each sequence is checked as a
// rectangular problem of its own, and nothing outside the views is written.
struct SeqCase {
    const char *what;
    int mode;                       // 0 packed, 1 dense cache, 2 paged cache
    std::vector<int> lq, lk, used;  // packed: per sequence (used: seqused_k or empty);
                                    // caches: lk = cache_seqlens, lq = {Lq}
    int page;                       // paged: keys per page
    int Hq, Hk, D, wl, wr;
    float softcap, scale;
    bool top_left;
    int alibi = MOD_NONE;  // as Case's: per head or per sequence (ALIBI_BATCH: [B, Hq])
    float alibi_x = 1.f;
    int sinks = MOD_NONE;
};

static bool run_seq_on(const Kern &kn, const SeqCase &sc, unsigned seed) {
    case_errors = 0;
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const bool bf16 = kn.bf16, packed = sc.mode == 0, paged = sc.mode == 2;
    const int B = (int)sc.lk.size(), D = sc.D;
    std::vector<int> lq(B), keys(B), cu_q(B + 1, 0), cu_k(B + 1, 0);
    int max_q = 0, max_k = 0, l_max = 1;
    for (int b = 0; b < B; ++b) {
        lq[b] = packed ? sc.lq[b] : sc.lq[0];
        keys[b] = packed && !sc.used.empty() ? sc.used[b] : sc.lk[b];
        cu_q[b + 1] = cu_q[b] + lq[b];
        cu_k[b + 1] = cu_k[b] + sc.lk[b];
        max_q = std::max(max_q, lq[b]);
        max_k = std::max(max_k, keys[b]);
        l_max = std::max(l_max, sc.lk[b] + 5);  // dense caches: slack past the longest
    }
    // Every tensor its own padded strides (multiples of 16 bytes, as TMA needs).
    const int64_t qhs = D + 8, qrs = sc.Hq * qhs + 8, ohs = D + 16, ors = sc.Hq * ohs + 24;
    const int64_t khs = D + 24, krs = sc.Hk * khs + 8, vhs = D + 8, vrs = sc.Hk * vhs + 40;
    // Q and O: packed [Tq, Hq, D] or [B, Lq, Hq, D].
    const int qB = packed ? 1 : B, qL = packed ? cu_q[B] : sc.lq[0];
    const int64_t qbs = packed ? 0 : qL * qrs + 64, obs = packed ? 0 : qL * ors + 128;
    // K and V: `entries` batch entries of `rows` rows.
    int entries, rows, per_seq = 0;
    std::vector<int> table, idx;
    if (packed) { entries = 1; rows = std::max(cu_k[B], 1); }
    else if (paged) {
        rows = sc.page;
        per_seq = (l_max + sc.page - 1) / sc.page + 1;  // a spare -1 entry ends every row
        entries = B * per_seq + 2;
        std::vector<int> ids(entries);
        for (int i = 0; i < entries; ++i) ids[i] = i;
        std::shuffle(ids.begin(), ids.end(), g);
        table.assign(B * per_seq, -1);
        for (int b = 0; b < B; ++b)
            for (int j = 0; j < (sc.lk[b] + sc.page - 1) / sc.page; ++j) table[b * per_seq + j] = ids[b * per_seq + j];
    } else {
        entries = B + 1;
        rows = l_max;
        idx.resize(B);
        for (int b = 0; b < B; ++b) idx[b] = (b + 1) % entries;
    }
    const int64_t kbs = rows * krs + 64, vbs = rows * vrs + 32;
    auto alloc16 = [](size_t n) { return std::vector<uint16_t>(n + 16, 0xffff); };
    auto base16 = [](std::vector<uint16_t> &v) { return v.data() + ((16 - (uintptr_t)v.data() % 16) % 16) / 2; };
    const size_t qn = (size_t)(qB - 1) * qbs + (size_t)qL * qrs, kn_ = (size_t)entries * kbs, vn = (size_t)entries * vbs;
    std::vector<uint16_t> qv = alloc16(qn), kv = alloc16(kn_), vv = alloc16(vn);
    uint16_t *q = base16(qv), *k = base16(kv), *v = base16(vv);
    for (int b = 0; b < qB; ++b)
        for (int i = 0; i < qL; ++i)
            for (int h = 0; h < sc.Hq; ++h)
                for (int d = 0; d < D; ++d) q[b * qbs + i * qrs + h * qhs + d] = f2h(U(g), bf16);
    // Keys and values through the tables; dense per-sequence copies for the reference.
    std::vector<std::vector<uint16_t>> kd(B), vd(B);
    for (int b = 0; b < B; ++b) {
        kd[b].assign((size_t)std::max(keys[b], 1) * sc.Hk * D, 0);
        vd[b].assign(kd[b].size(), 0);
        for (int j = 0; j < keys[b]; ++j) {
            int64_t e, r;
            if (packed) e = 0, r = cu_k[b] + j;
            else if (paged) e = table[b * per_seq + j / sc.page], r = j % sc.page;
            else e = idx[b], r = j;
            for (int h = 0; h < sc.Hk; ++h)
                for (int d = 0; d < D; ++d) {
                    const uint16_t kx = f2h(U(g), bf16), vx = f2h(U(g), bf16);
                    k[e * kbs + r * krs + h * khs + d] = kx;
                    v[e * vbs + r * vrs + h * vhs + d] = vx;
                    kd[b][((size_t)j * sc.Hk + h) * D + d] = kx;
                    vd[b][((size_t)j * sc.Hk + h) * D + d] = vx;
                }
        }
    }
    const size_t on = (size_t)(qB - 1) * obs + (size_t)qL * ors;
    const int64_t o_guard = 64 + (int64_t)kn.bm * ors;
    std::vector<uint16_t> ov(on + 2 * o_guard + 8, 0xffff);
    uint16_t *O = ov.data() + o_guard + ((16 - (uintptr_t)(ov.data() + o_guard) % 16) % 16) / 2;
    // LSE: packed [Hq, Tq] (rows padded), else [B, Hq, Lq] (padded too).
    const int guard = 64 + kn.bm;
    const int64_t lse_hs = qL + 8, lse_bs = packed ? 0 : sc.Hq * lse_hs + 16;
    std::vector<float> lse((size_t)(qB - 1) * lse_bs + (size_t)sc.Hq * lse_hs + 2 * guard, NAN);
    float *LSE = lse.data() + guard;
    readable = {{(const unsigned char *)qv.data(), (const unsigned char *)(qv.data() + qv.size())},
                {(const unsigned char *)kv.data(), (const unsigned char *)(kv.data() + kv.size())},
                {(const unsigned char *)vv.data(), (const unsigned char *)(vv.data() + vv.size())}};
    writable = {{(const unsigned char *)O, (const unsigned char *)(O + on)}};

    FaFwdSm90Params P;
    memset(&P, 0, sizeof P);
    FaFwdParams &p = P.p;
    p.q = q; p.k = k; p.v = v; p.o = O; p.lse = LSE;
    p.q_batch_stride = qbs; p.q_row_stride = qrs; p.q_head_stride = qhs;
    p.k_batch_stride = packed ? 0 : kbs; p.k_row_stride = krs; p.k_head_stride = khs;
    p.v_batch_stride = packed ? 0 : vbs; p.v_row_stride = vrs; p.v_head_stride = vhs;
    p.o_batch_stride = obs; p.o_row_stride = ors; p.o_head_stride = ohs;
    p.lse_batch_stride = lse_bs; p.lse_head_stride = lse_hs;
    p.batch = B; p.heads_q = sc.Hq; p.heads_kv = sc.Hk; p.q_per_kv = sc.Hq / sc.Hk;
    p.seqlen_q = max_q; p.seqlen_k = max_k; p.head_dim = D;
    p.diag_offset = sc.top_left ? 0 : max_k - max_q;  // the host's: each sequence must use its own
    p.window_left = sc.wl < 0 ? -1 : std::min(sc.wl, max_q + max_k);
    p.window_right = sc.wr < 0 ? -1 : std::min(sc.wr, max_q + max_k);
    p.scale = sc.scale != 0.f ? sc.scale : 1.f / sqrtf((float)D); p.softcap = sc.softcap;
    p.top_left = sc.top_left;
    const Modifiers mods = make_modifiers(sc.alibi, sc.alibi_x, sc.sinks, B, sc.Hq, g);
    p.alibi_slopes = mods.alibi(); p.alibi_batch_stride = mods.alibi_bs; p.sinks = mods.sink();
    if (packed) {
        p.cu_seqlens_q = cu_q.data(); p.cu_seqlens_k = cu_k.data();
        p.seqused_k = sc.used.empty() ? nullptr : sc.used.data();
    } else {
        p.seqused_k = sc.lk.data();
        if (paged) { p.block_table = table.data(); p.block_table_stride = per_seq; p.page_size = sc.page; }
        else p.cache_batch_idx = idx.data();
    }
    table_lo = table.data();
    table_hi = table.data() + table.size();
    P.tma_q = encode_like_rust(q, qB, qL, sc.Hq, D, qbs, qrs, qhs, kn.bm);
    P.tma_k = encode_like_rust(k, entries, rows, sc.Hk, D, kbs, krs, khs, kn.bn);
    P.tma_v = encode_like_rust(v, entries, rows, sc.Hk, D, vbs, vrs, vhs, kn.bn);
    P.tma_o = encode_like_rust(O, qB, qL, sc.Hq, D, obs, ors, ohs, kn.bm);
    const bool ran_ok = launch_grid(kn, P, make_uint3((max_q + kn.bm - 1) / kn.bm, sc.Hq, B));

    EmuCheck all;
    for (int b = 0; b < B; ++b) {
        const int64_t q0 = packed ? cu_q[b] * qrs : b * qbs, o0 = packed ? cu_q[b] * ors : b * obs;
        const int64_t l0 = packed ? cu_q[b] : b * lse_bs, kr = sc.Hk * D;
        EmuProblem ep{1, sc.Hq, sc.Hk, lq[b], keys[b], D, sc.wl, sc.wr, (double)p.scale, (double)sc.softcap, bf16, true,
                      q + q0, kd[b].data(), vd[b].data(), O + o0, LSE + l0,
                      0, qrs, qhs, 0, kr, D, 0, kr, D, 0, ors, ohs};
        ep.top_left = sc.top_left;
        // Sequence b's slopes are row b of [B, Hq] (or the one [Hq] row).
        ep.alibi = mods.alibi() ? mods.alibi() + b * mods.alibi_bs : nullptr;
        ep.sinks = mods.sink();
        ep.lseb = 1; ep.lseh = lse_hs;  // batch 1: the batch stride is never stepped
        const EmuCheck c = emu_check_against_reference(ep, true);
        all.ok &= c.ok;
        all.err2 += c.err2;
        all.ref2 += c.ref2;
        all.row_rel = std::max(all.row_rel, c.row_rel);
        all.lse_rel = std::max(all.lse_rel, c.lse_rel);
    }
    EmuProblem whole{qB, sc.Hq, sc.Hk, qL, 0, D, -1, -1, 1.0, 0.0, bf16, true, q, nullptr, nullptr, O, LSE,
                     qbs, qrs, qhs, 0, 0, 0, 0, 0, 0, obs, ors, ohs};
    whole.lseb = packed ? 1 : lse_bs; whole.lseh = lse_hs;
    const long stray = emu_count_stray(whole, ov.data(), ov.size(), lse, guard);
    std::string checks;
    auto failed = [&](const char *what) { checks += checks.empty() ? "" : ", "; checks += what; };
    if (!ran_ok) failed("run abandoned");
    if (case_errors) failed("emulator errors");
    if (!all.ok) failed("non-finite O / empty-row O or LSE");
    if (stray) failed("stray writes");
    if (!(all.rel() <= emu_o_tol(bf16))) failed("O rel L2");
    if (!(all.row_rel <= emu_row_tol(bf16))) failed("O worst row");
    if (!(all.lse_rel <= kEmuLseTol)) failed("LSE");
    std::string lens;
    for (int b = 0; b < B; ++b)
        lens += std::to_string(lq[b]) + ":" + std::to_string(sc.lk[b]) +
                (packed && !sc.used.empty() ? "/" + std::to_string(sc.used[b]) : "") + " ";
    const char *mode = packed ? "packed" : paged ? "paged" : "dense cache";
    printf("%-4s %-24s %-24s %s%s [%s] Hq%d Hk%d D%3d w(%d,%d)%s scale %.3g cap %.3g%s: rel %.2e row %.2e lse %.2e stray %ld%s%s\n",
           checks.empty() ? "ok" : "FAIL", kn.name, sc.what, mode, paged ? (" " + std::to_string(sc.page)).c_str() : "",
           lens.c_str(), sc.Hq, sc.Hk, D, sc.wl, sc.wr, sc.top_left ? " top-left" : "", (double)p.scale,
           (double)sc.softcap, modifiers_desc(mods).c_str(), all.rel(), all.row_rel, all.lse_rel, stray, checks.empty() ? "" : " [failed: ",
           checks.empty() ? "" : (checks + "]").c_str());
    if (!checks.empty() && opt.stop_on_fail) {
        printf("first failing case: %s, %s: %s\n", kn.name, sc.what, checks.c_str());
        printf("--stop-on-fail: 1 failing case, %ld emulator errors\n", errors_total);
        fflush(stdout);
        _exit(1);
    }
    fflush(stdout);
    return checks.empty();
}

// Per bucket: packed batches (empty and one-token sequences, lengths one
// short of a tile and past it, Lq > Lk and Lq < Lk in one batch, seqused_k
// below the stored keys, GQA 4:1 with 2 KV heads, custom and negative
// scales, softcap, windows, top-left), dense caches, and paged caches with
// pages of block_n and 2 block_n keys. Non-persistent kernels only (the
// dispatcher gives sequences to no persistent variant).
static int seq_cases(int hd, bool bf16, unsigned &seed, bool neg) {
    int bm = 0, bn = 0;
    for (const Kern &k : kerns)
        if (k.hd == hd && !strstr(k.name, "__")) bm = k.bm, bn = k.bn;
    const std::vector<SeqCase> cases = {
        // ALiBi (distances inside each sequence, own Lk_b - Lq_b) and sinks
        // (sequences and rows without keys: LSE = sink) ride along on three.
        {"packed, GQA 8:2, causal, alibi, sinks", 0, {bm - 1, 0, 1, bm + 3}, {2 * bn - 1, 5, 0, bn + 1}, {}, 0, 8, 2, hd, -1, 0, 0.f, 0.3f, false,
         ALIBI_BATCH, 1.f, SINK_NORMAL},
        {"packed, seqused_k, NaN past it", 0, {7, bm + 1, 0, 3}, {bn + 2, 10, 4, 2 * bn}, {bn, 9, 0, 17}, 0, 4, 1, hd, -1, -1, 0.f, 0.f, false},
        {"packed, window, cap, top-left", 0, {20, 1, 33}, {9, 40, 70}, {}, 0, 2, 2, hd, 6, 3, 7.f, -0.7f, true},
        {"dense cache, GQA 8:2, alibi x4, big sinks", 1, {4}, {2 * bn - 1, 0, 5, bn + 1}, {}, 0, 8, 2, hd, -1, 0, 0.f, 0.f, false,
         ALIBI_HEAD, 4.f, SINK_DOMINANT},
        {"dense cache, window, top-left", 1, {40}, {70, 1, 33}, {}, 0, 6, 3, hd, 9, 2, 0.f, 0.f, true},
        {"paged cache, page block_n, alibi, sinks", 2, {4}, {2 * bn - 1, 0, 5, bn + 1}, {}, bn, 8, 2, hd, -1, 0, 0.f, 0.f, false,
         ALIBI_HEAD, 1.f, SINK_NORMAL},
        // A window reaching back across a page's second tile (slot block_n).
        {"paged cache, page 2 block_n", 2, {40}, {3 * bn - 1, 1, 33}, {}, 2 * bn, 6, 3, hd, 200, 0, 0.f, 1.3f, false},
    };
    int fails = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
        if (neg && (i == 2 || i == 4)) continue;
        for (const Kern &k : kerns)
            if (k.hd == hd && k.bf16 == bf16 && k.grid != FA_GRID_PERSISTENT &&
                (opt.only.empty() || strstr(k.name, opt.only.c_str())) && (!neg || !strstr(k.name, "__")))
                fails += !run_seq_on(k, cases[i], seed);
        ++seed;
    }
    return fails;
}

// Kernels of the case's bucket and dtype: the default and all its variants,
// only the default, the default and its persistent variant, or those and the
// rotated loop (__ov): the variants whose key loop differs.
enum { RUN_DEFAULT = 0, RUN_ALL = 1, RUN_PERSISTENT = 2, RUN_LOOPS = 3 };
static int run_case(const Case &cs, bool bf16, unsigned seed, int variants = RUN_ALL) {
    int hd = 1 << 30;
    for (const Kern &k : kerns)
        if (k.bf16 == bf16 && k.hd >= cs.D && !strstr(k.name, "__")) hd = std::min(hd, k.hd);
    int fails = 0, ran = 0;
    for (const Kern &k : kerns)
        if (k.hd == hd && k.bf16 == bf16 && (opt.only.empty() || strstr(k.name, opt.only.c_str())) &&
            (variants == RUN_ALL || !strstr(k.name, "__") ||
             (variants >= RUN_PERSISTENT && k.grid == FA_GRID_PERSISTENT) ||
             (variants == RUN_LOOPS && strstr(k.name, "__ov")))) {
            fails += !run_case_on(k, cs, seed);
            ++ran;
        }
    if (!ran && opt.only.empty()) { printf("FAIL no kernel for %s D %d\n", bf16 ? "bf16" : "f16", cs.D); return 1; }
    return fails;
}

// Options (tests/emulated_sm90.rs picks the combinations):
//   --tma=eager|random|lazy   TMA copies land at issue / at random later points
//                             / only when no thread can run (default lazy)
//   --wgmma=issue|wait        wgmma results written at issue, or only at the
//                             retiring wait_group, accumulators poisoned
//                             meanwhile (default wait)
//   --ordered                 fixed thread order, no yields, dynamic smem at 0
//   --round=exact|real        wgmma sums and ex2.approx / __fdividef exactly
//                             rounded (default), or as inexact as the hardware
//                             may be: ex2.approx and __fdividef 2 ulp off (their
//                             documented maximum), each wgmma k16 step
//                             truncated and then 1 ulp off
//   --cases=all|base|quick|neg|sem|seq|none  the fixed case list (seq: only packed
//                             batches and caches; neg: the
//                             negative control's; sem: only the semantics
//                             cases; base: all but those)
//   --random=N --seed=S       N extra random problems
//   --sms=N                   grid of FA_GRID_PERSISTENT kernels (default 2)
//   --stop-on-fail            exit at the first failing case (the negative control)
//   --only=SUBSTR             kernels whose name contains SUBSTR
//   --oob-box=skip-empty      the alternative reading of a wholly
//                             out-of-bounds TMA box: nothing written, 0 bytes
//                             completed (a kernel that issues such a box and
//                             counts its bytes deadlocks)
// The last line is "<options>: N failing cases, M emulator errors".
int main(int argc, char **argv) {
    std::string mode;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto val = [&](const char *k) { return a.rfind(k, 0) == 0 ? a.substr(strlen(k)) : std::string(); };
        if (a == "--tma=eager") opt.tma = TMA_EAGER;
        else if (a == "--tma=random") opt.tma = TMA_RANDOM;
        else if (a == "--tma=lazy") opt.tma = TMA_LAZY;
        else if (a == "--wgmma=issue") opt.wgmma = WG_AT_ISSUE;
        else if (a == "--wgmma=wait") opt.wgmma = WG_AT_WAIT;
        else if (a == "--ordered") opt.shuffle = false;
        else if (a == "--round=real") opt.real_round = true;
        else if (a == "--round=exact") opt.real_round = false;
        else if (a == "--stop-on-fail") opt.stop_on_fail = true;
        else if (a == "--oob-box=skip-empty") opt.oob_skip_empty = true;
        else if (!val("--seed=").empty()) opt.seed = atoi(val("--seed=").c_str());
        else if (!val("--sms=").empty()) opt.sms = atoi(val("--sms=").c_str());
        else if (!val("--cases=").empty()) opt.cases = val("--cases=");
        else if (!val("--only=").empty()) opt.only = val("--only=");
        else if (!val("--random=").empty()) opt.random = atoi(val("--random=").c_str());
        else { fprintf(stderr, "unknown option %s\n", a.c_str()); return 2; }
        mode += (mode.empty() ? "" : " ") + a;
    }
    if (mode.empty()) mode = "defaults";
    if (opt.cases != "all" && opt.cases != "base" && opt.cases != "quick" && opt.cases != "neg" && opt.cases != "sem" &&
        opt.cases != "seq" && opt.cases != "none") {
        fprintf(stderr, "unknown --cases=%s\n", opt.cases.c_str());
        return 2;
    }
    rng.seed(opt.seed);
    rng_round.seed(opt.seed * 31 + 5);
    signal(SIGALRM, alarm_handler);
    setvbuf(stdout, nullptr, _IOLBF, 0);

    // Bucket sizes from the table (non-variant kernels).
    std::vector<int> buckets;
    for (const Kern &k : kerns)
        if (!strstr(k.name, "__") && std::find(buckets.begin(), buckets.end(), k.hd) == buckets.end()) buckets.push_back(k.hd);
    std::sort(buckets.begin(), buckets.end());

    int fails = 0;
    unsigned seed = 7 + opt.seed;
    const bool quick = opt.cases == "quick", neg = opt.cases == "neg";
    if (opt.cases == "none") buckets.clear();  // only the random sweep
    // Packed batches and caches: in `all`, `quick` (one dtype per bucket),
    // `neg` (f16) and `seq` (only these).
    const bool seq_only = opt.cases == "seq";
    if (seq_only || opt.cases == "all" || quick || neg)
        for (size_t bi = 0; bi < buckets.size(); ++bi)
            for (int bf = 0; bf < 2; ++bf) {
                if ((quick && bf != (int)bi % 2) || (neg && bf)) continue;
                fails += seq_cases(buckets[bi], bf, seed, neg);
            }
    if (seq_only) buckets.clear();
    const bool sem = opt.cases == "sem";       // only the semantics cases below
    const bool base = opt.cases == "base";     // all but the semantics cases
    // Every bucket, both dtypes: GQA, odd lengths, causal with Lq != Lk, LSE.
    for (int hd : sem ? std::vector<int>() : buckets)
        for (int bf = 0; bf < 2; ++bf) {
            if (neg && bf) continue;
            Case c{1, 2, 1, 77, 150, hd, -1, 0, 0.f, false, 0, 1.f, true, "mixed"};
            if (hd > 128) c.Lk = 100;  // the slowest bucket: fewer keys
            fails += run_case(c, bf, seed++);
        }
    // Per bucket: masks, shapes and head dims; the dtype alternates.
    for (size_t bi = 0; bi < (sem ? 0 : buckets.size()); ++bi) {
        const int hd = buckets[bi];
        const bool big = hd > 128;
        const int below = bi ? buckets[bi - 1] : 0;  // head dims in (below, hd] use this bucket
        std::vector<Case> cs = {
            {1, 1, 1, 130, big ? 100 : 200, hd, -1, -1, 0.f, false, 0, 1.f, true, "full, tail tiles"},
            {2, 2, 2, big ? 140 : 200, 90, hd, -1, 0, 0.f, true, 8, 1.f, true, "causal Lq>Lk, BHSD pad"},
            {1, 2, 1, big ? 130 : 150, big ? 180 : 260, hd, 20, 5, 0.f, false, 16, 1.f, true, "window both sides"},
            {1, 1, 1, 64, 64, hd, 0, 0, 0.f, false, 0, 1.f, true, "diagonal only"},
            {1, 1, 1, 100, 300, hd, 3, -1, 0.f, false, 0, 1.f, false, "left window, no LSE"},
            {1, 3, 1, 129, big ? 90 : 129, hd, -1, -1, 30.f, false, 0, 3.f, true, "softcap"},
            {1, 1, 1, 40, 0, hd, -1, -1, 0.f, false, 0, 1.f, true, "seqlen_k = 0"},
            {1, 1, 1, 70, 70, hd, -1, -1, 0.f, false, 0, 40.f, true, "huge logits"},
            {1, 1, 1, 1, 1, hd, -1, -1, 0.f, false, 0, 1.f, true, "single element"},
            {1, 2, 2, 150, 40, hd, 5, 2, 0.f, true, 0, 1.f, true, "tiny window Lq>>Lk, BHSD"},
            // More key tiles than ring stages: slots are reused and the
            // barrier parities wrap.
            {1, 1, 1, 100, big ? 500 : 700, hd, -1, -1, 0.f, false, 8, 1.f, true, "long keys, ring wraps"},
            // Causal with Lq >> Lk: the top row blocks see no key at all, the
            // last one does (a persistent CTA mixes both kinds of tile).
            {1, 2, 1, 300, 40, hd, -1, 0, 0.f, false, 0, 1.f, true, "keyless and keyed tiles"},
            {1, 2, 1, 90, big ? 150 : 200, hd, -1, 0, 0.f, false, 0, 1.f, true, "top-left causal Lq<Lk", true},
            {1, 1, 1, 200, 70, hd, 10, 3, 0.f, true, 8, 1.f, true, "top-left window Lq>Lk", true},
        };
        // Head dims inside the bucket but not equal to it (for the 256 bucket
        // with D <= 192 the fourth 64-column box lies wholly out of bounds).
        std::vector<int> odd;
        for (int d : {40, 56, 72, 96, 120, 136, 160, 200, 248})
            if (d > below && d < hd) odd.push_back(d);
        for (size_t i = 0; i < odd.size(); ++i)
            cs.push_back({1, 2, 1, 90, big ? 100 : 140, odd[i], -1, (int)i % 2 ? -1 : 0, 0.f, i % 2 == 1, 8 * (int)(i % 3),
                          1.f, true, "head_dim inside bucket"});
        for (size_t i = 0; i < cs.size(); ++i) {
            if (quick && i % 3) continue;
            // neg: the negative control's subset; with the keyless-tile case,
            // top-left causal and the first head dim inside the bucket (hd256:
            // a dead box).
            if (neg && !(i == 0 || i == 1 || i == 2 || i == 10 || i == 11 || i == 12 || i == 14)) continue;
            fails += run_case(cs[i], neg ? false : (bi + i) % 2, seed++);
        }
    }
    // Per bucket, both dtypes: what the kernel computes rather than how it
    // schedules it. GQA with several KV heads and 4+ query heads each, custom
    // and negative scales, lengths one short of a tile (block_m - 1 rows,
    // k * block_n - 1 keys), every tensor with its own strides (V's tensor map
    // from V's own), scores in the hundreds to thousands, window edges, and
    // softcaps from tiny to f32's largest (c * tanh(s / c) must stay
    // relatively accurate for every finite c, DESIGN.md section 1).
    for (int hd : base || seq_only ? std::vector<int>() : buckets) {
        int bn = 0, bm = 0;
        for (const Kern &k : kerns)
            if (k.hd == hd && !strstr(k.name, "__")) bn = k.bn, bm = k.bm;
        const int one_short = bm - 1;
        // The two GQA cases (the most CTAs) take one dtype each, swapped
        // from bucket to bucket; the rest run in both.
        const int gqa_bf = (hd / 64) % 2;
        struct Sem { Case c; int dtypes; };  // dtypes: bit 0 f16, bit 1 bf16
        std::vector<Sem> cs = {
            {{2, 8, 2, one_short, 2 * bn - 1, hd, -1, 0, 0.f, LAY_BSHD, 8, 1.f, true, "GQA 8:2, causal", false, 0.3f, true},
             1 << gqa_bf},
            {{1, 12, 3, one_short, bn + 40, hd, 37, 11, 0.f, LAY_BHSD, 0, 1.f, true, "GQA 12:3, window", false, -0.7f, true},
             2 >> gqa_bf},
            {{2, 1, 1, 2 * bm - 1, 3 * bn - 1, hd, -1, -1, 0.f, LAY_SBHD, 8, 12.f, true, "scores in the 1000s", false, 1.7f, true},
             3},
            {{1, 4, 2, one_short, 2 * bn - 1, hd, -1, -1, 5.f, LAY_BHSD, 8, 3.f, true, "softcap 5", false, 1.7f, true}, 3},
            {{1, 1, 1, one_short, 2 * bn - 1, hd, -1, 0, 1e-30f, LAY_BSHD, 0, 4.f, true, "softcap 1e-30", false, 0.3f, true}, 3},
            {{1, 1, 1, one_short, 2 * bn - 1, hd, -1, 0, 1e6f, LAY_SBHD, 8, 4.f, true, "softcap 1e6", false, 0.3f, true}, 3},
            {{1, 1, 1, one_short, 2 * bn - 1, hd, -1, 0, 1e38f, LAY_BHSD, 0, 4.f, true, "softcap 1e38", false, 1.7f, true}, 3},
            {{1, 1, 1, one_short, 2 * bn - 1, hd, -1, 0, FLT_MAX, LAY_BSHD, 8, 4.f, true, "softcap FLT_MAX", false, 0.f, true}, 3},
            // ALiBi and sinks (DESIGN.md 1b). Per-entry slopes and N(0, 2)
            // sinks with GQA 8:2, Lq < Lk and a full mask (the first key tile
            // needs no element mask, ALiBi still applies); slopes 16x the
            // usual after softcap 5 with a window and Lq > Lk (rows without
            // keys); dominant sinks where whole row blocks see no key.
            {{2, 8, 2, one_short, 2 * bn - 1, hd, -1, -1, 0.f, LAY_BSHD, 8, 1.f, true, "alibi[B,H], sinks, GQA 8:2", false,
              0.3f, true, ALIBI_BATCH, 1.f, SINK_NORMAL},
             2 >> gqa_bf},
            {{1, 4, 2, 2 * bm - 1, bn + 40, hd, 37, 11, 5.f, LAY_BHSD, 0, 3.f, true, "alibi x16, softcap 5, window", false,
              -0.7f, true, ALIBI_HEAD, 16.f, MOD_NONE},
             1 << gqa_bf},
            {{1, 2, 1, 300, 40, hd, -1, 0, 0.f, LAY_SBHD, 0, 1.f, true, "big sinks, keyless rows", false, 0.f, true, MOD_NONE,
              1.f, SINK_DOMINANT},
             2 >> gqa_bf},
        };
        if (neg) {
            // The negative control, for its semantic mutants: all of the
            // above in one case on the bucket's default kernel (the variants
            // share this code); mask edges and the rest come from the cases
            // above.
            const Case c{2, 4, 2, one_short, 2 * bn - 1, hd, 37, 11, 5.f, LAY_BHSD, 8, 3.f, true, "neg: GQA, scale, cap",
                         false, -1.7f, true};
            fails += run_case(c, false, seed++, RUN_DEFAULT);
            // ALiBi and sinks, also on the persistent path: per-entry slopes
            // at a padded stride, GQA, Lq != Lk (bottom-right), whole tiles
            // inside the band (no element mask), under a softcap; then
            // dominant sinks on rows and whole row blocks without keys.
            Case m{2, 8, 2, one_short, 2 * bn - 1, hd, -1, -1, 5.f, LAY_BHSD, 8, 3.f, true, "neg: alibi, sinks, cap",
                   false, -1.7f, true};
            m.alibi = ALIBI_BATCH, m.alibi_x = 4.f, m.sinks = SINK_NORMAL;
            fails += run_case(m, false, seed++, RUN_PERSISTENT);
            Case kl{1, 2, 1, 300, 40, hd, -1, 0, 0.f, LAY_BSHD, 0, 1.f, true, "neg: sinks, keyless rows"};
            kl.sinks = SINK_DOMINANT;
            fails += run_case(kl, false, seed++, RUN_PERSISTENT);
            continue;
        }
        for (size_t i = 0; i < cs.size(); ++i)
            for (int bf = 0; bf < 2; ++bf) {
                if (!(cs[i].dtypes >> bf & 1)) continue;
                if (quick && i % 3) continue;
                // The modifier cases on the variants whose loops differ (the
                // others share the default's scores_to_probs): test time.
                fails += run_case(cs[i].c, bf, seed++, cs[i].c.alibi || cs[i].c.sinks ? RUN_LOOPS : RUN_ALL);
            }
    }
    // A seeded sweep of random problems (--random=N).
    std::mt19937 r(opt.seed * 7919 + 17);
    std::mt19937 rm(opt.seed * 104729 + 3);
    for (int it = 0; it < opt.random; ++it) {
        Case c{};
        static const int ratios[] = {1, 2, 3, 4, 6};
        c.B = 1 + r() % 2; c.Hk = 1 + r() % 3; c.Hq = c.Hk * ratios[r() % 5];
        c.Lq = 1 + r() % 300; c.Lk = r() % 10 == 0 ? 0 : 1 + r() % 400;
        // Many heads: fewer row blocks, so a case stays about as cheap.
        if (c.B * c.Hq > 8) c.B = 1;
        if (c.B * c.Hq > 4) c.Lq = std::min(c.Lq, 128 * std::max(1, 12 / (c.B * c.Hq)));
        c.D = 8 * (1 + r() % 32);
        c.wl = r() % 2 ? -1 : (int)(r() % 150); c.wr = r() % 2 ? -1 : (int)(r() % 150);
        c.softcap = r() % 4 == 0 ? 5.f + r() % 50 : 0.f;
        c.layout = r() % 3; c.own = r() % 2; c.pad = 8 * (r() % 3); c.amp = r() % 5 == 0 ? 20.f : 1.f; c.lse = r() % 5 != 0;
        // A custom scale in a third of the cases, negative in half of those.
        if (r() % 3 == 0) c.scale = (r() % 2 ? -1.f : 1.f) * (0.05f + (r() % 1000) * 0.002f);
        // ALiBi (per head or per entry, usual or 8x slopes) and sinks in a
        // quarter of the cases each, drawn from their own stream (the
        // problems stay those of the sweep without them).
        if (rm() % 4 == 0) c.alibi = 1 + rm() % 2, c.alibi_x = rm() % 3 ? 1.f : 8.f;
        if (rm() % 4 == 0) c.sinks = 1 + rm() % 2;
        // No sink where a row's keys can all score far below it: with scores
        // in the hundreds (amp 20), or ALiBi on rows above the first key's
        // diagonal (Lq > Lk: every visible key far from the row). The sink
        // then takes all, and the exact O (e^-50 and less) is below f16's
        // range: any kernel stores 0 or a subnormal, which the per-row check
        // reads as an error of up to 100 %.
        if (c.amp > 1.f || (c.alibi && c.Lq > c.Lk)) c.sinks = MOD_NONE;
        c.what = "random";
        if (c.D > 128) { c.Lq = std::min(c.Lq, 200); c.Lk = std::min(c.Lk, 200); }  // the slow bucket
        fails += run_case(c, r() % 2, seed++);
    }
    printf("stats: %ld CTAs, %ld wgmma (%ld with A from registers, %ld with B MN-major), %ld TMA boxes "
           "(%ld partly and %ld wholly out of bounds), %ld mbarrier phases, %ld persistent launches with more tiles "
           "than CTAs (%ld of them mixing tiles with and without keys)\n",
           stats.ctas, stats.wgmma, stats.wgmma_rs, stats.wgmma_trans_b, stats.tma, stats.tma_partial, stats.tma_empty,
           stats.phases, stats.persistent_multi, stats.persistent_mixed);
    printf("%s: %d failing cases, %ld emulator errors\n", mode.c_str(), fails, errors_total);
    return fails || errors_total ? 1 : 0;
}
