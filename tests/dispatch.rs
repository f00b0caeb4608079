//! CPU tier: the dispatcher (`internals::dispatch`) over the real kernel table,
//! as it would run on an A100 (sm_80), an sm_86 part with 99 KB of shared
//! memory per block and an H100 (sm_90). No GPU needed: the choice is a pure
//! function of the table, the device and the tensors.

use fused_attn::internals::{
    check_cache_tables, check_seqlens, dispatch, image_runs_on, validate, DeviceInfo, DispatchTensors, GridKind,
    KernelImage, KernelRow, TensorDesc, IMAGES, KERNEL_TABLE,
};
use fused_attn::{AttentionOptions, DType, Error, KernelFamily, Layout, Mask, PassReason};

const A100: DeviceInfo = DeviceInfo { sm: 80, sm_count: 108, smem_per_block: 163 * 1024 };
const H100: DeviceInfo = DeviceInfo { sm: 90, sm_count: 132, smem_per_block: 227 * 1024 };
/// sm_86 and sm_89 (RTX 30xx/40xx, A10, L4, L40): 99 KB per block.
const SM86: DeviceInfo = DeviceInfo { sm: 86, sm_count: 84, smem_per_block: 99 * 1024 };

/// The rows a device of `sm` loads (what `Attention::new` keeps).
fn rows(sm: u32) -> Vec<KernelRow> {
    KERNEL_TABLE.iter().filter(|r| r.min_sm <= sm).copied().collect()
}

struct Problem {
    p: fused_attn::Problem,
    descs: [TensorDesc; 4],
    addrs: [u64; 4],
}

impl Problem {
    fn tensors(&self) -> DispatchTensors<'_> {
        DispatchTensors { descs: &self.descs, addrs: Some(self.addrs) }
    }
}

fn problem(dtype: DType, d: usize, q_layout: Option<Layout>, base: u64) -> Problem {
    let ql = q_layout.unwrap_or(Layout::bshd(2, 300, 8, d));
    let kl = Layout::bshd(2, 500, 2, d);
    let ol = Layout::bshd(2, 300, 8, d);
    let desc = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let descs = [desc("q", ql), desc("k", kl), desc("v", kl), desc("o", ol)];
    let p =
        validate(dtype, &descs[0], &descs[1], &descs[2], Some(&descs[3]), None, &AttentionOptions::new(Mask::Causal))
            .unwrap();
    Problem { p, descs, addrs: [base, 0x10000, 0x20000, 0x30000] }
}

