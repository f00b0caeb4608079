//! CPU tier for packed (varlen) batches: the reference's packing identities,
//! the isolation of sequences, and every validation error of the sequence
//! tables (DESIGN.md sections 1b and 6).

use fused_attn::internals::{check_seqlens, validate_varlen, TensorDesc};
use fused_attn::reference;
use fused_attn::{AttentionOptions, DType, Error, HostTensor, Layout, Mask, MaskAlignment};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect()
}

fn masks() -> Vec<AttentionOptions<'static>> {
    vec![
        AttentionOptions::new(Mask::Full),
        AttentionOptions::new(Mask::Causal),
        AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft),
        AttentionOptions::new(Mask::window(5, 2)).with_scale(-0.7),
        AttentionOptions::new(Mask::Causal).with_softcap(3.0),
    ]
}

/// B sequences of equal lengths packed end to end are the rectangular batch
/// read as one sequence of all tokens: the results must be identical.
#[test]
fn equal_lengths_equal_the_rectangular_batch() {
    let mut rng = StdRng::seed_from_u64(1);
    let (b, lq, lk, hq, hk, d) = (3, 7, 11, 4, 2, 16);
    let (q, k, v) =
        (random(&mut rng, b * lq * hq * d), random(&mut rng, b * lk * hk * d), random(&mut rng, b * lk * hk * d));
    let cu_q: Vec<i32> = (0..=b).map(|i| (i * lq) as i32).collect();
    let cu_k: Vec<i32> = (0..=b).map(|i| (i * lk) as i32).collect();
    for opts in masks() {
        let rect = reference::forward(
            HostTensor::new(&q, Layout::bshd(b, lq, hq, d)),
            HostTensor::new(&k, Layout::bshd(b, lk, hk, d)),
            HostTensor::new(&v, Layout::bshd(b, lk, hk, d)),
            &opts,
        )
        .unwrap();
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
        // Same O layout ([B·Lq, Hq, D] is [B, Lq, Hq, D]); LSE [Hq, B·Lq] vs [B, Hq, Lq].
        assert_eq!(packed.o, rect.o, "{opts:?}");
        for bb in 0..b {
            for h in 0..hq {
                for i in 0..lq {
                    let (p, r) = (packed.lse[h * b * lq + bb * lq + i], rect.lse[(bb * hq + h) * lq + i]);
                    assert!(p == r || (p.is_infinite() && r.is_infinite()), "{opts:?} b{bb} h{h} i{i}: {p} vs {r}");
                }
            }
        }
        assert_eq!(packed.problem.batch, b);
    }
}

