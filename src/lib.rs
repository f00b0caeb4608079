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
//! - **Masks** ([`Mask`]): full, causal and sliding windows, aligned to the
//!   bottom-right corner by default or to the top-left ([`MaskAlignment`]).
//! - **Heads**: multi-head, grouped-query (GQA) and multi-query (MQA).
//! - **Shapes**: any `Lq`, `Lk` (also `Lq != Lk`), head dims that are
//!   multiples of 8 up to 256, any batch/sequence/head strides ([`Layout`]).
//! - **Options** ([`AttentionOptions`]): custom scale, logit softcap, and
//!   the score modifiers ALiBi ([`Alibi`], slopes per head or per batch
//!   entry; [`alibi_slopes`] gives the paper's) and attention sinks (one
//!   learnable logit per head, as in gpt-oss), given as [`HeadValues`].
//! - **Kernels** ([`KernelFamily`]): a naive baseline (sm_80+), a tiled
//!   FlashAttention-2-style kernel (sm_80+, `mma.sync`), and a Hopper kernel
//!   (sm_90a: TMA, `wgmma`, warp specialisation); the dispatcher's choice is
//!   returned as a [`KernelInfo`], and [`Attention::plan`] tells it without launching.
//! - **Safety**: every bad input is a typed [`Error`] naming the argument; a
//!   machine without a driver or GPU gets an error value, not a panic.
//! - **Serving**: packed variable-length batches ([`SeqLens`],
//!   [`Attention::forward_varlen_into`]) and KV caches, dense or paged with
//!   any page size ([`CacheTables`], [`Attention::forward_kvcache_into`],
//!   [`Attention::append_kv`]); each sequence its own mask diagonal, the
//!   tables checked once on the host, no allocation or read-back per call;
//!   split-KV decoding ([`Attention::forward_kvcache_split_into`]).
//! - **Merging attention states** ([`Attention::merge_states_into`],
//!   [`PartialState`]): partial results over disjoint key sets combined
//!   exactly by their LSE (cascade attention, context parallelism, split-KV).
//! - **CPU reference** ([`reference`](mod@reference)): f64, multi-threaded,
//!   same validation, for rectangular, packed and cached problems.
//! - **Raw pointers** ([`Attention::forward_raw`], unsafe): memory cudarc did
//!   not allocate; the C ABI (`capi/`, crate `fused-attn-capi`) is built on it.
//! - **candle** (cargo feature `candle`): `candle_ops`, a `CustomOp3` and
//!   candle-flash-attn's `flash_attn*` functions on candle tensors: CPU
//!   tensors through the reference, CUDA tensors through our kernels with
//!   the feature `candle-cuda` (which builds candle's own CUDA kernels).
//!
//! ## What is computed (the contract)
//! Shapes are logical; any strides work (last dimension contiguous):
//!
//! | tensor | shape | |
//! |---|---|---|
//! | Q | `[B, Lq, Hq, D]` | |
//! | K, V | `[B, Lk, Hk, D]` | `Hq % Hk == 0`; query head `h` reads KV head `h / (Hq / Hk)` |
//! | O | `[B, Lq, Hq, D]` | Q's element type |
//! | LSE | `[B, Hq, Lq]` f32 | natural log; row stride 1, other strides free |
//!
//! - Scores `s_ij = scale · ⟨q_i, k_j⟩`, `scale` defaulting to `1/√D`; with a
//!   softcap `c`, `s_ij ← c · tanh(s_ij / c)`.
//! - Query `i` sees key `j` iff `i + off − left ≤ j ≤ i + off + right`, with
//!   `off = Lk − Lq` (bottom-right, default) or `0` (top-left). `Full` is
//!   (∞, ∞), `Causal` is (∞, 0), `Window { left, right }` is local attention.
//!   **PyTorch's `is_causal=True` is top-left**: use
//!   `AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft)`
//!   to reproduce SDPA when `Lq != Lk`.
//! - `O_i = Σ_j softmax(s_i)_j · v_j` over visible keys, `LSE_i = ln Σ_j exp(s_ij)`.
//! - A row with no visible key gives `O_i = 0`, `LSE_i = −∞`. No NaN comes
//!   from finite inputs whose scores satisfy `|scale·⟨q_i, k_j⟩| < 2.3e38`
//!   (the kernels work in base 2, so `s·log2(e)` must be finite in f32);
//!   larger scores (bf16 inputs near 1e19) are outside the contract.
//! - Every element of O (and LSE, when given) is written; nothing else is.
//! - Everything is asynchronous on the caller's stream.
//!
//! ## The attention literature, mapped to this crate
//! Most named mechanisms are one kernel with different inputs:
//!
//! | the literature says | here |
//! |---|---|
//! | soft attention (Bahdanau et al. 2015; every mechanism below) | every kernel: a softmax over keys, O and LSE |
//! | dot-product / scaled dot-product (Luong `dot`, Vaswani et al.) | [`Attention::forward`]; `scale` defaults to `1/√D`, [`AttentionOptions::with_scale`] for others (`1.0` is Luong's unscaled `dot`) |
//! | Luong `general`, `q·W·kᵀ` | project first, `Q' = Q·W` (one GEMM, or `K' = K·Wᵀ`), then the dot-product kernel with `scale` 1 |
//! | Luong `concat` / Bahdanau additive, `wᵀ tanh(W_q q + U_k k + b)` | the fused additive-attention kernel, on `Q·W_q` and `K·U_k` the caller projects once |
//! | self- vs cross-attention | the same call; cross-attention passes the encoder's K/V (`Lq ≠ Lk`; masks align bottom-right unless [`MaskAlignment::TopLeft`]) |
//! | global vs local attention (Luong), sliding windows (Longformer, Mistral) | [`Mask::Full`] vs [`Mask::Window`]; a window of width `w` costs `O(Lq·w)` |
//! | causal (decoder) attention | [`Mask::Causal`] |
//! | multi-head, multi-query, grouped-query attention | `Hq` query heads over `Hk` KV heads, `Hq % Hk == 0` |
//! | the alignment weights / attention maps (Bahdanau's figures, `output_attentions`) | [`Attention::attention_maps_into`] / [`Attention::forward_with_maps_into`]: `P = exp(s − LSE)` into a buffer the caller sizes, per head or the head mean; [`reference::attention_maps`] |
//! | ALiBi (Press et al. 2022) | [`AttentionOptions::with_alibi`] |
//! | attention sinks (Xiao et al. 2024; learnable in gpt-oss) | [`AttentionOptions::with_sinks`] |
//! | logit soft-capping (Gemma 2) | [`AttentionOptions::with_softcap`] |
//! | ring attention / context parallelism, FlashDecoding | [`Attention::merge_states_into`], [`Attention::forward_kvcache_split_into`] |
//!
//! Out of scope: **hard attention** (Xu et al. 2015), which samples one
//! location per query and is trained with REINFORCE: it is a sampling step,
//! not a fused softmax-weighted sum (sample from the attention maps if you
//! need it); Luong's **local-p** attention, whose Gaussian window around a
//! predicted position needs a per-query centre the masks here do not take.
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
//! // A PyTorch/candle-style [B, H, S, D] tensor: Layout::bhsd takes its dims in that order.
//! let (b, h, l, d) = (2, 16, 1024, 128);
//! let host: Vec<bf16> = (0..b * h * l * d).map(|i| bf16::from_f32((i as f32).sin())).collect();
//! let q = stream.clone_htod(&host)?; // cudarc errors convert with `?`
//! let t = DeviceTensor::new(&q, Layout::bhsd(b, h, l, d));
//!
//! let out = attn.forward(&stream, &t, &t, &t, &AttentionOptions::new(Mask::Causal))?;
//! println!("ran {}", out.kernel.name);
//! # Ok(()) }
//! ```
//!
//! [`Attention::forward_into`] writes caller-owned O and LSE views (any
//! strides) on a `&CudaStream`, allocates nothing on the host once its kernel
//! is loaded, and may be captured in a CUDA graph.
//! [`Attention::forward_raw`] (unsafe) does the same on raw device addresses
//! and a raw `CUstream`, for memory cudarc did not allocate; the C ABI
//! (the `fused-attn-capi` crate in `capi/`) is built on it.
//!
//! ## CUDA graphs
//! `forward_into` can be captured with cudarc's `CudaStream::begin_capture` /
//! `end_capture` and replayed; a replay writes exactly what an eager call
//! writes. The caller's part:
//! 1. **Load first**: module loading cannot be captured; call
//!    [`Attention::preload`] (or make one eager call) before capturing.
//! 2. **Turn off cudarc's event tracking** (`unsafe { ctx.disable_event_tracking() }`)
//!    before creating the buffers and capturing. With several streams,
//!    cudarc makes each launch wait on events of the buffers' last reads
//!    and writes; inside a capture those waits refer to events recorded
//!    outside it, which CUDA rejects (the capture is invalidated). Order the
//!    graph's stream against other streams yourself. If a capture does
//!    fail, check `CudaStream::capture_status` after `end_capture`: cudarc
//!    may first return an error recorded earlier without ending the capture
//!    (seen on an H100), and a second `end_capture` then ends it.
//! 3. **The graph holds addresses**: replays use the same Q/K/V/O/LSE memory
//!    (the Hopper kernels also bake in TMA maps of it); keep the buffers
//!    alive and in place, and change inputs in place.
//!
//! The GPU tier's `graph/` trials follow exactly this recipe.
//!
//! ## Host architecture
//! Data flows one way, one module per arrow:
//! ```text
//! tensor, options   user types: Layout, views, Mask, AttentionOptions (no logic)
//!   → validate      checked arithmetic; every error of the contract; a Problem
//!   → dispatch      kernel table (build.rs) + device facts → a kernel (pure, CPU-tested)
//!   → params        Problem + kernel + addresses → the params.h structs, TMA map specs
//!   → device        per-context registry (lazy image loading), launch: the driver calls
//! ops/ composes these per public operation; reference implements each on the host.
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

