// Hopper forward (FlashAttention-3 structure, written from the papers and the
// PTX ISA), sm_90a only: wgmma tensor cores, TMA loads, warp specialisation.
//
// One CTA computes O for block_m = 128 query rows of one (batch, query head)
// with three warpgroups:
//   producer (WG 0): gives most of its registers away (setmaxnreg.dec); one
//     thread issues every TMA load: Q once per tile, then K_j and V_j of each
//     visible key tile into a ring of `stages` shared buffers, each slot
//     guarded by a full and an empty mbarrier.
//   consumers (WG 1, 2): take the registers (setmaxnreg.inc); each owns 64
//     query rows and, per key tile j:
//       S = Q K_j^T            wgmma, Q and K from shared memory (both K-major)
//       scale / softcap, ALiBi  ALiBi (a runtime-uniform branch) on every tile
//       mask                    element mask only on tiles that straddle an edge
//       online softmax          m, l, P = exp2(S - m), all in registers; an
//                               attention sink is its starting state
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
// Grid (the row's last FA_KERNEL field): FA_GRID_TILES, one CTA per
// (128-row block, query head, batch), reversed in x so the longest causal row
// blocks start first; or FA_GRID_PERSISTENT (variants `__persistent`), one CTA
// per SM walking a static tile schedule (Sm90Schedule), the producer loading
// the next tile's K/V while the consumers finish the current one.
//
// Head dims inside a bucket: 64-column boxes that lie wholly past head_dim
// are neither loaded nor used by Q K^T (their shared bytes stay garbage); see
// live_boxes below.
//
// Tile shapes (Sm90Shape below) are first choices made without a GPU, after
// FlashAttention-3's published ones; re-measure them on hardware. Variant rows
// (name__tag, never auto-dispatched) change one thing each, for the ablation.
#include "params.h"
#include "common/types.cuh"
#include "common/mask.cuh"
#include "common/sm90_mbarrier.cuh"
#include "common/sm90_tma.cuh"
#include "common/sm90_warpgroup.cuh"
#include "common/sm90_wgmma.cuh"
#include "common/sm90_softmax.cuh"
#include "common/sequence.cuh"

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
// The two features default to the base kernels' choice: ping-pong on, one
// CTA per tile; the variant wrappers further down change one field each.
template <int BM, int BN, int STAGES>
struct Sm90ShapeOf {
    static constexpr int kBlockM = BM, kBlockN = BN, kStages = STAGES;
    static constexpr bool kPingPong = true;
    static constexpr int kGrid = FA_GRID_TILES;
    static constexpr bool kLoopHeadWait = false;
};
template <int HD> struct Sm90Shape;
//                                            block_m block_n stages
template <> struct Sm90Shape<64>  : Sm90ShapeOf<128,    128,    4> {};
template <> struct Sm90Shape<128> : Sm90ShapeOf<128,    128,    2> {};
template <> struct Sm90Shape<256> : Sm90ShapeOf<128,     80,    2> {};

// Variant shapes: a base shape with one field changed (a field of the derived
// struct hides the base's).
template <class Base> struct Sm90NoPingPong : Base { static constexpr bool kPingPong = false; };
template <class Base, int STAGES> struct Sm90Stages : Base { static constexpr int kStages = STAGES; };
template <class Base> struct Sm90Persistent : Base { static constexpr int kGrid = FA_GRID_PERSISTENT; };
template <class Base> struct Sm90LoopHeadWait : Base { static constexpr bool kLoopHeadWait = true; };

template <int HD, class S = Sm90Shape<HD>>
struct Sm90Config : S {
    static constexpr int kConsumers = 2;  // consumer warpgroups, 64 query rows each
    static constexpr int kThreads = kWarpgroupThreads * (1 + kConsumers);
    // The launch gives every thread 65536 / 384 -> 168 registers; the producer
    // hands back down to 24 and each consumer thread takes up to 240:
    // 128 x (24 + 2 x 240) = 128 x 3 x 168.
    static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
    static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
    static constexpr bool kPersistent = S::kGrid == FA_GRID_PERSISTENT;

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
    // Q full; K, V full and empty per stage; persistent only: Q free (the
    // epilogue, which stages O over the Q rows, is done with them).
    static constexpr int kNumBars = 1 + 4 * S::kStages + (kPersistent ? 1 : 0);
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
    static_assert(S::kGrid == FA_GRID_TILES || S::kGrid == FA_GRID_PERSISTENT, "a launch shape of params.h");
    static_assert(kSmemBytes <= 232448, "sm90 allows 227 KiB of dynamic shared memory per CTA");
    static_assert(kProducerRegs + kConsumers * kConsumerRegs <= (1 + kConsumers) * kLaunchRegs,
                  "setmaxnreg.inc would wait forever for registers");
};

