// Host harness for the softcap math of kernels/common/math.cuh: compiles the
// device function itself (tests/softcap_numerics.rs swaps its one inline-PTX
// line, ex2.approx, for harness_ex2) and sweeps c * tanh(s / c) * log2(e)
// against f64 over caps from subnormal to f32::MAX. The MUFU approximations
// are modelled at their documented error bounds (ex2.approx: 2 ulp,
// __fdividef: 2 ulp), each pushed both ways, so the figures bound what the
// hardware can do rather than what exact exp2f would give.
//
// Output: one line per cap, then `WORST rel <max relative error> (exact
// ex2/rcp: <the same without the modelled errors>) nonfinite <n> bad <n>`; `bad` counts results that break the bounds stated in math.cuh.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __device__
#define __forceinline__ inline
static inline float __shfl_xor_sync(unsigned, float v, int) { return v; }

static int g_ex2_ulps = 0, g_rcp_ulps = 0;
static float perturb(double y, int ulps) { return (float)(y * (1.0 + ulps * 0x1p-23)); }
// ex2.approx.ftz.f32: subnormal input and output flush to zero.
static float harness_ex2(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
    const float y = perturb(std::exp2((double)x), g_ex2_ulps);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}
// x * rcp.approx(y); rcp of +-inf is 0.
static float __fdividef(float x, float y) {
    const float r = std::isinf(y) ? 0.f : perturb(1.0 / (double)y, g_rcp_ulps);
    return x * r;
}

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

#include "math.cuh"
#include "mask.cuh"

static const double kLog2e = 1.4426950408889634;

struct Stats {
    double worst = 0, worst_s = 0;
    long nonfinite = 0, bad = 0, n = 0;
};

#ifdef OLD_FA_TANH
// The formula before this harness existed: score_out * fa_tanh(s * score_in).
static float capped(float s, float c) {
    return (c * 1.4426950408889634f) * fa_tanh(s * (1.f / c));
}
#else
// As the kernels do: u = dot * (scale * log2e) with scale = 1, then the cap.
static float capped(float s, float c) {
    return fa_softcap_log2(s * (float)kLog2e, c);
}
#endif

// The naive kernel's score (mask.cuh, natural-log domain, tanhf), scaled to
// the log2 domain in f64 so that one reference serves both.
static double naive_capped(float s, float c) {
    FaFwdParams p{};
    p.scale = 1.f;
    p.softcap = c;
    return fa_score(p, s) * kLog2e;
}

static void check(float c, float s, Stats &st, bool naive = false) {
    const double out = naive ? naive_capped(s, c) : capped(s, c);
    ++st.n;
    if (!std::isfinite(out)) {
        if (st.nonfinite++ < 3) printf("  non-finite: c=%g s=%g -> %g\n", c, s, out);
        return;
    }
    const double ref = (double)c * std::tanh((double)s / (double)c) * kLog2e;
    const bool tiny_cap = c < 2.0 / 3.40282347e38;
    if (tiny_cap) {
        // math.cuh's promise for subnormal-range caps: sign of s, 0 for s = 0,
        // |out| below the smallest normal float.
        const bool ok = s == 0 ? out == 0
                               : (std::signbit(out) == std::signbit(s) && std::fabs(out) < 0x1p-126);
        if (!ok && st.bad++ < 3) printf("  bound broken: c=%g s=%g -> %g (ref %g)\n", c, s, out, ref);
        return;
    }
    if (s == 0) {
        if (out != 0 && st.bad++ < 3) printf("  s=0 gives %g\n", out);
        return;
    }
    if (std::fabs(ref) < 0x1p-125) {
        // Subnormal result: only an absolute error is meaningful.
        if (std::fabs(out - ref) > 0x1p-140 && st.bad++ < 3) printf("  c=%g s=%g -> %g (ref %g)\n", c, s, out, ref);
        return;
    }
    const double rel = std::fabs(out - ref) / std::fabs(ref);
    if (rel > st.worst) {
        st.worst = rel;
        st.worst_s = s;
    }
}

int main(int argc, char **argv) {
    const long n = argc > 1 ? atol(argv[1]) : 200000;
    const float caps[] = {1e-45f, 1e-39f, 1e-30f, 1e-3f, 1.f, 50.f, 1e5f, 1e6f, 1e20f, 1e38f, 3.40282347e38f};
    std::vector<float> ss = {0.f};
    // Scores: geometric over the whole range whose log2-domain value is finite
    // (|s| * log2(e) < FLT_MAX), ...
    for (long i = 0; i < n; ++i) ss.push_back((float)std::pow(10.0, -37.0 + (38.37 + 37.0) * i / n));
    const size_t geometric = ss.size();
    const int combos[5][2] = {{0, 0}, {2, 2}, {2, -2}, {-2, 2}, {-2, -2}};
    double worst_all = 0, worst_exact = 0, worst_naive = 0;
    long nonfinite_all = 0, bad_all = 0;
    for (float c : caps) {
        // ... and linear in s / c over [0, 12], which covers both branches and the switch.
        ss.resize(geometric);
        for (long i = 1; i <= n / 2; ++i) {
            const double s = (double)c * 12.0 * i / (n / 2);
            if (s < 2.3e38) ss.push_back((float)s);
        }
        Stats st, exact;
        for (auto &m : combos) {
            g_ex2_ulps = m[0];
            g_rcp_ulps = m[1];
            for (float s : ss) {
                check(c, s, m[0] == 0 && m[1] == 0 ? exact : st);
                check(c, -s, m[0] == 0 && m[1] == 0 ? exact : st);
            }
        }
        Stats naive;
        for (float s : ss) {
            check(c, s, naive, true);
            check(c, -s, naive, true);
        }
        worst_naive = std::fmax(worst_naive, naive.worst);
        st.nonfinite += naive.nonfinite;
        st.bad += naive.bad;
        worst_exact = std::fmax(worst_exact, exact.worst);
        st.nonfinite += exact.nonfinite;
        st.bad += exact.bad;
        st.n += exact.n;
        printf("c=%-13g points=%ld max_rel=%.3g (s=%g, s/c=%g) exact_mufu=%.3g naive=%.3g nonfinite=%ld bad=%ld\n", c,
               st.n, st.worst, st.worst_s, st.worst_s / c, exact.worst, naive.worst, st.nonfinite, st.bad);
        worst_all = std::fmax(worst_all, st.worst);
        nonfinite_all += st.nonfinite;
        bad_all += st.bad;
    }
    printf("WORST rel %.3g (exact ex2/rcp: %.3g, naive kernel: %.3g) nonfinite %ld bad %ld\n", worst_all, worst_exact,
           worst_naive, nonfinite_all, bad_all);
    return 0;
}
