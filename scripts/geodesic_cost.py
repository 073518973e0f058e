"""What a geodesic solve (geometry.geodesic) costs on this machine at few and many pairs, and
what the last-layer pin saves.

Two decoders with random weights (seed 0): 2-128-128-64 (the geodesics_1000 shape; its last
layer is narrower than its input, so no QR) and 2-256-256-784 with an identity output (the
digits shape, whose last layer runs as R of W_L = Q R). For each, the median of --reps
solves of 1, 8 and 200 random pairs (T = 32, default tolerance). Then paired, interleaved
rounds (medians of --pairs each):
- 2-128-128-64, 1 / 8 / 200 pairs: the solver's direction by the compact form (what it uses)
  against the two-loop recursion (latentfast.reference.geometry.lbfgs_two_loop, swapped in);
- 2-256-256-784, 1 / 8 pairs: ops.geometry.last_layer_fixed active (what geodesic does: the
  QR cache is checked once per solve) against a no-op (the cache's torch.equal check on
  every energy call);
- both decoders, 8 / 200 pairs: the energy pipeline's work buffers kept for the whole solve
  (ops.geometry.reuse_buffers, what geodesic does) against allocated afresh on every call
  (each large CPU allocation faults in new pages).

    python scripts/geodesic_cost.py [--reps 5] [--pairs 15]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from latentfast import geometry as geo
from latentfast.geometry import core
from latentfast.ops import geometry as geo_ops
from latentfast.reference.geometry import lbfgs_two_loop
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
    compact = core._lbfgs_direction
    pinned = geo_ops.last_layer_fixed
    scratch = geo_ops._scratch_for
    variants = [("2-128-128-64", (1, 8, 200), {"compact form": (core, "_lbfgs_direction", compact),
                                                "two-loop": (core, "_lbfgs_direction", lbfgs_two_loop)}),
                ("2-256-256-784", (1, 8), {"pinned": (geo_ops, "last_layer_fixed", pinned),
                                           "checked every call": (geo_ops, "last_layer_fixed",
                                                                  lambda w, a: contextlib.nullcontext())}),
                *[(name, (8, 200), {"buffers kept": (geo_ops, "_scratch_for", scratch),
                                    "fresh per call": (geo_ops, "_scratch_for", lambda t: None)})
                  for name in decoders]]
    for name, sizes, modes in variants:
        dec = decoders[name]
        for b in sizes:
            z0, z1 = torch.randn(b, 2), torch.randn(b, 2)
            _solve_s(z0, z1, dec)
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            names = list(modes)
            try:
                for i in range(args.pairs if b < 200 else max(args.pairs // 3, 3)):
                    for mode in (names if i % 2 else names[::-1]):
                        obj, attr, fn = modes[mode]
                        setattr(obj, attr, fn)
                        times[mode].append(_solve_s(z0, z1, dec))
            finally:
                core._lbfgs_direction, geo_ops.last_layer_fixed, geo_ops._scratch_for = compact, pinned, scratch
            print(f"{name}, {b} pairs, paired: " + ", ".join(f"{k} {_median_ms(v):.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
