"""check_finite: every NaN / +Inf / -Inf position and dtype is caught, finite input passes."""
from __future__ import annotations

import pytest
import torch

from latentfast.ops._checks import can_read_back, check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_catches_every_bad_value(dtype, bad, device="cpu"):
    # (tests/test_gpu.py runs this on CUDA tensors, where min and max come back in one read)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 5, generator=gen).to(dtype).to(device)
    check_finite("x", x)  # finite: passes
    for flat in torch.randint(0, x.numel(), (6,), generator=gen).tolist() + [0, x.numel() - 1]:
        y = x.clone()
        y.view(-1)[flat] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_finite("x", y)
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_finite("x", y.transpose(0, 2))  # non-contiguous views too


def test_check_finite_edge_cases():
    check_finite("x", torch.empty(0, 3))
    check_finite("x", torch.arange(10))  # integers are always finite
    check_finite("x", torch.tensor(True))
    check_finite("x", torch.full((4,), torch.finfo(torch.float32).max))  # large but finite
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_finite("x", torch.tensor(float("nan")))


def test_no_read_back_inside_transforms():
    x = torch.tensor([1.0, float("nan")])
    assert can_read_back(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(can_read_back(t)) or t)(x)
    assert seen == [False]
    torch.func.vmap(lambda t: check_finite("t", t) or t)(x)  # skipped: no error, no crash
