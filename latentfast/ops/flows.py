"""Glow-step ops: registration, backend dispatch, autograd formulas, fake kernels.

Ops (namespace ``latentfast::``):
- ``actnorm_invconv(x, weight, bias)``: per-pixel affine map y = A x + c (ActNorm folded
  into the 1x1 conv; its inverse is the same op with the inverse map).
- ``actnorm_invconv_coupling(x, weight, bias, h, additive)``: the same map, then the
  coupling on the second half of the channels given the coupling net output h.
- ``affine_coupling`` / ``affine_coupling_inverse(x_b, h, additive)``.
- ``lu_weight(perm, lower, upper, sign_s, log_abs_s)`` -> (W, W^-1).
Each op runs the backend chosen by latentfast.backend.select at call time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from latentfast import backend
from latentfast import _ext  # noqa: F401  (loads latentfast_cpp kernels when built)
from latentfast.ops._amp import float32_under_autocast
from latentfast.ops._autograd import (graph_wanted, op_backward, reference_vjp, reject_tangents, route_transforms,
                                      under_transform)
from latentfast.ops._checks import check_lu_constants, check_tensor
from latentfast.reference import flows as ref


def _triton():
    return backend.triton_kernels("flows")


def _cpp():
    return torch.ops.latentfast_cpp


def _contiguous(outs):
    # The reference may return strided views (einsum); every backend returns the same
    # (contiguous) layout so fake kernels describe all of them.
    return tuple(t.contiguous() for t in outs)


# ------------------------------------------------------------------ actnorm_invconv (+ coupling)

def _fwd_impl(x: Tensor, weight: Tensor, bias: Tensor, h: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    be = backend.select(x.device)
    if be == "cpp":
        return _cpp().actnorm_invconv_fwd(x, weight, bias, h, mode)
    if be == "triton":
        return _triton().actnorm_invconv_fwd(x, weight, bias, h, mode)
    if mode == 0:
        return ref.actnorm_invconv(x, weight, bias).contiguous(), x.new_zeros(x.shape[0])
    return _contiguous(ref.actnorm_invconv_coupling(x, weight, bias, h, mode == 1))


@torch.library.custom_op("latentfast::actnorm_invconv", mutates_args=())
def _actnorm_invconv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    reject_tangents("actnorm_invconv", x, weight, bias)
    return _fwd_impl(x, weight, bias, None, 0)[0]


@torch.library.custom_op("latentfast::actnorm_invconv_coupling", mutates_args=())
def _actnorm_invconv_coupling(x: Tensor, weight: Tensor, bias: Tensor, h: Tensor, additive: bool
                              ) -> tuple[Tensor, Tensor]:
    reject_tangents("actnorm_invconv_coupling", x, weight, bias, h, additive)
    return _fwd_impl(x, weight, bias, h, 1 if additive else 2)


def _actnorm_invconv_backward_impl(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, weight: Tensor,
                                   bias: Tensor, h: Tensor | None, mode: int, y: Tensor | None = None
                                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # y: the forward's output (mode 2). The C++ kernel takes z_b + shift = y_b / s from it
    # instead of recomputing z_b = (A x + c)_b; the reference and Triton recompute z_b.
    reject_tangents("actnorm_invconv_backward", grad_y, grad_logdet, x, weight, bias, h, mode, y)
    be = backend.select(x.device)
    if be == "cpp":
        return _cpp().actnorm_invconv_bwd(grad_y, grad_logdet, x, weight, bias, h, mode, y)
    if be == "triton":
        return _triton().actnorm_invconv_bwd(grad_y, grad_logdet, x, weight, bias, h, mode)
    gx, gw, gb, gh = ref.actnorm_invconv_backward(grad_y, grad_logdet, x, weight, bias, h, mode)
    return _contiguous((gx, gw, gb, gh if gh is not None else x.new_zeros(0)))


def _backward_caller(impl, op):
    """How a registered backward calls its backward op: under _Eager (below; ctx.eager) the
    implementation directly, since the custom op's Python dispatch costs more than the kernel
    at small sizes; anywhere else (the custom op's own autograd, traced by torch.compile or
    opcheck) the custom op."""
    def call(ctx, *args):
        return impl(*args) if getattr(ctx, "eager", False) else op(*args)
    return call


_actnorm_invconv_backward_op = torch.library.custom_op("latentfast::actnorm_invconv_backward", mutates_args=())(
    _actnorm_invconv_backward_impl)
_actnorm_invconv_backward = _backward_caller(_actnorm_invconv_backward_impl, _actnorm_invconv_backward_op)


@_actnorm_invconv.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@_actnorm_invconv_coupling.register_fake
def _(x, weight, bias, h, additive):
    return (x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3])),
            x.new_empty((x.shape[0],)))


@_actnorm_invconv_backward_op.register_fake
def _(grad_y, grad_logdet, x, weight, bias, h, mode, y=None):
    gh = h.new_empty(h.shape) if mode else x.new_empty((0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape), gh


def _save_inputs(ctx, inputs, output):
    ctx.mode = 0 if len(inputs) == 3 else (1 if inputs[4] else 2)
    # mode 2 also keeps y (the next layer usually holds it anyway): the backward reads
    # z_b + shift = y_b / s from it instead of recomputing z_b
    ctx.save_for_backward(*inputs[:4] if ctx.mode else inputs[:3], *((output[0],) if ctx.mode == 2 else ()))


@op_backward
def _actnorm_invconv_bwd(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    if graph_wanted(grad_y, x, weight, bias):  # create_graph=True: see ops/_autograd.py
        return reference_vjp(ref.actnorm_invconv, (x, weight, bias), (grad_y,))
    gx, gw, gb, _ = _actnorm_invconv_backward(ctx, grad_y, x.new_zeros(x.shape[0]), x, weight, bias, None, 0)
    return gx, gw, gb


@op_backward
def _actnorm_invconv_coupling_bwd(ctx, grad_y, grad_logdet):
    x, weight, bias, h, *y = ctx.saved_tensors
    if graph_wanted(grad_y, grad_logdet, x, weight, bias, h):
        return reference_vjp(ref.actnorm_invconv_coupling, (x, weight, bias, h, ctx.mode == 1),
                             (grad_y, grad_logdet))
    if grad_y is None:
        grad_y = x.new_zeros((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))
    if grad_logdet is None:
        grad_logdet = x.new_zeros(x.shape[0])
    gx, gw, gb, gh = _actnorm_invconv_backward(ctx, grad_y, grad_logdet, x, weight, bias, h, ctx.mode,
                                               y[0] if y else None)
    return gx, gw, gb, gh, None


_actnorm_invconv.register_autograd(_actnorm_invconv_bwd, setup_context=_save_inputs)
_actnorm_invconv_coupling.register_autograd(_actnorm_invconv_coupling_bwd, setup_context=_save_inputs)


# ------------------------------------------------------------------ affine_coupling

def _coupling_impl(x: Tensor, h: Tensor, additive: bool, inverse: bool) -> tuple[Tensor, Tensor]:
    be = backend.select(x.device)
    if be == "cpp":
        return _cpp().affine_coupling_fwd(x, h, additive, inverse)
    if be == "triton":
        return _triton().affine_coupling_fwd(x, h, additive, inverse)
    fn = ref.affine_coupling_inverse if inverse else ref.affine_coupling
    return _contiguous(fn(x, h, additive))


@torch.library.custom_op("latentfast::affine_coupling", mutates_args=())
def _affine_coupling(x_b: Tensor, h: Tensor, additive: bool) -> tuple[Tensor, Tensor]:
    reject_tangents("affine_coupling", x_b, h, additive)
    return _coupling_impl(x_b, h, additive, False)


@torch.library.custom_op("latentfast::affine_coupling_inverse", mutates_args=())
def _affine_coupling_inverse(y_b: Tensor, h: Tensor, additive: bool) -> tuple[Tensor, Tensor]:
    reject_tangents("affine_coupling_inverse", y_b, h, additive)
    return _coupling_impl(y_b, h, additive, True)


def _affine_coupling_backward_impl(grad_y: Tensor, grad_logdet: Tensor, x_b: Tensor, h: Tensor,
                                   additive: bool, y_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
    # y_b: the forward's output. The C++ kernel reads x_b + shift = y_b / s from it (one
    # stream less); the reference and Triton use x_b and shift.
    reject_tangents("affine_coupling_backward", grad_y, grad_logdet, x_b, h, additive, y_b)
    be = backend.select(x_b.device)
    if be == "cpp":
        return _cpp().affine_coupling_bwd(grad_y, grad_logdet, x_b, h, additive, y_b)
    if be == "triton":
        return _triton().affine_coupling_bwd(grad_y, grad_logdet, x_b, h, additive)
    return _contiguous(ref.affine_coupling_backward(grad_y, grad_logdet, x_b, h, additive))


_affine_coupling_backward_op = torch.library.custom_op("latentfast::affine_coupling_backward", mutates_args=())(
    _affine_coupling_backward_impl)
_affine_coupling_backward = _backward_caller(_affine_coupling_backward_impl, _affine_coupling_backward_op)


@_affine_coupling.register_fake
def _(x_b, h, additive):
    return x_b.new_empty(x_b.shape), x_b.new_empty((x_b.shape[0],))


@_affine_coupling_inverse.register_fake
def _(y_b, h, additive):
    return y_b.new_empty(y_b.shape), y_b.new_empty((y_b.shape[0],))


@_affine_coupling_backward_op.register_fake
def _(grad_y, grad_logdet, x_b, h, additive, y_b=None):
    return x_b.new_empty(x_b.shape), h.new_empty(h.shape)


def _save_coupling(ctx, inputs, output):
    x, h, additive = inputs
    ctx.additive = additive
    ctx.save_for_backward(x, h, output[0])


def _grads_or_zeros(x: Tensor, grad_y: Tensor | None, grad_logdet: Tensor | None) -> tuple[Tensor, Tensor]:
    return (torch.zeros_like(x) if grad_y is None else grad_y,
            x.new_zeros(x.shape[0]) if grad_logdet is None else grad_logdet)


@op_backward
def _affine_coupling_bwd(ctx, grad_y, grad_logdet):
    x, h, y = ctx.saved_tensors
    if graph_wanted(grad_y, grad_logdet, x, h):
        return reference_vjp(ref.affine_coupling, (x, h, ctx.additive), (grad_y, grad_logdet))
    grad_y, grad_logdet = _grads_or_zeros(x, grad_y, grad_logdet)
    gx, gh = _affine_coupling_backward(ctx, grad_y, grad_logdet, x, h, ctx.additive, y)
    return gx, gh, None


@op_backward
def _affine_coupling_inverse_bwd(ctx, grad_x, grad_logdet):
    # x = y / s - shift, logdet = -sum log s (s = sigmoid(raw + 2)): written with torch ops,
    # the inverse is the sampling direction and rarely differentiated.
    y, h, _ = ctx.saved_tensors
    grad_x, grad_logdet = _grads_or_zeros(y, grad_x, grad_logdet)
    if ctx.additive:
        return grad_x, -grad_x, None
    shift, raw = h.chunk(2, dim=1)
    s = torch.sigmoid(raw + 2.0)
    graw = -(grad_x * y / s + grad_logdet[:, None, None, None]) * (1.0 - s)
    return grad_x / s, torch.cat([-grad_x, graw], dim=1), None


_affine_coupling.register_autograd(_affine_coupling_bwd, setup_context=_save_coupling)
_affine_coupling_inverse.register_autograd(_affine_coupling_inverse_bwd, setup_context=_save_coupling)


# ------------------------------------------------------------------ lu_weight

def _lu_weight_impl(perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_abs_s: Tensor
                    ) -> tuple[Tensor, Tensor]:
    reject_tangents("lu_weight", perm, lower, upper, sign_s, log_abs_s)
    be = backend.select(perm.device)
    if be == "cpp":
        return _cpp().lu_weight(perm, lower, upper, sign_s, log_abs_s)
    if be == "triton":
        return _triton().lu_weight(perm, lower, upper, sign_s, log_abs_s)
    return _contiguous(ref.lu_weight(perm, lower, upper, sign_s, log_abs_s))


_lu_weight = torch.library.custom_op("latentfast::lu_weight", mutates_args=())(_lu_weight_impl)


@_lu_weight.register_fake
def _(perm, lower, upper, sign_s, log_abs_s):
    return perm.new_empty(perm.shape), perm.new_empty(perm.shape)


def _save_lu(ctx, inputs, output):
    perm, lower, upper, sign_s, log_abs_s = inputs
    ctx.save_for_backward(perm, lower, sign_s, log_abs_s, upper, output[1])


def _lu_weight_backward_impl(perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_abs_s: Tensor,
                             w_inv: Tensor, grad_w: Tensor | None, grad_w_inv: Tensor | None
                             ) -> tuple[Tensor, Tensor, Tensor]:
    # the C++ backend: one kernel call (csrc/flows/lu_weight_cpu.cpp) in place of the dozen ops
    # of the reference formula; Triton and the reference: the formula (GEMM-bound on a GPU)
    reject_tangents("lu_weight_backward", perm, lower, upper, sign_s, log_abs_s, w_inv, grad_w, grad_w_inv)
    if backend.select(perm.device) == "cpp":
        return _cpp().lu_weight_bwd(perm, lower, upper, sign_s, log_abs_s, w_inv, grad_w, grad_w_inv)
    return _contiguous(ref.lu_weight_backward(perm, lower, upper, sign_s, log_abs_s, w_inv, grad_w, grad_w_inv))


_lu_weight_backward_op = torch.library.custom_op("latentfast::lu_weight_backward", mutates_args=())(
    _lu_weight_backward_impl)
_lu_weight_backward = _backward_caller(_lu_weight_backward_impl, _lu_weight_backward_op)


@_lu_weight_backward_op.register_fake
def _(perm, lower, upper, sign_s, log_abs_s, w_inv, grad_w=None, grad_w_inv=None):
    return lower.new_empty(lower.shape), upper.new_empty(upper.shape), log_abs_s.new_empty(log_abs_s.shape)


@op_backward
def _lu_weight_bwd(ctx, grad_w, grad_w_inv):
    perm, lower, sign_s, log_abs_s, upper, w_inv = ctx.saved_tensors
    args = (perm, lower, upper, sign_s, log_abs_s, w_inv, grad_w, grad_w_inv)
    if graph_wanted(*args):  # create_graph=True: the PyTorch formula carries the graph
        g_low, g_up, g_log = ref.lu_weight_backward(*args)
    else:
        g_low, g_up, g_log = _lu_weight_backward(ctx, *args)
    return None, g_low, g_up, None, g_log


_lu_weight.register_autograd(_lu_weight_bwd, setup_context=_save_lu)


# ------------------------------------------------------------------ eager fast path

class _Eager(torch.autograd.Function):
    """An op's implementation with the same setup_context and backward as its custom op,
    without the custom op's Python dispatch (about 35 us per call without autograd and 95 us
    with it on a 2-core CPU, against a 25 us kernel at the Glow model's sizes). The public
    functions use it in eager mode; torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        impl, setup, _ = spec
        out = impl(*inputs)
        setup(ctx, inputs, out)
        ctx.spec, ctx.eager = spec, True
        return out

    @staticmethod
    def backward(ctx, *grads):
        # (each spec's backward carries op_backward itself: autocast off, batched gradients)
        return (None, *ctx.spec[2](ctx, *grads))


