// Packed (varlen) batches and KV caches: the kernels see one sequence at a
// time. Given its batch index, fa_bind_sequence turns the launch parameters
// into those of a rectangular problem of that one sequence (Q/O/LSE moved to
// its first row, its own lengths and diagonal), and fa_kv_rows says where its
// keys and values live (a dense run of rows, or pages). The tiled code below
// never knows whether the batch was packed or the cache paged. Rectangular
// batches pass through unchanged.
#pragma once
#include "../params.h"

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

// Paged KV caches (the naive kernel; the dispatcher keeps them from the sm80
// kernels, which have no registers to spare at 255 for the gather). Dense:
// row j of sequence b is at base + j * row_stride, base being row 0 of its
// batch entry. Paged: base is the head's offset inside a page and row j is
// row j % page_size of page block_table[b][j / page_size].
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
    const int32_t id = p.block_table[b * p.block_table_stride + page];
    return base + id * (is_v ? p.v_batch_stride : p.k_batch_stride) + int(slot) * rs;
}
