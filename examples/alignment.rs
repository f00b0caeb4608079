//! Attention maps as people read them: cross-attention between a "target"
//! sentence and a "source" sentence whose true word alignment is known, the
//! maps recovering it, and the heatmap written as a PNG.
//!
//! ```text
//! cargo run --release --example alignment [-- out.png]
//! ```
//!
//! The construction: the source is 5 chunks (phrases) of key positions; the
//! target says the same chunks in another order (as between languages with
//! different word orders, e.g. the verb moved to the end), each chunk at its
//! own rate (a target chunk longer or shorter than its source chunk: within
//! a chunk the alignment is monotone but not diagonal). Keys are sinusoidal
//! position codes of the source positions; the query of target token `i` is
//! the code of its aligned source position `a(i)`, scaled per head (4 query
//! heads over 2 KV heads, from blurry to sharp). Every head's scores then
//! peak at `a(i)`, so every map and the head mean have their row maximum
//! there: the example checks that for each target token and fails if not.
//!
//! With a GPU the maps come from the kernels (`forward_with_maps_into`,
//! compared with the CPU reference); without one from the CPU reference. The
//! PNG (default `target/alignment.png`) shows the head mean, then each head:
//! rows are target tokens, columns source tokens, brighter is more weight;
//! a small cyan mark sits in each row's true aligned cell.

use std::path::{Path, PathBuf};

use fused_attn::reference::{self, MapsReference};
use fused_attn::{
    cuda_context, Attention, AttentionOptions, DeviceTensor, DeviceTensorMut, Error, HostTensor, Layout, LseLayout,
    LseTensorMut, MapLayout, MapTensorMut, MapsRequest, Mask,
};
use half::bf16;

/// Source chunk lengths (in source tokens).
const SOURCE_CHUNKS: [usize; 5] = [5, 8, 4, 7, 6];
/// The target's order of the source chunks, and each one's length in the target.
const TARGET: [(usize, usize); 5] = [(0, 7), (3, 5), (2, 6), (4, 9), (1, 10)];
/// Query heads (2 per KV head) and their sharpness.
const HEAD_GAIN: [f32; 4] = [3.0, 6.0, 12.0, 24.0];
const HEADS_KV: usize = 2;
const HEAD_DIM: usize = 64;
/// Pixels per map cell, and between panels.
const CELL: usize = 8;
const GAP: usize = 8;

/// The problem: Q `[1, Lq, Hq, D]`, K = V `[1, Lk, Hk, D]`, and the true
/// source position `a(i)` of every target token.
pub struct Construction {
    /// Queries.
    pub q: Vec<bf16>,
    /// Keys (also the values: the example is about the weights).
    pub k: Vec<bf16>,
    /// Q's layout.
    pub ql: Layout,
    /// K's (and V's) layout.
    pub kl: Layout,
    /// `a(i)` for each target token `i`.
    pub alignment: Vec<usize>,
}

/// The options of the cross-attention: every target token sees every source
/// token; the gain is in the queries, so the scale is 1.
pub fn options() -> AttentionOptions<'static> {
    AttentionOptions::new(Mask::Full).with_scale(1.0)
}

/// Sinusoidal code of position `p`, unit length: `<code(a), code(j)>` is
/// largest, 1, exactly at `j = a`.
fn code(p: usize) -> [f32; HEAD_DIM] {
    let mut c = [0.0; HEAD_DIM];
    for m in 0..HEAD_DIM / 2 {
        let w = 1.1 * (0.02f32).powf(m as f32 / (HEAD_DIM / 2) as f32);
        c[2 * m] = (p as f32 * w).sin();
        c[2 * m + 1] = (p as f32 * w).cos();
    }
    let norm = (HEAD_DIM as f32 / 2.0).sqrt();
    c.map(|x| x / norm)
}

