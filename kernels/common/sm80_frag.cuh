// mma.sync operand fragments loaded from swizzled row-major shared tiles
// (RowSwizzle<CHUNKS>), in the four ways a backward pass needs them: the
// same tile feeds one GEMM as it is stored and another transposed (K is the
// B operand of S = Q K^T, read along its rows, and of dQ = dS K, read down its
// columns). ldmatrix's .trans variant does the transposition on the way, so
// no tile is ever stored twice.
//
// Lane l gives the row address of row l % 8 of 8x8 matrix l / 8; which 8x8
// piece of the operand each matrix is follows from the fragment layouts in
// mma.cuh. Every helper reads 8 consecutive rows of one logical 16-byte chunk
// per matrix, which the swizzle spreads over 8 bank slots (conflict-free).
#pragma once
#include <stdint.h>
#include "copy.cuh"
#include "swizzle.cuh"

// A (16 rows x 16 k) from a tile stored [row][k]: matrices (rows 0-7, k 0-7),
// (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
template <int CHUNKS>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], uint32_t tile, int row0, int k0, int lane) {
    const int i = lane / 8, r = lane % 8;
    ldsm_x4(a, tile + RowSwizzle<CHUNKS>::offset(row0 + r + 8 * (i & 1), k0 / 8 + (i >> 1)));
}

// A (16 m x 16 k) from a tile stored [k][m] (transposed): matrix i covers
// m block i & 1 and k block i >> 1, read as stored rows k and transposed.
template <int CHUNKS>
__device__ __forceinline__ void frag_a_t(uint32_t (&a)[4], uint32_t tile, int k0, int m0, int lane) {
    const int i = lane / 8, r = lane % 8;
    ldsm_x4_trans(a, tile + RowSwizzle<CHUNKS>::offset(k0 + r + 8 * (i >> 1), m0 / 8 + (i & 1)));
}

// B for two n8 tiles (n0..n0+7 in b[0..1], n0+8..n0+15 in b[2..3]) over
// k0..k0+15, from a tile stored [n][k] (S = Q K^T reads K this way).
template <int CHUNKS>
__device__ __forceinline__ void frag_b2(uint32_t (&b)[4], uint32_t tile, int n0, int k0, int lane) {
    const int i = lane / 8, r = lane % 8;
    ldsm_x4(b, tile + RowSwizzle<CHUNKS>::offset(n0 + r + 8 * (i >> 1), k0 / 8 + (i & 1)));
}

// The same B from a tile stored [k][n] (O = P V reads V this way).
template <int CHUNKS>
__device__ __forceinline__ void frag_b2_t(uint32_t (&b)[4], uint32_t tile, int k0, int n0, int lane) {
    const int i = lane / 8, r = lane % 8;
    ldsm_x4_trans(b, tile + RowSwizzle<CHUNKS>::offset(k0 + r + 8 * (i & 1), n0 / 8 + (i >> 1)));
}
