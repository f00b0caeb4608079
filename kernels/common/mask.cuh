// The band of DESIGN.md section 1 (bottom- or top-left-aligned by the host's
// choice of diag_offset), as key ranges.
// Everything works on [lo, hi) half-open key ranges so that skipping hidden
// tiles and masking partial ones use the same two numbers.
#pragma once
#include "../params.h"

struct FaKeyRange {
    int lo;  // first visible key (inclusive)
    int hi;  // one past the last visible key
};

// Keys visible to query row i (0 <= i < seqlen_q). Empty when lo >= hi.
__device__ __forceinline__ FaKeyRange fa_key_range(const FaFwdParams &p, int i) {
    const int off = p.diag_offset;
    int lo = p.window_left < 0 ? 0 : i + off - p.window_left;
    int hi = p.window_right < 0 ? p.seqlen_k : i + off + p.window_right + 1;
    lo = max(lo, 0);
    hi = min(hi, p.seqlen_k);
    return {lo, hi};
}

// Union of the visible keys of rows [row_begin, row_end): the band is monotone
// in i, so it is [lo(row_begin), hi(row_end - 1)).
__device__ __forceinline__ FaKeyRange fa_key_range_rows(const FaFwdParams &p, int row_begin,
                                                         int row_end) {
    FaKeyRange first = fa_key_range(p, row_begin);
    FaKeyRange last = fa_key_range(p, row_end - 1);
    return {first.lo, last.hi};
}

// Applies the scale and optional softcap to a raw dot product (natural-log
// domain, for the naive kernel). s / c is inf for a tiny c (tanhf gives +-1,
// and 0 / c stays 0) but subnormal for a huge one (c = FLT_MAX, |s| < 4), where
// it has lost bits: there tanh(x) = x to within 2^-25 relative, so s itself is
// the correctly rounded result.
__device__ __forceinline__ float fa_score(const FaFwdParams &p, float dot) {
    float s = dot * p.scale;
    if (p.softcap > 0.f) {
        const float x = s / p.softcap;
        s = fabsf(x) < 0x1p-12f ? s : p.softcap * tanhf(x);
    }
    return s;
}
