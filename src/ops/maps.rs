//! Attention maps on request (DESIGN.md section 1b): the normalised weights
//! `P = exp(s − LSE)` of a forward call, per query head (all, or a chosen
//! few) and as the head mean, written into buffers the caller owns. Nothing
//! of size `Lq × Lk` is ever allocated here: the caller decides whether the
//! maps fit, and where they live.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use super::desc;
use crate::device::{launch_maps, modifier_ptr, Attention};
use crate::dispatch::KernelInfo;
use crate::error::Result;
use crate::options::AttentionOptions;
use crate::params::{maps_params, with_modifiers, MapOut, ModAddrs};
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, LseTensor, LseTensorMut, MapElement, MapTensorMut};
use crate::validate::{map_tiles, validate_maps, LseDesc, MapDesc};

/// What an attention-maps call writes: per-head maps `[B, H, Lq, Lk]` for
/// every query head (`heads: None`, `H = Hq`) or the listed ones (`H` = the
/// list's length, map head `n` showing query head `heads[n]`), and/or the
/// mean over every query head `[B, 1, Lq, Lk]` (a one-head
/// [`MapLayout`](crate::MapLayout), e.g. [`MapLayout::mean`](crate::MapLayout::mean)).
/// `U` is `f32` or the inputs' element type.
#[derive(Debug)]
pub struct MapsRequest<'a, U> {
    /// Per-head maps, or `None`.
    pub maps: Option<MapTensorMut<'a, U>>,
    /// The query heads the maps show, in order (1 to 16, no repeats);
    /// `None`: every head. Only with `maps`.
    pub heads: Option<&'a [usize]>,
    /// The head mean, or `None`.
    pub mean: Option<MapTensorMut<'a, U>>,
}

impl<'a, U> MapsRequest<'a, U> {
    /// Maps of every query head.
    pub fn all_heads(maps: MapTensorMut<'a, U>) -> Self {
        MapsRequest { maps: Some(maps), heads: None, mean: None }
    }
    /// Maps of the listed query heads.
    pub fn heads(maps: MapTensorMut<'a, U>, heads: &'a [usize]) -> Self {
        MapsRequest { maps: Some(maps), heads: Some(heads), mean: None }
    }
    /// The head mean only.
    pub fn mean(mean: MapTensorMut<'a, U>) -> Self {
        MapsRequest { maps: None, heads: None, mean: Some(mean) }
    }
    /// Adds the head mean to a request.
    pub fn with_mean(mut self, mean: MapTensorMut<'a, U>) -> Self {
        self.mean = Some(mean);
        self
    }
}

