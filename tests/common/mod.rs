//! Shared by the GPU tests and the benchmark: seeded inputs in layouts of
//! their own (every tensor its own strides and padding), outputs poisoned
//! with guard regions around their views, and the comparison against the
//! f64 CPU reference: whole-tensor and per-row O error, LSE per row relative
//! to the row's largest score, and stray or missing writes.
#![allow(dead_code)]

use std::sync::Arc;

use fused_attn::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use fused_attn::reference::{self, capped_score, rel_l2_error};
use fused_attn::{
    cuda_context, Alibi, Attention, AttentionOptions, DType, DeviceTensor, DeviceTensorMut, Element, Error, HeadValues,
    HostTensor, KernelInfo, Layout, LseLayout, LseTensorMut, Problem,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A GPU with the kernels loaded, or the reason there is none.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub attn: Attention,
    pub name: String,
}

pub fn open_gpu() -> Result<Gpu, String> {
    let ctx = cuda_context(0).map_err(|e| e.to_string())?;
    let attn = Attention::new(&ctx).map_err(|e| e.to_string())?;
    let name = ctx.name().unwrap_or_default();
    Ok(Gpu { ctx, attn, name })
}

/// How one tensor is laid out in memory. Every padding used by the sweeps is
/// a multiple of 8 elements (16 bytes), so the tiled kernels still accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Contiguous `[B, S, H, D]`.
    Bshd,
    /// Contiguous `[B, H, S, D]`.
    Bhsd,
    /// `[B, S, H, D]` with `pad` extra elements after every sequence row and
    /// after every batch.
    Padded(usize),
    /// `[B, S, H, D]` with a gap of `pad` elements after every head (head
    /// stride `D + pad`), and `pad` more after every row and batch.
    HeadPadded(usize),
    /// `[B, H, S, D]` with `pad` extra elements after every row, every head
    /// and every batch.
    BhsdPadded(usize),
}

impl Storage {
    pub fn layout(self, b: usize, s: usize, h: usize, d: usize) -> Layout {
        match self {
            Storage::Bshd => Layout::bshd(b, s, h, d),
            Storage::Bhsd => Layout::bhsd(b, h, s, d),
            Storage::Padded(pad) => {
                let row = h * d + pad;
                Layout::strided_bshd([b, s, h, d], [s * row + pad, row, d, 1])
            }
            Storage::HeadPadded(pad) => {
                let head = d + pad;
                let row = h * head + pad;
                Layout::strided_bshd([b, s, h, d], [s * row + pad, row, head, 1])
            }
            Storage::BhsdPadded(pad) => {
                let row = d + pad;
                let head = s * row + pad;
                Layout::strided_bshd([b, s, h, d], [h * head + pad, row, head, 1])
            }
        }
    }

    /// Short name for trial names: `bshd`, `bhsd`, `pad8`, `hpad8`, `bhsdpad8`.
    pub fn tag(self) -> String {
        match self {
            Storage::Bshd => "bshd".into(),
            Storage::Bhsd => "bhsd".into(),
            Storage::Padded(p) => format!("pad{p}"),
            Storage::HeadPadded(p) => format!("hpad{p}"),
            Storage::BhsdPadded(p) => format!("bhsdpad{p}"),
        }
    }

    /// Every kind, with paddings the tiled kernels accept.
    pub const ALL: [Storage; 7] = [
        Storage::Bshd,
        Storage::Bhsd,
        Storage::Padded(8),
        Storage::Padded(24),
        Storage::HeadPadded(8),
        Storage::BhsdPadded(16),
        Storage::BhsdPadded(8),
    ];
}

/// How the LSE `[B, Hq, Lq]` view is laid out (rows always contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LseStorage {
    /// `LseLayout::contiguous`.
    Contiguous,
    /// `[B, Hq, Lq]` with `gap` unused floats after every row and every batch.
    Gapped(usize),
    /// Memory order `[Hq, B, Lq]` (batch inside head), `gap` floats after
    /// every row and every head.
    HeadMajor(usize),
}

