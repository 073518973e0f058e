"""Small activations keep their relative accuracy on every backend. The kernels' tanh and e^a - 1
used to be computed as (1 - e) / (1 + e) and e - 1 (or 2 sigmoid(2a) - 1), which cancel
against 1: a tanh of 1e-7 came out 0, and a GRU on inputs of 1e-5 was off by up to 4x on
some outputs (1.3e-7 absolute on values of 1e-5); a curve energy of a tanh / ELU decoder on
a curve of length 1e-6 by 6% / 23%. Now the C++ kernels take the Taylor polynomial below
|a| = 0.3 (csrc/flows/vec_math.inc, the RNNs' lockstep gate loops too) and the Triton kernels
Kahan's expm1 (latentfast/kernels/_math.py). Float32 outputs against the float64 reference
on the same inputs, each C++ instruction-set clone.
"""
from __future__ import annotations

import pytest
import torch

import latentfast
from latentfast.ops import geometry as geo_ops
from latentfast.ops import rnn as rnn_ops
from tests.conftest import CPU_ISAS, backends_under_test, device_for, use_cpu_isa


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to each element's own size (the float64 value)."""
    return float(((got.double().cpu() - want) / want.abs()).abs().max())


def _rnn_cases(dev):
    gen = torch.Generator().manual_seed(11)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dev)

    # H = 40: two 16-lane vectors of the AVX-512 lockstep loop and a scalar tail of 8
    t, b, i, h = 3, 5, 4, 40
    x = r(t, b, i, scale=1e-5)
    gru = (r(3 * h, i), r(3 * h, h, scale=0.3), torch.zeros(3 * h, device=dev), torch.zeros(3 * h, device=dev))
    lstm = (r(4 * h, i), r(4 * h, h, scale=0.3), torch.zeros(4 * h, device=dev), torch.zeros(4 * h, device=dev))
    return {
        "gru": (lambda x, *p: rnn_ops.gru_sequence(x, None, *p)[0], (x, *gru)),
        "lstm": (lambda x, *p: rnn_ops.lstm_sequence(x, None, *p)[0], (x, *lstm)),
    }


def _curve_cases(dev):
    gen = torch.Generator().manual_seed(12)
    z0 = 1e-6 * torch.randn(6, 2, generator=gen)
    curves = torch.stack([z0, 2 * z0], 1).to(dev)  # straight segments of length ~1e-6 near 0
    params = (torch.randn(9, 2, generator=gen).to(dev), torch.randn(5, 9, generator=gen).to(dev),
              torch.zeros(9, device=dev), torch.zeros(5, device=dev))
    return {name: (lambda c, w0, w1, b0, b1, code=code: geo_ops.curve_energy(c, [w0, w1], [b0, b1], [code, 0])[0],
                   (curves, *params))
            for name, code in (("curve_energy tanh", 1), ("curve_energy elu", 3))}


CASES = ["gru", "lstm", "curve_energy tanh", "curve_energy elu"]


def _case(name, dev):
    return {**_rnn_cases(dev), **_curve_cases(dev)}[name]


def _check(name, dev, rtol):
    fn, inputs = _case(name, dev)
    got = fn(*inputs)
    with latentfast.use_backend("reference"):
        want = fn(*(t.double().cpu() for t in inputs))
    err = _rel(got, want)
    assert err < rtol, (name, err)


@pytest.mark.parametrize("name", CASES)
def test_small_activations_keep_their_relative_accuracy(backend, name):
    _check(name, device_for(backend), rtol=1e-4)


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own clones")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("name", CASES)
def test_small_activations_in_every_cpp_clone(monkeypatch, isa, name):
    use_cpu_isa(monkeypatch, isa)
    with latentfast.use_backend("cpp"):
        _check(name, torch.device("cpu"), rtol=1e-4)