impl Attention {
    /// Writes the attention maps of a forward call: with its Q, K, options
    /// and the LSE it wrote (`forward_into` with an LSE output),
    /// `P_ij = exp(s_ij − LSE_i)` for the requested heads and/or the head
    /// mean, scores as the forward defines them (scale, softcap, the mask in
    /// its alignment, GQA, `Lq ≠ Lk`, ALiBi). Masked entries are exactly 0;
    /// each row sums to 1 (to `1 − e^{σ_h − LSE_i}` with attention sinks,
    /// which enter through the LSE: `opts.sinks` is not read here), or is all
    /// 0 for a row with no visible key.
    ///
    /// Memory is the caller's: the outputs are views it allocated (any
    /// batch, head and row strides; keys contiguous), checked, never
    /// allocated here. f32 maps, or maps in the inputs' type.
    ///
    /// ```no_run
    /// # use fused_attn::*;
    /// # fn demo(attn: &Attention, stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    /// #   q: &DeviceTensor<'_, half::bf16>, k: &DeviceTensor<'_, half::bf16>,
    /// #   lse: &LseTensor<'_>, maps: &mut cudarc::driver::CudaSlice<f32>,
    /// #   mean: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
    /// // Heads 3 and 0 of a [1, 8 heads, 128, 256] problem, and the mean.
    /// let request = MapsRequest::heads(MapTensorMut::new(maps, MapLayout::contiguous(1, 2, 128, 256)), &[3, 0])
    ///     .with_mean(MapTensorMut::new(mean, MapLayout::mean(1, 128, 256)));
    /// attn.attention_maps_into(stream, q, k, lse, request, &AttentionOptions::default())?;
    /// # Ok(()) }
    /// ```
    ///
    /// Asynchronous on `stream`; no host allocation, no device read-back.
    ///
    /// # Errors
    /// The validation errors of [`validate_maps`](crate::internals::validate_maps)
    /// naming the argument (`q`, `k`, `lse`, `maps`, `mean`, `heads`, an
    /// option; ALiBi slopes in host memory),
    /// [`Error::ForeignContext`](crate::Error::ForeignContext) for a
    /// buffer or stream of another context,
    /// [`Error::Cuda`](crate::Error::Cuda) if the launch fails.
    pub fn attention_maps_into<T: Element, U: MapElement>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        lse: &LseTensor<'_>,
        request: MapsRequest<'_, U>,
        opts: &AttentionOptions,
    ) -> Result<()> {
        let MapsRequest { mut maps, heads, mut mean } = request;
        self.check_context("stream", stream.context())?;
        self.check_context("q", q.view.stream().context())?;
        self.check_context("k", k.view.stream().context())?;
        self.check_context("lse", lse.view.stream().context())?;
        for (arg, m) in [("maps", &maps), ("mean", &mean)] {
            if let Some(m) = m {
                self.check_context(arg, m.view.stream().context())?;
            }
        }
        let map_desc = |arg, m: &MapTensorMut<'_, U>| MapDesc { arg, layout: m.layout, len: m.view.len() };
        let (md, ed) = (maps.as_ref().map(|m| map_desc("maps", m)), mean.as_ref().map(|m| map_desc("mean", m)));
        let ld = LseDesc { layout: lse.layout, len: lse.view.len() };
        let (qd, kd) = (desc("q", &q.view, q.layout), desc("k", &k.view, k.layout));
        let m = validate_maps(T::DTYPE, U::DTYPE, &qd, &kd, Some(&ld), md.as_ref(), heads, ed.as_ref(), opts)?;
        let p = &m.problem;
        if p.seqlen_q == 0 || p.seqlen_k == 0 {
            return Ok(()); // no entry to write; a zero-sized grid is a launch error
        }
        let func = self.maps_function(T::DTYPE, U::DTYPE.is_none())?;
        // The guards make `stream` wait for earlier writes to these buffers and
        // record this launch's reads and writes when dropped after it.
        let (q_ptr, _q_sync) = q.view.device_ptr(stream);
        let (k_ptr, _k_sync) = k.view.device_ptr(stream);
        let (l_ptr, _l_sync) = lse.view.device_ptr(stream);
        // ALiBi slopes: device values of this context, read on `stream`. A
        // sink needs nothing here: the forward's LSE already holds it.
        let (alibi_slopes, _alibi_sync) = modifier_ptr(self, "alibi_slopes", opts.alibi.map(|a| a.slopes), stream)?;
        let maps_out = maps.as_mut().map(|t| {
            let (addr, sync) = t.view.device_ptr_mut(stream);
            (MapOut { addr, layout: t.layout }, sync)
        });
        let mean_out = mean.as_mut().map(|t| {
            let (addr, sync) = t.view.device_ptr_mut(stream);
            (MapOut { addr, layout: t.layout }, sync)
        });
        let mut params = maps_params(
            &m,
            (&q.layout, &k.layout, &lse.layout),
            (q_ptr, k_ptr, l_ptr),
            maps_out.as_ref().map(|(o, _)| *o),
            mean_out.as_ref().map(|(o, _)| *o),
        );
        let mods = ModAddrs { alibi_slopes, sinks: 0 };
        params.p = with_modifiers(params.p, p, mods);
        // validate_maps bounded the tiles by i32::MAX.
        let tiles = map_tiles(p.seqlen_q, p.seqlen_k) as u32;
        // SAFETY: the kernel's one argument is FaMapsParams; every address
        // comes from a view of this context whose layout validate_maps
        // checked for these sizes (the kernel writes only inside the map
        // views and reads only inside Q, K and LSE), and the guards above
        // outlive the launch.
        unsafe { launch_maps(self.context(), stream.cu_stream(), func.cu_function(), &params, tiles) }
    }

    /// [`forward_into`](Self::forward_into) writing O and the LSE into the
    /// caller's buffers, then [`attention_maps_into`](Self::attention_maps_into)
    /// from that LSE: attention and its maps in one call, both on `stream`.
    /// Returns the forward's kernel.
    ///
    /// # Errors
    /// Those of the two calls; the maps are validated before the forward
    /// runs, so a bad map buffer fails before anything is launched.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_maps_into<T: Element, U: MapElement>(
        &self,
        stream: &CudaStream,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: &mut LseTensorMut<'_>,
        request: MapsRequest<'_, U>,
        opts: &AttentionOptions,
    ) -> Result<KernelInfo> {
        {
            let map_desc = |arg, m: &MapTensorMut<'_, U>| MapDesc { arg, layout: m.layout, len: m.view.len() };
            let md = request.maps.as_ref().map(|m| map_desc("maps", m));
            let ed = request.mean.as_ref().map(|m| map_desc("mean", m));
            let ld = LseDesc { layout: lse.layout, len: lse.view.len() };
            let (qd, kd) = (desc("q", &q.view, q.layout), desc("k", &k.view, k.layout));
            validate_maps(T::DTYPE, U::DTYPE, &qd, &kd, Some(&ld), md.as_ref(), request.heads, ed.as_ref(), opts)?;
        }
        let info = self.forward_into(stream, q, k, v, o, Some(lse), opts)?;
        let lse_in = LseTensor::from_view(lse.view.as_view(), lse.layout);
        self.attention_maps_into(stream, q, k, &lse_in, request, opts)?;
        Ok(info)
    }
}
