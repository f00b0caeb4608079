// A value the compiler cannot see through: fa_opaque(x) is x, but nothing
// derived from it can be hoisted out of the loop it is called in, so the
// derivation is redone there instead of holding its result in a register
// across the loop. For loops at the 255-register limit, where one more
// loop-invariant register spills.
#pragma once

__device__ __forceinline__ int fa_opaque(int x) {
    asm volatile("" : "+r"(x));
    return x;
}
