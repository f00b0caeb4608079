//! CPU tier for KV caches: a paged cache with a shuffled block table equals
//! the dense cache it pages (any page size), `cache_batch_idx` selects rows,
//! and every table and extent error (DESIGN.md sections 1b and 6).

use fused_attn::internals::{check_cache_tables, validate_kvcache, TensorDesc};
use fused_attn::reference;
use fused_attn::{AttentionOptions, DType, Error, HostTensor, Layout, Mask, MaskAlignment};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect()
}

fn masks() -> Vec<AttentionOptions<'static>> {
    vec![
        AttentionOptions::new(Mask::Full),
        AttentionOptions::new(Mask::Causal),
        AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft),
        AttentionOptions::new(Mask::window(6, 1)).with_scale(0.4).with_softcap(5.0),
    ]
}

/// Pages a dense cache `[B, L_max, Hk, D]` into `[num_pages, page_size, Hk,
/// D]` with the pages in a shuffled order plus unused ones; returns the
/// pages and the block table.
fn page(
    rng: &mut StdRng,
    dense: &[bf16],
    b: usize,
    l_max: usize,
    hk: usize,
    d: usize,
    ps: usize,
) -> (Vec<bf16>, Vec<i32>, usize) {
    let per_seq = l_max.div_ceil(ps);
    let n_pages = b * per_seq + 3; // a few never used
    let mut ids: Vec<i32> = (0..n_pages as i32).collect();
    ids.shuffle(rng);
    let mut pages = random(rng, n_pages * ps * hk * d); // unused slots hold noise, not zeros
    let table: Vec<i32> = ids[..b * per_seq].to_vec();
    for bb in 0..b {
        for j in 0..l_max {
            let id = table[bb * per_seq + j / ps] as usize;
            let dst = ((id * ps + j % ps) * hk) * d;
            let src = ((bb * l_max + j) * hk) * d;
            pages[dst..dst + hk * d].copy_from_slice(&dense[src..src + hk * d]);
        }
    }
    (pages, table, per_seq)
}

#[test]
fn a_paged_cache_equals_the_dense_cache_for_any_page_size() {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, lq, hq, hk, d, l_max) = (3, 4, 8, 2, 16, 37);
    let q = random(&mut rng, b * lq * hq * d);
    let (kd, vd) = (random(&mut rng, b * l_max * hk * d), random(&mut rng, b * l_max * hk * d));
    let lens = [37i32, 0, 11];
    for ps in [1, 3, 16, 64] {
        let (kp, table, per_seq) = page(&mut StdRng::seed_from_u64(ps as u64), &kd, b, l_max, hk, d, ps);
        let (vp, _, _) = page(&mut StdRng::seed_from_u64(ps as u64), &vd, b, l_max, hk, d, ps);
        let n_pages = kp.len() / (ps * hk * d);
        for opts in masks() {
            let dense = reference::forward_kvcache(
                HostTensor::new(&q, Layout::bshd(b, lq, hq, d)),
                HostTensor::new(&kd, Layout::bshd(b, l_max, hk, d)),
                HostTensor::new(&vd, Layout::bshd(b, l_max, hk, d)),
                &lens,
                None,
                None,
                &opts,
            )
            .unwrap();
            let paged = reference::forward_kvcache(
                HostTensor::new(&q, Layout::bshd(b, lq, hq, d)),
                HostTensor::new(&kp, Layout::bshd(n_pages, ps, hk, d)),
                HostTensor::new(&vp, Layout::bshd(n_pages, ps, hk, d)),
                &lens,
                None,
                Some((&table, per_seq)),
                &opts,
            )
            .unwrap();
            assert_eq!(dense.o, paged.o, "page size {ps}, {opts:?}");
            assert_eq!(dense.lse, paged.lse, "page size {ps}, {opts:?}");
        }
    }
}

/// The queries are the newest positions: against the rectangular reference
/// with K/V cut to the cache length; and `cache_batch_idx` picks cache rows.
#[test]
fn queries_are_the_newest_positions_and_batch_idx_picks_rows() {
    let mut rng = StdRng::seed_from_u64(6);
    let (b, lq, hq, hk, d, l_max) = (2, 5, 4, 4, 8, 20);
    let q = random(&mut rng, b * lq * hq * d);
    let (k, v) = (random(&mut rng, 3 * l_max * hk * d), random(&mut rng, 3 * l_max * hk * d));
    let lens = [9i32, 20];
    let idx = [2i32, 0];
    for opts in masks() {
        let r = reference::forward_kvcache(
            HostTensor::new(&q, Layout::bshd(b, lq, hq, d)),
            HostTensor::new(&k, Layout::bshd(3, l_max, hk, d)),
            HostTensor::new(&v, Layout::bshd(3, l_max, hk, d)),
            &lens,
            Some(&idx),
            None,
            &opts,
        )
        .unwrap();
        for bb in 0..b {
            let (row, len) = (idx[bb] as usize, lens[bb] as usize);
            // Cache row `row` cut to `len` keys, as a rectangular problem (strides of the cache).
            let kl = Layout::strided_bshd([1, len, hk, d], [l_max * hk * d, hk * d, d, 1]);
            let at = row * l_max * hk * d;
            let alone = reference::forward(
                HostTensor::new(&q[bb * lq * hq * d..(bb + 1) * lq * hq * d], Layout::bshd(1, lq, hq, d)),
                HostTensor::new(&k[at..], kl),
                HostTensor::new(&v[at..], kl),
                &opts,
            )
            .unwrap();
            assert_eq!(&r.o[bb * lq * hq * d..(bb + 1) * lq * hq * d], &alone.o[..], "{opts:?}");
        }
    }
}

