"""kl-autoencoder: the KL-regularized convolutional VAE of latent diffusion, natively diffusers `AutoencoderKL`."""

from kl_autoencoder.model import AutoencoderConfig, DiagonalGaussian, KLAutoencoder

__all__ = ["AutoencoderConfig", "DiagonalGaussian", "KLAutoencoder"]
__version__ = "0.1.0"
