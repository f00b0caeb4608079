// Data movement primitives of the sm80 path: asynchronous global -> shared
// copies (cp.async) and shared -> register fragment loads (ldmatrix).
// Shared-memory operands are 32-bit shared-window addresses, as PTX wants them.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_u32(const void *ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte copy that skips L1 (.cg: K/V tiles are reused across CTAs through L2,
// never by the same SM's L1). Bytes past src_bytes are zero-filled, so
// src_bytes = 0 writes 16 zero bytes without reading global memory: that is how
// rows past the sequence and columns past head_dim become zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}

// 4-byte copy (one f32: a row's LSE or D), zero-filled when src_bytes = 0.
// Only .ca takes sizes below 16; the line it leaves in L1 is never reused.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void *src, uint32_t src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N of this thread's committed groups are still in flight.
// Other threads' copies are visible only after a following barrier.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i,
// and r[i] receives matrix i in the mma fragment layout (lane t: row t/4,
// elements 2*(t%4) and 2*(t%4)+1).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Same, each matrix transposed on the way (lane t: column t/4, rows 2*(t%4)
// and 2*(t%4)+1): turns a row-major [k][n] tile into col-major mma B fragments.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
