"""Embedded datasets (shipped with a dependency or generated; never downloaded)."""
from latentfast.data import dynamics
from latentfast.data.digits import load_digits_images

__all__ = ["dynamics", "load_digits_images"]
