"""Typed training configs: plain YAML -> dataclasses, dotted overrides, validation with clear errors.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=20", "loss.gan.enabled=true"])

Every problem is reported before any work starts, as a `ConfigError` naming the dotted key and its value:
unknown keys (with a did-you-mean), wrong types (checked against the dataclass annotations), and impossible
values (non-positive learning rate, resolution not divisible by the downsampling factor, ...).

YAML 1.1 reads `1e-4` as a string; float fields therefore accept strings that parse as a float. It also reads `no`
as false: a field whose choices include "no" (`train.mixed_precision`) takes it back as "no". Every float must be finite.
YAML anchors/aliases are refused (a few hundred bytes of nested aliases expand to billions of values), and every
value an error message shows is cut short.

The sections are dataclasses in config_schema.py; YAML parsing, overrides and type conversion are config_yaml.py's,
value checks config_validation.py's. This module joins them and re-exports their names.
"""


from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kl_autoencoder.config_schema import (  # noqa: F401 (the schema, re-exported)
    BEST_DIRECTIONS, ConfigError, DataConfig, DistillSection, EMAConfig, EquivarianceConfig, Fp16FixSection,
    GanConfig, LossConfig, ModelSection, OptimConfig, TrainConfig, TrainSection, ValidationConfig,
)
from kl_autoencoder.config_validation import (  # noqa: F401 (re-exported)
    MAX_RESOLUTION, autoencoder_fields, pretrained_architecture, resolved_architecture, validate, validate_data,
    validate_distill, validate_finite, validate_fp16_fix, validate_loss, validate_model, validate_optim,
    validate_preset, validate_train, validate_validation, validation_source,
)
from kl_autoencoder.config_yaml import (  # noqa: F401 (re-exported)
    KEY_ALIASES, MAX_CONFIG_BYTES, REMOVED_KEYS, YAML_FALSE, YAML_TRUE, apply_override, build_section, check_type,
    config_to_dict, parse_yaml, save_config, type_name, unknown_key_message,
)
from kl_autoencoder.durable import check_regular_file


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (None = all defaults), apply `a.b.c=value` overrides, build and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        check_regular_file(path, "config file", ConfigError)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        raw = parse_yaml(path.read_text(), f"config file '{path}'") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    cfg = build_section(TrainConfig, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from a nested dict (e.g. a saved `config.yaml`)."""
    cfg = build_section(TrainConfig, raw, "")
    validate(cfg)
    return cfg


def keeps_pretrained_latent_scale(cfg: TrainConfig) -> bool:
    """Whether the export keeps the model's factors as built (source config <- preset <- model.architecture): only a
    pretrained model's frozen encoder leaves its latent space as it was. Factors in `model.architecture` are starting
    values, re-measured like any other; `train.remeasure_latent_scale` decides when set (false keeps them)."""
    if cfg.train.remeasure_latent_scale is not None:
        return not cfg.train.remeasure_latent_scale
    return bool(cfg.model.pretrained) and cfg.model.freeze_encoder
