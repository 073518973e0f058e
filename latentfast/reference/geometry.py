"""Reference (specification) of the latent-geometry ops, in plain differentiable PyTorch.

A Gaussian decoder z -> (mu(z), sigma(z)) is described by plain tensors so that every
backend sees the same thing:

- the mean network: ``weights[l]`` [H_{l+1}, H_l], ``biases[l]`` [H_{l+1}] and activation
  codes ``acts[l]`` (see ACTIVATIONS), so mu(z) = act_L(W_L ... act_1(W_1 z + b_1) ... + b_L);
- the optional RBF variance network of "Latent Space Oddity" (Arvanitidis et al. 2018):
  v_k(z) = exp(-lambda_k ||z - c_k||^2) over K centres ``rbf_centres`` [K, d] with
  bandwidths ``rbf_lambda`` [K], beta(z) = ``rbf_weight`` v(z) + zeta with a non-negative
  ``rbf_weight`` [D, K] and zeta > 0, and sigma(z) = beta(z)^(-1/2).

The pull-back metric is M(z) = J_mu(z)^T J_mu(z) + J_sigma(z)^T J_sigma(z) [d, d]. It is
the metric of the "feature map" g(z) = cat(mu(z), sigma(z)), so curve energies and lengths
are measured on g (with only mu when there is no variance network).

The reference builds the Jacobians explicitly ([N, D, d]); the kernels never do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Activation codes shared with the C++ and Triton kernels.
ACTIVATIONS = {"identity": 0, "tanh": 1, "softplus": 2, "elu": 3, "sigmoid": 4}
ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}


def activation(a: Tensor, code: int) -> Tensor:
    """act(a) for an activation code."""
    if code == 0:
        return a
    if code == 1:
        return torch.tanh(a)
    if code == 2:
        return F.softplus(a)
    if code == 3:
        return F.elu(a)
    if code == 4:
        return torch.sigmoid(a)
    raise ValueError(f"unknown activation code {code}; known: {ACTIVATIONS}")


def activation_deriv(a: Tensor, code: int) -> Tensor:
    """act'(a) for an activation code."""
    if code == 0:
        return torch.ones_like(a)
    if code == 1:
        return 1.0 - torch.tanh(a) ** 2
    if code == 2:
        return torch.sigmoid(a)
    if code == 3:
        return torch.where(a > 0, torch.ones_like(a), torch.exp(a))
    if code == 4:
        s = torch.sigmoid(a)
        return s * (1.0 - s)
    raise ValueError(f"unknown activation code {code}; known: {ACTIVATIONS}")


def activation_second_deriv(a: Tensor, code: int) -> Tensor:
    """act''(a) for an activation code (ELU's at 0 taken from the left, like its act')."""
    if code == 0:
        return torch.zeros_like(a)
    if code == 1:
        t = torch.tanh(a)
        return -2.0 * t * (1.0 - t * t)
    if code == 2:
        s = torch.sigmoid(a)
        return s * (1.0 - s)
    if code == 3:
        return torch.where(a > 0, torch.zeros_like(a), torch.exp(a))
    if code == 4:
        s = torch.sigmoid(a)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    raise ValueError(f"unknown activation code {code}; known: {ACTIVATIONS}")


def mlp_mean(z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int]) -> Tensor:
    """mu(z) for z [..., d]."""
    h = z
    for w, b, code in zip(weights, biases, acts):
        h = activation(h @ w.T + b, code)
    return h


def rbf_sigma(z: Tensor, centres: Tensor, lam: Tensor, weight: Tensor, zeta: float) -> Tensor:
    """sigma(z) = (weight v(z) + zeta)^(-1/2) for z [..., d]."""
    v = torch.exp(-lam * ((z[..., None, :] - centres) ** 2).sum(-1))
    return (v @ weight.T + zeta).rsqrt()


def features(z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
             rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
             rbf_weight: Tensor | None = None, zeta: float = 0.0) -> Tensor:
    """g(z) = cat(mu(z), sigma(z)) (or mu(z) without a variance network), [..., D or 2D]."""
    mu = mlp_mean(z, weights, biases, acts)
    if rbf_centres is None:
        return mu
    return torch.cat([mu, rbf_sigma(z, rbf_centres, rbf_lambda, rbf_weight, zeta)], dim=-1)


