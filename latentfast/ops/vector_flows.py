"""Vector flow ops: registration, backend dispatch, autograd, fake kernels.

Ops (namespace ``latentfast::``), a stack of K masked-MLP flow steps on x [B, d] (math in
latentfast/reference/vector_flows.py):
- ``vector_flow_stack(x, ctx, w1, b1, w2, b2, act, additive)`` -> (y [B, d], logdet [B]);
- ``vector_flow_stack_train(...)`` -> (y, logdet, xs [K, B, d], out [K, B, O]): the same,
  keeping each step's input and MLP output for the backward (the hidden layers are
  recomputed there); what the public wrapper calls under torch.compile when gradients are
  needed (in eager mode it calls the kernels through ``_EagerStack``, which with the cpp
  backend also keeps the hidden layers when d is large, see KEEP_HIDDEN_MIN_D);
- ``vector_flow_stack_backward(grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act, additive)``
  -> grads of (x, ctx (empty without ctx), w1, b1, w2, b2);
- ``vector_flow_stack_inverse(y, ctx, w1, b1, w2, b2, act, additive, n_passes)`` -> (x,
  logdet): the slow direction, all fixed-point sweeps inside one call (no autograd: the public
  function differentiates it by the implicit-function theorem when gradients are wanted).

Public functions: :func:`vector_flow_stack`, :func:`vector_flow_stack_inverse` and the
one-step forms :func:`made_flow_step`, :func:`made_flow_step_inverse` (K = 1, act = 1).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

from latentfast import _ext  # noqa: F401  (loads latentfast_cpp kernels when built)
from latentfast import backend
from latentfast.ops._amp import float32_under_autocast
from latentfast.ops._autograd import (graph_wanted, op_backward, reference_vjp, reject_tangents, route_transforms,
                                      routed, under_transform)
from latentfast.ops._checks import (can_read_back, check_finite_together, check_tensor, context_value,
                                   passed_before, remember_passed)
from latentfast.reference import vector_flows as ref


def _triton():
    return backend.triton_kernels("vector_flows")


# (mask1, mask2) of the layer whose stack call is running (weights_masked_by), or None.
_masks: contextvars.ContextVar[tuple[Tensor, Tensor] | None] = contextvars.ContextVar("latentfast_vf_masks",
                                                                                     default=None)


def weights_masked_by(mask1: Tensor, mask2: Tensor) -> contextlib.AbstractContextManager[None]:
    """Within the block, the stack calls' weights are w1 * mask1 and w2 * mask2 (what a
    MaskedFlowStack layer passes): the Triton inverse may then take its dependency graph from
    the masks, which contain the weights' graph (a product is zero where its mask is) and,
    being a layer's constant buffers, are read back once rather than at every training step.
    Not while torch.compile traces (a trace cannot set a ContextVar): a no-op there."""
    return context_value(_masks, (mask1, mask2))


def masks_in_effect() -> tuple[Tensor, Tensor] | None:
    """The (mask1, mask2) set by weights_masked_by around this call, or None."""
    return _masks.get()


# The eager autograd path keeps each step's hidden layer for the backward (as eager PyTorch
# does) instead of recomputing it (a [B, d] x [d, H] GEMM per step) when the cpp backend
# runs, d >= KEEP_HIDDEN_MIN_D and K*B*H stays under KEEP_HIDDEN_MAX_BYTES; otherwise (and in
# the custom ops traced by torch.compile) it is recomputed. Measured on 2 cores, fwd+bwd:
# d = 32 (K=8, B=4096, H=256) recomputing is 15% faster (2d flops per kept byte are cheaper
# than the memory round trip); d = 128 and 256 keeping is 8% faster, d = 512 (H=1024) 8%.
KEEP_HIDDEN_MIN_D = 128
KEEP_HIDDEN_MAX_BYTES = 256 * 2**20


def _keep_hidden(x: Tensor, w1: Tensor) -> bool:
    k, h = w1.shape[0], w1.shape[1]
    return x.shape[1] >= KEEP_HIDDEN_MIN_D and k * x.shape[0] * h * x.element_size() <= KEEP_HIDDEN_MAX_BYTES


def _fwd_kept(x, ctx, w1, b1, w2, b2, act, additive: bool, save: bool, keep_hidden: bool = False):
    """(y, logdet, xs, out, hidden or None); hidden only from the cpp backend with keep_hidden."""
    be = backend.select(x.device)
    if be == "cpp":
        y, ld, xs, out, hid = torch.ops.latentfast_cpp.vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, additive,
                                                                       save, keep_hidden)
        return y, ld, xs, out, (hid if save and keep_hidden else None)
    if be == "triton":
        return (*_triton().vector_flow_fwd(x, ctx, w1, b1, w2, b2, act, additive, save), None)
    y, ld, xs, out = ref.vector_flow_stack(x, ctx, w1, b1, w2, b2, act, additive)
    if not save:
        xs = out = x.new_empty(0)
    return y.contiguous(), ld.contiguous(), xs.contiguous(), out.contiguous(), None


def _fwd(x, ctx, w1, b1, w2, b2, act, additive: bool, save: bool):
    return _fwd_kept(x, ctx, w1, b1, w2, b2, act, additive, save)[:4]


@torch.library.custom_op("latentfast::vector_flow_stack", mutates_args=())
def _vector_flow_stack(x: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: Tensor,
                       additive: bool) -> tuple[Tensor, Tensor]:
    reject_tangents("vector_flow_stack", x, ctx, w1, b1, w2, b2, act, additive)
    y, ld, *_ = _fwd(x, ctx, w1, b1, w2, b2, act, additive, False)
    return y, ld


@torch.library.custom_op("latentfast::vector_flow_stack_train", mutates_args=())
def _vector_flow_stack_train(x: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                             act: Tensor, additive: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    reject_tangents("vector_flow_stack_train", x, ctx, w1, b1, w2, b2, act, additive)
    return _fwd(x, ctx, w1, b1, w2, b2, act, additive, True)


def _bwd(grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act, additive: bool, hidden=None):
    be = backend.select(xs.device)
    args = (grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act, additive)
    if be == "cpp":
        return torch.ops.latentfast_cpp.vector_flow_bwd(*args, hidden)
    if be == "triton":
        return _triton().vector_flow_bwd(*args)
    return tuple(t.contiguous() for t in ref.vector_flow_stack_backward(*args))


@torch.library.custom_op("latentfast::vector_flow_stack_backward", mutates_args=())
def _vector_flow_stack_backward(grad_y: Tensor, grad_logdet: Tensor, xs: Tensor, out: Tensor, ctx: Tensor | None,
                                w1: Tensor, b1: Tensor, w2: Tensor, act: Tensor, additive: bool
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    reject_tangents("vector_flow_stack_backward", grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act, additive)
    return _bwd(grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act, additive)


@torch.library.custom_op("latentfast::vector_flow_stack_inverse", mutates_args=())
def _vector_flow_stack_inverse(y: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                               act: Tensor, additive: bool, n_passes: int) -> tuple[Tensor, Tensor]:
    reject_tangents("vector_flow_stack_inverse", y, ctx, w1, b1, w2, b2, act, additive, n_passes)
    be = backend.select(y.device)
    if be == "cpp":
        return torch.ops.latentfast_cpp.vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, n_passes)
    if be == "triton":
        return _triton().vector_flow_inv(y, ctx, w1, b1, w2, b2, act, additive, n_passes)
    # the plain sweeps where the implicit backward differentiates; the transform route
    # differentiates the body itself
    x, ld = ref.vector_flow_stack_inverse(y, ctx, w1, b1, w2, b2, act, additive, n_passes, differentiable=routed())
    return x.contiguous(), ld.contiguous()


@_vector_flow_stack.register_fake
def _(x, ctx, w1, b1, w2, b2, act, additive):
    return x.new_empty(x.shape), x.new_empty(x.shape[0])


@_vector_flow_stack_train.register_fake
def _(x, ctx, w1, b1, w2, b2, act, additive):
    (b, d), k = x.shape, w1.shape[0]
    return x.new_empty(x.shape), x.new_empty(b), x.new_empty((k, b, d)), x.new_empty((k, b, w2.shape[1]))


@_vector_flow_stack_backward.register_fake
def _(grad_y, grad_logdet, xs, out, ctx, w1, b1, w2, act, additive):
    gctx = ctx.new_empty(ctx.shape) if ctx is not None else xs.new_empty(0)
    return (grad_y.new_empty(grad_y.shape), gctx, w1.new_empty(w1.shape), b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), xs.new_empty((w2.shape[0], w2.shape[1])))


@_vector_flow_stack_inverse.register_fake
def _(y, ctx, w1, b1, w2, b2, act, additive, n_passes):
    return y.new_empty(y.shape), y.new_empty(y.shape[0])


def _grads(grads, has_ctx: bool):
    gx, gctx, gw1, gb1, gw2, gb2 = grads
    return gx, (gctx if has_ctx else None), gw1, gb1, gw2, gb2, None, None


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _reference_grads(ctx, x, c, w1, b1, w2, b2, act, grad_y, grad_logdet):
    # create_graph=True (see ops/_autograd.py): the reference's gradients, as a graph
    return reference_vjp(ref.vector_flow_stack, (x, c, w1, b1, w2, b2, act, ctx.additive), (grad_y, grad_logdet))


def _save_stack_inputs(ctx, inputs, output):
    x, c, w1, b1, w2, b2, act, additive = inputs
    ctx.set_materialize_grads(False)
    ctx.has_ctx, ctx.additive = c is not None, additive
    ctx.save_for_backward(x, c, w1, b1, w2, b2, act)


@op_backward
def _vector_flow_stack_bwd(ctx, grad_y, grad_logdet):
    # Inference op under autograd (direct torch.ops call): recompute keeping the activations.
    x, c, w1, b1, w2, b2, act = ctx.saved_tensors
    if graph_wanted(grad_y, grad_logdet, x, c, w1, b1, w2, b2):
        return _reference_grads(ctx, x, c, w1, b1, w2, b2, act, grad_y, grad_logdet)
    y, ld, xs, out = _fwd(x, c, w1, b1, w2, b2, act, ctx.additive, True)
    grads = _vector_flow_stack_backward(_zeros_if_none(grad_y, y), _zeros_if_none(grad_logdet, ld), xs, out, c,
                                        w1, b1, w2, act, ctx.additive)
    return _grads(grads, ctx.has_ctx)


def _save_stack_train(ctx, inputs, output):
    x, c, w1, b1, w2, b2, act, additive = inputs
    ctx.set_materialize_grads(False)
    ctx.has_ctx, ctx.additive = c is not None, additive
    ctx.save_for_backward(x, c, w1, b1, w2, b2, act, *output)  # x, b2: for a double backward only


@op_backward
def _vector_flow_stack_train_bwd(ctx, grad_y, grad_logdet, *_unused):
    x, c, w1, b1, w2, b2, act, y, ld, xs, out = ctx.saved_tensors
    if graph_wanted(grad_y, grad_logdet, x, c, w1, b1, w2, b2):
        return _reference_grads(ctx, x, c, w1, b1, w2, b2, act, grad_y, grad_logdet)
    grads = _vector_flow_stack_backward(_zeros_if_none(grad_y, y), _zeros_if_none(grad_logdet, ld), xs, out, c,
                                        w1, b1, w2, act, ctx.additive)
    return _grads(grads, ctx.has_ctx)


_vector_flow_stack.register_autograd(_vector_flow_stack_bwd, setup_context=_save_stack_inputs)
_vector_flow_stack_train.register_autograd(_vector_flow_stack_train_bwd, setup_context=_save_stack_train)


class _EagerStack(torch.autograd.Function):
    """The same kernels and formulas as the custom ops above, without their Python dispatch
    layer (about 0.1 ms per call each way, which dominates at VAE batch sizes). Used by the
    public wrapper in eager mode; torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, c, w1, b1, w2, b2, act, additive):
        y, ld, xs, out, hidden = _fwd_kept(x, c, w1, b1, w2, b2, act, additive, True, _keep_hidden(x, w1))
        ctx.set_materialize_grads(False)
        ctx.has_ctx, ctx.additive, ctx.kept = c is not None, additive, hidden is not None
        ctx.save_for_backward(c, w1, b1, w2, act, xs, out, hidden, x, b2)  # x, b2: for a double backward
        return y, ld

    @staticmethod
    @op_backward
    def backward(ctx, grad_y, grad_logdet):
        c, w1, b1, w2, act, xs, out, hidden, x, b2 = ctx.saved_tensors
        if graph_wanted(grad_y, grad_logdet, x, c, w1, b1, w2, b2):
            return _reference_grads(ctx, x, c, w1, b1, w2, b2, act, grad_y, grad_logdet)
        grad_y = torch.zeros_like(xs[0]) if grad_y is None else grad_y.contiguous()
        grad_logdet = xs.new_zeros(xs.shape[1]) if grad_logdet is None else grad_logdet.contiguous()
        return _grads(_bwd(grad_y, grad_logdet, xs, out, c, w1, b1, w2, act, ctx.additive, hidden), ctx.has_ctx)


