"""pullback_metric and curve_energy ops against the reference and against autograd."""
from __future__ import annotations

import pytest
import torch

import latentfast

from latentfast.ops import geometry as ops
from latentfast.reference import geometry as ref
from tests.conftest import CPU_ISAS, FAST_GC, assert_close, backends_under_test, device_for, use_cpu_isa

DTYPES = [torch.float32, torch.float64]
# (latent d, hidden widths, output D, activation codes per layer, with RBF variance)
NETS = [
    (2, (7,), 5, (1, 0), False),
    (3, (5, 9), 11, (2, 3, 0), True),
    (5, (12,), 3, (4, 4), True),
    (1, (), 4, (0,), False),
    (2, (3, 7), 13, (3, 1, 2), True),
]


def make_net(d, hidden, out, acts, rbf, dtype, device, seed, k=6):
    gen = torch.Generator().manual_seed(seed)
    dims = [d, *hidden, out]
    weights = [(torch.randn(b, a, generator=gen, dtype=dtype) / a ** 0.5).to(device)
               for a, b in zip(dims[:-1], dims[1:])]
    biases = [(0.3 * torch.randn(b, generator=gen, dtype=dtype)).to(device) for b in dims[1:]]
    extra = (None, None, None, 0.0)
    if rbf:
        extra = (torch.randn(k, d, generator=gen, dtype=dtype).to(device),
                 (0.5 + torch.rand(k, generator=gen, dtype=dtype)).to(device),
                 torch.rand(out, k, generator=gen, dtype=dtype).to(device), 0.25)
    return weights, biases, list(acts), extra


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 13])
def test_pullback_metric_matches_reference(backend, net, dtype, n):
    dev = device_for(backend)
    w, b, a, extra = make_net(*net, dtype, dev, seed=hash((net, n)) % 2**31)
    z = torch.randn(n, net[0], dtype=dtype, generator=torch.Generator().manual_seed(n)).to(dev)
    m = ops.pullback_metric(z, w, b, a, *extra)
    assert m.shape == (n, net[0], net[0])
    assert_close(m, ref.pullback_metric(z, w, b, a, *extra), scale=10)


@pytest.mark.parametrize("net", NETS[:3])
def test_metric_equals_autograd_jacobian_gram(backend, net):
    """M = J^T J with J the float64 autograd Jacobian of cat(mu, sigma)."""
    dev = device_for(backend)
    w, b, a, extra = make_net(*net, torch.float64, dev, seed=5)
    z = torch.randn(4, net[0], dtype=torch.float64).to(dev)
    m = ops.pullback_metric(z, w, b, a, *extra)
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda x: ref.features(x, w, b, a, *extra), z[i])
        assert_close(m[i], jac.T @ jac)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 9), (5, 4)])
def test_curve_energy_and_grad_match_reference(backend, net, dtype, shape):
    dev = device_for(backend)
    w, b, a, extra = make_net(*net, dtype, dev, seed=hash((net, shape)) % 2**31)
    gen = torch.Generator().manual_seed(3)
    curves = torch.randn(*shape, net[0], dtype=dtype, generator=gen).to(dev)
    e, ln = ops.curve_energy(curves, w, b, a, *extra)
    leaf = curves.clone().requires_grad_()
    e_ref, l_ref = ref.curve_energy(leaf, w, b, a, *extra)
    assert_close(e, e_ref, scale=10)
    assert_close(ln, l_ref, scale=10)
    ge = torch.randn(shape[0], dtype=dtype, generator=gen).to(dev)
    gl = torch.randn(shape[0], dtype=dtype, generator=gen).to(dev)
    g_ref = torch.autograd.grad((e_ref * ge + l_ref * gl).sum(), leaf, retain_graph=True)[0]
    leaf2 = curves.clone().requires_grad_()
    e2, l2 = ops.curve_energy(leaf2, w, b, a, *extra)
    g = torch.autograd.grad((e2 * ge + l2 * gl).sum(), leaf2)[0]
    assert_close(g, g_ref, scale=10)
    e3, l3, g3 = ops.curve_energy_and_grad(curves, w, b, a, *extra)
    assert_close(e3, e_ref, scale=10)
    assert_close(g3, torch.autograd.grad(e_ref.sum(), leaf)[0], scale=10)


@pytest.mark.parametrize("net", NETS)
def test_curve_energy_and_grad_fn_is_curve_energy_and_grad(backend, net):
    """The solver's bound form: checked once, then the same numbers as the op, bit for bit, for
    any batch size; each call still rejects curves of another shape, dtype, or with NaN."""
    dev = device_for(backend)
    w, b, a, extra = make_net(*net, torch.float64, dev, seed=hash(net) % 2**31)
    gen = torch.Generator().manual_seed(8)
    like = torch.randn(3, 6, net[0], dtype=torch.float64, generator=gen).to(dev)
    fn = ops.curve_energy_and_grad_fn(like, w, b, a, *extra)
    for n in (3, 1, 5):
        curves = torch.randn(n, 6, net[0], dtype=torch.float64, generator=gen).to(dev)
        got, want = fn(curves), ops.curve_energy_and_grad(curves, w, b, a, *extra)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"curves must be \[B, 6"):
        fn(torch.zeros(2, 5, net[0], dtype=torch.float64, device=dev))
    with pytest.raises(ValueError, match="float64"):
        fn(torch.zeros(2, 6, net[0], dtype=torch.float32, device=dev))
    bad = like.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="curves"):
        fn(bad)
    with pytest.raises(ValueError, match="latent points of dimension"):  # the decoder, checked once
        ops.curve_energy_and_grad_fn(torch.cat([like, like], -1), w, b, a, *extra)


