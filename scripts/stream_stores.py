"""Streaming against normal stores in the C++ Glow step kernels (LATENTFAST_STREAM_STORES).

For x and h of shape [N, 48, 32, 32] float32 (N = 32 is the bench's glow_step_affine), times
the fused forward (actnorm_invconv_fwd, affine coupling) and backward (actnorm_invconv_bwd)
with LATENTFAST_STREAM_STORES=0 and =1 in alternating calls in one process, alone and with
each output summed right after (a reader that wants the output back from cache, as the
next layer does). Prints medians and the median of the paired ratios (never / always: above
1 means streaming is faster), and what `auto` picks at that size on this machine.

With --case: the bench's glow_step_affine instead ([32, 48, 32, 32]; the suite's fwd and
fwd+bwd callables), LATENTFAST_STREAM_STORES=0 against auto, with the eager reference timed in
the same rounds (x eager per setting).

    python scripts/stream_stores.py [--batches 4 8 16 32 64] [--rounds 60] [--case]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess

import torch

import latentfast.ops.flows  # noqa: F401  (loads the C++ kernels)
from latentfast.bench.runner import alternate_ms, median_ratio, pass_callable, restored_env


def _paired(fns: dict[str, object], rounds: int) -> dict[str, list[float]]:
    """alternate_ms over fns; a key that is a setting ("0", "1", "auto") is put in
    LATENTFAST_STREAM_STORES for its call, any other key runs under "auto"."""
    def setting(k: str) -> None:
        os.environ["LATENTFAST_STREAM_STORES"] = k if k in ("0", "1", "auto") else "auto"
    return alternate_ms(fns, rounds, before=setting)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--case", action="store_true", help="time the bench case glow_step_affine, 0 vs auto")
    args = ap.parse_args()
    if args.case:
        _bench_case(args.rounds)
        return
    cpp = torch.ops.latentfast_cpp
    if not hasattr(cpp, "actnorm_invconv_fwd"):
        raise SystemExit("latentfast._C is not built: pip install --no-build-isolation -e .")
    gen = torch.Generator().manual_seed(0)
    c, s = 48, 32
    w = torch.linalg.qr(torch.randn(c, c, generator=gen))[0]
    b = 0.1 * torch.randn(c, generator=gen)
    print(f"{torch.get_num_threads()} threads; ratio = never / always (paired median), > 1: streaming faster")
    with restored_env("LATENTFAST_STREAM_STORES"):
        for n in args.batches:
            x = torch.randn(n, c, s, s, generator=gen)
            h = torch.randn(n, c, s, s, generator=gen)
            y, _ = cpp.actnorm_invconv_fwd(x, w, b, h, 2)
            gy, gld = torch.randn(n, c, s, s, generator=gen), torch.randn(n, generator=gen)

            def fwd(read: bool):
                out = cpp.actnorm_invconv_fwd(x, w, b, h, 2)
                if read:
                    out[0].sum()

            def bwd(read: bool):
                out = cpp.actnorm_invconv_bwd(gy, gld, x, w, b, h, 2, y)
                if read:
                    out[0].sum()
                    out[3].sum()

            for name, fn, out_mb in (("forward", fwd, y.nbytes / 1e6), ("backward", bwd, 2 * y.nbytes / 1e6)):
                auto = "stream" if _auto_streams(int(out_mb * 1e6)) else "normal"
                for read in (False, True):
                    t = _paired({"0": lambda: fn(read), "1": lambda: fn(read)}, args.rounds)
                    print(f"N={n:3d} {name:8s} out {out_mb:5.1f} MB {'read after' if read else 'alone     '}: "
                          f"normal {statistics.median(t['0']):6.3f} ms, streaming {statistics.median(t['1']):6.3f} "
                          f"ms, ratio {median_ratio(t, '0', '1'):.2f} (auto: {auto})")


def _bench_case(rounds: int) -> None:
    from latentfast.bench.cases import make_cases

    case = next(c for c in make_cases(torch.device("cpu"), False) if c.name == "glow_step_affine")
    with restored_env("LATENTFAST_STREAM_STORES"):
        for name in ("fwd", "fwd+bwd"):
            fast, eager = pass_callable(case, name, case.fast), pass_callable(case, name, case.eager)
            # the eager reference in the same rounds, as the bench interleaves it (it evicts
            # the kernel's data from the caches between calls)
            with torch.no_grad() if name == "fwd" else contextlib.nullcontext():
                t = _paired({"0": fast, "auto": fast, "eager": eager}, rounds)
            x_eager = {k: median_ratio(t, "eager", k) for k in ("0", "auto")}
            print(f"glow_step_affine {name:7s}: normal {statistics.median(t['0']):6.3f} ms "
                  f"({x_eager['0']:.2f}x eager), auto {statistics.median(t['auto']):6.3f} ms "
                  f"({x_eager['auto']:.2f}x eager), ratio {median_ratio(t, '0', 'auto'):.2f}")


def _auto_streams(out_bytes: int) -> bool:
    """Whether `auto` streams these outputs: csrc/common/stream.h's rule (at least the
    L2 caches of the threads together), restated."""
    try:  # glibc's sysconf(_SC_LEVEL2_CACHE_SIZE), which Python's os.sysconf does not name
        l2 = int(subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True).stdout)
    except (OSError, ValueError):
        l2 = -1
    l2 = l2 if l2 > 0 else 1 << 20
    return out_bytes >= l2 * torch.get_num_threads()


if __name__ == "__main__":
    main()
