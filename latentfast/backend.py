"""Backend choice for every op: ``reference`` | ``cpp`` | ``triton``.

``auto`` (the default) picks ``triton`` for CUDA tensors, ``cpp`` for CPU tensors when the
C++ extension is built, and ``reference`` otherwise (with a one-time warning when the C++
extension is missing). ``LATENTFAST_BACKEND`` or :func:`use_backend` force one backend;
forcing one that cannot run on the given tensors raises a :class:`RuntimeError` naming what
is missing, never a silent fallback.

Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks them).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Iterator

import torch

from latentfast import _ext

BACKENDS = ("reference", "cpp", "triton")
_CHOICES = ("auto",) + BACKENDS
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("latentfast_backend", default=None)
_warned_no_cpp = False


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(importable, version or why not)."""
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); pip install triton"
    return True, triton.__version__


@functools.cache
def triton_kernels(family: str):
    """latentfast.kernels.<family>, imported on first use (so that importing the op layer
    never needs triton)."""
    import importlib

    return importlib.import_module(f"latentfast.kernels.{family}")


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested() -> str:
    """The backend asked for: use_backend() if active, else LATENTFAST_BACKEND, else auto."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("LATENTFAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"LATENTFAST_BACKEND must be one of {_CHOICES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block.

    Example:
        >>> with latentfast.use_backend("reference"):
        ...     y, logdet = step(x)
    """
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on tensors of `device`, else the reason."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors only, got {device.type}"
        if not _ext.has_cpp():
            return _ext.load_error or "latentfast._C is not built"
        return None
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return (
            f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got {device.type}"
        )
    raise ValueError(f"unknown backend {name!r}")


def select(device: torch.device) -> str:
    """The backend an op will use for tensors on `device` (see module docstring)."""
    global _warned_no_cpp
    name = requested()
    if name != "auto":
        why = why_unavailable(name, device)
        if why is not None:
            raise RuntimeError(f"latentfast backend {name!r} cannot run: {why}")
        return name
    if device.type == "cuda" and why_unavailable("triton", device) is None:
        return "triton"
    if device.type == "cpu":
        if _ext.has_cpp():
            return "cpp"
        if not _warned_no_cpp:
            _warned_no_cpp = True
            warnings.warn(
                f"latentfast: C++ kernels unavailable ({_ext.load_error}); "
                "using the pure-PyTorch reference backend",
                stacklevel=3,
            )
    return "reference"