impl LseStorage {
    pub fn layout(self, b: usize, h: usize, l: usize) -> LseLayout {
        match self {
            LseStorage::Contiguous => LseLayout::contiguous(b, h, l),
            LseStorage::Gapped(gap) => {
                let head = l + gap;
                LseLayout::strided([b, h, l], [h * head + gap, head, 1])
            }
            LseStorage::HeadMajor(gap) => {
                let batch = l + gap;
                LseLayout::strided([b, h, l], [batch, b * batch + gap, 1])
            }
        }
    }

    pub fn tag(self) -> String {
        match self {
            LseStorage::Contiguous => "lse".into(),
            LseStorage::Gapped(g) => format!("lsegap{g}"),
            LseStorage::HeadMajor(g) => format!("lsehmaj{g}"),
        }
    }

    pub const ALL: [LseStorage; 4] =
        [LseStorage::Contiguous, LseStorage::Gapped(3), LseStorage::Gapped(16), LseStorage::HeadMajor(5)];
}

/// The layouts of one problem's tensors: each its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layouts {
    pub q: Storage,
    pub k: Storage,
    pub v: Storage,
    pub o: Storage,
    pub lse: LseStorage,
}

impl Layouts {
    /// Every tensor in `s`, LSE contiguous.
    pub fn uniform(s: Storage) -> Self {
        Layouts { q: s, k: s, v: s, o: s, lse: LseStorage::Contiguous }
    }

    /// Four different storages for Q, K, V and O (a random choice among
    /// [`Storage::ALL`]) and a random LSE layout.
    pub fn random(rng: &mut StdRng) -> Self {
        let mut pool = Storage::ALL.to_vec();
        let mut take = |rng: &mut StdRng| pool.swap_remove(rng.random_range(0..pool.len()));
        let (q, k, v, o) = (take(rng), take(rng), take(rng), take(rng));
        Layouts { q, k, v, o, lse: LseStorage::ALL[rng.random_range(0..LseStorage::ALL.len())] }
    }

    /// `q-bshd.k-pad8.v-bhsd.o-hpad8.lsegap3`, or the one storage's tag when uniform.
    pub fn tag(&self) -> String {
        if *self == Layouts::uniform(self.q) {
            return self.q.tag();
        }
        format!("q-{}.k-{}.v-{}.o-{}.{}", self.q.tag(), self.k.tag(), self.v.tag(), self.o.tag(), self.lse.tag())
    }
}

/// Normal(0, 1) samples (Box–Muller) times `mult`, rounded to `T`: never
/// zeros, never all equal.
pub fn randn_scaled<T: Element>(rng: &mut StdRng, n: usize, mult: f32) -> Vec<T> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            T::from_f32(mult * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos())
        })
        .collect()
}

/// Normal(0, 1) samples rounded to `T`.
pub fn randn<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    randn_scaled(rng, n, 1.0)
}

/// The poison value: all bits set (a NaN in f16, bf16 and f32 that no
/// arithmetic produces; the f32 → f16/bf16 conversions keep every bit).
pub fn poison_value<T: Element>() -> T {
    T::from_f32(f32::from_bits(u32::MAX))
}

/// `n` poison values of `T`.
pub fn poison<T: Element>(n: usize) -> Vec<T> {
    vec![poison_value::<T>(); n]
}

/// The f32 poison (all bits set).
pub const LSE_POISON: u32 = u32::MAX;

/// Poisoned elements before and after O's view in its allocation (a
/// multiple of 8, so the view stays 16-byte aligned).
pub const O_GUARD: usize = 64;
/// Poisoned floats before and after LSE's view.
pub const LSE_GUARD: usize = 16;

/// One attention problem's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub b: usize,
    pub lq: usize,
    pub lk: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
}

/// Host inputs of a problem, each in its own storage layout.
pub struct Inputs<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub ql: Layout,
    pub kl: Layout,
    pub vl: Layout,
}

/// Inputs with every tensor in `storage`.
pub fn make_inputs<T: Element>(seed: u64, s: Shape, storage: Storage) -> Inputs<T> {
    make_inputs_in(seed, s, &Layouts::uniform(storage), 1.0)
}

