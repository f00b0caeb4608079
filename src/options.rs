//! Masks, scale, softcap, kernel choice, and validation of a whole problem.
//!
//! [`validate`] is the single place where the shapes, strides and options of
//! an attention call are checked (DESIGN.md section 6). Both the GPU path and
//! the CPU [`reference`](crate::reference) go through it, so the two accept
//! and reject exactly the same inputs.

use crate::error::{Error, Result};
use crate::tensor::{DType, Layout};

/// Which keys each query may see. Masks are aligned to the **bottom-right**
/// corner of the score matrix: with `off = Lk - Lq`, query `i` sees key `j`
/// iff `i + off - left <= j <= i + off + right`.
///
/// PyTorch's `is_causal=True` is aligned to the *top-left* corner instead;
/// the two agree only when `Lq == Lk`. Bottom-right is what KV-cache decoding
/// needs (the last query sees every key) and what FlashAttention >= 2.1 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mask {
    /// Every query sees every key.
    #[default]
    Full,
    /// Query `i` sees keys up to `i + Lk - Lq` (bottom-right causal).
    Causal,
    /// Local attention: `left` keys before the diagonal and `right` after it,
    /// the diagonal itself included. `Window { left: usize::MAX, right: 0 }`
    /// is the same as `Causal`.
    Window {
        /// Keys visible before the (bottom-right) diagonal.
        left: usize,
        /// Keys visible after it.
        right: usize,
    },
}

impl Mask {
    /// `(left, right)` band bounds; `None` is unbounded.
    pub fn bounds(self) -> (Option<usize>, Option<usize>) {
        match self {
            Mask::Full => (None, None),
            Mask::Causal => (None, Some(0)),
            Mask::Window { left, right } => (Some(left), Some(right)),
        }
    }

    /// Name as used in reports: `full`, `causal`, `window(L,R)`.
    pub fn name(self) -> String {
        match self {
            Mask::Full => "full".into(),
            Mask::Causal => "causal".into(),
            Mask::Window { left, right } => format!("window({left},{right})"),
        }
    }
}

/// A family of kernels, from the simplest to the most specialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelFamily {
    /// One CTA per query row; any GPU from sm_80, any alignment. The baseline.
    Naive,
    /// Tiled FlashAttention-2-style kernel (`mma.sync`, `cp.async`), sm_80+.
    Sm80,
    /// Hopper kernel (`wgmma`, TMA, warp specialisation), sm_90a.
    Sm90,
}

impl KernelFamily {
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
        [KernelFamily::Naive, KernelFamily::Sm80, KernelFamily::Sm90].into_iter().find(|f| f.image_stem() == stem)
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

/// Options of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOptions {
    /// Which keys each query sees.
    pub mask: Mask,
    /// Multiplies `q·k`; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// `Some(c)` caps scores as `c·tanh(s/c)` (Gemma-2 style); `c > 0`.
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
    /// Forces one kernel by name (see [`crate::sys::KERNEL_TABLE`]).
    pub fn with_kernel_name(mut self, name: &'static str) -> Self {
        self.kernel_name = Some(name);
        self
    }
}

/// A validated attention problem: every size and option is known good.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    /// Element type of Q, K, V and O.
    pub dtype: DType,
    /// Batch size `B`.
    pub batch: usize,
    /// Query length `Lq`.
    pub seqlen_q: usize,
    /// Key/value length `Lk`.
    pub seqlen_k: usize,
    /// Query heads `Hq`.
    pub heads_q: usize,
    /// Key/value heads `Hk` (divides `Hq`).
    pub heads_kv: usize,
    /// Head dimension `D` (multiple of 8, at most 256).
    pub head_dim: usize,
    /// The mask.
    pub mask: Mask,
    /// The effective scale (default resolved).
    pub scale: f32,
    /// The softcap, if any.
    pub softcap: Option<f32>,
}

/// Largest sequence length: the kernels do band arithmetic in `i32`, where
/// `i + (Lk - Lq) + right` with `right` clamped to `Lq + Lk` must not overflow.
pub const MAX_SEQLEN: usize = 1 << 28;
/// Largest batch and head count: they index the launch grid's y and z.
pub const MAX_GRID_YZ: usize = 65_535;
/// Largest head dimension served.
pub const MAX_HEAD_DIM: usize = 256;

