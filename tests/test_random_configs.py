"""Modules in configurations drawn at random, each against plain PyTorch in float64.

The other tests pick their sizes and options by hand; these draw them (channels, image sizes
that are not square, levels, steps, net widths, LU or plain 1x1 convolutions, affine or
additive couplings; flow kinds, dimensions, widths, context; RNN layers, directions, bias,
batch_first, unbatched input; decoder depths, widths and activations; geodesic solves' sizes,
scales and preconditioning; Lyapunov spectra's cells, sizes, readouts, QR intervals and
transients; Lorenz systems' parameters and sizes; VAE likelihoods, betas, widths and flow
posteriors and priors), so combinations no one wrote down are checked too. Each test's
draws depend on its index and LATENTFAST_TEST_SEED (a sweep over the seed draws other
configurations), and the failure message names the configuration. A sweep of 150 such
configurations per family on the cpp backend (and 25 on the Triton interpreter) found one
problem: ActNorm initialised from one value per channel, which now warns
(tests/flows/test_glow.py). A second, of geodesic solves, exp_map, random walks and Lyapunov
spectra, found two: a decoder whose metric is singular everywhere (a layer narrower than d)
gave exp_map and geodesic_acceleration answers picked by rounding (they now raise), and a
short geodesic that starts within 1e-8 of its minimum stopped flagged not converged (the
line search now ends with a trial at its quadratic model's minimiser). Sweeps of the Lorenz and
VAE families (seeds 0 to 11: 144 configurations a backend each) found nothing.
"""
from __future__ import annotations

import os
import random
import re
import zlib

import pytest
import torch
from torch import nn

import latentfast
import latentfast.geometry as geo
from latentfast.flows import IAF, MAF, Glow, VectorAffineCoupling
from latentfast.rnn import GRU, LSTM
from tests.conftest import interpreting
from tests.flows.test_glow import _perturb

F64 = torch.float64
N_CONFIGS = 4 if interpreting() else 12  # (interpreted kernels run their programs in Python)


def _rng(family: str, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{os.environ.get('LATENTFAST_TEST_SEED', '0')}:{family}:{index}".encode()))


def _close(got, want, what: str, rtol: float = 1e-9) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what}: output {i}"
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * 1e-2, msg=lambda m: f"{what}: output {i}: {m}")


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_glow(backend, index):
    rnd = _rng("glow", index)
    c, levels, steps = rnd.choice([1, 2, 3, 5]), rnd.choice([1, 2, 3]), rnd.choice([1, 2])
    size = ((2 ** levels) * rnd.choice([1, 3]), (2 ** levels) * rnd.choice([1, 2]))
    kw = dict(n_levels=levels, steps_per_level=steps, hidden=rnd.choice([3, 8]), lu=rnd.random() < 0.7,
              additive=rnd.random() < 0.3)
    what = f"Glow({c}, {size}, **{kw}) on {backend}"
    torch.manual_seed(rnd.randrange(1 << 30))
    glow = Glow(c, size, **kw).to(F64)
    x = torch.rand(rnd.choice([2, 3]), c, *size, dtype=F64) - 0.5
    glow.log_prob(x)  # ActNorm's initialisation (on the reference ops: the model's forward)
    _perturb(glow, rnd.randrange(1 << 30), 0.05)

    def run():
        glow.zero_grad(set_to_none=True)
        log_p = glow.log_prob(x)
        log_p.sum().backward()
        zs = glow.encode(x)[0]
        return [log_p, *(p.grad for p in glow.parameters()), *zs, glow.decode(zs)]

    got = run()
    with latentfast.use_backend("reference"):
        want = run()
    _close(got, want, what)
    _close(got[-1:], [x], what + ": decode(encode(x))")


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_vector_flow(backend, index):
    rnd = _rng("vector", index)
    cls = rnd.choice([IAF, MAF, VectorAffineCoupling])
    d = rnd.choice([2, 3, 7, 16] if cls is VectorAffineCoupling else [1, 2, 3, 7, 16])
    kw = dict(hidden=rnd.choice([1, 5, 33]), n_steps=rnd.choice([1, 2, 4]), context_dim=rnd.choice([0, 0, 5]))
    what = f"{cls.__name__}({d}, **{kw}) on {backend}"
    torch.manual_seed(rnd.randrange(1 << 30))
    flow = cls(d, **kw).to(F64)
    _perturb(flow, rnd.randrange(1 << 30), 0.1)
    b = rnd.choice([1, 5, 17])
    x = torch.randn(b, d, dtype=F64)
    ctx = (torch.randn(b, kw["context_dim"], dtype=F64),) if kw["context_dim"] else ()

    def run():
        flow.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y, logdet = flow(xx, *ctx)
        (y.sin().sum() + logdet.sum()).backward()
        back = flow.inverse(y.detach(), *ctx)
        back = back[0] if isinstance(back, tuple) else back
        return [y, logdet, xx.grad, *(p.grad for p in flow.parameters()), back]

    got = run()
    with latentfast.use_backend("reference"):
        want = run()
    _close(got, want, what, rtol=1e-8)
    _close(got[-1:], [x], what + ": inverse(forward(x))", rtol=1e-7)


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_rnn_against_torch_nn(backend, index):
    rnd = _rng("rnn", index)
    cls = rnd.choice([GRU, LSTM])
    input_size, hidden = rnd.choice([1, 3, 6]), rnd.choice([1, 4, 9])
    kw = dict(num_layers=rnd.choice([1, 2, 3]), bias=rnd.random() < 0.8, batch_first=rnd.random() < 0.5,
              bidirectional=rnd.random() < 0.5)
    steps, batch, unbatched = rnd.choice([1, 5]), rnd.choice([1, 4]), rnd.random() < 0.3
    what = f"{cls.__name__}({input_size}, {hidden}, **{kw}), T={steps} B={'-' if unbatched else batch} on {backend}"
    torch.manual_seed(rnd.randrange(1 << 30))
    ours = cls(input_size, hidden, **kw, dtype=F64)
    theirs = (nn.GRU if cls is GRU else nn.LSTM)(input_size, hidden, **kw, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    shape = (steps, input_size) if unbatched else ((batch, steps, input_size) if kw["batch_first"]
                                                   else (steps, batch, input_size))
    x = torch.randn(shape, dtype=F64)

    def run(model):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out, state = model(xx)
        states = state if isinstance(state, tuple) else (state,)
        (out.sin().sum() + sum(s.cos().sum() for s in states)).backward()
        return [out, *states, xx.grad, *(p.grad for p in model.parameters())]

    _close(run(ours), run(theirs), what)


_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "sigmoid": nn.Sigmoid, "identity": None}


