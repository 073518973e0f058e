"""How much geometry.knn's chord pruning saves on the geodesics_1000 problem's digits VAE:
the k geodesically nearest of --train data latents for --query others, by knn (solves each
query's k chord-nearest pairs, then only the pairs whose feature chord is within the bound)
against the top k of the full distance_matrix; pairs solved, time, and whether both give
the same neighbours.

    python scripts/knn_cost.py [--train 1000] [--query 50] [--k 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from latentfast import geometry as geo
from latentfast.bench.geodesics import trained_digits_vae
from latentfast.geometry import core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--query", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    model, _, _, z = trained_digits_vae(progress=False)
    dec = model.decoder
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(3))
    train, query = z[perm[:args.train]].detach(), z[perm[args.train:args.train + args.query]].detach()
    solved = []
    real = core.geodesic

    def counting(z0, z1, *a, **kw):
        solved.append(len(z0))
        return real(z0, z1, *a, **kw)

    core.geodesic = counting
    try:
        t = time.perf_counter()
        d, i = geo.knn(dec, query, train, k=args.k)
        t_knn = time.perf_counter() - t
        n_knn = sum(solved)
        solved.clear()
        t = time.perf_counter()
        full = geo.distance_matrix(dec, query, train)
        t_full = time.perf_counter() - t
        n_full = sum(solved)
    finally:
        core.geodesic = real
    fd, fi = full.topk(args.k, dim=1, largest=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.query} queries, {args.train} "
          f"training points, k = {args.k}")
    print(f"knn: {n_knn} pairs solved in {t_knn:.2f} s; distance_matrix: {n_full} pairs in {t_full:.2f} s "
          f"({t_full / t_knn:.1f}x); same neighbours: {torch.equal(i, fi)}; max distance difference "
          f"{float((d - fd).abs().max()):.1e}")


if __name__ == "__main__":
    main()
