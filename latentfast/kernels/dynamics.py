"""Triton kernels of the Lyapunov ops (GPU, and CPU under TRITON_INTERPRET=1).

rnn_lyapunov: per step one cuBLAS GEMM of the state and tangent rows against the folded
weights, then one fused Triton kernel for the gates and their derivatives (state and all
tangent rows of a column block in one program). lorenz_lyapunov: one program per initial
condition runs `qr_every` RK4 steps of the state and its tangent rows in one launch (the
rolled neighbours of Lorenz-96 are read back from a per-program scratch row). The QR
re-orthonormalisation between launches is torch.linalg.qr. Math:
latentfast/reference/dynamics.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from latentfast.kernels import check_args, check_rank, launch
from latentfast.kernels._math import sigmoid as _sigmoid, tanh as _tanh
from latentfast.reference.dynamics import _qr_rows


@triton.jit
def _rnn_tangent_kernel(pre_ptr, bias_ptr, v_ptr, H, R, S, G, vb_stride, CELL: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = cols < H
    p = pre_ptr + b * R * G
    vb = v_ptr + b * vb_stride
    if CELL == 0:
        hn = _tanh(tl.load(p + cols, mask=m, other=0.0) + tl.load(bias_ptr + cols, mask=m, other=0.0))
        d = 1.0 - hn * hn
        for row in range(1, R):
            pt = tl.load(p + row * G + cols, mask=m, other=0.0)
            tl.store(vb + row * S + cols, d * pt, mask=m)
        tl.store(vb + cols, hn, mask=m)
    elif CELL == 1:
        r = _sigmoid(tl.load(p + cols, mask=m, other=0.0) + tl.load(bias_ptr + cols, mask=m, other=0.0))
        z = _sigmoid(tl.load(p + H + cols, mask=m, other=0.0) + tl.load(bias_ptr + H + cols, mask=m, other=0.0))
        ghn = tl.load(p + 3 * H + cols, mask=m, other=0.0) + tl.load(bias_ptr + 3 * H + cols, mask=m, other=0.0)
        n = _tanh(tl.load(p + 2 * H + cols, mask=m, other=0.0) + tl.load(bias_ptr + 2 * H + cols, mask=m, other=0.0)
                  + r * ghn)
        hmn = tl.load(vb + cols, mask=m, other=0.0) - n
        rr = r * (1.0 - r)
        zz = z * (1.0 - z)
        nn = 1.0 - n * n
        for row in range(1, R):
            pt = p + row * G
            vt = vb + row * S
            dr = rr * tl.load(pt + cols, mask=m, other=0.0)
            dz = zz * tl.load(pt + H + cols, mask=m, other=0.0)
            dn = nn * (tl.load(pt + 2 * H + cols, mask=m, other=0.0) + r * tl.load(pt + 3 * H + cols, mask=m, other=0.0)
                       + dr * ghn)
            tl.store(vt + cols, (1.0 - z) * dn + z * tl.load(vt + cols, mask=m, other=0.0) + hmn * dz, mask=m)
        tl.store(vb + cols, n + z * hmn, mask=m)
    else:
        i = _sigmoid(tl.load(p + cols, mask=m, other=0.0) + tl.load(bias_ptr + cols, mask=m, other=0.0))
        f = _sigmoid(tl.load(p + H + cols, mask=m, other=0.0) + tl.load(bias_ptr + H + cols, mask=m, other=0.0))
        g = _tanh(tl.load(p + 2 * H + cols, mask=m, other=0.0) + tl.load(bias_ptr + 2 * H + cols, mask=m, other=0.0))
        o = _sigmoid(tl.load(p + 3 * H + cols, mask=m, other=0.0) + tl.load(bias_ptr + 3 * H + cols, mask=m, other=0.0))
        c = tl.load(vb + H + cols, mask=m, other=0.0)
        cn = f * c + i * g
        tc = _tanh(cn)
        for row in range(1, R):
            pt = p + row * G
            vt = vb + row * S
            dc = f * (1.0 - f) * tl.load(pt + H + cols, mask=m, other=0.0) * c \
                + f * tl.load(vt + H + cols, mask=m, other=0.0) \
                + i * (1.0 - i) * tl.load(pt + cols, mask=m, other=0.0) * g \
                + i * (1.0 - g * g) * tl.load(pt + 2 * H + cols, mask=m, other=0.0)
            tl.store(vt + H + cols, dc, mask=m)
            tl.store(vt + cols, o * (1.0 - o) * tc * tl.load(pt + 3 * H + cols, mask=m, other=0.0)
                     + o * (1.0 - tc * tc) * dc, mask=m)
        tl.store(vb + cols, o * tc, mask=m)
        tl.store(vb + H + cols, cn, mask=m)


def _check_lyap(op: str, s0: Tensor, q0: Tensor, n_steps: int, qr_every: int, transient: int) -> None:
    """s0 [B, S], q0 [B, S, k] with 1 <= k <= S, and step counts the loops can run."""
    check_rank(op, s0=(s0, 2), q0=(q0, 3))
    b, s = s0.shape
    if not 1 <= q0.shape[2] <= s:
        raise ValueError(f"{op}: q0 must be [B, S, k] with 1 <= k <= S = {s}, got {list(q0.shape)}")
    check_args(op, s0, q0=(q0, (b, s, q0.shape[2])))
    if n_steps < 1 or qr_every < 1 or transient < 0:
        raise ValueError(f"{op}: n_steps and qr_every must be >= 1 and transient >= 0, got {n_steps}, {qr_every}, "
                         f"{transient}")


def rnn_lyapunov(s0: Tensor, q0: Tensor, mat: Tensor, bias: Tensor, cell: int, n_steps: int, qr_every: int,
                 transient: int, dt: float) -> tuple[Tensor, Tensor]:
    _check_lyap("rnn_lyapunov", s0, q0, n_steps, qr_every, transient)
    check_rank("rnn_lyapunov", mat=(mat, 2))
    b, s = s0.shape
    k = q0.shape[2]
    g, hs = mat.shape
    if cell not in (0, 1, 2) or g != (hs if cell == 0 else 4 * hs) or s != (2 * hs if cell == 2 else hs):
        raise ValueError(f"rnn_lyapunov: cell must be 0 (tanh RNN), 1 (GRU) or 2 (LSTM), and mat [G, H] and the "
                         f"state size must fit it; got cell {cell}, mat {list(mat.shape)}, state size {s}")
    check_args("rnn_lyapunov", s0, mat=(mat, (g, hs)), bias=(bias, g))
    r = k + 1
    v = torch.empty((b, r, s), dtype=s0.dtype, device=s0.device)
    v[:, 0] = s0
    v[:, 1:] = q0.transpose(1, 2)
    mat_t, bias = mat.T, bias.contiguous()
    pre = torch.empty((b * r, g), dtype=s0.dtype, device=s0.device)
    block_h = min(128, triton.next_power_of_2(hs))

    def step(rows: int):
        vin = v.view(b * r, s)[:, :hs] if rows == r else v[:, 0, :hs]
        p = pre[:b * rows]
        torch.mm(vin, mat_t, out=p)
        launch(_rnn_tangent_kernel, (b, triton.cdiv(hs, block_h)), p, bias, v, hs, rows, s, g, r * s, CELL=cell,
               BLOCK_H=block_h)

    for _ in range(transient):
        step(1)
    v[:, 1:] = _qr_rows(v[:, 1:])[0]
    sums = s0.new_zeros((b, k))
    for t in range(n_steps):
        step(r)
        if (t + 1) % qr_every == 0 or t == n_steps - 1:
            q, logs = _qr_rows(v[:, 1:])
            sums += logs
            v[:, 1:] = q
    return sums / (n_steps * dt), v[:, 0].clone()


@triton.jit
def _lorenz_field(u, rows, cols, scr, N, SYSTEM: tl.constexpr, p0, p1, p2, NP: tl.constexpr):
    """Field on row 0 of the tile u [RP, NP] and its Jacobian on the other rows; the rolled
    and per-column reads go through the scratch tile scr (this program's own row)."""
    tile = rows[:, None] * NP + cols[None, :]
    tl.store(scr + tile, u)
    tl.debug_barrier()
    if SYSTEM == 0:
        a = tl.load(scr + rows * NP)
        b_ = tl.load(scr + rows * NP + 1)
        c = tl.load(scr + rows * NP + 2)
        s_a = tl.load(scr + 0)
        s_b = tl.load(scr + 1)
        s_c = tl.load(scr + 2)
        is0 = rows == 0
        f0 = p0 * (b_ - a)
        f1 = tl.where(is0, a * (p1 - c) - b_, a * (p1 - s_c) - s_a * c - b_)
        f2 = tl.where(is0, a * b_ - p2 * c, a * s_b + s_a * b_ - p2 * c)
        out = tl.where(cols[None, :] == 0, f0[:, None], tl.where(cols[None, :] == 1, f1[:, None], f2[:, None]))
    else:
        ip1 = (cols + 1) % N
        im1 = (cols + N - 1) % N
        im2 = (cols + N - 2) % N
        t_p1 = tl.load(scr + rows[:, None] * NP + ip1[None, :])
        t_m1 = tl.load(scr + rows[:, None] * NP + im1[None, :])
        t_m2 = tl.load(scr + rows[:, None] * NP + im2[None, :])
        s_p1 = tl.load(scr + ip1)[None, :]
        s_m1 = tl.load(scr + im1)[None, :]
        s_m2 = tl.load(scr + im2)[None, :]
        is0 = (rows == 0)[:, None]
        state = (s_p1 - s_m2) * s_m1 - u + p0
        tang = (t_p1 - t_m2) * s_m1 + (s_p1 - s_m2) * t_m1 - u
        out = tl.where(is0, state, tang)
    tl.debug_barrier()
    return out


@triton.jit
def _lorenz_rk4_kernel(v_ptr, scr_ptr, R, N, n_steps, dt, p0, p1, p2, SYSTEM: tl.constexpr,
                       RP: tl.constexpr, NP: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, RP)
    cols = tl.arange(0, NP)
    m = (rows < R)[:, None] & (cols < N)[None, :]
    tile = rows[:, None] * N + cols[None, :]
    vp = v_ptr + pid * R * N
    scr = scr_ptr + pid * RP * NP
    v = tl.load(vp + tile, mask=m, other=0.0)
    for _ in range(n_steps):
        k1 = _lorenz_field(v, rows, cols, scr, N, SYSTEM, p0, p1, p2, NP)
        k2 = _lorenz_field(v + 0.5 * dt * k1, rows, cols, scr, N, SYSTEM, p0, p1, p2, NP)
        k3 = _lorenz_field(v + 0.5 * dt * k2, rows, cols, scr, N, SYSTEM, p0, p1, p2, NP)
        k4 = _lorenz_field(v + dt * k3, rows, cols, scr, N, SYSTEM, p0, p1, p2, NP)
        v = v + dt / 6.0 * (k1 + 2.0 * (k2 + k3) + k4)
        v = tl.where(m, v, 0.0)
    tl.store(vp + tile, v, mask=m)


def lorenz_lyapunov(x0: Tensor, q0: Tensor, system: int, p0: float, p1: float, p2: float, dt: float,
                    n_steps: int, qr_every: int, transient: int) -> tuple[Tensor, Tensor]:
    _check_lyap("lorenz_lyapunov", x0, q0, n_steps, qr_every, transient)
    if system not in (0, 1) or (system == 0 and x0.shape[1] != 3) or (system == 1 and x0.shape[1] < 4):
        raise ValueError(f"lorenz_lyapunov: system must be 0 (Lorenz-63, states [B, 3]) or 1 (Lorenz-96, N >= 4), "
                         f"got system {system} with states {list(x0.shape)}")
    b, n = x0.shape
    k = q0.shape[2]
    npad = triton.next_power_of_2(n)
    scr = torch.zeros((b, triton.next_power_of_2(k + 1) * npad), dtype=x0.dtype, device=x0.device)

    def run(v: Tensor, steps: int) -> None:
        r = v.shape[1]
        launch(_lorenz_rk4_kernel, (b,), v, scr, r, n, steps, dt, p0, p1, p2, SYSTEM=system,
               RP=max(2, triton.next_power_of_2(r)), NP=npad)

    state = x0.contiguous().clone()[:, None]
    if transient:
        run(state, transient)
    v = torch.cat([state, _qr_rows(q0.transpose(1, 2))[0]], 1).contiguous()
    sums = x0.new_zeros((b, k))
    done = 0
    while done < n_steps:
        steps = min(qr_every, n_steps - done)
        run(v, steps)
        done += steps
        q, logs = _qr_rows(v[:, 1:])
        sums += logs
        v[:, 1:] = q
    return sums / (n_steps * dt), v[:, 0].clone()
