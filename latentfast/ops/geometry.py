"""Latent-geometry ops: registration, backend dispatch, autograd, fake kernels.

Ops (namespace ``latentfast::``), for a Gaussian MLP decoder given as plain tensors (see
latentfast.reference.geometry for the layout and the math):
- ``pullback_metric(z, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)``
  -> M(z) [N, d, d];
- ``curve_energy(curves, ...)`` -> (energy [B], length [B]) of curves [B, T+1, d];
- ``curve_energy_backward(grad_energy, grad_length, curves, ...)`` -> grad wrt curves.

The cpp and triton backends share one pipeline (below): the d tangent directions travel
with the hidden state as extra rows of one matrix, so each layer is one GEMM (ATen BLAS on
CPU, cuBLAS on GPU) followed by one fused kernel (activation, its derivative, tangent
scaling). The Jacobian [N, D, d] is never formed: with a linear last layer, M_mu = T^T G T
with G = W_L^T W_L precomputed and T the tangents entering the last layer; the RBF variance
term is a weighted Gram of d x K features (on CPU one C++ kernel, rbf_metric, that never
forms the [(1 + d) N, D] product; curve energies get their RBF sigmas from rbf_sigma_). Curve energies are reduced per chunk of curves,
so the [B, T+1, D] decoder outputs of all curves are never held at once, and with a linear
last layer wider than its input they use R of W_L = Q R in its place (see _energy_last).
On CPU a call's chunks share work buffers, and inside reuse_buffers() successive calls do
(no fresh pages to fault in on every call; the geodesic solver runs in one).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from latentfast import backend
from latentfast import _ext  # noqa: F401  (loads latentfast_cpp kernels when built)
from latentfast.kernels import check_args, check_rank  # (the package module: no triton import)
from latentfast.ops._amp import float32_under_autocast
from latentfast.ops._autograd import (graph_wanted, op_backward, reference_vjp, reject_tangents, route_transforms,
                                      under_transform)
from latentfast.ops._checks import can_read_back, check_finite, check_tensor
from latentfast.reference import geometry as ref


def _triton():
    return backend.triton_kernels("geometry")


def _native(be: str):
    return torch.ops.latentfast_cpp if be == "cpp" else _triton()


# Points per chunk of the native pipelines: bounds the working set (rows x widest layer).
_CHUNK_ELEMS = 1 << 22

# Rows of R per block in the metric's triangular product R T (see _metric_native).
_TRI_BLOCK = 128

# (a copy of W_L, R) per last-layer weight (by address, shape and dtype; a hit also needs equal
# values, so one read-back per call), the 8 most recent, for _energy_layers and _metric_native.
_QR_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


# R per last-layer key that the code inside last_layer_fixed() takes without the value check
# (the caller promises W_L does not change there).
_PINNED: contextvars.ContextVar[dict[tuple, Tensor] | None] = contextvars.ContextVar("latentfast_qr_pinned",
                                                                                   default=None)


def _qr_key(w: Tensor) -> tuple:
    return (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device)


@contextlib.contextmanager
def last_layer_fixed(weights: list[Tensor], acts: list[int]) -> Iterator[None]:
    """Promise that the decoder's last weight keeps its values inside the block: the QR cache
    (see _energy_last) is checked once on entry, and the calls inside take R without comparing
    W_L with its cached copy (one read-back, a device sync on a GPU, per call). The geodesic
    solver runs its iterations inside one. A CUDA graph captured inside still forms R in the
    graph."""
    w = weights[-1]
    r = _energy_last(w, int(acts[-1]))
    if r is None:
        yield
        return
    token = _PINNED.set({**(_PINNED.get() or {}), _qr_key(w): r})
    try:
        yield
    finally:
        _PINNED.reset(token)


# Work buffers of the CPU curve-energy pipeline that reuse_buffers() keeps from call to call.
_SCRATCH: contextvars.ContextVar[dict | None] = contextvars.ContextVar("latentfast_geom_scratch", default=None)


@contextlib.contextmanager
def reuse_buffers() -> Iterator[None]:
    """Inside the block, the CPU curve-energy pipeline (curve_energy, curve_energy_and_grad and
    their backward) keeps its per-chunk work buffers from call to call instead of allocating
    them afresh: the layers' pre-activations, act'(a), the features and the backward's
    products, about ten buffers of at most _CHUNK_ELEMS elements each (ten for the
    geodesics_1000 decoder in float32: 72 MiB). A fresh large CPU allocation is fresh pages
    from the system, one page fault per 4 KiB when first written, and glibc hands freed
    blocks back on every call: geodesic solves of 200-1000 pairs ran 1.2-1.4x faster with the buffers kept
    (paired, see docs/PERFORMANCE.md). The geodesic solver runs its iterations inside one; outside,
    the buffers are shared only by one call's chunks and freed when it returns. Nestable; GPU
    tensors are not affected (the CUDA caching allocator already reuses memory)."""
    token = _SCRATCH.set(_SCRATCH.get() if _SCRATCH.get() is not None else {})
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def _scratch_for(t: Tensor) -> dict | None:
    """The buffer pool a native curve pipeline call on t's device uses: reuse_buffers()'s, a
    fresh one for this call (CPU), or None (GPU: allocate as usual)."""
    if t.device.type != "cpu":
        return None
    pool = _SCRATCH.get()
    return pool if pool is not None else {}


def _buf(pool: dict | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A contiguous [shape] tensor of like's dtype and device: the pool's buffer `name`
    (grown when too small; contents undefined), or a fresh one without a pool."""
    if pool is None:
        return like.new_empty(shape)
    n = math.prod(shape)
    key = (name, like.dtype)
    flat = pool.get(key)
    if flat is None or flat.numel() < n:
        flat = like.new_empty(n)
        pool[key] = flat
    return flat[:n].view(shape)


def _reduces(w: Tensor, act: int) -> bool:
    return act == 0 and w.shape[0] > w.shape[1] and os.environ.get("LATENTFAST_GEOM_QR", "1") != "0"


