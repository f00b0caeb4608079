/* Causal GQA attention from C through the fused-attn C ABI.
 *
 * The CPU reference on host memory first (it needs no GPU), then, where a
 * GPU is present, the kernels on cudaMalloc'd memory on a cudaStream_t,
 * compared with the reference. Without a GPU the second part reports why
 * (a status code and fused_attn_last_error_message()) and the program still
 * exits 0; a wrong GPU result exits 1.
 *
 *   cargo build --release -p fused-attn-capi
 *   CUDA=.cuda/nvidia/cu13   # any CUDA 13 runtime: headers and libcudart
 *   cc -std=c11 -Icapi/include -I$CUDA/include capi/examples/attention.c \
 *      target/release/libfused_attn_capi.a $CUDA/lib/libcudart.so.13 \
 *      -lpthread -ldl -lm -o attention && ./attention
 *
 * Built and run by capi/tests/c_abi.rs (CI, no GPU). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "fused_attn.h"

enum { B = 2, L = 200, HQ = 8, HK = 2, D = 64 };

/* float <-> bf16 bits, round to nearest even (no NaNs here). */
static uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* A contiguous [B, len, heads, D] tensor (element strides). */
static FusedAttnTensor bshd(void *data, int64_t len, int64_t heads) {
    FusedAttnTensor t = {data, {B, len, heads, D}, {len * heads * D, heads * D, D, 1}};
    return t;
}

static int fail(const char *what, FusedAttnStatus st) {
    fprintf(stderr, "%s: %s: %s\n", what, fused_attn_status_name(st), fused_attn_last_error_message());
    return 1;
}

/* The kernels on the GPU; 0 if they ran (their O in `out`), 1 if there is
 * no usable GPU (reported), 2 on any other failure. */
static int on_gpu(const uint16_t *q, const uint16_t *k, const uint16_t *v, const FusedAttnOptions *opts,
                  uint16_t *out) {
    const size_t nq = (size_t)B * L * HQ * D, nk = (size_t)B * L * HK * D;
    FusedAttnHandle *h = NULL;
    FusedAttnStatus st = fused_attn_create(0, &h);
    if (st != FUSED_ATTN_STATUS_OK) {
        printf("GPU part skipped: %s (%s)\n", fused_attn_status_name(st), fused_attn_last_error_message());
        return 1;
    }
    void *dq = NULL, *dk = NULL, *dv = NULL, *dout = NULL;
    cudaStream_t stream = NULL;
    int rc = 2;
    if (cudaStreamCreate(&stream) != cudaSuccess || cudaMalloc(&dq, nq * 2) != cudaSuccess ||
        cudaMalloc(&dk, nk * 2) != cudaSuccess || cudaMalloc(&dv, nk * 2) != cudaSuccess ||
        cudaMalloc(&dout, nq * 2) != cudaSuccess) {
        fprintf(stderr, "CUDA runtime: %s\n", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    cudaMemcpy(dq, q, nq * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dk, k, nk * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dv, v, nk * 2, cudaMemcpyHostToDevice);
    FusedAttnTensor tq = bshd(dq, L, HQ), tk = bshd(dk, L, HK), tv = bshd(dv, L, HK), to = bshd(dout, L, HQ);
    /* Asynchronous on `stream`; the handle takes the runtime's stream as is. */
    st = fused_attn_forward(h, (void *)stream, FUSED_ATTN_DTYPE_BF16, &tq, &tk, &tv, &to, NULL, opts);
    if (st != FUSED_ATTN_STATUS_OK) {
        fail("fused_attn_forward", st);
        goto done;
    }
    if (cudaMemcpyAsync(out, dout, nq * 2, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
        cudaStreamSynchronize(stream) != cudaSuccess) {
        fprintf(stderr, "CUDA runtime: %s\n", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    rc = 0;
done:
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dout);
    if (stream) cudaStreamDestroy(stream);
    fused_attn_destroy(h);
    return rc;
}

int main(void) {
    const size_t nq = (size_t)B * L * HQ * D, nk = (size_t)B * L * HK * D;
    uint16_t *q = malloc(nq * 2), *k = malloc(nk * 2), *v = malloc(nk * 2), *gpu = malloc(nq * 2);
    float *ref = malloc(nq * 4);
    if (!q || !k || !v || !gpu || !ref) return 2;
    srand(7);
    for (size_t i = 0; i < nq; ++i) q[i] = to_bf16(4.0f * rand() / (float)RAND_MAX - 2.0f);
    for (size_t i = 0; i < nk; ++i) k[i] = to_bf16(4.0f * rand() / (float)RAND_MAX - 2.0f);
    for (size_t i = 0; i < nk; ++i) v[i] = to_bf16(4.0f * rand() / (float)RAND_MAX - 2.0f);

    /* Causal, bottom-right aligned, default scale 1/sqrt(D): zeroed options
     * are full attention at the default scale. */
    FusedAttnOptions opts;
    memset(&opts, 0, sizeof opts);
    opts.mask = FUSED_ATTN_MASK_CAUSAL;

    /* The reference: host memory, O written as float. */
    FusedAttnTensor hq = bshd(q, L, HQ), hk = bshd(k, L, HK), hv = bshd(v, L, HK), ho = bshd(ref, L, HQ);
    FusedAttnStatus st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_BF16, &hq, &hk, &hv, &ho, NULL, &opts);
    if (st != FUSED_ATTN_STATUS_OK) return fail("fused_attn_reference_forward", st);
    double norm = 0.0;
    for (size_t i = 0; i < nq; ++i) norm += (double)ref[i] * ref[i];
    printf("reference: B %d, L %d, %d:%d heads of %d, causal; |O| = %.4f\n", B, L, HQ, HK, D, sqrt(norm));

    /* A bad call gets a status and a message, never a crash. */
    FusedAttnTensor bad = bshd(q, L, 3); /* 3 query heads over 2 KV heads */
    st = fused_attn_reference_forward(FUSED_ATTN_DTYPE_BF16, &bad, &hk, &hv, &ho, NULL, &opts);
    printf("3 query heads over 2 KV heads: %s (%s)\n", fused_attn_status_name(st), fused_attn_last_error_message());
    if (st == FUSED_ATTN_STATUS_OK) return 1;

    int rc = on_gpu(q, k, v, &opts, gpu);
    if (rc == 0) {
        double err = 0.0;
        for (size_t i = 0; i < nq; ++i) {
            double d = (double)from_bf16(gpu[i]) - ref[i];
            err += d * d;
        }
        err = sqrt(err / norm);
        printf("GPU vs reference: rel L2 %.2e\n", err);
        rc = err <= 1e-2 ? 0 : 1;
    } else if (rc == 1) {
        rc = 0; /* no GPU: the reference part is the example */
    }
    free(q);
    free(k);
    free(v);
    free(gpu);
    free(ref);
    return rc;
}
