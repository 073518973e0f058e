"""The Triton kernels on a CUDA device: the op tests of tests/ops, tests/geometry, tests/rnn
and tests/flows (vector flows), run with backend "triton" on CUDA tensors (with double
backward, forward-mode AD, torch.func transforms and autocast), and a geodesic solved on the
GPU against the CPU.

Run on a GPU machine with `pytest -m gpu`; skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

import latentfast
from latentfast import backend as lf_backend
from latentfast.bench.runner import capture_cuda_graph
from latentfast.ops import geometry as geo_ops
from tests import test_export as export_t
from tests.flows import test_glow as glow_t
from tests.flows import test_vector_flows as vec_t
from tests.geometry import test_geometry_ops as geo_t
from tests.ops import test_autocast as amp_t
from tests.ops import test_checks as checks_t
from tests.ops import test_direct_op_arguments as direct_t
from tests.ops import test_double_backward as dbl_t
from tests.ops import test_empty_batches as empty_t
from tests.ops import test_flows_ops as flow_t
from tests.ops import test_layouts as layout_t
from tests.ops import test_transforms as tf_t
from tests.ops import test_triton_launch_limit as launch_t
from tests.ops import test_triton_math as math_t
from tests.rnn import test_lyapunov_ops as lyap_t
from tests.rnn import test_models as rnn_models_t
from tests.rnn import test_rnn_ops as rnn_t

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or lf_backend.triton_interpret(),
                       reason="needs a CUDA device (and TRITON_INTERPRET unset)"),
]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def triton_cuda():
    assert lf_backend.select(torch.device("cuda")) == "triton"
    # the references (cuDNN RNNs, cuBLAS) in full fp32, not TF32, to meet the fp32 tolerances
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with latentfast.use_backend("triton"):
            yield "triton"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", math_t.FUNCTIONS)
def test_triton_math_on_cuda(triton_cuda, name, dtype):
    """tanh, expm1, log1p, the sigmoids within 8 ulps with the GPU's exp and log."""
    math_t.test_triton_math_is_accurate_over_the_whole_range(name, dtype)


@pytest.mark.parametrize("name", launch_t.CASES + launch_t.UNBATCHED)
def test_triton_launch_limit_on_cuda(triton_cuda, monkeypatch, name):
    """A tensor past the kernels' 32-bit offsets raises before any launch."""
    launch_t.test_a_tensor_past_the_limit_raises(monkeypatch, name)


def test_actnorm_flag_read_back_once_on_cuda(triton_cuda, monkeypatch):
    """GlowStep's ActNorm flag: one device-to-host read per layer until it is set, none after."""
    glow_t.test_actnorm_reads_its_initialized_flag_back_only_until_it_is_set(monkeypatch, device="cuda")


def test_triton_inverse_reads_nothing_back_once_planned_on_cuda(triton_cuda, monkeypatch):
    vec_t.test_triton_inverse_reads_nothing_back_once_planned(monkeypatch, device="cuda")


def test_lu_weight_checks_its_constants_on_cuda(triton_cuda):
    """The permutation and sign check reads back from the GPU once per tensor version."""
    flow_t.test_lu_weight_checks_its_constants_once_per_version(triton_cuda)


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


@pytest.mark.parametrize("rbf", [False, True])
def test_geometry_qr_and_chunks_on_cuda(triton_cuda, monkeypatch, rbf):
    """The native pipelines' Python-side paths on CUDA: R of the last layer's QR (curve energy
    and metric, R's row blocks), the one-GEMM RBF part, and point/curve chunks."""
    geo_t.test_curve_energy_linear_last_layer_by_its_qr(triton_cuda, monkeypatch, rbf)
    for dtype in DTYPES:
        geo_t.test_metric_linear_last_layer_by_its_qr(triton_cuda, monkeypatch, rbf, dtype)
    for net in geo_t.NETS[:3]:
        for budget in ("one", "few"):
            geo_t.test_native_pipelines_in_chunks(triton_cuda, monkeypatch, net, budget)


def test_geometry_gradients_on_cuda(triton_cuda):
    geo_t.test_gradcheck(triton_cuda)
    geo_t.test_opcheck(triton_cuda)
    geo_t.test_curve_energy_repeated_point_has_finite_grad(triton_cuda)


