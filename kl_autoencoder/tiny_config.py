"""The tiny autoencoder's config: diffusers' `AutoencoderTiny` fields and defaults, so its config.json maps onto this
1:1, checked for what diffusers could build and run and for what it would allocate, before any layer is built.

Below tiny.py, which builds, distils, loads and exports the model from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from kl_autoencoder.formats import capped_repr

@dataclass
class TinyConfig:
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        for name in _STAGE_FIELDS:
            if isinstance(getattr(self, name), list):  # JSON gives lists; tuples compare and hash cleanly
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when diffusers' AutoencoderTiny could not build or run this config."""
        _check_fields(self)
        _check_size(self)

    def num_parameters(self) -> int:
        """The parameter count of the model this config builds, in closed form (nothing is built)."""
        def conv3(n_in: int, n_out: int, bias: bool = True) -> int:
            return 9 * n_in * n_out + (n_out if bias else 0)

        we, wd = self.encoder_block_out_channels[0], self.decoder_block_out_channels[0]
        encoder = (conv3(self.in_channels, we) + (len(self.num_encoder_blocks) - 1) * conv3(we, we, bias=False)
                   + 3 * sum(self.num_encoder_blocks) * conv3(we, we) + conv3(we, self.latent_channels))
        decoder = (conv3(self.latent_channels, wd) + (len(self.num_decoder_blocks) - 1) * conv3(wd, wd, bias=False)
                   + 3 * sum(self.num_decoder_blocks) * conv3(wd, wd) + conv3(wd, self.out_channels))
        return encoder + decoder

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.num_encoder_blocks) - 1)

    @property
    def upsampling_factor(self) -> int:
        return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_diffusers_dict(self) -> dict[str, Any]:
        """config.json as diffusers writes it: + class name, version, and the `block_out_channels` it records."""
        import diffusers  # a dependency: the version diffusers would write

        return {"_class_name": "AutoencoderTiny", "_diffusers_version": diffusers.__version__, **self.to_dict(),
                "block_out_channels": list(self.decoder_block_out_channels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TinyConfig":
        """Build from a diffusers config dict; bookkeeping keys and the derived `block_out_channels` are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and not k.startswith("_") and k != "block_out_channels")
        if unknown:
            warnings.warn(f"ignoring AutoencoderTiny config keys this model does not use: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})


# Bounds for configs read from files, far above TAESD (64 wide, 3 blocks a stage, 2x upsampling, 2.4M parameters).
MAX_TINY_PARAMETERS = 1_000_000_000
MAX_TINY_BLOCKS = 64
MAX_UPSAMPLING_SCALE = 8
MAX_RESAMPLING_FACTOR = 128  # 8 stages of 2x, as the KL model's MAX_LEVELS
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}
_STAGE_FIELDS = ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(config: TinyConfig, name: str, why: str) -> None:
    """Raise the ValueError naming field `name` and its (capped) value."""
    raise ValueError(f"{name} {why}, got {capped_repr(getattr(config, name))}")


def _check_fields(config: TinyConfig) -> None:
    """Types, ranges and the choices diffusers' AutoencoderTiny supports."""
    fail = functools.partial(_fail, config)

    for name in ("in_channels", "out_channels", "latent_channels", "upsampling_scaling_factor"):
        if not (_is_int(getattr(config, name)) and 1 <= getattr(config, name) <= 1024):
            fail(name, "must be an integer in [1, 1024]")
    for name in _STAGE_FIELDS:
        value = getattr(config, name)
        if not (isinstance(value, tuple) and 1 <= len(value) <= 8 and all(_is_int(v) and 0 <= v <= 4096
                                                                             for v in value)):
            fail(name, "must list 1 to 8 integers in [0, 4096] (one per stage)")
    for half in ("encoder", "decoder"):
        widths, blocks = getattr(config, f"{half}_block_out_channels"), getattr(config, f"num_{half}_blocks")
        if len(widths) != len(blocks):
            fail(f"num_{half}_blocks", f"must have one entry per {half}_block_out_channels entry ({len(widths)})")
        # diffusers wires every stage from its own width (no channel change between stages), so only equal
        # widths run; reject the others here rather than at the first forward.
        if len(set(widths)) != 1 or widths[0] < 1:
            fail(f"{half}_block_out_channels", "must repeat one width >= 1 (AutoencoderTiny has no channel change "
                                               "between stages)")
    if config.act_fn not in ACTIVATIONS:
        fail("act_fn", f"is not supported; choose one of {sorted(ACTIVATIONS)}")
    if config.upsample_fn not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
        fail("upsample_fn", "must be an nn.Upsample mode for images (nearest, nearest-exact, bilinear, bicubic)")
    for name in ("latent_magnitude", "scaling_factor"):
        if not (_is_number(getattr(config, name)) and getattr(config, name) > 0):
            fail(name, "must be a finite number > 0")
    for name in ("latent_shift", "shift_factor"):
        if not _is_number(getattr(config, name)):
            fail(name, "must be a finite number")
    if not isinstance(config.force_upcast, bool):
        fail("force_upcast", "must be true or false")


def _check_size(config: TinyConfig) -> None:
    """Bounds on what the config would allocate, checked before any layer is built (a config.json is input)."""
    fail = functools.partial(_fail, config)
    for name in ("num_encoder_blocks", "num_decoder_blocks"):
        if any(v > MAX_TINY_BLOCKS for v in getattr(config, name)):
            fail(name, f"must have at most {MAX_TINY_BLOCKS} blocks per stage")
    if config.upsampling_scaling_factor > MAX_UPSAMPLING_SCALE:
        fail("upsampling_scaling_factor", f"must be at most {MAX_UPSAMPLING_SCALE} (AutoencoderTiny uses 2)")
    if config.upsampling_factor > MAX_RESAMPLING_FACTOR:
        fail("upsampling_scaling_factor", f"gives {config.upsampling_factor}x upsampling over "
                                          f"{len(config.num_decoder_blocks)} stages, over {MAX_RESAMPLING_FACTOR}x")
    if config.num_parameters() > MAX_TINY_PARAMETERS:
        fail("encoder_block_out_channels", f"and the other stage fields give {config.num_parameters():,} "
                                           f"parameters, more than {MAX_TINY_PARAMETERS:,}")
