//! The merge of attention states (DESIGN.md section 1b): partial results over
//! disjoint key sets of the same rows, combined exactly by their LSE. The
//! combine step of split-KV decoding, and the building block of cascade
//! (shared-prefix) attention and of context parallelism across GPUs.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use super::desc;
use crate::device::{launch_merge, Attention};
use crate::error::Result;
use crate::params::{merge_params, merge_part};
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, LseTensor, LseTensorMut};
use crate::validate::{validate_merge, LseDesc, TensorDesc, MAX_MERGE_PARTS};

/// One partial attention state on the device: O `[B, L, H, D]` over some
/// set of keys and its LSE `[B, H, L]`, as a forward call with an LSE output
/// leaves them.
#[derive(Debug)]
pub struct PartialState<'a, T> {
    /// The partial output.
    pub o: DeviceTensor<'a, T>,
    /// Its log-sum-exp (natural log, `-inf` for rows that saw no key).
    pub lse: LseTensor<'a>,
}

impl Attention {
    /// Merges partial attention states of the same rows over disjoint key
    /// sets into caller-owned `o` `[B, L, H, D]` and optionally `lse`
    /// `[B, H, L]`: `LSE = log Σ_s e^{LSE_s}`, `O = Σ_s e^{LSE_s − LSE} O_s`
    /// (DESIGN.md section 1b), evaluated from the largest `LSE_s` in f32 so
    /// that nothing overflows; a part whose row saw no key (`LSE_s = −∞`)
    /// weighs exactly 0 and its O is not read, and a row no part saw gets
    /// `O = 0`, `LSE = −∞`. 1 to 8 parts, each on its own strides; the result
    /// equals one attention call over the union of the keys, up to rounding.
    ///
    /// ```no_run
    /// # use fused_attn::*;
    /// # fn demo(attn: &Attention, stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    /// #   o_a: &cudarc::driver::CudaSlice<half::bf16>, lse_a: &cudarc::driver::CudaSlice<f32>,
    /// #   o_b: &cudarc::driver::CudaSlice<half::bf16>, lse_b: &cudarc::driver::CudaSlice<f32>,
    /// #   o: &mut cudarc::driver::CudaSlice<half::bf16>) -> Result<()> {
    /// // Attention over a shared prefix (a) and each sequence's own suffix (b),
    /// // computed by two forward calls with LSE outputs, merged:
    /// let (l, ll) = (Layout::bshd(4, 1, 32, 128), LseLayout::contiguous(4, 32, 1));
    /// let parts = [
    ///     PartialState { o: DeviceTensor::new(o_a, l), lse: LseTensor::new(lse_a, ll) },
    ///     PartialState { o: DeviceTensor::new(o_b, l), lse: LseTensor::new(lse_b, ll) },
    /// ];
    /// attn.merge_states_into(stream, &parts, &mut DeviceTensorMut::new(o, l), None)?;
    /// # Ok(()) }
    /// ```
    ///
    /// Asynchronous on `stream`; no host allocation, no device read-back.
    ///
    /// # Errors
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) (`parts`) for
    /// no part or more than 8; the validation errors of
    /// [`forward_into`](Self::forward_into) for each tensor (a part's named
    /// `parts.o` / `parts.lse`) and [`Error::ShapeMismatch`](crate::Error::ShapeMismatch)
    /// for a part of another shape than `o`;
    /// [`Error::ForeignContext`](crate::Error::ForeignContext) for a buffer
    /// or stream of another context; [`Error::Cuda`](crate::Error::Cuda) if
    /// the launch fails.
    pub fn merge_states_into<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        parts: &[PartialState<'_, T>],
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut LseTensorMut<'_>>,
    ) -> Result<()> {
        self.check_context("stream", stream.context())?;
        for p in parts {
            self.check_context("parts.o", p.o.view.stream().context())?;
            self.check_context("parts.lse", p.lse.view.stream().context())?;
        }
        self.check_context("o", o.view.stream().context())?;
        if let Some(l) = &lse {
            self.check_context("lse", l.view.stream().context())?;
        }
        let part_desc = |p: &PartialState<'_, T>| {
            (desc("parts.o", &p.o.view, p.o.layout), LseDesc { layout: p.lse.layout, len: p.lse.view.len() })
        };
        // Fixed-size descriptors (no allocation); validate_merge refuses more than fit.
        let empty = (TensorDesc { arg: "parts.o", layout: o.layout, len: 0 }, LseDesc { layout: o_lse(o), len: 0 });
        let mut descs = [empty; MAX_MERGE_PARTS + 1];
        for (d, p) in descs.iter_mut().zip(parts) {
            *d = part_desc(p);
        }
        let n = parts.len().min(MAX_MERGE_PARTS + 1);
        let lse_desc = lse.as_ref().map(|l| LseDesc { layout: l.layout, len: l.view.len() });
        let m = validate_merge(T::DTYPE, &descs[..n], &desc("o", &o.view, o.layout), lse_desc.as_ref())?;
        if m.batch == 0 || m.seqlen == 0 || m.heads == 0 {
            return Ok(()); // nothing to write; a zero-sized grid is a launch error
        }
        let func = self.merge_function(T::DTYPE, false)?;
        // The guards make `stream` wait for earlier writes to these buffers and
        // record this launch's reads and writes when dropped after it.
        let o_ptrs: [Option<_>; MAX_MERGE_PARTS] =
            std::array::from_fn(|i| parts.get(i).map(|p| p.o.view.device_ptr(stream)));
        let l_ptrs: [Option<_>; MAX_MERGE_PARTS] =
            std::array::from_fn(|i| parts.get(i).map(|p| p.lse.view.device_ptr(stream)));
        let (out_layout, no_lse) = (o.layout, o_lse(o));
        let (out_ptr, _out_sync) = o.view.device_ptr_mut(stream);
        let (lse_layout, (lse_ptr, _lse_sync)) = match lse {
            Some(l) => {
                let (ptr, sync) = l.view.device_ptr_mut(stream);
                (l.layout, (ptr, Some(sync)))
            }
            None => (no_lse, (0, None)),
        };
        let (s, ls) = (out_layout.strides, lse_layout.strides);
        let out = merge_part(out_ptr, [s[0], s[1], s[2]], lse_ptr, [ls[0], ls[1]]);
        let mut params = merge_params(out, m.parts, [m.batch, m.seqlen, m.heads, m.head_dim]);
        for (i, p) in parts.iter().enumerate() {
            let (o_addr, l_addr) = (o_ptrs[i].as_ref().map_or(0, |x| x.0), l_ptrs[i].as_ref().map_or(0, |x| x.0));
            let (s, ls) = (p.o.layout.strides, p.lse.layout.strides);
            params.part[i] = merge_part(o_addr, [s[0], s[1], s[2]], l_addr, [ls[0], ls[1]]);
        }
        // SAFETY: the kernel's one argument is FaMergeParams; every address
        // comes from a view of this context whose layout validate_merge
        // checked for these sizes, and the guards above outlive the launch.
        unsafe { launch_merge(self.context(), stream.cu_stream(), func.cu_function(), &params) }
    }
}

/// The LSE layout of `o`'s shape (for the unused LSE slot of the parameters).
fn o_lse<T>(o: &DeviceTensorMut<'_, T>) -> crate::tensor::LseLayout {
    let [b, l, h, _] = o.layout.shape;
    crate::tensor::LseLayout::contiguous(b, h, l)
}
