//! # fused-attn-capi
//!
//! The C ABI of [`fused_attn`]: plain `extern "C"` functions over raw
//! pointers, declared in `include/fused_attn.h` (generated from this file by
//! cbindgen; `tests/header.rs` fails when the two differ). Build it with
//! `cargo build --release -p fused-attn-capi` and link
//! `target/release/libfused_attn_capi.a` (plus `-lpthread -ldl -lm`) or
//! `libfused_attn_capi.so`.
//!
//! - [`fused_attn_create`] opens device `n` (its primary context, the one the
//!   CUDA runtime API uses) and returns a handle; kernels load once per
//!   context, on first use. [`fused_attn_destroy`] frees it.
//! - [`fused_attn_forward`] runs attention on device pointers, asynchronously
//!   on the caller's stream, through [`fused_attn::Attention::forward_raw`]:
//!   the Rust API's validation, kernel choice and launch.
//! - [`fused_attn_reference_forward`] is the CPU reference on host pointers,
//!   with the same structs and validation: O is written as `float`.
//! - Every function returns a [`FusedAttnStatus`]; on failure
//!   [`fused_attn_last_error_message`] says what went wrong, naming the
//!   argument. No panic crosses the boundary (each body runs under
//!   `catch_unwind`; a panic is [`FusedAttnStatus::Panic`]), and every
//!   pointer is checked for null.
//!
//! Tensors are [`FusedAttnTensor`]s: a pointer, a logical shape
//! `[B, L, H, D]` and element strides (`int64_t`, the last one 1), so any
//! memory order works (`[B, H, L, D]` is strides `{H·L·D, D, L·D, 1}`).
//! Enumerations are passed as `int32_t` so that an out-of-range value from C
//! is an error ([`FusedAttnStatus::InvalidEnum`]), not undefined behaviour.
//! A zero-initialised [`FusedAttnOptions`] is the default: full mask,
//! bottom-right alignment, scale `1/sqrt(D)`, no softcap, automatic kernel.

#![warn(missing_docs, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use fused_attn::internals::{validate, validate_backward, LseDesc, TensorDesc};
use fused_attn::{
    reference, Alibi, Attention, AttentionOptions, DType, Element, Error, HeadValues, HostTensor, KernelFamily, Layout,
    LseLayout, Mask, MaskAlignment, RawLseTensor, RawTensor,
};
use half::{bf16, f16};

/// What a call returned: `FUSED_ATTN_STATUS_OK` (0) or the kind of error,
/// one per kind of `fused_attn::Error` plus four of the C ABI's own (100 and up).
/// [`fused_attn_last_error_message`] has the details.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttnStatus {
    /// Success.
    Ok = 0,
    /// A shape or stride list without four dimensions (not reachable through
    /// this ABI, whose arrays have fixed length; kept for the one-to-one mapping).
    Rank = 1,
    /// A dimension disagrees with another tensor's (e.g. K and V lengths, O's shape).
    ShapeMismatch = 2,
    /// `Hq % Hk != 0`.
    HeadsNotDivisible = 3,
    /// Head dim zero, not a multiple of 8, or above 256.
    HeadDim = 4,
    /// Batch or head count zero.
    Empty = 5,
    /// The last (head-dim) stride is not 1.
    LastDimStride = 6,
    /// A view reaches past its buffer.
    OutOfBounds = 7,
    /// An output whose strides make two elements share an address.
    Overlapping = 8,
    /// A pointer or stride misses the alignment the kernel (or, for the
    /// reference, the element type) needs.
    Misaligned = 9,
    /// A size beyond what the kernels (or the CPU reference) can handle.
    SizeOverflow = 10,
    /// A negative size, stride or device ordinal.
    Negative = 11,
    /// Element types that differ.
    DtypeMismatch = 12,
    /// An option out of its domain (NaN scale, negative softcap, ...).
    InvalidOption = 13,
    /// The stream belongs to another CUDA context than the handle.
    ForeignContext = 14,
    /// No CUDA driver (libcuda) on this machine.
    NoDriver = 15,
    /// No CUDA device with that ordinal.
    NoDevice = 16,
    /// The GPU is older than sm_80.
    UnsupportedDevice = 17,
    /// The library was built without nvcc, so it has no GPU kernels.
    KernelsNotBuilt = 18,
    /// No kernel serves the problem (e.g. a forced family that cannot run it).
    NoKernel = 19,
    /// A CUDA driver call failed (launch, module load, out of memory).
    Cuda = 20,
    /// A required pointer argument is null.
    NullPointer = 100,
    /// An enumeration argument (dtype, mask, alignment, kernel) has a value
    /// outside its enum.
    InvalidEnum = 101,
    /// A panic inside the library (a bug), caught at the boundary.
    Panic = 102,
    /// An error kind newer than this ABI's list.
    Unknown = 103,
}

/// Element type of Q, K, V (and O on the GPU). Zero is deliberately no type,
/// so an uninitialised value is an error.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttnDtype {
    /// IEEE half precision.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

/// Which keys each query may see (see [`FusedAttnOptions`]).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttnMask {
    /// Every key.
    Full = 0,
    /// Keys up to the diagonal.
    Causal = 1,
    /// `window_left` keys before the diagonal and `window_right` after it.
    Window = 2,
}

/// Which corner of the `Lq × Lk` score matrix the mask's diagonal starts from.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttnAlignment {
    /// Diagonal offset `Lk − Lq` (FlashAttention ≥ 2.1, KV-cache decoding).
    BottomRight = 0,
    /// Diagonal offset 0 (PyTorch SDPA's `is_causal=True`).
    TopLeft = 1,
}

