// The one launch-parameter struct shared by every forward kernel and the Rust
// side (src/sys/params.rs is its bindgen mirror; tests/params_mirror.rs keeps
// the two in step). Plain C: no CUDA headers, so bindgen can read it as-is.
#ifndef FUSED_ATTN_PARAMS_H
#define FUSED_ATTN_PARAMS_H

#include <stdint.h>

/* Launch shapes a kernel's table row can declare (its last FA_KERNEL field):
 * TILES: grid = (ceil(seqlen_q / block_m), heads_q, batch), one CTA per tile.
 * PERSISTENT: grid = (min(#SMs, #tiles), 1, 1); each CTA walks the tiles. */
#define FA_GRID_TILES 0
#define FA_GRID_PERSISTENT 1

/* All strides are in elements; the last (head-dim) dimension is contiguous.
 * Logical shapes: Q [B, Lq, Hq, D], K [B, Lk, Hk, D], V [B, Lk, Hk, D],
 * O [B, Lq, Hq, D], LSE [B, Hq, Lq] f32 with unit row stride. */
typedef struct FaFwdParams {
    const void *q;
    const void *k;
    const void *v;
    void *o;
    /* May be NULL: the kernel then skips the LSE write. */
    float *lse;

    int64_t q_batch_stride;
    int64_t q_row_stride;
    int64_t q_head_stride;
    int64_t k_batch_stride;
    int64_t k_row_stride;
    int64_t k_head_stride;
    int64_t v_batch_stride;
    int64_t v_row_stride;
    int64_t v_head_stride;
    int64_t o_batch_stride;
    int64_t o_row_stride;
    int64_t o_head_stride;
    /* LSE of (b, h, i) is lse[b * lse_batch_stride + h * lse_head_stride + i]. */
    int64_t lse_batch_stride;
    int64_t lse_head_stride;

    int32_t batch;
    int32_t heads_q;
    int32_t heads_kv;
    /* heads_q / heads_kv: query head h reads KV head h / q_per_kv. */
    int32_t q_per_kv;
    int32_t seqlen_q;
    int32_t seqlen_k;
    int32_t head_dim;

    /* The band: query i sees key j iff
     * i + diag_offset - window_left <= j <= i + diag_offset + window_right.
     * A negative window value means that side is unbounded. The host clamps
     * finite values to at most seqlen_q + seqlen_k, so no sum here overflows
     * int32. diag_offset is seqlen_k - seqlen_q for bottom-right alignment
     * (the default), 0 for top-left (PyTorch's is_causal). */
    int32_t window_left;
    int32_t window_right;

    /* Multiplies q.k before the softcap. */
    float scale;
    /* c > 0: s <- c * tanh(s / c); 0 disables the cap. */
    float softcap;
    int32_t diag_offset;

    /* Packed (varlen) batches, DESIGN.md 1b; all NULL for rectangular ones.
     * cu_seqlens_q (B + 1 entries): batch entry b is rows
     * cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of Q, O and LSE, which the host
     * describes as one sequence of all tokens (batch strides 0); seqlen_q is
     * then the longest sequence (it sizes the grid). cu_seqlens_k likewise for
     * K and V. seqused_k (B entries) caps the keys sequence b uses. With any
     * of them the kernel derives each entry's diagonal itself: 0 when
     * top_left, else its own Lk_b - Lq_b (diag_offset is unused). */
    const int32_t *cu_seqlens_q;
    const int32_t *cu_seqlens_k;
    const int32_t *seqused_k;
    int32_t top_left;

    /* KV caches (DESIGN.md 1b); both NULL otherwise. cache_batch_idx (B
     * entries): sequence b reads K/V batch entry cache_batch_idx[b] instead
     * of b. block_table: K and V are pages [num_pages, page_size, Hk, D]
     * (k/v_batch_stride step pages) and key j of sequence b is row
     * j % page_size of page block_table[b * block_table_stride + j / page_size].
     * Either comes with seqused_k (the cache lengths). */
    const int32_t *cache_batch_idx;
    const int32_t *block_table;
    int64_t block_table_stride;
    int32_t page_size;

    /* Split-KV (the sm80 kernels; DESIGN.md 1b, merge of states):
     * with num_splits > 1 the grid's x is row blocks * num_splits, CTA x
     * taking row block x / num_splits and the (x % num_splits)-th share of
     * the key tiles its rows see. It writes no O and no LSE but its partial state,
     * normalised by its own sum, to the f32 workspace: O part s of row
     * (b, i, h) at o_accum + (((s * batch + b) * seqlen_q + i) * heads_q + h)
     * * head_dim, its LSE at lse_accum + ((s * batch + b) * heads_q + h) *
     * seqlen_q + i (-inf where the share saw no key). A combine (the merge
     * kernel) then writes O and LSE. Rectangular batches and caches only
     * (not packed ones). num_splits <= 1: no split, the accum pointers unused. */
    int32_t num_splits;
    float *o_accum;
    float *lse_accum;

    /* Score modifiers (DESIGN.md 1b), both NULL when unused.
     * ALiBi: query head h of batch entry b has slope
     * m = alibi_slopes[b * alibi_batch_stride + h] (stride 0: one slope per
     * head, [Hq]; Hq: [B, Hq]); after the softcap, s_ij -= m * |i + off - j|
     * with i, j and off those of the row's own sequence (packed batches and
     * caches included).
     * Sinks: query head h has a logit sinks[h] that joins every row's softmax
     * denominator and has no value: a virtual key seen first, with V = 0. A
     * row with no visible key gets O = 0 and LSE = sinks[h]. Under split-KV
     * only the first share (split 0) counts it. */
    const float *alibi_slopes;
    int64_t alibi_batch_stride;
    const float *sinks;
} FaFwdParams;

