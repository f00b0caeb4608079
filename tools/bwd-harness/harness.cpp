// Host harness for kernels/common/bwd_naive.cuh (the baseline backward):
// compiles its thread functions for the host and runs every thread of the
// three kernels' grids over one case that tests/backward_numerics.rs wrote,
// then writes the gradients' whole allocations back for that test to check
// against the f64 reference (reference::backward) and for stray writes.
//
// Case file (little-endian): "FABW", then i64 dtype (0 f16, 1 bf16), B, Lq,
// Lk, Hq, Hk, D, window_left, window_right, diag_offset, alibi (0/1),
// alibi_batch_stride, sinks (0/1), dsinks (0/1); f32 scale, softcap; then
// q, k, v, o, d_o as (i64 batch, row, head strides, i64 len, u16 data[len]);
// lse as (i64 batch, head strides, i64 len, f32 data[len]); alibi slopes and
// sinks as (i64 len, f32 data[len]); dq, dk, dv as (i64 strides x3, i64
// allocation len, i64 offset of the view in it). Output file: dq, dk, dv allocations (u16, poisoned 0xffff
// where nothing was written), then dsinks f32[Hq] (NaN where not written).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __device__
#define __forceinline__ inline
using std::max;
using std::min;
#include "bwd_naive.cuh"

static FILE *in;
template <typename X> static X get() {
    X x;
    if (fread(&x, sizeof x, 1, in) != 1) { fprintf(stderr, "short case file\n"); exit(2); }
    return x;
}
template <typename X> static std::vector<X> get_vec(int64_t n) {
    std::vector<X> v(n);
    if (n && fread(v.data(), sizeof(X), n, in) != (size_t)n) { fprintf(stderr, "short case file\n"); exit(2); }
    return v;
}

struct Tensor {
    int64_t bs, rs, hs, offset = 0;  // offset: where the view starts in the allocation
    std::vector<uint16_t> data;
    uint16_t *base() { return data.data() + offset; }
};
static Tensor get_tensor() {
    Tensor t;
    t.bs = get<int64_t>(), t.rs = get<int64_t>(), t.hs = get<int64_t>();
    t.data = get_vec<uint16_t>(get<int64_t>());
    return t;
}
static Tensor out_tensor() {
    Tensor t;
    t.bs = get<int64_t>(), t.rs = get<int64_t>(), t.hs = get<int64_t>();
    t.data.assign(get<int64_t>(), 0xffff);
    t.offset = get<int64_t>();
    return t;
}

template <typename T> static void run(FaBwdParams &p, bool dsinks) {
    const FaFwdParams &f = p.fwd;
    const int64_t chunks = f.head_dim / FA_BWD_COLS;
    // Grid order shuffled per kernel would not matter: no thread reads what another writes.
    for (int b = 0; b < f.batch; ++b)
        for (int h = 0; h < f.heads_q; ++h)
            for (int64_t t = 0; t < f.seqlen_q * chunks + 127; ++t) fa_bwd_dq_thread<T>(p, t, h, b);
    for (int b = 0; b < f.batch; ++b)
        for (int g = 0; g < f.heads_kv; ++g)
            for (int64_t t = 0; t < f.seqlen_k * chunks + 127; ++t) fa_bwd_dkdv_thread<T>(p, t, g, b);
    if (dsinks)
        for (int h = 0; h < f.heads_q + 127; ++h) fa_bwd_dsink_thread<T>(p, h);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: harness case.bin out.bin\n"); return 2; }
    in = fopen(argv[1], "rb");
    if (!in) { perror(argv[1]); return 2; }
    char magic[4];
    if (fread(magic, 1, 4, in) != 4 || memcmp(magic, "FABW", 4) != 0) { fprintf(stderr, "not a case file\n"); return 2; }
    const int64_t dtype = get<int64_t>(), B = get<int64_t>(), Lq = get<int64_t>(), Lk = get<int64_t>(),
                  Hq = get<int64_t>(), Hk = get<int64_t>(), D = get<int64_t>(), wl = get<int64_t>(),
                  wr = get<int64_t>(), off = get<int64_t>(), has_alibi = get<int64_t>(), alibi_bs = get<int64_t>(),
                  has_sinks = get<int64_t>(), want_dsinks = get<int64_t>();
    const float scale = get<float>(), softcap = get<float>();
    Tensor q = get_tensor(), k = get_tensor(), v = get_tensor(), o = get_tensor(), d_o = get_tensor();
    const int64_t lse_bs = get<int64_t>(), lse_hs = get<int64_t>();
    std::vector<float> lse = get_vec<float>(get<int64_t>());
    std::vector<float> slopes = get_vec<float>(get<int64_t>());
    std::vector<float> sinks = get_vec<float>(get<int64_t>());
    Tensor dq = out_tensor(), dk = out_tensor(), dv = out_tensor();
    fclose(in);

    FaBwdParams p;
    memset(&p, 0, sizeof p);
    FaFwdParams &f = p.fwd;
    f.q = q.data.data(), f.k = k.data.data(), f.v = v.data.data(), f.o = o.data.data();
    f.lse = lse.data();
    f.q_batch_stride = q.bs, f.q_row_stride = q.rs, f.q_head_stride = q.hs;
    f.k_batch_stride = k.bs, f.k_row_stride = k.rs, f.k_head_stride = k.hs;
    f.v_batch_stride = v.bs, f.v_row_stride = v.rs, f.v_head_stride = v.hs;
    f.o_batch_stride = o.bs, f.o_row_stride = o.rs, f.o_head_stride = o.hs;
    f.lse_batch_stride = lse_bs, f.lse_head_stride = lse_hs;
    f.batch = (int)B, f.heads_q = (int)Hq, f.heads_kv = (int)Hk, f.q_per_kv = (int)(Hq / Hk);
    f.seqlen_q = (int)Lq, f.seqlen_k = (int)Lk, f.head_dim = (int)D;
    f.window_left = (int)wl, f.window_right = (int)wr, f.diag_offset = (int)off;
    f.scale = scale, f.softcap = softcap;
    if (has_alibi) f.alibi_slopes = slopes.data(), f.alibi_batch_stride = alibi_bs;
    if (has_sinks) f.sinks = sinks.data();
    p.d_o = d_o.data.data(), p.do_batch_stride = d_o.bs, p.do_row_stride = d_o.rs, p.do_head_stride = d_o.hs;
    p.dq = dq.base(), p.dq_batch_stride = dq.bs, p.dq_row_stride = dq.rs, p.dq_head_stride = dq.hs;
    p.dk = dk.base(), p.dk_batch_stride = dk.bs, p.dk_row_stride = dk.rs, p.dk_head_stride = dk.hs;
    p.dv = dv.base(), p.dv_batch_stride = dv.bs, p.dv_row_stride = dv.rs, p.dv_head_stride = dv.hs;
    std::vector<float> dsinks(Hq, NAN);
    if (want_dsinks) p.dsinks = dsinks.data();

    if (dtype == 0) run<fa_f16>(p, want_dsinks);
    else run<fa_bf16>(p, want_dsinks);

    FILE *out = fopen(argv[2], "wb");
    if (!out) { perror(argv[2]); return 2; }
    for (Tensor *t : {&dq, &dk, &dv}) fwrite(t->data.data(), 2, t->data.size(), out);
    fwrite(dsinks.data(), 4, dsinks.size(), out);
    fclose(out);
    return 0;
}
