// Baseline forward: one CTA per (query row, query head, batch). Deliberately
// simple so it can serve as a third opinion against the tiled kernels: scores
// for a chunk of keys (one key per thread), an online-softmax update, then
// every thread accumulates its own output columns. f32 throughout.
#include "params.h"
#include "common/types.cuh"
#include "common/mask.cuh"
#include "common/reduce.cuh"
#include "common/sequence.cuh"
#include "common/merge.cuh"
#include "common/additive.cuh"
#include "common/maps.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = 256;
constexpr int kColsPerThread = kMaxHeadDim / kThreads;
// 12 CTAs per SM (up to 40 registers), what the kernel had before paged
// caches: without a bound ptxas aimed at 16 (32 registers) and spilled the
// paged-cache address arithmetic.
constexpr int kMinBlocks = 12;

template <typename T>
__device__ void naive_forward(const FaFwdParams &launch) {
    __shared__ float q_s[kMaxHeadDim];
    __shared__ float p_s[kThreads];
    __shared__ float scratch[kThreads / 32];

    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    FaFwdParams p = launch;
    fa_bind_sequence<T>(p, b);
    if (i >= p.seqlen_q) return;  // a packed batch's shorter sequence
    const int hk = h / p.q_per_kv;
    const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride + i * p.q_row_stride +
                 h * p.q_head_stride;
    const T *k = fa_kv_base<T>(p, false, b, hk), *v = fa_kv_base<T>(p, true, b, hk);

    for (int d = tid; d < p.head_dim; d += kThreads) q_s[d] = fa_to_float(q[d]);
    __syncthreads();

    const FaKeyRange r = fa_key_range(p, i);
    // ALiBi (params.h): s_ij -= slope * |i + off - j|, off the sequence's own
    // diagonal (fa_bind_sequence set it); slope 0 without ALiBi subtracts 0.
    const float slope = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    const int diag = i + p.diag_offset;
    // A sink is a key seen before all others, with V = 0: the row starts at
    // m = sink, l = e^0 = 1, and a row that sees no key ends with LSE = sink.
    const bool sink = p.sinks != nullptr;
    float m = sink ? p.sinks[h] : -INFINITY, l = sink ? 1.f : 0.f;
    float acc[kColsPerThread] = {};

    for (int j0 = r.lo; j0 < r.hi; j0 += kThreads) {
        const int j = j0 + tid;
        float s = -INFINITY;
        if (j < r.hi) {
            const T *kj = fa_kv_row(p, k, false, b, j);
            float dot = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot = fmaf(q_s[d], fa_to_float(kj[d]), dot);
            s = fa_score(p, dot) - slope * fabsf(float(diag - j));
        }
        // The chunk holds at least one visible key, so m_new is finite.
        const float m_new = fmaxf(m, fa_block_reduce<kThreads, true>(s, scratch));
        const float pj = j < r.hi ? expf(s - m_new) : 0.f;
        const float alpha = expf(m - m_new);  // 0 on the first chunk (m = -inf)
        l = l * alpha + fa_block_reduce<kThreads, false>(pj, scratch);
        p_s[tid] = pj;
        __syncthreads();
        const int n = min(kThreads, r.hi - j0);
        if (p.block_table == nullptr) {  // dense: rows a fixed stride apart
            const T *vj0 = fa_kv_row(p, v, true, b, j0);
#pragma unroll
            for (int c = 0; c < kColsPerThread; ++c) {
                const int d = tid + c * kThreads;
                if (d >= p.head_dim) continue;
                float a = acc[c] * alpha;
                for (int jj = 0; jj < n; ++jj)
                    a = fmaf(p_s[jj], fa_to_float(vj0[static_cast<int64_t>(jj) * p.v_row_stride + d]), a);
                acc[c] = a;
            }
        } else {  // paged: each row looked up once, for all of this thread's columns
#pragma unroll
            for (int c = 0; c < kColsPerThread; ++c) acc[c] *= alpha;
            for (int jj = 0; jj < n; ++jj) {
                const T *vj = fa_kv_row(p, v, true, b, j0 + jj);
#pragma unroll
                for (int c = 0; c < kColsPerThread; ++c) {
                    const int d = tid + c * kThreads;
                    if (d < p.head_dim) acc[c] = fmaf(p_s[jj], fa_to_float(vj[d]), acc[c]);
                }
            }
        }
        m = m_new;
        __syncthreads();  // p_s is rewritten by the next chunk
    }

    // A row with no visible key: O = 0, LSE = -inf (DESIGN.md section 1), or
    // with a sink m = sink and l = 1, so LSE = sink.
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
        const int d = tid + c * kThreads;
        if (d < p.head_dim) o[d] = fa_from_float<T>(acc[c] * inv_l);
    }
    if (p.lse != nullptr && tid == 0) {
        const int64_t idx = b * p.lse_batch_stride + h * p.lse_head_stride + i;
        p.lse[idx] = l > 0.f ? m + logf(l) : -INFINITY;
    }
}

}  // namespace

