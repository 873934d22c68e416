"""Validation while training: held-out figures every `validation.every` steps, the best checkpoint kept.

    validation:
      every: 300            # steps between passes (and one at the last step); 0 = off
      source: null          # anything data.source takes; null = the built-in sample photos' held-out split
      num_images: 16        # the first images of the source: one fixed set, centre crops at validation.resolution
      keep_best: psnr       # optional: keep checkpoints/best_step_NNNNNNN, the best pass's checkpoint
      export_best: false    # with keep_best: also export it to output_dir/vae-best at the end

A pass measures what `evaluate` measures, with its own functions (evaluation._reconstruct, ImageScores,
summarize_defined; metrics.LatentScaleEstimator): PSNR, SSIM, colour error, ΔE2000 and hue error (MS-SSIM when the
images are large enough, LPIPS when its backbone weights are cached: nothing is downloaded), the reconstruction from
the posterior mode; and from posterior samples the latent spread the export's scale comes from: `val/latent_std`,
`val/scaling_factor` (= 1 / latent_std, the estimator the export uses) and, when the export keeps the model's factor,
`val/scaled_latent_std` (latent_std x that factor: 1 is what a diffusion model expects). With EMA on, the EMA
weights are measured (what the export will be).

The images are cut into batches of validation.batch_size; with N processes, process r takes batches r, r + N, ...
and the per-image figures are gathered, so every image counts once and the figures do not depend on the number of
processes. Each batch's posterior noise comes from a generator seeded by (train.seed, batch), and the global RNG
states are restored after a pass: validating changes nothing in the training trajectory. Figures go to
metrics.jsonl (a line of `val/...` keys at the pass's step), the trackers and the progress bar (`val_psnr`); the
first `validation.log_images` images and their reconstructions go to the trackers as an image.

A pass comes before the step's checkpoint, so a run killed during it resumes from an earlier checkpoint and passes
again at the same step with the same weights. The best checkpoint is written like the others (temporary folder,
renamed when complete) with its record, best.json; resuming reads the newest complete one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kl_autoencoder import metrics as M
from kl_autoencoder.config import (BEST_DIRECTIONS, ConfigError, TrainConfig, keeps_pretrained_latent_scale,
                                   validation_source)
from kl_autoencoder.data import build_dataset
from kl_autoencoder.evaluation import IMAGE_METRICS, ImageScores, _reconstruct, summarize_defined
from kl_autoencoder.fastpath import FastPath, prepare_for_inference
from kl_autoencoder.run_folder import RunFolder, TrainingState
from kl_autoencoder.trackers import image_grid, log_images

BEST_EXPORT = "vae-best"  # output_dir/vae-best: the best checkpoint's export (validation.export_best)
BAR_KEY = "val_psnr"


@contextmanager
def preserved_rng() -> Iterator[None]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as they were before the block."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def validation_batches(cfg: TrainConfig, rank: int, world: int) -> tuple[list[tuple[int, torch.Tensor]], int]:
    """This process's share of the validation set as (batch number, [B, 3, R, R] in [-1, 1]), and the set's size.

    The set is the first validation.num_images readable images of the source, centre-cropped (no flip, no hue
    turn); batch b holds images b x batch_size ... and goes to process b % world."""
    val = cfg.validation
    size = val.batch_size or cfg.train.batch_size
    data = dataclasses.replace(cfg.data, source=validation_source(cfg), data_files=val.data_files, split=val.split,
                               image_column=val.image_column, resolution=val.resolution or cfg.data.resolution,
                               max_images=None, random_crop=False, random_flip=False, random_hue=0.0)
    try:
        dataset = build_dataset(data, split=val.split, train=False)
    except (OSError, ValueError) as err:  # an empty folder, an unreadable save_to_disk folder, ...
        raise ConfigError(f"validation.source={data.source!r}: {err}") from None
    mine: dict[int, list[torch.Tensor]] = {}
    count = 0
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):  # map-style: read only this process's share
        for index in range(min(val.num_images, len(dataset))):
            if (index // size) % world == rank:
                mine.setdefault(index // size, []).append(dataset[index]["pixel_values"])
        count = min(val.num_images, len(dataset))
    else:  # a stream: every process reads the same first items and keeps its share
        for item in dataset:
            if count >= val.num_images:
                break
            if item["pixel_values"] is not None:
                if (count // size) % world == rank:
                    mine.setdefault(count // size, []).append(item["pixel_values"])
                count += 1
    if count == 0:
        raise ConfigError(f"validation.source={data.source!r} holds no readable image")
    return [(b, torch.stack(images)) for b, images in sorted(mine.items())], count


class Validation:
    """The validation passes of one run; inert (`due` is never true) when validation.every is 0 or there is no
    held-out source (validation.source unset and data.source without a held-out split of its own)."""

    def __init__(self, t: Any = None, run: RunFolder | None = None):
        self.t, self.run_folder = t, run
        self.every = t.cfg.validation.every if t is not None else 0
        self.bar: dict[str, str] = {}  # the progress bar's validation figure
        self.keep_best = BestCheckpoint(t, run)

    @classmethod
    def start(cls, t: Any, run: RunFolder) -> "Validation":
        """Load this process's validation images and a model copy to measure (before the run folder is claimed: a
        source that fails to open leaves nothing behind)."""
        validation = cls(t, run)
        cfg, acc = t.cfg, t.accelerator
        if validation.every and validation_source(cfg) is None:
            acc.print(f"validation.every={validation.every} but no held-out images: no validation passes (set "
                      f"validation.source to a folder, hub dataset or shards of images kept out of training)")
            validation.every = 0
        if not validation.every:
            return validation
        validation.batches, validation.num_images = validation_batches(cfg, acc.process_index, acc.num_processes)
        validation.size = cfg.validation.batch_size or cfg.train.batch_size
        # the most rows a process holds: the first process's batches, each full
        validation.rows = math.ceil(math.ceil(validation.num_images / validation.size) / acc.num_processes) \
            * validation.size
        validation.lpips = M.LPIPSMetric(cfg.validation.lpips_net, device=t.device)
        if cfg.validation.keep_best == "lpips" and not validation.lpips.available:
            raise ConfigError(f"validation.keep_best=lpips: {validation.lpips.reason}")
        validation.model = copy.deepcopy(t.raw_model).requires_grad_(False)
        validation.model.__dict__.pop("forward", None)  # a wrapper accelerate may have set on the trained model
        prepare_for_inference(validation.model, t.device)
        validation.policy = FastPath.for_device(t.device)  # evaluate's inference policy
        return validation

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.t.cfg.train.max_steps)

    def run(self, state: TrainingState, progress: Any = None) -> dict[str, float]:
        """One pass at `state.step` (every process): measure, log, keep the best. Returns the figures."""
        acc = self.t.accelerator
        started = time.perf_counter()
        with preserved_rng():
            figures, grid = self.measure()
        figures["val/seconds"] = time.perf_counter() - started
        acc.log(figures, step=state.step)
        if acc.is_main_process:
            self.run_folder.log_metrics(state.step, figures)
            if grid is not None:
                log_images(acc, "validation", grid, state.step)
        if "val/psnr" in figures:
            self.bar = {BAR_KEY: f"{figures['val/psnr']:.4g}"}
            show_on_bar(progress, self.bar[BAR_KEY])
        self.keep_best.offer(state, figures)
        return figures

    def weights(self) -> dict[str, torch.Tensor]:
        t = self.t
        return t.ema.averaged_state_dict(t.raw_model) if t.ema is not None else t.raw_model.state_dict()

    @torch.no_grad()
    def measure(self) -> tuple[dict[str, float], torch.Tensor | None]:
        """The pass's figures (identical on every process) and, on the process holding batch 0, the image grid."""
        cfg, device = self.t.cfg, self.t.device
        self.model.load_state_dict(self.weights())
        scores, grid = ImageScores(self.lpips), None
        shift = M.uses_shift(getattr(self.model.config, "latent_channels", 0), cfg.train.export_shift_factor)
        estimator = M.LatentScaleEstimator(shift)
        indices = []
        for batch, images in self.batches:
            x = images.to(device)
            generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + batch)
            _, z, reconstruction = _reconstruct(self.model, x, False, generator, self.policy, None)
            if z is not None:
                estimator.update(z.float())
            scores.add(M.to_unit_range(reconstruction), M.to_unit_range(x))
            indices.append(torch.arange(batch * self.size, batch * self.size + len(x), dtype=torch.float64))
            if batch == 0 and cfg.validation.log_images:
                grid = image_grid(x, reconstruction.float(), cfg.validation.log_images)
        index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.float64)
        measured = scores.measured()
        missing = torch.full_like(index, torch.nan)  # a metric not measured here (MS-SSIM on small images, LPIPS)
        table = torch.stack([index] + [measured[k].double() if k in measured else missing for k in IMAGE_METRICS], 1)
        figures = gathered_figures(self.t.accelerator, table, estimator, self.rows)
        if "val/latent_std" in figures and keeps_pretrained_latent_scale(cfg):
            figures["val/scaled_latent_std"] = figures["val/latent_std"] * float(self.model.config.scaling_factor)
        return figures, grid


