//! The CPU reference: DESIGN.md section 1 computed in `f64`, multi-threaded.
//!
//! It accepts exactly what the GPU path accepts (it runs the same
//! [`validate`](crate::options::validate()) and computes the same function:
//! bottom-right masks and windows, GQA, `Lq != Lk`, softcap, LSE, and rows
//! with no visible key (`O = 0`, `LSE = -inf`). Every GPU test compares
//! against it.
//!
//! ```
//! use fused_attn::{reference, AttentionOptions, HostTensor, Layout, Mask};
//! use half::bf16;
//! let (b, l, h, d) = (1, 5, 2, 8);
//! let x: Vec<bf16> = (0..b * l * h * d).map(|i| bf16::from_f32((i as f32 * 0.37).sin())).collect();
//! let t = HostTensor::new(&x, Layout::bshd(b, l, h, d));
//! let r = reference::forward(t, t, t, &AttentionOptions::new(Mask::Causal)).unwrap();
//! assert_eq!(r.o.len(), b * l * h * d);
//! assert!(r.lse.iter().all(|x| x.is_finite()));
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Result;
use crate::options::{validate, AttentionOptions, Problem, TensorDesc};
use crate::tensor::{Element, HostTensor};

/// The reference result.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The validated problem.
    pub problem: Problem,
    /// Output, contiguous `[B, Lq, Hq, D]`.
    pub o: Vec<f64>,
    /// Log-sum-exp, contiguous `[B, Hq, Lq]` (natural log; `-inf` for empty rows).
    pub lse: Vec<f64>,
}

/// One finished unit of work: its index, its outputs `[rows, D]` and LSEs.
type UnitResult = (usize, Vec<f64>, Vec<f64>);

/// Query rows per unit of work handed to a thread.
const ROWS_PER_UNIT: usize = 32;

/// Computes attention on the host in `f64`, on all available cores.
pub fn forward<T: Element>(
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    opts: &AttentionOptions,
) -> Result<Reference> {
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    let p = validate(T::DTYPE, &desc("q", &q), &desc("k", &k), &desc("v", &v), None, None, opts)?;
    let (b_n, lq, hq, d) = (p.batch, p.seqlen_q, p.heads_q, p.head_dim);
    let mut o = vec![0.0f64; b_n * lq * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; b_n * hq * lq];

    // Units are (batch, head, block of rows); threads pull them off a counter
    // so a long causal tail does not leave cores idle.
    let blocks = lq.div_ceil(ROWS_PER_UNIT);
    let units = b_n * hq * blocks;
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(units.max(1));
    let results: Vec<Vec<UnitResult>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let u = next.fetch_add(1, Ordering::Relaxed);
                        if u >= units {
                            break done;
                        }
                        let (bh, blk) = (u / blocks, u % blocks);
                        let rows = blk * ROWS_PER_UNIT..((blk + 1) * ROWS_PER_UNIT).min(lq);
                        let (unit_o, unit_lse) = rows_for_head(&p, &q, &k, &v, bh / hq, bh % hq, rows);
                        done.push((u, unit_o, unit_lse));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("reference worker panicked")).collect()
    });

    for (u, unit_o, unit_lse) in results.into_iter().flatten() {
        let (bh, blk) = (u / blocks, u % blocks);
        let (b, h) = (bh / hq, bh % hq);
        for (r, (orow, l)) in unit_o.chunks_exact(d).zip(unit_lse).enumerate() {
            let i = blk * ROWS_PER_UNIT + r;
            let at = ((b * lq + i) * hq + h) * d;
            o[at..at + d].copy_from_slice(orow);
            lse[(b * hq + h) * lq + i] = l;
        }
    }
    Ok(Reference { problem: p, o, lse })
}

/// Rows `rows` of query head `h` in batch `b`: outputs `[rows, D]` and LSEs.
fn rows_for_head<T: Element>(
    p: &Problem,
    q: &HostTensor<'_, T>,
    k: &HostTensor<'_, T>,
    v: &HostTensor<'_, T>,
    b: usize,
    h: usize,
    rows: std::ops::Range<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let d = p.head_dim;
    let hk = h / p.q_per_kv();
    let mut out = Vec::with_capacity(rows.len() * d);
    let mut lses = Vec::with_capacity(rows.len());
    let mut scores = Vec::new();
    let mut qi = vec![0.0f64; d];
    for i in rows {
        for (c, x) in qi.iter_mut().enumerate() {
            *x = q.data[q.layout.offset(b, i, h, c)].into();
        }
        let (lo, hi) = p.key_range(i);
        scores.clear();
        for j in lo..hi {
            let base = k.layout.offset(b, j, hk, 0);
            let dot: f64 = qi.iter().zip(&k.data[base..base + d]).map(|(a, &kv)| a * kv.into()).sum();
            scores.push(capped_score(p, dot));
        }
        let mut acc = vec![0.0f64; d];
        if scores.is_empty() {
            lses.push(f64::NEG_INFINITY);
        } else {
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut l = 0.0;
            for (j, s) in (lo..hi).zip(&scores) {
                let w = (s - m).exp();
                l += w;
                let base = v.layout.offset(b, j, hk, 0);
                for (a, &vv) in acc.iter_mut().zip(&v.data[base..base + d]) {
                    *a += w * vv.into();
                }
            }
            acc.iter_mut().for_each(|a| *a /= l);
            lses.push(m + l.ln());
        }
        out.extend_from_slice(&acc);
    }
    (out, lses)
}

/// `scale · dot`, then the softcap if any: the score of DESIGN.md section 1.
pub fn capped_score(p: &Problem, dot: f64) -> f64 {
    let s = p.scale as f64 * dot;
    match p.softcap {
        Some(c) => {
            let c = c as f64;
            c * (s / c).tanh()
        }
        None => s,
    }
}

/// Relative L2 error `‖a − b‖ / ‖b‖` (with `b` the reference). Infinite
/// entries must match exactly (e.g. `-inf` LSE of empty rows) and are left
/// out of the norms; a NaN anywhere, or an infinity that does not match,
/// gives `+inf`. Both all-zero gives 0.
pub fn rel_l2_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_l2_error: lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        if x.is_infinite() || y.is_infinite() {
            if x != y {
                return f64::INFINITY;
            }
            continue;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}
