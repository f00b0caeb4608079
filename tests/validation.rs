//! CPU tier: every row of DESIGN.md section 6 that needs no GPU returns its
//! typed error naming the argument. (Foreign contexts, launch and allocation
//! failures are GPU-tier tests in tests/gpu.rs.)

use fused_attn::internals::{check_alignment, check_dtypes, validate, LseDesc, TensorDesc};
use fused_attn::{AttentionOptions, DType, Error, HostTensor, KernelFamily, Layout, LseLayout, Mask};
use half::bf16;

fn desc(arg: &'static str, layout: Layout) -> TensorDesc {
    TensorDesc { arg, layout, len: layout.span().unwrap() }
}

/// A valid problem: Q [2, 5, 4, 64], K/V [2, 7, 2, 64], O like Q.
fn good() -> [TensorDesc; 4] {
    let q = Layout::bshd(2, 5, 4, 64);
    let kv = Layout::bshd(2, 7, 2, 64);
    [desc("q", q), desc("k", kv), desc("v", kv), desc("o", q)]
}

/// `lse`: the length of a contiguous `[B, Hq, Lq]` LSE buffer, if any.
fn check(t: &[TensorDesc; 4], lse: Option<usize>, opts: AttentionOptions) -> Result<fused_attn::Problem, Error> {
    let [b, lq, hq, _] = t[0].layout.shape;
    let lse = lse.map(|len| LseDesc { layout: LseLayout::contiguous(b, hq, lq), len });
    validate(DType::BF16, &t[0], &t[1], &t[2], Some(&t[3]), lse.as_ref(), &opts)
}

#[test]
fn a_valid_problem_passes() {
    let p = check(&good(), Some(2 * 4 * 5), AttentionOptions::new(Mask::Causal)).unwrap();
    assert_eq!((p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim), (2, 5, 7, 4, 2, 64));
    assert_eq!(p.scale, 0.125);
}

#[test]
fn rank_mismatch() {
    let e = Layout::from_bshd_dims(&[2, 5, 64], &[320, 64, 1]).unwrap_err();
    assert!(matches!(Layout::from_bhsd_dims(&[2, 5, 64], &[320, 64, 1]), Err(Error::Rank { arg: "shape", got: 3 })));
    assert!(matches!(e, Error::Rank { arg: "shape", got: 3 }), "{e}");
    let e = Layout::from_bshd_dims(&[2, 5, 1, 64], &[320, 64, 1]).unwrap_err();
    assert!(matches!(e, Error::Rank { arg: "strides", got: 3 }), "{e}");
    assert!(Layout::from_bshd_dims(&[2, 5, 1, 64], &[320, 64, 64, 1]).is_ok());
}

#[test]
fn dimension_mismatches_name_the_argument() {
    let cases: [(usize, usize, usize, &str, &str); 8] = [
        // (tensor index, dim index, new value, expected arg, expected dim)
        (1, 0, 3, "k", "batch"),
        (1, 3, 32, "k", "head_dim"),
        (2, 0, 1, "v", "batch"),
        (2, 1, 6, "v", "seqlen"),
        (2, 2, 1, "v", "heads"),
        (2, 3, 128, "v", "head_dim"),
        (3, 1, 4, "o", "seqlen"),
        (3, 2, 8, "o", "heads"),
    ];
    for (t, dim, val, arg, dname) in cases {
        let mut d = good();
        let mut shape = d[t].layout.shape;
        shape[dim] = val;
        d[t] =
            TensorDesc { arg: d[t].arg, layout: Layout::bshd(shape[0], shape[1], shape[2], shape[3]), len: usize::MAX };
        match check(&d, None, AttentionOptions::default()) {
            Err(Error::ShapeMismatch { arg: a, dim: dn, got, .. }) => {
                assert_eq!((a, dn, got), (arg, dname, val));
            }
            other => panic!("changing {arg}.{dname}: {other:?}"),
        }
    }
    let e = check(&good(), Some(39), AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "lse", needed: 40, len: 39 }), "{e}");
    // An LSE view of the wrong shape names its dimension.
    let d = good();
    let lse = LseDesc { layout: LseLayout::contiguous(2, 4, 6), len: 48 };
    let e =
        validate(DType::BF16, &d[0], &d[1], &d[2], Some(&d[3]), Some(&lse), &AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { arg: "lse", dim: "seqlen", expected: 5, got: 6, .. }), "{e}");
    // Strided LSE (a slice of a larger [B, H, L_max] buffer) is fine; a non-unit row stride is not.
    let lse = LseDesc { layout: LseLayout::strided([2, 4, 5], [4 * 8, 8, 1]), len: 64 };
    assert!(validate(DType::BF16, &d[0], &d[1], &d[2], Some(&d[3]), Some(&lse), &AttentionOptions::default()).is_ok());
    let lse = LseDesc { layout: LseLayout::strided([2, 4, 5], [40, 10, 2]), len: 80 };
    let e =
        validate(DType::BF16, &d[0], &d[1], &d[2], Some(&d[3]), Some(&lse), &AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::LastDimStride { arg: "lse", stride: 2 }), "{e}");
}

