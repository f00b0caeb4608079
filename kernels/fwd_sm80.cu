// Tiled forward (FlashAttention-2 algorithm) on mma.sync tensor cores, sm80+.
//
// One CTA computes O for block_m query rows of one (batch, query head):
//   1. Q tile -> shared (cp.async) -> registers as mma A fragments, once.
//   2. For each key tile of block_n rows that the mask does not fully hide:
//        S = Q K^T                     (K tile from shared, ldmatrix + mma)
//        scale / softcap / ALiBi       (ALiBi: a runtime-uniform branch)
//        mask edges                    (only tiles that straddle a mask edge)
//        online softmax: m, l, P = exp2(S - m), O *= exp2(m_old - m)
//                                      (with a sink, m and l start from it)
//        O += P V                      (P stays in registers as A fragments)
//      K and V tiles stream through a ring of shared buffers with cp.async:
//      while one is consumed, the next bufs-1 loads are in flight.
//   3. O /= l, written once (16-byte stores through shared); LSE = m + log l.
// Each warp owns 16 * kMTiles query rows outright, so row statistics need only
// quad shuffles and no CTA-wide reduction.
//
// Tile shapes (Sm80Shape below) started as choices made without a GPU,
// following FlashAttention-2's published ones; hd128's is measured (H100,
// 2026-11-25), the others are not yet, and nothing is measured on an A100.
#include "params.h"
#include "common/types.cuh"
#include "common/mask.cuh"
#include "common/copy.cuh"
#include "common/mma.cuh"
#include "common/swizzle.cuh"
#include "common/softmax.cuh"
#include "common/sm80_tile_io.cuh"
#include "common/sequence.cuh"
#include "common/opaque.cuh"