#![warn(missing_docs, clippy::missing_errors_doc, clippy::missing_panics_doc)]

mod device;
mod dispatch;
mod error;
mod ops;
mod options;
mod params;
pub mod reference;
mod sys;
mod tensor;
mod validate;

pub use device::{cuda_context, driver_present, Attention};
pub use dispatch::{KernelInfo, PassReason, PassedOver};
pub use error::{Error, Result};
pub use ops::AdditiveOutput;
pub use ops::{
    backward_varlen_workspace_len, backward_workspace_len, problem_of, BackwardPath, CacheTables, DynTensor,
    DynTensorMut, ForwardOutput, Gradients, PartialState, SeqLens,
};
pub use options::{alibi_slopes, Alibi, AttentionOptions, HeadValues, KernelFamily, Mask, MaskAlignment};
pub use tensor::{
    DType, DeviceTensor, DeviceTensorMut, Element, HostTensor, Layout, LseLayout, LseTensor, LseTensorMut,
    RawLseTensor, RawTensor,
};
pub use validate::{AdditiveProblem, MAX_ADDITIVE_DIM};
pub use validate::{AlibiLayout, CacheInfo, MergeProblem, PagedInfo, Problem, SeqInfo, MAX_MERGE_PARTS};
// Attention maps (DESIGN.md section 1b).
pub use ops::MapsRequest;
pub use tensor::{MapElement, MapLayout, MapTensorMut};
pub use validate::{MapsProblem, MAX_MAP_HEADS};

