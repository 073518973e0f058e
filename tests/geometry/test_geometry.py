"""Geometry API: geodesics on analytic manifolds, exponential map, distances, VAE + RBF."""
from __future__ import annotations

import contextlib
import functools
import math
import re

import pytest
import torch
from torch import nn

import latentfast
from latentfast import backend as lf_backend
from latentfast import geometry as geo
from latentfast.vae import VAE, GaussianMLPDecoder, fit, fit_rbf_variance
from latentfast.vae.decoders import MLPParams
from tests.conftest import interpreting

F64 = torch.float64
needs_cpp = pytest.mark.skipif(lf_backend.why_unavailable("cpp", torch.device("cpu")) is not None,
                               reason="latentfast._C is not built")


def linear_decoder(a: torch.Tensor) -> nn.Sequential:
    dec = nn.Sequential(nn.Linear(a.shape[1], a.shape[0])).to(a.dtype)
    with torch.no_grad():
        dec[0].weight.copy_(a)
        dec[0].bias.normal_()
    return dec


def sphere(z: torch.Tensor) -> torch.Tensor:
    """Inverse stereographic projection of the plane onto the unit sphere."""
    n2 = (z ** 2).sum(-1, keepdim=True)
    return torch.cat([2 * z, n2 - 1], -1) / (n2 + 1)


def great_circle(z0, z1):
    return torch.arccos((sphere(z0) * sphere(z1)).sum(-1).clamp(-1, 1))


def small_mlp_decoder(dtype=F64, rbf=True, seed=0):
    torch.manual_seed(seed)
    dec = GaussianMLPDecoder(2, 9, hidden=(16,), activation="tanh").to(dtype)
    if rbf:
        z = torch.randn(200, 2, dtype=dtype)
        x = dec.mean(z).detach() + 0.1 * torch.randn(200, 9, dtype=dtype)
        fit_rbf_variance(dec, z, x, n_centres=8, steps=50)
    return dec


def test_linear_decoder_geodesics_are_straight(backend):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 2, dtype=F64, generator=gen)
    z0, z1 = torch.randn(6, 2, dtype=F64, generator=gen), torch.randn(6, 2, dtype=F64, generator=gen)
    res = geo.geodesic(z0, z1, linear_decoder(a))
    true = ((z1 - z0) @ a.T).norm(dim=1)
    assert res.converged.all()
    torch.testing.assert_close(res.lengths, true, rtol=1e-6, atol=0)
    line = geo.straight_line(z0, z1, 32)
    torch.testing.assert_close(res.curves, line, rtol=1e-5, atol=1e-6)


def test_sphere_geodesic_lengths_are_great_circles():
    gen = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(8, 2, dtype=F64, generator=gen), torch.randn(8, 2, dtype=F64, generator=gen)
    res = geo.geodesic(z0, z1, sphere, max_iter=800)
    rel = (res.lengths / great_circle(z0, z1) - 1).abs()
    assert res.converged.all(), res.iterations
    assert rel.max() < 0.01, rel
    # the straight latent line is longer than the geodesic
    assert (geo.curve_length(sphere, geo.straight_line(z0, z1, 32)) >= res.lengths - 1e-9).all()


@pytest.mark.parametrize("n", [1, 2, 7, 31, 300])
def test_laplacian_coordinates_are_the_cholesky_factor(n):
    """The solver's coordinates (geometry.core._LaplacianCoords): the closed-form R^-1 w and
    R^-T g against triangular solves with the Cholesky factor of tridiag(-1, 2, -1), and
    the Euclidean curve energy's Hessian in w equal to 2 T I."""
    from latentfast.geometry.core import _LaplacianCoords

    off = torch.diag(torch.ones(n - 1, dtype=F64), 1)
    lap = 2 * torch.eye(n, dtype=F64) - off - off.T
    r = torch.linalg.cholesky(lap).mT  # upper
    w, g = torch.randn(3, n, 2, dtype=F64), torch.randn(3, n, 2, dtype=F64)
    coords = _LaplacianCoords(n, w)
    torch.testing.assert_close(coords.to_x(w), torch.linalg.solve_triangular(r, w, upper=True),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coords.grad_to_w(g), torch.linalg.solve_triangular(r.mT, g, upper=False),
                               rtol=1e-12, atol=1e-12)
    # float32 at the same n: no cancellation in the sums
    c32 = _LaplacianCoords(n, w.float())
    torch.testing.assert_close(c32.to_x(w.float()).double(), coords.to_x(w), rtol=1e-5, atol=1e-5)
    if n <= 31:
        t = n + 1
        z0, z1, x0 = torch.randn(2, dtype=F64), torch.randn(2, dtype=F64), torch.randn(n, 2, dtype=F64)

        def energy(wf):
            x = x0 + coords.to_x(wf.view(1, n, 2))[0]
            pts = torch.cat([z0[None], x, z1[None]])
            return t * ((pts[1:] - pts[:-1]) ** 2).sum()

        hess = torch.autograd.functional.hessian(energy, torch.randn(2 * n, dtype=F64))
        torch.testing.assert_close(hess, 2 * t * torch.eye(2 * n, dtype=F64), rtol=0, atol=1e-10)


def test_preconditioned_solves_do_not_slow_down_with_more_segments():
    """In the Laplacian coordinates (the default) the L-BFGS iterations stay flat as the
    curve gets more segments; on the points themselves they grow with it."""
    gen = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(8, 2, dtype=F64, generator=gen), torch.randn(8, 2, dtype=F64, generator=gen)
    few = geo.geodesic(z0, z1, sphere, n_segments=8, max_iter=1000)
    many = geo.geodesic(z0, z1, sphere, n_segments=64, max_iter=1000)
    plain = geo.geodesic(z0, z1, sphere, n_segments=64, max_iter=300, precondition=False)
    assert few.converged.all() and many.converged.all()
    assert ((many.lengths / great_circle(z0, z1) - 1).abs() < 1e-3).all()
    med = {k: float(r.iterations.double().median()) for k, r in (("few", few), ("many", many), ("plain", plain))}
    assert med["many"] <= 1.5 * med["few"], med
    assert med["plain"] > 4 * med["many"], med


@pytest.mark.parametrize("precondition", [True, False])
def test_geodesic_lengths_with_and_without_preconditioning(precondition, backend):
    if interpreting() and not precondition:
        pytest.skip("the solver on the points is checked on the native backends; under the interpreter "
                    "its ~3x more iterations of interpreted kernels take 11 s")
    dec = small_mlp_decoder()
    gen = torch.Generator().manual_seed(4)
    m = 3 if interpreting() else 5  # each interpreted kernel launch runs its programs in Python
    z0, z1 = torch.randn(m, 2, dtype=F64, generator=gen), torch.randn(m, 2, dtype=F64, generator=gen)
    res = geo.geodesic(z0, z1, dec, n_segments=12, precondition=precondition)
    assert res.converged.all()
    # the same problem through the generic (autograd) path, preconditioned the other way
    other = geo.geodesic(z0, z1, dec.features, n_segments=12, precondition=not precondition)
    torch.testing.assert_close(res.lengths, other.lengths, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.energies, geo.curve_energy(dec, res.curves))
    line = geo.straight_line(z0, z1, 12)
    # the solve starts at the straight line and accepts only decreases of the energy; the
    # length of an energy minimiser can exceed the straight line's by discretisation (a pair
    # here whose geodesic is nearly straight ends 4e-7 longer at a lower energy), never by more
    assert (res.energies <= geo.curve_energy(dec, line)).all()
    assert (res.lengths ** 2 <= res.energies * (1 + 1e-12)).all()  # E = T sum |d|^2 >= (sum |d|)^2
    assert (res.lengths <= geo.curve_length(dec, line) * (1 + 1e-5)).all()


@pytest.mark.parametrize("precondition", [True, False])
def test_first_iteration_moves_curves_of_every_size_by_at_most_a_tenth_of_their_length(precondition, backend):
    # L-BFGS's first direction is -g / ||g||: without a scale from the curve, a step of 1
    # (or of 2^-11 after the line search's halvings) overshot short curves, which then stopped
    # as "converged" at the straight line
    gen = torch.Generator().manual_seed(7)
    z0 = torch.randn(5, 2, dtype=F64, generator=gen)
    u = torch.nn.functional.normalize(torch.randn(5, 2, dtype=F64, generator=gen), dim=1)
    size = torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 3.0], dtype=F64)
    z1 = z0 + size[:, None] * u
    line = geo.straight_line(z0, z1, 16)
    one = geo.geodesic(z0, z1, sphere, n_segments=16, max_iter=1, precondition=precondition)
    assert (one.energies < geo.curve_energy(sphere, line)).all(), one.energies
    moved = (one.curves - line).norm(dim=-1).amax(1)
    assert (moved <= 0.1 * size * (1 + 1e-9)).all(), moved / size
    assert (moved > 0).all()


def test_graph_initialisation_of_end_points_that_require_grad_warns_nothing():
    import warnings

    gen = torch.Generator().manual_seed(6)
    data = torch.randn(40, 2, dtype=F64, generator=gen)
    z0 = data[:2].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scalar read of a tensor that requires grad warned
        res = geo.geodesic(z0, data[2:4], sphere, n_segments=8, init="graph", data=data)
    assert res.converged.all()


@pytest.mark.parametrize("init", ["line", "graph"])
def test_equal_end_points_give_the_constant_curve_whatever_the_init(init):
    """z0 == z1: the constant curve, length 0, converged without an iteration, with the graph
    initialisation too (its path to the nearest data latent and back is not used)."""
    dec = small_mlp_decoder()
    gen = torch.Generator().manual_seed(12)
    data = torch.randn(30, 2, dtype=F64, generator=gen)
    z0 = torch.randn(3, 2, dtype=F64, generator=gen)
    z1 = torch.randn(3, 2, dtype=F64, generator=gen)
    z1[1] = z0[1]
    res = geo.geodesic(z0, z1, dec, n_segments=6, init=init, data=data)
    assert bool(res.converged.all())
    assert torch.equal(res.curves[1], z0[1].expand(7, 2)) and float(res.lengths[1]) == 0.0
    assert int(res.iterations[1]) == 0 and bool((res.lengths[[0, 2]] > 0).all())


def test_initial_curves_end_exactly_at_the_end_points():
    """straight_line and graph_init put z0 and z1 themselves at the ends (before, the last
    point was z0 + 1 * (z1 - z0), or a resampled polyline's, an ulp off z1 for most pairs;
    geodesic pinned its own ends, a user's straight_line did not)."""
    gen = torch.Generator().manual_seed(4)
    data = torch.randn(60, 3, dtype=F64, generator=gen)
    z0, z1 = torch.randn(40, 3, dtype=F64, generator=gen), torch.randn(40, 3, dtype=F64, generator=gen)
    dec = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    for curves in (geo.straight_line(z0, z1, 7), geo.graph_init(z0, z1, dec, data, 7, n_neighbors=4)):
        assert curves.shape == (40, 8, 3)
        assert torch.equal(curves[:, 0], z0) and torch.equal(curves[:, -1], z1)
    t = torch.linspace(0, 1, 8, dtype=F64)[None, :, None]
    torch.testing.assert_close(geo.straight_line(z0, z1, 7), z0[:, None] + t * (z1 - z0)[:, None], rtol=0, atol=1e-15)