/// Inputs in the layouts of `l`; Q and K are multiplied by `qk_mult` (large
/// values give huge logits).
pub fn make_inputs_in<T: Element>(seed: u64, s: Shape, l: &Layouts, qk_mult: f32) -> Inputs<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ql = l.q.layout(s.b, s.lq, s.hq, s.d);
    let kl = l.k.layout(s.b, s.lk, s.hk, s.d);
    let vl = l.v.layout(s.b, s.lk, s.hk, s.d);
    // Padding is filled with random values too: reading it would show.
    Inputs {
        q: randn_scaled(&mut rng, ql.span().unwrap(), qk_mult),
        k: randn_scaled(&mut rng, kl.span().unwrap(), qk_mult),
        v: randn(&mut rng, vl.span().unwrap()),
        ql,
        kl,
        vl,
    }
}

pub fn upload<T: Element>(stream: &Arc<CudaStream>, x: &[T]) -> Result<CudaSlice<T>, Error> {
    stream.clone_htod(x).map_err(|driver| Error::Cuda { during: "upload", driver })
}

pub fn download<T: Element>(stream: &Arc<CudaStream>, x: &CudaSlice<T>) -> Result<Vec<T>, Error> {
    stream.clone_dtoh(x).map_err(|driver| Error::Cuda { during: "download", driver })
}

/// Result of one GPU run compared with the reference.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The kernel that ran.
    pub kernel: KernelInfo,
    pub cmp: Comparison,
}

impl Checked {
    /// [`Comparison::verdict`], naming the kernel.
    pub fn verdict(&self, dtype: DType) -> Result<(), String> {
        self.cmp.verdict(dtype).map_err(|e| format!("{}: {e}", self.kernel.name))
    }
}

/// Outputs (as read back) against the reference.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Whole-tensor relative L2 error of O.
    pub o_err: f64,
    /// Whole-tensor relative L2 error of LSE.
    pub lse_err: f64,
    /// The worst row's `‖o_i − r_i‖ / ‖r_i‖` over every (b, h, i); a row
    /// whose reference is 0 (no visible key) must be exactly 0.
    pub row_err: f64,
    /// The worst row's `|lse_i − ref_i| / max(1, max_j |s_ij|)`; `-inf` rows must match exactly.
    pub lse_row_err: f64,
    /// Elements of O's or LSE's allocation outside the view that lost their poison.
    pub stray: usize,
    /// Elements inside O's or LSE's view still holding the poison.
    pub unwritten: usize,
    /// The first few stray or unwritten elements, for the failure message.
    pub write_notes: Vec<String>,
    /// Raw output bits in `[B, Lq, Hq, D]` order, for determinism checks.
    pub o_bits: Vec<u16>,
}

/// The worst row's O error allowed: 3 × the whole-tensor tolerance.
pub fn row_tolerance(dtype: DType) -> f64 {
    3.0 * tolerance(dtype)
}

/// LSE per row: `|lse − ref| ≤ LSE_ROW_TOL · max(1, max_j |s_ij|)`.
pub const LSE_ROW_TOL: f64 = 1e-4;

impl Comparison {
    /// Every rule of DESIGN.md section 4 for one case: O rel L2 within the
    /// dtype's tolerance, the worst row within 3×, LSE per row, LSE rel L2,
    /// and no stray or missing write.
    pub fn verdict(&self, dtype: DType) -> Result<(), String> {
        let tol = tolerance(dtype);
        let mut bad = Vec::new();
        if exceeds(self.o_err, tol) {
            bad.push(format!("O rel L2 {:.3e} > {tol:.0e}", self.o_err));
        }
        if exceeds(self.row_err, row_tolerance(dtype)) {
            bad.push(format!("worst O row {:.3e} > {:.0e}", self.row_err, row_tolerance(dtype)));
        }
        if exceeds(self.lse_row_err, LSE_ROW_TOL) {
            bad.push(format!(
                "worst LSE row {:.3e} (relative to max(1, max|s|)) > {LSE_ROW_TOL:.0e}",
                self.lse_row_err
            ));
        }
        if exceeds(self.lse_err, 1e-3) {
            bad.push(format!("LSE rel L2 {:.3e} > 1e-3", self.lse_err));
        }
        if self.stray > 0 || self.unwritten > 0 {
            bad.push(format!(
                "{} stray writes outside the views, {} unwritten elements inside: {}",
                self.stray,
                self.unwritten,
                self.write_notes.join("; ")
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join(", "))
        }
    }
}

/// `x > tol`, NaN included.
pub fn exceeds(x: f64, tol: f64) -> bool {
    x.is_nan() || x > tol
}

/// Runs one problem on the GPU and compares it with the f64 reference.
///
/// O gets its own layout `o` inside a larger allocation: [`O_GUARD`]
/// elements before and after the view, all of it poisoned; LSE likewise
/// (`lse` layout, [`LSE_GUARD`] floats each side). Everything is read back,
/// so a write outside a view, or an element of a view left unwritten, shows.
pub fn run_and_check<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inp: &Inputs<T>,
    s: Shape,
    o: Storage,
    lse: LseStorage,
    opts: &AttentionOptions,
) -> Result<Checked, String> {
    run_and_check_mods(gpu, stream, inp, s, o, lse, opts, &HostModifiers::default())
}