namespace {

// Per head-dim bucket: block_m, block_n, warps, shared K/V buffers in the ring,
// min CTAs per SM for __launch_bounds__, Q kept in registers.
//
// A warp of 32 rows (kMTiles 2) makes each ldmatrix of K or V feed 4 HMMAs;
// one of 16 rows, only 2, and the loop becomes shared-memory bound
// (docs/sass-report.md). 32 rows per warp fit in 255 registers with Q in
// registers only up to hd64; with Q re-read from shared memory each tile, up to
// hd128, and hd160 at block_n 16; from hd160 at block_n 32 up they spill
// (hd224/hd256: the O accumulators alone need 224/256 registers).
// hd96 and hd128 use FlashAttention-2's own hd128 layout, 4 warps x 32 rows, Q
// from shared, a ring of 2, since it was measured on an H100 (2026-11-25, 16k
// tokens, full and causal) at 0.70-0.75x the time of the 8-warp x 16-row layout
// it replaces (hd128 f16 and bf16, hd96 bf16; kept as the variants __w8); not
// yet measured on an A100. hd160 at block_n 16 (ring of 4, 61440 B) took
// 1.09-1.19x the time of hd160's default there (bf16) and is not kept. hd256 uses
// FlashAttention-2's sm86 hd256 layout, block_m 64, 4 warps x 16 rows, block_n
// 64, Q from shared, which fits sm86/sm89's 99 KB: on the same H100 it took
// 0.79-0.90x the time of 8 warps x 16 rows at block_n 32 (bf16, full and
// causal; block_n 64 spills there), kept as hd256__w8. The other wide buckets
// keep 8 warps x 16 rows with Q in registers (K/V tiles shared by 128 rows
// keep L2 traffic down); of those, only their _99k rows are measured (below).
template <int BM, int BN, int WARPS, int BUFS, int MIN_BLOCKS, bool Q_IN_REGS>
struct Sm80ShapeOf {
    static constexpr int kBlockM = BM, kBlockN = BN, kWarps = WARPS, kBufs = BUFS;
    static constexpr int kMinBlocks = MIN_BLOCKS;
    static constexpr bool kQInRegs = Q_IN_REGS;
};
template <int HD> struct Sm80Shape;
//                                          block_m block_n warps bufs min_blocks q_in_regs
template <> struct Sm80Shape<32>  : Sm80ShapeOf<128,   128,    4,    2,   2,         true> {};
template <> struct Sm80Shape<64>  : Sm80ShapeOf<128,    64,    4,    4,   2,         true> {};
template <> struct Sm80Shape<96>  : Sm80ShapeOf<128,    64,    4,    2,   1,        false> {};
template <> struct Sm80Shape<128> : Sm80ShapeOf<128,    64,    4,    2,   1,        false> {};
template <> struct Sm80Shape<160> : Sm80ShapeOf<128,    64,    8,    4,   1,         true> {};
template <> struct Sm80Shape<192> : Sm80ShapeOf<128,    64,    8,    4,   1,         true> {};
template <> struct Sm80Shape<224> : Sm80ShapeOf<128,    64,    8,    2,   1,         true> {};
template <> struct Sm80Shape<256> : Sm80ShapeOf< 64,    64,    4,    2,   1,        false> {};

// Shapes for devices with 99 KB of shared memory per block (sm86, sm89): the
// `_99k` rows, which the dispatcher takes only where the bucket's main row does
// not fit (hd256's main row fits): the same layouts with 2 buffers (hd224
// also block_n 32). Not measured on sm86/sm89 yet; on the H100 (bf16) hd160's
// and hd192's took 0.98-1.01x their main row's time, hd224's 1.09-1.11x.
template <int HD> struct Sm80Shape99k;
//                                             block_m block_n warps bufs min_blocks q_in_regs
template <> struct Sm80Shape99k<160> : Sm80ShapeOf<128,    64,    8,    2,   1,         true> {};  //  80 KiB
template <> struct Sm80Shape99k<192> : Sm80ShapeOf<128,    64,    8,    2,   1,         true> {};  //  96 KiB
template <> struct Sm80Shape99k<224> : Sm80ShapeOf<128,    32,    8,    2,   1,         true> {};  //  84 KiB

// The `_paged` rows' shapes: their bucket's main one, except hd32's: block_n
// 64 and a ring of 4 (hd64's layout, the same 24 KiB), since at block_n 128
// the page code and the ALiBi branch together needed more than 255 registers
// (36 bytes spilled at sm_80, 20 at sm_90a; re-reading Q from shared memory
// instead spilled at sm_90a). Not measured on a GPU.
template <int HD> struct Sm80ShapePaged : Sm80Shape<HD> {};
template <> struct Sm80ShapePaged<32> : Sm80ShapeOf<128, 64, 4, 4, 2, true> {};

// Variants, to measure against the defaults (see the end of the file).
// __w8: the previous defaults of hd96, hd128 and hd256, 8 warps x 16 rows, Q in registers.
template <int HD> struct Sm80ShapeW8;
template <> struct Sm80ShapeW8<96>  : Sm80ShapeOf<128, 64, 8, 4, 1, true> {};
template <> struct Sm80ShapeW8<128> : Sm80ShapeOf<128, 64, 8, 4, 1, true> {};
template <> struct Sm80ShapeW8<256> : Sm80ShapeOf<128, 32, 8, 4, 1, true> {};

template <int HD, typename Shape = Sm80Shape<HD>>
struct Sm80Config : Shape {
    using S = Shape;
    static constexpr int kThreads = S::kWarps * 32;
    static constexpr int kMTiles = S::kBlockM / (16 * S::kWarps);  // 16-row blocks per warp
    static constexpr int kChunks = HD / 8;                         // 16-byte chunks per row
    static constexpr int kQBytes = S::kBlockM * HD * 2;
    static constexpr int kKvBytes = S::kBlockN * HD * 2;
    static constexpr int kSmemBytes = kQBytes + S::kBufs * kKvBytes;
    static_assert(S::kBlockM % (16 * S::kWarps) == 0, "warps split block_m in 16-row blocks");
    static_assert(S::kBlockN % 16 == 0 && HD % 32 == 0, "");
    static_assert(S::kBufs >= 2, "K_j+1 must load while tile j is computed");
    static_assert(kSmemBytes <= 163 * 1024, "sm80 shared memory per CTA");
};

// PAGED: the `_paged` rows, which also read paged KV caches (below); the
// others read dense K/V only, and their key loop holds no page code.
// PACK: the `_decode` rows (also PAGED), GQA packing: one CTA per KV head
// (grid y), its tile's rows the (query, query head) pairs of the heads that
// share it, row R being query R / G of head hk * G + R % G (G = q_per_kv).
// A decode step's G heads x few queries then fill one tile that reads K and
// V once, where unpacked each head's CTA reads them with 1 useful row of 128.
template <typename T, int HD, typename Shape = Sm80Shape<HD>, bool PAGED = false, bool PACK = false>
__device__ __forceinline__ void sm80_forward(const FaFwdParams &launch) {
    using Cfg = Sm80Config<HD, Shape>;
    constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kMTiles;
    constexpr int BUFS = Cfg::kBufs, THREADS = Cfg::kThreads, CHUNKS = Cfg::kChunks;
    constexpr int KS = HD / 16;  // k16 steps of S = Q K^T
    constexpr int NT = BN / 8;   // n8 tiles of S
    constexpr int DT = HD / 8;   // n8 tiles of O
    using Swz = RowSwizzle<CHUNKS>;

    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t q_tile = smem_u32(smem);
    const uint32_t ring = q_tile + Cfg::kQBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tig = lane % 4;  // mma fragment row / column pair
    // Split-KV (params.h): x is row block * num_splits + split. (In x, not
    // z: the batch index stays blockIdx.z, which ptxas re-reads for free,
    // where a quotient held through the key loop made hd192 spill.)
    const int splits = launch.num_splits > 1 ? launch.num_splits : 1;
    const int m0 = (blockIdx.x / splits) * BM, h = blockIdx.y, b = blockIdx.z;
    FaFwdParams p = launch;
    fa_bind_sequence<T>(p, b);
    // Rows of this (head, sequence): its queries, or with PACK its queries
    // times the G query heads of KV head blockIdx.y.
    const int G = PACK ? p.q_per_kv : 1;
    const int rows = PACK ? p.seqlen_q * G : p.seqlen_q;
    if (m0 >= rows) return;  // past a packed batch's shorter sequence: the whole CTA leaves
    const int warp_row = warp * 16 * MT;     // first CTA-local row this warp owns
    const int hk = PACK ? h : h / p.q_per_kv;
    // Row R's query (its position in the band) and query head.
    auto query_of = [&](int r) { return PACK ? r / G : r; };
    auto head_of = [&](int r) { return PACK ? hk * G + r % G : h; };

    const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride + (PACK ? 0 : h * p.q_head_stride);
    // K and V: row 0 of this head (dense), or the head's offset in a page.
    const T *k = PAGED ? fa_kv_base<T>(p, false, b, hk)
                       : static_cast<const T *>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T *v = PAGED ? fa_kv_base<T>(p, true, b, hk)
                       : static_cast<const T *>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

    // ---- Which key tiles to visit -------------------------------------------
    // Tiles outside the keys that some row of the CTA sees are skipped (a
    // window costs O(window)). The band is monotone in the row, so the keys
    // that every row sees are [lo(last row), hi(first row)); tiles inside that
    // need no element mask. Rows >= seqlen_q are never stored, so they do not
    // count (their Q is zero-filled, so they compute harmless finite values).
    const int row_end = min(m0 + BM, rows);
    const FaKeyRange keys = fa_key_range_rows(p, query_of(m0), query_of(row_end - 1) + 1);
    const int all_lo = fa_key_range(p, query_of(row_end - 1)).lo;
    const int all_hi = fa_key_range(p, query_of(m0)).hi;
    int n_begin = keys.lo / BN;
    int n_tiles = keys.lo < keys.hi ? (keys.hi + BN - 1) / BN - n_begin : 0;
    if (splits > 1) {
        // This split's share: consecutive tiles, ceil(n / splits) each (the
        // last shares may be shorter or empty: an empty one writes O = 0,
        // LSE = -inf, which the combine weighs 0).
        const int per = (n_tiles + splits - 1) / splits;
        const int t0 = min(n_tiles, int(blockIdx.x % splits) * per);
        n_begin += t0;
        n_tiles = min(n_tiles - t0, per);
    }

    // ---- Prologue: Q, then the first BUFS-1 K/V loads ------------------------
    // Load number L is K of tile L/2 (L even) or V (L odd), into buffer L % BUFS.
    // Every call commits one group, empty past the end, so that "load L has
    // landed" is always cp_async_wait<BUFS-2>() at the same point of the loop.
    //
    // PAGED rows: a cache whose page size is a multiple of block_n holds every
    // tile whole in one page, so one page-table lookup per tile, then the
    // dense copy; smaller pages (or sizes that do not divide) take the
    // gather, a lookup per row (the `_decode` rows step the page and slot
    // row to row instead of dividing: Sm80TileLoader::gather_pages). The
    // gather costs static instructions in the key loop (unrolled: with
    // `unroll 1` hd192 spilled), which is why the dense rows leave it out.
    const Sm80TileLoader<T, BN, CHUNKS, THREADS> kv_loader(tid, p.head_dim);
    const bool whole_pages = !PAGED || p.block_table == nullptr || p.page_size % BN == 0;
    auto issue_kv = [&](int L) {
        if (L < 2 * n_tiles) {
            const bool is_v = L & 1;
            const int n0 = (n_begin + L / 2) * BN;
            const T *base = is_v ? v : k;
            const int64_t stride = is_v ? p.v_row_stride : p.k_row_stride;
            const uint32_t dst = ring + (L % BUFS) * Cfg::kKvBytes;
            if (!PAGED)
                kv_loader.load(dst, base + n0 * stride, stride, p.seqlen_k - n0, base);
            else if (whole_pages)
                kv_loader.load(dst, fa_kv_row<T>(p, base, is_v, b, n0), stride, p.seqlen_k - n0, base);
            else if constexpr (PACK)  // the rows' page stepped, not divided (decode steps)
                kv_loader.gather_pages(dst, [&](unsigned pg) { return fa_kv_page<T>(p, base, is_v, b, pg); }, n0,
                                       p.page_size, stride, p.seqlen_k - n0, base);
            else  // (the stepping made hd96/hd128_paged spill at sm_90a)
                kv_loader.gather(dst, [&](int r) { return fa_kv_row<T>(p, base, is_v, b, n0 + r); },
                                 p.seqlen_k - n0, base);
        }
        cp_async_commit();
    };
    {
        const Sm80TileLoader<T, BM, CHUNKS, THREADS> q_loader(tid, p.head_dim);
        if constexpr (PACK)
            q_loader.gather(q_tile, [&](int r) { return q + query_of(m0 + r) * p.q_row_stride + head_of(m0 + r) * p.q_head_stride; },
                            rows - m0, q);
        else
            q_loader.load(q_tile, q + m0 * p.q_row_stride, p.q_row_stride, p.seqlen_q - m0, q);
        cp_async_commit();
    }
#pragma unroll
    for (int L = 0; L < BUFS - 1; ++L) issue_kv(L);

    // Lane addresses for the three ldmatrix patterns (see the mma layouts in
    // mma.cuh): Q as A (rows lane%16, k-half lane/16), K as B (keys
    // 8*(lane/16) + lane%8, k-half (lane/8)%2), V as B via .trans (keys lane%16,
    // n-half lane/16).
    const LdsmAddr<CHUNKS> q_addr(q_tile, warp_row + lane % 16, lane / 16);
    const LdsmAddr<CHUNKS> k_addr(ring, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const LdsmAddr<CHUNKS> v_addr(ring, lane % 16, lane / 16);

    uint32_t q_frag[Cfg::kQInRegs ? MT : 1][Cfg::kQInRegs ? KS : 1][4];
    if constexpr (Cfg::kQInRegs) {
        cp_async_wait<BUFS - 1>();  // the Q group
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) ldsm_x4(q_frag[mt][ks], q_addr.at(mt * 16, ks));
    }

    // Scores enter the softmax in the log2 domain: s * log2(e), or with the cap
    // c * tanh(s / c) * log2(e).
    const bool capped = p.softcap > 0.f;
    const float log2e = 1.4426950408889634f;
    const float score_in = p.scale * log2e;

    float acc_o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    OnlineSoftmax<MT> softmax;
    softmax.init();

    // Score modifiers (params.h), each row by its own query head (with PACK
    // they differ from row to row). Sinks: the softmax starts from the sink,
    // in the first share of the keys only under split-KV, so that the merge
    // counts it once.
    auto row_of = [&](int mt, int hf) { return m0 + warp_row + mt * 16 + hf * 8 + g; };
    if (p.sinks != nullptr && blockIdx.x % splits == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) softmax.seed(mt, hf, p.sinks[head_of(row_of(mt, hf))] * log2e, tig == 0);
    }
    // ALiBi: s -= slope * |i + off - j| on every visited tile (log2 domain:
    // slope * log2(e)). A runtime-uniform branch, like the softcap's, keeps the
    // default loop as it was; per row and tile, a = -slope * log2(e) and
    // x = i + off - 2 tig - n0, the distance to key n0 + nt * 8 + e of this
    // lane's column pair being x - (nt * 8 + e): per score one FADD (integers
    // below 2^24 are exact in f32) and one FFMA with |.|. No per-row state is
    // kept across tiles (the rows are at 255 registers; arrays of a and x
    // spilled): without PACK a warp's rows share the slope and their x differ by
    // constants, so it is one load and one x per tile. With PACK each row has
    // its own head and query: lane L loads the slope of the warp's row L (of
    // 16 * MT) and the quads read theirs by shuffle (a load per row spilled
    // the _decode rows at sm_90a).
    const bool alibi = p.alibi_slopes != nullptr;
    // ptxas, at 255 registers, spills one formulation or the other depending
    // on the kernel (measured, nvcc 13.0): holding the row index across the
    // loop spilled hd256__w8 at sm_80; recomputing it from an opaque thread
    // index each tile spilled hd224, hd128_decode and four others.
    constexpr bool kRematRow = HD == 256 && Cfg::kQInRegs;

