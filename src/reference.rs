//! The CPU reference: the crate's contract (see the crate docs) computed in
//! `f64`, multi-threaded.
//!
//! It accepts what the GPU path accepts (it runs the same validation) and
//! computes the same function: masks and windows in either alignment, GQA,
//! `Lq != Lk`, softcap, LSE, and rows with no visible key (`O = 0`,
//! `LSE = -inf`). Every GPU test compares against it.
//!
//! Being a host computation, it also has limits of its own, so that no input
//! makes it abort on an allocation or run for hours: at most
//! [`MAX_OUTPUT_ELEMENTS`] output elements and [`MAX_WORK`] multiply-adds;
//! beyond them it returns [`Error::SizeOverflow`].
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

mod backward;
pub use backward::{backward, backward_f64, Gradients};

use crate::error::{Error, Result};
use crate::options::{Alibi, AttentionOptions, HeadValues};
use crate::tensor::{DType, Element, HostTensor, Layout, LseLayout, MapLayout};
use crate::validate::{
    check_cache_tables, check_seqlens, validate, validate_kvcache, validate_maps, validate_merge, validate_varlen,
    LseDesc, MapDesc, MapsProblem, MergeProblem, Problem, TensorDesc,
};

/// Largest output (`B·Lq·Hq·D` elements of f64, 2 GiB) the reference computes.
pub const MAX_OUTPUT_ELEMENTS: usize = 1 << 28;
/// Largest work (`B·Hq·D·visible pairs` multiply-adds, about 10^12: minutes
/// on a few cores) the reference takes on.
pub const MAX_WORK: u128 = 1 << 40;

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

/// The merge of partial states ([`merge_states`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MergedReference {
    /// The validated merge.
    pub problem: MergeProblem,
    /// Output, contiguous `[B, L, H, D]`.
    pub o: Vec<f64>,
    /// Log-sum-exp, contiguous `[B, H, L]` (`-inf` where no part saw a key).
    pub lse: Vec<f64>,
}

/// One partial attention state on the host: O `[B, L, H, D]` and its LSE
/// `[B, H, L]` (a slice and its layout), as [`merge_states`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct HostState<'a, T> {
    /// The partial output.
    pub o: HostTensor<'a, T>,
    /// Its log-sum-exp.
    pub lse: &'a [f32],
    /// How `lse` is indexed.
    pub lse_layout: LseLayout,
}

/// Merges partial attention states over disjoint key sets of the same rows
/// (DESIGN.md section 1b) in `f64`: `LSE = log Σ e^{LSE_s}`,
/// `O = Σ e^{LSE_s − LSE} O_s`, from the largest `LSE_s`; a part with
/// `LSE_s = −∞` weighs 0 (its O is not read), and a row no part saw gets
/// `O = 0`, `LSE = −∞`. The same validation as
/// [`Attention::merge_states_into`](crate::Attention::merge_states_into).
///
/// # Errors
/// The errors of [`validate_merge`], and
/// [`Error::SizeOverflow`] beyond [`MAX_OUTPUT_ELEMENTS`].
pub fn merge_states<T: Element>(parts: &[HostState<'_, T>]) -> Result<MergedReference> {
    let descs: Vec<(TensorDesc, LseDesc)> = parts
        .iter()
        .map(|p| {
            (
                TensorDesc { arg: "parts.o", layout: p.o.layout, len: p.o.data.len() },
                LseDesc { layout: p.lse_layout, len: p.lse.len() },
            )
        })
        .collect();
    let shape = parts.first().map_or([0; 4], |p| p.o.layout.shape);
    let out = Layout::bshd(shape[0], shape[1], shape[2], shape[3]);
    let out_desc = TensorDesc { arg: "o", layout: out, len: out.span().unwrap_or(usize::MAX) };
    let m = validate_merge(T::DTYPE, &descs, &out_desc, None)?;
    let (b_n, l, h_n, d) = (m.batch, m.seqlen, m.heads, m.head_dim);
    let n_out = b_n * l * h_n * d;
    if n_out > MAX_OUTPUT_ELEMENTS {
        let (value, limit) = (n_out as u128, MAX_OUTPUT_ELEMENTS as u128);
        return Err(Error::SizeOverflow { arg: "o", what: "reference output elements", value, limit });
    }
    let mut o = vec![0.0; n_out];
    let mut lse = vec![f64::NEG_INFINITY; b_n * h_n * l];
    let mut w = vec![0.0f64; parts.len()];
    for b in 0..b_n {
        for i in 0..l {
            for h in 0..h_n {
                let part_lse = |p: &HostState<'_, T>| p.lse[p.lse_layout.offset(b, h, i)] as f64;
                let m = parts.iter().map(part_lse).fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // no part saw a key: O = 0, LSE = -inf
                }
                for (ws, p) in w.iter_mut().zip(parts) {
                    *ws = (part_lse(p) - m).exp();
                }
                let sum: f64 = w.iter().sum();
                lse[(b * h_n + h) * l + i] = m + sum.ln();
                let row = &mut o[((b * l + i) * h_n + h) * d..][..d];
                for (&ws, p) in w.iter().zip(parts).filter(|(&ws, _)| ws > 0.0) {
                    for (dd, x) in row.iter_mut().enumerate() {
                        *x += ws / sum * Into::<f64>::into(p.o.data[p.o.layout.offset(b, i, h, dd)]);
                    }
                }
            }
        }
    }
    Ok(MergedReference { problem: m, o, lse })
}

