//! CPU tier: the host half of a launch — validation, kernel choice, kernel
//! parameters, TMA map description — allocates no heap memory (issue 8: a
//! framework calls it thousands of times a second, and inside CUDA graphs).
//! A counting global allocator proves it over the real kernel table; the
//! driver half (`cuLaunchKernel`, cudarc's guards) is checked the same way in
//! the GPU tier.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

use fused_attn::internals::{
    check_cache_tables, check_seqlens, dispatch, fwd_params, tma_spec, validate, validate_kvcache, validate_varlen,
    with_sequences, Addrs, DeviceInfo, DispatchTensors, LseDesc, SeqAddrs, TensorDesc, KERNEL_TABLE,
};
use fused_attn::{AttentionOptions, DType, KernelFamily, Layout, LseLayout, Mask, MaskAlignment};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards to the system allocator; only counts calls made on a
// thread while its flag is set (thread-locals with const initialisers do not
// allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.with(|a| a.get())
}

/// One call's host work, as `forward_into` does it, for a device of `sm`.
fn host_launch_path(sm: u32, q: Layout, k: Layout, v: Layout, o: Layout, opts: &AttentionOptions) -> u64 {
    let rows: Vec<_> = KERNEL_TABLE.iter().filter(|r| r.min_sm <= sm).copied().collect();
    let device = DeviceInfo { sm, sm_count: 132, smem_per_block: 227 * 1024 };
    let descs = [
        TensorDesc { arg: "q", layout: q, len: q.span().unwrap() },
        TensorDesc { arg: "k", layout: k, len: k.span().unwrap() },
        TensorDesc { arg: "v", layout: v, len: v.span().unwrap() },
        TensorDesc { arg: "o", layout: o, len: o.span().unwrap() },
    ];
    let [b, lq, hq, _] = q.shape;
    let lse = LseDesc { layout: LseLayout::contiguous(b, hq, lq), len: b * hq * lq };
    let addrs = [0x7f00_0000_0000, 0x7f10_0000_0000, 0x7f20_0000_0000, 0x7f30_0000_0000];
    let mut sum = 0u64;
    let n = allocations(|| {
        for _ in 0..1000 {
            let p = validate(DType::BF16, &descs[0], &descs[1], &descs[2], Some(&descs[3]), Some(&lse), opts).unwrap();
            let tensors = DispatchTensors { descs: &descs, addrs: Some(addrs) };
            let (idx, info) = dispatch(&rows, device, &p, tensors, opts.kernel, opts.kernel_name).unwrap();
            let a = Addrs { q: addrs[0], k: addrs[1], v: addrs[2], o: addrs[3], lse: 0x7f40_0000_0000 };
            let params = fwd_params(&p, &[q, k, v, o], Some(&lse.layout), a);
            if info.family == KernelFamily::Sm90 {
                let row = &rows[idx];
                let t = tma_spec(addrs[0], &q, p.dtype, row.block_m);
                sum = sum.wrapping_add(t.strides[0]);
            }
            sum = sum.wrapping_add(params.seqlen_q as u64 + info.grid.0 as u64 + info.passed_over().count() as u64);
        }
    });
    std::hint::black_box(sum); // keep the work from being optimised away
    n
}

#[test]
fn validation_dispatch_and_parameters_allocate_nothing() {
    if KERNEL_TABLE.is_empty() {
        eprintln!("SKIPPED: built without kernels (empty table)");
        return;
    }
    let opts = [
        AttentionOptions::new(Mask::Causal),
        AttentionOptions::new(Mask::window(100, 3)).with_softcap(30.0).with_alignment(MaskAlignment::TopLeft),
        AttentionOptions::new(Mask::Full).with_scale(0.3),
    ];
    for d in [32, 64, 128, 192, 256] {
        let q = Layout::bhsd(2, 16, 300, d);
        let kv = Layout::bshd(2, 500, 4, d);
        let o = Layout::bshd(2, 300, 16, d);
        for opt in &opts {
            for sm in [80, 90] {
                assert_eq!(host_launch_path(sm, q, kv, kv, o, opt), 0, "sm_{sm} d{d} {opt:?}");
            }
        }
        // A padded row stride the tiled kernels cannot take: falls back to naive, still no allocation.
        let padded = Layout::strided_bshd([2, 300, 16, d], [300 * (16 * d + 4), 16 * d + 4, d, 1]);
        assert_eq!(host_launch_path(90, padded, kv, kv, o, &opts[0]), 0, "fallback d{d}");
    }
}

