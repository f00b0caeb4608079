//! Element types, shapes with strides, and tensor views over host slices and
//! cudarc device buffers. No logic beyond describing memory: the operation
//! that uses a view validates it and names the argument on error.
//!
//! Every attention tensor is indexed logically as `[batch, seq, heads,
//! head_dim]`. Other memory orders are other strides: a PyTorch/candle tensor
//! of shape `[B, H, S, D]` is [`Layout::bhsd`] (contiguous) or
//! [`Layout::from_bhsd_dims`] (its own dims and strides, in its own order).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use crate::error::{Error, Result};

/// The element types the kernels read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision, [`half::f16`].
    F16,
    /// bfloat16, [`half::bf16`].
    BF16,
}

impl DType {
    /// Short name as used in kernel names and reports (`f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element (2 for both).
    pub fn size(self) -> usize {
        2
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the kernels support: [`half::f16`] or [`half::bf16`].
///
/// Sealed: the kernels are instantiated for exactly these two.
pub trait Element:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Into<f64> + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Rounds an `f32` to this type (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// The raw 16-bit pattern (for bitwise comparisons of results).
    fn to_bits(self) -> u16;
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_bits(self) -> u16 {
        half::f16::to_bits(self)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_bits(self) -> u16 {
        half::bf16::to_bits(self)
    }
}

/// Shape and strides (in elements) of a logical `[B, S, H, D]` tensor.
///
/// Constructors never panic: sizes whose products overflow `usize` saturate,
/// and validation then rejects the layout with [`Error::SizeOverflow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// `[batch, seq, heads, head_dim]`, whatever the memory order.
    pub shape: [usize; 4],
    /// Element strides of the same four dimensions; `strides[3]` must be 1.
    pub strides: [usize; 4],
}

/// `a · b · …`, saturating at `usize::MAX` (validation rejects the result).
fn sat(xs: &[usize]) -> usize {
    xs.iter().fold(1usize, |acc, &x| acc.saturating_mul(x))
}

impl Layout {
    /// Contiguous storage in `[batch, seq, heads, head_dim]` order (the default,
    /// FlashAttention's layout).
    pub fn bshd(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        Layout {
            shape: [batch, seq, heads, head_dim],
            strides: [sat(&[seq, heads, head_dim]), sat(&[heads, head_dim]), head_dim, 1],
        }
    }

    /// Contiguous storage in `[batch, heads, seq, head_dim]` order (PyTorch
    /// SDPA's and candle's layout). The arguments come in that order too.
    pub fn bhsd(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        Layout {
            shape: [batch, seq, heads, head_dim],
            strides: [sat(&[heads, seq, head_dim]), head_dim, sat(&[seq, head_dim]), 1],
        }
    }

    /// Any strides, shape and strides both in `[batch, seq, heads, head_dim]` order.
    pub fn strided_bshd(shape: [usize; 4], strides: [usize; 4]) -> Self {
        Layout { shape, strides }
    }

    /// From a framework tensor's dims and strides listed in `[B, S, H, D]`
    /// order, checking the rank.
    ///
    /// # Errors
    /// [`Error::Rank`] when either list does not have four entries.
    pub fn from_bshd_dims(shape: &[usize], strides: &[usize]) -> Result<Self> {
        let (shape, strides) = rank4(shape, strides)?;
        Ok(Layout { shape, strides })
    }

    /// From a framework tensor's dims and strides listed in `[B, H, S, D]`
    /// order (a PyTorch or candle attention tensor), checking the rank.
    ///
    /// # Errors
    /// [`Error::Rank`] when either list does not have four entries.
    pub fn from_bhsd_dims(shape: &[usize], strides: &[usize]) -> Result<Self> {
        let ([b, h, s, d], [sb, sh, ss, sd]) = rank4(shape, strides)?;
        Ok(Layout { shape: [b, s, h, d], strides: [sb, ss, sh, sd] })
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.shape[0]
    }
    /// Sequence length.
    pub fn seq(&self) -> usize {
        self.shape[1]
    }
    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.shape[2]
    }
    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.shape[3]
    }

