"""Forward-mode AD and torch.func transforms (vmap, jvp, grad) through every differentiable op.

The kernels give no tangents and no batching, so under these the public functions compute with
the reference (latentfast/ops/_autograd.py). Each case of test_double_backward.CASES is checked
against the same transform applied to the pure-PyTorch reference function, in float64.
Batched gradients too: torch.autograd.grad(..., is_grads_batched=True), what
torch.autograd.functional.jacobian / hessian(vectorize=True) and gradcheck(check_batched_grad=
True) run, puts the backward under PyTorch's older vmap, whose tensors have no storage for a
kernel and no batching rule for some of the reference's operations (einsum).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad

from latentfast.ops import dynamics as dops
from latentfast.ops import geometry as gops
from tests.conftest import assert_close, device_for
from tests.ops.test_double_backward import CASES as _ALL_CASES
from tests.ops.test_double_backward import D

# The public functions and test_double_backward's direct custom-op cases (every op called
# directly: DIRECT below).
CASES = _ALL_CASES


def _case(name, backend):
    """(inputs, without autograd; indices of the inputs that the case differentiates; fast; slow)"""
    inputs, (fast, slow) = CASES[name](torch.Generator().manual_seed(5))
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    dev = device_for(backend)
    inputs = tuple(t.detach().to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
    return inputs, wanted, fast, slow


def _tangents(inputs, wanted):
    gen = torch.Generator().manual_seed(9)
    return {i: torch.randn(inputs[i].shape, generator=gen, dtype=D).to(inputs[i].device) for i in wanted}


def _check_forward_ad(name, inputs, wanted, fast, slow):
    """fast's outputs and tangents under torch.autograd.forward_ad against slow's."""
    tangents = _tangents(inputs, wanted)
    res = []
    for fn in (fast, slow):
        with fwad.dual_level():
            args = [fwad.make_dual(t, tangents[i]) if i in tangents else t for i, t in enumerate(inputs)]
            res.append([(fwad.unpack_dual(o).primal, fwad.unpack_dual(o).tangent) for o in fn(*args)])
    assert any(tb is not None and tb.abs().max() > 0 for _, tb in res[1]), "the check needs a non-zero tangent"
    for k, ((pa, ta), (pb, tb)) in enumerate(zip(*res)):
        tb = torch.zeros_like(pb) if tb is None else tb
        assert ta is not None or tb.abs().max() == 0, f"{name}: output {k} lost its tangent"
        ta = torch.zeros_like(pa) if ta is None else ta
        assert_close(pa, pb, scale=10, msg=f"{name}: output {k}")
        assert_close(ta, tb, scale=10, msg=f"{name}: tangent of output {k}")


def _along(fn, inputs, i0):
    """fn as a function of its input i0 alone, returning a tuple."""
    return lambda t: tuple(fn(*inputs[:i0], t, *inputs[i0 + 1:]))


def _check_jvp_and_grad(name, inputs, wanted, fast, slow):
    """torch.func.jvp and torch.func.grad (of a random projection) of fast against slow, along
    the first differentiated input."""
    i0 = wanted[0]
    tangent = _tangents(inputs, wanted)[i0]
    jf = torch.func.jvp(_along(fast, inputs, i0), (inputs[i0],), (tangent,))[1]
    js = torch.func.jvp(_along(slow, inputs, i0), (inputs[i0],), (tangent,))[1]
    assert any(b.abs().max() > 0 for b in js), "the check needs a non-zero directional derivative"
    for k, (a, b) in enumerate(zip(jf, js)):
        assert_close(a, b, scale=10, msg=f"{name}: jvp of output {k}")

    def projected(fn):
        def f(t):
            gen = torch.Generator().manual_seed(13)
            return sum((o * torch.randn(o.shape, generator=gen, dtype=D).to(o.device)).sum()
                       for o in _along(fn, inputs, i0)(t))
        return f

    assert_close(torch.func.grad(projected(fast))(inputs[i0]), torch.func.grad(projected(slow))(inputs[i0]),
                 scale=10, msg=f"{name}: torch.func.grad")


def _check_vmap(name, inputs, wanted, fast, slow):
    """torch.func.vmap of fast over two values of the first differentiated input against slow
    on each."""
    i0 = wanted[0]
    gen = torch.Generator().manual_seed(17)
    batch = torch.stack([inputs[i0], inputs[i0] + 0.1 * torch.randn(inputs[i0].shape, generator=gen, dtype=D)
                         .to(inputs[i0].device)])
    got = torch.func.vmap(_along(fast, inputs, i0))(batch)
    for k, o in enumerate(got):
        for j in range(2):
            assert_close(o[j], _along(slow, inputs, i0)(batch[j])[k], scale=10,
                         msg=f"{name}: vmap output {k}, item {j}")


@pytest.mark.parametrize("name", list(CASES))
def test_forward_ad_matches_reference(backend, name):
    _check_forward_ad(name, *_case(name, backend))


@pytest.mark.parametrize("name", list(CASES))
def test_func_jvp_and_grad_match_reference(backend, name):
    _check_jvp_and_grad(name, *_case(name, backend))


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_reference(backend, name):
    _check_vmap(name, *_case(name, backend))


def test_non_differentiable_ops_refuse_transforms():
    x0 = torch.randn(2, 3, dtype=D)
    with pytest.raises(ValueError, match="not differentiable"):
        torch.func.vmap(lambda x: dops.lorenz_lyapunov_spectrum("lorenz63", x[None], 3, 5)[0])(x0)
    s0 = torch.randn(2, 4, dtype=D)
    w = [torch.randn(12, 4, dtype=D), torch.randn(12, 4, dtype=D), torch.zeros(12, dtype=D), torch.zeros(12, dtype=D)]
    with fwad.dual_level(), pytest.raises(ValueError, match="not differentiable"):
        dops.rnn_lyapunov_spectrum("gru", fwad.make_dual(s0, torch.ones_like(s0)), 2, 5, *w)
    curves = torch.randn(2, 4, 2, dtype=D)
    ws, bs = [torch.randn(3, 2, dtype=D)], [torch.zeros(3, dtype=D)]
    with pytest.raises(ValueError, match="torch.func"):
        torch.func.jvp(lambda c: gops.curve_energy_and_grad(c, ws, bs, [0])[0], (curves,), (torch.ones_like(curves),))


def _direct_cases():
    """Every registered op with a reference route, called directly: name -> (inputs, indices of
    the inputs given tangents, the reference function with the op's outputs). Small float64
    shapes; the backward ops get consistent saved activations from the reference forward."""
    gen = torch.Generator().manual_seed(21)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=D) * scale

    from latentfast.reference import flows as fref
    from latentfast.reference import geometry as gref
    from latentfast.reference import rnn as rref
    from latentfast.reference import vector_flows as vref

    x, w, b, h = r(2, 4, 3, 2), torch.eye(4, dtype=D) + r(4, 4, scale=0.3), r(4, scale=0.1), r(2, 4, 3, 2)
    xb, gy, gl = r(2, 2, 3, 2), r(2, 4, 3, 2), r(2)
    c = 4
    lu = (torch.eye(c, dtype=D)[torch.randperm(c, generator=gen)], r(c, c), r(c, c),
          torch.tensor([1., -1, 1, 1], dtype=D), r(c, scale=0.3))
    ws = [r(5, 2, scale=0.6), r(4, 5, scale=0.6), r(6, 4, scale=0.6)]
    bs = [r(5, scale=0.1), r(4, scale=0.1), r(6, scale=0.1)]
    rbf = (r(3, 2), 0.5 + torch.rand(3, generator=gen, dtype=D), torch.rand(6, 3, generator=gen, dtype=D))
    geo = (ws, bs, [1, 3, 4], *rbf, 0.05)
    z, curves, ge, gle = r(4, 2), r(2, 4, 2), r(2), r(2)
    T, B, I, H = 3, 2, 2, 3
    xs_rnn, h0, c0 = r(T, B, I), r(B, H, scale=0.5), r(B, H, scale=0.5)
    gru_w = (r(3 * H, I, scale=0.5), r(3 * H, H, scale=0.5), r(3 * H, scale=0.1), r(3 * H, scale=0.1))
    lstm_w = (r(4 * H, I, scale=0.5), r(4 * H, H, scale=0.5), r(4 * H, scale=0.1), r(4 * H, scale=0.1))
    g_out, g_cells = r(T, B, H), r(T, B, H)
    gru_out, gru_gates = rref.gru_sequence(xs_rnn, h0, *gru_w)
    lstm_out, lstm_cells, lstm_gates = rref.lstm_sequence(xs_rnn, h0, c0, *lstm_w)
    K, d, Hv = 2, 3, 4
    mask1 = (torch.arange(Hv)[:, None] % (d - 1) + 1 >= torch.arange(d)[None, :] + 1).to(D)
    mask2 = (torch.arange(d)[:, None] + 1 > torch.arange(Hv)[None, :] % (d - 1) + 1).to(D)
    w1, b1 = r(K, Hv, d) * mask1, r(K, Hv, scale=0.1)
    w2, b2 = r(K, 2 * d, Hv, scale=0.5) * torch.cat([mask2, mask2]), r(K, 2 * d, scale=0.1)
    act, ctx, xv = torch.ones(K, d, dtype=D), r(K, 2, Hv, scale=0.3), r(2, d)
    yv, _, xs_v, out_v = vref.vector_flow_stack(xv, ctx, w1, b1, w2, b2, act, False)
    vf = (ctx, w1, b1, w2, b2, act, False)
    return {
        "actnorm_invconv": ((x, w, b), [0, 1, 2], lambda *a: (fref.actnorm_invconv(*a),)),
        "actnorm_invconv_coupling": ((x, w, b, h, False), [0, 1, 3], fref.actnorm_invconv_coupling),
        "actnorm_invconv_backward": ((gy, gl, x, w, b, h, 2), [0, 2, 3, 5], fref.actnorm_invconv_backward),
        "affine_coupling": ((xb, h, False), [0, 1], fref.affine_coupling),
        "affine_coupling_inverse": ((xb, h, False), [0, 1], fref.affine_coupling_inverse),
        "affine_coupling_backward": ((xb, gl, xb * 0.5, h, False), [0, 2, 3], fref.affine_coupling_backward),
        "lu_weight": (lu, [1, 2, 4], fref.lu_weight),
        "lu_weight_backward": ((*lu, fref.lu_weight(*lu)[1], r(c, c), r(c, c)), [1, 2, 4, 6, 7], fref.lu_weight_backward),
        "pullback_metric": ((z, *geo), [0], lambda *a: (gref.pullback_metric(*a),)),
        "curve_energy": ((curves, *geo), [0], gref.curve_energy),
        "curve_energy_backward": ((ge, gle, curves, *geo), [0, 2], lambda *a: (gref.curve_energy_backward(*a),)),
        "gru_sequence": ((xs_rnn, h0, *gru_w), [0, 1, 3], lambda *a: rref.gru_sequence(*a)[:1]),
        "gru_sequence_train": ((xs_rnn, h0, *gru_w), [0, 2], rref.gru_sequence),
        "gru_sequence_backward": ((g_out, xs_rnn, h0, *gru_w[:2], gru_out, gru_gates), [0, 2, 4, 5],
                                  rref.gru_sequence_backward),
        "lstm_sequence": ((xs_rnn, h0, c0, *lstm_w), [0, 2, 4], lambda *a: rref.lstm_sequence(*a)[:2]),
        "lstm_sequence_train": ((xs_rnn, h0, c0, *lstm_w), [1, 3], rref.lstm_sequence),
        "lstm_sequence_backward": ((g_out, g_cells, xs_rnn, h0, c0, *lstm_w[:2], lstm_out, lstm_cells, lstm_gates),
                                   [0, 1, 3, 6, 8], rref.lstm_sequence_backward),
        "vector_flow_stack": ((xv, *vf), [0, 1, 2, 4], lambda *a: vref.vector_flow_stack(*a)[:2]),
        "vector_flow_stack_train": ((xv, *vf), [0, 4], vref.vector_flow_stack),
        "vector_flow_stack_backward": ((r(2, d), r(2), xs_v, out_v, ctx, w1, b1, w2, act, False), [0, 1, 2, 3, 5],
                                       vref.vector_flow_stack_backward),
        "vector_flow_stack_inverse": ((yv, *vf, d), [0, 2, 5], vref.vector_flow_stack_inverse),
    }


DIRECT = _direct_cases()


def _direct(name, backend):
    inputs, wanted, ref_fn = DIRECT[name]
    dev = device_for(backend)

    def mv(t):
        if isinstance(t, list):
            return [mv(u) for u in t]
        return t.to(dev) if isinstance(t, torch.Tensor) else t
    inputs = tuple(mv(t) for t in inputs)
    op = getattr(torch.ops.latentfast, name)

    def fast(*a):
        out = op(*a)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return inputs, wanted, fast, lambda *a: tuple(ref_fn(*a))


def test_every_op_has_a_direct_case_or_refuses():
    from latentfast.ops._autograd import ROUTED, registered_ops
    registered = registered_ops()
    assert set(registered) == set(ROUTED), "an op without the transform route"
    assert {n.split("::")[1] for n in registered if ROUTED[n]} == set(DIRECT)


@pytest.mark.parametrize("name", list(DIRECT))
def test_registered_ops_called_directly_under_forward_ad(backend, name):
    """A registered op called directly (torch.ops.latentfast.*) on dual tensors gives the
    reference's outputs and tangents (the transform route, ops/_autograd.py; before it, a
    silent zero directional derivative under torch.func.jvp). With a dual level open and no
    tangent on its inputs, the backend's kernel runs as usual."""
    inputs, wanted, fast, slow = _direct(name, backend)
    want = [o.clone() for o in fast(*inputs)]
    with fwad.dual_level():
        for a, b in zip(fast(*inputs), want):
            assert_close(a, b, msg=f"{name}: no tangents under a dual level")
    _check_forward_ad(name, inputs, wanted, fast, slow)