def _wants_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _call(op, spec, *inputs):
    """The custom op when compiling; the reference under forward-mode AD or a torch.func
    transform (ops/_autograd.py); otherwise its implementation, through _Eager when an input
    needs a gradient."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    if under_transform(inputs):
        return _REFERENCE[op](*inputs)
    if _wants_grad(inputs):
        return _Eager.apply(spec, *inputs)
    return spec[0](*inputs)


_SPEC_MAP = (lambda x, w, b: _fwd_impl(x, w, b, None, 0)[0], _save_inputs, _actnorm_invconv_bwd)
_SPEC_MAP_COUPLING = (lambda x, w, b, h, additive: _fwd_impl(x, w, b, h, 1 if additive else 2), _save_inputs,
                      _actnorm_invconv_coupling_bwd)
_SPEC_COUPLING = (lambda x, h, additive: _coupling_impl(x, h, additive, False), _save_coupling,
                  _affine_coupling_bwd)
_SPEC_COUPLING_INV = (lambda y, h, additive: _coupling_impl(y, h, additive, True), _save_coupling,
                      _affine_coupling_inverse_bwd)
_SPEC_LU = (_lu_weight_impl, _save_lu, _lu_weight_bwd)
_REFERENCE = {_actnorm_invconv: ref.actnorm_invconv, _actnorm_invconv_coupling: ref.actnorm_invconv_coupling,
              _affine_coupling: ref.affine_coupling, _affine_coupling_inverse: ref.affine_coupling_inverse,
              _lu_weight: ref.lu_weight}


# ------------------------------------------------------------------ public functional API

def _check_pixels(name: str, t: Tensor, x: Tensor, channels: int) -> None:
    check_tensor(name, t, 4, like=x)
    want = (x.shape[0], channels, x.shape[2], x.shape[3])
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_map(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 2, like=x)
    check_tensor("bias", bias, 1, like=x)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [Co, {x.shape[1]}] for x with {x.shape[1]} channels, "
                         f"got {tuple(weight.shape)}")
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


@float32_under_autocast
def actnorm_invconv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-pixel affine map y[n, :, i, j] = weight @ x[n, :, i, j] + bias.

    With weight = W diag(exp(logs)) and bias = W (exp(logs) * b) this is ActNorm followed by
    the invertible 1x1 conv W (see latentfast.reference.flows.fold_actnorm_into_conv).

    Args: x [N, Ci, H, W]; weight [Co, Ci]; bias [Co]. Returns y [N, Co, H, W].

    Example:
        >>> y = actnorm_invconv(torch.randn(2, 4, 3, 3), torch.eye(4), torch.zeros(4))
    """
    _check_map(x, weight, bias)
    return _call(_actnorm_invconv, _SPEC_MAP, x, weight, bias)


