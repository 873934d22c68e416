"""Train (or fine-tune) a KL autoencoder: the loop.

    from kl_autoencoder.config import load_config
    from kl_autoencoder.trainer import train
    export_dir = train(load_config("configs/quickstart.yaml", ["train.max_steps=200"]))

config -> `build_training` (model, objective, optimizers) -> claim the run folder, resume -> loop { batch ->
`train_step` (loss, backward, one optimizer step for the generator and the discriminator alike) -> EMA -> log /
validate / checkpoint / stop } -> export with the one latent-scale estimator. `train_step` is also exactly what
benchmarks/run.py times.

The loop and what directly serves it live here; each other concern has its own room below it:
  training_setup.py  the accelerator, the model and everything one step touches (`build_training`)
  training_step.py   one optimisation step (`train_step`, `optimizer_step`, EQ-VAE's transform)
  lr_schedule.py     the learning rate as a function of the step
  ema.py             the moving average of the weights
  stopping.py        stop signals, dropping a step in flight, too many non-finite steps
  training_export.py the export and its latent scale
  validation.py      held-out passes and the best checkpoint; run_folder.py the run's files and checkpoints

Choices worth knowing (the diffusers example's faults avoided):
  - the forward pass goes through the accelerate-wrapped model (DDP hooks fire); trainable weights stay fp32 under
    mixed precision (autocast only); the posterior and every loss are fp32; LPIPS is differentiable;
  - a non-finite loss or gradient skips the update on the device (fused AdamW's `found_inf`, no host sync); the skip
    counters are read back at log steps (every step on CPU, where reading a scalar costs nothing);
  - the learning rate is a pure function of the step, posterior noise comes from a generator seeded by (seed, step,
    rank, micro-step) and the data order from (seed, epoch, position): resuming replays a straight run exactly.

The loop calls `train_step` and `save_checkpoint` by their names in this module (what tests patch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from kl_autoencoder.config import (ConfigError, ModelSection, TrainConfig, config_to_dict,  # noqa: F401
                                   keeps_pretrained_latent_scale, save_config)
from kl_autoencoder.data import build_dataset, default_num_workers, order_workers, training_batches
from kl_autoencoder.ema import EMA  # noqa: F401
from kl_autoencoder.fastpath import mixed_precision_for
from kl_autoencoder.lr_schedule import base_learning_rate, learning_rates, lr_factor, set_learning_rates  # noqa: F401
from kl_autoencoder.run_folder import (STATE_FILE, RunFolder, RunFolderError, TrainingState,  # noqa: F401
                                       check_run_inputs, is_complete_checkpoint, list_checkpoints,
                                       read_training_state)
from kl_autoencoder.stopping import (NonFiniteCounter, NonFiniteLossError, StepAborted, StepGuard,  # noqa: F401
                                     StopVote, TrainingInterrupted, stop_signals)
from kl_autoencoder.trackers import image_grid, init_trackers, log_images, log_text, log_with  # noqa: F401
from kl_autoencoder.training_export import export_model, remeasure_latent_scale  # noqa: F401
from kl_autoencoder.training_setup import (build_model, build_training, make_accelerator,  # noqa: F401
                                           make_discriminator)
from kl_autoencoder.training_step import (StepResult, Training, equivariance_transform, optimizer_step,  # noqa: F401
                                          train_step)
from kl_autoencoder.validation import Validation, finish_best


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


def _train_in(t: Training, run: RunFolder, resume_from: Path | None, dataset: Any = None,
              validation: Validation | None = None) -> Path:
    cfg, acc, device = t.cfg, t.accelerator, t.device
    workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
    state = resumed_state(t, run, resume_from, dataset, workers)
    if state.step >= cfg.train.max_steps:
        return _finish(t, run, state, None, trained=False)
    for line in start_lines(t):
        acc.print(line)

    dataset, batches, skip_log = data_from(t, dataset, state, workers)
    init_trackers(acc, cfg, config_to_dict(cfg))
    log_text(acc, "perceptual_weights", perceptual_weights(t))
    validation = validation or Validation.start(t, run)
    nonfinite, progress = NonFiniteCounter(state, device), Progress(t, state)

    with stop_signals() as stop, StepGuard(t, stop, state) as guard, StopVote(t) as stop_vote:
        while state.step < cfg.train.max_steps:
            set_learning_rates(t, state.step)
            guard.begin()
            try:
                for micro in range(cfg.train.grad_accum_steps):
                    guard.check()
                    x = next_readable_batch(batches, state, skip_log).to(device, non_blocking=True)
                    result = (t.step_fn or train_step)(t, x, state.step, micro)
                    progress.images += x.shape[0] * acc.num_processes
            except StepAborted:  # dropped before any weight changed: checkpoint the previous step
                guard.roll_back()
                _stop(t, _checkpoint(t, run, state, nonfinite, dataset), state, progress, stop["signal"])
            if t.ema is not None:
                t.ema.update(t.raw_model)
            nonfinite.update(result.skipped)
            state.step += 1
            progress.advance()

            log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps
            if log_now or device.type == "cpu":
                nonfinite.check(state, cfg.train.max_nonfinite_steps, result.logs)
            if log_now:
                values = logged_values(t, result, state, progress.images_per_second(), skip_log)
                acc.log(values, step=state.step)
                if acc.is_main_process:
                    run.log_metrics(state.step, values)
                progress.show({**bar_figures(values, x.shape[-3:], t.raw_model), **validation.bar})
            if cfg.train.image_every and state.step % cfg.train.image_every == 0 and acc.is_main_process:
                log_reconstruction(acc, x, result, state.step)
            if validation.due(state.step):
                nonfinite.read(state)  # the best checkpoint's counters
                validation.run(state, progress.bar)

            stop_requested = stop_vote(stop["signal"] is not None)
            if skip_log is not None:
                state.skipped_images = skip_log.count
            checkpoint_due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            if checkpoint_due or stop_requested or state.step == cfg.train.max_steps:
                path = _checkpoint(t, run, state, nonfinite, dataset)
                if stop_requested:
                    _stop(t, path, state, progress, stop["signal"])
    progress.close()
    return _finish(t, run, state, skip_log, trained=True)


def resumed_state(t: Training, run: RunFolder, resume_from: Path | None, dataset: Any, workers: int) -> TrainingState:
    """The state to start from (the checkpoint's, loaded into the modules and optimizers, or a fresh one), its data
    layout checked; the config and the metrics log written (the first files of a fresh run)."""
    acc, state = t.accelerator, TrainingState()
    if resume_from is not None:
        state = run.load_checkpoint(resume_from, *t.checkpoint_parts())
        acc.print(f"resumed from {resume_from} at step {state.step}")
    if dataset is not None and state.step < t.cfg.train.max_steps:  # before anything is written
        keep_data_layout(state, dataset, acc.num_processes, workers, resume_from, t.cfg.train.batch_size)
    if acc.is_main_process:
        save_config(t.cfg, run.config_file)
        run.start_metrics(state.step)
    return state


def data_from(t: Training, dataset: Any, state: TrainingState, workers: int) -> tuple[Any, Iterator[dict], Any]:
    """(dataset, its batches from the run's position `state.batches_seen`, its skip log or None); the dataset is
    built from data.* when not given."""
    cfg, acc = t.cfg, t.accelerator
    dataset = dataset if dataset is not None else build_dataset(cfg.data, split=cfg.data.split)
    batches = training_batches(dataset, cfg.train.batch_size, cfg.train.seed, acc.process_index, acc.num_processes,
                               state.batches_seen, workers)
    return dataset, batches, getattr(dataset, "skipped", None)


class Progress:
    """The progress bar (main process only) and the images trained since the last log step (throughput)."""

    def __init__(self, t: Training, state: TrainingState):
        self.bar = None
        if t.accelerator.is_main_process:
            self.bar = tqdm(total=t.cfg.train.max_steps, initial=state.step, desc="train", dynamic_ncols=True)
        self.since, self.images = time.perf_counter(), 0

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def images_per_second(self) -> float:
        """Since the last call (or the start); starts the next interval."""
        now = time.perf_counter()
        rate = self.images / max(now - self.since, 1e-9)
        self.since, self.images = now, 0
        return rate

    def show(self, figures: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(figures)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _checkpoint(t: Training, run: RunFolder, state: TrainingState, nonfinite: NonFiniteCounter, dataset: Any) -> Path:
    """`state` with its skip counters and shard counts, saved. With several processes the shard counts are a
    collective: every rank checkpoints here."""
    nonfinite.read(state)
    state.shard_counts = gathered_shard_counts(dataset)
    return save_checkpoint(t, run, state)


def _stop(t: Training, checkpoint: Path, state: TrainingState, progress: Progress, signal_name: str | None) -> NoReturn:
    """End a run stopped by a signal, its checkpoint written: TrainingInterrupted."""
    progress.close()
    t.accelerator.end_training()
    raise TrainingInterrupted(checkpoint, state.step, signal_name)


def log_reconstruction(acc: Any, x: torch.Tensor, result: StepResult, step: int) -> None:
    """The step's inputs (or EQ-VAE's transformed targets) beside their reconstructions, to the trackers."""
    shown = x if result.target is None else result.target
    log_images(acc, "reconstruction", image_grid(shown.detach(), result.reconstruction.detach()), step)


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


def keep_data_layout(state: TrainingState, dataset: Any, world: int, workers: int, resume_from: Path | None,
                     batch_size: int) -> None:
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
    if state.batch_size and state.batch_size != batch_size:
        raise RunFolderError(f"{where} counted its data position in batches of {state.batch_size} images per process "
                             f"and this run uses {batch_size}: set train.batch_size={state.batch_size}")
    state.processes, state.data_workers, state.batch_size = world, streams, batch_size
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
