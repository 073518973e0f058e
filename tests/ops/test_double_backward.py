"""Double backward (create_graph=True) through every differentiable op.

The kernels' backward results carry no graph of their own; under create_graph=True the ops
return the reference's gradients as a graph instead (latentfast/ops/_autograd.py). Here the
first and second derivatives (a Hessian-vector product) of every op, through the public
functions, are checked in float64 against PyTorch autograd through the pure-PyTorch
reference functions, called directly (never through a latentfast op).
"""
from __future__ import annotations

import pytest
import torch

from latentfast.ops import flows as fops
from latentfast.ops import geometry as gops
from latentfast.ops import rnn as rops
from latentfast.ops import vector_flows as vops
from latentfast.reference import flows as fref
from latentfast.reference import geometry as gref
from latentfast.reference import rnn as rref
from latentfast.reference import vector_flows as vref
from tests.conftest import assert_close, device_for

D = torch.float64


def _rnd(gen, *shape, scale=1.0, grad=True):
    return (scale * torch.randn(*shape, generator=gen, dtype=D)).requires_grad_(grad)


def _glow_map(gen):
    x, w, b = _rnd(gen, 2, 3, 3, 2), _rnd(gen, 5, 3, scale=0.5), _rnd(gen, 5, scale=0.1)
    return (x, w, b), (lambda x, w, b: (fops.actnorm_invconv(x, w, b),),
                       lambda x, w, b: (fref.actnorm_invconv(x, w, b),))


def _glow_coupling(additive):
    def make(gen):
        x, w, b = _rnd(gen, 2, 4, 3, 3), _rnd(gen, 4, 4, scale=0.5), _rnd(gen, 4, scale=0.1)
        h = _rnd(gen, 2, 2 if additive else 4, 3, 3)
        return (x, w, b, h), (lambda *a: fops.actnorm_invconv_coupling(*a, additive=additive),
                              lambda *a: fref.actnorm_invconv_coupling(*a, additive))
    return make


def _glow_coupling_custom_op(gen):
    """The custom op itself (what torch.compile traces), not the eager wrapper."""
    args, (_, slow) = _glow_coupling(False)(gen)
    return args, (lambda *a: torch.ops.latentfast.actnorm_invconv_coupling(*a, False), slow)


def _coupling(additive, inverse=False):
    def make(gen):
        x, h = _rnd(gen, 2, 3, 3, 2), _rnd(gen, 2, 3 if additive else 6, 3, 2)
        fast = fops.affine_coupling_inverse if inverse else fops.affine_coupling
        slow = fref.affine_coupling_inverse if inverse else fref.affine_coupling
        return (x, h), (lambda x, h: fast(x, h, additive), lambda x, h: slow(x, h, additive))
    return make


def _lu(gen):
    c = 5
    perm = torch.eye(c, dtype=D)[torch.randperm(c, generator=gen)]
    args = (perm, _rnd(gen, c, c, scale=0.3), _rnd(gen, c, c, scale=0.3), torch.tensor([1.0, -1, 1, 1, -1], dtype=D),
            _rnd(gen, c, scale=0.2))
    return args, (lambda *a: fops.lu_weight(*a)[:2], lambda *a: fref.lu_weight(*a))


def _stack(additive, with_ctx):
    def make(gen):
        k, b, d, h = 2, 5, 3, 4
        o = d if additive else 2 * d
        x = _rnd(gen, b, d)
        w1, b1 = _rnd(gen, k, h, d, scale=0.5), _rnd(gen, k, h, scale=0.1)
        w2, b2 = _rnd(gen, k, o, h, scale=0.5), _rnd(gen, k, o, scale=0.1)
        act = torch.tensor([[1.0, 0, 1], [0, 1, 1]], dtype=D)
        c = _rnd(gen, k, b, h, scale=0.3) if with_ctx else None

        def fast(x, w1, b1, w2, b2, c):
            return vops.vector_flow_stack(x, w1, b1, w2, b2, act.to(x), c, additive)

        def slow(x, w1, b1, w2, b2, c):
            return vref.vector_flow_stack(x, c, w1, b1, w2, b2, act.to(x), additive)[:2]
        return (x, w1, b1, w2, b2, c), (fast, slow)
    return make


