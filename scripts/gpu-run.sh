#!/usr/bin/env bash
# Runs on the GPU host from the bundle staged by scripts/gpu-bundle.sh.
#   run.sh OUTDIR [phase...]    phases: tests sanitize quickstart serving alignment bench peers report all
# TEST_FILTER (e.g. "sweep/sm90") narrows the tests phase; TEST_TIMEOUT caps it (s);
# TEST_THREADS (default 4) sets the trials run at once.
# Default: tests sanitize quickstart. Every phase logs under OUTDIR; the last
# lines of each log are echoed so a truncated console still shows the verdict.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
outdir="${1:?usage: run.sh OUTDIR [phase...]}"; shift
mkdir -p "$outdir"
phases=("$@"); [ ${#phases[@]} -eq 0 ] && phases=(tests sanitize quickstart serving alignment)
[ "${phases[0]}" = all ] && phases=(tests sanitize quickstart serving alignment bench peers report)
set -a; . "$here/meta.env"; set +a
# The binaries travel compressed (gpu-bundle.sh): unpack once, with xz or,
# without it, Python's lzma.
if [ ! -d "$here/bin" ] && [ -f "$here/bin.txz" ]; then
  { xz -dc "$here/bin.txz" 2>/dev/null ||
    python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$here/bin.txz"; } |
    tar -C "$here" -xf - || { echo "cannot unpack $here/bin.txz" >&2; exit 1; }
fi
export FUSED_ATTN_DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
export FUSED_ATTN_CUDA="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
nvidia-smi > "$outdir/nvidia-smi.txt" 2>&1 || true
status=0
for phase in "${phases[@]}"; do
  case "$phase" in
    tests)
      # A kernel that hangs (e.g. an mbarrier never completing) must still leave a log.
      FUSED_ATTN_GPU_LOG="$outdir/gpu-tests-cases.log" timeout "${TEST_TIMEOUT:-540}" "$here/bin/gpu-tests" \
        --test-threads "${TEST_THREADS:-4}" ${TEST_FILTER:-} > "$outdir/gpu-tests.log" 2>&1 || status=1
      grep -E "^test result|^summary|FAILED|failed|panicked" "$outdir/gpu-tests.log" | tail -n 40
      # The C ABI on the GPU (forward per family, backward, streams).
      if [ -x "$here/bin/capi-gpu-tests" ]; then
        timeout 240 "$here/bin/capi-gpu-tests" --test-threads "${TEST_THREADS:-4}" > "$outdir/capi-gpu-tests.log" 2>&1 || status=1
        echo "capi: $(grep -E '^test result' "$outdir/capi-gpu-tests.log" | tr '\n' ' ')"
      fi
      # The candle op on candle CUDA tensors (bundled with FUSED_ATTN_BUNDLE_CANDLE=1).
      # It links cuBLAS, cuRAND and NVRTC as candle does: torch's wheels have them.
      if [ -x "$here/bin/candle-cuda-tests" ]; then
        libs=$(python3 -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null |
          xargs -I{} find {} \( -name 'libcublas.so*' -o -name 'libcurand.so*' -o -name 'libnvrtc.so*' -o -name 'libcudart.so*' \) 2>/dev/null |
          xargs -r -n1 dirname | sort -u | paste -sd: -)
        { echo "LD_LIBRARY_PATH additions: $libs"
          LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$here/bin/candle-cuda-tests" | grep -E "cuda|cublas|curand|nvrtc|not found"
          LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 240 "$here/bin/candle-cuda-tests" \
            --test-threads 1 --nocapture; } > "$outdir/candle-cuda-tests.log" 2>&1 || status=1
        echo "candle: $(grep -E '^test result|not found|FAILED' "$outdir/candle-cuda-tests.log" | tr '\n' ' ')"
      fi ;;
    sanitize)
      if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
          compute-sanitizer --tool "$tool" --error-exitcode 9 "$here/bin/gpu-tests" --test-threads 1 sanitize/ \
            > "$outdir/sanitizer-$tool.log" 2>&1 || status=1
          echo "$tool: $(grep -E 'ERROR SUMMARY|test result' "$outdir/sanitizer-$tool.log" | tr '\n' ' ')"
        done
      else
        echo "compute-sanitizer not found: sanitize phase skipped" | tee "$outdir/sanitizer-skipped.log"
      fi ;;
    quickstart)
      "$here/bin/quickstart" > "$outdir/quickstart.log" 2>&1 || status=1
      cat "$outdir/quickstart.log" ;;
    serving)
      "$here/bin/serving" > "$outdir/serving.log" 2>&1 || status=1
      cat "$outdir/serving.log" ;;
    alignment)
      # Attention maps on the GPU (checked against the reference) and the heatmap PNG.
      "$here/bin/alignment" "$outdir/alignment.png" > "$outdir/alignment.log" 2>&1 || status=1
      cat "$outdir/alignment.log" ;;
    bench)
      FUSED_ATTN_BENCH_JSON="$outdir/ours.json" "$here/bin/bench-forward" 2> "$outdir/bench.log" || status=1
      tail -n 60 "$outdir/bench.log" ;;
    peers)
      # PEERS (e.g. "torch_flash,torch_cudnn,ours_capi") picks peers; ours_capi
      # times our kernels through the C ABI in the peers' own process.
      FUSED_ATTN_CAPI_LIB="$here/bin/libfused_attn_capi.so" python3 "$here/scripts/peers.py" \
        --ours "$outdir/ours.json" --out "$outdir/peers.json" ${PEERS:+--peers "$PEERS"} 2> "$outdir/peers.log" || status=1
      tail -n 20 "$outdir/peers.log" ;;
    report)
      python3 "$here/scripts/report.py" --ours "$outdir/ours.json" --peers "$outdir/peers.json" \
        --out-dir "$outdir/report" --log "$outdir/gpu-tests.log" || status=1
      ls "$outdir/report" ;;
    *) echo "unknown phase $phase"; status=2 ;;
  esac
done
exit $status
