//! The backward pass (DESIGN.md section 1b) on caller-owned buffers.

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use super::desc;
use super::SeqLens;
use crate::device::{launch_bwd, launch_bwd_sm80, modifier_ptr, raw_modifier, Attention, BwdSm80};
use crate::dispatch::check_alignment;
use crate::error::{Error, Result};
use crate::options::{AttentionOptions, KernelFamily};
use crate::params::{
    bwd_params, bwd_sm80_smem_bytes, bwd_workspace, fwd_params, with_bwd_workspace, with_modifiers, with_sequences,
    Addrs, ModAddrs, SeqAddrs, BWD_SM80_BUCKETS,
};
use crate::tensor::{DType, DeviceTensor, DeviceTensorMut, Element, LseLayout, LseTensor, RawLseTensor, RawTensor};
use crate::validate::{validate_backward, validate_backward_varlen, LseDesc, Problem, TensorDesc};

/// The gradient buffers of [`Attention::backward_into`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Gradients<'g, 'a, T> {
    /// `∂L/∂Q`, Q's shape `[B, Lq, Hq, D]`, any strides.
    pub dq: &'g mut DeviceTensorMut<'a, T>,
    /// `∂L/∂K`, K's shape `[B, Lk, Hk, D]` (summed over each KV head's query heads).
    pub dk: &'g mut DeviceTensorMut<'a, T>,
    /// `∂L/∂V`, V's shape.
    pub dv: &'g mut DeviceTensorMut<'a, T>,
    /// `∂L/∂σ` of the sink logits, `[Hq]` f32, when the options have sinks
    /// and the caller wants it.
    pub dsinks: Option<&'g mut CudaSlice<f32>>,
    /// The tiled kernels' workspace, at least
    /// [`backward_workspace_len`] f32 elements: without it the baseline
    /// kernels run.
    pub workspace: Option<&'g mut CudaSlice<f32>>,
    /// Bitwise-identical gradients run to run (see
    /// [`deterministic`](Self::deterministic)).
    pub deterministic: bool,
}

/// The f32 elements of workspace that [`Attention::backward_into`]'s tiled
/// kernels need for a problem of these sizes (Q's `[B, Lq, Hq, D]`): the f32
/// dQ accumulator (`B·Hq·Lq·D`), `D_i = ⟨dO_i, O_i⟩` (`B·Hq·Lq`) and the
/// deterministic mode's counters (`B·Hq·⌈Lq / 64⌉` turns, one ticket). Allocate it once per
/// shape and reuse it: the call allocates nothing. Every call rewrites it.
///
/// # Errors
/// [`Error::SizeOverflow`] naming `workspace` if the length overflows `usize`.
pub fn backward_workspace_len(batch: usize, seqlen_q: usize, heads_q: usize, head_dim: usize) -> Result<usize> {
    batch
        .checked_mul(seqlen_q)
        .and_then(|tokens| bwd_workspace(tokens, batch, seqlen_q, heads_q, head_dim))
        .map(|w| w.len)
        .ok_or_else(workspace_overflow)
}

/// [`backward_workspace_len`] for a packed batch of these sequences
/// ([`Attention::backward_varlen_into`]): `Tq·Hq·(D + 1)` plus
/// `B·Hq·⌈max Lq / 64⌉ + 1`.
///
/// # Errors
/// [`Error::SizeOverflow`] naming `workspace` if the length overflows `usize`.
pub fn backward_varlen_workspace_len(seqlens: &SeqLens, heads_q: usize, head_dim: usize) -> Result<usize> {
    bwd_workspace(seqlens.total_q(), seqlens.batch(), seqlens.max_seqlen_q(), heads_q, head_dim)
        .map(|w| w.len)
        .ok_or_else(workspace_overflow)
}

