"""Sharded sources: WebDataset tar shards and parquet files streamed, `save_to_disk` folders map-style.

    data.source: webdataset                     # img2dataset-style tars: 000123.jpg, 000123.txt, ...
    data.data_files: shards/{00000..00127}.tar  # brace pattern, glob, or a list of either; local paths or URLs
    data.source: parquet                        # parquet files with an image column (bytes, or {"bytes", "path"})
    data.source: path/to/saved                  # a `datasets` save_to_disk folder

Why our own thin reader over `datasets`' webdataset builder: (1) `datasets` reads a tar in one piece, so a shard
truncated at its end aborts the whole stream, and we want it skipped and counted like a corrupt JPEG; (2) its
resumable state (`IterableDataset.state_dict()`) lives in each DataLoader worker and needs torchdata's
StatefulDataLoader (not a dependency) plus a per-rank gather into the checkpoint. Here the stream's position is a pure
function of the number the trainer already saves (`batches_seen`), as for folders, so resume needs nothing new in
the checkpoint. We use the `webdataset` library for what it standardises: its pattern syntax (`::` lists, `${NAME}`
from WDS_NAME, brace patterns by `braceexpand`, counted here before they are expanded), `gopen` (http://, pipe:, s3
via pipe) for remote shards, and its sample grouping rule (`__key__` = the member name up to the first dot of its
base name). Parquet files are read with pyarrow (the engine under `datasets`); `data.streaming: false` on
parquet, and every `save_to_disk` folder, go through `datasets` as map-style datasets (memory-mapped Arrow).

The stream (`ShardStream`): every epoch the shard list is shuffled (seeded by (seed, epoch)); rank r takes every
world-th shard from r, and DataLoader worker w takes every W-th of those from w, so within an epoch every sample is
read by exactly one worker of one rank. Each worker runs its own endless sequence of epochs through a shuffle buffer
(`data.shuffle_buffer` encoded samples, webdataset's `shuffle`; its draws seeded by (seed, rank, worker, position)),
so the DataLoader's round-robin makes batch b come from worker b mod W, and after `batches_seen` batches worker w has
produced a known number of samples. A resumed stream recomputes which samples its buffer held and reads on from the
oldest of them, passing earlier shards by their sample counts: tar shards' counts travel from the workers in the
batches and are saved in the checkpoint (`trainer_state.json`), so a resume opens no shard it has consumed (remote
`pipe:`/http shards are not downloaded again), and nothing is decoded twice. Exact resume therefore needs the same
processes, DataLoader workers, batch size, buffer and shards as the run that wrote the checkpoint; the trainer refuses
another number of processes or workers.

Bad members (corrupt image, a sample without an image, a shard truncated mid-member) become skipped items counted in
the batch like a folder's bad files; a shard that cannot be opened at all is a `ShardError` naming it. A shard may
come from someone else: only the member a sample uses is read, and sizes are bounded before anything is read
(untrusted.py: member and cell bytes, parquet unpacked sizes, array pixels); cells naming local files are followed
only with `data.allow_local_paths`.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kl_autoencoder.data import (
    IMAGE_EXTENSIONS, BadImageError, ImageTransform, SkipLog, decode_hub_value, decode_image, find_image_column,
)
from kl_autoencoder.durable import check_regular_file
from kl_autoencoder.untrusted import (
    MAX_PATTERN_NAMES, arrow_cell_problem, parquet_file_problem, parquet_row_group_problem, pattern_names, shown,
    too_many_bytes,
)

logger = logging.getLogger(__name__)

SHARD_SOURCES = ("webdataset", "parquet")
TAR_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # member extensions read as the image
PARQUET_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")  # img2dataset writes "jpg"
PARQUET_BATCH_ROWS = 64


class ShardError(ValueError):
    """A shard that does not exist or cannot be opened; the message names it."""


def is_url(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A `datasets` save_to_disk folder (a Dataset's state.json, or a DatasetDict's dataset_dict.json)."""
    root = Path(path).expanduser()
    return (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()


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


# --------------------------------------------------------------------------------------------- reading one shard


@dataclass
class Sample:
    """One sample of a shard: its key, the encoded image (None when bad) and, when bad, why."""

    key: str
    value: Any = None
    problem: str | None = None


def _sample_key(name: str) -> tuple[str | None, str]:
    """webdataset's grouping rule: ("dir/000123", "jpg") for "dir/000123.jpg"; (None, "") for names without a dot."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key, (ext or "")


def _is_image_ext(ext: str) -> bool:
    return ext.lower() in TAR_IMAGE_EXTENSIONS or ext.lower().rsplit(".", 1)[-1] in TAR_IMAGE_EXTENSIONS


def _wanted(ext: str, members: dict[str, bytes | None], image_ext: str | None) -> bool:
    """Whether a member is read: the sample's image (`image_ext`, else its first image member); nothing else."""
    if image_ext is not None:
        return ext == image_ext
    return _is_image_ext(ext) and not any(data is not None for data in members.values())


def _pick_image(members: dict[str, bytes | None], image_ext: str | None) -> tuple[str | None, str | None]:
    """(extension of the image member, problem) for one tar sample; members passed unread hold None."""
    if image_ext is not None:
        return (image_ext, None) if members.get(image_ext) is not None else (None, f"no .{shown(image_ext)} member")
    for ext, data in members.items():
        if data is not None and _is_image_ext(ext):
            return ext, None
    names = ", ".join(shown(ext, 40) for ext in sorted(members)[:20]) + (" ..." if len(members) > 20 else "")
    return None, f"no image member (has: {names or 'nothing'})"


def _open_tar(url: str) -> tarfile.TarFile:
    """A local shard opened for seeking (skipped members are never read), a remote one as a stream."""
    try:
        if is_url(url):
            import webdataset

            return tarfile.open(fileobj=webdataset.gopen(url, "rb"), mode="r|*")
        check_regular_file(url, "shard", ShardError)
        return tarfile.open(url, mode="r:*")
    except (OSError, tarfile.TarError, EOFError) as err:
        reason = " ".join(str(err).split())  # tarfile's "r:*" lists every compression it tried, one per line
        raise ShardError(f"cannot open shard {url}: not a readable tar file ({type(err).__name__}: {reason})") from err


def tar_samples(url: str, start: int = 0, image_ext: str | None = None) -> Iterator[Sample]:
    """The samples of one tar shard from the `start`-th on (earlier samples are passed by their headers only).

    Members are grouped by key as webdataset groups them (consecutive members sharing a key); names starting with
    `__` and non-files are ignored. A shard that ends mid-member yields its last sample as bad and stops."""
    return (sample for sample in _walk_tar(url, start, image_ext) if sample is not None)


def count_tar_samples(url: str) -> int:
    """Samples in a tar shard, exactly as many as `tar_samples` yields, from headers alone."""
    return sum(1 for _ in _walk_tar(url, start=1 << 62))


def _walk_tar(url: str, start: int, image_ext: str | None = None) -> Iterator[Sample | None]:
    """Every sample of a shard in order: None for the first `start` (headers only), then the samples themselves."""
    tar = _open_tar(url)
    position, key, members, problem = 0, None, {}, None

    def flush() -> Sample | None:
        if position < start:
            return None
        if problem:
            return Sample(key, None, problem)
        ext, missing = _pick_image(members, image_ext)
        return Sample(key, members.get(ext) if ext else None, missing)

    try:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                # between members: what was read is whole, only the end of the shard is missing
                logger.warning("shard %s is truncated or damaged after %d sample(s) (%s: %s)", shown(url), position + 1,
                               type(err).__name__, shown(err))
                break
            if member is None:
                break
            name_key, ext = _sample_key(member.name)
            if not member.isfile() or name_key is None or os.path.basename(member.name).startswith("__"):
                continue
            if name_key != key:
                if key is not None:
                    yield flush()
                    position += 1
                key, members, problem = name_key, {}, None
            if position < start:
                continue  # counted by its key, never read
            if problem or not _wanted(ext, members, image_ext):
                members.setdefault(ext, None)  # a caption, a second image: passed by its header, never read
                continue
            problem = too_many_bytes(member.size, f"member {shown(member.name)}")
            if problem:
                continue  # the sample is bad; the member is passed unread
            try:
                data = tar.extractfile(member).read(member.size)
                if len(data) != member.size:
                    raise tarfile.ReadError(f"{shown(member.name)}: {len(data)} of {member.size} bytes")
                members[ext] = data
            except (tarfile.TarError, OSError, EOFError) as err:
                problem = f"shard truncated inside {shown(member.name)} ({type(err).__name__}: {shown(err)})"
                break
        if key is not None:
            yield flush()
    finally:
        tar.close()


def _parquet_file(url: str):
    import pyarrow.parquet as pq

    if not is_url(url):
        check_regular_file(url, "parquet shard", ShardError)
    try:
        if is_url(url):
            import fsspec

            return pq.ParquetFile(fsspec.open(url, "rb").open())
        return pq.ParquetFile(url)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ShardError(f"cannot open parquet shard {url}: {type(err).__name__}: {err}") from err


def parquet_image_column(schema: Any, image_column: str | None, where: str) -> str:
    """The image column of a parquet schema: `image_column`, a `datasets` Image feature, else a usual name."""
    import datasets

    names = list(schema.names)
    listed = ", ".join(shown(name, 60) for name in names[:20]) + (f" ... ({len(names)} columns)" if len(names) > 20
                                                                   else "")
    if image_column is not None:
        if image_column not in names:
            raise ShardError(f"{where}: no column {shown(image_column)} (columns: {listed})")
        return image_column
    try:
        return find_image_column(datasets.Features.from_arrow_schema(schema), None)
    except (KeyError, ValueError, TypeError):
        for name in PARQUET_IMAGE_COLUMNS:
            if name in names:
                return name
    raise ShardError(f"{where}: no image column (none of type Image, none named {', '.join(PARQUET_IMAGE_COLUMNS)}); "
                     f"its columns are {listed}: set data.image_column")


def parquet_samples(url: str, start: int = 0, image_column: str | None = None) -> Iterator[Sample]:
    """Rows of one parquet shard from the `start`-th on (row groups before it are not read); key: a "key" column
    (img2dataset's) when there is one, else the row number."""
    pf = _parquet_file(url)
    column = parquet_image_column(pf.schema_arrow, image_column, url)
    has_key = "key" in pf.schema_arrow.names and column != "key"
    row, groups = 0, []
    for group in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if row + rows > start:
            groups.append(group)
        else:
            row += rows
    if not groups:
        return
    columns = [column, "key"] if has_key else [column]
    try:
        for group in groups:
            rows = pf.metadata.row_group(group).num_rows
            problem = parquet_row_group_problem(pf.metadata, group, set(columns))
            if problem:  # every row of the group is bad, counted as such; none is read
                for skipped in range(max(row, start), row + rows):
                    yield Sample(str(skipped), None, f"row group {group}: {problem}")
                row += rows
                continue
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=columns):
                for index in range(batch.num_rows):
                    if row >= start:
                        yield _parquet_row(batch, index, row, column, has_key)
                    row += 1
    except Exception as err:  # a damaged page: the rest of this shard is lost, the stream goes on
        yield Sample(f"{row}", None, f"parquet shard damaged at row {row} ({type(err).__name__}: {shown(err)})")


