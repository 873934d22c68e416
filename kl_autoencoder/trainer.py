"""Train (or fine-tune) a KL autoencoder: build, the loop, export.

    from kl_autoencoder.config import load_config
    from kl_autoencoder.trainer import train
    export_dir = train(load_config("configs/quickstart.yaml", ["train.max_steps=200"]))

config -> `build_training` (model, objective, optimizers) -> claim the run folder, resume -> loop { batch ->
`train_step` (loss, backward, one optimizer step for the generator and the discriminator alike) -> EMA -> log /
checkpoint } -> export with the one latent-scale estimator. `train_step` is also exactly what benchmarks/run.py times.

Choices worth knowing (the diffusers example's faults avoided):
  - the forward pass goes through the accelerate-wrapped model (DDP hooks fire); trainable weights stay fp32 under
    mixed precision (autocast only); the posterior and every loss are fp32; LPIPS is differentiable;
  - a non-finite loss or gradient skips the update on the device (fused AdamW's `found_inf`, no host sync); the skip
    counters are read back at log steps (every step on CPU, where reading a scalar costs nothing);
  - the learning rate is a pure function of the step, posterior noise comes from a generator seeded by (seed, step,
    rank, micro-step) and the data order from (seed, epoch, position): resuming replays a straight run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from kl_autoencoder import losses as L
from kl_autoencoder.config import (ConfigError, ModelSection, TrainConfig, config_to_dict,  # noqa: F401
                                   keeps_pretrained_latent_scale, save_config)
from kl_autoencoder.data import build_dataset, default_num_workers, order_workers, training_batches
from kl_autoencoder.fastpath import (FastPath, compile_with_fallback, make_adamw, mixed_precision_for,
                                     prepare_loss_network, stays_on_cpu, unwrap)
from kl_autoencoder.metrics import estimate_latent_scale
from kl_autoencoder.presets import LATENT_FIELDS, LATENT_SCALE_KEY, get_preset
from kl_autoencoder.model_card import model_card, run_description
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder, zero_residual_init_
from kl_autoencoder.signals import acknowledge, watch_signals
from kl_autoencoder.run_folder import (STATE_FILE, RunFolder, RunFolderError, TrainingState,  # noqa: F401
                                       check_run_inputs, is_complete_checkpoint, list_checkpoints,
                                       read_training_state)
from kl_autoencoder.trackers import image_grid, init_trackers, log_images, log_text, log_with  # noqa: F401
from kl_autoencoder.validation import Validation, finish_best


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and training stopped cleanly."""

    def __init__(self, checkpoint: Path, step: int, signal_name: str | None):
        super().__init__(f"training interrupted at step {step}; checkpoint: {checkpoint}")
        self.checkpoint, self.step, self.signal_name = checkpoint, step, signal_name


# ----------------------------------------------------------------------------------------------- small pieces


class EMA(nn.Module):
    """Exponential moving average of a model's floating-point state (parameters and buffers), kept in fp32, with
    diffusers' warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        for i, name in enumerate(self.names):
            self.register_buffer(f"shadow_{i}", model.state_dict()[name].detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._updates: int | None = 0  # host copy of num_updates (None: re-read once, after a load)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = None

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"shadow_{i}") for i in range(len(self.names))]

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (0-based): warms up as (1 + n) / (10 + n), as diffusers' EMAModel,
        so the average of a short run is not dominated by the initial weights."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        if self._updates is None:  # the decay is a host number: read the device counter once, not every step
            self._updates = int(self.num_updates.item())
        decay = self.decay_at(self._updates)
        torch._foreach_lerp_(self.shadows(), [state[name].float() for name in self.names], 1.0 - decay)
        self.num_updates += 1
        self._updates += 1

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged tensors in place of its own."""
        state = dict(model.state_dict())
        for name, shadow in zip(self.names, self.shadows()):
            state[name] = shadow.to(state[name].dtype)
        return state


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


def set_learning_rates(t: "Training", step: int) -> None:
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


