//! The backward pass of DESIGN.md section 1b on the host, in `f64`: the
//! gradients of `L = Σ ⟨dO, O⟩` with respect to Q, K, V and the sink logits.
//!
//! With `P_ij = e^{s_ij − LSE_i}` (the sink inside `LSE_i`), `D_i = ⟨dO_i, O_i⟩`,
//! `dP_ij = ⟨dO_i, v_j⟩` and `dS_ij = P_ij (dP_ij − D_i)`, times
//! `1 − tanh²(s_raw/c)` under a softcap `c` (`s_raw = scale·⟨q_i, k_j⟩`):
//! `dQ_i = scale·Σ_j dS_ij k_j`, `dK_j = scale·Σ_i dS_ij q_i`,
//! `dV_j = Σ_i P_ij dO_i`, and for a sink `dσ_h = −Σ_i e^{σ_h − LSE_i} D_i`.
//! ALiBi's bias is a constant of the inputs: it shapes P and has no gradient
//! of its own here. With GQA, dK and dV sum over the query heads of each KV
//! head. Rows that see no key contribute nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{filled, HostModifiers, Scalar, MAX_OUTPUT_ELEMENTS, MAX_WORK};
use crate::error::{Error, Result};
use crate::options::AttentionOptions;
use crate::tensor::{DType, Element, HostTensor};
use crate::validate::{validate, Problem, TensorDesc};

/// The gradients, all contiguous, with the forward's O and LSE.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// The validated problem.
    pub problem: Problem,
    /// `∂L/∂Q`, `[B, Lq, Hq, D]`.
    pub dq: Vec<f64>,
    /// `∂L/∂K`, `[B, Lk, Hk, D]` (summed over each KV head's query heads).
    pub dk: Vec<f64>,
    /// `∂L/∂V`, `[B, Lk, Hk, D]`.
    pub dv: Vec<f64>,
    /// `∂L/∂σ`, `[Hq]` (summed over batch and rows), when sinks are given.
    pub dsinks: Option<Vec<f64>>,
    /// The forward output, `[B, Lq, Hq, D]`.
    pub o: Vec<f64>,
    /// The forward log-sum-exp, `[B, Hq, Lq]`.
    pub lse: Vec<f64>,
}

/// The gradients of `Σ ⟨dO, O⟩` for attention over `q`, `k`, `v` with
/// `opts` (every mask, GQA, `Lq ≠ Lk`, softcap, ALiBi, sinks), in `f64` on
/// all cores. `d_o` has O's shape `[B, Lq, Hq, D]` and any strides.
///
/// # Errors
/// The validation errors of [`forward`](super::forward) (also for `d_o`,
/// whose shape must be Q's), and [`Error::SizeOverflow`] beyond the
/// reference's limits.
pub fn backward<T: Element>(
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    d_o: HostTensor<'_, T>,
    opts: &AttentionOptions,
) -> Result<Gradients> {
    backward_of(T::DTYPE, q, k, v, d_o, opts)
}

/// [`backward`] on `f64` inputs (nothing rounded), to check it against
/// central differences of [`forward_f64`](super::forward_f64).
///
/// # Errors
/// As [`backward`].
pub fn backward_f64(
    q: HostTensor<'_, f64>,
    k: HostTensor<'_, f64>,
    v: HostTensor<'_, f64>,
    d_o: HostTensor<'_, f64>,
    opts: &AttentionOptions,
) -> Result<Gradients> {
    backward_of(DType::BF16, q, k, v, d_o, opts)
}

fn backward_of<T: Scalar>(
    dtype: DType,
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    d_o: HostTensor<'_, T>,
    opts: &AttentionOptions,
) -> Result<Gradients> {
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    // dO is validated as O is: Q's shape, inside its buffer.
    let p = validate(dtype, &desc("q", &q), &desc("k", &k), &desc("v", &v), Some(&desc("d_o", &d_o)), None, opts)?;
    let (b_n, lq, lk, hq, hk, d) = (p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim);
    let too_big = |what, value: u128, limit: u128| Error::SizeOverflow { arg: "q", what, value, limit };
    // Validation bounded every tensor's element count: these products fit.
    let (n_q, n_k) = (b_n * lq * hq * d, b_n * lk * hk * d);
    if n_q.max(n_k) > MAX_OUTPUT_ELEMENTS {
        return Err(too_big("reference output elements", n_q.max(n_k) as u128, MAX_OUTPUT_ELEMENTS as u128));
    }
    // Three passes over the visible pairs (scores, O, gradients).
    let work = 3 * (p.flops() / 4);
    if work > MAX_WORK {
        return Err(too_big("reference work (multiply-adds)", work, MAX_WORK));
    }
    let mods = HostModifiers::of(opts)?;
    let (mut dq, mut dk, mut dv) = (filled(n_q, 0.0)?, filled(n_k, 0.0)?, filled(n_k, 0.0)?);
    let mut o = filled(n_q, 0.0)?;
    let mut lse = filled(b_n * hq * lq, f64::NEG_INFINITY)?;
    let mut dsinks = mods.sinks.map(|_| vec![0.0; hq]);

    // A unit is one (batch, KV head): it owns dK and dV of that head, and dQ,
    // O, LSE of its query heads, so units never write the same element.
    let units = b_n * hk;
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(units.max(1));
    let results: Vec<Vec<(usize, Unit)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let u = next.fetch_add(1, Ordering::Relaxed);
                        if u >= units {
                            break done;
                        }
                        done.push((u, kv_head_unit(&p, &q, &k, &v, &d_o, &mods, u / hk, u % hk)));
                    }
                })
            })
            .collect();
        // A worker only panics on a bug of this module; pass it on as one.
        workers.into_iter().map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });

    let qpk = p.q_per_kv();
    for (u, r) in results.into_iter().flatten() {
        let (b, g) = (u / hk, u % hk);
        for j in 0..lk {
            let at = ((b * lk + j) * hk + g) * d;
            dk[at..at + d].copy_from_slice(&r.dk[j * d..(j + 1) * d]);
            dv[at..at + d].copy_from_slice(&r.dv[j * d..(j + 1) * d]);
        }
        for hh in 0..qpk {
            let h = g * qpk + hh;
            for i in 0..lq {
                let (at, from) = (((b * lq + i) * hq + h) * d, (hh * lq + i) * d);
                dq[at..at + d].copy_from_slice(&r.dq[from..from + d]);
                o[at..at + d].copy_from_slice(&r.o[from..from + d]);
                lse[(b * hq + h) * lq + i] = r.lse[hh * lq + i];
            }
            if let Some(ds) = dsinks.as_mut() {
                ds[h] += r.dsinks[hh];
            }
        }
    }
    Ok(Gradients { problem: p, dq, dk, dv, dsinks, o, lse })
}

