"""Triton kernels and their launchers, one module per family. Imported lazily by
latentfast.ops only when the triton backend is selected, so triton stays optional."""
from __future__ import annotations

import torch

# The kernels compute element offsets in 32-bit integers (program ids, loop counters and sizes
# are int32 in Triton), so in a tensor of 2^31 or more elements an offset would wrap around and
# the kernel would read or write the wrong memory, silently. Every launch goes through
# launch(), which refuses such tensors.
MAX_ELEMENTS = 2 ** 31 - 1


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
