"""Triton kernels of the Glow-step ops (GPU, and CPU under TRITON_INTERPRET=1).

Math (see latentfast.reference.flows for the specification):
    z = A x + c per pixel (ActNorm folded into the 1x1 conv),
    y_a = z_a, y_b = z_b + shift (additive) or (z_b + shift) * s, s = sigmoid(raw + 2),
    logdet = sum log s;  dz_b = gy_b * s,  draw = (gy_b * (z_b + shift) * s + g_ld) * (1 - s).
Reductions (log-det, weight gradients) go through per-block partials summed afterwards, so
results do not depend on the order blocks run in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from latentfast.kernels import check_args, check_rank, launch
from latentfast.kernels._math import log_sigmoid as _log_sigmoid


@triton.jit
def _rows_matmul(w_ptr, x_ptr, rows, pix, row_ok, pix_ok, Ci, P,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    # acc[r, p] = sum_k W[rows[r], k] * X[k, pix[p]]  (W row-major [*, Ci], X row-major [Ci, P]).
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=x_ptr.dtype.element_ty)
    for k0 in range(0, Ci, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Ci
        w = tl.load(w_ptr + rows[:, None] * Ci + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ks[:, None] * P + pix[None, :], mask=k_ok[:, None] & pix_ok[None, :], other=0.0)
        acc += tl.dot(w, x, input_precision="ieee")
    return acc


@triton.jit
def _actnorm_invconv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, y_ptr, ld_ptr, Ci, Co, P,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: BLOCK_P pixels of sample n, channel block j of z (MODE 0) or of the
    coupling half (MODE 1 additive / 2 affine: rows j of z_a and of z_b)."""
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    pix = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = pix < P
    x_n = x_ptr + n * Ci * P
    y_n = y_ptr + n * Co * P
    rows = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if MODE == 0:
        row_ok = rows < Co
        z = _rows_matmul(w_ptr, x_n, rows, pix, row_ok, pix_ok, Ci, P, BLOCK_C, BLOCK_K, BLOCK_P)
        z += tl.load(b_ptr + rows, mask=row_ok, other=0.0)[:, None]
        tl.store(y_n + rows[:, None] * P + pix[None, :], z, mask=row_ok[:, None] & pix_ok[None, :])
    else:
        Cb = Co // 2
        row_ok = rows < Cb
        m2 = row_ok[:, None] & pix_ok[None, :]
        z_a = _rows_matmul(w_ptr, x_n, rows, pix, row_ok, pix_ok, Ci, P, BLOCK_C, BLOCK_K, BLOCK_P)
        z_a += tl.load(b_ptr + rows, mask=row_ok, other=0.0)[:, None]
        tl.store(y_n + rows[:, None] * P + pix[None, :], z_a, mask=m2)
        z_b = _rows_matmul(w_ptr, x_n, rows + Cb, pix, row_ok, pix_ok, Ci, P, BLOCK_C, BLOCK_K, BLOCK_P)
        z_b += tl.load(b_ptr + Cb + rows, mask=row_ok, other=0.0)[:, None]
        if MODE == 1:
            h_n = h_ptr + n * Cb * P
            shift = tl.load(h_n + rows[:, None] * P + pix[None, :], mask=m2, other=0.0)
            y_b = z_b + shift
        else:
            h_n = h_ptr + n * 2 * Cb * P
            shift = tl.load(h_n + rows[:, None] * P + pix[None, :], mask=m2, other=0.0)
            u = tl.load(h_n + (rows[:, None] + Cb) * P + pix[None, :], mask=m2, other=0.0) + 2.0
            y_b = (z_b + shift) * tl.sigmoid(u)
            ld = tl.sum(tl.sum(tl.where(m2, _log_sigmoid(u), 0.0), axis=1), axis=0)
            nb_p = tl.num_programs(1)
            nb_c = tl.num_programs(2)
            tl.store(ld_ptr + (n * nb_p + pb) * nb_c + cb, ld)
        tl.store(y_n + (rows[:, None] + Cb) * P + pix[None, :], y_b, mask=m2)


