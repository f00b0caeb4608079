// Tiled backward (FlashAttention-2's algorithm) on mma.sync tensor cores, sm80+.
// DESIGN.md section 1b: with P_ij = e^{s_ij - LSE_i}, D_i = <dO_i, O_i>,
//   dV_j = sum_i P_ij dO_i,   dS_ij = P_ij (<dO_i, V_j> - D_i) (times the
//   softcap's derivative),   dK_j = scale sum_i dS_ij Q_i,
//   dQ_i = scale sum_j dS_ij K_j.
//
// Three kernels, one stream:
//   1. fa_bwd_sm80_pre_*: D_i per row into the workspace, and the f32 dQ
//      accumulator (and the deterministic mode's turn counters) zeroed.
//   2. fa_bwd_sm80_*_hdN: one CTA per block of 64 keys of one KV head. K and
//      V stay in shared memory; for each query head of the group and each
//      64-query block that sees a key of the block (so a window costs
//      O(window)):
//        S^T = K Q^T, dP^T = V dO^T     warps: 16 keys x 64/SPLIT queries
//        P^T, dS^T -> shared (16-bit)   (the masks, softcap, ALiBi here)
//        dV += P^T dO, dK += dS^T Q     warps: 16 keys x D/SPLIT columns,
//                                       f32 accumulators held in registers
//                                       across the whole loop
//        dQ_blk = dS K                  warps: 16 queries x D/SPLIT columns,
//                                       added to the f32 accumulator
//      Every GEMM reads its operands from the same shared tiles, transposed
//      by ldmatrix where the GEMM needs it (common/sm80_frag.cuh), so no tile
//      is stored twice. dK and dV are summed over the group's query heads in
//      registers: GQA needs no second pass and no atomics for them.
//   3. fa_bwd_sm80_dq_*: dQ = scale * accumulator, into dQ's own layout.
//
// dQ gets contributions from every key block, so CTAs add into the f32
// accumulator with reductions (red.global.add, paired on sm90).
// Deterministic mode orders those adds: the CTAs that visit a query block
// take turns in key-block order (descending under causal and window masks)
// through a counter per (batch, head, query block) — the same additions in
// the same order on every run, hence bitwise-identical gradients. A CTA
// takes its block from a ticket counter, not blockIdx, so it only ever
// waits for CTAs that started before it, whatever the dispatch order
// (FlashAttention-3's mode assumes grid-order dispatch instead).
//
// Tile shape: 64 keys x 64 queries; 4 warps up to hd64, 8 above (SPLIT = 2
// halves the per-warp columns, so dK + dV take D registers per thread at
// any D). Measured on an H200: docs/perf-notes.md.
#include "params.h"
#include "common/types.cuh"
#include "common/copy.cuh"
#include "common/mma.cuh"
#include "common/math.cuh"
#include "common/swizzle.cuh"
#include "common/sm80_tile_io.cuh"
#include "common/sm80_frag.cuh"
#include "common/opaque.cuh"
#include "common/sequence.cuh"

