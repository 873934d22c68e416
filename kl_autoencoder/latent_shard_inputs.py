"""The input of a dataset encode cut into units of work: one per webdataset / parquet shard, or `shard_size` files of an
image folder or rows of a `datasets` save_to_disk folder. The units are fixed by the input alone (and the shard size),
so a rerun with any process count finds the same units, and unit i is always `latent-shard-{i:05d}.safetensors`.

Each unit reads lazily: (key, a function giving the image or raising BadImageError), the key being the tar sample's
`__key__`, a parquet `key` column or row number, or the folder-relative file name. latent_shards.py, above this
module, encodes the units and publishes their shards."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kl_autoencoder.data import (
    SHARD_SOURCES, ShardError, ShardSet, decode_sample, expand_data_files, is_saved_dataset, iter_image_folder,
    load_image, load_saved_dataset,
)

DEFAULT_SHARD_SIZE = 256  # images per shard of a folder or saved dataset


@dataclass
class Unit:
    """One unit of input, encoded into one shard: `read()` yields (key, image or BadImageError)."""

    index: int
    name: str
    read: Callable[[], Iterator[tuple[str, Callable[[], Any]]]]


def _folder_units(folder: Path, shard_size: int, side: int) -> list[Unit]:
    paths = iter_image_folder(folder)
    chunks = [paths[i:i + shard_size] for i in range(0, len(paths), shard_size)]

    def reader(chunk: list[Path]) -> Callable[[], Iterator]:
        return lambda: ((p.relative_to(folder).as_posix(), lambda p=p: load_image(p, side)) for p in chunk)

    return [Unit(i, f"{chunk[0].relative_to(folder).as_posix()} .. {chunk[-1].relative_to(folder).as_posix()}",
                 reader(chunk)) for i, chunk in enumerate(chunks)]


def _shard_units(shards: ShardSet, side: int) -> list[Unit]:
    def reader(index: int) -> Callable[[], Iterator]:
        def read() -> Iterator:
            for sample in shards.samples(index):
                name = shards.name(index, sample.key)
                yield sample.key, lambda s=sample, n=name: decode_sample(s, n, side, shards.local_paths)
        return read

    return [Unit(i, shards.files[i], reader(i)) for i in range(len(shards))]


def _saved_units(path: str, split: str | None, image_column: str | None, shard_size: int,
                 local_paths: bool = False) -> list[Unit]:
    from kl_autoencoder.data import _undecoded, checked_cell, decode_hub_value, find_image_column

    hf = load_saved_dataset(path, split)
    column = find_image_column(hf.features, image_column)
    hf = _undecoded(hf.select_columns([column]), column).with_format("arrow")

    def read_row(row: int) -> Any:
        name = f"{path}[{row}]"
        return decode_hub_value(checked_cell(hf, row, column, name), name, local_paths)

    def reader(start: int, stop: int) -> Callable[[], Iterator]:
        return lambda: ((str(row), lambda row=row: read_row(row)) for row in range(start, stop))

    bounds = [(start, min(start + shard_size, len(hf))) for start in range(0, len(hf), shard_size)]
    return [Unit(i, f"rows {start}..{stop - 1}", reader(start, stop)) for i, (start, stop) in enumerate(bounds)]


def input_units(source: str, data_files: str | Sequence[str] | None = None, image_column: str | None = None,
                split: str | None = "train", shard_size: int = 256, resolution: int = 256,
                local_paths: bool = False) -> tuple[list[Unit], dict]:
    """The units of `source` and a description of the input for `encode.json` (`local_paths`: follow cells that
    name a local file)."""
    if source in SHARD_SOURCES:
        if not data_files:
            raise ShardError(f"--input {source} needs --data-files (for example shards/{{00000..00127}}.tar)")
        files = expand_data_files(data_files)
        return (_shard_units(ShardSet(source, files, image_column, local_paths), resolution),
                {"source": source, "files": files})
    if data_files:
        raise ShardError("--data-files names webdataset/parquet shards: pass --input webdataset or --input parquet")
    root = Path(source).expanduser()
    if is_saved_dataset(root):
        return (_saved_units(str(root), split, image_column, shard_size, local_paths),
                {"source": str(root.resolve()), "split": split, "shard_size": shard_size})
    if not root.is_dir():
        raise FileNotFoundError(f"--input {source}: not a folder of images, a saved dataset, webdataset or parquet")
    return _folder_units(root, shard_size, resolution), {"source": str(root.resolve()), "shard_size": shard_size}


def shard_size_for(total: int | None, world: int, asked: int | None = None) -> int:
    """`asked` (--shard-size), else DEFAULT_SHARD_SIZE images, fewer across processes when a process would get no
    shard: 16 images on 2 processes are 2 shards of 8. `total`: the input's image count (None: not counted)."""
    if asked is not None:
        return asked
    if world == 1 or total is None:
        return DEFAULT_SHARD_SIZE
    return max(1, min(DEFAULT_SHARD_SIZE, -(-total // world)))


def count_images(source: str, split: str | None) -> int | None:
    """The images of a folder or saved dataset, whose shards `--shard-size` cuts (None for webdataset / parquet
    shards, which stay one unit each)."""
    root = Path(source).expanduser()
    if source in SHARD_SOURCES or not root.is_dir():
        return None
    return len(load_saved_dataset(str(root), split)) if is_saved_dataset(root) else len(iter_image_folder(root))
