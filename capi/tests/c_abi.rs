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

/// The CUDA runtime's headers and library beside `$NVCC` (the PyPI wheels
/// CI installs) or under `$CUDA_HOME`: (include directory, libcudart).
fn cuda_runtime() -> Option<(PathBuf, PathBuf)> {
    let roots = [
        std::env::var_os("NVCC").map(PathBuf::from).and_then(|n| Some(n.parent()?.parent()?.to_path_buf())),
        std::env::var_os("CUDA_HOME").map(PathBuf::from),
    ];
    roots.into_iter().flatten().find_map(|root| {
        let include = root.join("include");
        let lib = ["lib/libcudart.so.13", "lib64/libcudart.so", "lib/libcudart.so"]
            .iter()
            .map(|l| root.join(l))
            .find(|p| p.exists())?;
        include.join("cuda_runtime.h").exists().then_some((include, lib))
    })
}

/// `examples/attention.c`, the README's C example, built against the CUDA
/// runtime and run: its CPU reference part must succeed, and its GPU part
/// either match the reference or (no GPU) report why and exit 0.
#[test]
#[cfg(target_os = "linux")]
fn c_example_builds_and_runs() {
    let Some((include, cudart)) = cuda_runtime() else {
        let required = std::env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
        assert!(!required, "no CUDA runtime headers and libcudart beside $NVCC or under $CUDA_HOME");
        println!("skipped: no CUDA runtime headers and libcudart (set NVCC or CUDA_HOME)");
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fused_attn_c_example");
    let mut cmd = compiler(false).to_command();
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-I")
        .arg(&include)
        .arg(dir.join("examples/attention.c"))
        .arg("-o")
        .arg(&out)
        .arg(static_lib())
        .arg(&cudart)
        .arg(format!("-Wl,-rpath,{}", cudart.parent().expect("a directory").display()))
        .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
    let built = cmd.output().expect("running the C compiler");
    assert!(
        built.status.success(),
        "compiling examples/attention.c failed: {cmd:?}\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&out).output().expect("running the C example");
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "the C example failed ({}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("reference: B 2"), "no reference line:\n{stdout}");
    assert!(stdout.contains("GPU vs reference") || stdout.contains("GPU part skipped"), "{stdout}");
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
