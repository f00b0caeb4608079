//! The host half of a launch, timed without a GPU: validation, kernel
//! choice over the real table and the `params.h` struct (and, for the
//! Hopper kernels, the TMA map description whose encoding is cached).
//! `cargo bench --bench host_path`. The driver half (cudarc's guards and
//! `cuLaunchKernel`) is measured on a GPU by the forward bench's
//! `launch_overhead` figures.

use criterion::{criterion_group, criterion_main, Criterion};
use fused_attn::internals::{
    dispatch, fwd_params, tma_spec, validate, Addrs, DeviceInfo, DispatchTensors, LseDesc, TensorDesc, KERNEL_TABLE,
};
use fused_attn::{AttentionOptions, DType, Layout, LseLayout, Mask};

fn host_path(c: &mut Criterion) {
    let q = Layout::bshd(2, 4096, 32, 128);
    let kv = Layout::bshd(2, 4096, 8, 128);
    let d = |arg, layout: Layout| TensorDesc { arg, layout, len: layout.span().unwrap_or(0) };
    let descs = [d("q", q), d("k", kv), d("v", kv), d("o", q)];
    let lse = LseDesc { layout: LseLayout::contiguous(2, 32, 4096), len: 2 * 32 * 4096 };
    let opts = AttentionOptions::new(Mask::Causal);
    let addrs = [0x7f00_0000_0000u64, 0x7f10_0000_0000, 0x7f20_0000_0000, 0x7f30_0000_0000];
    for (sm, label) in [(80u32, "sm80 (A100)"), (90, "sm90 (H100)")] {
        let rows: Vec<_> = KERNEL_TABLE.iter().filter(|r| r.min_sm <= sm).copied().collect();
        if rows.is_empty() {
            eprintln!("built without kernels: nothing to dispatch");
            return;
        }
        let device = DeviceInfo { sm, sm_count: 132, smem_per_block: 227 * 1024 };
        c.bench_function(&format!("validate + dispatch + params, {label}"), |b| {
            b.iter(|| {
                let p = validate(DType::BF16, &descs[0], &descs[1], &descs[2], Some(&descs[3]), Some(&lse), &opts)
                    .expect("valid");
                let t = DispatchTensors { descs: &descs, addrs: Some(addrs) };
                let (idx, info) = dispatch(&rows, device, &p, t, None, None).expect("a kernel");
                let a = Addrs { q: addrs[0], k: addrs[1], v: addrs[2], o: addrs[3], lse: 0x7f40_0000_0000 };
                let params = fwd_params(&p, &[q, kv, kv, q], Some(&lse.layout), a);
                let spec = tma_spec(addrs[0], &q, p.dtype, rows[idx].block_m);
                std::hint::black_box((params, spec, info.grid))
            })
        });
    }
}

criterion_group!(benches, host_path);
criterion_main!(benches);
