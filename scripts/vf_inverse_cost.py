"""What a differentiable slow direction of the vector flows costs on this machine.

An IAF's log_prob runs vector_flow_stack_inverse. Without gradients (torch.no_grad) that is
one kernel call; with gradients wanted the same kernel call plus, in the backward, the
implicit-function derivatives: per step up to n_passes + 1 vector-Jacobian products through
the step's MLP (see latentfast.ops.vector_flows._ImplicitInverse).
Prints the medians of 5 calls of each for B = 1024, d = 32, H = 256, K = 8.

    python scripts/vf_inverse_cost.py
"""
from __future__ import annotations

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

    print(f"IAF log_prob, B={b} d={d} H=256 K=8: without gradients (kernel) {median_ms(no_grad, 5, warmup=1):.1f} ms; "
          f"forward+backward with gradients {median_ms(with_grad, 5, warmup=1):.1f} ms")


if __name__ == "__main__":
    main()
