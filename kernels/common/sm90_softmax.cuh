// Online softmax over wgmma accumulators (sm90_wgmma.cuh layout): each thread
// holds two rows of a 64-row tile (h = 0: row l/4, h = 1: row l/4 + 8 of its
// warp's 16), element 4i + 2h + e of the accumulator being column
// 8i + 2(l%4) + e. The 4 lanes of a quad hold whole rows, so a row reduction
// is two xor-shuffles.
//
// Scores arrive in the log2 domain (multiplied by log2 e), so each exponential
// is one ex2. A running max of -inf (no visible key yet) subtracts 0 instead,
// so exp2(-inf - m) is 0 and -inf - (-inf) never happens: rows that see no key
// end with O = 0 and LSE = -inf (or the sink's logit), never NaN.
//
// An attention sink (DESIGN.md 1b) is a virtual key with V = 0 folded in
// before the first tile: the state starts at m = sink, l = e^(sink - m) = 1
// instead of -inf / 0. Without a sink the same start with sink = -inf is
// exact too: the first key's alpha = exp2(-inf - m) = 0 clears that 1, and a
// row that never sees a key keeps m = -inf, LSE = -inf + ln 1, O = 0.
#pragma once
#include "math.cuh"

namespace sm90 {

struct RowSoftmax {
    float row_max[2];  // running max, log2 domain, quad-uniform
    float row_sum[2];  // this lane's share of the running sum; quad-reduced in finish()

    // sink: the sink's logit in the log2 domain, -inf for none. Only the
    // quad's first lane counts its 1: finish() sums the four lanes' shares.
    __device__ __forceinline__ void init(float sink, bool quad_leader) {
        row_max[0] = row_max[1] = sink;
        row_sum[0] = row_sum[1] = quad_leader ? 1.f : 0.f;
    }

    // Folds in one score tile (masked entries -inf): turns it into unnormalised
    // probabilities exp2(s - max) in place, and returns in `alpha` the factor by
    // which each row's output accumulator must shrink.
    template <int NACC>
    __device__ __forceinline__ void update(float (&s)[NACC], float (&alpha)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = row_max[h];
#pragma unroll
            for (int i = 0; i < NACC / 4; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * h], s[4 * i + 2 * h + 1]));
            mx = quad_max(mx);
            const float sub = mx == -INFINITY ? 0.f : mx;
            alpha[h] = fa_exp2(row_max[h] - sub);
            row_max[h] = mx;
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < NACC / 4; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pr = fa_exp2(s[4 * i + 2 * h + e] - sub);
                    s[4 * i + 2 * h + e] = pr;
                    sum += pr;
                }
            row_sum[h] = row_sum[h] * alpha[h] + sum;
        }
    }

    // Final per-row factor 1/l and natural-log LSE. A row that saw no key has
    // O = 0 (nothing was added to it) and m = the sink's logit, l = 1, so
    // LSE = sink; without a sink m = -inf and l is 1 (no tile) or 0 (alpha
    // cleared it on a masked tile): LSE = -inf either way.
    __device__ __forceinline__ void finish(float (&inv_sum)[2], float (&lse)[2]) const {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = quad_sum(row_sum[h]);
            const bool any = l > 0.f;
            inv_sum[h] = any ? 1.f / l : 0.f;
            lse[h] = any ? row_max[h] * 0.6931471805599453f + logf(l) : -INFINITY;
        }
    }
};

// acc row h *= f[h], for an accumulator in the layout above.
template <int NACC>
__device__ __forceinline__ void scale_rows(float (&acc)[NACC], const float (&f)[2]) {
#pragma unroll
    for (int i = 0; i < NACC / 4; ++i) {
        acc[4 * i + 0] *= f[0];
        acc[4 * i + 1] *= f[0];
        acc[4 * i + 2] *= f[1];
        acc[4 * i + 3] *= f[1];
    }
}

}  // namespace sm90
