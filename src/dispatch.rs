//! Kernel choice: the kernel table (from build.rs) and device facts → one
//! kernel and its launch shape. A pure function, tested on the CPU over the
//! real table (tests/dispatch.rs); it allocates nothing on success, so the
//! launch path stays allocation-free.

use crate::error::{Error, Result};
use crate::options::KernelFamily;
use crate::sys::{GridKind, KernelRow};
use crate::validate::{Problem, TensorDesc};

/// What the dispatcher needs to know of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Compute capability as `major·10 + minor`.
    pub sm: u32,
    /// Streaming multiprocessors (the grid of persistent kernels).
    pub sm_count: u32,
    /// Shared memory one block may opt in to, bytes
    /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`: 163 KiB on
    /// sm80, 99 KiB on sm86/sm89, 227 KiB on sm90).
    pub smem_per_block: u32,
}

/// Why the dispatcher passed over a kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PassReason {
    /// The family has no kernel for this dtype and head dim on this device.
    NoKernel,
    /// A tensor misses the family's alignment (or a TMA limit).
    Unsuitable {
        /// The tensor.
        arg: &'static str,
        /// What about it: `"base address"`, `"batch stride"`, ...
        what: &'static str,
    },
    /// The problem has more tiles than the kernel's schedule can number.
    TooManyTiles,
    /// The family does not implement a feature the call uses.
    Unsupported {
        /// The feature (e.g. `"packed (varlen) batches"`).
        what: &'static str,
    },
}

/// A family the dispatcher passed over, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassedOver {
    /// The family.
    pub family: KernelFamily,
    /// The reason.
    pub reason: PassReason,
}

impl std::fmt::Display for PassedOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            PassReason::NoKernel => write!(f, "{:?}: no kernel for this dtype and head dim here", self.family),
            PassReason::Unsuitable { arg, what } => write!(f, "{:?}: `{arg}` has an unsuitable {what}", self.family),
            PassReason::TooManyTiles => write!(f, "{:?}: too many tiles for its schedule", self.family),
            PassReason::Unsupported { what } => write!(f, "{:?}: does not implement {what} yet", self.family),
        }
    }
}

/// Which kernel a call ran (or would run), and why: the dispatcher's choice
/// made observable for tests, benchmarks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KernelInfo {
    /// The kernel's name (e.g. `fa_fwd_sm80_bf16_hd128`).
    pub name: &'static str,
    /// Its family.
    pub family: KernelFamily,
    /// The head-dim bucket it serves.
    pub head_dim_bucket: u32,
    /// Launch grid.
    pub grid: (u32, u32, u32),
    /// Threads per CTA.
    pub threads: u32,
    /// Dynamic shared memory per CTA, bytes.
    pub smem_bytes: u32,
    passed: [Option<PassedOver>; 2],
}

impl KernelInfo {
    /// Families passed over before this one, with the reason, in order.
    pub fn passed_over(&self) -> impl Iterator<Item = PassedOver> + '_ {
        self.passed.iter().flatten().copied()
    }
}

/// The family of a table row, or `None` for an image this build does not know.
fn family_of(row: &KernelRow) -> Option<KernelFamily> {
    KernelFamily::from_image_stem(row.image)
}

/// Tensors of one call for the dispatcher: descriptions in the order q, k,
/// v, o, and their base addresses (`None`: not known yet, assumed aligned —
/// [`Attention::plan`](crate::Attention::plan) before buffers exist).
#[derive(Debug, Clone, Copy)]
pub struct DispatchTensors<'a> {
    /// q, k, v, o.
    pub descs: &'a [TensorDesc; 4],
    /// Their device addresses, same order.
    pub addrs: Option<[u64; 4]>,
}

/// The dispatcher, as a pure function of the usable kernel rows (those
/// loadable on the device), the device, a validated problem and its tensors.
///
/// Auto order: sm90, then sm80, then naive. A family is passed over when it
/// has no kernel for the dtype and head dim, or when a tensor misses its
/// alignment (or TMA's limits); within a family the smallest head-dim bucket
/// that holds `D` wins, and of that bucket's rows the first (in table order)
/// whose shared memory the device allows: a bucket lists its fastest row first
/// and smaller-memory fallbacks after it (the sm80 `_99k` rows for sm86/sm89).
/// Variants (`name__tag`) are never picked. Paged KV caches go to the sm80
/// bucket's `_paged` row, and only they do. A decode step (a KV-cache call
/// with at most `MAX_DECODE_QUERIES` (16) queries per sequence and several
/// query heads per KV head) goes to the sm80 bucket's `_decode` row (GQA
/// packing, dense or paged) where the bucket has one, sm80 then preferred
/// over sm90 (whose tiles would hold one query row of 128). A forced family or kernel name
/// that cannot run is an error. Returns the index into `rows` and the launch.
///
/// # Errors
/// [`Error::NoKernel`] when nothing serves the problem; with a forced family
/// or name, the first reason it cannot run ([`Error::Misaligned`],
/// [`Error::SizeOverflow`], [`Error::NoKernel`]).
pub fn dispatch(
    rows: &[KernelRow],
    device: DeviceInfo,
    p: &Problem,
    tensors: DispatchTensors<'_>,
    forced: Option<KernelFamily>,
    forced_name: Option<&'static str>,
) -> Result<(usize, KernelInfo)> {
    let serves = |r: &KernelRow| r.dtype == p.dtype && r.head_dim as usize >= p.head_dim;
    let paged = p.kv_cache.is_some_and(|c| c.paged.is_some());
    let smem_fits = |r: &KernelRow| r.smem_bytes <= device.smem_per_block;
    // A decode step: a KV-cache call with few queries per sequence and several
    // query heads per KV head. The sm80 `_decode` rows pack the heads of a KV
    // head into one tile; where the bucket has one, sm80 goes first.
    let decode = p.kv_cache.is_some() && p.q_per_kv() > 1 && p.seqlen_q <= MAX_DECODE_QUERIES;
    let decode_row = decode
        && rows.iter().any(|r| r.is_decode() && family_of(r) == Some(KernelFamily::Sm80) && serves(r) && smem_fits(r));
    if let Some(name) = forced_name {
        let idx = rows
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| Error::NoKernel { reason: format!("kernel {name} is not available on sm_{}", device.sm) })?;
        let row = &rows[idx];
        let fam = family_of(row).ok_or_else(|| Error::NoKernel { reason: format!("{name} has an unknown image") })?;
        if !serves(row) {
            return Err(Error::NoKernel {
                reason: format!("{name} does not serve {} head_dim {}", p.dtype, p.head_dim),
            });
        }
        if let Some(what) = lacks(row, fam, p) {
            return Err(unsupported(fam, what));
        }
        if !smem_fits(row) {
            return Err(Error::NoKernel {
                reason: format!(
                    "{name} needs {} B of shared memory per block, sm_{} allows {}",
                    row.smem_bytes, device.sm, device.smem_per_block
                ),
            });
        }
        fits(row, fam, device, p, tensors)?;
        return Ok((idx, kernel_info(row, fam, device, p, [None; 2])));
    }
    let mut passed = [None; 2];
    let mut n_passed = 0;
    let forced_list = forced.map(|f| [f]);
    const DECODE_ORDER: [KernelFamily; 3] = [KernelFamily::Sm80, KernelFamily::Sm90, KernelFamily::Naive];
    let families: &[KernelFamily] = match &forced_list {
        Some(one) => one,
        None if decode_row => &DECODE_ORDER,
        None => &KernelFamily::PREFERENCE,
    };
    let mut last_err = None;
    for &fam in families {
        // The family's smallest bucket that holds the head dim; of its rows
        // that fit the device's shared memory, the first (`min_by_key` keeps
        // the first of equal keys).
        let best = (0..rows.len())
            .filter(|&i| {
                let r = &rows[i];
                // sm80: the `_decode` rows for a decode step (where the
                // bucket has one), else the `_paged` rows for pages, else
                // the dense rows.
                let sm80 = fam == KernelFamily::Sm80;
                family_of(r) == Some(fam)
                    && !r.is_variant()
                    && r.is_decode() == (sm80 && decode_row)
                    && (r.is_decode() || r.is_paged() == (paged && sm80))
                    && serves(r)
                    && smem_fits(r)
            })
            .min_by_key(|&i| rows[i].head_dim);
        // `Err(None)`: no kernel; `Err(Some(e))`: the kernel cannot run here.
        // No message is formatted unless the call fails.
        // Features a family's kernels ignore: never give them such a problem.
        if let Some(what) = best.and_then(|i| lacks(&rows[i], fam, p)) {
            if forced.is_some() {
                return Err(unsupported(fam, what));
            }
            if n_passed < passed.len() {
                passed[n_passed] = Some(PassedOver { family: fam, reason: PassReason::Unsupported { what } });
                n_passed += 1;
            }
            continue;
        }
        let outcome = match best {
            None => Err(None),
            Some(idx) => fits(&rows[idx], fam, device, p, tensors).map(|()| idx).map_err(Some),
        };
        let no_kernel = || Error::NoKernel {
            reason: format!("{fam:?}: no kernel for {} head_dim {} on sm_{}", p.dtype, p.head_dim, device.sm),
        };
        match outcome {
            Ok(idx) => return Ok((idx, kernel_info(&rows[idx], fam, device, p, passed))),
            Err(e) if forced.is_some() => return Err(e.unwrap_or_else(no_kernel)),
            Err(e) => {
                let reason = e.as_ref().map_or(PassReason::NoKernel, reason_of);
                if n_passed < passed.len() {
                    passed[n_passed] = Some(PassedOver { family: fam, reason });
                    n_passed += 1;
                }
                if let Some(e) = e {
                    last_err = Some(e);
                }
            }
        }
    }
    // Only reached when every family failed: build the message (allocating is fine here).
    let mut reason: Vec<String> = passed.iter().flatten().map(|p| p.to_string()).collect();
    if let Some(e) = last_err {
        reason.push(e.to_string());
    }
    Err(Error::NoKernel { reason: reason.join("; ") })
}

/// Queries per sequence up to which a KV-cache call with grouped heads is a
/// decode step for the dispatcher (speculative decoding verifies a few).
pub const MAX_DECODE_QUERIES: usize = 16;

/// The feature of `p` that kernel `row` of family `fam` does not implement,
/// if any. The Hopper kernels load a paged cache's tiles whole with TMA, so
/// they take pages whose size is a multiple of their block_n (smaller pages
/// go to the sm80 kernels' gather); their persistent variants take
/// rectangular batches only. Of the sm80 rows only the `_paged` ones read
/// pages.
fn lacks(row: &KernelRow, fam: KernelFamily, p: &Problem) -> Option<&'static str> {
    let sequences = p.varlen.is_some() || p.kv_cache.is_some();
    let page = p.kv_cache.and_then(|c| c.paged).map(|pg| pg.page_size);
    match (fam, row.grid, page) {
        (KernelFamily::Sm80, _, Some(_)) if !row.is_paged() && !row.is_decode() => {
            Some("paged KV caches (its `_paged` row does)")
        }
        (KernelFamily::Sm90, GridKind::Persistent, _) if sequences => {
            Some("packed batches or KV caches (persistent variants)")
        }
        (KernelFamily::Sm90, _, Some(size)) if size % row.block_n as usize != 0 => {
            Some("pages whose size is not a multiple of block_n")
        }
        _ => None,
    }
}

fn unsupported(fam: KernelFamily, what: &'static str) -> Error {
    Error::NoKernel { reason: format!("{fam:?}: does not implement {what} yet") }
}

fn reason_of(e: &Error) -> PassReason {
    match e {
        Error::Misaligned { arg, what, .. } => PassReason::Unsuitable { arg, what },
        Error::SizeOverflow { .. } => PassReason::TooManyTiles,
        _ => PassReason::NoKernel,
    }
}

/// Whether `row` can run over these tensors: alignment, TMA limits, the
/// persistent schedule's tile numbering.
fn fits(row: &KernelRow, fam: KernelFamily, device: DeviceInfo, p: &Problem, t: DispatchTensors<'_>) -> Result<()> {
    for (i, d) in t.descs.iter().enumerate() {
        check_alignment(d, t.addrs.map(|a| a[i]), 2, fam, row.name)?;
        if fam == KernelFamily::Sm90 {
            tma_compatible(d, row.name)?;
        }
    }
    if row.grid == GridKind::Persistent {
        // The persistent schedule numbers tiles in int32 and steps by the grid.
        let tiles = persistent_tiles(row, p);
        let limit = i32::MAX as u128 - device.sm_count as u128;
        if tiles > limit {
            return Err(Error::SizeOverflow {
                arg: "q",
                what: "tiles of the persistent schedule",
                value: tiles,
                limit,
            });
        }
    }
    Ok(())
}

fn persistent_tiles(row: &KernelRow, p: &Problem) -> u128 {
    p.seqlen_q.div_ceil(row.block_m as usize) as u128 * p.heads_q as u128 * p.batch as u128
}

/// The launch of `row` for problem `p`.
fn kernel_info(
    row: &KernelRow,
    family: KernelFamily,
    device: DeviceInfo,
    p: &Problem,
    passed: [Option<PassedOver>; 2],
) -> KernelInfo {
    // Validation bounds Lq by 2^28 and B, Hq by 65535, so these fit u32. A
    // `_decode` row has a CTA per KV head, rows the queries of its Hq/Hk heads
    // (a decode step's few queries: no overflow).
    let (rows, heads) = if row.is_decode() { (p.seqlen_q * p.q_per_kv(), p.heads_kv) } else { (p.seqlen_q, p.heads_q) };
    let m_tiles = rows.div_ceil(row.block_m as usize) as u32;
    let grid = match row.grid {
        GridKind::Tiles => (m_tiles, heads as u32, p.batch as u32),
        GridKind::Persistent => (persistent_tiles(row, p).min(device.sm_count as u128) as u32, 1, 1),
    };
    KernelInfo {
        name: row.name,
        family,
        head_dim_bucket: row.head_dim,
        grid,
        threads: row.threads,
        smem_bytes: row.smem_bytes,
        passed,
    }
}

const STRIDE_NAMES: [&str; 3] = ["batch stride", "seq stride", "heads stride"];

/// Checks that a family's alignment holds for a tensor: its base address
/// (when known) and every batch/seq/head stride, in bytes. A dimension of
/// extent 1 never steps, so its stride is not looked at.
///
/// # Errors
/// [`Error::Misaligned`] naming the tensor and what is misaligned.
pub fn check_alignment(
    t: &TensorDesc,
    base_addr: Option<u64>,
    elem_bytes: usize,
    family: KernelFamily,
    kernel: &'static str,
) -> Result<()> {
    let align = family.alignment() as u64;
    let need = if align == 16 { "is not a multiple of 16" } else { "is not a multiple of 2" };
    if let Some(addr) = base_addr {
        if addr % align != 0 {
            return Err(Error::Misaligned { arg: t.arg, kernel, what: "base address", bytes: addr, need });
        }
    }
    for (i, what) in STRIDE_NAMES.into_iter().enumerate() {
        if t.layout.shape[i] <= 1 {
            continue;
        }
        let bytes = (t.layout.strides[i] as u64).saturating_mul(elem_bytes as u64);
        if bytes % align != 0 {
            return Err(Error::Misaligned { arg: t.arg, kernel, what, bytes, need });
        }
    }
    Ok(())
}

/// Largest byte stride a TMA map can express.
const TMA_MAX_STRIDE: u64 = 1 << 40;

/// TMA's own limits beyond 16-byte alignment: every stepping dimension needs
/// a non-zero stride below 2^40 bytes (no stride-0 broadcasting).
fn tma_compatible(d: &TensorDesc, kernel: &'static str) -> Result<()> {
    for (i, what) in STRIDE_NAMES.into_iter().enumerate() {
        if d.layout.shape[i] <= 1 {
            continue;
        }
        let bytes = (d.layout.strides[i] as u64).saturating_mul(2);
        if bytes == 0 || bytes >= TMA_MAX_STRIDE {
            let need = "cannot be expressed in a TMA map (0 or >= 2^40)";
            return Err(Error::Misaligned { arg: d.arg, kernel, what, bytes, need });
        }
    }
    Ok(())
}
