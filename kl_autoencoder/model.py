"""The KL autoencoder: encoder -> diagonal Gaussian posterior -> decoder.

Read top to bottom: the config, the building blocks (ResNet block, self-attention, down/up-sampling), the encoder and
decoder, the posterior, and the autoencoder that ties them together. Module names are chosen so that `state_dict()`
has exactly the keys of diffusers' `AutoencoderKL` for the same config: weights move between the two with
`load_state_dict(strict=True)` and no renaming. `from_pretrained` / `save_pretrained` build and export the model; the
files themselves (reading, key maps, checks, atomic writes) are `formats.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kl_autoencoder import formats, presets
from kl_autoencoder.formats import WeightsError, capped_repr
from kl_autoencoder.norm_act import norm_act

# --------------------------------------------------------------------------------------------------------------------
# Config: the same fields and defaults as diffusers' AutoencoderKL, so a diffusers config.json maps onto it 1:1.

# Sane bounds, checked before anything is allocated: well above every released VAE (SD/SDXL/SD3/FLUX: 4 levels of at
# most 512 channels, 2 layers per block, 4-16 latent channels), well below what a typo allocates (100000 channels).
MAX_LEVELS = 8
MAX_BLOCK_CHANNELS = 2048
MAX_IMAGE_CHANNELS = 256  # in_channels / out_channels / latent_channels
MAX_LAYERS_PER_BLOCK = 8
MAX_SAMPLE_SIZE = 65536
# Each field's bound still lets their product reach ~1e10 parameters (40 GB in fp32); the largest released KL VAEs
# (SD3, FLUX) have 84M. The whole model is bounded too, counted on the meta device before anything is allocated.
MAX_PARAMETERS = 2_000_000_000


class AutoencoderConfigError(ValueError):
    """An AutoencoderConfig field that cannot build a model; `field` names it (config.py prefixes its section)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32  # diffusers accepts [height, width] too
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        # YAML and JSON give lists; keep tuples so configs compare and hash cleanly.
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std",
                     "sample_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        # diffusers lets the block-type lists default to length 1; one entry per resolution level is what it builds.
        if isinstance(self.block_out_channels, tuple) and len(self.block_out_channels) > 1:
            levels = len(self.block_out_channels)
            if isinstance(self.down_block_types, tuple) and len(self.down_block_types) == 1:
                self.down_block_types = self.down_block_types * levels
            if isinstance(self.up_block_types, tuple) and len(self.up_block_types) == 1:
                self.up_block_types = self.up_block_types * levels
        self.validate()

    def validate(self) -> None:
        """Raise AutoencoderConfigError (a ValueError) naming the field when the config cannot build a sane model.

        Types and bounds are checked here, once, before any layer is built; nothing else re-checks them.
        """
        def fail(field: str, why: str) -> None:
            raise AutoencoderConfigError(field, f"{field} {why}, got {capped_repr(getattr(self, field))}")

        for name, top in (("in_channels", MAX_IMAGE_CHANNELS), ("out_channels", MAX_IMAGE_CHANNELS),
                          ("latent_channels", MAX_IMAGE_CHANNELS), ("layers_per_block", MAX_LAYERS_PER_BLOCK),
                          ("norm_num_groups", MAX_BLOCK_CHANNELS)):
            if not (_is_int(getattr(self, name)) and 1 <= getattr(self, name) <= top):
                fail(name, f"must be an integer in [1, {top}]")
        channels = self.block_out_channels
        if not (isinstance(channels, tuple) and 1 <= len(channels) <= MAX_LEVELS
                and all(_is_int(c) and 1 <= c <= MAX_BLOCK_CHANNELS for c in channels)):
            fail("block_out_channels", f"must list 1 to {MAX_LEVELS} channel counts (one per resolution level), "
                                       f"each an integer in [1, {MAX_BLOCK_CHANNELS}]")
        for c in channels:
            if c % self.norm_num_groups:
                raise AutoencoderConfigError("norm_num_groups", (
                    f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels entry {c} (it must "
                    f"divide every entry of block_out_channels={capped_repr(list(channels))})"))
        sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        if not (len(sizes) in (1, 2) and all(_is_int(s) and 1 <= s <= MAX_SAMPLE_SIZE for s in sizes)):
            fail("sample_size", f"must be an integer in [1, {MAX_SAMPLE_SIZE}] (or [height, width])")
        for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if not isinstance(types, tuple) or len(types) != len(channels):
                fail(name, f"must have one entry per block_out_channels entry ({len(channels)})")
            for block_type in types:
                if block_type != allowed:
                    raise AutoencoderConfigError(
                        name, f"{name} entry {capped_repr(block_type)} is not supported (only {allowed!r})")
        if not (isinstance(self.act_fn, str) and self.act_fn in ACTIVATIONS):
            fail("act_fn", f"is not supported; choose one of {sorted(ACTIVATIONS)}")
        if not (_is_finite_number(self.scaling_factor) and self.scaling_factor > 0):
            fail("scaling_factor", "must be a finite number > 0")
        if self.shift_factor is not None and not _is_finite_number(self.shift_factor):
            fail("shift_factor", "must be a finite number or null")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is None:
                continue
            if not (isinstance(value, tuple) and all(_is_finite_number(v) for v in value)):
                fail(name, "must be a list of finite numbers or null")
            if len(value) != self.latent_channels:
                raise AutoencoderConfigError(
                    name, f"{name} has {len(value)} entries but latent_channels is {self.latent_channels}")
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsampling_factor
        return (self.latent_channels, math.ceil(height / f), math.ceil(width / f))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoencoderConfig":
        """Build from a diffusers config dict; bookkeeping keys (`_class_name`, ...) are dropped, unknown ones warned."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and not str(k).startswith("_"))
        if unknown:
            warnings.warn(f"ignoring config keys this model does not use: {capped_repr(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})


def infer_config(state: dict[str, torch.Tensor], **overrides: Any) -> AutoencoderConfig:
    """The config of a diffusers-keyed state dict that came without one (see `formats.infer_architecture`)."""
    return AutoencoderConfig.from_dict({**formats.infer_architecture(state), **overrides})


ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish}

# --------------------------------------------------------------------------------------------------------------------
# Building blocks. Every norm is GroupNorm with eps 1e-6, as in LDM and diffusers' VAE.

NORM_EPS = 1e-6


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu"):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = ACTIVATIONS[act_fn]()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.lean_from_bytes: int | None = None  # see norm_act.py; set by KLAutoencoder.set_lean_norm_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_act(self.norm1, self.act, x, self.lean_from_bytes))
        h = self.conv2(norm_act(self.norm2, self.act, h, self.lean_from_bytes))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection.

    Linear q/k/v/out projections named as diffusers names them (`to_q`, ..., `to_out.0`); the attention itself is
    PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels where the device has them).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # a channels-last view, no copy
        # `out + x` (not `x + out`) keeps the result channels-last like diffusers, so later layers match it bitwise.
        return out + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv. LDM pads only right and bottom, so the output grid aligns with the input's top-left."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no transposed conv, so no checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None


class MidBlock(nn.Module):
    """ResNet block, optional self-attention, ResNet block: the only place the VAE sees the whole image at once."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)]) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run one block, recomputing its activations in backward when gradient checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> posterior moments [B, 2 * latent, H / f, W / f] (mean and log-variance stacked)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups, act = config.block_out_channels, config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, act, downsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, act, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.lean_from_bytes: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = _run(resnet, h, ckpt)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
        h = _run(self.mid_block, h, ckpt)
        return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, h, self.lean_from_bytes))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, out, h * f, w * f]; the mirror of the encoder with one extra ResNet per level."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups, act = tuple(reversed(config.block_out_channels)), config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, act, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, act, upsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.lean_from_bytes: int | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = _run(self.mid_block, self.conv_in(z), ckpt)
        for block in self.up_blocks:
            for resnet in block.resnets:
                h = _run(resnet, h, ckpt)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h)
        return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, h, self.lean_from_bytes))


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