namespace {

template <int HD>
struct Sm80BwdCfg {
    static constexpr int kBlockM = FA_BWD_SM80_BLOCK;  // queries per step
    static constexpr int kBlockN = FA_BWD_SM80_BLOCK;  // keys per CTA
    static constexpr int kWarps = HD <= 64 ? 4 : 8;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kSplit = kWarps / 4;          // 4 row groups of 16 x kSplit
    static constexpr int kTileBytes = kBlockN * HD * 2;
    // Q/dO (and LSE/D) buffers: two, so that the next step's copies fly
    // under this step's GEMMs, where that fits beside K and V (to hd128:
    // 113 KiB; hd256 would need 208 KiB, more than an A100's 163).
    static constexpr int kQBufs = HD <= 128 ? 2 : 1;
    // K, V; Q, dO per buffer; P^T, dS^T; LSE and D of the query block per buffer.
    static constexpr int kK = 0, kV = kTileBytes;
    static constexpr int kQ0 = 2 * kTileBytes;  // buffer n: Q at kQ0 + 2n tiles, dO one tile after
    static constexpr int kPT = (2 + 2 * kQBufs) * kTileBytes, kDS = kPT + kBlockN * kBlockM * 2;
    static constexpr int kRows0 = kDS + kBlockN * kBlockM * 2;  // buffer n: LSE at kRows0 + 2n * kBlockM * 4, D after
    static constexpr int kSmemBytes = kRows0 + kQBufs * 2 * kBlockM * 4;  // src/params.rs: bwd_sm80_smem_bytes
    static_assert(kSmemBytes <= 227 * 1024, "sm90's shared memory per block");
    static_assert(kBlockM == 64 && kBlockN == 64, "4 row groups of 16 in both directions");
    static_assert(HD % 32 == 0 && (HD / kSplit) % 16 == 0, "");
};

// Turns of the deterministic mode (see the top of the file).
__device__ __forceinline__ int fa_ld_acquire(const int32_t *p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void fa_red_release_add1(int32_t *p) {
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(p) : "memory");
}
__device__ __forceinline__ void fa_bwd_wait_turn(const int32_t *sem, int turn) {
    if (threadIdx.x == 0)
        while (fa_ld_acquire(sem) != turn) __nanosleep(64);
    __syncthreads();
}
// dQ partials into the f32 accumulator, two adjacent columns per call (c
// even, head_dim a multiple of 8, the workspace 16-byte aligned). On sm90
// one explicit 8-byte vector reduction: for a plain atomicAdd whose result
// is unused, sm_90a's ptxas chose ATOMG (a returning atomic, its registers
// scoreboarded until L2 answers; 1.8x the kernel's time on an H200) where
// sm_80's chose RED, which atomicAdd keeps there (with the address offsets
// folded in, which an asm operand would not allow). The compile tier checks
// both in the SASS.
__device__ __forceinline__ void fa_red_add_f32x2(float *p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}
// Ends the step: the barrier orders every thread's adds before thread 0's
// release (cumulative at gpu scope), as CUTLASS's generic barrier and
// FlashAttention-3's deterministic dQ do. Per-thread fences (a fence.sc
// each, waiting for that thread's reductions to reach L2) cost the mode
// 1.33x the atomic mode's time on the H200 (2026-11-26). The other warps go
// on to the next step's copies while thread 0's release drains.
__device__ __forceinline__ void fa_bwd_pass_turn(int32_t *sem) {
    __syncthreads();
    if (threadIdx.x == 0) fa_red_release_add1(sem);
}

// The launch's dynamic shared memory: the host computes it with its own
// formula (src/params.rs), so the kernel checks it got what it addresses.
__device__ __forceinline__ uint32_t fa_dynamic_smem_bytes() {
    uint32_t v;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(v));
    return v;
}

// A compile-time bool as a value, for lambdas that take the branch as a type.
template <bool B>
struct FaBool {
    static constexpr bool value = B;
};

__device__ __forceinline__ int fa_floor_div(int x, int d) { return x >= 0 ? x / d : -((d - 1 - x) / d); }

// One sequence of the launch. Packed batches (cu_seqlens): the parameters
// are bound to sequence b (common/sequence.cuh moves Q, K, V, O, LSE and sets
// its lengths and diagonal; dO, dQ, dK, dV move here the same way);
// rectangular batches pass through. The workspace is indexed by token: row
// (token, h) of the dQ accumulator and D at (token * Hq + h), the token being
// row0 + i; the turn counters of (b, h) at turns0 + h * blocks, `blocks`
// counting the query blocks of the launch's longest sequence.
struct FaBwdSeq {
    int64_t row0, turns0;
    int blocks;
};
template <typename T>
__device__ __forceinline__ FaBwdSeq fa_bwd_bind(FaBwdParams &p, int b) {
    const FaFwdParams &f = p.fwd;
    const int blocks = (f.seqlen_q + FA_BWD_SM80_BLOCK - 1) / FA_BWD_SM80_BLOCK;
    FaBwdSeq seq{static_cast<int64_t>(b) * f.seqlen_q, static_cast<int64_t>(b) * f.heads_q * blocks, blocks};
    if (f.cu_seqlens_q != nullptr) {
        const int q0 = f.cu_seqlens_q[b];
        seq.row0 = q0;
        p.d_o = static_cast<const T *>(p.d_o) + static_cast<int64_t>(q0) * p.do_row_stride;
        p.dq = static_cast<T *>(p.dq) + static_cast<int64_t>(q0) * p.dq_row_stride;
    }
    if (f.cu_seqlens_k != nullptr) {
        const int k0 = f.cu_seqlens_k[b];
        p.dk = static_cast<T *>(p.dk) + static_cast<int64_t>(k0) * p.dk_row_stride;
        p.dv = static_cast<T *>(p.dv) + static_cast<int64_t>(k0) * p.dv_row_stride;
    }
    fa_bind_sequence<T>(p.fwd, b);
    return seq;
}

