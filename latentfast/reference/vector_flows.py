"""Reference of the vector flow ops: a stack of K masked-MLP flow steps on latent vectors.

One step k maps x [B, d] to y [B, d]; its weights arrive already masked (MADE masks for an
autoregressive step, half masks for a coupling step):

    a = x W1^T + b1 (+ ctx_k)                 W1 [H, d], b1 [H], ctx_k [B, H] (IAF context)
    g = relu(a)
    affine:   (m, s) = split(g W2^T + b2)      W2 [2d, H], b2 [2d]
              sigma = sigmoid(s)
              y = x + act * (1 - sigma) * (m - x)     i.e. y = sigma x + (1 - sigma) m where act = 1
              logdet = sum_j act_j log sigma_j        (Kingma et al. 2016, the gated IAF update)
    additive: m = g W2^T + b2                  W2 [d, H], b2 [d]
              y = x + act * m, logdet = 0            (NICE)

act [d] in {0, 1} marks the dimensions a step changes (all ones for MADE, one half for a
coupling). The stack runs k = 0 .. K-1 and sums the log-determinants.

Inverse: the parameters of dimension j depend only on dimensions of lower MADE degree, so
`n_passes` fixed-point sweeps x <- (y - (1 - sigma(x)) m(x)) / sigma(x) (where act, else y)
recover x exactly when n_passes >= the number of distinct degrees (d for MADE, 2 for a
coupling). Each sweep is clamped to +-1e15 (NaN to 0), see sanitize_sweep.
"""
from __future__ import annotations

import torch
from torch import Tensor


def flow_step_params(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                     ctx: Tensor | None) -> tuple[Tensor, Tensor]:
    """The masked MLP of one step: (hidden g [B, H], output o [B, 2d | d])."""
    a = torch.addmm(b1, x, w1.t())
    if ctx is not None:
        a = a + ctx
    g = torch.relu(a)
    return g, torch.addmm(b2, g, w2.t())


def flow_step_transform(x: Tensor, o: Tensor, act: Tensor, additive: bool) -> tuple[Tensor, Tensor]:
    """y and logdet [B] of one step given the MLP output o."""
    d = x.shape[1]
    if additive:
        return x + act * o, x.new_zeros(x.shape[0])
    m, s = o[:, :d], o[:, d:]
    sigma = torch.sigmoid(s)
    y = x + act * (1.0 - sigma) * (m - x)
    return y, (act * torch.nn.functional.logsigmoid(s)).sum(1)


