//! Builds `tests/c/test.c` against `include/fused_attn.h` and the static
//! library `libfused_attn_capi.a` (which cargo builds beside this test, as
//! the crate's `staticlib` type), with the C compiler the `cc` crate finds,
//! and runs it: the CPU reference through the C ABI checked against
//! attention computed in C, and the error codes (bad dtype, Hq % Hk != 0,
//! null pointers, no GPU on a machine without one, ...).
//!
//! A real C program linking the real archive is the closest test of what a
//! C user does; it needs no GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The static library cargo built for this test run: in `target/<profile>/deps`,
/// beside the test executable, or one level up.
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("the test's directory");
    [deps.to_path_buf(), deps.join("..")]
        .into_iter()
        .map(|d| d.join("libfused_attn_capi.a"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libfused_attn_capi.a not found beside {}", exe.display()))
}

/// The C (or C++) compiler the `cc` crate finds for this target.
fn compiler(cpp: bool) -> cc::Tool {
    let target = env!("FUSED_ATTN_CAPI_TARGET");
    cc::Build::new()
        .cargo_metadata(false)
        .cpp(cpp)
        .target(target)
        .host(target)
        .opt_level(0)
        .try_get_compiler()
        .expect("the cc crate found no compiler")
}

#[test]
#[cfg(target_os = "linux")]
fn c_program_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fused_attn_c_test");
    let mut cmd = compiler(false).to_command();
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(dir.join("include"))
        .arg(dir.join("tests/c/test.c"))
        .arg("-o")
        .arg(&out)
        .arg(static_lib())
        // System libraries a Rust static library needs on Linux (glibc
        // >= 2.34 needs only -lpthread -ldl -lm; the rest is for older ones).
        .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
    let built = cmd.output().expect("running the C compiler");
    assert!(
        built.status.success(),
        "compiling tests/c/test.c failed: {cmd:?}\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&out).output().expect("running the C test");
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "the C test failed ({}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("\n0 failure(s)"), "the C test did not finish:\n{stdout}");
}

/// The header is also valid C++ (cbindgen's `cpp_compat`: `extern "C"`, enums
/// with an `int32_t` underlying type).
#[test]
#[cfg(target_os = "linux")]
fn header_compiles_as_cpp() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fused_attn_header.cpp");
    std::fs::write(
        &src,
        "#include \"fused_attn.h\"\n\
         int main() { FusedAttnOptions o = {}; o.mask = FUSED_ATTN_MASK_CAUSAL; (void)o;\n\
         return fused_attn_status_name(FUSED_ATTN_STATUS_OK) == nullptr; }\n",
    )
    .expect("writing the C++ file");
    let mut cmd = compiler(true).to_command();
    cmd.args(["-std=c++11", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(dir.join("include"))
        .arg(&src);
    let built = cmd.output().expect("running the C++ compiler");
    assert!(built.status.success(), "{cmd:?}\n{}", String::from_utf8_lossy(&built.stderr));
}