// FA_KERNEL(name, dtype, head_dim bucket, block_m, block_n, threads, dynamic smem, min sm, grid).
// build.rs reads these lines to make the Rust dispatch table: one source of truth.
#define FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid)           \
    static_assert(block_m == 1 && block_n == kThreads && threads == kThreads && smem == 0 &&  \
                      head_dim == kMaxHeadDim && grid == FA_GRID_TILES,                      \
                  "table row disagrees with the naive kernel");                             \
    extern "C" __global__ void __launch_bounds__(threads, kMinBlocks) name(const __grid_constant__ FaFwdParams p) { \
        naive_forward<FA_DTYPE(dtype)>(p);                                                   \
    }

FA_KERNEL(fa_fwd_naive_f16, f16, 256, 1, 128, 128, 0, 80, FA_GRID_TILES)
FA_KERNEL(fa_fwd_naive_bf16, bf16, 256, 1, 128, 128, 0, 80, FA_GRID_TILES)

// Not attention kernels, so not FA_KERNEL rows: the merge of attention states
// (common/merge.cuh), loaded by name (src/ops/merge.rs): parts of the
// output's type (merge_states_into), or f32 parts (the split-KV combine). It
// lives in this image because the naive kernel's image loads on every
// supported GPU. One warp per row; grid (ceil(seqlen / 4), heads, batch), 128
// threads.
#define FA_MERGE_KERNEL(name, dtype, part)                                                                \
    extern "C" __global__ void __launch_bounds__(128) name(const __grid_constant__ FaMergeParams p) {     \
        const int i = blockIdx.x * 4 + threadIdx.x / 32;                                                 \
        if (i < p.seqlen) fa_merge_row<FA_DTYPE(dtype), part>(p, blockIdx.z, i, blockIdx.y, threadIdx.x % 32); \
    }
FA_MERGE_KERNEL(fa_merge_states_f16, f16, fa_f16)
FA_MERGE_KERNEL(fa_merge_states_bf16, bf16, fa_bf16)
FA_MERGE_KERNEL(fa_combine_splits_f16, f16, float)
FA_MERGE_KERNEL(fa_combine_splits_bf16, bf16, float)

// The baseline backward (common/bwd_naive.cuh), also loaded by name: dQ over
// (row x column chunk, query head, batch), dK/dV over (key row x column
// chunk, KV head, batch), the sinks' gradient one thread per query head.
#include "common/bwd_naive.cuh"
#ifdef __CUDACC__  // the host emulator compiles this file too; these kernels have their own harness
#define FA_BWD_KERNELS(dtype)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) fa_bwd_dq_naive_##dtype(const __grid_constant__ FaBwdParams p) { \
        fa_bwd_dq_thread<FA_DTYPE(dtype)>(p, int64_t(blockIdx.x) * 128 + threadIdx.x, blockIdx.y, blockIdx.z);    \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        fa_bwd_dkdv_naive_##dtype(const __grid_constant__ FaBwdParams p) {                                      \
        fa_bwd_dkdv_thread<FA_DTYPE(dtype)>(p, int64_t(blockIdx.x) * 128 + threadIdx.x, blockIdx.y, blockIdx.z);  \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        fa_bwd_dsink_naive_##dtype(const __grid_constant__ FaBwdParams p) {                                     \
        fa_bwd_dsink_thread<FA_DTYPE(dtype)>(p, blockIdx.x * 128 + threadIdx.x);                                 \
    }
FA_BWD_KERNELS(f16)
FA_BWD_KERNELS(bf16)
#endif

// Additive (Bahdanau) attention (common/additive.cuh, which defines the
// kernel macro), loaded by name (src/ops/additive.rs), in this image for the
// same reason as the merge. Only under nvcc: the sm80 emulator compiles this
// file for the host and has no fibers for it; tools/additive-harness runs
// the additive kernel's code instead.
#if defined(__CUDACC__)
FA_ADDITIVE_KERNEL(fa_additive_f16, f16)
FA_ADDITIVE_KERNEL(fa_additive_bf16, bf16)
#endif
// Attention maps (common/maps.cuh), loaded by name (src/ops/maps.rs) like the
// merge kernels and for the same reason. One thread per map entry, 4 rows of
// 32 keys per CTA; grid (row tiles * key tiles, 1, batch). Maps of f32 or of
// the input type.
#define FA_MAPS_KERNEL(name, dtype, out)                                                                        \
    extern "C" __global__ void __launch_bounds__(kMapsThreads) name(const __grid_constant__ FaMapsParams m) {   \
        fa_maps_thread<FA_DTYPE(dtype), out>(m, blockIdx.x, blockIdx.z, threadIdx.x);                          \
    }
FA_MAPS_KERNEL(fa_maps_f16_f32, f16, float)
FA_MAPS_KERNEL(fa_maps_f16_f16, f16, fa_f16)
FA_MAPS_KERNEL(fa_maps_bf16_f32, bf16, float)
FA_MAPS_KERNEL(fa_maps_bf16_bf16, bf16, fa_bf16)