@contextmanager
def stop_signals() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag (the loop finishes or drops the step, checkpoints, and stops: StepGuard); handlers
    restored after. A second signal, or one no handler could run for (blocked in a library), stops at once
    (signals.watch_signals)."""
    flag: dict[str, str | None] = {"signal": None}
    previous = {}

    def handler(signum, frame):
        acknowledge()
        flag["signal"] = signal.Signals(signum).name

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        with watch_signals():
            yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StepAborted(Exception):
    """A stop signal arrived inside a step before any weight changed: the step is dropped, not finished."""


class StepGuard:
    """Lets a stop signal end a long step early where that is safe: one process (the others would wait in a
    collective), and no optimizer has stepped yet in this step (so the weights, the optimizers' moments and the EMA
    are the previous step's). Between micro-batches on any device; on a CPU, where one step of a full-size VAE takes
    minutes, also at every convolution of the trained model, forward or backward. The loop then rolls the data
    position back and checkpoints the previous step, so a resume replays the dropped step exactly."""

    def __init__(self, t: "Training", stop: dict, state: TrainingState):
        self.stop, self.state, self.t = stop, state, t
        # one process, and weights that change only through an optimizer (whose step hook tells the guard)
        self.enabled = t.accelerator.num_processes == 1 and t.optimizer is not None
        self.committed, self.batches_seen, self.handles = False, state.batches_seen, []
        if self.enabled and t.device.type == "cpu" and not t.cfg.model.compile:  # hooks would break its graphs
            for module in t.raw_model.modules():
                if isinstance(module, nn.Conv2d):
                    self.handles += [module.register_forward_pre_hook(self.check),
                                     module.register_forward_hook(self._watch_backward)]
            for optimizer in (t.optimizer, t.d_optimizer):
                if optimizer is not None:
                    self.handles.append(_inner(optimizer).register_step_pre_hook(self._commit))

    def begin(self) -> None:
        self.committed, self.batches_seen = False, self.state.batches_seen

    def check(self, *_: Any) -> None:
        if self.enabled and not self.committed and self.stop["signal"] is not None:
            raise StepAborted

    def _commit(self, *_: Any) -> None:
        self.committed = True

    def _watch_backward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self.check)

    def roll_back(self) -> None:
        """The dropped step's gradients and data position undone."""
        self.state.batches_seen = self.batches_seen
        for optimizer in (self.t.optimizer, self.t.d_optimizer):
            if optimizer is not None:
                _inner(optimizer).zero_grad(set_to_none=True)

    def __enter__(self) -> "StepGuard":
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------- build


def make_accelerator(cfg: TrainConfig):
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
        optimizers = {"optimizer": _inner(self.optimizer), "d_optimizer": _inner(self.d_optimizer)}
        return modules, optimizers

    def checkpoint_bytes(self) -> int:
        modules, _ = self.checkpoint_parts()
        total = sum(t.numel() * t.element_size() for m in modules.values() if m is not None
                    for t in m.state_dict().values())
        trained = self.params + (list(self.discriminator.parameters()) if self.discriminator is not None else [])
        return total + 2 * sum(p.numel() * 4 for p in trained)  # + AdamW's two moments


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


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
    adamw = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, fused=fused)
    optimizer = make_adamw(params, cfg.optim.lr, **adamw)
    called = compile_with_fallback(model, device) if cfg.model.compile else model
    discriminator = d_optimizer = None
    if cfg.loss.gan.enabled:
        discriminator, d_optimizer = make_discriminator(cfg, device, accelerator.num_processes, **adamw)
        called, optimizer, discriminator, d_optimizer = accelerator.prepare(called, optimizer, discriminator,
                                                                            d_optimizer)
    else:
        called, optimizer = accelerator.prepare(called, optimizer)
    ema = EMA(model, cfg.train.ema.decay).to(device) if cfg.train.ema.enabled else None
    return Training(cfg, accelerator, called, model, optimizer, params, perceptual, logvar, discriminator, d_optimizer,
                    ema, channels_last)


