// Host harness for kernels/common/merge.cuh (the merge of attention states):
// compiles fa_merge_row itself for the host and runs it, lane by lane, over
// partial states that stress the arithmetic, against f64 from the same
// rounded inputs:
//   * 1..8 parts, head dims 8..256 (lanes that own two, four or no columns);
//   * LSEs random, equal, hundreds and thousands apart (e^{LSE} overflows
//     f32 and f64), and -inf (a part with no visible key; its O is poison
//     and must not be read), every part -inf (O = 0, LSE = -inf exactly);
//   * every part, O and LSE on its own padded strides; O and LSE poisoned
//     around their views (a stray write shows).
// Output: one line per case, then `WORST o <rel> lse <abs> bad <n>`; bad
// counts cases out of bounds (tests/merge_numerics.rs asserts it is 0).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define __device__
#define __forceinline__ inline
#include "merge.cuh"

static const uint16_t kPoison = 0xffff;  // NaN in f16 and bf16

template <typename T> static uint16_t bits(T x) { uint16_t u; memcpy(&u, &x, 2); return u; }
template <typename T> static T from_bits(uint16_t u) { T x; memcpy(&x, &u, 2); return x; }

struct Result { double o_rel, lse_abs; long stray; bool empty_ok; };

// strided: the split-KV workspace instead: f32 parts, contiguous [S, B, L,
// H, D] and LSE [S, B, H, L], reached from part 0 by the part strides.
template <typename T>
static Result run(int parts, int B, int L, int H, int D, int lse_kind, std::mt19937 &g, bool strided = false) {
    std::normal_distribution<float> N(0.f, 1.f);
    std::uniform_int_distribution<int> pad(0, 3);
    FaMergeParams p;
    memset(&p, 0, sizeof p);
    std::vector<std::vector<uint16_t>> po(parts);
    std::vector<std::vector<float>> pl(parts);
    std::vector<FaMergePart> desc(parts);  // every part's own view (p.part holds at most 8)
    for (int s = 0; s < parts; ++s) {
        // BSHD with padded heads/rows/batches, each part its own.
        const int64_t hs = D + 8 * pad(g), rs = H * hs + 8 * pad(g), bs = L * rs + 8 * pad(g);
        po[s].assign((size_t)B * bs, kPoison);
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < L; ++i)
                for (int h = 0; h < H; ++h)
                    for (int d = 0; d < D; ++d) po[s][b * bs + i * rs + h * hs + d] = bits(fa_from_float<T>(N(g)));
        const int64_t lh = L + pad(g), lb = H * lh + pad(g);
        pl[s].assign((size_t)B * lb, NAN);
        for (int b = 0; b < B; ++b)
            for (int h = 0; h < H; ++h)
                for (int i = 0; i < L; ++i) {
                    float x;
                    switch (lse_kind) {
                        case 0: x = 3.f * N(g); break;                                  // comparable
                        case 1: x = 7.25f; break;                                        // equal
                        case 2: x = 300.f * N(g); break;                                 // hundreds apart
                        case 3: x = (s % 2 ? -1.f : 1.f) * 5000.f + N(g); break;         // thousands apart
                        default: x = (i + h + b + s) % 3 == 0 ? 2.f * N(g) : -INFINITY;  // some parts empty
                    }
                    if (lse_kind == 4 && i == 0) x = -INFINITY;  // row 0: no part sees a key
                    pl[s][b * lb + h * lh + i] = x;
                    if (x == -INFINITY)  // an empty part's O is poison: reading it shows
                        for (int d = 0; d < D; ++d) po[s][b * bs + i * rs + h * hs + d] = kPoison;
                }
        desc[s] = FaMergePart{po[s].data(), pl[s].data(), bs, rs, hs, lb, lh};
        if (s < FA_MERGE_MAX_PARTS) p.part[s] = desc[s];
    }
    // The f32 workspace holding the same parts (their O rounded to T as above).
    std::vector<float> ws_o, ws_l;
    if (strided) {
        const int64_t so = (int64_t)B * L * H * D, sl = (int64_t)B * H * L;
        ws_o.assign((size_t)parts * so, NAN);
        ws_l.assign((size_t)parts * sl, NAN);
        for (int s = 0; s < parts; ++s)
            for (int b = 0; b < B; ++b)
                for (int i = 0; i < L; ++i)
                    for (int h = 0; h < H; ++h) {
                        const FaMergePart &q = desc[s];
                        ws_l[s * sl + (b * H + h) * L + i] = pl[s][b * q.lse_batch_stride + h * q.lse_head_stride + i];
                        for (int d = 0; d < D; ++d) {
                            const uint16_t x = po[s][b * q.o_batch_stride + i * q.o_row_stride + h * q.o_head_stride + d];
                            ws_o[s * so + ((b * L + i) * H + h) * D + d] = x == kPoison ? NAN : fa_to_float(from_bits<T>(x));
                        }
                    }
        p.strided = 1;
        p.o_part_stride = so;
        p.lse_part_stride = sl;
        p.part[0] = FaMergePart{ws_o.data(), ws_l.data(), (int64_t)L * H * D, (int64_t)H * D, D, (int64_t)H * L, L};
        for (int s = 1; s < FA_MERGE_MAX_PARTS; ++s) p.part[s] = FaMergePart{nullptr, nullptr, 0, 0, 0, 0, 0};
    }
    const int64_t ohs = D + 8, ors = H * ohs + 16, obs = L * ors + 24, guard = 64;
    std::vector<uint16_t> o((size_t)B * obs + 2 * guard, kPoison);
    const int64_t lhs = L + 3, lbs = H * lhs + 5;
    std::vector<float> lse((size_t)B * lbs + 2 * guard, NAN);
    p.o = o.data() + guard;
    p.lse = lse.data() + guard;
    p.o_batch_stride = obs; p.o_row_stride = ors; p.o_head_stride = ohs;
    p.lse_batch_stride = lbs; p.lse_head_stride = lhs;
    p.parts = parts; p.batch = B; p.seqlen = L; p.heads = H; p.head_dim = D;
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < L; ++i)
            for (int h = 0; h < H; ++h)
                for (int lane = 0; lane < 32; ++lane) {
                    if (strided) fa_merge_row<T, float>(p, b, i, h, lane);
                    else fa_merge_row<T, T>(p, b, i, h, lane);
                }

    Result r{0, 0, 0, true};
    std::vector<char> in_o(o.size(), 0), in_l(lse.size(), 0);
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < L; ++i)
            for (int h = 0; h < H; ++h) {
                double m = -INFINITY;
                for (int s = 0; s < parts; ++s) m = std::fmax(m, (double)pl[s][b * desc[s].lse_batch_stride + h * desc[s].lse_head_stride + i]);
                const int64_t ob = guard + b * obs + i * ors + h * ohs, lb = guard + b * lbs + h * lhs + i;
                in_l[lb] = 1;
                double err2 = 0, ref2 = 0;
                if (m == -INFINITY) {
                    for (int d = 0; d < D; ++d) {
                        in_o[ob + d] = 1;
                        r.empty_ok &= o[ob + d] == bits(fa_from_float<T>(0.f));
                    }
                    r.empty_ok &= lse[lb] == -INFINITY;
                    continue;
                }
                double sum = 0;
                std::vector<double> w(parts);
                for (int s = 0; s < parts; ++s) {
                    w[s] = std::exp((double)pl[s][b * desc[s].lse_batch_stride + h * desc[s].lse_head_stride + i] - m);
                    sum += w[s];
                }
                for (int d = 0; d < D; ++d) {
                    double ref = 0;
                    for (int s = 0; s < parts; ++s)
                        if (w[s] > 0)
                            ref += w[s] / sum * fa_to_float(from_bits<T>(po[s][b * desc[s].o_batch_stride + i * desc[s].o_row_stride + h * desc[s].o_head_stride + d]));
                    in_o[ob + d] = 1;
                    const double got = fa_to_float(from_bits<T>(o[ob + d]));
                    err2 += (got - ref) * (got - ref);
                    ref2 += ref * ref;
                }
                const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
                r.o_rel = std::isnan(rel) ? INFINITY : std::fmax(r.o_rel, rel);
                const double lref = m + std::log(sum), e = std::fabs(lse[lb] - lref) / std::fmax(1.0, std::fabs(lref));
                r.lse_abs = std::isnan(e) ? INFINITY : std::fmax(r.lse_abs, e);
            }
    for (size_t x = 0; x < o.size(); ++x) r.stray += !in_o[x] && o[x] != kPoison;
    for (size_t x = 0; x < lse.size(); ++x) r.stray += !in_l[x] && !std::isnan(lse[x]);
    return r;
}

