//! [candle](https://crates.io/crates/candle-core) integration (cargo feature
//! `candle`): attention on candle tensors, with the names and argument order
//! of `candle-flash-attn`.
//!
//! Tensors are `[B, L, H, D]` like candle-flash-attn's (Q `[B, Lq, Hq, D]`,
//! K and V `[B, Lk, Hk, D]`, `Hq % Hk == 0`), f16 or bf16; the result is
//! `[B, Lq, Hq, D]` in the inputs' dtype. Any strides and layout offsets are
//! read in place (a candle `[B, H, S, D]` tensor's `.transpose(1, 2)?` view
//! needs no copy); only a view whose last dimension is not contiguous is
//! copied first.
//!
//! **Devices.** On the CPU the op runs the crate's reference
//! ([`reference::forward`]: f64, multi-threaded, rounded once to the
//! inputs' dtype). With the cargo feature `candle-cuda`, candle CUDA
//! tensors run our kernels ([`Attention::forward_into`](crate::Attention::forward_into))
//! on candle's own stream: strides and offsets are read in place, nothing
//! waits on the host, the output is a fresh contiguous tensor, and ALiBi
//! slopes or sinks given as CPU tensors are moved to the device. Without
//! that feature a CUDA tensor gets candle's "no cuda implementation" error.
//! `candle-cuda` turns on candle-core's `cuda` feature, which builds
//! candle's own kernels with nvcc (8–9 minutes on 2 cores) and links the
//! CUDA libraries at build time; it yields cudarc's loading to that linking
//! (this crate asks cudarc for `fallback-dynamic-loading`).
//!
//! **Training.** The `flash_attn*` functions (and `q.apply_op3(&k, &v,
//! FusedAttn::new(..))`) record the op for candle's autograd, which
//! candle-flash-attn, forward-only, cannot. On CPU tensors its `bwd`
//! returns [`reference::backward`]'s gradients of Q, K and V; on CUDA
//! tensors (`candle-cuda`) it recomputes the forward's log-sum-exp, which
//! candle does not keep, and runs the tiled backward kernels
//! ([`Attention::backward_into`](crate::Attention::backward_into)). ALiBi
//! slopes and sinks are constants there. The packed-batch functions stay
//! forward-only.
//!
//! **Migrating from candle-flash-attn** is a change of path:
//! `candle_flash_attn::flash_attn(&q, &k, &v, scale, causal)` becomes
//! `fused_attn::candle_ops::flash_attn(&q, &k, &v, scale, causal)`.
//! Masks follow candle-flash-attn (FlashAttention 2): causal and windows are
//! aligned to the bottom-right corner of the `Lq × Lk` score matrix, and a
//! window size larger than `Lk` means unbounded. ALiBi (`flash_attn_alibi*`,
//! slopes `[Hq]` f32 as there, or `[B, Hq]`) and the packed-batch
//! `flash_attn_varlen*` ([`FusedAttnVarLen`]) are offered. Attention sinks,
//! which candle-flash-attn lacks, are on [`FusedAttn::with_sinks`].
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use fused_attn::candle_ops;
//!
//! # fn main() -> candle_core::Result<()> {
//! // [B, H, S, D] as candle models keep them; transposed views are fine.
//! let q = Tensor::randn(0f32, 1., (1, 4, 16, 64), &Device::Cpu)?.to_dtype(DType::BF16)?;
//! let o = candle_ops::flash_attn(&q.transpose(1, 2)?, &q.transpose(1, 2)?, &q.transpose(1, 2)?, 0.125, true)?;
//! assert_eq!(o.dims(), &[1, 16, 4, 64]);
//! # Ok(()) }
//! ```

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Shape, Tensor};
use half::{bf16, f16};

#[cfg(feature = "candle-cuda")]
#[path = "candle_cuda.rs"]
mod cuda;

use crate::options::{Alibi, AttentionOptions, HeadValues, Mask};
use crate::reference;
use crate::tensor::{Element, HostTensor, Layout};

