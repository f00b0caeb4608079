//! Validation: user types → a [`Problem`] whose every size and option is
//! known good (DESIGN.md section 6). Both the GPU path and the CPU
//! [`reference`](crate::reference) go through [`validate`], so the two accept
//! and reject exactly the same inputs. All arithmetic on caller sizes is
//! checked, in release builds too.

use crate::error::{Error, Result};
use crate::options::{AttentionOptions, HeadValues, Mask, MaskAlignment};
use crate::tensor::{non_overlapping, DType, Layout, LseLayout};

/// Largest sequence length: the kernels do band arithmetic in `i32`, where
/// `i + off + right` with `right` clamped to `Lq + Lk` must not overflow.
pub const MAX_SEQLEN: usize = 1 << 28;
/// Largest batch and head count: they index the launch grid's y and z.
pub const MAX_GRID_YZ: usize = 65_535;
/// Largest head dimension served.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest `|scale|`: with it every f16 input gives a finite score
/// (`256 · 65504² · 2^64 ≈ 2e31`), and `scale · log2(e)`, which the kernels
/// fold into one multiplier, stays far from f32's overflow. Realistic scales
/// are below 10; a larger one is a typed error rather than a NaN.
pub const MAX_SCALE: f32 = 18_446_744_073_709_551_616.0; // 2^64

/// What [`validate`] needs to know of one tensor argument.
#[derive(Debug, Clone, Copy)]
pub struct TensorDesc {
    /// Its name in error messages.
    pub arg: &'static str,
    /// Shape and strides.
    pub layout: Layout,
    /// Elements in the underlying buffer (view).
    pub len: usize,
}

/// What [`validate`] needs to know of the LSE argument.
#[derive(Debug, Clone, Copy)]
pub struct LseDesc {
    /// Shape and strides.
    pub layout: LseLayout,
    /// Elements in the underlying buffer (view).
    pub len: usize,
}

/// A validated attention problem: every size and option is known good.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Problem {
    /// Element type of Q, K, V and O.
    pub dtype: DType,
    /// Batch size `B`.
    pub batch: usize,
    /// Query length `Lq`.
    pub seqlen_q: usize,
    /// Key/value length `Lk`.
    pub seqlen_k: usize,
    /// Query heads `Hq`.
    pub heads_q: usize,
    /// Key/value heads `Hk` (divides `Hq`).
    pub heads_kv: usize,
    /// Head dimension `D` (multiple of 8, at most 256).
    pub head_dim: usize,
    /// The mask.
    pub mask: Mask,
    /// Its alignment.
    pub alignment: MaskAlignment,
    /// The effective scale (default resolved).
    pub scale: f32,
    /// The softcap, if any.
    pub softcap: Option<f32>,
    /// For a packed (varlen) batch, its totals; `batch`, `seqlen_q` and
    /// `seqlen_k` are then the number of sequences and the longest lengths.
    pub varlen: Option<SeqInfo>,
    /// For a KV cache, its tables' facts; `seqlen_k` is then the longest cache length.
    pub kv_cache: Option<CacheInfo>,
    /// ALiBi slopes, if any, and how they are laid out.
    pub alibi: Option<AlibiLayout>,
    /// Whether attention-sink logits join the softmax.
    pub sinks: bool,
}

/// How ALiBi slopes are indexed ([`Alibi`](crate::Alibi)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlibiLayout {
    /// `[Hq]`: one slope per query head.
    PerHead,
    /// `[B, Hq]`: one per (batch entry, query head), batch-major.
    PerBatch,
}

/// Checks the score modifiers of `opts` for `batch` batch entries
/// (sequences) and `heads_q` query heads: enough values, and, where they are
/// host values, finite ones (device values cannot be read here).
///
/// # Errors
/// [`Error::OutOfBounds`] naming `alibi_slopes` or `sinks` for too few
/// values, [`Error::InvalidOption`] for a non-finite one.
pub fn check_modifiers(opts: &AttentionOptions, batch: usize, heads_q: usize) -> Result<(Option<AlibiLayout>, bool)> {
    fn check(arg: &'static str, values: HeadValues<'_>, needed: usize) -> Result<()> {
        if let HeadValues::Raw(_) = values {
            return Ok(()); // forward_raw's caller vouches for the count
        }
        let len = values.len();
        if len < needed {
            return Err(Error::OutOfBounds { arg, needed, len });
        }
        if let HeadValues::Host(v) = values {
            if let Some(x) = v[..needed].iter().find(|x| !x.is_finite()) {
                return Err(Error::InvalidOption { arg, value: x.to_string(), reason: "must be finite" });
            }
        }
        Ok(())
    }
    let alibi = match opts.alibi {
        None => None,
        Some(a) => {
            // batch and heads are each at most 2^16 here (grid limits): no overflow.
            let needed = if a.per_batch { batch.saturating_mul(heads_q) } else { heads_q };
            check("alibi_slopes", a.slopes, needed)?;
            Some(if a.per_batch { AlibiLayout::PerBatch } else { AlibiLayout::PerHead })
        }
    };
    if let Some(s) = opts.sinks {
        check("sinks", s, heads_q)?;
    }
    Ok((alibi, opts.sinks.is_some()))
}

/// The facts of a KV cache's tables that validation and the launch need,
/// checked once by [`check_cache_tables`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheInfo {
    /// Sequences `B`.
    pub batch: usize,
    /// The longest `cache_seqlens` entry, and its index.
    pub max_seqlen: (usize, usize),
    /// The largest `cache_batch_idx` entry, if that table is given.
    pub max_batch_idx: Option<usize>,
    /// For a paged cache: page size, block-table row length, largest page id used.
    pub paged: Option<PagedInfo>,
}

/// A paged cache's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedInfo {
    /// Keys per page.
    pub page_size: usize,
    /// Entries per block-table row (the most pages a sequence can have).
    pub pages_per_seq: usize,
    /// The largest page id any sequence uses (`None`: no sequence uses a page).
    pub max_page: Option<usize>,
}