@pytest.mark.parametrize("rbf", [False, True])
def test_curve_energy_linear_last_layer_by_its_qr(backend, monkeypatch, rbf):
    """With a linear last layer wider than its input (D = 40 > H = 6) the native pipelines run
    R of W_L = Q R in its place (6 mean features a point, not 40): energies, lengths and
    gradients (recomputing and activation-saving paths) as with W_L itself
    (LATENTFAST_GEOM_QR=0) and as the reference; and R follows the weight when its values
    change without a version bump (.data)."""
    dev = device_for(backend)
    w, b, a, extra = make_net(2, (9, 6), 40, (1, 3, 0), rbf, torch.float64, dev, seed=71)
    gen = torch.Generator().manual_seed(72)
    curves = torch.randn(4, 7, 2, dtype=torch.float64, generator=gen).to(dev)
    ge = torch.randn(4, dtype=torch.float64, generator=gen).to(dev)
    gl = torch.randn(4, dtype=torch.float64, generator=gen).to(dev)

    def run():
        e, ln, g = ops.curve_energy_and_grad(curves, w, b, a, *extra)
        leaf = curves.clone().requires_grad_()
        e2, l2 = ops.curve_energy(leaf, w, b, a, *extra)
        g2 = torch.autograd.grad((e2 * ge + l2 * gl).sum(), leaf)[0]
        return e, ln, g, g2

    def want():
        leaf = curves.clone().requires_grad_()
        e, ln = ref.curve_energy(leaf, w, b, a, *extra)
        g = torch.autograd.grad(e.sum(), leaf, retain_graph=True)[0]
        return e, ln, g, torch.autograd.grad((e * ge + ln * gl).sum(), leaf)[0]

    for trial in range(2):
        got = run()
        monkeypatch.setenv("LATENTFAST_GEOM_QR", "0")
        plain = run()
        monkeypatch.delenv("LATENTFAST_GEOM_QR")
        for name, x, y, z in zip(("energy", "length", "grad", "grad (autograd)"), got, plain, want()):
            assert_close(x, y, scale=10, msg=f"{name}: with R vs with W_L")
            assert_close(x, z, scale=10, msg=f"{name}: vs reference")
        w[-1].data.mul_(-0.5).add_(0.1)  # new values, same tensor, no version bump


