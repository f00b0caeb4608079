//! A causal GQA self-attention block in candle with fused-attn's op in the
//! middle, checked against the same block written with plain candle ops in
//! f32, then trained one step through candle's autograd.
//!
//! ```sh
//! cargo run --example candle_attention --features candle             # CPU: the op runs the f64 reference
//! CUDA_COMPUTE_CAP=90 cargo run --release --example candle_attention \
//!     --features candle-cuda                                          # a CUDA device: our kernels
//! ```
//!
//! The model keeps its tensors `[B, H, S, D]`, as candle models do; the op
//! takes the `[B, S, H, D]` view `transpose(1, 2)` without a copy.

use candle_core::{DType, Device, Tensor, Var, D};
use fused_attn::candle_ops;

/// The first CUDA device with `candle-cuda`, else the CPU.
fn device() -> Device {
    #[cfg(feature = "candle-cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// Plain candle attention in f32 over `[B, H, S, D]` tensors, KV heads
/// repeated for GQA, causal: what the op replaces.
fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let hk = k.dim(1)?;
    let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.to_dtype(DType::F32)?.unsqueeze(2)?.broadcast_as((b, hk, h / hk, s, d))?.contiguous()?.reshape((b, h, s, d))
    };
    let (q, k, v) = (q.to_dtype(DType::F32)?, repeat(k)?, repeat(v)?);
    let mask: Vec<f32> = (0..s * s).map(|ij| if ij % s > ij / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (s, s), q.device())?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    let p = candle_core::Tensor::exp(&scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?)?;
    let p = p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den.max(1e-300)).sqrt())
}

fn main() -> candle_core::Result<()> {
    let dev = device();
    let (b, s, e, h, hk, d) = (2, 96, 256, 8, 2, 32);
    let scale = 1.0 / (d as f64).sqrt();
    let x = Tensor::randn(0f32, 1.0, (b, s, e), &dev)?;
    let weight = |out: usize| -> candle_core::Result<Var> {
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, (e, out), &dev)? / (e as f64).sqrt())?)
    };
    let (wq, wk, wv) = (weight(h * d)?, weight(hk * d)?, weight(hk * d)?);
    // Projections into [B, H, S, D], bf16.
    let heads = |w: &Var, n: usize| -> candle_core::Result<Tensor> {
        x.broadcast_matmul(w.as_tensor())?.reshape((b, s, n, d))?.transpose(1, 2)?.to_dtype(DType::BF16)
    };
    let (q, k, v) = (heads(&wq, h)?, heads(&wk, hk)?, heads(&wv, hk)?);

    let t = |x: &Tensor| x.transpose(1, 2); // [B, H, S, D] -> the op's [B, S, H, D] view
    let ours = candle_ops::flash_attn(&t(&q)?, &t(&k)?, &t(&v)?, scale as f32, true)?; // [B, S, H, D]
    let plain = plain_attention(&q, &k, &v, scale)?.transpose(1, 2)?;
    let err = rel_l2(&ours.to_dtype(DType::F32)?, &plain)?;
    println!(
        "device {dev:?}: B {b}, S {s}, {h}:{hk} heads of {d}, causal; fused vs plain candle f32: rel L2 {err:.2e}"
    );

    // One training step: the loss's gradients reach the projections through
    // the op's backward (the reference on the CPU, our kernels on CUDA).
    let loss = ours.to_dtype(DType::F32)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let gq = grads.get(wq.as_tensor()).expect("wq has a gradient");
    println!("loss {:.4}, |dL/dWq| {:.4e}", loss.to_scalar::<f32>()?, gq.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt());
    if err > 1e-2 {
        eprintln!("error above bf16's tolerance (1e-2)");
        std::process::exit(1);
    }
    Ok(())
}
