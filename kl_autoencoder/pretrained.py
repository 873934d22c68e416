"""Loading and exporting a KL autoencoder: `from_pretrained` / `save_pretrained`, as a mixin the way diffusers'
`ModelMixin` gives them to each of its models.

It holds what is the model's to decide: which config to build (the one given, the one stored, or one read off the
weights' shapes, with a preset's latent fields), the checks before any weight is read (the config's bounds, the
parameter count on the meta device, the file's names and shapes), and what an export refuses. The files themselves
(reading, key maps, atomic writes) are formats.py's. Below model.py, which mixes it into `KLAutoencoder`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kl_autoencoder import formats, presets
from kl_autoencoder.autoencoder_config import MAX_PARAMETERS, AutoencoderConfig, AutoencoderConfigError
from kl_autoencoder.formats import WeightsError


Model = TypeVar("Model", bound="PretrainedMixin")


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for an `nn.Module` built as `cls(AutoencoderConfig)`, with `.config`."""

    config: AutoencoderConfig

    @classmethod
    def from_pretrained(cls: type[Model], path: str | Path, dtype: torch.dtype | None = None,
                        config: AutoencoderConfig | dict | None = None, subfolder: str | None = None,
                        preset: str | None = None) -> Model:
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