/// Attention as a candle [`CustomOp3`] with this crate's full
/// [`AttentionOptions`] (mask and its alignment, scale, softcap).
///
/// Apply it with `q.apply_op3(&k, &v, FusedAttn::new(options))`; the
/// `flash_attn*` functions build it for you.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use fused_attn::candle_ops::FusedAttn;
/// use fused_attn::{AttentionOptions, Mask, MaskAlignment};
///
/// # fn main() -> candle_core::Result<()> {
/// let q = Tensor::randn(0f32, 1., (2, 3, 4, 32), &Device::Cpu)?.to_dtype(DType::F16)?;
/// let kv = Tensor::randn(0f32, 1., (2, 5, 2, 32), &Device::Cpu)?.to_dtype(DType::F16)?;
/// // PyTorch SDPA's top-left causal mask, with GQA 4:2.
/// let sdpa = AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft);
/// let o = q.apply_op3(&kv, &kv, FusedAttn::new(sdpa))?;
/// assert_eq!(o.dims(), &[2, 3, 4, 32]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FusedAttn {
    /// What the attention computes; `kernel` and `kernel_name` only matter
    /// on the GPU. Its `alibi` and `sinks` are unused: the op takes them as
    /// candle tensors (below).
    pub options: AttentionOptions<'static>,
    /// ALiBi slopes, f32 `[Hq]` or `[B, Hq]` (see [`Alibi`]).
    pub alibi_slopes: Option<Tensor>,
    /// Attention-sink logits, f32 `[Hq]` (see
    /// [`AttentionOptions::sinks`](crate::AttentionOptions::sinks)).
    pub sinks: Option<Tensor>,
}

impl FusedAttn {
    /// The op with the given options, no ALiBi, no sinks.
    pub fn new(options: AttentionOptions<'static>) -> Self {
        FusedAttn { options, alibi_slopes: None, sinks: None }
    }
    /// With ALiBi slopes: an f32 tensor `[Hq]`, or `[B, Hq]` for slopes per batch entry.
    pub fn with_alibi_slopes(mut self, slopes: Tensor) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    /// With attention-sink logits: an f32 tensor `[Hq]`.
    pub fn with_sinks(mut self, sinks: Tensor) -> Self {
        self.sinks = Some(sinks);
        self
    }
}

/// candle-flash-attn's mask for window sizes `window_size_left`,
/// `window_size_right` over `seqlen_k` keys, as its CUDA op computes it: a
/// size above `seqlen_k` counts as `None` (unbounded); both `None` is full
/// attention, `(None, Some(0))` is causal, and one `None` beside a bound
/// becomes `seqlen_k`. Always bottom-right aligned (FlashAttention ≥ 2.1).
pub fn flash_window_mask(window_size_left: Option<usize>, window_size_right: Option<usize>, seqlen_k: usize) -> Mask {
    let left = window_size_left.filter(|&w| w <= seqlen_k);
    let right = window_size_right.filter(|&w| w <= seqlen_k);
    match (left, right) {
        (None, None) => Mask::Full,
        (None, Some(0)) => Mask::Causal,
        (left, right) => Mask::window(left.unwrap_or(seqlen_k), right.unwrap_or(seqlen_k)),
    }
}

/// Options for candle-flash-attn-style arguments on `k`'s sequence length.
fn flash_options(
    k: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: Option<f32>,
) -> candle_core::Result<AttentionOptions<'static>> {
    let (_, seqlen_k, _, _) = k.dims4()?;
    let mask = flash_window_mask(window_size_left, window_size_right, seqlen_k);
    let opts = AttentionOptions::new(mask).with_scale(softmax_scale);
    Ok(match softcap {
        Some(c) => opts.with_softcap(c),
        None => opts,
    })
}

/// `softmax(softmax_scale · Q Kᵀ) V`, causal (bottom-right aligned) or
/// full: candle-flash-attn's `flash_attn`, same arguments.
///
/// `q` is `[B, Lq, Hq, D]`, `k` and `v` `[B, Lk, Hk, D]` with
/// `Hq % Hk == 0` (GQA/MQA); the result is `[B, Lq, Hq, D]`.
///
/// # Errors
/// A candle error for tensors that are not rank 4, not f16/bf16, of mixed
/// dtypes, or on a CUDA device without the `candle-cuda` feature; this crate's validation errors
/// ([`Error`](crate::Error), message kept) for shapes outside the contract.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32, causal: bool) -> candle_core::Result<Tensor> {
    let right = if causal { Some(0) } else { None };
    let opts = flash_options(k, softmax_scale, None, right, None)?;
    q.apply_op3(k, v, FusedAttn::new(opts))
}

