//! candle CUDA tier (cargo feature `candle-cuda`, a GPU): `candle_ops` on
//! candle CUDA tensors against the same op on candle CPU tensors (the f64
//! reference rounded once), forward and candle autograd, over GQA, masks,
//! ALiBi, sinks, softcap, transposed views and a view whose last dimension
//! is strided (the op's device copy). Without a CUDA device every test says
//! so and returns.
//!
//! `CUDA_COMPUTE_CAP=90 cargo test --release --features candle-cuda --test candle_cuda`
//! (staged by `scripts/gpu-bundle.sh` with `FUSED_ATTN_BUNDLE_CANDLE=1`).

use candle_core::{DType, Device, Tensor, Var};
use fused_attn::candle_ops::{self, FusedAttn};
use fused_attn::{AttentionOptions, Mask};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device ({e}): skipped");
            None
        }
    }
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64 (both moved to the CPU).
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b) = (f(a), f(b));
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (num / den.max(1e-300)).sqrt()
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        3e-3
    }
}

/// Random `[dims]` in f32 on the CPU, then `dtype`.
fn randn(dims: &[usize], dtype: DType, seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

struct Case {
    b: usize,
    lq: usize,
    lk: usize,
    hq: usize,
    hk: usize,
    d: usize,
}

const CASES: &[Case] = &[
    Case { b: 2, lq: 129, lk: 129, hq: 4, hk: 4, d: 64 },
    Case { b: 1, lq: 77, lk: 300, hq: 12, hk: 3, d: 128 }, // GQA 4:1, Lq < Lk
    Case { b: 2, lq: 1, lk: 1000, hq: 16, hk: 2, d: 128 }, // a decode step, GQA 8:1
    Case { b: 1, lq: 200, lk: 63, hq: 2, hk: 1, d: 96 },   // MQA, Lq > Lk
];

/// `[B, H, S, D]` tensors as candle models keep them, handed over as
/// `[B, S, H, D]` views (`transpose(1, 2)`, no copy).
fn qkv(c: &Case, dtype: DType, seed: u64) -> (Tensor, Tensor, Tensor) {
    let q = randn(&[c.b, c.hq, c.lq, c.d], dtype, seed).transpose(1, 2).unwrap();
    let k = randn(&[c.b, c.hk, c.lk, c.d], dtype, seed + 1).transpose(1, 2).unwrap();
    let v = randn(&[c.b, c.hk, c.lk, c.d], dtype, seed + 2).transpose(1, 2).unwrap();
    (q, k, v)
}

/// Runs `op` on the CPU tensors and on their CUDA copies; the results must agree.
fn agree(what: &str, dev: &Device, ts: &[&Tensor], op: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>) {
    let cpu: Vec<Tensor> = ts.iter().map(|t| (*t).clone()).collect();
    // to_device copies the storage and keeps the layout: the views stay
    // views on the device.
    let gpu: Vec<Tensor> = ts.iter().map(|t| t.to_device(dev).unwrap()).collect();
    let want = op(&cpu).unwrap();
    let got = op(&gpu).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(got.device().is_cuda(), "{what}: result not on the GPU");
    assert_eq!(got.dims(), want.dims(), "{what}");
    let err = rel_l2(&got, &want);
    println!("{what}: rel L2 {err:.2e}");
    assert!(err <= tol(want.dtype()), "{what}: rel L2 {err:.2e} above {:.0e}", tol(want.dtype()));
}

#[test]
fn forward_matches_the_cpu_op() {
    let Some(dev) = cuda() else { return };
    for (i, c) in CASES.iter().enumerate() {
        for dtype in [DType::BF16, DType::F16] {
            let (q, k, v) = qkv(c, dtype, 10 * i as u64);
            let scale = 0.7 / (c.d as f32).sqrt();
            let name = format!("b{} lq{} lk{} h{}:{} d{} {dtype:?}", c.b, c.lq, c.lk, c.hq, c.hk, c.d);
            for causal in [false, true] {
                agree(&format!("{name} causal={causal}"), &dev, &[&q, &k, &v], |t| {
                    candle_ops::flash_attn(&t[0], &t[1], &t[2], scale, causal)
                });
            }
            agree(&format!("{name} window(31,5) softcap 20"), &dev, &[&q, &k, &v], |t| {
                candle_ops::flash_attn_windowed_softcap(&t[0], &t[1], &t[2], scale, Some(31), Some(5), 20.0)
            });
        }
    }
}

#[test]
fn alibi_and_sinks_on_the_device() {
    let Some(dev) = cuda() else { return };
    let c = &CASES[1];
    let (q, k, v) = qkv(c, DType::BF16, 40);
    let slopes: Vec<f32> = fused_attn::alibi_slopes(c.hq);
    let per_head = Tensor::from_vec(slopes.clone(), c.hq, &Device::Cpu).unwrap();
    let per_batch = Tensor::from_vec(
        (0..c.b * c.hq).map(|i| 0.5 * slopes[i % c.hq]).collect::<Vec<f32>>(),
        (c.b, c.hq),
        &Device::Cpu,
    )
    .unwrap();
    let sinks =
        Tensor::from_vec((0..c.hq).map(|h| h as f32 * 0.7 - 2.0).collect::<Vec<f32>>(), c.hq, &Device::Cpu).unwrap();
    // Slopes as a view that starts inside its storage: the op must copy it,
    // not hand the kernels the storage from element 0.
    let padded = Tensor::cat(&[&Tensor::full(9f32, c.hq, &Device::Cpu).unwrap(), &per_head], 0).unwrap();
    let offset_view = padded.narrow(0, c.hq, c.hq).unwrap();
    assert_ne!(offset_view.layout().start_offset(), 0);
    for (what, slopes) in
        [("alibi [Hq]", &per_head), ("alibi [B, Hq]", &per_batch), ("alibi [Hq], offset view", &offset_view)]
    {
        agree(what, &dev, &[&q, &k, &v, slopes], |t| {
            candle_ops::flash_attn_alibi(&t[0], &t[1], &t[2], &t[3], 0.1, true)
        });
    }
    // Sinks given on the CPU reach the device with the op: the same tensor
    // serves both runs.
    agree("sinks", &dev, &[&q, &k, &v], |t| {
        let op = FusedAttn::new(AttentionOptions::new(Mask::Causal).with_scale(0.1)).with_sinks(sinks.clone());
        t[0].apply_op3(&t[1], &t[2], op)
    });
}

#[test]
fn strided_last_dimension_is_copied_on_the_device() {
    let Some(dev) = cuda() else { return };
    let c = &CASES[0];
    // [B, S, D, H] transposed to [B, S, H, D]: the last dimension strides by H.
    let q = randn(&[c.b, c.lq, c.d, c.hq], DType::BF16, 50).transpose(2, 3).unwrap();
    let (_, k, v) = qkv(c, DType::BF16, 51);
    assert_ne!(q.stride()[3], 1);
    agree("last-dim strided q", &dev, &[&q, &k, &v], |t| candle_ops::flash_attn(&t[0], &t[1], &t[2], 0.125, true));
}

#[test]
fn backward_matches_the_cpu_gradients() {
    let Some(dev) = cuda() else { return };
    for (i, c) in CASES.iter().enumerate() {
        let (q, k, v) = qkv(c, DType::BF16, 60 + 10 * i as u64);
        let g = randn(&[c.b, c.lq, c.hq, c.d], DType::F32, 99);
        let grads = |device: &Device| {
            let vars: Vec<Var> = [&q, &k, &v]
                .iter()
                .map(|t| Var::from_tensor(&t.to_device(device).unwrap().contiguous().unwrap()).unwrap())
                .collect();
            let o = candle_ops::flash_attn(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 0.1, true)
                .unwrap();
            let loss = (o.to_dtype(DType::F32).unwrap() * g.to_device(device).unwrap()).unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            vars.iter().map(|v| store.get(v.as_tensor()).expect("a gradient").clone()).collect::<Vec<_>>()
        };
        let (want, got) = (grads(&Device::Cpu), grads(&dev));
        for (name, (w, g)) in ["dq", "dk", "dv"].iter().zip(want.iter().zip(&got)) {
            assert!(g.device().is_cuda());
            let err = rel_l2(g, w);
            println!("backward case {i} {name}: rel L2 {err:.2e}");
            // Two bf16 roundings of the same f64 gradient and a bf16 O in
            // between: twice the forward's bound.
            assert!(err <= 2e-2, "backward case {i} {name}: rel L2 {err:.2e}");
        }
    }
}

#[test]
fn varlen_matches_the_cpu_op() {
    let Some(dev) = cuda() else { return };
    // An empty query run, a one-query one, one a tile long plus one, Lq < Lk.
    let (lens_q, lens_k) = ([1u32, 70, 0, 129], [5u32, 70, 3, 300]);
    let cum = |l: &[u32]| {
        let mut c = vec![0u32];
        for x in l {
            c.push(c.last().unwrap() + x);
        }
        c
    };
    let (cq, ck) = (cum(&lens_q), cum(&lens_k));
    let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
    let (hq, hk, d) = (8, 2, 64);
    let q = randn(&[tq, hq, d], DType::BF16, 70);
    let k = randn(&[tk, hk, d], DType::BF16, 71);
    let v = randn(&[tk, hk, d], DType::BF16, 72);
    let sq = Tensor::from_vec(cq.clone(), cq.len(), &Device::Cpu).unwrap();
    let sk = Tensor::from_vec(ck.clone(), ck.len(), &Device::Cpu).unwrap();
    let slopes = Tensor::from_vec(fused_attn::alibi_slopes(hq), hq, &Device::Cpu).unwrap();
    for causal in [false, true] {
        agree(&format!("varlen causal={causal}"), &dev, &[&q, &k, &v], |t| {
            candle_ops::flash_attn_varlen(&t[0], &t[1], &t[2], &sq, &sk, 129, 300, 0.125, causal)
        });
    }
    // Tables on the device (read back by the op) and ALiBi.
    let (sq_dev, sk_dev) = (sq.to_device(&dev).unwrap(), sk.to_device(&dev).unwrap());
    let want = candle_ops::flash_attn_varlen_alibi(&q, &k, &v, &slopes, &sq, &sk, 129, 300, 0.125, true).unwrap();
    let got = candle_ops::flash_attn_varlen_alibi(
        &q.to_device(&dev).unwrap(),
        &k.to_device(&dev).unwrap(),
        &v.to_device(&dev).unwrap(),
        &slopes,
        &sq_dev,
        &sk_dev,
        129,
        300,
        0.125,
        true,
    )
    .unwrap();
    let err = rel_l2(&got, &want);
    println!("varlen alibi, device tables: rel L2 {err:.2e}");
    assert!(err <= 1e-2, "varlen alibi: rel L2 {err:.2e}");
}
