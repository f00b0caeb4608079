#!/usr/bin/env python3
"""Time PyTorch's attention implementations ("peers") on the cases of our bench.

What: for every case in OURS.json (written by our Rust bench binary), time on
this GPU
  torch_flash, torch_cudnn, torch_efficient
      F.scaled_dot_product_attention with the backend forced through
      torch.nn.attention.sdpa_kernel(SDPBackend.X), on BHSD views of BSHD
      tensors (our layout);
  flex
      torch.nn.attention.flex_attention.flex_attention compiled with
      torch.compile, with a BlockMask for the bottom-right causal / window
      predicate (run for causal and window cases only).
Timing follows DESIGN.md section 5: CUDA events around each call after a
warm-up, median over --reps runs, inputs random normal (never zeros), rotated
among enough input sets that their total is several times the L2 cache.
Where the case is small enough (B*Hq*Lq*Lk <= 2**28) each peer's output is also
compared with an f64 reference on the same inputs (relative L2 error).

A peer that cannot run a case (mask it cannot express, unsupported head dim or
dtype, out of memory, ...) is recorded as skipped with a reason; the run never
aborts for one peer. PEERS.json is rewritten after every case, so a run that is
cut short keeps what it measured.

How to run (on the GPU host, PyTorch with CUDA; triton needed only for flex):
    python3 scripts/peers.py --ours ours.json --out peers.json
    python3 scripts/peers.py --ours ours.json --out peers.json --reps 50 \\
        --only-dtype bf16 --peers torch_flash,torch_cudnn
Then: python3 scripts/report.py --ours ours.json --peers peers.json ...

Output:
    {"torch": "2.11.0", "cudnn": 91000, "cuda": "13.0", "gpu": "NVIDIA H100 ...",
     "method": {...},
     "peers": {case_name: {peer: {"ms": float|null, "skipped": str|null,
                                  "rel_l2_err": float|null, "note": str (optional)}}}}

Serving rows (ours.json "serving", written by benches/support/serving.rs):
the packed prefill (sequence lengths in "seq_lens", causal, GQA) is timed as
torch can run it without a varlen API of its own:
  torch_{flash,cudnn,efficient}_padded
      SDPA with the backend forced over the batch right-padded to the
      longest sequence (causal, so every real row sees only its own keys);
  torch_nested
      SDPA on jagged nested tensors (torch picks the backend; KV heads
      expanded to Hq before timing, as nested SDPA takes no enable_gqa);
  torch_flash_per_sequence
      one FLASH SDPA call per sequence.
The dense KV-cache row (Lq < Lk, bottom-right causal) is timed with flex;
SDPA's is_causal is top-left and cannot express it. Paged rows have no torch
peer (FlashInfer is not on the GPU host). Results go to "serving" in the
output, {row_name: {peer: {"ms", "skipped", "note"}}}.

Mechanism rows (ours.json "mechanisms", written by benches/support/mechanisms.rs):
  additive rows (issue 14: Bahdanau attention, Q' [B, Lq, H, Da], K' [B, Lk, H, Da],
  w and bias [H, Da], V [B, Lk, H, Dv]):
    torch_unfused
        the textbook formulation in BHSD layout, in eager mode:
        scores = (tanh(q'[:, :, :, None, :] + k'[:, :, None, :, :] + b) * w).sum(-1),
        the mask, softmax, @ v; it materialises [B, H, Lq, Lk, Da] temporaries;
    torch_unfused_compiled
        the same function through torch.compile (inductor may fuse the
        elementwise chain into the reduction and never store it);
    each with "peak_bytes": the inputs' bytes plus what the caching allocator
    held above them at its peak during one call (reset_peak_memory_stats /
    max_memory_allocated minus memory_allocated before the call: temporaries
    and the output), comparable with our "ours_peak_bytes" (inputs + O + LSE).
  the backward row: SDPA's backward (torch.autograd.grad of the output with a
    random dO, forward outside the timed region) per backend, forced as for the
    forward cases (torch_flash, torch_cudnn, torch_efficient).
Results go to "mechanisms" in the output, {row_name: {peer: {"ms", "skipped",
"rel_l2_err", "peak_bytes", "note"}}}. --only and --only-dtype filter these
rows by name and dtype as they do the cases.

Backward accuracy (issue 12: "no worse than 2x PyTorch's own error on the same
inputs"): for each backward row, unless --no-check, a reduced copy of its
problem (one sequence of at most 1024 tokens, at most 2 KV heads with the
row's GQA ratio, same head dim, mask and dtype; fresh N(0, 1) inputs and dO)
goes through each SDPA backend's backward and through ours (the C ABI, the
tiled kernels, the row's deterministic mode), and each dQ, dK, dV is compared
with torch autograd in float64 on the same inputs. Output: "backward_accuracy"
{row_name: {"shape": ..., "errors": {peer: max rel L2 over dQ, dK, dV or null},
"notes": {peer: why null}}}; the report sets ours beside the best torch.

Mask semantics (DESIGN.md section 1): masks are bottom-right aligned. With
off = Lk - Lq, query i sees key j iff i + off - L <= j <= i + off + R, an
unbounded side (null) being infinite. PyTorch's is_causal is top-left aligned,
so SDPA is used for causal cases only when Lq == Lk.

Only torch is needed (imported lazily, so the pure helpers below can be
imported and tested without it).
"""

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import warnings

