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

cp "$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null | exe gpu)" "$out/bin/gpu-tests"
cp "$(cargo bench --bench forward --no-run --message-format=json 2>/dev/null | exe forward)" "$out/bin/bench-forward"
cp "$(cargo build --release --example quickstart --message-format=json 2>/dev/null | exe quickstart)" "$out/bin/quickstart"
strip "$out"/bin/* 2>/dev/null || true
cp scripts/peers.py scripts/report.py "$out/scripts/"
cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh"
dirty=0; git diff --quiet HEAD -- . ':!bench-results' 2>/dev/null || dirty=1
cat > "$out/meta.env" <<META
FUSED_ATTN_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
FUSED_ATTN_DIRTY=$dirty
FUSED_ATTN_BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
META
du -sh "$out" "$out"/bin/*
echo "staged $out/: send it to the GPU host and run $out/run.sh OUTDIR"