fn choose(
    device: DeviceInfo,
    pr: &Problem,
    forced: Option<KernelFamily>,
    name: Option<&'static str>,
) -> Result<&'static str, Error> {
    let rows = rows(device.sm);
    dispatch(&rows, device, &pr.p, pr.tensors(), forced, name).map(|(i, info)| {
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
fn each_bucket_takes_its_first_row_that_fits_the_shared_memory() {
    let sm80_buckets = [32, 64, 96, 128, 160, 192, 224, 256];
    for dtype in [DType::BF16, DType::F16] {
        let t = dtype.name();
        for d in sm80_buckets {
            let pr = problem(dtype, d, None, 0x1000);
            let main = format!("fa_fwd_sm80_{t}_hd{d}");
            let main_smem =
                KERNEL_TABLE.iter().find(|r| r.name == main).expect("every bucket has a main row").smem_bytes;
            // An A100 (163 KB) runs every bucket's main row.
            assert_eq!(choose(A100, &pr, None, None).unwrap(), main);
            // 99 KB: the main row where it fits, else the bucket's `_99k` row;
            // never the naive kernel.
            let on_sm86 = choose(SM86, &pr, None, None).unwrap();
            let want = if main_smem <= SM86.smem_per_block { main.clone() } else { format!("{main}_99k") };
            assert_eq!(on_sm86, want, "D = {d}");
            let row = KERNEL_TABLE.iter().find(|r| r.name == on_sm86).unwrap();
            assert!(row.smem_bytes <= SM86.smem_per_block, "{on_sm86}: {} B", row.smem_bytes);
            // The sm90 family still wins on an H100, and is never tried on sm_86.
            assert!(choose(H100, &pr, None, None).unwrap().starts_with("fa_fwd_sm90_"));
            if let Some(small) = KERNEL_TABLE.iter().find(|r| r.name == format!("{main}_99k")) {
                // Forced by name: runs where it fits, even where the main row would too.
                assert_eq!(choose(A100, &pr, None, Some(small.name)).unwrap(), small.name);
                // The main row forced on 99 KB is an error, not a silent fallback.
                let main: &'static str = KERNEL_TABLE.iter().find(|r| r.name == main).unwrap().name;
                assert!(matches!(choose(SM86, &pr, None, Some(main)), Err(Error::NoKernel { .. })));
            }
        }
        // Today the 99 KB rows are hd160..hd224 (hd256's main row fits).
        let small: Vec<u32> =
            KERNEL_TABLE.iter().filter(|r| r.dtype == dtype && r.name.ends_with("_99k")).map(|r| r.head_dim).collect();
        assert_eq!(small, [160, 192, 224]);
    }
    // Table order is the preference: within a family and bucket, every later
    // base row needs less shared memory than the first (else it could never be
    // picked where the first fits, and would be chosen over it nowhere). The
    // `_paged` and `_decode` rows form their own sequences (only paged caches
    // and decode steps reach them).
    for (i, r) in KERNEL_TABLE.iter().enumerate().filter(|(_, r)| !r.is_variant()) {
        let first = KERNEL_TABLE
            .iter()
            .find(|f| {
                !f.is_variant()
                    && f.is_paged() == r.is_paged()
                    && f.is_decode() == r.is_decode()
                    && f.image == r.image
                    && f.dtype == r.dtype
                    && f.head_dim == r.head_dim
            })
            .unwrap();
        if first.name != r.name {
            assert!(r.smem_bytes < first.smem_bytes, "{} (row {i}) needs no less memory than {}", r.name, first.name);
        }
    }
}

#[test]
fn shared_memory_below_every_row_falls_back_to_naive() {
    let pr = problem(DType::BF16, 256, None, 0x1000);
    let tiny = DeviceInfo { sm: 86, sm_count: 84, smem_per_block: 48 * 1024 };
    let rows = rows(86);
    let (_, info) = dispatch(&rows, tiny, &pr.p, pr.tensors(), None, None).unwrap();
    assert_eq!(info.name, "fa_fwd_naive_bf16");
    let passed: Vec<_> = info.passed_over().map(|p| (p.family, p.reason)).collect();
    assert_eq!(passed, [(KernelFamily::Sm90, PassReason::NoKernel), (KernelFamily::Sm80, PassReason::NoKernel)]);
}

#[test]
fn misalignment_falls_back_to_naive_unless_forced() {
    // Rows of 8·64 + 4 elements: 8-byte row stride remainder.
    let padded = Layout::strided_bshd([2, 300, 8, 64], [300 * 516, 516, 64, 1]);
    let pr = problem(DType::BF16, 64, Some(padded), 0x1000);
    assert_eq!(choose(H100, &pr, None, None).unwrap(), "fa_fwd_naive_bf16");
    assert!(matches!(choose(H100, &pr, Some(KernelFamily::Sm80), None), Err(Error::Misaligned { arg: "q", .. })));
    // A misaligned base address alone does the same.
    let pr = problem(DType::BF16, 64, None, 0x1008);
    assert_eq!(choose(A100, &pr, None, None).unwrap(), "fa_fwd_naive_bf16");
    // The choice says what was passed over and why, without formatting anything.
    let rows = rows(90);
    let (_, info) = dispatch(&rows, H100, &pr.p, pr.tensors(), None, None).unwrap();
    let passed: Vec<_> = info.passed_over().map(|p| (p.family, p.reason)).collect();
    let why = PassReason::Unsuitable { arg: "q", what: "base address" };
    assert_eq!(passed, [(KernelFamily::Sm90, why), (KernelFamily::Sm80, why)]);
    // Unknown base addresses (`plan` before buffers exist) are assumed aligned.
    let plan = DispatchTensors { descs: &pr.descs, addrs: None };
    assert_eq!(dispatch(&rows, H100, &pr.p, plan, None, None).unwrap().1.name, "fa_fwd_sm90_bf16_hd64");
}

#[test]
fn strides_of_unit_dimensions_are_never_looked_at() {
    // Extent-1 batch and head dims with absurd strides: nothing overflows, nothing panics.
    let odd = Layout::strided_bshd([1, 300, 1, 64], [usize::MAX, 64, usize::MAX, 1]);
    let kv = Layout::strided_bshd([1, 500, 1, 64], [usize::MAX, 64, 7, 1]);
    let desc = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let descs = [desc("q", odd), desc("k", kv), desc("v", kv), desc("o", odd)];
    let p = validate(DType::BF16, &descs[0], &descs[1], &descs[2], Some(&descs[3]), None, &AttentionOptions::default())
        .unwrap();
    let t = DispatchTensors { descs: &descs, addrs: Some([0x1000; 4]) };
    let (_, info) = dispatch(&rows(90), H100, &p, t, None, None).unwrap();
    assert_eq!(info.name, "fa_fwd_sm90_bf16_hd64");
    // The kernel parameters get 0 for strides that never step.
    let params = fused_attn::internals::fwd_params(
        &p,
        &[odd, kv, kv, odd],
        None,
        fused_attn::internals::Addrs { q: 0x1000, k: 0x1000, v: 0x1000, o: 0x1000, lse: 0 },
    );
    assert_eq!((params.q_batch_stride, params.q_head_stride, params.k_head_stride), (0, 0, 0));
    assert_eq!(params.q_row_stride, 64);
}

#[test]
fn persistent_schedule_refuses_tile_counts_past_int32() {
    // 2^28 rows · 65535 heads · 1 batch / block_m tiles overflow the kernel's int32 numbering.
    let o = Layout::bshd(1, 1 << 28, 65_535, 64);
    let (q, kv) = (o, Layout::bshd(1, 1, 1, 64));
    let desc = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let descs = [desc("q", q), desc("k", kv), desc("v", kv), desc("o", o)];
    let p = validate(DType::BF16, &descs[0], &descs[1], &descs[2], Some(&descs[3]), None, &AttentionOptions::default())
        .unwrap();
    let persistent = KERNEL_TABLE
        .iter()
        .find(|r| r.grid == GridKind::Persistent && r.dtype == DType::BF16 && r.head_dim == 64)
        .map(|r| r.name);
    // The persistent kernels are variants: present exactly when variants are built (CI).
    assert_eq!(persistent.is_some(), fused_attn::internals::VARIANTS_BUILT);
    if let Some(name) = persistent {
        let t = DispatchTensors { descs: &descs, addrs: Some([0x1000; 4]) };
        let e = dispatch(&rows(90), H100, &p, t, None, Some(name)).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { what: "tiles of the persistent schedule", .. }), "{e}");
    }
}

