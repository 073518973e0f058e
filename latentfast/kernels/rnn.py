"""Triton kernels of gru_sequence and lstm_sequence (GPU, and CPU under TRITON_INTERPRET=1).

Two implementations of each direction, both with the input projections of all steps as one
GEMM up front and the weight gradients as GEMMs over the whole sequence afterwards:

- persistent (the default, ``PERSISTENT = True``): the whole recurrence in ONE launch. Each
  program owns BLOCK_B batch rows and walks all T steps; per step it forms h W_hh^T tile by
  tile with tl.dot (W_hh stays in L2/L1 across steps, h never leaves the program) and writes
  h_t, the cell and the saved gates; a barrier per step (two in the backward: gate gradients,
  then dh = dG W_hh) makes the program's own writes visible to all of its threads. Batch rows
  are independent, so no grid-wide synchronisation is needed; the price is that only
  ceil(B / BLOCK_B) programs run.
- stepwise (``PERSISTENT = False``): per step one cuBLAS GEMM and one fused gate kernel,
  issued from Python (2 launches per step, more SMs busy per step).

Math: latentfast/reference/rnn.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from latentfast.kernels import check_args, check_rank, launch
from latentfast.kernels._math import sigmoid as _sigmoid, tanh as _tanh

PERSISTENT = True  # False: the per-step path (GEMM + gate kernel per step), kept for comparison


def _persistent_blocks(b: int, h: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps); tl.dot needs every tile side >= 16. 8 warps:
    with 4 the sm_90 builds of the forward kernels need all 255 registers and spill 224-568
    bytes a thread (scripts/triton_smem.py); with 8 the GRU's use 188 (float32) and the
    LSTM's spill 16-88 bytes."""
    block_b = 16 if b <= 512 else 32
    block_n = max(16, min(64, triton.next_power_of_2(h)))
    block_k = max(16, min(32, triton.next_power_of_2(h)))
    return block_b, block_n, block_k, 8


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


@triton.jit
def _gate_dot(acc, h, w_ptr, row0, cols, cm, ks, km, H):
    """acc + h [BB, BK] @ W[row0 + cols, ks]^T (a [BK, BN] tile of W^T, W row-major with H columns)."""
    w = tl.load(w_ptr + (row0 + cols[None, :]) * H + ks[:, None], mask=km[:, None] & cm[None, :], other=0.0)
    return acc + tl.dot(h, w, input_precision="ieee")


