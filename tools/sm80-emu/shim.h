// Host emulation of the CUDA features the sm80 kernel uses: every CUDA thread
// is a fiber (ucontext); warp collectives (ldmatrix, mma, shfl, syncwarp) and
// __syncthreads are rendezvous points resolved by a scheduler.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <deque>
#include <algorithm>
#include <random>

#undef __device__
#undef __forceinline__
#undef __global__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#undef __grid_constant__
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __grid_constant__

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

extern unsigned char *emu_smem;
extern uint3 blockIdx;
uint3 emu_thread_idx();
#define threadIdx (emu_thread_idx())

float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
static inline size_t __cvta_generic_to_shared(const void *p) {
    return (size_t)((const unsigned char *)p - emu_smem);
}
static inline float __fdividef(float a, float b) { return a / b; }
static inline float emu_ex2(float x) { return exp2f(x); }

void emu_cp_async_16(uint32_t dst, const void *src, uint32_t src_bytes);
void emu_cp_async_commit();
void emu_cp_async_wait(int n);
void emu_ldsm(uint32_t (&r)[4], uint32_t addr, bool trans);
void emu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
template <typename T>
inline void emu_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_mma(d, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
}
