/* The C ABI from C: the CPU reference against attention computed here in
 * double precision, then the error codes. Built and run by tests/c_abi.rs;
 * prints one line per check and exits non-zero if any fails. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fused_attn.h"

static int failures = 0;

#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (cond) {                                          \
            printf("ok    ");                                \
        } else {                                             \
            printf("FAIL  ");                                \
            failures++;                                      \
        }                                                    \
        printf(__VA_ARGS__);                                 \
        printf("\n");                                        \
    } while (0)

/* Values k/8 with |k| <= 8 are exact in f16 and bf16. */
static uint16_t to_f16(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    uint32_t sign = (b >> 16) & 0x8000u;
    if (x == 0.0f) return (uint16_t)sign;
    int32_t exp = (int32_t)((b >> 23) & 0xff) - 127 + 15;
    return (uint16_t)(sign | ((uint32_t)exp << 10) | ((b >> 13) & 0x3ff));
}
static uint16_t to_bf16(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return (uint16_t)(b >> 16);
}

/* Problem: B=2, Lq=3, Lk=5, Hq=4, Hk=2 (GQA), D=8. */
enum { B = 2, LQ = 3, LK = 5, HQ = 4, HK = 2, D = 8 };

static float val(int t, int b, int l, int h, int d) {
    int k = (t * 7 + b * 5 + l * 3 + h * 11 + d * 13) % 17 - 8; /* -8..8 */
    return (float)k / 8.0f;
}

/* ALiBi slopes ([B][HQ], or [HQ] with alibi_per_batch 0) and sink logits
 * of the case being checked; NULL: none. */
static const float *g_slopes, *g_sinks;
static int g_per_batch;

/* Expected O[b][i][h][:] and LSE[b][h][i] in double. */
static void expected(double scale, double softcap, int64_t left, int64_t right, int top_left, int b, int i, int h,
                     double *o, double *lse) {
    int64_t off = top_left ? 0 : LK - LQ;
    int hk = h / (HQ / HK);
    double s[LK], m = -INFINITY, l = 0.0;
    int lo = 0, hi = LK; /* visible keys [lo, hi) */
    if (left >= 0 && i + off - left > lo) lo = (int)(i + off - left);
    if (right >= 0 && i + off + right + 1 < hi) hi = (int)(i + off + right + 1);
    for (int j = lo; j < hi; j++) {
        double dot = 0.0;
        for (int c = 0; c < D; c++) dot += (double)val(0, b, i, h, c) * (double)val(1, b, j, hk, c);
        s[j] = scale * dot;
        if (softcap > 0.0) s[j] = softcap * tanh(s[j] / softcap);
        if (g_slopes) s[j] -= (double)g_slopes[g_per_batch ? b * HQ + h : h] * fabs((double)(i + off - j));
        if (s[j] > m) m = s[j];
    }
    /* A sink: one more denominator term with no value. */
    double sink = g_sinks ? (double)g_sinks[h] : -INFINITY;
    if (sink > m) m = sink;
    for (int c = 0; c < D; c++) o[c] = 0.0;
    if (hi <= lo && !g_sinks) {
        *lse = -INFINITY;
        return;
    }
    if (g_sinks) l = exp(sink - m);
    for (int j = lo; j < hi; j++) {
        double w = exp(s[j] - m);
        l += w;
        for (int c = 0; c < D; c++) o[c] += w * (double)val(2, b, j, hk, c);
    }
    for (int c = 0; c < D; c++) o[c] /= l;
    *lse = m + log(l);
}

/* Q and O in [B, H, L, D] memory order, K and V in [B, L, H, D], O with a
 * padded head stride; LSE [B, H, L] with a padded batch stride. */
