// Baseline backward (DESIGN.md section 1b): the gradients of sum <dO, O> with
// respect to Q, K, V and the sink logits, on CUDA cores, from the forward's O
// and LSE. With P_ij = e^{s_ij - LSE_i}, D_i = <dO_i, O_i>, dP_ij = <dO_i, v_j>
// and dS_ij = P_ij (dP_ij - D_i) (times 1 - tanh^2(s_raw / c) under a softcap):
//   dQ_i = scale sum_j dS_ij k_j,  dK_j = scale sum_i dS_ij q_i,
//   dV_j = sum_i P_ij dO_i,        dsink_h = -sum_i e^{sink_h - LSE_i} D_i.
//
// Deliberately simple, as the naive forward is, and deterministic by
// construction: every output element has exactly one writer, which sums in
// a fixed order (no atomics). A thread owns 8 columns of one gradient row and
// recomputes the dot products it needs over the whole head dimension itself,
// so threads never communicate: no shared memory, no shuffles, no barriers.
// That costs D/8 times the arithmetic of a tiled kernel, and lets the host
// harness (tools/bwd-harness) run this very code thread by thread.
#pragma once
#include "../params.h"
#include "types.cuh"

// Columns per thread: a multiple of 8 divides every head dim.
#define FA_BWD_COLS 8

// One row of a 4-D tensor (batch, row, head), as elements of T.
template <typename T>
__device__ __forceinline__ const T *fa_bwd_row(const void *base, int64_t bs, int64_t rs, int64_t hs, int b, int64_t r,
                                               int h) {
    return static_cast<const T *>(base) + b * bs + r * rs + h * hs;
}

template <typename T>
__device__ __forceinline__ float fa_bwd_dot(const T *x, const T *y, int n) {
    float acc = 0.f;
    for (int d = 0; d < n; ++d) acc = fmaf(fa_to_float(x[d]), fa_to_float(y[d]), acc);
    return acc;
}

// The score of (i, j) as the forward defines it (scale, softcap, ALiBi) and
// the softcap's derivative at it (1 without a cap).
struct FaBwdScore {
    float s, dcap;
};

__device__ __forceinline__ FaBwdScore fa_bwd_score(const FaFwdParams &p, float dot, int b, int h, int i, int j) {
    float s = dot * p.scale, dcap = 1.f;
    if (p.softcap > 0.f) {
        const float t = tanhf(s / p.softcap);
        s = p.softcap * t;
        dcap = 1.f - t * t;
    }
    if (p.alibi_slopes != nullptr)
        s -= p.alibi_slopes[b * p.alibi_batch_stride + h] * fabsf(static_cast<float>(i + p.diag_offset - j));
    return {s, dcap};
}

// D_i = <dO_i, O_i> of row (b, i, h).
template <typename T>
__device__ __forceinline__ float fa_bwd_delta(const FaBwdParams &p, int b, int i, int h) {
    const FaFwdParams &f = p.fwd;
    const T *o = fa_bwd_row<T>(f.o, f.o_batch_stride, f.o_row_stride, f.o_head_stride, b, i, h);
    const T *d_o = fa_bwd_row<T>(p.d_o, p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, i, h);
    return fa_bwd_dot(d_o, o, f.head_dim);
}

// dQ: thread `t` of (h, b) owns columns [8c, 8c + 8) of row i, t = i * chunks + c.
template <typename T>
__device__ __forceinline__ void fa_bwd_dq_thread(const FaBwdParams &p, int64_t t, int h, int b) {
    const FaFwdParams &f = p.fwd;
    const int chunks = f.head_dim / FA_BWD_COLS;
    if (t >= static_cast<int64_t>(f.seqlen_q) * chunks) return;
    const int i = static_cast<int>(t / chunks), c0 = static_cast<int>(t % chunks) * FA_BWD_COLS;
    const int hk = h / f.q_per_kv;
    const T *q = fa_bwd_row<T>(f.q, f.q_batch_stride, f.q_row_stride, f.q_head_stride, b, i, h);
    const T *d_o = fa_bwd_row<T>(p.d_o, p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, i, h);
    const float lse = f.lse[b * f.lse_batch_stride + h * f.lse_head_stride + i];
    float acc[FA_BWD_COLS] = {};
    if (lse != -INFINITY) {  // else no key and no sink: O = 0, no gradient
        const float delta = fa_bwd_delta<T>(p, b, i, h);
        const int off = f.diag_offset;
        const int lo = f.window_left < 0 ? 0 : max(0, i + off - f.window_left);
        const int hi = f.window_right < 0 ? f.seqlen_k : min(f.seqlen_k, i + off + f.window_right + 1);
        for (int j = lo; j < hi; ++j) {
            const T *k = fa_bwd_row<T>(f.k, f.k_batch_stride, f.k_row_stride, f.k_head_stride, b, j, hk);
            const T *v = fa_bwd_row<T>(f.v, f.v_batch_stride, f.v_row_stride, f.v_head_stride, b, j, hk);
            const FaBwdScore sc = fa_bwd_score(f, fa_bwd_dot(q, k, f.head_dim), b, h, i, j);
            const float pij = expf(sc.s - lse);
            const float ds = pij * (fa_bwd_dot(d_o, v, f.head_dim) - delta) * sc.dcap;
#pragma unroll
            for (int c = 0; c < FA_BWD_COLS; ++c) acc[c] = fmaf(ds, fa_to_float(k[c0 + c]), acc[c]);
        }
    }
    T *dq = static_cast<T *>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride;
#pragma unroll
    for (int c = 0; c < FA_BWD_COLS; ++c) dq[c0 + c] = fa_from_float<T>(f.scale * acc[c]);
}

