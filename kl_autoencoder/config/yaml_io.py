"""YAML onto the config dataclasses: safe parsing (no aliases, bounded size), dotted overrides, building each section
with its keys and types checked (unknown keys get a did-you-mean), and writing a config back as YAML.

YAML 1.1 reads `1e-4` as a string; float fields therefore accept strings that parse as a float. It also reads `no`
as false: a field whose choices include "no" (`train.mixed_precision`) takes it back as "no". Every value an error
message shows is cut short. Sits on schema.py; loading.py calls it before validating."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal

import yaml

from kl_autoencoder.config.schema import ConfigError, TrainConfig
from kl_autoencoder.durable import atomic_write_text
from kl_autoencoder.formats import capped_repr

# ------------------------------------------------------------------------------------ parsing, overrides, writing

MAX_CONFIG_BYTES = 1 << 20  # a training config is a few kB; anything this large is a mistake or an attack


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases: `*name` references are how a tiny file expands to billions of values."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{capped_repr(event.anchor, 40)}) "
                              "are not supported in configs; write the value out")
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """YAML -> Python values, safe tags only, no aliases, bounded size; errors start with `where`."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {len(text)} bytes; configs are limited to {MAX_CONFIG_BYTES}")
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    except RecursionError:  # the YAML parser recurses once per nesting level
        raise ConfigError(f"{where} is nested too deeply to be a config") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `1e-4`, `[1, 2]`, `null`, `true`)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    shown = capped_repr(override)
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {shown} must look like section.key=value (e.g. train.max_steps=20)")
    value = parse_yaml(text, f"override {shown}: value") if text.strip() else None
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override {shown}: '{where}' is a value ({capped_repr(child)}), not a section")
        node = child
    node[leaf] = value


# ----------------------------------------------------------------------------------------------- building


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking keys and value types against the annotations."""
    name = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{name}' must be a section (mapping), got {type(raw).__name__} {capped_repr(raw)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if f"{prefix}{key}" in REMOVED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' was removed: {REMOVED_KEYS[f'{prefix}{key}']}")
        if key not in known:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", str(key), known))
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build_section(hint, value, f"{prefix}{key}.")
        else:
            values[key] = check_type(value, hint, f"{prefix}{key}")
    return cls(**values)


# Keys that meant something this toolkit no longer does: why, and what to write instead.
REMOVED_KEYS = {
    "loss.equivariance.weight": "EQ-VAE has no separate term to weigh: with loss.equivariance.probability the "
                                "transformed pair replaces the plain one and the whole loss applies to it; drop the "
                                "key (probability 0 = off)",
    "loss.equivariance.scales": "the downscale is now EQ-VAE's random s in [loss.equivariance.min_scale, 1), not "
                                "fixed integer factors; drop the key",
    "distill.sample_posterior": "the student learns from the teacher's posterior mean (encoder: its scaled mean; "
                                "decoder: that latent), as TAESD; drop the key",
}


# What other recipes (diffusers' train_autoencoderkl.py and its argparse flags, LDM / sgm yaml, Lightning) call our
# keys, for the did-you-mean of names that are near in meaning but not in spelling. Values are relative to the
# section the unknown key was found in; a suggestion is only made where it exists there.
KEY_ALIASES = {
    "learning_rate": "lr", "base_learning_rate": "lr", "base_lr": "lr", "disc_learning_rate": "disc_lr",
    "lr_scheduler": "schedule", "lr_warmup_steps": "warmup_steps", "warmup": "warmup_steps",
    "adam_weight_decay": "weight_decay", "adam_beta1": "betas", "adam_beta2": "betas",
    "max_grad_norm": "grad_clip", "gradient_clip_val": "grad_clip", "clip_grad_norm": "grad_clip",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum_steps",
    "accumulate_grad_batches": "grad_accum_steps", "max_train_steps": "max_steps", "num_train_steps": "max_steps",
    "checkpointing_steps": "checkpoint_every", "save_steps": "checkpoint_every",
    "checkpoints_total_limit": "keep_checkpoints", "save_total_limit": "keep_checkpoints",
    "resume_from_checkpoint": "resume", "logging_steps": "log_every", "validation_steps": "image_every",
    "use_ema": "ema", "ema_decay": "ema.decay", "allow_tf32": "tf32", "precision": "mixed_precision",
    "dataset_name": "source", "train_data_dir": "source", "data_dir": "source", "image_size": "resolution",
    "size": "resolution", "dataloader_num_workers": "num_workers", "max_train_samples": "max_images",
    "pretrained_model_name_or_path": "pretrained", "disc_factor": "gan.disc_weight", "disc_num_layers": "disc_layers",
    "disc_start": "gan.disc_start", "disc_weight": "gan.disc_weight", "pixelloss_weight": "pixel_weight",
    "rec_loss_weight": "pixel_weight", "lpips_weight": "perceptual_weight", "perceptual_loss_weight": "perceptual_weight",
    "logvar_init": "learned_logvar", "beta": "kl_weight", "embed_dim": "latent_channels", "z_channels": "latent_channels",
    "num_res_blocks": "layers_per_block", "ch_mult": "block_out_channels", "ch": "block_out_channels",
    "num_groups": "norm_num_groups",
}


def unknown_key_message(dotted: str, key: str, known: list[str]) -> str:
    """The error for an unknown key: a known name near in meaning (KEY_ALIASES) or in spelling (difflib)."""
    alias = KEY_ALIASES.get(key.lower())
    if alias is not None and alias.split(".")[0] in known:
        close = [alias]
    else:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown config key {capped_repr(dotted)}{hint}"


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_type(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to `hint` (list->tuple, int->float, '1e-4'->float) or raise ConfigError."""
    try:
        return _convert(value, hint)
    except TypeError:
        raise ConfigError(
            f"'{key}' must be {type_name(hint)}, got {type(value).__name__} {capped_repr(value)}"
        ) from None


YAML_TRUE = ("yes", "on", "true", "y")
YAML_FALSE = ("no", "off", "false", "n")


def _convert(value: Any, hint: Any) -> Any:
    """`value` as annotation `hint` asks (see check_type); TypeError when it does not fit."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:  # first alternative that accepts the value wins
            try:
                return _convert(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is Literal:
        return _convert_literal(value, args)
    if hint in (type(None), bool, int, float, str):
        return _convert_scalar(value, hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise TypeError
            return tuple(_convert(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_convert(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return dict(value)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise TypeError
    return value  # unknown annotation: accept


def _convert_literal(value: Any, args: tuple) -> Any:
    for allowed in args:  # `True == 1`, so compare types too
        if value == allowed and type(value) is type(allowed):
            return value
    if isinstance(value, bool):  # YAML 1.1 reads no/off/false (yes/on/true) as booleans: take back the spelling
        spelling = [a for a in (YAML_TRUE if value else YAML_FALSE) if a in args]
        if spelling:
            return spelling[0]
    raise TypeError


def _convert_scalar(value: Any, hint: type) -> Any:
    """null, bool, int, float (from an int or a string such as YAML 1.1's '1e-4') or str; bools are not numbers."""
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            value = float(value)
        except ValueError:
            raise TypeError from None
    if hint is type(None):
        ok = value is None
    elif hint is bool or hint is str:
        ok = isinstance(value, hint)
    else:
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if not ok:
        raise TypeError
    return float(value) if hint is float else value
