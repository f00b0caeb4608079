//! CPU tier: inputs a hostile caller would try (issue 7 §1). Every one must
//! be a typed error or a correct answer — never a panic, an abort, a wrapped
//! size, or minutes of work. CI runs this file in release mode too, where
//! integer overflow wraps silently instead of panicking.

use std::time::{Duration, Instant};

use fused_attn::internals::{
    check_alignment, dispatch, validate, DeviceInfo, DispatchTensors, GridKind, KernelRow, TensorDesc, KERNEL_TABLE,
};
use fused_attn::reference;
use fused_attn::{AttentionOptions, DType, Error, HostTensor, KernelFamily, Layout, Mask};
use half::bf16;

const H100: DeviceInfo = DeviceInfo { sm: 90, sm_count: 132, smem_per_block: 227 * 1024 };

fn desc(arg: &'static str, layout: Layout, len: usize) -> TensorDesc {
    TensorDesc { arg, layout, len }
}

fn check(t: [TensorDesc; 4]) -> Result<fused_attn::Problem, Error> {
    validate(DType::BF16, &t[0], &t[1], &t[2], Some(&t[3]), None, &AttentionOptions::default())
}

#[test]
fn shapes_whose_products_wrap_are_size_errors() {
    // Every dimension within its own limit; the product is 2^64 elements.
    let shape = [1 << 15, 1 << 28, 1 << 15, 64];
    let tiny = Layout::strided_bshd(shape, [8, 8, 8, 1]);
    let kv = Layout::bshd(1 << 15, 1, 1, 64);
    let e = check([desc("q", tiny, 1), desc("k", kv, usize::MAX), desc("v", kv, usize::MAX), desc("o", tiny, 1)])
        .unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { arg: "q", what: "element count", .. }), "{e}");
    // The same O alone (Q broadcast and small): O overflows, it does not pass as non-overlapping.
    let q = Layout::strided_bshd(shape, [0, 0, 0, 1]);
    let e = check([desc("q", q, 64), desc("k", kv, usize::MAX), desc("v", kv, usize::MAX), desc("o", tiny, 1)])
        .unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { arg: "q", .. } | Error::SizeOverflow { arg: "o", .. }), "{e}");
    // What `forward` allocates for such a Q: the layout saturates, validation refuses it.
    let [b, l, h, d] = shape;
    let o = Layout::bshd(b, l, h, d);
    assert_eq!(o.numel(), None);
    assert!(!o.is_non_overlapping());
}

#[test]
fn an_output_that_overlaps_only_after_wrapping_is_refused() {
    // 2^15 · 2^28 · 2^15 · 64 wraps to 0 in usize: the old check then called it "empty, so fine".
    let o = Layout::strided_bshd([1 << 15, 1 << 28, 1 << 15, 64], [8, 8, 8, 1]);
    assert!(!o.is_non_overlapping());
    assert_eq!(o.numel(), None);
}

#[test]
fn constructors_saturate_instead_of_panicking() {
    let l = Layout::bshd(2, usize::MAX / 2, 4, 8);
    assert_eq!(l.strides[0], usize::MAX);
    assert_eq!(l.span(), None);
    let l = Layout::bhsd(usize::MAX, usize::MAX, usize::MAX, usize::MAX);
    assert_eq!(l.numel(), None);
    let q = Layout::bshd(2, usize::MAX / 2, 4, 8);
    let e = check([desc("q", q, usize::MAX), desc("k", q, usize::MAX), desc("v", q, usize::MAX), desc("o", q, 0)])
        .unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { arg: "q", .. }), "{e}");
}

#[test]
fn huge_strides_on_unit_dimensions() {
    // Strides of usize::MAX where the extent is 1 are never stepped: valid.
    let q = Layout::strided_bshd([1, 4, 1, 64], [usize::MAX, 64, usize::MAX, 1]);
    let p = check([desc("q", q, 256), desc("k", q, 256), desc("v", q, 256), desc("o", q, 256)]).unwrap();
    let t = [desc("q", q, 256), desc("k", q, 256), desc("v", q, 256), desc("o", q, 256)];
    let rows: Vec<KernelRow> = KERNEL_TABLE.to_vec();
    if !rows.is_empty() {
        let tensors = DispatchTensors { descs: &t, addrs: Some([0x1000; 4]) };
        assert!(dispatch(&rows, H100, &p, tensors, None, None).is_ok());
    }
    // Where they do step, a stride whose byte size overflows is a misalignment, not a panic.
    let wide = Layout::strided_bshd([1, 4, 2, 64], [0, 64, usize::MAX, 1]);
    let e = check_alignment(&desc("k", wide, usize::MAX), Some(0x1000), 2, KernelFamily::Sm80, "x").unwrap_err();
    assert!(matches!(e, Error::Misaligned { arg: "k", what: "heads stride", .. }), "{e}");
    // ... and validation refuses it first anyway (its span overflows).
    let e = check([desc("q", q, 256), desc("k", wide, usize::MAX), desc("v", wide, usize::MAX), desc("o", q, 256)])
        .unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { arg: "k", .. }), "{e}");
}

