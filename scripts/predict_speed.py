#!/usr/bin/env python3
"""Predicted-speed table (issue 9, item 4): for each forward kernel the
dispatcher runs on an H100, the bound its hot loop cannot beat, from the
static counts of scripts/sass_report.py and the H100's rates; then, per case
of a measured benchmark report (DESIGN.md section 5's grid), the predicted
ceiling beside the measured TFLOP/s.

Usage (after a build with nvcc, as for sass_report.py):

    python3 scripts/predict_speed.py --measured bench-results/<run>.json --out docs/predicted-speed.md
    python3 scripts/predict_speed.py --report-json report.json ...   # counts from sass_report.py --json

Model (per CTA and key tile; every input is printed with the table):
  tensor cycles = 4 * block_m * block_n * D / (FLOP per clock per SM)
                  (wgmma on sm_90a; mma.sync at half that rate: an assumption,
                  not a measured H100 figure)
  exp cycles    = (block_m * block_n + 2 * block_m) / 16 MUFU lanes per clock
                  (one EX2 per score and two rescales per row: the softmax
                  needs them on every path)
  tile cycles   = the larger of the two: two pipes no schedule can avoid, so
                  the ceiling is a true upper bound on speed
  issue cycles  = warps running the loop * hot-loop instructions / 4
                  schedulers, shown beside but NOT in the bound: the static
                  count takes both sides of every branch (softcap's tanh,
                  ALiBi, masked edges), which the first H100 run showed to
                  overstate the plain path by up to 1.7x (measured speeds
                  above that bound); a path-aware count is still to come
Per case: key tiles visited summed over CTAs (exact per row block: causal
masks are triangular), spread over 132 SMs, but never below the longest
CTA's tiles on one SM; FLOPs as the benchmark counts them.
Static counts take both sides of every branch in the loop (ALiBi, softcap,
masked edges), so the issue bound is pessimistic by up to ~10 %.
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H100 = {
    "sms": 132,
    "clock_ghz": 1.755,                # sustained boost under tensor load (spec max 1.98)
    "wgmma_flop_per_clk_sm": 4096,     # 989 TFLOP/s dense f16/bf16 at 1.83 GHz over 132 SMs
    "mma_sync_flop_per_clk_sm": 2048,  # assumption: half of wgmma
    "issue_per_clk_sm": 4,             # one warp instruction per scheduler
    "mufu_lanes_per_clk_sm": 16,
}


def kernel_bound(k):
    """(cycles per key tile per CTA, limiter, the terms, FLOPs per tile) of one kernel row."""
    c = k["hot_loop"]["counts"]
    warps = k["threads"] // 32
    sm90 = k["arch"].startswith("sm_90")
    if sm90:
        warps -= 4  # the producer warpgroup runs no hot loop
    rate = H100["wgmma_flop_per_clk_sm"] if sm90 else H100["mma_sync_flop_per_clk_sm"]
    bm, bn = k["block_m"], k["block_n"]
    flops = 4 * bm * bn * k["head_dim"]
    terms = {
        "tensor": flops / rate,
        "exp": (bm * bn + 2 * bm) / H100["mufu_lanes_per_clk_sm"],
    }
    lim = max(terms, key=terms.get)
    terms["issue (static)"] = warps * c["total"] / H100["issue_per_clk_sm"]
    return terms[lim], lim, terms, flops


def case_tiles(L, bm, bn, causal):
    """Key tiles per row block of one (batch, head): a list over row blocks."""
    out = []
    for mb in range(math.ceil(L / bm)):
        last_row = min(L, (mb + 1) * bm) - 1
        keys = last_row + 1 if causal else L
        out.append(math.ceil(keys / bn))
    return out


def predict(case, k):
    cyc, _, _, _ = kernel_bound(k)
    tiles = case_tiles(case["seqlen_q"], k["block_m"], k["block_n"], case["mask"] == "causal")
    per_bh = sum(tiles)
    total = per_bh * case["batch"] * case["heads_q"]
    cycles = max(total * cyc / H100["sms"], max(tiles) * cyc)
    seconds = cycles / (H100["clock_ghz"] * 1e9)
    return case["flops"] / seconds / 1e12


def sass_json():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sass_report.py"), "--json", "-"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("sass_report.py failed:\n" + r.stderr)
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report-json", help="sass_report.py --json output (default: run it on the newest build)")
    ap.add_argument("--measured", help="a committed benchmark report (bench-results/*.json) to put beside")
    ap.add_argument("--out", help="write markdown here (default: stdout)")
    a = ap.parse_args()
    rep = json.load(open(a.report_json)) if a.report_json else sass_json()
    kernels = {k["kernel"]: k for k in rep["kernels"]
               if k.get("hot_loop") and k.get("threads") and k.get("block_m") and not k["variant"]}
    lines = ["# Predicted speed (static ceilings) beside measured", "",
             "Generated by `scripts/predict_speed.py`; do not edit by hand. Model and inputs: the script's",
             "docstring. H100: " + ", ".join(f"{k} {v}" for k, v in H100.items()) + ".",
             "Built with: `" + rep["meta"].get("nvcc", "?") + "`.", "",
             "## Per kernel (one CTA, one key tile)", "",
             "| kernel | block | warps in loop | loop instr (static) | tensor clk | exp clk | issue clk (static) | limiter | ceiling TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(kernels):
        k = kernels[name]
        if not name.startswith(("fa_fwd_sm90_", "fa_fwd_sm80_")) or name.endswith(("_paged", "_decode", "_99k")):
            continue
        cyc, lim, t, flops = kernel_bound(k)
        c = k["hot_loop"]["counts"]
        warps = k["threads"] // 32 - (4 if k["arch"].startswith("sm_90") else 0)
        ceiling = flops / cyc * H100["clock_ghz"] * 1e9 * H100["sms"] / 1e12
        lines.append(f"| `{name}` | {k['block_m']}x{k['block_n']} | {warps} | {c['total']} | "
                     f"{t['tensor']:.0f} | {t['exp']:.0f} | {t['issue (static)']:.0f} | {lim} | {ceiling:.0f} |")
    if a.measured:
        m = json.load(open(a.measured))
        lines += ["", f"## Per case: measured ({os.path.basename(a.measured)}, commit {m.get('commit', '?')[:7]}, "
                  f"{m.get('gpu', '?')}) against today's ceiling", "",
                  "The measured run's kernels may predate today's build (see its commit); the ceiling uses",
                  "today's counts for the kernel it ran.", "",
                  "| case | kernel | measured TFLOP/s | ceiling TFLOP/s | measured / ceiling |", "|---|---|---|---|---|"]
        for case in m["cases"]:
            k = kernels.get(case["kernel"])
            if k is None or case["mask"] not in ("full", "causal"):
                continue
            p = predict(case, k)
            lines.append(f"| {case['name']} | `{case['kernel']}` | {case['ours_tflops']:.0f} | {p:.0f} | "
                         f"{case['ours_tflops'] / p:.2f} |")
    doc = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(doc)
    else:
        sys.stdout.write(doc)


if __name__ == "__main__":
    main()