@pytest.mark.parametrize("precondition", [True, False])
def test_geodesic_on_cuda_matches_cpu(triton_cuda, precondition):
    from latentfast import geometry as geo
    from latentfast.vae import GaussianMLPDecoder

    torch.manual_seed(0)
    dec = GaussianMLPDecoder(2, 30, hidden=(32, 32)).double()
    z0, z1 = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    gpu = geo.geodesic(z0.cuda(), z1.cuda(), dec.cuda(), n_segments=16, precondition=precondition)
    with latentfast.use_backend("cpp" if lf_backend.why_unavailable("cpp", torch.device("cpu")) is None
                                else "reference"):
        cpu = geo.geodesic(z0, z1, dec.cpu(), n_segments=16, precondition=precondition)
    assert gpu.converged.all() and cpu.converged.all()
    torch.testing.assert_close(gpu.lengths.cpu(), cpu.lengths, rtol=1e-5, atol=1e-8)


def test_knn_on_cuda_matches_cpu(triton_cuda):
    """geometry.knn's chord pruning with the decoder and points on CUDA: the CPU's neighbours."""
    from latentfast import geometry as geo
    from latentfast.vae import GaussianMLPDecoder

    torch.manual_seed(0)
    dec = GaussianMLPDecoder(2, 30, hidden=(32, 32)).double()
    gen = torch.Generator().manual_seed(1)
    xt = torch.randn(40, 2, dtype=torch.float64, generator=gen)
    xq = torch.randn(6, 2, dtype=torch.float64, generator=gen)
    d, i = geo.knn(dec.cuda(), xq.cuda(), xt.cuda(), k=4, n_segments=16)
    with latentfast.use_backend("cpp" if lf_backend.why_unavailable("cpp", torch.device("cpu")) is None
                                else "reference"):
        d_cpu, i_cpu = geo.knn(dec.cpu(), xq, xt, k=4, n_segments=16)
    assert d.is_cuda and torch.equal(i.cpu(), i_cpu)
    torch.testing.assert_close(d.cpu(), d_cpu, rtol=1e-5, atol=1e-8)


def test_geodesic_solver_paths_on_cuda(triton_cuda):
    """The solver's bound energy function (curve_energy_and_grad_fn) with the Triton kernels,
    bit-equal to the op, and a solve under autocast equal to one without it on CUDA."""
    for net in geo_t.NETS:
        geo_t.test_curve_energy_and_grad_fn_is_curve_energy_and_grad(triton_cuda, net)
    amp_t.test_geodesic_under_autocast_is_the_solve_without_it(triton_cuda)


def test_glow_backward_inside_autocast_on_cuda(triton_cuda):
    amp_t.test_glow_backward_inside_autocast(triton_cuda)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", rnn_t.SHAPES)
