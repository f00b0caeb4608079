// Attention maps (DESIGN.md section 1b): the normalised weights
//   P_ij = exp(s_ij - LSE_i)
// of a forward call's rows, from its Q, K and LSE. The forward already found
// each row's LSE, so one pass suffices: no second reduction, every entry on
// its own. s_ij is the forward's score (scale, softcap, then ALiBi); a sink
// changes nothing here but the LSE, which already holds it. Masked entries
// are written as exactly 0 without computing them, so a row with no visible
// key is all 0 and the map's zeros are the mask's.
//
// One thread per entry (i, j), looping over the heads: it writes each
// requested head's P and the head mean from a sum it alone holds, so the
// mean needs no atomics and no ordering between CTAs. A warp is 32
// consecutive keys of one row: the map rows are written coalesced. No
// shared memory and no shuffles, so the host harness (tools/maps-harness)
// runs this very code thread by thread.
#pragma once
#include "../params.h"
#include "types.cuh"
#include "mask.cuh"

constexpr int kMapsKeysPerTile = 32;
constexpr int kMapsRowsPerTile = 4;
constexpr int kMapsThreads = kMapsKeysPerTile * kMapsRowsPerTile;

__device__ __forceinline__ void fa_map_store(float *at, float x) { *at = x; }
template <typename O>
__device__ __forceinline__ void fa_map_store(O *at, float x) { *at = fa_from_float<O>(x); }

// Entry (b, i, j) of every requested map and of the mean. T: Q and K's
// element type; O: the maps' (f32 or T).
template <typename T, typename O>
__device__ __forceinline__ void fa_maps_entry(const FaMapsParams &m, int b, int i, int j) {
    const FaFwdParams &p = m.p;
    const FaKeyRange r = fa_key_range(p, i);
    const bool visible = j >= r.lo && j < r.hi;
    const bool with_mean = m.mean != nullptr, with_maps = m.maps != nullptr;
    // The mean needs every head; maps alone only the requested ones.
    const bool every_head = with_mean || m.all_heads;
    const int count = every_head ? p.heads_q : m.num_heads;
    float sum = 0.f;
    for (int t = 0; t < count; ++t) {
        const int h = every_head ? t : m.heads[t];
        // Which map head holds query head h (-1: none).
        int slot = -1;
        if (with_maps) {
            if (m.all_heads) slot = h;
            else if (!with_mean) slot = t;
            else
                for (int n = 0; n < m.num_heads; ++n)
                    if (m.heads[n] == h) slot = n;
        }
        float pij = 0.f;
        if (visible) {
            const float lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i];
            const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
            const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride + j * p.k_row_stride +
                         (h / p.q_per_kv) * p.k_head_stride;
            float dot = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot = fmaf(fa_to_float(q[d]), fa_to_float(k[d]), dot);
            float s = fa_score(p, dot);
            if (p.alibi_slopes != nullptr)
                s -= p.alibi_slopes[b * p.alibi_batch_stride + h] * fabsf(float(i + p.diag_offset - j));
            // A visible key makes LSE finite; -inf would only come from a
            // foreign LSE, and must not turn into NaN here.
            pij = lse == -INFINITY ? 0.f : expf(s - lse);
        }
        if (slot >= 0) {
            O *const map = static_cast<O *>(m.maps);
            fa_map_store(map + b * m.map_batch_stride + slot * m.map_head_stride + i * m.map_row_stride + j, pij);
        }
        sum += pij;
    }
    if (with_mean) {
        O *const mean = static_cast<O *>(m.mean);
        fa_map_store(mean + b * m.mean_batch_stride + i * m.mean_row_stride + j, sum / float(p.heads_q));
    }
}

// Thread `tid` of CTA `tile` (grid x: row tiles * key tiles, key tiles
// fastest; grid z: batch entry b). The grid's x has room for 2^31 - 1 tiles
// (the host checks), y only for 65535, hence the flat tile index.
template <typename T, typename O>
__device__ __forceinline__ void fa_maps_thread(const FaMapsParams &m, int tile, int b, int tid) {
    const int key_tiles = (m.p.seqlen_k + kMapsKeysPerTile - 1) / kMapsKeysPerTile;
    const int i = (tile / key_tiles) * kMapsRowsPerTile + tid / kMapsKeysPerTile;
    const int j = (tile % key_tiles) * kMapsKeysPerTile + tid % kMapsKeysPerTile;
    if (i < m.p.seqlen_q && j < m.p.seqlen_k) fa_maps_entry<T, O>(m, b, i, j);
}
