#!/usr/bin/env python3
"""Self-contained test of scripts/report.py (and peers.py's pure helpers).

Feeds a synthetic ours.json + peers.json to report.py in a temporary directory
and checks the file names, the JSON fields and ratios, and the Markdown rows.
Needs neither a GPU nor PyTorch; the PNG is checked only where matplotlib is
installed.

Run: python3 scripts/test_report.py
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # leave no __pycache__ in scripts/
sys.path.insert(0, HERE)
import peers  # noqa: E402  (torch is imported lazily, only by peers.main)
import report  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None

OURS = {
    "commit": "abc1234def5678", "dirty": True, "gpu": "NVIDIA H100 80GB HBM3",
    "driver": "580.65", "cuda": "13.0",
    "cases": [
        {"name": "bf16 b8 s2048 hq16 hkv16 d128 causal", "kernel": "fa_fwd_sm80_bf16_hd128",
         "direction": "fwd", "dtype": "bf16", "batch": 8, "heads_q": 16, "heads_kv": 16,
         "seqlen_q": 2048, "seqlen_k": 2048, "head_dim": 128, "mask": "causal",
         "window_left": None, "window_right": 0, "flops": 2 * 10**12, "ours_ms": 5.0,
         "ours_tflops": 400.0, "rel_l2_err": 0.004, "err_case": "same shape"},
        {"name": "bf16 b1 s16384 hq16 hkv16 d128 window(4096,0)", "kernel": "fa_fwd_sm90_bf16_hd128",
         "direction": "fwd", "dtype": "bf16", "batch": 1, "heads_q": 16, "heads_kv": 16,
         "seqlen_q": 16384, "seqlen_k": 16384, "head_dim": 128, "mask": "window(4096,0)",
         "window_left": 4096, "window_right": 0, "flops": 10**12, "ours_ms": 2.0,
         "ours_tflops": 500.0, "rel_l2_err": 0.005, "err_case": "smaller"},
        {"name": "f16 b4 s4096 hq32 hkv8 d128 full", "kernel": "fa_fwd_sm90_f16_hd128",
         "direction": "fwd", "dtype": "f16", "batch": 4, "heads_q": 32, "heads_kv": 8,
         "seqlen_q": 4096, "seqlen_k": 4096, "head_dim": 128, "mask": "full",
         "window_left": None, "window_right": None, "flops": 3 * 10**12, "ours_ms": 10.0,
         "ours_tflops": 300.0, "rel_l2_err": 0.001, "err_case": "same shape"},
    ],
    "serving": [
        {"name": "varlen prefill 3 seqs", "kernel": "fa_fwd_sm90_bf16_hd128", "tokens": 700,
         "flops": 10**9, "ours_ms": 2.0, "ours_tflops": 0.5, "one_call_per_sequence_ms": 3.0,
         "heads_q": 32, "heads_kv": 8, "head_dim": 128, "mask": "causal", "seq_lens": [100, 200, 400]},
        {"name": "kv cache paged 16 b8 cache4096 q512", "kernel": "fa_fwd_sm80_bf16_hd128",
         "flops": 10**9, "ours_ms": 1.0, "ours_tflops": 1.0, "page": 16},
        {"name": "decode dense b1 cache32768 hq32 hkv8 splits9", "kernel": "fa_fwd_sm80_bf16_hd128",
         "ours_ms": 0.05, "ours_tflops": 0.1, "gbps": 2700.0, "copy_gbps": 3000.0, "splits": 9,
         "batch": 1, "cache_len": 32768, "page": 0, "decode": True},
    ],
}

ADDITIVE = "additive bf16 b8 h4 lq200 lk1000 da128 dv128 full bias"
BACKWARD = "backward bf16 b2 s1024 h8 d64 causal"
OURS["mechanisms"] = [
    {"name": ADDITIVE, "mechanism": "additive", "kernel": "fa_additive_bf16", "dtype": "bf16",
     "batch": 8, "heads": 4, "seqlen_q": 200, "seqlen_k": 1000, "dim_a": 128, "dim_v": 128,
     "bias": True, "mask": "full", "flops": 2 * 10**9, "tanh_count": 819200000, "ours_ms": 2.0,
     "reps": 30, "ours_tflops": 1.0, "ours_gtanh_per_s": 409600.0, "ours_peak_bytes": 20 * 10**6},
    {"name": BACKWARD, "mechanism": "backward", "kernel": "fa_bwd_dq_naive_bf16 + fa_bwd_dkdv_naive_bf16",
     "direction": "bwd", "dtype": "bf16", "batch": 2, "heads_q": 8, "heads_kv": 8, "seqlen_q": 1024,
     "seqlen_k": 1024, "head_dim": 64, "mask": "causal", "fwd_flops": 4 * 10**9, "flops": 10**10,
     "ours_ms": 4.0, "reps": 30, "ours_tflops": 2.5},
]

SDPA_WINDOW = "SDPA has no sliding-window without a dense mask"
PEERS = {
    "torch": "2.11.0+cu130", "cudnn": 91002, "cuda": "13.0", "gpu": "NVIDIA H100 80GB HBM3",
    "peers": {
        OURS["cases"][0]["name"]: {
            "torch_flash": {"ms": 10.0, "skipped": None, "rel_l2_err": 0.004},
            "torch_cudnn": {"ms": 4.0, "skipped": None, "rel_l2_err": 0.003},
            "torch_efficient": {"ms": None, "skipped": "RuntimeError: No available kernel",
                                "rel_l2_err": None},
            "flex": {"ms": 8.0, "skipped": None, "rel_l2_err": None},
        },
        OURS["cases"][1]["name"]: {
            "torch_flash": {"ms": None, "skipped": SDPA_WINDOW, "rel_l2_err": None},
            "torch_cudnn": {"ms": None, "skipped": SDPA_WINDOW, "rel_l2_err": None},
            "torch_efficient": {"ms": None, "skipped": SDPA_WINDOW, "rel_l2_err": None},
            "flex": {"ms": 4.0, "skipped": None, "rel_l2_err": None},
        },
        # the third case has no peer results at all
    },
    "serving": {
        "varlen prefill 3 seqs": {
            "torch_flash_padded": {"ms": 5.0, "skipped": None, "rel_l2_err": None},
            "torch_nested": {"ms": 3.0, "skipped": None, "rel_l2_err": None, "note": "KV expanded"},
            "torch_cudnn_padded": {"ms": None, "skipped": "RuntimeError: no kernel", "rel_l2_err": None},
        },
        "decode dense b1 cache32768 hq32 hkv8 splits9": {
            "torch_flash": {"ms": 0.1, "skipped": None, "rel_l2_err": None, "gbps": 1350.0},
        },
        "kv cache paged 16 b8 cache4096 q512": {
            "flex": {"ms": None, "skipped": "no torch peer for this row", "rel_l2_err": None},
        },
    },
    "mechanisms": {
        ADDITIVE: {
            "torch_unfused": {"ms": 10.0, "skipped": None, "rel_l2_err": None,
                              "peak_bytes": 3300 * 10**6, "note": "eager"},
            "torch_unfused_compiled": {"ms": 3.0, "skipped": None, "rel_l2_err": None,
                                       "peak_bytes": 40 * 10**6},
        },
        BACKWARD: {
            "torch_flash": {"ms": 1.0, "skipped": None, "rel_l2_err": None},
            "torch_cudnn": {"ms": None, "skipped": "RuntimeError: no kernel", "rel_l2_err": None},
            "torch_efficient": {"ms": 2.0, "skipped": None, "rel_l2_err": None},
        },
    },
    "backward_accuracy": {
        BACKWARD: {"shape": "b1 hq8 hk2 lq1024 lk1024 d64 causal bf16",
                   "errors": {"torch_flash": 4e-3, "torch_cudnn": None, "torch_efficient": 2e-3,
                              "ours_capi": 3e-3},
                   "notes": {"torch_cudnn": "RuntimeError: no kernel"}},
        "backward far off": {"shape": "b1 hq4 hk4 lq1024 lk1024 d128 full bf16",
                             "errors": {"torch_flash": 1e-3, "torch_cudnn": 1e-3, "torch_efficient": 1e-3,
                                        "ours_capi": 3e-3}},
    },
}


def run_report(tmp, extra=()):
    ours_path = os.path.join(tmp, "ours.json")
    peers_path = os.path.join(tmp, "peers.json")
    with open(ours_path, "w") as f:
        json.dump(OURS, f)
    with open(peers_path, "w") as f:
        json.dump(PEERS, f)
    out_dir = os.path.join(tmp, "bench-results")
    cmd = [sys.executable, os.path.join(HERE, "report.py"), "--ours", ours_path,
           "--peers", peers_path, "--out-dir", out_dir, "--date", "2025-01-02", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc, out_dir


class ReportEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmpdir = tempfile.TemporaryDirectory()
        tmp = cls.tmpdir.name
        log = os.path.join(tmp, "gpu-tests.log")
        with open(log, "w") as f:
            f.write("test result: ok. 42 passed\n")
        cls.proc, cls.out_dir = run_report(tmp, ["--log", log])
        cls.stem = os.path.join(cls.out_dir, "2025-01-02-h100-abc1234-dirty")

    @classmethod
    def tearDownClass(cls):
        cls.tmpdir.cleanup()

    def load(self):
        with open(self.stem + ".json") as f:
            return json.load(f)

    def md(self):
        with open(self.stem + ".md") as f:
            return f.read()

    def test_exit_and_files(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr)
        for ext in (".json", ".md", "-tests.log"):
            self.assertTrue(os.path.exists(self.stem + ext), ext)
        with open(self.stem + "-tests.log") as f:
            self.assertIn("42 passed", f.read())
        if HAVE_MPL:
            self.assertTrue(os.path.exists(self.stem + ".png"))
        else:
            self.assertFalse(os.path.exists(self.stem + ".png"))
            self.assertIn("matplotlib", self.proc.stderr)

    def test_json_metadata(self):
        r = self.load()
        self.assertEqual(r["commit"], "abc1234def5678")
        self.assertIs(r["dirty"], True)
        self.assertEqual(r["date"], "2025-01-02")
        self.assertEqual(r["gpu"], "NVIDIA H100 80GB HBM3")
        self.assertEqual(r["driver"], "580.65")
        self.assertEqual(r["cuda"], "13.0")
        self.assertEqual(r["torch"], "2.11.0+cu130")
        self.assertEqual(r["cudnn"], 91002)
        self.assertEqual(len(r["cases"]), 3)

    def test_serving_rows_and_peers(self):
        rows = self.load()["serving"]
        self.assertEqual(len(rows), 3)
        self.assertIn("| decode dense b1 cache32768 hq32 hkv8 splits9 | `fa_fwd_sm80_bf16_hd128` | 0.0500 | 2700 | 90% | 1350 | — | — |",
                      self.md())
        self.assertNotIn("seq_lens", rows[0])  # the lengths stay in ours.json
        self.assertEqual(rows[0]["best_peer"], "torch_nested")
        self.assertAlmostEqual(rows[0]["ours_vs_best_peer"], 1.5)
        self.assertNotIn("best_peer", rows[1])
        md = self.md()
        self.assertIn("| varlen prefill 3 seqs | `fa_fwd_sm90_bf16_hd128` | 2.000 | 0.5 | 3.000 | torch_nested | 3.000 | 1.50 |", md)
        self.assertIn("| kv cache paged 16 b8 cache4096 q512 | `fa_fwd_sm80_bf16_hd128` | 1.000 | 1.0 | — | — | — | — |", md)
        self.assertIn("varlen prefill 3 seqs, torch_cudnn_padded skipped: RuntimeError: no kernel", md)

    def test_mechanisms(self):
        add, bwd = self.load()["mechanisms"]
        self.assertEqual(add["name"], ADDITIVE)
        self.assertAlmostEqual(add["ratios"]["ours_vs_torch_unfused"], 5.0)
        self.assertAlmostEqual(add["ratios"]["ours_vs_torch_unfused_compiled"], 1.5)
        self.assertAlmostEqual(add["memory_ratios"]["memory_vs_torch_unfused"], 165.0)
        self.assertAlmostEqual(add["memory_ratios"]["memory_vs_torch_unfused_compiled"], 2.0)
        self.assertAlmostEqual(bwd["ratios"]["ours_vs_torch_flash"], 0.25)
        self.assertIsNone(bwd["ratios"]["ours_vs_torch_cudnn"])
        self.assertNotIn("memory_ratios", bwd)  # no peak memory on either side
        md = self.md()
        section = md.split("## Mechanisms")[1].split("## Backward accuracy")[0]
        self.assertIn("| %s | `fa_additive_bf16` | 2.000 | 1.00 | torch_unfused | 10.000 | 5.00 | 20.0 | "
                      "3300.0 | 165.0 |" % ADDITIVE, section)
        self.assertIn("| %s | `fa_additive_bf16` | 2.000 | 1.00 | torch_unfused_compiled | 3.000 | 1.50 | "
                      "20.0 | 40.0 | 2.0 |" % ADDITIVE, section)
        kernel = "`fa_bwd_dq_naive_bf16 + fa_bwd_dkdv_naive_bf16`"
        self.assertIn("| %s | %s | 4.000 | 2.50 | torch_flash | 1.000 | 0.25 | — | — | — |"
                      % (BACKWARD, kernel), section)
        self.assertIn("| %s | %s | 4.000 | 2.50 | torch_cudnn | — | — | — | — | — |"
                      % (BACKWARD, kernel), section)
        self.assertIn("- %s, torch_cudnn skipped: RuntimeError: no kernel" % BACKWARD, section)
        self.assertEqual(len([l for l in section.splitlines() if l.startswith("| ")]), 1 + 2 + 3)  # header, 2 additive peers, 3 SDPA backends

    def test_json_case_merge_and_ratios(self):
        c0, c1, c2 = self.load()["cases"]
        # our fields survive
        self.assertEqual(c0["kernel"], "fa_fwd_sm80_bf16_hd128")
        self.assertEqual(c0["rel_l2_err"], 0.004)
        self.assertEqual(c0["peers"], {"torch_flash": 10.0, "torch_cudnn": 4.0,
                                       "torch_efficient": None, "flex": 8.0})
        self.assertEqual(c0["peers_skipped"],
                         {"torch_efficient": "RuntimeError: No available kernel"})
        self.assertAlmostEqual(c0["ratios"]["ours_vs_torch_flash"], 2.0)
        self.assertAlmostEqual(c0["ratios"]["ours_vs_torch_cudnn"], 0.8)
        self.assertAlmostEqual(c0["ratios"]["ours_vs_flex"], 1.6)
        self.assertIsNone(c0["ratios"]["ours_vs_torch_efficient"])
        # 2e12 FLOP in 10 ms = 200 TFLOP/s
        self.assertAlmostEqual(c0["peer_tflops"]["torch_flash"], 200.0)
        self.assertAlmostEqual(c0["peer_tflops"]["torch_cudnn"], 500.0)
        self.assertIsNone(c0["peer_tflops"]["torch_efficient"])
        self.assertEqual(c0["peers_rel_l2_err"]["torch_cudnn"], 0.003)

        self.assertEqual(c1["peers_skipped"]["torch_flash"], SDPA_WINDOW)
        self.assertAlmostEqual(c1["ratios"]["ours_vs_flex"], 2.0)
        self.assertAlmostEqual(c1["peer_tflops"]["flex"], 250.0)

        self.assertEqual(c2["peers"], {})
        self.assertEqual(c2["ratios"], {})

    def test_backward_accuracy(self):
        md = self.md()
        self.assertIn("## Backward accuracy", md)
        section = md.split("## Backward accuracy")[1]
        rows = [[x.strip() for x in r.strip("|").split("|")] for r in section.splitlines()
                if r.startswith("| ") and not r.startswith("| case")]
        # The best torch (efficient, 2e-3) is the yardstick; a backend that did not run is "—".
        self.assertEqual(rows[0][2:], ["3.00e-03", "4.00e-03", "—", "2.00e-03", "1.50 (within 2x)"])
        self.assertEqual(rows[1], ["backward far off", "b1 hq4 hk4 lq1024 lk1024 d128 full bf16", "3.00e-03",
                                   "1.00e-03", "1.00e-03", "1.00e-03", "3.00 (**over 2x**)"])
        self.assertIn("torch_cudnn: RuntimeError: no kernel", section)
        self.assertIn(BACKWARD, self.load()["backward_accuracy"])

    def test_markdown(self):
        md = self.md()
        self.assertIn("NVIDIA H100 80GB HBM3", md)
        self.assertIn("abc1234def5678", md)
        self.assertIn("(dirty)", md)
        self.assertIn("2.11.0+cu130", md)
        self.assertIn("91002", md)
        grid = md.split("## Serving cases")[0]  # the serving table is checked on its own
        rows = [l for l in grid.splitlines() if l.startswith("| ")]
        header = [h.strip() for h in rows[0].strip("|").split("|")]
        self.assertEqual(header[:8], ["shape (B, Hq/Hkv, Lq/Lk, D)", "mask", "dtype", "dir",
                                      "kernel", "GFLOP", "ours ms", "ours TFLOP/s"])
        self.assertEqual(header[8:], ["flash TFLOP/s", "cudnn TFLOP/s", "efficient TFLOP/s",
                                      "flex TFLOP/s", "× flash", "× cudnn", "rel L2 err"])
        body = [[x.strip() for x in r.strip("|").split("|")] for r in rows[1:]]
        self.assertEqual(len(body), 3)
        self.assertEqual(body[0], ["8, 16/16, 2048/2048, 128", "causal", "bf16", "fwd",
                                   "`fa_fwd_sm80_bf16_hd128`", "2000.0", "5.000", "400.0",
                                   "200.0", "500.0", "—", "250.0", "2.00×", "0.80×",
                                   "4.0e-03"])
        self.assertEqual(body[1][:2], ["1, 16/16, 16384/16384, 128", "window(4096,0)"])
        self.assertEqual(body[1][8:], ["—", "—", "—", "250.0", "—", "—", "5.0e-03"])
        self.assertEqual(body[2][0], "4, 32/8, 4096/4096, 128")
        self.assertIn("## Skipped", md)
        self.assertIn("torch_efficient skipped (1): RuntimeError: No available kernel", md)
        self.assertIn("torch_flash skipped (1): " + SDPA_WINDOW, md)
        self.assertIn("no peer results (1): f16 b4 s4096 hq32 hkv8 d128 full", md)


class ReportHelpers(unittest.TestCase):
    def test_gpu_slug(self):
        self.assertEqual(report.gpu_slug("NVIDIA H100 80GB HBM3"), "h100")
        self.assertEqual(report.gpu_slug("NVIDIA H200"), "h200")
        self.assertEqual(report.gpu_slug("NVIDIA GH200 480GB"), "gh200")
        self.assertEqual(report.gpu_slug("NVIDIA A100-SXM4-80GB"), "a100")
        self.assertEqual(report.gpu_slug("NVIDIA GeForce RTX 4090"), "geforce-rtx-4090")
        self.assertEqual(report.gpu_slug(None), "unknown")

    def test_stem(self):
        self.assertEqual(report.report_stem("2025-01-02", "NVIDIA H200", "0123456789", False),
                         "2025-01-02-h200-0123456")
        self.assertEqual(report.report_stem("2025-01-02", "NVIDIA H200", "0123456789", True),
                         "2025-01-02-h200-0123456-dirty")

    def test_mechanisms_absent_or_without_peers(self):
        ours = {k: v for k, v in OURS.items() if k != "mechanisms"}
        md = report.markdown(report.build_report(ours, PEERS, "2025-01-02"))
        self.assertNotIn("## Mechanisms", md)
        # Rows whose peers did not run (no "mechanisms" in peers.json) still get a line.
        r = report.build_report(OURS, {k: v for k, v in PEERS.items() if k != "mechanisms"}, "2025-01-02")
        self.assertEqual(r["mechanisms"][0]["peers"], {})
        self.assertIn("| %s | `fa_additive_bf16` | 2.000 | 1.00 | — | — | — | 20.0 | — | — |" % ADDITIVE,
                      report.markdown(r))

    def test_missing_log_is_a_warning(self):
        with tempfile.TemporaryDirectory() as tmp:
            proc, out_dir = run_report(tmp, ["--log", os.path.join(tmp, "absent.log")])
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("not found", proc.stderr)
            self.assertTrue(os.path.exists(
                os.path.join(out_dir, "2025-01-02-h100-abc1234-dirty.md")))


class PeerHelpers(unittest.TestCase):
    """peers.py's pure-Python mask logic (the rest needs a GPU)."""

    def brute(self, lq, lk, left, right):
        off = lk - lq
        return {(i, j) for i in range(lq) for j in range(lk)
                if (left is None or j >= i + off - left)
                and (right is None or j <= i + off + right)}

    def test_visible_matches_bottom_right_definition(self):
        for lq, lk in ((5, 5), (3, 7), (7, 3)):
            for left, right in ((None, 0), (2, 0), (1, 1), (0, None), (None, 3)):
                vis = peers.make_visible(lq, lk, left, right)
                got = {(i, j) for i in range(lq) for j in range(lk) if vis(0, 0, i, j)}
                self.assertEqual(got, self.brute(lq, lk, left, right), (lq, lk, left, right))
        self.assertIsNone(peers.make_visible(4, 4, None, None))

    def test_mask_bounds_and_kind(self):
        self.assertEqual(peers.mask_bounds({"mask": "causal"}), (None, 0))
        self.assertEqual(peers.mask_bounds({"mask": "full"}), (None, None))
        self.assertEqual(peers.mask_bounds({"mask": "window(128, 0)"}), (128, 0))
        self.assertEqual(peers.mask_bounds({"mask": "window(inf,16)"}), (None, 16))
        self.assertEqual(peers.mask_bounds(
            {"mask": "window(4096,0)", "window_left": 4096, "window_right": 0}), (4096, 0))
        self.assertEqual(peers.mask_kind(None, 0), "causal")
        self.assertEqual(peers.mask_kind(None, None), "full")
        self.assertEqual(peers.mask_kind(4096, 0), "window")

    def test_sdpa_reasons(self):
        self.assertIsNone(peers.sdpa_mask_reason("full", 3, 7))
        self.assertIsNone(peers.sdpa_mask_reason("causal", 7, 7))
        self.assertIn("top-left", peers.sdpa_mask_reason("causal", 3, 7))
        self.assertEqual(peers.sdpa_mask_reason("window", 7, 7), SDPA_WINDOW)

    def test_mechanism_without_a_peer_is_skipped(self):
        # An unknown mechanism (e.g. a later maps row) is recorded, never raised; no torch needed.
        res = peers.mechanism_peers(None, {"name": "maps", "mechanism": "maps"}, None)
        self.assertIsNone(res["torch"]["ms"])
        self.assertIn("no torch peer", res["torch"]["skipped"])

    def test_num_input_sets(self):
        self.assertEqual(peers.num_input_sets(300 << 20, 256 << 20), 1)
        self.assertEqual(peers.num_input_sets(100 << 20, 256 << 20), 3)
        self.assertEqual(peers.num_input_sets(1, 256 << 20), peers.MAX_INPUT_SETS)


if __name__ == "__main__":
    unittest.main(verbosity=2)
