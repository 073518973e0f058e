"""scikit-learn's 8x8 digits (shipped inside scikit-learn, no download)."""
from __future__ import annotations

import torch
from torch import Tensor

from latentfast.data._cpu import draw_device, made_on_cpu

DIGITS_BINS = 17  # pixel values are integers 0..16


@made_on_cpu
def load_digits_images(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(images [1797, 1, 8, 8] with integer values 0..16, labels [1797])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - dependency message
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype).unsqueeze(1)
    return x, torch.tensor(d.target)


def dequantize(x: Tensor, n_bins: int = DIGITS_BINS, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of integer pixels to [-0.5, 0.5): (x + u) / n_bins - 0.5."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    u = torch.rand(x.shape, dtype=x.dtype, generator=generator, device=draw_device(generator)).to(x.device)
    return (x + u) / n_bins - 0.5
