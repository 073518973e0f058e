"""Recurrent sequence ops: registration, backend dispatch, autograd, fake kernels.

Ops (namespace ``latentfast::``), single-layer GRU and LSTM with torch.nn conventions:
- ``gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)`` -> out [T, B, H];
- ``gru_sequence_train(...)`` -> (out, gates [T, B, 4H]): the same, keeping the gates for
  the backward (what the public wrapper calls when gradients are needed);
- ``gru_sequence_backward(grad_out, x, h0, weight_ih, weight_hh, out, gates)`` -> grads of
  (x, h0, weight_ih, weight_hh, bias_ih, bias_hh);
- ``lstm_sequence(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)`` -> (out, cells), both
  [T, B, H]; ``lstm_sequence_train`` also returns the gates [T, B, 4H];
  ``lstm_sequence_backward(grad_out, grad_cells, x, h0, c0, weight_ih, weight_hh, out,
  cells, gates)`` -> grads of (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh).
"""
from __future__ import annotations

import torch
from torch import Tensor

from latentfast import backend
from latentfast import _ext  # noqa: F401  (loads latentfast_cpp kernels when built)
from latentfast.ops._amp import float32_under_autocast
from latentfast.ops._autograd import (graph_wanted, op_backward, reference_vjp, reject_tangents, route_transforms,
                                      under_transform)
from latentfast.ops._checks import check_finite_together, check_tensor
from latentfast.reference import rnn as ref


def _triton():
    return backend.triton_kernels("rnn")


def _fwd(x, h0, w_ih, w_hh, b_ih, b_hh, save: bool) -> tuple[Tensor, Tensor]:
    be = backend.select(x.device)
    if be == "cpp":
        return torch.ops.latentfast_cpp.gru_sequence_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, save)
    if be == "triton":
        return _triton().gru_sequence_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, save)
    out, gates = ref.gru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh)
    return out.contiguous(), (gates.contiguous() if save else x.new_empty(0))


