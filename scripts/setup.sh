#!/usr/bin/env bash
# Creates .venv (if missing) and installs torch, triton, test deps and latentfast with its
# C++ extension. On a CPU machine torch==2.13.0 is the CPU wheel; set LATENTFAST_TORCH to
# pick another torch spec (e.g. on a CUDA machine that already has torch, "skip").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
TORCH_SPEC=${LATENTFAST_TORCH:-torch==2.13.0}
if [ "$TORCH_SPEC" != "skip" ]; then
  python -c "import torch" 2>/dev/null || pip install -q "$TORCH_SPEC"
fi
pip install -q triton numpy tqdm pytest pytest-benchmark pytest-xdist pytest-timeout scikit-learn matplotlib ninja setuptools wheel
pip install -q --no-build-isolation -e .
python -m latentfast info
