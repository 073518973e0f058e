"""Triton kernels of the vector flow stack (GPU, and CPU under TRITON_INTERPRET=1).

One program owns BLOCK_B rows of the batch and runs all K steps on them in one launch: the
rows stay in registers between steps and each step's weights stream through on-chip
tiles, BLOCK_H hidden units at a time (_blocks sizes them to the GPU's shared memory; where a
kernel cannot fit, float64 at d = 512, the wrappers fall back to the reference). Per step:

    a = x W1^T + b1 (+ ctx);  g = relu(a);  (m, s) = g W2^T + b2
    y = x + act (1 - sigmoid(s)) (m - x),  logdet += sum act log sigmoid(s)   (affine)
    y = x + act m                                                             (additive)

The backward runs the steps in reverse from the saved step inputs and MLP outputs,
recomputing each hidden layer, and writes grad x and the per-step gradients of the
pre-activations (grad a) and outputs (grad o); the weight gradients are batched GEMMs in
torch. The inverse does `n_passes` fixed-point sweeps per step, or one pass in the step's
dependency order where the masked weights give one (_inverse_plan): each dimension's outputs
from the hidden layer held in registers, then a rank-1 update of it. Math:
latentfast/reference/vector_flows.py.
"""
from __future__ import annotations

import os
import warnings
import weakref

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from latentfast.backend import triton_interpret
from latentfast.kernels import check_args, check_rank, launch
from latentfast.kernels._math import sigmoid_and_log as _sig_logsig
from latentfast.ops.vector_flows import masks_in_effect as _masks_in_effect
from latentfast.reference import vector_flows as ref
from latentfast.reference.vector_flows import weight_grads

try:  # (where Triton raises it at a launch that asks for more shared memory than a block may have)
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts
    from triton.runtime.autotuner import OutOfResources


