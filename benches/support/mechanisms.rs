//! Attention mechanisms other than the dot-product forward (issues 12 and
//! 14): fused additive (Bahdanau) attention at an encoder-decoder shape, and
//! the baseline backward at a small training shape. Timed with CUDA events
//! like the serving cases; no error check here (the GPU tier's `additive/`
//! and `backward/` trials do that).
//!
//! Each row is one JSON object of `ours.json`'s `"mechanisms"` array:
//!
//! ```text
//! every row:  name, mechanism ("additive" | "backward"), kernel, dtype, batch,
//!             seqlen_q, seqlen_k, mask, ours_ms (median), reps
//! additive:   heads, dim_a, dim_v, bias (bool), flops (3·Da + 2·Dv per
//!             visible pair), tanh_count (B·H·visible pairs·Da), ours_tflops,
//!             ours_gtanh_per_s, ours_peak_bytes
//! backward:   direction "bwd", heads_q, heads_kv, head_dim, fwd_flops,
//!             flops (= 2.5 · fwd_flops, FlashAttention's convention for the
//!             backward's work), ours_tflops (from flops)
//! ```
//!
//! `ours_peak_bytes` is the device memory the call needs: the bytes of the
//! tensors it reads and writes (Q', K', V, w, bias, O, LSE). The kernel
//! allocates no workspace, so that is its whole footprint; the unfused torch
//! formulation of `scripts/peers.py` also holds `[B, H, Lq, Lk, Da]`
//! temporaries, which is what the comparison is about.
//!
//! The additive shape is issue 14's: 200 decoder steps attending over 1000
//! encoder frames, `Da = Dv = 128`, no mask (an encoder-decoder attends over
//! every frame), bf16, with and without the bias inside the tanh. `H = 4`
//! heads, as in multi-head location-aware attention of speech recognisers
//! (one head is the classic Bahdanau form; four keep the GPU busier at B = 1
//! and scale the torch temporaries to 0.2 GB at B = 1 and 1.6 GB at B = 8
//! each, which an 80 GB GPU still holds). B ∈ {1, 8}: one utterance, and a
//! decoding batch.

use std::sync::Arc;

