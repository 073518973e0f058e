"""The README's Python examples run as written.

Each ```python block of README.md is executed in a fresh namespace. A block may use names
it does not define (the user's data: ``x``, ``h``, ``data``, ...); the prelude below gives
them small values of the documented shapes. Training lengths are shortened by exact text
substitutions, each of which must match the block, so an edited README fails here until the
test is updated with it. After each block, the shapes its comments promise are checked.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import interpreting

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def _prelude_glow() -> dict:
    return {}


def _prelude_geometry() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "x": _digits()[:1000],
        "z0": torch.randn(4, 2, generator=g), "z1": torch.randn(4, 2, generator=g),
        "v": 0.1 * torch.randn(4, 2, generator=g),
        "z_train": torch.randn(30, 2, generator=g), "y_train": torch.randint(0, 3, (30,), generator=g),
        "z_query": torch.randn(5, 2, generator=g),
    }


def _prelude_flows() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(32, 8, generator=g), "h": torch.randn(32, 16, generator=g),
            "images": (torch.rand(16, 32, 32, generator=g) > 0.5).float()}


def _prelude_rnn() -> dict:
    g = torch.Generator().manual_seed(0)
    hs = 24

    def w(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    return {
        "x": torch.randn(3, 9, 32, generator=g),
        "data": torch.randn(2, 260, 3, generator=g),
        "x0": torch.randn(4, 3, generator=g),
        "s0": torch.randn(2, hs, generator=g),
        "w_ih": w(3 * hs, 3), "w_hh": w(3 * hs, hs), "b_ih": w(3 * hs), "b_hh": w(3 * hs),
        "w_out": w(3, hs), "b_out": w(3),
    }


# (prelude, substitutions (README text -> text run here), check of the namespace after the block)
def _check_glow(ns: dict) -> None:
    assert ns["samples"].shape == (16, 1, 8, 8)
    assert ns["x"].shape == (32, 48, 32, 32) and ns["logdet"].shape == (32,)
    assert torch.isfinite(ns["loss"]) and ns["glow"].parameters().__next__().grad is not None


def _check_geometry(ns: dict) -> None:
    assert ns["M"].shape == (10, 2, 2)
    assert ns["vol"].shape == (1000,)
    assert ns["res"].curves.shape == (4, 33, 2)
    assert ns["one"].curves.shape == (33, 2) and ns["length"].shape == ()
    torch.testing.assert_close(ns["length"], ns["one"].lengths)
    assert ns["D"].shape == (12, 12) and torch.allclose(ns["D"], ns["D"].T)
    assert ns["labels"].shape == (12,) and ns["pred"].shape == (5,)
    assert ns["path"].shape[-1] == 2 and ns["walk"].shape[-1] == 2


def _check_flows(ns: dict) -> None:
    assert ns["z0"].shape == (32, 8) and ns["logdet"].shape == (32,)
    assert torch.isfinite(ns["loss"]) and ns["log_p"].shape == (16,)
    assert ns["codes"].shape == (16, 6)


def _check_rnn(ns: dict) -> None:
    assert ns["out"].shape == (3, 9, 512) and ns["c_n"].shape == (4, 3, 256)  # 2 layers, 2 directions
    assert ns["forecast"].shape[:2] == (2, 600)
    assert ns["pred2"].shape == (2, 100, 3) and ns["s"].shape == (2, 128)
    assert ns["le"].shape == (2, 3)
    assert ns["exps"].shape == (2, 16)
    assert ns["frames"].shape == (24, 10, 16, 16) and ns["logits"].shape == (8, 10, 16, 16)
    assert ns["mu"].shape == (8, 4) and sorted(ns["order"].tolist()) == [0, 1, 2, 3]


CASES = {
    "glow": (_prelude_glow, [], _check_glow),
    "geometry": (_prelude_geometry, [
        ("fit(model, x, epochs=150)", "fit(model, x, epochs=2, progress=False)"),
        ("geo.geodesic(z[:500], z[500:1000], dec)", "geo.geodesic(z[:40], z[40:80], dec)"),
        ("geo.distance_matrix(dec, z[:50])", "geo.distance_matrix(dec, z[:12])"),
        ("geo.riemannian_kmeans(dec, z[:50], k=5)", "geo.riemannian_kmeans(dec, z[:12], k=3)"),
    ], _check_geometry),
    "flows": (_prelude_flows, [
        ("fit(vae, images.flatten(1), epochs=40)", "fit(vae, images.flatten(1), epochs=1, progress=False)"),
    ], _check_flows),
    "rnn": (_prelude_rnn, [
        ("fit_sequence_model(model, data)", "fit_sequence_model(model, data, epochs=1, progress=False)"),
        ("lorenz_climate()", "lorenz_climate(hidden=16, epochs=1, progress=False)"),
        ("n_steps=40000", "n_steps=400"),
        ("n_steps=5000", "n_steps=50"),
        ("pendulum(39, n_traj=512, size=16)", "pendulum(9, n_traj=24, size=16)"),
        ("n_obs=20, epochs=150)", "n_obs=5, epochs=1, progress=False)"),
        ("lsm(frames[:8], n_obs=20, sample=False)", "lsm(frames[:8], n_obs=5, sample=False)"),
        ("rank_latents(lsm, frames, n_obs=20)", "rank_latents(lsm, frames, n_obs=5)"),
    ], _check_rnn),
}


def test_readme_has_the_documented_blocks():
    # one CASES entry per block, in order: a new README example needs a case here
    assert len(_blocks()) == len(CASES)


@pytest.mark.slow
@pytest.mark.skipif(interpreting(), reason="the examples run on the default backends in the normal pass; "
                    "under the interpreter their training loops would take minutes")
@pytest.mark.parametrize("i,name", list(enumerate(CASES)))
def test_readme_block_runs(i, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (files the examples save, such as vae.pt, go there)
    prelude, subs, check = CASES[name]
    code = _blocks()[i]
    for old, new in subs:
        assert old in code, f"README block {i} ({name}) no longer contains {old!r}"
        code = code.replace(old, new)
    ns = prelude()
    torch.manual_seed(0)
    exec(compile(code, f"README.md block {i} ({name})", "exec"), ns)
    check(ns)
