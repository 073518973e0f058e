"""Where the fused Glow step forward spends its time on this CPU (C++ backend).

Times, for x and h of shape [32, 48, 32, 32] float32 (the bench's glow_step_affine), on 1 and
on all threads: the fused op in its three modes (0: the channel map alone; 1: + additive
coupling; 2: + affine coupling and log-det), and torch.add(x, h, out=y), which moves the same
18.9 MB as the fused forward. Medians of 60 calls after 3 warm-up calls.

    python scripts/glow_floor.py
"""
from __future__ import annotations

import torch

import latentfast.ops.flows  # noqa: F401  (loads the C++ kernels)
from latentfast.bench.runner import median_ms


def main() -> None:
    if not hasattr(torch.ops.latentfast_cpp, "actnorm_invconv_fwd"):
        raise SystemExit("latentfast._C is not built: pip install --no-build-isolation -e .")
    gen = torch.Generator().manual_seed(0)
    n, c, s = 32, 48, 32
    x = torch.randn(n, c, s, s, generator=gen)
    h = torch.randn(n, c, s, s, generator=gen)
    h_add = h[:, : c // 2].contiguous()
    y = torch.empty_like(x)
    w = torch.linalg.qr(torch.randn(c, c, generator=gen))[0]
    b = 0.1 * torch.randn(c, generator=gen)
    op = torch.ops.latentfast_cpp.actnorm_invconv_fwd
    mbytes = 3 * x.numel() * 4 / 1e6
    mflop = 2 * c * x.numel() / 1e6
    print(f"x, h [32, 48, 32, 32] float32: fused forward moves {mbytes:.1f} MB, map {mflop:.0f} MFLOP")
    all_threads = torch.get_num_threads()
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        copy = median_ms(lambda: torch.add(x, h, out=y), 60)
        m0 = median_ms(lambda: op(x, w, b, None, 0), 60)
        m1 = median_ms(lambda: op(x, w, b, h_add, 1), 60)
        m2 = median_ms(lambda: op(x, w, b, h, 2), 60)
        print(f"{threads} thread(s): add(x, h, out=y) {copy:.3f} ms ({mbytes / copy:.0f} GB/s); "
              f"fused op: map {m0:.3f} ms, + additive coupling {m1:.3f} ms, "
              f"+ affine coupling {m2:.3f} ms")
    torch.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
