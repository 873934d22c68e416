"""Validation of a built config: impossible values (non-positive learning rate, resolution not divisible by the
downsampling factor, non-finite floats, a preset that does not fit, ...) refused before any work starts, as a
ConfigError naming the dotted key and its value. Sits on schema.py; loading.py calls `validate` after building."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

from kl_autoencoder.config.schema import (
    BEST_DIRECTIONS, ConfigError, DataConfig, LossConfig, ModelSection, OptimConfig, TrainConfig, TrainSection,
)
from kl_autoencoder.config.yaml_io import check_type, unknown_key_message
from kl_autoencoder.formats import WeightsError, capped_repr, find_config_json, is_local_path, read_config
from kl_autoencoder.model import AutoencoderConfig, AutoencoderConfigError, check_config_size
from kl_autoencoder.presets import PRESETS, PresetError, check_fits, describe_choices, get_preset
from kl_autoencoder.spelling import BUILT_IN_SOURCES, source_suggestion
from kl_autoencoder.trackers import TrackerError, check_report_to

# ----------------------------------------------------------------------------------------------- validation


def validate(cfg: TrainConfig) -> None:
    """Reject impossible values before any work starts."""
    validate_finite(cfg)
    validate_model(cfg)
    validate_distill(cfg)
    validate_fp16_fix(cfg)
    # a distillation's crops are cut for the teacher's downsampling factor
    teacher = ModelSection(pretrained=cfg.distill.teacher, preset=cfg.model.preset) if cfg.distill.teacher else cfg.model
    arch = resolved_architecture(teacher)
    validate_data(cfg.data, arch)
    validate_loss(cfg.loss)
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    validate_validation(cfg, arch)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' = {capped_repr(value)}: {why}")


def autoencoder_fields() -> dict[str, Any]:
    """AutoencoderConfig field name -> annotation, for the YAML-level conversion of `model.architecture`."""
    hints = typing.get_type_hints(AutoencoderConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(AutoencoderConfig)}


def pretrained_architecture(pretrained: str) -> dict[str, Any]:
    """The architecture stored with a local diffusers or pipeline folder; {} for files and hub ids (read at load)."""
    config_json = find_config_json(pretrained) if os.path.isdir(os.path.expanduser(pretrained)) else None
    if config_json is None:
        return {}
    try:
        return read_config(config_json.parent)
    except WeightsError as e:
        raise ConfigError(f"'model.pretrained' = {capped_repr(pretrained)}: {e}") from None


def resolved_architecture(model: ModelSection) -> dict[str, Any]:
    """Architecture fields the run will use: defaults <- the preset's release <- pretrained config.json (or, for a
    file without one, the preset's latent fields) <- model.architecture."""
    arch = AutoencoderConfig().to_dict()
    preset = PRESETS.get(model.preset) if model.preset else None
    if preset is not None:
        arch.update(preset.architecture())
    if model.pretrained:
        stored = pretrained_architecture(model.pretrained)
        arch.update({k: v for k, v in stored.items() if k in arch})
        if preset is not None and not stored:  # a preset fills what a config-less file lacks (presets.apply_preset)
            arch.update(preset.latent_fields())
    arch.update(model.architecture)
    return arch


def validate_finite(section: Any, prefix: str = "") -> None:
    """Every float in the config is finite: an inf/NaN learning rate or weight trains nothing and exports NaN."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate_finite(value, f"{key}.")
        elif isinstance(value, (float, tuple)):
            numbers = value if isinstance(value, tuple) else (value,)
            _require(all(math.isfinite(v) for v in numbers if isinstance(v, float)), key, value, "must be finite")


def validate_model(cfg: TrainConfig) -> None:
    """YAML-level types of `model.architecture`, then the model's own validation (AutoencoderConfig.validate)."""
    model = cfg.model
    fields = autoencoder_fields()
    converted = {}
    for key, value in model.architecture.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(f"model.architecture.{key}", key, list(fields)))
        converted[key] = check_type(value, fields[key], f"model.architecture.{key}")
    model.architecture = converted
    if model.pretrained is not None and is_local_path(model.pretrained):
        _require(os.path.exists(os.path.expanduser(model.pretrained)), "model.pretrained", model.pretrained,
                 "no such file or folder (override with model.pretrained=PATH)")
    validate_preset(model, cfg.distill.teacher or model.pretrained)
    _require(model.init == "default" or model.pretrained is None, "model.init", model.init,
             "initialises a model trained from scratch; a pretrained model keeps its weights (drop model.init)")
    _require(not model.freeze_encoder or model.pretrained is not None, "model.pretrained", model.pretrained,
             "model.freeze_encoder=true fine-tunes the decoder of a trained model: set model.pretrained=PATH")
    arch = resolved_architecture(model)
    try:
        check_config_size(AutoencoderConfig.from_dict(arch), "model.architecture")
    except AutoencoderConfigError as e:
        base = f"the config of {model.pretrained}" if model.pretrained else "the defaults"
        raise ConfigError(f"'model.architecture.{e.field}': {e} (checked: 'model.architecture' over {base})") from None


