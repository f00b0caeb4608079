//! The launch: device addresses (cudarc's stream-ordering guards, taken only
//! here, just before a launch), kernel choice with the real addresses, the
//! `params.h` structs, TMA maps (cached), and `cuLaunchKernel`. Nothing on
//! this path allocates host memory once the kernel is loaded.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::Attention;
use crate::dispatch::{DispatchTensors, KernelInfo};
use crate::error::{CudaContextExt, Error, Result};
use crate::options::{AttentionOptions, HeadValues, KernelFamily};
use crate::params::{
    fwd_params, merge_params, merge_part, tma_spec, with_modifiers, with_sequences, Addrs, ModAddrs, SeqAddrs, TmaSpec,
};
use crate::sys::{FaAdditiveParams, FaBwdParams, FaFwdSm90Params, FaMergeParams, FaTensorMap};
use crate::sys::{FA_ADDITIVE_BLOCK_M, FA_ADDITIVE_THREADS};
use crate::tensor::{DType, DeviceTensor, DeviceTensorMut, Element, LseLayout, LseTensorMut, RawLseTensor, RawTensor};
use crate::validate::{validate, LseDesc, Problem, TensorDesc};

/// The tables a packed batch or a KV cache adds to a launch.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tables<'a> {
    /// A packed batch's `cu_seqlens` (and `seqused_k`).
    Varlen(&'a crate::ops::varlen::SeqLens),
    /// A KV cache's lengths, batch indices or block table.
    Cache(&'a crate::ops::kvcache::CacheTables),
}

/// Encoded TMA maps keyed by everything that goes into them. A framework
/// calls attention with the same buffers step after step, so four lookups
/// replace four driver encodings per call. Fixed size, no allocation;
/// round-robin replacement.
#[derive(Default)]
pub(crate) struct TmaCache {
    slots: Mutex<TmaSlots>,
}

const TMA_SLOTS: usize = 32;

#[derive(Default)]
struct TmaSlots {
    entries: [Option<(TmaSpec, FaTensorMap)>; TMA_SLOTS],
    next: usize,
}

impl TmaCache {
    fn get_or_encode(&self, spec: &TmaSpec) -> Result<FaTensorMap> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, map)) = slots.entries.iter().flatten().find(|(s, _)| s == spec) {
            return Ok(*map);
        }
        let map = encode_tensor_map(spec)?;
        let at = slots.next;
        slots.entries[at] = Some((*spec, map));
        slots.next = (at + 1) % TMA_SLOTS;
        Ok(map)
    }
}