/// One finished unit of work: its index, its outputs `[rows, D]` and LSEs.
type UnitResult = (usize, Vec<f64>, Vec<f64>);

/// Query rows per unit of work handed to a thread.
const ROWS_PER_UNIT: usize = 32;

/// Computes attention on the host in `f64`, on all available cores.
///
/// # Errors
/// The validation errors of the GPU path, and [`Error::SizeOverflow`] for a
/// problem beyond [`MAX_OUTPUT_ELEMENTS`] or [`MAX_WORK`] (or whose buffers
/// the host cannot allocate).
pub fn forward<T: Element>(
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    opts: &AttentionOptions,
) -> Result<Reference> {
    forward_of(T::DTYPE, q, k, v, opts)
}

/// [`forward`] on `f64` inputs: the same function with nothing rounded, for
/// derivative checks (central differences need inputs finer than 16 bits).
/// Validated as a bf16 problem would be; `problem.dtype` says bf16.
///
/// # Errors
/// As [`forward`].
pub fn forward_f64(
    q: HostTensor<'_, f64>,
    k: HostTensor<'_, f64>,
    v: HostTensor<'_, f64>,
    opts: &AttentionOptions,
) -> Result<Reference> {
    forward_of(DType::BF16, q, k, v, opts)
}

/// Host scalars the reference reads: the 16-bit element types, and f64.
pub(crate) trait Scalar: Copy + Into<f64> + Sync {}
impl<T: Element> Scalar for T {}
impl Scalar for f64 {}

fn forward_of<T: Scalar>(
    dtype: DType,
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    opts: &AttentionOptions,
) -> Result<Reference> {
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    let p = validate(dtype, &desc("q", &q), &desc("k", &k), &desc("v", &v), None, None, opts)?;
    let (b_n, lq, hq, d) = (p.batch, p.seqlen_q, p.heads_q, p.head_dim);
    let too_big = |what, value: u128, limit: u128| Error::SizeOverflow { arg: "q", what, value, limit };
    // Validation bounded every tensor's element count by i64::MAX: no overflow here.
    let n_out = b_n * lq * hq * d;
    if n_out > MAX_OUTPUT_ELEMENTS {
        return Err(too_big("reference output elements", n_out as u128, MAX_OUTPUT_ELEMENTS as u128));
    }
    let work = p.flops() / 4;
    if work > MAX_WORK {
        return Err(too_big("reference work (multiply-adds)", work, MAX_WORK));
    }
    let mods = HostModifiers::of(opts)?;
    let mut o = filled(n_out, 0.0)?;
    let mut lse = filled(b_n * hq * lq, f64::NEG_INFINITY)?;

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
                        let (b, h) = (bh / hq, bh % hq);
                        let m = mods.for_head(b, h, hq);
                        let (unit_o, unit_lse) = rows_for_head(&p, &q, &k, &v, b, h, m, rows);
                        done.push((u, unit_o, unit_lse));
                    }
                })
            })
            .collect();
        // A worker only panics on a bug of this module; pass it on as one.
        workers.into_iter().map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
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