/// Checks a KV cache's host tables (DESIGN.md section 1b): `cache_seqlens`
/// (`B >= 1` entries, each `>= 0`); `cache_batch_idx` (`B` entries `>= 0`);
/// for a paged cache `block_table` (`B · pages_per_seq` entries, row-major),
/// `page_size >= 1`, every sequence's `ceil(len / page_size)` pages inside its
/// row and those entries `>= 0` (entries past them are never read). The
/// cache tensors' extents are checked by [`validate_kvcache`].
///
/// # Errors
/// [`Error::SeqLens`] naming the table and the first entry at fault;
/// [`Error::InvalidOption`] for `page_size` 0.
pub fn check_cache_tables(
    cache_seqlens: &[i32],
    cache_batch_idx: Option<&[i32]>,
    paged: Option<(&[i32], usize, usize)>,
) -> Result<CacheInfo> {
    let bad = |arg, index: usize, value: i64, reason| Error::SeqLens { arg, index, value, reason };
    let batch = cache_seqlens.len();
    if batch == 0 {
        return Err(bad("cache_seqlens", 0, 0, "needs B >= 1 entries"));
    }
    if batch > MAX_GRID_YZ {
        return Err(overflow("cache_seqlens", "batch", Some(batch as u128), MAX_GRID_YZ as u128));
    }
    let mut max_seqlen = (0, 0);
    for (b, &l) in cache_seqlens.iter().enumerate() {
        if l < 0 {
            return Err(bad("cache_seqlens", b, l as i64, "must be >= 0"));
        }
        if l as usize > max_seqlen.0 {
            max_seqlen = (l as usize, b);
        }
    }
    let max_batch_idx = match cache_batch_idx {
        None => None,
        Some(idx) => {
            if idx.len() != batch {
                return Err(bad("cache_batch_idx", idx.len(), idx.len() as i64, "needs B entries (one per sequence)"));
            }
            if let Some((b, &i)) = idx.iter().enumerate().find(|(_, &i)| i < 0) {
                return Err(bad("cache_batch_idx", b, i as i64, "must be >= 0"));
            }
            idx.iter().map(|&i| i as usize).max()
        }
    };
    let paged = match paged {
        None => None,
        Some((table, pages_per_seq, page_size)) => {
            if page_size == 0 {
                return Err(Error::InvalidOption { arg: "page_size", value: "0".into(), reason: "must be >= 1" });
            }
            if Some(table.len()) != batch.checked_mul(pages_per_seq) || pages_per_seq == 0 {
                return Err(bad(
                    "block_table",
                    table.len(),
                    table.len() as i64,
                    "needs B · pages_per_seq >= 1 entries",
                ));
            }
            let mut max_page = None;
            for (b, &l) in cache_seqlens.iter().enumerate() {
                let pages = (l as usize).div_ceil(page_size);
                if pages > pages_per_seq {
                    return Err(bad("cache_seqlens", b, l as i64, "needs more pages than a block-table row holds"));
                }
                for (j, &id) in table[b * pages_per_seq..b * pages_per_seq + pages].iter().enumerate() {
                    if id < 0 {
                        return Err(bad("block_table", b * pages_per_seq + j, id as i64, "must be >= 0"));
                    }
                    max_page = max_page.max(Some(id as usize));
                }
            }
            Some(PagedInfo { page_size, pages_per_seq, max_page })
        }
    };
    if paged.is_some() && cache_batch_idx.is_some() {
        return Err(bad("cache_batch_idx", 0, 0, "a paged cache addresses sequences through block_table only"));
    }
    Ok(CacheInfo { batch, max_seqlen, max_batch_idx, paged })
}

/// `t`'s extents in `dims` equal `against`'s, else [`Error::ShapeMismatch`]
/// naming `t` and the first dimension that differs.
fn same_dims(t: &TensorDesc, against: &TensorDesc, dims: &[usize]) -> Result<()> {
    const NAMES: [&str; 4] = ["batch", "seqlen", "heads", "head_dim"];
    match dims.iter().find(|&&i| t.layout.shape[i] != against.layout.shape[i]) {
        Some(&i) => Err(Error::ShapeMismatch {
            arg: t.arg,
            dim: NAMES[i],
            expected: against.layout.shape[i],
            got: t.layout.shape[i],
            against: against.arg,
        }),
        None => Ok(()),
    }
}

/// Checks keys and values to append to a cache (`k_new`, `v_new`
/// `[B, L_new, Hk, D]`) against each other and the cache `k_cache`: same
/// heads and head dim, each a valid tensor of its own.
///
/// # Errors
/// The per-tensor errors of [`validate`]; [`Error::ShapeMismatch`] naming
/// the tensor and dimension that disagree.
pub fn validate_appended(k_new: &TensorDesc, v_new: &TensorDesc, k_cache: &TensorDesc) -> Result<()> {
    check_tensor(k_new)?;
    check_tensor(v_new)?;
    same_dims(v_new, k_new, &[0, 1, 2, 3])?;
    same_dims(k_new, k_cache, &[2, 3])
}

