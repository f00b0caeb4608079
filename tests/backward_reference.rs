//! CPU tier of the backward pass (DESIGN.md section 1b): the f64 reference
//! gradients against central differences of the forward reference, for
//! every mask and alignment, GQA, `Lq ≠ Lk` with rows that see no key,
//! softcap, ALiBi and sinks (whose logits get a gradient too).

use fused_attn::reference::{self, backward, backward_f64, forward_f64};
use fused_attn::{Alibi, AttentionOptions, Error, HeadValues, HostTensor, Layout, Mask, MaskAlignment};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
}

struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
    ql: Layout,
    kl: Layout,
}

fn inputs(s: Shape, seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut r = |n: usize| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f64>>();
    let (ql, kl) = (Layout::bshd(s.b, s.lq, s.hq, s.d), Layout::bshd(s.b, s.lk, s.hk, s.d));
    let (nq, nk) = (ql.numel().unwrap(), kl.numel().unwrap());
    Inputs { q: r(nq), k: r(nk), v: r(nk), d_o: r(nq), ql, kl }
}

/// `L = Σ ⟨dO, O⟩` through the forward reference.
fn loss(x: &Inputs, q: &[f64], k: &[f64], v: &[f64], opts: &AttentionOptions) -> f64 {
    let r = forward_f64(HostTensor::new(q, x.ql), HostTensor::new(k, x.kl), HostTensor::new(v, x.kl), opts).unwrap();
    r.o.iter().zip(&x.d_o).map(|(a, b)| a * b).sum()
}

/// Largest difference between the analytic gradients and central
/// differences over a third of the input elements (and every sink logit),
/// relative to the largest gradient.
fn check(s: Shape, opts: &AttentionOptions, sinks: Option<&[f32]>, what: &str) {
    let x = inputs(s, 17 + s.lq as u64 * 31 + s.lk as u64);
    let g = backward_f64(
        HostTensor::new(&x.q, x.ql),
        HostTensor::new(&x.k, x.kl),
        HostTensor::new(&x.v, x.kl),
        HostTensor::new(&x.d_o, x.ql),
        opts,
    )
    .unwrap();
    let h = 1e-5;
    let mut worst = 0.0f64;
    let mut scale = 1e-300f64;
    // Which tensor an index perturbs: 0 q, 1 k, 2 v.
    for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
        // Every third element (offset per tensor): each (row, column) class
        // is still covered, at a third of the debug-build time.
        for at in (which..grad.len()).step_by(3) {
            let x0 = [&x.q, &x.k, &x.v][which][at];
            let (qp, kp, vp) = with_element(&x, which, at, x0 + h);
            let plus = loss(&x, &qp, &kp, &vp, opts);
            let (qm, km, vm) = with_element(&x, which, at, x0 - h);
            let minus = loss(&x, &qm, &km, &vm, opts);
            let fd = (plus - minus) / (2.0 * h);
            worst = worst.max((fd - grad[at]).abs());
            scale = scale.max(grad[at].abs());
        }
    }
    if let (Some(sv), Some(ds)) = (sinks, &g.dsinks) {
        for hh in 0..s.hq {
            let f = |delta: f32| {
                let mut s2 = sv.to_vec();
                s2[hh] += delta;
                let o = opts.with_sinks(HeadValues::Host(&s2));
                loss(&x, &x.q, &x.k, &x.v, &o)
            };
            // f32 sink logits: a coarser step, still well inside f64's reach.
            let hs = 1e-2f32;
            let fd = (f(hs) - f(-hs)) / (2.0 * hs as f64);
            worst = worst.max((fd - ds[hh]).abs() / 10.0); // O(h²) ≈ 1e-4 of the curvature
            scale = scale.max(ds[hh].abs());
        }
    }
    let rel = worst / scale;
    assert!(rel < 1e-6, "{what}: gradients off central differences by {rel:.2e} (largest gradient {scale:.3e})");
    // The forward part agrees with the forward reference.
    let f = forward_f64(HostTensor::new(&x.q, x.ql), HostTensor::new(&x.k, x.kl), HostTensor::new(&x.v, x.kl), opts)
        .unwrap();
    assert!(reference::rel_l2_error(&g.o, &f.o).unwrap() < 1e-14, "{what}: O");
    assert!(reference::rel_l2_error(&g.lse, &f.lse).unwrap() < 1e-14, "{what}: LSE");
}

/// A copy of q, k, v with element `at` of tensor `which` set to `value`.
fn with_element(x: &Inputs, which: usize, at: usize, value: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut q, mut k, mut v) = (x.q.clone(), x.k.clone(), x.v.clone());
    match which {
        0 => q[at] = value,
        1 => k[at] = value,
        _ => v[at] = value,
    }
    (q, k, v)
}

