"""What a geodesic solve (geometry.geodesic) costs on this machine at few and many pairs, and
what the last-layer pin saves.

Two decoders with random weights (seed 0): 2-128-128-64 (the geodesics_1000 shape; its last
layer is narrower than its input, so no QR) and 2-256-256-784 with an identity output (the
digits shape, whose last layer runs as R of W_L = Q R). For each, the median of --reps
solves of 1, 8 and 200 random pairs (T = 32, default tolerance). Then paired, interleaved
rounds (medians of --pairs each):
- 2-128-128-64, 1 / 8 / 200 pairs: the solver's per-iteration steps in C++ (core._CppSteps,
  what it uses on CPU with latentfast._C) against the same steps as PyTorch operations
  (core._TorchSteps, the path on other devices and under the reference backend);
- 2-256-256-784, 1 / 8 pairs: ops.geometry.last_layer_fixed active (what geodesic does: the
  QR cache is checked once per solve) against a no-op (the cache's torch.equal check on
  every energy call);
- both decoders, 8 / 200 pairs: the energy pipeline's work buffers kept for the whole solve
  (ops.geometry.reuse_buffers, what geodesic does) against allocated afresh on every call
  (each large CPU allocation faults in new pages).

With --digits N, only one comparison, on the geodesics_1000 benchmark's problem (the digits
VAE trained as the benchmark trains it, N of its pairs), --rounds interleaved rounds, with
the page faults and system time of each solve: --compare buffers (the last one above),
--compare rows (the CPU curve pipelines' chunks of at most ops.geometry._CPU_CHUNK_ROWS
points against chunks bounded by _CHUNK_ELEMS elements only) or --compare precondition
(geodesic's default L-BFGS in Laplacian coordinates against precondition=False, with the
iterations, how far the two solutions' lengths are apart (they can end in different local
minima) and how much energy each left: its result continued to tol 1e-10) or --compare small
(curve energies of few points as one C++ call, latentfast_cpp::curve_energy_small, against
the chunk loop of ops.geometry._curve_native; ops.geometry._SMALL_PATH) or --compare
first-step (the first L-BFGS step capped so that no point moves more than
geometry.core._FIRST_STEP times its curve's latent length, against uncapped; lengths and the
energy each left, as for precondition).

    python scripts/geodesic_cost.py [--reps 5] [--pairs 15]
    python scripts/geodesic_cost.py --digits 1000 [--compare buffers|rows|precondition|small|first-step] [--rounds 4]
                                    [--segments 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

from latentfast import geometry as geo
from latentfast.geometry import core
from latentfast.ops import geometry as geo_ops
from latentfast.vae import GaussianMLPDecoder


def _median_ms(times: list[float]) -> float:
    return 1e3 * sorted(times)[len(times) // 2]


def _solve_s(z0: torch.Tensor, z1: torch.Tensor, dec) -> float:
    t = time.perf_counter()
    geo.geodesic(z0, z1, dec)
    return time.perf_counter() - t


def _energy_left(res, dec) -> torch.Tensor:
    """Relative energy a solve left: each result continued by the preconditioned solver
    (geodesic's own, from the result's curves) to tol = 1e-10 (up to 3000 iterations);
    (E - E_continued) / E per pair."""
    c = res.curves
    more = core._relax(c[:, 0], c[:, -1], c, dec, 1e-10, 3000, precondition=True)
    return (res.energies - more.energies) / res.energies


def _digits(n_pairs: int, rounds: int, compare: str, n_segments: int = 32, seed: int = 0) -> None:
    """Two settings, paired, on the geodesics_1000 problem: work buffers kept against fresh
    per call, chunks of at most _CPU_CHUNK_ROWS points against chunks bounded by
    _CHUNK_ELEMS only, or the solver with and without its Laplacian preconditioning."""
    from latentfast.bench.geodesics import trained_digits_vae

    model, _, _, z = trained_digits_vae(seed=seed, progress=False)
    dec = model.decoder
    gen = torch.Generator().manual_seed(seed + 1)  # the benchmark's pair draw (at seed 0)
    i = torch.randint(z.shape[0], (n_pairs,), generator=gen)
    j = torch.randint(z.shape[0], (n_pairs,), generator=gen)
    j = torch.where(i == j, (j + 1) % z.shape[0], j)
    z0, z1 = z[i].detach(), z[j].detach()
    # mode -> (ops.geometry attribute and its value, or None; geodesic's keyword arguments)
    if compare == "buffers":
        modes = {"buffers kept": ((geo_ops, "_scratch_for", geo_ops._scratch_for), {}),
                 "fresh per call": ((geo_ops, "_scratch_for", lambda t: None), {})}
    elif compare == "rows":
        modes = {f"chunks <= {geo_ops._CPU_CHUNK_ROWS} rows":
                 ((geo_ops, "_CPU_CHUNK_ROWS", geo_ops._CPU_CHUNK_ROWS), {}),
                 "chunks by elements only": ((geo_ops, "_CPU_CHUNK_ROWS", 1 << 62), {})}
    elif compare == "small":
        modes = {"one C++ call when small": ((geo_ops, "_SMALL_PATH", True), {}),
                 "chunk loop": ((geo_ops, "_SMALL_PATH", False), {})}
    elif compare == "first-step":
        modes = {f"first step capped at {core._FIRST_STEP} of the length": ((core, "_FIRST_STEP", core._FIRST_STEP),
                                                                             {}),
                 "first step uncapped": ((core, "_FIRST_STEP", 0.0), {})}
    else:
        modes = {"preconditioned": (None, {}), "on the points": (None, {"precondition": False})}
    saved = {patch[:2]: getattr(*patch[:2]) for patch, _ in modes.values() if patch}
    times: dict[str, list[float]] = {m: [] for m in modes}
    results = {}
    geo.geodesic(z0[:50], z1[:50], dec, n_segments=n_segments)  # warm-up
    try:
        for r in range(rounds):
            for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                patch, kwargs = modes[mode]
                if patch:
                    setattr(*patch)
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                t = time.perf_counter()
                res = geo.geodesic(z0, z1, dec, n_segments=n_segments, max_iter=max(500, 4 * n_segments), **kwargs)
                dt = time.perf_counter() - t
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                times[mode].append(dt)
                results[mode] = res
                print(f"{mode}: {1e3 * dt / n_pairs:.2f} ms per geodesic, {ru1.ru_minflt - ru0.ru_minflt} minor "
                      f"page faults, system time {ru1.ru_stime - ru0.ru_stime:.2f} s, iterations: mean "
                      f"{res.iterations.double().mean():.1f}, converged {res.converged.double().mean():.1%}",
                      flush=True)
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)
    (a, ta), (b, tb) = ((m, _median_ms(times[m]) / n_pairs) for m in modes)
    ra, rb = results.values()
    rel = (ra.lengths - rb.lengths) / rb.lengths
    print(f"digits VAE, {n_pairs} pairs, T = {n_segments}, paired medians: {a} {ta:.2f} ms, {b} {tb:.2f} ms per geodesic "
          f"({tb / ta:.2f}x); lengths equal: {torch.equal(ra.lengths, rb.lengths)}; {a} shorter by more than "
          f"0.1% on {int((rel < -1e-3).sum())} pairs, longer on {int((rel > 1e-3).sum())}, sum of lengths "
          f"{float(ra.lengths.sum()):.2f} vs {float(rb.lengths.sum()):.2f}")
    if compare in ("precondition", "first-step"):
        for name, res in results.items():
            left = _energy_left(res, dec)
            print(f"{name}: energy left (continued to tol 1e-10): median {float(left.median()):.1e}, max "
                  f"{float(left.max()):.1e}, above 1e-4 on {int((left > 1e-4).sum())} pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--digits", type=int, default=None, metavar="N",
                    help="only the --compare pairing, on N pairs of the digits VAE")
    ap.add_argument("--compare", choices=["buffers", "rows", "precondition", "small", "first-step"], default="buffers",
                    help="with --digits: kept / fresh work buffers, the CPU chunk row cap on / off, "
                         "geodesic(precondition=True / False), or the one-call C++ pipeline for few points "
                         "against the chunk loop, or the first L-BFGS step capped / uncapped")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the --digits comparison")
    ap.add_argument("--segments", type=int, default=32,
                    help="n_segments of the --digits solves (max_iter: 500 or 4 n_segments if larger)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the --digits VAE's training and pair draw (0: the benchmark's)")
    args = ap.parse_args()
    if args.digits is not None:
        _digits(args.digits, args.rounds, args.compare, args.segments, args.seed)
        return
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
    pick_steps = core._lbfgs_steps
    pinned = geo_ops.last_layer_fixed
    scratch = geo_ops._scratch_for
    variants = [("2-128-128-64", (1, 8, 200), {"C++ steps": (core, "_lbfgs_steps", pick_steps),
                                                "PyTorch steps": (core, "_lbfgs_steps",
                                                                  lambda x: core._TorchSteps)}),
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
                core._lbfgs_steps, geo_ops.last_layer_fixed, geo_ops._scratch_for = pick_steps, pinned, scratch
            print(f"{name}, {b} pairs, paired: " + ", ".join(f"{k} {_median_ms(v):.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
