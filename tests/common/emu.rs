//! Shared by the emulated tiers (tests/emulated_sm80.rs, tests/emulated_sm90.rs):
//! finding the CUDA headers and tools, running commands, trimming their output.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The CUDA headers: next to `$NVCC` (PyPI or toolkit layout) or in `$CUDA_HOME`.
pub fn cuda_include() -> Option<PathBuf> {
    let from_nvcc =
        std::env::var_os("NVCC").map(PathBuf::from).and_then(|p| Some(p.parent()?.parent()?.join("include")));
    let from_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    [from_nvcc, from_home].into_iter().flatten().find(|p| p.join("cuda_fp16.h").is_file())
}

/// Whether `tool --version` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The CUDA headers when g++ and python3 are there too. Otherwise fails under
/// `FUSED_ATTN_REQUIRE_KERNELS=1` (CI) and says the test skipped.
pub fn prerequisites(test: &str) -> Option<PathBuf> {
    let required = std::env::var("FUSED_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let include = cuda_include().filter(|_| have("g++") && have("python3"));
    if include.is_none() {
        assert!(!required, "{test} needs g++, python3 and the CUDA headers (set NVCC or CUDA_HOME)");
        eprintln!("SKIPPED {test}: no g++, python3 or CUDA headers");
    }
    include
}

/// Runs a command; its stdout and stderr, or the tail of them on failure.
pub fn output(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} failed:\n{}", tail(&text, 40)))
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs the emulator once per argument list, as many at a time as there are
/// cores (the emulator is single-threaded), each writing to its own log file
/// (a full pipe must not stall it); returns (args, exit ok, output) in order.
pub fn run_modes<A: AsRef<[S]> + Sync, S: AsRef<str> + Sync>(
    exe: &std::path::Path,
    work: &std::path::Path,
    modes: &[A],
) -> Vec<(String, bool, String)> {
    use std::process::Stdio;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get()).min(modes.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; modes.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(args) = modes.get(i) else { break };
                let args: Vec<&str> = args.as_ref().iter().map(|a| a.as_ref()).collect();
                let log = work.join(format!("mode{i}.log"));
                let file = std::fs::File::create(&log).expect("creating a log file");
                let status = Command::new(exe)
                    .args(&args)
                    .stdout(Stdio::from(file.try_clone().expect("log file")))
                    .stderr(Stdio::from(file))
                    .status();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let ok = status.is_ok_and(|s| s.success());
                results.lock().unwrap()[i] = Some((args.join(" "), ok, text));
            });
        }
    });
    results.into_inner().unwrap().into_iter().map(|r| r.expect("every mode ran")).collect()
}

/// An injected bug for a negative control: exact text edits to one kernel
/// source file. A pattern that is no longer in the file makes the control
/// fail rather than pass vacuously.
pub struct Mutant {
    pub name: &'static str,
    pub file: &'static str,
    pub edits: &'static [(&'static str, &'static str)],
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Copies `kernels` to `src` and applies the mutant's edits there (none for
/// the unmodified source). Err when a pattern is not found.
pub fn mutated_copy(kernels: &std::path::Path, src: &std::path::Path, m: Option<&Mutant>) -> Result<(), String> {
    copy_dir(kernels, src);
    if let Some(m) = m {
        let path = src.join(m.file);
        let mut text = std::fs::read_to_string(&path).unwrap();
        if let Some((old, _)) = m.edits.iter().find(|(old, _)| !text.contains(old)) {
            return Err(format!("not applicable: `{old}` is no longer in {}", m.file));
        }
        for (old, new) in m.edits {
            text = text.replace(old, new);
        }
        std::fs::write(&path, text).unwrap();
    }
    Ok(())
}

/// What one run of a negative control found: the mutant's name and
/// `Ok(Some(first failing check))` when caught, `Ok(None)` when it passed,
/// `Err(why)` when it could not be run.
pub type ControlRow = (String, Result<Option<String>, String>);

/// Prints the control's table (row 0 is the unmodified source, which must
/// pass; every other row must be caught) and returns the lines that are wrong.
pub fn control_verdict(rows: impl IntoIterator<Item = ControlRow>) -> Vec<String> {
    let mut bad = Vec::new();
    for (i, (name, r)) in rows.into_iter().enumerate() {
        let line = match (i, r) {
            (0, Ok(None)) => format!("ok      {name}"),
            (0, Ok(Some(d))) => format!("BROKEN  {name}: {d}"),
            (_, Ok(Some(d))) => format!("caught  {name}\n          {d}"),
            (_, Ok(None)) => format!("MISSED  {name}"),
            (_, Err(e)) => format!("ERROR   {name}: {e}"),
        };
        eprintln!("{line}");
        if !line.starts_with("ok") && !line.starts_with("caught") {
            bad.push(line);
        }
    }
    bad
}