#[test]
fn the_reference_refuses_work_it_cannot_do() {
    let buf = vec![bf16::ONE; 8];
    let t0 = Instant::now();
    // Broadcast inputs (stride 0) are accepted by validation, but 65535 · 2^28 rows would abort on allocation.
    let big = Layout::strided_bshd([65_535, 1 << 28, 1, 8], [0, 0, 0, 1]);
    let e = reference::forward(
        HostTensor::new(&buf, big),
        HostTensor::new(&buf, big),
        HostTensor::new(&buf, big),
        &AttentionOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { what: "reference output elements", .. }), "{e}");
    // 2^26 rows against 2^26 keys: allowed output size is not the point, the work is.
    let long = Layout::strided_bshd([1, 1 << 26, 1, 8], [0, 0, 0, 1]);
    let e = reference::forward(
        HostTensor::new(&buf, long),
        HostTensor::new(&buf, long),
        HostTensor::new(&buf, long),
        &AttentionOptions::new(Mask::Causal),
    )
    .unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { arg: "q", .. }), "{e}");
    // A long query against few keys: within the limits, computed.
    let q = Layout::strided_bshd([1, 1 << 16, 1, 8], [0, 0, 0, 1]);
    let k = Layout::strided_bshd([1, 4, 1, 8], [0, 8, 0, 1]);
    let kv = vec![bf16::from_f32(0.5); 32];
    let r = reference::forward(
        HostTensor::new(&buf, q),
        HostTensor::new(&kv, k),
        HostTensor::new(&kv, k),
        &AttentionOptions::default(),
    )
    .unwrap();
    assert!(r.o.iter().all(|&x| (x - 0.5).abs() < 1e-12));
    assert!(t0.elapsed() < Duration::from_secs(20), "refusals must be quick: {:?}", t0.elapsed());
}

#[test]
fn an_unknown_image_is_an_error_not_a_panic() {
    let p = check({
        let q = Layout::bshd(1, 4, 1, 64);
        [desc("q", q, 256), desc("k", q, 256), desc("v", q, 256), desc("o", q, 256)]
    })
    .unwrap();
    let q = Layout::bshd(1, 4, 1, 64);
    let t = [desc("q", q, 256), desc("k", q, 256), desc("v", q, 256), desc("o", q, 256)];
    let stranger = KernelRow {
        image: "fwd_from_the_future",
        name: "fa_fwd_x",
        dtype: DType::BF16,
        head_dim: 64,
        block_m: 64,
        block_n: 64,
        threads: 128,
        smem_bytes: 0,
        min_sm: 80,
        grid: GridKind::Tiles,
    };
    let tensors = DispatchTensors { descs: &t, addrs: Some([0x1000; 4]) };
    let e = dispatch(&[stranger], H100, &p, tensors, None, Some("fa_fwd_x")).unwrap_err();
    assert!(matches!(e, Error::NoKernel { .. }), "{e}");
    let e = dispatch(&[stranger], H100, &p, tensors, None, None).unwrap_err();
    assert!(matches!(e, Error::NoKernel { .. }), "{e}");
}

#[test]
fn scales_the_kernels_cannot_honour_are_typed_errors() {
    let q = Layout::bshd(1, 4, 1, 64);
    let t = [desc("q", q, 256), desc("k", q, 256), desc("v", q, 256), desc("o", q, 256)];
    for scale in [1e38f32, f32::MAX, -f32::MAX, f32::INFINITY, f32::NAN] {
        let opts = AttentionOptions::default().with_scale(scale);
        let e = validate(DType::F16, &t[0], &t[1], &t[2], Some(&t[3]), None, &opts).unwrap_err();
        assert!(matches!(e, Error::InvalidOption { arg: "scale", .. }), "{scale}: {e}");
    }
}

#[test]
fn errors_read_well_as_debug_and_in_chains() {
    let e = Error::NoDriver;
    // `fn main() -> Result<(), Error>` prints Debug: it must be the message.
    assert_eq!(format!("{e:?}"), e.to_string());
    let cuda: Error =
        fused_attn::cudarc::driver::DriverError(fused_attn::cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
            .into();
    assert!(matches!(cuda, Error::Cuda { .. }));
    // The driver error is in the message once, and not repeated as a source.
    assert!(std::error::Error::source(&cuda).is_none());
    assert!(cuda.to_string().contains("OUT_OF_MEMORY"), "{cuda}");
}
