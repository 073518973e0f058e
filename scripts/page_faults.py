"""Minor page faults per call of the bench's CPU cases: eager, torch.compile and latentfast.

glibc's malloc returns large freed blocks to the OS (blocks above its mmap threshold are
unmapped on free; the heap's top is trimmed), so a loop that allocates big tensors every
step first-touches fresh pages every step: one minor page fault per 4 KiB page, each a trip
into the kernel that zero-fills the page. The count does not depend on how busy a shared
machine is, so it explains timing differences that wall time alone cannot. Run it with the C
library's defaults and again with the allocator keeping freed memory:

    python scripts/page_faults.py [--cases glow_step_affine curve_energy ...] [--calls 10]
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python scripts/page_faults.py

Per case and pass (the suite's own fwd and fwd+bwd callables), after 3 warm-up calls of each
implementation, the mean of getrusage's ru_minflt over `--calls` calls, and the mean time of
those calls (one process, implementations one after another: a rough figure; the bench's
interleaved rounds give the timings to quote).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from latentfast.bench.cases import make_cases
from latentfast.bench.runner import allocator_settings, format_allocator, pass_callable

DEFAULT_CASES = ("glow_step_affine", "actnorm_invconv [32, 48, 32, 32] float32",
                 "curve_energy B=256 T=32 2-256-256-784+RBF", "gru_sequence T=100 B=64 I=32 H=256",
                 "vector_flow_stack B=4096 d=32 H=256 K=8")


def faults_per_call(fn, calls: int) -> tuple[float, float]:
    """(minor page faults, ms) per call of fn, means over `calls` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return (f1 - f0) / calls, (t1 - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="bench case names")
    ap.add_argument("--calls", type=int, default=10, help="timed calls per implementation and pass")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args()
    cases = {c.name: c for c in make_cases(torch.device("cpu"), False)}
    unknown = [n for n in args.cases if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(cases)}")
    alloc = format_allocator(allocator_settings(), "C library defaults")
    print(f"allocator: {alloc}; {torch.get_num_threads()} threads; minor page faults (4 KiB pages) "
          f"and ms per call, means of {args.calls} calls")
    for name in args.cases:
        case = cases[name]
        impls = {"eager": case.eager, "latentfast": case.fast}
        if case.compile and not args.no_compile:
            impls["compile"] = torch.compile(case.eager)
        for pass_name in case.passes:
            parts = []
            for label, fn in impls.items():
                call = pass_callable(case, pass_name, fn)
                with torch.set_grad_enabled(pass_name != "fwd"):  # fwd without autograd, as the bench runs it
                    faults, ms = faults_per_call(call, args.calls)
                parts.append(f"{label} {faults:7.0f} faults {ms:8.2f} ms")
            print(f"{name[:40]:40s} {pass_name:8s} " + " | ".join(parts))


if __name__ == "__main__":
    main()