def _mlp_decoder(d: int, widths: list[int], acts: list[str], bias=lambda: True) -> nn.Sequential:
    """nn.Sequential of Linear layers d -> widths[0] -> ... and the named activations (float64,
    from the torch seed); bias() says per layer whether it has one."""
    layers, width_in = [], d
    for width, act in zip(widths, acts):
        layers.append(nn.Linear(width_in, width, bias=bias(), dtype=F64))
        layers += [_ACTIVATIONS[act]()] if _ACTIVATIONS[act] else []
        width_in = width
    return nn.Sequential(*layers)


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_geometry_of_an_mlp_decoder(backend, index):
    """The fused path (an nn.Sequential of Linear layers and activations) against the
    generic one (the same decoder as a plain function: torch.func and autograd)."""
    rnd = _rng("geometry", index)
    d, depth = rnd.choice([1, 2, 3, 5]), rnd.choice([1, 2, 3])
    widths = [rnd.choice([1, 4, 7, 16]) for _ in range(depth - 1)] + [rnd.choice([1, 3, 9])]
    acts = [rnd.choice(list(_ACTIVATIONS)) for _ in range(depth - 1)] + [rnd.choice(["identity", "sigmoid", "tanh"])]
    torch.manual_seed(rnd.randrange(1 << 30))
    decoder = _mlp_decoder(d, widths, acts, bias=lambda: rnd.random() < 0.8)
    assert geo.as_mlp(decoder) is not None  # the fused path
    what = f"decoder {d} -> {widths} ({acts}) on {backend}"
    z = torch.randn(rnd.choice([1, 4]), d, dtype=F64)
    curves = torch.randn(rnd.choice([1, 3]), rnd.choice([2, 4, 9]), d, dtype=F64)
    generic = curves.clone().requires_grad_()

    def plain(v):
        return decoder(v)

    energy, length, grad = geo.energy_and_grad(decoder, curves)
    geo.curve_energy(plain, generic).sum().backward()
    _close([geo.metric(decoder, z), energy, length, grad[:, 1:-1]],
           [geo.metric(plain, z), geo.curve_energy(plain, curves), geo.curve_length(plain, curves),
            generic.grad[:, 1:-1]], what)
    # the geodesic equation: where a layer is narrower than d the metric is singular
    # everywhere and both paths refuse it; else they agree to the metric's conditioning
    v = torch.randn_like(z)
    if min(widths) < d:
        for dec in (decoder, plain):
            with pytest.raises(ValueError, match="singular to working precision"):
                geo.geodesic_acceleration(dec, z, v)
        return

    def tolerance(points):  # the metric's conditioning along the way scales the rounding
        eig = torch.linalg.eigvalsh(geo.metric(decoder, points.reshape(-1, d)))
        return max(1e-9, float((eig[:, -1] / eig[:, 0]).max()) * 1e-14)
    tol = tolerance(z)
    _close([geo.geodesic_acceleration(decoder, z, v)], [geo.geodesic_acceleration(plain, z, v)],
           what + f": geodesic acceleration (tolerance {tol:.0e})", rtol=tol)
    # a shot can run into a fold of the decoder (a singular metric) or off to where every
    # unit saturates: then both paths refuse it at the same RK4 step
    shots = []
    for dec in (decoder, plain):
        try:
            shots.append(geo.exp_map(dec, z, 0.3 * v, n_steps=3))
        except ValueError as err:
            shots.append(re.search(r"(singular|NaN/Inf) (in|at) RK4 step \d+", str(err))[0])
    if isinstance(shots[0], str) or isinstance(shots[1], str):
        assert shots[0] == shots[1], what + f": exp_map {shots}"
    else:
        tol = tolerance(shots[0])
        _close(shots[:1], shots[1:], what + f": exp_map (tolerance {tol:.0e})", rtol=tol)


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_geodesic_solve(backend, index):
    """geodesic on the fused path against the generic one (the same energy function, so the
    same L-BFGS iterates up to rounding), and what any solve must give: the end points kept,
    an energy no higher than the straight line's, energies and lengths those of the curves."""
    rnd = _rng("geodesic", index)
    d = rnd.choice([1, 2, 3])
    widths = [rnd.choice([4, 9]), rnd.choice([d + 2, 5])]  # no fold (square J) for a curve to cross
    acts = [rnd.choice(["tanh", "softplus", "elu", "sigmoid"]), rnd.choice(["identity", "sigmoid", "tanh"])]
    torch.manual_seed(rnd.randrange(1 << 30))
    decoder = _mlp_decoder(d, widths, acts)
    b, t = rnd.choice([1, 3]), rnd.choice([2, 5, 12])
    scale, precondition = rnd.choice([0.3, 1.0, 3.0]), rnd.random() < 0.7
    z0, z1 = scale * torch.randn(b, d, dtype=F64), scale * torch.randn(b, d, dtype=F64)
    if b > 1:
        z1[0] = z0[0]  # a pair of equal end points: the constant curve
    what = f"geodesic: decoder {d} -> {widths} ({acts}), B={b} T={t} scale={scale} precondition={precondition} on {backend}"
    kw = dict(n_segments=t, tol=1e-9, max_iter=500, precondition=precondition)
    res = geo.geodesic(z0, z1, decoder, **kw)
    gen = geo.geodesic(z0, z1, lambda q: decoder(q), **kw)
    assert torch.equal(res.curves[:, 0], z0) and torch.equal(res.curves[:, -1], z1), what
    assert (res.energies <= geo.curve_energy(decoder, geo.straight_line(z0, z1, t)) * (1 + 1e-12)).all(), what
    _close([res.energies, res.lengths], [geo.curve_energy(decoder, res.curves), geo.curve_length(decoder, res.curves)],
           what + ": energies and lengths of the curves")
    both = res.converged & gen.converged
    assert both.any(), what + f": converged {res.converged.tolist()} / {gen.converged.tolist()}"
    _close([res.energies[both]], [gen.energies[both]], what + ": fused against generic energies", rtol=1e-6)


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_rnn_lyapunov_spectrum_against_benettin_on_torch_cells(backend, index):
    """ops.dynamics.rnn_lyapunov_spectrum (the fused tangent map of a closed-loop RNN, LSTM or
    GRU cell, readout or zero input) against Benettin's method (reference.dynamics.
    lyapunov_spectrum) on torch.nn.RNNCell / GRUCell / LSTMCell Jacobians from jacrev, and the
    final state against the cells run as many steps. QR every 1 or 2 steps: with longer intervals a strongly
    contracting direction falls below rounding within one (qr_every = 4 lost the last of 16
    exponents, at -66 per unit time, to 6e-5 in a sweep), which no implementation keeps."""
    from latentfast.ops.dynamics import rnn_lyapunov_spectrum
    from latentfast.reference.dynamics import lyapunov_spectrum

    rnd = _rng("lyapunov", index)
    cell = rnd.choice(["rnn_tanh", "gru", "lstm"])
    inputs, hidden = rnd.choice([1, 2, 5]), rnd.choice([1, 3, 8])
    torch.manual_seed(rnd.randrange(1 << 30))
    torch_cell = {"rnn_tanh": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](inputs, hidden, dtype=F64)
    with torch.no_grad():
        for p in torch_cell.parameters():
            p.mul_(rnd.choice([0.5, 1.0, 3.0]))
    readout = nn.Linear(hidden, inputs, dtype=F64) if rnd.random() < 0.7 else None
    size = 2 * hidden if cell == "lstm" else hidden
    k, b = rnd.randint(1, size), rnd.choice([1, 3])
    n_steps, qr_every, transient, dt = rnd.choice([1, 5, 17]), rnd.choice([1, 2]), rnd.choice([0, 3]), rnd.choice([1.0, 0.1])
    what = (f"{cell} I={inputs} H={hidden} readout={readout is not None} k={k} B={b} steps={n_steps} "
            f"qr_every={qr_every} transient={transient} dt={dt} on {backend}")
    s0, q0 = torch.randn(b, size, dtype=F64), torch.randn(b, size, k, dtype=F64)

    def step(s):
        h = s[:, :hidden]
        x = readout(h) if readout is not None else s.new_zeros(s.shape[0], inputs)
        if cell == "lstm":
            return torch.cat(torch_cell(x, (h, s[:, hidden:])), 1)
        return torch_cell(x, h)

    with torch.no_grad():
        got = rnn_lyapunov_spectrum(cell, s0, k, n_steps, torch_cell.weight_ih, torch_cell.weight_hh,
                                    torch_cell.bias_ih, torch_cell.bias_hh,
                                    readout.weight if readout is not None else None,
                                    readout.bias if readout is not None else None,
                                    dt=dt, qr_every=qr_every, transient=transient, q0=q0)
    def step_and_jacobian(s):  # Benettin's method on the cells' Jacobians from jacrev
        return step(s), torch.func.vmap(torch.func.jacrev(lambda x: step(x[None])[0]))(s)

    final = s0
    for _ in range(transient + n_steps):
        final = step(final)
    want = [lyapunov_spectrum(step_and_jacobian, s0, k, n_steps, dt=dt, qr_every=qr_every, transient=transient,
                              q0=q0).detach(), final.detach()]
    _close(list(got), want, what, rtol=1e-8)


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_lorenz_lyapunov_spectrum_against_benettin_on_rk4(backend, index):
    """ops.dynamics.lorenz_lyapunov_spectrum (the fused tangent map of an RK4 step of Lorenz-63
    or Lorenz-96, with drawn parameters, sizes and intervals) against Benettin's method on
    jacrev Jacobians of an RK4 step written here from the equations, and the final state
    against that step run as many times."""
    from latentfast.ops.dynamics import lorenz_lyapunov_spectrum
    from latentfast.reference.dynamics import lyapunov_spectrum

    rnd = _rng("lorenz", index)
    system = rnd.choice(["lorenz63", "lorenz96"])
    n = 3 if system == "lorenz63" else rnd.choice([4, 5, 9])
    k, b = rnd.randint(1, n), rnd.choice([1, 2])
    dt, n_steps, qr_every, transient = rnd.choice([0.01, 0.005]), rnd.choice([1, 7, 30]), rnd.choice([1, 3]), rnd.choice([0, 5])
    sigma, rho, beta, forcing = rnd.uniform(5, 15), rnd.uniform(10, 40), rnd.uniform(1, 4), rnd.uniform(2, 10)
    what = (f"{system} n={n} k={k} B={b} dt={dt} steps={n_steps} qr_every={qr_every} transient={transient} "
            f"sigma={sigma:.3f} rho={rho:.3f} beta={beta:.3f} F={forcing:.3f} on {backend}")
    torch.manual_seed(rnd.randrange(1 << 30))
    x0, q0 = torch.randn(b, n, dtype=F64) * 3, torch.randn(b, n, k, dtype=F64)

    def field(x):
        if system == "lorenz63":
            u, v, w = x.unbind(1)
            return torch.stack([sigma * (v - u), u * (rho - w) - v, u * v - beta * w], 1)
        return (x.roll(-1, 1) - x.roll(2, 1)) * x.roll(1, 1) - x + forcing

    def step(x):
        k1 = field(x)
        k2 = field(x + dt / 2 * k1)
        k3 = field(x + dt / 2 * k2)
        k4 = field(x + dt * k3)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def step_and_jacobian(x):
        return step(x), torch.func.vmap(torch.func.jacrev(lambda y: step(y[None])[0]))(x)

    got = lorenz_lyapunov_spectrum(system, x0, k, n_steps, dt, qr_every, transient, sigma=sigma, rho=rho,
                                   beta=beta, forcing=forcing, q0=q0)
    final = x0
    for _ in range(transient + n_steps):
        final = step(final)
    want = [lyapunov_spectrum(step_and_jacobian, x0, k, n_steps, dt=dt, qr_every=qr_every, transient=transient,
                              q0=q0), final]
    _close(list(got), want, what, rtol=1e-8)


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_vae_loss_terms(backend, index):
    """VAE / FlowVAE loss terms (likelihood, beta, encoder / decoder widths and activation; IAF
    posterior and MAF prior steps, widths and context) against torch.distributions with the same
    noise: the Gaussian or Bernoulli -log p(x | z), the analytic KL of a plain VAE, and the
    Monte-Carlo KL log q(z | x) - log p(z) of a FlowVAE with both log-densities from the
    change of variables with autograd Jacobians (and the prior's inverse checked by its forward)."""
    from latentfast.reference.geometry import ACTIVATIONS
    from latentfast.vae import VAE, FlowVAE

    dist = torch.distributions
    rnd = _rng("vae", index)
    flowy = rnd.random() < 0.7
    in_dim, d, hidden = rnd.choice([3, 7, 10]), rnd.choice([1, 2, 4]), rnd.choice([(), (5,), (6, 4)])
    likelihood = rnd.choice(["gaussian", "bernoulli"])
    kw = dict(likelihood=likelihood, beta=rnd.choice([0.0, 1.0, 4.0]), activation=rnd.choice(list(ACTIVATIONS)))
    if flowy:
        kw.update(posterior_steps=rnd.choice([0, 1, 2]), prior_steps=rnd.choice([0, 1, 2]),
                  flow_hidden=rnd.choice([3, 8]), context_dim=rnd.choice([1, 3]))
    b = rnd.choice([1, 4, 9])
    what = f"{'FlowVAE' if flowy else 'VAE'}({in_dim}, {d}, {hidden}, **{kw}) B={b} on {backend}"
    torch.manual_seed(rnd.randrange(1 << 30))
    model = (FlowVAE if flowy else VAE)(in_dim, d, hidden, **kw).to(F64)
    _perturb(model, rnd.randrange(1 << 30), 0.3)  # the flows' last layers start at zero
    x = torch.rand(b, in_dim, dtype=F64) if likelihood == "bernoulli" else torch.randn(b, in_dim, dtype=F64)
    seed = rnd.randrange(1 << 30)
    torch.manual_seed(seed)
    got = list(model.loss_terms(x))

    torch.manual_seed(seed)  # the same draw of eps
    with torch.no_grad():
        mean, logvar, h = model._encode_all(x) if flowy else (*model.encode(x), None)
        std = (0.5 * logvar).exp()
        z = mean + torch.randn_like(mean) * std
        log_q = dist.Normal(mean, std).log_prob(z).sum(1)
    flow = model.posterior_flow if flowy else None
    if flow is not None:
        jac = torch.stack([torch.autograd.functional.jacobian(lambda u: flow(u[None], h[j:j + 1])[0][0], z[j])
                           for j in range(b)])
        z = flow(z, h)[0].detach()
        log_q = log_q - torch.linalg.slogdet(jac)[1]
    prior = model.prior if flowy else None
    if prior is not None:
        def to_base(zz):
            for t in reversed(prior.transforms):
                zz = t.inverse(zz, None)[0]
            return zz

        u = to_base(z).detach()
        jac = torch.stack([torch.autograd.functional.jacobian(lambda q: to_base(q[None])[0], z[j]) for j in range(b)])
        log_p = dist.Normal(0.0, 1.0).log_prob(u).sum(1) + torch.linalg.slogdet(jac)[1]
        back = u
        for t in prior.transforms:
            back = t(back, None)[0]
        _close([back], [z], what + ": the prior's forward of its inverse", rtol=1e-7)
    else:
        log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(1)
    with torch.no_grad():
        mu = model.decoder.mean(z)
        if likelihood == "bernoulli":
            p = mu.clamp(1e-6, 1 - 1e-6)
            nll = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1).mean()
        else:
            nll = -dist.Normal(mu, model.decoder.sigma(z)).log_prob(x).sum(1).mean()
    kl = ((log_q - log_p).mean() if flowy
          else dist.kl_divergence(dist.Normal(mean, std), dist.Normal(0.0, 1.0)).sum(1).mean())
    _close([t.detach() for t in got], [nll + kw["beta"] * kl, nll, kl], what + ": (loss, nll, kl)", rtol=1e-8)
