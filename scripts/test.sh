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
echo "== set up in ${SECONDS} s; pass 1: reference and cpp backends =="
python -m pytest -q tests benchmarks -p no:cacheprovider "${hang[@]}"
echo "== at ${SECONDS} s; pass 2: triton backend under TRITON_INTERPRET=1 =="
# (scripts/interpreter_pass.sh: pytest-xdist workers share it out; the first pass stays in one
# process, where the C++ kernels' OpenMP threads have all the cores.)
bash scripts/interpreter_pass.sh python "${hang[@]}"
echo "== both passes done after ${SECONDS} s =="
