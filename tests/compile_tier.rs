//! Compile tier (DESIGN.md section 4): what the build produced, checked
//! without a GPU. Under `FUSED_ATTN_REQUIRE_KERNELS=1` (CI) a missing kernel
//! build or a missing cuobjdump fails; otherwise those checks say they skipped.

use std::path::PathBuf;
use std::process::Command;

use fused_attn::internals::{IMAGES, KERNELS_BUILT, KERNEL_TABLE, RESOURCE_REPORT};
use fused_attn::{DType, KernelFamily};

fn required() -> bool {
    std::env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

/// `true` when the kernel checks can run; fails when they are required but cannot.
fn kernels_or_skip(test: &str) -> bool {
    if KERNELS_BUILT {
        return true;
    }
    assert!(!required(), "FUSED_ATTN_REQUIRE_KERNELS=1 but the crate was built without kernels");
    eprintln!("SKIPPED {test}: built without nvcc");
    false
}

#[test]
#[allow(clippy::assertions_on_constants)] // the constant is what the build produced
fn kernels_are_built_when_required() {
    if required() {
        assert!(KERNELS_BUILT, "FUSED_ATTN_REQUIRE_KERNELS=1 but the crate was built without kernels");
        assert!(!IMAGES.is_empty());
    }
}

#[test]
fn no_kernel_spills_or_uses_a_stack() {
    if !kernels_or_skip("no_kernel_spills_or_uses_a_stack") {
        return;
    }
    let mut current = String::new();
    let mut checked = 0;
    for line in RESOURCE_REPORT.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.replace("' for '", " @ ").trim_end_matches('\'').to_string();
        }
        if line.contains("bytes stack frame") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            assert_eq!(nums, [0, 0, 0], "{current}: {}", line.trim());
            checked += 1;
        }
    }
    // Every kernel of the table was compiled for every SASS arch of its image.
    for row in KERNEL_TABLE {
        let image = IMAGES.iter().find(|i| i.stem == row.image).expect("every row's image is embedded");
        for arch in image.sass {
            let needle = format!("Compiling entry function '{}' for '{}'", row.name, arch);
            assert!(RESOURCE_REPORT.contains(&needle), "missing from the ptxas report: {needle}");
        }
    }
    assert!(checked >= KERNEL_TABLE.len(), "only {checked} ptxas reports for {} kernels", KERNEL_TABLE.len());
}

#[test]
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
        let mut tiled: Vec<u32> = rows().filter(|r| r.image == "fwd_sm80").map(|r| r.head_dim).collect();
        tiled.sort();
        assert_eq!(tiled, [32, 64, 96, 128, 160, 192, 224, 256], "{dtype} sm80 buckets");
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

fn cuobjdump() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CUOBJDUMP") {
        return Some(p.into());
    }
    let from_nvcc = std::env::var_os("NVCC").map(PathBuf::from).and_then(|p| Some(p.parent()?.join("cuobjdump")));
    let from_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/cuobjdump"));
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("cuobjdump")).find(|p| p.is_file()));
    [from_nvcc, from_home, on_path].into_iter().flatten().find(|p| p.is_file())
}

fn dump(tool: &PathBuf, flag: &str, bytes: &[u8], stem: &str) -> String {
    let path = std::env::temp_dir().join(format!("fused-attn-{}-{stem}.fatbin", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    // cuobjdump runs nvdisasm for --dump-sass; it ships beside cuobjdump.
    let mut path_var = std::ffi::OsString::from(tool.parent().unwrap_or(std::path::Path::new(".")));
    if let Some(p) = std::env::var_os("PATH") {
        path_var.push(":");
        path_var.push(p);
    }
    let out = Command::new(tool).arg(flag).arg(&path).env("PATH", path_var).output().expect("running cuobjdump");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "cuobjdump {flag} {stem}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fatbins_hold_sm80_and_sm90a_code() {
    if !kernels_or_skip("fatbins_hold_sm80_and_sm90a_code") {
        return;
    }
    let Some(tool) = cuobjdump() else {
        assert!(!required(), "cuobjdump not found (set CUOBJDUMP or install nvidia-cuda-cuobjdump)");
        eprintln!("SKIPPED fatbins_hold_sm80_and_sm90a_code: no cuobjdump");
        return;
    };
    for image in IMAGES {
        let elf = dump(&tool, "--list-elf", image.fatbin, image.stem);
        for arch in image.sass {
            assert!(elf.contains(&format!(".{arch}.")), "{}: no {arch} SASS in\n{elf}", image.stem);
        }
        if let Some(ptx) = image.ptx {
            let list = dump(&tool, "--list-ptx", image.fatbin, image.stem);
            let arch = ptx.trim_start_matches("compute_");
            assert!(list.contains(&format!(".sm_{arch}.")), "{}: no {ptx} PTX in\n{list}", image.stem);
        }
        if image.stem == "fwd_naive" || image.stem == "fwd_sm80" {
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

#[test]
fn tiled_kernel_uses_tensor_cores_and_async_copies() {
    if !kernels_or_skip("tiled_kernel_uses_tensor_cores_and_async_copies") {
        return;
    }
    let Some(tool) = cuobjdump() else {
        assert!(!required(), "cuobjdump not found");
        eprintln!("SKIPPED tiled_kernel_uses_tensor_cores_and_async_copies: no cuobjdump");
        return;
    };
    let image = IMAGES.iter().find(|i| i.stem == "fwd_sm80").expect("fwd_sm80 is embedded");
    let sass = dump(&tool, "--dump-sass", image.fatbin, image.stem);
    for (insn, why) in [("HMMA", "mma.sync"), ("LDSM", "ldmatrix"), ("LDGSTS", "cp.async")] {
        assert!(sass.contains(insn), "fwd_sm80 SASS has no {insn} ({why})");
    }
    // No local memory: spills would show as LDL/STL.
    assert!(!sass.contains("LDL") && !sass.contains("STL"), "fwd_sm80 SASS uses local memory");
}

#[test]
fn hopper_kernel_issues_wgmma_and_tma_without_local_memory() {
    if !kernels_or_skip("hopper_kernel_issues_wgmma_and_tma_without_local_memory") {
        return;
    }
    let Some(tool) = cuobjdump() else {
        assert!(!required(), "cuobjdump not found");
        eprintln!("SKIPPED hopper_kernel_issues_wgmma_and_tma_without_local_memory: no cuobjdump");
        return;
    };
    let image = IMAGES.iter().find(|i| i.stem == "fwd_sm90").expect("fwd_sm90 is embedded");
    let sass = dump(&tool, "--dump-sass", image.fatbin, image.stem);
    // Per kernel: each function's SASS must have both, not just the file.
    for row in KERNEL_TABLE.iter().filter(|r| r.image == "fwd_sm90") {
        let start =
            sass.find(&format!("Function : {}", row.name)).unwrap_or_else(|| panic!("{} not in SASS", row.name));
        let body = &sass[start..];
        let body = &body[..body[1..].find("Function : ").map_or(body.len(), |e| e + 1)];
        for (insn, why) in [("HGMMA", "wgmma"), ("UTMALDG", "TMA load")] {
            assert!(body.contains(insn), "{}: no {insn} ({why}) in its SASS", row.name);
        }
        assert!(!body.contains("LDL") && !body.contains("STL"), "{}: uses local memory", row.name);
    }
}
