//! Builds the CUDA kernels into fatbins and embeds them, with the dispatch table.
//!
//! - nvcc is found at `$NVCC`, then `$CUDA_HOME/bin/nvcc`, then on `PATH`.
//! - Each `kernels/*.cu` becomes `<stem>.fatbin` in `OUT_DIR`, holding SASS for
//!   every arch in `FUSED_ATTN_CUDA_ARCHS` (default `80;90a`) that the file's
//!   kernels support, plus PTX for the lowest portable one. The nvcc processes
//!   run in parallel; their `-Xptxas -v` reports are kept in `resource-report.txt`.
//! - The `FA_KERNEL(...)` lines at the end of each `.cu` are the one list of
//!   instantiated kernels: nvcc instantiates them and this script turns them into
//!   the Rust dispatch table (`kernels.rs` in `OUT_DIR`).
//! - Variants (`base__tag` kernels, for measurement, never auto-dispatched) sit
//!   in an `#ifndef FA_NO_VARIANTS` block of their `.cu`. They are built only
//!   with `FUSED_ATTN_VARIANTS=1`; otherwise nvcc gets `-DFA_NO_VARIANTS` and
//!   the table leaves the same rows out, so the default build is faster and
//!   smaller.
//! - Without nvcc the crate still builds (CPU reference only) with a warning,
//!   unless `FUSED_ATTN_REQUIRE_KERNELS=1`. `DOCS_RS` never looks for nvcc.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const DEFAULT_ARCHS: &str = "80;90a";

/// One `FA_KERNEL(name, dtype, head_dim, block_m, block_n, threads, smem, min_sm, grid)` line.
struct Row {
    stem: String,
    name: String,
    dtype: String,
    head_dim: u32,
    block_m: u32,
    block_n: u32,
    threads: u32,
    smem: u32,
    min_sm: u32,
    persistent: bool,
}

/// An arch from `FUSED_ATTN_CUDA_ARCHS`: `90a` is number 90 with the
/// arch-specific suffix (its PTX cannot be JIT-compiled for other GPUs).
#[derive(Clone)]
struct Arch {
    number: u32,
    specific: bool,
}