@pytest.mark.parametrize("rbf", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_metric_linear_last_layer_by_its_qr(backend, monkeypatch, rbf, dtype):
    """pullback_metric with a linear last layer wider than its input (D = 40 > H = 9) forms
    J^T R^T R J from R of W_L = Q R in row blocks of R (_TRI_BLOCK, set to 4 here: blocks of
    4, 4 and 1 rows, each skipping R's zero lower triangle): the same metric as through
    W_L^T W_L (LATENTFAST_GEOM_QR=0) and as the reference, also after the weight's values
    change in place."""
    dev = device_for(backend)
    monkeypatch.setattr(ops, "_TRI_BLOCK", 4)
    w, b, a, extra = make_net(2, (11, 9), 40, (1, 3, 0), rbf, dtype, dev, seed=81)
    z = torch.randn(23, 2, dtype=dtype, generator=torch.Generator().manual_seed(82)).to(dev)
    for trial in range(2):
        got = ops.pullback_metric(z, w, b, a, *extra)
        monkeypatch.setenv("LATENTFAST_GEOM_QR", "0")
        plain = ops.pullback_metric(z, w, b, a, *extra)
        monkeypatch.delenv("LATENTFAST_GEOM_QR")
        assert_close(got, plain, scale=10, msg="with R vs with W_L^T W_L")
        assert_close(got, ref.pullback_metric(z, w, b, a, *extra), scale=10, msg="vs reference")
        w[-1].data.mul_(-0.5).add_(0.1)  # new values, same tensor, no version bump


@pytest.mark.parametrize("rbf", [False, True])
def test_linear_last_layer_without_read_back_forms_r_afresh(backend, monkeypatch, rbf):
    """Where no value can be read back (can_read_back False: CUDA graph capture), the QR cache,
    whose hit test reads W_L's values back, is neither consulted nor filled: R is formed on
    every call, so a captured graph replays with the weights' current values. Simulated on
    every backend by a cache holding a wrong R under W_L's key, which a call that read the
    cache would use (checked at the end)."""
    if backend == "reference":
        pytest.skip("the reference backend runs W_L itself (no QR, no cache)")
    dev = device_for(backend)
    w, b, a, extra = make_net(2, (9, 6), 40, (1, 3, 0), rbf, torch.float64, dev, seed=91)
    gen = torch.Generator().manual_seed(92)
    z = torch.randn(11, 2, dtype=torch.float64, generator=gen).to(dev)
    curves = torch.randn(3, 6, 2, dtype=torch.float64, generator=gen).to(dev)
    wl = w[-1]
    key = (wl.data_ptr(), tuple(wl.shape), tuple(wl.stride()), wl.dtype, wl.device)
    cache = {key: (wl.detach().clone(), torch.full((6, 6), 3.0, dtype=torch.float64, device=dev).triu())}
    monkeypatch.setattr(ops, "_QR_CACHE", cache)
    poisoned = dict(cache)

    def check():
        _check_metric_and_curves(z, curves, w, b, a, extra)
        leaf = curves.clone().requires_grad_()  # the activation-saving training path
        e, ln = ops.curve_energy(leaf, w, b, a, *extra)
        g = torch.autograd.grad((e + ln).sum(), leaf)[0]
        leaf_ref = curves.clone().requires_grad_()
        e_ref, l_ref = ref.curve_energy(leaf_ref, w, b, a, *extra)
        assert_close(e, e_ref, scale=10)
        assert_close(g, torch.autograd.grad((e_ref + l_ref).sum(), leaf_ref)[0], scale=10)

    with monkeypatch.context() as m:
        m.setattr(ops, "can_read_back", lambda t: False)
        for trial in range(2):
            check()
            assert cache.keys() == poisoned.keys() and cache[key] is poisoned[key]
            wl.data.mul_(-0.5).add_(0.1)  # new values: R must follow them
            cache[key] = poisoned[key] = (wl.detach().clone(), poisoned[key][1])
    # with read-back the cache is consulted, and its wrong R shows (so the check above could fail)
    got = ops.pullback_metric(z, w, b, a, *extra)
    assert not torch.allclose(got, ref.pullback_metric(z, w, b, a, *extra), rtol=1e-3, atol=1e-6)


def test_last_layer_fixed_skips_the_value_check_inside_only(backend, monkeypatch):
    """Inside last_layer_fixed (what the geodesic solver runs in) the metric and energies take
    the pinned R without comparing W_L with its cached copy; outside, and under a capture
    (can_read_back False) inside, W_L's current values count again."""
    if backend == "reference":
        pytest.skip("the reference backend runs W_L itself (no QR, no cache)")
    dev = device_for(backend)
    w, b, a, extra = make_net(2, (9, 6), 40, (1, 3, 0), False, torch.float64, dev, seed=95)
    z = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(96)).to(dev)
    curves = z.reshape(1, 7, 2)
    want = ref.pullback_metric(z, w, b, a, *extra)
    real_equal = torch.equal
    calls = []

    def counting_equal(x, y):
        calls.append(1)
        return real_equal(x, y)

    monkeypatch.setattr(torch, "equal", counting_equal)
    with ops.last_layer_fixed(w, a):
        n_entry = len(calls)
        assert n_entry <= 1  # the one check on entry (none when R was not cached yet)
        assert_close(ops.pullback_metric(z, w, b, a, *extra), want, scale=10)
        ops.curve_energy_and_grad(curves, w, b, a, *extra)
        assert len(calls) == n_entry  # no value check per call
        new = w[-1].clone().mul_(-0.5).add_(0.1)
        w_new = [*w[:-1], new]
        with monkeypatch.context() as m:  # a capture inside: R formed from the weight as it is now
            m.setattr(ops, "can_read_back", lambda t: False)
            old_values = w[-1].clone()
            w[-1].copy_(new)
            assert_close(ops.pullback_metric(z, w, b, a, *extra), ref.pullback_metric(z, w_new, b, a, *extra),
                         scale=10)
            w[-1].copy_(old_values)
    ops.pullback_metric(z, w, b, a, *extra)
    assert len(calls) > n_entry  # checked again after the block
    w[-1].copy_(new)  # a change after the block is seen
    assert_close(ops.pullback_metric(z, w, b, a, *extra), ref.pullback_metric(z, w_new, b, a, *extra), scale=10)


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="the C++ small-input pipeline")
@pytest.mark.parametrize("net", [*NETS, (2, (9, 6), 40, (1, 3, 0), True), (2, (9, 6), 40, (1, 3, 0), False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_small_curve_pipeline_is_the_chunk_loop(monkeypatch, net, dtype):
    """Few points (b (T+1) x widest row <= _SMALL_ELEMS) run _curve_native on CPU as one C++
    call (latentfast_cpp::curve_energy_small), the chunk loop's operations in one call:
    energies, lengths and gradients (energy only, length only, both, none) equal the loop's
    to rounding, on every net including a linear last layer run as R of its QR (the last
    two), and on an empty batch. The call is taken below the bound and not above it."""
    calls = []
    small_op = torch.ops.latentfast_cpp.curve_energy_small

    def spy(*args):
        calls.append(args[0].shape)
        return small_op(*args)

    monkeypatch.setattr(torch.ops.latentfast_cpp, "curve_energy_small", spy)
    w, b, a, extra = make_net(*net, dtype, torch.device("cpu"), seed=81)
    gen = torch.Generator().manual_seed(82)
    rbf, zeta = extra[:3], float(extra[3])
    for n_curves in (3, 0):
        curves = torch.randn(n_curves, 6, net[0], dtype=dtype, generator=gen)
        ge = torch.randn(n_curves, dtype=dtype, generator=gen)
        gl = torch.randn(n_curves, dtype=dtype, generator=gen)
        for grads in ((torch.ones_like(ge), None), (None, gl), (ge, gl), (None, None)):
            with latentfast.use_backend("cpp"):
                got = ops._curve_impl(curves, w, b, a, *rbf, zeta, *grads)
                monkeypatch.setattr(ops, "_SMALL_PATH", False)
                want = ops._curve_impl(curves, w, b, a, *rbf, zeta, *grads)
                monkeypatch.setattr(ops, "_SMALL_PATH", True)
            for name, x, y in zip(("energy", "length", "grad"), got, want):
                if y is None:
                    assert x is None, name
                    continue
                assert x.shape == y.shape, name
                assert_close(x, y, scale=0.01, msg=f"{name}, {n_curves} curves, grads {[g is not None for g in grads]}")
    assert len(calls) == 8
    monkeypatch.setattr(ops, "_SMALL_ELEMS", 3 * 6 - 1)  # below 3 x 6 points of any width
    with latentfast.use_backend("cpp"):
        ops._curve_impl(torch.randn(3, 6, net[0], dtype=dtype), w, b, a, *rbf, zeta, None, None)
    assert len(calls) == 8
    with pytest.raises(RuntimeError, match="one weight, bias and activation per layer"):
        small_op(curves, w, b[:-1], a, *rbf, zeta, None, None)


def _check_metric_and_curves(z, curves, w, b, a, extra):
    """pullback_metric at z, and curve_energy_and_grad on curves (energy, length, gradient of
    the energy), against the reference."""
    assert_close(ops.pullback_metric(z, w, b, a, *extra), ref.pullback_metric(z, w, b, a, *extra), scale=10)
    e, ln, g = ops.curve_energy_and_grad(curves, w, b, a, *extra)
    leaf = curves.clone().requires_grad_()
    e_ref, l_ref = ref.curve_energy(leaf, w, b, a, *extra)
    assert_close(e, e_ref, scale=10)
    assert_close(ln, l_ref, scale=10)
    assert_close(g, torch.autograd.grad(e_ref.sum(), leaf)[0], scale=10)


@pytest.mark.parametrize("net", [*NETS, (2, (11, 9), 40, (1, 3, 0), True), (2, (11, 9), 40, (1, 3, 0), False)])
@pytest.mark.parametrize("budget", ["one", "few", "cpu rows"])
def test_native_pipelines_in_chunks(backend, monkeypatch, net, budget):
    """The native metric and curve-energy pipelines split the points (curves) into chunks of
    _CHUNK_ELEMS elements of their widest rows (on CPU the curves also into chunks of at most
    _CPU_CHUNK_ROWS points); with a tiny budget every chunk holds one point (curve), or a few
    and a last, shorter one: the results are the reference's."""
    dev = device_for(backend)
    monkeypatch.setattr(ops, "_SMALL_PATH", False)  # the chunk loop even for these few points
    if budget == "cpu rows":  # 2 curves of 4 points a chunk on CPU, 2 + 2 + 1
        monkeypatch.setattr(ops, "_CPU_CHUNK_ROWS", 9)
    else:
        elems = 1 if budget == "one" else 2 * (1 + net[0]) * max(*net[1], net[2], 1) + 1
        monkeypatch.setattr(ops, "_CHUNK_ELEMS", elems)
    w, b, a, extra = make_net(*net, torch.float64, dev, seed=91)
    gen = torch.Generator().manual_seed(92)
    z = torch.randn(11, net[0], dtype=torch.float64, generator=gen).to(dev)
    curves = torch.randn(5, 4, net[0], dtype=torch.float64, generator=gen).to(dev)
    _check_metric_and_curves(z, curves, w, b, a, extra)


def test_reuse_buffers_keeps_work_buffers_and_values(backend, monkeypatch):
    """Inside reuse_buffers (what the geodesic solver runs in) the CPU curve pipelines keep
    their work buffers from call to call (same storage on the next call) and give exactly
    the values of a call outside; returned energies and gradients are not those buffers (a
    later call leaves them as they were). Calls of other shapes, dtypes and decoders, the
    activation-saving training path, and chunks of several curves with a shorter last one
    share the pool; on a GPU it stays empty."""
    if backend == "reference":
        pytest.skip("the reference backend has no work buffers")
    dev = device_for(backend)
    monkeypatch.setattr(ops, "_SMALL_PATH", False)  # the chunk loop (its buffers) even for these few points
    monkeypatch.setattr(ops, "_CHUNK_ELEMS", 3 * 5 * 13 + 1)  # 3 curves of 5 points per chunk
    nets = [make_net(2, (11, 9), 13, (1, 3, 0), True, torch.float64, dev, seed=71),
            make_net(3, (6,), 4, (2, 1), False, torch.float32, dev, seed=72),
            make_net(2, (11, 9), 40, (1, 3, 0), True, torch.float64, dev, seed=73)]  # QR last layer
    gen = torch.Generator().manual_seed(74)
    calls = []
    for (w, b, a, extra), n_curves in zip([*nets, nets[0]], [8, 5, 7, 2]):
        curves = torch.randn(n_curves, 5, w[0].shape[1], dtype=w[0].dtype, generator=gen).to(dev)
        calls.append((curves, w, b, a, extra))

    def run_all():
        out = []
        for curves, w, b, a, extra in calls:
            out.append(ops.curve_energy_and_grad(curves, w, b, a, *extra))
            leaf = curves.clone().requires_grad_()
            e, ln = ops.curve_energy(leaf, w, b, a, *extra)  # the training path
            out.append((e, ln, torch.autograd.grad((e + 0.5 * ln).sum(), leaf)[0]))
        return out

    want = run_all()  # outside: fresh buffers per call
    with ops.reuse_buffers():
        pool = ops._SCRATCH.get()
        got = run_all()
        kept = [[t.clone() for t in r] for r in got]
        ptrs = {k: v.data_ptr() for k, v in pool.items()}
        again = run_all()
        assert {k: v.data_ptr() for k, v in pool.items()} == ptrs  # the same storage, not new
        with ops.reuse_buffers():
            assert ops._SCRATCH.get() is pool  # nested: one pool
    assert ops._SCRATCH.get() is None
    if dev.type == "cpu":
        assert len(ptrs) >= 6  # layers, act', features, backward products, per dtype
    else:
        assert not ptrs
    for r_want, r_got, r_kept, r_again in zip(want, got, kept, again):
        for x, y, k, z in zip(r_want, r_got, r_kept, r_again):
            assert torch.equal(y, x) and torch.equal(z, x) and torch.equal(y, k)
    (w, b, a, extra), (curves, *_) = nets[0], calls[0]
    leaf = curves.clone().requires_grad_()
    e_ref, l_ref = ref.curve_energy(leaf, w, b, a, *extra)
    assert_close(want[0][0], e_ref, scale=10)
    assert_close(want[0][2], torch.autograd.grad(e_ref.sum(), leaf)[0], scale=10)


# Hidden widths 37 and 19 leave tails for 8- and 16-wide loops; every activation code.
_ISA_NET = (3, (37, 19), 45, (1, 2, 3), True)
_ISA_NET2 = (2, (21,), 17, (4, 0), False)


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own clones")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("net", [_ISA_NET, _ISA_NET2])
def test_cpp_isa_clones_match_reference(monkeypatch, isa, dtype, net):
    """The element-wise, Gram and curve-reduction loops are built per instruction set
    (csrc/common/isa.h): each clone this CPU runs against the reference."""
    use_cpu_isa(monkeypatch, isa)
    w, b, a, extra = make_net(*net, dtype, "cpu", seed=61)
    with latentfast.use_backend("cpp"):
        gen = torch.Generator().manual_seed(62)
        z = torch.randn(11, net[0], dtype=dtype, generator=gen)
        curves = torch.randn(3, 9, net[0], dtype=dtype, generator=gen)
        _check_metric_and_curves(z, curves, w, b, a, extra)


def _rbf_inputs(d, D, p, k, dtype, gen):
    """Points z [p, d] and an RBF network: centres [k, d], bandwidths lam [k], weights wr [D, k]."""
    z = torch.randn(p, d, dtype=dtype, generator=gen)
    centres = torch.randn(k, d, dtype=dtype, generator=gen)
    lam = 0.5 + torch.rand(k, dtype=dtype, generator=gen)
    wr = torch.rand(D, k, dtype=dtype, generator=gen)
    return z, centres, lam, wr


def _rbf_sigma_f64(centres, lam, wr, zeta):
    """sigma(z) = (wr exp(-lam ||z - c||^2) + zeta)^-1/2 of one point, in float64, for torch.func
    (independent of the ops' formulas)."""
    centres, lam, wr = (t.double() for t in (centres, lam, wr))

    def sigma(zp):
        return (wr @ torch.exp(-lam * ((zp - centres) ** 2).sum(-1)) + zeta).rsqrt()

    return sigma


def _rbf_metric_by_jacobian(z, centres, lam, wr, zeta):
    """J_sigma^T J_sigma per point, from torch.func's Jacobian of sigma in float64."""
    jac = torch.vmap(torch.func.jacrev(_rbf_sigma_f64(centres, lam, wr, zeta)))(z.double())  # [m, D, d]
    return jac.transpose(1, 2) @ jac


# The C++ RBF metric term (rbf_metric, geometry_kernels.inc): blocks of output columns with a
# padded tail (D = 1, 17, 100: every clone's block width leaves one; zeta = 0 checks that its
# lanes get weight 0), groups of 16 points with 1-3 points per wrT load and their remainders
# (m = 1, 19, 37), d = 1..7, with and without a base metric to add to.
@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own clones")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_rbf_metric_per_isa(monkeypatch, isa, dtype):
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(71)
    op = torch.ops.latentfast_cpp.rbf_metric
    for d, D, m, k in ((1, 17, 19, 5), (2, 100, 37, 7), (2, 1, 1, 3), (3, 100, 19, 6), (5, 17, 37, 4), (7, 100, 19, 9)):
        z, centres, lam, wr = _rbf_inputs(d, D, m, k, dtype, gen)
        want = _rbf_metric_by_jacobian(z, centres, lam, wr, 0.05)
        assert_close(op(z, centres, lam, wr, 0.05), want, dtype=dtype, scale=10.0)
        base = torch.randn(m, d, d, dtype=dtype, generator=gen)
        assert_close(op(z, centres, lam, wr, 0.05, base), base.double() + want, dtype=dtype, scale=10.0)
        # zeta = 0: a padding lane's beta is 0, so only its zero weight keeps inf * 0 out
        assert_close(op(z, 0.3 * centres, lam, wr, 0.0), _rbf_metric_by_jacobian(z, 0.3 * centres, lam, wr, 0.0),
                     dtype=dtype, scale=10.0)
    with pytest.raises(RuntimeError, match="latent dimension"):
        op(torch.randn(3, 8), torch.randn(4, 8), torch.rand(4), torch.rand(5, 4), 0.1)
    with pytest.raises(RuntimeError, match="wr must be"):
        op(torch.randn(3, 2), torch.randn(4, 2), torch.rand(4), torch.rand(5, 3), 0.1)


# The C++ RBF sigma (rbf_sigma_, the curve energies' variance features): written into a
# strided column block of a wider buffer (NaN around it must stay), padded block tails
# (D = 1, 17, 100), 1-6 points per wrT load and their remainders, run-time d; the AVX-512
# float clone's rsqrt estimate + Newton step against 1 / sqrt in float64.
@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own clones")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_rbf_sigma_per_isa(monkeypatch, isa, dtype):
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(75)
    for d, D, p, k in ((1, 17, 19, 5), (2, 100, 37, 7), (3, 1, 1, 3), (9, 100, 23, 11)):
        z, centres, lam, wr = _rbf_inputs(d, D, p, k, dtype, gen)
        want = torch.vmap(_rbf_sigma_f64(centres, lam, wr, 0.05))(z.double())
        buf = torch.full((p, D + 9), float("nan"), dtype=dtype)
        torch.ops.latentfast_cpp.rbf_sigma_(buf[:, 4:4 + D], z, centres, lam, wr, 0.05)
        assert_close(buf[:, 4:4 + D], want, dtype=dtype)
        assert buf[:, :4].isnan().all() and buf[:, 4 + D:].isnan().all()
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.latentfast_cpp.rbf_sigma_(torch.empty(3, 5).t(), torch.randn(5, 2), torch.randn(4, 2),
                                            torch.rand(4), torch.rand(3, 4), 0.1)


# The C++ backward through the RBF sigmas (rbf_sigma_backward_): strided sigma and gradient
# blocks, K = 5 / 70 / 64 (padded to the clone's block of centres), 1-4 points per load of
# w_r and their remainders, d = 1..9, added into gz; against torch.func's vector-Jacobian
# product of sigma(z) in float64.
@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' own clones")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_rbf_sigma_backward_per_isa(monkeypatch, isa, dtype):
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(77)
    for d, D, p, k in ((1, 17, 19, 5), (2, 100, 37, 70), (3, 1, 1, 3), (9, 100, 23, 64)):
        z, centres, lam, wr = _rbf_inputs(d, D, p, k, dtype, gen)
        gs = torch.randn(p, D + 5, dtype=dtype, generator=gen)[:, 5:]
        sigma = _rbf_sigma_f64(centres, lam, wr, 0.05)
        zd = z.double()
        sig = torch.vmap(sigma)(zd)
        want = torch.vmap(lambda zp, g: torch.func.vjp(sigma, zp)[1](g)[0])(zd, gs.double())
        feats = torch.empty(p, D + 3, dtype=dtype)
        feats[:, 3:] = sig.to(dtype)
        base = torch.randn(p, d, dtype=dtype, generator=gen)
        gz = base.clone()
        torch.ops.latentfast_cpp.rbf_sigma_backward_(gz, feats[:, 3:], gs, z, centres, lam, wr)
        assert_close(gz, base.double() + want, dtype=dtype, scale=10.0)


def test_rbf_metric_beyond_the_fused_dims(backend):
    """d = 8 (above the fused C++ kernel's 7) takes the GEMM path: same metric as the reference."""
    w, b, a, extra = make_net(8, (6,), 9, (1, 0), True, torch.float64, device_for(backend), seed=73)
    z = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(74)).to(device_for(backend))
    with latentfast.use_backend(backend):
        got = ops.pullback_metric(z, w, b, a, *extra)
    assert_close(got, ref.pullback_metric(z, w, b, a, *extra))


def test_curve_energy_repeated_point_has_finite_grad(backend):
    """A zero-length segment: the length's subgradient there is 0, never NaN."""
    dev = device_for(backend)
    w, b, a, extra = make_net(*NETS[1], torch.float64, dev, seed=1)
    curves = torch.randn(2, 4, 3, dtype=torch.float64).to(dev)
    curves[:, 2] = curves[:, 1]
    leaf = curves.clone().requires_grad_()
    e, ln = ops.curve_energy(leaf, w, b, a, *extra)
    (e + ln).sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_gradcheck(backend):
    dev = device_for(backend)
    w, b, a, extra = make_net(*NETS[1], torch.float64, dev, seed=2)
    z = torch.randn(3, 3, dtype=torch.float64).to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.pullback_metric(x, w, b, a, *extra), (z,), **FAST_GC)
    curves = torch.randn(2, 5, 3, dtype=torch.float64).to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: ops.curve_energy(c, w, b, a, *extra), (curves,), **FAST_GC)
    # gradients to the decoder parameters as well (autograd through the reference)
    w0 = w[0].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda ww: ops.curve_energy(curves.detach(), [ww, *w[1:]], b, a, *extra),
                                    (w0,), **FAST_GC)
    assert torch.autograd.gradcheck(lambda ww: ops.pullback_metric(z.detach(), [ww, *w[1:]], b, a, *extra),
                                    (w0,), **FAST_GC)


