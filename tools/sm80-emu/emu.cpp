// Host emulator of the CUDA features fwd_sm80.cu uses, run over the real kernel
// source (see gen.py): every CUDA thread is a fiber; ldmatrix, mma.sync, shuffles,
// barriers and cp.async (landing at issue or at the wait, with random warp
// order) are emulated, reads/writes outside the tensors and shared-memory
// overruns are errors, and each case is checked against an f64 reference.
// Driven by tests/emulated_sm80.rs.
#include "shim.h"
#include "../emu-common/check.h"
#include "kernels/fwd_sm80.cu"

// ------------------------------------------------------------------ scheduler
enum { RUN, WAIT_WARP, WAIT_BAR, DONE };
enum { OP_SHFL = 1, OP_LDSM, OP_LDSM_T, OP_MMA_F16, OP_MMA_BF16, OP_SYNCWARP };

struct Copy { uint32_t dst; const unsigned char *src; uint32_t bytes; };

struct Lane {
    ucontext_t ctx;
    std::vector<char> stack;
    int state = RUN;
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
};

unsigned char *emu_smem;
uint3 blockIdx;
static std::vector<Lane> lanes;
static int cur = -1;
static int n_threads = 0;
static ucontext_t sched_ctx;
static void (*kernel_fn)(FaFwdParams);
static FaFwdParams kernel_params;
static size_t smem_bytes = 0;
static std::vector<int> pending;      // in-flight cp.async bytes per smem byte (lazy mode)
static bool eager = false;            // cp.async lands at issue (else at the wait)
static bool shuffle_order = false;
static std::mt19937 rng(1);
static long errors = 0;
static long ldsm_conflicts = 0, ldsm_phases = 0;
struct Range { const unsigned char *lo, *hi; };
static std::vector<Range> readable;

#define FAIL(...)                                        \
    do {                                                 \
        if (errors++ < 20) {                             \
            fprintf(stderr, "EMU ERROR: " __VA_ARGS__);  \
            fprintf(stderr, "\n");                       \
        }                                                \
    } while (0)

uint3 emu_thread_idx() { return make_uint3(cur, 0, 0); }

static void block_on(int state) {
    lanes[cur].state = state;
    swapcontext(&lanes[cur].ctx, &sched_ctx);
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) FAIL("partial shfl mask");
    Lane &L = lanes[cur];
    L.op = OP_SHFL; L.fval = v; L.ival = lane_mask;
    block_on(WAIT_WARP);
    return lanes[cur].fout;
}
void __syncthreads() { block_on(WAIT_BAR); }
void __syncwarp(unsigned) { lanes[cur].op = OP_SYNCWARP; block_on(WAIT_WARP); }

static void do_copy(const Copy &c) {
    if (c.bytes) memcpy(emu_smem + c.dst, c.src, 16);
    else memset(emu_smem + c.dst, 0, 16);
}

