"""One optimisation step: what it touches (`Training`), the backward / clip / skip-if-non-finite / step of one
optimizer (`optimizer_step`), and one micro-batch of the autoencoder's and the discriminator's updates (`train_step`,
with EQ-VAE's transform of the step, `equivariance_transform`).

`train_step` is the function the loop calls and benchmarks/run.py times. Posterior noise comes from a generator
seeded by (seed, step, micro-step, rank), and the EQ-VAE draw from one seeded by the same: a step is a pure function
of its inputs, so resuming replays a straight run exactly. Built by training_setup.build_training; below the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kl_autoencoder import losses as L
from kl_autoencoder.config import TrainConfig
from kl_autoencoder.ema import EMA
from kl_autoencoder.fastpath import unwrap
from kl_autoencoder.model import KLAutoencoder


@dataclass
class StepResult:
    logs: dict[str, torch.Tensor]  # detached device scalars
    reconstruction: torch.Tensor
    skipped: torch.Tensor | None  # the generator update was skipped (non-finite); None mid accumulation window
    target: torch.Tensor | None = None  # what `reconstruction` is compared to when not the batch (EQ-VAE's T(x))



@dataclass
class Training:
    """Everything one training step touches, built once by `build_training`."""

    cfg: TrainConfig
    accelerator: Any
    model: nn.Module  # what the step calls: accelerate/DDP-wrapped, maybe compiled
    raw_model: KLAutoencoder  # the weights themselves (checkpoints, EMA, export)
    optimizer: Any
    params: list[nn.Parameter]  # what the generator's optimizer updates (clipped together)
    perceptual: L.PerceptualLoss | None
    logvar: L.LearnedLogVar | None
    discriminator: nn.Module | None  # accelerate-wrapped
    d_optimizer: Any
    ema: EMA | None
    channels_last: bool
    # What the loop calls for one micro-batch and at the end; another task (distillation) supplies its own.
    step_fn: Callable[..., StepResult] | None = None  # default: train_step
    export_fn: Callable[[Training, Path], Path] | None = None  # default: export_model
    teacher: nn.Module | None = None  # distillation: the frozen model the student learns from (not checkpointed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def checkpoint_parts(self) -> tuple[dict[str, nn.Module | None], dict[str, Any]]:
        """(modules, optimizers) a checkpoint holds, by file name."""
        discriminator = unwrap(self.discriminator) if self.discriminator is not None else None
        modules = {"model": self.raw_model, "ema": self.ema, "logvar": self.logvar, "discriminator": discriminator}
        optimizers = {"optimizer": inner_optimizer(self.optimizer), "d_optimizer": inner_optimizer(self.d_optimizer)}
        return modules, optimizers

    def checkpoint_bytes(self) -> int:
        modules, _ = self.checkpoint_parts()
        total = sum(t.numel() * t.element_size() for m in modules.values() if m is not None
                    for t in m.state_dict().values())
        trained = self.params + (list(self.discriminator.parameters()) if self.discriminator is not None else [])
        return total + 2 * sum(p.numel() * 4 for p in trained)  # + AdamW's two moments



def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (or `optimizer` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_step(accelerator: Any, optimizer: Any, loss: torch.Tensor, params: list[nn.Parameter],
                   max_norm: float | None = None, outside_ddp: tuple[nn.Parameter, ...] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Backward, then, at the end of an accumulation window, clip, step and zero the gradients, skipping the update
    when the loss or the gradient is not finite. Returns (skipped, grad_norm) as device tensors, or None mid-window.

    With a fused AdamW the skip happens on the device (its `found_inf`), so there is no host sync; under fp16 the
    grad scaler skips by itself; otherwise one host sync decides. `outside_ddp` parameters (the learned
    log-variance) are not in a DDP module, so their gradients are averaged across ranks here.
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    for param in outside_ddp:
        if accelerator.num_processes > 1 and param.grad is not None:
            param.grad = accelerator.reduce(param.grad, "mean")
    if max_norm is None and accelerator.scaler is None:  # nothing to clip or unscale: only the norm, for the skip
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        grad_norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    skipped = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
    inner = inner_optimizer(optimizer)
    if getattr(inner, "_step_supports_amp_scaling", False) and accelerator.scaler is None:
        inner.found_inf = skipped.float()
        optimizer.step()
        del inner.found_inf
    elif accelerator.scaler is not None or not skipped.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped, grad_norm.detach().float()


def train_step(t: Training, x: torch.Tensor, step: int, micro: int = 0) -> StepResult:
    """One micro-batch of optimizer step `step` (0-based): the autoencoder's loss and update, then the
    discriminator's when the adversarial term is on. Updates happen at the end of an accumulation window."""
    weights = L.loss_weights_at(t.cfg.loss, step)
    gan_on = t.discriminator is not None and weights.train_discriminator
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = (t.cfg.train.seed * 1_000_003 + step * 1009 + micro) * 131 + t.accelerator.process_index
    generator = torch.Generator(device=t.device).manual_seed(seed)
    logvar = t.logvar.value if t.logvar is not None else None
    factor = t.raw_model.downsampling_factor
    min_image = 3 * 2 ** t.cfg.loss.gan.disc_layers if t.discriminator is not None else 1  # PatchGAN's smallest input
    transform = equivariance_transform(t.cfg.loss.equivariance, seed, (x.shape[-2] // factor, x.shape[-1] // factor),
                                       factor, min_image)
    with t.accelerator.accumulate(*(m for m in (t.model, t.discriminator) if m is not None)):
        loss, logs, reconstruction = L.autoencoder_loss(
            t.model, x, weights, t.perceptual, unwrap(t.discriminator) if gan_on else None, logvar,
            t.raw_model.last_decoder_layer, generator, transform)
        if t.cfg.loss.equivariance.probability > 0:  # every rank logs the same keys (the log reduce is collective)
            logs["eq_pair"] = torch.tensor(float(transform is not None and not transform.on_input), device=x.device)
        if t.cfg.loss.equivariance.low_res_probability > 0:
            logs["eq_low_res"] = torch.tensor(float(transform is not None and transform.on_input), device=x.device)
        outcome = optimizer_step(t.accelerator, t.optimizer, loss, t.params, t.cfg.optim.grad_clip,
                                 outside_ddp=(logvar,) if logvar is not None else ())
        if outcome is not None:
            logs["grad_norm"] = outcome[1]
        target = None if transform is None else transform.image(x)
        if gan_on:  # EQ-VAE: on a transformed step the discriminator sees the transformed pair
            real = x if target is None else target
            d_loss, d_logs = L.discriminator_loss(t.discriminator, real, reconstruction, weights.gan_loss)
            optimizer_step(t.accelerator, t.d_optimizer, d_loss, list(t.discriminator.parameters()))
            logs.update(d_logs)
    logs["kl_weight"] = torch.tensor(weights.kl_weight)
    return StepResult(logs, reconstruction, outcome[0] if outcome is not None else None, target)


def equivariance_transform(eq: Any, seed: int, latent_size: tuple[int, int], factor: int, min_image: int = 1
                           ) -> L.EquivarianceTransform | None:
    """The step's EQ-VAE transform, or None (the plain pair), drawn from a CPU generator seeded by the step.

    With `eq.probability`: a downscale of the latent to m x round(w m / h), m uniform over the integers with
    eq.min_scale <= m / h < 1 (EQ-VAE draws s from {8..31}/32 for its 32x32 latents: the same set), and 1-3 quarter
    turns, each as eq.transforms lists. The transformed image (m x factor) is kept at least `min_image` pixels.
    Otherwise, with `eq.low_res_probability` (EQ-VAE's p_prior_s, drawn second as EQ-VAE does): the same kind of
    downscale of the input image alone (`on_input`), the plain pair at that resolution.
    """
    if eq.probability <= 0 and eq.low_res_probability <= 0:
        return None
    # Not the posterior noise's seed: the two draws stay independent.
    generator = torch.Generator().manual_seed((seed * 6364136223846793005 + 1442695040888963407) % 2 ** 63)
    if torch.rand((), generator=generator).item() >= eq.probability:
        if eq.low_res_probability <= 0 or torch.rand((), generator=generator).item() >= eq.low_res_probability:
            return None
        size = _downscaled_latent_size(eq.min_scale, generator, latent_size, factor, min_image)
        return None if size is None else L.EquivarianceTransform(size, 0, factor, on_input=True)
    size = None
    if "scale" in eq.transforms:
        size = _downscaled_latent_size(eq.min_scale, generator, latent_size, factor, min_image)
    turns = int(torch.randint(1, 4, (), generator=generator)) if "rotate" in eq.transforms else 0
    if size is None and turns == 0:
        return None
    return L.EquivarianceTransform(size, turns, factor)


def _downscaled_latent_size(min_scale: float, generator: torch.Generator, latent_size: tuple[int, int], factor: int,
                            min_image: int) -> tuple[int, int] | None:
    """m x round(w m / h), m uniform over the integers with min_scale <= m / h < 1 and m x factor >= min_image;
    None when no such m exists."""
    h, w = latent_size
    low = max(math.ceil(h * min_scale - 1e-9), -(-min_image // factor), 1)
    if low >= h:
        return None
    m = int(torch.randint(low, h, (), generator=generator))
    return (m, max(1, round(w * m / h)))

