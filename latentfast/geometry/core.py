"""Riemannian geometry of a decoder's latent space ("Latent Space Oddity", Arvanitidis et al.).

Every function takes a `decoder`:
- a latentfast.vae.GaussianMLPDecoder, an MLPParams, or an nn.Sequential of nn.Linear and
  Tanh/Softplus/ELU/Sigmoid/Identity layers: the fused latentfast ops run (reference, C++
  or Triton backend);
- any other callable f(z [N, d]) -> [N, D] (curves' points reach it as rows [N, d]): the
  generic path (torch.func Jacobians and autograd), correct for any differentiable decoder,
  only slower.
The decoder is held fixed: results are differentiable with respect to the latent points and
curves, never the decoder's parameters (detached on both paths: an nn.Module decoder, or a
method of one, runs with its parameters detached; a plain function's own tensors are used
as they are). For a loss on the decoder's parameters (a metric regulariser, say), call the
ops with live parameters: latentfast.ops.geometry.pullback_metric(z, *decoder.mlp_params().args()).
The metric is the pull-back M(z) = J_g(z)^T J_g(z) of the feature map g (cat(mu, sigma) for
a decoder with an RBF variance network, else its mean). An nn.Module decoder (or a method of
one) runs in eval mode inside these functions, whatever mode it is in (dropout off, batch norm
from its running statistics, which are left as they are), its modules' own modes restored
after: the geometry is that of the decoder's deterministic map. An nn.Sequential's dropout
layers are the identity there, so such a decoder takes the fused path.

As torch.nn layers do, every function that takes a batch (points [B, d], curves
[B, T+1, d], pairs of end points) also takes one item without the batch dimension (a point
[d], a curve [T+1, d]) and returns its result without it too. The point-set functions
(distance_matrix, knn, riemannian_kmeans, knn_predict) take sets [n, d] only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentfast.data._cpu import draw_device
from latentfast.ops import geometry as ops
from latentfast.ops._checks import can_read_back, check_finite, check_finite_together, check_tensor
from latentfast.reference import geometry as ref
from latentfast.vae.decoders import GaussianMLPDecoder, MLPParams

_ACT_MODULES = {nn.Identity: 0, nn.Tanh: 1, nn.Softplus: 2, nn.ELU: 3, nn.Sigmoid: 4}


def as_mlp(decoder) -> MLPParams | None:
    """The fused-op description of `decoder` (parameters detached), or None when the decoder
    is not an MLP the fused ops cover (then the generic path is used)."""
    if isinstance(decoder, MLPParams):
        if not any(t is not None and t.requires_grad for t in (*decoder.weights, *decoder.biases, decoder.rbf_centres,
                                                               decoder.rbf_lambda, decoder.rbf_weight)):
            return decoder  # already detached (e.g. as_mlp's own result): nothing to redo per call
        p = decoder
    elif isinstance(decoder, GaussianMLPDecoder):
        p = decoder.mlp_params()
    elif isinstance(decoder, nn.Sequential):
        weights, biases, acts = [], [], []
        for m in decoder:
            if isinstance(m, nn.Linear):
                if weights and len(acts) < len(weights):
                    acts.append(0)
                weights.append(m.weight)
                biases.append(m.bias if m.bias is not None else m.weight.new_zeros(m.out_features))
            elif isinstance(m, nn.modules.dropout._DropoutNd):
                continue  # the identity in eval mode, where the geometry runs the decoder
            elif type(m) in _ACT_MODULES and len(acts) < len(weights):
                if isinstance(m, nn.Softplus) and m.beta != 1:
                    return None
                if isinstance(m, nn.ELU) and m.alpha != 1.0:
                    return None
                acts.append(_ACT_MODULES[type(m)])
            else:
                return None
        if not weights:
            return None
        acts += [0] * (len(weights) - len(acts))
        p = MLPParams(weights, biases, acts)
    else:
        return None
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    return MLPParams([w.detach() for w in p.weights], [b.detach() for b in p.biases], list(p.acts),
                     det(p.rbf_centres), det(p.rbf_lambda), det(p.rbf_weight), p.zeta)


class _FixedParams(nn.Module):
    """Calls fn (an nn.Module, or a method of one: `owner`) so that torch.func.functional_call
    can swap owner's parameters for detached ones (the decoder is held fixed, as on the fused
    path)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, z: Tensor) -> Tensor:
        return self.fn(z)


@contextlib.contextmanager
def _eval_mode(module: nn.Module | None):
    """module and its submodules in eval mode inside the block, the ones in training mode set
    back after it (a decoder's geometry is that of its deterministic map)."""
    training = [m for m in module.modules() if m.training] if isinstance(module, nn.Module) else []
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _feature_fn(decoder) -> Callable[[Tensor], Tensor]:
    """g(z) for any decoder (used by the generic path and the exponential map)."""
    p = as_mlp(decoder)
    if p is not None:
        return lambda z: ref.features(z, *p.args())
    if isinstance(decoder, GaussianMLPDecoder):  # pragma: no cover - as_mlp covers it
        return decoder.features
    if not callable(decoder):
        raise TypeError(f"decoder must be a GaussianMLPDecoder, MLPParams, nn.Sequential or a "
                        f"callable z -> features, got {type(decoder).__name__}")
    if isinstance(getattr(decoder, "decoder", None), GaussianMLPDecoder):  # a VAE: calling it is its loss
        raise TypeError(f"decoder is a {type(decoder).__name__}, whose call is its training loss: pass its "
                        f"decoder (model.decoder), the map the latent geometry is of")

    owner = decoder if isinstance(decoder, nn.Module) else getattr(decoder, "__self__", None)
    if isinstance(owner, nn.Module) and any(True for _ in owner.parameters()):
        call = _FixedParams(decoder, owner)
        fixed = {f"owner.{k}": v.detach() for k, v in owner.named_parameters()}
        run = lambda z: torch.func.functional_call(call, fixed, (z,))  # noqa: E731
    else:
        run = decoder

    def features(z: Tensor) -> Tensor:
        # points of curves [B, T+1, d] go to the decoder as rows [B (T+1), d], the [N, d] it
        # takes (a BatchNorm1d reads a 3-D input as [N, C, L])
        flat = z.reshape(-1, z.shape[-1])
        with _eval_mode(owner):
            g = run(flat)
        if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[0] != flat.shape[0]:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"a decoder callable must map latent points [N, d] to features [N, D]; for "
                             f"points {tuple(flat.shape)} it returned {got}")
        return g.reshape(*z.shape[:-1], g.shape[-1])
    return features


def _decoder_fixed(decoder) -> contextlib.AbstractContextManager:
    """For the iterations of our own solvers, where the decoder cannot change: an MLP
    decoder's QR-cached last layer is checked once (ops.geometry.last_layer_fixed), not on
    every call; a no-op for other decoders."""
    p = as_mlp(decoder)
    return ops.last_layer_fixed(p.weights, p.acts) if p is not None else contextlib.nullcontext()


def _check_points(name: str, z: Tensor, like: Tensor | None = None) -> None:
    check_tensor(name, z, 2, like=like)
    check_finite(name, z)


def _check_points_and_velocities(z: Tensor, v: Tensor) -> None:
    """_check_points of z and v with one read-back for both (one synchronisation on a GPU)."""
    check_tensor("z", z, 2)
    check_tensor("v", v, 2, like=z)
    check_finite_together([("z", z), ("v", v)])


def _check_for_decoder(z: Tensor, decoder) -> None:
    """For an MLP decoder (as_mlp), raise TypeError/ValueError unless z [..., d] has the
    decoder's latent dimension, dtype and device (ops.check_mlp, what the fused ops check; the
    paths that run plain PyTorch on the decoder's tensors had failed inside a matrix product)."""
    p = as_mlp(decoder)
    if p is not None:
        ops.check_mlp(z, *p.args())


