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
from latentfast.ops import flows as flow_ops
from latentfast.ops import geometry as geo_ops
from latentfast.ops import rnn as rnn_ops
from latentfast.ops import vector_flows as vf_ops
from tests.conftest import device_for


def _rnd(*shape, scale=1.0, dev="cpu"):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dev)


def _cases(dev):
    def r(*shape, scale=1.0):
        return _rnd(*shape, scale=scale, dev=dev)

    w6 = torch.eye(6, dtype=torch.float64, device=dev) + r(6, 6, scale=0.1)
    vf = (r(2, 8, 4, scale=0.3), r(2, 8, scale=0.1), r(2, 8, 8, scale=0.3), r(2, 8, scale=0.1))
    gru = (r(18, 2, scale=0.4), r(18, 6, scale=0.4), r(18, scale=0.1), r(18, scale=0.1))
    lstm = (r(24, 2, scale=0.4), r(24, 6, scale=0.4), r(24, scale=0.1), r(24, scale=0.1))
    mlp = ([r(7, 2, scale=0.5), r(5, 7, scale=0.5)], [r(7, scale=0.1), r(5, scale=0.1)], [1, 0])
    # name: (fn, inputs with B = 0, [(output index, shape)], weights whose gradient must be zero)
    return {
        "actnorm_invconv": (flow_ops.actnorm_invconv, (r(0, 6, 3, 5), w6, r(6)), [(None, (0, 6, 3, 5))], (1, 2)),
        "actnorm_invconv_coupling": (lambda x, w, b, h: flow_ops.actnorm_invconv_coupling(x, w, b, h),
                                     (r(0, 6, 3, 5), w6, r(6), r(0, 6, 3, 5)), [(0, (0, 6, 3, 5)), (1, (0,))], (1, 2)),
        "actnorm_invconv_coupling additive": (lambda x, w, b, h: flow_ops.actnorm_invconv_coupling(x, w, b, h, True),
                                              (r(0, 6, 3, 5), w6, r(6), r(0, 3, 3, 5)),
                                              [(0, (0, 6, 3, 5)), (1, (0,))], (1, 2)),
        "affine_coupling": (flow_ops.affine_coupling, (r(0, 3, 3, 5), r(0, 6, 3, 5)), [(0, (0, 3, 3, 5)), (1, (0,))],
                            ()),
        "affine_coupling_inverse": (flow_ops.affine_coupling_inverse, (r(0, 3, 3, 5), r(0, 6, 3, 5)),
                                    [(0, (0, 3, 3, 5)), (1, (0,))], ()),
        "vector_flow_stack": (vf_ops.vector_flow_stack, (r(0, 4), *vf), [(0, (0, 4)), (1, (0,))], (1, 2, 3, 4)),
        "vector_flow_stack_inverse": (vf_ops.vector_flow_stack_inverse, (r(0, 4), *vf), [(0, (0, 4)), (1, (0,))],
                                      (1, 2, 3, 4)),
        "gru_sequence": (rnn_ops.gru_sequence, (r(3, 0, 2), r(0, 6), *gru), [(0, (3, 0, 6)), (1, (0, 6))],
                         (2, 3, 4, 5)),
        "lstm_sequence": (lambda x, *p: rnn_ops.lstm_sequence(x, None, *p), (r(3, 0, 2), *lstm),
                          [(0, (3, 0, 6))], (1, 2, 3, 4)),
        "pullback_metric": (lambda z, w0, w1, b0, b1: geo_ops.pullback_metric(z, [w0, w1], [b0, b1], mlp[2]),
                            (r(0, 2), *mlp[0], *mlp[1]), [(None, (0, 2, 2))], (1, 2, 3, 4)),
        "curve_energy": (lambda c, w0, w1, b0, b1: geo_ops.curve_energy(c, [w0, w1], [b0, b1], mlp[2]),
                         (r(0, 5, 2), *mlp[0], *mlp[1]), [(0, (0,)), (1, (0,))], (1, 2, 3, 4)),
    }


CASES = list(_cases("cpu"))


@pytest.mark.parametrize("name", CASES)
def test_op_on_an_empty_batch(backend, name):
    dev = device_for(backend)
    fn, inputs, shapes, weights = _cases(dev)[name]
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
