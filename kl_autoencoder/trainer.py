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

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from kl_autoencoder import losses as L
from kl_autoencoder.config import ConfigError, ModelSection, TrainConfig, save_config
from kl_autoencoder.data import build_dataset, default_num_workers, training_batches
from kl_autoencoder.diffusability import Transform, random_transform
from kl_autoencoder.fastpath import FastPath, compile_with_fallback, make_adamw, prepare_loss_network, unwrap
from kl_autoencoder.metrics import estimate_latent_scale
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder, zero_residual_init_
from kl_autoencoder.run_folder import (STATE_FILE, RunFolder, TrainingState, is_complete_checkpoint,  # noqa: F401
                                       list_checkpoints)


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

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"shadow_{i}") for i in range(len(self.names))]

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (0-based): warms up as (1 + n) / (10 + n), as diffusers' EMAModel,
        so the average of a short run is not dominated by the initial weights."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        decay = self.decay_at(int(self.num_updates.item()))
        torch._foreach_lerp_(self.shadows(), [state[name].float() for name in self.names], 1.0 - decay)
        self.num_updates += 1

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged tensors in place of its own."""
        state = dict(model.state_dict())
        for name, shadow in zip(self.names, self.shadows()):
            state[name] = shadow.to(state[name].dtype)
        return state


def base_learning_rate(cfg: TrainConfig, world: int) -> float:
    """optim.lr, or with optim.scale_lr (LDM's `base_learning_rate`, diffusers' --scale_lr) optim.lr times the total
    batch: per-process batch x accumulation steps x processes."""
    if not cfg.optim.scale_lr:
        return cfg.optim.lr
    return cfg.optim.lr * cfg.train.batch_size * cfg.train.grad_accum_steps * world


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
    """SIGINT/SIGTERM set a flag (the loop finishes the step, checkpoints, and stops); handlers restored after."""
    flag: dict[str, str | None] = {"signal": None}
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def image_grid(originals: torch.Tensor, reconstructions: torch.Tensor, count: int = 8) -> torch.Tensor:
    """[3, H, W] grid in [0, 1]: originals on the top row, reconstructions below."""
    n = min(count, originals.shape[0])
    pairs = torch.cat([originals[:n], reconstructions[:n]]).float().clamp(-1, 1)
    return make_grid((pairs + 1) / 2, nrow=n)


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
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.train.output_dir, logging_dir=cfg.train.output_dir,
                                            automatic_checkpoint_naming=False),
        cpu=use_cpu,
    )
    return accelerator


def build_model(section: ModelSection, channels_last: bool = False) -> KLAutoencoder:
    """A fresh model from `architecture`, or a pretrained one (fp32 weights either way)."""
    if section.pretrained:
        model = KLAutoencoder.from_pretrained(section.pretrained)
        current = model.config.to_dict()
        differs = {k: v for k, v in section.architecture.items()
                   if k not in ("scaling_factor", "shift_factor", "sample_size") and _plain(v) != _plain(current.get(k))}
        if differs:
            raise ConfigError(f"model.architecture {differs} contradicts the pretrained model's config "
                              f"({section.pretrained}); drop model.architecture when fine-tuning")
    else:
        model = KLAutoencoder(AutoencoderConfig.from_dict(dict(section.architecture)))
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
        gan = cfg.loss.gan
        discriminator = L.PatchDiscriminator(3, gan.disc_channels, gan.disc_layers).to(device)
        d_optimizer = make_adamw(discriminator.parameters(), gan.disc_lr or cfg.optim.lr, **adamw)
        called, optimizer, discriminator, d_optimizer = accelerator.prepare(called, optimizer, discriminator,
                                                                            d_optimizer)
    else:
        called, optimizer = accelerator.prepare(called, optimizer)
    ema = EMA(model, cfg.train.ema.decay).to(device) if cfg.train.ema.enabled else None
    return Training(cfg, accelerator, called, model, optimizer, params, perceptual, logvar, discriminator, d_optimizer,
                    ema, channels_last)


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


def train_step(t: Training, x: torch.Tensor, step: int, micro: int = 0) -> StepResult:
    """One micro-batch of optimizer step `step` (0-based): the autoencoder's loss and update, then the
    discriminator's when the adversarial term is on. Updates happen at the end of an accumulation window."""
    weights = L.loss_weights_at(t.cfg.loss, step)
    gan_on = t.discriminator is not None and weights.gan_weight > 0
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = (t.cfg.train.seed * 1_000_003 + step * 1009 + micro) * 131 + t.accelerator.process_index
    generator = torch.Generator(device=t.device).manual_seed(seed)
    logvar = t.logvar.value if t.logvar is not None else None
    transform = equivariance_transform(t.cfg.loss.equivariance, seed)
    with t.accelerator.accumulate(*(m for m in (t.model, t.discriminator) if m is not None)):
        loss, logs, reconstruction = L.autoencoder_loss(
            t.model, x, weights, t.perceptual, unwrap(t.discriminator) if gan_on else None, logvar,
            t.raw_model.last_decoder_layer, generator, transform)
        outcome = optimizer_step(t.accelerator, t.optimizer, loss, t.params, t.cfg.optim.grad_clip,
                                 outside_ddp=(logvar,) if logvar is not None else ())
        if outcome is not None:
            logs["grad_norm"] = outcome[1]
        if gan_on:
            d_loss, d_logs = L.discriminator_loss(t.discriminator, x, reconstruction, weights.gan_loss)
            optimizer_step(t.accelerator, t.d_optimizer, d_loss, list(t.discriminator.parameters()))
            logs.update(d_logs)
    logs["kl_weight"] = torch.tensor(weights.kl_weight)
    return StepResult(logs, reconstruction, outcome[0] if outcome is not None else None)