/// Checks attention over a KV cache: Q and O `[B, Lq, Hq, D]` (any
/// strides), LSE `[B, Hq, Lq]`; K and V caches `[B_c, L_max, Hk, D]`
/// (dense) or `[num_pages, page_size, Hk, D]` (paged), with the tables
/// `cache` (from [`check_cache_tables`]). Sequence `b` attends to the first
/// `cache_seqlens[b]` keys of its cache row, its queries the newest positions
/// (bottom-right), or top-left as `opts` says.
///
/// # Errors
/// Every error of [`validate`] on Q, O, LSE and the caches' own layouts;
/// [`Error::ShapeMismatch`] for caches that disagree with each other or with
/// Q (`B`, `Hk`, `D`, a page size other than the tables'); [`Error::SeqLens`]
/// for a cache length above `L_max`, a `cache_batch_idx` or page id beyond
/// the cache.
#[allow(clippy::too_many_arguments)]
pub fn validate_kvcache(
    dtype: DType,
    q: &TensorDesc,
    k_cache: &TensorDesc,
    v_cache: &TensorDesc,
    o: Option<&TensorDesc>,
    lse: Option<&LseDesc>,
    cache: &CacheInfo,
    opts: &AttentionOptions,
) -> Result<Problem> {
    check_tensor(k_cache)?;
    check_tensor(v_cache)?;
    same_dims(v_cache, k_cache, &[0, 1, 2, 3])?;
    let [entries, rows, heads_kv, head_dim] = k_cache.layout.shape;
    let bad = |arg, index: usize, value: usize, reason| Error::SeqLens { arg, index, value: value as i64, reason };
    match cache.paged {
        None => {
            let (len, b) = cache.max_seqlen;
            if len > rows {
                return Err(bad("cache_seqlens", b, len, "longer than the cache (its seqlen extent)"));
            }
            match cache.max_batch_idx {
                Some(i) if i >= entries => return Err(bad("cache_batch_idx", 0, i, "beyond the cache's batch extent")),
                None if entries < cache.batch => {
                    let got = entries;
                    return Err(Error::ShapeMismatch {
                        arg: k_cache.arg,
                        dim: "batch",
                        expected: cache.batch,
                        got,
                        against: "cache_seqlens",
                    });
                }
                _ => {}
            }
        }
        Some(pg) => {
            if rows > MAX_SEQLEN {
                return Err(overflow(k_cache.arg, "page size", Some(rows as u128), MAX_SEQLEN as u128));
            }
            if rows != pg.page_size {
                let (expected, got) = (pg.page_size, rows);
                return Err(Error::ShapeMismatch {
                    arg: k_cache.arg,
                    dim: "seqlen",
                    expected,
                    got,
                    against: "page_size",
                });
            }
            if let Some(m) = pg.max_page.filter(|&m| m >= entries) {
                return Err(bad("block_table", 0, m, "a page id beyond the cache's page count"));
            }
        }
    }
    if q.layout.shape[0] != cache.batch {
        let got = q.layout.shape[0];
        return Err(Error::ShapeMismatch {
            arg: "q",
            dim: "batch",
            expected: cache.batch,
            got,
            against: "cache_seqlens",
        });
    }
    // The rest as a rectangular problem whose K/V have Q's batch and the
    // longest cache length; the caches' own extents and spans were checked above.
    let view = |t: &TensorDesc| {
        let mut layout = t.layout;
        layout.shape = [cache.batch, cache.max_seqlen.0, heads_kv, head_dim];
        TensorDesc { arg: t.arg, layout, len: usize::MAX }
    };
    let p = validate(dtype, q, &view(k_cache), &view(v_cache), o, lse, opts)?;
    Ok(Problem { kv_cache: Some(*cache), ..p })
}

/// The facts of a packed batch's sequence tables that the launch needs,
/// checked once by [`check_seqlens`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqInfo {
    /// Sequences `B`.
    pub batch: usize,
    /// Query tokens `Tq` (`cu_seqlens_q[B]`).
    pub total_q: usize,
    /// Key tokens `Tk` (`cu_seqlens_k[B]`).
    pub total_k: usize,
    /// Longest query sequence.
    pub max_q: usize,
    /// Longest key sequence (after `seqused_k`).
    pub max_k: usize,
}

/// Checks a packed batch's host sequence tables (DESIGN.md section 1b):
/// `cu_seqlens_q` and `cu_seqlens_k` have `B + 1 >= 2` entries, start at 0
/// and never decrease; `seqused_k`, if given, has `B` entries in
/// `0..=Lk_b`. The totals are checked against the tensors by
/// [`validate_varlen`].
///
/// # Errors
/// [`Error::SeqLens`] naming the table and the first entry at fault.
pub fn check_seqlens(cu_q: &[i32], cu_k: &[i32], seqused_k: Option<&[i32]>) -> Result<SeqInfo> {
    let bad = |arg, index: usize, value: i64, reason| Error::SeqLens { arg, index, value, reason };
    if cu_q.len() < 2 {
        return Err(bad("cu_seqlens_q", cu_q.len(), cu_q.len() as i64, "needs B + 1 >= 2 entries"));
    }
    let batch = cu_q.len() - 1;
    if cu_k.len() != cu_q.len() {
        return Err(bad("cu_seqlens_k", cu_k.len(), cu_k.len() as i64, "needs as many entries as cu_seqlens_q"));
    }
    if batch > MAX_GRID_YZ {
        return Err(overflow("cu_seqlens_q", "batch", Some(batch as u128), MAX_GRID_YZ as u128));
    }
    // Lengths of a valid table: its differences, each checked.
    let lengths = |arg: &'static str, c: &[i32]| -> Result<(usize, usize)> {
        if c[0] != 0 {
            return Err(bad(arg, 0, c[0] as i64, "must start at 0"));
        }
        let mut max = 0;
        for i in 1..c.len() {
            if c[i] < c[i - 1] {
                return Err(bad(arg, i, c[i] as i64, "must not decrease"));
            }
            max = max.max((c[i] - c[i - 1]) as usize);
        }
        Ok((c[c.len() - 1] as usize, max))
    };
    let (total_q, max_q) = lengths("cu_seqlens_q", cu_q)?;
    let (total_k, mut max_k) = lengths("cu_seqlens_k", cu_k)?;
    if let Some(u) = seqused_k {
        if u.len() != batch {
            return Err(bad("seqused_k", u.len(), u.len() as i64, "needs B entries (one per sequence)"));
        }
        max_k = 0;
        for (b, &used) in u.iter().enumerate() {
            if used < 0 || used > cu_k[b + 1] - cu_k[b] {
                return Err(bad("seqused_k", b, used as i64, "must be in 0..=the sequence's keys"));
            }
            max_k = max_k.max(used as usize);
        }
    }
    Ok(SeqInfo { batch, total_q, total_k, max_q, max_k })
}