def _step_cotangent(base: Tensor, coef: Tensor, neg_inv: Tensor | None, on: Tensor, w1k: Tensor, w2k: Tensor,
                    n_passes: int) -> Tensor:
    """u = sum_{i <= n_passes} M^i base for one step of the inverse's backward, where M u =
    neg_inv * N^T u (additive: -N^T u) and N^T u = W1^T (on * (W2^T (coef * u))): the
    iteration u <- base + M u from u = base, n_passes times (see _ImplicitInverse), each
    term a vector-Jacobian product through the step's MLP."""
    u = base
    for _ in range(n_passes):
        v = ((((coef * u[:, None, :]).flatten(1)) @ w2k) * on) @ w1k
        u = base - v if neg_inv is None else torch.addcmul(base, v, neg_inv)
    return u


class _ImplicitInverse(torch.autograd.Function):
    """The inverse by the kernel, differentiated by the implicit-function theorem.

    Step k's inverse x_{k-1} = f_k^-1(x_k) has d x_{k-1} / d x_k = J_k^-1 and
    d x_{k-1} / d theta_k = -J_k^-1 df_k/dtheta_k (J_k = df_k/dx at the solution), so from the
    cotangent a on x_{k-1} (plus the log-det's share, ld_k being a function of x_{k-1}) the
    backward solves J_k^T u = a', passes u on to x_k and takes the weight gradients as the
    forward step's vector-Jacobian product with cotangents (-u, grad_logdet). J_k = D + N with
    D the gate's diagonal and N the MLP's part, nilpotent for MADE masks, so u = (a' - N^T u)
    / D converges exactly, each iteration one vector-Jacobian product through the step's MLP
    (two GEMMs) at fixed hidden values. When n_passes sweeps from x = y reach the inverse
    exactly, (D^-1 N)^(n_passes + 1) = 0 (the sweeps start exact on the dimensions a step
    leaves alone, whose rows of N are zero, and a cotangent may sit on those too), so
    n_passes + 1 terms are exact: a coupling inverted in one sweep needs two.
    These are the derivatives of the exact inverse, the same as autograd through the
    reference's sweeps (test_inverse_gradients_are_the_implicit_function_derivatives).
    On the cpp backend the same system is solved in one pass per step in dependency order
    (vector_flow_inv_grad, csrc/flows/vector_flow_cpu.cpp), and on the triton backend by its
    Triton port (kernels/vector_flows.py, the order planned on the host), and the weight
    gradients come from the stack's backward with cotangents (-u, grad_logdet); the iterations
    remain for the reference backend and for steps without such an order within n_passes
    levels. The cpp inverse (vector_flow_inv_train) also returns the forward stack at its
    solution (step inputs, MLP outputs, hidden layers) for this backward, which the other
    backends recompute by a forward from x."""

    @staticmethod
    def forward(ctx, y, c, w1, b1, w2, b2, act, additive, n_passes):
        stack = ()
        be = backend.select(y.device)
        with torch.no_grad():
            if be == "cpp":
                # the inverse also returns the forward stack at its solution (step inputs, MLP
                # outputs, hidden layers), which the backward would otherwise recompute
                x, ld, *stack = torch.ops.latentfast_cpp.vector_flow_inv_train(y, c, w1, b1, w2, b2, act, additive,
                                                                               n_passes)
            else:
                x, ld = _vector_flow_stack_inverse(y, c, w1, b1, w2, b2, act, additive, n_passes)
        # the Triton inverse's dependency graph, read back for this forward, for the backward's
        # solve (whose unpacked saved tensors are new Python objects the memo does not know)
        ctx.graph = _triton().graph_entry(w1, w2, act, additive) if be == "triton" else None
        ctx.set_materialize_grads(False)
        ctx.additive, ctx.n_passes, ctx.has_ctx, ctx.saved_stack = additive, n_passes, c is not None, bool(stack)
        ctx.save_for_backward(y, x, c, w1, b1, w2, b2, act, *stack)
        return x, ld

    @staticmethod
    @op_backward
    def backward(ctx, grad_x, grad_ld):
        y, x, c, w1, b1, w2, b2, act, *stack = ctx.saved_tensors
        if graph_wanted(grad_x, grad_ld, y, c, w1, b1, w2, b2):  # create_graph=True: the reference's sweeps
            return reference_vjp(ref.vector_flow_stack_inverse, (y, c, w1, b1, w2, b2, act, ctx.additive,
                                                                 ctx.n_passes), (grad_x, grad_ld))
        additive = ctx.additive
        a = torch.zeros_like(x) if grad_x is None else grad_x
        gld = x.new_zeros(x.shape[0]) if grad_ld is None else grad_ld

        def with_weight_grads(u, xs, out, kept=None):  # the stack's backward with cotangents (-u, gld)
            _, gctx, *gw = _bwd(-u, gld, xs, out, c, w1, b1, w2, act, additive, kept)
            return (u, (gctx if ctx.has_ctx else None), *gw, None, None, None)

        if ctx.saved_stack:
            # u = grad y by one transposed solve per step in dependency order (C++), then the
            # weight gradients as the stack's backward with cotangents (-u, grad_logdet): for
            # every step, -u_k on y_k is what the standard backward passes down, since
            # J_k^T u_k = u_{k-1} + gld d ld_k / d x_{k-1}. xs, out, kept: the step inputs, MLP
            # outputs and hidden layers at the solution, saved by the cpp backend's inverse.
            xs, out, kept = stack
            u = torch.ops.latentfast_cpp.vector_flow_inv_grad(a, gld, xs, out, kept, w1, w2, act, additive,
                                                              ctx.n_passes)
            if u.dim() == 2:  # (a 1-D empty tensor: a step without a dependency order within n_passes levels)
                return with_weight_grads(u, xs, out, kept)
        # The forward stack from x (truncated sweeps: the iterations linearise there on every
        # backend, not at the inverse's own intermediate values).
        _, _, xs, out, _ = _fwd_kept(x, c, w1, b1, w2, b2, act, additive, True, False)
        if backend.select(x.device) == "triton":
            # the same one-pass solve in a Triton kernel (None: a step without an order within
            # n_passes levels), then the stack's backward kernel with cotangents (-u, grad_logdet)
            if ctx.graph is not None:
                _triton().adopt_graph(ctx.graph, w1, w2, act, additive)
            u = _triton().vector_flow_inv_grad(a, gld, xs, out, c, w1, b1, w2, act, additive, ctx.n_passes)
            if u is not None:
                return with_weight_grads(u, xs, out)
        zeros, d = torch.zeros_like(x), x.shape[1]
        gas, gos, hidden = [], [], []  # per step: grad of the pre-activation and of the MLP output
        for k in range(w1.shape[0]):
            xk, ok = xs[k], out[k]
            pre = torch.addmm(b1[k], xk, w1[k].t())
            if c is not None:
                pre = pre + c[k]
            on = pre > 0

            def mlp_vjp(go):  # go [B, O] -> its vector-Jacobian product on x through the MLP
                return ((go @ w2[k]) * on) @ w1[k]

            go_ld, _ = ref.gate_backward(zeros, gld, xk, ok, act[k], additive)
            a_full = a + mlp_vjp(go_ld)  # the cotangent on x_{k-1}, with the log-det's share
            # The gate's part of J^T u is D u plus the MLP's VJP of go = coef * u (per part of
            # the MLP output: m, and s for the affine gate), as ref.gate_backward(u, 0) gives.
            if additive:
                coef, base, neg_inv = act[k].expand(1, 1, d), a_full, None
            else:
                sig = torch.sigmoid(ok[:, d:])
                gate = act[k] * (1.0 - sig)  # 1 - D
                coef = torch.stack([gate, (xk - ok[:, :d]) * sig * gate], 1)
                inv = 1.0 / (1.0 - gate)
                base, neg_inv = a_full * inv, -inv
            u = _step_cotangent(base, coef, neg_inv, on, w1[k], w2[k], ctx.n_passes)
            go, _ = ref.gate_backward(-u, gld, xk, ok, act[k], additive)
            gos.append(go)
            gas.append((go @ w2[k]) * on)
            hidden.append(torch.relu(pre))
            a = u
        ga = torch.stack(gas)
        return (a, (ga if ctx.has_ctx else None), *ref.weight_grads(ga, torch.stack(gos), xs, torch.stack(hidden)),
                None, None, None)