#[test]
fn heads_not_divisible() {
    let mut d = good();
    let kv = Layout::bshd(2, 7, 3, 64);
    d[1] = desc("k", kv);
    d[2] = desc("v", kv);
    let e = check(&d, None, AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::HeadsNotDivisible { heads_q: 4, heads_kv: 3 }), "{e}");
}

#[test]
fn head_dim_rules() {
    for hd in [0, 12, 264, 512] {
        let q = Layout::bshd(1, 3, 1, hd);
        let d = [desc("q", q), desc("k", q), desc("v", q), desc("o", q)];
        let e = check(&d, None, AttentionOptions::default()).unwrap_err();
        assert!(matches!(e, Error::HeadDim { arg: "q", head_dim } if head_dim == hd), "{hd}: {e}");
    }
    for hd in (8..=256).step_by(8) {
        let q = Layout::bshd(1, 3, 1, hd);
        let d = [desc("q", q), desc("k", q), desc("v", q), desc("o", q)];
        assert!(check(&d, None, AttentionOptions::default()).is_ok(), "{hd}");
    }
}

#[test]
fn empty_batch_or_heads_but_empty_sequences_are_fine() {
    for (t, dim, name) in [(0, 0, "batch"), (0, 2, "heads"), (1, 2, "heads"), (1, 0, "batch")] {
        let mut d = good();
        let mut s = d[t].layout.shape;
        s[dim] = 0;
        d[t] = desc(d[t].arg, Layout::bshd(s[0], s[1], s[2], s[3]));
        let e = check(&d, None, AttentionOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Empty { arg, dim } if arg == d[t].arg && dim == name), "{e}");
    }
    let q = Layout::bshd(2, 0, 4, 64);
    let kv = Layout::bshd(2, 0, 2, 64);
    let d = [desc("q", q), desc("k", kv), desc("v", kv), desc("o", q)];
    assert!(check(&d, Some(0), AttentionOptions::new(Mask::Causal)).is_ok());
}

#[test]
fn last_dim_stride_must_be_one() {
    let mut d = good();
    let mut l = d[2].layout;
    l.strides[3] = 2;
    d[2] = TensorDesc { arg: "v", layout: l, len: usize::MAX };
    let e = check(&d, None, AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::LastDimStride { arg: "v", stride: 2 }), "{e}");
}

#[test]
fn view_reaching_past_its_buffer() {
    let mut d = good();
    d[3].len -= 1;
    let e = check(&d, None, AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "o", needed, len } if needed == len + 1), "{e}");
    // Padded strides that look fine per row but overrun at the end.
    let mut d = good();
    d[1] =
        TensorDesc { arg: "k", layout: Layout::strided_bshd([2, 7, 2, 64], [7 * 256, 256, 64, 1]), len: 2 * 7 * 128 };
    assert!(matches!(check(&d, None, AttentionOptions::default()), Err(Error::OutOfBounds { arg: "k", .. })));
    // The CPU reference refuses the same way.
    let buf = vec![bf16::ZERO; 10];
    let l = Layout::bshd(1, 2, 1, 8);
    let e = fused_attn::reference::forward(
        HostTensor::new(&buf, l),
        HostTensor::new(&buf, l),
        HostTensor::new(&buf, l),
        &AttentionOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "q", needed: 16, len: 10 }), "{e}");
}

#[test]
fn alignment_where_the_kernel_needs_it() {
    let t = desc("k", Layout::bshd(2, 7, 2, 64));
    assert!(check_alignment(&t, Some(0x1000), 2, KernelFamily::Sm80, "x").is_ok());
    let e = check_alignment(&t, Some(0x1002), 2, KernelFamily::Sm80, "x").unwrap_err();
    assert!(matches!(e, Error::Misaligned { arg: "k", .. }), "{e}");
    // The naive kernel reads elements one by one: 2-byte alignment is enough.
    assert!(check_alignment(&t, Some(0x1002), 2, KernelFamily::Naive, "x").is_ok());
    // A row stride of 68 elements = 136 bytes is not a multiple of 16.
    let padded = desc("q", Layout::strided_bshd([1, 4, 1, 64], [4 * 68, 68, 68, 1]));
    let e = check_alignment(&padded, Some(0x1000), 2, KernelFamily::Sm80, "x").unwrap_err();
    assert!(matches!(&e, Error::Misaligned { arg: "q", what: "seq stride", bytes: 136, .. }), "{e}");
}