def _stack_inverse(gen):
    """The slow direction with MADE masks (its sweeps then give the exact inverse)."""
    from latentfast.flows import vector as vf

    k, b, d, h = 2, 4, 3, 5
    m1, m2 = vf.made_masks(*vf.made_degrees(d, h, torch.arange(d)), 2)
    m1, m2 = m1.to(D), m2.to(D)
    y = _rnd(gen, b, d)
    w1, b1 = _rnd(gen, k, h, d, scale=0.5), _rnd(gen, k, h, scale=0.1)
    w2 = _rnd(gen, k, 2 * d, h, scale=0.3)
    b2 = (0.1 * torch.randn(k, 2 * d, generator=gen, dtype=D) + torch.tensor([0.0] * d + [2.0] * d, dtype=D)
          ).requires_grad_()  # gates near sigmoid(2), as the modules start

    def fast(y, w1, b1, w2, b2):
        return vops.vector_flow_stack_inverse(y, w1 * m1.to(y), b1, w2 * m2.to(y), b2)

    def slow(y, w1, b1, w2, b2):
        return vref.vector_flow_stack_inverse(y, None, w1 * m1.to(y), b1, w2 * m2.to(y), b2,
                                              torch.ones(k, d, dtype=y.dtype), False, d)
    return (y, w1, b1, w2, b2), (fast, slow)


def _stack_custom_ops(train):
    def make(gen):
        args, (_, slow) = _stack(False, True)(gen)
        act = torch.tensor([[1.0, 0, 1], [0, 1, 1]], dtype=D)
        op = torch.ops.latentfast.vector_flow_stack_train if train else torch.ops.latentfast.vector_flow_stack

        def fast(x, w1, b1, w2, b2, c):
            return op(x, c, w1, b1, w2, b2, act.to(x), False)[:2]
        return args, (fast, slow)
    return make


def _gru(gen):
    t, b, i, h = 3, 2, 3, 4
    args = (_rnd(gen, t, b, i), _rnd(gen, b, h), _rnd(gen, 3 * h, i, scale=0.5), _rnd(gen, 3 * h, h, scale=0.5),
            _rnd(gen, 3 * h, scale=0.1), _rnd(gen, 3 * h, scale=0.1))
    return args, (lambda *a: (rops.gru_sequence(*a)[0],), lambda *a: (rref.gru_sequence(*a)[0],))


def _lstm(gen):
    t, b, i, h = 3, 2, 3, 4
    x, h0, c0 = _rnd(gen, t, b, i), _rnd(gen, b, h), _rnd(gen, b, h)
    w = (_rnd(gen, 4 * h, i, scale=0.5), _rnd(gen, 4 * h, h, scale=0.5), _rnd(gen, 4 * h, scale=0.1),
         _rnd(gen, 4 * h, scale=0.1))

    def fast(x, h0, c0, *w):
        out, (hn, cn) = rops.lstm_sequence(x, (h0, c0), *w)
        return out, cn

    def slow(x, h0, c0, *w):
        out, cells, _ = rref.lstm_sequence(x, h0, c0, *w)
        return out, cells[-1]
    return (x, h0, c0, *w), (fast, slow)


def _decoder(gen, params_grad):
    dims = [2, 5, 4, 6]
    ws = [_rnd(gen, b, a, scale=0.6, grad=params_grad) for a, b in zip(dims[:-1], dims[1:])]
    bs = [_rnd(gen, b, scale=0.1, grad=params_grad) for b in dims[1:]]
    rbf = (_rnd(gen, 3, 2, grad=params_grad), (0.5 + torch.rand(3, generator=gen, dtype=D)).requires_grad_(params_grad),
           torch.rand(6, 3, generator=gen, dtype=D).requires_grad_(params_grad))
    return ws, bs, rbf


def _metric(params_grad):
    def make(gen):
        ws, bs, (c, lam, wr) = _decoder(gen, params_grad)
        z = _rnd(gen, 4, 2)
        acts = [1, 2, 0]

        def fast(z, *p):
            return (gops.pullback_metric(z, list(p[0:3]), list(p[3:6]), acts, *p[6:], zeta=0.05),)

        def slow(z, *p):
            return (gref.pullback_metric(z, list(p[0:3]), list(p[3:6]), acts, *p[6:], 0.05),)
        return (z, *ws, *bs, c, lam, wr), (fast, slow)
    return make


