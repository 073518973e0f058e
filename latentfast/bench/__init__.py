"""The benchmark suite behind ``python -m latentfast bench``."""
from latentfast.bench.runner import run_suite

__all__ = ["run_suite"]
