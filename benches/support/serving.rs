//! Serving cases of the benchmark (issue 10, DESIGN.md section 5's "whatever
//! the issue at hand adds"): a packed prefill against the same sequences run
//! one call each, and attention over a KV cache dense against paged (pages of
//! 16 and 256) on the same problem. Timed with CUDA events like the grid; no
//! error check here (the GPU tier's varlen/ and kvcache/ trials do that).

use std::sync::Arc;

use fused_attn::cudarc::driver::sys::CUevent_flags;
use fused_attn::cudarc::driver::CudaStream;
use fused_attn::{
    Attention, AttentionOptions, CacheTables, DeviceTensor, DeviceTensorMut, Error, Layout, Mask, Problem, SeqLens,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{randn, upload, Gpu};

fn cuda(during: &'static str) -> impl Fn(fused_attn::cudarc::driver::DriverError) -> Error {
    move |driver| Error::Cuda { during, driver }
}

/// Median milliseconds of `reps` runs of `f` (each between its own events), after 3 warm-ups.
/// Also the timer of the mechanism rows (`mechanisms.rs`).
pub fn time(
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
    rows.extend(decode_rows(g, stream, reps)?);
    Ok(rows)
}

/// Decode steps (issue 11): one query per sequence over a cache of `len`
/// keys, dense and pages of 16, plain and split-KV
/// ([`Attention::kvcache_splits`]), reported as GB/s of K and V read next to
/// the same GPU's device-to-device copy bandwidth measured in this run.
/// Cases whose cache would pass 8 GiB (K and V) are left out.
fn decode_rows(g: &Gpu, stream: &Arc<CudaStream>, reps: usize) -> Result<Vec<String>, Error> {
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(11);
    let d = 128;
    // Copy bandwidth: 1 GiB device to device, read + write counted.
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes).map_err(cuda("allocating"))?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(cuda("allocating"))?;
    let copy_ms = time(g, stream, reps.min(10), || stream.memcpy_dtod(&src, &mut dst).map_err(cuda("copying")))?;
    let copy_gbps = 2.0 * bytes as f64 / (copy_ms * 1e-3) / 1e9;
    drop((src, dst));
    eprintln!("serving: device-to-device copy {copy_gbps:.0} GB/s (read + write)");
    let max_bytes = 8usize << 30;
    for (hq, hk) in [(32, 8), (64, 8), (32, 32)] {
        for b in [1usize, 8, 64, 256] {
            for len in [1024usize, 8192, 32768, 131072] {
                let kv_bytes = 2 * b * len * hk * d * 2;
                if kv_bytes > max_bytes {
                    continue;
                }
                let q = upload(stream, &randn::<bf16>(&mut rng, b * hq * d))?;
                let mut o = stream.alloc_zeros::<bf16>(b * hq * d).map_err(cuda("allocating"))?;
                let cache = upload(stream, &randn::<bf16>(&mut rng, b * len * hk * d))?;
                let lens = vec![len as i32; b];
                let ql = Layout::bshd(b, 1, hq, d);
                let opts = AttentionOptions::new(Mask::Causal);
                let splits = g.attn.kvcache_splits(b, 1, hq, hk, len);
                let ws_len = Attention::split_workspace_len(splits, b, 1, hq, d).unwrap_or(0);
                let mut ws = stream.alloc_zeros::<f32>(ws_len.max(1)).map_err(cuda("allocating"))?;
                for page in [0usize, 16] {
                    let (tables, cl) = match len.checked_div(page) {
                        None => (CacheTables::dense(stream, &lens, None)?, Layout::bshd(b, len, hk, d)),
                        Some(per_seq) => {
                            let ids: Vec<i32> = (0..(b * per_seq) as i32).collect();
                            (
                                CacheTables::paged(stream, &lens, &ids, per_seq, page)?,
                                Layout::bshd(b * per_seq, page, hk, d),
                            )
                        }
                    };
                    // The plain call and, where the heuristic splits, the split one.
                    for split in if splits > 1 { vec![1, splits] } else { vec![1] } {
                        let mut name = String::new();
                        let ms = time(g, stream, reps.min(10), || {
                            let (qt, ct) = (DeviceTensor::new(&q, ql), DeviceTensor::new(&cache, cl));
                            let mut ot = DeviceTensorMut::new(&mut o, ql);
                            let info = g.attn.forward_kvcache_split_into(
                                stream, &qt, &ct, &ct, &mut ot, None, &tables, &mut ws, split, &opts,
                            )?;
                            name = info.name.to_string();
                            Ok(())
                        })?;
                        let gbps = kv_bytes as f64 / (ms * 1e-3) / 1e9;
                        let kind = if page == 0 { "dense".to_string() } else { format!("paged {page}") };
                        eprintln!(
                            "serving: decode {kind} b{b} cache{len} hq{hq} hkv{hk} d{d} splits {split}: {name} {ms:.4} ms {gbps:.0} GB/s ({:.0}% of copy)",
                            100.0 * gbps / copy_gbps
                        );
                        rows.push(format!(
                            "{{\"name\": \"decode {kind} b{b} cache{len} hq{hq} hkv{hk} splits{split}\", \"kernel\": {name:?}, \"ours_ms\": {ms:.6}, \"ours_tflops\": {:.3}, \"gbps\": {gbps:.1}, \"copy_gbps\": {copy_gbps:.1}, \"splits\": {split}, \"batch\": {b}, \"seqlen_q\": 1, \"cache_len\": {len}, \"page\": {page}, \"heads_q\": {hq}, \"heads_kv\": {hk}, \"head_dim\": {d}, \"mask\": \"causal\", \"decode\": true}}",
                            (b * 4 * hq * d * len) as f64 / (ms * 1e-3) / 1e12
                        ));
                    }
                }
            }
        }
    }
    Ok(rows)
}
