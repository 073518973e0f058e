"""latentfast.rnn modules: drop-in GRU, sequence model, closed-loop Jacobian."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from latentfast.rnn import GRU, LSTM, SequenceModel, fit_sequence_model, valid_prediction_time
from tests.conftest import interpreting


def test_gru_is_a_drop_in_for_nn_gru(backend):
    torch.manual_seed(0)
    ref = nn.GRU(3, 7, batch_first=True)
    ours = GRU(3, 7, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 3)
    h0 = torch.randn(1, 4, 7)
    out, hn = ours(x, h0)
    want, want_hn = ref(x, h0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hn, want_hn, rtol=1e-5, atol=1e-6)
    ref.load_state_dict(ours.state_dict())


def test_closed_loop_jacobian_matches_autograd():
    torch.manual_seed(1)
    model = SequenceModel(3, hidden=6).double()
    h = torch.randn(2, 6, dtype=torch.float64)
    nxt, jac = model.closed_loop_step(h)
    for i in range(2):
        def step(v):
            return torch.gru_cell(model.readout(v[None]), v[None], *model.rnn.params())[0]
        want = torch.autograd.functional.jacobian(step, h[i])
        torch.testing.assert_close(jac[i], want)
        torch.testing.assert_close(nxt[i], step(h[i]))


def test_lstm_is_a_drop_in_for_nn_lstm(backend):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 7, batch_first=True)
    ours = LSTM(3, 7, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 3)
    hx = (torch.randn(1, 4, 7), torch.randn(1, 4, 7))
    out, (hn, cn) = ours(x, hx)
    want, (want_hn, want_cn) = ref(x, hx)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hn, want_hn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cn, want_cn, rtol=1e-5, atol=1e-6)
    ref.load_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match="hx"):
        ours(x, hx[0])


def test_lstm_closed_loop_jacobian_matches_autograd():
    torch.manual_seed(2)
    model = SequenceModel(3, hidden=5, cell="lstm").double()
    s = torch.randn(2, 10, dtype=torch.float64)
    nxt, jac = model.closed_loop_step(s)
    assert jac.shape == (2, 10, 10)
    for i in range(2):
        def step(v):
            return model._cell(model.readout(v[None, :5]), v[None])[0]
        torch.testing.assert_close(jac[i], torch.autograd.functional.jacobian(step, s[i]))
        torch.testing.assert_close(nxt[i], step(s[i]))
    with pytest.raises(ValueError, match="cell"):
        SequenceModel(3, cell="rnn")


@pytest.mark.skipif(interpreting(), reason="hundreds of training steps of interpreted kernels (7 min); "
                    "the kernels are checked by tests/rnn/test_rnn_ops.py, this code path by the normal pass")
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_model_learns_a_sine_and_forecasts(cell):
    t = torch.linspace(0, 40, 801)
    phases = torch.rand(8, 1, generator=torch.Generator().manual_seed(0)) * 6.28
    data = torch.stack([torch.sin(t + phases), torch.cos(t + phases)], -1)  # [8, 801, 2]
    torch.manual_seed(0)
    model = SequenceModel(2, hidden=16, cell=cell)
    hist = fit_sequence_model(model, data[:6], epochs=40, window=40, progress=False)
    assert hist[-1] < 0.1 * hist[0]
    f, hs = model.forecast(data[6:, :100], 50)
    assert f.shape == (2, 50, 2) and hs.shape == (2, 50, model.state_size)
    vpt = valid_prediction_time(f, data[6:, 100:150], torch.ones(2))
    assert (vpt >= 20).all(), vpt


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_model_spectrum_equals_benettin_on_its_closed_loop_jacobian(backend, cell):
    torch.manual_seed(4)
    model = SequenceModel(3, hidden=5, cell=cell).double()
    s0 = torch.randn(2, model.state_size, dtype=torch.float64)
    torch.manual_seed(9)
    got = model.lyapunov_spectrum(s0, 3, 30, dt=0.1, qr_every=2)
    from latentfast.reference.dynamics import lyapunov_spectrum
    torch.manual_seed(9)
    want = lyapunov_spectrum(model.closed_loop_step, s0, 3, 30, dt=0.1, qr_every=2,
                             q0=torch.randn(2, model.state_size, 3, dtype=torch.float64))
    torch.testing.assert_close(got, want)