class KLAutoencoder(nn.Module):
    """Encoder -> DiagonalGaussian posterior -> decoder, with diffusers AutoencoderKL's state-dict layout."""

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
        """GroupNorm+SiLU pairs whose input has at least `from_bytes` bytes keep only that input for backward
        (norm_act.py: a third less activation memory per ResNet block, same math); None turns it off."""
        for module in self.modules():
            if hasattr(module, "lean_from_bytes"):
                module.lean_from_bytes = from_bytes

    def num_parameters(self, part: str | None = None) -> int:
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        config: AutoencoderConfig | dict | None = None, subfolder: str | None = None,
                        preset: str | None = None) -> "KLAutoencoder":
        """Load a diffusers folder, a pipeline folder (its `vae/`), an LDM single file, or a hub repo id.

        `config` overrides the config found with the weights (LDM files carry none: it is read off the shapes, and
        without a `preset` a one-line warning says which scaling_factor was assumed). `preset` (presets.PRESETS:
        sd, sd2, sdxl, sd3, flux) sets the release's latent fields, after checking the weights are that release's.
        Everything is checked before the weights are read: the config's types and bounds, then the file's header
        (names, shapes, dtypes) against the model that config builds; NaN/inf weights load with a warning.
        """
        files = formats.locate_model(path, subfolder)
        source = str(files.weights)
        header = formats.to_diffusers_state_dict(formats.read_state_dict(files.weights, meta=True))
        formats.check_floating(header, source)
        if config is not None:
            files.config, files.config_source = config, "the config passed in"
        model_config = _config_from(files.config, files.config_source, header, source, preset)
        with torch.device("meta"):  # the shapes this config builds, allocating nothing
            skeleton = cls(model_config)
        check_size(skeleton, source)
        expected = skeleton.state_dict()
        formats.check_fits(header, expected, source)
        state = header
        if any(t.is_meta for t in header.values()):
            state = formats.to_diffusers_state_dict(formats.read_state_dict(files.weights))
        formats.warn_nonfinite(state, source)
        # Uninitialised memory, then the strict load writes every tensor (the model has no buffers): no random init
        # of weights that are overwritten at once, which took seconds for a full-size VAE.
        model = skeleton.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, path: str | Path, format: str = "diffusers", dtype: torch.dtype | str | None = None,
                        *, overwrite: bool = False, protect: Sequence[str | Path] = (),
                        private: dict[str, Any] | None = None, card: str | None = None) -> Path:
        """Write `config.json` + `diffusion_pytorch_model.safetensors` (or one LDM-named `.safetensors`), atomically.

        A config that no longer validates (e.g. a NaN `scaling_factor` set after construction) or NaN/inf weights are
        refused before anything is written; the previous export at `path` stays as it was. An existing folder at
        `path` is replaced only when it is a previous export (or with `overwrite=True`); `/`, home, the current
        directory and folders holding one of `protect` never are (formats.save_weights). `private`: extra
        config.json keys starting with "_" (diffusers ignores those without a warning), e.g. presets.LATENT_SCALE_KEY.
        `card`: the model card (model_card.py) written as README.md beside them (diffusers format only).
        """
        try:
            self.config.validate()
        except ValueError as err:
            raise WeightsError(f"refusing to export {path}: {err}; nothing was written") from err
        if any(not key.startswith("_") for key in private or {}):
            raise ValueError(f"private config keys start with '_': {sorted(private)}")
        return formats.save_weights(self.state_dict(), {**self.config.to_dict(), **(private or {})}, path,
                                    format=format, dtype=dtype, overwrite=overwrite, protect=protect, card=card)


