"""`python -m latentfast demo dynamics`: a latent sequence model of a pendulum.

Trains LatentSequenceModel (GRU encoder -> z -> GRU decoder) on generated pendulum frames
(16 x 16 images): the encoder sees the first half of each window, the decoder redraws it and
forecasts the second half. Writes four PNGs:
- dynamics_reconstruction.png: true frames over reconstructions and forecasts;
- dynamics_traversals.png: the decoded motion (bob trails, time-coloured) as each latent
  dimension is varied, dimensions ranked by KL;
- dynamics_latents.png: KL and posterior variance per dimension (which changes are likely),
  the posterior means of the two leading dimensions coloured by the true initial angle and
  velocity, and the forecast error per step;
- dynamics_samples.png: motions drawn from the prior (LatentSequenceModel.sample) beside
  true ones, as bob trails.
"""
from __future__ import annotations

import os
import time

import torch

from latentfast.data._cpu import made_on_cpu
from latentfast.rnn.latent import (LatentSequenceModel, fit_latent_sequence, pendulum_windows, position_error,
                                   rank_latents)

SIZE, N_STEPS, N_OBS = 16, 40, 20


def _trail(frames: torch.Tensor):
    """[T, size, size] (or [T, size^2]) -> an RGB image with frame t coloured from blue (start) to red (end)."""
    import numpy as np

    f = frames.reshape(-1, SIZE, SIZE).clamp(0, 1).numpy()
    t = np.linspace(0, 1, len(f))[:, None, None]
    rgb = np.stack([(f * t).max(0), (f * 0.3).max(0), (f * (1 - t)).max(0)], -1)
    return np.clip(rgb / max(rgb.max(), 1e-6), 0, 1)


@made_on_cpu
def run(out_dir: str = "demo_out", epochs: int = 150, hidden: int = 64, latent: int = 4, beta: float = 0.1, seed: int = 0,
        progress: bool = True) -> list[str]:
    """Train, evaluate, plot; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    train, _ = pendulum_windows(512, N_STEPS, SIZE, seed=seed)
    test, test_states = pendulum_windows(64, N_STEPS, SIZE, seed=seed + 1)
    train, test = (f.reshape(len(f), N_STEPS, SIZE, SIZE) for f in (train, test))  # image frames [B, T, H, W]
    model = LatentSequenceModel((SIZE, SIZE), latent=latent, hidden=hidden)
    t0 = time.perf_counter()
    hist = fit_latent_sequence(model, train, N_OBS, epochs=epochs, beta=beta, warmup=min(20, epochs), lr=3e-3, seed=seed,
                               progress=progress)
    print(f"trained the latent sequence model in {time.perf_counter() - t0:.1f} s (final loss {hist[-1]:.1f})")
    model.eval()
    with torch.no_grad():
        logits, _, _ = model(test, N_OBS, sample=False)
    err = position_error(logits, test, SIZE)
    rank = rank_latents(model, test, N_OBS)
    print(f"bob position error: {err[:N_OBS].mean():.2f} px reconstructed, {err[N_OBS:].mean():.2f} px forecast "
          f"(frames are {SIZE} px)")
    print("KL per latent dimension:", [round(v, 3) for v in rank["kl"].tolist()])
    paths = []

    # reconstructions and forecasts
    show, steps = 3, list(range(0, N_STEPS, 4))
    fig, axes = plt.subplots(2 * show, len(steps), figsize=(len(steps) * 0.9, 2 * show * 0.95))
    for s in range(show):
        for j, t in enumerate(steps):
            for r, img in enumerate((test[s, t], torch.sigmoid(logits[s, t]))):
                ax = axes[2 * s + r, j]
                ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel("true" if r == 0 else "model", fontsize=7)
                if s == 0 and r == 0:
                    ax.set_title(f"t={t}" + (" (forecast)" if t >= N_OBS else ""), fontsize=6)
    fig.suptitle(f"pendulum: encoder sees t < {N_OBS}; decoder reconstructs, then forecasts", fontsize=8)
    paths.append(os.path.join(out_dir, "dynamics_reconstruction.png"))
    fig.savefig(paths[-1], dpi=130, bbox_inches="tight")
    plt.close(fig)

    # latent traversals, dimensions ranked by KL
    values = torch.linspace(-2.5, 2.5, 7)
    with torch.no_grad():
        mu, _ = model.encode(test[:1, :N_OBS])
    fig, axes = plt.subplots(latent, len(values), figsize=(len(values) * 1.1, latent * 1.15))
    for row, dim in enumerate(rank["order"].tolist()):
        z = mu.repeat(len(values), 1)
        z[:, dim] = values
        with torch.no_grad():
            frames = torch.sigmoid(model.decode(z, N_STEPS))
        for j in range(len(values)):
            ax = axes[row, j]
            ax.imshow(_trail(frames[j]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"z{dim}\nKL {rank['kl'][dim]:.2f}", fontsize=7)
            if row == 0:
                ax.set_title(f"{values[j]:+.1f}", fontsize=7)
    fig.suptitle("decoded motion (blue -> red) while one latent dimension varies", fontsize=8)
    paths.append(os.path.join(out_dir, "dynamics_traversals.png"))
    fig.savefig(paths[-1], dpi=130, bbox_inches="tight")
    plt.close(fig)

    # which latent changes are likely; what the leading dimensions encode; forecast error
    with torch.no_grad():
        mu_all, _ = model.encode(test[:, :N_OBS])
    a, b = rank["order"][:2].tolist()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    idx = torch.arange(latent).numpy()
    axes[0].bar(idx - 0.2, rank["kl"].numpy(), 0.4, label="KL to prior")
    axes[0].bar(idx + 0.2, rank["posterior_var"].numpy(), 0.4, label="posterior variance")
    axes[0].set_xticks(idx.tolist())
    axes[0].set_xlabel("latent dimension")
    axes[0].legend(fontsize=7)
    axes[0].set_title("used dimensions: high KL, small variance", fontsize=9)
    for ax, k, name in ((axes[1], 0, "initial angle"), (axes[2], 1, "initial velocity")):
        sc = ax.scatter(mu_all[:, a].numpy(), mu_all[:, b].numpy(), c=test_states[:, 0, k].numpy(), cmap="coolwarm", s=14)
        ax.set_xlabel(f"z{a}")
        ax.set_ylabel(f"z{b}")
        ax.set_title(f"posterior means, coloured by {name}", fontsize=9)
        fig.colorbar(sc, ax=ax)
    axes[3].plot(err.numpy(), marker=".")
    axes[3].axvline(N_OBS - 0.5, color="k", ls="--", lw=0.8)
    axes[3].set_xlabel("time step")
    axes[3].set_ylabel("bob position error (px)")
    axes[3].set_title("reconstruction | forecast", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "dynamics_latents.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # motions the model finds likely: decoded prior draws beside true motions
    n_show = 8
    samples = model.sample(n_show, N_STEPS)
    fig, axes = plt.subplots(2, n_show, figsize=(n_show * 1.1, 2 * 1.2))
    for r, (rows, name) in enumerate(((test[:n_show], "true"), (samples, "prior\nsamples"))):
        for j in range(n_show):
            ax = axes[r, j]
            ax.imshow(_trail(rows[j]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{N_STEPS}-step motions (blue -> red): test windows and decoded z ~ N(0, I)", fontsize=8)
    paths.append(os.path.join(out_dir, "dynamics_samples.png"))
    fig.savefig(paths[-1], dpi=130, bbox_inches="tight")
    plt.close(fig)
    for p in paths:
        print("wrote", p)
    return paths