/// Attention over a packed batch (DESIGN.md section 1b) on the host: `q`
/// `[1, Tq, Hq, D]`, `k` and `v` `[1, Tk, Hk, D]`, sequence `b` being rows
/// `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]` of Q and `cu_seqlens_k[b] ..`
/// of K and V (the first `seqused_k[b]` of them when given), each with its
/// own diagonal. Computed one sequence at a time with [`forward`], so a
/// packed batch equals its sequences run one by one.
///
/// The result's `o` is `[Tq, Hq, D]` and `lse` `[Hq, Tq]`, both contiguous;
/// `problem` is the packed problem (`batch` = sequences, lengths the longest).
///
/// # Errors
/// The validation errors of
/// [`Attention::forward_varlen_into`](crate::Attention::forward_varlen_into)
/// (the tables are checked as [`SeqLens::new`](crate::SeqLens::new) does),
/// and the limits of [`forward`] over the whole batch.
pub fn forward_varlen<T: Element>(
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    cu_seqlens_q: &[i32],
    cu_seqlens_k: &[i32],
    seqused_k: Option<&[i32]>,
    opts: &AttentionOptions,
) -> Result<Reference> {
    let info = check_seqlens(cu_seqlens_q, cu_seqlens_k, seqused_k)?;
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    let p = validate_varlen(T::DTYPE, &desc("q", &q), &desc("k", &k), &desc("v", &v), None, None, &info, opts)?;
    let (tq, hq, d) = (info.total_q, p.heads_q, p.head_dim);
    let n_out = tq * hq * d; // bounded by Q's validated element count
    if n_out > MAX_OUTPUT_ELEMENTS {
        let (value, limit) = (n_out as u128, MAX_OUTPUT_ELEMENTS as u128);
        return Err(Error::SizeOverflow { arg: "q", what: "reference output elements", value, limit });
    }
    let mut o = filled(n_out, 0.0)?;
    let mut lse = filled(hq * tq, f64::NEG_INFINITY)?;
    let mut work = 0u128;
    // One sequence's rows of a packed tensor: the same strides, `len` rows from `start`.
    fn rows<'a, T>(t: &HostTensor<'a, T>, start: usize, len: usize) -> HostTensor<'a, T> {
        let mut layout = t.layout;
        layout.shape[1] = len;
        // Validation bounded every offset inside the buffer.
        let data: &'a [T] = t.data;
        HostTensor::new(&data[(start * layout.strides[1]).min(data.len())..], layout)
    }
    for b in 0..info.batch {
        let (q0, q1) = (cu_seqlens_q[b] as usize, cu_seqlens_q[b + 1] as usize);
        let k0 = cu_seqlens_k[b] as usize;
        let lk = seqused_k.map_or(cu_seqlens_k[b + 1] as usize - k0, |u| u[b] as usize);
        let r = forward(rows(&q, q0, q1 - q0), rows(&k, k0, lk), rows(&v, k0, lk), &for_sequence(opts, b, hq))?;
        work += r.problem.flops() / 4;
        if work > MAX_WORK {
            return Err(Error::SizeOverflow {
                arg: "q",
                what: "reference work (multiply-adds)",
                value: work,
                limit: MAX_WORK,
            });
        }
        o[q0 * hq * d..q1 * hq * d].copy_from_slice(&r.o);
        for h in 0..hq {
            lse[h * tq + q0..h * tq + q1].copy_from_slice(&r.lse[h * (q1 - q0)..(h + 1) * (q1 - q0)]);
        }
    }
    Ok(Reference { problem: p, o, lse })
}

