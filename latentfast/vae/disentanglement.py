"""Disentanglement metrics on data with known factors: BetaVAE score (Higgins et al. 2017),
FactorVAE score (Kim & Mnih 2018) and MIG (Chen et al. 2018).

`data` is anything with ``factor_sizes``, ``sample_factors(n, generator)`` and
``observations(factors)`` (e.g. latentfast.data.sprites.Sprites); `encode` maps a batch
of observations [n, D] to codes [n, d] (e.g. a VAE's posterior mean, ``model.embed``).
Scores: BetaVAE is a classifier accuracy (chance = 1 / n_factors), FactorVAE a
majority-vote accuracy (0 when every code dimension is constant), MIG in [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Encoder = Callable[[Tensor], Tensor]


@torch.no_grad()
def _encode(encode: Encoder, data, factors: Tensor, batch: int = 1024) -> Tensor:
    codes = []
    for i in range(0, factors.shape[0], batch):
        z = encode(data.observations(factors[i:i + batch]))
        n = min(batch, factors.shape[0] - i)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != n or z.shape[1] < 1:
            raise ValueError(f"encode must return codes [n, d] (d >= 1) for n observations; for n = {n} it returned "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("encode returned NaN or Inf codes")
        codes.append(z.float().cpu())
    return torch.cat(codes)


def _check_counts(**counts: int) -> None:
    """Each count must be at least its minimum: name=(value, minimum)."""
    for name, (value, least) in counts.items():
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")


def _fixed_factor_batches(data, n_points: int, batch_size: int, gen: torch.Generator
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """n_points batches of pairs sharing one factor: (factors a, factors b [n, batch, F], k [n])."""
    n_f = len(data.factor_sizes)
    k = torch.randint(n_f, (n_points,), generator=gen, device=gen.device)
    a = data.sample_factors(n_points * batch_size, gen).view(n_points, batch_size, n_f)
    b = data.sample_factors(n_points * batch_size, gen).view(n_points, batch_size, n_f)
    rows = torch.arange(n_points, device=a.device)
    b[rows, :, k] = a[rows, :, k]
    return a, b, k


def beta_vae_score(encode: Encoder, data, n_train: int = 500, n_test: int = 300, batch_size: int = 64,
                   seed: int = 0) -> float:
    """Accuracy of a linear classifier that predicts which factor a batch of pairs shares
    from the mean absolute code difference |z_a - z_b| (Higgins et al. 2017)."""
    from sklearn.linear_model import LogisticRegression

    _check_counts(n_train=(n_train, 1), n_test=(n_test, 1), batch_size=(batch_size, 1))
    gen = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for n in (n_train, n_test):
        a, b, k = _fixed_factor_batches(data, n, batch_size, gen)
        za = _encode(encode, data, a.reshape(-1, a.shape[-1])).view(n, batch_size, -1)
        zb = _encode(encode, data, b.reshape(-1, b.shape[-1])).view(n, batch_size, -1)
        feats.append((za - zb).abs().mean(1).numpy())
        labels.append(k.numpy())
    seen = set(labels[0].tolist())
    if len(seen) < 2:  # one factor seen in training (LogisticRegression refuses): predict it
        return float((labels[1] == seen.pop()).mean())
    clf = LogisticRegression(max_iter=2000).fit(feats[0], labels[0])
    return float((clf.predict(feats[1]) == labels[1]).mean())


def factor_vae_score(encode: Encoder, data, n_train: int = 500, n_test: int = 300, batch_size: int = 64,
                     n_variance: int = 5000, seed: int = 0) -> float:
    """Majority-vote accuracy of predicting the fixed factor from the code dimension of least
    normalised variance in a batch where that factor is held fixed (Kim & Mnih 2018).
    Dimensions whose global standard deviation is below 0.05 are pruned as inactive."""
    # a variance within a batch needs 2 points, the global one too
    _check_counts(n_train=(n_train, 1), n_test=(n_test, 1), batch_size=(batch_size, 2), n_variance=(n_variance, 2))
    gen = torch.Generator().manual_seed(seed)
    z_all = _encode(encode, data, data.sample_factors(n_variance, gen))
    std = z_all.std(0)
    active = std > 0.05
    if not bool(active.any()):
        return 0.0
    n_f = len(data.factor_sizes)
    votes = []
    for n in (n_train, n_test):
        k = torch.randint(n_f, (n,), generator=gen, device=gen.device)
        f = data.sample_factors(n * batch_size, gen).view(n, batch_size, n_f)
        fixed = torch.stack([torch.randint(data.factor_sizes[int(kk)], (1,), generator=gen, device=gen.device)[0]
                             for kk in k])
        f[torch.arange(n, device=f.device), :, k] = fixed[:, None]
        z = _encode(encode, data, f.reshape(-1, n_f)).view(n, batch_size, -1)
        var = (z.var(1) / std.clamp_min(1e-12) ** 2)[:, active]
        votes.append((var.argmin(1), k))
    n_active = int(active.sum())
    table = torch.zeros(n_active, n_f, dtype=torch.long, device=votes[0][0].device)
    table.index_put_(votes[0], torch.ones_like(votes[0][0]), accumulate=True)
    predict = table.argmax(1)  # the factor each dimension votes for
    dims, k_test = votes[1]
    return float((predict[dims] == k_test).float().mean())


def _entropy(labels: Tensor) -> float:
    p = torch.bincount(labels).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def _mutual_info(a: Tensor, b: Tensor) -> float:
    """I(a; b) in nats of two integer label vectors, from their joint histogram."""
    nb = int(b.max()) + 1
    joint = torch.bincount(a * nb + b, minlength=(int(a.max()) + 1) * nb).double().view(-1, nb)
    joint = joint / joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa * pb)[nz]).log()).sum())


def discretize(z: Tensor, n_bins: int = 20) -> Tensor:
    """Each column of z [n, d] to n_bins equal-width bins over its range: [n, d] integers."""
    _check_counts(n_bins=(n_bins, 1))
    lo, hi = z.min(0).values, z.max(0).values
    width = (hi - lo).clamp_min(1e-12) / n_bins
    return ((z - lo) / width).floor().clamp(0, n_bins - 1).long()


def mig(encode: Encoder, data, n_points: int = 10000, n_bins: int = 20, seed: int = 0) -> float:
    """Mutual information gap: the mean over factors of (largest - second largest) mutual
    information between the factor and one code dimension, over the factor's entropy."""
    _check_counts(n_points=(n_points, 1), n_bins=(n_bins, 1))
    gen = torch.Generator().manual_seed(seed)
    f = data.sample_factors(n_points, gen)
    z = discretize(_encode(encode, data, f), n_bins)
    gaps = []
    for k in range(f.shape[1]):
        h = _entropy(f[:, k])
        if h <= 0:
            continue
        mi = sorted((_mutual_info(z[:, j], f[:, k]) for j in range(z.shape[1])), reverse=True) + [0.0]
        gaps.append((mi[0] - mi[1]) / h)
    return float(sum(gaps) / len(gaps)) if gaps else 0.0


def disentanglement_scores(encode: Encoder, data, seed: int = 0) -> dict[str, float]:
    """{"beta_vae": ..., "factor_vae": ..., "mig": ...} with the default settings."""
    return {"beta_vae": beta_vae_score(encode, data, seed=seed), "factor_vae": factor_vae_score(encode, data, seed=seed),
            "mig": mig(encode, data, seed=seed)}
