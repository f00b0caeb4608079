// Packed (varlen) batches and KV caches: the kernels see one sequence at a
// time. Given its batch index, fa_bind_sequence turns the launch parameters
// into those of a rectangular problem of that one sequence (Q/O/LSE moved to
// its first row, its own lengths and diagonal), and fa_kv_rows says where its
// keys and values live (a dense run of rows, or pages). The tiled code below
// never knows whether the batch was packed or the cache paged. Rectangular
// batches pass through unchanged.
#pragma once
#include "../params.h"

// A block-table entry. The emulators (tools/sm80-emu, tools/sm90-emu)
// define this to a checked read: an entry outside the sequence's own pages
// (-1 in their tables) is an error there, as it is out of contract here.
#ifndef FA_TABLE_READ
#define FA_TABLE_READ(table, i) ((table)[i])
#endif

template <typename T>
__device__ __forceinline__ void fa_bind_sequence(FaFwdParams &p, int b) {
    const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
    if (p.cache_batch_idx != nullptr) {
        // K/V of another batch entry: move the bases by the difference, so
        // that the kernels' own `b * batch_stride` lands on it (and no
        // register holds the entry: the sm80 kernels have none to spare).
        const int64_t shift = p.cache_batch_idx[b] - b;
        p.k = static_cast<const T *>(p.k) + shift * p.k_batch_stride;
        p.v = static_cast<const T *>(p.v) + shift * p.v_batch_stride;
    }
    if (!packed_q && !packed_k && p.seqused_k == nullptr) return;
    if (packed_q) {
        const int q0 = p.cu_seqlens_q[b];
        p.seqlen_q = p.cu_seqlens_q[b + 1] - q0;
        p.q = static_cast<const T *>(p.q) + q0 * p.q_row_stride;
        p.o = static_cast<T *>(p.o) + q0 * p.o_row_stride;
        if (p.lse != nullptr) p.lse += q0;  // LSE rows are unit-stride within a head
    }
    if (packed_k) {
        const int k0 = p.cu_seqlens_k[b];
        p.seqlen_k = p.cu_seqlens_k[b + 1] - k0;
        p.k = static_cast<const T *>(p.k) + k0 * p.k_row_stride;
        p.v = static_cast<const T *>(p.v) + k0 * p.v_row_stride;
    }
    if (p.seqused_k != nullptr) p.seqlen_k = p.seqused_k[b];
    p.diag_offset = p.top_left ? 0 : p.seqlen_k - p.seqlen_q;
}

// Where keys and values live. Dense: row j of sequence b is at
// base + j * row_stride, base being row 0 of its batch entry. Paged: base is
// the head's offset inside a page and row j is row j % page_size of page
// block_table[b][j / page_size].
template <typename T>
__device__ __forceinline__ const T *fa_kv_base(const FaFwdParams &p, bool is_v, int b, int hk) {
    const T *t = static_cast<const T *>(is_v ? p.v : p.k) + hk * (is_v ? p.v_head_stride : p.k_head_stride);
    return p.block_table != nullptr ? t : t + b * (is_v ? p.v_batch_stride : p.k_batch_stride);
}

// Unsigned division: keys and page sizes are non-negative, and ptxas
// inlines it, where signed division cost the naive kernel a stack frame.
template <typename T>
__device__ __forceinline__ const T *fa_kv_row(const FaFwdParams &p, const T *base, bool is_v, int b, int j) {
    const int64_t rs = is_v ? p.v_row_stride : p.k_row_stride;
    if (p.block_table == nullptr) return base + j * rs;
    const unsigned page = unsigned(j) / unsigned(p.page_size);
    const unsigned slot = unsigned(j) - page * unsigned(p.page_size);
    const int32_t id = FA_TABLE_READ(p.block_table, b * p.block_table_stride + page);
    return base + id * (is_v ? p.v_batch_stride : p.k_batch_stride) + int(slot) * rs;
}

// Row 0 of page `page` of sequence b's keys (or values) in a paged cache,
// for loaders that step through the rows themselves (Sm80TileLoader::
// gather_pages): the same arithmetic as fa_kv_row, without the division.
template <typename T>
__device__ __forceinline__ const T *fa_kv_page(const FaFwdParams &p, const T *base, bool is_v, int b, unsigned page) {
    const int32_t id = FA_TABLE_READ(p.block_table, b * p.block_table_stride + page);
    return base + id * (is_v ? p.v_batch_stride : p.k_batch_stride);
}

// The Hopper kernels reach Q, K and V through TMA maps, by coordinates, not
// through pointers: where fa_bind_sequence moves a pointer, this also returns
// the sequence's coordinates in the maps (O and LSE, stored by ordinary
// writes, are moved as above). Packed tensors are one batch entry of all
// tokens, so a packed sequence starts at a row of batch entry 0; a dense
// cache's sequence is the whole entry cache_batch_idx[b]. A paged cache's
// entry and row depend on the key tile (fa_page_coords).
struct FaTmaCoords {
    int q_row, q_batch;   // Q (and O) row 0 of the sequence
    int k_row, kv_batch;  // K and V key 0 (dense or packed)
};
template <typename T>
__device__ __forceinline__ FaTmaCoords fa_bind_sequence_tma(FaFwdParams &p, int b) {
    FaTmaCoords c{0, b, 0, b};
    if (p.cu_seqlens_q != nullptr) c = FaTmaCoords{p.cu_seqlens_q[b], 0, c.k_row, c.kv_batch};
    if (p.cu_seqlens_k != nullptr) c = FaTmaCoords{c.q_row, c.q_batch, p.cu_seqlens_k[b], 0};
    if (p.cache_batch_idx != nullptr) c.kv_batch = p.cache_batch_idx[b];
    fa_bind_sequence<T>(p, b);
    return c;
}

// A paged cache's TMA coordinates {row, page} of the key tile starting at
// key n0 of sequence b: the page that holds key n0 and n0's slot in it (the
// tile lies in that one page: the dispatcher gives the Hopper kernels only
// page sizes that are multiples of block_n).
__device__ __forceinline__ void fa_page_coords(const FaFwdParams &p, int b, int n0, int &row, int &page) {
    const unsigned pg = unsigned(n0) / unsigned(p.page_size);
    row = n0 - int(pg * unsigned(p.page_size));
    page = FA_TABLE_READ(p.block_table, b * p.block_table_stride + pg);
}
