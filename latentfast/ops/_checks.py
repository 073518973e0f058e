"""Input validation shared by the op wrappers and the modules: clear errors, never garbage."""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

from latentfast.ops._amp import HALF_DTYPES
from latentfast.ops._autograd import functorch_active

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_skip_finite: contextvars.ContextVar[bool] = contextvars.ContextVar("latentfast_skip_finite", default=False)


def check_tensor(name: str, t: object, ndim: int | None = None, like: Tensor | None = None,
                 dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> Tensor:
    """Raise TypeError/ValueError unless `t` is a tensor of rank `ndim`, a supported dtype,
    and the dtype and device of `like`. Under torch.autocast for t's device, float16 and
    bfloat16 pass where float32 does and floating dtypes may differ from `like`'s (the ops cast
    them to float32, see ops/_amp.py)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    amp = t.is_floating_point() and t.device.type != "meta" and torch.is_autocast_enabled(t.device.type)
    if t.dtype not in dtypes and not (amp and t.dtype in HALF_DTYPES and torch.float32 in dtypes):
        hint = ("; the kernels compute in float32 or float64: for mixed precision keep the model in float32 "
                "and run it under torch.autocast (which the ops follow) rather than converting it with .half() "
                "or .to(torch.bfloat16)") if t.dtype in HALF_DTYPES and torch.float32 in dtypes else ""
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}{hint}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if like is not None:
        if t.dtype != like.dtype and not (amp and like.is_floating_point()):
            raise TypeError(f"{name} has dtype {t.dtype} but the input has {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")
    return t


def check_like_model(name: str, t: Tensor, param: Tensor) -> None:
    """Raise TypeError/ValueError unless the input `t` has the dtype (any floating dtype under
    torch.autocast for its device) and the device of the model parameter `param`."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    amp = (t.is_floating_point() and param.is_floating_point() and t.device.type != "meta"
           and torch.is_autocast_enabled(t.device.type))
    if t.dtype != param.dtype and not amp:
        hint = "" if t.is_floating_point() else " (integer data as floats, scaled to the range the model was trained on)"
        raise TypeError(f"{name} has dtype {t.dtype} but the model's parameters are {param.dtype}: pass "
                        f"{name}.to({param.dtype}){hint}")
    if t.device != param.device:
        raise ValueError(f"{name} is on {t.device} but the model is on {param.device}")


def check_count(name: str, n: object, least: int, what: str) -> None:
    """Raise ValueError unless n is an int (not a bool) >= least; `what` says what it counts."""
    if isinstance(n, bool) or not isinstance(n, int) or n < least:
        raise ValueError(f"{name} must be an int >= {least} ({what}), got {n!r}")


def can_read_back(t: Tensor) -> bool:
    """Whether a value check may read `t` back to the host: not under torch.compile tracing,
    not inside torch.func transforms (vmap cannot read a value back), not for a meta tensor
    (shapes only), and not while a CUDA graph is being captured on the current stream (a
    read-back is not permitted there, and a graph's replays run no Python anyway)."""
    if torch.compiler.is_compiling() or functorch_active() or t.device.type == "meta":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def finite_checks_enabled() -> bool:
    """Whether modules check their inputs for NaN/Inf (LATENTFAST_CHECK_FINITE, default 1)."""
    return os.environ.get("LATENTFAST_CHECK_FINITE", "1") != "0"


def _value_checks_run(t: Tensor) -> bool:
    """Whether a value check of `t` runs: not inside an already-checked model (see
    checked_once), not where no value can be read back (can_read_back: torch.compile tracing,
    torch.func transforms, CUDA graph capture), not with LATENTFAST_CHECK_FINITE=0."""
    return can_read_back(t) and not _skip_finite.get() and finite_checks_enabled()


def check_finite(name: str, t: Tensor) -> None:
    """Raise ValueError if `t` holds NaN or Inf. Skipped where _value_checks_run says so. On a
    GPU the check is one device-to-host read, so one synchronisation, per call."""
    if not _value_checks_run(t):
        return
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return
    if t.is_complex():
        finite = bool(torch.isfinite(t).all())
    else:
        # one reduction pass, no [numel] bool temporary (about 20x faster than
        # isfinite(t).all() on CPU); aminmax propagates NaN to both results
        lo, hi = torch.aminmax(t)
        if t.device.type == "cpu":
            finite = math.isfinite(lo.item()) and math.isfinite(hi.item())
        else:  # both in one device-to-host read
            finite = all(math.isfinite(v) for v in torch.stack((lo, hi)).tolist())
    if not finite:
        raise ValueError(f"{name} contains NaN or Inf values")


