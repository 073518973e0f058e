#!/usr/bin/env bash
# The GPU checks in one device call (device tool: about 15 minutes of device time a session,
# 10 minutes at most a command, at most 8 files back from $OUT). In order of what the open
# issues need: device facts and `python -m latentfast info`, the two ceilings
# (scripts/gpu_ceilings.py), the gpu-marked tests (pytest-xdist workers when installed, so the
# Triton compilations run in parallel), the fused Glow step against the copy bandwidth
# (scripts/glow_gpu_bandwidth.py), the vector-flow inverse's backward
# (scripts/vf_inverse_cost.py), then the benchmark suite one op group at a time.
#
# Every phase runs under a limit cut to what is left of DEADLINE (seconds for the whole
# script; default 540, inside the call's 600) and is stopped with SIGINT first, so pytest
# prints its summary and the bench keeps the rows it finished (its JSON is rewritten after
# every case). Logs and JSON are written under $WORK and packed into $OUT/gpu_check.tgz after
# every phase, with $OUT/summary.txt beside it: two files, so a call cut off at its limit still
# brings back everything that finished. Uses the machine's python3 (torch, triton, pytest
# there) with the repo on PYTHONPATH: no install, no C++ build.
#   bash scripts/gpu_check.sh                          # everything, in 540 s
#   DEADLINE=300 BENCH_GROUPS="glow rnn" bash scripts/gpu_check.sh
#   DEVICE=cpu BENCH_QUICK=1 bash scripts/gpu_check.sh # a dry run of the script on a CPU machine
# Unpack: tar xzf gpu_check.tgz -C DIR (device.txt, ceilings.*, pytest_gpu.txt,
# glow_bandwidth.*, vf_inverse_cost.txt, bench_<group>.json / .txt, summary.txt); `python scripts/gpu_results.py
# gpu_check.tgz` merges the bench rows into benchmarks/results/<gpu>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
DEADLINE=${DEADLINE:-540}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
: >"$WORK/summary.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$SECONDS

left() { echo $((DEADLINE - (SECONDS - START))); }
# cap WANT [PERCENT]: WANT seconds, or PERCENT % of what is left of the deadline (default all
# of it less 10 s) when that is less
cap() {
  local l=$(($(left) - 10))
  [ -n "${2:-}" ] && l=$(($(left) * $2 / 100))
  if ((l < $1)); then echo $((l > 0 ? l : 0)); else echo "$1"; fi
}
# excerpt NAME FROM DROP N: the last N lines of a phase's log from the first line matching FROM
# on, without the lines matching DROP (else its last 3 lines), for the summary
excerpt() {
  local f=$WORK/$1.txt
  [ -f "$f" ] || return 0
  if grep -q -E "$2" "$f"; then sed -n -E "/$2/,\$p" "$f" | grep -v -E "$3" | tail -"$4"; else tail -3 "$f"; fi
}
say() { if [ -n "$*" ]; then echo "$*" | tee -a "$WORK/summary.txt"; fi; }
pack() {
  tar czf "$OUT/gpu_check.tgz.part" -C "$WORK" . && mv -f "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
}
# phase NAME SECONDS CMD...: CMD under the limit, its output in $WORK/NAME.txt, then pack
phase() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if ((limit < 5)); then
    say "== $name: skipped (limit ${limit} s; $(left) s of the deadline left)"
    return 0
  fi
  say "== $name (limit ${limit} s, at $((SECONDS - START)) s)"
  timeout -s INT -k 20 "$limit" "$@" >"$WORK/$name.txt" 2>&1
  rc=$?
  say "   exit $rc after $((SECONDS - t0)) s$( ((rc == 124)) && echo ': stopped at its limit')"
  pack
  return 0
}

phase device "$(cap 60)" bash -c "nvidia-smi; $PY -c \"import torch, triton; print('torch', torch.__version__, \
'triton', triton.__version__, 'cuda', torch.cuda.is_available())\"; $PY -m latentfast info"
say "$(grep -E '^torch|route installed|^latentfast._C' "$WORK/device.txt" 2>/dev/null)"

if [ "$DEVICE" = cuda ]; then
  phase ceilings "$(cap 90 20)" $PY scripts/gpu_ceilings.py "$WORK/ceilings.json"
  say "$(excerpt ceilings . '^$' 5)"
fi

extra=()
$PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=150)
$PY -c "import xdist" 2>/dev/null && extra+=(-n "${TEST_WORKERS:-8}")
phase pytest_gpu "$(cap "${TEST_TIMEOUT:-200}" 45)" $PY -m pytest -m gpu -q -rfEs --durations=25 \
  -p no:cacheprovider "${extra[@]}" tests
say "$(excerpt pytest_gpu '^(FAILED|ERROR|=+ short test summary)' '^$' 30)"

# the fused Glow step against the copy bandwidth, timed per call, back to back and as a CUDA graph (issue 2's 70%)
phase glow_bandwidth "$(cap "${GLOW_TIMEOUT:-120}" 25)" $PY scripts/glow_gpu_bandwidth.py --device "$DEVICE" \
  --json "$WORK/glow_bandwidth.json" $([ "$DEVICE" = cuda ] || echo --small --no-compile)
say "$(excerpt glow_bandwidth '^shape ' '^$' 16)"

# the differentiable vector-flow inverse: the Triton one-pass backward solve against the Python iterations, paired
phase vf_inverse_cost "$(cap "${VF_TIMEOUT:-90}" 20)" $PY scripts/vf_inverse_cost.py --device "$DEVICE"
say "$(excerpt vf_inverse_cost . '^$' 8)"

declare -A OPS=(
  [glow]="actnorm_invconv_coupling actnorm_invconv affine_coupling lu_weight glow_model"
  [vector]="vector_flow_stack made_flow_step vector_flow_stack_inverse flow_vae_model"
  [rnn]="gru_sequence lstm_sequence"
  [geometry]="pullback_metric curve_energy"
  [lyapunov]="rnn_lyapunov lorenz_lyapunov"
  [geodesic]="geodesic"
)
quick=()
[ -n "${BENCH_QUICK:-}" ] && quick=(--quick)
for g in ${BENCH_GROUPS:-glow vector rnn geometry lyapunov geodesic}; do
  # --budget: seconds of timing per implementation and pass after 15 rounds (3 by default)
  phase "bench_$g" "$(cap "${BENCH_TIMEOUT:-240}")" $PY -m latentfast bench --device "$DEVICE" \
    --budget "${BENCH_BUDGET:-1}" "${quick[@]}" --ops ${OPS[$g]} --json "$WORK/bench_$g.json"
  say "$(excerpt "bench_$g" '^case ' 'bench [(]' 30)"
done
say "== done after $((SECONDS - START)) s"
pack