impl Arch {
    fn parse(s: &str) -> Option<Arch> {
        let s = s.trim().trim_start_matches("sm_");
        let (digits, specific) = match s.strip_suffix('a') {
            Some(d) => (d, true),
            None => (s, false),
        };
        digits.parse().ok().map(|number| Arch { number, specific })
    }
    fn name(&self) -> String {
        format!("{}{}", self.number, if self.specific { "a" } else { "" })
    }
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    for var in
        ["NVCC", "CUDA_HOME", "FUSED_ATTN_CUDA_ARCHS", "FUSED_ATTN_REQUIRE_KERNELS", "FUSED_ATTN_VARIANTS", "DOCS_RS"]
    {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("kernels");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .expect("kernels/ is part of the crate")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let variants = env::var("FUSED_ATTN_VARIANTS").is_ok_and(|v| v == "1");
    let rows: Vec<Row> = sources.iter().flat_map(|p| parse_table(p, variants)).collect();

    let require = env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = if env::var_os("DOCS_RS").is_some() { None } else { find_nvcc() };
    let archs: Vec<Arch> = env::var("FUSED_ATTN_CUDA_ARCHS")
        .unwrap_or_else(|_| DEFAULT_ARCHS.into())
        .split([';', ','])
        .filter(|s| !s.trim().is_empty())
        .map(|s| Arch::parse(s).unwrap_or_else(|| panic!("FUSED_ATTN_CUDA_ARCHS: bad arch `{s}`")))
        .collect();

    let built = match &nvcc {
        Some(nvcc) => Some(compile_all(nvcc, &sources, &rows, &archs, variants, &kernel_dir, &out_dir)),
        None if require => panic!(
            "FUSED_ATTN_REQUIRE_KERNELS=1 but no nvcc was found: set NVCC, CUDA_HOME, or put nvcc on PATH \
             (pip install nvidia-cuda-nvcc, see README)"
        ),
        None => {
            if env::var_os("DOCS_RS").is_none() {
                println!(
                    "cargo:warning=fused-attn: nvcc not found, building without GPU kernels (CPU reference only). \
                     Set NVCC=/path/to/nvcc or CUDA_HOME (nvcc from PyPI works: see README) to get kernels."
                );
            }
            None
        }
    };
    write_rust_table(&out_dir, &rows, variants, built.as_ref());
}

/// Parses the `FA_KERNEL(...)` table lines of one source file; the rows of its
/// `#ifndef FA_NO_VARIANTS` block (which must be exactly its `base__tag` rows)
/// only when `variants`, as nvcc sees them.
fn parse_table(path: &Path, variants: bool) -> Vec<Row> {
    let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut in_variants = false;
    text.lines()
        .filter_map(|line| {
            match line.trim() {
                "#ifndef FA_NO_VARIANTS" => in_variants = true,
                l if in_variants && l.starts_with("#endif") => in_variants = false,
                _ => {}
            }
            let rest = line.strip_prefix("FA_KERNEL(")?;
            let name = rest.split(',').next().unwrap_or("").trim();
            assert_eq!(
                name.contains("__"),
                in_variants,
                "{stem}: {name}: variants (`base__tag`) go inside `#ifndef FA_NO_VARIANTS`, base kernels outside"
            );
            (variants || !in_variants).then_some(rest)
        })
        .map(|rest| {
            let inner = rest.trim_end().strip_suffix(')').unwrap_or_else(|| panic!("{stem}: unterminated FA_KERNEL"));
            let f: Vec<&str> = inner.split(',').map(str::trim).collect();
            assert_eq!(f.len(), 9, "{stem}: FA_KERNEL takes 9 fields: {inner}");
            let num = |i: usize| -> u32 {
                f[i].parse().unwrap_or_else(|_| panic!("{stem}: FA_KERNEL field {i} `{}` is not a number", f[i]))
            };
            assert!(matches!(f[1], "f16" | "bf16"), "{stem}: dtype `{}`", f[1]);
            Row {
                stem: stem.clone(),
                name: f[0].to_string(),
                dtype: f[1].to_string(),
                head_dim: num(2),
                block_m: num(3),
                block_n: num(4),
                threads: num(5),
                smem: num(6),
                min_sm: num(7),
                persistent: match f[8] {
                    "FA_GRID_TILES" => false,
                    "FA_GRID_PERSISTENT" => true,
                    other => panic!("{stem}: FA_KERNEL grid `{other}` is not FA_GRID_TILES or FA_GRID_PERSISTENT"),
                },
            }
        })
        .collect()
}

/// The `FA_IMAGE_MIN_SM n` marker of a kernel file without table rows.
fn image_min_sm(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.trim_start_matches(['/', ' ']).strip_prefix("FA_IMAGE_MIN_SM ")?.trim().parse().ok())
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join("nvcc")).find(|p| p.is_file())
}

struct Built {
    /// (stem, fatbin path, archs with SASS, PTX arch)
    images: Vec<(String, PathBuf, Vec<String>, Option<String>)>,
    report: PathBuf,
    nvcc_version: String,
}

fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    rows: &[Row],
    archs: &[Arch],
    variants: bool,
    kernel_dir: &Path,
    out: &Path,
) -> Built {
    let nvcc_version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("").trim().to_string())
        .unwrap_or_else(|e| panic!("cannot run nvcc at {}: {e}", nvcc.display()));

    // One nvcc per file, all at once: each is single-threaded for most of its time.
    let started = Instant::now();
    let jobs: Vec<_> = sources
        .iter()
        .filter_map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            // A file supports the archs at or above the lowest min_sm of its
            // kernels, or, with no table rows (kernels loaded by name only),
            // of its `FA_IMAGE_MIN_SM n` line.
            let min_sm =
                rows.iter().filter(|r| r.stem == stem).map(|r| r.min_sm).min().or_else(|| image_min_sm(src))?;
            let sass: Vec<Arch> = archs
                .iter()
                .filter(|a| a.number >= min_sm)
                // An sm90-only file uses arch-specific instructions (wgmma, setmaxnreg).
                .filter(|a| min_sm < 90 || a.specific)
                .cloned()
                .collect();
            if sass.is_empty() {
                return None;
            }
            let ptx = sass.iter().find(|a| !a.specific).map(|a| a.number);
            let fatbin = out.join(format!("{stem}.fatbin"));
            let mut cmd = Command::new(nvcc);
            cmd.args(["-O3", "-std=c++17", "--fatbin", "-lineinfo", "-Xptxas", "-v", "--threads", "2"])
                .arg("-I")
                .arg(kernel_dir);
            if !variants {
                cmd.arg("-DFA_NO_VARIANTS");
            }
            for a in &sass {
                cmd.arg("-gencode").arg(format!("arch=compute_{0},code=sm_{0}", a.name()));
            }
            if let Some(p) = ptx {
                cmd.arg("-gencode").arg(format!("arch=compute_{p},code=compute_{p}"));
            }
            cmd.arg(src).arg("-o").arg(&fatbin);
            let child = cmd
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start nvcc at {}: {e}", nvcc.display()));
            let sass_names = sass.iter().map(|a| format!("sm_{}", a.name())).collect();
            Some((stem, fatbin, sass_names, ptx.map(|p| format!("compute_{p}")), child))
        })
        .collect();

    let mut report = String::new();
    let mut images = Vec::new();
    for (stem, fatbin, sass, ptx, child) in jobs {
        let output = child.wait_with_output().expect("waiting for nvcc");
        let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            panic!("nvcc failed on kernels/{stem}.cu:\n{log}");
        }
        let _ = writeln!(report, "=== {stem}.cu ===\n{log}");
        images.push((stem, fatbin, sass, ptx));
    }
    // The kernel build time (all files in parallel), for the README's budget.
    let _ = writeln!(report, "=== nvcc: {:.1} s wall for all files ===", started.elapsed().as_secs_f64());
    let report_path = out.join("resource-report.txt");
    fs::write(&report_path, &report).expect("writing the resource report");
    Built { images, report: report_path, nvcc_version }
}

fn write_rust_table(out: &Path, rows: &[Row], variants: bool, built: Option<&Built>) {
    let mut s = String::from("// Generated by build.rs from the FA_KERNEL lines of kernels/*.cu.\n\n");
    let _ = writeln!(
        s,
        "/// Whether the variant kernels (`base__tag`) are in the table: `FUSED_ATTN_VARIANTS=1` at build time."
    );
    let _ = writeln!(s, "pub const VARIANTS_BUILT: bool = {variants};");
    let _ = writeln!(s, "/// Whether nvcc ran and the kernel images below are real.");
    let _ = writeln!(s, "pub const KERNELS_BUILT: bool = {};", built.is_some());
    let _ = writeln!(s, "/// The `nvcc --version` line of the compiler that built the images (empty without kernels).");
    let _ = writeln!(s, "pub const NVCC_VERSION: &str = {:?};", built.map_or("", |b| b.nvcc_version.as_str()));
    let _ = writeln!(s, "/// The `-Xptxas -v` output of every nvcc run (empty without kernels).");
    match built {
        Some(b) => {
            let _ = writeln!(s, "pub const RESOURCE_REPORT: &str = include_str!({:?});", b.report);
        }
        None => s.push_str("pub const RESOURCE_REPORT: &str = \"\";\n"),
    }
    s.push_str("/// The embedded fatbins, one per `kernels/*.cu`.\npub static IMAGES: &[KernelImage] = &[\n");
    for (stem, path, sass, ptx) in built.map_or(&[][..], |b| &b.images[..]) {
        let _ = writeln!(
            s,
            "    KernelImage {{ stem: {stem:?}, fatbin: include_bytes!({path:?}), sass: &{sass:?}, ptx: {ptx:?} }},"
        );
    }
    s.push_str("];\n/// Every instantiated kernel, in source order.\npub static KERNEL_TABLE: &[KernelRow] = &[\n");
    for r in rows {
        let dtype = if r.dtype == "f16" { "F16" } else { "BF16" };
        let _ = writeln!(
            s,
            "    KernelRow {{ image: {:?}, name: {:?}, dtype: DType::{dtype}, head_dim: {}, block_m: {}, block_n: {}, threads: {}, smem_bytes: {}, min_sm: {}, grid: GridKind::{} }},",
            r.stem, r.name, r.head_dim, r.block_m, r.block_n, r.threads, r.smem, r.min_sm,
            if r.persistent { "Persistent" } else { "Tiles" }
        );
    }
    s.push_str("];\n");
    fs::write(out.join("kernels.rs"), s).expect("writing kernels.rs");
}
