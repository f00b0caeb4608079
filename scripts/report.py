#!/usr/bin/env python3
"""Merge our bench results with the PyTorch peers into a committed report.

What: reads OURS.json (our Rust bench binary) and PEERS.json (scripts/peers.py,
same GPU) and writes, per DESIGN.md section 5,
    <out-dir>/<date>-<gpu>-<shortsha>.json   metadata + every case, with the
                                             peers' times, TFLOP/s and ratios
    <out-dir>/<date>-<gpu>-<shortsha>.md     one table row per case
    <out-dir>/<date>-<gpu>-<shortsha>.png    TFLOP/s vs sequence length
                                             (needs matplotlib; skipped with a
                                             warning when it is missing)
    <out-dir>/<date>-<gpu>-<shortsha>-tests.log   copy of --log, if given
<gpu> is "h100", "h200", ... when the GPU name contains such a model, else the
sanitized name; <shortsha> is the first 7 hex digits of the commit, with
"-dirty" when the tree was dirty.

The "serving" and "mechanisms" arrays of OURS.json (when present) get their
own sections: "Serving cases" and "Mechanisms" (fused additive attention
against unfused torch, time and peak memory; the baseline backward against
SDPA's backward). Mechanisms rows also get memory_vs_<peer> = peer peak bytes
/ our peak bytes where both are known.

Ratios are ours_vs_<peer> = peer_ms / ours_ms: above 1 means ours is faster.
A peer's TFLOP/s uses our exact FLOP count of the case (same work).

How to run (anywhere; stdlib only, matplotlib optional):
    python3 scripts/report.py --ours ours.json --peers peers.json \\
        --out-dir bench-results [--log gpu-tests.log] [--date YYYY-MM-DD]
Tests: python3 scripts/test_report.py
"""

import argparse
import datetime
import json
import os
import re
import shutil
import sys

# Peers in display order; any other peer found in PEERS.json follows, sorted.
KNOWN_PEERS = ("torch_flash", "torch_cudnn", "torch_efficient", "flex")
PEER_LABELS = {"torch_flash": "flash", "torch_cudnn": "cudnn",
               "torch_efficient": "efficient", "flex": "flex"}
# Speedup columns of the Markdown table.
SPEEDUP_PEERS = ("torch_flash", "torch_cudnn")
# GPU models recognised in a device name, most specific first.
GPU_MODELS = ("gh200", "gb200", "b200", "b100", "h200", "h100", "h800", "h20",
              "a100", "a800", "a10g", "l40s", "l40", "l4")


def gpu_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'h100'; unknown names -> sanitized lowercase."""
    low = (name or "unknown").lower()
    for model in GPU_MODELS:
        if re.search(r"(?<![a-z0-9])" + model + r"(?![a-z0-9])", low):
            return model
    slug = re.sub(r"[^a-z0-9]+", "-", low).strip("-")
    slug = re.sub(r"^nvidia-", "", slug)
    return slug or "unknown"


def short_sha(commit, dirty):
    sha = (commit or "unknown")[:7]
    return sha + "-dirty" if dirty else sha


def report_stem(date, gpu, commit, dirty):
    return "%s-%s-%s" % (date, gpu_slug(gpu), short_sha(commit, dirty))


def tflops(flops, ms):
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def peer_order(names):
    names = set(names)
    return [p for p in KNOWN_PEERS if p in names] + sorted(names - set(KNOWN_PEERS))


def merge_case(case, peer_results):
    """Our case with peers, peers_skipped, peer_tflops, peers_rel_l2_err,
    peers_notes and ratios merged in."""
    merged = dict(case)
    peer_results = peer_results or {}
    ours_ms = case.get("ours_ms")
    flops = case.get("flops")
    peers, skipped, peer_tf, errs, notes, ratios = {}, {}, {}, {}, {}, {}
    for peer in peer_order(peer_results):
        r = peer_results[peer] or {}
        ms = r.get("ms")
        peers[peer] = ms
        if r.get("skipped"):
            skipped[peer] = r["skipped"]
        if r.get("note"):
            notes[peer] = r["note"]
        peer_tf[peer] = tflops(flops, ms)
        errs[peer] = r.get("rel_l2_err")
        ratios["ours_vs_" + peer] = (ms / ours_ms if ms is not None and ours_ms
                                     else None)
    merged.update(peers=peers, peers_skipped=skipped, peer_tflops=peer_tf,
                  peers_rel_l2_err=errs, ratios=ratios)
    if notes:
        merged["peers_notes"] = notes
    if ours_ms is not None and merged.get("ours_tflops") is None:
        merged["ours_tflops"] = tflops(flops, ours_ms)
    return merged


def merge_serving(row, peer_results):
    """A serving row with its peers' results and the fastest peer that ran."""
    merged = {k: v for k, v in row.items() if k != "seq_lens"}
    merged["peers"] = peer_results
    ran = [(r["ms"], p) for p, r in peer_results.items() if r.get("ms") is not None]
    if ran:
        ms, peer = min(ran)
        merged["best_peer"] = peer
        merged["best_peer_ms"] = ms
        merged["ours_vs_best_peer"] = ms / row["ours_ms"] if row.get("ours_ms") else None
    return merged