// The workspace row of query i of the bound sequence, head h.
__device__ __forceinline__ int64_t fa_bwd_row(const FaBwdSeq &seq, const FaFwdParams &f, int h, int i) {
    return (seq.row0 + i) * f.heads_q + h;
}

// 1. One warp per query row: D_i, the row's accumulator zeroed, and the turn
// counter of its query block (by the block's first row).
template <typename T>
__device__ __forceinline__ void sm80_bwd_pre(const FaBwdParams &launch) {
    // The deterministic mode's ticket counter (see sm80_backward).
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0 && launch.dq_ticket != nullptr)
        *reinterpret_cast<uint32_t *>(launch.dq_ticket) = 0u;
    FaBwdParams p = launch;
    const int lane = threadIdx.x % 32, i = blockIdx.x * 4 + threadIdx.x / 32, h = blockIdx.y, b = blockIdx.z;
    const FaBwdSeq seq = fa_bwd_bind<T>(p, b);
    const FaFwdParams &f = p.fwd;
    if (i >= f.seqlen_q) return;
    const T *o = static_cast<const T *>(f.o) + b * f.o_batch_stride + i * f.o_row_stride + h * f.o_head_stride;
    const T *d_o = static_cast<const T *>(p.d_o) + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
    const int64_t row = fa_bwd_row(seq, f, h, i);
    float *acc = p.dq_accum + row * f.head_dim;
    float dot = 0.f;
    for (int d = lane; d < f.head_dim; d += 32) {
        dot = fmaf(fa_to_float(d_o[d]), fa_to_float(o[d]), dot);
        *reinterpret_cast<float *>(acc + d) = 0.f;
    }
#pragma unroll
    for (int s = 16; s > 0; s /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, s);
    if (lane == 0) {
        *reinterpret_cast<float *>(p.delta + row) = dot;
        if (i % FA_BWD_SM80_BLOCK == 0)
            *reinterpret_cast<int32_t *>(p.dq_turns + seq.turns0 + h * seq.blocks + i / FA_BWD_SM80_BLOCK) = 0;
    }
}

#define FA_BWD_SM80_DSINK_THREADS 256

// 3. One warp per query row: dQ = scale * accumulator.
template <typename T>
__device__ __forceinline__ void sm80_bwd_dq(const FaBwdParams &launch) {
    FaBwdParams p = launch;
    const int lane = threadIdx.x % 32, i = blockIdx.x * 4 + threadIdx.x / 32, h = blockIdx.y, b = blockIdx.z;
    const FaBwdSeq seq = fa_bwd_bind<T>(p, b);
    const FaFwdParams &f = p.fwd;
    if (i >= f.seqlen_q) return;
    const float *acc = p.dq_accum + fa_bwd_row(seq, f, h, i) * f.head_dim;
    T *dq = static_cast<T *>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride;
    for (int d = lane; d < f.head_dim; d += 32) *reinterpret_cast<T *>(dq + d) = fa_from_float<T>(f.scale * acc[d]);
}

