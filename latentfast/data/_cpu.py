"""Data made on the CPU whatever torch.set_default_device says."""
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
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
