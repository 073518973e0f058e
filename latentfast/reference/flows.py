"""Reference (specification) of the Glow-step ops, in plain differentiable PyTorch.

Conventions shared by every backend:
- Tensors are NCHW; a per-pixel affine map acts on the channel axis.
- The coupling net output h is ``cat([shift, raw], dim=1)`` for the affine coupling and
  ``shift`` alone for the additive (NICE) one. The first half of the channels conditions,
  the second half is transformed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fold_actnorm_into_conv(logs: Tensor, bias: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The per-pixel affine map of ActNorm then 1x1 conv: W((x + b) * e^logs) = A x + c.

    Returns A = W diag(e^logs) [Co, Ci] and c = W (e^logs * b) [Co].
    """
    scale = torch.exp(logs)
    return weight * scale[None, :], weight @ (scale * bias)


def actnorm_invconv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """y[n, :, p] = weight @ x[n, :, p] + bias, for x [N, Ci, H, W], weight [Co, Ci]."""
    return torch.einsum("oi,nihw->nohw", weight, x) + bias[None, :, None, None]


def affine_coupling(x_b: Tensor, h: Tensor, additive: bool = False) -> tuple[Tensor, Tensor]:
    """y_b = x_b + shift (additive) or (x_b + shift) * sigmoid(raw + 2) (affine).

    Returns (y_b [N, Cb, H, W], logdet [N]) with logdet = sum log sigmoid(raw + 2) (0 if
    additive).
    """
    if additive:
        return x_b + h, x_b.new_zeros(x_b.shape[0])
    shift, raw = h.chunk(2, dim=1)
    y = (x_b + shift) * torch.sigmoid(raw + 2.0)
    return y, F.logsigmoid(raw + 2.0).flatten(1).sum(1)


def affine_coupling_inverse(y_b: Tensor, h: Tensor, additive: bool = False) -> tuple[Tensor, Tensor]:
    """x_b = y_b - shift or y_b / sigmoid(raw + 2) - shift; logdet = -sum log sigmoid."""
    if additive:
        return y_b - h, y_b.new_zeros(y_b.shape[0])
    shift, raw = h.chunk(2, dim=1)
    x = y_b / torch.sigmoid(raw + 2.0) - shift
    return x, -F.logsigmoid(raw + 2.0).flatten(1).sum(1)


def affine_coupling_backward(
    grad_y: Tensor, grad_logdet: Tensor, x_b: Tensor, h: Tensor, additive: bool = False
) -> tuple[Tensor, Tensor]:
    """Gradients of affine_coupling w.r.t. (x_b, h), written out.

    With s = sigmoid(raw + 2): dx = gy * s, dshift = gy * s,
    draw = (gy * (x_b + shift) * s + g_logdet) * (1 - s).
    """
    if additive:
        return grad_y.clone(), grad_y.clone()
    shift, raw = h.chunk(2, dim=1)
    s = torch.sigmoid(raw + 2.0)
    gx = grad_y * s
    graw = (grad_y * (x_b + shift) * s + grad_logdet[:, None, None, None]) * (1.0 - s)
    return gx, torch.cat([gx, graw], dim=1)


def actnorm_invconv_coupling(
    x: Tensor, weight: Tensor, bias: Tensor, h: Tensor, additive: bool = False
) -> tuple[Tensor, Tensor]:
    """z = weight @ x + bias per pixel, then the coupling on the second half of z given h.

    Returns (y [N, Co, H, W], logdet of the coupling [N]). The conv's own log-det
    (H*W*log|det A|) is a function of the parameters only and is added by the caller.
    """
    z = actnorm_invconv(x, weight, bias)
    z_a, z_b = z.chunk(2, dim=1)
    y_b, logdet = affine_coupling(z_b, h, additive)
    return torch.cat([z_a, y_b], dim=1), logdet


def actnorm_invconv_backward(
    grad_y: Tensor, grad_logdet: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor,
    h: Tensor | None, mode: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of actnorm_invconv (mode 0) or actnorm_invconv_coupling (mode 1 additive,
    2 affine) w.r.t. (x, weight, bias, h): gz = grad of z, gx = A^T gz, gA = sum gz x^T,
    gc = sum gz."""
    gz, gh = grad_y, None
    if mode:
        ca = weight.shape[0] // 2
        z_b = actnorm_invconv(x, weight[ca:], bias[ca:])
        gz_b, gh = affine_coupling_backward(grad_y[:, ca:], grad_logdet, z_b, h, mode == 1)
        gz = torch.cat([grad_y[:, :ca], gz_b], dim=1)
    gx = torch.einsum("oi,nohw->nihw", weight, gz)
    gw = torch.einsum("nohw,nihw->oi", gz, x)
    return gx, gw, gz.sum(dim=(0, 2, 3)), gh


def lu_weight(
    perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_abs_s: Tensor
) -> tuple[Tensor, Tensor]:
    """W = P L (U + diag(sign_s * exp(log_abs_s))) and W^-1 by triangular solves.

    L = unit lower triangle of `lower` (its strict lower part), U = strict upper part of
    `upper`. log|det W| = sum(log_abs_s). Returns (W [C, C], W^-1 [C, C]).
    """
    c = perm.shape[0]
    eye = torch.eye(c, dtype=perm.dtype, device=perm.device)
    low = torch.tril(lower, -1) + eye
    up = torch.triu(upper, 1) + torch.diag(sign_s * torch.exp(log_abs_s))
    w = perm @ low @ up
    z = torch.linalg.solve_triangular(low, perm.T, upper=False, unitriangular=True)
    return w, torch.linalg.solve_triangular(up, z, upper=True)


def lu_weight_backward(perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_abs_s: Tensor,
                       w_inv: Tensor, grad_w: Tensor | None, grad_w_inv: Tensor | None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of lower, upper and log_abs_s from those of W and W^-1 (either may be None;
    w_inv is lu_weight's second output), as PyTorch ops (differentiable).

    With U' = triu(upper, 1) + diag(d), d = sign_s * exp(log_abs_s), W = P L U' and
    d(W^-1) = -W^-1 dW W^-1: g = grad W - W^-T grad_{W^-1} W^-T, G = P^T g,
    grad lower = tril(G U'^T, -1), H = L^T G, grad upper = triu(H, 1), grad log_abs_s = diag(H) d.
    """
    g = torch.zeros_like(perm) if grad_w is None else grad_w
    if grad_w_inv is not None:
        g = g - w_inv.T @ grad_w_inv @ w_inv.T
    d = sign_s * torch.exp(log_abs_s)
    low = torch.tril(lower, -1)  # diagonals set in place: one pass fewer than + eye / + diag
    low.diagonal().fill_(1.0)
    up = torch.triu(upper, 1)
    up.diagonal().copy_(d)
    pg = perm.T @ g
    g_up = low.T @ pg
    return torch.tril(pg @ up.T, -1), torch.triu(g_up, 1), torch.diagonal(g_up) * d
