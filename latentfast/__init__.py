"""latentfast: compiled kernels for latent-space models (flows, VAEs, latent geometry, RNNs).

Modules in latentfast.flows call the ops in latentfast.ops, which run on the backend chosen
by latentfast.backend (Triton on CUDA, C++ on CPU, or the PyTorch reference).
"""
from latentfast import ops  # noqa: F401  (registers the latentfast:: ops)
from latentfast.backend import select as select_backend
from latentfast.backend import use_backend

__version__ = "0.1.0"
__all__ = ["ops", "select_backend", "use_backend", "__version__"]
