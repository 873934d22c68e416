"""The run folder: everything a training run writes, owned by one object.

    output_dir/
      .lock                     held (flock) while a run writes here: a second run on the folder fails at once;
                                removed when the run ends
      .kl-autoencoder-run       written when a run claims the folder: the evidence that its files are ours
      config.yaml               the run's resolved config
      metrics.jsonl             one JSON line per logged step (TensorBoard events under tensorboard/)
      checkpoints/step_0000300/ a complete checkpoint (written as .tmp-step_0000300, renamed when complete)
      checkpoints/latest        the name of the newest complete checkpoint (moved only after the rename)
      checkpoints/best_step_0000200/  with validation.keep_best: the checkpoint with the best validation figure
                                (its best.json says which), written as the others, never pruned with them
      summary.json              steps, skipped images, non-finite steps, perceptual weights, export, best step
      vae/                      the diffusers export (vae-best/: the best checkpoint's, on request)

A checkpoint holds safetensors and JSON only, so resuming never unpickles anything: the model, EMA, learned
log-variance and discriminator weights as safetensors, each optimizer as `<name>.safetensors` (its tensors) +
`<name>.json` (hyper-parameters and step counts), and `trainer_state.json`, written last, whose presence marks the
folder complete. The learning rate is a pure function of the step and every random draw of the loop comes from a
generator seeded by (seed, step, rank) or (seed, epoch, position), so no scheduler or RNG state needs saving.
A folder holding any other file is refused.

Nothing the toolkit did not write is deleted or written through, and no input is: the run folder may not be, hold or
lie inside the model a run starts from, the teacher or the data (`check_run_inputs`, whatever train.overwrite says).
`train.overwrite=true` removes a previous run's files only where the run marker (or a complete checkpoint) shows the
run was ours, and keeps its `vae/` until the new export replaces it (so a run that fails leaves the old export); a symlink in place of a log, the
lock or the pointer is replaced, never followed, and a symlinked `checkpoints/` (writes and pruning would land
elsewhere) is refused; `checkpoints/latest` must name a checkpoint folder inside `checkpoints/`; and a checkpoint's
JSON is checked for types and finiteness before use. Hyper-parameters come from the config, never the checkpoint:
it supplies state only (weights, moments, step counts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kl_autoencoder.durable import (atomic_write_json, atomic_write_text, check_regular_file, fsync_dir, fsync_tree,
                                    holds, path_candidates, try_lock)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"  # a checkpoint being written, or an old one being deleted
# What a fresh run may find in its folder without being told to overwrite: nothing of a previous run.
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "vae", "vae-best", "tensorboard",
                 "wandb", ".aim")
RUN_MARKER = ".kl-autoencoder-run"  # written at claim: this folder holds (or held) one of our runs
LOCK_FILE = ".lock"
OWN_FILES = (RUN_MARKER, LOCK_FILE)  # never count as "the folder is not empty"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d{{1,12}}")
BEST_PREFIX = "best_"  # checkpoints/best_step_NNNNNNN: the best validation checkpoint
BEST_FILE = "best.json"  # inside it: {"metric", "mode", "value", "step"}
KEPT_UNTIL_EXPORT = "vae"  # the old export stays until a complete new one is swapped in (durable.atomic_write_dir)
# Files of the run that are replaced if they are symlinks (never written through); checkpoints/ is refused instead.
REPLACED_LINKS = ("config.yaml", "metrics.jsonl", "summary.json", "tensorboard")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (another run holds it, it holds someone else's files, ...)."""


class DiskSpaceError(OSError):
    """Not enough free disk space for a checkpoint."""


@dataclass
class TrainingState:
    """The loop's own counters, saved as JSON in every checkpoint."""

    step: int = 0  # optimizer steps done
    batches_seen: int = 0  # micro-batches consumed by each process (the data position)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive non-finite steps at the end
    skipped_images: int = 0
    processes: int = 0  # the data layout the position is exact for (0: not recorded): processes ...
    data_workers: int = 0  # ... and the DataLoader workers a stream is split among (0: not a stream)
    shard_counts: dict[str, int] = dataclasses.field(default_factory=dict)  # tar shard URL -> samples, for resume


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


OPTIMIZER_FIELDS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's per-parameter state


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, or a one-line RunFolderError (unreadable, not JSON, nested beyond reason)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RunFolderError(f"{path} is not a readable JSON file ({type(err).__name__}: "
                             f"{str(err)[:200]}); refusing to resume from it") from None