def validate_preset(model: ModelSection, pretrained: str | None) -> None:
    """A known preset name; with a local diffusers folder, one whose release has that folder's architecture."""
    if model.preset is None:
        return
    _require(model.preset in PRESETS, "model.preset", model.preset, f"unknown preset; choose one of: "
             f"{describe_choices()}")
    stored = pretrained_architecture(pretrained) if pretrained else {}
    try:
        check_fits(get_preset(model.preset), stored, pretrained or "")
    except PresetError as e:
        raise ConfigError(f"'model.preset' = {capped_repr(model.preset)}: {e}") from None


MAX_RESOLUTION = 16384


def validate_data(data: DataConfig, arch: dict[str, Any]) -> None:
    factor = 2 ** (len(arch.get("block_out_channels", (1,))) - 1)
    _require(1 <= data.resolution <= MAX_RESOLUTION, "data.resolution", data.resolution,
             f"must be in [1, {MAX_RESOLUTION}] (training crops are square tensors of this size)")
    _require(data.resolution % factor == 0, "data.resolution", data.resolution,
             f"must be divisible by the downsampling factor {factor} (2 ** (len(block_out_channels) - 1))")
    sharded = data.source in ("webdataset", "parquet")
    suggestion = source_suggestion(str(data.source), BUILT_IN_SOURCES + ("webdataset", "parquet"))
    _require(suggestion is None, "data.source", data.source,
             f"is neither a built-in source nor a local path: did you mean {suggestion!r}?")
    _require(not sharded or bool(data.data_files), "data.data_files", data.data_files,
             f"is needed with data.source={data.source} (for example shards/{{00000..00127}}.tar)")
    _require(sharded or data.data_files is None, "data.data_files", data.data_files,
             "names shard files: set data.source to webdataset or parquet (or remove data.data_files)")
    _require(not (data.max_images and (data.source == "webdataset" or (sharded and data.streaming))), "data.max_images",
             data.max_images, "does not apply to streamed shards: list fewer shards in data.data_files")
    if not sharded and data.source != "sample" and not data.source.startswith("sample:") and is_local_path(data.source):
        _require(os.path.isdir(os.path.expanduser(data.source)), "data.source", data.source,
                 "image folder does not exist")
    _require(data.num_workers is None or data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0")
    _require(data.shuffle_buffer >= 0, "data.shuffle_buffer", data.shuffle_buffer, "must be >= 0 (0: read order)")
    _require(data.max_crop_scale is None or data.max_crop_scale >= 1, "data.max_crop_scale", data.max_crop_scale,
             "must be >= 1 (1: whole-photo crops) or null (per source)")
    _require(data.random_hue is None or 0 <= data.random_hue <= 1, "data.random_hue", data.random_hue,
             "is a probability, in [0, 1], or null (per source)")
    _require(data.max_images is None or data.max_images >= 1, "data.max_images", data.max_images, "must be >= 1")


def validate_loss(loss: LossConfig) -> None:
    for key in ("pixel_weight", "perceptual_weight", "kl_weight", "free_bits", "chroma_weight"):
        value = getattr(loss, key)
        _require(value >= 0, f"loss.{key}", value, "must be >= 0")
    _require(loss.chroma_scale >= 1, "loss.chroma_scale", loss.chroma_scale, "must be >= 1 (1: full resolution)")
    eq = loss.equivariance
    _require(0 <= eq.probability <= 1, "loss.equivariance.probability", eq.probability, "must be in [0, 1]")
    _require(bool(eq.transforms) and set(eq.transforms) <= {"scale", "rotate"},
             "loss.equivariance.transforms", eq.transforms, "must be a non-empty list of: scale, rotate")
    _require(0 < eq.min_scale < 1, "loss.equivariance.min_scale", eq.min_scale, "must be in (0, 1) (EQ-VAE: 0.25)")
    _require(0 <= eq.low_res_probability <= 1, "loss.equivariance.low_res_probability", eq.low_res_probability,
             "must be in [0, 1] (EQ-VAE's p_prior_s: 0.25)")
    _require(loss.kl_warmup_steps >= 0, "loss.kl_warmup_steps", loss.kl_warmup_steps, "must be >= 0")
    if loss.kl_schedule == "cyclical":
        _require(loss.kl_cycle_steps is not None and loss.kl_cycle_steps >= 2, "loss.kl_cycle_steps",
                 loss.kl_cycle_steps, "loss.kl_schedule=cyclical needs a cycle length >= 2")
    _require(loss.kl_schedule != "constant" or loss.kl_warmup_steps == 0, "loss.kl_warmup_steps",
             loss.kl_warmup_steps, "loss.kl_schedule=constant has no warm-up; use kl_schedule=linear")
    gan = loss.gan
    _require(gan.disc_start >= 0, "loss.gan.disc_start", gan.disc_start, "must be >= 0")
    _require(gan.disc_warmup_steps >= 0, "loss.gan.disc_warmup_steps", gan.disc_warmup_steps, "must be >= 0")
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
                "max_nonfinite_steps", "scaling_images"):
        value = getattr(train, key)
        _require(value >= 1, f"train.{key}", value, "must be >= 1")
    for key in ("image_every", "checkpoint_every"):
        value = getattr(train, key)
        _require(value >= 0, f"train.{key}", value, "must be >= 0 (0 = off)")
    _require(0 < train.ema.decay < 1, "train.ema.decay", train.ema.decay, "must be in (0, 1)")
    _require(bool(train.output_dir), "train.output_dir", train.output_dir, "must not be empty")
    try:
        check_report_to(train.report_to)
    except TrackerError as err:
        raise ConfigError(f"'train.report_to' = {capped_repr(train.report_to)}: {err}") from None
    if train.resume not in (None, "latest"):
        _require(os.path.isdir(os.path.expanduser(train.resume)), "train.resume", train.resume,
                 "must be null, 'latest' or an existing checkpoint folder")