// 4. With sinks, their gradient: one CTA per query head h sums
// -e^{sink_h - LSE} D over every token in a fixed order (strided per thread,
// then shuffles, then the 8 warps' sums in order), so it is deterministic;
// D comes from the workspace. Dynamic shared memory: 8 floats.
template <typename T>
__device__ __forceinline__ void sm80_bwd_dsink(const FaBwdParams &p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const FaFwdParams &f = p.fwd;
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid % 32;
    const bool packed = f.cu_seqlens_q != nullptr;
    const int64_t tokens = packed ? f.cu_seqlens_q[f.batch] : static_cast<int64_t>(f.batch) * f.seqlen_q;
    const float sink = f.sinks[h];
    float acc = 0.f;
    for (int64_t t = tid; t < tokens; t += FA_BWD_SM80_DSINK_THREADS) {
        // A packed batch's LSE rows run on through its sequences (batch stride 0).
        const int64_t l = packed ? h * f.lse_head_stride + t
                                 : (t / f.seqlen_q) * f.lse_batch_stride + h * f.lse_head_stride + t % f.seqlen_q;
        acc -= expf(sink - f.lse[l]) * p.delta[t * f.heads_q + h];
    }
#pragma unroll
    for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) *reinterpret_cast<float *>(smem + 4 * (tid / 32)) = acc;
    __syncthreads();
    if (tid == 0) {
        float sum = 0.f;
        for (int w = 0; w < FA_BWD_SM80_DSINK_THREADS / 32; ++w) sum += *reinterpret_cast<const float *>(smem + 4 * w);
        *reinterpret_cast<float *>(p.dsinks + h) = sum;
    }
}

