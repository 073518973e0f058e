"""gru_sequence against torch.nn.GRU and the reference, values and gradients."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import latentfast
from latentfast import backend as lf_backend

from latentfast.ops import rnn as ops
from latentfast.reference import rnn as ref
from tests.conftest import (CPU_ISAS, FAST_GC, assert_close, backends_under_test, device_for, interpreting,
                            skip_unless_cpu_isa)

# B = 37 takes the C++ kernels' rows-per-thread path (>= 16 rows per thread); H = 512 is the
# top of the hidden sizes the ops are meant for (several Triton hidden tiles)
SHAPES = [(1, 1, 1, 1), (7, 3, 5, 4), (5, 2, 3, 17), (12, 6, 2, 33), (6, 37, 4, 20), (2, 3, 3, 512)]  # T, B, I, H


def _gru(i, h, dtype, device, seed):
    torch.manual_seed(seed)
    return nn.GRU(i, h).to(dtype=dtype, device=device)


def _params(g):
    return (g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gru_sequence_matches_nn_gru(backend, shape, dtype):
    t, b, i, h = shape
    dev = device_for(backend)
    g = _gru(i, h, dtype, dev, seed=sum(shape))
    x = torch.randn(t, b, i, dtype=dtype).to(dev).requires_grad_()
    h0 = torch.randn(b, h, dtype=dtype).to(dev).requires_grad_()
    want, want_hn = g(x, h0[None])
    out, hn = ops.gru_sequence(x, h0, *_params(g))
    assert_close(out, want, scale=10)
    assert_close(hn, want_hn[0], scale=10)
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), [x, h0, *g.parameters()])
    wants = torch.autograd.grad((want * go).sum(), [x, h0, *g.parameters()])
    for name, a, w in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], grads, wants):
        assert_close(a, w, scale=100, msg=name)


def test_inference_op_and_batch_first(backend):
    dev = device_for(backend)
    g = _gru(3, 6, torch.float32, dev, seed=1)
    x = torch.randn(4, 9, 3).to(dev)  # batch first: B = 4, T = 9
    with torch.no_grad():
        out, hn = ops.gru_sequence(x, None, *_params(g), batch_first=True)
        want, want_hn = nn.GRU(3, 6, batch_first=True).to(dev).requires_grad_(False), None
        want.load_state_dict(g.state_dict())
        want, want_hn = want(x)
    assert out.shape == (4, 9, 6)
    assert_close(out, want, scale=10)
    assert_close(hn, want_hn[0], scale=10)


def test_gradcheck_and_opcheck(backend):
    dev = device_for(backend)
    g = _gru(2, 3, torch.float64, dev, seed=2)
    x = torch.randn(4, 2, 2, dtype=torch.float64).to(dev).requires_grad_()
    h0 = torch.randn(2, 3, dtype=torch.float64).to(dev).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in _params(g)]
    assert torch.autograd.gradcheck(lambda *a: ops.gru_sequence(*a)[0], (x, h0, *params), **FAST_GC)
    # the inference op differentiated directly (recomputes the gates)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.latentfast.gru_sequence(*a), (x, h0, *params),
                                    **FAST_GC)
    lib = torch.ops.latentfast
    args = (x.detach(), h0.detach(), *[p.detach() for p in params])
    out, gates = ref.gru_sequence(*args)
    for op, a in ((lib.gru_sequence, args), (lib.gru_sequence_train, args),
                  (lib.gru_sequence_backward, (torch.randn_like(out), *args[:4], out, gates))):
        torch.library.opcheck(op, a)
    torch.library.opcheck(lib.gru_sequence_train, (x, h0, *params))


def test_bad_inputs_raise():
    g = _gru(3, 4, torch.float32, "cpu", seed=0)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="dimensions"):
        ops.gru_sequence(x[0], None, *_params(g))
    with pytest.raises(ValueError, match="x has 4 input features but weight_ih"):
        ops.gru_sequence(torch.randn(5, 2, 4), None, *_params(g))
    with pytest.raises(ValueError, match=r"weight_ih must be \[12, 3\]"):
        ops.gru_sequence(x, None, torch.zeros(11, 3), *_params(g)[1:])
    with pytest.raises(ValueError, match="h0"):
        ops.gru_sequence(x, torch.zeros(3, 4), *_params(g))
    with pytest.raises(TypeError, match="dtype"):
        ops.gru_sequence(x.double(), None, *_params(g))
    bad = x.clone()
    bad[1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        ops.gru_sequence(bad, None, *_params(g))
    for batch_first in (False, True):  # an empty sequence, as nn.GRU refuses it
        with pytest.raises(ValueError, match="at least one time step"):
            ops.gru_sequence(x[:0].transpose(0, 1) if batch_first else x[:0], torch.zeros(2, 4), *_params(g),
                             batch_first=batch_first)


def test_non_finite_initial_states_raise(backend):
    """A NaN or Inf in h0 (or the LSTM's c0) raises, as one in x does, on every backend and
    through the GRU / LSTM modules (before, only x was checked: a NaN initial state ran
    through to NaN outputs)."""
    from latentfast.rnn import GRU, LSTM

    x = torch.randn(4, 2, 3)
    for bad_value in (float("nan"), float("inf")):
        bad = torch.zeros(2, 5)
        bad[1, 2] = bad_value
        g = _gru(3, 5, torch.float32, "cpu", seed=0)
        with pytest.raises(ValueError, match="h0 contains NaN or Inf"):
            ops.gru_sequence(x, bad, *_params(g))
        lstm = torch.nn.LSTM(3, 5)
        p = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
        with pytest.raises(ValueError, match="h0 contains NaN or Inf"):
            ops.lstm_sequence(x, (bad, torch.zeros(2, 5)), *p)
        with pytest.raises(ValueError, match="c0 contains NaN or Inf"):
            ops.lstm_sequence(x, (torch.zeros(2, 5), bad), *p)
        with pytest.raises(ValueError, match="h0 contains NaN or Inf"):
            GRU(3, 5)(x, bad[None])
        with pytest.raises(ValueError, match="c0 contains NaN or Inf"):
            LSTM(3, 5)(x, (torch.zeros(1, 2, 5), bad[None]))
    ops.gru_sequence(x, torch.zeros(2, 5), *_params(_gru(3, 5, torch.float32, "cpu", seed=0)))  # finite: runs


def test_check_finite_together_names_each_bad_tensor():
    """One read-back for several tensors: a bad one is named (the first, where several are),
    finite ones pass, empty and integer tensors are skipped, dtypes may differ."""
    from latentfast.ops._checks import check_finite_together

    a, b = torch.randn(3), torch.randn(2, 2, dtype=torch.float64)
    check_finite_together([("a", a), ("b", b), ("e", torch.zeros(0)), ("i", torch.arange(3))])
    b[1, 0] = float("-inf")
    with pytest.raises(ValueError, match="^b contains NaN or Inf"):
        check_finite_together([("a", a), ("b", b)])
    a[0] = float("nan")
    with pytest.raises(ValueError, match="^a contains NaN or Inf"):
        check_finite_together([("a", a), ("b", b)])


# ---------------------------------------------------------------------------------- LSTM
def _lstm(i, h, dtype, device, seed, **kw):
    torch.manual_seed(seed)
    return nn.LSTM(i, h, **kw).to(dtype=dtype, device=device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_sequence_matches_nn_lstm(backend, shape, dtype):
    t, b, i, h = shape
    dev = device_for(backend)
    m = _lstm(i, h, dtype, dev, seed=sum(shape) + 1)
    x = torch.randn(t, b, i, dtype=dtype).to(dev).requires_grad_()
    h0 = torch.randn(b, h, dtype=dtype).to(dev).requires_grad_()
    c0 = torch.randn(b, h, dtype=dtype).to(dev).requires_grad_()
    want, (want_hn, want_cn) = m(x, (h0[None], c0[None]))
    out, (hn, cn) = ops.lstm_sequence(x, (h0, c0), *_params(m))
    assert_close(out, want, scale=10)
    assert_close(hn, want_hn[0], scale=10)
    assert_close(cn, want_cn[0], scale=10)
    # gradients through the outputs and through the final cell state
    go, gc = torch.randn_like(out), torch.randn_like(cn)
    wrt = [x, h0, c0, *m.parameters()]
    grads = torch.autograd.grad((out * go).sum() + (cn * gc).sum(), wrt)
    wants = torch.autograd.grad((want * go).sum() + (want_cn[0] * gc).sum(), wrt)
    for name, a, w in zip(["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"], grads, wants):
        assert_close(a, w, scale=100, msg=name)


def test_lstm_inference_and_batch_first(backend):
    dev = device_for(backend)
    m = _lstm(3, 6, torch.float32, dev, seed=3, batch_first=True)
    x = torch.randn(4, 9, 3).to(dev)  # B = 4, T = 9
    with torch.no_grad():
        out, (hn, cn) = ops.lstm_sequence(x, None, *_params(m), batch_first=True)
        want, (want_hn, want_cn) = m(x)
    assert out.shape == (4, 9, 6)
    assert_close(out, want, scale=10)
    assert_close(hn, want_hn[0], scale=10)
    assert_close(cn, want_cn[0], scale=10)


def test_lstm_gradcheck_and_opcheck(backend):
    dev = device_for(backend)
    m = _lstm(2, 3, torch.float64, dev, seed=4)
    x = torch.randn(4, 2, 2, dtype=torch.float64).to(dev).requires_grad_()
    h0 = torch.randn(2, 3, dtype=torch.float64).to(dev).requires_grad_()
    c0 = torch.randn(2, 3, dtype=torch.float64).to(dev).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in _params(m)]

    def public(x, h0, c0, *p):
        out, (_, cn) = ops.lstm_sequence(x, (h0, c0), *p)
        return out, cn

    assert torch.autograd.gradcheck(public, (x, h0, c0, *params), **FAST_GC)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.latentfast.lstm_sequence(*a), (x, h0, c0, *params),
                                    **FAST_GC)
    lib = torch.ops.latentfast
    args = (x.detach(), h0.detach(), c0.detach(), *[p.detach() for p in params])
    out, cells, gates = ref.lstm_sequence(*args)
    bwd_args = (torch.randn_like(out), torch.randn_like(cells), *args[:5], out, cells, gates)
    for op, a in ((lib.lstm_sequence, args), (lib.lstm_sequence_train, args), (lib.lstm_sequence_backward, bwd_args)):
        torch.library.opcheck(op, a)
    torch.library.opcheck(lib.lstm_sequence_train, (x, h0, c0, *params))


def test_lstm_bad_inputs_raise():
    m = _lstm(3, 4, torch.float32, "cpu", seed=0)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="weight_hh"):
        ops.lstm_sequence(x, None, *_params(_gru(3, 4, torch.float32, "cpu", seed=0)))
    with pytest.raises(ValueError, match="c0"):
        ops.lstm_sequence(x, (torch.zeros(2, 4), torch.zeros(2, 5)), *_params(m))
    with pytest.raises(ValueError, match="pair"):
        ops.lstm_sequence(x, torch.zeros(2, 4), *_params(m))
    with pytest.raises(TypeError, match="dtype"):
        ops.lstm_sequence(x.double(), None, *_params(m))
    with pytest.raises(ValueError, match="at least one time step"):
        ops.lstm_sequence(x[:0], None, *_params(m))


@pytest.mark.parametrize("shape", [(3, 37, 4, 45), (3, 5, 3, 45), (2, 3, 3, 512)])
def test_float32_forward_close_to_float64(backend, shape):
    """The float32 gate math (fast exp and reciprocal in the C++ kernels) stays within a few
    float32 ulps of the float64 computation on the same inputs: a tighter check than the
    nn.GRU comparison's tolerance. Pre-activations reach about +-10 (weights scaled by 3)."""
    t, b, i, h = shape
    dev = device_for(backend)
    torch.manual_seed(sum(shape))
    x, h0, c0 = torch.randn(t, b, i) * 2, torch.randn(b, h), torch.randn(b, h)
    for mod in (nn.GRU(i, h), nn.LSTM(i, h)):
        p = [w.detach() * 3 for w in _params(mod)]
        with torch.no_grad():
            args = [[v.to(dev, dtype) for v in (x, h0, c0, *p)] for dtype in (torch.float32, torch.float64)]
            if isinstance(mod, nn.GRU):
                got, want = (ops.gru_sequence(a[0], a[1], *a[3:])[0] for a in args)
            else:
                got, want = (ops.lstm_sequence(a[0], (a[1], a[2]), *a[3:])[0] for a in args)
        err = (got.double() - want).abs().max().item()
        assert err < 4e-6, (type(mod).__name__, err)


# Shapes T B I H: B = 37 takes the C++ row-block paths (>= 16 rows per thread on 2 threads),
# B = 5 the per-step paths.
def _worst_vs_nn(dtype_name: str, t: int, b: int, i: int, h: int) -> float:
    """The largest relative error of the C++ gru_sequence / lstm_sequence (outputs and the
    gradients of x, h0 and the weights) against nn.GRU / nn.LSTM, on [T, B, I] inputs with H
    hidden units."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(t, b, i, dtype=dtype, requires_grad=True)
    h0 = torch.randn(b, h, dtype=dtype, requires_grad=True)
    c0 = torch.randn(b, h, dtype=dtype, requires_grad=True)
    worst = 0.0
    with latentfast.use_backend("cpp"):
        for mod in (nn.GRU(i, h).to(dtype), nn.LSTM(i, h).to(dtype)):
            p = (mod.weight_ih_l0, mod.weight_hh_l0, mod.bias_ih_l0, mod.bias_hh_l0)
            if isinstance(mod, nn.GRU):
                out, _ = ops.gru_sequence(x, h0, *p)
                want, _ = mod(x, h0[None])
            else:
                out, _ = ops.lstm_sequence(x, (h0, c0), *p)
                want, _ = mod(x, (h0[None], c0[None]))
            go = torch.randn_like(out)
            wrt = [x, h0, *p]
            pairs = [(out, want), *zip(torch.autograd.grad((out * go).sum(), wrt),
                                       torch.autograd.grad((want * go).sum(), wrt))]
            worst = max([worst] + [float(((a - w).abs().max() / w.abs().max()).detach()) for a, w in pairs])
    return worst


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op (OpenMP) threads set to n inside, restored after: the C++ RNN kernels
    pick the row-block or per-step path from the rows per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# For the switches the C++ RNN code reads once per process (LATENTFAST_RNN_NO_AVX2,
# LATENTFAST_RNN_ATEN_GEMM): a fresh interpreter with the variable set, 2 OpenMP threads.
_SUBPROCESS_RNN_SCRIPT = """
import sys
from tests.rnn.test_rnn_ops import _worst_vs_nn
print(_worst_vs_nn(sys.argv[1], *map(int, sys.argv[2:6])))
"""
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worst_in_subprocess(env_var: str, dtype: str, *shape: int) -> float:
    env = {**os.environ, env_var: "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", _SUBPROCESS_RNN_SCRIPT, dtype, *map(str, shape)], env=env,
                         cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return float(run.stdout.split()[-1])


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' at::mm_out fallback")
def test_cpp_aten_gemm_fallback_matches_nn():
    """The C++ row-block paths call sgemm_/dgemm_ directly; LATENTFAST_RNN_ATEN_GEMM=1 makes
    them use at::mm_out instead (the path for a libtorch without those symbols)."""
    assert _worst_in_subprocess("LATENTFAST_RNN_ATEN_GEMM", "float64", 6, 37, 4, 20) < 1e-10


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ per-step path")
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
@pytest.mark.parametrize("b", [13, 5])
def test_cpp_per_step_path_matches_nn(dtype, tol, b):
    """Fewer than 16 rows per thread (2 threads) take the per-step path: one threaded GEMM per
    step, against a contiguous copy of W_hh^T from 8 rows on (B = 13), through the transposed
    view below (B = 5)."""
    with _threads(2):
        assert _worst_vs_nn(dtype, 9, b, 4, 45) < tol


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ row-block backward")
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_cpp_row_block_backward_chunks_match_nn(dtype, tol):
    """The row-block backward takes the weight, bias and input gradients per chunk of steps
    (>= 128 rows a chunk: 7 steps of 19 and 18 rows on 2 threads), so T = 17 runs two full
    chunks and a short one, on blocks of unequal rows."""
    with _threads(2):
        assert _worst_vs_nn(dtype, 17, 37, 4, 45) < tol


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' per-ISA builds")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("shape", [(6, 37, 4, 70), (4, 5, 3, 70)])
def test_cpp_isa_clones_match_nn(isa, shape, monkeypatch):
    """The RNN kernel files are built for base, AVX2 and AVX-512 (LATENTFAST_CPU_ISA picks one
    per op call); the float gate loops of the AVX2 and AVX-512 builds are lockstep intrinsics
    with 8- and 16-float vectors. H = 70: blocks of 4 vectors (64 columns in AVX-512), then
    single vectors and a scalar tail; the row-block (B = 37) and per-step (B = 5) paths."""
    skip_unless_cpu_isa(isa)
    monkeypatch.setenv("LATENTFAST_CPU_ISA", isa)
    with _threads(2):
        assert _worst_vs_nn("float32", *shape) < 2e-5


@pytest.mark.skipif("cpp" not in backends_under_test(), reason="checks the C++ kernels' baseline-ISA build")
@pytest.mark.parametrize("shape", [(6, 37, 4, 45), (3, 5, 3, 45)])
def test_cpp_baseline_isa_matches_nn(shape):
    """On an AVX2 machine the float gate loops run the lockstep intrinsics kernels;
    LATENTFAST_RNN_NO_AVX2=1 runs the baseline-ISA (auto-vectorised) build instead, the path of a
    machine without AVX2. H = 45: lockstep blocks of 4 and 1 vectors and a scalar tail."""
    assert _worst_in_subprocess("LATENTFAST_RNN_NO_AVX2", "float32", *shape) < 2e-5


def _triton_runs_here() -> bool:
    return lf_backend.why_unavailable("triton", torch.device("cpu")) is None


def check_triton_paths(device: torch.device, persistent: bool, dtype: torch.dtype) -> None:
    """The persistent (one launch) and the per-step Triton paths against nn.GRU / nn.LSTM at a
    size with several programs (B > BLOCK_B), several hidden tiles (H > BLOCK_N) and a masked
    last tile, values and gradients through out and the last cell."""
    from latentfast.kernels import rnn as kernels
    t, b, i, h = 4, 19, 5, 70
    old = kernels.PERSISTENT
    kernels.PERSISTENT = persistent
    try:
        with latentfast.use_backend("triton"):
            g = _gru(i, h, dtype, device, seed=7)
            x = torch.randn(t, b, i, dtype=dtype).to(device).requires_grad_()
            h0 = torch.randn(b, h, dtype=dtype).to(device).requires_grad_()
            out, _ = ops.gru_sequence(x, h0, *_params(g))
            want, _ = g(x, h0[None])
            assert_close(out, want, scale=10, msg="gru out")
            go = torch.randn_like(out)
            wrt = [x, h0, *g.parameters()]
            for a, w in zip(torch.autograd.grad((out * go).sum(), wrt), torch.autograd.grad((want * go).sum(), wrt)):
                assert_close(a, w, scale=100, msg="gru grad")
            m = _lstm(i, h, dtype, device, seed=8)
            c0 = torch.randn(b, h, dtype=dtype).to(device).requires_grad_()
            out, (_, cn) = ops.lstm_sequence(x, (h0, c0), *_params(m))
            want, (_, want_cn) = m(x, (h0[None], c0[None]))
            assert_close(out, want, scale=10, msg="lstm out")
            assert_close(cn, want_cn[0], scale=10, msg="lstm c_n")
            gc = torch.randn_like(cn)
            wrt = [x, h0, c0, *m.parameters()]
            for a, w in zip(torch.autograd.grad((out * go).sum() + (cn * gc).sum(), wrt),
                            torch.autograd.grad((want * go).sum() + (want_cn[0] * gc).sum(), wrt)):
                assert_close(a, w, scale=100, msg="lstm grad")
    finally:
        kernels.PERSISTENT = old


@pytest.mark.skipif(not _triton_runs_here(), reason="Triton on CPU needs TRITON_INTERPRET=1 (the CI's 2nd pass)")
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_persistent_and_stepwise_paths(persistent, dtype):
    check_triton_paths(torch.device("cpu"), persistent, dtype)
