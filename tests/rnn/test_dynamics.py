"""Generated dynamical systems, their tangent maps, and the reference Lyapunov spectrum."""
from __future__ import annotations

import pytest
import torch

from latentfast.data import dynamics as D
from latentfast.reference.dynamics import lyapunov_spectrum
from tests.conftest import interpreting

F64 = torch.float64


def test_lorenz_jacobians_match_autograd():
    x = torch.randn(5, 3, dtype=F64) * 5
    for i in range(5):
        want = torch.autograd.functional.jacobian(D.lorenz63_field, x[i])
        torch.testing.assert_close(D.lorenz63_jacobian(x[i]), want)
    y = torch.randn(2, 40, dtype=F64) * 3
    for i in range(2):
        want = torch.autograd.functional.jacobian(D.lorenz96_field, y[i])
        torch.testing.assert_close(D.lorenz96_jacobian(y[i]), want)


def test_rk4_tangent_map_matches_autograd():
    x = torch.randn(3, 3, dtype=F64) * 5 + torch.tensor([0, 0, 25.0], dtype=F64)
    nxt, jac = D.rk4_step_with_jacobian(D.lorenz63_field, D.lorenz63_jacobian, x, 0.01)
    torch.testing.assert_close(nxt, D.rk4_step(D.lorenz63_field, x, 0.01))
    for i in range(3):
        want = torch.autograd.functional.jacobian(lambda v: D.rk4_step(D.lorenz63_field, v, 0.01), x[i])
        torch.testing.assert_close(jac[i], want)


def test_generators_are_deterministic_and_shaped():
    a, b = D.lorenz63(50, n_traj=2, seed=3), D.lorenz63(50, n_traj=2, seed=3)
    assert a.shape == (2, 51, 3) and torch.equal(a, b)
    assert not torch.equal(a, D.lorenz63(50, n_traj=2, seed=4))
    # on the attractor: z stays positive and bounded
    assert (a[..., 2] > 0).all() and a.abs().max() < 60
    l96 = D.lorenz96(20, n_traj=3, seed=1)
    assert l96.shape == (3, 21, 40) and torch.isfinite(l96).all()
    frames, states = D.pendulum(30, n_traj=2, size=16, seed=0)
    assert frames.shape == (2, 31, 16, 16) and states.shape == (2, 31, 2)
    assert frames.min() >= 0 and frames.max() <= 1
    # the brightest pixel sits on the side the pendulum leans to
    col = frames.flatten(2).argmax(2) % 16
    lean = torch.sign(states[..., 0])
    big = states[..., 0].abs() > 0.3
    assert (torch.sign(col[big].float() - 7.5) == lean[big]).all()


def test_generators_refuse_bad_arguments():
    with pytest.raises(ValueError, match="n_steps"):
        D.lorenz63(-1)
    with pytest.raises(ValueError, match="dt"):
        D.lorenz63(5, dt=0.0)
    with pytest.raises(ValueError, match="dt"):
        D.integrate(D.lorenz63_field, torch.zeros(3), 5, float("nan"))
    with pytest.raises(ValueError, match="n >= 4"):
        D.lorenz96(5, n=3)
    with pytest.raises(ValueError, match="size >= 4"):
        D.pendulum(5, size=3)
    assert D.lorenz63(0, n_traj=0, transient=0).shape == (0, 1, 3)


@pytest.mark.skipif(interpreting(), reason="no Triton kernel involved; the normal pass runs it")
def test_lorenz63_spectrum():
    """Benettin's method on the exact RK4 tangent map: (0.906, 0, -14.572) within 0.02,
    sum = -(sigma + 1 + beta) to 1e-3."""
    dt = 0.01

    def step(h):
        return D.rk4_step_with_jacobian(D.lorenz63_field, D.lorenz63_jacobian, h, dt)

    h0 = D.lorenz63(0, n_traj=32, seed=0)[:, 0]
    le = lyapunov_spectrum(step, h0, 3, 12000, dt=dt, qr_every=5,
                           generator=torch.Generator().manual_seed(0)).mean(0)
    true = torch.tensor([0.906, 0.0, -14.572], dtype=F64)
    assert (le - true).abs().max() < 0.02, le
    assert abs(le.sum().item() + (10 + 1 + 8 / 3)) < 1e-3