    /// Number of logical elements, or `None` if that overflows `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
    }

    /// Element offset of `[b, s, h, d]`. Meant for indices inside a validated
    /// layout; wraps instead of panicking on anything else.
    #[inline]
    pub fn offset(&self, b: usize, s: usize, h: usize, d: usize) -> usize {
        b.wrapping_mul(self.strides[0])
            .wrapping_add(s.wrapping_mul(self.strides[1]))
            .wrapping_add(h.wrapping_mul(self.strides[2]))
            .wrapping_add(d.wrapping_mul(self.strides[3]))
    }

    /// Whether every logical element has its own address: ordered by
    /// stride, each stepping dimension must clear the whole extent of the
    /// ones inside it. (Sufficient, and exact for every permuted layout.)
    /// A layout whose element count overflows `usize` is reported overlapping.
    pub fn is_non_overlapping(&self) -> bool {
        non_overlapping(&self.shape, &self.strides)
    }

    /// One past the highest element offset the layout touches (0 when empty),
    /// or `None` if that overflows `usize`.
    pub fn span(&self) -> Option<usize> {
        span(&self.shape, &self.strides)
    }
}

fn rank4(shape: &[usize], strides: &[usize]) -> Result<([usize; 4], [usize; 4])> {
    let shape: [usize; 4] = shape.try_into().map_err(|_| Error::Rank { arg: "shape", got: shape.len() })?;
    let strides: [usize; 4] = strides.try_into().map_err(|_| Error::Rank { arg: "strides", got: strides.len() })?;
    Ok((shape, strides))
}

/// One past the highest offset of a strided box, checked.
pub(crate) fn span(shape: &[usize], strides: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().zip(strides).try_fold(1usize, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)))
}

/// See [`Layout::is_non_overlapping`]; for any rank up to 4.
pub(crate) fn non_overlapping(shape: &[usize], strides: &[usize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    if shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n)).is_none() {
        return false;
    }
    // (stride, extent) of the stepping dimensions, sorted by stride, on the stack.
    let mut dims = [(0usize, 0usize); 4];
    let mut n = 0;
    for (&extent, &stride) in shape.iter().zip(strides) {
        if extent > 1 && n < dims.len() {
            dims[n] = (stride, extent);
            n += 1;
        }
    }
    let dims = &mut dims[..n];
    dims.sort_unstable();
    let mut reach = 1usize; // elements covered by the dimensions so far
    for &(stride, extent) in dims.iter() {
        if stride < reach {
            return false;
        }
        reach = stride.saturating_mul(extent);
    }
    true
}

/// Shape and strides (in elements) of a log-sum-exp tensor `[B, Hq, Lq]` (f32).
///
/// The row dimension must be contiguous (`strides[2] == 1`); batch and head
/// strides are free, so LSE can live inside a larger buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LseLayout {
    /// `[batch, heads_q, seqlen_q]`.
    pub shape: [usize; 3],
    /// Element strides of the same dimensions.
    pub strides: [usize; 3],
}

impl LseLayout {
    /// Contiguous `[B, Hq, Lq]`, what [`Attention::forward`](crate::Attention::forward) returns.
    pub fn contiguous(batch: usize, heads: usize, seq: usize) -> Self {
        LseLayout { shape: [batch, heads, seq], strides: [sat(&[heads, seq]), seq, 1] }
    }
    /// Any batch and head strides (row stride 1).
    pub fn strided(shape: [usize; 3], strides: [usize; 3]) -> Self {
        LseLayout { shape, strides }
    }
    /// One past the highest element offset, or `None` on overflow.
    pub fn span(&self) -> Option<usize> {
        span(&self.shape, &self.strides)
    }
    /// Element offset of `[b, h, i]` (wrapping; for validated layouts).
    #[inline]
    pub fn offset(&self, b: usize, h: usize, i: usize) -> usize {
        b.wrapping_mul(self.strides[0]).wrapping_add(h.wrapping_mul(self.strides[1])).wrapping_add(i)
    }
}

