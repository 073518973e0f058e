"""Vector flows: the vector_flow_stack op on every backend against its reference, and the
IAF / MAF / coupling / permutation / LU modules (invertibility, log-det against autograd
Jacobians, the Flow distribution)."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

import latentfast
from latentfast.flows import vector as vf
from latentfast.ops import vector_flows as ops
from latentfast.reference import vector_flows as ref
from tests.conftest import (CPU_ISAS, FAST_GC, assert_close, backends_under_test, count_host_reads, device_for,
                            interpreting, use_cpu_isa)


# Tests of the C++ kernels' own paths (row tiles, blocked GEMMs, the BLAS fallback): they run
# once, in the pass whose backends include cpp, not once per backend.
_NEEDS_CPP = pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own paths")
_NEEDS_TRITON = pytest.mark.skipif("triton" not in backends_under_test(), reason="checks the Triton kernel's own paths")


def _stack_params(k, b, d, h, additive, dtype, dev, seed, with_ctx=True):
    g = torch.Generator().manual_seed(seed)
    o = d if additive else 2 * d

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(dev)

    act = (torch.rand(k, d, generator=g) > 0.3).to(dtype).to(dev)
    ctx = r(k, b, h) if with_ctx else None
    # fan-in scaled weights, as a trained flow has: with fixed scales (0.5, 0.3) the stack grew by
    # about 10x a step at the bench shape (K = 8, d = 32, H = 256; |y| up to 7e7), where the
    # float32 reference is itself off the float64 one by more than 100% on some elements
    return dict(w1=r(k, h, d, scale=1.2 / d ** 0.5), b1=r(k, h), w2=r(k, o, h, scale=1.2 / h ** 0.5), b2=r(k, o),
                act=act, ctx=ctx)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 17), (2, 33, 12, 40)])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stack_matches_reference(backend, shape, additive, dtype):
    k, b, d, h = shape
    dev = device_for(backend)
    p = _stack_params(k, b, d, h, additive, dtype, dev, seed=sum(shape) + additive)
    x = torch.randn(b, d, dtype=torch.float64).to(dtype).to(dev)
    leaves = [x] + [p[n] for n in ("ctx", "w1", "b1", "w2", "b2")]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    gy, gl = torch.randn(b, d, dtype=dtype, device=dev), torch.randn(b, dtype=dtype, device=dev)
    with latentfast.use_backend("reference"):
        y0, l0, *_ = ref.vector_flow_stack(leaves[0], leaves[1], *leaves[2:], p["act"], additive)
        g0 = torch.autograd.grad((y0 * gy).sum() + (l0 * gl).sum(), leaves)
    y, ld = ops.vector_flow_stack(leaves[0], *leaves[2:], p["act"], leaves[1], additive)
    g = torch.autograd.grad((y * gy).sum() + (ld * gl).sum(), leaves)
    scale = 1.0 if dtype == torch.float64 else 10.0
    assert_close(y, y0, scale=scale, msg="y")
    assert_close(ld, l0, scale=scale, msg="logdet")
    for name, a, e in zip(("x", "ctx", "w1", "b1", "w2", "b2"), g, g0):
        assert_close(a, e, scale=scale * 10, msg=f"grad {name}")
    with torch.no_grad():  # the inference op gives the same values
        y2, l2 = ops.vector_flow_stack(leaves[0], *leaves[2:], p["act"], leaves[1], additive)
    assert_close(y2, y0, scale=scale)
    assert_close(l2, l0, scale=scale)


@pytest.mark.parametrize("with_ctx", [True, False])
def test_kept_and_recomputed_hidden_give_the_reference_gradients(backend, monkeypatch, with_ctx):
    """The eager backward with the hidden layers kept by the forward and with them recomputed
    both match the reference."""
    dev = device_for(backend)
    k, b, d, h = 3, 33, 12, 40
    p = _stack_params(k, b, d, h, False, torch.float64, dev, seed=21, with_ctx=with_ctx)
    x = torch.randn(b, d, dtype=torch.float64, device=dev)
    names = ("x", "ctx", "w1", "b1", "w2", "b2") if with_ctx else ("x", "w1", "b1", "w2", "b2")
    base = {"x": x, **p}
    gy, gl = torch.randn(b, d, dtype=torch.float64, device=dev), torch.randn(b, dtype=torch.float64, device=dev)

    def grads(fn):
        leaves = {n: base[n].detach().clone().requires_grad_() for n in names}
        y, ld = fn(leaves)
        return torch.autograd.grad((y * gy).sum() + (ld * gl).sum(), [leaves[n] for n in names])

    def public(lv):
        return ops.vector_flow_stack(lv["x"], lv["w1"], lv["b1"], lv["w2"], lv["b2"], p["act"], lv.get("ctx"))

    want = grads(lambda lv: ref.vector_flow_stack(lv["x"], lv.get("ctx"), lv["w1"], lv["b1"], lv["w2"], lv["b2"],
                                                  p["act"], False)[:2])
    monkeypatch.setattr(ops, "KEEP_HIDDEN_MIN_D", 1)
    kept = grads(public)
    monkeypatch.setattr(ops, "KEEP_HIDDEN_MAX_BYTES", 0)
    recomputed = grads(public)
    for name, a, r, w in zip(names, kept, recomputed, want):
        assert_close(a, w, scale=10, msg=f"kept: grad {name}")
        assert_close(r, w, scale=10, msg=f"recomputed: grad {name}")


@pytest.mark.parametrize("tile_rows", ["1", "5", "23", "64"])
@pytest.mark.parametrize("additive,with_ctx,keep", [(False, True, False), (False, False, True), (True, True, True)])
@_NEEDS_CPP
def test_cpp_row_tiles_match_whole_batch_and_reference(monkeypatch, tile_rows, additive, with_ctx, keep):
    """The C++ row-tile path (each thread takes tiles of rows through all K steps and back,
    with per-chunk weight-gradient sums) against the whole-batch path and the reference, for
    tiles of 1 row, tiles that leave a partial last tile (5 of 23), one tile, and a tile
    larger than the batch. LATENTFAST_VF_TILE_ROWS forces the tile size; 0 forces the
    whole-batch path. LATENTFAST_VF_POISON fills the op's outputs with NaN before the
    kernels write them, so a row a tile misses shows up."""
    k, b, d, h = 3, 23, 5, 7
    p = _stack_params(k, b, d, h, additive, torch.float64, "cpu", seed=31, with_ctx=with_ctx)
    x = torch.randn(b, d, dtype=torch.float64)
    gy, gl = torch.randn(b, d, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    cpp = torch.ops.latentfast_cpp
    args = (p["ctx"], p["w1"], p["b1"], p["w2"], p["b2"], p["act"], additive)

    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")

    def run(rows):
        monkeypatch.setenv("LATENTFAST_VF_TILE_ROWS", rows)
        y, ld, xs, out, hid = cpp.vector_flow_fwd(x, *args, True, keep)
        grads = cpp.vector_flow_bwd(gy, gl, xs, out, p["ctx"], p["w1"], p["b1"], p["w2"], p["act"], additive,
                                    hid if keep else None)
        y_inf, ld_inf, *_ = cpp.vector_flow_fwd(x, *args, False, False)
        return (y, ld, xs, out, y_inf, ld_inf) + tuple(grads)

    tiled, whole = run(tile_rows), run("0")
    names = ("y", "logdet", "xs", "out", "y (no save)", "logdet (no save)", "grad x", "grad ctx", "grad w1",
             "grad b1", "grad w2", "grad b2")
    for name, a, w in zip(names, tiled, whole):
        assert a.shape == w.shape, name
        assert_close(a, w, msg=name)
    leaves = [t.detach().clone().requires_grad_() for t in (x, p["w1"], p["b1"], p["w2"], p["b2"])]
    y0, l0, *_ = ref.vector_flow_stack(leaves[0], p["ctx"], *leaves[1:], p["act"], additive)
    g0 = torch.autograd.grad((y0 * gy).sum() + (l0 * gl).sum(), leaves)
    assert_close(tiled[0], y0, msg="y vs reference")
    assert_close(tiled[1], l0, msg="logdet vs reference")
    for name, a, w in zip(("x", "w1", "b1", "w2", "b2"), (tiled[6],) + tuple(tiled[8:]), g0):
        assert_close(a, w, scale=10, msg=f"grad {name} vs reference")


def _masked_params(kind, k, d, h, seed):
    """Stack weights with the zero patterns the row-tile kernel's blocking looks for."""
    g = torch.Generator().manual_seed(seed)
    w1s, w2s = [], []
    for i in range(k):
        if kind == "coupling":
            first = torch.arange(d) < d // 2
            cond = first if i % 2 == 0 else ~first
            m1, m2 = vf.made_masks(torch.where(cond, 1, 2), torch.ones(h, dtype=torch.long), 2)
        else:
            order = {"made": torch.arange(d), "made_reversed": torch.arange(d).flip(0),
                     "made_random_order": torch.randperm(d, generator=g), "zero_w2": torch.arange(d)}[kind]
            m1, m2 = vf.made_masks(*vf.made_degrees(d, h, order), 2)
        w1s.append(torch.randn(h, d, generator=g, dtype=torch.float64) * m1)
        w2s.append(torch.randn(2 * d, h, generator=g, dtype=torch.float64) * 0.3 * m2 * (kind != "zero_w2"))
    b1 = torch.randn(k, h, generator=g, dtype=torch.float64)
    b2 = torch.randn(k, 2 * d, generator=g, dtype=torch.float64)
    b2[:, d:] += 2.0  # gates near sigmoid(2), as the modules start (a gate near 0 makes the inverse ill-conditioned)
    return torch.stack(w1s), b1, torch.stack(w2s), b2