@float32_under_autocast
def actnorm_invconv_coupling(x: Tensor, weight: Tensor, bias: Tensor, h: Tensor,
                             additive: bool = False) -> tuple[Tensor, Tensor]:
    """actnorm_invconv, then the coupling of the second channel half given h, in one pass.

    z = weight x + bias; y = cat(z_a, (z_b + shift) * sigmoid(raw + 2)) with
    h = cat(shift, raw) [N, Co, H, W] (affine), or y = cat(z_a, z_b + h) with h [N, Co/2, H, W]
    (additive). Returns (y [N, Co, H, W], logdet of the coupling [N]).
    """
    _check_map(x, weight, bias)
    co = weight.shape[0]
    if co % 2:
        raise ValueError(f"a coupling needs an even number of channels, got {co}")
    _check_pixels("h", h, x, co // 2 if additive else co)
    return _call(_actnorm_invconv_coupling, _SPEC_MAP_COUPLING, x, weight, bias, h, bool(additive))


def _check_coupling(x_b: Tensor, h: Tensor, additive: bool) -> None:
    check_tensor("x_b", x_b, 4)
    _check_pixels("h", h, x_b, x_b.shape[1] if additive else 2 * x_b.shape[1])


@float32_under_autocast
def affine_coupling(x_b: Tensor, h: Tensor, additive: bool = False) -> tuple[Tensor, Tensor]:
    """Glow's affine coupling y_b = (x_b + shift) * sigmoid(raw + 2), h = cat(shift, raw),
    or NICE's additive y_b = x_b + h. Returns (y_b [N, Cb, H, W], logdet [N])."""
    _check_coupling(x_b, h, additive)
    return _call(_affine_coupling, _SPEC_COUPLING, x_b, h, bool(additive))


@float32_under_autocast
def affine_coupling_inverse(y_b: Tensor, h: Tensor, additive: bool = False) -> tuple[Tensor, Tensor]:
    """Inverse of affine_coupling: (x_b, logdet of the inverse = -forward logdet)."""
    _check_coupling(y_b, h, additive)
    return _call(_affine_coupling_inverse, _SPEC_COUPLING_INV, y_b, h, bool(additive))


@float32_under_autocast
def lu_weight(perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_abs_s: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    """W = P L (U + diag(sign_s * exp(log_abs_s))), its inverse, and log|det W|.

    Args: perm [C, C] permutation matrix; lower, upper [C, C] (only the strict lower /
    upper parts are used; L has a unit diagonal); sign_s [C] of -1 and 1, log_abs_s [C].
    Returns (W [C, C], W^-1 [C, C], log|det W| = sum(log_abs_s) []).
    ValueError if perm is not a permutation matrix or sign_s not all +-1 (checked where
    values can be read back, once per tensor version: see _checks.check_lu_constants; the
    registered op torch.ops.latentfast.lu_weight -> (W, W^-1) does not check).
    """
    check_tensor("perm", perm, 2)
    c = perm.shape[0]
    if perm.shape != (c, c):
        raise ValueError(f"perm must be square, got {tuple(perm.shape)}")
    for name, t, shape in (("lower", lower, (c, c)), ("upper", upper, (c, c)),
                           ("sign_s", sign_s, (c,)), ("log_abs_s", log_abs_s, (c,))):
        check_tensor(name, t, len(shape), like=perm)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    check_lu_constants(perm, sign_s)
    w, w_inv = _call(_lu_weight, _SPEC_LU, perm, lower, upper, sign_s, log_abs_s)
    return w, w_inv, log_abs_s.sum()


# Direct calls (torch.ops.latentfast.*) under forward-mode AD / torch.func: ops/_autograd.py.
route_transforms(_actnorm_invconv, _actnorm_invconv_coupling, _actnorm_invconv_backward_op, _affine_coupling,
                 _affine_coupling_inverse, _affine_coupling_backward_op, _lu_weight, _lu_weight_backward_op)
