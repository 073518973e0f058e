"""The Triton kernels compute element offsets in 32-bit integers, so a tensor of 2^31 or more
elements would be addressed past the wrap-around (wrong memory read or written, silently).
Every launch goes through latentfast.kernels.launch, which refuses such tensors with a
ValueError: checked here by recording, under the interpreter, that each kernel that runs was
launched through it (every op forward and backward, the unbatched ops, the RNNs' per-step
path), and that a lowered limit makes each op raise.
"""
from __future__ import annotations

import pytest
import torch

import latentfast
from tests.conftest import backends_under_test, device_for, interpreting
from tests.ops.op_cases import CASES, op_cases
from tests.ops.test_layouts import UNBATCHED, _unbatched_cases

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(), reason="checks the Triton kernels' launches")
KERNEL_MODULES = ["dynamics", "flows", "geometry", "rnn", "vector_flows"]


def _all_calls(dev):
    """(name, thunk running the op forward and, where it has one, backward) for every op."""
    calls = []
    for name, (fn, inputs, _, _) in op_cases(dev, b=3).items():
        def run(fn=fn, inputs=inputs):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
            loss = sum(o.sum() for o in outs if o.requires_grad)
            torch.autograd.grad(loss, leaves, allow_unused=True)
        calls.append((name, run))
    for name, (fn, inputs, differentiable) in _unbatched_cases(dev).items():
        def run(fn=fn, inputs=inputs, differentiable=differentiable):
            leaves = [t.clone().requires_grad_(differentiable) for t in inputs]
            out = fn(*leaves)
            if differentiable:
                outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
                torch.autograd.grad(sum(o.sum() for o in outs), leaves, allow_unused=True)
        calls.append((name, run))
    return calls


@pytest.mark.skipif(not interpreting(), reason="records the interpreter's kernel runs")
def test_every_kernel_launch_is_checked(monkeypatch):
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    launched, ran = [], []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"latentfast.kernels.{mod_name}")

        def recording(kernel, grid, *args, _launch=mod.launch, **kwargs):
            launched.append(kernel.fn.__name__)
            return _launch(kernel, grid, *args, **kwargs)
        monkeypatch.setattr(mod, "launch", recording)
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        ran.append(self.fn.__name__)
        return run(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    rnn_kernels = importlib.import_module("latentfast.kernels.rnn")
    with latentfast.use_backend("triton"):
        for _, call in _all_calls(device_for("triton")):
            call()
        monkeypatch.setattr(rnn_kernels, "PERSISTENT", False)  # the per-step path's kernels too
        for name, call in _all_calls(device_for("triton")):
            if "sequence" in name:
                call()
    assert sorted(ran) == sorted(launched), (sorted(set(ran) - set(launched)), len(ran), len(launched))
    assert len(set(ran)) >= 20, sorted(set(ran))  # most of the kernels did run


@pytest.mark.parametrize("name", CASES + UNBATCHED)
def test_a_tensor_past_the_limit_raises(monkeypatch, name):
    """With the limit lowered below the test's own sizes, every op refuses (instead of
    launching a kernel whose offsets would wrap)."""
    import latentfast.kernels as kernels

    calls = dict(_all_calls(device_for("triton")))
    monkeypatch.setattr(kernels, "MAX_ELEMENTS", 5)
    with latentfast.use_backend("triton"):
        with pytest.raises(ValueError, match="32-bit offsets"):
            calls[name]()
    monkeypatch.setattr(kernels, "MAX_ELEMENTS", 2 ** 31 - 1)
    with latentfast.use_backend("triton"):
        calls[name]()