def _check_stack(name: str, x: Tensor, ctx: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 act: Tensor | None, additive: bool) -> Tensor:
    """Validate a stack call; returns act (ones when None)."""
    check_tensor("x", x, 2)
    b, d = x.shape
    check_tensor("w1", w1, 3, like=x)
    k, h = w1.shape[0], w1.shape[1]
    o = d if additive else 2 * d
    if k < 1 or w1.shape[2] != d:
        raise ValueError(f"{name}: w1 must be [K >= 1, H, {d}], got {tuple(w1.shape)}")
    expect = {"b1": (k, h), "w2": (k, o, h), "b2": (k, o)}
    for tname, t in (("b1", b1), ("w2", w2), ("b2", b2)):
        check_tensor(tname, t, len(expect[tname]), like=x)
        if tuple(t.shape) != expect[tname]:
            kind = "additive" if additive else "affine"
            raise ValueError(f"{name}: {tname} must be {expect[tname]} ({kind} steps), got {tuple(t.shape)}")
    if act is None:
        act = x.new_ones((k, d))
    else:
        check_tensor("act", act, 2, like=x)
        if tuple(act.shape) != (k, d):
            raise ValueError(f"{name}: act must be [{k}, {d}], got {tuple(act.shape)}")
        # A read-back (not while tracing, inside torch.func transforms or during CUDA graph
        # capture), once per version of a layer's act buffer rather than per call.
        if can_read_back(act) and not passed_before("act", act):
            if not bool(((act == 0) | (act == 1)).all()):
                raise ValueError(f"{name}: act must hold only 0 and 1")
            remember_passed("act", act)
    if ctx is not None:
        check_tensor("ctx", ctx, 3, like=x)
        if tuple(ctx.shape) != (k, b, h):
            raise ValueError(f"{name}: ctx must be [{k}, {b}, {h}], got {tuple(ctx.shape)}")
    return act


