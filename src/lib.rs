//! # fused-attn
//!
//! Hand-written fused attention kernels for NVIDIA GPUs (CUDA C++ with inline
//! PTX), behind a safe Rust API over [`cudarc`], and a CPU reference that
//! implements the same contract.
//!
//! `O = softmax(scale · Q Kᵀ + mask) V` is computed without ever writing the
//! score matrix to memory, together with the row log-sum-exp.
//!
//! ## Features
//! - **Element types**: [`half::f16`] and [`half::bf16`] in and out, f32 accumulation.
//! - **Masks** ([`Mask`]): full, causal and sliding windows, all aligned to the
//!   **bottom-right** corner (like FlashAttention ≥ 2.1; PyTorch's
//!   `is_causal` is top-left aligned, and the two agree only when `Lq == Lk`).
//! - **Heads**: multi-head, grouped-query (GQA) and multi-query (MQA):
//!   query head `h` reads KV head `h / (Hq / Hk)`.
//! - **Shapes**: any `Lq`, `Lk` (also `Lq != Lk`), head dims that are
//!   multiples of 8 up to 256, any batch/sequence/head strides ([`Layout`]).
//! - **Options**: custom scale, logit softcap ([`AttentionOptions`]).
//! - **Kernels** ([`KernelFamily`]): a naive baseline (sm_80+), a tiled
//!   FlashAttention-2-style kernel (sm_80+, `mma.sync`), and a Hopper kernel
//!   (sm_90a: TMA, `wgmma`, warp specialisation); the dispatcher's choice is
//!   returned as a [`KernelInfo`], and [`Attention::plan`] tells it without launching.
//! - **Safety**: every bad input is a typed [`Error`] naming the argument; a
//!   machine without a driver or GPU gets an error value, not a panic.
//! - **CPU reference** ([`reference`](mod@reference)): f64, multi-threaded, same validation.
//!
//! ## Example
//! ```no_run
//! use fused_attn::{cuda_context, Attention, AttentionOptions, DeviceTensor, Layout, Mask};
//! use half::bf16;
//!
//! # fn main() -> Result<(), fused_attn::Error> {
//! let ctx = cuda_context(0)?; // Err(NoDriver / NoDevice) on a machine without a GPU
//! let stream = ctx.default_stream();
//! let attn = Attention::new(&ctx)?;
//!
//! let (b, l, h, d) = (2, 1024, 16, 128);
//! let host: Vec<bf16> = (0..b * l * h * d).map(|i| bf16::from_f32((i as f32).sin())).collect();
//! let q = stream.clone_htod(&host).map_err(|e| fused_attn::Error::Cuda { during: "upload", source: e })?;
//! let layout = Layout::bshd(b, l, h, d);
//! let t = DeviceTensor::new(&q, layout);
//!
//! let out = attn.forward(&stream, &t, &t, &t, &AttentionOptions::new(Mask::Causal))?;
//! println!("ran {}", out.kernel.name);
//! # Ok(()) }
//! ```
//!
//! ## Building kernels
//! `build.rs` compiles `kernels/*.cu` with nvcc (`$NVCC`, `$CUDA_HOME/bin`, or
//! `PATH`) into fatbins with SASS for sm_80 and sm_90a and PTX for newer GPUs,
//! and embeds them. Without nvcc the crate builds with the CPU reference only,
//! and [`Attention::new`] returns [`Error::KernelsNotBuilt`].
//!
//! Mixing element types does not compile with the generic API:
//! ```compile_fail
//! # use fused_attn::*;
//! # fn f(a: &Attention, s: &std::sync::Arc<cudarc::driver::CudaStream>,
//! #      q: &DeviceTensor<half::f16>, k: &DeviceTensor<half::bf16>) {
//! let _ = a.forward(s, q, k, k, &AttentionOptions::default());
//! # }
//! ```
//! and is a [`Error::DTypeMismatch`] with the runtime-typed
//! [`Attention::forward_into_dyn`].

#![warn(missing_docs)]

pub mod device;
pub mod error;
pub mod ops;
pub mod options;
pub mod reference;
pub mod sys;
pub mod tensor;

pub use device::{cuda_context, driver_present, Attention, KernelInfo};
pub use error::{Error, Result};
pub use ops::{DynTensor, DynTensorMut, ForwardOutput};
pub use options::{AttentionOptions, KernelFamily, Mask, Problem};
pub use tensor::{DType, DeviceTensor, DeviceTensorMut, Element, HostTensor, Layout};

/// Re-exported so callers use the same cudarc and half versions as the crate.
pub use cudarc;
pub use half;
