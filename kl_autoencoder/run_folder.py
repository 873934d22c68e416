"""The run folder: everything a training run writes, owned by one object.

    output_dir/
      .lock                     held (flock) while a run writes here: a second run on the folder fails at once;
                                removed when the run ends
      .kl-autoencoder-run       written when a run claims the folder: the evidence that its files are ours
      config.yaml               the run's resolved config
      metrics.jsonl             one JSON line per logged step (TensorBoard events under tensorboard/)
      checkpoints/              complete checkpoints, the `latest` pointer, the best one (checkpoints.py)
      summary.json              steps, skipped images, non-finite steps, perceptual weights, export, best step
      vae/                      the diffusers export (vae-best/: the best checkpoint's, on request)

This room holds the folder itself: its paths, claiming it (the marker, refusing a non-empty or linked folder,
overwriting only a previous run of ours), the lock, the disk-space check, the inputs it may not touch, and which
checkpoint `train.resume` names. What goes inside has its own room below it: the checkpoints (write, load, list,
prune, the best one) in `checkpoints.py`, metrics.jsonl and summary.json in `metrics_log.py`, the errors in
`run_errors.py`. `RunFolder` is the one object the trainer holds; it hands each job to its room, and the names those
rooms hold are imported from here as before.

Nothing the toolkit did not write is deleted or written through, and no input is: the run folder may not be, hold or
lie inside the model a run starts from, the teacher or the data (`check_run_inputs`, whatever train.overwrite says).
`train.overwrite=true` removes a previous run's files only where the run marker (or a complete checkpoint) shows the
run was ours, and keeps its `vae/` until the new export replaces it (so a run that fails leaves the old export); a
symlink in place of a log, the lock or the pointer is replaced, never followed, and a symlinked `checkpoints/` is
refused; `checkpoints/latest` must name a checkpoint folder inside `checkpoints/`.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from kl_autoencoder import checkpoints as ckpt
from kl_autoencoder import metrics_log
from kl_autoencoder.checkpoints import (BEST_FILE, BEST_PREFIX, CHECKPOINT_NAME, CHECKPOINT_PREFIX,  # noqa: F401
                                        OPTIMIZER_FIELDS, STATE_FILE, TMP_PREFIX, Modules, Optimizers, TrainingState,
                                        allowed_checkpoint_files, is_complete_checkpoint, list_checkpoints,
                                        optimizer_from_files, optimizer_to_files, read_json, read_training_state,
                                        refuse_linked_checkpoints, remove_folder)
from kl_autoencoder.durable import atomic_write_json, holds, path_candidates, try_lock
from kl_autoencoder.metrics_log import kept_metric_lines  # noqa: F401
from kl_autoencoder.run_errors import DiskSpaceError, RunFolderError

# What a fresh run may find in its folder without being told to overwrite: nothing of a previous run.
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "vae", "vae-best", "tensorboard",
                 "wandb", ".aim")
RUN_MARKER = ".kl-autoencoder-run"  # written at claim: this folder holds (or held) one of our runs
LOCK_FILE = ".lock"
OWN_FILES = (RUN_MARKER, LOCK_FILE)  # never count as "the folder is not empty"
KEPT_UNTIL_EXPORT = "vae"  # the old export stays until a complete new one is swapped in (durable.atomic_write_dir)
# Files of the run that are replaced if they are symlinks (never written through); checkpoints/ is refused instead.
REPLACED_LINKS = ("config.yaml", "metrics.jsonl", "summary.json", "tensorboard")


class RunFolder:
    """`train.output_dir`: claim it, checkpoint into it, resume from it, log into it, summarise it."""

    def __init__(self, output_dir: str | os.PathLike, is_main: bool = True):
        self.root = Path(output_dir).expanduser()
        self.is_main = is_main
        self._lock_fd: int | None = None

    # Its paths (read-only, following `root`): what goes in each is described at the top of this module.
    checkpoints = property(lambda self: self.root / "checkpoints")
    config_file = property(lambda self: self.root / "config.yaml")
    metrics_file = property(lambda self: self.root / "metrics.jsonl")
    summary_file = property(lambda self: self.root / "summary.json")
    export_dir = property(lambda self: self.root / "vae")

    def claim(self, resuming: bool, overwrite: bool = False, asked_to_resume: bool = False) -> None:
        """Create and lock the folder for this run (main process only; call `release` when done).

        A fresh run refuses a folder holding anything unless `overwrite`, which removes only a previous run's
        artefacts (RUN_ARTEFACTS), never other files, and only where the folder shows that run was ours (the marker,
        or a complete checkpoint). `asked_to_resume`: train.resume was set but found no checkpoint (the same rules,
        said so). Filesystem roots and top-level folders are refused.
        """
        _refuse_roots(self.root)
        refuse_linked_checkpoints(self.checkpoints)
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.root)
        try:
            _replace_links(self.root)
            existing = sorted(p.name for p in self.root.iterdir() if p.name not in OWN_FILES)
            if existing and not resuming:
                if not overwrite:
                    raise RunFolderError(_not_empty_message(self, existing, asked_to_resume))
                _remove_previous_run(self, existing)
            _mark(self.root)
        except BaseException:
            self.release()
            raise

    def holds_our_run(self) -> bool:
        """Evidence that this folder's run artefacts were written by this toolkit: the marker written at claim, or
        (runs from before the marker) a complete checkpoint in a real `checkpoints/` folder."""
        marker = self.root / RUN_MARKER
        if marker.is_file() and not marker.is_symlink():
            return True
        return not self.checkpoints.is_symlink() and bool(self.list_checkpoints(warn=False))

    def release(self) -> None:
        """Drop the lock and remove the (empty) lock file, so a finished run folder holds only the run's files."""
        if self._lock_fd is not None:
            _unlock(self.root, self._lock_fd)
            self._lock_fd = None

    def check_disk_space(self, needed: int) -> None:
        """Fail clearly (DiskSpaceError) when a checkpoint of `needed` bytes cannot fit (checked at start, before
        anything is written, and before each write)."""
        check_disk_space(self.root, needed)

    def resolve_resume(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None, the `latest` one (pointer file, else the newest complete), or a path."""
        return _resolve_resume(self.checkpoints, resume)

    def list_checkpoints(self, warn: bool = True) -> list[Path]:
        return list_checkpoints(self.checkpoints, warn)

    def save_checkpoint(self, state: TrainingState, modules: Modules, optimizers: Optimizers, keep: int,
                        needed_bytes: int) -> Path:
        """Write a checkpoint, move `latest`, keep the newest `keep` (checkpoints.py). Main process only."""
        self.check_disk_space(needed_bytes)
        return ckpt.save_checkpoint(self.checkpoints, state, modules, optimizers, keep)

    def save_best(self, state: TrainingState, modules: Modules, optimizers: Optimizers, record: dict[str, Any],
                  needed_bytes: int) -> Path:
        """Write the best checkpoint, then remove the earlier best (checkpoints.py). Main process only."""
        self.check_disk_space(needed_bytes)
        return ckpt.save_best(self.checkpoints, state, modules, optimizers, record)

    def best_checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        return ckpt.best_checkpoints(self.checkpoints)

    load_checkpoint = staticmethod(ckpt.load_checkpoint)

    def start_metrics(self, start_step: int) -> None:
        metrics_log.start_metrics(self.metrics_file, start_step)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        metrics_log.log_metrics(self.metrics_file, step, values)

    def write_summary(self, summary: dict[str, Any]) -> None:
        metrics_log.write_summary(self.summary_file, summary)


# ----------------------------------------------------------------------------------------------- claiming


def _refuse_roots(root: Path) -> None:
    """A filesystem root, a top-level folder or the home folder is no run folder (overwrite would empty it)."""
    try:
        resolved = root.resolve()
    except (RuntimeError, OSError) as err:  # a symlink loop
        raise RunFolderError(f"train.output_dir={str(root)!r} cannot be resolved ({err})") from None
    if len(resolved.parts) <= 2 or resolved == Path.home().resolve():
        raise RunFolderError(f"train.output_dir={str(root)!r} resolves to {resolved}: refusing to train "
                             "into a filesystem root, a top-level folder or the home folder; name a folder of "
                             "its own, e.g. outputs/my-run")


def _mark(root: Path) -> None:
    """Write the run marker (again, if a symlink or something else stands in its place)."""
    if not (root / RUN_MARKER).is_file() or (root / RUN_MARKER).is_symlink():
        atomic_write_json(root / RUN_MARKER, {"written_by": "kl-autoencoder", "purpose": "marks a "
                          "training run folder; train.overwrite=true replaces only folders that hold it"})


def _not_empty_message(folder: RunFolder, existing: list[str], asked_to_resume: bool) -> str:
    listed = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
    if asked_to_resume:
        return (f"train.resume=latest found no complete checkpoint in {folder.checkpoints}, and "
                f"train.output_dir={str(folder.root)!r} is not empty ({listed}): refusing to train from scratch "
                "over it. Choose a new folder, or pass train.overwrite=true to replace a previous run's files "
                "(other files are never deleted)")
    return (f"train.output_dir={str(folder.root)!r} is not empty ({listed}). Continue that run with "
            "train.resume=latest, choose a new folder, or pass train.overwrite=true to replace a previous run's "
            "files (other files are never deleted)")


def _remove_previous_run(folder: RunFolder, existing: list[str]) -> None:
    ours = [name for name in existing if name in RUN_ARTEFACTS]
    if ours and not folder.holds_our_run():
        raise RunFolderError(
            f"train.overwrite=true: {folder.root} holds {', '.join(ours)} but nothing shows a kl-autoencoder run "
            f"wrote them (no {RUN_MARKER}, no complete checkpoint): refusing to delete files this toolkit may not "
            "have written. Choose a new train.output_dir, or move those files away yourself")
    for name in ours:
        path = folder.root / name
        if name == KEPT_UNTIL_EXPORT:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:  # a file, or a link (removed itself, never what it points to)
            path.unlink()


def _replace_links(root: Path) -> None:
    """Run files that are symlinks are replaced (the link removed, nothing it points to touched), never written
    through; config.yaml, summary.json and vae/ are replaced at write time anyway."""
    refuse_linked_checkpoints(root / "checkpoints")
    for name in REPLACED_LINKS:
        path = root / name
        if path.is_symlink():
            warnings.warn(f"{path} is a symlink (to {os.readlink(path)}); replacing the link, not writing "
                          "through it", stacklevel=3)
            path.unlink()


# ----------------------------------------------------------------------------------------------- the lock


def _lock(root: Path) -> int:
    """Open and flock the run lock; the descriptor, held until `_unlock`."""
    path = root / LOCK_FILE
    if path.is_symlink():  # never ours: locking through it would create or lock a file elsewhere
        path.unlink()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise RunFolderError(f"cannot open the run lock {path}: {err}") from None
    if not try_lock(fd):
        raise RunFolderError(f"another training run is writing to {root} (it holds {root / '.lock'}); "
                             "wait for it to finish or choose another train.output_dir") from None
    return fd


def _unlock(root: Path, fd: int) -> None:
    """Remove the lock file this descriptor locks (never one another run put in its place), then drop the lock."""
    path = root / LOCK_FILE
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(path)):
            path.unlink()  # still locked: a run starting now makes a new file; this one writes nothing more
    except OSError:
        pass  # already gone, or unreadable: the lock itself is what matters
    os.close(fd)  # closing the descriptor drops the flock


# ----------------------------------------------------------------------------------------------- disk space


def check_disk_space(root: Path, needed: int) -> None:
    """Fail clearly (DiskSpaceError) when a checkpoint of `needed` bytes cannot fit in the run folder `root`."""
    folder = root
    while not folder.is_dir() and folder != folder.parent:  # the folder may not exist yet: ask its parent
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    needed = int(needed * 1.1) + (16 << 20)
    if free < needed:
        raise DiskSpaceError(f"not enough disk space for a checkpoint in {root}: need about "
                             f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; free space or lower "
                             "train.keep_checkpoints")


# ----------------------------------------------------------------------------------------------- resuming


def _resolve_resume(checkpoints: Path, resume: str | None) -> Path | None:
    """RunFolder.resolve_resume (its warnings name the caller of that method)."""
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume).expanduser()
        if not is_complete_checkpoint(path):
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE})")
        return path
    refuse_linked_checkpoints(checkpoints)
    pointer = checkpoints / "latest"
    if pointer.is_file() and not pointer.is_symlink():
        candidate = _pointed_checkpoint(checkpoints, pointer)
        if is_complete_checkpoint(candidate):
            list_checkpoints(checkpoints)  # still warn about leftovers
            return candidate
        warnings.warn(f"{pointer} names {candidate.name}, which is not a complete checkpoint; using the newest "
                      "complete one", stacklevel=3)
    found = list_checkpoints(checkpoints)
    if not found:
        warnings.warn(f"train.resume=latest but no checkpoint in {checkpoints}: a fresh run (refused if the "
                      "folder holds anything)", stacklevel=3)
        return None
    return found[-1]


def _pointed_checkpoint(checkpoints: Path, pointer: Path) -> Path:
    """The folder `checkpoints/latest` names: a plain step_NNNNNNN inside checkpoints/, never a path or a link."""
    with open(pointer, "rb") as f:
        name = f.read(256).decode("utf-8", "replace").strip()
    if not CHECKPOINT_NAME.fullmatch(name):
        raise RunFolderError(f"{pointer} names {name[:80]!r}, not a checkpoint folder inside {checkpoints} "
                             f"({CHECKPOINT_PREFIX}NNNNNNN); refusing to follow it. Delete {pointer} to resume "
                             "from the newest complete checkpoint")
    candidate = checkpoints / name
    if candidate.is_symlink():
        raise RunFolderError(f"{candidate} (named by {pointer}) is a symlink to {os.readlink(candidate)}; refusing "
                             "to resume from outside the run folder (pass its path as train.resume=PATH if you "
                             "trust it)")
    return candidate


# ----------------------------------------------------------------------------------------------- inputs


def _local_part(value: str) -> str:
    """The part of a path or shard pattern that names a place on disk: up to its first brace or glob character."""
    head = re.split(r"[{*?\[]", value, maxsplit=1)[0]
    return head if head == value else os.path.dirname(head)


def check_run_inputs(output_dir: str | os.PathLike, inputs: dict[str, Any]) -> None:
    """Refuse (RunFolderError) a run folder that is, holds or lies inside one of `inputs` (config key -> path, paths
    or shard patterns; hub ids, URLs and names not on disk are skipped): the export and train.overwrite=true replace
    the run folder's files, so an input there would be destroyed. No flag changes this."""
    root = str(output_dir)
    for key, values in inputs.items():
        for value in [values] if isinstance(values, (str, os.PathLike)) else list(values or []):
            value = str(value)
            local = os.path.expanduser(_local_part(value))
            if "://" in value or value.startswith("pipe:") or not local or not os.path.lexists(local):
                continue
            try:
                targets, sources = path_candidates(root), path_candidates(local)
            except (RuntimeError, OSError):  # a symlink loop: the claim says so
                continue
            if any(holds(target, source) for target in targets for source in sources):
                raise RunFolderError(
                    f"{key}={value!r} is inside train.output_dir={root!r}: a run replaces that folder's files (its "
                    "export, a previous run's files), which would destroy it. Choose another train.output_dir, or "
                    "move the input out of it first")
            if os.path.isdir(local) and any(holds(source, target) for target in targets for source in sources):
                raise RunFolderError(f"train.output_dir={root!r} is inside {key}={value!r}: the run's files would be "
                                     "mixed with it; choose a folder outside it")