def _check_pair_tensors(z0: object, z1: object) -> None:
    check_tensor("z0", z0)
    check_tensor("z1", z1, like=z0)
    if z0.dim() != z1.dim():
        raise ValueError(f"z0 and z1 must have the same shape ([B, d], or [d] both for one pair), got "
                         f"{tuple(z0.shape)} and {tuple(z1.shape)}")


def _unbatched(t: object, batched_dim: int) -> bool:
    """Whether t is one item without its batch dimension: a point [d] where points [B, d] go
    (batched_dim 2), a curve [T+1, d] where curves [B, T+1, d] go (3)."""
    return isinstance(t, Tensor) and t.dim() == batched_dim - 1


def metric(decoder, z: Tensor) -> Tensor:
    """Pull-back metric M(z) [N, d, d] at latent points z [N, d] ([d, d] at one point [d])."""
    if _unbatched(z, 2):
        return metric(decoder, z[None])[0]
    _check_points("z", z)
    p = as_mlp(decoder)
    if p is not None:
        return ops.pullback_metric(z, *p.args())
    f = _feature_fn(decoder)
    jac = torch.func.vmap(torch.func.jacfwd(lambda x: f(x[None])[0]))(z)
    return jac.transpose(1, 2) @ jac


def volume_measure(decoder, z: Tensor) -> Tensor:
    """Riemannian volume measure sqrt(det M(z)) [N] (how much the decoder stretches there);
    a 0-dim tensor at one point [d]."""
    return torch.linalg.det(metric(decoder, z)).clamp_min(0).sqrt()


def _energy_length(decoder, curves: Tensor) -> tuple[Tensor, Tensor]:
    check_tensor("curves", curves, 3)
    if curves.shape[1] < 2:
        raise ValueError(f"curves must be [B, T+1, d] with T >= 1, got {tuple(curves.shape)}")
    p = as_mlp(decoder)
    if p is not None:
        return ops.curve_energy(curves, *p.args())
    check_finite("curves", curves)
    g = _feature_fn(decoder)(curves)
    sq = ((g[:, 1:] - g[:, :-1]) ** 2).sum(-1)
    return (curves.shape[1] - 1) * sq.sum(1), sq.sqrt().sum(1)


def _metric_energy_length(decoder, curves: Tensor) -> tuple[Tensor, Tensor]:
    check_tensor("curves", curves, 3)
    if curves.shape[1] < 2:
        raise ValueError(f"curves must be [B, T+1, d] with T >= 1, got {tuple(curves.shape)}")
    return ref.curve_energy_metric(curves, lambda z: metric(decoder, z))


_MODES = ("features", "metric")


