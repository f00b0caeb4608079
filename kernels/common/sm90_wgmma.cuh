// Warpgroup MMA (wgmma) of sm90: shared-memory matrix descriptors, the async
// fence/commit/wait protocol, the m64nNk16 f32-accumulate shapes the forward
// kernel needs, and the accumulator -> A-register conversion that lets P = softmax(S)
// feed the second GEMM without a trip through shared memory.
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix" sections):
//
// * Accumulator D of m64nNk16, f32, N/2 registers per thread. Thread t of the
//   warpgroup (warp w = t / 32, lane l) holds, for every 8-column chunk
//   i < N/8: d[4i + 2h + e] = D[16w + l/4 + 8h][8i + 2(l%4) + e], h, e in {0,1}.
//   So each thread owns two rows, and the 4 lanes of a quad own whole rows.
// * A from registers (16-bit types), 4 registers of 2 elements each:
//   a[r] = A[16w + l/4 + 8(r%2)][2(l%4) + 8(r/2) + {0,1}]
//   i.e. the accumulator layout of a 64x16 tile, which is what makes
//   wgmma_acc_to_a a pure repack.
// * Shared-memory operands here are always 128-byte-swizzled boxes as the TMA
//   writes them: rows of 64 16-bit elements (128 bytes), 16-byte chunk c of
//   row r stored at chunk c ^ (r % 8), 8-row groups of 1024 bytes, each box
//   1024-byte aligned (so the descriptor base offset is 0: the hardware
//   applies the XOR to absolute address bits, like the TMA).
#pragma once
#include <stdint.h>
#include "types.cuh"

namespace sm90 {

template <typename T> constexpr bool kWgmmaBf16 = false;
template <> constexpr bool kWgmmaBf16<fa_bf16> = true;

// ---- Matrix descriptors ---------------------------------------------------------
// 64-bit descriptor: bits 0-13 start address >> 4, 16-29 leading byte offset
// >> 4, 32-45 stride byte offset >> 4, 49-51 base offset (0), 62-63 swizzle
// mode (1 = 128B).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes,
                                                     uint32_t sbo_bytes) {
    const uint32_t lo = ((smem_addr & 0x3FFFFu) >> 4) | ((lbo_bytes >> 4) << 16);
    const uint32_t hi = (sbo_bytes >> 4) | (1u << 30);  // bit 62 of the descriptor
    return (static_cast<uint64_t>(hi) << 32) | lo;
}

// K-major operand (rows = M or N, the 16-element K slice contiguous in a row):
// the next 8 rows are 1024 bytes on; the leading offset is unused for swizzled
// K-major layouts (set to 1 as the ISA assumes). To step K by 16 elements
// inside a 64-element box, add 32 bytes to the start address; past 64
// elements, move to the next box.
__device__ __forceinline__ uint64_t wgmma_desc_k_major(uint32_t smem_addr) {
    return wgmma_desc_sw128(smem_addr, 16, 1024);
}

// MN-major operand (rows = K, the N index contiguous in a row; "transposed"):
// the next 8 K-rows are 1024 bytes on (stride byte offset) and the next 64
// N-columns are in the next box, `box_bytes` on (leading byte offset). To step
// K by 16, add 2048 bytes (two 8-row groups) to the start address.
// Checked against the PTX ISA canonical layout for MN-major 128B swizzle,
// ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) with T = 8 16-bit elements: LBO
// steps m (the next 64 MN elements = the next box), SBO steps k (the next
// 8 K-rows = 1024 bytes inside the box). Each 8-key x 128-byte group of a
// box is exactly one 1024-byte-aligned swizzle atom, so the XOR the hardware
// applies to the absolute address matches the TMA's.
__device__ __forceinline__ uint64_t wgmma_desc_mn_major(uint32_t smem_addr, uint32_t box_bytes) {
    return wgmma_desc_sw128(smem_addr, box_bytes, 1024);
}