torch = None  # imported in main(); the helpers above _import_torch are pure Python

SDPA_PEERS = ("torch_flash", "torch_cudnn", "torch_efficient")
ALL_PEERS = SDPA_PEERS + ("flex",)
# Opt-in (--peers ...,ours_capi): our kernels through the C ABI from this
# process (scripts/fused_attn_ctypes.py, libfused_attn_capi.so from
# $FUSED_ATTN_CAPI_LIB), on the very tensors and stream the peers use, timed
# by the same events: the same-process check of the Rust bench's figures.
KNOWN_PEERS = ALL_PEERS + ("ours_capi",)
SDPA_BACKEND_NAMES = {
    "torch_flash": "FLASH_ATTENTION",
    "torch_cudnn": "CUDNN_ATTENTION",
    "torch_efficient": "EFFICIENT_ATTENTION",
}
REF_MAX_ELEMS = 2 ** 28  # B*Hq*Lq*Lk above which no reference error is computed
MIN_ROTATION_BYTES = 256 << 20  # rotate inputs over at least this much memory
MAX_INPUT_SETS = 64
DEVICE = "cuda"  # the timing itself uses CUDA events; this only names where tensors live


# ----------------------------------------------------------------------------
# Pure helpers (no torch)
# ----------------------------------------------------------------------------

def _parse_bound(text):
    text = text.strip().lower()
    if text in ("", "none", "null", "inf", "+inf", "∞"):
        return None
    return int(text)


def mask_bounds(case):
    """(left, right) window bounds of a case, None meaning unbounded.

    Uses window_left/window_right when the case has them, else the mask string
    ("full", "causal", "window(L,R)")."""
    mask = str(case.get("mask", "full")).strip().lower()
    if "window_left" in case or "window_right" in case:
        return case.get("window_left"), case.get("window_right")
    if mask == "full":
        return None, None
    if mask == "causal":
        return None, 0
    m = re.fullmatch(r"window\(([^,]*),([^)]*)\)", mask.replace(" ", ""))
    if not m:
        raise ValueError("unknown mask %r" % case.get("mask"))
    return _parse_bound(m.group(1)), _parse_bound(m.group(2))


def mask_kind(left, right):
    """'full', 'causal' or 'window' from the bounds (a window (inf, 0) is causal)."""
    if left is None and right is None:
        return "full"
    if left is None and right == 0:
        return "causal"
    return "window"


def make_visible(seqlen_q, seqlen_k, left, right):
    """Bottom-right aligned visibility predicate visible(b, h, q_idx, kv_idx).

    Works on Python ints and on torch tensors (it is FlexAttention's mask_mod).
    Returns None for a full mask (nothing to mask)."""
    off = seqlen_k - seqlen_q
    if left is None and right is None:
        return None
    lo = None if left is None else off - left
    hi = None if right is None else off + right

    def visible(b, h, q_idx, kv_idx):
        if lo is None:
            return kv_idx <= q_idx + hi
        if hi is None:
            return kv_idx >= q_idx + lo
        return (kv_idx >= q_idx + lo) & (kv_idx <= q_idx + hi)

    return visible


def sdpa_mask_reason(kind, seqlen_q, seqlen_k):
    """Why SDPA cannot express this mask without a dense one, or None if it can."""
    if kind == "window":
        return "SDPA has no sliding-window without a dense mask"
    if kind == "causal" and seqlen_q != seqlen_k:
        return ("SDPA is_causal is top-left aligned; bottom-right causal with "
                "Lq != Lk needs a dense mask")
    return None


