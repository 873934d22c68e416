"""The KL autoencoder: encoder -> diagonal Gaussian posterior -> decoder.

Read top to bottom: the initialisation for training from scratch, the posterior, and the autoencoder that ties the
encoder and decoder together. The config is autoencoder_config.py's, the blocks (ResNet block, self-attention,
down/up-sampling, encoder, decoder) vae_blocks.py's, loading and export pretrained.py's; all of them are importable
from here as well. Module names are chosen so that `state_dict()` has exactly the keys of diffusers' `AutoencoderKL`
for the same config: weights move between the two with `load_state_dict(strict=True)` and no renaming.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from kl_autoencoder.autoencoder_config import (ACTIVATIONS, MAX_BLOCK_CHANNELS, MAX_IMAGE_CHANNELS,  # noqa: F401
                                               MAX_LAYERS_PER_BLOCK, MAX_LEVELS, MAX_PARAMETERS, MAX_SAMPLE_SIZE,
                                               AutoencoderConfig, AutoencoderConfigError, infer_config)
from kl_autoencoder.pretrained import PretrainedMixin, check_size
from kl_autoencoder.vae_blocks import (NORM_EPS, Decoder, Downsample, DownBlock, Encoder, MidBlock,  # noqa: F401
                                       ResnetBlock, SelfAttention, UpBlock, Upsample, group_norm)

@torch.no_grad()
def zero_residual_init_(model: nn.Module) -> nn.Module:
    """Re-initialise a model for training from scratch so that, untrained, it is a clean linear path.

    Every convolution gets LeCun-normal weights (std 1 / sqrt(fan_in): a linear path keeps its signal's variance)
    and zero bias; the last layer of every residual branch (each ResNet block's `conv2`, each attention block's
    output projection) is zero, so every block starts as its shortcut (Goyal et al. 2017, SkipInit / Fixup).
    Why: with PyTorch's default init each convolution shrinks its input's variance about 3x, so what reaches the
    latent and the output is mostly the residual branches' group-normalised noise, in which the colour of a photo
    (a few percent of its pixel variance) is lost; training then learns brightness and guesses colour from content
    (a tabby comes back orange, a green leaf sepia) instead of carrying it. Returns `model`.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        last = module.conv2 if isinstance(module, ResnetBlock) else (
            module.to_out[0] if isinstance(module, SelfAttention) else None)
        if last is not None:
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
    return model


# --------------------------------------------------------------------------------------------------------------------
# The posterior q(z | x) = N(mean, diag(exp(logvar))).


class DiagonalGaussian:
    """A diagonal Gaussian over latents of any shape [B, C, ...]; built from moments stacked along dim 1."""

    def __init__(self, moments: torch.Tensor | None = None, *, mean: torch.Tensor | None = None,
                 logvar: torch.Tensor | None = None):
        if moments is not None:
            mean, logvar = torch.chunk(moments, 2, dim=1)
        if mean is None or logvar is None:
            raise ValueError("DiagonalGaussian needs either moments or both mean and logvar")
        self.mean = mean
        # The LDM clamp: keeps exp(logvar) finite early in training when the encoder output is still wild.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps: the reparameterization trick, so gradients reach mean and logvar."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def _kl_elements(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in nats per sample, summed over every latent dimension: shape [B]."""
        return self._kl_elements().flatten(1).sum(dim=1)

    def kl_per_channel(self) -> torch.Tensor:
        """KL per sample and channel, summed over spatial positions: shape [B, C]."""
        elements = self._kl_elements()
        return elements.flatten(2).sum(dim=2) if elements.dim() > 2 else elements

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of x under this Gaussian, per sample: shape [B]."""
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * (log_two_pi + self.logvar + (x - self.mean).pow(2) / self.var).flatten(1).sum(dim=1)

    def to(self, dtype: torch.dtype) -> "DiagonalGaussian":
        return DiagonalGaussian(mean=self.mean.to(dtype), logvar=self.logvar.to(dtype))


# --------------------------------------------------------------------------------------------------------------------
# The autoencoder.


class KLAutoencoder(PretrainedMixin, nn.Module):
    """Encoder -> DiagonalGaussian posterior -> decoder, with diffusers AutoencoderKL's state-dict layout;
    `from_pretrained` / `save_pretrained` come from `PretrainedMixin` (pretrained.py)."""

    def __init__(self, config: AutoencoderConfig | dict | None = None, **config_kwargs: Any):
        super().__init__()
        if isinstance(config, dict):
            config = AutoencoderConfig.from_dict(config)
        self.config = config if config is not None else AutoencoderConfig(**config_kwargs)
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None

    # -- the three operations -----------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        # The posterior's exp/KL are computed in float32 even under autocast: fp16 exp(logvar) overflows.
        return DiagonalGaussian(moments.float())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.decoder.conv_in.weight.dtype) if not torch.is_autocast_enabled() else z
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                latent_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(decode(z), posterior); `latent_transform` maps z before decoding (EQ-VAE's training pair)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        if latent_transform is not None:
            z = latent_transform(z)
        return self.decode(z), posterior

    # -- the latent space a diffusion model sees ----------------------------------------------------------------------

    def to_diffusion_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - shift_factor) * scaling_factor: unit-variance latents, the convention of SD / SDXL / SD3 / FLUX."""
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def from_diffusion_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift_factor or 0.0
        return latents / self.config.scaling_factor + shift

    # -- conveniences -------------------------------------------------------------------------------------------------

    @property
    def last_decoder_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: the LDM adaptive GAN weight compares gradient norms here."""
        return self.decoder.conv_out.weight

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def set_lean_norm_act(self, from_bytes: int | None) -> None:
        """Decide, for every block at once, how its GroupNorm+SiLU pairs run: with autograd, pairs whose input has at
        least `from_bytes` bytes keep only that input for backward, and without autograd the SiLU runs in place
        (norm_act.py: a third less activation memory per ResNet block, same math). None (as built and loaded): the
        plain modules, called as diffusers calls them, with no check per call."""
        for module in self.modules():
            if hasattr(module, "lean_from_bytes"):
                module.lean_from_bytes = from_bytes

    def num_parameters(self, part: str | None = None) -> int:
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())


def check_config_size(config: AutoencoderConfig, where: str = "the model config") -> None:
    """`check_size` of the model `config` builds, built on the meta device (shapes only)."""
    with torch.device("meta"):
        model = KLAutoencoder(config)
    check_size(model, where)
