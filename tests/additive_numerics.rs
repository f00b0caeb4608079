//! Additive attention in the device code itself: `tools/additive-harness`
//! compiles `kernels/common/additive.cuh` for the host and runs every CTA's
//! threads as fibers (barriers and shuffles as rendezvous, resumed in
//! changing orders) over Da != Dv from 8 to 256, lengths one short of and one
//! past a tile, every mask in both alignments, rows with no visible key,
//! bias on and off, every tensor on its own padded strides with NaN padding,
//! outputs and shared memory poisoned around their views, against f64; it
//! also measures O's error with tanh.approx modelled at the PTX ISA's
//! bound. The host's shared-memory formula is checked against the kernel's.
//! Then a negative control: each injected bug in a copy of additive.cuh must
//! make it fail. Needs g++ and the CUDA headers (beside `$NVCC` or in
//! `$CUDA_HOME`); ignored with the reason without them, a failure under
//! `FUSED_ATTN_REQUIRE_KERNELS=1`.

#[path = "common/tier.rs"]
mod tier;

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

fn prerequisites() -> Result<PathBuf, Result<Completion, Failed>> {
    tier::harness_prerequisites("additive-harness")
}

/// Builds the harness over `cuh` (the text of additive.cuh, maybe mutated)
/// in `work`; the executable's path.
fn build(work: &Path, include: &Path, cuh: &str) -> Result<PathBuf, Failed> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join("additive.cuh"), cuh)?;
    std::fs::copy(root.join("kernels/common/types.cuh"), work.join("types.cuh"))?;
    std::fs::copy(root.join("kernels/params.h"), work.join("../params.h"))?;
    let exe = work.join("harness");
    let out = Command::new("g++")
        .args(["-O1", "-std=c++17", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-Wno-strict-aliasing"])
        .args(["-Wno-class-memaccess", "-I"])
        .arg(include)
        .arg("-I")
        .arg(work)
        .arg(root.join("tools/additive-harness/harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()?;
    if !out.status.success() {
        return Err(format!("compiling the harness:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(exe)
}

/// Runs it: Ok(output) if it passed, Err(output) if not.
fn run(exe: &Path, args: &[&str]) -> Result<Result<String, String>, Failed> {
    let out = Command::new(exe).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or("").to_string();
    if !last.starts_with("WORST") {
        return Ok(Err(format!("(crashed or unexpected output) {last}")));
    }
    Ok(if out.status.success() && last.contains(" bad 0 ") { Ok(text) } else { Err(text) })
}

fn source() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/common/additive.cuh"))
        .expect("kernels/common/additive.cuh")
}

fn additive_sweep() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let work = std::env::temp_dir().join(format!("fused-attn-additive-{}", std::process::id())).join("common");
    let exe = build(&work, &include, &source())?;
    // The host's shared-memory size is the kernel's layout.
    for (da, dv) in [(8, 8), (128, 64), (40, 256), (256, 256)] {
        let out = Command::new(&exe).args(["smem", &da.to_string(), &dv.to_string()]).output()?;
        let theirs: usize = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        let ours = fused_attn::internals::additive_smem_bytes(da, dv);
        if theirs != ours {
            return Err(
                format!("Da {da} Dv {dv}: the kernel uses {theirs} B of shared memory, the host gives {ours}").into()
            );
        }
    }
    let r = run(&exe, &[])?;
    let _ = std::fs::remove_dir_all(work.parent().unwrap());
    match r {
        Ok(text) => {
            for l in text.lines().filter(|l| l.starts_with("info") || l.contains("tanh.approx")) {
                eprintln!("{l}");
            }
            eprintln!("{}", text.lines().last().unwrap_or(""));
            Ok(Completion::Completed)
        }
        Err(text) => {
            let bad: Vec<&str> =
                text.lines().filter(|l| l.starts_with("FAIL") || l.starts_with("WORST")).take(30).collect();
            Err(format!("additive harness failed:\n{}", bad.join("\n")).into())
        }
    }
}

/// (name, text in additive.cuh, replacement)
const MUTANTS: &[(&str, &str, &str)] = &[
    ("bias dropped", "(bh ? fa_to_float(bh[d]) : 0.f)", "(bh ? 0.f : 0.f)"),
    ("no barrier between the tile loads and the scores", "__syncthreads();  // also orders", "// also orders"),
    ("running O not rescaled", "acc[g][e] *= alpha;", "acc[g][e] *= 1.f;"),
    ("left window side ignored", "j < lo || ", ""),
    ("bottom-right diagonal ignored", "i + p.diag_offset - p.window_left", "i - p.window_left"),
    ("row max over 4 of the row's 8 threads", "return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));", "return x;"),
    ("LSE without the log of the sum", "m + logf(l)", "m"),
    ("empty rows divide by zero", "l > 0.f ? 1.f / l : 0.f", "1.f / l"),
    (
        "K' rows read at the wrong pitch",
        "ks + (c + kk * kAddRowThreads) * pitch + d",
        "ks + (c + kk * kAddRowThreads) * da + d",
    ),
    (
        "the CTA's key tiles taken from its first row only",
        "fa_additive_keys(p, i0 + rows - 1, unused, tile_hi);",
        "fa_additive_keys(p, i0, unused, tile_hi);",
    ),
];

fn additive_negative_control() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let src = source();
    let base = std::env::temp_dir().join(format!("fused-attn-additive-neg-{}", std::process::id()));
    let mut missed = Vec::new();
    for (i, (name, from, to)) in MUTANTS.iter().enumerate() {
        if !src.contains(from) {
            return Err(format!("mutant `{name}`: `{from}` is not in additive.cuh (update the mutant)").into());
        }
        let exe = build(&base.join(format!("m{i}")).join("common"), &include, &src.replace(from, to))?;
        match run(&exe, &["quick"])? {
            Ok(_) => missed.push(*name),
            Err(text) => {
                let first = text.lines().find(|l| !l.starts_with("ok")).unwrap_or("");
                eprintln!("caught  {name}\n          {first}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    eprintln!("{} of {} injected bugs caught", MUTANTS.len() - missed.len(), MUTANTS.len());
    if missed.is_empty() {
        Ok(Completion::Completed)
    } else {
        Err(format!("the additive harness missed: {}", missed.join("; ")).into())
    }
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::ignorable_test("additive_sweep", additive_sweep),
        // Ten g++ builds: run with --ignored (or --include-ignored).
        Trial::ignorable_test("additive_negative_control", additive_negative_control).with_ignored_flag(true),
    ];
    libtest_mimic::run(&args, trials).exit();
}
