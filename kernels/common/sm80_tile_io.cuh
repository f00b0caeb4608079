// Global <-> swizzled shared tiles of ROWS x (8 * CHUNKS) elements for the sm80
// kernels: cp.async loads that zero-fill what lies outside the tensor, and the
// warp-level write-back of an output tile staged in shared memory.
//
// Lanes walk a row in 16-byte chunks (coalesced); a row of CHUNKS chunks gets
// the next power of two of lanes, so a thread keeps one column for the whole
// tile and only steps down rows. Head dims 96/160/224 leave a few lanes idle
// during the copy, which is cheaper than per-pass division.
#pragma once
#include <stdint.h>
#include "copy.cuh"
#include "swizzle.cuh"

template <int CHUNKS>
struct LanesPerRow {
    static constexpr int value = CHUNKS <= 4 ? 4 : CHUNKS <= 8 ? 8 : CHUNKS <= 16 ? 16 : 32;
    static_assert(CHUNKS <= 32, "head_dim above 256");
};

template <typename T, int ROWS, int CHUNKS, int THREADS>
struct Sm80TileLoader {
    using Swz = RowSwizzle<CHUNKS>;
    static constexpr int kLanes = LanesPerRow<CHUNKS>::value;
    static constexpr int kRowsPerPass = THREADS / kLanes;
    static constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
    static_assert(THREADS % kLanes == 0, "");

    int row0;    // this thread's first row
    int chunk;   // this thread's 16-byte column
    bool col_ok; // the column exists in this bucket and in the runtime head_dim

    __device__ __forceinline__ Sm80TileLoader(int tid, int head_dim)
        : row0(tid / kLanes), chunk(tid % kLanes), col_ok(chunk < CHUNKS && chunk * 8 < head_dim) {}

    // Issues (does not commit) the copy of rows [0, ROWS) of a tile whose row 0
    // is `src` into the tile at shared address `dst`. Rows >= rows_valid and
    // columns >= head_dim are written as zeros; `safe` is any readable address,
    // given to the hardware instead of an out-of-range one.
    __device__ __forceinline__ void load(uint32_t dst, const T *src, int64_t row_stride,
                                         int rows_valid, const T *safe) const {
        const T *g = src + row0 * row_stride + chunk * 8;
        const int64_t step = kRowsPerPass * row_stride;
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
            const int r = row0 + i * kRowsPerPass;
            const bool in_tile = (ROWS % kRowsPerPass == 0 || r < ROWS) &&
                                 (kLanes == CHUNKS || chunk < CHUNKS);
            if (in_tile) {
                const bool ok = col_ok && r < rows_valid;
                cp_async_16(dst + Swz::offset(r, chunk), ok ? g : safe, ok ? 16u : 0u);
            }
            g += step;
        }
    }

    // load() for rows that are not equally spaced (a paged cache whose pages
    // are shorter than the tile): row r of the tile is at row_at(r), which is
    // asked only for rows < rows_valid (past them the page table may end).
    // Unrolled: with `unroll 1` the loop's own state made hd192 (255
    // registers) spill, unrolled ptxas schedules the page-table loads freely.
    template <typename RowAt>
    __device__ __forceinline__ void gather(uint32_t dst, RowAt row_at, int rows_valid, const T *safe) const {
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
            const int r = row0 + i * kRowsPerPass;
            const bool in_tile = (ROWS % kRowsPerPass == 0 || r < ROWS) &&
                                 (kLanes == CHUNKS || chunk < CHUNKS);
            if (in_tile) {
                const bool ok = col_ok && r < rows_valid;
                cp_async_16(dst + Swz::offset(r, chunk), ok ? row_at(r) + chunk * 8 : safe, ok ? 16u : 0u);
            }
        }
    }

    // gather() for the rows of a paged cache, keys j0, j0 + 1, ... in pages
    // of `page_size` rows `row_stride` apart, page_at(pg) being row 0 of
    // the sequence's page pg (asked only for rows < rows_valid: past them
    // the page table may end). A thread's rows are kRowsPerPass apart, so
    // its page and slot step with them: one division per call, then one
    // compare and subtract per row where a page holds at least a pass,
    // instead of a division per row (16 per tile at hd128, on top of the
    // copies; decode steps on page-16 caches ran at 53 % of the copy
    // bandwidth where dense ones reached 96 %, H100 2026-11-26).
    template <typename PageAt>
    __device__ __forceinline__ void gather_pages(uint32_t dst, PageAt page_at, int j0, int page_size,
                                                 int64_t row_stride, int rows_valid, const T *safe) const {
        const unsigned ps = unsigned(page_size);
        const unsigned j = unsigned(j0 + row0);
        unsigned page = j / ps;
        unsigned slot = j - page * ps;
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
            const int r = row0 + i * kRowsPerPass;
            const bool in_tile = (ROWS % kRowsPerPass == 0 || r < ROWS) &&
                                 (kLanes == CHUNKS || chunk < CHUNKS);
            if (in_tile) {
                const bool ok = col_ok && r < rows_valid;
                cp_async_16(dst + Swz::offset(r, chunk), ok ? page_at(page) + slot * row_stride + chunk * 8 : safe,
                            ok ? 16u : 0u);
            }
            slot += kRowsPerPass;
            if (ps >= unsigned(kRowsPerPass)) {
                if (slot >= ps) {  // at most one page per pass
                    slot -= ps;
                    ++page;
                }
            } else {  // pages shorter than a pass
                page += slot / ps;
                slot %= ps;
            }
        }
    }
};

// One warp copies ROWS staged rows (swizzled, as written by the epilogue) to
// global memory with 16-byte stores: row r to row_at(r) (asked only for rows
// < rows_valid; rows past it and columns >= head_dim are not written).
template <typename T, int ROWS, int CHUNKS, typename RowAt>
__device__ __forceinline__ void sm80_store_rows_at(const unsigned char *stage, RowAt row_at, int rows_valid,
                                                   int head_dim, int lane) {
    using Swz = RowSwizzle<CHUNKS>;
    constexpr int kLanes = LanesPerRow<CHUNKS>::value;
    constexpr int kRowsPerPass = 32 / kLanes;
    static_assert(ROWS % kRowsPerPass == 0, "");
    const int chunk = lane % kLanes;
    const int row0 = lane / kLanes;
    if (chunk >= CHUNKS || chunk * 8 >= head_dim) return;
#pragma unroll
    for (int i = 0; i < ROWS / kRowsPerPass; ++i) {
        const int r = row0 + i * kRowsPerPass;
        if (r < rows_valid) {
            const uint4 v = *reinterpret_cast<const uint4 *>(stage + Swz::offset(r, chunk));
            *reinterpret_cast<uint4 *>(row_at(r) + chunk * 8) = v;
        }
    }
}

// The same for rows `row_stride` apart from `dst`.
template <typename T, int ROWS, int CHUNKS>
__device__ __forceinline__ void sm80_store_rows(const unsigned char *stage, T *dst,
                                                int64_t row_stride, int rows_valid, int head_dim,
                                                int lane) {
    sm80_store_rows_at<T, ROWS, CHUNKS>(stage, [&](int r) { return dst + r * row_stride; }, rows_valid, head_dim,
                                        lane);
}
