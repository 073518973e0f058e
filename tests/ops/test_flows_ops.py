"""Glow-step ops against their reference on fresh random inputs of odd sizes."""
from __future__ import annotations

import pytest
import torch

from latentfast.ops import flows as ops
from latentfast.reference import flows as ref
from tests.conftest import CPU_ISAS, FAST_GC, assert_close, backends_under_test, device_for, use_cpu_isa

SHAPES = [(1, 3, 1, 1), (2, 5, 3, 7), (3, 12, 7, 3), (2, 12, 7, 7)]
EVEN_SHAPES = [(1, 4, 1, 1), (2, 6, 3, 7), (3, 12, 7, 3), (2, 12, 7, 7)]
DTYPES = [torch.float32, torch.float64]


def _rand(*shape, dtype, device, gen):
    return torch.randn(*shape, dtype=dtype, generator=gen).to(device)


def _step_inputs(n, c, h, w, dtype, gen, h_scale=2.0):
    """x [n, c, h, w], weight [c, c] / sqrt(c), bias [c] and h_scale * h [n, c, h, w] on the CPU,
    drawn from gen in that order (the C++ step-kernel tests below)."""
    x = _rand(n, c, h, w, dtype=dtype, device="cpu", gen=gen)
    weight = _rand(c, c, dtype=dtype, device="cpu", gen=gen) / c ** 0.5
    bias = _rand(c, dtype=dtype, device="cpu", gen=gen)
    return x, weight, bias, h_scale * _rand(n, c, h, w, dtype=dtype, device="cpu", gen=gen)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("co_extra", [0, 3])
def test_actnorm_invconv_matches_reference(backend, shape, dtype, co_extra):
    dev, gen = device_for(backend), torch.Generator().manual_seed(hash((shape, co_extra)) % 2**31)
    n, c, h, w = shape
    x = _rand(n, c, h, w, dtype=dtype, device=dev, gen=gen)
    weight = _rand(c + co_extra, c, dtype=dtype, device=dev, gen=gen)
    bias = _rand(c + co_extra, dtype=dtype, device=dev, gen=gen)
    y = ops.actnorm_invconv(x, weight, bias)
    assert_close(y, ref.actnorm_invconv(x, weight, bias))


def test_actnorm_invconv_non_contiguous(backend):
    dev, gen = device_for(backend), torch.Generator().manual_seed(1)
    x = _rand(3, 7, 5, 6, dtype=torch.float32, device=dev, gen=gen).permute(0, 1, 3, 2)
    weight = _rand(7, 5, dtype=torch.float32, device=dev, gen=gen).t()
    bias = _rand(5, dtype=torch.float32, device=dev, gen=gen)
    assert not x.is_contiguous() and not weight.is_contiguous()
    assert_close(ops.actnorm_invconv(x, weight, bias), ref.actnorm_invconv(x, weight, bias))


