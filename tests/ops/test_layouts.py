"""Every op, on every backend, given inputs in the layouts user code makes and under the
grad modes it runs in: the same outputs and gradients as with contiguous inputs in grad mode.

Layouts, one input at a time: a view of every other element (a slice of a larger tensor), a
transposed storage order (what `.transpose(0, 1).contiguous().transpose(0, 1)` or a permuted
batch gives), channels_last for the 4-D ones, and a broadcast (stride 0) batch or weight.
Modes: torch.no_grad, and torch.inference_mode with inputs made there (inference tensors have
no version counter: the Triton inverse of the vector-flow stack read it to remember its
dependency plan and raised "Inference tensors do not track version counter").
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import TOL, device_for
from tests.ops.op_cases import CASES, op_cases

B = 3


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def _run(fn, inputs, grad: bool = True):
    """Outputs, and the gradients of a fixed weighted sum of them with respect to every input."""
    if grad:
        inputs = [t.detach().requires_grad_() if not t.requires_grad else t for t in inputs]
    outs = _outputs(fn(*inputs))
    if not grad:
        return [o.detach() for o in outs], None
    loss = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
               for o in outs if o.requires_grad)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs], grads


def _layouts(t: torch.Tensor):
    """(name, a leaf tensor with t's shape in another layout); the broadcast one has other
    values (its first row repeated)."""
    big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype, device=t.device)
    every_other = big[tuple(slice(None, None, 2) for _ in t.shape)]
    every_other.copy_(t)
    yield "every other element", every_other.detach()
    if t.dim() >= 2:
        yield "transposed storage", t.transpose(0, 1).contiguous().transpose(0, 1).detach()
    if t.dim() == 4:
        yield "channels_last", t.contiguous(memory_format=torch.channels_last).detach()
    if t.shape[0] > 1:
        yield "broadcast rows", t[:1].expand_as(t).detach()


def _assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        assert g is not None and w is not None, (what, i)
        torch.testing.assert_close(g, w, **TOL[w.dtype], msg=lambda m: f"{what} [{i}]: {m}")


@pytest.mark.parametrize("name", CASES)
def test_op_on_inputs_in_other_layouts(backend, name):
    fn, inputs, _, _ = op_cases(device_for(backend), B)[name]
    for i, t in enumerate(inputs):
        for layout, view in _layouts(t):
            assert not view.is_contiguous(), (name, i, layout)  # the op gets another layout
            got = _run(fn, [*inputs[:i], view, *inputs[i + 1:]])
            want = _run(fn, [*inputs[:i], view.contiguous(), *inputs[i + 1:]])
            _assert_same(got[0], want[0], f"{name}, input {i} {layout}: output")
            _assert_same(got[1], want[1], f"{name}, input {i} {layout}: gradient")


@pytest.mark.parametrize("name", CASES)
def test_op_under_no_grad_and_inference_mode(backend, name):
    fn, inputs, _, _ = op_cases(device_for(backend), B)[name]
    want, _ = _run(fn, inputs)
    with torch.no_grad():
        got, _ = _run(fn, inputs, grad=False)
    _assert_same(got, want, f"{name} under no_grad")
    with torch.inference_mode():
        made_here = [t.clone() for t in inputs]
        assert all(t.is_inference() for t in made_here)
        for call in range(2):  # the second call meets what the first one may have remembered
            got, _ = _run(fn, made_here, grad=False)
            assert all(o.is_inference() for o in got)
            _assert_same(got, want, f"{name} under inference_mode, call {call}")
        got, _ = _run(fn, inputs, grad=False)  # tensors from outside inference mode
        _assert_same(got, want, f"{name} under inference_mode, inputs made outside")