def equivariance_transform(eq: Any, seed: int) -> Transform | None:
    """The step's EQ-VAE transform, or None: drawn with `probability` from a CPU generator seeded by the step."""
    if eq.weight <= 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    if torch.rand((), generator=generator).item() >= eq.probability:
        return None
    return random_transform(generator, eq.transforms, eq.scales)


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


def keeps_pretrained_latent_scale(cfg: TrainConfig) -> bool:
    """A frozen encoder leaves the latent space as it was: keep the pretrained factors unless asked to re-measure."""
    if cfg.train.remeasure_latent_scale is not None:
        return not cfg.train.remeasure_latent_scale
    return bool(cfg.model.pretrained) and cfg.model.freeze_encoder


def export_model(t: Training, path: Path) -> Path:
    """Write the diffusers export (EMA weights when EMA is on) with the latent scale of `metrics.estimate_latent_scale`
    on `train.scaling_images` shuffled random training crops, or the pretrained factors (frozen encoder)."""
    export = KLAutoencoder(AutoencoderConfig.from_dict(t.raw_model.config.to_dict())).to(t.device)
    export.load_state_dict(t.ema.averaged_state_dict(t.raw_model) if t.ema is not None else t.raw_model.state_dict())
    export.eval()
    if not keeps_pretrained_latent_scale(t.cfg):
        cfg = t.cfg
        crops = build_dataset(cfg.data, split=cfg.data.split, train=True)
        batches = training_batches(crops, min(cfg.train.batch_size, 32), cfg.train.seed + 1, num_workers=0)
        scale = estimate_latent_scale(export, (batch["pixel_values"] for batch in batches),
                                      shift=cfg.train.export_shift_factor, num_images=cfg.train.scaling_images,
                                      generator=torch.Generator(device=t.device).manual_seed(cfg.train.seed))
        export.config.scaling_factor = scale.scaling_factor
        export.config.shift_factor = scale.shift_factor
        export.config.sample_size = cfg.data.resolution
    export.cpu().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, build: Callable[[TrainConfig], Training] | None = None) -> Path:
    """Train (or fine-tune) per `cfg`; return the diffusers export folder `output_dir/vae`.

    `build` (default `build_training`) makes what the loop trains; distillation passes its own.

    Raises TrainingInterrupted (after writing a checkpoint) on SIGINT/SIGTERM and NonFiniteLossError after
    `train.max_nonfinite_steps` consecutive skipped steps.
    """
    set_seed(cfg.train.seed)  # same initial weights on every rank
    t = (build or build_training)(cfg)
    acc, device = t.accelerator, t.device
    run = RunFolder(cfg.train.output_dir, is_main=acc.is_main_process)
    resume_from = run.resolve_resume(cfg.train.resume)
    run.claim(resuming=cfg.train.resume is not None, overwrite=cfg.train.overwrite)
    try:
        return _train_in(t, run, resume_from)
    finally:
        run.release()


