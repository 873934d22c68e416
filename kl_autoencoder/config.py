"""Typed training configs: plain YAML -> dataclasses, dotted overrides, validation with clear errors.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=20", "loss.gan.enabled=true"])

Every problem is reported before any work starts, as a `ConfigError` naming the dotted key and its value:
unknown keys (with a did-you-mean), wrong types (checked against the dataclass annotations), and impossible
values (non-positive learning rate, resolution not divisible by the downsampling factor, ...).

YAML 1.1 reads `1e-4` as a string; float fields therefore accept strings that parse as a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kl_autoencoder.durable import atomic_write_text


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    pretrained: str | None = None  # diffusers folder / pipeline folder / LDM file / hub id; None = train from scratch
    architecture: dict[str, Any] = field(default_factory=dict)  # AutoencoderConfig fields (ignored keys are errors)
    freeze_encoder: bool = False  # train the decoder only (encoder + quant_conv frozen), as sd-vae-ft-mse
    gradient_checkpointing: bool = False
    compile: bool = False
    channels_last: bool | None = None  # None = FastPath.for_device: NHWC on CUDA, NCHW on CPU


@dataclass
class DataConfig:
    source: str = "sample"  # "sample" (built-in photos), an image folder, or a hub dataset name
    split: str = "train"
    image_column: str | None = None
    streaming: bool = False
    resolution: int = 256
    random_crop: bool = True
    random_flip: bool = True
    num_workers: int | None = None  # None = sized from the machine
    max_images: int | None = None
    cache_dir: str | None = None


@dataclass
class GanConfig:
    enabled: bool = False
    disc_start: int = 50001  # first step with the adversarial term and discriminator updates
    disc_weight: float = 0.5
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_lr: float | None = None  # None = optim.lr
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_weight: bool = True  # balance GAN vs reconstruction gradients at the decoder's last layer


@dataclass
class LossConfig:
    pixel: Literal["l1", "l2"] = "l1"
    pixel_weight: float = 1.0
    learned_logvar: bool = False  # LDM's NLL form rec / exp(logvar) + logvar with a learned scalar logvar
    perceptual_weight: float = 1.0
    perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    perceptual_pretrained: Literal["auto", True, False] = "auto"
    kl_weight: float = 1e-6
    kl_warmup_steps: int = 0
    kl_schedule: Literal["linear", "cyclical", "constant"] = "linear"
    kl_cycle_steps: int | None = None
    free_bits: float = 0.0
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    grad_clip: float | None = 1.0  # max global grad norm; None = off
    fused: bool | None = None  # None = fused AdamW when on CUDA


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999


@dataclass
class TrainSection:
    output_dir: str = "runs/vae"
    seed: int = 0
    batch_size: int = 8  # per process
    grad_accum_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 10
    image_every: int = 500  # reconstruction grid to TensorBoard; 0 = never
    checkpoint_every: int = 1000  # 0 = only the final checkpoint
    keep_checkpoints: int = 3
    resume: str | None = None  # None | "latest" | a checkpoint folder
    ema: EMAConfig = field(default_factory=EMAConfig)
    tf32: bool = True
    max_nonfinite_steps: int = 10  # consecutive skipped (NaN/inf) steps before stopping
    export_shift_factor: bool | None = None  # None = only for models with >= 16 latent channels (SD3/Flux style)
    scaling_batches: int = 4  # batches of posterior modes used to measure scaling/shift factor at export


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)


# ----------------------------------------------------------------------------------------------- public API


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (None = all defaults), apply `a.b.c=value` overrides, build and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
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
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}' must look like section.key=value (e.g. train.max_steps=20)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': value is not valid YAML: {e}") from None
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override '{override}': '{where}' is a value ({child!r}), not a section")
        node = child
    node[leaf] = value


# ----------------------------------------------------------------------------------------------- building


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking keys and value types against the annotations."""
    name = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{name}' must be a section (mapping), got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
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


def unknown_key_message(dotted: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown config key '{dotted}'{hint}"


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
            f"'{key}' must be {type_name(hint)}, got {type(value).__name__} {value!r}"
        ) from None


def _convert(value: Any, hint: Any) -> Any:
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
        for allowed in args:  # `True == 1`, so compare types too
            if value == allowed and type(value) is type(allowed):
                return value
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
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


# ----------------------------------------------------------------------------------------------- validation


def looks_like_path(source: str) -> bool:
    """A local path rather than the built-in sample or a hub dataset id ("user/name")."""
    if source == "sample":
        return False
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") >= 2 or os.path.exists(source)


def validate(cfg: TrainConfig) -> None:
    """Reject impossible values before any work starts."""
    validate_model(cfg)
    validate_data(cfg.data, resolved_architecture(cfg.model))
    validate_loss(cfg.loss)
    validate_optim(cfg.optim)
    validate_train(cfg.train)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' = {value!r}: {why}")


def autoencoder_fields() -> dict[str, Any]:
    """AutoencoderConfig field name -> annotation (the model module is imported lazily)."""
    from kl_autoencoder.model import AutoencoderConfig

    try:
        hints = typing.get_type_hints(AutoencoderConfig)
    except Exception:  # unresolvable annotation: check names only
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(AutoencoderConfig)}


