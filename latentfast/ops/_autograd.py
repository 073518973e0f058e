"""Double backward, forward-mode AD and torch.func transforms for the ops.

The registered backward of every op calls a kernel (C++ or Triton), so the gradients it
returns carry no autograd graph: differentiating them again (``torch.autograd.grad(...,
create_graph=True)`` for a gradient penalty, a Hessian-vector product, a gradient of a
gradient) would silently see constants. Autograd runs a backward with grad mode on only under
``create_graph=True``; there, :func:`graph_wanted` is true and the backward returns
:func:`reference_vjp` instead: the same first derivatives through the op's pure-PyTorch
reference, built as a graph, so every higher derivative is PyTorch's own (and slower: the
reference recomputes the forward). A plain ``loss.backward()`` never takes this path.
Batched gradients take it too: ``torch.autograd.grad(..., is_grads_batched=True)``, which
``torch.autograd.functional.jacobian`` / ``hessian(vectorize=True)`` and
``gradcheck(check_batched_grad=True)`` use, runs the backward under PyTorch's older vmap,
whose batched gradients have no storage for a kernel to read and no batching rule for some
of the backward formulas' operations (einsum); the reference's autograd graph has them.

The kernels know nothing of forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) or
of torch.func's transforms (vmap, grad, jacrev, jacfwd, hessian): their outputs would carry
no tangent (silently zero directional derivatives) or fail. :func:`under_transform` tells
the public functions when one of these sees their inputs; they then compute with the
pure-PyTorch reference, which every transform handles. A registered op called directly
(torch.ops.latentfast.*) gets the same route one level down: :func:`route_transforms`
puts a kernel in front of the op's autograd kernel that, when an input carries a tangent or
is wrapped by a torch.func transform, runs the op's own Python body on the reference backend
(pure PyTorch, so the transform sees every operation) and otherwise hands over to the
autograd kernel that register_autograd made. Ops without a reference (the Lyapunov spectra,
the saved-activation curve-energy pair) raise there instead. Under vmap each op calls itself
once per item (its vmap rule: PyTorch's own per-item fallback cannot be generated for ops
with Tensor[] arguments). :func:`reject_tangents`, first
in every kernel, stays as the check below autograd.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def _tensors(items) -> list[Tensor]:
    out = []
    for t in items:
        if isinstance(t, Tensor):
            out.append(t)
        elif isinstance(t, (list, tuple)):
            out.extend(_tensors(t))
    return out


def _has_tangent(tensors: list[Tensor]) -> bool:
    """A forward-mode tangent on one of the tensors (a dual level must be open)."""
    return any(fwad.unpack_dual(t).tangent is not None for t in tensors)


def graph_wanted(*items: Any) -> bool:
    """True where a backward must return :func:`reference_vjp`: inside a backward run with
    ``create_graph=True`` whose results need a graph (grad mode is on, which autograd turns
    on for a backward only then, and one of the given tensors, incoming gradients or saved
    inputs, lists searched, requires grad), or in a backward given batched gradients of
    ``is_grads_batched=True`` (module docstring; noted by :func:`op_backward`). Always false
    while torch.compile traces (it does not support double backward and raises on its own)."""
    if torch.compiler.is_compiling():
        return False
    if _batched_grads.get():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in _tensors(items))


# A batched tensor of torch.autograd.grad(..., is_grads_batched=True) (PyTorch's older vmap,
# torch._vmap_internals), not of torch.func.vmap.
_IS_LEGACY_BATCHED = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)
_batched_grads: contextvars.ContextVar[bool] = contextvars.ContextVar("latentfast_batched_grads", default=False)


def op_backward(bwd: F) -> F:
    """Decorator for every op's backward (ctx, *grads).

    It runs the backward with autocast off: the forward ran in float32
    (ops._amp.float32_under_autocast) or float64, and so does its backward, also when
    loss.backward() is called inside the autocast region (autocast is thread-local state, and
    the autograd engine runs a backward with the caller's), where the formulas' matrix products
    would otherwise run in bfloat16 / float16 (gradients about 1% off, and the C++ kernels that
    take float32 tensors from those products would raise). What torch.amp.custom_bwd does for
    a forward that ran with autocast off.
    And when an incoming gradient is batched (is_grads_batched=True), it runs the backward with
    :func:`graph_wanted` answering True, so that it returns the reference's VJP. Only the
    incoming gradients can be batched there, so only they are looked at (about 0.15 us each,
    where looking at every tensor a backward holds took 2.4 us a call)."""
    @functools.wraps(bwd)
    def wrapper(*args, **kwargs):
        batched = any(isinstance(g, Tensor) and _IS_LEGACY_BATCHED(g) for g in args[1:])
        on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not on and not batched:  # the common case
            return bwd(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for d in on:
                stack.enter_context(torch.autocast(d, enabled=False))
            if batched:
                stack.callback(_batched_grads.reset, _batched_grads.set(True))
            return bwd(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def reference_vjp(fn: Callable[..., Any], inputs: Sequence[Any], grads: Sequence[Tensor | None],
                  create_graph: bool = True) -> tuple:
    """Gradients of ``fn(*inputs)`` weighted by ``grads``, as a differentiable graph (or, with
    create_graph=False, as plain tensors: a backward that needs only autograd's first
    derivatives of the reference).

    fn: the op's reference, pure PyTorch, with the op's inputs (tensors, lists of tensors,
    other arguments passed through). Outputs whose gradient is None (or that do not depend on
    the inputs) are left out; fn's outputs beyond len(grads) are ignored. Returns one entry per
    input: the gradient for a tensor that requires grad (zeros if the output does not depend
    on it), a list of them for a list of tensors, None for anything else."""
    with torch.enable_grad():
        outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    wanted = [t for t in _tensors(inputs) if t.requires_grad]
    got = {}
    if wanted and pairs:
        res = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=create_graph,
                                  allow_unused=True)
        got = {id(t): (r if r is not None else torch.zeros_like(t)) for t, r in zip(wanted, res)}
    elif wanted:
        got = {id(t): torch.zeros_like(t) for t in wanted}

    def pick(t):
        if isinstance(t, Tensor):
            return got.get(id(t)) if t.requires_grad else None
        if isinstance(t, (list, tuple)) and any(isinstance(u, Tensor) for u in t):
            return [pick(u) for u in t]
        return None

    return tuple(pick(t) for t in inputs)


def functorch_active() -> bool:
    """True inside a torch.func transform (vmap, grad, jvp, jacrev, jacfwd, ...)."""
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:  # pragma: no cover - older or stripped builds
        return False


def under_transform(*items: Any) -> bool:
    """True when a torch.func transform (vmap, grad, jvp, jacrev, jacfwd, ...) is active, or
    forward-mode AD is and one of the given tensors (lists are searched) carries a tangent.
    Always false while torch.compile traces (it traces the custom ops)."""
    if torch.compiler.is_compiling():
        return False
    if functorch_active():
        return True
    return getattr(fwad, "_current_level", -1) >= 0 and _has_tangent(_tensors(items))


_routing: contextvars.ContextVar[bool] = contextvars.ContextVar("latentfast_transform_route", default=False)
ROUTED: dict[str, bool] = {}  # "latentfast::name" -> True (reference route) / False (raises)


def routed() -> bool:
    """True while an op body runs for the transform route (below), where the transform
    differentiates what the body computes."""
    return _routing.get()


def registered_ops() -> list[str]:
    """The custom ops registered in the latentfast:: namespace so far ("latentfast::name")."""
    return [f"latentfast::{n}" for n in dir(torch.ops.latentfast) if not n.startswith("_") and n != "name"]


def reject_tangents(op: str, *items: Any) -> None:
    """Raise when one of the given tensors (lists are searched) carries a forward-mode AD
    tangent (torch.autograd.forward_ad). Called first in every registered op's kernel: PyTorch
    gives a custom op no forward-mode rule, so a kernel reached with dual tensors would return
    outputs without a tangent, a silent zero directional derivative. The transform route
    (:func:`route_transforms`) normally takes such calls before they get here; this is the
    check for anything that reaches the kernel below it (a dispatch that skips autograd, or a
    PyTorch on which the route could not be installed)."""
    if _routing.get() or getattr(fwad, "_current_level", -1) < 0:
        return
    if _has_tangent(_tensors(items)):
        raise RuntimeError(
            f"latentfast::{op} has no forward-mode AD rule and would return no tangent: call the public "
            f"function (latentfast.ops.*), which computes with the pure-PyTorch reference under forward-mode AD "
            f"and torch.func transforms")


@contextlib.contextmanager
def _on_reference(backend) -> Iterator[None]:
    """An op body's reference branch, for the transform route: the reference backend forced,
    reject_tangents quiet."""
    token = _routing.set(True)
    try:
        with backend.use_backend("reference"):
            yield
    finally:
        _routing.reset(token)


def _transformed(items) -> bool:
    """A tensor among the op's arguments (as the op's autograd kernel sees them) is wrapped by
    a torch.func transform (grad, jvp, jacrev, jacfwd: the wrapper of that level) or carries a
    forward-mode tangent."""
    fw = getattr(fwad, "_current_level", -1) >= 0
    if not fw and not torch._C._are_functorch_transforms_active():  # the common case, cheaply
        return False
    tensors = _tensors(items)
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    return fw and _has_tangent(tensors)


def route_transforms(*opdefs: Any, reference: bool = True) -> None:
    """Install the transform route (module docstring) in front of each custom op's autograd
    kernel, and its per-item vmap rule. reference=True: the op's Python body runs on the
    reference backend under a transform (its outputs are then differentiable PyTorch
    expressions of its inputs); False: a clear RuntimeError there. The kernel it hands over
    to is built from the same op definition (torch's make_autograd_impl), so the backward
    and setup_context given to register_autograd apply, before or after this call. Recorded
    in ROUTED; an op whose route cannot be installed on this PyTorch keeps only
    reject_tangents (a test checks that every op is in ROUTED)."""
    from latentfast import backend  # (backend imports nothing from the op layer; late to keep it so)

    for opdef in opdefs:
        qualname = f"{opdef._namespace}::{opdef._name}"
        try:
            from torch._library.autograd import make_autograd_impl
            inner = make_autograd_impl(opdef._opoverload, opdef)
            body = opdef._init_fn
        except (ImportError, AttributeError, TypeError):  # pragma: no cover - other PyTorch internals
            continue

        def refuse(name=qualname):
            raise RuntimeError(
                f"{name} supports no forward-mode AD or torch.func transform (grad, jvp, jacrev, jacfwd): "
                f"its kernels have no derivative rules and it has no reference formulation to fall back to; "
                f"see the public function's documentation")

        def kernel(keyset, *args, _inner=inner, _body=body, _refuse=refuse, **kwargs):
            if torch.compiler.is_compiling() or not _transformed(args):
                return _inner(keyset, *args, **kwargs)
            if not reference:
                _refuse()
            with _on_reference(backend):
                outs = _body(*args, **kwargs)
            inputs = {id(t) for t in _tensors(args)}
            if isinstance(outs, tuple):  # an op's outputs never alias its inputs
                return tuple(o.clone() if id(o) in inputs else o for o in outs)
            return outs.clone() if id(outs) in inputs else outs

        def vmap_rule(info, in_dims, *args, _op=opdef._opoverload, **kwargs):
            # one call of the op per item, as PyTorch's batching fallback does, which it cannot
            # generate for ops with Tensor[] arguments
            if info.batch_size == 0:
                raise ValueError(f"{_op}: vmap over an empty dimension is not supported")

            def item(a, dim, i):
                if isinstance(a, (list, tuple)):
                    return [item(u, du, i) for u, du in zip(a, dim if dim is not None else [None] * len(a))]
                return a.select(dim, i) if dim is not None else a
            outs = [_op(*(item(a, dim, i) for a, dim in zip(args, in_dims)), **kwargs)
                    for i in range(info.batch_size)]
            if isinstance(outs[0], (tuple, list)):
                return tuple(torch.stack(o) for o in zip(*outs)), tuple(0 for _ in outs[0])
            return torch.stack(outs), 0

        params = inspect.signature(opdef._lib.impl).parameters
        extra = {"allow_override": True} if "allow_override" in params else {}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
                opdef._lib.impl(opdef._name, kernel, "Autograd", with_keyset=True, **extra)
        except RuntimeError:  # pragma: no cover - a PyTorch that refuses a second Autograd kernel
            continue
        opdef.register_vmap(vmap_rule)
        ROUTED[qualname] = reference