def _parquet_row(batch: Any, index: int, row: int, column: str, has_key: bool) -> Sample:
    """One row of a parquet batch as a Sample; its cells are checked (`arrow_cell_problem`) before they become
    Python objects."""
    cells = [batch.column(i).slice(index, 1) for i in range(batch.num_columns)]
    problems = [arrow_cell_problem(cell) for cell in cells]
    key = str(row)
    if has_key and problems[1] is None and cells[1].null_count == 0:
        key = str(cells[1].to_pylist()[0])
    if problems[0] or problems[-1]:
        where = "key" if problems[0] is None else shown(column)
        return Sample(key, None, f"column {where}: {problems[0] or problems[-1]}")
    value = cells[0].to_pylist()[0]
    return Sample(key, value, None if value is not None else f"no value in column {shown(column)}")


def check_parquet_bounds(pf: Any, url: str) -> None:
    """A `ShardError` naming the file when any column of any row group would unpack to too much (see untrusted.py):
    `datasets` converts whole files into an Arrow cache, so one bomb anywhere would fill the disk."""
    for group in range(pf.metadata.num_row_groups):
        problem = parquet_row_group_problem(pf.metadata, group)
        if problem:
            raise ShardError(f"parquet file {shown(url)}, row group {group}: {problem}")
    problem = parquet_file_problem(pf.metadata)
    if problem:
        raise ShardError(f"parquet file {shown(url)}: {problem}")