/// Local (sliding-window) attention: candle-flash-attn's
/// `flash_attn_windowed`, same arguments and semantics (see
/// [`flash_window_mask`]; `(None, Some(0))` is causal).
///
/// # Errors
/// As [`flash_attn`].
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> candle_core::Result<Tensor> {
    let opts = flash_options(k, softmax_scale, window_size_left, window_size_right, None)?;
    q.apply_op3(k, v, FusedAttn::new(opts))
}

/// Windowed attention with a Gemma-2-style logit softcap
/// (`s ← softcap · tanh(s / softcap)`): [`flash_attn_alibi_windowed_softcap`]
/// without ALiBi.
///
/// # Errors
/// As [`flash_attn`]; a softcap that is not finite and positive is an
/// [`Error::InvalidOption`](crate::Error::InvalidOption).
pub fn flash_attn_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> candle_core::Result<Tensor> {
    let opts = flash_options(k, softmax_scale, window_size_left, window_size_right, Some(softcap))?;
    q.apply_op3(k, v, FusedAttn::new(opts))
}

/// [`flash_attn`] with ALiBi: candle-flash-attn's `flash_attn_alibi`, same
/// arguments. `alibi_slopes` is an f32 tensor `[Hq]` (as candle-flash-attn
/// takes it) or `[B, Hq]`; the bias `−slope·|i + Lk − Lq − j|` is added to
/// the scaled scores (FlashAttention 2's convention).
///
/// # Errors
/// As [`flash_attn`]; slopes that are not f32, not rank 1 or 2, too few, or
/// not finite are errors.
pub fn flash_attn_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let right = if causal { Some(0) } else { None };
    flash_attn_alibi_windowed(q, k, v, alibi_slopes, softmax_scale, None, right)
}

/// [`flash_attn_windowed`] with ALiBi: candle-flash-attn's
/// `flash_attn_alibi_windowed`, same arguments.
///
/// # Errors
/// As [`flash_attn_alibi`].
pub fn flash_attn_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> candle_core::Result<Tensor> {
    let opts = flash_options(k, softmax_scale, window_size_left, window_size_right, None)?;
    q.apply_op3(k, v, FusedAttn::new(opts).with_alibi_slopes(alibi_slopes.clone()))
}

/// Windowed attention with optional ALiBi and a softcap: candle-flash-attn's
/// `flash_attn_alibi_windowed_softcap`, same arguments (the softcap comes
/// before ALiBi, as in FlashAttention 2).
///
/// # Errors
/// As [`flash_attn_alibi`] and [`flash_attn_windowed_softcap`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> candle_core::Result<Tensor> {
    let opts = flash_options(k, softmax_scale, window_size_left, window_size_right, Some(softcap))?;
    let mut op = FusedAttn::new(opts);
    op.alibi_slopes = alibi_slopes.cloned();
    q.apply_op3(k, v, op)
}

/// Attention over a packed (variable-length) batch as a candle
/// [`CustomOp3`]: Q `[Tq, Hq, D]`, K and V `[Tk, Hk, D]`, sequence `b`
/// being rows `seqlens_q[b] .. seqlens_q[b + 1]` of Q (and likewise of K,
/// V), each with its own bottom-right diagonal; the result is `[Tq, Hq, D]`.
/// Built by the `flash_attn_varlen*` functions.
#[derive(Debug, Clone)]
pub struct FusedAttnVarLen {
    /// Mask, scale, softcap (`alibi` and `sinks` unused: see the fields below).
    pub options: AttentionOptions<'static>,
    /// Cumulative query lengths `[B + 1]` (u32, as candle-flash-attn takes them, or i64).
    pub seqlens_q: Tensor,
    /// Cumulative key lengths `[B + 1]`.
    pub seqlens_k: Tensor,
    /// Upper bound of the query lengths (checked).
    pub max_seqlen_q: usize,
    /// Upper bound of the key lengths (checked); window sizes above it mean unbounded.
    pub max_seqlen_k: usize,
    /// ALiBi slopes, f32 `[Hq]` or `[B, Hq]`.
    pub alibi_slopes: Option<Tensor>,
}

