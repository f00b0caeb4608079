//! The benchmark case grid (DESIGN.md section 5): the one definition that the
//! criterion bench, the JSON report mode and (through that JSON) the peer
//! script and the report all use.

use fused_attn::{DType, Mask};

/// One benchmark case (BSHD, contiguous).
#[derive(Debug, Clone, Copy)]
pub struct BenchCase {
    pub dtype: DType,
    pub batch: usize,
    pub seqlen: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub mask: Mask,
}

impl BenchCase {
    pub fn name(&self) -> String {
        format!(
            "{} b{} s{} hq{} hkv{} d{} {}",
            self.dtype, self.batch, self.seqlen, self.heads_q, self.heads_kv, self.head_dim, self.mask
        )
    }
}

/// B·S = 16384 tokens and Hq·D = 2048 (FlashAttention-3 paper style) over
/// S ∈ {512 … 16k}, D ∈ {64, 128, 256}, full and causal, in bf16; the
/// hd128 row in f16 too; GQA 32:8 at D = 128; sliding windows at 16k.
pub fn grid() -> Vec<BenchCase> {
    let seqlens = [512, 1024, 2048, 4096, 8192, 16384];
    let mut cases = Vec::new();
    let mut push = |dtype, seqlen: usize, heads_q, heads_kv, head_dim, mask| {
        cases.push(BenchCase { dtype, batch: 16384 / seqlen, seqlen, heads_q, heads_kv, head_dim, mask })
    };
    for head_dim in [64, 128, 256] {
        for mask in [Mask::Full, Mask::Causal] {
            for s in seqlens {
                push(DType::BF16, s, 2048 / head_dim, 2048 / head_dim, head_dim, mask);
            }
        }
    }
    for mask in [Mask::Full, Mask::Causal] {
        for s in seqlens {
            push(DType::F16, s, 16, 16, 128, mask);
        }
    }
    for mask in [Mask::Full, Mask::Causal] {
        for s in seqlens {
            push(DType::BF16, s, 32, 8, 128, mask);
        }
    }
    for head_dim in [64, 128] {
        push(DType::BF16, 16384, 2048 / head_dim, 2048 / head_dim, head_dim, Mask::Window { left: 4096, right: 0 });
        push(DType::BF16, 16384, 2048 / head_dim, 2048 / head_dim, head_dim, Mask::Window { left: 2048, right: 2048 });
    }
    cases
}