/// Builds the inputs and the true alignment.
pub fn construction() -> Construction {
    let starts: Vec<usize> = SOURCE_CHUNKS.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect();
    let lk: usize = SOURCE_CHUNKS.iter().sum();
    let mut alignment = Vec::new();
    for &(chunk, len) in &TARGET {
        // Within a chunk, monotone: target token t of the chunk aligns with
        // source token floor(t · source length / target length).
        alignment.extend((0..len).map(|t| starts[chunk] + t * SOURCE_CHUNKS[chunk] / len));
    }
    let (lq, hq) = (alignment.len(), HEAD_GAIN.len());
    let mut q = Vec::with_capacity(lq * hq * HEAD_DIM);
    for &a in &alignment {
        for gain in HEAD_GAIN {
            q.extend(code(a).map(|x| bf16::from_f32(gain * x)));
        }
    }
    let mut k = Vec::with_capacity(lk * HEADS_KV * HEAD_DIM);
    for j in 0..lk {
        for _ in 0..HEADS_KV {
            k.extend(code(j).map(bf16::from_f32));
        }
    }
    Construction { q, k, ql: Layout::bshd(1, lq, hq, HEAD_DIM), kl: Layout::bshd(1, lk, HEADS_KV, HEAD_DIM), alignment }
}

/// The maps of every head and the head mean by the CPU reference.
///
/// # Errors
/// Those of [`reference::attention_maps`].
pub fn cpu_maps(c: &Construction) -> Result<MapsReference, Error> {
    reference::attention_maps(HostTensor::new(&c.q, c.ql), HostTensor::new(&c.k, c.kl), None, &options())
}

/// The column of each row's largest entry of a `[rows, cols]` map.
pub fn row_argmax(map: &[f64], cols: usize) -> Vec<usize> {
    map.chunks_exact(cols)
        .map(|row| row.iter().enumerate().fold((0, f64::NEG_INFINITY), |m, (j, &x)| if x > m.1 { (j, x) } else { m }).0)
        .collect()
}