def check_size(model: nn.Module, where: str) -> None:
    """Refuse a model (built on the meta device: nothing allocated) with more than MAX_PARAMETERS parameters."""
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise AutoencoderConfigError("block_out_channels", (
            f"{where}: the config builds {count:,} parameters ({count * 4 / 2**30:.0f} GiB in fp32), over the limit "
            f"of {MAX_PARAMETERS:,} (the largest released KL VAEs have under 100 million); lower block_out_channels "
            "or layers_per_block"))


def check_config_size(config: AutoencoderConfig, where: str = "the model config") -> None:
    """`check_size` of the model `config` builds, built on the meta device (shapes only)."""
    with torch.device("meta"):
        model = KLAutoencoder(config)
    check_size(model, where)


def _config_from(config: AutoencoderConfig | dict | None, origin: str, header: dict[str, torch.Tensor],
                 weights: str, preset: str | None = None) -> AutoencoderConfig:
    """The config to build: as given, else read off the weights' shapes; a preset's latent fields over either.
    Errors name where the bad value came from."""
    stored = config is not None
    if not stored:
        origin = f"the config inferred from the shapes in {weights}"
        config = formats.infer_architecture(header)
        if preset is None:  # SD 1.x and SDXL have the same shapes: the latent fields are a guess, say which
            config, message = presets.assume_release(config, weights)
            warnings.warn(message, stacklevel=3)
    if preset is not None:
        config = presets.apply_preset(config.to_dict() if isinstance(config, AutoencoderConfig) else dict(config),
                                      preset, weights, stored)
        origin = f"{origin} with preset {preset!r}"
    try:
        if isinstance(config, AutoencoderConfig):
            config.validate()
            return config
        return AutoencoderConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{origin}: {err}") from err
