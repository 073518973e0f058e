"""One small input set per op, for the tests that run every op the same way (empty batches,
memory layouts, inference mode): the op, its inputs with a batch of b, the shapes its outputs
must have, and which inputs are weights (their gradient is zero on an empty batch)."""
from __future__ import annotations

import torch

from latentfast.flows import made_degrees, made_masks
from latentfast.ops import flows as flow_ops
from latentfast.ops import geometry as geo_ops
from latentfast.ops import rnn as rnn_ops
from latentfast.ops import vector_flows as vf_ops


def rnd(*shape, scale=1.0, dev="cpu"):
    """float64 normal draws, seeded by the shape (the same tensor for the same shape)."""
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dev)


def op_cases(dev, b: int = 0) -> dict:
    """name: (fn, inputs with a batch of b, [(output index or None for a lone tensor, shape)],
    indices of the weight inputs)."""
    def r(*shape, scale=1.0):
        return rnd(*shape, scale=scale, dev=dev)

    w6 = torch.eye(6, dtype=torch.float64, device=dev) + r(6, 6, scale=0.1)
    # two MADE steps (d = 4, H = 8, affine), masked so that the inverse exists and the sweeps reach it
    m1, m2 = (m.to(device=dev, dtype=torch.float64) for m in made_masks(*made_degrees(4, 8), 2))
    vf = (r(2, 8, 4, scale=0.3) * m1, r(2, 8, scale=0.1), r(2, 8, 8, scale=0.3) * m2, r(2, 8, scale=0.1))
    gru = (r(18, 2, scale=0.4), r(18, 6, scale=0.4), r(18, scale=0.1), r(18, scale=0.1))
    lstm = (r(24, 2, scale=0.4), r(24, 6, scale=0.4), r(24, scale=0.1), r(24, scale=0.1))
    mlp = ([r(7, 2, scale=0.5), r(5, 7, scale=0.5)], [r(7, scale=0.1), r(5, scale=0.1)], [1, 0])
    return {
        "actnorm_invconv": (flow_ops.actnorm_invconv, (r(b, 6, 3, 5), w6, r(6)), [(None, (b, 6, 3, 5))], (1, 2)),
        "actnorm_invconv_coupling": (lambda x, w, bias, h: flow_ops.actnorm_invconv_coupling(x, w, bias, h),
                                     (r(b, 6, 3, 5), w6, r(6), r(b, 6, 3, 5)), [(0, (b, 6, 3, 5)), (1, (b,))],
                                     (1, 2)),
        "actnorm_invconv_coupling additive": (
            lambda x, w, bias, h: flow_ops.actnorm_invconv_coupling(x, w, bias, h, True),
            (r(b, 6, 3, 5), w6, r(6), r(b, 3, 3, 5)), [(0, (b, 6, 3, 5)), (1, (b,))], (1, 2)),
        "affine_coupling": (flow_ops.affine_coupling, (r(b, 3, 3, 5), r(b, 6, 3, 5)), [(0, (b, 3, 3, 5)), (1, (b,))],
                            ()),
        "affine_coupling_inverse": (flow_ops.affine_coupling_inverse, (r(b, 3, 3, 5), r(b, 6, 3, 5)),
                                    [(0, (b, 3, 3, 5)), (1, (b,))], ()),
        "vector_flow_stack": (vf_ops.vector_flow_stack, (r(b, 4), *vf), [(0, (b, 4)), (1, (b,))], (1, 2, 3, 4)),
        "vector_flow_stack_inverse": (vf_ops.vector_flow_stack_inverse, (r(b, 4), *vf), [(0, (b, 4)), (1, (b,))],
                                      (1, 2, 3, 4)),
        "gru_sequence": (rnn_ops.gru_sequence, (r(3, b, 2), r(b, 6), *gru), [(0, (3, b, 6)), (1, (b, 6))],
                         (2, 3, 4, 5)),
        "lstm_sequence": (lambda x, *p: rnn_ops.lstm_sequence(x, None, *p), (r(3, b, 2), *lstm),
                          [(0, (3, b, 6))], (1, 2, 3, 4)),
        "pullback_metric": (lambda z, w0, w1, b0, b1: geo_ops.pullback_metric(z, [w0, w1], [b0, b1], mlp[2]),
                            (r(b, 2), *mlp[0], *mlp[1]), [(None, (b, 2, 2))], (1, 2, 3, 4)),
        "curve_energy": (lambda c, w0, w1, b0, b1: geo_ops.curve_energy(c, [w0, w1], [b0, b1], mlp[2]),
                         (r(b, 5, 2), *mlp[0], *mlp[1]), [(0, (b,)), (1, (b,))], (1, 2, 3, 4)),
    }


CASES = list(op_cases("cpu"))