def make_discriminator(cfg: TrainConfig, device: torch.device, world: int, **adamw: Any) -> tuple[nn.Module, Any]:
    """loss.gan's PatchGAN on `device` and its AdamW (`adamw`: betas, weight_decay, fused) at step 0's rate; the loop
    sets both optimizers' rates every step (set_learning_rates)."""
    gan = cfg.loss.gan
    discriminator = L.PatchDiscriminator(3, gan.disc_channels, gan.disc_layers, gan.disc_norm).to(device)
    return discriminator, make_adamw(discriminator.parameters(), learning_rates(cfg, world, 0)[1], **adamw)


# ----------------------------------------------------------------------------------------------- the step


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
    inner = _inner(optimizer)
    if getattr(inner, "_step_supports_amp_scaling", False) and accelerator.scaler is None:
        inner.found_inf = skipped.float()
        optimizer.step()
        del inner.found_inf
    elif accelerator.scaler is not None or not skipped.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped, grad_norm.detach().float()


@dataclass
class StepResult:
    logs: dict[str, torch.Tensor]  # detached device scalars
    reconstruction: torch.Tensor
    skipped: torch.Tensor | None  # the generator update was skipped (non-finite); None mid accumulation window
    target: torch.Tensor | None = None  # what `reconstruction` is compared to when not the batch (EQ-VAE's T(x))


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


class NonFiniteCounter:
    """Device-side counts of skipped steps, read back only when asked (no per-step host sync on GPU)."""

    def __init__(self, state: TrainingState, device: torch.device):
        self.total = torch.tensor(state.nonfinite_total, device=device)
        self.run = torch.tensor(state.nonfinite_run, device=device)
        self.worst = self.run.clone()

    def update(self, skipped: torch.Tensor) -> None:
        self.total += skipped.long()
        self.run = (self.run + 1) * skipped.long()
        self.worst = torch.maximum(self.worst, self.run)

    def read(self, state: TrainingState) -> None:
        """Copy the counts into `state` (for a checkpoint)."""
        state.nonfinite_total, state.nonfinite_run = int(self.total.item()), int(self.run.item())

    def check(self, state: TrainingState, limit: int, logs: dict[str, torch.Tensor]) -> None:
        """Copy the counts into `state`; raise when `limit` consecutive steps were skipped since the last check."""
        worst = int(self.worst.item())
        self.read(state)
        if worst >= limit:
            terms = {k: float(v.float().mean().item()) for k, v in logs.items()}
            raise NonFiniteLossError(
                f"{worst} consecutive optimizer steps with a non-finite loss or gradient (limit "
                f"train.max_nonfinite_steps={limit}), stopping at step {state.step}; loss terms: {terms}")
        self.worst = self.run.clone()


# ----------------------------------------------------------------------------------------------- export


def export_model(t: Training, path: Path) -> Path:
    """Write the diffusers export (EMA weights when EMA is on). Its factors are kept (`keeps_pretrained_latent_
    scale`) or re-measured (`remeasure_latent_scale`); config.json records which (LATENT_SCALE_KEY). A model trained
    from scratch gets `data.resolution` as `sample_size` (diffusers' tile size) unless model.architecture sets one."""
    with torch.device("meta"):  # no random init of weights the strict load below overwrites (seconds at full size)
        export = KLAutoencoder(AutoencoderConfig.from_dict(t.raw_model.config.to_dict()))
    export = export.to_empty(device=t.device)
    export.load_state_dict(t.ema.averaged_state_dict(t.raw_model) if t.ema is not None else t.raw_model.state_dict())
    export.eval()
    cfg = t.cfg
    if not cfg.model.pretrained and "sample_size" not in cfg.model.architecture:
        export.config.sample_size = cfg.data.resolution
    if keeps_pretrained_latent_scale(cfg):
        record = {"latent_scale": "kept", "source": cfg.model.pretrained or "model.architecture"}
    else:
        record = remeasure_latent_scale(export, cfg, t.device)
    card = model_card(export.config.to_dict(), record=record, parameters=export.num_parameters(),
                      training=run_description(cfg, t.accelerator.num_processes))
    # train.overwrite=true kept the previous run's vae/ until now: replaced only by this complete export
    export.cpu().save_pretrained(path, private={LATENT_SCALE_KEY: record}, overwrite=cfg.train.overwrite,
                                 protect=[p for p in (cfg.model.pretrained,) if p], card=card)
    return path