def count_parquet_samples(url: str) -> int:
    return _parquet_file(url).metadata.num_rows


def decode_sample(sample: Sample, name: str, min_side: int | None = None, local_paths: bool = False):
    """A sample's image as RGB; `BadImageError` naming `name` when the sample is bad (`local_paths`: follow a cell
    that names a local file, see `data.decode_hub_value`)."""
    if sample.problem is not None:
        raise BadImageError(name, sample.problem)
    if isinstance(sample.value, (bytes, bytearray)):
        return decode_image(bytes(sample.value), name, min_side)
    return decode_hub_value(sample.value, name, local_paths)


# --------------------------------------------------------------------------------------------- the stream


class ShardSet:
    """A list of shards of one kind, read sample by sample from any position; sample counts are cached."""

    def __init__(self, kind: str, files: Sequence[str], image_column: str | None = None, local_paths: bool = False):
        if kind not in SHARD_SOURCES:
            raise ValueError(f"unknown shard kind {kind!r}; expected one of {SHARD_SOURCES}")
        self.kind, self.files, self.image_column = kind, list(files), image_column
        self.local_paths = local_paths  # follow parquet cells that name a local file
        self._counts: dict[int, int] = {}
        self._learned: dict[str, int] = {}  # counts found in this process and not yet handed on (`take_learned`)
        self._index: dict[str, int] | None = None  # URL -> position, built when counts are first recorded

    def __len__(self) -> int:
        return len(self.files)

    def samples(self, index: int, start: int = 0) -> Iterator[Sample]:
        if self.kind == "webdataset":
            return tar_samples(self.files[index], start, self.image_column)
        return parquet_samples(self.files[index], start, self.image_column)

    def count(self, index: int) -> int:
        if index not in self._counts:
            url = self.files[index]
            if self.kind == "webdataset":
                self.learn(index, count_tar_samples(url))  # reads the shard: recorded so no resume reads it again
            else:
                self._counts[index] = count_parquet_samples(url)  # the file's footer: cheap, never recorded
        return self._counts[index]

    def known_count(self, index: int) -> int | None:
        """A shard's count without reading it: recorded for a tar shard (else None), the footer's for parquet."""
        return self._counts.get(index) if self.kind == "webdataset" else self.count(index)

    def walk(self, index: int, start: int = 0) -> Iterator[Sample | None]:
        """Every sample position of a shard in order: None for the first `start` (passed unread), then the samples."""
        if self.kind == "webdataset":
            return _walk_tar(self.files[index], start, self.image_column)
        return itertools.chain(itertools.repeat(None, min(start, self.count(index))),
                               parquet_samples(self.files[index], start, self.image_column))

    def learn(self, index: int, count: int) -> None:
        """A tar shard's sample count, found by reading it to its end (kept unless known; parquet's are in footers)."""
        if self.kind == "webdataset" and index not in self._counts:
            self._counts[index] = count
            self._learned[self.files[index]] = count

    def take_learned(self) -> dict[str, int]:
        """The counts learned since the last call (by URL): they travel in the batches to the main process."""
        learned, self._learned = self._learned, {}
        return learned

    def known_counts(self) -> dict[str, int]:
        """Every tar shard's count known here, by URL (saved in checkpoints: `record` them to resume reading none)."""
        return {self.files[i]: n for i, n in self._counts.items()} if self.kind == "webdataset" else {}

    def record(self, counts: dict[str, int] | None) -> None:
        """Counts found elsewhere (a worker's batches, a checkpoint); URLs not in this set are ignored."""
        if counts:
            if self._index is None:
                self._index = {url: i for i, url in enumerate(self.files)}
            self._counts.update({self._index[url]: int(n) for url, n in counts.items() if url in self._index})

    def name(self, index: int, key: str) -> str:
        return f"{self.files[index]}#{key}"


