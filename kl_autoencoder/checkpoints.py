"""Checkpoints: the files of one, writing and publishing it, loading it, listing the complete ones, pruning the
old ones, and the best validation checkpoint.

    checkpoints/step_0000300/ a complete checkpoint (written as .tmp-step_0000300, renamed when complete)
    checkpoints/latest        the name of the newest complete checkpoint (moved only after the rename)
    checkpoints/best_step_0000200/  with validation.keep_best: the checkpoint with the best validation figure
                              (its best.json says which), written as the others, never pruned with them

A checkpoint holds safetensors and JSON only, so resuming never unpickles anything: the model, EMA, learned
log-variance and discriminator weights as safetensors, each optimizer as `<name>.safetensors` (its tensors) +
`<name>.json` (hyper-parameters and step counts), and `trainer_state.json`, written last, whose presence marks the
folder complete. The learning rate is a pure function of the step and every random draw of the loop comes from a
generator seeded by (seed, step, rank) or (seed, epoch, position), so no scheduler or RNG state needs saving.
A folder holding any other file is refused, and a checkpoint's JSON is checked for types and finiteness before use.
Hyper-parameters come from the config, never the checkpoint: it supplies state only (weights, moments, step counts).
A symlinked `checkpoints/` is refused (writes and pruning would land elsewhere), and a symlink inside it is never
loaded, pruned or written through.

This room knows one `checkpoints/` folder and nothing else of the run: the run folder (`run_folder.py`, above it)
claims and locks the folder, checks the disk space and resolves `train.resume`, then hands the writing here.
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

from kl_autoencoder.durable import atomic_write_json, atomic_write_text, check_regular_file, fsync_dir, fsync_tree
from kl_autoencoder.run_errors import RunFolderError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"  # a checkpoint being written, or an old one being deleted
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d{{1,12}}")
BEST_PREFIX = "best_"  # checkpoints/best_step_NNNNNNN: the best validation checkpoint
BEST_FILE = "best.json"  # inside it: {"metric", "mode", "value", "step"}
Modules = dict[str, torch.nn.Module | None]  # what a checkpoint holds: weights by name (None: not in this run) ...
Optimizers = dict[str, torch.optim.Optimizer | None]  # ... and optimizer states by name


@dataclass
class TrainingState:
    """The loop's own counters, saved as JSON in every checkpoint."""

    step: int = 0  # optimizer steps done
    batches_seen: int = 0  # micro-batches consumed by each process (the data position)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive non-finite steps at the end
    skipped_images: int = 0
    processes: int = 0  # the data layout the position is exact for (0: not recorded): processes ...
    data_workers: int = 0  # ... the DataLoader workers a stream is split among (0: not a stream) ...
    batch_size: int = 0  # ... and the images per micro-batch and process that batches_seen counts
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


# ----------------------------------------------------------------------------------------------- the checkpoints folder


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


def refuse_linked_checkpoints(checkpoints: Path) -> None:
    """A symlinked checkpoints/ would have checkpoints written, and old ones pruned, wherever it points."""
    if checkpoints.is_symlink():
        raise RunFolderError(f"{checkpoints} is a symlink (to {os.readlink(checkpoints)}): checkpoints "
                             "would be written and pruned there. Make it a real folder (move the checkpoints "
                             "in), or choose another train.output_dir")


# ----------------------------------------------------------------------------------------------- writing and loading


def save_checkpoint(checkpoints: Path, state: TrainingState, modules: Modules, optimizers: Optimizers,
                    keep: int) -> Path:
    """Write a checkpoint into a temporary folder, flush it, rename it into place, move `latest`, prune to `keep`.

    A kill at any point leaves the previous complete checkpoint and its pointer usable. Main process only.
    """
    final = checkpoints / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    write_checkpoint(final, state, modules, optimizers)
    atomic_write_text(checkpoints / "latest", final.name + "\n")
    fsync_dir(checkpoints)
    older = [path for path in list_checkpoints(checkpoints, warn=False) if path != final]
    for old in older[:max(0, len(older) - (keep - 1))]:  # never the checkpoint just written
        remove_folder(old)
    return final


def write_checkpoint(final: Path, state: TrainingState, modules: Modules, optimizers: Optimizers,
                     extra: dict[str, Any] | None = None) -> None:
    """Write a complete checkpoint into a temporary folder beside `final` (`extra`: JSON files beside the state),
    flush it and rename it to `final`."""
    checkpoints = final.parent
    tmp = checkpoints / f"{TMP_PREFIX}{final.name}"
    refuse_linked_checkpoints(checkpoints)  # again at write time: the folder may have been swapped since the claim
    for stale in checkpoints.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run (the lock makes us the only writer)
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
    publish(tmp, final)


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete temporary folder into place (durable before `latest` names it)."""
    if final.exists() or final.is_symlink():  # re-reached after resuming from an older pointer
        remove_folder(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def load_checkpoint(path: Path, modules: Modules, optimizers: Optimizers) -> TrainingState:
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


# ----------------------------------------------------------------------------------------------- the best checkpoint


def save_best(checkpoints: Path, state: TrainingState, modules: Modules, optimizers: Optimizers,
              record: dict[str, Any]) -> Path:
    """Write the best checkpoint (`record` as its best.json), then remove the earlier best: a kill at any point
    leaves at least one complete best checkpoint. Main process only."""
    final = checkpoints / f"{BEST_PREFIX}{CHECKPOINT_PREFIX}{state.step:07d}"
    write_checkpoint(final, state, modules, optimizers, {BEST_FILE: record})
    for path, _ in best_checkpoints(checkpoints):
        if path != final:
            remove_folder(path)
    return final


def best_checkpoints(checkpoints: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, best.json) of the complete best checkpoints, oldest step first; unreadable records skipped."""
    found = []
    pattern = re.compile(rf"{BEST_PREFIX}{CHECKPOINT_PREFIX}(\d{{1,12}})")
    for path in sorted(checkpoints.glob(f"{BEST_PREFIX}*")) if checkpoints.is_dir() else []:
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