impl Attention {
    /// Chooses a kernel for the validated problem `p` over exactly these
    /// tensors (`descs` in the order q, k, v, o) and launches it on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_forward<T: Element>(
        &self,
        stream: &CudaStream,
        p: &Problem,
        descs: &[TensorDesc; 4],
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        self.launch_forward_seq(stream, p, descs, q, k, v, o, lse, None, None, opts)
    }

    /// [`launch_forward`](Self::launch_forward) with a packed batch's
    /// sequence tables (`p.varlen` is then set).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_forward_seq<T: Element>(
        &self,
        stream: &CudaStream,
        p: &Problem,
        descs: &[TensorDesc; 4],
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        seq: Option<Tables<'_>>,
        split: Option<(usize, &mut CudaSlice<f32>)>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        // Choose before touching the buffers' stream ordering, base addresses
        // assumed aligned: a call that cannot run fails here with no guard taken.
        let (idx, info) = self.choose(p, DispatchTensors { descs, addrs: None }, opts.kernel, opts.kernel_name)?;
        // The guards make `stream` wait for earlier writes to these buffers
        // and, when dropped after the launch, record this launch's reads and
        // writes (cudarc's multi-stream tracking).
        let (q_ptr, _q_sync) = q.view.device_ptr(stream);
        let (k_ptr, _k_sync) = k.view.device_ptr(stream);
        let (v_ptr, _v_sync) = v.view.device_ptr(stream);
        let (o_ptr, _o_sync) = o.view.device_ptr_mut(stream);
        let lse_layout = lse.as_ref().map(|l| l.layout);
        let (lse_ptr, _lse_sync) = match lse {
            Some(l) => {
                let (ptr, sync) = l.view.device_ptr_mut(stream);
                (ptr, Some(sync))
            }
            None => (0, None),
        };
        let a = Addrs { q: q_ptr, k: k_ptr, v: v_ptr, o: o_ptr, lse: lse_ptr };
        // The tables are read by the kernel: the same stream ordering as the tensors.
        fn table<'a>(t: Option<&'a CudaSlice<i32>>, stream: &'a CudaStream) -> (u64, Option<impl Drop + 'a>) {
            match t {
                Some(t) => {
                    let (ptr, sync) = t.device_ptr(stream);
                    (ptr, Some(sync))
                }
                None => (0, None),
            }
        }
        let (tables, _table_sync) = match seq {
            None => (None, None),
            Some(Tables::Varlen(s)) => {
                let ((cu_q, a), (cu_k, b), (used, c)) =
                    (table(Some(&s.cu_q), stream), table(Some(&s.cu_k), stream), table(s.seqused_k.as_ref(), stream));
                let t = SeqAddrs { cu_seqlens_q: cu_q, cu_seqlens_k: cu_k, seqused_k: used, ..SeqAddrs::default() };
                (Some(t), Some([a, b, c]))
            }
            Some(Tables::Cache(t)) => {
                let ((lens, a), (idx, b), (pages, c)) = (
                    table(Some(&t.seqlens), stream),
                    table(t.batch_idx.as_ref(), stream),
                    table(t.block_table.as_ref(), stream),
                );
                let (stride, page_size) = t.info.paged.map_or((0, 0), |pg| (pg.pages_per_seq, pg.page_size));
                let t = SeqAddrs {
                    seqused_k: lens,
                    cache_batch_idx: idx,
                    block_table: pages,
                    block_table_stride: stride,
                    page_size,
                    ..SeqAddrs::default()
                };
                (Some(t), Some([a, b, c]))
            }
        };
        // The score modifiers: device values of this context, read on `stream`.
        let (alibi_slopes, _alibi_sync) = modifier_ptr(self, "alibi_slopes", opts.alibi.map(|a| a.slopes), stream)?;
        let (sinks, _sinks_sync) = modifier_ptr(self, "sinks", opts.sinks, stream)?;
        let mods = ModAddrs { alibi_slopes, sinks };
        // Split-KV: the workspace is written by the attention kernel and
        // read by the combine, both on `stream`.
        let (split, _ws_sync) = match split {
            Some((n, ws)) => {
                let (ptr, sync) = ws.device_ptr_mut(stream);
                (Some((n, ptr)), Some(sync))
            }
            None => (None, None),
        };
        // SAFETY: `check_contexts` put the stream and every view in this
        // handle's context, `validate` and `choose` checked the views for
        // this problem, and the guards above live until this call returns.
        unsafe {
            self.launch_at(stream.cu_stream(), p, descs, (idx, info), a, mods, lse_layout.as_ref(), tables, split, opts)
        }
    }

    /// The launch proper, on raw addresses: re-chooses the kernel if an
    /// address misses the chosen family's alignment, then encodes the
    /// parameters (and TMA maps) and launches on `cu_stream`.
    ///
    /// # Safety
    /// `cu_stream` is a stream of this handle's context (or a special
    /// handle: null, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`); every
    /// address in `a` is device memory of this context that holds its
    /// tensor as `descs` (and `lse_layout`) describe, `p` is their validated
    /// problem and `(idx, info)` a choice of [`Attention::choose`] for it;
    /// the memory stays allocated until the launched work completes. With
    /// `split` (`(num_splits, workspace address)`, only for an sm80 choice),
    /// the workspace holds [`split_workspace_len`](Attention::split_workspace_len)
    /// f32 for this problem.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_at(
        &self,
        cu_stream: CUstream,
        p: &Problem,
        descs: &[TensorDesc; 4],
        (mut idx, mut info): (usize, KernelInfo),
        a: Addrs,
        mods: ModAddrs,
        lse_layout: Option<&LseLayout>,
        tables: Option<SeqAddrs>,
        split: Option<(usize, u64)>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        let addrs = [a.q, a.k, a.v, a.o];
        // Only a view that starts off the family's alignment (an odd element
        // offset into its buffer) changes the choice: then choose again, now
        // knowing the addresses.
        let align = info.family.alignment() as u64;
        if addrs.iter().any(|a| a % align != 0) {
            let tensors = DispatchTensors { descs, addrs: Some(addrs) };
            (idx, info) = self.choose(p, tensors, opts.kernel, opts.kernel_name)?;
        }
        if p.seqlen_q == 0 {
            return Ok(info); // nothing to write; a zero-sized grid is a launch error
        }
        let func = self.reg.function(&self.ctx, idx)?;
        let layouts = [descs[0].layout, descs[1].layout, descs[2].layout, descs[3].layout];
        let mut params = with_modifiers(fwd_params(p, &layouts, lse_layout, a), p, mods);
        if let Some(t) = tables {
            params = with_sequences(params, t);
        }
        let mut cfg = (info.grid, (info.threads, 1, 1), info.smem_bytes);
        let split = split.filter(|&(n, _)| n > 1);
        if let Some((n, ws)) = split {
            if info.family != KernelFamily::Sm80 {
                return Err(Error::NoKernel {
                    reason: format!("split-KV runs on the sm80 kernels, not {}", info.name),
                });
            }
            // Workspace: O parts [n, B, Lq, Hq, D], then LSE parts [n, B, Hq, Lq] (params.h).
            let o_elems = (n * p.batch * p.seqlen_q * p.heads_q * p.head_dim) as u64;
            params.num_splits = n as i32;
            params.o_accum = ws as usize as *mut f32;
            params.lse_accum = (ws + 4 * o_elems) as usize as *mut f32;
            cfg.0 .0 *= n as u32; // row block * splits + split in x
        }
        if info.family == KernelFamily::Sm90 {
            // The Hopper kernels take the same parameters plus one TMA map per tensor.
            let row = &self.reg.rows[idx];
            let map = |addr, l, rows| self.reg.tma.get_or_encode(&tma_spec(addr, l, p.dtype, rows));
            // SAFETY: the struct is plain integers, pointers and byte arrays
            // (plus bindgen's padding), for all of which all-zero is valid.
            let mut p90: FaFwdSm90Params = unsafe { std::mem::zeroed() };
            p90.p = params;
            p90.tma_q = map(a.q, &layouts[0], row.block_m)?;
            p90.tma_k = map(a.k, &layouts[1], row.block_n)?;
            p90.tma_v = map(a.v, &layouts[2], row.block_n)?;
            p90.tma_o = map(a.o, &layouts[3], row.block_m)?;
            // SAFETY: see `launch` and this function's contract; the
            // kernel's one argument is FaFwdSm90Params.
            unsafe { launch(&self.ctx, cu_stream, func.cu_function(), cfg, &p90) }?;
        } else {
            // SAFETY: see `launch` and this function's contract; the
            // kernel's one argument is FaFwdParams.
            unsafe { launch(&self.ctx, cu_stream, func.cu_function(), cfg, &params) }?;
        }
        if let Some((n, _)) = split {
            // The combine: the merge kernel over the n strided f32 parts,
            // the workspace laid out as params.h says.
            let (hd, rows) = (p.heads_q * p.head_dim, p.heads_q * p.seqlen_q);
            let out = merge_part(
                a.o,
                [params.o_batch_stride, params.o_row_stride, params.o_head_stride].map(|x| x as usize),
                a.lse,
                [params.lse_batch_stride, params.lse_head_stride].map(|x| x as usize),
            );
            let mut m = merge_params(out, n, [p.batch, p.seqlen_q, p.heads_q, p.head_dim]);
            let (o_acc, lse_acc) = (params.o_accum as usize as u64, params.lse_accum as usize as u64);
            m.part[0] = merge_part(o_acc, [p.seqlen_q * hd, hd, p.head_dim], lse_acc, [rows, p.seqlen_q]);
            m.strided = 1;
            (m.o_part_stride, m.lse_part_stride) = ((p.batch * p.seqlen_q * hd) as i64, (p.batch * rows) as i64);
            let combine = self.merge_function(p.dtype, true)?;
            // SAFETY: as for the attention launch; the workspace was just
            // written on the same stream, O and LSE are the call's outputs.
            unsafe { launch_merge(&self.ctx, cu_stream, combine.cu_function(), &m) }?;
        }
        Ok(info)
    }

    /// [`forward_into`](Self::forward_into) on raw device addresses, for
    /// foreign callers (the C ABI of the `fused-attn-capi` crate, other
    /// bindings) that hold memory cudarc did not allocate: the same
    /// validation, kernel choice, parameters and launch, on `cu_stream`.
    ///
    /// Bounds are checked against each layout's own extent (a raw address
    /// carries no length), so [`Error::OutOfBounds`](crate::Error::OutOfBounds)
    /// cannot occur; the caller vouches for the memory instead. No cudarc
    /// event tracking is involved: ordering against other streams is the
    /// caller's, as with any CUDA library.
    ///
    /// `cu_stream` may be null (the context's legacy default stream),
    /// `CU_STREAM_LEGACY` (`0x1`) or `CU_STREAM_PER_THREAD` (`0x2`); any
    /// other stream is checked to belong to this handle's context.
    ///
    /// # Safety
    /// - `cu_stream` is null, one of the two special handles, or a live
    ///   stream (of any context: a foreign one is reported, not used).
    /// - Each of `q`, `k`, `v`, `o` (and `lse` when given) addresses device
    ///   memory usable in this handle's context (e.g. `cudaMalloc` memory
    ///   on its device: the runtime API uses the same primary context) that
    ///   holds at least the elements its layout reaches, of element type
    ///   `dtype` (`f32` for LSE).
    /// - ALiBi slopes and sinks in `opts`, if any, are
    ///   [`HeadValues::Raw`](crate::HeadValues::Raw) addresses of such device
    ///   memory holding `Hq` f32 (`B·Hq` for per-batch slopes).
    /// - That memory stays allocated, and nothing else writes Q, K, V (or
    ///   the slopes and sinks) or reads or writes O and LSE, until the
    ///   launched work completes on `cu_stream`. O and LSE must not overlap
    ///   any input.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into): every validation error
    /// naming the argument, [`Error::ForeignContext`](crate::Error::ForeignContext)
    /// for a stream of another context, [`Error::NoKernel`](crate::Error::NoKernel),
    /// [`Error::Cuda`](crate::Error::Cuda) for a failed launch.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_raw(
        &self,
        cu_stream: CUstream,
        dtype: DType,
        q: RawTensor,
        k: RawTensor,
        v: RawTensor,
        o: RawTensor,
        lse: Option<RawLseTensor>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        // A raw address has no length: each view is as long as it reaches,
        // and an unrepresentable extent is reported by validation.
        let desc = |arg, t: &RawTensor| TensorDesc { arg, layout: t.layout, len: t.layout.span().unwrap_or(0) };
        let descs = [desc("q", &q), desc("k", &k), desc("v", &v), desc("o", &o)];
        let lse_desc = lse.as_ref().map(|l| LseDesc { layout: l.layout, len: l.layout.span().unwrap_or(0) });
        let p = validate(dtype, &descs[0], &descs[1], &descs[2], Some(&descs[3]), lse_desc.as_ref(), opts)?;
        let mods = ModAddrs {
            alibi_slopes: raw_modifier("alibi_slopes", opts.alibi.map(|a| a.slopes))?,
            sinks: raw_modifier("sinks", opts.sinks)?,
        };
        self.check_stream_context(cu_stream)?;
        let choice = self.choose(&p, DispatchTensors { descs: &descs, addrs: None }, opts.kernel, opts.kernel_name)?;
        let a = Addrs { q: q.addr, k: k.addr, v: v.addr, o: o.addr, lse: lse.map_or(0, |l| l.addr) };
        // SAFETY: by this function's contract (memory, stream liveness) and
        // the checks above (context of the stream, validation, choice).
        unsafe {
            self.launch_at(cu_stream, &p, &descs, choice, a, mods, lse.as_ref().map(|l| &l.layout), None, None, opts)
        }
    }

    /// A stream that is not one of the special handles must belong to this
    /// handle's context.
    pub(crate) fn check_stream_context(&self, cu_stream: CUstream) -> Result<()> {
        if (cu_stream as usize) <= 2 {
            return Ok(()); // null, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD: the current context's
        }
        let mut ctx: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller of `forward_raw` vouches that `cu_stream` is a
        // live stream; the call only writes `ctx`.
        unsafe { cudarc::driver::sys::cuStreamGetCtx(cu_stream, &mut ctx) }
            .result()
            .during("reading the stream's context")?;
        if ctx == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::ForeignContext { arg: "stream" })
        }
    }
}