/// Kernel family preference: automatic, or one family forced.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttnKernel {
    /// The dispatcher chooses (Hopper, then sm80 tiled, then naive).
    Auto = 0,
    /// The naive baseline.
    Naive = 1,
    /// The tiled FlashAttention-2-style kernel (sm_80+).
    Sm80 = 2,
    /// The Hopper kernel (sm_90a).
    Sm90 = 3,
}

/// A tensor `[B, L, H, D]`: `data` points at element `[0, 0, 0, 0]`, and
/// element `[b, l, h, d]` is at `data + b·strides[0] + l·strides[1] +
/// h·strides[2] + d·strides[3]` elements. `strides[3]` must be 1. `data`
/// may be null only when the tensor has no element.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FusedAttnTensor {
    /// Device memory for [`fused_attn_forward`], host memory for
    /// [`fused_attn_reference_forward`]; read-only for Q, K, V.
    pub data: *mut c_void,
    /// `[batch, seq, heads, head_dim]`.
    pub shape: [i64; 4],
    /// Element strides of the same dimensions.
    pub strides: [i64; 4],
}

/// The log-sum-exp tensor `[B, Hq, Lq]` of `float` (natural log, `-inf` for
/// a row that sees no key); `strides[2]` must be 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FusedAttnLseTensor {
    /// Device (GPU call) or host (reference) memory.
    pub data: *mut f32,
    /// `[batch, heads_q, seq_q]`.
    pub shape: [i64; 3],
    /// Element strides of the same dimensions.
    pub strides: [i64; 3],
}

/// Options of one call. All zeros is the default: full mask, bottom-right
/// alignment, scale `1/sqrt(D)`, no softcap, automatic kernel choice.
///
/// Query `i` sees key `j` iff `i + off − left ≤ j ≤ i + off + right`, with
/// `off = Lk − Lq` (bottom-right) or `0` (top-left); full is (∞, ∞), causal
/// is (∞, 0), a window is (`window_left`, `window_right`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FusedAttnOptions {
    /// A `FusedAttnMask`.
    pub mask: i32,
    /// A `FusedAttnAlignment`.
    pub alignment: i32,
    /// Keys visible before the diagonal with `FUSED_ATTN_MASK_WINDOW`; `-1`
    /// is unbounded. Ignored for the other masks.
    pub window_left: i64,
    /// Keys visible after the diagonal with `FUSED_ATTN_MASK_WINDOW`; `-1`
    /// is unbounded. Ignored for the other masks.
    pub window_right: i64,
    /// Non-zero: use `scale`. Zero: the default `1/sqrt(D)`.
    pub has_scale: i32,
    /// Multiplies `q·k` when `has_scale` is set; finite, `|scale| ≤ 2^64`.
    pub scale: f32,
    /// `c > 0` caps scores as `c·tanh(s/c)`; `0` is off.
    pub softcap: f32,
    /// A `FusedAttnKernel`.
    pub kernel: i32,
    /// ALiBi slopes, `float`, or null for none: `[Hq]`, or `[B, Hq]`
    /// (batch-major) when `alibi_per_batch` is non-zero. After the softcap,
    /// `s_ij -= slope * |i + off - j|`. Device memory for
    /// `fused_attn_forward`, host memory for `fused_attn_reference_forward`.
    pub alibi_slopes: *const f32,
    /// Non-zero: `alibi_slopes` holds one slope per (batch entry, query head).
    pub alibi_per_batch: i32,
    /// Attention-sink logits, `float` `[Hq]`, or null for none: each joins
    /// its head's softmax denominator with no value (a row that sees no key
    /// gets O = 0, LSE = the sink). Device or host memory as above.
    pub sinks: *const f32,
}

impl Default for FusedAttnOptions {
    /// All zeros (null pointers): the defaults.
    fn default() -> Self {
        FusedAttnOptions {
            mask: 0,
            alignment: 0,
            window_left: 0,
            window_right: 0,
            has_scale: 0,
            scale: 0.0,
            softcap: 0.0,
            kernel: 0,
            alibi_slopes: std::ptr::null(),
            alibi_per_batch: 0,
            sinks: std::ptr::null(),
        }
    }
}

/// An open device: the `fused_attn::Attention` object, so kernels load once.
/// Opaque to C; create with [`fused_attn_create`], free with
/// [`fused_attn_destroy`]. Calls on one handle may come from many threads.
pub struct FusedAttnHandle {
    attn: Attention,
}

/// An error before it becomes a status and a message.
enum CError {
    Attn(Error),
    Null(&'static str),
    Enum { arg: &'static str, value: i32, of: &'static str },
}

impl From<Error> for CError {
    fn from(e: Error) -> Self {
        CError::Attn(e)
    }
}

type CResult<T> = Result<T, CError>;

thread_local! {
    /// The message of this thread's last failed call (empty after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let msg = CString::new(msg.replace('\0', "?")).unwrap_or_default();
    LAST_ERROR.with(|m| *m.borrow_mut() = msg);
}

fn status_of(e: &Error) -> FusedAttnStatus {
    use FusedAttnStatus as S;
    match e {
        Error::Rank { .. } => S::Rank,
        Error::ShapeMismatch { .. } => S::ShapeMismatch,
        Error::HeadsNotDivisible { .. } => S::HeadsNotDivisible,
        Error::HeadDim { .. } => S::HeadDim,
        Error::Empty { .. } => S::Empty,
        Error::LastDimStride { .. } => S::LastDimStride,
        Error::OutOfBounds { .. } => S::OutOfBounds,
        Error::Overlapping { .. } => S::Overlapping,
        Error::Misaligned { .. } => S::Misaligned,
        Error::SizeOverflow { .. } => S::SizeOverflow,
        Error::Negative { .. } => S::Negative,
        Error::DTypeMismatch { .. } => S::DtypeMismatch,
        Error::InvalidOption { .. } => S::InvalidOption,
        Error::ForeignContext { .. } => S::ForeignContext,
        Error::NoDriver => S::NoDriver,
        Error::NoDevice { .. } => S::NoDevice,
        Error::UnsupportedDevice { .. } => S::UnsupportedDevice,
        Error::KernelsNotBuilt => S::KernelsNotBuilt,
        Error::NoKernel { .. } => S::NoKernel,
        Error::Cuda { .. } => S::Cuda,
        _ => S::Unknown,
    }
}

/// Runs one ABI body: clears the thread's message, catches panics, and
/// turns the outcome into a status (and a message on failure).
fn run(body: impl FnOnce() -> CResult<()>) -> FusedAttnStatus {
    set_last_error(String::new());
    let (status, msg) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return FusedAttnStatus::Ok,
        Ok(Err(CError::Attn(e))) => (status_of(&e), e.to_string()),
        Ok(Err(CError::Null(arg))) => (FusedAttnStatus::NullPointer, format!("`{arg}` is a null pointer")),
        Ok(Err(CError::Enum { arg, value, of })) => {
            (FusedAttnStatus::InvalidEnum, format!("`{arg}` = {value} is not a value of {of}"))
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            (FusedAttnStatus::Panic, format!("internal error (a bug in fused-attn, please report): {what}"))
        }
    };
    set_last_error(msg);
    status
}

