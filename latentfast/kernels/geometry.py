"""Triton kernels of the latent-geometry ops (GPU, and CPU under TRITON_INTERPRET=1).

The same three fused steps as the C++ backend (csrc/geometry/geometry_kernels.inc); the
GEMMs between them go to cuBLAS through torch (latentfast/ops/geometry.py):
- mlp_act_tangent_: h = act(a + bias), tangent rows *= act'(a + bias), in place;
- weighted_gram: M[n, i, j] = sum_x w[n, x] p[n, i, x] q[n, j, x];
- curve_reduce: energy T * sum ||g_{t+1} - g_t||^2, length sum ||.||, and their gradient
  (curve_reduce_grad_: the gradient into a caller's buffer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from latentfast.kernels import check_args, check_rank, launch
from latentfast.kernels._math import expm1 as _expm1, log1p as _log1p, sigmoid as _sigmoid, tanh as _tanh


@triton.jit
def _act_and_deriv(a, CODE: tl.constexpr):
    if CODE == 0:
        f = a
        df = tl.full(a.shape, 1.0, a.dtype)
    elif CODE == 1:
        f = _tanh(a)
        df = 1.0 - f * f
    elif CODE == 2:
        e = tl.exp(-tl.abs(a))
        f = tl.maximum(a, 0.0) + _log1p(e)
        s = 1.0 / (1.0 + e)
        df = tl.where(a < 0, 1.0 - s, s)
    elif CODE == 3:
        em = _expm1(tl.where(a > 0, 0.0, a))  # a NaN stays NaN in f and df (tl.minimum drops it on a GPU)
        f = tl.where(a > 0, a, em)
        df = tl.where(a > 0, 1.0, em + 1.0)
    else:
        s = _sigmoid(a)
        f = s
        df = s * (1.0 - s)
    return f, df


@triton.jit
def _act_tangent_kernel(buf_ptr, deriv_ptr, bias_ptr, n_points, H, N_DIRS: tl.constexpr, CODE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pn = tl.program_id(0)
    ph = tl.program_id(1)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = ph * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (rows < n_points)[:, None] & (cols < H)[None, :]
    off = rows[:, None] * H + cols[None, :]
    a = tl.load(buf_ptr + off, mask=m, other=0.0)
    if HAS_BIAS:
        a += tl.load(bias_ptr + cols, mask=cols < H, other=0.0)[None, :]
    f, df = _act_and_deriv(a, CODE)
    tl.store(buf_ptr + off, f, mask=m)
    tl.store(deriv_ptr + off, df, mask=m)
    for k in tl.static_range(N_DIRS):
        t_off = (n_points + rows[:, None] * N_DIRS + k) * H + cols[None, :]
        t = tl.load(buf_ptr + t_off, mask=m, other=0.0)
        tl.store(buf_ptr + t_off, t * df, mask=m)


def mlp_act_tangent_(buf: Tensor, deriv: Tensor, n_points: int, n_dirs: int, act: int,
                     bias: Tensor | None = None) -> None:
    """In place on buf [n_points * (1 + n_dirs), H]: the first n_points rows become
    act(a + bias), the tangent rows are scaled by act'(a + bias), which deriv [n_points, H]
    receives (bias [H] or None)."""
    check_rank("mlp_act_tangent_", buf=(buf, 2))
    h = buf.shape[1]
    check_args("mlp_act_tangent_", buf, buf=(buf, (n_points * (1 + n_dirs), h)), deriv=(deriv, (n_points, h)),
               bias=(bias, (h,)))
    if not (buf.is_contiguous() and deriv.is_contiguous()) or act not in range(5):
        raise ValueError(f"mlp_act_tangent_: buf and deriv must be contiguous (written in place) and act a code "
                         f"0..4, got act {act}")
    if n_points == 0 or h == 0:
        return
    block_h = min(128, triton.next_power_of_2(h))
    block_n = 16
    grid = (triton.cdiv(n_points, block_n), triton.cdiv(h, block_h))
    launch(_act_tangent_kernel, grid, buf, deriv, bias.contiguous() if bias is not None else buf, n_points, h,
           N_DIRS=n_dirs, CODE=act, HAS_BIAS=bias is not None, BLOCK_N=block_n,
           BLOCK_H=block_h)


@triton.jit
def _gram_kernel(p_ptr, q_ptr, w_ptr, out_ptr, N, X, D: tl.constexpr, HAS_W: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: BLOCK_N points; acc[n, i, j] over chunks of X.
    pid = tl.program_id(0)
    pts = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    pt_ok = pts < N
    d_ok = dd < D
    acc = tl.zeros((BLOCK_N, BLOCK_D, BLOCK_D), dtype=p_ptr.dtype.element_ty)
    for x0 in range(0, X, BLOCK_X):
        xs = x0 + tl.arange(0, BLOCK_X)
        x_ok = xs < X
        m = pt_ok[:, None, None] & d_ok[None, :, None] & x_ok[None, None, :]
        off = (pts[:, None, None] * D + dd[None, :, None]) * X + xs[None, None, :]
        p = tl.load(p_ptr + off, mask=m, other=0.0)  # [BN, BD, BX]
        q = tl.load(q_ptr + off, mask=m, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + pts[:, None] * X + xs[None, :], mask=pt_ok[:, None] & x_ok[None, :], other=0.0)
            p = p * w[:, None, :]
        # [BN, BD, 1, BX] * [BN, 1, BD, BX] summed over X
        acc += tl.sum(p[:, :, None, :] * q[:, None, :, :], axis=3)
    o_off = (pts[:, None, None] * D + dd[None, :, None]) * D + dd[None, None, :]
    o_m = pt_ok[:, None, None] & d_ok[None, :, None] & d_ok[None, None, :]
    tl.store(out_ptr + o_off, acc, mask=o_m)


def weighted_gram(p: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
    """out[n, i, j] = sum_x w[n, x] p[n, i, x] q[n, j, x] for p, q [N, d, X], w [N, X] or None."""
    check_rank("weighted_gram", p=(p, 3))
    n, d, x = p.shape
    check_args("weighted_gram", p, q=(q, (n, d, x)), w=(w, (n, x)))
    p, q = p.contiguous(), q.contiguous()
    out = torch.empty((n, d, d), dtype=p.dtype, device=p.device)
    if n == 0:
        return out
    block_d = max(2, triton.next_power_of_2(d))
    # Keep the [BN, BD, BD, BX] product at about 8K elements per program.
    block_x = max(16, min(128, triton.next_power_of_2(x)))
    block_n = max(1, min(16, 8192 // (block_d * block_d * block_x)))
    block_n = triton.next_power_of_2(block_n)
    wc = w.contiguous() if w is not None else p
    launch(_gram_kernel, (triton.cdiv(n, block_n),), p, q, wc, out, n, x, D=d, HAS_W=w is not None,
           BLOCK_N=block_n, BLOCK_X=block_x, BLOCK_D=block_d)
    return out


@triton.jit
def _curve_reduce_kernel(g_ptr, e_ptr, l_ptr, ge_ptr, gl_ptr, gg_ptr, T1, F,
                         HAS_GE: tl.constexpr, HAS_GL: tl.constexpr, WANT: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    # One program per curve, rows (points) in blocks of BLOCK_T. For each row r the program
    # forms ||g_r - g_{r-1}||^2 and ||g_{r+1} - g_r||^2 (segments r-1 and r), so the
    # gradient row gg_r = c_{r-1} delta_{r-1} - c_r delta_r, c = 2 T ge + gl / ||delta||,
    # needs no data from other rows' results.
    b = tl.program_id(0)
    g_b = g_ptr + b * T1 * F
    segs = T1 - 1
    zero = tl.sum(tl.zeros((BLOCK_T,), dtype=g_ptr.dtype.element_ty), axis=0)
    cge = zero
    cgl = zero
    if HAS_GE:
        cge = 2.0 * segs * tl.load(ge_ptr + b)
    if HAS_GL:
        cgl = zero + tl.load(gl_ptr + b)
    e = zero
    length = zero
    for r0 in range(0, T1, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        has_prev = (rows >= 1) & (rows < T1)
        has_next = rows < segs
        sq_prev = tl.zeros((BLOCK_T,), dtype=g_ptr.dtype.element_ty)
        sq_next = tl.zeros((BLOCK_T,), dtype=g_ptr.dtype.element_ty)
        for f0 in range(0, F, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            fm = (fs < F)[None, :]
            g_r = tl.load(g_b + rows[:, None] * F + fs[None, :], mask=(rows < T1)[:, None] & fm, other=0.0)
            g_p = tl.load(g_b + (rows[:, None] - 1) * F + fs[None, :], mask=has_prev[:, None] & fm, other=0.0)
            g_n = tl.load(g_b + (rows[:, None] + 1) * F + fs[None, :], mask=has_next[:, None] & fm, other=0.0)
            d_p = tl.where(has_prev[:, None], g_r - g_p, 0.0)
            d_n = tl.where(has_next[:, None], g_n - g_r, 0.0)
            sq_prev += tl.sum(d_p * d_p, axis=1)
            sq_next += tl.sum(d_n * d_n, axis=1)
        n_next = tl.sqrt(sq_next)
        e += tl.sum(sq_next, axis=0)
        length += tl.sum(n_next, axis=0)
        if WANT:
            n_prev = tl.sqrt(sq_prev)
            c_prev = tl.where(has_prev, cge + tl.where(n_prev > 0, cgl / tl.where(n_prev > 0, n_prev, 1.0), 0.0), 0.0)
            c_next = tl.where(has_next, cge + tl.where(n_next > 0, cgl / tl.where(n_next > 0, n_next, 1.0), 0.0), 0.0)
            for f0 in range(0, F, BLOCK_F):
                fs = f0 + tl.arange(0, BLOCK_F)
                fm = (fs < F)[None, :]
                g_r = tl.load(g_b + rows[:, None] * F + fs[None, :], mask=(rows < T1)[:, None] & fm, other=0.0)
                g_p = tl.load(g_b + (rows[:, None] - 1) * F + fs[None, :], mask=has_prev[:, None] & fm, other=0.0)
                g_n = tl.load(g_b + (rows[:, None] + 1) * F + fs[None, :], mask=has_next[:, None] & fm, other=0.0)
                out = c_prev[:, None] * (g_r - g_p) - c_next[:, None] * (g_n - g_r)
                tl.store(gg_ptr + b * T1 * F + rows[:, None] * F + fs[None, :], out,
                         mask=(rows < T1)[:, None] & fm)
    tl.store(e_ptr + b, segs * e)
    tl.store(l_ptr + b, length)


def curve_reduce(g: Tensor, grad_energy: Tensor | None, grad_length: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(energy [B], length [B], grad wrt g or an empty tensor) for curves g [B, T+1, F]."""
    want = grad_energy is not None or grad_length is not None
    gg = torch.empty(g.shape, dtype=g.dtype, device=g.device) if want else g.new_empty(0)
    energy, length = _curve_reduce_into(g, grad_energy, grad_length, gg if want else None)
    return energy, length, gg


