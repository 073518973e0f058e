"""Benchmark cases: one setup per case, shared by the timing and the error check.

Each case gives three callables over the same inputs: the eager PyTorch reference (what a
user writes without latentfast), the same function under torch.compile, and latentfast.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from latentfast.ops import flows as ops
from latentfast.ops import geometry as geo_ops
from latentfast.ops import rnn as rnn_ops
from latentfast.reference import flows as ref
from latentfast.reference import geometry as geo_ref


@dataclass
class Case:
    op: str
    name: str
    inputs: tuple[Tensor, ...]
    eager: Callable[..., tuple[Tensor, ...]]
    fast: Callable[..., tuple[Tensor, ...]]
    grad_inputs: tuple[int, ...]  # indices of inputs that get gradients in fwd+bwd
    bytes_moved: int  # fewest bytes one forward must read and write
    flops: int  # forward floating-point operations
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")
    # further baselines timed in the same run, e.g. torch.func vmap(jacfwd) or nn.GRU
    extras: dict[str, Callable[..., tuple[Tensor, ...]]] = field(default_factory=dict)
    compile: bool = True  # False: no torch.compile baseline (e.g. thousands of unrolled steps)
    model: torch.nn.Module | None = None  # the whole model of an end-to-end case (_model_case)


def _eager_glow_step(x, logs, bias, weight, h):
    """ActNorm, 1x1 conv and affine coupling as a user writes them in PyTorch."""
    z = (x + bias[None, :, None, None]) * torch.exp(logs)[None, :, None, None]
    z = F.conv2d(z, weight[:, :, None, None])
    z_a, z_b = z.chunk(2, dim=1)
    shift, raw = h.chunk(2, dim=1)
    s = torch.sigmoid(raw + 2.0)
    return torch.cat([z_a, (z_b + shift) * s], dim=1), F.logsigmoid(raw + 2.0).flatten(1).sum(1)


def _fast_glow_step(x, logs, bias, weight, h):
    a, c = ref.fold_actnorm_into_conv(logs, bias, weight)
    return ops.actnorm_invconv_coupling(x, a, c, h)


def _eager_actnorm_invconv(x, logs, bias, weight):
    z = (x + bias[None, :, None, None]) * torch.exp(logs)[None, :, None, None]
    return (F.conv2d(z, weight[:, :, None, None]),)


def _fast_actnorm_invconv(x, logs, bias, weight):
    a, c = ref.fold_actnorm_into_conv(logs, bias, weight)
    return (ops.actnorm_invconv(x, a, c),)


def _eager_coupling(x_b, h):
    return ref.affine_coupling(x_b, h)


def _fast_coupling(x_b, h):
    return ops.affine_coupling(x_b, h)


def _eager_lu(perm, lower, upper, sign_s, log_abs_s):
    return ref.lu_weight(perm, lower, upper, sign_s, log_abs_s)


def _fast_lu(perm, lower, upper, sign_s, log_abs_s):
    return ops.lu_weight(perm, lower, upper, sign_s, log_abs_s)[:2]


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    """All cases at full size, or at small sizes with quick=True."""
    gen = torch.Generator().manual_seed(0)
    n, c, s = (8, 48, 16) if quick else (32, 48, 32)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    x, h = rnd(n, c, s, s), rnd(n, c, s, s)
    logs, bias = rnd(c, scale=0.1), rnd(c, scale=0.1)
    weight = torch.linalg.qr(torch.randn(c, c, generator=gen))[0].to(device)
    elems, f32 = n * c * s * s, 4
    shape = f"[{n}, {c}, {s}, {s}] float32"
    cases = [
        Case("actnorm_invconv_coupling", "glow_step_affine", (x, logs, bias, weight, h),
             _eager_glow_step, _fast_glow_step, (0, 1, 2, 3, 4),
             bytes_moved=3 * elems * f32, flops=2 * c * elems),
        Case("actnorm_invconv", f"actnorm_invconv {shape}", (x, logs, bias, weight),
             _eager_actnorm_invconv, _fast_actnorm_invconv, (0, 1, 2, 3),
             bytes_moved=2 * elems * f32, flops=2 * c * elems),
        Case("affine_coupling", f"affine_coupling x_b [{n}, {c // 2}, {s}, {s}]",
             (x[:, : c // 2].contiguous(), h), _eager_coupling, _fast_coupling, (0, 1),
             bytes_moved=2 * elems * f32, flops=10 * elems // 2),
    ]
    for cl in ((48,) if quick else (48, 256)):
        p = torch.eye(cl)[torch.randperm(cl, generator=gen)].to(device)
        lu_in = (p, rnd(cl, cl, scale=0.1), rnd(cl, cl, scale=0.1),
                 torch.ones(cl, device=device), rnd(cl, scale=0.1))
        cases.append(Case("lu_weight", f"lu_weight C={cl}", lu_in, _eager_lu, _fast_lu, (1, 2, 4),
                          bytes_moved=5 * cl * cl * f32, flops=2 * cl ** 3))
    cases += model_cases(device, quick)
    cases += geometry_cases(device, quick, gen)
    cases += rnn_cases(device, quick, gen)
    cases += lyapunov_cases(device, quick, gen)
    from latentfast.bench.vector_cases import vector_flow_cases

    cases += vector_flow_cases(device, quick, gen)
    return cases


def _model_case(op: str, name: str, model: torch.nn.Module, x: Tensor,
                loss: Callable[[torch.nn.Module, Tensor], Tensor]) -> Case:
    """An end-to-end case: loss(model, x) with every latentfast op on the reference backend
    (plain PyTorch: what the model costs without the kernels) against the same model with them.
    The fwd+bwd pass backpropagates into all the model's parameters. Each call reseeds the
    random generators (a model that samples noise draws the same in both). No torch.compile
    baseline (compiling a whole model takes minutes); flops counted on the reference forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentfast.backend import use_backend

    devices = [x.device] if x.device.type == "cuda" else []

    def fast(inp):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            return (loss(model, inp),)

    def eager(inp):
        with use_backend("reference"):
            return fast(inp)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager(x)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Case(op, name, (x,), eager, fast, (), bytes_moved=x.numel() * x.element_size() + params,
                flops=counter.get_total_flops(), compile=False, model=model)


