//! Forward-pass benchmark over the case grid of `grid.rs`, timed with CUDA
//! events (warm-up, then the median of many launches).
//!
//! - `cargo bench --bench forward` runs it under criterion (`iter_custom`
//!   with event timing; throughput shown in FLOP/s as "elem/s").
//! - `FUSED_ATTN_BENCH_JSON=ours.json <bench binary>` is the report mode: each
//!   case timed, its error against the f64 CPU reference measured (on a
//!   reduced case of the same kind where the full one is too big for the CPU),
//!   and everything written as JSON for `scripts/peers.py` and `scripts/report.py`.
//!   `FUSED_ATTN_BENCH_FILTER=substr` keeps only matching cases;
//!   `FUSED_ATTN_BENCH_FAMILY=sm80` times that family instead of the dispatcher's choice;
//!   `FUSED_ATTN_BENCH_KERNEL=name` times that kernel (e.g. a variant) instead;
//!   `FUSED_ATTN_BENCH_VARIANTS=1` also times every variant kernel
//!   (`name__tag`: other tiles or schedules) and every other base row of the
//!   bucket (`_99k`) that could replace the one the dispatcher chose, into the
//!   case's `variants` field: the ablation data.
//!   The report also holds a `launch_overhead` object: the host-side cost of
//!   one `forward_into` call on a tiny problem against an empty kernel
//!   launched through cudarc (median µs per call; `FUSED_ATTN_BENCH_LAUNCHES`
//!   calls each, default 2000).
//!   Two more arrays follow the grid: `serving` (`support/serving.rs`: packed
//!   prefill, KV caches, decode steps) and `mechanisms`
//!   (`support/mechanisms.rs`: additive attention at issue 14's shape and the
//!   backward baseline); `FUSED_ATTN_BENCH_FILTER=serving` or `=mechanisms`
//!   keeps those and no grid case.
//!
//! Inputs are random normal, never zeros; one case's Q, K and V together are
//! ~200 MB (bf16, 16k tokens × 2048), several times an H100's 50 MB L2, so
//! launches do not run from cache.

#[path = "../tests/common/mod.rs"]
mod common;
mod grid;
#[path = "support/mechanisms.rs"]
mod mechanisms;
#[path = "support/serving.rs"]
mod serving;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{make_inputs, open_gpu, poison, upload, Gpu, LseStorage, Shape, Storage};
use criterion::{Criterion, Throughput};
use fused_attn::cudarc::driver::sys::CUevent_flags;
use fused_attn::cudarc::driver::{CudaSlice, CudaStream, LaunchConfig};
use fused_attn::cudarc::nvrtc::Ptx;
use fused_attn::{
    AttentionOptions, DType, DeviceTensor, DeviceTensorMut, Element, Error, KernelFamily, KernelInfo, Layout,
    LseLayout, LseTensorMut, Mask,
};
use grid::{grid, BenchCase};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Device buffers big enough for every case of the grid, shared by all cases.
struct Buffers<T> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    o: CudaSlice<T>,
    lse: CudaSlice<f32>,
}

/// The largest Q/K/V/O of the grid: 16384 tokens × 32 heads × 128 (the GQA cases' Q).
const MAX_ELEMS: usize = 16384 * 4096;

fn buffers<T: Element>(stream: &Arc<CudaStream>, seed: u64) -> Result<Buffers<T>, Error> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gen = || upload(stream, &common::randn::<T>(&mut rng, MAX_ELEMS));
    let (q, k, v, o) = (gen()?, gen()?, gen()?, gen()?);
    let lse = upload_f32(stream, &vec![0.0; 16384 * 128])?;
    Ok(Buffers { q, k, v, o, lse })
}

fn upload_f32(stream: &Arc<CudaStream>, x: &[f32]) -> Result<CudaSlice<f32>, Error> {
    stream.clone_htod(x).map_err(|driver| Error::Cuda { during: "upload", driver })
}

