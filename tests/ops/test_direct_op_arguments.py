"""Direct torch.ops.latentfast calls with one argument of an inconsistent shape raise.

The public wrappers check their inputs, but the registered ops are callable on their own
(and their backward ops are what a custom autograd formula would call). The kernels index
raw pointers with sizes taken from a few arguments, so an argument whose shape does not fit
them must be refused: before the checks in csrc/common/checks.h and kernels.check_args, the
C++ vector_flow_bwd crashed on an `out` one column short, the C++ GRU / LSTM backward read
grad_out, c0 and the gates past their ends (and returned gradients), and the Triton launchers
(under the interpreter) corrupted the heap for 69 of the mutations below.

The reference backend is plain PyTorch: it raises or broadcasts, and never reads out of
bounds, so these tests run on the kernel backends.
"""
from __future__ import annotations

import pytest
import torch

import latentfast
from latentfast.ops import dynamics, flows, geometry, rnn, vector_flows  # noqa: F401  (registers the ops)
from tests.conftest import backends_under_test, device_for

L = torch.ops.latentfast


def _cases(dev) -> dict:
    """name: (op, args, {arg index: dims whose size may change freely}, arg indices to leave alone)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dev)

    n, c, hh, ww = 2, 4, 3, 5
    x, w, b, h = r(n, c, hh, ww), torch.eye(c, dtype=torch.float64, device=dev) + r(c, c, scale=0.1), r(c), \
        r(n, c, hh, ww)
    y2, _ = L.actnorm_invconv_coupling(x, w, b, h, False)
    xb, hb = r(n, 2, hh, ww), r(n, 4, hh, ww)
    k, bv, d, hv = 2, 5, 3, 8
    vf = (r(k, hv, d, scale=0.3), r(k, hv), r(k, 2 * d, hv, scale=0.3), r(k, 2 * d), r(k, d, scale=0.1))
    xv, ctx = r(bv, d), r(k, bv, hv)
    yv, _, xs, out = L.vector_flow_stack_train(xv, ctx, *vf, False)
    t, bs, ni, hs = 4, 3, 2, 5
    xr = r(t, bs, ni)
    gru = (r(3 * hs, ni, scale=0.4), r(3 * hs, hs, scale=0.4), r(3 * hs), r(3 * hs))
    lstm = (r(4 * hs, ni, scale=0.4), r(4 * hs, hs, scale=0.4), r(4 * hs), r(4 * hs))
    h0, c0 = r(bs, hs), r(bs, hs)
    gout, ggates = L.gru_sequence_train(xr, h0, *gru)
    lout, lcells, lgates = L.lstm_sequence_train(xr, h0, c0, *lstm)
    q0 = torch.linalg.qr(r(bs, hs, 2))[0]
    curves, mlp = r(2, 5, 2), ([r(7, 2, scale=0.5), r(6, 7, scale=0.5)], [r(7), r(6)], [1, 0])
    rbf = (r(4, 2), 0.5 + r(4).abs(), r(6, 4).abs(), 0.1)  # centres, bandwidths, weights [D, K], zeta
    if latentfast.backend.select(torch.device(dev)) != "reference":  # (curve_energy_train: the native backends)
        _, _, derivs, feats = L.curve_energy_train(curves, *mlp, None, None, None, 0.0)
        _, _, rbf_derivs, rbf_feats = L.curve_energy_train(curves, *mlp, *rbf)
    else:
        derivs = feats = rbf_derivs = rbf_feats = None
    return {
        "actnorm_invconv": (L.actnorm_invconv, (x, w, b), {0: (0, 2, 3)}, ()),
        "actnorm_invconv_coupling": (L.actnorm_invconv_coupling, (x, w, b, h, False), {0: (0, 2, 3)}, ()),
        "actnorm_invconv_backward mode 0": (L.actnorm_invconv_backward, (r(n, c, hh, ww), r(n), x, w, b, None, 0),
                                            {}, ()),
        # y (index 7) is optional: the C++ kernel checks it, Triton never reads it
        "actnorm_invconv_backward mode 2": (L.actnorm_invconv_backward, (r(n, c, hh, ww), r(n), x, w, b, h, 2, y2),
                                            {}, (7,)),
        "affine_coupling": (L.affine_coupling, (xb, hb, False), {}, ()),
        "affine_coupling_inverse": (L.affine_coupling_inverse, (xb, hb, False), {}, ()),
        "affine_coupling_backward": (L.affine_coupling_backward, (r(n, 2, hh, ww), r(n), xb, hb, False), {}, ()),
        "vector_flow_stack": (L.vector_flow_stack, (xv, ctx, *vf, False), {}, ()),
        "vector_flow_stack_train": (L.vector_flow_stack_train, (xv, ctx, *vf, False), {}, ()),
        "vector_flow_stack_inverse": (L.vector_flow_stack_inverse, (yv, ctx, *vf, False, 4), {}, ()),
        "vector_flow_stack_backward": (L.vector_flow_stack_backward,
                                       (r(bv, d), r(bv), xs, out, ctx, vf[0], vf[1], vf[2], vf[4], False), {}, ()),
        "gru_sequence": (L.gru_sequence, (xr, h0, *gru), {0: (0,)}, ()),
        "gru_sequence_backward": (L.gru_sequence_backward, (r(t, bs, hs), xr, h0, gru[0], gru[1], gout, ggates),
                                  {}, ()),
        "lstm_sequence": (L.lstm_sequence, (xr, h0, c0, *lstm), {0: (0,)}, ()),
        "lstm_sequence_backward": (L.lstm_sequence_backward,
                                   (r(t, bs, hs), r(t, bs, hs), xr, h0, c0, lstm[0], lstm[1], lout, lcells, lgates),
                                   {}, ()),
        # the saved activations are read as views of these sizes (a wrong layout silently before)
        "curve_energy_train_backward": (L.curve_energy_train_backward,
                                        (r(2), r(2), curves, derivs, feats, mlp[0], mlp[2], None, None, None), {}, ()),
        "curve_energy_train_backward rbf": (L.curve_energy_train_backward,
                                            (r(2), r(2), curves, rbf_derivs, rbf_feats, mlp[0], mlp[2], *rbf[:3]),
                                            {}, ()),
        # the RBF tensors (4-6): the reference and Triton paths had broadcast centres [K, 1] and a
        # single bandwidth; D of rbf_weight [D, K] is the sigma network's width (free)
        "pullback_metric rbf": (L.pullback_metric, (r(3, 2), *mlp, *rbf), {0: (0,), 6: (0,)}, ()),
        "curve_energy rbf": (L.curve_energy, (curves, *mlp, *rbf), {0: (0, 1), 6: (0,)}, ()),
        "rnn_lyapunov": (L.rnn_lyapunov, (h0, q0, r(hs, hs, scale=0.4), r(hs), 0, 3, 1, 0, 1.0), {1: (2,)}, ()),
    }


CASE_NAMES = list(_cases("cpu"))
# the kernel backends under test here (the reference is plain PyTorch, see above)
KERNEL_BACKENDS = [b for b in backends_under_test() if b != "reference"]


def _mutations(t: torch.Tensor, free: tuple[int, ...]):
    for dim in range(t.dim()):
        if dim in free:
            continue
        for delta in (1, -1):
            if t.shape[dim] + delta >= 0:
                shape = list(t.shape)
                shape[dim] += delta
                yield f"dim {dim} {delta:+d}", torch.zeros(shape, dtype=t.dtype, device=t.device)
    yield "float32", t.float()


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_an_argument_of_another_shape_or_dtype_raises(backend_name, name):
    with latentfast.use_backend(backend_name):
        _check_case(backend_name, name)


def _check_case(backend_name: str, name: str) -> None:
    op, args, free, leave = _cases(device_for(backend_name))[name]
    op(*args)  # the consistent call runs
    tried = 0
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or i in leave:
            continue
        for what, bad in _mutations(a, free.get(i, ())):
            call = list(args)
            call[i] = bad
            with pytest.raises((ValueError, RuntimeError)):
                op(*call)
                pytest.fail(f"{name}: argument {i} ({what}, shape {list(bad.shape)}) was accepted")
            tried += 1
    assert tried >= len(args)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_a_strided_copy_of_an_argument_gives_the_same_outputs(backend_name, name):
    """Each tensor argument given as a non-contiguous view of the same values (every other
    element of a wider buffer) gives the same outputs: the saved activations of
    curve_energy_train_backward with an RBF variance had raised "must be [p, D] CPU views with
    contiguous rows" from the C++ kernel."""
    with latentfast.use_backend(backend_name):
        op, args, _, _ = _cases(device_for(backend_name))[name]
        want = _outputs(op(*args))
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or a.dim() == 0:
                continue
            wide = torch.full((*a.shape[:-1], 2 * a.shape[-1]), float("nan"), dtype=a.dtype, device=a.device)
            strided = wide[..., ::2]
            strided.copy_(a)
            call = list(args)
            call[i] = strided
            for got, ref in zip(_outputs(op(*call)), want, strict=True):
                torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, equal_nan=True,
                                           msg=lambda m, i=i: f"{name}, argument {i} strided: {m}")


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", ["pullback_metric rbf", "curve_energy rbf"])
def test_the_geometry_ops_check_their_rbf_tensors_on_every_backend(backend, name):
    """The geometry ops check the RBF tensors of a direct call on every backend, the reference
    included (its torch ops had broadcast centres [K, 1] and a single bandwidth)."""
    _check_case(backend, name)
