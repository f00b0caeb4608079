//! Shared by the emulated tiers (tests/emulated_sm80.rs, tests/emulated_sm90.rs):
//! finding the CUDA headers and tools, running commands, trimming their output.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The CUDA headers: next to `$NVCC` (PyPI or toolkit layout) or in `$CUDA_HOME`.
pub fn cuda_include() -> Option<PathBuf> {
    let from_nvcc =
        std::env::var_os("NVCC").map(PathBuf::from).and_then(|p| Some(p.parent()?.parent()?.join("include")));
    let from_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    [from_nvcc, from_home].into_iter().flatten().find(|p| p.join("cuda_fp16.h").is_file())
}

/// Whether `tool --version` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The CUDA headers when g++ and python3 are there too. Otherwise fails under
/// `FUSED_ATTN_REQUIRE_KERNELS=1` (CI) and says the test skipped.
pub fn prerequisites(test: &str) -> Option<PathBuf> {
    let required = std::env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let include = cuda_include().filter(|_| have("g++") && have("python3"));
    if include.is_none() {
        assert!(!required, "{test} needs g++, python3 and the CUDA headers (set NVCC or CUDA_HOME)");
        eprintln!("SKIPPED {test}: no g++, python3 or CUDA headers");
    }
    include
}

/// Runs a command; its stdout and stderr, or the tail of them on failure.
pub fn output(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} failed:\n{}", tail(&text, 40)))
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
