//! Kernel parameters: a validated [`Problem`], the chosen kernel and the
//! tensors' device addresses → the `params.h` structs. Pure and
//! allocation-free; the encodings the kernels expect (`-1` for an unbounded
//! window side, the diagonal offset, strides of unit dimensions) live here
//! and nowhere else.

use crate::options::MaskAlignment;
use crate::sys::{FaAdditiveParams, FaBwdParams, FaFwdParams, FaMapsParams, FaMergeParams, FaMergePart};
use crate::tensor::{DType, Layout, LseLayout, MapLayout};
use crate::validate::{AdditiveProblem, AlibiLayout, MapsProblem, Problem};

/// Device addresses of one call's tensors (`lse` 0 when not written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    /// Q, K, V, O base addresses.
    pub q: u64,
    /// K.
    pub k: u64,
    /// V.
    pub v: u64,
    /// O.
    pub o: u64,
    /// LSE, or 0.
    pub lse: u64,
}

/// Element strides as the kernels take them (`int64`). A dimension of
/// extent 1 is never stepped; its stride becomes 0, so no caller value
/// (up to `usize::MAX`) is reinterpreted as a negative stride. Other strides
/// are bounded by the validated span (at most `i64::MAX`).
fn strides(shape: &[usize], strides: &[usize]) -> [i64; 3] {
    let mut out = [0i64; 3];
    for i in 0..3 {
        out[i] = if shape[i] > 1 { i64::try_from(strides[i]).unwrap_or(i64::MAX) } else { 0 };
    }
    out
}

/// The band bound as the kernels take it: `-1` for unbounded, finite values
/// clamped to `Lq + Lk` (which changes nothing, and keeps `i32` sums safe).
fn window_side(bound: Option<usize>, cap: usize) -> i32 {
    bound.map_or(-1, |v| v.min(cap) as i32)
}

/// The common launch parameters of every forward kernel.
pub fn fwd_params(p: &Problem, layouts: &[Layout; 4], lse: Option<&LseLayout>, a: Addrs) -> FaFwdParams {
    let [qs, ks, vs, os] = layouts.map(|l| strides(&l.shape, &l.strides));
    let ls = lse.map_or([0; 3], |l| strides(&l.shape, &l.strides));
    // Validation bounds Lq, Lk by 2^28, B and H by 65535: all fit i32.
    let cap = p.seqlen_q + p.seqlen_k;
    let (left, right) = p.mask.bounds();
    FaFwdParams {
        q: a.q as usize as *const _,
        k: a.k as usize as *const _,
        v: a.v as usize as *const _,
        o: a.o as usize as *mut _,
        lse: a.lse as usize as *mut f32,
        q_batch_stride: qs[0],
        q_row_stride: qs[1],
        q_head_stride: qs[2],
        k_batch_stride: ks[0],
        k_row_stride: ks[1],
        k_head_stride: ks[2],
        v_batch_stride: vs[0],
        v_row_stride: vs[1],
        v_head_stride: vs[2],
        o_batch_stride: os[0],
        o_row_stride: os[1],
        o_head_stride: os[2],
        lse_batch_stride: ls[0],
        lse_head_stride: ls[1],
        batch: p.batch as i32,
        heads_q: p.heads_q as i32,
        heads_kv: p.heads_kv as i32,
        q_per_kv: p.q_per_kv() as i32,
        seqlen_q: p.seqlen_q as i32,
        seqlen_k: p.seqlen_k as i32,
        head_dim: p.head_dim as i32,
        window_left: window_side(left, cap),
        window_right: window_side(right, cap),
        scale: p.scale,
        softcap: p.softcap.unwrap_or(0.0),
        diag_offset: p.diag_offset() as i32,
        cu_seqlens_q: std::ptr::null(),
        cu_seqlens_k: std::ptr::null(),
        seqused_k: std::ptr::null(),
        top_left: i32::from(p.alignment == MaskAlignment::TopLeft),
        cache_batch_idx: std::ptr::null(),
        block_table: std::ptr::null(),
        block_table_stride: 0,
        page_size: 0,
        num_splits: 0,
        o_accum: std::ptr::null_mut(),
        lse_accum: std::ptr::null_mut(),
        alibi_slopes: std::ptr::null(),
        alibi_batch_stride: 0,
        sinks: std::ptr::null(),
    }
}