int main() {
    std::mt19937 g(7);
    double worst_o = 0, worst_l = 0;
    int bad = 0, n = 0;
    for (int strided = 0; strided < 2; ++strided)
    for (int bf = 0; bf < 2; ++bf)
        for (int parts : {1, 2, 3, 5, 8, 13, 40})
            for (int D : {8, 64, 72, 128, 256})
                for (int kind = 0; kind < 5; ++kind) {
                    if (!strided && parts > FA_MERGE_MAX_PARTS) continue;  // merge_states_into takes at most 8
                    const Result r = bf ? run<__nv_bfloat16>(parts, 2, 5, 3, D, kind, g, strided)
                                        : run<__half>(parts, 2, 5, 3, D, kind, g, strided);
                    // Output rounding dominates: half an ulp of the dtype, relative, plus f32 sums.
                    const double tol = bf ? 8e-3 : 1e-3;
                    const bool ok = r.o_rel <= tol && r.lse_abs <= 1e-6 && r.stray == 0 && r.empty_ok;
                    bad += !ok;
                    ++n;
                    worst_o = std::fmax(worst_o, r.o_rel);
                    worst_l = std::fmax(worst_l, r.lse_abs);
                    printf("%s %s %s parts %d D %d lse kind %d: o rel %.2e lse %.2e stray %ld empty %s\n", ok ? "ok  " : "FAIL",
                           bf ? "bf16" : "f16 ", strided ? "f32 strided" : "own views  ", parts, D, kind, r.o_rel, r.lse_abs, r.stray, r.empty_ok ? "ok" : "WRONG");
                }
    printf("WORST o %.3e lse %.3e bad %d of %d\n", worst_o, worst_l, bad, n);
    return bad ? 1 : 0;
}
