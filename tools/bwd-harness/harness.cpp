// Host harness for kernels/common/bwd_naive.cuh (the baseline backward):
// compiles its thread functions for the host and runs every thread of the
// three kernels' grids over one case that tests/backward_numerics.rs wrote
// (format: ../emu-common/bwd_case.h), then writes the gradients' whole
// allocations back for that test to check against the f64 reference
// (reference::backward) and for stray writes.
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
#include "../emu-common/bwd_case.h"

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
    static BwdCase c;
    read_bwd_case(argv[1], c);
    if (!c.cu_q.empty()) { fprintf(stderr, "the baseline backward takes no packed batches\n"); return 2; }
    if (c.bf16) run<fa_bf16>(c.p, c.want_dsinks);
    else run<fa_f16>(c.p, c.want_dsinks);
    return write_bwd_answer(argv[2], c);
}
