//! The candle op on candle CUDA tensors (cargo feature `candle-cuda`): our
//! kernels on candle's own stream and memory.
//!
//! Nothing is synchronised with the host and nothing is copied, except a
//! view whose last dimension is not contiguous (copied on the device by
//! candle first, as the CPU path does on the host). The output is a fresh
//! contiguous `[B, Lq, Hq, D]` allocation on candle's stream. The handle
//! ([`Attention::new`]) shares its context's kernel registry, so after the
//! first call the modules are not loaded again.
//!
//! The backward recomputes the forward's log-sum-exp (candle keeps only the
//! op's output), then runs [`Attention::backward_into`] with the tiled
//! kernels' workspace: about one forward more than a framework that keeps
//! the LSE from the forward.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView};
use half::{bf16, f16};

use super::{FusedAttn, FusedAttnVarLen};
use crate::options::{Alibi, AttentionOptions, HeadValues};
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, Layout, LseLayout, LseTensor, LseTensorMut};
use crate::Attention;
use crate::{backward_workspace_len, Gradients, SeqLens};

/// This crate's errors as candle errors, message kept.
fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// `storage` under `l` with a unit stride in the last dimension: `None`
/// when it has one already, else a contiguous device copy and its layout.
fn unit_last_stride(
    arg: &str,
    storage: &CudaStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<Option<(CudaStorage, candle_core::Layout)>> {
    if l.dims().len() != 4 {
        candle_core::bail!("fused-attn: {arg} must be rank 4 [batch, seq, heads, head_dim], got shape {:?}", l.shape());
    }
    if l.stride()[3] == 1 {
        return Ok(None);
    }
    let shape = l.shape().clone();
    // SAFETY: every element is written by the strided copy below before
    // anything reads the storage.
    let mut dst = unsafe { storage.device().alloc_uninit(&shape, storage.dtype())? };
    storage.copy_strided_src(&mut dst, 0, l)?;
    Ok(Some((dst, candle_core::Layout::contiguous(shape))))
}

/// The copy [`unit_last_stride`] made, else the original storage and layout.
fn pick<'a>(
    copy: &'a Option<(CudaStorage, candle_core::Layout)>,
    storage: &'a CudaStorage,
    l: &candle_core::Layout,
) -> (&'a CudaStorage, candle_core::Layout) {
    match copy {
        Some((s, l)) => (s, l.clone()),
        None => (storage, l.clone()),
    }
}

/// A rank-4 storage (last stride 1) as a device view from its start offset,
/// with this crate's layout.
fn device_view<'a, T: CudaDType>(
    arg: &str,
    storage: &'a CudaStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<(CudaView<'a, T>, Layout)> {
    let (d, st) = (l.dims(), l.stride());
    let slice: &CudaSlice<T> = storage.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    if start > slice.len() {
        candle_core::bail!("fused-attn: {arg}'s layout starts at {start}, past its storage of {}", slice.len());
    }
    let layout = Layout::strided_bshd([d[0], d[1], d[2], d[3]], [st[0], st[1], st[2], 1]);
    Ok((slice.slice(start..), layout))
}

/// Per-head values (ALiBi slopes, sinks) as a contiguous f32 tensor at
/// offset 0 on `dev` (moved or copied when they are not), with its rank.
fn head_values(arg: &str, t: &Tensor, dev: &CudaDevice) -> candle_core::Result<(Tensor, usize)> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("fused-attn: {arg} must be f32, got {:?}", t.dtype());
    }
    let rank = t.rank();
    if !(1..=2).contains(&rank) {
        candle_core::bail!("fused-attn: {arg} must be [heads] or [batch, heads], got shape {:?}", t.shape());
    }
    let t = t.to_device(&candle_core::Device::Cuda(dev.clone()))?;
    // The kernels read the storage from element 0: a view that starts
    // further in (or strides) is copied to a fresh storage. (`copy` would
    // keep the offset, `contiguous` returns an offset view as it is.)
    let t = if t.is_contiguous() && t.layout().start_offset() == 0 { t } else { t.force_contiguous()? };
    Ok((t, rank))
}

/// Borrows a CUDA tensor's f32 slice (the tensor being contiguous from
/// offset 0, as [`head_values`] makes it) for the duration of `f`.
fn with_f32_slice<R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&CudaSlice<f32>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let Some(t) = t else { return f(None) };
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(Some(s.as_cuda_slice::<f32>()?)),
        _ => candle_core::bail!("fused-attn: per-head values must be on the CUDA device"),
    }
}