    // ---- Main loop over key tiles ---------------------------------------------
    for (int j = 0; j < n_tiles; ++j) {
        const int n0 = (n_begin + j) * BN;

        // K_j has landed for every thread, and every warp is done with the
        // buffer that the next load overwrites (it held V_{j-1}).
        cp_async_wait<BUFS - 2>();
        __syncthreads();
        issue_kv(2 * j + BUFS - 1);

        // S = Q K_j^T
        const uint32_t k_buf = ((2 * j) % BUFS) * Cfg::kKvBytes;
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Cfg::kQInRegs) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) qa[mt][e] = q_frag[mt][ks][e];
                } else {
                    ldsm_x4(qa[mt], q_addr.at(mt * 16, ks));
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t kb[4];  // B of key n8 tiles 2np (kb[0..1]) and 2np+1 (kb[2..3])
                ldsm_x4(kb, k_addr.at(np * 16, ks) + k_buf);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(s[mt][2 * np], qa[mt], kb[0], kb[1]);
                    mma_16816<T>(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
                }
            }
        }

        // Scale (and cap) into the log2 domain.
        if (capped) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        s[mt][nt][e] = fa_softcap_log2(s[mt][nt][e] * score_in, p.softcap);
        } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] *= score_in;
        }
        if (alibi) {
            const float a_lane = -log2e * p.alibi_slopes[b * p.alibi_batch_stride +
                                                         head_of(PACK ? m0 + warp_row + lane % (16 * MT) : 0)];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    // Without PACK: row (0, 0)'s x (the compiler keeps one
                    // copy), row (mt, hf) being mt * 16 + hf * 8 rows further.
                    const int row_c = PACK ? 0 : mt * 16 + hf * 8;
                    const float a = PACK ? __shfl_sync(0xffffffffu, a_lane, mt * 16 + hf * 8 + g) : a_lane;
                    // kRematRow: the row and the lane's column pair from an
                    // opaque thread index, redone here each tile.
                    const int t = kRematRow ? fa_opaque(tid) : 0;
                    const int row = kRematRow ? m0 + (t / 32) * 16 * MT + (PACK ? mt * 16 + hf * 8 : 0) + (t % 32) / 4
                                              : PACK ? row_of(mt, hf) : row_of(0, 0);
                    const int pair = kRematRow ? 2 * (t % 4) : 2 * tig;
                    const float x = float(query_of(row) + p.diag_offset - pair - n0);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            s[mt][nt][2 * hf + e] = fmaf(a, fabsf(x + float(row_c - nt * 8 - e)), s[mt][nt][2 * hf + e]);
                }
        }

        // Element mask, only where the tile is not visible to every row: band
        // edges and the tail past seqlen_k (whose K and V rows were zero-filled,
        // so the -inf here makes P exactly 0 against finite V).
        if (n0 < all_lo || n0 + BN > all_hi) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const FaKeyRange r = fa_key_range(p, query_of(m0 + warp_row + mt * 16 + hf * 8 + g));
                    const int lo = r.lo - n0, hi = r.hi - n0;  // tile-local
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int key = nt * 8 + tig * 2 + e;
                            if (key < lo || key >= hi) s[mt][nt][2 * hf + e] = -INFINITY;
                        }
                }
        }

        // Online softmax: S becomes P in place, O is rescaled to the new max.
        float alpha[MT][2];
        softmax.update(s, alpha);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= alpha[mt][e / 2];

        // V_j has landed, and the buffer of K_j is free for a later K.
        cp_async_wait<BUFS - 2>();
        __syncthreads();
        issue_kv(2 * j + BUFS);

        // O += P V_j, P straight from the S accumulators.
        const uint32_t v_buf = ((2 * j + 1) % BUFS) * Cfg::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_c_to_a<T>(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                uint32_t vb[4];  // B of output n8 tiles 2dp (vb[0..1]) and 2dp+1 (vb[2..3])
                ldsm_x4_trans(vb, v_addr.at(kk * 16, dp) + v_buf);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_o[mt][2 * dp], pa[mt], vb[0], vb[1]);
                    mma_16816<T>(acc_o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }

    // ---- Epilogue: normalise, stage in this warp's own Q rows, store ------------
    float inv_sum[MT][2], lse[MT][2];
    softmax.finish(inv_sum, lse);

    if (splits > 1) {
        // Split-KV: this share's normalised O in f32 and its LSE, straight
        // from the accumulators to the workspace (params.h); the combine
        // writes O and LSE. The Q copy may still be in flight if no tile was
        // visited: wait for it before the CTA ends.
        if (n_tiles == 0) cp_async_wait<0>();
        const int64_t part = int64_t(blockIdx.x % splits) * p.batch + b;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int row = m0 + warp_row + mt * 16 + hf * 8 + g;
                if (row >= rows) continue;
                const int i = query_of(row), hh = head_of(row);
                float *const acc = p.o_accum + ((part * p.seqlen_q + i) * p.heads_q + hh) * p.head_dim;
#pragma unroll
                for (int dt = 0; dt < DT; ++dt)
                    if (dt * 8 < p.head_dim)
                        *reinterpret_cast<float2 *>(acc + dt * 8 + tig * 2) =
                            make_float2(acc_o[mt][dt][2 * hf] * inv_sum[mt][hf], acc_o[mt][dt][2 * hf + 1] * inv_sum[mt][hf]);
                if (tig == 0) p.lse_accum[(part * p.heads_q + hh) * p.seqlen_q + i] = lse[mt][hf];
            }
        return;
    }

    // With no tile visited nothing has waited for the Q copy yet, and other
    // threads' copies may still target these rows.
    if (n_tiles == 0) {
        cp_async_wait<0>();
        __syncthreads();
    }
    __syncwarp();  // this warp's own Q fragment reads are done before overwriting
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = warp_row + mt * 16 + hf * 8 + g;
            unsigned char *stage_row = smem + row * Swz::kRowBytes + tig * 4;
            const int key = Swz::key(row);
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<uint32_t *>(stage_row + ((dt ^ key) << 4)) =
                    fa_pack2<T>(acc_o[mt][dt][2 * hf] * inv_sum[mt][hf],
                             acc_o[mt][dt][2 * hf + 1] * inv_sum[mt][hf]);
        }
    __syncwarp();
    if constexpr (PACK) {
        T *o = static_cast<T *>(p.o) + b * p.o_batch_stride;
        sm80_store_rows_at<T, 16 * MT, CHUNKS>(
            smem + warp_row * Swz::kRowBytes,
            [&](int r) { return o + query_of(m0 + warp_row + r) * p.o_row_stride + head_of(m0 + warp_row + r) * p.o_head_stride; },
            rows - m0 - warp_row, p.head_dim, lane);
    } else {
        T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
        sm80_store_rows<T, 16 * MT, CHUNKS>(smem + warp_row * Swz::kRowBytes,
                                            o + (m0 + warp_row) * p.o_row_stride, p.o_row_stride,
                                            p.seqlen_q - m0 - warp_row, p.head_dim, lane);
    }

    if (p.lse != nullptr && tig == 0) {
        float *lse_b = p.lse + b * p.lse_batch_stride;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int row = m0 + warp_row + mt * 16 + hf * 8 + g;
                if (row < rows) lse_b[head_of(row) * p.lse_head_stride + query_of(row)] = lse[mt][hf];
            }
    }
}

}  // namespace

