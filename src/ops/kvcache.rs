//! Attention over a KV cache (DESIGN.md section 1b): dense `[B_c, L_max, Hk, D]`
//! caches addressed per sequence, or pages `[num_pages, page_size, Hk, D]`
//! addressed through a block table.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::desc;
use crate::device::{Attention, Tables};
use crate::dispatch::KernelInfo;
use crate::error::{Error, Result};
use crate::options::{AttentionOptions, KernelFamily};
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, Layout, LseTensorMut};
use crate::validate::{check_cache_tables, validate_kvcache, CacheInfo, TensorDesc};

/// A KV cache's tables, checked on the host and uploaded once, then reused
/// by every call until the lengths change ([`set_seqlens`](Self::set_seqlens)
/// copies new ones into the same device buffer, allocating nothing).
///
/// Sequence `b` attends to the first `cache_seqlens[b]` keys of its cache
/// row: batch entry `cache_batch_idx[b]` (default `b`) of a dense cache, or,
/// paged, key `j` in page `block_table[b · pages_per_seq + j / page_size]`,
/// slot `j % page_size`. Any page size ≥ 1.
///
/// ```no_run
/// # fn main() -> fused_attn::Result<()> {
/// use fused_attn::{cuda_context, CacheTables};
/// let ctx = cuda_context(0)?;
/// let stream = ctx.default_stream();
/// // Two sequences of 20 and 5 cached keys in pages of 16: 2 pages per row.
/// let t = CacheTables::paged(&stream, &[20, 5], &[3, 0, 1, -1], 2, 16)?;
/// assert_eq!(t.batch(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CacheTables {
    pub(crate) info: CacheInfo,
    pub(crate) seqlens: CudaSlice<i32>,
    pub(crate) batch_idx: Option<CudaSlice<i32>>,
    pub(crate) block_table: Option<CudaSlice<i32>>,
    block_table_host: Option<Vec<i32>>,
    batch_idx_host: Option<Vec<i32>>,
    seqlens_host: Vec<i32>,
}

fn up(stream: &Arc<CudaStream>, x: &[i32]) -> Result<CudaSlice<i32>> {
    stream.clone_htod(x).map_err(|driver| Error::Cuda { during: "uploading cache tables", driver })
}

impl CacheTables {
    /// Tables of a dense cache: `cache_seqlens` (`B` entries ≥ 0) and
    /// optionally `cache_batch_idx` (`B` entries ≥ 0: which cache row each
    /// sequence uses). The cache tensors' extents are checked at each call.
    ///
    /// # Errors
    /// [`Error::SeqLens`] naming the table and entry at fault; [`Error::Cuda`]
    /// if the upload fails.
    pub fn dense(stream: &Arc<CudaStream>, cache_seqlens: &[i32], cache_batch_idx: Option<&[i32]>) -> Result<Self> {
        let info = check_cache_tables(cache_seqlens, cache_batch_idx, None)?;
        Ok(CacheTables {
            info,
            seqlens: up(stream, cache_seqlens)?,
            batch_idx: cache_batch_idx.map(|x| up(stream, x)).transpose()?,
            block_table: None,
            block_table_host: None,
            batch_idx_host: cache_batch_idx.map(<[i32]>::to_vec),
            seqlens_host: cache_seqlens.to_vec(),
        })
    }

    /// Tables of a paged cache: `cache_seqlens` (`B` entries), `block_table`
    /// (`B` rows of `pages_per_seq` page ids, row-major; only the first
    /// `ceil(cache_seqlens[b] / page_size)` of row `b` are read and must be
    /// ≥ 0) and the page size (any ≥ 1).
    ///
    /// # Errors
    /// [`Error::SeqLens`] naming the table and entry at fault (including a
    /// sequence longer than its row's pages), [`Error::InvalidOption`] for
    /// `page_size` 0; [`Error::Cuda`] if the upload fails.
    pub fn paged(
        stream: &Arc<CudaStream>,
        cache_seqlens: &[i32],
        block_table: &[i32],
        pages_per_seq: usize,
        page_size: usize,
    ) -> Result<Self> {
        let info = check_cache_tables(cache_seqlens, None, Some((block_table, pages_per_seq, page_size)))?;
        Ok(CacheTables {
            info,
            seqlens: up(stream, cache_seqlens)?,
            batch_idx: None,
            block_table: Some(up(stream, block_table)?),
            block_table_host: Some(block_table.to_vec()),
            batch_idx_host: None,
            seqlens_host: cache_seqlens.to_vec(),
        })
    }

