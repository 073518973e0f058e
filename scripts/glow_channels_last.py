"""A whole Glow with its parameters contiguous against the same Glow in channels_last, under
the reference backend (plain PyTorch) and with latentfast's kernels: the bench's glow_model
cases (latentfast/bench/cases.py, model_cases), timed side by side.

`model.to(memory_format=torch.channels_last)` makes the coupling nets' and priors'
convolutions run in oneDNN's channels-last layout on a CPU (cuDNN's NHWC kernels on a GPU);
the flow layers' kernels take either layout. The bench times each case on its own, seconds
apart, so its rows do not compare the two layouts well on a shared machine; this alternates
the four variants (layout x backend) call by call, in a rotating order, and prints each one's
median time and the medians of the per-round ratios:

    python scripts/glow_channels_last.py [--rounds 20] [--fwd] [--hidden 128] [--device cpu]

--fwd times the loss alone under torch.no_grad(); otherwise the loss and every parameter's
gradient (set to None between steps). --hidden sets the coupling nets' width (the bench's
is 128). The page faults of glibc's malloc move these figures on a CPU (docs/PERFORMANCE.md,
"The allocator and page faults"): run it with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
set too.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics

import torch

from latentfast.backend import use_backend
from latentfast.bench.cases import model_cases
from latentfast.bench.runner import allocator_settings, alternate_ms, format_allocator, median_ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fwd", action="store_true", help="the loss alone, under torch.no_grad()")
    ap.add_argument("--hidden", type=int, default=None, help="the coupling nets' width (default: the bench's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="the bench's --quick Glow (a smoke test)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    device = torch.device(args.device)
    glows = [c for c in model_cases(device, args.quick, glow_hidden=args.hidden) if c.op == "glow_model"]
    contiguous, cl = glows
    assert cl.name == contiguous.name + " channels_last"
    x = contiguous.inputs[0]

    def step(model: torch.nn.Module, backend: str | None) -> None:
        """One loss (and backward) of model, on `backend` (None: latentfast's default choice)."""
        with use_backend(backend) if backend else contextlib.nullcontext():
            torch.manual_seed(0)
            if args.fwd:
                with torch.no_grad():
                    model.bits_per_dim(x, n_bins=256)
            else:
                model.bits_per_dim(x, n_bins=256).backward()
                model.zero_grad(set_to_none=True)

    variants = {"reference": (contiguous.model, "reference"), "reference channels_last": (cl.model, "reference"),
                "latentfast": (contiguous.model, None), "latentfast channels_last": (cl.model, None)}
    # (two warm-up rounds: ActNorm is initialised by model_cases)
    times = alternate_ms({k: functools.partial(step, *v) for k, v in variants.items()}, args.rounds, warmup=2,
                         device=device)
    ratio = functools.partial(median_ratio, times)
    alloc = format_allocator(allocator_settings(), "C library defaults")
    print(f"{contiguous.name}, {'fwd' if args.fwd else 'fwd+bwd'}, {args.rounds} rounds, {device}, allocator: {alloc}")
    for name in variants:
        print(f"  {name:26s} {statistics.median(times[name]):9.1f} ms")
    print(f"  channels_last over contiguous: reference {ratio('reference', 'reference channels_last'):.3f}x, "
          f"latentfast {ratio('latentfast', 'latentfast channels_last'):.3f}x")
    print(f"  latentfast over reference: contiguous {ratio('reference', 'latentfast'):.3f}x, channels_last "
          f"{ratio('reference channels_last', 'latentfast channels_last'):.3f}x, both changes "
          f"{ratio('reference', 'latentfast channels_last'):.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
