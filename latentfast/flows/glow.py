"""Multi-scale Glow (Kingma & Dhariwal, 2018) built from latentfast layers."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from latentfast.flows.layers import GlowStep, Split, gaussian_log_p, squeeze2d, unsqueeze2d
from latentfast.ops._checks import check_count, check_finite, check_finite_together, check_tensor, checked_once


class Glow(nn.Module):
    """Multi-scale Glow: per level, squeeze -> K GlowSteps -> split (all but the last level),
    with learned Gaussian priors for the split-off latents and a learned per-channel
    Gaussian for the top latent.

    Args:
        in_channels, image_size: input shape [N, in_channels, image_size, image_size], or
            [N, in_channels, H, W] for image_size (H, W); each side must be divisible by
            2**n_levels.
        n_levels (L), steps_per_level (K), hidden: coupling net width.
        lu, additive: InvConv1x1 parameterisation and coupling type.
        coupling_net: a factory (in_channels, out_channels) -> nn.Module making each step's
            coupling net ([N, in, H, W] -> [N, out, H, W]); default Glow's, `hidden` wide.

    Example:
        >>> glow = Glow(1, 8, n_levels=3, steps_per_level=4, hidden=32)
        >>> bpd = glow.bits_per_dim(torch.rand(16, 1, 8, 8) - 0.5, n_bins=17)
        >>> x = glow.sample(4, temperature=0.7)
    """

    def __init__(self, in_channels: int, image_size: int | tuple[int, int], n_levels: int = 3,
                 steps_per_level: int = 4, hidden: int = 512, lu: bool = True,
                 additive: bool = False, coupling_net: Callable[[int, int], nn.Module] | None = None) -> None:
        super().__init__()
        check_count("in_channels", in_channels, 1, "the image's channels")
        check_count("n_levels", n_levels, 1, "the scales")
        check_count("steps_per_level", steps_per_level, 1, "the Glow steps of each scale")
        sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(sides) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sides):
            raise ValueError(f"image_size must be an int >= 1 or a pair (H, W) of them, got {image_size!r}")
        if any(v % (2 ** n_levels) for v in sides):
            raise ValueError(f"image_size {image_size} must be divisible by 2**n_levels = {2 ** n_levels}")
        self.in_channels, self.image_size, self.n_levels = in_channels, image_size, n_levels
        self.image_shape: tuple[int, int] = sides  # (H, W)
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        c = in_channels
        self.latent_shapes: list[tuple[int, int, int]] = []
        h, w = sides
        for level in range(n_levels):
            c, h, w = c * 4, h // 2, w // 2
            nets = [None if coupling_net is None else coupling_net(c // 2, c // 2 if additive else c)
                    for _ in range(steps_per_level)]
            self.levels.append(nn.ModuleList(
                GlowStep(c, hidden, lu=lu, additive=additive, net=net) for net in nets))
            if level < n_levels - 1:
                self.splits.append(Split(c))
                self.latent_shapes.append((c // 2, h, w))
                c //= 2
        self.latent_shapes.append((c, h, w))
        self.top_mean = nn.Parameter(torch.zeros(c))
        self.top_log_sd = nn.Parameter(torch.zeros(c))

    @property
    def dims(self) -> int:
        """Number of dimensions D of one input."""
        return self.in_channels * self.image_shape[0] * self.image_shape[1]

    def _check_input(self, x: Tensor) -> None:
        check_tensor("x", x)
        want = (self.in_channels, *self.image_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be [N, {want[0]}, {want[1]}, {want[2]}] (or one image "
                             f"[{want[0]}, {want[1]}, {want[2]}]), got {tuple(x.shape)}")
        check_finite("x", x)

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """x -> (latents [z_1, ..., z_L] (finest first), logdet [N], log p(z) [N]).

        One image [C, H, W] without its batch dimension (as torch.nn's convolutions take it)
        gives its latents without it and scalar logdet and log p(z); so do forward, log_prob
        and bits_per_dim, and decode takes such latents back to [C, H, W]."""
        if isinstance(x, Tensor) and x.dim() == 3:
            zs, logdet, log_p = self.encode(x[None])
            return [z[0] for z in zs], logdet[0], log_p[0]
        self._check_input(x)
        logdet = x.new_zeros(x.shape[0])
        log_p = x.new_zeros(x.shape[0])
        zs: list[Tensor] = []
        h = x
        with checked_once():
            for level, steps in enumerate(self.levels):
                h = squeeze2d(h)
                for step in steps:
                    h, ld = step(h)
                    logdet = logdet + ld
                if level < self.n_levels - 1:
                    h, z, lp = self.splits[level].encode(h)
                    zs.append(z)
                    log_p = log_p + lp
        zs.append(h)
        top = gaussian_log_p(h, self.top_mean[None, :, None, None], self.top_log_sd[None, :, None, None])
        return zs, logdet, log_p + top.flatten(1).sum(1)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """x -> (latent list, logdet [N]) (the flow's log|det J|, priors excluded)."""
        zs, logdet, _ = self.encode(x)
        return zs, logdet

    def decode(self, zs: list[Tensor]) -> Tensor:
        """Latent list -> x [N, C, H, W] (one image's latents, without the batch dimension:
        [C, H, W]). Missing (None) split latents are drawn from their priors."""
        return self._decode(zs, 1.0)

    def inverse(self, zs: list[Tensor]) -> Tensor:
        """decode(zs): x from the latent list."""
        return self.decode(zs)

    def _decode(self, zs: list[Tensor | None], temperature: float) -> Tensor:
        if len(zs) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} latents, got {len(zs)}")
        if isinstance(zs[-1], Tensor) and zs[-1].dim() == len(self.latent_shapes[-1]):
            # one image's latents (encode of [C, H, W]): as a batch of one
            for level, z in enumerate(zs[:-1]):
                if z is not None and (not isinstance(z, Tensor) or z.dim() != 3):
                    raise ValueError(f"zs[{level}] must be one image's latent "
                                     f"[{', '.join(map(str, self.latent_shapes[level]))}] like zs[-1], got "
                                     f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
            return self._decode([None if z is None else z[None] for z in zs], temperature)[0]
        h = zs[-1]
        check_tensor("zs[-1]", h, 4)
        for level, (z, shape) in enumerate(zip(zs, self.latent_shapes)):
            if z is None and level < self.n_levels - 1:
                continue
            check_tensor(f"zs[{level}]", z, 4, like=h)
            if tuple(z.shape[1:]) != shape or z.shape[0] != h.shape[0]:
                raise ValueError(f"zs[{level}] must be [{h.shape[0]}, {', '.join(map(str, shape))}] (the latent "
                                 f"shapes are {self.latent_shapes}), got {tuple(z.shape)}")
        # the steps inside run unchecked (checked_once): NaN / Inf latents are refused here, in one
        # read-back for all levels (before, they decoded to NaN images)
        check_finite_together([(f"zs[{level}]", z) for level, z in enumerate(zs) if z is not None])
        with checked_once():
            for level in reversed(range(self.n_levels)):
                if level < self.n_levels - 1:
                    h = self.splits[level].inverse(h, zs[level], temperature)
                for step in reversed(self.levels[level]):
                    h = step.inverse(h)
                h = unsqueeze2d(h)
        return h

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) [N] of continuous x (nats)."""
        _, logdet, log_p = self.encode(x)
        return log_p + logdet

    def bits_per_dim(self, x: Tensor, n_bins: int = 256) -> Tensor:
        """Mean bits per dimension of dequantised x in [-0.5, 0.5) with n_bins levels:
        (-log p(x) + D log n_bins) / (D log 2)."""
        check_count("n_bins", n_bins, 1, "the quantisation levels")
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0:
            raise ValueError("the bits per dimension of an empty batch (N = 0) are undefined (a mean over no images)")
        d = self.dims
        return ((-self.log_prob(x) + d * math.log(n_bins)) / (d * math.log(2.0))).mean()

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n samples [n, C, H, W], latents drawn at the given temperature (>= 0; 0 gives
        the decoded prior means)."""
        check_count("n", n, 0, "the number of samples")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        p = self.top_mean
        c, h, w = self.latent_shapes[-1]
        top = self.top_mean[None, :, None, None] + torch.exp(self.top_log_sd)[None, :, None, None] \
            * temperature * torch.randn(n, c, h, w, dtype=p.dtype, device=p.device)
        return self._decode([None] * (self.n_levels - 1) + [top], temperature)
