"""What a geodesic solve (geometry.geodesic) costs on this machine at few and many pairs, and
what the last-layer pin saves.

Two decoders with random weights (seed 0): 2-128-128-64 (the geodesics_1000 shape; its last
layer is narrower than its input, so no QR) and 2-256-256-784 with an identity output (the
digits shape, whose last layer runs as R of W_L = Q R). For each, the median of --reps
solves of 1, 8 and 200 random pairs (T = 32, default tolerance). Then, for the 784 decoder,
paired interleaved solves of 1 and 8 pairs with ops.geometry.last_layer_fixed active (what
geodesic does: the QR cache is checked once per solve) and replaced by a no-op (the cache's
torch.equal check on every energy call), medians of --pairs rounds each.

    python scripts/geodesic_cost.py [--reps 5] [--pairs 15]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from latentfast import geometry as geo
from latentfast.ops import geometry as geo_ops
from latentfast.vae import GaussianMLPDecoder


def _median_ms(times: list[float]) -> float:
    return 1e3 * sorted(times)[len(times) // 2]


def _solve_s(z0: torch.Tensor, z1: torch.Tensor, dec) -> float:
    t = time.perf_counter()
    geo.geodesic(z0, z1, dec)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    decoders = {"2-128-128-64": GaussianMLPDecoder(2, 64, (128, 128)),
                "2-256-256-784": GaussianMLPDecoder(2, 784, (256, 256))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, dec in decoders.items():
        for b in (1, 8, 200):
            z0, z1 = torch.randn(b, 2), torch.randn(b, 2)
            _solve_s(z0, z1, dec)  # warm-up
            times = [_solve_s(z0, z1, dec) for _ in range(args.reps)]
            print(f"{name}: {b:3d} pairs  {_median_ms(times):8.1f} ms")
    dec = decoders["2-256-256-784"]
    pinned = geo_ops.last_layer_fixed
    for b in (1, 8):
        z0, z1 = torch.randn(b, 2), torch.randn(b, 2)
        _solve_s(z0, z1, dec)
        times: dict[str, list[float]] = {"pinned": [], "checked every call": []}
        try:
            for i in range(args.pairs):
                for mode in (("pinned", "checked every call") if i % 2 else ("checked every call", "pinned")):
                    geo_ops.last_layer_fixed = pinned if mode == "pinned" else (
                        lambda w, a: contextlib.nullcontext())
                    times[mode].append(_solve_s(z0, z1, dec))
        finally:
            geo_ops.last_layer_fixed = pinned
        print(f"2-256-256-784, {b} pairs, paired: " +
              ", ".join(f"{k} {_median_ms(v):.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
