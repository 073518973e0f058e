#!/usr/bin/env bash
# The Triton checks that need no GPU, run with another Triton release than the project's venv
# has: the interpreter test pass (as in scripts/test.sh) and scripts/triton_smem.py (every
# launch of the bench cases compiled for sm_90: shared memory, registers, spills).
#
#   bash scripts/triton_release_check.sh [VERSION]      # default 3.6.0, the GPU machine's
#
# Builds nothing: it uses this checkout's latentfast (and its built latentfast._C, from
# scripts/setup.sh) through PYTHONPATH, in a venv of its own (TRITON_CHECK_VENV, default
# /tmp/latentfast-triton-VERSION) with torch==2.13.0 (the CPU wheel here; LATENTFAST_TORCH
# names another spec) and triton==VERSION. numpy stays below 2.4: Triton 3.6's interpreter
# calls int() on one-element arrays (a `range(0, C)` over a scalar argument), which numpy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"), an interpreter
# matter that compiled kernels do not meet. Writes the logs and the triton_smem JSON to
# OUT (default /tmp/latentfast-triton-VERSION-out). Exit status: the test pass's; the
# triton_smem status is printed (1 when a launch does not fit, as the float64 vector-flow
# backward at d = 512 does not, by design: it falls back to the reference).
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-3.6.0}
VENV=${TRITON_CHECK_VENV:-/tmp/latentfast-triton-$VER}
OUT=${OUT:-/tmp/latentfast-triton-$VER-out}
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q "${LATENTFAST_TORCH:-torch==2.13.0}" "triton==$VER" "numpy<2.4" \
  tqdm pytest pytest-benchmark pytest-xdist scikit-learn matplotlib
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
set +e
bash scripts/interpreter_pass.sh "$VENV/bin/python" 2>&1 | tee "$OUT/interpreter_pass.log" | tail -3
tests_rc=${PIPESTATUS[0]}
"$VENV/bin/python" scripts/triton_smem.py --json "$OUT/triton_smem.json" > "$OUT/triton_smem.log" 2>&1
smem_rc=$?
set -e
tail -1 "$OUT/triton_smem.log"
echo "interpreter pass exit $tests_rc, triton_smem exit $smem_rc; logs in $OUT"
exit "$tests_rc"
