"""What a differentiable slow direction of the vector flows costs on this machine.

An IAF's log_prob runs vector_flow_stack_inverse. Without gradients (torch.no_grad) that is
one kernel call; with gradients wanted the same kernel call plus, in the backward, the
implicit-function derivatives (see latentfast.ops.vector_flows._ImplicitInverse): on the cpp
backend one transposed solve per step in C++ (vector_flow_inv_grad) and the stack's backward;
where that op declines (or on the other backends), up to n_passes + 1 vector-Jacobian
products through each step's MLP. Prints, for B = 1024, d = 32, H = 256, K = 8, the medians
of 5 calls without gradients and with them, then a paired comparison of the two backward
paths (10 alternating rounds of 3 calls; the iterations forced by making the C++ op
decline) with the largest relative difference of the parameter gradients. With --device
cuda (the Triton backend) the pair is its one-pass solve (a Triton kernel) against the same
iterations (forced by making latentfast.kernels.vector_flows.vector_flow_inv_grad decline),
at d = 32 and d = 64.

    python scripts/vf_inverse_cost.py [--device cuda] [--batch B] [--dims d ...] [--hidden H]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentfast import backend
from latentfast.bench.runner import median_ms
from latentfast.flows import vector as vf


def _paired(paths: dict, run, rounds: int = 10) -> tuple[dict, dict]:
    """Median ms per path over `rounds` alternating rounds of 3 calls, and each path's last
    result. paths: name -> a function that switches to that path."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    results = {}
    for rnd in range(rounds):
        for name in (list(paths) if rnd % 2 == 0 else list(paths)[::-1]):
            paths[name]()
            results[name] = run()
            t0 = time.perf_counter()
            for _ in range(3):
                run()
            _sync()
            times[name].append((time.perf_counter() - t0) / 3 * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}, results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rel_diff(a: list, b: list) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="latent sizes (default 32; 32 64 on cuda)")
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    h, b = args.hidden, args.batch
    for d in args.dims or ((32,) if args.device == "cpu" else (32, 64)):
        flow = vf.Flow(d, [vf.IAF(d, h, n_steps=8)]).to(dev)
        x = torch.randn(b, d, device=dev)

        def no_grad():
            with torch.no_grad():
                flow.log_prob(x)
            _sync()

        def with_grad():
            flow.zero_grad()
            (-flow.log_prob(x).mean()).backward()
            _sync()
            return [p.grad.clone() for p in flow.parameters()]

        print(f"IAF log_prob, B={b} d={d} H={h} K=8 on {args.device} ({backend.select(dev)} backend): without "
              f"gradients (kernel) {median_ms(no_grad, 5, warmup=1):.1f} ms; forward+backward with gradients "
              f"{median_ms(with_grad, 5, warmup=1):.1f} ms")
        if backend.select(dev) == "cpp":
            owner, name = torch.ops.latentfast_cpp, "vector_flow_inv_grad"

            def declined(grad_x, *args):  # what the op returns for a step without a dependency order
                return grad_x.new_empty(0)
        else:
            from latentfast.kernels import vector_flows as owner
            name = "vector_flow_inv_grad"

            def declined(*args):  # what the Triton solve returns for a step without a dependency order
                return None
        one_pass = getattr(owner, name)

        def use(fn):
            def switch():
                setattr(owner, name, fn)
            return switch
        try:
            ms, grads = _paired({"one-pass solve": use(one_pass), "iterations": use(declined)}, with_grad)
        finally:
            setattr(owner, name, one_pass)
        (fast_name, fast), (slow_name, slow) = ms.items()
        print(f"forward+backward, paired: {fast_name} {fast:.1f} ms, {slow_name} {slow:.1f} ms, {slow / fast:.2f}x; "
              f"largest relative gradient difference {_rel_diff(grads[fast_name], grads[slow_name]):.1e}")


if __name__ == "__main__":
    main()
