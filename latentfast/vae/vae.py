"""VAE and beta-VAE with the Gaussian MLP decoder (analytic KL, Gaussian or Bernoulli data)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentfast.ops._checks import check_count, check_finite, check_like_model, check_unit_interval
from latentfast.vae.decoders import GaussianMLPDecoder

LOG_2PI = math.log(2 * math.pi)


class MLPEncoder(nn.Module):
    """x [N, D] -> (mean, log-variance) of q(z | x), both [N, d]."""

    def __init__(self, in_dim: int, latent_dim: int, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        dims = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | x), each [N, d]; the log-variance clamped to [-12, 8]."""
        mean, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mean, logvar.clamp(-12.0, 8.0)


class VAE(nn.Module):
    """VAE (beta = 1) or beta-VAE: loss = E_q[-log p(x|z)] + beta KL(q(z|x) || N(0, I)).

    Args:
        in_dim: D (inputs are flattened).  latent_dim: d.
        hidden: hidden widths of the encoder and decoder.
        likelihood: "gaussian" (learned per-pixel sigma) or "bernoulli" (inputs in [0, 1]).
        beta: weight of the KL term (beta > 1 favours disentangled latents).
        activation: hidden activation of the decoder (see GaussianMLPDecoder).
        encoder: your own encoder (a convolutional one for images, say): a module taking x as
            given ([N, ...] with D values per sample) to (mean, log-variance), each [N, d];
            default an MLP (MLPEncoder) on the flattened x. The decoder stays the Gaussian MLP
            the geometry ops fuse.
    """

    def __init__(self, in_dim: int, latent_dim: int = 2, hidden: tuple[int, ...] = (64, 64),
                 likelihood: str = "gaussian", beta: float = 1.0, activation: str = "tanh",
                 encoder: nn.Module | None = None):
        super().__init__()
        if likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(f"likelihood must be 'gaussian' or 'bernoulli', got {likelihood!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if in_dim < 1 or latent_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"need in_dim, latent_dim and hidden widths >= 1, got {in_dim}, {latent_dim} and "
                             f"{tuple(hidden)}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder if encoder is not None else MLPEncoder(in_dim, latent_dim, hidden)
        self.decoder = GaussianMLPDecoder(latent_dim, in_dim, tuple(reversed(hidden)), activation,
                                          "sigmoid" if likelihood == "bernoulli" else "identity")
        self.likelihood, self.beta, self.latent_dim, self.in_dim = likelihood, float(beta), latent_dim, in_dim

    def flat_input(self, x: Tensor, for_loss: bool = False) -> Tensor:
        """x [N, D] (or [N, ...] with D values per sample) as [N, D]; ValueError/TypeError
        otherwise, and for an empty batch where a loss is asked for (its mean is undefined)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_dim:
            raise ValueError(f"x must be [N, {self.in_dim}] (or [N, ...] with {self.in_dim} values per sample), "
                             f"got shape {tuple(x.shape)}")
        if for_loss and x.shape[0] == 0:
            raise ValueError("the loss of an empty batch (N = 0) is undefined")
        if for_loss or isinstance(self.encoder, MLPEncoder):  # (an encoder of the user's takes x as it likes)
            check_like_model("x", x, self.decoder.log_sigma)
        return x.flatten(1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | x) [N, d] for x [N, D] (or [N, ...] with D values per
        sample; a custom encoder gets x as given)."""
        flat = self.flat_input(x)
        if isinstance(self.encoder, MLPEncoder):
            return self.encoder(flat)
        mean, logvar = self._run_encoder(x, ("mean", "log-variance"), (self.latent_dim, self.latent_dim))
        return mean, logvar

    def _run_encoder(self, x: Tensor, names: tuple[str, ...], widths: tuple[int, ...]) -> tuple[Tensor, ...]:
        """A custom encoder's output on x as given, checked to be len(names) tensors [N, width]."""
        out = self.encoder(x)
        want = [[x.shape[0], w] for w in widths]
        if not (isinstance(out, (tuple, list)) and len(out) == len(names)
                and all(isinstance(t, Tensor) and list(t.shape) == w for t, w in zip(out, want))):
            got = (tuple(tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in out)
                   if isinstance(out, (tuple, list)) else tuple(out.shape) if isinstance(out, Tensor)
                   else type(out).__name__)
            shapes = ", ".join(f"{n} {w}" for n, w in zip(names, want))
            raise ValueError(f"the encoder must return ({', '.join(names)}): {shapes}, for x "
                             f"{tuple(x.shape)}; got {got}")
        return tuple(out)

    def embed(self, x: Tensor) -> Tensor:
        """The deterministic code of x [N, d] (the posterior mean)."""
        return self.encode(x)[0]

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n decoded means [n, D] from z ~ N(0, I), the prior (flat: reshape to your data's
        shape)."""
        check_count("n", n, 0, "the number of samples")
        p = self.decoder.log_sigma
        return self.decoder.mean(torch.randn(n, self.latent_dim, dtype=p.dtype, device=p.device))

    def neg_log_lik(self, x: Tensor, z: Tensor) -> Tensor:
        """-log p(x | z) per sample [N]."""
        x = self.flat_input(x)
        mu = self.decoder.mean(z)
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy(mu.clamp(1e-6, 1 - 1e-6), x, reduction="none").sum(1)
        log_sigma = self.decoder.sigma(z).log()
        return (0.5 * ((x - mu) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * LOG_2PI).sum(1)

    def loss_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(negative beta-ELBO, -log p(x | z), KL), each averaged over the batch, as tensors:
        nothing is read back to the host (so no GPU synchronisation)."""
        self.flat_input(x, for_loss=True)
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        nll = self.neg_log_lik(x, z).mean()
        kl = (0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(1)).mean()
        return nll + self.beta * kl, nll, kl

    def forward(self, x: Tensor) -> Tensor:
        """The loss to minimise: the negative beta-ELBO averaged over the batch x [N, D] (or
        [N, ...] with D values per sample), one sample of z per input. `model(x)` is what
        torch.compile, DistributedDataParallel and hooks call; `loss(x)` adds its parts."""
        return self.loss_terms(x)[0]

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Negative beta-ELBO averaged over the batch, and its parts as floats (one read back
        to the host)."""
        terms = self.loss_terms(x)
        return terms[0], dict(zip(("loss", "nll", "kl"), torch.stack([t.detach() for t in terms]).tolist()))


def fit(model: VAE, data: Tensor | Iterable, epochs: int = 50, batch_size: int = 128, lr: float = 1e-3,
        seed: int = 0, progress: bool = True) -> list[dict[str, float]]:
    """Train with Adam; returns the per-epoch mean of the loss parts ("loss", "nll", "kl"),
    read back to the host once per epoch, not per step.

    data: a tensor [N, ...], shuffled into batches of batch_size every epoch; or an iterable
    of batches gone through once per epoch (a torch.utils.data.DataLoader, a list: its order
    and batch size are its own, and batch_size is not used), each batch a tensor or a tuple /
    list whose first item is the data (as a TensorDataset gives), moved to the model's device.
    `seed` fixes the batches of a tensor and the sampling noise; the global random state (CPU,
    and the model's GPU) is left as it was before the call (the noise is drawn from it inside
    torch.random.fork_rng).

    A data tensor is checked once before training (one read-back): values outside [0, 1] raise
    a ValueError under the Bernoulli likelihood (on a GPU torch's loss checks with a device-side
    assert, which leaves the CUDA context unusable), NaN or Inf under either;
    LATENTFAST_CHECK_FINITE=0 skips this."""
    if isinstance(data, Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be [N, ...] with N >= 1, got shape {tuple(data.shape)}")
        if model.likelihood == "bernoulli":
            check_unit_interval("data", data)
        else:
            check_finite("data", data)
    elif not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(f"data must be a tensor [N, ...] or an iterable of batches (a DataLoader), "
                        f"got {type(data).__name__}")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    dev = next(model.parameters()).device
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        return _fit(model, data, epochs, batch_size, lr, torch.Generator().manual_seed(seed), dev, progress)


def _batches(data: Tensor | Iterable, batch_size: int, gen: torch.Generator, dev: torch.device,
             epoch: int) -> Iterator[Tensor]:
    """One epoch's batches of fit's data (see fit)."""
    if isinstance(data, Tensor):
        perm = torch.randperm(data.shape[0], generator=gen, device=gen.device)
        for i in range(0, data.shape[0], batch_size):
            yield data[perm[i:i + batch_size]]
        return
    n = 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"a batch must be a tensor or a tuple / list whose first item is one, got "
                            f"{type(batch).__name__}" + (f" of {type(x).__name__}" if x is not batch else ""))
        n += 1
        yield x.to(dev, non_blocking=True)
    if n == 0:
        raise ValueError(f"data gave no batches in epoch {epoch + 1}" + (
            ": pass something that can be gone through again every epoch (a DataLoader, a list), not an "
            "iterator or generator" if epoch else ""))


def _fit(model: VAE, data: Tensor | Iterable, epochs: int, batch_size: int, lr: float, gen: torch.Generator,
         dev: torch.device, progress: bool) -> list[dict[str, float]]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    bar = tqdm(range(epochs), desc="VAE", disable=not progress)
    for epoch in bar:
        sums, n_batches = None, 0
        for x in _batches(data, batch_size, gen, dev, epoch):
            terms = model.loss_terms(x)
            opt.zero_grad()
            terms[0].backward()
            opt.step()
            parts = torch.stack([t.detach() for t in terms])
            sums, n_batches = parts if sums is None else sums + parts, n_batches + 1
        mean = dict(zip(("loss", "nll", "kl"), (sums / n_batches).tolist()))
        history.append(mean)
        bar.set_postfix(loss=f"{mean['loss']:.2f}")
    return history