def test_graph_initialisation_gives_a_geodesic_too():
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(150, 2, dtype=F64, generator=gen)
    z0, z1 = data[:3], data[3:6]
    init = geo.graph_init(z0, z1, sphere, data, 16)
    assert init.shape == (3, 17, 2)
    torch.testing.assert_close(init[:, 0], z0)
    torch.testing.assert_close(init[:, -1], z1)
    res = geo.geodesic(z0, z1, sphere, n_segments=16, init="graph", data=data, max_iter=800)
    assert ((res.lengths / great_circle(z0, z1) - 1).abs() < 0.01).all()


def test_mlp_geodesics_agree_across_backends(backend):
    dec = small_mlp_decoder()
    gen = torch.Generator().manual_seed(3)
    z0, z1 = torch.randn(4, 2, dtype=F64, generator=gen), torch.randn(4, 2, dtype=F64, generator=gen)
    res = geo.geodesic(z0, z1, dec, n_segments=12)
    # the same problem through the generic (autograd) path
    generic = geo.geodesic(z0, z1, dec.features, n_segments=12)
    assert res.converged.all() and generic.converged.all()
    torch.testing.assert_close(res.lengths, generic.lengths, rtol=1e-4, atol=1e-6)
    line = geo.curve_length(dec, geo.straight_line(z0, z1, 12))
    assert (res.lengths <= line + 1e-9).all()


def test_geodesic_solves_inside_reuse_buffers_with_the_same_result(backend, monkeypatch):
    """The solver's energy calls run inside ops.geometry.reuse_buffers (one pool of work
    buffers for the whole solve); without it the curves come out the same, bit for bit."""
    from latentfast.ops import geometry as geo_ops

    dec = small_mlp_decoder()
    gen = torch.Generator().manual_seed(5)
    z0, z1 = torch.randn(6, 2, dtype=F64, generator=gen), torch.randn(6, 2, dtype=F64, generator=gen)
    pools = []
    orig = geo_ops.curve_energy_and_grad_fn

    def spy(*args):
        fn = orig(*args)

        def call(curves):
            pools.append(geo_ops._SCRATCH.get())
            return fn(curves)
        return call

    monkeypatch.setattr(geo_ops, "curve_energy_and_grad_fn", spy)
    res = geo.geodesic(z0, z1, dec, n_segments=10)
    assert len(pools) > 2 and pools[0] is not None and all(p is pools[0] for p in pools)
    monkeypatch.setattr(geo_ops, "reuse_buffers", contextlib.nullcontext)
    plain = geo.geodesic(z0, z1, dec, n_segments=10)
    assert pools[-1] is None
    assert torch.equal(res.curves, plain.curves) and torch.equal(res.iterations, plain.iterations)


def test_metric_fused_equals_generic(backend):
    dec = small_mlp_decoder()
    z = torch.randn(7, 2, dtype=F64)
    torch.testing.assert_close(geo.metric(dec, z), geo.metric(dec.features, z), rtol=1e-9, atol=1e-10)
    vol = geo.volume_measure(dec, z)
    torch.testing.assert_close(vol, torch.linalg.det(geo.metric(dec.features, z)).sqrt())


def test_equal_end_points_give_zero_length():
    dec = small_mlp_decoder(rbf=False)
    z = torch.randn(3, 2, dtype=F64)
    res = geo.geodesic(z, z, dec, n_segments=8)
    assert res.converged.all()
    assert torch.equal(res.lengths, torch.zeros(3, dtype=F64))
    # Exactly, also where equal points' features differ by rounding with their row in a batch
    # (kernels computing rows at other positions of a block, as numpy's BLAS does under the
    # Triton interpreter on some CPUs): such a decoder, here by construction, gave lengths of
    # about 1e-16 and interior points moved by as much. A pair with z0 != z1 beside them is
    # solved as ever.
    a = torch.randn(2, 5, dtype=F64)

    def jittery(q):
        return q @ a + 1e-15 * torch.arange(q.shape[0], dtype=F64)[:, None]

    pairs0 = torch.cat([z, torch.zeros(1, 2, dtype=F64)])
    pairs1 = torch.cat([z, torch.ones(1, 2, dtype=F64)])
    res = geo.geodesic(pairs0, pairs1, jittery, n_segments=8)
    assert torch.equal(res.lengths[:3], torch.zeros(3, dtype=F64)) and torch.equal(res.energies[:3], res.lengths[:3])
    assert torch.equal(res.curves[:3], z[:, None].expand(3, 9, 2)) and res.converged.all()
    torch.testing.assert_close(res.lengths[3], (torch.ones(2, dtype=F64) @ a).norm(), rtol=1e-6, atol=0)


