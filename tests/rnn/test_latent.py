"""The latent sequence model, its helpers and `demo dynamics`."""
from __future__ import annotations

import os

import pytest
import torch

from latentfast.__main__ import main
from latentfast.rnn.latent import (LatentSequenceModel, centroids, fit_latent_sequence, kl_per_dim,
                                   pendulum_windows, position_error, rank_latents)
from tests.conftest import interpreting


def test_shapes_loss_and_ranking():
    torch.manual_seed(0)
    frames, states = pendulum_windows(12, 10, size=8, seed=0)
    assert frames.shape == (12, 10, 64) and states.shape == (12, 10, 2)
    for cell in ("gru", "lstm"):
        model = LatentSequenceModel(64, latent=3, hidden=8, feature=8, cell=cell)
        logits, mu, log_var = model(frames, n_obs=4, n_steps=15)
        assert logits.shape == (12, 15, 64) and mu.shape == log_var.shape == (12, 3)
        loss, rec, kl = model.loss(frames, 4)
        assert torch.isclose(loss, rec + kl)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        r = rank_latents(model, frames, 4)
        assert r["kl"].shape == (3,) and sorted(r["order"].tolist()) == [0, 1, 2]
        assert (r["kl"][r["order"][:-1]] >= r["kl"][r["order"][1:]]).all()


def test_kl_and_centroids_known_values():
    torch.testing.assert_close(kl_per_dim(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))
    # KL(N(1, e^0) || N(0, 1)) = 1/2
    torch.testing.assert_close(kl_per_dim(torch.ones(1, 1), torch.zeros(1, 1)), torch.full((1, 1), 0.5))
    img = torch.zeros(8, 8)
    img[2, 5] = 1.0  # row (y) 2, column (x) 5
    torch.testing.assert_close(centroids(img.reshape(1, 64), 8), torch.tensor([[5.0, 2.0]]))
    logits = torch.full((1, 1, 64), -20.0)
    logits[0, 0, 2 * 8 + 5] = 20.0
    img2 = torch.zeros(8, 8)
    img2[6, 5] = 1.0
    torch.testing.assert_close(position_error(logits, img2.reshape(1, 1, 64), 8), torch.tensor([4.0]))


@pytest.mark.skipif(interpreting(), reason="training steps of interpreted kernels; the kernels are checked by "
                    "tests/rnn/test_rnn_ops.py")
def test_training_lowers_the_loss():
    torch.manual_seed(1)
    frames, _ = pendulum_windows(64, 12, size=8, seed=2)
    model = LatentSequenceModel(64, latent=2, hidden=16, feature=16)
    hist = fit_latent_sequence(model, frames, 6, epochs=8, batch_size=16, progress=False)
    assert hist[-1] < 0.85 * hist[0], hist


def test_bad_inputs_raise():
    model = LatentSequenceModel(16, latent=2, hidden=4, feature=4)
    with pytest.raises(ValueError, match="frames must be"):
        model.encode(torch.rand(2, 3, 15))
    with pytest.raises(ValueError, match="z must be"):
        model.decode(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="n_obs"):
        fit_latent_sequence(model, torch.rand(4, 3, 16), 5, epochs=1, progress=False)
    with pytest.raises(ValueError, match="empty batch"):
        model.loss(torch.rand(0, 3, 16), 2)
    assert model(torch.rand(0, 3, 16), n_obs=2)[0].shape == (0, 3, 16)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        fit_latent_sequence(model, torch.rand(4, 3, 16), 2, epochs=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="cell"):
        LatentSequenceModel(16, cell="rnn")
    with pytest.raises(ValueError, match="n_steps"):
        model.decode(torch.zeros(2, 2), 0)
    for n_obs in (0, 4):  # none observed, or more than the 3 frames given
        with pytest.raises(ValueError, match=r"n_obs must be in \[1, 3\]"):
            model(torch.rand(2, 3, 16), n_obs=n_obs)


@pytest.mark.skipif(interpreting(), reason="hundreds of interpreted kernel launches; the demo's code path is run "
                    "by the normal pass")
def test_demo_dynamics_writes_pngs(tmp_path):
    assert main(["demo", "dynamics", "--out", str(tmp_path), "--epochs", "2"]) == 0
    for name in ("dynamics_reconstruction.png", "dynamics_traversals.png", "dynamics_latents.png"):
        path = tmp_path / name
        assert path.exists() and os.path.getsize(path) > 10_000
