//! CPU tier: the dispatcher (`device::dispatch`) over the real kernel table,
//! as it would run on an A100 (sm_80) and an H100 (sm_90). No GPU needed: the
//! choice is a pure function of the table, the device and the tensors.

use fused_attn::device::{dispatch, DeviceInfo};
use fused_attn::options::{validate, TensorDesc};
use fused_attn::sys::{KernelRow, KERNEL_TABLE};
use fused_attn::{AttentionOptions, DType, Error, KernelFamily, Layout, Mask};

const A100: DeviceInfo = DeviceInfo { sm: 80, sm_count: 108 };
const H100: DeviceInfo = DeviceInfo { sm: 90, sm_count: 132 };

/// The rows a device of `sm` loads (what `Attention::new` keeps).
fn rows(sm: u32) -> Vec<KernelRow> {
    KERNEL_TABLE.iter().filter(|r| r.min_sm <= sm).copied().collect()
}

struct Problem {
    p: fused_attn::Problem,
    descs: Vec<(TensorDesc, u64)>,
}

fn problem(dtype: DType, d: usize, q_layout: Option<Layout>, base: u64) -> Problem {
    let ql = q_layout.unwrap_or(Layout::bshd(2, 300, 8, d));
    let kl = Layout::bshd(2, 500, 2, d);
    let ol = Layout::bshd(2, 300, 8, d);
    let desc = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let descs =
        vec![(desc("q", ql), base), (desc("k", kl), 0x10000), (desc("v", kl), 0x20000), (desc("o", ol), 0x30000)];
    let p = validate(
        dtype,
        &descs[0].0,
        &descs[1].0,
        &descs[2].0,
        Some(&descs[3].0),
        None,
        &AttentionOptions::new(Mask::Causal),
    )
    .unwrap();
    Problem { p, descs }
}

fn choose(
    device: DeviceInfo,
    pr: &Problem,
    forced: Option<KernelFamily>,
    name: Option<&'static str>,
) -> Result<&'static str, Error> {
    let rows = rows(device.sm);
    dispatch(&rows, device, &pr.p, &pr.descs, forced, name).map(|(i, info)| {
        assert_eq!(rows[i].name, info.name);
        info.name
    })
}

#[test]
fn picks_the_smallest_bucket_of_the_best_family() {
    for dtype in [DType::BF16, DType::F16] {
        let t = dtype.name();
        for (d, sm80_bucket, sm90_bucket) in
            [(8, 32, 64), (64, 64, 64), (72, 96, 128), (128, 128, 128), (136, 160, 256), (256, 256, 256)]
        {
            let pr = problem(dtype, d, None, 0x1000);
            assert_eq!(choose(A100, &pr, None, None).unwrap(), format!("fa_fwd_sm80_{t}_hd{sm80_bucket}"));
            assert_eq!(choose(H100, &pr, None, None).unwrap(), format!("fa_fwd_sm90_{t}_hd{sm90_bucket}"));
        }
    }
}

#[test]
fn misalignment_falls_back_to_naive_unless_forced() {
    // Rows of 8·64 + 4 elements: 8-byte row stride remainder.
    let padded = Layout::strided([2, 300, 8, 64], [300 * 516, 516, 64, 1]);
    let pr = problem(DType::BF16, 64, Some(padded), 0x1000);
    assert_eq!(choose(H100, &pr, None, None).unwrap(), "fa_fwd_naive_bf16");
    assert!(matches!(choose(H100, &pr, Some(KernelFamily::Sm80), None), Err(Error::Misaligned { arg: "q", .. })));
    // A misaligned base address alone does the same.
    let pr = problem(DType::BF16, 64, None, 0x1008);
    assert_eq!(choose(A100, &pr, None, None).unwrap(), "fa_fwd_naive_bf16");
}

#[test]
fn stride_zero_broadcast_skips_tma_but_not_the_sm80_kernel() {
    // Q broadcast over the batch (stride 0): TMA cannot express it.
    let bcast = Layout::strided([2, 300, 8, 128], [0, 8 * 128, 128, 1]);
    let pr = problem(DType::BF16, 128, Some(bcast), 0x1000);
    assert_eq!(choose(H100, &pr, None, None).unwrap(), "fa_fwd_sm80_bf16_hd128");
    assert!(matches!(choose(H100, &pr, Some(KernelFamily::Sm90), None), Err(Error::Misaligned { arg: "q", .. })));
}

#[test]
fn variants_only_by_name() {
    let variants: Vec<&KernelRow> = KERNEL_TABLE.iter().filter(|r| r.is_variant()).collect();
    assert!(!variants.is_empty(), "the table has variants to measure");
    for v in variants {
        let d = v.head_dim as usize;
        let pr = problem(v.dtype, d, None, 0x1000);
        let device = if v.min_sm >= 90 { H100 } else { A100 };
        assert_ne!(choose(device, &pr, None, None).unwrap(), v.name, "auto dispatch picked a variant");
        assert_eq!(choose(device, &pr, None, Some(v.name)).unwrap(), v.name);
    }
}

#[test]
fn forced_choices_that_cannot_run_are_errors() {
    let pr = problem(DType::BF16, 128, None, 0x1000);
    // No Hopper kernels on an A100.
    assert!(matches!(choose(A100, &pr, Some(KernelFamily::Sm90), None), Err(Error::NoKernel { .. })));
    assert!(matches!(choose(A100, &pr, None, Some("fa_fwd_sm90_bf16_hd128")), Err(Error::NoKernel { .. })));
    // A kernel of the wrong dtype or too small a bucket.
    assert!(matches!(choose(H100, &pr, None, Some("fa_fwd_sm80_f16_hd128")), Err(Error::NoKernel { .. })));
    assert!(matches!(choose(H100, &pr, None, Some("fa_fwd_sm80_bf16_hd64")), Err(Error::NoKernel { .. })));
    assert!(matches!(choose(H100, &pr, None, Some("no_such_kernel")), Err(Error::NoKernel { .. })));
}

#[test]
fn launch_grids() {
    let pr = problem(DType::BF16, 128, None, 0x1000);
    let rows = rows(90);
    let (i, info) = dispatch(&rows, H100, &pr.p, &pr.descs, None, None).unwrap();
    let bm = rows[i].block_m as usize;
    assert_eq!(info.grid, (300usize.div_ceil(bm) as u32, 8, 2));
    assert_eq!((info.threads, info.smem_bytes), (rows[i].threads, rows[i].smem_bytes));
    for r in rows.iter().filter(|r| r.grid == fused_attn::sys::GridKind::Persistent && r.dtype == DType::BF16) {
        let pr = problem(DType::BF16, r.head_dim as usize, None, 0x1000);
        let (_, info) = dispatch(&rows, H100, &pr.p, &pr.descs, None, Some(r.name)).unwrap();
        let tiles = 300usize.div_ceil(r.block_m as usize) * 8 * 2;
        assert_eq!(info.grid, (tiles.min(132) as u32, 1, 1), "{}", r.name);
    }
}