@pytest.mark.parametrize("name", list(DIRECT))
def test_registered_ops_called_directly_under_func_jvp_and_grad(backend, name):
    _check_jvp_and_grad(name, *_direct(name, backend))


@pytest.mark.parametrize("name", list(DIRECT))
def test_registered_ops_called_directly_under_vmap(backend, name):
    """vmap of a direct call: the op's vmap rule calls it once per item (PyTorch's own
    fallback cannot be generated for the geometry ops' Tensor[] arguments)."""
    _check_vmap(name, *_direct(name, backend))


def test_ops_without_a_reference_route_raise_under_transforms():
    """The Lyapunov ops and the saved-activation curve-energy pair have no reference
    formulation for the route: called directly under a transform they raise, never return
    outputs without tangents."""
    from latentfast.reference import dynamics as dref
    x0, q0 = torch.randn(2, 3, dtype=D), torch.linalg.qr(torch.randn(2, 3, 2, dtype=D))[0]
    ops = torch.ops.latentfast
    lorenz = lambda x: ops.lorenz_lyapunov(x, q0, 0, 10.0, 28.0, 8 / 3, 0.01, 5, 1, 0)[0]
    with pytest.raises(RuntimeError, match="supports no forward-mode AD"):
        torch.func.jvp(lorenz, (x0,), (torch.ones_like(x0),))
    with fwad.dual_level(), pytest.raises(RuntimeError, match="supports no forward-mode AD"):
        lorenz(fwad.make_dual(x0, torch.ones_like(x0)))
    with pytest.raises(RuntimeError, match="supports no forward-mode AD"):
        torch.func.grad(lambda x: lorenz(x).sum())(x0)
    mat, bias = dref.rnn_tangent_matrices("gru", torch.randn(9, 3, dtype=D), torch.randn(9, 3, dtype=D),
                                          torch.zeros(9, dtype=D), torch.zeros(9, dtype=D), None)
    with pytest.raises(RuntimeError, match="supports no forward-mode AD"):
        torch.func.jvp(lambda s: ops.rnn_lyapunov(s, q0, mat, bias, 1, 5, 1, 0, 0.0)[0], (x0,), (x0,))
    curves, ws, bs = torch.randn(2, 4, 2, dtype=D), [torch.randn(3, 2, dtype=D)], [torch.zeros(3, dtype=D)]
    with pytest.raises(RuntimeError, match="supports no forward-mode AD"):
        torch.func.jvp(lambda c: ops.curve_energy_train(c, ws, bs, [1], None, None, None, 0.0)[0], (curves,),
                       (curves,))