static int run_case(const char *name, int32_t dtype, FusedAttnOptions opts, double scale, double softcap, int64_t left,
                    int64_t right) {
    static uint16_t q[B * HQ * LQ * D], k[B * LK * HK * D], v[B * LK * HK * D];
    enum { OPAD = 3 * D, OSTRIDE_H = LQ * D + OPAD, LSE_BSTRIDE = HQ * LQ + 5 };
    static float o[B * HQ * OSTRIDE_H], lse[B * LSE_BSTRIDE];
    uint16_t (*conv)(float) = dtype == FUSED_ATTN_DTYPE_F16 ? to_f16 : to_bf16;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < HQ; h++)
            for (int i = 0; i < LQ; i++)
                for (int c = 0; c < D; c++) q[((b * HQ + h) * LQ + i) * D + c] = conv(val(0, b, i, h, c));
    for (int b = 0; b < B; b++)
        for (int j = 0; j < LK; j++)
            for (int h = 0; h < HK; h++)
                for (int c = 0; c < D; c++) {
                    k[((b * LK + j) * HK + h) * D + c] = conv(val(1, b, j, h, c));
                    v[((b * LK + j) * HK + h) * D + c] = conv(val(2, b, j, h, c));
                }
    for (size_t n = 0; n < sizeof o / sizeof o[0]; n++) o[n] = NAN; /* poison */
    for (size_t n = 0; n < sizeof lse / sizeof lse[0]; n++) lse[n] = NAN;

    FusedAttnTensor tq = {q, {B, LQ, HQ, D}, {HQ * LQ * D, D, LQ * D, 1}};
    FusedAttnTensor tk = {k, {B, LK, HK, D}, {LK * HK * D, HK * D, D, 1}};
    FusedAttnTensor tv = {v, {B, LK, HK, D}, {LK * HK * D, HK * D, D, 1}};
    FusedAttnTensor to = {o, {B, LQ, HQ, D}, {HQ * OSTRIDE_H, D, OSTRIDE_H, 1}};
    FusedAttnLseTensor tl = {lse, {B, HQ, LQ}, {LSE_BSTRIDE, LQ, 1}};
    g_slopes = opts.alibi_slopes;
    g_per_batch = opts.alibi_per_batch;
    g_sinks = opts.sinks;
    FusedAttnStatus st = fused_attn_reference_forward(dtype, &tq, &tk, &tv, &to, &tl, &opts);
    if (st != FUSED_ATTN_STATUS_OK) {
        CHECK(0, "%s: reference returned %s: %s", name, fused_attn_status_name(st), fused_attn_last_error_message());
        return 1;
    }
    double max_err = 0.0, lse_err = 0.0;
    int poison_kept = 1, empty_rows = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < HQ; h++)
            for (int i = 0; i < LQ; i++) {
                double eo[D], el;
                expected(scale, softcap, left, right, opts.alignment == FUSED_ATTN_ALIGNMENT_TOP_LEFT, b, i, h, eo,
                         &el);
                for (int c = 0; c < D; c++) {
                    double got = o[b * HQ * OSTRIDE_H + h * OSTRIDE_H + i * D + c];
                    double e = fabs(got - eo[c]);
                    if (!(e <= max_err)) max_err = isnan(e) ? INFINITY : e;
                }
                double gl = lse[b * LSE_BSTRIDE + h * LQ + i];
                if (isinf(el)) {
                    empty_rows++;
                    if (!(isinf(gl) && gl < 0)) lse_err = INFINITY;
                } else if (!(fabs(gl - el) <= lse_err)) {
                    lse_err = isnan(gl) ? INFINITY : fabs(gl - el);
                }
            }
    for (int b = 0; b < B; b++)
        for (int h = 0; h < HQ; h++)
            for (int n = LQ * D; n < OSTRIDE_H; n++) poison_kept &= isnan(o[b * HQ * OSTRIDE_H + h * OSTRIDE_H + n]);
    for (int b = 0; b < B; b++)
        for (int n = HQ * LQ; n < LSE_BSTRIDE; n++) poison_kept &= isnan(lse[b * LSE_BSTRIDE + n]);
    CHECK(max_err < 1e-6 && lse_err < 1e-5 && poison_kept,
          "%s: max |O - expected| = %.2e, max |LSE - expected| = %.2e, %d empty rows, padding untouched: %s", name,
          max_err, lse_err, empty_rows, poison_kept ? "yes" : "NO");
    return 0;
}