/// The struct behind a pointer argument, or [`CError::Null`] naming it.
///
/// # Safety
/// A non-null `ptr` points at a valid, initialised `T`.
unsafe fn deref<'a, T>(arg: &'static str, ptr: *const T) -> CResult<&'a T> {
    // SAFETY: by this function's contract.
    unsafe { ptr.as_ref() }.ok_or(CError::Null(arg))
}

fn non_negative(arg: &'static str, what: &'static str, value: i64) -> CResult<usize> {
    usize::try_from(value).map_err(|_| CError::Attn(Error::Negative { arg, what, value }))
}

const SHAPE: [&str; 4] = ["shape[0]", "shape[1]", "shape[2]", "shape[3]"];
const STRIDES: [&str; 4] = ["strides[0]", "strides[1]", "strides[2]", "strides[3]"];

fn dims<const N: usize>(arg: &'static str, shape: &[i64; N], strides: &[i64; N]) -> CResult<([usize; N], [usize; N])> {
    let (mut sh, mut st) = ([0; N], [0; N]);
    for i in 0..N {
        sh[i] = non_negative(arg, SHAPE[i], shape[i])?;
        st[i] = non_negative(arg, STRIDES[i], strides[i])?;
    }
    Ok((sh, st))
}

/// `data` may be null only for a tensor without elements.
fn check_data(arg: &'static str, null: bool, shape: &[usize]) -> CResult<()> {
    if null && !shape.contains(&0) {
        Err(CError::Null(arg))
    } else {
        Ok(())
    }
}

/// A tensor argument: its pointer and layout.
///
/// # Safety
/// A non-null `t` points at a valid `FusedAttnTensor`.
unsafe fn tensor(arg: &'static str, data_arg: &'static str, t: *const FusedAttnTensor) -> CResult<RawTensor> {
    // SAFETY: by this function's contract.
    let t = unsafe { deref(arg, t) }?;
    let (shape, strides) = dims(arg, &t.shape, &t.strides)?;
    check_data(data_arg, t.data.is_null(), &shape)?;
    Ok(RawTensor { addr: t.data as u64, layout: Layout::strided_bshd(shape, strides) })
}

/// The optional LSE argument.
///
/// # Safety
/// A non-null `t` points at a valid `FusedAttnLseTensor`.
unsafe fn lse_tensor(t: *const FusedAttnLseTensor) -> CResult<Option<RawLseTensor>> {
    // SAFETY: by this function's contract.
    let Some(t) = (unsafe { t.as_ref() }) else { return Ok(None) };
    let (shape, strides) = dims("lse", &t.shape, &t.strides)?;
    check_data("lse->data", t.data.is_null(), &shape)?;
    Ok(Some(RawLseTensor { addr: t.data as u64, layout: LseLayout::strided(shape, strides) }))
}

fn dtype_of(value: i32) -> CResult<DType> {
    match value {
        x if x == FusedAttnDtype::F16 as i32 => Ok(DType::F16),
        x if x == FusedAttnDtype::Bf16 as i32 => Ok(DType::BF16),
        _ => Err(CError::Enum { arg: "dtype", value, of: "FusedAttnDtype" }),
    }
}

/// `-1` is unbounded; other negative values are errors.
fn window_side(arg: &'static str, value: i64) -> CResult<usize> {
    if value == -1 {
        Ok(usize::MAX)
    } else {
        non_negative("options", arg, value)
    }
}

