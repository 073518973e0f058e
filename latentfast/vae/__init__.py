"""VAEs and Gaussian decoders whose latent geometry latentfast.geometry computes."""
from latentfast.vae.decoders import (GaussianMLPDecoder, MLPParams, RBFVariance, fit_rbf_variance,
                                     kmeans)
from latentfast.vae.flow_vae import FlowVAE
from latentfast.vae.vae import VAE, MLPEncoder, fit

__all__ = ["GaussianMLPDecoder", "MLPParams", "RBFVariance", "fit_rbf_variance", "kmeans", "FlowVAE", "VAE",
           "MLPEncoder", "fit"]
