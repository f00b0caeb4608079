//! What a caller says about one attention call besides its tensors: the
//! mask and its alignment, scale, softcap, the score modifiers (ALiBi,
//! attention sinks), and (for tests and benchmarks) a forced kernel. Plain
//! data; [`validate`](crate::validate) checks it.

use cudarc::driver::CudaSlice;

/// Which keys each query may see: a band around a diagonal of the score
/// matrix. The diagonal is chosen by [`MaskAlignment`] (bottom-right by
/// default): with `off = Lk − Lq` (bottom-right) or `off = 0` (top-left),
/// query `i` sees key `j` iff `i + off − left ≤ j ≤ i + off + right`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Mask {
    /// Every query sees every key.
    #[default]
    Full,
    /// Query `i` sees keys up to `i + off` (causal).
    Causal,
    /// Local attention: `left` keys before the diagonal and `right` after it,
    /// the diagonal itself included. `Window { left: usize::MAX, right: 0 }`
    /// is the same as `Causal`.
    Window {
        /// Keys visible before the diagonal.
        left: usize,
        /// Keys visible after it.
        right: usize,
    },
}

impl Mask {
    /// A sliding window of `left` keys before and `right` after the diagonal.
    pub fn window(left: usize, right: usize) -> Self {
        Mask::Window { left, right }
    }

    /// `(left, right)` band bounds; `None` is unbounded.
    pub fn bounds(self) -> (Option<usize>, Option<usize>) {
        match self {
            Mask::Full => (None, None),
            Mask::Causal => (None, Some(0)),
            Mask::Window { left, right } => (Some(left), Some(right)),
        }
    }
}

impl std::fmt::Display for Mask {
    /// `full`, `causal`, `window(L,R)`, as in reports.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mask::Full => f.write_str("full"),
            Mask::Causal => f.write_str("causal"),
            Mask::Window { left, right } => write!(f, "window({left},{right})"),
        }
    }
}

/// Which corner of the `Lq × Lk` score matrix the mask's diagonal starts
/// from. The two agree when `Lq == Lk`.
///
/// | | bottom-right (default) | top-left |
/// |---|---|---|
/// | diagonal offset | `Lk − Lq` | `0` |
/// | used by | FlashAttention ≥ 2.1, KV-cache decoding (the last query sees every key) | PyTorch SDPA `is_causal=True`, burn's `causal_alignment` top-left |
/// | causal, `Lq < Lk` | query `i` sees keys `0 ..= i + Lk − Lq` | query `i` sees keys `0 ..= i` |
/// | causal, `Lq > Lk` | the first `Lq − Lk` queries see no key (`O = 0`, `LSE = −∞`) | every query sees at least key 0 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum MaskAlignment {
    /// `off = Lk − Lq` (FlashAttention ≥ 2.1; what KV-cache decoding needs).
    #[default]
    BottomRight,
    /// `off = 0` (PyTorch SDPA's `is_causal`).
    TopLeft,
}

/// A family of kernels, from the simplest to the most specialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum KernelFamily {
    /// One CTA per query row; any GPU from sm_80, any alignment. The baseline.
    Naive,
    /// Tiled FlashAttention-2-style kernel (`mma.sync`, `cp.async`), sm_80+.
    Sm80,
    /// Hopper kernel (`wgmma`, TMA, warp specialisation), sm_90a.
    Sm90,
}

impl KernelFamily {
    /// Every family, in the dispatcher's order of preference.
    pub const PREFERENCE: [KernelFamily; 3] = [KernelFamily::Sm90, KernelFamily::Sm80, KernelFamily::Naive];

