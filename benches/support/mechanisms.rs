//! Attention mechanisms other than the dot-product forward (issues 12 and
//! 14): fused additive (Bahdanau) attention at an encoder-decoder shape, and
//! the backward: the baseline at a small training shape, the tiled kernels
//! (both modes) over DESIGN.md section 5's grid. Timed with CUDA events
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
//! backward:   direction "bwd", mode ("baseline" | "tiled" | "tiled
//!             deterministic"), heads_q, heads_kv, head_dim, fwd_flops,
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
    AttentionOptions, BackwardPath, DeviceTensor, DeviceTensorMut, Error, Gradients, Layout, LseLayout, LseTensor,
    LseTensorMut, Mask,
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
    // The baseline at a small training step; the tiled kernels over DESIGN.md
    // section 5's grid (16k tokens, hidden 2048) at hd64 and hd128, full and
    // causal, and the deterministic mode beside the default at hd128.
    rows.push(backward_row(g, stream, reps, (2, 1024, 64), Mask::Causal, BwdMode::Baseline)?);
    for d in [64usize, 128] {
        for l in [1024usize, 4096, 16384] {
            for mask in [Mask::Full, Mask::Causal] {
                rows.push(backward_row(g, stream, reps, (16384 / l, l, d), mask, BwdMode::Tiled)?);
                if d == 128 && l >= 4096 {
                    rows.push(backward_row(g, stream, reps, (16384 / l, l, d), mask, BwdMode::Deterministic)?);
                }
            }
        }
    }
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

/// Which backward kernels a row times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BwdMode {
    /// No workspace: the CUDA-core baseline.
    Baseline,
    /// The tiled kernels, dQ by atomics.
    Tiled,
    /// The tiled kernels in deterministic mode.
    Deterministic,
}

/// One backward row: `(B, L, D)` with `H = 2048 / D` heads (8 for the
/// baseline's small step), bf16, timed alone on a forward's O and LSE.
fn backward_row(
    g: &Gpu,
    stream: &Arc<CudaStream>,
    reps: usize,
    (b, l, d): (usize, usize, usize),
    mask: Mask,
    mode: BwdMode,
) -> Result<String, Error> {
    let h = if mode == BwdMode::Baseline { 8 } else { 2048 / d };
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
    let ws_len = if mode == BwdMode::Baseline { 1 } else { fused_attn::backward_workspace_len(b, l, h, d)? };
    let mut ws = stream.alloc_zeros::<f32>(ws_len).map_err(|driver| Error::Cuda { during: "allocating", driver })?;
    let opts = AttentionOptions::new(mask);
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
        let mut grads = Gradients::new(&mut dqt, &mut dkt, &mut dvt);
        if mode != BwdMode::Baseline {
            grads = grads.with_workspace(&mut ws).deterministic(mode == BwdMode::Deterministic);
        }
        g.attn.backward_into(stream, &qt, &kt, &vt, &ot, &lt, &dot, grads, &opts)
    })?;
    let fwd = fused_attn::problem_of(fused_attn::DType::BF16, &lay, &lay, &lay, &opts).map_or(0, |p| p.flops());
    // FlashAttention counts the backward as 2.5 forwards (5 GEMMs to the forward's 2).
    let fl = fwd * 5 / 2;
    let tf = fl as f64 / (ms * 1e-3) / 1e12;
    let mask_name = if mask == Mask::Causal { "causal" } else { "full" };
    let (tag, kernel) = match (mode, g.attn.backward_path(d, mode != BwdMode::Baseline, true)) {
        (BwdMode::Baseline, _) | (_, BackwardPath::Baseline) => {
            ("baseline", "fa_bwd_dq_naive_bf16 + fa_bwd_dkdv_naive_bf16".to_string())
        }
        (m, BackwardPath::Tiled { bucket }) => (
            if m == BwdMode::Deterministic { "tiled deterministic" } else { "tiled" },
            format!("fa_bwd_sm80_pre_bf16 + fa_bwd_sm80_bf16_hd{bucket} + fa_bwd_sm80_dq_bf16"),
        ),
        (_, _) => ("other", "?".to_string()),
    };
    eprintln!(
        "mechanisms: backward {tag} bf16 b{b} s{l} h{h} d{d} {mask_name}: {ms:.3} ms {tf:.2} TFLOP/s (at 2.5x forward FLOPs)"
    );
    Ok(format!(
        concat!(
            "{{\"name\": \"backward {tag} bf16 b{b} s{l} h{h} d{d} {mask}\", \"mechanism\": \"backward\", ",
            "\"mode\": \"{tag}\", \"kernel\": \"{kernel}\", \"direction\": \"bwd\", \"dtype\": \"bf16\", ",
            "\"batch\": {b}, \"heads_q\": {h}, \"heads_kv\": {h}, \"seqlen_q\": {l}, \"seqlen_k\": {l}, \"head_dim\": {d}, ",
            "\"mask\": \"{mask}\", \"fwd_flops\": {fwd}, \"flops\": {fl}, \"ours_ms\": {ms:.6}, \"reps\": {reps}, ",
            "\"ours_tflops\": {tf:.3}}}"
        ),
        tag = tag,
        kernel = kernel,
        mask = mask_name,
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