/// Device addresses of a call's score modifiers (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModAddrs {
    /// ALiBi slopes (`[Hq]` or `[B, Hq]` f32, as `Problem::alibi` says).
    pub alibi_slopes: u64,
    /// Sink logits (`[Hq]` f32).
    pub sinks: u64,
}

/// `params` with the score modifiers of `p` at the addresses `m`.
pub fn with_modifiers(mut params: FaFwdParams, p: &Problem, m: ModAddrs) -> FaFwdParams {
    if p.alibi.is_some() {
        params.alibi_slopes = m.alibi_slopes as usize as *const f32;
        // Hq <= 65535 (validated).
        params.alibi_batch_stride = if p.alibi == Some(AlibiLayout::PerBatch) { p.heads_q as i64 } else { 0 };
    }
    if p.sinks {
        params.sinks = m.sinks as usize as *const f32;
    }
    params
}

/// Device addresses of a packed batch's or a KV cache's tables (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqAddrs {
    /// `cu_seqlens_q`, `B + 1` i32.
    pub cu_seqlens_q: u64,
    /// `cu_seqlens_k`, `B + 1` i32.
    pub cu_seqlens_k: u64,
    /// `seqused_k` (a cache's `cache_seqlens`), `B` i32.
    pub seqused_k: u64,
    /// `cache_batch_idx`, `B` i32.
    pub cache_batch_idx: u64,
    /// `block_table`, `B × block_table_stride` i32.
    pub block_table: u64,
    /// Entries per block-table row.
    pub block_table_stride: usize,
    /// Keys per page.
    pub page_size: usize,
}

/// Points the kernel at the tables. For a packed batch the tensors' layouts
/// are one sequence of all tokens (batch extent 1, so batch strides 0) and
/// `seqlen_q`/`seqlen_k` hold the longest sequence; for a paged cache K and
/// V are `[num_pages, page_size, Hk, D]`, their batch stride stepping pages.
/// Validation bounded the stride and page size (block-table length, page
/// extent of a validated tensor), so the conversions do not truncate.
pub fn with_sequences(mut params: FaFwdParams, s: SeqAddrs) -> FaFwdParams {
    params.cu_seqlens_q = s.cu_seqlens_q as usize as *const i32;
    params.cu_seqlens_k = s.cu_seqlens_k as usize as *const i32;
    params.seqused_k = s.seqused_k as usize as *const i32;
    params.cache_batch_idx = s.cache_batch_idx as usize as *const i32;
    params.block_table = s.block_table as usize as *const i32;
    params.block_table_stride = s.block_table_stride as i64;
    params.page_size = s.page_size.min(i32::MAX as usize) as i32;
    params
}

/// The arguments of `cuTensorMapEncodeTiled` for one `[B, S, H, D]` tensor,
/// as `kernels/params.h` specifies: rank 4, dims innermost first
/// `{D, S, H, B}`, byte strides `{row, head, batch}`, boxes of `64 × rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TmaSpec {
    /// Base address.
    pub addr: u64,
    /// Element type.
    pub dtype: DType,
    /// `{D, S, H, B}`.
    pub dims: [u64; 4],
    /// Byte strides of S, H, B.
    pub strides: [u64; 3],
    /// `{64, rows, 1, 1}`.
    pub boxes: [u32; 4],
}

/// The stride given to a dimension of extent 1 is at most this (TMA wants < 2^40).
const TMA_MAX_UNIT_STRIDE: u64 = (1 << 40) - 16;

/// The TMA map of a validated, TMA-compatible tensor (see `dispatch`).
pub fn tma_spec(addr: u64, layout: &Layout, dtype: DType, rows: u32) -> TmaSpec {
    let [b, s, h, d] = layout.shape.map(|x| x as u64);
    let elem = dtype.size() as u64;
    // A dimension of extent 1 is never stepped, so any legal stride will do;
    // use the extent of the dimensions inside it (TMA rejects 0).
    let stride = |i: usize, inner: u64| -> u64 {
        if layout.shape[i] > 1 {
            layout.strides[i] as u64 * elem
        } else {
            inner.clamp(16, TMA_MAX_UNIT_STRIDE).next_multiple_of(16)
        }
    };
    let row = stride(1, d * elem);
    let head = stride(2, row.saturating_mul(s.max(1)));
    let batch = stride(0, head.saturating_mul(h));
    TmaSpec { addr, dtype, dims: [d, s.max(1), h, b], strides: [row, head, batch], boxes: [64, rows, 1, 1] }
}

