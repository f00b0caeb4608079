// The backward case files of tests/backward_numerics.rs, read and answered
// by every backward runner (tools/bwd-harness for the baseline kernels,
// tools/sm80-emu --bwd for the tiled ones): one format, one reader.
//
// Case file (little-endian): "FABW", then i64 dtype (0 f16, 1 bf16), B, Lq,
// Lk, Hq, Hk, D, window_left, window_right, diag_offset, alibi (0/1),
// alibi_batch_stride, sinks (0/1), dsinks (0/1); f32 scale, softcap; then
// q, k, v, o, d_o as (i64 batch, row, head strides, i64 len, u16 data[len]);
// lse as (i64 batch, head strides, i64 len, f32 data[len]); alibi slopes and
// sinks as (i64 len, f32 data[len]); dq, dk, dv as (i64 strides x3, i64
// allocation len, i64 offset of the view in it); i64 n, i64 top_left, then i32
// cu_seqlens_q[n], cu_seqlens_k[n] (n = 0: a rectangular batch; else a
// packed one of n - 1 sequences, whose B, Lq, Lk above are the sequence
// count and the longest lengths, and whose batch strides are 0). Answer file: dq, dk, dv
// allocations (u16, poisoned 0xffff where nothing was written), then dsinks
// f32[Hq] (NaN where not written).
// Needs params.h (FaBwdParams) included first.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>

struct BwdTensor {
    int64_t bs, rs, hs, offset = 0;  // offset: where the view starts in the allocation
    std::vector<uint16_t> data;
    uint16_t *base() { return data.data() + offset; }
};

struct BwdCase {
    bool bf16 = false, want_dsinks = false;
    BwdTensor q, k, v, o, d_o, dq, dk, dv;
    std::vector<float> lse, slopes, sinks, dsinks;
    std::vector<int32_t> cu_q, cu_k;  // empty: rectangular
    FaBwdParams p;  // points into the vectors above: do not copy a BwdCase
};

namespace bwd_case_io {
inline FILE *&in() { static FILE *f = nullptr; return f; }
template <typename X> X get() {
    X x;
    if (fread(&x, sizeof x, 1, in()) != 1) { fprintf(stderr, "short case file\n"); exit(2); }
    return x;
}
template <typename X> std::vector<X> get_vec(int64_t n) {
    std::vector<X> v(n);
    if (n && fread(v.data(), sizeof(X), n, in()) != (size_t)n) { fprintf(stderr, "short case file\n"); exit(2); }
    return v;
}
inline void get_tensor(BwdTensor &t) {
    t.bs = get<int64_t>(), t.rs = get<int64_t>(), t.hs = get<int64_t>();
    t.data = get_vec<uint16_t>(get<int64_t>());
}
inline void out_tensor(BwdTensor &t) {
    t.bs = get<int64_t>(), t.rs = get<int64_t>(), t.hs = get<int64_t>();
    t.data.assign(get<int64_t>(), 0xffff);
    t.offset = get<int64_t>();
}
}  // namespace bwd_case_io