#[test]
fn images_are_loadable_where_they_have_code() {
    let img = |sass: &'static [&'static str], ptx| KernelImage { stem: "x", fatbin: &[], sass, ptx };
    let both = img(&["sm_80", "sm_90a"], Some("compute_80"));
    let hopper = img(&["sm_90a"], None);
    let sass_only = img(&["sm_80"], None);
    for sm in [80, 86, 89, 90, 100, 120] {
        assert!(image_runs_on(&both, sm), "PTX compute_80 JITs on sm_{sm}");
    }
    assert!(image_runs_on(&hopper, 90));
    for sm in [80, 89, 100, 103] {
        assert!(!image_runs_on(&hopper, sm), "sm_90a code on sm_{sm}");
    }
    assert!(image_runs_on(&sass_only, 86) && !image_runs_on(&sass_only, 90) && !image_runs_on(&sass_only, 75));
    // The real images: the portable ones load everywhere from sm_80, the Hopper one on sm_90 only.
    for image in IMAGES {
        let on = |sm| image_runs_on(image, sm);
        match image.stem {
            "fwd_sm90" => assert!(on(90) && !on(80) && !on(100)),
            _ => assert!(on(80) && on(86) && on(90) && on(100)),
        }
    }
}

#[test]
fn stride_zero_broadcast_skips_tma_but_not_the_sm80_kernel() {
    // Q broadcast over the batch (stride 0): TMA cannot express it.
    let bcast = Layout::strided_bshd([2, 300, 8, 128], [0, 8 * 128, 128, 1]);
    let pr = problem(DType::BF16, 128, Some(bcast), 0x1000);
    assert_eq!(choose(H100, &pr, None, None).unwrap(), "fa_fwd_sm80_bf16_hd128");
    assert!(matches!(choose(H100, &pr, Some(KernelFamily::Sm90), None), Err(Error::Misaligned { arg: "q", .. })));
}

