// Host stand-ins for what the Hopper kernel needs from CUDA, so that the real
// kernels/fwd_sm90.cu source (with its inline PTX translated by gen.py into
// the emu_* calls declared here) compiles with g++ and runs under emu.cpp.
//
// Every CUDA thread is a fiber; anything that synchronises threads (warp
// shuffles and votes, bar.sync, wgmma, setmaxnreg) or waits (mbarrier
// try_wait) enters the scheduler in emu.cpp.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <type_traits>

#undef __device__
#undef __host__
#undef __forceinline__
#undef __global__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#undef __grid_constant__
#define __device__
#define __host__
#define __forceinline__ inline
#define __global__
// Static __shared__ variables are one per CTA; CTAs run one at a time here,
// so a function-local static is the same thing (gen.py turns the dynamic
// `extern __shared__` array into a pointer to the emulated window instead).
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __grid_constant__

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

extern uint3 blockIdx, gridDim, blockDim;
uint3 emu_thread_idx();
#define threadIdx (emu_thread_idx())

// ---- shared memory window -------------------------------------------------------
// Shared addresses are offsets into one emulated window; the dynamic array
// starts at a random 16-byte aligned offset (all CUDA guarantees), so the
// kernel's own round-up to 1024 is exercised.
unsigned char *emu_dynamic_smem();
size_t emu_cvta_to_shared(const void *p);
static inline size_t __cvta_generic_to_shared(const void *p) { return emu_cvta_to_shared(p); }

// ---- warp-level intrinsics --------------------------------------------------------
enum { EMU_SHFL_IDX, EMU_SHFL_UP, EMU_SHFL_DOWN, EMU_SHFL_XOR };
uint32_t emu_shfl(int mode, unsigned mask, uint32_t v, int arg, int width);
template <typename T>
static inline T emu_shfl_t(int mode, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    uint32_t u;
    memcpy(&u, &v, 4);
    u = emu_shfl(mode, mask, u, arg, width);
    memcpy(&v, &u, 4);
    return v;
}
template <typename T>
static inline T __shfl_xor_sync(unsigned m, T v, int lane_mask, int w = 32) { return emu_shfl_t(EMU_SHFL_XOR, m, v, lane_mask, w); }
template <typename T>
static inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return emu_shfl_t(EMU_SHFL_IDX, m, v, src, w); }
template <typename T>
static inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return emu_shfl_t(EMU_SHFL_DOWN, m, v, (int)d, w); }
template <typename T>
static inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return emu_shfl_t(EMU_SHFL_UP, m, v, (int)d, w); }
enum { EMU_VOTE_ALL, EMU_VOTE_ANY, EMU_VOTE_BALLOT };
uint32_t emu_vote(int mode, unsigned mask, int pred);
static inline int __all_sync(unsigned m, int p) { return (int)emu_vote(EMU_VOTE_ALL, m, p); }
static inline int __any_sync(unsigned m, int p) { return (int)emu_vote(EMU_VOTE_ANY, m, p); }
static inline unsigned __ballot_sync(unsigned m, int p) { return emu_vote(EMU_VOTE_BALLOT, m, p); }
void __syncwarp(unsigned mask = 0xffffffffu);
void __syncthreads();
// Atomics and fences a tile scheduler might use: one thread runs at a time,
// so a read-modify-write is atomic; each is a scheduling point.
void emu_sched_point();
template <typename T> static inline T atomicAdd(T *p, T v) { emu_sched_point(); T o = *p; *p = o + v; return o; }
template <typename T> static inline T atomicExch(T *p, T v) { emu_sched_point(); T o = *p; *p = v; return o; }
template <typename T> static inline T atomicMax(T *p, T v) { emu_sched_point(); T o = *p; if (v > o) *p = v; return o; }
template <typename T> static inline T atomicCAS(T *p, T c, T v) { emu_sched_point(); T o = *p; if (o == c) *p = v; return o; }
static inline void __threadfence() { emu_sched_point(); }
static inline void __threadfence_block() { emu_sched_point(); }
static inline void __nanosleep(unsigned) { emu_sched_point(); }

// ---- math with device semantics ------------------------------------------------------
// `ulps` off in a random direction under --round=real (emu.cpp), else y.
float emu_perturb(float y, int ulps);
// __fdividef(x, y) is x * rcp.approx(y): for 2^126 < |y| < 2^128 the
// reciprocal flushes to zero, so the quotient is 0 (NaN for infinite x), as
// the CUDA math documentation states; elsewhere an ordinary quotient, up to
// its documented 2 ulp off under --round=real.
static inline float __fdividef(float x, float y) {
    const float ay = fabsf(y);
    if (ay > 0x1p126f && ay <= 3.40282347e38f) return std::isinf(x) ? NAN : 0.f * x;
    return emu_perturb(x / y, 2);
}

// ---- translated PTX (see gen.py) ------------------------------------------------------
void emu_mbarrier_init(const char *mn, uint32_t bar, uint32_t count);
uint64_t emu_mbarrier_arrive(const char *mn, uint32_t bar, uint32_t count, uint32_t tx);
bool emu_mbarrier_wait(const char *mn, uint32_t bar, uint64_t parity_or_state);
void emu_mbarrier_tx(const char *mn, uint32_t bar, uint32_t tx);
void emu_fence(const char *mn);
void emu_prefetch_tensormap(const char *mn, uint64_t map);
void emu_tma_load(const char *mn, uint32_t dst, uint64_t map, const int32_t *coords, int n, uint32_t bar);
void emu_tma_store(const char *mn, uint64_t map, const int32_t *coords, int n, uint32_t src);
void emu_bulk_commit(const char *mn);
void emu_bulk_wait(const char *mn, int n);
void emu_setmaxnreg(const char *mn, uint32_t regs);
void emu_bar(const char *mn, uint32_t id, int count);
void emu_wgmma_fence(const char *mn);
void emu_wgmma_commit(const char *mn);
void emu_wgmma_wait(const char *mn, int n);
void emu_wgmma_mma_async(const char *mn, float *const *d, int nd, bool a_in_regs, const uint32_t *a_vals,
                         const uint32_t *const *a_ptrs, int na, uint64_t desc_a, uint64_t desc_b, bool scale_d,
                         int imm_scale_a, int imm_scale_b, int imm_trans_a, int imm_trans_b);
float emu_ex2_approx(const char *mn, float x);
float emu_tanh_approx(const char *mn, float x);
bool emu_elect_sync(const char *mn, uint32_t mask, uint32_t *laneid);
static inline void emu_compiler_pin() {}

// Block-table reads of common/sequence.cuh: the entry must be a page the
// sequence owns (the case runners fill every other entry with -1).
int32_t emu_table_read(const int32_t *table, int64_t i);
#define FA_TABLE_READ(table, i) emu_table_read(table, i)