/// Changing the tokens of one sequence changes nothing in the others (no key
/// of another sequence is visible), and each sequence uses its own diagonal:
/// a sequence run alone gives the packed result's rows bit for bit.
#[test]
fn sequences_are_isolated_and_use_their_own_diagonal() {
    let mut rng = StdRng::seed_from_u64(2);
    let (hq, hk, d) = (6, 2, 24);
    // Lengths with empty sequences, Lq > Lk, Lq < Lk, and seqused_k below the stored keys.
    let lq = [5usize, 0, 9, 1, 4];
    let lk = [8usize, 3, 4, 0, 10];
    let used = [8i32, 2, 4, 0, 6];
    let cu = |l: &[usize]| -> Vec<i32> {
        std::iter::once(0)
            .chain(l.iter().scan(0, |s, &x| {
                *s += x as i32;
                Some(*s)
            }))
            .collect()
    };
    let (cu_q, cu_k) = (cu(&lq), cu(&lk));
    let (tq, tk) = (cu_q[5] as usize, cu_k[5] as usize);
    // Padded strides: every tensor its own row stride.
    let (q_row, k_row, v_row) = (hq * d + 8, hk * d + 16, hk * d + 24);
    let q = random(&mut rng, tq * q_row);
    let k = random(&mut rng, tk * k_row);
    let v = random(&mut rng, tk * v_row);
    let lay = |t: usize, h: usize, row: usize| Layout::strided_bshd([1, t, h, d], [t * row, row, d, 1]);
    for opts in masks() {
        for seqused in [None, Some(&used[..])] {
            let run = |k: &[bf16], v: &[bf16]| {
                reference::forward_varlen(
                    HostTensor::new(&q, lay(tq, hq, q_row)),
                    HostTensor::new(k, lay(tk, hk, k_row)),
                    HostTensor::new(v, lay(tk, hk, v_row)),
                    &cu_q,
                    &cu_k,
                    seqused,
                    &opts,
                )
                .unwrap()
            };
            let base = run(&k, &v);
            // Perturb sequence 2's keys and values: only sequence 2's rows may change.
            let (mut k2, mut v2) = (k.clone(), v.clone());
            for j in cu_k[2] as usize..cu_k[3] as usize {
                for x in 0..hk * d {
                    k2[j * k_row + x] = bf16::from_f32(-k2[j * k_row + x].to_f32() + 0.5);
                    v2[j * v_row + x] = bf16::from_f32(-v2[j * v_row + x].to_f32() + 0.5);
                }
            }
            let moved = run(&k2, &v2);
            for i in 0..tq {
                let in_seq2 = (cu_q[2] as usize..cu_q[3] as usize).contains(&i);
                let row = |r: &reference::Reference| r.o[i * hq * d..(i + 1) * hq * d].to_vec();
                // A row of sequence 2 that sees any key (finite LSE) must change.
                if in_seq2 && base.lse[i].is_finite() {
                    assert_ne!(row(&base), row(&moved), "{opts:?}: sequence 2's row {i} did not see its keys");
                } else if !in_seq2 {
                    assert_eq!(row(&base), row(&moved), "{opts:?}: row {i} saw sequence 2's keys");
                }
            }
            // Sequence 4 alone (own diagonal: Lk_b − Lq_b with its own lengths).
            let (q0, lq4, k0) = (cu_q[4] as usize, lq[4], cu_k[4] as usize);
            let lk4 = seqused.map_or(lk[4], |u| u[4] as usize);
            let alone = reference::forward(
                HostTensor::new(&q[q0 * q_row..], Layout::strided_bshd([1, lq4, hq, d], [lq4 * q_row, q_row, d, 1])),
                HostTensor::new(&k[k0 * k_row..], Layout::strided_bshd([1, lk4, hk, d], [lk4 * k_row, k_row, d, 1])),
                HostTensor::new(&v[k0 * v_row..], Layout::strided_bshd([1, lk4, hk, d], [lk4 * v_row, v_row, d, 1])),
                &opts,
            )
            .unwrap();
            assert_eq!(&base.o[q0 * hq * d..(q0 + lq4) * hq * d], &alone.o[..], "{opts:?}");
            // Empty query sequences write nothing; a sequence with no keys gives O = 0, LSE = -inf.
            let r3 = cu_q[3] as usize; // sequence 3: one query, no keys
            assert!(base.o[r3 * hq * d..(r3 + 1) * hq * d].iter().all(|&x| x == 0.0));
            assert!((0..hq).all(|h| base.lse[h * tq + r3] == f64::NEG_INFINITY));
        }
    }
}

fn seq_err(r: Result<fused_attn::SeqInfo, Error>) -> (&'static str, usize) {
    match r {
        Err(Error::SeqLens { arg, index, .. }) => (arg, index),
        other => panic!("expected a SeqLens error, got {other:?}"),
    }
}

#[test]
fn sequence_table_errors_name_the_table_and_entry() {
    assert_eq!(seq_err(check_seqlens(&[0], &[0], None)), ("cu_seqlens_q", 1));
    assert_eq!(seq_err(check_seqlens(&[], &[], None)), ("cu_seqlens_q", 0));
    assert_eq!(seq_err(check_seqlens(&[1, 4], &[0, 4], None)), ("cu_seqlens_q", 0));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 3], &[0, 4, 8], None)), ("cu_seqlens_q", 2));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 8], &[0, 4], None)), ("cu_seqlens_k", 2));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 8], &[0, 5, -1], None)), ("cu_seqlens_k", 2));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 8], &[2, 5, 9], None)), ("cu_seqlens_k", 0));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 8], &[0, 5, 9], Some(&[5]))), ("seqused_k", 1));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 8], &[0, 5, 9], Some(&[5, 5]))), ("seqused_k", 1));
    assert_eq!(seq_err(check_seqlens(&[0, 4, 8], &[0, 5, 9], Some(&[-1, 4]))), ("seqused_k", 0));
    let ok = check_seqlens(&[0, 4, 4, 10], &[0, 5, 9, 9], Some(&[5, 1, 0])).unwrap();
    assert_eq!((ok.batch, ok.total_q, ok.total_k, ok.max_q, ok.max_k), (3, 10, 9, 6, 5));
    // More sequences than the grid can hold.
    let many: Vec<i32> = vec![0; 70_000];
    assert!(matches!(check_seqlens(&many, &many, None), Err(Error::SizeOverflow { arg: "cu_seqlens_q", .. })));
}