@float32_under_autocast
def vector_flow_stack(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: Tensor | None = None,
                      ctx: Tensor | None = None, additive: bool = False) -> tuple[Tensor, Tensor]:
    """K masked-MLP flow steps on latent vectors in one call per direction.

    Args: x [B, d]; w1 [K, H, d], b1 [K, H], w2 [K, 2d, H] (d rows when additive), b2 [K, 2d]
    (already masked: MADE masks for autoregressive steps, half masks for couplings);
    act [K, d] in {0, 1}: the dimensions each step changes (default all); ctx [K, B, H]:
    per-step context added to the hidden pre-activation (IAF), or None.
    Returns (y [B, d], logdet [B] = log|det dy/dx|).

    Example:
        >>> y, logdet = vector_flow_stack(x, w1, b1, w2, b2)
    """
    act = _check_stack("vector_flow_stack", x, ctx, w1, b1, w2, b2, act, additive)
    check_finite_together([("x", x)] + ([] if ctx is None else [("ctx", ctx)]))
    args = (x.contiguous(), ctx, w1, b1, w2, b2, act, bool(additive))
    if under_transform(args):  # forward-mode AD or torch.func: the reference (ops/_autograd.py)
        y, ld, *_ = ref.vector_flow_stack(*args)
        return y, ld
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    if torch.compiler.is_compiling():
        if needs_grad:
            y, ld, *_ = _vector_flow_stack_train(*args)
            return y, ld
        return _vector_flow_stack(*args)
    if needs_grad:
        return _EagerStack.apply(*args)
    y, ld, *_ = _fwd(*args, False)
    return y, ld