#[test]
fn variants_only_by_name() {
    let variants: Vec<&KernelRow> = KERNEL_TABLE.iter().filter(|r| r.is_variant()).collect();
    // Variants are built only with FUSED_ATTN_VARIANTS=1 (CI, the GPU bundle).
    assert_eq!(!variants.is_empty(), fused_attn::internals::VARIANTS_BUILT, "variants in the table iff asked for");
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
    let (i, info) = dispatch(&rows, H100, &pr.p, pr.tensors(), None, None).unwrap();
    let bm = rows[i].block_m as usize;
    assert_eq!(info.grid, (300usize.div_ceil(bm) as u32, 8, 2));
    assert_eq!((info.threads, info.smem_bytes), (rows[i].threads, rows[i].smem_bytes));
    for r in rows.iter().filter(|r| r.grid == GridKind::Persistent && r.dtype == DType::BF16) {
        let pr = problem(DType::BF16, r.head_dim as usize, None, 0x1000);
        let (_, info) = dispatch(&rows, H100, &pr.p, pr.tensors(), None, Some(r.name)).unwrap();
        let tiles = 300usize.div_ceil(r.block_m as usize) * 8 * 2;
        assert_eq!(info.grid, (tiles.min(132) as u32, 1, 1), "{}", r.name);
    }
}

/// Packed batches and caches: the Hopper kernels take them, except paged
/// caches whose page size is not a multiple of their block_n (128 for hd128,
/// 80 for hd256), which the sm80 kernels' gather takes; the persistent
/// variants take only rectangular batches.
#[test]
fn packed_batches_and_caches_go_where_they_are_implemented() {
    let t = DType::BF16.name();
    let varlen = check_seqlens(&[0, 100, 300], &[0, 200, 500], None).unwrap();
    let dense = check_cache_tables(&[200, 500], None, None).unwrap();
    let paged = |page: usize| {
        let per_seq = 500usize.div_ceil(page);
        let table: Vec<i32> = (0..2 * per_seq as i32).collect();
        check_cache_tables(&[200, 500], None, Some((&table, per_seq, page))).unwrap()
    };
    for d in [128, 256] {
        let sm90 = format!("fa_fwd_sm90_{t}_hd{d}");
        let sm80 = format!("fa_fwd_sm80_{t}_hd{d}");
        let sm80_paged = format!("fa_fwd_sm80_{t}_hd{d}_paged");
        let with = |v: Option<_>, c: Option<_>| {
            let mut pr = problem(DType::BF16, d, None, 0x1000);
            pr.p.varlen = v;
            pr.p.kv_cache = c;
            pr
        };
        assert_eq!(choose(H100, &with(Some(varlen), None), None, None).unwrap(), sm90);
        assert_eq!(choose(H100, &with(None, Some(dense)), None, None).unwrap(), sm90);
        // 400 is a multiple of 80 but not of 128; 640 of both.
        for (page, hopper) in [(1, false), (16, false), (128, d == 128), (400, d == 256), (640, true)] {
            let pr = with(None, Some(paged(page)));
            let rows = rows(90);
            let (i, info) = dispatch(&rows, H100, &pr.p, pr.tensors(), None, None).unwrap();
            assert_eq!(rows[i].name, if hopper { &sm90 } else { &sm80_paged }, "hd{d} page {page}");
            if !hopper {
                let passed: Vec<_> = info.passed_over().collect();
                assert!(
                    matches!(passed[..], [p] if p.family == KernelFamily::Sm90
                        && matches!(p.reason, PassReason::Unsupported { .. })),
                    "{passed:?}"
                );
                let forced = choose(H100, &pr, Some(KernelFamily::Sm90), None).unwrap_err().to_string();
                assert!(forced.contains("block_n"), "{forced}");
            }
            // The sm80 `_paged` rows take every page size; the dense rows none.
            assert_eq!(choose(A100, &pr, None, None).unwrap(), sm80_paged);
            let name: &'static str = Box::leak(sm80.clone().into_boxed_str());
            let err = choose(A100, &pr, None, Some(name)).unwrap_err().to_string();
            assert!(err.contains("_paged"), "{err}");
        }
        // Dense caches and packed batches never get a `_paged` row.
        assert_eq!(choose(A100, &with(None, Some(dense)), None, None).unwrap(), sm80);
        assert_eq!(choose(A100, &with(Some(varlen), None), None, None).unwrap(), sm80);
        // Variants are in the table only in builds with FUSED_ATTN_VARIANTS=1.
        let name: &'static str = Box::leak(format!("{sm90}__persistent").into_boxed_str());
        if rows(90).iter().any(|r| r.name == name) {
            let err = choose(H100, &with(Some(varlen), None), None, Some(name)).unwrap_err().to_string();
            assert!(err.contains("persistent"), "{err}");
            assert!(choose(H100, &with(None, None), None, Some(name)).is_ok());
        }
    }
}