def num_input_sets(bytes_per_set, rotation_bytes):
    """How many input sets to rotate over so their total exceeds rotation_bytes."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(rotation_bytes / bytes_per_set)))


def first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return "%s: %s" % (type(exc).__name__, text.splitlines()[0][:300])


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Torch side
# ----------------------------------------------------------------------------

def _import_torch():
    global torch
    import torch as _torch
    torch = _torch


def torch_dtype(name):
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16,
             "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError("unknown dtype %r" % name)
    return table[name]


def cudnn_version():
    try:
        return torch.backends.cudnn.version()
    except Exception:
        return None


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def l2_cache_bytes():
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


class Case:
    """One case of OURS.json with its mask resolved."""

    def __init__(self, raw):
        self.raw = raw
        self.name = raw["name"]
        self.direction = raw.get("direction", "fwd")
        self.dtype_name = raw["dtype"]
        self.b = int(raw["batch"])
        self.hq = int(raw["heads_q"])
        self.hk = int(raw["heads_kv"])
        self.lq = int(raw["seqlen_q"])
        self.lk = int(raw["seqlen_k"])
        self.d = int(raw["head_dim"])
        self.left, self.right = mask_bounds(raw)
        self.kind = mask_kind(self.left, self.right)
        self.gqa = self.hk != self.hq

    def elems_per_set(self):
        return (self.b * self.lq * self.hq * self.d * 2      # Q, O
                + self.b * self.lk * self.hk * self.d * 2)   # K, V


class InputSets:
    """Rotated random-normal Q/K/V in BSHD, exposed as BHSD views."""

    def __init__(self, case, dtype, n_sets, need_grad, seed):
        gen = torch.Generator(device=DEVICE)
        gen.manual_seed(seed)
        self.sets = []
        for _ in range(n_sets):
            bshd = [
                torch.randn(case.b, case.lq, case.hq, case.d, dtype=dtype,
                            device=DEVICE, generator=gen),
                torch.randn(case.b, case.lk, case.hk, case.d, dtype=dtype,
                            device=DEVICE, generator=gen),
                torch.randn(case.b, case.lk, case.hk, case.d, dtype=dtype,
                            device=DEVICE, generator=gen),
            ]
            if need_grad:
                for t in bshd:
                    t.requires_grad_(True)
            self.sets.append(bshd)

    def __len__(self):
        return len(self.sets)

    def bhsd(self, i):
        """BHSD views (transposes, no copy) of set i."""
        return tuple(t.transpose(1, 2) for t in self.sets[i])

    def leaves(self, i):
        return tuple(self.sets[i])


def time_calls(fn, n_sets, reps, warmup):
    """Median milliseconds of fn(set_index) over reps calls, rotating the sets.

    Each call is bracketed by its own pair of CUDA events on the current stream."""
    for i in range(warmup):
        fn(i % n_sets)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        idx = (warmup + r) % n_sets
        starts[r].record()
        fn(idx)
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def visible_matrix(seqlen_q, seqlen_k, left, right):
    """[Lq, Lk] bool: which keys each query sees (None: the full mask)."""
    if mask_kind(left, right) == "full":
        return None
    i = torch.arange(seqlen_q, device=DEVICE).unsqueeze(1)
    j = torch.arange(seqlen_k, device=DEVICE).unsqueeze(0)
    return make_visible(seqlen_q, seqlen_k, left, right)(None, None, i, j)


def attention_f64(q, k, v, group, vis):
    """softmax(q k^T / sqrt(D), masked by vis) v in float64 on [.., H, L, D]
    tensors (K and V heads repeated `group` times along dim -3); rows with no
    visible key are zero, as in DESIGN.md section 1. Differentiable."""
    k, v = (t.double().repeat_interleave(group, dim=-3) for t in (k, v))
    s = torch.matmul(q.double(), k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0), v)


def reference_rel_l2(case, q, k, v, out):
    """Relative L2 error of out ([B,Hq,Lq,D]) against an f64 reference on q, k, v.

    Computed one batch element at a time; rows with no visible key are zero,
    as in DESIGN.md section 1."""
    group = case.hq // case.hk
    vis = visible_matrix(case.lq, case.lk, case.left, case.right)
    err2 = 0.0
    ref2 = 0.0
    for b in range(case.b):
        with torch.no_grad():
            ref = attention_f64(q[b].detach(), k[b].detach(), v[b].detach(), group, vis)
        err2 += (out[b].detach().double() - ref).square().sum().item()
        ref2 += ref.square().sum().item()
        del ref, qb, kb, vb
    if ref2 == 0.0:
        return None
    return math.sqrt(err2 / ref2)


def call_recording_warnings(fn):
    """Run fn(); if it raises, attach the warnings it emitted to the exception
    (SDPA explains "No available kernel" only through warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn()
        except Exception as exc:
            exc.peer_warnings = [str(w.message).strip() for w in caught]
            raise


class PeerRunner:
    def __init__(self, args):
        self.args = args
        self.F = torch.nn.functional
        from torch.nn.attention import SDPBackend, sdpa_kernel
        self.SDPBackend = SDPBackend
        self.sdpa_kernel = sdpa_kernel
        self.flex_error = None
        try:
            from torch.nn.attention.flex_attention import (create_block_mask,
                                                           flex_attention)
            self.create_block_mask = create_block_mask
            self.flex = torch.compile(flex_attention, dynamic=False)
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit",
                         "accumulated_recompile_limit", "accumulated_cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 256))
        except Exception as exc:  # flex unavailable in this build
            self.flex_error = "flex_attention unavailable: " + first_line(exc)
        self.capi = None
        self.capi_error = None

    def open_capi(self):
        """Opens the C ABI handle once; raises with the reason when it cannot."""
        if self.capi is None and self.capi_error is None:
            try:
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                import fused_attn_ctypes
                self.capi = fused_attn_ctypes.FusedAttnLib().open(torch.cuda.current_device())
            except Exception as exc:
                self.capi_error = "C ABI unavailable: " + first_line(exc)
        if self.capi_error:
            raise RuntimeError(self.capi_error)
        return self.capi

    def capi_fn(self, case):
        """Forward through the C ABI on BHSD views (read back as BSHD, no copy)."""
        self.open_capi()
        left, right = mask_bounds(case)
        kind = mask_kind(left, right)
        opts = {"causal": kind == "causal"}
        if kind not in ("full", "causal"):
            opts = {"window": (left, right)}

        def attn(q, k, v):
            qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
            o = torch.empty_like(qs, memory_format=torch.contiguous_format)
            self.capi.forward(qs, ks, vs, o, stream=torch.cuda.current_stream().cuda_stream, **opts)
            return o.transpose(1, 2)
        return attn

    def backward_accuracy(self, case, deterministic):
        """{"shape", "errors", "notes"} for a reduced copy of a backward case
        (see the module docstring); never raises."""
        group = case.hq // case.hk
        hk = min(case.hk, 2)
        hq, lq, lk = hk * group, min(case.lq, 1024), min(case.lk, 1024)
        out = {"shape": "b1 hq%d hk%d lq%d lk%d d%d %s %s" % (hq, hk, lq, lk, case.d, case.kind, case.dtype_name),
               "errors": {}, "notes": {}}
        if case.kind == "causal" and lq != lk:
            out["notes"]["all"] = "causal with Lq != Lk: SDPA's is_causal is top-left aligned"
            return out
        try:
            dtype = torch_dtype(case.dtype_name)
            gen = torch.Generator(device=DEVICE)
            gen.manual_seed(self.args.seed + 12)

            def randn(*shape):
                return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=gen)
            q, k, v, g = randn(1, hq, lq, case.d), randn(1, hk, lk, case.d), randn(1, hk, lk, case.d), \
                randn(1, hq, lq, case.d)
            # float64 reference: the same attention, differentiated by autograd.
            qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
            o = attention_f64(qd, kd, vd, group, visible_matrix(lq, lk, case.left, case.right))
            ref = torch.autograd.grad(o, (qd, kd, vd), g.double())
            del o
        except Exception as exc:
            out["notes"]["all"] = "reference: " + first_line(exc)
            free_memory()
            return out

        def rel(got):
            return max(math.sqrt((x.double() - r).square().sum().item() / max(r.square().sum().item(), 1e-300))
                       for x, r in zip(got, ref))
        for peer in SDPA_PEERS:
            reason = sdpa_mask_reason(case.kind, lq, lk)
            if reason:
                out["errors"][peer], out["notes"][peer] = None, reason
                continue
            try:
                leaves = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v))
                with self.sdpa_kernel(getattr(self.SDPBackend, SDPA_BACKEND_NAMES[peer])):
                    kk, vv = leaves[1], leaves[2]
                    if group > 1:  # expanded: every backend takes it, and the gradient sums back
                        kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
                    o = call_recording_warnings(lambda: self.F.scaled_dot_product_attention(
                        leaves[0], kk, vv, is_causal=case.kind == "causal"))
                    got = torch.autograd.grad(o, leaves, g)
                out["errors"][peer] = rel(got)
            except Exception as exc:
                out["errors"][peer], out["notes"][peer] = None, first_line(exc)
            finally:
                free_memory()
        try:
            # (capi_fn takes a grid row, not this Case: open the handle alone.)
            lib = self.open_capi().lib
            bshd = [t.transpose(1, 2) for t in (q, k, v, g)]  # the ABI's [B, L, H, D] views
            opts = {"causal": case.kind == "causal"} if case.kind in ("full", "causal") else {
                "window": (case.left, case.right)}
            o = torch.empty(1, lq, hq, case.d, dtype=dtype, device=DEVICE)
            lse = torch.empty(1, hq, lq, dtype=torch.float32, device=DEVICE)
            grads = [torch.full((1, n, h, case.d), float("nan"), dtype=dtype, device=DEVICE)
                     for n, h in ((lq, hq), (lk, hk), (lk, hk))]
            ws = torch.empty(lib.backward_workspace_len(1, lq, hq, case.d), dtype=torch.float32, device=DEVICE)
            stream = torch.cuda.current_stream().cuda_stream
            self.capi.forward(bshd[0], bshd[1], bshd[2], o, lse, stream=stream, **opts)
            self.capi.backward(bshd[0], bshd[1], bshd[2], o, lse, bshd[3], *grads, workspace=ws,
                               deterministic=deterministic, stream=stream, **opts)
            torch.cuda.synchronize()
            out["errors"]["ours_capi"] = rel([t.transpose(1, 2) for t in grads])
        except Exception as exc:
            out["errors"]["ours_capi"], out["notes"]["ours_capi"] = None, first_line(exc)
        finally:
            free_memory()
        return out

    # -- one attention callable per peer -------------------------------------

    def sdpa_fn(self, case, native_gqa):
        """SDPA on BHSD views; the backend is forced by the caller's context."""
        is_causal = case.kind == "causal"
        group = case.hq // case.hk
        F = self.F

        def attn(q, k, v):
            if case.gqa and not native_gqa:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            if case.gqa and native_gqa:
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                      enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return attn

    def flex_fn(self, case):
        visible = make_visible(case.lq, case.lk, case.left, case.right)
        block_mask = self.create_block_mask(visible, B=None, H=None, Q_LEN=case.lq,
                                            KV_LEN=case.lk, device=DEVICE)
        flex = self.flex

        def attn(q, k, v):
            return flex(q, k, v, block_mask=block_mask, enable_gqa=case.gqa)
        return attn

    # -- measuring -----------------------------------------------------------

    def measure(self, case, attn, inputs, check):
        """Time attn on the rotated inputs; returns (ms, rel_l2_err, notes).

        A failure of the reference check does not discard the timing."""
        args = self.args
        if case.direction == "fwd":
            def call(i):
                return attn(*inputs.bhsd(i))
            err, notes = None, []
            with torch.no_grad():
                ms = time_calls(call, len(inputs), args.reps, args.warmup)
                if check:
                    try:
                        q, k, v = inputs.bhsd(0)
                        err = reference_rel_l2(case, q, k, v, attn(q, k, v))
                    except Exception as exc:
                        notes.append("reference check failed: " + first_line(exc))
                        free_memory()
            return ms, err, notes
        if case.direction == "bwd":
            outs, grads = [], []
            for i in range(len(inputs)):
                out = attn(*inputs.bhsd(i))
                outs.append(out)
                grads.append(torch.randn_like(out))

            def call(i):
                return torch.autograd.grad(outs[i], inputs.leaves(i), grads[i],
                                           retain_graph=True)
            ms = time_calls(call, len(inputs), args.reps, args.warmup)
            del outs, grads
            return ms, None, []
        raise ValueError("unknown direction %r" % case.direction)

    def run_peer(self, peer, case, inputs, check):
        """Result dict for one peer on one case; never raises."""
        result = {"ms": None, "skipped": None, "rel_l2_err": None}
        if peer == "ours_capi":
            if case.direction != "fwd":
                result["skipped"] = "the C ABI peer times the forward only"
                return result
            try:
                attn = self.capi_fn(case)
                call_recording_warnings(lambda: attn(*inputs.bhsd(0)))
                torch.cuda.synchronize()
                ms, err, notes = self.measure(case, attn, inputs, check)
                result.update({"ms": ms, "rel_l2_err": err})
                if notes:
                    result["note"] = "; ".join(notes)
            except Exception as exc:
                result["skipped"] = first_line(exc)
            finally:
                free_memory()
            return result
        if peer in SDPA_PEERS:
            reason = sdpa_mask_reason(case.kind, case.lq, case.lk)
            if reason:
                result["skipped"] = reason
                return result
            attempts = [True, False] if case.gqa else [True]
        else:
            if self.flex_error:
                result["skipped"] = self.flex_error
                return result
            if case.kind == "full":
                result["skipped"] = "flex run only for causal and window masks"
                return result
            attempts = [True]
        reasons = []
        for native_gqa in attempts:
            try:
                if peer == "flex":
                    torch._dynamo.reset()  # one compiled graph per case
                    attn = self.flex_fn(case)
                    backend = contextlib.nullcontext()
                else:
                    attn = self.sdpa_fn(case, native_gqa)
                    backend = self.sdpa_kernel(
                        getattr(self.SDPBackend, SDPA_BACKEND_NAMES[peer]))
                with backend:
                    # First call alone, to catch SDPA's "not used because" warnings.
                    with torch.set_grad_enabled(case.direction == "bwd"):
                        call_recording_warnings(lambda: attn(*inputs.bhsd(0)))
                    torch.cuda.synchronize()
                    ms, err, notes = self.measure(case, attn, inputs, check)
                result["ms"] = ms
                result["rel_l2_err"] = err
                if not native_gqa:
                    notes.insert(0, "no native GQA: KV heads expanded to Hq "
                                    "(repeat_interleave) inside the timed call")
                if notes:
                    result["note"] = "; ".join(notes)
                return result
            except Exception as exc:
                reason = first_line(exc)
                hints = [m.splitlines()[0] for m in getattr(exc, "peer_warnings", [])]
                if peer in SDPA_PEERS and hints:  # SDPA's "... not used because ..."
                    reason += " (" + "; ".join(hints)[:400] + ")"
                reasons.append(reason)
            finally:
                free_memory()
        result["skipped"] = " / then, with KV expanded: ".join(reasons)
        return result


