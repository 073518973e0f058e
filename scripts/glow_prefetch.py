"""The Glow step kernels' software prefetch (LATENTFAST_GLOW_PREFETCH) forced on and off.

The bench's glow_step_affine ([32, 48, 32, 32] float32, the suite's fwd and fwd+bwd
callables), C++ backend, alternating 0 and 1 per call in one process, in two settings:
cold, the eager reference run before every call (as in the bench's interleaved rounds: the
inputs come from memory), and hot, the calls back to back (the inputs stay in L3). Prints
medians and the median of the paired ratios (off / on: above 1, prefetching is faster).

With --op: the fused op alone (actnorm_invconv_fwd / _bwd, affine), back to back, for
x and h of [N, 48, 32, 32], N = 1, 2, 4, 8, 16 (inputs in cache; `auto` prefetches from the
threads' L2 caches together on).

    python scripts/glow_prefetch.py [--rounds 30] [--op]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics

import torch

import latentfast
from latentfast.bench.cases import make_cases
from latentfast.bench.runner import alternate_ms, median_ratio, pass_callable, restored_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--op", action="store_true", help="the op alone, back to back, at several batch sizes")
    args = ap.parse_args()
    if args.op:
        _op_alone(max(args.rounds, 100))
        return
    if not hasattr(torch.ops.latentfast_cpp, "actnorm_invconv_fwd"):
        raise SystemExit("latentfast._C is not built: pip install --no-build-isolation -e .")
    case = next(c for c in make_cases(torch.device("cpu"), False) if c.name == "glow_step_affine")
    with restored_env("LATENTFAST_GLOW_PREFETCH"), latentfast.use_backend("cpp"):
        for name in ("fwd", "fwd+bwd"):
            fast, eager = pass_callable(case, name, case.fast), pass_callable(case, name, case.eager)
            with torch.no_grad() if name == "fwd" else contextlib.nullcontext():
                for setting, between in (("cold", eager), ("hot", None)):
                    def before(k: str, between=between) -> None:
                        if between is not None:
                            between()
                        os.environ["LATENTFAST_GLOW_PREFETCH"] = k
                    times = alternate_ms({"0": fast, "1": fast}, args.rounds, before=before)
                    print(f"glow_step_affine {name:7s} {setting}: off {statistics.median(times['0']):6.3f} ms, "
                          f"on {statistics.median(times['1']):6.3f} ms, ratio {median_ratio(times, '0', '1'):.2f}")


def _op_alone(rounds: int) -> None:
    cpp = torch.ops.latentfast_cpp
    gen = torch.Generator().manual_seed(0)
    c, s = 48, 32
    w = torch.linalg.qr(torch.randn(c, c, generator=gen))[0]
    b = 0.1 * torch.randn(c, generator=gen)
    with restored_env("LATENTFAST_GLOW_PREFETCH"):
        for n in (1, 2, 4, 8, 16):
            x, h = torch.randn(n, c, s, s, generator=gen), torch.randn(n, c, s, s, generator=gen)
            y, _ = cpp.actnorm_invconv_fwd(x, w, b, h, 2)
            gy, gld = torch.randn(n, c, s, s, generator=gen), torch.randn(n, generator=gen)
            parts = []
            for name, fn in (("fwd", lambda: cpp.actnorm_invconv_fwd(x, w, b, h, 2)),
                             ("bwd", lambda: cpp.actnorm_invconv_bwd(gy, gld, x, w, b, h, 2, y))):
                times = alternate_ms({"0": fn, "1": fn}, rounds, warmup=0,
                                     before=lambda k: os.environ.__setitem__("LATENTFAST_GLOW_PREFETCH", k))
                parts.append(f"{name} off {statistics.median(times['0']):.3f} ms, "
                             f"on {statistics.median(times['1']):.3f} ms, ratio {median_ratio(times, '0', '1'):.2f}")
            print(f"N={n:2d} (x and h {2 * x.nbytes / 1e6:4.1f} MB): " + " | ".join(parts))


if __name__ == "__main__":
    main()