#[test]
fn sizes_that_overflow_the_index_types() {
    let big = |b, l, h| Layout::bshd(b, l, h, 8);
    for (q, what) in [(big(1, (1 << 28) + 1, 1), "seqlen"), (big(65_536, 1, 1), "batch"), (big(1, 1, 65_536), "heads")]
    {
        let kv = Layout::bshd(q.batch(), 1, 1, 8);
        let d = [desc("q", q), desc("k", kv), desc("v", kv), desc("o", q)];
        let e = check(&d, None, AttentionOptions::default()).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { arg: "q", what: w, .. } if w == what), "{e}");
    }
    // Offsets that do not fit usize / i64.
    let huge = Layout::strided_bshd([2, 2, 1, 8], [usize::MAX / 2, 8, 8, 1]);
    let d = [
        desc("q", Layout::bshd(2, 2, 1, 8)),
        TensorDesc { arg: "k", layout: huge, len: usize::MAX },
        desc("v", Layout::bshd(2, 2, 1, 8)),
        desc("o", Layout::bshd(2, 2, 1, 8)),
    ];
    let e = check(&d, None, AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { arg: "k", .. }), "{e}");
}

#[test]
fn element_type_mismatch() {
    assert!(check_dtypes(DType::BF16, &[("k", DType::BF16), ("v", DType::BF16)]).is_ok());
    let e = check_dtypes(DType::BF16, &[("k", DType::BF16), ("v", DType::F16), ("o", DType::F16)]).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { arg: "v", expected: DType::BF16, got: DType::F16 }), "{e}");
}

#[test]
fn invalid_options() {
    for scale in [f32::NAN, f32::INFINITY, 1e38, -f32::MAX, 1.9e19] {
        let e = check(&good(), None, AttentionOptions::default().with_scale(scale)).unwrap_err();
        assert!(matches!(e, Error::InvalidOption { arg: "scale", .. }), "{scale}: {e}");
    }
    for scale in [0.0, -0.3, 1e-30, 1.8e19] {
        assert!(check(&good(), None, AttentionOptions::default().with_scale(scale)).is_ok(), "{scale}");
    }
    for cap in [0.0, -1.0, f32::INFINITY] {
        let e = check(&good(), None, AttentionOptions::default().with_softcap(cap)).unwrap_err();
        assert!(matches!(e, Error::InvalidOption { arg: "softcap", .. }), "{e}");
    }
}

#[test]
fn no_driver_no_device_is_an_error_not_a_panic() {
    match fused_attn::cuda_context(0) {
        Ok(_) => eprintln!("a GPU is present: NoDriver cannot be observed here"),
        Err(Error::NoDriver) => assert!(!fused_attn::driver_present()),
        Err(Error::NoDevice { ordinal: 0, count: 0 }) => {}
        Err(e) => panic!("unexpected: {e}"),
    }
    // An ordinal past the device count is NoDevice wherever a driver exists.
    match fused_attn::cuda_context(4096) {
        Err(Error::NoDriver) | Err(Error::NoDevice { ordinal: 4096, .. }) => {}
        other => panic!("ordinal 4096: {other:?}"),
    }
}

#[test]
fn crate_without_kernels_is_an_error() {
    let e = fused_attn::internals::require_kernels(false).unwrap_err();
    assert!(matches!(e, Error::KernelsNotBuilt), "{e}");
    assert!(e.to_string().contains("nvcc"));
    assert!(fused_attn::internals::require_kernels(true).is_ok());
}

#[test]
fn errors_print_the_argument() {
    let mut d = good();
    d[2].len = 3;
    let msg = check(&d, None, AttentionOptions::default()).unwrap_err().to_string();
    assert!(msg.starts_with("`v`"), "{msg}");
}

#[test]
fn overlapping_output_strides() {
    let mut d = good();
    // A zero batch stride: both batches would write the same rows.
    d[3] = TensorDesc { arg: "o", layout: Layout::strided_bshd([2, 5, 4, 64], [0, 256, 64, 1]), len: usize::MAX };
    let e = check(&d, None, AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Overlapping { arg: "o", .. }), "{e}");
    // Heads interleaved with a stride smaller than the head dim.
    d[3] = TensorDesc { arg: "o", layout: Layout::strided_bshd([2, 5, 4, 64], [5 * 256, 256, 32, 1]), len: usize::MAX };
    assert!(matches!(check(&d, None, AttentionOptions::default()), Err(Error::Overlapping { arg: "o", .. })));
    // Inputs may broadcast (stride 0): only outputs must not overlap.
    let mut d = good();
    d[1] = TensorDesc { arg: "k", layout: Layout::strided_bshd([2, 7, 2, 64], [0, 128, 64, 1]), len: usize::MAX };
    assert!(check(&d, None, AttentionOptions::default()).is_ok());
    // Permuted and padded layouts are fine.
    for l in [
        Layout::bhsd(2, 4, 5, 64),
        Layout::strided_bshd([2, 5, 4, 64], [5 * 300, 300, 64, 1]),
        Layout::bshd(1, 1, 1, 64),
    ] {
        assert!(l.is_non_overlapping(), "{l:?}");
    }
}