/// Checks a packed (varlen) problem: Q and O `[1, Tq, Hq, D]`, K and V
/// `[1, Tk, Hk, D]` (one sequence of all tokens, any strides), LSE
/// `[1, Hq, Tq]`, with the sequence tables `seq` (from [`check_seqlens`]).
///
/// # Errors
/// Every error of [`validate`] on the packed tensors; a packed tensor with
/// batch extent other than 1 ([`Error::ShapeMismatch`]); a token count that
/// differs from its table's last entry ([`Error::SeqLens`]).
#[allow(clippy::too_many_arguments)]
pub fn validate_varlen(
    dtype: DType,
    q: &TensorDesc,
    k: &TensorDesc,
    v: &TensorDesc,
    o: Option<&TensorDesc>,
    lse: Option<&LseDesc>,
    seq: &SeqInfo,
    opts: &AttentionOptions,
) -> Result<Problem> {
    if q.layout.shape[0] != 1 {
        let got = q.layout.shape[0];
        return Err(Error::ShapeMismatch { arg: "q", dim: "batch", expected: 1, got, against: "a packed batch" });
    }
    let packed = validate(dtype, q, k, v, o, lse, opts)?;
    let last = |arg, index, value: usize, total: usize| {
        if value == total {
            Ok(())
        } else {
            Err(Error::SeqLens { arg, index, value: value as i64, reason: "must equal the packed tensor's tokens" })
        }
    };
    last("cu_seqlens_q", seq.batch, seq.total_q, packed.seqlen_q)?;
    last("cu_seqlens_k", seq.batch, seq.total_k, packed.seqlen_k)?;
    // Per-batch ALiBi slopes are per sequence: B of the tables, not Q's 1.
    check_modifiers(opts, seq.batch, packed.heads_q)?;
    Ok(Problem { batch: seq.batch, seqlen_q: seq.max_q, seqlen_k: seq.max_k, varlen: Some(*seq), ..packed })
}

/// A validated merge of attention states (DESIGN.md section 1b).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProblem {
    /// The element type of every O.
    pub dtype: DType,
    /// Partial states merged.
    pub parts: usize,
    /// `B`.
    pub batch: usize,
    /// Rows per sequence `L`.
    pub seqlen: usize,
    /// Heads `H`.
    pub heads: usize,
    /// `D`.
    pub head_dim: usize,
}

/// The most partial states one merge takes (`FA_MERGE_MAX_PARTS`).
pub const MAX_MERGE_PARTS: usize = 8;

/// Checks a merge of attention states: 1 to [`MAX_MERGE_PARTS`] parts, each
/// an O `[B, L, H, D]` and its LSE `[B, H, L]` (row stride 1), every part of
/// one shape, and the output O (and LSE) of that shape too; each tensor
/// inside its buffer, the outputs without self-overlap, `D` as the
/// attention kernels take it.
///
/// # Errors
/// [`Error::InvalidOption`] (`parts`) for no part or too many; the errors of
/// [`validate`] for each tensor (a part is named `parts.o` / `parts.lse`);
/// [`Error::ShapeMismatch`] for a part whose shape differs from the output's.
pub fn validate_merge(
    dtype: DType,
    parts: &[(TensorDesc, LseDesc)],
    o: &TensorDesc,
    lse: Option<&LseDesc>,
) -> Result<MergeProblem> {
    if parts.is_empty() || parts.len() > MAX_MERGE_PARTS {
        return Err(Error::InvalidOption {
            arg: "parts",
            value: parts.len().to_string(),
            reason: "a merge takes 1 to 8 partial states",
        });
    }
    let opts = AttentionOptions::default();
    // The output as a self-attention problem: O's shape, bounds, head dim, LSE.
    let out = validate(dtype, o, o, o, Some(o), lse, &opts)?;
    for (po, pl) in parts {
        validate(dtype, po, po, po, None, Some(pl), &opts)?;
        for (i, dim) in ["batch", "seqlen", "heads", "head_dim"].into_iter().enumerate() {
            if po.layout.shape[i] != o.layout.shape[i] {
                let (expected, got) = (o.layout.shape[i], po.layout.shape[i]);
                return Err(Error::ShapeMismatch { arg: po.arg, dim, expected, got, against: o.arg });
            }
        }
    }
    Ok(MergeProblem {
        dtype,
        parts: parts.len(),
        batch: out.batch,
        seqlen: out.seqlen_q,
        heads: out.heads_q,
        head_dim: out.head_dim,
    })
}

