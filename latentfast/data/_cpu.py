"""Data and seeded draws made on the CPU whatever torch.set_default_device says."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def made_on_cpu(fn: F) -> F:
    """Decorator for the data generators, and the demos and trained models built on them:
    their tensors (and modules) are made on the CPU also under torch.set_default_device(
    "cuda"), where their seeded CPU torch.Generator draws would be refused ("Expected a
    'cuda' device type for generator"), data deterministic by seed would otherwise depend on
    the default device, and a demo's model would land on the GPU beside its CPU data. They
    call no user code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.get_default_device().type == "cpu":
            # the common case, without the device context: a TorchFunctionMode that every
            # torch call inside would pass through (lorenz63(3000, n_traj=8): 0.49-0.51 s without
            # it, 0.91-0.94 s with it; the bench's digits VAE, 5 epochs: +4-9%)
            return fn(*args, **kwargs)
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def draw_device(generator: torch.Generator | None) -> torch.device:
    """Where a draw with `generator` is made: on its device, or for the global generator
    (None) on the CPU, as with the default device left alone; the draws are moved to the
    tensors they go with afterwards. Never the default device: a CPU generator's draw there
    is refused on CUDA ("Expected a 'cuda' device type for generator"), as is
    torch.multinomial of CUDA probabilities with it."""
    return generator.device if generator is not None else torch.device("cpu")
