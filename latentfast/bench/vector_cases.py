"""Benchmark cases of the vector flow ops: a K-step MADE/IAF stack (the issue's target
shape), one wide MADE step, and the sequential inverse (MAF sampling; with gradients, an
IAF's density in training)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentfast.bench.cases import Case
from latentfast.flows.vector import made_degrees, made_masks
from latentfast.ops import vector_flows as ops
from latentfast.reference import vector_flows as ref


def eager_stack(x, w1, b1, w2, b2):
    """K gated MADE steps as a user writes them in PyTorch (weights already masked)."""
    d = x.shape[1]
    logdet = x.new_zeros(x.shape[0])
    for k in range(w1.shape[0]):
        m, s = F.linear(F.relu(F.linear(x, w1[k], b1[k])), w2[k], b2[k]).split(d, dim=1)
        sigma = torch.sigmoid(s)
        x = sigma * x + (1 - sigma) * m
        logdet = logdet + F.logsigmoid(s).sum(1)
    return x, logdet


def fast_stack(x, w1, b1, w2, b2):
    return ops.vector_flow_stack(x, w1, b1, w2, b2)


def eager_inverse(y, w1, b1, w2, b2):
    """The inverse as a user writes it in PyTorch: per step (last first) d fixed-point sweeps
    (the reference's inverse_sweep) from x = y, then the step's log-det at x; with gradients,
    autograd through the sweeps. (The reference's own inverse also runs d + 1 sweeps from the
    solution for its derivatives.)"""
    d = y.shape[1]
    act = y.new_ones(d)
    logdet = y.new_zeros(y.shape[0])
    for k in reversed(range(w1.shape[0])):
        x = y
        for _ in range(d):
            x = ref.inverse_sweep(x, y, w1[k], b1[k], w2[k], b2[k], None, act, False)
        _, o = ref.flow_step_params(x, w1[k], b1[k], w2[k], b2[k], None)
        logdet = logdet + ref.flow_step_transform(x, o, act, False)[1]
        y = x
    return y, logdet


def fast_inverse(y, w1, b1, w2, b2):
    return ops.vector_flow_stack_inverse(y, w1, b1, w2, b2)


def _made_weights(k, d, h, device, gen):
    w1s, w2s = [], []
    for i in range(k):
        order = torch.arange(d) if i % 2 == 0 else torch.arange(d).flip(0)
        m1, m2 = made_masks(*made_degrees(d, h, order), 2)
        w1s.append(torch.randn(h, d, generator=gen) * d ** -0.5 * m1)
        w2s.append(torch.randn(2 * d, h, generator=gen) * 0.1 * h ** -0.5 * m2)
    b2 = torch.zeros(k, 2 * d)
    b2[:, d:] = 2.0
    return [t.to(device) for t in (torch.stack(w1s), torch.zeros(k, h), torch.stack(w2s), b2)]


def vector_flow_cases(device: torch.device, quick: bool, gen: torch.Generator) -> list[Case]:
    cases = []
    shapes = ((256, 8, 32, 2), (64, 8, 16, 1), (64, 6, 16, 2)) if quick else (
        (4096, 32, 256, 8), (1024, 512, 1024, 1), (1024, 32, 256, 8))
    for (b, d, h, k), inverse in zip(shapes, (False, False, True)):
        w = _made_weights(k, d, h, device, gen)
        x = torch.randn(b, d, generator=gen).to(device)
        weight_bytes = sum(t.numel() for t in w) * 4
        flops = 6 * b * k * d * h * (d if inverse else 1)
        if inverse:
            name = f"vector_flow_inverse B={b} d={d} H={h} K={k}"
            cases.append(Case("vector_flow_stack_inverse", name, (x, *w), eager_inverse, fast_inverse, (),
                              bytes_moved=8 * b * d + weight_bytes, flops=flops, passes=("fwd",)))
            # With gradients (an IAF's log_prob in training): eager is autograd through the d
            # sweeps per step, latentfast the kernel and its implicit-function backward. No
            # torch.compile baseline: at the full shape, compiling the unrolled K d sweeps and
            # their backward took 368 s on the 2-core VM, and the compiled call then ran 1148 ms
            # against eager's 1208 ms.
            cases.append(Case("vector_flow_stack_inverse", name, (x, *w), eager_inverse, fast_inverse,
                              (0, 1, 2, 3, 4), bytes_moved=8 * b * d + weight_bytes, flops=flops,
                              passes=("fwd+bwd",), compile=False))
            continue
        op = "made_flow_step" if k == 1 else "vector_flow_stack"
        cases.append(Case(op, f"{op} B={b} d={d} H={h} K={k}", (x, *w), eager_stack, fast_stack, (0, 1, 2, 3, 4),
                          bytes_moved=8 * b * d + weight_bytes, flops=flops))
    return cases
