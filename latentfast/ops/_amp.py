"""Autocast (automatic mixed precision) for the public op functions.

Inside ``torch.autocast`` the layers around an op produce float16 / bfloat16 tensors (a
coupling net's conv, the matmul that folds ActNorm into the 1x1 conv), while the kernels take
float32 and float64 only. The ops follow autocast's policy for precision-sensitive operations
(log-determinants, recurrences, metrics): :func:`float32_under_autocast` casts float16 and
bfloat16 inputs to float32, runs the op with autocast off (so the reference backend too
computes in float32) and returns float32 outputs. float64 inputs are left alone, and outside
autocast nothing changes (a half-precision input still raises the usual TypeError).
:func:`latentfast.ops._autograd.op_backward` gives the ops' backward the same float32: a
backward run inside an autocast region (loss.backward() under the ``with``) would otherwise
run its matrix products in half precision.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from latentfast.ops._autograd import _tensors

HALF_DTYPES = (torch.float16, torch.bfloat16)
F = TypeVar("F", bound=Callable[..., Any])


def _upcast(t: Any) -> Any:
    if isinstance(t, Tensor):
        return t.float() if t.dtype in HALF_DTYPES else t
    if isinstance(t, list):
        return [_upcast(u) for u in t]
    if isinstance(t, tuple):
        return tuple(_upcast(u) for u in t)
    return t


def float32_under_autocast(fn: F) -> F:
    """Decorator: under torch.autocast for the inputs' device, upcast half-precision inputs to
    float32 and run `fn` with autocast disabled; otherwise call `fn` unchanged."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):  # the common case
            return fn(*args, **kwargs)
        tensors = _tensors((*args, *kwargs.values()))
        dev = tensors[0].device if tensors else None
        if dev is None or not torch.is_autocast_enabled(dev.type):
            return fn(*args, **kwargs)
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        with torch.autocast(dev.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