@pytest.mark.parametrize("kind", ["made", "made_reversed", "made_random_order", "coupling", "zero_w2"])
@pytest.mark.parametrize("groups", ["3", "4", "16"])
@pytest.mark.parametrize("tile_rows", ["5", "0"])
@_NEEDS_CPP
def test_cpp_blocked_masked_gemms_match_reference(monkeypatch, kind, groups, tile_rows):
    """Both C++ paths run one GEMM per group of hidden units / outputs over the range of
    nonzero weights they find (MADE staircases, coupling halves). Against the unblocked path
    (LATENTFAST_VF_GROUPS=1) and the reference, H = 13 (groups of uneven size, a short last
    group; 16 groups: some of one unit), tiles of 5 rows over 23, and the whole-batch path."""
    k, b, d, h = 4, 23, 6, 13
    w1, b1, w2, b2 = _masked_params(kind, k, d, h, seed=41)
    x = torch.randn(b, d, dtype=torch.float64)
    ctx = torch.randn(k, b, h, dtype=torch.float64)
    act = torch.ones(k, d, dtype=torch.float64)
    gy, gl = torch.randn(b, d, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    cpp = torch.ops.latentfast_cpp
    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")
    monkeypatch.setenv("LATENTFAST_VF_TILE_ROWS", tile_rows)

    def run(groups_env):
        monkeypatch.setenv("LATENTFAST_VF_GROUPS", groups_env)
        y, ld, xs, out, _ = cpp.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, False, True, False)
        grads = cpp.vector_flow_bwd(gy, gl, xs, out, ctx, w1, b1, w2, act, False, None)
        return (y, ld) + tuple(grads)

    blocked, plain = run(groups), run("1")
    leaves = [t.clone().requires_grad_() for t in (x, ctx, w1, b1, w2, b2)]
    y0, l0, *_ = ref.vector_flow_stack(*leaves, act, False)
    want = (y0.detach(), l0.detach()) + torch.autograd.grad((y0 * gy).sum() + (l0 * gl).sum(), leaves)
    names = ("y", "logdet", "grad x", "grad ctx", "grad w1", "grad b1", "grad w2", "grad b2")
    for name, a, p_, w in zip(names, blocked, plain, want):
        assert_close(a, p_, msg=f"{name}: blocked vs unblocked")
        assert_close(a, w, scale=10, msg=f"{name}: blocked vs reference")


@pytest.mark.parametrize("kind", ["made", "made_reversed", "made_random_order", "coupling"])
@pytest.mark.parametrize("tile_rows,groups", [("5", "3"), ("5", "1"), ("23", "4"), ("0", "1"), ("0", "3")])
@_NEEDS_CPP
def test_cpp_inverse_row_tiles_match_reference(monkeypatch, kind, tile_rows, groups):
    """The inverse (fixed-point sweeps) on row tiles with blocked GEMMs, against the reference
    inverse, and it recovers x from the forward's y with the forward's log-det."""
    k, b, d, h = 3, 23, 6, 13
    w1, b1, w2, b2 = _masked_params(kind, k, d, h, seed=43)
    g = torch.Generator().manual_seed(44)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    ctx = torch.randn(k, b, h, generator=g, dtype=torch.float64)
    act = torch.ones(k, d, dtype=torch.float64)
    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")
    monkeypatch.setenv("LATENTFAST_VF_TILE_ROWS", tile_rows)
    monkeypatch.setenv("LATENTFAST_VF_GROUPS", groups)
    cpp = torch.ops.latentfast_cpp
    y, ld, *_ = cpp.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, False, False, False)
    xr, ldr = cpp.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, False, d)
    x0, l0 = ref.vector_flow_stack_inverse(y, ctx, w1, b1, w2, b2, act, False, d)
    assert_close(xr, x0, msg="x vs reference inverse")
    assert_close(ldr, l0, msg="logdet vs reference inverse")
    assert_close(xr, x, scale=100, msg="inverse(forward(x))")
    assert_close(ldr, ld, scale=100, msg="inverse logdet vs forward logdet")


def _mixed_params(k, d, h, seed, additive):
    """Steps alternating MADE (random input order) and coupling masks, so one stack has steps
    of d levels and of 2."""
    g = torch.Generator().manual_seed(seed)
    o = d if additive else 2 * d
    w1s, w2s = [], []
    for i in range(k):
        if i % 2:
            first = torch.arange(d) < d // 2
            m1, m2 = vf.made_masks(torch.where(first, 1, 2), torch.ones(h, dtype=torch.long), o // d)
        else:
            m1, m2 = vf.made_masks(*vf.made_degrees(d, h, torch.randperm(d, generator=g)), o // d)
        w1s.append(torch.randn(h, d, generator=g, dtype=torch.float64) * m1)
        w2s.append(torch.randn(o, h, generator=g, dtype=torch.float64) * 0.3 * m2)
    b1 = torch.randn(k, h, generator=g, dtype=torch.float64)
    b2 = torch.randn(k, o, generator=g, dtype=torch.float64)
    if not additive:
        b2[:, d:] += 2.0
    return torch.stack(w1s), b1, torch.stack(w2s), b2


def _check_one_pass_inverse(xr, ldr, xs, lds, x0, l0, dtype):
    """The one-pass inverse (x, logdet) against the same kernel's sweeps (xs, lds) and the float64
    reference (x0, l0). float32: these random stacks amplify rounding (the sweeps too are up to
    3e-3 off the float64 reference here), so a row's error swings with the summation order:
    within 5x the sweeps' (the C++ lane kernel on the baseline clone: 3.8x on row 24; over 60
    random stacks of this kind its errors are distributed as the 4-row kernel's before it,
    median 0.9-1.2e-4 relative, on every clone)."""
    if dtype == torch.float64:
        assert_close(xr, x0, msg="x vs reference inverse")
        assert_close(ldr, l0, msg="logdet vs reference inverse")
        assert_close(xr, xs, msg="x vs the sweeps")
        assert_close(ldr, lds, msg="logdet vs the sweeps")
        return
    for name, got, sweeps, want in (("x", xr, xs, x0), ("logdet", ldr, lds, l0)):
        err, err_sweeps = ((t.double() - want).abs().max().item() for t in (got, sweeps))
        assert err <= 5 * err_sweeps + 1e-5, (name, err, err_sweeps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("b,tile_rows", [(3, None), (37, None), (37, "5")])
@_NEEDS_CPP
def test_cpp_inverse_by_dependency_order(monkeypatch, dtype, additive, b, tile_rows):
    """Steps whose masked weights form an acyclic dependency graph with at least 2 and at most
    n_passes levels are inverted in dependency order (one pass, rank-1 updates of the
    pre-activations) instead of n_passes sweeps: against the reference and the sweeps
    (LATENTFAST_VF_SEQ_INV=0), with act zeros, a context, d = 7, H = 19 (4-row blocks and a
    remainder), batch 3 (too few rows for the usual tiles: one tile per thread) and 37."""
    k, d, h = 4, 7, 19
    w1, b1, w2, b2 = (t.to(dtype) for t in _mixed_params(k, d, h, seed=51, additive=additive))
    g = torch.Generator().manual_seed(52)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    ctx = torch.randn(k, b, h, generator=g, dtype=torch.float64).to(dtype)
    act = (torch.rand(k, d, generator=g) > 0.25).to(dtype)
    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")
    if tile_rows is not None:
        monkeypatch.setenv("LATENTFAST_VF_TILE_ROWS", tile_rows)
    cpp = torch.ops.latentfast_cpp
    y, ld, *_ = cpp.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, additive, False, False)
    xr, ldr = cpp.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, d)
    monkeypatch.setenv("LATENTFAST_VF_SEQ_INV", "0")
    xs, lds = cpp.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, d)
    x0, l0 = ref.vector_flow_stack_inverse(*(t.double() for t in (y, ctx, w1, b1, w2, b2, act)), additive, d)
    _check_one_pass_inverse(xr, ldr, xs, lds, x0, l0, dtype)
    assert_close(xr, x, scale=100 if dtype == torch.float64 else 1000, msg="inverse(forward(x))")
    assert_close(ldr, ld, scale=100 if dtype == torch.float64 else 1000, msg="inverse logdet vs forward logdet")


@_NEEDS_CPP
def test_cpp_inverse_keeps_the_sweeps_where_order_does_not_apply(monkeypatch):
    """Fewer passes than levels (the sweeps' truncated answer is what was asked for) and
    unmasked weights (a cyclic graph) take the sweeps: the same bits as LATENTFAST_VF_SEQ_INV=0."""
    k, b, d, h = 2, 9, 6, 11
    w1, b1, w2, b2 = _masked_params("made", k, d, h, seed=53)
    g = torch.Generator().manual_seed(54)
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    act = torch.ones(k, d, dtype=torch.float64)
    dense = (torch.randn(k, h, d, generator=g, dtype=torch.float64), b1,
             0.1 * torch.randn(k, 2 * d, h, generator=g, dtype=torch.float64), b2)
    cpp = torch.ops.latentfast_cpp
    for params, passes in (((w1, b1, w2, b2), d - 2), (dense, d)):
        monkeypatch.delenv("LATENTFAST_VF_SEQ_INV", raising=False)
        got = cpp.vector_flow_inv(y, None, *params, act, False, passes)
        monkeypatch.setenv("LATENTFAST_VF_SEQ_INV", "0")
        want = cpp.vector_flow_inv(y, None, *params, act, False, passes)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.delenv("LATENTFAST_VF_SEQ_INV", raising=False)
    full = cpp.vector_flow_inv(y, None, w1, b1, w2, b2, act, False, d)
    short = cpp.vector_flow_inv(y, None, w1, b1, w2, b2, act, False, d - 2)
    assert not torch.allclose(full[0], short[0])  # the truncated sweeps are not converged


def test_dependency_levels():
    """The levels the Triton inverse's plan orders dimensions by (kernels.vector_flows._levels):
    a chain, a MADE-like graph (nested dependency sets), a graph whose dependency counts do not
    give a topological order (the round-by-round peeling), a cycle and a self-loop (None)."""
    import numpy as np

    from latentfast.kernels import vector_flows as tk

    def graph(n, edges):
        dep = np.zeros((n, n), dtype=bool)
        for j, i in edges:  # j depends on i
            dep[j, i] = True
        return dep

    assert tk._levels(graph(4, [(1, 0), (2, 1), (3, 2)])).tolist() == [0, 1, 2, 3]
    made = graph(4, [(j, i) for j in range(4) for i in range(j)])  # output j sees inputs < j
    assert tk._levels(made[::-1, ::-1].copy()).tolist() == [3, 2, 1, 0]
    # counts: node 3 has one dependency (on 2) but sits above nodes 1, 2 with more
    odd = graph(5, [(1, 0), (1, 4), (2, 0), (2, 1), (3, 2)])
    assert tk._levels(odd).tolist() == [0, 1, 2, 3, 0]
    assert tk._levels(graph(3, [(1, 0), (2, 1), (0, 2)])) is None
    assert tk._levels(graph(2, [(1, 1)])) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("b", [3, 37])
