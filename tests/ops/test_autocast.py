"""torch.autocast: the public functions upcast half-precision inputs to float32 and return
float32 (latentfast/ops/_amp.py), so layers around them may run in bfloat16 / float16."""
from __future__ import annotations

import pytest
import torch

import latentfast
from latentfast.flows import Glow, GlowStep
from tests.conftest import device_for
from tests.ops.test_double_backward import CASES as _ALL_CASES

LOW = torch.bfloat16
# the public functions (the custom ops called directly take float32 and float64 only)
CASES = {k: v for k, v in _ALL_CASES.items() if not k.endswith("_op")}


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_upcasts_to_float32(backend, name):
    inputs, (fast, _) = CASES[name](torch.Generator().manual_seed(3))
    dev = device_for(backend)
    wanted = [isinstance(t, torch.Tensor) and t.requires_grad for t in inputs]
    # what the layers before the op would hand over under autocast: half-precision tensors
    low = tuple(t.detach().to(dev, LOW).requires_grad_(w) if w else (t.to(dev).float() if isinstance(t, torch.Tensor)
                else t) for t, w in zip(inputs, wanted))
    with torch.autocast(dev.type, dtype=LOW):
        outs = fast(*low)
    up = tuple(t.detach().float() if isinstance(t, torch.Tensor) else t for t in low)
    expect = fast(*up)  # the same function on the upcast values, outside autocast
    for k, (o, e) in enumerate(zip(outs, expect)):
        assert o.dtype == torch.float32, f"{name}: output {k} is {o.dtype}"
        torch.testing.assert_close(o, e, rtol=0, atol=0, msg=f"{name}: output {k} differs from float32")
    loss = sum(o.sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t, w in zip(low, wanted) if w], allow_unused=True)
    for g in grads:
        assert g is None or (g.dtype == LOW and torch.isfinite(g.float()).all())


@pytest.mark.parametrize("name", list(CASES))
def test_backward_inside_autocast_is_the_float32_backward(backend, name):
    """loss.backward() called inside the autocast region (autocast is thread-local, and the
    autograd engine runs a backward with the caller's state) gives the same float32
    gradients, bit for bit, as outside it: the ops' backward runs with autocast off. Before,
    the backward formulas' matrix products ran in bfloat16 there (gradients 0.3-2.4% off on
    the reference backend) and the C++ lu_weight backward raised."""
    inputs, (fast, _) = CASES[name](torch.Generator().manual_seed(3))
    dev = device_for(backend)
    wanted = [isinstance(t, torch.Tensor) and t.requires_grad for t in inputs]

    def grads(autocast: bool):
        ins = tuple((t.detach().to(dev, torch.float32).requires_grad_(w) if t.is_floating_point() else t.to(dev))
                    if isinstance(t, torch.Tensor) else t for t, w in zip(inputs, wanted))
        with torch.autocast(dev.type, dtype=LOW, enabled=autocast):
            outs = fast(*ins)
            # a cotangent that is not all ones (a sum's backward makes no products to round)
            loss = sum((o * torch.linspace(0.5, 1.5, o.numel(), device=dev).view_as(o)).sum() for o in outs)
            return torch.autograd.grad(loss, [t for t, w in zip(ins, wanted) if w], allow_unused=True)

    for k, (got, want) in enumerate(zip(grads(True), grads(False))):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == torch.float32, f"{name}: gradient {k} is {got.dtype}"
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name}: gradient {k}")


def test_glow_backward_inside_autocast(backend):
    """A Glow's loss.backward() inside the autocast region (the C++ lu_weight backward had
    raised 'expected scalar type Float but found BFloat16' there)."""
    torch.manual_seed(0)
    glow = Glow(in_channels=1, image_size=8, n_levels=2, steps_per_level=2, hidden=16).to(device_for(backend))
    x = torch.rand(8, 1, 8, 8, device=device_for(backend)) - 0.5
    with torch.autocast(x.device.type, dtype=LOW):
        loss = glow.bits_per_dim(x, n_bins=17)
        loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
               for p in glow.parameters() if p.requires_grad)


def test_outside_autocast_half_precision_still_raises():
    inputs, (fast, _) = CASES["affine_coupling"](torch.Generator().manual_seed(3))
    with pytest.raises(TypeError, match="dtype"):
        fast(*(t.detach().to(LOW) for t in inputs))


