//! CPU tier for attention maps (DESIGN.md section 1b): the reference maps
//! are the weights of the reference forward (`Σ_j P_ij v_j = O_i`, same
//! LSE), rows sum to 1, masked entries are exactly 0 and rows with no
//! visible key all 0, GQA equals MHA over repeated KV heads, both
//! alignments, windows, softcap, a head subset is the matching slice of
//! every head's maps, the mean is the mean of the per-head maps; and every
//! validation error names its argument.

use fused_attn::internals::{validate_maps, LseDesc, MapDesc, TensorDesc};
use fused_attn::reference::{self, MapsReference};
use fused_attn::{
    Alibi, AttentionOptions, DType, Error, HeadValues, HostTensor, Layout, LseLayout, MapLayout, Mask, MaskAlignment,
    MAX_MAP_HEADS,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-amp..amp))).collect()
}

/// Q, K, V of `[b, lq, hq, d]`, `[b, lk, hk, d]`, Q in BHSD order, K and V
/// BSHD with padded rows, so that no stride is shared.
struct Inputs {
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    ql: Layout,
    kl: Layout,
}

fn inputs(seed: u64, (b, lq, lk, hq, hk, d): (usize, usize, usize, usize, usize, usize)) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let ql = Layout::bhsd(b, hq, lq, d);
    let row = hk * d + 8;
    let kl = Layout::strided_bshd([b, lk, hk, d], [lk * row, row, d, 1]);
    Inputs {
        q: random(&mut rng, b * hq * lq * d, 2.0),
        k: random(&mut rng, b * lk * row, 2.0),
        v: random(&mut rng, b * lk * row, 1.0),
        ql,
        kl,
    }
}

fn maps_of(x: &Inputs, heads: Option<&[usize]>, opts: &AttentionOptions) -> MapsReference {
    reference::attention_maps(HostTensor::new(&x.q, x.ql), HostTensor::new(&x.k, x.kl), heads, opts).unwrap()
}

/// Every check that holds for any problem: the maps are the forward's
/// weights (P·V = O, same LSE), rows sum to 1 or are all 0, masked entries
/// exactly 0, the mean the mean of the heads.
fn check_properties(x: &Inputs, opts: &AttentionOptions) {
    let r = maps_of(x, None, opts);
    let p = r.problem.problem;
    let (b_n, lq, lk, hq, d) = (p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.head_dim);
    let f =
        reference::forward(HostTensor::new(&x.q, x.ql), HostTensor::new(&x.k, x.kl), HostTensor::new(&x.v, x.kl), opts)
            .unwrap();
    for (a, e) in r.lse.iter().zip(&f.lse) {
        assert!(a == e || (a - e).abs() < 1e-12, "the maps' LSE {a} is not the forward's {e}");
    }
    let mut empty_rows = 0;
    for b in 0..b_n {
        for i in 0..lq {
            let (lo, hi) = p.key_range(i);
            let mut mean = vec![0.0; lk];
            for h in 0..hq {
                let row = &r.maps[((b * hq + h) * lq + i) * lk..][..lk];
                for (j, &w) in row.iter().enumerate() {
                    if j < lo || j >= hi {
                        assert_eq!(w, 0.0, "masked entry ({b},{h},{i},{j}) must be exactly 0");
                    } else {
                        assert!(w > 0.0 || w == 0.0 && p.softcap.is_none(), "visible weight {w}");
                    }
                    mean[j] += w / hq as f64;
                }
                let sum: f64 = row.iter().sum();
                // A sink takes its share of the row: 1 − e^{σ − LSE}.
                let sink = match opts.sinks {
                    Some(HeadValues::Host(s)) => f64::from(s[h]),
                    _ => f64::NEG_INFINITY,
                };
                let want = 1.0 - (sink - r.lse[(b * hq + h) * lq + i]).exp();
                if lo >= hi {
                    assert_eq!(sum, 0.0);
                    empty_rows += 1;
                } else {
                    assert!((sum - want).abs() < 1e-12, "row ({b},{h},{i}) sums to {sum}, not {want}");
                }
                // P·V is the forward's O.
                for c in 0..d {
                    let pv: f64 =
                        (lo..hi).map(|j| row[j] * f64::from(x.v[x.kl.offset(b, j, h / (hq / p.heads_kv), c)])).sum();
                    let o = f.o[((b * lq + i) * hq + h) * d + c];
                    assert!((pv - o).abs() < 1e-12, "P·V {pv} vs O {o} at ({b},{i},{h},{c})");
                }
            }
            let got = &r.mean[(b * lq + i) * lk..][..lk];
            for (g, e) in got.iter().zip(&mean) {
                assert!((g - e).abs() < 1e-14, "mean {g} vs {e}");
            }
        }
    }
    if opts.sinks.is_none() {
        assert!(r.lse.iter().all(|&l| l.is_finite() || l == f64::NEG_INFINITY));
    }
    if let Mask::Causal = p.mask {
        if p.alignment == MaskAlignment::BottomRight && lq > lk {
            assert_eq!(empty_rows, b_n * hq * (lq - lk), "rows with no visible key");
        }
    }
}

