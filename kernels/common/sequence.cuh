// Packed (varlen) batches: the kernels see one sequence at a time. Given its
// batch index, fa_bind_sequence turns the launch parameters into those of a
// rectangular problem of that one sequence (base pointers moved to its first
// row, its own lengths and diagonal), so the tiled code below it never knows
// whether the batch was packed. Rectangular batches pass through unchanged.
#pragma once
#include "../params.h"

template <typename T>
__device__ __forceinline__ void fa_bind_sequence(FaFwdParams &p, int b) {
    const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
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