def _train_in(t: Training, run: RunFolder, resume_from: Path | None) -> Path:
    cfg, acc, device = t.cfg, t.accelerator, t.device
    rank, world = acc.process_index, acc.num_processes
    modules, optimizers = t.checkpoint_parts()
    state = TrainingState()
    if resume_from is not None:
        state = run.load_checkpoint(resume_from, modules, optimizers)
        acc.print(f"resumed from {resume_from} at step {state.step}")
    if acc.is_main_process:
        run.check_disk_space(t.checkpoint_bytes())
        save_config(cfg, run.config_file)
        run.start_metrics(state.step)
    if state.step >= cfg.train.max_steps:
        return _finish(t, run, state, None, trained=False)
    acc.print(f"training on {world} process(es), {device.type} (mixed precision: {cfg.train.mixed_precision})")

    dataset = build_dataset(cfg.data, split=cfg.data.split)
    workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
    batches = training_batches(dataset, cfg.train.batch_size, cfg.train.seed, rank, world, state.batches_seen, workers)
    skip_log = getattr(dataset, "skipped", None)
    acc.init_trackers("tensorboard")
    if acc.is_main_process:
        log_text(acc, "perceptual_weights", perceptual_weights(t))
    nonfinite = NonFiniteCounter(state, device)
    progress = None
    if acc.is_main_process:
        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", dynamic_ncols=True)
    last_log_time, images_since_log = time.perf_counter(), 0

    with stop_signals() as stop:
        while state.step < cfg.train.max_steps:
            for group in t.optimizer.param_groups:
                group["lr"] = base_learning_rate(cfg, world) * lr_factor(state.step, cfg.optim.warmup_steps, cfg.train.max_steps,
                                                       cfg.optim.schedule)
            for micro in range(cfg.train.grad_accum_steps):
                x = next_readable_batch(batches, state, skip_log).to(device, non_blocking=True)
                result = (t.step_fn or train_step)(t, x, state.step, micro)
                images_since_log += x.shape[0] * world
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
                values = {k: acc.reduce(v.to(device).float().reshape(()), "mean").item() for k, v in result.logs.items()}
                now = time.perf_counter()
                values.update(images_per_second=images_since_log / max(now - last_log_time, 1e-9),
                              lr=t.optimizer.param_groups[0]["lr"], nonfinite_steps=state.nonfinite_total)
                if skip_log is not None:
                    values["skipped_images"] = skip_log.count
                last_log_time, images_since_log = now, 0
                acc.log(values, step=state.step)
                if acc.is_main_process:
                    run.log_metrics(state.step, values)
                if progress is not None:
                    progress.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "pixel", "perceptual", "kl",
                                          "images_per_second") if k in values})
            if cfg.train.image_every and state.step % cfg.train.image_every == 0 and acc.is_main_process:
                log_image(acc, state.step, image_grid(x.detach(), result.reconstruction.detach()))

            stop_requested = stop["signal"] is not None
            if world > 1:  # agree on stopping (a collective, so only at log steps)
                stop_requested = log_now and bool(acc.reduce(torch.tensor(float(stop_requested), device=device),
                                                             "max").item())
            if skip_log is not None:
                state.skipped_images = skip_log.count
            checkpoint_due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            if checkpoint_due or stop_requested or state.step == cfg.train.max_steps:
                nonfinite.read(state)
                path = save_checkpoint(t, run, state)
                if stop_requested:
                    if progress is not None:
                        progress.close()
                    acc.end_training()
                    raise TrainingInterrupted(path, state.step, stop["signal"])

    if progress is not None:
        progress.close()
    return _finish(t, run, state, skip_log, trained=True)


def next_readable_batch(batches: Iterator[dict], state: TrainingState, skip_log: Any) -> torch.Tensor:
    """The next batch holding at least one image (a batch whose every item was unreadable comes back empty)."""
    while True:
        batch = next(batches)
        state.batches_seen += 1
        if skip_log is not None:
            skip_log.record_batch(batch)
        if batch["pixel_values"].shape[0] > 0:
            return batch["pixel_values"]


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


def log_text(accelerator: Any, tag: str, text: str) -> None:
    try:
        accelerator.get_tracker("tensorboard", unwrap=True).add_text(tag, text)
    except Exception as e:  # a nicety; never stop training for it
        print(f"warning: could not log {tag}: {e}")


def log_image(accelerator: Any, step: int, grid: torch.Tensor) -> None:
    try:
        accelerator.get_tracker("tensorboard", unwrap=True).add_image("reconstruction", grid, global_step=step)
    except Exception as e:  # images are a nicety; never stop training for them
        print(f"warning: could not log the reconstruction grid: {e}")


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
    export_exists = (run.export_dir / "config.json").is_file()
    if acc.is_main_process:
        if not trained and export_exists:
            acc.print(f"the run in {run.root} is already complete (step {state.step} of train.max_steps="
                      f"{t.cfg.train.max_steps}): nothing trained, {run.export_dir} left as it is. Raise "
                      "train.max_steps to train further.")
        else:
            if not trained:
                acc.print(f"the run is complete at step {state.step}; nothing trained, exporting {run.export_dir}")
            (t.export_fn or export_model)(t, run.export_dir)
            run.write_summary({"steps": state.step, "skipped_images": skipped,
                               "skipped_files": skip_log.files if skip_log is not None else [],
                               "nonfinite_steps": state.nonfinite_total, "perceptual_weights": perceptual_weights(t),
                               "export": str(run.export_dir)})
            acc.print(f"exported {run.export_dir}")
    acc.wait_for_everyone()
    acc.end_training()
    return run.export_dir