def test_opcheck(backend):
    dev = device_for(backend)
    w, b, a, extra = make_net(*NETS[1], torch.float32, dev, seed=4)
    z = torch.randn(5, 3).to(dev)
    curves = torch.randn(2, 6, 3).to(dev)
    lib = torch.ops.latentfast
    cases = [
        (lib.pullback_metric, (z, w, b, a, *extra), True),
        (lib.pullback_metric, (z, w, b, a, None, None, None, 0.0), True),
        (lib.curve_energy, (curves, w, b, a, *extra), True),
        (lib.curve_energy_backward, (torch.ones(2).to(dev), torch.ones(2).to(dev), curves, w, b, a, *extra),
         False),
    ]
    if backend != "reference":  # the activation-saving training path of the native backends
        e, ln, derivs, feats = lib.curve_energy_train(curves, w, b, a, *extra)
        cases += [
            (lib.curve_energy_train, (curves, w, b, a, *extra), True),
            (lib.curve_energy_train_backward, (torch.ones(2).to(dev), torch.ones(2).to(dev), curves,
                                               derivs, feats, w, a, *extra[:3]), False),
        ]
    for op, args, grads in cases:
        torch.library.opcheck(op, args)
        if grads:
            torch.library.opcheck(op, (args[0].clone().requires_grad_(), *args[1:]))