/// Score modifiers of a GPU case as host values: uploaded for the kernel,
/// read from the host by the reference.
#[derive(Debug, Clone, Default)]
pub struct HostModifiers {
    /// ALiBi slopes and whether they are per batch entry (`[B, Hq]`).
    pub alibi: Option<(Vec<f32>, bool)>,
    /// Sink logits `[Hq]`.
    pub sinks: Option<Vec<f32>>,
}

/// [`run_and_check`] with ALiBi slopes and sinks (`mods`) set on `opts`.
#[allow(clippy::too_many_arguments)]
pub fn run_and_check_mods<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inp: &Inputs<T>,
    s: Shape,
    o: Storage,
    lse: LseStorage,
    opts: &AttentionOptions,
    mods: &HostModifiers,
) -> Result<Checked, String> {
    let up = |v: &Vec<f32>| stream.clone_htod(v).map_err(|e| e.to_string());
    let alibi_dev = mods.alibi.as_ref().map(|(v, _)| up(v)).transpose()?;
    let sinks_dev = mods.sinks.as_ref().map(up).transpose()?;
    let (mut dev_opts, mut host_opts) = (*opts, *opts);
    if let (Some((host, per_batch)), Some(dev)) = (&mods.alibi, &alibi_dev) {
        dev_opts.alibi = Some(Alibi { slopes: HeadValues::Device(dev), per_batch: *per_batch });
        host_opts.alibi = Some(Alibi { slopes: HeadValues::Host(host), per_batch: *per_batch });
    }
    if let (Some(host), Some(dev)) = (&mods.sinks, &sinks_dev) {
        dev_opts.sinks = Some(HeadValues::Device(dev));
        host_opts.sinks = Some(HeadValues::Host(host));
    }
    let (opts, ref_opts) = (&dev_opts, &host_opts);
    let e = |e: Error| e.to_string();
    let (q, k, v) =
        (upload(stream, &inp.q).map_err(e)?, upload(stream, &inp.k).map_err(e)?, upload(stream, &inp.v).map_err(e)?);
    let ol = o.layout(s.b, s.lq, s.hq, s.d);
    let o_span = ol.span().unwrap();
    let mut o_buf = upload(stream, &poison::<T>(O_GUARD + o_span + O_GUARD)).map_err(e)?;
    let ll = lse.layout(s.b, s.hq, s.lq);
    let lse_span = ll.span().unwrap();
    let lse_poison = vec![f32::from_bits(LSE_POISON); LSE_GUARD + lse_span + LSE_GUARD];
    let mut lse_buf = stream.clone_htod(&lse_poison).map_err(|e| e.to_string())?;
    let kernel = {
        let (qt, kt, vt) =
            (DeviceTensor::new(&q, inp.ql), DeviceTensor::new(&k, inp.kl), DeviceTensor::new(&v, inp.vl));
        let mut ot = DeviceTensorMut::from_view(o_buf.slice_mut(O_GUARD..O_GUARD + o_span), ol);
        let mut lv = LseTensorMut::from_view(lse_buf.slice_mut(LSE_GUARD..LSE_GUARD + lse_span), ll);
        gpu.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lv), opts).map_err(e)?
    };
    let o_host = download(stream, &o_buf).map_err(e)?;
    let lse_host: Vec<f32> = stream.clone_dtoh(&lse_buf).map_err(|e| e.to_string())?;

    let (qh, kh, vh) =
        (HostTensor::new(&inp.q, inp.ql), HostTensor::new(&inp.k, inp.kl), HostTensor::new(&inp.v, inp.vl));
    let r = reference::forward(qh, kh, vh, ref_opts).map_err(e)?;
    let smax = row_max_abs_scores(&r.problem, qh, kh);
    Ok(Checked { kernel, cmp: compare(&r, &smax, s, (&o_host, ol), (&lse_host, ll))? })
}

