//! The device layer: opening a context, the per-context kernel registry
//! (images loaded lazily, on a kernel's first launch), and the launch
//! itself (`launch.rs`, the one place that calls the driver to run work).
//! All of the crate's `unsafe` outside `sys/` is here, each block with its
//! `SAFETY` argument.

mod launch;

use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;

use crate::dispatch::{dispatch, DeviceInfo, DispatchTensors, KernelInfo};
use crate::error::{CudaContextExt, Error, Result};
use crate::options::KernelFamily;
use crate::sys::{self, KernelImage, KernelRow};
use crate::tensor::DType;
use crate::validate::Problem;

pub(crate) use launch::{
    alloc_output, launch_additive, launch_bwd, launch_bwd_sm80, launch_maps, launch_merge, modifier_ptr, raw_modifier,
    Tables, TmaCache,
};

/// Opens (retains) the primary context of GPU `ordinal`.
///
/// # Errors
/// [`Error::NoDriver`] where libcuda cannot be loaded and [`Error::NoDevice`]
/// where the ordinal does not exist, instead of the panic cudarc would raise
/// on a machine without a driver; [`Error::Cuda`] if the driver fails.
pub fn cuda_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
        Err(e) => return Err(Error::Cuda { during: "initialising the driver", driver: e }),
    };
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    CudaContext::new(ordinal).during("creating the context")
}

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda under its usual names; no symbol
    // is called and nothing is kept if loading fails.
    #[cfg(not(feature = "candle-cuda"))]
    return unsafe { cudarc::driver::sys::is_culib_present() };
    // With `candle-cuda`, candle has cudarc link libcuda at build time: a
    // binary that runs has the driver library.
    #[cfg(feature = "candle-cuda")]
    return true;
}

/// Whether an image has code that a device of compute capability `sm`
/// (`major·10 + minor`) can load: SASS `sm_XY` runs on the same major with a
/// minor of at least Y, `sm_XYa` only on exactly X.Y, PTX `compute_XY` is
/// compiled by the driver for any `sm ≥ XY`.
pub fn image_runs_on(image: &KernelImage, sm: u32) -> bool {
    let number = |s: &str| s.trim_end_matches('a').parse::<u32>().ok();
    let sass = image.sass.iter().filter_map(|a| a.strip_prefix("sm_")).any(|a| match number(a) {
        Some(n) if a.ends_with('a') => n == sm,
        Some(n) => n / 10 == sm / 10 && n <= sm,
        None => false,
    });
    let ptx = image.ptx.and_then(|p| p.strip_prefix("compute_")).and_then(number).is_some_and(|n| n <= sm);
    sass || ptx
}

/// Kernels of one context. Rows are decided when the first handle is made
/// (from device facts alone); modules and functions load on first use.
struct Registry {
    device: DeviceInfo,
    /// The rows usable on this device, their image index in `sys::IMAGES`,
    /// and their functions once loaded.
    rows: Vec<KernelRow>,
    row_image: Vec<usize>,
    funcs: Vec<OnceLock<CudaFunction>>,
    modules: Vec<OnceLock<Arc<CudaModule>>>,
    /// Serialises the (rare) loads; launches of loaded kernels never take it.
    load_lock: Mutex<()>,
    /// Images or kernels that cannot be used on this device, and why.
    skipped: Vec<String>,
    /// Encoded TMA maps, reused while a tensor's address and layout repeat.
    tma: TmaCache,
    /// The merge-of-states kernels (f16, bf16 over parts of the same type;
    /// then over f32 parts, the split-KV combine; not table rows, see
    /// `kernels/fwd_naive.cu`), loaded on first use.
    merge_funcs: [OnceLock<CudaFunction>; 4],
    /// The baseline backward kernels (dQ, dK/dV, dsinks; f16 then bf16),
    /// loaded on first use like the merge kernels.
    bwd_funcs: [OnceLock<CudaFunction>; 6],
    /// The tiled sm80 backward's kernels (`kernels/bwd_sm80.cu`; f16 then
    /// bf16, each: pre, dQ, dsink, main hd64, hd128, hd256), loaded on first use,
    /// the main ones with their dynamic shared-memory limit raised.
    bwd_sm80_funcs: [OnceLock<CudaFunction>; 12],
    /// The additive-attention kernels (f16, bf16; `kernels/common/additive.cuh`,
    /// also in the naive image), loaded on first use with their
    /// dynamic shared-memory limit raised.
    additive_funcs: [OnceLock<CudaFunction>; 2],
    /// The attention-maps kernels (f16, bf16 in; f32 or input-type maps),
    /// loaded on first use like the merge kernels.
    maps_funcs: [OnceLock<CudaFunction>; 4],
}

