// Host harness for kernels/common/maps.cuh (attention maps): compiles
// fa_maps_thread itself for the host and runs it, CTA by CTA and thread by
// thread over the launch grid the Rust side uses, against f64 from the same
// rounded inputs. The LSE it is given is the f64 one (with the sink when
// there is one) rounded to f32, as a forward call leaves it. Cases:
//   * f16 and bf16 inputs, maps and mean in f32 and in the input type;
//   * GQA 8:2 and 4:4, head dims 8..256, lengths one short of a tile (31,
//     63 keys; 3, 7 rows), Lq > Lk;
//   * full, causal and windowed masks, bottom-right and top-left, causal
//     with Lq > Lk (rows with no visible key: all 0);
//   * custom and negative scales, softcap, ALiBi (per head and per batch
//     entry), sinks (rows then sum to 1 - e^{sigma - LSE});
//   * every head, a head subset in any order with and without the mean,
//     the mean alone;
//   * Q, K, LSE, maps and mean each on their own padded strides; maps and
//     mean poisoned around their views, with a guard past the maps as large
//     as every query head's maps would need (a write to the wrong head shows
//     there, not in the heap).
// Output: one line per case, then `WORST f32 <err> half <err> bad <n>`; bad
// counts cases out of bounds (tests/maps_numerics.rs asserts it is 0).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define __device__
#define __forceinline__ inline
using std::max;
using std::min;
#include "maps.cuh"

template <typename O> struct Out;
template <> struct Out<float> {
    static float poison() { return NAN; }
    static bool is_poison(float x) { return std::isnan(x); }
    static double get(float x) { return x; }
};
template <typename T> struct Out {
    static T poison() { uint16_t u = 0xffff; T x; memcpy(&x, &u, 2); return x; }  // NaN in f16 and bf16
    static bool is_poison(T x) { uint16_t u; memcpy(&u, &x, 2); return u == 0xffff; }
    static double get(T x) { return fa_to_float(x); }
};

struct Case {
    int B, Lq, Lk, Hq, Hk, D;
    int wl, wr;  // -1: unbounded
    bool top_left;
    float scale, softcap;
    int alibi;   // 0 none, 1 one slope per head, 2 per batch entry and head
    bool sinks;
    int heads;   // 0 every head, 1 subset and mean, 2 subset only, 3 mean only, 4 every head and mean
};

struct Result { double worst; long stray, unwritten, nonzero_masked, nan; };