SERVING_PEERS = ("torch_flash_padded", "torch_cudnn_padded", "torch_efficient_padded",
                 "torch_nested", "torch_flash_per_sequence", "flex")
DECODE_PEERS = ("torch_flash", "torch_cudnn", "torch_efficient", "read_kv_once")


def serving_peers(runner, row, args):
    """{peer: result} for one serving row of ours.json; never raises."""
    F = runner.F
    out = {}
    lens = row.get("seq_lens")
    hq, hk, d = int(row.get("heads_q", 0)), int(row.get("heads_kv", 0)), int(row.get("head_dim", 0))
    dtype = torch.bfloat16
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(args.seed)

    def attempt(peer, make):
        r = {"ms": None, "skipped": None, "rel_l2_err": None}
        try:
            fn, backend, note = make()
            with backend:
                with torch.no_grad():
                    call_recording_warnings(fn)
                    torch.cuda.synchronize()
                    r["ms"] = time_calls(lambda _i: fn(), 1, args.reps, args.warmup)
            if note:
                r["note"] = note
        except Exception as exc:
            reason = first_line(exc)
            hints = [m.splitlines()[0] for m in getattr(exc, "peer_warnings", [])]
            if hints:
                reason += " (" + "; ".join(hints)[:400] + ")"
            r["skipped"] = reason
        finally:
            free_memory()
        out[peer] = r

    def skip_all(reason, peers=SERVING_PEERS):
        for peer in peers:
            out[peer] = {"ms": None, "skipped": reason, "rel_l2_err": None}

    if row.get("decode"):
        # One query per sequence: bottom-right causal sees every key, so SDPA
        # without a mask computes it. Dense rows of the plain call only (the
        # split and paged rows are the same problem for torch).
        if row.get("page") or row.get("splits", 1) > 1:
            skip_all("peers timed on the dense, unsplit row of this shape", DECODE_PEERS)
            return out
        b, lk = int(row["batch"]), int(row["cache_len"])
        q = torch.randn(b, hq, 1, d, dtype=dtype, device=DEVICE, generator=gen)
        k = torch.randn(b, hk, lk, d, dtype=dtype, device=DEVICE, generator=gen)
        v = torch.randn(b, hk, lk, d, dtype=dtype, device=DEVICE, generator=gen)
        for peer, backend_name in (("torch_flash", "FLASH_ATTENTION"), ("torch_cudnn", "CUDNN_ATTENTION"),
                                   ("torch_efficient", "EFFICIENT_ATTENTION")):
            def make(backend_name=backend_name):
                backend = runner.sdpa_kernel(getattr(runner.SDPBackend, backend_name))
                return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk), backend,
                        "enable_gqa" if hq != hk else None)
            attempt(peer, make)

        def make_floor():
            return (lambda: (k.sum(), v.sum()), contextlib.nullcontext(),
                    "torch.sum over K and V: the bandwidth floor of reading them once")
        attempt("read_kv_once", make_floor)
        kv_bytes = 2 * b * lk * hk * d * 2
        for r in out.values():
            if r.get("ms"):
                r["gbps"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
        del q, k, v
        free_memory()
        return out
    if lens and row.get("mask") == "causal":
        lmax, nseq = max(lens), len(lens)
        group = hq // hk
        # Packed, as ours gets it: [T, H, D].
        t = sum(lens)
        q = torch.randn(t, hq, d, dtype=dtype, device=DEVICE, generator=gen)
        k = torch.randn(t, hk, d, dtype=dtype, device=DEVICE, generator=gen)
        v = torch.randn(t, hk, d, dtype=dtype, device=DEVICE, generator=gen)
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)

        def padded(x, heads):
            p = torch.zeros(nseq, lmax, heads, d, dtype=dtype, device=DEVICE)
            for i, n in enumerate(lens):
                p[i, :n] = x[offs[i]:offs[i + 1]]
            return p.transpose(1, 2)  # BHSD view
        for peer, backend_name in (("torch_flash_padded", "FLASH_ATTENTION"),
                                   ("torch_cudnn_padded", "CUDNN_ATTENTION"),
                                   ("torch_efficient_padded", "EFFICIENT_ATTENTION")):
            def make(backend_name=backend_name):
                qp, kp, vp = padded(q, hq), padded(k, hk), padded(v, hk)
                backend = runner.sdpa_kernel(getattr(runner.SDPBackend, backend_name))
                note = "right-padded to %d (%.2fx the tokens)" % (lmax, nseq * lmax / t)
                try:
                    with backend:
                        F.scaled_dot_product_attention(qp[:1, :, :16], kp[:1, :, :16], vp[:1, :, :16],
                                                       is_causal=True, enable_gqa=True)
                    fn = lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
                except Exception:
                    ke = kp.repeat_interleave(group, dim=1)
                    ve = vp.repeat_interleave(group, dim=1)
                    fn = lambda: F.scaled_dot_product_attention(qp, ke, ve, is_causal=True)
                    note += "; no native GQA: KV heads expanded before timing"
                return fn, backend, note
            attempt(peer, make)

        def make_nested():
            ke = k.repeat_interleave(group, dim=1)
            ve = v.repeat_interleave(group, dim=1)
            offsets = torch.tensor(offs, device=DEVICE, dtype=torch.int64)
            nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x, offsets) for x in (q, ke, ve))
            nq, nk, nv = (x.transpose(1, 2) for x in (nq, nk, nv))  # [B, H, j, D]
            fn = lambda: F.scaled_dot_product_attention(nq, nk, nv, is_causal=True)
            return fn, contextlib.nullcontext(), "KV heads expanded to Hq before timing; backend chosen by torch"
        attempt("torch_nested", make_nested)

        def make_per_seq():
            views = []
            for i, n in enumerate(lens):
                sl = slice(offs[i], offs[i + 1])
                views.append((q[sl].transpose(0, 1).unsqueeze(0), k[sl].transpose(0, 1).unsqueeze(0),
                              v[sl].transpose(0, 1).unsqueeze(0)))
            backend = runner.sdpa_kernel(runner.SDPBackend.FLASH_ATTENTION)

            def fn():
                for a, b, c in views:
                    F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
            return fn, backend, "%d calls" % nseq
        attempt("torch_flash_per_sequence", make_per_seq)
        skip_all("flex not run for packed batches", ("flex",))
        del q, k, v
        free_memory()
        return out
    if row.get("page") == 0 and row.get("cache_len"):
        b, lq, lk = int(row["batch"]), int(row["seqlen_q"]), int(row["cache_len"])
        skip_all("SDPA's is_causal is top-left; the cache needs bottom-right", SERVING_PEERS[:5])
        if runner.flex_error:
            skip_all(runner.flex_error, ("flex",))
            return out

        def make_flex():
            torch._dynamo.reset()
            qx = torch.randn(b, hq, lq, d, dtype=dtype, device=DEVICE, generator=gen)
            kx = torch.randn(b, hk, lk, d, dtype=dtype, device=DEVICE, generator=gen)
            vx = torch.randn(b, hk, lk, d, dtype=dtype, device=DEVICE, generator=gen)
            visible = make_visible(lq, lk, None, 0)
            bm = runner.create_block_mask(visible, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device=DEVICE)
            return (lambda: runner.flex(qx, kx, vx, block_mask=bm, enable_gqa=hq != hk),
                    contextlib.nullcontext(), "dense cache, bottom-right causal block mask")
        attempt("flex", make_flex)
        return out
    skip_all("no torch peer for this row (paged caches: FlashInfer is not on the GPU host)")
    return out


