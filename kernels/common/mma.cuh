// Warp-level tensor-core MMA (mma.sync m16n8k16, f32 accumulate) and the
// register fragments it works on. Fragment coordinates, with g = lane / 4 and
// c = 2 * (lane % 4):
//   A 16x16 row-major, 4 regs of 2 elements: a[0] (g, c..c+1), a[1] (g+8, c..c+1),
//                                            a[2] (g, c+8..c+9), a[3] (g+8, c+8..c+9)
//   B 16x8 "col" (k fastest), 2 regs:        b[0] (k = c..c+1, n = g), b[1] (k = c+8..c+9, n = g)
//   C 16x8 f32, 4 floats:                    c[0..1] (g, c..c+1), c[2..3] (g+8, c..c+1)
// So the two C tiles of n-columns 16j..16j+7 and 16j+8..16j+15 of one row block
// hold, element for element, the A tile of k-columns 16j..16j+15 (mma_c_to_a):
// a softmax result feeds the next mma straight from registers.
#pragma once
#include <stdint.h>
#include "types.cuh"

// d += a * b, f32 accumulators in place.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<fa_f16>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<fa_bf16>(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


// The A fragment for k-columns 16j..16j+15 made from the C fragments of
// n-columns 16j..16j+7 (c_lo) and 16j+8..16j+15 (c_hi) of the same 16 rows.
template <typename T>
__device__ __forceinline__ void mma_c_to_a(uint32_t (&a)[4], const float (&c_lo)[4],
                                           const float (&c_hi)[4]) {
    a[0] = fa_pack2<T>(c_lo[0], c_lo[1]);  // row g,   k = c, c+1
    a[1] = fa_pack2<T>(c_lo[2], c_lo[3]);  // row g+8, k = c, c+1
    a[2] = fa_pack2<T>(c_hi[0], c_hi[1]);  // row g,   k = c+8, c+9
    a[3] = fa_pack2<T>(c_hi[2], c_hi[3]);  // row g+8, k = c+8, c+9
}
