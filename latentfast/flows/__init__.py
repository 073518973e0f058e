"""Normalizing flows: Glow layers, the multi-scale Glow model, and flows on latent vectors
(IAF, MAF, couplings, permutations, LU linear layers, the Flow distribution)."""
from latentfast.flows.glow import Glow
from latentfast.flows.vector import (
    IAF,
    MAF,
    Flow,
    LULinear,
    MaskedFlowStack,
    MaskedLinear,
    Permutation,
    VectorAdditiveCoupling,
    VectorAffineCoupling,
    made_degrees,
    made_masks,
)
from latentfast.flows.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    GlowStep,
    InvConv1x1,
    Split,
    Squeeze,
    ZeroConv2d,
    squeeze2d,
    unsqueeze2d,
)

__all__ = ["IAF", "MAF", "Flow", "LULinear", "MaskedFlowStack", "MaskedLinear", "Permutation",
           "VectorAdditiveCoupling", "VectorAffineCoupling", "made_degrees", "made_masks", "ActNorm", "AdditiveCoupling", "AffineCoupling", "Glow", "GlowStep", "InvConv1x1",
           "Split", "Squeeze", "ZeroConv2d", "squeeze2d", "unsqueeze2d"]