#[test]
fn properties_over_masks_alignments_gqa_softcap() {
    let shapes = [(2, 9, 23, 8, 2, 16), (1, 30, 12, 4, 1, 8), (2, 16, 16, 6, 3, 24)];
    let masks = [Mask::Full, Mask::Causal, Mask::window(3, 2), Mask::window(0, 0)];
    let mut seed = 1;
    for s in shapes {
        for mask in masks {
            for align in [MaskAlignment::BottomRight, MaskAlignment::TopLeft] {
                for cap in [None, Some(1.5f32)] {
                    seed += 1;
                    let mut opts = AttentionOptions::new(mask).with_alignment(align).with_scale(-0.3);
                    if let Some(c) = cap {
                        opts = opts.with_softcap(c);
                    }
                    check_properties(&inputs(seed, s), &opts);
                }
            }
        }
    }
}

#[test]
fn properties_with_alibi_and_sinks() {
    let (b, hq) = (2, 8);
    let slopes: Vec<f32> = (0..b * hq).map(|x| 0.05 + 0.1 * (x % 5) as f32).collect();
    let sinks: Vec<f32> = (0..hq).map(|h| h as f32 * 0.7 - 2.0).collect();
    let mut seed = 100;
    for mask in [Mask::Full, Mask::Causal, Mask::window(4, 2)] {
        for align in [MaskAlignment::BottomRight, MaskAlignment::TopLeft] {
            for (per_batch, with_sinks) in [(false, false), (true, false), (false, true), (true, true)] {
                seed += 1;
                let alibi = if per_batch {
                    Alibi::per_batch(HeadValues::Host(&slopes))
                } else {
                    Alibi::per_head(HeadValues::Host(&slopes[..hq]))
                };
                let mut opts = AttentionOptions::new(mask).with_alignment(align).with_alibi(alibi);
                if with_sinks {
                    opts = opts.with_sinks(HeadValues::Host(&sinks));
                }
                // Lq > Lk: rows with no visible key under causal masks.
                check_properties(&inputs(seed, (b, 14, 10, hq, 2, 16)), &opts);
            }
        }
    }
    // Without an ALiBi slope the bias is gone: slopes of 0 change nothing.
    let x = inputs(7, (b, 6, 9, hq, 2, 16));
    let zeros = vec![0.0f32; hq];
    let plain = maps_of(&x, None, &AttentionOptions::new(Mask::Causal));
    let zero =
        maps_of(&x, None, &AttentionOptions::new(Mask::Causal).with_alibi(Alibi::per_head(HeadValues::Host(&zeros))));
    assert_eq!(plain.maps, zero.maps);
    // A sink lowers every weight of its head by the same factor.
    let with = maps_of(&x, None, &AttentionOptions::new(Mask::Full).with_sinks(HeadValues::Host(&sinks)));
    let without = maps_of(&x, None, &AttentionOptions::new(Mask::Full));
    for (a, c) in with.maps.iter().zip(&without.maps) {
        assert!(a < c && *a > 0.0, "sink: {a} vs {c}");
    }
}

#[test]
fn gqa_equals_mha_with_repeated_kv() {
    let (b, lq, lk, hq, hk, d) = (2, 7, 19, 6, 2, 16);
    let x = inputs(5, (b, lq, lk, hq, hk, d));
    let opts = AttentionOptions::new(Mask::window(4, 1));
    // K with every KV head repeated for its query heads, contiguous [b, lk, hq, d].
    let mut rep = Vec::with_capacity(b * lk * hq * d);
    for bb in 0..b {
        for j in 0..lk {
            for h in 0..hq {
                let at = x.kl.offset(bb, j, h / (hq / hk), 0);
                rep.extend_from_slice(&x.k[at..at + d]);
            }
        }
    }
    let mha = Inputs { q: x.q.clone(), k: rep, v: Vec::new(), ql: x.ql, kl: Layout::bshd(b, lk, hq, d) };
    let (a, m) = (maps_of(&x, None, &opts), maps_of(&mha, None, &opts));
    assert_eq!(a.maps, m.maps);
    assert_eq!(a.mean, m.mean);
}

