"""A latent sequence model (VAE-style): RNN encoder -> latent z -> RNN decoder.

The encoder reads the observed frames and gives q(z | x_{1:T_obs}) = N(mu, diag(sigma^2));
the decoder unrolls from z alone (h_0 = tanh(W z), z fed at every step) and emits logits
of every frame of the window, so the frames after T_obs are a forecast of the future.
Both recurrences run on the fused latentfast GRU/LSTM ops. With a generated pendulum the
latent dimensions that carry the initial condition get most of the KL; the rest stay at the
prior. Used by `python -m latentfast demo dynamics`.
"""
from __future__ import annotations


import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentfast.data._cpu import made_on_cpu
from latentfast.ops._checks import check_count, check_like_model, check_tensor, check_unit_interval
from latentfast.rnn.models import GRU, LSTM


class LatentSequenceModel(nn.Module):
    """frames [B, T, *frame_shape] with values in [0, 1] -> z [B, latent] -> frame logits
    [B, T_out, *frame_shape].

    frame_shape is the shape of one frame: an int P for flattened frames [B, T, P], or a
    tuple such as (H, W) for image frames [B, T, H, W] (the pendulum frames of
    latentfast.data.dynamics.pendulum as they come). Every method also takes one sequence
    without its batch dimension ([T, *frame_shape], z [latent]) and returns its results
    without it, as torch.nn's recurrent layers do.
    """

    def __init__(self, frame_shape: int | Sequence[int], latent: int = 4, hidden: int = 64, feature: int = 64,
                 cell: str = "gru"):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        shape = (frame_shape,) if isinstance(frame_shape, int) else tuple(frame_shape)
        if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            raise ValueError(f"frame_shape must be an int >= 1 or a tuple of them, got {frame_shape!r}")
        rnn = GRU if cell == "gru" else LSTM
        self.frame_shape = shape
        self.frame_dim = math.prod(shape)
        self.latent, self.hidden, self.cell = latent, hidden, cell
        self.embed = nn.Sequential(nn.Linear(self.frame_dim, feature), nn.Tanh())
        self.encoder = rnn(feature, hidden, batch_first=True)
        self.to_posterior = nn.Linear(hidden, 2 * latent)
        self.to_h0 = nn.Linear(latent, hidden)
        self.decoder = rnn(latent, hidden, batch_first=True)
        self.emit = nn.Sequential(nn.Linear(hidden, 2 * feature), nn.Tanh(), nn.Linear(2 * feature, self.frame_dim))

    def _flat_frames(self, frames: Tensor, name: str = "frames") -> tuple[Tensor, bool]:
        """frames [B, T, *frame_shape] or [T, *frame_shape] -> ([B, T, P], whether batched)."""
        check_tensor(name, frames)
        check_like_model(name, frames, self.to_h0.weight)
        k = len(self.frame_shape)
        if frames.dim() not in (k + 1, k + 2) or tuple(frames.shape[frames.dim() - k:]) != self.frame_shape:
            want = ", ".join(str(n) for n in self.frame_shape)
            raise ValueError(f"{name} must be [B, T, {want}] (or one sequence [T, {want}]), got {tuple(frames.shape)}")
        batched = frames.dim() == k + 2
        flat = frames.reshape(*frames.shape[:frames.dim() - k], self.frame_dim)
        return (flat if batched else flat[None]), batched

    def _encode(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        if frames.shape[1] < 1:
            raise ValueError("frames must hold at least one time step")
        out, _ = self.encoder(self.embed(frames))
        mu, log_var = self.to_posterior(out[:, -1]).chunk(2, dim=-1)
        return mu, log_var.clamp(-12.0, 6.0)

    def _decode(self, z: Tensor, n_steps: int) -> Tensor:
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        h0 = torch.tanh(self.to_h0(z))[None]
        hx = h0 if self.cell == "gru" else (h0, torch.zeros_like(h0))
        out, _ = self.decoder(z[:, None].expand(-1, n_steps, -1), hx)
        return self.emit(out).reshape(z.shape[0], n_steps, *self.frame_shape)

    def encode(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var) of q(z | frames), each [B, latent] ([latent] for one sequence)."""
        flat, batched = self._flat_frames(frames)
        mu, log_var = self._encode(flat)
        return (mu, log_var) if batched else (mu[0], log_var[0])

    def decode(self, z: Tensor, n_steps: int) -> Tensor:
        """Frame logits [B, n_steps, *frame_shape] unrolled from z [B, latent] (from z [latent]:
        [n_steps, *frame_shape])."""
        check_tensor("z", z)
        check_like_model("z", z, self.to_h0.weight)
        if z.dim() not in (1, 2) or z.shape[-1] != self.latent:
            raise ValueError(f"z must be [B, {self.latent}] or [{self.latent}], got {tuple(z.shape)}")
        return self._decode(z, n_steps) if z.dim() == 2 else self._decode(z[None], n_steps)[0]

    @torch.no_grad()
    def sample(self, n: int, n_steps: int) -> Tensor:
        """n new sequences of n_steps frames [n, n_steps, *frame_shape], each decoded from
        z ~ N(0, I), the prior: the frame probabilities sigmoid(logits), as VAE.sample gives
        decoded means."""
        check_count("n", n, 0, "the number of sequences")
        check_count("n_steps", n_steps, 1, "the frames of each sequence")
        p = self.to_h0.weight
        z = torch.randn(n, self.latent, dtype=p.dtype, device=p.device)
        return torch.sigmoid(self._decode(z, n_steps))

    def forward(self, frames: Tensor, n_obs: int | None = None, n_steps: int | None = None,
                sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Encode frames[:, :n_obs], decode n_steps frames (default: all of them).
        Returns (logits [B, n_steps, *frame_shape], mu, log_var) (without B for one sequence)."""
        flat, batched = self._flat_frames(frames)
        n_obs = flat.shape[1] if n_obs is None else n_obs
        n_steps = flat.shape[1] if n_steps is None else n_steps
        _check_n_obs(n_obs, flat.shape[1])
        mu, log_var = self._encode(flat[:, :n_obs])
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp() if sample else mu
        logits = self._decode(z, n_steps)
        return (logits, mu, log_var) if batched else (logits[0], mu[0], log_var[0])

    def loss(self, frames: Tensor, n_obs: int, beta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """(negative ELBO per sequence, reconstruction term, KL term) with the whole window
        scored (the frames after n_obs are predicted from the observed ones). The frames are
        Bernoulli targets: values outside [0, 1] (or NaN) raise a ValueError (one read-back
        per call; LATENTFAST_CHECK_FINITE=0 skips it, as it does the finiteness checks)."""
        flat, _ = self._flat_frames(frames)
        if flat.shape[0] == 0:
            raise ValueError("the loss of an empty batch (B = 0) is undefined")
        check_unit_interval("frames", flat)
        logits, mu, log_var = self(flat.reshape(*flat.shape[:2], *self.frame_shape), n_obs)
        rec = F.binary_cross_entropy_with_logits(logits.flatten(2), flat, reduction="none").sum((1, 2)).mean()
        kl = kl_per_dim(mu, log_var).sum(1).mean()
        return rec + beta * kl, rec, kl


def _check_n_obs(n_obs: int, n_frames: int) -> None:
    if not 1 <= n_obs <= n_frames:
        raise ValueError(f"n_obs must be in [1, {n_frames}] (the frames given), got {n_obs}")


def _observed_batch(model: LatentSequenceModel, frames: Tensor, n_obs: int, need: str) -> Tensor:
    """frames [N, T, *frame_shape] as [N, T, P] with n_obs checked against T; `need` is the
    message for one sequence [T, ...] given instead."""
    flat, batched = model._flat_frames(frames)
    if not batched:
        raise ValueError(f"{need}, got one sequence {tuple(frames.shape)}")
    _check_n_obs(n_obs, flat.shape[1])
    return flat


def kl_per_dim(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(q(z_j | x) || N(0, 1)) for every sequence and dimension, [B, latent]."""
    return 0.5 * (mu ** 2 + log_var.exp() - 1.0 - log_var)


@torch.no_grad()
def rank_latents(model: LatentSequenceModel, frames: Tensor, n_obs: int) -> dict[str, Tensor]:
    """How much each latent dimension is used: mean KL to the prior, mean posterior
    variance, and the variance of the posterior means over the data ('active units').
    Dimensions with high KL and small posterior variance carry the data's factors; changes
    along them are the likely ones. Returns these [latent] tensors and 'order' (by KL, high
    first). frames [N, T, *frame_shape], N >= 2."""
    flat = _observed_batch(model, frames, n_obs, "rank_latents needs a batch of sequences [N, T, ...] (it "
                           "averages over them)")
    if flat.shape[0] < 2:  # the variance of the posterior means over one sequence (or none) is undefined
        raise ValueError(f"rank_latents needs N >= 2 sequences (it averages over them and takes the variance "
                         f"of their posterior means), got N = {flat.shape[0]}")
    mu, log_var = model._encode(flat[:, :n_obs])
    kl = kl_per_dim(mu, log_var).mean(0)
    return {"kl": kl, "posterior_var": log_var.exp().mean(0), "activity": mu.var(0),
            "order": torch.argsort(kl, descending=True)}


def fit_latent_sequence(model: LatentSequenceModel, frames: Tensor, n_obs: int, epochs: int = 30,
                        batch_size: int = 64, lr: float = 2e-3, beta: float = 1.0, warmup: int = 5, seed: int = 0,
                        progress: bool = True) -> list[float]:
    """Adam on the negative ELBO of windows frames [N, T, *model.frame_shape] (values in
    [0, 1]); beta is annealed from 0 over the first `warmup` epochs. Returns the mean loss per
    epoch."""
    _observed_batch(model, frames, n_obs, "frames must be a batch of sequences [N, T, ...]")
    if frames.shape[0] < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(f"need N >= 1 sequences, batch_size >= 1 and epochs >= 0, got {frames.shape[0]}, "
                         f"{batch_size} and {epochs}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    history = []
    bar = tqdm(range(epochs), desc="latent sequence VAE", disable=not progress)
    for epoch in bar:
        b_now = beta * min(1.0, (epoch + 1) / max(warmup, 1))
        perm = torch.randperm(frames.shape[0], generator=gen, device=gen.device)
        total = frames.new_zeros(())  # read back once per epoch, not per step
        for i in range(0, len(perm), batch_size):
            batch = frames[perm[i:i + batch_size]]
            loss, _, _ = model.loss(batch, n_obs, beta=b_now)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            total += loss.detach() * len(batch)
        sched.step()
        history.append(total.item() / frames.shape[0])
        bar.set_postfix(loss=f"{history[-1]:.1f}", refresh=False)
    return history


@made_on_cpu
def pendulum_windows(n_traj: int = 512, n_steps: int = 40, size: int = 16, dt: float = 0.1,
                     seed: int = 0, blob: float = 0.12) -> tuple[Tensor, Tensor]:
    """Pendulum frame sequences flattened for the model: (frames [n_traj, n_steps, size^2],
    states [n_traj, n_steps, 2])."""
    from latentfast.data.dynamics import pendulum

    frames, states = pendulum(n_steps - 1, n_traj=n_traj, dt=dt, size=size, seed=seed, blob=blob)
    return frames.reshape(n_traj, n_steps, size * size), states


def frame_error(logits: Tensor, frames: Tensor) -> Tensor:
    """Mean absolute pixel error per time step [T] of sigmoid(logits) against frames, both
    [B, T, ...]."""
    check_tensor("logits", logits)
    check_tensor("frames", frames, like=logits)
    if logits.shape != frames.shape or logits.dim() < 3:
        raise ValueError(f"logits and frames must be [B, T, ...] of one shape, got {tuple(logits.shape)} and "
                         f"{tuple(frames.shape)}")
    return (torch.sigmoid(logits) - frames).abs().flatten(2).mean((0, 2))


def centroids(images: Tensor, size: int) -> Tensor:
    """Centre (x, y) in pixels of the bright part (above half the frame's maximum) of each
    frame, images [..., size, size] or flattened [..., size^2] -> [..., 2] (the bob's position
    for pendulum frames)."""
    check_tensor("images", images)
    if images.dim() >= 2 and tuple(images.shape[-2:]) == (size, size) and size > 1:
        lead = images.shape[:-2]
    elif images.dim() >= 1 and images.shape[-1] == size * size:
        lead = images.shape[:-1]
    else:
        raise ValueError(f"images must be [..., {size}, {size}] or [..., {size * size}], got {tuple(images.shape)}")
    w = images.reshape(*lead, size, size)
    w = (w - 0.5 * w.amax((-1, -2), keepdim=True)).clamp_min(0)
    grid = torch.arange(size, dtype=images.dtype, device=images.device)
    mass = w.sum((-1, -2)).clamp_min(1e-12)
    return torch.stack([(w.sum(-2) * grid).sum(-1) / mass, (w.sum(-1) * grid).sum(-1) / mass], -1)


def position_error(logits: Tensor, frames: Tensor, size: int) -> Tensor:
    """Mean distance in pixels per time step [T] between the centres of the decoded and the
    true frames, both [B, T, size, size] or [B, T, size^2]."""
    return (centroids(torch.sigmoid(logits), size) - centroids(frames, size)).norm(dim=-1).mean(0)


__all__ = ["LatentSequenceModel", "fit_latent_sequence", "rank_latents", "kl_per_dim", "pendulum_windows",
           "frame_error", "centroids", "position_error"]
