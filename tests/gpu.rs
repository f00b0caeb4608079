//! GPU tier (DESIGN.md section 4): every kernel against the f64 CPU reference
//! over a seeded sweep, plus LSE, empty rows, determinism, concurrency, and
//! the error rows that need a device.
//!
//! Without a GPU every test is reported as *ignored* with the reason printed
//! first: never a silent pass. Trial names are `<family>/<dtype>/d<D>/...`
//! so subsets run by filter (e.g. `gpu sanitize/` under compute-sanitizer).
//! A summary (worst error per family and dtype) is printed at the end and,
//! with `FUSED_ATTN_GPU_LOG=path`, written there too.

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use fused_attn::cudarc::driver::CudaContext;
use fused_attn::{AttentionOptions, DType, DeviceTensor, DeviceTensorMut, Error, KernelFamily, Layout, Mask};
use half::{bf16, f16};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
/// (case name, family, dtype, O error, LSE error) of every checked sweep case.
type CaseResult = (String, KernelFamily, DType, f64, f64);
static RESULTS: Mutex<Vec<CaseResult>> = Mutex::new(Vec::new());

fn gpu() -> Result<&'static Gpu, Failed> {
    GPU.get_or_init(open_gpu).as_ref().map_err(|e| Failed::from(format!("no GPU: {e}")))
}

/// One sweep case.
#[derive(Debug, Clone, Copy)]
struct Case {
    dtype: DType,
    shape: Shape,
    mask: Mask,
    softcap: Option<f32>,
    storage: Storage,
    family: KernelFamily,
    seed: u64,
}

impl Case {
    fn name(&self, group: &str) -> String {
        let s = self.shape;
        format!(
            "{group}/{:?}/{}/d{}/{}/b{}_lq{}_lk{}_h{}:{}/{:?}{}",
            self.family,
            self.dtype,
            s.d,
            self.mask,
            s.b,
            s.lq,
            s.lk,
            s.hq,
            s.hk,
            self.storage,
            self.softcap.map_or(String::new(), |c| format!("/cap{c}"))
        )
        .to_lowercase()
    }
}

fn check_case(c: Case, name: String) -> Result<(), Failed> {
    check_case_named(c, name, None)
}

fn check_case_named(c: Case, name: String, kernel_name: Option<&'static str>) -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    let mut opts = AttentionOptions::new(c.mask).with_kernel(c.family);
    if let Some(cap) = c.softcap {
        opts = opts.with_softcap(cap);
    }
    if let Some(name) = kernel_name {
        opts = opts.with_kernel_name(name);
    }
    let checked = match c.dtype {
        DType::F16 => {
            run_and_check(g, &stream, &make_inputs::<f16>(c.seed, c.shape, c.storage), c.shape, c.storage, &opts)
        }
        DType::BF16 => {
            run_and_check(g, &stream, &make_inputs::<bf16>(c.seed, c.shape, c.storage), c.shape, c.storage, &opts)
        }
    }?;
    if checked.kernel.family != c.family || kernel_name.is_some_and(|k| k != checked.kernel.name) {
        return Err(format!("asked for {:?}, ran {}", c.family, checked.kernel.name).into());
    }
    RESULTS.lock().unwrap().push((name, c.family, c.dtype, checked.o_err, checked.lse_err));
    let tol = tolerance(c.dtype);
    if !(checked.o_err <= tol && checked.lse_err <= 1e-3) {
        return Err(format!(
            "{}: O rel L2 {:.3e} (tol {tol:.0e}), LSE rel L2 {:.3e}",
            checked.kernel.name, checked.o_err, checked.lse_err
        )
        .into());
    }
    Ok(())
}

