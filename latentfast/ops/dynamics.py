"""Lyapunov-spectrum ops: registration, backend dispatch, fake kernels.

Ops (namespace ``latentfast::``), no autograd (they are measurements, not layers):
- ``rnn_lyapunov(s0, q0, mat, bias, cell, n_steps, qr_every, transient, dt)`` ->
  (exponents [B, k], final state [B, S]): Benettin's method on the closed-loop map of a tanh
  RNN, GRU or LSTM cell (cell 0, 1, 2) with the readout folded into (mat, bias) by
  reference.dynamics.rnn_tangent_matrices. The k tangents ride with the state as extra GEMM
  rows; the [S, S] Jacobian is never formed.
- ``lorenz_lyapunov(x0, q0, system, p0, p1, p2, dt, n_steps, qr_every, transient)`` ->
  (exponents per unit time [B, k], final state [B, N]) for Lorenz-63 (system 0; p = sigma,
  rho, beta) and Lorenz-96 (system 1; p0 = forcing): RK4 of the state and its exact
  tangent map.

Public wrappers: rnn_lyapunov_spectrum, lorenz_lyapunov_spectrum.
"""
from __future__ import annotations

import torch
from torch import Tensor

from latentfast import _ext  # noqa: F401  (loads latentfast_cpp kernels when built)
from latentfast import backend
from latentfast.data._cpu import draw_device
from latentfast.ops._amp import float32_under_autocast
from latentfast.ops._autograd import reject_tangents, route_transforms, under_transform
from latentfast.ops._checks import check_finite, check_tensor
from latentfast.reference import dynamics as ref


def _triton():
    return backend.triton_kernels("dynamics")


@torch.library.custom_op("latentfast::rnn_lyapunov", mutates_args=())
def _rnn_lyapunov(s0: Tensor, q0: Tensor, mat: Tensor, bias: Tensor, cell: int, n_steps: int, qr_every: int,
                  transient: int, dt: float) -> tuple[Tensor, Tensor]:
    reject_tangents("rnn_lyapunov", s0, q0, mat, bias, cell, n_steps, qr_every, transient, dt)
    be = backend.select(s0.device)
    args = (s0, q0, mat, bias, cell, n_steps, qr_every, transient, dt)
    if be == "cpp":
        return torch.ops.latentfast_cpp.rnn_lyapunov(*args)
    if be == "triton":
        return _triton().rnn_lyapunov(*args)
    e, s = ref.rnn_lyapunov(*args)
    return e.contiguous(), s.contiguous()


@_rnn_lyapunov.register_fake
def _(s0, q0, mat, bias, cell, n_steps, qr_every, transient, dt):
    return s0.new_empty((s0.shape[0], q0.shape[2])), s0.new_empty(s0.shape)


@torch.library.custom_op("latentfast::lorenz_lyapunov", mutates_args=())
def _lorenz_lyapunov(x0: Tensor, q0: Tensor, system: int, p0: float, p1: float, p2: float, dt: float,
                     n_steps: int, qr_every: int, transient: int) -> tuple[Tensor, Tensor]:
    reject_tangents("lorenz_lyapunov", x0, q0, system, p0, p1, p2, dt, n_steps, qr_every, transient)
    be = backend.select(x0.device)
    args = (x0, q0, system, p0, p1, p2, dt, n_steps, qr_every, transient)
    if be == "cpp":
        return torch.ops.latentfast_cpp.lorenz_lyapunov(*args)
    if be == "triton":
        return _triton().lorenz_lyapunov(*args)
    e, s = ref.lorenz_lyapunov(*args)
    return e.contiguous(), s.contiguous()


@_lorenz_lyapunov.register_fake
def _(x0, q0, system, p0, p1, p2, dt, n_steps, qr_every, transient):
    return x0.new_empty((x0.shape[0], q0.shape[2])), x0.new_empty(x0.shape)


def _no_transform(name: str, *tensors) -> None:
    # the spectra run under no_grad, but forward-mode AD and torch.func transforms would
    # still see the inputs (and get no tangent or batching from the kernels): refuse them
    if under_transform(tensors):
        raise ValueError(f"{name} is not differentiable and batches its initial states itself: forward-mode AD "
                         "and torch.func transforms (vmap, jvp, grad, ...) are not supported")


def _check_run(k: int, n: int, n_steps: int, qr_every: int, transient: int, dt: float) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n_steps < 1 or qr_every < 1 or transient < 0:
        raise ValueError(f"need n_steps >= 1, qr_every >= 1, transient >= 0; got {n_steps}, {qr_every}, {transient}")
    if not dt > 0:
        raise ValueError(f"dt must be positive, got {dt}")