template <typename T, typename O>
static Result run(const Case &c, std::mt19937 &g) {
    std::normal_distribution<float> N(0.f, 1.f);
    std::uniform_int_distribution<int> pad(0, 3);
    const int B = c.B, Lq = c.Lq, Lk = c.Lk, Hq = c.Hq, Hk = c.Hk, D = c.D;
    // Q BSHD, K BHSD, each padded its own way.
    const int64_t qhs = D + 8 * pad(g), qrs = Hq * qhs + 8, qbs = Lq * qrs + 16;
    const int64_t krs = D + 8 * (1 + pad(g)), khs = Lk * krs + 8, kbs = Hk * khs + 24;
    std::vector<T> q((size_t)B * qbs), k((size_t)B * kbs);
    const float amp = 1.5f;
    for (auto &x : q) x = fa_from_float<T>(amp * N(g));
    for (auto &x : k) x = fa_from_float<T>(amp * N(g));
    std::vector<float> slopes, sinks;
    if (c.alibi) {
        slopes.resize((size_t)(c.alibi == 2 ? B : 1) * Hq);
        for (auto &s : slopes) s = 0.05f + 0.5f * std::fabs(N(g));
    }
    if (c.sinks) {
        sinks.resize(Hq);
        for (auto &s : sinks) s = 2.f * N(g);
    }
    FaMapsParams m;
    memset(&m, 0, sizeof m);
    FaFwdParams &p = m.p;
    p.q = q.data(); p.k = k.data();
    p.q_batch_stride = qbs; p.q_row_stride = qrs; p.q_head_stride = qhs;
    p.k_batch_stride = kbs; p.k_row_stride = krs; p.k_head_stride = khs;
    p.batch = B; p.heads_q = Hq; p.heads_kv = Hk; p.q_per_kv = Hq / Hk;
    p.seqlen_q = Lq; p.seqlen_k = Lk; p.head_dim = D;
    p.window_left = c.wl; p.window_right = c.wr;
    p.scale = c.scale; p.softcap = c.softcap;
    p.top_left = c.top_left;
    p.diag_offset = c.top_left ? 0 : Lk - Lq;
    p.alibi_slopes = c.alibi ? slopes.data() : nullptr;
    p.alibi_batch_stride = c.alibi == 2 ? Hq : 0;
    p.sinks = c.sinks ? sinks.data() : nullptr;  // unused by the maps: in the LSE below
    const int off = p.diag_offset;

    // f64 scores and LSE from the same rounded inputs.
    std::vector<double> s((size_t)B * Hq * Lq * Lk, -INFINITY), lse((size_t)B * Hq * Lq);
    double smax = 1;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hq; ++h)
            for (int i = 0; i < Lq; ++i) {
                double mx = c.sinks ? sinks[h] : -INFINITY;
                for (int j = 0; j < Lk; ++j) {
                    const bool vis = (c.wl < 0 || j >= i + off - c.wl) && (c.wr < 0 || j <= i + off + c.wr);
                    if (!vis) continue;
                    double dot = 0;
                    for (int d = 0; d < D; ++d)
                        dot += (double)fa_to_float(q[b * qbs + i * qrs + h * qhs + d]) *
                               fa_to_float(k[b * kbs + j * krs + (h / (Hq / Hk)) * khs + d]);
                    double sc = dot * c.scale;
                    if (c.softcap > 0) sc = c.softcap * std::tanh(sc / c.softcap);
                    if (c.alibi) sc -= (double)slopes[(c.alibi == 2 ? b * Hq : 0) + h] * std::fabs((double)(i + off - j));
                    s[(((size_t)b * Hq + h) * Lq + i) * Lk + j] = sc;
                    mx = std::max(mx, sc);
                    smax = std::max(smax, std::fabs(sc));
                }
                double l = c.sinks ? std::exp(sinks[h] - mx) : 0;
                for (int j = 0; j < Lk; ++j) l += std::exp(s[(((size_t)b * Hq + h) * Lq + i) * Lk + j] - mx);
                lse[((size_t)b * Hq + h) * Lq + i] = mx == -INFINITY ? -INFINITY : mx + std::log(l);
            }
    const int64_t lhs = Lq + 3, lbs = Hq * lhs + 5;
    std::vector<float> lse32((size_t)B * lbs, NAN);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hq; ++h)
            for (int i = 0; i < Lq; ++i) lse32[b * lbs + h * lhs + i] = (float)lse[((size_t)b * Hq + h) * Lq + i];
    p.lse = lse32.data();
    p.lse_batch_stride = lbs; p.lse_head_stride = lhs;

    // Requested heads: a subset out of order (query heads 5, 0, 7 of 8, or
    // 2, 1 of 4), or every head.
    std::vector<int> list = Hq >= 8 ? std::vector<int>{5, 0, 7} : std::vector<int>{2, 1};
    const bool with_maps = c.heads != 3, with_mean = c.heads == 1 || c.heads == 3 || c.heads == 4;
    const bool all = c.heads == 0 || c.heads == 4;
    const int hsel = all ? Hq : (int)list.size();
    m.all_heads = all;
    m.num_heads = all ? 0 : (int)list.size();
    for (size_t n = 0; n < list.size() && !all; ++n) m.heads[n] = list[n];
    const int64_t guard = 64;
    const int64_t mrs = Lk + 5, mhs = Lq * mrs + 7, mbs = hsel * mhs + 9;
    std::vector<O> maps(with_maps ? (size_t)(2 * guard + B * mbs + Hq * mhs) : 0, Out<O>::poison());
    const int64_t ers = Lk + 3, ebs = Lq * ers + 11;
    std::vector<O> mean(with_mean ? (size_t)(2 * guard + B * ebs) : 0, Out<O>::poison());
    if (with_maps) {
        m.maps = maps.data() + guard;
        m.map_batch_stride = mbs; m.map_head_stride = mhs; m.map_row_stride = mrs;
    }
    if (with_mean) {
        m.mean = mean.data() + guard;
        m.mean_batch_stride = ebs; m.mean_row_stride = ers;
    }

    // The launch grid of src/ops/maps.rs: (row tiles * key tiles, 1, B).
    const int tiles = ((Lq + kMapsRowsPerTile - 1) / kMapsRowsPerTile) * ((Lk + kMapsKeysPerTile - 1) / kMapsKeysPerTile);
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < tiles; ++t)
            for (int tid = 0; tid < kMapsThreads; ++tid) fa_maps_thread<T, O>(m, t, b, tid);

    // Output rounding (half an ulp of the map's type, relative) plus the f32
    // score and LSE, whose absolute error grows with the logits' size.
    const double out_rel = sizeof(O) == 4 ? 0 : (std::is_same<O, fa_bf16>::value ? 0x1p-8 : 0x1p-11);
    const double f32_err = 2e-6 * smax;
    // f16 has subnormals below 2^-14: there its spacing, 2^-24, is absolute.
    const double abs_floor = std::is_same<O, fa_f16>::value ? 0x1p-25 : 1e-30;
    Result r{0, 0, 0, 0, 0};
    auto check = [&](const O *at, double ref, bool masked) {
        if (Out<O>::is_poison(*at)) { ++r.unwritten; return; }
        const double got = Out<O>::get(*at);
        if (std::isnan(got)) { ++r.nan; return; }
        if (masked && got != 0.0) ++r.nonzero_masked;
        const double e = std::fabs(got - ref) / (out_rel * ref + f32_err * std::max(ref, 1e-6) + abs_floor);
        r.worst = std::max(r.worst, e);
    };
    std::vector<char> in_maps(maps.size(), 0), in_mean(mean.size(), 0);
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < Lq; ++i)
            for (int j = 0; j < Lk; ++j) {
                double sum = 0;
                for (int h = 0; h < Hq; ++h) {
                    const double sc = s[(((size_t)b * Hq + h) * Lq + i) * Lk + j];
                    const double l = lse[((size_t)b * Hq + h) * Lq + i];
                    const double ref = sc == -INFINITY ? 0 : std::exp(sc - l);
                    sum += ref;
                    int slot = -1;
                    if (with_maps) {
                        if (all) slot = h;
                        else for (size_t n = 0; n < list.size(); ++n) if (list[n] == h) slot = (int)n;
                    }
                    if (slot >= 0) {
                        const int64_t at = guard + b * mbs + slot * mhs + i * mrs + j;
                        in_maps[at] = 1;
                        check(&maps[at], ref, sc == -INFINITY);
                    }
                }
                if (with_mean) {
                    const int64_t at = guard + b * ebs + i * ers + j;
                    in_mean[at] = 1;
                    // Masked for every head alike (one band for all heads).
                    check(&mean[at], sum / Hq, s[(((size_t)b * Hq) * Lq + i) * Lk + j] == -INFINITY);
                }
            }
    for (size_t x = 0; x < maps.size(); ++x) r.stray += !in_maps[x] && !Out<O>::is_poison(maps[x]);
    for (size_t x = 0; x < mean.size(); ++x) r.stray += !in_mean[x] && !Out<O>::is_poison(mean[x]);
    return r;
}

