#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite twice: once with the default
# backends (cpp and reference on CPU), once with the Triton kernels on the CPU interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== pass 1: reference and cpp backends =="
python -m pytest -q tests benchmarks -p no:cacheprovider
echo "== pass 2: triton backend under TRITON_INTERPRET=1 =="
# Interpreted kernels run Python on one core: pytest-xdist workers share the pass out. The first
# pass stays in one process, where the C++ kernels' OpenMP threads have all the cores.
WORKERS=${LATENTFAST_TEST_WORKERS:-2}
xdist=()
if [ "$WORKERS" != "0" ]; then xdist=(-n "$WORKERS"); fi
TRITON_INTERPRET=1 LATENTFAST_BACKEND=triton python -m pytest -q tests -p no:cacheprovider "${xdist[@]}"