#[test]
fn head_subset_is_the_matching_slice() {
    let (b, lq, lk, hq) = (2, 5, 11, 8);
    let x = inputs(9, (b, lq, lk, hq, 2, 8));
    let opts = AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft);
    let all = maps_of(&x, None, &opts);
    let list = [6, 1, 3];
    let sub = maps_of(&x, Some(&list), &opts);
    assert_eq!(sub.problem.map_heads(), 3);
    assert_eq!(sub.mean, all.mean, "the mean is over every head, whatever the subset");
    for bb in 0..b {
        for (n, &h) in list.iter().enumerate() {
            assert_eq!(sub.problem.query_head(n), h);
            let want = &all.maps[((bb * hq + h) * lq) * lk..][..lq * lk];
            let got = &sub.maps[((bb * 3 + n) * lq) * lk..][..lq * lk];
            assert_eq!(got, want, "map head {n} = query head {h}");
        }
    }
}

#[test]
fn zero_lengths_give_empty_or_zero_maps() {
    let x = inputs(3, (1, 4, 0, 2, 1, 8));
    let r = maps_of(&x, None, &AttentionOptions::default());
    assert!(r.maps.is_empty() && r.mean.is_empty());
    assert!(r.lse.iter().all(|&l| l == f64::NEG_INFINITY));
    let x = inputs(3, (1, 0, 5, 2, 1, 8));
    assert!(maps_of(&x, None, &AttentionOptions::default()).maps.is_empty());
}

// ---------------------------------------------------------------------------
// Validation: every error names its argument.

struct Call {
    q: Layout,
    k: Layout,
    lse: Option<(LseLayout, usize)>,
    maps: Option<(MapLayout, usize)>,
    heads: Option<Vec<usize>>,
    mean: Option<(MapLayout, usize)>,
    out: Option<DType>,
    opts: AttentionOptions<'static>,
}

fn good() -> Call {
    let (b, lq, lk, hq, hk, d) = (2, 5, 7, 4, 2, 16);
    let maps = MapLayout::contiguous(b, hq, lq, lk);
    let mean = MapLayout::mean(b, lq, lk);
    Call {
        q: Layout::bshd(b, lq, hq, d),
        k: Layout::bshd(b, lk, hk, d),
        lse: Some((LseLayout::contiguous(b, hq, lq), b * hq * lq)),
        maps: Some((maps, maps.span().unwrap())),
        heads: None,
        mean: Some((mean, mean.span().unwrap())),
        out: None,
        opts: AttentionOptions::default(),
    }
}

fn check(c: &Call) -> Result<(), Error> {
    let t = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let lse = c.lse.map(|(layout, len)| LseDesc { layout, len });
    let maps = c.maps.map(|(layout, len)| MapDesc { arg: "maps", layout, len });
    let mean = c.mean.map(|(layout, len)| MapDesc { arg: "mean", layout, len });
    validate_maps(
        DType::BF16,
        c.out,
        &t("q", c.q),
        &t("k", c.k),
        lse.as_ref(),
        maps.as_ref(),
        c.heads.as_deref(),
        mean.as_ref(),
        &c.opts,
    )
    .map(|_| ())
}

fn expect(c: Call, want: impl Fn(&Error) -> bool, what: &str) {
    match check(&c) {
        Err(e) if want(&e) => {}
        other => panic!("{what}: got {other:?}"),
    }
}

#[test]
fn a_good_call_validates() {
    check(&good()).unwrap();
    let mut c = good();
    c.heads = Some(vec![3, 0]);
    c.maps = Some((MapLayout::contiguous(2, 2, 5, 7), 2 * 2 * 5 * 7));
    c.out = Some(DType::BF16);
    check(&c).unwrap();
    // Maps inside a larger, padded buffer.
    let mut c = good();
    let l = MapLayout::strided([2, 4, 5, 7], [4 * 5 * 9 + 3, 5 * 9, 9, 1]);
    c.maps = Some((l, l.span().unwrap()));
    c.mean = None;
    check(&c).unwrap();
}