ADDITIVE_PEERS = ("torch_unfused", "torch_unfused_compiled")


def additive_unfused(q, k, v, w, b, visible):
    """Unfused additive attention, the way it is written without a kernel.

    q [B, H, Lq, Da], k [B, H, Lk, Da], v [B, H, Lk, Dv], w and b [H, Da] (b may
    be None), visible a bool [Lq, Lk] or None. One expression per branch, so
    eager mode frees each [B, H, Lq, Lk, Da] temporary as soon as the next
    one is made (at most two live at once)."""
    wb = w[None, :, None, None, :]
    if b is None:
        scores = (torch.tanh(q[:, :, :, None, :] + k[:, :, None, :, :]) * wb).sum(-1)
    else:
        scores = (torch.tanh(q[:, :, :, None, :] + k[:, :, None, :, :] + b[None, :, None, None, :])
                  * wb).sum(-1)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def peak_extra_bytes(fn):
    """Bytes the caching allocator held above its level before fn() at the
    peak of one call (fn's temporaries and its output)."""
    free_memory()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return extra


def mechanism_peers(runner, row, args):
    """{peer: result} for one mechanisms row of ours.json; never raises."""
    out = {}
    kind = row.get("mechanism")
    if kind == "backward":
        try:
            case = Case(row)
        except Exception as exc:
            reason = "row: " + first_line(exc)
            return {p: {"ms": None, "skipped": reason, "rel_l2_err": None} for p in SDPA_PEERS}
        return run_case(runner, case, SDPA_PEERS, args)
    if kind != "additive":
        return {"torch": {"ms": None, "skipped": "no torch peer for mechanism %r" % kind,
                          "rel_l2_err": None}}

    def skip_all(reason):
        return {p: {"ms": None, "skipped": reason, "rel_l2_err": None} for p in ADDITIVE_PEERS}
    tensors = None
    try:
        dtype = torch_dtype(row["dtype"])
        b, h = int(row["batch"]), int(row["heads"])
        lq, lk = int(row["seqlen_q"]), int(row["seqlen_k"])
        da, dv = int(row["dim_a"]), int(row["dim_v"])
        left, right = mask_bounds(row)
        gen = torch.Generator(device=DEVICE)
        gen.manual_seed(args.seed)

        def randn(*shape, mult=1.0):
            return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=gen) * mult
        # Scaled as ours: w by 1/sqrt(Da), everything else N(0, 1).
        tensors = [randn(b, h, lq, da), randn(b, h, lk, da), randn(b, h, lk, dv),
                   randn(h, da, mult=1.0 / math.sqrt(da)),
                   randn(h, da) if row.get("bias") else None]
        tensors.append(visible_matrix(lq, lk, left, right))
        input_bytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    except Exception as exc:
        tensors = None
        free_memory()
        return skip_all("inputs: " + first_line(exc))

    for peer in ADDITIVE_PEERS:
        r = {"ms": None, "skipped": None, "rel_l2_err": None}
        try:
            with torch.no_grad():
                if peer == "torch_unfused":
                    fn = additive_unfused
                    note = "eager; [B, H, Lq, Lk, Da] temporaries"
                else:
                    torch._dynamo.reset()
                    fn = torch.compile(additive_unfused, dynamic=False)
                    note = "torch.compile (inductor, default mode)"
                call_recording_warnings(lambda: fn(*tensors))  # compiles, if it does
                torch.cuda.synchronize()
                r["ms"] = time_calls(lambda _i: fn(*tensors), 1, args.reps, args.warmup)
                extra = peak_extra_bytes(lambda: fn(*tensors))
                r["peak_bytes"] = input_bytes + extra
                r["note"] = note + "; peak = inputs %d B + %d B allocated during the call" % (
                    input_bytes, extra)
        except Exception as exc:
            r["ms"] = None
            r["skipped"] = first_line(exc)
        finally:
            free_memory()
        out[peer] = r
    tensors.clear()  # release the inputs before the next row allocates
    free_memory()
    return out


