// Online softmax over score tiles held as mma C fragments (see mma.cuh): a
// thread holds, per 16-row block, rows g and g+8, two columns of every n8 tile;
// the 4 lanes of a quad (lane / 4 equal) together hold whole rows, so row
// reductions are two xor-shuffles.
//
// Scores arrive in the log2 domain (already multiplied by log2(e)), so every
// exponential is one ex2. The running max may be -inf (no visible key yet):
// then 0 is subtracted instead, which keeps exp2(-inf - m) = 0 and never
// evaluates -inf - (-inf).
#pragma once
#include "math.cuh"

// Row state for MT 16-row blocks: index [mt][half], half 0 = row g, 1 = row g+8.
template <int MT>
struct OnlineSoftmax {
    float row_max[MT][2];  // running max, log2 domain, quad-uniform
    float row_sum[MT][2];  // this lane's share of the running sum; quad-reduced in finish()

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                row_max[mt][hf] = -INFINITY;
                row_sum[mt][hf] = 0.f;
            }
    }

    // Starts row (mt, hf) with an attention sink (params.h): a key of
    // log2-domain logit `logit` seen before all others, whose V is 0. Its
    // exp2(logit - max) = 1 enters the sum once per row: in the quad's
    // `owner` lane only, since finish() adds the four lanes' shares.
    __device__ __forceinline__ void seed(int mt, int hf, float logit, bool owner) {
        row_max[mt][hf] = logit;
        row_sum[mt][hf] = owner ? 1.f : 0.f;
    }

    // Folds in a tile of NT n8 score fragments (masked entries -inf): turns
    // them into unnormalised probabilities exp2(s - max) in place and returns in
    // `alpha` the factor by which each row's output accumulator must shrink.
    template <int NT>
    __device__ __forceinline__ void update(float (&s)[MT][NT][4], float (&alpha)[MT][2]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = row_max[mt][hf];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
                mx = quad_max(mx);
                const float sub = mx == -INFINITY ? 0.f : mx;
                alpha[mt][hf] = fa_exp2(row_max[mt][hf] - sub);
                row_max[mt][hf] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pr = fa_exp2(s[mt][nt][2 * hf + e] - sub);
                        s[mt][nt][2 * hf + e] = pr;
                        sum += pr;
                    }
                row_sum[mt][hf] = row_sum[mt][hf] * alpha[mt][hf] + sum;
            }
    }

    // Final per-row factor 1/l and natural-log LSE. A row that saw no key
    // (l == 0) gets factor 0 (O = 0) and LSE = -inf.
    __device__ __forceinline__ void finish(float (&inv_sum)[MT][2], float (&lse)[MT][2]) const {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float l = quad_sum(row_sum[mt][hf]);
                const bool any = l > 0.f;
                inv_sum[mt][hf] = any ? 1.f / l : 0.f;
                lse[mt][hf] = any ? row_max[mt][hf] * 0.6931471805599453f + logf(l) : -INFINITY;
            }
    }
};