// dK and dV: thread `t` of (KV head g, b) owns columns [8c, 8c + 8) of key
// row j, t = j * chunks + c, summing over the query heads of g and the rows
// that see key j (the band inverted: i + off - left <= j <= i + off + right).
template <typename T>
__device__ __forceinline__ void fa_bwd_dkdv_thread(const FaBwdParams &p, int64_t t, int g, int b) {
    const FaFwdParams &f = p.fwd;
    const int chunks = f.head_dim / FA_BWD_COLS;
    if (t >= static_cast<int64_t>(f.seqlen_k) * chunks) return;
    const int j = static_cast<int>(t / chunks), c0 = static_cast<int>(t % chunks) * FA_BWD_COLS;
    const T *k = fa_bwd_row<T>(f.k, f.k_batch_stride, f.k_row_stride, f.k_head_stride, b, j, g);
    const T *v = fa_bwd_row<T>(f.v, f.v_batch_stride, f.v_row_stride, f.v_head_stride, b, j, g);
    const int off = f.diag_offset;
    const int lo = f.window_right < 0 ? 0 : max(0, j - off - f.window_right);
    const int hi = f.window_left < 0 ? f.seqlen_q : min(f.seqlen_q, j - off + f.window_left + 1);
    float dk[FA_BWD_COLS] = {}, dv[FA_BWD_COLS] = {};
    for (int hh = 0; hh < f.q_per_kv; ++hh) {
        const int h = g * f.q_per_kv + hh;
        for (int i = lo; i < hi; ++i) {
            const float lse = f.lse[b * f.lse_batch_stride + h * f.lse_head_stride + i];
            const T *q = fa_bwd_row<T>(f.q, f.q_batch_stride, f.q_row_stride, f.q_head_stride, b, i, h);
            const T *d_o = fa_bwd_row<T>(p.d_o, p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, i, h);
            const FaBwdScore sc = fa_bwd_score(f, fa_bwd_dot(q, k, f.head_dim), b, h, i, j);
            const float pij = expf(sc.s - lse);
            const float ds = pij * (fa_bwd_dot(d_o, v, f.head_dim) - fa_bwd_delta<T>(p, b, i, h)) * sc.dcap;
#pragma unroll
            for (int c = 0; c < FA_BWD_COLS; ++c) {
                dv[c] = fmaf(pij, fa_to_float(d_o[c0 + c]), dv[c]);
                dk[c] = fmaf(ds, fa_to_float(q[c0 + c]), dk[c]);
            }
        }
    }
    T *dkp = static_cast<T *>(p.dk) + b * p.dk_batch_stride + j * p.dk_row_stride + g * p.dk_head_stride;
    T *dvp = static_cast<T *>(p.dv) + b * p.dv_batch_stride + j * p.dv_row_stride + g * p.dv_head_stride;
#pragma unroll
    for (int c = 0; c < FA_BWD_COLS; ++c) {
        dkp[c0 + c] = fa_from_float<T>(f.scale * dk[c]);
        dvp[c0 + c] = fa_from_float<T>(dv[c]);
    }
}

// The sink logit's gradient of query head h: one thread, batch and rows in
// order (deterministic), f32.
template <typename T>
__device__ __forceinline__ void fa_bwd_dsink_thread(const FaBwdParams &p, int h) {
    const FaFwdParams &f = p.fwd;
    if (h >= f.heads_q) return;
    const float sink = f.sinks[h];
    float acc = 0.f;
    for (int b = 0; b < f.batch; ++b)
        for (int i = 0; i < f.seqlen_q; ++i) {
            const float lse = f.lse[b * f.lse_batch_stride + h * f.lse_head_stride + i];
            acc -= expf(sink - lse) * fa_bwd_delta<T>(p, b, i, h);
        }
    p.dsinks[h] = acc;
}
