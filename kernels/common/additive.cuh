// Fused additive (Bahdanau) attention (DESIGN.md section 1b), on CUDA cores:
//   s_ij = sum_d w_d tanh(q'_id + k'_jd + b_d),  then mask, softmax, O = P V.
// The Lq x Lk x Da tanh arguments never exist in memory. One CTA owns
// FA_ADDITIVE_BLOCK_M query rows of one (head, batch) and walks the key tiles
// its rows can see (a tile no row sees is never touched), keeping an online
// softmax, as the dot-product kernels do:
//   1. q' + b (once) and w into shared memory, as f32;
//   2. per tile of FA_ADDITIVE_BLOCK_N keys: K' and V rows into shared memory
//      (each element loaded from global memory once per tile);
//   3. scores: thread (row r, lane-in-row c) takes keys c, c + 8, c + 16,
//      c + 24 of the tile: per 4 columns d it reads q'+b, w and four K' rows
//      as float4, six loads for sixteen tanh;
//   4. the row's max and sum over its 8 threads (xor shuffles), P into
//      shared memory, the running O rescaled;
//   5. O += P V: the thread owns float4 column groups c, c + 8, ... of its
//      row (32 f32 accumulators at Dv = 256).
// The hot loop is bound by the tanh unit (MUFU, 16 results per SM and clock
// on sm80/sm90), not by memory: each K' element feeds 16 tanh per tile.
//
// fa_additive_cta takes its thread and block coordinates and shared memory
// as arguments so that tools/additive-harness runs this code on the host,
// one fiber per thread.
#pragma once
#include "../params.h"
#include "types.cuh"

constexpr int kAddM = FA_ADDITIVE_BLOCK_M;
constexpr int kAddN = FA_ADDITIVE_BLOCK_N;
constexpr int kAddThreads = FA_ADDITIVE_THREADS;
constexpr int kAddRowThreads = 8;                    // threads sharing one query row
constexpr int kAddKeysPerThread = kAddN / kAddRowThreads;
constexpr int kAddGroups = FA_ADDITIVE_MAX_DIM / (4 * kAddRowThreads);  // float4 column groups per thread
static_assert(kAddM * kAddRowThreads == kAddThreads, "one row per 8 threads");
static_assert(kAddRowThreads == 8 && kAddKeysPerThread == 4, "the shuffles and float4 loads assume 8 x 4");

// Row pitch of q'+b and K' in shared memory: Da + 4 is an odd multiple of 4
// floats (Da is a multiple of 8), so the 8 float4 loads of 8 different K'
// rows in one quarter-warp phase fall in 8 different bank quadruples.
__device__ __forceinline__ int fa_additive_pitch(int da) { return da + 4; }

// tanh of the score terms.
//  - tanh.approx.f32 (one MUFU.TANH): the PTX ISA bounds its relative error
//    by 2^-10.987; the score then errs by up to 2^-10.987 sum_d |w_d tanh_d|.
//  - 1 - 2 / (e^{2x} + 1) with ex2.approx and a fast reciprocal (two MUFU
//    ops): absolute error a few f32 ulps of 1 for every x (e^{2x} overflowing
//    to inf gives exactly 1, underflowing to 0 exactly -1), and an absolute
//    error is what a sum of w_d tanh_d sees.
// The harness measures O's error with each (its model of tanh.approx takes
// the documented bound at random signs); the host chooses per call
// (FaAdditiveParams::tanh_approx).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float fa_tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fa_tanh_accurate(float x) { return 1.f - __fdividef(2.f, __expf(2.f * x) + 1.f); }
#else
// Host builds (tools/additive-harness) define these with a model of the hardware.
float fa_tanh_approx(float x);
float fa_tanh_accurate(float x);
#endif

template <bool kApprox>
__device__ __forceinline__ float fa_additive_tanh(float x) {
    return kApprox ? fa_tanh_approx(x) : fa_tanh_accurate(x);
}

