//! Compile tier (DESIGN.md section 4): what the build produced, checked
//! without a GPU. A check that lacks its input (a kernel build, cuobjdump) is
//! a failure under `FUSED_ATTN_REQUIRE_KERNELS=1` (CI) and otherwise reported
//! as *ignored* with the reason, never as passed (`tests/common/tier.rs`).

#[path = "common/tier.rs"]
mod tier;

use std::path::Path;
use std::process::Command;

use fused_attn::internals::{IMAGES, KERNELS_BUILT, KERNEL_TABLE, RESOURCE_REPORT};
use fused_attn::{DType, KernelFamily};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

type Outcome = Result<Completion, Failed>;

/// Runs `check` when the crate was built with kernels; else the reason it cannot.
fn with_kernels(check: impl FnOnce()) -> Outcome {
    if !KERNELS_BUILT {
        return tier::missing("the crate was built without kernels (no nvcc)");
    }
    check();
    Ok(Completion::Completed)
}

/// Runs `check` with cuobjdump when the crate has kernels and the tool is there.
fn with_cuobjdump(check: impl FnOnce(&Path)) -> Outcome {
    if !KERNELS_BUILT {
        return tier::missing("the crate was built without kernels (no nvcc)");
    }
    let Some(tool) = tier::cuda_tool("CUOBJDUMP", "cuobjdump") else {
        return tier::missing("no cuobjdump (set CUOBJDUMP or install nvidia-cuda-cuobjdump, see README)");
    };
    check(&tool);
    Ok(Completion::Completed)
}

// ---- ptxas report parsing (pure, unit-tested below on synthetic reports) -------

/// One `Compiling entry function` block of a `-Xptxas -v` report.
#[derive(Debug, Default)]
struct Entry {
    kernel: String,
    arch: String,
    registers: Option<u32>,
    /// bytes stack frame, spill stores, spill loads
    stack: Option<[u64; 3]>,
}

fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

fn parse_report(report: &str) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split("' for '");
            let kernel = parts.next().unwrap_or("").to_string();
            let arch = parts.next().unwrap_or("").trim_end_matches('\'').to_string();
            entries.push(Entry { kernel, arch, ..Entry::default() });
        } else if let Some(e) = entries.last_mut() {
            if line.contains("bytes stack frame") {
                let n = numbers(line);
                e.stack = Some([n[0], n[1], n[2]]);
            } else if let Some(rest) = line.split("Used ").nth(1).filter(|r| r.contains(" registers")) {
                e.registers = numbers(rest.split(" registers").next().unwrap_or("")).first().map(|&r| r as u32);
            }
        }
    }
    entries
}

