//! candle tier (cargo feature `candle`): `fused_attn::candle_ops` on candle
//! CPU tensors against the crate's reference, bit for bit (the op rounds the
//! same f64 result once), over contiguous and strided views; and a small
//! attention block written with candle ops against plain candle attention.
//!
//! `cargo test --features candle --test candle`

use candle_core::{DType, Device, IndexOp, Tensor, D};
use fused_attn::candle_ops::{self, FusedAttn};
use fused_attn::{reference, AttentionOptions, Element, HostTensor, Layout, Mask, MaskAlignment};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.random_range(-2.0..2.0))).collect()
}

/// The reference on contiguous `[B, L, H, D]` data, rounded to `T` as the op rounds it.
fn expected<T: Element + candle_core::WithDType>(
    q: (&[T], [usize; 4]),
    k: (&[T], [usize; 4]),
    v: (&[T], [usize; 4]),
    opts: &AttentionOptions,
    round: fn(f64) -> T,
) -> Vec<T> {
    fn t<T>((data, [b, l, h, d]): (&[T], [usize; 4])) -> HostTensor<'_, T> {
        HostTensor::new(data, Layout::bshd(b, l, h, d))
    }
    let r = reference::forward(t(q), t(k), t(v), opts).expect("reference");
    r.o.into_iter().map(round).collect()
}

fn to_vec<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

struct Case {
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
}

const CASES: &[Case] = &[
    Case { b: 2, lq: 7, lk: 7, hq: 4, hk: 4, d: 16 },
    Case { b: 1, lq: 5, lk: 13, hq: 6, hk: 2, d: 32 }, // GQA 3:1, Lq < Lk
    Case { b: 2, lq: 9, lk: 4, hq: 4, hk: 1, d: 8 },   // MQA, Lq > Lk: causal leaves empty rows
];

/// Runs `op` on contiguous candle tensors of `T` and compares with the reference under `opts`.
fn check_contiguous<T: Element + candle_core::WithDType + std::fmt::Debug>(
    round: fn(f64) -> T,
    opts: &AttentionOptions,
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
) {
    let mut rng = StdRng::seed_from_u64(7);
    for c in CASES {
        let (qs, ks) = ([c.b, c.lq, c.hq, c.d], [c.b, c.lk, c.hk, c.d]);
        let (q, k, v) = (
            random::<T>(&mut rng, qs.iter().product()),
            random(&mut rng, ks.iter().product()),
            random(&mut rng, ks.iter().product()),
        );
        let cpu = &Device::Cpu;
        let qt = Tensor::from_slice(&q, &qs, cpu).unwrap();
        let kt = Tensor::from_slice(&k, &ks, cpu).unwrap();
        let vt = Tensor::from_slice(&v, &ks, cpu).unwrap();
        let o = op(&qt, &kt, &vt).unwrap();
        assert_eq!(o.dims(), &qs);
        assert_eq!(o.dtype(), qt.dtype());
        let want = expected((&q, qs), (&k, ks), (&v, ks), opts, round);
        let got: Vec<T> = to_vec(&o);
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{opts:?} b{} lq{} lk{}",
            c.b,
            c.lq,
            c.lk
        );
    }
}

#[test]
fn flash_attn_causal_and_full_match_reference_f16_bf16() {
    for causal in [false, true] {
        let mask = if causal { Mask::Causal } else { Mask::Full };
        let opts = AttentionOptions::new(mask).with_scale(0.3);
        check_contiguous::<f16>(f16::from_f64, &opts, |q, k, v| candle_ops::flash_attn(q, k, v, 0.3, causal));
        check_contiguous::<bf16>(bf16::from_f64, &opts, |q, k, v| candle_ops::flash_attn(q, k, v, 0.3, causal));
    }
}