def model_cases(device: torch.device, quick: bool, glow_hidden: int | None = None) -> list[Case]:
    """Whole models, end to end (see _model_case), each a loss as a training step computes it:
    - glow_model: a multi-scale Glow (latentfast.flows.Glow, 3 x 32 x 32 images, 3 levels of
      8 steps, coupling nets 128 wide or glow_hidden, batch 16), bits/dim; and the same Glow
      with its parameters in channels_last (`model.to(memory_format=torch.channels_last)`, the
      case name ends in "channels_last"), whose nets' convolutions run in that layout under
      both backends;
    - flow_vae_model: an IAF-posterior VAE (latentfast.vae.FlowVAE, 784 -> 512 -> 512 -> 32,
      8 IAF steps 256 wide, Bernoulli likelihood, batch 256), the negative ELBO.
    The coupling nets, encoder and decoder are PyTorch modules either way, so the ratio is what
    swapping latentfast's kernels in gives a user of these models."""
    from latentfast.backend import use_backend
    from latentfast.flows import Glow
    from latentfast.vae import FlowVAE

    n, size, levels, k, hidden = (2, 8, 2, 2, 16) if quick else (16, 32, 3, 8, 128)
    hidden = glow_hidden or hidden
    with torch.random.fork_rng(devices=[]):  # the models' initial weights, seeded, the global RNG left alone
        torch.manual_seed(0)
        glow = Glow(3, size, n_levels=levels, steps_per_level=k, hidden=hidden).to(device)
        d_in, latent, width, steps, flow_hidden, batch = (
            (64, 4, 32, 2, 16, 8) if quick else (784, 32, 512, 8, 256, 256))
        vae = FlowVAE(d_in, latent_dim=latent, hidden=(width, width), likelihood="bernoulli",
                      posterior_steps=steps, flow_hidden=flow_hidden).to(device)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 3, size, size, generator=gen) - 0.5).to(device)
    with torch.no_grad(), use_backend("reference"):  # (making the cases runs no kernel)
        glow.bits_per_dim(x, n_bins=256)  # ActNorm's data-dependent initialisation
        # the coupling nets' zero-initialised last convs make every coupling an identity:
        # give them small weights so the couplings (and their gradients) do real work
        for name, p in glow.named_parameters():
            if "net" in name and p.abs().max() == 0:
                p.normal_(0.0, 0.01, generator=torch.Generator(device=p.device).manual_seed(2))
    images = torch.rand(batch, d_in, generator=gen).to(device)
    glow_name = f"glow_model 3x{size}x{size} L={levels} K={k} hidden={hidden} N={n}"

    def bits_per_dim(m, inp):
        return m.bits_per_dim(inp, n_bins=256)

    return [
        _model_case("glow_model", glow_name, glow, x, bits_per_dim),
        _model_case("glow_model", f"{glow_name} channels_last", copy.deepcopy(glow).to(memory_format=torch.channels_last),
                    x, bits_per_dim),
        _model_case("flow_vae_model", f"flow_vae_model {d_in}-{width}-{latent} IAF K={steps} H={flow_hidden} "
                    f"N={batch}", vae, images, lambda m, inp: m(inp)),
    ]