/// A read-only tensor on the host: a slice plus its [`Layout`]. Used by the
/// CPU [`reference`](crate::reference).
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a, T> {
    /// The storage.
    pub data: &'a [T],
    /// How `data` is indexed.
    pub layout: Layout,
}

impl<'a, T> HostTensor<'a, T> {
    /// Pairs a slice with a layout (checked by the operation that uses it).
    pub fn new(data: &'a [T], layout: Layout) -> Self {
        HostTensor { data, layout }
    }
}

/// A read-only device tensor: a cudarc view plus its [`Layout`].
#[derive(Debug)]
pub struct DeviceTensor<'a, T> {
    /// The device memory.
    pub view: CudaView<'a, T>,
    /// How `view` is indexed (element offsets from its start).
    pub layout: Layout,
}

impl<'a, T> DeviceTensor<'a, T> {
    /// A view of a whole buffer.
    pub fn new(buffer: &'a CudaSlice<T>, layout: Layout) -> Self {
        DeviceTensor { view: buffer.as_view(), layout }
    }
    /// A view of part of a buffer (e.g. `buffer.slice(offset..)`).
    pub fn from_view(view: CudaView<'a, T>, layout: Layout) -> Self {
        DeviceTensor { view, layout }
    }
}

/// A writable device tensor: a cudarc mutable view plus its [`Layout`].
#[derive(Debug)]
pub struct DeviceTensorMut<'a, T> {
    /// The device memory.
    pub view: CudaViewMut<'a, T>,
    /// How `view` is indexed.
    pub layout: Layout,
}

impl<'a, T> DeviceTensorMut<'a, T> {
    /// A view of a whole buffer.
    pub fn new(buffer: &'a mut CudaSlice<T>, layout: Layout) -> Self {
        DeviceTensorMut { view: buffer.as_view_mut(), layout }
    }
    /// A view of part of a buffer.
    pub fn from_view(view: CudaViewMut<'a, T>, layout: Layout) -> Self {
        DeviceTensorMut { view, layout }
    }
}

/// A writable device LSE tensor: an f32 view plus its [`LseLayout`].
#[derive(Debug)]
pub struct LseTensorMut<'a> {
    /// The device memory.
    pub view: CudaViewMut<'a, f32>,
    /// How `view` is indexed.
    pub layout: LseLayout,
}

impl<'a> LseTensorMut<'a> {
    /// A view of a whole buffer.
    pub fn new(buffer: &'a mut CudaSlice<f32>, layout: LseLayout) -> Self {
        LseTensorMut { view: buffer.as_view_mut(), layout }
    }
    /// A view of part of a buffer.
    pub fn from_view(view: CudaViewMut<'a, f32>, layout: LseLayout) -> Self {
        LseTensorMut { view, layout }
    }
}

/// A read-only device LSE tensor: an f32 view plus its [`LseLayout`] (the
/// LSE of a partial state for [`Attention::merge_states_into`](crate::Attention::merge_states_into)).
#[derive(Debug)]
pub struct LseTensor<'a> {
    /// The device memory.
    pub view: CudaView<'a, f32>,
    /// How `view` is indexed.
    pub layout: LseLayout,
}

impl<'a> LseTensor<'a> {
    /// A view of a whole buffer.
    pub fn new(buffer: &'a CudaSlice<f32>, layout: LseLayout) -> Self {
        LseTensor { view: buffer.as_view(), layout }
    }
    /// A view of part of a buffer.
    pub fn from_view(view: CudaView<'a, f32>, layout: LseLayout) -> Self {
        LseTensor { view, layout }
    }
}

/// A device tensor given by its raw address, for
/// [`Attention::forward_raw`](crate::Attention::forward_raw): memory that
/// cudarc did not allocate (a C caller's, another library's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTensor {
    /// Device address of element `[0, 0, 0, 0]`.
    pub addr: u64,
    /// How the memory at `addr` is indexed.
    pub layout: Layout,
}