@_NEEDS_TRITON
def test_triton_inverse_by_dependency_order(monkeypatch, dtype, additive, b):
    """The Triton inverse solves steps with a dependency order within n_passes levels in one
    pass (the whole hidden layer of a row block in registers, one rank-1 update per solved
    dimension): against the reference inverse and its own sweeps (LATENTFAST_VF_SEQ_INV=0),
    with steps of d levels and of 2 (MADE in random orders, couplings), act zeros, a context;
    n_passes = d plans every step, n_passes = 3 only the couplings; the plan is checked to be
    taken."""
    from latentfast.kernels import vector_flows as tk

    dev = device_for("triton")
    k, d, h = 4, 7, 19
    w1, b1, w2, b2 = (t.to(dtype).to(dev) for t in _mixed_params(k, d, h, seed=51, additive=additive))
    g = torch.Generator().manual_seed(52)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).to(dev)
    ctx = torch.randn(k, b, h, generator=g, dtype=torch.float64).to(dtype).to(dev)
    act = (torch.rand(k, d, generator=g) > 0.25).to(dtype).to(dev)
    y, ld, *_ = ref.vector_flow_stack(x, ctx, w1, b1, w2, b2, act, additive)
    for passes, planned in ((d, [1, 1, 1, 1]), (3, [0, 1, 0, 1])):
        plan = tk._inverse_plan(w1, w2, act, additive, passes)
        assert plan[2].tolist() == planned
        monkeypatch.delenv("LATENTFAST_VF_SEQ_INV", raising=False)
        xr, ldr = tk.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, passes)
        monkeypatch.setenv("LATENTFAST_VF_SEQ_INV", "0")
        xs, lds = tk.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, passes)
        x0, l0 = ref.vector_flow_stack_inverse(*(t.double() for t in (y, ctx, w1, b1, w2, b2, act)), additive, passes)
        _check_one_pass_inverse(xr, ldr, xs, lds, x0, l0, dtype)
        if passes == d:
            assert_close(xr, x, dtype=dtype, scale=100 if dtype == torch.float64 else 1000, msg="inverse(forward(x))")
            assert_close(ldr, ld, dtype=dtype, scale=100 if dtype == torch.float64 else 1000, msg="logdet vs forward")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("tile_rows,n_passes", [(None, "d"), (None, 3), ("5", 3), ("0", "d")])
@pytest.mark.parametrize("d,h", [(7, 19), (17, 37)])
@_NEEDS_CPP
def test_cpp_inverse_saves_the_forward_stack_at_its_solution(monkeypatch, isa, dtype, additive, tile_rows, n_passes,
                                                             d, h):
    """vector_flow_inv_train (the differentiable inverse's forward on cpp) returns the same x as
    vector_flow_inv, bit for bit, and its log-det to rounding, plus the forward stack at x that the backward
    needs: xs[k] (step k's input), out[k] (its MLP output) and hidden[k] (its hidden layer), as
    vector_flow_fwd with save and keep_hidden would give them. Checked per step against the MLP
    evaluated at the saved input and the step's own inverse of its output, and (exact
    inverse, float64) xs against the forward's chain from the x0 that gave y. Steps of d levels
    and of 2 (MADE in a random order, couplings) with some act = 0 dimensions and a context;
    n_passes = d (every step in dependency order) and 3 (the MADE steps by sweeps); the
    default tiles, 5-row tiles and the whole-batch path (LATENTFAST_VF_TILE_ROWS=0);
    B = 37 (full lane blocks and a partial one: lanes of 16 floats / 8 doubles in the AVX-512
    clone, 8 / 4 in AVX2, 4 / 2 in the baseline), d and H below and above a lane tile; every instruction-set clone this CPU runs; outputs poisoned first."""
    use_cpu_isa(monkeypatch, isa)
    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")
    if tile_rows is not None:
        monkeypatch.setenv("LATENTFAST_VF_TILE_ROWS", tile_rows)
    k, b = 4, 37
    passes = d if n_passes == "d" else n_passes
    w1, b1, w2, b2 = (t.to(dtype) for t in _mixed_params(k, d, h, seed=61, additive=additive))
    w1 = w1 * (2.0 / d) ** 0.5
    g = torch.Generator().manual_seed(62)
    # hidden unit 0 sees every input and feeds no output: the levels stay the same, but the
    # saved hidden layer needs the last level's inputs folded in too
    w1[:, 0] = (torch.randn(k, d, generator=g, dtype=torch.float64) * (2.0 / d) ** 0.5).to(dtype)
    w2[:, :, 0] = 0
    x0 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    ctx = (0.5 * torch.randn(k, b, h, generator=g, dtype=torch.float64)).to(dtype)
    act = (torch.rand(k, d, generator=g) > 0.25).to(dtype)
    y, _, xs_fwd, _ = ref.vector_flow_stack(x0, ctx, w1, b1, w2, b2, act, additive)
    cpp = torch.ops.latentfast_cpp
    x, ld, xs, out, hidden = cpp.vector_flow_inv_train(y, ctx, w1, b1, w2, b2, act, additive, passes)
    x_plain, ld_plain = cpp.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, passes)
    assert torch.equal(x, x_plain)
    # the log-det to rounding only: its last forward step writes the MLP output straight into
    # the saved tensor, at another alignment than vector_flow_inv's scratch, and MKL's GEMM
    # results can depend on the operands' alignment (unless MKL_CBWR is set; seen on an AMD
    # EPYC with AVX-512: a few ulps on 4 of 37 rows)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ld, ld_plain, rtol=0, atol=64 * eps * max(1.0, ld_plain.abs().max().item()))
    o = d if additive else 2 * d
    assert xs.shape == (k, b, d) and out.shape == (k, b, o) and hidden.shape == (k, b, h)
    assert torch.equal(xs[0], x)
    scale = 10 if dtype == torch.float64 else 100
    for i in range(k):  # the step's MLP at the saved input (differences: summation order only)
        hid_i = torch.relu(xs[i].double() @ w1[i].double().T + b1[i].double() + ctx[i].double())
        assert_close(hidden[i], hid_i, dtype=dtype, scale=scale, msg=f"hidden[{i}]")
        assert_close(out[i], hid_i @ w2[i].double().T + b2[i].double(), dtype=dtype, scale=scale, msg=f"out[{i}]")
    nxt = torch.cat([xs[1:], y[None]])  # step k's output: the next step's input, y for the last
    for i in range(k):  # xs[k]: step k's own inverse of its output
        xi, _ = cpp.vector_flow_inv(nxt[i], ctx[i:i + 1], w1[i:i + 1], b1[i:i + 1], w2[i:i + 1], b2[i:i + 1],
                                    act[i:i + 1], additive, passes)
        assert_close(xs[i], xi, dtype=dtype, scale=scale, msg=f"xs[{i}] vs step {i}'s inverse")
    if passes == d and dtype == torch.float64:  # the exact inverse of y = forward(x0): the forward's chain from x0
        assert_close(xs, xs_fwd, scale=100, msg="xs vs the forward's")  # (float32: a row of these stacks loses 8%)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile_rows,additive", [("5", False), ("0", False), ("5", True)])
@_NEEDS_CPP
def test_cpp_isa_clones_match_reference(monkeypatch, isa, dtype, tile_rows, additive):
    """The row loops (ReLU, gate forward/backward, inverse sweep) are built per instruction set
    (csrc/common/isa.h); each clone this CPU runs against the reference, forward, backward and
    inverse, with d = 37 and H = 29 so the 16-wide loops have a tail, on row tiles and on the
    whole-batch path, outputs poisoned first."""
    use_cpu_isa(monkeypatch, isa)
    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")
    monkeypatch.setenv("LATENTFAST_VF_TILE_ROWS", tile_rows)
    k, b, d, h = 2, 23, 37, 29
    p = _stack_params(k, b, d, h, additive, dtype, "cpu", seed=53)
    g = torch.Generator().manual_seed(54)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    gy, gl = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype), torch.randn(b, generator=g).to(dtype)
    cpp = torch.ops.latentfast_cpp
    args = (p["ctx"], p["w1"], p["b1"], p["w2"], p["b2"], p["act"], additive)
    y, ld, xs, out, _ = cpp.vector_flow_fwd(x, *args, True, False)
    grads = cpp.vector_flow_bwd(gy, gl, xs, out, p["ctx"], p["w1"], p["b1"], p["w2"], p["act"], additive, None)
    leaves = [t.detach().clone().requires_grad_() for t in (x, p["ctx"], p["w1"], p["b1"], p["w2"], p["b2"])]
    y0, l0, *_ = ref.vector_flow_stack(*leaves, p["act"], additive)
    want = torch.autograd.grad((y0 * gy).sum() + (l0 * gl).sum(), leaves)
    assert_close(y, y0, scale=10, msg="y")
    assert_close(ld, l0, scale=10, msg="logdet")
    for name, a, w in zip(("x", "ctx", "w1", "b1", "w2", "b2"), grads, want):
        assert_close(a, w, scale=100, msg=f"grad {name}")
    xr, ldr = cpp.vector_flow_inv(y, *args, d)
    x_ref, l_ref = ref.vector_flow_stack_inverse(y, *args, d)
    assert_close(xr, x_ref, scale=100, msg="inverse x")
    assert_close(ldr, l_ref, scale=100, msg="inverse logdet")


_SUBPROCESS_TILE_SCRIPT = """
import torch
import latentfast
from latentfast.reference import vector_flows as ref
g = torch.Generator().manual_seed(5)
k, b, d, h = 3, 23, 5, 7
x, w1, b1 = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(k, h, d, generator=g, dtype=torch.float64), torch.randn(k, h, generator=g, dtype=torch.float64)
w2, b2 = 0.3 * torch.randn(k, 2 * d, h, generator=g, dtype=torch.float64), torch.randn(k, 2 * d, generator=g, dtype=torch.float64)
ctx, act = torch.randn(k, b, h, generator=g, dtype=torch.float64), torch.ones(k, d, dtype=torch.float64)
gy, gl = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, generator=g, dtype=torch.float64)
cpp = torch.ops.latentfast_cpp
y, ld, xs, out, _ = cpp.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, False, True, False)
grads = cpp.vector_flow_bwd(gy, gl, xs, out, ctx, w1, b1, w2, act, False, None)
leaves = [t.clone().requires_grad_() for t in (x, ctx, w1, b1, w2, b2)]
y0, l0, *_ = ref.vector_flow_stack(*leaves, act, False)
want = torch.autograd.grad((y0 * gy).sum() + (l0 * gl).sum(), leaves)
worst = max(float(((a - w).abs().max() / w.abs().max())) for a, w in [(y, y0), (ld, l0), *zip(grads, want)])
print(worst)
"""