/// The seeded sweep: every head-dim bucket (and dims between buckets) ×
/// every mask kind × both dtypes, with lengths, GQA ratios, storage and
/// softcap drawn per case; then the odd lengths of the issue against each
/// other with every mask.
fn sweep(family: KernelFamily, seed0: u64, light: bool) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(seed0);
    let masks = |rng: &mut StdRng| {
        [
            Mask::Full,
            Mask::Causal,
            Mask::Window { left: rng.random_range(0..8), right: 0 }, // narrower than a tile
            Mask::Window { left: rng.random_range(20..300), right: rng.random_range(1..70) }, // right > 0
            Mask::Window { left: 100_000, right: 100_000 },          // wider than the sequence
            Mask::Window { left: 0, right: rng.random_range(0..40) },
        ]
    };
    let dims: &[usize] = if light { &[32, 64, 128, 256] } else { &[32, 40, 64, 80, 96, 128, 160, 200, 224, 256] };
    let lens = [1usize, 17, 127, 1000, 4097];
    let gqa = [(1, 1), (4, 4), (4, 2), (8, 1), (6, 3)];
    let storages = [Storage::Bshd, Storage::Bhsd, Storage::Padded(8), Storage::Padded(24)];
    let mut cases = Vec::new();
    let mut seed = seed0 * 100_000;
    for &d in dims {
        for mask in masks(&mut rng) {
            for dtype in [DType::BF16, DType::F16] {
                seed += 1;
                let (hq, hk) = gqa[rng.random_range(0..gqa.len())];
                let lq = [1, 17, 127, 300, 1000][rng.random_range(0..5)];
                let lk = if rng.random_bool(0.5) { lq } else { [17, 127, 513, 1000][rng.random_range(0..4)] };
                let b = if lq * lk > 300_000 { 1 } else { rng.random_range(1..3) };
                cases.push(Case {
                    dtype,
                    shape: Shape { b, lq, lk, hq, hk, d },
                    mask,
                    softcap: if rng.random_bool(0.15) { Some(rng.random_range(5.0..30.0)) } else { None },
                    storage: storages[rng.random_range(0..storages.len())],
                    family,
                    seed,
                });
            }
        }
    }
    // Odd lengths against each other (Lq != Lk both ways), every mask kind.
    let pairs: &[(usize, usize)] = if light { &[(17, 127), (1000, 4097)] } else { &[] };
    let all_pairs: Vec<(usize, usize)> =
        if light { pairs.to_vec() } else { lens.iter().flat_map(|&a| lens.iter().map(move |&b| (a, b))).collect() };
    for (lq, lk) in all_pairs {
        for mask in masks(&mut rng) {
            seed += 1;
            let d = [64, 128][rng.random_range(0..2)];
            let (hq, hk) = if lq * lk > 1_000_000 { (2, 1) } else { gqa[rng.random_range(0..gqa.len())] };
            cases.push(Case {
                dtype: if seed % 2 == 0 { DType::BF16 } else { DType::F16 },
                shape: Shape { b: 1, lq, lk, hq, hk, d },
                mask,
                softcap: None,
                storage: storages[rng.random_range(0..storages.len())],
                family,
                seed,
            });
        }
    }
    cases
}

/// Empty rows (Lq > Lk under a causal mask; Lk = 0) give O = 0 and LSE = -inf.
fn empty_rows(family: KernelFamily) -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    for (lq, lk) in [(40, 3), (5, 0)] {
        let s = Shape { b: 1, lq, lk, hq: 2, hk: 1, d: 64 };
        let inp = make_inputs::<bf16>(7, s, Storage::Bshd);
        let opts = AttentionOptions::new(Mask::Causal).with_kernel(family);
        let c = run_and_check(g, &stream, &inp, s, Storage::Bshd, &opts)?;
        // rel_l2_error already demands exact -inf where the reference has it and
        // exact zeros contribute nothing; both must be tiny.
        if c.o_err > 1e-2 || c.lse_err > 1e-3 {
            return Err(format!("lq {lq} lk {lk}: O err {:.3e}, LSE err {:.3e}", c.o_err, c.lse_err).into());
        }
    }
    Ok(())
}

/// Zero-length sequences through the allocating `forward`: Lq = 0 launches
/// nothing and succeeds; Lk = 0 gives O = 0 and LSE = -inf.
fn zero_lengths() -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    for (lq, lk) in [(0usize, 16usize), (0, 0), (9, 0)] {
        let s = Shape { b: 2, lq, lk, hq: 4, hk: 2, d: 64 };
        let inp = make_inputs::<bf16>(17, s, Storage::Bshd);
        // Zero-length inputs still need a (1-element) buffer to view.
        let pad = |x: &[bf16]| if x.is_empty() { vec![bf16::ONE] } else { x.to_vec() };
        let (q, k) = (upload(&stream, &pad(&inp.q))?, upload(&stream, &pad(&inp.k))?);
        let (qt, kt) = (DeviceTensor::new(&q, inp.ql), DeviceTensor::new(&k, inp.kl));
        let out = g.attn.forward(&stream, &qt, &kt, &kt, &AttentionOptions::new(Mask::Causal))?;
        let o = download(&stream, &out.o)?;
        let lse: Vec<f32> = stream.clone_dtoh(&out.lse).map_err(|e| e.to_string())?;
        let n = s.b * s.lq * s.hq * s.d;
        if lq > 0
            && !(o[..n].iter().all(|x| x.to_f32() == 0.0)
                && lse[..s.b * s.hq * lq].iter().all(|&x| x == f32::NEG_INFINITY))
        {
            return Err(format!("lq {lq} lk {lk}: expected O = 0 and LSE = -inf").into());
        }
    }
    Ok(())
}

