//! The lowest layer: the bindgen mirror of `kernels/params.h` and the kernel
//! images with their dispatch table, as build.rs generated them.
//!
//! Nothing here is needed for ordinary use; the tests and tools reach it
//! through `fused_attn::internals`.

use cudarc::driver::DeviceRepr;

use crate::tensor::DType;

#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, missing_docs, clippy::all)]
mod params {
    include!("params.rs");
}

/// The launch parameters of the additive-attention kernel (`kernels/common/additive.cuh`).
pub use params::{
    FaAdditiveParams, FA_ADDITIVE_BLOCK_M, FA_ADDITIVE_BLOCK_N, FA_ADDITIVE_MAX_DIM, FA_ADDITIVE_THREADS,
};
/// The launch parameters of the backward kernels (`kernels/common/bwd_naive.cuh`,
/// `kernels/bwd_sm80.cu`) and the tiled ones' block size.
pub use params::{FaBwdParams, FA_BWD_SM80_BLOCK};
/// The launch parameters of the forward kernels (sm90: plus TMA maps); see `kernels/params.h`.
pub use params::{FaFwdParams, FaFwdSm90Params, FaTensorMap};
/// The launch parameters of the attention-maps kernels (`kernels/common/maps.cuh`).
pub use params::{FaMapsParams, FA_MAPS_MAX_HEADS};
/// The launch parameters of the merge-of-states kernel (`kernels/common/merge.cuh`).
pub use params::{FaMergeParams, FaMergePart, FA_MERGE_MAX_PARTS};

// SAFETY: `FaFwdParams` is a `#[repr(C)]` plain-old-data struct whose layout
// bindgen asserted against `params.h`; kernels take it by value, so passing a
// pointer to it as the kernel argument is exactly what `DeviceRepr` promises.
unsafe impl DeviceRepr for FaFwdParams {}
// SAFETY: as above; `#[repr(C, align(64))]` keeps the tensor maps at the
// 64-byte alignment the driver needs when it copies the argument.
unsafe impl DeviceRepr for FaFwdSm90Params {}
// SAFETY: as for `FaFwdParams`: plain pointers and integers, layout asserted by bindgen.
unsafe impl DeviceRepr for FaMergeParams {}
// SAFETY: as for `FaFwdParams`, which it embeds: pointers and integers, layout asserted by bindgen.
unsafe impl DeviceRepr for FaBwdParams {}
// SAFETY: as for `FaFwdParams`: plain pointers and integers, layout asserted by bindgen.
unsafe impl DeviceRepr for FaAdditiveParams {}
// SAFETY: as for `FaFwdParams` (which it embeds): pointers, integers and an
// i32 array, layout asserted by bindgen.
unsafe impl DeviceRepr for FaMapsParams {}

/// One embedded fatbin, made from `kernels/<stem>.cu`.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// The source file's stem.
    pub stem: &'static str,
    /// The fatbin bytes.
    pub fatbin: &'static [u8],
    /// Architectures with SASS in the fatbin (`sm_80`, `sm_90a`, ...).
    pub sass: &'static [&'static str],
    /// The PTX it carries for JIT on newer GPUs, if any (`compute_80`).
    pub ptx: Option<&'static str>,
}

/// One instantiated kernel, from an `FA_KERNEL(...)` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRow {
    /// The image (source stem) that holds it.
    pub image: &'static str,
    /// Its `extern "C"` name.
    pub name: &'static str,
    /// Element type.
    pub dtype: DType,
    /// Largest head dim it serves (the bucket).
    pub head_dim: u32,
    /// Query rows per CTA: grid.x = ceil(Lq / block_m).
    pub block_m: u32,
    /// Keys per tile (the TMA box height of K and V for the sm90 kernels).
    pub block_n: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// Dynamic shared memory per CTA, bytes.
    pub smem_bytes: u32,
    /// Lowest compute capability (major·10 + minor) it runs on.
    pub min_sm: u32,
    /// How it is launched.
    pub grid: GridKind,
}

impl KernelRow {
    /// Variants (`name__tag`) are alternative tile shapes or schedules kept
    /// for measurement: the dispatcher never picks one on its own.
    pub fn is_variant(&self) -> bool {
        self.name.contains("__")
    }

    /// The sm80 `_paged` rows: the bucket's shape, also reading paged KV
    /// caches. The dispatcher gives them paged caches and the other rows
    /// none (their key loop leaves the page code out).
    pub fn is_paged(&self) -> bool {
        self.name.ends_with("_paged")
    }

    /// The sm80 `_decode` rows: GQA packing (one CTA per KV head, the rows
    /// of its query heads in one tile), dense or paged caches. The
    /// dispatcher gives them KV-cache calls of few queries per sequence
    /// with several query heads per KV head, and nothing else.
    pub fn is_decode(&self) -> bool {
        self.name.ends_with("_decode")
    }
}

/// A kernel's launch shape (`FA_GRID_*` in params.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridKind {
    /// `(ceil(Lq / block_m), Hq, B)`: one CTA per tile of query rows.
    Tiles,
    /// `(min(#SMs, #tiles), 1, 1)`: each CTA loops over tiles.
    Persistent,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
