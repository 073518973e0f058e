"""scripts/gpu_check.sh, the one device call a GPU session makes, dry-run on the CPU under a
deadline too short for all of it: it must finish inside the deadline, say for every phase
whether it ran, was stopped at its limit or was skipped, and bring back what finished in the
two files the device tool returns (gpu_check.tgz, summary.txt)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import interpreting

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["device", "pytest_gpu", "glow_bandwidth", "vf_inverse_cost", "bench_glow"]


@pytest.mark.slow
@pytest.mark.skipif(interpreting(), reason="the dry run uses the default backends; once is enough")
def test_gpu_check_keeps_to_its_deadline_and_brings_back_what_finished(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    deadline = 50  # the gpu tests phase gets 45% of what is left: about 20 s, twice what it takes here
    env = {**os.environ, "DEVICE": "cpu", "BENCH_QUICK": "1", "BENCH_GROUPS": "glow", "DEADLINE": str(deadline),
           "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable, "TEST_WORKERS": "2"}
    env.pop("LATENTFAST_BACKEND", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=deadline + 60)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the last phase may overrun the deadline by its SIGINT grace (timeout -k 20) at most
    assert took < deadline + 25, f"took {took:.0f} s"
    assert sorted(os.listdir(out)) == ["gpu_check.tgz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for name in PHASES:  # each phase ran (with its exit status) or says why not
        m = re.search(rf"^== {name}(: skipped| \(limit (\d+) s)", summary, re.M)
        assert m, f"{name} missing from the summary:\n{summary}"
        if m.group(1) != ": skipped":
            assert int(m.group(2)) >= 5
    assert "route installed for" in summary  # `latentfast info` reached the summary
    assert re.search(r"^== done after \d+ s", summary, re.M)
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"summary.txt", "device.txt", "pytest_gpu.txt"} <= names
    assert "skipped" in (tmp_path / "unpacked" / "pytest_gpu.txt").read_text()  # no CUDA: every gpu test skips
    bench = tmp_path / "unpacked" / "bench_glow.json"
    if bench.exists():  # whole JSON even when the bench was stopped mid-run
        data = json.loads(bench.read_text())
        assert isinstance(data["rows"], list) and data["complete"] in (True, False)