/// ptxas's "Potential Performance Loss" advisories (C7509..C7520; C7512/C7513:
/// wgmma serialised): each one means a Hopper kernel runs its wgmmas one at a
/// time, silently losing most of its throughput.
fn performance_loss_lines(report: &str) -> Vec<String> {
    report
        .lines()
        .filter(|l| l.contains("Potential Performance Loss") || l.contains("(C7512)") || l.contains("(C7513)"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The sm90 kernels' register split: the launch gives each of the 384 threads
/// 65536 / 384 = 170, i.e. 168 registers (allocation granule 8); the producer
/// warpgroup then gives back to 24 (`setmaxnreg.dec 24`) and the two consumer
/// warpgroups take 240 each (`setmaxnreg.inc 240`): 128 x (24 + 2 x 240) =
/// 64512 = 384 x 168, exactly what the launch holds. If ptxas allocated fewer
/// than 168 at launch (e.g. 128), the producer's release could not cover the
/// consumers' increase and `setmaxnreg.inc` would wait forever on hardware
/// (no emulator or compile error shows it). The split is read from
/// fwd_sm90.cu so that the gate follows the source.
fn sm90_register_split() -> (u32, u32, u32) {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/fwd_sm90.cu")).unwrap();
    let constant = |name: &str| -> u32 {
        let at = src.find(&format!("{name} = ")).unwrap_or_else(|| panic!("fwd_sm90.cu: no `{name} = `"));
        numbers(&src[at + name.len()..at + name.len() + 12])[0] as u32
    };
    (constant("kProducerRegs"), constant("kConsumerRegs"), 2)
}

/// The launch register count the split assumes for `threads` threads.
fn sm90_launch_registers(threads: u32) -> u32 {
    let (producer, consumer, consumers) = sm90_register_split();
    let launch = (65536 / threads) / 8 * 8;
    assert_eq!(
        128 * (producer + consumers * consumer),
        threads * launch,
        "fwd_sm90.cu's setmaxnreg split does not add up to the launch's {launch} registers per thread"
    );
    launch
}

/// sm90 kernels whose ptxas allocation is not `expected(threads)`.
fn register_mismatches(entries: &[Entry], kernels: &[(&str, u32)], expected: impl Fn(u32) -> u32) -> Vec<String> {
    let mut bad = Vec::new();
    for &(name, threads) in kernels {
        let want = expected(threads);
        match entries.iter().find(|e| e.kernel == name && e.arch == "sm_90a") {
            Some(Entry { registers: Some(r), .. }) if *r == want => {}
            Some(e) => {
                bad.push(format!("{name}: ptxas allocated {:?} registers, setmaxnreg assumes {want}", e.registers))
            }
            None => bad.push(format!("{name}: not in the ptxas report")),
        }
    }
    bad
}

// ---- checks ------------------------------------------------------------------

fn no_kernel_spills_or_uses_a_stack() {
    let entries = parse_report(RESOURCE_REPORT);
    for e in &entries {
        let stack = e.stack.unwrap_or_else(|| panic!("{} @ {}: no stack line in the ptxas report", e.kernel, e.arch));
        assert_eq!(stack, [0, 0, 0], "{} @ {}: stack frame, spill stores, spill loads", e.kernel, e.arch);
    }
    // Every kernel of the table was compiled for every SASS arch of its image.
    for row in KERNEL_TABLE {
        let image = IMAGES.iter().find(|i| i.stem == row.image).expect("every row's image is embedded");
        for arch in image.sass {
            assert!(
                entries.iter().any(|e| e.kernel == row.name && e.arch == *arch),
                "missing from the ptxas report: {} for {arch}",
                row.name
            );
        }
    }
}

fn no_wgmma_serialisation() {
    let lines = performance_loss_lines(RESOURCE_REPORT);
    assert!(lines.is_empty(), "ptxas reports serialised wgmma:\n{}", lines.join("\n"));
}

fn sm90_kernels_get_the_registers_setmaxnreg_assumes() {
    let kernels: Vec<(&str, u32)> =
        KERNEL_TABLE.iter().filter(|r| r.image == "fwd_sm90").map(|r| (r.name, r.threads)).collect();
    assert!(!kernels.is_empty(), "no sm90 kernels in the table");
    let bad = register_mismatches(&parse_report(RESOURCE_REPORT), &kernels, sm90_launch_registers);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The gates fail on the reports they exist for (synthetic ptxas lines).
fn gates_catch_broken_reports() {
    let entry = |name: &str, regs: u32| {
        format!(
            "ptxas info    : Compiling entry function '{name}' for 'sm_90a'\n\
             ptxas info    : Function properties for {name}\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
             ptxas info    : Used {regs} registers, used 16 barriers\n"
        )
    };
    let good = entry("k", 168);
    assert!(performance_loss_lines(&good).is_empty());
    let serialised = format!(
        "{good}ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized \
         due to insufficient register resources for the wgmma pipeline in the function 'k'\n"
    );
    assert_eq!(performance_loss_lines(&serialised).len(), 1, "a C7512 line must trip the gate");
    let other_code = "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized";
    assert_eq!(performance_loss_lines(other_code).len(), 1);

    let expected = |_threads: u32| 168;
    assert!(register_mismatches(&parse_report(&good), &[("k", 384)], expected).is_empty());
    let starved = entry("k", 128);
    let bad = register_mismatches(&parse_report(&starved), &[("k", 384)], expected);
    assert_eq!(bad.len(), 1, "128 registers must trip the gate: {bad:?}");
    assert!(bad[0].contains("Some(128)"), "{bad:?}");
    assert_eq!(register_mismatches(&parse_report(&good), &[("missing", 384)], expected).len(), 1);
    // And the arithmetic of the real source: 384 threads -> 168.
    assert_eq!(sm90_launch_registers(384), 168);
}

fn dispatch_table_is_complete_and_consistent() {
    let mut names: Vec<_> = KERNEL_TABLE.iter().map(|r| r.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), KERNEL_TABLE.len(), "duplicate kernel names");
    for dtype in [DType::F16, DType::BF16] {
        // The auto-dispatch rows; variants (`name__tag`) are extra.
        let rows = || KERNEL_TABLE.iter().filter(|r| !r.is_variant() && r.dtype == dtype);
        let naive = rows().filter(|r| r.image == "fwd_naive");
        assert_eq!(naive.map(|r| r.head_dim).collect::<Vec<_>>(), [256]);
        // One main row per bucket; the `_99k` rows (sm86/sm89) are extra, and
        // so is one `_paged` row per bucket (paged KV caches).
        let main = |r: &&fused_attn::internals::KernelRow| {
            r.image == "fwd_sm80" && !r.name.ends_with("_99k") && !r.is_paged() && !r.is_decode()
        };
        let mut tiled: Vec<u32> = rows().filter(main).map(|r| r.head_dim).collect();
        tiled.sort();
        assert_eq!(tiled, [32, 64, 96, 128, 160, 192, 224, 256], "{dtype} sm80 buckets");
        let mut paged: Vec<u32> = rows().filter(|r| r.is_paged()).map(|r| r.head_dim).collect();
        paged.sort();
        assert_eq!(paged, tiled, "{dtype} sm80 `_paged` rows, one per bucket");
        assert!(rows().filter(|r| r.is_paged()).all(|r| r.image == "fwd_sm80"));
        // `_decode` rows (GQA packing): every bucket from hd64, sm80.
        let mut decode: Vec<u32> = rows().filter(|r| r.is_decode()).map(|r| r.head_dim).collect();
        decode.sort();
        assert_eq!(decode, [64, 96, 128, 160, 192, 224, 256], "{dtype} sm80 `_decode` rows");
        assert!(rows().filter(|r| r.is_decode()).all(|r| r.image == "fwd_sm80"));
        // Every sm80 bucket runs in sm86/sm89's 99 KB per block, through its
        // main row or its `_99k` row.
        for d in tiled {
            let fits = rows().any(|r| r.image == "fwd_sm80" && r.head_dim == d && r.smem_bytes <= 99 * 1024);
            assert!(fits, "{dtype} sm80 hd{d}: no row fits 99 KB of shared memory");
        }
    }
    for r in KERNEL_TABLE {
        assert!(KernelFamily::from_image_stem(r.image).is_some(), "{}: unknown family", r.name);
        assert!(r.name.contains(r.dtype.name()), "{}: name does not carry its dtype", r.name);
        if r.is_variant() {
            // A variant is an alternative to a base kernel that exists.
            let base = r.name.split("__").next().unwrap();
            assert!(KERNEL_TABLE.iter().any(|b| b.name == base), "{}: no base kernel {base}", r.name);
        }
        assert!(r.threads % 32 == 0 && r.threads <= 1024, "{}", r.name);
        assert!(r.block_m > 0 && r.block_n > 0, "{}", r.name);
        if r.image == "fwd_sm90" {
            // TMA boxes are at most 256 rows; the maps use 64-column boxes.
            assert!(r.min_sm == 90 && r.block_m <= 256 && r.block_n <= 256 && r.head_dim % 64 == 0, "{}", r.name);
        }
        // sm80's opt-in limit is 163 KiB (sm90: 227 KiB).
        let limit = if r.min_sm >= 90 { 227 * 1024 } else { 163 * 1024 };
        assert!(r.smem_bytes <= limit, "{}: {} B shared memory", r.name, r.smem_bytes);
    }
}

fn dump(tool: &Path, flag: &str, bytes: &[u8], stem: &str) -> String {
    // One file per call: trials run on several threads and may dump the same image at once.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("fused-attn-{}-{n}-{stem}.fatbin", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    // cuobjdump runs nvdisasm for --dump-sass; it ships beside cuobjdump.
    let mut path_var = std::ffi::OsString::from(tool.parent().unwrap_or(Path::new(".")));
    if let Some(p) = std::env::var_os("PATH") {
        path_var.push(":");
        path_var.push(p);
    }
    let out = Command::new(tool).arg(flag).arg(&path).env("PATH", path_var).output().expect("running cuobjdump");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "cuobjdump {flag} {stem}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fatbins_hold_sm80_and_sm90a_code(tool: &Path) {
    for image in IMAGES {
        let elf = dump(tool, "--list-elf", image.fatbin, image.stem);
        for arch in image.sass {
            assert!(elf.contains(&format!(".{arch}.")), "{}: no {arch} SASS in\n{elf}", image.stem);
        }
        if let Some(ptx) = image.ptx {
            let list = dump(tool, "--list-ptx", image.fatbin, image.stem);
            let arch = ptx.trim_start_matches("compute_");
            assert!(list.contains(&format!(".sm_{arch}.")), "{}: no {ptx} PTX in\n{list}", image.stem);
        }
        if image.stem == "fwd_naive" || image.stem == "fwd_sm80" || image.stem == "bwd_sm80" {
            assert_eq!(image.sass, &["sm_80", "sm_90a"], "{}", image.stem);
            assert_eq!(image.ptx, Some("compute_80"), "{}", image.stem);
        }
        if image.stem == "fwd_sm90" {
            // wgmma/setmaxnreg exist only as sm_90a SASS; no PTX to JIT elsewhere.
            assert_eq!(image.sass, &["sm_90a"]);
            assert_eq!(image.ptx, None);
        }
    }
}

fn tiled_kernel_uses_tensor_cores_and_async_copies(tool: &Path) {
    let image = IMAGES.iter().find(|i| i.stem == "fwd_sm80").expect("fwd_sm80 is embedded");
    let sass = dump(tool, "--dump-sass", image.fatbin, image.stem);
    for (insn, why) in [("HMMA", "mma.sync"), ("LDSM", "ldmatrix"), ("LDGSTS", "cp.async")] {
        assert!(sass.contains(insn), "fwd_sm80 SASS has no {insn} ({why})");
    }
    // No local memory: spills would show as LDL/STL.
    assert!(!sass.contains("LDL") && !sass.contains("STL"), "fwd_sm80 SASS uses local memory");
}

/// Each main kernel of the tiled sm80 backward, at each arch, runs its five
/// GEMMs on tensor cores from ldmatrix fragments (both plain and
/// transposed), copies with cp.async, adds dQ with f32 reductions, and keeps
/// everything in registers.
fn tiled_backward_uses_tensor_cores_without_local_memory(tool: &Path) {
    let image = IMAGES.iter().find(|i| i.stem == "bwd_sm80").expect("bwd_sm80 is embedded");
    let sass = dump(tool, "--dump-sass", image.fatbin, image.stem);
    let mut seen = 0;
    for (i, _) in sass.match_indices("Function : fa_bwd_sm80_") {
        let body = &sass[i..];
        let name = body["Function : ".len()..].lines().next().unwrap_or("").trim();
        let body = &body[..body[1..].find("Function : ").map_or(body.len(), |e| e + 1)];
        assert!(!body.contains("LDL") && !body.contains("STL"), "{name}: uses local memory");
        if name.contains("_pre_") || name.contains("_dq_") || name.contains("_dsink_") {
            continue;
        }
        seen += 1;
        // The dQ adds: reductions, never returning atomics (sm_90a's ptxas
        // turned a plain atomicAdd into ATOMG, whose scoreboard stalls cost
        // the kernel 1.8x on an H200), paired into 8-byte vectors on sm90.
        let arch = sass[..i].rfind("arch = ").map(|a| sass[a + 7..].lines().next().unwrap_or("").trim());
        let red = if arch == Some("sm_90a") { "REDG.E.ADD.F32x2" } else { "RED.E.ADD.F32" };
        for (insn, why) in [
            ("HMMA", "mma.sync"),
            ("LDSM.16.M88.4", "ldmatrix"),
            ("LDSM.16.MT88.4", "ldmatrix.trans"),
            ("LDGSTS", "cp.async"),
            (red, "dQ reductions"),
        ] {
            assert!(body.contains(insn), "{name} ({arch:?}): no {insn} ({why}) in its SASS");
        }
        // (The deterministic mode's one ticket per CTA is a returning integer atomic.)
        assert!(!body.contains("ATOMG.E.ADD.F32"), "{name} ({arch:?}): a returning f32 atomic (ATOMG) in its SASS");
    }
    // 3 buckets x 2 dtypes x 2 archs.
    assert_eq!(seen, 12, "tiled backward main kernels found in the SASS");
}

fn hopper_kernel_issues_wgmma_and_tma_without_local_memory(tool: &Path) {
    let image = IMAGES.iter().find(|i| i.stem == "fwd_sm90").expect("fwd_sm90 is embedded");
    let sass = dump(tool, "--dump-sass", image.fatbin, image.stem);
    // Per kernel: each function's SASS must have both, not just the file.
    for row in KERNEL_TABLE.iter().filter(|r| r.image == "fwd_sm90") {
        // The header line ends with the name: `fa_..._hd256` is not `fa_..._hd256__persistent`.
        let header = format!("Function : {}\n", row.name);
        let start = sass.find(&header).unwrap_or_else(|| panic!("{} not in SASS", row.name));
        let body = &sass[start..];
        let body = &body[..body[1..].find("Function : ").map_or(body.len(), |e| e + 1)];
        for (insn, why) in [("HGMMA", "wgmma"), ("UTMALDG", "TMA load")] {
            assert!(body.contains(insn), "{}: no {insn} ({why}) in its SASS", row.name);
        }
        assert!(!body.contains("LDL") && !body.contains("STL"), "{}: uses local memory", row.name);
    }
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        #[allow(clippy::assertions_on_constants)] // the constant is what the build produced
        Trial::test("kernels_are_built_when_required", || {
            if tier::required() {
                assert!(KERNELS_BUILT, "FUSED_ATTN_REQUIRE_KERNELS=1 but the crate was built without kernels");
                assert!(!IMAGES.is_empty());
            }
            Ok(())
        }),
        Trial::test("dispatch_table_is_complete_and_consistent", || {
            dispatch_table_is_complete_and_consistent();
            Ok(())
        }),
        Trial::test("gates_catch_broken_reports", || {
            gates_catch_broken_reports();
            Ok(())
        }),
        Trial::ignorable_test("no_kernel_spills_or_uses_a_stack", || with_kernels(no_kernel_spills_or_uses_a_stack)),
        Trial::ignorable_test("no_wgmma_serialisation", || with_kernels(no_wgmma_serialisation)),
        Trial::ignorable_test("sm90_kernels_get_the_registers_setmaxnreg_assumes", || {
            with_kernels(sm90_kernels_get_the_registers_setmaxnreg_assumes)
        }),
        Trial::ignorable_test("fatbins_hold_sm80_and_sm90a_code", || with_cuobjdump(fatbins_hold_sm80_and_sm90a_code)),
        Trial::ignorable_test("tiled_backward_uses_tensor_cores_without_local_memory", || {
            with_cuobjdump(tiled_backward_uses_tensor_cores_without_local_memory)
        }),
        Trial::ignorable_test("tiled_kernel_uses_tensor_cores_and_async_copies", || {
            with_cuobjdump(tiled_kernel_uses_tensor_cores_and_async_copies)
        }),
        Trial::ignorable_test("hopper_kernel_issues_wgmma_and_tma_without_local_memory", || {
            with_cuobjdump(hopper_kernel_issues_wgmma_and_tma_without_local_memory)
        }),
    ];
    libtest_mimic::run(&args, trials).exit();
}