#[test]
fn causal_is_bottom_right_like_flash_attention() {
    // Lq > Lk: the first Lq - Lk queries see no key and give zeros.
    let cpu = &Device::Cpu;
    let q = Tensor::ones((1, 6, 1, 8), DType::BF16, cpu).unwrap();
    let kv = Tensor::ones((1, 2, 1, 8), DType::BF16, cpu).unwrap();
    let o = candle_ops::flash_attn(&q, &kv, &kv, 1.0, true).unwrap();
    let rows: Vec<f32> = to_vec::<f32>(&o.to_dtype(DType::F32).unwrap().i((0, .., 0, 0)).unwrap());
    assert_eq!(rows, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
}

#[test]
fn windowed_follows_candle_flash_attn_rules() {
    for (left, right, mask) in [
        (Some(3), Some(1), Mask::window(3, 1)),
        (Some(0), Some(0), Mask::window(0, 0)),
        (None, Some(0), Mask::Causal),
        (None, None, Mask::Full),
        (Some(1000), Some(1000), Mask::Full), // larger than Lk: unbounded
    ] {
        let opts = AttentionOptions::new(mask).with_scale(0.25);
        let f = move |q: &Tensor, k: &Tensor, v: &Tensor| candle_ops::flash_attn_windowed(q, k, v, 0.25, left, right);
        check_contiguous::<f16>(f16::from_f64, &opts, f);
        check_contiguous::<bf16>(bf16::from_f64, &opts, f);
    }
    // One side unbounded becomes Lk, as candle-flash-attn passes it to the kernel.
    assert_eq!(candle_ops::flash_window_mask(Some(2), None, 10), Mask::window(2, 10));
    assert_eq!(candle_ops::flash_window_mask(None, Some(3), 10), Mask::window(10, 3));
    assert_eq!(candle_ops::flash_window_mask(Some(11), Some(0), 10), Mask::Causal);
}

#[test]
fn softcap_and_custom_op_options() {
    let opts = AttentionOptions::new(Mask::window(4, 0)).with_scale(0.5).with_softcap(5.0);
    check_contiguous::<bf16>(bf16::from_f64, &opts, |q, k, v| {
        candle_ops::flash_attn_windowed_softcap(q, k, v, 0.5, Some(4), Some(0), 5.0)
    });
    // The op itself takes any options, e.g. SDPA's top-left causal mask.
    let sdpa = AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft);
    check_contiguous::<f16>(f16::from_f64, &sdpa, |q, k, v| q.apply_op3(k, v, FusedAttn::new(sdpa)));
}

/// Strided inputs are read in place (or copied when the last dim is strided):
/// the result equals the one on contiguous copies.
#[test]
fn non_contiguous_views_match_contiguous() {
    let cpu = &Device::Cpu;
    let (b, s, h, hk, d) = (2, 11, 4, 2, 16);
    let mut rng = StdRng::seed_from_u64(3);
    for causal in [false, true] {
        // [B, H, S, D] storage viewed as [B, S, H, D], as candle models hold q/k/v.
        let q = Tensor::from_vec(random::<bf16>(&mut rng, b * h * s * d), (b, h, s, d), cpu)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        // K and V out of one fused [B, S, 2, Hk, D] tensor: a start offset and a large row stride.
        let kv = Tensor::from_vec(random::<bf16>(&mut rng, b * s * 2 * hk * d), (b, s, 2, hk, d), cpu).unwrap();
        let (k, v) = (kv.i((.., .., 0)).unwrap(), kv.i((.., .., 1)).unwrap());
        assert!(!q.is_contiguous() && !k.is_contiguous() && !v.is_contiguous());
        assert!(v.layout().start_offset() > 0);
        let got = candle_ops::flash_attn(&q, &k, &v, 0.2, causal).unwrap();
        let want = candle_ops::flash_attn(
            &q.contiguous().unwrap(),
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            0.2,
            causal,
        )
        .unwrap();
        assert_eq!(to_vec::<bf16>(&got), to_vec::<bf16>(&want));

        // Last dim strided ([B, S, D, H] transposed): copied first, same result.
        let qt = q.contiguous().unwrap().transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        assert_eq!(qt.dims(), q.dims());
        assert_ne!(qt.stride()[3], 1);
        let got = candle_ops::flash_attn(&qt, &k, &v, 0.2, causal).unwrap();
        assert_eq!(to_vec::<bf16>(&got), to_vec::<bf16>(&want));
    }
}