/// The squared norm under which an O row of `d` elements is measured in
/// absolute terms: `d` elements at the dtype's smallest normal value. Below
/// it the output type holds only subnormals (f16: steps of 2^-24), so a row
/// whose true values are all smaller (a sink of 25 outweighing every key
/// makes them ~1e-10) cannot keep its relative precision; it rounds to 0 in
/// f16 on every family. bf16 has f32's range: its floor never matters. Seen
/// on the first H200 run (2026-11-26): 26 f16 sink trials, worst row 1.0.
pub fn row_norm_floor2(dtype: DType, d: usize) -> f64 {
    let min_normal = match dtype {
        DType::F16 => 2f64.powi(-14),
        DType::BF16 => 2f64.powi(-126),
    };
    d as f64 * min_normal * min_normal
}

/// The comparison half of [`run_and_check`], for callers with their own
/// launch: `o_alloc` is O's whole allocation with the view at [`O_GUARD`],
/// `lse_alloc` LSE's with the view at [`LSE_GUARD`].
pub fn compare<T: Element>(
    r: &reference::Reference,
    smax: &[f64],
    s: Shape,
    (o_alloc, ol): (&[T], Layout),
    (lse_alloc, ll): (&[f32], LseLayout),
) -> Result<Comparison, String> {
    let e = |e: Error| e.to_string();
    let d = s.d;
    // Gather O from its storage into the reference's contiguous BSHD order,
    // marking the view's elements.
    let mut in_view = vec![false; o_alloc.len()];
    let mut got = Vec::with_capacity(r.o.len());
    let mut bits = Vec::with_capacity(r.o.len());
    for b in 0..s.b {
        for i in 0..s.lq {
            for h in 0..s.hq {
                for x in 0..d {
                    let at = O_GUARD + ol.offset(b, i, h, x);
                    in_view[at] = true;
                    got.push(o_alloc[at].into());
                    bits.push(o_alloc[at].to_bits());
                }
            }
        }
    }
    let poison_bits = poison_value::<T>().to_bits();
    let (mut stray, mut unwritten, mut notes) = (0usize, 0usize, Vec::new());
    let mut note = |n: &mut usize, msg: String| {
        *n += 1;
        if notes.len() < 4 {
            notes.push(msg);
        }
    };
    for (at, (&inside, x)) in in_view.iter().zip(o_alloc).enumerate() {
        let poisoned = x.to_bits() == poison_bits;
        if inside && poisoned {
            note(&mut unwritten, format!("O element at allocation offset {at} not written"));
        } else if !inside && !poisoned {
            let place = if at < O_GUARD {
                "guard before the view"
            } else if at >= o_alloc.len() - O_GUARD {
                "guard after the view"
            } else {
                "padding inside the view's span"
            };
            note(&mut stray, format!("O allocation offset {at} ({place}) overwritten"));
        }
    }
    let mut lse_in_view = vec![false; lse_alloc.len()];
    let mut lse_got = Vec::with_capacity(r.lse.len());
    for b in 0..s.b {
        for h in 0..s.hq {
            for i in 0..s.lq {
                let at = LSE_GUARD + ll.offset(b, h, i);
                lse_in_view[at] = true;
                lse_got.push(lse_alloc[at] as f64);
            }
        }
    }
    for (at, (&inside, x)) in lse_in_view.iter().zip(lse_alloc).enumerate() {
        let poisoned = x.to_bits() == LSE_POISON;
        if inside && poisoned {
            note(&mut unwritten, format!("LSE element at allocation offset {at} not written"));
        } else if !inside && !poisoned {
            note(&mut stray, format!("LSE allocation offset {at} (outside the view) overwritten"));
        }
    }

    // Per-row errors. O rows are (b, i, h) in BSHD order; LSE rows (b, h, i).
    let floor2 = row_norm_floor2(T::DTYPE, d);
    let mut row_err = 0.0f64;
    for (g, want) in got.chunks_exact(d.max(1)).zip(r.o.chunks_exact(d.max(1))) {
        let (mut err2, mut ref2) = (0.0f64, 0.0f64);
        for (&a, &b) in g.iter().zip(want) {
            err2 += (a - b) * (a - b);
            ref2 += b * b;
        }
        let rel = if !err2.is_finite() {
            f64::INFINITY
        } else if ref2 > 0.0 {
            (err2 / ref2.max(floor2)).sqrt()
        } else if err2 > 0.0 {
            f64::INFINITY // a row with no visible key must be exactly 0
        } else {
            0.0
        };
        row_err = if rel.is_nan() { f64::INFINITY } else { row_err.max(rel) };
    }
    let mut lse_row_err = 0.0f64;
    for ((&g, &want), &m) in lse_got.iter().zip(&r.lse).zip(smax) {
        let err = if want == f64::NEG_INFINITY {
            if g == f64::NEG_INFINITY {
                0.0
            } else {
                f64::INFINITY
            }
        } else if !g.is_finite() {
            f64::INFINITY
        } else {
            (g - want).abs() / m.max(1.0)
        };
        lse_row_err = lse_row_err.max(err);
    }
    let o_err = rel_l2_error(&got, &r.o).map_err(e)?;
    let lse_err = rel_l2_error(&lse_got, &r.lse).map_err(e)?;
    Ok(Comparison { o_err, lse_err, row_err, lse_row_err, stray, unwritten, write_notes: notes, o_bits: bits })
}