def vector_flow_stack(x: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                      act: Tensor, additive: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of K steps. x [B, d]; ctx [K, B, H] or None; w1 [K, H, d]; b1 [K, H];
    w2 [K, O, H]; b2 [K, O] (O = 2d affine, d additive); act [K, d].

    Returns (y [B, d], logdet [B], xs [K, B, d] the input of each step, out [K, B, O] the
    MLP output of each step): the last two are what the backward keeps (the hidden layers
    [K, B, H], the big ones, are recomputed).
    """
    logdet = x.new_zeros(x.shape[0])
    xs, os_ = [], []
    for k in range(w1.shape[0]):
        _, o = flow_step_params(x, w1[k], b1[k], w2[k], b2[k], None if ctx is None else ctx[k])
        xs.append(x)
        os_.append(o)
        x, ld = flow_step_transform(x, o, act[k], additive)
        logdet = logdet + ld
    return x, logdet, torch.stack(xs), torch.stack(os_)


SWEEP_BOUND = 1e15


def sanitize_sweep(x: Tensor) -> Tensor:
    """Clamp an intermediate sweep to [-SWEEP_BOUND, SWEEP_BOUND] and NaN to 0. The dimensions
    not yet fixed hold garbage that can overflow, and a masked (zero) weight times Inf is
    NaN, which would reach the fixed dimensions too; clamping garbage changes nothing else,
    so the result is exact whenever the true inverse lies within the bound."""
    return torch.nan_to_num(x, nan=0.0).clamp(-SWEEP_BOUND, SWEEP_BOUND)


def inverse_sweep(x: Tensor, y: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, c: Tensor | None,
                  act: Tensor, additive: bool) -> Tensor:
    """One fixed-point sweep of one step's inverse: x <- (y - (1 - sigma(x)) m(x)) / sigma(x)
    where act (y - m(x) additive), y elsewhere, then sanitize_sweep."""
    _, o = flow_step_params(x, w1, b1, w2, b2, c)
    if additive:
        x = y - act * o
    else:
        d = y.shape[1]
        sigma = torch.sigmoid(o[:, d:])
        x = torch.where(act > 0, (y - (1.0 - sigma) * o[:, :d]) / sigma, y)
    return sanitize_sweep(x)


def vector_flow_stack_inverse(y: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                              act: Tensor, additive: bool, n_passes: int, differentiable: bool = True
                              ) -> tuple[Tensor, Tensor]:
    """x with stack(x) = y, and the forward log-determinant at x (so log p(y) =
    log p_base(x) - logdet). Each step is inverted by `n_passes` fixed-point sweeps from x = y.
    differentiable=False runs only those sweeps, for callers that differentiate by other means
    or not at all (the custom op's body, whose backward is the implicit one); its results are
    not for differentiating (x carries no derivative).

    Derivatives (autograd, forward-mode AD, torch.func) are those of the exact inverse, by the
    implicit-function theorem, as the kernels' backward gives them: each step's value comes
    from sweeps on detached tensors, and its derivatives from n_passes + 1 more sweeps started
    at that detached solution (x + (r - r.detach()), the value unchanged). Where the Jacobian
    of a sweep is nilpotent within n_passes + 1 (masked weights, enough passes), those sweeps
    sum the Neumann series (I - J)^-1 exactly at the solution. Differentiating the sweeps from
    x = y instead gives the same derivatives for every weight the masks keep, but not for the
    masked (zero) entries themselves, which then get the derivative of the truncated
    iteration rather than of the inverse."""
    logdet = y.new_zeros(y.shape[0])
    for k in reversed(range(w1.shape[0])):
        step = (w1[k], b1[k], w2[k], b2[k], None if ctx is None else ctx[k])
        with torch.no_grad():
            const = [None if t is None else t.detach() for t in step]
            y0, a0 = y.detach(), act[k].detach()
            x0 = y0
            for _ in range(n_passes):
                x0 = inverse_sweep(x0, y0, *const, a0, additive)
        x = x0
        if differentiable:
            r = x0
            for _ in range(n_passes + 1):
                r = inverse_sweep(r, y, *step, act[k], additive)
            x = x0 + (r - r.detach())
        _, o = flow_step_params(x, *step)
        logdet = logdet + flow_step_transform(x, o, act[k], additive)[1]
        y = x
    return y, logdet


def gate_backward(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, o: Tensor, act: Tensor, additive: bool
                  ) -> tuple[Tensor, Tensor]:
    """(grad o [B, O], the direct part of grad x [B, d]) of one step's gated update."""
    if additive:
        return grad_y * act, grad_y
    d = x.shape[1]
    m, sigma = o[:, :d], torch.sigmoid(o[:, d:])
    gm = grad_y * act * (1.0 - sigma)
    gs = (act * (grad_logdet[:, None] - grad_y * (m - x) * sigma)) * (1.0 - sigma)
    return torch.cat([gm, gs], 1), grad_y * (1.0 - act * (1.0 - sigma))


def vector_flow_stack_backward(grad_y: Tensor, grad_logdet: Tensor, xs: Tensor, out: Tensor, ctx: Tensor | None,
                               w1: Tensor, b1: Tensor, w2: Tensor, act: Tensor, additive: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, ctx (empty when None), w1, b1, w2, b2) of the stack, steps in reverse,
    recomputing each hidden layer from the saved step input."""
    g = grad_y
    grads = {n: [] for n in ("ctx", "w1", "b1", "w2", "b2")}
    for k in reversed(range(w1.shape[0])):
        a = torch.addmm(b1[k], xs[k], w1[k].t())
        if ctx is not None:
            a = a + ctx[k]
        hidden = torch.relu(a)
        go, gx = gate_backward(g, grad_logdet, xs[k], out[k], act[k], additive)
        ga = (go @ w2[k]) * (a > 0)
        g = gx + ga @ w1[k]
        for n, v in (("ctx", ga), ("w1", ga.t() @ xs[k]), ("b1", ga.sum(0)), ("w2", go.t() @ hidden),
                     ("b2", go.sum(0))):
            grads[n].append(v)
    stacked = {n: torch.stack(v[::-1]) for n, v in grads.items()}
    gctx = stacked["ctx"] if ctx is not None else xs.new_empty(0)
    return g, gctx, stacked["w1"], stacked["b1"], stacked["w2"], stacked["b2"]


def weight_grads(ga: Tensor, go: Tensor, xs: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad w1 [K, H, d], grad b1 [K, H], grad w2 [K, O, H], grad b2 [K, O]) from the
    per-step gradients of the pre-activations ga [K, B, H] and outputs go [K, B, O]:
    batched GEMMs over K."""
    return (torch.bmm(ga.transpose(1, 2), xs), ga.sum(1), torch.bmm(go.transpose(1, 2), hidden), go.sum(1))