def merge_mechanism(row, peer_results):
    """A mechanisms row (additive attention, backward baseline) with its peers'
    results, ours_vs_<peer> = peer ms / our ms and, where both peak memories
    are known, memory_vs_<peer> = peer peak bytes / our peak bytes."""
    merged = dict(row)
    peer_results = peer_results or {}
    merged["peers"] = peer_results
    ours_ms, ours_bytes = row.get("ours_ms"), row.get("ours_peak_bytes")
    ratios, memory = {}, {}
    for peer, r in peer_results.items():
        r = r or {}
        ms, peak = r.get("ms"), r.get("peak_bytes")
        ratios["ours_vs_" + peer] = ms / ours_ms if ms is not None and ours_ms else None
        if peak is not None and ours_bytes:
            memory["memory_vs_" + peer] = peak / ours_bytes
    merged["ratios"] = ratios
    if memory:
        merged["memory_ratios"] = memory
    return merged


def build_report(ours, peers, date):
    peer_cases = peers.get("peers", {})
    report = {
        "commit": ours.get("commit"),
        "dirty": bool(ours.get("dirty", False)),
        "date": date,
        "gpu": ours.get("gpu"),
        "driver": ours.get("driver"),
        "cuda": ours.get("cuda"),
        "torch": peers.get("torch"),
        "cudnn": peers.get("cudnn"),
        "torch_cuda": peers.get("cuda"),
        "peers_gpu": peers.get("gpu"),
        "peers_method": peers.get("method"),
        "cases": [merge_case(c, peer_cases.get(c["name"])) for c in ours.get("cases", [])],
        "serving": [merge_serving(c, peers.get("serving", {}).get(c["name"], {}))
                    for c in ours.get("serving", [])],
        "mechanisms": [merge_mechanism(c, peers.get("mechanisms", {}).get(c["name"], {}))
                       for c in ours.get("mechanisms", [])],
        "backward_accuracy": peers.get("backward_accuracy", {}),
    }
    warnings = []
    if peers.get("gpu") and ours.get("gpu") and peers["gpu"] != ours["gpu"]:
        warnings.append("peers measured on %r, ours on %r: ratios are not comparable"
                        % (peers["gpu"], ours["gpu"]))
    missing = [c["name"] for c in ours.get("cases", []) if c["name"] not in peer_cases]
    if missing:
        warnings.append("%d case(s) have no peer results" % len(missing))
    report["warnings"] = warnings
    return report


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def _f(value, fmt, missing="—"):
    return missing if value is None else fmt % value


def shape_text(c):
    return "%d, %d/%d, %d/%d, %d" % (c["batch"], c["heads_q"], c["heads_kv"],
                                     c["seqlen_q"], c["seqlen_k"], c["head_dim"])