/// A raw caller's modifier (`forward_raw`, `backward_raw`): a non-null,
/// 4-byte aligned device address. A cudarc buffer's address needs a stream
/// for cudarc's ordering, which raw callers do not have.
pub(crate) fn raw_modifier(arg: &'static str, v: Option<HeadValues<'_>>) -> Result<u64> {
    match v {
        None => Ok(0),
        Some(HeadValues::Raw(addr)) if addr != 0 && addr % 4 == 0 => Ok(addr),
        Some(HeadValues::Raw(addr)) => {
            let reason = "must be a non-null, 4-byte aligned device address";
            Err(Error::InvalidOption { arg, value: format!("{addr:#x}"), reason })
        }
        Some(_) => {
            let reason = "raw calls take HeadValues::Raw addresses";
            Err(Error::InvalidOption { arg, value: "host or cudarc memory".into(), reason })
        }
    }
}

/// Launches the merge kernel `func` (`kernels/fwd_naive.cu`) over the rows
/// of `m`: one warp per row, 4 per CTA, grid (ceil(L / 4), H, B).
///
/// # Safety
/// As [`launch`], with `m` the kernel's argument.
pub(crate) unsafe fn launch_merge(
    ctx: &CudaContext,
    cu_stream: CUstream,
    func: cudarc::driver::sys::CUfunction,
    m: &FaMergeParams,
) -> Result<()> {
    let grid = ((m.seqlen as u32).div_ceil(4), m.heads as u32, m.batch as u32);
    // SAFETY: by this function's contract.
    unsafe { launch(ctx, cu_stream, func, (grid, (128, 1, 1), 0), m) }
}