/// A device LSE tensor (f32) given by its raw address (see [`RawTensor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLseTensor {
    /// Device address of element `[0, 0, 0]`.
    pub addr: u64,
    /// How the memory at `addr` is indexed.
    pub layout: LseLayout,
}

/// Shape and strides (in elements) of attention maps `[B, H, Lq, Lk]`: the
/// weights `P` of `H` query heads (all, or a chosen subset), or, with
/// `H = 1`, their head mean `[B, Lq, Lk]`. The key dimension must be
/// contiguous (`strides[3] == 1`); the others are free, so a map can live
/// inside a larger buffer (e.g. a padded image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapLayout {
    /// `[batch, heads, seqlen_q, seqlen_k]`.
    pub shape: [usize; 4],
    /// Element strides of the same dimensions.
    pub strides: [usize; 4],
}

impl MapLayout {
    /// Contiguous `[B, H, Lq, Lk]`.
    pub fn contiguous(batch: usize, heads: usize, seq_q: usize, seq_k: usize) -> Self {
        MapLayout {
            shape: [batch, heads, seq_q, seq_k],
            strides: [sat(&[heads, seq_q, seq_k]), sat(&[seq_q, seq_k]), seq_k, 1],
        }
    }
    /// Contiguous `[B, Lq, Lk]`: the head mean, as a one-head map.
    pub fn mean(batch: usize, seq_q: usize, seq_k: usize) -> Self {
        Self::contiguous(batch, 1, seq_q, seq_k)
    }
    /// Any strides, in `[batch, heads, seqlen_q, seqlen_k]` order (the last one 1).
    pub fn strided(shape: [usize; 4], strides: [usize; 4]) -> Self {
        MapLayout { shape, strides }
    }
    /// Number of logical elements, or `None` if that overflows `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
    }
    /// One past the highest element offset, or `None` on overflow.
    pub fn span(&self) -> Option<usize> {
        span(&self.shape, &self.strides)
    }
    /// Element offset of `[b, h, i, j]` (wrapping; for validated layouts).
    #[inline]
    pub fn offset(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        b.wrapping_mul(self.strides[0])
            .wrapping_add(h.wrapping_mul(self.strides[1]))
            .wrapping_add(i.wrapping_mul(self.strides[2]))
            .wrapping_add(j.wrapping_mul(self.strides[3]))
    }
}

mod map_sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type attention maps can be written in: `f32`, or the input's
/// own type ([`half::f16`], [`half::bf16`]). Sealed.
pub trait MapElement: map_sealed::Sealed + DeviceRepr + Copy + Default + Send + Sync + Into<f64> + 'static {
    /// `None` for `f32`; the element type otherwise.
    const DTYPE: Option<DType>;
    /// Rounds an `f32` to this type.
    fn from_f32(x: f32) -> Self;
}

impl MapElement for f32 {
    const DTYPE: Option<DType> = None;
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl MapElement for half::f16 {
    const DTYPE: Option<DType> = Some(DType::F16);
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl MapElement for half::bf16 {
    const DTYPE: Option<DType> = Some(DType::BF16);
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// A writable device map tensor (see [`MapLayout`]): a cudarc mutable view
/// plus its layout.
#[derive(Debug)]
pub struct MapTensorMut<'a, U> {
    /// The device memory.
    pub view: CudaViewMut<'a, U>,
    /// How `view` is indexed.
    pub layout: MapLayout,
}

impl<'a, U> MapTensorMut<'a, U> {
    /// A view of a whole buffer.
    pub fn new(buffer: &'a mut CudaSlice<U>, layout: MapLayout) -> Self {
        MapTensorMut { view: buffer.as_view_mut(), layout }
    }
    /// A view of part of a buffer.
    pub fn from_view(view: CudaViewMut<'a, U>, layout: MapLayout) -> Self {
        MapTensorMut { view, layout }
    }
}
