"""VAE with an IAF posterior and an optional MAF prior (Kingma et al. 2016), beta-weighted.

q(z | x): z0 = mean + sigma * eps from the encoder, then K IAF steps conditioned on a
context h(x) the encoder also emits; log q(z | x) = log N(z0; mean, sigma) - sum logdet.
p(z): N(0, I) or a MAF flow prior (its density direction is the fast pass). With a flow on
either side the KL has no closed form, so it is estimated by Monte Carlo from the same
sample: KL ~ log q(z | x) - log p(z); the loss is E[-log p(x | z)] + beta * KL.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from latentfast.flows.vector import IAF, MAF, Flow, LULinear
from latentfast.ops._checks import check_count, check_like_model
from latentfast.vae.vae import VAE, MLPEncoder

LOG_2PI = math.log(2 * math.pi)


class FlowVAE(VAE):
    """beta-VAE whose posterior is refined by an IAF and whose prior may be a MAF.

    Args (beyond VAE's):
        posterior_steps: IAF steps (0: the plain Gaussian posterior).
        prior_steps: MAF steps of a flow prior (0: N(0, I)).
        flow_hidden: hidden width of the flow MLPs.  context_dim: size of h(x).
        encoder: your own encoder (a convolutional one for images, say): a module taking x as
            given ([N, ...] with D values per sample) to (mean, log-variance, h), each [N, d]
            and h [N, context_dim], the IAF's context; (mean, log-variance) without posterior
            steps. Default: VAE's MLP encoder on the flattened x, with h = tanh of a linear map
            of its last hidden layer.

    Example:
        >>> model = FlowVAE(64, latent_dim=4, posterior_steps=2, beta=4.0)
        >>> loss = model(x)                # or: loss, parts = model.loss(x)
    """

    def __init__(self, in_dim: int, latent_dim: int = 2, hidden: tuple[int, ...] = (64, 64),
                 likelihood: str = "gaussian", beta: float = 1.0, activation: str = "tanh",
                 posterior_steps: int = 2, prior_steps: int = 0, flow_hidden: int = 64, context_dim: int = 16,
                 encoder: nn.Module | None = None):
        super().__init__(in_dim, latent_dim, hidden, likelihood, beta, activation, encoder)
        if posterior_steps < 0 or prior_steps < 0:
            raise ValueError("posterior_steps and prior_steps must be >= 0")
        if posterior_steps:
            check_count("context_dim", context_dim, 1, "the size of the IAF's context")
        self.context_dim = context_dim if posterior_steps else 0
        feat = hidden[-1] if hidden else in_dim  # the encoder's last hidden layer (x itself without one)
        self.context_head = (nn.Linear(feat, context_dim) if posterior_steps and isinstance(self.encoder, MLPEncoder)
                             else None)  # a custom encoder emits h itself
        self.posterior_flow = IAF(latent_dim, flow_hidden, posterior_steps, context_dim) if posterior_steps else None
        self.prior = (Flow(latent_dim, [MAF(latent_dim, flow_hidden, prior_steps), LULinear(latent_dim)])
                      if prior_steps else None)

    def _encode_all(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mean, log-variance, IAF context h or None) for x."""
        flat = self.flat_input(x)
        if not isinstance(self.encoder, MLPEncoder):
            if self.posterior_flow is None:
                mean, logvar = self._run_encoder(x, ("mean", "log-variance"), (self.latent_dim,) * 2)
                return mean, logvar, None
            return self._run_encoder(x, ("mean", "log-variance", "h"),
                                     (self.latent_dim, self.latent_dim, self.context_dim))
        feat = self.encoder.body(flat)
        mean, logvar = self.encoder.head(feat).chunk(2, dim=-1)
        h = torch.tanh(self.context_head(feat)) if self.context_head is not None else None
        return mean, logvar.clamp(-12.0, 8.0), h

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of the Gaussian q(z0 | x) before the IAF steps, each [N, d]."""
        return self._encode_all(x)[:2]

    def posterior_sample(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterised z ~ q(z | x) [N, d] and log q(z | x) [N]."""
        mean, logvar, h = self._encode_all(x)
        eps = torch.randn_like(mean)
        z = mean + eps * (0.5 * logvar).exp()
        log_q = -0.5 * (eps ** 2 + logvar + LOG_2PI).sum(1)
        if self.posterior_flow is not None:
            z, logdet = self.posterior_flow(z, h)
            log_q = log_q - logdet
        return z, log_q

    def log_prior(self, z: Tensor) -> Tensor:
        """log p(z) [N]."""
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [N, {self.latent_dim}], got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        check_like_model("z", z, self.decoder.log_sigma)
        if self.prior is not None:
            return self.prior.log_prob(z)
        return -0.5 * (z ** 2 + LOG_2PI).sum(1)

    def embed(self, x: Tensor) -> Tensor:
        """The deterministic code of x: the posterior flow applied to the encoder mean."""
        mean, _, h = self._encode_all(x)
        return self.posterior_flow(mean, h)[0] if self.posterior_flow is not None else mean

    def loss_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(negative beta-ELBO, -log p(x | z), KL) averaged over the batch, the KL by the
        single-sample Monte-Carlo estimate log q(z | x) - log p(z); tensors, nothing read back."""
        self.flat_input(x, for_loss=True)
        z, log_q = self.posterior_sample(x)
        nll = self.neg_log_lik(x, z).mean()
        kl = (log_q - self.log_prior(z)).mean()
        return nll + self.beta * kl, nll, kl

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n decoded means [n, D] from z ~ p(z) (the flow prior, or N(0, I) without one)."""
        if self.prior is None:
            return super().sample(n)
        check_count("n", n, 0, "the number of samples")
        return self.decoder.mean(self.prior.sample(n))