def _frame(q0: Tensor | None, b: int, n: int, k: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    if q0 is None:
        q0 = torch.randn(b, n, k, dtype=like.dtype, generator=generator, device=draw_device(generator))
        return q0.to(like.device)
    check_tensor("q0", q0, 3, like=like)
    if tuple(q0.shape) != (b, n, k):
        raise ValueError(f"q0 must be [{b}, {n}, {k}], got {tuple(q0.shape)}")
    return q0.contiguous()


@float32_under_autocast
@torch.no_grad()
def rnn_lyapunov_spectrum(cell: str, s0: Tensor, k: int, n_steps: int, weight_ih: Tensor, weight_hh: Tensor,
                          bias_ih: Tensor, bias_hh: Tensor, readout_weight: Tensor | None = None,
                          readout_bias: Tensor | None = None, dt: float = 1.0, qr_every: int = 1,
                          transient: int = 0, q0: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The k leading Lyapunov exponents of the closed-loop RNN map, for many initial states.

    The map is s' = Cell(x, s) with x = readout_weight h + readout_bias (zero input when
    readout_weight is None); weights follow torch.nn.RNNCell / GRUCell / LSTMCell.
    cell: "rnn_tanh", "gru" or "lstm". s0 [B, S]: S = H, or 2H for the LSTM (h then c).
    Returns (exponents [B, k] per unit time with dt, final state [B, S]). Not differentiable.
    """
    _no_transform("rnn_lyapunov_spectrum", s0, weight_ih, weight_hh, bias_ih, bias_hh, readout_weight,
                  readout_bias, q0)
    if cell not in ref.RNN_CELLS:
        raise ValueError(f"cell must be one of {sorted(ref.RNN_CELLS)}, got {cell!r}")
    check_tensor("s0", s0, 2)
    check_tensor("weight_hh", weight_hh, 2, like=s0)
    hs = weight_hh.shape[1]
    gates = {"rnn_tanh": 1, "gru": 3, "lstm": 4}[cell]
    state = 2 * hs if cell == "lstm" else hs
    if weight_hh.shape[0] != gates * hs:
        raise ValueError(f"{cell}: weight_hh must be [{gates}H, H], got {tuple(weight_hh.shape)}")
    if s0.shape[1] != state:
        raise ValueError(f"{cell}: s0 must be [B, {state}], got {tuple(s0.shape)}")
    check_tensor("weight_ih", weight_ih, 2, like=s0)
    if weight_ih.shape[0] != gates * hs:
        raise ValueError(f"{cell}: weight_ih must be [{gates * hs}, I], got {tuple(weight_ih.shape)}")
    for name, t in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        check_tensor(name, t, 1, like=s0)
        if t.shape[0] != gates * hs:
            raise ValueError(f"{cell}: {name} must be [{gates * hs}], got {tuple(t.shape)}")
    if readout_weight is not None:
        check_tensor("readout_weight", readout_weight, 2, like=s0)
        if tuple(readout_weight.shape) != (weight_ih.shape[1], hs):
            raise ValueError(f"readout_weight must be [{weight_ih.shape[1]}, {hs}], got "
                             f"{tuple(readout_weight.shape)}")
    _check_run(k, state, n_steps, qr_every, transient, dt)
    check_finite("s0", s0)
    q0 = _frame(q0, s0.shape[0], state, k, s0, generator)
    mat, bias = ref.rnn_tangent_matrices(cell, weight_ih, weight_hh, bias_ih, bias_hh, readout_weight,
                                         readout_bias)
    return _rnn_lyapunov(s0.contiguous(), q0, mat.contiguous(), bias.contiguous(), ref.RNN_CELLS[cell],
                         n_steps, qr_every, transient, float(dt))


@float32_under_autocast
@torch.no_grad()
def lorenz_lyapunov_spectrum(system: str, x0: Tensor, k: int, n_steps: int, dt: float = 0.01,
                             qr_every: int = 1, transient: int = 0, sigma: float = 10.0, rho: float = 28.0,
                             beta: float = 8.0 / 3.0, forcing: float = 8.0, q0: Tensor | None = None,
                             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The k leading Lyapunov exponents (per unit time) of Lorenz-63 or Lorenz-96 from the
    exact RK4 tangent map, for many initial conditions x0 [B, N] at once.

    system: "lorenz63" (N = 3; sigma, rho, beta) or "lorenz96" (N >= 4; forcing).
    Returns (exponents [B, k], final state [B, N]). Not differentiable.
    """
    _no_transform("lorenz_lyapunov_spectrum", x0, q0)
    if system not in ref.LORENZ_SYSTEMS:
        raise ValueError(f"system must be one of {sorted(ref.LORENZ_SYSTEMS)}, got {system!r}")
    check_tensor("x0", x0, 2)
    n = x0.shape[1]
    if system == "lorenz63" and n != 3:
        raise ValueError(f"lorenz63 states are [B, 3], got {tuple(x0.shape)}")
    if system == "lorenz96" and n < 4:
        raise ValueError(f"lorenz96 needs N >= 4, got {tuple(x0.shape)}")
    _check_run(k, n, n_steps, qr_every, transient, dt)
    check_finite("x0", x0)
    q0 = _frame(q0, x0.shape[0], n, k, x0, generator)
    p = (sigma, rho, beta) if system == "lorenz63" else (forcing, 0.0, 0.0)
    return _lorenz_lyapunov(x0.contiguous(), q0, ref.LORENZ_SYSTEMS[system], float(p[0]), float(p[1]),
                            float(p[2]), float(dt), n_steps, qr_every, transient)


# Direct calls (torch.ops.latentfast.*) under forward-mode AD / torch.func: ops/_autograd.py.
route_transforms(_rnn_lyapunov, _lorenz_lyapunov, reference=False)