impl Problem {
    /// Query heads per KV head.
    pub fn q_per_kv(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// The diagonal's offset: `Lk − Lq` bottom-right, `0` top-left.
    pub fn diag_offset(&self) -> i64 {
        match self.alignment {
            MaskAlignment::BottomRight => self.seqlen_k as i64 - self.seqlen_q as i64,
            MaskAlignment::TopLeft => 0,
        }
    }

    /// The keys `[lo, hi)` visible to query row `i` (empty when `lo >= hi`).
    pub fn key_range(&self, i: usize) -> (usize, usize) {
        let (left, right) = self.mask.bounds();
        // Done in i128 so no case overflows.
        let diag = i as i128 + self.diag_offset() as i128;
        let lo = left.map_or(0, |l| (diag - l as i128).max(0));
        let hi = right.map_or(self.seqlen_k as i128, |r| (diag + r as i128 + 1).min(self.seqlen_k as i128));
        (lo.min(self.seqlen_k as i128) as usize, hi.max(lo).min(self.seqlen_k as i128) as usize)
    }

    /// Number of visible (query, key) pairs of one head: the exact work.
    pub fn visible_pairs(&self) -> u128 {
        (0..self.seqlen_q).map(|i| self.key_range(i)).map(|(lo, hi)| hi.saturating_sub(lo) as u128).sum()
    }

    /// Forward FLOPs: `4 · B · Hq · D · visible pairs` (counted exactly for
    /// every mask). For a packed batch every sequence counts at the longest
    /// lengths: an upper bound.
    pub fn flops(&self) -> u128 {
        4 * self.batch as u128 * self.heads_q as u128 * self.head_dim as u128 * self.visible_pairs()
    }
}

fn overflow(arg: &'static str, what: &'static str, value: Option<u128>, limit: u128) -> Error {
    Error::SizeOverflow { arg, what, value: value.unwrap_or(u128::MAX), limit }
}

/// Checks a whole problem: Q, K, V, optionally O and LSE.
///
/// The order of checks is fixed so the reported argument is predictable:
/// per-tensor checks (empty dims, last stride, size, bounds) in the order q,
/// k, v, o, lse; then cross-tensor shapes; then size limits; then options.
///
/// # Errors
/// Every shape and option error of the contract, as
/// a variant naming the argument.
pub fn validate(
    dtype: DType,
    q: &TensorDesc,
    k: &TensorDesc,
    v: &TensorDesc,
    o: Option<&TensorDesc>,
    lse: Option<&LseDesc>,
    opts: &AttentionOptions,
) -> Result<Problem> {
    for t in [Some(q), Some(k), Some(v), o].into_iter().flatten() {
        check_tensor(t)?;
    }
    if let Some(l) = lse {
        check_lse(l)?;
    }
    let [batch, seqlen_q, heads_q, head_dim] = q.layout.shape;
    let [_, seqlen_k, heads_kv, _] = k.layout.shape;
    if head_dim == 0 || head_dim % 8 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::HeadDim { arg: "q", head_dim });
    }
    let expect = |t: &TensorDesc, dim: &'static str, idx: usize, expected: usize, against: &'static str| {
        let got = t.layout.shape[idx];
        if got == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { arg: t.arg, dim, expected, got, against })
        }
    };
    expect(k, "batch", 0, batch, "q")?;
    expect(k, "head_dim", 3, head_dim, "q")?;
    expect(v, "batch", 0, batch, "q")?;
    expect(v, "seqlen", 1, seqlen_k, "k")?;
    expect(v, "heads", 2, heads_kv, "k")?;
    expect(v, "head_dim", 3, head_dim, "q")?;
    if heads_q % heads_kv != 0 {
        return Err(Error::HeadsNotDivisible { heads_q, heads_kv });
    }
    if let Some(o) = o {
        expect(o, "batch", 0, batch, "q")?;
        expect(o, "seqlen", 1, seqlen_q, "q")?;
        expect(o, "heads", 2, heads_q, "q")?;
        expect(o, "head_dim", 3, head_dim, "q")?;
        if !o.layout.is_non_overlapping() {
            return Err(Error::Overlapping { arg: o.arg, shape: o.layout.shape, strides: o.layout.strides });
        }
    }
    if let Some(l) = lse {
        for (i, (dim, expected)) in [("batch", batch), ("heads", heads_q), ("seqlen", seqlen_q)].into_iter().enumerate()
        {
            let got = l.layout.shape[i];
            if got != expected {
                return Err(Error::ShapeMismatch { arg: "lse", dim, expected, got, against: "q" });
            }
        }
        if !non_overlapping(&l.layout.shape, &l.layout.strides) {
            return Err(Error::Overlapping {
                arg: "lse",
                shape: [l.layout.shape[0], l.layout.shape[1], l.layout.shape[2], 1],
                strides: [l.layout.strides[0], l.layout.strides[1], l.layout.strides[2], 1],
            });
        }
    }
    let limit = |arg: &'static str, what: &'static str, value: usize, limit: usize| {
        if value > limit {
            Err(overflow(arg, what, Some(value as u128), limit as u128))
        } else {
            Ok(())
        }
    };
    limit("q", "seqlen", seqlen_q, MAX_SEQLEN)?;
    limit("k", "seqlen", seqlen_k, MAX_SEQLEN)?;
    limit("q", "batch", batch, MAX_GRID_YZ)?;
    limit("q", "heads", heads_q, MAX_GRID_YZ)?;

    let scale = opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() || scale.abs() > MAX_SCALE {
        return Err(Error::InvalidOption {
            arg: "scale",
            value: scale.to_string(),
            reason: "must be finite with |scale| <= 2^64",
        });
    }
    if let Some(c) = opts.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::InvalidOption {
                arg: "softcap",
                value: c.to_string(),
                reason: "must be finite and > 0",
            });
        }
    }
    let (alibi, sinks) = check_modifiers(opts, batch, heads_q)?;
    Ok(Problem {
        dtype,
        batch,
        seqlen_q,
        seqlen_k,
        heads_q,
        heads_kv,
        head_dim,
        mask: opts.mask,
        alignment: opts.alignment,
        scale,
        softcap: opts.softcap,
        varlen: None,
        kv_cache: None,
        alibi,
        sinks,
    })
}

/// Checks of one tensor on its own: non-empty batch/heads, contiguous last
/// dimension, an element count and highest offset that fit the kernels'
/// 64-bit offsets, the view inside its buffer.
fn check_tensor(t: &TensorDesc) -> Result<()> {
    let [batch, _, heads, _] = t.layout.shape;
    if batch == 0 {
        return Err(Error::Empty { arg: t.arg, dim: "batch" });
    }
    if heads == 0 {
        return Err(Error::Empty { arg: t.arg, dim: "heads" });
    }
    if t.layout.strides[3] != 1 {
        return Err(Error::LastDimStride { arg: t.arg, stride: t.layout.strides[3] });
    }
    let limit = i64::MAX as u128;
    let numel = t.layout.shape.iter().try_fold(1u128, |acc, &n| acc.checked_mul(n as u128));
    if numel.is_none_or(|n| n > limit) {
        return Err(overflow(t.arg, "element count", numel, limit));
    }
    check_span(t.arg, t.layout.span(), t.len)
}

fn check_lse(l: &LseDesc) -> Result<()> {
    if l.layout.strides[2] != 1 && l.layout.shape[2] > 1 {
        return Err(Error::LastDimStride { arg: "lse", stride: l.layout.strides[2] });
    }
    check_span("lse", l.layout.span(), l.len)
}

/// The view's highest offset (`None`: it overflowed `usize`) fits the
/// kernels' 64-bit offsets and lies inside a buffer of `len` elements.
fn check_span(arg: &'static str, span: Option<usize>, len: usize) -> Result<()> {
    let limit = i64::MAX as u128;
    match span {
        Some(s) if s as u128 <= limit => {
            if s > len {
                return Err(Error::OutOfBounds { arg, needed: s, len });
            }
            Ok(())
        }
        _ => Err(overflow(arg, "highest element offset", span.map(|s| s as u128), limit)),
    }
}

