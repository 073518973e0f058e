"""Reference (specification) of the Lyapunov spectrum of a map h_{t+1} = F(h_t).

Benettin's method: push k orthonormal tangent vectors through the step Jacobians, and
re-orthonormalise them by QR every `qr_every` steps; the exponents are the time averages of
log |diag R|. For a flow sampled with step dt, divide by dt (exponents per unit time).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def lyapunov_spectrum(step: Callable[[Tensor], tuple[Tensor, Tensor]], h0: Tensor, k: int, n_steps: int,
                      dt: float = 1.0, qr_every: int = 1, transient: int = 0,
                      generator: torch.Generator | None = None) -> Tensor:
    """The k leading Lyapunov exponents [B, k] of each of the B initial states h0 [B, n].

    step(h [B, n]) -> (F(h) [B, n], dF/dh [B, n, n]); `transient` steps are run first and
    not counted.
    """
    if h0.dim() != 2:
        raise ValueError(f"h0 must be [B, n], got shape {tuple(h0.shape)}")
    b, n = h0.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n_steps < 1 or qr_every < 1:
        raise ValueError("n_steps and qr_every must be >= 1")
    h = h0
    for _ in range(transient):
        h, _ = step(h)
    q = torch.linalg.qr(torch.randn(b, n, k, dtype=h0.dtype, generator=generator).to(h0.device))[0]
    sums = h0.new_zeros((b, k))
    for t in range(n_steps):
        h, jac = step(h)
        q = jac @ q
        if (t + 1) % qr_every == 0 or t == n_steps - 1:
            q, r = torch.linalg.qr(q)
            sums += torch.diagonal(r, dim1=-2, dim2=-1).abs().log()
    return sums / (n_steps * dt)


# ---------------------------------------------------------------- analytic step Jacobians
# Weights follow torch.nn.RNNCell / GRUCell / LSTMCell (gate order r, z, n for the GRU and
# i, f, g, o for the LSTM). For closed-loop (autonomous) use, the input depends on the
# state through a linear readout x = W_out h + b_out: pass dx_dh = W_out [I, H] and the
# Jacobian includes that path.


def _input_term(w_ih: Tensor, dx_dh: Tensor | None) -> Tensor | None:
    return None if dx_dh is None else w_ih @ dx_dh  # [G, H]


def rnn_tanh_step(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                  bias_hh: Tensor, dx_dh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh) and dh'/dh [B, H, H], for x [B, I], h [B, H]."""
    h_new = torch.tanh(x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh)
    w = weight_hh if dx_dh is None else weight_hh + weight_ih @ dx_dh
    return h_new, (1 - h_new ** 2)[:, :, None] * w


def gru_step(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
             bias_hh: Tensor, dx_dh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One torch.nn.GRUCell step h' and its Jacobian dh'/dh [B, H, H]."""
    hs = h.shape[1]
    gi = x @ weight_ih.T + bias_ih
    gh = h @ weight_hh.T + bias_hh
    r = torch.sigmoid(gi[:, :hs] + gh[:, :hs])
    z = torch.sigmoid(gi[:, hs:2 * hs] + gh[:, hs:2 * hs])
    hn = gh[:, 2 * hs:]
    n = torch.tanh(gi[:, 2 * hs:] + r * hn)
    h_new = (1 - z) * n + z * h
    w_hr, w_hz, w_hn = weight_hh.split(hs)
    extra = _input_term(weight_ih, dx_dh)
    e_r, e_z, e_n = extra.split(hs) if extra is not None else (0.0, 0.0, 0.0)
    dr = (r * (1 - r))[:, :, None] * (w_hr + e_r)
    dz = (z * (1 - z))[:, :, None] * (w_hz + e_z)
    da_n = e_n + r[:, :, None] * w_hn + hn[:, :, None] * dr
    dn = (1 - n ** 2)[:, :, None] * da_n
    eye = torch.eye(hs, dtype=h.dtype, device=h.device)
    jac = (1 - z)[:, :, None] * dn + z[:, :, None] * eye + (h - n)[:, :, None] * dz
    return h_new, jac


def lstm_step(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
              bias_hh: Tensor, dx_dh: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One torch.nn.LSTMCell step (h', c') and the Jacobian of (h', c') wrt (h, c),
    [B, 2H, 2H] with the state ordered (h, c)."""
    hs = h.shape[1]
    g_all = x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh
    i, f, g, o = g_all.split(hs, dim=1)
    i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
    c_new = f * c + i * g
    tc = torch.tanh(c_new)
    h_new = o * tc
    w = weight_hh if dx_dh is None else weight_hh + weight_ih @ dx_dh
    w_i, w_f, w_g, w_o = w.split(hs)
    di = (i * (1 - i))[:, :, None] * w_i
    df = (f * (1 - f))[:, :, None] * w_f
    dg = (1 - g ** 2)[:, :, None] * w_g
    do = (o * (1 - o))[:, :, None] * w_o
    eye = torch.eye(hs, dtype=h.dtype, device=h.device).expand(h.shape[0], hs, hs)
    dc_dh = c[:, :, None] * df + g[:, :, None] * di + i[:, :, None] * dg
    dc_dc = f[:, :, None] * eye
    dh_dh = tc[:, :, None] * do + (o * (1 - tc ** 2))[:, :, None] * dc_dh
    dh_dc = (o * (1 - tc ** 2))[:, :, None] * dc_dc
    jac = torch.cat([torch.cat([dh_dh, dh_dc], 2), torch.cat([dc_dh, dc_dc], 2)], 1)
    return h_new, c_new, jac