/// The options argument (null: the defaults) as the Rust API's options.
///
/// # Safety
/// A non-null `o` points at a valid `FusedAttnOptions`.
unsafe fn attention_options(o: *const FusedAttnOptions) -> CResult<AttentionOptions<'static>> {
    // SAFETY: by this function's contract.
    let o = unsafe { o.as_ref() }.copied().unwrap_or_default();
    let bad = |arg, value, of| CError::Enum { arg, value, of };
    let mask = match o.mask {
        0 => Mask::Full,
        1 => Mask::Causal,
        2 => Mask::window(window_side("window_left", o.window_left)?, window_side("window_right", o.window_right)?),
        v => return Err(bad("options->mask", v, "FusedAttnMask")),
    };
    let alignment = match o.alignment {
        0 => MaskAlignment::BottomRight,
        1 => MaskAlignment::TopLeft,
        v => return Err(bad("options->alignment", v, "FusedAttnAlignment")),
    };
    let mut opts = AttentionOptions::new(mask).with_alignment(alignment);
    if o.has_scale != 0 {
        opts = opts.with_scale(o.scale);
    }
    // 0 is off; anything else (negative, NaN included) goes to validation.
    if o.softcap != 0.0 {
        opts = opts.with_softcap(o.softcap);
    }
    match o.kernel {
        0 => {}
        1 => opts = opts.with_kernel(KernelFamily::Naive),
        2 => opts = opts.with_kernel(KernelFamily::Sm80),
        3 => opts = opts.with_kernel(KernelFamily::Sm90),
        v => return Err(bad("options->kernel", v, "FusedAttnKernel")),
    }
    // Raw addresses: forward_raw launches on them; the reference path turns
    // them into host slices (`host_modifiers`).
    if !o.alibi_slopes.is_null() {
        let slopes = HeadValues::Raw(o.alibi_slopes as usize as u64);
        opts = opts.with_alibi(Alibi { slopes, per_batch: o.alibi_per_batch != 0 });
    }
    if !o.sinks.is_null() {
        opts = opts.with_sinks(HeadValues::Raw(o.sinks as usize as u64));
    }
    Ok(opts)
}

/// `opts` with its raw modifier addresses read as host memory: `B·Hq` or
/// `Hq` slopes, `Hq` sinks (the problem's `B`, `Hq` from Q's shape).
///
/// # Safety
/// The addresses are host memory holding those counts of `float`.
unsafe fn host_modifiers<'a>(mut opts: AttentionOptions<'a>, q: &RawTensor) -> CResult<AttentionOptions<'a>> {
    let [batch, _, heads, _] = q.layout.shape;
    if let Some(a) = opts.alibi.as_mut() {
        if let HeadValues::Raw(addr) = a.slopes {
            let n = if a.per_batch { batch.saturating_mul(heads) } else { heads };
            // SAFETY: by this function's contract.
            a.slopes = HeadValues::Host(unsafe { host_slice("options->alibi_slopes", addr, n) }?);
        }
    }
    if let Some(HeadValues::Raw(addr)) = opts.sinks {
        // SAFETY: by this function's contract.
        opts.sinks = Some(HeadValues::Host(unsafe { host_slice("options->sinks", addr, heads) }?));
    }
    Ok(opts)
}

/// Opens CUDA device `device` (its primary context, which the CUDA runtime
/// API also uses, so `cudaMalloc` memory and `cudaStream_t` streams of that
/// device work with the handle) and writes a new handle to `*out`.
///
/// On this call no kernel is loaded yet: each loads on its first use, once
/// per context however many handles exist.
///
/// Returns `FUSED_ATTN_STATUS_NO_DRIVER` without libcuda,
/// `FUSED_ATTN_STATUS_NO_DEVICE` for an ordinal that does not exist,
/// `FUSED_ATTN_STATUS_KERNELS_NOT_BUILT`, `FUSED_ATTN_STATUS_UNSUPPORTED_DEVICE`
/// (below sm_80), `FUSED_ATTN_STATUS_NULL_POINTER` for a null `out`; `*out`
/// is set to null on any failure (when `out` is not null).
///
/// # Safety
/// `out` is null or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn fused_attn_create(device: i32, out: *mut *mut FusedAttnHandle) -> FusedAttnStatus {
    run(|| {
        if out.is_null() {
            return Err(CError::Null("out"));
        }
        // SAFETY: `out` is non-null and valid for a write (this function's contract).
        unsafe { out.write(std::ptr::null_mut()) };
        let ordinal = non_negative("device", "ordinal", device.into())?;
        let ctx = fused_attn::cuda_context(ordinal)?;
        let attn = Attention::new(&ctx)?;
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(Box::new(FusedAttnHandle { attn }))) };
        Ok(())
    })
}

/// Frees a handle from [`fused_attn_create`] (null: nothing to do). Work
/// already launched with it is not waited for and stays valid.
///
/// # Safety
/// `handle` is null or a handle from [`fused_attn_create`] not yet destroyed,
/// and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn fused_attn_destroy(handle: *mut FusedAttnHandle) -> FusedAttnStatus {
    run(|| {
        if !handle.is_null() {
            // SAFETY: by this function's contract it came from Box::into_raw
            // in `fused_attn_create` and is dropped once.
            drop(unsafe { Box::from_raw(handle) });
        }
        Ok(())
    })
}

