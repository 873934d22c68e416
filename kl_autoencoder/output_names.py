"""Where a folder command's outputs go: names checked, mapped to distinct PNG paths inside the output folder, and
written atomically.

  - a name from a file (a shard record, an input's path) is trusted for nothing: `name_problem` accepts only a plain
    relative path, bounded in length and depth, without control characters;
  - outputs never collide: `photo.jpg` -> `photo.png`, but a folder with both photo.jpg and photo.png gives
    `photo.png` and `photo.jpg.png` (`output_names`), and no name needs another output as its folder
    (`output_paths`);
  - outputs stay inside the output folder, which may not be (or be inside) the input folder (`check_output_folder`),
    never replace an input (`refuse_overwriting_inputs`), and each is written atomically (`save_png`: a symlink at
    the path is replaced, never written through).

It sits below the latent file format (whose records carry these names) and the encode / decode / reconstruct jobs;
the one rule about an output folder's earlier contents is `outputs.check_output`, below it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Sequence

import torch

from kl_autoencoder.data import tensor_to_image
from kl_autoencoder.durable import atomic_write
from kl_autoencoder.outputs import OutputLocationError, check_output, resolve


# Longest path component accepted in a name: the usual 255-byte file-name limit, less the 14 bytes atomic_write's
# temporary name adds (".NAME.xxxxxxxx.tmp") and a ".png" the output name may gain.
MAX_NAME_BYTES = 255 - 14 - 4
# A whole name (all its components) and its depth: far above any real photo tree, far below what makes a path too long
# to create (PATH_MAX is 4096 on Linux) or nests folders without end.
MAX_PATH_BYTES = 1024
MAX_DEPTH = 32


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: names in error messages come from files and may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a path relative to an output folder, or None when it can.

    Accepted: a relative POSIX path whose every component is a plain file name (what `encode` records for images
    in subfolders, e.g. "sub/b.png"). Refused: non-strings, empty names, absolute paths, "." / ".." / empty
    components, backslashes, NUL bytes and other control characters, components longer than MAX_NAME_BYTES bytes,
    names longer than MAX_PATH_BYTES or more than MAX_DEPTH components deep.
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):  # newlines and escapes garble listings and terminals
        return "contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    if name.count("/") >= MAX_DEPTH:
        return f"is nested {name.count('/') + 1} folders deep (at most {MAX_DEPTH})"
    if "\\" in name:
        return "contains a backslash (a path separator on Windows)"
    if name.startswith("/"):
        return "is an absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"has a {part or 'empty'!r} path component (names must stay inside the output folder)"
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > MAX_NAME_BYTES:
            return f"has a component of {size} bytes (at most {MAX_NAME_BYTES})"
    return None


def output_names(names: Sequence[str]) -> list[str]:
    """The PNG name (relative path) each input name is written to; all distinct, in the order given.

    `dir/photo.jpg` -> `dir/photo.png`. When several inputs would share that name (photo.jpg and photo.png), the
    one already named so keeps it and the others keep their extension in front of ".png": `photo.jpg.png`. Names are
    compared case-insensitively (as macOS and Windows file systems do); a clash this rule cannot separate is an
    OutputLocationError naming both inputs, raised before anything is written.
    """
    plain = [str(PurePosixPath(name).with_suffix(".png")) for name in names]
    claims = Counter(p.casefold() for p in plain)
    planned = [p if claims[p.casefold()] == 1 or p == name else f"{name}.png" for name, p in zip(names, plain)]
    owner: dict[str, str] = {}
    for name, out in zip(names, planned):
        other = owner.setdefault(out.casefold(), name)
        if other != name:
            raise OutputLocationError(f"inputs {short_repr(other)} and {short_repr(name)} would both be written to "
                                      f"{short_repr(out)}; rename one of them")
    return planned


def output_paths(out: Path, names: Sequence[str]) -> list[Path]:
    """`out / name` for each name, refusing (before anything is written) any whose folder resolves outside `out`
    (e.g. a symlinked subfolder), a name that another needs as a folder (`a.png` and `a.png/b.png`, compared
    case-insensitively), and a name whose path on disk is already a folder or passes through a file."""
    root = resolve(out, "output folder")
    folders = {str(parent).casefold() for name in names for parent in PurePosixPath(name).parents}
    paths = []
    for name in names:
        if name.casefold() in folders:
            raise OutputLocationError(f"{short_repr(name)} would be both a file and the folder of another output; rename "
                                      "one of them")
        target = out / name
        folder = resolve(target.parent, "output")
        if folder != root and not folder.is_relative_to(root):
            raise OutputLocationError(f"{short_repr(name)} would be written into {folder}, outside the output folder "
                                      f"{out} (a symlinked subfolder?)")
        _refuse_blocked(out, name)
        paths.append(target)
    return paths


def _refuse_blocked(out: Path, name: str) -> None:
    """Refuse `out/name` when it is already a folder, or one of its folders below `out` is already a file."""
    folder = out
    for part in PurePosixPath(name).parts[:-1]:
        folder = folder / part
        if folder.exists() and not folder.is_dir():
            raise OutputLocationError(f"{short_repr(name)} cannot be written: {folder} is a file, not a folder")
    if (out / name).is_dir():
        raise OutputLocationError(f"{short_repr(name)} cannot be written: {out / name} is a folder")


def check_output_folder(out: str | Path, *inputs: str | Path, kind: str = "input") -> None:
    """Refuse an output folder that is, or lies inside, one of the `inputs` folders, or is the folder holding an input
    file (see outputs.check_output): its outputs would overwrite the inputs, or be read back as inputs by the next
    run. `kind` names the inputs in the error."""
    check_output(out, "", inputs, kind=kind)


def refuse_overwriting_inputs(targets: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Refuse any output path that is (or resolves to) one of the input files."""
    sources = {path.resolve(): path for path in inputs}
    for target in targets:
        source = sources.get(target.resolve())
        if source is not None:
            raise OutputLocationError(f"output {target} is the input file {source}; choose another output folder")


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write an image tensor [3, H, W] in [-1, 1] to `path` as PNG, atomically: the file is complete or absent, and a
    symlink at `path` is replaced by the file, never written through."""

    picture = tensor_to_image(image.cpu())
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
