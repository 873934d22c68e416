"""What every sharded source shares: `data.data_files` patterns expanded to shard paths/URLs, a shard's `Sample`,
`ShardError` (a shard that cannot be opened, named), decoding a sample, and `ShardSet`, a list of shards read sample by
sample from any position through the `ShardReader` of their format (webdataset.py, parquet.py).

Patterns follow webdataset's syntax (`::` lists, `${NAME}` from the environment variable WDS_NAME, brace patterns by
`braceexpand`), with the names counted before they are expanded; globs and lists of either work too.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kl_autoencoder.data.cells import decode_hub_value
from kl_autoencoder.data.images import BadImageError, decode_image
from kl_autoencoder.untrusted import MAX_PATTERN_NAMES, pattern_names, shown

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


class ShardError(ValueError):
    """A shard that does not exist or cannot be opened; the message names it."""


def is_url(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def expand_pattern(pattern: str) -> list[str]:
    """webdataset's expansion (`::` lists, `${NAME}` from the environment variable WDS_NAME, brace patterns), with
    the names counted before they are made (at most `MAX_PATTERN_NAMES`) and a missing variable a `ShardError`."""
    import re

    from braceexpand import braceexpand

    names: list[str] = []
    for part in pattern.split("::"):
        for _ in range(10):  # as webdataset: variables may name variables
            substituted = re.sub(r"\$\{(\w+)\}", lambda m: _shard_variable(m.group(1), pattern), part)
            if substituted == part:
                break
            part = substituted
        try:
            count = pattern_names(part)
            if count + len(names) > MAX_PATTERN_NAMES:
                raise ShardError(f"data_files {shown(pattern)} expands to {count:,} shard names, more than "
                                 f"{MAX_PATTERN_NAMES:,}")
            names.extend(braceexpand(part))
        except ValueError as err:  # braceexpand's UnbalancedBracesError
            if isinstance(err, ShardError):
                raise
            raise ShardError(f"data_files {shown(pattern)}: {shown(err)}") from err
    return names


def _shard_variable(name: str, pattern: str) -> str:
    value = os.environ.get(f"WDS_{name}")
    if value is None:
        raise ShardError(f"data_files {shown(pattern)} uses ${{{shown(name)}}}, but the environment variable "
                         f"WDS_{shown(name)} is not set (webdataset reads ${{NAME}} from WDS_NAME)")
    return value


def expand_data_files(data_files: str | Sequence[str]) -> list[str]:
    """Shard paths/URLs from brace patterns (`{00000..00127}`), globs and lists; missing local shards are errors."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    found: list[str] = []
    for pattern in patterns:
        for item in expand_pattern(str(pattern)):
            if is_url(item):
                found.append(item)
                continue
            local = os.path.expanduser(item)
            if glob.has_magic(local):
                matches = sorted(p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
                if not matches:
                    raise ShardError(f"no shard file matches {shown(item)}")
                found.extend(matches)
            elif not os.path.isfile(local):
                raise ShardError(f"shard {shown(item)} does not exist (or is not a file)")
            else:
                found.append(local)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ShardError(f"data_files {data_files!r} names no shard")
    return unique


def shard_files(data_cfg: DataConfig) -> list[str]:
    """The shards of a source that names its format (data.source webdataset/parquet): data.data_files expanded."""
    if data_cfg.data_files is None:
        raise ShardError(f"data.source={data_cfg.source} needs data.data_files "
                         f"(for example shards/{{00000..00127}}.tar)")
    return expand_data_files(data_cfg.data_files)


@dataclass
class Sample:
    """One sample of a shard: its key, the encoded image (None when bad) and, when bad, why."""

    key: str
    value: Any = None
    problem: str | None = None


def decode_sample(sample: Sample, name: str, min_side: int | None = None, local_paths: bool = False):
    """A sample's image as RGB; `BadImageError` naming `name` when the sample is bad (`local_paths`: follow a cell
    that names a local file, see `cells.decode_hub_value`)."""
    if sample.problem is not None:
        raise BadImageError(name, sample.problem)
    if isinstance(sample.value, (bytes, bytearray)):
        return decode_image(bytes(sample.value), name, min_side)
    return decode_hub_value(sample.value, name, local_paths)


def describe(files: Sequence[str]) -> str:
    return json.dumps(list(files)[:3]) + (f" ... ({len(files)} shards)" if len(files) > 3 else "")


class ShardReader:
    """How the shards of one format are read. A subclass is known by its `kind` (the data.source naming the format)
    as soon as its room is imported, so `ShardSet(kind, ...)` needs no list of formats."""

    kind: ClassVar[str] = ""
    counted_by_reading: ClassVar[bool] = False  # counting reads the whole shard (tar): counts are learned and recorded
    readers: ClassVar[dict[str, ShardReader]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        ShardReader.readers[cls.kind] = cls()

    def samples(self, url: str, start: int = 0, image_column: str | None = None) -> Iterator[Sample]:
        """The samples of one shard from the `start`-th on."""
        raise NotImplementedError

    def count(self, url: str) -> int:
        """The samples in one shard, exactly as many as `samples` yields."""
        raise NotImplementedError

    def walk(self, url: str, start: int = 0, image_column: str | None = None) -> Iterator[Sample | None]:
        """Every sample position of a shard: None for the first `start`, then the samples (formats counted by
        reading walk themselves; the others are passed by their count, see `ShardSet.walk`)."""
        raise NotImplementedError


class ShardSet:
    """A list of shards of one kind, read sample by sample from any position; sample counts are cached."""

    def __init__(self, kind: str, files: Sequence[str], image_column: str | None = None, local_paths: bool = False):
        if kind not in ShardReader.readers:
            raise ValueError(f"unknown shard kind {kind!r}; expected one of {tuple(ShardReader.readers)}")
        self.kind, self.files, self.image_column = kind, list(files), image_column
        self.reader = ShardReader.readers[kind]
        self.local_paths = local_paths  # follow parquet cells that name a local file
        self._counts: dict[int, int] = {}
        self._learned: dict[str, int] = {}  # counts found in this process and not yet handed on (`take_learned`)
        self._index: dict[str, int] | None = None  # URL -> position, built when counts are first recorded

    def __len__(self) -> int:
        return len(self.files)

    def samples(self, index: int, start: int = 0) -> Iterator[Sample]:
        return self.reader.samples(self.files[index], start, self.image_column)

    def count(self, index: int) -> int:
        if index not in self._counts:
            url = self.files[index]
            if self.reader.counted_by_reading:
                self.learn(index, self.reader.count(url))  # reads the shard: recorded so no resume reads it again
            else:
                self._counts[index] = self.reader.count(url)  # the file's footer: cheap, never recorded
        return self._counts[index]

    def known_count(self, index: int) -> int | None:
        """A shard's count without reading it: recorded for a tar shard (else None), the footer's for parquet."""
        return self._counts.get(index) if self.reader.counted_by_reading else self.count(index)

    def walk(self, index: int, start: int = 0) -> Iterator[Sample | None]:
        """Every sample position of a shard in order: None for the first `start` (passed unread), then the samples."""
        if self.reader.counted_by_reading:
            return self.reader.walk(self.files[index], start, self.image_column)
        return itertools.chain(itertools.repeat(None, min(start, self.count(index))),
                               self.reader.samples(self.files[index], start, self.image_column))

    def learn(self, index: int, count: int) -> None:
        """A tar shard's sample count, found by reading it to its end (kept unless known; parquet's are in footers)."""
        if self.reader.counted_by_reading and index not in self._counts:
            self._counts[index] = count
            self._learned[self.files[index]] = count

    def take_learned(self) -> dict[str, int]:
        """The counts learned since the last call (by URL): they travel in the batches to the main process."""
        learned, self._learned = self._learned, {}
        return learned

    def known_counts(self) -> dict[str, int]:
        """Every tar shard's count known here, by URL (saved in checkpoints: `record` them to resume reading none)."""
        return {self.files[i]: n for i, n in self._counts.items()} if self.reader.counted_by_reading else {}

    def record(self, counts: dict[str, int] | None) -> None:
        """Counts found elsewhere (a worker's batches, a checkpoint); URLs not in this set are ignored."""
        if counts:
            if self._index is None:
                self._index = {url: i for i, url in enumerate(self.files)}
            self._counts.update({self._index[url]: int(n) for url, n in counts.items() if url in self._index})

    def name(self, index: int, key: str) -> str:
        return f"{self.files[index]}#{key}"