/// A sequence table (u32 or i64 CPU tensor of rank 1) as i32 offsets.
fn seqlens(arg: &str, t: &Tensor) -> candle_core::Result<Vec<i32>> {
    if t.rank() != 1 {
        candle_core::bail!("fused-attn: {arg} must be rank 1 [batch + 1], got shape {:?}", t.shape());
    }
    let v = match t.dtype() {
        candle_core::DType::U32 | candle_core::DType::I64 => t.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?,
        other => candle_core::bail!("fused-attn: {arg} must be u32 or i64, got {other:?}"),
    };
    v.into_iter()
        .map(|x| {
            i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("fused-attn: {arg} entry {x} exceeds i32")))
        })
        .collect()
}

impl FusedAttnVarLen {
    /// The cumulative tables as i32 host values, checked against the
    /// `max_seqlen_*` bounds. (Tables on the device are read back: a host
    /// sync, which CPU tables avoid.)
    fn tables(&self) -> candle_core::Result<(Vec<i32>, Vec<i32>)> {
        let (cu_q, cu_k) = (seqlens("seqlens_q", &self.seqlens_q)?, seqlens("seqlens_k", &self.seqlens_k)?);
        let longest = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]).max(0) as usize).max().unwrap_or(0);
        if longest(&cu_q) > self.max_seqlen_q || longest(&cu_k) > self.max_seqlen_k {
            candle_core::bail!(
                "fused-attn: a sequence is longer than max_seqlen_q {} / max_seqlen_k {}",
                self.max_seqlen_q,
                self.max_seqlen_k
            );
        }
        Ok((cu_q, cu_k))
    }

    fn cpu_fwd_t<T: Element>(
        &self,
        (q, q_l): (&[T], &candle_core::Layout),
        (k, k_l): (&[T], &candle_core::Layout),
        (v, v_l): (&[T], &candle_core::Layout),
        from_f64: fn(f64) -> T,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (cu_q, cu_k) = self.tables()?;
        let (q, ql) = host_view3("q", q, q_l)?;
        let (k, kl) = host_view3("k", k, k_l)?;
        let (v, vl) = host_view3("v", v, v_l)?;
        let slopes = self.alibi_slopes.as_ref().map(|t| f32_values("alibi_slopes", t)).transpose()?;
        let mut opts: AttentionOptions<'_> = self.options;
        opts.alibi = slopes.as_ref().map(|(s, rank)| Alibi { slopes: HeadValues::Host(s), per_batch: *rank == 2 });
        let r = reference::forward_varlen(
            HostTensor::new(&q, ql),
            HostTensor::new(&k, kl),
            HostTensor::new(&v, vl),
            &cu_q,
            &cu_k,
            None,
            &opts,
        )
        .map_err(candle_core::Error::wrap)?;
        let shape = Shape::from((ql.shape[1], ql.shape[2], ql.shape[3]));
        Ok((r.o.into_iter().map(from_f64).collect(), shape))
    }
}

/// A rank-3 `[T, H, D]` candle CPU tensor as a `[1, T, H, D]` [`HostTensor`]
/// view (copied only when its last dimension is not contiguous).
fn host_view3<'a, T: Copy>(
    arg: &str,
    data: &'a [T],
    l: &candle_core::Layout,
) -> candle_core::Result<(Cow<'a, [T]>, Layout)> {
    if l.dims().len() != 3 {
        candle_core::bail!("fused-attn: {arg} must be rank 3 [tokens, heads, head_dim], got shape {:?}", l.shape());
    }
    let (d, st) = (l.dims(), l.stride());
    let l4 = candle_core::Layout::new(
        Shape::from((1, d[0], d[1], d[2])),
        vec![d[0] * st[0].max(1), st[0], st[1], st[2]],
        l.start_offset(),
    );
    host_view(arg, data, &l4)
}

impl CustomOp3 for FusedAttnVarLen {
    fn name(&self) -> &'static str {
        "fused-attn-varlen"
    }

    /// Our kernels on candle's stream (feature `candle-cuda`); the sequence
    /// tables are read on the host (pass them as CPU tensors to avoid a
    /// device-to-host copy) and uploaded.
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &candle_core::Layout,
        k: &candle_core::CudaStorage,
        k_l: &candle_core::Layout,
        v: &candle_core::CudaStorage,
        v_l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_fwd_impl((q, q_l), (k, k_l), (v, v_l))
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &candle_core::Layout,
        k: &CpuStorage,
        k_l: &candle_core::Layout,
        v: &CpuStorage,
        v_l: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_by_dtype(
            (q, q_l),
            (k, k_l),
            (v, v_l),
            |q, k, v| self.cpu_fwd_t(q, k, v, f16::from_f64),
            |q, k, v| self.cpu_fwd_t(q, k, v, bf16::from_f64),
        )
    }
}