def curve_reduce_grad_(gg: Tensor, g: Tensor, grad_energy: Tensor | None, grad_length: Tensor | None
                       ) -> tuple[Tensor, Tensor]:
    """curve_reduce with the gradient written into gg (contiguous, g's shape and dtype)."""
    if grad_energy is None and grad_length is None:
        raise ValueError("curve_reduce_grad_: needs grad_energy or grad_length")
    if gg.shape != g.shape or gg.dtype != g.dtype or gg.device != g.device or not gg.is_contiguous():
        raise ValueError("curve_reduce_grad_: the gradient buffer must be contiguous, of g's shape, dtype "
                         "and device")
    return _curve_reduce_into(g, grad_energy, grad_length, gg)


def _curve_reduce_into(g: Tensor, grad_energy: Tensor | None, grad_length: Tensor | None,
                       gg: Tensor | None) -> tuple[Tensor, Tensor]:
    """(energy, length) of curves g; with gg (not None) the gradient written into it."""
    check_rank("curve_reduce", g=(g, 3))
    g = g.contiguous()
    b, t1, f = g.shape
    if t1 < 2:
        raise ValueError(f"curve_reduce: g must be [B, T+1, F] with T >= 1, got {list(g.shape)}")
    for name, t in (("grad_energy", grad_energy), ("grad_length", grad_length)):
        if t is not None and (tuple(t.shape) != (b,) or t.device != g.device):
            raise ValueError(f"curve_reduce: {name} must be [{b}] on {g.device}, got {list(t.shape)} on {t.device}")
    energy = torch.empty(b, dtype=g.dtype, device=g.device)
    length = torch.empty(b, dtype=g.dtype, device=g.device)
    want = gg is not None
    if b == 0:
        return energy, length
    ge = grad_energy.to(g.dtype).contiguous() if grad_energy is not None else energy
    gl = grad_length.to(g.dtype).contiguous() if grad_length is not None else energy
    block_t = max(2, min(32, triton.next_power_of_2(t1)))
    block_f = max(16, min(4096 // block_t, triton.next_power_of_2(f)))
    # 8 warps: with 4 the sm_90 build with gradients needs all 255 registers and spills 224
    # bytes a thread; with 8, 239 and none (scripts/triton_smem.py)
    launch(_curve_reduce_kernel, (b,), g, energy, length, ge, gl, gg if want else g, t1, f,
           HAS_GE=grad_energy is not None, HAS_GL=grad_length is not None,
           WANT=want, BLOCK_T=block_t, BLOCK_F=block_f, num_warps=8)
    return energy, length