def _state_value_ok(key: str, value: Any, params: list[torch.Tensor]) -> bool:
    index, _, field = key.partition(".")
    if not (index.isdigit() and int(index) < len(params) and field in OPTIMIZER_FIELDS):
        return False
    if not torch.is_tensor(value):  # a plain number: only a step count
        return field == "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0
    if not (value.is_floating_point() and bool(torch.isfinite(value).all())):
        return False
    return value.numel() == 1 and float(value) >= 0 if field == "step" else value.shape == params[int(index)].shape


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    """Load what `optimizer_to_files` wrote into `optimizer` (same parameters, same order).

    The files supply state only (moments, step counts), each value checked: finite, of its parameter's shape. The
    hyper-parameters (betas, weight decay, maximize, ...) stay the optimizer's own, i.e. the config's."""
    where = folder / f"{name}.json"
    meta = read_json(where)
    if not (isinstance(meta, dict) and isinstance(meta.get("param_groups"), list)
            and isinstance(meta.get("scalars"), dict)):
        raise RunFolderError(f"{where}: expected an object with a 'param_groups' list and a 'scalars' object")
    groups = optimizer.state_dict()["param_groups"]
    saved = [group.get("params") if isinstance(group, dict) else None for group in meta["param_groups"]]
    if saved != [group["params"] for group in groups]:
        raise RunFolderError(f"{where}: its parameter groups do not match this run's optimizer ({len(saved)} group(s) "
                             f"saved); was the checkpoint written with another configuration?")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(str(folder / f"{name}.safetensors")).items(), *meta["scalars"].items()]:
        if not _state_value_ok(key, value, params):
            shown = (f"a {value.dtype} tensor of shape {list(value.shape)}" if torch.is_tensor(value)
                     else repr(value)[:80])
            raise RunFolderError(f"{where}: optimizer state {key!r} is {shown}: expected a finite AdamW state "
                                 f"({', '.join(OPTIMIZER_FIELDS)}) of a parameter of this model; refusing to resume")
        index, _, field = key.partition(".")
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # The files hold contiguous (NCHW) tensors; give each per-parameter tensor its parameter's layout again. Fused
    # AdamW walks moments and parameters as flat memory: NCHW moments of NHWC (channels_last) weights would be
    # applied to the wrong elements after a resume.
    for param, fields in optimizer.state.items():
        for field, value in fields.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                fields[field] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def read_training_state(path: Path) -> TrainingState:
    """A checkpoint's `trainer_state.json`: known counters only, each a non-negative integer."""
    where = path / STATE_FILE
    data = read_json(where)
    known = [f.name for f in dataclasses.fields(TrainingState)]
    if not isinstance(data, dict):
        raise RunFolderError(f"{where}: expected an object of counters ({', '.join(known)})")
    for key, value in data.items():
        if key not in known:
            raise RunFolderError(f"{where}: unknown entry {key[:80]!r} (expected only {', '.join(known)})")
        if key == "shard_counts":
            if not (isinstance(value, dict) and all(_is_int(n) and 0 <= n < 2**63 for n in value.values())):
                raise RunFolderError(f"{where}: shard_counts must map shard URLs to non-negative integers")
            continue
        if not (_is_int(value) and 0 <= value < 2**63):
            raise RunFolderError(f"{where}: {key} = {repr(value)[:80]} must be a non-negative integer")
    return TrainingState(**data)


def allowed_checkpoint_files(modules: dict[str, Any], optimizers: dict[str, Any]) -> set[str]:
    names = {f"{name}.safetensors" for name, module in modules.items() if module is not None}
    for name, optimizer in optimizers.items():
        if optimizer is not None:
            names |= {f"{name}.safetensors", f"{name}.json"}
    return names | {STATE_FILE}


