//! The device layer: opening a context, loading the embedded kernel images
//! once per context, choosing a kernel, and launching it. All of the crate's
//! `unsafe` outside `sys/` is here, each block with its `SAFETY` argument.

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{CudaContextExt, Error, Result};
use crate::options::{check_alignment, AttentionOptions, KernelFamily, Problem, TensorDesc};
use crate::sys::{self, FaFwdParams, FaFwdSm90Params, FaTensorMap, GridKind, KernelRow};
use crate::tensor::{DType, DeviceTensor, DeviceTensorMut, Element, Layout};

/// Opens (retains) the primary context of GPU `ordinal`.
///
/// Returns [`Error::NoDriver`] where libcuda cannot be loaded and
/// [`Error::NoDevice`] where the ordinal does not exist, instead of the panic
/// cudarc would raise on a machine without a driver.
pub fn cuda_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
        Err(e) => return Err(Error::Cuda { during: "initialising the driver", source: e }),
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
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Which kernel a call ran (or would run), and why: the dispatcher's choice
/// made observable for tests, benchmarks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Families passed over before this one, with the reason.
    pub passed_over: Vec<String>,
}

/// Kernels of one context: loaded once, shared by every handle on it.
struct LoadedKernels {
    /// The usable table rows, and their functions at the same index.
    rows: Vec<KernelRow>,
    funcs: Vec<CudaFunction>,
    /// Streaming multiprocessors: the grid of persistent kernels.
    sm_count: u32,
    /// Images or kernels that could not be used on this device, and why.
    skipped: Vec<String>,
}

/// The per-context module registry: `Weak`, so the modules go when the last
/// handle on a context does.
static REGISTRY: Mutex<Vec<(usize, Weak<LoadedKernels>)>> = Mutex::new(Vec::new());

/// The entry point for GPU work: one per [`CudaContext`], cheap to clone.
///
/// Creating it loads the embedded kernels into the context (once per context,
/// however many handles exist). Every call launches asynchronously on the
/// stream it is given.
#[derive(Clone)]
pub struct Attention {
    ctx: Arc<CudaContext>,
    sm: u32,
    loaded: Arc<LoadedKernels>,
}

impl std::fmt::Debug for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attention")
            .field("ordinal", &self.ctx.ordinal())
            .field("sm", &self.sm)
            .field("kernels", &self.loaded.rows.len())
            .finish()
    }
}

/// Fails with [`Error::KernelsNotBuilt`] when the crate carries no kernels.
pub fn require_kernels(built: bool) -> Result<()> {
    if built {
        Ok(())
    } else {
        Err(Error::KernelsNotBuilt)
    }
}

