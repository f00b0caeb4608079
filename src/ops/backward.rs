//! The backward pass (DESIGN.md section 1b) on caller-owned buffers.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use super::desc;
use crate::device::{launch_bwd, modifier_ptr, Attention};
use crate::error::Result;
use crate::options::AttentionOptions;
use crate::params::{bwd_params, fwd_params, with_modifiers, Addrs, ModAddrs};
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
}

impl<'g, 'a, T> Gradients<'g, 'a, T> {
    /// dQ, dK, dV, no sink gradient.
    pub fn new(
        dq: &'g mut DeviceTensorMut<'a, T>,
        dk: &'g mut DeviceTensorMut<'a, T>,
        dv: &'g mut DeviceTensorMut<'a, T>,
    ) -> Self {
        Gradients { dq, dk, dv, dsinks: None }
    }
    /// Also the sink logits' gradient, into `dsinks` (`[Hq]` f32).
    pub fn with_dsinks(mut self, dsinks: &'g mut CudaSlice<f32>) -> Self {
        self.dsinks = Some(dsinks);
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
    /// Today this runs the baseline kernels on CUDA cores
    /// (`kernels/common/bwd_naive.cuh`): correct, **deterministic**
    /// (bitwise identical run to run: each gradient element has one writer
    /// summing in a fixed order, no atomics), allocation-free and
    /// asynchronous on `stream`, but far from tensor-core speed; the tiled
    /// sm80/sm90 backward kernels are to come.
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
        let Gradients { dq, dk, dv, dsinks } = grads;
        for (arg, t) in [("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
            self.check_context(arg, t.view.stream().context())?;
        }
        if let Some(s) = dsinks.as_deref() {
            self.check_context("dsinks", s.stream().context())?;
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
        let funcs = [self.bwd_function(p.dtype, 0)?, self.bwd_function(p.dtype, 1)?, self.bwd_function(p.dtype, 2)?];
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
        let which = if ds_ptr != 0 { 3 } else { 2 };
        for (w, func) in funcs.iter().enumerate().take(which) {
            // SAFETY: every context was checked above and every view
            // validated against this problem by `validate_backward` (the
            // kernels stay inside them); the guards live until this returns.
            unsafe { launch_bwd(self.context(), stream.cu_stream(), func.cu_function(), w, &b) }?;
        }
        Ok(())
    }
}
