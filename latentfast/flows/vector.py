"""Flows on latent vectors: MADE, IAF, MAF, vector couplings, permutations, LU linear layers.

Convention for every transform here (base -> data, as torch.distributions transforms):
``forward(z, context=None) -> (x, logdet)`` with logdet = log|det dx/dz| [B], and
``inverse(x, context=None) -> (z, logdet)`` with the same logdet (the forward's, evaluated
at z), so that log p(x) = log p_base(z) - logdet. The vectors are [B, d], or of any leading
shape [..., d] as torch.distributions transforms take them (one vector [d], samples
[S, B, d]) with a context of the same leading shape [..., c], and logdet [...].

IAF, MAF and the couplings are stacks of K masked-MLP steps that run as one
``latentfast::vector_flow_stack`` call per direction (C++ on CPU, Triton on GPU):
- IAF (Kingma et al. 2016): forward (sampling) is one fast pass with the gated update
  z <- sigma z + (1 - sigma) m; the density direction is sequential over the d dimensions
  (defined as d fixed-point sweeps; the C++ kernel solves them in dependency order in one
  pass, the Triton kernel runs the sweeps), still one call.
- MAF (Papamakarios et al. 2017): the same steps used the other way round: the density
  direction (inverse) is the fast pass, sampling is the sequential one.
- VectorAffineCoupling / VectorAdditiveCoupling (RealNVP / NICE): half masks, so both
  directions are one pass per step.
Consecutive MADE steps reverse the variable order; couplings alternate the halves.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from latentfast.ops import flows as flow_ops
from latentfast.ops import vector_flows as ops
from latentfast.ops._checks import (can_read_back, check_count, check_finite, check_like_model, check_tensor,
                                   passed_before, remember_passed)


def _context_rows(context: Tensor | None, x: Tensor) -> Tensor | None:
    """A context [..., c] that goes with x [..., d] (the same leading shape) as rows [n, c];
    a ValueError for another leading shape; None stays None."""
    if context is None:
        return None
    lead = x.shape[:-1]
    check_tensor("context", context)
    if context.dim() == 0 or context.shape[:-1] != lead:
        raise ValueError(f"context must be [{', '.join([*map(str, lead), 'c'])}] to go with x "
                         f"{tuple(x.shape)}, got {tuple(context.shape)}")
    return context.reshape(-1, context.shape[-1])


def _any_leading_shape(method: Callable) -> Callable:
    """Let a transform's method on vectors [B, d] (and context [B, c]) take x [..., d] with a
    context [..., c] of the same leading shape: it runs on the flattened rows and its
    (y, logdet) come back as [..., d] and [...]."""

    @functools.wraps(method)
    def run(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() in (0, 2):
            return method(self, x, context)  # (which checks x)
        lead = x.shape[:-1]
        y, logdet = method(self, x.reshape(-1, x.shape[-1]), _context_rows(context, x))
        return y.reshape(*lead, y.shape[-1]), logdet.reshape(lead)
    return run


def made_degrees(d: int, hidden: int, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MADE degrees (Germain et al. 2015): inputs get 1..d in `order` (default natural),
    hidden units take 1..d-1 in turn (0 when d = 1, i.e. no input feeds them), sorted so the
    hidden units come in ascending degree. The order of the hidden units does not change what
    the network can express; sorted, the masks are block-triangular, which the C++ kernel
    uses to skip the zero blocks of the GEMMs. On the CPU whatever the default device (layer
    constants, checked here: a model built under ``with torch.device("meta")`` too)."""
    cpu = torch.device("cpu")
    deg_in = torch.arange(1, d + 1, device=cpu) if order is None else torch.as_tensor(order, device=cpu).long() + 1
    if sorted(deg_in.tolist()) != list(range(1, d + 1)):
        raise ValueError(f"order must be a permutation of 0..{d - 1}")
    deg_h = ((torch.arange(hidden, device=cpu) % (d - 1) + 1).sort().values if d > 1
             else torch.zeros(hidden, dtype=torch.long, device=cpu))
    return deg_in, deg_h


def made_masks(deg_in: Tensor, deg_h: Tensor, n_out_blocks: int) -> tuple[Tensor, Tensor]:
    """Masks of input->hidden [H, d] (deg_h >= deg_in) and hidden->output [n*d, H]
    (deg_out > deg_h, with deg_out = deg_in repeated for each output block), 0/1 in the
    default dtype, as the parameters they go with."""
    dtype = torch.get_default_dtype()
    m1 = (deg_h[:, None] >= deg_in[None, :]).to(dtype)
    m2 = (deg_in[:, None] > deg_h[None, :]).to(dtype).repeat(n_out_blocks, 1)
    return m1, m2


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask [out, in] (MADE)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask must be [{out_features}, {in_features}], got {tuple(mask.shape)}")
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def masked_weight(self) -> Tensor:
        """weight * mask (the connections MADE allows)."""
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        """x W_masked^T + b."""
        return nn.functional.linear(x, self.masked_weight(), self.bias)


