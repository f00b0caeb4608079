//! The baseline backward kernels' device code on the host:
//! `tools/bwd-harness` compiles `kernels/common/bwd_naive.cuh` for the host
//! and runs every thread of its three grids (and 127 past each end) over
//! cases written here, against the f64 reference gradients
//! ([`reference::backward`]): every mask in both alignments, GQA 4:1 with
//! two KV heads, `Lq > Lk` (rows that see no key), lengths one short of a
//! tile, head dims 8..256, custom and negative scales, softcap, ALiBi per
//! batch entry, sinks and their gradient, every tensor on its own padded
//! strides with the gradients' allocations poisoned around their views.
//! Tolerances: DESIGN.md section 4's gradient ones (rel L2 bf16 2e-2, f16
//! 5e-3; the worst row at 3x that of the tensor's largest row). Then a
//! negative control: each injected bug in a copy of the header must fail.
//! Needs g++ and the CUDA headers; ignored with the reason without them, a
//! failure under `FUSED_ATTN_REQUIRE_KERNELS=1`.

#[path = "common/emu.rs"]
mod emu;
#[path = "common/tier.rs"]
mod tier;

use std::path::{Path, PathBuf};
use std::process::Command;

use emu::Mutant;
use fused_attn::reference::{self, Gradients};
use fused_attn::{Alibi, AttentionOptions, Element, HeadValues, HostTensor, Layout, LseLayout, Mask, MaskAlignment};
use half::{bf16, f16};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn prerequisites() -> Result<PathBuf, Result<Completion, Failed>> {
    tier::harness_prerequisites("bwd-harness")
}

/// What runs a case file: the baseline's harness, or the sm80 emulator over
/// the tiled kernels (deterministic mode or not).
#[derive(Clone, Debug)]
enum Runner {
    Harness(PathBuf),
    Emulator { exe: PathBuf, deterministic: bool },
}

impl Runner {
    fn command(&self, case: &Path, answer: &Path) -> Command {
        match self {
            Runner::Harness(exe) => {
                let mut c = Command::new(exe);
                c.arg(case).arg(answer);
                c
            }
            Runner::Emulator { exe, deterministic } => {
                let mut c = Command::new(exe);
                c.arg(format!("--bwd={}", case.display()))
                    .arg(format!("--bwd-out={}", answer.display()))
                    .arg(format!("--det={}", u8::from(*deterministic)))
                    .arg("--round=hw");
                c
            }
        }
    }
}