impl Problem {
    /// Query heads per KV head.
    pub fn q_per_kv(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// The keys `[lo, hi)` visible to query row `i` (empty when `lo >= hi`).
    pub fn key_range(&self, i: usize) -> (usize, usize) {
        let (left, right) = self.mask.bounds();
        // i + off with off = Lk - Lq, done in i128 so no case overflows.
        let diag = i as i128 + self.seqlen_k as i128 - self.seqlen_q as i128;
        let lo = left.map_or(0, |l| (diag - l as i128).max(0));
        let hi = right.map_or(self.seqlen_k as i128, |r| (diag + r as i128 + 1).min(self.seqlen_k as i128));
        (lo as usize, (hi.max(lo)) as usize)
    }

    /// Number of visible (query, key) pairs of one head: the exact work.
    pub fn visible_pairs(&self) -> u128 {
        (0..self.seqlen_q).map(|i| self.key_range(i)).map(|(lo, hi)| (hi - lo) as u128).sum()
    }

    /// Forward FLOPs: `4 · B · Hq · D · visible pairs` (DESIGN.md section 5).
    pub fn flops(&self) -> u128 {
        4 * self.batch as u128 * self.heads_q as u128 * self.head_dim as u128 * self.visible_pairs()
    }

    /// The band bounds as the kernels take them: `-1` for unbounded, finite
    /// values clamped to `Lq + Lk` (which changes nothing, and keeps `i32` sums safe).
    pub fn window_i32(&self) -> (i32, i32) {
        let cap = (self.seqlen_q + self.seqlen_k) as u64;
        let conv = |b: Option<usize>| b.map_or(-1, |v| (v as u64).min(cap) as i32);
        let (l, r) = self.mask.bounds();
        (conv(l), conv(r))
    }
}

/// What [`validate`] needs to know of one tensor argument.
#[derive(Debug, Clone, Copy)]
pub struct TensorDesc {
    /// Its name in error messages.
    pub arg: &'static str,
    /// Shape and strides.
    pub layout: Layout,
    /// Elements in the underlying buffer (view).
    pub len: usize,
}

/// Checks a whole problem: Q, K, V, optionally O and an LSE buffer length.
///
/// The order of checks is fixed so the reported argument is predictable:
/// per-tensor checks (empty dims, last stride, bounds) in the order q, k, v, o;
/// then cross-tensor shapes; then size limits; then options.
pub fn validate(
    dtype: DType,
    q: &TensorDesc,
    k: &TensorDesc,
    v: &TensorDesc,
    o: Option<&TensorDesc>,
    lse_len: Option<usize>,
    opts: &AttentionOptions,
) -> Result<Problem> {
    for t in [Some(q), Some(k), Some(v), o].into_iter().flatten() {
        check_tensor(t)?;
    }
    let [batch, seqlen_q, heads_q, head_dim] = q.layout.shape;
    let [_, seqlen_k, heads_kv, _] = k.layout.shape;
    if head_dim == 0 || head_dim % 8 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::HeadDim { arg: "q", head_dim });
    }
    let expect = |t: &TensorDesc, dim: &'static str, idx: usize, expected: usize, against: &'static str| {
        let got = t.layout.shape[idx];
        if got == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { arg: t.arg, dim, expected, got, against })
        }
    };
    expect(k, "batch", 0, batch, "q")?;
    expect(k, "head_dim", 3, head_dim, "q")?;
    expect(v, "batch", 0, batch, "q")?;
    expect(v, "seqlen", 1, seqlen_k, "k")?;
    expect(v, "heads", 2, heads_kv, "k")?;
    expect(v, "head_dim", 3, head_dim, "q")?;
    if heads_q % heads_kv != 0 {
        return Err(Error::HeadsNotDivisible { heads_q, heads_kv });
    }
    if let Some(o) = o {
        if !o.layout.is_non_overlapping() {
            return Err(Error::Overlapping { arg: o.arg, shape: o.layout.shape, strides: o.layout.strides });
        }
        expect(o, "batch", 0, batch, "q")?;
        expect(o, "seqlen", 1, seqlen_q, "q")?;
        expect(o, "heads", 2, heads_q, "q")?;
        expect(o, "head_dim", 3, head_dim, "q")?;
    }
    if let Some(len) = lse_len {
        let expected = batch * heads_q * seqlen_q;
        if len != expected {
            return Err(Error::ShapeMismatch { arg: "lse", dim: "len", expected, got: len, against: "q" });
        }
    }
    let limit = |arg: &'static str, what: &'static str, value: usize, limit: usize| {
        if value > limit {
            Err(Error::SizeOverflow { arg, what, value: value as u128, limit: limit as u128 })
        } else {
            Ok(())
        }
    };
    limit("q", "seqlen", seqlen_q, MAX_SEQLEN)?;
    limit("k", "seqlen", seqlen_k, MAX_SEQLEN)?;
    limit("q", "batch", batch, MAX_GRID_YZ)?;
    limit("q", "heads", heads_q, MAX_GRID_YZ)?;

    let scale = opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::InvalidOption { arg: "scale", value: scale.to_string(), reason: "must be finite" });
    }
    if let Some(c) = opts.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::InvalidOption {
                arg: "softcap",
                value: c.to_string(),
                reason: "must be finite and > 0",
            });
        }
    }
    Ok(Problem {
        dtype,
        batch,
        seqlen_q,
        seqlen_k,
        heads_q,
        heads_kv,
        head_dim,
        mask: opts.mask,
        scale,
        softcap: opts.softcap,
    })
}

