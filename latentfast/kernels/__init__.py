"""Triton kernels and their launchers, one module per family. Imported lazily by
latentfast.ops only when the triton backend is selected, so triton stays optional."""
