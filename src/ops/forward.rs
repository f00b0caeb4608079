//! The forward pass: with allocated or caller-owned outputs, runtime-typed,
//! and a dry run that says which kernel would run.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceSlice};
use half::{bf16, f16};

use super::desc;
use crate::device::{alloc_output, Attention};
use crate::dispatch::{DispatchTensors, KernelInfo};
use crate::error::{Error, Result};
use crate::options::AttentionOptions;
use crate::tensor::{DType, DeviceTensor, DeviceTensorMut, Element, Layout, LseLayout, LseTensorMut};
use crate::validate::{check_dtypes, validate, LseDesc, Problem, TensorDesc};

/// What [`Attention::forward`] returns.
#[derive(Debug)]
#[non_exhaustive]
pub struct ForwardOutput<T> {
    /// Output, contiguous `[B, Lq, Hq, D]` (layout in `o_layout`). For an
    /// empty problem (`Lq == 0`) the buffer holds one unused element.
    pub o: CudaSlice<T>,
    /// `Layout::bshd` of `o`.
    pub o_layout: Layout,
    /// Log-sum-exp, contiguous `[B, Hq, Lq]`, natural log, `-inf` for rows
    /// with no visible key (one unused element when `Lq == 0`).
    pub lse: CudaSlice<f32>,
    /// `LseLayout::contiguous` of `lse`.
    pub lse_layout: LseLayout,
    /// The kernel that ran.
    pub kernel: KernelInfo,
}

/// O as `forward` will allocate it, described before it exists.
fn future_o(q: &Layout) -> TensorDesc {
    let [b, lq, hq, d] = q.shape;
    let layout = Layout::bshd(b, lq, hq, d);
    // An unrepresentable size gives len 0; validation then reports the overflow first.
    TensorDesc { arg: "o", layout, len: layout.numel().unwrap_or(0) }
}

