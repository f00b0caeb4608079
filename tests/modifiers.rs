//! CPU tier for the score modifiers of DESIGN.md section 1b, ALiBi and
//! attention sinks: identities of the reference that do not restate its
//! code (the dense comparison in `tests/reference.rs` covers the formula),
//! the per-sequence slopes of packed batches and caches, and every
//! validation error.

use fused_attn::internals::{validate, TensorDesc};
use fused_attn::reference;
use fused_attn::{
    alibi_slopes, Alibi, AlibiLayout, AttentionOptions, DType, Error, HeadValues, HostTensor, Layout, Mask,
    MaskAlignment,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.5f32..1.5))).collect()
}

fn host(v: &[f32]) -> HeadValues<'_> {
    HeadValues::Host(v)
}

/// A sink is one more term of the denominator with no value: with `O`, `L`
/// the result without it, `L' = log(e^σ + e^L)` and `O' = O·e^{L − L'}`;
/// a row that sees no key gets `O' = 0`, `L' = σ`.
#[test]
fn a_sink_rescales_the_output_and_joins_the_lse() {
    let mut rng = StdRng::seed_from_u64(7);
    // Lq > Lk with a causal bottom-right mask: the first rows see no key.
    let (b, lq, lk, hq, hk, d) = (2, 9, 6, 4, 2, 16);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    let (ql, kl) = (Layout::bshd(b, lq, hq, d), Layout::bshd(b, lk, hk, d));
    let sinks = [0.3f32, -4.0, 12.0, 1.5];
    for mask in [Mask::Full, Mask::Causal, Mask::window(1, 1)] {
        let opts = AttentionOptions::new(mask).with_scale(0.4);
        let run = |o: &AttentionOptions| {
            reference::forward(HostTensor::new(&q, ql), HostTensor::new(&k, kl), HostTensor::new(&v, kl), o).unwrap()
        };
        let (plain, sunk) = (run(&opts), run(&opts.with_sinks(host(&sinks))));
        let mut empty_rows = 0;
        for bb in 0..b {
            for (h, &sigma) in sinks.iter().enumerate() {
                let sigma = sigma as f64;
                for i in 0..lq {
                    let at = (bb * hq + h) * lq + i;
                    let (l, l2) = (plain.lse[at], sunk.lse[at]);
                    let want =
                        if l == f64::NEG_INFINITY { sigma } else { l.max(sigma) + (-(l - sigma).abs()).exp().ln_1p() };
                    assert!((l2 - want).abs() < 1e-12, "{mask} b{bb} h{h} i{i}: lse {l2} want {want}");
                    let w = if l == f64::NEG_INFINITY { 0.0 } else { (l - l2).exp() };
                    empty_rows += usize::from(l == f64::NEG_INFINITY);
                    for x in 0..d {
                        let o = ((bb * lq + i) * hq + h) * d + x;
                        assert!((sunk.o[o] - w * plain.o[o]).abs() < 1e-12, "{mask} b{bb} h{h} i{i} col {x}");
                    }
                }
            }
        }
        if mask == Mask::Causal {
            assert!(empty_rows > 0, "the causal case must include rows that see no key");
        }
    }
}

/// ALiBi with zero slopes is no ALiBi; a slope changes only the rows whose
/// visible keys lie at different distances (a single visible key is
/// unaffected: softmax of one score is 1).
#[test]
fn alibi_zero_slopes_and_single_keys_change_nothing() {
    let mut rng = StdRng::seed_from_u64(8);
    let (b, lq, lk, hq, hk, d) = (1, 7, 7, 3, 1, 8);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    let (ql, kl) = (Layout::bshd(b, lq, hq, d), Layout::bshd(b, lk, hk, d));
    let run = |o: &AttentionOptions| {
        reference::forward(HostTensor::new(&q, ql), HostTensor::new(&k, kl), HostTensor::new(&v, kl), o).unwrap()
    };
    let zeros = [0.0f32; 3];
    for mask in [Mask::Full, Mask::Causal] {
        let opts = AttentionOptions::new(mask);
        let (a, z) = (run(&opts), run(&opts.with_alibi(Alibi::per_head(host(&zeros)))));
        assert_eq!(a.o, z.o);
        assert_eq!(a.lse, z.lse);
    }
    // Window(0, 0): one key per row, so any slope leaves O unchanged and,
    // the key at distance 0, LSE too.
    let slopes = [0.5f32, 3.0, 17.0];
    let opts = AttentionOptions::new(Mask::window(0, 0));
    let (a, s) = (run(&opts), run(&opts.with_alibi(Alibi::per_head(host(&slopes)))));
    assert_eq!(a.o, s.o);
    assert_eq!(a.lse, s.lse);
    // Full attention: a large slope concentrates each row on its diagonal key.
    let big = [60.0f32; 3];
    let r = run(&AttentionOptions::new(Mask::Full).with_alibi(Alibi::per_head(host(&big))));
    for i in 0..lq {
        for h in 0..hq {
            for x in 0..d {
                let want: f64 = v[(i * hk + h / hq) * d + x].into();
                assert!((r.o[(i * hq + h) * d + x] - want).abs() < 1e-12);
            }
        }
    }
}

