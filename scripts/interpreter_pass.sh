#!/usr/bin/env bash
# The test suite with the Triton kernels on the CPU interpreter (TRITON_INTERPRET=1,
# LATENTFAST_BACKEND=triton), run by PYTHON (default: python on PATH) from the repository
# root; further arguments go to pytest. Interpreted kernels run Python on one core, so
# pytest-xdist workers share the pass out, one thread each: LATENTFAST_TEST_WORKERS (default
# 2; 0 = one process). Called by scripts/test.sh (its second pass) and scripts/triton_release_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
shift $(( $# > 0 ? 1 : 0 ))
WORKERS=${LATENTFAST_TEST_WORKERS:-2}
xdist=()
if [ "$WORKERS" != "0" ]; then
  xdist=(-n "$WORKERS")
  # One thread per worker (unless OMP_NUM_THREADS is set): the pass runs no C++ kernels, and
  # torch's and numpy's thread pools in every worker made more threads than cores (on 2 cores
  # the pass took 9m33s with them, 7m57s with one each).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
TRITON_INTERPRET=1 LATENTFAST_BACKEND=triton "$PY" -m pytest -q tests -p no:cacheprovider "${xdist[@]}" "$@"