// Named barrier ids (0 is __syncthreads): the ping-pong turn of consumer c is
// kBarTurn + c; the epilogue of consumer c syncs its warpgroup on kBarEpilogue + c.
constexpr int kBarTurn = 1;
constexpr int kBarEpilogue = 3;
// Both consumers have zeroed their share of a tail tile's V rows (see zero_v_tail).
constexpr int kBarTail = 5;
constexpr int kBothConsumers = 2 * kWarpgroupThreads;

constexpr float kLog2e = 1.4426950408889634f;

// The (row block, query head, batch) tiles a CTA computes, in order. Every
// role of the CTA runs its own copy and gets the same sequence, so no tile
// index is ever communicated.
//  * FA_GRID_TILES: the one tile of blockIdx, x reversed (longest causal row
//    blocks are launched first).
//  * FA_GRID_PERSISTENT: the tiles are numbered longest first (row block
//    descending, since with the bottom-right aligned band a later row block
//    never sees fewer keys; then head, then batch, so concurrent CTAs share a
//    row block's keys of a KV head in L2) and CTA b takes t = b, b + grid,
//    b + 2 grid, ...: a static round robin, which hands every CTA about the
//    same mix of long and short tiles without an atomic counter.
template <int GRID, int BM>
struct Sm90Schedule {
    // The next tile's number. Only this lives across a CTA's tiles; the rest
    // is recomputed from the parameters (constant bank, free to re-read),
    // which keeps the consumers' registers for the wgmma descriptors.
    int t;
    __device__ Sm90Schedule() : t(GRID == FA_GRID_PERSISTENT ? blockIdx.x : 0) {}
    // The next tile, or false when this CTA is done.
    __device__ bool next(const FaFwdParams &p, int &m_block, int &head, int &batch) {
        if constexpr (GRID == FA_GRID_PERSISTENT) {
            const int m_tiles = (p.seqlen_q + BM - 1) / BM, per_block = p.heads_q * p.batch;
            if (t >= m_tiles * per_block) return false;
            const int r = t % per_block;
            m_block = m_tiles - 1 - t / per_block;
            head = r % p.heads_q;
            batch = r / p.heads_q;
            t += gridDim.x;
        } else {
            if (t > 0) return false;
            m_block = gridDim.x - 1 - blockIdx.x;
            head = blockIdx.y;
            batch = blockIdx.z;
            t = 1;
        }
        return true;
    }
};

// Which key tiles a row block visits (the same for every warp of the CTA).
// The band is monotone in the row: the block's rows see the union
// [lo(first row), hi(last row)) and every row sees the intersection
// [lo(last row), hi(first row)). Tiles outside the union are never loaded;
// tiles inside the intersection need no element mask.
struct Sm90KeyTiles {
    int n_begin, n_tiles;  // first key tile, number of key tiles (0: no visible key)
    int all_lo, all_hi;    // keys every row of the block sees
};
template <int BM, int BN>
__device__ __forceinline__ Sm90KeyTiles sm90_key_tiles(const FaFwdParams &p, int m0) {
    const int row_end = min(m0 + BM, p.seqlen_q);
    const FaKeyRange any_row = fa_key_range_rows(p, m0, row_end);
    Sm90KeyTiles k;
    k.all_lo = fa_key_range(p, row_end - 1).lo;
    k.all_hi = fa_key_range(p, m0).hi;
    k.n_begin = any_row.lo / BN;
    k.n_tiles = any_row.lo < any_row.hi ? (any_row.hi + BN - 1) / BN - k.n_begin : 0;
    return k;
}