def test_glow_trains_under_autocast(backend):
    torch.manual_seed(0)
    glow = Glow(in_channels=1, image_size=8, n_levels=2, steps_per_level=2, hidden=16)
    x = torch.rand(8, 1, 8, 8) - 0.5
    with torch.no_grad():
        full = glow.bits_per_dim(x, n_bins=17)  # also the data-dependent ActNorm init
    with torch.autocast("cpu", dtype=LOW):
        loss = glow.bits_per_dim(x, n_bins=17)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - full.item()) < 0.05 * abs(full.item())  # the coupling nets ran in bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in glow.parameters() if p.requires_grad)
    step = GlowStep(4, hidden=8)
    step(torch.randn(2, 4, 4, 4))
    with torch.autocast("cpu", dtype=LOW):
        y, ld = step(torch.randn(2, 4, 4, 4))
    assert y.dtype == ld.dtype == torch.float32
    assert latentfast.backend.requested() == backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_converted_to_half_precision_is_refused_with_the_autocast_hint(dtype):
    """model.half() / .to(torch.bfloat16) outside autocast: a TypeError that says to keep the
    model in float32 under torch.autocast (the kernels have no 16-bit path)."""
    from latentfast.flows import MAF, Flow, GlowStep
    from latentfast.rnn import GRU

    step = GlowStep(4, hidden=8)
    step(torch.randn(2, 4, 3, 3))
    calls = [lambda: step.to(dtype)(torch.randn(2, 4, 3, 3, dtype=dtype)),
             lambda: Flow(3, [MAF(3, 8)]).to(dtype).log_prob(torch.randn(4, 3, dtype=dtype)),
             lambda: GRU(2, 3).to(dtype)(torch.randn(4, 1, 2, dtype=dtype))]
    for call in calls:
        with pytest.raises(TypeError, match=rf"got {dtype}; .*torch\.autocast"):
            call()
    with pytest.raises(TypeError, match=r"got torch.int64$"):  # no hint where it does not apply
        GRU(2, 3)(torch.zeros(4, 1, 2, dtype=torch.int64))


def test_vector_flows_and_flow_vae_train_under_autocast(backend):
    """Layers whose own checks see the bfloat16 output of an earlier autocast layer (an LU
    layer's matmul feeding an IAF) accept it there; the ops upcast it."""
    from latentfast.flows import IAF, MAF, Flow, LULinear
    from latentfast.vae import FlowVAE

    torch.manual_seed(1)
    flow = Flow(4, [MAF(4, 8, n_steps=2), LULinear(4), IAF(4, 8, n_steps=2)])
    x = torch.randn(16, 4)
    with torch.no_grad():
        full = -flow.log_prob(x).mean()
    with torch.autocast("cpu", dtype=LOW):
        loss = -flow.log_prob(x).mean()
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - full.item()) < 0.05 * abs(full.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())
    vae = FlowVAE(16, latent_dim=4, likelihood="gaussian", posterior_steps=2, prior_steps=1)
    with torch.autocast("cpu", dtype=LOW):
        total, _ = vae.loss(torch.randn(8, 16))
    total.backward()
    assert torch.isfinite(total) and all(p.grad is not None for p in vae.parameters() if p.requires_grad)


def test_geodesic_under_autocast_is_the_solve_without_it(backend):
    """geodesic turns autocast off for its solve: the energies, the L-BFGS bookkeeping (matrix
    products in the PyTorch steps) and a generic decoder keep the curves' precision, so the
    result is the same, bit for bit, as outside autocast."""
    from latentfast import geometry as geo
    from latentfast.vae import GaussianMLPDecoder

    torch.manual_seed(0)
    dec = GaussianMLPDecoder(2, 9, (16,))
    dev = device_for(backend)
    dec = dec.to(dev)
    gen = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(3, 2, generator=gen).to(dev), torch.randn(3, 2, generator=gen).to(dev)
    generic = lambda z: torch.tanh(z @ torch.ones(2, 5, device=z.device))  # noqa: E731  (a matmul: bf16 under autocast)
    for d in (dec, generic):
        want = geo.geodesic(z0, z1, d, n_segments=8)
        with torch.autocast(dev.type, dtype=LOW):
            got = geo.geodesic(z0, z1, d, n_segments=8)
        assert got.curves.dtype == torch.float32
        assert torch.equal(got.curves, want.curves) and torch.equal(got.iterations, want.iterations)