/// Runs `f` with `options`, its ALiBi slopes and sinks (candle tensors,
/// moved to `dev` when they are elsewhere) pointing at device memory.
fn with_device_options<R>(
    options: &AttentionOptions<'static>,
    alibi_slopes: Option<&Tensor>,
    sinks: Option<&Tensor>,
    dev: &CudaDevice,
    f: impl FnOnce(&AttentionOptions<'_>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let slopes = alibi_slopes.map(|t| head_values("alibi_slopes", t, dev)).transpose()?;
    let sinks = match sinks.map(|t| head_values("sinks", t, dev)).transpose()? {
        Some((_, 2)) => candle_core::bail!("fused-attn: sinks must be [heads] (one logit per query head)"),
        s => s.map(|(t, _)| t),
    };
    let per_batch = matches!(slopes, Some((_, 2)));
    with_f32_slice(slopes.as_ref().map(|(t, _)| t), |s| {
        with_f32_slice(sinks.as_ref(), |k| {
            let mut opts: AttentionOptions<'_> = *options;
            opts.alibi = s.map(|s| Alibi { slopes: HeadValues::Device(s), per_batch });
            opts.sinks = k.map(HeadValues::Device);
            f(&opts)
        })
    })
}

/// Zeroed device memory for `n` elements (at least one), on `stream`.
fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    n: usize,
) -> candle_core::Result<CudaSlice<T>> {
    stream.alloc_zeros::<T>(n.max(1)).map_err(candle_core::Error::wrap)
}