impl Attention {
    /// Loads the kernels into `ctx` (or reuses those already loaded there).
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        require_kernels(sys::KERNELS_BUILT)?;
        let (major, minor) = ctx.compute_capability().during("reading the compute capability")?;
        if major < 8 {
            return Err(Error::UnsupportedDevice { major, minor });
        }
        let sm = (major * 10 + minor) as u32;
        let key = ctx.cu_ctx() as usize;
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry.retain(|(_, w)| w.strong_count() > 0);
        let existing = registry.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade());
        let loaded = match existing {
            Some(l) => l,
            None => {
                let l = Arc::new(load_kernels(ctx, sm)?);
                registry.push((key, Arc::downgrade(&l)));
                l
            }
        };
        if loaded.rows.is_empty() {
            return Err(Error::UnsupportedDevice { major, minor });
        }
        Ok(Attention { ctx: ctx.clone(), sm, loaded })
    }

    /// The context this handle launches in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's compute capability as `major·10 + minor`.
    pub fn sm(&self) -> u32 {
        self.sm
    }

    /// Names of the kernels usable on this device.
    pub fn kernels(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.loaded.rows.iter().map(|r| r.name)
    }

    /// Images or kernels that were not loaded on this device, with the reason.
    pub fn skipped(&self) -> &[String] {
        &self.loaded.skipped
    }

    /// Picks the kernel for a validated problem over these tensors (see [`dispatch`]).
    pub(crate) fn choose(
        &self,
        p: &Problem,
        descs: &[(TensorDesc, u64)],
        forced: Option<KernelFamily>,
        forced_name: Option<&'static str>,
    ) -> Result<(usize, KernelInfo)> {
        let device = DeviceInfo { sm: self.sm, sm_count: self.loaded.sm_count };
        dispatch(&self.loaded.rows, device, p, descs, forced, forced_name)
    }

    /// Checks that a stream or buffer lives in this handle's context.
    pub(crate) fn check_context(&self, arg: &'static str, ctx: &CudaContext) -> Result<()> {
        if ctx.cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::ForeignContext { arg })
        }
    }

    /// Chooses a kernel for the validated problem `p` over exactly these
    /// tensors (`descs` in the order q, k, v, o) and launches it on `stream`.
    /// With `dry_run`, only chooses.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<T: Element>(
        &self,
        stream: &CudaStream,
        p: &Problem,
        descs: [TensorDesc; 4],
        opts: &AttentionOptions,
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &mut DeviceTensorMut<'_, T>,
        lse: Option<&mut cudarc::driver::CudaViewMut<'_, f32>>,
        dry_run: bool,
    ) -> Result<KernelInfo> {
        let (q_ptr, _q_sync) = q.view.device_ptr(stream);
        let (k_ptr, _k_sync) = k.view.device_ptr(stream);
        let (v_ptr, _v_sync) = v.view.device_ptr(stream);
        let (o_ptr, _o_sync) = o.view.device_ptr_mut(stream);
        let (lse_ptr, _lse_sync) = match lse {
            Some(l) => {
                let (ptr, sync) = l.device_ptr_mut(stream);
                (ptr, Some(sync))
            }
            None => (0, None),
        };
        let addrs = [q_ptr, k_ptr, v_ptr, o_ptr];
        let with_addrs: Vec<(TensorDesc, u64)> = descs.into_iter().zip(addrs).collect();
        let (idx, info) = self.choose(p, &with_addrs, opts.kernel, opts.kernel_name)?;
        if dry_run || p.seqlen_q == 0 {
            return Ok(info); // nothing to write; a zero-sized grid is a launch error
        }
        let func = &self.loaded.funcs[idx];
        let s = |l: &Layout| l.strides.map(|x| x as i64);
        let (qs, ks, vs, os) = (s(&q.layout), s(&k.layout), s(&v.layout), s(&o.layout));
        let (window_left, window_right) = p.window_i32();
        let params = FaFwdParams {
            q: q_ptr as usize as *const _,
            k: k_ptr as usize as *const _,
            v: v_ptr as usize as *const _,
            o: o_ptr as usize as *mut _,
            lse: lse_ptr as usize as *mut f32,
            q_batch_stride: qs[0],
            q_row_stride: qs[1],
            q_head_stride: qs[2],
            k_batch_stride: ks[0],
            k_row_stride: ks[1],
            k_head_stride: ks[2],
            v_batch_stride: vs[0],
            v_row_stride: vs[1],
            v_head_stride: vs[2],
            o_batch_stride: os[0],
            o_row_stride: os[1],
            o_head_stride: os[2],
            lse_batch_stride: (p.heads_q * p.seqlen_q) as i64,
            lse_head_stride: p.seqlen_q as i64,
            batch: p.batch as i32,
            heads_q: p.heads_q as i32,
            heads_kv: p.heads_kv as i32,
            q_per_kv: p.q_per_kv() as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_k: p.seqlen_k as i32,
            head_dim: p.head_dim as i32,
            window_left,
            window_right,
            scale: p.scale,
            softcap: p.softcap.unwrap_or(0.0),
            diag_offset: p.seqlen_k as i32 - p.seqlen_q as i32,
        };
        let cfg =
            LaunchConfig { grid_dim: info.grid, block_dim: (info.threads, 1, 1), shared_mem_bytes: info.smem_bytes };
        // The Hopper kernels take the same parameters plus one TMA map per tensor.
        let sm90 = if info.family == KernelFamily::Sm90 {
            let row = &self.loaded.rows[idx];
            let map = |ptr, layout: &Layout, rows| encode_tensor_map(ptr, layout, p.dtype, rows);
            // SAFETY: the struct is plain integers, pointers and byte arrays
            // (plus bindgen's padding), for all of which all-zero is valid.
            let mut p90: FaFwdSm90Params = unsafe { std::mem::zeroed() };
            p90.p = params;
            p90.tma_q = map(q_ptr, &q.layout, row.block_m)?;
            p90.tma_k = map(k_ptr, &k.layout, row.block_n)?;
            p90.tma_v = map(v_ptr, &v.layout, row.block_n)?;
            p90.tma_o = map(o_ptr, &o.layout, row.block_m)?;
            Some(p90)
        } else {
            None
        };
        let mut builder = stream.launch_builder(func);
        match &sm90 {
            Some(p90) => builder.arg(p90),
            None => builder.arg(&params),
        };
        // SAFETY: `params` matches the kernel's single by-value argument (the
        // bindgen mirror of params.h). Every pointer in it comes from a live
        // cudarc view in this context (checked by the caller), and validation
        // proved that the shapes and strides stay inside each view, that the
        // sizes fit the kernel's index types, and that the alignment the
        // kernel family needs holds. The views' sync guards outlive the launch.
        unsafe { builder.launch(cfg) }.during("launching the attention kernel")?;
        Ok(info)
    }
}

