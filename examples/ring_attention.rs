//! Context parallelism: ring attention over NCCL (issue 11 item 4). Each of
//! N GPUs ("ranks") holds a slice of the queries and a slice of the keys and
//! values. In N steps every rank attends its queries to the K/V slice it
//! holds, merges the partial result into its running state by the LSE
//! (`Attention::merge_states_into`), and passes the slice on to the next
//! rank (NCCL send/recv) while receiving the previous rank's. After the last
//! step every rank holds attention of its queries over all keys; each is
//! checked against the CPU reference.
//!
//! ```text
//! cargo run --release --features nccl --example ring_attention
//! ```
//! Needs 2 or more GPUs and libnccl (loaded at run time); with fewer it
//! says so and exits 0. One host thread drives every GPU (NCCL group calls).
//! The same algorithm on one device is the GPU tier's `merge/bf16/ring_running_merge`.

use std::sync::Arc;

use fused_attn::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use fused_attn::cudarc::nccl::{group_end, group_start, Comm};
use fused_attn::reference::{self, rel_l2_error};
use fused_attn::{
    Attention, AttentionOptions, DeviceTensor, DeviceTensorMut, HostTensor, Layout, LseLayout, LseTensor, LseTensorMut,
    Mask, PartialState,
};
use half::bf16;

const B: usize = 2;
const HQ: usize = 8;
const HK: usize = 2;
const D: usize = 128;
/// Queries and keys per rank.
const CHUNK: usize = 256;

/// Deterministic inputs in [-1, 1).
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