/// The README's code blocks compile as doctests, so its API example cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(feature = "candle")]
#[path = "candle.rs"]
pub mod candle_ops;

/// Re-exported so callers use the same cudarc and half versions as the crate.
pub use cudarc;
pub use half;

/// The plumbing, reachable for this crate's tests, benches and tools: the
/// kernel table and images, validation, the dispatcher and the parameter
/// structs. Not part of the stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::device::{image_runs_on, require_kernels};
    pub use crate::dispatch::{check_alignment, dispatch, DeviceInfo, DispatchTensors};
    pub use crate::params::{additive_params, additive_smem_bytes, AdditiveAddrs};
    pub use crate::params::{
        bwd_params, fwd_params, tma_spec, with_modifiers, with_sequences, Addrs, ModAddrs, SeqAddrs, TmaSpec,
    };
    pub use crate::params::{bwd_sm80_smem_bytes, bwd_sm80_threads, bwd_workspace, BwdWorkspace, BWD_SM80_BUCKETS};
    pub use crate::params::{maps_params, MapOut};
    pub use crate::sys::*;
    pub use crate::validate::validate_additive;
    pub use crate::validate::{
        check_cache_tables, check_dtypes, check_seqlens, validate, validate_backward, validate_backward_varlen,
        validate_kvcache, validate_merge, validate_varlen, LseDesc, TensorDesc, MAX_GRID_YZ, MAX_HEAD_DIM, MAX_SCALE,
        MAX_SEQLEN,
    };
    pub use crate::validate::{check_map_heads, map_tiles, validate_maps, MapDesc};
}
