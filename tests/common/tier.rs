//! How the compile and numerics tiers report a prerequisite they lack (a tool,
//! the kernel build): under `FUSED_ATTN_REQUIRE_KERNELS=1` (CI) it is a
//! failure; elsewhere the trial is *ignored* with the reason, never passed.
//! libtest decides `#[ignore]` at compile time, so these tests use
//! libtest-mimic (`harness = false`), which can ignore at run time.
#![allow(dead_code)]

use std::path::PathBuf;

use libtest_mimic::{Completion, Failed};

pub fn required() -> bool {
    std::env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

/// The outcome of a trial that cannot run: `reason` says what is missing.
pub fn missing(reason: impl std::fmt::Display) -> Result<Completion, Failed> {
    if required() {
        Err(format!("FUSED_ATTN_REQUIRE_KERNELS=1 but {reason}").into())
    } else {
        Ok(Completion::ignored_with(reason))
    }
}

/// A tool from the CUDA toolkit: `$<ENV>` itself, then beside `$NVCC`, in
/// `$CUDA_HOME/bin`, on `PATH`.
pub fn cuda_tool(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let from_nvcc = std::env::var_os("NVCC").map(PathBuf::from).and_then(|p| Some(p.parent()?.join(name)));
    let from_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin").join(name));
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()));
    [from_nvcc, from_home, on_path].into_iter().flatten().find(|p| p.is_file())
}

/// Whether `tool --version` runs.
pub fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The CUDA headers' directory (for `cuda_fp16.h`): beside `$NVCC` or in `$CUDA_HOME`.
pub fn cuda_include() -> Option<PathBuf> {
    let from_nvcc =
        std::env::var_os("NVCC").map(PathBuf::from).and_then(|p| Some(p.parent()?.parent()?.join("include")));
    let from_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    [from_nvcc, from_home].into_iter().flatten().find(|p| p.join("cuda_fp16.h").is_file())
}

/// What a host harness (`tools/<harness>`) needs: g++ and the CUDA headers'
/// directory, or the trial's outcome without them.
pub fn harness_prerequisites(harness: &str) -> Result<PathBuf, Result<Completion, Failed>> {
    if !have("g++") {
        return Err(missing(format!("no g++ to build tools/{harness}")));
    }
    cuda_include().ok_or_else(|| missing("no CUDA headers (cuda_fp16.h beside $NVCC or in $CUDA_HOME)"))
}