/// ALiBi (per head as candle-flash-attn takes it, and per batch entry) and
/// sinks through the candle functions, bit for bit against the reference.
#[test]
fn alibi_and_sinks_match_reference() {
    use fused_attn::{Alibi, HeadValues};
    let mut rng = StdRng::seed_from_u64(11);
    let cpu = &Device::Cpu;
    for c in CASES {
        let (qs, ks) = ([c.b, c.lq, c.hq, c.d], [c.b, c.lk, c.hk, c.d]);
        let (q, k, v) = (
            random::<bf16>(&mut rng, qs.iter().product()),
            random(&mut rng, ks.iter().product()),
            random(&mut rng, ks.iter().product()),
        );
        let (qt, kt, vt) = (
            Tensor::from_slice(&q, &qs, cpu).unwrap(),
            Tensor::from_slice(&k, &ks, cpu).unwrap(),
            Tensor::from_slice(&v, &ks, cpu).unwrap(),
        );
        let per_head = fused_attn::alibi_slopes(c.hq);
        let per_batch: Vec<f32> = (0..c.b * c.hq).map(|x| 0.1 + 0.2 * x as f32).collect();
        let sinks: Vec<f32> = (0..c.hq).map(|x| x as f32 - 1.5).collect();
        let head_t = Tensor::from_slice(&per_head, c.hq, cpu).unwrap();
        let batch_t = Tensor::from_slice(&per_batch, (c.b, c.hq), cpu).unwrap();
        let sinks_t = Tensor::from_slice(&sinks, c.hq, cpu).unwrap();
        let check = |o: Tensor, opts: AttentionOptions| {
            let want = expected((&q, qs), (&k, ks), (&v, ks), &opts, bf16::from_f64);
            let got: Vec<bf16> = to_vec(&o);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{opts:?}");
        };
        for causal in [false, true] {
            let mask = if causal { Mask::Causal } else { Mask::Full };
            let base = AttentionOptions::new(mask).with_scale(0.4);
            let o = candle_ops::flash_attn_alibi(&qt, &kt, &vt, &head_t, 0.4, causal).unwrap();
            check(o, base.with_alibi(Alibi::per_head(HeadValues::Host(&per_head))));
            let o = candle_ops::flash_attn_alibi(&qt, &kt, &vt, &batch_t, 0.4, causal).unwrap();
            check(o, base.with_alibi(Alibi::per_batch(HeadValues::Host(&per_batch))));
        }
        let o = candle_ops::flash_attn_alibi_windowed_softcap(&qt, &kt, &vt, Some(&head_t), 0.4, Some(2), Some(1), 4.0)
            .unwrap();
        let opts = AttentionOptions::new(candle_ops::flash_window_mask(Some(2), Some(1), c.lk))
            .with_scale(0.4)
            .with_softcap(4.0)
            .with_alibi(Alibi::per_head(HeadValues::Host(&per_head)));
        check(o, opts);
        let op = FusedAttn::new(AttentionOptions::new(Mask::Causal)).with_alibi_slopes(head_t.clone());
        let o = qt.apply_op3(&kt, &vt, op.with_sinks(sinks_t.clone())).unwrap();
        let opts = AttentionOptions::new(Mask::Causal)
            .with_alibi(Alibi::per_head(HeadValues::Host(&per_head)))
            .with_sinks(HeadValues::Host(&sinks));
        check(o, opts);
        // Slopes of the wrong dtype, rank or count, and sinks per batch, are errors.
        let f64_slopes = head_t.to_dtype(DType::F64).unwrap();
        assert!(candle_ops::flash_attn_alibi(&qt, &kt, &vt, &f64_slopes, 0.4, true)
            .unwrap_err()
            .to_string()
            .contains("f32"));
        let r3 = head_t.reshape((1, 1, c.hq)).unwrap();
        assert!(candle_ops::flash_attn_alibi(&qt, &kt, &vt, &r3, 0.4, true).is_err());
        let short = head_t.narrow(0, 0, c.hq - 1).unwrap();
        let e = candle_ops::flash_attn_alibi(&qt, &kt, &vt, &short, 0.4, true).unwrap_err().to_string();
        assert!(e.contains("alibi_slopes"), "{e}");
        let op = FusedAttn::new(AttentionOptions::default()).with_sinks(batch_t.clone());
        assert!(qt.apply_op3(&kt, &vt, op).is_err());
    }
}

