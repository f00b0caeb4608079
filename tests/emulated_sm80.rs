//! CPU tier, emulated (Ampere and the portable kernel): the real
//! `kernels/fwd_sm80.cu` and `kernels/fwd_naive.cu` sources, with only their
//! inline PTX leaves swapped for host emulations (`tools/sm80-emu`), run thread
//! by thread on the CPU against an f64 reference (`tools/emu-common/check.h`).
//!
//! Cases: every head-dim bucket and both dtypes, every kernel of the FA_KERNEL
//! tables (variants included), with
//! - each tensor in its own padded layout (Q, K, V, O with different batch,
//!   row and head strides; K and V, Q and O never share one), inputs NaN
//!   outside the view, O's padding and LSE's guards checked to keep their
//!   poison;
//! - GQA up to 5:1 with several KV heads (8:2, 12:3), MQA, MHA;
//! - lengths where tile arithmetic breaks (Lq one short of block_m, Lk ≡ −1
//!   mod block_n), empty rows and row blocks with no key at all, zero keys;
//! - full, causal, windowed masks, bottom-right and top-left aligned;
//! - custom scales (0.3, 1.7, −0.7) and the default, scores from ~1 to
//!   thousands, softcaps from 1e-30 to f32::MAX;
//! - ALiBi (slopes per head or per batch entry, ALiBi's 2^(-8h/H) and up to
//!   16x steeper; after a softcap) and attention sinks (N(0, 2), and ones
//!   that dominate their rows) on every row family: rectangular, packed,
//!   dense and paged caches, the `_decode` rows, split-KV with 1, 3 and 11
//!   splits; rows and row blocks that see no key (LSE = the sink); slope and
//!   sink arrays NaN around and between their entries;
//! - a seeded random sweep (`FUSED_ATTN_EMU_SEED` overrides the seed).
//!
//! Checks besides the result: reads outside Q/K/V, shared-memory overruns,
//! ldmatrix bank conflicts, and the ordering of every shared-memory access:
//! a load, store, ldmatrix or new cp.async that overlaps a cp.async copy not
//! yet covered by its thread's `cp.async.wait_group` and published by a
//! `__syncthreads`, or that races with another thread's plain access without
//! a barrier (or `__syncwarp` within a warp), is an emulator error, whatever
//! order the threads happen to run in. Copies land at the wait, at issue or at
//! random points in between, with random or fixed warp order.
//!
//! Rounding: one mode models the hardware's rounding instead of exact f32
//! arithmetic: `ex2.approx.ftz` with its documented 2^-22 relative error and
//! flush to zero, and mma.sync accumulation truncated per block of 8 products
//! and jittered by an ulp; the tolerances (DESIGN.md §4) must still hold.
//!
//! Negative control: `sm80_emulator_catches_injected_bugs` applies each of
//! `MUTANTS` (semantic and synchronisation bugs in the sm80 and naive kernels)
//! to a copy of the kernel source and requires the emulator to catch it; it
//! is `#[ignore]`d (one emulator build per mutant: ~90 s of CPU, ~2 min on
//! two busy cores), run it with
//! `cargo test --test emulated_sm80 -- --ignored --nocapture`
//! (`FUSED_ATTN_MUTANTS=paged` for the mutants whose names contain "paged").
//!
//! It is no substitute for the GPU tier: the emulator encodes our reading of
//! the PTX ISA. Needs g++, python3 and the CUDA headers (next to `$NVCC`, or
//! `$CUDA_HOME/include`); fails when they are missing under
//! `FUSED_ATTN_REQUIRE_KERNELS=1`, else skips.

#[path = "common/emu.rs"]
mod emu;

use std::path::{Path, PathBuf};
use std::process::Command;

use emu::{control_verdict, mutated_copy, output, prerequisites, run_modes, tail, Mutant};

