"""Forward-mode AD and torch.func transforms (vmap, jvp, grad) through every differentiable op.

The kernels give no tangents and no batching, so under these the public functions compute with
the reference (latentfast/ops/_autograd.py). Each case of test_double_backward.CASES is checked
against the same transform applied to the pure-PyTorch reference function, in float64.
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

# The public functions; the registered custom ops called directly (torch.ops.latentfast.*)
# are left out: PyTorch gives custom ops no forward-mode AD (see the README).
CASES = {k: v for k, v in _ALL_CASES.items() if not k.endswith("_op")}


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


@pytest.mark.parametrize("name", list(CASES))
def test_forward_ad_matches_reference(backend, name):
    inputs, wanted, fast, slow = _case(name, backend)
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


@pytest.mark.parametrize("name", list(CASES))
def test_func_jvp_and_grad_match_reference(backend, name):
    inputs, wanted, fast, slow = _case(name, backend)
    i0 = wanted[0]
    tangent = _tangents(inputs, wanted)[i0]

    def along(fn):
        def f(t):
            return fn(*inputs[:i0], t, *inputs[i0 + 1:])
        return f

    jf = torch.func.jvp(along(fast), (inputs[i0],), (tangent,))[1]
    js = torch.func.jvp(along(slow), (inputs[i0],), (tangent,))[1]
    assert any(b.abs().max() > 0 for b in js), "the check needs a non-zero directional derivative"
    for k, (a, b) in enumerate(zip(jf, js)):
        assert_close(a, b, scale=10, msg=f"{name}: jvp of output {k}")

    def projected(fn):
        def f(t):
            outs = along(fn)(t)
            gen = torch.Generator().manual_seed(13)
            return sum((o * torch.randn(o.shape, generator=gen, dtype=D).to(o.device)).sum() for o in outs)
        return f

    assert_close(torch.func.grad(projected(fast))(inputs[i0]), torch.func.grad(projected(slow))(inputs[i0]),
                 scale=10, msg=f"{name}: torch.func.grad")


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_reference(backend, name):
    inputs, wanted, fast, slow = _case(name, backend)
    i0 = wanted[0]
    gen = torch.Generator().manual_seed(17)
    batch = torch.stack([inputs[i0], inputs[i0] + 0.1 * torch.randn(inputs[i0].shape, generator=gen, dtype=D)
                         .to(inputs[i0].device)])

    def along(fn):
        def f(t):
            return tuple(fn(*inputs[:i0], t, *inputs[i0 + 1:]))
        return f

    got = torch.func.vmap(along(fast))(batch)
    for k, o in enumerate(got):
        for j in range(2):
            assert_close(o[j], along(slow)(batch[j])[k], scale=10, msg=f"{name}: vmap output {k}, item {j}")


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


OP_CASES = [k for k in _ALL_CASES if k.endswith("_op")]


@pytest.mark.parametrize("name", OP_CASES + ["direct_ops"])
def test_registered_ops_called_directly_refuse_tangents(backend, name):
    """A registered op called directly (torch.ops.latentfast.*) on dual tensors that do not
    require grad raises instead of returning outputs without a tangent (a silent zero
    directional derivative: PyTorch gives custom ops no forward-mode rule); with a dual level
    open but no tangent on its inputs it runs as usual."""
    dev = device_for(backend)
    if name == "direct_ops":
        gen = torch.Generator().manual_seed(3)
        x, h = torch.randn(2, 3, 3, 2, generator=gen, dtype=D), torch.randn(2, 6, 3, 2, generator=gen, dtype=D)
        c = 4
        lu = (torch.eye(c, dtype=D)[torch.randperm(c, generator=gen)], torch.randn(c, c, generator=gen, dtype=D).tril(-1),
              torch.randn(c, c, generator=gen, dtype=D).triu(1), torch.ones(c, dtype=D),
              torch.randn(c, generator=gen, dtype=D))
        z, w = torch.randn(5, 2, generator=gen, dtype=D), torch.randn(3, 2, generator=gen, dtype=D)
        bias = torch.zeros(3, dtype=D)
        inputs = (x, h, *lu, z, w, bias)
        wanted = [0, 5, 7]

        def fast(x, h, perm, lower, upper, sign_s, log_abs_s, z, w, bias):
            ops = torch.ops.latentfast
            return (ops.affine_coupling(x, h, False)[0], ops.lu_weight(perm, lower, upper, sign_s, log_abs_s)[0],
                    ops.pullback_metric(z, [w], [bias], [0], None, None, None, 0.0))
        cases = [(inputs, [j], lambda *a, i=i: (fast(*a)[i],)) for i, j in enumerate(wanted)]
    else:
        inputs, (fast, _) = _ALL_CASES[name](torch.Generator().manual_seed(5))
        wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
        cases = [(inputs, wanted, fast)]
    for inputs, wanted, fn in cases:
        inputs = tuple(t.detach().to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
        want = [o.clone() for o in fn(*inputs)]
        with fwad.dual_level():
            got = fn(*inputs)  # no tangents: the kernel as usual
            for a, b in zip(got, want):
                assert_close(a, b, msg=f"{name}: no tangents under a dual level")
            args = [fwad.make_dual(t, torch.ones_like(t)) if i in wanted else t for i, t in enumerate(inputs)]
            with pytest.raises(RuntimeError, match="no forward-mode AD rule"):
                fn(*args)


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
    registered = {f"latentfast::{n}" for n in dir(torch.ops.latentfast) if not n.startswith("_") and n != "name"}
    assert set(found) == registered
    assert all(found.values()), [k for k, v in found.items() if not v]