/// candle-flash-attn's `flash_attn_varlen*` on packed `[T, H, D]` tensors,
/// bit for bit against the packed reference (u32 tables as there).
#[test]
fn varlen_functions_match_reference() {
    use fused_attn::{Alibi, HeadValues};
    let mut rng = StdRng::seed_from_u64(12);
    let cpu = &Device::Cpu;
    let (lq, lk) = ([3usize, 0, 7, 1], [5usize, 2, 4, 9]);
    let cu = |l: &[usize]| {
        std::iter::once(0)
            .chain(l.iter().scan(0, |a, &x| {
                *a += x;
                Some(*a)
            }))
            .collect::<Vec<usize>>()
    };
    let (cu_q, cu_k) = (cu(&lq), cu(&lk));
    let (tq, tk, hq, hk, d) = (cu_q[4], cu_k[4], 4, 2, 16);
    let (q, k, v) = (
        random::<f16>(&mut rng, tq * hq * d),
        random::<f16>(&mut rng, tk * hk * d),
        random::<f16>(&mut rng, tk * hk * d),
    );
    let (qt, kt, vt) = (
        Tensor::from_slice(&q, (tq, hq, d), cpu).unwrap(),
        Tensor::from_slice(&k, (tk, hk, d), cpu).unwrap(),
        Tensor::from_slice(&v, (tk, hk, d), cpu).unwrap(),
    );
    let u32s = |c: &[usize]| Tensor::from_vec(c.iter().map(|&x| x as u32).collect::<Vec<u32>>(), c.len(), cpu).unwrap();
    let (sq, sk) = (u32s(&cu_q), u32s(&cu_k));
    let (cq, ck): (Vec<i32>, Vec<i32>) =
        (cu_q.iter().map(|&x| x as i32).collect(), cu_k.iter().map(|&x| x as i32).collect());
    let slopes = fused_attn::alibi_slopes(hq);
    let slopes_t = Tensor::from_slice(&slopes, hq, cpu).unwrap();
    let check = |o: Tensor, opts: AttentionOptions| {
        assert_eq!(o.dims(), &[tq, hq, d]);
        let r = reference::forward_varlen(
            HostTensor::new(&q, Layout::bshd(1, tq, hq, d)),
            HostTensor::new(&k, Layout::bshd(1, tk, hk, d)),
            HostTensor::new(&v, Layout::bshd(1, tk, hk, d)),
            &cq,
            &ck,
            None,
            &opts,
        )
        .unwrap();
        let got: Vec<f16> = to_vec(&o);
        assert!(got.iter().zip(&r.o).all(|(a, &b)| a.to_bits() == f16::from_f64(b).to_bits()), "{opts:?}");
    };
    for causal in [false, true] {
        let mask = if causal { Mask::Causal } else { Mask::Full };
        let o = candle_ops::flash_attn_varlen(&qt, &kt, &vt, &sq, &sk, 7, 9, 0.3, causal).unwrap();
        check(o, AttentionOptions::new(mask).with_scale(0.3));
        let o = candle_ops::flash_attn_varlen_alibi(&qt, &kt, &vt, &slopes_t, &sq, &sk, 7, 9, 0.3, causal).unwrap();
        check(o, AttentionOptions::new(mask).with_scale(0.3).with_alibi(Alibi::per_head(HeadValues::Host(&slopes))));
    }
    let o = candle_ops::flash_attn_varlen_windowed(&qt, &kt, &vt, &sq, &sk, 7, 9, 0.3, Some(2), Some(0)).unwrap();
    check(o, AttentionOptions::new(Mask::window(2, 0)).with_scale(0.3));
    let o = candle_ops::flash_attn_varlen_alibi_windowed(
        &qt,
        &kt,
        &vt,
        None,
        &sq,
        &sk,
        7,
        9,
        0.3,
        Some(1),
        None,
        Some(3.0),
    )
    .unwrap();
    check(o, AttentionOptions::new(Mask::window(1, 9)).with_scale(0.3).with_softcap(3.0));
    // A transposed [H, T, D] view reads in place and gives the same result.
    let qh = qt.transpose(0, 1).unwrap().contiguous().unwrap().transpose(0, 1).unwrap();
    let o = candle_ops::flash_attn_varlen(&qh, &kt, &vt, &sq, &sk, 7, 9, 0.3, true).unwrap();
    check(o, AttentionOptions::new(Mask::Causal).with_scale(0.3));
    // Errors: max_seqlen below a sequence, a bad table, a rank-4 q.
    assert!(candle_ops::flash_attn_varlen(&qt, &kt, &vt, &sq, &sk, 6, 9, 0.3, true).is_err());
    let f = Tensor::from_vec(vec![0f32, 1.0], 2, cpu).unwrap();
    assert!(candle_ops::flash_attn_varlen(&qt, &kt, &vt, &f, &sk, 7, 9, 0.3, true).is_err());
    let bad = u32s(&[0, 3, 2, 9, 11]);
    let e = candle_ops::flash_attn_varlen(&qt, &kt, &vt, &bad, &sk, 7, 9, 0.3, true).unwrap_err().to_string();
    assert!(e.contains("cu_seqlens_q"), "{e}");
    let q4 = qt.unsqueeze(0).unwrap();
    assert!(candle_ops::flash_attn_varlen(&q4, &kt, &vt, &sq, &sk, 7, 9, 0.3, true).is_err());
}

