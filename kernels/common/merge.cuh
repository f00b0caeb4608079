// Merge of attention states (DESIGN.md section 1b): partial results (O_s,
// LSE_s) of the same row over disjoint key sets combine exactly as
//   LSE = log sum_s e^{LSE_s},  O = sum_s e^{LSE_s - LSE} O_s,
// evaluated from the largest LSE so that no exponential overflows. A part
// with LSE_s = -inf (no visible key) weighs exactly 0 and its O is not read;
// when every part has none, O = 0 and LSE = -inf, as for an empty row.
//
// fa_merge_row is one row's work for the 32 lanes of a warp (no shuffles,
// no shared memory: each lane finds the weights itself and writes its own
// columns), so the host harness (tools/merge-harness) runs the same code.
// P is the parts' element type: the output's (merge_states_into) or f32
// (the split-KV workspace, parts strided).
#pragma once
#include "../params.h"
#include "types.cuh"

__device__ __forceinline__ float fa_part_to_float(float x) { return x; }
template <typename P>
__device__ __forceinline__ float fa_part_to_float(P x) { return fa_to_float(x); }

template <typename T, typename P>
__device__ __forceinline__ void fa_merge_row(const FaMergeParams &p, int b, int i, int h, int lane) {
    // Part s: its own entry, or part 0 moved by s part strides.
    auto part = [&](int s) -> const FaMergePart & { return p.part[p.strided ? 0 : s]; };
    auto part_lse = [&](int s) {
        const FaMergePart &q = part(s);
        return q.lse[(p.strided ? s * p.lse_part_stride : 0) + b * q.lse_batch_stride + h * q.lse_head_stride + i];
    };
    float m = -INFINITY;
    for (int s = 0; s < p.parts; ++s) m = fmaxf(m, part_lse(s));
    T *const o = static_cast<T *>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    if (m == -INFINITY) {
        for (int d = 2 * lane; d < p.head_dim; d += 64) {
            o[d] = fa_from_float<T>(0.f);
            o[d + 1] = fa_from_float<T>(0.f);
        }
        if (p.lse != nullptr && lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = -INFINITY;
        return;
    }
    // Weights relative to the largest part: each in [0, 1], the largest 1, so
    // their sum is in [1, parts] and its log is exact to rounding. Recomputed
    // per column pair rather than kept (any number of strided parts).
    float sum = 0.f;
    for (int s = 0; s < p.parts; ++s) sum += expf(part_lse(s) - m);
    const float inv = 1.f / sum;
    for (int d = 2 * lane; d < p.head_dim; d += 64) {
        float a0 = 0.f, a1 = 0.f;
        for (int s = 0; s < p.parts; ++s) {
            const float w = expf(part_lse(s) - m);
            if (w == 0.f) continue;  // no visible key there (or negligible): its O is never read
            const FaMergePart &q = part(s);
            const P *x = static_cast<const P *>(q.o) + (p.strided ? s * p.o_part_stride : 0) + b * q.o_batch_stride +
                         i * q.o_row_stride + h * q.o_head_stride;
            a0 += w * fa_part_to_float(x[d]);
            a1 += w * fa_part_to_float(x[d + 1]);
        }
        o[d] = fa_from_float<T>(a0 * inv);
        o[d + 1] = fa_from_float<T>(a1 * inv);
    }
    if (p.lse != nullptr && lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = m + logf(sum);
}