// Scores of query row r (its q'+b at qb) against the four keys at ks rows
// c, c + 8, c + 16, c + 24 of the tile: s[kk] = sum_d w_d tanh(qb_d + k_d).
template <bool kApprox>
__device__ __forceinline__ void fa_additive_scores(const float *qb, const float *ks, const float *ws, int pitch,
                                                   int da, int c, float (&s)[kAddKeysPerThread]) {
#pragma unroll
    for (int kk = 0; kk < kAddKeysPerThread; ++kk) s[kk] = 0.f;
    for (int d = 0; d < da; d += 4) {
        const float4 q4 = *reinterpret_cast<const float4 *>(qb + d);
        const float4 w4 = *reinterpret_cast<const float4 *>(ws + d);
#pragma unroll
        for (int kk = 0; kk < kAddKeysPerThread; ++kk) {
            const float4 k4 = *reinterpret_cast<const float4 *>(ks + (c + kk * kAddRowThreads) * pitch + d);
            float a = s[kk];
            a = fmaf(w4.x, fa_additive_tanh<kApprox>(q4.x + k4.x), a);
            a = fmaf(w4.y, fa_additive_tanh<kApprox>(q4.y + k4.y), a);
            a = fmaf(w4.z, fa_additive_tanh<kApprox>(q4.z + k4.z), a);
            a = fmaf(w4.w, fa_additive_tanh<kApprox>(q4.w + k4.w), a);
            s[kk] = a;
        }
    }
}

// Max and sum over the 8 consecutive lanes of one row.
__device__ __forceinline__ float fa_row8_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}
__device__ __forceinline__ float fa_row8_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x + __shfl_xor_sync(0xffffffffu, x, 4);
}

// Keys [lo, hi) visible to query row i (the band of FaFwdParams).
__device__ __forceinline__ void fa_additive_keys(const FaAdditiveParams &p, int i, int &lo, int &hi) {
    lo = p.window_left < 0 ? 0 : max(i + p.diag_offset - p.window_left, 0);
    hi = p.window_right < 0 ? p.seqlen_k : min(i + p.diag_offset + p.window_right + 1, p.seqlen_k);
}