void emu_cp_async_16(uint32_t dst, const void *src, uint32_t bytes) {
    if (dst % 16 || dst + 16 > smem_bytes) FAIL("cp.async dst %u out of smem (%zu)", dst, smem_bytes);
    if (bytes != 0 && bytes != 16) FAIL("cp.async bytes %u", bytes);
    const unsigned char *s = (const unsigned char *)src;
    if ((uintptr_t)s % 16) FAIL("cp.async src misaligned");
    if (bytes) {
        bool ok = false;
        for (auto &r : readable) ok |= s >= r.lo && s + 16 <= r.hi;
        if (!ok) FAIL("cp.async reads outside Q/K/V (thread %d)", cur);
    }
    Copy c{dst, s, bytes};
    if (eager) { do_copy(c); return; }
    for (int i = 0; i < 16; ++i)
        if (pending[dst + i]++) { FAIL("cp.async over an in-flight cp.async at %u", dst); break; }
    lanes[cur].open.push_back(c);
}
void emu_cp_async_commit() {
    Lane &L = lanes[cur];
    L.groups.push_back(std::move(L.open));
    L.open.clear();
}
static void land_group(Lane &L) {
    for (auto &c : L.groups.front()) {
        do_copy(c);
        for (int i = 0; i < 16; ++i) pending[c.dst + i]--;
    }
    L.groups.pop_front();
}
void emu_cp_async_wait(int n) {
    Lane &L = lanes[cur];
    while ((int)L.groups.size() > n) land_group(L);
}
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
    } else if (op == OP_LDSM || op == OP_LDSM_T) {
        for (int m = 0; m < 4; ++m) {
            uint16_t mat[8][8];
            int slots = 0;
            for (int row = 0; row < 8; ++row) {
                uint32_t a = W[8 * m + row].addr;
                if (a % 16 || a + 16 > smem_bytes) { FAIL("ldmatrix address %u out of smem", a); a = 0; }
                for (int i = 0; i < 16; ++i)
                    if (!eager && pending[a + i]) { FAIL("ldmatrix reads in-flight cp.async data at %u", a); break; }
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
                float s = C[i][j];
                for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
                D[i][j] = s;
            }
        for (int t = 0; t < 32; ++t) {
            const int g = t / 4, c = 2 * (t % 4);
            W[t].d[0] = D[g][c]; W[t].d[1] = D[g][c + 1];
            W[t].d[2] = D[g + 8][c]; W[t].d[3] = D[g + 8][c + 1];
        }
    } else if (op == OP_SYNCWARP) {
    } else {
        FAIL("unknown op %d", op);
    }
    for (int l = 0; l < 32; ++l) W[l].state = RUN;
}

static void lane_main() {
    kernel_fn(kernel_params);
    lanes[cur].state = DONE;
    swapcontext(&lanes[cur].ctx, &sched_ctx);
}

static void run_cta(int threads) {
    n_threads = threads;
    lanes.assign(threads, Lane());
    for (int i = 0; i < threads; ++i) {
        Lane &L = lanes[i];
        L.stack.resize(256 * 1024);
        getcontext(&L.ctx);
        L.ctx.uc_stack.ss_sp = L.stack.data();
        L.ctx.uc_stack.ss_size = L.stack.size();
        L.ctx.uc_link = nullptr;
        makecontext(&L.ctx, lane_main, 0);
    }
    const int warps = threads / 32;
    for (;;) {
        // warps that can make progress: some lane runnable, or a complete warp collective
        std::vector<int> cand;
        for (int w = 0; w < warps; ++w) {
            int run = 0, ww = 0;
            for (int l = 0; l < 32; ++l) {
                run += lanes[w * 32 + l].state == RUN;
                ww += lanes[w * 32 + l].state == WAIT_WARP;
            }
            if (run || ww == 32) cand.push_back(w);
        }
        if (cand.empty()) {
            int nbar = 0, ndone = 0, nw = 0;
            for (auto &L : lanes) { nbar += L.state == WAIT_BAR; ndone += L.state == DONE; nw += L.state == WAIT_WARP; }
            if (ndone == threads) break;
            if (nbar == threads) { for (auto &L : lanes) L.state = RUN; continue; }
            FAIL("deadlock: %d at barrier, %d in warp ops, %d done", nbar, nw, ndone);
            exit(1);
        }
        const int w = shuffle_order ? cand[rng() % cand.size()] : cand[0];
        int ww = 0;
        for (int l = 0; l < 32; ++l) ww += lanes[w * 32 + l].state == WAIT_WARP;
        if (ww == 32) { exec_warp(w); continue; }
        for (int l = 0; l < 32; ++l)
            if (lanes[w * 32 + l].state == RUN) {
                cur = w * 32 + l;
                swapcontext(&sched_ctx, &lanes[cur].ctx);
            }
    }
    for (auto &L : lanes) {
        if (!L.open.empty()) FAIL("uncommitted cp.async at exit");
        while (!L.groups.empty()) land_group(L);
    }
    for (size_t i = 0; i < smem_bytes; ++i)
        if (pending[i]) { FAIL("pending bytes at exit"); break; }
}