/* The backward pass (DESIGN.md 1b) of a rectangular problem: `fwd` as the
 * forward took it, with o and lse now inputs (the forward's O and LSE; lse
 * required), and the gradients' tensors beside it. dO, dQ have O's and Q's
 * logical shape, dK, dV K's (summed over each KV head's query heads), each
 * with its own strides (elements; head dim contiguous). dsinks: NULL, or
 * [Hq] f32 for the sink logits' gradient (fwd.sinks set). */
typedef struct FaBwdParams {
    FaFwdParams fwd;
    const void *d_o;
    int64_t do_batch_stride;
    int64_t do_row_stride;
    int64_t do_head_stride;
    void *dq;
    int64_t dq_batch_stride;
    int64_t dq_row_stride;
    int64_t dq_head_stride;
    void *dk;
    int64_t dk_batch_stride;
    int64_t dk_row_stride;
    int64_t dk_head_stride;
    void *dv;
    int64_t dv_batch_stride;
    int64_t dv_row_stride;
    int64_t dv_head_stride;
    float *dsinks;

    /* The tiled (sm80) kernels' workspace, unused by the baseline ones: the
     * f32 dQ accumulator [B][Hq][Lq][head_dim], D_i = <dO_i, O_i> [B][Hq][Lq],
     * the deterministic mode's turn counters [B][Hq][ceil(Lq / 64)] and its
     * ticket counter (the order CTAs start in; all zeroed or written by the
     * first kernel). deterministic != 0: the CTAs add into a query block's
     * dQ in key-block order. */
    float *dq_accum;
    float *delta;
    int32_t *dq_turns;
    uint32_t *dq_ticket;
    int32_t deterministic;
} FaBwdParams;

/* Block size (queries and keys) of the tiled sm80 backward. */
#define FA_BWD_SM80_BLOCK 64

/* Merge of attention states (DESIGN.md 1b, the combine step of split-KV and
 * cascade attention): `parts` partial results over disjoint key sets of the
 * same rows, each O [B, L, H, D] of the output's element type and LSE
 * [B, H, L] f32 (unit row stride), merged into O and, when lse is not NULL,
 * LSE. Strides in elements, the head-dim one 1. */
#define FA_MERGE_MAX_PARTS 8
typedef struct FaMergePart {
    const void *o;
    const float *lse;
    int64_t o_batch_stride;
    int64_t o_row_stride;
    int64_t o_head_stride;
    int64_t lse_batch_stride;
    int64_t lse_head_stride;
} FaMergePart;

typedef struct FaMergeParams {
    /* Parts one by one, or (strided != 0) `parts` parts laid out at equal
     * distances from part[0]: part s at part[0].o + s * o_part_stride and
     * part[0].lse + s * lse_part_stride (the split-KV workspace). */
    FaMergePart part[FA_MERGE_MAX_PARTS];
    int32_t strided;
    int64_t o_part_stride;
    int64_t lse_part_stride;
    void *o;
    float *lse;
    int64_t o_batch_stride;
    int64_t o_row_stride;
    int64_t o_head_stride;
    int64_t lse_batch_stride;
    int64_t lse_head_stride;
    int32_t parts;
    int32_t batch;
    int32_t seqlen;
    int32_t heads;
    int32_t head_dim;
} FaMergeParams;