def run_case(runner, case, peers, args):
    out = {}
    try:
        dtype = torch_dtype(case.dtype_name)
    except ValueError as exc:
        return {p: {"ms": None, "skipped": str(exc), "rel_l2_err": None} for p in peers}
    elem_bytes = torch.tensor([], dtype=dtype).element_size()
    bytes_per_set = case.elems_per_set() * elem_bytes
    rotation = max(MIN_ROTATION_BYTES, 4 * l2_cache_bytes())
    n_sets = num_input_sets(bytes_per_set, rotation)
    check = (not args.no_check and case.direction == "fwd"
             and case.b * case.hq * case.lq * case.lk <= REF_MAX_ELEMS)
    inputs = None
    try:
        inputs = InputSets(case, dtype, n_sets, case.direction == "bwd",
                           seed=args.seed)
    except Exception as exc:
        reason = "inputs: " + first_line(exc)
        free_memory()
        return {p: {"ms": None, "skipped": reason, "rel_l2_err": None} for p in peers}
    try:
        for peer in peers:
            out[peer] = runner.run_peer(peer, case, inputs, check)
    finally:
        del inputs
        free_memory()
    return out


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def fmt_result(peer, r):
    if r["ms"] is not None:
        return "%s %.3f ms" % (peer, r["ms"])
    return "%s skip" % peer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True, help="ours.json from the Rust bench")
    ap.add_argument("--out", required=True, help="peers.json to write")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per peer (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    ap.add_argument("--only-dtype", help="only cases of this dtype (e.g. bf16)")
    ap.add_argument("--only", help="only cases whose name contains this text")
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help="comma-separated subset of " + ",".join(ALL_PEERS))
    ap.add_argument("--no-check", action="store_true",
                    help="skip the reference error computation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in KNOWN_PEERS]
    if unknown:
        ap.error("unknown peers: %s" % ", ".join(unknown))
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")

    with open(args.ours) as f:
        ours = json.load(f)
    cases = [Case(c) for c in ours.get("cases", [])]
    if args.only_dtype:
        cases = [c for c in cases if c.dtype_name == args.only_dtype]
    if args.only:
        cases = [c for c in cases if args.only in c.name]

    _import_torch()
    if not torch.cuda.is_available():
        log("peers.py: no CUDA device visible to PyTorch; nothing to time")
        return 2
    gpu = torch.cuda.get_device_name(0)
    if ours.get("gpu") and ours["gpu"] != gpu:
        log("peers.py: warning: ours.json was measured on %r, this is %r"
            % (ours["gpu"], gpu))
    result = {
        "torch": torch.__version__,
        "cudnn": cudnn_version(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "method": {"reps": args.reps, "warmup": args.warmup, "stat": "median",
                   "timer": "cuda events per call",
                   "rotation_bytes": max(MIN_ROTATION_BYTES, 4 * l2_cache_bytes()),
                   "reference": "f64, B*Hq*Lq*Lk <= 2**28"},
        "peers": {},
    }
    runner = PeerRunner(args)
    if runner.flex_error:
        log("peers.py: " + runner.flex_error)
    for n, case in enumerate(cases, 1):
        t0 = time.time()
        res = run_case(runner, case, peers, args)
        result["peers"][case.name] = res
        write_json(args.out, result)
        log("[%d/%d] %s: %s (%.1f s)" % (
            n, len(cases), case.name,
            ", ".join(fmt_result(p, res[p]) for p in peers), time.time() - t0))
    if not args.only and not args.only_dtype:
        result["serving"] = {}
        for row in ours.get("serving", []):
            t0 = time.time()
            res = serving_peers(runner, row, args)
            result["serving"][row["name"]] = res
            write_json(args.out, result)
            log("[serving] %s: %s (%.1f s)" % (
                row["name"], ", ".join(fmt_result(p, r) for p, r in res.items()), time.time() - t0))
    result["mechanisms"] = {}
    for row in ours.get("mechanisms", []):
        if args.only and args.only not in row.get("name", ""):
            continue
        if args.only_dtype and row.get("dtype") != args.only_dtype:
            continue
        t0 = time.time()
        try:
            res = mechanism_peers(runner, row, args)
        except Exception as exc:  # a bad row must not cost the rows after it
            res = {"torch": {"ms": None, "skipped": "row: " + first_line(exc), "rel_l2_err": None}}
            free_memory()
        result["mechanisms"][row.get("name", "?")] = res
        if row.get("mechanism") == "backward" and not args.no_check:
            try:
                acc = runner.backward_accuracy(Case(row), "deterministic" in row.get("name", ""))
            except Exception as exc:  # never raises, but a bad row must not stop the run
                acc = {"errors": {}, "notes": {"all": first_line(exc)}}
            result.setdefault("backward_accuracy", {})[row.get("name", "?")] = acc
            log("[backward accuracy] %s: %s" % (row.get("name"), acc))
        write_json(args.out, result)
        log("[mechanisms] %s: %s (%.1f s)" % (
            row.get("name"), ", ".join(fmt_result(p, r) for p, r in res.items()), time.time() - t0))
    write_json(args.out, result)
    log("peers.py: wrote %s (%d cases)" % (args.out, len(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