/// Packed-batch attention: candle-flash-attn's `flash_attn_varlen`, same
/// arguments. `q` is `[Tq, Hq, D]`, `k` and `v` `[Tk, Hk, D]`;
/// `seqlens_q`/`seqlens_k` are the cumulative lengths `[B + 1]` (u32);
/// each sequence's causal mask is bottom-right aligned on its own lengths.
///
/// # Errors
/// As [`flash_attn`]; malformed sequence tables are this crate's
/// [`Error::SeqLens`](crate::Error::SeqLens), a sequence longer than
/// `max_seqlen_*` is an error.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let right = if causal { Some(0) } else { None };
    varlen_op(q, k, v, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k), softmax_scale, (None, right), None, None)
}

/// [`flash_attn_varlen`] with a window: candle-flash-attn's
/// `flash_attn_varlen_windowed` (window sizes above `max_seqlen_k` mean
/// unbounded, as there).
///
/// # Errors
/// As [`flash_attn_varlen`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> candle_core::Result<Tensor> {
    let window = (window_size_left, window_size_right);
    varlen_op(q, k, v, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k), softmax_scale, window, None, None)
}

/// [`flash_attn_varlen`] with ALiBi: candle-flash-attn's
/// `flash_attn_varlen_alibi` (slopes f32 `[Hq]`, or `[B, Hq]`).
///
/// # Errors
/// As [`flash_attn_varlen`] and [`flash_attn_alibi`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let right = if causal { Some(0) } else { None };
    let lens = (seqlens_q, seqlens_k);
    varlen_op(q, k, v, lens, (max_seqlen_q, max_seqlen_k), softmax_scale, (None, right), Some(alibi_slopes), None)
}

/// [`flash_attn_varlen_windowed`] with ALiBi and an optional softcap:
/// candle-flash-attn's `flash_attn_varlen_alibi_windowed` plus a softcap.
///
/// # Errors
/// As [`flash_attn_varlen_alibi`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: Option<f32>,
) -> candle_core::Result<Tensor> {
    let (lens, max, window) =
        ((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k), (window_size_left, window_size_right));
    varlen_op(q, k, v, lens, max, softmax_scale, window, alibi_slopes, softcap)
}

#[allow(clippy::too_many_arguments)]
fn varlen_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (seqlens_q, seqlens_k): (&Tensor, &Tensor),
    (max_seqlen_q, max_seqlen_k): (usize, usize),
    softmax_scale: f32,
    (left, right): (Option<usize>, Option<usize>),
    alibi_slopes: Option<&Tensor>,
    softcap: Option<f32>,
) -> candle_core::Result<Tensor> {
    let mut options = AttentionOptions::new(flash_window_mask(left, right, max_seqlen_k)).with_scale(softmax_scale);
    options.softcap = softcap;
    let op = FusedAttnVarLen {
        options,
        seqlens_q: seqlens_q.clone(),
        seqlens_k: seqlens_k.clone(),
        max_seqlen_q,
        max_seqlen_k,
        alibi_slopes: alibi_slopes.cloned(),
    };
    q.apply_op3_no_bwd(k, v, &op)
}

/// One dtype's slices and layout, as the CPU ops take them.
type Arg<'a, T> = (&'a [T], &'a candle_core::Layout);
/// An op's result: O's data and shape.
type Out<T> = candle_core::Result<(Vec<T>, Shape)>;

