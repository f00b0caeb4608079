// XOR swizzle for row-major shared tiles whose rows are CHUNKS 16-byte chunks
// (CHUNKS = head_dim / 8, a multiple of 4).
//
// ldmatrix reads one 16-byte chunk from each of 8 consecutive rows per 8x8
// matrix, and cp.async writes runs of consecutive chunks: both are free of bank
// conflicts when those 8 chunks land on 8 different 16-byte slots of a 128-byte
// bank line. Physical chunk = logical chunk ^ key(row), where
//   - rows of a multiple of 128 bytes (CHUNKS % 8 == 0): key = row % 8, the
//     classic swizzle;
//   - rows of 64 bytes mod 128 (head dims 32, 96, 160, 224): every other row
//     already starts half a line over, so key = (row / 2) % 4 fills the other
//     4 slots; XOR by < 4 keeps a chunk inside its aligned group of 4, hence
//     inside the row.
// Either way key depends on row % 8 only, so moving by a multiple of 8 rows
// keeps a thread's key.
#pragma once
#include <stdint.h>

template <int CHUNKS>
struct RowSwizzle {
    static_assert(CHUNKS % 4 == 0, "rows must be a multiple of 64 bytes");
    static constexpr int kRowBytes = CHUNKS * 16;
    static constexpr int kKeyMask = CHUNKS % 8 == 0 ? 7 : 3;

    static __device__ __forceinline__ int key(int row) {
        return CHUNKS % 8 == 0 ? (row & 7) : ((row >> 1) & 3);
    }
    // Byte offset of logical chunk `chunk` of `row` from the tile base.
    static __device__ __forceinline__ uint32_t offset(int row, int chunk) {
        return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ key(row)) << 4));
    }
};

// Per-lane ldmatrix addresses into a swizzled tile. Each lane reads logical
// chunk 2*j + half of row `row + 8*i` (row, half fixed per lane; j, i known at
// compile time). Since 2*j has bit 0 clear, the physical chunk is
// (2*j) ^ (half ^ key), whose low bits take only (kKeyMask + 1) / 2 distinct
// values per lane: those few base addresses are computed once, and every load
// becomes base[...] + a compile-time immediate.
template <int CHUNKS>
struct LdsmAddr {
    using Swz = RowSwizzle<CHUNKS>;
    static constexpr int kVariants = (Swz::kKeyMask + 1) / 2;
    uint32_t base[kVariants];

    __device__ __forceinline__ LdsmAddr(uint32_t tile, int row, int half) {
        const int t = half ^ Swz::key(row);
#pragma unroll
        for (int e = 0; e < kVariants; ++e)
            base[e] = tile + static_cast<uint32_t>(row * Swz::kRowBytes + (((2 * e) ^ t) << 4));
    }

    // row_offset must be a multiple of 8 (it keeps the swizzle key).
    __device__ __forceinline__ uint32_t at(int row_offset, int j) const {
        const int c = 2 * j;
        return base[(c & Swz::kKeyMask) >> 1] +
               static_cast<uint32_t>(row_offset * Swz::kRowBytes + ((c & ~Swz::kKeyMask) << 4));
    }
};