fn cuda(during: &'static str) -> impl Fn(fused_attn::cudarc::driver::DriverError) -> Error {
    move |driver| Error::Cuda { during, driver }
}

/// Launches the case `reps` times, each between its own pair of events;
/// returns every launch's milliseconds and the kernel that ran.
fn time_case<T: Element>(
    g: &Gpu,
    stream: &Arc<CudaStream>,
    bufs: &mut Buffers<T>,
    c: &BenchCase,
    reps: usize,
    kernel_name: Option<&'static str>,
) -> Result<(Vec<f64>, KernelInfo), Error> {
    let ql = Layout::bshd(c.batch, c.seqlen, c.heads_q, c.head_dim);
    let kl = Layout::bshd(c.batch, c.seqlen, c.heads_kv, c.head_dim);
    let (qt, kt, vt) = (DeviceTensor::new(&bufs.q, ql), DeviceTensor::new(&bufs.k, kl), DeviceTensor::new(&bufs.v, kl));
    let n = ql.numel().ok_or(Error::NoKernel { reason: "case too large".into() })?;
    let too_large = || Error::NoKernel { reason: format!("bench case {} exceeds the bench buffers", c.name()) };
    let mut ot = DeviceTensorMut::from_view(bufs.o.try_slice_mut(..n).ok_or_else(too_large)?, ql);
    let lse_layout = LseLayout::contiguous(c.batch, c.heads_q, c.seqlen);
    let lse_view = bufs.lse.try_slice_mut(..c.batch * c.heads_q * c.seqlen).ok_or_else(too_large)?;
    let mut lse = LseTensorMut::from_view(lse_view, lse_layout);
    let mut opts = AttentionOptions::new(c.mask);
    if let Some(f) = forced_family() {
        opts = opts.with_kernel(f);
    }
    if let Some(name) = kernel_name.or_else(forced_kernel_name) {
        opts = opts.with_kernel_name(name);
    }
    let mut info = None;
    for _ in 0..3 {
        info = Some(g.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lse), &opts)?);
    }
    let events: Vec<_> = (0..2 * reps)
        .map(|_| g.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("creating events")))
        .collect::<Result<_, _>>()?;
    for pair in events.chunks(2) {
        pair[0].record(stream).map_err(cuda("recording an event"))?;
        g.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lse), &opts)?;
        pair[1].record(stream).map_err(cuda("recording an event"))?;
    }
    stream.synchronize().map_err(cuda("synchronising"))?;
    let ms = events
        .chunks(2)
        .map(|p| p[0].elapsed_ms(&p[1]).map(|x| x as f64).map_err(cuda("reading events")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ms, info.expect("warm-up ran")))
}

/// `FUSED_ATTN_BENCH_FAMILY=naive|sm80|sm90` times one family instead of the
/// dispatcher's choice (e.g. the portable kernel on an H100).
fn forced_family() -> Option<KernelFamily> {
    match std::env::var("FUSED_ATTN_BENCH_FAMILY").ok()?.as_str() {
        "naive" => Some(KernelFamily::Naive),
        "sm80" => Some(KernelFamily::Sm80),
        "sm90" => Some(KernelFamily::Sm90),
        other => panic!("FUSED_ATTN_BENCH_FAMILY={other}: expected naive, sm80 or sm90"),
    }
}

/// `FUSED_ATTN_BENCH_KERNEL=name` times that table kernel (e.g. a variant)
/// in place of the dispatcher's choice, for an A/B in separate runs: within
/// one run a variant is always timed right after its base, which is not the
/// same clock and power state (see docs/perf-notes.md, the `__ov` entry).
fn forced_kernel_name() -> Option<&'static str> {
    let name = std::env::var("FUSED_ATTN_BENCH_KERNEL").ok()?;
    let row = fused_attn::internals::KERNEL_TABLE.iter().find(|r| r.name == name);
    Some(row.unwrap_or_else(|| panic!("FUSED_ATTN_BENCH_KERNEL={name}: not a kernel of this build")).name)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn flops(c: &BenchCase) -> u128 {
    problem_of(c).flops()
}