template <typename T, int HD, class Shape>
__device__ __forceinline__ void sm90_forward(const FaFwdSm90Params &P) {
    using Cfg = Sm90Config<HD, Shape>;
    constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, STAGES = Cfg::kStages;
    using Schedule = Sm90Schedule<Cfg::kGrid, BM>;
    // The launch's parameters. A packed batch or a cache has per-sequence
    // lengths: each tile works with its own copy, bound to its sequence
    // (common/sequence.cuh); for a rectangular batch the copy is the launch's.
    // The persistent variants serve rectangular batches only (the
    // dispatcher's rule): with per-sequence lengths in registers across the
    // key loop, their hd256 consumer spilled.
    const FaFwdParams &launch = P.p;
    constexpr bool kSequences = !Cfg::kPersistent;
    auto bind = [&](FaFwdParams &p, int batch) {
        if constexpr (kSequences) fa_bind_sequence<T>(p, batch);
    };

    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;        // shared-window address, for PTX
    unsigned char *const smem = smem_raw + (base - raw);  // the same bytes, for C++

    // 64-column boxes that hold at least one column < head_dim. The others
    // (the bucket's head dim is larger than the problem's, e.g. the fourth box
    // of the hd256 bucket for head_dim <= 192) lie wholly outside the tensor,
    // and whether the TMA zero-fills such a box and credits its bytes is not
    // documented, so they are never loaded nor counted in expect_tx.
    const int live_boxes = min(Cfg::kBoxes, (launch.head_dim + 63) / 64);

    const uint32_t q_full = base + Cfg::kBarOff;
    auto k_full = [&](int s) { return q_full + 8 * (1 + s); };
    auto k_empty = [&](int s) { return q_full + 8 * (1 + STAGES + s); };
    auto v_full = [&](int s) { return q_full + 8 * (1 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return q_full + 8 * (1 + 3 * STAGES + s); };
    const uint32_t q_free = q_full + 8 * (1 + 4 * STAGES);  // persistent only

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
        // Q free: one arrival per consumer thread, each after its own staging reads.
        if constexpr (Cfg::kPersistent) mbarrier_init(q_free, Cfg::kConsumers * kWarpgroupThreads);
        mbarrier_init_fence();
    }
    // Q K^T still runs over the dead boxes (a k-step skipped by a branch
    // makes ptxas fence every wgmma after it, in the hot loop of every
    // bucket), so their Q bytes and those of every K stage must read as 0:
    // written once here, and never written again (the TMA skips them, the
    // epilogue's staging too). V's dead boxes stay garbage: they only feed
    // output columns >= head_dim (each output column of P V reads only its own
    // V column), which are never stored. The proxy fence makes these ordinary
    // stores visible to the wgmmas (async proxy) that read them after the
    // barrier below.
    if (live_boxes < Cfg::kBoxes) {
        auto zero = [&](int off, int bytes) {
            for (int i = threadIdx.x; i < bytes / 16; i += Cfg::kThreads)
                reinterpret_cast<uint4 *>(smem + off)[i] = make_uint4(0, 0, 0, 0);
        };
        const int dead = Cfg::kBoxes - live_boxes;
        zero(Cfg::kQOff + live_boxes * Cfg::kQBoxBytes, dead * Cfg::kQBoxBytes);
        for (int s = 0; s < STAGES; ++s)
            zero(Cfg::kKOff + s * Cfg::kKvBytes + live_boxes * Cfg::kKvBoxBytes, dead * Cfg::kKvBoxBytes);
        fence_proxy_async_shared();
    }
    // The last CTA-wide barrier: producer warps may exit early from here on,
    // so the roles below only use mbarriers and named barriers.
    __syncthreads();

    const int wg = threadIdx.x / kWarpgroupThreads;
    if (wg == 0) {
        // ===================== Producer =====================================
        setmaxnreg_dec<Cfg::kProducerRegs>();
        if (threadIdx.x == 0) {
            // The K/V ring runs on across tiles: tile j of the whole sequence
            // goes to slot j % STAGES; a slot is free once every consumer warp
            // released its previous tile, j - STAGES (parity trick: the first
            // round waits on the "phase before the first" and passes).
            int stage = 0;
            uint32_t phase = 0;
            int q_loads = 0;  // Q loads so far (tiles with at least one key tile)
            Schedule sched;
            int m_block, head, batch;
            while (sched.next(launch, m_block, head, batch)) {
                FaFwdParams p = launch;
                FaTmaCoords at{0, batch, 0, batch};
                if constexpr (kSequences) at = fa_bind_sequence_tma<T>(p, batch);
                const int m0 = m_block * BM, head_kv = head / p.q_per_kv;
                // Past the end of a shorter sequence of a packed batch: no
                // rows, nothing to do for any role.
                if (m0 >= p.seqlen_q) continue;
                const Sm90KeyTiles kt = sm90_key_tiles<BM, BN>(p, m0);
                // No key tile, no load: the consumers write O = 0 without
                // touching shared memory (and nothing may still be in flight
                // when the CTA exits).
                if (kt.n_tiles == 0) continue;
                // Q of the q_loads-th loaded tile; in a persistent CTA it
                // overwrites the rows the previous tile's epilogue staged O in,
                // so it first waits for that epilogue (Q-free phase
                // q_loads - 1; the first wait passes at once).
                auto load_q = [&]() {
                    if constexpr (Cfg::kPersistent) mbarrier_wait(q_free, (q_loads & 1) ^ 1);
                    mbarrier_arrive_expect_tx(q_full, live_boxes * Cfg::kQBoxBytes);
#pragma unroll
                    for (int c = 0; c < Cfg::kBoxes; ++c)
                        if (c < live_boxes)
                            tma_load_4d(base + Cfg::kQOff + c * Cfg::kQBoxBytes, &P.tma_q, 64 * c, at.q_row + m0,
                                        head, at.q_batch, q_full);
                };
                // The CTA's first Q goes first. A later tile's Q waits for the
                // previous epilogue, so its first K and V go ahead of it: they
                // load while the consumers finish the previous tile.
                if (q_loads == 0) load_q();
                for (int j = 0; j < kt.n_tiles; ++j) {
                    const int n0 = (kt.n_begin + j) * BN;
                    // The tile's TMA row and batch entry: of the packed tensor
                    // or the cache entry, or its page of a paged cache.
                    int kv_row = at.k_row + n0, kv_entry = at.kv_batch;
                    if (kSequences && p.block_table != nullptr) fa_page_coords(p, batch, n0, kv_row, kv_entry);
                    mbarrier_wait(k_empty(stage), phase ^ 1);
                    mbarrier_arrive_expect_tx(k_full(stage), live_boxes * Cfg::kKvBoxBytes);
#pragma unroll
                    for (int c = 0; c < Cfg::kBoxes; ++c)
                        if (c < live_boxes)
                            tma_load_4d(base + Cfg::kKOff + stage * Cfg::kKvBytes + c * Cfg::kKvBoxBytes,
                                        &P.tma_k, 64 * c, kv_row, head_kv, kv_entry, k_full(stage));
                    mbarrier_wait(v_empty(stage), phase ^ 1);
                    mbarrier_arrive_expect_tx(v_full(stage), live_boxes * Cfg::kKvBoxBytes);
#pragma unroll
                    for (int c = 0; c < Cfg::kBoxes; ++c)
                        if (c < live_boxes)
                            tma_load_4d(base + Cfg::kVOff + stage * Cfg::kKvBytes + c * Cfg::kKvBoxBytes,
                                        &P.tma_v, 64 * c, kv_row, head_kv, kv_entry, v_full(stage));
                    if (j == 0 && q_loads > 0) load_q();
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
                ++q_loads;
            }
        }
        return;
    }

    // ======================== Consumers =========================================
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    // Consumer index: owns CTA rows [64 cw, 64 cw + 64). Broadcast from lane 0
    // so that ptxas knows it is warp-uniform: the Q descriptors derived from it
    // then live in uniform registers (as the K and V ones do) rather than in
    // 32 vector registers, which the persistent hd256 consumer, with its tile
    // loop around everything, does not have (it spilled them).
    const int cw = __shfl_sync(0xffffffffu, wg - 1, 0);
    const int tid = threadIdx.x % kWarpgroupThreads, warp = tid / 32, lane = tid % 32;
    // Accumulator rows of this thread: row0 (h = 0) and row0 + 8 (h = 1), CTA-local;
    // columns 8i + col0 + e (sm90_wgmma.cuh).
    const int row0 = 64 * cw + 16 * warp + lane / 4;
    const int col0 = 2 * (lane % 4);

    // Scores enter the softmax in the log2 domain: s * log2(e), or with the cap
    // c * tanh(s / c) * log2(e).
    const bool capped = launch.softcap > 0.f;
    const float score_in = launch.scale * kLog2e;
    // Keys past seqlen_k inside a tile are TMA zero fill only where seqlen_k is
    // the tensor's end. In a packed batch they are the next sequence's keys
    // (or keys past seqused_k), in a cache rows nothing has written: the mask
    // makes their P exactly 0, but 0 * NaN is NaN, so the last tile's V rows
    // past seqlen_k are zeroed before P V reads them (zero_v_tail).
    const bool bounded = kSequences && (launch.cu_seqlens_k != nullptr || launch.seqused_k != nullptr);

    // A slot is released once per consumer warp, after that warp's wait_group
    // has retired the wgmmas that read it.
    auto release = [&](uint32_t bar) {
        if (lane == 0) mbarrier_arrive(bar);
    };

    // S = Q K^T over HD / 16 k-steps: 4 steps of 32 bytes inside each
    // 128-byte swizzled row, then the next 64-column box (boxes past head_dim
    // hold zeros, see above).
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

    // Ping-pong: consumer c issues its GEMMs only holding its turn (barrier
    // kBarTurn + c, completed by the other consumer's hand-over arrive), and
    // hands the turn over as soon as they are issued. Consumer 1 starts by
    // handing the first turn to consumer 0. Both consumers take the same
    // number of turns (n_tiles + 1 per tile with keys, the tiles being the
    // same for both), so the alternation simply runs on across the tiles of a
    // persistent CTA; consumer 0's last sync below absorbs consumer 1's last
    // hand-over, so no barrier is left half-arrived. Without ping-pong
    // (variants __nopp) both issue whenever their operands are there.
    const int my_turn = kBarTurn + cw, other_turn = kBarTurn + (1 - cw);
    auto take_turn = [&]() {
        if constexpr (Cfg::kPingPong) named_barrier_sync(my_turn, kBothConsumers);
    };
    auto pass_turn = [&]() {
        if constexpr (Cfg::kPingPong) named_barrier_arrive(other_turn, kBothConsumers);
    };
    if (Cfg::kPingPong && cw == 1) named_barrier_arrive(kBarTurn + 0, kBothConsumers);

    // The ring slot of the next key tile to consume (it runs on across tiles,
    // as the producer's does), and the parity of the next Q load.
    int stage = 0;
    uint32_t phase = 0, q_phase = 0;
    Schedule sched;
    int m_block, head, batch;
    while (sched.next(launch, m_block, head, batch)) {
        const int m0 = m_block * BM;
        // What the key loop needs of the sequence; its lengths are not kept
        // across the loop (hd256 has no registers for them): the epilogue
        // binds the sequence again.
        int n_begin, n_tiles, all_lo, all_hi;
        FaKeyRange my_keys[2];
        // ALiBi: score (h, i, e) of key tile n0 is at distance
        // i + off - j = alibi_pos - n0 + 8h - 8i - e from its row, so a tile
        // costs one conversion and a score an add of a constant and an FFMA
        // with |.|; the slope is -m log2(e), m this (sequence, head)'s. Kept
        // across the key loop except in the persistent variants, whose hd256
        // consumer spilled them: those (rectangular batches only) derive both
        // again on each tile, from the launch's parameters.
        int alibi_pos = 0;
        float alibi_slope = 0.f;
        auto alibi_of = [&](const FaFwdParams &p, int &pos, float &slope) {
            pos = m0 + row0 + p.diag_offset - col0;
            slope = -kLog2e * p.alibi_slopes[batch * p.alibi_batch_stride + head];
        };
        {
            FaFwdParams p = launch;
            bind(p, batch);
            if (m0 >= p.seqlen_q) continue;  // past a shorter sequence's end (as the producer)
            const Sm90KeyTiles kt = sm90_key_tiles<BM, BN>(p, m0);
            n_begin = kt.n_begin, n_tiles = kt.n_tiles, all_lo = kt.all_lo, all_hi = kt.all_hi;
            my_keys[0] = fa_key_range(p, m0 + row0);
            my_keys[1] = fa_key_range(p, m0 + row0 + 8);
            if (!Cfg::kPersistent && p.alibi_slopes != nullptr) alibi_of(p, alibi_pos, alibi_slope);
        }

        // The sink, a virtual key with V = 0, is the first key of every row.
        RowSoftmax softmax;
        softmax.init(launch.sinks != nullptr ? launch.sinks[head] * kLog2e : -INFINITY, lane % 4 == 0);
#pragma unroll
        for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;

        // Scale (cap), mask, and fold tile j into the running softmax: S becomes P
        // in place; alpha is what O must be multiplied by to follow the new max.
        auto scores_to_probs = [&](float (&s)[BN / 2], int j, float (&alpha)[2]) {
            if (capped) {
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) s[i] = fa_softcap_log2(s[i] * score_in, launch.softcap);
            } else {
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) s[i] *= score_in;
            }
            const int n0 = (n_begin + j) * BN;
            // ALiBi after the cap, on every tile (masked scores become -inf
            // below whatever they were).
            if (launch.alibi_slopes != nullptr) {
                int pos = alibi_pos;
                float slope = alibi_slope;
                if constexpr (Cfg::kPersistent) alibi_of(launch, pos, slope);
                const float d0 = static_cast<float>(pos - n0);
#pragma unroll
                for (int i = 0; i < BN / 8; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            s[4 * i + 2 * h + e] =
                                fmaf(slope, fabsf(d0 + static_cast<float>(8 * h - 8 * i - e)), s[4 * i + 2 * h + e]);
            }
            // Band edges and the tail past seqlen_k (zero-filled K and V rows, made
            // exactly P = 0 here); tiles that every row sees in full skip this.
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

        if (n_tiles > 0) {
            mbarrier_wait_warp(q_full, q_phase);

            if constexpr (!Cfg::kLoopHeadWait) {
                // Tile 0: S_0 and its softmax; nothing to overlap with yet.
                {
                    float s[BN / 2];
                    mbarrier_wait_warp(k_full(stage), phase);
                    take_turn();
                    wgmma_fence();
                    gemm_qk(s, stage);
                    pass_turn();
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
                    take_turn();
                    wgmma_pin(o);
                    wgmma_pin(pa);
                    wgmma_fence();  // O rescaled and P_{j-1} written: order before the wgmmas
                    gemm_qk(s, stage);
                    gemm_pv(prev_stage);
                    pass_turn();

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
            } else {
                // Variants __ov: the same GEMM order and waits, with the loop
                // rotated so that iteration j ends with the softmax of S_j and
                // the next iteration *begins* with the wait for O += P_{j-1}
                // V_{j-1} (then the V release, the rescale of O and P_j -> A
                // fragments). In the default loop that wait sits in the same
                // basic block as the softmax, after the mask/softcap branches,
                // and ptxas hoists it to the top of the block, above every
                // exponential (docs/sass-report.md); here the loop's back edge
                // lies between them. P_j waits across it in f32 (s) while the
                // fragments of P_{j-1} are still being read by the tensor
                // cores; alpha carries the rescale of O to the next iteration.
                float s[BN / 2], alpha[2];
                int pv_stage = -1;  // slot of the V whose P V is in flight (-1: none)
                mbarrier_wait_warp(k_full(stage), phase);
                take_turn();
                wgmma_fence();
                gemm_qk(s, stage);
                pass_turn();
                wgmma_wait<0>();
                wgmma_pin(s);
                release(k_empty(stage));
                scores_to_probs(s, 0, alpha);  // alpha 0: O is still 0

                for (int j = 1; j < n_tiles; ++j) {
                    // Loop head: retire O += P_{j-2} V_{j-2}, issued by the previous
                    // iteration, whose softmax ran under it.
                    wgmma_wait<0>();  // O, and the registers of P_{j-2}, are ours again
                    wgmma_pin(o);
                    wgmma_pin(pa);
                    if (pv_stage >= 0) release(v_empty(pv_stage));
                    scale_rows(o, alpha);
                    wgmma_acc_to_a<T>(s, pa);

                    const int prev_stage = stage;
                    const uint32_t prev_phase = phase;
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                    mbarrier_wait_warp(k_full(stage), phase);
                    mbarrier_wait_warp(v_full(prev_stage), prev_phase);
                    take_turn();
                    wgmma_pin(o);
                    wgmma_pin(pa);
                    wgmma_fence();  // O rescaled and P_{j-1} written: order before the wgmmas
                    gemm_qk(s, stage);
                    gemm_pv(prev_stage);
                    pass_turn();
                    pv_stage = prev_stage;

                    wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
                    wgmma_pin(s);
                    release(k_empty(stage));
                    scores_to_probs(s, j, alpha);
                }
                // The last P V issued in the loop, then P_{n-1} as A fragments.
                wgmma_wait<0>();  // O, and the registers of P_{n-2}, are ours again
                wgmma_pin(o);
                wgmma_pin(pa);
                if (pv_stage >= 0) release(v_empty(pv_stage));
                scale_rows(o, alpha);
                wgmma_acc_to_a<T>(s, pa);
            }

            // The last tile's O += P V; first, in a packed batch or a cache,
            // zero its V rows past seqlen_k. Both consumers share the work and
            // meet on kBarTail before either GEMM reads the tile (the proxy
            // fence orders the zeros before the wgmmas, and before the TMA's
            // next write of the slot). The last tile is the only one that can
            // reach past seqlen_k.
            mbarrier_wait_warp(v_full(stage), phase);
            // The last tile's first V row past seqlen_k (BN: none). The
            // lengths are read again here rather than kept in a register
            // through the loop (the persistent hd256 consumer spilled it).
            int v_tail = BN;
            if (bounded) {
                FaFwdParams p = launch;
                bind(p, batch);
                v_tail = min(BN, p.seqlen_k - (n_begin + n_tiles - 1) * BN);
            }
            if (v_tail < BN) {
                const uint32_t v_tile = Cfg::kVOff + stage * Cfg::kKvBytes;
                const int chunks = (BN - v_tail) * 8;  // 16-byte chunks per box: whole 128-byte rows
                for (int i = cw * kWarpgroupThreads + tid; i < live_boxes * chunks; i += kBothConsumers)
                    reinterpret_cast<uint4 *>(smem + v_tile + (i / chunks) * Cfg::kKvBoxBytes +
                                              v_tail * 128)[i % chunks] = make_uint4(0, 0, 0, 0);
                fence_proxy_async_shared();
                named_barrier_sync(kBarTail, kBothConsumers);
            }
            take_turn();
            wgmma_pin(o);
            wgmma_pin(pa);
            wgmma_fence();
            gemm_pv(stage);
            pass_turn();
            wgmma_wait<0>();
            wgmma_pin(o);
            release(v_empty(stage));
            // The next tile starts at the next slot, and at the next Q load.
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
            q_phase ^= 1;
        }

        // ---- Epilogue: O / l staged over this warpgroup's dead Q rows, then stored ----
        float inv_sum[2], lse[2];
        softmax.finish(inv_sum, lse);
        FaFwdParams p = launch;
        bind(p, batch);
        T *const o_head = static_cast<T *>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
        constexpr int kChunks = HD / 8;
        unsigned char *const stage_o = smem + Cfg::kQOff;

        // A tile-grid CTA stages even a tile without keys (O = 0): it is its
        // last. A persistent CTA writes such a tile's zeros directly instead,
        // so that only tiles with a Q load touch the Q rows (see the producer).
        if (!Cfg::kPersistent || n_tiles > 0) {
            // Every warp of this warpgroup is past its last wgmma (which read these Q
            // rows) before any of them is overwritten. The staging uses the boxes'
            // own swizzle (chunk c of row r at c ^ (r % 8)), so the quad-strided
            // fragment writes and the row-contiguous reads are both conflict-free.
            // Boxes past head_dim are skipped: nothing there is stored, and
            // their Q bytes must stay 0 for a persistent CTA's next tile.
            named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);
#pragma unroll
            for (int i = 0; i < HD / 8; ++i) {
                const int box = i / 8, chunk = i % 8;
                if (box == 0 || box < live_boxes) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = row0 + 8 * h;
                        unsigned char *dst = stage_o + box * Cfg::kQBoxBytes + r * 128 +
                                             ((chunk ^ (r & 7)) << 4) + 4 * (lane % 4);
                        *reinterpret_cast<uint32_t *>(dst) =
                            fa_pack2<T>(o[4 * i + 2 * h] * inv_sum[h], o[4 * i + 2 * h + 1] * inv_sum[h]);
                    }
                }
            }
            named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);

            // 16-byte chunks, consecutive threads along a row: coalesced. head_dim is a
            // multiple of 8, so a chunk is wholly in or out.
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
            if constexpr (Cfg::kPersistent) {
                // This thread is done with the staging rows: hand Q back to the
                // producer. The proxy fence orders this thread's ordinary stores
                // and loads of those bytes before the TMA's overwrite (the
                // mbarrier orders the threads, not the two proxies).
                fence_proxy_async_shared();
                mbarrier_arrive(q_free);
            }
        } else {
            // Persistent, no visible key (every row's O is 0, LSE -inf): zeros
            // straight to global memory. Shared memory is not touched, so the
            // producer, which loads nothing for this tile, need not wait for it.
#pragma unroll
            for (int idx = tid; idx < 64 * kChunks; idx += kWarpgroupThreads) {
                const int r = 64 * cw + idx / kChunks, c = idx % kChunks;
                const int row = m0 + r;
                if (row < p.seqlen_q && c * 8 < p.head_dim)
                    *reinterpret_cast<uint4 *>(o_head + row * p.o_row_stride + c * 8) = make_uint4(0, 0, 0, 0);
            }
        }

        if (p.lse != nullptr && lane % 4 == 0) {
            float *const lse_row = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + row0 + 8 * h;
                if (row < p.seqlen_q) lse_row[row] = lse[h];
            }
        }
    }
    if (Cfg::kPingPong && cw == 0) named_barrier_sync(kBarTurn + 0, kBothConsumers);
}

}  // namespace