/// The same for packed batches and KV caches: with the tables checked once
/// (outside the measured region, as `SeqLens`/`CacheTables` do), each call's
/// validation, dispatch (Hopper passed over with its reason) and parameters
/// allocate nothing.
#[test]
fn packed_and_cached_calls_allocate_nothing() {
    if KERNEL_TABLE.is_empty() {
        eprintln!("SKIPPED: built without kernels (empty table)");
        return;
    }
    let rows = KERNEL_TABLE.to_vec();
    let device = DeviceInfo { sm: 90, sm_count: 132, smem_per_block: 227 * 1024 };
    let d = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap() };
    let opts = AttentionOptions::new(Mask::Causal);
    let addrs = [0x7f00_0000_0000, 0x7f10_0000_0000, 0x7f20_0000_0000, 0x7f30_0000_0000];
    let a = Addrs { q: addrs[0], k: addrs[1], v: addrs[2], o: addrs[3], lse: 0 };
    let tables = SeqAddrs { cu_seqlens_q: 0x7f50_0000_0000, cu_seqlens_k: 0x7f60_0000_0000, ..SeqAddrs::default() };
    // Packed: 3 sequences, 300 tokens.
    let seq = check_seqlens(&[0, 100, 120, 300], &[0, 50, 170, 300], None).unwrap();
    let (ql, kl) = (Layout::bshd(1, 300, 16, 128), Layout::bshd(1, 300, 4, 128));
    let packed = [d("q", ql), d("k", kl), d("v", kl), d("o", ql)];
    // Paged cache: 2 sequences, pages of 16.
    let cache = check_cache_tables(&[40, 7], None, Some((&[3, 0, 1, 2, -1, -1], 3, 16))).unwrap();
    let (cq, cl) = (Layout::bshd(2, 4, 16, 128), Layout::bshd(4, 16, 4, 128));
    let cached = [d("q", cq), d("k_cache", cl), d("v_cache", cl), d("o", cq)];
    let mut sum = 0u64;
    let n = allocations(|| {
        for _ in 0..1000 {
            for (descs, p) in [
                (
                    &packed,
                    validate_varlen(
                        DType::BF16,
                        &packed[0],
                        &packed[1],
                        &packed[2],
                        Some(&packed[3]),
                        None,
                        &seq,
                        &opts,
                    ),
                ),
                (
                    &cached,
                    validate_kvcache(
                        DType::BF16,
                        &cached[0],
                        &cached[1],
                        &cached[2],
                        Some(&cached[3]),
                        None,
                        &cache,
                        &opts,
                    ),
                ),
            ] {
                let p = p.unwrap();
                let tensors = DispatchTensors { descs, addrs: Some(addrs) };
                let (_, info) = dispatch(&rows, device, &p, tensors, None, None).unwrap();
                let layouts = descs.map(|t| t.layout);
                let params = with_sequences(fwd_params(&p, &layouts, None, a), tables);
                sum = sum.wrapping_add(params.seqlen_k as u64 + info.passed_over().count() as u64);
            }
        }
    });
    std::hint::black_box(sum);
    assert_eq!(n, 0);
}

#[test]
fn the_counter_counts() {
    // The negative control: an allocation in the measured region is seen.
    let n = allocations(|| {
        let v: Vec<u8> = Vec::with_capacity(64);
        std::hint::black_box(v);
    });
    assert_eq!(n, 1);
}