// ------------------------------------------------------------------ test harness
struct Kern { const char *name; void (*fn)(FaFwdParams); int hd, bm, threads, smem; bool bf16; };
// One entry per FA_KERNEL line of fwd_sm80.cu (gen.py extracts them).
#undef FA_KERNEL
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid) \
    {#name, name, head_dim, block_m, threads, smem, std::is_same<FA_DTYPE(dtype), __nv_bfloat16>::value},
static Kern kerns[] = {
#include "kernels/sm80_table.inc"
};

static uint16_t f2h(float f, bool bf16) {
    if (bf16) { __nv_bfloat16 b = __float2bfloat16_rn(f); uint16_t u; memcpy(&u, &b, 2); return u; }
    __half h = __float2half_rn(f); uint16_t u; memcpy(&u, &h, 2); return u;
}

struct Case {
    int B, Hq, Hk, Lq, Lk, D, wl, wr;
    float softcap;
    bool bhsd;        // BHSD strides instead of BSHD
    int pad;          // extra elements per row/head slot, to make strides non-contiguous
    float amp;        // input amplitude
    bool lse;
    bool top_left = false;  // mask aligned to the top-left corner instead of bottom-right
};

static int bucket_of(int D) {
    const int b[] = {32, 64, 96, 128, 160, 192, 224, 256};
    for (int x : b) if (D <= x) return x;
    return -1;
}

static bool run_case_on(const Kern *kn, const Case &cs, bool bf16, unsigned seed, bool verbose) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    // strides (elements). BSHD: row stride = Hq*(D+pad); BHSD: row stride = D+pad.
    auto strides = [&](int H, int L, int64_t &bs, int64_t &rs, int64_t &hs) {
        const int64_t rowlen = cs.D + cs.pad;
        if (!cs.bhsd) { hs = rowlen; rs = H * rowlen; bs = (int64_t)L * rs + 8 * cs.pad; }
        else { rs = rowlen; hs = (int64_t)L * rowlen + 8 * cs.pad; bs = H * hs; }
    };
    int64_t qb, qr, qh, kb, kr, kh, ob, orr, oh;
    strides(cs.Hq, cs.Lq, qb, qr, qh);
    strides(cs.Hk, cs.Lk, kb, kr, kh);
    strides(cs.Hq, cs.Lq, ob, orr, oh);
    const size_t qn = (size_t)cs.B * qb + 8, kn_ = (size_t)cs.B * kb + 8;
    std::vector<uint16_t> q(qn), k(kn_), v(kn_);
    for (auto &x : q) x = f2h(U(g) * cs.amp, bf16);
    for (auto &x : k) x = f2h(U(g) * cs.amp, bf16);
    for (auto &x : v) x = f2h(U(g), bf16);
    // 16-byte aligned copies: vector storage is 16-aligned in practice, check
    if ((uintptr_t)q.data() % 16 || (uintptr_t)k.data() % 16 || (uintptr_t)v.data() % 16) { printf("alignment\n"); }
    const size_t on = (size_t)cs.B * ob + 8;
    const int guard = 64;
    std::vector<uint16_t> o(on + 2 * guard, 0xffff);
    uint16_t *O = o.data() + guard;
    std::vector<float> lse((size_t)cs.B * cs.Hq * cs.Lq + 2 * guard, NAN);
    float *LSE = lse.data() + guard;

    readable.clear();
    readable.push_back({(const unsigned char *)q.data(), (const unsigned char *)(q.data() + q.size())});
    readable.push_back({(const unsigned char *)k.data(), (const unsigned char *)(k.data() + k.size())});
    readable.push_back({(const unsigned char *)v.data(), (const unsigned char *)(v.data() + v.size())});

    FaFwdParams p{};
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = O; p.lse = cs.lse ? LSE : nullptr;
    p.q_batch_stride = qb; p.q_row_stride = qr; p.q_head_stride = qh;
    p.k_batch_stride = kb; p.k_row_stride = kr; p.k_head_stride = kh;
    p.v_batch_stride = kb; p.v_row_stride = kr; p.v_head_stride = kh;
    p.o_batch_stride = ob; p.o_row_stride = orr; p.o_head_stride = oh;
    p.batch = cs.B; p.heads_q = cs.Hq; p.heads_kv = cs.Hk; p.q_per_kv = cs.Hq / cs.Hk;
    p.seqlen_q = cs.Lq; p.seqlen_k = cs.Lk; p.head_dim = cs.D;
    p.diag_offset = cs.top_left ? 0 : cs.Lk - cs.Lq;  // bottom-right unless the case says top-left
    p.lse_batch_stride = (int64_t)cs.Hq * cs.Lq; p.lse_head_stride = cs.Lq;
    p.window_left = cs.wl; p.window_right = cs.wr;
    p.scale = 1.f / sqrtf((float)cs.D); p.softcap = cs.softcap;

    smem_bytes = kn->smem;
    const int guard_bytes = 1024;
    std::vector<unsigned char> smem_buf(smem_bytes + guard_bytes + 128);
    emu_smem = smem_buf.data() + (128 - (uintptr_t)smem_buf.data() % 128) % 128;
    pending.assign(smem_bytes + 16, 0);
    kernel_fn = kn->fn;
    kernel_params = p;
    for (int b = 0; b < cs.B; ++b)
        for (int h = 0; h < cs.Hq; ++h)
            for (int mb = 0; mb < (cs.Lq + kn->bm - 1) / kn->bm; ++mb) {
                // smem starts as garbage (NaN-ish bit patterns) for every CTA
                memset(emu_smem, 0xff, smem_bytes);
                memset(emu_smem + smem_bytes, 0xab, guard_bytes);
                blockIdx = make_uint3(mb, h, b);
                run_cta(kn->threads);
                for (int i = 0; i < guard_bytes; ++i)
                    if (emu_smem[smem_bytes + i] != 0xab) { FAIL("shared memory written past smem bytes"); break; }
            }

    // reference
    EmuProblem ep{cs.B, cs.Hq, cs.Hk, cs.Lq, cs.Lk, cs.D, cs.wl, cs.wr, (double)p.scale, (double)cs.softcap, bf16, cs.lse,
                  q.data(), k.data(), v.data(), O, LSE, qb, qr, qh, kb, kr, kh, kb, kr, kh, ob, orr, oh};
    ep.top_left = cs.top_left;
    const EmuCheck chk = emu_check_against_reference(ep, verbose);
    bool ok = chk.ok;
    // Outside the view and LSE's guards everything keeps its poison.
    const long stray = emu_count_stray(ep, o.data(), o.size(), lse, guard);
    if (stray) { ok = false; if (verbose) printf("  %ld stray writes\n", stray); }
    const double rel = chk.rel();
    if (!(rel <= emu_o_tol(bf16)) || !(chk.row_rel <= emu_row_tol(bf16))) ok = false;
    if (cs.lse && !(chk.lse_rel <= kEmuLseTol)) ok = false;
    printf("%-4s %-24s B%d Hq%d Hk%d Lq%4d Lk%4d D%3d w(%d,%d) cap%.0f %s pad%d amp%.0f lse%d: rel %.2e row %.2e lse %.2e %s\n",
           ok ? "ok" : "FAIL", kn->name, cs.B, cs.Hq, cs.Hk, cs.Lq, cs.Lk, cs.D, cs.wl, cs.wr, cs.softcap,
           cs.bhsd ? "BHSD" : "BSHD", cs.pad, cs.amp, cs.lse, rel, chk.row_rel, chk.lse_rel, errors ? "(emu errors)" : "");
    return ok && errors == 0;
}

