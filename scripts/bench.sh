#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the benchmark suite on this machine, printing its
# table. Extra arguments go to `python -m latentfast bench` (e.g. --quick, --json PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m latentfast bench "$@"