impl FusedAttn {
    fn with_device_options<R>(
        &self,
        dev: &CudaDevice,
        f: impl FnOnce(&AttentionOptions<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        with_device_options(&self.options, self.alibi_slopes.as_ref(), self.sinks.as_ref(), dev, f)
    }

    /// The forward on one dtype's storages: O (and the LSE, when asked).
    #[allow(clippy::type_complexity)]
    fn cuda_fwd_t<T: Element + CudaDType>(
        &self,
        (q, q_l): (&CudaStorage, &candle_core::Layout),
        (k, k_l): (&CudaStorage, &candle_core::Layout),
        (v, v_l): (&CudaStorage, &candle_core::Layout),
        want_lse: bool,
    ) -> candle_core::Result<(CudaSlice<T>, Shape, Option<(CudaSlice<f32>, LseLayout)>)> {
        let dev = q.device().clone();
        let stream = dev.cuda_stream();
        let attn = Attention::new(stream.context()).map_err(wrap)?;
        let (qc, kc, vc) =
            (unit_last_stride("q", q, q_l)?, unit_last_stride("k", k, k_l)?, unit_last_stride("v", v, v_l)?);
        let (q, q_l) = pick(&qc, q, q_l);
        let (k, k_l) = pick(&kc, k, k_l);
        let (v, v_l) = pick(&vc, v, v_l);
        let (qv, ql) = device_view::<T>("q", q, &q_l)?;
        let (kv, kl) = device_view::<T>("k", k, &k_l)?;
        let (vv, vl) = device_view::<T>("v", v, &v_l)?;
        let [b, lq, hq, d] = ql.shape;
        let n = b
            .checked_mul(lq)
            .and_then(|x| x.checked_mul(hq))
            .and_then(|x| x.checked_mul(d))
            .ok_or_else(|| candle_core::Error::Msg("fused-attn: the output size overflows usize".into()))?;
        // Zeroed rather than uninitialised: no stale memory can leak into a
        // result even if a kernel left an element unwritten.
        let mut o = zeros::<T>(&stream, n)?;
        let mut lse = if want_lse {
            let lse = stream.alloc_zeros::<f32>((b * hq * lq).max(1)).map_err(candle_core::Error::wrap)?;
            Some((lse, LseLayout::contiguous(b, hq, lq)))
        } else {
            None
        };
        self.with_device_options(&dev, |opts| {
            let mut ot = DeviceTensorMut::new(&mut o, Layout::bshd(b, lq, hq, d));
            let mut lt = lse.as_mut().map(|(buf, l)| LseTensorMut::new(buf, *l));
            attn.forward_into(
                &stream,
                &DeviceTensor::from_view(qv, ql),
                &DeviceTensor::from_view(kv, kl),
                &DeviceTensor::from_view(vv, vl),
                &mut ot,
                lt.as_mut(),
                opts,
            )
            .map_err(wrap)?;
            Ok(())
        })?;
        Ok((o, Shape::from((b, lq, hq, d)), lse))
    }

    /// `cuda_fwd` for the [`CustomOp3`](candle_core::CustomOp3) impl.
    pub(super) fn cuda_fwd_impl(
        &self,
        q: (&CudaStorage, &candle_core::Layout),
        k: (&CudaStorage, &candle_core::Layout),
        v: (&CudaStorage, &candle_core::Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = q.0.device().clone();
        match (q.0.dtype(), k.0.dtype(), v.0.dtype()) {
            (DType::F16, DType::F16, DType::F16) => {
                let (o, shape, _) = self.cuda_fwd_t::<f16>(q, k, v, false)?;
                Ok((CudaStorage::wrap_cuda_slice(o, dev), shape))
            }
            (DType::BF16, DType::BF16, DType::BF16) => {
                let (o, shape, _) = self.cuda_fwd_t::<bf16>(q, k, v, false)?;
                Ok((CudaStorage::wrap_cuda_slice(o, dev), shape))
            }
            (a, b, c) => {
                candle_core::bail!("fused-attn: q, k and v must all be f16 or all bf16, got {a:?}, {b:?}, {c:?}")
            }
        }
    }

    /// The gradients on CUDA tensors: the forward again for O and the LSE,
    /// then the tiled backward. dQ, dK, dV come back contiguous.
    fn cuda_bwd_t<T: Element + CudaDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Contiguous copies keep the strides simple; the backward is not
        // the path where a view's copy matters.
        let (q, k, v, d_o) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, d_o.contiguous()?);
        let (qs, q_l) = q.storage_and_layout();
        let (ks, k_l) = k.storage_and_layout();
        let (vs, v_l) = v.storage_and_layout();
        let (ds, d_l) = d_o.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(ds)) = (&*qs, &*ks, &*vs, &*ds)
        else {
            candle_core::bail!("fused-attn: q, k, v and the output gradient must all be on the CUDA device")
        };
        let dev = qs.device().clone();
        let stream = dev.cuda_stream();
        let attn = Attention::new(stream.context()).map_err(wrap)?;
        let (o, _, lse) = self.cuda_fwd_t::<T>((qs, q_l), (ks, k_l), (vs, v_l), true)?;
        let (lse, lse_l) = lse.expect("asked for");
        let (qv, ql) = device_view::<T>("q", qs, q_l)?;
        let (kv, kl) = device_view::<T>("k", ks, k_l)?;
        let (vv, vl) = device_view::<T>("v", vs, v_l)?;
        let (dv_, dl) = device_view::<T>("grad", ds, d_l)?;
        let [b, lq, hq, d] = ql.shape;
        let cuda = candle_core::Error::wrap;
        let mut dq = stream.alloc_zeros::<T>(q.elem_count().max(1)).map_err(cuda)?;
        let mut dk = stream.alloc_zeros::<T>(k.elem_count().max(1)).map_err(cuda)?;
        let mut dv = stream.alloc_zeros::<T>(v.elem_count().max(1)).map_err(cuda)?;
        let ws_len = backward_workspace_len(b, lq, hq, d).map_err(wrap)?;
        let mut ws = stream.alloc_zeros::<f32>(ws_len.max(1)).map_err(cuda)?;
        self.with_device_options(&dev, |opts| {
            let mut dqt = DeviceTensorMut::new(&mut dq, ql);
            let mut dkt = DeviceTensorMut::new(&mut dk, kl);
            let mut dvt = DeviceTensorMut::new(&mut dv, vl);
            attn.backward_into(
                &stream,
                &DeviceTensor::from_view(qv, ql),
                &DeviceTensor::from_view(kv, kl),
                &DeviceTensor::from_view(vv, vl),
                &DeviceTensor::new(&o, ql),
                &LseTensor::new(&lse, lse_l),
                &DeviceTensor::from_view(dv_, dl),
                Gradients::new(&mut dqt, &mut dkt, &mut dvt).with_workspace(&mut ws),
                opts,
            )
            .map_err(wrap)
        })?;
        let tensor = |buf: CudaSlice<T>, like: &Tensor| {
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
            Tensor::from_storage(storage, like.shape().clone(), BackpropOp::none(), false)
        };
        Ok((Some(tensor(dq, &q)), Some(tensor(dk, &k)), Some(tensor(dv, &v))))
    }

    /// `bwd` on CUDA tensors, for the [`CustomOp3`](candle_core::CustomOp3) impl.
    pub(super) fn cuda_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match q.dtype() {
            DType::F16 => self.cuda_bwd_t::<f16>(q, k, v, d_o),
            DType::BF16 => self.cuda_bwd_t::<bf16>(q, k, v, d_o),
            other => candle_core::bail!("fused-attn: q, k and v must be f16 or bf16, got {other:?}"),
        }
    }
}