fn problem_of(c: &BenchCase) -> fused_attn::Problem {
    let ql = Layout::bshd(c.batch, c.seqlen, c.heads_q, c.head_dim);
    let kl = Layout::bshd(c.batch, c.seqlen, c.heads_kv, c.head_dim);
    fused_attn::problem_of(c.dtype, &ql, &kl, &kl, &AttentionOptions::new(c.mask)).expect("grid cases are valid")
}

/// The case the CPU can check: at most 1024 tokens and 4 query heads, the
/// same GQA ratio, windows scaled with the sequence.
fn reduced(c: &BenchCase) -> (BenchCase, String) {
    let seqlen = c.seqlen.min(1024);
    let heads_q = c.heads_q.min(4);
    let heads_kv = (heads_q * c.heads_kv / c.heads_q).max(1);
    let scale = |w: usize| (w * seqlen).div_ceil(c.seqlen);
    let mask = match c.mask {
        Mask::Window { left, right } => Mask::Window { left: scale(left), right: scale(right) },
        m => m,
    };
    let r = BenchCase { batch: 1, seqlen, heads_q, heads_kv, mask, ..*c };
    let note = if (r.batch, r.seqlen, r.heads_q) == (c.batch, c.seqlen, c.heads_q) {
        "same shape".to_string()
    } else {
        format!("reduced: {}", r.name())
    };
    (r, note)
}

fn check_error<T: Element>(g: &Gpu, stream: &Arc<CudaStream>, c: &BenchCase) -> Result<f64, String> {
    let s = Shape { b: c.batch, lq: c.seqlen, lk: c.seqlen, hq: c.heads_q, hk: c.heads_kv, d: c.head_dim };
    let inp = make_inputs::<T>(42, s, Storage::Bshd);
    let opts = forced_family().map_or(AttentionOptions::new(c.mask), |f| AttentionOptions::new(c.mask).with_kernel(f));
    let checked = common::run_and_check(g, stream, &inp, s, Storage::Bshd, LseStorage::Contiguous, &opts)?;
    Ok(checked.cmp.o_err)
}

/// A kernel that returns at once: the floor of a launch's host-side cost.
const EMPTY_PTX: &str = "\
.version 7.0
.target sm_80
.address_size 64

.visible .entry fa_empty()
{
    ret;
}
";

