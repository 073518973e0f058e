"""`python -m latentfast demo geodesics` writes its two PNGs."""
from __future__ import annotations

import os

import pytest

from latentfast.__main__ import main
from tests.conftest import interpreting


@pytest.mark.skipif(interpreting(), reason="hundreds of interpreted kernel launches; the demo's "
                    "code path is run by the normal pass and its kernels by tests/geometry ops tests")
def test_demo_geodesics_writes_pngs(tmp_path):
    assert main(["demo", "geodesics", "--out", str(tmp_path), "--epochs", "3"]) == 0
    for name in ("geodesics_latent.png", "geodesics_decoded.png"):
        path = tmp_path / name
        assert path.exists() and os.path.getsize(path) > 10_000