/// Runs attention on device memory, asynchronously on `stream`:
/// `O = softmax(scale · Q Kᵀ + mask) V` and optionally the row log-sum-exp.
///
/// - `q` `[B, Lq, Hq, D]`, `k` and `v` `[B, Lk, Hk, D]` (`Hq % Hk == 0`),
///   `o` `[B, Lq, Hq, D]`, all of element type `dtype` (a `FusedAttnDtype`).
/// - `lse` `[B, Hq, Lq]` of `float`, or null to skip it.
/// - `options`: null for the defaults.
/// - `stream`: a `CUstream` or `cudaStream_t` of the handle's device
///   (checked: another context's stream is `FUSED_ATTN_STATUS_FOREIGN_CONTEXT`),
///   or null for the legacy default stream. `CU_STREAM_PER_THREAD`
///   (`(void*)0x2`) is accepted too.
///
/// Nothing is synchronised: synchronise `stream` before reading O on the
/// host. Every element of O (and LSE) is written, nothing else is.
///
/// # Safety
/// `handle` is a live handle; `q`, `k`, `v`, `o` are null or point at valid
/// structs; `lse` and `options` are null or point at valid structs. The
/// tensors' `data` point at device memory of the handle's device holding
/// every element the shape and strides reach, which stays allocated (and
/// is not written, or for O and LSE not accessed, by anyone else) until the
/// work completes on `stream`; O and LSE do not overlap the inputs.
/// `stream` is null, `(void*)0x1`, `(void*)0x2` or a live stream.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fused_attn_forward(
    handle: *const FusedAttnHandle,
    stream: *mut c_void,
    dtype: i32,
    q: *const FusedAttnTensor,
    k: *const FusedAttnTensor,
    v: *const FusedAttnTensor,
    o: *const FusedAttnTensor,
    lse: *const FusedAttnLseTensor,
    options: *const FusedAttnOptions,
) -> FusedAttnStatus {
    run(|| {
        // SAFETY (all derefs below): by this function's contract, each
        // pointer is null (reported) or points at a valid struct.
        let h = unsafe { deref("handle", handle) }?;
        let (q, k) = unsafe { (tensor("q", "q->data", q)?, tensor("k", "k->data", k)?) };
        let (v, o) = unsafe { (tensor("v", "v->data", v)?, tensor("o", "o->data", o)?) };
        let lse = unsafe { lse_tensor(lse) }?;
        let opts = unsafe { attention_options(options) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: the memory and stream requirements of `forward_raw` are
        // this function's contract.
        unsafe { h.attn.forward_raw(stream.cast(), dtype, q, k, v, o, lse, &opts) }?;
        Ok(())
    })
}

/// The CPU reference through the same ABI, on **host** memory: computes in
/// double precision what [`fused_attn_forward`] computes, with the same
/// validation and error codes, and writes O as **`float`** (the reference is
/// for checking results, so it is not rounded to `dtype`); LSE as with the
/// GPU call. Inputs are `dtype`. Synchronous; uses all cores.
///
/// Beyond the reference's own limits (`2^28` output elements, `2^40`
/// multiply-adds) it returns `FUSED_ATTN_STATUS_SIZE_OVERFLOW`.
///
/// # Safety
/// As [`fused_attn_forward`], with host memory in place of device memory:
/// each `data` is aligned for its element type (checked) and holds every
/// element its shape and strides reach.
#[no_mangle]
pub unsafe extern "C" fn fused_attn_reference_forward(
    dtype: i32,
    q: *const FusedAttnTensor,
    k: *const FusedAttnTensor,
    v: *const FusedAttnTensor,
    o: *const FusedAttnTensor,
    lse: *const FusedAttnLseTensor,
    options: *const FusedAttnOptions,
) -> FusedAttnStatus {
    run(|| {
        // SAFETY: each pointer is null (reported) or valid (this function's contract).
        let (q, k) = unsafe { (tensor("q", "q->data", q)?, tensor("k", "k->data", k)?) };
        let (v, o) = unsafe { (tensor("v", "v->data", v)?, tensor("o", "o->data", o)?) };
        let lse = unsafe { lse_tensor(lse) }?;
        let opts = unsafe { attention_options(options) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: the slopes and sinks are host memory (this function's contract).
        let opts = unsafe { host_modifiers(opts, &q) }?;
        // SAFETY: the memory requirements are this function's contract.
        match dtype {
            DType::F16 => unsafe { reference_host::<f16>(q, k, v, o, lse, &opts) },
            DType::BF16 => unsafe { reference_host::<bf16>(q, k, v, o, lse, &opts) },
        }
    })
}

/// The `float` elements of workspace that [`fused_attn_backward`]'s tiled
/// kernels need for Q of shape `[batch, seqlen_q, heads_q, head_dim]`,
/// written to `*out`. Allocate it once per shape (`cudaMalloc`) and reuse it.
///
/// Returns `FUSED_ATTN_STATUS_NEGATIVE` for a negative size,
/// `FUSED_ATTN_STATUS_SIZE_OVERFLOW` when it does not fit, and
/// `FUSED_ATTN_STATUS_NULL_POINTER` for a null `out`.
///
/// # Safety
/// `out` is null or valid for writing one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn fused_attn_backward_workspace_len(
    batch: i64,
    seqlen_q: i64,
    heads_q: i64,
    head_dim: i64,
    out: *mut u64,
) -> FusedAttnStatus {
    run(|| {
        if out.is_null() {
            return Err(CError::Null("out"));
        }
        let n = |what, v| non_negative("workspace_len", what, v);
        let len = fused_attn::backward_workspace_len(
            n("batch", batch)?,
            n("seqlen_q", seqlen_q)?,
            n("heads_q", heads_q)?,
            n("head_dim", head_dim)?,
        )?;
        // SAFETY: `out` is non-null and valid for a write (this function's contract).
        unsafe { out.write(len as u64) };
        Ok(())
    })
}

/// The backward pass on device memory, asynchronously on `stream`: the
/// gradients of `Σ ⟨dO, O⟩` with respect to Q, K, V (and the sink logits)
/// from the forward's `o` and `lse` (required; written by
/// [`fused_attn_forward`] with the same `options`).
///
/// - `d_o` and `dq` of Q's shape, `dk` and `dv` of K's (summed over each KV
///   head's query heads), element type `dtype`, any strides.
/// - `dsinks`: null, or `Hq` `float`s for the sink logits' gradient (the
///   options must have sinks).
/// - `workspace`: null (the baseline CUDA-core kernels run), or
///   `workspace_len` `float`s, at least [`fused_attn_backward_workspace_len`],
///   at a 16-byte aligned address (else `FUSED_ATTN_STATUS_MISALIGNED`
///   naming `workspace`), for the tiled tensor-core kernels (sm_80+, head_dim ≤ 256, 16-byte
///   aligned tensors; else the baseline runs anyway).
/// - `deterministic` non-zero: bitwise-identical gradients run to run (the
///   tiled kernels add dQ in a fixed order; the baseline always is).
///
/// Every element of dQ, dK, dV (and dsinks) is written, nothing else.
///
/// # Safety
/// As [`fused_attn_forward`] for the handle, stream, options and the
/// forward's tensors (all read here); `d_o` read likewise; `dq`, `dk`,
/// `dv`, `dsinks` and the workspace are device memory of the handle's
/// device covering what they reach, not accessed by anyone else until the
/// work completes on `stream`, overlapping no input and each other.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fused_attn_backward(
    handle: *const FusedAttnHandle,
    stream: *mut c_void,
    dtype: i32,
    q: *const FusedAttnTensor,
    k: *const FusedAttnTensor,
    v: *const FusedAttnTensor,
    o: *const FusedAttnTensor,
    lse: *const FusedAttnLseTensor,
    d_o: *const FusedAttnTensor,
    dq: *const FusedAttnTensor,
    dk: *const FusedAttnTensor,
    dv: *const FusedAttnTensor,
    dsinks: *mut f32,
    workspace: *mut f32,
    workspace_len: u64,
    deterministic: i32,
    options: *const FusedAttnOptions,
) -> FusedAttnStatus {
    run(|| {
        // SAFETY (all derefs below): by this function's contract, each
        // pointer is null (reported) or points at a valid struct.
        let h = unsafe { deref("handle", handle) }?;
        let fwd = unsafe {
            [
                tensor("q", "q->data", q)?,
                tensor("k", "k->data", k)?,
                tensor("v", "v->data", v)?,
                tensor("o", "o->data", o)?,
            ]
        };
        let lse = unsafe { lse_tensor(lse) }?.ok_or(CError::Null("lse"))?;
        let grads = unsafe {
            [
                tensor("d_o", "d_o->data", d_o)?,
                tensor("dq", "dq->data", dq)?,
                tensor("dk", "dk->data", dk)?,
                tensor("dv", "dv->data", dv)?,
            ]
        };
        let opts = unsafe { attention_options(options) }?;
        let dtype = dtype_of(dtype)?;
        let ws =
            (!workspace.is_null()).then(|| (workspace as u64, usize::try_from(workspace_len).unwrap_or(usize::MAX)));
        // SAFETY: the memory and stream requirements of `backward_raw` are
        // this function's contract.
        unsafe {
            h.attn.backward_raw(stream.cast(), dtype, fwd, lse, grads, dsinks as u64, ws, deterministic != 0, &opts)
        }?;
        Ok(())
    })
}

/// The backward reference through the same ABI, on **host** memory: the
/// gradients [`fused_attn_backward`] computes, in double precision from Q,
/// K, V and dO (no O or LSE needed), written as **`float`** into `dq`, `dk`,
/// `dv` (and `dsinks`: null or `Hq` floats, with sinks in the options).
/// Inputs are `dtype`. Synchronous.
///
/// # Safety
/// As [`fused_attn_reference_forward`]: each `data` is host memory, aligned
/// for its element type (checked), holding every element it reaches; the
/// outputs are not accessed by anyone else during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fused_attn_reference_backward(
    dtype: i32,
    q: *const FusedAttnTensor,
    k: *const FusedAttnTensor,
    v: *const FusedAttnTensor,
    d_o: *const FusedAttnTensor,
    dq: *const FusedAttnTensor,
    dk: *const FusedAttnTensor,
    dv: *const FusedAttnTensor,
    dsinks: *mut f32,
    options: *const FusedAttnOptions,
) -> FusedAttnStatus {
    run(|| {
        // SAFETY: each pointer is null (reported) or valid (this function's contract).
        let ins = unsafe {
            [
                tensor("q", "q->data", q)?,
                tensor("k", "k->data", k)?,
                tensor("v", "v->data", v)?,
                tensor("d_o", "d_o->data", d_o)?,
            ]
        };
        let outs =
            unsafe { [tensor("dq", "dq->data", dq)?, tensor("dk", "dk->data", dk)?, tensor("dv", "dv->data", dv)?] };
        let opts = unsafe { attention_options(options) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: the slopes and sinks are host memory (this function's contract).
        let opts = unsafe { host_modifiers(opts, &ins[0]) }?;
        // SAFETY: the memory requirements are this function's contract.
        match dtype {
            DType::F16 => unsafe { reference_backward_host::<f16>(ins, outs, dsinks, &opts) },
            DType::BF16 => unsafe { reference_backward_host::<bf16>(ins, outs, dsinks, &opts) },
        }
    })
}

/// [`reference::backward`] on host tensors of element type `T`, gradients
/// written as f32.
///
/// # Safety
/// As [`fused_attn_reference_backward`].
unsafe fn reference_backward_host<T: Element>(
    [q, k, v, d_o]: [RawTensor; 4],
    [dq, dk, dv]: [RawTensor; 3],
    dsinks: *mut f32,
    opts: &AttentionOptions,
) -> CResult<()> {
    let desc = |arg, t: &RawTensor| TensorDesc { arg, layout: t.layout, len: t.layout.span().unwrap_or(0) };
    // The GPU call's checks: dO stands in for O (same shape), and a
    // contiguous LSE of the right shape for the one the reference does not need.
    let [bn, lq, hq, _] = q.layout.shape;
    let lse = LseDesc { layout: LseLayout::contiguous(bn, hq, lq), len: bn.saturating_mul(hq).saturating_mul(lq) };
    let grads = [desc("d_o", &d_o), desc("dq", &dq), desc("dk", &dk), desc("dv", &dv)];
    let p = validate_backward(
        T::DTYPE,
        [&desc("q", &q), &desc("k", &k), &desc("v", &v), &desc("o", &d_o)],
        &lse,
        [&grads[0], &grads[1], &grads[2], &grads[3]],
        (!dsinks.is_null()).then_some(hq),
        opts,
    )?;
    let span = |t: &RawTensor| t.layout.span().unwrap_or(0);
    let g = {
        // SAFETY: the caller's contract; the slices end before anything is written.
        let (qs, ks, vs, dos) = unsafe {
            (
                host_slice::<T>("q", q.addr, span(&q))?,
                host_slice::<T>("k", k.addr, span(&k))?,
                host_slice::<T>("v", v.addr, span(&v))?,
                host_slice::<T>("d_o", d_o.addr, span(&d_o))?,
            )
        };
        let host = |s, t: &RawTensor| HostTensor::new(s, t.layout);
        reference::backward(host(qs, &q), host(ks, &k), host(vs, &v), host(dos, &d_o), opts)?
    };
    for (arg, t, vals) in [("dq", &dq, &g.dq), ("dk", &dk, &g.dk), ("dv", &dv, &g.dv)] {
        let [bn, len, hn, d] = t.layout.shape;
        // SAFETY: the caller's contract: host f32 memory covering the span, unshared.
        let out = unsafe { host_slice_mut::<f32>(arg, t.addr, span(t)) }?;
        for b in 0..bn {
            for r in 0..len {
                for h in 0..hn {
                    for x in 0..d {
                        out[t.layout.offset(b, r, h, x)] = vals[((b * len + r) * hn + h) * d + x] as f32;
                    }
                }
            }
        }
    }
    if let (false, Some(ds)) = (dsinks.is_null(), &g.dsinks) {
        // SAFETY: as above, Hq floats.
        let out = unsafe { host_slice_mut::<f32>("dsinks", dsinks as u64, p.heads_q) }?;
        out.iter_mut().zip(ds).for_each(|(o, &x)| *o = x as f32);
    }
    Ok(())
}

/// A host slice over a raw tensor's span, after checking what
/// `slice::from_raw_parts` needs: alignment and a byte size within `isize::MAX`.
///
/// # Safety
/// `addr` holds `span` elements of `T` that nobody writes while the slice lives.
unsafe fn host_slice<'a, T>(arg: &'static str, addr: u64, span: usize) -> CResult<&'a [T]> {
    let size = std::mem::size_of::<T>();
    if span == 0 {
        return Ok(&[]);
    }
    if addr % std::mem::align_of::<T>() as u64 != 0 {
        return Err(Error::Misaligned {
            arg,
            kernel: "reference",
            what: "base address",
            bytes: addr,
            need: "is not a multiple of the element size",
        }
        .into());
    }
    if span.checked_mul(size).is_none_or(|b| b > isize::MAX as usize) {
        let limit = (isize::MAX as usize / size) as u128;
        return Err(Error::SizeOverflow { arg, what: "host elements", value: span as u128, limit }.into());
    }
    // SAFETY: non-null (a null `data` was only allowed for an empty tensor,
    // whose span is 0), aligned, in bounds by the caller's contract, and
    // within isize::MAX bytes.
    Ok(unsafe { std::slice::from_raw_parts(addr as usize as *const T, span) })
}

