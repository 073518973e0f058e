"""The Triton kernels on a CUDA device: the op tests of tests/ops and tests/geometry, run
with backend "triton" on CUDA tensors, and a geodesic solved on the GPU against the CPU.

Run on a GPU machine with `pytest -m gpu`; skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

import latentfast
from latentfast import backend as lf_backend
from tests.geometry import test_geometry_ops as geo_t
from tests.ops import test_flows_ops as flow_t

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or lf_backend.triton_interpret(),
                       reason="needs a CUDA device (and TRITON_INTERPRET unset)"),
]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def triton_cuda():
    assert lf_backend.select(torch.device("cuda")) == "triton"
    with latentfast.use_backend("triton"):
        yield "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", flow_t.EVEN_SHAPES)
def test_glow_ops_on_cuda(triton_cuda, shape, dtype):
    flow_t.test_actnorm_invconv_matches_reference(triton_cuda, shape, dtype, 0)
    for additive in (False, True):
        flow_t.test_actnorm_invconv_coupling_matches_reference(triton_cuda, shape, dtype, additive)
        flow_t.test_affine_coupling_and_inverse(triton_cuda, shape, dtype, additive)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [3, 12, 48])
def test_lu_weight_on_cuda(triton_cuda, c, dtype):
    flow_t.test_lu_weight_matches_reference(triton_cuda, c, dtype)


def test_glow_gradients_on_cuda(triton_cuda):
    flow_t.test_actnorm_invconv_non_contiguous(triton_cuda)
    for additive in (False, True):
        flow_t.test_gradients_match_reference(triton_cuda, additive)
    flow_t.test_gradcheck_float64(triton_cuda)
    flow_t.test_opcheck(triton_cuda)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("net", geo_t.NETS)
def test_geometry_ops_on_cuda(triton_cuda, net, dtype):
    for n in (1, 13, 1000):
        geo_t.test_pullback_metric_matches_reference(triton_cuda, net, dtype, n)
    for shape in ((1, 2), (3, 9), (40, 33)):
        geo_t.test_curve_energy_and_grad_match_reference(triton_cuda, net, dtype, shape)


def test_geometry_gradients_on_cuda(triton_cuda):
    geo_t.test_gradcheck(triton_cuda)
    geo_t.test_opcheck(triton_cuda)
    geo_t.test_curve_energy_repeated_point_has_finite_grad(triton_cuda)


def test_geodesic_on_cuda_matches_cpu(triton_cuda):
    from latentfast import geometry as geo
    from latentfast.vae import GaussianMLPDecoder

    torch.manual_seed(0)
    dec = GaussianMLPDecoder(2, 30, hidden=(32, 32)).double()
    z0, z1 = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    gpu = geo.geodesic(z0.cuda(), z1.cuda(), dec.cuda(), n_segments=16)
    with latentfast.use_backend("cpp" if lf_backend.why_unavailable("cpp", torch.device("cpu")) is None
                                else "reference"):
        cpu = geo.geodesic(z0, z1, dec.cpu(), n_segments=16)
    assert gpu.converged.all() and cpu.converged.all()
    torch.testing.assert_close(gpu.lengths.cpu(), cpu.lengths, rtol=1e-5, atol=1e-8)
