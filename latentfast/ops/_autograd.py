"""Double backward, forward-mode AD and torch.func transforms for the ops.

The registered backward of every op calls a kernel (C++ or Triton), so the gradients it
returns carry no autograd graph: differentiating them again (``torch.autograd.grad(...,
create_graph=True)`` for a gradient penalty, a Hessian-vector product, a gradient of a
gradient) would silently see constants. Autograd runs a backward with grad mode on only under
``create_graph=True``; there, :func:`graph_wanted` is true and the backward returns
:func:`reference_vjp` instead: the same first derivatives through the op's pure-PyTorch
reference, built as a graph, so every higher derivative is PyTorch's own (and slower: the
reference recomputes the forward). A plain ``loss.backward()`` never takes this path.

The kernels know nothing of forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) or
of torch.func's transforms (vmap, grad, jacrev, jacfwd, hessian): their outputs would carry
no tangent (silently zero directional derivatives) or fail. :func:`under_transform` tells
the public functions when one of these sees their inputs; they then compute with the
pure-PyTorch reference, which every transform handles. A registered op called directly
(torch.ops.latentfast.*) has no such route: :func:`reject_tangents` makes its kernel raise
when an input carries a forward-mode tangent instead of returning outputs without one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor


def _tensors(items) -> list[Tensor]:
    out = []
    for t in items:
        if isinstance(t, Tensor):
            out.append(t)
        elif isinstance(t, (list, tuple)):
            out.extend(_tensors(t))
    return out


def graph_wanted(*items: Any) -> bool:
    """True inside a backward run with ``create_graph=True`` whose results need a graph: grad
    mode is on (autograd turns it on for a backward only then) and one of the given tensors
    (incoming gradients, saved inputs; lists are searched) requires grad. Always false while
    torch.compile traces (it does not support double backward and raises on its own)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return any(t.requires_grad for t in _tensors(items))


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
    if getattr(fwad, "_current_level", -1) >= 0:
        return any(fwad.unpack_dual(t).tangent is not None for t in _tensors(items))
    return False


def reject_tangents(op: str, *items: Any) -> None:
    """Raise when one of the given tensors (lists are searched) carries a forward-mode AD
    tangent (torch.autograd.forward_ad). Called first in every registered op's kernel: PyTorch
    gives a custom op no forward-mode rule, so a direct call (torch.ops.latentfast.*) on dual
    tensors that do not require grad would return outputs without a tangent, a silent zero
    directional derivative. (The public functions never get here with tangents: they compute
    with the reference then. Inside torch.func.jvp / jacfwd the kernel sees unwrapped tensors,
    so a direct call there cannot be caught; the README says so.)"""
    if getattr(fwad, "_current_level", -1) < 0:
        return
    if any(fwad.unpack_dual(t).tangent is not None for t in _tensors(items)):
        raise RuntimeError(
            f"latentfast::{op} has no forward-mode AD rule and would return no tangent: call the public "
            f"function (latentfast.ops.*), which computes with the pure-PyTorch reference under forward-mode AD "
            f"and torch.func transforms")
