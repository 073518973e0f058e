"""Another git revision against this checkout, whole package and C++ extension, on bench cases.

Checks REV out in a git worktree (/tmp/latentfast-ab-<rev>, kept for reuse) and builds its
extension there with this interpreter (setup.py build_ext --inplace). Then alternates child
processes, each importing latentfast from one tree (PYTHONPATH) and timing the cases (the
suite's own fwd and fwd+bwd callables, CPU) with the eager reference run before every call,
as the bench's interleaved rounds do. Prints, per tree, the medians over the processes of
latentfast's time and of its speed-up over eager in the same process.

    python scripts/ext_ab.py --rev 58c5f91 [--cases glow_step_affine] [--processes 3] [--rounds 25]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _child(cases: list[str], rounds: int) -> None:
    import torch

    from latentfast.bench.cases import make_cases
    # the runner's private helpers, not pass_callable: this runs in older revisions' trees too
    from latentfast.bench.runner import _fwd, _fwd_bwd

    out = {}
    for case in make_cases(torch.device("cpu"), False):
        if case.name not in cases:
            continue
        for name in case.passes:
            if name == "fwd":
                fast, eager = _fwd(case.fast, case.inputs), _fwd(case.eager, case.inputs)
            else:
                fast = _fwd_bwd(case.fast, case.inputs, case.grad_inputs)
                eager = _fwd_bwd(case.eager, case.inputs, case.grad_inputs)
            tf, te = [], []
            with torch.no_grad() if name == "fwd" else contextlib.nullcontext():
                for r in range(rounds + 1):
                    t = time.perf_counter()
                    eager()
                    t_e = time.perf_counter() - t
                    t = time.perf_counter()
                    fast()
                    t_f = time.perf_counter() - t
                    if r > 0:  # round 0 warms up
                        tf.append(t_f)
                        te.append(t_e)
            out[f"{case.name} {name}"] = (statistics.median(tf), statistics.median(e / f for e, f in zip(te, tf)))
    print(json.dumps(out))


def _worktree(rev: str) -> pathlib.Path:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = pathlib.Path(f"/tmp/latentfast-ab-{sha}")
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True)
    if not list((tree / "latentfast").glob("_C*.so")):
        print(f"building {sha}'s extension in {tree} ...", flush=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, check=True,
                       stdout=subprocess.DEVNULL)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="HEAD~1")
    ap.add_argument("--cases", nargs="+", default=["glow_step_affine"])
    ap.add_argument("--processes", type=int, default=3, help="child processes per tree, alternating")
    ap.add_argument("--rounds", type=int, default=25, help="timed calls per pass in each process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.cases, args.rounds)
        return
    trees = {args.rev: _worktree(args.rev), "this checkout": ROOT}
    results: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.processes):
        for label, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            res = subprocess.run([sys.executable, str(ROOT / "scripts" / "ext_ab.py"), "--child", "--rounds",
                                  str(args.rounds), "--cases", *args.cases], cwd=tree, env=env, check=True,
                                 capture_output=True, text=True)
            results[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
    for key in results["this checkout"][0]:
        parts = []
        for label, runs in results.items():
            ms = statistics.median(r[key][0] for r in runs) * 1e3
            xs = ", ".join(f"{r[key][1]:.2f}" for r in runs)
            parts.append(f"{label}: {ms:.3f} ms, x eager {xs}")
        print(f"{key}: " + " | ".join(parts))


if __name__ == "__main__":
    main()
