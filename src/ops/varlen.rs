//! Packed variable-length batches (DESIGN.md section 1b): the sequences of a
//! batch laid end to end, `[T, H, D]` tensors plus `cu_seqlens` tables.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::device::{Attention, Tables};
use crate::dispatch::KernelInfo;
use crate::error::{Error, Result};
use crate::options::AttentionOptions;
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, LseTensorMut};
use crate::validate::{check_seqlens, validate_varlen, SeqInfo};

/// The sequence tables of a packed batch, checked on the host once and
/// uploaded once, then reused by every call over that batch (so a call
/// neither reads device memory back nor allocates).
///
/// Sequence `b` is query rows `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]` and
/// key rows `cu_seqlens_k[b] .. cu_seqlens_k[b + 1]`, of which it uses the
/// first `seqused_k[b]` when that table is given. Each sequence has its own
/// mask diagonal (`Lk_b − Lq_b` bottom-right); no key of another sequence is
/// ever visible.
///
/// ```no_run
/// # fn main() -> fused_attn::Result<()> {
/// use fused_attn::{cuda_context, SeqLens};
/// let ctx = cuda_context(0)?;
/// let stream = ctx.default_stream();
/// // Three prompts of 5, 0 and 7 tokens attending to themselves.
/// let seq = SeqLens::new(&stream, &[0, 5, 5, 12], &[0, 5, 5, 12], None)?;
/// assert_eq!((seq.batch(), seq.max_seqlen_q()), (3, 7));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SeqLens {
    pub(crate) info: SeqInfo,
    pub(crate) cu_q: CudaSlice<i32>,
    pub(crate) cu_k: CudaSlice<i32>,
    pub(crate) seqused_k: Option<CudaSlice<i32>>,
}

impl SeqLens {
    /// Checks the tables (`B + 1` entries each, starting at 0, never
    /// decreasing; `seqused_k`: `B` entries within each sequence's keys) and
    /// copies them to the device on `stream`.
    ///
    /// # Errors
    /// [`Error::SeqLens`] naming the table and entry at fault (nothing is
    /// allocated then); [`Error::Cuda`] if the upload fails.
    pub fn new(
        stream: &Arc<CudaStream>,
        cu_seqlens_q: &[i32],
        cu_seqlens_k: &[i32],
        seqused_k: Option<&[i32]>,
    ) -> Result<Self> {
        let info = check_seqlens(cu_seqlens_q, cu_seqlens_k, seqused_k)?;
        let up = |x: &[i32]| {
            stream.clone_htod(x).map_err(|driver| Error::Cuda { during: "uploading sequence tables", driver })
        };
        Ok(SeqLens {
            info,
            cu_q: up(cu_seqlens_q)?,
            cu_k: up(cu_seqlens_k)?,
            seqused_k: seqused_k.map(up).transpose()?,
        })
    }

    /// Number of sequences `B`.
    pub fn batch(&self) -> usize {
        self.info.batch
    }

    /// Query tokens in all (`cu_seqlens_q[B]`).
    pub fn total_q(&self) -> usize {
        self.info.total_q
    }

    /// Key tokens in all (`cu_seqlens_k[B]`).
    pub fn total_k(&self) -> usize {
        self.info.total_k
    }

    /// The longest query sequence.
    pub fn max_seqlen_q(&self) -> usize {
        self.info.max_q
    }

    /// The longest key sequence (after `seqused_k`).
    pub fn max_seqlen_k(&self) -> usize {
        self.info.max_k
    }
}

impl Attention {
    /// Attention over a packed batch into caller-owned buffers.
    ///
    /// `q` and `o` are `[1, Tq, Hq, D]` and `k`, `v` `[1, Tk, Hk, D]`
    /// (the tokens of all sequences end to end: `Layout::bshd(1, T, H, D)`,
    /// or any strides with the last one 1); `lse`, if given, is `[1, Hq, Tq]`
    /// (natural log, `-inf` for rows with no visible key). Every mask applies
    /// per sequence, with each sequence's own bottom-right (or top-left)
    /// diagonal. Asynchronous on `stream`; no host allocation and no device
    /// read-back, so it can be captured in a CUDA graph like
    /// [`forward_into`](Self::forward_into).
    ///
    /// Served by every kernel family (the Hopper kernels' persistent
    /// variants excepted): on an H100 the Hopper kernels run it.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into), plus [`Error::SeqLens`] when
    /// a table's total differs from its tensor's tokens and
    /// [`Error::ShapeMismatch`] for a packed tensor whose batch extent is not 1.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_varlen_into<T: Element>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
        seqlens: &SeqLens,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        let tables = ("seqlens", seqlens.cu_q.stream().context());
        let (descs, lse_desc) = self.describe_call(stream, ["q", "k", "v", "o"], q, k, v, o, lse.as_deref(), tables)?;
        let p = validate_varlen(
            T::DTYPE,
            &descs[0],
            &descs[1],
            &descs[2],
            Some(&descs[3]),
            lse_desc.as_ref(),
            &seqlens.info,
            opts,
        )?;
        self.launch_forward_seq(stream, &p, &descs, q, k, v, o, lse, Some(Tables::Varlen(seqlens)), None, opts)
    }
}