/// Per-batch slopes of a packed batch are per sequence: B equal sequences
/// packed end to end give the rectangular batch's result, slopes and sinks
/// included; a cache likewise.
#[test]
fn per_sequence_slopes_in_packed_batches_and_caches() {
    let mut rng = StdRng::seed_from_u64(9);
    let (b, lq, lk, hq, hk, d) = (3, 5, 8, 4, 2, 16);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    let slopes: Vec<f32> = (0..b * hq).map(|x| 0.1 + 0.3 * x as f32).collect();
    let sinks = [1.0f32, -2.0, 0.5, 3.0];
    for align in [MaskAlignment::BottomRight, MaskAlignment::TopLeft] {
        let opts = AttentionOptions::new(Mask::window(3, 1))
            .with_alignment(align)
            .with_alibi(Alibi::per_batch(host(&slopes)))
            .with_sinks(host(&sinks));
        let rect = reference::forward(
            HostTensor::new(&q, Layout::bshd(b, lq, hq, d)),
            HostTensor::new(&k, Layout::bshd(b, lk, hk, d)),
            HostTensor::new(&v, Layout::bshd(b, lk, hk, d)),
            &opts,
        )
        .unwrap();
        let cu_q: Vec<i32> = (0..=b).map(|i| (i * lq) as i32).collect();
        let cu_k: Vec<i32> = (0..=b).map(|i| (i * lk) as i32).collect();
        let packed = reference::forward_varlen(
            HostTensor::new(&q, Layout::bshd(1, b * lq, hq, d)),
            HostTensor::new(&k, Layout::bshd(1, b * lk, hk, d)),
            HostTensor::new(&v, Layout::bshd(1, b * lk, hk, d)),
            &cu_q,
            &cu_k,
            None,
            &opts,
        )
        .unwrap();
        assert_eq!(rect.o, packed.o, "{align:?}");
        for bb in 0..b {
            for h in 0..hq {
                for i in 0..lq {
                    assert_eq!(rect.lse[(bb * hq + h) * lq + i], packed.lse[h * b * lq + bb * lq + i]);
                }
            }
        }
        // A dense cache in reverse batch order, every sequence using all lk keys.
        let mut kc = vec![bf16::ZERO; k.len()];
        let mut vc = vec![bf16::ZERO; v.len()];
        let per = lk * hk * d;
        for bb in 0..b {
            kc[(b - 1 - bb) * per..][..per].copy_from_slice(&k[bb * per..][..per]);
            vc[(b - 1 - bb) * per..][..per].copy_from_slice(&v[bb * per..][..per]);
        }
        let idx: Vec<i32> = (0..b).map(|bb| (b - 1 - bb) as i32).collect();
        let cached = reference::forward_kvcache(
            HostTensor::new(&q, Layout::bshd(b, lq, hq, d)),
            HostTensor::new(&kc, Layout::bshd(b, lk, hk, d)),
            HostTensor::new(&vc, Layout::bshd(b, lk, hk, d)),
            &vec![lk as i32; b],
            Some(&idx),
            None,
            &opts,
        )
        .unwrap();
        assert_eq!(rect.o, cached.o, "{align:?}");
        assert_eq!(rect.lse, cached.lse, "{align:?}");
    }
}

#[test]
fn alibi_slopes_follow_the_paper() {
    let s8 = alibi_slopes(8);
    assert_eq!(s8, (1..=8).map(|i| 0.5f32.powi(i)).collect::<Vec<_>>());
    let s16 = alibi_slopes(16);
    assert_eq!(s16[0], 2f32.powf(-0.5));
    // 12 heads: the 8-head series, then every other term of the 16-head one.
    let s12 = alibi_slopes(12);
    assert_eq!(&s12[..8], &s8[..]);
    assert_eq!(&s12[8..], &[s16[0], s16[2], s16[4], s16[6]]);
    assert!(alibi_slopes(0).is_empty());
    assert_eq!(alibi_slopes(1), vec![2f32.powi(-8)]);
}

#[test]
fn modifier_errors_name_their_argument() {
    let (b, l, hq, hk, d) = (2, 4, 4, 2, 8);
    let desc = |arg, h| {
        let layout = Layout::bshd(b, l, h, d);
        TensorDesc { arg, layout, len: layout.span().unwrap() }
    };
    let (q, k, v) = (desc("q", hq), desc("k", hk), desc("v", hk));
    let check = |o: AttentionOptions| validate(DType::BF16, &q, &k, &v, None, None, &o);
    let base = AttentionOptions::new(Mask::Causal);
    let four = [0.5f32; 4];
    let eight = [0.5f32; 8];

    let p = check(base.with_alibi(Alibi::per_head(host(&four))).with_sinks(host(&four))).unwrap();
    assert_eq!((p.alibi, p.sinks), (Some(AlibiLayout::PerHead), true));
    assert_eq!(check(base.with_alibi(Alibi::per_batch(host(&eight)))).unwrap().alibi, Some(AlibiLayout::PerBatch));
    assert_eq!(check(base).unwrap().alibi, None);

    let short = |e: Error, arg: &str, needed: usize| match e {
        Error::OutOfBounds { arg: a, needed: n, .. } => assert_eq!((a, n), (arg, needed)),
        e => panic!("{e:?}"),
    };
    short(check(base.with_alibi(Alibi::per_head(host(&four[..3])))).unwrap_err(), "alibi_slopes", 4);
    short(check(base.with_alibi(Alibi::per_batch(host(&four)))).unwrap_err(), "alibi_slopes", 8);
    short(check(base.with_sinks(host(&four[..2]))).unwrap_err(), "sinks", 4);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let vals = [0.5, 0.5, bad, 0.5];
        for (o, arg) in
            [(base.with_alibi(Alibi::per_head(host(&vals))), "alibi_slopes"), (base.with_sinks(host(&vals)), "sinks")]
        {
            match check(o).unwrap_err() {
                Error::InvalidOption { arg: a, .. } => assert_eq!(a, arg),
                e => panic!("{e:?}"),
            }
        }
    }
    // Values past the needed ones are not read, so they are not checked.
    let long = [0.5, 0.5, 0.5, 0.5, f32::NAN];
    assert!(check(base.with_sinks(host(&long))).is_ok());
}