#[test]
fn errors_are_candle_errors_with_our_message() {
    let cpu = &Device::Cpu;
    let t = |shape: &[usize], dt| Tensor::zeros(shape, dt, cpu).unwrap();
    let q = t(&[1, 4, 3, 8], DType::F16);
    // Heads not divisible: our validation's message comes through.
    let err = candle_ops::flash_attn(&q, &t(&[1, 4, 2, 8], DType::F16), &t(&[1, 4, 2, 8], DType::F16), 1.0, false)
        .unwrap_err();
    let ours = fused_attn::Error::HeadsNotDivisible { heads_q: 3, heads_kv: 2 }.to_string();
    assert!(err.to_string().contains(&ours), "{err}");
    // Unsupported dtypes, mixed dtypes, rank.
    let f32q = t(&[1, 4, 3, 8], DType::F32);
    assert!(candle_ops::flash_attn(&f32q, &f32q, &f32q, 1.0, false)
        .unwrap_err()
        .to_string()
        .contains("f16 or all bf16"));
    let bq = t(&[1, 4, 3, 8], DType::BF16);
    assert!(candle_ops::flash_attn(&q, &bq, &bq, 1.0, false).is_err());
    let r3 = t(&[4, 3, 8], DType::F16);
    assert!(candle_ops::flash_attn(&r3, &r3, &r3, 1.0, false).is_err());
    assert!(q
        .apply_op3(&q, &r3, FusedAttn::new(AttentionOptions::default()))
        .unwrap_err()
        .to_string()
        .contains("rank 4"));
    // A bad softcap is our BadOption.
    assert!(candle_ops::flash_attn_windowed_softcap(&q, &q, &q, 1.0, None, None, -1.0).is_err());
}

/// A small attention block: projections with candle ops, our op in bf16, and
/// the output projection, against plain candle `softmax(QKᵀ·scale + mask)V`
/// in f32 on the same bf16-rounded Q, K, V.
#[test]
fn attention_block_end_to_end() {
    let cpu = &Device::Cpu;
    let (b, s, e, h, hk, d) = (2, 24, 64, 4, 2, 16);
    let x = Tensor::randn(0f32, 1.0, (b, s, e), cpu).unwrap();
    let w = |out: usize| (Tensor::randn(0f32, 1.0, (e, out), cpu).unwrap() / (e as f64).sqrt()).unwrap();
    let (wq, wk, wv, wo) = (w(h * d), w(hk * d), w(hk * d), w(e));
    let proj = |w: &Tensor, heads: usize| {
        x.broadcast_matmul(w).unwrap().reshape((b, s, heads, d)).unwrap().to_dtype(DType::BF16).unwrap()
    };
    let (q, k, v) = (proj(&wq, h), proj(&wk, hk), proj(&wv, hk));
    let scale = 1.0 / (d as f32).sqrt();

    let ours = candle_ops::flash_attn(&q, &k, &v, scale, true).unwrap();
    let ours = ours.to_dtype(DType::F32).unwrap().reshape((b, s, h * d)).unwrap().broadcast_matmul(&wo).unwrap();

    // Plain candle, f32, [B, H, S, D] with the KV heads repeated.
    let heads = |t: &Tensor| t.to_dtype(DType::F32).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let repeat = |t: Tensor| {
        let t = t.unsqueeze(2).unwrap().broadcast_as((b, hk, h / hk, s, d)).unwrap();
        t.contiguous().unwrap().reshape((b, h, s, d)).unwrap()
    };
    let (qf, kf, vf) = (heads(&q), repeat(heads(&k)), repeat(heads(&v)));
    let mask: Vec<f32> = (0..s * s).map(|ij| if ij % s > ij / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (s, s), cpu).unwrap();
    let scores = (qf.matmul(&kf.t().unwrap()).unwrap() * scale as f64).unwrap().broadcast_add(&mask).unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap();
    let p = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let p = p.broadcast_div(&p.sum_keepdim(D::Minus1).unwrap()).unwrap();
    let plain = p.matmul(&vf).unwrap().transpose(1, 2).unwrap().reshape((b, s, h * d)).unwrap();
    let plain = plain.broadcast_matmul(&wo).unwrap();

    let (a, r) = (to_vec::<f32>(&ours), to_vec::<f32>(&plain));
    let err: f64 = a.iter().zip(&r).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = r.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    // bf16 rounding of O alone is a relative 2^-9 per element.
    assert!(err / norm < 1e-2, "relative L2 error {}", err / norm);
    let max_abs = a.iter().zip(&r).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale_out = r.iter().fold(0f32, |m, y| m.max(y.abs()));
    assert!(max_abs <= 2e-2 * scale_out, "max abs error {max_abs} of {scale_out}");
}