// Every kernel of the case's bucket and dtype: the default and its variants.
static bool run_case(const Case &cs, bool bf16, unsigned seed, bool verbose) {
    const int hd = bucket_of(cs.D);
    bool ok = true;
    int ran = 0;
    for (const Kern &k : kerns)
        if (k.hd == hd && k.bf16 == bf16) {
            ok = run_case_on(&k, cs, bf16, seed, verbose) && ok;
            ++ran;
        }
    if (!ran) printf("FAIL no kernel for D %d\n", cs.D);
    return ok && ran;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "lazy";
    eager = !strcmp(mode, "eager");
    shuffle_order = argc > 2 && !strcmp(argv[2], "shuffle");
    int fails = 0;
    const bool quick = argc > 3;
    std::vector<int> dims = {8, 32, 40, 64, 72, 96, 128, 136, 160, 192, 200, 224, 256};
    unsigned seed = 7;
    // Every bucket, both dtypes: a mixed case (GQA, odd lengths, causal + Lq != Lk, lse)
    for (int bf = 0; bf < 2; ++bf)
        for (int D : dims) {
            Case c{1, 2, 1, 77, 150, D, -1, 0, 0.f, false, 0, 1.f, true};
            fails += !run_case(c, bf, seed++, !quick);
        }
    // Masks and shapes on a few buckets
    for (int D : {64, 128, 40, 256, 32, 96}) {
        if (quick && D != 96 && D != 64) continue;
        for (int bf = 0; bf < 2; ++bf) {
            Case cases[] = {
                {1, 1, 1, 130, 200, D, -1, -1, 0.f, false, 0, 1.f, true},   // full, tail tiles
                {2, 2, 2, 200, 90, D, -1, 0, 0.f, true, 8, 1.f, true},      // causal Lq > Lk: empty rows, BHSD, padding
                {1, 2, 1, 150, 260, D, 20, 5, 0.f, false, 16, 1.f, true},   // window both sides
                {1, 1, 1, 64, 64, D, 0, 0, 0.f, false, 0, 1.f, true},       // diagonal only
                {1, 1, 1, 100, 300, D, 3, -1, 0.f, false, 0, 1.f, false},   // left window, right unbounded, no lse
                {1, 3, 1, 129, 129, D, -1, -1, 30.f, false, 0, 3.f, true},  // softcap
                {1, 1, 1, 40, 0, D, -1, -1, 0.f, false, 0, 1.f, true},      // no keys at all
                {1, 1, 1, 70, 70, D, -1, -1, 0.f, false, 0, 40.f, true},    // huge logits
                {1, 1, 1, 1, 1, D, -1, -1, 0.f, false, 0, 1.f, true},       // single element
                {1, 1, 1, 300, 20, D, 5, 2, 0.f, false, 0, 1.f, true},      // tiny window, Lq >> Lk
                {1, 2, 1, 90, 200, D, -1, 0, 0.f, false, 0, 1.f, true, true},   // top-left causal, Lq < Lk
                {1, 1, 1, 200, 70, D, 10, 3, 0.f, true, 8, 1.f, true, true},    // top-left window, Lq > Lk
            };
            for (auto &c : cases) fails += !run_case(c, bf, seed++, !quick);
        }
    }
    if (argc > 4) {
        std::mt19937 r(atoi(argv[4]));
        for (int it = 0; it < 80; ++it) {
            Case c;
            c.B = 1 + r() % 2; c.Hk = 1 + r() % 2; c.Hq = c.Hk * (1 + r() % 3);
            c.Lq = 1 + r() % 300; c.Lk = r() % 10 == 0 ? 0 : 1 + r() % 300;
            c.D = 8 * (1 + r() % 32);
            c.wl = r() % 2 ? -1 : (int)(r() % 150); c.wr = r() % 2 ? -1 : (int)(r() % 150);
            c.softcap = r() % 4 == 0 ? 5.f + r() % 50 : 0.f;
            c.bhsd = r() % 2; c.pad = 8 * (r() % 3); c.amp = r() % 5 == 0 ? 20.f : 1.f; c.lse = r() % 5 != 0;
            fails += !run_case(c, r() % 2, seed++, true);
        }
    }
    printf("ldmatrix phases %ld, with bank conflicts %ld\n", ldsm_phases, ldsm_conflicts);
    printf("%s: %d failing cases, %ld emulator errors\n", mode, fails, errors);
    return fails || errors;
}
