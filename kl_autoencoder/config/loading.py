"""`load_config` / `config_from_dict`: a YAML file (or a nested dict) and dotted overrides in, a validated
`TrainConfig` out; and `keeps_pretrained_latent_scale`, what a built config says about the export's latent factors.

Joins the rooms below it: yaml_io.py parses and builds, validation.py checks the values, schema.py holds the classes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kl_autoencoder.config.schema import ConfigError, TrainConfig
from kl_autoencoder.config.validation import validate
from kl_autoencoder.config.yaml_io import apply_override, build_section, parse_yaml
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