def _decoder_tensors(dims, gen, device, k=64):
    weights = [(torch.randn(b, a, generator=gen) / a ** 0.5).to(device) for a, b in zip(dims[:-1], dims[1:])]
    biases = [(0.1 * torch.randn(b, generator=gen)).to(device) for b in dims[1:]]
    rbf = ((torch.randn(k, dims[0], generator=gen)).to(device), (0.5 + torch.rand(k, generator=gen)).to(device),
           torch.rand(dims[-1], k, generator=gen).to(device))
    return weights, biases, rbf


def geometry_cases(device: torch.device, quick: bool, gen: torch.Generator) -> list[Case]:
    """pullback_metric and curve_energy on the decoder 2 -> 256 -> 256 -> 784 (tanh)."""
    dims = [2, 64, 64, 196] if quick else [2, 256, 256, 784]
    n = 256 if quick else 2048
    weights, biases, (centres, lam, wr) = _decoder_tensors(dims, gen, device)
    acts = [1] * (len(dims) - 2) + [0]
    zeta = 0.01
    z = torch.randn(n, dims[0], generator=gen).to(device)
    net = "-".join(map(str, dims))
    f32 = 4

    def eager_metric(zz):
        return (geo_ref.pullback_metric(zz, weights, biases, acts),)

    def fast_metric(zz):
        return (geo_ops.pullback_metric(zz, weights, biases, acts),)

    def jacfwd_metric(zz):
        jac = torch.func.vmap(torch.func.jacfwd(lambda x: geo_ref.mlp_mean(x, weights, biases, acts)))(zz)
        return (jac.transpose(1, 2) @ jac,)

    def eager_metric_rbf(zz):
        return (geo_ref.pullback_metric(zz, weights, biases, acts, centres, lam, wr, zeta),)

    def fast_metric_rbf(zz):
        return (geo_ops.pullback_metric(zz, weights, biases, acts, centres, lam, wr, zeta),)

    hidden_macs = sum(a * b for a, b in zip(dims[1:-2], dims[2:-1]))
    # hidden layers on 1 + d rows per point, then T^T (W_L^T W_L) T on d rows
    metric_flops = 2 * n * ((1 + dims[0]) * hidden_macs + dims[0] * dims[-2] ** 2)
    cases = [
        Case("pullback_metric", f"pullback_metric {net} tanh N={n}", (z,), eager_metric, fast_metric, (),
             bytes_moved=f32 * (sum(w.numel() for w in weights) + n * (dims[0] + dims[0] ** 2)),
             flops=metric_flops, passes=("fwd",), extras={"vmap_jacfwd": jacfwd_metric}),
        Case("pullback_metric", f"pullback_metric {net} tanh+RBF(K=64) N={n}", (z,), eager_metric_rbf,
             fast_metric_rbf, (), bytes_moved=f32 * (sum(w.numel() for w in weights) + wr.numel()
                                                      + n * (dims[0] + dims[0] ** 2)),
             flops=metric_flops + 2 * n * 64 * dims[-1] * (1 + dims[0]), passes=("fwd",)),
    ]
    b, t = (16, 16) if quick else (256, 32)
    curves = torch.randn(b, t + 1, dims[0], generator=gen).to(device)

    def eager_curve(c):
        return geo_ref.curve_energy(c, weights, biases, acts, centres, lam, wr, zeta)

    def fast_curve(c):
        return geo_ops.curve_energy(c, weights, biases, acts, centres, lam, wr, zeta)

    pts = b * (t + 1)
    cases.append(Case("curve_energy", f"curve_energy B={b} T={t} {net}+RBF", (curves,), eager_curve,
                      fast_curve, (0,), bytes_moved=f32 * (sum(w.numel() for w in weights) + wr.numel()
                                                            + curves.numel() + 2 * b),
                      flops=2 * pts * (sum(a * c for a, c in zip(dims[:-1], dims[1:])) + 64 * dims[-1])))
    return cases