@triton.jit
def _gru_fwd_persistent_kernel(gi_ptr, h0_ptr, w_ptr, bh_ptr, out_ptr, gates_ptr, T, B, H, SAVE: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    for t in range(T):
        if t == 0:
            hp_ptr = h0_ptr
        else:
            hp_ptr = out_ptr + (t - 1) * B * H
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cm = cols < H
            m = rm[:, None] & cm[None, :]
            h_old = tl.load(hp_ptr + rows[:, None] * H + cols[None, :], mask=m, other=0.0)
            acc_r = tl.zeros([BLOCK_B, BLOCK_N], h_old.dtype)
            acc_z = tl.zeros([BLOCK_B, BLOCK_N], h_old.dtype)
            acc_n = tl.zeros([BLOCK_B, BLOCK_N], h_old.dtype)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < H
                h = tl.load(hp_ptr + rows[:, None] * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                acc_r = _gate_dot(acc_r, h, w_ptr, 0, cols, cm, ks, km, H)
                acc_z = _gate_dot(acc_z, h, w_ptr, H, cols, cm, ks, km, H)
                acc_n = _gate_dot(acc_n, h, w_ptr, 2 * H, cols, cm, ks, km, H)
            g3 = gi_ptr + t * B * 3 * H + rows[:, None] * 3 * H + cols[None, :]
            r = _sigmoid(tl.load(g3, mask=m, other=0.0) + acc_r
                         + tl.load(bh_ptr + cols, mask=cm, other=0.0)[None, :])
            z = _sigmoid(tl.load(g3 + H, mask=m, other=0.0) + acc_z
                         + tl.load(bh_ptr + H + cols, mask=cm, other=0.0)[None, :])
            ghn = acc_n + tl.load(bh_ptr + 2 * H + cols, mask=cm, other=0.0)[None, :]
            n = _tanh(tl.load(g3 + 2 * H, mask=m, other=0.0) + r * ghn)
            tl.store(out_ptr + t * B * H + rows[:, None] * H + cols[None, :], n + z * (h_old - n), mask=m)
            if SAVE:
                g4 = gates_ptr + t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
                tl.store(g4, r, mask=m)
                tl.store(g4 + H, z, mask=m)
                tl.store(g4 + 2 * H, n, mask=m)
                tl.store(g4 + 3 * H, ghn, mask=m)
        tl.debug_barrier()  # h_t, written by all threads of this program, is read whole next step


@triton.jit
def _dh_from_gates_grad(dg_ptr, w_ptr, dd_ptr, dh_ptr, rows, rm, G: tl.constexpr, H, HAS_DD: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh[rows] = dd[rows] (if HAS_DD) + dG[rows] [.., G*H] @ W [G*H, H]."""
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < H
        m = rm[:, None] & cm[None, :]
        if HAS_DD:
            acc = tl.load(dd_ptr + rows[:, None] * H + cols[None, :], mask=m, other=0.0)
        else:
            acc = tl.zeros([BLOCK_B, BLOCK_N], dh_ptr.dtype.element_ty)
        for k0 in range(0, G * H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < G * H
            dg = tl.load(dg_ptr + rows[:, None] * G * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + ks[:, None] * H + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
            acc += tl.dot(dg, w, input_precision="ieee")
        tl.store(dh_ptr + rows[:, None] * H + cols[None, :], acc, mask=m)


@triton.jit
def _gru_bwd_persistent_kernel(go_ptr, hp_ptr, gates_ptr, w_ptr, dgi_ptr, dgh_ptr, dd_ptr, dh_ptr, T, B, H,
                               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward through time; hp = the previous hidden states [T, B, H] (h0, out[:-1]); dh
    [B, H] starts at zero and ends as the gradient of h0; dd [B, H] is scratch."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    for i in range(T):
        t = T - 1 - i
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cm = cols < H
            m = rm[:, None] & cm[None, :]
            h1 = rows[:, None] * H + cols[None, :]
            g4 = gates_ptr + t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
            r = tl.load(g4, mask=m, other=0.0)
            z = tl.load(g4 + H, mask=m, other=0.0)
            n = tl.load(g4 + 2 * H, mask=m, other=0.0)
            ghn = tl.load(g4 + 3 * H, mask=m, other=0.0)
            d = tl.load(dh_ptr + h1, mask=m, other=0.0) + tl.load(go_ptr + t * B * H + h1, mask=m, other=0.0)
            hp = tl.load(hp_ptr + t * B * H + h1, mask=m, other=0.0)
            da_n = d * (1.0 - z) * (1.0 - n * n)
            da_r = da_n * ghn * r * (1.0 - r)
            da_z = d * (hp - n) * z * (1.0 - z)
            g3 = t * B * 3 * H + rows[:, None] * 3 * H + cols[None, :]
            tl.store(dgi_ptr + g3, da_r, mask=m)
            tl.store(dgi_ptr + g3 + H, da_z, mask=m)
            tl.store(dgi_ptr + g3 + 2 * H, da_n, mask=m)
            tl.store(dgh_ptr + g3, da_r, mask=m)
            tl.store(dgh_ptr + g3 + H, da_z, mask=m)
            tl.store(dgh_ptr + g3 + 2 * H, da_n * r, mask=m)
            tl.store(dd_ptr + h1, d * z, mask=m)
        tl.debug_barrier()  # dGH_t and the direct part complete before the GEMM reads them
        _dh_from_gates_grad(dgh_ptr + t * B * 3 * H, w_ptr, dd_ptr, dh_ptr, rows, rm, 3, H, True, BLOCK_B,
                            BLOCK_N, BLOCK_K)
        tl.debug_barrier()  # dh complete before the next step's gate gradients read it


def _grid(b: int, h: int) -> tuple[tuple[int, int], int, int]:
    block_h = min(128, triton.next_power_of_2(max(h, 1)))
    block_b = max(1, min(16, 2048 // block_h))
    return (triton.cdiv(b, block_b), triton.cdiv(h, block_h)), block_b, block_h


def _gru_sequence_fwd_stepwise(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
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
        launch(_gates_fwd_kernel, grid, gi_all[t], gh, h, out[t], gates[t] if save else gh, b, hs, SAVE=save,
               BLOCK_B=bb, BLOCK_H=bh)
    return out, gates


def _gru_sequence_bwd_stepwise(grad_out: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
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
        launch(_gates_bwd_kernel, grid, dh_acc, hp, gates[t], dgi[t], dgh[t], dd, b, hs, BLOCK_B=bb, BLOCK_H=bh)
        torch.addmm(dd, dgh[t], weight_hh, out=dh)
    dgi2, dgh2 = dgi.view(-1, 3 * hs), dgh.view(-1, 3 * hs)
    h_prev = torch.cat([h0[None], out[:-1]], 0).view(-1, hs)
    return (dgi2 @ weight_ih).view(t_len, b, n_in), dh, dgi2.T @ x.view(-1, n_in), dgh2.T @ h_prev, \
        dgi2.sum(0), dgh2.sum(0)


def _gru_sequence_fwd_persistent(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                                 bias_hh: Tensor, save: bool) -> tuple[Tensor, Tensor]:
    x, h0 = x.contiguous(), h0.contiguous()
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    out = torch.empty((t_len, b, hs), dtype=x.dtype, device=x.device)
    gates = torch.empty((t_len, b, 4 * hs) if save else (0,), dtype=x.dtype, device=x.device)
    if t_len == 0 or b == 0:
        return out, gates
    gi_all = torch.addmm(bias_ih, x.view(t_len * b, n_in), weight_ih.T)
    bb, bn, bk, nw = _persistent_blocks(b, hs)
    launch(_gru_fwd_persistent_kernel, (triton.cdiv(b, bb),),
        gi_all, h0, weight_hh.contiguous(), bias_hh.contiguous(), out, gates if save else out, t_len, b, hs,
        SAVE=save, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    return out, gates


def _gru_sequence_bwd_persistent(grad_out: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                                 out: Tensor, gates: Tensor
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, h0, out, gates, grad_out = (t.contiguous() for t in (x, h0, out, gates, grad_out))
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    dgi = torch.empty((t_len, b, 3 * hs), dtype=x.dtype, device=x.device)
    dgh = torch.empty_like(dgi)
    dh = torch.zeros_like(h0)
    h_prev = torch.cat([h0[None], out[:-1]], 0)
    if t_len > 0 and b > 0:
        bb, bn, bk, nw = _persistent_blocks(b, hs)
        launch(_gru_bwd_persistent_kernel, (triton.cdiv(b, bb),),
            grad_out, h_prev, gates, weight_hh.contiguous(), dgi, dgh, torch.empty_like(h0), dh, t_len, b, hs,
            BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    dgi2, dgh2 = dgi.view(-1, 3 * hs), dgh.view(-1, 3 * hs)
    return (dgi2 @ weight_ih).view(t_len, b, n_in), dh, dgi2.T @ x.view(-1, n_in), \
        dgh2.T @ h_prev.view(-1, hs), dgi2.sum(0), dgh2.sum(0)


def _check_cell(op: str, n_gates: int, x: Tensor, states: tuple[Tensor, ...], weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> None:
    """x [T, B, I], each state [B, H], weight_ih [G, I], weight_hh [G, H], biases [G] (G = n_gates H)."""
    check_rank(op, x=(x, 3), h0=(states[0], 2))
    t_len, b, n_in = x.shape
    hs = states[0].shape[1]
    g = n_gates * hs
    check_args(op, x, **dict(zip(("h0", "c0"), ((st, (b, hs)) for st in states))),
               weight_ih=(weight_ih, (g, n_in)), weight_hh=(weight_hh, (g, hs)), bias_ih=(bias_ih, g),
               bias_hh=(bias_hh, g))


def gru_sequence_fwd(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                     bias_hh: Tensor, save: bool) -> tuple[Tensor, Tensor]:
    """(out [T, B, H], gates [T, B, 4H] = r, z, n, h W_hn^T + b_hn when save, else empty)."""
    _check_cell("gru_sequence_fwd", 3, x, (h0,), weight_ih, weight_hh, bias_ih, bias_hh)
    fn = _gru_sequence_fwd_persistent if PERSISTENT else _gru_sequence_fwd_stepwise
    return fn(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, save)


def gru_sequence_bwd(grad_out: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                     out: Tensor, gates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, h0, weight_ih, weight_hh, bias_ih, bias_hh)."""
    _check_cell("gru_sequence_bwd", 3, x, (h0,), weight_ih, weight_hh)
    t_len, b, hs = x.shape[0], x.shape[1], h0.shape[1]
    check_args("gru_sequence_bwd", x, grad_out=(grad_out, (t_len, b, hs)), out=(out, (t_len, b, hs)),
               gates=(gates, (t_len, b, 4 * hs)))
    fn = _gru_sequence_bwd_persistent if PERSISTENT else _gru_sequence_bwd_stepwise
    return fn(grad_out, x, h0, weight_ih, weight_hh, out, gates)


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


@triton.jit
def _lstm_fwd_persistent_kernel(a_ptr, h0_ptr, c0_ptr, w_ptr, out_ptr, cells_ptr, gates_ptr, T, B, H,
                                SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    for t in range(T):
        if t == 0:
            hp_ptr = h0_ptr
            cp_ptr = c0_ptr
        else:
            hp_ptr = out_ptr + (t - 1) * B * H
            cp_ptr = cells_ptr + (t - 1) * B * H
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cm = cols < H
            m = rm[:, None] & cm[None, :]
            h1 = rows[:, None] * H + cols[None, :]
            c_old = tl.load(cp_ptr + h1, mask=m, other=0.0)
            acc_i = tl.zeros([BLOCK_B, BLOCK_N], c_old.dtype)
            acc_f = tl.zeros([BLOCK_B, BLOCK_N], c_old.dtype)
            acc_g = tl.zeros([BLOCK_B, BLOCK_N], c_old.dtype)
            acc_o = tl.zeros([BLOCK_B, BLOCK_N], c_old.dtype)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < H
                h = tl.load(hp_ptr + rows[:, None] * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                acc_i = _gate_dot(acc_i, h, w_ptr, 0, cols, cm, ks, km, H)
                acc_f = _gate_dot(acc_f, h, w_ptr, H, cols, cm, ks, km, H)
                acc_g = _gate_dot(acc_g, h, w_ptr, 2 * H, cols, cm, ks, km, H)
                acc_o = _gate_dot(acc_o, h, w_ptr, 3 * H, cols, cm, ks, km, H)
            a4 = a_ptr + t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
            i = _sigmoid(tl.load(a4, mask=m, other=0.0) + acc_i)
            f = _sigmoid(tl.load(a4 + H, mask=m, other=0.0) + acc_f)
            g = _tanh(tl.load(a4 + 2 * H, mask=m, other=0.0) + acc_g)
            o = _sigmoid(tl.load(a4 + 3 * H, mask=m, other=0.0) + acc_o)
            c = f * c_old + i * g
            tl.store(cells_ptr + t * B * H + h1, c, mask=m)
            tl.store(out_ptr + t * B * H + h1, o * _tanh(c), mask=m)
            if SAVE:
                g4 = gates_ptr + t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
                tl.store(g4, i, mask=m)
                tl.store(g4 + H, f, mask=m)
                tl.store(g4 + 2 * H, g, mask=m)
                tl.store(g4 + 3 * H, o, mask=m)
        tl.debug_barrier()  # h_t and c_t complete before the next step reads them


@triton.jit
def _lstm_bwd_persistent_kernel(go_ptr, gc_ptr, gates_ptr, cells_ptr, cp_ptr, w_ptr, da_ptr, dc_ptr, dh_ptr,
                                T, B, H, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward through time; cp = the previous cells [T, B, H] (c0, cells[:-1]); dh and dc
    [B, H] start at zero and end as the gradients of h0 and c0."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    for s in range(T):
        t = T - 1 - s
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cm = cols < H
            m = rm[:, None] & cm[None, :]
            h1 = rows[:, None] * H + cols[None, :]
            g4 = t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
            i = tl.load(gates_ptr + g4, mask=m, other=0.0)
            f = tl.load(gates_ptr + g4 + H, mask=m, other=0.0)
            g = tl.load(gates_ptr + g4 + 2 * H, mask=m, other=0.0)
            o = tl.load(gates_ptr + g4 + 3 * H, mask=m, other=0.0)
            d = tl.load(dh_ptr + h1, mask=m, other=0.0) + tl.load(go_ptr + t * B * H + h1, mask=m, other=0.0)
            tc = _tanh(tl.load(cells_ptr + t * B * H + h1, mask=m, other=0.0))
            c = tl.load(dc_ptr + h1, mask=m, other=0.0) + tl.load(gc_ptr + t * B * H + h1, mask=m, other=0.0) \
                + d * o * (1.0 - tc * tc)
            tl.store(da_ptr + g4, c * g * i * (1.0 - i), mask=m)
            tl.store(da_ptr + g4 + H, c * tl.load(cp_ptr + t * B * H + h1, mask=m, other=0.0) * f * (1.0 - f),
                     mask=m)
            tl.store(da_ptr + g4 + 2 * H, c * i * (1.0 - g * g), mask=m)
            tl.store(da_ptr + g4 + 3 * H, d * tc * o * (1.0 - o), mask=m)
            tl.store(dc_ptr + h1, c * f, mask=m)  # each element read and rewritten by the same lanes
        tl.debug_barrier()  # dA_t complete before the GEMM reads it
        _dh_from_gates_grad(da_ptr + t * B * 4 * H, w_ptr, dh_ptr, dh_ptr, rows, rm, 4, H, False, BLOCK_B,
                            BLOCK_N, BLOCK_K)
        tl.debug_barrier()  # dh complete before the next step reads it


def _lstm_sequence_fwd_persistent(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                                  bias_ih: Tensor, bias_hh: Tensor, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    out = torch.empty((t_len, b, hs), dtype=x.dtype, device=x.device)
    cells = torch.empty_like(out)
    gates = torch.empty((t_len, b, 4 * hs) if save else (0,), dtype=x.dtype, device=x.device)
    if t_len == 0 or b == 0:
        return out, cells, gates
    a_all = torch.addmm(bias_ih + bias_hh, x.view(t_len * b, n_in), weight_ih.T)
    bb, bn, bk, nw = _persistent_blocks(b, hs)
    launch(_lstm_fwd_persistent_kernel, (triton.cdiv(b, bb),),
        a_all, h0, c0, weight_hh.contiguous(), out, cells, gates if save else out, t_len, b, hs, SAVE=save,
        BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    return out, cells, gates


def _lstm_sequence_bwd_persistent(grad_out: Tensor, grad_cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                                  weight_ih: Tensor, weight_hh: Tensor, out: Tensor, cells: Tensor, gates: Tensor
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_out, grad_cells, x, h0, c0, out, cells, gates = (
        t.contiguous() for t in (grad_out, grad_cells, x, h0, c0, out, cells, gates))
    t_len, b, n_in = x.shape
    hs = h0.shape[1]
    da = torch.empty((t_len, b, 4 * hs), dtype=x.dtype, device=x.device)
    dh, dc = torch.zeros_like(h0), torch.zeros_like(c0)
    if t_len > 0 and b > 0:
        c_prev = torch.cat([c0[None], cells[:-1]], 0)
        bb, bn, bk, nw = _persistent_blocks(b, hs)
        launch(_lstm_bwd_persistent_kernel, (triton.cdiv(b, bb),),
            grad_out, grad_cells, gates, cells, c_prev, weight_hh.contiguous(), da, dc, dh, t_len, b, hs,
            BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    da2 = da.view(-1, 4 * hs)
    h_prev = torch.cat([h0[None], out[:-1]], 0).view(-1, hs)
    db = da2.sum(0)
    return (da2 @ weight_ih).view(t_len, b, n_in), dh, dc, da2.T @ x.view(-1, n_in), da2.T @ h_prev, db, \
        db.clone()


def lstm_sequence_fwd(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                      bias_hh: Tensor, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, cells [T, B, H], gates [T, B, 4H] = i, f, g, o when save, else empty)."""
    _check_cell("lstm_sequence_fwd", 4, x, (h0, c0), weight_ih, weight_hh, bias_ih, bias_hh)
    fn = _lstm_sequence_fwd_persistent if PERSISTENT else _lstm_sequence_fwd_stepwise
    return fn(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, save)


def lstm_sequence_bwd(grad_out: Tensor, grad_cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                      weight_ih: Tensor, weight_hh: Tensor, out: Tensor, cells: Tensor, gates: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)."""
    _check_cell("lstm_sequence_bwd", 4, x, (h0, c0), weight_ih, weight_hh)
    t_len, b, hs = x.shape[0], x.shape[1], h0.shape[1]
    seq = (t_len, b, hs)
    check_args("lstm_sequence_bwd", x, grad_out=(grad_out, seq), grad_cells=(grad_cells, seq), out=(out, seq),
               cells=(cells, seq), gates=(gates, (t_len, b, 4 * hs)))
    fn = _lstm_sequence_bwd_persistent if PERSISTENT else _lstm_sequence_bwd_stepwise
    return fn(grad_out, grad_cells, x, h0, c0, weight_ih, weight_hh, out, cells, gates)


def _lstm_sequence_fwd_stepwise(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
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
        launch(_lstm_fwd_kernel, grid, a, c, out[t], cells[t], gates[t] if save else a, b, hs, SAVE=save,
               BLOCK_B=bb, BLOCK_H=bh)
    return out, cells, gates


def _lstm_sequence_bwd_stepwise(grad_out: Tensor, grad_cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
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
        launch(_lstm_bwd_kernel, grid, dh, grad_out[t], dc, grad_cells[t], gates[t], cp, cells[t], da[t], dc_next,
               b, hs, BLOCK_B=bb, BLOCK_H=bh)
        dc, dc_next = dc_next, dc
        torch.mm(da[t], weight_hh, out=dh)
    da2 = da.view(-1, 4 * hs)
    h_prev = torch.cat([h0[None], out[:-1]], 0).view(-1, hs)
    db = da2.sum(0)
    return (da2 @ weight_ih).view(t_len, b, n_in), dh, dc, da2.T @ x.view(-1, n_in), da2.T @ h_prev, db, \
        db.clone()
