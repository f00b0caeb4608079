// Host emulation of the CUDA features the sm80 and naive kernels use: every
// CUDA thread is a fiber (ucontext); warp collectives (ldmatrix, mma, shfl,
// syncwarp) and __syncthreads are rendezvous points resolved by a scheduler.
// Plain shared-memory accesses of the sm80 kernel go through emu_deref (gen.py
// rewrites them) so that they can be checked against cp.async copies in flight.
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
#include <type_traits>
#include <cfloat>

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
extern uint3 gridDim;
uint3 emu_thread_idx();
#define threadIdx (emu_thread_idx())

float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
float __shfl_sync(unsigned mask, float v, int src_lane);
void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
static inline size_t __cvta_generic_to_shared(const void *p) {
    return (size_t)((const unsigned char *)p - emu_smem);
}
// Both model the hardware (flush-to-zero, and in --round=hw its error bound).
float __fdividef(float a, float b);
float emu_ex2(float x);

void emu_cp_async_16(uint32_t dst, const void *src, uint32_t src_bytes);
void emu_cp_async_4(uint32_t dst, const void *src, uint32_t src_bytes);
void emu_cp_async_commit();
void emu_cp_async_wait(int n);
void emu_ldsm(uint32_t (&r)[4], uint32_t addr, bool trans);
void emu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
template <typename T>
inline void emu_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_mma(d, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
}

// A plain load or store of sizeof(T) bytes at p: checked (shared-memory races
// and cp.async copies in flight, global stores outside O) before it happens.
void emu_mem_access(const void *p, size_t bytes, bool write);
template <typename T>
struct EmuRef {
    T *p;
    using V = typename std::remove_const<T>::type;
    operator V() const { emu_mem_access(p, sizeof(T), false); return *p; }
    const EmuRef &operator=(const V &v) const { emu_mem_access(p, sizeof(T), true); *const_cast<V *>(p) = v; return *this; }
};
// gen.py turns `*reinterpret_cast<T *>(ptr)` into `emu_deref<T>(ptr)`.
template <typename T, typename P>
inline EmuRef<T> emu_deref(P *ptr) { return EmuRef<T>{reinterpret_cast<T *>(ptr)}; }

// The naive kernel's static __shared__ arrays (gen.py rewrites each
// declaration): every thread of the CTA gets the same block of emu_smem.
void *emu_shared_alloc(size_t bytes);
template <typename T>
inline T *emu_shared_array(size_t n) { return static_cast<T *>(emu_shared_alloc(n * sizeof(T))); }

// Block-table reads of common/sequence.cuh: the entry must be a page the
// sequence owns (the case runners fill every other entry with -1).
int32_t emu_table_read(const int32_t *table, int64_t i);
#define FA_TABLE_READ(table, i) emu_table_read(table, i)

// The tiled backward (kernels/bwd_sm80.cu): f32 atomics into the dQ
// accumulator (checked as stores; fibers run one at a time, so a plain add
// is atomic here), and the deterministic mode's tickets and turns. CTAs run
// one after another, to completion, in a shuffled order, so a turn that is
// not already due when a CTA asks for it would never come: __nanosleep
// (only ever called while waiting for one) reports that and stops.
float atomicAdd(float *p, float v);
unsigned atomicAdd(uint32_t *p, unsigned v);  // the deterministic mode's ticket
void __nanosleep(unsigned ns);
int emu_ld_acquire(const int32_t *p);
void emu_red_release_add1(int32_t *p);
uint32_t emu_dynamic_smem_bytes();
void __trap();