/* Additive (Bahdanau) attention (DESIGN.md 1b): with H heads (no GQA),
 * s_ij = sum_d w[h][d] * tanh(q[i][d] + k[j][d] + bias[h][d]) over Da = dim_a,
 * then the band mask (window_left/right, diag_offset as in FaFwdParams: -1 an
 * unbounded side), softmax, O = P V and LSE. Q' [B, Lq, H, Da], K'
 * [B, Lk, H, Da], V [B, Lk, H, Dv], O [B, Lq, H, Dv] of one 16-bit element
 * type, strides in elements (head-dim stride 1); w and bias [H, Da]
 * contiguous in that type, bias NULL for none; LSE as in FaFwdParams, NULL
 * for none. tanh_approx != 0 evaluates tanh with tanh.approx.f32 (the
 * hardware's MUFU.TANH), else as 1 - 2 / (e^{2x} + 1) (common/additive.cuh
 * says which error each has). One CTA of FA_ADDITIVE_THREADS threads per
 * FA_ADDITIVE_BLOCK_M query rows of one (head, batch): grid
 * (ceil(Lq / BLOCK_M), H, B); key tiles of FA_ADDITIVE_BLOCK_N keys; dynamic
 * shared memory of 4 * ((BLOCK_M + BLOCK_N) * (Da + 4) + BLOCK_N * Dv + Da
 * + BLOCK_M * BLOCK_N) bytes. Da and Dv multiples of 8, at most
 * FA_ADDITIVE_MAX_DIM. */
#define FA_ADDITIVE_BLOCK_M 16
#define FA_ADDITIVE_BLOCK_N 32
#define FA_ADDITIVE_THREADS 128
#define FA_ADDITIVE_MAX_DIM 256
typedef struct FaAdditiveParams {
    const void *q;
    const void *k;
    const void *v;
    const void *w;
    const void *bias;
    void *o;
    float *lse;
    int64_t q_batch_stride;
    int64_t q_row_stride;
    int64_t q_head_stride;
    int64_t k_batch_stride;
    int64_t k_row_stride;
    int64_t k_head_stride;
    int64_t v_batch_stride;
    int64_t v_row_stride;
    int64_t v_head_stride;
    int64_t o_batch_stride;
    int64_t o_row_stride;
    int64_t o_head_stride;
    int64_t lse_batch_stride;
    int64_t lse_head_stride;
    int32_t batch;
    int32_t heads;
    int32_t seqlen_q;
    int32_t seqlen_k;
    int32_t dim_a;
    int32_t dim_v;
    int32_t window_left;
    int32_t window_right;
    int32_t diag_offset;
    int32_t tanh_approx;
} FaAdditiveParams;
/* Attention maps (DESIGN.md 1b): P = exp(s - LSE) of a forward call's rows,
 * from its Q, K and LSE and the score definition in `p` (scale, softcap,
 * band and alignment, GQA, ALiBi; a sink only enters through the LSE). V, O
 * and the varlen/cache/split fields of `p` are unused (rectangular batches).
 * Per-head maps [B, heads, Lq, Lk] at `maps` (NULL: none), map head n
 * holding query head `heads[n]` for n < num_heads, or query head n when
 * all_heads != 0; the head mean over every query head [B, Lq, Lk] at `mean`
 * (NULL: none). Both of the element type the kernel name says (f32 or the
 * input type), key stride 1, other strides in elements. Masked entries and
 * rows with no visible key are written as exactly 0. */
#define FA_MAPS_MAX_HEADS 16
typedef struct FaMapsParams {
    FaFwdParams p;
    void *maps;
    int64_t map_batch_stride;
    int64_t map_head_stride;
    int64_t map_row_stride;
    void *mean;
    int64_t mean_batch_stride;
    int64_t mean_row_stride;
    int32_t all_heads;
    int32_t num_heads;
    int32_t heads[FA_MAPS_MAX_HEADS];
} FaMapsParams;

/* An opaque CUDA tensor map (CUtensorMap: 128 bytes, 64-byte aligned),
 * encoded on the host with cuTensorMapEncodeTiled. */
typedef struct FaTensorMap {
    __attribute__((aligned(64))) uint64_t opaque[16];
} FaTensorMap;

/* Parameters of the Hopper (sm90a) kernels: the common struct plus one TMA
 * map per tensor. Each map is rank 4 over the logical tensor, innermost
 * first: dims {head_dim, seqlen, heads, batch}, byte strides {row, head,
 * batch}; box {64, rows, 1, 1} where rows is the kernel's block_m for Q and O
 * and its block_n for K and V; 128-byte swizzle; out-of-bounds reads as 0. */
typedef struct FaFwdSm90Params {
    FaFwdParams p;
    FaTensorMap tma_q;
    FaTensorMap tma_k;
    FaTensorMap tma_v;
    FaTensorMap tma_o;
} FaFwdSm90Params;

#endif
