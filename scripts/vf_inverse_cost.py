"""What a differentiable slow direction of the vector flows costs on this machine.

An IAF's log_prob runs vector_flow_stack_inverse. Without gradients (torch.no_grad) that is
one kernel call; with gradients wanted the same kernel call plus, in the backward, the
implicit-function derivatives (see latentfast.ops.vector_flows._ImplicitInverse): on the cpp
backend one transposed solve per step in C++ (vector_flow_inv_grad) and the stack's backward;
where that op declines (or on the other backends), up to n_passes + 1 vector-Jacobian
products through each step's MLP. Prints, for B = 1024, d = 32, H = 256, K = 8, the medians
of 5 calls without gradients and with them, then a paired comparison of the two backward
paths (10 alternating rounds of 3 calls; the iterations forced by making the C++ op
decline) with the largest relative difference of the parameter gradients.

    python scripts/vf_inverse_cost.py
"""
from __future__ import annotations

import statistics
import time

import torch

from latentfast.bench.runner import median_ms
from latentfast.flows import vector as vf


def main() -> None:
    torch.manual_seed(0)
    d, b = 32, 1024
    flow = vf.Flow(d, [vf.IAF(d, 256, n_steps=8)])
    x = torch.randn(b, d)

    def no_grad():
        with torch.no_grad():
            flow.log_prob(x)

    def with_grad():
        flow.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        return [p.grad.clone() for p in flow.parameters()]

    print(f"IAF log_prob, B={b} d={d} H=256 K=8: without gradients (kernel) {median_ms(no_grad, 5, warmup=1):.1f} ms; "
          f"forward+backward with gradients {median_ms(with_grad, 5, warmup=1):.1f} ms")

    cpp = torch.ops.latentfast_cpp
    one_pass = cpp.vector_flow_inv_grad

    def declined(grad_x, *args):  # what the op returns for a step without a dependency order
        return grad_x.new_empty(0)

    paths = {"one C++ pass per step": one_pass, "iterations": declined}
    times: dict[str, list[float]] = {name: [] for name in paths}
    grads = {}
    try:
        for rnd in range(10):
            for name in (list(paths) if rnd % 2 == 0 else list(paths)[::-1]):
                cpp.vector_flow_inv_grad = paths[name]
                grads[name] = with_grad()
                t0 = time.perf_counter()
                for _ in range(3):
                    with_grad()
                times[name].append((time.perf_counter() - t0) / 3 * 1e3)
    finally:
        cpp.vector_flow_inv_grad = one_pass
    fast, slow = (statistics.median(times[name]) for name in paths)
    diff = max(((a - e).abs().max() / e.abs().max()).item()
               for a, e in zip(grads["one C++ pass per step"], grads["iterations"]))
    print(f"forward+backward, paired: one C++ pass per step {fast:.1f} ms, iterations {slow:.1f} ms, "
          f"{slow / fast:.2f}x; largest relative gradient difference {diff:.1e}")


if __name__ == "__main__":
    main()
