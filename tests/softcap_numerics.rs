//! Softcap numerics at the extremes (DESIGN.md section 1): `c · tanh(s / c)`
//! with a small relative error for every finite `c > 0`, and never NaN or inf
//! from finite scores.
//!
//! - `device_softcap_sweep`: the device functions themselves (math.cuh's
//!   `fa_softcap_log2` of the tiled kernels, mask.cuh's `fa_score` of the naive
//!   one), compiled for the host by `tools/softcap-harness` with ex2.approx and
//!   rcp.approx modelled at their error bounds, swept over caps from 1e-45 to
//!   f32::MAX and scores up to 2.3e38 against f64. Needs g++; ignored with the
//!   reason without it, a failure under `FUSED_ATTN_REQUIRE_KERNELS=1`.
//! - `reference_capped_score`: the CPU reference's `capped_score` at the same
//!   extremes.

#[path = "common/tier.rs"]
mod tier;

use std::path::Path;
use std::process::Command;

use fused_attn::reference::capped_score;
use fused_attn::{AttentionOptions, DType, Layout, Mask, Problem};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The bound asserted on the tiled kernels' softcap and the naive kernel's,
/// relative; the harness measures 7.2e-7 (~6 ulp) with the MUFU errors modelled.
const MAX_REL: f64 = 1e-6;

/// math.cuh with its one inline-PTX statement (ex2.approx) routed to the harness.
fn host_math_cuh(root: &Path) -> Result<String, Failed> {
    let src = std::fs::read_to_string(root.join("kernels/common/math.cuh")).map_err(|e| format!("math.cuh: {e}"))?;
    let start = src.find("asm(\"ex2.approx").ok_or("math.cuh: no ex2.approx asm statement")?;
    let end = start + src[start..].find(");").ok_or("math.cuh: unterminated asm")? + 2;
    let out = format!("{}y = harness_ex2(x);{}", &src[..start], &src[end..]);
    if out.lines().any(|l| l.contains("asm") && !l.trim_start().starts_with("//")) {
        return Err("math.cuh has inline asm the harness does not model; extend tools/softcap-harness".into());
    }
    Ok(out)
}

fn device_softcap_sweep() -> Result<Completion, Failed> {
    if !tier::have("g++") {
        return tier::missing("no g++ to build tools/softcap-harness");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("fused-attn-softcap-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("math.cuh"), host_math_cuh(root)?)?;
    let exe = work.join("harness");
    let out = Command::new("g++")
        .args(["-O2", "-std=c++17", "-Wall", "-Werror"])
        .arg("-I")
        .arg(&work)
        .arg("-I")
        .arg(root.join("kernels/common"))
        .arg(root.join("tools/softcap-harness/harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()?;
    if !out.status.success() {
        return Err(format!("compiling the harness:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let out = Command::new(&exe).arg("100000").output()?;
    let _ = std::fs::remove_dir_all(&work);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{text}");
    let last = text.lines().last().unwrap_or("");
    // WORST rel <r> (exact ex2/rcp: <r>, naive kernel: <r>) nonfinite <n> bad <n>
    let nums: Vec<f64> = last
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter_map(|w| w.parse().ok())
        .collect();
    let [worst, _exact, naive, nonfinite, bad] = nums[..] else {
        return Err(format!("unexpected harness output: {last}").into());
    };
    assert_eq!(nonfinite, 0.0, "NaN or inf from finite scores:\n{text}");
    assert_eq!(bad, 0.0, "results outside the bounds math.cuh states for subnormal caps:\n{text}");
    assert!(worst <= MAX_REL, "fa_softcap_log2: max relative error {worst:.3e} > {MAX_REL:e}:\n{text}");
    assert!(naive <= MAX_REL, "naive fa_score: max relative error {naive:.3e} > {MAX_REL:e}:\n{text}");
    Ok(Completion::Completed)
}

fn problem(softcap: f32) -> Problem {
    let l = Layout::bshd(1, 1, 1, 8);
    let opts = AttentionOptions::new(Mask::Full).with_scale(1.0).with_softcap(softcap);
    fused_attn::problem_of(DType::F16, &l, &l, &l, &opts).expect("a valid one-element problem")
}

/// `c tanh(s / c)` by its Taylor series where `s / c` is small, else by f64
/// tanh (accurate there: no cancellation, nothing subnormal).
fn exact(c: f64, s: f64) -> f64 {
    let x = s / c;
    if x.abs() < 1e-3 {
        s * (1.0 - x * x / 3.0 + 2.0 * x.powi(4) / 15.0 - 17.0 * x.powi(6) / 315.0)
    } else {
        c * x.tanh()
    }
}

fn reference_capped_score() -> Result<(), Failed> {
    let caps = [f32::from_bits(1), 1e-39, 1e-30, 1e-3, 1.0, 50.0, 1e5, 1e6, 1e38, f32::MAX];
    let mut scores = vec![0.0f64];
    for e in -400..=383 {
        let s = 10f64.powf(e as f64 / 10.0);
        scores.extend([s, -s]);
    }
    for c in caps {
        let p = problem(c);
        for &s in &scores {
            let got = capped_score(&p, s);
            let want = exact(c as f64, s);
            assert!(got.is_finite(), "capped_score(c = {c:e}, s = {s:e}) = {got}");
            if want == 0.0 {
                assert_eq!(got, 0.0, "c = {c:e}, s = {s:e}");
            } else {
                let rel = ((got - want) / want).abs();
                assert!(rel < 1e-14, "capped_score(c = {c:e}, s = {s:e}) = {got:e}, want {want:e} (rel {rel:e})");
            }
        }
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::ignorable_test("device_softcap_sweep", device_softcap_sweep),
        Trial::test("reference_capped_score", reference_capped_score),
    ];
    libtest_mimic::run(&args, trials).exit();
}
