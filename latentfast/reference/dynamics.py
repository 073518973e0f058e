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
                      generator: torch.Generator | None = None, q0: Tensor | None = None) -> Tensor:
    """The k leading Lyapunov exponents [B, k] of each of the B initial states h0 [B, n].

    step(h [B, n]) -> (F(h) [B, n], dF/dh [B, n, n]); `transient` steps are run first and
    not counted. q0 [B, n, k]: the initial tangent frame (orthonormalised; random if None).
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
    if q0 is None:
        # on the generator's device, or the CPU (latentfast.data._cpu.draw_device; this package
        # imports nothing else of latentfast)
        q0 = torch.randn(b, n, k, dtype=h0.dtype, generator=generator,
                         device=generator.device if generator is not None else "cpu").to(h0.device)
    q = torch.linalg.qr(q0)[0]
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



# ------------------------------------------------ tangent form (what the lyapunov ops run)
# The fused ops never form the [S, S] Jacobian: the k tangent vectors ride with the state
# as extra rows of one GEMM per step, V [B, 1 + k, S] (row 0 the state, rows 1.. the
# tangents as rows), and one element-wise pass applies the gate derivatives.

RNN_CELLS = {"rnn_tanh": 0, "gru": 1, "lstm": 2}


def rnn_tangent_matrices(cell: str, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor,
                         readout_weight: Tensor | None = None, readout_bias: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
    """(mat [G, H], bias [G]) of the closed-loop map s' = Cell(W_out h + b_out, s), with the
    readout folded into the input weights (zero input when there is no readout):
    rnn_tanh and lstm: mat = W_ih W_out + W_hh, bias = W_ih b_out + b_ih + b_hh (G = H, 4H);
    gru: rows (r, z) as above, then the input part of n, then the hidden part of n (G = 4H)."""
    hs = weight_hh.shape[1]
    if readout_weight is None:
        w_in, b_in = torch.zeros_like(weight_hh), bias_ih
    else:
        w_in = weight_ih @ readout_weight
        b_in = weight_ih @ (readout_bias if readout_bias is not None else
                            readout_weight.new_zeros(readout_weight.shape[0])) + bias_ih
    if cell == "gru":
        mat = torch.cat([w_in[:2 * hs] + weight_hh[:2 * hs], w_in[2 * hs:], weight_hh[2 * hs:]])
        bias = torch.cat([b_in[:2 * hs] + bias_hh[:2 * hs], b_in[2 * hs:], bias_hh[2 * hs:]])
        return mat, bias
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {sorted(RNN_CELLS)}, got {cell!r}")
    return w_in + weight_hh, b_in + bias_hh


def rnn_tangent_step(cell: int, mat: Tensor, bias: Tensor, v: Tensor) -> Tensor:
    """One closed-loop step of the state (row 0 of v [B, R, S]) and of the tangents (rows
    1..R-1); cell codes as RNN_CELLS. Returns the new v."""
    hs = mat.shape[1]
    pre = v[:, :, :hs] @ mat.T  # [B, R, G]
    p0 = pre[:, :1] + bias
    pt = pre[:, 1:]
    h = v[:, :1, :hs]
    if cell == 0:
        h_new = torch.tanh(p0)
        return torch.cat([h_new, (1 - h_new ** 2) * pt], 1)
    if cell == 1:
        r = torch.sigmoid(p0[..., :hs])
        z = torch.sigmoid(p0[..., hs:2 * hs])
        ghn = p0[..., 3 * hs:]
        n = torch.tanh(p0[..., 2 * hs:3 * hs] + r * ghn)
        dr = r * (1 - r) * pt[..., :hs]
        dz = z * (1 - z) * pt[..., hs:2 * hs]
        dn = (1 - n ** 2) * (pt[..., 2 * hs:3 * hs] + r * pt[..., 3 * hs:] + dr * ghn)
        dv = (1 - z) * dn + z * v[:, 1:] + (h - n) * dz
        return torch.cat([n + z * (h - n), dv], 1)
    c = v[:, :1, hs:]
    i, f, o = (torch.sigmoid(p0[..., j * hs:(j + 1) * hs]) for j in (0, 1, 3))
    g = torch.tanh(p0[..., 2 * hs:3 * hs])
    c_new = f * c + i * g
    tc = torch.tanh(c_new)
    di = i * (1 - i) * pt[..., :hs]
    df = f * (1 - f) * pt[..., hs:2 * hs]
    dg = (1 - g ** 2) * pt[..., 2 * hs:3 * hs]
    do = o * (1 - o) * pt[..., 3 * hs:]
    dc = df * c + f * v[:, 1:, hs:] + di * g + i * dg
    dh = do * tc + o * (1 - tc ** 2) * dc
    return torch.cat([torch.cat([o * tc, c_new], 2), torch.cat([dh, dc], 2)], 1)


def _qr_rows(v: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormalise the tangent rows v [B, k, S]: (new rows, log|diag R| [B, k])."""
    q, r = torch.linalg.qr(v.transpose(1, 2))
    return q.transpose(1, 2), torch.diagonal(r, dim1=-2, dim2=-1).abs().log()