/// A rank-3 `[T, H, D]` layout as the `[1, T, H, D]` one the kernels take.
fn packed_layout(arg: &str, l: &candle_core::Layout) -> candle_core::Result<candle_core::Layout> {
    if l.dims().len() != 3 {
        candle_core::bail!("fused-attn: {arg} must be rank 3 [tokens, heads, head_dim], got shape {:?}", l.shape());
    }
    let (d, st) = (l.dims(), l.stride());
    Ok(candle_core::Layout::new(
        Shape::from((1, d[0], d[1], d[2])),
        vec![d[0] * st[0].max(1), st[0], st[1], st[2]],
        l.start_offset(),
    ))
}

impl FusedAttnVarLen {
    fn cuda_fwd_t<T: Element + CudaDType>(
        &self,
        (q, q_l): (&CudaStorage, &candle_core::Layout),
        (k, k_l): (&CudaStorage, &candle_core::Layout),
        (v, v_l): (&CudaStorage, &candle_core::Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (cu_q, cu_k) = self.tables()?;
        let dev = q.device().clone();
        let stream = dev.cuda_stream();
        let attn = Attention::new(stream.context()).map_err(wrap)?;
        let (q_l, k_l, v_l) = (packed_layout("q", q_l)?, packed_layout("k", k_l)?, packed_layout("v", v_l)?);
        let (qc, kc, vc) =
            (unit_last_stride("q", q, &q_l)?, unit_last_stride("k", k, &k_l)?, unit_last_stride("v", v, &v_l)?);
        let (q, q_l) = pick(&qc, q, &q_l);
        let (k, k_l) = pick(&kc, k, &k_l);
        let (v, v_l) = pick(&vc, v, &v_l);
        let (qv, ql) = device_view::<T>("q", q, &q_l)?;
        let (kv, kl) = device_view::<T>("k", k, &k_l)?;
        let (vv, vl) = device_view::<T>("v", v, &v_l)?;
        let [_, tq, hq, d] = ql.shape;
        let n = tq.checked_mul(hq).and_then(|x| x.checked_mul(d));
        let n = n.ok_or_else(|| candle_core::Error::Msg("fused-attn: the output size overflows usize".into()))?;
        let mut o = zeros::<T>(&stream, n)?;
        let tables = SeqLens::new(&stream, &cu_q, &cu_k, None).map_err(wrap)?;
        with_device_options(&self.options, self.alibi_slopes.as_ref(), None, &dev, |opts| {
            let mut ot = DeviceTensorMut::new(&mut o, Layout::bshd(1, tq, hq, d));
            attn.forward_varlen_into(
                &stream,
                &DeviceTensor::from_view(qv, ql),
                &DeviceTensor::from_view(kv, kl),
                &DeviceTensor::from_view(vv, vl),
                &mut ot,
                None,
                &tables,
                opts,
            )
            .map_err(wrap)?;
            Ok(())
        })?;
        Ok((CudaStorage::wrap_cuda_slice(o, dev), Shape::from((tq, hq, d))))
    }

    /// `cuda_fwd` for the [`CustomOp3`](candle_core::CustomOp3) impl.
    pub(super) fn cuda_fwd_impl(
        &self,
        q: (&CudaStorage, &candle_core::Layout),
        k: (&CudaStorage, &candle_core::Layout),
        v: (&CudaStorage, &candle_core::Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match (q.0.dtype(), k.0.dtype(), v.0.dtype()) {
            (DType::F16, DType::F16, DType::F16) => self.cuda_fwd_t::<f16>(q, k, v),
            (DType::BF16, DType::BF16, DType::BF16) => self.cuda_fwd_t::<bf16>(q, k, v),
            (a, b, c) => {
                candle_core::bail!("fused-attn: q, k and v must all be f16 or all bf16, got {a:?}, {b:?}, {c:?}")
            }
        }
    }
}
