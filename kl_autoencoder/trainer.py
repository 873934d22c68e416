"""One training step and the Accelerate loop around it: checkpoints, exact resume, EMA, GAN, logging, export.

    from kl_autoencoder.config import load_config
    from kl_autoencoder.trainer import train
    export_dir = train(load_config("configs/quickstart.yaml", ["train.max_steps=200"]))

Design choices (the diffusers example's faults avoided):
  - the forward pass goes through the accelerate-wrapped model (DDP hooks fire), trainable weights stay fp32 under
    mixed precision (autocast only), the posterior and every loss are computed in fp32, LPIPS is differentiable;
  - the learning-rate scheduler is stepped by us once per optimizer step (accelerate's prepared scheduler advances
    `num_processes` times per step) and saved through `register_for_checkpointing`;
  - data order is a pure function of (seed, epoch, rank), and every item's crop/flip of (seed, epoch, position):
    resuming replays exactly the batches a straight run would have seen, with or without DataLoader workers;
    posterior noise is drawn from a generator seeded by (seed, step, rank, micro-step);
  - a non-finite loss or gradient skips the update on the device (fused AdamW's `found_inf`, no host sync);
    the skip counters are read back at log steps (every step on CPU, where reading a scalar costs nothing);
  - checkpoints are written to a temporary folder and renamed, then a `latest` pointer file is replaced atomically.

Export: `output_dir/vae/` in diffusers format (EMA weights when EMA is on), with `scaling_factor` measured on
training latents (posterior modes of `train.scaling_batches` batches). `shift_factor` = latent mean is stored when
`train.export_shift_factor` is true, or when it is null (default) and the model has >= 16 latent channels (the
SD3/FLUX convention); `scaling_factor` is then 1/std of the shifted latents, otherwise 1/RMS of the raw latents, so
the latents a diffusion model sees have unit second moment either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from kl_autoencoder.config import ConfigError, ModelSection, TrainConfig, save_config
from kl_autoencoder.fastpath import FastPath, compile_with_fallback, prepare_loss_network
from kl_autoencoder.durable import atomic_write_text, fsync_dir, fsync_tree
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder import losses as L

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks the folder complete
NAN_STEPS_ENV = "KLAE_TEST_NAN_STEPS"  # test hook: "3,4,5" makes the loss NaN at those optimizer steps
# Test hook: seconds to pause after a checkpoint's temp folder is fully written, before it is renamed into place
# (lets a test SIGKILL the run in the middle of a checkpoint write). Unset in normal use.
SLOW_CHECKPOINT_ENV = "KLAE_TEST_SLOW_CHECKPOINT"
TMP_PREFIX = ".tmp-"  # temp folders: a checkpoint being written, or an old one being deleted


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written to `.checkpoint` and training stopped cleanly."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"training interrupted at step {step}; checkpoint: {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


# ----------------------------------------------------------------------------------------------- the step


@dataclass
class LossWeights:
    """The loss mix at one step (the KL and GAN weights already scheduled for that step)."""

    pixel: str = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    free_bits: float = 0.0
    gan_weight: float = 0.0  # 0 = no adversarial term at this step
    gan_loss: str = "hinge"
    adaptive_gan_weight: bool = True


def autoencoder_loss(
    model: nn.Module,
    pixel_values: torch.Tensor,
    weights: LossWeights,
    perceptual: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    logvar: torch.Tensor | None = None,
    last_layer: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Forward + the LDM loss: rec (pixel [NLL form] + LPIPS) + w_kl * KL + w_gan * adaptive * G.

    `model` is whatever the caller trains through (the DDP/accelerate wrapper included); `last_layer` is the
    unwrapped model's `last_decoder_layer` (needed for the adaptive GAN weight). Returns (loss, logs of detached
    fp32 scalars, reconstruction in fp32). Nothing here syncs with the host.
    """
    reconstruction, posterior = model(pixel_values, sample=True, generator=generator)
    reconstruction = reconstruction.float()  # losses in fp32 whatever the autocast dtype
    target = pixel_values.float()
    pixel = L.pixel_loss(reconstruction, target, kind=weights.pixel, logvar=logvar)
    rec = weights.pixel_weight * pixel
    logs: dict[str, torch.Tensor] = {"pixel": pixel.detach()}
    if perceptual is not None and weights.perceptual_weight > 0:
        lpips_value = perceptual(reconstruction, target)
        rec = rec + weights.perceptual_weight * lpips_value
        logs["perceptual"] = lpips_value.detach()
    kl = L.kl_loss(posterior, free_bits=weights.free_bits)
    loss = rec + weights.kl_weight * kl
    logs["kl"] = kl.detach()
    logs["rec"] = rec.detach()
    if logvar is not None:
        logs["logvar"] = logvar.detach().float()
    if discriminator is not None and weights.gan_weight > 0:
        with frozen(discriminator):  # the generator pass must not leave gradients in D
            g_loss = L.generator_loss(discriminator(reconstruction).float(), kind=weights.gan_loss)
        if weights.adaptive_gan_weight:
            if last_layer is None:
                raise ValueError("autoencoder_loss: the adaptive GAN weight needs last_layer=model.last_decoder_layer")
            d_weight = L.adaptive_gan_weight(rec, g_loss, last_layer)
        else:
            d_weight = torch.ones((), device=loss.device)
        loss = loss + weights.gan_weight * d_weight * g_loss
        logs["g_loss"] = g_loss.detach()
        logs["d_weight"] = d_weight.detach()
    logs["loss"] = loss.detach()
    return loss, logs, reconstruction


