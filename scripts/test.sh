#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite twice: once with the default
# backends (cpp and reference on CPU), once with the Triton kernels on the CPU interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# A test that runs 20 minutes is hung (the slowest take about 2): pytest-timeout prints every
# thread's stack and ends the run, rather than the run waiting out CI's limit.
hang=(--timeout 1200 --timeout-method thread)
# The vectorisation check's compiles (scripts/vec_report.py, about 150 s of one core) run in
# the background at the lowest priority while pass 1 runs: that pass keeps about half a core
# idle (one process; most tests run one thread), which the compiles take, and
# tests/test_vectorisation.py reads their report from LATENTFAST_VEC_REPORT_DIR instead of
# compiling in the foreground (83 s of pass 1 on 2 cores).
vec_dir=$(mktemp -d)
( status=0  # (errexit holds in this subshell too: a failed check must still write its status)
  nice -n 19 python scripts/vec_report.py --dtype float --check > "$vec_dir/report.txt" 2>&1 || status=$?
  echo "$status" > "$vec_dir/rc.tmp" && mv "$vec_dir/rc.tmp" "$vec_dir/rc" ) &
vec_pid=$!
trap 'kill "$vec_pid" 2>/dev/null || true' EXIT
echo "== set up in ${SECONDS} s; pass 1: reference and cpp backends =="
LATENTFAST_VEC_REPORT_DIR=$vec_dir python -m pytest -q tests benchmarks -p no:cacheprovider "${hang[@]}"
echo "== at ${SECONDS} s; pass 2: triton backend under TRITON_INTERPRET=1 =="
# (scripts/interpreter_pass.sh: pytest-xdist workers share it out; the first pass stays in one
# process, where the C++ kernels' OpenMP threads have all the cores.)
bash scripts/interpreter_pass.sh python "${hang[@]}"
echo "== both passes done after ${SECONDS} s =="