def epoch_shards(num_shards: int, seed: int, epoch: int, rank: int, world: int, worker: int, workers: int,
                 shuffle: bool = True) -> list[int]:
    """The shards worker `worker` of rank `rank` reads in `epoch`: a seeded permutation, every world-th, every W-th."""
    if shuffle:
        order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    else:
        order = list(range(num_shards))
    return order[rank::world][worker::workers]


def usable_workers(num_shards: int, world: int, workers: int) -> int:
    """DataLoader workers that all get a shard on every rank (at least 1, the main process when `workers` is 0)."""
    per_rank = num_shards // world
    if per_rank == 0:
        raise ShardError(f"{num_shards} shard(s) cannot feed {world} processes: each process needs at least one shard")
    return max(1, min(workers, per_rank))


SHUFFLE_DRAWS = 1 << 16  # slot draws per seeded chunk of a shuffle buffer


def shuffle_slots(key: Sequence[int], size: int, chunk: int) -> np.ndarray:
    """The slots a worker's shuffle buffer of `size` empties for outputs chunk * SHUFFLE_DRAWS onwards (SHUFFLE_DRAWS
    of them): a pure function of `key` (seed, rank, worker) and `chunk`, so any position can be recomputed."""
    if size == 1:
        return np.zeros(SHUFFLE_DRAWS, np.int64)
    return np.random.default_rng([*key, chunk]).integers(0, size, SHUFFLE_DRAWS)


