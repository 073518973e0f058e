"""The geodesics_1000 benchmark: many geodesics in the latent space of a VAE on the digits.

latentfast solves all pairs in one batch (fused energy + gradient, batched L-BFGS); the
baseline is what a user writes in plain PyTorch: one pair at a time, the curve energy by
autograd, torch.optim.LBFGS with a strong-Wolfe line search. The baseline is timed on a
subset of the pairs (it is slow) and reported per geodesic, like latentfast.
"""
from __future__ import annotations

import time

import torch

from latentfast import backend
from latentfast import geometry as geo
from latentfast.data._cpu import made_on_cpu
from latentfast.data.digits import load_digits_images
from latentfast.vae import VAE, fit, fit_rbf_variance


@made_on_cpu
def trained_digits_vae(epochs: int = 150, seed: int = 0, progress: bool = True
                       ) -> tuple[VAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-D VAE (64 -> 128 -> 128 -> 2, Gaussian likelihood) on sklearn's digits scaled to
    [0, 1], with the RBF variance network fitted after training. Returns (model, images
    [N, 64], labels [N], latent means [N, 2]). The global random state is left as it was
    (the model is initialised from `seed` inside torch.random.fork_rng)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _trained_digits_vae(epochs, seed, progress)


def _trained_digits_vae(epochs: int, seed: int, progress: bool) -> tuple[VAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits_images()
    x = x.flatten(1) / 16.0
    model = VAE(64, latent_dim=2, hidden=(128, 128), likelihood="gaussian")
    fit(model, x, epochs=epochs, batch_size=128, lr=2e-3, seed=seed, progress=progress)
    with torch.no_grad():
        z = model.encode(x)[0]
    fit_rbf_variance(model.decoder, z, x, n_centres=64, steps=500, seed=seed)
    model.eval()
    return model, x, y, z


def _baseline_geodesic(decoder, z0, z1, n_segments: int, max_iter: int) -> float:
    """One pair, plain PyTorch: autograd energy of the feature map, torch.optim.LBFGS."""
    t = torch.linspace(0, 1, n_segments + 1, device=z0.device)[1:-1, None]
    x = (z0 + t * (z1 - z0)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        c = torch.cat([z0[None], x, z1[None]])
        g = decoder.features(c)
        e = n_segments * ((g[1:] - g[:-1]) ** 2).sum()
        e.backward()
        return e

    opt.step(closure)
    with torch.no_grad():
        c = torch.cat([z0[None], x, z1[None]])
        g = decoder.features(c)
        return float((g[1:] - g[:-1]).norm(dim=1).sum())


def run_geodesics(n_pairs: int = 1000, n_baseline: int = 20, n_segments: int = 32, quick: bool = False,
                  seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Solve n_pairs geodesics between random pairs of data latents; return one row."""
    if quick:
        n_pairs, n_baseline, epochs = min(n_pairs, 50), min(n_baseline, 5), 20
    else:
        epochs = 150
    model, _, _, z = trained_digits_vae(epochs=epochs, seed=seed)
    dec = model.decoder.to(device)
    z = z.to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    i = torch.randint(z.shape[0], (n_pairs,), generator=gen, device=gen.device).to(device)
    j = torch.randint(z.shape[0], (n_pairs,), generator=gen, device=gen.device).to(device)
    j = torch.where(i == j, (j + 1) % z.shape[0], j)
    z0, z1 = z[i].detach(), z[j].detach()
    sync = torch.cuda.synchronize if z.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    res = geo.geodesic(z0, z1, dec, n_segments=n_segments, max_iter=500, progress=True)
    sync()
    t_fast = (time.perf_counter() - t0) * 1e3 / n_pairs
    t0 = time.perf_counter()  # the same solver on the curve points themselves
    plain = geo.geodesic(z0, z1, dec, n_segments=n_segments, max_iter=500, precondition=False, progress=True)
    sync()
    t_plain = (time.perf_counter() - t0) * 1e3 / n_pairs
    t0 = time.perf_counter()
    base_len = [_baseline_geodesic(dec, z0[k], z1[k], n_segments, 500) for k in range(n_baseline)]
    t_base = (time.perf_counter() - t0) * 1e3 / n_baseline
    base_len = torch.tensor(base_len, device=z0.device, dtype=z0.dtype)
    rel = ((res.lengths[:n_baseline] - base_len) / base_len).abs()
    line = geo.curve_length(dec, geo.straight_line(z0, z1, n_segments))
    return {
        "op": "geodesic", "case": f"geodesics_{n_pairs}", "pass": "solve",
        "backend": backend.select(z0.device),
        "eager_ms": round(t_base, 3), "compile_ms": None, "latentfast_ms": round(t_fast, 3),
        "speedup_vs_eager": round(t_base / t_fast, 2), "speedup_vs_compile": None,
        "max_rel_err": float(f"{rel.max():.3e}"),
        "converged_fraction": float(res.converged.float().mean()),
        "median_iterations": int(res.iterations.median()),
        "unpreconditioned_ms": round(t_plain, 3), "speedup_vs_unpreconditioned": round(t_plain / t_fast, 2),
        "unpreconditioned_median_iterations": int(plain.iterations.median()),
        "unpreconditioned_converged_fraction": float(plain.converged.float().mean()),
        "median_length_over_straight_line": round(float((res.lengths / line).median()), 4),
        "n_baseline_pairs": n_baseline, "n_segments": n_segments,
        "note": (f"ms per geodesic; baseline = one pair at a time with autograd + torch LBFGS, timed on "
                 f"{n_baseline} pairs; max_rel_err = length difference to it; "
                 f"{float(res.converged.float().mean()):.1%} converged; unpreconditioned_* = "
                 f"geodesic(precondition=False), L-BFGS on the curve points as the baseline does"),
    }