/// The per-context registries: `Weak`, so the modules go when the last
/// handle on a context does.
static REGISTRIES: Mutex<Vec<(usize, Weak<Registry>)>> = Mutex::new(Vec::new());

/// The entry point for GPU work: one per [`CudaContext`], cheap to clone.
///
/// Creating it reads device facts; each kernel image is loaded into the
/// context on the first launch that needs it (once per context, however
/// many handles exist). Every call launches asynchronously on the stream it
/// is given. Launches on one handle may come from many threads.
#[derive(Clone)]
pub struct Attention {
    ctx: Arc<CudaContext>,
    reg: Arc<Registry>,
}

impl std::fmt::Debug for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attention")
            .field("ordinal", &self.ctx.ordinal())
            .field("sm", &self.reg.device.sm)
            .field("kernels", &self.reg.rows.len())
            .finish()
    }
}

/// Fails with [`Error::KernelsNotBuilt`] when the crate carries no kernels.
///
/// # Errors
/// [`Error::KernelsNotBuilt`] when `built` is false.
pub fn require_kernels(built: bool) -> Result<()> {
    if built {
        Ok(())
    } else {
        Err(Error::KernelsNotBuilt)
    }
}

impl Attention {
    /// A handle on `ctx`, sharing the context's kernel registry with every
    /// other handle on it.
    ///
    /// # Errors
    /// [`Error::KernelsNotBuilt`] for a CPU-only build;
    /// [`Error::UnsupportedDevice`] below sm_80 or when no kernel can run on
    /// the device; [`Error::Cuda`] if reading device attributes fails.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        require_kernels(sys::KERNELS_BUILT)?;
        let (major, minor) = ctx.compute_capability().during("reading the compute capability")?;
        if major < 8 {
            return Err(Error::UnsupportedDevice { major, minor });
        }
        let key = ctx.cu_ctx() as usize;
        let mut registries = REGISTRIES.lock().unwrap_or_else(|e| e.into_inner());
        registries.retain(|(_, w)| w.strong_count() > 0);
        let existing = registries.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade());
        let reg = match existing {
            Some(r) => r,
            None => {
                let r = Arc::new(Registry::new(ctx, (major * 10 + minor) as u32)?);
                registries.push((key, Arc::downgrade(&r)));
                r
            }
        };
        if reg.rows.is_empty() {
            return Err(Error::UnsupportedDevice { major, minor });
        }
        Ok(Attention { ctx: ctx.clone(), reg })
    }

    /// The context this handle launches in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's compute capability as `major·10 + minor`.
    pub fn sm(&self) -> u32 {
        self.reg.device.sm
    }

    /// Names of the kernels usable on this device (variants included).
    pub fn kernels(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.reg.rows.iter().map(|r| r.name)
    }

    /// Images or kernels that cannot be used on this device, with the reason.
    pub fn skipped(&self) -> &[String] {
        &self.reg.skipped
    }

    /// Loads every usable kernel now instead of on first launch (e.g. before
    /// timing, or before CUDA graph capture).
    ///
    /// # Errors
    /// [`Error::Cuda`] if a module or function fails to load.
    pub fn preload(&self) -> Result<()> {
        (0..self.reg.rows.len()).try_for_each(|i| self.reg.function(&self.ctx, i).map(|_| ()))
    }

    /// The merge-of-states kernel for `dtype` (over f32 parts: the split-KV combine).
    pub(crate) fn merge_function(&self, dtype: DType, f32_parts: bool) -> Result<&CudaFunction> {
        self.reg.merge_function(&self.ctx, dtype, f32_parts)
    }

    /// Backward kernel `which` (0 dQ, 1 dK/dV, 2 dsinks) for `dtype`.
    pub(crate) fn bwd_function(&self, dtype: DType, which: usize) -> Result<&CudaFunction> {
        self.reg.bwd_function(&self.ctx, dtype, which)
    }

    /// A kernel of the tiled sm80 backward, loaded on first use.
    pub(crate) fn bwd_sm80_function(&self, dtype: DType, kernel: BwdSm80) -> Result<&CudaFunction> {
        self.reg.bwd_sm80_function(&self.ctx, dtype, kernel)
    }

    /// The device's shared memory per block (opt-in limit), bytes.
    pub(crate) fn smem_per_block(&self) -> u32 {
        self.reg.device.smem_per_block
    }

    /// The additive-attention kernel for `dtype`, and the most dynamic shared
    /// memory (bytes) a launch of it may use on this device.
    pub(crate) fn additive_function(&self, dtype: DType) -> Result<(&CudaFunction, u32)> {
        Ok((self.reg.additive_function(&self.ctx, dtype)?, self.reg.device.smem_per_block))
    }

    /// The attention-maps kernel for inputs of `dtype` (f32 maps, or maps of `dtype`).
    pub(crate) fn maps_function(&self, dtype: DType, f32_maps: bool) -> Result<&CudaFunction> {
        self.reg.maps_function(&self.ctx, dtype, f32_maps)
    }

    /// The device's SM count (the split-KV heuristic's unit).
    pub(crate) fn sm_count(&self) -> u32 {
        self.reg.device.sm_count
    }

    /// Picks the kernel for a validated problem (see [`dispatch`]).
    pub(crate) fn choose(
        &self,
        p: &Problem,
        tensors: DispatchTensors<'_>,
        forced: Option<KernelFamily>,
        forced_name: Option<&'static str>,
    ) -> Result<(usize, KernelInfo)> {
        dispatch(&self.reg.rows, self.reg.device, p, tensors, forced, forced_name)
    }

    /// Checks that a stream or buffer lives in this handle's context.
    pub(crate) fn check_context(&self, arg: &'static str, ctx: &CudaContext) -> Result<()> {
        if ctx.cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::ForeignContext { arg })
        }
    }
}