// One CTA: rows bx * BLOCK_M .. of head h, batch b; thread tid of
// FA_ADDITIVE_THREADS; smem as params.h sizes it. Every thread reaches
// every barrier and shuffle (no early return).
template <typename T, bool kApprox>
__device__ __forceinline__ void fa_additive_cta(const FaAdditiveParams &p, float *smem, int bx, int h, int b,
                                                int tid) {
    const int da = p.dim_a, dv = p.dim_v, pitch = fa_additive_pitch(da);
    float *const qs = smem;                  // [BLOCK_M][pitch]  q' + b
    float *const ks = qs + kAddM * pitch;    // [BLOCK_N][pitch]  K' tile
    float *const vs = ks + kAddN * pitch;    // [BLOCK_N][Dv]     V tile
    float *const ws = vs + kAddN * dv;       // [Da]              w
    float *const ps = ws + da;               // [BLOCK_M][BLOCK_N] P tile
    const int i0 = bx * kAddM, rows = min(kAddM, p.seqlen_q - i0);
    const T *const wh = static_cast<const T *>(p.w) + static_cast<int64_t>(h) * da;
    const T *const bh = p.bias ? static_cast<const T *>(p.bias) + static_cast<int64_t>(h) * da : nullptr;

    const T *const qg = static_cast<const T *>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    for (int e = tid; e < kAddM * da; e += kAddThreads) {
        const int r = e / da, d = e % da;
        float x = 0.f;
        if (r < rows) x = fa_to_float(qg[(i0 + r) * p.q_row_stride + d]) + (bh ? fa_to_float(bh[d]) : 0.f);
        qs[r * pitch + d] = x;
    }
    for (int d = tid; d < da; d += kAddThreads) ws[d] = fa_to_float(wh[d]);

    const int r = tid / kAddRowThreads, c = tid % kAddRowThreads;
    int lo, hi;  // this thread's row's keys (none past the last row)
    fa_additive_keys(p, i0 + r, lo, hi);
    if (r >= rows) hi = lo;
    // The tiles any row of the CTA sees: the band is monotone in i.
    int tile_lo, tile_hi, unused;
    fa_additive_keys(p, i0, tile_lo, unused);
    fa_additive_keys(p, i0 + rows - 1, unused, tile_hi);

    const T *const kg = static_cast<const T *>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
    const T *const vg = static_cast<const T *>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
    float m = -INFINITY, l = 0.f;
    float acc[kAddGroups][4] = {};
    for (int j0 = tile_lo; j0 < tile_hi; j0 += kAddN) {
        const int n = min(kAddN, tile_hi - j0);
        __syncthreads();  // the previous tile's K', V and P are no longer read
        // Rows past the tile's keys are zeros: finite scores (masked anyway) and 0 * V.
        for (int e = tid; e < kAddN * da; e += kAddThreads) {
            const int jj = e / da, d = e % da;
            ks[jj * pitch + d] = jj < n ? fa_to_float(kg[(j0 + jj) * p.k_row_stride + d]) : 0.f;
        }
        for (int e = tid; e < kAddN * dv; e += kAddThreads) {
            const int jj = e / dv, d = e % dv;
            vs[jj * dv + d] = jj < n ? fa_to_float(vg[(j0 + jj) * p.v_row_stride + d]) : 0.f;
        }
        __syncthreads();  // also orders the one-time q' + b and w stores before their first read

        float s[kAddKeysPerThread];
        const bool any = lo < min(hi, j0 + kAddN) && max(lo, j0) < hi;
        if (any) fa_additive_scores<kApprox>(qs + r * pitch, ks, ws, pitch, da, c, s);
#pragma unroll
        for (int kk = 0; kk < kAddKeysPerThread; ++kk) {
            const int j = j0 + c + kk * kAddRowThreads;
            if (!any || j < lo || j >= hi) s[kk] = -INFINITY;
        }

        // Online softmax over the row's 8 threads. base is the running max, or
        // 0 while the row has seen no key (then every p and alpha is 0 or 1,
        // never exp(-inf + inf)).
        float mt = s[0];
#pragma unroll
        for (int kk = 1; kk < kAddKeysPerThread; ++kk) mt = fmaxf(mt, s[kk]);
        const float m_new = fmaxf(m, fa_row8_max(mt));
        const float base = m_new == -INFINITY ? 0.f : m_new;
        float sum = 0.f;
#pragma unroll
        for (int kk = 0; kk < kAddKeysPerThread; ++kk) {
            const float pk = expf(s[kk] - base);
            sum += pk;
            ps[r * kAddN + c + kk * kAddRowThreads] = pk;
        }
        const float alpha = expf(m - base);
        l = l * alpha + fa_row8_sum(sum);
        m = m_new;
        __syncwarp();  // the row's P, written by its 8 lanes of this warp

#pragma unroll
        for (int g = 0; g < kAddGroups; ++g) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[g][e] *= alpha;
        }
        for (int jj = 0; jj < n; ++jj) {
            const float pj = ps[r * kAddN + jj];
#pragma unroll
            for (int g = 0; g < kAddGroups; ++g) {
                const int col = 4 * (c + g * kAddRowThreads);
                if (col >= dv) continue;
                const float4 v4 = *reinterpret_cast<const float4 *>(vs + jj * dv + col);
                acc[g][0] = fmaf(pj, v4.x, acc[g][0]);
                acc[g][1] = fmaf(pj, v4.y, acc[g][1]);
                acc[g][2] = fmaf(pj, v4.z, acc[g][2]);
                acc[g][3] = fmaf(pj, v4.w, acc[g][3]);
            }
        }
    }

    if (r >= rows) return;  // past the last query row (no barrier follows)
    // A row with no visible key: O = 0, LSE = -inf (DESIGN.md section 1).
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T *const o = static_cast<T *>(p.o) + b * p.o_batch_stride + (i0 + r) * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
    for (int g = 0; g < kAddGroups; ++g) {
        const int col = 4 * (c + g * kAddRowThreads);
        if (col >= dv) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) o[col + e] = fa_from_float<T>(acc[g][e] * inv);
    }
    if (p.lse != nullptr && c == 0)
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i0 + r] = l > 0.f ? m + logf(l) : -INFINITY;
}

// The kernels (instantiated in fwd_naive.cu): grid (ceil(Lq / BLOCK_M), H, B),
// FA_ADDITIVE_THREADS threads, dynamic shared memory as params.h sizes it
// (over 48 KiB from Da + Dv > 256: the host raises the kernel's limit). Four
// CTAs per SM: at most 128 registers.
#define FA_ADDITIVE_KERNEL(name, dtype)                                                                      \
    extern "C" __global__ void __launch_bounds__(FA_ADDITIVE_THREADS, 4)                                    \
        name(const __grid_constant__ FaAdditiveParams p) {                                                   \
        extern __shared__ float4 fa_additive_smem[];                                                         \
        float *const smem = reinterpret_cast<float *>(fa_additive_smem);                                     \
        if (p.tanh_approx)                                                                                   \
            fa_additive_cta<FA_DTYPE(dtype), true>(p, smem, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x); \
        else                                                                                                 \
            fa_additive_cta<FA_DTYPE(dtype), false>(p, smem, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x); \
    }