/// Translates `kernels` (maybe mutated) with the sm80 emulator's gen.py
/// (no forward kernels) and compiles the emulator in `work`.
fn build_emulator(work: &Path, include: &Path, kernels: &Path) -> Result<PathBuf, Failed> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tool = root.join("tools/sm80-emu");
    let gen = Command::new("python3")
        .arg(tool.join("gen.py"))
        .arg(kernels)
        .arg(work.join("kernels"))
        .arg("--only=^no forward kernel$")
        .output()?;
    if !gen.status.success() {
        return Err(format!("gen.py:\n{}", String::from_utf8_lossy(&gen.stderr)).into());
    }
    let exe = work.join("emu");
    let out = Command::new("g++")
        .args(["-O2", "-std=c++17", "-w"])
        .arg("-I")
        .arg(include)
        .arg("-I")
        .arg(&tool)
        .arg("-I")
        .arg(work)
        .arg(tool.join("emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()?;
    if !out.status.success() {
        return Err(format!("compiling the emulator:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(exe)
}

/// Builds the harness over `header` (bwd_naive.cuh's text, maybe mutated) in `work`.
fn build(work: &Path, include: &Path, header: &str) -> Result<PathBuf, Failed> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let common = work.join("common");
    std::fs::create_dir_all(&common)?;
    // The harness includes ../emu-common/bwd_case.h from its own directory.
    std::fs::write(common.join("bwd_naive.cuh"), header)?;
    std::fs::copy(root.join("kernels/common/types.cuh"), common.join("types.cuh"))?;
    std::fs::copy(root.join("kernels/params.h"), work.join("params.h"))?;
    let exe = work.join("harness");
    let out = Command::new("g++")
        .args([
            "-O2",
            "-std=c++17",
            "-Wall",
            "-Werror",
            "-Wno-strict-aliasing",
            "-Wno-class-memaccess",
            "-Wno-unknown-pragmas",
        ])
        .arg("-I")
        .arg(include)
        .arg("-I")
        .arg(&common)
        .arg(root.join("tools/bwd-harness/harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()?;
    if !out.status.success() {
        return Err(format!("compiling the harness:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(exe)
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    mask: Mask,
    top_left: bool,
    scale: Option<f32>,
    softcap: Option<f32>,
    alibi: bool,
    sinks: bool,
    bf16: bool,
    seed: u64,
    /// A packed batch of these (Lq, Lk) sequences (b, lq, lk unused).
    seqs: Option<&'static [(usize, usize)]>,
}

fn cases() -> Vec<Case> {
    let shapes =
        [(2, 7, 13, 8, 2, 16), (1, 13, 5, 3, 1, 32), (1, 63, 64, 4, 1, 64), (2, 9, 9, 6, 3, 256), (1, 1, 17, 4, 4, 8)];
    let masks = [Mask::Full, Mask::Causal, Mask::window(3, 1), Mask::window(0, 0)];
    let mut out = Vec::new();
    let mut seed = 0;
    for (si, &(b, lq, lk, hq, hk, d)) in shapes.iter().enumerate() {
        for (mi, &mask) in masks.iter().enumerate() {
            seed += 1;
            let n = si + mi;
            out.push(Case {
                b,
                lq,
                lk,
                hq,
                hk,
                d,
                mask,
                top_left: n % 3 == 2,
                scale: [None, Some(-0.7), Some(0.3)][n % 3],
                softcap: (n % 4 == 1).then_some(2.5),
                alibi: n % 2 == 1,
                sinks: n % 3 == 0,
                bf16: n % 2 == 0,
                seed,
                seqs: None,
            });
        }
    }
    out
}

/// A padded layout of its own: extra elements after every head, row and batch.
fn padded(rng: &mut StdRng, b: usize, l: usize, h: usize, d: usize) -> Layout {
    let (ph, pr, pb) = (rng.random_range(0..3) * 8, rng.random_range(0..3) * 8, rng.random_range(0..3) * 8);
    let hs = d + ph;
    let rs = h * hs + pr;
    Layout::strided_bshd([b, l, h, d], [l.max(1) * rs + pb, rs, hs, 1])
}

fn put_i64(buf: &mut Vec<u8>, xs: &[i64]) {
    xs.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
}
fn put_f32(buf: &mut Vec<u8>, xs: &[f32]) {
    xs.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
}

/// One case through the harness `exe`: Ok(summary) or Err(what failed).
fn run_case<T: Element>(runner: &Runner, c: &Case, work: &Path) -> Result<Result<String, String>, Failed> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    // A packed batch: one sequence of all tokens ([1, T, H, D]).
    let (cu_q, cu_k): (Vec<usize>, Vec<usize>) = match c.seqs {
        None => (vec![], vec![]),
        Some(seqs) => {
            let cum = |f: fn(&(usize, usize)) -> usize| {
                std::iter::once(0)
                    .chain(seqs.iter().scan(0, move |t, x| Some(*t + f(x)).inspect(|&v| *t = v)))
                    .collect()
            };
            (cum(|x| x.0), cum(|x| x.1))
        }
    };
    let (tb, tq, tk) = match c.seqs {
        None => (c.b, c.lq, c.lk),
        Some(_) => (1, *cu_q.last().unwrap(), *cu_k.last().unwrap()),
    };
    let lay = |rng: &mut StdRng, l, h| padded(rng, tb, l, h, c.d);
    let (ql, kl, vl, ol, dol) = (
        lay(&mut rng, tq, c.hq),
        lay(&mut rng, tk, c.hk),
        lay(&mut rng, tk, c.hk),
        lay(&mut rng, tq, c.hq),
        lay(&mut rng, tq, c.hq),
    );
    let (dql, dkl, dvl) = (lay(&mut rng, tq, c.hq), lay(&mut rng, tk, c.hk), lay(&mut rng, tk, c.hk));
    let fill = |rng: &mut StdRng, l: &Layout, amp: f32| -> Vec<T> {
        (0..l.span().unwrap()).map(|_| T::from_f32(rng.random_range(-amp..amp))).collect()
    };
    let (q, k, v, d_o) =
        (fill(&mut rng, &ql, 2.0), fill(&mut rng, &kl, 2.0), fill(&mut rng, &vl, 1.0), fill(&mut rng, &dol, 1.0));
    let slopes: Vec<f32> = (0..c.b * c.hq).map(|_| rng.random_range(0.0..0.5)).collect();
    let sinks: Vec<f32> = (0..c.hq).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mut opts = AttentionOptions::new(c.mask);
    if c.top_left {
        opts = opts.with_alignment(MaskAlignment::TopLeft);
    }
    if let Some(s) = c.scale {
        opts = opts.with_scale(s);
    }
    if let Some(cap) = c.softcap {
        opts = opts.with_softcap(cap);
    }
    if c.alibi {
        opts = opts.with_alibi(Alibi::per_batch(HeadValues::Host(&slopes)));
    }
    if c.sinks {
        opts = opts.with_sinks(HeadValues::Host(&sinks));
    }
    // The forward's O (rounded to T, in its own layout) and LSE (f32), as a
    // GPU forward would leave them, and the reference gradients: for a packed
    // batch, sequence by sequence (each a batch of one, on its own diagonal,
    // with its own ALiBi slopes), written at its rows.
    let mut o = vec![T::from_f32(0.0); ol.span().unwrap()];
    let ll = LseLayout::strided([tb, c.hq, tq], [c.hq * (tq + 3) + 5, tq + 3, 1]);
    let mut lse = vec![f32::NAN; ll.span().unwrap()];
    let zeros = |l: &Layout| vec![0.0f64; l.shape.iter().product()];
    struct Want {
        dq: Vec<f64>,
        dk: Vec<f64>,
        dv: Vec<f64>,
        dsinks: Option<Vec<f64>>,
    }
    let mut g = Want { dq: zeros(&dql), dk: zeros(&dkl), dv: zeros(&dvl), dsinks: None };
    let seq_count = if c.seqs.is_some() { cu_q.len() - 1 } else { 1 };
    let mut problem = None;
    for s in 0..seq_count {
        // The rows of this part: all of them, or sequence s's.
        let (q0, lq, k0, lk) = match c.seqs {
            None => (0, tq, 0, tk),
            Some(_) => (cu_q[s], cu_q[s + 1] - cu_q[s], cu_k[s], cu_k[s + 1] - cu_k[s]),
        };
        fn part<'a, T>(data: &'a [T], l: &Layout, r0: usize, len: usize) -> HostTensor<'a, T> {
            let mut shape = l.shape;
            shape[1] = len;
            HostTensor::new(&data[(r0 * l.strides[1]).min(data.len())..], Layout::strided_bshd(shape, l.strides))
        }
        let mut o_s = opts;
        if c.alibi && c.seqs.is_some() {
            o_s = o_s.with_alibi(Alibi::per_head(HeadValues::Host(&slopes[s * c.hq..(s + 1) * c.hq])));
        }
        let (qs, ks, vs) = (part(&q, &ql, q0, lq), part(&k, &kl, k0, lk), part(&v, &vl, k0, lk));
        let fwd = reference::forward(qs, ks, vs, &o_s).map_err(|e| e.to_string())?;
        let gs: Gradients =
            reference::backward(qs, ks, vs, part(&d_o, &dol, q0, lq), &o_s).map_err(|e| e.to_string())?;
        let bn = qs.layout.shape[0];
        for b in 0..bn {
            for h in 0..c.hq {
                for i in 0..lq {
                    lse[ll.offset(b, h, q0 + i)] = fwd.lse[(b * c.hq + h) * lq + i] as f32;
                    for x in 0..c.d {
                        let at = ((b * lq + i) * c.hq + h) * c.d + x;
                        o[ol.offset(b, q0 + i, h, x)] = T::from_f32(fwd.o[at] as f32);
                        g.dq[((b * tq + q0 + i) * c.hq + h) * c.d + x] = gs.dq[at];
                    }
                }
            }
            for h in 0..c.hk {
                for j in 0..lk {
                    for x in 0..c.d {
                        let at = ((b * lk + j) * c.hk + h) * c.d + x;
                        let to = ((b * tk + k0 + j) * c.hk + h) * c.d + x;
                        g.dk[to] = gs.dk[at];
                        g.dv[to] = gs.dv[at];
                    }
                }
            }
        }
        if let Some(ds) = gs.dsinks {
            let acc = g.dsinks.get_or_insert_with(|| vec![0.0; c.hq]);
            acc.iter_mut().zip(&ds).for_each(|(a, x)| *a += x);
        }
        problem.get_or_insert(fwd.problem);
    }
    let p = problem.ok_or("no sequence")?;
    let (c_b, c_lq, c_lk) = match c.seqs {
        None => (c.b, c.lq, c.lk),
        Some(seqs) => {
            (seqs.len(), seqs.iter().map(|x| x.0).max().unwrap_or(0), seqs.iter().map(|x| x.1).max().unwrap_or(0))
        }
    };

    // The case file (format in tools/bwd-harness/harness.cpp).
    let mut buf = b"FABW".to_vec();
    let (wl, wr) = p.mask.bounds();
    let side = |x: Option<usize>| x.map_or(-1, |v| v.min(c_lq + c_lk) as i64);
    put_i64(
        &mut buf,
        &[
            i64::from(c.bf16),
            c_b as i64,
            c_lq as i64,
            c_lk as i64,
            c.hq as i64,
            c.hk as i64,
            c.d as i64,
            side(wl),
            side(wr),
            p.diag_offset(),
            i64::from(c.alibi),
            c.hq as i64,
            i64::from(c.sinks),
            i64::from(c.sinks),
        ],
    );
    put_f32(&mut buf, &[p.scale, p.softcap.unwrap_or(0.0)]);
    // A packed batch's batch strides are 0 (its tensors have batch extent 1).
    let bs = |x: usize| if c.seqs.is_some() { 0 } else { x as i64 };
    let strides = |l: &Layout| [bs(l.strides[0]), l.strides[1] as i64, l.strides[2] as i64];
    for (data, l) in [(&q, &ql), (&k, &kl), (&v, &vl), (&o, &ol), (&d_o, &dol)] {
        put_i64(&mut buf, &strides(l));
        put_i64(&mut buf, &[data.len() as i64]);
        data.iter().for_each(|x| buf.extend_from_slice(&x.to_bits().to_le_bytes()));
    }
    put_i64(&mut buf, &[bs(ll.strides[0]), ll.strides[1] as i64, lse.len() as i64]);
    put_f32(&mut buf, &lse);
    for vals in [&slopes, &sinks] {
        put_i64(&mut buf, &[vals.len() as i64]);
        put_f32(&mut buf, vals);
    }
    const GUARD: usize = 16;
    for l in [&dql, &dkl, &dvl] {
        put_i64(&mut buf, &strides(l));
        put_i64(&mut buf, &[(GUARD + l.span().unwrap() + GUARD) as i64, GUARD as i64]);
    }
    put_i64(&mut buf, &[cu_q.len() as i64, i64::from(c.top_left)]);
    for cu in [&cu_q, &cu_k] {
        cu.iter().for_each(|&x| buf.extend_from_slice(&(x as i32).to_le_bytes()));
    }
    let (case_file, out_file) = (work.join("case.bin"), work.join("out.bin"));
    std::fs::write(&case_file, &buf)?;
    let _ = std::fs::remove_file(&out_file);
    let run = runner.command(&case_file, &out_file).output()?;
    if !run.status.success() {
        return Ok(Err(format!(
            "runner failed: {}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )));
    }
    let bytes = std::fs::read(&out_file)?;
    let mut at = 0;
    let mut take16 = |n: usize| {
        let v: Vec<u16> = bytes[at..at + 2 * n].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        at += 2 * n;
        v
    };
    let outs: Vec<Vec<u16>> = [&dql, &dkl, &dvl].iter().map(|l| take16(GUARD + l.span().unwrap() + GUARD)).collect();
    let dsinks: Vec<f32> = bytes[at..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();

    let tol = if c.bf16 { 2e-2 } else { 5e-3 };
    let mut report = String::new();
    for ((name, l, want), got) in [("dq", &dql, &g.dq), ("dk", &dkl, &g.dk), ("dv", &dvl, &g.dv)].into_iter().zip(&outs)
    {
        let [b_n, len, h_n, d] = l.shape;
        let mut in_view = vec![false; got.len()];
        let (mut err2, mut ref2, mut worst_row, mut max_row) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for b in 0..b_n {
            for r in 0..len {
                for h in 0..h_n {
                    let (mut re2, mut rr2) = (0.0, 0.0);
                    for x in 0..d {
                        let off = GUARD + l.offset(b, r, h, x);
                        in_view[off] = true;
                        let bits = got[off];
                        if bits == 0xffff {
                            return Ok(Err(format!("{name}[{b},{r},{h},{x}] not written")));
                        }
                        let y: f64 = from_bits::<T>(bits).into();
                        let w = want[((b * len + r) * h_n + h) * d + x];
                        re2 += (y - w) * (y - w);
                        rr2 += w * w;
                    }
                    err2 += re2;
                    ref2 += rr2;
                    worst_row = worst_row.max(re2.sqrt());
                    max_row = max_row.max(rr2.sqrt());
                }
            }
        }
        let stray = got.iter().zip(&in_view).filter(|(&x, &v)| !v && x != 0xffff).count();
        let rel = if ref2 > 0.0 { (err2 / ref2).sqrt() } else { err2.sqrt() };
        report += &format!(" {name} {rel:.2e}");
        // A gradient that is exactly 0 in exact arithmetic (a band one key
        // wide: P = 1, dS = dP - D = 0) comes out as rounding noise (~1e-6)
        // from a kernel whose dP and D sum in different orders: rows are
        // judged against at least 1e-2 (inputs are O(1); the bugs the
        // negative controls inject move rows by O(0.1) and more).
        // A NaN anywhere makes err2 (hence rel) NaN, which must fail.
        if stray > 0 || rel.is_nan() || rel > tol || worst_row > 3.0 * tol * max_row.max(1e-2) {
            return Ok(Err(format!(
                "{name}: rel L2 {rel:.3e} (tol {tol:.0e}), worst row {worst_row:.3e} of max row {max_row:.3e}, {stray} stray writes"
            )));
        }
    }
    if let Some(want) = &g.dsinks {
        let scale = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        let err = want.iter().zip(&dsinks).fold(0.0f64, |m, (w, &y)| m.max((y as f64 - w).abs()));
        report += &format!(" dsinks {:.2e}", err / scale);
        if err.is_nan() || err > tol * scale {
            return Ok(Err(format!("dsinks: max error {err:.3e} of {scale:.3e}: {dsinks:?} vs {want:?}")));
        }
    } else if dsinks.iter().any(|x| !x.is_nan()) {
        return Ok(Err("dsinks written without sinks".into()));
    }
    Ok(Ok(report))
}

/// The element whose bits are `bits` (f16 and bf16 are both 16-bit).
fn from_bits<T: Element>(bits: u16) -> T {
    // Element has to_bits; its inverse for the two types it has.
    if T::DTYPE == fused_attn::DType::F16 {
        T::from_f32(f16::from_bits(bits).to_f32())
    } else {
        T::from_f32(bf16::from_bits(bits).to_f32())
    }
}

/// Every case through the harness built from `header`: Ok(lines) or Err(first failure).
fn sweep(work: &Path, include: &Path, header: &str) -> Result<Result<Vec<String>, String>, Failed> {
    let exe = build(work, include, header)?;
    sweep_with(&[Runner::Harness(exe)], &cases(), work)
}

/// Every case through the first runner, and through each further one every
/// `stride`-th case (the tiled kernels' atomic mode differs from the
/// deterministic one only in CTA order and turns: half the cases cover it,
/// and CI's time budget holds): Ok(lines) or Err(first failure).
fn sweep_with(runners: &[Runner], cases: &[Case], work: &Path) -> Result<Result<Vec<String>, String>, Failed> {
    const STRIDE: usize = 2;
    let mut lines = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        for (ri, runner) in runners.iter().enumerate() {
            if ri > 0 && i % STRIDE != (ri - 1) % STRIDE {
                continue;
            }
            let r = if c.bf16 { run_case::<bf16>(runner, c, work)? } else { run_case::<f16>(runner, c, work)? };
            let mode = match runner {
                Runner::Harness(_) => "",
                Runner::Emulator { deterministic: true, .. } => " det",
                Runner::Emulator { .. } => " atomic",
            };
            match r {
                Ok(s) => lines.push(format!("ok {c:?}:{mode}{s}")),
                Err(e) => return Ok(Err(format!("{c:?}{mode}: {e}"))),
            }
        }
    }
    Ok(Ok(lines))
}

fn source() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/common/bwd_naive.cuh"))
        .expect("kernels/common/bwd_naive.cuh")
}

fn backward_sweep() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let work = std::env::temp_dir().join(format!("fused-attn-bwd-{}", std::process::id()));
    let r = sweep(&work, &include, &source())?;
    let _ = std::fs::remove_dir_all(&work);
    report(r, "cases", "backward harness")
}

/// A sweep's outcome as a trial's: one line per run (its errors: rel L2
/// per gradient, dsinks relative) and their count, or the first failure.
fn report(r: Result<Vec<String>, String>, unit: &str, what: &str) -> Result<Completion, Failed> {
    match r {
        Ok(lines) => {
            for l in &lines {
                eprintln!("{}", l.rsplit_once("}:").map_or(l.as_str(), |(_, r)| r));
            }
            eprintln!("{} {unit}", lines.len());
            Ok(Completion::Completed)
        }
        Err(e) => Err(format!("{what} failed: {e}").into()),
    }
}

/// A negative control: `sweep(i)` runs the sweep on mutant i's source;
/// every mutant must make it fail.
fn negative_control(
    names: impl Iterator<Item = &'static str>,
    mut sweep: impl FnMut(usize) -> Result<Result<Vec<String>, String>, Failed>,
    what: &str,
) -> Result<Completion, Failed> {
    let mut missed = Vec::new();
    for (i, name) in names.enumerate() {
        match sweep(i)? {
            Ok(_) => missed.push(name),
            Err(first) => eprintln!("caught  {name}\n          {}", first.lines().next().unwrap_or("")),
        }
    }
    if missed.is_empty() {
        Ok(Completion::Completed)
    } else {
        Err(format!("{what} missed: {}", missed.join("; ")).into())
    }
}

/// (name, text in bwd_naive.cuh, replacement)
const MUTANTS: &[(&str, &str, &str)] = &[
    ("softcap derivative dropped", "dcap = 1.f - t * t;", "dcap = 1.f;"),
    (
        "D_i left out of dS in dQ",
        "(fa_bwd_dot(d_o, v, f.head_dim) - delta)",
        "(fa_bwd_dot(d_o, v, f.head_dim) - 0.f * delta)",
    ),
    ("dK without the scale", "fa_from_float<T>(f.scale * dk[c])", "fa_from_float<T>(dk[c])"),
    ("dK/dV from the first query head of a group only", "hh < f.q_per_kv; ++hh", "hh < 1; ++hh"),
    ("inverted band uses the wrong side", "j - off - f.window_right", "j - off - f.window_left"),
    ("ALiBi bias with the wrong sign", "s -= p.alibi_slopes", "s += p.alibi_slopes"),
    ("ALiBi batch stride ignored", "p.alibi_slopes[b * p.alibi_batch_stride + h]", "p.alibi_slopes[h]"),
    ("sink gradient with the wrong sign", "acc -= expf(sink - lse)", "acc += expf(sink - lse)"),
    ("dQ reads KV head h % Hk", "const int hk = h / f.q_per_kv;", "const int hk = h % f.heads_kv;"),
    (
        "the last column of a chunk dropped",
        "for (int c = 0; c < FA_BWD_COLS; ++c) acc[c]",
        "for (int c = 0; c < FA_BWD_COLS - 1; ++c) acc[c]",
    ),
];

fn backward_negative_control() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let src = source();
    let base = std::env::temp_dir().join(format!("fused-attn-bwd-neg-{}", std::process::id()));
    let r = negative_control(
        MUTANTS.iter().map(|m| m.0),
        |i| {
            let (name, from, to) = MUTANTS[i];
            if !src.contains(from) {
                return Err(format!("mutant `{name}`: `{from}` is not in bwd_naive.cuh (update the mutant)").into());
            }
            sweep(&base.join(format!("m{i}")), &include, &src.replace(from, to))
        },
        "the backward harness",
    );
    let _ = std::fs::remove_dir_all(&base);
    r
}

/// The tiled kernels' cases: the baseline's, and shapes that cross the
/// 64-row tiles (lengths one short of and one past a tile, several query
/// blocks per key block), GQA 4:1 with two KV heads and 5:1, head dims
/// inside a bucket (96 in the hd128 kernel, 8 in the hd64 one).
fn tiled_cases() -> Vec<Case> {
    let mut out = cases();
    let shapes = [
        (1, 130, 127, 8, 2, 128),
        (2, 63, 129, 6, 3, 96),
        (1, 200, 70, 5, 1, 64),
        (1, 65, 64, 2, 2, 256),
        (1, 129, 191, 4, 4, 40),
    ];
    let masks = [Mask::Full, Mask::Causal, Mask::window(20, 5), Mask::window(3, 0), Mask::window(70, 1)];
    let mut seed = 1000;
    for (si, &(b, lq, lk, hq, hk, d)) in shapes.iter().enumerate() {
        for (mi, &mask) in masks.iter().enumerate() {
            seed += 1;
            let n = si + mi;
            out.push(Case {
                b,
                lq,
                lk,
                hq,
                hk,
                d,
                mask,
                top_left: n % 3 == 1,
                scale: [None, Some(0.11), Some(-0.4)][n % 3],
                softcap: (n % 4 == 2).then_some(4.0),
                alibi: n % 2 == 0,
                sinks: n % 3 == 2,
                bf16: n % 2 == 1,
                seed,
                seqs: None,
            });
        }
    }
    // Tiles every row sees whole, without softcap or ALiBi: the kernels'
    // short path (full and causal, several such tiles per case).
    for (n, (lq, lk, hq, hk, d, mask)) in
        [(192, 192, 4, 1, 128, Mask::Full), (256, 256, 2, 2, 64, Mask::Causal), (128, 200, 3, 1, 256, Mask::Full)]
            .into_iter()
            .enumerate()
    {
        seed += 1;
        out.push(Case {
            b: 1,
            lq,
            lk,
            hq,
            hk,
            d,
            mask,
            top_left: false,
            scale: [None, Some(0.2), None][n],
            softcap: None,
            alibi: false,
            sinks: n == 1,
            bf16: n != 1,
            seed,
            seqs: None,
        });
    }
    // A subnormal softcap (its reciprocal overflows f32) with rows and keys
    // past the ends of partial tiles.
    seed += 1;
    out.push(Case {
        b: 1,
        lq: 70,
        lk: 100,
        hq: 2,
        hk: 1,
        d: 64,
        mask: Mask::Full,
        top_left: false,
        scale: None,
        softcap: Some(1e-40),
        alibi: false,
        sinks: false,
        bf16: true,
        seed,
        seqs: None,
    });
    // A window reaching right, Lk well past Lq, top-left: the last key
    // block to visit the partial last query block is set by Lq, not by the
    // block's end (deterministic mode's descending turns), GQA 4:1.
    seed += 1;
    out.push(Case {
        b: 1,
        lq: 100,
        lk: 300,
        hq: 8,
        hk: 2,
        d: 64,
        mask: Mask::window(30, 28),
        top_left: true,
        scale: Some(0.3),
        softcap: None,
        alibi: false,
        sinks: false,
        bf16: false,
        seed,
        seqs: None,
    });
    // Packed batches: an empty sequence, one without keys, 1x1, lengths
    // around the tile, longer than one tile on both sides.
    type Packed = (&'static [(usize, usize)], usize, usize, usize, Mask, bool);
    let packed: [Packed; 3] = [
        (&[(70, 65), (0, 13), (129, 200), (1, 1), (64, 63), (7, 0)], 8, 2, 128, Mask::Causal, false),
        (&[(33, 90), (100, 30), (5, 5)], 5, 1, 64, Mask::window(20, 3), true),
        (&[(64, 64), (65, 129)], 2, 2, 256, Mask::Full, false),
    ];
    for (n, (seqs, hq, hk, d, mask, top_left)) in packed.into_iter().enumerate() {
        for bf16 in [false, true] {
            seed += 1;
            out.push(Case {
                b: seqs.len(),
                lq: 0,
                lk: 0,
                hq,
                hk,
                d,
                mask,
                top_left,
                scale: [None, Some(0.2), Some(-0.3)][n],
                softcap: (n == 2).then_some(3.0),
                alibi: n != 0 || bf16,
                sinks: n != 1 || bf16,
                bf16,
                seed,
                seqs: Some(seqs),
            });
        }
    }
    out
}

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The tiled sm80 backward (kernels/bwd_sm80.cu) under the sm80 emulator,
/// both modes, against the f64 reference gradients: every case of
/// `tiled_cases`. The emulator also checks every shared-memory access's
/// ordering (cp.async, barriers), the global reads and writes, and in
/// deterministic mode that every dQ turn is due when asked for.
///
/// Two trials (`part` 0 and 1: every other case), so that CI's two cores
/// share the emulation.
fn tiled_sweep(part: usize) -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let work = std::env::temp_dir().join(format!("fused-attn-bwd-tiled-{}-{part}", std::process::id()));
    let exe = build_emulator(&work, &include, &kernels_dir())?;
    // The host's launch configuration is the kernel's.
    let config = Command::new(&exe).arg("--cases=bwd-config").output()?;
    let want: String = fused_attn::internals::BWD_SM80_BUCKETS
        .iter()
        .map(|&hd| {
            let (t, s) = (fused_attn::internals::bwd_sm80_threads(hd), fused_attn::internals::bwd_sm80_smem_bytes(hd));
            format!("hd{hd} threads {t} smem {s}\n")
        })
        .collect();
    if String::from_utf8_lossy(&config.stdout) != want {
        return Err(format!(
            "launch configuration: the kernels say\n{}the host says\n{want}",
            String::from_utf8_lossy(&config.stdout)
        )
        .into());
    }
    let runners =
        [Runner::Emulator { exe: exe.clone(), deterministic: true }, Runner::Emulator { exe, deterministic: false }];
    let cases: Vec<Case> =
        tiled_cases().into_iter().enumerate().filter(|(i, _)| i % 2 == part).map(|(_, c)| c).collect();
    let r = sweep_with(&runners, &cases, &work)?;
    let _ = std::fs::remove_dir_all(&work);
    report(r, &format!("runs (part {part} of 2)"), "tiled backward")
}

/// Injected bugs in bwd_sm80.cu (every occurrence of each pattern edited).
const TILED_MUTANTS: &[Mutant] = &[
    Mutant {
        name: "D_i left out of dS",
        file: "bwd_sm80.cu",
        edits: &[("(dp[t][2 * hf + e] - dl)", "(dp[t][2 * hf + e] - 0.f * dl)")],
    },
    Mutant {
        name: "softcap derivative dropped",
        file: "bwd_sm80.cu",
        edits: &[("dcap = 1.f - th * th;", "dcap = 1.f;")],
    },
    Mutant {
        name: "dK without the scale",
        file: "bwd_sm80.cu",
        edits: &[(
            "fa_pack2<T>(f.scale * dk[t][2 * hf], f.scale * dk[t][2 * hf + 1])",
            "fa_pack2<T>(dk[t][2 * hf], dk[t][2 * hf + 1])",
        )],
    },
    Mutant {
        name: "dK/dV from the first query head of a group only",
        file: "bwd_sm80.cu",
        edits: &[("steps = nm * f.q_per_kv", "steps = nm * 1")],
    },
    Mutant {
        name: "query range from the wrong window side",
        file: "bwd_sm80.cu",
        edits: &[("max(0, n0 - off - wr)", "max(0, n0 - off - wl)")],
    },
    Mutant {
        name: "window's right edge off by one",
        file: "bwd_sm80.cu",
        edits: &[("(wr < 0 || j <= i + off + wr)", "(wr < 0 || j < i + off + wr)")],
    },
    Mutant {
        name: "ALiBi bias with the wrong sign",
        file: "bwd_sm80.cu",
        edits: &[("x -= slope * fabsf", "x += slope * fabsf")],
    },
    Mutant {
        name: "ALiBi batch stride ignored",
        file: "bwd_sm80.cu",
        edits: &[("f.alibi_slopes[b * f.alibi_batch_stride + h]", "f.alibi_slopes[h]")],
    },
    Mutant {
        name: "no barrier between storing P^T/dS^T and the GEMMs that read them",
        file: "bwd_sm80.cu",
        edits: &[(
            "            __syncthreads();\n\n            // ---- dV += P^T dO",
            "\n            // ---- dV += P^T dO",
        )],
    },
    Mutant {
        name: "dQ from dS^T (untransposed fragment)",
        file: "bwd_sm80.cu",
        edits: &[(
            "frag_a_t<PCH>(sa, ds_tile, 16 * ks, 16 * rg, fl);",
            "frag_a<PCH>(sa, ds_tile, 16 * ks, 16 * rg, fl);",
        )],
    },
    Mutant {
        name: "dQ turn off by one",
        file: "bwd_sm80.cu",
        edits: &[("if (!desc) return n_blk;", "if (!desc) return n_blk + 1;")],
    },
    Mutant {
        name: "descending dQ turn off by one",
        file: "bwd_sm80.cu",
        edits: &[("return last - n_blk;", "return last - n_blk + 1;")],
    },
    Mutant {
        name: "deterministic order from blockIdx, not the ticket",
        file: "bwd_sm80.cu",
        edits: &[("bx = t % gridDim.x, hk_u = t / gridDim.x % gridDim.y, b_u = t / gridDim.x / gridDim.y;", "")],
    },
    Mutant {
        name: "ticket counter not zeroed",
        file: "bwd_sm80.cu",
        edits: &[("*reinterpret_cast<uint32_t *>(launch.dq_ticket) = 0u;", "(void)0;")],
    },
    Mutant {
        name: "descending turns on an ascending grid",
        file: "bwd_sm80.cu",
        edits: &[(
            "const int n_blk = static_cast<int>(desc ? gridDim.x - 1 - bx : bx);",
            "const int n_blk = static_cast<int>(bx);",
        )],
    },
    Mutant {
        name: "last visitor past the sequence's queries",
        file: "bwd_sm80.cu",
        edits: &[(
            "fa_floor_div(min((m + 1) * BM, f.seqlen_q) + off + wr - 1, BN)",
            "fa_floor_div((m + 1) * BM + off + wr - 1, BN)",
        )],
    },
    Mutant {
        name: "LSE copied from the block's rows of query block 0",
        file: "bwd_sm80.cu",
        edits: &[("in ? lse + i : lse", "in ? lse + tid : lse")],
    },
    Mutant {
        name: "dQ accumulator not zeroed",
        file: "bwd_sm80.cu",
        edits: &[("*reinterpret_cast<float *>(acc + d) = 0.f;", "")],
    },
    Mutant {
        name: "D_i from dO twice",
        file: "bwd_sm80.cu",
        edits: &[("fa_to_float(d_o[d]), fa_to_float(o[d])", "fa_to_float(d_o[d]), fa_to_float(d_o[d])")],
    },
    Mutant {
        name: "Q/dO used before their copies land",
        file: "bwd_sm80.cu",
        edits: &[("cp_async_wait<1>();", "cp_async_wait<2>();")],
    },
    Mutant {
        name: "next Q/dO prefetched into the buffer in use",
        file: "bwd_sm80.cu",
        edits: &[("issue(step + 1, buf ^ 1);", "issue(step + 1, buf);")],
    },
    Mutant {
        name: "a packed sequence's dK/dV rows not moved to its keys",
        file: "bwd_sm80.cu",
        edits: &[("p.dk = static_cast<T *>(p.dk) + static_cast<int64_t>(k0) * p.dk_row_stride;", "")],
    },
    Mutant {
        name: "a packed sequence's workspace rows by batch index",
        file: "bwd_sm80.cu",
        edits: &[("seq.row0 = q0;", "seq.row0 = b * f.seqlen_q;")],
    },
    Mutant {
        name: "short path without D_i",
        file: "bwd_sm80.cu",
        edits: &[("dsv[e] = pv[e] * (dp[t][2 * hf + e] - dl);", "dsv[e] = pv[e] * dp[t][2 * hf + e];")],
    },
    Mutant {
        name: "short path taken by a tile a mask cuts",
        file: "bwd_sm80.cu",
        edits: &[("n0 + BN - 1 <= m0 + off + wr", "n0 <= m0 + off + wr")],
    },
    Mutant {
        name: "LSE of the other buffer",
        file: "bwd_sm80.cu",
        edits: &[("const int lse_at = rows_of(buf),", "const int lse_at = rows_of(buf ^ (QBUFS - 1)),")],
    },
    Mutant {
        name: "next step's loads race the last readers",
        file: "bwd_sm80.cu",
        edits: &[("            else __syncthreads();", "")],
    },
    Mutant {
        name: "turn passed without ending the step",
        file: "bwd_sm80.cu",
        edits: &[(
            "__device__ __forceinline__ void fa_bwd_pass_turn(int32_t *sem) {\n    __syncthreads();",
            "__device__ __forceinline__ void fa_bwd_pass_turn(int32_t *sem) {",
        )],
    },
    Mutant {
        name: "dQ rows past Lq added",
        file: "bwd_sm80.cu",
        edits: &[("if (i < f.seqlen_q && c < f.head_dim)\n", "if (c < f.head_dim)\n")],
    },
    Mutant {
        name: "P^T stored at the wrong column",
        file: "bwd_sm80.cu",
        edits: &[(
            "const uint32_t at = PSwz::offset(jl, il0 / 8) + 2 * (il0 % 8);",
            "const uint32_t at = PSwz::offset(jl, il0 / 8) + 2 * ((il0 + 2) % 8);",
        )],
    },
];

/// Each injected bug in a copy of kernels/bwd_sm80.cu must fail the tiled
/// sweep (the first failing case ends a mutant's run).
fn tiled_negative_control() -> Result<Completion, Failed> {
    let include = match prerequisites() {
        Ok(i) => i,
        Err(r) => return r,
    };
    let base = std::env::temp_dir().join(format!("fused-attn-bwd-tiled-neg-{}", std::process::id()));
    let r = negative_control(
        TILED_MUTANTS.iter().map(|m| m.name),
        |i| {
            let work = base.join(format!("m{i}"));
            let kernels = work.join("src");
            emu::mutated_copy(&kernels_dir(), &kernels, Some(&TILED_MUTANTS[i]))
                .map_err(|e| format!("mutant `{}`: {e} (update the mutant)", TILED_MUTANTS[i].name))?;
            let exe = build_emulator(&work, &include, &kernels)?;
            let runners = [
                Runner::Emulator { exe: exe.clone(), deterministic: true },
                Runner::Emulator { exe, deterministic: false },
            ];
            sweep_with(&runners, &tiled_cases(), &work)
        },
        "the tiled backward's emulated tier",
    );
    let _ = std::fs::remove_dir_all(&base);
    r
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::ignorable_test("backward_sweep", backward_sweep),
        Trial::ignorable_test("backward_negative_control", backward_negative_control),
        Trial::ignorable_test("tiled_sm80_emulated/0", || tiled_sweep(0)),
        Trial::ignorable_test("tiled_sm80_emulated/1", || tiled_sweep(1)),
        Trial::ignorable_test("tiled_sm80_negative_control", tiled_negative_control).with_ignored_flag(true),
    ];
    libtest_mimic::run(&args, trials).exit();
}