/// The CPU ops' dtype dispatch: `f16` or `bf16` runs on all-f16 or all-bf16
/// storages, anything else is an error naming the dtypes.
fn cpu_by_dtype<'a>(
    (q, q_l): (&'a CpuStorage, &'a candle_core::Layout),
    (k, k_l): (&'a CpuStorage, &'a candle_core::Layout),
    (v, v_l): (&'a CpuStorage, &'a candle_core::Layout),
    f16: impl FnOnce(Arg<'a, f16>, Arg<'a, f16>, Arg<'a, f16>) -> Out<f16>,
    bf16: impl FnOnce(Arg<'a, bf16>, Arg<'a, bf16>, Arg<'a, bf16>) -> Out<bf16>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    match (q, k, v) {
        (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
            let (o, shape) = f16((q, q_l), (k, k_l), (v, v_l))?;
            Ok((CpuStorage::F16(o), shape))
        }
        (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
            let (o, shape) = bf16((q, q_l), (k, k_l), (v, v_l))?;
            Ok((CpuStorage::BF16(o), shape))
        }
        _ => candle_core::bail!(
            "fused-attn: q, k and v must all be f16 or all bf16, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        ),
    }
}

/// An f32 CPU tensor of rank 1 or 2 as host values, with its rank.
fn f32_values(arg: &str, t: &Tensor) -> candle_core::Result<(Vec<f32>, usize)> {
    if t.dtype() != candle_core::DType::F32 {
        candle_core::bail!("fused-attn: {arg} must be f32, got {:?}", t.dtype());
    }
    let rank = t.rank();
    if !(1..=2).contains(&rank) {
        candle_core::bail!("fused-attn: {arg} must be [heads] or [batch, heads], got shape {:?}", t.shape());
    }
    Ok((t.flatten_all()?.to_vec1::<f32>()?, rank))
}

/// A candle CPU tensor's data as a [`HostTensor`]: in place when its last
/// dimension is contiguous, else copied to a contiguous `[B, L, H, D]`.
fn host_view<'a, T: Copy>(
    arg: &str,
    data: &'a [T],
    l: &candle_core::Layout,
) -> candle_core::Result<(Cow<'a, [T]>, Layout)> {
    let (dims, strides) = (l.dims(), l.stride());
    if dims.len() != 4 {
        candle_core::bail!("fused-attn: {arg} must be rank 4 [batch, seq, heads, head_dim], got shape {:?}", l.shape());
    }
    let shape = [dims[0], dims[1], dims[2], dims[3]];
    if strides[3] == 1 {
        let start = l.start_offset().min(data.len());
        let strides = [strides[0], strides[1], strides[2], 1];
        return Ok((Cow::Borrowed(&data[start..]), Layout::strided_bshd(shape, strides)));
    }
    // candle's layouts stay inside their storage; a `get` miss would be a candle bug.
    let mut copy = Vec::with_capacity(shape.iter().product());
    for b in 0..shape[0] {
        for s in 0..shape[1] {
            for h in 0..shape[2] {
                for d in 0..shape[3] {
                    let at = l.start_offset() + b * strides[0] + s * strides[1] + h * strides[2] + d * strides[3];
                    match data.get(at) {
                        Some(&x) => copy.push(x),
                        None => candle_core::bail!("fused-attn: {arg}'s layout {l:?} reaches past its storage"),
                    }
                }
            }
        }
    }
    Ok((Cow::Owned(copy), Layout::bshd(shape[0], shape[1], shape[2], shape[3])))
}

impl FusedAttn {
    /// The reference on one dtype's slices.
    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd_t<T: Element>(
        &self,
        q: &[T],
        q_l: &candle_core::Layout,
        k: &[T],
        k_l: &candle_core::Layout,
        v: &[T],
        v_l: &candle_core::Layout,
        from_f64: fn(f64) -> T,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (q, ql) = host_view("q", q, q_l)?;
        let (k, kl) = host_view("k", k, k_l)?;
        let (v, vl) = host_view("v", v, v_l)?;
        let slopes = self.alibi_slopes.as_ref().map(|t| f32_values("alibi_slopes", t)).transpose()?;
        let sinks = self.sinks.as_ref().map(|t| f32_values("sinks", t)).transpose()?;
        if let Some((_, 2)) = sinks {
            candle_core::bail!("fused-attn: sinks must be [heads] (one logit per query head)");
        }
        let mut opts: AttentionOptions<'_> = self.options;
        opts.alibi = slopes.as_ref().map(|(s, rank)| Alibi { slopes: HeadValues::Host(s), per_batch: *rank == 2 });
        opts.sinks = sinks.as_ref().map(|(s, _)| HeadValues::Host(s));
        let r = reference::forward(HostTensor::new(&q, ql), HostTensor::new(&k, kl), HostTensor::new(&v, vl), &opts)
            .map_err(candle_core::Error::wrap)?;
        let p = &r.problem;
        let shape = Shape::from((p.batch, p.seqlen_q, p.heads_q, p.head_dim));
        Ok((r.o.into_iter().map(from_f64).collect(), shape))
    }
}