def show_on_bar(progress: Any, value: str) -> None:
    """`value` as the progress bar's `val_psnr`, beside the training figures it shows (a tqdm bar, or None)."""
    if progress is not None:
        shown = [p for p in (progress.postfix or "").split(", ") if p and not p.startswith(f"{BAR_KEY}=")]
        progress.set_postfix_str(", ".join(shown + [f"{BAR_KEY}={value}"]))


def gathered_figures(acc: Any, table: torch.Tensor, estimator: M.LatentScaleEstimator, rows: int
                     ) -> dict[str, float]:
    """Gather every process's per-image rows ([index, IMAGE_METRICS...], padded to `rows`) and latent moments;
    summarise each metric over the whole set as `evaluate` does (`summarize_defined`: the mean over the images it is
    defined on), every image once."""
    device = acc.device
    padded = torch.full((rows, table.shape[1]), -1.0, dtype=torch.float64)
    padded[:len(table)] = table
    gathered = acc.gather(padded.to(device)).cpu()
    gathered = gathered[gathered[:, 0] >= 0]
    gathered = gathered[gathered[:, 0].argsort()]
    figures: dict[str, float] = {"val/num_images": float(len(gathered))}
    for column, key in enumerate(IMAGE_METRICS, start=1):
        summary = summarize_defined(gathered[:, column])
        if summary is not None:
            figures[f"val/{key}"] = summary["mean"]
    moments = acc.gather(torch.tensor([estimator.moments()], dtype=torch.float64, device=device)).cpu()
    try:
        scale = M.LatentScaleEstimator.pooled(estimator.shift, moments.tolist()).result()
    except ValueError:  # no latents (a tiny autoencoder) or no spread
        return figures
    figures.update({"val/latent_std": 1.0 / scale.scaling_factor, "val/scaling_factor": scale.scaling_factor})
    if scale.shift_factor is not None:
        figures["val/shift_factor"] = scale.shift_factor
    return figures