def _by_mode(decoder, curves: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    if _unbatched(curves, 3):
        energy, length = _by_mode(decoder, curves[None], mode)
        return energy[0], length[0]
    if mode == "features":
        return _energy_length(decoder, curves)
    if mode == "metric":
        return _metric_energy_length(decoder, curves)
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def curve_energy(decoder, curves: Tensor, mode: str = "features") -> Tensor:
    """Discretised energy of curves [B, T+1, d], [B] (0-dim for one curve [T+1, d]).
    Differentiable.

    mode="features": T * sum_t ||g(z_{t+1}) - g(z_t)||^2 (decoder outputs, fused op);
    mode="metric": T * sum_t dz_t^T M(z_mid) dz_t with the metric at segment midpoints
    (the two agree as T grows; "metric" needs no decoder output differences).
    """
    return _by_mode(decoder, curves, mode)[0]


def curve_length(decoder, curves: Tensor, mode: str = "features") -> Tensor:
    """Discretised length of curves [B, T+1, d], [B] (0-dim for one curve [T+1, d]):
    sum_t ||g(z_{t+1}) - g(z_t)||, or sum_t sqrt(dz_t^T M(z_mid) dz_t) with mode="metric"."""
    return _by_mode(decoder, curves, mode)[1]


def energy_and_grad(decoder, curves: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(energy [B], length [B], d energy / d curves [B, T+1, d]), fused for MLP decoders; by
    autograd for other decoders, also under torch.no_grad and torch.inference_mode (an
    inference tensor is copied first: autograd cannot save one). One curve [T+1, d] gives
    (energy [], length [], gradient [T+1, d])."""
    if _unbatched(curves, 3):
        energy, length, grad = energy_and_grad(decoder, curves[None])
        return energy[0], length[0], grad[0]
    p = as_mlp(decoder)
    if p is not None:
        return ops.curve_energy_and_grad(curves, *p.args())
    with torch.inference_mode(False), torch.enable_grad():
        leaf = (curves.clone() if curves.is_inference() else curves.detach()).requires_grad_(True)
        e, ln = _energy_length(decoder, leaf)
        g = torch.autograd.grad(e.sum(), leaf)[0]
    return e.detach(), ln.detach(), g


# ------------------------------------------------------------------ geodesics

@dataclasses.dataclass
class GeodesicResult:
    """curves [B, T+1, d] (end points included), lengths and energies [B], converged [B]
    (bool), iterations [B] (L-BFGS iterations each pair ran). For one pair given as [d]
    points, the same without the B dimension: curves [T+1, d], the others 0-dim."""

    curves: Tensor
    lengths: Tensor
    energies: Tensor
    converged: Tensor
    iterations: Tensor


def _lbfgs_direction(g: Tensor, s: Tensor, y: Tensor, valid: Tensor, gamma: Tensor) -> Tensor:
    """H g per problem, H the L-BFGS inverse-Hessian estimate from the pairs (s_i, y_i) and
    H_0 = gamma I, in the compact form of Byrd, Nocedal and Schnabel (1994):

        H g = gamma g + S p1 - gamma Y u,  u = R^-1 S^T g,
        p1 = R^-T (D u + gamma Y^T Y u - gamma Y^T g),

    R the upper triangle of S^T Y (R_ij = s_i . y_j, i <= j, i older), D its diagonal. The
    same H as the two-loop recursion, in a fixed number of batched products and two
    triangular solves instead of two loops over the pairs.

    g [b, n]; s, y [b, m, n], oldest pair first; valid [b, m] (invalid rows are zero and
    take a unit diagonal in R, so they pass through as zeros); gamma [b].
    """
    if s.shape[1] == 0:
        return gamma[:, None] * g
    gc = g[..., None]
    a = (s @ gc)[..., 0]  # S^T g [b, m]
    c = (y @ gc)[..., 0]  # Y^T g
    sy = s @ y.transpose(1, 2)  # [b, m, m]: s_i . y_j
    r = sy.triu() + torch.diag_embed((~valid).to(g.dtype))
    u = torch.linalg.solve_triangular(r, a[..., None], upper=True)[..., 0]
    w = sy.diagonal(dim1=1, dim2=2) * u + gamma[:, None] * (((y @ y.transpose(1, 2)) @ u[..., None])[..., 0] - c)
    p1 = torch.linalg.solve_triangular(r.transpose(1, 2), w[..., None], upper=False)[..., 0]
    return gamma[:, None] * g + (s.transpose(1, 2) @ p1[..., None])[..., 0] \
        - gamma[:, None] * (y.transpose(1, 2) @ u[..., None])[..., 0]


class _TorchSteps:
    """The per-iteration work of _batched_lbfgs as PyTorch operations (any device; the
    specification of _CppSteps). Problems are rows: x, g, p [b, n]; f, step, slope [b];
    the pair histories s_hist, y_hist [b, h, n] are ring buffers, problem i's k-th stored
    pair (k = 0 .. count_i - 1, newest last) at slot k % h."""

    @staticmethod
    def direction(g: Tensor, s_hist: Tensor, y_hist: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """(p, slope): the quasi-Newton direction -H g (H_0 = gamma I, gamma = s.y / y.y of
        the newest pair, 1 / ||g|| without one), or -g where that is not a descent
        direction; slope = p.g."""
        history = s_hist.shape[1]
        dev = g.device
        # the pairs oldest first (m: the most pairs any problem has; a problem with fewer has
        # zero rows in front, masked)
        m = min(int(count.max()), history)
        k = torch.arange(m, device=dev)
        order = (count[:, None] - m + k) % history  # [b, m]; column m - 1 is the newest pair
        valid = k >= (m - count)[:, None]
        batch = torch.arange(g.shape[0], device=dev)[:, None]
        s_o, y_o = s_hist[batch, order], y_hist[batch, order]
        if m:
            s_n, y_n = s_o[:, -1], y_o[:, -1]
            yy = (y_n * y_n).sum(1)
            gamma = torch.where((count > 0) & (yy > 0), (s_n * y_n).sum(1) / yy.clamp_min(1e-300),
                                1.0 / g.norm(dim=1).clamp_min(1e-12))
        else:
            gamma = 1.0 / g.norm(dim=1).clamp_min(1e-12)
        p = -_lbfgs_direction(g, s_o, y_o, valid, gamma)
        p = torch.where(((p * g).sum(1) >= 0)[:, None], -g, p)  # not a descent direction: steepest
        return p, (p * g).sum(1)

    @staticmethod
    def trial(f_new: Tensor, g_new: Tensor, step: Tensor, searching: Tensor, ft: Tensor, gt: Tensor, f: Tensor,
              slope: Tensor, rows: Tensor | None) -> int:
        """Armijo test of the trial points of problems `rows` (all when None), objective ft
        and gradient gt there: passing ones take them into f_new, g_new and stop searching,
        failing ones halve their step (all in place). Returns how many still search."""
        if rows is None:  # every problem, by selects (no read-back)
            ok = ft <= f + 1e-4 * step * slope
            f_new.copy_(torch.where(ok, ft, f_new))
            g_new.copy_(torch.where(ok[:, None], gt, g_new))
            searching &= ~ok
            step.copy_(torch.where(ok, step, 0.5 * step))
            return int(searching.sum())
        ok = ft <= f[rows] + 1e-4 * step[rows] * slope[rows]
        f_new[rows[ok]], g_new[rows[ok]] = ft[ok], gt[ok]
        searching[rows[ok]] = False
        step[rows[~ok]] *= 0.5
        return int(searching.sum())

    @staticmethod
    def update(x: Tensor, s_hist: Tensor, y_hist: Tensor, count: Tensor, small: Tensor, iters: Tensor, f: Tensor,
               g: Tensor, f_new: Tensor, g_new: Tensor, p: Tensor, step: Tensor, searching: Tensor, tol: float
               ) -> tuple[Tensor, Tensor]:
        """After the line search: problems that moved step x by s = step p and store the
        pair (s, g_new - g) when its curvature s.y is positive; `small` counts consecutive
        iterations without a relative decrease above tol. Returns (x, done); the
        histories and counters are updated in place."""
        history = s_hist.shape[1]
        moved = ~searching
        s_new = step[:, None] * p
        y_new = g_new - g
        sy = (s_new * y_new).sum(1)
        kept = moved & (sy > 1e-12 * (s_new.norm(dim=1) * y_new.norm(dim=1)).clamp_min(1e-300))
        kr = kept.nonzero().squeeze(1)
        slot = count[kr] % history
        s_hist[kr, slot] = s_new[kr]
        y_hist[kr, slot] = y_new[kr]
        count += kept
        x = torch.where(moved[:, None], x + s_new, x)
        rel = (f - f_new) / f_new.abs().clamp_min(1e-30)
        small.copy_(torch.where(moved & (rel > tol), 0, small + 1))
        iters += 1
        return x, (small >= 2) | (g_new.abs().amax(1) == 0)


class _CppSteps:
    """_TorchSteps as one C++ call each (csrc/geometry/lbfgs_cpu.cpp), for CPU tensors: a
    few microseconds an iteration where the PyTorch operations take most of a millisecond,
    which dominated solves of a few pairs."""

    @staticmethod
    def direction(g: Tensor, s_hist: Tensor, y_hist: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        g = g.contiguous()
        p, slope = torch.empty_like(g), g.new_empty(g.shape[0])
        torch.ops.latentfast_cpp.lbfgs_direction_(p, slope, g, s_hist, y_hist, count)
        return p, slope

    @staticmethod
    def trial(f_new: Tensor, g_new: Tensor, step: Tensor, searching: Tensor, ft: Tensor, gt: Tensor, f: Tensor,
              slope: Tensor, rows: Tensor | None) -> int:
        return torch.ops.latentfast_cpp.lbfgs_trial_(f_new, g_new, step, searching, ft.contiguous(),
                                                     gt.contiguous(), f, slope, rows)

    @staticmethod
    def update(x: Tensor, s_hist: Tensor, y_hist: Tensor, count: Tensor, small: Tensor, iters: Tensor, f: Tensor,
               g: Tensor, f_new: Tensor, g_new: Tensor, p: Tensor, step: Tensor, searching: Tensor, tol: float
               ) -> tuple[Tensor, Tensor]:
        done = torch.empty_like(searching)
        torch.ops.latentfast_cpp.lbfgs_update_(x, s_hist, y_hist, count, small, iters, done, f, g.contiguous(),
                                               f_new, g_new, p, step, searching, float(tol))
        return x, done


def _lbfgs_steps(x: Tensor) -> type[_TorchSteps] | type[_CppSteps]:
    """_CppSteps where the cpp backend serves x's device (CPU with latentfast._C), else
    _TorchSteps (also under LATENTFAST_BACKEND=reference, which stays pure PyTorch)."""
    from latentfast import backend

    return _CppSteps if x.device.type == "cpu" and backend.select(x.device) == "cpp" else _TorchSteps


def _batched_lbfgs(fg: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, tol: float,
                   max_iter: int, history: int = 20, progress: bool = False,
                   steps: type[_TorchSteps] | type[_CppSteps] | None = None,
                   first_step: Callable[[Tensor, Tensor], Tensor] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Independent L-BFGS minimisations of B problems at once, x [B, n].

    fg(x_sub, idx) -> (f [b], grad [b, n]) evaluates the problems idx only. Each problem has
    its own history, Armijo backtracking step and stopping test: relative decrease of f
    below tol on two consecutive iterations, or a zero gradient. Returns (x, f, converged,
    iterations); converged is False for problems that ran out of iterations and for those
    that stopped stalled (below: steepest descent failing although it promised a decrease
    above tol). `steps` does the per-iteration work (_TorchSteps or _CppSteps; by default
    the one _lbfgs_steps picks for x). first_step(p, idx) -> [b] factors in (0, 1], if
    given, scales the directions p [b, n] of the problems idx that have no history to set a
    scale (-g / ||g|| there): on the first iteration, and after a restart (below): a
    problem-aware bound on how far their first trial goes.

    The iterations run on a working set of the unfinished problems, compacted when some
    finish (their results are written out then), so an iteration indexes nothing by an
    active set.
    """
    steps = steps or _lbfgs_steps(x)
    b, n = x.shape
    dev = x.device
    x_out = x.clone()
    idx = torch.arange(b, device=dev)  # the working set's problems
    x = x_out.clone()
    f, g = fg(x, idx)
    f, g = f.contiguous(), g.contiguous()
    f_out = f.clone()
    conv_out = torch.zeros(b, dtype=torch.bool, device=dev)
    iters_out = torch.zeros(b, dtype=torch.long, device=dev)
    s_hist = x.new_zeros((b, history, n))
    y_hist = x.new_zeros((b, history, n))
    count = torch.zeros(b, dtype=torch.long, device=dev)
    small = torch.zeros(b, dtype=torch.long, device=dev)
    iters = torch.zeros(b, dtype=torch.long, device=dev)
    done = g.abs().amax(1) == 0
    stalled = torch.zeros(b, dtype=torch.bool, device=dev)  # last search failed though it promised
    any_stalled = False
    # problems whose next direction has no history to scale it (all at first, then those
    # whose line search failed): first_step scales it
    fresh = torch.ones(b, dtype=torch.bool, device=dev) if first_step is not None else None
    bar = tqdm(range(max_iter), desc="geodesics", disable=not progress, leave=False, mininterval=1.0)
    for _ in bar:
        if bool(done.any()):  # retire the finished problems
            fin, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            rows = idx[fin]
            x_out[rows], f_out[rows], iters_out[rows] = x[fin], f[fin], iters[fin]
            conv_out[rows] = ~stalled[fin]
            idx, x, f, g, s_hist, y_hist, count, small, iters, done, stalled = (
                t[keep] for t in (idx, x, f, g, s_hist, y_hist, count, small, iters, done, stalled))
            fresh = fresh[keep] if fresh is not None else None
        if idx.numel() == 0:
            break
        p, slope = steps.direction(g, s_hist, y_hist, count)
        if fresh is not None:
            r = fresh.nonzero().squeeze(1)
            if r.numel():
                scale = first_step(p[r], idx[r])
                p[r] *= scale[:, None]
                slope[r] *= scale
            fresh = None
        # Armijo backtracking, per problem; the first trial (step 1) takes every problem,
        # then down to step 2^-11. A problem that fails them all although its direction
        # promised a decrease above tol (relative; -slope, the first-order decrease of a
        # full step) restarts: from several stored pairs it keeps the newest only (the
        # memoryless quasi-Newton direction, still scaled by that pair), from one it drops it
        # (steepest descent, scaled by first_step). Any other failure is an iteration without
        # decrease towards the stopping test: rounding-level progress near a minimum, or
        # steepest descent failing (the same direction would fail again; the problem is
        # stalled, and stops unconverged unless a later step succeeds).
        f_new, g_new = f.clone(), g.clone()
        step = torch.ones_like(f)
        searching = torch.ones_like(f, dtype=torch.bool)
        ft, gt = fg(x + p, idx)
        left = steps.trial(f_new, g_new, step, searching, ft, gt, f, slope, None)
        for _ls in range(11):
            if not left:
                break
            si = searching.nonzero().squeeze(1)
            ft, gt = fg(x[si] + step[si, None] * p[si], idx[si])
            left = steps.trial(f_new, g_new, step, searching, ft, gt, f, slope, si)
        if left:
            left = _interpolated_trial(fg, steps, x, p, idx, f, slope, f_new, g_new, step, searching, si, ft)
        x, done = steps.update(x, s_hist, y_hist, count, small, iters, f, g, f_new, g_new, p, step, searching, tol)
        if any_stalled:  # a problem that moved is not stalled any more
            stalled &= searching
        if left:  # some line searches failed
            promised = -slope > tol * f.abs()
            restart = searching & (count > 0) & promised  # (update stores no pair for a failed search)
            stalled |= searching & promised & ~restart
            any_stalled = True
            keep_one = (restart & (count > 1)).nonzero().squeeze(1)
            newest = (count[keep_one] - 1) % history
            s_hist[keep_one, 0], y_hist[keep_one, 0] = s_hist[keep_one, newest], y_hist[keep_one, newest]
            count.copy_(torch.where(restart, torch.where(count > 1, 1, 0), count))
            small.sub_(restart.long())
            done &= ~restart
            if first_step is not None:
                fresh = searching & (count == 0)
        f, g = f_new, g_new
        if progress:
            bar.set_postfix(active=int(idx.numel()), refresh=False)
    if bool(done.any()):  # finished on the last iteration
        conv_out[idx[done]] = ~stalled[done]
    x_out[idx], f_out[idx], iters_out[idx] = x, f, iters
    return x_out, f_out, conv_out, iters_out


def _interpolated_trial(fg, steps, x: Tensor, p: Tensor, idx: Tensor, f: Tensor, slope: Tensor, f_new: Tensor,
                        g_new: Tensor, step: Tensor, searching: Tensor, si: Tensor, ft: Tensor) -> int:
    """_batched_lbfgs's last line-search trial, for the problems whose halvings all failed:
    the minimiser of the quadratic through f, the slope and the smallest halving's objective
    (si, ft: the rows and objectives of that trial). The halvings stop at 2^-11 of the first
    step, and a problem that starts very near its minimum (a short curve whose straight line
    is nearly the geodesic) can need a far shorter one: without this trial it took no step
    at all and stopped as stalled, flagged not converged. Returns how many problems still
    search (steps.trial)."""
    last = searching[si]
    rows = si[last]
    a = 2 * step[rows]  # the smallest halving (its failed trial halved it again)
    curvature = ft[last] - f[rows] - slope[rows] * a  # > 0: the trial failed the Armijo test
    aq = -slope[rows] * a * a / (2 * curvature)
    fits = torch.isfinite(aq) & (aq > 0) & (aq < a)
    rows, aq = rows[fits], aq[fits]
    if rows.numel() == 0:
        return int(searching.sum())
    step[rows] = aq
    ft, gt = fg(x[rows] + aq[:, None] * p[rows], idx[rows])
    return steps.trial(f_new, g_new, step, searching, ft, gt, f, slope, rows)


class _LaplacianCoords:
    """Coordinates w for a curve's interior points x [b, n, d] (end points fixed) with
    x = x_init + R^-1 w, R the upper bidiagonal Cholesky factor of the discrete Laplacian
    tridiag(-1, 2, -1) = R^T R [n, n]: R_ii = sqrt((i+1)/i), R_i,i+1 = -sqrt(i/(i+1)),
    i = 1..n. The Euclidean curve energy sum_t ||x_{t+1} - x_t||^2 is ||w||^2 plus terms
    linear in w, so in w its Hessian is 2 I: a gradient method on w does not slow down with
    the number of segments as it does on x, where the Laplacian's condition number grows
    like n^2.

    R^-1 has the closed form (R^-1)_ij = i / sqrt(j (j+1)) for j >= i, so both maps are
    O(n) (cumulative sums), with no n x n matrix:
        R^-1 w:   (R^-1 w)_i = i * sum_{j >= i} c_j w_j,   c_j = 1 / sqrt(j (j+1))
        R^-T g:   the gradient in w of a function of x, g_w_j = c_j * sum_{i <= j} i g_i
    """

    def __init__(self, n: int, like: Tensor) -> None:
        i = torch.arange(1, n + 1, dtype=torch.float64, device="cpu")  # (float64 on the CPU, then cast)
        cast = dict(dtype=like.dtype, device=like.device)
        self.i = i.to(**cast)[:, None]
        self.c = (1 / torch.sqrt(i * (i + 1))).to(**cast)[:, None]

    def to_x(self, w: Tensor) -> Tensor:
        """R^-1 w, w [b, n, d] (the displacement of the interior points from x_init)."""
        return self.i * (self.c * w).flip(1).cumsum(1).flip(1)  # sums over j >= i

    def grad_to_w(self, g: Tensor) -> Tensor:
        """The gradient in w of a function of x: R^-T g, g [b, n, d]."""
        return self.c * (self.i * g).cumsum(1)


def straight_line(z0: Tensor, z1: Tensor, n_segments: int) -> Tensor:
    """Straight latent lines from z0 [B, d] to z1 [B, d], [B, n_segments + 1, d] (one line
    [n_segments + 1, d] from points [d])."""
    check_tensor("z0", z0)
    check_tensor("z1", z1, like=z0)
    if z0.shape != z1.shape or z0.dim() not in (1, 2):
        raise ValueError(f"z0 and z1 must have the same shape ([B, d], or [d] both for one pair), got "
                         f"{tuple(z0.shape)} and {tuple(z1.shape)}")
    if _unbatched(z0, 2):
        return straight_line(z0[None], z1[None], n_segments)[0]
    if isinstance(n_segments, bool) or not isinstance(n_segments, int) or n_segments < 1:
        raise ValueError(f"n_segments must be an int >= 1, got {n_segments!r}")
    t = torch.linspace(0, 1, n_segments + 1, dtype=z0.dtype, device=z0.device)[:-1][None, :, None]  # [0, 1)
    # the last point is z1 itself (z0 + 1 * (z1 - z0) can differ from it in the last bit)
    return torch.cat([z0[:, None] + t * (z1 - z0)[:, None], z1[:, None]], dim=1)


def _resample_polyline(points: Tensor, n_segments: int) -> Tensor:
    """Points [P, d] -> n_segments + 1 points equally spaced in Euclidean arc length."""
    seg = (points[1:] - points[:-1]).norm(dim=1)
    cum = torch.cat([seg.new_zeros(1), seg.cumsum(0)])
    if cum[-1] == 0:
        return points[:1].expand(n_segments + 1, -1).clone()
    t = torch.linspace(0, float(cum[-1].detach()), n_segments + 1, dtype=points.dtype, device=points.device)
    j = torch.searchsorted(cum, t, right=True).clamp(1, len(points) - 1)
    w = ((t - cum[j - 1]) / seg[j - 1].clamp_min(1e-30)).clamp(0, 1)[:, None]
    out = points[j - 1] + w * (points[j] - points[j - 1])
    return torch.cat([points[:1], out[1:-1], points[-1:]])  # the ends exactly (rounding moves them by an ulp)


def graph_init(z0: Tensor, z1: Tensor, decoder, data: Tensor, n_segments: int,
               n_neighbors: int = 10, max_nodes: int = 1000, seed: int = 0) -> Tensor:
    """Initial curves from shortest paths on a kNN graph of data latents, with edges weighted
    by the Riemannian length of the straight segment. Returns [B, n_segments + 1, d] for end
    points z0, z1 [B, d] ([n_segments + 1, d] for one pair [d])."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    _check_pair_tensors(z0, z1)
    if _unbatched(z0, 2):
        return graph_init(z0[None], z1[None], decoder, data, n_segments, n_neighbors, max_nodes, seed)[0]
    _check_points("z0", z0)
    _check_points("z1", z1)
    _check_points("data", data, like=z0)
    if z0.shape != z1.shape or z0.shape[1] != data.shape[1]:
        raise ValueError(f"z0, z1 and data must be [B, d], [B, d] and [n, d], got {tuple(z0.shape)}, "
                         f"{tuple(z1.shape)} and {tuple(data.shape)}")
    _check_for_decoder(z0, decoder)
    nodes = data.detach()
    if nodes.shape[0] > max_nodes:
        gen = torch.Generator().manual_seed(seed)
        nodes = nodes[torch.randperm(nodes.shape[0], generator=gen, device=gen.device)[:max_nodes].to(nodes.device)]
    m = nodes.shape[0]
    k = min(n_neighbors, m - 1)
    if k < 1:
        raise ValueError("graph initialisation needs at least 2 data points")
    nbr = torch.cdist(nodes, nodes).topk(k + 1, largest=False).indices[:, 1:]
    src = torch.arange(m, device=nodes.device).repeat_interleave(k)
    dst = nbr.reshape(-1)
    with torch.no_grad():
        w = curve_length(decoder, straight_line(nodes[src], nodes[dst], 4))
    w = w.clamp_min(1e-12).double().cpu().numpy()
    graph = csr_matrix((w, (src.cpu().numpy(), dst.cpu().numpy())), shape=(m, m))
    graph = graph.maximum(graph.T)
    start = torch.cdist(z0.detach(), nodes).argmin(1).cpu().numpy()
    end = torch.cdist(z1.detach(), nodes).argmin(1).cpu().numpy()
    uniq = sorted(set(start.tolist()))
    dist, pred = dijkstra(graph, indices=uniq, return_predecessors=True)
    row_of = {s: i for i, s in enumerate(uniq)}
    curves = []
    for i in range(z0.shape[0]):
        r = row_of[int(start[i])]
        path = [int(end[i])]
        # z0 == z1: the constant curve (a graph path would leave and come back); a
        # disconnected graph: fall back to the straight line
        if bool((z0[i] == z1[i]).all()) or dist[r, end[i]] == float("inf"):
            curves.append(straight_line(z0[i:i + 1], z1[i:i + 1], n_segments)[0])
            continue
        while path[-1] != start[i]:
            path.append(int(pred[r, path[-1]]))
        pts = torch.cat([z0[i:i + 1], nodes[list(reversed(path))], z1[i:i + 1]])
        curves.append(_resample_polyline(pts, n_segments))
    return torch.stack(curves)


def geodesic(z0: Tensor, z1: Tensor, decoder, n_segments: int = 32, tol: float = 1e-6,
             max_iter: int = 500, init: str = "line", data: Tensor | None = None,
             n_neighbors: int = 10, precondition: bool = True, progress: bool = False
             ) -> GeodesicResult:
    """Geodesics between B pairs of latent points at once, by minimising the discretised
    curve energy over the interior points (batched L-BFGS, one history per pair).

    Args:
        z0, z1: end points [B, d], or [d] both for one pair (the results then have no B
            dimension).
        decoder: see the module docstring.
        n_segments: T, the number of segments of each discretised curve.
        tol: a pair converges when its energy decreases by less than tol (relative) on two
            consecutive iterations.
        init: "line" (straight latent lines) or "graph" (shortest paths on a kNN graph of
            `data` latents, better when straight lines cross empty regions).
        precondition: run L-BFGS in coordinates w of the interior points x = x_init +
            R^-1 w, R the Cholesky factor of the discrete Laplacian (see _LaplacianCoords),
            in which the curve energy's Euclidean part is perfectly conditioned whatever
            n_segments; 4-7x fewer iterations than L-BFGS on the points themselves (False)
            on the benchmark's digits VAE. The energy is the same function either way, but
            the two can stop in different local minima where a pair has several.
    The first L-BFGS step moves no interior point further than a tenth of its initial
    curve's latent length (_FIRST_STEP), so the solve starts at the scale of the curve,
    however short or long it is.
    A pair is flagged not converged when it runs out of max_iter, or stalls: no Armijo step
    along steepest descent (after its L-BFGS history was dropped) decreases the energy
    although the gradient promised a decrease above tol.
    Pairs with z0 == z1 give the constant curve (length 0), flagged converged. Autocast is
    off for the solve (the energies keep the curves' precision).

    Example:
        >>> res = geodesic(torch.zeros(1, 2), torch.ones(1, 2), nn.Sequential(nn.Linear(2, 3)))
        >>> res.lengths.shape
        torch.Size([1])
    """
    _check_pair_tensors(z0, z1)
    if z0.dim() == 1:
        res = geodesic(z0[None], z1[None], decoder, n_segments, tol, max_iter, init, data, n_neighbors,
                       precondition, progress)
        return GeodesicResult(*(getattr(res, f.name)[0] for f in dataclasses.fields(res)))
    _check_points("z0", z0)
    _check_points("z1", z1)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if n_segments < 2:
        raise ValueError(f"n_segments must be >= 2, got {n_segments}")
    if not tol >= 0 or max_iter < 0:
        raise ValueError(f"need tol >= 0 and max_iter >= 0, got {tol} and {max_iter}")
    if init not in ("line", "graph"):
        raise ValueError(f"init must be 'line' or 'graph', got {init!r}")
    if init == "graph" and data is None:
        raise ValueError("init='graph' needs the data latents (data=...)")
    if z0.shape[0] == 0:  # no pairs: empty results of the documented shapes
        curves = straight_line(z0, z1, n_segments)
        empty = z0.new_zeros(0)
        return GeodesicResult(curves, empty, empty.clone(), torch.zeros(0, dtype=torch.bool, device=z0.device),
                              torch.zeros(0, dtype=torch.long, device=z0.device))
    if init == "line":
        curves = straight_line(z0, z1, n_segments)
    else:
        curves = graph_init(z0, z1, decoder, data, n_segments, n_neighbors)
    return _relax(z0, z1, curves, decoder, tol, max_iter, precondition, progress)


_FIRST_STEP = 0.1  # see _relax; 0 leaves the first step uncapped


def _relax(z0: Tensor, z1: Tensor, curves: Tensor, decoder, tol: float, max_iter: int, precondition: bool,
           progress: bool = False) -> GeodesicResult:
    """geodesic's solve from the initial curves [B, T+1, d]: their interior points move, the
    end points are z0, z1 [B, d]. Autocast is off for the solve (a solve to a relative
    tolerance needs the energies in the curves' precision, not in bfloat16 / float16)."""
    with torch.autocast(curves.device.type, enabled=False):
        return _relax_solve(z0, z1, curves, decoder, tol, max_iter, precondition, progress)


def _relax_solve(z0: Tensor, z1: Tensor, curves: Tensor, decoder, tol: float, max_iter: int,
                 precondition: bool, progress: bool) -> GeodesicResult:
    b, t1, d = curves.shape
    z0c, z1c = z0.detach()[:, None], z1.detach()[:, None]

    mlp = as_mlp(decoder)  # described once: the decoder is held fixed for the solve
    if mlp is not None:  # checked once too
        curve_fg = ops.curve_energy_and_grad_fn(curves.detach(), *mlp.args())
    else:
        curve_fg = functools.partial(energy_and_grad, decoder)

    # Preconditioned, the variables are w with interior points x = x_init + R^-1 w, starting
    # at w = 0 (so the first energy call sees the initial curve exactly).
    coords = _LaplacianCoords(t1 - 2, curves) if precondition else None
    x_init = curves[:, 1:-1].detach()

    def points(v: Tensor, idx: Tensor) -> Tensor:
        x = v.view(-1, t1 - 2, d)
        return x if coords is None else x_init[idx] + coords.to_x(x)

    def fg(v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        e, _, g = curve_fg(torch.cat([z0c[idx], points(v, idx), z1c[idx]], dim=1))
        g = g[:, 1:-1] if coords is None else coords.grad_to_w(g[:, 1:-1])
        return e, g.reshape(len(idx), -1)

    # The first L-BFGS direction is -g / ||g|| (no history yet to scale it), a unit step in
    # the variables whatever the curve's size; no interior point may move further than
    # _FIRST_STEP times its initial curve's latent length on it.
    reach = _FIRST_STEP * (curves[:, 1:] - curves[:, :-1]).detach().norm(dim=-1).sum(1)  # [B]

    def first_step(p: Tensor, idx: Tensor) -> Tensor:
        dx = p.view(-1, t1 - 2, d) if coords is None else coords.to_x(p.view(-1, t1 - 2, d))
        most = dx.norm(dim=-1).amax(1)
        return torch.where(most > reach[idx], reach[idx] / most.clamp_min(1e-300), 1.0)

    fixed = _decoder_fixed(decoder)
    with torch.no_grad(), fixed, ops.reuse_buffers():
        v = x_init.reshape(b, -1) if coords is None else x_init.new_zeros(b, (t1 - 2) * d)
        v, _, conv, iters = _batched_lbfgs(fg, v, tol, max_iter, progress=progress,
                                           first_step=first_step if _FIRST_STEP > 0 else None)
        curves = torch.cat([z0c, points(v, torch.arange(b, device=v.device)), z1c], dim=1)
        energy, length = _energy_length(decoder, curves)
        # A pair with z0 == z1 is the constant curve of length 0 exactly: the solve's gradient there
        # is rounding (equal points' features may differ by an ulp where a kernel computes them
        # at other positions of a block), which may nudge the interior points by as much.
        same = (z0c == z1c).all(-1)  # [B, 1]
        curves = torch.where(same[..., None], z0c, curves)
        energy, length = (torch.where(same[:, 0], 0.0, t) for t in (energy, length))
        conv = conv | same[:, 0]
    return GeodesicResult(curves, length, energy, conv, iters)


def interpolate(decoder, curves: Tensor, n_points: int) -> Tensor:
    """Points spaced evenly in Riemannian arc length along each curve, [B, n_points, d]
    (linear in latent space within a segment; a curve of length 0 gives its first point).
    All curves at once: one decoder pass and batched searches, no loop over the curves.
    One curve [T+1, d] gives [n_points, d]."""
    if _unbatched(curves, 3):
        return interpolate(decoder, curves[None], n_points)[0]
    check_tensor("curves", curves, 3)
    if curves.shape[1] < 2:
        raise ValueError(f"curves need at least 2 points, got {curves.shape[1]}")
    _check_for_decoder(curves, decoder)
    check_finite("curves", curves)
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    with torch.no_grad():  # where each point falls (the weights are constants, as the positions' spacing)
        g = _feature_fn(decoder)(curves.detach())
        seg = (g[:, 1:] - g[:, :-1]).norm(dim=-1)  # [B, T]
        cum = torch.cat([seg.new_zeros(seg.shape[0], 1), seg.cumsum(1)], dim=1)  # [B, T + 1]
        frac = torch.linspace(0, 1, n_points, dtype=cum.dtype, device=cum.device)
        t = (cum[:, -1:] * frac).contiguous()  # [B, n_points]
        j = torch.searchsorted(cum.contiguous(), t, right=True).clamp(1, curves.shape[1] - 1)
        w = ((t - cum.gather(1, j - 1)) / seg.gather(1, j - 1).clamp_min(1e-30)).clamp(0, 1)
    idx = j[..., None].expand(-1, -1, curves.shape[2])
    a, b = curves.gather(1, idx - 1), curves.gather(1, idx)
    return a + w[..., None].to(curves.dtype) * (b - a)


# ------------------------------------------------------------------ exponential map

def geodesic_acceleration(decoder, z: Tensor, v: Tensor) -> Tensor:
    """z'' = -Gamma(z)[v, v] [B, d] from the geodesic equation of M = J^T J,
    J^T (J z'' + g''(z)[v, v]) = 0, i.e. z'' = -M^-1 J^T g''(z)[v, v].

    MLP decoders (as_mlp) carry J and g''[v, v] forward through the layers in one batched
    pass (latentfast.reference.geometry.geodesic_acceleration); any other decoder gets J and
    g''[v, v] from torch.func (jacfwd and a jvp of a jvp per point, under vmap).
    One point and velocity [d] give [d].
    Raises ValueError where M(z) is singular to working precision (smallest eigenvalue at
    most d * eps * the largest, torch.linalg.matrix_rank's tolerance): the equation does not
    fix z'' there (a decoder layer narrower than d, or fewer features than d, makes M
    singular everywhere; saturated units far from the data, nearly so), and a solve would
    return one of its infinitely many solutions, picked by rounding (not checked inside
    torch.compile or torch.func transforms)."""
    if _unbatched(z, 2) and _unbatched(v, 2):
        return geodesic_acceleration(decoder, z[None], v[None])[0]
    _check_points_and_velocities(z, v)
    if z.shape != v.shape:
        raise ValueError(f"z and v must have the same shape, got {tuple(z.shape)} and {tuple(v.shape)}")
    _check_for_decoder(z, decoder)
    check = can_read_back(z)
    acc, solved = _acceleration(_for_acceleration(decoder), z, v, check)
    if check and bool((singular := _singular(*solved)).any()):
        rows = singular.nonzero()[:, 0].tolist()
        raise ValueError(f"geodesic_acceleration: the metric M(z) is singular to working precision at "
                         f"point(s) {rows[:10]}{' ...' if len(rows) > 10 else ''}, so z'' is not determined "
                         f"there: {_SINGULAR_HINT}")
    return acc


_SINGULAR_HINT = ("the decoder's Jacobian has rank below the latent dimension d (a layer narrower than d or "
                  "fewer features than d make it so everywhere; saturated activations far from the data, "
                  "nearly so). Use a decoder whose metric stays regular (an RBF variance network's grows away "
                  "from the data).")


def _for_acceleration(decoder):
    """What _acceleration takes for `decoder`: an MLP decoder's detached parameters (as_mlp:
    the decoder is held fixed, no gradient reaches its weights), with a linear last layer
    W_L [D, H] wider than the layer before (D > H) as R of W_L = Q R: M = J^T J and
    J^T g''[v, v] see W_L only through W_L^T W_L = R^T R (the QR the curve energy caches;
    LATENTFAST_GEOM_QR=0 keeps W_L). At 2-64-256-784, 256 features a point instead of 784.
    Any other decoder as it is."""
    p = as_mlp(decoder)
    if p is None:
        return decoder
    return dataclasses.replace(p, **dict(zip(("weights", "biases"), ops._energy_layers(p.weights, p.biases, p.acts))))


def _acceleration(decoder, z: Tensor, v: Tensor, check: bool
                  ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """(z'' [B, d], (M [B, d, d], solve info [B]) or None): with check, what _singular needs
    to tell which points' metrics are singular to working precision (their z'' is not to be
    used), found without reading anything back (torch.linalg.solve_ex: an exactly singular M
    flags its point instead of raising)."""
    p = as_mlp(decoder)
    if p is not None:
        metric, rhs = ref.geodesic_acceleration_system(z, v, *p.args())
    else:
        f = _feature_fn(decoder)

        def system(zi: Tensor, vi: Tensor) -> tuple[Tensor, Tensor]:
            g = lambda x: f(x[None])[0]  # noqa: E731
            _, gvv = torch.func.jvp(lambda x: torch.func.jvp(g, (x,), (vi,))[1], (zi,), (vi,))
            jac = torch.func.jacfwd(g)(zi)  # [D, d]
            return jac.T @ jac, jac.T @ gvv
        metric, rhs = torch.func.vmap(system)(z, v)
    if not check:
        return -torch.linalg.solve(metric, rhs), None
    sol, info = torch.linalg.solve_ex(metric, rhs)
    return -sol, (metric.detach(), info)


def _singular(metric: Tensor, info: Tensor) -> Tensor:
    """[B] bool: which metrics [B, d, d] are singular to working precision (smallest eigenvalue
    at most d * eps * the largest, or solve_ex's info flagged them); a metric with NaN / Inf
    is not (the paths' finiteness check names it) and is not decomposed (the eigensolver can
    raise a failure to converge on one)."""
    with torch.no_grad():
        finite = torch.isfinite(metric).flatten(1).all(1)
        eye = torch.eye(metric.shape[1], dtype=metric.dtype, device=metric.device)
        eig = torch.linalg.eigvalsh(torch.where(finite[:, None, None], metric, eye))
        return finite & ((eig[:, 0] <= eig[:, -1] * (metric.shape[1] * torch.finfo(metric.dtype).eps)) | (info != 0))


_PENDING_ELEMS = 1 << 20  # metric elements exp_map gathers before a singular-metric test


def exp_map(decoder, z: Tensor, v: Tensor, t: float = 1.0, n_steps: int = 50) -> Tensor:
    """Geodesic shooting: integrate z'' = -Gamma(z)[z', z'] from z [B, d] with velocity
    v [B, d] for time t (RK4, n_steps). Returns the trajectory [B, n_steps + 1, d]; its last
    point is Exp_z(t v). One point and velocity [d] give [n_steps + 1, d].
    Raises ValueError naming the first RK4 step where a path met a metric singular to working
    precision (see geodesic_acceleration) or turned NaN / Inf; the check reads back once, after
    the last step."""
    if _unbatched(z, 2) and _unbatched(v, 2):
        return exp_map(decoder, z[None], v[None], t, n_steps)[0]
    _check_points_and_velocities(z, v)
    if z.shape != v.shape:
        raise ValueError(f"z and v must have the same shape, got {tuple(z.shape)} and {tuple(v.shape)}")
    _check_for_decoder(z, decoder)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if not math.isfinite(t):
        raise ValueError(f"t must be finite, got {t}")
    h = t / n_steps
    zs = [z.detach()]
    zc, vc = z.detach(), v.detach()

    check = can_read_back(zc)
    # Which paths met a singular metric, per RK4 stage (4 a step), read back once at the end.
    # The stages' metrics wait in `pending` and are tested together (one batched eigvalsh per
    # _PENDING_ELEMS elements, not one per stage: at 4 points the test had cost a stage about
    # as much as the decoder pass).
    singular, pending = [], []

    def flush() -> None:
        if pending:
            flags = _singular(torch.cat([m for m, _ in pending]), torch.cat([i for _, i in pending]))
            singular.extend(flags.view(len(pending), -1))
            pending.clear()

    decoder = _for_acceleration(decoder)  # once for all stages

    def deriv(zz, vv):
        acc, solved = _acceleration(decoder, zz, vv, check)
        if check:
            pending.append(solved)
            if len(pending) * solved[0].numel() >= _PENDING_ELEMS:
                flush()
        return vv, acc

    with torch.no_grad():
        for _ in range(n_steps):
            k1z, k1v = deriv(zc, vc)
            k2z, k2v = deriv(zc + 0.5 * h * k1z, vc + 0.5 * h * k1v)
            k3z, k3v = deriv(zc + 0.5 * h * k2z, vc + 0.5 * h * k2v)
            k4z, k4v = deriv(zc + h * k3z, vc + h * k3v)
            zc = zc + h / 6 * (k1z + 2 * k2z + 2 * k3z + k4z)
            vc = vc + h / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)
            zs.append(zc)
    if check:
        flush()
        flags = torch.stack(singular).view(n_steps, 4, -1).any(1)  # [n_steps, B]
        if bool(flags.any()):
            step = int(flags.any(1).nonzero()[0])
            raise ValueError(f"exp_map: the metric M(z) became singular in RK4 step {step + 1} of {n_steps} "
                             f"(to working precision, on path(s) {flags[step].nonzero()[:, 0].tolist()[:10]}), "
                             f"where z'' is not determined: {_SINGULAR_HINT} Along a path that ran off the "
                             f"data, shorten t or the velocity, or take more steps.")
    path = torch.stack(zs, dim=1)
    if can_read_back(path) and not bool(torch.isfinite(path).all()):
        bad = int((~torch.isfinite(path).flatten(2).all(2)).any(0).nonzero()[0])
        raise ValueError(f"exp_map: the path became NaN/Inf at RK4 step {bad} of {n_steps} (the decoder or its "
                         "metric is not finite there, or the path ran off where the metric degenerates). Shorten t "
                         "or the velocity, or take more steps.")
    return path


def extrapolate(decoder, curves: Tensor, t: float = 0.5, n_steps: int = 25) -> Tensor:
    """Continue curves [B, T+1, d] (parameterised over [0, 1]) past their end point along
    the geodesic with the end velocity, for a further time t. Returns [B, n_steps + 1, d]
    starting at the end point ([n_steps + 1, d] for one curve [T+1, d])."""
    if _unbatched(curves, 3):
        return extrapolate(decoder, curves[None], t, n_steps)[0]
    check_tensor("curves", curves, 3)
    if curves.shape[1] < 2:
        raise ValueError(f"curves need at least 2 points, got {curves.shape[1]}")
    segs = curves.shape[1] - 1
    v = (curves[:, -1] - curves[:, -2]) * segs
    return exp_map(decoder, curves[:, -1], v, t, n_steps)


# ------------------------------------------------------------------ distances and statistics

def distance_matrix(decoder, x: Tensor, y: Tensor | None = None, batch_size: int = 4096,
                    progress: bool = False, **geodesic_kwargs) -> Tensor:
    """Riemannian (geodesic) distances [n, m] between x [n, d] and y [m, d] (y = x when
    omitted: only the upper triangle is solved).

    The pairs are solved batch_size at a time (one batched geodesic call each), so memory
    stays bounded however many pairs there are (the solver keeps an L-BFGS history of about
    2 * 20 * (n_segments - 1) * d values per pair in the batch); progress shows a bar over the
    pairs. geodesic_kwargs go to geodesic (n_segments, tol, max_iter, ...)."""
    _check_points("x", x)
    sym = y is None
    y = x if sym else y
    _check_points("y", y, like=x)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same latent dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    _check_for_decoder(x, decoder)
    n, m = x.shape[0], y.shape[0]
    if sym:
        i, j = torch.triu_indices(n, n, 1, device=x.device)
    else:
        i, j = (g.reshape(-1) for g in torch.meshgrid(torch.arange(n, device=x.device),
                                                      torch.arange(m, device=x.device), indexing="ij"))
    out = x.new_zeros((n, m))
    with tqdm(total=len(i), desc="distances", unit="pair", disable=not progress, leave=False) as bar:
        lengths = _pair_lengths(decoder, x, y, i, j, batch_size, bar, geodesic_kwargs)
    out[i, j] = lengths
    if sym:
        out[j, i] = lengths
    return out


def _pair_lengths(decoder, x: Tensor, y: Tensor, i: Tensor, j: Tensor, batch_size: int, bar,
                  geodesic_kwargs: dict) -> Tensor:
    """Geodesic lengths between x[i] and y[j] [len(i)], batch_size pairs per geodesic call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = x.new_empty(len(i))
    for s in range(0, len(i), batch_size):
        ii, jj = i[s:s + batch_size], j[s:s + batch_size]
        out[s:s + len(ii)] = geodesic(x[ii], y[jj], decoder, **geodesic_kwargs).lengths
        bar.update(len(ii))
    return out


def knn(decoder, x_query: Tensor, x_train: Tensor, k: int = 5, batch_size: int = 4096,
        progress: bool = False, **geodesic_kwargs) -> tuple[Tensor, Tensor]:
    """The k geodesically nearest training points of each query: (distances [m, k],
    ascending, and their indices into x_train [m, k]).

    The same neighbours as the full distance_matrix(decoder, x_query, x_train), with far
    fewer geodesics solved: a curve's Riemannian length is at least the chord
    ||g(z1) - g(z0)|| between its end points' features (its image joins them), so once each
    query's k chord-nearest training points are solved, the largest of those k lengths, U,
    bounds its k-th distance, and only training points with chord <= U can be among its k
    nearest; those are solved as well. geodesic_kwargs go to geodesic."""
    _check_points("x_query", x_query)
    _check_points("x_train", x_train, like=x_query)
    if x_query.shape[1] != x_train.shape[1]:
        raise ValueError(f"x_query and x_train must have the same latent dimension, got "
                         f"{tuple(x_query.shape)} and {tuple(x_train.shape)}")
    _check_for_decoder(x_query, decoder)
    m, n = x_query.shape[0], x_train.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the training points), got {k}")
    feats = _feature_fn(decoder)
    with torch.no_grad():
        # differences, not the |a|^2 + |b|^2 - 2 a.b form, which loses the small chords
        fq, ft = feats(x_query.detach()), feats(x_train.detach())
        chord = torch.cdist(fq, ft, compute_mode="donot_use_mm_for_euclid_dist")  # [m, n]
        # rounding: the features of one point differ by a few ulps between batches, and a
        # solved length may sit a hair under its chord
        slack = 64 * torch.finfo(fq.dtype).eps * float(torch.cat([fq, ft]).norm(dim=1).amax())
    rows = torch.arange(m, device=x_query.device)
    dist = torch.full((m, n), math.inf, dtype=x_query.dtype, device=x_query.device)
    with tqdm(total=m * k, desc="knn", unit="pair", disable=not progress, leave=False) as bar:
        first = chord.topk(k, dim=1, largest=False).indices  # [m, k]
        qi = rows.repeat_interleave(k)
        dist[qi, first.reshape(-1)] = _pair_lengths(decoder, x_query, x_train, qi, first.reshape(-1),
                                                    batch_size, bar, geodesic_kwargs)
        bound = dist.gather(1, first).amax(1)  # >= the k-th distance
        cand = (chord <= bound[:, None] * (1 + 1e-5) + slack) & dist.isinf()
        qi, tj = cand.nonzero(as_tuple=True)
        bar.total += len(qi)
        dist[qi, tj] = _pair_lengths(decoder, x_query, x_train, qi, tj, batch_size, bar, geodesic_kwargs)
    return dist.topk(k, dim=1, largest=False)


def kmedoids(dist: Tensor, k: int, n_iter: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-medoids on a distance matrix [n, n]: (labels [n], medoid indices [k]). With
    Riemannian distances this is the geodesic k-means of latent points (centres restricted
    to data points, so no Frechet mean is needed)."""
    n = dist.shape[0]
    if dist.shape != (n, n):
        raise ValueError("dist must be a square matrix")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    gen = torch.Generator().manual_seed(seed)
    medoids = [int(torch.randint(n, (1,), generator=gen, device=gen.device))]
    for _ in range(1, k):  # farthest-point seeding, among the points not chosen yet
        gap = dist[:, medoids].min(1).values
        gap[medoids] = -float("inf")  # (with repeated points every gap can be 0: no medoid twice)
        medoids.append(int(gap.argmax()))
    med = torch.tensor(medoids, device=dist.device)
    for _ in range(n_iter):
        labels = dist[:, med].argmin(1)
        new = med.clone()
        for c in range(k):
            members = (labels == c).nonzero().squeeze(1)
            if members.numel():
                new[c] = members[dist[members][:, members].sum(1).argmin()]
        # A cluster left empty (its medoid a copy of another's point) keeps its medoid; the
        # clusters' members are disjoint, so only such a medoid can be picked twice: give it the
        # unchosen point farthest from its medoid instead.
        for c in range(k):
            if int((new == new[c]).sum()) > 1 and not bool((labels == c).any()):
                gap = dist[torch.arange(n, device=dist.device), new[labels]].clone()
                gap[new] = -float("inf")
                new[c] = gap.argmax()
        if torch.equal(new, med):
            break
        med = new
    return dist[:, med].argmin(1), med


def riemannian_kmeans(decoder, x: Tensor, k: int, seed: int = 0, **geodesic_kwargs
                      ) -> tuple[Tensor, Tensor]:
    """Cluster latent points x [n, d] with geodesic distances: (labels [n], medoids [k])."""
    return kmedoids(distance_matrix(decoder, x, **geodesic_kwargs), k, seed=seed)


def knn_predict(decoder, x_train: Tensor, y_train: Tensor, x_query: Tensor, k: int = 5,
                **geodesic_kwargs) -> Tensor:
    """Majority label of the k geodesically nearest training points, per query [m]."""
    if y_train.dim() != 1 or y_train.shape[0] != x_train.shape[0]:
        raise ValueError(f"y_train must be [{x_train.shape[0]}] (a label per row of x_train), got "
                         f"{tuple(y_train.shape)}")
    nearest = knn(decoder, x_query, x_train, k, **geodesic_kwargs)[1]
    return torch.mode(y_train[nearest], dim=1).values


def random_walk(decoder, z0: Tensor, n_steps: int, step_size: float = 0.01,
                generator: torch.Generator | None = None) -> Tensor:
    """Random walks on the latent manifold: z_{t+1} = z_t + sqrt(step_size) * eps,
    eps ~ N(0, M(z_t)^-1), so steps are short where the decoder stretches space, and long
    where it flattens it: where M is (near) singular, e.g. a decoder without an RBF variance
    network far from the data, where saturated units make J vanish, the steps follow
    (M + 1e-9 I)^-1 and can jump thousands of units. Fit the variance network
    (latentfast.vae.fit_rbf_variance), whose metric grows away from the data, to keep walks
    near it. Returns [B, n_steps + 1, d] for starts z0 [B, d] ([n_steps + 1, d] for one
    start [d])."""
    if _unbatched(z0, 2):
        return random_walk(decoder, z0[None], n_steps, step_size, generator)[0]
    _check_points("z0", z0)
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    z = z0.detach()
    path = [z]
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    fixed = _decoder_fixed(decoder)
    with torch.no_grad(), fixed:
        for _ in range(n_steps):
            m = metric(decoder, z) + 1e-9 * eye
            chol = torch.linalg.cholesky(m)
            eps = torch.randn(z.shape, dtype=z.dtype, generator=generator, device=draw_device(generator)).to(z.device)
            # x = L^-T eps has covariance (L L^T)^-1 = M^-1
            step = torch.linalg.solve_triangular(chol.transpose(1, 2), eps[..., None], upper=True)[..., 0]
            z = z + step_size ** 0.5 * step
            path.append(z)
    return torch.stack(path, dim=1)