    /// The `kernels/<stem>.cu` file whose kernels form this family.
    pub fn image_stem(self) -> &'static str {
        match self {
            KernelFamily::Naive => "fwd_naive",
            KernelFamily::Sm80 => "fwd_sm80",
            KernelFamily::Sm90 => "fwd_sm90",
        }
    }

    /// The family of a kernel image, by its file stem.
    pub fn from_image_stem(stem: &str) -> Option<Self> {
        Self::PREFERENCE.into_iter().find(|f| f.image_stem() == stem)
    }

    /// Alignment (bytes) the family needs of base pointers and of every
    /// batch/row/head stride in bytes: the tiled kernels copy 16-byte vectors.
    pub fn alignment(self) -> usize {
        match self {
            KernelFamily::Naive => 2,
            KernelFamily::Sm80 | KernelFamily::Sm90 => 16,
        }
    }
}

/// Per-head `f32` values of a score modifier (ALiBi slopes, sink logits):
/// in host memory for the CPU reference, in device memory for the kernels.
/// A device buffer must belong to the call's context and is read on the
/// call's stream (cudarc's event tracking orders it after its writes).
#[derive(Debug, Clone, Copy)]
pub enum HeadValues<'a> {
    /// Host memory: what [`reference`](crate::reference) reads.
    Host(&'a [f32]),
    /// Device memory: what the kernels read. Its values are not inspected
    /// on the host; they must be finite (non-finite ones give unspecified
    /// output, never a fault).
    Device(&'a CudaSlice<f32>),
    /// A raw device address, taken only by the unsafe
    /// [`Attention::forward_raw`](crate::Attention::forward_raw) (whose
    /// caller vouches for the memory and the count); every safe entry point
    /// and the reference refuse it with [`Error::InvalidOption`](crate::Error::InvalidOption).
    Raw(u64),
}

impl HeadValues<'_> {
    /// Elements available (`usize::MAX` for a raw address: unknown, vouched for).
    pub fn len(&self) -> usize {
        match self {
            HeadValues::Host(s) => s.len(),
            HeadValues::Device(s) => cudarc::driver::DeviceSlice::len(*s),
            HeadValues::Raw(_) => usize::MAX,
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for HeadValues<'_> {
    /// Host values compare by content, device buffers and addresses by identity.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (HeadValues::Host(a), HeadValues::Host(b)) => a == b,
            (HeadValues::Device(a), HeadValues::Device(b)) => std::ptr::eq(*a, *b),
            (HeadValues::Raw(a), HeadValues::Raw(b)) => a == b,
            _ => false,
        }
    }
}

/// ALiBi (Press et al., "Train short, test long"): after the softcap, the
/// score of query `i` and key `j` in query head `h` becomes
/// `s_ij − m_h·|i + off − j|`, with `off` the mask's diagonal offset
/// (`Lk − Lq` bottom-right, `0` top-left) and `i`, `j` positions within the
/// row's own sequence (packed batches and caches included). FlashAttention-2's
/// order and sign convention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alibi<'a> {
    /// The slopes `m`: `[Hq]`, or `[B, Hq]` (batch-major) when `per_batch`.
    pub slopes: HeadValues<'a>,
    /// Whether each batch entry (sequence) has its own slopes.
    pub per_batch: bool,
}

impl<'a> Alibi<'a> {
    /// One slope per query head, `[Hq]`.
    pub fn per_head(slopes: HeadValues<'a>) -> Self {
        Alibi { slopes, per_batch: false }
    }
    /// One slope per (batch entry, query head), `[B, Hq]` batch-major.
    pub fn per_batch(slopes: HeadValues<'a>) -> Self {
        Alibi { slopes, per_batch: true }
    }
}

/// The slopes of the ALiBi paper for `heads` heads: a geometric sequence
/// starting at `2^(−8/n)` with ratio `2^(−8/n)` for the closest power of two
/// `n ≤ heads`, then the odd terms of the sequence for `2n` for the remaining
/// heads (the paper's and FlashAttention's recipe for head counts that are
/// not a power of two).
///
/// ```
/// let s = fused_attn::alibi_slopes(8);
/// assert_eq!(s[0], 0.5);
/// assert_eq!(s[7], 1.0 / 256.0);
/// ```
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    fn pow2_series(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (1..=n).map(|i| start.powi(i as i32)).collect()
    }
    if heads == 0 {
        return Vec::new();
    }
    let n = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let mut s = pow2_series(n);
    s.extend(pow2_series(2 * n).into_iter().step_by(2).take(heads - n));
    s.into_iter().map(|x| x as f32).collect()
}

