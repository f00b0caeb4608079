#!/usr/bin/env python3
"""Static SASS report: the hot loop of every auto-dispatched kernel, counted.

What: runs `cuobjdump --dump-sass` on the build's fatbins, finds each kernel's
hot loop (the backward branch whose body [target, branch] holds the most
tensor-core instructions, HMMA or HGMMA; ties go to the shorter body) and
counts the instructions of one iteration by class. These are *static* counts
of the loop body: every instruction between the loop head and its backward
branch once, both sides of any branch inside included (a proxy for issue
slots per key tile, not a profile). Alongside: registers and static shared
memory from the ptxas `-v` report, the dynamic shared memory of the kernel
table (`FA_KERNEL` lines of kernels/*.cu) and the CTAs per SM that gives on an
H100. For sm_90a kernels it also records where, inside the hot loop, the
`WARPGROUP.DEPBAR.LE gsb0, N` waits sit relative to the `MUFU.EX2`s.

Which code: fwd_sm80, fwd_naive and bwd_sm80 kernels at sm_80, fwd_sm90 at sm_90a;
base kernels only (names without `__tag`; variants are built only with
FUSED_ATTN_VARIANTS=1 and reported here with --variants when present).

How to run (stdlib only; needs cuobjdump, and nvdisasm beside it):
    python3 scripts/sass_report.py --out docs/sass-report.md
finds the newest target/*/build/fused-attn-*/out/ with fatbins itself; or
    python3 scripts/sass_report.py --fatbin-dir DIR --resource-report FILE \\
        [--cuobjdump PATH] [--out FILE.md] [--json FILE.json]
cuobjdump: --cuobjdump, else $CUOBJDUMP, else beside $NVCC, else on PATH.
The Rust test tests/sass_report.rs runs this script (--json) and checks the
numbers; its synthetic-snippet check uses --self-test.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# H100 SXM per-SM limits (CUDA occupancy calculator, compute capability 9.0).
H100 = {
    "regs_per_sm": 65536,
    "reg_alloc_unit_per_warp": 256,  # registers are allocated per warp in 256s (8 per thread)
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_cta": 1024,  # the runtime reserves 1 KiB of shared memory per CTA
    "threads_per_sm": 2048,
    "ctas_per_sm": 32,
}

# Instruction classes, in the order they are tried; every instruction gets one.
CLASSES = [
    ("tensor", "tensor ops (HMMA/HGMMA)"),
    ("ex2", "MUFU.EX2"),
    ("mufu_other", "other MUFU"),
    ("fp32", "FP32 (FFMA/FMUL/FADD/FMNMX)"),
    ("shared_ld", "shared loads (LDS/LDSM)"),
    ("shared_st", "shared stores (STS/STSM)"),
    ("copy", "global/async copies (LDG/STG/LDGSTS/LDGDEPBAR/UTMA*/UBLKCP)"),
    ("sync", "barriers and waits (BAR/DEPBAR/WARPGROUP.*/SYNCS.*/WARPSYNC)"),
    ("uniform", "uniform datapath (U*)"),
    ("branch", "control (BRA/BSSY/BSYNC/EXIT/...)"),
    ("alu", "integer/other ALU"),
]
CONTROL = {"BRA", "BRX", "JMP", "JMX", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "BREAK", "BPT", "YIELD", "KILL"}


def classify(opcode):
    """The class of one opcode (`HMMA.16816.F32`, `MUFU.EX2`, `UTMALDG.2D`, ...)."""
    base = opcode.split(".")[0]
    if base in ("HMMA", "HGMMA"):
        return "tensor"
    if base == "MUFU":
        return "ex2" if opcode.startswith("MUFU.EX2") else "mufu_other"
    if base in ("FFMA", "FMUL", "FADD", "FMNMX"):
        return "fp32"
    if base in ("LDS", "LDSM"):
        return "shared_ld"
    if base in ("STS", "STSM"):
        return "shared_st"
    if base in ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "UBLKCP", "UBLKPF", "UBLKRED") or base.startswith("UTMA"):
        return "copy"
    if base in ("BAR", "DEPBAR", "WARPGROUP", "SYNCS", "WARPSYNC", "MEMBAR", "ERRBAR", "CCTL"):
        return "sync"
    if base.startswith("U"):
        return "uniform"
    if base in CONTROL:
        return "branch"
    return "alu"


# ---- SASS parsing ---------------------------------------------------------------

INSN = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
FUNC = re.compile(r"Function\s*:\s*(\S+)")
ARCH = re.compile(r"^\s*code for (sm_\w+)")
TARGET = re.compile(r"(?:`\(([^)]+)\)|\b(0x[0-9a-fA-F]+)\b)")


def parse_sass(text):
    """{(arch, kernel): [insn]} where insn = {addr, text, opcode, target}."""
    functions = {}
    arch, insns, labels, pending = None, None, {}, []
    for line in text.splitlines():
        m = ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = FUNC.search(line)
        if m:
            insns, labels, pending = [], {}, []
            functions[(arch, m.group(1))] = (insns, labels)
            continue
        if insns is None:
            continue
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSN.match(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2)
        for name in pending:
            labels[name] = addr
        pending = []
        guard = ""
        if body.startswith("@"):
            guard, _, body = body.partition(" ")
            body = body.strip()
        opcode = body.split()[0] if body else ""
        insns.append({"addr": addr, "text": body, "guard": guard, "opcode": opcode, "target": None})
    out = {}
    for key, (insns, labels) in functions.items():
        for i in insns:
            if i["opcode"].split(".")[0] in ("BRA", "JMP"):
                m = TARGET.search(i["text"][len(i["opcode"]) :])
                if m:
                    i["target"] = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        out[key] = insns
    return out


def find_loops(insns):
    """Every backward branch as (head index, branch index): the body is insns[head..=branch]."""
    index = {i["addr"]: n for n, i in enumerate(insns)}
    loops = []
    for n, i in enumerate(insns):
        t = i["target"]
        if t is not None and t <= i["addr"] and t in index:
            loops.append((index[t], n))
    return loops


def count(body):
    c = {k: 0 for k, _ in CLASSES}
    for i in body:
        c[classify(i["opcode"])] += 1
    c["total"] = len(body)
    # Not classes (already in `tensor`): which tensor-core generation.
    c["hmma"] = sum(1 for i in body if i["opcode"].split(".")[0] == "HMMA")
    c["hgmma"] = sum(1 for i in body if i["opcode"].split(".")[0] == "HGMMA")
    return c


def hot_loop(insns, by="tensor"):
    """The innermost loop with the most instructions of class `by`, or None.

    Candidates are the loops holding at least one such instruction that do not
    strictly contain another candidate (a persistent kernel's tile loop holds
    the key-tile loop plus the GEMMs of its first and last tile; the key-tile
    loop is the hot one). Among them the most `by` instructions win, ties going
    to the shorter body.
    """
    cands = []
    for head, br in find_loops(insns):
        n = sum(1 for i in insns[head : br + 1] if classify(i["opcode"]) == by)
        if n:
            cands.append((head, br, n))
    inner = [c for c in cands
             if not any(o is not c and c[0] <= o[0] and o[1] <= c[1] and (o[0], o[1]) != (c[0], c[1])
                        for o in cands)]
    if not inner:
        return None
    head, br, _ = max(inner, key=lambda c: (c[2], -(c[1] - c[0])))
    return head, br


def wait_placement(body):
    """Where the wgmma waits sit relative to the exponentials inside the loop.

    The body repeats, so "after" and "between" are read cyclically: a region
    that reaches the loop's backward branch goes on at the loop head, up to
    the next wait. A loop whose `0x0` wait opens the body (the `__ov`
    variants: the wait for P V is the first thing of the next iteration) thus
    has its overlap window across the back edge.

    `waits`: every `WARPGROUP.DEPBAR.LE gsb0, N` in loop order with its N, its
    position (instruction index in the body) and how many MUFU.EX2 precede it.
    `ex2_between_1_and_0`: for each 0x1 wait, the EX2s between it and the next
    0x0 wait (the window in which softmax can overlap the still-running GEMM).
    `window_wraps`: whether that window (the first 0x1 wait's) crosses the
    back edge. `segments`: the body cut at the waits (before the first,
    between, after the last; not wrapped), each with its instructions, EX2s,
    the EX2s whose operand is `-|x|` (the softcap's tanh, exp(-2|x|), not the
    softmax's exp2) and FMNMX (the row-max reduction).
    """
    waits, ex2 = [], 0
    ex2_positions = []
    cuts = []
    for pos, i in enumerate(body):
        if i["opcode"].startswith("MUFU.EX2"):
            ex2 += 1
            ex2_positions.append(pos)
        elif i["opcode"].startswith("WARPGROUP.DEPBAR"):
            m = re.search(r"gsb0\s*,\s*(0x[0-9a-fA-F]+|\d+)", i["text"])
            n = int(m.group(1), 0) if m else None
            waits.append({"pending": n, "pos": pos, "ex2_before": ex2})
            cuts.append(pos)

    def region(k, want):
        """The instructions from wait k to the next wait with pending `want`
        (any wait if None), cyclically; (insns, wrapped) or None."""
        order = waits[k + 1 :] + waits[: k + 1]
        nxt = next((x for x in order if want is None or x["pending"] == want), None)
        if nxt is None:
            return None
        a, b = waits[k]["pos"], nxt["pos"]
        if b > a:
            return body[a:b], False
        return body[a:] + body[:b], True

    def tally(seg):
        ex2s = [i for i in seg if i["opcode"].startswith("MUFU.EX2")]
        soft = sum(1 for i in ex2s if "-|" in i["text"])
        return {"ex2": len(ex2s) - soft, "ex2_softcap": soft,
                "fmnmx": sum(1 for i in seg if i["opcode"].startswith("FMNMX"))}

    windows = []
    first_window = None
    for k, w in enumerate(waits):
        if w["pending"] == 1:
            r = region(k, 0)
            if r is not None:
                windows.append(sum(1 for i in r[0] if i["opcode"].startswith("MUFU.EX2")))
                if first_window is None:
                    first_window = (tally(r[0]), r[1])
    last0 = max((k for k, w in enumerate(waits) if w["pending"] == 0), default=None)
    after0 = tally(region(last0, None)[0]) if last0 is not None else None
    segments = []
    bounds = [0] + cuts + [len(body)]
    for a, b in zip(bounds, bounds[1:]):
        seg = body[a:b]
        t = tally(seg)
        segments.append({
            "from": "start" if a == 0 and not (cuts and cuts[0] == 0) else f"wait@{a}",
            "insns": len(seg),
            "ex2": t["ex2"] + t["ex2_softcap"],
            "ex2_softcap": t["ex2_softcap"],
            "fmnmx": t["fmnmx"],
        })
    window = first_window[0] if first_window else None
    return {
        "ex2_total": ex2,
        "softmax_ex2_in_window": window["ex2"] if window else None,
        "softcap_ex2_in_window": window["ex2_softcap"] if window else None,
        "fmnmx_in_window": window["fmnmx"] if window else None,
        "window_wraps": first_window[1] if first_window else None,
        "softmax_ex2_after_last_wait0": after0["ex2"] if after0 else None,
        "fmnmx_after_last_wait0": after0["fmnmx"] if after0 else None,
        "first_ex2_pos": ex2_positions[0] if ex2_positions else None,
        "last_ex2_pos": ex2_positions[-1] if ex2_positions else None,
        "waits": waits,
        "ex2_between_1_and_0": windows,
        "segments": segments,
    }


# ---- resources -------------------------------------------------------------------


def parse_resource_report(text):
    """{(kernel, arch): {registers, smem_static, barriers, stack, spills}} from ptxas -v."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
        if m:
            cur = out.setdefault((m.group(1), m.group(2)), {})
            continue
        if cur is None:
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_static"] = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            cur["barriers"] = int(b.group(1)) if b else 0
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"] = [int(x) for x in m.groups()]
    return out


def parse_table():
    """FA_KERNEL rows of kernels/*.cu: name -> {image, threads, smem_dynamic, ...}."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            for line in f:
                if not line.startswith("FA_KERNEL("):
                    continue
                f_ = [x.strip() for x in line[len("FA_KERNEL(") :].split(")")[0].split(",")]
                rows[f_[0]] = {
                    "image": stem,
                    "dtype": f_[1],
                    "head_dim": int(f_[2]),
                    "block_m": int(f_[3]),
                    "block_n": int(f_[4]),
                    "threads": int(f_[5]),
                    "smem_dynamic": int(f_[6]),
                }
    return rows


def ctas_per_sm(threads, registers, smem_bytes, hw=H100):
    """CTAs per SM = min(32, floor(2048 / threads),
    floor(65536 / (warps * ceil(regs * 32 / 256) * 256)),
    floor(228 KiB / (smem + 1 KiB)))."""
    warps = (threads + 31) // 32
    regs_per_warp = -(-registers * 32 // hw["reg_alloc_unit_per_warp"]) * hw["reg_alloc_unit_per_warp"]
    limits = {
        "ctas": hw["ctas_per_sm"],
        "threads": hw["threads_per_sm"] // threads,
        "registers": hw["regs_per_sm"] // (warps * regs_per_warp) if regs_per_warp else hw["ctas_per_sm"],
        "smem": hw["smem_per_sm"] // (smem_bytes + hw["smem_reserved_per_cta"]),
    }
    n = min(limits.values())
    return n, sorted(k for k, v in limits.items() if v == n)


# ---- report ----------------------------------------------------------------------

SASS_ARCH = {"fwd_sm80": "sm_80", "fwd_naive": "sm_80", "fwd_sm90": "sm_90a", "bwd_sm80": "sm_80"}


def find_tool(explicit):
    if explicit:
        return explicit
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    if os.environ.get("NVCC"):
        p = os.path.join(os.path.dirname(os.environ["NVCC"]), "cuobjdump")
        if os.path.isfile(p):
            return p
    return shutil.which("cuobjdump")


def locate_build():
    outs = [d for d in glob.glob(os.path.join(ROOT, "target", "*", "build", "fused-attn-*", "out"))
            if glob.glob(os.path.join(d, "*.fatbin"))]
    if not outs:
        sys.exit("no target/*/build/fused-attn-*/out/ with fatbins: build with nvcc first, or pass --fatbin-dir")
    return max(outs, key=lambda d: os.path.getmtime(os.path.join(d, "resource-report.txt"))
               if os.path.exists(os.path.join(d, "resource-report.txt")) else 0)


def dump_sass(tool, fatbin):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(os.path.abspath(tool)) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([tool, "--dump-sass", fatbin], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"cuobjdump --dump-sass {fatbin} failed:\n{r.stderr}")
    return r.stdout


def analyse(sass_by_image, resources, table, variants=False):
    kernels = []
    for image, text in sorted(sass_by_image.items()):
        arch = SASS_ARCH.get(image)
        if arch is None:
            continue
        for (a, name), insns in sorted(parse_sass(text).items()):
            if a != arch or ("__" in name and not variants):
                continue
            row = table.get(name, {})
            res = resources.get((name, arch), {})
            k = {"kernel": name, "image": image, "arch": arch, "variant": "__" in name}
            k.update({f: row.get(f) for f in ("head_dim", "block_m", "block_n", "threads", "smem_dynamic")})
            k["registers"] = res.get("registers")
            k["smem_static"] = res.get("smem_static")
            k["function_insns"] = len(insns)
            if k["threads"] and k["registers"] is not None and k["smem_dynamic"] is not None:
                smem = k["smem_static"] + k["smem_dynamic"]
                k["smem_total"] = smem
                k["h100_ctas_per_sm"], k["h100_limited_by"] = ctas_per_sm(k["threads"], k["registers"], smem)
            loop, by = hot_loop(insns), "tensor"
            if loop is None:
                # No tensor cores (fwd_naive): the loop with the most exponentials.
                loop, by = hot_loop(insns, "ex2"), "ex2"
            if loop is None:
                k["hot_loop"] = None
            else:
                head, br = loop
                body = insns[head : br + 1]
                k["hot_loop"] = {"selected_by": by,
                                 "start": f"0x{insns[head]['addr']:x}", "branch": f"0x{insns[br]['addr']:x}",
                                 "counts": count(body),
                                 "loops_in_function": len(find_loops(insns))}
                if arch.startswith("sm_90"):
                    k["hot_loop"]["wgmma_waits"] = wait_placement(body)
            kernels.append(k)
    return kernels


def markdown(kernels, meta):
    cols = [c for c, _ in CLASSES] + ["total"]
    head = ["kernel", "arch", "regs", "smem B", "CTAs/SM (H100)"] + cols
    lines = [
        "# SASS report (static hot-loop instruction counts)",
        "",
        "Generated by `scripts/sass_report.py`; do not edit by hand. Regenerate after a",
        "kernel change with",
        "",
        "```sh",
        ("FUSED_ATTN_VARIANTS=1 cargo build --tests   # with NVCC set, see README"
         if meta.get("variants") else "cargo build --tests   # with NVCC set, see README"),
        "python3 scripts/sass_report.py " + ("--variants " if meta.get("variants") else "")
        + "--out docs/sass-report.md",
        "```",
        "",
        f"Built with: `{meta.get('nvcc', '?')}`; SASS from `cuobjdump --dump-sass`.",
        "",
        "**Hot loop**: of the loops (a backward `BRA` and the body from its target to it) that hold",
        "HMMA/HGMMA instructions and contain no other such loop, the one with the most (ties: the",
        "shorter body), i.e. the key-tile loop (a persistent kernel's tile loop is skipped). Counts are *static*:",
        "each instruction of the body once, both sides of any branch inside it included, so they",
        "are issue slots per key tile per warp (an upper bound where the body has masked/unmasked",
        "paths), not a profile. The tiled kernels' loops include the softcap branch (its tanh is",
        "one `MUFU.EX2` of `-|x|` and one `MUFU.RCP` per score: the `mufu_other` column). `fwd_naive`",
        "has no tensor ops: its hot loop is the loop with the most `MUFU.EX2` (`selected_by` in the",
        "JSON). Base kernels at sm_80 (fwd_sm80, fwd_naive, bwd_sm80) and sm_90a (fwd_sm90)"
        + ("; `name__tag` rows are the measurement-only variants (FUSED_ATTN_VARIANTS=1)." if meta.get("variants")
           else "."),
        "Classes (every instruction in exactly one, tried in this order):",
        "",
    ]
    for c, desc in CLASSES:
        lines.append(f"- `{c}`: {desc}")
    lines += [
        "",
        "**Resources**: registers and static shared memory from the ptxas `-v` report, dynamic",
        "shared memory from the `FA_KERNEL` table. CTAs per SM on an H100 (65536 registers,",
        "228 KiB shared memory, 2048 threads, 32 CTAs) =",
        "`min(32, floor(2048 / threads), floor(65536 / (warps * ceil(regs * 32 / 256) * 256)),",
        "floor(233472 / (smem_static + smem_dynamic + 1024)))` (1 KiB reserved per CTA; registers",
        "allocated per warp in units of 256). The sm90 kernels' register figure is the launch",
        "allocation; `setmaxnreg` then moves registers between warpgroups within it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for k in kernels:
        hl = k["hot_loop"]
        cnt = [str(hl["counts"][c]) if hl else "-" for c in cols]
        ctas = k.get("h100_ctas_per_sm")
        ctas_s = f"{ctas} ({', '.join(k['h100_limited_by'])})" if ctas is not None else "?"
        lines.append("| " + " | ".join([f"`{k['kernel']}`", k["arch"], str(k["registers"]),
                                         str(k.get("smem_total", "?")), ctas_s] + cnt) + " |")
    sm90 = [k for k in kernels if k["arch"].startswith("sm_90") and k["hot_loop"]]
    if sm90:
        lines += [
            "",
            "## sm_90a: wgmma waits against the exponentials",
            "",
            "Each `WARPGROUP.DEPBAR.LE gsb0, N` in hot-loop order as `N@position(EX2s before it)`;",
            "position is the instruction index inside the loop body. The *overlap window* is the",
            "number of `MUFU.EX2` between a `0x1` wait and the next `0x0` wait: the exponentials",
            "that can run while one wgmma group is still in flight. The body repeats, so regions are",
            "read cyclically: where the `0x0` wait opens the body (the `__ov` variants, whose loop",
            "is rotated so that the wait for P V begins the next iteration) the window runs from the",
            "`0x1` wait across the back edge (*wraps*).",
            "",
            "EX2s whose operand is `-|x|` are the softcap's tanh (exp(-2|x|), taken only when a",
            "softcap is set); the others are the softmax's exp2(S - m) and the two rescale factors.",
            "FMNMX is the row-max reduction.",
            "",
            "| kernel | loop insns | EX2 in loop | waits `N@pos(EX2 before)` | EX2 between 0x1 and 0x0 "
            "(softcap tanh + softmax) | window wraps | FMNMX in window | softmax EX2 / FMNMX after the 0x0 wait |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in sm90:
            w = k["hot_loop"]["wgmma_waits"]
            waits = ", ".join(f"{x['pending']}@{x['pos']}({x['ex2_before']})" for x in w["waits"]) or "none"
            win = (f"{w['softcap_ex2_in_window']} + {w['softmax_ex2_in_window']}"
                   if w["softmax_ex2_in_window"] is not None else "no 0x1 wait")
            lines.append(f"| `{k['kernel']}` | {k['hot_loop']['counts']['total']} | {w['ex2_total']} | {waits} | "
                         f"{win} | {'yes' if w['window_wraps'] else 'no'} | {w['fmnmx_in_window']} | "
                         f"{w['softmax_ex2_after_last_wait0']} / {w['fmnmx_after_last_wait0']} |")
    if meta.get("finding"):
        lines += ["", meta["finding"]]
    lines += ["", "## The same numbers (JSON)", "", "```json",
              json.dumps({"meta": {k: v for k, v in meta.items() if k != "finding"}, "kernels": kernels},
                         indent=1),
              "```", ""]
    return "\n".join(lines)


def finding(kernels):
    """One paragraph summarising the sm90 wait placement."""
    every = [k for k in kernels if k["arch"].startswith("sm_90") and k["hot_loop"]]
    sm90 = [k for k in every if not k["variant"]]
    if not sm90:
        return ""
    ws = [k["hot_loop"]["wgmma_waits"] for k in sm90]
    lost = lambda w: w["softmax_ex2_in_window"] == 0 and bool(w["softmax_ex2_after_last_wait0"])
    variants = [k for k in every if k["variant"]]
    tail = ""
    if variants:
        same = all(lost(k["hot_loop"]["wgmma_waits"]) for k in variants)
        differ = [k for k in variants if not lost(k["hot_loop"]["wgmma_waits"])]
        tail = (" The variants (`__tag`) show the same placement." if same else
                " The other variants show the same placement, except: " + "; ".join(
                    f"`{k['kernel']}`: {k['hot_loop']['wgmma_waits']['softmax_ex2_in_window']} softmax EX2 "
                    f"and {k['hot_loop']['wgmma_waits']['fmnmx_in_window']} FMNMX in the window"
                    + (" (across the back edge)" if k["hot_loop"]["wgmma_waits"]["window_wraps"] else "")
                    + f", {k['hot_loop']['wgmma_waits']['softmax_ex2_after_last_wait0']} after the 0x0 wait"
                    for k in differ) + "." + (
                    " The `__ov` loop is rotated: the 0x0 wait (and the V release, the rescale of O and the P"
                    " conversion after it) opens the next iteration, so the back edge lies between the softmax"
                    " and that wait and ptxas no longer hoists the wait above the exponentials."
                    if any(k["kernel"].endswith("__ov") for k in differ) else ""))
    if all(lost(w) for w in ws):
        return ("**Finding** (all sm_90a base kernels): the hot loop has one `WARPGROUP.DEPBAR.LE gsb0, 0x1` "
                "right after the two GEMMs are issued and one `0x0` wait later, but *no softmax exponential "
                "lies between them*: every exp2(S - m) and nearly all of the row-max FMNMXs come after the `0x0` wait, "
                "i.e. after P_{j-1} V_{j-1} has retired. The only EX2s inside the window are the softcap's "
                "tanh (`-|x|` operand), present only when a softcap is set. So in the default (uncapped) "
                "path the window holds just the score scaling and masking, and the intra-warpgroup "
                "softmax/GEMM overlap the source asks for is lost in the SASS, as issue 9 says "
                "(item 2 aims to change this)." + tail)
    return "**Finding**: softmax EX2 between the 0x1 and 0x0 waits: " + "; ".join(
        f"`{k['kernel']}`: {w['softmax_ex2_in_window']}" for k, w in zip(sm90, ws)) + "." + tail


SELF_TEST = """
	code for sm_90a
		Function : toy
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
.L_x_1:
        /*0020*/                   WARPGROUP.ARRIVE ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0050*/                   MUFU.EX2 R2, R2 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/                   MUFU.EX2 R3, R3 ;
.L_x_2:
        /*0080*/                   LDS R5, [R6] ;
        /*0090*/               @P0 BRA `(.L_x_2) ;
        /*00a0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00b0*/                   FFMA R3, R3, R2, R3 ;
        /*00c0*/              @!P1 BRA 0x20 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def self_test():
    """The loop finder and counter on a synthetic snippet (used by tests/sass_report.rs)."""
    f = parse_sass(SELF_TEST)[("sm_90a", "toy")]
    loops = find_loops(f)
    # The spin loop 0x80..0x90, the outer loop 0x20..0xc0 and the `BRA 0xe0` self-loop.
    assert sorted((f[h]["addr"], f[b]["addr"]) for h, b in loops) == [(0x20, 0xC0), (0x80, 0x90), (0xE0, 0xE0)], loops
    head, br = hot_loop(f)
    assert (f[head]["addr"], f[br]["addr"]) == (0x20, 0xC0)
    c = count(f[head : br + 1])
    want = {"tensor": 1, "ex2": 2, "mufu_other": 0, "fp32": 1, "shared_ld": 1, "shared_st": 0, "copy": 0,
            "sync": 3, "uniform": 1, "branch": 2, "alu": 0, "total": 11, "hmma": 0, "hgmma": 1}
    assert c == want, c
    w = wait_placement(f[head : br + 1])
    assert [(x["pending"], x["pos"], x["ex2_before"]) for x in w["waits"]] == [(1, 2, 0), (0, 4, 1)], w
    assert w["ex2_between_1_and_0"] == [1], w
    assert (w["softmax_ex2_in_window"], w["softmax_ex2_after_last_wait0"]) == (1, 1), w
    assert w["window_wraps"] is False, w
    # The 0x0 wait opening the body (a rotated loop, as the __ov variants):
    # the window runs from the 0x1 wait across the back edge to it.
    rot = parse_sass(SELF_TEST.replace("WARPGROUP.ARRIVE ;", "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;", 1)
                     .replace("/*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0", "/*0060*/                   NOP"))
    f3 = rot[("sm_90a", "toy")]
    h3, b3 = hot_loop(f3)
    w3 = wait_placement(f3[h3 : b3 + 1])
    assert [(x["pending"], x["pos"]) for x in w3["waits"]] == [(0, 0), (1, 2)], w3
    assert (w3["ex2_between_1_and_0"], w3["window_wraps"]) == ([2], True), w3
    assert (w3["softmax_ex2_in_window"], w3["softmax_ex2_after_last_wait0"]) == (2, 0), w3
    # Two nested loops with tensor ops: the inner one is the hot loop.
    nested = SELF_TEST.replace("/*00e0*/                   BRA 0xe0;", "/*00e0*/                   BRA 0x10;")
    f2 = parse_sass(nested)[("sm_90a", "toy")]
    head2, br2 = hot_loop(f2)
    assert (f2[head2]["addr"], f2[br2]["addr"]) == (0x20, 0xC0), (f2[head2]["addr"], f2[br2]["addr"])
    # A function whose only backward branch encloses no tensor op has no hot loop.
    g = parse_sass(SELF_TEST.replace("HGMMA.64x128x16.F32.BF16", "FMUL").replace("HMMA.16816.F32", "FMUL"))
    assert hot_loop(g[("sm_90a", "toy")]) is None
    assert classify("UTMALDG.2D") == "copy" and classify("USHF.L.U32") == "uniform"
    assert classify("LDSM.16.M88.4") == "shared_ld" and classify("SYNCS.PHASECHK.TRANS64.TRYWAIT") == "sync"
    assert ctas_per_sm(128, 128, 0) == (4, ["registers"]), ctas_per_sm(128, 128, 0)
    assert ctas_per_sm(256, 64, 100000)[0] == 2
    print("self-test ok")


def flatten(value, prefix=""):
    """`path<TAB>value` lines of a JSON-like value (lists indexed), for tests without a JSON parser."""
    if isinstance(value, dict):
        return [l for k, v in value.items() for l in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [l for n, v in enumerate(value) for l in flatten(v, f"{prefix}.{n}")]
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return [f"{prefix}\t{'null' if value is None else value}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fatbin-dir", help="directory with <stem>.fatbin (default: newest target/*/build/fused-attn-*/out)")
    ap.add_argument("--resource-report", help="ptxas -v report (default: resource-report.txt in the fatbin dir)")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--nvcc-version", help="the line to record as the compiler (default: first `release` line of "
                    "`$NVCC --version`)")
    ap.add_argument("--variants", action="store_true", help="also report name__tag variant kernels if built")
    ap.add_argument("--out", help="Markdown report to write")
    ap.add_argument("--json", help="JSON to write ('-' for stdout)")
    ap.add_argument("--flat", help="`kernel.path<TAB>value` lines to write ('-' for stdout)")
    ap.add_argument("--sass", action="append", default=[],
                    help="analyse this SASS text file (stem = image, e.g. fwd_sm90.sass) instead of the fatbins")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return
    if a.sass:
        sass = {}
        for p in a.sass:
            with open(p) as f:
                sass[os.path.splitext(os.path.basename(p))[0]] = f.read()
        resources = {}
        if a.resource_report:
            with open(a.resource_report) as f:
                resources = parse_resource_report(f.read())
    else:
        d = a.fatbin_dir or locate_build()
        report_path = a.resource_report or os.path.join(d, "resource-report.txt")
        tool = find_tool(a.cuobjdump)
        if not tool:
            sys.exit("no cuobjdump: pass --cuobjdump or set CUOBJDUMP")
        sass = {os.path.splitext(os.path.basename(p))[0]: dump_sass(tool, p)
                for p in sorted(glob.glob(os.path.join(d, "*.fatbin")))}
        with open(report_path) as f:
            resources = parse_resource_report(f.read())
    kernels = analyse(sass, resources, parse_table(), a.variants)
    nvcc = a.nvcc_version
    if nvcc is None and os.environ.get("NVCC"):
        try:
            v = subprocess.run([os.environ["NVCC"], "--version"], capture_output=True, text=True).stdout
            nvcc = next((l.strip() for l in v.splitlines() if "release" in l), None)
        except OSError:
            pass
    meta = {"nvcc": nvcc or "unknown", "variants": a.variants and any(k["variant"] for k in kernels),
            "h100": H100, "finding": finding(kernels)}
    if a.out:
        with open(a.out, "w") as f:
            f.write(markdown(kernels, meta))
    if a.json:
        doc = json.dumps({"meta": meta, "kernels": kernels}, indent=1)
        if a.json == "-":
            print(doc)
        else:
            with open(a.json, "w") as f:
                f.write(doc)
    if a.flat:
        lines = [l for k in kernels for l in flatten(k, k["kernel"])]
        doc = "\n".join(lines) + "\n"
        if a.flat == "-":
            sys.stdout.write(doc)
        else:
            with open(a.flat, "w") as f:
                f.write(doc)
    if not a.out and not a.json and not a.flat:
        print(markdown(kernels, meta))


if __name__ == "__main__":
    main()