@float32_under_autocast
def vector_flow_stack_inverse(y: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: Tensor | None = None,
                              ctx: Tensor | None = None, additive: bool = False, n_passes: int | None = None
                              ) -> tuple[Tensor, Tensor]:
    """x with vector_flow_stack(x) = y, and the forward log-determinant at x (so that
    log p(y) = log p_base(x) - logdet). Each step is defined by `n_passes` fixed-point
    sweeps inside the kernel (default d: exact for any MADE ordering; 2 suffices for a
    coupling). The C++ kernel solves a step in dependency order in one pass instead when its
    masked weights allow it and n_passes covers the dependency depth (the same fixed point, to
    rounding).

    Differentiable: with gradients wanted (grad mode on and an input requiring grad, as for a
    module's parameters) the kernel's inverse is differentiated by the implicit-function
    theorem (_ImplicitInverse: per step up to n_passes + 1 vector-Jacobian products through
    the step's MLP in the backward); these are the exact inverse's derivatives when the sweeps
    reach it (MADE or coupling masks with enough passes). Under double backward, forward-mode
    AD, torch.func or torch.compile it runs the reference's sweeps instead (the same
    derivatives, slower)."""
    act = _check_stack("vector_flow_stack_inverse", y, ctx, w1, b1, w2, b2, act, additive)
    check_finite_together([("y", y)] + ([] if ctx is None else [("ctx", ctx)]))
    n_passes = y.shape[1] if n_passes is None else int(n_passes)
    if n_passes < 1:
        raise ValueError(f"n_passes must be >= 1, got {n_passes}")
    args = (y.contiguous(), ctx, w1, b1, w2, b2, act, bool(additive), n_passes)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    if under_transform(args[:6]) or (wants_grad and torch.compiler.is_compiling()):
        return ref.vector_flow_stack_inverse(*args)
    if wants_grad:
        return _ImplicitInverse.apply(*args)
    with torch.no_grad():
        return _vector_flow_stack_inverse(*args)


