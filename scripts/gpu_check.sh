#!/usr/bin/env bash
# The GPU checks in one call, for a session lent a CUDA machine (device tool; about 15 minutes
# of device time in all): device facts, the two ceilings (scripts/gpu_ceilings.py), the
# gpu-marked tests, the vector-flow inverse's backward (scripts/vf_inverse_cost.py), then the benchmark suite on cuda one op group at a time, so a group that
# runs long is cut off alone and the others' JSON survives. Uses the machine's python3 (torch,
# triton, pytest there) with the repo on PYTHONPATH: no install, no C++ build. Logs and JSON go
# to $OUT (the device tool's folder) or ./gpu_out.
#   bash scripts/gpu_check.sh            # everything
#   BENCH_GROUPS="glow rnn" bash scripts/gpu_check.sh   # some bench groups only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi || true; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/device.txt"
$PY -m latentfast info 2>&1 | tee -a "$OUT/device.txt"
timeout 180 $PY scripts/gpu_ceilings.py "$OUT/ceilings.json" 2>&1 | tee "$OUT/ceilings.txt"
timeout_flag=""
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout=150"
timeout ${TEST_TIMEOUT:-300} $PY -m pytest -m gpu -q -rs $timeout_flag tests >"$OUT/pytest_gpu.txt" 2>&1
echo "pytest -m gpu: exit $?"; tail -15 "$OUT/pytest_gpu.txt"
# the differentiable vector-flow inverse on CUDA: the Triton one-pass backward solve against the Python iterations, paired
timeout ${VF_TIMEOUT:-180} $PY scripts/vf_inverse_cost.py --device cuda 2>&1 | tee "$OUT/vf_inverse_cost.txt"
declare -A OPS=(
  [glow]="actnorm_invconv_coupling actnorm_invconv affine_coupling lu_weight"
  [geometry]="pullback_metric curve_energy"
  [rnn]="gru_sequence lstm_sequence"
  [lyapunov]="rnn_lyapunov lorenz_lyapunov"
  [vector]="vector_flow_stack made_flow_step vector_flow_stack_inverse"
  [geodesic]="geodesic"
)
for g in ${BENCH_GROUPS:-glow rnn vector geometry lyapunov geodesic}; do
  echo "== bench $g (${OPS[$g]}) =="
  timeout ${BENCH_TIMEOUT:-240} $PY -m latentfast bench --device cuda --ops ${OPS[$g]} \
    --json "$OUT/bench_$g.json" >"$OUT/bench_$g.txt" 2>&1
  echo "exit $?"; grep -v "bench (cuda)" "$OUT/bench_$g.txt" | tail -25
done