def mlp_jacobian(z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int]) -> Tensor:
    """J_mu(z) [N, D, d] by the chain rule, layer by layer."""
    n, d = z.shape
    h = z
    jac = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
    for w, b, code in zip(weights, biases, acts):
        a = h @ w.T + b
        jac = activation_deriv(a, code)[:, :, None] * torch.einsum("oi,nid->nod", w, jac)
        h = activation(a, code)
    return jac


def rbf_sigma_jacobian(z: Tensor, centres: Tensor, lam: Tensor, weight: Tensor, zeta: float) -> Tensor:
    """J_sigma(z) [N, D, d] of sigma = beta^(-1/2), beta = weight v(z) + zeta."""
    diff = z[:, None, :] - centres[None]  # [N, K, d]
    v = torch.exp(-lam * (diff ** 2).sum(-1))  # [N, K]
    return _rbf_sigma_jacobian(diff, v, v @ weight.T + zeta, lam, weight)


def _rbf_sigma_jacobian(diff: Tensor, v: Tensor, beta: Tensor, lam: Tensor, weight: Tensor) -> Tensor:
    """J_sigma [N, D, d] from diff = z - c [N, K, d], v [N, K] and beta [N, D]."""
    n, _, d = diff.shape
    dv = (-2.0 * lam * v)[:, None, :] * diff.transpose(1, 2)  # [N, d, K]
    # weight dv as one [N d, K] x [K, D] product (an einsum over N ran as N small products)
    return -0.5 * beta.pow(-1.5)[:, :, None] * (dv.reshape(n * d, -1) @ weight.T).reshape(n, d, -1).transpose(1, 2)


def pullback_metric(z: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                    rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                    rbf_weight: Tensor | None = None, zeta: float = 0.0) -> Tensor:
    """M(z) = J_mu^T J_mu (+ J_sigma^T J_sigma) for z [N, d]; returns [N, d, d]."""
    jac = mlp_jacobian(z, weights, biases, acts)
    metric = jac.transpose(1, 2) @ jac
    if rbf_centres is not None:
        js = rbf_sigma_jacobian(z, rbf_centres, rbf_lambda, rbf_weight, zeta)
        metric = metric + js.transpose(1, 2) @ js
    return metric


def geodesic_acceleration(z: Tensor, v: Tensor, weights: list[Tensor], biases: list[Tensor],
                          acts: list[int], rbf_centres: Tensor | None = None,
                          rbf_lambda: Tensor | None = None, rbf_weight: Tensor | None = None,
                          zeta: float = 0.0) -> Tensor:
    """z'' = -Gamma(z)[v, v] [N, d] of the pull-back metric, for z, v [N, d]: the solve of
    geodesic_acceleration_system's M z'' = -J^T g''(z)[v, v]."""
    metric, rhs = geodesic_acceleration_system(z, v, weights, biases, acts, rbf_centres, rbf_lambda,
                                               rbf_weight, zeta)
    return -torch.linalg.solve(metric, rhs)


