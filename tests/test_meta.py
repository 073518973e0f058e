"""Shape inference on the meta device (torch.device("meta"): no data, shapes and dtypes only,
as FLOP counters and memory planners use it): every layer gives the outputs it gives on CPU,
in shape and dtype, through the reference backend that auto picks there. The argument checks
had asked torch.is_autocast_enabled("meta") (which raises) and the value checks read values
that meta tensors do not hold.
"""
from __future__ import annotations

import pytest
import torch

import latentfast
from latentfast import geometry as geo
from latentfast.flows import Glow, GlowStep
from latentfast.flows.vector import IAF, MAF, Flow, LULinear, Permutation
from latentfast.ops import flows as flow_ops
from latentfast.rnn import GRU, LSTM, SequenceModel
from latentfast.vae import VAE, FlowVAE, GaussianMLPDecoder


def _cases():
    c = 6
    return {
        "lu_weight": lambda d: flow_ops.lu_weight(torch.eye(c, device=d), torch.randn(c, c, device=d),
                                                  torch.randn(c, c, device=d), torch.ones(c, device=d),
                                                  torch.zeros(c, device=d)),
        "GlowStep": lambda d: GlowStep(4, hidden=8).to(d)(torch.randn(2, 4, 3, 3, device=d)),
        "Glow.log_prob": lambda d: Glow(1, 8, n_levels=2, steps_per_level=1, hidden=8).to(d).log_prob(
            torch.rand(2, 1, 8, 8, device=d)),
        "Flow.log_prob": lambda d: Flow(4, [MAF(4, 8), LULinear(4), Permutation(4)]).to(d).log_prob(
            torch.randn(3, 4, device=d)),
        "IAF.inverse": lambda d: IAF(4, 8, context_dim=2).to(d).inverse(torch.randn(3, 4, device=d),
                                                                       torch.randn(3, 2, device=d)),
        "GRU": lambda d: GRU(3, 8).to(d)(torch.randn(5, 2, 3, device=d)),
        "LSTM": lambda d: LSTM(3, 8).to(d)(torch.randn(5, 2, 3, device=d)),
        "SequenceModel": lambda d: SequenceModel(3, 8).to(d)(torch.randn(2, 5, 3, device=d)),
        "VAE": lambda d: VAE(12, 2, (8,)).to(d)(torch.rand(4, 12, device=d)),
        "FlowVAE": lambda d: FlowVAE(12, 2, (8,), posterior_steps=1, prior_steps=1, flow_hidden=8).to(d)(
            torch.rand(4, 12, device=d)),
        "metric": lambda d: geo.metric(GaussianMLPDecoder(2, 10, (8,)).to(d), torch.randn(3, 2, device=d)),
        "curve_energy": lambda d: geo.curve_energy(GaussianMLPDecoder(2, 10, (8,)).to(d),
                                                   torch.randn(3, 5, 2, device=d)),
    }


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    found = []
    for o in out:
        found += _tensors(o) if isinstance(o, (tuple, list)) else [o] if isinstance(o, torch.Tensor) else []
    return found


@pytest.mark.parametrize("name", list(_cases()))
def test_layers_infer_shapes_on_the_meta_device(name):
    fn = _cases()[name]
    torch.manual_seed(0)
    want = _tensors(fn("cpu"))
    torch.manual_seed(0)
    with latentfast.use_backend("auto"):  # (the interpreter pass forces triton, which needs real tensors)
        got = _tensors(fn("meta"))
    assert [t.device.type for t in got] == ["meta"] * len(want)
    assert [(tuple(t.shape), t.dtype) for t in got] == [(tuple(t.shape), t.dtype) for t in want]


def test_meta_state_dicts_load_into_meta_models():
    """A meta model takes a meta state dict (as sharded-checkpoint tools move them): ActNorm
    reads its loaded `initialized` flag only where it has a value (the flag's read for
    torch.compile had raised 'Tensor.item() cannot be called on meta tensors'), and an
    assigned real state dict makes the model real."""
    meta = Glow(1, 8, n_levels=2, steps_per_level=2, hidden=8).to("meta")
    meta.load_state_dict(Glow(1, 8, n_levels=2, steps_per_level=2, hidden=8).to("meta").state_dict())
    real = Glow(1, 8, n_levels=2, steps_per_level=2, hidden=8)
    x = torch.rand(3, 1, 8, 8) - 0.5
    want = real.log_prob(x)
    meta.load_state_dict(real.state_dict(), assign=True)
    torch.testing.assert_close(meta.log_prob(x), want)


def _built_models():
    """name: (constructor, a function of the model giving tensors from CPU inputs)."""
    x, z, s, v = torch.rand(3, 1, 8, 8) - 0.5, torch.randn(5, 4), torch.randn(6, 2, 3), torch.rand(4, 12)
    return {
        "Glow": (lambda: Glow(1, 8, n_levels=2, steps_per_level=2, hidden=8), lambda m: m.log_prob(x)),
        "Flow": (lambda: Flow(4, [MAF(4, 8, n_steps=2), Permutation(4), IAF(4, 8), LULinear(4)]),
                 lambda m: m.log_prob(z)),
        "MADE order": (lambda: MAF(4, 8, n_steps=1), lambda m: m.inverse(z)[0]),
        "GRU": (lambda: GRU(3, 8), lambda m: m(s)[0]),
        "LSTM": (lambda: LSTM(3, 8), lambda m: m(s)[0]),
        "VAE": (lambda: VAE(12, 2, (8,)), lambda m: m.encode(v)[0]),
        "FlowVAE": (lambda: FlowVAE(12, 2, (8,), posterior_steps=1, prior_steps=1, flow_hidden=8),
                    lambda m: m.prior.log_prob(z[:, :2])),
    }


@pytest.mark.parametrize("name", list(_built_models()))
def test_models_built_under_a_meta_device_context_then_materialised(name):
    """`with torch.device("meta"): model = ...` (how large models are built without memory,
    then given storage by to_empty or load_state_dict(assign=True)): every layer builds there
    (MAF, IAF and Permutation had read their orders back to check them: 'Cannot copy out of
    meta tensor'), and the materialised model gives the CPU-built model's outputs."""
    make, run = _built_models()[name]
    torch.manual_seed(0)
    real = make()
    run(real)  # (ActNorm's initialisation)
    with torch.device("meta"):
        meta = make()
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    with torch.device("meta"):
        assigned = make()
    empty = meta.to_empty(device="cpu")
    empty.load_state_dict(real.state_dict())
    assigned.load_state_dict(real.state_dict(), assign=True)
    want = run(real)
    for model in (empty, assigned):
        torch.testing.assert_close(run(model), want, rtol=0, atol=0, msg=name)
