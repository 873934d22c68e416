"""Fine-tune a KL VAE to be safe in fp16 without changing its latent space or its images (`configs/fp16-fix.yaml`).

    python training/train.py --config configs/fp16-fix.yaml model.pretrained=PATH/TO/VAE

The approach madebyollin's sdxl-vae-fp16-fix describes: keep the final output the same, make the internal
activations smaller by scaling down weights and biases inside the network. The original, in fp32, is the frozen
teacher; the student starts as a copy of it and learns, each micro-batch (`fix_loss`):
  - latent_weight x MSE(student's posterior mean, teacher's posterior mean): the latent space stays put, so every
    diffusion model trained on it still works (the export keeps every latent field of the source);
  - decode_weight x MSE(student's decode of the teacher's latents, the teacher's decode of them);
  - penalty_weight x `fp16.ActivationPenalty`: the mean squared excess of every submodule's |output| over
    `activation_limit` (default 2^14 = 65504 / 4), zero once everything is inside.
How the activations come down: every layer writing an output that comes within 8x of the limit is marked, with the
ResNet conv2s / shortcuts and attention output projections that write a residual stream which does (they must shrink
together, also those whose own share is smaller: `fp16.stream_writers`), and while its half of the VAE
(encoder or decoder) still has an activation past the limit, each step rescales the layer's weight and bias together
by exp(-fp16_fix.scale_lr) (`LayerScaleAdamW`); the layers writing into one residual stream thus shrink in lockstep,
which GroupNorm downstream makes function-preserving. AdamW (optim.lr,
small) fine-tunes every weight against the teacher meanwhile. A plain AdamW step moves each weight by about optim.lr
whatever its size, so alone it would need thousands of steps to shrink large weights by the factor that matters.

`build_fp16_fix` gives the trainer's loop a `Training` (model = student, teacher = frozen original) like
`distill.build_distillation`; `training/train.py` picks it when `fp16_fix.enabled` is true. loss.* other than the GAN
and learned log-variance switches (refused) do not apply: the objective is the three terms above.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kl_autoencoder.config import ConfigError, TrainConfig
from kl_autoencoder.fastpath import FastPath, compile_with_fallback, prepare_for_inference
from kl_autoencoder.fp16 import ActivationPenalty, part_of
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.trainer import EMA, StepResult, Training, build_model, make_accelerator, optimizer_step


class FixTargets(NamedTuple):
    latents: torch.Tensor  # the teacher's posterior mean
    decode: torch.Tensor  # the teacher's decode of it


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: torch.Tensor) -> FixTargets:
    """The fp32 teacher's posterior mean of `x` and its decode of that mean."""
    latents = teacher.encode(x.float()).mode()
    return FixTargets(latents, teacher.decode(latents).float())


class EncodeDecode(nn.Module):
    """`pair(x, latents)` -> (student's posterior mean of x or None, student's decode of latents): both halves in
    one call, so the pair can be a DDP / Accelerate wrapper."""

    def __init__(self, student: KLAutoencoder):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor | None, latents: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        mean = self.student.encode(x).mode() if x is not None else None
        return mean, self.student.decode(latents)


def fix_loss(pair: nn.Module, targets: FixTargets, x: torch.Tensor, penalty: ActivationPenalty,
             latent_weight: float = 1.0, decode_weight: float = 1.0, penalty_weight: float = 1.0,
             train_encoder: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The three terms of the module docstring. `pair` is an `EncodeDecode` (maybe wrapped); `penalty` must hook the
    student inside it. Returns (loss, logs): each term, the largest |activation| seen and the loss, detached."""
    with penalty:
        mean, decode = pair(x if train_encoder and latent_weight > 0 else None, targets.latents)
    latent_term = (mean.float() - targets.latents).square().mean() if mean is not None else x.new_zeros(())
    decode_term = (decode.float() - targets.decode).square().mean()
    penalty_term = penalty.value()
    loss = latent_weight * latent_term + decode_weight * decode_term + penalty_weight * penalty_term
    logs = {"latent_mse": latent_term.detach(), "decode_mse": decode_term.detach(),
            "activation_penalty": penalty_term.detach(), "activation_peak": penalty.peak.detach(),
            "loss": loss.detach()}
    return loss, logs


class LayerScaleAdamW(torch.optim.AdamW):
    """AdamW plus a shrink of each layer that has carried an activation past the limit, while its half of the VAE
    still does.

    Such a layer's weight and bias are multiplied by exp(-scale_lr * schedule) each step (`schedule`: the run's lr
    schedule, group lr / base lr). A uniform rescale is what shrinks a layer's activations while a GroupNorm
    downstream keeps the function; the layers that write into one residual stream must shrink together for it to
    stay put, and one common factor keeps them in lockstep (per-layer gradient steps, Adam's or their signs, drift
    apart: measured, the decode fell to ~27 dB against the teacher on the SDXL architecture). Whatever a shrink does
    change, AdamW (optim.lr) fits back to the teacher. A plain AdamW step moves each weight by about lr whatever its
    size, so alone it would need thousands of steps to shrink large weights by the factor that matters.
    Which layers: `mark_over_limit` marks them (sticky; fix_step passes `ActivationPenalty.over`, the writers of
    outputs within 8x of the limit: a residual stream's writers whose own share is smaller must shrink with it); `activate` names, each step, the parameters whose half still
    has an activation past the limit, so the shrinking stops once a half is inside. Nothing is kept besides AdamW's
    own state: checkpoints and resumes are AdamW's."""

    def __init__(self, params: Any, lr: float, scale_lr: float, **kwargs: Any):
        super().__init__(params, lr=lr, **kwargs)
        self.scale_lr, self.base_lr = scale_lr, lr
        self.marked: set[int] = set()  # indices of the groups whose layer has passed the limit
        self.active: set[int] = set()  # the marked groups rescaled at the next step

    def _groups_of(self, params: set[int]) -> set[int]:
        return {i for i, group in enumerate(self.param_groups)
                if group.get("layer_scale") and any(id(p) in params for p in group["params"])}

    def mark_over_limit(self, params: set[int]) -> None:
        """Mark the layers owning any of `params` (ids) as ones to rescale."""
        self.marked |= self._groups_of(params)

    def activate(self, params: set[int]) -> None:
        """At the next step, rescale the marked layers owning any of `params` (ids), and only those."""
        self.active = self.marked & self._groups_of(params)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        result = super().step(closure)
        for i in sorted(self.active):
            group = self.param_groups[i]
            schedule = group["lr"] / self.base_lr if self.base_lr > 0 else 1.0
            factor = math.exp(-self.scale_lr * schedule)
            for p in group["params"]:
                p.mul_(factor)
        return result


def layer_groups(model: nn.Module) -> list[dict[str, Any]]:
    """One parameter group per layer that has trainable parameters (its weight and bias: a layer's uniform rescale)."""
    groups = []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            groups.append({"params": params, "layer_scale": True})
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """`LayerScaleAdamW` over `model`'s trainable layers, one group per layer (fp16_fix.scale_lr 0: a plain AdamW)."""
    kwargs = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    if fused and next(model.parameters()).device.type == "cuda":
        kwargs["fused"] = True
    if cfg.fp16_fix.scale_lr > 0:
        return LayerScaleAdamW(layer_groups(model), cfg.optim.lr, cfg.fp16_fix.scale_lr, **kwargs)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr, **kwargs)


