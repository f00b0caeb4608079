//! What a caller says about one attention call besides its tensors: the
//! mask and its alignment, scale, softcap, and (for tests and benchmarks) a
//! forced kernel. Plain data; [`validate`](crate::validate) checks it.

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
pub struct AttentionOptions {
    /// Which keys each query sees.
    pub mask: Mask,
    /// Which corner the mask's diagonal starts from.
    pub alignment: MaskAlignment,
    /// Multiplies `q·k`; `None` means `1/sqrt(head_dim)`. Finite, with
    /// `|scale| ≤ 2^64` ([`MAX_SCALE`](crate::internals::MAX_SCALE)).
    pub scale: Option<f32>,
    /// `Some(c)` caps scores as `c·tanh(s/c)` (Gemma-2 style); finite `c > 0`.
    pub softcap: Option<f32>,
    /// `None` lets the dispatcher choose; `Some(f)` forces a family (tests, benchmarks).
    pub kernel: Option<KernelFamily>,
    /// Forces one kernel by its table name, variants (`name__tag`) included:
    /// for benchmarks and ablations. Overrides `kernel`.
    pub kernel_name: Option<&'static str>,
}

impl AttentionOptions {
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
