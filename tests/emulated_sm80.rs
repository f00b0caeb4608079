//! CPU tier, emulated: the real `kernels/fwd_sm80.cu` source, with only its
//! inline PTX leaves swapped for host emulations (`tools/sm80-emu`), run
//! thread by thread on the CPU over every head-dim bucket, both dtypes, all
//! mask kinds, GQA, odd lengths, strides and empty rows, against an f64
//! reference. It checks fragment layouts, barriers, cp.async ordering (copies
//! landing early or late, random warp order), bounds and bank conflicts, so a
//! kernel change is exercised without a GPU. It is no substitute for the GPU
//! tier: the emulator encodes our reading of the PTX ISA.
//!
//! Needs g++, python3 and the CUDA headers (next to `$NVCC`, or `$CUDA_HOME/include`);
//! fails when they are missing under `FUSED_ATTN_REQUIRE_KERNELS=1`, else skips.

#[path = "common/emu.rs"]
mod emu;

use std::path::Path;
use std::process::Command;

use emu::{output, prerequisites, tail};

fn run(cmd: &mut Command, what: &str) -> String {
    output(cmd, what).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn sm80_kernel_source_passes_under_the_emulator() {
    let Some(include) = prerequisites("sm80_kernel_source_passes_under_the_emulator") else {
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
        assert!(verdict.contains(": 0 failing cases, 0 emulator errors"), "{}", tail(&out, 40));
        assert!(out.contains("with bank conflicts 0"), "ldmatrix bank conflicts:\n{}", tail(&out, 40));
    }
    let _ = std::fs::remove_dir_all(&work);
}