/// Translates `kernels` into `work/kernels` (only the kernels matching `only`,
/// if given) and compiles the emulator there.
fn build(kernels: &Path, work: &Path, include: &Path, only: Option<&str>) -> Result<PathBuf, String> {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/sm80-emu");
    let mut gen = Command::new("python3");
    gen.arg(tool.join("gen.py")).arg(kernels).arg(work.join("kernels"));
    if let Some(only) = only {
        gen.arg(format!("--only={only}"));
    }
    output(&mut gen, "generating the emulated kernel source (gen.py)")?;
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

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn sm80_and_naive_kernel_sources_pass_under_the_emulator() {
    let Some(include) = prerequisites("sm80_and_naive_kernel_sources_pass_under_the_emulator") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("fused-attn-emu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let exe = build(&root.join("kernels"), &work, &include, None).unwrap_or_else(|e| panic!("{e}"));
    let seed = std::env::var("FUSED_ATTN_EMU_SEED").unwrap_or_else(|_| "2024".into());
    let random = |n: &str, extra: &[&str]| {
        let mut a = args(&["--cases=none", "--land=random", "--round=hw"]);
        a.push(format!("--random={n}"));
        a.push(format!("--seed={seed}"));
        a.extend(args(extra));
        a
    };
    // Every fixed case with copies landing at the wait and shuffled warps; a
    // subset with copies landing at issue in a fixed order, and with copies
    // landing at random points under hardware-like rounding; a random sweep
    // (hardware-like rounding); the naive kernel's cases and sweep.
    let mut modes = vec![
        args(&["--cases=all", "--land=lazy", "--seed=1"]),
        args(&["--cases=quick", "--land=eager", "--order=fixed"]),
        args(&["--cases=quick", "--land=random", "--round=hw", "--seed=3"]),
        random("24", &[]),
        random("16", &["--kernel=naive"]),
        args(&["--kernel=naive", "--cases=all", "--land=lazy"]),
        // ALiBi and attention sinks on every row family (~24 s of CPU; on
        // two cores it runs beside the `all` mode, within its time).
        args(&["--cases=mods", "--land=random", "--round=hw", "--seed=5"]),
        args(&["--kernel=naive", "--cases=mods", "--land=lazy"]),
    ];
    modes.sort_by_key(|m| !m.contains(&"--cases=all".to_string())); // longest first
    let mut failures = Vec::new();
    for (args, ok, out) in run_modes(&exe, &work, &modes) {
        let verdict = out.lines().last().unwrap_or("");
        eprintln!("emulator {args}: {verdict}");
        if !ok || !verdict.contains(": 0 failing cases, 0 emulator errors") {
            let bad: Vec<&str> =
                out.lines().filter(|l| !l.starts_with("ok ") && !l.starts_with("stats:")).take(60).collect();
            failures.push(format!(
                "emulator {args}:\n{}\nreproduce: python3 tools/sm80-emu/gen.py kernels /tmp/emu80/kernels && g++ -O2 \
                 -std=c++17 -w -I {} -I tools/sm80-emu -I /tmp/emu80 tools/sm80-emu/emu.cpp -o /tmp/emu80/emu && \
                 /tmp/emu80/emu {args}",
                bad.join("\n"),
                include.display()
            ));
        }
        if !args.contains("naive") && !out.contains("with bank conflicts 0") {
            failures.push(format!("emulator {args}: ldmatrix bank conflicts\n{}", tail(&out, 5)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&work);
}

const MUTANTS: &[Mutant] = &[
    // ---- the bugs the emulated tier used to miss ----
    Mutant {
        name: "GQA: KV head h % Hk instead of h / (Hq/Hk)",
        file: "fwd_sm80.cu",
        edits: &[("const int hk = PACK ? h : h / p.q_per_kv;", "const int hk = PACK ? h : h % p.heads_kv;")],
    },
    Mutant {
        name: "edge tile off by one: no element mask when the tile ends one past the last key",
        file: "fwd_sm80.cu",
        edits: &[("n0 + BN > all_hi)", "n0 + BN > all_hi + 1)")],
    },
    Mutant {
        name: "V read with K's row stride",
        file: "fwd_sm80.cu",
        edits: &[(
            "const int64_t stride = is_v ? p.v_row_stride : p.k_row_stride;",
            "const int64_t stride = p.k_row_stride;",
        )],
    },
    Mutant {
        name: "O written with Q's row stride",
        file: "fwd_sm80.cu",
        edits: &[(
            "o + (m0 + warp_row) * p.o_row_stride, p.o_row_stride,",
            "o + (m0 + warp_row) * p.q_row_stride, p.q_row_stride,",
        )],
    },
    Mutant {
        name: "Q from shared (hd128): n_tiles == 0 path without its cp.async wait and barrier",
        file: "fwd_sm80.cu",
        edits: &[("    if (n_tiles == 0) {\n        cp_async_wait<0>();\n        __syncthreads();\n    }\n", "")],
    },
    // ---- scale, masks, LSE, softcap ----
    Mutant {
        name: "kernel ignores p.scale (always 1/sqrt(head_dim))",
        file: "fwd_sm80.cu",
        edits: &[(
            "const float score_in = p.scale * log2e;",
            "const float score_in = (1.f / sqrtf((float)p.head_dim)) * log2e;",
        )],
    },
    Mutant {
        name: "mask: left edge one key too far",
        file: "common/mask.cuh",
        edits: &[("i + off - p.window_left;", "i + off - p.window_left - 1;")],
    },
    Mutant {
        name: "mask: left edge one key short",
        file: "common/mask.cuh",
        edits: &[("i + off - p.window_left;", "i + off - p.window_left + 1;")],
    },
    Mutant {
        name: "mask: right edge one key too far",
        file: "common/mask.cuh",
        edits: &[("i + off + p.window_right + 1;", "i + off + p.window_right + 2;")],
    },
    Mutant {
        name: "mask: right edge one key short",
        file: "common/mask.cuh",
        edits: &[("i + off + p.window_right + 1;", "i + off + p.window_right;")],
    },
    Mutant {
        name: "element mask keeps key == hi",
        file: "fwd_sm80.cu",
        edits: &[("if (key < lo || key >= hi)", "if (key < lo || key > hi)")],
    },
    Mutant {
        name: "LSE in log2 units",
        file: "common/softmax.cuh",
        edits: &[("row_max[mt][hf] * 0.6931471805599453f + logf(l)", "row_max[mt][hf] + log2f(l)")],
    },
    Mutant {
        name: "LSE without the running max",
        file: "common/softmax.cuh",
        edits: &[("row_max[mt][hf] * 0.6931471805599453f + logf(l)", "logf(l)")],
    },
    Mutant {
        name: "LSE indexed as contiguous [B, Hq, Lq] (its strides ignored)",
        file: "fwd_sm80.cu",
        edits: &[(
            "lse_b[head_of(row) * p.lse_head_stride + query_of(row)] = lse[mt][hf];",
            "p.lse[(static_cast<int64_t>(b) * p.heads_q + head_of(row)) * p.seqlen_q + query_of(row)] = lse[mt][hf];",
        )],
    },
    Mutant {
        name: "softcap dropped",
        file: "fwd_sm80.cu",
        edits: &[("const bool capped = p.softcap > 0.f;", "const bool capped = false;")],
    },
    Mutant {
        name: "-inf guard of the running max dropped",
        file: "common/softmax.cuh",
        edits: &[("const float sub = mx == -INFINITY ? 0.f : mx;", "const float sub = mx;")],
    },
    // ---- tile bounds and guards ----
    Mutant {
        name: "loader: rows past the sequence read instead of zero-filled",
        file: "common/sm80_tile_io.cuh",
        edits: &[("const bool ok = col_ok && r < rows_valid;", "const bool ok = col_ok;")],
    },
    Mutant {
        name: "store: rows past seqlen_q written",
        file: "common/sm80_tile_io.cuh",
        edits: &[("        if (r < rows_valid) {", "        if (true) {")],
    },
    Mutant {
        name: "LSE of rows past seqlen_q written",
        file: "fwd_sm80.cu",
        edits: &[("if (row < rows) lse_b[", "lse_b[")],
    },
    Mutant {
        name: "last partial key tile skipped",
        file: "fwd_sm80.cu",
        edits: &[("(keys.hi + BN - 1) / BN - n_begin", "keys.hi / BN - n_begin")],
    },
    // ---- synchronisation ----
    Mutant {
        name: "main loop: __syncthreads before loading into V_{j-1}'s buffer dropped",
        file: "fwd_sm80.cu",
        edits: &[(
            "cp_async_wait<BUFS - 2>();\n        __syncthreads();\n        issue_kv(2 * j + BUFS - 1);",
            "cp_async_wait<BUFS - 2>();\n        issue_kv(2 * j + BUFS - 1);",
        )],
    },
    Mutant {
        name: "main loop: __syncthreads before P·V dropped",
        file: "fwd_sm80.cu",
        edits: &[(
            "cp_async_wait<BUFS - 2>();\n        __syncthreads();\n        issue_kv(2 * j + BUFS);",
            "cp_async_wait<BUFS - 2>();\n        issue_kv(2 * j + BUFS);",
        )],
    },
    Mutant {
        name: "main loop: cp.async wait for K_j dropped",
        file: "fwd_sm80.cu",
        edits: &[(
            "cp_async_wait<BUFS - 2>();\n        __syncthreads();\n        issue_kv(2 * j + BUFS - 1);",
            "__syncthreads();\n        issue_kv(2 * j + BUFS - 1);",
        )],
    },
    Mutant {
        name: "main loop: cp.async wait for V_j dropped",
        file: "fwd_sm80.cu",
        edits: &[(
            "cp_async_wait<BUFS - 2>();\n        __syncthreads();\n        issue_kv(2 * j + BUFS);",
            "__syncthreads();\n        issue_kv(2 * j + BUFS);",
        )],
    },
    Mutant {
        name: "Q in registers: barrier after the Q wait dropped",
        file: "fwd_sm80.cu",
        edits: &[(
            "cp_async_wait<BUFS - 1>();  // the Q group\n        __syncthreads();",
            "cp_async_wait<BUFS - 1>();",
        )],
    },
    // No mutant drops the epilogue's first __syncwarp ("this warp's own Q
    // fragment reads are done"): on every path a __syncthreads already follows
    // the warp's last ldmatrix of Q, so without it the kernel is still correct
    // (the emulator agrees).
    Mutant {
        name: "epilogue: __syncwarp between staging O and storing it dropped",
        file: "fwd_sm80.cu",
        edits: &[("    __syncwarp();\n    if constexpr (PACK) {", "    if constexpr (PACK) {")],
    },
    // ---- packed (varlen) batches: common/sequence.cuh, in both kernels ----
    Mutant {
        name: "varlen: K not moved to the sequence's first key",
        file: "common/sequence.cuh",
        edits: &[("p.k = static_cast<const T *>(p.k) + k0 * p.k_row_stride;", "")],
    },
    Mutant {
        name: "varlen: V moved with K's row stride",
        file: "common/sequence.cuh",
        edits: &[("k0 * p.v_row_stride", "k0 * p.k_row_stride")],
    },
    Mutant {
        name: "varlen: O moved with Q's row stride",
        file: "common/sequence.cuh",
        edits: &[("q0 * p.o_row_stride", "q0 * p.q_row_stride")],
    },
    Mutant {
        name: "varlen: the longest sequences' diagonal instead of each sequence's own",
        file: "common/sequence.cuh",
        edits: &[("p.diag_offset = p.top_left ? 0 : p.seqlen_k - p.seqlen_q;", "")],
    },
    Mutant {
        name: "varlen: seqused_k ignored",
        file: "common/sequence.cuh",
        edits: &[("if (p.seqused_k != nullptr) p.seqlen_k = p.seqused_k[b];", "")],
    },
    Mutant {
        name: "varlen: LSE not moved to the sequence's rows",
        file: "common/sequence.cuh",
        edits: &[("if (p.lse != nullptr) p.lse += q0;", "")],
    },
    Mutant {
        name: "varlen: one query row past the sequence's end",
        file: "common/sequence.cuh",
        edits: &[("p.seqlen_q = p.cu_seqlens_q[b + 1] - q0;", "p.seqlen_q = p.cu_seqlens_q[b + 1] - q0 + 1;")],
    },
    // ---- KV caches: common/sequence.cuh ----
    Mutant {
        name: "cache: cache_batch_idx ignored",
        file: "common/sequence.cuh",
        edits: &[("const int64_t shift = p.cache_batch_idx[b] - b;", "const int64_t shift = 0;")],
    },
    Mutant {
        name: "paged: V pages stepped with K's page stride",
        file: "common/sequence.cuh",
        edits: &[("id * (is_v ? p.v_batch_stride : p.k_batch_stride)", "id * p.k_batch_stride")],
    },
    Mutant {
        name: "paged: slot = page index instead of j % page_size",
        file: "common/sequence.cuh",
        edits: &[("int(slot) * rs", "int(page) * rs")],
    },
    Mutant {
        name: "paged (sm80): one lookup per tile for every page size",
        file: "fwd_sm80.cu",
        edits: &[(
            "const bool whole_pages = !PAGED || p.block_table == nullptr || p.page_size % BN == 0;",
            "const bool whole_pages = true;",
        )],
    },
    Mutant {
        name: "paged (sm80): the gather's first page from the tile's key, not the thread's row",
        file: "common/sm80_tile_io.cuh",
        edits: &[("const unsigned j = unsigned(j0 + row0);", "const unsigned j = unsigned(j0);")],
    },
    Mutant {
        name: "paged (sm80): the gather's slot steps one row per pass",
        file: "common/sm80_tile_io.cuh",
        edits: &[("slot += kRowsPerPass;", "slot += 1;")],
    },
    Mutant {
        name: "paged (sm80): a full page leaves the gather on the same page",
        file: "common/sm80_tile_io.cuh",
        edits: &[("slot -= ps;\n                    ++page;", "slot -= ps;")],
    },
    Mutant {
        name: "paged (sm80): pages shorter than a pass stepped like long ones",
        file: "common/sm80_tile_io.cuh",
        edits: &[("if (ps >= unsigned(kRowsPerPass)) {", "if (true) {")],
    },
    Mutant {
        name: "paged (sm80): short pages' slot left past the page end",
        file: "common/sm80_tile_io.cuh",
        edits: &[("slot %= ps;", "")],
    },
    Mutant {
        name: "paged (sm80): the gather reuses even rows' pages for odd rows (non-decode rows)",
        file: "fwd_sm80.cu",
        edits: &[(
            "return fa_kv_row<T>(p, base, is_v, b, n0 + r);",
            "return fa_kv_row<T>(p, base, is_v, b, n0 + r / 2 * 2);",
        )],
    },
    Mutant {
        name: "paged (sm80): the gather looks up rows past the sequence",
        file: "common/sm80_tile_io.cuh",
        edits: &[(
            "ok ? page_at(page) + slot * row_stride + chunk * 8 : safe",
            "col_ok ? page_at(page) + slot * row_stride + chunk * 8 : safe",
        )],
    },
    Mutant {
        name: "paged (sm80): the gather's V rows from K's pages",
        file: "common/sequence.cuh",
        edits: &[(
            "return base + id * (is_v ? p.v_batch_stride : p.k_batch_stride);\n}\n\n// The Hopper",
            "return base + id * p.k_batch_stride;\n}\n\n// The Hopper",
        )],
    },
    // ---- split-KV (fwd_sm80.cu; the combine is tests/merge_numerics.rs's) ----
    Mutant {
        name: "split-KV: each share starts one tile early (shares overlap)",
        file: "fwd_sm80.cu",
        edits: &[(
            "const int t0 = min(n_tiles, int(blockIdx.x % splits) * per);",
            "const int t0 = min(n_tiles, max(0, int(blockIdx.x % splits) * per - 1));",
        )],
    },
    Mutant {
        name: "split-KV: partial O written unnormalised",
        file: "fwd_sm80.cu",
        edits: &[(
            "make_float2(acc_o[mt][dt][2 * hf] * inv_sum[mt][hf], acc_o[mt][dt][2 * hf + 1] * inv_sum[mt][hf])",
            "make_float2(acc_o[mt][dt][2 * hf], acc_o[mt][dt][2 * hf + 1])",
        )],
    },
    Mutant {
        name: "split-KV: row block = blockIdx.x, not divided by the split count",
        file: "fwd_sm80.cu",
        edits: &[("const int m0 = (blockIdx.x / splits) * BM,", "const int m0 = blockIdx.x * BM,")],
    },
    // ---- GQA packing (the `_decode` rows) ----
    Mutant {
        name: "decode: a packed row's head from its query index",
        file: "fwd_sm80.cu",
        edits: &[(
            "auto head_of = [&](int r) { return PACK ? hk * G + r % G : h; };",
            "auto head_of = [&](int r) { return PACK ? hk * G + r / G % G : h; };",
        )],
    },
    Mutant {
        name: "decode: the element mask by packed row, not by its query",
        file: "fwd_sm80.cu",
        edits: &[(
            "const FaKeyRange r = fa_key_range(p, query_of(m0 + warp_row + mt * 16 + hf * 8 + g));",
            "const FaKeyRange r = fa_key_range(p, min(m0 + warp_row + mt * 16 + hf * 8 + g, p.seqlen_q - 1));",
        )],
    },
    Mutant {
        name: "decode: the CTA's key range from its first row's query only",
        file: "fwd_sm80.cu",
        edits: &[(
            "const FaKeyRange keys = fa_key_range_rows(p, query_of(m0), query_of(row_end - 1) + 1);",
            "const FaKeyRange keys = fa_key_range_rows(p, query_of(m0), query_of(m0) + 1);",
        )],
    },
    Mutant {
        name: "decode: LSE written at the packed row",
        file: "fwd_sm80.cu",
        edits: &[(
            "lse_b[head_of(row) * p.lse_head_stride + query_of(row)] = lse[mt][hf];",
            "lse_b[head_of(row) * p.lse_head_stride + min(row, p.seqlen_q - 1)] = lse[mt][hf];",
        )],
    },
    // ---- ALiBi and attention sinks ----
    Mutant {
        name: "ALiBi: sign flipped (the bias added)",
        file: "fwd_sm80.cu",
        edits: &[("= fmaf(a, fabsf(x + float(row_c - nt * 8 - e))", "= fmaf(-a, fabsf(x + float(row_c - nt * 8 - e))")],
    },
    Mutant {
        name: "ALiBi: distance without the diagonal offset",
        file: "fwd_sm80.cu",
        edits: &[("float(query_of(row) + p.diag_offset - pair - n0)", "float(query_of(row) - pair - n0)")],
    },
    Mutant {
        name: "ALiBi: the host's diagonal (longest sequences) instead of the sequence's own",
        file: "fwd_sm80.cu",
        edits: &[(
            "float(query_of(row) + p.diag_offset - pair - n0)",
            "float(query_of(row) + launch.diag_offset - pair - n0)",
        )],
    },
    Mutant {
        name: "ALiBi: a packed query's row in the whole batch instead of in its sequence",
        file: "fwd_sm80.cu",
        edits: &[(
            "float(query_of(row) + p.diag_offset - pair - n0)",
            "float(query_of(row) + (p.cu_seqlens_q ? p.cu_seqlens_q[b] : 0) + p.diag_offset - pair - n0)",
        )],
    },
    Mutant {
        name: "ALiBi: the lane's column pair (2 tig) left out of the distance",
        file: "fwd_sm80.cu",
        edits: &[("float(query_of(row) + p.diag_offset - pair - n0)", "float(query_of(row) + p.diag_offset - n0)")],
    },
    Mutant {
        name: "ALiBi: the fragment's second column (e) at the first's distance",
        file: "fwd_sm80.cu",
        edits: &[("fabsf(x + float(row_c - nt * 8 - e))", "fabsf(x + float(row_c - nt * 8))")],
    },
    Mutant {
        name: "ALiBi: slope indexed by the KV head",
        file: "fwd_sm80.cu",
        edits: &[("head_of(PACK ? m0 + warp_row + lane % (16 * MT) : 0)]", "hk]")],
    },
    Mutant {
        name: "ALiBi: slopes' batch stride ignored",
        file: "fwd_sm80.cu",
        edits: &[("p.alibi_slopes[b * p.alibi_batch_stride +", "p.alibi_slopes[")],
    },
    Mutant {
        name: "ALiBi: applied only on tiles that straddle a mask edge",
        file: "fwd_sm80.cu",
        edits: &[("        if (alibi) {", "        if (alibi && (n0 < all_lo || n0 + BN > all_hi)) {")],
    },
    Mutant {
        name: "ALiBi (decode): every packed row with the first row's query and head",
        file: "fwd_sm80.cu",
        edits: &[(": PACK ? row_of(mt, hf) : row_of(0, 0);", ": row_of(0, 0);")],
    },
    Mutant {
        name: "ALiBi (decode): a packed row's slope from the lane of its quad row, not of its warp row",
        file: "fwd_sm80.cu",
        edits: &[("__shfl_sync(0xffffffffu, a_lane, mt * 16 + hf * 8 + g)", "__shfl_sync(0xffffffffu, a_lane, g)")],
    },
    Mutant {
        name: "sink: counted in every split-KV share",
        file: "fwd_sm80.cu",
        edits: &[("if (p.sinks != nullptr && blockIdx.x % splits == 0) {", "if (p.sinks != nullptr) {")],
    },
    Mutant {
        name: "sink: counted by every lane of the quad (4x)",
        file: "fwd_sm80.cu",
        edits: &[("* log2e, tig == 0);", "* log2e, true);")],
    },
    Mutant {
        name: "sink: in the sum but not in the running max",
        file: "common/softmax.cuh",
        edits: &[(
            "        row_max[mt][hf] = logit;
",
            "",
        )],
    },
    Mutant {
        name: "sink: in natural-log units (not log2)",
        file: "fwd_sm80.cu",
        edits: &[("p.sinks[head_of(row_of(mt, hf))] * log2e", "p.sinks[head_of(row_of(mt, hf))]")],
    },
    Mutant {
        name: "sink: indexed by the KV head",
        file: "fwd_sm80.cu",
        edits: &[("p.sinks[head_of(row_of(mt, hf))]", "p.sinks[hk]")],
    },
    Mutant {
        name: "naive: ALiBi sign flipped",
        file: "fwd_naive.cu",
        edits: &[("- slope * fabsf(float(diag - j))", "+ slope * fabsf(float(diag - j))")],
    },
    Mutant {
        name: "naive: ALiBi distance without the diagonal offset",
        file: "fwd_naive.cu",
        edits: &[("const int diag = i + p.diag_offset;", "const int diag = i;")],
    },
    Mutant {
        name: "naive: slopes' batch stride ignored",
        file: "fwd_naive.cu",
        edits: &[("p.alibi_slopes[b * p.alibi_batch_stride + h]", "p.alibi_slopes[h]")],
    },
    Mutant {
        name: "naive: sink in the running max but not in the sum",
        file: "fwd_naive.cu",
        edits: &[("l = sink ? 1.f : 0.f;", "l = 0.f;")],
    },
    Mutant {
        name: "naive: sink indexed by the KV head",
        file: "fwd_naive.cu",
        edits: &[("p.sinks[h]", "p.sinks[hk]")],
    },
    // ---- the naive kernel ----
    Mutant {
        name: "naive: KV head h % Hk instead of h / (Hq/Hk)",
        file: "fwd_naive.cu",
        edits: &[("const int hk = h / p.q_per_kv;", "const int hk = h % p.heads_kv;")],
    },
    Mutant {
        name: "naive: key range end inclusive (one key past the mask)",
        file: "fwd_naive.cu",
        edits: &[("if (j < r.hi) {", "if (j <= r.hi) {")],
    },
    Mutant {
        name: "naive: V read with K's rows",
        file: "fwd_naive.cu",
        edits: &[
            ("fa_kv_row(p, v, true, b, j0 + jj)", "fa_kv_row(p, k, true, b, j0 + jj)"),
            ("const T *vj0 = fa_kv_row(p, v, true, b, j0);", "const T *vj0 = fa_kv_row(p, k, true, b, j0);"),
        ],
    },
];

/// Negative control: every injected bug must make the emulator fail (a wrong
/// result, a stray write, an emulator error or a deadlock) in at least one
/// run, while the unmodified source passes the same runs. Prints a table:
/// mutant, the run that caught it, and the first check that failed.
#[test]
#[ignore = "negative control, run by hand: cargo test --test emulated_sm80 -- --ignored --nocapture"]
fn sm80_emulator_catches_injected_bugs() {
    let Some(include) = prerequisites("sm80_emulator_catches_injected_bugs") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = std::env::temp_dir().join(format!("fused-attn-emu80-neg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // hd64: Q in registers, 4 warps, a ring of 4; hd128: Q re-read from
    // shared memory, a ring of 2 (the n_tiles == 0 path matters there).
    // hd64_paged: the paged caches' rows (page lookup per tile, gather);
    // hd64_decode: GQA packing.
    let only = "^fa_fwd_(sm80_f16_hd64|sm80_f16_hd64_paged|sm80_f16_hd64_decode|sm80_f16_hd128|naive_f16)$";
    let modes = vec![
        args(&["--cases=neg", "--land=lazy", "--seed=1"]),
        args(&["--cases=neg", "--land=eager", "--order=fixed"]),
        args(&["--kernel=naive", "--cases=neg"]),
    ];
    // (name, Ok(Some(first diagnostic)) if caught / Ok(None) if missed, or Err(why not run))
    let mut rows: Vec<emu::ControlRow> = Vec::new();
    // FUSED_ATTN_MUTANTS=substring runs only the mutants whose names hold it
    // (a kernel change's own mutants, without the hour the whole list takes).
    let pick = std::env::var("FUSED_ATTN_MUTANTS").unwrap_or_default();
    let chosen = MUTANTS.iter().filter(|m| m.name.contains(pick.as_str())).map(Some);
    for (i, m) in std::iter::once(None).chain(chosen).enumerate() {
        let work = base.join(format!("m{i}"));
        let src = work.join("src");
        let name = m.map_or("(unmodified source: must pass)", |m| m.name).to_string();
        if let Err(why) = mutated_copy(&root.join("kernels"), &src, m) {
            rows.push((name, Err(why)));
            continue;
        }
        let exe = match build(&src, &work, &include, Some(only)) {
            Ok(exe) => exe,
            Err(e) => {
                rows.push((name, Err(tail(&e, 5))));
                continue;
            }
        };
        let runs = run_modes(&exe, &work, &modes);
        let caught = runs.iter().find(|(_, ok, _)| !ok).map(|(args, _, out)| {
            // "FAIL[checks] kernel ...": which checks failed, on which kernel;
            // or the first emulator error.
            let fail = out.lines().find(|l| l.starts_with("FAIL")).map(|l| {
                let mut w = l.split_whitespace();
                format!("{} {}", w.next().unwrap_or(""), w.next().unwrap_or(""))
            });
            let error = out.lines().find(|l| l.contains("EMU ERROR")).map(|l| l.trim().to_string());
            let what = match (fail, error) {
                (Some(f), Some(e)) => format!("{f}\n            {e}"),
                (Some(f), None) => f,
                (None, Some(e)) => e,
                (None, None) => "(non-zero exit)".into(),
            };
            format!("[{args}] {what}")
        });
        rows.push((name, Ok(caught)));
        let _ = std::fs::remove_dir_all(&work);
    }
    let bad = control_verdict(rows);
    assert!(bad.is_empty(), "negative control failed:\n{}", bad.join("\n"));
    let _ = std::fs::remove_dir_all(&base);
}