/// candle autograd through the op (CPU): the gradients of `Σ O ∘ dO` that
/// candle's backward pass returns for Q, K and V (as `Var`s, through a
/// transposed `[B, H, S, D]` view) are [`reference::backward`]'s, rounded
/// once to the dtype, bit for bit, for GQA, a causal mask and ALiBi with a
/// softcap (`flash_attn_alibi_windowed_softcap`).
#[test]
fn candle_backward_is_the_reference_gradient() {
    let mut rng = StdRng::seed_from_u64(23);
    let (b, lq, lk, hq, hk, d) = (2, 6, 9, 4, 2, 16);
    let dev = Device::Cpu;
    let (q, k, v, d_o): (Vec<bf16>, Vec<bf16>, Vec<bf16>, Vec<bf16>) = (
        random(&mut rng, b * lq * hq * d),
        random(&mut rng, b * lk * hk * d),
        random(&mut rng, b * lk * hk * d),
        random(&mut rng, b * lq * hq * d),
    );
    let slopes: Vec<f32> = (0..hq).map(|h| 0.05 * (h + 1) as f32).collect();
    // Vars of [B, H, S, D], read through their transpose (no copy).
    let var = |x: &[bf16], l, h| {
        let t =
            Tensor::from_vec(x.to_vec(), (b, l, h, d), &dev).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        candle_core::Var::from_tensor(&t).unwrap()
    };
    let (qv, kv, vv) = (var(&q, lq, hq), var(&k, lk, hk), var(&v, lk, hk));
    let slopes_t = Tensor::from_vec(slopes.clone(), hq, &dev).unwrap();
    let view = |x: &candle_core::Var| x.as_tensor().transpose(1, 2).unwrap();
    let o = candle_ops::flash_attn_alibi_windowed_softcap(
        &view(&qv),
        &view(&kv),
        &view(&vv),
        Some(&slopes_t),
        0.3,
        Some(4),
        Some(0),
        5.0,
    )
    .unwrap();
    let dot = Tensor::from_vec(d_o.clone(), (b, lq, hq, d), &dev).unwrap();
    let loss = (o * &dot).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();

    let opts = AttentionOptions::new(Mask::window(4, 0))
        .with_scale(0.3)
        .with_softcap(5.0)
        .with_alibi(fused_attn::Alibi::per_head(fused_attn::HeadValues::Host(&slopes)));
    let (ql, kl) = (Layout::bshd(b, lq, hq, d), Layout::bshd(b, lk, hk, d));
    let want = reference::backward(
        HostTensor::new(&q, ql),
        HostTensor::new(&k, kl),
        HostTensor::new(&v, kl),
        HostTensor::new(&d_o, ql),
        &opts,
    )
    .unwrap();
    for (name, var, want, l, h) in
        [("dq", &qv, &want.dq, lq, hq), ("dk", &kv, &want.dk, lk, hk), ("dv", &vv, &want.dv, lk, hk)]
    {
        // The Var is [B, H, S, D]: its gradient back in [B, S, H, D] order.
        let got: Vec<bf16> =
            to_vec(&grads.get(var.as_tensor()).unwrap().transpose(1, 2).unwrap().contiguous().unwrap());
        assert_eq!(got.len(), b * l * h * d);
        let want: Vec<bf16> = want.iter().map(|&x| bf16::from_f64(x)).collect();
        assert_eq!(got, want, "{name}");
        assert!(want.iter().any(|x| x.to_f32() != 0.0), "{name} is all zeros: the check would be empty");
    }
}
