//! Serving cases of the benchmark (issue 10, DESIGN.md section 5's "whatever
//! the issue at hand adds"): a packed prefill against the same sequences run
//! one call each, and attention over a KV cache dense against paged (pages of
//! 16 and 256) on the same problem. Timed with CUDA events like the grid; no
//! error check here (the GPU tier's varlen/ and kvcache/ trials do that).

use std::sync::Arc;

use fused_attn::cudarc::driver::sys::CUevent_flags;
use fused_attn::cudarc::driver::CudaStream;
use fused_attn::{AttentionOptions, CacheTables, DeviceTensor, DeviceTensorMut, Error, Layout, Mask, Problem, SeqLens};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{randn, upload, Gpu};

fn cuda(during: &'static str) -> impl Fn(fused_attn::cudarc::driver::DriverError) -> Error {
    move |driver| Error::Cuda { during, driver }
}

/// Median milliseconds of `reps` runs of `f` (each between its own events), after 3 warm-ups.
fn time(
    g: &Gpu,
    stream: &Arc<CudaStream>,
    reps: usize,
    mut f: impl FnMut() -> Result<(), Error>,
) -> Result<f64, Error> {
    for _ in 0..3 {
        f()?;
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (a, b) = (
            g.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("creating events"))?,
            g.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("creating events"))?,
        );
        a.record(stream).map_err(cuda("recording an event"))?;
        f()?;
        b.record(stream).map_err(cuda("recording an event"))?;
        b.synchronize().map_err(cuda("synchronising"))?;
        ms.push(a.elapsed_ms(&b).map_err(cuda("reading events"))? as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Exact FLOPs of one sequence (4 · Hq · D · visible pairs).
fn flops(lq: usize, lk: usize, hq: usize, hk: usize, d: usize, mask: Mask) -> u128 {
    let l = |s| Layout::bshd(1, s, hq, d);
    let kl = Layout::bshd(1, lk, hk, d);
    fused_attn::problem_of(fused_attn::DType::BF16, &l(lq), &kl, &kl, &AttentionOptions::new(mask))
        .map_or(0, |p: Problem| p.flops())
}

/// The JSON objects of the serving cases (one line each).
pub fn serving_rows(g: &Gpu, stream: &Arc<CudaStream>, reps: usize) -> Result<Vec<String>, Error> {
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(10);
    let (hq, hk, d) = (32, 8, 128);
    let mask = Mask::Causal;
    let opts = AttentionOptions::new(mask);

    // ---- Packed prefill: 64 sequences, lengths log-uniform in 128..8192 ----
    let lens: Vec<usize> = (0..64).map(|_| (2f64.powf(rng.random_range(7.0..13.0))) as usize).collect();
    let cu: Vec<i32> = std::iter::once(0)
        .chain(lens.iter().scan(0, |s, &l| {
            *s += l as i32;
            Some(*s)
        }))
        .collect();
    let t = *cu.last().unwrap_or(&0) as usize;
    let q = upload(stream, &randn::<bf16>(&mut rng, t * hq * d))?;
    let kv = upload(stream, &randn::<bf16>(&mut rng, t * hk * d))?;
    let mut o = upload(stream, &randn::<bf16>(&mut rng, t * hq * d))?;
    let seq = SeqLens::new(stream, &cu, &cu, None)?;
    let (ql, kl) = (Layout::bshd(1, t, hq, d), Layout::bshd(1, t, hk, d));
    let fl: u128 = lens.iter().map(|&l| flops(l, l, hq, hk, d, mask)).sum();
    let mut name = String::new();
    let packed = time(g, stream, reps, || {
        let (qt, kt) = (DeviceTensor::new(&q, ql), DeviceTensor::new(&kv, kl));
        let mut ot = DeviceTensorMut::new(&mut o, ql);
        name = g.attn.forward_varlen_into(stream, &qt, &kt, &kt, &mut ot, None, &seq, &opts)?.name.to_string();
        Ok(())
    })?;
    // The same work as one forward_into per sequence (what a caller without varlen does).
    let one_by_one = time(g, stream, reps.min(10), || {
        for (s, &l) in lens.iter().enumerate() {
            let (q0, k0) = (cu[s] as usize * hq * d, cu[s] as usize * hk * d);
            let (ql1, kl1) = (Layout::bshd(1, l, hq, d), Layout::bshd(1, l, hk, d));
            let qt = DeviceTensor::from_view(q.slice(q0..q0 + l * hq * d), ql1);
            let kt = DeviceTensor::from_view(kv.slice(k0..k0 + l * hk * d), kl1);
            let mut ot = DeviceTensorMut::from_view(o.slice_mut(q0..q0 + l * hq * d), ql1);
            g.attn.forward_into(stream, &qt, &kt, &kt, &mut ot, None, &opts)?;
        }
        Ok(())
    })?;
    let tf = |ms: f64| fl as f64 / (ms * 1e-3) / 1e12;
    eprintln!(
        "serving: varlen prefill 64 seqs (128..8k, {t} tokens) hq32 hkv8 d128 causal: {name} {packed:.3} ms {:.1} TFLOP/s; one call per sequence {one_by_one:.3} ms ({:.2}x)",
        tf(packed),
        one_by_one / packed
    );
    // The shape goes along for scripts/peers.py, which times torch on the same problem.
    let seq_lens = lens.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ");
    rows.push(format!(
        "{{\"name\": \"varlen prefill 64 seqs log-uniform 128-8192\", \"kernel\": {name:?}, \"tokens\": {t}, \"flops\": {fl}, \"ours_ms\": {packed:.6}, \"ours_tflops\": {:.3}, \"one_call_per_sequence_ms\": {one_by_one:.6}, \"heads_q\": {hq}, \"heads_kv\": {hk}, \"head_dim\": {d}, \"mask\": \"causal\", \"seq_lens\": [{seq_lens}]}}",
        tf(packed)
    ));

    // ---- KV cache: 8 sequences, 4096 cached keys each, 512 new queries; dense vs paged ----
    let (b, len, lq) = (8usize, 4096usize, 512usize);
    let q = upload(stream, &randn::<bf16>(&mut rng, b * lq * hq * d))?;
    let mut o = upload(stream, &randn::<bf16>(&mut rng, b * lq * hq * d))?;
    let cache = upload(stream, &randn::<bf16>(&mut rng, b * len * hk * d))?; // dense [B, L, Hk, D] = pages in order
    let lens = vec![len as i32; b];
    let fl = b as u128 * flops(lq, len, hq, hk, d, mask);
    let ql = Layout::bshd(b, lq, hq, d);
    for page in [0usize, 256, 16] {
        let (tables, cl) = match len.checked_div(page) {
            None => (CacheTables::dense(stream, &lens, None)?, Layout::bshd(b, len, hk, d)),
            Some(per_seq) => {
                // The same memory as pages: the block table deals them out in a shuffled order.
                let mut ids: Vec<i32> = (0..(b * per_seq) as i32).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, rng.random_range(0..=i));
                }
                (CacheTables::paged(stream, &lens, &ids, per_seq, page)?, Layout::bshd(b * per_seq, page, hk, d))
            }
        };
        let mut name = String::new();
        let ms = time(g, stream, reps.min(10), || {
            let (qt, ct) = (DeviceTensor::new(&q, ql), DeviceTensor::new(&cache, cl));
            let mut ot = DeviceTensorMut::new(&mut o, ql);
            name = g.attn.forward_kvcache_into(stream, &qt, &ct, &ct, &mut ot, None, &tables, &opts)?.name.to_string();
            Ok(())
        })?;
        let kind = if page == 0 { "dense".to_string() } else { format!("paged {page}") };
        eprintln!(
            "serving: kv cache {kind}: b{b} cache {len} q {lq} hq32 hkv8 d128 causal: {name} {ms:.3} ms {:.1} TFLOP/s",
            fl as f64 / (ms * 1e-3) / 1e12
        );
        rows.push(format!(
            "{{\"name\": \"kv cache {kind} b{b} cache{len} q{lq}\", \"kernel\": {name:?}, \"flops\": {fl}, \"ours_ms\": {ms:.6}, \"ours_tflops\": {:.3}, \"batch\": {b}, \"seqlen_q\": {lq}, \"cache_len\": {len}, \"page\": {page}, \"heads_q\": {hq}, \"heads_kv\": {hk}, \"head_dim\": {d}, \"mask\": \"causal\"}}",
            fl as f64 / (ms * 1e-3) / 1e12
        ));
    }
    Ok(rows)
}
