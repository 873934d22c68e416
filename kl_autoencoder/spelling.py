"""Did-you-mean for data sources: a near miss of a built-in set or of a local path is said at once, naming the option of
the command in use (`--data`, `data.source`), instead of being looked up on the Hugging Face Hub (slow, and its failure
says nothing about the typo). Imports nothing of the project, so config validation and the CLI can both use it."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

BUILT_IN_SOURCES = ("sample", "sample:train", "sample:heldout", "sample:all")  # the built-in photo sets (data/samples.py)
MAX_SIBLINGS = 10_000  # a huge parent folder is not worth scanning for a suggestion


def source_suggestion(source: str, names: tuple[str, ...] = BUILT_IN_SOURCES) -> str | None:
    """What `source` was probably meant to be (one of the built-in `names`, or an existing path beside the one
    given), or None when it exists, is one of `names`, or is near nothing."""
    if not source or source in names or os.path.exists(os.path.expanduser(source)):
        return None
    close = difflib.get_close_matches(source.lower(), names, n=1, cutoff=0.75)
    if close:
        return close[0]
    stripped = source.rstrip("/")
    path = Path(os.path.expanduser(stripped))
    if not path.name or not path.parent.is_dir():
        return None
    try:
        siblings = [entry.name for _, entry in zip(range(MAX_SIBLINGS), os.scandir(path.parent))]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.8)
    if not close:
        return None
    return stripped[: len(stripped) - len(path.name)] + close[0] + source[len(stripped):]  # the user's own spelling


def check_source_spelling(source: str, option: str, names: tuple[str, ...] = BUILT_IN_SOURCES) -> None:
    """Raise ValueError for a near miss (see `source_suggestion`), naming `option`."""
    suggestion = source_suggestion(str(source), names)
    if suggestion is not None:
        raise ValueError(f"{option} {source!r} is neither a built-in photo set nor a local path: did you mean "
                         f"{suggestion!r}? (a Hugging Face Hub dataset: give its full id, owner/name)")