@pytest.mark.parametrize("shape", EVEN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("additive", [False, True])
def test_actnorm_invconv_coupling_matches_reference(backend, shape, dtype, additive):
    dev, gen = device_for(backend), torch.Generator().manual_seed(hash((shape, additive)) % 2**31)
    n, c, h, w = shape
    x = _rand(n, c, h, w, dtype=dtype, device=dev, gen=gen)
    weight = _rand(c, c, dtype=dtype, device=dev, gen=gen)
    bias = _rand(c, dtype=dtype, device=dev, gen=gen)
    hh = 3 * _rand(n, c // 2 if additive else c, h, w, dtype=dtype, device=dev, gen=gen)
    y, logdet = ops.actnorm_invconv_coupling(x, weight, bias, hh, additive)
    y_ref, logdet_ref = ref.actnorm_invconv_coupling(x, weight, bias, hh, additive)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)


@pytest.mark.parametrize("shape", EVEN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("additive", [False, True])
def test_affine_coupling_and_inverse(backend, shape, dtype, additive):
    dev, gen = device_for(backend), torch.Generator().manual_seed(7)
    n, c, h, w = shape
    x_b = _rand(n, c // 2, h, w, dtype=dtype, device=dev, gen=gen)
    hh = 3 * _rand(n, c // 2 if additive else c, h, w, dtype=dtype, device=dev, gen=gen)
    y, logdet = ops.affine_coupling(x_b, hh, additive)
    y_ref, logdet_ref = ref.affine_coupling(x_b, hh, additive)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)
    x_back, logdet_inv = ops.affine_coupling_inverse(y, hh, additive)
    assert_close(x_back, x_b, scale=10.0)
    assert_close(logdet_inv, -logdet_ref)


# c = 130 is past the C++ kernel's switch to BLAS/LAPACK (kBlasFromC = 128 in csrc/flows/lu_weight_cpu.cpp).
@pytest.mark.parametrize("c", [1, 3, 5, 12, 33, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lu_weight_matches_reference(backend, c, dtype):
    dev, gen = device_for(backend), torch.Generator().manual_seed(c)
    perm = torch.eye(c, dtype=dtype)[torch.randperm(c, generator=gen)].to(dev)
    # Off-diagonal factors shrink like 1/sqrt(c) (as in the LU of a random rotation, Glow's
    # initialisation), so W stays well conditioned at c = 130 and W @ W^-1 = I holds in fp32.
    off = 0.3 * min(1.0, 3.0 / c**0.5)
    lower = off * _rand(c, c, dtype=dtype, device=dev, gen=gen)
    upper = off * _rand(c, c, dtype=dtype, device=dev, gen=gen)
    sign_s = torch.where(_rand(c, dtype=dtype, device=dev, gen=gen) > 0, 1.0, -1.0).to(dtype)
    log_abs_s = 0.2 * _rand(c, dtype=dtype, device=dev, gen=gen)
    w, w_inv, logdet = ops.lu_weight(perm, lower, upper, sign_s, log_abs_s)
    w_ref, w_inv_ref = ref.lu_weight(perm, lower, upper, sign_s, log_abs_s)
    assert_close(w, w_ref)
    assert_close(w_inv, w_inv_ref, scale=10.0)
    eye = torch.eye(c, dtype=torch.float64)
    assert_close((w.double() @ w_inv.double()).cpu(), eye, dtype=dtype, scale=10.0)
    assert_close(logdet, torch.linalg.slogdet(w_ref.double())[1].to(dtype), scale=10.0)


@pytest.mark.parametrize("c", [12, 130])
@pytest.mark.parametrize("kind", ["negated_row", "scaled_entry", "repeated_row", "dense"])
def test_lu_weight_general_perm_matrix(backend, c, kind):
    """A perm that is not a permutation matrix raises (P^T would not be P^-1, so the second
    output would not be W^-1). The registered op, which does not check, uses perm as the matrix
    it is, as the reference does: the C++ kernel's row gather (taken for a permutation matrix)
    must not be taken for a matrix that only looks like one."""
    dev, gen = device_for(backend), torch.Generator().manual_seed(c + 7)
    d = torch.float64
    perm = torch.eye(c, dtype=d)[torch.randperm(c, generator=gen)]
    if kind == "negated_row":
        perm[3] = -perm[3]
    elif kind == "scaled_entry":
        perm[5] = 2.0 * perm[5]
    elif kind == "repeated_row":
        perm[1] = perm[0]
    else:
        perm = perm + 0.05 * torch.randn(c, c, dtype=d, generator=gen)
    off = 0.3 * min(1.0, 3.0 / c**0.5)
    args = (perm.to(dev), off * _rand(c, c, dtype=d, device=dev, gen=gen), off * _rand(c, c, dtype=d, device=dev, gen=gen),
            torch.ones(c, dtype=d, device=dev), 0.2 * _rand(c, dtype=d, device=dev, gen=gen))
    with pytest.raises(ValueError, match="perm must be a permutation matrix"):
        ops.lu_weight(*args)
    w, w_inv = torch.ops.latentfast.lu_weight(*args)
    w_ref, w_inv_ref = ref.lu_weight(*args)
    assert_close(w, w_ref)
    assert_close(w_inv, w_inv_ref, scale=10.0)


def test_lu_weight_checks_its_constants_once_per_version(backend):
    """perm and sign_s are checked when they are new or have changed (an in-place write, as
    load_state_dict makes), inference tensors on every call, and not under torch.compile."""
    dev, gen = device_for(backend), torch.Generator().manual_seed(3)
    args = list(_lu_inputs(6, torch.float32, dev, gen))
    ops.lu_weight(*args)
    perm, sign_s = args[0], args[3]
    sign_s[2] = 0.5
    with pytest.raises(ValueError, match="sign_s must hold only -1 and 1"):
        ops.lu_weight(*args)
    sign_s[2] = -1.0
    ops.lu_weight(*args)
    perm[[0, 1]] = perm[[1, 0]]  # still a permutation
    ops.lu_weight(*args)
    perm[0, :] = perm[1, :]
    with pytest.raises(ValueError, match="perm must be a permutation matrix"):
        ops.lu_weight(*args)
    bad_perm = perm.clone()
    with torch.inference_mode():
        good = [t.clone() for t in _lu_inputs(6, torch.float32, dev, gen)]
        ops.lu_weight(*good)
        good[0].copy_(bad_perm)  # inference tensors keep no version: checked again
        with pytest.raises(ValueError, match="perm must be a permutation matrix"):
            ops.lu_weight(*good)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.lu_weight(*a)[0], fullgraph=True)
    assert compiled(*_lu_inputs(6, torch.float32, dev, gen)).shape == (6, 6)


def _grads(fn, inputs, seed):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])


@pytest.mark.parametrize("additive", [None, False, True])
def test_gradients_match_reference(backend, additive):
    dev, gen = device_for(backend), torch.Generator().manual_seed(3)
    n, c, h, w = 3, 6, 5, 3
    x = _rand(n, c, h, w, dtype=torch.float32, device=dev, gen=gen)
    weight = _rand(c, c, dtype=torch.float32, device=dev, gen=gen)
    bias = _rand(c, dtype=torch.float32, device=dev, gen=gen)
    if additive is None:
        args = (x, weight, bias)
        got, want = _grads(ops.actnorm_invconv, args, 0), _grads(ref.actnorm_invconv, args, 0)
    else:
        hh = _rand(n, c // 2 if additive else c, h, w, dtype=torch.float32, device=dev, gen=gen)
        args = (x, weight, bias, hh)
        got = _grads(lambda *a: ops.actnorm_invconv_coupling(*a, additive), args, 0)
        want = _grads(lambda *a: ref.actnorm_invconv_coupling(*a, additive), args, 0)
    for g, r in zip(got, want):
        assert_close(g, r, scale=10.0)


def _lu_inputs(c, dtype, dev, gen):
    perm = torch.eye(c, dtype=dtype)[torch.randperm(c, generator=gen)].to(dev)
    sign_s = torch.tensor([1.0, -1.0] * c, dtype=dtype)[:c].to(dev)
    return (perm, 0.3 * _rand(c, c, dtype=dtype, device=dev, gen=gen),
            0.3 * _rand(c, c, dtype=dtype, device=dev, gen=gen), sign_s,
            0.2 * _rand(c, dtype=dtype, device=dev, gen=gen))


def test_gradcheck_float64(backend):
    dev, gen = device_for(backend), torch.Generator().manual_seed(5)
    d = torch.float64
    n, c, h, w = 2, 4, 3, 1
    x = _rand(n, c, h, w, dtype=d, device=dev, gen=gen).requires_grad_()
    weight = _rand(c, c, dtype=d, device=dev, gen=gen).requires_grad_()
    bias = _rand(c, dtype=d, device=dev, gen=gen).requires_grad_()
    for additive in (False, True):
        hh = _rand(n, c // 2 if additive else c, h, w, dtype=d, device=dev, gen=gen).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda *a: ops.actnorm_invconv_coupling(*a, additive), (x, weight, bias, hh), **FAST_GC)
        x_b = x[:, : c // 2].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda *a: ops.affine_coupling(*a, additive), (x_b, hh), **FAST_GC)
        assert torch.autograd.gradcheck(lambda *a: ops.affine_coupling_inverse(*a, additive), (x_b, hh), **FAST_GC)
    assert torch.autograd.gradcheck(ops.actnorm_invconv, (x, weight, bias), **FAST_GC)
    perm, lower, upper, sign_s, log_abs_s = _lu_inputs(5, d, dev, gen)
    lower.requires_grad_(), upper.requires_grad_(), log_abs_s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lo, up, la: ops.lu_weight(perm, lo, up, sign_s, la)[:2], (lower, upper, log_abs_s), **FAST_GC)


def test_opcheck(backend):
    dev, gen = device_for(backend), torch.Generator().manual_seed(11)
    d = torch.float32
    x = _rand(2, 6, 3, 5, dtype=d, device=dev, gen=gen)
    weight = _rand(6, 6, dtype=d, device=dev, gen=gen)
    bias = _rand(6, dtype=d, device=dev, gen=gen)
    hh = _rand(2, 6, 3, 5, dtype=d, device=dev, gen=gen)
    gy, gld = torch.randn_like(x), torch.randn(2, dtype=d).to(dev)
    lib = torch.ops.latentfast
    cases = [
        (lib.actnorm_invconv, (x, weight, bias)),
        (lib.actnorm_invconv_coupling, (x, weight, bias, hh, False)),
        (lib.actnorm_invconv_coupling, (x, weight, bias, hh[:, :3].contiguous(), True)),
        (lib.actnorm_invconv_backward, (gy, gld, x, weight, bias, hh, 2)),
        (lib.actnorm_invconv_backward, (gy, gld, x, weight, bias, hh, 2,
                                        ops.actnorm_invconv_coupling(x, weight, bias, hh)[0])),
        (lib.affine_coupling, (x[:, :3].contiguous(), hh, False)),
        (lib.affine_coupling_inverse, (x[:, :3].contiguous(), hh, False)),
        (lib.affine_coupling_backward, (gy[:, :3].contiguous(), gld, x[:, :3].contiguous(), hh, False)),
        (lib.affine_coupling_backward, (gy[:, :3].contiguous(), gld, x[:, :3].contiguous(), hh, False,
                                        ops.affine_coupling(x[:, :3].contiguous(), hh)[0])),
        (lib.lu_weight, _lu_inputs(5, d, dev, gen)),
        (lib.lu_weight_backward, (*_lu_inputs(5, d, dev, gen), torch.randn(5, 5, dtype=d).to(dev),
                                  torch.randn(5, 5, dtype=d).to(dev), None)),
        (lib.lu_weight_backward, (*_lu_inputs(5, d, dev, gen), torch.randn(5, 5, dtype=d).to(dev), None,
                                  torch.randn(5, 5, dtype=d).to(dev))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
        grad_args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
                          and a.is_floating_point() else a for a in args)
        if op not in (lib.actnorm_invconv_backward, lib.affine_coupling_backward, lib.lu_weight_backward):
            torch.library.opcheck(op, grad_args)


def test_bad_inputs_raise():
    x = torch.randn(2, 4, 3, 3)
    w, b = torch.randn(4, 4), torch.randn(4)
    with pytest.raises(ValueError, match="dimensions"):
        ops.actnorm_invconv(x[0], w, b)
    with pytest.raises(ValueError, match="weight"):
        ops.actnorm_invconv(x, torch.randn(4, 5), b)
    with pytest.raises(TypeError, match="dtype"):
        ops.actnorm_invconv(x, w.double(), b)
    with pytest.raises(TypeError, match="dtype"):
        ops.actnorm_invconv(x.long(), w, b)
    with pytest.raises(TypeError, match="Tensor"):
        ops.actnorm_invconv(x.numpy(), w, b)
    with pytest.raises(ValueError, match="even"):
        ops.actnorm_invconv_coupling(torch.randn(2, 3, 3, 3), torch.randn(3, 3), torch.randn(3),
                                     torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="h must have shape"):
        ops.actnorm_invconv_coupling(x, w, b, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="h must have shape"):
        ops.affine_coupling(x[:, :2], torch.randn(2, 4, 3, 4))
    with pytest.raises(ValueError, match="square"):
        ops.lu_weight(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), torch.ones(3), torch.zeros(3))


# The C++ Glow kernels are built per instruction set (baseline, AVX2, AVX-512: different
# vector widths, micro-tile sizes and GEMM row blocks). Each clone this CPU runs is checked
# on shapes that cross its tile edges: P = 143 pixels (one 128-pixel AVX-512 macro tile +
# 15; 2 AVX2 macro tiles + 15), Co = 50 (4 x 12 + 2 and 8 x 6 + 2 GEMM rows), Ci = 17.
_NEEDS_CPP = pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own clones")


@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["conv", "additive", "affine"])
def test_glow_isa_clones_match_reference(monkeypatch, isa, dtype, mode):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(17)
    n, ci, h, w = 2, 17 if mode == "conv" else 50, 11, 13
    co = 50
    x = _rand(n, ci, h, w, dtype=dtype, device="cpu", gen=gen).requires_grad_()
    weight = _rand(co, ci, dtype=dtype, device="cpu", gen=gen).requires_grad_()
    bias = _rand(co, dtype=dtype, device="cpu", gen=gen).requires_grad_()
    args = [x, weight, bias]
    if mode == "conv":
        fn, rfn = ops.actnorm_invconv, ref.actnorm_invconv
    else:
        additive = mode == "additive"
        hh = 3 * _rand(n, co // 2 if additive else co, h, w, dtype=dtype, device="cpu", gen=gen)
        args.append(hh.requires_grad_())
        fn = lambda *a: ops.actnorm_invconv_coupling(*a, additive)  # noqa: E731
        rfn = lambda *a: ref.actnorm_invconv_coupling(*a, additive)  # noqa: E731
    got = fn(*args)
    want = rfn(*args)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for g, r in zip(got, want):
        assert_close(g, r)
    for g, r in zip(_grads(fn, args, 1), _grads(rfn, args, 1)):
        assert_close(g, r, scale=10.0)
    if mode == "affine":  # the standalone coupling, forward, inverse and backward
        xb = x.detach()[:, : co // 2].clone().requires_grad_()
        hc = hh.detach().clone().requires_grad_()
        yb, ld = ops.affine_coupling(xb, hc)
        yr, ldr = ref.affine_coupling(xb, hc)
        assert_close(yb, yr)
        assert_close(ld, ldr)
        xr, ldi = ops.affine_coupling_inverse(yr.detach(), hc.detach())
        assert_close(xr, xb.detach(), scale=10.0)
        assert_close(ldi, -ldr.detach())
        for g, r in zip(_grads(ops.affine_coupling, (xb, hc), 2), _grads(ref.affine_coupling, (xb, hc), 2)):
            assert_close(g, r, scale=10.0)


# The C++ coupling log-dets multiply w = 1 + exp(-|raw + 2|) (each in [1, 2]) per pixel lane
# and take one log per 32 factors (vec_math.inc's sigmoid_parts / log_prod). At raw = -2
# every w is 2, so a lane that took more than 127 factors without its log would overflow:
# Cb = 35 channels x 4 micro tiles of one macro tile (fused step), and P = 4160 pixels
# (130+ blocks of a row at every clone's tile width; standalone coupling).
@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("raw", ["zero", "random"])
def test_glow_logdet_products_per_isa(monkeypatch, isa, dtype, raw):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(23)
    for n, c, h, w in ((2, 70, 11, 13), (2, 4, 64, 65)):
        x, weight, bias, hh = _step_inputs(n, c, h, w, dtype, gen, h_scale=3.0)
        if raw == "zero":
            hh[:, c // 2:] = -2.0
        y, ld = ops.actnorm_invconv_coupling(x, weight, bias, hh)
        y_ref, ld_ref = ref.actnorm_invconv_coupling(x.double(), weight.double(), bias.double(), hh.double())
        assert_close(y, y_ref, dtype=dtype)
        assert_close(ld, ld_ref, dtype=dtype)
        xb = x[:, : c // 2].contiguous()
        yb, ldb = ops.affine_coupling(xb, hh)
        yb_ref, ldb_ref = ref.affine_coupling(xb.double(), hh.double())
        assert_close(yb, yb_ref, dtype=dtype)
        assert_close(ldb, ldb_ref, dtype=dtype)
        xi, ldi = ops.affine_coupling_inverse(yb, hh)
        assert_close(xi, xb, scale=10.0)
        assert_close(ldi, -ldb_ref, dtype=dtype)
        if raw == "zero":
            want = -(c // 2) * h * w * torch.log(torch.tensor(2.0, dtype=torch.float64))
            assert_close(ld, want.expand(n), dtype=dtype)


# The affine step's backward takes z_b + shift = y_b / s from the saved forward output y
# (C++) instead of recomputing z_b = (A x + c)_b, and the standalone coupling's instead of
# reading x_b and shift: with and without y against the float64 reference, on shapes with
# partial tiles, in every ISA clone.
@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_glow_backwards_from_saved_output_per_isa(monkeypatch, isa, dtype):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(29)
    bwd = torch.ops.latentfast_cpp.actnorm_invconv_bwd
    for n, c, h, w in ((3, 6, 7, 5), (2, 34, 9, 31)):
        x, weight, bias, hh = _step_inputs(n, c, h, w, dtype, gen)
        gy, gld = _rand(n, c, h, w, dtype=dtype, device="cpu", gen=gen), _rand(n, dtype=dtype, device="cpu", gen=gen)
        y, _ = ops.actnorm_invconv_coupling(x, weight, bias, hh)
        want = ref.actnorm_invconv_backward(*(t.double() for t in (gy, gld, x, weight, bias, hh)), 2)
        for got in (bwd(gy, gld, x, weight, bias, hh, 2, y), bwd(gy, gld, x, weight, bias, hh, 2)):
            for g, r in zip(got, want):
                assert_close(g, r, dtype=dtype, scale=10.0)
        with pytest.raises(RuntimeError, match="forward output"):
            bwd(gy, gld, x, weight, bias, hh, 2, y[:, 1:])
        xb, gyb = x[:, : c // 2].contiguous(), gy[:, : c // 2].contiguous()
        yb, _ = ops.affine_coupling(xb, hh)
        want = ref.affine_coupling_backward(*(t.double() for t in (gyb, gld, xb, hh)))
        cbwd = torch.ops.latentfast_cpp.affine_coupling_bwd
        for got in (cbwd(gyb, gld, xb, hh, False, yb), cbwd(gyb, gld, xb, hh, False)):
            for g, r in zip(got, want):
                assert_close(g, r, dtype=dtype, scale=10.0)
        with pytest.raises(RuntimeError, match="forward output"):
            cbwd(gyb, gld, xb, hh, False, yb[:1])


# Large outputs are written with non-temporal stores (csrc/common/stream.h; full, vector-aligned
# tile rows only, the rest as before). LATENTFAST_STREAM_STORES=1 forces them on small shapes:
# every output of the fused forward (3 modes) and backward (with and without the saved y) is
# bit for bit the one of =0, and both match the float64 reference. P = 256 (whole macro tiles
# in every clone), 72 (AVX-512 rows alternately aligned and not) and 143 (partial tiles).
@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_glow_streaming_stores_write_the_same_numbers_per_isa(monkeypatch, isa, dtype):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(31)
    fwd, bwd = torch.ops.latentfast_cpp.actnorm_invconv_fwd, torch.ops.latentfast_cpp.actnorm_invconv_bwd
    for n, c, h, w in ((2, 10, 16, 16), (3, 6, 8, 9), (2, 26, 11, 13)):
        x, weight, bias, hh = _step_inputs(n, c, h, w, dtype, gen)
        gy, gld = _rand(n, c, h, w, dtype=dtype, device="cpu", gen=gen), _rand(n, dtype=dtype, device="cpu", gen=gen)
        d = [t.double() for t in (gy, gld, x, weight, bias, hh)]
        for mode, hm in ((0, None), (1, hh[:, : c // 2].contiguous()), (2, hh)):
            runs = {}
            for setting in ("0", "1"):
                monkeypatch.setenv("LATENTFAST_STREAM_STORES", setting)
                y, ld = fwd(x, weight, bias, hm, mode)
                grads = [bwd(gy, gld, x, weight, bias, hm, mode)]
                if mode == 2:
                    grads.append(bwd(gy, gld, x, weight, bias, hm, mode, y))
                runs[setting] = [y, ld] + [g for got in grads for g in got]
            for a, b in zip(runs["0"], runs["1"]):
                assert torch.equal(a, b), (mode, (n, c, h, w))
            if mode == 0:
                assert_close(runs["1"][0], ref.actnorm_invconv(*d[2:5]), dtype=dtype)
                continue
            hd = d[5] if mode == 2 else d[5][:, : c // 2]
            y_ref, ld_ref = ref.actnorm_invconv_coupling(*d[2:5], hd, mode == 1)
            assert_close(runs["1"][0], y_ref, dtype=dtype)
            assert_close(runs["1"][1], ld_ref, dtype=dtype)
            want = ref.actnorm_invconv_backward(*d[:5], hd, mode)
            for g, r in zip(runs["1"][2:6], want):
                assert_close(g, r, dtype=dtype, scale=10.0)


# The C++ step backward reads grad_y in place when its pixels are contiguous (any sample and
# channel strides: a channel slice of a larger tensor) or one value per sample and channel
# (expanded from one value, as a sum's gradient is, or per channel); other layouts are copied
# first.
# Each gives bit for bit the backward of grad_y.contiguous(), and the float64 reference.
@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_glow_backward_reads_strided_and_expanded_grads_per_isa(monkeypatch, isa, dtype):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(41)
    bwd = torch.ops.latentfast_cpp.actnorm_invconv_bwd
    n, c, h, w = 3, 10, 9, 15
    x, weight, bias, hh = _step_inputs(n, c, h, w, dtype, gen)
    gld = _rand(n, dtype=dtype, device="cpu", gen=gen)
    y, _ = ops.actnorm_invconv_coupling(x, weight, bias, hh)
    grads = {
        "one value": torch.full((1, 1, 1, 1), 0.37, dtype=dtype).expand(n, c, h, w),
        "per channel": _rand(1, c, 1, 1, dtype=dtype, device="cpu", gen=gen).expand(n, c, h, w),
        "per sample and channel": _rand(n, c, 1, 1, dtype=dtype, device="cpu", gen=gen).expand(n, c, h, w),
        "channel slice": _rand(n, 2 * c, h, w, dtype=dtype, device="cpu", gen=gen)[:, ::2],
        "transposed pixels": _rand(n, c, w, h, dtype=dtype, device="cpu", gen=gen).transpose(2, 3),
    }
    for name, gy in grads.items():
        for mode, hm in ((0, None), (2, hh)):
            got = bwd(gy, gld, x, weight, bias, hm, mode, y if mode == 2 else None)
            want = bwd(gy.contiguous(), gld, x, weight, bias, hm, mode, y if mode == 2 else None)
            for g, r in zip(got, want):
                assert torch.equal(g, r), (name, mode)
            d = [t.double() for t in (gy, gld, x, weight, bias)]
            ref_grads = ref.actnorm_invconv_backward(*d, hm.double() if hm is not None else None, mode)
            for g, r in zip(got[:3], ref_grads[:3]):
                assert_close(g, r, dtype=dtype, scale=10.0)


@_NEEDS_CPP
def test_glow_kernel_switches_bad_values_raise(monkeypatch):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    monkeypatch.setenv("LATENTFAST_STREAM_STORES", "yes")
    with pytest.raises(RuntimeError, match="LATENTFAST_STREAM_STORES must be auto, 0 or 1"):
        ops.actnorm_invconv(torch.zeros(1, 2, 1, 1), torch.eye(2), torch.zeros(2))
    monkeypatch.setenv("LATENTFAST_STREAM_STORES", "auto")
    assert torch.equal(ops.actnorm_invconv(torch.ones(1, 2, 1, 1), torch.eye(2), torch.zeros(2)),
                       torch.ones(1, 2, 1, 1))
    monkeypatch.setenv("LATENTFAST_GLOW_PREFETCH", "on")
    with pytest.raises(RuntimeError, match="LATENTFAST_GLOW_PREFETCH must be auto, 0 or 1"):
        ops.actnorm_invconv(torch.zeros(1, 2, 1, 1), torch.eye(2), torch.zeros(2))


# The step kernels prefetch the next macro tile's input rows (LATENTFAST_GLOW_PREFETCH; auto for
# large inputs, forced here): a hint that must not change a value, on shapes with several
# macro tiles per thread.
@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_glow_prefetch_changes_no_value_per_isa(monkeypatch, isa):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(47)
    fwd, bwd = torch.ops.latentfast_cpp.actnorm_invconv_fwd, torch.ops.latentfast_cpp.actnorm_invconv_bwd
    n, c, h, w = 3, 10, 23, 19
    x, weight, bias, hh = _step_inputs(n, c, h, w, torch.float32, gen, h_scale=1.0)
    gy, gld = torch.randn_like(x), torch.randn(n)
    runs = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("LATENTFAST_GLOW_PREFETCH", setting)
        out = []
        for mode, hm in ((0, None), (1, hh[:, : c // 2].contiguous()), (2, hh)):
            y, ld = fwd(x, weight, bias, hm, mode)
            out += [y, ld, *bwd(gy, gld, x, weight, bias, hm, mode)]
            if mode == 2:
                out += list(bwd(gy, gld, x, weight, bias, hm, mode, y))
        runs[setting] = out
    for a, b in zip(runs["0"], runs["1"]):
        assert torch.equal(a, b)


def test_glow_step_backward_sees_changes_to_its_output(backend):
    """The affine step saves its output y for the backward: changing y in place before the
    backward is an error, as for any saved tensor, not a silently wrong gradient."""
    dev, gen = device_for(backend), torch.Generator().manual_seed(31)
    x = _rand(2, 4, 3, 3, dtype=torch.float32, device=dev, gen=gen).requires_grad_()
    weight, bias = torch.eye(4, device=dev), torch.zeros(4, device=dev)
    hh = _rand(2, 4, 3, 3, dtype=torch.float32, device=dev, gen=gen)
    y, ld = ops.actnorm_invconv_coupling(x, weight, bias, hh)
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace operation"):
        (y.sum() + ld.sum()).backward()


# The C++ lu_weight below C = 128 (flows/lu_weight_kernels.inc) in every ISA clone: blocks
# of 32 columns with zero-padded rows, 1 to 4 partial sums with their k tails, one thread
# below C = 101 and both from there, a permutation's row copy and a general perm's product.
@_NEEDS_CPP
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lu_weight_small_kernel_per_isa(monkeypatch, isa, dtype):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(37)
    for c in (1, 2, 7, 32, 33, 64, 100, 101, 127):
        perm = torch.eye(c, dtype=dtype)[torch.randperm(c, generator=gen)]
        off = 0.3 * min(1.0, 3.0 / c**0.5)
        args = [perm, off * _rand(c, c, dtype=dtype, device="cpu", gen=gen),
                off * _rand(c, c, dtype=dtype, device="cpu", gen=gen),
                torch.where(_rand(c, dtype=dtype, device="cpu", gen=gen) > 0, 1.0, -1.0).to(dtype),
                0.2 * _rand(c, dtype=dtype, device="cpu", gen=gen)]
        for general in (False, True):
            if general:
                args[0] = perm + 0.05 * _rand(c, c, dtype=dtype, device="cpu", gen=gen)
            w, w_inv = torch.ops.latentfast.lu_weight(*args)  # (the wrapper rejects the general perm)
            w_ref, w_inv_ref = ref.lu_weight(*(t.double() for t in args))
            assert_close(w, w_ref, dtype=dtype)
            assert_close(w_inv, w_inv_ref, dtype=dtype, scale=10.0)


# lu_weight's backward is one C++ call on the C++ backend (lu_weight_bwd: BLAS GEMMs, P^T g as a
# row scatter for a permutation matrix) and the reference formula elsewhere; the two agree in
# float64 for permutation and general P and for unit rows that repeat a column (the scatter
# had been taken there: it dropped rows of P^T g and left others unwritten), with the gradient
# of W, of W^-1, of both or neither.
@_NEEDS_CPP
@pytest.mark.parametrize("dtype", DTYPES)
def test_lu_weight_backward_kernel_matches_the_reference(dtype):
    gen = torch.Generator().manual_seed(43)
    bwd = torch.ops.latentfast_cpp.lu_weight_bwd
    for c in (1, 2, 7, 48, 130):
        perm, lower, upper, sign_s, log_abs_s = _lu_inputs(c, dtype, "cpu", gen)
        lower, upper = lower * min(1.0, 3.0 / c ** 0.5), upper * min(1.0, 3.0 / c ** 0.5)  # W^-1 of size ~1
        for kind in ("permutation", "general", "repeated row"):
            if kind == "repeated row" and c < 2:
                continue
            p = perm + 0.05 * _rand(c, c, dtype=dtype, device="cpu", gen=gen) if kind == "general" else perm.clone()
            if kind == "repeated row":
                p[1] = p[0]
            _, w_inv = torch.ops.latentfast_cpp.lu_weight(p, lower, upper, sign_s, log_abs_s)
            gw, gwi = _rand(c, c, dtype=dtype, device="cpu", gen=gen), _rand(c, c, dtype=dtype, device="cpu", gen=gen)
            for grads in ((gw, gwi), (gw, None), (None, gwi), (None, None)):
                got = bwd(p, lower, upper, sign_s, log_abs_s, w_inv, *grads)
                want = ref.lu_weight_backward(*(t.double() for t in (p, lower, upper, sign_s, log_abs_s, w_inv)),
                                        *(g.double() if g is not None else None for g in grads))
                for g, r in zip(got, want):
                    assert g.dtype == dtype and g.shape == r.shape
                    assert_close(g, r, dtype=dtype, scale=10.0)
                assert torch.equal(got[0], torch.tril(got[0], -1)) and torch.equal(got[1], torch.triu(got[1], 1))
    with pytest.raises(RuntimeError, match="grad_w and grad_w_inv must be"):
        bwd(perm, lower, upper, sign_s, log_abs_s, w_inv, gw[:1], None)


@_NEEDS_CPP
def test_cpu_isa_bad_value_raises(monkeypatch):
    monkeypatch.setenv("LATENTFAST_BACKEND", "cpp")
    monkeypatch.setenv("LATENTFAST_CPU_ISA", "avx9")
    with pytest.raises(RuntimeError, match="LATENTFAST_CPU_ISA must be"):
        ops.actnorm_invconv(torch.zeros(1, 2, 1, 1), torch.eye(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="LATENTFAST_CPU_ISA must be"):
        torch.ops.latentfast_cpp.cpu_isa()
    monkeypatch.setenv("LATENTFAST_CPU_ISA", "base")
    assert torch.ops.latentfast_cpp.cpu_isa().startswith("base (widest available: ")


def test_eager_path_matches_the_custom_ops(backend):
    """In eager mode the public functions run the op implementations through one
    autograd.Function (no custom-op dispatch); their values and gradients equal those of the
    custom ops (torch.ops.latentfast.*, what torch.compile traces)."""
    dev, gen = device_for(backend), torch.Generator().manual_seed(21)
    d = torch.float64
    x = _rand(2, 6, 3, 5, dtype=d, device=dev, gen=gen)
    weight, bias = _rand(6, 6, dtype=d, device=dev, gen=gen), _rand(6, dtype=d, device=dev, gen=gen)
    hh = _rand(2, 6, 3, 5, dtype=d, device=dev, gen=gen)
    lib = torch.ops.latentfast
    xb = x[:, :3].contiguous()
    pairs = [
        (lambda *a: ops.actnorm_invconv(*a), lib.actnorm_invconv, (x, weight, bias)),
        (lambda *a: ops.actnorm_invconv_coupling(*a), lambda *a: lib.actnorm_invconv_coupling(*a, False),
         (x, weight, bias, hh)),
        (lambda *a: ops.actnorm_invconv_coupling(*a, True), lambda *a: lib.actnorm_invconv_coupling(*a, True),
         (x, weight, bias, hh[:, :3].contiguous())),
        (lambda *a: ops.affine_coupling(*a), lambda *a: lib.affine_coupling(*a, False), (xb, hh)),
        (lambda *a: ops.affine_coupling_inverse(*a), lambda *a: lib.affine_coupling_inverse(*a, False), (xb, hh)),
        (lambda *a: ops.lu_weight(*a)[:2], lib.lu_weight, _lu_inputs(5, d, dev, gen)),
    ]
    for fast, custom, args in pairs:
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
        got = fast(*leaves)
        want = custom(*leaves)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        for g, w in zip(got, want):
            assert_close(g, w)
        for g, w in zip(_grads_unused(fast, leaves), _grads_unused(custom, leaves)):
            assert (g is None) == (w is None)
            if g is not None:
                assert_close(g, w)


def _grads_unused(fn, inputs):
    """_grads, with None for the inputs an op gives no gradient (lu_weight's perm, sign_s)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)