# ----------------------------------------------------------------------------------------------- the folder


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
    def claim(self, resuming: bool, overwrite: bool = False, asked_to_resume: bool = False) -> None:
        """Create and lock the folder for this run (main process only; call `release` when done).

        A fresh run refuses a folder holding anything unless `overwrite`, which removes only a previous run's
        artefacts (RUN_ARTEFACTS), never other files, and only where the folder shows that run was ours (the marker,
        or a complete checkpoint). `asked_to_resume`: train.resume was set but found no checkpoint (the same rules,
        said so). Filesystem roots and top-level folders are refused.
        """
        try:
            resolved = self.root.resolve()
        except (RuntimeError, OSError) as err:  # a symlink loop
            raise RunFolderError(f"train.output_dir={str(self.root)!r} cannot be resolved ({err})") from None
        if len(resolved.parts) <= 2 or resolved == Path.home().resolve():
            raise RunFolderError(f"train.output_dir={str(self.root)!r} resolves to {resolved}: refusing to train "
                                 "into a filesystem root, a top-level folder or the home folder; name a folder of "
                                 "its own, e.g. outputs/my-run")
        self._refuse_linked_checkpoints()
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._replace_links()
            existing = sorted(p.name for p in self.root.iterdir() if p.name not in OWN_FILES)
            if existing and not resuming:
                if not overwrite:
                    raise RunFolderError(self._not_empty_message(existing, asked_to_resume))
                self._remove_previous_run(existing)
            if not (self.root / RUN_MARKER).is_file() or (self.root / RUN_MARKER).is_symlink():
                atomic_write_json(self.root / RUN_MARKER, {"written_by": "kl-autoencoder", "purpose": "marks a "
                                  "training run folder; train.overwrite=true replaces only folders that hold it"})
        except BaseException:
            self.release()
            raise

    def _not_empty_message(self, existing: list[str], asked_to_resume: bool) -> str:
        listed = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
        if asked_to_resume:
            return (f"train.resume=latest found no complete checkpoint in {self.checkpoints}, and "
                    f"train.output_dir={str(self.root)!r} is not empty ({listed}): refusing to train from scratch "
                    "over it. Choose a new folder, or pass train.overwrite=true to replace a previous run's files "
                    "(other files are never deleted)")
        return (f"train.output_dir={str(self.root)!r} is not empty ({listed}). Continue that run with "
                "train.resume=latest, choose a new folder, or pass train.overwrite=true to replace a previous run's "
                "files (other files are never deleted)")

    def holds_our_run(self) -> bool:
        """Evidence that this folder's run artefacts were written by this toolkit: the marker written at claim, or
        (runs from before the marker) a complete checkpoint in a real `checkpoints/` folder."""
        marker = self.root / RUN_MARKER
        if marker.is_file() and not marker.is_symlink():
            return True
        return not self.checkpoints.is_symlink() and bool(self.list_checkpoints(warn=False))

    def _remove_previous_run(self, existing: list[str]) -> None:
        ours = [name for name in existing if name in RUN_ARTEFACTS]
        if ours and not self.holds_our_run():
            raise RunFolderError(
                f"train.overwrite=true: {self.root} holds {', '.join(ours)} but nothing shows a kl-autoencoder run "
                f"wrote them (no {RUN_MARKER}, no complete checkpoint): refusing to delete files this toolkit may not "
                "have written. Choose a new train.output_dir, or move those files away yourself")
        for name in ours:
            path = self.root / name
            if name == KEPT_UNTIL_EXPORT:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:  # a file, or a link (removed itself, never what it points to)
                path.unlink()

    def _refuse_linked_checkpoints(self) -> None:
        """A symlinked checkpoints/ would have checkpoints written, and old ones pruned, wherever it points."""
        if self.checkpoints.is_symlink():
            raise RunFolderError(f"{self.checkpoints} is a symlink (to {os.readlink(self.checkpoints)}): checkpoints "
                                 "would be written and pruned there. Make it a real folder (move the checkpoints "
                                 "in), or choose another train.output_dir")

    def _replace_links(self) -> None:
        """Run files that are symlinks are replaced (the link removed, nothing it points to touched), never written
        through; config.yaml, summary.json and vae/ are replaced at write time anyway."""
        self._refuse_linked_checkpoints()
        for name in REPLACED_LINKS:
            path = self.root / name
            if path.is_symlink():
                warnings.warn(f"{path} is a symlink (to {os.readlink(path)}); replacing the link, not writing "
                              "through it", stacklevel=3)
                path.unlink()

    def _lock(self) -> None:
        path = self.root / LOCK_FILE
        if path.is_symlink():  # never ours: locking through it would create or lock a file elsewhere
            path.unlink()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise RunFolderError(f"cannot open the run lock {path}: {err}") from None
        if not try_lock(fd):
            raise RunFolderError(f"another training run is writing to {self.root} (it holds {self.root / '.lock'}); "
                                 "wait for it to finish or choose another train.output_dir") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock and remove the (empty) lock file, so a finished run folder holds only the run's files."""
        if self._lock_fd is None:
            return
        path = self.root / LOCK_FILE
        try:  # only the file this descriptor locks: never a file another run put in its place
            if os.path.samestat(os.fstat(self._lock_fd), os.lstat(path)):
                path.unlink()  # still locked: a run starting now makes a new file; this one writes nothing more
        except OSError:
            pass  # already gone, or unreadable: the lock itself is what matters
        os.close(self._lock_fd)  # closing the descriptor drops the flock
        self._lock_fd = None

    def check_disk_space(self, needed: int) -> None:
        """Fail clearly (DiskSpaceError) when a checkpoint of `needed` bytes cannot fit (checked at start, before
        anything is written, and before each write)."""
        folder = self.root
        while not folder.is_dir() and folder != folder.parent:  # the folder may not exist yet: ask its parent
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        needed = int(needed * 1.1) + (16 << 20)
        if free < needed:
            raise DiskSpaceError(f"not enough disk space for a checkpoint in {self.root}: need about "
                                 f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; free space or lower "
                                 "train.keep_checkpoints")

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
        self._refuse_linked_checkpoints()
        pointer = self.checkpoints / "latest"
        if pointer.is_file() and not pointer.is_symlink():
            candidate = self._pointed_checkpoint(pointer)
            if is_complete_checkpoint(candidate):
                self.list_checkpoints()  # still warn about leftovers
                return candidate
            warnings.warn(f"{pointer} names {candidate.name}, which is not a complete checkpoint; using the newest "
                          "complete one", stacklevel=2)
        found = self.list_checkpoints()
        if not found:
            warnings.warn(f"train.resume=latest but no checkpoint in {self.checkpoints}: a fresh run (refused if the "
                          "folder holds anything)", stacklevel=2)
            return None
        return found[-1]

    def _pointed_checkpoint(self, pointer: Path) -> Path:
        """The folder `checkpoints/latest` names: a plain step_NNNNNNN inside checkpoints/, never a path or a link."""
        with open(pointer, "rb") as f:
            name = f.read(256).decode("utf-8", "replace").strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise RunFolderError(f"{pointer} names {name[:80]!r}, not a checkpoint folder inside {self.checkpoints} "
                                 f"({CHECKPOINT_PREFIX}NNNNNNN); refusing to follow it. Delete {pointer} to resume "
                                 "from the newest complete checkpoint")
        candidate = self.checkpoints / name
        if candidate.is_symlink():
            raise RunFolderError(f"{candidate} (named by {pointer}) is a symlink to {os.readlink(candidate)}; refusing "
                                 "to resume from outside the run folder (pass its path as train.resume=PATH if you "
                                 "trust it)")
        return candidate

    def save_checkpoint(self, state: TrainingState, modules: dict[str, torch.nn.Module | None],
                        optimizers: dict[str, torch.optim.Optimizer | None], keep: int, needed_bytes: int) -> Path:
        """Write a checkpoint into a temporary folder, flush it, rename it into place, move `latest`, prune.

        A kill at any point leaves the previous complete checkpoint and its pointer usable. Main process only.
        """
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{state.step:07d}"
        self._write_checkpoint(final, state, modules, optimizers, needed_bytes)
        atomic_write_text(self.checkpoints / "latest", final.name + "\n")
        fsync_dir(self.checkpoints)
        older = [path for path in self.list_checkpoints(warn=False) if path != final]
        for old in older[:max(0, len(older) - (keep - 1))]:  # never the checkpoint just written
            remove_folder(old)
        return final

    def _write_checkpoint(self, final: Path, state: TrainingState, modules: dict[str, torch.nn.Module | None],
                          optimizers: dict[str, torch.optim.Optimizer | None], needed_bytes: int,
                          extra: dict[str, Any] | None = None) -> None:
        """Write a complete checkpoint into a temporary folder (`extra`: JSON files beside the state), flush it and
        rename it to `final`."""
        tmp = self.checkpoints / f"{TMP_PREFIX}{final.name}"
        self.check_disk_space(needed_bytes)
        self._refuse_linked_checkpoints()  # again at write time: the folder may have been swapped since the claim
        for stale in self.checkpoints.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run (the lock makes us the only writer)
            logger.info("removing %s left by an interrupted checkpoint write", stale)
            stale.unlink() if stale.is_symlink() else shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            if module is not None:
                tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(tensors, str(tmp / f"{name}.safetensors"))
        for name, optimizer in optimizers.items():
            if optimizer is not None:
                optimizer_to_files(optimizer, tmp, name)
        for name, value in (extra or {}).items():
            atomic_write_json(tmp / name, value)
        atomic_write_json(tmp / STATE_FILE, dataclasses.asdict(state))
        fsync_tree(tmp)
        self._publish(tmp, final)

    def save_best(self, state: TrainingState, modules: dict[str, torch.nn.Module | None],
                  optimizers: dict[str, torch.optim.Optimizer | None], record: dict[str, Any],
                  needed_bytes: int) -> Path:
        """Write the best checkpoint (`record` as its best.json), then remove the earlier best: a kill at any point
        leaves at least one complete best checkpoint. Main process only."""
        final = self.checkpoints / f"{BEST_PREFIX}{CHECKPOINT_PREFIX}{state.step:07d}"
        self._write_checkpoint(final, state, modules, optimizers, needed_bytes, {BEST_FILE: record})
        for path, _ in self.best_checkpoints():
            if path != final:
                remove_folder(path)
        return final

    def best_checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, best.json) of the complete best checkpoints, oldest step first; unreadable records skipped."""
        found = []
        pattern = re.compile(rf"{BEST_PREFIX}{CHECKPOINT_PREFIX}(\d{{1,12}})")
        for path in sorted(self.checkpoints.glob(f"{BEST_PREFIX}*")) if self.checkpoints.is_dir() else []:
            if path.is_symlink() or not pattern.fullmatch(path.name) or not is_complete_checkpoint(path):
                continue
            try:
                record = read_json(path / BEST_FILE)
            except RunFolderError:
                continue
            if (isinstance(record, dict) and isinstance(record.get("metric"), str) and _is_int(record.get("step"))
                    and isinstance(record.get("value"), float) and math.isfinite(record["value"])):
                found.append((path, record))
        return sorted(found, key=lambda item: item[1]["step"])

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the complete temporary folder into place (durable before `latest` names it)."""
        if final.exists() or final.is_symlink():  # re-reached after resuming from an older pointer
            remove_folder(final)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)

    @staticmethod
    def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module | None],
                        optimizers: dict[str, torch.optim.Optimizer | None]) -> TrainingState:
        """Load a checkpoint into the given modules and optimizers; refuse folders holding anything unexpected."""
        allowed = allowed_checkpoint_files(modules, optimizers)
        present = {p.name for p in path.iterdir()}
        unexpected = sorted(present - allowed - {BEST_FILE})
        if unexpected:
            raise RunFolderError(
                f"checkpoint {path} holds files this trainer never writes ({', '.join(unexpected[:5])}); refusing to "
                "resume from it (a checkpoint may contain only safetensors weights and JSON state, and resuming "
                f"loads no pickle). Expected only: {', '.join(sorted(allowed))}")
        for name in sorted(allowed & present):  # a FIFO would block the read below, beyond any signal
            check_regular_file(path / name, "checkpoint file", RunFolderError)
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
        return read_training_state(path)

    # -- logs ----------------------------------------------------------------------------------------------------------
    def start_metrics(self, start_step: int) -> None:
        """Keep the complete lines of an earlier metrics.jsonl up to `start_step` (the rest is trained again)."""
        if self.metrics_file.is_symlink():  # replaced, never read or appended through
            self.metrics_file.unlink()
        if self.metrics_file.exists():
            if not self.metrics_file.is_file():
                raise RunFolderError(f"{self.metrics_file} is not a regular file; move it away")
            atomic_write_text(self.metrics_file, kept_metric_lines(self.metrics_file.read_text(), start_step))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        # O_NOFOLLOW: a symlink planted after the start fails the write instead of appending elsewhere
        fd = os.open(self.metrics_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "a") as f:
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
        if path.is_symlink():  # not a folder a run wrote: never loaded or pruned through
            if warn and path.name.startswith(CHECKPOINT_PREFIX):
                warnings.warn(f"ignoring {path}: a symlink, not a checkpoint folder of this run", stacklevel=2)
            continue
        interrupted = path.name.startswith(TMP_PREFIX) or (path.name.startswith(CHECKPOINT_PREFIX)
                                                            and not is_complete_checkpoint(path))
        if interrupted:
            if warn:
                warnings.warn(f"ignoring incomplete checkpoint folder {path} (interrupted write)", stacklevel=2)
        elif CHECKPOINT_NAME.fullmatch(path.name):
            complete.append(path)
    return sorted(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_folder(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted folder that looks complete:
    rename it to a temp name first (atomic), then delete. A symlink is removed itself, never what it points to."""
    if path.is_symlink():
        path.unlink()
        return
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
