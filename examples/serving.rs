//! Serving in miniature: prefill of a packed batch of prompts with different
//! lengths, then split-KV decode steps over a paged KV cache (pages of 16 keys in a
//! shuffled order), appending one token per sequence per step. Every step is
//! checked against the CPU reference on a host mirror of the cache.
//!
//! ```text
//! cargo run --release --example serving
//! ```
//! Without a GPU it says so and checks the same serving flow on the CPU
//! reference alone (packed prefill against each prompt run by itself), exiting 0.

use fused_attn::reference::{self, rel_l2_error};
use fused_attn::{
    cuda_context, Attention, AttentionOptions, CacheTables, DeviceTensor, DeviceTensorMut, Error, HostTensor, Layout,
    Mask, SeqLens,
};
use half::bf16;

const HQ: usize = 8;
const HK: usize = 2;
const D: usize = 64;
const PAGE: usize = 16;
const STEPS: usize = 4;
const PROMPTS: [usize; 3] = [37, 5, 120];

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

fn cu(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |s, &l| {
            *s += l as i32;
            Some(*s)
        }))
        .collect()
}

fn to_f64(x: &[bf16]) -> Vec<f64> {
    x.iter().map(|&v| v.into()).collect()
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

/// Without a GPU: the packed prefill's reference equals each prompt run alone.
fn cpu_only() {
    let t: usize = PROMPTS.iter().sum();
    let (q, k) = (inputs(t * HQ * D, 1), inputs(t * HK * D, 2));
    let opts = AttentionOptions::new(Mask::Causal);
    let cu_seqlens = cu(&PROMPTS);
    let packed = reference::forward_varlen(
        HostTensor::new(&q, Layout::bshd(1, t, HQ, D)),
        HostTensor::new(&k, Layout::bshd(1, t, HK, D)),
        HostTensor::new(&k, Layout::bshd(1, t, HK, D)),
        &cu_seqlens,
        &cu_seqlens,
        None,
        &opts,
    )
    .expect("valid prefill");
    let (s0, l) = (cu_seqlens[2] as usize, PROMPTS[2]);
    let alone = reference::forward(
        HostTensor::new(&q[s0 * HQ * D..], Layout::bshd(1, l, HQ, D)),
        HostTensor::new(&k[s0 * HK * D..], Layout::bshd(1, l, HK, D)),
        HostTensor::new(&k[s0 * HK * D..], Layout::bshd(1, l, HK, D)),
        &opts,
    )
    .expect("valid prompt");
    assert_eq!(&packed.o[s0 * HQ * D..(s0 + l) * HQ * D], &alone.o[..]);
    println!("CPU reference: packed prefill of {PROMPTS:?} equals each prompt run alone");
}

fn run_gpu() -> Result<(), Error> {
    let ctx = cuda_context(0)?;
    let attn = Attention::new(&ctx)?;
    let stream = ctx.new_stream()?;
    let opts = AttentionOptions::new(Mask::Causal);
    let b = PROMPTS.len();

    // ---- Prefill: the prompts packed end to end, [T, H, D] ----
    let t: usize = PROMPTS.iter().sum();
    let (qh, kh, vh) = (inputs(t * HQ * D, 1), inputs(t * HK * D, 2), inputs(t * HK * D, 3));
    let cu_seqlens = cu(&PROMPTS);
    let seq = SeqLens::new(&stream, &cu_seqlens, &cu_seqlens, None)?;
    let (ql, kl) = (Layout::bshd(1, t, HQ, D), Layout::bshd(1, t, HK, D));
    let (q, k, v) = (stream.clone_htod(&qh)?, stream.clone_htod(&kh)?, stream.clone_htod(&vh)?);
    let mut o = stream.alloc_zeros::<bf16>(t * HQ * D)?;
    let info = {
        let mut ot = DeviceTensorMut::new(&mut o, ql);
        let (qt, kt, vt) = (DeviceTensor::new(&q, ql), DeviceTensor::new(&k, kl), DeviceTensor::new(&v, kl));
        attn.forward_varlen_into(&stream, &qt, &kt, &vt, &mut ot, None, &seq, &opts)?
    };
    let got = stream.clone_dtoh(&o)?;
    let want = reference::forward_varlen(
        HostTensor::new(&qh, ql),
        HostTensor::new(&kh, kl),
        HostTensor::new(&vh, kl),
        &cu_seqlens,
        &cu_seqlens,
        None,
        &opts,
    )?;
    let err = rel_l2_error(&to_f64(&got), &want.o)?;
    println!("prefill {PROMPTS:?} tokens on {}: rel L2 {err:.2e}", info.name);
    let mut worst = err;

    // ---- The paged cache: room for every prompt plus the decode steps ----
    let per_seq = (PROMPTS.iter().max().unwrap() + STEPS).div_ceil(PAGE);
    let n_pages = b * per_seq + 3;
    // Pages in a scrambled order (sorted by a hash: a permutation), unused slots holding noise.
    let mut ids: Vec<i32> = (0..n_pages as i32).collect();
    ids.sort_by_key(|&i| (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40);
    let block_table: Vec<i32> = ids[..b * per_seq].to_vec();
    let page_elems = PAGE * HK * D;
    let (mut kc_host, mut vc_host) = (inputs(n_pages * page_elems, 4), inputs(n_pages * page_elems, 5));
    let slot = |s: usize, j: usize| (block_table[s * per_seq + j / PAGE] as usize * PAGE + j % PAGE) * HK * D;
    for s in 0..b {
        for j in 0..PROMPTS[s] {
            let from = (cu_seqlens[s] as usize + j) * HK * D;
            kc_host[slot(s, j)..slot(s, j) + HK * D].copy_from_slice(&kh[from..from + HK * D]);
            vc_host[slot(s, j)..slot(s, j) + HK * D].copy_from_slice(&vh[from..from + HK * D]);
        }
    }
    let (mut kc, mut vc) = (stream.clone_htod(&kc_host)?, stream.clone_htod(&vc_host)?);
    let lens: Vec<i32> = PROMPTS.iter().map(|&l| l as i32).collect();
    let mut tables = CacheTables::paged(&stream, &lens, &block_table, per_seq, PAGE)?;
    let pl = Layout::bshd(n_pages, PAGE, HK, D);

    // ---- Decode: one new token per sequence per step, split-KV ----
    // The keys of each sequence split over several CTAs, partial results
    // merged by their LSE (a decode step has too few rows to fill the GPU).
    // At least 2 here, to run the split path even on these short caches.
    let (q1l, kv1l) = (Layout::bshd(b, 1, HQ, D), Layout::bshd(b, 1, HK, D));
    let mut o1 = stream.alloc_zeros::<bf16>(b * HQ * D)?;
    let splits = attn.kvcache_splits(b, 1, HQ, HK, per_seq * PAGE).max(2);
    let ws_len = Attention::split_workspace_len(splits, b, 1, HQ, D).expect("a small workspace");
    let mut workspace = stream.alloc_zeros::<f32>(ws_len)?;
    for step in 0..STEPS {
        let seed = 100 + 3 * step as u64;
        let (q1h, k1h, v1h) = (inputs(b * HQ * D, seed), inputs(b * HK * D, seed + 1), inputs(b * HK * D, seed + 2));
        let (q1, k1, v1) = (stream.clone_htod(&q1h)?, stream.clone_htod(&k1h)?, stream.clone_htod(&v1h)?);
        // The host mirror first: the new keys go where the device copy puts them.
        for s in 0..b {
            let at = slot(s, tables.seqlens()[s] as usize);
            kc_host[at..at + HK * D].copy_from_slice(&k1h[s * HK * D..(s + 1) * HK * D]);
            vc_host[at..at + HK * D].copy_from_slice(&v1h[s * HK * D..(s + 1) * HK * D]);
        }
        {
            let (mut kct, mut vct) = (DeviceTensorMut::new(&mut kc, pl), DeviceTensorMut::new(&mut vc, pl));
            let (k1t, v1t) = (DeviceTensor::new(&k1, kv1l), DeviceTensor::new(&v1, kv1l));
            attn.append_kv(&stream, &k1t, &v1t, &mut kct, &mut vct, &mut tables)?;
        }
        let info = {
            let mut ot = DeviceTensorMut::new(&mut o1, q1l);
            let (qt, kt, vt) = (DeviceTensor::new(&q1, q1l), DeviceTensor::new(&kc, pl), DeviceTensor::new(&vc, pl));
            attn.forward_kvcache_split_into(
                &stream,
                &qt,
                &kt,
                &vt,
                &mut ot,
                None,
                &tables,
                &mut workspace,
                splits,
                &opts,
            )?
        };
        let got = stream.clone_dtoh(&o1)?;
        let want = reference::forward_kvcache(
            HostTensor::new(&q1h, q1l),
            HostTensor::new(&kc_host, pl),
            HostTensor::new(&vc_host, pl),
            tables.seqlens(),
            None,
            Some((&block_table, per_seq)),
            &opts,
        )?;
        let err = rel_l2_error(&to_f64(&got), &want.o)?;
        println!(
            "decode step {step}: cache lengths {:?} on {} ({splits} key splits): rel L2 {err:.2e}",
            tables.seqlens(),
            info.name
        );
        worst = worst.max(err);
    }
    if worst > 1e-2 {
        eprintln!("error: worst rel L2 {worst:.2e} above bf16's 1e-2");
        std::process::exit(1);
    }
    println!("all steps within bf16's tolerance (worst {worst:.2e})");
    Ok(())
}
