"""scripts/triton_smem.py: the Triton kernels compiled for sm_90 without a GPU (one small op,
so the check stays quick; the full run is `python scripts/triton_smem.py`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import interpreting

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(interpreting(), reason="compiles for the GPU target once, in the normal pass")
def test_triton_smem_compiles_the_recorded_launches(tmp_path):
    out = tmp_path / "smem.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LATENTFAST_BACKEND")}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_smem.py"), "--ops", "lu_weight", "--json",
                          str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())["rows"]
    # lu_weight at C = 48 and 256: the kernel launched with two block sizes, compiled for sm_90
    assert {r["kernel"] for r in rows} == {"_lu_weight_kernel"} and len(rows) == 2
    assert all(r["status"] == "fits" and r["shared"] >= 0 for r in rows)
