//! CPU tier, emulated: the real `kernels/fwd_sm80.cu` source, with only its
//! inline PTX leaves swapped for host emulations (`tools/sm80-emu`), run
//! thread by thread on the CPU over every head-dim bucket, both dtypes, all
//! mask kinds, GQA, odd lengths, strides and empty rows, against an f64
//! reference. It checks fragment layouts, barriers, cp.async ordering (copies
//! landing early or late, random warp order), bounds and bank conflicts, so a
//! kernel change is exercised without a GPU. It is no substitute for the GPU
//! tier: the emulator encodes our reading of the PTX ISA.
//!
//! Needs g++ and the CUDA headers (next to `$NVCC`, or `$CUDA_HOME/include`);
//! fails when they are missing under `FUSED_ATTN_REQUIRE_KERNELS=1`, else skips.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cuda_include() -> Option<PathBuf> {
    let from_nvcc =
        std::env::var_os("NVCC").map(PathBuf::from).and_then(|p| Some(p.parent()?.parent()?.join("include")));
    let from_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    [from_nvcc, from_home].into_iter().flatten().find(|p| p.join("cuda_fp16.h").is_file())
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{}", tail(&text));
    text
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn sm80_kernel_source_passes_under_the_emulator() {
    let required = std::env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let have_gxx = Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success());
    let Some(include) = cuda_include().filter(|_| have_gxx) else {
        assert!(!required, "the sm80 emulator needs g++ and the CUDA headers (set NVCC or CUDA_HOME)");
        eprintln!("SKIPPED sm80_kernel_source_passes_under_the_emulator: no g++ or CUDA headers");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tool = root.join("tools/sm80-emu");
    let work = std::env::temp_dir().join(format!("fused-attn-emu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    run(
        Command::new("python3").arg(tool.join("gen.py")).arg(root.join("kernels")).arg(work.join("kernels")),
        "generating the emulated kernel source",
    );
    let exe = work.join("emu");
    run(
        Command::new("g++")
            .args(["-O1", "-std=c++17", "-w"])
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(&tool)
            .arg("-I")
            .arg(&work)
            .arg(tool.join("emu.cpp"))
            .arg("-o")
            .arg(&exe),
        "compiling the emulator",
    );
    // Copies landing at the wait with shuffled warps, then landing at issue:
    // a missing barrier or wait shows in one or the other.
    for args in [&["lazy", "shuffle"][..], &["eager", "shuffle", "quick"][..]] {
        let out = run(Command::new(&exe).args(args), &format!("emulator {args:?}"));
        let verdict = out.lines().last().unwrap_or("");
        eprintln!("emulator {args:?}: {verdict}");
        assert!(verdict.contains(": 0 failing cases, 0 emulator errors"), "{}", tail(&out));
        assert!(out.contains("with bank conflicts 0"), "ldmatrix bank conflicts:\n{}", tail(&out));
    }
    let _ = std::fs::remove_dir_all(&work);
}