@_NEEDS_CPP
def test_cpp_row_tiles_aten_gemm_fallback():
    """The row-tile path calls sgemm_/dgemm_ directly, some with a transposed A (the weight
    gradients); LATENTFAST_ATEN_GEMM=1 makes it use at::mm_out/addmm_ instead (the path for a
    libtorch without those symbols). Tiles of 5 rows over a batch of 23."""
    env = {**os.environ, "LATENTFAST_ATEN_GEMM": "1", "LATENTFAST_VF_TILE_ROWS": "5", "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", _SUBPROCESS_TILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-10, run.stdout


def test_stack_noncontiguous_and_no_ctx(backend):
    dev = device_for(backend)
    p = _stack_params(2, 9, 6, 20, False, torch.float64, dev, seed=5, with_ctx=False)
    x = torch.randn(6, 9, dtype=torch.float64, device=dev).t()  # [9, 6], not contiguous
    y, ld = ops.vector_flow_stack(x, p["w1"], p["b1"], p["w2"], p["b2"], p["act"])
    y0, l0, *_ = ref.vector_flow_stack(x, None, p["w1"], p["b1"], p["w2"], p["b2"], p["act"], False)
    assert_close(y, y0)
    assert_close(ld, l0)


def test_stack_gradcheck_and_opcheck(backend):
    dev = device_for(backend)
    for additive in (False, True):
        p = _stack_params(2, 3, 3, 5, additive, torch.float64, dev, seed=11 + additive)
        x = torch.randn(3, 3, dtype=torch.float64, device=dev)
        leaves = [t.clone().requires_grad_() for t in (x, p["ctx"], p["w1"], p["b1"], p["w2"], p["b2"])]

        def public(x_, c_, w1, b1, w2, b2):
            return ops.vector_flow_stack(x_, w1, b1, w2, b2, p["act"], c_, additive)

        assert torch.autograd.gradcheck(public, leaves, **FAST_GC)
        lib = torch.ops.latentfast
        assert torch.autograd.gradcheck(lambda *a: lib.vector_flow_stack(*a, p["act"], additive), leaves, **FAST_GC)
        args = (x, p["ctx"], p["w1"], p["b1"], p["w2"], p["b2"], p["act"], additive)
        torch.library.opcheck(lib.vector_flow_stack, args)
        torch.library.opcheck(lib.vector_flow_stack_train, args)
        torch.library.opcheck(lib.vector_flow_stack_train, (*leaves, p["act"], additive))
        _, _, xs, out = ref.vector_flow_stack(*args)
        for c in (p["ctx"], None):
            torch.library.opcheck(lib.vector_flow_stack_backward,
                                  (torch.randn_like(x), torch.randn(3, dtype=torch.float64, device=dev), xs, out, c,
                                   p["w1"], p["b1"], p["w2"], p["act"], additive))
        torch.library.opcheck(lib.vector_flow_stack_inverse, (*args, 2))


def _flows(d, context_dim=0):
    return [
        vf.IAF(d, 19, n_steps=3, context_dim=context_dim),
        vf.MAF(d, 19, n_steps=2, context_dim=context_dim),
        vf.VectorAffineCoupling(max(d, 2), 19, n_steps=3, context_dim=context_dim),
        vf.VectorAdditiveCoupling(max(d, 2), 19, n_steps=3, context_dim=context_dim),
    ]


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 0.3)


@pytest.mark.parametrize("d", [1, 5])
def test_modules_invert_and_logdet_matches_jacobian(backend, d):
    dev = device_for(backend)
    for i, f in enumerate(_flows(d, context_dim=4)):
        f = f.double().to(dev)
        _perturb(f, seed=i)
        dim = f.dim
        z = torch.randn(6, dim, dtype=torch.float64, device=dev)
        h = torch.randn(6, 4, dtype=torch.float64, device=dev)
        x, ld = f(z, h)
        z2, ld2 = f.inverse(x, h)
        name = type(f).__name__
        assert_close(z2, z, scale=1e4, msg=f"{name} inverse")
        assert_close(ld2, ld, scale=1e4, msg=f"{name} logdet of the inverse")
        # log|det| against the float64 autograd Jacobian of the differentiable direction
        if isinstance(f, vf.MAF):
            jac = torch.autograd.functional.jacobian(lambda v: f.inverse(v[None], h[:1])[0][0], x[0])
            assert_close(-torch.linalg.slogdet(jac)[1], ld[0], scale=1e3, msg=name)
        else:
            jac = torch.autograd.functional.jacobian(lambda v: f(v[None], h[:1])[0][0], z[0])
            assert_close(torch.linalg.slogdet(jac)[1], ld[0], scale=1e3, msg=name)


def test_modules_invert_fp32(backend):
    dev = device_for(backend)
    for i, f in enumerate(_flows(7) + [vf.LULinear(7), vf.Permutation(7)]):
        f = f.to(dev)
        _perturb(f, seed=10 + i)
        z = torch.randn(33, 7, device=dev)
        x, ld = f(z)
        z2, ld2 = f.inverse(x)
        torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5, msg=type(f).__name__)
        torch.testing.assert_close(ld2, ld, rtol=1e-5, atol=1e-5)


def test_made_masks_are_autoregressive():
    deg_in, deg_h = vf.made_degrees(6, 13, torch.tensor([3, 0, 5, 1, 4, 2]))
    m1, m2 = vf.made_masks(deg_in, deg_h, 2)
    conn = (m2 @ m1)[:6] > 0  # output j depends on input i
    allowed = deg_in[:, None] > deg_in[None, :]
    assert not bool((conn & ~allowed).any())
    assert bool(conn[deg_in == 6].sum() == 5)  # the last output sees every other input


def test_made_flow_step_one_step(backend):
    dev = device_for(backend)
    f = vf.IAF(5, 11).double().to(dev)
    _perturb(f, seed=3)
    w1, b1, w2, b2, _, _ = f._args(torch.zeros(1, 5, dtype=torch.float64, device=dev), None)
    x = torch.randn(4, 5, dtype=torch.float64, device=dev)
    y, ld = ops.made_flow_step(x, w1[0], b1[0], w2[0], b2[0])
    m, s = (torch.relu(x @ w1[0].t() + b1[0]) @ w2[0].t() + b2[0]).chunk(2, 1)
    sig = torch.sigmoid(s)
    assert_close(y, sig * x + (1 - sig) * m)  # Kingma's gated update, written out
    assert_close(ld, sig.log().sum(1))
    x2, ld2 = ops.made_flow_step_inverse(y, w1[0], b1[0], w2[0], b2[0])
    assert_close(x2, x, scale=1e3)


def test_lu_linear_and_permutation_logdet():
    f = vf.LULinear(4).double()
    _perturb(f, 1)
    z = torch.randn(3, 4, dtype=torch.float64)
    x, ld = f(z)
    jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0][0], z[0])
    assert_close(torch.linalg.slogdet(jac)[1], ld[0])
    p = vf.Permutation(4, torch.tensor([2, 0, 3, 1]))
    assert torch.equal(p(z)[0][:, 0], z[:, 2])


@pytest.mark.skipif(interpreting(), reason="module-level modelling test; the kernels it calls are "
                    "checked against the reference above, and it runs too many launches to interpret")
def test_flow_distribution_api_and_density():
    torch.manual_seed(0)
    flow = vf.Flow(2, [vf.MAF(2, 16, n_steps=2), vf.LULinear(2), vf.VectorAffineCoupling(2, 16)]).double()
    _perturb(flow, 2)
    assert flow.sample((5, 3)).shape == (5, 3, 2)
    assert flow.sample().shape == (2,)
    x, logp = flow.sample_and_log_prob(40)
    assert_close(flow.log_prob(x), logp, scale=1e3)
    # the density integrates to one: a 2-D grid Riemann sum over a wide box
    g = torch.linspace(-12, 12, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    mass = flow.log_prob(grid).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1.0) < 0.02


def test_flow_with_a_base_distribution_of_the_users():
    """A base over vectors [d] (a correlated MultivariateNormal, an Independent Normal) gives
    log p(x) = log base(z) + log|det dz/dx| and draws from it; a base of the wrong shape
    (per-coordinate Normal: batch_shape (d,), log_prob [n, d]; another d) or not a Distribution
    is refused when the flow is made. Before, such a base failed later in a reshape or a
    broadcast, deep in log_prob."""
    torch.manual_seed(0)
    cov = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    for base in (torch.distributions.MultivariateNormal(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), cov),
                 torch.distributions.Independent(torch.distributions.Normal(
                     torch.zeros(3, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)), 1)):
        flow = vf.Flow(3, [vf.LULinear(3)], base=base).double()
        _perturb(flow, 3)
        x = torch.randn(5, 3, dtype=torch.float64)
        w = flow.transforms[0].weights()[0]  # y = z W^T + b: z = (x - b) W^-T, log|det dz/dx| = -log|det W|
        z = torch.linalg.solve(w, (x - flow.transforms[0].bias).T).T
        want = base.log_prob(z) - torch.linalg.slogdet(w)[1]
        torch.testing.assert_close(flow.log_prob(x), want, rtol=1e-10, atol=1e-10)
        s, logp = flow.sample_and_log_prob(4)
        torch.testing.assert_close(flow.log_prob(s), logp, rtol=1e-9, atol=1e-9)
    for bad in (torch.distributions.Normal(torch.zeros(3), torch.ones(3)), torch.distributions.Normal(0.0, 1.0),
                torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))):
        with pytest.raises(ValueError, match=r"base must be one distribution over vectors \[3\]"):
            vf.Flow(3, [vf.LULinear(3)], base=bad)
    with pytest.raises(TypeError, match="torch.distributions.Distribution"):
        vf.Flow(3, [vf.LULinear(3)], base=torch.zeros(3))


