"""Gaussian MLP decoders with the RBF variance network of "Latent Space Oddity".

A GaussianMLPDecoder maps z [.., d] to a mean mu(z) [.., D] (Linear layers with element-wise
activations) and a standard deviation sigma(z) [.., D]: a learned constant while the VAE
trains, replaced afterwards by an RBFVariance network fitted on the training latents
(fit_rbf_variance), so that sigma, and with it the pull-back metric, grows away from the
data. The geometry functions (latentfast.geometry) use the fused latentfast ops for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentfast.data._cpu import draw_device
from latentfast.reference.geometry import ACTIVATIONS, activation


class RBFVariance(nn.Module):
    """sigma(z) = (W v(z) + zeta)^(-1/2), v_k(z) = exp(-lambda_k ||z - c_k||^2), W >= 0.

    Args: centres [K, d]; bandwidths [K]; out_dim D; zeta > 0 (sigma <= zeta^-1/2, reached
    far from every centre). W = softplus(raw) keeps the precision positive.
    """

    def __init__(self, centres: Tensor, bandwidths: Tensor, out_dim: int, zeta: float = 1e-2):
        super().__init__()
        if centres.dim() != 2 or bandwidths.shape != (centres.shape[0],):
            raise ValueError("centres must be [K, d] and bandwidths [K]")
        if not zeta > 0:
            raise ValueError(f"zeta must be > 0, got {zeta}")
        self.register_buffer("centres", centres.detach().clone())
        self.register_buffer("bandwidths", bandwidths.detach().clone())
        self.raw_weight = nn.Parameter(torch.full((out_dim, centres.shape[0]), -2.0, dtype=centres.dtype,
                                                  device=centres.device))
        self.zeta = float(zeta)

    @property
    def weight(self) -> Tensor:
        return F.softplus(self.raw_weight)

    def get_extra_state(self) -> dict[str, float]:
        """zeta, a float, saved in the state dict beside the tensors (its '_extra_state')."""
        return {"zeta": self.zeta}

    def set_extra_state(self, state: dict[str, float]) -> None:
        zeta = float(state["zeta"])
        if not zeta > 0:
            raise ValueError(f"zeta must be > 0, got {zeta}")
        self.zeta = zeta

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a state dict saved before zeta was part of it: the layer keeps its own
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, z: Tensor) -> Tensor:
        """v(z) [..., K]: the RBF responses (fixed buffers; no trained parameter)."""
        return torch.exp(-self.bandwidths * ((z[..., None, :] - self.centres) ** 2).sum(-1))

    def precision(self, z: Tensor, features: Tensor | None = None) -> Tensor:
        """beta(z) = W v(z) + zeta; `features` = v(z) when already computed."""
        return (self.features(z) if features is None else features) @ self.weight.T + self.zeta

    def forward(self, z: Tensor) -> Tensor:
        """sigma(z) = (W v(z) + zeta)^-1/2 [..., D]."""
        return self.precision(z).rsqrt()


@dataclass
class MLPParams:
    """The plain-tensor description of a decoder that the fused geometry ops take."""

    weights: list[Tensor]
    biases: list[Tensor]
    acts: list[int]
    rbf_centres: Tensor | None = None
    rbf_lambda: Tensor | None = None
    rbf_weight: Tensor | None = None
    zeta: float = 0.0

    def args(self) -> tuple:
        """(weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta): the fused ops'
        trailing arguments."""
        return (self.weights, self.biases, self.acts, self.rbf_centres, self.rbf_lambda,
                self.rbf_weight, self.zeta)


class GaussianMLPDecoder(nn.Module):
    """mu(z) = act_out(W_L ... act(W_1 z + b_1) ...), sigma(z) constant or RBF.

    Args:
        latent_dim: d.  out_dim: D.  hidden: widths of the hidden layers.
        activation: hidden activation, one of identity, tanh, softplus, elu, sigmoid.
        out_activation: activation of the mean (sigmoid for Bernoulli likelihoods).
    """

    def __init__(self, latent_dim: int, out_dim: int, hidden: tuple[int, ...] = (64, 64),
                 activation: str = "tanh", out_activation: str = "identity"):
        super().__init__()
        for name in (activation, out_activation):
            if name not in ACTIVATIONS:
                raise ValueError(f"unknown activation {name!r}; choose from {list(ACTIVATIONS)}")
        dims = [latent_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = [ACTIVATIONS[activation]] * len(hidden) + [ACTIVATIONS[out_activation]]
        self.latent_dim, self.out_dim = latent_dim, out_dim
        self.log_sigma = nn.Parameter(torch.full((out_dim,), math.log(0.5)))
        self.rbf: RBFVariance | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state dict saved after fit_rbf_variance holds the RBF network (rbf.centres, ...): a
        # decoder without one makes it from the saved centres and bandwidths, so the fitted model
        # loads into a fresh one; the tensors and zeta (the network's extra state) are then
        # loaded into it as usual.
        key = prefix + "rbf."
        if self.rbf is None and isinstance(state_dict.get(key + "centres"), Tensor) \
                and isinstance(state_dict.get(key + "bandwidths"), Tensor):
            like = self.log_sigma
            centres, bandwidths = state_dict[key + "centres"], state_dict[key + "bandwidths"]
            if centres.dim() == 2 and centres.shape[1] == self.latent_dim and bandwidths.shape == centres.shape[:1]:
                self.rbf = RBFVariance(centres.to(like.device, like.dtype), bandwidths.to(like.device, like.dtype),
                                       self.out_dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def mean(self, z: Tensor) -> Tensor:
        """mu(z) [..., D], the mean network."""
        h = z
        for layer, code in zip(self.layers, self.acts):
            h = activation(layer(h), code)
        return h

    def sigma(self, z: Tensor) -> Tensor:
        """sigma(z) [..., D]: the RBF variance network once fitted, else a learned constant per
        output."""
        if self.rbf is not None:
            return self.rbf(z)
        return self.log_sigma.exp().expand(*z.shape[:-1], self.out_dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mu(z), sigma(z))."""
        return self.mean(z), self.sigma(z)

    def features(self, z: Tensor) -> Tensor:
        """The map whose pull-back is the metric: cat(mu, sigma) with an RBF network, else mu
        (a constant sigma adds nothing to the metric)."""
        mu = self.mean(z)
        return torch.cat([mu, self.rbf(z)], -1) if self.rbf is not None else mu

    def mlp_params(self) -> MLPParams:
        """The decoder as plain tensors for the fused geometry ops (the RBF network's included once
        fitted)."""
        p = MLPParams([l.weight for l in self.layers], [l.bias for l in self.layers], list(self.acts))
        if self.rbf is not None:
            p.rbf_centres, p.rbf_lambda = self.rbf.centres, self.rbf.bandwidths
            p.rbf_weight, p.zeta = self.rbf.weight, self.rbf.zeta
        return p