/// One part of a merge (`FaMergePart`): O at `o` with its batch, row and
/// head strides, LSE at `lse` with its batch and head strides (elements).
pub fn merge_part(o: u64, o_strides: [usize; 3], lse: u64, lse_strides: [usize; 2]) -> FaMergePart {
    FaMergePart {
        o: o as usize as *const std::ffi::c_void,
        lse: lse as usize as *const f32,
        o_batch_stride: o_strides[0] as i64,
        o_row_stride: o_strides[1] as i64,
        o_head_stride: o_strides[2] as i64,
        lse_batch_stride: lse_strides[0] as i64,
        lse_head_stride: lse_strides[1] as i64,
    }
}

/// The merge kernel's parameters (see `FaMergeParams`) for an output O at
/// `out.o` and LSE at `out.lse` (0: none), with their strides as in
/// [`merge_part`], of `[B, L, H, D]` = `dims`; the parts are the caller's
/// to fill. Validation bounds every size to fit i32.
pub fn merge_params(out: FaMergePart, parts: usize, dims: [usize; 4]) -> FaMergeParams {
    // SAFETY: plain integers and pointers; all-zero is valid for each.
    let mut m: FaMergeParams = unsafe { std::mem::zeroed() };
    m.o = out.o as *mut std::ffi::c_void;
    m.lse = out.lse as *mut f32;
    (m.o_batch_stride, m.o_row_stride, m.o_head_stride) = (out.o_batch_stride, out.o_row_stride, out.o_head_stride);
    (m.lse_batch_stride, m.lse_head_stride) = (out.lse_batch_stride, out.lse_head_stride);
    let [b, l, h, d] = dims;
    (m.parts, m.batch, m.seqlen, m.heads, m.head_dim) = (parts as i32, b as i32, l as i32, h as i32, d as i32);
    m
}

/// The backward kernels' parameters: `fwd` (the forward's, with O and LSE
/// as inputs) and, in the order dO, dQ, dK, dV, each tensor's address and
/// layout; `dsinks` the sink gradient's address (0: none).
pub fn bwd_params(fwd: FaFwdParams, grads: [(u64, &Layout); 4], dsinks: u64) -> FaBwdParams {
    let [d_o, dq, dk, dv] = grads.map(|(a, l)| (a as usize, strides(&l.shape, &l.strides)));
    FaBwdParams {
        fwd,
        d_o: d_o.0 as *const _,
        do_batch_stride: d_o.1[0],
        do_row_stride: d_o.1[1],
        do_head_stride: d_o.1[2],
        dq: dq.0 as *mut _,
        dq_batch_stride: dq.1[0],
        dq_row_stride: dq.1[1],
        dq_head_stride: dq.1[2],
        dk: dk.0 as *mut _,
        dk_batch_stride: dk.1[0],
        dk_row_stride: dk.1[1],
        dk_head_stride: dk.1[2],
        dv: dv.0 as *mut _,
        dv_batch_stride: dv.1[0],
        dv_row_stride: dv.1[1],
        dv_head_stride: dv.1[2],
        dsinks: dsinks as usize as *mut f32,
        dq_accum: std::ptr::null_mut(),
        delta: std::ptr::null_mut(),
        dq_turns: std::ptr::null_mut(),
        dq_ticket: std::ptr::null_mut(),
        deterministic: 0,
    }
}

/// The tiled sm80 backward's head-dim buckets (`kernels/bwd_sm80.cu`).
pub const BWD_SM80_BUCKETS: [usize; 3] = [64, 128, 256];

/// Threads per CTA of the tiled sm80 backward's main kernel of bucket `hd`
/// (`Sm80BwdCfg::kThreads`).
pub fn bwd_sm80_threads(hd: usize) -> u32 {
    if hd <= 64 {
        128
    } else {
        256
    }
}

