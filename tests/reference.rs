//! CPU tier: the reference against a deliberately naive implementation that
//! builds the dense mask matrix, plus the properties of DESIGN.md section 4.

use fused_attn::reference::{self, rel_l2_error, Reference};
use fused_attn::{Alibi, AttentionOptions, Error, HeadValues, HostTensor, Layout, Mask, MaskAlignment};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random<T: fused_attn::Element>(rng: &mut StdRng, n: usize, amp: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.random_range(-amp..amp))).collect()
}

struct Case {
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
}

/// The contract written as plainly as possible: a dense boolean mask from the
/// inequality of DESIGN.md section 1, dense scores, softmax per row.
fn dense<T: fused_attn::Element>(
    c: &Case,
    q: &HostTensor<T>,
    k: &HostTensor<T>,
    v: &HostTensor<T>,
    opts: &AttentionOptions,
) -> (Vec<f64>, Vec<f64>) {
    // The scale is an f32 option (as the kernels take it), so round the default the same way.
    let scale = opts.scale.unwrap_or(1.0 / (c.d as f32).sqrt()) as f64;
    let (left, right) = opts.mask.bounds();
    let off = match opts.alignment {
        MaskAlignment::TopLeft => 0,
        _ => c.lk as i64 - c.lq as i64,
    };
    let visible = |i: usize, j: usize| {
        let (i, j) = (i as i64, j as i64);
        left.is_none_or(|l| j >= i + off - l as i64) && right.is_none_or(|r| j <= i + off + r as i64)
    };
    let mut o = vec![0.0; c.b * c.lq * c.hq * c.d];
    let mut lse = vec![0.0; c.b * c.hq * c.lq];
    let f = |x: T| -> f64 { x.into() };
    for b in 0..c.b {
        for h in 0..c.hq {
            let hk = h / (c.hq / c.hk);
            for i in 0..c.lq {
                let mut s = vec![f64::NEG_INFINITY; c.lk];
                for (j, sj) in s.iter_mut().enumerate() {
                    if visible(i, j) {
                        let mut dot = 0.0;
                        for x in 0..c.d {
                            dot += f(q.data[q.layout.offset(b, i, h, x)]) * f(k.data[k.layout.offset(b, j, hk, x)]);
                        }
                        let mut val = scale * dot;
                        if let Some(cap) = opts.softcap {
                            val = cap as f64 * (val / cap as f64).tanh();
                        }
                        if let Some(Alibi { slopes: HeadValues::Host(m), per_batch }) = opts.alibi {
                            let m = m[if per_batch { b * c.hq + h } else { h }] as f64;
                            val -= m * (i as i64 + off - j as i64).abs() as f64;
                        }
                        *sj = val;
                    }
                }
                // A sink: one more term in the denominator, with no value.
                let sink = match opts.sinks {
                    Some(HeadValues::Host(x)) => x[h] as f64,
                    _ => f64::NEG_INFINITY,
                };
                let m = s.iter().copied().fold(sink, f64::max);
                let li = (b * c.hq + h) * c.lq + i;
                if m == f64::NEG_INFINITY {
                    lse[li] = f64::NEG_INFINITY;
                    continue;
                }
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = w.iter().sum::<f64>() + (sink - m).exp();
                lse[li] = m + l.ln();
                for x in 0..c.d {
                    let acc: f64 = (0..c.lk).map(|j| w[j] * f(v.data[v.layout.offset(b, j, hk, x)])).sum();
                    o[((b * c.lq + i) * c.hq + h) * c.d + x] = acc / l;
                }
            }
        }
    }
    (o, lse)
}

fn run_case<T: fused_attn::Element>(seed: u64, c: Case, opts: AttentionOptions, bhsd: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lay = |l, h| {
        if bhsd {
            Layout::bhsd(c.b, h, l, c.d)
        } else {
            Layout::bshd(c.b, l, h, c.d)
        }
    };
    let (ql, kl) = (lay(c.lq, c.hq), lay(c.lk, c.hk));
    let qd = random::<T>(&mut rng, ql.numel().unwrap(), 2.0);
    let kd = random::<T>(&mut rng, kl.numel().unwrap(), 2.0);
    let vd = random::<T>(&mut rng, kl.numel().unwrap(), 1.0);
    let (q, k, v) = (HostTensor::new(&qd, ql), HostTensor::new(&kd, kl), HostTensor::new(&vd, kl));
    let r = reference::forward(q, k, v, &opts).unwrap();
    let (o, lse) = dense(&c, &q, &k, &v, &opts);
    let eo = rel_l2_error(&r.o, &o).unwrap();
    let el = rel_l2_error(&r.lse, &lse).unwrap();
    assert!(eo < 1e-12 && el < 1e-12, "seed {seed} {opts:?}: o err {eo}, lse err {el}");
}

