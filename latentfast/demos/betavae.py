"""`python -m latentfast demo betavae`: a beta sweep on the dSprites-like data.

Trains beta-VAEs with beta = 1, 4 and 8, and a beta = 4 VAE whose posterior is refined by
a 2-step IAF (the vector_flow_stack op), on the generated sprites (3 shapes x 4 scales x 8
rotations x 8 x 8 positions, 32x32). Scores each with the BetaVAE, FactorVAE and MIG
metrics and writes:
- betavae_scores.png: the three scores per model;
- betavae_traversal_<model>.png per model: each code dimension (rows, most active first)
  swept over [-2.5, 2.5] around one image's code;
- betavae_scores.json: the scores and final losses.
"""
from __future__ import annotations

import json
import os
import time

import torch

from latentfast.data._cpu import made_on_cpu
from latentfast.data.sprites import make_sprites
from latentfast.vae import VAE, FlowVAE, fit
from latentfast.vae.disentanglement import disentanglement_scores

LATENT, HIDDEN = 6, (256, 128)


def models(seed: int = 0) -> dict[str, torch.nn.Module]:
    out = {}
    for beta in (1.0, 4.0, 8.0):
        torch.manual_seed(seed)
        out[f"beta={beta:g}"] = VAE(1024, LATENT, HIDDEN, "bernoulli", beta, "elu")
    torch.manual_seed(seed)
    out["beta=4 + IAF"] = FlowVAE(1024, LATENT, HIDDEN, "bernoulli", 4.0, "elu", posterior_steps=2, flow_hidden=64)
    return out


@torch.no_grad()
def traversal(model, x0: torch.Tensor, codes: torch.Tensor, path: str, title: str, n_values: int = 9) -> None:
    import matplotlib.pyplot as plt

    z0 = model.embed(x0[None])[0]
    order = codes.std(0).argsort(descending=True)
    values = torch.linspace(-2.5, 2.5, n_values)
    fig, axes = plt.subplots(LATENT, n_values, figsize=(n_values * 0.9, LATENT * 0.95))
    for row, j in enumerate(order.tolist()):
        z = z0.repeat(n_values, 1)
        z[:, j] = values
        imgs = model.decoder.mean(z).view(-1, 32, 32)
        for col in range(n_values):
            ax = axes[row, col]
            ax.imshow(imgs[col].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"z{j}\nstd {codes[:, j].std():.2f}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@made_on_cpu
def run(out_dir: str = "demo_out", epochs: int = 40, seed: int = 0, progress: bool = True) -> list[str]:
    """Train, score, plot; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    data = make_sprites()
    x = data.images.flatten(1)
    results, paths = {}, []
    for name, model in models(seed).items():
        t0 = time.perf_counter()
        hist = fit(model, x, epochs=epochs, batch_size=64, lr=1e-3, seed=seed, progress=progress)
        model.eval()
        scores = disentanglement_scores(model.embed, data, seed=seed)
        with torch.no_grad():
            codes = torch.cat([model.embed(x[i:i + 1024]) for i in range(0, x.shape[0], 1024)])
        results[name] = {**scores, **{k: round(v, 3) for k, v in hist[-1].items()},
                         "train_s": round(time.perf_counter() - t0, 1)}
        print(f"{name:<14} " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
              + f"  (nll {hist[-1]['nll']:.1f}, kl {hist[-1]['kl']:.2f})", flush=True)
        slug = name.replace("=", "").replace(" + ", "_").replace(".", "_")
        path = os.path.join(out_dir, f"betavae_traversal_{slug}.png")
        traversal(model, x[1234], codes, path, f"{name}: latent traversals (rows: code dimensions)")
        paths.append(path)
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / 3
    for i, metric in enumerate(("beta_vae", "factor_vae", "mig")):
        ax.bar([j + i * width for j in range(len(names))], [results[n][metric] for n in names], width, label=metric)
    ax.set_xticks([j + width for j in range(len(names))], names)
    ax.set_ylabel("score")
    ax.set_title(f"Disentanglement on the sprites data ({epochs} epochs, d={LATENT})")
    ax.legend()
    fig.tight_layout()
    score_png = os.path.join(out_dir, "betavae_scores.png")
    fig.savefig(score_png, dpi=100)
    plt.close(fig)
    score_json = os.path.join(out_dir, "betavae_scores.json")
    with open(score_json, "w") as f:
        json.dump({"epochs": epochs, "latent_dim": LATENT, "models": results}, f, indent=1)
    return [score_png, score_json, *paths]