def _energy_widths(weights: list[Tensor], acts: list[int]) -> list[int]:
    """The layer widths the native curve-energy pipelines form (see _energy_layers)."""
    w = weights[-1]
    return [x.shape[0] for x in weights[:-1]] + [w.shape[1] if _reduces(w, acts[-1]) else w.shape[0]]


def _energy_last(w: Tensor, act: int) -> Tensor | None:
    """The last layer the native curve-energy pipelines run in place of W_L, or None for W_L
    itself. Energy and length use mu only through ||mu(z_{t+1}) - mu(z_t)||, which for a
    linear last layer (act 0; its bias cancels) is ||W_L (h_{t+1} - h_t)|| = ||R (h_{t+1} -
    h_t)|| with W_L = Q R (reduced QR, Q with orthonormal columns). So where W_L [D, H] has
    D > H, the last layer becomes R [H, H] with a zero bias: H mean features per point instead
    of D (2-256-256-784: 256 instead of 784). R is cached and recomputed when the weight's
    values change (a geodesic solver calls this every iteration with one decoder).
    LATENTFAST_GEOM_QR=0 turns it off. The native metric uses the same R (M = (R J)^T (R J)).

    Where no value can be read back (can_read_back: above all while a CUDA graph is captured,
    e.g. by torch.cuda.graph or torch.compile's "reduce-overhead" mode), the cache is not
    consulted: its hit test reads W_L's values back, and a graph replays without running this
    code, so R is formed from W_L inside the graph, and a replay after the weights change uses
    their new values."""
    if not _reduces(w, act):
        return None
    if not can_read_back(w):
        with torch.no_grad():
            return torch.linalg.qr(w.detach(), mode="r")[1].contiguous()
    key = _qr_key(w)
    pinned = _PINNED.get()
    if pinned is not None and key in pinned:
        return pinned[key]
    hit = _QR_CACHE.get(key)
    if hit is None or not torch.equal(hit[0], w):
        with torch.no_grad():
            hit = (w.detach().clone(), torch.linalg.qr(w.detach(), mode="r")[1].contiguous())
        _QR_CACHE.pop(key, None)
        while len(_QR_CACHE) >= 8:
            _QR_CACHE.pop(next(iter(_QR_CACHE)))
        _QR_CACHE[key] = hit
    return hit[1]


def _energy_weights(weights: list[Tensor], acts: list[int]) -> list[Tensor]:
    """weights with the last one replaced as _energy_last says."""
    r = _energy_last(weights[-1], acts[-1])
    return weights if r is None else [*weights[:-1], r]