#[test]
fn reference_matches_dense_mask_implementation() {
    let masks = [
        Mask::Full,
        Mask::Causal,
        Mask::Window { left: 3, right: 0 },
        Mask::Window { left: 2, right: 4 },
        Mask::Window { left: 0, right: 0 },
        Mask::Window { left: 100, right: 100 },
    ];
    let shapes =
        [(1, 7, 7, 2, 2, 8), (2, 5, 13, 4, 2, 16), (1, 13, 5, 3, 1, 8), (2, 1, 9, 4, 4, 24), (1, 33, 40, 2, 1, 8)];
    let mut seed = 0;
    for &(b, lq, lk, hq, hk, d) in &shapes {
        for mask in masks {
            for softcap in [None, Some(5.0f32)] {
                seed += 1;
                let mut opts = AttentionOptions::new(mask);
                if let Some(c) = softcap {
                    opts = opts.with_softcap(c);
                }
                if seed % 4 == 1 {
                    opts = opts.with_alignment(MaskAlignment::TopLeft);
                }
                run_case::<bf16>(seed, Case { b, lq, lk, hq, hk, d }, opts, seed % 2 == 0);
                run_case::<f16>(seed + 1000, Case { b, lq, lk, hq, hk, d }, opts.with_scale(0.3), seed % 3 == 0);
                // The score modifiers on the same cases: ALiBi per head and
                // per batch entry, sinks, both.
                let slopes: Vec<f32> = (0..b * hq).map(|x| 0.05 + 0.37 * x as f32).collect();
                let sinks: Vec<f32> = (0..hq).map(|x| [2.5f32, -1.0, 0.0, 9.0][x % 4]).collect();
                let (per_head, per_batch) =
                    (Alibi::per_head(HeadValues::Host(&slopes[..hq])), Alibi::per_batch(HeadValues::Host(&slopes)));
                let c = || Case { b, lq, lk, hq, hk, d };
                run_case::<bf16>(seed + 2000, c(), opts.with_alibi(per_head), seed % 2 == 1);
                run_case::<bf16>(seed + 3000, c(), opts.with_alibi(per_batch), false);
                run_case::<f16>(seed + 4000, c(), opts.with_sinks(HeadValues::Host(&sinks)), seed % 2 == 0);
                run_case::<f16>(
                    seed + 5000,
                    c(),
                    opts.with_alibi(per_batch).with_sinks(HeadValues::Host(&sinks)),
                    true,
                );
            }
        }
    }
}

fn problem(
    seed: u64,
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>, Layout, Layout) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (ql, kl) = (Layout::bshd(b, lq, hq, d), Layout::bshd(b, lk, hk, d));
    (
        random(&mut rng, ql.numel().unwrap(), 2.0),
        random(&mut rng, kl.numel().unwrap(), 2.0),
        random(&mut rng, kl.numel().unwrap(), 1.0),
        ql,
        kl,
    )
}

fn run(q: &[bf16], k: &[bf16], v: &[bf16], ql: Layout, kl: Layout, opts: AttentionOptions) -> Reference {
    reference::forward(HostTensor::new(q, ql), HostTensor::new(k, kl), HostTensor::new(v, kl), &opts).unwrap()
}

#[test]
fn softmax_rows_sum_to_one() {
    // With V = all ones, each visible row's output is Σ softmax = 1 exactly in f64.
    let (q, k, _, ql, kl) = problem(1, 2, 9, 17, 4, 2, 16);
    let ones = vec![bf16::ONE; kl.numel().unwrap()];
    for mask in [Mask::Full, Mask::Causal, Mask::Window { left: 2, right: 1 }] {
        let r = run(&q, &k, &ones, ql, kl, AttentionOptions::new(mask));
        for (row, lse) in r.o.chunks(16).zip(r.lse.iter().cycle()) {
            let _ = lse;
            assert!(row.iter().all(|x| (x - 1.0).abs() < 1e-12), "{mask:?}: {row:?}");
        }
    }
}