@torch.library.custom_op("latentfast::gru_sequence", mutates_args=())
def _gru_sequence(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                  bias_hh: Tensor) -> Tensor:
    reject_tangents("gru_sequence", x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    return _fwd(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, False)[0]


@torch.library.custom_op("latentfast::gru_sequence_train", mutates_args=())
def _gru_sequence_train(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                        bias_hh: Tensor) -> tuple[Tensor, Tensor]:
    reject_tangents("gru_sequence_train", x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    return _fwd(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, True)


@torch.library.custom_op("latentfast::gru_sequence_backward", mutates_args=())
def _gru_sequence_backward(grad_out: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                           out: Tensor, gates: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    reject_tangents("gru_sequence_backward", grad_out, x, h0, weight_ih, weight_hh, out, gates)
    be = backend.select(x.device)
    if be == "cpp":
        return torch.ops.latentfast_cpp.gru_sequence_bwd(grad_out, x, h0, weight_ih, weight_hh, out, gates)
    if be == "triton":
        return _triton().gru_sequence_bwd(grad_out, x, h0, weight_ih, weight_hh, out, gates)
    return tuple(t.contiguous() for t in ref.gru_sequence_backward(grad_out, x, h0, weight_ih, weight_hh,
                                                                   out, gates))


@_gru_sequence.register_fake
def _(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    return x.new_empty((x.shape[0], x.shape[1], h0.shape[1]))


@_gru_sequence_train.register_fake
def _(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    return (x.new_empty((x.shape[0], x.shape[1], h0.shape[1])),
            x.new_empty((x.shape[0], x.shape[1], 4 * h0.shape[1])))


@_gru_sequence_backward.register_fake
def _(grad_out, x, h0, weight_ih, weight_hh, out, gates):
    return (x.new_empty(x.shape), h0.new_empty(h0.shape), weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), weight_ih.new_empty(weight_ih.shape[0]),
            weight_hh.new_empty(weight_hh.shape[0]))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@op_backward
def _gru_sequence_bwd(ctx, grad_out):
    # Inference op under autograd (direct torch.ops call): recompute with the gates kept.
    saved = ctx.saved_tensors
    if graph_wanted(grad_out, saved):  # create_graph=True: see ops/_autograd.py
        return reference_vjp(ref.gru_sequence, saved, (grad_out,))
    x, h0, w_ih, w_hh, b_ih, b_hh = saved
    out, gates = _fwd(x, h0, w_ih, w_hh, b_ih, b_hh, True)
    return _gru_sequence_backward(grad_out, x, h0, w_ih, w_hh, out, gates)


def _save_train(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output[0], output[1])  # the biases for a double backward only


@op_backward
def _gru_sequence_train_bwd(ctx, grad_out, _grad_gates):
    x, h0, w_ih, w_hh, b_ih, b_hh, out, gates = ctx.saved_tensors
    if graph_wanted(grad_out, x, h0, w_ih, w_hh, b_ih, b_hh):
        return reference_vjp(ref.gru_sequence, (x, h0, w_ih, w_hh, b_ih, b_hh), (grad_out,))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return _gru_sequence_backward(grad_out, x, h0, w_ih, w_hh, out, gates)


_gru_sequence.register_autograd(_gru_sequence_bwd, setup_context=_save_inputs)
_gru_sequence_train.register_autograd(_gru_sequence_train_bwd, setup_context=_save_train)


def _check_rnn(name: str, n_gates: int, x: Tensor, states: tuple, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor, bias_hh: Tensor, batch_first: bool) -> tuple[Tensor, tuple, int]:
    """Validate a single-layer RNN call; returns (x as [T, B, I], states with zeros filled
    in, H)."""
    check_tensor("x", x, 3)
    if batch_first:
        x = x.transpose(0, 1)
    if x.shape[0] == 0:  # as nn.GRU / nn.LSTM, which also refuse an empty sequence
        raise ValueError(f"{name}: x must have at least one time step, got shape "
                         f"{tuple(x.transpose(0, 1).shape if batch_first else x.shape)}"
                         f"{' (batch_first)' if batch_first else ''}")
    check_tensor("weight_hh", weight_hh, 2, like=x)
    hs = weight_hh.shape[1]
    g = n_gates * hs
    if weight_hh.shape[0] != g:
        raise ValueError(f"{name}: weight_hh must be [{n_gates}H, H], got {tuple(weight_hh.shape)}")
    check_tensor("weight_ih", weight_ih, 2, like=x)
    if weight_ih.shape[0] == g and weight_ih.shape[1] != x.shape[2]:
        raise ValueError(f"{name}: x has {x.shape[2]} input features but weight_ih {tuple(weight_ih.shape)} takes "
                         f"{weight_ih.shape[1]}")
    if tuple(weight_ih.shape) != (g, x.shape[2]):
        raise ValueError(f"{name}: weight_ih must be [{g}, {x.shape[2]}], got {tuple(weight_ih.shape)}")
    for bname, bias in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        check_tensor(bname, bias, 1, like=x)
        if bias.shape[0] != g:
            raise ValueError(f"{name}: {bname} must be [{g}], got {tuple(bias.shape)}")
    filled, given = [], [("x", x)]
    for sname, st in zip(("h0", "c0"), states):
        if st is None:
            st = x.new_zeros((x.shape[1], hs))
        else:
            given.append((sname, st))
        check_tensor(sname, st, 2, like=x)
        if tuple(st.shape) != (x.shape[1], hs):
            raise ValueError(f"{name}: {sname} must be [{x.shape[1]}, {hs}], got {tuple(st.shape)}")
        filled.append(st.contiguous())
    check_finite_together(given)  # (the initial states too: a NaN h0 had run through)
    return x, tuple(filled), hs


@float32_under_autocast
def gru_sequence(x: Tensor, h0: Tensor | None, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                 bias_hh: Tensor, batch_first: bool = False) -> tuple[Tensor, Tensor]:
    """A single-layer GRU over a whole sequence (torch.nn.GRU math and weight layout).

    Args: x [T, B, I] ([B, T, I] with batch_first); h0 [B, H] or None (zeros);
    weight_ih [3H, I], weight_hh [3H, H], bias_ih, bias_hh [3H] (gate order r, z, n).
    Returns (out [T, B, H] or [B, T, H], h_n [B, H]).
    """
    x, h0, _ = _check_rnn("gru_sequence", 3, x, (h0,), weight_ih, weight_hh, bias_ih, bias_hh, batch_first)
    h0 = h0[0]
    args = (x.contiguous(), h0, weight_ih, weight_hh, bias_ih, bias_hh)
    if under_transform(args):  # forward-mode AD or torch.func: the reference (ops/_autograd.py)
        out = ref.gru_sequence(*args)[0]
    elif torch.is_grad_enabled() and any(t.requires_grad for t in args):
        out = _gru_sequence_train(*args)[0]
    else:
        out = _gru_sequence(*args)
    h_n = out[-1] if out.shape[0] else h0
    return (out.transpose(0, 1) if batch_first else out), h_n


# ---------------------------------------------------------------------------------- LSTM
def _lstm_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    be = backend.select(x.device)
    if be == "cpp":
        return torch.ops.latentfast_cpp.lstm_sequence_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, save)
    if be == "triton":
        return _triton().lstm_sequence_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, save)
    out, cells, gates = ref.lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return out.contiguous(), cells.contiguous(), (gates.contiguous() if save else x.new_empty(0))


@torch.library.custom_op("latentfast::lstm_sequence", mutates_args=())
def _lstm_sequence(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                   bias_hh: Tensor) -> tuple[Tensor, Tensor]:
    reject_tangents("lstm_sequence", x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    out, cells, _ = _lstm_fwd(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, False)
    return out, cells


@torch.library.custom_op("latentfast::lstm_sequence_train", mutates_args=())
def _lstm_sequence_train(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                         bias_ih: Tensor, bias_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    reject_tangents("lstm_sequence_train", x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    return _lstm_fwd(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, True)


@torch.library.custom_op("latentfast::lstm_sequence_backward", mutates_args=())
def _lstm_sequence_backward(grad_out: Tensor, grad_cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                            weight_ih: Tensor, weight_hh: Tensor, out: Tensor, cells: Tensor, gates: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    reject_tangents("lstm_sequence_backward", grad_out, grad_cells, x, h0, c0, weight_ih, weight_hh, out, cells, gates)
    be = backend.select(x.device)
    args = (grad_out, grad_cells, x, h0, c0, weight_ih, weight_hh, out, cells, gates)
    if be == "cpp":
        return torch.ops.latentfast_cpp.lstm_sequence_bwd(*args)
    if be == "triton":
        return _triton().lstm_sequence_bwd(*args)
    return tuple(t.contiguous() for t in ref.lstm_sequence_backward(*args))


@_lstm_sequence.register_fake
def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
    shape = (x.shape[0], x.shape[1], h0.shape[1])
    return x.new_empty(shape), x.new_empty(shape)


@_lstm_sequence_train.register_fake
def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
    shape = (x.shape[0], x.shape[1], h0.shape[1])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty((x.shape[0], x.shape[1], 4 * h0.shape[1]))


@_lstm_sequence_backward.register_fake
def _(grad_out, grad_cells, x, h0, c0, weight_ih, weight_hh, out, cells, gates):
    return (x.new_empty(x.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape), weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), weight_ih.new_empty(weight_ih.shape[0]),
            weight_hh.new_empty(weight_hh.shape[0]))


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


@op_backward
def _lstm_sequence_bwd(ctx, grad_out, grad_cells):
    # Inference op under autograd (direct torch.ops call): recompute with the gates kept.
    saved = ctx.saved_tensors
    if graph_wanted(grad_out, grad_cells, saved):  # create_graph=True: see ops/_autograd.py
        return reference_vjp(ref.lstm_sequence, saved, (grad_out, grad_cells))
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = saved
    out, cells, gates = _lstm_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, True)
    return _lstm_sequence_backward(_zeros_if_none(grad_out, out), _zeros_if_none(grad_cells, cells), x, h0, c0,
                                   w_ih, w_hh, out, cells, gates)


def _save_lstm_inputs(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _save_lstm_train(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, *output)  # the biases for a double backward only


@op_backward
def _lstm_sequence_train_bwd(ctx, grad_out, grad_cells, _grad_gates):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, cells, gates = ctx.saved_tensors
    if graph_wanted(grad_out, grad_cells, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return reference_vjp(ref.lstm_sequence, (x, h0, c0, w_ih, w_hh, b_ih, b_hh), (grad_out, grad_cells))
    return _lstm_sequence_backward(_zeros_if_none(grad_out, out), _zeros_if_none(grad_cells, cells), x, h0, c0,
                                   w_ih, w_hh, out, cells, gates)


_lstm_sequence.register_autograd(_lstm_sequence_bwd, setup_context=_save_lstm_inputs)
_lstm_sequence_train.register_autograd(_lstm_sequence_train_bwd, setup_context=_save_lstm_train)


@float32_under_autocast
def lstm_sequence(x: Tensor, hx: tuple[Tensor, Tensor] | None, weight_ih: Tensor, weight_hh: Tensor,
                  bias_ih: Tensor, bias_hh: Tensor, batch_first: bool = False, return_cells: bool = False
                  ) -> tuple[Tensor, tuple[Tensor, Tensor]] | tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """A single-layer LSTM over a whole sequence (torch.nn.LSTM math and weight layout).

    Args: x [T, B, I] ([B, T, I] with batch_first); hx = (h0, c0), each [B, H], or None
    (zeros); weight_ih [4H, I], weight_hh [4H, H], bias_ih, bias_hh [4H] (gates i, f, g, o).
    Returns (out [T, B, H] or [B, T, H], (h_n, c_n) each [B, H]), and with return_cells the
    cell states of every step [T, B, H] (time first) as a third item.
    """
    if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        raise ValueError("lstm_sequence: hx must be a pair (h0, c0) or None")
    h0, c0 = (None, None) if hx is None else hx
    x, (h0, c0), _ = _check_rnn("lstm_sequence", 4, x, (h0, c0), weight_ih, weight_hh, bias_ih, bias_hh,
                                batch_first)
    args = (x.contiguous(), h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    if under_transform(args):  # forward-mode AD or torch.func: the reference (ops/_autograd.py)
        out, cells, _ = ref.lstm_sequence(*args)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in args):
        out, cells, _ = _lstm_sequence_train(*args)
    else:
        out, cells = _lstm_sequence(*args)
    h_n, c_n = (out[-1], cells[-1]) if out.shape[0] else (h0, c0)
    res = (out.transpose(0, 1) if batch_first else out), (h_n, c_n)
    return (*res, cells) if return_cells else res


# Direct calls (torch.ops.latentfast.*) under forward-mode AD / torch.func: ops/_autograd.py.
route_transforms(_gru_sequence, _gru_sequence_train, _gru_sequence_backward, _lstm_sequence, _lstm_sequence_train,
                 _lstm_sequence_backward)