fn seq_err<T: std::fmt::Debug>(r: Result<T, Error>) -> (&'static str, usize) {
    match r {
        Err(Error::SeqLens { arg, index, .. }) => (arg, index),
        other => panic!("expected a SeqLens error, got {other:?}"),
    }
}

#[test]
fn cache_table_errors_name_the_table_and_entry() {
    assert_eq!(seq_err(check_cache_tables(&[], None, None)), ("cache_seqlens", 0));
    assert_eq!(seq_err(check_cache_tables(&[3, -1], None, None)), ("cache_seqlens", 1));
    assert_eq!(seq_err(check_cache_tables(&[3, 4], Some(&[0]), None)), ("cache_batch_idx", 1));
    assert_eq!(seq_err(check_cache_tables(&[3, 4], Some(&[0, -2]), None)), ("cache_batch_idx", 1));
    // Paged: a row too short for the length, a negative page id in use, a wrong table size.
    assert_eq!(seq_err(check_cache_tables(&[3, 40], None, Some((&[0, 1, 2, 3], 2, 16)))), ("cache_seqlens", 1));
    assert_eq!(seq_err(check_cache_tables(&[3, 20], None, Some((&[0, 1, 2, -1], 2, 16)))), ("block_table", 3));
    assert_eq!(seq_err(check_cache_tables(&[3, 20], None, Some((&[0, 1, 2], 2, 16)))), ("block_table", 3));
    // Entries past a sequence's pages are never read: -1 there is fine.
    let ok = check_cache_tables(&[3, 16], None, Some((&[5, -1, 2, -1], 2, 16))).unwrap();
    assert_eq!(ok.paged.unwrap().max_page, Some(5));
    assert!(matches!(
        check_cache_tables(&[3], None, Some((&[0], 1, 0))),
        Err(Error::InvalidOption { arg: "page_size", .. })
    ));
    assert_eq!(seq_err(check_cache_tables(&[3], Some(&[0]), Some((&[0], 1, 16)))), ("cache_batch_idx", 0));
}

#[test]
fn cache_extents_are_checked_against_the_tables() {
    let opts = AttentionOptions::new(Mask::Causal);
    let d = |arg, b, l, h| TensorDesc { arg, layout: Layout::bshd(b, l, h, 8), len: b * l * h * 8 };
    let q = d("q", 2, 3, 4);
    let run = |info, k: TensorDesc, v: TensorDesc| validate_kvcache(DType::BF16, &q, &k, &v, None, None, &info, &opts);
    // Dense: lengths within L_max, indices within B_c, B_c >= B without indices.
    let info = check_cache_tables(&[10, 4], None, None).unwrap();
    let p = run(info, d("k_cache", 2, 10, 2), d("v_cache", 2, 10, 2)).unwrap();
    assert_eq!((p.batch, p.seqlen_q, p.seqlen_k), (2, 3, 10));
    assert_eq!(seq_err(run(info, d("k_cache", 2, 9, 2), d("v_cache", 2, 9, 2))), ("cache_seqlens", 0));
    assert!(matches!(
        run(info, d("k_cache", 1, 10, 2), d("v_cache", 1, 10, 2)),
        Err(Error::ShapeMismatch { arg: "k_cache", .. })
    ));
    assert!(matches!(
        run(info, d("k_cache", 2, 10, 2), d("v_cache", 2, 11, 2)),
        Err(Error::ShapeMismatch { arg: "v_cache", .. })
    ));
    let with_idx = check_cache_tables(&[10, 4], Some(&[0, 5]), None).unwrap();
    assert_eq!(seq_err(run(with_idx, d("k_cache", 5, 10, 2), d("v_cache", 5, 10, 2))), ("cache_batch_idx", 0));
    assert!(run(with_idx, d("k_cache", 6, 10, 2), d("v_cache", 6, 10, 2)).is_ok());
    // Paged: the page size is the caches' second extent, page ids within the page count.
    let paged = check_cache_tables(&[20, 5], None, Some((&[3, 0, 1, -1], 2, 16))).unwrap();
    assert!(run(paged, d("k_cache", 4, 16, 2), d("v_cache", 4, 16, 2)).is_ok());
    assert_eq!(seq_err(run(paged, d("k_cache", 3, 16, 2), d("v_cache", 3, 16, 2))), ("block_table", 0));
    assert!(matches!(
        run(paged, d("k_cache", 4, 8, 2), d("v_cache", 4, 8, 2)),
        Err(Error::ShapeMismatch { arg: "k_cache", dim: "seqlen", expected: 16, got: 8, .. })
    ));
    // Q's batch is the tables' B; GQA still checked.
    let three = check_cache_tables(&[1, 1, 1], None, None).unwrap();
    assert!(matches!(
        run(three, d("k_cache", 3, 4, 2), d("v_cache", 3, 4, 2)),
        Err(Error::ShapeMismatch { arg: "q", dim: "batch", .. })
    ));
    assert!(matches!(run(info, d("k_cache", 2, 10, 3), d("v_cache", 2, 10, 3)), Err(Error::HeadsNotDivisible { .. })));
}

