"""lu_weight's C++ backward against the reference formula it replaced, in a training step.

Times ops.lu_weight forward + backward of W.mean() + W^-1.mean() (a permutation P, float32,
the C++ backend) with the registered backward calling the C++ kernel (lu_weight_bwd) or the
PyTorch formula (reference.flows.lu_weight_backward), alternating per call in one process.
Prints medians and the median of the paired ratios (formula / kernel).

    python scripts/lu_backward_ab.py [--channels 48 256] [--rounds 400]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import latentfast
from latentfast.bench.runner import alternate_ms, median_ratio
from latentfast.ops import flows as fops
from latentfast.reference import flows as fref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[48, 256])
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    if not hasattr(torch.ops.latentfast_cpp, "lu_weight_bwd"):
        raise SystemExit("latentfast._C is not built: pip install --no-build-isolation -e .")
    kernel = fops._lu_weight_backward
    formula = lambda ctx, *a: fref.lu_weight_backward(*a)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    with latentfast.use_backend("cpp"):
        for c in args.channels:
            perm = torch.eye(c)[torch.randperm(c, generator=gen)]
            scale = 0.1 * min(1.0, 3.0 / c ** 0.5)
            lower = (scale * torch.randn(c, c, generator=gen)).requires_grad_()
            upper = (scale * torch.randn(c, c, generator=gen)).requires_grad_()
            sign_s = torch.ones(c)
            log_abs_s = (0.1 * torch.randn(c, generator=gen)).requires_grad_()

            def step() -> None:
                w, w_inv, _ = fops.lu_weight(perm, lower, upper, sign_s, log_abs_s)
                (w.mean() + w_inv.mean()).backward()
                lower.grad = upper.grad = log_abs_s.grad = None

            backward = {"formula": formula, "kernel": kernel}

            def before(name: str) -> None:  # the backward switched, then one untimed step with it
                fops._lu_weight_backward = backward[name]
                step()
            try:
                times = alternate_ms({"formula": step, "kernel": step}, args.rounds, warmup=0, before=before)
            finally:
                fops._lu_weight_backward = kernel
            print(f"C={c:4d}: fwd+bwd with the formula {1e3 * statistics.median(times['formula']):7.1f} us, "
                  f"with the kernel {1e3 * statistics.median(times['kernel']):7.1f} us, "
                  f"ratio {median_ratio(times, 'formula', 'kernel'):.2f}")


if __name__ == "__main__":
    main()
