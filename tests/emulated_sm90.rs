//! CPU tier, emulated (Hopper): the real `kernels/fwd_sm90.cu` source, with its
//! inline PTX translated instruction by instruction into calls to a host
//! emulator (`tools/sm90-emu`), run thread by thread on the CPU, against an
//! f64 reference of DESIGN.md section 1 (`tools/emu-common/check.h`: O's
//! relative L2, its worst row, LSE relative to the row's largest score, stray
//! writes, empty rows).
//!
//! Kernels: every row of the FA_KERNEL table (f16/bf16 × head-dim buckets 64,
//! 128, 256, and every variant: no ping-pong, other ring depths, persistent
//! grids launched with 1 to 5 CTAs so that each loops over several tiles, with
//! and without keys).
//!
//! Cases, fixed:
//! * schedule and memory: mixed (GQA 2:1, odd lengths, causal with Lq ≠ Lk),
//!   masks (full, causal, windows on one or both sides, diagonal only,
//!   top-left alignment), empty rows and row blocks, zero keys, one element,
//!   head dims inside a bucket (dead 64-column boxes), BHSD and padded
//!   strides, more key tiles than ring stages;
//! * semantics, per bucket and both dtypes: GQA 8:2 and 12:3 (several KV heads,
//!   4+ query heads each), custom scales (0.3, 1.7, −0.7), lengths one
//!   short of a tile (Lq = block_m − 1 or 2·block_m − 1, Lk = k·block_n − 1),
//!   every tensor with its own layout (Q, K, V, O in different ones of BSHD,
//!   BHSD, SBHD, differently padded, so no two share a batch, row or head
//!   stride; V's tensor map from V's own strides, as src/device/mod.rs does;
//!   LSE with padded head and batch strides), scores in the hundreds to
//!   thousands, softcap 5 and softcaps 1e-30, 1e6, 1e38 and f32::MAX (c·tanh(s/c)
//!   relatively accurate for every finite c);
//! * ALiBi and attention sinks (DESIGN.md 1b), per bucket: slopes per head
//!   (the usual 2^(-8(h+1)/Hq), and 16× that after softcap 5 with a window and
//!   Lq > Lk) and per batch entry (`[B, Hq]` at a padded stride, NaN in the
//!   gaps) with GQA 8:2 and Lq < Lk under a full mask (whole tiles without the
//!   element mask); sinks N(0, 2) and dominant ones (8 + h/4) on rows and
//!   whole row blocks that see no key (LSE = sink); and on a packed batch,
//!   a dense and a paged cache (each sequence's own distances). The
//!   rectangular ones on the default, persistent and `__ov` rows (the other
//!   variants share the default's score code).
//!
//! Cases, random (two seeded sweeps of 40): batch, GQA ratios 1 to 6 with 1 to
//! 3 KV heads, lengths, head dims, windows, softcaps, amplitudes, layouts
//! (shared or one per tensor), custom scales (a third of them, half negative),
//! ALiBi and sinks (a quarter of them each).
//!
//! Modes: TMA copies landing at issue, at random later points or as late as
//! possible; wgmma results at issue or only at the retiring wait_group
//! (accumulators poisoned in between); both readings of a TMA box that lies
//! wholly out of bounds (zero-filled and counted, or nothing at all; the
//! kernel must not issue one); and rounding either exact (wgmma sums in
//! double, ex2.approx correctly rounded) or as inexact as the hardware may
//! be (`--round=real`: ex2.approx and __fdividef 2 ulp off, the PTX ISA's and
//! the CUDA guide's maximum; each wgmma k16 step truncated and 1 ulp off), in
//! which the same tolerances must hold. wgmma descriptors and swizzles,
//! tensor maps, mbarrier phases and tx-counts, named barriers, setmaxnreg,
//! generic/async proxy fences (coarsely), bounds and stray writes are
//! checked, and a deadlock names where each warp waits. It is no substitute
//! for the GPU tier: the emulator encodes our reading of the PTX ISA.
//!
//! Needs g++, python3 and the CUDA headers (next to `$NVCC`, or
//! `$CUDA_HOME/include`); fails when they are missing under
//! `FUSED_ATTN_REQUIRE_KERNELS=1`, else skips.
//!
//! Negative control, by hand (not in CI: about a build and a run per mutant,
//! several minutes on 2 cores): `cargo test --test emulated_sm90 --
//! --ignored --nocapture` injects known bugs into a copy of the kernel source
//! (`MUTANTS`: pipeline and barrier bugs, dead boxes, persistent CTAs, and
//! what is computed: GQA head mapping, O/V/LSE addressing, scale, log2(e),
//! softcap, mask edges ±1 on both sides, diag_offset, tile ranges, LSE units,
//! online-softmax rescaling and reductions, ALiBi's sign, units, distances,
//! slope index and tiles, the sink's count, units, head and paths), checks
//! that each one is caught and prints which check caught it.

