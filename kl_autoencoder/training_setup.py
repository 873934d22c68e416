"""What a training is made of, built once before the loop: the accelerator (`make_accelerator`), the model from the
config (`build_model`: fresh, preset or pretrained), and the model, losses, discriminator, optimizers and EMA on the
accelerator's device (`build_training`, a `training_step.Training`). Writes nothing to disk.

Below the loop; distillation and the fp16 fix build their own `Training` from the same pieces.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from torch import nn

from kl_autoencoder import losses as L
from kl_autoencoder.config import ConfigError, ModelSection, TrainConfig
from kl_autoencoder.ema import EMA
from kl_autoencoder.fastpath import (FastPath, compile_with_fallback, make_adamw, mixed_precision_for,
                                     prepare_loss_network, stays_on_cpu)
from kl_autoencoder.lr_schedule import learning_rates
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder, zero_residual_init_
from kl_autoencoder.presets import LATENT_FIELDS, get_preset
from kl_autoencoder.trackers import log_with
from kl_autoencoder.training_step import Training


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    for engine in ("FSDP", "DEEPSPEED"):  # `accelerate launch --use_fsdp/--use_deepspeed` tells its processes so
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"accelerate is configured for {engine}, which this trainer does not support (the "
                              "adaptive GAN weight, EMA and checkpoints need whole, unsharded weights); use plain "
                              "data parallelism: accelerate launch --multi_gpu (no --use_fsdp / --use_deepspeed)")
    # accelerate keeps its settings in process-wide singletons; forget a previous run's (mixed precision, grad
    # accumulation) so train() can be called again in one process. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    use_cpu = stays_on_cpu()
    return Accelerator(
        mixed_precision=mixed_precision_for(cfg.train.mixed_precision, use_cpu)[0],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with(cfg),
        project_config=ProjectConfiguration(project_dir=cfg.train.output_dir, logging_dir=cfg.train.output_dir,
                                            automatic_checkpoint_naming=False),
        cpu=use_cpu,
    )


def build_model(section: ModelSection, channels_last: bool = False) -> KLAutoencoder:
    """A fresh model from `architecture` (over the preset's release, if any), or a pretrained one with the preset's
    and then `architecture`'s latent fields applied (fp32 weights either way)."""
    if section.pretrained:
        model = KLAutoencoder.from_pretrained(section.pretrained, preset=section.preset)
        current = model.config.to_dict()
        differs = {k: v for k, v in section.architecture.items()
                   if k not in LATENT_FIELDS and _plain(v) != _plain(current.get(k))}
        if differs:
            raise ConfigError(f"model.architecture {differs} contradicts the pretrained model's config "
                              f"({section.pretrained}); on a pretrained model only {', '.join(LATENT_FIELDS)} "
                              "may be set")
        try:  # the latent fields leave no trace in the weights: the user's values are the model's
            for key in LATENT_FIELDS:
                if key in section.architecture:
                    setattr(model.config, key, section.architecture[key])
            model.config.__post_init__()  # lists to tuples, then validate
        except ValueError as err:
            raise ConfigError(f"model.architecture on {section.pretrained}: {err}") from err
    else:
        base = get_preset(section.preset).architecture() if section.preset else {}
        model = KLAutoencoder(AutoencoderConfig.from_dict({**base, **section.architecture}))
        if section.init == "zero_residual":
            zero_residual_init_(model)
    model.float()
    if section.freeze_encoder:
        for module in (model.encoder, model.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing(True)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def build_training(cfg: TrainConfig, fast: FastPath | None = None) -> Training:
    """Model, perceptual loss, log-variance, discriminator, optimizers and EMA on the accelerator's device.

    `fast` (default: FastPath.for_device) gives the layouts and fused AdamW where the config leaves them open
    (model.channels_last / optim.fused null); compiling and mixed precision are the config's (model.compile,
    train.mixed_precision). Writes nothing to disk.
    """
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    fast = fast or FastPath.for_device(device, training=True)
    channels_last = fast.channels_last if cfg.model.channels_last is None else cfg.model.channels_last
    fused = fast.fused_adamw if cfg.optim.fused is None else cfg.optim.fused
    if cfg.train.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    model = build_model(cfg.model, channels_last).to(device)
    model.set_lean_norm_act(fast.lean_norm_act_bytes)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = L.PerceptualLoss(cfg.loss.perceptual_net, cfg.loss.perceptual_pretrained).to(device)
        prepare_loss_network(perceptual, fast)
    logvar = L.LearnedLogVar().to(device) if cfg.loss.learned_logvar else None
    params = [p for p in model.parameters() if p.requires_grad] + ([logvar.value] if logvar is not None else [])
    return assemble_training(cfg, accelerator, model, params, perceptual, fused, channels_last, logvar=logvar)


def assemble_training(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module, params: list[nn.Parameter],
                      perceptual: nn.Module | None, fused: bool, channels_last: bool, logvar: nn.Module | None = None,
                      **extra: Any) -> Training:
    """The optimizers, the compiled and accelerate-prepared model (with loss.gan's discriminator) and the EMA around
    a built `model` training `params`: what a KL VAE's training and a preview decoder's distillation share.
    `extra`: the rest of `Training`'s fields (step_fn, export_fn, teacher)."""
    device = accelerator.device
    adamw = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, fused=fused)
    optimizer = make_adamw(params, cfg.optim.lr, **adamw)
    called = compile_with_fallback(model, device) if cfg.model.compile else model
    discriminator = d_optimizer = None
    if cfg.loss.gan.enabled:  # PatchGAN on the decodes (for a preview decoder: TAESD's adversarial decoder)
        discriminator, d_optimizer = make_discriminator(cfg, device, accelerator.num_processes, **adamw)
        called, optimizer, discriminator, d_optimizer = accelerator.prepare(called, optimizer, discriminator,
                                                                            d_optimizer)
    else:
        called, optimizer = accelerator.prepare(called, optimizer)
    ema = EMA(model, cfg.train.ema.decay).to(device) if cfg.train.ema.enabled else None
    return Training(cfg, accelerator, called, model, optimizer, params, perceptual, logvar, discriminator, d_optimizer,
                    ema, channels_last, **extra)


def make_discriminator(cfg: TrainConfig, device: torch.device, world: int, **adamw: Any) -> tuple[nn.Module, Any]:
    """loss.gan's PatchGAN on `device` and its AdamW (`adamw`: betas, weight_decay, fused) at step 0's rate; the loop
    sets both optimizers' rates every step (set_learning_rates)."""
    gan = cfg.loss.gan
    discriminator = L.PatchDiscriminator(3, gan.disc_channels, gan.disc_layers, gan.disc_norm).to(device)
    return discriminator, make_adamw(discriminator.parameters(), learning_rates(cfg, world, 0)[1], **adamw)

