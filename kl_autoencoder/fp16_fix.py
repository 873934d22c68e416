"""Make a KL VAE run in fp16 without changing its latent space or its images (`configs/fp16-fix.yaml`): an exact,
data-calibrated rescale, with no gradient fine-tune.

    python training/train.py --config configs/fp16-fix.yaml model.pretrained=PATH/TO/VAE data.source=/data/images

madebyollin's sdxl-vae-fp16-fix keeps the final output and makes the internal activations smaller by scaling weights
and biases down inside the network, and fine-tunes to repair what the scaling changes. Here the scaling changes
nothing: `fp16_rescale` shrinks each *unit* (a residual-stream segment with the layers that read it, a ResNet conv1,
an attention's values) by multiplying its writers by f and its direct readers by 1 / f, which the fp32 model cannot
tell from the original (float64: equal to ~1e-12). So there is nothing for a fine-tune against the teacher to
improve in fp32 (the student IS the teacher), and the recipe does not train: each "step" is a calibration batch.
Per batch, on every rank (`Calibration.step`):
  - the fp32 student encodes the batch and decodes the frozen teacher's latents of it, with every submodule's
    largest |output| recorded;
  - those peaks are all-reduced (max) across processes, so every rank takes the same decision on the same numbers;
  - a non-finite peak skips the batch (nothing moves; it counts as a skipped step);
  - every unit whose peak passed `fp16_fix.activation_limit` (2^14: 4x inside fp16's 65504) is shrunk to
    `fp16_fix.shrink_to` (2^11), not just under the limit: a large set's direct readers hold small weights (the
    product is what counts), which only come back as far as the set goes down. A set driven from ~3 to 2e5 and
    shrunk only to 16384 leaves its readers' weights ~5000x below the original's, in fp16's subnormal range
    (BENCHMARKS.md: a 50 dB fp16 decode where the original gives 64 dB).
Logged: the peak before and after, the layers changed, and the fp32 student's MSE against the teacher (latents and
decode: ~1e-15, the proof that the rescale keeps the function).

At export the latent fields of the source are kept (the latent space is the original's) and `force_upcast` is
decided on the data: false (diffusers' pipelines then run the VAE in fp16) when every activation of every batch seen,
in the exported weights, is within the limit; otherwise kept true, with one line naming the layer that is not (what
no unit covers: a GroupNorm / activation output, queries and keys, either half's conv_out).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from kl_autoencoder.config import ConfigError, TrainConfig
from kl_autoencoder.fastpath import FastPath, prepare_for_inference
from kl_autoencoder.fp16 import module_peaks
from kl_autoencoder.fp16_rescale import Unit, apply_factors_, rescale_units, shrink_factors, units_of
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.model_card import model_card
from kl_autoencoder.presets import LATENT_SCALE_KEY
from kl_autoencoder.training_setup import build_model, make_accelerator
from kl_autoencoder.training_step import StepResult, Training


class FixTargets(NamedTuple):
    latents: torch.Tensor  # the teacher's posterior mean
    decode: torch.Tensor  # the teacher's decode of it


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: torch.Tensor) -> FixTargets:
    """The fp32 teacher's posterior mean of `x` and its decode of that mean."""
    latents = teacher.encode(x.float()).mode()
    return FixTargets(latents, teacher.decode(latents).float())


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise max over every process (NaN sent as inf, so a non-finite value anywhere is seen everywhere)."""
    values = torch.nan_to_num(values.float(), nan=math.inf)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


class Calibration:
    """The rescale's state over a run: the units, and the largest |output| of every submodule on the batches seen,
    in the current weights (a unit's entries are multiplied by its factor when it is shrunk)."""

    def __init__(self, student: KLAutoencoder, limit: float, target: float | None = None,
                 parts: tuple[str, ...] = ("encoder", "decoder")):
        self.limit = float(limit)
        self.target = self.limit if target is None else float(target)
        self.units: list[Unit] = [u for part in parts for u in units_of(rescale_units(student), part)]
        self.names = [name for name, _ in student.named_modules() if name]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.running = [0.0] * len(self.names)
        self.batches = 0

    def measure(self, student: KLAutoencoder, x: torch.Tensor, latents: torch.Tensor
                ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """All-reduced peaks of the student's encode of `x` and decode of `latents`, with its mean and decode."""
        with module_peaks(student) as found:
            mean = student.encode(x).mode()
            decode = student.decode(latents).float()
        zero = x.new_zeros((), dtype=torch.float32)
        peaks = all_reduce_max(torch.stack([found.get(name, zero) for name in self.names])).tolist()
        return dict(zip(self.names, peaks)), mean, decode

    def update(self, student: KLAutoencoder, peaks: dict[str, float]) -> int:
        """Shrink every unit past the limit (the same on every rank: `peaks` are all-reduced); returns the layers
        changed. Nothing moves when a peak is non-finite."""
        if not all(math.isfinite(p) for p in peaks.values()):
            return 0
        self.running = [max(r, peaks[n]) for r, n in zip(self.running, self.names)]
        factors = shrink_factors(self.units, peaks, self.limit, self.target)
        for unit, f in zip(self.units, factors):
            for member in unit.members:
                self.running[self.index[member]] *= f
        self.batches += 1
        return apply_factors_(student, self.units, factors)

    def worst(self) -> tuple[str, float]:
        """The submodule with the largest |output| on the data seen, in the current weights, and that peak."""
        i = max(range(len(self.names)), key=lambda k: self.running[k])
        return self.names[i], self.running[i]

    def force_upcast(self) -> tuple[bool, str]:
        """(force_upcast, one line saying why): false only when every activation seen is within the limit."""
        if not self.batches:
            return True, "force_upcast kept true: no calibration batch was measured in this process"
        name, peak = self.worst()
        if peak <= self.limit:
            return False, (f"force_upcast: false: every activation on the {self.batches} batch(es) seen is within "
                           f"{self.limit:g} (largest {peak:.4g} at {name}); pipelines run this VAE in fp16")
        return True, (f"force_upcast kept true: {name} reaches {peak:.4g} on the data seen, past "
                      f"fp16_fix.activation_limit={self.limit:g}, and no function-preserving rescale covers it")

    @torch.no_grad()
    def step(self, t: Training, x: torch.Tensor, step: int, micro: int = 0) -> StepResult:
        """One calibration batch (the module docstring); `skipped` when a peak was non-finite on any rank."""
        targets = teacher_targets(t.teacher, x)
        peaks, mean, decode = self.measure(t.raw_model, x, targets.latents)
        before = max(peaks.values())
        changed = self.update(t.raw_model, peaks)
        device = x.device
        logs = {"latent_mse": (mean.float() - targets.latents).square().mean(),
                "decode_mse": (decode - targets.decode).square().mean(),
                "activation_peak": torch.tensor(before, device=device),
                "peak_after": torch.tensor(self.worst()[1], device=device),
                "rescaled_layers": torch.tensor(float(changed), device=device)}
        return StepResult(logs, decode, torch.tensor(not math.isfinite(before), device=device))


def build_fp16_fix(cfg: TrainConfig, fast: FastPath | None = None) -> Training:
    """Student (model.pretrained, rescaled in place), teacher (the same weights, fp32, frozen) and the calibration;
    no optimizer (nothing is trained)."""
    if not cfg.model.pretrained:
        raise ConfigError("'model.pretrained' is not set: fp16_fix rescales an existing VAE (model.pretrained=PATH)")
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    fast = fast or FastPath.for_device(device, training=False)
    channels_last = fast.channels_last if cfg.model.channels_last is None else cfg.model.channels_last
    student = build_model(cfg.model, channels_last).to(device).float().eval().requires_grad_(False)
    teacher = KLAutoencoder(AutoencoderConfig.from_dict(student.config.to_dict()))
    teacher.load_state_dict(student.state_dict())
    teacher = prepare_for_inference(teacher.float().requires_grad_(False), device)
    parts = ("decoder",) if cfg.model.freeze_encoder else ("encoder", "decoder")
    calibration = Calibration(student, cfg.fp16_fix.activation_limit, cfg.fp16_fix.shrink_to, parts)
    return Training(cfg, accelerator, student, student, None, [], None, logvar=None, discriminator=None,
                    d_optimizer=None, ema=None, channels_last=channels_last, step_fn=calibration.step,
                    export_fn=FixedExport(calibration), teacher=teacher)


class FixedExport:
    """The rescaled student with its source's latent fields (scaling / shift factors, latents_mean / std,
    sample_size) and `force_upcast` as the data decided (`Calibration.force_upcast`, said in one line)."""

    def __init__(self, calibration: Calibration):
        self.calibration = calibration

    def __call__(self, t: Training, path: Path) -> Path:
        return export_fixed(t, path, self.calibration)


def export_fixed(t: Training, path: Path, calibration: Calibration) -> Path:
    """`FixedExport`'s work: save the student with force_upcast decided by `calibration`."""
    force_upcast, line = calibration.force_upcast()
    config = t.raw_model.config.to_dict()
    config["force_upcast"] = force_upcast
    export = KLAutoencoder(AutoencoderConfig.from_dict(config))
    export.load_state_dict(t.raw_model.state_dict())
    cfg = t.cfg
    # the latent space is the source's (an exact rescale): recorded as kept, so evaluate --write-config asks --force
    record = {"latent_scale": "kept", "source": cfg.model.pretrained}
    card = model_card(export.config.to_dict(), record=record, parameters=export.num_parameters(),
                      training={"made fp16-safe from": cfg.model.pretrained,
                                "how": f"an exact rescale of the layers past {cfg.fp16_fix.activation_limit:g}, "
                                       f"calibrated on {cfg.train.max_steps} batches of {cfg.data.source}; no training",
                                "force_upcast": line})
    export.eval().save_pretrained(path, private={LATENT_SCALE_KEY: record}, overwrite=cfg.train.overwrite,
                                  protect=[cfg.model.pretrained], card=card)
    t.accelerator.print(line)
    return path
