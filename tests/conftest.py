"""Shared test helpers: backends under test, one tolerance table, a verbose assert."""
from __future__ import annotations

import os
import random
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import latentfast
from latentfast import backend as lf_backend

# One tolerance table for the whole suite (relative and absolute), by dtype.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


def backends_under_test() -> list[str]:
    """LATENTFAST_BACKEND set (e.g. the Triton interpreter pass): that backend only.
    Otherwise every backend that can run on CPU tensors here (reference, cpp); the Triton
    kernels on CUDA are covered by the gpu-marked tests (tests/test_gpu.py)."""
    forced = os.environ.get("LATENTFAST_BACKEND", "auto")
    if forced != "auto":
        return [forced]
    names = ["reference"]
    if lf_backend.why_unavailable("cpp", torch.device("cpu")) is None:
        names.append("cpp")
    return names


def device_for(backend_name: str) -> torch.device:
    if backend_name == "triton" and torch.cuda.is_available() and not lf_backend.triton_interpret():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test starts from global RNGs (torch, random, numpy) seeded from its own id, so its
    random inputs do not depend on which tests ran before it (a file alone, -k, xdist workers):
    a failure on random data reproduces with that test alone. LATENTFAST_TEST_SEED (default 0)
    is mixed in, to draw other data: a sweep over it finds tolerances that hold only for some."""
    seed = zlib.crc32(f"{os.environ.get('LATENTFAST_TEST_SEED', '0')}:{request.node.nodeid}".encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(params=backends_under_test())
def backend(request):
    """Runs the test under each backend, forced."""
    with latentfast.use_backend(request.param):
        yield request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """assert_close with the suite's tolerance, printing where the values differ."""
    tol = TOL[dtype or expected.dtype]
    actual = actual.detach().cpu().to(expected.dtype)
    expected = expected.detach().cpu()
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale,
                               msg=lambda m: f"{msg}\n{m}")


def interpreting() -> bool:
    return lf_backend.triton_interpret()


# Under the Triton interpreter every kernel launch runs its programs in Python, so gradcheck
# projects the Jacobians on random directions (fast_mode) instead of building them column by
# column; the normal pass checks them in full.
FAST_GC = dict(fast_mode=True) if interpreting() else {}


CPU_ISAS = ("base", "avx2", "avx512")


def skip_unless_cpu_isa(isa: str) -> None:
    """Skips the calling test when this CPU (or this build) cannot run the C++ kernels' `isa`
    clone (see csrc/common/isa.h); the widest clone comes from the cpu_isa op."""
    best = torch.ops.latentfast_cpp.cpu_isa().split("widest available: ")[1].rstrip(")")
    if CPU_ISAS.index(isa) > CPU_ISAS.index(best):
        pytest.skip(f"this CPU runs the C++ kernels up to {best}, not {isa}")


def use_cpu_isa(monkeypatch, isa: str) -> None:
    """Runs the rest of the calling test on the C++ kernels' `isa` clone (LATENTFAST_CPU_ISA),
    or skips it where this CPU cannot (skip_unless_cpu_isa)."""
    skip_unless_cpu_isa(isa)
    monkeypatch.setenv("LATENTFAST_CPU_ISA", isa)


def count_host_reads(monkeypatch) -> list[tuple[str, int]]:
    """From here on (monkeypatch's scope), the (file, line) of every Tensor.item / tolist /
    bool / float / int / index / cpu call made from latentfast's own code, in a list that
    grows as they happen: the reads that on a GPU are synchronisations (torch.optim's CPU step
    counters and the tests' own reads are not counted; .cpu() on a CPU tensor counts too)."""
    package = str(Path(latentfast.__file__).parent)
    seen: list[tuple[str, int]] = []

    def counted(original):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.startswith(package):
                seen.append((caller.filename, caller.lineno))
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    return seen