/// Target tokens whose row maximum is not at their true source token, for
/// the mean (`[Lq, Lk]`) and each head (`maps` `[Hq, Lq, Lk]`): `(panel, i)`,
/// panel 0 the mean and `h + 1` head `h`.
pub fn misaligned(c: &Construction, mean: &[f64], maps: &[f64]) -> Vec<(usize, usize)> {
    let (lq, lk) = (c.ql.seq(), c.kl.seq());
    std::iter::once(mean)
        .chain(maps.chunks_exact(lq * lk))
        .enumerate()
        .flat_map(|(panel, m)| {
            row_argmax(m, lk)
                .into_iter()
                .zip(&c.alignment)
                .enumerate()
                .filter(|(_, (got, want))| got != *want)
                .map(move |(i, _)| (panel, i))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Width and height in pixels of the PNG for `lq` target and `lk` source
/// tokens: the mean and each head side by side.
pub fn png_size(lq: usize, lk: usize) -> (usize, usize) {
    let panels = 1 + HEAD_GAIN.len();
    (panels * lk * CELL + (panels - 1) * GAP, lq * CELL)
}

/// A dark-to-bright colour ramp (black, purple, red, orange, pale yellow),
/// readable in print and by most colour-blind readers.
fn ramp(x: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] =
        [[0.0, 0.0, 4.0], [87.0, 16.0, 110.0], [188.0, 55.0, 84.0], [249.0, 142.0, 9.0], [252.0, 255.0, 164.0]];
    let t = x.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let (i, f) = ((t as usize).min(STOPS.len() - 2), t - (t as usize).min(STOPS.len() - 2) as f64);
    std::array::from_fn(|c| (STOPS[i][c] + f * (STOPS[i + 1][c] - STOPS[i][c])).round() as u8)
}

/// Writes the heatmap PNG: the mean, then each head (each panel scaled to
/// its own largest weight), the true alignment marked.
///
/// # Errors
/// File creation or PNG encoding failures, as text.
pub fn write_png(path: &Path, c: &Construction, mean: &[f64], maps: &[f64]) -> Result<(), String> {
    let (lq, lk) = (c.ql.seq(), c.kl.seq());
    let (w, h) = png_size(lq, lk);
    let mut px = vec![255u8; w * h * 3];
    for (panel, m) in std::iter::once(mean).chain(maps.chunks_exact(lq * lk)).enumerate() {
        let top = m.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
        let x0 = panel * (lk * CELL + GAP);
        for i in 0..lq {
            for j in 0..lk {
                let mut rgb = ramp(m[i * lk + j] / top);
                for y in i * CELL..(i + 1) * CELL {
                    for x in x0 + j * CELL..x0 + (j + 1) * CELL {
                        let mark = j == c.alignment[i]
                            && (y % CELL).abs_diff(CELL / 2) <= 1
                            && (x % CELL).abs_diff(CELL / 2) <= 1;
                        if mark {
                            rgb = [0, 220, 255];
                        }
                        px[(y * w + x) * 3..][..3].copy_from_slice(&rgb);
                        rgb = ramp(m[i * lk + j] / top);
                    }
                }
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&px).map_err(|e| e.to_string())
}

/// The maps on the GPU: `forward_with_maps_into` (O, LSE, every head's f32
/// maps and the mean into buffers allocated here, the caller's choice), as
/// `(mean [Lq, Lk], maps [Hq, Lq, Lk])`.
fn gpu_maps(c: &Construction) -> Result<(Vec<f64>, Vec<f64>), Error> {
    let ctx = cuda_context(0)?;
    let attn = Attention::new(&ctx)?;
    let stream = ctx.new_stream()?;
    let ([_, lq, hq, d], lk) = (c.ql.shape, c.kl.seq());
    let (q, k) = (stream.clone_htod(&c.q)?, stream.clone_htod(&c.k)?);
    let mut o = stream.alloc_zeros::<bf16>(lq * hq * d)?;
    let mut lse = stream.alloc_zeros::<f32>(hq * lq)?;
    let mut maps = stream.alloc_zeros::<f32>(hq * lq * lk)?;
    let mut mean = stream.alloc_zeros::<f32>(lq * lk)?;
    {
        let (qt, kt) = (DeviceTensor::new(&q, c.ql), DeviceTensor::new(&k, c.kl));
        let mut ot = DeviceTensorMut::new(&mut o, c.ql);
        let mut lt = LseTensorMut::new(&mut lse, LseLayout::contiguous(1, hq, lq));
        let request = MapsRequest::all_heads(MapTensorMut::new(&mut maps, MapLayout::contiguous(1, hq, lq, lk)))
            .with_mean(MapTensorMut::new(&mut mean, MapLayout::mean(1, lq, lk)));
        let kernel = attn.forward_with_maps_into(&stream, &qt, &kt, &kt, &mut ot, &mut lt, request, &options())?;
        println!("GPU: forward by {}, maps by the maps kernel", kernel.name);
    }
    let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
    Ok((widen(stream.clone_dtoh(&mean)?), widen(stream.clone_dtoh(&maps)?)))
}

#[allow(dead_code)] // tests/alignment.rs includes this file for its construction
fn main() {
    let path = std::env::args().nth(1).map_or_else(|| PathBuf::from("target/alignment.png"), PathBuf::from);
    let c = construction();
    let (lq, lk) = (c.ql.seq(), c.kl.seq());
    println!("{lq} target tokens over {lk} source tokens, {} query heads over {HEADS_KV} KV heads", HEAD_GAIN.len());
    let cpu = match cpu_maps(&c) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let (mean, maps) = match gpu_maps(&c) {
        Ok((mean, maps)) => {
            let diff = mean.iter().chain(&maps).zip(cpu.mean.iter().chain(&cpu.maps)).map(|(a, b)| (a - b).abs());
            let worst = diff.fold(0.0, f64::max);
            println!("GPU maps vs the f64 reference: largest difference {worst:.2e}");
            if worst > 1e-3 {
                eprintln!("error: the GPU maps differ from the reference by {worst:.2e}");
                std::process::exit(1);
            }
            (mean, maps)
        }
        Err(
            e @ (Error::NoDriver | Error::NoDevice { .. } | Error::KernelsNotBuilt | Error::UnsupportedDevice { .. }),
        ) => {
            println!("No GPU run ({e}): maps from the CPU reference");
            (cpu.mean, cpu.maps)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let wrong = misaligned(&c, &mean, &maps);
    if !wrong.is_empty() {
        eprintln!("error: row maxima off the true alignment at (panel, target token) {wrong:?}");
        std::process::exit(1);
    }
    println!("every target token's largest weight is on its true source token (mean and each head)");
    if let Err(e) = write_png(&path, &c, &mean, &maps) {
        eprintln!("error: writing the PNG: {e}");
        std::process::exit(1);
    }
    let (w, h) = png_size(lq, lk);
    println!("wrote {} ({w}x{h}: the head mean, then heads 0..3 from blurry to sharp)", path.display());
}