def made_flow_step(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ctx: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """One autoregressive gated step (MADE + IAF update), the K = 1 case of the stack.

    y = sigma x + (1 - sigma) m with (m, s) = MADE(x), sigma = sigmoid(s), logdet =
    sum log sigma. x [B, d]; w1 [H, d], b1 [H], w2 [2d, H], b2 [2d] (masked); ctx [B, H].
    """
    return vector_flow_stack(x, w1[None], b1[None], w2[None], b2[None], None,
                             None if ctx is None else ctx[None])


def made_flow_step_inverse(y: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ctx: Tensor | None = None,
                           n_passes: int | None = None) -> tuple[Tensor, Tensor]:
    """Inverse of made_flow_step in one call: (x, logdet at x). Defined by n_passes (default d)
    fixed-point sweeps; the C++ kernel solves the d dimensions in dependency order instead,
    which gives the same fixed point (see vector_flow_stack_inverse)."""
    return vector_flow_stack_inverse(y, w1[None], b1[None], w2[None], b2[None], None,
                                     None if ctx is None else ctx[None], n_passes=n_passes)


# Direct calls (torch.ops.latentfast.*) under forward-mode AD / torch.func: ops/_autograd.py.
route_transforms(_vector_flow_stack, _vector_flow_stack_train, _vector_flow_stack_backward, _vector_flow_stack_inverse)
