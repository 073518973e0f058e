"""GRU sequence models for dynamical systems, on the fused gru_sequence op.

- GRU: a drop-in single-layer torch.nn.GRU (same parameter names, so state_dicts load
  both ways) whose forward runs latentfast::gru_sequence.
- SequenceModel: GRU + linear readout for next-step prediction (teacher forcing while
  training), closed-loop forecasting, and the Lyapunov spectrum of the learned closed-loop
  map h_{t+1} = GRUCell(readout(h_t), h_t) from its analytic Jacobian.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentfast.ops.rnn import gru_sequence
from latentfast.reference.dynamics import gru_step, lyapunov_spectrum


class GRU(nn.Module):
    """Single-layer GRU with torch.nn.GRU's parameters and call signature.

    forward(x [T, B, I] or [B, T, I] with batch_first, h0 [1, B, H] or None)
    -> (out, h_n [1, B, H]).
    """

    def __init__(self, input_size: int, hidden_size: int, batch_first: bool = False):
        super().__init__()
        self.input_size, self.hidden_size, self.batch_first = input_size, hidden_size, batch_first
        self.weight_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size))
        k = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if h0 is not None:
            if h0.dim() != 3 or h0.shape[0] != 1:
                raise ValueError(f"h0 must be [1, B, H], got shape {tuple(h0.shape)}")
            h0 = h0[0]
        out, h_n = gru_sequence(x, h0, *self.params(), batch_first=self.batch_first)
        return out, h_n[None]


class SequenceModel(nn.Module):
    """x_{t+1} ~ readout(h_{t+1}), h_{t+1} = GRU(x_t, h_t), on states x [B, T, D]."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.gru = GRU(dim, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, dim)
        self.dim, self.hidden = dim, hidden

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced one-step predictions [B, T, D] of x[:, 1:], and the last state."""
        out, h_n = self.gru(x, h0)
        return self.readout(out), h_n

    @torch.no_grad()
    def forecast(self, context: Tensor, n_steps: int) -> tuple[Tensor, Tensor]:
        """Warm up on context [B, T0, D], then run closed loop (each prediction is the next
        input) for n_steps. Returns (forecast [B, n_steps, D], hidden states [B, n_steps, H])."""
        pred, h = self(context)
        x, h = pred[:, -1], h[0]
        xs, hs = [], []
        w_ih, w_hh, b_ih, b_hh = self.gru.params()
        for _ in range(n_steps):
            xs.append(x)
            hs.append(h)
            h = torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
            x = self.readout(h)
        return torch.stack(xs, 1), torch.stack(hs, 1)

    @torch.no_grad()
    def closed_loop_step(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h_{t+1} = GRUCell(readout(h_t), h_t) and its Jacobian [B, H, H]."""
        return gru_step(self.readout(h), h, *self.gru.params(), dx_dh=self.readout.weight)

    @torch.no_grad()
    def lyapunov_spectrum(self, h0: Tensor, k: int, n_steps: int, dt: float = 1.0, qr_every: int = 1,
                          transient: int = 0) -> Tensor:
        """Leading k exponents [B, k] of the closed-loop map (per unit time with dt)."""
        return lyapunov_spectrum(self.closed_loop_step, h0, k, n_steps, dt, qr_every, transient)


def fit_sequence_model(model: SequenceModel, data: Tensor, epochs: int = 20, window: int = 64,
                       batch_size: int = 64, lr: float = 3e-3, warmup: int = 8, seed: int = 0,
                       progress: bool = True) -> list[float]:
    """Next-step training with teacher forcing on windows of trajectories data [N, T, D].
    The first `warmup` predictions of a window are not scored (the state is still cold).
    Returns the mean loss per epoch."""
    if data.dim() != 3 or data.shape[-1] != model.dim:
        raise ValueError(f"data must be [N, T, {model.dim}], got {tuple(data.shape)}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n, t_len, _ = data.shape
    starts = torch.arange(0, t_len - window - 1, window // 2)
    pairs = torch.cartesian_prod(torch.arange(n), starts)
    history = []
    bar = tqdm(range(epochs), desc="GRU", disable=not progress)
    for _ in bar:
        perm = pairs[torch.randperm(len(pairs), generator=gen)]
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            seg = torch.stack([data[a, s:s + window + 1] for a, s in idx.tolist()])
            pred, _ = model(seg[:, :-1])
            loss = ((pred[:, warmup:] - seg[:, 1 + warmup:]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        history.append(total / len(perm))
        bar.set_postfix(loss=f"{history[-1]:.2e}", refresh=False)
    return history


def valid_prediction_time(forecast: Tensor, truth: Tensor, scale: Tensor, threshold: float = 0.4) -> Tensor:
    """Steps until the normalised error ||f - x|| / ||scale|| first exceeds threshold, per
    trajectory [B] (forecast, truth [B, T, D]; scale e.g. the data's standard deviation)."""
    err = ((forecast - truth) / scale).norm(dim=-1) / math.sqrt(forecast.shape[-1])
    over = err > threshold
    first = torch.where(over.any(1), over.float().argmax(1), torch.full_like(over[:, 0], over.shape[1],
                                                                            dtype=torch.long))
    return first