def validate_validation(cfg: TrainConfig, arch: dict[str, Any]) -> None:
    """validation.*'s ranges; when on, a source (the sample photos' held-out split by default) checked as data.source."""
    val = cfg.validation
    for key in ("every", "log_images"):
        _require(getattr(val, key) >= 0, f"validation.{key}", getattr(val, key), "must be >= 0 (0 = off)")
    for key in ("num_images", "batch_size"):
        value = getattr(val, key)
        _require(value is None or value >= 1, f"validation.{key}", value, "must be >= 1")
    _require(val.keep_best is None or val.keep_best in BEST_DIRECTIONS, "validation.keep_best", val.keep_best,
             "names the validation metric whose best checkpoint is kept: one of " + ", ".join(
                 f"{k} ({'higher' if d == 'max' else 'lower'} is better)" for k, d in BEST_DIRECTIONS.items()))
    for key in ("keep_best", "export_best"):
        _require(val.every > 0 or not getattr(val, key), f"validation.{key}", getattr(val, key),
                 "needs validation passes: set validation.every=N (steps)")
    _require(val.export_best is False or val.keep_best is not None, "validation.export_best", val.export_best,
             "exports the best checkpoint: set validation.keep_best=METRIC (e.g. psnr)")
    source = validation_source(cfg)
    _require(source is not None or val.keep_best is None, "validation.source", val.source,
             f"validation.keep_best={val.keep_best} needs held-out images: set validation.source to a folder, hub "
             "dataset or shards (as data.source); only the built-in sample photos have a held-out split of their own")
    if val.every == 0 or source is None:  # no held-out images: no passes (the trainer says so)
        return
    data = dataclasses.replace(cfg.data, source=source, data_files=val.data_files, max_images=None,
                               resolution=val.resolution or cfg.data.resolution)
    try:
        validate_data(data, arch)
    except ConfigError as err:
        raise ConfigError(str(err).replace("'data.", "'validation.", 1)) from None


