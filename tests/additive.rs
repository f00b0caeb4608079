//! CPU tier for additive (Bahdanau) attention (DESIGN.md section 1b): the
//! reference against a naive dense-mask formulation (masks in both
//! alignments, windows, `Lq != Lk`, BSHD and BHSD strides), properties that
//! can fail (w = 0 is the mean of the visible values; a bias equals shifting
//! Q'; a one-key window returns that key's value; key order does not
//! matter), rows with no visible key, and every validation error.

use fused_attn::internals::{validate_additive, LseDesc, TensorDesc};
use fused_attn::reference::{self, rel_l2_error};
use fused_attn::{AttentionOptions, DType, Error, HostTensor, Layout, LseLayout, Mask, MaskAlignment};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f16> {
    (0..n).map(|_| f16::from_f32(rng.random_range(-scale..scale))).collect()
}

/// Shapes of one case: B, Lq, Lk, H, Da, Dv.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    lq: usize,
    lk: usize,
    h: usize,
    da: usize,
    dv: usize,
}

struct Inputs {
    q: Vec<f16>,
    k: Vec<f16>,
    v: Vec<f16>,
    w: Vec<f16>,
    bias: Vec<f16>,
    ql: Layout,
    kl: Layout,
    vl: Layout,
}

/// Random inputs; `bhsd` puts Q' and V in BHSD order (K' stays BSHD).
fn inputs(rng: &mut StdRng, d: Dims, bhsd: bool) -> Inputs {
    let layout = |l, dim| if bhsd { Layout::bhsd(d.b, d.h, l, dim) } else { Layout::bshd(d.b, l, d.h, dim) };
    let (ql, kl, vl) = (layout(d.lq, d.da), Layout::bshd(d.b, d.lk, d.h, d.da), layout(d.lk, d.dv));
    Inputs {
        q: random(rng, ql.span().unwrap(), 1.5),
        k: random(rng, kl.span().unwrap(), 1.5),
        v: random(rng, vl.span().unwrap(), 1.0),
        w: random(rng, d.h * d.da, 0.6),
        bias: random(rng, d.h * d.da, 0.5),
        ql,
        kl,
        vl,
    }
}

fn run(x: &Inputs, bias: bool, opts: &AttentionOptions) -> reference::AdditiveReference {
    reference::additive_forward(
        HostTensor::new(&x.q, x.ql),
        HostTensor::new(&x.k, x.kl),
        HostTensor::new(&x.v, x.vl),
        &x.w,
        bias.then_some(&x.bias[..]),
        opts,
    )
    .unwrap()
}

/// The definition, written out: all Lq × Lk scores, then a dense mask.
fn naive(x: &Inputs, d: Dims, bias: bool, opts: &AttentionOptions) -> (Vec<f64>, Vec<f64>) {
    let f = |h: f16| h.to_f64();
    let off = match opts.alignment {
        MaskAlignment::TopLeft => 0i64,
        _ => d.lk as i64 - d.lq as i64,
    };
    let (left, right) = opts.mask.bounds();
    let visible = |i: usize, j: usize| {
        let (i, j) = (i as i64 + off, j as i64);
        left.is_none_or(|l| j >= i - l as i64) && right.is_none_or(|r| j <= i + r as i64)
    };
    let mut o = vec![0.0; d.b * d.lq * d.h * d.dv];
    let mut lse = vec![f64::NEG_INFINITY; d.b * d.h * d.lq];
    for b in 0..d.b {
        for h in 0..d.h {
            for i in 0..d.lq {
                let s: Vec<f64> = (0..d.lk)
                    .map(|j| {
                        (0..d.da)
                            .map(|c| {
                                let bb = if bias { f(x.bias[h * d.da + c]) } else { 0.0 };
                                let arg = f(x.q[x.ql.offset(b, i, h, c)]) + f(x.k[x.kl.offset(b, j, h, c)]) + bb;
                                f(x.w[h * d.da + c]) * arg.tanh()
                            })
                            .sum()
                    })
                    .collect();
                let m = (0..d.lk).filter(|&j| visible(i, j)).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let p: Vec<f64> = (0..d.lk).map(|j| if visible(i, j) { (s[j] - m).exp() } else { 0.0 }).collect();
                let l: f64 = p.iter().sum();
                lse[(b * d.h + h) * d.lq + i] = m + l.ln();
                for c in 0..d.dv {
                    o[((b * d.lq + i) * d.h + h) * d.dv + c] =
                        (0..d.lk).map(|j| p[j] * f(x.v[x.vl.offset(b, j, h, c)])).sum::<f64>() / l;
                }
            }
        }
    }
    (o, lse)
}

