//! The main job: multi-head causal attention on a realistic shape, checked
//! against the CPU reference, with the kernel used, the error and the time.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//! Without a GPU (or without kernels) it says so and runs the CPU reference on
//! a small problem instead, exiting 0.

use std::time::Instant;

use fused_attn::cudarc::driver::sys::CUevent_flags;
use fused_attn::reference::{self, rel_l2_error};
use fused_attn::{cuda_context, Attention, AttentionOptions, DeviceTensor, Error, HostTensor, Layout, Mask};
use half::bf16;

/// Deterministic pseudo-random inputs in [-1, 1) (no extra dependency).
fn inputs(n: usize, seed: u64) -> Vec<bf16> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

fn main() {
    match run_gpu() {
        Ok(()) => {}
        Err(
            e @ (Error::NoDriver | Error::NoDevice { .. } | Error::KernelsNotBuilt | Error::UnsupportedDevice { .. }),
        ) => {
            println!("No GPU run: {e}");
            cpu_only();
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn run_gpu() -> Result<(), Error> {
    let ctx = cuda_context(0)?;
    let attn = Attention::new(&ctx)?;
    let stream = ctx.new_stream().map_err(|source| Error::Cuda { during: "creating a stream", source })?;
    let (b, l, h, d) = (2, 4096, 16, 128);
    let layout = Layout::bshd(b, l, h, d);
    let (qh, kh, vh) = (inputs(layout.numel(), 1), inputs(layout.numel(), 2), inputs(layout.numel(), 3));
    let up = |x: &[bf16]| stream.clone_htod(x).map_err(|source| Error::Cuda { during: "upload", source });
    let (q, k, v) = (up(&qh)?, up(&kh)?, up(&vh)?);
    let (qt, kt, vt) = (DeviceTensor::new(&q, layout), DeviceTensor::new(&k, layout), DeviceTensor::new(&v, layout));
    let opts = AttentionOptions::new(Mask::Causal);

    let out = attn.forward(&stream, &qt, &kt, &vt, &opts)?; // warm-up, and the result we check
    let cuda = |source| Error::Cuda { during: "timing", source };
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda)?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda)?;
    let reps = 20;
    start.record(&stream).map_err(cuda)?;
    for _ in 0..reps {
        attn.forward(&stream, &qt, &kt, &vt, &opts)?;
    }
    end.record(&stream).map_err(cuda)?;
    end.synchronize().map_err(cuda)?;
    let ms = start.elapsed_ms(&end).map_err(cuda)? as f64 / reps as f64;

    let o: Vec<bf16> = stream.clone_dtoh(&out.o).map_err(|source| Error::Cuda { during: "download", source })?;
    let t = Instant::now();
    let r = reference::forward(
        HostTensor::new(&qh, layout),
        HostTensor::new(&kh, layout),
        HostTensor::new(&vh, layout),
        &opts,
    )?;
    let o64: Vec<f64> = o.iter().map(|&x| x.into()).collect();
    let err = rel_l2_error(&o64, &r.o);
    let tflops = r.problem.flops() as f64 / (ms * 1e-3) / 1e12;
    println!("GPU: {} (sm_{})", ctx.name().unwrap_or_default(), attn.sm());
    println!("problem: B={b} L={l} H={h} D={d} bf16, causal");
    println!("kernel: {}", out.kernel.name);
    println!("time: {ms:.3} ms per call (mean of {reps}, includes output allocation), {tflops:.1} TFLOP/s");
    println!("rel L2 error vs f64 CPU reference: {err:.2e} (reference took {:.1} s)", t.elapsed().as_secs_f64());
    if err > 1e-2 {
        eprintln!("error above the bf16 tolerance 1e-2");
        std::process::exit(1);
    }
    Ok(())
}

fn cpu_only() {
    let (b, l, h, d) = (1, 256, 4, 64);
    let layout = Layout::bshd(b, l, h, d);
    let (q, k, v) = (inputs(layout.numel(), 1), inputs(layout.numel(), 2), inputs(layout.numel(), 3));
    let t = Instant::now();
    let r = reference::forward(
        HostTensor::new(&q, layout),
        HostTensor::new(&k, layout),
        HostTensor::new(&v, layout),
        &AttentionOptions::new(Mask::Causal),
    )
    .expect("a valid problem");
    println!(
        "CPU reference: B={b} L={l} H={h} D={d} causal in {:.1} ms; O[0][0..4] = {:?}, LSE[0..4] = {:?}",
        t.elapsed().as_secs_f64() * 1e3,
        &r.o[..4],
        &r.lse[..4]
    );
}