def validation_source(cfg: TrainConfig) -> str | None:
    """validation.source ("sample": the sample photos' held-out split), or for training on the built-in sample photos
    their held-out split."""
    if cfg.validation.source is not None:
        return "sample:heldout" if cfg.validation.source == "sample" else cfg.validation.source
    return "sample:heldout" if str(cfg.data.source) in ("sample", "sample:train") else None


def validate_distill(cfg: TrainConfig) -> None:
    """The distill section's ranges; with a teacher set, the settings a distillation cannot honour are refused."""
    distill = cfg.distill
    _require(1 <= distill.width <= 4096, "distill.width", distill.width, "must be in [1, 4096]")
    for key in ("encoder_blocks", "decoder_blocks"):
        value = getattr(distill, key)
        _require(0 <= value <= 64, f"distill.{key}", value, "must be in [0, 64]")
    _require(distill.latent_weight >= 0, "distill.latent_weight", distill.latent_weight, "must be >= 0")
    if not distill.teacher:
        return
    if is_local_path(distill.teacher):
        _require(os.path.exists(os.path.expanduser(distill.teacher)), "distill.teacher", distill.teacher,
                 "no such file or folder (a KL VAE: diffusers folder, pipeline folder or LDM file)")
    _require(distill.latent_weight > 0 or cfg.loss.pixel_weight > 0 or cfg.loss.perceptual_weight > 0,
             "distill.latent_weight", distill.latent_weight,
             "with loss.pixel_weight and loss.perceptual_weight also 0 nothing would be trained")
    for key, value, default in (("model.pretrained", cfg.model.pretrained, None),
                                ("model.architecture", cfg.model.architecture, {}),
                                ("model.freeze_encoder", cfg.model.freeze_encoder, False),
                                ("loss.learned_logvar", cfg.loss.learned_logvar, False)):
        _require(value == default, key, value, "does not apply to distillation (the student is built from "
                 "distill.teacher and distill.width / *_blocks; its losses are pixel, LPIPS, latent MSE and "
                 "optionally loss.gan)")
    if cfg.loss.gan.enabled:  # TAESD's adversarial decoder: its small reconstruction term is what D's weight balances
        _require(cfg.loss.pixel_weight > 0 or cfg.loss.perceptual_weight > 0, "loss.pixel_weight",
                 cfg.loss.pixel_weight, "with loss.gan.enabled the decoder needs a reconstruction term too "
                 "(loss.pixel_weight or loss.perceptual_weight > 0; TAESD keeps a small one)")
        smallest = 3 * 2 ** cfg.loss.gan.disc_layers
        _require(cfg.data.resolution >= smallest, "data.resolution", cfg.data.resolution,
                 f"is below the discriminator's smallest input, {smallest} px at loss.gan.disc_layers="
                 f"{cfg.loss.gan.disc_layers}: use fewer layers or a larger resolution")


def validate_fp16_fix(cfg: TrainConfig) -> None:
    """fp16_fix's range; enabled, it needs a pretrained model and refuses what a rescale without training lacks."""
    fix = cfg.fp16_fix
    _require(0 < fix.activation_limit <= 65504, "fp16_fix.activation_limit", fix.activation_limit,
             "must be in (0, 65504] (fp16's largest finite value)")
    _require(0 < fix.shrink_to <= fix.activation_limit, "fp16_fix.shrink_to", fix.shrink_to,
             f"must be in (0, fp16_fix.activation_limit={fix.activation_limit:g}]")
    if not fix.enabled:
        return
    _require(cfg.model.pretrained is not None, "model.pretrained", cfg.model.pretrained,
             "fp16_fix.enabled rescales an existing VAE: set model.pretrained=PATH")
    for key, value, default in (("distill.teacher", cfg.distill.teacher, None),
                                ("loss.gan.enabled", cfg.loss.gan.enabled, False),
                                ("loss.learned_logvar", cfg.loss.learned_logvar, False),
                                ("train.ema.enabled", cfg.train.ema.enabled, False),
                                ("train.mixed_precision", cfg.train.mixed_precision, "no")):
        _require(value == default, key, value, "does not apply to fp16_fix (an exact rescale calibrated on the "
                 "fp32 model's activations: nothing is trained)")