/// Dynamic shared memory of that kernel (`Sm80BwdCfg::kSmemBytes`, which
/// the kernel checks it was given): K and V tiles of 64 rows, Q and dO tiles
/// in two buffers to hd128 (one above), P^T and dS^T (64 × 64, 16-bit), LSE
/// and D of 64 rows per buffer.
pub fn bwd_sm80_smem_bytes(hd: usize) -> u32 {
    let b = crate::sys::FA_BWD_SM80_BLOCK as usize;
    let bufs = if hd <= 128 { 2 } else { 1 };
    ((2 + 2 * bufs) * b * hd * 2 + 2 * b * b * 2 + bufs * 2 * b * 4) as u32
}

/// Where the tiled backward's workspace parts start, in f32 elements, and
/// its whole length: the dQ accumulator `[tokens][Hq][D]`, `D_i`
/// `[tokens][Hq]`, the turn counters `[B][Hq][ceil(max Lq / 64)]` (i32)
/// and the ticket counter (one u32, last). `None` on overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BwdWorkspace {
    /// Offset of D_i.
    pub delta: usize,
    /// Offset of the turn counters.
    pub turns: usize,
    /// Offset of the deterministic mode's ticket counter.
    pub ticket: usize,
    /// Total length.
    pub len: usize,
}

/// The workspace layout of a problem of `tokens_q` query tokens in `batch`
/// sequences of at most `max_seqlen_q` (rectangular: `batch · Lq` tokens).
pub fn bwd_workspace(
    tokens_q: usize,
    batch: usize,
    max_seqlen_q: usize,
    heads_q: usize,
    head_dim: usize,
) -> Option<BwdWorkspace> {
    let seqlen_q = max_seqlen_q;
    let rows = tokens_q.checked_mul(heads_q)?;
    let delta = rows.checked_mul(head_dim)?;
    let turns = delta.checked_add(rows)?;
    let blocks = seqlen_q.div_ceil(crate::sys::FA_BWD_SM80_BLOCK as usize);
    let ticket = turns.checked_add(batch.checked_mul(heads_q)?.checked_mul(blocks)?)?;
    let len = ticket.checked_add(1)?;
    Some(BwdWorkspace { delta, turns, ticket, len })
}

/// `b` with the tiled backward's workspace at device address `ws` (laid out
/// as [`bwd_workspace`] says) and its mode.
pub fn with_bwd_workspace(mut b: FaBwdParams, ws: u64, layout: &BwdWorkspace, deterministic: bool) -> FaBwdParams {
    let at = |off: usize| (ws as usize + 4 * off) as *mut f32;
    b.dq_accum = at(0);
    b.delta = at(layout.delta);
    b.dq_turns = at(layout.turns).cast();
    b.dq_ticket = at(layout.ticket).cast();
    b.deterministic = i32::from(deterministic);
    b
}

/// Device addresses of an additive-attention call (`bias`, `lse` 0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdditiveAddrs {
    /// Q'.
    pub q: u64,
    /// K'.
    pub k: u64,
    /// V.
    pub v: u64,
    /// `w` `[H, Da]`.
    pub w: u64,
    /// The bias `[H, Da]`, or 0.
    pub bias: u64,
    /// O.
    pub o: u64,
    /// LSE, or 0.
    pub lse: u64,
}

/// Dynamic shared memory of one additive-attention CTA, in bytes, as
/// `kernels/params.h` sizes it: f32 q' + b `[BLOCK_M][Da + 4]`, a K' tile
/// `[BLOCK_N][Da + 4]`, a V tile `[BLOCK_N][Dv]`, w `[Da]` and P
/// `[BLOCK_M][BLOCK_N]` (85 760 bytes at Da = Dv = 256).
pub fn additive_smem_bytes(dim_a: usize, dim_v: usize) -> usize {
    use crate::sys::{FA_ADDITIVE_BLOCK_M as M, FA_ADDITIVE_BLOCK_N as N};
    let (m, n) = (M as usize, N as usize);
    4 * ((m + n) * (dim_a + 4) + n * dim_v + dim_a + m * n)
}