def tangent_lyapunov(step: Callable[[Tensor], Tensor], s0: Tensor, q0: Tensor, n_steps: int, qr_every: int,
                     transient: int, dt: float) -> tuple[Tensor, Tensor]:
    """Benettin on the tangent form: step(v [B, R, S]) -> v'. s0 [B, S], q0 [B, S, k].
    Returns (exponents [B, k], final state [B, S])."""
    v = s0[:, None]
    for _ in range(transient):
        v = step(v)
    q, _ = _qr_rows(q0.transpose(1, 2))
    v = torch.cat([v, q], 1)
    sums = s0.new_zeros((s0.shape[0], q0.shape[2]))
    for t in range(n_steps):
        v = step(v)
        if (t + 1) % qr_every == 0 or t == n_steps - 1:
            q, logs = _qr_rows(v[:, 1:])
            sums = sums + logs
            v = torch.cat([v[:, :1], q], 1)
    return sums / (n_steps * dt), v[:, 0]


def rnn_lyapunov(s0: Tensor, q0: Tensor, mat: Tensor, bias: Tensor, cell: int, n_steps: int, qr_every: int,
                 transient: int, dt: float) -> tuple[Tensor, Tensor]:
    """Specification of latentfast::rnn_lyapunov: (exponents [B, k], final state [B, S])."""
    return tangent_lyapunov(lambda v: rnn_tangent_step(cell, mat, bias, v), s0, q0, n_steps, qr_every,
                            transient, dt)


LORENZ_SYSTEMS = {"lorenz63": 0, "lorenz96": 1}


def lorenz_field_jvp(system: int, x: Tensor, p: tuple[float, float, float]) -> tuple[Tensor, Tensor]:
    """(field f(x), the Jacobian applied to the other rows) for v [B, R, N] with x = v[:, :1]
    - returned stacked as one [B, R, N]: row 0 f(x), rows 1.. J(x) v_j."""
    s, t = x[:, :1], x[:, 1:]
    if system == 0:
        sigma, rho, beta = p
        a, b, c = s[..., 0], s[..., 1], s[..., 2]
        da, db, dc = t[..., 0], t[..., 1], t[..., 2]
        f = torch.stack([sigma * (b - a), a * (rho - c) - b, a * b - beta * c], -1)
        jv = torch.stack([sigma * (db - da), da * (rho - c) - a * dc - db, da * b + a * db - beta * dc], -1)
        return torch.cat([f, jv], 1)
    forcing = p[0]

    def roll(u, k):
        return torch.roll(u, k, dims=-1)

    f = (roll(s, -1) - roll(s, 2)) * roll(s, 1) - s + forcing
    jv = (roll(t, -1) - roll(t, 2)) * roll(s, 1) + (roll(s, -1) - roll(s, 2)) * roll(t, 1) - t
    return torch.cat([f, jv], 1)


def lorenz_tangent_step(system: int, p: tuple[float, float, float], dt: float, v: Tensor) -> Tensor:
    """One RK4 step of the state (row 0 of v [B, R, N]) and its exact tangent map applied
    to the rows 1.. (the RK4 of the variational equation, stage by stage)."""
    k1 = lorenz_field_jvp(system, v, p)
    k2 = lorenz_field_jvp(system, v + 0.5 * dt * k1, p)
    k3 = lorenz_field_jvp(system, v + 0.5 * dt * k2, p)
    k4 = lorenz_field_jvp(system, v + dt * k3, p)
    return v + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


def lorenz_lyapunov(x0: Tensor, q0: Tensor, system: int, p0: float, p1: float, p2: float, dt: float,
                    n_steps: int, qr_every: int, transient: int) -> tuple[Tensor, Tensor]:
    """Specification of latentfast::lorenz_lyapunov: (exponents per unit time [B, k], final
    state [B, N])."""
    p = (p0, p1, p2)
    return tangent_lyapunov(lambda v: lorenz_tangent_step(system, p, dt, v), x0, q0, n_steps, qr_every,
                            transient, dt)
