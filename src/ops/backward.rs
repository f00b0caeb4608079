//! The backward pass (DESIGN.md section 1b) on caller-owned buffers.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use super::desc;
use crate::device::{launch_bwd, launch_bwd_sm80, modifier_ptr, Attention, BwdSm80};
use crate::dispatch::check_alignment;
use crate::error::{Error, Result};
use crate::options::{AttentionOptions, KernelFamily};
use crate::params::{
    bwd_params, bwd_sm80_smem_bytes, bwd_workspace, fwd_params, with_bwd_workspace, with_modifiers, Addrs, ModAddrs,
    BWD_SM80_BUCKETS,
};
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, LseTensor};
use crate::validate::{validate_backward, LseDesc};

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
/// deterministic mode's counters (`B·Hq·⌈Lq / 64⌉`). Allocate it once per
/// shape and reuse it: the call allocates nothing. Every call rewrites it.
///
/// # Errors
/// [`Error::SizeOverflow`] naming `workspace` if the length overflows `usize`.
pub fn backward_workspace_len(batch: usize, seqlen_q: usize, heads_q: usize, head_dim: usize) -> Result<usize> {
    bwd_workspace(batch, seqlen_q, heads_q, head_dim).map(|w| w.len).ok_or(Error::SizeOverflow {
        arg: "workspace",
        what: "B·Hq·Lq·(D + 1) + B·Hq·⌈Lq / 64⌉",
        value: u128::MAX,
        limit: usize::MAX as u128,
    })
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
    /// get no gradient. Rectangular batches (not packed ones or caches).
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
        self.check_context("stream", stream.context())?;
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
        let p = validate_backward(
            T::DTYPE,
            [&fwd[0], &fwd[1], &fwd[2], &o_desc],
            &lse_desc,
            [&grad[0], &grad[1], &grad[2], &grad[3]],
            dsinks.as_deref().map(|s| s.len()),
            opts,
        )?;
        let ws_layout = bwd_workspace(p.batch, p.seqlen_q, p.heads_q, p.head_dim).ok_or(Error::SizeOverflow {
            arg: "workspace",
            what: "B·Hq·Lq·(D + 1) + B·Hq·⌈Lq / 64⌉",
            value: u128::MAX,
            limit: usize::MAX as u128,
        })?;
        if let Some(w) = workspace.as_deref() {
            if w.len() < ws_layout.len {
                return Err(Error::OutOfBounds { arg: "workspace", needed: ws_layout.len, len: w.len() });
            }
        }
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
        let (ws_ptr, _ws) = match workspace {
            Some(w) => {
                let (ptr, sync) = w.device_ptr_mut(stream);
                (ptr, Some(sync))
            }
            None => (0, None),
        };
        let (alibi_slopes, _a) = modifier_ptr(self, "alibi_slopes", opts.alibi.map(|a| a.slopes), stream)?;
        let (sinks, _s) = modifier_ptr(self, "sinks", opts.sinks, stream)?;
        let layouts = [q.layout, k.layout, v.layout, o.layout];
        let a = Addrs { q: q_ptr, k: k_ptr, v: v_ptr, o: o_ptr, lse: lse_ptr };
        let f = with_modifiers(fwd_params(&p, &layouts, Some(&lse.layout), a), &p, ModAddrs { alibi_slopes, sinks });
        let b = bwd_params(
            f,
            [(do_ptr, &d_o.layout), (dq_ptr, &dq.layout), (dk_ptr, &dk.layout), (dv_ptr, &dv.layout)],
            ds_ptr,
        );
        let aligned = [(&fwd[0], q_ptr), (&fwd[1], k_ptr), (&fwd[2], v_ptr), (&grad[0], do_ptr), (&grad[2], dk_ptr)]
            .into_iter()
            .chain([(&grad[3], dv_ptr)])
            .all(|(d, ptr)| check_alignment(d, Some(ptr), 2, KernelFamily::Sm80, "fa_bwd_sm80").is_ok());
        match self.backward_path_for(p.head_dim, ws_ptr != 0, aligned) {
            BackwardPath::Tiled { bucket } => {
                let b = with_bwd_workspace(b, ws_ptr, &ws_layout, deterministic);
                for kernel in [BwdSm80::Pre, BwdSm80::Main(bucket), BwdSm80::Dq] {
                    let func = self.bwd_sm80_function(p.dtype, kernel)?;
                    // SAFETY: contexts checked, every view validated against
                    // this problem and the workspace's length against its
                    // layout above; the main kernels' limit was raised on
                    // load (and `backward_path_for` checked the device allows
                    // it); the guards live until this returns.
                    unsafe { launch_bwd_sm80(self.context(), stream.cu_stream(), func.cu_function(), kernel, &b) }?;
                }
                if ds_ptr != 0 {
                    let func = self.bwd_function(p.dtype, 2)?;
                    // SAFETY: as above; the sink-gradient kernel reads only the forward's tensors and d_o.
                    unsafe { launch_bwd(self.context(), stream.cu_stream(), func.cu_function(), 2, &b) }?;
                }
            }
            BackwardPath::Baseline => {
                let funcs =
                    [self.bwd_function(p.dtype, 0)?, self.bwd_function(p.dtype, 1)?, self.bwd_function(p.dtype, 2)?];
                let which = if ds_ptr != 0 { 3 } else { 2 };
                for (w, func) in funcs.iter().enumerate().take(which) {
                    // SAFETY: every context was checked above and every view
                    // validated against this problem by `validate_backward` (the
                    // kernels stay inside them); the guards live until this returns.
                    unsafe { launch_bwd(self.context(), stream.cu_stream(), func.cu_function(), w, &b) }?;
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