/// Checks that all tensors of a dynamically typed call share `q`'s element type.
///
/// # Errors
/// [`Error::DTypeMismatch`] naming the first tensor that differs.
pub fn check_dtypes(q: DType, others: &[(&'static str, DType)]) -> Result<()> {
    match others.iter().find(|(_, d)| *d != q) {
        Some(&(arg, got)) => Err(Error::DTypeMismatch { arg, expected: q, got }),
        None => Ok(()),
    }
}

/// Checks a backward call (DESIGN.md section 1b): the forward's Q, K, V, O
/// and LSE (required) as [`validate`] checks them, `d_o` with O's shape,
/// `dq` with Q's and `dk`, `dv` with K's, each inside its buffer and, being
/// outputs, without overlapping strides; `dsinks` (its length) only with
/// sinks, at least `Hq` long.
///
/// # Errors
/// Every error of [`validate`], then in the order d_o, dq, dk, dv, dsinks:
/// the per-tensor errors, [`Error::ShapeMismatch`], [`Error::Overlapping`],
/// [`Error::OutOfBounds`] for a short `dsinks`, and
/// [`Error::InvalidOption`] for `dsinks` without sinks.
#[allow(clippy::too_many_arguments)]
pub fn validate_backward(
    dtype: DType,
    [q, k, v, o]: [&TensorDesc; 4],
    lse: &LseDesc,
    [d_o, dq, dk, dv]: [&TensorDesc; 4],
    dsinks: Option<usize>,
    opts: &AttentionOptions,
) -> Result<Problem> {
    let p = validate(dtype, q, k, v, Some(o), Some(lse), opts)?;
    check_gradients(p, [q, k, o], [d_o, dq, dk, dv], dsinks)
}

/// [`validate_backward`] for a packed batch (the forward's tensors as
/// [`validate_varlen`] takes them).
///
/// # Errors
/// Those of [`validate_varlen`] and [`validate_backward`].
#[allow(clippy::too_many_arguments)]
pub fn validate_backward_varlen(
    dtype: DType,
    [q, k, v, o]: [&TensorDesc; 4],
    lse: &LseDesc,
    [d_o, dq, dk, dv]: [&TensorDesc; 4],
    dsinks: Option<usize>,
    seq: &SeqInfo,
    opts: &AttentionOptions,
) -> Result<Problem> {
    let p = validate_varlen(dtype, q, k, v, Some(o), Some(lse), seq, opts)?;
    check_gradients(p, [q, k, o], [d_o, dq, dk, dv], dsinks)
}

/// The gradient tensors of a validated backward problem `p`: dO like O, dQ
/// like Q, dK and dV like K (the outputs without self-overlap), dsinks only
/// with sinks and long enough.
fn check_gradients(
    p: Problem,
    [q, k, o]: [&TensorDesc; 3],
    [d_o, dq, dk, dv]: [&TensorDesc; 4],
    dsinks: Option<usize>,
) -> Result<Problem> {
    for (t, like) in [(d_o, o), (dq, q), (dk, k), (dv, k)] {
        check_tensor(t)?;
        same_dims(t, like, &[0, 1, 2, 3])?;
        if t.arg != d_o.arg && !t.layout.is_non_overlapping() {
            return Err(Error::Overlapping { arg: t.arg, shape: t.layout.shape, strides: t.layout.strides });
        }
    }
    match dsinks {
        None => {}
        Some(_) if !p.sinks => {
            let reason = "a sink gradient needs sinks (AttentionOptions::with_sinks)";
            return Err(Error::InvalidOption { arg: "dsinks", value: "given".into(), reason });
        }
        Some(len) if len < p.heads_q => return Err(Error::OutOfBounds { arg: "dsinks", needed: p.heads_q, len }),
        Some(_) => {}
    }
    Ok(p)
}

/// Largest `Da` and `Dv` of additive attention (`FA_ADDITIVE_MAX_DIM`).
pub const MAX_ADDITIVE_DIM: usize = 256;

/// A validated additive (Bahdanau) attention problem (DESIGN.md section 1b).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdditiveProblem {
    /// Element type of Q', K', V, w, bias and O.
    pub dtype: DType,
    /// `B`.
    pub batch: usize,
    /// `Lq`.
    pub seqlen_q: usize,
    /// `Lk`.
    pub seqlen_k: usize,
    /// `H` (the same for queries, keys and values).
    pub heads: usize,
    /// `Da`, the projected (attention) dimension of Q' and K'.
    pub dim_a: usize,
    /// `Dv`, the value dimension.
    pub dim_v: usize,
    /// The mask.
    pub mask: Mask,
    /// Its alignment.
    pub alignment: MaskAlignment,
    /// Whether a bias is added inside the tanh.
    pub bias: bool,
}

impl AdditiveProblem {
    /// The band as a dot-product [`Problem`] of the same lengths (its
    /// [`key_range`](Problem::key_range), [`visible_pairs`](Problem::visible_pairs)).
    pub fn band(&self) -> Problem {
        Problem {
            dtype: self.dtype,
            batch: self.batch,
            seqlen_q: self.seqlen_q,
            seqlen_k: self.seqlen_k,
            heads_q: self.heads,
            heads_kv: self.heads,
            head_dim: self.dim_a,
            mask: self.mask,
            alignment: self.alignment,
            scale: 1.0,
            softcap: None,
            varlen: None,
            kv_cache: None,
            alibi: None,
            sinks: false,
        }
    }

    /// Floating-point work counted as `B · H · visible pairs · (3 Da + 2 Dv)`
    /// (per score term an add, a tanh and a multiply-add; then P·V), the
    /// unit of the benchmark's rates.
    pub fn flops(&self) -> u128 {
        let per_pair = 3 * self.dim_a as u128 + 2 * self.dim_v as u128;
        self.batch as u128 * self.heads as u128 * self.band().visible_pairs() * per_pair
    }
}

/// Checks an additive attention call: `q` (Q' `[B, Lq, H, Da]`), `k` (K'
/// `[B, Lk, H, Da]`), `v` (`[B, Lk, H, Dv]`), each on any strides with a
/// contiguous last dimension; `w_len` and `bias_len` the element counts of
/// the buffers holding `w` and the optional bias (`[H, Da]` contiguous, so at
/// least `H · Da` each); O `[B, Lq, H, Dv]` without self-overlap and LSE
/// `[B, H, Lq]`. `Da` and `Dv` are multiples of 8 up to
/// [`MAX_ADDITIVE_DIM`]. The mask and alignment come from `opts`; a scale or
/// softcap is refused (the score has none: fold a scale into `w`).
///
/// # Errors
/// The per-tensor errors of [`validate`] (names as given in the descs);
/// [`Error::HeadDim`] for `Da` (named after `q`) or `Dv` (after `v`);
/// [`Error::ShapeMismatch`] for disagreeing extents (K' and V must have Q''s
/// heads: no grouped heads here); [`Error::OutOfBounds`] (`w`, `bias`) for a
/// buffer shorter than `H · Da`; [`Error::SizeOverflow`] beyond the kernels'
/// limits; [`Error::InvalidOption`] for `scale` or `softcap`.
#[allow(clippy::too_many_arguments)]
pub fn validate_additive(
    dtype: DType,
    q: &TensorDesc,
    k: &TensorDesc,
    v: &TensorDesc,
    w_len: usize,
    bias_len: Option<usize>,
    o: Option<&TensorDesc>,
    lse: Option<&LseDesc>,
    opts: &AttentionOptions,
) -> Result<AdditiveProblem> {
    for t in [Some(q), Some(k), Some(v), o].into_iter().flatten() {
        check_tensor(t)?;
    }
    if let Some(l) = lse {
        check_lse(l)?;
    }
    let [batch, seqlen_q, heads, dim_a] = q.layout.shape;
    let (seqlen_k, dim_v) = (k.layout.shape[1], v.layout.shape[3]);
    for (t, d) in [(q, dim_a), (v, dim_v)] {
        if d == 0 || d % 8 != 0 || d > MAX_ADDITIVE_DIM {
            return Err(Error::HeadDim { arg: t.arg, head_dim: d });
        }
    }
    let expect = |t: &TensorDesc, dim: &'static str, idx: usize, expected: usize, against: &'static str| {
        let got = t.layout.shape[idx];
        if got == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { arg: t.arg, dim, expected, got, against })
        }
    };
    expect(k, "batch", 0, batch, q.arg)?;
    expect(k, "heads", 2, heads, q.arg)?;
    expect(k, "head_dim", 3, dim_a, q.arg)?;
    expect(v, "batch", 0, batch, q.arg)?;
    expect(v, "seqlen", 1, seqlen_k, k.arg)?;
    expect(v, "heads", 2, heads, q.arg)?;
    if let Some(o) = o {
        expect(o, "batch", 0, batch, q.arg)?;
        expect(o, "seqlen", 1, seqlen_q, q.arg)?;
        expect(o, "heads", 2, heads, q.arg)?;
        expect(o, "head_dim", 3, dim_v, v.arg)?;
        if !o.layout.is_non_overlapping() {
            return Err(Error::Overlapping { arg: o.arg, shape: o.layout.shape, strides: o.layout.strides });
        }
    }
    if let Some(l) = lse {
        for (i, (dim, expected)) in [("batch", batch), ("heads", heads), ("seqlen", seqlen_q)].into_iter().enumerate() {
            let got = l.layout.shape[i];
            if got != expected {
                return Err(Error::ShapeMismatch { arg: "lse", dim, expected, got, against: q.arg });
            }
        }
        if !non_overlapping(&l.layout.shape, &l.layout.strides) {
            return Err(Error::Overlapping {
                arg: "lse",
                shape: [l.layout.shape[0], l.layout.shape[1], l.layout.shape[2], 1],
                strides: [l.layout.strides[0], l.layout.strides[1], l.layout.strides[2], 1],
            });
        }
    }
    // heads <= the element count of Q' (checked above), dim_a <= 256: no overflow in u128.
    let needed = heads as u128 * dim_a as u128;
    for (arg, len) in [("w", Some(w_len)), ("bias", bias_len)] {
        if let Some(len) = len {
            if (len as u128) < needed {
                return Err(Error::OutOfBounds { arg, needed: needed as usize, len });
            }
        }
    }
    let limit = |arg: &'static str, what: &'static str, value: usize, limit: usize| {
        if value > limit {
            Err(overflow(arg, what, Some(value as u128), limit as u128))
        } else {
            Ok(())
        }
    };
    limit(q.arg, "seqlen", seqlen_q, MAX_SEQLEN)?;
    limit(k.arg, "seqlen", seqlen_k, MAX_SEQLEN)?;
    limit(q.arg, "batch", batch, MAX_GRID_YZ)?;
    limit(q.arg, "heads", heads, MAX_GRID_YZ)?;
    if let Some(s) = opts.scale {
        return Err(Error::InvalidOption {
            arg: "scale",
            value: s.to_string(),
            reason: "additive attention has no score scale (fold one into w)",
        });
    }
    if let Some(c) = opts.softcap {
        return Err(Error::InvalidOption {
            arg: "softcap",
            value: c.to_string(),
            reason: "additive scores are not capped (|s| <= sum |w| already)",
        });
    }
    Ok(AdditiveProblem {
        dtype,
        batch,
        seqlen_q,
        seqlen_k,
        heads,
        dim_a,
        dim_v,
        mask: opts.mask,
        alignment: opts.alignment,
        bias: bias_len.is_some(),
    })
}

