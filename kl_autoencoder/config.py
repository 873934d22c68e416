"""Typed training configs: plain YAML -> dataclasses, dotted overrides, validation with clear errors.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=20", "loss.gan.enabled=true"])

Every problem is reported before any work starts, as a `ConfigError` naming the dotted key and its value:
unknown keys (with a did-you-mean), wrong types (checked against the dataclass annotations), and impossible
values (non-positive learning rate, resolution not divisible by the downsampling factor, ...).

YAML 1.1 reads `1e-4` as a string; float fields therefore accept strings that parse as a float. It also reads `no`
as false: a field whose choices include "no" (`train.mixed_precision`) takes it back as "no". Every float must be finite.
YAML anchors/aliases are refused (a few hundred bytes of nested aliases expand to billions of values), and every
value an error message shows is cut short.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kl_autoencoder.durable import atomic_write_text, check_regular_file
from kl_autoencoder.formats import WeightsError, capped_repr, find_config_json, is_local_path, read_config
from kl_autoencoder.model import AutoencoderConfig, AutoencoderConfigError, check_config_size
from kl_autoencoder.presets import PRESETS, PresetError, check_fits, describe_choices, get_preset
from kl_autoencoder.spelling import BUILT_IN_SOURCES, source_suggestion
from kl_autoencoder.trackers import TrackerError, check_report_to


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    pretrained: str | None = None  # diffusers folder / pipeline folder / LDM file / hub id; None = train from scratch
    # the release the model (or the distillation teacher) is: sd, sd2, sdxl, sd3, flux (presets.py). It fills the
    # latent fields a config-less single file cannot carry (a stored config keeps its own); without model.pretrained
    # it builds that release's architecture
    preset: str | None = None
    # AutoencoderConfig fields (ignored keys are errors). On a pretrained model only the latent fields
    # (presets.LATENT_FIELDS: scaling_factor, shift_factor, latents_mean/std, sample_size, force_upcast) may differ
    # from its config: they are applied (and an export keeps them)
    architecture: dict[str, Any] = field(default_factory=dict)
    freeze_encoder: bool = False  # train the decoder only (encoder + quant_conv frozen), as sd-vae-ft-mse
    # weights of a model trained from scratch: "default" (PyTorch's, as diffusers and LDM) or "zero_residual"
    # (model.zero_residual_init_: LeCun-normal convs, every residual branch starting at zero)
    init: Literal["default", "zero_residual"] = "default"
    gradient_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time (BENCHMARKS.md)
    compile: bool = False  # torch.compile the model (eager where compilation is not available)
    channels_last: bool | None = None  # None = FastPath.for_device: NHWC on CUDA, NCHW on CPU


@dataclass
class DataConfig:
    # "sample" (built-in photos), an image folder, a hub dataset name, a `datasets` save_to_disk folder, or
    # "webdataset" / "parquet" with `data_files` (kl_autoencoder/shards.py)
    source: str = "sample"
    data_files: str | list[str] | None = None  # shards of webdataset/parquet: brace pattern, glob, or a list of them
    split: str = "train"  # the dataset split to train on (hub datasets; "train" / "heldout" / "all" for "sample")
    # the column holding images (hub, parquet, saved datasets); None = the first column of type Image, else one named image/img/pixel_values
    image_column: str | None = None
    streaming: bool = False  # stream a hub dataset instead of downloading it whole (each process reads its share)
    resolution: int = 256  # training crop size in pixels (a multiple of the downsampling factor)
    random_crop: bool = True  # random crops (else centre crops)
    random_flip: bool = True  # random horizontal flips
    # random crops: the shorter side is resized to resolution * s, s log-uniform in [1, max_crop_scale], never past the
    # native size (1 = whole-photo crops, as LDM); None = per source: native pixels for "sample", 1 elsewhere
    max_crop_scale: float | None = None
    # probability of turning a training crop's hues by a random angle (colour augmentation), on any source; None = per
    # source: data.SAMPLE_RANDOM_HUE (0.5) on the built-in sample photos, 0 on every other source (your own folder)
    random_hue: float | None = 0.0
    num_workers: int | None = None  # None = sized from the machine: its cores shared by the processes on it
    # streams (webdataset/parquet shards, hub datasets with streaming): each DataLoader worker shuffles its samples in
    # a buffer of this many encoded samples (webdataset's shuffle(1000)); it mixes about that many consecutive samples
    # of the worker's shards, so shards written in class order need it several shards long. 0 or 1 = read order.
    # Shards' buffer is part of the exact resume.
    shuffle_buffer: int = 1000
    max_images: int | None = None  # use only the first N images of the source; None = all
    cache_dir: str | None = None  # where hub datasets are cached; None = the datasets library's default
    # parquet / save_to_disk cells that name a local file ({"bytes": null, "path": ...} or a plain path), and a hub
    # dataset's outside `datasets`' download folder, are read only when true: a dataset could name any file here
    allow_local_paths: bool = False


@dataclass
class GanConfig:
    enabled: bool = False  # add the PatchGAN discriminator (LDM's NLayerDiscriminator)
    disc_start: int = 50001  # first step with the adversarial term and discriminator updates
    # The generator's adversarial weight ramps linearly from 0 at disc_start to disc_weight at disc_start +
    # disc_warmup_steps while the discriminator trains from disc_start: a fresh discriminator learns before its
    # gradients reach a (pretrained) decoder at full weight. 0 = LDM's switch, full weight at disc_start.
    disc_warmup_steps: int = 0
    disc_weight: float = 0.5  # the adversarial term's weight (LDM: 0.5), times the adaptive weight when that is on
    # discriminator loss: hinge (LDM) or non-saturating (vanilla)
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_lr: float | None = None  # None = optim.lr
    disc_channels: int = 64  # the discriminator's first-layer channels (LDM: 64)
    disc_layers: int = 3  # its number of strided layers (LDM: 3)
    # GroupNorm, not LDM's BatchNorm: batch-independent, so the same discriminator on any number of processes and for
    # the separate real and fake batches (BatchNorm normalises each per call and per device); "batch" is LDM's.
    disc_norm: Literal["group", "batch", "none"] = "group"
    adaptive_weight: bool = True  # balance GAN vs reconstruction gradients at the decoder's last layer


@dataclass
class EquivarianceConfig:
    """EQ-VAE (Kouzelis et al. 2025): on a share `probability` of the steps, the training pair (x, decode(z)) is
    replaced by (tau(x), decode(tau(z))), tau a random downscale by s in [min_scale, 1) and/or a turn by 1-3 quarter
    turns, and the whole loss (pixel, perceptual, GAN) applies to it."""

    probability: float = 0.0  # share of steps with the transformed pair; 0 = off (EQ-VAE: 0.5)
    transforms: list[str] = field(default_factory=lambda: ["scale", "rotate"])  # of: scale, rotate
    # s = m / h, m uniform over the integer latent sizes with min_scale <= s < 1 (EQ-VAE: s in {8..31}/32 at 32x32)
    min_scale: float = 0.25
    # EQ-VAE's p_prior_s: on this share of the steps that draw no transform, the plain pair is the image downscaled
    # by the same kind of s (prior preservation at low resolution), so the VAE keeps reconstructing the small
    # images it must now decode from downscaled latents. 0 = off (EQ-VAE: 0.25).
    low_res_probability: float = 0.0


@dataclass
class LossConfig:
    pixel: Literal["l1", "l2"] = "l1"  # the reconstruction distance: L1 (LDM) or L2 (sd-vae-ft-mse)
    pixel_weight: float = 1.0  # its weight in the NLL (summed over pixels, LDM's convention)
    learned_logvar: bool = False  # LDM's NLL form rec / exp(logvar) + logvar with a learned scalar logvar
    perceptual_weight: float = 1.0  # LPIPS weight in the NLL; 0 = no perceptual term (and no backbone loaded)
    perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg"  # LPIPS backbone (the lpips package's nets; LDM uses vgg)
    # true: the backbone's pretrained weights or stop at start naming the file; false: a random backbone, said at start; auto: pretrained if present, else random with a warning
    perceptual_pretrained: Literal["auto", True, False] = "auto"
    chroma_weight: float = 0.0  # the low-resolution colour term (losses.chroma_error_sum); 0 = off
    chroma_scale: int = 8  # its pooling: colour compared at 1 / chroma_scale of the resolution
    kl_weight: float = 1e-6  # weight of the KL term, summed over latent elements (LDM kl-f8: 1e-6)
    kl_warmup_steps: int = 0  # steps over which the KL weight ramps from 0 (kl_schedule)
    # the ramp: linear warm-up, cyclical (kl_cycle_steps), or constant
    kl_schedule: Literal["linear", "cyclical", "constant"] = "linear"
    kl_cycle_steps: int | None = None  # cycle length of the cyclical schedule; None = kl_warmup_steps
    free_bits: float = 0.0  # nats per latent element (a channel's budget is free_bits x latent H x W)
    gan: GanConfig = field(default_factory=GanConfig)
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate (the base rate when scale_lr is on)
    betas: tuple[float, float] = (0.5, 0.9)  # AdamW betas (LDM: 0.5, 0.9)
    weight_decay: float = 0.0  # AdamW weight decay (LDM: 0)
    warmup_steps: int = 0  # linear warm-up of the learning rate from 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    grad_clip: float | None = None  # max global grad norm; None = off (LDM does not clip)
    scale_lr: bool = False  # lr x batch_size x grad_accum_steps x processes (LDM's base_learning_rate convention)
    fused: bool | None = None  # None = fused AdamW when on CUDA


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the weights and export it
    decay: float = 0.999  # its decay, with diffusers' warm-up ((1 + step) / (10 + step) until it reaches this)


@dataclass
class TrainSection:
    output_dir: str = "outputs/vae"  # the run folder: config.yaml, metrics.jsonl, checkpoints/, summary.json, vae/
    seed: int = 0  # seeds the initial weights, the data order, the crops and the noise
    batch_size: int = 8  # per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    # autocast dtype; weights stay fp32, the posterior and losses are computed in fp32. auto: bf16 on a GPU that has
    # it, else fp32 (on a CPU bf16 is emulated and many times slower)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    log_every: int = 10  # steps between metrics.jsonl / tracker entries
    image_every: int = 500  # reconstruction grid to TensorBoard; 0 = never
    checkpoint_every: int = 1000  # 0 = only the final checkpoint
    keep_checkpoints: int = 3  # most recent checkpoints kept (older ones pruned)
    resume: str | None = None  # None | "latest" | a checkpoint folder
    overwrite: bool = False  # a fresh run into a folder holding a previous run's files replaces those files
    ema: EMAConfig = field(default_factory=EMAConfig)
    tf32: bool = True  # allow TF32 matmuls and convolutions on CUDA
    max_nonfinite_steps: int = 10  # consecutive skipped (NaN/inf) steps before stopping
    export_shift_factor: bool | None = None  # None = only for models with >= 16 latent channels (SD3/Flux style)
    scaling_images: int = 256  # random training crops whose posterior samples set the exported latent scale
    # None = measure scaling/shift at export (from scratch, or a trained encoder) unless a pretrained model's encoder
    # is frozen (then its scaling_factor, shift_factor, latents_mean/std and sample_size are kept: its latent space did
    # not change); false keeps the factors as built (model.architecture's are otherwise only starting values)
    remeasure_latent_scale: bool | None = None
    # experiment trackers (through Accelerate): tensorboard, wandb, mlflow, comet_ml, aim, trackio, a list of them,
    # "all" (every one installed) or "none"; the config is logged as their hyper-parameters
    report_to: str | list[str] = "tensorboard"
    tracker_project: str = "kl-autoencoder"  # the project / experiment name the trackers file the run under


# The validation metrics keep_best may name, and whether higher is better.
BEST_DIRECTIONS = {"psnr": "max", "ssim": "max", "ms_ssim": "max", "lpips": "min", "colour_error": "min",
                   "delta_e": "min", "hue_error": "min"}


@dataclass
class ValidationConfig:
    """Validation while training (kl_autoencoder/validation.py): every `every` steps and at the last step, the
    figures `evaluate` measures on a fixed set of held-out images, with the EMA weights when EMA is on."""

    every: int = 0  # steps between validation passes; 0 = no validation
    # anything data.source takes; None = the built-in sample photos' held-out split when training on them
    source: str | None = None
    data_files: str | list[str] | None = None  # shards of webdataset/parquet (as data.data_files)
    split: str = "validation"  # the hub dataset split
    image_column: str | None = None  # as data.image_column, for the validation source
    num_images: int = 16  # the first images of the source: a fixed set, the same at every pass
    resolution: int | None = None  # centre crops of this size; None = data.resolution
    batch_size: int | None = None  # None = train.batch_size
    lpips_net: Literal["alex", "vgg"] = "alex"  # LPIPS when its backbone weights are cached (never downloaded)
    log_images: int = 4  # the first validation images shown with their reconstructions in the trackers
    keep_best: str | None = None  # a metric (psnr, ssim, lpips, colour_error, ...): keep its best checkpoint
    export_best: bool = False  # also export the best checkpoint's weights to output_dir/vae-best


@dataclass
class DistillSection:
    """Distilling a tiny autoencoder (diffusers' AutoencoderTiny) from a KL VAE: `kl-autoencoder distill`.

    The encoder learns the teacher's scaled posterior mean (latent_weight x MSE), as TAESD's does. The decoder, on the
    teacher's latents of that mean, either regresses onto the teacher's decode (loss.pixel / loss.pixel_weight /
    loss.perceptual_*; the default) or, with loss.gan.enabled, trains as TAESD's does: a GAN (loss.gan.*'s PatchGAN,
    real images against its decodes) plus the reconstruction terms against the real images. model.* and the KL
    terms do not apply (the student is built from the teacher's config)."""

    teacher: str | None = None  # diffusers folder / pipeline folder / LDM file / hub id of the KL VAE to distil
    width: int = 64  # the student's channels in every stage (TAESD: 64)
    encoder_blocks: int = 3  # residual blocks per encoder stage after the first (TAESD: 3)
    decoder_blocks: int = 3  # residual blocks per decoder stage before the last (TAESD: 3)
    latent_weight: float = 1.0  # encoder: MSE against the teacher's scaled posterior mean; 0 = decoder only


@dataclass
class Fp16FixSection:
    """Making a VAE fp16-safe by an exact rescale (kl_autoencoder/fp16_fix.py, configs/fp16-fix.yaml): model.pretrained
    is rescaled, calibrated on train.max_steps batches; nothing is trained."""

    enabled: bool = False  # make model.pretrained fp16-safe (this section's rescale)
    activation_limit: float = 16384.0  # a rescalable set whose |activation| passes this is shrunk (2^14: 65504 / 4)
    shrink_to: float = 2048.0  # ... to this peak (2^11): far enough that its direct readers' weights stay normal fp16


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    fp16_fix: Fp16FixSection = field(default_factory=Fp16FixSection)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


# ----------------------------------------------------------------------------------------------- public API

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
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false (yes/on/true) as booleans: take back the spelling
            spelling = [a for a in (YAML_TRUE if value else YAML_FALSE) if a in args]
            if spelling:
                return spelling[0]
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
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
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