impl<'g, 'a, T> Gradients<'g, 'a, T> {
    /// dQ, dK, dV, no sink gradient.
    pub fn new(
        dq: &'g mut DeviceTensorMut<'a, T>,
        dk: &'g mut DeviceTensorMut<'a, T>,
        dv: &'g mut DeviceTensorMut<'a, T>,
    ) -> Self {
        Gradients { dq, dk, dv, dsinks: None, workspace: None, deterministic: false }
    }
    /// Also the sink logits' gradient, into `dsinks` (`[Hq]` f32).
    pub fn with_dsinks(mut self, dsinks: &'g mut CudaSlice<f32>) -> Self {
        self.dsinks = Some(dsinks);
        self
    }
    /// The workspace of the tiled kernels (sm80 and newer, head dim ≤ 256,
    /// every tensor 16-byte aligned): [`backward_workspace_len`] f32
    /// elements or more.
    pub fn with_workspace(mut self, workspace: &'g mut CudaSlice<f32>) -> Self {
        self.workspace = Some(workspace);
        self
    }
    /// Deterministic mode: the tiled kernels add each query block's dQ
    /// contributions in key-block order (CTAs take turns), so the gradients
    /// are bitwise identical run to run, at the cost of those waits. The
    /// baseline kernels are deterministic anyway.
    pub fn deterministic(mut self, on: bool) -> Self {
        self.deterministic = on;
        self
    }
}