def remeasure_latent_scale(model: KLAutoencoder, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Set `model`'s factors by `metrics.estimate_latent_scale` on `train.scaling_images` random training crops,
    un-augmented (no hue turn or flip: the latents a diffusion model will see), say so once, return the record.
    Per-channel `latents_mean` / `latents_std` described the old latent space: dropped."""
    data = dataclasses.replace(cfg.data, random_hue=0.0, random_flip=False)
    crops = build_dataset(data, split=data.split, train=True)
    batches = training_batches(crops, min(cfg.train.batch_size, 32), cfg.train.seed + 1, num_workers=0)
    scale = estimate_latent_scale(model, (batch["pixel_values"] for batch in batches),
                                  shift=cfg.train.export_shift_factor, num_images=cfg.train.scaling_images,
                                  generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    config, before = model.config, model.config.to_dict()
    config.scaling_factor, config.shift_factor = scale.scaling_factor, scale.shift_factor
    dropped = config.latents_mean is not None or config.latents_std is not None
    config.latents_mean = config.latents_std = None
    shift = "none" if scale.shift_factor is None else f"{scale.shift_factor:.5g}"
    why = ("train.remeasure_latent_scale=true" if cfg.model.freeze_encoder
           else "the encoder was trained" if cfg.model.pretrained else "trained from scratch")
    print(f"latent scale measured on {scale.num_images} un-augmented training crops ({why}): "
          f"scaling_factor {scale.scaling_factor:.5g} (was {before['scaling_factor']:.5g}), shift_factor {shift}"
          + ("; the source's latents_mean/latents_std dropped" if dropped else ""), flush=True)
    return {"latent_scale": "measured", "images": scale.num_images, "resolution": data.resolution}


# ----------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, build: Callable[[TrainConfig], Training] | None = None) -> Path:
    """Train (or fine-tune) per `cfg`; return the diffusers export folder `output_dir/vae`.

    `build` (default `build_training`) makes what the loop trains; distillation passes its own.

    Raises TrainingInterrupted (after writing a checkpoint) on SIGINT/SIGTERM and NonFiniteLossError after
    `train.max_nonfinite_steps` consecutive skipped steps.
    """
    data_source = None if str(cfg.data.source).split(":")[0] in ("sample", "webdataset", "parquet") else cfg.data.source
    check_run_inputs(cfg.train.output_dir, {"model.pretrained": cfg.model.pretrained, "distill.teacher":
                                            cfg.distill.teacher, "data.source": data_source,
                                            "data.data_files": cfg.data.data_files})
    set_seed(cfg.train.seed)  # same initial weights on every rank
    t = (build or build_training)(cfg)
    acc = t.accelerator
    run = RunFolder(cfg.train.output_dir, is_main=acc.is_main_process)
    resume_from = run.resolve_resume(cfg.train.resume)
    # Before anything is written: the disk has room and the data source opens (a failed start leaves no file that
    # blocks the rerun). A resumed run that is already complete needs no data.
    if acc.is_main_process:
        run.check_disk_space(t.checkpoint_bytes())
    finished = resume_from is not None and read_training_state(resume_from).step >= cfg.train.max_steps
    dataset = None if finished else build_dataset(cfg.data, split=cfg.data.split)
    validation = None if finished else Validation.start(t, run)  # its images too (inert when validation.every is 0)
    # train.resume without a checkpoint to resume: the fresh run's rules (no training over a non-empty folder)
    run.claim(resuming=resume_from is not None, overwrite=cfg.train.overwrite,
              asked_to_resume=cfg.train.resume is not None)
    try:
        return _train_in(t, run, resume_from, dataset, validation)
    finally:
        run.release()


def bar_figures(values: dict[str, float], image_shape: Sequence[int], model: Any) -> dict[str, str]:
    """The progress bar's figures. LDM's loss and KL are sums over an image's values and latent elements (so they
    stay in metrics.jsonl and TensorBoard, comparable with LDM / sgm logs); beside the mean pixel and perceptual
    errors the bar shows them per element: loss/px per pixel value, kl/z in nats per latent element."""
    shown = {k: values[k] for k in ("pixel", "perceptual") if k in values}
    if "kl" in values and hasattr(model.config, "latent_shape"):  # the KL objective (distillation logs means)
        shown["loss/px"] = values["loss"] / math.prod(image_shape)
        shown["kl/z"] = values["kl"] / math.prod(model.config.latent_shape(*image_shape[-2:]))
    elif "loss" in values:
        shown["loss"] = values["loss"]
    if "images_per_second" in values:
        shown["img/s"] = values["images_per_second"]
    return {k: f"{v:.4g}" for k, v in shown.items()}


def _train_in(t: Training, run: RunFolder, resume_from: Path | None, dataset: Any = None,
              validation: Validation | None = None) -> Path:
    cfg, acc, device = t.cfg, t.accelerator, t.device
    rank, world = acc.process_index, acc.num_processes
    modules, optimizers = t.checkpoint_parts()
    state = TrainingState()
    if resume_from is not None:
        state = run.load_checkpoint(resume_from, modules, optimizers)
        acc.print(f"resumed from {resume_from} at step {state.step}")
    workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
    if dataset is not None and state.step < cfg.train.max_steps:  # before anything is written
        keep_data_layout(state, dataset, world, workers, resume_from)
    if acc.is_main_process:
        save_config(cfg, run.config_file)
        run.start_metrics(state.step)
    if state.step >= cfg.train.max_steps:
        return _finish(t, run, state, None, trained=False)
    for line in start_lines(t):
        acc.print(line)

    dataset = dataset if dataset is not None else build_dataset(cfg.data, split=cfg.data.split)
    batches = training_batches(dataset, cfg.train.batch_size, cfg.train.seed, rank, world, state.batches_seen, workers)
    skip_log = getattr(dataset, "skipped", None)
    init_trackers(acc, cfg, config_to_dict(cfg))
    log_text(acc, "perceptual_weights", perceptual_weights(t))
    validation = validation or Validation.start(t, run)
    nonfinite = NonFiniteCounter(state, device)
    progress = None
    if acc.is_main_process:
        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", dynamic_ncols=True)
    last_log_time, images_since_log = time.perf_counter(), 0

    with stop_signals() as stop, StepGuard(t, stop, state) as guard:
        while state.step < cfg.train.max_steps:
            set_learning_rates(t, state.step)
            guard.begin()
            try:
                for micro in range(cfg.train.grad_accum_steps):
                    guard.check()
                    x = next_readable_batch(batches, state, skip_log).to(device, non_blocking=True)
                    result = (t.step_fn or train_step)(t, x, state.step, micro)
                    images_since_log += x.shape[0] * world
            except StepAborted:
                guard.roll_back()
                state.shard_counts = gathered_shard_counts(dataset)  # one process here: no collective to wait on
                _stop_before_step(t, run, state, nonfinite, progress, stop["signal"])
            if t.ema is not None:
                t.ema.update(t.raw_model)
            nonfinite.update(result.skipped)
            state.step += 1
            if progress is not None:
                progress.update(1)

            log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps
            if log_now or device.type == "cpu":
                nonfinite.check(state, cfg.train.max_nonfinite_steps, result.logs)
            if log_now:
                now = time.perf_counter()
                values = logged_values(t, result, state, images_since_log / max(now - last_log_time, 1e-9), skip_log)
                last_log_time, images_since_log = now, 0
                acc.log(values, step=state.step)
                if acc.is_main_process:
                    run.log_metrics(state.step, values)
                if progress is not None:
                    progress.set_postfix({**bar_figures(values, x.shape[-3:], t.raw_model), **validation.bar})
            if cfg.train.image_every and state.step % cfg.train.image_every == 0 and acc.is_main_process:
                shown = x if result.target is None else result.target
                grid = image_grid(shown.detach(), result.reconstruction.detach())
                log_images(acc, "reconstruction", grid, state.step)
            if validation.due(state.step):
                nonfinite.read(state)  # the best checkpoint's counters
                validation.run(state, progress)

            stop_requested = stop["signal"] is not None
            if world > 1:  # agree on stopping (a collective, so only at log steps)
                stop_requested = log_now and bool(acc.reduce(torch.tensor(float(stop_requested), device=device),
                                                             "max").item())
            if skip_log is not None:
                state.skipped_images = skip_log.count
            checkpoint_due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            if checkpoint_due or stop_requested or state.step == cfg.train.max_steps:
                nonfinite.read(state)
                state.shard_counts = gathered_shard_counts(dataset)  # a collective: every rank checkpoints here
                path = save_checkpoint(t, run, state)
                if stop_requested:
                    if progress is not None:
                        progress.close()
                    acc.end_training()
                    raise TrainingInterrupted(path, state.step, stop["signal"])

    if progress is not None:
        progress.close()
    return _finish(t, run, state, skip_log, trained=True)


def logged_values(t: Training, result: Any, state: TrainingState, images_per_second: float,
                  skip_log: Any) -> dict[str, float]:
    """What a log step records: the step's losses averaged over processes, throughput, learning rates, skip counts."""
    acc, device = t.accelerator, t.device
    values = {k: acc.reduce(v.to(device).float().reshape(()), "mean").item() for k, v in result.logs.items()}
    values.update(images_per_second=images_per_second, nonfinite_steps=state.nonfinite_total)
    if t.optimizer is not None:  # fp16_fix's rescale has none
        values["lr"] = t.optimizer.param_groups[0]["lr"]
    if t.d_optimizer is not None:
        values["d_lr"] = t.d_optimizer.param_groups[0]["lr"]
    if skip_log is not None:
        values["skipped_images"] = skip_log.count
    return values