/// Hostile tables and extents: sizes that would overflow, page sizes beyond
/// the kernels' index type, page ids at i32::MAX — typed errors, no panic.
#[test]
fn hostile_cache_inputs_are_errors() {
    assert!(matches!(
        check_cache_tables(&[1, 1], None, Some((&[0, 0], usize::MAX, 16))),
        Err(Error::SeqLens { arg: "block_table", .. })
    ));
    let huge_page = check_cache_tables(&[i32::MAX], None, Some((&[0], 1, usize::MAX))).unwrap();
    let opts = AttentionOptions::new(Mask::Causal);
    let q = TensorDesc { arg: "q", layout: Layout::bshd(1, 1, 2, 8), len: 16 };
    let cache = |rows: usize| TensorDesc { arg: "k_cache", layout: Layout::bshd(1, rows, 2, 8), len: usize::MAX };
    let e = validate_kvcache(DType::BF16, &q, &cache(1 << 29), &cache(1 << 29), None, None, &huge_page, &opts);
    assert!(matches!(e, Err(Error::ShapeMismatch { .. }) | Err(Error::SizeOverflow { .. })), "{e:?}");
    let far_page = check_cache_tables(&[5], None, Some((&[i32::MAX], 1, 16))).unwrap();
    let e = validate_kvcache(DType::BF16, &q, &cache(16), &cache(16), None, None, &far_page, &opts);
    assert!(matches!(e, Err(Error::SeqLens { arg: "block_table", .. })), "{e:?}");
    let long = check_cache_tables(&[i32::MAX], Some(&[i32::MAX]), None).unwrap();
    let e = validate_kvcache(DType::BF16, &q, &cache(16), &cache(16), None, None, &long, &opts);
    assert!(matches!(e, Err(Error::SeqLens { arg: "cache_seqlens", .. })), "{e:?}");
}

/// The split-KV heuristic as documented on `Attention::kvcache_splits`, and
/// the workspace size.
#[test]
fn split_heuristic_and_workspace() {
    use fused_attn::Attention;
    let h100 = 132;
    // A decode step of 8 sequences, 32:8 heads, over 32k keys: the packed
    // decode rows launch 8 x 8 = 64 CTAs, so 4 splits make one wave of 256.
    // (Counting 8 x 32 query-head CTAs, as before the first decode
    // measurement, gave 2, and 64:8 heads gave 1: 35 % of the copy bandwidth.)
    assert_eq!(Attention::kvcache_splits_on(h100, 8, 1, 32, 8, 32768), 4);
    assert_eq!(Attention::kvcache_splits_on(h100, 8, 1, 64, 8, 32768), 4);
    // One sequence: 8 CTAs, 33 splits.
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 1, 32, 8, 32768), 33);
    // Speculative decoding, 16 queries x 16 heads per KV head: two row tiles.
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 16, 128, 8, 32768), 16);
    // Without GQA there is no packing: a CTA per query head.
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 1, 32, 32, 32768), 8);
    assert_eq!(Attention::kvcache_splits_on(h100, 8, 1, 32, 32, 32768), 1);
    // Enough CTAs already: no split.
    assert_eq!(Attention::kvcache_splits_on(h100, 64, 1, 32, 8, 32768), 1);
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 4096, 32, 8, 32768), 1);
    // Past 16 queries a call is no decode step: a CTA per query head.
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 17, 32, 8, 32768), 8);
    // Short caches: at least two 64-key tiles per split.
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 1, 8, 8, 100), 1);
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 1, 8, 8, 640), 5);
    // At most 64; degenerate head counts never divide by zero.
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 1, 1, 1, 1 << 20), 64);
    assert_eq!(Attention::kvcache_splits_on(h100, 1, 1, 8, 0, 1 << 20), 33);
    assert_eq!(Attention::kvcache_splits_on(h100, 0, 0, 0, 0, 0), 1);
    // O parts and LSE parts, f32.
    assert_eq!(Attention::split_workspace_len(3, 2, 1, 8, 128), Some(3 * 2 * 8 * 129));
    assert_eq!(Attention::split_workspace_len(usize::MAX, 2, 1, 8, 128), None);
}