class MaskedFlowStack(nn.Module):
    """K masked-MLP flow steps fused into one op call (see module docstring).

    Args:
        dim: d.  hidden: H.  n_steps: K.
        kind: "made" (autoregressive), "affine_coupling" or "additive_coupling".
        context_dim: size of a conditioning vector h (IAF posteriors); 0 for none.
        gate_bias: initial bias of s, so sigma = sigmoid(s) starts near 1 (Kingma's
            recommendation; ignored by additive steps).

    forward_stack(x, h) runs the stack (fast pass); inverse_stack(y, h) inverts it.
    """

    def __init__(self, dim: int, hidden: int = 64, n_steps: int = 1, kind: str = "made", context_dim: int = 0,
                 gate_bias: float = 2.0) -> None:
        super().__init__()
        if kind not in ("made", "affine_coupling", "additive_coupling"):
            raise ValueError(f"kind must be 'made', 'affine_coupling' or 'additive_coupling', got {kind!r}")
        if dim < 1 or hidden < 1 or n_steps < 1:
            raise ValueError(f"dim, hidden and n_steps must be >= 1, got {dim}, {hidden}, {n_steps}")
        if kind != "made" and dim < 2:
            raise ValueError("a coupling needs dim >= 2")
        self.dim, self.hidden, self.n_steps, self.kind = dim, hidden, n_steps, kind
        self.additive = kind == "additive_coupling"
        n_blocks = 1 if self.additive else 2
        # the masks and act on the CPU (made_degrees checks the order there), then on the default
        # device with the parameters (under ``with torch.device("meta")``: meta, as they are)
        cpu = torch.device("cpu")
        m1s, m2s, acts = [], [], []
        for k in range(n_steps):
            if kind == "made":
                order = torch.arange(dim, device=cpu) if k % 2 == 0 else torch.arange(dim, device=cpu).flip(0)
                deg_in, deg_h = made_degrees(dim, hidden, order)
                act = torch.ones(dim, device=cpu)
            else:
                first = torch.arange(dim, device=cpu) < dim // 2
                cond = first if k % 2 == 0 else ~first
                deg_in = torch.where(cond, 1, 2)
                deg_h = torch.ones(hidden, dtype=torch.long, device=cpu)
                act = (~cond).to(torch.get_default_dtype())  # the parameters' dtype, as torch.ones above
            m1, m2 = made_masks(deg_in, deg_h, n_blocks)
            m1s.append(m1)
            m2s.append(m2)
            acts.append(act)
        dev = torch.get_default_device()
        self.register_buffer("mask1", torch.stack(m1s).to(dev))
        self.register_buffer("mask2", torch.stack(m2s).to(dev))
        self.register_buffer("act", torch.stack(acts).to(dev))
        # The inverse sweeps: d for an autoregressive order, 1 for a coupling (its
        # conditioning half is never changed, so one sweep recovers the other half).
        self.n_passes = dim if kind == "made" else 1
        bound1, bound2 = dim ** -0.5, hidden ** -0.5
        self.w1 = nn.Parameter(torch.empty(n_steps, hidden, dim).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.zeros(n_steps, hidden))
        self.w2 = nn.Parameter(torch.empty(n_steps, n_blocks * dim, hidden).uniform_(-bound2, bound2) * 0.1)
        b2 = torch.zeros(n_steps, n_blocks * dim)
        if not self.additive:
            b2[:, dim:] = gate_bias
        self.b2 = nn.Parameter(b2)
        self.context = nn.Linear(context_dim, n_steps * hidden) if context_dim > 0 else None
        self.context_dim = context_dim

    def _args(self, x: Tensor, h: Tensor | None) -> tuple:
        check_tensor("x", x, 2)
        if x.shape[1] != self.dim:
            raise ValueError(f"expected latent vectors of size {self.dim}, got shape {tuple(x.shape)}")
        ctx = None
        if self.context is not None:
            if h is None:
                raise ValueError(f"this flow is conditioned on a context of size {self.context_dim}; pass context=")
            check_tensor("context", h, 2)
            if h.shape != (x.shape[0], self.context_dim):
                raise ValueError(f"context must be [{x.shape[0]}, {self.context_dim}], got {tuple(h.shape)}")
            ctx = self.context(h).view(x.shape[0], self.n_steps, self.hidden).transpose(0, 1).contiguous()
        elif h is not None:
            raise ValueError("this flow takes no context (context_dim=0)")
        # act goes in as the buffer itself (not cast to x's dtype: under autocast a half-precision
        # x would give a new tensor each call, and the op checks act once per tensor version)
        return (self.w1 * self.mask1, self.b1, self.w2 * self.mask2, self.b2, self.act, ctx)

    @_any_leading_shape
    def forward_stack(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The K steps on x [B, d] (context h [B, c] or None; or [..., d] with h [..., c]) in
        one vector_flow_stack call: (y, log|det dy/dx| [B])."""
        w1, b1, w2, b2, act, ctx = self._args(x, h)
        return ops.vector_flow_stack(x, w1, b1, w2, b2, act, ctx, self.additive)

    @_any_leading_shape
    def inverse_stack(self, y: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x with forward_stack(x, h)[0] = y, and the forward's log|det| at x [B]
        (vector_flow_stack_inverse)."""
        w1, b1, w2, b2, act, ctx = self._args(y, h)
        # (the Triton inverse plans its order from the masks, read back once, not every step)
        with ops.weights_masked_by(self.mask1, self.mask2):
            return ops.vector_flow_stack_inverse(y, w1, b1, w2, b2, act, ctx, self.additive, self.n_passes)


class IAF(MaskedFlowStack):
    """Inverse autoregressive flow: forward(z) -> (x, logdet) is one fast pass (sampling,
    reparameterised posteriors); inverse(x) is the sequential direction: one kernel call
    without gradients, differentiated by the implicit-function theorem when they are wanted
    (ops.vector_flow_stack_inverse)."""

    def __init__(self, dim: int, hidden: int = 64, n_steps: int = 1, context_dim: int = 0,
                 gate_bias: float = 2.0) -> None:
        super().__init__(dim, hidden, n_steps, "made", context_dim, gate_bias)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z -> x, the fast direction (sampling): (x [B, d], log|det dx/dz| [B])."""
        return self.forward_stack(z, context)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x -> z, the sequential direction (density): (z [B, d], log|det dx/dz| [B] at z)."""
        return self.inverse_stack(x, context)


class MAF(MaskedFlowStack):
    """Masked autoregressive flow: inverse(x) -> (z, logdet) is one fast, differentiable pass
    (density estimation, flow priors); forward(z) (sampling) is the sequential direction
    (one kernel call; differentiated by the implicit-function theorem when
    gradients are wanted, see ops.vector_flow_stack_inverse)."""

    def __init__(self, dim: int, hidden: int = 64, n_steps: int = 1, context_dim: int = 0,
                 gate_bias: float = 2.0) -> None:
        super().__init__(dim, hidden, n_steps, "made", context_dim, gate_bias)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z -> x, the sequential direction (sampling): (x [B, d], log|det dx/dz| [B])."""
        x, neg = self.inverse_stack(z, context)
        return x, -neg

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x -> z, the fast direction (density): (z [B, d], log|det dx/dz| [B])."""
        z, ld = self.forward_stack(x, context)
        return z, -ld


class VectorAffineCoupling(MaskedFlowStack):
    """RealNVP-style affine coupling on vectors with Glow's gated scale, K steps alternating
    halves: y_b = sigma x_b + (1 - sigma) m with (m, s) = MLP(x_a). Both directions fast."""

    def __init__(self, dim: int, hidden: int = 64, n_steps: int = 2, context_dim: int = 0,
                 gate_bias: float = 2.0) -> None:
        super().__init__(dim, hidden, n_steps, "affine_coupling", context_dim, gate_bias)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z -> x: (x [B, d], log|det dx/dz| [B]); both directions are one pass."""
        return self.forward_stack(z, context)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x -> z: (z [B, d], log|det dx/dz| [B] at z)."""
        return self.inverse_stack(x, context)


class VectorAdditiveCoupling(VectorAffineCoupling):
    """NICE additive coupling on vectors: y_b = x_b + m(x_a), logdet 0, halves alternating."""

    def __init__(self, dim: int, hidden: int = 64, n_steps: int = 2, context_dim: int = 0) -> None:
        MaskedFlowStack.__init__(self, dim, hidden, n_steps, "additive_coupling", context_dim)


def _check_vectors(name: str, x: Tensor, dim: int) -> None:
    """x must be [B, dim] (the layers take other leading shapes through _any_leading_shape)."""
    check_tensor(name, x, 2)
    if x.shape[1] != dim:
        raise ValueError(f"{name} must be [B, {dim}], got {tuple(x.shape)}")


class Permutation(nn.Module):
    """A fixed permutation of the coordinates (default: reversal); logdet 0."""

    def __init__(self, dim: int, perm: Tensor | None = None) -> None:
        super().__init__()
        # checked on the CPU, then on the default device (meta under ``with torch.device("meta")``)
        cpu = torch.device("cpu")
        perm = torch.arange(dim, device=cpu).flip(0) if perm is None else torch.as_tensor(perm, device=cpu).long()
        if sorted(perm.tolist()) != list(range(dim)):
            raise ValueError(f"perm must be a permutation of 0..{dim - 1}")
        dev = torch.get_default_device()
        self.register_buffer("perm", perm.to(dev))
        self.register_buffer("inv_perm", torch.argsort(perm).to(dev))

    def _check_buffers(self) -> None:
        # perm and inv_perm come back from a state dict as they were saved: a repeated index,
        # or an inv_perm that does not undo perm, would make the inverse silently wrong.
        # Checked once per version of the buffers (one read-back).
        perm, inv = self.perm, self.inv_perm
        if not can_read_back(perm) or passed_before("permutation", perm, inv):
            return
        d = perm.shape[0]
        ar = torch.arange(d, device=perm.device)
        with torch.no_grad():
            valid = (perm.sort().values == ar).all()
            undone = (torch.empty_like(perm).scatter_(0, perm.clamp(0, max(d - 1, 0)), ar) == inv).all()
            ok = bool(valid & undone)
        if not ok:
            raise ValueError(f"Permutation: perm must be a permutation of 0..{d - 1} and inv_perm its inverse "
                             "(argsort(perm)); a loaded state dict broke them")
        remember_passed("permutation", perm, inv)

    @_any_leading_shape
    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z[:, perm], zeros [B])."""
        _check_vectors("z", z, self.perm.shape[0])
        self._check_buffers()
        return z[:, self.perm], z.new_zeros(z.shape[0])

    @_any_leading_shape
    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x[:, perm^-1], zeros [B])."""
        _check_vectors("x", x, self.perm.shape[0])
        self._check_buffers()
        return x[:, self.inv_perm], x.new_zeros(x.shape[0])