/// [`host_slice`], writable.
///
/// # Safety
/// As [`host_slice`], and nothing else accesses the memory while it lives.
unsafe fn host_slice_mut<'a, T>(arg: &'static str, addr: u64, span: usize) -> CResult<&'a mut [T]> {
    // SAFETY: the checks are shared; by this function's contract the memory
    // is exclusively ours.
    let s: &[T] = unsafe { host_slice(arg, addr, span) }?;
    Ok(unsafe { std::slice::from_raw_parts_mut(s.as_ptr().cast_mut(), s.len()) })
}

/// The reference on host tensors of element type `T`, O written as f32.
///
/// # Safety
/// As [`fused_attn_reference_forward`].
unsafe fn reference_host<T: Element>(
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    o: RawTensor,
    lse: Option<RawLseTensor>,
    opts: &AttentionOptions,
) -> CResult<()> {
    // Each view reaches as far as its layout says (the caller vouches for
    // the memory); validating O and LSE here too gives them the GPU call's checks.
    let desc = |arg, t: &RawTensor| TensorDesc { arg, layout: t.layout, len: t.layout.span().unwrap_or(0) };
    let lse_desc = lse.map(|l| LseDesc { layout: l.layout, len: l.layout.span().unwrap_or(0) });
    let p = validate(
        T::DTYPE,
        &desc("q", &q),
        &desc("k", &k),
        &desc("v", &v),
        Some(&desc("o", &o)),
        lse_desc.as_ref(),
        opts,
    )?;
    // Validation bounded every span by i64::MAX, so `unwrap_or(0)` is never taken.
    let span = |t: &RawTensor| t.layout.span().unwrap_or(0);
    let r = {
        // SAFETY: the caller's contract; the slices end before O is written.
        let (qs, ks, vs) = unsafe {
            (
                host_slice::<T>("q", q.addr, span(&q))?,
                host_slice::<T>("k", k.addr, span(&k))?,
                host_slice::<T>("v", v.addr, span(&v))?,
            )
        };
        let host = |s, t: &RawTensor| HostTensor::new(s, t.layout);
        reference::forward(host(qs, &q), host(ks, &k), host(vs, &v), opts)?
    };
    let (b_n, lq, hq, d) = (p.batch, p.seqlen_q, p.heads_q, p.head_dim);
    // SAFETY: the caller's contract: O is host f32 memory covering its span,
    // not aliased by anything else during the call.
    let os = unsafe { host_slice_mut::<f32>("o", o.addr, span(&o)) }?;
    for b in 0..b_n {
        for i in 0..lq {
            for h in 0..hq {
                let at = ((b * lq + i) * hq + h) * d;
                for (c, &x) in r.o[at..at + d].iter().enumerate() {
                    os[o.layout.offset(b, i, h, c)] = x as f32;
                }
            }
        }
    }
    if let Some(l) = lse {
        // SAFETY: as for O.
        let ls = unsafe { host_slice_mut::<f32>("lse", l.addr, l.layout.span().unwrap_or(0)) }?;
        for b in 0..b_n {
            for h in 0..hq {
                for i in 0..lq {
                    ls[l.layout.offset(b, h, i)] = r.lse[(b * hq + h) * lq + i] as f32;
                }
            }
        }
    }
    Ok(())
}

