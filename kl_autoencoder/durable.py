"""Durable writes: a file or folder appears complete at its final path or not at all.

Everything is written beside its destination under a hidden temporary name, flushed to disk, and renamed over the
destination (a rename replaces a symlink at the destination rather than writing through it). Files end with the
permissions a plain `open(path, "w")` would give them under the process umask, never the 0600 of a temporary file.

Nothing is replaced that the toolkit did not write (`check_replaceable_dir` / `check_replaceable_file`): an existing
model folder is replaced only when it is a previous export (`is_previous_export`: an autoencoder's `config.json` and
weights files named as diffusers names them, nothing else) or when the caller passes `overwrite=True`; `/`, the home
folder, the current directory, a folder holding any of them and a folder holding the source of the write are refused
even then. The swap removes only the entries it saw at its last check: a file created in the old folder after that
is kept (in the old folder, moved aside and named in a warning), never deleted.

Sharing a folder: `lock_folder` flocks an output folder for one writing run (a second fails at once), and
`write_exclusive` publishes a file that never replaces one another writer published.

Reading: `check_regular_file` refuses a FIFO, device or socket before anything opens it (an open would block, or
read without end).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Collection, Sequence
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


class NotRegularFileError(ValueError):
    """A path the toolkit would read is a FIFO, device, socket or folder, not a regular file."""


def check_regular_file(path: str | os.PathLike, what: str = "",
                       error: type[Exception] = NotRegularFileError) -> None:
    """Raise `error` (one line naming `path`) when `path`, followed through links, exists and is not a regular file.

    Call before opening anything for reading: opening a FIFO blocks until a writer comes (inside safetensors or
    pyarrow, where no signal can stop it), and a device reads without end. A missing path is left to the caller."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a folder"
                if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise error(f"{what + ' ' if what else ''}{path} is {kind}, not a regular file; refusing to read it")


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


def try_lock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without waiting. False when another process holds it: `fd` is then closed,
    and the caller says who is busy in its own words."""
    import fcntl  # POSIX only; imported here so the module loads anywhere

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    return True


class EncodeFolderBusy(ValueError):
    """Another run holds the output folder's lock."""


def lock_folder(folder: Path, what: str = "encode") -> int:
    """flock the folder itself (non-blocking; no lock file is left behind): the descriptor to pass to
    `unlock_folder`, or EncodeFolderBusy when another run holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    if not try_lock(fd):
        raise EncodeFolderBusy(f"another {what} is writing to {folder} (it holds the folder's lock); wait for it to "
                               "finish, or choose another --out") from None
    return fd


def unlock_folder(folder: Path, fd: int, created: bool, leftovers: Collection[str] = ()) -> None:
    """Drop the lock; a folder this run created and left without an output (empty, or holding only the run's own
    `leftovers`, file names such as a record of what it was asked) is removed again."""
    os.close(fd)
    if created and folder.is_dir() and {p.name for p in folder.iterdir()} <= set(leftovers):
        for name in leftovers:
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()


def write_exclusive(path: Path, write_fn: Callable[[Path], None]) -> Path:
    """A complete file or none, never replacing another writer's (FileExistsError when `path` exists)."""
    return atomic_write(path, write_fn, exclusive=True)


def atomic_write(path: str | Path, write_fn: Callable[[Path], None], exclusive: bool = False) -> Path:
    """Call `write_fn(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    `exclusive`: publish with `os.link` instead, which fails (FileExistsError) when `path` exists, so the file never
    replaces one another writer published."""
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
        if exclusive:
            os.link(tmp, path)
        else:
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
                     check_fn: Callable[[Path], None] | None = None, *, overwrite: bool = False,
                     protect: Sequence[str | Path] = ()) -> Path:
    """Fill a temporary folder beside `path`, check it, then swap it in; an existing `path` is replaced only on success.

    `check_fn(tmp_folder)` runs on the complete temporary folder before the swap: raising there leaves the previous
    `path` untouched. What may be replaced is decided by `check_replaceable_dir(path, overwrite, protect)`, before
    anything is written and again right before the swap; on any failure or refusal nothing is left behind (neither
    the temporary folder nor parent folders this call created).
    """
    path = Path(path)
    check_replaceable_dir(path, overwrite, protect)
    created = _make_parents(path.parent)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        write_fn(tmp)
        normalize_modes(tmp)
        fsync_tree(tmp)
        if check_fn is not None:
            check_fn(tmp)
        check_replaceable_dir(path, overwrite, protect)  # again: the folder may have changed while we wrote
        _swap_in(tmp, path, _entries(path, overwrite))
    except BaseException:  # SIGTERM arrives as a BaseException in the CLI: clean up for it too
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    fsync_dir(path.parent)
    return path


def _entries(path: Path, overwrite: bool) -> set[str]:
    """What the swap may delete of the folder `path`: every entry with `overwrite`, else only an export's files (a
    file the check did not see is never among them); none for a link, a file or nothing."""
    if path.is_symlink() or not path.is_dir():
        return set()
    names = {entry.name for entry in os.scandir(path)}
    return names if overwrite else {name for name in names if name == EXPORT_CONFIG or EXPORT_FILE.fullmatch(name)
                                    or (name == EXPORT_CARD and _is_toolkit_card_file(path / name))}


def _swap_in(tmp: Path, path: Path, checked: set[str]) -> None:
    """Rename `tmp` to `path`; a previous folder there is moved aside first and put back if the rename fails.

    Of the previous folder only the entries `checked` (seen at the last check) are deleted: anything another process
    created there since is kept, in the moved-aside folder, which a warning names."""
    if path.is_symlink():
        path.unlink()  # the link itself, never what it points to
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))  # a fresh name: no clash
    try:
        os.replace(path, old)  # a folder renamed over the empty `old`
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    for name in checked:
        entry = old / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        warnings.warn(f"{path} was replaced, but files created in it during the replacement were kept in {old} "
                      f"({', '.join(sorted(os.listdir(old))[:5])}); move them back yourself", stacklevel=3)