#[test]
fn gradients_match_central_differences() {
    let gqa = Shape { b: 2, lq: 5, lk: 7, hq: 4, hk: 2, d: 8 };
    let tall = Shape { b: 1, lq: 7, lk: 4, hq: 3, hk: 1, d: 8 }; // causal: rows with no key
    for (s, mask) in [
        (gqa, Mask::Full),
        (gqa, Mask::Causal),
        (gqa, Mask::window(2, 1)),
        (tall, Mask::Causal),
        (tall, Mask::window(0, 0)),
    ] {
        for align in [MaskAlignment::BottomRight, MaskAlignment::TopLeft] {
            let opts = AttentionOptions::new(mask).with_alignment(align).with_scale(0.9);
            check(s, &opts, None, &format!("{mask} {align:?}"));
            check(s, &opts.with_softcap(1.5), None, &format!("{mask} {align:?} softcap"));
        }
    }
    // ALiBi per batch entry, and sinks (with their own gradient), on a softcap.
    let s = gqa;
    let slopes: Vec<f32> = (0..s.b * s.hq).map(|x| 0.1 + 0.15 * x as f32).collect();
    let sinks = [0.4f32, -1.0, 2.0, 0.0];
    let opts = AttentionOptions::new(Mask::Causal).with_alibi(Alibi::per_batch(HeadValues::Host(&slopes)));
    check(s, &opts, None, "alibi");
    check(s, &opts.with_softcap(2.0).with_sinks(HeadValues::Host(&sinks)), Some(&sinks), "alibi softcap sinks");
    check(
        tall,
        &AttentionOptions::new(Mask::Causal).with_sinks(HeadValues::Host(&sinks[..3])),
        Some(&sinks[..3]),
        "sinks",
    );
}

/// Rows with no visible key contribute nothing: their dQ is 0 and dropping
/// them (a dO of 0 there) leaves dK and dV unchanged; a bf16 call equals
/// the f64 call on the same values.
#[test]
fn empty_rows_and_element_types() {
    let s = Shape { b: 1, lq: 6, lk: 3, hq: 2, hk: 1, d: 8 };
    let x = inputs(s, 5);
    let to16 = |v: &[f64]| v.iter().map(|&a| bf16::from_f64(a)).collect::<Vec<_>>();
    let back = |v: &[bf16]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let (q, k, v, d_o) = (to16(&x.q), to16(&x.k), to16(&x.v), to16(&x.d_o));
    let opts = AttentionOptions::new(Mask::Causal);
    let g = backward(
        HostTensor::new(&q, x.ql),
        HostTensor::new(&k, x.kl),
        HostTensor::new(&v, x.kl),
        HostTensor::new(&d_o, x.ql),
        &opts,
    )
    .unwrap();
    let (qf, kf, vf, dof) = (back(&q), back(&k), back(&v), back(&d_o));
    let g64 = backward_f64(
        HostTensor::new(&qf, x.ql),
        HostTensor::new(&kf, x.kl),
        HostTensor::new(&vf, x.kl),
        HostTensor::new(&dof, x.ql),
        &opts,
    )
    .unwrap();
    assert_eq!((&g.dq, &g.dk, &g.dv), (&g64.dq, &g64.dk, &g64.dv));
    // Lq − Lk = 3 rows see no key (bottom-right causal).
    let empty = (s.lq - s.lk) * s.hq * s.d;
    assert!(g.dq[..empty].iter().all(|&x| x == 0.0));
    assert!(g.dq[empty..].iter().any(|&x| x != 0.0));
    let mut d0 = dof.clone();
    d0[..empty].iter_mut().for_each(|x| *x = 0.0);
    let g0 = backward_f64(
        HostTensor::new(&qf, x.ql),
        HostTensor::new(&kf, x.kl),
        HostTensor::new(&vf, x.kl),
        HostTensor::new(&d0, x.ql),
        &opts,
    )
    .unwrap();
    assert_eq!((&g0.dk, &g0.dv), (&g64.dk, &g64.dv));
    assert!(g.dsinks.is_none());
}

#[test]
fn d_o_must_have_the_shape_of_o() {
    let s = Shape { b: 1, lq: 4, lk: 4, hq: 2, hk: 1, d: 8 };
    let x = inputs(s, 1);
    let bad = Layout::bshd(1, 3, 2, 8);
    let e = backward_f64(
        HostTensor::new(&x.q, x.ql),
        HostTensor::new(&x.k, x.kl),
        HostTensor::new(&x.v, x.kl),
        HostTensor::new(&x.d_o, bad),
        &AttentionOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { arg: "d_o", .. }), "{e:?}");
}