/// The device address of a score modifier's values (0 when absent), with the
/// cudarc guard that orders the launch on `stream` after their writes: only
/// [`HeadValues::Device`] of this handle's context is taken.
pub(crate) fn modifier_ptr<'a>(
    att: &Attention,
    arg: &'static str,
    v: Option<HeadValues<'a>>,
    stream: &'a CudaStream,
) -> Result<(u64, Option<impl Drop + 'a>)> {
    match v {
        None => Ok((0, None)),
        Some(HeadValues::Host(_)) => Err(Error::InvalidOption {
            arg,
            value: "host memory".into(),
            reason: "the kernels read device values (HeadValues::Device)",
        }),
        Some(HeadValues::Raw(_)) => Err(Error::InvalidOption {
            arg,
            value: "a raw address".into(),
            reason: "raw addresses are taken only by the unsafe forward_raw",
        }),
        Some(HeadValues::Device(s)) => {
            att.check_context(arg, s.stream().context())?;
            let (ptr, sync) = s.device_ptr(stream);
            Ok((ptr, Some(sync)))
        }
    }
}

/// Launches backward kernel `which` (0 dQ, 1 dK/dV, 2 dsinks; see
/// `kernels/common/bwd_naive.cuh`) over its grid: 128 threads per CTA, one
/// thread per 8 columns of a gradient row (dQ: Lq rows × Hq × B; dK/dV: Lk
/// rows × Hk × B), or per query head (dsinks). Nothing to launch for an
/// empty grid.
///
/// # Safety
/// As [`launch`], with `b` the kernel's argument.
pub(crate) unsafe fn launch_bwd(
    ctx: &CudaContext,
    cu_stream: CUstream,
    func: cudarc::driver::sys::CUfunction,
    which: usize,
    b: &FaBwdParams,
) -> Result<()> {
    let f = &b.fwd;
    let chunks = (f.head_dim / 8) as u64;
    let (threads, y, z) = match which {
        0 => (f.seqlen_q as u64 * chunks, f.heads_q as u32, f.batch as u32),
        1 => (f.seqlen_k as u64 * chunks, f.heads_kv as u32, f.batch as u32),
        _ => (f.heads_q as u64, 1, 1),
    };
    if threads == 0 {
        return Ok(());
    }
    // Lq ≤ 2^28 and 32 chunks: at most 2^26 CTAs, inside grid x's 2^31 − 1.
    let grid = (threads.div_ceil(128) as u32, y, z);
    // SAFETY: by this function's contract.
    unsafe { launch(ctx, cu_stream, func, (grid, (128, 1, 1), 0), b) }
}

