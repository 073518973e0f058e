"""What geodesic shooting (geometry.exp_map) costs on this machine, against the
Christoffel-symbol form of the acceleration that it used before.

exp_map integrates z'' = -Gamma(z)[v, v] by RK4 (four accelerations per step). The current
geometry.geodesic_acceleration forms z'' = -M^-1 J^T g''(z)[v, v] in one batched pass
through an MLP decoder; the former one built dM [d, d, d] per point with torch.func
(jacfwd of the metric, itself a jacfwd, under vmap) and solved
M z'' = -(dM[v]) v + grad(v^T M v) / 2. Both run here through the same exp_map, on a 2-D VAE
trained for 20 epochs on sklearn's digits with a 64-centre RBF variance network; prints the
medians of 3 calls for 4 and 500 points, 50 RK4 steps, and the largest difference of the
end points; then what exp_map's singular-metric check costs it (with against without,
alternated call by call), there and on an untrained 128-128 tanh decoder at d = 2 and 10;
then, on an untrained 2-64-256-784 decoder, exp_map with the linear last layer W_L run as R
of W_L = Q R (the default) against W_L itself (LATENTFAST_GEOM_QR=0), alternated.

    python scripts/exp_map_cost.py
"""
from __future__ import annotations

import os
import statistics

import torch
from sklearn.datasets import load_digits

from latentfast.bench.runner import alternate_ms, median_ms, median_ratio
from latentfast.geometry import core
from latentfast.vae import VAE, GaussianMLPDecoder, fit, fit_rbf_variance


def christoffel_acceleration(decoder, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The former geometry.geodesic_acceleration (torch.func, third-order dM per point)."""
    f = core._feature_fn(decoder)

    def m_fn(zi: torch.Tensor) -> torch.Tensor:
        jac = torch.func.jacfwd(lambda x: f(x[None])[0])(zi)
        return jac.T @ jac

    def acc(zi: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        dm = torch.func.jacfwd(m_fn)(zi)  # [d, d, d]
        rhs = -(dm @ vi) @ vi + 0.5 * torch.einsum("i,ijk,j->k", vi, dm, vi)
        return torch.linalg.solve(m_fn(zi), rhs)
    return torch.func.vmap(acc)(z, v)


def main() -> None:
    torch.manual_seed(0)
    x = torch.tensor(load_digits().data, dtype=torch.float32)[:1000] / 16
    model = VAE(in_dim=64, latent_dim=2, hidden=(128, 128))
    fit(model, x, epochs=20, progress=False)
    z = model.encode(x)[0].detach()
    fit_rbf_variance(model.decoder, z, x, n_centres=64)
    dec = model.decoder
    current = core._acceleration

    def christoffel(decoder, z, v, check):
        # core._acceleration's signature: (z'', (metric, solve info) for the singular test, which the
        # former form did not run: identity metrics here, never singular)
        eye = torch.eye(z.shape[1], dtype=z.dtype).expand(z.shape[0], -1, -1)
        return christoffel_acceleration(decoder, z, v), ((eye, z.new_zeros(z.shape[0], dtype=torch.int32))
                                                         if check else None)
    for b in (4, 500):
        zb, vb = z[:b], 0.1 * torch.randn(b, 2)
        times, ends = {}, {}
        for name, acc in (("christoffel (before)", christoffel), ("current", current)):
            core._acceleration = acc  # exp_map looks the acceleration up at call time
            try:
                times[name] = median_ms(lambda: core.exp_map(dec, zb, vb, n_steps=50), reps=3, warmup=1)
                ends[name] = core.exp_map(dec, zb, vb, n_steps=50)[:, -1]
            finally:
                core._acceleration = current
        before, now = times["christoffel (before)"], times["current"]
        diff = (ends["christoffel (before)"] - ends["current"]).abs().max().item()
        print(f"exp_map {b:4d} points, 50 steps: christoffel {before:8.1f} ms, current {now:7.1f} ms, "
              f"{before / now:5.1f}x; max |end point difference| {diff:.1e}")
        ratio = check_cost(dec, zb, vb, 50, rounds=11)
        print(f"exp_map {b:4d} points, 50 steps: singular-metric check costs {ratio:.2f}x")
    for d in (2, 10):  # an untrained 128-128 tanh decoder, no variance network
        bare = GaussianMLPDecoder(d, 64, hidden=(128, 128))
        for b in (4, 500):
            zb, vb = torch.randn(b, d), 0.1 * torch.randn(b, d)
            ratio = check_cost(bare, zb, vb, 20, rounds=15)
            print(f"bare decoder d={d:2d}, exp_map {b:4d} points, 20 steps: singular-metric check costs {ratio:.2f}x")


def last_layer_cost() -> None:
    """exp_map on a 2-64-256-784 decoder (a linear last layer wider than the layer before):
    W_L itself over R in its place, alternated call by call, and the largest path difference."""
    torch.manual_seed(0)
    dec = GaussianMLPDecoder(2, 784, hidden=(64, 256))
    for b in (4, 64, 256):
        zb, vb = torch.randn(b, 2), 0.3 * torch.randn(b, 2)

        def shoot(qr: str):
            old = os.environ.get("LATENTFAST_GEOM_QR")
            os.environ["LATENTFAST_GEOM_QR"] = qr
            try:
                return core.exp_map(dec, zb, vb, n_steps=20)
            finally:
                os.environ.pop("LATENTFAST_GEOM_QR") if old is None else os.environ.update(LATENTFAST_GEOM_QR=old)
        ab = alternate_ms({"R": lambda: shoot("1"), "W_L": lambda: shoot("0")}, rounds=11, warmup=2)
        diff = (shoot("1") - shoot("0")).abs().max().item()
        print(f"2-64-256-784 decoder, exp_map {b:3d} points, 20 steps: W_L {statistics.median(ab['W_L']):7.1f} ms, "
              f"R {statistics.median(ab['R']):7.1f} ms, {median_ratio(ab, 'W_L', 'R'):.2f}x; max |path difference| "
              f"{diff:.1e}")


def check_cost(dec, z: torch.Tensor, v: torch.Tensor, n_steps: int, rounds: int) -> float:
    """exp_map with its singular-metric check (an eigvalsh of every stage's [d, d] metrics,
    read back once per call) over exp_map without it (can_read_back patched to False, as
    under torch.compile): the median of per-round ratios, the two alternated call by call."""
    check = core.can_read_back

    def shoot(on: bool):
        core.can_read_back = check if on else (lambda t: False)
        try:
            return core.exp_map(dec, z, v, n_steps=n_steps)
        finally:
            core.can_read_back = check
    ab = alternate_ms({"on": lambda: shoot(True), "off": lambda: shoot(False)}, rounds=rounds, warmup=2)
    return median_ratio(ab, "on", "off")


if __name__ == "__main__":
    main()
    last_layer_cost()
