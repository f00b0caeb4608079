// Shared-memory transaction barriers (mbarrier) of sm90: the handshake between
// the TMA producer and the wgmma consumers. Addresses are 32-bit shared-window
// addresses (see sm90_smem_u32).
//
// A barrier counts arrivals and, for TMA, transaction bytes; a phase completes
// when both reach zero, and the barrier flips to the next phase. Waiters name
// the phase they wait for by its parity: a barrier starts in phase 0, so
// waiting for parity 0 blocks until the first completion, and waiting for
// parity 1 returns at once ("the phase before the first" counts as done). That
// is why a producer waits on its empty barriers with the flipped parity.
#pragma once
#include <stdint.h>

namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void *ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// Makes the initialised barriers visible to the async proxy (TMA) before any
// copy can signal them; a CTA barrier must still follow before use.
__device__ __forceinline__ void mbarrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of incoming TMA transactions for
// the current phase. Issued before the copies, so the phase cannot complete
// on the arrival alone.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}

// Plain arrival (release semantics: this thread's earlier accesses are
// ordered before whoever waits on the phase).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

// Blocks until the phase of the given parity has completed (acquire: the
// bytes the TMA wrote for that phase are visible afterwards). try_wait
// already suspends for a while in hardware, so the loop does not hammer.
// For a single thread (the TMA producer).
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
    while (!mbarrier_try_wait(bar, parity)) {
    }
}

// The same for a whole warp (all 32 lanes call it), which leaves it
// converged: the loop condition is a warp vote, so no lane can run ahead into
// the .aligned instructions that follow (wgmma, bar.sync) while another is
// still polling. Re-polling a completed phase is harmless: it cannot be
// overtaken before this warp releases the slot.
__device__ __forceinline__ void mbarrier_wait_warp(uint32_t bar, uint32_t parity) {
    while (!__all_sync(0xffffffffu, mbarrier_try_wait(bar, parity))) {
    }
}

}  // namespace sm90
