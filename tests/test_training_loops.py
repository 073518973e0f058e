"""The training helpers (vae.fit, rnn.fit_sequence_model, rnn.fit_latent_sequence) read the
loss back to the host once per epoch, not once per step: on a GPU each read is a
synchronisation that stalls the launch queue. And VAE / FlowVAE are called like any module,
model(x) -> the loss, so torch.compile, DistributedDataParallel and hooks can wrap them.
"""
from __future__ import annotations

import pytest
import torch

from latentfast.rnn import SequenceModel, fit_sequence_model
from latentfast.rnn.latent import LatentSequenceModel, fit_latent_sequence
from latentfast.vae import VAE, FlowVAE, fit
from tests.conftest import count_host_reads, interpreting


@pytest.fixture
def reads(monkeypatch):
    """latentfast's own host reads (tests.conftest.count_host_reads), with the finiteness
    checks off (a documented read per model call; LATENTFAST_CHECK_FINITE)."""
    monkeypatch.setenv("LATENTFAST_CHECK_FINITE", "0")
    return count_host_reads(monkeypatch)


def _models():
    return [VAE(12, latent_dim=2, hidden=(8,)),
            FlowVAE(12, latent_dim=3, hidden=(8,), posterior_steps=2, prior_steps=1, flow_hidden=8)]


@pytest.mark.parametrize("which", [0, 1], ids=["VAE", "FlowVAE"])
def test_vae_is_called_like_a_module(which):
    torch.manual_seed(0)
    model = _models()[which]
    x = torch.rand(7, 12)
    torch.manual_seed(1)
    loss = model(x)
    torch.manual_seed(1)
    same, parts = model.loss(x)
    assert loss.dim() == 0 and loss.requires_grad
    torch.testing.assert_close(loss, same, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(parts["loss"]), loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(parts["nll"] + model.beta * parts["kl"]), loss.detach())
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    handle_calls = []
    handle = model.register_forward_hook(lambda m, args, out: handle_calls.append(out))
    model(x)
    handle.remove()
    assert len(handle_calls) == 1 and handle_calls[0].dim() == 0


@pytest.mark.skipif(interpreting(), reason="the modules' compiled graphs are checked in the main pass")
@pytest.mark.parametrize("which", [0, 1], ids=["VAE", "FlowVAE"])
def test_vae_compiles_fullgraph(which):
    torch.manual_seed(0)
    model = _models()[which]
    x = torch.rand(7, 12)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):  # eager's random stream for z
        torch.manual_seed(3)
        got = compiled(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, model(x))
    got.backward()


@pytest.mark.parametrize("which", [0, 1], ids=["VAE", "FlowVAE"])
def test_vae_fit_reads_back_once_per_epoch(reads, which):
    torch.manual_seed(0)
    model = _models()[which]
    x = torch.rand(30, 12)
    fit(model, x, epochs=1, batch_size=8, progress=False)  # the flows' constant buffers checked once
    reads.clear()
    history = fit(model, x, epochs=3, batch_size=8, progress=False)
    assert len(reads) == 3, reads  # 4 steps an epoch
    assert [sorted(h) for h in history] == [["kl", "loss", "nll"]] * 3


def test_sequence_fits_read_back_once_per_epoch(reads):
    torch.manual_seed(0)
    data = torch.randn(3, 40, 2)
    model = SequenceModel(2, hidden=8)
    reads.clear()
    history = fit_sequence_model(model, data, epochs=2, window=10, batch_size=4, warmup=2,
                                 progress=False)
    assert len(history) == 2 and len(reads) == 2, reads  # 7 windows a trajectory, 6 steps an epoch
    frames = torch.rand(9, 6, 16)
    model = LatentSequenceModel(16, latent=2, hidden=8, feature=8)
    reads.clear()
    history = fit_latent_sequence(model, frames, n_obs=3, epochs=2,
                                  batch_size=4, progress=False)
    assert len(history) == 2 and len(reads) == 2, reads  # 3 steps an epoch


def test_sequence_fit_windows_are_the_trajectory_slices():
    """The batched gather of training windows takes what slicing each window out would."""
    torch.manual_seed(0)
    data = torch.randn(3, 40, 2, dtype=torch.float64)
    seen = []

    class Recorder(SequenceModel):
        def forward(self, x, h0=None):
            seen.append(x.detach().clone())
            return super().forward(x, h0)

    fit_sequence_model(Recorder(2, hidden=4).double(), data, epochs=1, window=10, batch_size=5, warmup=2,
                       progress=False)
    windows = {tuple(data[a, s:s + 10].flatten().tolist()) for a in range(3) for s in range(0, 30, 5)}
    got = [tuple(w.flatten().tolist()) for x in seen for w in x]
    assert len(got) == 18 and set(got) == windows


def test_vae_fit_leaves_the_global_random_state_alone():
    """fit(seed=...) reseeded the global generator (torch.manual_seed), so the caller's random
    stream after a fit restarted from the fit's seed (trials in a loop drew the same numbers).
    Now the sampling noise comes from a forked stream: the global state after fit is the one
    before it, and the same seed still gives the same training."""
    torch.manual_seed(1)
    x = torch.rand(40, 10)
    histories = []
    for _ in range(2):
        torch.manual_seed(2)
        model = VAE(10, 2, hidden=(8,))
        before = torch.get_rng_state()
        histories.append(fit(model, x, epochs=2, batch_size=16, seed=3, progress=False))
        assert torch.equal(torch.get_rng_state(), before)
    assert histories[0] == histories[1]


@pytest.mark.parametrize("which", [0, 1], ids=["VAE", "FlowVAE"])
def test_vae_fit_checks_the_data_once_before_training(which, monkeypatch):
    """fit raises before the first step for data the likelihood cannot score: values outside
    [0, 1] under the Bernoulli likelihood (0-255 pixels; on a GPU torch's binary cross-entropy
    checks its target with a device-side assert), NaN under either; the parameters are left
    untouched."""
    torch.manual_seed(0)
    gaussian = _models()[which]
    bernoulli = (VAE(12, latent_dim=2, hidden=(8,), likelihood="bernoulli") if which == 0 else
                 FlowVAE(12, latent_dim=3, hidden=(8,), posterior_steps=1, prior_steps=0, flow_hidden=8,
                         likelihood="bernoulli"))
    x = torch.rand(10, 12)
    for model, bad, match in ((bernoulli, x * 255, r"values in \[0, 1\]"), (bernoulli, x - 0.5, r"values in \[0, 1\]"),
                              (gaussian, x.masked_fill(x > 0.9, float("nan")), "NaN or Inf")):
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=match):
            fit(model, bad, epochs=1, batch_size=4, progress=False)
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    fit(bernoulli, x, epochs=1, batch_size=4, progress=False)
    fit(gaussian, x * 255, epochs=1, batch_size=4, progress=False)  # any finite value has a Gaussian density
    monkeypatch.setenv("LATENTFAST_CHECK_FINITE", "0")  # no value checks, no read-back
    with pytest.raises(RuntimeError, match="target should be between 0 and 1"):  # torch's own check, on CPU only
        fit(bernoulli, x * 255, epochs=1, batch_size=4, progress=False)
