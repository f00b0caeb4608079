//! The merge of attention states (DESIGN.md section 1b) in the device code
//! itself: `tools/merge-harness` compiles `kernels/common/merge.cuh` for the
//! host and runs it over 1..8 parts (1..40 strided f32 parts, the split-KV
//! workspace), head dims 8..256, LSEs equal, far apart
//! (e^LSE beyond f32 and f64) and -inf (parts whose O is poison), rows no
//! part sees, every part on its own strides, against f64. Then a negative
//! control: each injected bug in a copy of merge.cuh must make it fail.
//! Needs g++ and the CUDA headers (beside `$NVCC` or in `$CUDA_HOME`);
//! ignored with the reason without them, a failure under
//! `FUSED_ATTN_REQUIRE_KERNELS=1`.

#[path = "common/tier.rs"]
mod tier;

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Builds the harness over `merge_cuh` (the text of merge.cuh, maybe
/// mutated) and runs it: Ok(output) if it passed, Err(output) if not.
fn run_harness(work: &Path, include: &Path, merge_cuh: &str) -> Result<Result<String, String>, Failed> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join("merge.cuh"), merge_cuh)?;
    std::fs::copy(root.join("kernels/common/types.cuh"), work.join("types.cuh"))?;
    std::fs::copy(root.join("kernels/params.h"), work.join("../params.h"))?;
    let exe = work.join("harness");
    let out = Command::new("g++")
        .args(["-O2", "-std=c++17", "-Wall", "-Werror", "-Wno-strict-aliasing", "-Wno-class-memaccess"])
        .arg("-I")
        .arg(include)
        .arg("-I")
        .arg(work)
        .arg(root.join("tools/merge-harness/harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()?;
    if !out.status.success() {
        return Err(format!("compiling the harness:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let out = Command::new(&exe).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or("").to_string();
    if !last.starts_with("WORST") {
        return Ok(Err(format!("(crashed or unexpected output) {last}")));
    }
    Ok(if out.status.success() && last.contains(" bad 0 ") { Ok(text) } else { Err(text) })
}

fn prerequisites() -> Result<PathBuf, Result<Completion, Failed>> {
    tier::harness_prerequisites("merge-harness")
}

fn source() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/common/merge.cuh"))
        .expect("kernels/common/merge.cuh")
}

fn merge_sweep() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let work = std::env::temp_dir().join(format!("fused-attn-merge-{}", std::process::id())).join("common");
    let r = run_harness(&work, &include, &source())?;
    let _ = std::fs::remove_dir_all(work.parent().unwrap());
    match r {
        Ok(text) => {
            eprintln!("{}", text.lines().last().unwrap_or(""));
            Ok(Completion::Completed)
        }
        Err(text) => {
            let bad: Vec<&str> = text.lines().filter(|l| !l.starts_with("ok")).take(30).collect();
            Err(format!("merge harness failed:\n{}", bad.join("\n")).into())
        }
    }
}

/// (name, text in merge.cuh, replacement)
const MUTANTS: &[(&str, &str, &str)] = &[
    ("weights not taken relative to the largest LSE", "- m);", ");"),
    ("parts with no visible key read anyway", "if (w == 0.f) continue;", ""),
    ("strided parts: O read from part 0 for every part", "(p.strided ? s * p.o_part_stride : 0)", "0"),
    ("strided parts: LSE read from part 0 for every part", "(p.strided ? s * p.lse_part_stride : 0)", "0"),
    ("LSE without the log of the weight sum", "m + logf(sum)", "m"),
    (
        "rows no part sees: O left unwritten",
        "o[d] = fa_from_float<T>(0.f);\n            o[d + 1] = fa_from_float<T>(0.f);",
        "",
    ),
    (
        "every part read with part 0's O strides",
        "h * q.o_head_stride;",
        "h * p.part[0].o_head_stride + 0 * q.o_head_stride;",
    ),
    ("weights not normalised", "a0 * inv", "a0"),
    ("the last column of a pair skipped", "o[d + 1] = fa_from_float<T>(a1 * inv);", ""),
];

fn merge_negative_control() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let src = source();
    let base = std::env::temp_dir().join(format!("fused-attn-merge-neg-{}", std::process::id()));
    let mut missed = Vec::new();
    for (i, (name, from, to)) in MUTANTS.iter().enumerate() {
        if !src.contains(from) {
            return Err(format!("mutant `{name}`: `{from}` is not in merge.cuh (update the mutant)").into());
        }
        let work = base.join(format!("m{i}")).join("common");
        match run_harness(&work, &include, &src.replace(from, to))? {
            Ok(_) => missed.push(*name),
            Err(text) => {
                let first = text.lines().find(|l| !l.starts_with("ok")).unwrap_or("");
                eprintln!("caught  {name}\n          {first}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    if missed.is_empty() {
        Ok(Completion::Completed)
    } else {
        Err(format!("the merge harness missed: {}", missed.join("; ")).into())
    }
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::ignorable_test("merge_sweep", merge_sweep),
        Trial::ignorable_test("merge_negative_control", merge_negative_control),
    ];
    libtest_mimic::run(&args, trials).exit();
}