/// Attention over a KV cache (DESIGN.md section 1b) on the host: `q`
/// `[B, Lq, Hq, D]`; `k_cache`, `v_cache` dense `[B_c, L_max, Hk, D]` (with
/// `block_table` `None`) or pages `[num_pages, page_size, Hk, D]` (with
/// `block_table` `Some((table, pages_per_seq))`, page size the caches' second
/// extent). Each sequence's keys are gathered into a dense run and computed
/// with [`forward`], so a paged cache equals the dense cache it pages.
///
/// The result is laid out as [`forward`]'s: `o` `[B, Lq, Hq, D]`, `lse`
/// `[B, Hq, Lq]`.
///
/// # Errors
/// The validation errors of
/// [`Attention::forward_kvcache_into`](crate::Attention::forward_kvcache_into)
/// (the tables checked as [`CacheTables`](crate::CacheTables) does), and the
/// limits of [`forward`] over the whole batch.
pub fn forward_kvcache<T: Element>(
    q: HostTensor<'_, T>,
    k_cache: HostTensor<'_, T>,
    v_cache: HostTensor<'_, T>,
    cache_seqlens: &[i32],
    cache_batch_idx: Option<&[i32]>,
    block_table: Option<(&[i32], usize)>,
    opts: &AttentionOptions,
) -> Result<Reference> {
    let page_size = k_cache.layout.shape[1];
    let info = check_cache_tables(cache_seqlens, cache_batch_idx, block_table.map(|(t, n)| (t, n, page_size)))?;
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    let p = validate_kvcache(
        T::DTYPE,
        &desc("q", &q),
        &desc("k_cache", &k_cache),
        &desc("v_cache", &v_cache),
        None,
        None,
        &info,
        opts,
    )?;
    let (b_n, lq, hq, hk, d) = (p.batch, p.seqlen_q, p.heads_q, p.heads_kv, p.head_dim);
    let n_out = b_n * lq * hq * d; // bounded by Q's validated element count
    if n_out > MAX_OUTPUT_ELEMENTS {
        let (value, limit) = (n_out as u128, MAX_OUTPUT_ELEMENTS as u128);
        return Err(Error::SizeOverflow { arg: "q", what: "reference output elements", value, limit });
    }
    let mut o = filled(n_out, 0.0)?;
    let mut lse = filled(b_n * hq * lq, f64::NEG_INFINITY)?;
    let mut work = 0u128;
    for b in 0..b_n {
        let len = cache_seqlens[b] as usize;
        // Sequence b's keys and values, gathered into contiguous [1, len, Hk, D].
        let gather = |t: &HostTensor<'_, T>| -> Vec<T> {
            let mut out = Vec::with_capacity(len * hk * d);
            for j in 0..len {
                let (entry, row) = match block_table {
                    Some((table, per_seq)) => (table[b * per_seq + j / page_size] as usize, j % page_size),
                    None => (cache_batch_idx.map_or(b, |idx| idx[b] as usize), j),
                };
                for h in 0..hk {
                    let at = t.layout.offset(entry, row, h, 0);
                    out.extend_from_slice(&t.data[at..at + d]);
                }
            }
            out
        };
        let (kb, vb) = (gather(&k_cache), gather(&v_cache));
        let kl = Layout::bshd(1, len, hk, d);
        let mut ql = q.layout;
        ql.shape[0] = 1;
        let qb = HostTensor::new(&q.data[q.layout.offset(b, 0, 0, 0).min(q.data.len())..], ql);
        let r = forward(qb, HostTensor::new(&kb, kl), HostTensor::new(&vb, kl), &for_sequence(opts, b, hq))?;
        work += r.problem.flops() / 4;
        if work > MAX_WORK {
            return Err(Error::SizeOverflow {
                arg: "q",
                what: "reference work (multiply-adds)",
                value: work,
                limit: MAX_WORK,
            });
        }
        o[b * lq * hq * d..(b + 1) * lq * hq * d].copy_from_slice(&r.o);
        lse[b * hq * lq..(b + 1) * hq * lq].copy_from_slice(&r.lse);
    }
    Ok(Reference { problem: p, o, lse })
}

/// A vector of `n` copies of `x`, or an error instead of an abort when the
/// host cannot allocate it.
fn filled(n: usize, x: f64) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::SizeOverflow {
        arg: "q",
        what: "reference buffer bytes",
        value: n as u128 * 8,
        limit: isize::MAX as u128,
    })?;
    v.resize(n, x);
    Ok(v)
}

