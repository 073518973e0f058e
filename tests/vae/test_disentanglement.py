"""Disentanglement metrics on synthetic codes with known answers, and the sprites data."""
from __future__ import annotations

import math

import pytest
import torch

from latentfast.data.sprites import make_sprites
from latentfast.vae import disentanglement as dis


class FactorCodes:
    """Observations are the factor indices themselves (as floats)."""

    def __init__(self, sizes=(3, 6, 5, 8, 8)):
        self.factor_sizes = sizes

    def sample_factors(self, n, generator):
        return torch.stack([torch.randint(s, (n,), generator=generator) for s in self.factor_sizes], 1)

    def observations(self, factors):
        return factors.float()


DATA = FactorCodes()


def identity(x):
    return x


def constant(x):
    return torch.zeros(x.shape[0], 4)


def duplicated(x):
    return torch.cat([x, x], 1)


def rotated(x):
    # every code dimension mixes all factors
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g))[0]
    return x @ q


def test_identity_codes_score_near_one():
    assert dis.beta_vae_score(identity, DATA) > 0.95
    assert dis.factor_vae_score(identity, DATA) > 0.95
    assert dis.mig(identity, DATA) > 0.9


def test_constant_codes_score_chance_or_zero():
    assert dis.beta_vae_score(constant, DATA) < 1 / 5 + 0.1  # chance level
    assert dis.factor_vae_score(constant, DATA) == 0.0
    assert dis.mig(constant, DATA) == 0.0


def test_duplicated_latent_has_zero_gap():
    assert dis.mig(duplicated, DATA) < 0.02
    assert dis.factor_vae_score(duplicated, DATA) > 0.95  # still axis-aligned


def test_mixed_codes_score_lower():
    assert dis.mig(rotated, DATA) < 0.5 * dis.mig(identity, DATA)
    assert dis.factor_vae_score(rotated, DATA) < 0.9


def test_mutual_info_and_discretize():
    a = torch.tensor([0, 0, 1, 1] * 50)
    assert abs(dis._mutual_info(a, a) - dis._entropy(a)) < 1e-12
    assert abs(dis._entropy(a) - math.log(2.0)) < 1e-12
    assert dis._mutual_info(a, torch.tensor([0, 1, 0, 1] * 50)) < 1e-12
    z = dis.discretize(torch.linspace(0, 1, 100)[:, None], 10)
    assert z.min() == 0 and z.max() == 9 and torch.bincount(z[:, 0]).tolist() == [10] * 10


def test_sprites_dataset():
    s = make_sprites(16, n_scales=2, n_rotations=3, n_positions=3)
    assert s.images.shape == (3 * 2 * 3 * 3 * 3, 1, 16, 16)
    assert set(s.images.unique().tolist()) <= {0.0, 1.0}
    idx = s.factors_to_index(s.factors)
    assert torch.equal(idx, torch.arange(s.images.shape[0]))
    # every image shows a sprite, and changing only the x position moves it right
    assert bool((s.images.flatten(1).sum(1) > 0).all())
    f = torch.tensor([[0, 1, 0, 0, 1], [0, 1, 0, 2, 1]])
    cols = torch.arange(16, dtype=torch.float32)
    img = s.observations(f).view(2, 16, 16)
    centre_x = (img.sum(1) * cols).sum(1) / img.sum((1, 2))
    assert centre_x[1] > centre_x[0] + 3
    # the three shapes differ in area at the same scale
    areas = [s.observations(torch.tensor([[k, 1, 0, 1, 1]])).sum().item() for k in range(3)]
    assert len(set(areas)) == 3
    with pytest.raises(ValueError):
        make_sprites(4)


def test_metrics_refuse_bad_counts_and_bad_codes():
    """Counts below what a metric needs (no points, a one-point batch for a variance, no
    bins) and encoders that return the wrong shape or non-finite codes raise ValueError:
    before, some failed deep inside (torch.cat of nothing) and some returned a score."""
    for call, match in ((lambda: dis.mig(identity, DATA, n_points=0), "n_points"),
                        (lambda: dis.mig(identity, DATA, n_points=10, n_bins=0), "n_bins"),
                        (lambda: dis.beta_vae_score(identity, DATA, n_train=0), "n_train"),
                        (lambda: dis.factor_vae_score(identity, DATA, n_train=5, n_test=5, batch_size=1), "batch_size"),
                        (lambda: dis.discretize(torch.randn(4, 2), n_bins=0), "n_bins"),
                        (lambda: dis.mig(lambda x: x[:, 0], DATA, n_points=10), r"codes \[n, d\]"),
                        (lambda: dis.mig(lambda x: x[:3], DATA, n_points=10), r"codes \[n, d\]"),
                        (lambda: dis.mig(lambda x: x * float("nan"), DATA, n_points=10), "NaN")):
        with pytest.raises(ValueError, match=match):
            call()


def test_beta_vae_score_with_one_factor_in_training_is_a_constant_guess():
    """With n_train so small that every training batch shares the same factor, the classifier
    can only predict that factor: the score is the share of test batches that share it (about
    1 / n_factors), not 1. Before, such a run returned 1.0 for any encoder, constant codes too."""
    for n_train in (1, 2):
        gen = torch.Generator().manual_seed(0)
        k_train = torch.randint(5, (n_train,), generator=gen)  # the metric's own draw of the training factors
        assert len(set(k_train.tolist())) == 1
        score = dis.beta_vae_score(constant, DATA, n_train=n_train, n_test=400)
        assert score == dis.beta_vae_score(identity, DATA, n_train=n_train, n_test=400)
        assert abs(score - 1 / 5) < 0.08
    one_factor = FactorCodes((4,))  # one factor: every batch shares it, the score is 1
    assert dis.beta_vae_score(constant, one_factor, n_train=3, n_test=50) == 1.0