/// The message of this thread's last failed call, naming the argument at
/// fault (an empty string after a success). Never null. The text stays
/// valid until the next `fused_attn_*` call on the same thread (this one
/// and [`fused_attn_status_name`] excepted).
#[no_mangle]
pub extern "C" fn fused_attn_last_error_message() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}

/// The name of a status code (`"FUSED_ATTN_STATUS_HEAD_DIM"`), or
/// `"FUSED_ATTN_STATUS_UNKNOWN"` for a value that is none. A static string.
#[no_mangle]
pub extern "C" fn fused_attn_status_name(status: i32) -> *const c_char {
    use FusedAttnStatus as S;
    let all = [
        (S::Ok, c"FUSED_ATTN_STATUS_OK"),
        (S::Rank, c"FUSED_ATTN_STATUS_RANK"),
        (S::ShapeMismatch, c"FUSED_ATTN_STATUS_SHAPE_MISMATCH"),
        (S::HeadsNotDivisible, c"FUSED_ATTN_STATUS_HEADS_NOT_DIVISIBLE"),
        (S::HeadDim, c"FUSED_ATTN_STATUS_HEAD_DIM"),
        (S::Empty, c"FUSED_ATTN_STATUS_EMPTY"),
        (S::LastDimStride, c"FUSED_ATTN_STATUS_LAST_DIM_STRIDE"),
        (S::OutOfBounds, c"FUSED_ATTN_STATUS_OUT_OF_BOUNDS"),
        (S::Overlapping, c"FUSED_ATTN_STATUS_OVERLAPPING"),
        (S::Misaligned, c"FUSED_ATTN_STATUS_MISALIGNED"),
        (S::SizeOverflow, c"FUSED_ATTN_STATUS_SIZE_OVERFLOW"),
        (S::Negative, c"FUSED_ATTN_STATUS_NEGATIVE"),
        (S::DtypeMismatch, c"FUSED_ATTN_STATUS_DTYPE_MISMATCH"),
        (S::InvalidOption, c"FUSED_ATTN_STATUS_INVALID_OPTION"),
        (S::ForeignContext, c"FUSED_ATTN_STATUS_FOREIGN_CONTEXT"),
        (S::NoDriver, c"FUSED_ATTN_STATUS_NO_DRIVER"),
        (S::NoDevice, c"FUSED_ATTN_STATUS_NO_DEVICE"),
        (S::UnsupportedDevice, c"FUSED_ATTN_STATUS_UNSUPPORTED_DEVICE"),
        (S::KernelsNotBuilt, c"FUSED_ATTN_STATUS_KERNELS_NOT_BUILT"),
        (S::NoKernel, c"FUSED_ATTN_STATUS_NO_KERNEL"),
        (S::Cuda, c"FUSED_ATTN_STATUS_CUDA"),
        (S::NullPointer, c"FUSED_ATTN_STATUS_NULL_POINTER"),
        (S::InvalidEnum, c"FUSED_ATTN_STATUS_INVALID_ENUM"),
        (S::Panic, c"FUSED_ATTN_STATUS_PANIC"),
    ];
    let name: &CStr = all.iter().find(|(s, _)| *s as i32 == status).map_or(c"FUSED_ATTN_STATUS_UNKNOWN", |(_, n)| n);
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> String {
        // SAFETY: a valid NUL-terminated string until this thread's next call.
        unsafe { CStr::from_ptr(fused_attn_last_error_message()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_not_an_unwind() {
        let st = run(|| panic!("boom"));
        assert_eq!(st, FusedAttnStatus::Panic);
        assert!(message().contains("boom"), "{}", message());
        assert_eq!(run(|| Ok(())), FusedAttnStatus::Ok);
        assert_eq!(message(), "", "a success clears the message");
    }

    #[test]
    fn every_status_has_its_name() {
        for code in (0..=20).chain(100..=103) {
            // SAFETY: a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(fused_attn_status_name(code)) }.to_str().unwrap();
            let unknown = code == FusedAttnStatus::Unknown as i32;
            assert!(name.starts_with("FUSED_ATTN_STATUS_"), "{code}: {name}");
            assert_eq!(name == "FUSED_ATTN_STATUS_UNKNOWN", unknown, "{code}: {name}");
        }
    }

    #[test]
    fn every_error_kind_has_its_own_code() {
        let errors = [
            Error::Rank { arg: "q", got: 3 },
            Error::HeadsNotDivisible { heads_q: 3, heads_kv: 2 },
            Error::HeadDim { arg: "q", head_dim: 12 },
            Error::Empty { arg: "q", dim: "batch" },
            Error::LastDimStride { arg: "q", stride: 2 },
            Error::OutOfBounds { arg: "q", needed: 2, len: 1 },
            Error::Negative { arg: "q", what: "shape[0]", value: -1 },
            Error::ForeignContext { arg: "stream" },
            Error::NoDriver,
            Error::NoDevice { ordinal: 0, count: 0 },
            Error::UnsupportedDevice { major: 7, minor: 5 },
            Error::KernelsNotBuilt,
            Error::NoKernel { reason: String::new() },
        ];
        let codes: Vec<i32> = errors.iter().map(|e| status_of(e) as i32).collect();
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        assert!(!codes.contains(&(FusedAttnStatus::Unknown as i32)));
    }
}