def build_fp16_fix(cfg: TrainConfig, fast: FastPath | None = None) -> Training:
    """Student (model.pretrained, trainable), teacher (the same weights, fp32, frozen), optimizer and EMA."""
    if not cfg.model.pretrained:
        raise ConfigError("'model.pretrained' is not set: fp16_fix fine-tunes an existing VAE (model.pretrained=PATH)")
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    fast = fast or FastPath.for_device(device, training=True)
    channels_last = fast.channels_last if cfg.model.channels_last is None else cfg.model.channels_last
    fused = fast.fused_adamw if cfg.optim.fused is None else cfg.optim.fused
    student = build_model(cfg.model, channels_last).to(device)
    teacher = KLAutoencoder(AutoencoderConfig.from_dict(student.config.to_dict()))
    teacher.load_state_dict(student.state_dict())
    teacher = prepare_for_inference(teacher.float().requires_grad_(False), device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(student, cfg, fused)
    pair = EncodeDecode(student)
    called = compile_with_fallback(pair, device) if cfg.model.compile else pair
    called, optimizer = accelerator.prepare(called, optimizer)
    ema = EMA(student, cfg.train.ema.decay).to(device) if cfg.train.ema.enabled else None
    return Training(cfg, accelerator, called, student, optimizer, params, None, logvar=None, discriminator=None,
                    d_optimizer=None, ema=ema, channels_last=channels_last, step_fn=fix_step, export_fn=export_fixed,
                    teacher=teacher)


def fix_step(t: Training, x: torch.Tensor, step: int, micro: int = 0) -> StepResult:
    """One micro-batch: the teacher's targets, the student's loss (fp32: the point is fp32 fidelity) and update."""
    fix = t.cfg.fp16_fix
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = teacher_targets(t.teacher, x)
    penalty = ActivationPenalty(t.raw_model, fix.activation_limit)
    with t.accelerator.accumulate(t.model):
        loss, logs = fix_loss(t.model, targets, x, penalty, fix.latent_weight, fix.decode_weight,
                              fix.penalty_weight, train_encoder=not t.cfg.model.freeze_encoder)
        inner = getattr(t.optimizer, "optimizer", t.optimizer)
        if isinstance(inner, LayerScaleAdamW):
            inner.mark_over_limit({id(p) for module in penalty.over for p in module.parameters(recurse=False)})
            inner.activate({id(p) for name, p in t.raw_model.named_parameters() if part_of(name) in penalty.hot_parts})
        outcome = optimizer_step(t.accelerator, t.optimizer, loss, t.params, t.cfg.optim.grad_clip)
        if outcome is not None:
            logs["grad_norm"] = outcome[1]
    return StepResult(logs, targets.decode.detach(), outcome[0] if outcome is not None else None)


def export_fixed(t: Training, path: Path) -> Path:
    """The student (EMA weights when EMA is on) with its source's config: every latent field (scaling_factor,
    shift_factor, latents_mean / latents_std, sample_size, force_upcast) is kept, as the latent space is."""
    export = KLAutoencoder(AutoencoderConfig.from_dict(t.raw_model.config.to_dict()))
    export.load_state_dict(t.ema.averaged_state_dict(t.raw_model) if t.ema is not None else t.raw_model.state_dict())
    export.eval().save_pretrained(path)
    return path