use fused_attn::cudarc::driver::CudaStream;
use fused_attn::{
    AttentionOptions, DeviceTensor, DeviceTensorMut, Error, Gradients, Layout, LseLayout, LseTensor, LseTensorMut, Mask,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::common::{randn, randn_scaled, upload, Gpu};
use crate::serving::time;

/// The JSON objects of the mechanism rows (one line each).
pub fn mechanism_rows(g: &Gpu, stream: &Arc<CudaStream>, reps: usize) -> Result<Vec<String>, Error> {
    let mut rows = Vec::new();
    for b in [1usize, 8] {
        for bias in [false, true] {
            rows.push(additive_row(g, stream, reps, b, bias)?);
        }
    }
    rows.push(backward_row(g, stream, reps)?);
    Ok(rows)
}

fn too_large(what: &'static str) -> Error {
    Error::NoKernel { reason: format!("mechanism bench: {what} overflows usize") }
}

/// One additive-attention row: B × 200 queries × 1000 keys, H = 4, Da = Dv = 128.
fn additive_row(g: &Gpu, stream: &Arc<CudaStream>, reps: usize, b: usize, bias: bool) -> Result<String, Error> {
    let (h, lq, lk, da, dv) = (4usize, 200usize, 1000usize, 128usize, 128usize);
    let mut rng = StdRng::seed_from_u64(14 + b as u64);
    let ql = Layout::bshd(b, lq, h, da);
    let kl = Layout::bshd(b, lk, h, da);
    let vl = Layout::bshd(b, lk, h, dv);
    let ol = Layout::bshd(b, lq, h, dv);
    let n = |l: Layout| l.numel().ok_or_else(|| too_large("a tensor's element count"));
    let (nq, nk, nv, no) = (n(ql)?, n(kl)?, n(vl)?, n(ol)?);
    let q = upload(stream, &randn::<bf16>(&mut rng, nq))?;
    let k = upload(stream, &randn::<bf16>(&mut rng, nk))?;
    let v = upload(stream, &randn::<bf16>(&mut rng, nv))?;
    // w scaled by 1/sqrt(Da) keeps the scores O(1), as a trained layer's are.
    let w = upload(stream, &randn_scaled::<bf16>(&mut rng, h * da, 1.0 / (da as f32).sqrt()))?;
    let bv = upload(stream, &randn::<bf16>(&mut rng, h * da))?;
    let mut o = stream.alloc_zeros::<bf16>(no).map_err(|driver| Error::Cuda { during: "allocating", driver })?;
    let ll = LseLayout::contiguous(b, h, lq);
    let mut lse =
        stream.alloc_zeros::<f32>(b * h * lq).map_err(|driver| Error::Cuda { during: "allocating", driver })?;
    let opts = AttentionOptions::new(Mask::Full);
    let mut problem = None;
    let ms = time(g, stream, reps, || {
        let (qt, kt, vt) = (DeviceTensor::new(&q, ql), DeviceTensor::new(&k, kl), DeviceTensor::new(&v, vl));
        let mut ot = DeviceTensorMut::new(&mut o, ol);
        let mut lt = LseTensorMut::new(&mut lse, ll);
        let bias_view = bias.then(|| bv.as_view());
        problem = Some(g.attn.additive_forward_into(
            stream,
            &qt,
            &kt,
            &vt,
            &w.as_view(),
            bias_view.as_ref(),
            &mut ot,
            Some(&mut lt),
            &opts,
        )?);
        Ok(())
    })?;
    let p = problem.ok_or_else(|| too_large("no call ran"))?;
    let fl = p.flops();
    let tanh = (b * h * da) as u128 * p.band().visible_pairs();
    let elems = nq + nk + nv + h * da * (1 + usize::from(bias)) + no;
    let peak = elems * 2 + b * h * lq * 4;
    let tf = fl as f64 / (ms * 1e-3) / 1e12;
    let gtanh = tanh as f64 / (ms * 1e-3) / 1e9;
    let tag = if bias { " bias" } else { "" };
    eprintln!(
        "mechanisms: additive bf16 b{b} h{h} lq{lq} lk{lk} da{da} dv{dv} full{tag}: {ms:.3} ms {tf:.2} TFLOP/s {gtanh:.0} G tanh/s, {:.1} MB touched",
        peak as f64 / 1e6
    );
    Ok(format!(
        concat!(
            "{{\"name\": \"additive bf16 b{b} h{h} lq{lq} lk{lk} da{da} dv{dv} full{tag}\", \"mechanism\": \"additive\", ",
            "\"kernel\": \"fa_additive_bf16\", \"dtype\": \"bf16\", \"batch\": {b}, \"heads\": {h}, \"seqlen_q\": {lq}, ",
            "\"seqlen_k\": {lk}, \"dim_a\": {da}, \"dim_v\": {dv}, \"bias\": {bias}, \"mask\": \"full\", ",
            "\"flops\": {fl}, \"tanh_count\": {tanh}, \"ours_ms\": {ms:.6}, \"reps\": {reps}, \"ours_tflops\": {tf:.3}, ",
            "\"ours_gtanh_per_s\": {gtanh:.1}, \"ours_peak_bytes\": {peak}}}"
        ),
        b = b,
        h = h,
        lq = lq,
        lk = lk,
        da = da,
        dv = dv,
        tag = tag,
        bias = bias,
        fl = fl,
        tanh = tanh,
        ms = ms,
        reps = reps,
        tf = tf,
        gtanh = gtanh,
        peak = peak,
    ))
}

/// The backward baseline: B = 2, L = 1024, H = 8, D = 64, causal, bf16 (a
/// small training step), timed alone on a forward's O and LSE.
fn backward_row(g: &Gpu, stream: &Arc<CudaStream>, reps: usize) -> Result<String, Error> {
    let (b, l, h, d) = (2usize, 1024usize, 8usize, 64usize);
    let mut rng = StdRng::seed_from_u64(12);
    let lay = Layout::bshd(b, l, h, d);
    let n = lay.numel().ok_or_else(|| too_large("the element count"))?;
    let (q, k, v) = (
        upload(stream, &randn::<bf16>(&mut rng, n))?,
        upload(stream, &randn::<bf16>(&mut rng, n))?,
        upload(stream, &randn::<bf16>(&mut rng, n))?,
    );
    let d_o = upload(stream, &randn::<bf16>(&mut rng, n))?;
    let alloc = |len| stream.alloc_zeros::<bf16>(len).map_err(|driver| Error::Cuda { during: "allocating", driver });
    let (mut o, mut dq, mut dk, mut dv) = (alloc(n)?, alloc(n)?, alloc(n)?, alloc(n)?);
    let ll = LseLayout::contiguous(b, h, l);
    let mut lse =
        stream.alloc_zeros::<f32>(b * h * l).map_err(|driver| Error::Cuda { during: "allocating", driver })?;
    let opts = AttentionOptions::new(Mask::Causal);
    let (qt, kt, vt) = (DeviceTensor::new(&q, lay), DeviceTensor::new(&k, lay), DeviceTensor::new(&v, lay));
    {
        let mut ot = DeviceTensorMut::new(&mut o, lay);
        let mut lt = LseTensorMut::new(&mut lse, ll);
        g.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lt), &opts)?;
    }
    let (ot, lt, dot) = (DeviceTensor::new(&o, lay), LseTensor::new(&lse, ll), DeviceTensor::new(&d_o, lay));
    let ms = time(g, stream, reps, || {
        let mut dqt = DeviceTensorMut::new(&mut dq, lay);
        let mut dkt = DeviceTensorMut::new(&mut dk, lay);
        let mut dvt = DeviceTensorMut::new(&mut dv, lay);
        let grads = Gradients::new(&mut dqt, &mut dkt, &mut dvt);
        g.attn.backward_into(stream, &qt, &kt, &vt, &ot, &lt, &dot, grads, &opts)
    })?;
    let fwd = fused_attn::problem_of(fused_attn::DType::BF16, &lay, &lay, &lay, &opts).map_or(0, |p| p.flops());
    // FlashAttention counts the backward as 2.5 forwards (5 GEMMs to the forward's 2).
    let fl = fwd * 5 / 2;
    let tf = fl as f64 / (ms * 1e-3) / 1e12;
    eprintln!(
        "mechanisms: backward bf16 b{b} s{l} h{h} d{d} causal: {ms:.3} ms {tf:.2} TFLOP/s (at 2.5x forward FLOPs)"
    );
    Ok(format!(
        concat!(
            "{{\"name\": \"backward bf16 b{b} s{l} h{h} d{d} causal\", \"mechanism\": \"backward\", ",
            "\"kernel\": \"fa_bwd_dq_naive_bf16 + fa_bwd_dkdv_naive_bf16\", \"direction\": \"bwd\", \"dtype\": \"bf16\", ",
            "\"batch\": {b}, \"heads_q\": {h}, \"heads_kv\": {h}, \"seqlen_q\": {l}, \"seqlen_k\": {l}, \"head_dim\": {d}, ",
            "\"mask\": \"causal\", \"fwd_flops\": {fwd}, \"flops\": {fl}, \"ours_ms\": {ms:.6}, \"reps\": {reps}, ",
            "\"ours_tflops\": {tf:.3}}}"
        ),
        b = b,
        l = l,
        h = h,
        d = d,
        fwd = fwd,
        fl = fl,
        ms = ms,
        reps = reps,
        tf = tf,
    ))
}