/// Launches kernel `kernel` of the tiled sm80 backward (`kernels/bwd_sm80.cu`)
/// over `b`, whose workspace fields are set: the pre and dQ kernels one warp
/// per query row (grid (ceil(Lq / 4), Hq, B), 128 threads), the main kernel
/// one CTA per 64 keys of a KV head (grid (ceil(Lk / 64), Hk, B), x fastest
/// as the deterministic mode's turns assume), the sink gradient one CTA of
/// 256 threads per query head. Lq, Lk: the longest sequence's in a packed
/// batch. Nothing to launch for an empty grid.
///
/// # Safety
/// As [`launch`], with `b` the kernel's argument, its workspace laid out by
/// [`bwd_workspace`](crate::params::bwd_workspace) for this problem and the
/// function's shared-memory limit raised to the main kernel's need.
pub(crate) unsafe fn launch_bwd_sm80(
    ctx: &CudaContext,
    cu_stream: CUstream,
    func: cudarc::driver::sys::CUfunction,
    kernel: super::BwdSm80,
    b: &FaBwdParams,
) -> Result<()> {
    let f = &b.fwd;
    let (x, y, threads, smem) = match kernel {
        super::BwdSm80::Main(hd) => (
            (f.seqlen_k as u32).div_ceil(crate::sys::FA_BWD_SM80_BLOCK),
            f.heads_kv as u32,
            crate::params::bwd_sm80_threads(hd),
            crate::params::bwd_sm80_smem_bytes(hd),
        ),
        super::BwdSm80::Dsink => (f.heads_q as u32, 1, 256, 32),
        _ => ((f.seqlen_q as u32).div_ceil(4), f.heads_q as u32, 128, 0),
    };
    let z = if kernel == super::BwdSm80::Dsink { 1 } else { f.batch as u32 };
    if x == 0 || y == 0 || f.batch == 0 {
        return Ok(());
    }
    // SAFETY: by this function's contract.
    unsafe { launch(ctx, cu_stream, func, ((x, y, z), (threads, 1, 1), smem), b) }
}

