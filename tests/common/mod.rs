//! Shared by the GPU tests and the benchmark: seeded inputs, layouts with
//! padding, poisoned outputs, and the comparison against the CPU reference.
#![allow(dead_code)]

use std::sync::Arc;

use fused_attn::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use fused_attn::reference::{self, rel_l2_error};
use fused_attn::{
    cuda_context, Attention, AttentionOptions, DType, DeviceTensor, DeviceTensorMut, Element, Error, HostTensor,
    KernelInfo, Layout, LseLayout, LseTensorMut,
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

/// How a tensor is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Contiguous `[B, S, H, D]`.
    Bshd,
    /// Contiguous `[B, H, S, D]`.
    Bhsd,
    /// `[B, S, H, D]` with `pad` extra elements after every sequence row.
    Padded(usize),
}

impl Storage {
    pub fn layout(self, b: usize, s: usize, h: usize, d: usize) -> Layout {
        match self {
            Storage::Bshd => Layout::bshd(b, s, h, d),
            Storage::Bhsd => Layout::bhsd(b, h, s, d),
            Storage::Padded(pad) => {
                let row = h * d + pad;
                Layout::strided_bshd([b, s, h, d], [s * row, row, d, 1])
            }
        }
    }
}

/// Normal(0, 1) samples (Box–Muller), rounded to `T`: never zeros, never all equal.
pub fn randn<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            T::from_f32((-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos())
        })
        .collect()
}

/// An all-NaN pattern of `T` (0xFFFF is a NaN in both f16 and bf16).
pub fn poison<T: Element>(n: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); n]
}

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

/// Host inputs of a problem in their storage layouts.
pub struct Inputs<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub ql: Layout,
    pub kl: Layout,
}

pub fn make_inputs<T: Element>(seed: u64, s: Shape, storage: Storage) -> Inputs<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ql = storage.layout(s.b, s.lq, s.hq, s.d);
    let kl = storage.layout(s.b, s.lk, s.hk, s.d);
    // Padding is filled with random values too: reading it would show.
    Inputs {
        q: randn(&mut rng, ql.span().unwrap()),
        k: randn(&mut rng, kl.span().unwrap()),
        v: randn(&mut rng, kl.span().unwrap()),
        ql,
        kl,
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
    pub kernel: KernelInfo,
    pub o_err: f64,
    pub lse_err: f64,
    /// Raw output bits, for determinism checks.
    pub o_bits: Vec<u16>,
}

/// Runs one problem on the GPU with poisoned outputs laid out like the
/// inputs, and compares O and LSE with the f64 reference.
pub fn run_and_check<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inp: &Inputs<T>,
    s: Shape,
    o_storage: Storage,
    opts: &AttentionOptions,
) -> Result<Checked, String> {
    let e = |e: Error| e.to_string();
    let (q, k, v) =
        (upload(stream, &inp.q).map_err(e)?, upload(stream, &inp.k).map_err(e)?, upload(stream, &inp.v).map_err(e)?);
    let ol = o_storage.layout(s.b, s.lq, s.hq, s.d);
    let mut o = upload(stream, &poison::<T>(ol.span().unwrap())).map_err(e)?;
    let mut lse = stream.clone_htod(&vec![f32::NAN; s.b * s.hq * s.lq]).map_err(|e| e.to_string())?;
    let kernel = {
        let (qt, kt, vt) =
            (DeviceTensor::new(&q, inp.ql), DeviceTensor::new(&k, inp.kl), DeviceTensor::new(&v, inp.kl));
        let mut ot = DeviceTensorMut::new(&mut o, ol);
        let mut lv = LseTensorMut::new(&mut lse, LseLayout::contiguous(s.b, s.hq, s.lq));
        gpu.attn.forward_into(stream, &qt, &kt, &vt, &mut ot, Some(&mut lv), opts).map_err(e)?
    };
    let o_host = download(stream, &o).map_err(e)?;
    let lse_host: Vec<f32> = stream.clone_dtoh(&lse).map_err(|e| e.to_string())?;

    let r = reference::forward(
        HostTensor::new(&inp.q, inp.ql),
        HostTensor::new(&inp.k, inp.kl),
        HostTensor::new(&inp.v, inp.kl),
        opts,
    )
    .map_err(e)?;
    // Gather O from its storage into the reference's contiguous BSHD order.
    let mut got = Vec::with_capacity(r.o.len());
    let mut bits = Vec::with_capacity(r.o.len());
    for b in 0..s.b {
        for i in 0..s.lq {
            for h in 0..s.hq {
                for x in 0..s.d {
                    let val = o_host[ol.offset(b, i, h, x)];
                    got.push(val.into());
                    bits.push(val.to_bits());
                }
            }
        }
    }
    let lse_got: Vec<f64> = lse_host.iter().map(|&x| x as f64).collect();
    let o_err = rel_l2_error(&got, &r.o).map_err(e)?;
    let lse_err = rel_l2_error(&lse_got, &r.lse).map_err(e)?;
    Ok(Checked { kernel, o_err, lse_err, o_bits: bits })
}

/// DESIGN.md section 4's tolerance on relative L2 error.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 3e-3,
    }
}