// ---- Async protocol ---------------------------------------------------------------
// fence: orders this warpgroup's earlier register writes (accumulators, A
// fragments) before the wgmmas that follow. commit: closes a group of issued
// wgmmas. wait<N>: blocks until at most N groups are pending; only then may
// their accumulators (and A registers) be touched again.
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// The compiler sees a wgmma as an ordinary asm that reads and writes its
// registers at issue time; it does not know they stay in flight until the
// wait. These empty volatile asms pin every register at a point in the
// volatile-asm order (after a wait, before a fence) so that no accumulator
// read or A-fragment write is scheduled across the async window.
template <int N>
__device__ __forceinline__ void wgmma_pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N>
__device__ __forceinline__ void wgmma_pin(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// ---- Accumulator -> A fragments ---------------------------------------------------

// A 64xN f32 accumulator as N/16 A fragments of 64x16 (k-step j covers
// columns 16j..16j+15): chunks 2j and 2j+1 of the accumulator are exactly
// registers {a0, a1} and {a2, a3} of A fragment j (see the layouts above).
template <typename T, int NACC>
__device__ __forceinline__ void wgmma_acc_to_a(const float (&acc)[NACC],
                                               uint32_t (&a)[NACC / 8][4]) {
    static_assert(NACC % 8 == 0, "N must be a multiple of 16");
#pragma unroll
    for (int j = 0; j < NACC / 8; ++j) {
        a[j][0] = fa_pack2<T>(acc[8 * j + 0], acc[8 * j + 1]);  // row r,   k 2c, 2c+1
        a[j][1] = fa_pack2<T>(acc[8 * j + 2], acc[8 * j + 3]);  // row r+8, k 2c, 2c+1
        a[j][2] = fa_pack2<T>(acc[8 * j + 4], acc[8 * j + 5]);  // row r,   k 2c+8, 2c+9
        a[j][3] = fa_pack2<T>(acc[8 * j + 6], acc[8 * j + 7]);  // row r+8, k 2c+8, 2c+9
    }
}

// ---- The MMAs -----------------------------------------------------------------------
// D (+)= A * B for one k16 step, f32 accumulators, T in {f16, bf16}. The
// accumulator array's length selects N (N/2 floats). `accumulate` = 0
// ignores D's old contents (the first k-step of a fresh product). TRANS_B = 0
// reads B K-major, 1 MN-major. A from shared memory is always K-major here.
// Mechanical operand lists below; one shape per overload.

// m64n64k16, A and B from shared memory.
template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
#define SM90_WGMMA_SS_N64(TY)                                                                                     \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                                              \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                          \
        "}, %32, %33, p, 1, 1, 0, %35;\n}\n"                                                                      \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))
    if constexpr (kWgmmaBf16<T>) {
        SM90_WGMMA_SS_N64("bf16");
    } else {
        SM90_WGMMA_SS_N64("f16");
    }
#undef SM90_WGMMA_SS_N64
}

// m64n80k16, A and B from shared memory.
template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[40], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
#define SM90_WGMMA_SS_N80(TY)                                                                                     \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n80k16.f32." TY "." TY " {"                                              \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
        "%32, %33, %34, %35, %36, %37, %38, %39"                                                                  \
        "}, %40, %41, p, 1, 1, 0, %43;\n}\n"                                                                      \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])  \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))
    if constexpr (kWgmmaBf16<T>) {
        SM90_WGMMA_SS_N80("bf16");
    } else {
        SM90_WGMMA_SS_N80("f16");
    }
#undef SM90_WGMMA_SS_N80
}

// m64n128k16, A and B from shared memory.
template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
#define SM90_WGMMA_SS_N128(TY)                                                                                    \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                                             \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                          \
        "}, %64, %65, p, 1, 1, 0, %67;\n}\n"                                                                      \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))
    if constexpr (kWgmmaBf16<T>) {
        SM90_WGMMA_SS_N128("bf16");
    } else {
        SM90_WGMMA_SS_N128("f16");
    }
#undef SM90_WGMMA_SS_N128
}

// m64n64k16, A from registers, B from shared memory.
template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
#define SM90_WGMMA_RS_N64(TY)                                                                                     \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                                              \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                          \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                                        \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),                               \
          "n"(TRANS_B))
    if constexpr (kWgmmaBf16<T>) {
        SM90_WGMMA_RS_N64("bf16");
    } else {
        SM90_WGMMA_RS_N64("f16");
    }
#undef SM90_WGMMA_RS_N64
}

// m64n128k16, A from registers, B from shared memory.
template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
#define SM90_WGMMA_RS_N128(TY)                                                                                    \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                                             \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                          \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                                        \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),                               \
          "n"(TRANS_B))
    if constexpr (kWgmmaBf16<T>) {
        SM90_WGMMA_RS_N128("bf16");
    } else {
        SM90_WGMMA_RS_N128("f16");
    }
#undef SM90_WGMMA_RS_N128
}

// m64n256k16, A from registers, B from shared memory.
template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
#define SM90_WGMMA_RS_N256(TY)                                                                                            \
    asm volatile(                                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                                     \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"                                                     \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                          \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                                \
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                                \
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                                \
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                    \
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"                  \
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"                                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                 \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),           \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),         \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),         \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),         \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),         \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),         \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),         \
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),         \
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),         \
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),         \
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),         \
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),     \
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),                                       \
          "n"(TRANS_B))
    if constexpr (kWgmmaBf16<T>) {
        SM90_WGMMA_RS_N256("bf16");
    } else {
        SM90_WGMMA_RS_N256("f16");
    }
#undef SM90_WGMMA_RS_N256
}

}  // namespace sm90