def _energy_layers(weights: list[Tensor], biases: list[Tensor], acts: list[int]
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """(weights, biases) with the last layer replaced as _energy_last says (zero bias)."""
    ws = _energy_weights(weights, acts)
    if ws is weights:
        return weights, biases
    return ws, [*biases[:-1], biases[-1].new_zeros(ws[-1].shape[0])]


def _rbf_values(z: Tensor, centres: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """The RBF network's differences z - c_k [p, K, d] and features v_k = exp(-lam_k ||z - c_k||^2)
    [p, K], for z [p, d]."""
    diff = z[:, None, :] - centres
    return diff, torch.exp(-lam * diff.pow(2).sum(-1))


def _metric_native(k, z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                   centres: Tensor | None, lam: Tensor | None, wr: Tensor | None, zeta: float) -> Tensor:
    n, d = z.shape
    out = z.new_empty((n, d, d))
    last_w = weights[-1]
    # A linear last layer W_L [D, H] enters as J^T W_L^T W_L J: with D > H through R of its
    # QR (cached, see _energy_last), whose upper triangle the column blocks below skip;
    # otherwise through the Gram matrix W_L^T W_L, formed once for all points.
    r = _energy_last(last_w, acts[-1])
    gram_w = last_w.T @ last_w if acts[-1] == 0 and r is None else None
    # the widest rows a chunk materialises: hidden layers, the last layer only when it is
    # run (not linear), the RBF network's D outputs
    widths = [w.shape[0] for w in weights[:-1]] + [last_w.shape[0] if acts[-1] != 0 or centres is not None
                                                  else last_w.shape[1]]
    chunk = max(1, _CHUNK_ELEMS // ((1 + d) * max(widths)))
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    for s in range(0, n, chunk):
        zc = z[s:s + chunk]
        m = zc.shape[0]
        # Rows: m hidden states, then m * d tangents (point-major); starts at (z, e_k).
        buf = torch.cat([zc, eye.expand(m, d, d).reshape(m * d, d)])
        for w, b, act in zip(weights[:-1], biases[:-1], acts[:-1]):
            nxt = buf @ w.T
            k.mlp_act_tangent_(nxt, nxt.new_empty((m, nxt.shape[1])), m, d, act, b)  # adds b to the hidden rows
            buf = nxt
        tan = buf[m:].view(m, d, -1)
        if r is not None:
            # (R T)^T (R T) summed over row blocks [i0, i1) of R: each block's rows R[i0:i1, i0:]
            # meet only T's rows from i0 on (R is upper triangular: 3/4 of the dense flops at
            # H = 256, blocks of 128)
            hw = r.shape[0]
            mc = None
            for i0 in range(0, hw, _TRI_BLOCK):
                p = (buf[m:, i0:] @ r[i0:i0 + _TRI_BLOCK, i0:].T).view(m, d, -1)
                g = k.weighted_gram(p, p, None)
                mc = g if mc is None else mc + g
        elif gram_w is not None:
            p = (tan.reshape(m * d, -1) @ gram_w).view(m, d, -1)
            mc = k.weighted_gram(p, tan, None)
        else:
            nxt = buf @ last_w.T
            k.mlp_act_tangent_(nxt, nxt.new_empty((m, nxt.shape[1])), m, d, acts[-1], biases[-1])
            u = nxt[m:].view(m, d, -1)
            mc = k.weighted_gram(u, u, None)
        if centres is not None:
            mc = _rbf_metric_term(k, zc, centres, lam, wr, zeta, mc)
        out[s:s + chunk] = mc
    return out


# Latent dimensions up to which the C++ backend fuses the RBF metric term (rbf_metric).
_RBF_FUSED_MAX_D = 7


def _rbf_metric_term(k, zc: Tensor, centres: Tensor, lam: Tensor, wr: Tensor, zeta: float, mc: Tensor) -> Tensor:
    """mc + the RBF variance network's metric term at the points zc [m, d].

    sigma = beta^-1/2, beta = wr v + zeta: J_sigma = -1/2 beta^-3/2 wr dv, so the metric gains
    sum_D beta^-3 / 4 (wr dv)_i (wr dv)_j. The C++ backend (d <= 7) does it in one kernel that
    never forms the [(1 + d) m, D] product (latentfast_cpp::rbf_metric); otherwise one GEMM
    forms beta - zeta (rows v) and wr dv (rows dv, point-major) together, the weights are made
    in place, and a weighted Gram sums them.
    """
    m, d = zc.shape
    if k is torch.ops.latentfast_cpp and d <= _RBF_FUSED_MAX_D:
        return k.rbf_metric(zc, centres, lam, wr, float(zeta), mc)
    diff, v = _rbf_values(zc, centres, lam)  # [m, K, d], [m, K]
    feats = v.new_empty(((1 + d) * m, v.shape[1]))
    feats[:m] = v
    torch.mul((-2.0 * lam * v)[:, None, :], diff.transpose(1, 2), out=feats[m:].view(m, d, -1))
    ab = feats @ wr.T  # [(1 + d) m, D]
    wgt = ab[:m].add_(zeta).reciprocal_().pow_(3).mul_(0.25)  # beta^-3 / 4 (pow_(3): x*x*x)
    a = ab[m:].view(m, d, -1)  # J_beta rows
    return mc + k.weighted_gram(a, a, wgt)


def _mlp_forward_chunk(k, zf: Tensor, weights, biases, acts, centres, lam, wr, zeta,
                       deriv_out: list[Tensor] | None = None, feats_out: Tensor | None = None,
                       pool: dict | None = None):
    """Features g(zf) [p, F] and act'(a) per layer, for one chunk of points (written into
    deriv_out / feats_out, contiguous row blocks, when given; else into the pool's buffers,
    see _buf)."""
    h, derivs = zf, []
    p = zf.shape[0]
    for li, (w, b, act) in enumerate(zip(weights, biases, acts)):
        # the bias is added in the activation pass (no bias copy before the GEMM)
        a = torch.mm(h, w.T, out=_buf(pool, f"a{li % 2}", (p, w.shape[0]), zf))
        dv = deriv_out[li] if deriv_out is not None else _buf(pool, f"d{li}", (p, w.shape[0]), zf)
        k.mlp_act_tangent_(a, dv, p, 0, act, b)
        derivs.append(dv)
        h = a
    if centres is None:
        if feats_out is not None:
            feats_out.copy_(h)
            return feats_out, derivs
        return h, derivs
    n_mean = h.shape[1]
    feats = feats_out if feats_out is not None else _buf(pool, "feats", (p, n_mean + wr.shape[0]), zf)
    feats[:, :n_mean] = h
    sigma = feats[:, n_mean:]  # sigma = (wr v + zeta)^-1/2 written into the feature rows
    if k is torch.ops.latentfast_cpp:
        k.rbf_sigma_(sigma, zf, centres, lam, wr, float(zeta))  # one kernel, no [p, D] product pass
    else:
        _, v = _rbf_values(zf, centres, lam)
        torch.mm(v, wr.T, out=sigma)  # (mm takes the row stride; an addmm with a broadcast bias
        sigma.add_(zeta).rsqrt_()     # copied it first, and rsqrt and cat made two more copies)
    return feats, derivs


# The first layer's backward product ga [p, H] @ W_0 [H, d] has a narrow output (d columns):
# below this width it runs with W_0 stored transposed (MKL's kernel for a row-major [H, d]
# operand ran at a third of the speed: 1.44 -> 0.42 ms at p = 16368, H = 128, d = 2, on the
# 2-core AMD EPYC VM of 2026-12-02; curve_energy_and_grad on the geodesics_1000 decoder, 1000
# curves: 69.9 -> 67.0 ms, paired medians).
_NARROW_B = 16


def _features_backward(k, gg: Tensor, z: Tensor, feats: Tensor, derivs: list[Tensor], weights: list[Tensor],
                       centres: Tensor | None, lam: Tensor | None, wr: Tensor | None,
                       pool: dict | None = None) -> Tensor:
    """reference.features_backward, its products written into the pool's buffers (see _buf;
    the same operations, but for the first layer's operand layout, see _NARROW_B); its RBF
    part on CPU in one C++ kernel (rbf_sigma_backward_: no [p, D] sigma^3 g tensor, no [p, K]
    GEMM), elsewhere in fewer passes over the [p, D] sigma block (one product tensor, made in
    place, instead of pow, mul and mul)."""
    p = gg.shape[0]
    n_out = weights[-1].shape[0]
    ga = torch.mul(gg[:, :n_out], derivs[-1], out=_buf(pool, "ga", (p, n_out), gg))
    for li in range(len(weights) - 1, -1, -1):
        w = weights[li]
        if li == 0 and w.shape[1] < _NARROW_B:
            w = w.T.contiguous().T  # (see _NARROW_B)
        gz = torch.mm(ga, w, out=_buf(pool, f"gz{li % 2}", (p, w.shape[1]), gg))
        if li > 0:
            ga = gz.mul_(derivs[li - 1])
    if centres is None:
        return gz
    if k is torch.ops.latentfast_cpp:
        k.rbf_sigma_backward_(gz, feats[:, n_out:], gg[:, n_out:], z, centres, lam, wr)
        return gz
    sig = feats[:, n_out:]
    t = torch.mul(sig, sig)
    t.mul_(sig).mul_(gg[:, n_out:])  # sigma^3 g; d sigma / d beta = -sigma^3 / 2
    gv = (t @ wr).mul_(-0.5)  # [p, K]
    diff, v = _rbf_values(z, centres, lam)
    return gz + torch.einsum("pk,pkd->pd", gv * v * (-2.0 * lam), diff)


def _reduce(k, g: Tensor, ge: Tensor | None, gl: Tensor | None, pool: dict | None
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """k.curve_reduce, its gradient (when ge or gl is given) written into the pool's buffer."""
    if pool is None or (ge is None and gl is None):
        return k.curve_reduce(g, ge, gl)
    gg = _buf(pool, "gg", tuple(g.shape), g)
    e, ln = k.curve_reduce_grad_(gg, g, ge, gl)
    return e, ln, gg


def _deriv_views(flat: Tensor, n_points: int, widths: list[int]) -> list[Tensor]:
    """Per-layer [n_points, H_l] blocks of one flat buffer (each row block contiguous)."""
    views, off = [], 0
    for w in widths:
        views.append(flat[off:off + n_points * w].view(n_points, w))
        off += n_points * w
    return views


# Rows (curve points) per chunk of the CPU curve pipelines at most: smaller chunks keep a layer's
# activations in cache between its GEMM and the passes after it. curve_energy_and_grad on the
# geodesics_1000 decoder (2-128-128-64 + RBF), 1000 curves of 33 points, paired on the 2-core AMD
# EPYC VM of 2026-12-02: 16368-row chunks 49.5 / 60.6 ms, 4092 rows 45.7 / 52.6, 2046 rows
# 40.4 / 52.8, 1023 rows 53.1 (two runs); the bench's 2-256-256-784 + RBF decoder (3564-row
# chunks before): curve_energy forward 43.7 -> 41.4 ms, forward+backward 108.5 -> 100.2 ms.
_CPU_CHUNK_ROWS = 2048


# Points x widest row (a layer, or the features beside the RBF sigmas) up to which _curve_native
# runs on CPU as one C++ call (latentfast_cpp::curve_energy_small: the operations of one chunk
# below, in the same order, without a Python call per operation and with fresh buffers instead
# of the pool's); e.g. 41 curves of 33 points at width 192 (the geodesics_1000 decoder). Geodesic
# solves on that decoder, paired against the chunk loop (2-core Intel Xeon, 2026-12-06): 1 pair
# 1.33-1.37x, 2 pairs 1.35-1.39x, 8 pairs 1.23-1.30x, 32 pairs 1.24-1.26x, 200 and 1000 pairs
# 1.03-1.06x and 1.01-1.08x (as their working sets shrink); the curves equal bit for bit.
# _SMALL_PATH = False sends every call through the chunk loop.
_SMALL_ELEMS = 1 << 18
_SMALL_PATH = True


def _widest_row(weights, wr) -> int:
    """The widest row per point of the curve pipelines' layers and features (the last layer's
    outputs and, with the RBF network, its D sigmas beside them)."""
    widest = max(w.shape[0] for w in weights)
    return widest if wr is None else max(widest, weights[-1].shape[0] + wr.shape[0])


def _curves_per_chunk(t1: int, d: int, weights, centres, wr, cpu: bool = False) -> int:
    """Curves per chunk: t1 rows each of the widest row a chunk forms (_widest_row, plus the
    [K, d] differences to the centres with the RBF network); on CPU at most _CPU_CHUNK_ROWS
    rows."""
    widest = _widest_row(weights, wr) + (centres.shape[0] * d if centres is not None else 0)
    per_chunk = _CHUNK_ELEMS // (t1 * widest)
    if cpu:
        per_chunk = min(per_chunk, _CPU_CHUNK_ROWS // t1)
    return max(1, per_chunk)


def _curve_native(k, curves: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                  centres: Tensor | None, lam: Tensor | None, wr: Tensor | None, zeta: float,
                  grad_energy: Tensor | None, grad_length: Tensor | None,
                  saved: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Energies, lengths and (given grad_energy/grad_length) the gradient wrt the curves,
    chunk by chunk. With `saved` = (flat act'(a) buffer of B (T+1) sum(H_l), features
    [B (T+1), F]), each chunk's activations are stored there for a later backward."""
    b_all, t1, d = curves.shape
    weights, biases = _energy_layers(weights, biases, acts)
    want = grad_energy is not None or grad_length is not None
    small = b_all * t1 * _widest_row(weights, wr) <= _SMALL_ELEMS
    if k is torch.ops.latentfast_cpp and saved is None and _SMALL_PATH and small:
        # few points: the whole pipeline in one C++ call, no Python per operation
        e, ln, g = k.curve_energy_small(curves, weights, biases, acts, centres, lam, wr, zeta, grad_energy,
                                        grad_length)
        return e, ln, (g if want else None)
    per_chunk = _curves_per_chunk(t1, d, weights, centres, wr, curves.device.type == "cpu")
    energy = curves.new_empty(b_all)
    length = curves.new_empty(b_all)
    grad = torch.empty_like(curves) if want else None
    views = _deriv_views(saved[0], b_all * t1, [w.shape[0] for w in weights]) if saved is not None else None
    pool = _scratch_for(curves)
    for s in range(0, b_all, per_chunk):
        zc = curves[s:s + per_chunk]
        bc = zc.shape[0]
        p = bc * t1
        zf = zc.reshape(p, d)
        rows = slice(s * t1, s * t1 + p)
        feats, derivs = _mlp_forward_chunk(k, zf, weights, biases, acts, centres, lam, wr, zeta,
                                           [v[rows] for v in views] if views else None,
                                           saved[1][rows] if saved is not None else None, pool)
        ge = grad_energy[s:s + per_chunk] if grad_energy is not None else None
        gl = grad_length[s:s + per_chunk] if grad_length is not None else None
        e, ln, gg = _reduce(k, feats.view(bc, t1, -1), ge, gl, pool)
        energy[s:s + per_chunk] = e
        length[s:s + per_chunk] = ln
        if want:
            gz = _features_backward(k, gg.view(p, -1), zf, feats, derivs, weights, centres, lam, wr, pool)
            grad[s:s + per_chunk] = gz.view(bc, t1, d)
    return energy, length, grad


def _curve_backward_saved(k, grad_energy: Tensor, grad_length: Tensor, curves: Tensor, derivs_flat: Tensor,
                          feats_all: Tensor, weights, centres, lam, wr) -> Tensor:
    """The gradient wrt the curves from the activations saved by _curve_native."""
    b_all, t1, d = curves.shape
    per_chunk = _curves_per_chunk(t1, d, weights, centres, wr, curves.device.type == "cpu")
    views = _deriv_views(derivs_flat, b_all * t1, [w.shape[0] for w in weights])
    grad = torch.empty_like(curves)
    pool = _scratch_for(curves)
    for s in range(0, b_all, per_chunk):
        zc = curves[s:s + per_chunk]
        bc = zc.shape[0]
        p = bc * t1
        rows = slice(s * t1, s * t1 + p)
        derivs, feats = [v[rows] for v in views], feats_all[rows]
        _, _, gg = _reduce(k, feats.reshape(bc, t1, -1), grad_energy[s:s + per_chunk],
                           grad_length[s:s + per_chunk], pool)
        gz = _features_backward(k, gg.view(p, -1), zc.reshape(p, d), feats, derivs, weights, centres, lam, wr,
                                pool)
        grad[s:s + per_chunk] = gz.view(bc, t1, d)
    return grad


# ------------------------------------------------------------------ pullback_metric

def _rbf_args(c, lam, wr):
    return (c, lam, wr) if c is not None else (None, None, None)


@torch.library.custom_op("latentfast::pullback_metric", mutates_args=())
def _pullback_metric(z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                     rbf_centres: Tensor | None, rbf_lambda: Tensor | None, rbf_weight: Tensor | None,
                     zeta: float) -> Tensor:
    reject_tangents("pullback_metric", z, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    _check_rbf_args("pullback_metric", z, rbf_centres, rbf_lambda, rbf_weight)
    be = backend.select(z.device)
    if be == "reference":
        return ref.pullback_metric(z, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight,
                                   zeta).contiguous()
    return _metric_native(_native(be), z, weights, biases, acts, rbf_centres, rbf_lambda,
                          rbf_weight, zeta)


@_pullback_metric.register_fake
def _(z, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta):
    return z.new_empty((z.shape[0], z.shape[1], z.shape[1]))


def _save_all(ctx, inputs, output):
    z, weights, biases, acts, c, lam, wr, zeta = inputs
    ctx.acts, ctx.zeta, ctx.n_layers, ctx.has_rbf = list(acts), zeta, len(weights), c is not None
    rbf = [c, lam, wr] if c is not None else []
    ctx.wants = [t.requires_grad for t in [z, *weights, *biases, *rbf]]
    ctx.save_for_backward(z, *weights, *biases, *rbf)


def _unpack(ctx):
    saved = list(ctx.saved_tensors)
    nl = ctx.n_layers
    z, weights, biases = saved[0], saved[1:1 + nl], saved[1 + nl:1 + 2 * nl]
    rbf = saved[1 + 2 * nl:] if ctx.has_rbf else [None, None, None]
    return z, weights, biases, rbf


def _reference_vjp(ctx, fn, grads_out):
    """Gradients of the reference `fn` wrt every saved input that requires grad (torch autograd
    on recomputed values), in the op's input structure; built as a graph of the saved inputs
    under create_graph=True (see ops/_autograd.py)."""
    z, weights, biases, rbf = _unpack(ctx)
    return reference_vjp(fn, (z, list(weights), list(biases), ctx.acts, *rbf, ctx.zeta), grads_out,
                         create_graph=graph_wanted(grads_out, z, weights, biases, rbf))


@op_backward
def _pullback_metric_bwd(ctx, grad):
    # Second derivatives of the decoder: torch autograd through the reference (the metric
    # backward is needed for geodesic shooting and metric-form energies, not the hot path).
    return _reference_vjp(ctx, ref.pullback_metric, (grad,))


_pullback_metric.register_autograd(_pullback_metric_bwd, setup_context=_save_all)


# ------------------------------------------------------------------ curve_energy

def _curve_impl(curves, weights, biases, acts, c, lam, wr, zeta, grad_energy, grad_length):
    be = backend.select(curves.device)
    if be == "reference":
        e, ln = ref.curve_energy(curves, weights, biases, acts, c, lam, wr, zeta)
        grad = None
        if grad_energy is not None or grad_length is not None:
            zeros = curves.new_zeros(curves.shape[0])
            grad = ref.curve_energy_backward(grad_energy if grad_energy is not None else zeros,
                                             grad_length if grad_length is not None else zeros,
                                             curves, weights, biases, acts, c, lam, wr, zeta)
        return e, ln, grad
    return _curve_native(_native(be), curves, weights, biases, acts, c, lam, wr, zeta,
                         grad_energy, grad_length)


@torch.library.custom_op("latentfast::curve_energy", mutates_args=())
def _curve_energy(curves: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                  rbf_centres: Tensor | None, rbf_lambda: Tensor | None, rbf_weight: Tensor | None,
                  zeta: float) -> tuple[Tensor, Tensor]:
    reject_tangents("curve_energy", curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    _check_rbf_args("curve_energy", curves, rbf_centres, rbf_lambda, rbf_weight)
    e, ln, _ = _curve_impl(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta,
                           None, None)
    return e, ln


@torch.library.custom_op("latentfast::curve_energy_backward", mutates_args=())
def _curve_energy_backward(grad_energy: Tensor, grad_length: Tensor, curves: Tensor,
                           weights: list[Tensor], biases: list[Tensor], acts: list[int],
                           rbf_centres: Tensor | None, rbf_lambda: Tensor | None,
                           rbf_weight: Tensor | None, zeta: float) -> Tensor:
    reject_tangents("curve_energy_backward", grad_energy, grad_length, curves, weights, biases, acts, rbf_centres,
                    rbf_lambda, rbf_weight, zeta)
    return _curve_impl(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta,
                       grad_energy, grad_length)[2]


@_curve_energy.register_fake
def _(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta):
    return curves.new_empty(curves.shape[0]), curves.new_empty(curves.shape[0])


@_curve_energy_backward.register_fake
def _(grad_energy, grad_length, curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta):
    return curves.new_empty(curves.shape)


@op_backward
def _curve_energy_bwd(ctx, grad_energy, grad_length):
    z, weights, biases, rbf = _unpack(ctx)
    # decoder parameters want gradients, or create_graph=True: autograd through the reference
    if any(ctx.wants[1:]) or graph_wanted(grad_energy, grad_length, z):
        return _reference_vjp(ctx, ref.curve_energy, (grad_energy, grad_length))
    ge = grad_energy if grad_energy is not None else z.new_zeros(z.shape[0])
    gl = grad_length if grad_length is not None else z.new_zeros(z.shape[0])
    gz = _curve_energy_backward(ge, gl, z, weights, biases, ctx.acts, *rbf, ctx.zeta)
    nl = ctx.n_layers
    return gz, [None] * nl, [None] * nl, None, None, None, None, None


_curve_energy.register_autograd(_curve_energy_bwd, setup_context=_save_all)


# curve_energy under autograd (native backends): the forward keeps act'(a) and the
# features so the backward does not recompute the decoder.

def _feature_width(weights: list[Tensor], acts: list[int], wr: Tensor | None) -> int:
    return _energy_widths(weights, acts)[-1] + (wr.shape[0] if wr is not None else 0)


@torch.library.custom_op("latentfast::curve_energy_train", mutates_args=())
def _curve_energy_train(curves: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                        rbf_centres: Tensor | None, rbf_lambda: Tensor | None, rbf_weight: Tensor | None,
                        zeta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    reject_tangents("curve_energy_train", curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    _check_rbf_args("curve_energy_train", curves, rbf_centres, rbf_lambda, rbf_weight)
    be = backend.select(curves.device)
    if be == "reference":
        raise RuntimeError("curve_energy_train runs on the cpp and triton backends only "
                           "(the reference uses latentfast::curve_energy)")
    n = curves.shape[0] * curves.shape[1]
    derivs = curves.new_empty(n * sum(_energy_widths(weights, acts)))
    feats = curves.new_empty((n, _feature_width(weights, acts, rbf_weight)))
    e, ln, _ = _curve_native(_native(be), curves, weights, biases, acts, rbf_centres, rbf_lambda,
                             rbf_weight, zeta, None, None, (derivs, feats))
    return e, ln, derivs, feats


def _check_rbf_args(op: str, x: Tensor, centres: Tensor | None, lam: Tensor | None, wr: Tensor | None) -> None:
    """The RBF variance network's tensors of a direct op call: all three or none, centres
    [K, d] for points x [..., d], lam [K], wr [D, K], of x's dtype and device. The C++
    kernels check the same; the reference and Triton paths run torch ops that would broadcast
    centres of another latent dimension or a single bandwidth, silently."""
    if centres is None and lam is None and wr is None:
        return
    if centres is None or lam is None or wr is None:
        raise ValueError(f"{op}: rbf_centres, rbf_lambda and rbf_weight go together (all three or none)")
    check_rank(op, rbf_centres=(centres, 2), rbf_lambda=(lam, 1), rbf_weight=(wr, 2))
    k = centres.shape[0]
    check_args(op, x, rbf_centres=(centres, (k, x.shape[-1])), rbf_lambda=(lam, (k,)),
               rbf_weight=(wr, (wr.shape[0], k)))


def _check_saved(grad_energy: Tensor, grad_length: Tensor, curves: Tensor, derivs: Tensor, feats: Tensor,
                 weights: list[Tensor], acts: list[int], rbf_centres: Tensor | None, rbf_lambda: Tensor | None,
                 rbf_weight: Tensor | None) -> None:
    """Shapes and dtypes of the saved activations and the RBF network against the curves and
    the decoder (the backward takes views of them by these sizes: a direct call with tensors
    of another forward would otherwise read them in the wrong layout, and the Triton path's
    torch ops would broadcast RBF centres of another latent dimension)."""
    if curves.dim() != 3 or not weights or len(acts) != len(weights):
        raise ValueError("curve_energy_train_backward: curves must be [B, T+1, d], with one activation per weight")
    _check_rbf_args("curve_energy_train_backward", curves, rbf_centres, rbf_lambda, rbf_weight)
    b, p = curves.shape[0], curves.shape[0] * curves.shape[1]
    check_args("curve_energy_train_backward", curves, grad_energy=(grad_energy, (b,)), grad_length=(grad_length, (b,)),
               derivs=(derivs, (p * sum(_energy_widths(weights, acts)),)),
               feats=(feats, (p, _feature_width(weights, acts, rbf_weight))))


@torch.library.custom_op("latentfast::curve_energy_train_backward", mutates_args=())
def _curve_energy_train_backward(grad_energy: Tensor, grad_length: Tensor, curves: Tensor,
                                 derivs: Tensor, feats: Tensor, weights: list[Tensor], acts: list[int],
                                 rbf_centres: Tensor | None, rbf_lambda: Tensor | None,
                                 rbf_weight: Tensor | None) -> Tensor:
    reject_tangents("curve_energy_train_backward", grad_energy, grad_length, curves, derivs, feats, weights, acts,
                    rbf_centres, rbf_lambda, rbf_weight)
    be = backend.select(curves.device)
    if be == "reference":
        raise RuntimeError("curve_energy_train_backward runs on the cpp and triton backends only")
    _check_saved(grad_energy, grad_length, curves, derivs, feats, weights, acts, rbf_centres, rbf_lambda, rbf_weight)
    weights = _energy_weights(weights, acts)  # the layers the forward ran
    # (contiguous: the kernels read the saved rows in place; autograd passes them as they were made)
    return _curve_backward_saved(_native(be), grad_energy, grad_length, curves, derivs.contiguous(), feats.contiguous(),
                                 weights, rbf_centres, rbf_lambda, rbf_weight)


@_curve_energy_train.register_fake
def _(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta):
    b, t1 = curves.shape[0], curves.shape[1]
    return (curves.new_empty(b), curves.new_empty(b),
            curves.new_empty(b * t1 * sum(_energy_widths(weights, acts))),
            curves.new_empty((b * t1, _feature_width(weights, acts, rbf_weight))))


@_curve_energy_train_backward.register_fake
def _(grad_energy, grad_length, curves, derivs, feats, weights, acts, rbf_centres, rbf_lambda, rbf_weight):
    return curves.new_empty(curves.shape)


def _save_train(ctx, inputs, output):
    curves, weights, biases, acts, c, lam, wr, zeta = inputs
    ctx.n_layers, ctx.has_rbf, ctx.acts, ctx.zeta = len(weights), c is not None, acts, zeta
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs
    # (the biases only for a double backward)
    ctx.save_for_backward(curves, output[2], output[3], *weights, *biases, *([c, lam, wr] if c is not None else []))


@op_backward
def _curve_energy_train_bwd(ctx, grad_energy, grad_length, _grad_derivs, _grad_feats):
    curves, derivs, feats, *rest = ctx.saved_tensors
    nl = ctx.n_layers
    weights, biases = list(rest[:nl]), list(rest[nl:2 * nl])
    rbf = rest[2 * nl:] if ctx.has_rbf else [None, None, None]
    if graph_wanted(grad_energy, grad_length, curves, weights, biases, rbf):  # see ops/_autograd.py
        return reference_vjp(ref.curve_energy, (curves, weights, biases, ctx.acts, *rbf, ctx.zeta),
                             (grad_energy, grad_length))
    zeros = curves.new_zeros(curves.shape[0])
    gz = _curve_energy_train_backward(grad_energy if grad_energy is not None else zeros,
                                      grad_length if grad_length is not None else zeros,
                                      curves, derivs, feats, weights, ctx.acts, *rbf)
    return gz, [None] * nl, [None] * nl, None, None, None, None, None


_curve_energy_train.register_autograd(_curve_energy_train_bwd, setup_context=_save_train)


# ------------------------------------------------------------------ public functional API

def check_mlp(x: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
              rbf_centres: Tensor | None, rbf_lambda: Tensor | None, rbf_weight: Tensor | None,
              zeta: float) -> None:
    """Raise TypeError/ValueError unless the tensors describe an MLP decoder of x[..., d]."""
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights and biases must be lists of tensors")
    if not weights or len(weights) != len(biases) or len(acts) != len(weights):
        raise ValueError(f"need one weight, bias and activation per layer, got {len(weights)}, "
                         f"{len(biases)}, {len(acts)}")
    width = x.shape[-1]
    for i, (w, b, a) in enumerate(zip(weights, biases, acts)):
        check_tensor(f"weights[{i}]", w, 2, like=x)
        check_tensor(f"biases[{i}]", b, 1, like=x)
        if i == 0 and w.shape[1] != width:
            raise ValueError(f"the decoder takes latent points of dimension {w.shape[1]} (weights[0] is "
                             f"{tuple(w.shape)}), got points of dimension {width}")
        if w.shape[1] != width:
            raise ValueError(f"weights[{i}] must have {width} columns, got shape {tuple(w.shape)}")
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"biases[{i}] must have {w.shape[0]} entries, got {b.shape[0]}")
        if int(a) not in ref.ACT_NAMES:
            raise ValueError(f"acts[{i}] = {a} is not an activation code {ref.ACTIVATIONS}")
        width = w.shape[0]
    given = [t is not None for t in (rbf_centres, rbf_lambda, rbf_weight)]
    if any(given) and not all(given):
        raise ValueError("rbf_centres, rbf_lambda and rbf_weight go together (all or none)")
    if all(given):
        check_tensor("rbf_centres", rbf_centres, 2, like=x)
        k = rbf_centres.shape[0]
        if rbf_centres.shape[1] != x.shape[-1]:
            raise ValueError(f"rbf_centres must be [K, {x.shape[-1]}], got {tuple(rbf_centres.shape)}")
        check_tensor("rbf_lambda", rbf_lambda, 1, like=x)
        check_tensor("rbf_weight", rbf_weight, 2, like=x)
        if rbf_lambda.shape[0] != k or tuple(rbf_weight.shape) != (width, k):
            raise ValueError(f"rbf_lambda must be [{k}] and rbf_weight [{width}, {k}], got "
                             f"{tuple(rbf_lambda.shape)} and {tuple(rbf_weight.shape)}")
        if not zeta > 0:
            raise ValueError(f"zeta must be > 0 (it bounds sigma), got {zeta}")


@float32_under_autocast
def pullback_metric(z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                    rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                    rbf_weight: Tensor | None = None, zeta: float = 0.0) -> Tensor:
    """Pull-back metric M(z) = J_mu^T J_mu (+ J_sigma^T J_sigma) of an MLP decoder.

    Args:
        z: latent points [N, d].
        weights, biases, acts: the mean network, layer l computes act_l(W_l h + b_l);
            acts are codes from latentfast.reference.geometry.ACTIVATIONS.
        rbf_centres [K, d], rbf_lambda [K], rbf_weight [D, K] (non-negative), zeta > 0:
            the optional RBF variance network, sigma(z) = (rbf_weight v(z) + zeta)^-1/2.
    Returns: M [N, d, d], symmetric positive semi-definite.

    Example:
        >>> w = [torch.randn(8, 2), torch.randn(5, 8)]; b = [torch.zeros(8), torch.zeros(5)]
        >>> pullback_metric(torch.randn(4, 2), w, b, [1, 0]).shape
        torch.Size([4, 2, 2])
    """
    check_tensor("z", z, 2)
    check_mlp(z, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    check_finite("z", z)
    args = (z, list(weights), list(biases), [int(a) for a in acts], *_rbf_args(rbf_centres, rbf_lambda, rbf_weight),
            float(zeta))
    if under_transform(args):  # forward-mode AD or torch.func: the reference (ops/_autograd.py)
        return ref.pullback_metric(*args)
    return _pullback_metric(*args)


def _check_curves(curves: Tensor) -> None:
    check_tensor("curves", curves, 3)
    if curves.shape[1] < 2:
        raise ValueError(f"curves must be [B, T+1, d] with T >= 1, got {tuple(curves.shape)}")
    check_finite("curves", curves)


@float32_under_autocast
def curve_energy(curves: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                 rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                 rbf_weight: Tensor | None = None, zeta: float = 0.0) -> tuple[Tensor, Tensor]:
    """Energy T * sum_t ||g(z_{t+1}) - g(z_t)||^2 and length sum_t ||.|| of B discretised
    curves [B, T+1, d] under the decoder's feature map g = cat(mu, sigma) (mu alone without
    the RBF network). Differentiable; returns (energy [B], length [B])."""
    _check_curves(curves)
    check_mlp(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    args = (curves, list(weights), list(biases), [int(a) for a in acts],
            *_rbf_args(rbf_centres, rbf_lambda, rbf_weight), float(zeta))
    params = [*weights, *biases, *[t for t in (rbf_centres, rbf_lambda, rbf_weight) if t is not None]]
    if under_transform(curves, params):  # forward-mode AD or torch.func: the reference (ops/_autograd.py)
        return ref.curve_energy(*args)
    if (torch.is_grad_enabled() and curves.requires_grad and not any(t.requires_grad for t in params)
            and not torch.compiler.is_compiling() and backend.select(curves.device) != "reference"):
        # Training-style call: keep the decoder activations for the backward (memory
        # B (T+1) x (sum of layer widths + features)) instead of recomputing them. (Not while
        # torch.compile traces: the backend is picked in Python, which a trace cannot follow,
        # and the train op has no reference form; the graph takes curve_energy, whose backward
        # recomputes them.)
        e, ln, _, _ = _curve_energy_train(*args)
        return e, ln
    return _curve_energy(*args)


@float32_under_autocast
def curve_energy_and_grad(curves: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                          rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                          rbf_weight: Tensor | None = None, zeta: float = 0.0
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(energy [B], length [B], d energy / d curves [B, T+1, d]) in one pass, without
    autograd: what a geodesic solver needs per iteration."""
    _check_curves(curves)
    check_mlp(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    if under_transform(curves, weights, biases, rbf_centres, rbf_lambda, rbf_weight):
        raise ValueError("curve_energy_and_grad runs without autograd and does not support forward-mode AD or "
                         "torch.func transforms; use curve_energy (differentiable) instead")
    args = (curves, list(weights), list(biases), [int(a) for a in acts],
            *_rbf_args(rbf_centres, rbf_lambda, rbf_weight), float(zeta))
    with torch.no_grad():
        if torch.compiler.is_compiling():
            # the fused pass picks its backend in Python, which a trace cannot follow: the
            # energy op and its backward op (two passes over the curves) in the graph instead
            e, ln = _curve_energy(*args)
            g = _curve_energy_backward(curves.new_ones(curves.shape[0]), curves.new_zeros(curves.shape[0]), *args)
        else:
            e, ln, g = _curve_impl(*args, curves.new_ones(curves.shape[0]), None)
    return e, ln, g


def curve_energy_and_grad_fn(like: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                             rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                             rbf_weight: Tensor | None = None, zeta: float = 0.0
                             ) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """curve_energy_and_grad for many calls with one decoder, as a solver makes: the decoder
    is checked against `like` (curves [B, T+1, d] of the shape past the batch, dtype and
    device to come) once; each call of the returned function on
    curves [b, T+1, d] checks only the curves (shape, dtype, device, finiteness). The same
    numbers as curve_energy_and_grad, without its per-call checks of every weight (a
    sizeable share of a call on a few curves). Under autocast or a torch.func transform it
    is curve_energy_and_grad itself, with the decoder bound."""
    _check_curves(like)
    check_mlp(like, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    weights, biases, acts = list(weights), list(biases), [int(a) for a in acts]
    rbf = _rbf_args(rbf_centres, rbf_lambda, rbf_weight)
    zeta = float(zeta)
    dev = like.device
    if torch.is_autocast_enabled(dev.type) or under_transform(like, weights, biases, *rbf):
        return lambda curves: curve_energy_and_grad(curves, weights, biases, acts, *rbf, zeta)
    shape, dtype = tuple(like.shape[1:]), like.dtype

    def call(curves: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if curves.dim() != 3 or tuple(curves.shape[1:]) != shape or curves.dtype != dtype or curves.device != dev:
            raise ValueError(f"curves must be [B, {shape[0]}, {shape[1]}] {dtype} on {dev} (the shape this "
                             f"function was made for), got {tuple(curves.shape)} {curves.dtype} on {curves.device}")
        check_finite("curves", curves)
        ones = curves.new_ones(curves.shape[0])
        with torch.no_grad():
            return _curve_impl(curves, weights, biases, acts, *rbf, zeta, ones, None)
    return call


# Direct calls (torch.ops.latentfast.*) under forward-mode AD / torch.func: ops/_autograd.py.
route_transforms(_pullback_metric, _curve_energy, _curve_energy_backward)
route_transforms(_curve_energy_train, _curve_energy_train_backward, reference=False)