// Reads `path` into `c` (which must stay where it is: c.p points into it).
inline void read_bwd_case(const char *path, BwdCase &c) {
    using namespace bwd_case_io;
    in() = fopen(path, "rb");
    if (!in()) { perror(path); exit(2); }
    char magic[4];
    if (fread(magic, 1, 4, in()) != 4 || memcmp(magic, "FABW", 4) != 0) { fprintf(stderr, "not a case file\n"); exit(2); }
    const int64_t dtype = get<int64_t>(), B = get<int64_t>(), Lq = get<int64_t>(), Lk = get<int64_t>(),
                  Hq = get<int64_t>(), Hk = get<int64_t>(), D = get<int64_t>(), wl = get<int64_t>(),
                  wr = get<int64_t>(), off = get<int64_t>(), has_alibi = get<int64_t>(), alibi_bs = get<int64_t>(),
                  has_sinks = get<int64_t>(), want_dsinks = get<int64_t>();
    const float scale = get<float>(), softcap = get<float>();
    for (BwdTensor *t : {&c.q, &c.k, &c.v, &c.o, &c.d_o}) get_tensor(*t);
    const int64_t lse_bs = get<int64_t>(), lse_hs = get<int64_t>();
    c.lse = get_vec<float>(get<int64_t>());
    c.slopes = get_vec<float>(get<int64_t>());
    c.sinks = get_vec<float>(get<int64_t>());
    for (BwdTensor *t : {&c.dq, &c.dk, &c.dv}) out_tensor(*t);
    const int64_t n_cu = get<int64_t>(), top_left = get<int64_t>();
    c.cu_q = get_vec<int32_t>(n_cu);
    c.cu_k = get_vec<int32_t>(n_cu);
    fclose(in());
    c.bf16 = dtype == 1;
    c.want_dsinks = want_dsinks != 0;

    FaBwdParams &p = c.p;
    memset(&p, 0, sizeof p);
    FaFwdParams &f = p.fwd;
    f.q = c.q.data.data(), f.k = c.k.data.data(), f.v = c.v.data.data(), f.o = c.o.data.data();
    f.lse = c.lse.data();
    f.q_batch_stride = c.q.bs, f.q_row_stride = c.q.rs, f.q_head_stride = c.q.hs;
    f.k_batch_stride = c.k.bs, f.k_row_stride = c.k.rs, f.k_head_stride = c.k.hs;
    f.v_batch_stride = c.v.bs, f.v_row_stride = c.v.rs, f.v_head_stride = c.v.hs;
    f.o_batch_stride = c.o.bs, f.o_row_stride = c.o.rs, f.o_head_stride = c.o.hs;
    f.lse_batch_stride = lse_bs, f.lse_head_stride = lse_hs;
    f.batch = (int)B, f.heads_q = (int)Hq, f.heads_kv = (int)Hk, f.q_per_kv = (int)(Hq / Hk);
    f.seqlen_q = (int)Lq, f.seqlen_k = (int)Lk, f.head_dim = (int)D;
    f.window_left = (int)wl, f.window_right = (int)wr, f.diag_offset = (int)off;
    f.scale = scale, f.softcap = softcap;
    if (has_alibi) f.alibi_slopes = c.slopes.data(), f.alibi_batch_stride = alibi_bs;
    if (has_sinks) f.sinks = c.sinks.data();
    if (!c.cu_q.empty()) f.cu_seqlens_q = c.cu_q.data(), f.cu_seqlens_k = c.cu_k.data();
    f.top_left = (int)top_left;
    p.d_o = c.d_o.data.data(), p.do_batch_stride = c.d_o.bs, p.do_row_stride = c.d_o.rs, p.do_head_stride = c.d_o.hs;
    p.dq = c.dq.base(), p.dq_batch_stride = c.dq.bs, p.dq_row_stride = c.dq.rs, p.dq_head_stride = c.dq.hs;
    p.dk = c.dk.base(), p.dk_batch_stride = c.dk.bs, p.dk_row_stride = c.dk.rs, p.dk_head_stride = c.dk.hs;
    p.dv = c.dv.base(), p.dv_batch_stride = c.dv.bs, p.dv_row_stride = c.dv.rs, p.dv_head_stride = c.dv.hs;
    c.dsinks.assign(Hq, NAN);
    if (c.want_dsinks) p.dsinks = c.dsinks.data();
}

inline int write_bwd_answer(const char *path, const BwdCase &c) {
    FILE *out = fopen(path, "wb");
    if (!out) { perror(path); return 2; }
    for (const BwdTensor *t : {&c.dq, &c.dk, &c.dv}) fwrite(t->data.data(), 2, t->data.size(), out);
    fwrite(c.dsinks.data(), 4, c.dsinks.size(), out);
    fclose(out);
    return 0;
}
