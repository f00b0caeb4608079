//! Public operations on an [`Attention`] handle: the forward pass, with
//! allocated or caller-owned outputs, and a dry run that says which kernel
//! would run.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DeviceSlice};
use half::{bf16, f16};

use crate::device::{alloc_output, Attention, KernelInfo};
use crate::error::Result;
use crate::options::{check_dtypes, validate, AttentionOptions, Problem, TensorDesc};
use crate::tensor::{DType, DeviceTensor, DeviceTensorMut, Element, Layout};

/// What [`Attention::forward`] returns.
#[derive(Debug)]
pub struct ForwardOutput<T> {
    /// Output, contiguous `[B, Lq, Hq, D]` (layout in `o_layout`). For an
    /// empty problem (`Lq == 0`) the buffer holds one unused element.
    pub o: CudaSlice<T>,
    /// `Layout::bshd` of `o`.
    pub o_layout: Layout,
    /// Log-sum-exp, contiguous `[B, Hq, Lq]`, natural log, `-inf` for rows
    /// with no visible key (one unused element when `Lq == 0`).
    pub lse: CudaSlice<f32>,
    /// The kernel that ran.
    pub kernel: KernelInfo,
}

fn desc<T, V: DeviceSlice<T>>(arg: &'static str, view: &V, layout: Layout) -> TensorDesc {
    TensorDesc { arg, layout, len: view.len() }
}

impl Attention {
    /// Runs attention and returns newly allocated O and LSE.
    ///
    /// Asynchronous on `stream`: the result buffers are ordered after the
    /// kernel on that stream; copying them to the host synchronises.
    pub fn forward<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        opts: &AttentionOptions,
    ) -> Result<ForwardOutput<T>> {
        let [b, lq, hq, d] = q.layout.shape;
        // Validate before allocating, so bad input never costs an allocation.
        self.check_problem(stream, q, k, v, None, None, opts)?;
        let o_layout = Layout::bshd(b, lq, hq, d);
        let mut o = alloc_output::<T>(stream, o_layout.numel())?;
        let mut lse = alloc_output::<f32>(stream, b * hq * lq)?;
        let kernel = {
            let mut o_view = DeviceTensorMut::new(&mut o, o_layout);
            let mut lse_view = lse.as_view_mut();
            self.forward_into(stream, q, k, v, &mut o_view, Some(&mut lse_view), opts)?
        };
        Ok(ForwardOutput { o, o_layout, lse, kernel })
    }

    /// Runs attention into caller-owned buffers: `o` of shape `[B, Lq, Hq, D]`
    /// (any strides, last one 1) and optionally `lse` of `B·Hq·Lq` f32.
    ///
    /// Returns the kernel that ran. Asynchronous on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut CudaViewMut<'_, f32>>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        let lse_len = lse.as_ref().map(|l| l.len());
        let (p, descs) = self.check_problem(stream, q, k, v, Some(o), lse_len, opts)?;
        self.run(stream, &p, descs, opts, q, k, v, o, lse, false)
    }

    /// Says which kernel [`forward_into`](Self::forward_into) would run on
    /// these tensors, with the same validation, without launching anything.
    pub fn plan<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        let (p, descs) = self.check_problem(stream, q, k, v, Some(o), None, opts)?;
        self.run(stream, &p, descs, opts, q, k, v, o, None, true)
    }

    /// [`forward_into`](Self::forward_into) for callers that hold tensors of
    /// a runtime element type (bindings, model loaders). Mixed element types
    /// are an [`Error::DTypeMismatch`](crate::Error::DTypeMismatch) naming the argument.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into_dyn(
        &self,
        stream: &Arc<CudaStream>,
        q: DynTensor<'_>,
        k: DynTensor<'_>,
        v: DynTensor<'_>,
        o: DynTensorMut<'_>,
        lse: Option<&mut CudaViewMut<'_, f32>>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        check_dtypes(q.dtype(), &[("k", k.dtype()), ("v", v.dtype()), ("o", o.dtype())])?;
        match (q, k, v, o) {
            (DynTensor::F16(q), DynTensor::F16(k), DynTensor::F16(v), DynTensorMut::F16(mut o)) => {
                self.forward_into(stream, &q, &k, &v, &mut o, lse, opts)
            }
            (DynTensor::BF16(q), DynTensor::BF16(k), DynTensor::BF16(v), DynTensorMut::BF16(mut o)) => {
                self.forward_into(stream, &q, &k, &v, &mut o, lse, opts)
            }
            _ => unreachable!("check_dtypes admitted only matching element types"),
        }
    }

    /// Validation shared by every entry point: contexts, then the problem.
    #[allow(clippy::too_many_arguments)]
    fn check_problem<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: Option<&DeviceTensorMut<'_, T>>,
        lse_len: Option<usize>,
        opts: &AttentionOptions,
    ) -> Result<(Problem, [TensorDesc; 4])> {
        self.check_context("stream", stream.context())?;
        self.check_context("q", q.view.stream().context())?;
        self.check_context("k", k.view.stream().context())?;
        self.check_context("v", v.view.stream().context())?;
        let (qd, kd, vd) = (desc("q", &q.view, q.layout), desc("k", &k.view, k.layout), desc("v", &v.view, v.layout));
        // `forward` validates before O exists; then O is checked as its future self.
        let od = match o {
            Some(o) => {
                self.check_context("o", o.view.stream().context())?;
                desc("o", &o.view, o.layout)
            }
            None => {
                let [b, lq, hq, d] = q.layout.shape;
                TensorDesc { arg: "o", layout: Layout::bshd(b, lq, hq, d), len: b * lq * hq * d }
            }
        };
        let p = validate(T::DTYPE, &qd, &kd, &vd, Some(&od), lse_len, opts)?;
        Ok((p, [qd, kd, vd, od]))
    }
}

/// A read-only device tensor whose element type is known at run time.
#[derive(Debug)]
pub enum DynTensor<'a> {
    /// f16 elements.
    F16(DeviceTensor<'a, f16>),
    /// bf16 elements.
    BF16(DeviceTensor<'a, bf16>),
}

/// A writable device tensor whose element type is known at run time.
#[derive(Debug)]
pub enum DynTensorMut<'a> {
    /// f16 elements.
    F16(DeviceTensorMut<'a, f16>),
    /// bf16 elements.
    BF16(DeviceTensorMut<'a, bf16>),
}

impl DynTensor<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            DynTensor::F16(_) => DType::F16,
            DynTensor::BF16(_) => DType::BF16,
        }
    }
}

impl DynTensorMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            DynTensorMut::F16(_) => DType::F16,
            DynTensorMut::BF16(_) => DType::BF16,
        }
    }
}
