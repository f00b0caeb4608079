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
use fused_attn::{
    cuda_context, Attention, AttentionOptions, DeviceTensor, DeviceTensorMut, Error, HostTensor, Layout, LseLayout,
    LseTensorMut, Mask,
};
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
    let stream = ctx.new_stream()?; // cudarc's errors convert into fused_attn::Error
                                    // Stored as PyTorch/candle do, [B, H, S, D]: Layout::bhsd takes its dims in that order.
    let (b, h, l, d) = (2, 16, 4096, 128);
    let layout = Layout::bhsd(b, h, l, d);
    let n = b * h * l * d;
    let (qh, kh, vh) = (inputs(n, 1), inputs(n, 2), inputs(n, 3));
    let (q, k, v) = (stream.clone_htod(&qh)?, stream.clone_htod(&kh)?, stream.clone_htod(&vh)?);
    let (qt, kt, vt) = (DeviceTensor::new(&q, layout), DeviceTensor::new(&k, layout), DeviceTensor::new(&v, layout));
    let opts = AttentionOptions::new(Mask::Causal);

    // Caller-owned outputs, reused by every call: the steady state allocates nothing.
    let mut o = stream.alloc_zeros::<bf16>(n)?;
    let mut lse = stream.alloc_zeros::<f32>(b * h * l)?;
    let mut ot = DeviceTensorMut::new(&mut o, layout);
    let mut lt = LseTensorMut::new(&mut lse, LseLayout::contiguous(b, h, l));
    let kernel = attn.forward_into(&stream, &qt, &kt, &vt, &mut ot, Some(&mut lt), &opts)?; // warm-up
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let reps = 20;
    start.record(&stream)?;
    for _ in 0..reps {
        attn.forward_into(&stream, &qt, &kt, &vt, &mut ot, Some(&mut lt), &opts)?;
    }
    end.record(&stream)?;
    end.synchronize()?;
    let ms = start.elapsed_ms(&end)? as f64 / reps as f64;

    let o: Vec<bf16> = stream.clone_dtoh(&o)?;
    let t = Instant::now();
    let r = reference::forward(
        HostTensor::new(&qh, layout),
        HostTensor::new(&kh, layout),
        HostTensor::new(&vh, layout),
        &opts,
    )?;
    // The reference's O is contiguous [B, S, H, D]; ours is stored [B, H, S, D].
    let mut o64 = Vec::with_capacity(n);
    for bi in 0..b {
        for s in 0..l {
            for hi in 0..h {
                let at = layout.offset(bi, s, hi, 0);
                o64.extend(o[at..at + d].iter().map(|&x| f64::from(x)));
            }
        }
    }
    let err = rel_l2_error(&o64, &r.o)?;
    let tflops = r.problem.flops() as f64 / (ms * 1e-3) / 1e12;
    println!("GPU: {} (sm_{})", ctx.name().unwrap_or_default(), attn.sm());
    println!("problem: B={b} H={h} L={l} D={d} bf16 [B,H,S,D], causal");
    println!("kernel: {}", kernel.name);
    println!("time: {ms:.3} ms per call (mean of {reps}, caller-owned outputs), {tflops:.1} TFLOP/s");
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
    let (q, k, v) = (inputs(b * l * h * d, 1), inputs(b * l * h * d, 2), inputs(b * l * h * d, 3));
    let t = Instant::now();
    let r = reference::forward(
        HostTensor::new(&q, layout),
        HostTensor::new(&k, layout),
        HostTensor::new(&v, layout),
        &AttentionOptions::new(Mask::Causal),
    )
    .expect("a valid problem of a fixed shape");
    println!(
        "CPU reference: B={b} L={l} H={h} D={d} causal in {:.1} ms; O[0][0..4] = {:?}, LSE[0..4] = {:?}",
        t.elapsed().as_secs_f64() * 1e3,
        &r.o[..4],
        &r.lse[..4]
    );
}
