// Hopper forward (FlashAttention-3 structure, written from the papers and the
// PTX ISA), sm_90a only: wgmma tensor cores, TMA loads, warp specialisation.
//
// One CTA computes O for block_m = 128 query rows of one (batch, query head)
// with three warpgroups:
//   producer (WG 0): gives most of its registers away (setmaxnreg.dec); one
//     thread issues every TMA load: Q once, then K_j and V_j of each visible
//     key tile into a ring of `stages` shared buffers, each slot guarded by a
//     full and an empty mbarrier.
//   consumers (WG 1, 2): take the registers (setmaxnreg.inc); each owns 64
//     query rows and, per key tile j:
//       S = Q K_j^T            wgmma, Q and K from shared memory (both K-major)
//       scale / softcap, mask   element mask only on tiles that straddle an edge
//       online softmax          m, l, P = exp2(S - m), all in registers
//       O += P V_j              wgmma, P from registers as the A operand, V from
//                               shared memory as an MN-major ("transposed") B
//     then O / l is staged in shared memory (over the dead Q rows) and stored
//     with 16-byte global writes; LSE = m + ln l.
//
// Overlap (both FlashAttention-3 features are implemented):
//   * intra-warpgroup pipelining: iteration j issues S_j = Q K_j^T and then
//     O += P_{j-1} V_{j-1} back to back, and runs the softmax of S_j while
//     the second GEMM is still on the tensor cores;
//   * inter-warpgroup ping-pong: two named barriers hand a "GEMM issue" turn
//     back and forth, so one consumer's softmax runs under the other's GEMMs.
//
// Masking: only key tiles that intersect the CTA's visible band are loaded
// and computed (a window of width w costs O(w)); tiles visible to every row
// skip the element mask. Rows past seqlen_q and keys past seqlen_k come in as
// TMA zero fill; keys past seqlen_k are masked, rows past seqlen_q never stored.
//
// Grid: one CTA per (128-row block, query head, batch), reversed in x so the
// longest causal row blocks start first. A persistent tile scheduler (one CTA
// per SM looping over tiles, overlapping one tile's epilogue with the next
// tile's loads) is the natural next step; it would change the launch shape.
//
// Tile shapes (Sm90Shape below) are first choices made without a GPU, after
// FlashAttention-3's published ones; re-measure them on hardware.
#include "params.h"
#include "common/types.cuh"
#include "common/mask.cuh"
#include "common/sm90_mbarrier.cuh"
#include "common/sm90_tma.cuh"
#include "common/sm90_warpgroup.cuh"
#include "common/sm90_wgmma.cuh"
#include "common/sm90_softmax.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "fwd_sm90.cu uses sm_90a instructions (wgmma, setmaxnreg): compile it for sm_90a only"
#endif

namespace {

using namespace sm90;

// Per head-dim bucket: block_m, block_n, K/V ring stages.
//  hd64:  128 x 128, 4 stages (144 KiB): smem is not the limit, one CTA per SM
//         anyway (384 threads x 168 registers), so a deeper ring is free.
//  hd128: 128 x 128, 2 stages (160 KiB), as FA3.
//  hd256: 128 x 80, 2 stages: Q 64 KiB + 2 x (K 40 KiB + V 40 KiB) = 224 KiB of
//         the 227 KiB. block_n = 128 would need 64 KiB per K or V stage (no
//         second stage fits) and 64 S + 32 P registers on top of the 128 of
//         O; 80 keeps S at 40 and P at 20 registers (as FA3).
template <int BM, int BN, int STAGES>
struct Sm90ShapeOf {
    static constexpr int kBlockM = BM, kBlockN = BN, kStages = STAGES;
};
template <int HD> struct Sm90Shape;
//                                            block_m block_n stages
template <> struct Sm90Shape<64>  : Sm90ShapeOf<128,    128,    4> {};
template <> struct Sm90Shape<128> : Sm90ShapeOf<128,    128,    2> {};
template <> struct Sm90Shape<256> : Sm90ShapeOf<128,     80,    2> {};

template <int HD>
struct Sm90Config : Sm90Shape<HD> {
    using S = Sm90Shape<HD>;
    static constexpr int kConsumers = 2;  // consumer warpgroups, 64 query rows each
    static constexpr int kThreads = kWarpgroupThreads * (1 + kConsumers);
    // The launch gives every thread 65536 / 384 -> 168 registers; the producer
    // hands back down to 24 and each consumer thread takes up to 240:
    // 128 x (24 + 2 x 240) = 128 x 3 x 168.
    static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
    static constexpr int kProducerRegs = 24, kConsumerRegs = 240;