def test_bad_inputs_raise():
    w, b, a, extra = make_net(*NETS[1], torch.float32, "cpu", seed=0)
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dimensions"):
        ops.pullback_metric(z[0], w, b, a, *extra)
    with pytest.raises(ValueError, match="decoder takes latent points of dimension 3"):
        ops.pullback_metric(torch.randn(4, 2), w, b, a, *extra)
    with pytest.raises(ValueError, match=r"weights\[1\] must have 5 columns"):
        ops.pullback_metric(z, [w[0], w[1][:, :4], *w[2:]], b, a, *extra)
    with pytest.raises(TypeError, match="dtype"):
        ops.pullback_metric(z.double(), w, b, a, *extra)
    with pytest.raises(ValueError, match="activation code"):
        ops.pullback_metric(z, w, b, [1, 9, 0], *extra)
    with pytest.raises(ValueError, match="one weight"):
        ops.pullback_metric(z, w, b[:-1], a, *extra)
    with pytest.raises(ValueError, match="all or none"):
        ops.pullback_metric(z, w, b, a, extra[0], None, None, 0.3)
    with pytest.raises(ValueError, match="zeta"):
        ops.pullback_metric(z, w, b, a, *extra[:3], 0.0)
    with pytest.raises(ValueError, match="rbf_weight"):
        ops.pullback_metric(z, w, b, a, extra[0], extra[1], extra[2][:, :2], 0.3)
    bad = z.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.pullback_metric(bad, w, b, a, *extra)
    with pytest.raises(ValueError, match="T >= 1"):
        ops.curve_energy(torch.randn(2, 1, 3), w, b, a, *extra)
    with pytest.raises(ValueError, match="dimensions"):
        ops.curve_energy(z, w, b, a, *extra)