def test_lyapunov_of_linear_map_is_log_of_eigenvalues():
    a = torch.diag(torch.tensor([2.0, 0.5, 0.1], dtype=F64))
    q = torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
    m = q @ a @ q.T  # symmetric, eigenvalues 2, 0.5, 0.1

    def step(h):
        return h @ m.T, m.expand(h.shape[0], 3, 3)

    # the random initial frame costs O(1/n_steps): a log-cosine spread over 2000 steps
    le = lyapunov_spectrum(step, torch.randn(4, 3, dtype=F64), 3, 2000)
    torch.testing.assert_close(le, torch.log(torch.tensor([2.0, 0.5, 0.1], dtype=F64)).expand(4, 3),
                               rtol=0, atol=5e-3)
    with pytest.raises(ValueError, match="k must"):
        lyapunov_spectrum(step, torch.randn(4, 3, dtype=F64), 4, 10)
    with pytest.raises(ValueError, match="h0"):
        lyapunov_spectrum(step, torch.randn(3, dtype=F64), 1, 10)


@pytest.mark.parametrize("closed_loop", [False, True])
def test_recurrent_step_jacobians_match_autograd(closed_loop):
    from torch import nn

    from latentfast.reference import dynamics as R

    torch.manual_seed(0)
    n_in, hs, b = 3, 5, 4
    readout = torch.randn(n_in, hs, dtype=F64) * 0.5
    x0 = torch.randn(b, n_in, dtype=F64)
    h = torch.randn(b, hs, dtype=F64) * 0.5
    c = torch.randn(b, hs, dtype=F64) * 0.5

    def inp(hh, k=None):
        """The cell input: the readout of the state (closed loop) or fixed rows of x0."""
        if closed_loop:
            return hh @ readout.T
        return x0 if k is None else x0[k:k + 1]

    dx = readout if closed_loop else None
    for cell, fn in ((nn.RNNCell(n_in, hs), R.rnn_tanh_step), (nn.GRUCell(n_in, hs), R.gru_step)):
        cell = cell.double()
        params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        h_new, jac = fn(inp(h), h, *params, dx_dh=dx)
        torch.testing.assert_close(h_new, cell(inp(h), h))
        for k in range(b):
            want = torch.autograd.functional.jacobian(lambda v: cell(inp(v[None], k), v[None])[0], h[k])
            torch.testing.assert_close(jac[k], want)
    cell = nn.LSTMCell(n_in, hs).double()
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    h_new, c_new, jac = R.lstm_step(inp(h), h, c, *params, dx_dh=dx)
    want_h, want_c = cell(inp(h), (h, c))
    torch.testing.assert_close(h_new, want_h)
    torch.testing.assert_close(c_new, want_c)

    def state_map(s, k):
        hh, cc = s[:hs][None], s[hs:][None]
        nh, nc = cell(inp(hh, k), (hh, cc))
        return torch.cat([nh[0], nc[0]])

    for k in range(b):
        want = torch.autograd.functional.jacobian(lambda s: state_map(s, k), torch.cat([h[k], c[k]]))
        torch.testing.assert_close(jac[k], want)


@pytest.mark.slow
@pytest.mark.skipif(interpreting(), reason="trains a model (about 30 s on 2 cores); the normal pass runs it")
def test_gru_learns_lorenz_climate():
    """A GRU trained on Lorenz-63 reproduces the leading Lyapunov exponent within 10%."""
    from latentfast.rnn.climate import lorenz_climate

    res = lorenz_climate(progress=False)
    assert res["leading_rel_err"] < 0.10, res
    assert abs(res["lyapunov"][1]) < 0.1, res  # the neutral exponent of a flow
    assert min(res["valid_prediction_lyapunov_times"]) > 0.5, res


@pytest.mark.skipif(interpreting(), reason="trains a model for an epoch; the normal pass runs it")
def test_lorenz_climate_leaves_the_global_random_state_alone():
    """lorenz_climate seeds its model inside torch.random.fork_rng: the global state after the
    call is the one before (before, it called torch.manual_seed(seed) on it), and two calls
    give the same result. No epochs raises (before, an IndexError on the empty history)."""
    from latentfast.rnn.climate import lorenz_climate

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = lorenz_climate(hidden=8, epochs=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = lorenz_climate(hidden=8, epochs=1, progress=False)
    assert first["lyapunov"] == second["lyapunov"] and first["final_loss"] == second["final_loss"]
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        lorenz_climate(hidden=8, epochs=0, progress=False)