    /// Replaces the cache lengths (e.g. after a decode step appended keys),
    /// checked as at construction against the same batch-index or block
    /// tables; copied on `stream` into the existing device buffer.
    ///
    /// # Errors
    /// As the constructors; the tables are unchanged on error.
    pub fn set_seqlens(&mut self, stream: &Arc<CudaStream>, cache_seqlens: &[i32]) -> Result<()> {
        let paged =
            self.info.paged.map(|pg| (self.block_table_host.as_deref().unwrap_or(&[]), pg.pages_per_seq, pg.page_size));
        if cache_seqlens.len() != self.info.batch {
            let n = cache_seqlens.len();
            return Err(Error::SeqLens {
                arg: "cache_seqlens",
                index: n,
                value: n as i64,
                reason: "needs the tables' B entries",
            });
        }
        let info = check_cache_tables(cache_seqlens, None, paged)?;
        stream
            .memcpy_htod(cache_seqlens, &mut self.seqlens)
            .map_err(|driver| Error::Cuda { during: "uploading cache lengths", driver })?;
        self.info = CacheInfo { max_batch_idx: self.info.max_batch_idx, ..info };
        self.seqlens_host.clear();
        self.seqlens_host.extend_from_slice(cache_seqlens);
        Ok(())
    }

    /// The cache lengths as the tables hold them.
    pub fn seqlens(&self) -> &[i32] {
        &self.seqlens_host
    }

    /// Where key `j` of sequence `b` lives: (cache entry, row in it).
    fn slot(&self, b: usize, j: usize) -> (usize, usize) {
        match (&self.block_table_host, self.info.paged) {
            (Some(t), Some(pg)) => (t[b * pg.pages_per_seq + j / pg.page_size] as usize, j % pg.page_size),
            _ => (self.batch_idx_host.as_ref().map_or(b, |i| i[b] as usize), j),
        }
    }

    /// Number of sequences `B`.
    pub fn batch(&self) -> usize {
        self.info.batch
    }

    /// The longest cache length.
    pub fn max_seqlen(&self) -> usize {
        self.info.max_seqlen.0
    }

    /// The page size, for a paged cache.
    pub fn page_size(&self) -> Option<usize> {
        self.info.paged.map(|p| p.page_size)
    }
}

/// Copies `run` elements of token `(b, t)` from head `h` on, into cache
/// entry `entry`, row `row`. The views were validated against their layouts,
/// so the ranges lie inside them; a miss would be a bug, reported as an error.
fn copy_run<T: Element>(
    stream: &Arc<CudaStream>,
    src: &DeviceTensor<'_, T>,
    dst: &mut DeviceTensorMut<'_, T>,
    (b, t, h): (usize, usize, usize),
    (entry, row): (usize, usize),
    run: usize,
) -> Result<()> {
    let from = src.layout.offset(b, t, h, 0);
    let to = dst.layout.offset(entry, row, h, 0);
    let (src_len, dst_len) = (src.view.len(), dst.view.len());
    let s = src.view.try_slice(from..from + run).ok_or(Error::OutOfBounds {
        arg: "k_new",
        needed: from + run,
        len: src_len,
    })?;
    let mut o = dst.view.try_slice_mut(to..to + run).ok_or(Error::OutOfBounds {
        arg: "k_cache",
        needed: to + run,
        len: dst_len,
    })?;
    stream.memcpy_dtod(&s, &mut o).map_err(|driver| Error::Cuda { during: "appending to the KV cache", driver })
}