@triton.jit
def _row_block(B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_B rows of a [B, D] row-major array: (rows, cols, row mask, column
    mask, 2-D mask, 2-D offsets)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < B
    cm = cols < D
    return rows, cols, rm, cm, rm[:, None] & cm[None, :], rows[:, None] * D + cols[None, :]


@triton.jit
def _step_params(x, k, rows, cols, rm, cm, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, B, D, H,
                 HAS_CTX: tl.constexpr, ADDITIVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(m, s) [BLOCK_B, BLOCK_D] of step k for the rows x; s is zeros when ADDITIVE."""
    O = D if ADDITIVE else 2 * D
    om = tl.zeros([BLOCK_B, BLOCK_D], x.dtype)
    os_ = tl.zeros([BLOCK_B, BLOCK_D], x.dtype)
    for h0 in range(0, H, BLOCK_H):
        hc = h0 + tl.arange(0, BLOCK_H)
        hm = hc < H
        w1t = tl.load(w1_ptr + k * H * D + hc[None, :] * D + cols[:, None], mask=cm[:, None] & hm[None, :],
                      other=0.0)
        a = tl.dot(x, w1t, input_precision="ieee")
        a += tl.load(b1_ptr + k * H + hc, mask=hm, other=0.0)[None, :]
        if HAS_CTX:
            a += tl.load(ctx_ptr + (k * B + rows[:, None]) * H + hc[None, :], mask=rm[:, None] & hm[None, :],
                         other=0.0)
        g = tl.where(a < 0.0, 0.0, a)  # relu keeping NaN (tl.maximum drops it on a GPU), as torch.relu
        wmask = hm[:, None] & cm[None, :]
        w2m = tl.load(w2_ptr + k * O * H + cols[None, :] * H + hc[:, None], mask=wmask, other=0.0)
        om += tl.dot(g, w2m, input_precision="ieee")
        if not ADDITIVE:
            w2s = tl.load(w2_ptr + k * O * H + (D + cols[None, :]) * H + hc[:, None], mask=wmask, other=0.0)
            os_ += tl.dot(g, w2s, input_precision="ieee")
    om += tl.load(b2_ptr + k * O + cols, mask=cm, other=0.0)[None, :]
    if not ADDITIVE:
        os_ += tl.load(b2_ptr + k * O + D + cols, mask=cm, other=0.0)[None, :]
    return om, os_


@triton.jit
def _vector_flow_fwd_kernel(x_ptr, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, act_ptr, y_ptr, ld_ptr, xs_ptr,
                            out_ptr, B, D, H, K, HAS_CTX: tl.constexpr, ADDITIVE: tl.constexpr,
                            SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    rows, cols, rm, cm, m2, off = _row_block(B, D, BLOCK_B, BLOCK_D)
    x = tl.load(x_ptr + off, mask=m2, other=0.0)
    ld = tl.zeros([BLOCK_B], x.dtype)
    O = D if ADDITIVE else 2 * D
    for k in range(K):
        if SAVE:
            tl.store(xs_ptr + k * B * D + off, x, mask=m2)
        om, os_ = _step_params(x, k, rows, cols, rm, cm, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, B, D, H,
                               HAS_CTX, ADDITIVE, BLOCK_B, BLOCK_D, BLOCK_H)
        act = tl.load(act_ptr + k * D + cols, mask=cm, other=0.0)[None, :]
        if SAVE:
            tl.store(out_ptr + (k * B + rows[:, None]) * O + cols[None, :], om, mask=m2)
            if not ADDITIVE:
                tl.store(out_ptr + (k * B + rows[:, None]) * O + D + cols[None, :], os_, mask=m2)
        if ADDITIVE:
            x = x + act * om
        else:
            sig, logsig = _sig_logsig(os_)
            x = x + act * (1.0 - sig) * (om - x)
            ld += tl.sum(act * logsig, axis=1)
    tl.store(y_ptr + off, x, mask=m2)
    tl.store(ld_ptr + rows, ld, mask=rm)


@triton.jit
def _vector_flow_bwd_kernel(gy_ptr, gl_ptr, xs_ptr, out_ptr, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, act_ptr, gx_ptr,
                            ga_ptr, go_ptr, hid_ptr, B, D, H, K, HAS_CTX: tl.constexpr, ADDITIVE: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, rm, cm, m2, off = _row_block(B, D, BLOCK_B, BLOCK_D)
    g = tl.load(gy_ptr + off, mask=m2, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=rm, other=0.0)[:, None]
    O = D if ADDITIVE else 2 * D
    for kk in range(K):
        k = K - 1 - kk
        act = tl.load(act_ptr + k * D + cols, mask=cm, other=0.0)[None, :]
        o_off = (k * B + rows[:, None]) * O + cols[None, :]
        om = tl.load(out_ptr + o_off, mask=m2, other=0.0)
        x = tl.load(xs_ptr + k * B * D + off, mask=m2, other=0.0)
        if ADDITIVE:
            gm = g * act
            gs = gm
            gx = g
        else:
            sig, _ = _sig_logsig(tl.load(out_ptr + o_off + D, mask=m2, other=0.0))
            one_m = 1.0 - sig
            gm = g * act * one_m
            gs = act * (gl - g * (om - x) * sig) * one_m
            gx = g * (1.0 - act * one_m)
            tl.store(go_ptr + o_off + D, gs, mask=m2)
        tl.store(go_ptr + o_off, gm, mask=m2)
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            hm = hc < H
            hmask = rm[:, None] & hm[None, :]
            h_off = (k * B + rows[:, None]) * H + hc[None, :]
            wmask = cm[:, None] & hm[None, :]
            # recompute the hidden layer of this chunk: a = x W1^T + b1 (+ ctx)
            w1t = tl.load(w1_ptr + k * H * D + hc[None, :] * D + cols[:, None], mask=wmask, other=0.0)
            a = tl.dot(x, w1t, input_precision="ieee")
            a += tl.load(b1_ptr + k * H + hc, mask=hm, other=0.0)[None, :]
            if HAS_CTX:
                a += tl.load(ctx_ptr + h_off, mask=hmask, other=0.0)
            tl.store(hid_ptr + h_off, tl.where(a < 0.0, 0.0, a), mask=hmask)
            w2m = tl.load(w2_ptr + k * O * H + cols[:, None] * H + hc[None, :], mask=wmask, other=0.0)
            gh = tl.dot(gm, w2m, input_precision="ieee")
            if not ADDITIVE:
                w2s = tl.load(w2_ptr + k * O * H + (D + cols[:, None]) * H + hc[None, :], mask=wmask, other=0.0)
                gh += tl.dot(gs, w2s, input_precision="ieee")
            ga = tl.where(a > 0, gh, 0.0)
            tl.store(ga_ptr + h_off, ga, mask=hmask)
            gx += tl.dot(ga, tl.trans(w1t), input_precision="ieee")
        g = gx
    tl.store(gx_ptr + off, g, mask=m2)


@triton.jit
def _col(t, cols, j):
    """Column j of a [BLOCK_B, BLOCK_D] tile, as a [BLOCK_B] vector."""
    return tl.sum(tl.where(cols[None, :] == j, t, 0.0), axis=1)


@triton.jit
def _seq_inv_step(y, k, rows, cols, rm, cm, hf, hfm, act, ctx_ptr, w1t_ptr, b1_ptr, w2_ptr, b2_ptr, order_ptr,
                  count_ptr, B, D, H, HAS_CTX: tl.constexpr, ADDITIVE: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_HF: tl.constexpr):
    """One step's inverse in dependency order (plan from _inverse_plan): the pre-activations of
    the known (act = 0) inputs, then per dimension j of the order its outputs from the whole
    hidden layer in registers, x_j, and x_j folded into the pre-activations. Rank-1 updates
    throughout (no [BLOCK_D, H] tile of W1). Returns (x, the step's log-det per row)."""
    O = D if ADDITIVE else 2 * D
    x = tl.where(act > 0, 0.0, y)
    a = tl.zeros([BLOCK_B, BLOCK_HF], y.dtype) + tl.load(b1_ptr + k * H + hf, mask=hfm, other=0.0)[None, :]
    if HAS_CTX:
        a += tl.load(ctx_ptr + (k * B + rows[:, None]) * H + hf[None, :], mask=rm[:, None] & hfm[None, :], other=0.0)
    n_act = tl.load(count_ptr + k)
    for idx in range(n_act, D):  # the known inputs, listed after the order
        i = tl.load(order_ptr + k * D + idx)
        a += _col(y, cols, i)[:, None] * tl.load(w1t_ptr + (k * D + i) * H + hf, mask=hfm, other=0.0)[None, :]
    s_all = tl.zeros([BLOCK_B, BLOCK_D], y.dtype)
    for idx in range(0, n_act):
        j = tl.load(order_ptr + k * D + idx)
        g = tl.where(a < 0.0, 0.0, a)
        wm = tl.load(w2_ptr + (k * O + j) * H + hf, mask=hfm, other=0.0)
        mj = tl.sum(g * wm[None, :], axis=1) + tl.load(b2_ptr + k * O + j)
        yj = _col(y, cols, j)
        if ADDITIVE:
            xj = yj - mj
        else:
            ws = tl.load(w2_ptr + (k * O + D + j) * H + hf, mask=hfm, other=0.0)
            sj = tl.sum(g * ws[None, :], axis=1) + tl.load(b2_ptr + k * O + D + j)
            sig, _ = _sig_logsig(sj)
            xj = (yj - (1.0 - sig) * mj) / sig
            s_all = tl.where(cols[None, :] == j, sj[:, None], s_all)
        xj = tl.where(xj == xj, tl.minimum(tl.maximum(xj, -1e15), 1e15), 0.0)  # as the sweeps clamp
        x = tl.where(cols[None, :] == j, xj[:, None], x)
        a += xj[:, None] * tl.load(w1t_ptr + (k * D + j) * H + hf, mask=hfm, other=0.0)[None, :]
    ld = tl.zeros([BLOCK_B], y.dtype)
    if not ADDITIVE:
        _, logsig = _sig_logsig(s_all)
        ld = tl.sum(act * logsig, axis=1)
    return x, ld


@triton.jit
def _sweep_inv_step(y, k, act, rows, cols, rm, cm, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, B, D, H, n_passes,
                    HAS_CTX: tl.constexpr, ADDITIVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """One step's inverse by n_passes fixed-point sweeps from x = y, then the forward log-det at
    the recovered x (zeros when additive). Returns (x, the step's log-det per row)."""
    x = y
    for _ in range(n_passes):
        om, os_ = _step_params(x, k, rows, cols, rm, cm, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, B, D, H,
                               HAS_CTX, ADDITIVE, BLOCK_B, BLOCK_D, BLOCK_H)
        if ADDITIVE:
            x = y - act * om
        else:
            sig, _ = _sig_logsig(os_)
            x = tl.where(act > 0, (y - (1.0 - sig) * om) / sig, y)
        # clamp the garbage of the dimensions not yet fixed (reference.sanitize_sweep)
        x = tl.where(x == x, tl.minimum(tl.maximum(x, -1e15), 1e15), 0.0)
    ld = tl.zeros([BLOCK_B], y.dtype)
    if not ADDITIVE:
        om, os_ = _step_params(x, k, rows, cols, rm, cm, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, B, D, H,
                               HAS_CTX, ADDITIVE, BLOCK_B, BLOCK_D, BLOCK_H)
        _, logsig = _sig_logsig(os_)
        ld = tl.sum(act * logsig, axis=1)
    return x, ld


@triton.jit
def _vector_flow_inv_kernel(y_ptr, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, act_ptr, x_ptr, ld_ptr, w1t_ptr,
                            order_ptr, count_ptr, plan_ptr, B, D, H, K, n_passes, HAS_CTX: tl.constexpr,
                            ADDITIVE: tl.constexpr, SWEEPS: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HF: tl.constexpr):
    """The inverse, steps in reverse: a step with a plan (plan_ptr[k] != 0) in one pass
    (_seq_inv_step), the others by sweeps (_sweep_inv_step). SWEEPS=False when every step has
    a plan: the sweeps and their tl.dot are compiled out, so a program may hold fewer than 16
    rows (its rows then come from a register budget, _rows_for_registers)."""
    rows, cols, rm, cm, m2, off = _row_block(B, D, BLOCK_B, BLOCK_D)
    y = tl.load(y_ptr + off, mask=m2, other=0.0)
    ld = tl.zeros([BLOCK_B], y.dtype)
    hf = tl.arange(0, BLOCK_HF)
    hfm = hf < H
    for kk in range(K):
        k = K - 1 - kk
        act = tl.load(act_ptr + k * D + cols, mask=cm, other=0.0)[None, :]
        if SWEEPS:
            if tl.load(plan_ptr + k) != 0:
                x, ld_k = _seq_inv_step(y, k, rows, cols, rm, cm, hf, hfm, act, ctx_ptr, w1t_ptr, b1_ptr, w2_ptr,
                                        b2_ptr, order_ptr, count_ptr, B, D, H, HAS_CTX, ADDITIVE, BLOCK_B, BLOCK_D,
                                        BLOCK_HF)
            else:
                x, ld_k = _sweep_inv_step(y, k, act, rows, cols, rm, cm, ctx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, B,
                                          D, H, n_passes, HAS_CTX, ADDITIVE, BLOCK_B, BLOCK_D, BLOCK_H)
        else:
            x, ld_k = _seq_inv_step(y, k, rows, cols, rm, cm, hf, hfm, act, ctx_ptr, w1t_ptr, b1_ptr, w2_ptr, b2_ptr,
                                    order_ptr, count_ptr, B, D, H, HAS_CTX, ADDITIVE, BLOCK_B, BLOCK_D, BLOCK_HF)
        ld += ld_k
        y = x
    tl.store(x_ptr + off, y, mask=m2)
    tl.store(ld_ptr + rows, ld, mask=rm)


@triton.jit
def _vector_flow_inv_grad_kernel(gx_ptr, gl_ptr, xs_ptr, out_ptr, ctx_ptr, w1t_ptr, b1_ptr, w2_ptr, act_ptr,
                                 order_ptr, count_ptr, u_ptr, B, D, H, K, HAS_CTX: tl.constexpr,
                                 ADDITIVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_HF: tl.constexpr):
    """The inverse's backward solve in dependency order (the C++ vf_inv_grad_lanes): per step
    k from the first, J_k^T u = a + gld d ld_k / dx with J_k = D + C N at the step's input
    x = xs[k], solved from the last level down, u_i = (a_i - t_i) / D_i with t_i = W1[:, i] .
    (relu'(pre) * r), where r = W2^T v grows by a rank-1 update as each dimension is solved
    (v_m = c1 u, v_s = c2 u - gld gate: the log-det's share has N's dependency pattern); then
    the act = 0 dimensions (no row of N: u_i = a_i - t_i). The hidden layer of the row block is
    recomputed in registers from x by rank-1 updates; r lives there too."""
    rows, cols, rm, cm, m2, off = _row_block(B, D, BLOCK_B, BLOCK_D)
    u = tl.load(gx_ptr + off, mask=m2, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=rm, other=0.0)
    O = D if ADDITIVE else 2 * D
    hf = tl.arange(0, BLOCK_HF)
    hfm = hf < H
    for k in range(K):
        act = tl.load(act_ptr + k * D + cols, mask=cm, other=0.0)[None, :]
        x = tl.load(xs_ptr + k * B * D + off, mask=m2, other=0.0)
        o_off = (k * B + rows[:, None]) * O + cols[None, :]
        pre = tl.zeros([BLOCK_B, BLOCK_HF], u.dtype) + tl.load(b1_ptr + k * H + hf, mask=hfm, other=0.0)[None, :]
        for i in range(0, D):  # x W1^T by rank-1 updates (no [BLOCK_D, H] tile of W1)
            pre += _col(x, cols, i)[:, None] * tl.load(w1t_ptr + (k * D + i) * H + hf, mask=hfm, other=0.0)[None, :]
        if HAS_CTX:
            pre += tl.load(ctx_ptr + (k * B + rows[:, None]) * H + hf[None, :], mask=rm[:, None] & hfm[None, :],
                           other=0.0)
        on = pre > 0
        if ADDITIVE:
            c0 = tl.zeros([BLOCK_B, BLOCK_D], u.dtype) + 1.0
            c1 = act + tl.zeros([BLOCK_B, BLOCK_D], u.dtype)
            c2 = tl.zeros([BLOCK_B, BLOCK_D], u.dtype)
            c3 = c2
        else:
            m = tl.load(out_ptr + o_off, mask=m2, other=0.0)
            sig, _ = _sig_logsig(tl.load(out_ptr + o_off + D, mask=m2, other=0.0))
            gate = act * (1.0 - sig)
            c0 = 1.0 / (1.0 - gate)
            c1 = gate
            c2 = (x - m) * sig * gate
            c3 = -gl[:, None] * gate
        r = tl.zeros([BLOCK_B, BLOCK_HF], u.dtype)
        n = tl.load(count_ptr + k)
        for t in range(0, D):
            # the act dimensions from the last level down, then the act = 0 ones
            i = tl.load(order_ptr + k * D + tl.where(t < n, n - 1 - t, t))
            w1r = tl.load(w1t_ptr + (k * D + i) * H + hf, mask=hfm, other=0.0)
            ti = tl.sum(tl.where(on, r, 0.0) * w1r[None, :], axis=1)
            ui = (_col(u, cols, i) - ti) * _col(c0, cols, i)
            u = tl.where(cols[None, :] == i, ui[:, None], u)
            if t < n:
                wm = tl.load(w2_ptr + (k * O + i) * H + hf, mask=hfm, other=0.0)
                r += (_col(c1, cols, i) * ui)[:, None] * wm[None, :]
                if not ADDITIVE:
                    ws = tl.load(w2_ptr + (k * O + D + i) * H + hf, mask=hfm, other=0.0)
                    r += (_col(c2, cols, i) * ui + _col(c3, cols, i))[:, None] * ws[None, :]
    tl.store(u_ptr + off, u, mask=m2)


def _blocks(d: int, h: int, itemsize: int = 4) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_D, BLOCK_H, num_warps, num_stages). tl.dot needs every tile side >= 16;
    the tiles of the dots go through shared memory (227 KB a block on H100 / H200), so the
    wider d is, the narrower the row block and the hidden chunks, and the loop over hidden
    chunks is not software-pipelined (num_stages = 1, one copy of each staged tile) from
    d = 128 on. The sizes come from compiling the kernels for sm_90 without a GPU
    (scripts/triton_smem.py): the largest, the backward kernel, needs 86-180 KB with these
    (float32: 147 KB at d = 64, 90 KB at 128, 180 KB at 256, 164 KB at 512; float64: 125 KB at
    32, 119 KB at 64, 123 KB at 128, 147 KB at 256) and 278 KB for float64 at d = 512, which does
    not fit (the launch raises OutOfResources and the wrappers below fall back to the reference).
    Before, d > 64 in float32 and d > 32 in float64 asked for 250 KB to 1.7 MB."""
    block_d = max(16, triton.next_power_of_2(d))
    wide = block_d * itemsize  # bytes of one row of x
    if block_d <= 32 or (block_d == 64 and itemsize <= 4):
        block_b, block_h, stages = 32, 64, 3
    elif block_d == 64:
        block_b, block_h, stages = 16, 32, 3
    else:
        block_b, block_h, stages = 16, (64 if wide <= 1024 else 16), 1
    block_h = max(16, min(block_h, triton.next_power_of_2(h)))
    if triton_interpret():
        block_b = 16
    # 8 warps everywhere: at d = 32 with 4 the sm_90 builds need all 255 registers and spill
    # 480-1176 bytes a thread, with 8 16-200 bytes (scripts/triton_smem.py --num-warps)
    return block_b, block_d, block_h, 8, stages


def _rows_for_registers(block_d: int, block_hf: int) -> int:
    """Rows per program of the one-pass kernels (no tl.dot, so fewer than 16 are fine), from a
    register budget of about 24K values (six [rows, BLOCK_D] tiles and two [rows, BLOCK_HF]
    ones) at 8 warps: 32 at the IAF shape (d = 32, H = 256), 4 at d = 512, H = 1024. For the
    backward solve at d = 512, H = 1024: 16 rows spilled 616 (float32) / 3144 (float64) bytes
    a thread in its sm_90 build, 4 rows none (146 / 228 registers; scripts/triton_smem.py).
    Under the interpreter at most 16, as elsewhere."""
    rows = max(4, min(32, 1 << ((24576 // (6 * block_d + 2 * block_hf)).bit_length() - 1)))
    return min(rows, 16) if triton_interpret() else rows


_SMEM_WARNED: set = set()


def _launch(kernel, grid, *args, **kwargs) -> bool:
    """Launch a kernel; False (after a one-time warning per kernel) when the GPU cannot hold
    its tiles (triton's OutOfResources at launch), for the caller to compute with the
    reference instead. Any other error propagates."""
    try:
        launch(kernel, grid, *args, **kwargs)
        return True
    except OutOfResources as e:
        name = getattr(kernel, "__name__", str(kernel))
        if name not in _SMEM_WARNED:
            _SMEM_WARNED.add(name)
            warnings.warn(f"latentfast: {name} does not fit on this GPU at these sizes ({e}); computing with the "
                          f"pure-PyTorch reference instead (same results, slower)", RuntimeWarning, stacklevel=3)
        return False


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _check_stack(op: str, x: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
                 b2: Tensor | None, act: Tensor, additive: bool, batch: int | None = None) -> tuple[int, int, int, int, int]:
    """x [B, d] (or xs [K, B, d] with batch given), w1 [K, H, d], b1 [K, H], w2 [K, O, H] (O = d
    additive, 2d affine), b2 [K, O], act [K, d], ctx [K, B, H]; returns (K, B, d, H, O)."""
    check_rank(op, w1=(w1, 3))
    k, hs, d = w1.shape
    b = x.shape[0] if batch is None else batch
    o = d if additive else 2 * d
    if k < 1:
        raise ValueError(f"{op}: the stack needs at least one step (w1 is {list(w1.shape)})")
    check_args(op, x, x=(x, (b, d) if batch is None else (k, b, d)), w1=(w1, (k, hs, d)), b1=(b1, (k, hs)),
               w2=(w2, (k, o, hs)), b2=(b2, (k, o)), act=(act, (k, d)), ctx=(ctx, (k, b, hs)))
    return k, b, d, hs, o


def vector_flow_fwd(x: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: Tensor,
                    additive: bool, save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, logdet, xs, out) as in reference.vector_flow_stack (the last two empty unless
    save)."""
    check_rank("vector_flow_fwd", x=(x, 2))
    _check_stack("vector_flow_fwd", x, ctx, w1, b1, w2, b2, act, additive)
    x, ctx, w1, b1, w2, b2, act = (_c(t) for t in (x, ctx, w1, b1, w2, b2, act))
    (B, D), (K, H, _), O = x.shape, w1.shape, w2.shape[1]
    y = torch.full_like(x, float("nan"))
    ld = x.new_full((B,), float("nan"))
    empty = x.new_empty(0)
    xs = x.new_full((K, B, D), float("nan")) if save else empty
    out = x.new_full((K, B, O), float("nan")) if save else empty
    bb, bd, bh, nw, ns = _blocks(D, H, x.element_size())
    if not _launch(_vector_flow_fwd_kernel, (triton.cdiv(B, bb),),
                   x, ctx if ctx is not None else x, w1, b1, w2, b2, act, y, ld, xs, out, B, D, H, K,
                   HAS_CTX=ctx is not None, ADDITIVE=additive, SAVE=save, BLOCK_B=bb, BLOCK_D=bd, BLOCK_H=bh,
                   num_warps=nw, num_stages=ns):
        y, ld, xs_r, out_r = ref.vector_flow_stack(x, ctx, w1, b1, w2, b2, act, additive)
        if save:
            xs, out = xs_r.contiguous(), out_r.contiguous()
        return y.contiguous(), ld.contiguous(), xs, out
    return y, ld, xs, out


def vector_flow_bwd(grad_y: Tensor, grad_logdet: Tensor, xs: Tensor, out: Tensor, ctx: Tensor | None, w1: Tensor,
                    b1: Tensor, w2: Tensor, act: Tensor, additive: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, ctx, w1, b1, w2, b2): the kernel writes grad x and the per-step grad a,
    grad o and recomputed hidden layers; the weight gradients are batched GEMMs."""
    check_rank("vector_flow_bwd", xs=(xs, 3))
    k, b, d, _, o = _check_stack("vector_flow_bwd", xs, ctx, w1, b1, w2, None, act, additive, batch=xs.shape[1])
    check_args("vector_flow_bwd", xs, grad_y=(grad_y, (b, d)), grad_logdet=(grad_logdet, b), out=(out, (k, b, o)))
    grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act = (
        _c(t) for t in (grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act))
    K, B, D = xs.shape
    H, O = w1.shape[1], out.shape[2]
    gx = torch.full_like(grad_y, float("nan"))
    ga = xs.new_full((K, B, H), float("nan"))
    hid = xs.new_full((K, B, H), float("nan"))
    go = out.new_full((K, B, O), float("nan"))
    bb, bd, bh, nw, ns = _blocks(D, H, xs.element_size())
    if not _launch(_vector_flow_bwd_kernel, (triton.cdiv(B, bb),),
                   grad_y, grad_logdet, xs, out, ctx if ctx is not None else xs, w1, b1, w2, act, gx, ga, go, hid,
                   B, D, H, K, HAS_CTX=ctx is not None, ADDITIVE=additive, BLOCK_B=bb, BLOCK_D=bd, BLOCK_H=bh,
                   num_warps=nw, num_stages=ns):
        return tuple(t.contiguous() for t in ref.vector_flow_stack_backward(grad_y, grad_logdet, xs, out, ctx, w1,
                                                                              b1, w2, act, additive))
    gw1, gb1, gw2, gb2 = weight_grads(ga, go, xs, hid)
    return gx, (ga if ctx is not None else xs.new_empty(0)), gw1, gb1, gw2, gb2


def _levels(dep: np.ndarray) -> np.ndarray | None:
    """Level of each node of a dependency graph (dep[j, i]: j depends on i; 0 for nodes with
    no dependency, else 1 + the highest level among its dependencies), or None for a cycle.
    Sorting by dependency count gives a topological order for MADE masks (nested dependency
    sets), so one pass in that order settles every level; other graphs peel ready nodes off
    round by round."""
    n = dep.shape[0]
    perm = np.argsort(dep.sum(1), kind="stable")
    tri = dep[np.ix_(perm, perm)]
    lev = np.zeros(n, dtype=np.int64)
    if not np.triu(tri).any():  # strictly lower triangular: perm is a topological order
        for t in range(1, n):
            row = tri[t, :t]
            if row.any():
                lev[perm[t]] = lev[perm[:t][row]].max() + 1
        return lev
    solved = np.zeros(n, dtype=bool)
    level = 0
    while not solved.all():
        ready = ~solved & ~(dep & ~solved[None, :]).any(1)
        if not ready.any():
            return None  # a cycle
        lev[ready] = level
        solved |= ready
        level += 1
    return lev


# The graphs read back, and the plans made from them: id(w1) -> (weak references to w1, w2,
# act; their (storage, version) stamps and `additive`; the per-step levels; {(n_passes,
# min_levels, device): _inverse_plan's return value}). Several entries, so that the layers of
# a flow (a MAF after a MAF) do not evict each other; cleared past _PLANS_MAX.
_plans: dict[int, tuple] = {}
_PLANS_MAX = 64
# The same entries adopted for the backward's unpacked saved tensors (adopt_graph): one per
# inverting layer and training step, kept apart so that they never evict _plans' entries.
_adopted: dict[int, tuple] = {}


def _graph_source(w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """The tensors whose zero pattern gives the dependency graph: the layer's masks when its
    call said the weights are masked by them (ops.vector_flows.weights_masked_by; their graph
    contains the weights' own, so an order for it is an order for the weights, and they stay
    the same tensors from step to step), else the weights."""
    masks = _masks_in_effect()
    if masks is not None and masks[0].shape == w1.shape and masks[1].shape == w2.shape:
        return masks
    return w1, w2


def _graph_entry(w1: Tensor, w2: Tensor, act: Tensor, additive: bool) -> tuple | None:
    """The memo entry for these three tensors unchanged since it was made, or None."""
    w1, w2 = _graph_source(w1, w2)
    key = None
    for memo in (_plans, _adopted):
        entry = memo.get(id(w1))
        if entry is None or any(r() is not t for r, t in zip(entry[0], (w1, w2, act))):
            continue
        key = _graph_key(w1, w2, act, additive) if key is None else key
        if entry[1] == key:
            return entry
    return None


def _graph_key(w1: Tensor, w2: Tensor, act: Tensor, additive: bool) -> tuple | None:
    # Tensors made under torch.inference_mode carry no version counter: never remembered.
    if any(t.is_inference() for t in (w1, w2, act)):
        return None
    return (additive, *((t.data_ptr(), t._version) for t in (w1, w2, act)))


def graph_entry(w1: Tensor, w2: Tensor, act: Tensor, additive: bool) -> tuple | None:
    """A token for the remembered graph and plans of these tensors (None if not read back
    yet), for adopt_graph: what the differentiable inverse keeps from its forward for its
    backward."""
    entry, key = _graph_entry(w1, w2, act, additive), _graph_key(w1, w2, act, additive)
    return None if entry is None or key is None else (entry, key)


def adopt_graph(token: tuple, w1: Tensor, w2: Tensor, act: Tensor, additive: bool) -> None:
    """Remember graph_entry's graph for these tensors: the same storages at the same versions
    as the ones it was taken for (autograd's saved tensors, unpacked in the backward as new
    Python objects once the forward's are gone; autograd has checked their versions)."""
    entry, key_then = token
    key = _graph_key(w1, w2, act, additive)
    if key is None or key != key_then:
        return
    if len(_adopted) >= _PLANS_MAX:
        _adopted.clear()
    _adopted[id(w1)] = (tuple(weakref.ref(t) for t in (w1, w2, act)), key, entry[2], entry[3])


def _graph(w1: Tensor, w2: Tensor, act: Tensor, additive: bool) -> tuple:
    """The memo entry (see _plans) of the dependency graph of _inverse_plan: its third item
    lists per step (the dimensions it changes sorted by dependency level, then those it leaves
    alone; how many it changes; its number of levels, 0 for a cycle), from the zero pattern of
    the weights, or of the layer's masks (_graph_source); its fourth holds the plans made
    from it. Reads the [K, D, D] pattern back to the host (one synchronisation), except for
    tensors seen before at the same storage and versions (_plans: a layer's masks from its
    first call on; the differentiable inverse's forward and backward share one read-back, see
    adopt_graph). Tensors made under torch.inference_mode carry no version counter: those are
    read back every call, their entry not remembered."""
    entry = _graph_entry(w1, w2, act, additive)
    if entry is not None:
        return entry
    w1, w2 = _graph_source(w1, w2)
    k, h, d = w1.shape
    with torch.no_grad():
        nz1 = (w1 != 0).to(torch.float32)
        nz2 = w2[:, :d] != 0
        if not additive:
            nz2 = nz2 | (w2[:, d:] != 0)
        dep = torch.bmm(nz2.to(torch.float32), nz1) > 0  # [K, D out, D in]
        changed = act > 0
        # one read-back for both
        both = torch.cat([dep.flatten(1), changed], 1).cpu().numpy()
        dep, changed = both[:, :d * d].reshape(k, d, d), both[:, d * d:]
    res = []
    for i in range(k):
        dims = np.nonzero(changed[i])[0]
        lev = _levels(dep[i][np.ix_(dims, dims)])
        n_levels = 0 if lev is None or len(dims) == 0 else int(lev.max()) + 1
        order = dims if lev is None else dims[np.argsort(lev, kind="stable")]
        res.append((np.concatenate([order, np.nonzero(~changed[i])[0]]).astype(np.int32), len(dims), n_levels))
    key = _graph_key(w1, w2, act, additive)
    if key is None:
        return (), None, res, {}
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    entry = _plans[id(w1)] = (tuple(weakref.ref(t) for t in (w1, w2, act)), key, res, {})
    return entry


def _inverse_plan(w1: Tensor, w2: Tensor, act: Tensor, additive: bool, n_passes: int, min_levels: int = 2
                  ) -> tuple[Tensor, Tensor, Tensor, bool] | None:
    """Per step, the order in which the one-pass inverse solves the dimensions it changes, or
    none (sweeps): output j depends on input i when a hidden unit h has W1[h, i] != 0 and
    W2[j, h] != 0 (or W2[d + j, h], affine); a step whose graph among its act dimensions has no
    cycle and at most n_passes levels is solved exactly by its order, where n_passes sweeps reach
    the same fixed point (the C++ kernel's rule, SeqPlan in csrc/flows/vector_flow_cpu.cpp, which
    also leaves steps of fewer than min_levels levels, single-level couplings, to the sweeps;
    the backward's solve takes those too, min_levels=1). Returns (order [K, D] int32: the act
    dimensions by level, then the act = 0 ones; count [K] int32: how many act dimensions;
    planned [K] int32) on the weights' device, and whether every step is planned (from the
    host copy: no read-back), or None when no step has a plan. The graph comes from
    _graph (one host read-back, shared by calls on the same, unchanged weights), and the
    tensors for the same graph, pass count, level floor and device are made once (kept with
    the graph in _plans: a copy from pageable host memory waits for the stream, like a
    read-back)."""
    _, _, levels, made = _graph(w1, w2, act, additive)
    key = (n_passes, min_levels, w1.device)
    if key in made:
        return made[key]
    k, _, d = w1.shape
    order = np.zeros((k, d), dtype=np.int32)
    count = np.zeros(k, dtype=np.int32)
    planned = np.zeros(k, dtype=np.int32)
    for i, (step_order, n_changed, n_levels) in enumerate(levels):
        if n_levels == 0 or n_levels < min_levels or n_levels > n_passes:
            continue
        order[i], count[i], planned[i] = step_order, n_changed, 1
    plan = None
    if planned.any():
        dev = w1.device
        plan = (torch.from_numpy(order).to(dev), torch.from_numpy(count).to(dev), torch.from_numpy(planned).to(dev),
                bool(planned.all()))
    made[key] = plan
    return plan


def vector_flow_inv(y: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: Tensor,
                    additive: bool, n_passes: int) -> tuple[Tensor, Tensor]:
    """(x, forward logdet at x) with stack(x) = y: per step n_passes fixed-point sweeps, or,
    for the steps _inverse_plan finds a dependency order for, one pass in that order (the same
    fixed point; LATENTFAST_VF_SEQ_INV=0 keeps the sweeps, as for the C++ kernel)."""
    check_rank("vector_flow_inv", y=(y, 2))
    _check_stack("vector_flow_inv", y, ctx, w1, b1, w2, b2, act, additive)
    if n_passes < 1:
        raise ValueError(f"vector_flow_inv: n_passes must be >= 1, got {n_passes}")
    y, ctx, w1, b1, w2, b2, act = (_c(t) for t in (y, ctx, w1, b1, w2, b2, act))
    (B, D), (K, H, _) = y.shape, w1.shape
    x = torch.full_like(y, float("nan"))
    ld = y.new_full((B,), float("nan"))
    bb, bd, bh, nw, ns = _blocks(D, H, y.element_size())
    plan = _inverse_plan(w1, w2, act, additive, n_passes) if os.environ.get("LATENTFAST_VF_SEQ_INV") != "0" else None
    if plan is None:
        order = count = planned = torch.zeros(K, dtype=torch.int32, device=y.device)  # (all sweeps)
        w1t, bhf = w1, 16
    else:
        order, count, planned, every_step = plan
        w1t = w1.transpose(1, 2).contiguous()  # [K, D, H]: the rank-1 updates' rows
        bhf = max(16, triton.next_power_of_2(H))  # the whole hidden layer of a row block in registers
    if B == 0:
        return x, ld
    sweeps = plan is None or not every_step
    if not sweeps:  # every step in dependency order: no tl.dot, any number of rows per program
        bb, nw, ns = _rows_for_registers(bd, bhf), 8, 1
    if not _launch(_vector_flow_inv_kernel, (triton.cdiv(B, bb),),
                   y, ctx if ctx is not None else y, w1, b1, w2, b2, act, x, ld, w1t, order, count, planned, B, D, H,
                   K, n_passes, HAS_CTX=ctx is not None, ADDITIVE=additive, SWEEPS=sweeps, BLOCK_B=bb, BLOCK_D=bd,
                   BLOCK_H=bh, BLOCK_HF=bhf, num_warps=nw, num_stages=ns):
        x, ld = ref.vector_flow_stack_inverse(y, ctx, w1, b1, w2, b2, act, additive, n_passes, differentiable=False)
        return x.contiguous(), ld.contiguous()
    return x, ld


def vector_flow_inv_grad(grad_x: Tensor, grad_logdet: Tensor, xs: Tensor, out: Tensor, ctx: Tensor | None,
                         w1: Tensor, b1: Tensor, w2: Tensor, act: Tensor, additive: bool, n_passes: int
                         ) -> Tensor | None:
    """The inverse's backward solve, u = J_K^-T (... J_1^-T (grad_x + gld dld_1/dx) ...), in one
    launch when every step has a dependency order within n_passes levels (the C++
    vector_flow_inv_grad's rule); None otherwise (the caller iterates). xs, out: the forward
    stack at the inverse's solution (the hidden layers are recomputed in the kernel)."""
    check_rank("vector_flow_inv_grad", xs=(xs, 3))
    k, b, d, _, o = _check_stack("vector_flow_inv_grad", xs, ctx, w1, b1, w2, None, act, additive,
                                 batch=xs.shape[1])
    check_args("vector_flow_inv_grad", xs, grad_x=(grad_x, (b, d)), grad_logdet=(grad_logdet, b),
               out=(out, (k, b, o)))
    if os.environ.get("LATENTFAST_VF_SEQ_INV") == "0":
        return None
    plan = _inverse_plan(w1, w2, act, additive, n_passes, min_levels=1)
    if plan is None or not plan[3]:
        return None
    order, count, _, _ = plan
    grad_x, grad_logdet, xs, out, ctx, w1, b1, w2, act = (
        _c(t) for t in (grad_x, grad_logdet, xs, out, ctx, w1, b1, w2, act))
    K, B, D = xs.shape
    H = w1.shape[1]
    u = torch.full_like(grad_x, float("nan"))
    if B == 0:
        return u
    _, bd, _, nw, _ = _blocks(D, H, xs.element_size())
    bhf = max(16, triton.next_power_of_2(H))
    bb = _rows_for_registers(bd, bhf)
    if not _launch(_vector_flow_inv_grad_kernel, (triton.cdiv(B, bb),),
                   grad_x, grad_logdet, xs, out, ctx if ctx is not None else xs, w1.transpose(1, 2).contiguous(), b1,
                   w2, act, order, count, u, B, D, H, K, HAS_CTX=ctx is not None, ADDITIVE=additive, BLOCK_B=bb,
                   BLOCK_D=bd, BLOCK_HF=bhf, num_warps=nw):
        return None
    return u
