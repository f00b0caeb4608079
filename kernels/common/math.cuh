// Scalar and quad-level math shared by the softmax of every tiled kernel.
//
// A quad (4 lanes with equal lane / 4) holds whole rows of both the mma.sync
// C fragment and the wgmma accumulator, so row reductions are two xor-shuffles.
#pragma once
#include <math.h>

// 2^x in one MUFU instruction; scores are kept in the log2 domain for this.
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Softcap in the log2 domain: c * tanh(s / c) * log2(e), from u = s * log2(e)
// (the uncapped log2-domain score, one multiply as without a cap). DESIGN.md
// section 1 asks for a small *relative* error for every finite c > 0, also when
// c >> |s| (result ~ s), so:
//   - t = u * (2 / c) = 2 (s / c) log2(e), and e^{2s/c} = ex2(t); c * log2(e)
//     and scale / c are never formed on their own (they overflow for huge or
//     tiny c); 2 / c is clamped to FLT_MAX for subnormal c;
//   - |t| < 1.6 (|s / c| < 0.5545): u * Q(t^2), Q(t^2) ~ tanh(x) / x with
//     x = s / c; a polynomial has no cancellation near 0, where the former
//     1 - 2 / (e^{2x} + 1) had an absolute error of ~1e-7 that became a
//     relative error of ~1e-7 / x (c = 1e6, |s| < 4: up to 1e-2);
//   - otherwise tanh(|x|) = (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no cancellation
//     for |x| > 0.55 (e^{-2|x|} < 1/3), saturating cleanly (ex2 -> 0 gives 1,
//     nothing becomes inf), the sign put back, and c multiplied in last so that
//     nothing overflows before the result does.
// Q is a relative-minimax fit on [0, 2.56] (4.0e-8 in exact arithmetic), in
// the variable w = 0.04296 t^2 that makes its leading coefficient 1: no
// coefficient needs a register (FFMA takes one immediate), nor does the far
// branch; the tightest kernels (sm80 hd32, sm90 hd256 persistent) have none to
// spare. For the same reason 2 / c is not hoisted by the callers: it is one
// division per tile (common subexpression), not a register held all along.
// Measured by tests/softcap_numerics.rs (tools/softcap-harness: this code on
// the host, ex2.approx and rcp.approx modelled at +-2 ulp, against f64), c from
// 1e-30 to f32::MAX, |s| up to 2.3e38: max relative error 7.2e-7
// (3.2e-7 with exact ex2/rcp); never NaN or inf where s * log2(e) is
// finite. For c < 2 / FLT_MAX (subnormal caps) the result keeps the sign of s,
// is 0 for s = 0 and below the smallest normal float: every such score is, and
// the softmax's ex2.ftz of their differences is exactly 1, as it would be
// with exact capping.
// tanh.approx.f32 would be one instruction, but its relative error (~2^-11)
// moves a logit of 50 by ~0.02, too much for f16 tolerances.
__device__ __forceinline__ float fa_softcap_log2(float u, float c) {
    const float t = u * fminf(2.f / c, 3.40282347e38f);
    const float w = t * (t * 0.0429597385f);
    float q = w - 1.15041161f;
    q = fmaf(q, w, 1.04128039f);
    q = fmaf(q, w, -0.93197161f);
    q = fmaf(q, w, 1.f);
    const float near0 = u * q;
    const float e = fa_exp2(-fabsf(t));
    const float th = (1.f - e) * __fdividef(1.f, 1.f + e);
    const float far = copysignf(c * (th * 1.4426950408889634f), t);
    return fabsf(t) < 1.6f ? near0 : far;
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