    static constexpr int kBoxes = HD / 64;  // 64-column TMA boxes (128 swizzled bytes per row)
    static constexpr int kQBoxBytes = S::kBlockM * 128;
    static constexpr int kKvBoxBytes = S::kBlockN * 128;
    static constexpr int kQBytes = kBoxes * kQBoxBytes;
    static constexpr int kKvBytes = kBoxes * kKvBoxBytes;  // one K or one V tile

    // Shared layout from a 1024-byte aligned base: Q | K ring | V ring | mbarriers.
    static constexpr int kQOff = 0;
    static constexpr int kKOff = kQOff + kQBytes;
    static constexpr int kVOff = kKOff + S::kStages * kKvBytes;
    static constexpr int kBarOff = kVOff + S::kStages * kKvBytes;
    static constexpr int kNumBars = 1 + 4 * S::kStages;  // Q full; K, V full and empty per stage
    // +1024: dynamic shared memory is only guaranteed 16-byte alignment, and
    // 128-byte swizzled boxes need 1024 (the base is rounded up in the kernel).
    static constexpr int kSmemBytes = kBarOff + 8 * kNumBars + 1024;

    // Empty barriers count one arrival per consumer warp (each warp releases
    // after its own wgmma.wait_group; see release() in the kernel).
    static constexpr int kReleasers = 4 * kConsumers;