#[test]
fn matches_the_dense_formulation_for_every_mask_and_alignment() {
    let mut rng = StdRng::seed_from_u64(1);
    let masks = [Mask::Full, Mask::Causal, Mask::window(3, 1), Mask::window(0, 4), Mask::window(2, 0)];
    let shapes = [(5, 9), (9, 5), (7, 7), (1, 13)];
    let mut n = 0;
    for (si, &(lq, lk)) in shapes.iter().enumerate() {
        let d = Dims { b: 2, lq, lk, h: 2, da: 16, dv: 24 };
        let x = inputs(&mut rng, d, si % 2 == 1);
        for mask in masks {
            for alignment in [MaskAlignment::BottomRight, MaskAlignment::TopLeft] {
                let bias = n % 2 == 0;
                n += 1;
                let opts = AttentionOptions::new(mask).with_alignment(alignment);
                let r = run(&x, bias, &opts);
                let (o, lse) = naive(&x, d, bias, &opts);
                let (eo, el) = (rel_l2_error(&r.o, &o).unwrap(), rel_l2_error(&r.lse, &lse).unwrap());
                assert!(eo < 1e-12 && el < 1e-12, "{mask} {alignment:?} Lq {lq} Lk {lk}: o {eo:e} lse {el:e}");
            }
        }
    }
}

#[test]
fn zero_weights_give_the_mean_of_the_visible_values() {
    let mut rng = StdRng::seed_from_u64(2);
    let d = Dims { b: 1, lq: 6, lk: 10, h: 3, da: 8, dv: 16 };
    let mut x = inputs(&mut rng, d, false);
    x.w.iter_mut().for_each(|w| *w = f16::ZERO);
    let opts = AttentionOptions::new(Mask::window(2, 1));
    let r = run(&x, true, &opts);
    let band = r.problem.band();
    for h in 0..d.h {
        for i in 0..d.lq {
            let (lo, hi) = band.key_range(i);
            assert!(hi > lo);
            let lse = r.lse[h * d.lq + i];
            assert!((lse - ((hi - lo) as f64).ln()).abs() < 1e-12, "row {i}: LSE {lse} for {} keys", hi - lo);
            for c in 0..d.dv {
                let mean = (lo..hi).map(|j| x.v[x.vl.offset(0, j, h, c)].to_f64()).sum::<f64>() / (hi - lo) as f64;
                let got = r.o[(i * d.h + h) * d.dv + c];
                assert!((got - mean).abs() < 1e-12, "row {i} col {c}: {got} != mean {mean}");
            }
        }
    }
}