#[test]
fn causal_equals_unbounded_left_window() {
    let (q, k, v, ql, kl) = problem(2, 1, 11, 19, 2, 2, 8);
    let a = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal));
    let b = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Window { left: usize::MAX, right: 0 }));
    assert_eq!(a.o, b.o);
    assert_eq!(a.lse, b.lse);
}

#[test]
fn gqa_equals_mha_with_repeated_kv() {
    let (hq, hk, lk, d) = (6, 2, 10, 8);
    let (q, k, v, ql, kl) = problem(3, 2, 7, lk, hq, hk, d);
    let group = hq / hk;
    let rep = |x: &[bf16]| -> Vec<bf16> {
        let mut out = Vec::with_capacity(x.len() * group);
        for b in 0..2 {
            for j in 0..lk {
                for h in 0..hq {
                    let at = kl.offset(b, j, h / group, 0);
                    out.extend_from_slice(&x[at..at + d]);
                }
            }
        }
        out
    };
    let (k2, v2) = (rep(&k), rep(&v));
    let kl2 = Layout::bshd(2, lk, hq, d);
    for mask in [Mask::Full, Mask::Causal] {
        let a = run(&q, &k, &v, ql, kl, AttentionOptions::new(mask));
        let b = run(&q, &k2, &v2, ql, kl2, AttentionOptions::new(mask));
        assert_eq!(a.o, b.o);
        assert_eq!(a.lse, b.lse);
    }
}

#[test]
fn bottom_right_alignment_when_lq_differs_from_lk() {
    // Lq = 1 (decoding): causal must see every key, i.e. equal Full.
    let (q, k, v, ql, kl) = problem(4, 1, 1, 37, 2, 2, 8);
    let a = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal));
    let b = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Full));
    assert_eq!(a.o, b.o);
    // Lq = 8 > Lk = 3, causal: rows 0..5 see nothing (0 and -inf), the last 3 see 1, 2, 3 keys.
    let (q, k, v, ql, kl) = problem(5, 1, 8, 3, 1, 1, 8);
    let r = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal));
    for i in 0..5 {
        assert_eq!(r.lse[i], f64::NEG_INFINITY);
        assert!(r.o[i * 8..(i + 1) * 8].iter().all(|&x| x == 0.0));
    }
    for i in 5..8 {
        assert!(r.lse[i].is_finite());
    }
    // Row 5 sees exactly key 0, so its output is v[0].
    let v0: Vec<f64> = v[..8].iter().map(|&x| x.into()).collect();
    assert_eq!(&r.o[40..48], &v0[..]);
    assert_eq!(r.problem.key_range(7), (0, 3));
}

#[test]
fn empty_rows_and_empty_sequences() {
    // A window that lies entirely right of the keys for early rows.
    let (q, k, v, ql, kl) = problem(6, 1, 6, 6, 1, 1, 8);
    let r = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Window { left: 0, right: 0 }));
    assert!(r.lse.iter().all(|x| x.is_finite()), "diagonal-only rows each see one key");
    // Lk = 0: every row empty.
    let (q, k, v, ql, kl) = problem(7, 2, 4, 0, 2, 2, 8);
    let r = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Full));
    assert!(r.lse.iter().all(|&x| x == f64::NEG_INFINITY));
    assert!(r.o.iter().all(|&x| x == 0.0));
    // Lq = 0: nothing to compute, not an error.
    let (q, k, v, ql, kl) = problem(8, 2, 0, 5, 2, 2, 8);
    let r = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal));
    assert!(r.o.is_empty() && r.lse.is_empty());
}

#[test]
fn huge_logits_stay_finite() {
    let (b, l, h, d) = (1, 16, 1, 32);
    let ql = Layout::bshd(b, l, h, d);
    let big: Vec<bf16> =
        (0..ql.numel().unwrap()).map(|i| bf16::from_f32(if i % 3 == 0 { 3.0e4 } else { -2.0e4 })).collect();
    let r = run(&big, &big, &big, ql, ql, AttentionOptions::new(Mask::Causal));
    assert!(r.o.iter().all(|x| x.is_finite()));
    assert!(r.lse.iter().all(|x| x.is_finite()));
}