/// The most query heads one maps call can select by list
/// (`FA_MAPS_MAX_HEADS`); every head is always possible.
pub const MAX_MAP_HEADS: usize = 16;

/// What [`validate_maps`] needs to know of a map output.
#[derive(Debug, Clone, Copy)]
pub struct MapDesc {
    /// Its name in error messages (`"maps"`, `"mean"`).
    pub arg: &'static str,
    /// Shape and strides.
    pub layout: crate::tensor::MapLayout,
    /// Elements in the underlying buffer (view).
    pub len: usize,
}

/// A validated attention-maps call (DESIGN.md section 1b).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapsProblem {
    /// The attention problem whose rows the maps show.
    pub problem: Problem,
    /// The query head of each map head (`heads[..num_heads]`), when a list
    /// was given; `None`: every query head, in order.
    pub heads: Option<([usize; MAX_MAP_HEADS], usize)>,
    /// Whether per-head maps are written.
    pub maps: bool,
    /// Whether the head mean is written.
    pub mean: bool,
}

impl MapsProblem {
    /// Heads in the per-head maps (`H` of `[B, H, Lq, Lk]`).
    pub fn map_heads(&self) -> usize {
        self.heads.map_or(self.problem.heads_q, |(_, n)| n)
    }
    /// The query head shown by map head `n` (`n < map_heads()`).
    pub fn query_head(&self, n: usize) -> usize {
        self.heads.map_or(n, |(h, _)| h[n])
    }
}

