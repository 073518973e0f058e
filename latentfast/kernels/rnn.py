"""Triton kernels of gru_sequence and lstm_sequence (GPU, and CPU under TRITON_INTERPRET=1).

Per step, one cuBLAS GEMM (h W_hh^T) and one fused Triton kernel for the gates; the input
projections of all steps are one GEMM up front, and the backward through time mirrors it.
(The step loop is issued from Python; a persistent kernel holding W_hh on chip across
steps is not written yet.) Math: latentfast/reference/rnn.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sigmoid(a):
    e = tl.exp(-tl.abs(a))
    r = 1.0 / (1.0 + e)
    return tl.where(a < 0, e * r, r)


@triton.jit
def _tanh(a):
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0, -t, t)


@triton.jit
def _gates_fwd_kernel(gi_ptr, gh_ptr, h_ptr, out_ptr, gates_ptr, B, H, SAVE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    g3 = rows[:, None] * 3 * H + cols[None, :]
    r = _sigmoid(tl.load(gi_ptr + g3, mask=m, other=0.0) + tl.load(gh_ptr + g3, mask=m, other=0.0))
    z = _sigmoid(tl.load(gi_ptr + g3 + H, mask=m, other=0.0) + tl.load(gh_ptr + g3 + H, mask=m, other=0.0))
    ghn = tl.load(gh_ptr + g3 + 2 * H, mask=m, other=0.0)
    n = _tanh(tl.load(gi_ptr + g3 + 2 * H, mask=m, other=0.0) + r * ghn)
    h1 = rows[:, None] * H + cols[None, :]
    h = tl.load(h_ptr + h1, mask=m, other=0.0)
    tl.store(out_ptr + h1, n + z * (h - n), mask=m)
    if SAVE:
        g4 = rows[:, None] * 4 * H + cols[None, :]
        tl.store(gates_ptr + g4, r, mask=m)
        tl.store(gates_ptr + g4 + H, z, mask=m)
        tl.store(gates_ptr + g4 + 2 * H, n, mask=m)
        tl.store(gates_ptr + g4 + 3 * H, ghn, mask=m)


@triton.jit
def _gates_bwd_kernel(dh_ptr, hp_ptr, gates_ptr, dgi_ptr, dgh_ptr, dd_ptr, B, H,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    h1 = rows[:, None] * H + cols[None, :]
    g4 = rows[:, None] * 4 * H + cols[None, :]
    g3 = rows[:, None] * 3 * H + cols[None, :]
    r = tl.load(gates_ptr + g4, mask=m, other=0.0)
    z = tl.load(gates_ptr + g4 + H, mask=m, other=0.0)
    n = tl.load(gates_ptr + g4 + 2 * H, mask=m, other=0.0)
    ghn = tl.load(gates_ptr + g4 + 3 * H, mask=m, other=0.0)
    d = tl.load(dh_ptr + h1, mask=m, other=0.0)
    hp = tl.load(hp_ptr + h1, mask=m, other=0.0)
    da_n = d * (1.0 - z) * (1.0 - n * n)
    da_r = da_n * ghn * r * (1.0 - r)
    da_z = d * (hp - n) * z * (1.0 - z)
    tl.store(dgi_ptr + g3, da_r, mask=m)
    tl.store(dgi_ptr + g3 + H, da_z, mask=m)
    tl.store(dgi_ptr + g3 + 2 * H, da_n, mask=m)
    tl.store(dgh_ptr + g3, da_r, mask=m)
    tl.store(dgh_ptr + g3 + H, da_z, mask=m)
    tl.store(dgh_ptr + g3 + 2 * H, da_n * r, mask=m)
    tl.store(dd_ptr + h1, d * z, mask=m)


def _grid(b: int, h: int) -> tuple[tuple[int, int], int, int]:
    block_h = min(128, triton.next_power_of_2(max(h, 1)))
    block_b = max(1, min(16, 2048 // block_h))
    return (triton.cdiv(b, block_b), triton.cdiv(h, block_h)), block_b, block_h


def gru_sequence_fwd(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                     bias_hh: Tensor, save: bool) -> tuple[Tensor, Tensor]:
    x, h0 = x.contiguous(), h0.contiguous()
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    out = torch.empty((t_len, b, hs), dtype=x.dtype, device=x.device)
    gates = torch.empty((t_len, b, 4 * hs) if save else (0,), dtype=x.dtype, device=x.device)
    if t_len == 0:
        return out, gates
    gi_all = torch.addmm(bias_ih, x.view(t_len * b, n_in), weight_ih.T).view(t_len, b, 3 * hs)
    gh = torch.empty((b, 3 * hs), dtype=x.dtype, device=x.device)
    w_t = weight_hh.T
    grid, bb, bh = _grid(b, hs)
    for t in range(t_len):
        h = h0 if t == 0 else out[t - 1]
        torch.addmm(bias_hh, h, w_t, out=gh)
        _gates_fwd_kernel[grid](gi_all[t], gh, h, out[t], gates[t] if save else gh, b, hs, SAVE=save,
                                BLOCK_B=bb, BLOCK_H=bh)
    return out, gates


def gru_sequence_bwd(grad_out: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                     out: Tensor, gates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, h0, out, gates, grad_out = (t.contiguous() for t in (x, h0, out, gates, grad_out))
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    dgi = torch.empty((t_len, b, 3 * hs), dtype=x.dtype, device=x.device)
    dgh = torch.empty_like(dgi)
    dh = torch.zeros_like(h0)
    dh_acc = torch.empty_like(h0)
    dd = torch.empty_like(h0)
    grid, bb, bh = _grid(b, hs)
    for t in range(t_len - 1, -1, -1):
        torch.add(dh, grad_out[t], out=dh_acc)
        hp = h0 if t == 0 else out[t - 1]
        _gates_bwd_kernel[grid](dh_acc, hp, gates[t], dgi[t], dgh[t], dd, b, hs, BLOCK_B=bb, BLOCK_H=bh)
        torch.addmm(dd, dgh[t], weight_hh, out=dh)
    dgi2, dgh2 = dgi.view(-1, 3 * hs), dgh.view(-1, 3 * hs)
    h_prev = torch.cat([h0[None], out[:-1]], 0).view(-1, hs)
    return (dgi2 @ weight_ih).view(t_len, b, n_in), dh, dgi2.T @ x.view(-1, n_in), dgh2.T @ h_prev, \
        dgi2.sum(0), dgh2.sum(0)


# ---------------------------------------------------------------------------------- LSTM
@triton.jit
def _lstm_fwd_kernel(a_ptr, c_ptr, h_out_ptr, c_out_ptr, gates_ptr, B, H, SAVE: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    g4 = rows[:, None] * 4 * H + cols[None, :]
    h1 = rows[:, None] * H + cols[None, :]
    i = _sigmoid(tl.load(a_ptr + g4, mask=m, other=0.0))
    f = _sigmoid(tl.load(a_ptr + g4 + H, mask=m, other=0.0))
    g = _tanh(tl.load(a_ptr + g4 + 2 * H, mask=m, other=0.0))
    o = _sigmoid(tl.load(a_ptr + g4 + 3 * H, mask=m, other=0.0))
    c = f * tl.load(c_ptr + h1, mask=m, other=0.0) + i * g
    tl.store(c_out_ptr + h1, c, mask=m)
    tl.store(h_out_ptr + h1, o * _tanh(c), mask=m)
    if SAVE:
        tl.store(gates_ptr + g4, i, mask=m)
        tl.store(gates_ptr + g4 + H, f, mask=m)
        tl.store(gates_ptr + g4 + 2 * H, g, mask=m)
        tl.store(gates_ptr + g4 + 3 * H, o, mask=m)


@triton.jit
def _lstm_bwd_kernel(dh_ptr, go_ptr, dc_ptr, gc_ptr, gates_ptr, cp_ptr, cn_ptr, da_ptr, dcp_ptr, B, H,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    g4 = rows[:, None] * 4 * H + cols[None, :]
    h1 = rows[:, None] * H + cols[None, :]
    i = tl.load(gates_ptr + g4, mask=m, other=0.0)
    f = tl.load(gates_ptr + g4 + H, mask=m, other=0.0)
    g = tl.load(gates_ptr + g4 + 2 * H, mask=m, other=0.0)
    o = tl.load(gates_ptr + g4 + 3 * H, mask=m, other=0.0)
    d = tl.load(dh_ptr + h1, mask=m, other=0.0) + tl.load(go_ptr + h1, mask=m, other=0.0)
    tc = _tanh(tl.load(cn_ptr + h1, mask=m, other=0.0))
    c = tl.load(dc_ptr + h1, mask=m, other=0.0) + tl.load(gc_ptr + h1, mask=m, other=0.0) \
        + d * o * (1.0 - tc * tc)
    tl.store(da_ptr + g4, c * g * i * (1.0 - i), mask=m)
    tl.store(da_ptr + g4 + H, c * tl.load(cp_ptr + h1, mask=m, other=0.0) * f * (1.0 - f), mask=m)
    tl.store(da_ptr + g4 + 2 * H, c * i * (1.0 - g * g), mask=m)
    tl.store(da_ptr + g4 + 3 * H, d * tc * o * (1.0 - o), mask=m)
    tl.store(dcp_ptr + h1, c * f, mask=m)


def lstm_sequence_fwd(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                      bias_hh: Tensor, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    out = torch.empty((t_len, b, hs), dtype=x.dtype, device=x.device)
    cells = torch.empty_like(out)
    gates = torch.empty((t_len, b, 4 * hs) if save else (0,), dtype=x.dtype, device=x.device)
    if t_len == 0:
        return out, cells, gates
    a_all = torch.addmm(bias_ih + bias_hh, x.view(t_len * b, n_in), weight_ih.T).view(t_len, b, 4 * hs)
    a = torch.empty((b, 4 * hs), dtype=x.dtype, device=x.device)
    w_t = weight_hh.T
    grid, bb, bh = _grid(b, hs)
    for t in range(t_len):
        h = h0 if t == 0 else out[t - 1]
        c = c0 if t == 0 else cells[t - 1]
        torch.addmm(a_all[t], h, w_t, out=a)
        _lstm_fwd_kernel[grid](a, c, out[t], cells[t], gates[t] if save else a, b, hs, SAVE=save,
                               BLOCK_B=bb, BLOCK_H=bh)
    return out, cells, gates


def lstm_sequence_bwd(grad_out: Tensor, grad_cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                      weight_ih: Tensor, weight_hh: Tensor, out: Tensor, cells: Tensor, gates: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_out, grad_cells, x, h0, c0, out, cells, gates = (
        t.contiguous() for t in (grad_out, grad_cells, x, h0, c0, out, cells, gates))
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    da = torch.empty((t_len, b, 4 * hs), dtype=x.dtype, device=x.device)
    dh = torch.zeros_like(h0)
    dc, dc_next = torch.zeros_like(c0), torch.empty_like(c0)
    grid, bb, bh = _grid(b, hs)
    for t in range(t_len - 1, -1, -1):
        cp = c0 if t == 0 else cells[t - 1]
        _lstm_bwd_kernel[grid](dh, grad_out[t], dc, grad_cells[t], gates[t], cp, cells[t], da[t], dc_next, b, hs,
                               BLOCK_B=bb, BLOCK_H=bh)
        dc, dc_next = dc_next, dc
        torch.mm(da[t], weight_hh, out=dh)
    da2 = da.view(-1, 4 * hs)
    h_prev = torch.cat([h0[None], out[:-1]], 0).view(-1, hs)
    db = da2.sum(0)
    return (da2 @ weight_ih).view(t_len, b, n_in), dh, dc, da2.T @ x.view(-1, n_in), da2.T @ h_prev, db, \
        db.clone()
