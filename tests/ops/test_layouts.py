"""Every op, on every backend, given inputs in the layouts user code makes and under the
grad modes it runs in: the same outputs and gradients as with contiguous inputs in grad mode.

Layouts, one input at a time: a view of every other element (a slice of a larger tensor), a
transposed storage order (what `.transpose(0, 1).contiguous().transpose(0, 1)` or a permuted
batch gives), channels_last for the 4-D ones, and a broadcast (stride 0) batch or weight.
Gradients arriving in those layouts too (what a transpose, a permute or a sum downstream hands
the backward). The ops without a batch (lu_weight, the Lyapunov spectra) the same way: the
Triton lu_weight allocated W and W^-1 with empty_like(perm), which keeps a transposed perm's
strides, and wrote them row-major, returning W^T.
Modes: torch.no_grad, and torch.inference_mode with inputs made there (inference tensors have
no version counter: the Triton inverse of the vector-flow stack read it to remember its
dependency plan and raised "Inference tensors do not track version counter").
"""
from __future__ import annotations

import pytest
import torch

from latentfast.ops import dynamics as dyn_ops
from latentfast.ops import flows as flow_ops
from tests.conftest import TOL, device_for
from tests.ops.op_cases import CASES, op_cases, rnd

B = 3


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def _run(fn, inputs, grad: bool = True):
    """Outputs, and the gradients of a fixed weighted sum of them with respect to every input."""
    if grad:
        inputs = [t.detach().requires_grad_() for t in inputs]
    outs = _outputs(fn(*inputs))
    if not grad:
        return [o.detach() for o in outs], None
    loss = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
               for o in outs if o.requires_grad)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs], grads


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view of every other element of a tensor twice its size in each dim."""
    big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype, device=t.device)
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view.detach()


def _layouts(t: torch.Tensor, broadcast: bool = True):
    """(name, a leaf tensor with t's shape in another layout); the broadcast one has other
    values (its first row repeated), so broadcast=False leaves it out."""
    yield "every other element", _every_other(t)
    if t.dim() >= 2:
        yield "transposed storage", t.transpose(0, 1).contiguous().transpose(0, 1).detach()
    if t.dim() == 4:
        yield "channels_last", t.contiguous(memory_format=torch.channels_last).detach()
    if broadcast and t.shape[0] > 1:
        yield "broadcast rows", t[:1].expand_as(t).detach()


def _grad_layouts(t: torch.Tensor):
    """(name, a gradient with t's values, or its first value broadcast, in another layout)."""
    if t.dim() >= 2:
        yield "transposed", t.transpose(0, 1).contiguous().transpose(0, 1)
    if t.dim() == 3:
        yield "permuted", t.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    if t.dim() == 4:
        yield "channels_last", t.contiguous(memory_format=torch.channels_last)
    yield "every other element", _every_other(t)
    yield "expanded", t.flatten()[:1].reshape([1] * t.dim()).expand(t.shape)  # a sum's gradient


def _assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        assert g is not None and w is not None, (what, i)
        torch.testing.assert_close(g, w, **TOL[w.dtype], msg=lambda m: f"{what} [{i}]: {m}")


def _check_input_layouts(name, fn, inputs, grad=True, fixed_values=()):
    """Each input in turn in each of _layouts: outputs (and gradients) as with its contiguous
    copy. The inputs at the indices fixed_values get no broadcast layout (lu_weight's perm: a
    matrix of repeated rows is no permutation, and the op rejects it)."""
    for i, t in enumerate(inputs):
        for layout, view in _layouts(t, broadcast=i not in fixed_values):
            assert not view.is_contiguous(), (name, i, layout)  # the op gets another layout
            got = _run(fn, [*inputs[:i], view, *inputs[i + 1:]], grad)
            want = _run(fn, [*inputs[:i], view.contiguous(), *inputs[i + 1:]], grad)
            _assert_same(got[0], want[0], f"{name}, input {i} {layout}: output")
            if grad:
                _assert_same(got[1], want[1], f"{name}, input {i} {layout}: gradient")


def _check_gradient_layouts(name, fn, inputs):
    """Each differentiable output's gradient in each of _grad_layouts: the input gradients of
    its contiguous copy."""
    def grads(j, grad_out):
        leaves = [t.detach().requires_grad_() for t in inputs]
        outs = [o for o in _outputs(fn(*leaves)) if o.requires_grad]
        return torch.autograd.grad(outs[j], leaves, grad_outputs=grad_out, allow_unused=True)

    gen = torch.Generator().manual_seed(3)
    for j, o in enumerate(o for o in _outputs(fn(*[t.detach().requires_grad_() for t in inputs])) if o.requires_grad):
        g = torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)
        for layout, view in _grad_layouts(g):
            _assert_same(grads(j, view), grads(j, view.contiguous()), f"{name}, output {j}, gradient {layout}")


def _check_modes(name, fn, inputs, grad=True):
    """Outputs under no_grad and inference_mode (inputs made there, two calls; inputs made
    outside) as in grad mode (with gradients wanted when grad)."""
    want, _ = _run(fn, inputs, grad)
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


@pytest.mark.parametrize("name", CASES)
def test_op_on_inputs_in_other_layouts(backend, name):
    fn, inputs, _, _ = op_cases(device_for(backend), B)[name]
    _check_input_layouts(name, fn, inputs)


@pytest.mark.parametrize("name", CASES)
def test_op_under_no_grad_and_inference_mode(backend, name):
    fn, inputs, _, _ = op_cases(device_for(backend), B)[name]
    _check_modes(name, fn, inputs)


@pytest.mark.parametrize("name", CASES)
def test_op_given_gradients_in_other_layouts(backend, name):
    fn, inputs, _, _ = op_cases(device_for(backend), B)[name]
    _check_gradient_layouts(name, fn, inputs)


def _unbatched_cases(dev):
    c = 5
    perm = torch.eye(c, dtype=torch.float64, device=dev)[torch.tensor([3, 0, 4, 1, 2], device=dev)]
    lu = (perm, rnd(c, c, scale=0.5, dev=dev).tril(-1), rnd(c, c + 1, scale=0.5, dev=dev)[:, :c].triu(1),
          torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64, device=dev), rnd(c, scale=0.3, dev=dev))
    gru = (rnd(18, 3, scale=0.4, dev=dev), rnd(18, 6, scale=0.4, dev=dev), rnd(18, scale=0.1, dev=dev),
           rnd(19, scale=0.1, dev=dev)[:18])
    readout = (rnd(3, 6, dev=dev), rnd(3, dev=dev))

    def gen():
        return torch.Generator(device=dev).manual_seed(0)  # the same random initial frames every call

    lorenz0 = rnd(4, 3, dev=dev) + torch.tensor([0.0, 0.0, 25.0], dtype=torch.float64, device=dev)
    return {
        "lu_weight": (flow_ops.lu_weight, lu, True),
        "lorenz_lyapunov_spectrum": (
            lambda x: dyn_ops.lorenz_lyapunov_spectrum("lorenz63", x, 3, 5, generator=gen()), (lorenz0,), False),
        "rnn_lyapunov_spectrum": (
            lambda s, *p: dyn_ops.rnn_lyapunov_spectrum("gru", s, 2, 4, *p, generator=gen()),
            (rnd(4, 6, scale=0.5, dev=dev), *gru, *readout), False),
    }


