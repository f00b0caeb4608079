//! The Python bridge (`scripts/fused_attn_ctypes.py`, issue 13's benchmark
//! bridge) against the shared library cargo built beside this test:
//! `scripts/test_fused_attn_ctypes.py` calls the CPU reference through
//! ctypes and checks it against attention computed in Python, and the ABI's
//! errors as Python exceptions. Needs python3 (skipped with the reason
//! without it); no GPU, no numpy.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The shared library cargo built for this test run (`target/<profile>`).
fn shared_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("the test's directory");
    [deps.to_path_buf(), deps.join("..")]
        .into_iter()
        .map(|d| d.join("libfused_attn_capi.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libfused_attn_capi.so not found beside {}", exe.display()))
}

#[test]
#[cfg(target_os = "linux")]
fn python_bridge_reaches_the_abi() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: no python3");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("scripts/test_fused_attn_ctypes.py"))
        .env("FUSED_ATTN_CAPI_LIB", shared_lib())
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("\n0 failure(s)"),
        "the Python bridge test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