/// What the dispatcher needs to know of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Compute capability as `major·10 + minor`.
    pub sm: u32,
    /// Streaming multiprocessors (the grid of persistent kernels).
    pub sm_count: u32,
}

/// The dispatcher, as a pure function of the usable kernel rows (those loaded
/// on the device), the device, a validated problem and its tensors
/// (`descs` with their base addresses, in the order q, k, v, o).
///
/// Auto order: sm90, then sm80, then naive. A family is passed over when it
/// has no kernel for the dtype and head dim, or when the tensors miss its
/// alignment (or TMA's limits); within a family the smallest head-dim bucket
/// that holds `D` wins; variants (`name__tag`) are never picked. A forced
/// family or kernel name that cannot run is an error. Returns the index into
/// `rows` and the launch.
pub fn dispatch(
    rows: &[KernelRow],
    device: DeviceInfo,
    p: &Problem,
    descs: &[(TensorDesc, u64)],
    forced: Option<KernelFamily>,
    forced_name: Option<&'static str>,
) -> Result<(usize, KernelInfo)> {
    let serves = |r: &KernelRow| r.dtype == p.dtype && r.head_dim as usize >= p.head_dim;
    let family = |r: &KernelRow| KernelFamily::from_image_stem(r.image).expect("build.rs knows every image");
    let mut passed_over = Vec::new();
    let candidates: Vec<usize> = match forced_name {
        Some(name) => {
            let idx = rows.iter().position(|r| r.name == name).ok_or_else(|| Error::NoKernel {
                reason: format!("kernel {name} is not loaded on sm_{}", device.sm),
            })?;
            if !serves(&rows[idx]) {
                return Err(Error::NoKernel {
                    reason: format!("{name} does not serve {} head_dim {}", p.dtype, p.head_dim),
                });
            }
            vec![idx]
        }
        None => forced
            .map_or(vec![KernelFamily::Sm90, KernelFamily::Sm80, KernelFamily::Naive], |f| vec![f])
            .into_iter()
            .filter_map(|fam| {
                // The family's smallest bucket that holds the head dim.
                let best = (0..rows.len())
                    .filter(|&i| family(&rows[i]) == fam && !rows[i].is_variant() && serves(&rows[i]))
                    .min_by_key(|&i| rows[i].head_dim);
                if best.is_none() {
                    passed_over.push(format!(
                        "{fam:?}: no kernel for {} head_dim {} on sm_{}",
                        p.dtype, p.head_dim, device.sm
                    ));
                }
                best
            })
            .collect(),
    };
    for idx in candidates {
        let row = &rows[idx];
        let fam = family(row);
        let fits = descs.iter().try_for_each(|(d, addr)| {
            check_alignment(d, *addr, 2, fam, row.name)?;
            if fam == KernelFamily::Sm90 {
                tma_compatible(d, row.name)?;
            }
            Ok(())
        });
        match fits {
            Ok(()) => return Ok((idx, kernel_info(row, fam, device, p, passed_over))),
            Err(e) if forced.is_some() || forced_name.is_some() => return Err(e),
            Err(e) => passed_over.push(format!("{fam:?}: {e}")),
        }
    }
    Err(Error::NoKernel { reason: passed_over.join("; ") })
}

/// The launch of `row` for problem `p`.
fn kernel_info(
    row: &KernelRow,
    family: KernelFamily,
    device: DeviceInfo,
    p: &Problem,
    passed_over: Vec<String>,
) -> KernelInfo {
    let m_tiles = p.seqlen_q.div_ceil(row.block_m as usize);
    let grid = match row.grid {
        GridKind::Tiles => (m_tiles as u32, p.heads_q as u32, p.batch as u32),
        GridKind::Persistent => {
            let tiles = m_tiles * p.heads_q * p.batch;
            (tiles.min(device.sm_count as usize) as u32, 1, 1)
        }
    };
    KernelInfo {
        name: row.name,
        family,
        head_dim_bucket: row.head_dim,
        grid,
        threads: row.threads,
        smem_bytes: row.smem_bytes,
        passed_over,
    }
}

/// Largest byte stride a TMA map can express.
const TMA_MAX_STRIDE: usize = 1 << 40;