def geodesic_acceleration_system(z: Tensor, v: Tensor, weights: list[Tensor], biases: list[Tensor],
                                 acts: list[int], rbf_centres: Tensor | None = None,
                                 rbf_lambda: Tensor | None = None, rbf_weight: Tensor | None = None,
                                 zeta: float = 0.0) -> tuple[Tensor, Tensor]:
    """(M(z) [N, d, d], J^T g''(z)[v, v] [N, d]) for z, v [N, d]: the geodesic acceleration
    z'' = -Gamma(z)[v, v] of the pull-back metric solves M z'' = -J^T g''(z)[v, v].

    A curve is a geodesic of M = J^T J (J the Jacobian of g) when the acceleration of
    g(z(t)) is normal to the surface: J^T (J z'' + g''(z)[v, v]) = 0, so
    z'' = -M^-1 J^T g''(z)[v, v]. J, the velocity J v and g''[v, v] are carried forward
    layer by layer (a = W h + b: J_a = W J_h, a' = W h', a'' = W h''; h = act(a):
    J_h = act'(a) J_a, h' = act'(a) a', h'' = act''(a) a'^2 + act'(a) a''), and for the RBF
    variance network sigma = beta^-1/2 in closed form. No third-order tensor is formed.
    """
    n, d = z.shape
    h, hv, hvv = z, v, torch.zeros_like(v)
    # tangents as rows, [N, d, H]: each layer's Jacobian product is one [N d, H_in] x W^T GEMM
    tan = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
    for w, b, code in zip(weights, biases, acts):
        a, av, avv = h @ w.T + b, hv @ w.T, hvv @ w.T
        s1 = activation_deriv(a, code)
        tan = s1[:, None, :] * (tan.reshape(n * d, -1) @ w.T).reshape(n, d, -1)
        hv, hvv = s1 * av, activation_second_deriv(a, code) * av * av + s1 * avv
        h = activation(a, code)
    metric = tan @ tan.transpose(1, 2)
    rhs = (tan @ hvv[:, :, None])[..., 0]
    if rbf_centres is not None:
        diff = z[:, None, :] - rbf_centres[None]  # [N, K, d]
        phi = torch.exp(-rbf_lambda * (diff ** 2).sum(-1))  # [N, K]
        rv = 2.0 * (diff * v[:, None, :]).sum(-1)  # d/dt ||z - c||^2 along v
        rvv = 2.0 * (v * v).sum(-1, keepdim=True)
        phiv = -rbf_lambda * phi * rv
        phivv = phi * (rbf_lambda ** 2 * rv * rv - rbf_lambda * rvv)
        beta, betav, betavv = phi @ rbf_weight.T + zeta, phiv @ rbf_weight.T, phivv @ rbf_weight.T
        sigvv = 0.75 * beta.pow(-2.5) * betav * betav - 0.5 * beta.pow(-1.5) * betavv
        js = _rbf_sigma_jacobian(diff, phi, beta, rbf_lambda, rbf_weight).transpose(1, 2)  # [N, d, D]
        metric = metric + js @ js.transpose(1, 2)
        rhs = rhs + (js @ sigvv[:, :, None])[..., 0]
    return metric, rhs


def curve_energy(curves: Tensor, weights: list[Tensor], biases: list[Tensor], acts: list[int],
                 rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                 rbf_weight: Tensor | None = None, zeta: float = 0.0) -> tuple[Tensor, Tensor]:
    """Discretised energy and length of B curves of T+1 points, curves [B, T+1, d].

    With g the feature map and delta_t = g(z_{t+1}) - g(z_t):
    energy = T * sum_t ||delta_t||^2 and length = sum_t ||delta_t||, both [B].
    """
    g = features(curves, weights, biases, acts, rbf_centres, rbf_lambda, rbf_weight, zeta)
    delta = g[:, 1:] - g[:, :-1]
    sq = (delta ** 2).sum(-1)
    t = curves.shape[1] - 1
    return t * sq.sum(1), sq.sqrt().sum(1)


def curve_energy_metric(curves: Tensor, metric_fn) -> tuple[Tensor, Tensor]:
    """Metric form: energy = T * sum_t dz_t^T M(z_mid) dz_t, length = sum_t sqrt(same),
    with z_mid the segment midpoints and metric_fn(z [N, d]) -> [N, d, d]."""
    b, t1, d = curves.shape
    dz = curves[:, 1:] - curves[:, :-1]
    mid = 0.5 * (curves[:, 1:] + curves[:, :-1])
    m = metric_fn(mid.reshape(-1, d)).reshape(b, t1 - 1, d, d)
    sq = torch.einsum("bti,btij,btj->bt", dz, m, dz)
    return (t1 - 1) * sq.sum(1), sq.clamp_min(0).sqrt().sum(1)


