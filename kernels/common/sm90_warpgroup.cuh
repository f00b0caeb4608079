// Warpgroup-level control of sm90: register reallocation between warpgroups
// (setmaxnreg) and named barriers, the two tools of warp specialisation.
#pragma once
#include <stdint.h>

namespace sm90 {

constexpr int kWarpgroupThreads = 128;

// Every warp of the warpgroup must execute the same setmaxnreg. The CTA's
// register pool is fixed at launch (threads x the kernel's register count), so
// what producers release (dec) is what consumers can claim (inc); inc blocks
// until the pool can serve it.
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
    static_assert(REGS % 8 == 0 && REGS >= 24 && REGS <= 256, "setmaxnreg range");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
    static_assert(REGS % 8 == 0 && REGS >= 24 && REGS <= 256, "setmaxnreg range");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// Named barriers (id 0 is __syncthreads). `threads` counts every participant,
// those that sync and those that only arrive; a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace sm90
