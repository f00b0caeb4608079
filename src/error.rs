//! The crate's one error type.
//!
//! Every invalid input maps to a variant that names the offending argument
//! (`"q"`, `"k"`, `"v"`, `"o"`, `"lse"`, `"stream"`, an option name, ...), so
//! a caller can tell what to fix without reading the source. Nothing in the
//! public API panics on user input or on missing hardware.

use cudarc::driver::DriverError;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, from a bad shape to a failed launch.
///
/// `Debug` prints the same text as `Display`, so `fn main() -> Result<(),
/// fused_attn::Error>` shows the message, not a variant name.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A shape or stride list does not have the four dimensions `[B, S, H, D]`.
    #[error("`{arg}` must have rank 4 ([batch, seq, heads, head_dim]), got rank {got}")]
    Rank {
        /// The argument at fault.
        arg: &'static str,
        /// Its rank.
        got: usize,
    },

    /// A dimension of one tensor disagrees with another tensor (e.g. K and V
    /// lengths, O's shape, the batch of Q and K).
    #[error("`{arg}` has {dim} = {got}, expected {expected} (to match {against})")]
    ShapeMismatch {
        /// The argument at fault.
        arg: &'static str,
        /// Which dimension (`"batch"`, `"seqlen"`, `"heads"`, `"head_dim"`, `"len"`).
        dim: &'static str,
        /// What it must be.
        expected: usize,
        /// What it is.
        got: usize,
        /// The tensor it must agree with.
        against: &'static str,
    },

    /// `Hq` is not a multiple of `Hk`, so query heads cannot be grouped over KV heads.
    #[error("`q` has {heads_q} heads, not a multiple of the {heads_kv} heads of `k`/`v` (GQA needs Hq % Hk == 0)")]
    HeadsNotDivisible {
        /// Query heads.
        heads_q: usize,
        /// Key/value heads.
        heads_kv: usize,
    },

    /// The head dimension is zero, not a multiple of 8, or above 256.
    #[error("`{arg}` has head_dim {head_dim}: it must be a multiple of 8 in 8..=256")]
    HeadDim {
        /// The argument at fault.
        arg: &'static str,
        /// The head dimension given.
        head_dim: usize,
    },

    /// Batch or head count is zero. (A zero-length sequence is valid.)
    #[error("`{arg}` has {dim} = 0; batch and head counts must be at least 1")]
    Empty {
        /// The argument at fault.
        arg: &'static str,
        /// `"batch"` or `"heads"`.
        dim: &'static str,
    },

    /// The last (head-dim) dimension is not contiguous.
    #[error("`{arg}` has head_dim stride {stride}; the last dimension must be contiguous (stride 1)")]
    LastDimStride {
        /// The argument at fault.
        arg: &'static str,
        /// The stride given.
        stride: usize,
    },

    /// The view's shape and strides reach past the end of its buffer.
    #[error("`{arg}` reaches element {needed} but its buffer holds {len} elements")]
    OutOfBounds {
        /// The argument at fault.
        arg: &'static str,
        /// One past the highest element index the view touches.
        needed: usize,
        /// Elements in the buffer.
        len: usize,
    },

    /// An output view whose strides make two elements share one address
    /// (e.g. a zero stride): the kernels' writes would race.
    #[error(
        "`{arg}` has overlapping strides {strides:?} for shape {shape:?}; an output needs one address per element"
    )]
    Overlapping {
        /// The argument at fault.
        arg: &'static str,
        /// Its shape.
        shape: [usize; 4],
        /// Its strides.
        strides: [usize; 4],
    },

    /// A pointer or stride does not meet what the chosen kernel needs
    /// (an alignment, or a limit of TMA tensor maps).
    #[error("`{arg}` does not suit kernel {kernel}: its {what} of {bytes} bytes {need}")]
    Misaligned {
        /// The argument at fault.
        arg: &'static str,
        /// The kernel that needs the alignment.
        kernel: &'static str,
        /// What is at fault: `"base address"`, `"batch stride"`, `"seq stride"`, `"heads stride"`.
        what: &'static str,
        /// Its value in bytes.
        bytes: u64,
        /// What the kernel needs, as a phrase (e.g. "is not a multiple of 16").
        need: &'static str,
    },

    /// A size exceeds what the kernels' index types or launch grid can address.
    #[error("`{arg}`: {what} = {value} exceeds the limit {limit}")]
    SizeOverflow {
        /// The argument at fault.
        arg: &'static str,
        /// What overflowed.
        what: &'static str,
        /// Its value.
        value: u128,
        /// The largest value allowed.
        limit: u128,
    },

    /// A size or stride given as a signed integer (the C ABI's `int64_t`)
    /// is negative.
    #[error("`{arg}` has {what} = {value}; sizes and strides must be non-negative")]
    Negative {
        /// The argument at fault.
        arg: &'static str,
        /// Which number (e.g. `"shape[1]"`, `"strides[0]"`).
        what: &'static str,
        /// Its value.
        value: i64,
    },

    /// The element types of the tensors differ (only reachable through the
    /// dynamically typed entry points; the generic API rules it out at compile time).
    #[error("`{arg}` has element type {got}, expected {expected}")]
    DTypeMismatch {
        /// The argument at fault.
        arg: &'static str,
        /// The expected type.
        expected: crate::DType,
        /// The type given.
        got: crate::DType,
    },

    /// An option has a value outside its domain (e.g. a NaN scale, a negative softcap).
    #[error("option `{arg}` = {value}: {reason}")]
    InvalidOption {
        /// The option at fault.
        arg: &'static str,
        /// Its value, printed.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },

    /// A sequence table of a packed (varlen) batch is malformed: `cu_seqlens`
    /// not starting at 0, decreasing, or not ending at the tensor's token
    /// count; `seqused_k` above its sequence's keys; a wrong entry count.
    #[error("`{arg}`[{index}] = {value}: {reason}")]
    SeqLens {
        /// The table at fault (`"cu_seqlens_q"`, `"cu_seqlens_k"`, `"seqused_k"`).
        arg: &'static str,
        /// The first entry at fault (the entry count for a wrong length).
        index: usize,
        /// Its value (the length for a wrong length).
        value: i64,
        /// What is required.
        reason: &'static str,
    },

    /// Appending to a KV cache would write past a sequence's capacity
    /// (`L_max` of a dense cache, its block-table row's pages of a paged one).
    #[error("`{arg}`: sequence {sequence} needs {needed} keys, its cache holds {capacity}")]
    CacheFull {
        /// The cache at fault.
        arg: &'static str,
        /// The sequence.
        sequence: usize,
        /// Its length after the append.
        needed: usize,
        /// What its cache row holds.
        capacity: usize,
    },

    /// A buffer or stream belongs to a different CUDA context than the handle.
    #[error("`{arg}` belongs to a different CUDA context than this Attention handle")]
    ForeignContext {
        /// The argument at fault.
        arg: &'static str,
    },

    /// No CUDA driver library (libcuda) could be loaded.
    #[error("no CUDA driver: libcuda could not be loaded (is an NVIDIA driver installed?)")]
    NoDriver,

    /// The driver loaded but there is no such device.
    #[error("no CUDA device with ordinal {ordinal} ({count} device(s) present)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },

    /// The device's compute capability is below what any kernel supports.
    #[error("compute capability {major}.{minor} is not supported (fused-attn needs sm_80 or newer)")]
    UnsupportedDevice {
        /// Major version.
        major: i32,
        /// Minor version.
        minor: i32,
    },

    /// The crate was built without nvcc, so it carries no GPU kernels.
    #[error(
        "fused-attn was built without GPU kernels (nvcc was not found at build time); \
         rebuild with NVCC or CUDA_HOME set (see the README)"
    )]
    KernelsNotBuilt,

    /// No kernel serves this problem (e.g. a forced kernel family that does
    /// not support the dtype, head dim or device).
    #[error("no kernel for this problem: {reason}")]
    NoKernel {
        /// Why every candidate was rejected.
        reason: String,
    },

    /// A CUDA driver call failed (launch, allocation — out of memory included —,
    /// copy, module load).
    ///
    /// The driver's error code is part of the message and not also reported
    /// as [`std::error::Error::source`], so chain reporters print it once.
    /// (The code's name, not the driver's description: formatting never
    /// calls into libcuda, so it works, and cannot panic, without a driver.)
    #[error("CUDA error while {during}: {}", cuda_code(driver))]
    Cuda {
        /// What the crate was doing.
        during: &'static str,
        /// The driver's error.
        driver: DriverError,
    },
}

/// `CUDA_ERROR_OUT_OF_MEMORY`-style name of a driver error.
fn cuda_code(e: &DriverError) -> String {
    format!("{:?}", e.0)
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Lets callers use `?` on their own cudarc calls in a function that returns
/// this crate's [`Result`].
impl From<DriverError> for Error {
    fn from(driver: DriverError) -> Self {
        Error::Cuda { during: "a CUDA driver call", driver }
    }
}

/// Attaches what the crate was doing to a driver error.
pub(crate) trait CudaContextExt<T> {
    fn during(self, during: &'static str) -> Result<T>;
}

impl<T> CudaContextExt<T> for std::result::Result<T, DriverError> {
    fn during(self, during: &'static str) -> Result<T> {
        self.map_err(|driver| Error::Cuda { during, driver })
    }
}
