"""torch.export of the modules (what a user deploys): each family exported with a dynamic
batch dimension, then run at another batch size, gives the eager module's numbers on every
backend (CUDA: tests/test_gpu.py). Flow.log_prob did not export: the standard-normal base ran torch.distributions'
argument checks, whose data-dependent branches torch.export cannot trace."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from latentfast import geometry as geo
from latentfast.flows import IAF, MAF, Flow, Glow, GlowStep, LULinear
from latentfast.rnn import GRU, LSTM
from latentfast.vae import VAE
from tests.conftest import device_for


class _Call(torch.nn.Module):
    """A module whose forward is fn(module, x), so a method or a function of a module becomes
    something torch.export takes."""

    def __init__(self, module: torch.nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x):
        return self.fn(self.module, x)


def _glow_step():
    step = GlowStep(6, hidden=8)
    step(torch.randn(4, 6, 3, 3))  # ActNorm's data-dependent initialisation
    return step, lambda b: (torch.randn(b, 6, 3, 3),)


def _glow():
    glow = Glow(in_channels=1, image_size=8, n_levels=2, steps_per_level=2, hidden=16)
    glow.bits_per_dim(torch.rand(8, 1, 8, 8) - 0.5, n_bins=17)
    return _Call(glow, lambda m, x: m.bits_per_dim(x, n_bins=17)), lambda b: (torch.rand(b, 1, 8, 8) - 0.5,)


def _flow():
    flow = Flow(4, [MAF(4, hidden=16, n_steps=2), LULinear(4)])
    return _Call(flow, lambda m, x: m.log_prob(x)), lambda b: (torch.randn(b, 4),)


def _iaf():
    return IAF(4, hidden=16, n_steps=2, context_dim=3), lambda b: (torch.randn(b, 4), torch.randn(b, 3))


def _gru():
    return GRU(3, 8, batch_first=True), lambda b: (torch.randn(b, 5, 3),)


def _lstm():  # (stacked and bidirectional: the time flips and the layers' concatenation export too)
    return LSTM(3, 8, num_layers=2, bidirectional=True, batch_first=True), lambda b: (torch.randn(b, 5, 3),)


def _metric():
    dec = VAE(in_dim=10, latent_dim=2, hidden=(16,)).decoder
    return _Call(dec, lambda m, z: geo.metric(m, z)), lambda b: (torch.randn(b, 2),)


def _energy():
    dec = VAE(in_dim=10, latent_dim=2, hidden=(16,)).decoder
    return _Call(dec, lambda m, c: geo.curve_energy(m, c)), lambda b: (torch.randn(b, 6, 2),)


MODULES = {"GlowStep": _glow_step, "Glow.bits_per_dim": _glow, "Flow.log_prob": _flow, "IAF": _iaf, "GRU": _gru,
           "LSTM": _lstm, "metric": _metric, "curve_energy": _energy}


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("name", MODULES)
def test_module_exports_with_a_dynamic_batch(backend, name):
    dev = device_for(backend)
    module, make = MODULES[name]()
    module.to(dev).eval()

    def inputs(b):
        return tuple(t.to(dev) for t in make(b))

    args = inputs(4)
    batch = Dim("batch", min=2, max=1024)
    exported = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    assert any(str(n.target).startswith("latentfast.") for n in exported.graph.nodes)
    for b in (4, 7):
        args = inputs(b)
        got, want = _flat(exported.module()(*args)), _flat(module(*args))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_exporting_an_uninitialised_glow_step_says_so():
    """torch.export of a GlowStep whose ActNorm has not seen data exported the identity in
    place of the data-dependent initialisation (the trace skipped it); now an error says to
    call the model once first, and after one call it exports."""
    step = GlowStep(4, hidden=8)
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(RuntimeError, match="call the model once before exporting"):
        torch.export.export(step, (x,))
    assert not bool(step.actnorm.initialized)
    want = step(x)
    got = torch.export.export(step, (x,)).module()(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