/// Median host-side microseconds of one call of `launch` over `calls` calls
/// (after a warm-up). The stream is drained every 64 calls, outside the
/// timed region, so a full launch queue never makes a call wait.
fn time_host_calls(
    stream: &Arc<CudaStream>,
    calls: usize,
    mut launch: impl FnMut() -> Result<(), Error>,
) -> Result<f64, Error> {
    for _ in 0..64 {
        launch()?;
    }
    let mut us = Vec::with_capacity(calls);
    for i in 0..calls {
        if i % 64 == 0 {
            stream.synchronize().map_err(cuda("synchronising"))?;
        }
        let t = Instant::now();
        launch()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    stream.synchronize().map_err(cuda("synchronising"))?;
    Ok(median(us))
}

/// Issue 8: the host cost per call of `forward_into` (caller-owned O and
/// LSE, a tiny problem: the kernel is too short to matter) against an empty
/// kernel launched by cudarc, raw (`result::launch_kernel`) and through
/// `launch_builder`. Returns the `launch_overhead` JSON object.
fn launch_overhead(g: &Gpu, stream: &Arc<CudaStream>) -> Result<String, Error> {
    let calls: usize = std::env::var("FUSED_ATTN_BENCH_LAUNCHES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let module = g.ctx.load_module(Ptx::from_src(EMPTY_PTX)).map_err(cuda("loading the empty kernel"))?;
    let empty = module.load_function("fa_empty").map_err(cuda("looking up the empty kernel"))?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let raw_us = time_host_calls(stream, calls, || {
        let mut no_args: [*mut std::ffi::c_void; 0] = [];
        // SAFETY: `fa_empty` takes no parameters and touches no memory; the
        // function belongs to this stream's context, which is current.
        unsafe {
            fused_attn::cudarc::driver::result::launch_kernel(
                empty.cu_function(),
                one.grid_dim,
                one.block_dim,
                0,
                stream.cu_stream(),
                &mut no_args,
            )
        }
        .map_err(cuda("launching the empty kernel"))
    })?;
    let builder_us = time_host_calls(stream, calls, || {
        // SAFETY: as above; no arguments pushed, matching the kernel's none.
        unsafe { stream.launch_builder(&empty).launch(one) }.map(|_| ()).map_err(cuda("launching the empty kernel"))
    })?;

    let s = Shape { b: 1, lq: 64, lk: 64, hq: 2, hk: 1, d: 64 };
    let inp = make_inputs::<bf16>(5, s, Storage::Bshd);
    let ol = Layout::bshd(s.b, s.lq, s.hq, s.d);
    let ll = LseLayout::contiguous(s.b, s.hq, s.lq);
    // Buffers are created inside: cudarc decides per buffer, at creation,
    // whether its uses are tracked with events.
    let forward = |opts: AttentionOptions| -> Result<(f64, &'static str), Error> {
        let (q, k, v) = (upload(stream, &inp.q)?, upload(stream, &inp.k)?, upload(stream, &inp.v)?);
        let mut o = upload(stream, &poison::<bf16>(ol.span().unwrap_or(0)))?;
        let mut lse = upload_f32(stream, &vec![0.0; s.b * s.hq * s.lq])?;
        let (qt, kt, vt) =
            (DeviceTensor::new(&q, inp.ql), DeviceTensor::new(&k, inp.kl), DeviceTensor::new(&v, inp.vl));
        let mut ot = DeviceTensorMut::new(&mut o, ol);
        let mut lv = LseTensorMut::new(&mut lse, ll);
        let info = g.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lv), &opts)?;
        let us = time_host_calls(stream, calls, || {
            g.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lv), &opts).map(|_| ())
        })?;
        Ok((us, info.name))
    };
    let auto = forced_family()
        .map_or(AttentionOptions::new(Mask::Causal), |f| AttentionOptions::new(Mask::Causal).with_kernel(f));
    let (fwd_us, fwd_kernel) = forward(auto)?;
    let (sm80_us, sm80_kernel) = forward(AttentionOptions::new(Mask::Causal).with_kernel(KernelFamily::Sm80))?;
    // The same call on buffers created with cudarc's event tracking off (the
    // graph-capture recipe): what the per-view event waits and records cost.
    let tracking = g.ctx.is_event_tracking();
    // SAFETY: every buffer `forward` creates is used on `stream` alone, so no
    // cross-stream ordering is lost; tracking is restored right after.
    unsafe { g.ctx.disable_event_tracking() };
    let untracked = forward(auto);
    if tracking {
        // SAFETY: restores the context's state from before this function.
        unsafe { g.ctx.enable_event_tracking() };
    }
    let (untracked_us, _) = untracked?;
    eprintln!(
        "launch overhead (median host µs per call, {calls} calls): forward_into {fwd_us:.2} ({fwd_kernel}), \
         forward_into sm80 {sm80_us:.2} ({sm80_kernel}), forward_into without event tracking {untracked_us:.2}, empty kernel raw {raw_us:.2}, via launch_builder {builder_us:.2}; \
         forward_into costs {:.2} µs more than a raw launch",
        fwd_us - raw_us
    );
    Ok(format!(
        concat!(
            "{{\"problem\": \"bf16 b1 lq64 lk64 hq2 hkv1 d64 causal, caller-owned O and LSE\", \"calls\": {}, ",
            "\"forward_into_us\": {:.3}, \"forward_into_kernel\": {:?}, \"forward_into_sm80_us\": {:.3}, ",
            "\"forward_into_sm80_kernel\": {:?}, \"forward_into_untracked_us\": {:.3}, \"empty_launch_kernel_us\": {:.3}, \"empty_launch_builder_us\": {:.3}, ",
            "\"overhead_vs_raw_us\": {:.3}}}"
        ),
        calls,
        fwd_us,
        fwd_kernel,
        sm80_us,
        sm80_kernel,
        untracked_us,
        raw_us,
        builder_us,
        fwd_us - raw_us
    ))
}

