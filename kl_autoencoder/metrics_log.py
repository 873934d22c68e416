"""The run's logs on disk: `metrics.jsonl` (one JSON line per logged step) and `summary.json`.

On resume the log keeps its complete lines up to the checkpoint's step (the steps after it are trained, and logged,
again); each line is appended without following a symlink; the summary is written atomically. The run folder
(`run_folder.py`, above this room) says where the files are; this room knows only the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kl_autoencoder.durable import atomic_write_json, atomic_write_text
from kl_autoencoder.run_errors import RunFolderError


def start_metrics(metrics_file: Path, start_step: int) -> None:
    """Keep the complete lines of an earlier metrics.jsonl up to `start_step` (the rest is trained again)."""
    if metrics_file.is_symlink():  # replaced, never read or appended through
        metrics_file.unlink()
    if metrics_file.exists():
        if not metrics_file.is_file():
            raise RunFolderError(f"{metrics_file} is not a regular file; move it away")
        atomic_write_text(metrics_file, kept_metric_lines(metrics_file.read_text(), start_step))


def log_metrics(metrics_file: Path, step: int, values: dict[str, float]) -> None:
    """Append one step's figures as a JSON line."""
    # O_NOFOLLOW: a symlink planted after the start fails the write instead of appending elsewhere
    fd = os.open(metrics_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


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


def write_summary(summary_file: Path, summary: dict[str, Any]) -> None:
    """The run's summary.json (steps, skipped images, non-finite steps, perceptual weights, export, best step)."""
    atomic_write_json(summary_file, summary)
