"""Normalizing flows: Glow layers and the multi-scale Glow model."""
from latentfast.flows.glow import Glow
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

__all__ = ["ActNorm", "AdditiveCoupling", "AffineCoupling", "Glow", "GlowStep", "InvConv1x1",
           "Split", "Squeeze", "ZeroConv2d", "squeeze2d", "unsqueeze2d"]
