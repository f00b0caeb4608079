#!/usr/bin/env bash
# One device call that runs several run.sh phases, each under its own time
# cap, inside a budget for the whole call, and brings everything back as one
# archive: the device returns at most 8 files from $OUT, and run.sh alone
# writes a dozen logs.
#
#   gpu-bundle/session.sh OUTDIR [phase[:cap_seconds]...]
#     phases: those of run.sh (tests sanitize quickstart serving alignment bench peers report)
#     SESSION_BUDGET (default 540 s) stops launching phases that would not fit.
#   e.g.  gpu-bundle/session.sh $OUT tests:200 quickstart:20 serving:20 alignment:20 sanitize:120
#
# Results: OUTDIR/session.tgz (every log), and beside it ours.json,
# peers.json and alignment.png when a phase wrote them, and session.txt
# (the phase timings, also printed last).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: session.sh OUTDIR [phase[:cap]...]}"; shift
work=/tmp/fa-session; rm -rf "$work"; mkdir -p "$work" "$out"
budget=${SESSION_BUDGET:-540}
start=$(date +%s)
summary="$work/session.txt"
{ nvidia-smi; command -v compute-sanitizer ncu nvcc xz
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
  nproc; } > "$work/env.txt" 2>&1
status=0
for spec in "$@"; do
  phase=${spec%%:*}; cap=${spec#*:}; [ "$cap" = "$spec" ] && cap=120
  used=$(( $(date +%s) - start ))
  if (( used + cap > budget )); then
    echo "$phase: skipped (cap ${cap}s, ${used}s of ${budget}s used)" | tee -a "$summary"
    continue
  fi
  t0=$(date +%s)
  # The tests phase gets its own inner cap so that its log is written.
  inner=$(( cap > 40 ? cap - 20 : cap * 3 / 4 ))
  TEST_TIMEOUT=${TEST_TIMEOUT:-$inner} timeout "$cap" "$here/run.sh" "$work" "$phase"
  rc=$?
  (( rc != 0 )) && status=1
  echo "$phase: $(( $(date +%s) - t0 ))s (cap ${cap}s), exit $rc$( (( rc == 124 )) && echo ' (cap reached)')" | tee -a "$summary"
done
echo "total: $(( $(date +%s) - start ))s of ${budget}s" | tee -a "$summary"
for f in ours.json peers.json alignment.png; do [ -f "$work/$f" ] && cp "$work/$f" "$out/"; done
cp "$summary" "$out/"
tar -C "$work" -czf "$out/session.tgz" .
exit $status
