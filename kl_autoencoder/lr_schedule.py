"""The learning rate as a pure function of the step: LDM's batch-scaled base rate, warm-up, then constant, cosine
or linear decay (optim.*), for the autoencoder's and the discriminator's optimizers alike.

Being a function of the step alone is what lets a resumed run replay a straight one exactly; the loop sets both
optimizers' rates at the top of every step (`set_learning_rates`).
"""

from __future__ import annotations

import math

from kl_autoencoder.config import TrainConfig
from kl_autoencoder.training_step import Training


def base_learning_rate(cfg: TrainConfig, world: int, lr: float | None = None) -> float:
    """`lr` (default optim.lr), or with optim.scale_lr (LDM's `base_learning_rate`, diffusers' --scale_lr) `lr` times
    the total batch: per-process batch x accumulation steps x processes."""
    lr = cfg.optim.lr if lr is None else lr
    if not cfg.optim.scale_lr:
        return lr
    return lr * cfg.train.batch_size * cfg.train.grad_accum_steps * world


def learning_rates(cfg: TrainConfig, world: int, step: int) -> tuple[float, float]:
    """(autoencoder, discriminator) learning rates at optimizer step `step`: each base rate scaled by the total batch
    under optim.scale_lr (LDM scales both optimizers), times the one schedule's factor. The discriminator's base is
    loss.gan.disc_lr, or optim.lr when unset."""
    factor = lr_factor(step, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.schedule)
    disc = cfg.loss.gan.disc_lr or cfg.optim.lr
    return base_learning_rate(cfg, world) * factor, base_learning_rate(cfg, world, disc) * factor


def set_learning_rates(t: Training, step: int) -> None:
    """Both optimizers' rates for `step` (learning_rates)."""
    generator_lr, disc_lr = learning_rates(t.cfg, t.accelerator.num_processes, step)
    for optimizer, lr in ((t.optimizer, generator_lr), (t.d_optimizer, disc_lr)):
        for group in (optimizer.param_groups if optimizer is not None else ()):
            group["lr"] = lr


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant, cosine or linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