def markdown(report):
    cases = report["cases"]
    peers = peer_order({p for c in cases for p in c["peers"]})
    dirty = " (dirty)" if report["dirty"] else ""
    lines = [
        "# Attention benchmark — %s — %s" % (report["gpu"], report["date"]),
        "",
        "- commit: `%s`%s" % (report["commit"], dirty),
        "- GPU: %s, driver %s, CUDA %s" % (report["gpu"], report["driver"], report["cuda"]),
        "- PyTorch %s (CUDA %s), cuDNN %s" % (report["torch"], report["torch_cuda"],
                                              report["cudnn"]),
        "- times: median of CUDA-event timings after warm-up; TFLOP/s from the exact "
        "count of visible (i, j) pairs; speedup = peer ms / our ms (> 1: ours faster)",
    ]
    for w in report.get("warnings", []):
        lines.append("- **warning:** " + w)
    lines.append("")

    head = (["shape (B, Hq/Hkv, Lq/Lk, D)", "mask", "dtype", "dir", "kernel", "GFLOP",
             "ours ms", "ours TFLOP/s"]
            + ["%s TFLOP/s" % PEER_LABELS.get(p, p) for p in peers]
            + ["× %s" % PEER_LABELS[p] for p in SPEEDUP_PEERS]
            + ["rel L2 err"])
    if cases:  # a filtered run (e.g. mechanisms only) has no grid rows
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|")
    for c in cases:
        row = [shape_text(c), c.get("mask", ""), c.get("dtype", ""),
               c.get("direction", "fwd"), "`%s`" % c.get("kernel", ""),
               _f(c.get("flops") and c["flops"] / 1e9, "%.1f"),
               _f(c.get("ours_ms"), "%.3f"), _f(c.get("ours_tflops"), "%.1f")]
        row += [_f(c["peer_tflops"].get(p), "%.1f") for p in peers]
        row += [_f(c["ratios"].get("ours_vs_" + p), "%.2f×") for p in SPEEDUP_PEERS]
        row.append(_f(c.get("rel_l2_err"), "%.1e"))
        lines.append("| " + " | ".join(row) + " |")

    skipped = {}
    for c in cases:
        for peer, reason in c["peers_skipped"].items():
            skipped.setdefault((peer, reason), []).append(c["name"])
    notes = {}
    for c in cases:
        for peer, note in c.get("peers_notes", {}).items():
            notes.setdefault((peer, note), []).append(c["name"])
    no_peers = [c["name"] for c in cases if not c["peers"]]
    if skipped or notes or no_peers:
        lines += ["", "## Skipped and notes", ""]
        for (peer, reason), names in sorted(skipped.items()):
            lines.append("- %s skipped (%d): %s — %s" % (peer, len(names), reason,
                                                       ", ".join(names)))
        for (peer, note), names in sorted(notes.items()):
            lines.append("- %s note (%d): %s — %s" % (peer, len(names), note,
                                                    ", ".join(names)))
        if no_peers:
            lines.append("- no peer results (%d): %s" % (len(no_peers), ", ".join(no_peers)))
    serving = report.get("serving", [])
    if serving:
        lines += ["", "## Serving cases", "",
                  "Peers: scripts/peers.py (torch on the same problem: padded SDPA per backend, "
                  "nested tensors, one call per sequence; flex for the dense cache). "
                  "× best peer = best peer's ms / ours (> 1: we are faster).", "",
                  "| case | kernel | ms | TFLOP/s | one call per sequence, ms | best peer | peer ms | × best peer |",
                  "|---|---|---:|---:|---:|---|---:|---:|"]
        decode = [c for c in serving if c.get("decode")]
        serving = [c for c in serving if not c.get("decode")]
        for c in serving:
            other = c.get("one_call_per_sequence_ms")
            best = c.get("best_peer")
            lines.append("| %s | `%s` | %.3f | %.1f | %s | %s | %s | %s |" % (
                c["name"], c["kernel"], c["ours_ms"], c["ours_tflops"],
                "%.3f" % other if other is not None else "—",
                best or "—", "%.3f" % c["best_peer_ms"] if best else "—",
                "%.2f" % c["ours_vs_best_peer"] if best and c.get("ours_vs_best_peer") else "—"))
        skipped = [(c["name"], p, r["skipped"]) for c in serving for p, r in c.get("peers", {}).items()
                   if r.get("skipped")]
        for name, p, why in skipped:
            lines.append("- %s, %s skipped: %s" % (name, p, why))
        if decode:
            lines += ["", "### Decode steps (GB/s of K and V read)", "",
                      "Copy bandwidth: the same GPU's device-to-device copy in the same run (read + write). "
                      "Peers on the dense, unsplit row of each shape.", "",
                      "| case | kernel | ms | GB/s | % of copy | flash GB/s | cudnn GB/s | read K,V once GB/s |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
            for c in decode:
                peers = c.get("peers", {})

                def g(p):
                    r = peers.get(p, {})
                    return "%.0f" % r["gbps"] if r.get("gbps") else "—"
                lines.append("| %s | `%s` | %.4f | %.0f | %.0f%% | %s | %s | %s |" % (
                    c["name"], c["kernel"], c["ours_ms"], c["gbps"], 100.0 * c["gbps"] / c["copy_gbps"],
                    g("torch_flash"), g("torch_cudnn"), g("read_kv_once")))
    lines += mechanisms_markdown(report.get("mechanisms", []))
    lines += backward_accuracy_markdown(report.get("backward_accuracy", {}))
    return "\n".join(lines) + "\n"


def _mb(nbytes):
    return _f(nbytes and nbytes / 1e6, "%.1f")


def mechanisms_markdown(rows):
    """The "Mechanisms" section: one table line per row and peer."""
    if not rows:
        return []
    lines = ["", "## Mechanisms", "",
             "Fused additive (Bahdanau) attention against the unfused torch formulation, which "
             "materialises [B, H, Lq, Lk, Da] (eager, and through torch.compile); the baseline "
             "backward against SDPA's backward per backend (TFLOP/s at 2.5× the forward's FLOPs). "
             "× = peer ms / our ms (> 1: we are faster). Peak memory: ours = the bytes of the "
             "tensors the call touches (no workspace); torch = its inputs plus what its allocator "
             "held above them during one call. Memory × = torch's / ours.", "",
             "| case | kernel | ours ms | ours TFLOP/s | peer | peer ms | × | ours peak MB | "
             "peer peak MB | memory × |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    skipped = []
    for c in rows:
        peers = c.get("peers") or {}
        head = [c["name"], "`%s`" % c.get("kernel", ""), _f(c.get("ours_ms"), "%.3f"),
                _f(c.get("ours_tflops"), "%.2f")]
        if not peers:
            lines.append("| " + " | ".join(head + ["—", "—", "—", _mb(c.get("ours_peak_bytes")),
                                                   "—", "—"]) + " |")
            continue
        for peer in sorted(peers):
            r = peers[peer] or {}
            if r.get("skipped"):
                skipped.append((c["name"], peer, r["skipped"]))
            lines.append("| " + " | ".join(head + [
                peer, _f(r.get("ms"), "%.3f"),
                _f(c["ratios"].get("ours_vs_" + peer), "%.2f"),
                _mb(c.get("ours_peak_bytes")), _mb(r.get("peak_bytes")),
                _f(c.get("memory_ratios", {}).get("memory_vs_" + peer), "%.1f")]) + " |")
    for name, peer, why in skipped:
        lines.append("- %s, %s skipped: %s" % (name, peer, why))
    return lines


ACCURACY_PEERS = ("torch_flash", "torch_cudnn", "torch_efficient")


def backward_accuracy_markdown(acc):
    """The "Backward accuracy" section: per backward row, on its reduced
    problem, the worst gradient rel L2 of ours and of each SDPA backend
    against float64 autograd on the same inputs; issue 12 asks ours <= 2x
    the best torch."""
    if not acc:
        return []
    lines = ["", "## Backward accuracy", "",
             "Per backward row, a reduced copy of its problem (shape column) with fresh inputs: the worst "
             "of dQ, dK, dV rel L2 against torch autograd in float64 on the same inputs, for ours (the C "
             "ABI, the row's mode) and each SDPA backend. Issue 12's bound: ours <= 2x the best torch.", "",
             "| case | reduced shape | ours | " + " | ".join(ACCURACY_PEERS) + " | ours / best torch |",
             "|---|---|---:|" + "---:|" * len(ACCURACY_PEERS) + "---:|"]
    notes = []
    for name in sorted(acc):
        a = acc[name] or {}
        errs = a.get("errors") or {}
        torch_errs = [errs.get(p) for p in ACCURACY_PEERS if errs.get(p) is not None]
        ours = errs.get("ours_capi")
        ratio = ours / min(torch_errs) if ours is not None and torch_errs and min(torch_errs) > 0 else None
        verdict = "" if ratio is None else (" (within 2x)" if ratio <= 2.0 else " (**over 2x**)")
        lines.append("| %s | %s | %s | %s | %s |" % (
            name, a.get("shape", "?"), _f(ours, "%.2e"),
            " | ".join(_f(errs.get(p), "%.2e") for p in ACCURACY_PEERS),
            (_f(ratio, "%.2f") + verdict) if ratio is not None else "—"))
        for peer, why in sorted((a.get("notes") or {}).items()):
            notes.append("- %s, %s: %s" % (name, peer, why))
    return lines + notes


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------

def plot_groups(cases):
    """{(direction, dtype, head_dim, mask, heads): [case]} for the subplots."""
    groups = {}
    for c in cases:
        heads = ("GQA %d:%d" % (c["heads_q"], c["heads_kv"])
                 if c["heads_q"] != c["heads_kv"] else "")
        key = (c.get("direction", "fwd"), c["dtype"], c["head_dim"], c["mask"], heads)
        groups.setdefault(key, []).append(c)
    return groups


def write_png(report, path):
    """Returns False (after a warning) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: warning: matplotlib is not installed; no PNG written. "
              "Rerun this command where matplotlib is installed to get %s"
              % os.path.basename(path), file=sys.stderr)
        return False
    groups = plot_groups(report["cases"])
    if not groups:
        return False
    peers = peer_order({p for c in report["cases"] for p in c["peers"]})
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows),
                             squeeze=False)
    for ax, (key, cases) in zip(axes.flat, sorted(groups.items(), key=str)):
        direction, dtype, d, mask, heads = key
        cases = sorted(cases, key=lambda c: c["seqlen_k"])
        xs = [c["seqlen_k"] for c in cases]
        ax.plot(xs, [c.get("ours_tflops") for c in cases], "o-", lw=2, color="C0",
                label="ours")
        for n, p in enumerate(peers, 1):  # fixed colour per peer across subplots
            ys = [c["peer_tflops"].get(p) for c in cases]
            if any(y is not None for y in ys):
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], "s--",
                        color="C%d" % (n % 10), label=PEER_LABELS.get(p, p))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(xs)))
        ax.set_xticklabels([str(x) for x in sorted(set(xs))], fontsize=7)
        ax.set_xlabel("sequence length (keys)")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.set_title(" ".join(t for t in (direction, dtype, "D=%d" % d, mask, heads) if t),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("%s — %s — %s" % (report["gpu"], short_sha(report["commit"],
                                                            report["dirty"]),
                                   report["date"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True, help="ours.json from the Rust bench")
    ap.add_argument("--peers", required=True, help="peers.json from scripts/peers.py")
    ap.add_argument("--out-dir", default="bench-results")
    ap.add_argument("--log", help="GPU test log to copy beside the report")
    ap.add_argument("--date", help="YYYY-MM-DD (default: today)")
    args = ap.parse_args(argv)

    date = args.date or datetime.date.today().isoformat()
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        ap.error("--date must be YYYY-MM-DD, got %r" % date)
    with open(args.ours) as f:
        ours = json.load(f)
    with open(args.peers) as f:
        peers = json.load(f)

    report = build_report(ours, peers, date)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, report_stem(date, report["gpu"],
                                                  report["commit"], report["dirty"]))
    for w in report["warnings"]:
        print("report.py: warning: " + w, file=sys.stderr)

    written = []
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    written.append(stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    written.append(stem + ".md")
    if write_png(report, stem + ".png"):
        written.append(stem + ".png")
    if args.log:
        if os.path.exists(args.log):
            shutil.copyfile(args.log, stem + "-tests.log")
            written.append(stem + "-tests.log")
        else:
            print("report.py: warning: log %s not found; not copied" % args.log,
                  file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
