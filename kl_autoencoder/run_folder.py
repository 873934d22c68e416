"""The run folder: everything a training run writes, owned by one object.

    output_dir/
      .lock                     held (flock) while a run writes here: a second run on the folder fails at once
      config.yaml               the run's resolved config
      metrics.jsonl             one JSON line per logged step (TensorBoard events under tensorboard/)
      checkpoints/step_0000300/ a complete checkpoint (written as .tmp-step_0000300, renamed when complete)
      checkpoints/latest        the name of the newest complete checkpoint (moved only after the rename)
      summary.json              steps, skipped images, non-finite steps, perceptual weights, export
      vae/                      the diffusers export

A checkpoint holds safetensors and JSON only, so resuming never unpickles anything: the model, EMA, learned
log-variance and discriminator weights as safetensors, each optimizer as `<name>.safetensors` (its tensors) +
`<name>.json` (hyper-parameters and step counts), and `trainer_state.json`, written last, whose presence marks the
folder complete. The learning rate is a pure function of the step and every random draw of the loop comes from a
generator seeded by (seed, step, rank) or (seed, epoch, position), so no scheduler or RNG state needs saving.
A folder holding any other file is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kl_autoencoder.durable import atomic_write_json, atomic_write_text, fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"  # a checkpoint being written, or an old one being deleted
# What a fresh run may find in its folder without being told to overwrite: nothing of a previous run.
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "vae", "tensorboard")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (another run holds it, it holds someone else's files, ...)."""


@dataclass
class TrainingState:
    """The loop's own counters, saved as JSON in every checkpoint."""

    step: int = 0  # optimizer steps done
    batches_seen: int = 0  # micro-batches consumed by each process (the data position)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive non-finite steps at the end
    skipped_images: int = 0


# ----------------------------------------------------------------------------------------------- checkpoint files


def optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    """An optimizer's state as `<name>.safetensors` (tensors, keyed `<param index>.<field>`) + `<name>.json`."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, fields in state["state"].items():
        for field, value in fields.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{field}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{field}"] = value
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    """Load what `optimizer_to_files` wrote into `optimizer` (same parameters, same order)."""
    meta = json.loads((folder / f"{name}.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(str(folder / f"{name}.safetensors")).items(), *meta["scalars"].items()]:
        index, _, field = key.partition(".")
        state.setdefault(int(index), {})[field] = value
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # The files hold contiguous (NCHW) tensors; give each per-parameter tensor its parameter's layout again. Fused
    # AdamW walks moments and parameters as flat memory: NCHW moments of NHWC (channels_last) weights would be
    # applied to the wrong elements after a resume.
    for param, fields in optimizer.state.items():
        for field, value in fields.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                fields[field] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def allowed_checkpoint_files(modules: dict[str, Any], optimizers: dict[str, Any]) -> set[str]:
    names = {f"{name}.safetensors" for name, module in modules.items() if module is not None}
    for name, optimizer in optimizers.items():
        if optimizer is not None:
            names |= {f"{name}.safetensors", f"{name}.json"}
    return names | {STATE_FILE}


# ----------------------------------------------------------------------------------------------- the folder


class RunFolder:
    """`train.output_dir`: claim it, checkpoint into it, resume from it, log into it, summarise it."""

    def __init__(self, output_dir: str | os.PathLike, is_main: bool = True):
        self.root = Path(output_dir).expanduser()
        self.is_main = is_main
        self._lock_fd: int | None = None

    # -- paths ---------------------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def export_dir(self) -> Path:
        return self.root / "vae"

    # -- claiming ------------------------------------------------------------------------------------------------------
    def claim(self, resuming: bool, overwrite: bool = False) -> None:
        """Create and lock the folder for this run (main process only; call `release` when done).

        A fresh run refuses a folder holding anything unless `overwrite`, which removes only a previous run's
        artefacts (RUN_ARTEFACTS), never other files. Filesystem roots and top-level folders are refused.
        """
        resolved = self.root.resolve()
        if len(resolved.parts) <= 2 or resolved == Path.home().resolve():
            raise RunFolderError(f"train.output_dir={str(self.root)!r} resolves to {resolved}: refusing to train "
                                 "into a filesystem root, a top-level folder or the home folder; name a folder of "
                                 "its own, e.g. outputs/my-run")
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            existing = sorted(p.name for p in self.root.iterdir() if p.name != ".lock")
            if existing and not resuming:
                if not overwrite:
                    listed = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
                    raise RunFolderError(
                        f"train.output_dir={str(self.root)!r} is not empty ({listed}). Continue that run with "
                        "train.resume=latest, choose a new folder, or pass train.overwrite=true to replace a previous "
                        "run's files (other files are never deleted)")
                for name in existing:
                    if name in RUN_ARTEFACTS:
                        path = self.root / name
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"another training run is writing to {self.root} (it holds {self.root / '.lock'}); "
                                 "wait for it to finish or choose another train.output_dir") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def check_disk_space(self, needed: int) -> None:
        """Fail clearly when a checkpoint of `needed` bytes cannot fit (checked at start and before each write)."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        needed = int(needed * 1.1) + (16 << 20)
        if free < needed:
            raise OSError(f"not enough disk space for a checkpoint in {self.root}: need about {needed / 2**20:.0f} "
                          f"MiB, {free / 2**20:.0f} MiB free; free space or lower train.keep_checkpoints")

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def list_checkpoints(self, warn: bool = True) -> list[Path]:
        return list_checkpoints(self.checkpoints, warn)

    def resolve_resume(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None, the `latest` one (pointer file, else the newest complete), or a path."""
        if resume is None:
            return None
        if resume != "latest":
            path = Path(resume).expanduser()
            if not is_complete_checkpoint(path):
                raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE})")
            return path
        pointer = self.checkpoints / "latest"
        if pointer.is_file():
            candidate = self.checkpoints / pointer.read_text().strip()
            if is_complete_checkpoint(candidate):
                self.list_checkpoints()  # still warn about leftovers
                return candidate
            warnings.warn(f"{pointer} names {candidate.name}, which is not a complete checkpoint; using the newest "
                          "complete one", stacklevel=2)
        found = self.list_checkpoints()
        if not found:
            warnings.warn(f"train.resume=latest but no checkpoint in {self.checkpoints}: starting from scratch",
                          stacklevel=2)
            return None
        return found[-1]

    def save_checkpoint(self, state: TrainingState, modules: dict[str, torch.nn.Module | None],
                        optimizers: dict[str, torch.optim.Optimizer | None], keep: int, needed_bytes: int) -> Path:
        """Write a checkpoint into a temporary folder, flush it, rename it into place, move `latest`, prune.

        A kill at any point leaves the previous complete checkpoint and its pointer usable. Main process only.
        """
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{state.step:07d}"
        tmp = self.checkpoints / f"{TMP_PREFIX}{final.name}"
        self.check_disk_space(needed_bytes)
        for stale in self.checkpoints.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run (the lock makes us the only writer)
            logger.info("removing %s left by an interrupted checkpoint write", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            if module is not None:
                tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(tensors, str(tmp / f"{name}.safetensors"))
        for name, optimizer in optimizers.items():
            if optimizer is not None:
                optimizer_to_files(optimizer, tmp, name)
        atomic_write_json(tmp / STATE_FILE, dataclasses.asdict(state))
        fsync_tree(tmp)
        self._publish(tmp, final)
        atomic_write_text(self.checkpoints / "latest", final.name + "\n")
        fsync_dir(self.checkpoints)
        older = [path for path in self.list_checkpoints(warn=False) if path != final]
        for old in older[:max(0, len(older) - (keep - 1))]:  # never the checkpoint just written
            remove_folder(old)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the complete temporary folder into place (durable before `latest` names it)."""
        if final.exists():  # re-reached after resuming from an older pointer
            remove_folder(final)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)

    @staticmethod
    def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module | None],
                        optimizers: dict[str, torch.optim.Optimizer | None]) -> TrainingState:
        """Load a checkpoint into the given modules and optimizers; refuse folders holding anything unexpected."""
        allowed = allowed_checkpoint_files(modules, optimizers)
        present = {p.name for p in path.iterdir()}
        unexpected = sorted(present - allowed)
        if unexpected:
            raise RunFolderError(
                f"checkpoint {path} holds files this trainer never writes ({', '.join(unexpected[:5])}); refusing to "
                "resume from it (a checkpoint may contain only safetensors weights and JSON state, and resuming "
                f"loads no pickle). Expected only: {', '.join(sorted(allowed))}")
        missing = sorted(allowed - present)
        if missing:
            raise RunFolderError(f"checkpoint {path} lacks {', '.join(missing)}: was it written with another "
                                 "configuration (EMA, GAN, learned log-variance)?")
        for name, module in modules.items():
            if module is not None:
                module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
        for name, optimizer in optimizers.items():
            if optimizer is not None:
                optimizer_from_files(optimizer, path, name)
        return TrainingState(**json.loads((path / STATE_FILE).read_text()))

    # -- logs ----------------------------------------------------------------------------------------------------------
    def start_metrics(self, start_step: int) -> None:
        """Keep the complete lines of an earlier metrics.jsonl up to `start_step` (the rest is trained again)."""
        if self.metrics_file.exists():
            atomic_write_text(self.metrics_file, kept_metric_lines(self.metrics_file.read_text(), start_step))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_file, summary)


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def list_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoint folders, oldest first; incomplete ones (interrupted writes) are reported and ignored."""
    if not root.is_dir():
        return []
    complete = []
    for path in sorted(root.iterdir()):
        interrupted = path.name.startswith(TMP_PREFIX) or (path.name.startswith(CHECKPOINT_PREFIX)
                                                            and not is_complete_checkpoint(path))
        if interrupted:
            if warn:
                warnings.warn(f"ignoring incomplete checkpoint folder {path} (interrupted write)", stacklevel=2)
        elif path.name.startswith(CHECKPOINT_PREFIX):
            complete.append(path)
    return sorted(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_folder(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted folder that looks complete:
    rename it to a temp name first (atomic), then delete."""
    trash = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