/// Checks a head subset: 1 to [`MAX_MAP_HEADS`] query heads, each below
/// `heads_q`, none twice.
///
/// # Errors
/// [`Error::InvalidOption`] (`heads`) naming the entry at fault.
pub fn check_map_heads(heads: &[usize], heads_q: usize) -> Result<([usize; MAX_MAP_HEADS], usize)> {
    let bad = |value: String, reason| Err(Error::InvalidOption { arg: "heads", value, reason });
    if heads.is_empty() || heads.len() > MAX_MAP_HEADS {
        return bad(heads.len().to_string(), "a head list takes 1 to 16 query heads (None: every head)");
    }
    let mut out = [0; MAX_MAP_HEADS];
    for (n, &h) in heads.iter().enumerate() {
        if h >= heads_q {
            return bad(format!("heads[{n}] = {h}"), "a query head index must be below Hq");
        }
        if heads[..n].contains(&h) {
            return bad(format!("heads[{n}] = {h}"), "each query head may be requested once");
        }
        out[n] = h;
    }
    Ok((out, heads.len()))
}

/// Checks one map output against its expected `[B, H, Lq, Lk]`: contiguous
/// key dimension, every element its own address, inside its buffer.
fn check_map(m: &MapDesc, expected: [usize; 4], against: &'static str) -> Result<()> {
    const NAMES: [&str; 4] = ["batch", "heads", "seqlen", "keys"];
    for i in 0..4 {
        if m.layout.shape[i] != expected[i] {
            let (expected, got) = (expected[i], m.layout.shape[i]);
            return Err(Error::ShapeMismatch { arg: m.arg, dim: NAMES[i], expected, got, against });
        }
    }
    if m.layout.strides[3] != 1 && m.layout.shape[3] > 1 {
        return Err(Error::LastDimStride { arg: m.arg, stride: m.layout.strides[3] });
    }
    let limit = i64::MAX as u128;
    let numel = m.layout.shape.iter().try_fold(1u128, |acc, &n| acc.checked_mul(n as u128));
    if numel.is_none_or(|n| n > limit) {
        return Err(overflow(m.arg, "element count", numel, limit));
    }
    if !non_overlapping(&m.layout.shape, &m.layout.strides) {
        return Err(Error::Overlapping { arg: m.arg, shape: m.layout.shape, strides: m.layout.strides });
    }
    check_span(m.arg, m.layout.span(), m.len)
}

/// The maps kernels' CTAs per batch entry (4 rows × 32 keys each, grid x).
pub fn map_tiles(seqlen_q: usize, seqlen_k: usize) -> u128 {
    seqlen_q.div_ceil(4) as u128 * seqlen_k.div_ceil(32) as u128
}

/// Checks an attention-maps call (DESIGN.md section 1b): Q and K as a
/// forward call takes them (V plays no part), the forward's `lse`
/// `[B, Hq, Lq]` (`None` for the CPU reference, which finds its own),
/// per-head `maps` `[B, H, Lq, Lk]` with `H` = `Hq` or the length of
/// `heads` (query heads, in the maps' order), the head `mean` `[B, 1, Lq, Lk]`;
/// `out` is the maps' element type (`None`: f32, else `dtype`).
///
/// # Errors
/// The errors of [`validate`] for Q, K, LSE and the options;
/// [`Error::InvalidOption`] for neither maps nor mean requested (`maps`) or a
/// bad `heads` list (see [`check_map_heads`]; also given without `maps`);
/// [`Error::DTypeMismatch`] (`maps`) for maps of a 16-bit type other than
/// Q's; for each map output [`Error::ShapeMismatch`] (dims `batch`, `heads`,
/// `seqlen`, `keys`), [`Error::LastDimStride`], [`Error::Overlapping`],
/// [`Error::OutOfBounds`], [`Error::SizeOverflow`]; and
/// [`Error::SizeOverflow`] when the launch grid would exceed `2^31 − 1` CTAs.
#[allow(clippy::too_many_arguments)]
pub fn validate_maps(
    dtype: DType,
    out: Option<DType>,
    q: &TensorDesc,
    k: &TensorDesc,
    lse: Option<&LseDesc>,
    maps: Option<&MapDesc>,
    heads: Option<&[usize]>,
    mean: Option<&MapDesc>,
    opts: &AttentionOptions,
) -> Result<MapsProblem> {
    let p = validate(dtype, q, k, k, None, lse, opts)?;
    if let Some(got) = out.filter(|&o| o != dtype) {
        return Err(Error::DTypeMismatch { arg: "maps", expected: dtype, got });
    }
    if maps.is_none() && mean.is_none() {
        return Err(Error::InvalidOption {
            arg: "maps",
            value: "none".into(),
            reason: "request per-head maps, the head mean, or both",
        });
    }
    let heads = match heads {
        None => None,
        Some(_) if maps.is_none() => {
            return Err(Error::InvalidOption {
                arg: "heads",
                value: "a list".into(),
                reason: "selects per-head maps, but none were given",
            })
        }
        Some(list) => Some(check_map_heads(list, p.heads_q)?),
    };
    let map_heads = heads.map_or(p.heads_q, |(_, n)| n);
    if let Some(m) = maps {
        check_map(m, [p.batch, map_heads, p.seqlen_q, p.seqlen_k], "q, k and heads")?;
    }
    if let Some(m) = mean {
        check_map(m, [p.batch, 1, p.seqlen_q, p.seqlen_k], "q and k (one head: the mean)")?;
    }
    let tiles = map_tiles(p.seqlen_q, p.seqlen_k);
    if tiles > i32::MAX as u128 {
        return Err(overflow(
            maps.or(mean).map_or("maps", |m| m.arg),
            "map tiles (launch grid x)",
            Some(tiles),
            i32::MAX as u128,
        ));
    }
    Ok(MapsProblem { problem: p, heads, maps: maps.is_some(), mean: mean.is_some() })
}