impl FusedAttn {
    /// The reference gradients (f64, rounded once to `T`) of one dtype's
    /// CPU tensors.
    fn cpu_bwd_t<T: Element + candle_core::WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
        from_f64: fn(f64) -> T,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let host = |arg: &str, t: &Tensor| -> candle_core::Result<(Vec<T>, Layout)> {
            let dims = t.dims();
            if dims.len() != 4 {
                candle_core::bail!("fused-attn: {arg} must be rank 4 [batch, seq, heads, head_dim], got {:?}", dims);
            }
            Ok((t.flatten_all()?.to_vec1::<T>()?, Layout::bshd(dims[0], dims[1], dims[2], dims[3])))
        };
        let ((q_h, ql), (k_h, kl), (v_h, vl), (do_h, dol)) =
            (host("q", q)?, host("k", k)?, host("v", v)?, host("grad", d_o)?);
        let slopes = self.alibi_slopes.as_ref().map(|t| f32_values("alibi_slopes", t)).transpose()?;
        let sinks = self.sinks.as_ref().map(|t| f32_values("sinks", t)).transpose()?;
        let mut opts: AttentionOptions<'_> = self.options;
        opts.alibi = slopes.as_ref().map(|(s, rank)| Alibi { slopes: HeadValues::Host(s), per_batch: *rank == 2 });
        opts.sinks = sinks.as_ref().map(|(s, _)| HeadValues::Host(s));
        let g = reference::backward(
            HostTensor::new(&q_h, ql),
            HostTensor::new(&k_h, kl),
            HostTensor::new(&v_h, vl),
            HostTensor::new(&do_h, dol),
            &opts,
        )
        .map_err(candle_core::Error::wrap)?;
        let tensor = |x: Vec<f64>, like: &Tensor| {
            Tensor::from_vec(x.into_iter().map(from_f64).collect::<Vec<T>>(), like.shape(), like.device())
        };
        Ok((Some(tensor(g.dq, q)?), Some(tensor(g.dk, k)?), Some(tensor(g.dv, v)?)))
    }
}

impl CustomOp3 for FusedAttn {
    fn name(&self) -> &'static str {
        "fused-attn"
    }

    /// The gradients of Q, K and V on CPU tensors: [`reference::backward`]
    /// (f64, rounded once to the inputs' dtype). ALiBi slopes and sink
    /// logits are constants of the op here (no gradient; the GPU backward
    /// has `Gradients::with_dsinks`). candle CUDA tensors: not yet.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_o = grad_res.to_dtype(q.dtype())?;
        #[cfg(feature = "candle-cuda")]
        if q.device().is_cuda() {
            return self.cuda_bwd(q, k, v, &d_o);
        }
        if !q.device().is_cpu() {
            candle_core::bail!(
                "fused-attn: the backward runs on CPU tensors, and on CUDA tensors with the `candle-cuda` feature"
            );
        }
        match q.dtype() {
            candle_core::DType::F16 => self.cpu_bwd_t(q, k, v, &d_o, f16::from_f64),
            candle_core::DType::BF16 => self.cpu_bwd_t(q, k, v, &d_o, bf16::from_f64),
            other => candle_core::bail!("fused-attn: q, k and v must be f16 or bf16, got {other:?}"),
        }
    }

    /// Our kernels on candle's stream (feature `candle-cuda`): any strides
    /// and offsets read in place, the output a fresh contiguous tensor.
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &candle_core::Layout,
        k: &candle_core::CudaStorage,
        k_l: &candle_core::Layout,
        v: &candle_core::CudaStorage,
        v_l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_fwd_impl((q, q_l), (k, k_l), (v, v_l))
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &candle_core::Layout,
        k: &CpuStorage,
        k_l: &candle_core::Layout,
        v: &CpuStorage,
        v_l: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_by_dtype(
            (q, q_l),
            (k, k_l),
            (v, v_l),
            |(q, ql), (k, kl), (v, vl)| self.cpu_fwd_t(q, ql, k, kl, v, vl, f16::from_f64),
            |(q, ql), (k, kl), (v, vl)| self.cpu_fwd_t(q, ql, k, kl, v, vl, bf16::from_f64),
        )
    }
}