#[test]
fn a_bias_is_a_shift_of_the_projected_queries() {
    // Values exactly representable in f16 so that q' + b rounds to nothing.
    let mut rng = StdRng::seed_from_u64(3);
    let d = Dims { b: 2, lq: 4, lk: 7, h: 2, da: 8, dv: 8 };
    let mut x = inputs(&mut rng, d, false);
    let quarter = |v: &mut Vec<f16>| v.iter_mut().for_each(|e| *e = f16::from_f32((e.to_f32() * 4.0).round() / 4.0));
    quarter(&mut x.q);
    quarter(&mut x.bias);
    let with_bias = run(&x, true, &AttentionOptions::default());
    let mut shifted = x.q.clone();
    for b in 0..d.b {
        for i in 0..d.lq {
            for h in 0..d.h {
                for c in 0..d.da {
                    let at = x.ql.offset(b, i, h, c);
                    shifted[at] = f16::from_f32(x.q[at].to_f32() + x.bias[h * d.da + c].to_f32());
                }
            }
        }
    }
    let y = Inputs { q: shifted, ..x };
    let without = run(&y, false, &AttentionOptions::default());
    assert!(rel_l2_error(&with_bias.o, &without.o).unwrap() < 1e-14);
    assert!(rel_l2_error(&with_bias.lse, &without.lse).unwrap() < 1e-14);
    // And the bias matters: dropping it changes the result.
    let dropped = run(&y, true, &AttentionOptions::default());
    assert!(rel_l2_error(&dropped.o, &without.o).unwrap() > 1e-3);
}

#[test]
fn a_one_key_window_returns_that_keys_value_and_score() {
    let mut rng = StdRng::seed_from_u64(4);
    let d = Dims { b: 1, lq: 5, lk: 5, h: 1, da: 8, dv: 8 };
    let x = inputs(&mut rng, d, false);
    let r = run(&x, false, &AttentionOptions::new(Mask::window(0, 0)));
    for i in 0..d.lq {
        let s: f64 = (0..d.da)
            .map(|c| {
                x.w[c].to_f64() * (x.q[x.ql.offset(0, i, 0, c)].to_f64() + x.k[x.kl.offset(0, i, 0, c)].to_f64()).tanh()
            })
            .sum();
        assert!((r.lse[i] - s).abs() < 1e-12);
        for c in 0..d.dv {
            assert_eq!(r.o[i * d.dv + c], x.v[x.vl.offset(0, i, 0, c)].to_f64());
        }
    }
}

#[test]
fn key_order_does_not_matter_under_a_full_mask() {
    let mut rng = StdRng::seed_from_u64(5);
    let d = Dims { b: 1, lq: 3, lk: 9, h: 2, da: 16, dv: 8 };
    let x = inputs(&mut rng, d, false);
    let r = run(&x, true, &AttentionOptions::default());
    // Reverse the keys and values.
    let (mut k, mut v) = (x.k.clone(), x.v.clone());
    for j in 0..d.lk {
        for h in 0..d.h {
            for c in 0..d.da {
                k[x.kl.offset(0, j, h, c)] = x.k[x.kl.offset(0, d.lk - 1 - j, h, c)];
            }
            for c in 0..d.dv {
                v[x.vl.offset(0, j, h, c)] = x.v[x.vl.offset(0, d.lk - 1 - j, h, c)];
            }
        }
    }
    let y = Inputs { k, v, ..x };
    let rev = run(&y, true, &AttentionOptions::default());
    assert!(rel_l2_error(&r.o, &rev.o).unwrap() < 1e-13);
    // Under a causal mask it does (so the check above is not vacuous).
    let (c1, c2) = (run(&y, true, &AttentionOptions::new(Mask::Causal)), r);
    assert!(rel_l2_error(&c1.o, &c2.o).unwrap() > 1e-3);
}

