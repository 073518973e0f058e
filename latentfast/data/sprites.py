"""A dSprites-like dataset with known generative factors, rendered by our own code.

Binary images of one sprite: shape (square, ellipse, triangle), scale, rotation and x, y
position, every combination of the factor values exactly once (as in dSprites, at a
smaller size so it trains on a CPU). Factor values are indices; `factors_to_index` maps
a factor vector to its image, which is what the disentanglement metrics need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from latentfast.data._cpu import made_on_cpu

FACTOR_NAMES = ("shape", "scale", "rotation", "x", "y")
SHAPES = ("square", "ellipse", "triangle")


@dataclass
class Sprites:
    """images [N, 1, S, S] in {0, 1}; factors [N, 5] (indices); factor_sizes (5 ints)."""

    images: Tensor
    factors: Tensor
    factor_sizes: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return FACTOR_NAMES

    def factors_to_index(self, factors: Tensor) -> Tensor:
        """Row index of each factor vector [n, 5] (the images are in row-major factor order)."""
        idx = torch.zeros(factors.shape[0], dtype=torch.long, device=factors.device)
        for k, size in enumerate(self.factor_sizes):
            idx = idx * size + factors[:, k].long()
        return idx

    def sample_factors(self, n: int, generator: torch.Generator) -> Tensor:
        """n factor vectors drawn uniformly [n, 5]."""
        return torch.stack([torch.randint(s, (n,), generator=generator, device=generator.device)
                            for s in self.factor_sizes], 1)

    def observations(self, factors: Tensor) -> Tensor:
        """The images [n, S*S] of the given factor vectors."""
        return self.images[self.factors_to_index(factors)].flatten(1)


def _inside(shape: int, u: Tensor, v: Tensor) -> Tensor:
    """Whether sprite-frame coordinates (u, v) lie in the unit-size shape."""
    if shape == 0:
        return (u.abs() <= 1.0) & (v.abs() <= 1.0)
    if shape == 1:
        return (u / 1.2) ** 2 + (v / 0.7) ** 2 <= 1.0
    # equilateral triangle pointing up, centroid at the origin
    return (v >= -0.6) & (v <= 1.2 - math.sqrt(3) * u.abs())


@made_on_cpu
def make_sprites(size: int = 32, n_scales: int = 4, n_rotations: int = 8, n_positions: int = 8) -> Sprites:
    """Every combination of 3 shapes x n_scales x n_rotations x n_positions^2 as a binary
    size x size image. Rotations cover [0, pi/2) (a quarter turn, so the square's rotations
    are all distinct), scales 0.5..1 of a base half-width of size/6 pixels, positions a grid
    that keeps the sprite inside the frame. Deterministic (no randomness)."""
    if size < 8 or min(n_scales, n_rotations, n_positions) < 1:
        raise ValueError("size must be >= 8 and every factor needs at least one value")
    sizes = (len(SHAPES), n_scales, n_rotations, n_positions, n_positions)
    grids = torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij")
    factors = torch.stack([g.reshape(-1) for g in grids], 1)
    scale = 0.5 + 0.5 * torch.arange(n_scales) / max(n_scales - 1, 1)
    angle = torch.arange(n_rotations) * (math.pi / 2) / n_rotations
    half = size / 6.0
    lo, hi = 1.6 * half, size - 1 - 1.6 * half
    pos = torch.linspace(lo, hi, n_positions) if n_positions > 1 else torch.tensor([size / 2])
    px = torch.arange(size, dtype=torch.float32)
    py, pxx = torch.meshgrid(px, px, indexing="ij")
    images = torch.zeros(factors.shape[0], size, size)
    for shape in range(len(SHAPES)):
        sel = factors[:, 0] == shape
        f = factors[sel]
        s = (scale[f[:, 1]] * half)[:, None, None]
        a = angle[f[:, 2]][:, None, None]
        dx = pxx[None] - pos[f[:, 3]][:, None, None]
        dy = pos[f[:, 4]][:, None, None] - py[None]  # image rows grow downwards
        u = (torch.cos(a) * dx + torch.sin(a) * dy) / s
        v = (-torch.sin(a) * dx + torch.cos(a) * dy) / s
        images[sel] = _inside(shape, u, v).float()
    return Sprites(images.unsqueeze(1), factors, sizes)