def _make_parents(folder: Path) -> list[Path]:
    """`mkdir -p folder`, returning the folders it created (outermost first) so a failure can remove them again."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


# --------------------------------------------------------------------------------------------------------------------
# What may be replaced

EXPORT_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
EXPORT_CONFIG = "config.json"
# The files of an export, by name: diffusers' weights (fp16 etc. variants, shards and their index) and the TAESD
# single files a tiny export carries. Any other name, even `*.safetensors`, may be the user's.
EXPORT_FILE = re.compile(r"diffusion_pytorch_model(\.[A-Za-z0-9_]{1,16})?(-\d{5}-of-\d{5})?\.(safetensors|bin)"
                         r"(\.index\.json)?|(tiny|taesd)_(encoder|decoder)\.safetensors")
EXPORT_CARD = "README.md"  # the model card an export carries (model_card.py): ours only when it is the toolkit's
CARD_TAG = "tags: [kl-autoencoder,"  # in the front matter of every card the toolkit writes
_CONFIG_LIMIT = 1 << 20  # an export's config.json is a few hundred bytes


class OutputRefused(ValueError):
    """An output path the toolkit will not replace; the message says why and what to pass instead."""


def path_candidates(path: str | Path) -> set[Path]:
    """`path` made absolute: with only its parent resolved (a link at `path` is replaced, not followed), and fully."""
    plain = Path(os.path.abspath(Path(path).expanduser()))
    candidates = {plain, plain.resolve()}
    if plain.name:
        candidates.add(plain.parent.resolve() / plain.name)
    return candidates


def holds(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


def protected_reason(path: str | Path, protect: Sequence[str | Path] = ()) -> str | None:
    """Why `path` may never be replaced, even with overwrite (None: it may be): it is or holds `/`, the home folder,
    the current directory or one of `protect` (the sources of the write)."""
    guarded = [("the root folder", Path("/")), ("the home folder", Path.home()), ("the current directory", Path.cwd())]
    guarded += [("the source", Path(p)) for p in protect]
    targets = path_candidates(path)
    for label, guard in guarded:
        for kept in path_candidates(guard):
            if any(holds(target, kept) for target in targets):
                return f"it is or holds {label} ({kept})"
    return None


def is_toolkit_card(text: str) -> bool:
    """Whether a README.md's text is a model card this toolkit wrote (CARD_TAG in its YAML front matter)."""
    return text.startswith("---\n") and CARD_TAG in text.split("\n---", 1)[0]


def _is_toolkit_card_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return is_toolkit_card(f.read(4096).decode("utf-8", "replace"))
    except OSError:
        return False


def is_previous_export(folder: str | Path) -> bool:
    """True for what the toolkit's exports leave: a folder holding an autoencoder's `config.json`, weights files
    named as diffusers names them (`EXPORT_FILE`) and the model card the toolkit wrote, and nothing else: no subfolder,
    no link, no other file (so not `thesis.bin`, `my-finetune-step50000.safetensors` or a user's README.md). An empty
    folder counts too."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if not entries:
        return True
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            return False
        if entry.name == EXPORT_CARD and _is_toolkit_card_file(Path(entry.path)):
            continue
        if entry.name != EXPORT_CONFIG and not EXPORT_FILE.fullmatch(entry.name):
            return False
    config = Path(folder) / EXPORT_CONFIG
    try:
        if config.stat().st_size > _CONFIG_LIMIT:
            return False
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("_class_name") in EXPORT_CLASSES


def check_replaceable_dir(path: str | Path, overwrite: bool = False, protect: Sequence[str | Path] = ()) -> None:
    """Raise `OutputRefused` unless a model folder may be written at `path`.

    Refused always: `/`, the home folder, the current directory, any folder holding one of them or one of `protect`,
    and a plain file at `path`. Refused unless `overwrite`: an existing folder that is not a previous export. A symlink
    at `path` is replaced by the folder (the link goes; what it points to is never touched).
    """
    path = Path(path)
    reason = protected_reason(path, protect)
    if reason is not None:
        raise OutputRefused(f"refusing to write the model folder {path}: {reason}; choose another folder "
                            "(--overwrite does not change this)")
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir():
        raise OutputRefused(f"refusing to replace {path}: it is a file, not a model folder; remove it yourself or "
                            "choose another path")
    if not overwrite and not is_previous_export(path):
        raise OutputRefused(f"refusing to replace {path}: it holds more than a previous export ({EXPORT_CONFIG} and "
                            "weights files); pass --overwrite (overwrite=True in Python) to replace it, or choose "
                            "another folder")


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def check_replaceable_file(path: str | Path, overwrite: bool = False, protect: Sequence[str | Path] = ()) -> None:
    """Raise `OutputRefused` unless a single weights file may be written at `path`: never over a folder or a source
    (`protect`), and over an existing file only when it is a safetensors file or `overwrite` is given."""
    path = Path(path)
    for kept in (k for p in protect for k in path_candidates(p)):
        if kept in path_candidates(path):
            raise OutputRefused(f"refusing to write {path}: it is the source of this conversion; choose another path")
    if path.is_symlink() or not path.exists():
        return
    if path.is_dir():
        raise OutputRefused(f"refusing to write {path}: it is a folder; choose a file name")
    if not overwrite and not (path.is_file() and _looks_like_safetensors(path)):
        raise OutputRefused(f"refusing to replace {path}: it is not a safetensors file; pass --overwrite "
                            "(overwrite=True in Python) to replace it, or choose another path")
