"""The training config's schema: one typed dataclass per section (`TrainConfig` holds them all).

Each field's comment is its documentation: reference.py turns the comments and defaults into
docs/configuration.md. Loading YAML onto these classes is yaml_io.py's, checking their values
validation.py's; both sit above this module, and loading.py joins them (`load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
    # "webdataset" / "parquet" with `data_files` (kl_autoencoder/data/webdataset.py, parquet.py)
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