def check_finite_together(named: list[tuple[str, Tensor]]) -> None:
    """check_finite of several tensors (name, tensor) with one device-to-host read for all
    of them (one synchronisation on a GPU, not one per tensor)."""
    named = [(n, t) for n, t in named if t.numel() and t.is_floating_point()]
    if not named or not _value_checks_run(named[0][1]):
        return
    if len(named) == 1:
        check_finite(*named[0])
        return
    ends = torch.stack([v.to(torch.float64) for _, t in named for v in torch.aminmax(t)]).tolist()
    for i, (n, _) in enumerate(named):
        if not (math.isfinite(ends[2 * i]) and math.isfinite(ends[2 * i + 1])):
            raise ValueError(f"{n} contains NaN or Inf values")


def check_unit_interval(name: str, t: Tensor) -> None:
    """Raise ValueError unless every value of `t` lies in [0, 1] (NaN fails too): Bernoulli
    targets. Skipped where check_finite is (_value_checks_run)."""
    if not _value_checks_run(t) or t.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # both in one read-back
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{name} must hold values in [0, 1] (Bernoulli targets: scale the data to [0, 1]), "
                         f"got values in [{lo:.4g}, {hi:.4g}]")


# Value checks of layer constants (buffers) that passed: (kind, id of the first tensor) ->
# (weak references to the tensors, their stamps). A plain dict (a WeakIdKeyDictionary lookup
# cost 1.4 us, most of a hit's time), cleared when it grows past _PASSED_MAX entries.
_passed: dict[tuple[str, int], tuple] = {}
_PASSED_MAX = 4096


def _stamp(t: Tensor) -> tuple[int, int] | None:
    # Inference tensors keep no version counter: they are checked on every call.
    return None if torch.is_inference(t) else (t.data_ptr(), t._version)


def passed_before(kind: str, *tensors: Tensor) -> bool:
    """Whether these tensors passed the value check `kind` (see remember_passed) and none of
    them has a new storage or version since (load_state_dict and in-place writes bump it)."""
    entry = _passed.get((kind, id(tensors[0])))
    if entry is None or len(entry[0]) != len(tensors):
        return False
    refs, stamps = entry
    for ref, stamp, t in zip(refs, stamps, tensors):
        if ref() is not t or stamp is None or stamp != _stamp(t):
            return False
    return True


def remember_passed(kind: str, *tensors: Tensor) -> None:
    """Note that these tensors passed the value check `kind`, so that a call with the same,
    unchanged tensors skips it (a layer's constants: one read-back, one GPU synchronisation,
    per version instead of per call)."""
    stamps = tuple(_stamp(t) for t in tensors)
    if None in stamps:
        return
    if len(_passed) >= _PASSED_MAX:
        _passed.clear()
    _passed[(kind, id(tensors[0]))] = (tuple(weakref.ref(t) for t in tensors), stamps)


def check_lu_constants(perm: Tensor, sign_s: Tensor) -> None:
    """Raise ValueError unless perm is a permutation matrix (entries 0 and 1, one 1 in every
    row and column) and sign_s holds only -1 and 1: with any other perm, P^T is not P^-1 and
    the triangular solves would not give W^-1; with |sign_s| != 1, sum(log_abs_s) would not
    be log|det W|. These are constants of a layer (buffers), so the same tensors are checked
    again only when their storage or version changes (load_state_dict, an in-place write):
    about 50 us when it checks at C = 48 on CPU, one device-to-host read on a GPU, about 4 us
    when it does not. Skipped where no value can be read back (see can_read_back); the
    registered op torch.ops.latentfast.lu_weight does not check (it uses perm as the matrix it
    is, and its second output is then U'^-1 L^-1 P^T)."""
    if not can_read_back(perm):
        return
    if passed_before("lu_weight", perm, sign_s):
        return
    with torch.no_grad():
        binary = ((perm == 0) | (perm == 1)).all()
        lines = (perm.sum(0) == 1).all() & (perm.sum(1) == 1).all()
        signs = (sign_s.abs() == 1).all()
        binary, lines, signs = torch.stack((binary, lines, signs)).tolist()
    if not (binary and lines):
        raise ValueError("perm must be a permutation matrix (entries 0 and 1, one 1 in every row and column)")
    if not signs:
        raise ValueError("sign_s must hold only -1 and 1 (log|det W| = sum(log_abs_s) assumes it)")
    remember_passed("lu_weight", perm, sign_s)


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar, value: object) -> Iterator[None]:
    """`var` set to `value` inside the block. Nothing while torch.compile traces: a trace
    cannot set a ContextVar, and the block's readers (value checks, the Triton inverse's
    planning) do not run there."""
    if torch.compiler.is_compiling():
        yield
        return
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def checked_once() -> contextlib.AbstractContextManager[None]:
    """Inside this block nested modules skip their finiteness checks (the outer model has
    already checked its input once). Nothing to do while torch.compile traces (the checks
    read nothing back there)."""
    return context_value(_skip_finite, True)