def _stop_before_step(t: Training, run: RunFolder, state: TrainingState, nonfinite: NonFiniteCounter, progress: Any,
                      signal_name: str | None) -> None:
    """A step dropped by StepGuard: checkpoint `state` (the last finished step) and end with TrainingInterrupted."""
    nonfinite.read(state)
    path = save_checkpoint(t, run, state)
    if progress is not None:
        progress.close()
    t.accelerator.end_training()
    raise TrainingInterrupted(path, state.step, signal_name)


def start_lines(t: Training) -> list[str]:
    """What a run says once at start: processes, device and mixed precision; a random perceptual network."""
    cfg, device = t.cfg, t.device
    lines = [f"training on {t.accelerator.num_processes} process(es), {device.type}; "
             + mixed_precision_for(cfg.train.mixed_precision, device.type == "cpu")[1]]
    if perceptual_weights(t) == "random":
        why = "false" if cfg.loss.perceptual_pretrained is False else "auto, and the pretrained weights did not load"
        lines.append(f"perceptual loss: a RANDOM {t.perceptual.net} (loss.perceptual_pretrained={why}): the term is "
                     "not perceptual; loss.perceptual_weight=0 leaves it out")
    return lines


def next_readable_batch(batches: Iterator[dict], state: TrainingState, skip_log: Any) -> torch.Tensor:
    """The next batch holding at least one image (a batch whose every item was unreadable comes back empty)."""
    while True:
        batch = next(batches)
        state.batches_seen += 1
        if skip_log is not None:
            skip_log.record_batch(batch)
        if batch["pixel_values"].shape[0] > 0:
            return batch["pixel_values"]