/// Launches the additive-attention kernel `func` (`kernels/fwd_naive.cu`)
/// over `a`: grid (ceil(Lq / BLOCK_M), H, B), `FA_ADDITIVE_THREADS`
/// threads, `smem` bytes of dynamic shared memory.
///
/// # Safety
/// As [`launch`], with `a` the kernel's argument and `smem` at least
/// [`additive_smem_bytes`](crate::params::additive_smem_bytes) of its dims
/// and at most the function's raised limit.
pub(crate) unsafe fn launch_additive(
    ctx: &CudaContext,
    cu_stream: CUstream,
    func: cudarc::driver::sys::CUfunction,
    a: &FaAdditiveParams,
    smem: u32,
) -> Result<()> {
    let grid = ((a.seqlen_q as u32).div_ceil(FA_ADDITIVE_BLOCK_M), a.heads as u32, a.batch as u32);
    // SAFETY: by this function's contract.
    unsafe { launch(ctx, cu_stream, func, (grid, (FA_ADDITIVE_THREADS, 1, 1), smem), a) }
}

/// Launches the attention-maps kernel `func` (`kernels/fwd_naive.cu`) over
/// `tiles` CTAs of 128 threads (4 rows × 32 keys) per batch entry: grid
/// (tiles, 1, B).
///
/// # Safety
/// As [`launch`], with `m` the kernel's argument and `tiles` the
/// `map_tiles` of its lengths.
pub(crate) unsafe fn launch_maps(
    ctx: &CudaContext,
    cu_stream: CUstream,
    func: cudarc::driver::sys::CUfunction,
    m: &crate::sys::FaMapsParams,
    tiles: u32,
) -> Result<()> {
    let grid = (tiles, 1, m.p.batch as u32);
    // SAFETY: by this function's contract.
    unsafe { launch(ctx, cu_stream, func, (grid, (128, 1, 1), 0), m) }
}

