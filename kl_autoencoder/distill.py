"""Distil a tiny autoencoder (diffusers' `AutoencoderTiny`, TAESD's architecture) from a KL VAE, in the trainer's loop.

    from kl_autoencoder.config import load_config
    from kl_autoencoder.distill import build_distillation
    from kl_autoencoder.trainer import train
    cfg = load_config("configs/distill.yaml", ["distill.teacher=outputs/quickstart/vae", "train.max_steps=500"])
    export_dir = train(cfg, build=build_distillation)   # `kl-autoencoder distill` does exactly this

`build_distillation` gives the loop a `Training` whose model is the student (checkpointed, EMA'd, resumed like any
model) and whose `teacher` is the frozen KL VAE (on the device, eval, inference layout, fp32 whatever the run's mixed
precision: `teacher_precision`; never checkpointed: resume loads it again from `distill.teacher`). Each micro-batch,
`distill_step` takes the targets for the batch (`tiny.distillation_targets` with the posterior mean): the teacher's
scaled posterior mean (z_mean - shift) * scale and the teacher's decode of z_mean, and trains both halves of the
student at once through the trainer's one `optimizer_step`. The encoder regresses onto the latents (MSE, as TAESD's
encoder). The decoder, given those latents, learns one of two ways:
  - regression (the default): pixel + LPIPS of its decode against the teacher's decode (`tiny.distillation_loss`).
    It learns from the first step, with nothing to balance: what configs/distill.yaml's CPU budget uses.
  - adversarial (loss.gan.enabled), TAESD's: a GAN conditioned on the teacher's latents. loss.gan's PatchGAN learns
    the real images against the student's decodes (hinge by default); the decoder gets gan weight x the adaptive
    weight x the generator loss plus the pixel / LPIPS terms against the real images, the small reconstruction term
    TAESD keeps. A regression's decode is the average of what the latents allow (blurred where they are ambiguous);
    the GAN's makes up plausible detail instead, as TAESD's decoder does, at the price of a discriminator to train.
The mean, not a posterior sample: a sample's noise is no function of the image, so an encoder regressing onto it
keeps an error floor of the posterior's variance. The export is the student (EMA weights when EMA is on) as a
diffusers `AutoencoderTiny` folder in the run's export folder, with TAESD's two single files
(`tiny_encoder.safetensors`, `tiny_decoder.safetensors`) in the same folder.

Which config keys mean what here: loss.pixel / loss.pixel_weight / loss.perceptual_* weigh the decoder's
reconstruction terms, loss.gan.* its adversarial term (disc_start, disc_warmup_steps, disc_weight, adaptive_weight
as in training), distill.latent_weight the encoder's, distill.width / encoder_blocks / decoder_blocks size the
student; optim.*, train.* and data.* as for any run. model.* and the KL terms do not apply (config validation says so).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kl_autoencoder import losses as L
from kl_autoencoder.config import ConfigError, TrainConfig
from kl_autoencoder.fastpath import FastPath, prepare_for_inference, prepare_loss_network, unwrap
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiny import TinyAutoencoder, build_student, distillation_targets, distillation_terms
from kl_autoencoder.training_setup import assemble_training, make_accelerator
from kl_autoencoder.training_step import StepResult, Training, optimizer_step

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "distill.yaml"  # the CLI's default (in a checkout)
SINGLE_FILE_NAME = "tiny"  # -> tiny_encoder.safetensors / tiny_decoder.safetensors (rename for a preview tool)


def load_teacher(path: str, device: torch.device, preset: str | None = None) -> KLAutoencoder:
    """The KL VAE at `path` (with `preset`'s latent fields: model.preset), fp32, frozen, in eval mode and the
    inference layout on `device`."""
    teacher = KLAutoencoder.from_pretrained(path, preset=preset).float().requires_grad_(False)
    return prepare_for_inference(teacher, device)


def build_distillation(cfg: TrainConfig, fast: FastPath | None = None) -> Training:
    """Teacher (frozen), student (`build_student` of the teacher's config), LPIPS where configured, AdamW and EMA.

    Mirrors `trainer.build_training`: the student is `raw_model` and is called through the accelerate-prepared
    wrapper; `fast` (default FastPath.for_device) picks the layout and fused AdamW where the config leaves them
    open. Writes nothing to disk.
    """
    if not cfg.distill.teacher:
        raise ConfigError("'distill.teacher' is not set: name the KL VAE to distil (kl-autoencoder distill "
                          "--teacher PATH, or distill.teacher=PATH)")
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    # NHWC: the student has no GroupNorm, whose slow NHWC backward on CPU is why a KL VAE trains NCHW there
    # (fastpath.py); measured on the 2-core CPU, a student step is 1.05-1.35x faster in NHWC.
    fast = fast or FastPath.for_device(device, training=True, channels_last=True)
    channels_last = fast.channels_last if cfg.model.channels_last is None else cfg.model.channels_last
    fused = fast.fused_adamw if cfg.optim.fused is None else cfg.optim.fused
    if cfg.train.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    teacher = load_teacher(cfg.distill.teacher, device, cfg.model.preset)
    student = build_student(teacher.config, cfg.distill.width, cfg.distill.encoder_blocks,
                            cfg.distill.decoder_blocks).float().to(device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = L.PerceptualLoss(cfg.loss.perceptual_net, cfg.loss.perceptual_pretrained).to(device)
        prepare_loss_network(perceptual, fast)
    return assemble_training(cfg, accelerator, student, list(student.parameters()), perceptual, fused, channels_last,
                             step_fn=distill_step, export_fn=export_student, teacher=teacher)


def teacher_precision(teacher: KLAutoencoder, mixed_precision: str, device_type: str
                      ) -> contextlib.AbstractContextManager:
    """The precision the frozen teacher runs in: fp32 whatever the run's, except fp16 for an fp16 run when the
    teacher's `force_upcast` is false (diffusers' word that this VAE is safe in fp16, as an fp16-fixed SDXL VAE is).

    The teacher has no gradient, so fp32 costs one forward pass; under the run's autocast an SDXL-class teacher
    overflows in fp16 (every target NaN, every step skipped) and bf16 rounds the targets to ~0.4 %.
    """
    if mixed_precision == "fp16" and not teacher.config.force_upcast:
        return torch.autocast(device_type, dtype=torch.float16)
    return torch.autocast(device_type, enabled=False)


def distill_step(t: Training, x: torch.Tensor, step: int, micro: int = 0) -> StepResult:
    """One micro-batch of optimizer step `step` (0-based): the teacher's targets, the student's loss and update.

    The targets (teacher's posterior mean and its decode) are deterministic, so a resumed run replays a straight
    one. `reconstruction` (the student's decode of the teacher's latents, for the loop's image grid) is only
    computed at the steps that log the grid.
    """
    cfg = t.cfg
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with teacher_precision(t.teacher, cfg.train.mixed_precision, x.device.type):
        targets = distillation_targets(t.teacher, x, sample=False)  # TAESD's: the posterior mean
    adversarial = t.discriminator is not None
    weights = L.loss_weights_at(cfg.loss, step)
    if adversarial:  # TAESD: the decoder's reconstruction terms compare with the real images, as its GAN does
        targets = targets._replace(decoded=x.float())
    with t.accelerator.accumulate(*((t.model, t.discriminator) if adversarial else (t.model,))):
        loss, logs, decoded = distillation_terms(
            t.model, targets, x, pixel_weight=cfg.loss.pixel_weight, perceptual=t.perceptual,
            perceptual_weight=cfg.loss.perceptual_weight, latent_weight=cfg.distill.latent_weight, pixel=cfg.loss.pixel)
        if adversarial and weights.gan_weight > 0 and decoded is not None:
            term, gan_logs = L.adversarial_term(decoded, loss, weights, unwrap(t.discriminator),
                                                t.raw_model.last_decoder_layer)
            loss = loss + term
            logs.update(gan_logs, loss=loss.detach())
        outcome = optimizer_step(t.accelerator, t.optimizer, loss, t.params, cfg.optim.grad_clip)
        if outcome is not None:
            logs["grad_norm"] = outcome[1]
        if adversarial and weights.train_discriminator and decoded is not None:
            d_loss, d_logs = L.discriminator_loss(t.discriminator, x, decoded, weights.gan_loss)
            optimizer_step(t.accelerator, t.d_optimizer, d_loss, list(t.discriminator.parameters()))
            logs.update(d_logs)
    grid_step = (cfg.train.image_every and (step + 1) % cfg.train.image_every == 0
                 and micro == cfg.train.grad_accum_steps - 1 and t.accelerator.is_main_process)
    if grid_step:
        with torch.no_grad():
            reconstruction = t.raw_model.decode(targets.latents[:8]).float()
    else:
        reconstruction = x.new_empty(0)  # no grid this step: nothing computed
    return StepResult(logs, reconstruction, outcome[0] if outcome is not None else None)


def export_student(t: Training, path: Path) -> Path:
    """The student (EMA weights when EMA is on) as an AutoencoderTiny folder at `path` (scaling_factor 1, shift 0:
    see tiny.py), plus TAESD's two single files in it."""
    student = TinyAutoencoder(t.raw_model.config)
    student.load_state_dict(t.ema.averaged_state_dict(t.raw_model) if t.ema is not None else t.raw_model.state_dict())
    student.eval()
    student.save_pretrained(path, overwrite=t.cfg.train.overwrite)  # the previous run's vae/, kept until now
    student.save_single_files(path, name=SINGLE_FILE_NAME)
    return path
