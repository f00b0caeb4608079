//! Attention maps (DESIGN.md section 1b) in the device code itself:
//! `tools/maps-harness` compiles `kernels/common/maps.cuh` for the host and
//! runs it over the kernels' launch grid, thread by thread: f16/bf16 in, f32
//! or input-type maps, GQA 8:2, head dims 8..256, lengths one short of a
//! tile, every mask kind in both alignments, rows with no visible key,
//! custom and negative scales, softcap, ALiBi, sinks, head subsets with and
//! without the mean, every tensor on its own padded strides and the outputs
//! poisoned around their views, against f64. Then a negative control
//! (`--ignored`): each of 15 injected bugs in a copy of maps.cuh must make it fail. Needs g++ and the
//! CUDA headers (beside `$NVCC` or in `$CUDA_HOME`); ignored with the reason
//! without them, a failure under `FUSED_ATTN_REQUIRE_KERNELS=1`.

#[path = "common/tier.rs"]
mod tier;

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Builds the harness over `maps_cuh` (the text of maps.cuh, maybe
/// mutated) and runs it: Ok(output) if it passed, Err(output) if not.
fn run_harness(work: &Path, include: &Path, maps_cuh: &str) -> Result<Result<String, String>, Failed> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join("maps.cuh"), maps_cuh)?;
    std::fs::copy(root.join("kernels/common/types.cuh"), work.join("types.cuh"))?;
    std::fs::copy(root.join("kernels/common/mask.cuh"), work.join("mask.cuh"))?;
    std::fs::copy(root.join("kernels/params.h"), work.join("../params.h"))?;
    let exe = work.join("harness");
    let out = Command::new("g++")
        .args(["-O2", "-std=c++17", "-Wall", "-Werror", "-Wno-strict-aliasing", "-Wno-class-memaccess"])
        .arg("-I")
        .arg(include)
        .arg("-I")
        .arg(work)
        .arg(root.join("tools/maps-harness/harness.cpp"))
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
    tier::harness_prerequisites("maps-harness")
}

fn source() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/common/maps.cuh"))
        .expect("kernels/common/maps.cuh")
}

fn maps_sweep() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let work = std::env::temp_dir().join(format!("fused-attn-maps-{}", std::process::id())).join("common");
    let r = run_harness(&work, &include, &source())?;
    let _ = std::fs::remove_dir_all(work.parent().unwrap());
    match r {
        Ok(text) => {
            eprintln!("{}", text.lines().last().unwrap_or(""));
            Ok(Completion::Completed)
        }
        Err(text) => {
            let bad: Vec<&str> = text.lines().filter(|l| !l.starts_with("ok")).take(30).collect();
            Err(format!("maps harness failed:\n{}", bad.join("\n")).into())
        }
    }
}

/// (name, text in maps.cuh, replacement)
const MUTANTS: &[(&str, &str, &str)] = &[
    ("P = exp(s), LSE not subtracted", "expf(s - lse)", "expf(s)"),
    ("score without scale and softcap", "float s = fa_score(p, dot);", "float s = dot;"),
    ("ALiBi added instead of subtracted", "s -= p.alibi_slopes", "s += p.alibi_slopes"),
    ("ALiBi distance without the diagonal offset", "float(i + p.diag_offset - j)", "float(i - j)"),
    ("ALiBi slopes of batch entry 0 only", "p.alibi_slopes[b * p.alibi_batch_stride + h]", "p.alibi_slopes[h]"),
    ("GQA: KV head h % Hk instead of h / (Hq / Hk)", "(h / p.q_per_kv)", "(h % p.heads_kv)"),
    ("masked entries computed", "const bool visible = j >= r.lo && j < r.hi;", "const bool visible = r.lo == r.lo;"),
    (
        "the mean over the requested heads only",
        "const bool every_head = with_mean || m.all_heads;",
        "const bool every_head = m.all_heads;",
    ),
    ("the mean not divided by the head count", "sum / float(p.heads_q)", "sum"),
    ("a subset's map head = its query head", "else if (!with_mean) slot = t;", "else if (!with_mean) slot = h;"),
    ("every head read with head 0's LSE", "h * p.lse_head_stride + i]", "0 * p.lse_head_stride + i]"),
    ("Q read with K's row stride", "i * p.q_row_stride", "i * p.k_row_stride"),
    ("map rows with the mean's row stride", "i * m.map_row_stride", "i * m.mean_row_stride"),
    (
        "the last key of each row left unwritten",
        "j < m.p.seqlen_k) fa_maps_entry",
        "j < m.p.seqlen_k - 1) fa_maps_entry",
    ),
    ("rows of a tile from the key index", "tid / kMapsKeysPerTile;", "tid % kMapsRowsPerTile;"),
];

fn maps_negative_control() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let src = source();
    let base = std::env::temp_dir().join(format!("fused-attn-maps-neg-{}", std::process::id()));
    let mut missed = Vec::new();
    for (i, (name, from, to)) in MUTANTS.iter().enumerate() {
        if !src.contains(from) {
            return Err(format!("mutant `{name}`: `{from}` is not in maps.cuh (update the mutant)").into());
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
        Err(format!("the maps harness missed: {}", missed.join("; ")).into())
    }
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::ignorable_test("maps_sweep", maps_sweep),
        // One g++ build per mutant (about 40 s on two cores): run with
        // `--ignored`, as the emulated tiers' negative controls are.
        Trial::ignorable_test("maps_negative_control", maps_negative_control).with_ignored_flag(true),
    ];
    libtest_mimic::run(&args, trials).exit();
}