def _curve(params_grad):
    def make(gen):
        ws, bs, (c, lam, wr) = _decoder(gen, params_grad)
        curves = _rnd(gen, 2, 4, 2)
        acts = [1, 3, 4]

        def fast(z, *p):
            return gops.curve_energy(z, list(p[0:3]), list(p[3:6]), acts, *p[6:], zeta=0.05)

        def slow(z, *p):
            return gref.curve_energy(z, list(p[0:3]), list(p[3:6]), acts, *p[6:], 0.05)
        return (curves, *ws, *bs, c, lam, wr), (fast, slow)
    return make


CASES = {
    "actnorm_invconv": _glow_map,
    "glow_coupling_affine": _glow_coupling(False),
    "glow_coupling_additive": _glow_coupling(True),
    "glow_coupling_custom_op": _glow_coupling_custom_op,
    "affine_coupling": _coupling(False),
    "additive_coupling": _coupling(True),
    "affine_coupling_inverse": _coupling(False, inverse=True),
    "lu_weight": _lu,
    "vector_flow_stack": _stack(False, False),
    "vector_flow_stack_ctx": _stack(False, True),
    "vector_flow_stack_additive": _stack(True, False),
    "vector_flow_stack_inverse": _stack_inverse,
    "vector_flow_stack_op": _stack_custom_ops(False),
    "vector_flow_stack_train_op": _stack_custom_ops(True),
    "gru_sequence": _gru,
    "lstm_sequence": _lstm,
    "pullback_metric": _metric(False),
    "pullback_metric_params": _metric(True),
    "curve_energy": _curve(False),  # the training path: activations kept, only the curves want grads
    "curve_energy_params": _curve(True),
}


def _first_and_second(fn, inputs, gen):
    """First derivatives of a random projection of fn's outputs (with create_graph=True),
    then the derivatives of a random projection of those (a Hessian-vector product)."""
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = fn(*inputs)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=D).to(o.device)).sum() for o in outs)
    g1 = torch.autograd.grad(loss, wanted, create_graph=True, allow_unused=True)
    g1 = [torch.zeros_like(t) if g is None else g for g, t in zip(g1, wanted)]
    loss2 = sum((g * torch.randn(g.shape, generator=gen, dtype=D).to(g.device)).sum() for g in g1)
    if not loss2.requires_grad:  # first derivatives that are constants (a linear op)
        return g1, [torch.zeros_like(t) for t in wanted]
    g2 = torch.autograd.grad(loss2, wanted, allow_unused=True)
    return g1, [torch.zeros_like(t) if g is None else g for g, t in zip(g2, wanted)]


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_matches_reference(backend, name):
    gen = torch.Generator().manual_seed(7)
    inputs, (fast, slow) = CASES[name](gen)
    dev = device_for(backend)
    inputs = tuple(t.detach().to(dev).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                   for t in inputs)
    f1, f2 = _first_and_second(fast, inputs, torch.Generator().manual_seed(11))
    r1, r2 = _first_and_second(slow, inputs, torch.Generator().manual_seed(11))
    # the check needs non-zero second derivatives (the additive coupling is linear)
    assert any(r.abs().max() > 0 for r in r2) == (name != "additive_coupling")
    for i, (a, b) in enumerate(zip(f1, r1)):
        assert_close(a, b, scale=10, msg=f"{name}: first derivative {i}")
    for i, (a, b) in enumerate(zip(f2, r2)):
        assert_close(a, b, scale=10, msg=f"{name}: second derivative {i}")


def test_plain_backward_does_not_take_the_reference_path(monkeypatch):
    """loss.backward() without create_graph keeps the kernels' backward (the reference path
    is for create_graph=True only)."""
    from latentfast.ops import _autograd

    calls = []
    real = _autograd.reference_vjp
    monkeypatch.setattr(fops, "reference_vjp", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    (x, w, b, h), (fast, _) = _glow_coupling(False)(gen)
    y, ld = fast(x, w, b, h)
    (y.sum() + ld.sum()).backward()
    assert not calls
    y, ld = fast(x, w, b, h)
    torch.autograd.grad(y.pow(2).sum() + ld.sum(), x, create_graph=True)
    assert calls
