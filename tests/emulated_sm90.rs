//! CPU tier, emulated (Hopper): the real `kernels/fwd_sm90.cu` source, with its
//! inline PTX translated instruction by instruction into calls to a host
//! emulator (`tools/sm90-emu`), run thread by thread on the CPU. Every kernel
//! of the FA_KERNEL table (f16/bf16 × head-dim buckets, and every variant:
//! no ping-pong, other ring depths, persistent grids, those launched with 1 to
//! 5 CTAs so that each loops over several tiles, with and without keys) runs
//! over mixed cases (GQA, odd lengths, causal with Lq ≠ Lk, LSE), masks,
//! softcap, empty rows and row blocks, zero keys, huge logits, head dims
//! inside a bucket, BHSD and padded strides, ring wrap-around and a seeded
//! random sweep, against an f64 reference, in several timing modes: TMA
//! copies landing at issue, at random later points or as late as possible;
//! wgmma results at issue or only at the retiring wait_group (accumulators
//! poisoned in between); and both readings of a TMA box that lies wholly out
//! of bounds (zero-filled and counted, or nothing at all; the kernel must not
//! issue one). wgmma descriptors and swizzles, tensor maps, mbarrier phases
//! and tx-counts, named barriers, setmaxnreg, generic/async proxy fences
//! (coarsely), bounds and stray writes are checked, and a deadlock names
//! where each warp waits. It is no substitute for the GPU tier: the emulator
//! encodes our reading of the PTX ISA.
//!
//! Needs g++, python3 and the CUDA headers (next to `$NVCC`, or
//! `$CUDA_HOME/include`); fails when they are missing under
//! `FUSED_ATTN_REQUIRE_KERNELS=1`, else skips.
//!
//! Negative control, by hand (not in CI): `cargo test --test emulated_sm90 --
//! --ignored --nocapture` injects known bugs into a copy of the kernel source
//! and checks that each one is caught.

#[path = "common/emu.rs"]
mod emu;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use emu::{output, prerequisites, tail};

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

/// Runs the emulator once per argument list, two at a time (the emulator is
/// single-threaded); returns (args, exit ok, output) in order.
fn run_modes(exe: &Path, work: &Path, modes: &[&[&str]]) -> Vec<(String, bool, String)> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get()).min(modes.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; modes.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(args) = modes.get(i) else { break };
                // Output to a file: a full pipe must not stall the emulator.
                let log = work.join(format!("mode{i}.log"));
                let file = std::fs::File::create(&log).expect("creating a log file");
                let status = Command::new(exe)
                    .args(*args)
                    .stdout(Stdio::from(file.try_clone().expect("log file")))
                    .stderr(Stdio::from(file))
                    .status();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let ok = status.is_ok_and(|s| s.success());
                results.lock().unwrap()[i] = Some((args.join(" "), ok, text));
            });
        }
    });
    results.into_inner().unwrap().into_iter().map(|r| r.expect("every mode ran")).collect()
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
    let modes: &[&[&str]] = &[
        &["--tma=lazy", "--wgmma=wait", "--seed=1", "--sms=3"],
        &["--tma=random", "--wgmma=issue", "--seed=2", "--sms=2"],
        &["--tma=eager", "--wgmma=wait", "--ordered", "--cases=quick", "--sms=2"],
        &["--tma=random", "--wgmma=wait", "--seed=5", "--sms=1", "--oob-box=skip-empty"],
        &["--tma=random", "--wgmma=wait", "--seed=3", "--cases=none", "--random=40", "--sms=3"],
        &["--tma=lazy", "--wgmma=issue", "--seed=4", "--cases=none", "--random=40", "--sms=5", "--oob-box=skip-empty"],
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

/// One injected bug: exact-text edits to a copy of `kernels/`.
struct Mutant {
    name: &'static str,
    file: &'static str,
    edits: &'static [(&'static str, &'static str)],
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
            ("release(v_empty(prev_stage));\n                scale_rows", "scale_rows"),
            (
                "gemm_pv(prev_stage);\n                pass_turn();",
                "gemm_pv(prev_stage);\n                pass_turn();\n                release(v_empty(prev_stage));",
            ),
        ],
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
            "        const int n_begin = kt.n_begin, n_tiles = kt.n_tiles",
            "        stage = 0;\n        phase = 0;\n        const int n_begin = kt.n_begin, n_tiles = kt.n_tiles",
        )],
    },
    Mutant {
        name: "persistent: epilogue stages the boxes past head_dim too (the zeroed Q columns get O's garbage)",
        file: "fwd_sm90.cu",
        edits: &[("if (box == 0 || box < live_boxes) {", "if (true) {")],
    },
];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Negative control: every injected bug must make the emulator fail (a wrong
/// result, an emulator error or a deadlock) in at least one timing mode, while
/// the unmodified source passes the same runs.
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
    // (name, Some(first diagnostic) if caught / None if missed, or Err(why not run))
    let mut rows: Vec<(String, Result<Option<String>, String>)> = Vec::new();
    for (i, m) in std::iter::once(None).chain(MUTANTS.iter().map(Some)).enumerate() {
        let work = base.join(format!("m{i}"));
        let src = work.join("src");
        copy_dir(&root.join("kernels"), &src);
        let name = m.map_or("(unmodified source: must pass)", |m| m.name).to_string();
        if let Some(m) = m {
            let path = src.join(m.file);
            let mut text = std::fs::read_to_string(&path).unwrap();
            if let Some((old, _)) = m.edits.iter().find(|(old, _)| !text.contains(old)) {
                rows.push((name, Err(format!("not applicable: `{old}` is no longer in {}", m.file))));
                continue;
            }
            for (old, new) in m.edits {
                text = text.replace(old, new);
            }
            std::fs::write(&path, text).unwrap();
        }
        let exe = match build(&src, &work, &include) {
            Ok(exe) => exe,
            Err(e) => {
                rows.push((name, Err(tail(&e, 5))));
                continue;
            }
        };
        let runs = run_modes(&exe, &work, modes);
        let caught = runs.iter().find(|(_, ok, _)| !ok).map(|(args, _, out)| {
            let first = out
                .lines()
                .find(|l| l.contains("EMU ERROR") || l.contains("EMU DEADLOCK") || l.starts_with("FAIL"))
                .unwrap_or("(non-zero exit)");
            format!("[{args}] {}", first.trim())
        });
        rows.push((name, Ok(caught)));
    }
    let mut bad = Vec::new();
    for (i, (name, r)) in rows.iter().enumerate() {
        let line = match (i, r) {
            (0, Ok(None)) => format!("ok      {name}"),
            (0, Ok(Some(d))) => format!("BROKEN  {name}: {d}"),
            (_, Ok(Some(d))) => format!("caught  {name}\n          {d}"),
            (_, Ok(None)) => format!("MISSED  {name}"),
            (_, Err(e)) => format!("ERROR   {name}: {e}"),
        };
        eprintln!("{line}");
        if !line.starts_with("ok") && !line.starts_with("caught") {
            bad.push(line);
        }
    }
    assert!(bad.is_empty(), "negative control failed:\n{}", bad.join("\n"));
    let _ = std::fs::remove_dir_all(&base);
}
