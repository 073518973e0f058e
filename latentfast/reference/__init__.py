"""Pure-PyTorch definitions of every op: the specification the kernels must match.

This package imports nothing of latentfast but itself.
"""
