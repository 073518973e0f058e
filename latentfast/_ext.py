"""Loads the C++ extension latentfast._C if it was built, and says why not if it was not."""
from __future__ import annotations

import os

_C = None
load_error: str | None = None

if os.environ.get("LATENTFAST_LOAD_EXT", "1") == "0":
    load_error = "disabled by LATENTFAST_LOAD_EXT=0"
else:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from latentfast import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # not built (LATENTFAST_BUILD_EXT=0) or built for another torch
        load_error = (
            f"latentfast._C could not be imported ({exc}); build it with "
            "`pip install --no-build-isolation -e .` after installing torch"
        )
        _C = None


def has_cpp() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return _C is not None