/// Decode steps (a KV-cache call, at most 16 queries per sequence, several
/// query heads per KV head) go to the sm80 `_decode` rows (GQA packing),
/// ahead of sm90, with one CTA per KV head; other shapes do not.
#[test]
fn decode_steps_go_to_the_gqa_packed_rows() {
    let t = DType::BF16.name();
    let make = |lq: usize, hq: usize, hk: usize, d: usize, page: Option<usize>| {
        let desc = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
        let (ql, kl) = (Layout::bshd(2, lq, hq, d), Layout::bshd(2, 512, hk, d));
        let descs = [desc("q", ql), desc("k", kl), desc("v", kl), desc("o", ql)];
        let mut p = validate(
            DType::BF16,
            &descs[0],
            &descs[1],
            &descs[2],
            Some(&descs[3]),
            None,
            &AttentionOptions::new(Mask::Causal),
        )
        .unwrap();
        p.kv_cache = Some(match page {
            None => check_cache_tables(&[300, 500], None, None).unwrap(),
            Some(ps) => {
                let per_seq = 512usize.div_ceil(ps);
                let table: Vec<i32> = (0..2 * per_seq as i32).collect();
                check_cache_tables(&[300, 500], None, Some((&table, per_seq, ps))).unwrap()
            }
        });
        Problem { p, descs, addrs: [0x1000, 0x10000, 0x20000, 0x30000] }
    };
    for dev in [A100, H100] {
        let rows = rows(dev.sm);
        for (lq, hq, hk, d, page) in
            [(1, 32, 8, 128, None), (4, 64, 8, 64, Some(16)), (16, 8, 2, 128, Some(256)), (2, 16, 2, 256, None)]
        {
            let pr = make(lq, hq, hk, d, page);
            let (i, info) = dispatch(&rows, dev, &pr.p, pr.tensors(), None, None).unwrap();
            assert_eq!(rows[i].name, format!("fa_fwd_sm80_{t}_hd{d}_decode"), "lq {lq} {hq}:{hk} d{d} {page:?}");
            assert_eq!(info.grid, ((lq * hq / hk).div_ceil(128) as u32, hk as u32, 2), "one CTA per KV head");
        }
        // Not decode steps: 17 queries, MHA.
        let best = if dev.sm >= 90 { "sm90" } else { "sm80" };
        for (lq, hq, hk, d) in [(17, 32, 8, 128), (1, 8, 8, 128)] {
            let pr = make(lq, hq, hk, d, None);
            let name = choose(dev, &pr, None, None).unwrap();
            assert_eq!(name, format!("fa_fwd_{best}_{t}_hd{d}"), "lq {lq} {hq}:{hk} d{d}");
        }
        // hd32 has no `_decode` row (the hd64 one would serve it, but
        // dispatch takes the smallest bucket of the family's rows).
        let pr = make(1, 32, 8, 32, None);
        assert_eq!(choose(dev, &pr, None, None).unwrap(), format!("fa_fwd_sm80_{t}_hd64_decode"));
    }
}

/// ALiBi and sinks are taken by every family: a problem with them goes
/// where the same problem without them goes (sm90 on an H100, sm80 on an
/// A100, naive when forced), with either slope layout.
#[test]
fn score_modifiers_do_not_change_the_choice() {
    use fused_attn::{Alibi, HeadValues};
    let slopes = [0.5f32; 16];
    let sinks = [1.0f32; 8];
    for dtype in [DType::BF16, DType::F16] {
        for d in [64, 128, 256] {
            let plain = problem(dtype, d, None, 0x1000);
            for alibi in [Alibi::per_head(HeadValues::Host(&slopes)), Alibi::per_batch(HeadValues::Host(&slopes))] {
                let mut pr = problem(dtype, d, None, 0x1000);
                let opts = AttentionOptions::new(Mask::Causal).with_alibi(alibi).with_sinks(HeadValues::Host(&sinks));
                pr.p =
                    validate(dtype, &pr.descs[0], &pr.descs[1], &pr.descs[2], Some(&pr.descs[3]), None, &opts).unwrap();
                assert!(pr.p.alibi.is_some() && pr.p.sinks);
                for device in [A100, H100] {
                    assert_eq!(choose(device, &pr, None, None).unwrap(), choose(device, &plain, None, None).unwrap());
                }
                let naive = choose(H100, &pr, Some(KernelFamily::Naive), None).unwrap();
                assert!(naive.starts_with("fa_fwd_naive"), "{naive}");
            }
        }
    }
}