// 2. The main kernel: grid (key blocks, KV heads, batch).
template <typename T, int HD>
__device__ __forceinline__ void sm80_backward(const FaBwdParams &launch) {
    using Cfg = Sm80BwdCfg<HD>;
    constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, THREADS = Cfg::kThreads, SPLIT = Cfg::kSplit;
    constexpr int CH = HD / 8;      // 16-byte chunks per K/V/Q/dO row
    constexpr int PCH = BM / 8;     // per P^T/dS^T row
    constexpr int QW = BM / SPLIT;  // queries per warp in the S phase
    constexpr int CW = HD / SPLIT;  // gradient columns per warp
    using PSwz = RowSwizzle<PCH>;

    extern __shared__ __align__(128) unsigned char smem[];
    if (fa_dynamic_smem_bytes() < Cfg::kSmemBytes) __trap();  // a host/kernel mismatch, never silent
    const uint32_t base = smem_u32(smem);
    const uint32_t k_tile = base + Cfg::kK, v_tile = base + Cfg::kV;
    const uint32_t pt_tile = base + Cfg::kPT, ds_tile = base + Cfg::kDS;
    constexpr int QBUFS = Cfg::kQBufs;
    auto q_tile_of = [&](int buf) { return base + Cfg::kQ0 + 2 * buf * Cfg::kTileBytes; };
    auto rows_of = [&](int buf) { return Cfg::kRows0 + 2 * buf * BM * 4; };  // LSE at +0, D at +4 BM

    FaBwdParams p = launch;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tig = lane % 4;
    const int rg = warp % 4, part = warp / 4;  // row group of 16, and this warp's share of the other side
    // Which block this CTA is. Deterministic mode: the position in a ticket
    // taken at start, not blockIdx, so that a CTA only ever waits (for dQ
    // turns) on CTAs that took earlier tickets, which are running or done,
    // in whatever order the hardware dispatches CTAs (CUDA promises none).
    // The pre kernel zeroed the counter (a u32: 2^32 CTAs of 64 keys would
    // need terabytes of K); it runs whenever there are queries, the only
    // case with turns. The slot is P/dS^T's tile, first written after the
    // first step's barrier.
    uint32_t bx = blockIdx.x, hk_u = blockIdx.y, b_u = blockIdx.z;
    if (launch.deterministic && launch.fwd.seqlen_q > 0) {
        if (tid == 0) *reinterpret_cast<uint32_t *>(smem + Cfg::kDS) = atomicAdd(launch.dq_ticket, 1u);
        __syncthreads();
        const uint32_t t = *reinterpret_cast<const uint32_t *>(smem + Cfg::kDS);  // x fastest, as the grid
        bx = t % gridDim.x, hk_u = t / gridDim.x % gridDim.y, b_u = t / gridDim.x / gridDim.y;
    }
    // Deterministic mode with keys bounded on the right (causal, windows):
    // each query block's adds go from its last visiting key block down, and
    // key blocks are handed out in reverse, so that the block waited for
    // started first. Ascending, the diagonal block of query block m would
    // wait for m earlier key blocks to reach it: a staircase of idle CTAs
    // (measured 1.9x the atomic mode's time, causal hd128 S 4k, H200).
    // Descending, key block j reaches query block j + s at its step s, one
    // step after key block j + 1 did: no wait in the steady state.
    const bool desc = launch.deterministic && launch.fwd.window_right >= 0;
    const int n_blk = static_cast<int>(desc ? gridDim.x - 1 - bx : bx);
    const int hk = static_cast<int>(hk_u), b = static_cast<int>(b_u);
    const FaBwdSeq seq = fa_bwd_bind<T>(p, b);
    const FaFwdParams &f = p.fwd;
    const int n0 = n_blk * BN, off = f.diag_offset, wl = f.window_left, wr = f.window_right;
    // Past this sequence's keys (a packed batch's shorter one): nothing to
    // write, and no later key block of it has work either, so no dQ turn
    // waits for this one.
    if (n0 >= f.seqlen_k) return;

    // The queries that see a key of [n0, n0 + BN) (the whole block, also past
    // seqlen_k: the turn order below counts blocks the same way).
    const int q_lo = wr < 0 ? 0 : max(0, n0 - off - wr);
    const int q_hi = wl < 0 ? f.seqlen_q : min(f.seqlen_q, n0 + BN - off + wl);
    const int m_first = q_lo / BM, m_end = q_lo < q_hi ? (q_hi + BM - 1) / BM : m_first;
    // K and V of the block, once (not at all if no query sees them: a
    // copy never waited for is out of contract).
    const T *k = static_cast<const T *>(f.k) + b * f.k_batch_stride + hk * f.k_head_stride;
    const T *v = static_cast<const T *>(f.v) + b * f.v_batch_stride + hk * f.v_head_stride;
    const Sm80TileLoader<T, BN, CH, THREADS> loader(tid, f.head_dim);
    if (m_first < m_end) {
        loader.load(k_tile, k + static_cast<int64_t>(n0) * f.k_row_stride, f.k_row_stride, f.seqlen_k - n0,
                static_cast<const T *>(f.k));
        loader.load(v_tile, v + static_cast<int64_t>(n0) * f.v_row_stride, f.v_row_stride, f.seqlen_k - n0,
                static_cast<const T *>(f.v));
        cp_async_commit();
    }

    // This key block's turn at query block m. Ascending, keys are unbounded
    // on the right, hence on the left too (a window bounds both sides: the
    // full mask): every key block visits every query block, from block 0.
    // Descending: the distance from the last key block that visits m, the
    // last whose queries [q_lo, q_hi) above reach into block m and the
    // sequence, and that has keys.
    auto turn_of = [&](int m) {
        if (!desc) return n_blk;
        const int last = min((f.seqlen_k + BN - 1) / BN - 1,
                             fa_floor_div(min((m + 1) * BM, f.seqlen_q) + off + wr - 1, BN));
        return last - n_blk;
    };

    float dk[CW / 8][4], dv[CW / 8][4];
#pragma unroll
    for (int t = 0; t < CW / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

    // Steps: (query head of the group, query block) pairs, heads outer.
    const int nm = m_end - m_first, steps = nm * f.q_per_kv;
    // Issues the Q/dO copies of `step` into buffer `buf` (one commit group)
    // and stores its LSE and D rows there. The buffer's previous readers
    // finished at the barrier that ended their step.
    // Its pointers come from parameters bound again here, from an opaque
    // batch index: held across the loop instead, they spilled hd256.
    auto issue = [&](int step, int buf) {
        FaBwdParams pb = launch;
        fa_bwd_bind<T>(pb, fa_opaque(b));
        const int h = hk * f.q_per_kv + step / nm, m0 = (m_first + step % nm) * BM;
        const T *q = static_cast<const T *>(pb.fwd.q) + b * f.q_batch_stride + h * f.q_head_stride;
        const T *d_o = static_cast<const T *>(pb.d_o) + b * p.do_batch_stride + h * p.do_head_stride;
        loader.load(q_tile_of(buf), q + static_cast<int64_t>(m0) * f.q_row_stride, f.q_row_stride, f.seqlen_q - m0,
                    static_cast<const T *>(f.q));
        loader.load(q_tile_of(buf) + Cfg::kTileBytes, d_o + static_cast<int64_t>(m0) * p.do_row_stride,
                    p.do_row_stride, f.seqlen_q - m0, static_cast<const T *>(p.d_o));
        // LSE and D ride in the same group: read synchronously, they held
        // two warps for an L2 round trip every step while the rest waited
        // at the barrier. Rows past the end get zeros (nothing read).
        if (tid < BM) {
            const int i = m0 + tid;
            const bool in = i < f.seqlen_q;
            const float *lse = pb.fwd.lse + b * f.lse_batch_stride + h * f.lse_head_stride;
            cp_async_4(base + rows_of(buf) + 4 * tid, in ? lse + i : lse, in ? 4 : 0);
            cp_async_4(base + rows_of(buf) + 4 * (BM + tid), in ? p.delta + fa_bwd_row(seq, f, h, i) : p.delta,
                       in ? 4 : 0);
        }
        cp_async_commit();
    };
    if (QBUFS == 2 && steps > 0) issue(0, 0);

    for (int step = 0; step < steps; ++step) {
        const int buf = QBUFS == 2 ? step & 1 : 0;
        if (QBUFS == 2 && step + 1 < steps) {
            issue(step + 1, buf ^ 1);
            cp_async_wait<1>();  // all but the copies just issued
        } else {
            if (QBUFS == 1) issue(step, 0);
            cp_async_wait<0>();
        }
        __syncthreads();
        const int h = hk * f.q_per_kv + step / nm, m = m_first + step % nm, m0 = m * BM;
        const uint32_t q_tile = q_tile_of(buf), do_tile = q_tile + Cfg::kTileBytes;
        const int lse_at = rows_of(buf), delta_at = lse_at + 4 * BM;
        float *acc = p.dq_accum + fa_bwd_row(seq, f, h, 0) * f.head_dim;
        const int64_t acc_row_step = static_cast<int64_t>(f.heads_q) * f.head_dim;  // one token on
        int32_t *turns = p.dq_turns + seq.turns0 + h * seq.blocks;
        const float slope = f.alibi_slopes != nullptr ? f.alibi_slopes[b * f.alibi_batch_stride + h] : 0.f;
        // The whole 64 x 64 tile is seen by every row, and scores are plain.
        const bool interior = f.softcap <= 0.f && f.alibi_slopes == nullptr && m0 + BM <= f.seqlen_q &&
                              n0 + BN <= f.seqlen_k && (wl < 0 || n0 >= m0 + BM - 1 + off - wl) &&
                              (wr < 0 || n0 + BN - 1 <= m0 + off + wr);
        const float scale_log2 = f.scale * 1.4426950408889634f;
        // Clamped: 1/c is inf for a subnormal cap, and 0 * inf would be NaN
        // for the zero scores of rows and keys past the ends.
        const float inv_cap = f.softcap > 0.f ? fminf(1.f / f.softcap, 3.40282347e38f) : 0.f;
        {
            // hd256: the fragment addresses derive from an opaque lane, so
            // ptxas recomputes them each step instead of holding dozens
            // across the loop beside 128 accumulators (that spilled).
            const int fl = HD > 128 ? fa_opaque(lane) : lane;

            // ---- S^T = K Q^T and dP^T = V dO^T; P^T and dS^T to shared ----
            // In slabs of QS queries: at hd256 all QW at once spilled (sm_90a).
            constexpr int QS = HD > 128 ? 16 : QW;
#pragma unroll
            for (int q0 = part * QW; q0 < (part + 1) * QW; q0 += QS) {
                float s[QS / 8][4], dp[QS / 8][4];
#pragma unroll
                for (int t = 0; t < QS / 8; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.f;
#pragma unroll
                for (int ks = 0; ks < HD / 16; ++ks) {
                    uint32_t ka[4], va[4];
                    frag_a<CH>(ka, k_tile, 16 * rg, 16 * ks, fl);
                    frag_a<CH>(va, v_tile, 16 * rg, 16 * ks, fl);
#pragma unroll
                    for (int t = 0; t < QS / 16; ++t) {
                        uint32_t qb[4], ob[4];
                        frag_b2<CH>(qb, q_tile, q0 + 16 * t, 16 * ks, fl);
                        frag_b2<CH>(ob, do_tile, q0 + 16 * t, 16 * ks, fl);
                        mma_16816<T>(s[2 * t], ka, qb[0], qb[1]);
                        mma_16816<T>(s[2 * t + 1], ka, qb[2], qb[3]);
                        mma_16816<T>(dp[2 * t], va, ob[0], ob[1]);
                        mma_16816<T>(dp[2 * t + 1], va, ob[2], ob[3]);
                    }
                }
                // P and dS of this slab, stored transposed. A tile that every
                // row sees whole, without softcap or ALiBi (most tiles of a
                // long sequence), takes the short path: one FFMA and an
                // exponential per score, no mask (a uniform branch around two
                // copies of the loop, not a test per score).
                auto scores = [&](auto interior) {
#pragma unroll
                    for (int t = 0; t < QS / 8; ++t) {
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) {
                            const int jl = 16 * rg + g + 8 * hf, il0 = q0 + 8 * t + 2 * tig;
                            const int j = n0 + jl;
                            float pv[2], dsv[2];
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int il = il0 + e, i = m0 + il;
                                const float l = *reinterpret_cast<const float *>(smem + lse_at + 4 * il);
                                const float dl = *reinterpret_cast<const float *>(smem + delta_at + 4 * il);
                                if (decltype(interior)::value) {
                                    pv[e] = fa_exp2(fmaf(s[t][2 * hf + e], scale_log2, -l * 1.4426950408889634f));
                                    dsv[e] = pv[e] * (dp[t][2 * hf + e] - dl);
                                } else {
                                    float x = s[t][2 * hf + e] * f.scale, dcap = 1.f;
                                    if (f.softcap > 0.f) {
                                        const float th = tanhf(x * inv_cap);
                                        x = f.softcap * th;
                                        dcap = 1.f - th * th;
                                    }
                                    if (f.alibi_slopes != nullptr) x -= slope * fabsf(static_cast<float>(i + off - j));
                                    const bool seen = i < f.seqlen_q && j < f.seqlen_k && (wl < 0 || j >= i + off - wl) &&
                                                      (wr < 0 || j <= i + off + wr) && l != -INFINITY;
                                    pv[e] = seen ? fa_exp2((x - l) * 1.4426950408889634f) : 0.f;
                                    // Masked entries are exactly 0, whatever dP or the cap's derivative.
                                    dsv[e] = seen ? pv[e] * (dp[t][2 * hf + e] - dl) * dcap : 0.f;
                                }
                            }
                            const uint32_t at = PSwz::offset(jl, il0 / 8) + 2 * (il0 % 8);
                            *reinterpret_cast<uint32_t *>(smem + Cfg::kPT + at) = fa_pack2<T>(pv[0], pv[1]);
                            *reinterpret_cast<uint32_t *>(smem + Cfg::kDS + at) = fa_pack2<T>(dsv[0], dsv[1]);
                        }
                    }
                };
                if (interior) scores(FaBool<true>{});
                else scores(FaBool<false>{});
            }
            __syncthreads();

            // ---- dV += P^T dO, then dK += dS^T Q (16 keys x CW columns per
            // warp; one after the other, as together their fragments spilled hd256) ----
#pragma unroll
            for (int which = 0; which < 2; ++which) {
                const uint32_t a_tile = which == 0 ? pt_tile : ds_tile, b_tile = which == 0 ? do_tile : q_tile;
                float(&acc2)[CW / 8][4] = which == 0 ? dv : dk;
#pragma unroll
                for (int ks = 0; ks < BM / 16; ++ks) {
                    uint32_t a[4];
                    frag_a<PCH>(a, a_tile, 16 * rg, 16 * ks, fl);
#pragma unroll
                    for (int t = 0; t < CW / 16; ++t) {
                        uint32_t bb[4];
                        frag_b2_t<CH>(bb, b_tile, 16 * ks, part * CW + 16 * t, fl);
                        mma_16816<T>(acc2[2 * t], a, bb[0], bb[1]);
                        mma_16816<T>(acc2[2 * t + 1], a, bb[2], bb[3]);
                    }
                }
            }

            // ---- dQ += dS K (16 queries x CW columns per warp, DQW at a time:
            // at hd256 a whole CW of accumulators beside dK and dV spilled) ----
            constexpr int DQW = CW <= 64 ? CW : 32;
#pragma unroll
            for (int c0 = 0; c0 < CW; c0 += DQW) {
                float dq[DQW / 8][4];
#pragma unroll
                for (int t = 0; t < DQW / 8; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) dq[t][e] = 0.f;
#pragma unroll
                for (int ks = 0; ks < BN / 16; ++ks) {
                    uint32_t sa[4];
                    frag_a_t<PCH>(sa, ds_tile, 16 * ks, 16 * rg, fl);
#pragma unroll
                    for (int t = 0; t < DQW / 16; ++t) {
                        uint32_t kb[4];
                        frag_b2_t<CH>(kb, k_tile, 16 * ks, part * CW + c0 + 16 * t, fl);
                        mma_16816<T>(dq[2 * t], sa, kb[0], kb[1]);
                        mma_16816<T>(dq[2 * t + 1], sa, kb[2], kb[3]);
                    }
                }
                if (c0 == 0 && p.deterministic) fa_bwd_wait_turn(turns + m, turn_of(m));
#pragma unroll
                for (int t = 0; t < DQW / 8; ++t)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {  // rows g and g + 8; columns c, c + 1
                        const int i = m0 + 16 * rg + g + 8 * hf;
                        const int c = part * CW + c0 + 8 * t + 2 * tig;
                        if (i < f.seqlen_q && c < f.head_dim)
                            fa_red_add_f32x2(acc + i * acc_row_step + c, dq[t][2 * hf], dq[t][2 * hf + 1]);
                    }
            }
            // Before the next step's loads overwrite the tiles: a barrier,
            // in deterministic mode the one that passes the turn.
            if (p.deterministic) fa_bwd_pass_turn(turns + m);
            else __syncthreads();
        }
    }

    // ---- dK = scale * dK, dV: this warp's 16 keys x CW columns ----
    FaBwdParams pb = launch;
    fa_bwd_bind<T>(pb, fa_opaque(b));
    T *dkp = static_cast<T *>(pb.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
    T *dvp = static_cast<T *>(pb.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
#pragma unroll
    for (int t = 0; t < CW / 8; ++t)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int j = n0 + 16 * rg + g + 8 * hf, c = part * CW + 8 * t + 2 * tig;
            if (j < f.seqlen_k && c < f.head_dim) {
                *reinterpret_cast<uint32_t *>(dkp + static_cast<int64_t>(j) * p.dk_row_stride + c) =
                    fa_pack2<T>(f.scale * dk[t][2 * hf], f.scale * dk[t][2 * hf + 1]);
                *reinterpret_cast<uint32_t *>(dvp + static_cast<int64_t>(j) * p.dv_row_stride + c) =
                    fa_pack2<T>(dv[t][2 * hf], dv[t][2 * hf + 1]);
            }
        }
}

}  // namespace