/// The score modifiers of a call as host values (validated: long enough, finite).
struct HostModifiers<'a> {
    alibi: Option<(&'a [f32], bool)>,
    sinks: Option<&'a [f32]>,
}

/// One query head's modifiers: its ALiBi slope and sink logit.
#[derive(Clone, Copy)]
struct HeadModifiers {
    slope: Option<f64>,
    sink: Option<f64>,
}

impl<'a> HostModifiers<'a> {
    fn of(opts: &AttentionOptions<'a>) -> Result<Self> {
        let host = |arg, v: HeadValues<'a>| match v {
            HeadValues::Host(s) => Ok(s),
            HeadValues::Device(_) | HeadValues::Raw(_) => Err(Error::InvalidOption {
                arg,
                value: "device memory".into(),
                reason: "the CPU reference reads host values (HeadValues::Host)",
            }),
        };
        Ok(HostModifiers {
            alibi: opts.alibi.map(|a| host("alibi_slopes", a.slopes).map(|s| (s, a.per_batch))).transpose()?,
            sinks: opts.sinks.map(|s| host("sinks", s)).transpose()?,
        })
    }

    fn for_head(&self, b: usize, h: usize, heads_q: usize) -> HeadModifiers {
        HeadModifiers {
            slope: self.alibi.map(|(s, per_batch)| s[if per_batch { b * heads_q + h } else { h }] as f64),
            sink: self.sinks.map(|s| s[h] as f64),
        }
    }
}

/// `opts` for sequence `b` of a batch computed one sequence at a time:
/// per-batch ALiBi slopes become that sequence's per-head ones.
fn for_sequence<'a>(opts: &AttentionOptions<'a>, b: usize, heads_q: usize) -> AttentionOptions<'a> {
    let mut o = *opts;
    if let Some(Alibi { slopes: HeadValues::Host(s), per_batch: true }) = opts.alibi {
        // Validated: s holds at least B·Hq slopes.
        o.alibi = Some(Alibi::per_head(HeadValues::Host(&s[b * heads_q..(b + 1) * heads_q])));
    }
    o
}

/// The ALiBi bias `−slope·|i + off − j|` of query `i` and key `j` (DESIGN.md
/// section 1b), `off` the problem's diagonal offset.
pub fn alibi_bias(p: &Problem, slope: f64, i: usize, j: usize) -> f64 {
    -slope * (i as f64 + p.diag_offset() as f64 - j as f64).abs()
}