/// One rank's buffers: its queries, the K/V slice it holds now and the one
/// arriving, its running state (O and LSE, ping-pong) and the step's partial.
struct Rank {
    attn: Attention,
    stream: Arc<CudaStream>,
    q: CudaSlice<bf16>,
    kv: [CudaSlice<bf16>; 2],
    kv_next: [CudaSlice<bf16>; 2],
    state: Option<(CudaSlice<bf16>, CudaSlice<f32>)>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !fused_attn::driver_present() {
        println!("no CUDA driver here; ring attention needs 2 or more GPUs");
        return Ok(());
    }
    let n = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => {
            println!("no GPU here ({e:?}); ring attention needs 2 or more");
            return Ok(());
        }
    };
    if n < 2 {
        println!("ring attention needs 2 or more GPUs (found {n}); nothing to do");
        return Ok(());
    }
    let (q_len, kv_len) = (B * CHUNK * HQ * D, B * CHUNK * HK * D);
    // The whole problem on the host: rank r holds queries and keys r·CHUNK ..
    let qh: Vec<Vec<bf16>> = (0..n).map(|r| inputs(q_len, 10 + r as u64)).collect();
    let kh: Vec<Vec<bf16>> = (0..n).map(|r| inputs(kv_len, 100 + r as u64)).collect();
    let vh: Vec<Vec<bf16>> = (0..n).map(|r| inputs(kv_len, 200 + r as u64)).collect();

    let mut streams = Vec::new();
    let mut ranks = Vec::new();
    for r in 0..n {
        let ctx = fused_attn::cuda_context(r)?;
        let stream = ctx.default_stream();
        let attn = Attention::new(&ctx)?;
        let up = |x: &[bf16]| stream.clone_htod(x);
        ranks.push(Rank {
            q: up(&qh[r])?,
            kv: [up(&kh[r])?, up(&vh[r])?],
            kv_next: [stream.alloc_zeros::<bf16>(kv_len)?, stream.alloc_zeros::<bf16>(kv_len)?],
            state: None,
            attn,
            stream: stream.clone(),
        });
        streams.push(stream);
    }
    let comms = Comm::from_devices(streams).map_err(|e| format!("NCCL: {e:?} (is libnccl installed?)"))?;

    let (ql, kl) = (Layout::bshd(B, CHUNK, HQ, D), Layout::bshd(B, CHUNK, HK, D));
    let ll = LseLayout::contiguous(B, HQ, CHUNK);
    let opts = AttentionOptions::new(Mask::Full);
    for step in 0..n {
        // Attend to the slice held now, and merge into the running state.
        for rank in ranks.iter_mut() {
            let s = &rank.stream;
            let mut o = s.alloc_zeros::<bf16>(q_len)?;
            let mut lse = s.alloc_zeros::<f32>(B * HQ * CHUNK)?;
            {
                let (qt, kt, vt) = (
                    DeviceTensor::new(&rank.q, ql),
                    DeviceTensor::new(&rank.kv[0], kl),
                    DeviceTensor::new(&rank.kv[1], kl),
                );
                let (mut ot, mut lt) = (DeviceTensorMut::new(&mut o, ql), LseTensorMut::new(&mut lse, ll));
                rank.attn.forward_into(s, &qt, &kt, &vt, &mut ot, Some(&mut lt), &opts)?;
            }
            rank.state = Some(match rank.state.take() {
                None => (o, lse),
                Some((acc_o, acc_lse)) => {
                    let mut mo = s.alloc_zeros::<bf16>(q_len)?;
                    let mut ml = s.alloc_zeros::<f32>(B * HQ * CHUNK)?;
                    {
                        let parts = [
                            PartialState { o: DeviceTensor::new(&acc_o, ql), lse: LseTensor::new(&acc_lse, ll) },
                            PartialState { o: DeviceTensor::new(&o, ql), lse: LseTensor::new(&lse, ll) },
                        ];
                        let (mut ot, mut lt) = (DeviceTensorMut::new(&mut mo, ql), LseTensorMut::new(&mut ml, ll));
                        rank.attn.merge_states_into(s, &parts, &mut ot, Some(&mut lt))?;
                    }
                    (mo, ml)
                }
            });
        }
        if step + 1 == n {
            break;
        }
        // Pass the slice round the ring: rank r sends to r + 1, receives from r - 1.
        group_start().map_err(|e| format!("NCCL: {e:?}"))?;
        for (r, (rank, comm)) in ranks.iter_mut().zip(&comms).enumerate() {
            let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
            for t in 0..2 {
                comm.send(&rank.kv[t], next as i32).map_err(|e| format!("NCCL send: {e:?}"))?;
                comm.recv(&mut rank.kv_next[t], prev as i32).map_err(|e| format!("NCCL recv: {e:?}"))?;
            }
        }
        group_end().map_err(|e| format!("NCCL: {e:?}"))?;
        for rank in ranks.iter_mut() {
            std::mem::swap(&mut rank.kv, &mut rank.kv_next);
        }
    }

    // Every rank's queries against all keys, on the host.
    let k_all: Vec<bf16> = interleave(&kh);
    let v_all: Vec<bf16> = interleave(&vh);
    let kl_all = Layout::bshd(B, n * CHUNK, HK, D);
    let mut worst: f64 = 0.0;
    for (r, rank) in ranks.iter().enumerate() {
        let want = reference::forward(
            HostTensor::new(&qh[r], ql),
            HostTensor::new(&k_all, kl_all),
            HostTensor::new(&v_all, kl_all),
            &opts,
        )?;
        let (o, _) = rank.state.as_ref().expect("n >= 1 steps ran");
        let got: Vec<f64> = rank.stream.clone_dtoh(o)?.iter().map(|x| x.to_f64()).collect();
        let err = rel_l2_error(&got, &want.o)?;
        println!("rank {r}: queries {}..{} over all {} keys: rel L2 {err:.2e}", r * CHUNK, (r + 1) * CHUNK, n * CHUNK);
        worst = worst.max(err);
    }
    if worst > 1e-2 {
        eprintln!("error: worst rel L2 {worst:.2e} above bf16's 1e-2");
        std::process::exit(1);
    }
    println!("ring attention over {n} GPUs matches the reference (worst {worst:.2e})");
    Ok(())
}

/// The ranks' `[B, CHUNK, H, D]` slices as one `[B, n·CHUNK, H, D]` tensor.
fn interleave(slices: &[Vec<bf16>]) -> Vec<bf16> {
    let row = CHUNK * HK * D;
    let mut out = Vec::with_capacity(slices.len() * B * row);
    for b in 0..B {
        for s in slices {
            out.extend_from_slice(&s[b * row..(b + 1) * row]);
        }
    }
    out
}
