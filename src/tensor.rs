//! Element types, shapes with strides, and tensor views over host slices and
//! cudarc device buffers.
//!
//! Every tensor is logically `[batch, seq, heads, head_dim]` (BSHD). Other
//! memory orders are just other strides: [`Layout::bhsd`] describes a buffer
//! stored as `[batch, heads, seq, head_dim]` with the same logical indexing.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// `[batch, seq, heads, head_dim]`.
    pub shape: [usize; 4],
    /// Element strides of the same four dimensions; `strides[3]` must be 1.
    pub strides: [usize; 4],
}

impl Layout {
    /// Contiguous `[B, S, H, D]` storage, the default.
    pub fn bshd(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        Layout {
            shape: [batch, seq, heads, head_dim],
            strides: [seq * heads * head_dim, heads * head_dim, head_dim, 1],
        }
    }

    /// Contiguous `[B, H, S, D]` storage, indexed logically as `[B, S, H, D]`.
    pub fn bhsd(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        Layout { shape: [batch, seq, heads, head_dim], strides: [heads * seq * head_dim, head_dim, seq * head_dim, 1] }
    }

    /// Any strides. Nothing is checked here; the operation that uses the
    /// layout validates it and names the argument on error.
    pub fn strided(shape: [usize; 4], strides: [usize; 4]) -> Self {
        Layout { shape, strides }
    }

    /// From dynamically sized lists (e.g. another framework's tensor), checking the rank.
    pub fn from_dims(shape: &[usize], strides: &[usize]) -> Result<Self> {
        let shape: [usize; 4] = shape.try_into().map_err(|_| Error::Rank { arg: "shape", got: shape.len() })?;
        let strides: [usize; 4] = strides.try_into().map_err(|_| Error::Rank { arg: "strides", got: strides.len() })?;
        Ok(Layout { shape, strides })
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

    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element offset of `[b, s, h, d]`.
    #[inline]
    pub fn offset(&self, b: usize, s: usize, h: usize, d: usize) -> usize {
        b * self.strides[0] + s * self.strides[1] + h * self.strides[2] + d * self.strides[3]
    }

    /// Whether every logical element has its own address: ordered by
    /// stride, each stepping dimension must clear the whole extent of the
    /// ones inside it. (Sufficient, and exact for every permuted layout.)
    pub fn is_non_overlapping(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut dims: Vec<(usize, usize)> =
            self.shape.iter().zip(self.strides).filter(|(&n, _)| n > 1).map(|(&n, s)| (s, n)).collect();
        dims.sort_unstable();
        let mut reach = 1usize; // elements covered by the dimensions so far
        for (stride, extent) in dims {
            if stride < reach {
                return false;
            }
            reach = stride.saturating_mul(extent);
        }
        true
    }

    /// One past the highest element offset the layout touches (0 when empty),
    /// or `None` if that overflows `usize`.
    pub fn span(&self) -> Option<usize> {
        if self.numel() == 0 {
            return Some(0);
        }
        self.shape
            .iter()
            .zip(self.strides)
            .try_fold(1usize, |acc, (&n, s)| (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)))
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