static void expect_status(const char *what, FusedAttnStatus got, FusedAttnStatus want, const char *needle) {
    const char *msg = fused_attn_last_error_message();
    int named = needle == NULL || strstr(msg, needle) != NULL;
    CHECK(got == want && named, "%s -> %s (want %s): \"%s\"", what, fused_attn_status_name(got),
          fused_attn_status_name(want), msg);
}

int main(void) {
    /* Results. */
    FusedAttnOptions defaults;
    memset(&defaults, 0, sizeof defaults);
    run_case("f16 full, default scale", FUSED_ATTN_DTYPE_F16, defaults, 1.0 / sqrt((double)D), 0.0, -1, -1);
    CHECK(fused_attn_last_error_message()[0] == '\0', "no error message after a success");

    FusedAttnOptions causal = defaults;
    causal.mask = FUSED_ATTN_MASK_CAUSAL;
    run_case("bf16 causal bottom-right", FUSED_ATTN_DTYPE_BF16, causal, 1.0 / sqrt((double)D), 0.0, -1, 0);

    FusedAttnOptions tl = causal;
    tl.alignment = FUSED_ATTN_ALIGNMENT_TOP_LEFT;
    tl.has_scale = 1;
    tl.scale = 0.5f;
    tl.softcap = 2.0f;
    run_case("f16 causal top-left, scale 0.5, softcap 2", FUSED_ATTN_DTYPE_F16, tl, 0.5, 2.0, -1, 0);

    FusedAttnOptions win = defaults;
    win.mask = FUSED_ATTN_MASK_WINDOW;
    win.window_left = 1;
    win.window_right = 0;
    win.alignment = FUSED_ATTN_ALIGNMENT_TOP_LEFT;
    run_case("bf16 window(1, 0) top-left", FUSED_ATTN_DTYPE_BF16, win, 1.0 / sqrt((double)D), 0.0, 1, 0);

    /* -1 is an unbounded side: window(-1, -1) is the full mask. */
    FusedAttnOptions w2 = win;
    w2.window_left = -1;
    w2.window_right = -1;
    w2.alignment = FUSED_ATTN_ALIGNMENT_BOTTOM_RIGHT;
    run_case("f16 window(-1, -1) = full", FUSED_ATTN_DTYPE_F16, w2, 1.0 / sqrt((double)D), 0.0, -1, -1);

    /* ALiBi (per head, then per batch entry) and sinks. */
    static const float slopes[B * HQ] = {0.5f, 0.25f, 0.125f, 1.0f, 0.75f, 0.0f, 2.0f, 0.0625f};
    static const float sinks[HQ] = {0.5f, -2.0f, 3.0f, 0.0f};
    FusedAttnOptions ab = causal;
    ab.alibi_slopes = slopes;
    run_case("bf16 causal, ALiBi per head", FUSED_ATTN_DTYPE_BF16, ab, 1.0 / sqrt((double)D), 0.0, -1, 0);
    ab.alibi_per_batch = 1;
    ab.sinks = sinks;
    ab.softcap = 2.0f;
    run_case("f16 causal, softcap 2, ALiBi per batch, sinks", FUSED_ATTN_DTYPE_F16, ab, 1.0 / sqrt((double)D), 2.0,
             -1, 0);
    FusedAttnOptions sk = w2;
    sk.sinks = sinks;
    run_case("bf16 full, sinks", FUSED_ATTN_DTYPE_BF16, sk, 1.0 / sqrt((double)D), 0.0, -1, -1);

    /* Errors: a small valid problem to break one argument at a time. */
    static uint16_t buf[64 * 8];
    static float obuf[64 * 8], lbuf[64];
    FusedAttnTensor q = {buf, {1, 4, 2, 8}, {64, 16, 8, 1}};
    FusedAttnTensor kv = {buf, {1, 4, 2, 8}, {64, 16, 8, 1}};
    FusedAttnTensor o = {obuf, {1, 4, 2, 8}, {64, 16, 8, 1}};
    FusedAttnStatus st;
    memset(buf, 0, sizeof buf);
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_BF16, &q, &kv, &kv, &o, NULL, NULL);
    expect_status("valid call, null options and lse", st, FUSED_ATTN_STATUS_OK, NULL);

    st = fused_attn_reference_forward(0, &q, &kv, &kv, &o, NULL, NULL);
    expect_status("dtype 0", st, FUSED_ATTN_STATUS_INVALID_ENUM, "`dtype` = 0");
    st = fused_attn_reference_forward(7, &q, &kv, &kv, &o, NULL, NULL);
    expect_status("dtype 7", st, FUSED_ATTN_STATUS_INVALID_ENUM, "`dtype` = 7");

    FusedAttnTensor q3 = {buf, {1, 4, 3, 8}, {96, 24, 8, 1}};
    FusedAttnTensor o3 = {obuf, {1, 4, 3, 8}, {96, 24, 8, 1}};
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q3, &kv, &kv, &o3, NULL, NULL);
    expect_status("Hq = 3, Hk = 2", st, FUSED_ATTN_STATUS_HEADS_NOT_DIVISIBLE, "Hq % Hk");

    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, NULL, &kv, &kv, &o, NULL, NULL);
    expect_status("q = NULL", st, FUSED_ATTN_STATUS_NULL_POINTER, "`q`");
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, NULL, NULL, NULL);
    expect_status("o = NULL", st, FUSED_ATTN_STATUS_NULL_POINTER, "`o`");
    FusedAttnTensor vnull = kv;
    vnull.data = NULL;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &vnull, &o, NULL, NULL);
    expect_status("v->data = NULL", st, FUSED_ATTN_STATUS_NULL_POINTER, "`v->data`");
    FusedAttnLseTensor lnull = {NULL, {1, 2, 4}, {8, 4, 1}};
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, &lnull, NULL);
    expect_status("lse->data = NULL", st, FUSED_ATTN_STATUS_NULL_POINTER, "`lse->data`");
    FusedAttnLseTensor lbad = {lbuf, {1, 2, 3}, {8, 4, 1}};
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, &lbad, NULL);
    expect_status("lse seqlen 3 for Lq 4", st, FUSED_ATTN_STATUS_SHAPE_MISMATCH, "`lse`");

    FusedAttnTensor qd = {buf, {1, 4, 2, 12}, {96, 24, 12, 1}};
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &qd, &kv, &kv, &o, NULL, NULL);
    expect_status("head_dim 12", st, FUSED_ATTN_STATUS_HEAD_DIM, "head_dim 12");
    FusedAttnTensor qs = q;
    qs.strides[1] = -16;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &qs, &kv, &kv, &o, NULL, NULL);
    expect_status("negative stride", st, FUSED_ATTN_STATUS_NEGATIVE, "`q` has strides[1] = -16");
    FusedAttnTensor ql = q;
    ql.strides[3] = 2;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &ql, &kv, &kv, &o, NULL, NULL);
    expect_status("last stride 2", st, FUSED_ATTN_STATUS_LAST_DIM_STRIDE, "`q`");
    FusedAttnTensor oo = o;
    oo.strides[1] = 0;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &oo, NULL, NULL);
    expect_status("O with a zero stride", st, FUSED_ATTN_STATUS_OVERLAPPING, "`o`");

    /* A non-finite sink is an invalid option naming `sinks`. */
    {
        static const float nan_sinks[2] = {0.0f, NAN};
        FusedAttnOptions ns = defaults;
        ns.sinks = nan_sinks;
        st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_BF16, &q, &kv, &kv, &o, NULL, &ns);
        expect_status("NaN sink", st, FUSED_ATTN_STATUS_INVALID_OPTION, "sinks");
    }
    FusedAttnOptions bad = defaults;
    bad.mask = 9;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, NULL, &bad);
    expect_status("mask 9", st, FUSED_ATTN_STATUS_INVALID_ENUM, "options->mask");
    bad = defaults;
    bad.kernel = -1;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, NULL, &bad);
    expect_status("kernel -1", st, FUSED_ATTN_STATUS_INVALID_ENUM, "options->kernel");
    bad = defaults;
    bad.has_scale = 1;
    bad.scale = NAN;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, NULL, &bad);
    expect_status("scale NaN", st, FUSED_ATTN_STATUS_INVALID_OPTION, "scale");
    bad = defaults;
    bad.softcap = -1.0f;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, NULL, &bad);
    expect_status("softcap -1", st, FUSED_ATTN_STATUS_INVALID_OPTION, "softcap");
    bad = defaults;
    bad.mask = FUSED_ATTN_MASK_WINDOW;
    bad.window_left = -2;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, NULL, &bad);
    expect_status("window_left -2", st, FUSED_ATTN_STATUS_NEGATIVE, "window_left");
    FusedAttnTensor qm = q;
    qm.data = (char *)buf + 1;
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_F16, &qm, &kv, &kv, &o, NULL, NULL);
    expect_status("q->data odd address", st, FUSED_ATTN_STATUS_MISALIGNED, "`q`");

    /* Backward reference, one key (Lk = 1, full mask): every P is 1, so
     * dS = P (dP - D) = 0 (dQ = dK = 0) and dV of a KV head sums dO over its
     * query heads and every query. */
    {
        enum { BL = 3, BH = 4, BK = 2 };
        static uint16_t qb[B * BL * BH * D], kb[B * BK * D], vb[B * BK * D], dob[B * BL * BH * D];
        static float dqf[B * BL * BH * D], dkf[B * BK * D], dvf[B * BK * D], dsf[BH];
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < BL; ++i)
                for (int h = 0; h < BH; ++h)
                    for (int d = 0; d < D; ++d) {
                        qb[((b * BL + i) * BH + h) * D + d] = to_bf16(val(4, b, i, h, d));
                        dob[((b * BL + i) * BH + h) * D + d] = to_bf16(val(5, b, i, h, d));
                    }
        for (int b = 0; b < B; ++b)
            for (int h = 0; h < BK; ++h)
                for (int d = 0; d < D; ++d) {
                    kb[(b * BK + h) * D + d] = to_bf16(val(6, b, 0, h, d));
                    vb[(b * BK + h) * D + d] = to_bf16(val(7, b, 0, h, d));
                }
        FusedAttnTensor tq = {qb, {B, BL, BH, D}, {BL * BH * D, BH * D, D, 1}};
        FusedAttnTensor tk = {kb, {B, 1, BK, D}, {BK * D, BK * D, D, 1}};
        FusedAttnTensor tv = {vb, {B, 1, BK, D}, {BK * D, BK * D, D, 1}};
        FusedAttnTensor tdo = {dob, {B, BL, BH, D}, {BL * BH * D, BH * D, D, 1}};
        FusedAttnTensor tdq = {dqf, {B, BL, BH, D}, {BL * BH * D, BH * D, D, 1}};
        FusedAttnTensor tdk = {dkf, {B, 1, BK, D}, {BK * D, BK * D, D, 1}};
        FusedAttnTensor tdv = {dvf, {B, 1, BK, D}, {BK * D, BK * D, D, 1}};
        for (int x = 0; x < B * BK * D; ++x) dvf[x] = dkf[x] = NAN;
        st = fused_attn_reference_backward(FUSED_ATTN_DTYPE_BF16, &tq, &tk, &tv, &tdo, &tdq, &tdk, &tdv, NULL, NULL);
        expect_status("reference backward, one key", st, FUSED_ATTN_STATUS_OK, NULL);
        double zero_err = 0.0, dv_err = 0.0;
        for (int x = 0; x < B * BL * BH * D; ++x) zero_err = fmax(zero_err, fabs(dqf[x]));
        for (int x = 0; x < B * BK * D; ++x) zero_err = fmax(zero_err, fabs(dkf[x]));
        for (int b = 0; b < B; ++b)
            for (int g = 0; g < BK; ++g)
                for (int d = 0; d < D; ++d) {
                    double want = 0.0;
                    for (int i = 0; i < BL; ++i)
                        for (int h = g * (BH / BK); h < (g + 1) * (BH / BK); ++h) want += val(5, b, i, h, d);
                    dv_err = fmax(dv_err, fabs(dvf[(b * BK + g) * D + d] - want));
                }
        CHECK(zero_err < 1e-6 && dv_err < 1e-5, "backward, one key: max |dQ|, |dK| = %.1e (want 0), max dV error %.1e",
              zero_err, dv_err);
        st = fused_attn_reference_backward(FUSED_ATTN_DTYPE_BF16, &tq, &tk, &tv, &tdo, &tdq, &tdk, &tdv, dsf, NULL);
        expect_status("backward: dsinks without sinks", st, FUSED_ATTN_STATUS_INVALID_OPTION, "dsinks");
        st = fused_attn_reference_backward(FUSED_ATTN_DTYPE_BF16, &tq, &tk, &tv, &tdo, NULL, &tdk, &tdv, NULL, NULL);
        expect_status("backward: dq = NULL", st, FUSED_ATTN_STATUS_NULL_POINTER, "`dq`");
        FusedAttnTensor bad = tdk;
        bad.shape[3] = 16;
        st = fused_attn_reference_backward(FUSED_ATTN_DTYPE_BF16, &tq, &tk, &tv, &tdo, &tdq, &bad, &tdv, NULL, NULL);
        expect_status("backward: dk of another head_dim", st, FUSED_ATTN_STATUS_SHAPE_MISMATCH, "`dk`");
        uint64_t len = 0;
        st = fused_attn_backward_workspace_len(2, 100, 8, 64, &len);
        /* tokens * Hq * (D + 1) + B * Hq * ceil(Lq / 64) + 1 (the ticket counter) */
        CHECK(st == FUSED_ATTN_STATUS_OK && len == 2u * 100 * 8 * 65 + 2u * 8 * 2 + 1,
              "backward workspace for B 2, Lq 100, Hq 8, D 64: %llu floats", (unsigned long long)len);
        st = fused_attn_backward_workspace_len(2, -1, 8, 64, &len);
        expect_status("backward workspace, Lq -1", st, FUSED_ATTN_STATUS_NEGATIVE, "seqlen_q");
    }

    /* The GPU side: this machine may have no driver or no device. */
    FusedAttnHandle *h = (FusedAttnHandle *)&h; /* not null, to see it cleared */
    st = fused_attn_create(0, &h);
    if (st == FUSED_ATTN_STATUS_OK) {
        CHECK(h != NULL, "fused_attn_create(0): a GPU is present, got a handle");
        st = fused_attn_forward(h, NULL, FUSED_ATTN_DTYPE_F16, &q3, &kv, &kv, &o3, NULL, NULL);
        expect_status("GPU: Hq = 3, Hk = 2", st, FUSED_ATTN_STATUS_HEADS_NOT_DIVISIBLE, "Hq % Hk");
        st = fused_attn_forward(h, NULL, 5, &q, &kv, &kv, &o, NULL, NULL);
        expect_status("GPU: dtype 5", st, FUSED_ATTN_STATUS_INVALID_ENUM, "`dtype`");
        st = fused_attn_destroy(h);
        expect_status("fused_attn_destroy", st, FUSED_ATTN_STATUS_OK, NULL);
    } else {
        CHECK((st == FUSED_ATTN_STATUS_NO_DRIVER || st == FUSED_ATTN_STATUS_NO_DEVICE) && h == NULL,
              "fused_attn_create(0) without a GPU -> %s: \"%s\"", fused_attn_status_name(st),
              fused_attn_last_error_message());
    }
    st = fused_attn_create(-1, &h);
    expect_status("fused_attn_create(-1)", st, FUSED_ATTN_STATUS_NEGATIVE, "device");
    st = fused_attn_create(0, NULL);
    expect_status("fused_attn_create(0, NULL)", st, FUSED_ATTN_STATUS_NULL_POINTER, "`out`");
    st = fused_attn_forward(NULL, NULL, FUSED_ATTN_DTYPE_F16, &q, &kv, &kv, &o, NULL, NULL);
    expect_status("fused_attn_forward(handle = NULL)", st, FUSED_ATTN_STATUS_NULL_POINTER, "`handle`");
    expect_status("fused_attn_destroy(NULL)", fused_attn_destroy(NULL), FUSED_ATTN_STATUS_OK, NULL);
    CHECK(strcmp(fused_attn_status_name(12345), "FUSED_ATTN_STATUS_UNKNOWN") == 0, "status_name(12345) is UNKNOWN");

    printf("%d failure(s)\n", failures);
    return failures == 0 ? 0 : 1;
}