/// Checks of one tensor on its own: non-empty batch/heads, contiguous last
/// dimension, the view inside its buffer, offsets within `i64`.
fn check_tensor(t: &TensorDesc) -> Result<()> {
    let [batch, _, heads, _] = t.layout.shape;
    if batch == 0 {
        return Err(Error::Empty { arg: t.arg, dim: "batch" });
    }
    if heads == 0 {
        return Err(Error::Empty { arg: t.arg, dim: "heads" });
    }
    if t.layout.strides[3] != 1 {
        return Err(Error::LastDimStride { arg: t.arg, stride: t.layout.strides[3] });
    }
    let span = t.layout.span().ok_or(Error::SizeOverflow {
        arg: t.arg,
        what: "highest element offset",
        value: u128::MAX,
        limit: i64::MAX as u128,
    })?;
    if span > i64::MAX as usize {
        return Err(Error::SizeOverflow {
            arg: t.arg,
            what: "highest element offset",
            value: span as u128,
            limit: i64::MAX as u128,
        });
    }
    if span > t.len {
        return Err(Error::OutOfBounds { arg: t.arg, needed: span, len: t.len });
    }
    Ok(())
}

/// Checks that a family's alignment holds for a tensor: its base address and
/// every batch/seq/head stride, in bytes.
pub fn check_alignment(
    t: &TensorDesc,
    base_addr: u64,
    elem_bytes: usize,
    family: KernelFamily,
    kernel: &'static str,
) -> Result<()> {
    let align = family.alignment();
    if base_addr % align as u64 != 0 {
        return Err(Error::Misaligned {
            arg: t.arg,
            kernel,
            detail: format!("base address {base_addr:#x} is not a multiple of {align} bytes"),
        });
    }
    for (i, dim) in ["batch", "seq", "heads"].into_iter().enumerate() {
        let bytes = t.layout.strides[i] * elem_bytes;
        // A dimension of extent 1 never steps, so its stride is irrelevant.
        if t.layout.shape[i] > 1 && bytes % align != 0 {
            return Err(Error::Misaligned {
                arg: t.arg,
                kernel,
                detail: format!("{dim} stride of {bytes} bytes is not a multiple of {align}"),
            });
        }
    }
    Ok(())
}

/// Checks that all tensors of a dynamically typed call share `q`'s element type.
pub fn check_dtypes(q: DType, others: &[(&'static str, DType)]) -> Result<()> {
    match others.iter().find(|(_, d)| *d != q) {
        Some(&(arg, got)) => Err(Error::DTypeMismatch { arg, expected: q, got }),
        None => Ok(()),
    }
}