def test_kernels_below_autograd_still_refuse_tangents():
    """reject_tangents, first in every kernel, still catches dual tensors that reach a kernel
    past the autograd key (here by dispatching below it)."""
    x, h = torch.randn(2, 3, 3, 2, dtype=D), torch.randn(2, 6, 3, 2, dtype=D)
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.ones_like(x))
        with torch._C._AutoDispatchBelowAutograd(), pytest.raises(RuntimeError, match="no forward-mode AD rule"):
            torch.ops.latentfast.affine_coupling(dual, h, False)


def test_every_registered_op_kernel_checks_for_tangents():
    """Each latentfast:: custom op's Python kernel starts with reject_tangents (the behaviour
    is checked above on a sample of ops; this keeps a new op from leaving it out)."""
    import ast
    import pathlib

    import latentfast.ops as ops_pkg
    found = {}
    for path in pathlib.Path(ops_pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        kernels = {}
        for node in ast.walk(tree):  # @custom_op("latentfast::name") def f / name = custom_op("latentfast::name")(f)
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "custom_op":
                        kernels[node.name] = dec.args[0].value
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Call) \
                    and getattr(node.func.func, "attr", "") == "custom_op":
                kernels[node.args[0].id] = node.func.args[0].value
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in kernels:
                first = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))][0]
                call = first.value if isinstance(first, ast.Expr) else None
                ok = isinstance(call, ast.Call) and getattr(call.func, "id", "") == "reject_tangents"
                found[kernels[node.name]] = ok and call.args[0].value == kernels[node.name].split("::")[1]
    from latentfast.ops._autograd import registered_ops
    assert set(found) == set(registered_ops())
    assert all(found.values()), [k for k, v in found.items() if not v]