/// The additive-attention kernel's parameters (`FaAdditiveParams`) for a
/// validated problem, the layouts of Q', K', V, O (in that order), LSE's and
/// the addresses. bf16 takes `tanh.approx.f32`, f16 the two-MUFU form whose
/// error is a few f32 ulps (see `kernels/common/additive.cuh` and the README
/// for the measured errors).
pub fn additive_params(
    p: &AdditiveProblem,
    layouts: &[Layout; 4],
    lse: Option<&LseLayout>,
    a: AdditiveAddrs,
) -> FaAdditiveParams {
    let [qs, ks, vs, os] = layouts.map(|l| strides(&l.shape, &l.strides));
    let ls = lse.map_or([0; 3], |l| strides(&l.shape, &l.strides));
    // Validation bounds Lq, Lk by 2^28, B and H by 65535, the dims by 256: all fit i32.
    let cap = p.seqlen_q + p.seqlen_k;
    let (left, right) = p.mask.bounds();
    FaAdditiveParams {
        q: a.q as usize as *const _,
        k: a.k as usize as *const _,
        v: a.v as usize as *const _,
        w: a.w as usize as *const _,
        bias: a.bias as usize as *const _,
        o: a.o as usize as *mut _,
        lse: a.lse as usize as *mut f32,
        q_batch_stride: qs[0],
        q_row_stride: qs[1],
        q_head_stride: qs[2],
        k_batch_stride: ks[0],
        k_row_stride: ks[1],
        k_head_stride: ks[2],
        v_batch_stride: vs[0],
        v_row_stride: vs[1],
        v_head_stride: vs[2],
        o_batch_stride: os[0],
        o_row_stride: os[1],
        o_head_stride: os[2],
        lse_batch_stride: ls[0],
        lse_head_stride: ls[1],
        batch: p.batch as i32,
        heads: p.heads as i32,
        seqlen_q: p.seqlen_q as i32,
        seqlen_k: p.seqlen_k as i32,
        dim_a: p.dim_a as i32,
        dim_v: p.dim_v as i32,
        window_left: window_side(left, cap),
        window_right: window_side(right, cap),
        diag_offset: p.band().diag_offset() as i32,
        tanh_approx: i32::from(p.dtype == DType::BF16),
    }
}

/// Device addresses and layouts of a maps call's outputs (address 0: absent).
#[derive(Debug, Clone, Copy)]
pub struct MapOut {
    /// Base address.
    pub addr: u64,
    /// Its layout (`[B, H, Lq, Lk]`; the mean's `H` is 1).
    pub layout: MapLayout,
}

/// The maps kernels' parameters (see `FaMapsParams`): the forward's score
/// definition over Q (`q`) and K (`k`) with its LSE (`lse`), per-head maps
/// and mean as `m` says. Validation bounded every size to fit i32 and every
/// offset to fit i64.
pub fn maps_params(
    m: &MapsProblem,
    layouts: (&Layout, &Layout, &LseLayout),
    (q, k, lse): (u64, u64, u64),
    maps: Option<MapOut>,
    mean: Option<MapOut>,
) -> FaMapsParams {
    let (ql, kl, ll) = layouts;
    // V plays no part; K's layout stands in for it, Q's for O.
    let a = Addrs { q, k, v: k, o: 0, lse };
    let p = fwd_params(&m.problem, &[*ql, *kl, *kl, *ql], Some(ll), a);
    // SAFETY: plain integers and pointers (and the embedded FaFwdParams,
    // overwritten next); all-zero is valid for each.
    let mut out: FaMapsParams = unsafe { std::mem::zeroed() };
    out.p = p;
    if let Some(o) = maps.filter(|_| m.maps) {
        let s = strides(&o.layout.shape, &o.layout.strides);
        out.maps = o.addr as usize as *mut std::ffi::c_void;
        (out.map_batch_stride, out.map_head_stride, out.map_row_stride) = (s[0], s[1], s[2]);
    }
    if let Some(o) = mean.filter(|_| m.mean) {
        let s = strides(&o.layout.shape, &o.layout.strides);
        out.mean = o.addr as usize as *mut std::ffi::c_void;
        (out.mean_batch_stride, out.mean_row_stride) = (s[0], s[2]);
    }
    match m.heads {
        None => out.all_heads = 1,
        Some((list, n)) => {
            out.num_heads = n as i32;
            for (slot, &h) in out.heads.iter_mut().zip(&list[..n]) {
                *slot = h as i32;
            }
        }
    }
    out
}