/// Two runs on the same inputs give bitwise-equal outputs.
fn determinism(family: KernelFamily) -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    let s = Shape { b: 2, lq: 777, lk: 1029, hq: 8, hk: 2, d: 128 };
    let inp = make_inputs::<bf16>(11, s, Storage::Bshd);
    let opts = AttentionOptions::new(Mask::Causal).with_kernel(family);
    let a = run_and_check(g, &stream, &inp, s, Storage::Bshd, &opts)?;
    let b = run_and_check(g, &stream, &inp, s, Storage::Bshd, &opts)?;
    if a.o_bits != b.o_bits {
        return Err("two runs differ bitwise".into());
    }
    Ok(())
}

/// A few hundred launches on two streams from two threads, each checked.
fn concurrency() -> Result<(), Failed> {
    let g = gpu()?;
    let s = Shape { b: 1, lq: 130, lk: 257, hq: 4, hk: 2, d: 64 };
    let inp = Arc::new(make_inputs::<f16>(13, s, Storage::Bshd));
    let expected = {
        let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
        run_and_check(g, &stream, &inp, s, Storage::Bshd, &AttentionOptions::new(Mask::Causal))?.o_bits
    };
    let errors: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (inp, expected) = (inp.clone(), &expected);
                scope.spawn(move || -> Result<(), String> {
                    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
                    let e = |e: Error| e.to_string();
                    let (q, k, v) = (
                        upload(&stream, &inp.q).map_err(e)?,
                        upload(&stream, &inp.k).map_err(e)?,
                        upload(&stream, &inp.v).map_err(e)?,
                    );
                    let ol = Layout::bshd(s.b, s.lq, s.hq, s.d);
                    let mut outs = Vec::new();
                    for _ in 0..150 {
                        let mut o = upload(&stream, &poison::<f16>(ol.span().unwrap())).map_err(e)?;
                        {
                            let (qt, kt, vt) = (
                                DeviceTensor::new(&q, inp.ql),
                                DeviceTensor::new(&k, inp.kl),
                                DeviceTensor::new(&v, inp.kl),
                            );
                            let mut ot = DeviceTensorMut::new(&mut o, ol);
                            g.attn
                                .forward_into(
                                    &stream,
                                    &qt,
                                    &kt,
                                    &vt,
                                    &mut ot,
                                    None,
                                    &AttentionOptions::new(Mask::Causal),
                                )
                                .map_err(e)?;
                        }
                        outs.push(o);
                    }
                    for o in outs {
                        let bits: Vec<u16> = download(&stream, &o).map_err(e)?.iter().map(|x| x.to_bits()).collect();
                        if &bits != expected {
                            return Err("a concurrent launch gave a different result".into());
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect()
    });
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; ").into())
    }
}

/// Buffers from another context are refused, naming the argument.
fn foreign_context() -> Result<(), Failed> {
    let g = gpu()?;
    let other = CudaContext::new_non_primary(0, 0).map_err(|e| e.to_string())?;
    let other_stream = other.default_stream();
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    let s = Shape { b: 1, lq: 8, lk: 8, hq: 1, hk: 1, d: 64 };
    let inp = make_inputs::<bf16>(1, s, Storage::Bshd);
    let q = upload(&stream, &inp.q)?;
    let k_foreign = upload(&other_stream, &inp.k)?;
    let qt = DeviceTensor::new(&q, inp.ql);
    let kt = DeviceTensor::new(&k_foreign, inp.kl);
    match g.attn.forward(&stream, &qt, &kt, &qt, &AttentionOptions::default()) {
        Err(Error::ForeignContext { arg: "k" }) => {}
        other => return Err(format!("expected ForeignContext for k, got {other:?}").into()),
    }
    match g.attn.forward(&other_stream, &qt, &qt, &qt, &AttentionOptions::default()) {
        Err(Error::ForeignContext { arg: "stream" }) => Ok(()),
        other => Err(format!("expected ForeignContext for stream, got {other:?}").into()),
    }
}

/// An output too large for the device is an error value (out of memory), not a panic.
fn out_of_memory() -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    let q = upload(&stream, &randn::<bf16>(&mut StdRng::seed_from_u64(3), 256))?;
    // Stride-0 broadcasting keeps the inputs tiny while O would need ~8 TB.
    let big = Layout::strided_bshd([60_000, 1 << 20, 1, 64], [0, 0, 0, 1]);
    let small = Layout::strided_bshd([60_000, 4, 1, 64], [0, 0, 0, 1]);
    let (qt, kt) = (DeviceTensor::new(&q, big), DeviceTensor::new(&q, small));
    match g.attn.forward(&stream, &qt, &kt, &kt, &AttentionOptions::default()) {
        Err(Error::Cuda { during: "allocating the output", .. }) => Ok(()),
        other => Err(format!("expected an allocation error, got {:?}", other.map(|o| o.kernel.name)).into()),
    }
}

