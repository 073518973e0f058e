"""latentfast.rnn modules: drop-in GRU, sequence model, closed-loop Jacobian."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from latentfast.rnn import GRU, LSTM, SequenceModel, fit_sequence_model, valid_prediction_time
from tests.conftest import device_for, interpreting


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


@pytest.mark.parametrize("name", ["GRU", "LSTM"])
def test_rnn_has_the_nn_module_api_that_user_code_calls(name):
    """Code written for torch.nn.GRU / LSTM calls flatten_parameters() (in forward, for
    DataParallel / cuDNN), reset_parameters() (re-initialisation) and reads all_weights, mode
    and proj_size: each raised AttributeError on the drop-in."""
    torch.manual_seed(3)
    ref, ours = getattr(nn, name)(3, 7), {"GRU": GRU, "LSTM": LSTM}[name](3, 7)
    ours.flatten_parameters()
    assert ours.mode == ref.mode == name and ours.proj_size == ref.proj_size == 0
    assert [[tuple(w.shape) for w in layer] for layer in ours.all_weights] == \
        [[tuple(w.shape) for w in layer] for layer in ref.all_weights]
    assert all(a is b for a, b in zip(ours.all_weights[0], ours.parameters()))
    before = [p.detach().clone() for p in ours.parameters()]
    ours.reset_parameters()
    bound = 7 ** -0.5
    for old, p in zip(before, ours.parameters()):
        assert not torch.equal(old, p) and p.abs().max() <= bound and p.abs().max() > 0.8 * bound


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
def test_sequence_model_bad_inputs_raise_and_zero_steps_forecast_nothing(cell):
    model = SequenceModel(3, hidden=5, cell=cell)
    ctx = torch.randn(2, 4, 3)
    f, s = model.forecast(ctx, 0)
    assert f.shape == (2, 0, 3) and s.shape == (2, 0, model.state_size)
    with pytest.raises(ValueError, match="n_steps"):
        model.forecast(ctx, -1)
    for bad in (torch.randn(2, 4, 2), torch.randn(2, 0, 3), torch.randn(4, 2), torch.randn(0, 3), torch.randn(3)):
        with pytest.raises(ValueError, match=r"\[B, T, 3\] \(or one series \[T, 3\]\) with T >= 1"):
            model.forecast(bad, 2)
        with pytest.raises(ValueError, match=r"\[B, T, 3\] \(or one series \[T, 3\]\) with T >= 1"):
            model(bad)
    with pytest.raises(ValueError, match="same shape"):
        valid_prediction_time(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3), torch.ones(3))
    data = torch.randn(2, 12, 3)
    for kw in ({"window": 12}, {"window": 6, "warmup": -1}, {"window": 6, "warmup": 6}):  # no window fits / none scored
        with pytest.raises(ValueError, match="warmup < window < T"):
            fit_sequence_model(model, data, epochs=1, progress=False, **kw)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        fit_sequence_model(model, data, epochs=1, window=6, warmup=2, batch_size=0, progress=False)
    assert len(fit_sequence_model(model, data, epochs=1, window=11, warmup=2, progress=False)) == 1  # one window


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sequence_model_on_an_empty_batch(cell, num_layers):
    """B = 0 series give empty predictions, states and forecasts of the right shapes, as the
    recurrent layers do (before, packing the final states raised a reshape error)."""
    model = SequenceModel(3, hidden=4, cell=cell, num_layers=num_layers)
    pred, s = model(torch.randn(0, 5, 3))
    assert pred.shape == (0, 5, 3) and s.shape == (0, model.state_size)
    f, ss = model.forecast(torch.randn(0, 5, 3), 4)
    assert f.shape == (0, 4, 3) and ss.shape == (0, 4, model.state_size)


def test_valid_prediction_time_counts_steps_and_stops_at_a_diverged_forecast():
    """The steps before the normalised error first passes the threshold, T where it never does;
    a forecast that diverged to NaN is past it (before, NaN errors compared False and such a
    forecast counted as valid to the end). Bad scales and thresholds raise."""
    truth = torch.zeros(3, 6, 2)
    forecast = torch.zeros(3, 6, 2)
    forecast[0, 4:] = 1.0  # error 1 / sqrt(1) from step 4: past 0.4
    forecast[1, 2:] = float("nan")  # diverged at step 2
    forecast[2, :, 0] = 0.5  # error sqrt(0.5^2 / 2) = 0.354 <= 0.4 throughout
    assert valid_prediction_time(forecast, truth, torch.ones(2)).tolist() == [4, 2, 6]
    assert valid_prediction_time(forecast, truth, 1.0).tolist() == [4, 2, 6]
    assert valid_prediction_time(forecast, truth, torch.tensor([0.5, 1.0])).tolist() == [4, 2, 0]  # 0.707 > 0.4
    for scale in (torch.zeros(2), torch.tensor([1.0, float("inf")]), -1.0, torch.ones(3), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="scale"):
            valid_prediction_time(forecast, truth, scale)
    with pytest.raises(ValueError, match="threshold"):
        valid_prediction_time(forecast, truth, 1.0, threshold=0.0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_model_continues_from_the_state_it_returns(backend, cell):
    """forward(x, h0) takes the state [B, S] that forward and forecast return (before, only the
    RNN module's own layout: the returned state raised), so a series run in two chunks gives
    the one-call predictions and last state; the module's own layout still works, and a state
    of the wrong size raises."""
    torch.manual_seed(0)
    model = SequenceModel(3, hidden=5, cell=cell).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    whole, s_whole = model(x)
    first, s = model(x[:, :4])
    second, s_end = model(x[:, 4:], s)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    torch.testing.assert_close(s_end, s_whole)
    own = s[None] if cell == "gru" else (s[None, :, :5], s[None, :, 5:])
    torch.testing.assert_close(model(x[:, 4:], own)[0], second)
    _, states = model.forecast(x[:, :4], 3)
    torch.testing.assert_close(states[:, 0], s)  # forecast's first state is forward's last
    # forecast warms up from a given state as forward does: chunked warm-up, the same forecast
    torch.testing.assert_close(model.forecast(x[:, 4:], 3, h0=s), model.forecast(x, 3))
    with pytest.raises(ValueError, match=rf"h0 must be the state \[B, S\] = \[2, {model.state_size}\]"):
        model(x, torch.zeros(2, model.state_size + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"h0 must be the state \[B, S\] = \[2, {model.state_size}\]"):
        model(x, torch.zeros(3, model.state_size, dtype=torch.float64))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_model_takes_one_series_without_a_batch_dimension(backend, cell):
    """As torch.nn's recurrent layers, one series [T, D] (state [S]) goes where a batch goes
    and comes back without the batch dimension, each result the batch-of-one's: forward (with
    and without h0), forecast, closed_loop_step, lyapunov_spectrum (before, [T, D] raised). A
    state of another shape for one series raises."""
    torch.manual_seed(1)
    model = SequenceModel(3, hidden=5, cell=cell).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    s0 = 0.3 * torch.randn(2, model.state_size, dtype=torch.float64)
    for got, want in (
            (model(x[1]), model(x[1:])),
            (model(x[1], s0[1]), model(x[1:], s0[1:])),
            (model.forecast(x[1], 4, h0=s0[1]), model.forecast(x[1:], 4, h0=s0[1:])),
            (model.closed_loop_step(s0[1]), model.closed_loop_step(s0[1:]))):
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape[1:]
            torch.testing.assert_close(a, b[0], rtol=0, atol=0)
    torch.manual_seed(2)  # (the initial tangent vectors are random)
    le = model.lyapunov_spectrum(s0[1], k=2, n_steps=30)
    torch.manual_seed(2)
    assert le.shape == (2,)
    torch.testing.assert_close(le, model.lyapunov_spectrum(s0[1:], k=2, n_steps=30)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"h0 must be its state \[S\] = \[{model.state_size}\] or None"):
        model(x[1], s0[1:])


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


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_model_with_stacked_layers(backend, cell):
    """SequenceModel(num_layers=2): the predictions are torch.nn's 2-layer GRU / LSTM and the
    readout on the same weights; the state [B, S] holds every layer's h (then every c) and
    continues a series in chunks; forecast feeds its predictions through every layer;
    closed_loop_step and its Jacobian are those of torch.nn's module stepped once (autograd);
    the spectrum is Benettin's method on those Jacobians, written out here."""
    torch.manual_seed(5)
    model = SequenceModel(3, hidden=4, cell=cell, num_layers=2).double()
    gru = cell == "gru"
    assert model.state_size == (8 if gru else 16)
    ref = (nn.GRU if gru else nn.LSTM)(3, 4, 2, batch_first=True).double()
    ref.load_state_dict({k[4:]: v for k, v in model.state_dict().items() if k.startswith("rnn.")})
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    pred, s = model(x)
    out, hx = ref(x)

    def flat(t):  # [L, B, H] -> [B, L*H], layer by layer
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    torch.testing.assert_close(pred, model.readout(out))
    torch.testing.assert_close(s, flat(hx) if gru else torch.cat([flat(hx[0]), flat(hx[1])], 1))
    first, s1 = model(x[:, :4])
    second, s2 = model(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([first, second], 1), pred)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(model(x[1])[0], model(x[1:])[0][0], rtol=0, atol=0)
    # closed loop by hand through torch.nn's module
    fc, states = model.forecast(x, 5)
    xin, want = pred[:, -1], []
    with torch.no_grad():
        for _ in range(5):
            want.append(xin)
            o, hx = ref(xin[:, None], hx)
            xin = model.readout(o[:, 0])
    torch.testing.assert_close(fc, torch.stack(want, 1))
    torch.testing.assert_close(states[:, 0], s)

    def step(v):  # one state [S] -> the next, through torch.nn's module
        h0 = v[:8].reshape(2, 1, 4)
        x_in = model.readout(h0[-1])[:, None]
        if gru:
            return ref(x_in, h0)[1].reshape(-1)
        _, (hn, cn) = ref(x_in, (h0, v[8:].reshape(2, 1, 4)))
        return torch.cat([hn.reshape(-1), cn.reshape(-1)])

    s0 = 0.5 * torch.randn(2, model.state_size, dtype=torch.float64)
    nxt, jac = model.closed_loop_step(s0)
    for i in range(2):
        torch.testing.assert_close(nxt[i], step(s0[i]))
        torch.testing.assert_close(jac[i], torch.autograd.functional.jacobian(step, s0[i]))
    torch.manual_seed(9)
    got = model.lyapunov_spectrum(s0, 3, 20, dt=0.1, qr_every=2)
    torch.manual_seed(9)
    q = torch.linalg.qr(torch.randn(2, model.state_size, 3, dtype=torch.float64))[0]
    sums, st = torch.zeros(2, 3, dtype=torch.float64), s0
    for t in range(20):
        q = torch.stack([torch.autograd.functional.jacobian(step, v) for v in st]) @ q
        st = torch.stack([step(v) for v in st]).detach()
        if (t + 1) % 2 == 0:
            q, r = torch.linalg.qr(q)
            sums += torch.diagonal(r, dim1=-2, dim2=-1).abs().log()
    torch.testing.assert_close(got, sums / 2.0)
    with pytest.raises(ValueError, match=rf"s must be states \[B, {model.state_size}\]"):
        model.closed_loop_step(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_layers"):
        SequenceModel(3, num_layers=0)


def _states(cls, b, h, unbatched=False, dev="cpu", n=1):
    shape = (n, h) if unbatched else (n, b, h)
    if cls is GRU:
        return torch.randn(*shape, dtype=torch.float64).to(dev)
    return torch.randn(*shape, dtype=torch.float64).to(dev), torch.randn(*shape, dtype=torch.float64).to(dev)


def _flat(states):
    return states if isinstance(states, tuple) else (states,)


@pytest.mark.parametrize("cls", [GRU, LSTM])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("with_states", [False, True])
def test_packed_sequences_match_nn(backend, cls, batch_first, enforce_sorted, with_states):
    """PackedSequence in, PackedSequence out (same batch_sizes and index order as torch.nn), the
    final states at each sequence's own length, the same parameter and state gradients."""
    torch.manual_seed(3)
    dev = device_for(backend)
    ours = cls(3, 5, batch_first=batch_first).double().to(dev)
    ref = getattr(nn, cls.__name__)(3, 5, batch_first=batch_first).double().to(dev)
    ref.load_state_dict(ours.state_dict())
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    x = torch.randn(4, 6, 3, dtype=torch.float64).to(dev)
    x = x if batch_first else x.transpose(0, 1)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    hx = _states(cls, 4, 5, dev=dev) if with_states else None
    leaves = [t.requires_grad_() for t in _flat(hx)] if with_states else []
    got, got_s = ours(packed, hx)
    want, want_s = ref(packed, hx)
    assert isinstance(got, nn.utils.rnn.PackedSequence)
    assert torch.equal(got.batch_sizes, want.batch_sizes)
    for a, b in ((got.sorted_indices, want.sorted_indices), (got.unsorted_indices, want.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    torch.testing.assert_close(got.data, want.data)
    for a, b in zip(_flat(got_s), _flat(want_s)):
        torch.testing.assert_close(a, b)
    g = torch.randn(want.data.shape, dtype=torch.float64).to(dev)
    targets_ours, targets_ref = list(ours.parameters()) + leaves, list(ref.parameters()) + leaves
    ga = torch.autograd.grad((got.data * g).sum() + sum(s.sum() for s in _flat(got_s)), targets_ours)
    gb = torch.autograd.grad((want.data * g).sum() + sum(s.sum() for s in _flat(want_s)), targets_ref)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [GRU, LSTM])
def test_unbatched_input_and_nn_constructor(backend, cls):
    torch.manual_seed(4)
    name, dev = cls.__name__, device_for(backend)
    ours = cls(3, 5).double().to(dev)
    ref = getattr(nn, name)(3, 5).double().to(dev)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, dtype=torch.float64).to(dev)
    hx = _states(cls, 1, 5, unbatched=True, dev=dev)
    for args in ((x,), (x, hx)):
        got, got_s = ours(*args)
        want, want_s = ref(*args)
        torch.testing.assert_close(got, want)
        for a, b in zip(_flat(got_s), _flat(want_s)):
            assert a.shape == b.shape == (1, 5)
            torch.testing.assert_close(a, b)
    # torch.nn's positional order: (input_size, hidden_size, num_layers, bias, batch_first, ...)
    assert cls(3, 5, 1, True, True).batch_first
    with pytest.raises(ValueError, match="bias must be"):
        cls(3, 5, bias=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_layers"):
            cls(3, 5, num_layers=bad)
    with pytest.warns(UserWarning, match="dropout"):
        m = cls(3, 5, dropout=0.2)
    assert m.dropout == 0.2
    m = cls(3, 5, dtype=torch.float64)
    assert m.weight_ih_l0.dtype == torch.float64
    if cls is LSTM:
        with pytest.raises(ValueError, match="proj_size"):
            LSTM(3, 5, proj_size=2)


@pytest.mark.parametrize("cls", [GRU, LSTM])
@pytest.mark.parametrize("num_layers,bidirectional,bias", [(2, False, True), (2, True, False)])
def test_stacked_and_bidirectional_match_nn(backend, cls, num_layers, bidirectional, bias):
    """Stacked layers, both directions and bias=False (each raised a ValueError before) against
    torch.nn in float64: batched (both layouts, with and without initial states), unbatched and packed
    inputs (the reverse direction reversing each sequence within its own length), final states,
    and the gradients of every parameter and initial state. Dropout between layers acts only
    in training, as torch.nn's: with p = 1 the layers above the first see zeros there, and
    outside training the outputs are torch.nn's."""
    torch.manual_seed(7)
    name, dev = cls.__name__, device_for(backend)
    n_states = num_layers * (2 if bidirectional else 1)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    for batch_first in (False, True):
        ours = cls(3, 5, batch_first=batch_first, **kw).double().to(dev)
        ref = getattr(nn, name)(3, 5, batch_first=batch_first, **kw).double().to(dev)
        ref.load_state_dict(ours.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        x = torch.randn(4, 6, 3, dtype=torch.float64).to(dev)
        x = x if batch_first else x.transpose(0, 1)
        lengths = torch.tensor([4, 6, 1, 4])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        inputs = [(x, None), (x, _states(cls, 4, 5, dev=dev, n=n_states)), (packed, _states(cls, 4, 5, dev=dev, n=n_states)),
                  (x[:, 0] if batch_first else x[0], _states(cls, 1, 5, unbatched=True, dev=dev, n=n_states))]
        for inp, hx in inputs:
            leaves = [t.requires_grad_() for t in _flat(hx)] if hx is not None else []
            got, got_s = ours(inp, hx)
            want, want_s = ref(inp, hx)
            got_t, want_t = (got.data, want.data) if isinstance(want, nn.utils.rnn.PackedSequence) else (got, want)
            torch.testing.assert_close(got_t, want_t)
            for a, b in zip(_flat(got_s), _flat(want_s)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b)
            g = torch.randn(want_t.shape, dtype=torch.float64).to(dev)
            ga = torch.autograd.grad((got_t * g).sum() + sum(s.sum() for s in _flat(got_s)),
                                     list(ours.parameters()) + leaves)
            gb = torch.autograd.grad((want_t * g).sum() + sum(s.sum() for s in _flat(want_s)),
                                     list(ref.parameters()) + leaves)
            for a, b in zip(ga, gb):
                torch.testing.assert_close(a, b)
    if num_layers > 1:
        ours = cls(3, 5, dropout=1.0, **kw).double().to(dev)
        ref = getattr(nn, name)(3, 5, dropout=1.0, **kw).double()  # (on the CPU: torch.nn's own dropout)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(6, 4, 3, dtype=torch.float64)
        torch.testing.assert_close(ours(x.to(dev))[0].cpu(), ref(x)[0])  # training: zeros into the upper layers
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x.to(dev))[0].cpu(), ref(x)[0])
        x = x.to(dev)
        assert not torch.allclose(ours(x)[0], ours.train()(x)[0])


@pytest.mark.parametrize("cls", [GRU, LSTM])
def test_modules_compile_fullgraph(backend, cls):
    """torch.compile(fullgraph=True) traces the drop-in modules (the custom ops, their fake
    kernels and autograd): same outputs and gradients as eager."""
    torch.manual_seed(5)
    m = cls(3, 5, batch_first=True)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 4, 3, requires_grad=True)
    (o1, _), (o2, _) = m(x), compiled(x)
    torch.testing.assert_close(o2, o1)
    targets = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(o2.sum(), targets), torch.autograd.grad(o1.sum(), targets)):
        torch.testing.assert_close(a, b)


def test_training_windows_start_every_half_window_up_to_the_last_that_fits():
    from latentfast.rnn.models import _window_starts
    for t_len in range(2, 90):
        for window in range(1, t_len):
            starts = _window_starts(t_len, window).tolist()
            stride = max(window // 2, 1)
            assert starts[0] == 0 and starts == list(range(0, starts[-1] + 1, stride))
            assert starts[-1] + window + 1 <= t_len  # each window has its window + 1 points
            assert starts[-1] + stride + window + 1 > t_len  # and no further start fits
    assert _window_starts(801, 40).tolist()[-1] == 760  # on the stride: 801 = 760 + 41
    with pytest.raises(ValueError, match="window"):
        _window_starts(5, 5)