class _TritonStepwise(torch.autograd.Function):
    """The Triton per-step RNN path (GEMM + gate kernel per step), forward and backward, for
    the comparison with the persistent kernels on CUDA (inputs x, h0, w_ih, w_hh, b_ih, b_hh;
    LSTM with c0 = h0 as in the cases)."""

    @staticmethod
    def forward(ctx, lstm, x, h0, w_ih, w_hh, b_ih, b_hh):
        from latentfast.kernels import rnn as kernels
        ctx.lstm = lstm
        if lstm:
            out, cells, gates = kernels._lstm_sequence_fwd_stepwise(x, h0, h0, w_ih, w_hh, b_ih, b_hh, True)
            ctx.save_for_backward(x, h0, w_ih, w_hh, out, cells, gates)
        else:
            out, gates = kernels._gru_sequence_fwd_stepwise(x, h0, w_ih, w_hh, b_ih, b_hh, True)
            ctx.save_for_backward(x, h0, w_ih, w_hh, out, gates)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from latentfast.kernels import rnn as kernels
        if ctx.lstm:
            x, h0, w_ih, w_hh, out, cells, gates = ctx.saved_tensors
            gx, gh, gc, gwi, gwh, gbi, gbh = kernels._lstm_sequence_bwd_stepwise(
                grad_out, torch.zeros_like(cells), x, h0, h0, w_ih, w_hh, out, cells, gates)
            return None, gx, gh + gc, gwi, gwh, gbi, gbh
        x, h0, w_ih, w_hh, out, gates = ctx.saved_tensors
        return (None, *kernels._gru_sequence_bwd_stepwise(grad_out, x, h0, w_ih, w_hh, out, gates))


def _stepwise_extra(device: torch.device, lstm: bool) -> dict:
    """On CUDA, the Triton per-step path next to the default persistent kernels."""
    if device.type != "cuda":
        return {}
    return {"triton_stepwise": lambda *args: (_TritonStepwise.apply(lstm, *args),)}