/// Rows `rows` of query head `h` in batch `b`: outputs `[rows, D]` and LSEs.
#[allow(clippy::too_many_arguments)]
fn rows_for_head<T: Scalar>(
    p: &Problem,
    q: &HostTensor<'_, T>,
    k: &HostTensor<'_, T>,
    v: &HostTensor<'_, T>,
    b: usize,
    h: usize,
    mods: HeadModifiers,
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
            let bias = mods.slope.map_or(0.0, |m| alibi_bias(p, m, i, j));
            scores.push(capped_score(p, dot) + bias);
        }
        let mut acc = vec![0.0f64; d];
        if scores.is_empty() {
            // No visible key: O = 0, and LSE the sink's logit if there is one.
            lses.push(mods.sink.unwrap_or(f64::NEG_INFINITY));
        } else {
            // A sink is one more term of the denominator, with no value.
            let m = scores.iter().copied().fold(mods.sink.unwrap_or(f64::NEG_INFINITY), f64::max);
            let mut l = mods.sink.map_or(0.0, |x| (x - m).exp());
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
///
/// # Errors
/// [`Error::ShapeMismatch`] naming `a` when the lengths differ.
pub fn rel_l2_error(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() {
        return Err(Error::ShapeMismatch { arg: "a", dim: "len", expected: b.len(), got: a.len(), against: "b" });
    }
    Ok(rel_l2(a, b))
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
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

/// The reference result of additive attention ([`additive_forward`]).
#[derive(Debug, Clone)]
pub struct AdditiveReference {
    /// The validated problem.
    pub problem: crate::validate::AdditiveProblem,
    /// Output, contiguous `[B, Lq, H, Dv]`.
    pub o: Vec<f64>,
    /// Log-sum-exp, contiguous `[B, H, Lq]` (`-inf` for rows with no visible key).
    pub lse: Vec<f64>,
}

/// Additive (Bahdanau) attention on the host in `f64` (DESIGN.md section 1b):
/// `s_ij = Σ_d w_{h,d} · tanh(q'_{i,d} + k'_{j,d} + b_{h,d})`, then the mask
/// of `opts` (either alignment, windows), softmax, `O = P·V` and the LSE;
/// rows with no visible key give `O = 0`, `LSE = −∞`. The same validation as
/// [`Attention::additive_forward_into`](crate::Attention::additive_forward_into).
///
/// `q_proj` is Q' `[B, Lq, H, Da]`, `k_proj` K' `[B, Lk, H, Da]`, `v`
/// `[B, Lk, H, Dv]`; `w` and `bias` are `[H, Da]` row-major.
///
/// # Projecting
/// Additive attention scores `v_a · tanh(W_q q_i + U_k k_j + b)`; the two
/// projections are ordinary GEMMs that the caller runs before this call,
/// one each, with any BLAS, cuBLAS or framework matmul:
/// - `Q' = Q · W_q`: Q viewed as a `[B·Lq, Dq]` matrix times `W_q`
///   `[Dq, H·Da]` gives `[B·Lq, H·Da]`, which *is* Q' `[B, Lq, H, Da]` in BSHD
///   layout (`Layout::bshd(B, Lq, H, Da)`), no copy.
/// - `K' = K · U_k` likewise, `[B·Lk, Dk] × [Dk, H·Da]`. In a decoder
///   attending to a fixed encoder output, K' (and V) depend only on that
///   output: compute them once per sequence and reuse them at every decoder
///   step; only Q' (one row per step) is new.
/// - `w` is the `[H, Da]` score vector (`v_a` of the paper per head) and
///   `bias` its optional `b`; a bias folded into either projection is the same
///   function (`b` is added inside the tanh).
///
/// # Errors
/// The errors of [`validate_additive`](crate::internals::validate_additive)
/// (argument names `q_proj`, `k_proj`, `v`, `w`, `bias`), and
/// [`Error::SizeOverflow`] beyond [`MAX_OUTPUT_ELEMENTS`] or [`MAX_WORK`].
pub fn additive_forward<T: Element>(
    q_proj: HostTensor<'_, T>,
    k_proj: HostTensor<'_, T>,
    v: HostTensor<'_, T>,
    w: &[T],
    bias: Option<&[T]>,
    opts: &AttentionOptions,
) -> Result<AdditiveReference> {
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    let p = crate::validate::validate_additive(
        T::DTYPE,
        &desc("q_proj", &q_proj),
        &desc("k_proj", &k_proj),
        &desc("v", &v),
        w.len(),
        bias.map(<[T]>::len),
        None,
        None,
        opts,
    )?;
    let (b_n, lq, h_n, da, dv) = (p.batch, p.seqlen_q, p.heads, p.dim_a, p.dim_v);
    let too_big = |what, value: u128, limit: u128| Error::SizeOverflow { arg: "q_proj", what, value, limit };
    // Validation bounded every tensor's element count by i64::MAX: no overflow here.
    let n_out = b_n * lq * h_n * dv;
    if n_out > MAX_OUTPUT_ELEMENTS {
        return Err(too_big("reference output elements", n_out as u128, MAX_OUTPUT_ELEMENTS as u128));
    }
    let band = p.band();
    let work = b_n as u128 * h_n as u128 * band.visible_pairs() * (da + dv) as u128;
    if work > MAX_WORK {
        return Err(too_big("reference work (tanh and multiply-adds)", work, MAX_WORK));
    }
    let mut o = filled(n_out, 0.0)?;
    let mut lse = filled(b_n * h_n * lq, f64::NEG_INFINITY)?;
    let f = |x: T| -> f64 { x.into() };

    // One unit per (batch, head), pulled off a counter by the threads.
    let units = b_n * h_n;
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(units.max(1));
    let results: Vec<Vec<UnitResult>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    let (mut qb, mut scores) = (vec![0.0f64; da], Vec::new());
                    loop {
                        let u = next.fetch_add(1, Ordering::Relaxed);
                        if u >= units {
                            break done;
                        }
                        let (b, h) = (u / h_n, u % h_n);
                        let wh: Vec<f64> = w[h * da..(h + 1) * da].iter().map(|&x| f(x)).collect();
                        let (mut unit_o, mut unit_lse) = (vec![0.0f64; lq * dv], vec![f64::NEG_INFINITY; lq]);
                        for i in 0..lq {
                            for (d, x) in qb.iter_mut().enumerate() {
                                *x = f(q_proj.data[q_proj.layout.offset(b, i, h, d)])
                                    + bias.map_or(0.0, |bs| f(bs[h * da + d]));
                            }
                            let (lo, hi) = band.key_range(i);
                            scores.clear();
                            for j in lo..hi {
                                let base = k_proj.layout.offset(b, j, h, 0);
                                let kj = &k_proj.data[base..base + da];
                                scores.push(qb.iter().zip(kj).zip(&wh).map(|((q, &k), w)| w * (q + f(k)).tanh()).sum());
                            }
                            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            if m == f64::NEG_INFINITY {
                                continue; // no visible key: O = 0, LSE = -inf
                            }
                            let row = &mut unit_o[i * dv..(i + 1) * dv];
                            let mut l = 0.0;
                            for (j, s) in (lo..hi).zip(&scores) {
                                let pj = (s - m).exp();
                                l += pj;
                                let base = v.layout.offset(b, j, h, 0);
                                for (a, &x) in row.iter_mut().zip(&v.data[base..base + dv]) {
                                    *a += pj * f(x);
                                }
                            }
                            row.iter_mut().for_each(|a| *a /= l);
                            unit_lse[i] = m + l.ln();
                        }
                        done.push((u, unit_o, unit_lse));
                    }
                })
            })
            .collect();
        // A worker only panics on a bug of this module; pass it on as one.
        workers.into_iter().map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    for (u, unit_o, unit_lse) in results.into_iter().flatten() {
        let (b, h) = (u / h_n, u % h_n);
        for (i, (orow, l)) in unit_o.chunks_exact(dv).zip(unit_lse).enumerate() {
            let at = ((b * lq + i) * h_n + h) * dv;
            o[at..at + dv].copy_from_slice(orow);
            lse[(b * h_n + h) * lq + i] = l;
        }
    }
    Ok(AdditiveReference { problem: p, o, lse })
}