#[test]
fn rows_with_no_visible_key_are_zero_with_minus_infinite_lse() {
    let mut rng = StdRng::seed_from_u64(6);
    // Causal, bottom-right, Lq > Lk: the first Lq - Lk rows see nothing.
    let d = Dims { b: 1, lq: 7, lk: 3, h: 1, da: 8, dv: 8 };
    let x = inputs(&mut rng, d, false);
    let r = run(&x, true, &AttentionOptions::new(Mask::Causal));
    for i in 0..d.lq {
        let empty = i < d.lq - d.lk;
        assert_eq!(r.lse[i] == f64::NEG_INFINITY, empty, "row {i}");
        if empty {
            assert!(r.o[i * d.dv..(i + 1) * d.dv].iter().all(|&o| o == 0.0));
        }
    }
    // Lk = 0: every row is empty; Lq = 0: nothing at all.
    for (lq, lk) in [(4, 0), (0, 4)] {
        let d = Dims { b: 2, lq, lk, h: 2, da: 8, dv: 16 };
        let x = inputs(&mut rng, d, false);
        let r = run(&x, false, &AttentionOptions::default());
        assert_eq!(r.o.len(), d.b * lq * d.h * d.dv);
        assert!(r.o.iter().all(|&o| o == 0.0) && r.lse.iter().all(|&l| l == f64::NEG_INFINITY));
    }
}

#[test]
fn bf16_inputs_work_too() {
    let mut rng = StdRng::seed_from_u64(7);
    let x = inputs(&mut rng, Dims { b: 1, lq: 3, lk: 4, h: 1, da: 8, dv: 8 }, false);
    let to = |v: &[f16]| v.iter().map(|e| bf16::from_f32(e.to_f32())).collect::<Vec<_>>();
    let (q, k, v, w) = (to(&x.q), to(&x.k), to(&x.v), to(&x.w));
    let r = reference::additive_forward(
        HostTensor::new(&q, x.ql),
        HostTensor::new(&k, x.kl),
        HostTensor::new(&v, x.vl),
        &w,
        None,
        &AttentionOptions::default(),
    )
    .unwrap();
    assert_eq!(r.problem.dtype, DType::BF16);
    assert!(r.lse.iter().all(|l| l.is_finite()));
}

// ---- validation ----------------------------------------------------------

fn desc(arg: &'static str, layout: Layout) -> TensorDesc {
    TensorDesc { arg, layout, len: layout.span().unwrap() }
}

/// validate_additive over a good problem with one thing changed by `edit`.
#[allow(clippy::type_complexity)]
fn check(
    edit: impl FnOnce(&mut [TensorDesc; 4], &mut (usize, Option<usize>), &mut Option<LseDesc>, &mut AttentionOptions),
) -> Result<(), Error> {
    let (b, lq, lk, h, da, dv) = (2, 5, 7, 3, 16, 24);
    let mut t = [
        desc("q_proj", Layout::bshd(b, lq, h, da)),
        desc("k_proj", Layout::bhsd(b, h, lk, da)),
        desc("v", Layout::bshd(b, lk, h, dv)),
        desc("o", Layout::bshd(b, lq, h, dv)),
    ];
    let mut wb = (h * da, Some(h * da));
    let ll = LseLayout::contiguous(b, h, lq);
    let mut lse = Some(LseDesc { layout: ll, len: ll.span().unwrap() });
    let mut opts = AttentionOptions::new(Mask::Causal);
    edit(&mut t, &mut wb, &mut lse, &mut opts);
    validate_additive(DType::F16, &t[0], &t[1], &t[2], wb.0, wb.1, Some(&t[3]), lse.as_ref(), &opts).map(|_| ())
}

#[test]
fn a_good_problem_validates_with_da_other_than_dv() {
    check(|_, _, _, _| {}).unwrap();
}