/// Launches `func` with its single by-value argument `arg`.
///
/// # Safety
/// `arg` must be the exact type of the kernel's one parameter (a bindgen
/// mirror of `params.h`); `cu_stream` a stream of `ctx` (or a special
/// handle). Every pointer in it must come from a live view or raw tensor
/// in `ctx` whose shape, strides and alignment were validated
/// for this kernel (the caller's validation and dispatch prove that the
/// kernel stays inside each view), and the views' cudarc guards must outlive
/// this call.
unsafe fn launch<P: DeviceRepr>(
    ctx: &CudaContext,
    cu_stream: CUstream,
    func: cudarc::driver::sys::CUfunction,
    (grid, block, smem): ((u32, u32, u32), (u32, u32, u32), u32),
    arg: &P,
) -> Result<()> {
    ctx.bind_to_thread().during("binding the context")?;
    // cuLaunchKernel copies the argument before returning.
    let mut args = [(arg as *const P).cast_mut().cast::<std::ffi::c_void>()];
    // SAFETY: by this function's contract; `args` lives until the call returns.
    unsafe { cudarc::driver::result::launch_kernel(func, grid, block, smem, cu_stream, &mut args) }
        .during("launching the attention kernel")
}

/// Encodes one TMA map (a host-side driver call; the address is recorded,
/// not dereferenced).
fn encode_tensor_map(spec: &TmaSpec) -> Result<FaTensorMap> {
    use cudarc::driver::sys::{
        CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    let data_type = match spec.dtype {
        DType::F16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let elem_strides = [1u32; 4];
    let mut map = FaTensorMap { opaque: [0; 16] };
    // SAFETY: `FaTensorMap` has the size (128 B) and alignment (64 B) of
    // `CUtensorMap` (bindgen's layout assertions check ours), every array
    // argument has the length the rank (4) requires (dims 4, strides 3,
    // boxes 4, element strides 4), and encoding only writes the map.
    let result = unsafe {
        cudarc::driver::sys::cuTensorMapEncodeTiled(
            (&mut map as *mut FaTensorMap).cast(),
            data_type,
            4,
            spec.addr as usize as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.boxes.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    result.result().during("encoding a TMA tensor map")?;
    Ok(map)
}

/// Allocates an output buffer that the kernel will fully overwrite.
pub(crate) fn alloc_output<T: DeviceRepr>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialised, but every forward kernel writes
    // every element of O and LSE (DESIGN.md section 1; the GPU tests poison
    // outputs to prove it), and nothing reads the buffer before the launch
    // that fills it is ordered before the read on the same stream.
    // The driver refuses 0-byte allocations; an empty problem gets one spare element.
    unsafe { stream.alloc::<T>(len.max(1)) }.during("allocating the output")
}