class LULinear(nn.Module):
    """x = W z + b with W = P L (U + diag(sign_s exp(log_abs_s))) (the lu_weight op):
    log|det W| = sum(log_abs_s), inverse by the triangular-solve W^-1. Starts at a random
    rotation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        w = torch.linalg.qr(torch.randn(dim, dim))[0]
        p, low, up = torch.linalg.lu(w)
        s = torch.diagonal(up)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(low, -1))
        self.upper = nn.Parameter(torch.triu(up, 1))
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W, W^-1, log|det W|)."""
        return flow_ops.lu_weight(self.perm, self.lower, self.upper, self.sign_s, self.log_abs_s)

    @_any_leading_shape
    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(W z + b [B, d], log|det W| per row [B])."""
        _check_vectors("z", z, self.bias.shape[0])
        check_like_model("z", z, self.bias)  # (the matmul had raised torch's RuntimeError)
        w, _, logdet = self.weights()
        return torch.addmm(self.bias, z, w.t()), logdet.expand(z.shape[0])

    @_any_leading_shape
    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(W^-1 (x - b) [B, d], log|det W| per row [B])."""
        _check_vectors("x", x, self.bias.shape[0])
        check_like_model("x", x, self.bias)
        _, w_inv, logdet = self.weights()
        return (x - self.bias) @ w_inv.t(), logdet.expand(x.shape[0])


