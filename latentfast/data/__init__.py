"""Embedded datasets (shipped with a dependency or generated; never downloaded)."""
from latentfast.data.digits import load_digits_images

__all__ = ["load_digits_images"]