/// The kernels of the tiled sm80 backward (`kernels/bwd_sm80.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BwdSm80 {
    /// D_i and the workspace zeroed.
    Pre,
    /// The main kernel of a head-dim bucket (64, 128, 256).
    Main(usize),
    /// dQ from its f32 accumulator.
    Dq,
    /// The sink logits' gradient.
    Dsink,
}

impl Registry {
    fn new(ctx: &Arc<CudaContext>, sm: u32) -> Result<Self> {
        let attr = |a, during| ctx.attribute(a).during(during).map(|v| v.max(0) as u32);
        let optin = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "reading the shared-memory limit",
        )?;
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "reading the SM count")?;
        let (rows, row_image, skipped) = usable_rows(sm, optin);
        Ok(Registry {
            device: DeviceInfo { sm, sm_count, smem_per_block: optin },
            funcs: rows.iter().map(|_| OnceLock::new()).collect(),
            rows,
            row_image,
            modules: sys::IMAGES.iter().map(|_| OnceLock::new()).collect(),
            load_lock: Mutex::new(()),
            skipped,
            tma: TmaCache::default(),
            merge_funcs: [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()],
            bwd_funcs: Default::default(),
            bwd_sm80_funcs: Default::default(),
            additive_funcs: [OnceLock::new(), OnceLock::new()],
            maps_funcs: [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()],
        })
    }

    /// The module of image `ii` (an index into `sys::IMAGES`), loading it on
    /// first use. The caller holds `load_lock`.
    fn module(&self, ctx: &Arc<CudaContext>, ii: usize) -> Result<Arc<CudaModule>> {
        match self.modules[ii].get() {
            Some(m) => Ok(m.clone()),
            None => {
                let m = ctx
                    .load_module(Ptx::from_binary(sys::IMAGES[ii].fatbin.to_vec()))
                    .during("loading a kernel image")?;
                let _ = self.modules[ii].set(m.clone());
                Ok(m)
            }
        }
    }

    /// The merge-of-states kernel for `dtype` (in the naive kernel's image,
    /// which every supported GPU loads), over parts of `dtype` or, for the
    /// split-KV combine, f32 parts; loaded on first use.
    fn merge_function(&self, ctx: &Arc<CudaContext>, dtype: DType, f32_parts: bool) -> Result<&CudaFunction> {
        let (slot, name) = match (dtype, f32_parts) {
            (DType::F16, false) => (0, "fa_merge_states_f16"),
            (DType::BF16, false) => (1, "fa_merge_states_bf16"),
            (DType::F16, true) => (2, "fa_combine_splits_f16"),
            (DType::BF16, true) => (3, "fa_combine_splits_bf16"),
        };
        self.naive_image_function(ctx, &self.merge_funcs[slot], name)
    }

    /// Backward kernel `which` (0 dQ, 1 dK/dV, 2 dsinks) for `dtype`.
    fn bwd_function(&self, ctx: &Arc<CudaContext>, dtype: DType, which: usize) -> Result<&CudaFunction> {
        const NAMES: [&str; 6] = [
            "fa_bwd_dq_naive_f16",
            "fa_bwd_dkdv_naive_f16",
            "fa_bwd_dsink_naive_f16",
            "fa_bwd_dq_naive_bf16",
            "fa_bwd_dkdv_naive_bf16",
            "fa_bwd_dsink_naive_bf16",
        ];
        let slot = which.min(2) + if dtype == DType::BF16 { 3 } else { 0 };
        self.naive_image_function(ctx, &self.bwd_funcs[slot], NAMES[slot])
    }

    /// The attention-maps kernel for inputs of `dtype`, writing f32 maps
    /// (`f32_maps`) or maps of `dtype`; in the naive kernel's image.
    fn maps_function(&self, ctx: &Arc<CudaContext>, dtype: DType, f32_maps: bool) -> Result<&CudaFunction> {
        let (slot, name) = match (dtype, f32_maps) {
            (DType::F16, true) => (0, "fa_maps_f16_f32"),
            (DType::F16, false) => (1, "fa_maps_f16_f16"),
            (DType::BF16, true) => (2, "fa_maps_bf16_f32"),
            (DType::BF16, false) => (3, "fa_maps_bf16_bf16"),
        };
        self.naive_image_function(ctx, &self.maps_funcs[slot], name)
    }

    /// Kernel `name` of the naive image (not a table row), kept in `cell`
    /// once loaded.
    fn naive_image_function<'a>(
        &self,
        ctx: &Arc<CudaContext>,
        cell: &'a OnceLock<CudaFunction>,
        name: &str,
    ) -> Result<&'a CudaFunction> {
        self.naive_image_function_with(ctx, cell, name, |_| Ok(()))
    }

    /// [`naive_image_function`](Self::naive_image_function), with `configure`
    /// run once on the function when it is first loaded.
    fn naive_image_function_with<'a>(
        &self,
        ctx: &Arc<CudaContext>,
        cell: &'a OnceLock<CudaFunction>,
        name: &str,
        configure: impl FnOnce(&CudaFunction) -> Result<()>,
    ) -> Result<&'a CudaFunction> {
        self.image_function_with(ctx, "fwd_naive", cell, name, configure)
    }

    /// Kernel `name` of image `stem` (not a table row), kept in `cell`,
    /// with `configure` run once on the function when it is first loaded.
    fn image_function_with<'a>(
        &self,
        ctx: &Arc<CudaContext>,
        stem: &str,
        cell: &'a OnceLock<CudaFunction>,
        name: &str,
        configure: impl FnOnce(&CudaFunction) -> Result<()>,
    ) -> Result<&'a CudaFunction> {
        if let Some(f) = cell.get() {
            return Ok(f);
        }
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cell.get() {
            return Ok(f);
        }
        let ii = sys::IMAGES
            .iter()
            .position(|im| im.stem == stem && image_runs_on(im, self.device.sm))
            .ok_or_else(|| Error::NoKernel { reason: format!("{name}: the {stem} image is not loadable here") })?;
        let func = self.module(ctx, ii)?.load_function(name).during("looking up a kernel")?;
        configure(&func)?;
        let _ = cell.set(func);
        cell.get().ok_or_else(|| Error::NoKernel { reason: format!("{name} failed to load") })
    }

    /// A kernel of the tiled sm80 backward (`kernels/bwd_sm80.cu`) for
    /// `dtype`, loaded on first use; a main kernel's dynamic shared-memory
    /// limit is raised to what it needs (the caller checks the device
    /// allows it).
    fn bwd_sm80_function(&self, ctx: &Arc<CudaContext>, dtype: DType, kernel: BwdSm80) -> Result<&CudaFunction> {
        let (d, dn) = match dtype {
            DType::F16 => (0, "f16"),
            DType::BF16 => (1, "bf16"),
        };
        let (k, name, smem) = match kernel {
            BwdSm80::Pre => (0, format!("fa_bwd_sm80_pre_{dn}"), 0),
            BwdSm80::Dq => (1, format!("fa_bwd_sm80_dq_{dn}"), 0),
            BwdSm80::Dsink => (2, format!("fa_bwd_sm80_dsink_{dn}"), 0),
            BwdSm80::Main(hd) => {
                let k = 3 + crate::params::BWD_SM80_BUCKETS.iter().position(|&b| b == hd).ok_or_else(|| {
                    Error::NoKernel { reason: format!("no tiled sm80 backward for the head-dim bucket {hd}") }
                })?;
                (k, format!("fa_bwd_sm80_{dn}_hd{hd}"), crate::params::bwd_sm80_smem_bytes(hd))
            }
        };
        let raise = |func: &CudaFunction| {
            if smem == 0 {
                return Ok(());
            }
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .during("raising a kernel's shared-memory limit")
        };
        self.image_function_with(ctx, "bwd_sm80", &self.bwd_sm80_funcs[6 * d + k], &name, raise)
    }

    /// The additive-attention kernel for `dtype` (naive image), loaded on
    /// first use; its dynamic shared-memory limit is raised to what the
    /// largest `Da`, `Dv` need, or to the device's limit if that is lower
    /// (larger launches are then refused before they reach the driver).
    fn additive_function(&self, ctx: &Arc<CudaContext>, dtype: DType) -> Result<&CudaFunction> {
        let (slot, name) = match dtype {
            DType::F16 => (0, "fa_additive_f16"),
            DType::BF16 => (1, "fa_additive_bf16"),
        };
        let raise = |func: &CudaFunction| {
            let max = crate::params::additive_smem_bytes(
                sys::FA_ADDITIVE_MAX_DIM as usize,
                sys::FA_ADDITIVE_MAX_DIM as usize,
            );
            let limit = (max as u32).min(self.device.smem_per_block);
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limit as i32)
                .during("raising a kernel's shared-memory limit")
        };
        self.naive_image_function_with(ctx, &self.additive_funcs[slot], name, raise)
    }

    /// The function of usable row `idx`, loading its image on first use.
    fn function(&self, ctx: &Arc<CudaContext>, idx: usize) -> Result<&CudaFunction> {
        if let Some(f) = self.funcs[idx].get() {
            return Ok(f);
        }
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = self.funcs[idx].get() {
            return Ok(f);
        }
        let module = self.module(ctx, self.row_image[idx])?;
        let row = &self.rows[idx];
        let func = module.load_function(row.name).during("looking up a kernel")?;
        if row.smem_bytes > 48 * 1024 {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                row.smem_bytes as i32,
            )
            .during("raising a kernel's shared-memory limit")?;
        }
        let _ = self.funcs[idx].set(func);
        self.funcs[idx].get().ok_or_else(|| Error::NoKernel { reason: format!("{} failed to load", row.name) })
    }
}

/// The kernel rows a device of `sm` with `optin` bytes of shared memory per
/// block can run, their image indices, and what was left out and why.
fn usable_rows(sm: u32, optin: u32) -> (Vec<KernelRow>, Vec<usize>, Vec<String>) {
    let (mut rows, mut images, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (ii, image) in sys::IMAGES.iter().enumerate() {
        if !image_runs_on(image, sm) {
            skipped.push(format!("{}: no code for sm_{sm} in the fatbin", image.stem));
            continue;
        }
        for row in sys::KERNEL_TABLE.iter().filter(|r| r.image == image.stem) {
            if row.min_sm > sm {
                skipped.push(format!("{}: needs sm_{} or newer", row.name, row.min_sm));
            } else if row.smem_bytes > optin {
                skipped.push(format!("{}: needs {} B shared memory, device allows {optin}", row.name, row.smem_bytes));
            } else {
                rows.push(*row);
                images.push(ii);
            }
        }
    }
    (rows, images, skipped)
}
