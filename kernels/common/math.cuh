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

// tanh as 1 - 2 / (e^{2x} + 1). Its absolute error is a few 1e-8 over the whole
// range (relative error near 0 does not matter: the softcap multiplies by c and
// feeds an exponential, which cares about absolute error), it saturates
// cleanly to +-1 (e^{2x} = inf gives 1 - 0), and it is far cheaper than tanhf.
// tanh.approx.f32 would be cheaper still, but its 2^-11 relative error times a
// cap of ~50 moves logits by ~0.02, too much for f16 tolerances.
__device__ __forceinline__ float fa_tanh(float x) {
    const float e = fa_exp2(x * 2.8853900817779268f);  // e^{2x}
    return 1.f - __fdividef(2.f, e + 1.f);
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