// FA_KERNEL(name, dtype, head_dim bucket, block_m, block_n, threads, dynamic smem, min sm, grid).
// build.rs reads these lines to make the Rust dispatch table; the static_assert
// makes the compiler check each row against its Sm80Config. FA_SHAPE picks the
// tile shape of the rows that follow: the bucket's default, or a variant's.
#define FA_SHAPE(head_dim) Sm80Shape<head_dim>
#define FA_PAGED false
#define FA_PACK false
#define FA_CFG(head_dim) Sm80Config<head_dim, FA_SHAPE(head_dim)>
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid)             \
    static_assert(block_m == FA_CFG(head_dim)::kBlockM && block_n == FA_CFG(head_dim)::kBlockN &&   \
                      threads == FA_CFG(head_dim)::kThreads && smem == FA_CFG(head_dim)::kSmemBytes && \
                      min_sm == 80 && grid == FA_GRID_TILES,                                        \
                  "table row disagrees with the Sm80Config of " #name);                            \
    extern "C" __global__ void __launch_bounds__(threads, FA_CFG(head_dim)::kMinBlocks)            \
        name(const __grid_constant__ FaFwdParams p) {                                              \
        sm80_forward<FA_DTYPE(dtype), head_dim, FA_SHAPE(head_dim), FA_PAGED, FA_PACK>(p);         \
    }

FA_KERNEL(fa_fwd_sm80_f16_hd32, f16, 32, 128, 128, 128, 24576, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd64, f16, 64, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd96, f16, 96, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd128, f16, 128, 128, 64, 128, 65536, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd160, f16, 160, 128, 64, 256, 122880, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd192, f16, 192, 128, 64, 256, 147456, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd224, f16, 224, 128, 64, 256, 114688, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd256, f16, 256, 64, 64, 128, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd32, bf16, 32, 128, 128, 128, 24576, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd64, bf16, 64, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd96, bf16, 96, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd128, bf16, 128, 128, 64, 128, 65536, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd160, bf16, 160, 128, 64, 256, 122880, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd192, bf16, 192, 128, 64, 256, 147456, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd224, bf16, 224, 128, 64, 256, 114688, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd256, bf16, 256, 64, 64, 128, 98304, 80, FA_GRID_TILES)

// The 99 KB rows (sm86, sm89): after their bucket's main row, which the
// dispatcher prefers wherever it fits (it takes a bucket's rows in this order).
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm80Shape99k<head_dim>
#define FA_SMEM_99K 101376  // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm86 and sm89
static_assert(Sm80Config<160, Sm80Shape99k<160>>::kSmemBytes <= FA_SMEM_99K &&
                  Sm80Config<192, Sm80Shape99k<192>>::kSmemBytes <= FA_SMEM_99K &&
                  Sm80Config<224, Sm80Shape99k<224>>::kSmemBytes <= FA_SMEM_99K &&
                  Sm80Config<256>::kSmemBytes <= FA_SMEM_99K,
              "a _99k row needs more than sm86's 99 KB of shared memory per block");
FA_KERNEL(fa_fwd_sm80_f16_hd160_99k, f16, 160, 128, 64, 256, 81920, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd192_99k, f16, 192, 128, 64, 256, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd224_99k, f16, 224, 128, 32, 256, 86016, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd160_99k, bf16, 160, 128, 64, 256, 81920, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd192_99k, bf16, 192, 128, 64, 256, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd224_99k, bf16, 224, 128, 32, 256, 86016, 80, FA_GRID_TILES)

// The `_paged` rows: each bucket's main tile shape (Sm80ShapePaged), also
// reading paged KV caches (PAGED above). The dispatcher gives them paged
// caches, and only those.
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm80ShapePaged<head_dim>
#undef FA_PAGED
#define FA_PAGED true
FA_KERNEL(fa_fwd_sm80_f16_hd32_paged, f16, 32, 128, 64, 128, 24576, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd64_paged, f16, 64, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd96_paged, f16, 96, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd128_paged, f16, 128, 128, 64, 128, 65536, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd160_paged, f16, 160, 128, 64, 256, 122880, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd192_paged, f16, 192, 128, 64, 256, 147456, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd224_paged, f16, 224, 128, 64, 256, 114688, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd256_paged, f16, 256, 64, 64, 128, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd32_paged, bf16, 32, 128, 64, 128, 24576, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd64_paged, bf16, 64, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd96_paged, bf16, 96, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd128_paged, bf16, 128, 128, 64, 128, 65536, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd160_paged, bf16, 160, 128, 64, 256, 122880, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd192_paged, bf16, 192, 128, 64, 256, 147456, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd224_paged, bf16, 224, 128, 64, 256, 114688, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd256_paged, bf16, 256, 64, 64, 128, 98304, 80, FA_GRID_TILES)
// The `_decode` rows: GQA packing (PACK above) with paged-cache support, for
// KV-cache calls of few queries per sequence with several query heads per KV
// head (the dispatcher's rule, src/dispatch.rs). Head dims 64-256.
#undef FA_PACK
#define FA_PACK true
FA_KERNEL(fa_fwd_sm80_f16_hd64_decode, f16, 64, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd96_decode, f16, 96, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd128_decode, f16, 128, 128, 64, 128, 65536, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd160_decode, f16, 160, 128, 64, 256, 122880, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd192_decode, f16, 192, 128, 64, 256, 147456, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd224_decode, f16, 224, 128, 64, 256, 114688, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd256_decode, f16, 256, 64, 64, 128, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd64_decode, bf16, 64, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd96_decode, bf16, 96, 128, 64, 128, 49152, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd128_decode, bf16, 128, 128, 64, 128, 65536, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd160_decode, bf16, 160, 128, 64, 256, 122880, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd192_decode, bf16, 192, 128, 64, 256, 147456, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd224_decode, bf16, 224, 128, 64, 256, 114688, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd256_decode, bf16, 256, 64, 64, 128, 98304, 80, FA_GRID_TILES)
#undef FA_PACK
#define FA_PACK false
#undef FA_PAGED
#define FA_PAGED false

// Variants: never dispatched automatically; benchmarks and GPU tests force them by name.
// Built only with FUSED_ATTN_VARIANTS=1: build.rs otherwise defines FA_NO_VARIANTS
// and leaves these rows out of the table too (the emulators define nothing: they
// always see every row).
#ifndef FA_NO_VARIANTS
#undef FA_SHAPE
#define FA_SHAPE(head_dim) Sm80ShapeW8<head_dim>
FA_KERNEL(fa_fwd_sm80_f16_hd96__w8, f16, 96, 128, 64, 256, 73728, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd96__w8, bf16, 96, 128, 64, 256, 73728, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd128__w8, f16, 128, 128, 64, 256, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd128__w8, bf16, 128, 128, 64, 256, 98304, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_f16_hd256__w8, f16, 256, 128, 32, 256, 131072, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_sm80_bf16_hd256__w8, bf16, 256, 128, 32, 256, 131072, 80, FA_GRID_TILES)
#endif  // FA_NO_VARIANTS