def buffer_after(outputs: int, size: int, key: Sequence[int]) -> np.ndarray:
    """The input index each slot of a shuffle buffer holds after `outputs` outputs, computed without reading anything.

    The buffer starts with inputs 0..size-1 in slots 0..size-1, and output t empties slot s_t and refills it with
    input size + t: a slot holds size + the last t that drew it, or its first input if none did."""
    if size == 1:
        return np.array([outputs])
    last = np.full(size, -1, np.int64)
    for chunk in range(-(-outputs // SHUFFLE_DRAWS)):
        first = chunk * SHUFFLE_DRAWS
        slots = shuffle_slots(key, size, chunk)[:outputs - first]
        drawn, at_reversed = np.unique(slots[::-1], return_index=True)  # the last draw of each slot in this chunk
        last[drawn] = first + len(slots) - 1 - at_reversed
    return np.where(last < 0, np.arange(size), last + size)


class ShardStream(IterableDataset):
    """Endless training items from a `ShardSet`, this rank's and this worker's share, from a resume position.

    Items are those of `data.ImageDataset` ({"pixel_values", "path", "skipped"}) plus "key", "epoch" and
    "shard_counts" (tar shards whose sample count this worker found, for the main process to record); each item's
    random crop/flip is seeded by (seed, epoch, shard, sample), so a resumed run sees the same crops.

    With `shuffle_buffer` > 1 (training) each worker passes its samples through a shuffle buffer of that many
    encoded samples (webdataset's `shuffle`, decoded when they leave it): output t takes the sample in slot s_t and
    puts the next sample read there, s_t drawn from (seed, rank, worker, t). A resume recomputes which samples the
    buffer held (`buffer_after`) and reads them again from the oldest one's shard on; nothing is decoded twice."""

    def __init__(self, shards: ShardSet, transform: ImageTransform, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None, shuffle_buffer: int = 0):
        super().__init__()
        self.shards, self.transform, self.resolution = shards, transform, transform.resolution
        self.seed, self.shuffle, self.epochs, self.shuffle_buffer = seed, shuffle, epochs, shuffle_buffer
        self.rank, self.world, self.workers, self.batch_size, self.batches_seen = 0, 1, 1, 1, 0
        self.skipped = SkipLog()

    def at(self, rank: int, world: int, workers: int, batch_size: int, batches_seen: int,
           seed: int | None = None) -> "ShardStream":
        """A copy positioned for `rank` of `world` with `workers` logical workers after `batches_seen` batches."""
        share = ShardStream.__new__(ShardStream)
        share.__dict__.update(self.__dict__)
        share.rank, share.world, share.batch_size, share.batches_seen = rank, world, batch_size, batches_seen
        share.workers = usable_workers(len(self.shards), world, workers)
        share.seed = self.seed if seed is None else seed
        return share

    def consumed(self, logical: int) -> int:
        """Samples logical worker `logical` had produced when `batches_seen` batches were taken round-robin."""
        rounds, extra = divmod(self.batches_seen, self.workers)
        return (rounds + (1 if logical < extra else 0)) * self.batch_size

    def _item(self, entry: tuple[Sample, int, int, int], in_worker: bool) -> dict:
        sample, shard, offset, epoch = entry
        name = self.shards.name(shard, sample.key)
        base = {"key": sample.key, "epoch": epoch, "shard_counts": self.shards.take_learned()}
        try:
            image = decode_sample(sample, name, self.transform.source_side, self.shards.local_paths)
        except BadImageError as err:
            if not in_worker:
                self.skipped.add(err.path, err.reason)
            return {**base, "pixel_values": None, "path": None, "skipped": [(err.path, err.reason)]}
        item_seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + shard) * 1_000_003 + offset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed % (2**63))
            pixels = self.transform(image)
        return {**base, "pixel_values": pixels, "path": name, "skipped": []}

    def _inputs(self, logical: int, first: int) -> Iterator[tuple[int, tuple[Sample, int, int, int]]]:
        """This worker's samples in reading order over its epochs, (input index, (sample, shard, offset, epoch)), from
        input `first` on: whole shards before it are passed by their sample counts (recorded ones read nothing)."""
        index, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            mine = epoch_shards(len(self.shards), self.seed, epoch, self.rank, self.world, logical, self.workers,
                                self.shuffle)
            any_sample = False
            for shard in mine:
                count = self.shards.known_count(shard) if index < first else None
                if count is not None and index + count <= first:
                    any_sample |= count > 0
                    index += count
                    continue
                walked = 0
                for offset, sample in enumerate(self.shards.walk(shard, max(0, first - index))):
                    walked = offset + 1
                    if sample is not None:
                        yield index + offset, (sample, shard, offset, epoch)
                self.shards.learn(shard, walked)  # read to its end: its count costs nothing now
                any_sample |= walked > 0
                index += walked
            if not any_sample:
                raise ShardError(f"no samples in the shards of rank {self.rank}, worker {logical}: "
                                 f"{describe([self.shards.files[i] for i in mine])}")
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream positioned for {self.workers} workers runs in {info.num_workers}")
        logical = (physical + self.batches_seen) % self.workers  # the DataLoader starts at physical worker 0
        size = max(1, self.shuffle_buffer) if self.shuffle else 1
        key = (self.seed % 2**64, self.rank, logical)
        done = self.consumed(logical)
        held = buffer_after(done, size, key)
        slot_of = {int(index): slot for slot, index in enumerate(held)}
        buffer: list[tuple | None] = [None] * size
        inputs = self._inputs(logical, int(held.min()))
        for index, entry in inputs:  # fill the buffer with what it held at this position (read again, not decoded)
            if index in slot_of:
                buffer[slot_of[index]] = entry
            if index >= done + size - 1:
                break
        chunk, skip = divmod(done, SHUFFLE_DRAWS)
        while True:
            for slot in shuffle_slots(key, size, chunk)[skip:].tolist():
                entry, refill = buffer[slot], next(inputs, None)
                if refill is None:  # a finite stream ran out: the buffer empties in slot order
                    yield from (self._item(held_entry, info is not None) for held_entry in buffer if held_entry)
                    return
                buffer[slot] = refill[1]
                yield self._item(entry, info is not None)
            chunk, skip = chunk + 1, 0


