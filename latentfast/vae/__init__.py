"""VAEs and Gaussian decoders whose latent geometry latentfast.geometry computes."""
from latentfast.vae.decoders import (GaussianMLPDecoder, MLPParams, RBFVariance, fit_rbf_variance,
                                     kmeans)
from latentfast.vae.vae import VAE, MLPEncoder, fit

__all__ = ["GaussianMLPDecoder", "MLPParams", "RBFVariance", "fit_rbf_variance", "kmeans", "VAE",
           "MLPEncoder", "fit"]