#[test]
fn every_validation_error_names_its_argument() {
    let mut c = good();
    c.maps = None;
    c.mean = None;
    expect(c, |e| matches!(e, Error::InvalidOption { arg: "maps", .. }), "nothing requested");

    let mut c = good();
    c.maps = None;
    c.heads = Some(vec![0]);
    expect(c, |e| matches!(e, Error::InvalidOption { arg: "heads", .. }), "heads without maps");

    for (heads, what) in [
        (vec![], "empty list"),
        (vec![4], "head out of range"),
        (vec![1, 2, 1], "duplicate"),
        ((0..MAX_MAP_HEADS + 1).collect(), "too many"),
    ] {
        let mut c = good();
        c.maps = Some((MapLayout::contiguous(2, heads.len(), 5, 7), 2 * heads.len().max(1) * 35));
        c.heads = Some(heads);
        expect(c, |e| matches!(e, Error::InvalidOption { arg: "heads", .. }), what);
    }

    let mut c = good();
    c.out = Some(DType::F16);
    expect(c, |e| matches!(e, Error::DTypeMismatch { arg: "maps", .. }), "f16 maps of bf16 inputs");

    for (i, dim) in ["batch", "heads", "seqlen", "keys"].into_iter().enumerate() {
        let mut shape = [2, 4, 5, 7];
        shape[i] += 1;
        let mut c = good();
        let l = MapLayout::contiguous(shape[0], shape[1], shape[2], shape[3]);
        c.maps = Some((l, l.span().unwrap()));
        expect(c, |e| matches!(e, Error::ShapeMismatch { arg: "maps", dim: d, .. } if *d == dim), dim);
    }
    let mut c = good();
    let l = MapLayout::contiguous(2, 2, 5, 7);
    c.mean = Some((l, l.span().unwrap()));
    expect(c, |e| matches!(e, Error::ShapeMismatch { arg: "mean", dim: "heads", .. }), "mean with 2 heads");

    let mut c = good();
    let l = MapLayout::strided([2, 4, 5, 7], [4 * 5 * 14, 5 * 14, 14, 2]);
    c.maps = Some((l, l.span().unwrap()));
    expect(c, |e| matches!(e, Error::LastDimStride { arg: "maps", stride: 2 }), "key stride 2");

    let mut c = good();
    let l = MapLayout::strided([2, 1, 5, 7], [35, 35, 3, 1]);
    c.mean = Some((l, l.span().unwrap()));
    expect(c, |e| matches!(e, Error::Overlapping { arg: "mean", .. }), "overlapping rows");

    let mut c = good();
    c.maps = Some((MapLayout::contiguous(2, 4, 5, 7), 2 * 4 * 5 * 7 - 1));
    expect(c, |e| matches!(e, Error::OutOfBounds { arg: "maps", .. }), "maps one short");

    let mut c = good();
    c.mean = Some((MapLayout::mean(2, 5, 7), 69));
    expect(c, |e| matches!(e, Error::OutOfBounds { arg: "mean", .. }), "mean one short");

    let mut c = good();
    let l = MapLayout::strided([2, 4, 5, 7], [usize::MAX / 2, 35, 7, 1]);
    c.maps = Some((l, usize::MAX));
    expect(c, |e| matches!(e, Error::SizeOverflow { arg: "maps", .. }), "span overflow");

    let mut c = good();
    c.lse = Some((LseLayout::contiguous(2, 4, 4), 32));
    expect(c, |e| matches!(e, Error::ShapeMismatch { arg: "lse", .. }), "lse of another length");

    let mut c = good();
    c.k = Layout::bshd(2, 7, 3, 16);
    expect(c, |e| matches!(e, Error::HeadsNotDivisible { .. }), "Hq % Hk");

    let mut c = good();
    c.opts = AttentionOptions::default().with_softcap(-1.0);
    expect(c, |e| matches!(e, Error::InvalidOption { arg: "softcap", .. }), "bad softcap");

    // A grid beyond 2^31 - 1 CTAs (2^28 rows, 2^28 keys: 2^49 tiles).
    let mut c = good();
    let (lq, lk) = (1 << 28, 1 << 28);
    c.q = Layout::bshd(1, lq, 1, 8);
    c.k = Layout::bshd(1, lk, 1, 8);
    c.lse = None;
    c.maps = None;
    let l = MapLayout::mean(1, lq, lk);
    c.mean = Some((l, l.span().unwrap()));
    expect(c, |e| matches!(e, Error::SizeOverflow { arg: "mean", .. }), "grid overflow");
}

#[test]
fn the_reference_refuses_what_the_gpu_path_refuses() {
    let x = inputs(4, (1, 3, 4, 4, 2, 8));
    let q = HostTensor::new(&x.q, x.ql);
    let k = HostTensor::new(&x.k, x.kl);
    let opts = AttentionOptions::default();
    assert!(matches!(
        reference::attention_maps(q, k, Some(&[0, 0]), &opts),
        Err(Error::InvalidOption { arg: "heads", .. })
    ));
    assert!(matches!(
        reference::attention_maps(q, k, Some(&[9]), &opts),
        Err(Error::InvalidOption { arg: "heads", .. })
    ));
    let short = HostTensor::new(&x.k[..10], x.kl);
    assert!(matches!(reference::attention_maps(q, short, None, &opts), Err(Error::OutOfBounds { arg: "k", .. })));
    // Lq·Lk beyond the reference's limit.
    let big_q = Layout::strided_bshd([1, 1 << 16, 4, 8], [0, 0, 8, 1]);
    let big_k = Layout::strided_bshd([1, 1 << 14, 2, 8], [0, 0, 8, 1]);
    let r = reference::attention_maps(HostTensor::new(&x.q, big_q), HostTensor::new(&x.k, big_k), None, &opts);
    assert!(matches!(r, Err(Error::SizeOverflow { arg: "q", .. })), "{r:?}");
}