/// One (batch, KV head)'s share: dK, dV `[Lk, D]`; dQ, O `[qpk, Lq, D]`;
/// LSE `[qpk, Lq]`; the sink gradients of its query heads.
struct Unit {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    o: Vec<f64>,
    lse: Vec<f64>,
    dsinks: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn kv_head_unit<T: Scalar>(
    p: &Problem,
    q: &HostTensor<'_, T>,
    k: &HostTensor<'_, T>,
    v: &HostTensor<'_, T>,
    d_o: &HostTensor<'_, T>,
    mods: &HostModifiers<'_>,
    b: usize,
    g: usize,
) -> Unit {
    let (lq, lk, d, qpk) = (p.seqlen_q, p.seqlen_k, p.head_dim, p.q_per_kv());
    let row = |t: &HostTensor<'_, T>, s: usize, h: usize| -> Vec<f64> {
        (0..d).map(|x| t.data[t.layout.offset(b, s, h, x)].into()).collect()
    };
    let (kr, vr): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (0..lk).map(|j| (row(k, j, g), row(v, j, g))).unzip();
    let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();
    let scale = p.scale as f64;
    let mut u = Unit {
        dq: vec![0.0; qpk * lq * d],
        dk: vec![0.0; lk * d],
        dv: vec![0.0; lk * d],
        o: vec![0.0; qpk * lq * d],
        lse: vec![f64::NEG_INFINITY; qpk * lq],
        dsinks: vec![0.0; qpk],
    };
    for hh in 0..qpk {
        let h = g * qpk + hh;
        let m = mods.for_head(b, h, p.heads_q);
        for i in 0..lq {
            let (qi, doi) = (row(q, i, h), row(d_o, i, h));
            let (lo, hi) = p.key_range(i);
            // Scores, and the softcap's derivative at each (1 without a cap).
            let (mut s, mut dcap) = (Vec::with_capacity(hi.saturating_sub(lo)), Vec::new());
            for (j, kj) in kr.iter().enumerate().take(hi).skip(lo) {
                let raw = scale * dot(&qi, kj);
                let (capped, deriv) = match p.softcap {
                    Some(c) => {
                        let t = (raw / c as f64).tanh();
                        (c as f64 * t, 1.0 - t * t)
                    }
                    None => (raw, 1.0),
                };
                s.push(capped + m.slope.map_or(0.0, |sl| super::alibi_bias(p, sl, i, j)));
                dcap.push(deriv);
            }
            let sink = m.sink.unwrap_or(f64::NEG_INFINITY);
            let mx = s.iter().copied().fold(sink, f64::max);
            if mx == f64::NEG_INFINITY {
                continue; // no key, no sink: O = 0, LSE = -inf, no gradient
            }
            let l: f64 = s.iter().map(|x| (x - mx).exp()).sum::<f64>() + (sink - mx).exp();
            let lse = mx + l.ln();
            u.lse[hh * lq + i] = lse;
            let pr: Vec<f64> = s.iter().map(|x| (x - lse).exp()).collect();
            let oi = &mut u.o[(hh * lq + i) * d..][..d];
            for (pj, vj) in pr.iter().zip(&vr[lo..hi]) {
                oi.iter_mut().zip(vj).for_each(|(a, x)| *a += pj * x);
            }
            let di = dot(&doi, oi);
            u.dsinks[hh] -= (sink - lse).exp() * di;
            let dqi = &mut u.dq[(hh * lq + i) * d..][..d];
            for (t, j) in (lo..hi).enumerate() {
                let ds = pr[t] * (dot(&doi, &vr[j]) - di) * dcap[t];
                dqi.iter_mut().zip(&kr[j]).for_each(|(a, x)| *a += scale * ds * x);
                u.dk[j * d..][..d].iter_mut().zip(&qi).for_each(|(a, x)| *a += scale * ds * x);
                u.dv[j * d..][..d].iter_mut().zip(&doi).for_each(|(a, x)| *a += pr[t] * x);
            }
        }
    }
    u
}