def build_shard_dataset(data_cfg: Any, transform: ImageTransform, train: bool, repeats_for: Any) -> Any:
    """The dataset for a sharded source (`data.source` webdataset/parquet, or a save_to_disk folder)."""
    from kl_autoencoder.data import dataset_from_hf

    source = str(data_cfg.source)
    if source not in SHARD_SOURCES:  # a save_to_disk folder: memory-mapped Arrow, map-style
        hf = load_saved_dataset(source, data_cfg.split)
        if data_cfg.max_images:
            hf = hf.select(range(min(data_cfg.max_images, len(hf))))
        return dataset_from_hf(hf, transform, data_cfg.image_column, repeats_for(len(hf), train), name=source,
                               local_paths=data_cfg.allow_local_paths)
    if data_cfg.data_files is None:
        raise ShardError(f"data.source={source} needs data.data_files (for example shards/{{00000..00127}}.tar)")
    files = expand_data_files(data_cfg.data_files)
    if source == "parquet" and not data_cfg.streaming:
        hf = load_parquet_dataset(files, data_cfg.image_column, data_cfg.cache_dir)
        if data_cfg.max_images:
            hf = hf.select(range(min(data_cfg.max_images, len(hf))))
        column = parquet_image_column(hf.data.schema, data_cfg.image_column, files[0])
        return dataset_from_hf(hf, transform, column, repeats_for(len(hf), train), name=f"parquet[{len(files)}]",
                               local_paths=data_cfg.allow_local_paths)
    return ShardStream(ShardSet(source, files, data_cfg.image_column, data_cfg.allow_local_paths), transform,
                       shuffle=train, epochs=None if train else 1, shuffle_buffer=data_cfg.shuffle_buffer)