// Loaded by name (src/ops/backward.rs), not through the forward's table.
// Shared memory per CTA: Sm80BwdCfg<HD>::kSmemBytes (src/params.rs mirrors it).
#define FA_BWD_SM80_AUX(dtype)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) fa_bwd_sm80_pre_##dtype(const __grid_constant__ FaBwdParams p) { \
        sm80_bwd_pre<FA_DTYPE(dtype)>(p);                                                                \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) fa_bwd_sm80_dq_##dtype(const __grid_constant__ FaBwdParams p) { \
        sm80_bwd_dq<FA_DTYPE(dtype)>(p);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FA_BWD_SM80_DSINK_THREADS)                              \
        fa_bwd_sm80_dsink_##dtype(const __grid_constant__ FaBwdParams p) {                               \
        sm80_bwd_dsink<FA_DTYPE(dtype)>(p);                                                              \
    }
#define FA_BWD_SM80(dtype, hd)                                                                           \
    extern "C" __global__ void __launch_bounds__(Sm80BwdCfg<hd>::kThreads)                               \
        fa_bwd_sm80_##dtype##_hd##hd(const __grid_constant__ FaBwdParams p) {                            \
        sm80_backward<FA_DTYPE(dtype), hd>(p);                                                           \
    }
FA_BWD_SM80_AUX(f16)
FA_BWD_SM80_AUX(bf16)
FA_BWD_SM80(f16, 64)
FA_BWD_SM80(f16, 128)
FA_BWD_SM80(f16, 256)
FA_BWD_SM80(bf16, 64)
FA_BWD_SM80(bf16, 128)
FA_BWD_SM80(bf16, 256)

// This file has no FA_KERNEL rows (nothing here serves the forward's
// dispatcher); build.rs compiles it for the archs from this one:
// FA_IMAGE_MIN_SM 80