#[path = "common/emu.rs"]
mod emu;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use emu::{control_verdict, mutated_copy, output, prerequisites, run_modes, tail, Mutant};

/// Translates `kernels` into `work` and compiles the emulator there.
fn build(kernels: &Path, work: &Path, include: &Path) -> Result<PathBuf, String> {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/sm90-emu");
    output(
        Command::new("python3").arg(tool.join("gen.py")).arg(kernels).arg(work),
        "translating the kernel source (gen.py)",
    )?;
    let exe = work.join("emu");
    output(
        Command::new("g++")
            .args(["-O2", "-std=c++17", "-w"])
            .arg("-I")
            .arg(include)
            .arg("-I")
            .arg(&tool)
            .arg("-I")
            .arg(work)
            .arg(tool.join("emu.cpp"))
            .arg("-o")
            .arg(&exe),
        "compiling the emulator",
    )?;
    Ok(exe)
}

fn stat(out: &str, label: &str) -> u64 {
    // "stats: 117 CTAs, 6302 wgmma (2598 with A from registers, ...": the number before `label`.
    let line = out.lines().find(|l| l.starts_with("stats:")).unwrap_or("");
    let Some(at) = line.find(label) else { return 0 };
    line[..at].trim_end().rsplit(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[test]
fn sm90_kernel_source_passes_under_the_emulator() {
    let Some(include) = prerequisites("sm90_kernel_source_passes_under_the_emulator") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("fused-attn-emu90-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let exe = build(&root.join("kernels"), &work, &include).unwrap_or_else(|e| panic!("{e}"));
    // Strictest first: copies land as late as possible, wgmma results only at
    // the retiring wait_group; then copies at random points with results at
    // issue; a fixed thread order with copies at issue; the fixed cases again
    // with wholly out-of-bounds boxes read as "nothing lands, 0 bytes"; a
    // seeded random sweep in both wgmma timings (one of them in that OOB
    // reading too). Persistent kernels get 1, 2, 3 or 5 CTAs (--sms), so that
    // CTAs loop over several tiles and the ring and barrier phases run on
    // across them.
    // The second and the last mode round as inexactly as the hardware may
    // (ex2.approx and __fdividef at their documented 2 ulp, wgmma steps
    // truncated and 1 ulp off): the tolerances must hold for that too.
    let modes: &[&[&str]] = &[
        &["--tma=lazy", "--wgmma=wait", "--seed=1", "--sms=3"],
        &["--tma=random", "--wgmma=issue", "--seed=2", "--sms=2", "--round=real"],
        &["--tma=eager", "--wgmma=wait", "--ordered", "--cases=quick", "--sms=2"],
        &["--tma=random", "--wgmma=wait", "--seed=5", "--sms=1", "--oob-box=skip-empty", "--cases=base"],
        &["--tma=random", "--wgmma=wait", "--seed=3", "--cases=none", "--random=40", "--sms=3"],
        &[
            "--tma=lazy",
            "--wgmma=issue",
            "--seed=4",
            "--cases=none",
            "--random=40",
            "--sms=5",
            "--oob-box=skip-empty",
            "--round=real",
        ],
    ];
    let mut failures = Vec::new();
    for (args, ok, out) in run_modes(&exe, &work, modes) {
        let verdict = out.lines().last().unwrap_or("");
        eprintln!("emulator: {verdict}");
        if let Some(s) = out.lines().find(|l| l.starts_with("stats:")) {
            eprintln!("  {s}");
        }
        if !ok || !verdict.contains(": 0 failing cases, 0 emulator errors") {
            let bad: Vec<&str> =
                out.lines().filter(|l| !l.starts_with("ok ") && !l.starts_with("stats:")).take(60).collect();
            failures.push(format!(
                "emulator {args}:\n{}\nreproduce: python3 tools/sm90-emu/gen.py kernels /tmp/emu90 && g++ -O2 \
                 -std=c++17 -w -I {} -I tools/sm90-emu -I /tmp/emu90 tools/sm90-emu/emu.cpp -o /tmp/emu90/emu && \
                 /tmp/emu90/emu {args}",
                bad.join("\n"),
                include.display()
            ));
        }
        // The fixed cases must reach what they are there for.
        if !args.contains("--cases=") {
            for (label, what) in [
                ("with A from registers", "P·V with A from registers"),
                ("with B MN-major", "V as an MN-major (transposed) B operand"),
                ("partly and", "partly out-of-bounds TMA boxes"),
                ("persistent launches", "persistent launches with CTAs looping over tiles"),
                ("of them mixing", "persistent launches mixing tiles with and without keys"),
            ] {
                assert!(stat(&out, label) > 0, "emulator {args}: no {what} were exercised");
            }
        }
        // Head dims inside a bucket (hd256 with head_dim <= 192) have 64-column
        // boxes wholly past head_dim: the kernel must skip them, in every mode,
        // since what the TMA does with such a box is not documented.
        let wholly = stat(&out, "wholly out of bounds");
        if wholly > 0 {
            failures.push(format!("emulator {args}: the kernel issued {wholly} TMA boxes wholly out of bounds"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&work);
}

const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "V descriptor: LBO and SBO swapped",
        file: "common/sm90_wgmma.cuh",
        edits: &[(
            "return wgmma_desc_sw128(smem_addr, box_bytes, 1024);",
            "return wgmma_desc_sw128(smem_addr, 1024, box_bytes);",
        )],
    },
    Mutant {
        name: "wgmma wait<1> before the softmax dropped",
        file: "fwd_sm90.cu",
        edits: &[("wgmma_wait<1>();  // S_j is done", "// S_j is done")],
    },
    Mutant {
        name: "wgmma wait<0> of the main loop dropped",
        file: "fwd_sm90.cu",
        edits: &[("wgmma_wait<0>();  // O, and the registers", "// O, and the registers")],
    },
    Mutant {
        name: "wgmma.fence of the main loop dropped",
        file: "fwd_sm90.cu",
        edits: &[("wgmma_fence();  // O rescaled", "// O rescaled")],
    },
    Mutant {
        name: "consumers wait for K with the wrong parity",
        file: "fwd_sm90.cu",
        edits: &[("mbarrier_wait_warp(k_full(stage), phase);", "mbarrier_wait_warp(k_full(stage), phase ^ 1);")],
    },
    Mutant {
        name: "producer waits for a free slot with the wrong parity",
        file: "fwd_sm90.cu",
        edits: &[("mbarrier_wait(k_empty(stage), phase ^ 1);", "mbarrier_wait(k_empty(stage), phase);")],
    },
    Mutant {
        name: "consumers wait for V with the next tile's parity",
        file: "fwd_sm90.cu",
        edits: &[(
            "mbarrier_wait_warp(v_full(prev_stage), prev_phase);",
            "mbarrier_wait_warp(v_full(prev_stage), phase);",
        )],
    },
    Mutant {
        name: "-inf guard of the running max dropped",
        file: "common/sm90_softmax.cuh",
        edits: &[("const float sub = mx == -INFINITY ? 0.f : mx;", "const float sub = mx;")],
    },
    Mutant {
        name: "V slot released as soon as P·V is issued",
        file: "fwd_sm90.cu",
        edits: &[
            ("release(v_empty(prev_stage));\n                    scale_rows", "scale_rows"),
            (
                "gemm_pv(prev_stage);\n                    pass_turn();",
                "gemm_pv(prev_stage);\n                    pass_turn();\n                    release(v_empty(prev_stage));",
            ),
        ],
    },
    // ---- variants __ov: the wait for P V at the head of the next iteration ----
    Mutant {
        name: "__ov: V slot released before the loop-head wait<0>",
        file: "fwd_sm90.cu",
        edits: &[(
            "wgmma_wait<0>();  // O, and the registers of P_{j-2}, are ours again\n                    \
             wgmma_pin(o);\n                    wgmma_pin(pa);\n                    if (pv_stage >= 0) \
             release(v_empty(pv_stage));",
            "if (pv_stage >= 0) release(v_empty(pv_stage));\n                    wgmma_wait<0>();\n                    \
             wgmma_pin(o);\n                    wgmma_pin(pa);",
        )],
    },
    Mutant {
        name: "__ov: P_{j-1} written to the A fragments before the loop-head wait<0> (P_{j-2} still in use)",
        file: "fwd_sm90.cu",
        edits: &[
            (
                "wgmma_wait<0>();  // O, and the registers of P_{j-2}, are ours again",
                "wgmma_acc_to_a<T>(s, pa);\n                    wgmma_wait<0>();",
            ),
            (
                "scale_rows(o, alpha);\n                    wgmma_acc_to_a<T>(s, pa);\n\n                    const int prev_stage",
                "scale_rows(o, alpha);\n\n                    const int prev_stage",
            ),
        ],
    },
    Mutant {
        name: "__ov: the last P V of the loop not waited for",
        file: "fwd_sm90.cu",
        edits: &[("wgmma_wait<0>();  // O, and the registers of P_{n-2}, are ours again", "")],
    },
    Mutant {
        name: "expect_tx of a K tile 1 KiB short",
        file: "fwd_sm90.cu",
        edits: &[(
            "mbarrier_arrive_expect_tx(k_full(stage), live_boxes * Cfg::kKvBoxBytes);",
            "mbarrier_arrive_expect_tx(k_full(stage), live_boxes * Cfg::kKvBoxBytes - 1024);",
        )],
    },
    Mutant {
        name: "empty barriers expect one arrival too many",
        file: "fwd_sm90.cu",
        edits: &[("mbarrier_init(k_empty(s), Cfg::kReleasers);", "mbarrier_init(k_empty(s), Cfg::kReleasers + 1);")],
    },
    Mutant {
        name: "Q barrier arrived on twice",
        file: "fwd_sm90.cu",
        edits: &[(
            "mbarrier_arrive_expect_tx(q_full, live_boxes * Cfg::kQBoxBytes);",
            "mbarrier_arrive_expect_tx(q_full, live_boxes * Cfg::kQBoxBytes / 2); \
             mbarrier_arrive_expect_tx(q_full, live_boxes * Cfg::kQBoxBytes / 2);",
        )],
    },
    Mutant {
        name: "producer does not wait for free K slots",
        file: "fwd_sm90.cu",
        edits: &[("mbarrier_wait(k_empty(stage), phase ^ 1);", "")],
    },
    Mutant {
        name: "producer loads one key tile too many (never consumed)",
        file: "fwd_sm90.cu",
        edits: &[(
            "for (int j = 0; j < kt.n_tiles; ++j) {\n                    const int n0",
            "for (int j = 0; j <= kt.n_tiles; ++j) {\n                    const int n0",
        )],
    },
    Mutant { name: "fence.mbarrier_init dropped", file: "fwd_sm90.cu", edits: &[("mbarrier_init_fence();", "")] },
    Mutant {
        name: "__syncthreads after the mbarrier inits dropped",
        file: "fwd_sm90.cu",
        edits: &[("    __syncthreads();\n", "\n")],
    },
    Mutant {
        name: "epilogue barrier between staging and reading O dropped",
        file: "fwd_sm90.cu",
        edits: &[(
            "named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);\n\n            // 16-byte chunks",
            "\n            // 16-byte chunks",
        )],
    },
    // ---- boxes wholly past head_dim (hd256 with head_dim <= 192) ----
    Mutant {
        name: "producer issues the boxes wholly past head_dim and counts them (the old kernel)",
        file: "fwd_sm90.cu",
        edits: &[
            ("if (c < live_boxes)", "if (true)"),
            ("live_boxes * Cfg::kQBoxBytes", "Cfg::kQBytes"),
            ("live_boxes * Cfg::kKvBoxBytes", "Cfg::kKvBytes"),
        ],
    },
    Mutant {
        name: "Q and K bytes of the boxes past head_dim not zeroed",
        file: "fwd_sm90.cu",
        edits: &[("if (live_boxes < Cfg::kBoxes) {", "if (false) {")],
    },
    Mutant {
        name: "proxy fence after zeroing the boxes past head_dim dropped",
        file: "fwd_sm90.cu",
        edits: &[("        fence_proxy_async_shared();\n    }\n    // The last CTA-wide barrier", "    }\n    // The last CTA-wide barrier")],
    },
    // ---- persistent CTAs ----
    Mutant {
        name: "persistent: producer overwrites Q without waiting for the epilogue (no Q-free wait)",
        file: "fwd_sm90.cu",
        edits: &[("if constexpr (Cfg::kPersistent) mbarrier_wait(q_free, (q_loads & 1) ^ 1);", "")],
    },
    Mutant {
        name: "persistent: Q-free arrival before the staged O is read back",
        file: "fwd_sm90.cu",
        edits: &[
            ("                fence_proxy_async_shared();\n                mbarrier_arrive(q_free);\n", ""),
            (
                "            named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);\n\n            // 16-byte chunks",
                "            named_barrier_sync(kBarEpilogue + cw, kWarpgroupThreads);\n            if constexpr \
                 (Cfg::kPersistent) {\n                fence_proxy_async_shared();\n                \
                 mbarrier_arrive(q_free);\n            }\n\n            // 16-byte chunks",
            ),
        ],
    },
    Mutant {
        name: "persistent: proxy fence before the Q-free arrival dropped",
        file: "fwd_sm90.cu",
        edits: &[(
            "                fence_proxy_async_shared();\n                mbarrier_arrive(q_free);",
            "                mbarrier_arrive(q_free);",
        )],
    },
    Mutant {
        name: "persistent: consumers wait for every tile's Q with parity 0 (phase not carried across tiles)",
        file: "fwd_sm90.cu",
        edits: &[("mbarrier_wait_warp(q_full, q_phase);", "mbarrier_wait_warp(q_full, 0);")],
    },
    Mutant {
        name: "persistent: consumers restart the K/V ring at each tile (the producer's runs on)",
        file: "fwd_sm90.cu",
        edits: &[(
            "            n_begin = kt.n_begin, n_tiles = kt.n_tiles",
            "            stage = 0;\n            phase = 0;\n            n_begin = kt.n_begin, n_tiles = kt.n_tiles",
        )],
    },
    Mutant {
        name: "persistent: epilogue stages the boxes past head_dim too (the zeroed Q columns get O's garbage)",
        file: "fwd_sm90.cu",
        edits: &[("if (box == 0 || box < live_boxes) {", "if (true) {")],
    },
    // ---- what is computed (DESIGN.md section 1) ----
    Mutant {
        name: "GQA: query head h reads KV head h % Hk instead of h / (Hq / Hk)",
        file: "fwd_sm90.cu",
        edits: &[("head_kv = head / p.q_per_kv;", "head_kv = head % p.heads_kv;")],
    },
    Mutant {
        name: "O stored with Q's batch and head strides",
        file: "fwd_sm90.cu",
        edits: &[(
            "static_cast<T *>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride",
            "static_cast<T *>(p.o) + batch * p.q_batch_stride + head * p.q_head_stride",
        )],
    },
    Mutant {
        name: "O stored with Q's row stride",
        file: "fwd_sm90.cu",
        edits: &[("o_head + row * p.o_row_stride", "o_head + row * p.q_row_stride")],
    },
    Mutant {
        name: "V loaded through K's tensor map",
        file: "fwd_sm90.cu",
        edits: &[("&P.tma_v, 64 * c, kv_row, head_kv", "&P.tma_k, 64 * c, kv_row, head_kv")],
    },
    Mutant {
        name: "p.scale ignored (the default 1/sqrt(head_dim) instead)",
        file: "fwd_sm90.cu",
        edits: &[(
            "const float score_in = launch.scale * kLog2e;",
            "const float score_in = (1.f / sqrtf((float)launch.head_dim)) * kLog2e;",
        )],
    },
    Mutant {
        name: "log2(e) dropped from the scores (softmax in base 2)",
        file: "fwd_sm90.cu",
        edits: &[("const float score_in = launch.scale * kLog2e;", "const float score_in = launch.scale;")],
    },
    Mutant {
        name: "softcap dropped",
        file: "fwd_sm90.cu",
        edits: &[("const bool capped = launch.softcap > 0.f;", "const bool capped = false;")],
    },
    Mutant {
        name: "softcap, |s/c| > 0.55: log2(e) dropped after the tanh",
        file: "common/math.cuh",
        edits: &[("c * (th * 1.4426950408889634f)", "c * th")],
    },
    Mutant {
        name: "softcap, |s/c| < 0.55: tanh(x)/x polynomial dropped (s uncapped there)",
        file: "common/math.cuh",
        edits: &[("const float near0 = u * q;", "const float near0 = u;")],
    },
    Mutant {
        name: "softcap: the far branch's sign dropped",
        file: "common/math.cuh",
        edits: &[("copysignf(c * (th * 1.4426950408889634f), t)", "c * (th * 1.4426950408889634f)")],
    },
    Mutant {
        name: "mask: left edge one key further left",
        file: "common/mask.cuh",
        edits: &[("i + off - p.window_left;", "i + off - p.window_left - 1;")],
    },
    Mutant {
        name: "mask: left edge one key further right",
        file: "common/mask.cuh",
        edits: &[("i + off - p.window_left;", "i + off - p.window_left + 1;")],
    },
    Mutant {
        name: "mask: right edge one key further right",
        file: "common/mask.cuh",
        edits: &[("i + off + p.window_right + 1;", "i + off + p.window_right + 2;")],
    },
    Mutant {
        name: "mask: right edge one key further left",
        file: "common/mask.cuh",
        edits: &[("i + off + p.window_right + 1;", "i + off + p.window_right;")],
    },
    Mutant {
        name: "mask: diag_offset ignored (always bottom-right)",
        file: "common/mask.cuh",
        edits: &[("const int off = p.diag_offset;", "const int off = p.seqlen_k - p.seqlen_q;")],
    },
    Mutant {
        name: "mask: element mask skipped on the tile that straddles the band's end",
        file: "fwd_sm90.cu",
        edits: &[("n0 + BN <= all_hi", "n0 < all_hi")],
    },
    Mutant {
        name: "key tiles: the last, partial one dropped",
        file: "fwd_sm90.cu",
        edits: &[("(any_row.hi + BN - 1) / BN - k.n_begin", "any_row.hi / BN - k.n_begin")],
    },
    Mutant {
        name: "LSE in log2 units",
        file: "common/sm90_softmax.cuh",
        edits: &[("row_max[h] * 0.6931471805599453f + logf(l)", "row_max[h] + log2f(l)")],
    },
    Mutant {
        name: "LSE without the running max",
        file: "common/sm90_softmax.cuh",
        edits: &[("row_max[h] * 0.6931471805599453f + logf(l)", "logf(l)")],
    },
    Mutant {
        name: "LSE at dense [B, Hq, Lq] offsets (its strides ignored)",
        file: "fwd_sm90.cu",
        edits: &[(
            "p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride",
            "p.lse + (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q",
        )],
    },
    Mutant {
        name: "LSE written for rows past seqlen_q",
        file: "fwd_sm90.cu",
        edits: &[("if (row < p.seqlen_q) lse_row[row] = lse[h];", "lse_row[row] = lse[h];")],
    },
    Mutant {
        name: "O rows past seqlen_q stored",
        file: "fwd_sm90.cu",
        edits: &[("if (row < p.seqlen_q && c * 8 < p.head_dim) {", "if (c * 8 < p.head_dim) {")],
    },
    Mutant {
        name: "online softmax: O not rescaled when the max grows",
        file: "fwd_sm90.cu",
        edits: &[("                scale_rows(o, alpha);\n", "")],
    },
    Mutant {
        name: "online softmax: running sum not rescaled when the max grows",
        file: "common/sm90_softmax.cuh",
        edits: &[("row_sum[h] = row_sum[h] * alpha[h] + sum;", "row_sum[h] = row_sum[h] + sum;")],
    },
    Mutant {
        name: "online softmax: row sum not reduced over the quad",
        file: "common/sm90_softmax.cuh",
        edits: &[("const float l = quad_sum(row_sum[h]);", "const float l = row_sum[h];")],
    },
    // ---- packed batches and caches (common/sequence.cuh, the tail zeroing) ----
    Mutant {
        name: "sequences: the last tile's V rows past seqlen_k not zeroed",
        file: "fwd_sm90.cu",
        edits: &[("v_tail = min(BN, p.seqlen_k - (n_begin + n_tiles - 1) * BN);", "v_tail = BN;")],
    },
    Mutant {
        name: "sequences: zeroing from one row too late",
        file: "fwd_sm90.cu",
        edits: &[("v_tail * 128)[i % chunks]", "(v_tail + 1) * 128)[i % chunks]")],
    },
    Mutant {
        name: "sequences: no proxy fence between the zeros and the wgmma",
        file: "fwd_sm90.cu",
        edits: &[(
            "                fence_proxy_async_shared();\n                named_barrier_sync(kBarTail, kBothConsumers);",
            "                named_barrier_sync(kBarTail, kBothConsumers);",
        )],
    },
    Mutant {
        name: "sequences: no barrier between the consumers' zeroing halves",
        file: "fwd_sm90.cu",
        edits: &[("                named_barrier_sync(kBarTail, kBothConsumers);\n", "")],
    },
    Mutant {
        name: "packed: Q's TMA batch coordinate b instead of 0",
        file: "common/sequence.cuh",
        edits: &[(
            "c = FaTmaCoords{p.cu_seqlens_q[b], 0, c.k_row, c.kv_batch};",
            "c = FaTmaCoords{p.cu_seqlens_q[b], b, c.k_row, c.kv_batch};",
        )],
    },
    Mutant {
        name: "packed: K/V TMA row without the sequence's first key",
        file: "fwd_sm90.cu",
        edits: &[("int kv_row = at.k_row + n0, kv_entry = at.kv_batch;", "int kv_row = n0, kv_entry = at.kv_batch;")],
    },
    Mutant {
        name: "cache: TMA batch entry ignores cache_batch_idx",
        file: "common/sequence.cuh",
        edits: &[("    if (p.cache_batch_idx != nullptr) c.kv_batch = p.cache_batch_idx[b];\n", "")],
    },
    Mutant {
        name: "paged: TMA row = 0 instead of n0's slot in its page",
        file: "common/sequence.cuh",
        edits: &[("    row = n0 - int(pg * unsigned(p.page_size));", "    row = 0;")],
    },
    Mutant {
        name: "packed: consumers keep row blocks past a shorter sequence",
        file: "fwd_sm90.cu",
        edits: &[("            if (m0 >= p.seqlen_q) continue;  // past a shorter sequence's end (as the producer)", "")],
    },
    Mutant {
        name: "packed: epilogue stores through the launch's O, not the sequence's",
        file: "fwd_sm90.cu",
        edits: &[(
            "        FaFwdParams p = launch;\n        bind(p, batch);\n        T *const o_head",
            "        const FaFwdParams &p = launch;\n        T *const o_head",
        )],
    },    // ---- ALiBi and attention sinks (DESIGN.md 1b) ----
    Mutant {
        name: "ALiBi: sign flipped (the bias added)",
        file: "fwd_sm90.cu",
        edits: &[("slope = -kLog2e * p.alibi_slopes", "slope = kLog2e * p.alibi_slopes")],
    },
    Mutant {
        name: "ALiBi: in natural-log units in the log2 domain (log2(e) dropped)",
        file: "fwd_sm90.cu",
        edits: &[("slope = -kLog2e * p.alibi_slopes", "slope = -p.alibi_slopes")],
    },
    Mutant {
        name: "ALiBi: distance without the diagonal offset",
        file: "fwd_sm90.cu",
        edits: &[("pos = m0 + row0 + p.diag_offset - col0;", "pos = m0 + row0 - col0;")],
    },
    Mutant {
        name: "ALiBi: distance from the packed tensor's row, not the sequence's",
        file: "fwd_sm90.cu",
        edits: &[(
            "pos = m0 + row0 + p.diag_offset - col0;",
            "pos = m0 + row0 + p.diag_offset - col0 + (p.cu_seqlens_q != nullptr ? p.cu_seqlens_q[batch] : 0);",
        )],
    },
    Mutant {
        name: "ALiBi: distance to the packed tensor's key, not the sequence's",
        file: "fwd_sm90.cu",
        edits: &[(
            "pos = m0 + row0 + p.diag_offset - col0;",
            "pos = m0 + row0 + p.diag_offset - col0 - (p.cu_seqlens_k != nullptr ? p.cu_seqlens_k[batch] : 0);",
        )],
    },
    Mutant {
        name: "ALiBi: slope of the KV head",
        file: "fwd_sm90.cu",
        edits: &[(
            "p.alibi_slopes[batch * p.alibi_batch_stride + head]",
            "p.alibi_slopes[batch * p.alibi_batch_stride + head / p.q_per_kv]",
        )],
    },
    Mutant {
        name: "ALiBi: batch stride ignored (every entry gets the first one's slopes)",
        file: "fwd_sm90.cu",
        edits: &[("p.alibi_slopes[batch * p.alibi_batch_stride + head]", "p.alibi_slopes[head]")],
    },
    Mutant {
        name: "ALiBi: only on tiles that need the element mask",
        file: "fwd_sm90.cu",
        edits: &[(
            "if (launch.alibi_slopes != nullptr) {\n                int pos",
            "if (launch.alibi_slopes != nullptr && !(n0 >= all_lo && n0 + BN <= all_hi)) {\n                int pos",
        )],
    },
    Mutant {
        name: "ALiBi: before the softcap",
        file: "fwd_sm90.cu",
        edits: &[
            ("s[i] = fa_softcap_log2(s[i] * score_in, launch.softcap);", "s[i] *= score_in;"),
            (
                "            // Band edges and the tail past seqlen_k (zero-filled K and V rows, made",
                "            if (capped)\n                for (int i = 0; i < BN / 2; ++i) s[i] = \
                 fa_softcap_log2(s[i], launch.softcap);\n            // Band edges and the tail past seqlen_k \
                 (zero-filled K and V rows, made",
            ),
        ],
    },
    Mutant {
        name: "ALiBi: the second row's distance 16 off",
        file: "fwd_sm90.cu",
        edits: &[("d0 + static_cast<float>(8 * h - 8 * i - e)", "d0 + static_cast<float>(-8 * h - 8 * i - e)")],
    },
    Mutant {
        name: "ALiBi: odd columns' distance 2 off",
        file: "fwd_sm90.cu",
        edits: &[("d0 + static_cast<float>(8 * h - 8 * i - e)", "d0 + static_cast<float>(8 * h - 8 * i + e)")],
    },
    Mutant {
        name: "persistent: ALiBi never derived (the unset tile-start registers)",
        file: "fwd_sm90.cu",
        edits: &[("                if constexpr (Cfg::kPersistent) alibi_of(launch, pos, slope);\n", "")],
    },
    Mutant {
        name: "sinks: counted by every lane of the quad (4 times)",
        file: "fwd_sm90.cu",
        edits: &[("* kLog2e : -INFINITY, lane % 4 == 0);", "* kLog2e : -INFINITY, true);")],
    },
    Mutant {
        name: "sinks: in the sum but not in the running max",
        file: "common/sm90_softmax.cuh",
        edits: &[("row_max[0] = row_max[1] = sink;", "row_max[0] = row_max[1] = -INFINITY;")],
    },
    Mutant {
        name: "sinks: natural-log logit in the log2 domain",
        file: "fwd_sm90.cu",
        edits: &[("launch.sinks[head] * kLog2e", "launch.sinks[head]")],
    },
    Mutant {
        name: "sinks: logit of the KV head",
        file: "fwd_sm90.cu",
        edits: &[("launch.sinks[head] * kLog2e", "launch.sinks[head / launch.q_per_kv] * kLog2e")],
    },
    Mutant {
        name: "sinks: missing from the persistent path",
        file: "fwd_sm90.cu",
        edits: &[("softmax.init(launch.sinks != nullptr ?", "softmax.init(!Cfg::kPersistent && launch.sinks != nullptr ?")],
    },
    Mutant {
        name: "sinks: only on row blocks with keys (keyless rows: LSE -inf)",
        file: "fwd_sm90.cu",
        edits: &[("softmax.init(launch.sinks != nullptr ?", "softmax.init(launch.sinks != nullptr && n_tiles > 0 ?")],
    },
];

/// Runs the emulator with each argument list in turn until one fails;
/// `Some([args] diagnostic)` for that one (the first emulator error,
/// deadlock or watchdog line if any, and the first failing case with the
/// checks it failed), `None` if all passed.
fn first_failure(exe: &Path, work: &Path, modes: &[&[&str]]) -> Option<String> {
    for args in modes {
        let log = work.join("mode.log");
        let file = std::fs::File::create(&log).expect("creating a log file");
        let status = Command::new(exe)
            .args(*args)
            .arg("--stop-on-fail")
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .status();
        if status.is_ok_and(|s| s.success()) {
            continue;
        }
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let emu = out
            .lines()
            .find(|l| l.contains("EMU ERROR") || l.contains("EMU DEADLOCK") || l.contains("EMU WATCHDOG"))
            .map(|l| l.trim().to_string());
        let case = out.lines().find_map(|l| l.strip_prefix("first failing case: ")).map(str::to_string);
        let what = match (emu, case) {
            (Some(e), Some(c)) => format!("{e}\n            in {c}"),
            (Some(e), None) => e,
            (None, Some(c)) => c,
            (None, None) => format!("non-zero exit: {}", tail(&out, 3)),
        };
        return Some(format!("[{}] {what}", args.join(" ")));
    }
    None
}

/// Negative control: every injected bug must make the emulator fail (a wrong
/// result, an emulator error or a deadlock) in at least one timing mode, while
/// the unmodified source passes the same runs. Only the f16 kernels are built
/// (the `--cases=neg` subset runs no other), each mutant runs its modes until
/// one fails, and two mutants build and run at a time.
#[test]
#[ignore = "negative control, run by hand: cargo test --test emulated_sm90 -- --ignored --nocapture"]
fn sm90_emulator_catches_injected_bugs() {
    let Some(include) = prerequisites("sm90_emulator_catches_injected_bugs") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = std::env::temp_dir().join(format!("fused-attn-emu90-neg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // Persistent kernels with 1, 2 and 3 CTAs; the last mode reads a wholly
    // out-of-bounds box as "nothing lands, 0 bytes".
    let modes: &[&[&str]] = &[
        &["--cases=neg", "--tma=lazy", "--wgmma=wait", "--sms=1"],
        &["--cases=neg", "--tma=random", "--wgmma=issue", "--sms=2"],
        &["--cases=neg", "--tma=eager", "--wgmma=wait", "--sms=3", "--oob-box=skip-empty"],
    ];
    let all: Vec<Option<&Mutant>> = std::iter::once(None).chain(MUTANTS.iter().map(Some)).collect();
    // (name, Ok(Some(diagnostic)) if caught / Ok(None) if missed, or Err(why not run))
    type Row = emu::ControlRow;
    let rows: Vec<std::sync::Mutex<Option<Row>>> = all.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()).min(all.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(m) = all.get(i) else { break };
                let row = run_mutant(root, &base.join(format!("m{i}")), &include, *m, modes);
                *rows[i].lock().unwrap() = Some(row);
            });
        }
    });
    let bad = control_verdict(rows.into_iter().map(|row| row.into_inner().unwrap().expect("every mutant ran")));
    eprintln!("negative control: {} mutants in {:.0} s", MUTANTS.len(), started.elapsed().as_secs_f64());
    assert!(bad.is_empty(), "negative control failed:\n{}", bad.join("\n"));
    let _ = std::fs::remove_dir_all(&base);
}

/// Builds one mutant (or the unmodified source) in `work` and runs it.
fn run_mutant(root: &Path, work: &Path, include: &Path, m: Option<&Mutant>, modes: &[&[&str]]) -> emu::ControlRow {
    let src = work.join("src");
    let name = m.map_or("(unmodified source: must pass)", |m| m.name).to_string();
    if let Err(why) = mutated_copy(&root.join("kernels"), &src, m) {
        return (name, Err(why));
    }
    // f16 kernels only: half the compile time.
    let entry = src.join("fwd_sm90.cu");
    let text = std::fs::read_to_string(&entry).unwrap();
    let f16: Vec<&str> = text.lines().filter(|l| !l.starts_with("FA_KERNEL(fa_fwd_sm90_bf16")).collect();
    std::fs::write(&entry, f16.join("\n") + "\n").unwrap();
    match build(&src, work, include) {
        Ok(exe) => (name, Ok(first_failure(&exe, work, modes))),
        Err(e) => (name, Err(tail(&e, 5))),
    }
}
