// Tensor Memory Accelerator (TMA) bulk tensor copies of sm90: one thread
// issues a whole box copy global -> shared, described by a CUtensorMap that
// the host encoded (see FaFwdSm90Params in params.h). Completion is reported
// as transaction bytes on an mbarrier (sm90_mbarrier.cuh).
//
// The map lives in kernel parameter space (__grid_constant__), and its generic
// address is what the instruction wants; no cuda.h needed.
#pragma once
#include <stdint.h>

namespace sm90 {

// Pulls the 128-byte descriptor into the TMA unit's cache ahead of first use.
__device__ __forceinline__ void tma_prefetch_map(const void *map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Copies the box at element coordinates {c0, c1, c2, c3} (innermost first) to
// shared address `dst`, then completes the box's full byte count on `bar`:
// elements outside the tensor are written as zeros and still counted, so a
// partial tile costs the same expect_tx as a full one. With 128-byte
// swizzling `dst` must be 1024-byte aligned.
//
// Only for boxes with at least one element inside the tensor: whether a box
// lying wholly outside is zero-filled and credits its bytes is not
// documented, so callers never issue one (and do not count its bytes).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void *map, int c0, int c1, int c2,
                                            int c3, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// Orders this thread's earlier ordinary (generic-proxy) loads and stores of
// shared memory before async-proxy accesses (TMA writes, wgmma reads) that
// are ordered after this point, e.g. through an mbarrier arrive and wait: a
// buffer handed from ordinary code back to the TMA needs it.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace sm90