def pretrained_architecture(pretrained: str) -> dict[str, Any]:
    """The architecture stored with a local diffusers folder (config.json or vae/config.json), else {}."""
    root = Path(pretrained).expanduser()
    for candidate in (root / "config.json", root / "vae" / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
    return {}


def resolved_architecture(model: ModelSection) -> dict[str, Any]:
    """Architecture fields the run will use: defaults <- pretrained config.json <- model.architecture."""
    from kl_autoencoder.model import AutoencoderConfig

    arch = AutoencoderConfig().to_dict() if hasattr(AutoencoderConfig, "to_dict") else dataclasses.asdict(AutoencoderConfig())
    if model.pretrained:
        arch.update({k: v for k, v in pretrained_architecture(model.pretrained).items() if k in arch})
    arch.update(model.architecture)
    return arch


def validate_model(cfg: TrainConfig) -> None:
    model = cfg.model
    fields = autoencoder_fields()
    converted = {}
    for key, value in model.architecture.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(f"model.architecture.{key}", key, list(fields)))
        converted[key] = check_type(value, fields[key], f"model.architecture.{key}")
    model.architecture = converted
    if model.pretrained is not None and looks_like_path(model.pretrained):
        _require(os.path.exists(os.path.expanduser(model.pretrained)), "model.pretrained", model.pretrained,
                 "no such file or folder (override with model.pretrained=PATH)")
    _require(not model.freeze_encoder or model.pretrained is not None, "model.pretrained", model.pretrained,
             "model.freeze_encoder=true fine-tunes the decoder of a trained model: set model.pretrained=PATH")
    arch = resolved_architecture(model)
    blocks = list(arch.get("block_out_channels", ()))
    groups = arch.get("norm_num_groups", 1)
    _require(len(blocks) >= 1 and all(isinstance(c, int) and c >= 1 for c in blocks),
             "model.architecture.block_out_channels", blocks, "needs at least one positive channel count")
    _require(isinstance(groups, int) and groups >= 1, "model.architecture.norm_num_groups", groups, "must be >= 1")
    bad = [c for c in blocks if c % groups]
    _require(not bad, "model.architecture.norm_num_groups", groups,
             f"must divide every block_out_channels entry {blocks} (not {bad})")
    from kl_autoencoder.model import AutoencoderConfig

    try:  # the model's own checks (block types, activation, latents_mean length, ...)
        AutoencoderConfig.from_dict(arch)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"'model.architecture' = {model.architecture!r}: {e}") from None


def validate_data(data: DataConfig, arch: dict[str, Any]) -> None:
    factor = 2 ** (len(arch.get("block_out_channels", (1,))) - 1)
    _require(data.resolution >= 1, "data.resolution", data.resolution, "must be >= 1")
    _require(data.resolution % factor == 0, "data.resolution", data.resolution,
             f"must be divisible by the downsampling factor {factor} (2 ** (len(block_out_channels) - 1))")
    if looks_like_path(data.source):
        _require(os.path.isdir(os.path.expanduser(data.source)), "data.source", data.source,
                 "image folder does not exist")
    _require(data.num_workers is None or data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0")
    _require(data.max_images is None or data.max_images >= 1, "data.max_images", data.max_images, "must be >= 1")


def validate_loss(loss: LossConfig) -> None:
    for key in ("pixel_weight", "perceptual_weight", "kl_weight", "free_bits"):
        value = getattr(loss, key)
        _require(value >= 0, f"loss.{key}", value, "must be >= 0")
    _require(loss.kl_warmup_steps >= 0, "loss.kl_warmup_steps", loss.kl_warmup_steps, "must be >= 0")
    if loss.kl_schedule == "cyclical":
        _require(loss.kl_cycle_steps is not None and loss.kl_cycle_steps >= 2, "loss.kl_cycle_steps",
                 loss.kl_cycle_steps, "loss.kl_schedule=cyclical needs a cycle length >= 2")
    _require(loss.kl_schedule != "constant" or loss.kl_warmup_steps == 0, "loss.kl_warmup_steps",
             loss.kl_warmup_steps, "loss.kl_schedule=constant has no warm-up; use kl_schedule=linear")
    gan = loss.gan
    _require(gan.disc_start >= 0, "loss.gan.disc_start", gan.disc_start, "must be >= 0")
    _require(gan.disc_weight >= 0, "loss.gan.disc_weight", gan.disc_weight, "must be >= 0")
    _require(gan.disc_lr is None or gan.disc_lr > 0, "loss.gan.disc_lr", gan.disc_lr, "must be > 0")
    _require(gan.disc_channels >= 1, "loss.gan.disc_channels", gan.disc_channels, "must be >= 1")
    _require(gan.disc_layers >= 1, "loss.gan.disc_layers", gan.disc_layers, "must be >= 1")


def validate_optim(optim: OptimConfig) -> None:
    _require(optim.lr > 0, "optim.lr", optim.lr, "learning rate must be > 0")
    _require(all(0 <= b < 1 for b in optim.betas), "optim.betas", list(optim.betas), "each beta must be in [0, 1)")
    _require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "must be >= 0")
    _require(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "must be >= 0")
    _require(optim.grad_clip is None or optim.grad_clip > 0, "optim.grad_clip", optim.grad_clip,
             "must be > 0 (or null to disable clipping)")


def validate_train(train: TrainSection) -> None:
    for key in ("batch_size", "grad_accum_steps", "max_steps", "log_every", "keep_checkpoints",
                "max_nonfinite_steps", "scaling_batches"):
        value = getattr(train, key)
        _require(value >= 1, f"train.{key}", value, "must be >= 1")
    for key in ("image_every", "checkpoint_every"):
        value = getattr(train, key)
        _require(value >= 0, f"train.{key}", value, "must be >= 0 (0 = off)")
    _require(0 < train.ema.decay < 1, "train.ema.decay", train.ema.decay, "must be in (0, 1)")
    _require(bool(train.output_dir), "train.output_dir", train.output_dir, "must not be empty")
    if train.resume not in (None, "latest"):
        _require(os.path.isdir(os.path.expanduser(train.resume)), "train.resume", train.resume,
                 "must be null, 'latest' or an existing checkpoint folder")