def test_exp_map_on_sphere_travels_speed_times_time():
    z = torch.tensor([[0.3, -0.2], [1.5, 0.4]], dtype=F64)
    v = torch.tensor([[0.4, 0.7], [-0.3, 0.2]], dtype=F64)
    path = geo.exp_map(sphere, z, v, t=1.0, n_steps=40)
    speed = torch.einsum("bi,bij,bj->b", v, geo.metric(sphere, z), v).sqrt()
    torch.testing.assert_close(great_circle(path[:, 0], path[:, -1]), speed, rtol=1e-4, atol=1e-6)
    # on a geodesic the speed is constant
    mid = path[:, 20]
    v_mid = (path[:, 21] - path[:, 19]) / (2 / 40)
    speed_mid = torch.einsum("bi,bij,bj->b", v_mid, geo.metric(sphere, mid), v_mid).sqrt()
    torch.testing.assert_close(speed_mid, speed, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("rbf", [False, True])
def test_exp_map_with_the_last_layer_reduced_to_r_is_the_path_with_w(monkeypatch, rbf):
    """exp_map and geodesic_acceleration run a linear last layer W_L [D, H] (D > H) as R of
    W_L = Q R (M and J^T g''[v, v] see W_L only through W_L^T W_L = R^T R): the same paths,
    accelerations and gradients as with W_L (LATENTFAST_GEOM_QR=0) to rounding, and a W_L
    changed between calls is seen."""
    from latentfast.vae import GaussianMLPDecoder
    dec = GaussianMLPDecoder(2, 11, (5, 4), activation="tanh").double()
    if rbf:
        zs = torch.randn(30, 2, dtype=F64)
        fit_rbf_variance(dec, zs, dec(zs)[0].detach() + 0.1 * torch.randn(30, 11, dtype=F64), n_centres=4, steps=20)
    z, v = torch.randn(3, 2, dtype=F64), 0.4 * torch.randn(3, 2, dtype=F64)

    def acceleration_and_grad():  # geodesic_acceleration runs R too; gradients reach z (not the weights)
        zg = z.clone().requires_grad_()
        acc = geo.geodesic_acceleration(dec, zg, v)
        return acc.detach(), torch.autograd.grad((acc * torch.arange(6.0, dtype=F64).view(3, 2)).sum(), zg)[0]
    reduced, reduced_acc = geo.exp_map(dec, z, v, n_steps=12), acceleration_and_grad()
    monkeypatch.setenv("LATENTFAST_GEOM_QR", "0")
    full, full_acc = geo.exp_map(dec, z, v, n_steps=12), acceleration_and_grad()
    torch.testing.assert_close(reduced, full, rtol=1e-10, atol=1e-12)
    for a, b in zip(reduced_acc, full_acc):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        dec.layers[-1].weight.add_(0.5 * torch.randn_like(dec.layers[-1].weight))  # a new W_L: a new R
    full3 = geo.exp_map(dec, z, v, n_steps=12)
    monkeypatch.setenv("LATENTFAST_GEOM_QR", "1")
    torch.testing.assert_close(geo.exp_map(dec, z, v, n_steps=12), full3, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(full3, full)


def test_exp_map_inverts_geodesic_on_sphere():
    """Shooting from z0 with the solved geodesic's initial velocity lands on z1."""
    z0, z1 = torch.tensor([[0.2, 0.1]], dtype=F64), torch.tensor([[-0.6, 0.9]], dtype=F64)
    res = geo.geodesic(z0, z1, sphere, n_segments=64, max_iter=800)
    v = (res.curves[:, 1] - res.curves[:, 0]) * 64
    end = geo.exp_map(sphere, z0, v, n_steps=64)[:, -1]
    assert (end - z1).norm() < 0.02


def _christoffel_acceleration(g, z, v):
    """-Gamma(z)[v, v] from the textbook formula M z'' = -(dM[v]) v + 1/2 grad_z (v^T M v),
    with M and dM from autograd Jacobians, one point at a time (float64)."""
    out = []
    for zi, vi in zip(z, v):
        m_fn = lambda x: (lambda j: j.T @ j)(torch.autograd.functional.jacobian(  # noqa: E731
            lambda y: g(y[None])[0], x, create_graph=True))
        m = m_fn(zi)
        dm = torch.autograd.functional.jacobian(m_fn, zi)  # [d, d, d], dm[i, j, k] = dM_ij / dz_k
        rhs = -(dm @ vi) @ vi + 0.5 * torch.einsum("i,ijk,j->k", vi, dm, vi)
        out.append(torch.linalg.solve(m, rhs))
    return torch.stack(out)


@pytest.mark.parametrize("rbf", [False, True])
def test_geodesic_acceleration_equals_christoffel_formula(rbf):
    """The forward-propagated z'' = -M^-1 J^T g''[v, v] (MLP decoders, every activation) and
    the torch.func path (any callable) against the Christoffel symbols of M."""
    torch.manual_seed(1)
    d, acts = 3, [1, 2, 3, 4, 0]
    dims = [d, 7, 6, 8, 5, 11]
    weights = [torch.randn(dims[i + 1], dims[i], dtype=F64) / dims[i] ** 0.5 for i in range(5)]
    biases = [torch.randn(dims[i + 1], dtype=F64) for i in range(5)]
    rbf_args = ()
    if rbf:
        rbf_args = (torch.randn(4, d, dtype=F64), torch.rand(4, dtype=F64) + 0.5,
                    torch.rand(11, 4, dtype=F64), 0.3)
    dec = MLPParams(weights, biases, acts, *rbf_args)
    z, v = torch.randn(6, d, dtype=F64), torch.randn(6, d, dtype=F64)
    z[0, :] = 0.0  # ELU at exactly 0 in some units is avoided by the biases; a plain point too
    g = geo.core._feature_fn(dec)
    expected = _christoffel_acceleration(g, z, v)
    torch.testing.assert_close(geo.geodesic_acceleration(dec, z, v), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(geo.geodesic_acceleration(lambda q: g(q), z, v), expected,
                               rtol=1e-9, atol=1e-10)


def test_linear_exp_map_and_extrapolation_are_straight(backend):
    a = torch.randn(4, 2, dtype=F64)
    dec = linear_decoder(a)
    z, v = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    path = geo.exp_map(dec, z, v, t=2.0, n_steps=10)
    torch.testing.assert_close(path[:, -1], z + 2.0 * v)
    curves = geo.straight_line(z, z + v, 8)
    ext = geo.extrapolate(dec, curves, t=0.5, n_steps=5)
    torch.testing.assert_close(ext[:, -1], z + 1.5 * v)


def test_interpolate_spaces_points_evenly():
    z0, z1 = torch.tensor([[0.1, 0.2]], dtype=F64), torch.tensor([[1.8, -0.5]], dtype=F64)
    res = geo.geodesic(z0, z1, sphere, n_segments=32, max_iter=800)
    pts = geo.interpolate(sphere, res.curves, 9)
    g = sphere(pts[0])
    steps = torch.arccos((g[1:] * g[:-1]).sum(-1).clamp(-1, 1))
    assert (steps / steps.mean() - 1).abs().max() < 0.02


def test_interpolate_many_curves_at_once():
    """A batch of curves (different lengths, one of length 0) gives, per curve, what the curve
    alone gives; points evenly spaced in decoded arc length on each (a linear decoder: the
    decoded polyline's length divided evenly), end points kept; bad arguments raise."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(3, 2, dtype=F64, generator=gen)
    dec = linear_decoder(a)
    curves = torch.randn(4, 6, 2, dtype=F64, generator=gen).cumsum(1)
    curves[2] = curves[2, :1]  # a constant curve
    pts = geo.interpolate(dec, curves, 7)
    assert pts.shape == (4, 7, 2)
    for i in range(4):
        torch.testing.assert_close(pts[i:i + 1], geo.interpolate(dec, curves[i:i + 1], 7), rtol=0, atol=1e-12)
        torch.testing.assert_close(pts[i, 0], curves[i, 0])
        torch.testing.assert_close(pts[i, -1], curves[i, -1])
        if i == 2:
            assert torch.equal(pts[i], curves[i, :1].expand(7, -1))
            continue
        g = pts[i] @ a.T
        total = (curves[i, 1:] @ a.T - curves[i, :-1] @ a.T).norm(dim=-1).sum()
        # consecutive points lie on the decoded polyline total / 6 apart in arc length; the
        # chord between them is at most that (shorter where a corner falls between them)
        chords = (g[1:] - g[:-1]).norm(dim=-1)
        assert (chords <= total / 6 + 1e-12).all() and chords.max() > total / 6 - 1e-9
    leaf = curves.clone().requires_grad_()
    geo.interpolate(dec, leaf, 5).sum().backward()  # differentiable in the curve points
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    torch.testing.assert_close(geo.interpolate(dec, curves[0], 5), geo.interpolate(dec, curves[:1], 5)[0])
    with pytest.raises(ValueError):
        geo.interpolate(dec, curves[0, 0], 5)  # one point is not a curve
    with pytest.raises(ValueError):
        geo.interpolate(dec, curves, 1)


def test_distance_matrix_kmedoids_and_knn():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 2, dtype=F64, generator=gen)
    dec = linear_decoder(a)
    m = 3 if interpreting() else 5  # each interpreted kernel launch runs its programs in Python
    blob0 = torch.randn(m, 2, dtype=F64, generator=gen) * 0.1
    blob1 = torch.randn(m, 2, dtype=F64, generator=gen) * 0.1 + 3.0
    x = torch.cat([blob0, blob1])
    dist = geo.distance_matrix(dec, x, n_segments=4)
    assert torch.equal(dist, dist.T) and torch.equal(dist.diagonal(), torch.zeros(2 * m, dtype=F64))
    euclid = torch.cdist(x @ a.T, x @ a.T)
    torch.testing.assert_close(dist, euclid, rtol=1e-6, atol=1e-9)
    labels, medoids = geo.kmedoids(dist, 2)
    assert len(set(labels[:m].tolist())) == 1 and len(set(labels[m:].tolist())) == 1
    assert labels[0] != labels[m]
    y = torch.tensor([0] * m + [1] * m)
    q = torch.tensor([[0.05, 0.0], [2.9, 3.1]], dtype=F64)
    assert geo.knn_predict(dec, x, y, q, k=3, n_segments=4).tolist() == [0, 1]
    labels2, _ = geo.riemannian_kmeans(dec, x, 2, n_segments=4)
    assert torch.equal(labels2, labels)


def test_distance_matrix_in_batches_is_the_one_batch_solve():
    """distance_matrix solves its pairs batch_size at a time: the same distances (each pair's
    solve is its own) for batches that split the pairs unevenly, symmetric or not."""
    dec = small_mlp_decoder()
    gen = torch.Generator().manual_seed(9)
    nx, ny = (3, 2) if interpreting() else (6, 4)  # each interpreted kernel launch runs its programs in Python
    x, y = torch.randn(nx, 2, dtype=F64, generator=gen), torch.randn(ny, 2, dtype=F64, generator=gen)
    for other in (None, y):
        whole = geo.distance_matrix(dec, x, other, batch_size=10_000, n_segments=6)
        for bs in ((1, 4) if interpreting() else (1, 4, 7)):
            torch.testing.assert_close(geo.distance_matrix(dec, x, other, batch_size=bs, n_segments=6), whole,
                                       rtol=1e-7, atol=1e-12)
    assert whole.shape == (nx, ny) and bool((whole > 0).all())
    shown = geo.distance_matrix(dec, x[:3], batch_size=2, progress=True, n_segments=6)  # a bar over 3 pairs
    torch.testing.assert_close(shown, geo.distance_matrix(dec, x[:3], n_segments=6), rtol=1e-7, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        geo.distance_matrix(dec, x, batch_size=0)


@pytest.mark.parametrize("which", ["mlp", "sphere"])
def test_knn_is_the_distance_matrix_top_k_with_fewer_solves(which, monkeypatch):
    """knn prunes by the feature chord (a lower bound of every curve's length): the same
    neighbours and distances as the top k of the full distance matrix, from fewer geodesics;
    knn_predict votes over them."""
    from latentfast.geometry import core

    dec = small_mlp_decoder() if which == "mlp" else sphere
    gen = torch.Generator().manual_seed(21)
    scale = 1.0 if which == "mlp" else 0.7
    small = interpreting() and which == "mlp"  # the sphere takes the generic path, no kernels
    x_train = scale * torch.randn(12 if small else 30, 2, dtype=F64, generator=gen)
    x_query = torch.cat([scale * torch.randn(2 if small else 5, 2, dtype=F64, generator=gen),
                         x_train[3:4]])  # the last one on a training point
    full = geo.distance_matrix(dec, x_query, x_train, n_segments=8)
    want_d, want_i = full.topk(3, dim=1, largest=False)
    solved = []
    real = core.geodesic

    def counting(z0, z1, *args, **kwargs):
        solved.append(len(z0))
        return real(z0, z1, *args, **kwargs)

    monkeypatch.setattr(core, "geodesic", counting)
    d, i = geo.knn(dec, x_query, x_train, k=3, batch_size=7, n_segments=8)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d, want_d, rtol=1e-7, atol=1e-12)
    assert float(d[-1, 0]) == 0.0 and int(i[-1, 0]) == 3
    assert sum(solved) < (0.8 if small else 0.6) * full.numel(), (sum(solved), full.numel())
    # the chord bounds every solved length from below (to rounding: the same point's features
    # computed in two batches differ by a few ulps)
    feats = core._feature_fn(dec)
    chord = torch.cdist(feats(x_query), feats(x_train), compute_mode="donot_use_mm_for_euclid_dist")
    assert bool((full >= chord * (1 - 1e-9) - 1e-14).all())
    y = (x_train[:, 0] > 0).long()
    votes = torch.mode(y[want_i], dim=1).values
    assert torch.equal(geo.knn_predict(dec, x_train, y, x_query, k=3, n_segments=8), votes)
    with pytest.raises(ValueError, match="k must be"):
        geo.knn(dec, x_query, x_train, k=31)
    with pytest.raises(ValueError, match="latent dimension"):
        geo.knn(dec, x_query[:, :1], x_train)


def test_random_walk_steps_have_covariance_inverse_metric(backend):
    a = torch.diag(torch.tensor([4.0, 0.5], dtype=F64))
    dec = linear_decoder(a)
    z0 = torch.zeros(4000, 2, dtype=F64)
    walk = geo.random_walk(dec, z0, 1, step_size=0.01, generator=torch.Generator().manual_seed(0))
    steps = (walk[:, 1] - walk[:, 0]) / 0.1
    cov = steps.T @ steps / steps.shape[0]
    expected = torch.linalg.inv(a.T @ a)
    torch.testing.assert_close(cov, expected, rtol=0.1, atol=0.01)


def test_bad_inputs_raise():
    dec = small_mlp_decoder(rbf=False)
    with pytest.raises(ValueError, match="same shape"):
        geo.geodesic(torch.zeros(2, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), dec)
    bad = torch.zeros(2, 2, dtype=F64)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        geo.geodesic(bad, torch.ones(2, 2, dtype=F64), dec)
    with pytest.raises(TypeError, match="decoder must be"):
        geo.geodesic(torch.zeros(1, 2), torch.ones(1, 2), "not a decoder")
    # a VAE itself (its call is the loss; it raised "x must be [N, 16]" about the latent points)
    for model in (VAE(16, latent_dim=2, hidden=(8,)), VAE(2, latent_dim=2, hidden=(8,))):
        with pytest.raises(TypeError, match=r"pass its decoder \(model.decoder\)"):
            geo.metric(model, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="init"):
        geo.geodesic(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), dec, init="spline")
    with pytest.raises(ValueError, match="data"):
        geo.geodesic(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), dec, init="graph")
    with pytest.raises(ValueError, match="latent points of dimension 2"):
        geo.metric(dec, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="step_size"):
        geo.random_walk(dec, torch.zeros(1, 2, dtype=F64), 3, step_size=0.0)
    with pytest.raises(ValueError, match="n_steps"):
        geo.random_walk(dec, torch.zeros(1, 2, dtype=F64), -1)
    z, v = torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="n_steps"):
        geo.exp_map(dec, z, v, n_steps=0)
    with pytest.raises(ValueError, match="finite"):
        geo.exp_map(dec, z, v, t=float("inf"))
    with pytest.raises(ValueError, match="at least 2 points"):
        geo.extrapolate(dec, torch.zeros(2, 1, 2, dtype=F64))
    x, y = torch.randn(3, 2, dtype=F64), torch.tensor([0, 1, 0])
    for k in (0, 4):
        with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
            geo.knn_predict(dec, x, y, x, k=k, n_segments=4)
    with pytest.raises(ValueError, match="y_train"):
        geo.knn_predict(dec, x, y[:, None], x, k=1, n_segments=4)
    with pytest.raises(ValueError, match="tol >= 0"):
        geo.geodesic(z, z + 1, dec, tol=-1.0)
    with pytest.raises(ValueError, match="latent points of dimension 2"):
        geo.interpolate(dec, torch.zeros(2, 4, 3, dtype=F64), 5)
    for bad in (lambda q: q.sum(1), lambda q: q[..., None].expand(*q.shape, 3)):  # [N] or [N, d, 3], not [N, D]
        with pytest.raises(ValueError, match=r"decoder callable must map latent points \[N, d\]"):
            geo.metric(bad, z)
        with pytest.raises(ValueError, match=r"decoder callable must map latent points \[N, d\]"):
            geo.curve_length(bad, torch.zeros(2, 4, 2, dtype=F64))


def test_inputs_that_do_not_fit_the_decoder_raise_on_every_path():
    """Latent points of another dimension, dtype or device than an MLP decoder's, NaN where a
    function did not check, and non-tensor end points raise ValueError / TypeError naming the
    input. Before, the functions that run plain PyTorch on the decoder's tensors (exp_map,
    extrapolate, geodesic_acceleration, knn, interpolate, graph_init) failed inside a matrix
    product (RuntimeError), geodesic_acceleration and interpolate returned NaN for NaN input,
    and geodesic / graph_init raised AttributeError on a list."""
    dec = small_mlp_decoder(rbf=False)  # float64, d = 2
    z, v = torch.randn(3, 2, dtype=F64), 0.1 * torch.randn(3, 2, dtype=F64)
    z3 = torch.randn(3, 3, dtype=F64)
    curve = geo.straight_line(z[:1], z[1:2], 4)
    for call in (lambda: geo.exp_map(dec, z3, z3, n_steps=2), lambda: geo.geodesic_acceleration(dec, z3, z3),
                 lambda: geo.extrapolate(dec, torch.randn(1, 4, 3, dtype=F64), n_steps=2),
                 lambda: geo.knn(dec, z3, z3, k=1), lambda: geo.distance_matrix(dec, z3),
                 lambda: geo.graph_init(z3[:1], z3[1:2], dec, z3, 4)):
        with pytest.raises(ValueError, match="latent points of dimension 2"):
            call()
    for call in (lambda: geo.exp_map(dec, z.float(), v.float(), n_steps=2),
                 lambda: geo.exp_map(dec, z, v.float(), n_steps=2),
                 lambda: geo.geodesic_acceleration(dec, z.float(), v.float()),
                 lambda: geo.knn(dec, z.float(), z.float(), k=1), lambda: geo.knn(dec, z, z.float(), k=1),
                 lambda: geo.interpolate(dec, curve.float(), 3), lambda: geo.distance_matrix(dec, z, z.float()),
                 lambda: geo.graph_init(z[:1].float(), z[1:2].float(), dec, z.float(), 4),
                 lambda: geo.graph_init(z[:1], z[1:2], dec, z.float(), 4),
                 lambda: geo.geodesic(z[:1], z[1:2].float(), dec)):
        with pytest.raises(TypeError, match="dtype"):
            call()
    nan = z.clone()
    nan[1, 0] = float("nan")
    for call in (lambda: geo.geodesic_acceleration(dec, nan, v), lambda: geo.geodesic_acceleration(dec, z, nan),
                 lambda: geo.interpolate(dec, geo.straight_line(nan[:2], z[:2], 4), 3)):
        with pytest.raises(ValueError, match="NaN"):
            call()
    for call in (lambda: geo.geodesic([[0.0, 0.0]], z[:1], dec), lambda: geo.graph_init([0.0, 0.0], z[0], dec, z, 4),
                 lambda: geo.geodesic(z[:1], [[0.0, 0.0]], dec)):
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            call()


def test_exp_map_into_a_degenerate_metric_raises_a_clear_error():
    """Shooting from where every tanh unit is saturated (float32: tanh' = 0 exactly, so M = 0)
    raises ValueError naming the singular metric, not torch's LinAlgError; a path that turns
    NaN is refused too."""
    dec = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
    with torch.no_grad():
        dec[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        dec[0].bias.zero_()
    with pytest.raises(ValueError, match="singular in RK4 step 1 of 5"):
        geo.exp_map(dec, torch.full((1, 2), 100.0), torch.ones(1, 2), n_steps=5)
    assert torch.isfinite(geo.exp_map(dec, torch.zeros(1, 2), 0.1 * torch.ones(1, 2), n_steps=5)).all()
    # a decoder that is NaN past z_0 = 0 (sqrt): the solve does not fail on NaN, the final check does
    f = lambda z: torch.cat([z, torch.sqrt(z[:, :1])], 1)  # noqa: E731
    with pytest.raises(ValueError, match="NaN/Inf at RK4 step 8 of 10"):
        geo.exp_map(f, torch.tensor([[0.5, 0.0]], dtype=F64), torch.tensor([[-1.0, 0.0]], dtype=F64), n_steps=10)


def test_exp_map_names_the_same_singular_step_however_the_stages_are_tested(monkeypatch):
    """exp_map tests the stages' metrics for singularity in batches of up to _PENDING_ELEMS
    elements (one eigvalsh per batch): a path that saturates every tanh unit part way names
    the same first singular step and paths whether each stage is tested alone, a few stages
    (and a part of a step) at a time, or all at once."""
    from latentfast.geometry import core
    dec = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
    with torch.no_grad():
        dec[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        dec[0].bias.zero_()
    z = torch.tensor([[0.0, 0.0], [0.1, -0.1], [0.5, 0.5]])
    v = torch.tensor([[0.1, 0.1], [0.0, 0.2], [2.0, 2.0]])  # the third path saturates part way
    messages = set()
    for elems in (4, 3 * 4 * 3, 1 << 20):  # one stage, three stages, everything
        monkeypatch.setattr(core, "_PENDING_ELEMS", elems)
        with pytest.raises(ValueError, match=r"singular in RK4 step \d+ of 12") as err:
            geo.exp_map(dec, z, v, n_steps=12)
        messages.add(str(err.value))
    assert len(messages) == 1
    step = re.search(r"step (\d+) of 12 \(to working precision, on path\(s\) \[2\]\)", messages.pop())
    assert step and int(step.group(1)) > 1  # not the first step: the batches split the stages before it


@pytest.mark.parametrize("narrow", ["hidden layer", "features"])
def test_acceleration_of_a_rank_deficient_metric_raises(backend, narrow):
    """A decoder whose metric has rank below d everywhere (a hidden layer narrower than d, or
    fewer features than d) does not determine z''; geodesic_acceleration and exp_map raise
    ValueError on both paths, as they do for an exactly singular M (before, the solve of the
    numerically singular M returned one of its infinitely many solutions, picked by
    rounding: the fused and generic paths' z'' up to 250% apart here). A
    metric that is merely ill-conditioned (eigenvalues 1 and 1e-10) is solved as before."""
    torch.manual_seed(0)
    widths = [3, 2, 4] if narrow == "hidden layer" else [3, 5, 2]
    dec = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2]), nn.Tanh()).double()
    z, v = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    for decoder in (dec, lambda q: dec(q)):
        with pytest.raises(ValueError, match=r"M\(z\) is singular to working precision at point\(s\) \[0, 1, 2, 3\]"):
            geo.geodesic_acceleration(decoder, z, v)
        with pytest.raises(ValueError, match=r"singular in RK4 step 1 of 3 \(to working precision, on path\(s\) "
                                             r"\[0, 1, 2, 3\]\)"):
            geo.exp_map(decoder, z, v, n_steps=3)
    # scale one direction by 1e-5 (M's eigenvalues 1, 1, 1e-10): regular, and a linear map's
    # geodesics are straight lines, z'' = 0
    lin = linear_decoder(torch.diag(torch.tensor([1.0, 1.0, 1e-5], dtype=F64)))
    torch.testing.assert_close(geo.geodesic_acceleration(lin, z, v), torch.zeros_like(z), rtol=0, atol=1e-12)
    path = geo.exp_map(lin, z, v, n_steps=3)
    torch.testing.assert_close(path[:, -1], z + v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_segments", [2, 3, 8])
def test_short_one_dimensional_geodesics_converge_to_the_exact_energy(backend, n_segments):
    """In one latent dimension the minimal discrete energy is (g(z1) - g(z0))^2 (equal
    feature steps). Over a short interval the straight line is within 1e-8 of the minimum,
    nearer than the line search's halvings reach from the first step (a tenth of the curve):
    before, every trial failed, the pair took no step and was flagged not converged (at
    dz = 2e-3 for each T here, and at 1e-2 for T = 3); a last trial at the quadratic model's
    minimiser now takes it there."""
    g = lambda z: z + 0.01 * z ** 2  # noqa: E731
    z0 = torch.full((3, 1), 0.5, dtype=F64)
    z1 = z0 + torch.tensor([[2e-3], [1e-2], [1e-1]], dtype=F64)
    res = geo.geodesic(z0, z1, g, n_segments=n_segments)
    assert res.converged.all(), res.converged
    torch.testing.assert_close(res.energies, ((g(z1) - g(z0)) ** 2)[:, 0], rtol=1e-12, atol=0)


def test_geodesic_of_no_pairs_is_empty():
    dec = small_mlp_decoder(rbf=False)
    for init in ("line", "graph"):
        res = geo.geodesic(torch.zeros(0, 2, dtype=F64), torch.zeros(0, 2, dtype=F64), dec, n_segments=6, init=init,
                           data=torch.randn(20, 2, dtype=F64))
        assert res.curves.shape == (0, 7, 2) and res.curves.dtype == F64
        assert res.lengths.shape == res.energies.shape == res.converged.shape == res.iterations.shape == (0,)


def test_one_pair_of_unbatched_points_gives_unbatched_results():
    """z0, z1 [d] give curves [T+1, d] and 0-dim lengths, energies, converged, iterations:
    the pair's row of the batched solve, as torch's layers answer unbatched inputs."""
    dec = small_mlp_decoder(rbf=False)
    gen = torch.Generator().manual_seed(5)
    z0, z1 = torch.randn(3, 2, dtype=F64, generator=gen), torch.randn(3, 2, dtype=F64, generator=gen)
    batched = geo.geodesic(z0[1:2], z1[1:2], dec, n_segments=9)
    one = geo.geodesic(z0[1], z1[1], dec, n_segments=9)
    assert one.curves.shape == (10, 2)
    for name in ("lengths", "energies", "converged", "iterations"):
        got, want = getattr(one, name), getattr(batched, name)
        assert got.shape == () and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want[0], rtol=0, atol=0)
    torch.testing.assert_close(one.curves, batched.curves[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="same shape"):  # [d] with [1, d]: no guessing which is meant
        geo.geodesic(z0[1], z1[1:2], dec)
    with pytest.raises(ValueError, match="same shape"):
        geo.geodesic(z0[1:2], z1[1], dec)


@pytest.mark.parametrize("m", [0, 1, 2, 7, 20])
def test_lbfgs_compact_direction_equals_the_two_loop_recursion(m):
    """The geodesic solver's H g (compact form, two triangular solves) against the two-loop
    recursion, float64, on histories with positive curvature s . y, problems holding
    different numbers of pairs (the missing ones zero rows in front), and various gamma."""
    from latentfast.geometry.core import _lbfgs_direction
    from latentfast.reference.geometry import lbfgs_two_loop

    gen = torch.Generator().manual_seed(m)
    b, n = 6, 9
    held = torch.tensor([m, max(m - 1, 0), m // 2, 0, m, 1 if m else 0])
    valid = torch.arange(m)[None, :] >= (m - held)[:, None]
    a = torch.randn(b, n, n, generator=gen, dtype=F64)
    hess = a @ a.transpose(1, 2) + 0.5 * torch.eye(n, dtype=F64)  # SPD: s . y = s^T H s > 0
    s = torch.randn(b, m, n, generator=gen, dtype=F64) * valid[..., None]
    y = (s @ hess) + 0.01 * torch.randn(b, m, n, generator=gen, dtype=F64) * valid[..., None]
    assert bool(((s * y).sum(-1)[valid] > 0).all())
    g = torch.randn(b, n, generator=gen, dtype=F64)
    gamma = 0.1 + torch.rand(b, generator=gen, dtype=F64)
    got = _lbfgs_direction(g, s, y, valid, gamma)
    torch.testing.assert_close(got, lbfgs_two_loop(g, s, y, valid, gamma), rtol=1e-10, atol=1e-12)
    if m:  # and it is a quasi-Newton step: H y_newest = s_newest where the newest pair is held
        full = held == m
        hy = _lbfgs_direction(y[:, -1], s, y, valid, gamma)
        torch.testing.assert_close(hy[full], s[full, -1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("steps", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_batched_lbfgs_problems_are_independent_of_their_batch(steps):
    """The batched L-BFGS on problems that finish at different iterations (a zero gradient at
    the start, easy and hard Rosenbrock valleys, a max_iter cut-off): each problem's result,
    flag and iteration count are those it gets alone, every fg call asks for the problems it
    evaluates by their own indices, and the minimisers are found."""
    from latentfast.geometry import core

    steps = {"torch": core._TorchSteps, "cpp": core._CppSteps}[steps]
    _batched_lbfgs = functools.partial(core._batched_lbfgs, steps=steps)
    scale = torch.tensor([1.0, 3.0, 30.0, 100.0, 0.3], dtype=F64)  # valley steepness per problem
    seen = []

    def fg(x, idx):
        seen.append(idx.clone())
        c = scale[idx][:, None]
        a, b = x[:, :-1], x[:, 1:]
        f = ((1 - a) ** 2 + c * (b - a * a) ** 2).sum(1)
        g = torch.zeros_like(x)
        g[:, :-1] += -2 * (1 - a) - 4 * c * a * (b - a * a)
        g[:, 1:] += 2 * c * (b - a * a)
        return f, g

    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(5, 6, generator=gen, dtype=F64)
    x0[0] = 1.0  # the minimiser: zero gradient, converged without an iteration
    for max_iter in (400, 12):
        seen.clear()
        x, f, conv, iters = _batched_lbfgs(fg, x0, 1e-12, max_iter)
        assert all(len(set(s.tolist())) == len(s) and len(s) > 0 for s in seen)
        for i in range(5):  # each problem alone, under its own index
            def fg_one(xs, idx, i=i):
                assert idx.tolist() == [0]
                return fg(xs, torch.tensor([i]))

            xi, fi, ci, ii = _batched_lbfgs(fg_one, x0[i:i + 1], 1e-12, max_iter)
            torch.testing.assert_close(x[i:i + 1], xi, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(f[i:i + 1], fi, rtol=1e-12, atol=1e-14)
            assert conv[i] == ci[0] and iters[i] == ii[0], (i, max_iter)
        assert bool(conv[0]) and int(iters[0]) == 0
        if max_iter == 400:
            assert bool(conv.all()) and len(set(iters.tolist())) >= 3  # finished at different times
            torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=1e-4)
        else:
            assert not bool(conv[1:].all()) and int(iters.max()) == 12  # cut off


def _lbfgs_state(dtype, gen, b=8, n=11, h=4):
    """A random working state of _batched_lbfgs: ring buffers holding 0 to 2h + 1 pairs
    (wrapped past h for some problems; slots never written are zero, as in the solver) of
    positive curvature, except problem 6, whose newest pair has s.y < 0 (so gamma < 0 and
    the quasi-Newton step is not a descent direction), and problem 7 with a zero gradient."""
    count = torch.tensor([0, 1, h - 1, h, h + 3, 2 * h + 1, h + 1, 2])
    a = torch.randn(b, n, n, generator=gen, dtype=F64)
    hess = a @ a.transpose(1, 2) / n + 0.5 * torch.eye(n, dtype=F64)
    s = torch.randn(b, h, n, generator=gen, dtype=F64)
    y = s @ hess + 0.01 * torch.randn(b, h, n, generator=gen, dtype=F64)
    filled = torch.arange(h)[None, :] < count[:, None]  # slot k holds a pair once count > k
    s, y = s * filled[..., None], y * filled[..., None]
    y[6, (count[6] - 1) % h] *= -1
    g = torch.randn(b, n, generator=gen, dtype=F64)
    g[7] = 0
    return g.to(dtype), s.to(dtype), y.to(dtype), count


@needs_cpp
def test_cpp_lbfgs_direction_matches_the_pytorch_steps():
    """latentfast_cpp::lbfgs_direction_ (two-loop recursion on each problem's ring buffer)
    against _TorchSteps.direction (compact form on the reordered pairs): float64 to 1e-10,
    float32 inputs against the float64 formulation (the C++ sums in double); NaN-poisoned
    outputs all written; the non-descent problem falls back to -g."""
    from latentfast.geometry.core import _TorchSteps

    gen = torch.Generator().manual_seed(3)
    g, s, y, count = _lbfgs_state(F64, gen)
    want_p, want_slope = _TorchSteps.direction(g, s, y, count)
    assert torch.equal(want_p[6], -g[6]) and torch.equal(want_p[7], torch.zeros_like(g[7]))
    assert bool((want_p[:6] != -g[:6]).any(1).all())  # the others take quasi-Newton steps
    for dtype, tol in ((F64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=2e-5, atol=1e-6))):
        p = torch.full(g.shape, float("nan"), dtype=dtype)
        slope = torch.full(g.shape[:1], float("nan"), dtype=dtype)
        torch.ops.latentfast_cpp.lbfgs_direction_(p, slope, g.to(dtype), s.to(dtype), y.to(dtype), count)
        torch.testing.assert_close(p.double(), want_p, **tol)
        torch.testing.assert_close(slope.double(), want_slope, **tol)
        assert bool((slope[:7] < 0).all()) and slope[7] == 0
    with pytest.raises(RuntimeError, match="count"):
        torch.ops.latentfast_cpp.lbfgs_direction_(p, slope, g.float(), s.float(), y.float(), count.int())


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cpp_lbfgs_trial_and_update_match_the_pytorch_steps(dtype):
    """latentfast_cpp::lbfgs_trial_ and lbfgs_update_ against _TorchSteps.trial / update on
    the same state, every in-place output compared: Armijo trials of all problems and of a
    subset, then the update with problems that did not move, pairs that are not stored
    (s.y <= 0), ring-buffer wrap-around, a zero gradient, and decreases above and below tol."""
    from latentfast.geometry.core import _TorchSteps

    gen = torch.Generator().manual_seed(5)
    g, s_hist, y_hist, count = _lbfgs_state(dtype, gen)
    b, n = g.shape
    x = torch.randn(b, n, generator=gen, dtype=F64).to(dtype)
    p = torch.randn(b, n, generator=gen, dtype=F64).to(dtype)
    f = (1 + torch.rand(b, generator=gen, dtype=F64)).to(dtype)
    slope = -(0.5 + torch.rand(b, generator=gen, dtype=F64)).to(dtype)
    ops = torch.ops.latentfast_cpp

    def clones(*ts):
        return [t.clone() for t in ts]

    # first trial, all problems at step 1: every other one passes the Armijo test
    ft = f + 1e-4 * slope + torch.tensor([-1e-3, 1e-3] * (b // 2), dtype=dtype)
    gt = torch.randn(b, n, generator=gen, dtype=F64).to(dtype)
    state = [f.clone(), g.clone(), torch.ones_like(f), torch.ones(b, dtype=torch.bool)]
    mine, ref = clones(*state), clones(*state)
    assert ops.lbfgs_trial_(*mine, ft, gt, f, slope, None) == _TorchSteps.trial(*ref, ft, gt, f, slope, None) == b // 2
    for a, e in zip(mine, ref):
        assert torch.equal(a, e)
    # a retry of the problems still searching, at their halved steps: one of them passes
    rows = ref[3].nonzero().squeeze(1)
    ft2 = f[rows] + 1e-4 * 0.5 * slope[rows] + torch.tensor([1e-3] * (len(rows) - 1) + [-1e-3], dtype=dtype)
    gt2 = torch.randn(len(rows), n, generator=gen, dtype=F64).to(dtype)
    left = ops.lbfgs_trial_(*mine, ft2, gt2, f, slope, rows)
    assert left == _TorchSteps.trial(*ref, ft2, gt2, f, slope, rows) == b // 2 - 1
    for a, e in zip(mine, ref):
        assert torch.equal(a, e)
    f_new, g_new, step, searching = ref
    assert bool((f_new[~searching] < f[~searching]).all())

    # the update: problem 2 moves along a negative-curvature pair (not stored), problem 7
    # ends at a zero gradient, problem 4 barely decreases (small counts up to done)
    g_new[2] = g[2] - 3 * step[2] * p[2]
    g_new[7] = 0
    if bool(searching[4]):
        searching[4] = False
    f_new[4] = f[4] * (1 - 1e-9)
    small = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    iters = torch.arange(b) + 3
    tol = 1e-6
    state = [x, s_hist, y_hist, count, small, iters]
    mine, ref = clones(*state), clones(*state)
    done = torch.ones(b, dtype=torch.bool)
    args = (f, g, f_new, g_new, p, step, searching)
    ops.lbfgs_update_(*mine, done, *args, tol)
    x_ref, done_ref = _TorchSteps.update(*ref, *args, tol)
    ref[0] = x_ref
    for name, a, e in zip(("x", "s_hist", "y_hist", "count", "small", "iters"), mine, ref):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)
    assert torch.equal(done, done_ref) and bool(done[4]) and bool(done[7])
    assert not torch.equal(mine[3], count)  # some pairs stored ...
    assert int(mine[3][2]) == int(count[2]) and bool(searching.any())  # ... not problem 2's


@needs_cpp
def test_batched_lbfgs_with_cpp_steps_solves_as_the_pytorch_steps():
    """The whole solver with each step implementation, float64, on Rosenbrock valleys of
    different steepness (offset by 1: a positive minimum, as a curve energy has, so that the
    relative stopping test ends the solves before rounding does): the same minimisers, values,
    flags and iteration counts (within one iteration: the two sum in different orders, and a
    stopping test at tol = 1e-12 can fall either way by rounding)."""
    from latentfast.geometry.core import _batched_lbfgs, _CppSteps, _TorchSteps

    scale = torch.tensor([1.0, 3.0, 30.0, 100.0, 0.3, 10.0, 2.0], dtype=F64)

    def fg(x, idx):
        c = scale[idx][:, None]
        a, b = x[:, :-1], x[:, 1:]
        g = torch.zeros_like(x)
        g[:, :-1] += -2 * (1 - a) - 4 * c * a * (b - a * a)
        g[:, 1:] += 2 * c * (b - a * a)
        return 1 + ((1 - a) ** 2 + c * (b - a * a) ** 2).sum(1), g

    x0 = torch.randn(7, 9, generator=torch.Generator().manual_seed(11), dtype=F64)
    got = _batched_lbfgs(fg, x0, 1e-12, 400, history=6, steps=_CppSteps)
    want = _batched_lbfgs(fg, x0, 1e-12, 400, history=6, steps=_TorchSteps)
    torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-8, atol=1e-14)
    assert torch.equal(got[2], want[2]) and bool(got[2].all())
    # the same iterations, up to one where the last decrease sits at tol within rounding
    assert int((got[3] - want[3]).abs().max()) <= 1 and int(got[3].max()) > 6  # the rings wrap


def _steps_params():
    from latentfast.geometry.core import _CppSteps, _TorchSteps

    return [_TorchSteps] + ([_CppSteps] if lf_backend.why_unavailable("cpp", torch.device("cpu")) is None else [])


@pytest.mark.parametrize("steps", _steps_params(), ids=lambda c: c.__name__)
def test_a_failed_line_search_restarts_the_problem(steps):
    """Directions that no Armijo step accepts (here: quasi-Newton directions from `broken`
    stored pairs on, claiming a slope 1e9 times steeper than theirs, which no step, halved or
    interpolated, delivers) restart a problem: from several pairs to the newest
    alone, from one pair to steepest descent scaled by first_step. They are not taken for
    convergence (before, the same direction failed again and two iterations without
    decrease stopped the problem at the first failure)."""
    from latentfast.geometry.core import _batched_lbfgs

    diag = torch.logspace(0, 2, 12, dtype=F64)  # a quadratic of condition number 100

    def fg(x, idx):
        return 0.5 * (diag * x * x).sum(1), diag * x

    x0 = torch.randn(3, 12, generator=torch.Generator().manual_seed(5), dtype=F64)
    f0 = fg(x0, None)[0]
    for broken in (3, 1):
        class Broken(steps):
            @staticmethod
            def direction(g, s_hist, y_hist, count):
                p, slope = steps.direction(g, s_hist, y_hist, count)
                blow = 1 + 1e9 * (count >= broken).to(g.dtype)
                return p, slope * blow

        scaled = []  # the problems first_step scaled, per call

        def first_step(p, idx):
            scaled.append(idx.tolist())
            return p.new_full((len(idx),), 0.5)

        x, f, conv, iters = _batched_lbfgs(fg, x0, 1e-12, 500, history=6, steps=Broken, first_step=first_step)
        assert scaled[0] == [0, 1, 2]  # the first iteration
        if broken == 3:  # restarts with the newest pair: L-BFGS of memory 1-2 still solves it
            assert bool(conv.all()) and bool((f < 1e-20 * f0).all()), f
            assert len(scaled) == 1  # never down to steepest descent
            _, f_ok, conv_ok, iters_ok = _batched_lbfgs(fg, x0, 1e-12, 500, history=6, steps=steps)
            assert bool(conv_ok.all()) and bool((iters_ok < iters).all())  # the unbroken solver is faster
        else:  # every stored pair fails: steepest descent steps of half a unit, halved as needed
            assert bool((iters > 20).all()) and bool((f < 1e-3 * f0).all()), (iters, f / f0)
            assert all(sum(k in rows for rows in scaled) > 10 for k in range(3))


@pytest.mark.parametrize("steps", _steps_params(), ids=lambda c: c.__name__)
def test_a_problem_whose_steepest_descent_fails_stops_unconverged(steps):
    """Every direction claiming a slope 1e9 times steeper than its own, steepest descent
    included (no step, halved or interpolated, delivers it): the problems stop after two
    failed searches where they started, flagged not converged, while a problem already at
    its minimum (zero gradient) is converged."""
    from latentfast.geometry.core import _batched_lbfgs

    class Broken(steps):
        @staticmethod
        def direction(g, s_hist, y_hist, count):
            p, slope = steps.direction(g, s_hist, y_hist, count)
            return p, slope * 1e9

    def fg(x, idx):
        return 1 + 0.5 * (x * x).sum(1), x

    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    x0[1] = 0
    x, f, conv, iters = _batched_lbfgs(fg, x0, 1e-9, 50, steps=Broken)
    assert torch.equal(x, x0)
    assert conv.tolist() == [False, True, False] and iters.tolist() == [2, 0, 2]


@needs_cpp
def test_geodesic_steps_follow_the_backend(monkeypatch):
    """geodesic's solver takes the C++ steps on CPU when the cpp backend serves, PyTorch's
    otherwise (the reference backend stays pure PyTorch); both give the same geodesics (on
    the cpp backend's energies)."""
    from latentfast.geometry import core

    with latentfast.use_backend("reference"):
        assert core._lbfgs_steps(torch.zeros(1)) is core._TorchSteps
    dec = small_mlp_decoder()
    gen = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(5, 2, generator=gen, dtype=F64), torch.randn(5, 2, generator=gen, dtype=F64)
    with latentfast.use_backend("cpp"):
        assert core._lbfgs_steps(torch.zeros(1)) is core._CppSteps
        got = geo.geodesic(z0, z1, dec, n_segments=12)
        monkeypatch.setattr(core, "_lbfgs_steps", lambda x: core._TorchSteps)
        want = geo.geodesic(z0, z1, dec, n_segments=12)
    torch.testing.assert_close(got.curves, want.curves, rtol=1e-7, atol=1e-9)
    assert torch.equal(got.iterations, want.iterations) and bool(got.converged.all())


def test_as_mlp_of_a_detached_description_is_itself():
    """as_mlp of its own result (what the geodesic solver passes per energy call) returns it
    unchanged; a description holding live parameters comes back detached."""
    dec = small_mlp_decoder()
    p = geo.as_mlp(dec)
    assert geo.as_mlp(p) is p
    live = dec.mlp_params()
    assert any(t.requires_grad for t in live.weights)
    q = geo.as_mlp(live)
    assert q is not live and not any(t.requires_grad for t in (*q.weights, *q.biases))
    assert all(torch.equal(a, b) for a, b in zip(q.weights, live.weights))


def test_decoder_is_held_fixed_on_every_path():
    """Energies and metrics are differentiable in the curves and points, never in the
    decoder's parameters, whether the decoder runs the fused ops (GaussianMLPDecoder,
    nn.Sequential of Linear + tanh) or the generic path (an nn.Module with ReLU, a method of a
    module); before, the generic path let gradients reach the parameters and the fused one
    did not. The ops themselves, given live parameters, differentiate them."""
    from latentfast.ops import geometry as geo_ops

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 4)

        def forward(self, z):
            return self.b(torch.relu(self.a(z)))

        def squashed(self, z):
            return torch.tanh(self.forward(z))

    torch.manual_seed(0)
    net = Net().double()
    decoders = [small_mlp_decoder(), nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double(), net,
                net.squashed]
    for dec in decoders:
        module = dec if isinstance(dec, nn.Module) else dec.__self__
        module.zero_grad(set_to_none=True)  # (fit_rbf_variance's Adam left grads on the RBF weight)
        curves = torch.randn(3, 6, 2, dtype=F64, requires_grad=True)
        z = torch.randn(4, 2, dtype=F64, requires_grad=True)
        loss = geo.curve_energy(dec, curves).sum() + geo.curve_length(dec, curves, mode="metric").sum() \
            + geo.metric(dec, z).sum()
        loss.backward()
        assert curves.grad is not None and bool(curves.grad.abs().sum() > 0), type(dec).__name__
        assert z.grad is not None
        assert all(p.grad is None for p in module.parameters()), type(dec).__name__
    dec = decoders[0]
    params = dec.mlp_params()
    m = geo_ops.pullback_metric(torch.randn(4, 2, dtype=F64), *params.args())
    grads = torch.autograd.grad(m.sum(), params.weights)
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_decoder_runs_in_eval_mode(backend):
    """A decoder in training mode: the geometry is that of its deterministic (eval-mode) map.
    Before, dropout made the metric raise (vmap's randomness error) and the energies and
    geodesics random; a BatchNorm1d raised on the curves ([B, T+1, d] read as [N, C, L]) and
    would have used batch statistics. The modules' own modes are restored after (a layer
    already in eval mode stays there) and the running statistics are left as they were. An
    nn.Sequential's dropout layers are the identity there: such a decoder takes the fused path."""
    import copy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.drop, self.b = nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)

        def forward(self, z):
            return self.b(self.drop(torch.relu(self.norm(self.a(z)))))

        def squashed(self, z):
            return torch.tanh(self.forward(z))

    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():  # running statistics that are not the identity
        net.norm.running_mean.uniform_(-0.5, 0.5)
        net.norm.running_var.uniform_(0.5, 2.0)
    seq = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    assert geo.as_mlp(seq) is not None
    z = torch.randn(5, 2, dtype=F64)
    z0, z1 = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    curves = geo.straight_line(z0, z1, 6)
    for dec in (seq, net, net.squashed):
        module = dec if isinstance(dec, nn.Module) else dec.__self__
        frozen = copy.deepcopy(module).eval()
        plain = frozen if isinstance(dec, nn.Module) else frozen.squashed
        want = {"metric": geo.metric(lambda q: plain(q), z),
                "energy": geo.curve_energy(lambda q: plain(q), curves),
                "length": geo.geodesic(z0, z1, lambda q: plain(q), n_segments=6).lengths}
        module.train()
        if module is net:
            net.b.eval()
        stats = [b.clone() for b in module.buffers()]
        got = {"metric": geo.metric(dec, z), "energy": geo.curve_energy(dec, curves),
               "length": geo.geodesic(z0, z1, dec, n_segments=6).lengths}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-7, atol=1e-9, msg=f"{key} {dec}")
        assert all(m.training for m in module.modules() if m is not getattr(module, "b", None))
        assert module is not net or not net.b.training
        assert all(torch.equal(a, b) for a, b in zip(stats, module.buffers()))


@pytest.mark.parametrize("decoder", ["mlp", "generic"])
def test_geometry_under_no_grad_and_inference_mode(backend, decoder):
    """The geometry API inside torch.no_grad and torch.inference_mode (points made there
    too) gives its grad-mode results. With a decoder off the fused path the geodesic solver
    raised under inference_mode: its energy gradient by autograd got inference tensors
    ("element 0 of tensors does not require grad")."""
    torch.manual_seed(0)
    dec = small_mlp_decoder() if decoder == "mlp" else (lambda z: torch.stack([torch.sin(z[..., 0]) * z[..., 1],
                                                                               z[..., 0] ** 2, z[..., 1]], -1))
    z = torch.randn(8, 2, dtype=F64)
    line = geo.straight_line(z[:2], z[2:4], 6)
    seg = dict(n_segments=8)  # (few points a curve: the solves run the Triton kernels interpreted too)
    calls = {"geodesic": lambda zz: geo.geodesic(zz[:2], zz[2:4], dec, **seg).curves,
             "graph geodesic": lambda zz: geo.geodesic(zz[:2], zz[2:4], dec, init="graph", data=zz, **seg).lengths,
             "distance_matrix": lambda zz: geo.distance_matrix(dec, zz[:3], **seg),
             "knn": lambda zz: geo.knn(dec, zz[:2], zz[2:6], k=2, **seg)[0],
             "interpolate": lambda zz: geo.interpolate(dec, line, 4),
             "metric": lambda zz: geo.metric(dec, zz)}
    for name, call in calls.items():
        want = call(z)
        with torch.no_grad():
            torch.testing.assert_close(call(z), want, rtol=1e-9, atol=1e-10, msg=f"{name} under no_grad")
        with torch.inference_mode():
            got = call(z.clone())
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"{name} under inference_mode")


def test_sequential_decoder_uses_fused_ops_and_rejects_unknown_layers():
    seq = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3), nn.Sigmoid())
    p = geo.as_mlp(seq)
    assert p is not None and p.acts == [1, 4]
    assert geo.as_mlp(nn.Sequential(nn.Linear(2, 4), nn.ReLU())) is None
    z = torch.randn(5, 2)
    torch.testing.assert_close(geo.metric(seq, z), geo.metric(lambda x: seq(x), z), rtol=1e-5, atol=1e-6)


def test_vae_trains_and_rbf_variance_grows_away_from_data():
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(400, 1, generator=gen) * 2 * math.pi
    x = torch.cat([torch.cos(t), torch.sin(t), torch.cos(2 * t), torch.sin(2 * t)], 1)
    x = x + 0.05 * torch.randn(400, 4, generator=gen)
    model = VAE(4, latent_dim=2, hidden=(32,), beta=1.0)
    hist = fit(model, x, epochs=60, batch_size=32, lr=3e-3, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.75
    with torch.no_grad():
        z = model.encode(x)[0]
    rbf = fit_rbf_variance(model.decoder, z, x, n_centres=10, steps=200)
    assert model.decoder.rbf is rbf
    far = z.abs().max() * 4 * torch.ones(1, 2)
    with torch.no_grad():
        s_near = model.decoder.sigma(z).mean()
        s_far = model.decoder.sigma(far).mean()
    assert s_far > 3 * s_near
    # The metric is largest where sigma rises, just outside the data (far away both mu and
    # sigma saturate and the metric vanishes again).
    r = z.norm(dim=1).max()
    angles = torch.linspace(0, 2 * math.pi, 17)[:-1]
    radii = torch.linspace(1.0, 3.0, 21) * r
    ring = (radii[:, None, None] * torch.stack([angles.cos(), angles.sin()], 1)[None]).reshape(-1, 2)
    assert geo.volume_measure(model.decoder, ring).max() > 5 * geo.volume_measure(model.decoder, z).median()


def test_vae_bad_inputs_raise():
    """Inputs of the wrong size, a non-tensor, and the loss of an empty batch (whose mean
    would be NaN) raise; an empty batch still encodes to [0, d], and [N, ...] inputs are
    flattened."""
    from latentfast.vae.flow_vae import FlowVAE

    for model in (VAE(6, latent_dim=2, hidden=(8,)), FlowVAE(6, latent_dim=2, hidden=(8,), prior_steps=1)):
        with pytest.raises(ValueError, match=r"\[N, 6\]"):
            model.loss(torch.randn(3, 5))
        with pytest.raises(ValueError, match="empty batch"):
            model.loss(torch.randn(0, 6))
        with pytest.raises(TypeError, match="torch.Tensor"):
            model.embed([[0.0] * 6])
        assert model.embed(torch.randn(0, 6)).shape == (0, 2)
        assert model.embed(torch.randn(4, 2, 3)).shape == (4, 2)
    with pytest.raises(ValueError, match="N >= 1"):
        fit(VAE(6, latent_dim=2, hidden=(8,)), torch.randn(0, 6), progress=False)
    dec = GaussianMLPDecoder(2, 5, (8,))
    z, x = torch.randn(20, 2), torch.randn(20, 5)
    for args, kw, match in (((z[:, :1], x), {}, r"latents must be \[N, 2\]"),
                            ((z, x[:, :4]), {}, r"data must be \[N, 5\]"),
                            ((z, x[:10]), {}, "same number of rows"),
                            ((z, x), {"n_centres": 0}, "n_centres >= 1")):
        with pytest.raises(ValueError, match=match):
            fit_rbf_variance(dec, *args, steps=2, **kw)
    assert fit_rbf_variance(dec, z[:3], x[:3], n_centres=10, steps=2).centres.shape == (3, 2)  # every latent a centre


def test_vae_inputs_of_another_dtype_or_device_raise_clearly():
    """x of another dtype than the model's parameters (integer pixels, float64 into a float32
    model) raises a TypeError that says what to pass, in the loss and through the default MLP
    encoder; FlowVAE.log_prior and the latent sequence model check theirs too. Before, each
    failed inside a matrix product (RuntimeError: mat1 and mat2 must have the same dtype). An
    encoder of the user's still gets x as given (it may take integer images)."""
    from latentfast.rnn.latent import LatentSequenceModel
    from latentfast.vae.flow_vae import FlowVAE

    x = torch.rand(4, 6)
    for model in (VAE(6, latent_dim=2, hidden=(8,)), FlowVAE(6, latent_dim=2, hidden=(8,), prior_steps=1)):
        for bad in ((x * 16).long(), x.double()):
            for call in (lambda: model.loss(bad), lambda: model(bad), lambda: model.embed(bad)):
                with pytest.raises(TypeError, match=r"x has dtype torch\.\w+ but the model's parameters are "
                                                    r"torch\.float32: pass x\.to\(torch\.float32\)"):
                    call()
    with pytest.raises(TypeError, match="z has dtype torch.float64 but the model's parameters are torch.float32"):
        FlowVAE(6, latent_dim=2, hidden=(8,), prior_steps=1).log_prior(torch.zeros(3, 2, dtype=torch.float64))
    seq = LatentSequenceModel(6, latent=2, hidden=4, feature=4)
    with pytest.raises(TypeError, match="frames has dtype torch.float64 but the model's"):
        seq(torch.rand(2, 3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="z has dtype torch.float64"):
        seq.decode(torch.zeros(2, 2, dtype=torch.float64), 3)

    class Bytes(torch.nn.Module):  # takes uint8 images itself
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.lin(x.float() / 255).chunk(2, dim=-1)

    model = VAE(6, latent_dim=2, hidden=(8,), encoder=Bytes())
    assert model.embed((x * 255).to(torch.uint8)).shape == (4, 2)


def test_rbf_bandwidth_of_a_cluster_without_a_spread():
    """An outlier latent that k-means++ seeds as a centre is a cluster of one, with no spread to
    measure: it takes the median spread of the other clusters, so its precision bump is as wide
    as theirs. Before, the spread was clamped to 1e-3 (lambda = 2.2e5 at curvature 1.5): sigma,
    and the metric, had a needle 1e-3 wide around that one latent (the digits VAE of the
    geodesic benchmark had one, lambda 2.2e5 against a median of 8). Every latent a centre (no
    cluster has a spread): the median distance between nearest centres; all at one point: 1."""
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([0.3 * torch.randn(200, 2, generator=gen, dtype=torch.float64),
                   torch.tensor([[5.0, 5.0]], dtype=torch.float64)])
    x = torch.randn(201, 5, generator=gen, dtype=torch.float64)
    dec = GaussianMLPDecoder(2, 5, (8,)).double()
    rbf = fit_rbf_variance(dec, z, x, n_centres=8, steps=100)
    lone = (rbf.centres - z[-1]).norm(dim=1).argmin()
    assert torch.equal(rbf.centres[lone], z[-1])  # the outlier is a centre, its cluster itself alone
    others = torch.cat([rbf.bandwidths[:lone], rbf.bandwidths[lone + 1:]])
    spreads = (0.5 / others) ** 0.5 / 1.5
    torch.testing.assert_close(rbf.bandwidths[lone], 0.5 / (1.5 * spreads.median()) ** 2)
    assert rbf.bandwidths.max() < 1e3
    with torch.no_grad():  # the precision 0.01 from the outlier is nearly the one at it
        at, near = rbf.precision(z[-1:]), rbf.precision(z[-1:] + 0.01)
    assert ((near - at).abs() < 0.1 * at).all(), (at, near)

    few = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # every latent a centre
    rbf = fit_rbf_variance(dec, few, x[:3], n_centres=10, steps=0)
    torch.testing.assert_close(rbf.bandwidths, torch.full((3,), 0.5 / 1.5 ** 2, dtype=torch.float64))  # median 1
    same = torch.ones(4, 2, dtype=torch.float64)
    rbf = fit_rbf_variance(dec, same, x[:4], n_centres=2, steps=0)
    torch.testing.assert_close(rbf.bandwidths, torch.full_like(rbf.bandwidths, 0.5 / 1.5 ** 2))


def test_vae_fit_takes_a_data_loader():
    """fit takes an iterable of batches (a DataLoader of a TensorDataset, a list of tensors) as
    well as a tensor: each epoch goes through it once, in its own order, with the seeded noise;
    the result is Adam on loss_terms over those batches, written out here. Before, a DataLoader
    raised an AttributeError ('DataLoader' object has no attribute 'dim'). A generator, empty
    after its first epoch, and batches that hold no tensor raise a clear error."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=gen)
    torch.manual_seed(0)
    start = VAE(6, latent_dim=2, hidden=(8,)).state_dict()
    batches = list(x.split(16))

    def by_hand(data):  # Adam on loss_terms over data's batches, the noise seeded as fit seeds it
        model = VAE(6, latent_dim=2, hidden=(8,))
        model.load_state_dict(start)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        history = []
        with torch.random.fork_rng():
            torch.manual_seed(5)
            for _ in range(3):  # (a DataLoader draws its base seed from the same generator)
                parts = []
                for batch in data:
                    loss, nll, kl = model.loss_terms(batch[0] if isinstance(batch, list) else batch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    parts.append([loss.item(), nll.item(), kl.item()])
                history.append(dict(zip(("loss", "nll", "kl"), torch.tensor(parts).mean(0).tolist())))
        return history, model

    for data in (batches, DataLoader(TensorDataset(x), batch_size=16, shuffle=False)):
        model = VAE(6, latent_dim=2, hidden=(8,))
        model.load_state_dict(start)
        history = fit(model, data, epochs=3, seed=5, progress=False)
        want, trained = by_hand(data)
        assert len(history) == 3
        for got_epoch, want_epoch in zip(history, want):
            for key in want_epoch:
                assert math.isclose(got_epoch[key], want_epoch[key], rel_tol=1e-5, abs_tol=1e-6), (data, key)
        for a, b in zip(model.parameters(), trained.parameters()):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="not an iterator or generator"):
        fit(VAE(6, latent_dim=2, hidden=(8,)), (b for b in batches), epochs=2, progress=False)
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        fit(VAE(6, latent_dim=2, hidden=(8,)), [["a", "b"]], epochs=1, progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        fit(VAE(6, latent_dim=2, hidden=(8,)), 5, progress=False)


def test_a_fitted_rbf_variance_network_loads_into_a_fresh_model():
    """A VAE saved after fit_rbf_variance loads into a fresh VAE (torch.load weights_only):
    its decoder makes the RBF network from the saved centres and bandwidths, and zeta, which
    was a plain attribute outside the state dict, travels in it. Before, the fresh model raised
    'Unexpected key(s) ... decoder.rbf.raw_weight', and zeta was lost. A state dict saved
    without zeta loads with the fit's default (or the layer's own); centres of another latent
    dimension still raise."""
    import io

    torch.manual_seed(0)
    x = torch.randn(60, 6)
    model = VAE(6, latent_dim=2, hidden=(8,))
    z = model.encode(x)[0].detach()
    fit_rbf_variance(model.decoder, z, x, n_centres=7, zeta=0.05, steps=20)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = VAE(6, latent_dim=2, hidden=(8,))
    fresh.load_state_dict(saved)
    assert fresh.decoder.rbf is not None and fresh.decoder.rbf.zeta == 0.05
    for a, b in zip(fresh.decoder(z), model.decoder(z)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(geo.metric(fresh.decoder, z[:5]), geo.metric(model.decoder, z[:5]))
    old = {k: v for k, v in saved.items() if not k.endswith("_extra_state")}
    older = VAE(6, latent_dim=2, hidden=(8,))
    older.load_state_dict(old)
    assert older.decoder.rbf.zeta == 1e-2
    model.load_state_dict(old)
    assert model.decoder.rbf.zeta == 0.05
    other = VAE(6, latent_dim=3, hidden=(8,)).decoder
    mixed = {**other.state_dict(), **{k[len("decoder."):]: v for k, v in saved.items() if k.startswith("decoder.rbf.")}}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*rbf\.centres"):
        other.load_state_dict(mixed)
    assert other.rbf is None


def test_vae_takes_an_encoder_of_the_users():
    """VAE(encoder=...) runs the user's encoder on x as given (a convolutional one on images
    here; VAE had no such argument): encode is that encoder's output, the loss is the ELBO
    written out with it, fit trains it, and the state dict round-trips. An encoder whose
    output is not (mean, log-variance) of [N, d] raises a ValueError saying so."""

    class ConvEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(3 * 16, 4)

        def forward(self, x):
            mean, logvar = self.head(torch.tanh(self.conv(x)).flatten(1)).chunk(2, dim=1)
            return mean, logvar

    torch.manual_seed(0)
    x = torch.rand(12, 1, 4, 4)
    model = VAE(16, latent_dim=2, hidden=(8,), encoder=ConvEncoder())
    mean, logvar = model.encode(x)
    want_mean, want_logvar = model.encoder(x)
    assert torch.equal(mean, want_mean) and torch.equal(logvar, want_logvar)
    torch.manual_seed(1)
    loss, nll, kl = model.loss_terms(x)
    torch.manual_seed(1)
    z = want_mean + torch.randn_like(want_mean) * (0.5 * want_logvar).exp()
    mu, sigma = model.decoder(z)
    want_nll = (0.5 * ((x.flatten(1) - mu) / sigma) ** 2 + sigma.log() + 0.5 * math.log(2 * math.pi)).sum(1).mean()
    want_kl = (0.5 * (want_mean ** 2 + want_logvar.exp() - 1.0 - want_logvar).sum(1)).mean()
    torch.testing.assert_close(nll, want_nll)
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(loss, want_nll + want_kl)
    before = model.encoder.conv.weight.detach().clone()
    history = fit(model, x, epochs=3, batch_size=4, progress=False)
    assert len(history) == 3 and not torch.equal(before, model.encoder.conv.weight)
    fresh = VAE(16, latent_dim=2, hidden=(8,), encoder=ConvEncoder())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.embed(x), model.embed(x))
    for bad in (lambda q: q.flatten(1)[:, :2], lambda q: (q.flatten(1)[:, :2], q.flatten(1)[:, :3])):
        class Bad(nn.Module):
            def forward(self, q, f=bad):
                return f(q)
        with pytest.raises(ValueError, match=r"the encoder must return \(mean, log-variance\)"):
            VAE(16, latent_dim=2, hidden=(8,), encoder=Bad()).encode(x)
    with pytest.raises(TypeError, match="encoder must be an nn.Module"):
        VAE(16, latent_dim=2, encoder=lambda q: q)


def test_beta_vae_has_smaller_kl():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    kls = []
    for beta in (1.0, 8.0):
        model = VAE(6, latent_dim=3, hidden=(32,), beta=beta)
        hist = fit(model, x, epochs=20, batch_size=64, progress=False)
        kls.append(hist[-1]["kl"])
    assert kls[1] < kls[0]
    with pytest.raises(ValueError, match="likelihood"):
        VAE(4, likelihood="poisson")


def test_metric_form_energy_agrees_with_feature_form(backend):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(4, 2, dtype=F64, generator=gen)
    lin = linear_decoder(a)
    curves = torch.randn(3, 6, 2, dtype=F64, generator=gen)
    # constant metric: both forms are exact
    torch.testing.assert_close(geo.curve_energy(lin, curves, mode="metric"), geo.curve_energy(lin, curves))
    torch.testing.assert_close(geo.curve_length(lin, curves, mode="metric"), geo.curve_length(lin, curves))
    # curved decoder: they agree as the discretisation refines
    dec = small_mlp_decoder()
    fine = geo.straight_line(torch.randn(2, 2, dtype=F64, generator=gen),
                             torch.randn(2, 2, dtype=F64, generator=gen), 200)
    rel = geo.curve_length(dec, fine, mode="metric") / geo.curve_length(dec, fine) - 1
    assert rel.abs().max() < 1e-3
    leaf = fine.clone().requires_grad_()
    geo.curve_energy(dec, leaf, mode="metric").sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mode"):
        geo.curve_energy(dec, fine, mode="spline")


@pytest.mark.parametrize("fused", [True, False], ids=["mlp", "generic"])
def test_functions_take_one_item_without_its_batch_dimension(fused, backend):
    """As torch.nn layers do, a point [d] or a curve [T+1, d] goes where a batch [B, d] or
    [B, T+1, d] goes, and the result has no batch dimension: the batch-of-one result's only
    item (before, only geodesic took one pair; the curve it returned for it raised in
    curve_length, curve_energy, energy_and_grad, interpolate and extrapolate, and metric,
    exp_map, random_walk and the initialisations raised or failed inside torch)."""
    dec = small_mlp_decoder(rbf=fused) if fused else sphere
    z0, z1 = torch.tensor([-0.3, 0.2], dtype=F64), torch.tensor([0.4, 0.5], dtype=F64)
    res = geo.geodesic(z0, z1, dec, n_segments=8)
    curve = res.curves
    assert curve.shape == (9, 2) and res.lengths.shape == ()
    torch.testing.assert_close(geo.curve_length(dec, curve), res.lengths)
    torch.testing.assert_close(geo.curve_energy(dec, curve), res.energies)

    def same(one, batched):
        one = one if isinstance(one, tuple) else (one,)
        batched = batched if isinstance(batched, tuple) else (batched,)
        for a, b in zip(one, batched, strict=True):
            assert a.shape == b.shape[1:], (a.shape, b.shape)
            torch.testing.assert_close(a, b[0], rtol=0, atol=0)

    v = torch.tensor([0.3, -0.2], dtype=F64)
    data = torch.randn(40, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    cases = {
        "metric": lambda f: f(lambda z: geo.metric(dec, z), z0),
        "volume_measure": lambda f: f(lambda z: geo.volume_measure(dec, z), z0),
        "curve_length metric": lambda f: f(lambda c: geo.curve_length(dec, c, mode="metric"), curve),
        "curve_energy metric": lambda f: f(lambda c: geo.curve_energy(dec, c, mode="metric"), curve),
        "energy_and_grad": lambda f: f(lambda c: geo.energy_and_grad(dec, c), curve),
        "interpolate": lambda f: f(lambda c: geo.interpolate(dec, c, 5), curve),
        "extrapolate": lambda f: f(lambda c: geo.extrapolate(dec, c, t=0.2, n_steps=4), curve),
        "geodesic_acceleration": lambda f: f(lambda z, w: geo.geodesic_acceleration(dec, z, w), z0, v),
        "exp_map": lambda f: f(lambda z, w: geo.exp_map(dec, z, w, t=0.5, n_steps=4), z0, v),
        "random_walk": lambda f: f(lambda z: geo.random_walk(dec, z, 3, 1e-3, torch.Generator().manual_seed(1)), z0),
        "straight_line": lambda f: f(lambda a, b: geo.straight_line(a, b, 4), z0, z1),
        "graph_init": lambda f: f(lambda a, b: geo.graph_init(a, b, dec, data, 6, n_neighbors=5), z0, z1),
    }
    for name, case in cases.items():
        one = case(lambda fn, *args: fn(*args))
        batched = case(lambda fn, *args: fn(*(a[None] for a in args)))
        same(one, batched)
    with pytest.raises(ValueError, match="z0 and z1 must have the same shape"):
        geo.straight_line(z0, z1[None], 4)
    with pytest.raises(ValueError, match="z0 and z1 must have the same shape"):
        geo.straight_line(z0[None], torch.zeros(2, 2, dtype=F64), 4)
    with pytest.raises(ValueError, match="n_segments must be an int >= 1"):
        geo.straight_line(z0, z1, 0)
    with pytest.raises(ValueError, match="z and v must have the same shape"):
        geo.geodesic_acceleration(dec, z0[None], torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"z0, z1 and data must be \[B, d\], \[B, d\] and \[n, d\]"):
        geo.graph_init(z0, z1, dec, torch.zeros(5, 3, dtype=F64), 6)


def test_kmedoids_picks_k_different_points_when_points_repeat():
    """Farthest-point seeding took argmax of the gaps to the chosen medoids; with repeated
    points (or fewer distinct points than k) every gap is 0 and argmax gave an index already
    chosen: medoid indices repeated, and a cluster could never have members."""
    pts = torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0], [5.0]], dtype=F64)
    dist = torch.cdist(pts, pts)
    for k in (2, 3, 4, 5, 6):
        for seed in range(6):
            labels, medoids = geo.kmedoids(dist, k, seed=seed)
            assert len(set(medoids.tolist())) == k, (k, seed, medoids.tolist())
            # every point is as close to its medoid as to any other medoid
            torch.testing.assert_close(dist[torch.arange(6), medoids[labels]], dist[:, medoids].min(1).values)
    labels, medoids = geo.kmedoids(dist, 3, seed=0)  # three distinct values: one medoid on each
    assert sorted(pts[medoids, 0].tolist()) == [0.0, 1.0, 5.0]