class Flow(nn.Module):
    """A base distribution pushed through transforms (base -> data), used like a
    torch.distributions.Distribution: log_prob, sample, rsample, sample_and_log_prob.

    Args: dim: d; transforms: list of the modules above (applied in order when sampling);
    base: a torch Distribution over [d] (default: standard normal on the flow's device).

    Calling the flow, ``flow(x, context)``, is ``log_prob``: what module wrappers run
    (DistributedDataParallel, torch.func.functional_call, hooks).

    Example:
        >>> flow = Flow(8, [MAF(8, 64, n_steps=4), LULinear(8)])
        >>> loss = -flow.log_prob(x).mean()
    """

    def __init__(self, dim: int, transforms: list[nn.Module],
                 base: torch.distributions.Distribution | None = None) -> None:
        super().__init__()
        if base is not None:
            if not isinstance(base, torch.distributions.Distribution):
                raise TypeError(f"base must be a torch.distributions.Distribution, got {type(base).__name__}")
            if tuple(base.event_shape) != (dim,) or tuple(base.batch_shape) != ():
                raise ValueError(f"base must be one distribution over vectors [{dim}] (event_shape ({dim},), "
                                 f"batch_shape ()), e.g. Independent(Normal(loc [{dim}], scale [{dim}]), 1) or "
                                 f"MultivariateNormal; got event_shape {tuple(base.event_shape)}, batch_shape "
                                 f"{tuple(base.batch_shape)}")
        self.dim = dim
        self.transforms = nn.ModuleList(transforms)
        self._base = base
        self.register_buffer("_anchor", torch.zeros(dim))

    has_rsample = True  # (as torch.distributions.Distribution says of itself)

    @property
    def event_shape(self) -> torch.Size:
        """[d]: one draw is a vector."""
        return torch.Size([self.dim])

    @property
    def batch_shape(self) -> torch.Size:
        """[]: one distribution (a context conditions it per sample instead)."""
        return torch.Size()

    def base(self) -> torch.distributions.Distribution:
        """The base distribution (the one given, or a standard normal on the flow's device).
        The standard normal skips torch.distributions' argument checks: its parameters are
        valid by construction, and the checks' data-dependent branches (``(scale > 0).all()``,
        the support test of each value) stop torch.export."""
        if self._base is not None:
            return self._base
        loc = self._anchor
        return torch.distributions.Independent(
            torch.distributions.Normal(loc, torch.ones_like(loc), validate_args=False), 1, validate_args=False)

    def _base_log_prob(self, z: Tensor) -> Tensor:
        if z.shape[0] == 0:  # torch.distributions.Independent cannot reshape an empty batch
            return z.new_zeros(0)
        return self.base().log_prob(z)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """log p(x) for x [..., d]: [B] for x [B, d], [] for one point [d], [S, B] for samples
        [S, B, d]. A context goes with x's leading shape ([..., c])."""
        check_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., {self.dim}] (e.g. [B, {self.dim}]), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if x.dim() != 2:
            context = _context_rows(context, x)
        x = x.reshape(-1, self.dim)
        check_finite("x", x)
        total = x.new_zeros(x.shape[0])
        for t in reversed(self.transforms):
            x, ld = t.inverse(x, context)
            total = total + ld
        return (self._base_log_prob(x) - total).reshape(lead)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """log_prob(x, context): the flow as a module computes its log-density, so that
        DistributedDataParallel (which synchronises gradients only of what runs through its own
        call), torch.func.functional_call and forward hooks see the training objective."""
        return self.log_prob(x, context)

    def rsample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """n reparameterised samples [n, d] and their log-density [n]. Differentiable through
        transforms whose forward is the fast pass (IAF, couplings, LULinear); a MAF's forward
        is the sequential inverse: differentiable too (the implicit-function theorem, slower than
        the fast direction's backward; see ops.vector_flow_stack_inverse)."""
        check_count("n", n, 0, "the number of samples")
        z = self.base().rsample((n,))
        logp = self._base_log_prob(z)
        for t in self.transforms:
            z, ld = t(z, context)
            logp = logp - ld
        return z, logp

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """sample's n draws [n, d] with their log-density [n], without gradients."""
        with torch.no_grad():
            return self.rsample_and_log_prob(n, context)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] | int = (), context: Tensor | None = None) -> Tensor:
        """Reparameterised samples [*sample_shape, d]. A context goes with the samples' shape,
        [*sample_shape, c], as log_prob takes it with x (or flattened, [n, c] for n samples)."""
        shape = torch.Size([sample_shape]) if isinstance(sample_shape, int) else torch.Size(sample_shape)
        if isinstance(context, Tensor) and context.dim() != 2:
            if context.dim() == 0 or tuple(context.shape[:-1]) != tuple(shape):
                raise ValueError(f"context must be [{', '.join([*map(str, shape), 'c'])}] to go with sample_shape "
                                 f"{tuple(shape)} (or [{shape.numel()}, c]), got {tuple(context.shape)}")
            context = context.reshape(-1, context.shape[-1])
        return self.rsample_and_log_prob(shape.numel(), context)[0].reshape(*shape, self.dim)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] | int = (), context: Tensor | None = None) -> Tensor:
        """Samples [*sample_shape, d] without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, context)
