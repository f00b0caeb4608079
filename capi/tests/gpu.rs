//! The C ABI on a GPU: `fused_attn_forward` on raw device pointers (cudarc
//! allocations whose addresses are passed as C would pass `cudaMalloc`
//! memory) against `fused_attn_reference_forward` through the same ABI, per
//! kernel family, dtype and mask, with every tensor in its own layout and
//! O's padding poisoned; the raw path bitwise against `forward_into` on the
//! same buffers; the stream checks (null stream, a created stream, another
//! context's stream → `FUSED_ATTN_STATUS_FOREIGN_CONTEXT`).
//!
//! Without a GPU every trial is reported *ignored* with the reason printed
//! (never a silent pass); the sm90 trials are ignored on other GPUs.

use std::ffi::CStr;
use std::sync::Arc;

use fused_attn::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use fused_attn::{
    Alibi, Attention, AttentionOptions, DeviceTensor, DeviceTensorMut, HeadValues, Layout, LseLayout, LseTensorMut,
    Mask,
};
use fused_attn_capi::*;
use half::{bf16, f16};
use libtest_mimic::{Arguments, Failed, Trial};

fn last_error() -> String {
    // SAFETY: the ABI returns a valid NUL-terminated string, alive until the
    // next call on this thread.
    unsafe { CStr::from_ptr(fused_attn_last_error_message()) }.to_string_lossy().into_owned()
}

fn check(st: FusedAttnStatus, what: &str) -> Result<(), Failed> {
    if st == FusedAttnStatus::Ok {
        Ok(())
    } else {
        Err(format!("{what}: {st:?}: {}", last_error()).into())
    }
}

/// An owned `FusedAttnHandle`.
struct Handle(*mut FusedAttnHandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by fused_attn_create, destroyed once.
        unsafe { fused_attn_destroy(self.0) };
    }
}

fn open() -> Result<Handle, String> {
    let mut h = std::ptr::null_mut();
    // SAFETY: `h` is valid for the write.
    let st = unsafe { fused_attn_create(0, &mut h) };
    if st == FusedAttnStatus::Ok {
        Ok(Handle(h))
    } else {
        Err(format!("fused_attn_create(0): {st:?}: {}", last_error()))
    }
}

/// One problem: storage orders differ per tensor; O sits in padded storage.
#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: FusedAttnDtype,
    kernel: FusedAttnKernel,
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    /// Its pointers are null: `run_case` sets the modifiers' itself.
    opts: FusedAttnOptions,
    /// ALiBi slopes per batch entry and sinks.
    mods: bool,
}

// SAFETY: the only non-Send fields are the options' raw pointers, which are
// null in every Case (run_case points them at its own buffers).
unsafe impl Send for Case {}

fn c_tensor(ptr: u64, l: &Layout) -> FusedAttnTensor {
    let i = |x: [usize; 4]| x.map(|v| v as i64);
    FusedAttnTensor { data: ptr as usize as *mut _, shape: i(l.shape), strides: i(l.strides) }
}

fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// Runs `c` through the ABI on the GPU and through the ABI's reference, and
/// compares; for automatic choice, also bitwise against `forward_into`.
fn run_case<T: fused_attn::Element>(h: &Handle, ctx: &Arc<CudaContext>, c: Case) -> Result<(), Failed> {
    let stream = ctx.new_stream()?;
    let (b, lq, lk, hq, hk, d) = (c.b, c.lq, c.lk, c.hq, c.hk, c.d);
    let ql = Layout::bhsd(b, hq, lq, d);
    let kl = Layout::bshd(b, lk, hk, d);
    let vl = Layout::bhsd(b, hk, lk, d);
    let pad = 24; // O's row stride exceeds D: padding between rows stays poisoned
    let ol = Layout::strided_bshd([b, lq, hq, d], [lq * hq * (d + pad), hq * (d + pad), d + pad, 1]);
    let ll = LseLayout::strided([b, hq, lq], [hq * lq + 7, lq, 1]);
    let gen = |n: usize, seed: usize| -> Vec<T> {
        (0..n).map(|i| T::from_f32((((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 1.5)).collect()
    };
    let (qh, kh, vh) = (gen(ql.span().unwrap(), 1), gen(kl.span().unwrap(), 2), gen(vl.span().unwrap(), 3));
    let (o_len, l_len) = (ol.span().unwrap(), ll.span().unwrap());
    let poison = T::from_f32(f32::NAN);
    let (q, k, v) = (stream.clone_htod(&qh)?, stream.clone_htod(&kh)?, stream.clone_htod(&vh)?);
    let o = stream.clone_htod(&vec![poison; o_len])?;
    let lse = stream.clone_htod(&vec![f32::NAN; l_len])?;
    stream.synchronize()?;
    let (tq, tk, tv, to) = (
        c_tensor(addr(&q, &stream), &ql),
        c_tensor(addr(&k, &stream), &kl),
        c_tensor(addr(&v, &stream), &vl),
        c_tensor(addr(&o, &stream), &ol),
    );
    let tl = FusedAttnLseTensor {
        data: addr(&lse, &stream) as usize as *mut f32,
        shape: ll.shape.map(|x| x as i64),
        strides: ll.strides.map(|x| x as i64),
    };
    let mut opts = c.opts;
    opts.kernel = c.kernel as i32;
    // ALiBi per batch entry and sinks: device copies for the kernel, the
    // host values for the reference below.
    let slopes: Vec<f32> = (0..b * hq).map(|x| 0.02 + 0.1 * (x % 5) as f32).collect();
    let sinks: Vec<f32> = (0..hq).map(|x| x as f32 * 0.7 - 1.0).collect();
    let (slopes_dev, sinks_dev) = (stream.clone_htod(&slopes)?, stream.clone_htod(&sinks)?);
    stream.synchronize()?;
    if c.mods {
        opts.alibi_slopes = addr(&slopes_dev, &stream) as usize as *const f32;
        opts.alibi_per_batch = 1;
        opts.sinks = addr(&sinks_dev, &stream) as usize as *const f32;
    }
    // SAFETY: every pointer is a live allocation covering its layout; the
    // stream is this context's; we synchronise before touching the buffers.
    let st =
        unsafe { fused_attn_forward(h.0, stream.cu_stream().cast(), c.dtype as i32, &tq, &tk, &tv, &to, &tl, &opts) };
    check(st, "fused_attn_forward")?;
    stream.synchronize()?;
    let (o_gpu, l_gpu) = (stream.clone_dtoh(&o)?, stream.clone_dtoh(&lse)?);

    if c.mods {
        (opts.alibi_slopes, opts.sinks) = (slopes.as_ptr(), sinks.as_ptr());
    }
    // The reference through the ABI, on the same host inputs, O as f32.
    let mut o_ref = vec![f32::NAN; o_len];
    let mut l_ref = vec![f32::NAN; l_len];
    let host = |p: *const T, l: &Layout| c_tensor(p as u64, l);
    let ro = FusedAttnTensor { data: o_ref.as_mut_ptr().cast(), ..to };
    let rl = FusedAttnLseTensor { data: l_ref.as_mut_ptr(), ..tl };
    // SAFETY: host buffers covering their layouts.
    let st = unsafe {
        fused_attn_reference_forward(
            c.dtype as i32,
            &host(qh.as_ptr(), &ql),
            &host(kh.as_ptr(), &kl),
            &host(vh.as_ptr(), &vl),
            &ro,
            &rl,
            &opts,
        )
    };
    check(st, "fused_attn_reference_forward")?;

    let (mut num, mut den, mut lse_err) = (0.0f64, 0.0f64, 0.0f64);
    for bi in 0..b {
        for i in 0..lq {
            for hi in 0..hq {
                for ci in 0..d {
                    let at = ol.offset(bi, i, hi, ci);
                    let (g, r) = (o_gpu[at].into(), o_ref[at] as f64);
                    num += (g - r) * (g - r);
                    den += r * r;
                }
                let at = ll.offset(bi, hi, i);
                let (g, r) = (l_gpu[at] as f64, l_ref[at] as f64);
                let e = if g == r { 0.0 } else { (g - r).abs() };
                lse_err = lse_err.max(if e.is_nan() { f64::INFINITY } else { e });
            }
        }
    }
    let rel = (num / den.max(1e-30)).sqrt();
    let tol = if c.dtype == FusedAttnDtype::Bf16 { 1e-2 } else { 3e-3 };
    // Padding: every element outside the view keeps its poison.
    let mut inside = vec![false; o_len];
    for bi in 0..b {
        for i in 0..lq {
            for hi in 0..hq {
                (0..d).for_each(|ci| inside[ol.offset(bi, i, hi, ci)] = true);
            }
        }
    }
    let stray = (0..o_len).filter(|&n| !inside[n] && !o_gpu[n].into().is_nan()).count();
    if !(rel <= tol && lse_err <= 1e-3 && stray == 0) {
        return Err(format!(
            "{c:?}: O rel L2 {rel:.3e} (tol {tol:.0e}), LSE max err {lse_err:.3e}, {stray} stray writes"
        )
        .into());
    }

    if c.kernel == FusedAttnKernel::Auto {
        // The raw path and the typed path on the same buffers: bitwise equal.
        let attn = Attention::new(ctx)?;
        let mut o2 = stream.clone_htod(&vec![poison; o_len])?;
        let mut l2 = stream.clone_htod(&vec![f32::NAN; l_len])?;
        let mut ot = DeviceTensorMut::new(&mut o2, ol);
        let mut lt = LseTensorMut::new(&mut l2, ll);
        let mut ro = AttentionOptions::new(match c.opts.mask {
            0 => Mask::Full,
            1 => Mask::Causal,
            _ => Mask::window(c.opts.window_left as usize, c.opts.window_right as usize),
        });
        if c.opts.softcap != 0.0 {
            ro = ro.with_softcap(c.opts.softcap);
        }
        // The same modifiers as the ABI call (found missing on the first GPU
        // run, 2026-11-26: the comparison then set two different problems).
        if c.mods {
            ro = ro
                .with_alibi(Alibi::per_batch(HeadValues::Device(&slopes_dev)))
                .with_sinks(HeadValues::Device(&sinks_dev));
        }
        let (qt, kt, vt) = (DeviceTensor::new(&q, ql), DeviceTensor::new(&k, kl), DeviceTensor::new(&v, vl));
        attn.forward_into(&stream, &qt, &kt, &vt, &mut ot, Some(&mut lt), &ro)?;
        stream.synchronize()?;
        let (o2h, l2h) = (stream.clone_dtoh(&o2)?, stream.clone_dtoh(&l2)?);
        let same_o = o2h.iter().zip(&o_gpu).all(|(a, b)| a.to_bits() == b.to_bits());
        let same_l = l2h.iter().zip(&l_gpu).all(|(a, b)| a.to_bits() == b.to_bits());
        if !(same_o && same_l) {
            return Err(format!(
                "{c:?}: fused_attn_forward and forward_into differ (O same: {same_o}, LSE same: {same_l})"
            )
            .into());
        }
    }
    Ok(())
}

fn streams(h: &Handle, ctx: &Arc<CudaContext>) -> Result<(), Failed> {
    // A minimal valid problem, run on the null stream, then on another
    // context's stream (refused).
    let stream = ctx.default_stream();
    let l = Layout::bshd(1, 16, 2, 64);
    let q = stream.alloc_zeros::<f16>(l.span().unwrap())?;
    let o = stream.alloc_zeros::<f16>(l.span().unwrap())?;
    let (tq, to) = (c_tensor(addr(&q, &stream), &l), c_tensor(addr(&o, &stream), &l));
    let f16t = FusedAttnDtype::F16 as i32;
    // SAFETY: live allocations covering their layouts; null stream.
    let st = unsafe {
        fused_attn_forward(h.0, std::ptr::null_mut(), f16t, &tq, &tq, &tq, &to, std::ptr::null(), std::ptr::null())
    };
    check(st, "null stream")?;
    stream.synchronize()?;
    let other = CudaContext::new_non_primary(0, 0)?;
    let foreign = other.new_stream()?;
    // SAFETY: as above; the foreign stream is live (and refused before any launch).
    let st = unsafe {
        fused_attn_forward(
            h.0,
            foreign.cu_stream().cast(),
            f16t,
            &tq,
            &tq,
            &tq,
            &to,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if st != FusedAttnStatus::ForeignContext {
        return Err(format!("another context's stream: {st:?}: {}", last_error()).into());
    }
    println!("another context's stream -> {st:?}: {}", last_error());
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let gpu = open().and_then(|h| fused_attn::cuda_context(0).map(|ctx| (h, ctx)).map_err(|e| e.to_string()));
    let sm = gpu.as_ref().ok().and_then(|(_, ctx)| Attention::new(ctx).ok()).map(|a| a.sm());
    let gpu = gpu.map(|(h, ctx)| Arc::new((SendHandle(h), ctx)));
    let mut trials = Vec::new();
    let base = FusedAttnOptions::default();
    let causal = FusedAttnOptions { mask: FusedAttnMask::Causal as i32, ..base };
    let window = FusedAttnOptions {
        mask: FusedAttnMask::Window as i32,
        window_left: 40,
        window_right: 3,
        softcap: 20.0,
        ..base
    };
    for (kernel, needs90) in [
        (FusedAttnKernel::Auto, false),
        (FusedAttnKernel::Naive, false),
        (FusedAttnKernel::Sm80, false),
        (FusedAttnKernel::Sm90, true),
    ] {
        for dtype in [FusedAttnDtype::F16, FusedAttnDtype::Bf16] {
            let cases = [
                ("full", base, false),
                ("causal", causal, false),
                ("window", window, false),
                ("alibi_sinks", causal, true),
            ];
            for (mname, opts, mods) in cases {
                for d in [64usize, 128] {
                    let c = Case { dtype, kernel, b: 2, lq: 77, lk: 131, hq: 8, hk: 2, d, opts, mods };
                    let name = format!("capi/{kernel:?}/{dtype:?}/{mname}/d{d}");
                    let g = gpu.clone();
                    let t = Trial::test(name, move || {
                        let g = g.map_err(|e| -> Failed { e.into() })?;
                        match dtype {
                            FusedAttnDtype::F16 => run_case::<f16>(&g.0 .0, &g.1, c),
                            FusedAttnDtype::Bf16 => run_case::<bf16>(&g.0 .0, &g.1, c),
                        }
                    });
                    let ignore = gpu.is_err() || (needs90 && sm != Some(90));
                    trials.push(t.with_ignored_flag(ignore));
                }
            }
        }
    }
    for det in [false, true] {
        let g = gpu.clone();
        trials.push(
            Trial::test(format!("capi/backward/bf16/causal/deterministic={det}"), move || {
                let g = g.map_err(|e| -> Failed { e.into() })?;
                backward_case(&g.0 .0, &g.1, det)
            })
            .with_ignored_flag(gpu.is_err()),
        );
    }
    let g = gpu.clone();
    trials.push(
        Trial::test("capi/streams", move || {
            let g = g.map_err(|e| -> Failed { e.into() })?;
            streams(&g.0 .0, &g.1)
        })
        .with_ignored_flag(gpu.is_err()),
    );
    match &gpu {
        Err(reason) => println!("GPU tests ignored: {reason}"),
        Ok(_) if sm != Some(90) => println!("sm90 trials ignored: the GPU is sm_{sm:?}, the sm_90a kernels need sm_90"),
        Ok(_) => {}
    }
    libtest_mimic::run(&args, trials).exit();
}

/// `fused_attn_forward` then `fused_attn_backward` (tiled kernels: a
/// workspace of `fused_attn_backward_workspace_len` floats) on raw device
/// pointers against `fused_attn_reference_backward` on the host: bf16,
/// causal, GQA 4:1, lengths across the 64-row tiles, rel L2 ≤ 2e-2 per
/// gradient.
fn backward_case(h: &Handle, ctx: &Arc<CudaContext>, det: bool) -> Result<(), Failed> {
    let stream = ctx.new_stream()?;
    let (b, lq, lk, hq, hk, d) = (2usize, 130usize, 97usize, 8usize, 2usize, 128usize);
    let (ql, kl) = (Layout::bshd(b, lq, hq, d), Layout::bshd(b, lk, hk, d));
    let gen = |n: usize, seed: usize| -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32((((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 1.5)).collect()
    };
    let (q, k, v, d_o) =
        (gen(b * lq * hq * d, 1), gen(b * lk * hk * d, 2), gen(b * lk * hk * d, 3), gen(b * lq * hq * d, 4));
    let up = |x: &[bf16]| stream.clone_htod(x);
    let (qd, kd, vd, dod) = (up(&q)?, up(&k)?, up(&v)?, up(&d_o)?);
    let (od, lsed) = (stream.alloc_zeros::<bf16>(q.len())?, stream.alloc_zeros::<f32>(b * hq * lq)?);
    let (dqd, dkd, dvd) = (
        stream.alloc_zeros::<bf16>(q.len())?,
        stream.alloc_zeros::<bf16>(k.len())?,
        stream.alloc_zeros::<bf16>(k.len())?,
    );
    let mut ws_len = 0u64;
    // SAFETY: `ws_len` is valid for the write.
    check(
        unsafe { fused_attn_backward_workspace_len(b as i64, lq as i64, hq as i64, d as i64, &mut ws_len) },
        "workspace_len",
    )?;
    // Four floats of slack, so that the misaligned probe below can pass the
    // full length and fail on alignment alone, not on size.
    let wsd = stream.alloc_zeros::<f32>(ws_len as usize + 4)?;
    let opts = FusedAttnOptions { mask: FusedAttnMask::Causal as i32, ..FusedAttnOptions::default() };
    let lse_c = FusedAttnLseTensor {
        data: addr(&lsed, &stream) as usize as *mut f32,
        shape: [b as i64, hq as i64, lq as i64],
        strides: [(hq * lq) as i64, lq as i64, 1],
    };
    let t = |s: &CudaSlice<bf16>, l: &Layout| c_tensor(addr(s, &stream), l);
    let cs = stream.cu_stream() as *mut std::ffi::c_void;
    let dt = FusedAttnDtype::Bf16 as i32;
    // SAFETY: every tensor is a live allocation of its layout's extent on
    // this context, used only on `stream`, synchronised below.
    unsafe {
        check(
            fused_attn_forward(h.0, cs, dt, &t(&qd, &ql), &t(&kd, &kl), &t(&vd, &kl), &t(&od, &ql), &lse_c, &opts),
            "forward",
        )?;
        let backward = |ws: *mut f32, len: u64| {
            fused_attn_backward(
                h.0,
                cs,
                dt,
                &t(&qd, &ql),
                &t(&kd, &kl),
                &t(&vd, &kl),
                &t(&od, &ql),
                &lse_c,
                &t(&dod, &ql),
                &t(&dqd, &ql),
                &t(&dkd, &kl),
                &t(&dvd, &kl),
                std::ptr::null_mut(),
                ws,
                len,
                i32::from(det),
                &opts,
            )
        };
        let ws = addr(&wsd, &stream) as usize as *mut f32;
        // One float in, full length still inside the allocation: the dQ
        // accumulator's paired reductions need 16-byte alignment.
        let st = backward(ws.wrapping_add(1), ws_len);
        if st != FusedAttnStatus::Misaligned || !last_error().contains("workspace") {
            return Err(format!("a workspace 4 bytes off alignment: {st:?} ({}), want Misaligned", last_error()).into());
        }
        check(backward(ws, ws_len), "backward")?;
    }
    let (dq, dk, dv) = (stream.clone_dtoh(&dqd)?, stream.clone_dtoh(&dkd)?, stream.clone_dtoh(&dvd)?);
    let (mut rq, mut rk, mut rv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; k.len()]);
    let ht = |p: *const bf16, l: &Layout| c_tensor(p as usize as u64, l);
    let hf = |p: *mut f32, l: &Layout| c_tensor(p as usize as u64, l);
    // SAFETY: host buffers of exactly the layouts' extents.
    check(
        unsafe {
            fused_attn_reference_backward(
                dt,
                &ht(q.as_ptr(), &ql),
                &ht(k.as_ptr(), &kl),
                &ht(v.as_ptr(), &kl),
                &ht(d_o.as_ptr(), &ql),
                &hf(rq.as_mut_ptr(), &ql),
                &hf(rk.as_mut_ptr(), &kl),
                &hf(rv.as_mut_ptr(), &kl),
                std::ptr::null_mut(),
                &opts,
            )
        },
        "reference backward",
    )?;
    for (name, got, want) in [("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)] {
        let (mut e2, mut r2) = (0f64, 0f64);
        for (g, w) in got.iter().zip(want.iter()) {
            let (g, w) = (g.to_f64(), *w as f64);
            e2 += (g - w) * (g - w);
            r2 += w * w;
        }
        let rel = (e2 / r2.max(f64::MIN_POSITIVE)).sqrt();
        println!("capi backward (deterministic {det}) {name}: rel L2 {rel:.2e}");
        if rel.is_nan() || rel > 2e-2 {
            return Err(format!("{name}: rel L2 {rel:.3e} above 2e-2").into());
        }
    }
    Ok(())
}

/// The handle, shared by trials on several threads: the ABI allows calls on
/// one handle from many threads.
struct SendHandle(Handle);
// SAFETY: FusedAttnHandle wraps `Attention`, which is Send + Sync; the raw
// pointer is only used for calls the ABI allows from any thread, and
// destroyed once, when the last trial is done.
unsafe impl Send for SendHandle {}
unsafe impl Sync for SendHandle {}
