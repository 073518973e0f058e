"""Triton kernels of gru_sequence (GPU, and CPU under TRITON_INTERPRET=1).

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
