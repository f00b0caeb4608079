// Element types by the short names the kernel tables use (f16, bf16), and the
// f32 conversions every kernel needs. One place, so a new dtype is one edit.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

typedef __half fa_f16;
typedef __nv_bfloat16 fa_bf16;
#define FA_DTYPE(short_name) fa_##short_name

__device__ __forceinline__ float fa_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float fa_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T fa_from_float(float x);
template <> __device__ __forceinline__ __half fa_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 fa_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Two f32 -> one register of two 16-bit elements; `lo` is the lower column
// (the .x half), as both mma.sync and wgmma A fragments expect.
template <typename T> __device__ __forceinline__ uint32_t fa_pack2(float lo, float hi);

template <> __device__ __forceinline__ uint32_t fa_pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

template <> __device__ __forceinline__ uint32_t fa_pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}