def keep_data_layout(state: TrainingState, dataset: Any, world: int, workers: int, resume_from: Path | None) -> None:
    """Refuse to resume a data position on another layout (it would silently read other samples than an uninterrupted
    run), record this run's layout in `state`, and give a shard stream the sample counts the checkpoint holds."""
    streams = order_workers(dataset, world, workers)
    where = f"checkpoint {resume_from}"
    if state.processes and state.processes != world:
        raise RunFolderError(f"{where} was written by {state.processes} process(es) and this run has {world}: its data "
                             f"position is exact only on as many; launch with --num_processes {state.processes}")
    if state.data_workers and streams and state.data_workers != streams:
        raise RunFolderError(f"{where} read its data stream with {state.data_workers} DataLoader worker(s) per process "
                             f"and this run would use {streams}: set data.num_workers={state.data_workers}")
    state.processes, state.data_workers = world, streams
    if hasattr(dataset, "shards"):  # shards.ShardStream: the recorded counts spare reading consumed shards again
        dataset.shards.record(state.shard_counts)


def gathered_shard_counts(dataset: Any) -> dict[str, int]:
    """The tar shard sample counts every process has found (they go into the checkpoint)."""
    if not hasattr(dataset, "shards"):
        return {}
    from accelerate.utils import gather_object

    merged: dict[str, int] = {}
    for counts in gather_object([dataset.shards.known_counts()]):
        merged.update(counts)
    return merged