def test_info_reports_the_route(capsys):
    """`python -m latentfast info` says for how many ops the route is installed (how a GPU
    machine's PyTorch shows whether it took it)."""
    import re

    from latentfast.__main__ import info
    info()
    m = re.search(r"route installed for (\d+) of (\d+) ops", capsys.readouterr().out)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 24


def _check_batched_grads(name, inputs, wanted, fast, slow):
    """torch.autograd.grad with three cotangents per output at once (is_grads_batched=True)
    through fast, against slow's gradients one cotangent at a time."""
    gen = torch.Generator().manual_seed(19)
    leaves = [t.requires_grad_() if i in wanted else t for i, t in enumerate(inputs)]
    targets = [leaves[i] for i in wanted]
    outs = [o for o in fast(*leaves) if o.requires_grad]
    cots = [torch.randn((3, *o.shape), generator=gen, dtype=D).to(o.device) for o in outs]
    got = torch.autograd.grad(outs, targets, cots, is_grads_batched=True, allow_unused=True)
    # the reference's outputs in the same order; a constant one (the additive log-det) adds nothing
    slow_pairs = [(o, c) for o, c in zip(slow(*leaves), cots) if o.requires_grad]
    for j in range(3):
        want = torch.autograd.grad([o for o, _ in slow_pairs], targets, [c[j] for _, c in slow_pairs],
                                   retain_graph=True, allow_unused=True)
        for k, (g, w, t) in enumerate(zip(got, want, targets)):
            g = torch.zeros((3, *t.shape), dtype=D, device=t.device) if g is None else g
            w = torch.zeros_like(t) if w is None else w
            assert_close(g[j], w, scale=10, msg=f"{name}: batched gradient {k}, cotangent {j}")


@pytest.mark.parametrize("name", list(CASES))
def test_batched_gradients_match_reference(backend, name):
    _check_batched_grads(name, *_case(name, backend))


def test_vectorized_jacobian_of_a_glow_step_and_a_flow(backend):
    """torch.autograd.functional.jacobian(vectorize=True) of layers built on the ops equals the
    row-by-row jacobian."""
    from latentfast.flows import MAF, Flow, GlowStep, LULinear

    dev = device_for(backend)
    torch.manual_seed(0)
    step = GlowStep(4, hidden=8).to(dev, D)
    x = torch.randn(2, 4, 3, 3, dtype=D, device=dev)
    step(x)  # ActNorm's initialisation
    flow = Flow(3, [MAF(3, 8, n_steps=2), LULinear(3)]).to(dev, D)
    z = torch.randn(4, 3, dtype=D, device=dev)
    for fn, arg in ((lambda t: step(t)[0], x), (lambda t: step.inverse(t), x), (flow.log_prob, z)):
        fast = torch.autograd.functional.jacobian(fn, arg, vectorize=True)
        slow = torch.autograd.functional.jacobian(fn, arg)
        assert slow.abs().max() > 0
        assert_close(fast, slow, scale=10)
