"""`python -m latentfast demo geodesics` writes its two PNGs."""
from __future__ import annotations

import os

import pytest
import torch

from latentfast.__main__ import main
from tests.conftest import interpreting


@pytest.mark.skipif(interpreting(), reason="hundreds of interpreted kernel launches; the demo's "
                    "code path is run by the normal pass and its kernels by tests/geometry ops tests")
def test_demo_geodesics_writes_pngs(tmp_path):
    assert main(["demo", "geodesics", "--out", str(tmp_path), "--epochs", "3"]) == 0
    for name in ("geodesics_latent.png", "geodesics_decoded.png"):
        path = tmp_path / name
        assert path.exists() and os.path.getsize(path) > 10_000


@pytest.mark.skipif(interpreting(), reason="trains a VAE for an epoch; the normal pass runs it")
def test_trained_digits_vae_leaves_the_global_random_state_alone():
    """The geodesic benchmark's and demo's VAE is initialised from its seed inside
    torch.random.fork_rng: the global state after the call is the one before (before, it
    called torch.manual_seed(seed) on it)."""
    from latentfast.bench.geodesics import trained_digits_vae

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    z = trained_digits_vae(epochs=1, progress=False)[3]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(trained_digits_vae(epochs=1, progress=False)[3], z)