/// Misaligned views: auto dispatch falls back to the naive kernel (and is
/// right); forcing the tiled kernel is a Misaligned error naming the argument.
fn misaligned() -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    let s = Shape { b: 1, lq: 33, lk: 65, hq: 2, hk: 2, d: 64 };
    let inp = make_inputs::<bf16>(5, s, Storage::Padded(4)); // 8-byte row padding
    let c = run_and_check(g, &stream, &inp, s, Storage::Bshd, &AttentionOptions::new(Mask::Causal))?;
    if c.kernel.family != KernelFamily::Naive || c.o_err > tolerance(DType::BF16) {
        return Err(format!("fallback ran {} with error {:.3e}", c.kernel.name, c.o_err).into());
    }
    let q = upload(&stream, &inp.q)?;
    let k = upload(&stream, &inp.k)?;
    let (qt, kt) = (DeviceTensor::new(&q, inp.ql), DeviceTensor::new(&k, inp.kl));
    match g.attn.forward(&stream, &qt, &kt, &kt, &AttentionOptions::new(Mask::Causal).with_kernel(KernelFamily::Sm80)) {
        Err(Error::Misaligned { arg: "q", .. }) => Ok(()),
        other => Err(format!("expected Misaligned(q), got {:?}", other.map(|o| o.kernel.name)).into()),
    }
}

