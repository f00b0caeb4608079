"""Checks scripts/fused_attn_ctypes.py against the C ABI's CPU reference,
without a GPU or numpy: a small GQA problem with a causal mask, computed
here in double precision from the same bf16 inputs, and the ABI's errors
as Python exceptions. Run by capi/tests/python.rs with FUSED_ATTN_CAPI_LIB
set; prints one line per check, exits 1 on a failure."""
import array
import math
import struct
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_attn_ctypes as fa  # noqa: E402


def bf16_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0] >> 16


def bf16_value(bits):
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def main():
    lib = fa.FusedAttnLib()
    B, LQ, LK, HQ, HK, D = 2, 5, 7, 4, 2, 8
    def make(n, seed):
        return array.array("H", (bf16_bits(((i * 7919 + seed * 104729) % 2003) / 1001.0 - 1.0) for i in range(n)))
    q, k, v = make(B * LQ * HQ * D, 1), make(B * LK * HK * D, 2), make(B * LK * HK * D, 3)
    o = array.array("f", [float("nan")] * (B * LQ * HQ * D))
    lse = array.array("f", [float("nan")] * (B * HQ * LQ))
    addr = lambda a: a.buffer_info()[0]
    bshd = lambda l, h: (l * h * D, h * D, D, 1)
    T = fa.Tensor
    lib.reference_forward(fa.DTYPE_BF16, T(addr(q), (B, LQ, HQ, D), bshd(LQ, HQ)), T(addr(k), (B, LK, HK, D), bshd(LK, HK)),
                          T(addr(v), (B, LK, HK, D), bshd(LK, HK)), T(addr(o), (B, LQ, HQ, D), bshd(LQ, HQ)),
                          T(addr(lse), (B, HQ, LQ), (HQ * LQ, LQ, 1)), causal=True)
    # The same attention here: causal, bottom-right (off = LK - LQ), GQA head h -> h // (HQ // HK).
    err, lse_err, off, scale = 0.0, 0.0, LK - LQ, 1 / math.sqrt(D)
    for b in range(B):
        for i in range(LQ):
            for h in range(HQ):
                g = h // (HQ // HK)
                qi = [bf16_value(q[((b * LQ + i) * HQ + h) * D + d]) for d in range(D)]
                s = []
                for j in range(min(LK, i + off + 1)):
                    kj = [bf16_value(k[((b * LK + j) * HK + g) * D + d]) for d in range(D)]
                    s.append(scale * sum(x * y for x, y in zip(qi, kj)))
                m = max(s)
                w = [math.exp(x - m) for x in s]
                z = sum(w)
                for d in range(D):
                    want = sum(w[j] * bf16_value(v[((b * LK + j) * HK + g) * D + d]) for j in range(len(w))) / z
                    err = max(err, abs(o[((b * LQ + i) * HQ + h) * D + d] - want))
                lse_err = max(lse_err, abs(lse[(b * HQ + h) * LQ + i] - (m + math.log(z))))
    ok = err < 1e-6 and lse_err < 1e-5
    print("%s reference_forward through ctypes: max |O - here| %.1e, max |LSE - here| %.1e" % (
        "ok  " if ok else "FAIL", err, lse_err))
    failures = 0 if ok else 1

    # The backward reference: dQ, dK, dV of sum(O * dO), here from the softmax's
    # derivative (dS = P (dP - D), D_i = sum_j P_ij dP_ij; dK and dV summed over
    # each KV head's query heads) against the ABI's, argument order included.
    d_o = make(B * LQ * HQ * D, 4)
    dq, dk, dv = (array.array("f", [float("nan")] * n) for n in (len(q), len(k), len(v)))
    lib.reference_backward(fa.DTYPE_BF16, T(addr(q), (B, LQ, HQ, D), bshd(LQ, HQ)),
                           T(addr(k), (B, LK, HK, D), bshd(LK, HK)), T(addr(v), (B, LK, HK, D), bshd(LK, HK)),
                           T(addr(d_o), (B, LQ, HQ, D), bshd(LQ, HQ)), T(addr(dq), (B, LQ, HQ, D), bshd(LQ, HQ)),
                           T(addr(dk), (B, LK, HK, D), bshd(LK, HK)), T(addr(dv), (B, LK, HK, D), bshd(LK, HK)),
                           causal=True)
    wq, wk, wv = [0.0] * len(q), [0.0] * len(k), [0.0] * len(v)
    at_q = lambda b, i, h, d: ((b * LQ + i) * HQ + h) * D + d  # noqa: E731
    at_k = lambda b, j, g, d: ((b * LK + j) * HK + g) * D + d  # noqa: E731
    for b in range(B):
        for i in range(LQ):
            for h in range(HQ):
                g, n = h // (HQ // HK), min(LK, i + off + 1)
                qi = [bf16_value(q[at_q(b, i, h, d)]) for d in range(D)]
                oi = [bf16_value(d_o[at_q(b, i, h, d)]) for d in range(D)]
                kj = [[bf16_value(k[at_k(b, j, g, d)]) for d in range(D)] for j in range(n)]
                vj = [[bf16_value(v[at_k(b, j, g, d)]) for d in range(D)] for j in range(n)]
                s = [scale * sum(x * y for x, y in zip(qi, kj[j])) for j in range(n)]
                m = max(s)
                p = [math.exp(x - m) for x in s]
                z = sum(p)
                p = [x / z for x in p]
                dp = [sum(x * y for x, y in zip(oi, vj[j])) for j in range(n)]
                dd = sum(p[j] * dp[j] for j in range(n))
                ds = [p[j] * (dp[j] - dd) for j in range(n)]
                for j in range(n):
                    for d in range(D):
                        wq[at_q(b, i, h, d)] += scale * ds[j] * kj[j][d]
                        wk[at_k(b, j, g, d)] += scale * ds[j] * qi[d]
                        wv[at_k(b, j, g, d)] += p[j] * oi[d]
    gerr = max(abs(x - y) / (1e-3 + abs(y)) for got, want in ((dq, wq), (dk, wk), (dv, wv))
               for x, y in zip(got, want))
    ok = gerr < 1e-4
    print("%s reference_backward through ctypes: max relative |grad - here| %.1e" % ("ok  " if ok else "FAIL", gerr))
    failures += 0 if ok else 1
    n = lib.backward_workspace_len(B, LQ, HQ, D)
    ok = n >= B * LQ * HQ * (D + 1)
    print("%s backward_workspace_len(%d, %d, %d, %d) = %d" % ("ok  " if ok else "FAIL", B, LQ, HQ, D, n))
    failures += 0 if ok else 1
    try:
        lib.reference_forward(7, T(addr(q), (B, LQ, HQ, D), bshd(LQ, HQ)), T(addr(k), (B, LK, HK, D), bshd(LK, HK)),
                              T(addr(v), (B, LK, HK, D), bshd(LK, HK)), T(addr(o), (B, LQ, HQ, D), bshd(LQ, HQ)))
        print("FAIL dtype 7 raised nothing")
        failures += 1
    except fa.FusedAttnError as e:
        good = "dtype" in str(e) and "INVALID_ENUM" in str(e)
        print("%s dtype 7 -> %s" % ("ok  " if good else "FAIL", e))
        failures += 0 if good else 1
    try:
        lib.open(0).close()
        print("ok   a GPU is present: opened and closed a handle")
    except fa.FusedAttnError as e:
        good = e.status != 0 and ("DRIVER" in str(e) or "DEVICE" in str(e))
        print("%s no GPU -> %s" % ("ok  " if good else "FAIL", e))
        failures += 0 if good else 1
    print("%d failure(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
