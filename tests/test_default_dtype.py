"""Layers built under torch.set_default_dtype(torch.float64), as scientific code often sets
it: every floating parameter and buffer in float64, and the layers run on float64 inputs
made the default way. A vector coupling's `act` buffer had been made with .float(), so a
Flow with a VectorAffineCoupling raised "act has dtype torch.float32 but the input has
torch.float64".
"""
from __future__ import annotations

import pytest
import torch

from latentfast.flows import Glow, GlowStep
from latentfast.flows.vector import (IAF, MAF, Flow, LULinear, Permutation, VectorAdditiveCoupling,
                                     VectorAffineCoupling)
from latentfast.rnn import GRU, LSTM, SequenceModel
from latentfast.vae import VAE, FlowVAE


def _cases():
    return {
        "GlowStep": (lambda: GlowStep(4, hidden=8), lambda m: m(torch.randn(2, 4, 3, 3))[0]),
        "Glow": (lambda: Glow(1, 4, n_levels=2, steps_per_level=1, hidden=8),
                 lambda m: m.log_prob(torch.rand(2, 1, 4, 4) - 0.5)),
        "Flow": (lambda: Flow(4, [MAF(4, 8), IAF(4, 8, n_steps=2), VectorAffineCoupling(4, 8),
                                  VectorAdditiveCoupling(4, 8), LULinear(4), Permutation(4)]),
                 lambda m: m.log_prob(torch.randn(3, 4)) + m.rsample_and_log_prob(3)[1]),
        "GRU": (lambda: GRU(3, 5), lambda m: m(torch.randn(4, 2, 3))[0]),
        "LSTM": (lambda: LSTM(3, 5), lambda m: m(torch.randn(4, 2, 3))[0]),
        "SequenceModel": (lambda: SequenceModel(3, 8), lambda m: m(torch.randn(2, 5, 3))),
        "VAE": (lambda: VAE(12, 2, (8,)), lambda m: m(torch.rand(4, 12))),
        "FlowVAE": (lambda: FlowVAE(12, 2, (8,), posterior_steps=1, prior_steps=1, flow_hidden=8),
                    lambda m: m(torch.rand(4, 12))),
    }


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", list(_cases()))
def test_layers_built_with_float64_as_the_default_dtype(backend, float64_default, name):
    make, run = _cases()[name]
    torch.manual_seed(0)
    model = make()
    floating = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    assert floating
    assert all(t.dtype == torch.float64 for _, t in floating), [(n, t.dtype) for n, t in floating]
    out = run(model)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    out.sum().backward()