/// The dispatcher picks the tiled kernel for aligned problems on sm_80+.
fn dispatch_prefers_tiled() -> Result<(), Failed> {
    let g = gpu()?;
    let stream = g.ctx.new_stream().map_err(|e| e.to_string())?;
    for d in [64, 72, 128, 256] {
        let s = Shape { b: 1, lq: 64, lk: 64, hq: 2, hk: 1, d };
        let inp = make_inputs::<bf16>(d as u64, s, Storage::Bshd);
        let c = run_and_check(g, &stream, &inp, s, Storage::Bshd, &AttentionOptions::default())?;
        let buckets: &[u32] = if c.kernel.family == KernelFamily::Sm90 {
            &[64, 128, 256]
        } else {
            &[32, 64, 96, 128, 160, 192, 224, 256]
        };
        let want = buckets.iter().copied().find(|&b| b as usize >= d).unwrap();
        if g.attn.sm() == 90 && c.kernel.family != KernelFamily::Sm90 {
            return Err(format!(
                "d {d}: an sm_90 GPU ran {}, passed over {:?}",
                c.kernel.name,
                c.kernel.passed_over().map(|p| p.to_string()).collect::<Vec<_>>()
            )
            .into());
        }
        if c.kernel.family < KernelFamily::Sm80 || c.kernel.head_dim_bucket != want {
            return Err(format!(
                "d {d}: ran {} (bucket {}), passed over {:?}",
                c.kernel.name,
                c.kernel.head_dim_bucket,
                c.kernel.passed_over().map(|p| p.to_string()).collect::<Vec<_>>()
            )
            .into());
        }
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    let add_sweep = |trials: &mut Vec<Trial>, group: &str, cases: Vec<Case>| {
        for c in cases {
            let name = c.name(group);
            let n2 = name.clone();
            trials.push(Trial::test(name, move || check_case(c, n2)));
        }
    };
    add_sweep(&mut trials, "sweep", sweep(KernelFamily::Sm80, 1, false));
    add_sweep(&mut trials, "sweep", sweep(KernelFamily::Naive, 2, true));
    add_sweep(&mut trials, "sweep", sweep(KernelFamily::Sm90, 3, false));
    // Every variant kernel (alternative tiles or schedules kept for
    // measurement), forced by name over a light sweep of its bucket.
    for row in fused_attn::internals::KERNEL_TABLE.iter().filter(|r| r.is_variant()) {
        let family = KernelFamily::from_image_stem(row.image).expect("known family");
        for c in
            sweep(family, 4, true).into_iter().filter(|c| c.dtype == row.dtype && c.shape.d <= row.head_dim as usize)
        {
            let name = format!("{}/{}", c.name("variant"), row.name);
            let n2 = name.clone();
            let kernel_name = row.name;
            trials.push(Trial::test(name, move || check_case_named(c, n2, Some(kernel_name))));
        }
    }
    // A small subset for compute-sanitizer (memcheck, racecheck): both kernels, masks, GQA, odd sizes.
    let sanitize: Vec<Case> = [KernelFamily::Naive, KernelFamily::Sm80, KernelFamily::Sm90]
        .into_iter()
        .flat_map(|family| {
            [
                (Mask::Causal, 64, 37, 45),
                (Mask::Window { left: 5, right: 3 }, 128, 70, 129),
                (Mask::Full, 256, 9, 130),
                (Mask::Full, 96, 130, 17),
            ]
            .into_iter()
            .map(move |(mask, d, lq, lk)| Case {
                dtype: DType::BF16,
                shape: Shape { b: 1, lq, lk, hq: 4, hk: 2, d },
                mask,
                softcap: None,
                storage: Storage::Bshd,
                family,
                seed: 99,
            })
        })
        .collect();
    add_sweep(&mut trials, "sanitize", sanitize);
    for family in [KernelFamily::Naive, KernelFamily::Sm80, KernelFamily::Sm90] {
        let f = format!("{family:?}").to_lowercase();
        trials.push(Trial::test(format!("props/{f}/empty_rows"), move || empty_rows(family)));
        trials.push(Trial::test(format!("props/{f}/determinism"), move || determinism(family)));
    }
    trials.push(Trial::test("props/concurrency_two_streams_two_threads", concurrency));
    trials.push(Trial::test("props/zero_lengths", zero_lengths));
    trials.push(Trial::test("props/dispatch_prefers_tiled", dispatch_prefers_tiled));
    trials.push(Trial::test("errors/foreign_context", foreign_context));
    trials.push(Trial::test("errors/out_of_memory", out_of_memory));
    trials.push(Trial::test("errors/misaligned", misaligned));

    if let Err(reason) = GPU.get_or_init(open_gpu) {
        println!("GPU tests ignored: {reason}");
        trials = trials.into_iter().map(|t| t.with_ignored_flag(true)).collect();
    } else if let Ok(g) = GPU.get().unwrap() {
        println!("GPU: {} (sm_{}), kernels: {}", g.name, g.attn.sm(), g.attn.kernels().count());
    }
    let conclusion = libtest_mimic::run(&args, trials);
    summarize();
    conclusion.exit();
}

/// Worst errors per (family, dtype): the figures a report quotes.
fn summarize() {
    let results = RESULTS.lock().unwrap();
    if results.is_empty() {
        return;
    }
    let mut out = String::from("\nsummary: family dtype cases worst_O_rel_l2 worst_LSE_rel_l2 (worst case)\n");
    for family in [KernelFamily::Naive, KernelFamily::Sm80, KernelFamily::Sm90] {
        for dtype in [DType::BF16, DType::F16] {
            let rows: Vec<_> = results.iter().filter(|r| r.1 == family && r.2 == dtype).collect();
            if let Some(worst) = rows.iter().max_by(|a, b| a.3.total_cmp(&b.3)) {
                let worst_lse = rows.iter().map(|r| r.4).fold(0.0, f64::max);
                out += &format!(
                    "summary: {family:?} {dtype} {} {:.3e} {:.3e} ({})\n",
                    rows.len(),
                    worst.3,
                    worst_lse,
                    worst.0
                );
            }
        }
    }
    print!("{out}");
    if let Ok(path) = std::env::var("FUSED_ATTN_GPU_LOG") {
        let mut all = out.clone();
        for r in results.iter() {
            all += &format!("case {} O {:.3e} LSE {:.3e}\n", r.0, r.3, r.4);
        }
        let _ = std::fs::write(path, all);
    }
}
