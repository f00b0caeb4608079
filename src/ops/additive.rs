//! Additive (Bahdanau) attention (DESIGN.md section 1b): scores
//! `s_ij = Σ_d w_d · tanh(q'_{i,d} + k'_{j,d} + b_d)` over projected queries
//! and keys, then the masks, softmax, O and LSE of the dot-product path, in
//! one kernel that never holds the `Lq × Lk × Da` tanh arguments in memory.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceSlice};

use super::desc;
use crate::device::{alloc_output, launch_additive, Attention};
use crate::error::{Error, Result};
use crate::options::AttentionOptions;
use crate::params::{additive_params, additive_smem_bytes, AdditiveAddrs};
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, Layout, LseLayout, LseTensorMut};
use crate::validate::{validate_additive, AdditiveProblem, LseDesc, TensorDesc};

/// What [`Attention::additive_forward`] returns.
#[derive(Debug)]
pub struct AdditiveOutput<T> {
    /// Output, contiguous `[B, Lq, H, Dv]` (one unused element when `Lq == 0`).
    pub o: CudaSlice<T>,
    /// `Layout::bshd` of `o`.
    pub o_layout: Layout,
    /// Log-sum-exp, contiguous `[B, H, Lq]`, `-inf` for rows with no visible key.
    pub lse: CudaSlice<f32>,
    /// `LseLayout::contiguous` of `lse`.
    pub lse_layout: LseLayout,
    /// The validated problem.
    pub problem: AdditiveProblem,
}