def rnn_cases(device: torch.device, quick: bool, gen: torch.Generator) -> list[Case]:
    """gru_sequence and lstm_sequence against a Python loop over the cell (eager and
    compiled) and nn.GRU / nn.LSTM."""
    t, b, n_in = (20, 16, 8) if quick else (100, 64, 32)
    cases = []
    sizes = (32,) if quick else (64, 256, 512) if device.type == "cuda" else (64, 256)
    for hs in sizes:
        k = hs ** -0.5
        w_ih = (k * (2 * torch.rand(3 * hs, n_in, generator=gen) - 1)).to(device)
        w_hh = (k * (2 * torch.rand(3 * hs, hs, generator=gen) - 1)).to(device)
        b_ih = (k * (2 * torch.rand(3 * hs, generator=gen) - 1)).to(device)
        b_hh = (k * (2 * torch.rand(3 * hs, generator=gen) - 1)).to(device)
        x = torch.randn(t, b, n_in, generator=gen).to(device)
        h0 = torch.zeros(b, hs, device=device)
        gru = torch.nn.GRU(n_in, hs).to(device)

        def cell_loop(x, h0, w_ih, w_hh, b_ih, b_hh):
            h, outs = h0, []
            for s in range(x.shape[0]):
                h = torch.gru_cell(x[s], h, w_ih, w_hh, b_ih, b_hh)
                outs.append(h)
            return (torch.stack(outs),)

        def fast(x, h0, w_ih, w_hh, b_ih, b_hh):
            return (rnn_ops.gru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh)[0],)

        def nn_gru(x, h0, w_ih, w_hh, b_ih, b_hh, gru=gru):
            return (torch._VF.gru(x, h0[None], [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, gru.training,
                                  False, False)[0],)

        flops = 2 * t * b * 3 * hs * (n_in + hs)
        cases.append(Case("gru_sequence", f"gru_sequence T={t} B={b} I={n_in} H={hs}",
                          (x, h0, w_ih, w_hh, b_ih, b_hh), cell_loop, fast, (0, 2, 3, 4, 5),
                          bytes_moved=4 * (x.numel() + t * b * hs + w_ih.numel() + w_hh.numel()),
                          flops=flops, extras={"nn_GRU": nn_gru, **_stepwise_extra(device, False)}))

        lstm_p = [(k * (2 * torch.rand(*shape, generator=gen) - 1)).to(device)
                  for shape in ((4 * hs, n_in), (4 * hs, hs), (4 * hs,), (4 * hs,))]
        lstm = torch.nn.LSTM(n_in, hs).to(device)

        def lstm_loop(x, h0, w_ih, w_hh, b_ih, b_hh):
            h, c, outs = h0, h0, []
            for s in range(x.shape[0]):
                h, c = torch.lstm_cell(x[s], (h, c), w_ih, w_hh, b_ih, b_hh)
                outs.append(h)
            return (torch.stack(outs),)

        def lstm_fast(x, h0, w_ih, w_hh, b_ih, b_hh):
            return (rnn_ops.lstm_sequence(x, (h0, h0), w_ih, w_hh, b_ih, b_hh)[0],)

        def nn_lstm(x, h0, w_ih, w_hh, b_ih, b_hh, lstm=lstm):
            return (torch._VF.lstm(x, (h0[None], h0[None]), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0,
                                   lstm.training, False, False)[0],)

        cases.append(Case("lstm_sequence", f"lstm_sequence T={t} B={b} I={n_in} H={hs}",
                          (x, h0, *lstm_p), lstm_loop, lstm_fast, (0, 2, 3, 4, 5),
                          bytes_moved=4 * (x.numel() + 2 * t * b * hs + lstm_p[0].numel() + lstm_p[1].numel()),
                          flops=2 * t * b * 4 * hs * (n_in + hs),
                          extras={"nn_LSTM": nn_lstm, **_stepwise_extra(device, True)}))
    return cases


def lyapunov_cases(device: torch.device, quick: bool, gen: torch.Generator) -> list[Case]:
    """rnn_lyapunov and lorenz_lyapunov against Benettin on explicit step Jacobians (the
    analytic reference) and, for the GRU, on torch.func.jacfwd Jacobians."""
    from latentfast.data import dynamics as dyn
    from latentfast.ops import dynamics as dyn_ops
    from latentfast.reference import dynamics as dyn_ref

    cases = []
    hs, n_in, b, k, steps = (16, 3, 4, 4, 20) if quick else (64, 3, 32, 16, 200)
    sc = hs ** -0.5
    w = [(sc * (2 * torch.rand(*shape, generator=gen) - 1)).to(device)
         for shape in ((3 * hs, n_in), (3 * hs, hs), (3 * hs,), (3 * hs,), (n_in, hs), (n_in,))]
    w[1] = w[1] * 3.0  # a recurrent gain that gives the closed loop non-trivial dynamics
    s0 = torch.randn(b, hs, generator=gen).to(device)
    q0 = torch.randn(b, hs, k, generator=gen).to(device)

    def gru_closed(s, w_ih, w_hh, b_ih, b_hh, wo, bo):
        return dyn_ref.gru_step(s @ wo.T + bo, s, w_ih, w_hh, b_ih, b_hh, dx_dh=wo)

    def eager_gru(s0, q0, *w):
        return (dyn_ref.lyapunov_spectrum(lambda s: gru_closed(s, *w), s0, k, steps, qr_every=5, q0=q0),)

    def jacfwd_gru(s0, q0, w_ih, w_hh, b_ih, b_hh, wo, bo):
        def cell(s):
            return torch.gru_cell((s @ wo.T + bo)[None], s[None], w_ih, w_hh, b_ih, b_hh)[0]
        jac = torch.func.vmap(torch.func.jacfwd(cell))

        def step(s):
            return torch.gru_cell(s @ wo.T + bo, s, w_ih, w_hh, b_ih, b_hh), jac(s)
        return (dyn_ref.lyapunov_spectrum(step, s0, k, steps, qr_every=5, q0=q0),)

    def fast_gru(s0, q0, *w):
        return (dyn_ops.rnn_lyapunov_spectrum("gru", s0, k, steps, *w, qr_every=5, q0=q0)[0],)

    # per step: the GEMM on 1 + k rows (4H x H), the explicit form's [H, H] Jacobian times k
    cases.append(Case("rnn_lyapunov", f"rnn_lyap gru H={hs} B={b} k={k} T={steps}", (s0, q0, *w),
                      eager_gru, fast_gru, (), bytes_moved=4 * (s0.numel() + q0.numel() + 4 * hs * hs + b * k),
                      flops=steps * 2 * b * (1 + k) * 4 * hs * hs, passes=("fwd",), compile=False,
                      extras={"vmap_jacfwd": jacfwd_gru}))
    for system, n, kk, bb, st in (("lorenz63", 3, 3, 64, 2000), ("lorenz96", 40, 40, 8, 500)):
        if quick:
            bb, st = 4, 50
        # float64: fp32 trajectories of a chaotic system decorrelate within the run
        x0 = (dyn.lorenz63 if n == 3 else dyn.lorenz96)(0, n_traj=bb, seed=2)[:, 0].double().to(device)
        qq = torch.randn(bb, n, kk, generator=gen, dtype=torch.float64).to(device)
        field, jacobian = ((dyn.lorenz63_field, dyn.lorenz63_jacobian) if n == 3
                           else (dyn.lorenz96_field, dyn.lorenz96_jacobian))

        def eager_l(x0, q0, field=field, jacobian=jacobian, kk=kk, st=st):
            step = lambda x: dyn.rk4_step_with_jacobian(field, jacobian, x, 0.01)  # noqa: E731
            return (dyn_ref.lyapunov_spectrum(step, x0, kk, st, dt=0.01, qr_every=5, q0=q0),)

        def fast_l(x0, q0, system=system, kk=kk, st=st):
            return (dyn_ops.lorenz_lyapunov_spectrum(system, x0, kk, st, dt=0.01, qr_every=5, q0=q0)[0],)

        cases.append(Case("lorenz_lyapunov", f"lorenz_lyap {system[6:]} B={bb} k={kk} T={st}", (x0, qq),
                          eager_l, fast_l, (), bytes_moved=8 * (x0.numel() + qq.numel() + bb * kk),
                          flops=st * bb * 4 * (1 + kk) * n * 10, passes=("fwd",), compile=False))
    return cases