/// TMA's own limits beyond 16-byte alignment: every stepping dimension needs
/// a non-zero stride below 2^40 bytes (no stride-0 broadcasting).
fn tma_compatible(d: &TensorDesc, kernel: &'static str) -> Result<()> {
    for (i, dim) in ["batch", "seq", "heads"].into_iter().enumerate() {
        let bytes = d.layout.strides[i] * 2;
        if d.layout.shape[i] > 1 && (bytes == 0 || bytes >= TMA_MAX_STRIDE) {
            return Err(Error::Misaligned {
                arg: d.arg,
                kernel,
                detail: format!("{dim} stride of {bytes} bytes cannot be expressed in a TMA map"),
            });
        }
    }
    Ok(())
}

/// Encodes the TMA map of one `[B, S, H, D]` tensor as `kernels/params.h`
/// specifies: rank 4, dims innermost first `{D, S, H, B}`, boxes of
/// `64 × rows`, 128-byte swizzle, zeros out of bounds.
fn encode_tensor_map(ptr: u64, layout: &Layout, dtype: DType, rows: u32) -> Result<FaTensorMap> {
    use cudarc::driver::sys::{
        CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    let [b, s, h, d] = layout.shape.map(|x| x as u64);
    let dims = [d, s.max(1), h, b];
    // A dimension of extent 1 is never stepped, so any legal stride will do;
    // use the extent of the dimensions inside it (TMA rejects 0).
    let stride = |i: usize, inner: u64| -> u64 {
        let bytes = layout.strides[i] as u64 * 2;
        if layout.shape[i] > 1 {
            bytes
        } else {
            inner.max(16).next_multiple_of(16)
        }
    };
    let row = stride(1, d * 2);
    let head = stride(2, row * s.max(1));
    let batch = stride(0, head * h);
    let strides = [row, head, batch];
    let boxes = [64u32, rows, 1, 1];
    let elem_strides = [1u32; 4];
    let data_type = match dtype {
        DType::F16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let mut map = FaTensorMap { opaque: [0; 16] };
    // SAFETY: `FaTensorMap` has the size (128 B) and alignment (64 B) of
    // `CUtensorMap` (bindgen's layout assertions check ours), every array
    // argument has the length the rank (4) requires, and encoding only
    // writes the map: the device address is recorded, not dereferenced.
    let result = unsafe {
        cudarc::driver::sys::cuTensorMapEncodeTiled(
            (&mut map as *mut FaTensorMap).cast(),
            data_type,
            4,
            ptr as usize as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    result.result().during("encoding a TMA tensor map")?;
    Ok(map)
}

/// Loads every image that can run on `sm`, and the functions of its rows.
fn load_kernels(ctx: &Arc<CudaContext>, sm: u32) -> Result<LoadedKernels> {
    let optin = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .during("reading the shared-memory limit")? as u32;
    let (mut rows, mut funcs) = (Vec::new(), Vec::new());
    let mut skipped = Vec::new();
    for image in sys::IMAGES {
        let image_rows: Vec<&KernelRow> = sys::KERNEL_TABLE.iter().filter(|r| r.image == image.stem).collect();
        if image_rows.iter().all(|r| r.min_sm > sm) {
            skipped.push(format!("{}: needs a newer GPU than sm_{sm}", image.stem));
            continue;
        }
        let module = match ctx.load_module(Ptx::from_binary(image.fatbin.to_vec())) {
            Ok(m) => m,
            // No SASS for this GPU and no PTX it can JIT (e.g. sm_90a code on sm_100).
            Err(DriverError(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU)) => {
                skipped.push(format!("{}: no code for sm_{sm} in the fatbin", image.stem));
                continue;
            }
            Err(e) => return Err(Error::Cuda { during: "loading a kernel image", source: e }),
        };
        for row in image_rows {
            if row.min_sm > sm {
                continue;
            }
            if row.smem_bytes > optin {
                skipped.push(format!("{}: needs {} B shared memory, device allows {optin}", row.name, row.smem_bytes));
                continue;
            }
            let func = module.load_function(row.name).during("looking up a kernel")?;
            if row.smem_bytes > 48 * 1024 {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    row.smem_bytes as i32,
                )
                .during("raising a kernel's shared-memory limit")?;
            }
            rows.push(*row);
            funcs.push(func);
        }
    }
    let sm_count = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .during("reading the SM count")? as u32;
    Ok(LoadedKernels { rows, funcs, sm_count, skipped })
}

/// Allocates an output buffer that the kernel will fully overwrite.
pub(crate) fn alloc_output<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialised, but every forward kernel writes
    // every element of O and LSE (DESIGN.md section 1; the GPU tests poison
    // outputs to prove it), and nothing reads the buffer before the launch
    // that fills it is ordered before the read on the same stream.
    // The driver refuses 0-byte allocations; an empty problem gets one spare element.
    unsafe { stream.alloc::<T>(len.max(1)) }.during("allocating the output")
}