@triton.jit
def _coupling_grad_kernel(
    gy_ptr, gld_ptr, x_ptr, w_ptr, b_ptr, h_ptr, gz_ptr, gh_ptr, Ci, Co, P,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad z (both halves) and grad h of the coupling, recomputing z_b from x."""
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    Cb = Co // 2
    pix = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = pix < P
    rows = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < Cb
    m2 = row_ok[:, None] & pix_ok[None, :]
    off = rows[:, None] * P + pix[None, :]
    gy_n = gy_ptr + n * Co * P
    gz_n = gz_ptr + n * Co * P
    tl.store(gz_n + off, tl.load(gy_n + off, mask=m2, other=0.0), mask=m2)
    gy_b = tl.load(gy_n + Cb * P + off, mask=m2, other=0.0)
    if MODE == 1:
        tl.store(gz_n + Cb * P + off, gy_b, mask=m2)
        tl.store(gh_ptr + n * Cb * P + off, gy_b, mask=m2)
    else:
        z_b = _rows_matmul(w_ptr, x_ptr + n * Ci * P, rows + Cb, pix, row_ok, pix_ok, Ci, P,
                           BLOCK_C, BLOCK_K, BLOCK_P)
        z_b += tl.load(b_ptr + Cb + rows, mask=row_ok, other=0.0)[:, None]
        h_n = h_ptr + n * 2 * Cb * P
        shift = tl.load(h_n + off, mask=m2, other=0.0)
        s = tl.sigmoid(tl.load(h_n + Cb * P + off, mask=m2, other=0.0) + 2.0)
        g_ld = tl.load(gld_ptr + n)
        gz_b = gy_b * s
        graw = (gy_b * (z_b + shift) * s + g_ld) * (1.0 - s)
        tl.store(gz_n + Cb * P + off, gz_b, mask=m2)
        gh_n = gh_ptr + n * 2 * Cb * P
        tl.store(gh_n + off, gz_b, mask=m2)
        tl.store(gh_n + Cb * P + off, graw, mask=m2)


@triton.jit
def _coupling_kernel(
    x_ptr, h_ptr, y_ptr, ld_ptr, CbP,
    ADDITIVE: tl.constexpr, INVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Elementwise coupling on one sample's [Cb * P] block; per-block log-det partial."""
    n = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < CbP
    x = tl.load(x_ptr + n * CbP + offs, mask=ok, other=0.0)
    if ADDITIVE:
        shift = tl.load(h_ptr + n * CbP + offs, mask=ok, other=0.0)
        y = x - shift if INVERSE else x + shift
    else:
        h_n = h_ptr + n * 2 * CbP
        shift = tl.load(h_n + offs, mask=ok, other=0.0)
        u = tl.load(h_n + CbP + offs, mask=ok, other=0.0) + 2.0
        s = tl.sigmoid(u)
        ls = tl.sum(tl.where(ok, _log_sigmoid(u), 0.0), axis=0)
        if INVERSE:
            y = x / s - shift
            ls = -ls
        else:
            y = (x + shift) * s
        tl.store(ld_ptr + n * tl.num_programs(1) + blk, ls)
    tl.store(y_ptr + n * CbP + offs, y, mask=ok)


@triton.jit
def _coupling_bwd_kernel(gy_ptr, gld_ptr, x_ptr, h_ptr, gx_ptr, gh_ptr, CbP, BLOCK: tl.constexpr):
    """Backward of the affine coupling (the additive one is an identity, done on the host)."""
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < CbP
    g = tl.load(gy_ptr + n * CbP + offs, mask=ok, other=0.0)
    x = tl.load(x_ptr + n * CbP + offs, mask=ok, other=0.0)
    h_n = h_ptr + n * 2 * CbP
    shift = tl.load(h_n + offs, mask=ok, other=0.0)
    s = tl.sigmoid(tl.load(h_n + CbP + offs, mask=ok, other=0.0) + 2.0)
    g_ld = tl.load(gld_ptr + n)
    gx = g * s
    tl.store(gx_ptr + n * CbP + offs, gx, mask=ok)
    tl.store(gh_ptr + n * 2 * CbP + offs, gx, mask=ok)
    tl.store(gh_ptr + n * 2 * CbP + CbP + offs, (g * (x + shift) * s + g_ld) * (1.0 - s), mask=ok)


@triton.jit
def _lu_weight_kernel(perm_ptr, low_ptr, up_ptr, sign_ptr, logabs_ptr, w_ptr, winv_ptr, C,
                      BLOCK: tl.constexpr):
    """W = P L U' and W^-1 = U'^-1 (L^-1 P^T) in one program, row by row in registers."""
    idx = tl.arange(0, BLOCK)
    r2 = idx[:, None]
    c2 = idx[None, :]
    ok2 = (r2 < C) & (c2 < C)
    ok = idx < C
    diag = tl.load(sign_ptr + idx, mask=ok, other=1.0) * tl.exp(tl.load(logabs_ptr + idx, mask=ok, other=0.0))
    up = tl.load(up_ptr + r2 * C + c2, mask=ok2 & (c2 > r2), other=0.0)
    up = tl.where((r2 == c2) & ok2, diag[None, :], up)
    lu = tl.zeros((BLOCK, BLOCK), dtype=up.dtype)
    for i in range(0, C):  # row i of L U' = sum_k L[i, k] U'[k, :]
        l_i = tl.load(low_ptr + i * C + idx, mask=idx < i, other=0.0) + tl.where(idx == i, 1.0, 0.0)
        lu = tl.where(r2 == i, tl.sum(l_i[:, None] * up, axis=0)[None, :], lu)
    for i in range(0, C):  # W = P (L U')
        p_i = tl.load(perm_ptr + i * C + idx, mask=ok, other=0.0)
        tl.store(w_ptr + i * C + idx, tl.sum(p_i[:, None] * lu, axis=0), mask=ok)
    z = tl.zeros((BLOCK, BLOCK), dtype=up.dtype)
    for i in range(0, C):  # L Z = P^T, forward substitution
        rhs = tl.load(perm_ptr + idx * C + i, mask=ok, other=0.0)
        l_i = tl.load(low_ptr + i * C + idx, mask=idx < i, other=0.0)
        z = tl.where(r2 == i, (rhs - tl.sum(l_i[:, None] * z, axis=0))[None, :], z)
    xinv = tl.zeros((BLOCK, BLOCK), dtype=up.dtype)
    for ii in range(0, C):  # U' X = Z, back substitution
        i = C - 1 - ii
        u_i = tl.load(up_ptr + i * C + idx, mask=(idx > i) & ok, other=0.0)
        z_i = tl.sum(tl.where(r2 == i, z, 0.0), axis=0)
        d_i = tl.load(sign_ptr + i) * tl.exp(tl.load(logabs_ptr + i))
        row = (z_i - tl.sum(u_i[:, None] * xinv, axis=0)) / d_i
        xinv = tl.where(r2 == i, row[None, :], xinv)
        tl.store(winv_ptr + i * C + idx, row, mask=ok)


# ----------------------------------------------------------------------------- launchers

def _check_actnorm_invconv(op: str, x: Tensor, weight: Tensor, bias: Tensor, h: Tensor | None, mode: int) -> None:
    check_rank(op, x=(x, 4), weight=(weight, 2))
    n, ci, hh, ww = x.shape
    co = weight.shape[0]
    if mode not in (0, 1, 2) or (mode and (h is None or co % 2)):
        raise ValueError(f"{op}: mode must be 0, 1 or 2, and modes 1 and 2 need h and an even Co (got mode {mode}, "
                         f"Co {co}, h {'None' if h is None else 'given'})")
    check_args(op, x, weight=(weight, (co, ci)), bias=(bias, (co,)),
               h=(h if mode else None, (n, co // 2 if mode == 1 else co, hh, ww)))


def _check_coupling(op: str, x: Tensor, h: Tensor, additive: bool) -> None:
    check_rank(op, x=(x, 4))
    n, cb, hh, ww = x.shape
    check_args(op, x, h=(h, (n, cb if additive else 2 * cb, hh, ww)))


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def actnorm_invconv_fwd(x: Tensor, weight: Tensor, bias: Tensor, h: Tensor | None, mode: int
                        ) -> tuple[Tensor, Tensor]:
    """y = weight x + bias per pixel (+ coupling on the second half, mode 1/2) and the
    coupling log-det [N]. x [N, Ci, H, W], weight [Co, Ci], bias [Co], h [N, Cb or 2Cb, H, W]."""
    _check_actnorm_invconv("actnorm_invconv_fwd", x, weight, bias, h, mode)
    x = x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    n, ci, hh, ww = x.shape
    co, p = weight.shape[0], hh * ww
    rows = co if mode == 0 else co // 2
    block_c, block_k, block_p = _pow2(rows), _pow2(ci), 64
    grid = (n, triton.cdiv(p, block_p), triton.cdiv(rows, block_c))
    y = torch.empty((n, co, hh, ww), dtype=x.dtype, device=x.device)
    part = torch.zeros(grid, dtype=x.dtype, device=x.device)
    hc = h.contiguous() if mode else x  # unused pointer when mode == 0
    # 8 warps: with 4 the sm_90 build needs all 255 registers and spills 360-936 bytes a thread
    # (scripts/triton_smem.py); with 8, 142-192 registers and no spill (float64 at 64 channels: 88 bytes)
    # with Triton 3.9; Triton 3.6 (the GPU machine's) spills 256 bytes in float32 at 64-channel
    # blocks (128 channels and more), 296 in float64 (scripts/triton_release_check.sh); untimed
    launch(_actnorm_invconv_fwd_kernel, grid, x, weight, bias, hc, y, part, ci, co, p, MODE=mode,
           BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_P=block_p, num_warps=8)
    return y, part.sum(dim=(1, 2))


def actnorm_invconv_bwd(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, weight: Tensor,
                        bias: Tensor, h: Tensor | None, mode: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (x, weight, bias, h); grad h is empty for mode 0."""
    _check_actnorm_invconv("actnorm_invconv_bwd", x, weight, bias, h, mode)
    check_args("actnorm_invconv_bwd", x, grad_y=(grad_y, (x.shape[0], weight.shape[0], *x.shape[2:])),
               grad_logdet=(grad_logdet, x.shape[0]))
    x, grad_y = x.contiguous(), grad_y.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    n, ci, hh, ww = x.shape
    co, p = weight.shape[0], hh * ww
    if mode == 0:
        gz, gh = grad_y, x.new_zeros(0)
    else:
        h = h.contiguous()
        gz, gh = torch.empty_like(grad_y), torch.empty_like(h)
        block_c, block_k, block_p = _pow2(co // 2), _pow2(ci), 64
        grid = (n, triton.cdiv(p, block_p), triton.cdiv(co // 2, block_c))
        launch(_coupling_grad_kernel, grid, grad_y, grad_logdet.contiguous(), x, weight, bias, h, gz, gh,
               ci, co, p, MODE=mode, BLOCK_C=block_c, BLOCK_K=block_k,
               BLOCK_P=block_p, num_warps=8)  # (as above: 4 warps spill)
    gx, _ = actnorm_invconv_fwd(gz, weight.t(), torch.zeros_like(weight[0]), None, 0)
    gz3, x3 = gz.view(n, co, p), x.view(n, ci, p)
    gw = torch.bmm(gz3, x3.transpose(1, 2)).sum(0)
    return gx, gw, gz3.sum(dim=(0, 2)), gh


def affine_coupling_fwd(x: Tensor, h: Tensor, additive: bool, inverse: bool) -> tuple[Tensor, Tensor]:
    """Elementwise coupling (forward or inverse) and its log-det [N]."""
    _check_coupling("affine_coupling_fwd", x, h, additive)
    x, h = x.contiguous(), h.contiguous()
    n = x.shape[0]
    cbp = x.shape[1:].numel()  # (x[0] does not exist for an empty batch)
    block = 1024
    grid = (n, triton.cdiv(cbp, block))
    y = torch.empty_like(x)
    part = torch.zeros(grid, dtype=x.dtype, device=x.device)
    launch(_coupling_kernel, grid, x, h, y, part, cbp, ADDITIVE=additive, INVERSE=inverse, BLOCK=block)
    return y, part.sum(dim=1)


def affine_coupling_bwd(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, h: Tensor, additive: bool
                        ) -> tuple[Tensor, Tensor]:
    """Gradients of the forward coupling w.r.t. (x_b, h)."""
    _check_coupling("affine_coupling_bwd", x, h, additive)
    check_args("affine_coupling_bwd", x, grad_y=(grad_y, tuple(x.shape)), grad_logdet=(grad_logdet, x.shape[0]))
    if additive:
        return grad_y.clone(), grad_y.clone()
    grad_y, x, h = grad_y.contiguous(), x.contiguous(), h.contiguous()
    n, cbp = x.shape[0], x.shape[1:].numel()
    gx, gh = torch.empty_like(x), torch.empty_like(h)
    block = 1024
    launch(_coupling_bwd_kernel, (n, triton.cdiv(cbp, block)), grad_y, grad_logdet.contiguous(), x, h, gx, gh,
           cbp, BLOCK=block)
    return gx, gh


def lu_weight(perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_abs_s: Tensor
              ) -> tuple[Tensor, Tensor]:
    """(W, W^-1) from the LU parameters, one program (C up to a few hundred)."""
    check_rank("lu_weight", perm=(perm, 2))
    c = perm.shape[0]
    check_args("lu_weight", perm, perm=(perm, (c, c)), lower=(lower, (c, c)), upper=(upper, (c, c)),
               sign_s=(sign_s, (c,)), log_abs_s=(log_abs_s, (c,)))
    # row-major outputs whatever perm's layout (empty_like would keep a transposed perm's strides,
    # and the kernel writes rows)
    w = torch.empty((c, c), dtype=perm.dtype, device=perm.device)
    w_inv = torch.empty_like(w)
    block = max(16, triton.next_power_of_2(c))
    launch(_lu_weight_kernel, (1,), perm.contiguous(), lower.contiguous(), upper.contiguous(),
           sign_s.contiguous(), log_abs_s.contiguous(), w, w_inv, c, BLOCK=block)
    return w, w_inv