#[test]
fn flops_count_visible_pairs_exactly() {
    let (q, k, v, ql, kl) = problem(9, 2, 10, 10, 4, 4, 8);
    let full = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Full)).problem;
    assert_eq!(full.visible_pairs(), 100);
    assert_eq!(full.flops(), 4 * 2 * 4 * 8 * 100);
    let causal = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal)).problem;
    assert_eq!(causal.visible_pairs(), 55);
    let win = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Window { left: 2, right: 0 })).problem;
    assert_eq!(win.visible_pairs(), 1 + 2 + 8 * 3);
}

#[test]
fn rel_l2_error_semantics() {
    let e = |a: &[f64], b: &[f64]| rel_l2_error(a, b).unwrap();
    assert_eq!(e(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((e(&[1.1, 2.0], &[1.0, 2.0]) - 0.1 / 5f64.sqrt()).abs() < 1e-12);
    assert_eq!(e(&[f64::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(e(&[f64::NEG_INFINITY, 1.0], &[f64::NEG_INFINITY, 1.0]), 0.0);
    assert_eq!(e(&[0.0, 1.0], &[f64::NEG_INFINITY, 1.0]), f64::INFINITY);
    // Different lengths are an error naming the argument, not a panic.
    assert!(matches!(rel_l2_error(&[1.0], &[1.0, 2.0]), Err(Error::ShapeMismatch { arg: "a", .. })));
}

#[test]
fn top_left_causal_matches_pytorch_is_causal() {
    // SDPA's is_causal: query i sees keys 0..=i, whatever Lq and Lk are.
    for (lq, lk) in [(5, 9), (9, 5), (7, 7)] {
        let (q, k, v, ql, kl) = problem(11, 1, lq, lk, 2, 1, 8);
        let opts = AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft);
        let p = run(&q, &k, &v, ql, kl, opts).problem;
        for i in 0..lq {
            assert_eq!(p.key_range(i), (0, (i + 1).min(lk)), "Lq {lq} Lk {lk} row {i}");
        }
        let bottom = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal)).problem;
        assert_eq!(bottom.key_range(lq - 1), (0, lk), "bottom-right: the last query sees every key");
    }
}

#[test]
fn reference_is_parallel_and_deterministic() {
    let (q, k, v, ql, kl) = problem(10, 2, 300, 300, 4, 2, 32);
    let a = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal));
    let b = run(&q, &k, &v, ql, kl, AttentionOptions::new(Mask::Causal));
    assert_eq!(a.o, b.o);
}

#[test]
fn a_bhsd_tensor_gives_the_result_of_its_bshd_copy() {
    // A PyTorch SDPA / candle attention tensor is [B, H, S, D]: described by
    // its own dims and strides (from_bhsd_dims) or by Layout::bhsd in that
    // argument order, it must give exactly what its BSHD copy gives.
    let (b, h, s, d) = (2, 3, 7, 16);
    let mut rng = StdRng::seed_from_u64(12);
    let bhsd: Vec<bf16> = random(&mut rng, b * h * s * d, 2.0);
    let bhsd_layout = Layout::bhsd(b, h, s, d);
    let candle = Layout::from_bhsd_dims(&[b, h, s, d], &[h * s * d, s * d, d, 1]).unwrap();
    assert_eq!(candle, bhsd_layout);
    let bshd_layout = Layout::bshd(b, s, h, d);
    let mut bshd = vec![bf16::ZERO; b * s * h * d];
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                for x in 0..d {
                    bshd[bshd_layout.offset(bi, si, hi, x)] = bhsd[((bi * h + hi) * s + si) * d + x];
                }
            }
        }
    }
    let opts = AttentionOptions::new(Mask::Causal);
    let a = run(&bhsd, &bhsd, &bhsd, bhsd_layout, bhsd_layout, opts);
    let c = run(&bshd, &bshd, &bshd, bshd_layout, bshd_layout, opts);
    assert_eq!(a.o, c.o);
    assert_eq!(a.lse, c.lse);
    assert_eq!((a.problem.seqlen_q, a.problem.heads_q), (s, h));
}
