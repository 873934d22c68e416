"""Experiment trackers: which ones a run reports to (`train.report_to`), through Accelerate's trackers.

    report_to: tensorboard          # the default: events under output_dir/tensorboard/
    report_to: [tensorboard, wandb] # several; "all" = every supported tracker that is installed; "none" = no tracker

A tracker that is not installed is a one-line error naming the package to install, said when the config is loaded
(before any work). The run's config is logged as the trackers' hyper-parameters, flattened to dotted keys
(`optim.lr`). TensorBoard writes into the run folder as before; wandb's offline/online run files go into the run
folder too unless WANDB_DIR says otherwise; mlflow, comet_ml and trackio follow their own settings
(MLFLOW_TRACKING_URI; comet_ml runs offline with COMET_START_ONLINE=false, into COMET_OFFLINE_DIRECTORY; trackio keeps
a local SQLite store under TRACKIO_DIR); aim's repository is the run folder's .aim/. Scalars go through `Accelerator.log`; images and text through `log_images` /
`log_text` here, to every tracker that takes them. Logging images or text never stops training.

This module imports only the standard library at load time: config validation uses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

# name in report_to -> (module that must import, package to pip install)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "trackio": ("trackio", "trackio"),
}
# how each tracker that could go online runs without a network (its own environment variables)
OFFLINE = {"wandb": "WANDB_MODE=offline", "mlflow": "MLFLOW_TRACKING_URI=file:mlruns",
           "comet_ml": "COMET_START_ONLINE=false"}
TENSORBOARD_DIR = "tensorboard"  # the run folder's TensorBoard folder (run_folder.RUN_ARTEFACTS)


class TrackerError(ValueError):
    """An unknown or uninstalled tracker in train.report_to; the message says what to do."""


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def tracker_names(report_to: str | list[str]) -> list[str]:
    """The trackers `report_to` names, in order, without repeats: "all" = every installed one, "none" = none; a
    comma-separated string counts as a list."""
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names: list[str] = []
    for item in (str(i).strip() for i in items):
        expanded = [n for n in TRACKERS if installed(n)] if item == "all" else [] if item == "none" else [item]
        names += [n for n in expanded if n not in names]
    return names


def check_report_to(report_to: str | list[str]) -> None:
    """Every named tracker is known and installed (TrackerError otherwise)."""
    items = [str(i).strip() for i in (report_to.split(",") if isinstance(report_to, str) else report_to)]
    if "none" in items and len(items) > 1:
        raise TrackerError("'none' cannot be combined with other trackers")
    for name in tracker_names(report_to):
        if name not in TRACKERS:
            raise TrackerError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}, all or none")
        if not installed(name):
            raise TrackerError(f"the {name} tracker is not installed: pip install {TRACKERS[name][1]} "
                               "(or leave it out of train.report_to)")


def log_with(cfg: Any) -> list[Any] | None:
    """What `Accelerator(log_with=...)` gets: TensorBoard as a tracker writing to output_dir/tensorboard (its place
    before trackers were configurable), every other tracker by name; None for no tracker."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker(TENSORBOARD_DIR, cfg.train.output_dir) if name == "tensorboard" else name
            for name in tracker_names(cfg.train.report_to)] or None


def init_trackers(accelerator: Any, cfg: Any, hyperparameters: dict[str, Any]) -> None:
    """Start the trackers with `hyperparameters` (the run's config as a nested dict) flattened (main process; a no-op
    without trackers)."""
    kwargs = {}
    if "WANDB_DIR" not in os.environ:  # wandb's run files beside the run's other logs, not in the working folder
        kwargs["wandb"] = {"dir": str(cfg.train.output_dir)}
    try:
        accelerator.init_trackers(cfg.train.tracker_project, config=flat_config(hyperparameters),
                                  init_kwargs=kwargs)
    except Exception as err:  # a missing key or no network: say so in one line, with the offline setting
        names = tracker_names(cfg.train.report_to)
        offline = "; ".join(f"{n}: {OFFLINE[n]}" for n in names if n in OFFLINE)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].strip()
        raise TrackerError(f"train.report_to={','.join(names)}: a tracker did not start: {reason}"
                           + (f" (offline: {offline})" if offline else "")) from err


def image_grid(originals: Any, reconstructions: Any, count: int = 8) -> Any:
    """[3, H, W] grid in [0, 1] for the trackers: originals on the top row, reconstructions below."""
    import torch
    from torchvision.utils import make_grid

    n = min(count, originals.shape[0])
    pairs = torch.cat([originals[:n], reconstructions[:n]]).float().clamp(-1, 1)
    return make_grid((pairs + 1) / 2, nrow=n)


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: scalars kept, lists and None as JSON text (TensorBoard's hparams take nothing else)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def _each_tracker(accelerator: Any, what: str, call: Any) -> None:
    for tracker in getattr(accelerator, "trackers", []):
        try:
            call(tracker)
        except Exception as err:  # a nicety; never stop training for it
            print(f"warning: could not log {what} to {tracker.name}: {err}")


def log_images(accelerator: Any, tag: str, grid: Any, step: int) -> None:
    """An image grid ([3, H, W] in [0, 1]) to every tracker that takes images (main process only)."""
    if not accelerator.is_main_process:
        return
    image = (grid.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()  # HWC uint8

    def one(tracker: Any) -> None:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(image, key=tag.replace("/", "_"), step=step)
        elif tracker.name == "comet_ml":  # Accelerate's comet tracker takes no images; comet takes a PIL one
            from PIL import Image

            tracker.writer.log_image(Image.fromarray(image), name=tag, step=step)
        elif tracker.name == "trackio":  # nor its trackio tracker; trackio.Image wraps one
            import trackio

            tracker.run.log({tag: trackio.Image(image)}, step=step)
        elif tracker.name == "aim":  # one image per tag: aim.Image refuses a list
            tracker.log_images({tag: image}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [image]}, step=step)

    _each_tracker(accelerator, tag, one)


def log_text(accelerator: Any, tag: str, text: str) -> None:
    """A note (which LPIPS weights the run used) to TensorBoard's text tab (main process only)."""
    if not accelerator.is_main_process:
        return
    _each_tracker(accelerator, tag, lambda t: t.writer.add_text(tag, text) if t.name == "tensorboard" else None)
