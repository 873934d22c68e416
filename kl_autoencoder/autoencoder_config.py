"""The KL autoencoder's config: diffusers' `AutoencoderKL` fields and defaults, so a diffusers config.json maps onto it
1:1, with the types and bounds checked once, before any layer is built.

Below the model (model.py) and its blocks (vae_blocks.py), which both build from it; config.py checks a training
config's `model.architecture` with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kl_autoencoder import formats
from kl_autoencoder.formats import capped_repr


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
    """An AutoencoderConfig field that cannot build a model; `field` names it (config/validation.py adds its section)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# act_fn names diffusers accepts for this model, and the module each builds
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish}


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
        _check_architecture(self)
        _check_latent_fields(self)

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



def _fail(config: AutoencoderConfig, field: str, why: str) -> None:
    """Raise the error naming `field` and its (capped) value."""
    raise AutoencoderConfigError(field, f"{field} {why}, got {capped_repr(getattr(config, field))}")


def _check_architecture(config: AutoencoderConfig) -> None:
    """Channels, groups, levels, sample size, block types and activation: what the layers are built from."""
    fail = functools.partial(_fail, config)

    for name, top in (("in_channels", MAX_IMAGE_CHANNELS), ("out_channels", MAX_IMAGE_CHANNELS),
                      ("latent_channels", MAX_IMAGE_CHANNELS), ("layers_per_block", MAX_LAYERS_PER_BLOCK),
                      ("norm_num_groups", MAX_BLOCK_CHANNELS)):
        if not (_is_int(getattr(config, name)) and 1 <= getattr(config, name) <= top):
            fail(name, f"must be an integer in [1, {top}]")
    channels = config.block_out_channels
    if not (isinstance(channels, tuple) and 1 <= len(channels) <= MAX_LEVELS
            and all(_is_int(c) and 1 <= c <= MAX_BLOCK_CHANNELS for c in channels)):
        fail("block_out_channels", f"must list 1 to {MAX_LEVELS} channel counts (one per resolution level), "
                                   f"each an integer in [1, {MAX_BLOCK_CHANNELS}]")
    for c in channels:
        if c % config.norm_num_groups:
            raise AutoencoderConfigError("norm_num_groups", (
                f"norm_num_groups={config.norm_num_groups} does not divide block_out_channels entry {c} (it must "
                f"divide every entry of block_out_channels={capped_repr(list(channels))})"))
    sizes = config.sample_size if isinstance(config.sample_size, tuple) else (config.sample_size,)
    if not (len(sizes) in (1, 2) and all(_is_int(s) and 1 <= s <= MAX_SAMPLE_SIZE for s in sizes)):
        fail("sample_size", f"must be an integer in [1, {MAX_SAMPLE_SIZE}] (or [height, width])")
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = getattr(config, name)
        if not isinstance(types, tuple) or len(types) != len(channels):
            fail(name, f"must have one entry per block_out_channels entry ({len(channels)})")
        for block_type in types:
            if block_type != allowed:
                raise AutoencoderConfigError(
                    name, f"{name} entry {capped_repr(block_type)} is not supported (only {allowed!r})")
    if not (isinstance(config.act_fn, str) and config.act_fn in ACTIVATIONS):
        fail("act_fn", f"is not supported; choose one of {sorted(ACTIVATIONS)}")


def _check_latent_fields(config: AutoencoderConfig) -> None:
    """The latent-space numbers (scaling, shift, per-channel statistics) and the boolean switches."""
    fail = functools.partial(_fail, config)

    if not (_is_finite_number(config.scaling_factor) and config.scaling_factor > 0):
        fail("scaling_factor", "must be a finite number > 0")
    if config.shift_factor is not None and not _is_finite_number(config.shift_factor):
        fail("shift_factor", "must be a finite number or null")
    for name in ("latents_mean", "latents_std"):
        value = getattr(config, name)
        if value is None:
            continue
        if not (isinstance(value, tuple) and all(_is_finite_number(v) for v in value)):
            fail(name, "must be a list of finite numbers or null")
        if len(value) != config.latent_channels:
            raise AutoencoderConfigError(
                name, f"{name} has {len(value)} entries but latent_channels is {config.latent_channels}")
    for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(getattr(config, name), bool):
            fail(name, "must be true or false")