class BestCheckpoint:
    """validation.keep_best: the best pass so far ({"metric", "mode", "value", "step"}) and its checkpoint, written
    like the others when a pass beats it (strictly)."""

    def __init__(self, t: Any, run: RunFolder | None):
        self.t, self.run_folder = t, run
        self.best: dict[str, Any] | None = None

    def offer(self, state: TrainingState, figures: dict[str, float]) -> None:
        metric = self.t.cfg.validation.keep_best
        value = figures.get(f"val/{metric}") if metric else None
        if value is None:
            return
        mode = BEST_DIRECTIONS[metric]
        if self.best is None:  # a resumed run's best so far: the newest complete best checkpoint (read after claim)
            found = self.run_folder.best_checkpoints()
            self.best = found[-1][1] if found and found[-1][1]["metric"] == metric else None
        if self.best is not None and not (value > self.best["value"] if mode == "max" else value < self.best["value"]):
            return
        self.best = {"metric": metric, "mode": mode, "value": float(value), "step": state.step}
        acc = self.t.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            modules, optimizers = self.t.checkpoint_parts()
            self.run_folder.save_best(state, modules, optimizers, self.best, self.t.checkpoint_bytes())
        acc.wait_for_everyone()


def finish_best(t: Any, run: RunFolder, export_fn: Any, trained: bool) -> dict[str, Any]:
    """At the end (main process, after the export): the summary's "best" entry, and with validation.export_best the
    best checkpoint exported to output_dir/vae-best (after training; for a finished run only when missing)."""
    val = t.cfg.validation
    if not val.keep_best:
        return {}
    found = run.best_checkpoints()
    if not found:
        return {"best": None}
    path, record = found[-1]
    export: Path | None = None
    if val.export_best:
        export = run.root / BEST_EXPORT
        if trained or not (export / "config.json").is_file():
            modules, optimizers = t.checkpoint_parts()
            run.load_checkpoint(path, modules, optimizers)  # training is over: the modules may take the best weights
            export_fn(t, export)
            print(f"exported the best checkpoint ({record['metric']} {record['value']:.4g} at step {record['step']}) "
                  f"to {export}", flush=True)
    return {"best": {**record, "checkpoint": str(path), "export": str(export) if export else None}}