def training_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor] | torch.Tensor,
    perceptual: nn.Module | None,
    weights: LossWeights,
    discriminator: nn.Module | None = None,
    logvar: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder's loss for one batch: (loss to backpropagate, logs dict of detached tensors).

    For benchmarks: call `loss.backward()` and an optimizer step yourself.
    """
    pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
    last_layer = unwrap(model).last_decoder_layer if discriminator is not None else None
    d = unwrap(discriminator) if discriminator is not None else None  # G pass outside DDP: D gets no gradients
    loss, logs, _ = autoencoder_loss(model, pixel_values, weights, perceptual, d, logvar, last_layer,
                                     generator)
    return loss, logs


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on detached real and reconstructed images."""
    logits_real = discriminator(real.detach()).float()
    logits_fake = discriminator(fake.detach()).float()
    loss_fn = L.hinge_d_loss if kind == "hinge" else L.non_saturating_d_loss
    loss = loss_fn(logits_real, logits_fake)
    return loss, {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                  "logits_fake": logits_fake.detach().mean()}


def unwrap(module: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily turn off requires_grad of a module's parameters (restored afterwards)."""
    params = [p for p in unwrap(module).parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def step_weights(cfg: TrainConfig, step: int) -> LossWeights:
    """The loss mix at optimizer step `step` (0-based): KL schedule and the GAN switch-on."""
    loss = cfg.loss
    gan_on = loss.gan.enabled and step >= loss.gan.disc_start
    return LossWeights(
        pixel=loss.pixel,
        pixel_weight=loss.pixel_weight,
        perceptual_weight=loss.perceptual_weight,
        kl_weight=L.kl_weight_at(step, loss.kl_weight, loss.kl_warmup_steps, loss.kl_schedule,
                                 loss.kl_cycle_steps if loss.kl_schedule == "cyclical" else None),
        free_bits=loss.free_bits,
        gan_weight=loss.gan.disc_weight if gan_on else 0.0,
        gan_loss=loss.gan.disc_loss,
        adaptive_gan_weight=loss.gan.adaptive_weight,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant, cosine or linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


# ----------------------------------------------------------------------------------------------- small pieces


class EMA(nn.Module):
    """Exponential moving average of a model's floating-point state (parameters and buffers), kept in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        for i, name in enumerate(self.names):
            self.register_buffer(f"shadow_{i}", model.state_dict()[name].detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"shadow_{i}") for i in range(len(self.names))]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        current = [state[name].float() for name in self.names]
        torch._foreach_lerp_(self.shadows(), current, 1.0 - self.decay)
        self.num_updates += 1

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged tensors in place of its own."""
        state = dict(model.state_dict())
        for name, shadow in zip(self.names, self.shadows()):
            state[name] = shadow.to(state[name].dtype)
        return state


class LogVar(nn.Module):
    """LDM's learned scalar log-variance of the pixel likelihood (a module so it is checkpointed)."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(()))


class LRSchedule:
    """Our own LambdaLR wrapper: stepped once per optimizer step, saved with the checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, o.warmup_steps, cfg.train.max_steps, o.schedule))

    def step(self) -> None:
        self.scheduler.step()

    def get_last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps done
    batches_seen: int = 0  # micro-batches consumed by each process (the data position)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive non-finite steps at the end
    skipped_images: int = 0


# ----------------------------------------------------------------------------------------------- data order


class EpochSampler(Sampler):
    """This rank's items of one epoch: a permutation seeded by (seed, epoch), every `world`-th item, from `start`.

    Yields (index, item_seed) pairs: `SeededItems` seeds torch's RNG with item_seed before building the item, so
    random crops/flips are the same in a resumed run, in the main process or in any DataLoader worker.
    """

    def __init__(self, length: int, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True, start: int = 0):
        self.length, self.seed, self.epoch = length, seed, epoch
        self.rank, self.world, self.shuffle, self.start = rank, world, shuffle, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        per_rank = self.length // self.world  # equal shares keep the ranks in step
        mine = order[self.rank::self.world][:per_rank].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for position in range(self.start, len(mine)):
            yield mine[position], (base + position * self.world + self.rank) % (2**63)

    def __len__(self) -> int:
        return max(0, self.length // self.world - self.start)


class SeededItems(Dataset):
    """Dataset view that takes (index, seed) and builds the item under that seed (global RNG restored)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def epoch_loader(dataset: Dataset, cfg: TrainConfig, epoch: int, rank: int, world: int, start_batch: int
                 ) -> DataLoader:
    """The DataLoader of one epoch for one rank, starting `start_batch` batches in."""
    from kl_autoencoder.data import collate_images, default_num_workers

    workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
    batch_size = cfg.train.batch_size
    collate = lambda items: collate_images(items, resolution=cfg.data.resolution)  # noqa: E731
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, drop_last=True)
    sampler = EpochSampler(len(dataset), cfg.train.seed, epoch, rank, world, start=start_batch * batch_size)
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=True, pin_memory=torch.cuda.is_available())


def batches_per_epoch(dataset: Dataset, batch_size: int, world: int) -> int | None:
    if isinstance(dataset, IterableDataset):
        return None
    return (len(dataset) // world) // batch_size


def iterate_batches(dataset: Dataset, cfg: TrainConfig, rank: int, world: int, batches_seen: int
                    ) -> Iterator[dict]:
    """Endless batches for this rank, resuming after `batches_seen` batches (epochs included)."""
    per_epoch = batches_per_epoch(dataset, cfg.train.batch_size, world)
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} items: too few for train.batch_size="
                         f"{cfg.train.batch_size} on {world} process(es)")
    if per_epoch is None:  # streaming: each rank takes every world-th batch; resume by skipping
        epoch, skip = 0, batches_seen
        while True:
            yielded = 0
            for i, batch in enumerate(epoch_loader(dataset, cfg, epoch, rank, world, 0)):
                if i % world != rank:
                    continue
                if skip:
                    skip -= 1
                    continue
                yielded += 1
                yield batch
            if yielded == 0 and skip == 0:
                raise ValueError("the streaming dataset yielded no batch for this process")
            epoch += 1
    epoch, start = divmod(batches_seen, per_epoch)
    while True:
        yield from epoch_loader(dataset, cfg, epoch, rank, world, start)
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def list_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoint folders, oldest first; incomplete ones (interrupted writes) are reported and ignored."""
    if not root.is_dir():
        return []
    complete = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(TMP_PREFIX) or (path.name.startswith(CHECKPOINT_PREFIX) and not is_complete_checkpoint(path)):
            if warn:
                warnings.warn(f"ignoring incomplete checkpoint folder {path} (interrupted write)", stacklevel=2)
            continue
        if path.name.startswith(CHECKPOINT_PREFIX):
            complete.append(path)
    return sorted(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: None, the `latest` one (pointer file, else the newest complete), or a path."""
    resume = cfg.train.resume
    if resume is None:
        return None
    root = checkpoint_root(cfg)
    if resume != "latest":
        path = Path(resume).expanduser()
        if not is_complete_checkpoint(path):
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE})")
        return path
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete_checkpoint(candidate):
            list_checkpoints(root)  # still warn about leftovers
            return candidate
        warnings.warn(f"{pointer} names {candidate.name}, which is not a complete checkpoint; using the newest "
                      "complete one", stacklevel=2)
    found = list_checkpoints(root)
    if not found:
        warnings.warn(f"train.resume=latest but no checkpoint in {root}: starting from scratch", stacklevel=2)
        return None
    return found[-1]


def state_bytes(*modules: nn.Module | None, optimizers: tuple = ()) -> int:
    """Bytes a checkpoint of these modules and optimizer states needs (roughly)."""
    total = 0
    for module in modules:
        if module is not None:
            total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    for opt in optimizers:
        for state in opt.state_dict()["state"].values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def check_disk_space(folder: Path, needed: int) -> None:
    """Fail clearly before writing a checkpoint that cannot fit."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    needed = int(needed * 1.1) + (16 << 20)
    if free < needed:
        raise OSError(f"not enough disk space for a checkpoint in {folder}: need about {needed / 2**20:.0f} MiB, "
                      f"{free / 2**20:.0f} MiB free; free space or lower train.keep_checkpoints")


def remove_folder(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted folder that looks complete:
    rename it to a temp name first (atomic), then delete."""
    trash = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, cfg: TrainConfig, state: TrainingState, needed_bytes: int) -> Path:
    """accelerate's save_state into a temp folder, flushed and renamed when complete; then `latest` is moved and
    old checkpoints are pruned. A kill at any point leaves the previous complete checkpoint and pointer usable."""
    root = checkpoint_root(cfg)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        check_disk_space(root, needed_bytes)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run (we are the only writer)
            logger.info("removing %s left by an interrupted checkpoint write", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2))
        fsync_tree(tmp)
        pause = float(os.environ.get(SLOW_CHECKPOINT_ENV, "0") or 0)
        if pause > 0:
            print(f"{SLOW_CHECKPOINT_ENV}: pausing {pause}s before renaming {tmp}", flush=True)
            time.sleep(pause)
        if final.exists():  # re-reached after resuming from an older pointer
            remove_folder(final)
        os.replace(tmp, final)
        fsync_dir(root)  # the rename is on disk before `latest` names it
        atomic_write_text(root / "latest", final.name + "\n")
        fsync_dir(root)
        for old in list_checkpoints(root, warn=False)[:-cfg.train.keep_checkpoints]:
            remove_folder(old)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------- setup


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate.state import AcceleratorState, GradientState

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


def make_adamw(params: list[nn.Parameter], lr: float, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; fused (one kernel, device-side skip via found_inf) unless optim.fused=false."""
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                             fused=fused)


def nan_steps_from_env() -> set[int]:
    text = os.environ.get(NAN_STEPS_ENV, "").strip()
    return {int(s) for s in text.split(",") if s.strip()} if text else set()


@contextmanager
def stop_signals() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag (the loop finishes the step, checkpoints, and stops); handlers restored after."""
    flag = {"signal": None}
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
    from torchvision.utils import make_grid

    n = min(count, originals.shape[0])
    pairs = torch.cat([originals[:n], reconstructions[:n]]).float().clamp(-1, 1)
    return make_grid((pairs + 1) / 2, nrow=n)


# ----------------------------------------------------------------------------------------------- export


@torch.no_grad()
def measure_latent_scale(model: KLAutoencoder, cfg: TrainConfig, device: torch.device
                         ) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor or None) from posterior modes of a few centre-cropped training batches."""
    from kl_autoencoder.data import build_dataloader, build_dataset

    dataset = build_dataset(cfg.data, split=cfg.data.split, train=False)
    loader = build_dataloader(dataset, cfg.train.batch_size, shuffle=False, seed=cfg.train.seed, num_workers=0,
                              drop_last=False)
    total, total_sq, count = 0.0, 0.0, 0
    for i, batch in enumerate(loader):
        if i >= cfg.train.scaling_batches:
            break
        x = batch["pixel_values"].to(device)
        if x.shape[0] == 0:
            continue
        z = model.encode(x).mode().double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    if count == 0:
        raise RuntimeError("could not measure the latent scale: no readable training image")
    mean = total / count
    second = total_sq / count
    use_shift = cfg.train.export_shift_factor
    if use_shift is None:
        use_shift = model.config.latent_channels >= 16
    if use_shift:
        std = math.sqrt(max(second - mean * mean, 1e-12))
        return 1.0 / std, mean
    return 1.0 / math.sqrt(max(second, 1e-12)), None


def export_model(model: KLAutoencoder, ema: EMA | None, cfg: TrainConfig, device: torch.device) -> Path:
    """Write output_dir/vae/ (diffusers format) with measured scaling/shift factors."""
    config = AutoencoderConfig.from_dict(model.config.to_dict())
    export = KLAutoencoder(config).to(device)
    export.load_state_dict(ema.averaged_state_dict(model) if ema is not None else model.state_dict())
    export.eval()
    scaling, shift = measure_latent_scale(export, cfg, device)
    export.config.scaling_factor = float(scaling)
    export.config.shift_factor = None if shift is None else float(shift)
    export.config.sample_size = cfg.data.resolution
    out = Path(cfg.train.output_dir) / "vae"
    export.cpu().save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- the loop


def kept_metric_lines(text: str, start_step: int) -> str:
    """The complete lines of an earlier metrics.jsonl up to `start_step`: a run killed mid-write leaves a partial
    last line, and the steps after its last checkpoint are trained (and logged) again after resuming."""
    kept = []
    for line in text.split("\n")[:-1]:  # the text after the last newline is a partial line
        try:
            if json.loads(line)["step"] <= start_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return "".join(kept)


class MetricsWriter:
    """metrics.jsonl (one JSON line per logged step) + TensorBoard through accelerate's tracker."""

    def __init__(self, accelerator, output_dir: Path, start_step: int = 0):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        if accelerator.is_main_process and self.path.exists():
            atomic_write_text(self.path, kept_metric_lines(self.path.read_text(), start_step))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def image(self, step: int, grid: torch.Tensor) -> None:
        if not self.accelerator.is_main_process:
            return
        try:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("reconstruction", grid, global_step=step)
        except Exception as e:  # images are a nicety; never stop training for them
            logger.warning("could not log the reconstruction grid: %s", e)


def train(cfg: TrainConfig) -> Path:
    """Train (or fine-tune) per `cfg`; return the diffusers export folder `output_dir/vae`.

    Raises TrainingInterrupted (after writing a checkpoint) on SIGINT/SIGTERM and NonFiniteLossError after
    `train.max_nonfinite_steps` consecutive skipped steps.
    """
    from accelerate.utils import set_seed
    from kl_autoencoder.data import build_dataset

    accelerator = make_accelerator(cfg)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    output_dir = Path(cfg.train.output_dir)
    print(f"[rank {rank}/{world}] training on {device} (mixed precision: {cfg.train.mixed_precision})", flush=True)
    set_seed(cfg.train.seed)  # same initial weights on every rank
    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- modules, optimizers -----------------------------------------------------------------------------------------
    fast = FastPath.for_device(device, training=True)
    channels_last = fast.channels_last if cfg.model.channels_last is None else cfg.model.channels_last
    model = build_model(cfg.model, channels_last)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = L.PerceptualLoss(cfg.loss.perceptual_net, cfg.loss.perceptual_pretrained).to(device)
        prepare_loss_network(perceptual, fast)  # VGG in NHWC: faster on CPU and GPU whatever the model's layout
    logvar = LogVar().to(device) if cfg.loss.learned_logvar else None
    discriminator = None
    if cfg.loss.gan.enabled:
        discriminator = L.PatchDiscriminator(3, cfg.loss.gan.disc_channels, cfg.loss.gan.disc_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.to(device)
    params = trainable + ([logvar.value] if logvar is not None else [])
    optimizer = make_adamw(params, cfg.optim.lr, cfg, device)
    schedule = LRSchedule(optimizer, cfg)
    if cfg.model.compile:
        model = compile_with_fallback(model, device)  # eager, with a warning, where no compiler is available
    if discriminator is not None:
        discriminator.to(device)
        d_optimizer = make_adamw(list(discriminator.parameters()), cfg.loss.gan.disc_lr or cfg.optim.lr, cfg, device)
        model, optimizer, discriminator, d_optimizer = accelerator.prepare(model, optimizer, discriminator, d_optimizer)
    else:
        d_optimizer = None
        model, optimizer = accelerator.prepare(model, optimizer)
    raw_model: KLAutoencoder = unwrap(model)
    ema = EMA(raw_model, cfg.train.ema.decay).to(device) if cfg.train.ema.enabled else None
    accelerator.register_for_checkpointing(schedule)
    for extra in (ema, logvar):
        if extra is not None:
            accelerator.register_for_checkpointing(extra)
    ckpt_bytes = state_bytes(raw_model, ema, logvar, unwrap(discriminator) if discriminator is not None else None)
    ckpt_bytes += 2 * sum(p.numel() * 4 for p in params)
    if discriminator is not None:
        ckpt_bytes += 2 * sum(p.numel() * 4 for p in discriminator.parameters())

    # -- output folder: created only now, so a bad model.pretrained (or perceptual weights) leaves nothing behind --
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    accelerator.wait_for_everyone()

    # -- resume ------------------------------------------------------------------------------------------------------
    state = TrainingState()
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainingState(**json.loads((resume_from / STATE_FILE).read_text()))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")

    dataset = build_dataset(cfg.data, split=cfg.data.split)
    batches = iterate_batches(dataset, cfg, rank, world, state.batches_seen)
    skip_log = getattr(dataset, "skipped", None)
    accelerator.init_trackers("tensorboard")
    metrics = MetricsWriter(accelerator, output_dir, start_step=state.step)

    nan_steps = nan_steps_from_env()
    inner_opt = getattr(optimizer, "optimizer", optimizer)
    device_skip = getattr(inner_opt, "_step_supports_amp_scaling", False) and accelerator.scaler is None
    check_every_step = device.type == "cpu"
    # Device-side counters: read at log steps only (no per-step host sync on GPU).
    nonfinite_total = torch.tensor(state.nonfinite_total, device=device)
    nonfinite_run = torch.tensor(state.nonfinite_run, device=device)
    worst_run = nonfinite_run.clone()

    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", dynamic_ncols=True)
    last_log_time, images_since_log = time.perf_counter(), 0
    logs: dict[str, torch.Tensor] = {}

    with stop_signals() as stop:
        while state.step < cfg.train.max_steps:
            step = state.step  # 0-based index of this optimizer step; logs use step + 1
            weights = step_weights(cfg, step)
            gan_on = discriminator is not None and weights.gan_weight > 0
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.train.grad_accum_steps):
                while True:  # a batch whose every item was unreadable comes back empty: take the next one
                    batch = next(batches)
                    state.batches_seen += 1
                    if skip_log is not None:
                        skip_log.record_batch(batch)
                    if batch["pixel_values"].shape[0] > 0:
                        break
                x = batch["pixel_values"].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                generator = torch.Generator(device=device).manual_seed(
                    (cfg.train.seed * 1_000_003 + step * 1009 + micro) * 131 + rank)
                with accelerator.accumulate(*(m for m in (model, discriminator) if m is not None)):
                    loss, logs, reconstruction = autoencoder_loss(
                        model, x, weights, perceptual, unwrap(discriminator) if gan_on else None,
                        logvar.value if logvar is not None else None, raw_model.last_decoder_layer, generator)
                    if step + 1 in nan_steps:
                        loss = loss * float("nan")
                        logs["loss"] = loss.detach()
                    accelerator.backward(loss)
                    loss_sum = loss_sum + loss.detach()
                    if accelerator.sync_gradients:
                        if logvar is not None and world > 1:  # logvar lives outside DDP: average by hand
                            logvar.value.grad = accelerator.reduce(logvar.value.grad, "mean")
                        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
                        grad_norm = accelerator.clip_grad_norm_(params, clip)
                        nonfinite = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
                        if device_skip:
                            inner_opt.found_inf = nonfinite.float()
                            optimizer.step()
                            del inner_opt.found_inf
                        elif accelerator.scaler is not None:
                            optimizer.step()  # fp16: the GradScaler skips a non-finite step itself and lowers its scale
                        elif not nonfinite.item():  # non-fused optimizer: one host sync to skip
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        logs["grad_norm"] = grad_norm.detach().float()
                    if gan_on:
                        d_loss, d_logs = discriminator_loss(discriminator, x, reconstruction, cfg.loss.gan.disc_loss)
                        accelerator.backward(d_loss)
                        if accelerator.sync_gradients:
                            d_finite = torch.isfinite(d_loss.detach())
                            d_inner = getattr(d_optimizer, "optimizer", d_optimizer)
                            if device_skip:
                                d_inner.found_inf = (~d_finite).float()
                                d_optimizer.step()
                                del d_inner.found_inf
                            elif accelerator.scaler is not None or d_finite.item():  # the scaler skips inf itself
                                d_optimizer.step()
                            d_optimizer.zero_grad(set_to_none=True)
                        logs.update(d_logs)
                images_since_log += x.shape[0] * world

            # -- after the optimizer step ----------------------------------------------------------------------------
            schedule.step()
            if ema is not None:
                ema.update(raw_model)
            nonfinite_total += nonfinite.long()
            nonfinite_run = (nonfinite_run + 1) * nonfinite.long()
            worst_run = torch.maximum(worst_run, nonfinite_run)
            state.step += 1
            if progress is not None:
                progress.update(1)

            log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps
            if log_now or check_every_step:
                run_value, worst_value = int(nonfinite_run.item()), int(worst_run.item())
                state.nonfinite_total, state.nonfinite_run = int(nonfinite_total.item()), run_value
                if worst_value >= cfg.train.max_nonfinite_steps:
                    terms = {k: float(v.float().mean().item()) for k, v in logs.items()}
                    raise NonFiniteLossError(
                        f"{worst_value} consecutive optimizer steps with a non-finite loss or gradient (limit "
                        f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}), stopping at step {state.step}; "
                        f"loss terms: {terms}")
                worst_run = nonfinite_run.clone()
            if log_now:
                values = {k: accelerator.reduce(v.float().reshape(()), "mean").item() for k, v in logs.items()}
                now = time.perf_counter()
                values["images_per_second"] = images_since_log / max(now - last_log_time, 1e-9)
                values["lr"] = schedule.get_last_lr()
                values["kl_weight"] = weights.kl_weight
                values["nonfinite_steps"] = state.nonfinite_total
                if skip_log is not None:
                    values["skipped_images"] = skip_log.count
                last_log_time, images_since_log = now, 0
                metrics.write(state.step, values)
                if progress is not None:
                    progress.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "pixel", "perceptual", "kl",
                                          "images_per_second") if k in values})
            if cfg.train.image_every and state.step % cfg.train.image_every == 0:
                metrics.image(state.step, image_grid(x.detach(), reconstruction.detach()))

            stop_requested = stop["signal"] is not None
            if world > 1 and log_now:  # agree on stopping (a collective, so only at log steps)
                flag = accelerator.reduce(torch.tensor(float(stop_requested), device=device), "max")
                stop_requested = bool(flag.item())
            elif world > 1:
                stop_requested = False
            if skip_log is not None:
                state.skipped_images = skip_log.count
            checkpoint_due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            if checkpoint_due or stop_requested or state.step == cfg.train.max_steps:
                state.nonfinite_total, state.nonfinite_run = int(nonfinite_total.item()), int(nonfinite_run.item())
                path = save_checkpoint(accelerator, cfg, state, ckpt_bytes)
                if stop_requested:
                    if progress is not None:
                        progress.close()
                    accelerator.print(
                        f"\n{stop['signal'] or 'stop signal'}: stopped after step {state.step}; checkpoint written to "
                        f"{path}\nresume with: python training/train.py --config <your config> "
                        f"train.output_dir={cfg.train.output_dir} train.resume=latest", flush=True)
                    accelerator.end_training()
                    raise TrainingInterrupted(path, state.step)

    if progress is not None:
        progress.close()
    accelerator.wait_for_everyone()
    skipped = skip_log.count if skip_log is not None else 0
    if skipped:
        accelerator.print(f"skipped {skipped} unreadable image(s): {', '.join(skip_log.files[:10])}"
                          + (" ..." if skipped > 10 else ""))
    if state.nonfinite_total:
        accelerator.print(f"{state.nonfinite_total} optimizer step(s) skipped for non-finite loss/gradients")
    export_dir = Path(cfg.train.output_dir) / "vae"
    if accelerator.is_main_process:
        export_dir = export_model(raw_model, ema, cfg, device)
        atomic_write_text(output_dir / "summary.json", json.dumps({
            "steps": state.step, "skipped_images": skipped, "skipped_files": skip_log.files if skip_log else [],
            "nonfinite_steps": state.nonfinite_total, "export": str(export_dir)}, indent=2))
        accelerator.print(f"exported {export_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir
