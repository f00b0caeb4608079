// Shared by the sm80 and sm90 emulators: 16-bit element decoding and the
// comparison of a kernel's O and LSE with an f64 evaluation of DESIGN.md
// section 1 (bottom-right band, GQA, softcap, empty rows O = 0, LSE = -inf).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cuda_fp16.h>

// f16 through a table: the emulators convert every mma operand, and
// __half2float's host version is slow.
static float h2f(uint16_t bits, bool bf16) {
    if (bf16) { uint32_t u = (uint32_t)bits << 16; float f; memcpy(&f, &u, 4); return f; }
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t i = 0; i < 65536; ++i) { const uint16_t b = (uint16_t)i; __half h; memcpy(&h, &b, 2); t[i] = __half2float(h); }
        return t;
    }();
    return table[bits];
}

// Strides are in elements, as in FaFwdParams; every tensor has its own.
struct EmuProblem {
    int B, Hq, Hk, Lq, Lk, D, wl, wr;  // window side < 0: unbounded
    double scale, softcap;             // softcap 0: none
    bool bf16, lse;
    const uint16_t *q, *k, *v, *o;
    const float *lse_out;
    int64_t qb, qr, qh, kb, kr, kh, vb, vr, vh, ob, orr, oh;
    bool top_left = false;             // mask aligned to the top-left corner (off = 0)
    int64_t lseb = 0, lseh = 0;        // LSE batch and head strides; 0: contiguous [B, Hq, Lq]
    // Score modifiers (DESIGN.md 1b): ALiBi slopes of (b, h) at
    // alibi[b * alibi_bs + h], a sink logit per query head; NULL: none.
    const float *alibi = nullptr;
    int64_t alibi_bs = 0;
    const float *sinks = nullptr;
    int64_t lse_b() const { return lseb ? lseb : (int64_t)Hq * Lq; }
    int64_t lse_h() const { return lseh ? lseh : Lq; }
};

// Errors: whole-tensor relative L2 of O; the worst row's relative L2 (one bad
// row cannot hide in the tensor norm); the worst LSE error of a row relative
// to the row's largest |score| (at least 1): LSE is a sum of those scores'
// exponentials, so f32 rounding of the scores moves it by that much.
struct EmuCheck {
    bool ok = true;
    double err2 = 0, ref2 = 0, row_rel = 0, lse_rel = 0;
    double rel() const { return ref2 > 0 ? sqrt(err2 / ref2) : sqrt(err2); }
};

// Tolerances (DESIGN.md section 4): O rel L2 per dtype, the worst row at 3x
// that, LSE relative to the row's largest |score|.
static double emu_o_tol(bool bf16) { return bf16 ? 1e-2 : 3e-3; }
static double emu_row_tol(bool bf16) { return 3 * emu_o_tol(bf16); }
static const double kEmuLseTol = 1e-4;

// Every in-view element of O must be finite and, for rows that see no key,
// exactly 0; LSE (when written) exactly -inf for those rows, finite otherwise.
static EmuCheck emu_check_against_reference(const EmuProblem &c, bool verbose) {
    EmuCheck r;
    const int off = c.top_left ? 0 : c.Lk - c.Lq;
    std::vector<double> kf((size_t)c.Lk * c.D), vf((size_t)c.Lk * c.D), qf(c.D);
    for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.Hq; ++h) {
            const int hk = h / (c.Hq / c.Hk);
            if (h % (c.Hq / c.Hk) == 0)  // K and V of this KV head, decoded once
                for (int j = 0; j < c.Lk; ++j)
                    for (int d = 0; d < c.D; ++d) {
                        kf[(size_t)j * c.D + d] = h2f(c.k[b * c.kb + (int64_t)j * c.kr + hk * c.kh + d], c.bf16);
                        vf[(size_t)j * c.D + d] = h2f(c.v[b * c.vb + (int64_t)j * c.vr + hk * c.vh + d], c.bf16);
                    }
            for (int i = 0; i < c.Lq; ++i) {
                for (int d = 0; d < c.D; ++d) qf[d] = h2f(c.q[b * c.qb + (int64_t)i * c.qr + h * c.qh + d], c.bf16);
                std::vector<double> s(c.Lk, -INFINITY);
                double mx = -INFINITY;
                for (int j = 0; j < c.Lk; ++j) {
                    const bool vis = (c.wl < 0 || j >= i + off - c.wl) && (c.wr < 0 || j <= i + off + c.wr);
                    if (!vis) continue;
                    double dot = 0;
                    const double *kj = &kf[(size_t)j * c.D];
                    for (int d = 0; d < c.D; ++d) dot += qf[d] * kj[d];
                    double sc = dot * c.scale;
                    if (c.softcap > 0) sc = c.softcap * tanh(sc / c.softcap);
                    if (c.alibi) sc -= (double)c.alibi[b * c.alibi_bs + h] * fabs((double)(i + off - j));
                    s[j] = sc;
                    mx = std::max(mx, sc);
                }
                double smax = 1;
                for (double x : s)
                    if (x > -INFINITY) smax = std::max(smax, fabs(x));
                // A sink is a virtual key with V = 0: it joins the max and the sum.
                const double sink = c.sinks ? (double)c.sinks[h] : -INFINITY;
                const bool any_key = mx > -INFINITY;
                mx = std::max(mx, sink);
                if (sink > -INFINITY) smax = std::max(smax, fabs(sink));
                double l = mx > -INFINITY && sink > -INFINITY ? exp(sink - mx) : 0;
                std::vector<double> out(c.D, 0.0);
                if (mx > -INFINITY) {
                    for (int j = 0; j < c.Lk; ++j) {
                        if (s[j] == -INFINITY) continue;
                        const double e = exp(s[j] - mx);
                        l += e;
                        const double *vj = &vf[(size_t)j * c.D];
                        for (int d = 0; d < c.D; ++d) out[d] += e * vj[d];
                    }
                    for (auto &x : out) x /= l;
                }
                const double ref_lse = mx > -INFINITY ? mx + log(l) : -INFINITY;
                double row_err2 = 0, row_ref2 = 0;
                for (int d = 0; d < c.D; ++d) {
                    const float got = h2f(c.o[b * c.ob + (int64_t)i * c.orr + h * c.oh + d], c.bf16);
                    row_err2 += (got - out[d]) * (got - out[d]);
                    row_ref2 += out[d] * out[d];
                    if (!std::isfinite(got)) {
                        if (r.ok && verbose) printf("  non-finite O at b%d h%d row %d col %d\n", b, h, i, d);
                        r.ok = false;
                    }
                    r.err2 += (got - out[d]) * (got - out[d]);
                    r.ref2 += out[d] * out[d];
                    if (!any_key && got != 0.f) {
                        if (r.ok && verbose) printf("  row %d sees no key but O is not 0\n", i);
                        r.ok = false;
                    }
                }
                if (row_ref2 > 0) r.row_rel = std::max(r.row_rel, sqrt(row_err2 / row_ref2));
                else if (row_err2 > 0) r.row_rel = INFINITY;
                if (c.lse) {
                    const float got = c.lse_out[b * c.lse_b() + h * c.lse_h() + i];
                    if (ref_lse == -INFINITY) {
                        if (!(got == -INFINITY)) {
                            if (r.ok && verbose) printf("  empty row %d: LSE %f, not -inf\n", i, got);
                            r.ok = false;
                        }
                    } else {
                        if (!std::isfinite(got)) {
                            if (r.ok && verbose) printf("  LSE of row %d not finite\n", i);
                            r.ok = false;
                        }
                        r.lse_rel = std::max(r.lse_rel, fabs(got - ref_lse) / smax);
                    }
                }
            }
        }
    return r;
}

// Writes outside the kernel's outputs: elements of O's allocation
// [alloc, alloc + alloc_len) that are not in the view must keep the 0xffff
// poison; LSE's `guard` floats at each end of its allocation must stay NaN,
// and all of it when the kernel was given no LSE.
static long emu_count_stray(const EmuProblem &c, const uint16_t *alloc, size_t alloc_len,
                            const std::vector<float> &lse_alloc, int guard) {
    std::vector<char> inview(alloc_len, 0);
    for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.Hq; ++h)
            for (int i = 0; i < c.Lq; ++i)
                for (int d = 0; d < c.D; ++d)
                    inview[(c.o - alloc) + b * c.ob + (int64_t)i * c.orr + h * c.oh + d] = 1;
    long stray = 0;
    for (size_t x = 0; x < alloc_len; ++x)
        if (!inview[x] && alloc[x] != 0xffff) stray++;
    // LSE: everything outside the written view (guards, and the gaps that
    // strided LSE leaves) stays NaN; all of it when no LSE was asked for.
    std::vector<char> lse_in(lse_alloc.size(), 0);
    if (c.lse)
        for (int b = 0; b < c.B; ++b)
            for (int h = 0; h < c.Hq; ++h)
                for (int i = 0; i < c.Lq; ++i) {
                    const int64_t at = guard + b * c.lse_b() + h * c.lse_h() + i;
                    if (at >= 0 && at < (int64_t)lse_in.size()) lse_in[at] = 1;
                }
    for (size_t x = 0; x < lse_alloc.size(); ++x)
        if (!lse_in[x] && !std::isnan(lse_alloc[x])) stray++;
    return stray;
}
