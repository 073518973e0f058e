"""`python -m latentfast demo betavae` writes its PNGs and scores."""
from __future__ import annotations

import json
import os

import pytest

from latentfast.__main__ import main
from tests.conftest import interpreting


@pytest.mark.skipif(interpreting(), reason="thousands of interpreted kernel launches; the demo's code path "
                    "is run by the normal pass and its kernels by tests/flows/test_vector_flows.py")
def test_demo_betavae_writes_outputs(tmp_path):
    assert main(["demo", "betavae", "--out", str(tmp_path), "--epochs", "1"]) == 0
    scores = json.loads((tmp_path / "betavae_scores.json").read_text())
    assert set(scores["models"]) == {"beta=1", "beta=4", "beta=8", "beta=4 + IAF"}
    for s in scores["models"].values():
        assert 0.0 <= s["mig"] <= 1.0 and 0.0 <= s["beta_vae"] <= 1.0 and 0.0 <= s["factor_vae"] <= 1.0
    pngs = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    assert len(pngs) == 5
    assert all(os.path.getsize(tmp_path / p) > 10_000 for p in pngs)