fn report_mode(path: &str) -> Result<(), Error> {
    let g = match open_gpu() {
        Ok(g) => g,
        Err(reason) => {
            println!("no GPU: {reason}; nothing to benchmark");
            return Ok(());
        }
    };
    let stream = g.ctx.new_stream().map_err(cuda("creating a stream"))?;
    // Measured first, on a quiet GPU; a failure here must not cost the case timings.
    let overhead = launch_overhead(&g, &stream).unwrap_or_else(|e| {
        eprintln!("launch overhead not measured: {e}");
        "null".into()
    });
    let filter = std::env::var("FUSED_ATTN_BENCH_FILTER").unwrap_or_default();
    let reps: usize = std::env::var("FUSED_ATTN_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let cases: Vec<BenchCase> = grid().into_iter().filter(|c| c.name().contains(&filter)).collect();
    let mut bf = buffers::<bf16>(&stream, 1)?;
    let mut fp = if cases.iter().any(|c| c.dtype == DType::F16) { Some(buffers::<f16>(&stream, 2)?) } else { None };
    let mut rows = Vec::new();
    let variants_wanted = std::env::var("FUSED_ATTN_BENCH_VARIANTS").is_ok_and(|v| v == "1");
    if variants_wanted && !fused_attn::internals::VARIANTS_BUILT {
        eprintln!(
            "FUSED_ATTN_BENCH_VARIANTS=1 but this build has no variant kernels: rebuild with FUSED_ATTN_VARIANTS=1"
        );
    }
    for c in &cases {
        let mut time = |name| match c.dtype {
            DType::BF16 => time_case(&g, &stream, &mut bf, c, reps, name),
            DType::F16 => time_case(&g, &stream, fp.as_mut().expect("allocated above"), c, reps, name),
        };
        let (ms, info) = time(None)?;
        // Ablation: every other kernel of the chosen kernel's family and bucket
        // (its variants, and base rows for smaller shared memory such as `_99k`).
        let mut variants = Vec::new();
        if variants_wanted {
            let chosen =
                fused_attn::internals::KERNEL_TABLE.iter().find(|r| r.name == info.name).expect("a table kernel ran");
            for v in fused_attn::internals::KERNEL_TABLE.iter().filter(|v| {
                v.name != chosen.name
                    && v.image == chosen.image
                    && v.dtype == chosen.dtype
                    && v.head_dim == chosen.head_dim
            }) {
                match time(Some(v.name)) {
                    Ok((vms, _)) => variants.push(format!("{:?}: {:.6}", v.name, median(vms))),
                    Err(e) => eprintln!("  variant {} failed: {e}", v.name),
                }
            }
        }
        let med = median(ms.clone());
        let fl = flops(c);
        let (small, note) = reduced(c);
        let err = match c.dtype {
            DType::BF16 => check_error::<bf16>(&g, &stream, &small),
            DType::F16 => check_error::<f16>(&g, &stream, &small),
        }
        .unwrap_or_else(|e| {
            eprintln!("  error check failed: {e}");
            f64::NAN
        });
        let tflops = fl as f64 / (med * 1e-3) / 1e12;
        eprintln!("{:<42} {:>26} {med:>9.3} ms {tflops:>7.1} TFLOP/s  err {err:.2e}", c.name(), info.name);
        let (l, r) = c.mask.bounds();
        let json_opt = |x: Option<usize>| x.map_or("null".to_string(), |x| x.to_string());
        let (wl, wr) = (json_opt(l), json_opt(r));
        rows.push(format!(
            concat!(
                "{{\"name\": {:?}, \"kernel\": {:?}, \"direction\": \"fwd\", \"dtype\": {:?}, \"batch\": {}, ",
                "\"heads_q\": {}, \"heads_kv\": {}, \"seqlen_q\": {}, \"seqlen_k\": {}, \"head_dim\": {}, ",
                "\"mask\": {:?}, \"window_left\": {}, \"window_right\": {}, \"flops\": {}, \"ours_ms\": {:.6}, ",
                "\"ours_ms_min\": {:.6}, \"reps\": {}, \"ours_tflops\": {:.3}, \"rel_l2_err\": {}, \"err_case\": {:?}, ",
                "\"variants\": {{{}}}}}"
            ),
            c.name(),
            info.name,
            c.dtype.name(),
            c.batch,
            c.heads_q,
            c.heads_kv,
            c.seqlen,
            c.seqlen,
            c.head_dim,
            c.mask.to_string(),
            wl,
            wr,
            fl,
            med,
            ms.iter().copied().fold(f64::INFINITY, f64::min),
            ms.len(),
            tflops,
            if err.is_finite() { format!("{err:.3e}") } else { "null".into() },
            note,
            variants.join(", ")
        ));
    }
    // Serving cases (packed prefill, KV caches) unless filtered out.
    let serving = if filter.is_empty() || "serving".contains(&filter) {
        serving::serving_rows(&g, &stream, reps).unwrap_or_else(|e| {
            eprintln!("serving cases not measured: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    // Additive attention and the backward baseline, unless filtered out.
    let mechanisms = if filter.is_empty() || "mechanisms".contains(&filter) {
        mechanisms::mechanism_rows(&g, &stream, reps).unwrap_or_else(|e| {
            eprintln!("mechanism cases not measured: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let json = format!(
        "{{\"commit\": {:?}, \"dirty\": {}, \"gpu\": {:?}, \"sm\": {}, \"driver\": {:?}, \"cuda\": {:?}, \"nvcc\": {:?}, \"launch_overhead\": {}, \"serving\": [{}], \"mechanisms\": [{}], \"cases\": [\n  {}\n]}}\n",
        env("FUSED_ATTN_COMMIT"),
        env("FUSED_ATTN_DIRTY") == "1",
        g.name,
        g.attn.sm(),
        env("FUSED_ATTN_DRIVER"),
        env("FUSED_ATTN_CUDA"),
        fused_attn::internals::NVCC_VERSION,
        overhead,
        serving.join(", "),
        mechanisms.join(", "),
        rows.join(",\n  ")
    );
    std::fs::write(path, json).map_err(|e| Error::NoKernel { reason: format!("writing {path}: {e}") })?;
    println!("wrote {} cases to {path}", rows.len());
    Ok(())
}

fn criterion_mode() {
    let g = match open_gpu() {
        Ok(g) => g,
        Err(reason) => {
            println!("no GPU: {reason}; nothing to benchmark");
            return;
        }
    };
    let stream = g.ctx.new_stream().expect("a stream");
    let mut bf = buffers::<bf16>(&stream, 1).expect("device buffers");
    let mut crit = Criterion::default().configure_from_args().warm_up_time(Duration::from_millis(500));
    let mut group = crit.benchmark_group("forward");
    for c in grid().into_iter().filter(|c| c.dtype == DType::BF16) {
        group.throughput(Throughput::Elements(flops(&c) as u64));
        group.bench_function(c.name(), |b| {
            b.iter_custom(|iters| {
                let (ms, _) = time_case(&g, &stream, &mut bf, &c, iters as usize, None).expect("launch");
                Duration::from_secs_f64(ms.iter().sum::<f64>() / 1e3)
            })
        });
    }
    group.finish();
    crit.final_summary();
}

fn main() {
    match std::env::var("FUSED_ATTN_BENCH_JSON") {
        Ok(path) => {
            if let Err(e) = report_mode(&path) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        Err(_) => criterion_mode(),
    }
}