/// `max_j |s_ij|` over the keys row `i` sees (scale and softcap applied),
/// for every row in `[B, Hq, Lq]` order; 0 for a row that sees no key.
/// Recomputed on the host in f64 from the inputs, on all cores.
pub fn row_max_abs_scores<T: Element>(p: &Problem, q: HostTensor<'_, T>, k: HostTensor<'_, T>) -> Vec<f64> {
    let (lq, hq, d) = (p.seqlen_q, p.heads_q, p.head_dim);
    let mut out = vec![0.0f64; p.batch * hq * lq];
    if out.is_empty() {
        return out;
    }
    // Units of (b, h, up to 32 rows), dealt round-robin to one thread per core.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    /// (batch, head, first row, the rows' outputs).
    type Unit<'a> = (usize, usize, usize, &'a mut [f64]);
    let mut groups: Vec<Vec<Unit<'_>>> = (0..threads).map(|_| Vec::new()).collect();
    let mut n = 0;
    for (bh, rows_out) in out.chunks_mut(lq).enumerate() {
        for (blk, slot) in rows_out.chunks_mut(32).enumerate() {
            groups[n % threads].push((bh / hq, bh % hq, blk * 32, slot));
            n += 1;
        }
    }
    std::thread::scope(|scope| {
        for group in groups {
            scope.spawn(move || {
                let mut qi = vec![0.0f64; d];
                for (b, h, first, slot) in group {
                    let hk = h / p.q_per_kv();
                    for (r, m) in slot.iter_mut().enumerate() {
                        let i = first + r;
                        for (c, x) in qi.iter_mut().enumerate() {
                            *x = q.data[q.layout.offset(b, i, h, c)].into();
                        }
                        let (lo, hi) = p.key_range(i);
                        for j in lo..hi {
                            let base = k.layout.offset(b, j, hk, 0);
                            let dot: f64 = qi.iter().zip(&k.data[base..base + d]).map(|(a, &kv)| a * kv.into()).sum();
                            *m = m.max(capped_score(p, dot).abs());
                        }
                    }
                }
            });
        }
    });
    out
}

/// DESIGN.md section 4's tolerance on relative L2 error.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 3e-3,
    }
}
