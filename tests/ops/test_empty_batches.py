"""Every op on an empty batch (B = 0), on every backend: outputs of the documented shapes,
and a backward that gives zero gradients for the weights and empty ones for the inputs.

The Triton affine coupling failed here (it sized its grid from x[0]); the other kernels
launched empty grids already. An empty batch is what a data loader's last, filtered or
masked batch can be.
"""
from __future__ import annotations

import pytest
import torch

from latentfast.ops import dynamics as dyn_ops
from tests.conftest import device_for
from tests.ops.op_cases import CASES, op_cases
from tests.ops.op_cases import rnd as _rnd


@pytest.mark.parametrize("name", CASES)
def test_op_on_an_empty_batch(backend, name):
    dev = device_for(backend)
    fn, inputs, shapes, weights = op_cases(dev)[name]
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    flat = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    for i, shape in shapes:
        got = out if i is None else out[i]
        assert tuple(got.shape) == shape, (name, i, tuple(got.shape))
    loss = sum(o.sum() for o in flat if o.requires_grad)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for i, (t, g) in enumerate(zip(inputs, grads)):
        if g is None:
            assert i not in weights, (name, i)
            continue
        assert g.shape == t.shape
        if i in weights:
            assert bool((g == 0).all()), (name, i)


def test_lyapunov_ops_on_no_initial_states(backend):
    dev = device_for(backend)
    exps, state = dyn_ops.lorenz_lyapunov_spectrum("lorenz63", _rnd(0, 3, dev=dev), 3, 5)
    assert exps.shape == (0, 3) and state.shape == (0, 3)
    gru = (_rnd(18, 3, scale=0.4, dev=dev), _rnd(18, 6, scale=0.4, dev=dev), _rnd(18, dev=dev), _rnd(18, dev=dev))
    exps, state = dyn_ops.rnn_lyapunov_spectrum("gru", _rnd(0, 6, dev=dev), 2, 5, *gru,
                                                _rnd(3, 6, dev=dev), _rnd(3, dev=dev))
    assert exps.shape == (0, 2) and state.shape == (0, 6)