/// Attention maps on the host ([`attention_maps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MapsReference {
    /// The validated call.
    pub problem: MapsProblem,
    /// Per-head maps, contiguous `[B, H, Lq, Lk]`: map head `n` shows query
    /// head `problem.query_head(n)` (`H = problem.map_heads()`).
    pub maps: Vec<f64>,
    /// The mean over every query head, contiguous `[B, Lq, Lk]`.
    pub mean: Vec<f64>,
    /// Log-sum-exp, contiguous `[B, Hq, Lq]` (`-inf` for empty rows).
    pub lse: Vec<f64>,
}

/// Attention maps (DESIGN.md section 1b) in `f64`: `P_ij = exp(s_ij − LSE_i)`
/// with the scores and LSE of [`forward`] (scale, softcap, mask and
/// alignment, GQA, ALiBi; a sink enters through the LSE, so that rows sum
/// to `1 − e^{σ_h − LSE_i}`), for every query head (`heads: None`) or the
/// listed ones, and the mean over every query head. Masked entries are
/// exactly 0, a row with no visible key all 0. Modifiers are read as host
/// values ([`HeadValues::Host`]). The same validation as
/// [`Attention::attention_maps_into`](crate::Attention::attention_maps_into)
/// (without an LSE input: it finds its own).
///
/// # Errors
/// The errors of [`validate_maps`] for Q,
/// K, the head list and the options, [`Error::InvalidOption`] for
/// modifiers in device memory, and [`Error::SizeOverflow`] beyond
/// [`MAX_OUTPUT_ELEMENTS`] (`B·Hq·Lq·Lk`) or [`MAX_WORK`].
pub fn attention_maps<T: Element>(
    q: HostTensor<'_, T>,
    k: HostTensor<'_, T>,
    heads: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<MapsReference> {
    let desc = |arg, t: &HostTensor<'_, T>| TensorDesc { arg, layout: t.layout, len: t.data.len() };
    let ([b_n, lq, hq, _], lk) = (q.layout.shape, k.layout.shape[1]);
    let map = |arg, h| {
        let layout = MapLayout::contiguous(b_n, h, lq, lk);
        MapDesc { arg, layout, len: layout.span().unwrap_or(usize::MAX) }
    };
    let (maps_desc, mean_desc) = (map("maps", heads.map_or(hq, <[usize]>::len)), map("mean", 1));
    let m = validate_maps(
        T::DTYPE,
        None,
        &desc("q", &q),
        &desc("k", &k),
        None,
        Some(&maps_desc),
        heads,
        Some(&mean_desc),
        opts,
    )?;
    let p = m.problem;
    let too_big = |what, value: u128, limit: u128| Error::SizeOverflow { arg: "q", what, value, limit };
    let all = [p.batch, p.heads_q, p.seqlen_q, p.seqlen_k].iter().try_fold(1u128, |a, &x| a.checked_mul(x as u128));
    let all = all.unwrap_or(u128::MAX);
    if all > MAX_OUTPUT_ELEMENTS as u128 {
        return Err(too_big("reference map elements", all, MAX_OUTPUT_ELEMENTS as u128));
    }
    let work = p.flops() / 4;
    if work > MAX_WORK {
        return Err(too_big("reference work (multiply-adds)", work, MAX_WORK));
    }
    let (hk_of, d, hsel) = (p.q_per_kv(), p.head_dim, m.map_heads());
    // Which map head shows query head h.
    let slot = |h: usize| (0..hsel).find(|&n| m.query_head(n) == h);
    let mut maps = filled(p.batch * hsel * lq * lk, 0.0)?;
    let mut mean = filled(p.batch * lq * lk, 0.0)?;
    let mut lse = filled(p.batch * hq * lq, f64::NEG_INFINITY)?;
    let mods = HostModifiers::of(opts)?;
    let mut scores = Vec::new();
    let mut qi = vec![0.0f64; d];
    for b in 0..p.batch {
        for h in 0..hq {
            let hm = mods.for_head(b, h, hq);
            for i in 0..lq {
                for (c, x) in qi.iter_mut().enumerate() {
                    *x = q.data[q.layout.offset(b, i, h, c)].into();
                }
                let (lo, hi) = p.key_range(i);
                scores.clear();
                for j in lo..hi {
                    let base = k.layout.offset(b, j, h / hk_of, 0);
                    let dot: f64 = qi.iter().zip(&k.data[base..base + d]).map(|(a, &kv)| a * kv.into()).sum();
                    scores.push(capped_score(&p, dot) + hm.slope.map_or(0.0, |s| alibi_bias(&p, s, i, j)));
                }
                // The forward's LSE: a sink is one more term with no value.
                let sink = hm.sink.unwrap_or(f64::NEG_INFINITY);
                let mx = scores.iter().copied().fold(sink, f64::max);
                if scores.is_empty() {
                    lse[(b * hq + h) * lq + i] = sink;
                    continue; // no visible key: the row all 0
                }
                let sum = hm.sink.map_or(0.0, |x| (x - mx).exp()) + scores.iter().map(|s| (s - mx).exp()).sum::<f64>();
                let l = mx + sum.ln();
                lse[(b * hq + h) * lq + i] = l;
                let row = ((b * lq) + i) * lk;
                for (j, s) in (lo..hi).zip(&scores) {
                    let w = (s - l).exp();
                    mean[row + j] += w / hq as f64;
                    if let Some(n) = slot(h) {
                        maps[((b * hsel + n) * lq + i) * lk + j] = w;
                    }
                }
            }
        }
    }
    Ok(MapsReference { problem: m, maps, mean, lse })
}
