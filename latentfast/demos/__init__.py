"""Demos behind `python -m latentfast demo NAME`."""
