// Block-wide reductions for kernels whose threads each hold one value.
#pragma once

__device__ __forceinline__ float fa_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float fa_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Every thread gets the result. `scratch` holds one float per warp; the
// trailing barrier lets the caller reuse it straight away.
template <int THREADS, bool IS_MAX>
__device__ __forceinline__ float fa_block_reduce(float x, float *scratch) {
    constexpr int WARPS = THREADS / 32;
    x = IS_MAX ? fa_warp_max(x) : fa_warp_sum(x);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) r = IS_MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
    __syncthreads();
    return r;
}