def curve_energy_backward(grad_energy: Tensor, grad_length: Tensor, curves: Tensor,
                          weights: list[Tensor], biases: list[Tensor], acts: list[int],
                          rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                          rbf_weight: Tensor | None = None, zeta: float = 0.0) -> Tensor:
    """d(grad_energy . energy + grad_length . length) / d curves [B, T+1, d], by the chain
    rule written out (no autograd, so it can run inside an op's kernel).

    With delta_t = g_{t+1} - g_t: d/d delta_t = (2 T ge + gl / ||delta_t||) delta_t (the
    length term's subgradient is 0 where delta_t = 0); then back through g = cat(mu, sigma).
    """
    b, t1, d = curves.shape
    z = curves.reshape(-1, d)
    h, derivs = z, []
    for w, bias, code in zip(weights, biases, acts):
        a = h @ w.T + bias
        derivs.append(activation_deriv(a, code))
        h = activation(a, code)
    feats = h
    if rbf_centres is not None:
        feats = torch.cat([h, rbf_sigma(z, rbf_centres, rbf_lambda, rbf_weight, zeta)], dim=1)
    g = feats.view(b, t1, -1)
    delta = g[:, 1:] - g[:, :-1]
    norm = delta.norm(dim=-1)
    coef = 2.0 * (t1 - 1) * grad_energy[:, None] + torch.where(
        norm > 0, grad_length[:, None] / torch.where(norm > 0, norm, 1.0), 0.0)
    gd = coef[..., None] * delta
    gg = torch.zeros_like(g)
    gg[:, :-1] -= gd
    gg[:, 1:] += gd
    gz = features_backward(gg.view(b * t1, -1), z, feats, derivs, weights, rbf_centres, rbf_lambda, rbf_weight)
    return gz.view(b, t1, d)


def features_backward(gg: Tensor, z: Tensor, feats: Tensor, derivs: list[Tensor], weights: list[Tensor],
                      rbf_centres: Tensor | None = None, rbf_lambda: Tensor | None = None,
                      rbf_weight: Tensor | None = None) -> Tensor:
    """d(gg . g(z)) / dz [p, d] for z [p, d], from each layer's act'(a) (derivs) and the
    features g = feats [p, D or 2D] (sigma is its second half); gg [p, D or 2D]."""
    n_out = weights[-1].shape[0]
    ga = gg[:, :n_out] * derivs[-1]
    for li in range(len(weights) - 1, -1, -1):
        gz = ga @ weights[li]
        if li > 0:
            ga = gz * derivs[li - 1]
    if rbf_centres is not None:
        # sigma = beta^-1/2: d sigma / d beta = -sigma^3 / 2; d v_k / dz = -2 lam_k v_k diff_k
        diff = z[:, None, :] - rbf_centres
        v = torch.exp(-rbf_lambda * (diff ** 2).sum(-1))
        gv = (gg[:, n_out:] * (-0.5) * feats[:, n_out:] ** 3) @ rbf_weight  # [p, K]
        gz = gz + torch.einsum("pk,pkd->pd", gv * v * (-2.0 * rbf_lambda), diff)
    return gz


def lbfgs_two_loop(g: Tensor, s: Tensor, y: Tensor, valid: Tensor, gamma: Tensor) -> Tensor:
    """H g per problem by the textbook two-loop recursion (Nocedal & Wright, Algorithm 7.4),
    pair by pair, newest first: the specification of the geodesic solver's direction
    (latentfast.geometry.core._lbfgs_direction computes the same H g in compact form).

    g [b, n]; s, y [b, m, n] oldest pair first; valid [b, m] (pairs a problem does not hold
    are zero rows and skipped); gamma [b] (H_0 = gamma I).
    """
    rho = torch.where(valid, 1.0 / (s * y).sum(-1), torch.zeros((), dtype=g.dtype, device=g.device))
    q, alphas = g.clone(), {}
    for j in reversed(range(s.shape[1])):
        alphas[j] = rho[:, j] * (s[:, j] * q).sum(1)
        q = q - alphas[j][:, None] * y[:, j]
    r = gamma[:, None] * q
    for j in range(s.shape[1]):
        beta = rho[:, j] * (y[:, j] * r).sum(1)
        r = r + (alphas[j] - beta)[:, None] * s[:, j]
    return r