UNBATCHED = ["lu_weight", "lorenz_lyapunov_spectrum", "rnn_lyapunov_spectrum"]


@pytest.mark.parametrize("name", UNBATCHED)
def test_unbatched_op_on_inputs_in_other_layouts_and_modes(backend, name):
    fn, inputs, differentiable = _unbatched_cases(device_for(backend))[name]
    _check_input_layouts(name, fn, inputs, grad=differentiable, fixed_values=(0,) if name == "lu_weight" else ())
    if differentiable:
        _check_gradient_layouts(name, fn, inputs)
    _check_modes(name, fn, inputs, grad=differentiable)


def _check_fake_strides(name, fn, inputs, differentiable=True):
    """fn forward (and backward) through its custom ops, as torch.compile calls them, with
    CrossRefFakeMode running each latentfast op on fake tensors too and comparing the outputs'
    shapes and strides: once with contiguous inputs, then with each input and each output's gradient in
    the other layouts."""
    from torch._subclasses.fake_utils import CrossRefFakeMode

    def run(ins, grad_at=None, grad=None):
        ins = [t.detach().requires_grad_(differentiable) for t in ins]
        with CrossRefFakeMode(ignore_op_fn=lambda op: getattr(op, "namespace", None) != "latentfast"):
            outs = [o for o in _outputs(fn(*ins)) if o.requires_grad]
            if outs and grad is not None:
                torch.autograd.backward([outs[grad_at]], [grad])
            elif outs:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return outs

    outs = run(inputs)
    for i, t in enumerate(inputs):
        for layout, other in _layouts(t, broadcast=False):
            try:
                run([other if j == i else u for j, u in enumerate(inputs)])
            except Exception as e:
                raise AssertionError(f"{name}, input {i} in {layout}: {e}") from e
    for k, o in enumerate(outs):
        for layout, g in _grad_layouts(torch.randn(o.shape, dtype=o.dtype, device=o.device)):
            try:
                run(inputs, k, g)
            except Exception as e:
                raise AssertionError(f"{name}, gradient of output {k} in {layout}: {e}") from e


@pytest.mark.parametrize("name", CASES + UNBATCHED)
def test_fake_kernels_give_the_real_kernels_strides(backend, name, monkeypatch):
    """Every op's fake (meta) kernels give its outputs the strides its real kernels give them,
    whatever the inputs' layout. The fakes allocated with empty_like, which keeps an input's
    layout, where the kernels return contiguous tensors: torch.compile of a Glow moved to
    channels_last (a layout the README suggests on a CPU) failed in its backward ("expected
    size 24==24, stride 4==1 at dim=1" in actnorm_invconv_backward), and compiled code that
    does not check would read the gradients with the wrong strides."""
    # the public functions call their custom ops when compiling (else a faster eager path)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dev = device_for(backend)
    if name in UNBATCHED:
        fn, inputs, differentiable = _unbatched_cases(dev)[name]
    else:
        fn, inputs, _, _ = op_cases(dev, B)[name]
        differentiable = True
    _check_fake_strides(name, fn, inputs, differentiable)