def load_saved_dataset(path: str, split: str | None = None) -> Any:
    """`datasets.load_from_disk` (a DatasetDict gives `split`), with an error naming the folder."""
    import datasets

    for file in Path(path).expanduser().rglob("*"):  # its .arrow and JSON files: a FIFO would block arrow's read
        if not file.is_dir():
            check_regular_file(file, "saved dataset file", ShardError)
    try:
        hf = datasets.load_from_disk(os.path.expanduser(path))
    except Exception as err:
        raise ShardError(f"cannot open the saved dataset {path}: {type(err).__name__}: {err}") from err
    if isinstance(hf, datasets.DatasetDict):
        if split not in hf:
            raise ShardError(f"the saved dataset {path} has splits {list(hf)}, not {split!r} (set data.split)")
        hf = hf[split]
    return hf


def load_parquet_dataset(files: Sequence[str], image_column: str | None, cache_dir: str | None = None) -> Any:
    """Parquet files as one map-style `datasets.Dataset` (each file opened first, so a bad one is named)."""
    import datasets

    for url in files:
        check_parquet_bounds(_parquet_file(url), url)
    try:
        return datasets.load_dataset("parquet", data_files=list(files), split="train", cache_dir=cache_dir)
    except Exception as err:
        raise ShardError(f"cannot load the parquet files {list(files)[:3]}...: {type(err).__name__}: {err}") from err


def describe(files: Sequence[str]) -> str:
    return json.dumps(list(files)[:3]) + (f" ... ({len(files)} shards)" if len(files) > 3 else "")