// FA_KERNEL(name, dtype, head_dim bucket, block_m, block_n, threads, dynamic smem, min sm, grid).
// build.rs reads these lines to make the Rust dispatch table; the static_assert
// makes the compiler check each row against its Sm90Config. FA_SHAPE picks the
// shape and features of the rows that follow: the bucket's default, or a
// variant's. Launch: grid (ceil(seqlen_q / block_m), heads_q, batch) for
// FA_GRID_TILES, (min(#SMs, #tiles), 1, 1) for FA_GRID_PERSISTENT; block
// (threads), smem as listed.
#define FA_SHAPE(head_dim) Sm90Shape<head_dim>
#define FA_CFG(head_dim) Sm90Config<head_dim, FA_SHAPE(head_dim)>
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid)              \
    static_assert(block_m == FA_CFG(head_dim)::kBlockM && block_n == FA_CFG(head_dim)::kBlockN &&    \
                      threads == FA_CFG(head_dim)::kThreads && smem == FA_CFG(head_dim)::kSmemBytes && \
                      min_sm == 90 && grid == FA_CFG(head_dim)::kGrid,                               \
                  "table row disagrees with the Sm90Config of " #name);                             \
    extern "C" __global__ void __launch_bounds__(threads, 1)                                        \
        name(const __grid_constant__ FaFwdSm90Params P) {                                           \
        sm90_forward<FA_DTYPE(dtype), head_dim, FA_SHAPE(head_dim)>(P);                             \
    }

FA_KERNEL(fa_fwd_sm90_f16_hd64, f16, 64, 128, 128, 384, 148616, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_f16_hd128, f16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_f16_hd256, f16, 256, 128, 80, 384, 230472, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd64, bf16, 64, 128, 128, 384, 148616, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd128, bf16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd256, bf16, 256, 128, 80, 384, 230472, 90, FA_GRID_TILES)

// Variants: never dispatched automatically; benchmarks and GPU tests force them by name.
// Built only with FUSED_ATTN_VARIANTS=1: build.rs otherwise defines FA_NO_VARIANTS
// and leaves these rows out of the table too (the emulators define nothing: they
// always see every row).
#ifndef FA_NO_VARIANTS
// __nopp: no inter-warpgroup ping-pong (the consumers issue their GEMMs freely).
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm90NoPingPong<Sm90Shape<head_dim>>
FA_KERNEL(fa_fwd_sm90_f16_hd128__nopp, f16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd128__nopp, bf16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
// __s3: hd128 with a 3-stage ring, Q 32 KiB + 3 x 64 KiB = 224 KiB (the most that fits).
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm90Stages<Sm90Shape<head_dim>, 3>
FA_KERNEL(fa_fwd_sm90_f16_hd128__s3, f16, 128, 128, 128, 384, 230504, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd128__s3, bf16, 128, 128, 128, 384, 230504, 90, FA_GRID_TILES)
// __s2: hd64 with FA3's 2 stages instead of 4 (is the deeper ring worth anything?).
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm90Stages<Sm90Shape<head_dim>, 2>
FA_KERNEL(fa_fwd_sm90_f16_hd64__s2, f16, 64, 128, 128, 384, 83016, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd64__s2, bf16, 64, 128, 128, 384, 83016, 90, FA_GRID_TILES)
// __persistent: the bucket's shape, one CTA per SM over the static tile schedule.
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm90Persistent<Sm90Shape<head_dim>>
FA_KERNEL(fa_fwd_sm90_f16_hd64__persistent, f16, 64, 128, 128, 384, 148624, 90, FA_GRID_PERSISTENT)
FA_KERNEL(fa_fwd_sm90_f16_hd128__persistent, f16, 128, 128, 128, 384, 164944, 90, FA_GRID_PERSISTENT)
FA_KERNEL(fa_fwd_sm90_f16_hd256__persistent, f16, 256, 128, 80, 384, 230480, 90, FA_GRID_PERSISTENT)
FA_KERNEL(fa_fwd_sm90_bf16_hd64__persistent, bf16, 64, 128, 128, 384, 148624, 90, FA_GRID_PERSISTENT)
FA_KERNEL(fa_fwd_sm90_bf16_hd128__persistent, bf16, 128, 128, 128, 384, 164944, 90, FA_GRID_PERSISTENT)
FA_KERNEL(fa_fwd_sm90_bf16_hd256__persistent, bf16, 256, 128, 80, 384, 230480, 90, FA_GRID_PERSISTENT)
// __ov: the key-tile loop rotated so that the wait for O += P V opens the next
// iteration, below the softmax (see kLoopHeadWait in the consumer).
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm90LoopHeadWait<Sm90Shape<head_dim>>
FA_KERNEL(fa_fwd_sm90_f16_hd64__ov, f16, 64, 128, 128, 384, 148616, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_f16_hd128__ov, f16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_f16_hd256__ov, f16, 256, 128, 80, 384, 230472, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd64__ov, bf16, 64, 128, 128, 384, 148616, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd128__ov, bf16, 128, 128, 128, 384, 164936, 90, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm90_bf16_hd256__ov, bf16, 256, 128, 80, 384, 230472, 90, FA_GRID_TILES)
#endif  // FA_NO_VARIANTS
