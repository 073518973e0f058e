"""The Triton kernels' elementwise functions (latentfast/kernels/_math.py) against torch's
float64 functions, from 1e-30 to the saturated range, in ulps of the result. The direct forms
they replace (tanh from (1 - e) / (1 + e), e^a - 1, log(1 + e)) returned 0 below about 1e-7
in float32 and were off by about 3e3 ulps at 1e-4.

Runs where the Triton kernels do: the interpreter pass (TRITON_INTERPRET=1, CPU) and the GPU
tests (tests/test_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import backends_under_test, device_for

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(), reason="checks the Triton kernels' own helpers")

FUNCTIONS = ["tanh", "expm1", "log1p", "log_sigmoid", "sigmoid_and_log", "sigmoid"]


def _inputs(name: str, dtype: torch.dtype, dev) -> torch.Tensor:
    mags = torch.logspace(-30, 1.7, 3001, dtype=torch.float64)
    if name == "expm1":
        x = -mags  # the kernels call it on min(a, 0) (ELU); both signs still work
        x = torch.cat([x, mags[mags < 5]])
    elif name == "log1p":
        x = torch.exp(-mags[mags < 40])  # e = exp(-|u|) in (0, 1]
    else:
        x = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    return x.to(dtype).to(dev)


def _exact(name: str, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.double()
    if name == "tanh":
        return [torch.tanh(x)]
    if name == "expm1":
        return [torch.expm1(x)]
    if name == "log1p":
        return [torch.log1p(x)]
    if name == "log_sigmoid":
        return [torch.nn.functional.logsigmoid(x)]
    if name == "sigmoid_and_log":
        return [torch.sigmoid(x), torch.nn.functional.logsigmoid(x)]
    return [torch.sigmoid(x)]


try:  # (Triton is an optional dependency)
    import triton
    import triton.language as tl

    from latentfast.kernels import _math
except ImportError:  # pragma: no cover
    triton = None


def _apply_kernel_body(x_ptr, y_ptr, z_ptr, n, CODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(x_ptr + offs, mask=m, other=0.0)
    if CODE == 4:
        a, b = _math.sigmoid_and_log(v)
        tl.store(y_ptr + offs, a, mask=m)
        tl.store(z_ptr + offs, b, mask=m)
    else:
        if CODE == 0:
            r = _math.tanh(v)
        elif CODE == 1:
            r = _math.expm1(v)
        elif CODE == 2:
            r = _math.log1p(v)
        elif CODE == 3:
            r = _math.log_sigmoid(v)
        else:
            r = _math.sigmoid(v)
        tl.store(y_ptr + offs, r, mask=m)


_apply_kernel = triton.jit(_apply_kernel_body) if triton is not None else None


def _run(name: str, x: torch.Tensor) -> list[torch.Tensor]:
    code = FUNCTIONS.index(name)
    y, z = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _apply_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, z, x.numel(), CODE=code, BLOCK=1024)
    return [y, z] if name == "sigmoid_and_log" else [y]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_triton_math_is_accurate_over_the_whole_range(name, dtype):
    x = _inputs(name, dtype, device_for("triton"))
    eps = torch.finfo(dtype).eps
    for got, want in zip(_run(name, x), _exact(name, x)):
        got = got.cpu().double()
        assert torch.isfinite(got).all()
        # ulps of the result (a floor at the smallest normal keeps exact zeros comparable)
        ulps = (got - want).abs() / (want.abs().clamp_min(torch.finfo(dtype).tiny) * eps)
        worst = int(ulps.argmax())
        assert ulps.max() <= 8, (name, dtype, float(x[worst]), float(got[worst]), float(want[worst]),
                                 float(ulps.max()))