    static_assert(S::kBlockM == 64 * kConsumers, "each consumer warpgroup owns 64 rows (wgmma m64)");
    static_assert(HD % 64 == 0, "head-dim buckets are whole 64-column boxes");
    static_assert(S::kBlockN % 16 == 0 && S::kBlockN <= 256, "wgmma N and the k16 steps of P V");
    static_assert(S::kBlockN % 8 == 0 && kKvBoxBytes % 1024 == 0, "every box 1024-byte aligned");
    static_assert(S::kStages >= 2, "the pipeline needs K_{j+1} in flight while tile j is used");
    static_assert(kSmemBytes <= 232448, "sm90 allows 227 KiB of dynamic shared memory per CTA");
    static_assert(kProducerRegs + kConsumers * kConsumerRegs <= (1 + kConsumers) * kLaunchRegs,
                  "setmaxnreg.inc would wait forever for registers");
};

// Named barrier ids (0 is __syncthreads): the ping-pong turn of consumer c is
// kBarTurn + c; the epilogue of consumer c syncs its warpgroup on kBarEpilogue + c.
constexpr int kBarTurn = 1;
constexpr int kBarEpilogue = 3;
constexpr int kBothConsumers = 2 * kWarpgroupThreads;

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int HD>
__device__ __forceinline__ void sm90_forward(const FaFwdSm90Params &P) {
    using Cfg = Sm90Config<HD>;
    constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, STAGES = Cfg::kStages;
    const FaFwdParams &p = P.p;

    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;        // shared-window address, for PTX
    unsigned char *const smem = smem_raw + (base - raw);  // the same bytes, for C++

    const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (causal) row blocks first
    const int m0 = m_block * BM, head = blockIdx.y, batch = blockIdx.z;
    const int head_kv = head / p.q_per_kv;

    // ---- Which key tiles to visit (the same for every warp of the CTA) ----------
    // The band is monotone in the row: the CTA's rows see the union
    // [lo(first row), hi(last row)) and every row sees the intersection
    // [lo(last row), hi(first row)). Tiles outside the union are never loaded;
    // tiles inside the intersection need no element mask.
    const int row_end = min(m0 + BM, p.seqlen_q);
    const FaKeyRange any_row = fa_key_range_rows(p, m0, row_end);
    const int all_lo = fa_key_range(p, row_end - 1).lo, all_hi = fa_key_range(p, m0).hi;
    const int n_begin = any_row.lo / BN;
    const int n_tiles = any_row.lo < any_row.hi ? (any_row.hi + BN - 1) / BN - n_begin : 0;

    const uint32_t q_full = base + Cfg::kBarOff;
    auto k_full = [&](int s) { return q_full + 8 * (1 + s); };
    auto k_empty = [&](int s) { return q_full + 8 * (1 + STAGES + s); };
    auto v_full = [&](int s) { return q_full + 8 * (1 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return q_full + 8 * (1 + 3 * STAGES + s); };

    if (threadIdx.x == 0) {
        tma_prefetch_map(&P.tma_q);
        tma_prefetch_map(&P.tma_k);
        tma_prefetch_map(&P.tma_v);
        mbarrier_init(q_full, 1);  // the producer's arrive.expect_tx; the bytes do the rest
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(k_full(s), 1);
            mbarrier_init(v_full(s), 1);
            mbarrier_init(k_empty(s), Cfg::kReleasers);
            mbarrier_init(v_empty(s), Cfg::kReleasers);
        }
        mbarrier_init_fence();
    }
    // The last CTA-wide barrier: producer warps may exit early from here on,
    // so the roles below only use mbarriers and named barriers.
    __syncthreads();

    const int wg = threadIdx.x / kWarpgroupThreads;
    if (wg == 0) {
        // ===================== Producer =====================================
        setmaxnreg_dec<Cfg::kProducerRegs>();
        // No tile, no load: nothing may still be in flight when the CTA exits.
        if (threadIdx.x == 0 && n_tiles > 0) {
            mbarrier_arrive_expect_tx(q_full, Cfg::kQBytes);
#pragma unroll
            for (int c = 0; c < Cfg::kBoxes; ++c)
                tma_load_4d(base + Cfg::kQOff + c * Cfg::kQBoxBytes, &P.tma_q, 64 * c, m0, head,
                            batch, q_full);

            // Tile j goes to slot j % STAGES; a slot is free once every consumer
            // warp released its previous tile, j - STAGES (parity trick: the
            // first round waits on the "phase before the first" and passes).
            int stage = 0;
            uint32_t phase = 0;
            for (int j = 0; j < n_tiles; ++j) {
                const int n0 = (n_begin + j) * BN;
                mbarrier_wait(k_empty(stage), phase ^ 1);
                mbarrier_arrive_expect_tx(k_full(stage), Cfg::kKvBytes);
#pragma unroll
                for (int c = 0; c < Cfg::kBoxes; ++c)
                    tma_load_4d(base + Cfg::kKOff + stage * Cfg::kKvBytes + c * Cfg::kKvBoxBytes,
                                &P.tma_k, 64 * c, n0, head_kv, batch, k_full(stage));
                mbarrier_wait(v_empty(stage), phase ^ 1);
                mbarrier_arrive_expect_tx(v_full(stage), Cfg::kKvBytes);
#pragma unroll
                for (int c = 0; c < Cfg::kBoxes; ++c)
                    tma_load_4d(base + Cfg::kVOff + stage * Cfg::kKvBytes + c * Cfg::kKvBoxBytes,
                                &P.tma_v, 64 * c, n0, head_kv, batch, v_full(stage));
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
        }
        return;
    }

    // ======================== Consumers =========================================
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int cw = wg - 1;  // consumer index: owns CTA rows [64 cw, 64 cw + 64)
    const int tid = threadIdx.x % kWarpgroupThreads, warp = tid / 32, lane = tid % 32;
    // Accumulator rows of this thread: row0 (h = 0) and row0 + 8 (h = 1), CTA-local;
    // columns 8i + col0 + e (sm90_wgmma.cuh).
    const int row0 = 64 * cw + 16 * warp + lane / 4;
    const int col0 = 2 * (lane % 4);

    // Scores enter the softmax in the log2 domain: s * log2(e), or with the cap
    // c * tanh(s / c) * log2(e).
    const bool capped = p.softcap > 0.f;
    const float score_in = capped ? p.scale / p.softcap : p.scale * kLog2e;
    const float score_out = capped ? p.softcap * kLog2e : 1.f;
    const FaKeyRange my_keys[2] = {fa_key_range(p, m0 + row0), fa_key_range(p, m0 + row0 + 8)};

    // A slot is released once per consumer warp, after that warp's wait_group
    // has retired the wgmmas that read it.
    auto release = [&](uint32_t bar) {
        if (lane == 0) mbarrier_arrive(bar);
    };

    // S = Q K^T over HD / 16 k-steps: 4 steps of 32 bytes inside each
    // 128-byte swizzled row, then the next 64-column box.
    const uint32_t q_rows = base + Cfg::kQOff + cw * 64 * 128;  // this warpgroup's Q rows, box 0
    auto gemm_qk = [&](float (&s)[BN / 2], int stage) {
        const uint32_t k_tile = base + Cfg::kKOff + stage * Cfg::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            const uint32_t box = kk / 4, step = (kk % 4) * 32;
            wgmma_ss<T, 0>(s, wgmma_desc_k_major(q_rows + box * Cfg::kQBoxBytes + step),
                           wgmma_desc_k_major(k_tile + box * Cfg::kKvBoxBytes + step), kk > 0);
        }
        wgmma_commit();
    };

    // O += P V over BN / 16 k-steps (keys); V is [keys, head_dim] in shared
    // memory, i.e. MN-major for this product: 16 keys are two 8-row groups
    // (2048 bytes), and output columns 64.. are in the next box.
    float o[HD / 2];
    uint32_t pa[BN / 16][4];  // P as A fragments (sm90_wgmma.cuh)
    auto gemm_pv = [&](int stage) {
        const uint32_t v_tile = base + Cfg::kVOff + stage * Cfg::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wgmma_rs<T, 1>(o, pa[kk], wgmma_desc_mn_major(v_tile + kk * 2048, Cfg::kKvBoxBytes), 1);
        wgmma_commit();
    };

    RowSoftmax softmax;
    softmax.init();
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;

    // Scale (cap), mask, and fold tile j into the running softmax: S becomes P
    // in place; alpha is what O must be multiplied by to follow the new max.
    auto scores_to_probs = [&](float (&s)[BN / 2], int j, float (&alpha)[2]) {
        if (capped) {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) s[i] = score_out * fa_tanh(s[i] * score_in);
        } else {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) s[i] *= score_in;
        }
        // Band edges and the tail past seqlen_k (zero-filled K and V rows, made
        // exactly P = 0 here); tiles that every row sees in full skip this.
        const int n0 = (n_begin + j) * BN;
        if (!(n0 >= all_lo && n0 + BN <= all_hi)) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int lo = my_keys[h].lo - n0, hi = my_keys[h].hi - n0;  // tile-local
#pragma unroll
                for (int i = 0; i < BN / 8; ++i)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int key = 8 * i + col0 + e;
                        if (key < lo || key >= hi) s[4 * i + 2 * h + e] = -INFINITY;
                    }
            }
        }
        softmax.update(s, alpha);
    };

    // Ping-pong: consumer c issues its GEMMs only holding its turn (barrier
    // kBarTurn + c, completed by the other consumer's hand-over arrive), and
    // hands the turn over as soon as they are issued. Consumer 1 starts by
    // handing the first turn to consumer 0. Both consumers take the same
    // number of turns (n_tiles + 1, or none); consumer 0's last sync below
    // absorbs consumer 1's last hand-over, so no barrier is left half-arrived.
    const int my_turn = kBarTurn + cw, other_turn = kBarTurn + (1 - cw);
    if (cw == 1) named_barrier_arrive(kBarTurn + 0, kBothConsumers);

    if (n_tiles > 0) {
        mbarrier_wait_warp(q_full, 0);
        int stage = 0;
        uint32_t phase = 0;

        // Tile 0: S_0 and its softmax; nothing to overlap with yet.
        {
            float s[BN / 2];
            mbarrier_wait_warp(k_full(stage), phase);
            named_barrier_sync(my_turn, kBothConsumers);
            wgmma_fence();
            gemm_qk(s, stage);
            named_barrier_arrive(other_turn, kBothConsumers);
            wgmma_wait<0>();
            wgmma_pin(s);
            release(k_empty(stage));
            float alpha[2];  // 0: O is still 0
            scores_to_probs(s, 0, alpha);
            wgmma_acc_to_a<T>(s, pa);
        }

        // Tile j: S_j = Q K_j^T, then O += P_{j-1} V_{j-1} with the softmax of
        // S_j running while the second GEMM is still in flight.
        for (int j = 1; j < n_tiles; ++j) {
            const int prev_stage = stage;
            const uint32_t prev_phase = phase;
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
            float s[BN / 2];
            // Both operands first, so the two GEMMs issue back to back (a wait
            // loop between them makes ptxas insert another wgmma fence).
            mbarrier_wait_warp(k_full(stage), phase);
            mbarrier_wait_warp(v_full(prev_stage), prev_phase);
            named_barrier_sync(my_turn, kBothConsumers);
            wgmma_pin(o);
            wgmma_pin(pa);
            wgmma_fence();  // O rescaled and P_{j-1} written: order before the wgmmas
            gemm_qk(s, stage);
            gemm_pv(prev_stage);
            named_barrier_arrive(other_turn, kBothConsumers);

            wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
            wgmma_pin(s);
            release(k_empty(stage));
            float alpha[2];
            scores_to_probs(s, j, alpha);

            wgmma_wait<0>();  // O, and the registers of P_{j-1}, are ours again
            wgmma_pin(o);
            wgmma_pin(pa);
            release(v_empty(prev_stage));
            scale_rows(o, alpha);
            wgmma_acc_to_a<T>(s, pa);
        }

        // The last tile's O += P V.
        mbarrier_wait_warp(v_full(stage), phase);
        named_barrier_sync(my_turn, kBothConsumers);
        wgmma_pin(o);
        wgmma_pin(pa);
        wgmma_fence();
        gemm_pv(stage);
        named_barrier_arrive(other_turn, kBothConsumers);
        wgmma_wait<0>();
        wgmma_pin(o);
        release(v_empty(stage));
    }
    if (cw == 0) named_barrier_sync(kBarTurn + 0, kBothConsumers);

    // ---- Epilogue: O / l staged over this warpgroup's dead Q rows, then stored -----
    float inv_sum[2], lse[2];
    softmax.finish(inv_sum, lse);

    // Every warp of this warpgroup is past its last wgmma (which read these Q
    // rows) before any of them is overwritten. The staging uses the boxes'
    // own swizzle (chunk c of row r at c ^ (r % 8)), so the quad-strided
    // fragment writes and the row-contiguous reads are both conflict-free.
    named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);
    unsigned char *const stage_o = smem + Cfg::kQOff;
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) {
        const int box = i / 8, chunk = i % 8;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = row0 + 8 * h;
            unsigned char *dst = stage_o + box * Cfg::kQBoxBytes + r * 128 + ((chunk ^ (r & 7)) << 4) +
                                 4 * (lane % 4);
            *reinterpret_cast<uint32_t *>(dst) =
                fa_pack2<T>(o[4 * i + 2 * h] * inv_sum[h], o[4 * i + 2 * h + 1] * inv_sum[h]);
        }
    }
    named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);

    // 16-byte chunks, consecutive threads along a row: coalesced. head_dim is a
    // multiple of 8, so a chunk is wholly in or out.
    T *const o_head = static_cast<T *>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
    constexpr int kChunks = HD / 8;