/// Options of one attention call. Build with [`AttentionOptions::new`] and
/// the `with_*` methods; new options arrive as new methods, not a breaking
/// change.
///
/// ```
/// use fused_attn::{AttentionOptions, Mask, MaskAlignment};
/// let sdpa_causal = AttentionOptions::new(Mask::Causal).with_alignment(MaskAlignment::TopLeft);
/// let gemma = AttentionOptions::new(Mask::window(4096, 0)).with_softcap(50.0).with_scale(0.0625);
/// # let _ = (sdpa_causal, gemma);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct AttentionOptions<'a> {
    /// Which keys each query sees.
    pub mask: Mask,
    /// Which corner the mask's diagonal starts from.
    pub alignment: MaskAlignment,
    /// Multiplies `q·k`; `None` means `1/sqrt(head_dim)`. Finite, with
    /// `|scale| ≤ 2^64` ([`MAX_SCALE`](crate::internals::MAX_SCALE)).
    pub scale: Option<f32>,
    /// `Some(c)` caps scores as `c·tanh(s/c)` (Gemma-2 style); finite `c > 0`.
    pub softcap: Option<f32>,
    /// ALiBi slopes ([`Alibi`]): a linear distance penalty after the softcap.
    pub alibi: Option<Alibi<'a>>,
    /// Attention sinks: one logit `σ_h` per query head (`[Hq]`, finite) that
    /// joins every row's softmax denominator and contributes no value
    /// (gpt-oss): `O_i = Σ_j e^{s_ij} v_j / (e^{σ_h} + Σ_j e^{s_ij})`,
    /// `LSE_i = log(e^{σ_h} + Σ_j e^{s_ij})`; a row with no visible key gets
    /// `O = 0`, `LSE = σ_h`.
    pub sinks: Option<HeadValues<'a>>,
    /// `None` lets the dispatcher choose; `Some(f)` forces a family (tests, benchmarks).
    pub kernel: Option<KernelFamily>,
    /// Forces one kernel by its table name, variants (`name__tag`) included:
    /// for benchmarks and ablations. Overrides `kernel`.
    pub kernel_name: Option<&'static str>,
}

impl<'a> AttentionOptions<'a> {
    /// Options with the given mask and defaults otherwise.
    pub fn new(mask: Mask) -> Self {
        AttentionOptions { mask, ..Default::default() }
    }
    /// Sets the mask.
    pub fn with_mask(mut self, mask: Mask) -> Self {
        self.mask = mask;
        self
    }
    /// Sets the mask's alignment (default bottom-right).
    pub fn with_alignment(mut self, alignment: MaskAlignment) -> Self {
        self.alignment = alignment;
        self
    }
    /// Sets the score scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// Sets the softcap.
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }
    /// Sets ALiBi slopes.
    pub fn with_alibi(mut self, alibi: Alibi<'a>) -> Self {
        self.alibi = Some(alibi);
        self
    }
    /// Sets attention-sink logits, one per query head.
    pub fn with_sinks(mut self, sinks: HeadValues<'a>) -> Self {
        self.sinks = Some(sinks);
        self
    }
    /// Forces a kernel family.
    pub fn with_kernel(mut self, family: KernelFamily) -> Self {
        self.kernel = Some(family);
        self
    }
    /// Forces one kernel by name (see [`Attention::kernels`](crate::Attention::kernels)).
    pub fn with_kernel_name(mut self, name: &'static str) -> Self {
        self.kernel_name = Some(name);
        self
    }
}