impl Attention {
    /// Appends `k_new`, `v_new` `[B, L_new, Hk, D]` to a KV cache at each
    /// sequence's current length (positions `cache_seqlens[b] ..
    /// cache_seqlens[b] + L_new`), then advances `tables`' lengths by `L_new`
    /// — the step before attending with the new queries.
    ///
    /// Device-to-device copies on `stream`, one per (sequence, token) when
    /// each token's `Hk × D` elements are contiguous in both tensors, else
    /// one per head: fine for decode steps (a few tokens), slow for long
    /// appends (a fused append kernel is owed). Asynchronous; it allocates
    /// nothing on the device.
    ///
    /// # Errors
    /// [`Error::CacheFull`] (nothing is written) when a sequence would pass
    /// its capacity or reach a page its block-table row does not give;
    /// [`Error::ShapeMismatch`] for new keys whose batch, heads or head dim
    /// disagree with the cache; the per-tensor layout errors of
    /// [`forward_into`](Self::forward_into); [`Error::Cuda`] if a copy fails.
    #[allow(clippy::too_many_arguments)]
    pub fn append_kv<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        k_new: &DeviceTensor<'_, T>,
        v_new: &DeviceTensor<'_, T>,
        k_cache: &mut DeviceTensorMut<'_, T>,
        v_cache: &mut DeviceTensorMut<'_, T>,
        tables: &mut CacheTables,
    ) -> Result<()> {
        self.check_context("stream", stream.context())?;
        let descs = [
            desc("k_new", &k_new.view, k_new.layout),
            desc("v_new", &v_new.view, v_new.layout),
            desc("k_cache", &k_cache.view, k_cache.layout),
            desc("v_cache", &v_cache.view, v_cache.layout),
        ];
        // The caches as attention sees them (extents, tables), then the new keys against them.
        let q_like = TensorDesc {
            arg: "k_new",
            layout: Layout::bshd(tables.batch(), 1, k_cache.layout.shape[2], k_cache.layout.shape[3]),
            len: usize::MAX,
        };
        validate_kvcache(
            T::DTYPE,
            &q_like,
            &descs[2],
            &descs[3],
            None,
            None,
            &tables.info,
            &AttentionOptions::default(),
        )?;
        crate::validate::validate_appended(&descs[0], &descs[1], &descs[2])?;
        let [_, l_new, hk, d] = k_new.layout.shape;
        let (entries, rows) = (k_cache.layout.shape[0], k_cache.layout.shape[1]);
        // Capacity of every sequence first: nothing is written unless all fit.
        let mut new_lens = tables.seqlens_host.clone();
        for (b, len) in new_lens.iter_mut().enumerate() {
            let needed = *len as usize + l_new;
            let capacity = match (&tables.block_table_host, tables.info.paged) {
                (Some(t), Some(pg)) => {
                    let row = &t[b * pg.pages_per_seq..(b + 1) * pg.pages_per_seq];
                    // Pages usable: the leading entries that name a page of this cache.
                    row.iter().take_while(|&&id| id >= 0 && (id as usize) < entries).count() * pg.page_size
                }
                _ => rows,
            };
            if needed > capacity || needed > i32::MAX as usize {
                return Err(Error::CacheFull { arg: "k_cache", sequence: b, needed, capacity });
            }
            *len = needed as i32;
        }
        let contiguous = |l: &Layout| l.strides[2] == d || hk == 1;
        let whole_rows = [&k_new.layout, &v_new.layout, &k_cache.layout, &v_cache.layout].iter().all(|l| contiguous(l));
        let (run, runs) = if whole_rows { (hk * d, 1) } else { (d, hk) };
        for b in 0..tables.batch() {
            for t in 0..l_new {
                let (entry, row) = tables.slot(b, tables.seqlens_host[b] as usize + t);
                for h in 0..runs {
                    copy_run(stream, k_new, k_cache, (b, t, h), (entry, row), run)?;
                    copy_run(stream, v_new, v_cache, (b, t, h), (entry, row), run)?;
                }
            }
        }
        tables.set_seqlens(stream, &new_lens)
    }

    /// Attention of `q` `[B, Lq, Hq, D]` over a KV cache into caller-owned
    /// `o` `[B, Lq, Hq, D]` and optionally `lse` `[B, Hq, Lq]`.
    ///
    /// `k_cache` and `v_cache` are `[B_c, L_max, Hk, D]` (dense) or
    /// `[num_pages, page_size, Hk, D]` (paged), any strides with the last
    /// one 1; `tables` says which keys each sequence uses. The queries are
    /// the newest positions: with the default bottom-right alignment query
    /// `i` of sequence `b` sits at key position `cache_seqlens[b] − Lq + i`.
    /// Asynchronous on `stream`; no host allocation, no device read-back.
    ///
    /// Dense caches run on every kernel family. Paged ones run on the Hopper
    /// kernels when the page size is a multiple of their block_n (128; 80 at
    /// head dims above 128), else on the sm80 kernels (any page size: one
    /// page lookup per key tile where their block_n divides the page size,
    /// one per row otherwise); `KernelInfo::passed_over` says which family
    /// was skipped and why. New keys go in first with
    /// [`append_kv`](Self::append_kv).
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into) for `q`, `o`, `lse` and the
    /// caches' layouts; [`Error::SeqLens`] for a cache length, batch index or
    /// page id beyond the cache; [`Error::ShapeMismatch`] for caches that
    /// disagree with each other, with `q`, or with the tables' page size.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_kvcache_into<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k_cache: &DeviceTensor<'_, T>,
        v_cache: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        tables: &CacheTables,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        self.kvcache_call(stream, q, k_cache, v_cache, o, lse, tables, None, opts)
    }

    /// The number of key splits the split-KV path should use for a KV-cache
    /// call of `batch` sequences, `seqlen_q` queries, `heads_q` query heads
    /// and `heads_kv` KV heads over caches of up to `max_cache_len` keys on
    /// this GPU.
    ///
    /// The heuristic counts the CTAs the unsplit call launches. A decode step
    /// (several query heads per KV head, at most 16 queries per sequence)
    /// runs on the GQA-packed `_decode` kernels: one CTA per sequence and KV
    /// head, its 128-row tile holding that KV head's `Hq/Hk · Lq` query rows,
    /// so `ceil(Hq/Hk · Lq / 128) · Hk · B` CTAs. Any other call has
    /// `ceil(Lq / 128) · Hq · B`. The splits then fill one wave of two CTAs
    /// per SM (the kernels' register budget allows two): `floor(2 · SMs /
    /// CTAs)`, 1 (no split) when that is below 2, never so many that a split
    /// has fewer than two 64-key tiles, and at most 64 (the combine reads
    /// every split's partial row). On a 132-SM H100, a decode step of 8
    /// sequences with 32:8 heads over 32k keys gets 4 (256 CTAs); one
    /// sequence gets 33; 64 sequences get 1.
    pub fn kvcache_splits(
        &self,
        batch: usize,
        seqlen_q: usize,
        heads_q: usize,
        heads_kv: usize,
        max_cache_len: usize,
    ) -> usize {
        Self::kvcache_splits_on(self.sm_count(), batch, seqlen_q, heads_q, heads_kv, max_cache_len)
    }

    /// [`kvcache_splits`](Self::kvcache_splits) for a GPU of `sm_count` SMs
    /// (no handle needed: planning, tests).
    pub fn kvcache_splits_on(
        sm_count: u32,
        batch: usize,
        seqlen_q: usize,
        heads_q: usize,
        heads_kv: usize,
        max_cache_len: usize,
    ) -> usize {
        // The dispatcher's decode test (dispatch.rs), on sizes alone.
        let packed = heads_kv > 0
            && heads_q > heads_kv
            && heads_q % heads_kv == 0
            && seqlen_q <= crate::dispatch::MAX_DECODE_QUERIES;
        let (rows, heads) =
            if packed { (seqlen_q.saturating_mul(heads_q / heads_kv), heads_kv) } else { (seqlen_q, heads_q) };
        let ctas = rows.div_ceil(128).max(1).saturating_mul(heads).saturating_mul(batch).max(1);
        let per_wave = 2 * sm_count as usize;
        let by_waves = per_wave / ctas;
        if by_waves < 2 {
            return 1;
        }
        let by_tiles = (max_cache_len.div_ceil(64) / 2).max(1);
        by_waves.min(by_tiles).min(64)
    }

    /// f32 elements of workspace that [`forward_kvcache_split_into`](Self::forward_kvcache_split_into)
    /// needs for `splits` splits of an output `[B, Lq, Hq, D]`: every split's
    /// partial O and LSE, `splits · B · Lq · Hq · (D + 1)`. `None` on overflow.
    pub fn split_workspace_len(
        splits: usize,
        batch: usize,
        seqlen_q: usize,
        heads_q: usize,
        head_dim: usize,
    ) -> Option<usize> {
        splits.checked_mul(batch)?.checked_mul(seqlen_q)?.checked_mul(heads_q)?.checked_mul(head_dim.checked_add(1)?)
    }

    /// [`forward_kvcache_into`](Self::forward_kvcache_into) with the keys of
    /// each sequence split over `splits` CTAs per row block (split-KV, as
    /// FlashDecoding): each writes the partial O and LSE of its share of
    /// the key tiles into `workspace` (f32, at least
    /// [`split_workspace_len`](Self::split_workspace_len) elements), then a
    /// combine kernel merges them into `o` and `lse` (DESIGN.md section 1b).
    /// For decode steps, where `B · Hq` row blocks leave most SMs idle; pick
    /// `splits` with [`kvcache_splits`](Self::kvcache_splits). `splits <= 1`
    /// is the plain call. The same results as the plain call up to rounding;
    /// asynchronous on `stream`, no allocation, no read-back (graph-capturable
    /// with a workspace allocated beforehand).
    ///
    /// Runs on the sm80 kernels (also on an H100, where the plain call would
    /// take the Hopper kernels): `opts` may force no other family.
    ///
    /// # Errors
    /// As [`forward_kvcache_into`](Self::forward_kvcache_into);
    /// [`Error::InvalidOption`] (`splits`) above 128 or with another family
    /// forced; [`Error::OutOfBounds`] (`workspace`) for a workspace too small.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_kvcache_split_into<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k_cache: &DeviceTensor<'_, T>,
        v_cache: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        tables: &CacheTables,
        workspace: &mut CudaSlice<f32>,
        splits: usize,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        if splits <= 1 {
            return self.forward_kvcache_into(stream, q, k_cache, v_cache, o, lse, tables, opts);
        }
        if splits > MAX_SPLITS {
            let reason = "split-KV takes at most 128 splits";
            return Err(Error::InvalidOption { arg: "splits", value: splits.to_string(), reason });
        }
        if opts.kernel.is_some_and(|f| f != KernelFamily::Sm80) {
            let reason = "split-KV runs on the sm80 kernels";
            return Err(Error::InvalidOption { arg: "splits", value: splits.to_string(), reason });
        }
        self.check_context("workspace", workspace.context())?;
        let opts = opts.with_kernel(KernelFamily::Sm80);
        self.kvcache_call(stream, q, k_cache, v_cache, o, lse, tables, Some((splits, workspace)), &opts)
    }

    /// The shared body of the KV-cache calls: contexts, validation, the
    /// split workspace's size (with `split`), kernel choice and launch.
    #[allow(clippy::too_many_arguments)]
    fn kvcache_call<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k_cache: &DeviceTensor<'_, T>,
        v_cache: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        tables: &CacheTables,
        split: Option<(usize, &mut CudaSlice<f32>)>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        let names = ["q", "k_cache", "v_cache", "o"];
        let tables_ctx = ("tables", tables.seqlens.stream().context());
        let (descs, lse_desc) =
            self.describe_call(stream, names, q, k_cache, v_cache, o, lse.as_deref(), tables_ctx)?;
        let (q_d, k_d, v_d) = (&descs[0], &descs[1], &descs[2]);
        let p = validate_kvcache(T::DTYPE, q_d, k_d, v_d, Some(&descs[3]), lse_desc.as_ref(), &tables.info, opts)?;
        if let Some((splits, workspace)) = &split {
            let needed =
                Self::split_workspace_len(*splits, p.batch, p.seqlen_q, p.heads_q, p.head_dim).unwrap_or(usize::MAX);
            if workspace.len() < needed {
                return Err(Error::OutOfBounds { arg: "workspace", needed, len: workspace.len() });
            }
        }
        let seq = Some(Tables::Cache(tables));
        self.launch_forward_seq(stream, &p, &descs, q, k_cache, v_cache, o, lse, seq, split, opts)
    }
}

/// The most key splits of one split-KV call.
pub const MAX_SPLITS: usize = 128;
