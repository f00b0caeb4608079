#!/usr/bin/env bash
# Builds the release GPU test binary, the benchmark and the quickstart (kernels
# embedded) on a CPU host, and stages them with run.sh into gpu-bundle/ (git-
# ignored) for a GPU host that has no Rust toolchain and no network.
#
#   scripts/gpu-bundle.sh            # needs nvcc: NVCC, CUDA_HOME or PATH
#   # on the GPU host, from the repository root:
#   gpu-bundle/run.sh OUTDIR [tests|sanitize|quickstart|bench|peers|report|all]...
set -euo pipefail
cd "$(dirname "$0")/.."
export FUSED_ATTN_REQUIRE_KERNELS=1
# The bundle measures and tests the variant kernels too (README: variants).
export FUSED_ATTN_VARIANTS=1
# nvcc from PyPI installed as in the README (and by .ci/run) is picked up here.
if [ -z "${NVCC:-}" ] && [ -z "${CUDA_HOME:-}" ] && [ -x .cuda/nvidia/cu13/bin/nvcc ]; then
  export NVCC="$PWD/.cuda/nvidia/cu13/bin/nvcc"
fi
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/bin" "$out/scripts"

# cargo prints one JSON line per artifact; pick the executables we need.
exe() { python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == want:
        print(m["executable"])' "$1" | tail -n 1; }

stage() {  # stage NAME TARGET CARGO-ARGS...: build, find the executable, copy it
  local name=$1 target=$2; shift 2
  local path
  path=$(cargo "$@" --message-format=json | exe "$target")
  [ -n "$path" ] || { echo "cargo $* produced no executable for $target" >&2; exit 1; }
  cp "$path" "$out/bin/$name"
}
stage gpu-tests gpu test --release --test gpu --no-run
stage capi-gpu-tests gpu test --release -p fused-attn-capi --test gpu --no-run
stage bench-forward forward bench --bench forward --no-run
stage quickstart quickstart build --release --example quickstart
stage serving serving build --release --example serving
stage alignment alignment build --release --example alignment
# FUSED_ATTN_BUNDLE_CANDLE=1: the candle op's CUDA tier too (feature
# `candle-cuda`). candle's own kernels build with nvcc (8–9 min on 2 cores the
# first time) and candle links the CUDA libraries, which a CPU host lacks:
# cuda-link-stubs.sh makes link-time stand-ins in CUDA_ROOT/lib/stubs (a
# directory cudarc's build script searches when it exists at its first run).
if [ "${FUSED_ATTN_BUNDLE_CANDLE:-0}" = 1 ]; then
  export CUDA_ROOT="${CUDA_ROOT:-$(dirname "$(dirname "$NVCC")")}" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export PATH="$CUDA_ROOT/bin:$PATH"
  mkdir -p "$CUDA_ROOT/lib/stubs"
  cargo build --release --features candle-cuda --lib
  scripts/cuda-link-stubs.sh "$CUDA_ROOT/lib/stubs" target/release/deps/libcudarc-*.rlib
  stage candle-cuda-tests candle_cuda test --release --features candle-cuda --test candle_cuda --no-run
fi
# The C ABI's shared library, for peers.py's in-process `ours_capi` peer.
cargo build --release -p fused-attn-capi --lib
cp target/release/libfused_attn_capi.so "$out/bin/"
strip "$out"/bin/* 2>/dev/null || true
cp scripts/peers.py scripts/report.py scripts/fused_attn_ctypes.py "$out/scripts/"
cp scripts/gpu-run.sh "$out/run.sh"
cp scripts/gpu-session.sh "$out/session.sh"
chmod +x "$out/run.sh" "$out/session.sh"
dirty=0; git diff --quiet HEAD -- . ':!bench-results' 2>/dev/null || dirty=1
cat > "$out/meta.env" <<META
FUSED_ATTN_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
FUSED_ATTN_DIRTY=$dirty
FUSED_ATTN_BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
META
du -sh "$out"/bin/*
# Each binary embeds the same ~20 MB of kernel images: the device's carry
# limit is 64 MiB, so bin/ travels as one xz stream whose 192 MiB dictionary
# spans the binaries (~9 MB for ~130 MB); run.sh unpacks it on first use.
tar -C "$out" -cf - bin | xz -T1 --lzma2=preset=6,dict=192MiB > "$out/bin.txz"
rm -rf "$out/bin"
du -sh "$out" "$out/bin.txz"
echo "staged $out/: send it to the GPU host and run $out/run.sh OUTDIR"