int main() {
    std::mt19937 g(11);
    // (B, Lq, Lk, Hq, Hk, D, wl, wr, top_left, scale, softcap, alibi, sinks, heads)
    std::vector<Case> cases = {
        {2, 7, 63, 8, 2, 64, -1, -1, false, 0.125f, 0, 0, false, 0},     // full, every head
        {2, 7, 63, 8, 2, 64, -1, -1, false, 0.125f, 0, 0, false, 1},     // subset and mean
        {2, 7, 63, 8, 2, 64, -1, -1, false, 0.125f, 0, 0, false, 2},     // subset only
        {2, 7, 63, 8, 2, 64, -1, -1, false, 0.125f, 0, 0, false, 3},     // mean only
        {1, 33, 31, 8, 2, 128, -1, 0, false, -0.09f, 0, 0, false, 4},    // causal, Lq > Lk: empty rows
        {1, 33, 31, 8, 2, 128, -1, 0, true, 0.09f, 0, 0, false, 1},      // causal top-left
        {2, 13, 64, 4, 4, 8, 5, 3, false, 0.4f, 0, 0, false, 4},         // window, MHA, D 8
        {2, 13, 64, 4, 4, 8, 5, 3, true, 0.4f, 0, 0, false, 1},          // window top-left
        {1, 9, 95, 8, 2, 256, -1, -1, false, 0.0625f, 2.5f, 0, false, 4},  // softcap, D 256
        {2, 11, 40, 8, 2, 72, -1, 0, false, 0.11f, 0, 1, false, 1},      // ALiBi per head, causal
        {2, 11, 40, 8, 2, 72, 9, 2, true, 0.11f, 0, 2, false, 4},        // ALiBi per batch, window top-left
        {2, 12, 31, 8, 2, 64, -1, -1, false, 0.2f, 0, 0, true, 4},       // sinks
        {1, 40, 20, 8, 2, 64, -1, 0, false, 0.2f, 30.f, 1, true, 1},     // sinks, ALiBi, softcap, empty rows
        {1, 3, 1, 4, 4, 16, -1, -1, false, 1.0f, 0, 0, false, 4},        // one key
    };
    double worst_f32 = 0, worst_half = 0;
    int bad = 0, n = 0;
    for (size_t ci = 0; ci < cases.size(); ++ci)
        for (int ty = 0; ty < 4; ++ty) {
            const Case &c = cases[ci];
            Result r;
            const char *name;
            switch (ty) {
                case 0: r = run<fa_f16, float>(c, g); name = "f16 -> f32 "; break;
                case 1: r = run<fa_f16, fa_f16>(c, g); name = "f16 -> f16 "; break;
                case 2: r = run<fa_bf16, float>(c, g); name = "bf16 -> f32"; break;
                default: r = run<fa_bf16, fa_bf16>(c, g); name = "bf16 -> bf16"; break;
            }
            const bool ok = r.worst <= 1.0 && r.stray == 0 && r.unwritten == 0 && r.nonzero_masked == 0 && r.nan == 0;
            bad += !ok;
            ++n;
            (ty % 2 ? worst_half : worst_f32) = std::max(ty % 2 ? worst_half : worst_f32, r.worst);
            printf("%s case %zu %s: err/tol %.3f stray %ld unwritten %ld masked-nonzero %ld nan %ld\n", ok ? "ok  " : "FAIL",
                   ci, name, r.worst, r.stray, r.unwritten, r.nonzero_masked, r.nan);
        }
    printf("WORST f32 %.3f half %.3f bad %d of %d\n", worst_f32, worst_half, bad, n);
    return bad ? 1 : 0;
}