impl Attention {
    /// Additive (Bahdanau) attention into caller-owned buffers:
    /// `s_ij = Σ_d w_{h,d} · tanh(q'_{i,d} + k'_{j,d} + b_{h,d})` (no scale),
    /// then `opts.mask` in `opts.alignment` (bottom-right by default, as for
    /// [`forward_into`](Self::forward_into)), softmax, `O = P·V` and the LSE.
    /// A row with no visible key gets `O = 0`, `LSE = −∞`.
    ///
    /// - `q_proj`: Q' `[B, Lq, H, Da]`, `k_proj`: K' `[B, Lk, H, Da]`, `v`:
    ///   `[B, Lk, H, Dv]`, `o`: `[B, Lq, H, Dv]`, `lse`: `[B, H, Lq]`; any
    ///   batch, sequence and head strides, last dimension contiguous. `Da`
    ///   and `Dv` are multiples of 8 up to 256 and may differ. Every head
    ///   has its own keys (no grouped heads).
    /// - `w`, `bias`: `[H, Da]` row-major (`w[h·Da + d]`), the input type.
    ///
    /// Q' and K' are the caller's projections, one GEMM each
    /// (see [`reference::additive_forward`](crate::reference::additive_forward)
    /// for how, and why K' is computed once per encoder output).
    ///
    /// One CUDA-core kernel (sm80+): f32 arithmetic, `O(Lq·Lk·Da)` tanh
    /// evaluations (hidden key tiles skipped), memory `O(inputs)`. bf16 uses
    /// `tanh.approx.f32` (PTX bound 2^-10.987 relative; the emulated tier
    /// measures O's error with it well inside bf16's tolerance), f16 a
    /// two-instruction form accurate to a few f32 ulps (keeping f16's tighter
    /// tolerance for any weight scale). `opts.kernel` and `opts.kernel_name`
    /// do not apply (there is one kernel).
    ///
    /// Asynchronous on `stream`; no host allocation once the kernel is loaded.
    ///
    /// # Errors
    /// The validation errors of
    /// [`validate_additive`](crate::internals::validate_additive), naming
    /// `q_proj`, `k_proj`, `v`, `w`, `bias`, `o`, `lse`, `scale` or `softcap`
    /// (neither applies: a set one is an [`Error::InvalidOption`]);
    /// [`Error::ForeignContext`] for a buffer or stream of another context;
    /// [`Error::NoKernel`] where the device's shared memory is too small for
    /// `Da`, `Dv`; [`Error::Cuda`] if loading or the launch fails.
    #[allow(clippy::too_many_arguments)]
    pub fn additive_forward_into<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q_proj: &DeviceTensor<'_, T>,
        k_proj: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        w: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        opts: &AttentionOptions,
    ) -> Result<AdditiveProblem> {
        self.check_additive_contexts(stream, q_proj, k_proj, v, w, bias)?;
        self.check_context("o", o.view.stream().context())?;
        if let Some(l) = &lse {
            self.check_context("lse", l.view.stream().context())?;
        }
        let descs = [
            desc("q_proj", &q_proj.view, q_proj.layout),
            desc("k_proj", &k_proj.view, k_proj.layout),
            desc("v", &v.view, v.layout),
            desc("o", &o.view, o.layout),
        ];
        let lse_desc = lse.as_ref().map(|l| LseDesc { layout: l.layout, len: l.view.len() });
        let p = validate_additive(
            T::DTYPE,
            &descs[0],
            &descs[1],
            &descs[2],
            w.len(),
            bias.map(|b| b.len()),
            Some(&descs[3]),
            lse_desc.as_ref(),
            opts,
        )?;
        self.launch_additive_call(stream, &p, &descs, q_proj, k_proj, v, w, bias, o, lse)?;
        Ok(p)
    }

    /// [`additive_forward_into`](Self::additive_forward_into) with O
    /// `[B, Lq, H, Dv]` and LSE `[B, H, Lq]` allocated (contiguous) on `stream`.
    ///
    /// # Errors
    /// As [`additive_forward_into`](Self::additive_forward_into), plus
    /// [`Error::Cuda`] if an allocation fails.
    #[allow(clippy::too_many_arguments)]
    pub fn additive_forward<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q_proj: &DeviceTensor<'_, T>,
        k_proj: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        w: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        opts: &AttentionOptions,
    ) -> Result<AdditiveOutput<T>> {
        self.check_additive_contexts(stream, q_proj, k_proj, v, w, bias)?;
        let [b, lq, h, _] = q_proj.layout.shape;
        let dv = v.layout.shape[3];
        let descs = [
            desc("q_proj", &q_proj.view, q_proj.layout),
            desc("k_proj", &k_proj.view, k_proj.layout),
            desc("v", &v.view, v.layout),
        ];
        // Validate before allocating (O's layout is only known good afterwards).
        let p = validate_additive(
            T::DTYPE,
            &descs[0],
            &descs[1],
            &descs[2],
            w.len(),
            bias.map(|b| b.len()),
            None,
            None,
            opts,
        )?;
        let o_layout = Layout::bshd(b, lq, h, dv);
        let lse_layout = LseLayout::contiguous(b, h, lq);
        // B·Lq·H is bounded by Q''s element count, but times Dv it may not be.
        let o_len = (b * lq * h).checked_mul(dv).filter(|&n| n <= i64::MAX as usize).ok_or(Error::SizeOverflow {
            arg: "o",
            what: "element count",
            value: (b * lq * h) as u128 * dv as u128,
            limit: i64::MAX as u128,
        })?;
        let mut o = alloc_output::<T>(stream, o_len)?;
        let mut lse = alloc_output::<f32>(stream, b * h * lq)?;
        {
            let od = TensorDesc { arg: "o", layout: o_layout, len: o_len };
            let all = [descs[0], descs[1], descs[2], od];
            let mut o_view = DeviceTensorMut::new(&mut o, o_layout);
            let mut lse_view = LseTensorMut::new(&mut lse, lse_layout);
            self.launch_additive_call(stream, &p, &all, q_proj, k_proj, v, w, bias, &mut o_view, Some(&mut lse_view))?;
        }
        Ok(AdditiveOutput { o, o_layout, lse, lse_layout, problem: p })
    }

    fn check_additive_contexts<T>(
        &self,
        stream: &CudaStream,
        q_proj: &DeviceTensor<'_, T>,
        k_proj: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        w: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
    ) -> Result<()> {
        self.check_context("stream", stream.context())?;
        self.check_context("q_proj", q_proj.view.stream().context())?;
        self.check_context("k_proj", k_proj.view.stream().context())?;
        self.check_context("v", v.view.stream().context())?;
        self.check_context("w", w.stream().context())?;
        if let Some(b) = bias {
            self.check_context("bias", b.stream().context())?;
        }
        Ok(())
    }

    /// The launch of a validated call (`descs`: Q', K', V, O).
    #[allow(clippy::too_many_arguments)]
    fn launch_additive_call<T: Element>(
        &self,
        stream: &CudaStream,
        p: &AdditiveProblem,
        descs: &[TensorDesc; 4],
        q_proj: &DeviceTensor<'_, T>,
        k_proj: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        w: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
    ) -> Result<()> {
        if p.seqlen_q == 0 {
            return Ok(()); // nothing to write; a zero-sized grid is a launch error
        }
        let (func, smem_limit) = self.additive_function(T::DTYPE)?;
        let smem = additive_smem_bytes(p.dim_a, p.dim_v);
        if smem > smem_limit as usize {
            return Err(Error::NoKernel {
                reason: format!(
                    "additive attention with Da = {}, Dv = {} needs {smem} B of shared memory per block, the device allows {smem_limit}",
                    p.dim_a, p.dim_v
                ),
            });
        }
        // The guards make `stream` wait for earlier writes to these buffers
        // and record this launch's reads and writes when dropped after it.
        let (q_ptr, _q_sync) = q_proj.view.device_ptr(stream);
        let (k_ptr, _k_sync) = k_proj.view.device_ptr(stream);
        let (v_ptr, _v_sync) = v.view.device_ptr(stream);
        let (w_ptr, _w_sync) = w.device_ptr(stream);
        let (b_ptr, _b_sync) = match bias {
            Some(b) => {
                let (ptr, sync) = b.device_ptr(stream);
                (ptr, Some(sync))
            }
            None => (0, None),
        };
        let (o_ptr, _o_sync) = o.view.device_ptr_mut(stream);
        let lse_layout = lse.as_ref().map(|l| l.layout);
        let (lse_ptr, _lse_sync) = match lse {
            Some(l) => {
                let (ptr, sync) = l.view.device_ptr_mut(stream);
                (ptr, Some(sync))
            }
            None => (0, None),
        };
        let a = AdditiveAddrs { q: q_ptr, k: k_ptr, v: v_ptr, w: w_ptr, bias: b_ptr, o: o_ptr, lse: lse_ptr };
        let layouts = [descs[0].layout, descs[1].layout, descs[2].layout, descs[3].layout];
        let params = additive_params(p, &layouts, lse_layout.as_ref(), a);
        // SAFETY: the kernel's one argument is FaAdditiveParams; every
        // address comes from a view of this context whose layout
        // validate_additive checked for these sizes (w and bias hold H·Da
        // elements), smem is the size params.h gives for (Da, Dv) and within
        // the function's raised limit, and the guards above outlive the launch.
        unsafe { launch_additive(self.context(), stream.cu_stream(), func.cu_function(), &params, smem as u32) }
    }
}