def test_rnn_ops_on_cuda(triton_cuda, shape, dtype):
    rnn_t.test_gru_sequence_matches_nn_gru(triton_cuda, shape, dtype)
    rnn_t.test_lstm_sequence_matches_nn_lstm(triton_cuda, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("persistent", [True, False])
def test_rnn_persistent_and_stepwise_on_cuda(triton_cuda, persistent, dtype):
    rnn_t.check_triton_paths(torch.device("cuda"), persistent, dtype)


def test_rnn_gradients_and_lyapunov_on_cuda(triton_cuda):
    rnn_t.test_gradcheck_and_opcheck(triton_cuda)
    rnn_t.test_lstm_gradcheck_and_opcheck(triton_cuda)
    for cell in ("rnn_tanh", "gru", "lstm"):
        for dtype in DTYPES:
            lyap_t.test_rnn_lyapunov_backends_match_reference(triton_cuda, cell, dtype)
    for system, n, k in (("lorenz63", 3, 3), ("lorenz96", 11, 5)):
        for dtype in DTYPES:
            lyap_t.test_lorenz_lyapunov_backends_match_reference(triton_cuda, system, n, k, dtype)
    lyap_t.test_opcheck(triton_cuda)


@pytest.mark.parametrize("dtype,shape", [(dt, sh) for dt in DTYPES for sh in ((1, 1, 1, 1), (3, 7, 5, 17), (2, 33, 12, 40))]
                         + [(torch.float64, (8, 4096, 32, 256))])
def test_vector_flow_stack_on_cuda(triton_cuda, shape, dtype):
    # The bench shape in float64 only: in float32 the gradients there differ from the float32
    # reference's on isolated rows in 11 of 80 random draws on the C++ backend too (2026-12-01;
    # 8 steps x 4096 rows x 256 hidden units, consistent with rounding flipping ReLU units near
    # zero), so a float32 comparison there tests the draw, not the kernel.
    for additive in (False, True):
        vec_t.test_stack_matches_reference(triton_cuda, shape, additive, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_flow_inverse_by_dependency_order_on_cuda(triton_cuda, monkeypatch, dtype):
    for additive in (False, True):
        for b in (3, 37):
            vec_t.test_triton_inverse_by_dependency_order(monkeypatch, dtype, additive, b)
            monkeypatch.delenv("LATENTFAST_VF_SEQ_INV")  # (that test ends with the sweeps forced)
        for kind in ("made", "made_random_order", "coupling"):
            for d in (5, 17):
                vec_t.test_triton_inverse_grad_matches_dense_solve(kind, additive, dtype, d)


def test_vector_flow_modules_on_cuda(triton_cuda):
    vec_t.test_stack_noncontiguous_and_no_ctx(triton_cuda)
    vec_t.test_stack_gradcheck_and_opcheck(triton_cuda)
    for d in (1, 5):
        vec_t.test_modules_invert_and_logdet_matches_jacobian(triton_cuda, d)
    vec_t.test_modules_invert_fp32(triton_cuda)
    vec_t.test_made_flow_step_one_step(triton_cuda)
    vec_t.test_made_flow_step_at_the_widest_size(triton_cuda)


@pytest.mark.parametrize("name", list(dbl_t.CASES))
def test_double_backward_transforms_and_autocast_on_cuda(triton_cuda, name):
    dbl_t.test_double_backward_matches_reference(triton_cuda, name)
    if name in tf_t.CASES:
        tf_t.test_forward_ad_matches_reference(triton_cuda, name)
        tf_t.test_func_jvp_and_grad_match_reference(triton_cuda, name)
        tf_t.test_vmap_matches_reference(triton_cuda, name)
        tf_t.test_batched_gradients_match_reference(triton_cuda, name)
    if name in amp_t.CASES:
        amp_t.test_autocast_upcasts_to_float32(triton_cuda, name)
        amp_t.test_backward_inside_autocast_is_the_float32_backward(triton_cuda, name)


def test_vectorized_jacobian_of_layers_on_cuda(triton_cuda):
    tf_t.test_vectorized_jacobian_of_a_glow_step_and_a_flow(triton_cuda)


def test_registered_ops_called_directly_under_transforms_on_cuda(triton_cuda):
    """The transform route of the custom ops (ops/_autograd.py) on this machine's PyTorch: every
    op routed, then each op's direct call on CUDA under forward AD, jvp, grad and vmap."""
    tf_t.test_every_op_has_a_direct_case_or_refuses()
    for name in tf_t.DIRECT:
        tf_t.test_registered_ops_called_directly_under_forward_ad(triton_cuda, name)
        tf_t.test_registered_ops_called_directly_under_func_jvp_and_grad(triton_cuda, name)
        tf_t.test_registered_ops_called_directly_under_vmap(triton_cuda, name)


@pytest.mark.parametrize("cls", [rnn_models_t.GRU, rnn_models_t.LSTM])
def test_rnn_modules_packed_and_unbatched_on_cuda(triton_cuda, cls):
    for batch_first in (False, True):
        for enforce_sorted in (False, True):
            for with_states in (False, True):
                rnn_models_t.test_packed_sequences_match_nn(triton_cuda, cls, batch_first, enforce_sorted, with_states)
    rnn_models_t.test_unbatched_input_and_nn_constructor(triton_cuda, cls)
    for num_layers, bidirectional, bias in ((2, False, True), (2, True, False)):
        rnn_models_t.test_stacked_and_bidirectional_match_nn(triton_cuda, cls, num_layers, bidirectional, bias)


def test_public_ops_under_cuda_graph_capture(triton_cuda):
    """The public ops captured in a CUDA graph: their value checks (finite inputs, the vector
    flows' act in {0, 1}), which read a value back to the host, step aside while a graph is
    captured (ops/_checks.py can_read_back); a replay on new values in the static inputs then
    matches an eager call."""
    from latentfast.ops import flows as flow_ops
    from latentfast.ops import rnn as rnn_ops
    from latentfast.ops import vector_flows as vf_ops

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dev)

    x, h = rnd(2, 6, 5, 3), rnd(2, 6, 5, 3)
    w, b = torch.eye(6, device=dev) + rnd(6, 6, scale=0.1), rnd(6, scale=0.1)
    k, d, hid, bsz = 2, 5, 8, 7
    xv = rnd(bsz, d)
    vf = (rnd(k, hid, d, scale=0.3), rnd(k, hid, scale=0.1), rnd(k, 2 * d, hid, scale=0.3), rnd(k, 2 * d, scale=0.1))
    xs, h0 = rnd(4, 3, 2), rnd(3, 6, scale=0.5)
    gru_w = (rnd(18, 2, scale=0.4), rnd(18, 6, scale=0.4), rnd(18, scale=0.1), rnd(18, scale=0.1))
    lstm_w = (rnd(24, 2, scale=0.4), rnd(24, 6, scale=0.4), rnd(24, scale=0.1), rnd(24, scale=0.1))

    def run():
        return (*flow_ops.actnorm_invconv_coupling(x, w, b, h), *vf_ops.vector_flow_stack(xv, *vf),
                *rnn_ops.gru_sequence(xs, h0, *gru_w), rnn_ops.lstm_sequence(xs, None, *lstm_w)[0])

    with torch.no_grad():
        graph, captured = capture_cuda_graph(run)  # one warm-up call (kernel compilation) off the capture
        for t in (x, h, xv, xs, h0):
            t.copy_(torch.randn(t.shape, generator=gen).to(dev))
        graph.replay()
        torch.cuda.synchronize()
        want = run()
    assert len(captured) == len(want) == 7
    for got, ref_out in zip(captured, want):
        torch.testing.assert_close(got, ref_out)


@pytest.mark.parametrize("rbf", [False, True])
def test_geometry_ops_under_cuda_graph_capture(triton_cuda, rbf):
    """pullback_metric and curve_energy_and_grad captured in a CUDA graph, with a linear last
    layer wider than its input (the path through R of W_L = Q R): under capture R is formed in
    the graph, not taken from the QR cache (whose hit test reads values back), so a replay
    after new values in the points, the curves and W_L itself matches an eager call."""
    dev = torch.device("cuda")
    w, b, a, extra = geo_t.make_net(2, (11, 9), 40, (1, 3, 0), rbf, torch.float32, dev, seed=93)
    gen = torch.Generator().manual_seed(94)
    z = torch.randn(37, 2, generator=gen).to(dev)
    curves = torch.randn(5, 9, 2, generator=gen).to(dev)

    def run():
        return (geo_ops.pullback_metric(z, w, b, a, *extra), *geo_ops.curve_energy_and_grad(curves, w, b, a, *extra))

    with torch.no_grad():
        graph, captured = capture_cuda_graph(run)
        for t in (z, curves, w[-1]):
            t.copy_(torch.randn(t.shape, generator=gen).to(dev) / (t.shape[-1] ** 0.5 if t is w[-1] else 1.0))
        graph.replay()
        torch.cuda.synchronize()
        want = run()
    assert len(captured) == len(want) == 4
    for got, ref_out in zip(captured, want):
        torch.testing.assert_close(got, ref_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", empty_t.CASES)
def test_ops_on_an_empty_batch_on_cuda(triton_cuda, name):
    """Zero-size grids and the wrappers' sizes from an empty batch on the GPU."""
    empty_t.test_op_on_an_empty_batch(triton_cuda, name)


@pytest.mark.parametrize("name", direct_t.CASE_NAMES)
def test_direct_op_calls_with_a_misfit_argument_raise_on_cuda(triton_cuda, name):
    """Each tensor argument of a direct torch.ops.latentfast call, one size off or of another
    dtype, raises before a kernel launch (no illegal address on the GPU); a strided view of it
    gives the same outputs."""
    direct_t._check_case(triton_cuda, name)
    direct_t.test_a_strided_copy_of_an_argument_gives_the_same_outputs(triton_cuda, name)


@pytest.mark.parametrize("name", layout_t.CASES)
def test_ops_on_other_layouts_and_under_inference_mode_on_cuda(triton_cuda, name):
    """Strided, channels_last and broadcast inputs, no_grad and inference tensors on the GPU."""
    layout_t.test_op_on_inputs_in_other_layouts(triton_cuda, name)
    layout_t.test_op_given_gradients_in_other_layouts(triton_cuda, name)
    layout_t.test_op_under_no_grad_and_inference_mode(triton_cuda, name)


@pytest.mark.parametrize("name", layout_t.UNBATCHED)
def test_unbatched_ops_on_other_layouts_on_cuda(triton_cuda, name):
    layout_t.test_unbatched_op_on_inputs_in_other_layouts_and_modes(triton_cuda, name)


@pytest.mark.parametrize("name", export_t.MODULES)
def test_modules_export_on_cuda(triton_cuda, name):
    export_t.test_module_exports_with_a_dynamic_batch(triton_cuda, name)


def test_check_finite_on_cuda():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64):
        for bad in (float("nan"), float("inf"), -float("inf")):
            checks_t.test_check_finite_catches_every_bad_value(dtype, bad, device="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_a_gpu_that_is_not_current(triton_cuda):
    """Every op's forward on cuda:1 with cuda:0 current gives cuda:0's numbers (Triton
    launches on the current device; latentfast.kernels.launch switches to the tensors',
    tests/ops/test_triton_launch_device.py)."""
    from torch.utils._pytree import tree_leaves, tree_map

    from tests.ops.op_cases import op_cases
    torch.cuda.set_device(0)
    for name, (fn, inputs, _, _) in op_cases(torch.device("cuda:0"), b=3).items():
        want = fn(*inputs)
        got = fn(*tree_map(lambda t: t.to("cuda:1") if isinstance(t, torch.Tensor) else t, inputs))
        for g, w in zip(tree_leaves(got), tree_leaves(want)):
            if isinstance(w, torch.Tensor):
                assert g.device == torch.device("cuda:1"), name
                torch.testing.assert_close(g.cpu(), w.cpu(), msg=name)


def test_actnorm_initialises_from_every_process_under_ddp_on_cuda(triton_cuda, tmp_path):
    """Two gloo processes on the one GPU: ActNorm's all-reduced initialisation and a
    GlowStep's DDP replicas (the backend each process picks for CUDA tensors: Triton)."""
    glow_t.test_actnorm_initialises_from_every_process_under_ddp(tmp_path, device="cuda")


def test_glow_under_torch_func_transforms_on_cuda(triton_cuda):
    """A stacked ensemble under vmap, per-sample gradients, and the uninitialised error."""
    glow_t.test_glow_under_torch_func_transforms(triton_cuda, device="cuda")


def test_glow_on_images_that_are_not_square_on_cuda(triton_cuda):
    """Glow(1, (4, 8)): latents, inversion and the log-det against the Jacobian's slogdet."""
    glow_t.test_glow_on_images_that_are_not_square(triton_cuda, device="cuda")


def test_flow_called_as_a_module_on_cuda(triton_cuda):
    """A stacked ensemble of conditional Flows under vmap and per-sample gradients."""
    vec_t.test_flow_called_as_a_module_is_log_prob(triton_cuda, device="cuda")


def test_actnorm_in_data_parallel_replicas_on_cuda(triton_cuda):
    """The CPU emulation of DataParallel's replicas on the GPU; with two GPUs, nn.DataParallel
    itself: an uninitialised Glow raises, an initialised one gives its own log-likelihoods."""
    glow_t.test_actnorm_in_a_data_parallel_replica_needs_an_initialised_model(device="cuda")
    if torch.cuda.device_count() < 2:
        return
    torch.manual_seed(0)

    class LogProb(torch.nn.Module):
        def __init__(self, glow):
            super().__init__()
            self.glow = glow

        def forward(self, x):
            return self.glow.log_prob(x)

    model = LogProb(glow_t._glow().cuda())
    x = torch.rand(4, 1, 8, 8, device="cuda") - 0.5
    with pytest.raises(RuntimeError, match="DataParallel replica"):
        torch.nn.DataParallel(model, device_ids=[0, 1])(x)
    want = model(x)
    got = torch.nn.DataParallel(model, device_ids=[0, 1])(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_default_device_cuda_and_models_on_cuda(triton_cuda):
    """torch.set_default_device("cuda"): the data generators, fits, solvers and layers give
    the CPU's results (tests/test_default_device.py with "cuda" as the default device); and
    fit_rbf_variance of a model on the GPU, whose k-means draws had met a CPU generator."""
    from tests import test_default_device as dd_t

    for name in dd_t._cases():
        dd_t.test_results_do_not_depend_on_the_default_device(name, default="cuda")
    dd_t.test_rbf_variance_fits_a_model_on_another_device_than_its_generator(device="cuda")


def test_triton_kernels_keep_nan_weights_nan_on_cuda(triton_cuda):
    """On a GPU tl.maximum / tl.minimum drop a NaN operand (the interpreter's numpy does not):
    the vector-flow ReLU and the geometry ELU are written with tl.where so that NaN weights
    give NaN outputs there too, as the reference does."""
    for kind in ("iaf", "maf", "coupling", "additive"):
        vec_t.test_nan_weights_give_nan_outputs_as_the_reference(triton_cuda, kind)
    for dtype in DTYPES:
        geo_t.test_nan_weights_give_nan_metric_and_energy_for_every_activation(triton_cuda, dtype)
    vec_t.test_non_finite_context_raises(triton_cuda)
    rnn_t.test_non_finite_initial_states_raise(triton_cuda)
