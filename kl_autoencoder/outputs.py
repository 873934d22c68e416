"""Where a command may write: one rule for every command that writes files (encode, decode, reconstruct, sample,
interpolate, evaluate, distill), checked by `check_output` before any work.

  - `--out` may not be an input, nor a folder the command reads, nor lie inside one, nor hold one (a folder output
    may also not be the folder holding an input file: its outputs would land among the inputs, and `--overwrite`
    could delete them);
  - `--out` must resolve (a symlink loop is a clear error), and be a folder, or absent, for a folder output;
  - a folder already holding earlier outputs of the same command (files named as that command names its outputs)
    is refused unless told to replace them (`--overwrite`): a second run never silently replaces some of them and
    keeps the rest;
  - at write time `safe_parent` re-checks every folder between `--out` and the file: a folder swapped for a symlink
    after the check is refused, never written through.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class OutputLocationError(ValueError):
    """An output that would land outside its folder, on an input, on another output, or among earlier outputs."""


def resolve(path: str | Path, what: str) -> Path:
    """`path` resolved, or an OutputLocationError naming `what` (a symlink loop raises RuntimeError or OSError)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:
        raise OutputLocationError(f"{what} {path}: cannot be resolved ({err}); is it a symlink loop?") from None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def earlier_outputs(out: Path, patterns: Iterable[str]) -> list[Path]:
    """Files (or symlinks) in `out` matching any glob `pattern` (relative to `out`), sorted, each once."""
    if not out.is_dir():
        return []
    found = {path for pattern in patterns for path in out.glob(pattern) if path.is_file() or path.is_symlink()}
    return sorted(found)


def _refuse_inputs(out: Path, target: Path, inputs: Sequence[str | Path], file_output: bool, kind: str) -> None:
    shown = f"output {out}" if file_output else f"output folder {out}"
    for source in inputs:
        source = Path(source).expanduser()
        if not (source.exists() or source.is_symlink()):
            continue  # a hub id, "sample": nothing on disk to protect
        where = resolve(source, kind)
        if source.is_dir():
            inside = not file_output and target.is_relative_to(where)
            if target == where or inside:
                relation = "is" if target == where else "is inside"
                raise OutputLocationError(f"{shown} {relation} the {kind} folder {source}: its files would be "
                                          "overwritten or mixed with the outputs; choose a folder outside it")
        elif target == where:
            raise OutputLocationError(f"{shown} is the {kind} file {source}; choose another output")
        elif not file_output and target == where.parent:
            raise OutputLocationError(f"{shown} is the folder holding the {kind} {source}: the outputs would be "
                                      f"mixed with the {kind}s; choose another folder")
        if not file_output and where != target and where.is_relative_to(target):
            raise OutputLocationError(f"{shown} holds the {kind} {source}: the outputs would replace or mix with its "
                                      f"files; choose a folder that does not hold the {kind}s")


def check_output(out: str | Path, command: str, inputs: Sequence[str | Path] = (), earlier: Iterable[str] = (),
                 overwrite: bool = False, file_output: bool = False, noun: str = "file", why: str = "",
                 kind: str = "input") -> list[Path]:
    """The output rule of every command; returns the earlier outputs found, for the caller to replace or remove.

    `inputs`: what the command reads (folders, files; names not on disk are ignored). `earlier`: glob patterns,
    relative to `out`, naming this command's outputs (`noun` names one in the message, `why` says what mixing them
    would do). `file_output`: `out` is a file (interpolate), whose earlier output is the file itself. `kind` names
    the inputs in messages ("input", "latents").
    """
    out = Path(out).expanduser()
    target = resolve(out, "output")
    _refuse_inputs(out, target, inputs, file_output, kind)
    if file_output:
        if out.is_dir():
            raise OutputLocationError(f"output {out} is a folder; name a file")
        found = [out] if out.is_file() or out.is_symlink() else []
    else:
        if out.exists() and not out.is_dir():
            raise OutputLocationError(f"output folder {out} is a file, not a folder")
        found = earlier_outputs(out, earlier)
    if found and not overwrite:
        if file_output:
            holds, instead = f"{out} already exists", "path"
        else:
            more = ", ..." if len(found) > 1 else ""
            holds = f"{out} already holds {_plural(len(found), noun)} ({found[0].relative_to(out).as_posix()}{more})"
            instead = "folder"
        raise OutputLocationError(
            f"{holds} from an earlier {command}{'; ' + why if why else ''}. Choose a new or empty {instead}, or "
            f"replace {'it' if len(found) == 1 else 'them'} (--overwrite)")
    return found


def safe_parent(root: Path, path: Path) -> Path:
    """Create the folders between `root` and `path` (at write time), refusing any that is a symlink or a file.

    `root` itself is the user's `--out` and may be a link they made; below it every folder must be our own."""
    root = Path(root)
    relative = Path(path).relative_to(root)
    folder = root
    root.mkdir(parents=True, exist_ok=True)
    for part in relative.parts[:-1]:
        folder = folder / part
        if folder.is_symlink():
            raise OutputLocationError(f"{folder} is a symlink (to {os.readlink(folder)}); refusing to write "
                                      "through it")
        if folder.exists() and not folder.is_dir():
            raise OutputLocationError(f"{folder} is a file, but {relative.as_posix()} needs it to be a folder")
        folder.mkdir(exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        raise OutputLocationError(f"{path} is a folder; cannot write the file {relative.as_posix()} there")
    return path


def remove_earlier(found: Sequence[Path]) -> None:
    """Delete the earlier outputs `check_output` found (links themselves, never what they point to)."""
    for path in found:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