def test_flow_log_prob_takes_any_batch_shape_as_a_distribution_does():
    """log_prob(sample(shape)) has shape `shape`, as for a torch Distribution: x [..., d] with
    any leading shape (one point, [S, B, d], an empty batch), each value that of the same
    point in a flat [B, d] call; n = 0 samples are empty; a context follows x's leading
    shape."""
    torch.manual_seed(0)
    flow = vf.Flow(3, [vf.MAF(3, 8, n_steps=2), vf.LULinear(3)]).double()
    _perturb(flow, 3)
    assert flow.batch_shape == () and flow.event_shape == (3,) and flow.has_rsample
    x = flow.sample((4, 5))
    assert x.shape == torch.Size((4, 5)) + flow.batch_shape + flow.event_shape  # as a Distribution's
    flat = flow.log_prob(x.reshape(20, 3))
    assert flow.log_prob(x).shape == (4, 5)
    assert_close(flow.log_prob(x), flat.reshape(4, 5))
    assert_close(flow.log_prob(x[1, 2]), flat[7])
    assert flow.log_prob(x[1, 2]).shape == ()
    assert flow.log_prob(x[:0]).shape == (0, 5) and flow.log_prob(x[0, :0]).shape == (0,)
    assert flow.sample((0,)).shape == (0, 3) and flow.sample(0).shape == (0, 3)
    z, lp = flow.sample_and_log_prob(0)
    assert z.shape == (0, 3) and lp.shape == (0,)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        flow.log_prob(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be"):
        flow.sample_and_log_prob(-1)
    cflow = vf.Flow(4, [vf.IAF(4, 8, n_steps=2, context_dim=3)]).double()
    _perturb(cflow, 4)
    y = torch.randn(2, 5, 4, dtype=torch.float64)
    c = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_close(cflow.log_prob(y, c), cflow.log_prob(y.reshape(10, 4), c.reshape(10, 3)).reshape(2, 5))
    with pytest.raises(ValueError, match="context must be"):
        cflow.log_prob(y, c[0])
    # sample takes the context the same way: [*sample_shape, c] (it had wanted [n, c] only),
    # a single sample's [c], or flattened [n, c]; the draws as with the flattened context
    for shape, ctx in (((2, 5), c), ((), c[0, 0]), ((10,), c.reshape(10, 3))):
        torch.manual_seed(1)
        got = cflow.sample(shape, context=ctx)
        torch.manual_seed(1)
        want = cflow.sample(ctx.numel() // 3, context=ctx.reshape(-1, 3))
        assert got.shape == (*shape, 4)
        assert_close(got, want.reshape(*shape, 4))
        assert cflow.log_prob(got, ctx).shape == shape
    with pytest.raises(ValueError, match="context must be"):
        cflow.sample((2, 5), context=c[:1])


def test_transforms_take_any_leading_shape(backend):
    """Each transform's forward and inverse take x [..., d] as torch.distributions transforms
    do (one vector [d], samples [S, B, d]) with a context [..., c] of the same leading shape,
    each row's values those of the flat [B, d] call and logdet [...]; gradients reach the
    inputs (before, anything but [B, d] raised, though Flow.log_prob takes [..., d]). A
    context of another leading shape raises."""
    d, c = 5, 3
    x = torch.randn(2, 3, d, dtype=torch.float64)
    ctx = torch.randn(2, 3, c, dtype=torch.float64)
    layers = [*_flows(d, context_dim=c), vf.LULinear(d), vf.Permutation(d, torch.tensor([2, 0, 4, 1, 3]))]
    for i, layer in enumerate(layers):
        layer = layer.double()
        _perturb(layer, i)
        h = ctx if getattr(layer, "context_dim", 0) else None
        for method in (layer.forward, layer.inverse):
            flat_y, flat_ld = method(x.reshape(6, d), None if h is None else h.reshape(6, c))
            leaf = x.clone().requires_grad_()
            y, ld = method(leaf, h)
            assert y.shape == (2, 3, d) and ld.shape == (2, 3)
            assert_close(y, flat_y.reshape(2, 3, d))
            assert_close(ld, flat_ld.reshape(2, 3))
            (y.sum() + ld.sum()).backward()
            assert leaf.grad.shape == x.shape and torch.isfinite(leaf.grad).all()
            y1, ld1 = method(x[1, 2], None if h is None else h[1, 2])
            assert y1.shape == (d,) and ld1.shape == ()
            assert_close(y1, flat_y[5])
            assert_close(ld1, flat_ld[5])
            if h is not None:
                with pytest.raises(ValueError, match=r"context must be \[2, 3, c\] to go with x"):
                    method(x, h[0])


def test_flow_called_as_a_module_is_log_prob(backend, device="cpu"):
    """flow(x, context) is log_prob, as module wrappers need (Flow had no forward: calling it,
    DistributedDataParallel and torch.func.functional_call raised NotImplementedError). An
    ensemble of conditional flows stacked with torch.func.stack_module_state and run by vmap
    gives each flow's log_prob, and per-sample gradients by vmap(grad) equal autograd's."""
    from torch.func import functional_call, grad, stack_module_state, vmap
    flows = []
    for seed in range(3):
        torch.manual_seed(seed)
        flow = vf.Flow(4, [vf.IAF(4, 8, n_steps=2, context_dim=3), vf.LULinear(4), vf.Permutation(4),
                           vf.VectorAffineCoupling(4, 8, context_dim=3)]).double().to(device)
        _perturb(flow, seed)
        flows.append(flow)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    c = torch.randn(5, 3, dtype=torch.float64, device=device)
    assert_close(flows[0](x, c), flows[0].log_prob(x, c))
    params, buffers = stack_module_state(flows)
    template = copy.deepcopy(flows[0]).to("meta")
    got = vmap(lambda p, b: functional_call(template, (p, b), (x, c)))(params, buffers)
    assert_close(got, torch.stack([f.log_prob(x, c) for f in flows]).detach())
    flow = flows[1]
    named = {k: v.detach() for k, v in flow.named_parameters()}
    bufs = dict(flow.named_buffers())
    per_sample = vmap(grad(lambda p, xi, ci: functional_call(flow, (p, bufs), (xi[None], ci[None])).sum()),
                      in_dims=(None, 0, 0))(named, x, c)
    for i in range(x.shape[0]):
        flow.zero_grad()
        flow.log_prob(x[i:i + 1], c[i:i + 1]).sum().backward()
        for k, p in flow.named_parameters():
            assert_close(per_sample[k][i], p.grad, msg=k)


@pytest.mark.skipif(interpreting(), reason="module-level modelling test; the kernels it calls are "
                    "checked against the reference above, and it runs too many launches to interpret")
def test_flow_trains_on_two_moons():
    from latentfast.data.toy import two_moons

    torch.manual_seed(0)
    x = two_moons(512, seed=0)
    # The gated update only contracts towards the base, so LU layers carry the scale.
    flow = vf.Flow(2, [vf.MAF(2, 32, n_steps=2), vf.LULinear(2), vf.MAF(2, 32, n_steps=2), vf.LULinear(2),
                       vf.VectorAffineCoupling(2, 32, n_steps=2)])
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    first = -flow.log_prob(x).mean().item()
    for _ in range(300):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.8, (first, loss.item())


def test_bad_inputs_raise():
    f = vf.IAF(4, 8, context_dim=3)
    with pytest.raises(ValueError, match="context"):
        f(torch.randn(2, 4))
    with pytest.raises(ValueError, match="size 4"):
        f(torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(ValueError, match="context must be"):
        f(torch.randn(2, 4), torch.randn(3, 3))
    with pytest.raises(TypeError):
        f(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3))
    lu = vf.LULinear(4)  # (a RuntimeError from its matmul before)
    for call in (lu, lu.inverse, vf.Flow(4, [lu]).log_prob, vf.Flow(4, [lu])):
        with pytest.raises(TypeError, match="pass .*to\\(torch.float32\\)"):
            call(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        vf.Flow(4, [vf.MAF(4, 8)]).log_prob(torch.full((2, 4), float("nan")))
    p = _stack_params(2, 3, 4, 5, False, torch.float32, "cpu", 0, with_ctx=False)
    with pytest.raises(ValueError, match="only 0 and 1"):
        ops.vector_flow_stack(torch.randn(3, 4), p["w1"], p["b1"], p["w2"], p["b2"], p["act"] * 0.5)
    # act is checked once per version of the tensor (a layer's buffer), so a write is seen
    maf = vf.MAF(4, 8, n_steps=2)
    maf(torch.randn(3, 4))
    maf.act[0, 1] = 0.5
    with pytest.raises(ValueError, match="only 0 and 1"):
        maf(torch.randn(3, 4))
    maf.act[0, 1] = 1.0
    maf(torch.randn(3, 4))
    maf.load_state_dict({**maf.state_dict(), "act": torch.full_like(maf.act, 2.0)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        maf(torch.randn(3, 4))
    # a Permutation's buffers from a state dict: a repeated index, or an inv_perm that does not undo perm
    layer = vf.Permutation(4, torch.tensor([2, 0, 3, 1]))
    z = torch.randn(3, 4)
    assert torch.equal(layer.inverse(layer(z)[0])[0], z)
    for perm, inv in (([2, 0, 2, 1], [1, 3, 0, 2]), ([2, 0, 3, 1], [0, 1, 2, 3])):
        layer.load_state_dict({"perm": torch.tensor(perm), "inv_perm": torch.tensor(inv)})
        with pytest.raises(ValueError, match="inv_perm its inverse"):
            layer.inverse(z)
        with pytest.raises(ValueError, match="inv_perm its inverse"):
            layer(z)
    layer.load_state_dict({"perm": torch.tensor([3, 1, 0, 2]), "inv_perm": torch.tensor([2, 1, 3, 0])})
    assert torch.equal(layer.inverse(layer(z)[0])[0], z)
    with pytest.raises(ValueError, match="additive"):
        ops.vector_flow_stack(torch.randn(3, 4), p["w1"], p["b1"], p["w2"], p["b2"], additive=True)
    with pytest.raises(ValueError, match="K >= 1"):
        ops.vector_flow_stack(torch.randn(3, 5), p["w1"], p["b1"], p["w2"], p["b2"])
    with pytest.raises(ValueError, match="kind"):
        vf.MaskedFlowStack(4, kind="spline")
    with pytest.raises(ValueError, match="permutation"):
        vf.made_degrees(3, 4, torch.tensor([0, 0, 1]))
    for layer in (vf.Permutation(4), vf.LULinear(4)):  # a wrong width (Permutation used to cut it)
        with pytest.raises(ValueError, match=r"z must be \[B, 4\]"):
            layer(torch.randn(2, 5))
        with pytest.raises(ValueError, match=r"x must be \[B, 4\]"):
            layer.inverse(torch.randn(2, 3))


@pytest.mark.parametrize("autocast", [False, True])
def test_masked_flow_checks_its_act_buffer_once(monkeypatch, autocast):
    """A MAF / IAF layer's act buffer is checked (one read-back, a GPU synchronisation) on its
    first call and then not again while the buffer is unchanged, also under autocast with a
    bfloat16 input, where the layer had cast act to the input's dtype, a new tensor (so a new
    check) on every call."""
    monkeypatch.setenv("LATENTFAST_CHECK_FINITE", "0")
    torch.manual_seed(0)
    maf = vf.MAF(4, 8, n_steps=2)
    z = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        z_in = z.bfloat16() if autocast else z
        maf(z_in)
        maf.inverse(z_in)  # (on Triton, also the first read of the dependency graph)
        reads = count_host_reads(monkeypatch)
        y, ld = maf(z_in)
        maf.inverse(z_in)
        assert reads == []
        assert y.dtype == ld.dtype == torch.float32
        maf.act[0, 1] = 0.5  # a write is still seen
        with pytest.raises(ValueError, match="only 0 and 1"):
            maf(z_in)


@pytest.mark.skipif(interpreting(), reason="torch.compile traced once on the default backends")
def test_compile_fullgraph():
    flow = vf.MAF(6, 16, n_steps=2)
    x = torch.randn(9, 6)
    compiled = torch.compile(lambda v: flow.inverse(v), fullgraph=True)
    z, ld = compiled(x)
    z0, ld0 = flow.inverse(x)
    torch.testing.assert_close(z, z0)
    torch.testing.assert_close(ld, ld0)


def test_gaussian_base_log_prob():
    flow = vf.Flow(3, [])
    x = torch.randn(4, 3)
    expect = -0.5 * (x ** 2).sum(1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(flow.log_prob(x), expect)


def test_made_flow_step_at_the_widest_size(backend):
    """d = 512, H = 1024 (the largest size the op is meant for): values, gradients, inverse."""
    dev = device_for(backend)
    f = vf.IAF(512, 1024).double().to(dev)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a trained-looking perturbation (fan-in 1024: keep the gates away from 0)
        for p in f.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 0.03)
    x = torch.randn(5, 512, dtype=torch.float64, device=dev)
    w1, b1, w2, b2, _, _ = f._args(x, None)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1[0], b1[0], w2[0], b2[0])]
    y, ld = ops.made_flow_step(*leaves)
    gy = torch.randn_like(y)
    g = torch.autograd.grad((y * gy).sum() + ld.sum(), leaves)
    y0, l0, *_ = ref.vector_flow_stack(leaves[0], None, *(t[None] for t in leaves[1:]),
                                       torch.ones(1, 512, dtype=torch.float64, device=dev), False)
    g0 = torch.autograd.grad((y0 * gy).sum() + l0.sum(), leaves)
    assert_close(y, y0, scale=10)
    assert_close(ld, l0, scale=100)
    for a, e in zip(g, g0):
        assert_close(a, e, scale=100)
    if interpreting():
        return  # 512 sweeps x 16 hidden tiles is minutes in the interpreter; smaller d covers the sweeps
    x2, _ = ops.made_flow_step_inverse(y.detach(), *(t.detach() for t in leaves[1:]))
    assert_close(x2, x, scale=1e4)


@pytest.mark.parametrize("kind", ["made", "made_random_order", "coupling", "coupling_one_sweep"])
@pytest.mark.parametrize("variant", ["affine", "additive", "ctx"])
def test_inverse_gradients_are_the_implicit_function_derivatives(backend, kind, variant):
    """With gradients wanted, the inverse (kernel) is differentiated by the implicit-function
    theorem; its derivatives must be those of the exact inverse x*(y, W, ctx): dL/dy = u and
    dL/dtheta = -u^T df/dtheta at x*, with J_f(x*)^T u = dL/dx (J from autograd of the
    reference forward, per row), for a cotangent on x and one on the log-det."""
    dev = device_for(backend)
    k, d, h, b = 2, 4, 6, 3
    additive = variant == "additive"
    w1, b1, w2, b2 = (t.to(dev) for t in _masked_params(kind.replace("_one_sweep", ""), k, d, h, seed=5))
    if additive:
        w2, b2 = w2[:, :d].contiguous(), b2[:, :d].contiguous()
    masks = (w1 != 0).to(w1.dtype), (w2 != 0).to(w2.dtype)
    act = torch.ones(k, d, dtype=torch.float64, device=dev)
    n_passes = None
    if kind == "coupling_one_sweep":  # as the coupling modules run: one half conditions, one sweep
        first = (torch.arange(d, device=dev) < d // 2).to(act)
        act = torch.stack([1 - first if i % 2 == 0 else first for i in range(k)])
        n_passes = 1
    g = torch.Generator().manual_seed(6)
    y = torch.randn(b, d, generator=g, dtype=torch.float64).to(dev)
    c = (0.5 * torch.randn(k, b, h, generator=g, dtype=torch.float64)).to(dev) if variant == "ctx" else None
    cot = torch.randn(b, d, generator=g, dtype=torch.float64).to(dev)
    cot_ld = torch.randn(b, generator=g, dtype=torch.float64).to(dev)
    leaves = [t.clone().requires_grad_() for t in (y, w1, b1, w2, b2, *([c] if c is not None else []))]
    yl, w1l, b1l, w2l, b2l, *cl = leaves
    x, ld = ops.vector_flow_stack_inverse(yl, w1l * masks[0], b1l, w2l * masks[1], b2l, act,
                                          cl[0] if cl else None, additive, n_passes)
    got = torch.autograd.grad((x * cot).sum() + (ld * cot_ld).sum(), leaves)

    with torch.no_grad():
        x_star = ops.vector_flow_stack_inverse(y, w1, b1, w2, b2, act, c, additive, n_passes)[0]  # the kernel
    assert_close(x.detach(), x_star, msg="the differentiable path's inverse")

    def fwd(xx, w1_, b1_, w2_, b2_, *c_):
        return ref.vector_flow_stack(xx, c_[0] if c_ else None, w1_ * masks[0], b1_, w2_ * masks[1], b2_, act,
                                     additive)[:2]

    params = [t.clone().requires_grad_() for t in (w1, b1, w2, b2, *([c] if c is not None else []))]
    xs_ = x_star.clone().requires_grad_()
    _, ld_star = fwd(xs_, *params)
    # the log-det's cotangent adds its derivative wrt x* to the cotangent on x
    if ld_star.requires_grad:  # (the additive steps' log-det is a constant 0)
        cot_x = cot + torch.autograd.grad((ld_star * cot_ld).sum(), xs_, retain_graph=True)[0]
    else:
        cot_x = cot
    rows = []
    for i in range(b):
        ci = [t[:, i:i + 1] for t in ([c] if c is not None else [])]
        jac = torch.autograd.functional.jacobian(lambda r: fwd(r[None], w1, b1, w2, b2, *ci)[0][0], x_star[i])
        rows.append(torch.linalg.solve(jac.T, cot_x[i]))
    u = torch.stack(rows)
    y_star, ld_star = fwd(x_star, *params)
    direct = torch.autograd.grad((y_star * -u).sum() + (ld_star * cot_ld).sum(), params)
    want = [u, *direct]
    for name, a, e in zip(("y", "w1", "b1", "w2", "b2", "ctx"), got, want):
        assert_close(a, e, scale=1e3, msg=f"d/d{name}")


@pytest.mark.parametrize("kind", ["made_random_order", "coupling_one_sweep"])
def test_inverse_derivatives_at_masked_entries_agree_across_routes(backend, kind):
    """Masked weights given as leaves themselves (a user of the op; the modules multiply by
    their masks, which zeroes these entries' gradients): every route gives the masked (zero)
    entries the derivative of the exact inverse, as central differences of the inverse solved
    with 4 d passes show, the kernels' implicit backward as well as torch.func and double
    backward (the reference's sweeps). Differentiating the reference's sweeps from x = y gave
    there the derivative of the truncated iteration instead (5e-4 relative off for a MADE step;
    up to 7 absolute on tests/ops/op_cases.py's draw)."""
    dev = device_for(backend)
    k, d, h, b = 2, 4, 6, 3
    w1, b1, w2, b2 = (t.to(dev) for t in _masked_params(kind.replace("_one_sweep", ""), k, d, h, seed=9))
    act, n_passes = None, None
    if kind == "coupling_one_sweep":
        first = (torch.arange(d, device=dev) < d // 2).to(w1)
        act, n_passes = torch.stack([1 - first, first]), 1
    g = torch.Generator().manual_seed(10)
    y = torch.randn(b, d, generator=g, dtype=torch.float64).to(dev)
    cot = torch.randn(b, d, generator=g, dtype=torch.float64).to(dev)
    cot_ld = torch.randn(b, generator=g, dtype=torch.float64).to(dev)

    def loss(yy, w1_, b1_, w2_, b2_, passes=n_passes):
        x, ld = ops.vector_flow_stack_inverse(yy, w1_, b1_, w2_, b2_, act, None, False, passes)
        return (x * cot).sum() + (ld * cot_ld).sum()

    inputs = (y, w1, b1, w2, b2)
    leaves = [t.clone().requires_grad_() for t in inputs]
    implicit = torch.autograd.grad(loss(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in inputs]
    double = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)  # the reference route
    func = torch.func.grad(loss, argnums=(0, 1, 2, 3, 4))(*inputs)
    for name, a, e1, e2 in zip(("y", "w1", "b1", "w2", "b2"), implicit, double, func):
        assert_close(e1.detach(), a, scale=10, msg=f"d/d{name}, double backward")
        assert_close(e2, a, scale=10, msg=f"d/d{name}, torch.func.grad")
    masked = []  # six masked entries of each weight, spread over it
    for i, w in ((1, w1), (3, w2)):
        zeros = (w == 0).nonzero()
        masked += [(i, tuple(int(v) for v in zeros[j])) for j in torch.linspace(0, len(zeros) - 1, 6).long()]
    checked = 0
    for i, idx in masked:
        def at(delta):
            t = inputs[i].clone()
            t[idx] += delta
            with torch.no_grad():
                return loss(*inputs[:i], t, *inputs[i + 1:], passes=4 * d).item()
        want = (at(1e-6) - at(-1e-6)) / 2e-6
        got = implicit[i][idx].item()
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (i, idx, got, want)
        checked += abs(want) > 1e-3
    assert checked >= 3  # entries whose derivative is not ~0


def test_reference_inverse_runs_the_derivative_sweeps_only_when_differentiated(monkeypatch):
    """The reference backend's inverse without gradients (and under the implicit backward) runs
    n_passes sweeps and one log-det evaluation per step; the n_passes + 1 derivative sweeps
    from the solution run where its own graph is differentiated (the public function under
    torch.func, the transform route of a direct op call)."""
    k, d, h = 2, 4, 6
    w1, b1, w2, b2 = _masked_params("made", k, d, h, seed=3)
    y = torch.randn(3, d, dtype=torch.float64)
    calls = []
    real = ref.flow_step_params
    monkeypatch.setattr(ref, "flow_step_params", lambda *a: calls.append(1) or real(*a))

    def count(fn):
        calls.clear()
        fn()
        return len(calls)

    with latentfast.use_backend("reference"):
        with torch.no_grad():
            assert count(lambda: ops.vector_flow_stack_inverse(y, w1, b1, w2, b2)) == k * (d + 1)
        assert count(lambda: torch.func.grad(lambda yy: ops.vector_flow_stack_inverse(yy, w1, b1, w2, b2)[0].sum())(y)
                     ) == k * (2 * d + 2)
        assert count(lambda: torch.func.grad(lambda yy: torch.ops.latentfast.vector_flow_stack_inverse(
            yy, None, w1, b1, w2, b2, torch.ones(k, d, dtype=y.dtype), False, d)[0].sum())(y)) == k * (2 * d + 2)


@pytest.mark.parametrize("kind", ["made", "made_random_order", "coupling"])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("d", [5, 17])
@_NEEDS_CPP
def test_cpp_inverse_grad_matches_dense_solve(monkeypatch, kind, additive, dtype, isa, d):
    """vector_flow_inv_grad (the inverse's backward: one transposed solve per step in
    dependency order) against a dense solve: grad y = J_F^-T (grad_x + gld d logdet / dx) with
    J_F and d logdet / dx from autograd through the reference stack at x, row by row.
    K = 3, B = 21 (rows in lanes of 16 floats / 8 doubles in the AVX-512 clone, 8 / 4 in AVX2,
    4 / 2 in the baseline: full blocks and a partial one), d = 5 and 17, H = 37 (full L x L
    transposes and leftover columns), a context, some
    act = 0 dimensions, each instruction-set clone this CPU runs; output poisoned first.
    Without a dependency order within n_passes levels (n_passes too small, or dense weights:
    a cycle) the op returns a 1-D empty tensor (B = 0 gives [0, d])."""
    use_cpu_isa(monkeypatch, isa)
    monkeypatch.setenv("LATENTFAST_VF_POISON", "1")
    c = _inv_grad_case(kind, additive, dtype, d, "cpu")
    ga, gld, xs, out, ctx, w1, b1, w2, act = (c[n] for n in ("ga", "gld", "xs", "out", "ctx", "w1", "b1", "w2", "act"))
    hidden = torch.relu(torch.baddbmm(b1[:, None, :] + ctx, xs, w1.transpose(1, 2)))
    inv_grad = torch.ops.latentfast_cpp.vector_flow_inv_grad
    got = inv_grad(ga, gld, xs, out, hidden, w1, w2, act, additive, d)
    assert_close(got, c["want"], dtype=dtype, scale=10)
    if kind != "coupling":  # a coupling step has one level, a MADE step here up to d - 1
        assert inv_grad(ga, gld, xs, out, hidden, w1, w2, act, additive, 1).shape == (0,)
    dense1, dense2 = w1 + (w1 == 0).to(dtype), w2 + (w2 == 0).to(dtype)
    assert inv_grad(ga, gld, xs, out, hidden, dense1, dense2, act, additive, d).shape == (0,)
    assert inv_grad(ga[:0], gld[:0], xs[:, :0], out[:, :0], hidden[:, :0], w1, w2, act, additive, d).shape == (0, d)


def _inv_grad_case(kind, additive, dtype, d, dev):
    """Inputs of the inverse's backward solve and its answer by a dense solve: grad y =
    J_F^-T (grad_x + gld d logdet / dx), J_F and d logdet / dx from autograd through the
    reference stack at x, row by row, in float64. K = 3, B = 21, H = 37, a context, some
    act = 0 dimensions (couplings: halves alternating, as the modules run)."""
    k, b, h = 3, 21, 37
    w1, b1, w2, b2 = _masked_params(kind, k, d, h, seed=3)
    w1 = w1 * (2.0 / d) ** 0.5  # gates' s within about +-10 (unscaled, d = 17 reaches -44: sigma = 0 in float32)
    w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
    if additive:
        w2, b2 = w2[:, :d].contiguous(), b2[:, :d].contiguous()
    act = torch.ones(k, d, dtype=dtype)
    if kind == "coupling":  # as the modules run: halves alternating
        first = (torch.arange(d) < d // 2).to(dtype)
        act = torch.stack([1 - first if i % 2 == 0 else first for i in range(k)])
    else:
        act[0, 2] = act[2, 0] = 0
    g = torch.Generator().manual_seed(4)
    x, ga = (torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    gld = torch.randn(b, generator=g, dtype=torch.float64).to(dtype)
    ctx = (0.5 * torch.randn(k, b, h, generator=g, dtype=torch.float64)).to(dtype)
    _, _, xs, out = ref.vector_flow_stack(x, ctx, w1, b1, w2, b2, act, additive)
    p64 = [t.double() for t in (ctx, w1, b1, w2, b2, act)]
    rows = []
    for i in range(b):
        def fwd(r):
            c = p64[0][:, i:i + 1]
            return ref.vector_flow_stack(r[None], c, *p64[1:], additive)[:2]
        xi = x[i].double()
        jac = torch.autograd.functional.jacobian(lambda r: fwd(r)[0][0], xi)
        dld = torch.autograd.functional.jacobian(lambda r: fwd(r)[1][0], xi)
        rows.append(torch.linalg.solve(jac.T, ga[i].double() + gld[i].double() * dld))
    case = dict(ga=ga, gld=gld, xs=xs, out=out, ctx=ctx, w1=w1, b1=b1, w2=w2, act=act)
    case = {n: t.to(dev) for n, t in case.items()}
    case["want"] = torch.stack(rows)
    return case


@pytest.mark.parametrize("kind", ["made", "made_random_order", "coupling"])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [5, 17])
@_NEEDS_TRITON
def test_triton_inverse_grad_matches_dense_solve(kind, additive, dtype, d):
    """The Triton port of the backward's one-pass solve (kernels.vector_flows.vector_flow_inv_grad,
    hidden layers recomputed in the kernel) against the same dense solve as the C++ op; it
    declines (None) without a dependency order within n_passes levels; B = 0 gives [0, d]."""
    from latentfast.kernels import vector_flows as tk

    c = _inv_grad_case(kind, additive, dtype, d, device_for("triton"))
    args = [c[n] for n in ("ga", "gld", "xs", "out", "ctx", "w1", "b1", "w2", "act")]
    got = tk.vector_flow_inv_grad(*args, additive, d)
    assert_close(got, c["want"], dtype=dtype, scale=10)
    ga, gld, xs, out, ctx, w1, b1, w2, act = args
    if kind != "coupling":
        assert tk.vector_flow_inv_grad(*args, additive, 1) is None
    dense1, dense2 = w1 + (w1 == 0).to(dtype), w2 + (w2 == 0).to(dtype)
    assert tk.vector_flow_inv_grad(ga, gld, xs, out, ctx, dense1, b1, dense2, act, additive, d) is None
    empty = tk.vector_flow_inv_grad(ga[:0], gld[:0], xs[:, :0], out[:, :0], ctx[:, :0], w1, b1, w2, act, additive, d)
    assert empty.shape == (0, d)


@_NEEDS_TRITON
def test_triton_training_step_reads_the_dependency_graph_back_once(monkeypatch):
    """A differentiable inverse on the triton backend (forward: the one-pass inverse's plan,
    backward: the solve's) takes the weights' dependency graph from one host read-back
    (_graph's memo of the same tensors at the same versions); other tensors, or an
    in-place change of a weight, read it again, and the plans follow the new zero pattern."""
    from latentfast.kernels import vector_flows as tk
    from latentfast.ops.vector_flows import vector_flow_stack_inverse

    dev = device_for("triton")
    k, d, h = 2, 5, 11
    w1, b1, w2, b2 = (t.to(dev).requires_grad_() for t in _mixed_params(k, d, h, seed=61, additive=False))
    act = torch.ones(k, d, dtype=torch.float64, device=dev)
    y = torch.randn(4, d, generator=torch.Generator().manual_seed(62), dtype=torch.float64).to(dev)
    reads = []
    levels = tk._levels
    monkeypatch.setattr(tk, "_levels", lambda dep: reads.append(1) or levels(dep))
    tk._plans.clear()
    with latentfast.use_backend("triton"):
        x, ld = vector_flow_stack_inverse(y, w1, b1, w2, b2, act, n_passes=d)
        (x.sum() + ld.sum()).backward()
        assert len(reads) == k, "forward and backward should share one read-back of the graph"
        assert tk._inverse_plan(w1, w2, act, False, d)[2].tolist() == [1, 1] and len(reads) == k
        w2_again = w2.detach() * 1  # another tensor with the same values, at version 0 like w2
        dense = w1.detach() + (w1.detach() == 0).to(w1.dtype)  # the same version as w1 (0)
        assert w1._version == dense._version == w2._version == w2_again._version == 0
        with torch.no_grad():
            w1[1].fill_(0.0)  # step 1 now has no dependencies: one level, so no plan at min_levels = 2
        assert tk._inverse_plan(w1, w2, act, False, d)[2].tolist() == [1, 0]
        assert len(reads) == 2 * k, "an in-place change of a weight must invalidate the memo"
        assert tk._inverse_plan(w1, w2_again, act, False, d)[2].tolist() == [1, 0]
        assert len(reads) == 3 * k, "another tensor, even with equal values, reads the graph again"
        assert tk._inverse_plan(dense, w2_again, act, False, d) is None, "a dense first layer leaves no order"
        assert len(reads) == 4 * k


@_NEEDS_TRITON
def test_triton_inverse_reads_nothing_back_once_planned(monkeypatch, device="cpu"):
    """The Triton inverse reads a layer's dependency graph back to the host (a GPU
    synchronisation) to plan its order. Without autograd (sampling, evaluation) a layer hands
    the same masked weights to the op call after call, and the graph and the plan's device
    tensors are remembered per layer: after the first call nothing is read back, with two MAF
    layers taking turns (the memo had held one stack, and the layer's masked weights were new
    tensors on every call, so every call read back; the count here missed it, counting no
    .cpu()). Training steps read nothing back either: a layer's inverse takes the graph from
    its masks (ops.vector_flows.weights_masked_by), constant buffers read back once, where the
    weights are new products at every step (two reads a step before, one per layer)."""
    from latentfast.kernels import vector_flows as tk
    monkeypatch.setenv("LATENTFAST_CHECK_FINITE", "0")
    reads = count_host_reads(monkeypatch)
    torch.manual_seed(0)
    flow = vf.Flow(4, [vf.MAF(4, 8, n_steps=2), vf.MAF(4, 8, n_steps=2),
                       vf.VectorAffineCoupling(4, 8), vf.IAF(4, 8, n_steps=2)]).to(device)
    z = torch.randn(5, 4, device=device)
    with latentfast.use_backend("triton"):
        with torch.no_grad():
            flow.sample((3,))  # the first call reads each layer's graph
            reads.clear()
            for _ in range(3):
                flow.sample((3,))
                flow.sample_and_log_prob(4)
            assert reads == []
        flow.log_prob(z).sum().backward()  # (the first inverse of the coupling and the IAF)
        reads.clear()
        monkeypatch.setattr(tk, "_PLANS_MAX", 4)
        for _ in range(3):  # training steps: the graph comes from the layers' masks, read once
            # (3 steps adopt 9 graphs for the backwards, past the memo's 4 entries here)
            flow.rsample((3,)).sum().backward()
            flow.log_prob(z).sum().backward()  # (a MAF's density is its fast direction)
            with torch.no_grad():
                for p in flow.parameters():
                    p.mul_(0.99)  # (an optimizer step: new weight versions)
        assert reads == []


@_NEEDS_TRITON
def test_triton_inverse_planned_from_the_masks_inverts_sparser_weights(device="cpu"):
    """A layer's Triton inverse plans its order from the masks' graph, which contains the
    weights' own: with exact zeros in the weights (a sparser graph, fewer levels) the inverse
    is still the exact one, as on the reference; masks loaded from a state dict are planned
    anew."""
    torch.manual_seed(4)
    maf = vf.MAF(5, 12, n_steps=2).to(device).double()
    with torch.no_grad():
        maf.w1[:, :, 0] = 0.0  # no hidden unit sees dimension 0
        maf.w2[0, :, :6] = 0.0
    z = torch.randn(7, 5, dtype=torch.float64, device=device)
    with latentfast.use_backend("triton"):
        x, ld = maf(z)  # (a MAF's sampling direction is the sequential one: the stack's inverse)
        z_again, _ = maf.inverse(x)
    with latentfast.use_backend("reference"):
        x_ref, ld_ref = maf(z)
    assert_close(z_again, z)
    assert_close(x, x_ref)
    assert_close(ld, ld_ref)
    # the two steps' masks swapped: each step's autoregressive order reversed, so the plan
    # made for the old masks would solve the dimensions in the wrong order
    maf.load_state_dict({**maf.state_dict(), "mask1": maf.mask1.flip(0), "mask2": maf.mask2.flip(0)})
    with latentfast.use_backend("triton"):
        x, _ = maf(z)
    with latentfast.use_backend("reference"):
        x_ref, _ = maf(z)
    assert_close(x, x_ref)


@pytest.mark.skipif(not interpreting(), reason="on CUDA the GPU row blocks are the default")
@_NEEDS_TRITON
def test_triton_kernels_with_the_gpu_row_blocks(monkeypatch):
    """Under the interpreter the vector-flow kernels take at most 16 rows a program; on a GPU
    _blocks and _rows_for_registers give 32 at small d. The same checks with the GPU's choice
    (the kernels module told it is not interpreting): forward and backward, the one-pass and
    swept inverse, and the backward solve, on batches that leave a partial row block."""
    from latentfast.kernels import vector_flows as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    assert tk._blocks(7, 19, 8)[0] == 32 and tk._rows_for_registers(16, 32) == 32
    with latentfast.use_backend("triton"):
        for shape in ((3, 7, 5, 17), (2, 45, 12, 40)):
            for additive in (False, True):
                test_stack_matches_reference("triton", shape, additive, torch.float64)
    for additive in (False, True):
        for b in (3, 37):
            test_triton_inverse_by_dependency_order(monkeypatch, torch.float64, additive, b)
            monkeypatch.delenv("LATENTFAST_VF_SEQ_INV")  # (that test ends with the sweeps forced)
        test_triton_inverse_grad_matches_dense_solve("made_random_order", additive, torch.float32, 17)


def test_inverse_gradients_without_an_order_iterate(backend):
    """With n_passes below a MADE step's level count the one-pass transposed solve (C++ or
    Triton) declines (the sweeps did not reach the exact inverse) and the backward iterates
    n_passes + 1 terms, as on the reference backend: the same gradients from both."""
    if backend == "reference":
        pytest.skip("the comparison's own side")
    dev = device_for(backend)
    k, d, h, b = 2, 4, 6, 5
    w1, b1, w2, b2 = (t.to(dev) for t in _masked_params("made", k, d, h, seed=8))
    y = torch.randn(b, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dev)
    grads = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (y, w1, b1, w2, b2)]
        with latentfast.use_backend(name):
            x, ld = ops.vector_flow_stack_inverse(*leaves, None, None, False, 2)
            grads[name] = torch.autograd.grad(x.pow(2).sum() + ld.sum(), leaves)
    for a, e in zip(grads[backend], grads["reference"]):
        assert_close(a, e, scale=100)


@pytest.mark.parametrize("additive", [False, True])
def test_inverse_with_gradients_on_an_empty_batch(backend, additive):
    """B = 0 through the differentiable inverse: empty x and log-det, zero weight gradients
    (the Python iterations' reshape of 0 rows failed before)."""
    dev = device_for(backend)
    k, d, h = 2, 4, 6
    w1, b1, w2, b2 = (t.to(dev) for t in _masked_params("made", k, d, h, seed=12))
    if additive:
        w2, b2 = w2[:, :d].contiguous(), b2[:, :d].contiguous()
    leaves = [t.clone().requires_grad_() for t in (torch.zeros(0, d, dtype=torch.float64, device=dev), w1, b1, w2, b2)]
    x, ld = ops.vector_flow_stack_inverse(*leaves, None, None, additive)
    assert x.shape == (0, d) and ld.shape == (0,)
    grads = torch.autograd.grad(x.sum() + ld.sum(), leaves)
    assert grads[0].shape == (0, d)
    for g, t in zip(grads[1:], leaves[1:]):
        assert g.shape == t.shape and not g.any()


def test_iaf_log_prob_and_maf_rsample_train(backend):
    """An IAF's density and a MAF's samples go through the slow direction; their parameters
    now get gradients (before, the kernel ran under no_grad and they got none)."""
    dev = device_for(backend)
    torch.manual_seed(0)
    data = torch.randn(5, 3, dtype=torch.float64, device=dev)
    for flow, loss_fn in ((vf.Flow(3, [vf.IAF(3, 8, n_steps=2)]), lambda f: -f.log_prob(data).mean()),
                          (vf.Flow(3, [vf.MAF(3, 8, n_steps=2)]), lambda f: f.rsample(5).pow(2).sum())):
        flow = flow.double().to(dev)
        _perturb(flow, seed=1)
        loss_fn(flow).backward()
        grads = [p.grad for p in flow.parameters() if p.requires_grad]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_triton_wrappers_fall_back_when_a_kernel_does_not_fit(monkeypatch):
    """A Triton launch that the GPU cannot hold (OutOfResources, e.g. float64 at d = 512: 278 KB
    of shared memory per block against 227 KB on H100 / H200) makes the wrappers compute with the
    reference, with one warning per kernel, instead of failing; the solve declines (the caller
    iterates). The launch is replaced by one that raises, so this runs without a GPU."""
    from latentfast.kernels import vector_flows as tk
    from latentfast.kernels.vector_flows import OutOfResources

    class TooBig:
        __name__ = "too_big_kernel"

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(278528, 232448, "shared memory")
            return launch

    for name in ("_vector_flow_fwd_kernel", "_vector_flow_bwd_kernel", "_vector_flow_inv_kernel",
                 "_vector_flow_inv_grad_kernel"):
        monkeypatch.setattr(tk, name, TooBig())
    monkeypatch.setattr(tk, "_SMEM_WARNED", set())
    k, b, d, h = 2, 5, 4, 6
    w1, b1, w2, b2 = _masked_params("made", k, d, h, seed=21)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    ctx = torch.randn(k, b, h, generator=g, dtype=torch.float64)
    act = torch.ones(k, d, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        y, ld, xs, out = tk.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, False, True)
    want = ref.vector_flow_stack(x, ctx, w1, b1, w2, b2, act, False)
    for got, exp in zip((y, ld, xs, out), want):
        assert torch.equal(got, exp)
    gy, gl = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, generator=g, dtype=torch.float64)
    got = tk.vector_flow_bwd(gy, gl, xs, out, ctx, w1, b1, w2, act, False)  # warned once already: no second
    for a, e in zip(got, ref.vector_flow_stack_backward(gy, gl, xs, out, ctx, w1, b1, w2, act, False)):
        assert torch.equal(a, e)
    for passes in (d, 2):  # every step planned (the kernel built without sweeps), or none
        xi, li = tk.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, False, passes)
        xr, lr = ref.vector_flow_stack_inverse(y, ctx, w1, b1, w2, b2, act, False, passes)
        assert torch.equal(xi, xr) and torch.equal(li, lr)
    assert tk.vector_flow_inv_grad(gy, gl, xs, out, ctx, w1, b1, w2, act, False, d) is None
    with pytest.raises(RuntimeError):  # other launch errors are not swallowed
        monkeypatch.setattr(tk, "_vector_flow_fwd_kernel", type("Broken", (), {
            "__getitem__": lambda self, grid: (lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))})())
        tk.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, False, True)


@pytest.mark.parametrize("kind", ["iaf", "maf", "coupling", "additive"])
def test_nan_weights_give_nan_outputs_as_the_reference(backend, kind):
    """A NaN in a weight the masks keep (what a diverged training leaves) gives NaN outputs on
    every backend, as in the reference: y and the log-det hold NaN exactly where the
    reference's do, or at fewer places where the reference's NaN comes only through a masked
    (structural) zero, 0 * NaN in its dense product. Before, the C++ ReLU (v > 0 ? v : 0, and
    tl.maximum on a GPU) turned a NaN hidden unit into 0, and every output was finite."""
    torch.manual_seed(0)
    dev = device_for(backend)
    flow = {"iaf": vf.IAF(4, 8, 2, context_dim=3), "maf": vf.MAF(4, 8, 2),
            "coupling": vf.VectorAffineCoupling(4, 8, 2), "additive": vf.VectorAdditiveCoupling(4, 8, 2)}[kind]
    flow = flow.to(dev, torch.float64)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 4, dtype=torch.float64, device=dev)
    ctx = (torch.randn(5, 3, dtype=torch.float64, device=dev),) if kind == "iaf" else ()
    checked = 0
    for name in ("w1", "b1"):
        p = getattr(flow, name)
        keep = (flow.mask1 if name == "w1" else torch.ones_like(p)).reshape(-1)
        for i in keep.nonzero()[:, 0].tolist()[::7]:
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = float("nan")
            with torch.no_grad():
                got = flow(x, *ctx)
                with latentfast.use_backend("reference"):
                    want = flow(x, *ctx)
            with torch.no_grad():
                p.view(-1)[i] = old
            g_nan = torch.cat([t.isnan().reshape(-1) for t in got])
            w_nan = torch.cat([t.isnan().reshape(-1) for t in want])
            assert bool(g_nan.any()) == bool(w_nan.any()), (name, i)
            assert not bool((g_nan & ~w_nan).any()), (name, i)  # no NaN the reference lacks
            checked += int(bool(w_nan.any()))
    assert checked > 0


def test_non_finite_context_raises(backend):
    """A NaN or Inf in an IAF's context raises, as one in x does (both checked in one
    read-back); before, it ran through (to NaN on the reference backend, and to finite values
    from the C++ kernels, whose ReLU dropped the NaN)."""
    dev = device_for(backend)
    flow = vf.IAF(4, 8, 2, context_dim=3).to(dev)
    x, h = torch.randn(5, 4, device=dev), torch.randn(5, 3, device=dev)
    for value in (float("nan"), float("inf")):
        bad = h.clone()
        bad[2, 1] = value
        with pytest.raises(ValueError, match="ctx contains NaN or Inf"):
            flow(x, bad)
        with pytest.raises(ValueError, match="ctx contains NaN or Inf"):
            flow.inverse(x, bad)
    flow(x, h)
