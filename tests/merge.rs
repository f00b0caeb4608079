//! CPU tier for the merge of attention states (DESIGN.md section 1b): the
//! reference merge of attention over disjoint key sets equals attention over
//! their union (two, three and eight parts, an empty part, GQA, softcap,
//! custom scale, parts on their own strides), the merge is commutative, and
//! every validation error names its argument.

use fused_attn::internals::{validate_merge, LseDesc, TensorDesc};
use fused_attn::reference::{self, HostState};
use fused_attn::{AttentionOptions, DType, Error, HostTensor, Layout, LseLayout, Mask, MAX_MERGE_PARTS};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n).map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0))).collect()
}

/// Attention of `q` over keys `[k0, k1)` of `k`/`v` (full mask: a part's
/// keys are all visible), rounded to f16 and laid out on padded strides
/// (row pad `pad`), with its f32 LSE in a padded `[B, H, L]`.
struct Part {
    o: Vec<f16>,
    o_layout: Layout,
    lse: Vec<f32>,
    lse_layout: LseLayout,
}

#[allow(clippy::too_many_arguments)]
fn part(
    q: &[f16],
    k: &[f16],
    v: &[f16],
    (b, lq, hq, hk, d, lk): (usize, usize, usize, usize, usize, usize),
    (k0, k1): (usize, usize),
    opts: &AttentionOptions,
    pad: usize,
) -> Part {
    let ql = Layout::bshd(b, lq, hq, d);
    let kl = Layout::strided_bshd([b, k1 - k0, hk, d], [lk * hk * d, hk * d, d, 1]);
    let off = k0 * hk * d;
    let r = reference::forward(
        HostTensor::new(q, ql),
        HostTensor::new(&k[off..], kl),
        HostTensor::new(&v[off..], kl),
        opts,
    )
    .unwrap();
    let (hs, rs) = (d + pad, hq * (d + pad) + pad);
    let o_layout = Layout::strided_bshd([b, lq, hq, d], [lq * rs + pad, rs, hs, 1]);
    let mut o = vec![f16::from_f32(f32::NAN); o_layout.span().unwrap()];
    for bb in 0..b {
        for i in 0..lq {
            for h in 0..hq {
                for dd in 0..d {
                    o[o_layout.offset(bb, i, h, dd)] = f16::from_f64(r.o[((bb * lq + i) * hq + h) * d + dd]);
                }
            }
        }
    }
    let lse_layout = LseLayout::strided([b, hq, lq], [hq * (lq + pad) + 3, lq + pad, 1]);
    let mut lse = vec![f32::NAN; lse_layout.span().unwrap()];
    for bb in 0..b {
        for h in 0..hq {
            for i in 0..lq {
                lse[lse_layout.offset(bb, h, i)] = r.lse[(bb * hq + h) * lq + i] as f32;
            }
        }
    }
    Part { o, o_layout, lse, lse_layout }
}

/// Attention of `q` over all keys (the reference every merge must equal).
fn full_attention(
    q: &[f16],
    k: &[f16],
    v: &[f16],
    (b, lq, hq, hk, d, lk): (usize, usize, usize, usize, usize, usize),
    opts: &AttentionOptions,
) -> reference::Reference {
    reference::forward(
        HostTensor::new(q, Layout::bshd(b, lq, hq, d)),
        HostTensor::new(k, Layout::bshd(b, lk, hk, d)),
        HostTensor::new(v, Layout::bshd(b, lk, hk, d)),
        opts,
    )
    .unwrap()
}

fn states(parts: &[Part]) -> Vec<HostState<'_, f16>> {
    parts
        .iter()
        .map(|p| HostState { o: HostTensor::new(&p.o, p.o_layout), lse: &p.lse, lse_layout: p.lse_layout })
        .collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn merging_disjoint_key_sets_equals_attention_over_their_union() {
    let mut rng = StdRng::seed_from_u64(11);
    let dims @ (b, lq, hq, hk, d, lk) = (2, 5, 8, 2, 24, 61);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    for opts in [AttentionOptions::new(Mask::Full), AttentionOptions::new(Mask::Full).with_scale(0.9).with_softcap(4.0)]
    {
        let whole = part(&q, &k, &v, dims, (0, lk), &opts, 0);
        let full = full_attention(&q, &k, &v, dims, &opts);
        for cuts in
            [vec![0, 30, lk], vec![0, 7, 7, 40, lk], (0..=MAX_MERGE_PARTS).map(|i| i * lk / MAX_MERGE_PARTS).collect()]
        {
            // An empty range (7, 7) is a part that saw no key: LSE -inf, weight 0.
            let parts: Vec<Part> = cuts
                .windows(2)
                .enumerate()
                .map(|(i, w)| part(&q, &k, &v, dims, (w[0], w[1]), &opts, 8 * (i % 3)))
                .collect();
            let merged = reference::merge_states(&states(&parts)).unwrap();
            let rel = max_rel(&merged.o, &full.o);
            assert!(rel < 2e-3, "{} parts: O rel {rel:.2e} (parts rounded to f16)", parts.len());
            for (x, y) in merged.lse.iter().zip(&full.lse) {
                assert!((x - y).abs() < 1e-5 * y.abs().max(1.0), "LSE {x} vs {y}");
            }
            // Commutative: the reversed order gives the same result.
            let mut rev = states(&parts);
            rev.reverse();
            let back = reference::merge_states(&rev).unwrap();
            assert!(max_rel(&back.o, &merged.o) < 1e-12);
        }
        // One part is the identity (up to the f16 rounding of O).
        let one = reference::merge_states(&states(std::slice::from_ref(&whole))).unwrap();
        assert!(max_rel(&one.o, &full.o) < 2e-3);
    }
}

