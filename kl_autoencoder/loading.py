"""One loader for the commands that read a model: a KL VAE (diffusers `AutoencoderKL`) or a tiny autoencoder (diffusers
`AutoencoderTiny`, what `kl-autoencoder distill` writes).

The folder commands (encode, decode, reconstruct, interpolate) speak the KL interface: `encode(x)` gives a posterior,
`to_diffusion_latents` / `from_diffusion_latents` map raw latents to what a diffusion model sees, `config` carries the
downsampling factor and latent channels. `TinyAsKL` gives a tiny autoencoder that interface. A tiny encoder outputs
diffusion latents directly (its `scaling_factor` is 1 and `shift_factor` 0, see tiny.py), so its "posterior" is a point
mass on them and the two maps are the identity: latents that `encode` writes with a teacher decode with its tiny
student, and the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kl_autoencoder.formats import find_config_json
from kl_autoencoder.model import DiagonalGaussian, KLAutoencoder
from kl_autoencoder.tiny import TinyAutoencoder

POINT_MASS_LOGVAR = -30.0  # DiagonalGaussian's lower clamp: std 3e-7, a point mass for every practical purpose


def is_tiny_folder(path: str | Path) -> bool:
    """Whether `path` is a local diffusers (or pipeline) folder whose config.json names an AutoencoderTiny."""
    config = find_config_json(path) if Path(path).expanduser().is_dir() else None
    if config is None:
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError, AttributeError, RecursionError):  # unreadable: the KL loader reports it, naming it
        return False


class TinyAsKL(nn.Module):
    """A `TinyAutoencoder` behind the KL interface of the folder commands (deterministic: no posterior to sample)."""

    class_name = "AutoencoderTiny"

    def __init__(self, tiny: TinyAutoencoder):
        super().__init__()
        config = tiny.config
        if config.upsampling_factor != config.downsampling_factor:
            raise ValueError(f"this tiny autoencoder downsamples by {config.downsampling_factor} but upsamples by "
                             f"{config.upsampling_factor}: images would not come back at their size")
        self.tiny = tiny
        self.encoder, self.decoder = tiny.encoder, tiny.decoder  # the same modules (tiling looks them up by name)
        self.quant_conv = self.post_quant_conv = None
        self.config = config

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean = self.tiny.encode(x).float()
        return DiagonalGaussian(mean=mean, logvar=torch.full_like(mean, POINT_MASS_LOGVAR))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.tiny.decode(z)

    def to_diffusion_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor  # identity for distill's exports

    def from_diffusion_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor

    def num_parameters(self, part: str | None = None) -> int:
        return self.tiny.num_parameters(part)


def load_any(path: str | Path) -> KLAutoencoder | TinyAsKL:
    """The model at `path`: a tiny autoencoder when its config.json says AutoencoderTiny, else a KL VAE."""
    if is_tiny_folder(path):
        return TinyAsKL(TinyAutoencoder.from_pretrained(path))
    return KLAutoencoder.from_pretrained(path)


def class_name(model: nn.Module) -> str:
    """The diffusers class a loaded model corresponds to."""
    return getattr(model, "class_name", "AutoencoderKL")
