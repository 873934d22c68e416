"""Durable writes: a file or folder appears complete at its final path or not at all.

Everything is written beside its destination under a hidden temporary name, flushed to disk, and renamed over the
destination (a rename replaces a symlink at the destination rather than writing through it). Files end with the
permissions a plain `open(path, "w")` would give them under the process umask, never the 0600 of a temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def plain_file_mode() -> int:
    """The mode `open(path, 'w')` creates files with under the current umask (0644 with the usual 022)."""
    return 0o666 & ~_umask()


def plain_dir_mode() -> int:
    """The mode `mkdir` creates folders with under the current umask (0755 with the usual 022)."""
    return 0o777 & ~_umask()


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        if path.is_dir():
            fsync_dir(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def normalize_modes(folder: Path) -> None:
    """Give every file and folder under `folder` (and `folder`) the plain-write permissions."""
    file_mode, dir_mode = plain_file_mode(), plain_dir_mode()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


def atomic_write(path: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Call `write_fn(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        os.chmod(tmp, plain_file_mode())  # mkstemp creates 0600; the result should read like any other file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_dir(path: str | Path, write_fn: Callable[[Path], None],
                     check_fn: Callable[[Path], None] | None = None) -> Path:
    """Fill a temporary folder beside `path`, check it, then swap it in; an existing `path` is replaced only on success.

    `check_fn(tmp_folder)` runs on the complete temporary folder before the swap: raising there leaves the previous
    `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        write_fn(tmp)
        normalize_modes(tmp)
        fsync_tree(tmp)
        if check_fn is not None:
            check_fn(tmp)
        if path.exists() or path.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            if path.is_symlink():
                path.unlink()
            else:
                os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)
    return path