impl Attention {
    /// The gradients of `L = Σ ⟨dO, O⟩` (DESIGN.md section 1b) into
    /// caller-owned buffers: given the forward's inputs `q`, `k`, `v`, its
    /// output `o` and log-sum-exp `lse` (from [`forward_into`](Self::forward_into)
    /// with the same `opts`), and `d_o` (O's shape), writes `grads.dq`,
    /// `grads.dk`, `grads.dv` (every element) and, with sinks,
    /// `grads.dsinks`. Every mask and alignment, GQA (dK and dV summed over
    /// each KV head's query heads), `Lq ≠ Lk`, softcap (its derivative),
    /// ALiBi and sinks; rows that see no key contribute nothing. ALiBi slopes
    /// get no gradient. Rectangular batches here; packed ones through
    /// [`backward_varlen_into`](Self::backward_varlen_into).
    ///
    /// With a workspace ([`Gradients::with_workspace`]) on an sm80 or newer
    /// GPU, head dim ≤ 256 and every tensor 16-byte aligned, the tiled
    /// kernels run (`kernels/bwd_sm80.cu`, FlashAttention-2's algorithm on
    /// tensor cores: K/V blocks of 64 keys resident, dK/dV in registers
    /// across the group's query heads, dQ added into an f32 accumulator with
    /// atomics — or in a fixed order with [`Gradients::deterministic`]).
    /// Otherwise the baseline kernels run (`kernels/common/bwd_naive.cuh`,
    /// CUDA cores, deterministic by construction, about D/8 times the
    /// arithmetic). Either way the call allocates nothing and is
    /// asynchronous on `stream`; [`Attention::backward_path`] says which
    /// will run.
    ///
    /// # Errors
    /// The errors of [`forward_into`](Self::forward_into) for the forward's
    /// tensors, those of
    /// [`validate_backward`](crate::internals::validate_backward) for the
    /// gradients, [`Error::ForeignContext`](crate::Error::ForeignContext),
    /// [`Error::NoKernel`](crate::Error::NoKernel) where the kernels are not
    /// loadable, [`Error::Cuda`](crate::Error::Cuda) for a failed launch.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &DeviceTensor<'_, T>,
        lse: &LseTensor<'_>,
        d_o: &DeviceTensor<'_, T>,
        grads: Gradients<'_, '_, T>,
        opts: &AttentionOptions,
    ) -> Result<()> {
        self.backward_impl(stream, [q, k, v, o], lse, d_o, None, grads, opts)
    }

    /// [`backward_into`](Self::backward_into) for a packed batch: the
    /// tensors as [`forward_varlen_into`](Self::forward_varlen_into) takes
    /// them (`[1, T, H, D]`, LSE `[1, Hq, Tq]`), dQ like Q, dK and dV like K,
    /// each sequence on its own diagonal, per-sequence ALiBi slopes as in
    /// the forward. Runs the tiled kernels only, so it needs a workspace of
    /// [`backward_varlen_workspace_len`] elements, an sm80 or newer GPU,
    /// head dim ≤ 256 and 16-byte aligned tensors; `seqlens` without
    /// `seqused_k`.
    ///
    /// # Errors
    /// Those of [`backward_into`](Self::backward_into) and of
    /// [`forward_varlen_into`](Self::forward_varlen_into) for the tables;
    /// [`Error::InvalidOption`] naming `workspace` without one or
    /// `seqused_k` with it; [`Error::Misaligned`] for a tensor the tiled
    /// kernels cannot read; [`Error::NoKernel`] where they do not run.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_varlen_into<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &DeviceTensor<'_, T>,
        lse: &LseTensor<'_>,
        d_o: &DeviceTensor<'_, T>,
        seqlens: &SeqLens,
        grads: Gradients<'_, '_, T>,
        opts: &AttentionOptions,
    ) -> Result<()> {
        self.backward_impl(stream, [q, k, v, o], lse, d_o, Some(seqlens), grads, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_impl<T: Element>(
        &self,
        stream: &CudaStream,
        [q, k, v, o]: [&DeviceTensor<'_, T>; 4],
        lse: &LseTensor<'_>,
        d_o: &DeviceTensor<'_, T>,
        seqlens: Option<&SeqLens>,
        grads: Gradients<'_, '_, T>,
        opts: &AttentionOptions,
    ) -> Result<()> {
        self.check_context("stream", stream.context())?;
        if let Some(s) = seqlens {
            self.check_context("seqlens", s.cu_q.stream().context())?;
            if s.seqused_k.is_some() {
                let reason = "the backward of a packed batch uses every key of each sequence";
                return Err(Error::InvalidOption { arg: "seqused_k", value: "given".into(), reason });
            }
        }
        let inputs = [("q", q), ("k", k), ("v", v), ("o", o), ("d_o", d_o)];
        for (arg, t) in inputs {
            self.check_context(arg, t.view.stream().context())?;
        }
        self.check_context("lse", lse.view.stream().context())?;
        let Gradients { dq, dk, dv, dsinks, workspace, deterministic } = grads;
        for (arg, t) in [("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
            self.check_context(arg, t.view.stream().context())?;
        }
        if let Some(s) = dsinks.as_deref() {
            self.check_context("dsinks", s.stream().context())?;
        }
        if let Some(w) = workspace.as_deref() {
            self.check_context("workspace", w.stream().context())?;
        }
        let fwd = [desc("q", &q.view, q.layout), desc("k", &k.view, k.layout), desc("v", &v.view, v.layout)];
        let o_desc = desc("o", &o.view, o.layout);
        let lse_desc = LseDesc { layout: lse.layout, len: lse.view.len() };
        let grad = [
            desc("d_o", &d_o.view, d_o.layout),
            desc("dq", &dq.view, dq.layout),
            desc("dk", &dk.view, dk.layout),
            desc("dv", &dv.view, dv.layout),
        ];
        let p = validate_bwd(
            T::DTYPE,
            [&fwd[0], &fwd[1], &fwd[2], &o_desc],
            &lse_desc,
            &grad,
            dsinks.as_deref().map(|s| s.len()),
            seqlens.map(|s| &s.info),
            opts,
        )?;
        // The guards order this work after earlier writes to the inputs and
        // record its reads and writes (cudarc's multi-stream tracking).
        let (q_ptr, _q) = q.view.device_ptr(stream);
        let (k_ptr, _k) = k.view.device_ptr(stream);
        let (v_ptr, _v) = v.view.device_ptr(stream);
        let (o_ptr, _o) = o.view.device_ptr(stream);
        let (lse_ptr, _l) = lse.view.device_ptr(stream);
        let (do_ptr, _do) = d_o.view.device_ptr(stream);
        let (dq_ptr, _dq) = dq.view.device_ptr_mut(stream);
        let (dk_ptr, _dk) = dk.view.device_ptr_mut(stream);
        let (dv_ptr, _dv) = dv.view.device_ptr_mut(stream);
        let (ds_ptr, _ds) = match dsinks {
            Some(s) => {
                let (ptr, sync) = s.device_ptr_mut(stream);
                (ptr, Some(sync))
            }
            None => (0, None),
        };
        let (ws, _ws) = match workspace {
            Some(w) => {
                let len = w.len();
                let (ptr, sync) = w.device_ptr_mut(stream);
                (Some((ptr, len)), Some(sync))
            }
            None => (None, None),
        };
        let (alibi_slopes, _a) = modifier_ptr(self, "alibi_slopes", opts.alibi.map(|a| a.slopes), stream)?;
        let (sinks, _s) = modifier_ptr(self, "sinks", opts.sinks, stream)?;
        let (mut _cu_q, mut _cu_k, mut seq) = (None, None, None);
        if let Some(s) = seqlens {
            let (cu_q, gq) = s.cu_q.device_ptr(stream);
            let (cu_k, gk) = s.cu_k.device_ptr(stream);
            (_cu_q, _cu_k) = (Some(gq), Some(gk));
            seq = Some((SeqAddrs { cu_seqlens_q: cu_q, cu_seqlens_k: cu_k, ..SeqAddrs::default() }, s.total_q()));
        }
        let call = BwdCall {
            p,
            fwd: [&fwd[0], &fwd[1], &fwd[2], &o_desc],
            lse: lse.layout,
            grad: &grad,
            addrs: Addrs { q: q_ptr, k: k_ptr, v: v_ptr, o: o_ptr, lse: lse_ptr },
            grads: [do_ptr, dq_ptr, dk_ptr, dv_ptr],
            dsinks: ds_ptr,
            workspace: ws,
            deterministic,
            mods: ModAddrs { alibi_slopes, sinks },
            seq,
        };
        // SAFETY: every context was checked above and every view validated
        // against this problem (the kernels stay inside them); the guards
        // live until this returns.
        unsafe { self.launch_backward(stream.cu_stream(), call) }
    }

    /// [`backward_into`](Self::backward_into) on raw device addresses, for
    /// foreign callers (the C ABI), as
    /// [`forward_raw`](Self::forward_raw) is to
    /// [`forward_into`](Self::forward_into): the same validation (bounds
    /// against each layout's own extent), kernel choice and launches on
    /// `cu_stream`. `dsinks`: 0 for none, else `Hq` f32; `workspace`: its
    /// address (16-byte aligned, else [`Error::Misaligned`] naming
    /// `workspace`) and length in f32 elements.
    ///
    /// # Safety
    /// As [`forward_raw`](Self::forward_raw) for `q`, `k`, `v`, `o`, `lse`
    /// (now all read) and the modifiers; `d_o` likewise (read); `dq`, `dk`,
    /// `dv`, the `dsinks` and the workspace are device memory of this
    /// context holding what their layouts (lengths) reach, written by the
    /// call and accessed by nothing else until the work completes on
    /// `cu_stream`, overlapping no input and each other.
    ///
    /// # Errors
    /// As [`backward_into`](Self::backward_into), and those of
    /// [`forward_raw`](Self::forward_raw) for the stream and modifiers.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_raw(
        &self,
        cu_stream: CUstream,
        dtype: DType,
        [q, k, v, o]: [RawTensor; 4],
        lse: RawLseTensor,
        [d_o, dq, dk, dv]: [RawTensor; 4],
        dsinks: u64,
        workspace: Option<(u64, usize)>,
        deterministic: bool,
        opts: &AttentionOptions,
    ) -> Result<()> {
        let desc = |arg, t: &RawTensor| TensorDesc { arg, layout: t.layout, len: t.layout.span().unwrap_or(0) };
        let fwd = [desc("q", &q), desc("k", &k), desc("v", &v), desc("o", &o)];
        let lse_desc = LseDesc { layout: lse.layout, len: lse.layout.span().unwrap_or(0) };
        let grad = [desc("d_o", &d_o), desc("dq", &dq), desc("dk", &dk), desc("dv", &dv)];
        // A raw dsinks pointer carries no length: Hq by contract.
        let heads_q = q.layout.shape[2];
        let ds_len = (dsinks != 0).then_some(heads_q);
        let p = validate_bwd(dtype, [&fwd[0], &fwd[1], &fwd[2], &fwd[3]], &lse_desc, &grad, ds_len, None, opts)?;
        let mods = ModAddrs {
            alibi_slopes: raw_modifier("alibi_slopes", opts.alibi.map(|a| a.slopes))?,
            sinks: raw_modifier("sinks", opts.sinks)?,
        };
        self.check_stream_context(cu_stream)?;
        let call = BwdCall {
            p,
            fwd: [&fwd[0], &fwd[1], &fwd[2], &fwd[3]],
            lse: lse.layout,
            grad: &grad,
            addrs: Addrs { q: q.addr, k: k.addr, v: v.addr, o: o.addr, lse: lse.addr },
            grads: [d_o.addr, dq.addr, dk.addr, dv.addr],
            dsinks,
            workspace,
            deterministic,
            mods,
            seq: None,
        };
        // SAFETY: by this function's contract and the checks above.
        unsafe { self.launch_backward(cu_stream, call) }
    }

    /// Chooses the kernels of a validated call and launches them.
    ///
    /// # Safety
    /// The addresses in `c` are device memory of this context covering what
    /// the validated layouts reach (the workspace its given length), live
    /// and unshared until the work completes on `cu_stream`, which is a live
    /// stream of this context (or a special handle).
    unsafe fn launch_backward(&self, cu_stream: CUstream, c: BwdCall<'_>) -> Result<()> {
        let p = c.p;
        let tokens = match c.seq {
            None => p.batch.checked_mul(p.seqlen_q),
            Some((_, total_q)) => Some(total_q),
        };
        let ws_layout = tokens
            .and_then(|t| bwd_workspace(t, p.batch, p.seqlen_q, p.heads_q, p.head_dim))
            .ok_or_else(workspace_overflow)?;
        if let Some((addr, len)) = c.workspace {
            if len < ws_layout.len {
                return Err(Error::OutOfBounds { arg: "workspace", needed: ws_layout.len, len });
            }
            // The dQ accumulator takes paired f32 adds (8-byte vector
            // reductions on sm90); 16 keeps every region of it aligned.
            if addr % 16 != 0 {
                let need = "is not a multiple of 16";
                return Err(Error::Misaligned {
                    arg: "workspace",
                    kernel: "fa_bwd_sm80",
                    what: "base address",
                    bytes: addr,
                    need,
                });
            }
        }
        let layouts = [c.fwd[0].layout, c.fwd[1].layout, c.fwd[2].layout, c.fwd[3].layout];
        let mut f = with_modifiers(fwd_params(&p, &layouts, Some(&c.lse), c.addrs), &p, c.mods);
        if let Some((s, _)) = c.seq {
            f = with_sequences(f, s);
        }
        let [do_ptr, dq_ptr, dk_ptr, dv_ptr] = c.grads;
        let b = bwd_params(
            f,
            [
                (do_ptr, &c.grad[0].layout),
                (dq_ptr, &c.grad[1].layout),
                (dk_ptr, &c.grad[2].layout),
                (dv_ptr, &c.grad[3].layout),
            ],
            c.dsinks,
        );
        let alignment = [
            (c.fwd[0], c.addrs.q),
            (c.fwd[1], c.addrs.k),
            (c.fwd[2], c.addrs.v),
            (&c.grad[0], do_ptr),
            (&c.grad[2], dk_ptr),
            (&c.grad[3], dv_ptr),
        ]
        .into_iter()
        .try_for_each(|(d, ptr)| check_alignment(d, Some(ptr), 2, KernelFamily::Sm80, "fa_bwd_sm80"));
        let ws_ptr = c.workspace.map_or(0, |w| w.0);
        let path = self.backward_path_for(p.head_dim, ws_ptr != 0, alignment.is_ok());
        if c.seq.is_some() && path == BackwardPath::Baseline {
            // Packed batches run on the tiled kernels only: say why they cannot.
            if ws_ptr == 0 {
                let reason = "a packed batch's backward runs on the tiled kernels, which need a workspace";
                return Err(Error::InvalidOption { arg: "workspace", value: "none".into(), reason });
            }
            alignment?;
            return Err(Error::NoKernel {
                reason: format!(
                    "no tiled backward for head_dim {} on sm{} (needs sm80+, head_dim <= 256, the bwd_sm80 image)",
                    p.head_dim,
                    self.sm()
                ),
            });
        }
        match path {
            BackwardPath::Tiled { bucket } => {
                let b = with_bwd_workspace(b, ws_ptr, &ws_layout, c.deterministic);
                let dsink = (c.dsinks != 0).then_some(BwdSm80::Dsink);
                for kernel in [BwdSm80::Pre, BwdSm80::Main(bucket), BwdSm80::Dq].into_iter().chain(dsink) {
                    let func = self.bwd_sm80_function(p.dtype, kernel)?;
                    // SAFETY: this function's contract; the main kernels'
                    // shared-memory limit was raised on load and
                    // `backward_path_for` checked the device allows it.
                    unsafe { launch_bwd_sm80(self.context(), cu_stream, func.cu_function(), kernel, &b) }?;
                }
            }
            BackwardPath::Baseline => {
                let funcs =
                    [self.bwd_function(p.dtype, 0)?, self.bwd_function(p.dtype, 1)?, self.bwd_function(p.dtype, 2)?];
                let which = if c.dsinks != 0 { 3 } else { 2 };
                for (w, func) in funcs.iter().enumerate().take(which) {
                    // SAFETY: this function's contract (the kernels stay
                    // inside the validated views).
                    unsafe { launch_bwd(self.context(), cu_stream, func.cu_function(), w, &b) }?;
                }
            }
        }
        Ok(())
    }

    /// Which kernels [`backward_into`](Self::backward_into) runs for a
    /// problem of head dim `head_dim` with (`workspace`) or without a
    /// workspace, its tensors all 16-byte aligned (`aligned`) or not.
    pub fn backward_path(&self, head_dim: usize, workspace: bool, aligned: bool) -> BackwardPath {
        self.backward_path_for(head_dim, workspace, aligned)
    }

    fn backward_path_for(&self, head_dim: usize, workspace: bool, aligned: bool) -> BackwardPath {
        let bucket = BWD_SM80_BUCKETS.iter().copied().find(|&b| head_dim <= b);
        match bucket {
            Some(bucket)
                if workspace
                    && aligned
                    && self.sm() >= 80
                    && crate::sys::IMAGES.iter().any(|im| im.stem == "bwd_sm80")
                    && bwd_sm80_smem_bytes(bucket) <= self.smem_per_block() =>
            {
                BackwardPath::Tiled { bucket }
            }
            _ => BackwardPath::Baseline,
        }
    }
}

/// A validated backward call's addresses and layouts.
struct BwdCall<'d> {
    p: Problem,
    fwd: [&'d TensorDesc; 4],
    lse: LseLayout,
    grad: &'d [TensorDesc; 4],
    addrs: Addrs,
    /// dO, dQ, dK, dV.
    grads: [u64; 4],
    dsinks: u64,
    /// Address and length (f32 elements).
    workspace: Option<(u64, usize)>,
    deterministic: bool,
    mods: ModAddrs,
    /// A packed batch's tables and its query tokens.
    seq: Option<(SeqAddrs, usize)>,
}

/// Validation shared by the backward entry points.
#[allow(clippy::too_many_arguments)]
fn validate_bwd(
    dtype: DType,
    tensors: [&TensorDesc; 4],
    lse: &LseDesc,
    grad: &[TensorDesc; 4],
    dsinks_len: Option<usize>,
    seq: Option<&crate::validate::SeqInfo>,
    opts: &AttentionOptions,
) -> Result<Problem> {
    let g = [&grad[0], &grad[1], &grad[2], &grad[3]];
    match seq {
        None => validate_backward(dtype, tensors, lse, g, dsinks_len, opts),
        Some(s) => validate_backward_varlen(dtype, tensors, lse, g, dsinks_len, s, opts),
    }
}

fn workspace_overflow() -> Error {
    Error::SizeOverflow {
        arg: "workspace",
        what: "tokens·Hq·(D + 1) + B·Hq·⌈Lq / 64⌉",
        value: u128::MAX,
        limit: usize::MAX as u128,
    }
}

/// The kernels of a backward call (see [`Attention::backward_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackwardPath {
    /// The tiled tensor-core kernels of this head-dim bucket (64, 128, 256).
    Tiled {
        /// The bucket.
        bucket: usize,
    },
    /// The baseline CUDA-core kernels.
    Baseline,
}