#pragma unroll
    for (int idx = tid; idx < 64 * kChunks; idx += kWarpgroupThreads) {
        const int r = 64 * cw + idx / kChunks, c = idx % kChunks;  // CTA-local row, chunk
        const int row = m0 + r;
        if (row < p.seqlen_q && c * 8 < p.head_dim) {
            const uint4 v = *reinterpret_cast<const uint4 *>(
                stage_o + (c / 8) * Cfg::kQBoxBytes + r * 128 + (((c % 8) ^ (r & 7)) << 4));
            *reinterpret_cast<uint4 *>(o_head + row * p.o_row_stride + c * 8) = v;
        }
    }

    if (p.lse != nullptr && lane % 4 == 0) {
        float *const lse_row = p.lse + (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + row0 + 8 * h;
            if (row < p.seqlen_q) lse_row[row] = lse[h];
        }
    }
}

}  // namespace

// FA_KERNEL(name, dtype, head_dim bucket, block_m, block_n, threads, dynamic smem, min sm, grid).
// build.rs reads these lines to make the Rust dispatch table; the static_assert
// makes the compiler check each row against Sm90Config. Launch: grid
// (ceil(seqlen_q / block_m), heads_q, batch), block (threads), smem as listed.
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid)              \
    static_assert(block_m == Sm90Config<head_dim>::kBlockM &&                                  \
                      block_n == Sm90Config<head_dim>::kBlockN &&                              \
                      threads == Sm90Config<head_dim>::kThreads &&                             \
                      smem == Sm90Config<head_dim>::kSmemBytes && min_sm == 90 &&              \
                      grid == FA_GRID_TILES,                                                   \
                  "table row disagrees with Sm90Config<" #head_dim ">");                      \
    extern "C" __global__ void __launch_bounds__(threads, 1)                                   \
        name(const __grid_constant__ FaFwdSm90Params P) {                                      \
        sm90_forward<FA_DTYPE(dtype), head_dim>(P);                                            \
    }

FA_KERNEL(fa_fwd_sm90_f16_hd64, f16, 64, 128, 128, 384, 148616, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_f16_hd128, f16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_f16_hd256, f16, 256, 128, 80, 384, 230472, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd64, bf16, 64, 128, 128, 384, 148616, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd128, bf16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd256, bf16, 256, 128, 80, 384, 230472, 90, FA_GRID_TILES)