#[test]
fn rows_no_part_saw_are_zero_with_lse_minus_infinity() {
    let mut rng = StdRng::seed_from_u64(12);
    let dims @ (b, lq, hq, hk, d, lk) = (1, 3, 2, 1, 8, 10);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    let opts = AttentionOptions::new(Mask::Full);
    let parts = [part(&q, &k, &v, dims, (4, 4), &opts, 0), part(&q, &k, &v, dims, (9, 9), &opts, 8)];
    let merged = reference::merge_states(&states(&parts)).unwrap();
    assert!(merged.o.iter().all(|&x| x == 0.0));
    assert!(merged.lse.iter().all(|&x| x == f64::NEG_INFINITY));
}

#[test]
fn merge_validation_names_the_argument() {
    let l = Layout::bshd(2, 3, 4, 8);
    let ll = LseLayout::contiguous(2, 4, 3);
    let t = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let lse = |layout: LseLayout| LseDesc { layout, len: layout.span().unwrap() };
    let part = (t("parts.o", l), lse(ll));
    let o = t("o", l);
    assert!(validate_merge(DType::F16, &[part, part], &o, Some(&lse(ll))).is_ok());
    for n in [0, MAX_MERGE_PARTS + 1] {
        let parts = vec![part; n];
        assert!(matches!(validate_merge(DType::F16, &parts, &o, None), Err(Error::InvalidOption { arg: "parts", .. })));
    }
    // A part of another shape, a part's LSE of another shape, the output's LSE.
    let other = (t("parts.o", Layout::bshd(2, 4, 4, 8)), lse(LseLayout::contiguous(2, 4, 4)));
    assert!(matches!(
        validate_merge(DType::F16, &[part, other], &o, None),
        Err(Error::ShapeMismatch { arg: "parts.o", dim: "seqlen", .. })
    ));
    let bad_lse = (t("parts.o", l), lse(LseLayout::contiguous(2, 4, 2)));
    assert!(matches!(validate_merge(DType::F16, &[bad_lse], &o, None), Err(Error::ShapeMismatch { arg: "lse", .. })));
    assert!(matches!(
        validate_merge(DType::F16, &[part], &o, Some(&lse(LseLayout::contiguous(1, 4, 3)))),
        Err(Error::ShapeMismatch { arg: "lse", .. })
    ));
    // A part whose view is too short for its layout.
    let short = (TensorDesc { arg: "parts.o", layout: l, len: 10 }, lse(ll));
    assert!(matches!(validate_merge(DType::F16, &[short], &o, None), Err(Error::OutOfBounds { arg: "parts.o", .. })));
    // An output whose strides overlap.
    let overlapping = t("o", Layout::strided_bshd([2, 3, 4, 8], [0, 32, 8, 1]));
    assert!(matches!(
        validate_merge(DType::F16, &[part], &overlapping, None),
        Err(Error::Overlapping { arg: "o", .. })
    ));
}

/// Ring attention's running merge on one host: the keys in 4 chunks (as 4
/// ranks would hold them), each chunk's partial state merged into the
/// running one as it comes round, equals attention over all keys.
#[test]
fn a_running_merge_over_key_chunks_equals_attention_over_all_keys() {
    let mut rng = StdRng::seed_from_u64(13);
    let dims @ (b, lq, hq, hk, d, lk) = (1, 6, 4, 4, 16, 80);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    let opts = AttentionOptions::new(Mask::Full);
    let full = full_attention(&q, &k, &v, dims, &opts);
    let mut acc = part(&q, &k, &v, dims, (0, 20), &opts, 0);
    for c in 1..4 {
        let next = part(&q, &k, &v, dims, (20 * c, 20 * (c + 1)), &opts, 8);
        let m = reference::merge_states(&states(&[acc, next])).unwrap();
        // The running state, rounded to f16 as a device buffer would hold it.
        let o_layout = Layout::bshd(b, lq, hq, d);
        let lse_layout = LseLayout::contiguous(b, hq, lq);
        acc = Part {
            o: m.o.iter().map(|&x| f16::from_f64(x)).collect(),
            o_layout,
            lse: m.lse.iter().map(|&x| x as f32).collect(),
            lse_layout,
        };
    }
    let o: Vec<f64> = acc.o.iter().map(|x| x.to_f64()).collect();
    let rel = max_rel(&o, &full.o);
    assert!(rel < 3e-3, "running merge over 4 chunks: O rel {rel:.2e}");
    for (x, y) in acc.lse.iter().zip(&full.lse) {
        assert!((*x as f64 - y).abs() < 1e-5 * y.abs().max(1.0));
    }
}