#[test]
fn every_validation_error_names_its_argument() {
    let shape = |t: &mut TensorDesc, dim: usize, n: usize| {
        let mut s = t.layout.shape;
        s[dim] = n;
        *t = desc(t.arg, Layout::bshd(s[0], s[1], s[2], s[3]));
    };
    let cases: Vec<(&str, Result<(), Error>, &str)> = vec![
        ("Da not a multiple of 8", check(|t, _, _, _| shape(&mut t[0], 3, 12)), "q_proj"),
        ("Dv above 256", check(|t, _, _, _| shape(&mut t[2], 3, 264)), "v"),
        ("K' Da differs", check(|t, _, _, _| shape(&mut t[1], 3, 8)), "k_proj"),
        ("K' heads differ (no GQA)", check(|t, _, _, _| shape(&mut t[1], 2, 1)), "k_proj"),
        ("K' batch differs", check(|t, _, _, _| shape(&mut t[1], 0, 1)), "k_proj"),
        ("V length differs", check(|t, _, _, _| shape(&mut t[2], 1, 6)), "v"),
        ("O Dv differs", check(|t, _, _, _| shape(&mut t[3], 3, 16)), "o"),
        ("O length differs", check(|t, _, _, _| shape(&mut t[3], 1, 4)), "o"),
        ("w too short", check(|_, wb, _, _| wb.0 -= 1), "w"),
        ("bias too short", check(|_, wb, _, _| wb.1 = Some(8)), "bias"),
        ("scale set", check(|_, _, _, o| *o = o.with_scale(0.5)), "scale"),
        ("softcap set", check(|_, _, _, o| *o = o.with_softcap(30.0)), "softcap"),
        ("empty batch", check(|t, _, _, _| shape(&mut t[0], 0, 0)), "q_proj"),
        ("empty heads", check(|t, _, _, _| shape(&mut t[2], 2, 0)), "v"),
        (
            "last stride",
            check(|t, _, _, _| {
                let mut l = t[1].layout;
                l.strides[3] = 2;
                t[1] = TensorDesc { arg: "k_proj", layout: l, len: usize::MAX };
            }),
            "k_proj",
        ),
        ("Q' past its buffer", check(|t, _, _, _| t[0].len -= 1), "q_proj"),
        (
            "O overlaps itself",
            check(|t, _, _, _| {
                let mut l = t[3].layout;
                l.strides[1] = 0;
                t[3].layout = l;
            }),
            "o",
        ),
        (
            "LSE shape",
            check(|_, _, l, _| {
                let ll = LseLayout::contiguous(2, 3, 4);
                *l = Some(LseDesc { layout: ll, len: 100 });
            }),
            "lse",
        ),
        (
            "Lk beyond the kernels' limit",
            check(|t, _, _, _| {
                for i in [1, 2] {
                    let mut l = t[i].layout;
                    l.shape[1] = (1 << 28) + 1;
                    t[i] = TensorDesc { arg: t[i].arg, layout: l, len: usize::MAX };
                }
            }),
            "k_proj",
        ),
    ];
    for (what, r, arg) in cases {
        let e = r.expect_err(what);
        let text = e.to_string();
        assert!(text.contains(&format!("`{arg}`")), "{what}: `{text}` does not name `{arg}`");
    }
}

#[test]
fn the_reference_validates_like_the_device_path() {
    let mut rng = StdRng::seed_from_u64(8);
    let x = inputs(&mut rng, Dims { b: 1, lq: 3, lk: 4, h: 2, da: 8, dv: 8 }, false);
    let call = |w: &[f16], bias: Option<&[f16]>, opts: AttentionOptions| {
        reference::additive_forward(
            HostTensor::new(&x.q, x.ql),
            HostTensor::new(&x.k, x.kl),
            HostTensor::new(&x.v, x.vl),
            w,
            bias,
            &opts,
        )
        .map(|_| ())
    };
    let named = |r: Result<(), Error>, arg: &str| {
        let t = r.unwrap_err().to_string();
        assert!(t.contains(&format!("`{arg}`")), "{t}");
    };
    named(call(&x.w[..15], None, AttentionOptions::default()), "w");
    named(call(&x.w, Some(&x.bias[..3]), AttentionOptions::default()), "bias");
    named(call(&x.w, None, AttentionOptions::default().with_scale(2.0)), "scale");
    let short_v = HostTensor::new(&x.v[..10], x.vl);
    let r = reference::additive_forward(
        HostTensor::new(&x.q, x.ql),
        HostTensor::new(&x.k, x.kl),
        short_v,
        &x.w,
        None,
        &AttentionOptions::default(),
    );
    named(r.map(|_| ()), "v");
}