impl Attention {
    /// Runs attention and returns newly allocated O and LSE.
    ///
    /// Asynchronous on `stream`: the result buffers are ordered after the
    /// kernel on that stream; copying them to the host synchronises.
    ///
    /// # Errors
    /// Any validation error naming the argument
    /// (before anything is allocated), [`Error::ForeignContext`],
    /// [`Error::NoKernel`], or [`Error::Cuda`] for a failed allocation
    /// (out of memory) or launch.
    pub fn forward<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        opts: &AttentionOptions,
    ) -> Result<ForwardOutput<T>> {
        self.check_contexts(Some(stream), q, k, v, None, None)?;
        let od = future_o(&q.layout);
        let (qd, kd, vd) = (desc("q", &q.view, q.layout), desc("k", &k.view, k.layout), desc("v", &v.view, v.layout));
        // Validate before allocating, so bad input never costs an allocation.
        let p = validate(T::DTYPE, &qd, &kd, &vd, Some(&od), None, opts)?;
        let lse_layout = LseLayout::contiguous(p.batch, p.heads_q, p.seqlen_q);
        // Validation bounded B·Hq·Lq·D by i64::MAX, so these products fit.
        let mut o = alloc_output::<T>(stream, od.len)?;
        let mut lse = alloc_output::<f32>(stream, p.batch * p.heads_q * p.seqlen_q)?;
        let kernel = {
            // Validated above with O as allocated here: no second validation.
            let mut o_view = DeviceTensorMut::new(&mut o, od.layout);
            let mut lse_view = LseTensorMut::new(&mut lse, lse_layout);
            self.launch_forward(stream, &p, &[qd, kd, vd, od], q, k, v, &mut o_view, Some(&mut lse_view), opts)?
        };
        Ok(ForwardOutput { o, o_layout: od.layout, lse, lse_layout, kernel })
    }

    /// Runs attention into caller-owned buffers: `o` of shape `[B, Lq, Hq, D]`
    /// (any strides, last one 1) and optionally `lse` `[B, Hq, Lq]` (any
    /// batch/head strides). Returns the kernel that ran.
    ///
    /// Asynchronous on `stream`; no host synchronisation and, once the
    /// kernel's image is loaded, no host allocation: safe to call inside CUDA
    /// graph capture (load first with [`Attention::preload`] or one eager call).
    ///
    /// # Errors
    /// Any validation error naming the argument,
    /// [`Error::ForeignContext`], [`Error::NoKernel`] (e.g. a forced kernel
    /// that cannot run), or [`Error::Cuda`] for a failed launch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        self.check_contexts(Some(stream), q, k, v, Some(o), lse.as_deref())?;
        let descs = [
            desc("q", &q.view, q.layout),
            desc("k", &k.view, k.layout),
            desc("v", &v.view, v.layout),
            desc("o", &o.view, o.layout),
        ];
        let lse_desc = lse.as_ref().map(|l| LseDesc { layout: l.layout, len: l.view.len() });
        let p = validate(T::DTYPE, &descs[0], &descs[1], &descs[2], Some(&descs[3]), lse_desc.as_ref(), opts)?;
        self.launch_forward(stream, &p, &descs, q, k, v, o, lse, opts)
    }

    /// Says which kernel [`forward_into`](Self::forward_into) would run,
    /// with the same validation, without launching or touching any buffer's
    /// stream ordering. `o` is O's layout if it is not the contiguous one
    /// [`forward`](Self::forward) allocates; O need not exist yet.
    ///
    /// Base addresses are assumed 16-byte aligned (cudarc allocations are
    /// 256-byte aligned); a view that starts at an odd element offset can
    /// make the real call fall back to another family.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into), without launch errors.
    pub fn plan<T: Element>(
        &self,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: Option<&Layout>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        self.check_contexts(None, q, k, v, None, None)?;
        let od = match o {
            Some(l) => TensorDesc { arg: "o", layout: *l, len: l.span().unwrap_or(usize::MAX) },
            None => future_o(&q.layout),
        };
        let descs = [desc("q", &q.view, q.layout), desc("k", &k.view, k.layout), desc("v", &v.view, v.layout), od];
        let p = validate(T::DTYPE, &descs[0], &descs[1], &descs[2], Some(&descs[3]), None, opts)?;
        let tensors = DispatchTensors { descs: &descs, addrs: None };
        self.choose(&p, tensors, opts.kernel, opts.kernel_name).map(|(_, info)| info)
    }

    /// [`forward_into`](Self::forward_into) for callers that hold tensors of
    /// a runtime element type (bindings, model loaders).
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] naming the first argument whose element type
    /// differs from `q`'s; otherwise as [`forward_into`](Self::forward_into).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into_dyn(
        &self,
        stream: &CudaStream,
        q: DynTensor<'_>,
        k: DynTensor<'_>,
        v: DynTensor<'_>,
        o: DynTensorMut<'_>,
        lse: Option<&mut LseTensorMut<'_>>,
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
            // check_dtypes admitted only matching element types.
            _ => Err(Error::NoKernel { reason: "mixed element types".into() }),
        }
    }

    /// Every stream and buffer of a call must live in this handle's context.
    fn check_contexts<T: Element>(
        &self,
        stream: Option<&CudaStream>,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: Option<&DeviceTensorMut<'_, T>>,
        lse: Option<&LseTensorMut<'_>>,
    ) -> Result<()> {
        if let Some(stream) = stream {
            self.check_context("stream", stream.context())?;
        }
        self.check_context("q", q.view.stream().context())?;
        self.check_context("k", k.view.stream().context())?;
        self.check_context("v", v.view.stream().context())?;
        if let Some(o) = o {
            self.check_context("o", o.view.stream().context())?;
        }
        if let Some(l) = lse {
            self.check_context("lse", l.view.stream().context())?;
        }
        Ok(())
    }
}

/// The validated problem of a call, for callers that want its numbers
/// (FLOPs, visible pairs) without running it.
///
/// # Errors
/// As [`validate`](crate::internals::validate).
pub fn problem_of(dtype: DType, q: &Layout, k: &Layout, v: &Layout, opts: &AttentionOptions) -> Result<Problem> {
    let d = |arg, layout: &Layout| TensorDesc { arg, layout: *layout, len: layout.span().unwrap_or(usize::MAX) };
    validate(dtype, &d("q", q), &d("k", k), &d("v", v), None, None, opts)
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
