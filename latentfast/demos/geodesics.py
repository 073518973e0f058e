"""`python -m latentfast demo geodesics`: a 2-D VAE on the digits and its latent geometry.

Writes two PNGs: the latent space coloured by the volume measure sqrt(det M(z)) (log
scale) with the training latents, geodesics and straight lines between a few pairs; and
the images decoded along each geodesic and straight line.
"""
from __future__ import annotations

import os
import time

import torch

from latentfast import geometry as geo
from latentfast.bench.geodesics import trained_digits_vae
from latentfast.data._cpu import made_on_cpu


@made_on_cpu
def run(out_dir: str = "demo_out", epochs: int = 150, n_pairs: int = 4, seed: int = 0) -> list[str]:
    """Train, solve, plot; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    model, x, y, z = trained_digits_vae(epochs=epochs, seed=seed)
    dec = model.decoder
    print(f"trained the VAE and its RBF variance network in {time.perf_counter() - t0:.1f} s")

    # pairs of latents of different digits, far apart
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    while len(pairs) < n_pairs:
        i, j = torch.randint(len(z), (2,), generator=gen, device=gen.device).tolist()
        if y[i] != y[j] and (z[i] - z[j]).norm() > 1.5:
            pairs.append((i, j))
    z0 = torch.stack([z[i] for i, _ in pairs])
    z1 = torch.stack([z[j] for _, j in pairs])
    t0 = time.perf_counter()
    res = geo.geodesic(z0, z1, dec, n_segments=48, init="graph", data=z, max_iter=1000)
    line = geo.straight_line(z0, z1, 48)
    line_len = geo.curve_length(dec, line)
    print(f"{n_pairs} geodesics in {time.perf_counter() - t0:.2f} s, converged: {res.converged.tolist()}")
    for k in range(n_pairs):
        print(f"  pair {k}: digits {int(y[pairs[k][0]])} -> {int(y[pairs[k][1]])}: geodesic length "
              f"{res.lengths[k]:.2f}, straight line {line_len[k]:.2f}")

    # volume measure on a grid
    lo, hi = z.min(0).values - 1.0, z.max(0).values + 1.0
    n = 150
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], n), torch.linspace(lo[1], hi[1], n), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        vol = geo.volume_measure(dec, grid).reshape(n, n)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(vol.clamp_min(1e-12).log10().numpy(), origin="lower", cmap="viridis",
                   extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])), aspect="auto")
    fig.colorbar(im, ax=ax, label="log10 sqrt(det M(z))")
    ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=3, alpha=0.6)
    for k in range(n_pairs):
        g = res.curves[k]
        ax.plot(g[:, 0], g[:, 1], "w-", lw=2, label="geodesic" if k == 0 else None)
        ax.plot(line[k, :, 0], line[k, :, 1], "r--", lw=1.5, label="straight line" if k == 0 else None)
        ax.plot(*z0[k], "wo", ms=5)
        ax.plot(*z1[k], "ws", ms=5)
    ax.set_title("Latent space of a VAE on the digits: volume measure, geodesics vs straight lines")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.legend(loc="upper right")
    p1 = os.path.join(out_dir, "geodesics_latent.png")
    fig.savefig(p1, dpi=120, bbox_inches="tight")
    plt.close(fig)

    # decoded images along the paths, evenly spaced in Riemannian arc length
    steps = 10
    geo_pts = geo.interpolate(dec, res.curves, steps)
    lin_pts = geo.interpolate(dec, line, steps)
    fig, axes = plt.subplots(2 * n_pairs, steps, figsize=(steps * 0.9, 2 * n_pairs * 0.95))
    with torch.no_grad():
        for k in range(n_pairs):
            for r, (pts, name) in enumerate(((geo_pts, "geodesic"), (lin_pts, "line"))):
                imgs = dec.mean(pts[k]).clamp(0, 1).reshape(steps, 8, 8)
                for s in range(steps):
                    a = axes[2 * k + r, s]
                    a.imshow(imgs[s].numpy(), cmap="gray_r", vmin=0, vmax=1)
                    a.set_xticks([])
                    a.set_yticks([])
                axes[2 * k + r, 0].set_ylabel(f"{k}: {name}", fontsize=7)
    fig.suptitle("Decoded along each geodesic (top) and straight line (bottom), equal Riemannian steps")
    p2 = os.path.join(out_dir, "geodesics_decoded.png")
    fig.savefig(p2, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {p1} and {p2}")
    return [p1, p2]
