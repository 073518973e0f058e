"""Paired timing of geodesic solves with this checkout's batched L-BFGS against the one at
another git revision (latentfast/geometry/core.py's _batched_lbfgs there, swapped in).

On the geodesics_1000 problem (the digits VAE trained as the benchmark trains it) at 1, 8
and 1000 pairs: interleaved rounds, medians, and whether both give the same curves. With
--whole, the whole solve of that revision (its core.geodesic, _relax and _batched_lbfgs; the
ops of this checkout) against this checkout's.

    python scripts/lbfgs_ab.py --rev HEAD~1 [--rounds 10] [--whole]
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

from latentfast import geometry as geo
from latentfast.bench.geodesics import trained_digits_vae
from latentfast.geometry import core


def _solver_at(rev: str):
    root = pathlib.Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:latentfast/geometry/core.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "core_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("core_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["core_at_rev"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD~1")
    ap.add_argument("--rounds", type=int, default=10, help="rounds at 1 and 8 pairs (1000 pairs: a third)")
    ap.add_argument("--whole", action="store_true",
                    help="swap the revision's whole geodesic solve in, not only its _batched_lbfgs")
    args = ap.parse_args()
    mine, theirs = core._batched_lbfgs, _solver_at(args.rev)
    solvers = {"this checkout": mine, args.rev: theirs._batched_lbfgs}
    solves = {"this checkout": geo.geodesic, args.rev: theirs.geodesic if args.whole else geo.geodesic}
    model, _, _, z = trained_digits_vae(progress=False)
    dec = model.decoder
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    try:
        for n in (1, 8, 1000):
            gen = torch.Generator().manual_seed(1)  # the benchmark's pair draw
            i = torch.randint(z.shape[0], (n,), generator=gen)
            j = torch.randint(z.shape[0], (n,), generator=gen)
            j = torch.where(i == j, (j + 1) % z.shape[0], j)
            z0, z1 = z[i].detach(), z[j].detach()
            geo.geodesic(z0, z1, dec)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in solvers}
            curves = {}
            names = list(solvers)
            for r in range(args.rounds if n < 1000 else max(args.rounds // 3, 2)):
                for name in (names if r % 2 == 0 else names[::-1]):
                    core._batched_lbfgs = mine if args.whole else solvers[name]
                    t = time.perf_counter()
                    curves[name] = solves[name](z0, z1, dec).curves
                    times[name].append(1e3 * (time.perf_counter() - t))
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            a, b = med[names[0]], med[names[1]]
            print(f"{n} pairs: this checkout {a:.1f} ms, {args.rev} {b:.1f} ms ({b / a:.2f}x); "
                  f"same curves: {torch.equal(*curves.values())}", flush=True)
    finally:
        core._batched_lbfgs = solvers["this checkout"]


if __name__ == "__main__":
    main()
