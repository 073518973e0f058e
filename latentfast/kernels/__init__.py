"""Triton kernels and their launchers, one module per family. Imported lazily by
latentfast.ops only when the triton backend is selected, so triton stays optional; this
package module itself imports no triton: its argument checks (check_rank, check_args) serve
the ops' Python paths too."""
from __future__ import annotations

import torch

# The kernels compute element offsets in 32-bit integers (program ids, loop counters and sizes
# are int32 in Triton), so in a tensor of 2^31 or more elements an offset would wrap around and
# the kernel would read or write the wrong memory, silently. Every launch goes through
# launch(), which refuses such tensors.
MAX_ELEMENTS = 2 ** 31 - 1


def check_rank(op: str, **tensors: "torch.Tensor | tuple[torch.Tensor, int]") -> None:
    """ValueError unless each name=(tensor, rank) has that rank: the launchers unpack the
    sizes of their primary arguments before check_args compares the others with them."""
    for name, (t, rank) in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            got = f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must have {rank} dimensions, got {got}")


def check_args(op: str, like: torch.Tensor, **specs: "tuple[torch.Tensor | None, tuple[int, ...] | int]") -> None:
    """ValueError unless each name=(tensor, shape) has exactly that shape (an int: that many
    elements, read flat), like's dtype and like's device; None tensors are skipped.

    The kernels index raw pointers with sizes taken from a few arguments, so every other
    argument must match them: a direct torch.ops.latentfast call with inconsistent tensors
    would otherwise read or write out of bounds (an illegal address on a GPU, a corrupted
    heap under the interpreter). The C++ kernels check the same (csrc/common/checks.h)."""
    for name, (t, shape) in specs.items():
        if t is None:
            continue
        fits = t.numel() == shape if isinstance(shape, int) else tuple(t.shape) == tuple(shape)
        if not fits:
            want = f"{shape} elements" if isinstance(shape, int) else str(list(shape))
            raise ValueError(f"{op}: {name} must be {want}, got shape {list(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device}, expected {like.dtype} on {like.device}")


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), after checking that no tensor argument has more than
    MAX_ELEMENTS elements (ValueError naming the limit and what to do instead), on the device
    of its CUDA tensors: Triton launches on the current CUDA device (and its current stream),
    so tensors on another GPU (a model on cuda:1 without torch.cuda.set_device(1)) would be
    addressed from the wrong one (an error, or garbage read silently)."""
    index = None
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.numel() > MAX_ELEMENTS:
                name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
                raise ValueError(
                    f"latentfast's Triton kernels address memory with 32-bit offsets; {name} would get a tensor of "
                    f"{a.numel()} elements (shape {tuple(a.shape)}), more than {MAX_ELEMENTS}. Split the batch, or "
                    f"run this call with latentfast.use_backend('reference')")
            if index is None and a.is_cuda:
                index = a.get_device()
    if index is not None and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)