def save_checkpoint(t: Training, run: RunFolder, state: TrainingState) -> Path:
    modules, optimizers = t.checkpoint_parts()
    t.accelerator.wait_for_everyone()
    path = run.checkpoints / "unwritten"
    if t.accelerator.is_main_process:
        path = run.save_checkpoint(state, modules, optimizers, t.cfg.train.keep_checkpoints, t.checkpoint_bytes())
    t.accelerator.wait_for_everyone()
    return path


def perceptual_weights(t: Training) -> str:
    """Which LPIPS backbone the run used: "pretrained", "random" or "none"."""
    if t.perceptual is None:
        return "none"
    return "pretrained" if t.perceptual.pretrained_loaded else "random"


def _finish(t: Training, run: RunFolder, state: TrainingState, skip_log: Any, trained: bool) -> Path:
    """Export (unless a finished run is resumed and its export exists), write summary.json, say what was done."""
    acc = t.accelerator
    acc.wait_for_everyone()
    skipped = skip_log.count if skip_log is not None else state.skipped_images
    if trained and skipped:
        files = skip_log.files if skip_log is not None else []
        acc.print(f"skipped {skipped} unreadable image(s): {', '.join(files[:10])}" + (" ..." if skipped > 10 else ""))
    if state.nonfinite_total:
        acc.print(f"{state.nonfinite_total} optimizer step(s) skipped for non-finite loss/gradients")
    # summary.json is written after the export and removed by train.overwrite=true, whose run keeps the old vae/
    # until its own export: without it the export there is not this run's
    export_exists = (run.export_dir / "config.json").is_file() and run.summary_file.is_file()
    if acc.is_main_process:
        if not trained and export_exists:
            acc.print(f"the run in {run.root} is already complete (step {state.step} of train.max_steps="
                      f"{t.cfg.train.max_steps}): nothing trained, {run.export_dir} left as it is. Raise "
                      "train.max_steps to train further.")
            finish_best(t, run, t.export_fn or export_model, trained=False)
        else:
            if not trained:
                acc.print(f"the run is complete at step {state.step}; nothing trained, exporting {run.export_dir}")
            (t.export_fn or export_model)(t, run.export_dir)
            best = finish_best(t, run, t.export_fn or export_model, trained=True)  # the best checkpoint, on request
            run.write_summary({"steps": state.step, "skipped_images": skipped,
                               "skipped_files": skip_log.files if skip_log is not None else [],
                               "nonfinite_steps": state.nonfinite_total, "perceptual_weights": perceptual_weights(t),
                               "export": str(run.export_dir), **best})
            acc.print(f"exported {run.export_dir}")
    acc.wait_for_everyone()
    acc.end_training()
    return run.export_dir