def test_curve_reduce_into_a_buffer(backend):
    """curve_reduce_grad_ (the gradient written into a caller's buffer, as the pooled CPU
    pipeline calls it) gives curve_reduce's energies, lengths and gradient, and refuses a
    buffer of the wrong shape, dtype or layout and a call without grads."""
    if backend == "reference":
        pytest.skip("a kernel of the native backends")
    k = ops._native(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(81)
    g = torch.randn(5, 7, 13, dtype=torch.float64, generator=gen).to(dev)
    ge, gl = torch.rand(5, dtype=torch.float64, generator=gen).to(dev), torch.rand(5, dtype=torch.float64).to(dev)
    for grads in [(ge, gl), (ge, None), (None, gl)]:
        e, ln, gg = k.curve_reduce(g, *grads)
        buf = torch.full_like(g, float("nan"))
        e2, l2 = k.curve_reduce_grad_(buf, g, *grads)
        assert torch.equal(e2, e) and torch.equal(l2, ln) and torch.equal(buf, gg)
    err = (RuntimeError, ValueError)
    with pytest.raises(err, match="buffer"):
        k.curve_reduce_grad_(torch.empty(5, 7, 12, dtype=torch.float64, device=dev), g, ge, gl)
    with pytest.raises(err, match="buffer"):
        k.curve_reduce_grad_(torch.empty_like(g, dtype=torch.float32), g, ge, gl)
    with pytest.raises(err, match="buffer"):
        k.curve_reduce_grad_(torch.empty(13, 7, 5, dtype=torch.float64, device=dev).transpose(0, 2), g, ge, gl)
    with pytest.raises(err, match="needs grad_energy or grad_length"):
        k.curve_reduce_grad_(torch.empty_like(g), g, None, None)


def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    w, b, a, extra = make_net(*NETS[1], torch.float32, dev, seed=6)
    z = torch.randn(5, 3).to(dev)
    curves = torch.randn(2, 6, 3).to(dev)

    def f(zz, cc):
        e, ln = ops.curve_energy(cc, w, b, a, *extra)
        return ops.pullback_metric(zz, w, b, a, *extra), e, ln

    got = torch.compile(f, fullgraph=True)(z, curves)
    want = f(z, curves)
    for g, r in zip(got, want):
        assert_close(g, r)


def test_curve_energy_and_grad_compiles_fullgraph(backend):
    """curve_energy_and_grad (what geometry.energy_and_grad and a geodesic solver's step call)
    picked its backend in Python, which torch.compile cannot trace (fullgraph=True failed on
    the backend's ContextVar); under a trace it runs the energy op and its backward op. The
    same for curve_energy on curves that need gradients (its training path picked the backend
    the same way)."""
    dev = device_for(backend)
    w, b, a, extra = make_net(*NETS[1], torch.float32, dev, seed=7)
    curves = torch.randn(3, 6, 3).to(dev)

    def f(cc):
        return ops.curve_energy_and_grad(cc, w, b, a, *extra)

    torch._dynamo.reset()
    for g, r in zip(torch.compile(f, fullgraph=True)(curves), f(curves)):
        assert_close(g, r)
    # and curve_energy on curves that need gradients (curves optimised by autograd)
    torch._dynamo.reset()
    leaf = curves.clone().requires_grad_()
    torch.compile(lambda cc: ops.curve_energy(cc, w, b, a, *extra)[0].sum(), fullgraph=True)(leaf).backward()
    assert_close(leaf.grad, f(curves)[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_weights_give_nan_metric_and_energy_for_every_activation(backend, dtype):
    """A NaN in a decoder weight or bias (a diverged training) gives a NaN metric, energy and
    length on every backend for every activation, as the reference does. Before, the C++ ELU
    (a > 0 ? a : expm1(min(a, 0))) turned a NaN pre-activation into 0, and the Triton one
    would have too on a GPU (tl.minimum drops NaN there): a finite metric from NaN weights."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, generator=gen, dtype=dtype).to(dev)
    curves = torch.randn(2, 4, 2, generator=gen, dtype=dtype).to(dev)
    for act in ref.ACT_NAMES:
        for which in ("weight", "bias"):
            ws = [torch.randn(6, 2, generator=gen, dtype=dtype).to(dev), torch.randn(5, 6, generator=gen, dtype=dtype).to(dev)]
            bs = [torch.randn(6, generator=gen, dtype=dtype).to(dev), torch.randn(5, generator=gen, dtype=dtype).to(dev)]
            (ws if which == "weight" else bs)[0].view(-1)[2] = float("nan")
            m = ops.pullback_metric(z, ws, bs, [act, 0])
            e, length = ops.curve_energy(curves, ws, bs, [act, 0])
            with latentfast.use_backend("reference"):
                want = [ref_t.isnan() for ref_t in (ops.pullback_metric(z, ws, bs, [act, 0]),
                                                    *ops.curve_energy(curves, ws, bs, [act, 0]))]
            if which == "weight":  # (a bias of a linear layer cancels out of the metric)
                assert all(bool(w.any()) for w in want), (act, which)
            for got, w in zip((m, e, length), want):
                assert torch.equal(got.isnan(), w), (act, which, got)
