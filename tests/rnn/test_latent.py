"""The latent sequence model, its helpers and `demo dynamics`."""
from __future__ import annotations

import os

import pytest
import torch

from latentfast.__main__ import main
from latentfast.data.dynamics import pendulum
from latentfast.rnn.latent import (LatentSequenceModel, centroids, fit_latent_sequence, frame_error, kl_per_dim,
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


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_image_frames_and_one_sequence_give_the_flat_batched_results(cell):
    torch.manual_seed(0)
    images, _ = pendulum(7, n_traj=3, size=6, seed=1)  # [3, 8, 6, 6], as the generator gives them
    flat = images.reshape(3, 8, 36)
    model = LatentSequenceModel((6, 6), latent=3, hidden=8, feature=8, cell=cell)
    ref = LatentSequenceModel(36, latent=3, hidden=8, feature=8, cell=cell)
    ref.load_state_dict(model.state_dict())
    assert model.frame_shape == (6, 6) and model.frame_dim == 36
    logits, mu, log_var = model(images, n_obs=5, n_steps=9, sample=False)
    r_logits, r_mu, r_log_var = ref(flat, n_obs=5, n_steps=9, sample=False)
    assert logits.shape == (3, 9, 6, 6) and mu.shape == (3, 3)
    torch.testing.assert_close(logits, r_logits.reshape(3, 9, 6, 6), rtol=0, atol=0)
    torch.testing.assert_close((mu, log_var), (r_mu, r_log_var), rtol=0, atol=0)
    torch.manual_seed(5)
    loss = model.loss(images, 5, beta=0.5)
    torch.manual_seed(5)
    torch.testing.assert_close(loss, ref.loss(flat, 5, beta=0.5), rtol=0, atol=0)
    assert model.decode(mu, 4).shape == (3, 4, 6, 6)
    # one sequence without its batch dimension: the batch-of-one results without it
    one = images[1]
    o_logits, o_mu, o_log_var = model(one, n_obs=5, sample=False)
    b_logits, b_mu, b_log_var = model(one[None], n_obs=5, sample=False)
    assert o_logits.shape == (8, 6, 6) and o_mu.shape == (3,)
    torch.testing.assert_close((o_logits, o_mu, o_log_var), (b_logits[0], b_mu[0], b_log_var[0]), rtol=0, atol=0)
    torch.testing.assert_close(model.encode(one), tuple(t[0] for t in model.encode(one[None])), rtol=0, atol=0)
    torch.testing.assert_close(model.decode(o_mu, 3), model.decode(o_mu[None], 3)[0], rtol=0, atol=0)
    torch.manual_seed(6)
    one_loss = model.loss(one, 5)
    torch.manual_seed(6)
    torch.testing.assert_close(one_loss, model.loss(one[None], 5), rtol=0, atol=0)
    # the helpers take image frames too
    r = rank_latents(model, images, 5)
    r_flat = rank_latents(ref, flat, 5)
    torch.testing.assert_close(r["kl"], r_flat["kl"], rtol=0, atol=0)
    torch.testing.assert_close(frame_error(logits[:, :8], images), frame_error(r_logits[:, :8], flat))
    torch.testing.assert_close(position_error(logits[:, :8], images, 6), position_error(r_logits[:, :8], flat, 6))
    torch.testing.assert_close(centroids(images, 6), centroids(flat, 6))


@pytest.mark.skipif(interpreting(), reason="training steps of interpreted kernels; the kernels are checked by "
                    "tests/rnn/test_rnn_ops.py")
def test_fit_takes_image_frames():
    images, _ = pendulum(9, n_traj=16, size=6, seed=3)
    torch.manual_seed(2)
    model = LatentSequenceModel((6, 6), latent=2, hidden=8, feature=8)
    ref = LatentSequenceModel(36, latent=2, hidden=8, feature=8)
    ref.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    hist = fit_latent_sequence(model, images, 5, epochs=2, batch_size=8, progress=False)
    torch.manual_seed(3)
    ref_hist = fit_latent_sequence(ref, images.reshape(16, 10, 36), 5, epochs=2, batch_size=8, progress=False)
    assert hist == pytest.approx(ref_hist, rel=1e-6)
    with pytest.raises(ValueError, match="a batch of sequences"):
        fit_latent_sequence(model, images[0], 5, epochs=1, progress=False)


def test_sample_decodes_prior_draws():
    """sample(n, n_steps): sigmoid of the decoded logits at z ~ N(0, I), in the model's dtype
    and frame shape."""
    model = LatentSequenceModel((3, 4), latent=2, hidden=6, feature=6).double()
    torch.manual_seed(3)
    got = model.sample(5, 7)
    torch.manual_seed(3)
    z = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        want = torch.sigmoid(model.decode(z, 7))
    assert got.shape == (5, 7, 3, 4) and got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.sample(0, 2).shape == (0, 2, 3, 4)
    for bad in ((-1, 3), (2, 0), (2.0, 3)):
        with pytest.raises(ValueError, match="must be an int"):
            model.sample(*bad)


def test_frames_outside_the_unit_interval_raise(monkeypatch):
    model = LatentSequenceModel(4, latent=2, hidden=4, feature=4)
    frames = torch.rand(2, 3, 4)
    model.loss(frames, 2)
    for bad in (frames * 255, frames - 0.5, frames.masked_fill(frames > 0.5, float("nan"))):
        with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
            model.loss(bad, 2)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        fit_latent_sequence(model, frames * 255, 2, epochs=1, progress=False)
    monkeypatch.setenv("LATENTFAST_CHECK_FINITE", "0")  # the value checks off: no read-back
    assert torch.isfinite(model.loss(frames * 255, 2)[0])


def test_frame_shapes_are_checked():
    for bad in (0, (4, 0), (), (2.0, 3), True):
        with pytest.raises(ValueError, match="frame_shape"):
            LatentSequenceModel(bad)
    model = LatentSequenceModel((4, 5), latent=2, hidden=4, feature=4)
    for frames in (torch.rand(2, 3, 20), torch.rand(2, 3, 5, 4), torch.rand(5, 2, 3, 4, 5), torch.rand(4, 5)):
        with pytest.raises(ValueError, match=r"frames must be \[B, T, 4, 5\] \(or one sequence \[T, 4, 5\]\)"):
            model(frames)
    with pytest.raises(ValueError, match="z must be"):
        model.decode(torch.zeros(2, 2, 2), 3)
    with pytest.raises(ValueError, match="a batch of sequences"):
        rank_latents(model, torch.rand(3, 4, 5), 2)
    for n in (0, 1):  # the variance over sequences needs two (before: NaN activities, or NaN everything)
        with pytest.raises(ValueError, match=f"N >= 2 sequences.*got N = {n}"):
            rank_latents(model, torch.rand(n, 3, 4, 5), 2)
    with pytest.raises(ValueError, match="images must be"):
        centroids(torch.rand(2, 15), 4)
    with pytest.raises(ValueError, match="one shape"):
        frame_error(torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    # not tensors / not floating (before: AttributeError, RuntimeError on bool images)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        centroids([[0.0] * 16], 4)
    with pytest.raises(TypeError, match="images must have dtype"):
        centroids(torch.rand(2, 16) > 0.5, 4)
    with pytest.raises(TypeError, match="frames must be a torch.Tensor"):
        frame_error(torch.rand(2, 3, 4), [[0.0]])


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
    for name in ("dynamics_reconstruction.png", "dynamics_traversals.png", "dynamics_latents.png",
                 "dynamics_samples.png"):
        path = tmp_path / name
        assert path.exists() and os.path.getsize(path) > 10_000