#[test]
fn totals_and_batch_extent_are_checked_against_the_tensors() {
    let info = check_seqlens(&[0, 3, 7], &[0, 5, 9], None).unwrap();
    let d = |arg, t, h| TensorDesc { arg, layout: Layout::bshd(1, t, h, 8), len: t * h * 8 };
    let opts = AttentionOptions::new(Mask::Causal);
    let ok =
        validate_varlen(DType::BF16, &d("q", 7, 4), &d("k", 9, 2), &d("v", 9, 2), None, None, &info, &opts).unwrap();
    assert_eq!((ok.batch, ok.seqlen_q, ok.seqlen_k), (2, 4, 5));
    let e = validate_varlen(DType::BF16, &d("q", 8, 4), &d("k", 9, 2), &d("v", 9, 2), None, None, &info, &opts);
    assert!(matches!(e, Err(Error::SeqLens { arg: "cu_seqlens_q", index: 2, value: 7, .. })), "{e:?}");
    let e = validate_varlen(DType::BF16, &d("q", 7, 4), &d("k", 10, 2), &d("v", 10, 2), None, None, &info, &opts);
    assert!(matches!(e, Err(Error::SeqLens { arg: "cu_seqlens_k", .. })), "{e:?}");
    let q2 = TensorDesc { arg: "q", layout: Layout::bshd(2, 7, 4, 8), len: 2 * 7 * 4 * 8 };
    let e = validate_varlen(DType::BF16, &q2, &d("k", 9, 2), &d("v", 9, 2), None, None, &info, &opts);
    assert!(matches!(e, Err(Error::ShapeMismatch { arg: "q", dim: "batch", expected: 1, got: 2, .. })), "{e:?}");
    // The ordinary checks still run on the packed tensors.
    let e = validate_varlen(DType::BF16, &d("q", 7, 3), &d("k", 9, 2), &d("v", 9, 2), None, None, &info, &opts);
    assert!(matches!(e, Err(Error::HeadsNotDivisible { .. })), "{e:?}");
    // The reference checks the same.
    let x = vec![bf16::ZERO; 7 * 4 * 8];
    let r = reference::forward_varlen(
        HostTensor::new(&x, Layout::bshd(1, 7, 4, 8)),
        HostTensor::new(&x, Layout::bshd(1, 7, 2, 8)),
        HostTensor::new(&x, Layout::bshd(1, 7, 2, 8)),
        &[0, 3, 7],
        &[0, 5, 9],
        None,
        &opts,
    );
    assert!(matches!(r, Err(Error::SeqLens { arg: "cu_seqlens_k", .. })), "{r:?}");
}

/// Hostile tables: the largest i32 lengths, and more tokens claimed than the
/// tensors hold, are typed errors (never a panic or a wrapped size).
#[test]
fn hostile_tables_are_errors() {
    let info = check_seqlens(&[0, i32::MAX], &[0, i32::MAX], Some(&[i32::MAX])).unwrap();
    assert_eq!(info.max_q, i32::MAX as usize);
    let d = |arg, t| TensorDesc { arg, layout: Layout::bshd(1, t, 2, 8), len: t * 16 };
    let opts = AttentionOptions::new(Mask::Causal);
    let e = validate_varlen(DType::BF16, &d("q", 10), &d("k", 10), &d("v", 10), None, None, &info, &opts);
    assert!(matches!(e, Err(Error::SeqLens { arg: "cu_seqlens_q", .. })), "{e:?}");
    assert!(matches!(check_seqlens(&[0, 1, i32::MIN], &[0, 1, 2], None), Err(Error::SeqLens { index: 2, .. })));
}