def kmeans(x: Tensor, k: int, n_iter: int = 50, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Euclidean k-means (k-means++ seeding, Lloyd iterations): (centres [k, d], labels [n])."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    draw_on = draw_device(generator)  # (not x's device: multinomial of CUDA probabilities with a CPU generator raises)
    idx = [int(torch.randint(n, (1,), generator=generator, device=draw_on))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx.append(int(torch.multinomial(probs.to(draw_on), 1, generator=generator)))
        d2 = torch.minimum(d2, ((x - x[idx[-1]]) ** 2).sum(1))
    centres = x[idx].clone()
    for _ in range(n_iter):
        labels = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return centres, torch.cdist(x, centres).argmin(1)


def _cluster_spreads(z: Tensor, centres: Tensor, labels: Tensor) -> Tensor:
    """Mean distance of each cluster's members to its centre [K]; clusters without one (fewer
    than two members, or all at the centre) get the median of the others' (see
    fit_rbf_variance)."""
    k = centres.shape[0]
    dist = (z - centres[labels]).norm(dim=1)
    counts = torch.bincount(labels, minlength=k)
    spread = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(0, labels, dist) / counts.clamp_min(1)
    measured = (counts >= 2) & (spread > 0)
    fallback = torch.ones((), dtype=z.dtype, device=z.device)  # a single centre, or all at one point
    if bool(measured.any()):
        fallback = spread[measured].median()
    elif k >= 2:
        gaps = torch.cdist(centres, centres) + torch.diag(torch.full((k,), math.inf, dtype=z.dtype, device=z.device))
        nearest = gaps.amin(1).median()
        if bool(nearest > 0):
            fallback = nearest
    return torch.where(measured, spread, fallback)


def fit_rbf_variance(decoder: GaussianMLPDecoder, latents: Tensor, data: Tensor, n_centres: int = 64,
                     curvature: float = 1.5, zeta: float = 1e-2, steps: int = 500, lr: float = 0.05,
                     seed: int = 0) -> RBFVariance:
    """Fit the RBF variance network (stage two of "Latent Space Oddity") and attach it.

    Centres: k-means on the latents; bandwidths lambda_k = 0.5 (curvature * s_k)^-2 with s_k
    the mean distance of cluster k's members to c_k; W by maximum likelihood of the data
    under N(mu(z), sigma(z)^2) with the mean network fixed. With fewer latents than n_centres,
    every latent is a centre.

    A cluster without a spread (one member, as an outlier that k-means++ seeds as a centre
    often is, or members all at the centre) takes the median s_k of the clusters that have
    one, or, where none has, the median distance from a centre to its nearest other centre
    (1 for a single centre). (Its own s_k = 0 would make lambda_k infinite: a needle in
    sigma, and in the metric, around that one latent.)
    """
    if not (isinstance(latents, Tensor) and latents.dim() == 2 and latents.shape[1] == decoder.latent_dim
            and latents.shape[0] >= 1):
        raise ValueError(f"latents must be [N, {decoder.latent_dim}] with N >= 1, got "
                         f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
    if not isinstance(data, Tensor) or data.dim() < 2 or math.prod(data.shape[1:]) != decoder.out_dim:
        raise ValueError(f"data must be [N, {decoder.out_dim}] (or [N, ...] with {decoder.out_dim} values a row), got "
                         f"{tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__}")
    if latents.shape[0] != data.shape[0]:
        raise ValueError("latents and data must have the same number of rows")
    if n_centres < 1 or steps < 0 or not (curvature > 0 and zeta > 0):
        raise ValueError(f"need n_centres >= 1, steps >= 0, curvature > 0 and zeta > 0, got {n_centres}, {steps}, "
                         f"{curvature} and {zeta}")
    gen = torch.Generator().manual_seed(seed)
    z = latents.detach()
    x = data.detach().reshape(data.shape[0], -1)
    centres, labels = kmeans(z, min(n_centres, z.shape[0]), generator=gen)
    bandwidths = 0.5 / (curvature * _cluster_spreads(z, centres, labels)) ** 2
    rbf = RBFVariance(centres, bandwidths, decoder.out_dim, zeta).to(z.device)
    with torch.no_grad():
        mu = decoder.mean(z)
    sq = (x - mu) ** 2
    with torch.no_grad():
        v = rbf.features(z)  # only W is trained: the RBF responses are computed once
    opt = torch.optim.Adam(rbf.parameters(), lr=lr)
    for _ in range(steps):
        beta = rbf.precision(z, v)
        nll = (0.5 * beta * sq - 0.5 * torch.log(beta)).sum(1).mean()
        opt.zero_grad()
        nll.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # leave no gradients behind on the attached network
    decoder.rbf = rbf
    return rbf
