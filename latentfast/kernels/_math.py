"""Elementwise functions shared by the Triton kernels, accurate to a few ulps over the whole
range in float32 and float64.

The direct forms lose the small values: tanh(a) as (1 - e^-2|a|) / (1 + e^-2|a|), e^a - 1
(ELU) and log(1 + e) (softplus, log-sigmoid) cancel against 1, so for |a| or e below about
1e-7 (float32) they return 0, and at 1e-4 they are off by about 3e3 ulps. Here they go
through expm1 and log1p by Kahan's forms, which take the rounding of e^x and of 1 + e back
out through one log: expm1(x) = (u - 1) x / log(u) with u = e^x, and log1p(e) = log(w) e /
(w - 1) with w = 1 + e. These need an accurate log (tl.log is; tl.exp may be a few ulps off
on a GPU, and the forms cancel that too). Checked against float64 in
tests/ops/test_triton_math.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def expm1(x):
    """e^x - 1."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe_log = tl.where(u == 1.0, 1.0, tl.log(u))  # (no 0 / 0 in the branch not taken)
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * (x / safe_log)))


@triton.jit
def log1p(e):
    """log(1 + e) for e > -1."""
    w = 1.0 + e
    wm1 = w - 1.0
    return tl.where(wm1 == 0.0, e, tl.log(w) * (e / tl.where(wm1 == 0.0, 1.0, wm1)))


@triton.jit
def sigmoid(a):
    """1 / (1 + e^-a), without overflow for large |a|."""
    e = tl.exp(-tl.abs(a))
    r = 1.0 / (1.0 + e)
    return tl.where(a < 0, e * r, r)


@triton.jit
def log_sigmoid(u):
    """log sigmoid(u) = min(u, 0) - log1p(e^-|u|)."""
    return tl.minimum(u, 0.0) - log1p(tl.exp(-tl.abs(u)))


@triton.jit
def sigmoid_and_log(s):
    """(sigmoid(s), log sigmoid(s)) from one exp."""
    e = tl.exp(-tl.abs(s))
    r = 1.0 / (1.0 + e)
    return tl.where(s < 0, e * r, r), tl.minimum(s, 0.0) - log1p(e)


@triton.jit
def tanh(a):
    """tanh(a) = -expm1(-2|a|) / (2 + expm1(-2|a|)), signed."""
    em = expm1(-2.0 * tl.abs(a))
    t = -em / (2.0 + em)
    return tl.where(a < 0, -t, t)
