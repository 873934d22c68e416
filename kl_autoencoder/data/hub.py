"""A Hugging Face hub dataset (`data.source: user/name`), map-style or streamed (`data.streaming`), and the torch
datasets over any `datasets` table (`dataset_from_hf`: hub, save_to_disk folders, map-style parquet).

`datasets.load_dataset(name, split=..., streaming=...)`; the image column is the first column of feature type `Image`,
else one named image/img/pixel_values, or `data.image_column`. Decoding is switched off in `datasets`
(`Image(decode=False)`) so that we decode, and skip, ourselves (cells.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from kl_autoencoder.data.cells import (
    _is_encoded_image, _undecoded, checked_cell, decode_hub_value, find_image_column,
)
from kl_autoencoder.data.images import BadImageError, SkipLog
from kl_autoencoder.data.items import ImageDataset, repeats_for
from kl_autoencoder.data.transforms import ImageTransform

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


class DatasetUnavailableError(RuntimeError):
    """A hub dataset that could not be downloaded or opened."""


def load_hub_dataset(name: str, split: str = "train", streaming: bool = False, cache_dir: str | None = None,
                     option: str = "data.source"):
    """`datasets.load_dataset` with a clear error when the dataset cannot be fetched (offline, typo, split); `option`
    is how the command in use names the source (data.source in a training config, --data for evaluate)."""
    import datasets

    given = (lambda value: f"{option} {value}") if option.startswith("-") else (lambda value: f"{option}={value}")

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown name, unknown split: all surface as different types
        raise DatasetUnavailableError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {err}\n"
            "If this machine is offline the dataset could not be downloaded: download it where there is a "
            "network (it is then read from the cache), or put the images in a local folder and pass "
            f"{given('FOLDER')} (or {given('sample')} for the built-in photos)."
        ) from err


def hub_download_folder(cache_dir: str | None = None) -> str:
    """Where `datasets` keeps what it downloads and extracts: the only files a hub dataset's path cells may name
    (unless data.allow_local_paths)."""
    import datasets

    return str(cache_dir or datasets.config.HF_DATASETS_CACHE)


class HFImageDataset(ImageDataset):
    """A map-style `datasets.Dataset`, image column decoded by us."""

    def __init__(self, hf_dataset: Any, column: str, transform: ImageTransform, repeats: int = 1, prefix: str = "",
                 local_paths: bool | str = False):
        super().__init__(transform, repeats)
        if len(hf_dataset) == 0:
            raise ValueError(f"dataset {prefix or '(in memory)'} has no rows")
        self.hf_dataset = _undecoded(hf_dataset.select_columns([column]), column)
        self.arrow_rows = self.hf_dataset.with_format("arrow")  # cells checked before they become Python objects
        self.column = column
        self.prefix = prefix
        self.local_paths = local_paths

    @property
    def num_images(self) -> int:
        return len(self.hf_dataset)

    def name(self, index: int) -> str:
        return f"{self.prefix}[{index}]"

    def load(self, index: int) -> Image.Image:
        name = self.name(index)
        return decode_hub_value(checked_cell(self.arrow_rows, index, self.column, name), name, self.local_paths)


class HFIterableImageDataset(IterableDataset):
    """A streaming `datasets.IterableDataset`, image column decoded by us.

    Inside DataLoader workers `datasets` hands each worker its own shards (found via `get_worker_info`),
    so each example comes out once; workers beyond `num_shards` stay idle. Across processes (DDP), `for_rank`
    gives each rank its own share.
    """

    def __init__(self, hf_dataset: Any, transform: ImageTransform, image_column: str | None = None, prefix: str = "",
                 local_paths: bool | str = False):
        super().__init__()
        self.local_paths = local_paths
        # Streams may not know their features before the first row: then the column is found on it.
        self.column = find_image_column(hf_dataset.features, image_column) if hf_dataset.features else None
        self.hf_dataset = _undecoded(hf_dataset, self.column) if self.column else hf_dataset
        self.image_column = image_column
        self.transform = transform
        self.resolution = transform.resolution
        self.prefix = prefix
        self.skipped = SkipLog()

    def for_rank(self, rank: int, world: int) -> "HFIterableImageDataset":
        """This process's share of the stream (whole shards where they divide evenly, else every world-th row)."""
        from datasets.distributed import split_dataset_by_node

        share = HFIterableImageDataset.__new__(HFIterableImageDataset)
        share.__dict__.update(self.__dict__)
        share.hf_dataset = split_dataset_by_node(self.hf_dataset, rank=rank, world_size=world)
        share.prefix = f"{self.prefix}{{rank {rank}/{world}}}"
        return share

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a shuffled stream differently each epoch."""
        if hasattr(self.hf_dataset, "set_epoch"):
            self.hf_dataset.set_epoch(epoch)

    def _column_of(self, example: dict) -> str:
        if self.column is None:  # features unknown until the first row: infer them from its values
            import datasets

            inferred = {key: datasets.Image() if _is_encoded_image(value) else None for key, value in example.items()}
            self.column = find_image_column(inferred, self.image_column)
        return self.column

    def pass_undecoded(self, batches: int, batch_size: int) -> None:
        """Let the next pass leave undecoded the rows of its first `batches` batches (a resume skips them)."""
        self.undecoded = (batches, batch_size)

    def _undecoded_rows(self, worker: Any) -> int:
        """Rows of this worker that surely fall in the skipped batches: the DataLoader takes batches from its workers
        in turn, so worker w's j-th batch is among the first j * W + w + 1 (sooner when another worker runs dry)."""
        batches, batch_size = getattr(self, "undecoded", (0, 0))
        workers, index = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return len(range(index, batches, workers)) * batch_size

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        tag = f"w{worker.id}:" if worker is not None else ""
        undecoded = self._undecoded_rows(worker)
        for position, example in enumerate(self.hf_dataset):
            if position < undecoded:  # in a batch the resume skips: read, never decoded
                yield {"pixel_values": None, "path": None, "skipped": []}
                continue
            name = f"{self.prefix}[{tag}{position}]"
            try:
                image = decode_hub_value(example[self._column_of(example)], name, self.local_paths)
            except BadImageError as err:
                if worker is None:
                    self.skipped.add(err.path, err.reason)
                yield {"pixel_values": None, "path": None, "skipped": [(err.path, err.reason)]}
                continue
            yield {"pixel_values": self.transform(image), "path": name, "skipped": []}


def dataset_from_hf(
    hf_dataset: Any,
    transform: ImageTransform,
    image_column: str | None = None,
    repeats: int = 1,
    name: str = "",
    local_paths: bool | str = False,
) -> HFImageDataset | HFIterableImageDataset:
    """Wrap a `datasets.Dataset` (map-style) or `datasets.IterableDataset` (streaming) as a torch dataset;
    `local_paths`: follow cells that name a local file, or those inside this folder (see `decode_hub_value`)."""
    import datasets

    if isinstance(hf_dataset, datasets.IterableDataset):
        return HFIterableImageDataset(hf_dataset, transform, image_column, prefix=name, local_paths=local_paths)
    column = find_image_column(hf_dataset.features, image_column)
    return HFImageDataset(hf_dataset, column, transform, repeats=repeats, prefix=name, local_paths=local_paths)


def hub_dataset(data_cfg: DataConfig, transform: ImageTransform, split: str, train: bool
                ) -> HFImageDataset | HFIterableImageDataset:
    """The hub dataset data.source names, `split` of it: streamed (its first data.max_images, shuffled through
    data.shuffle_buffer when training) or map-style (its first data.max_images rows)."""
    source = str(data_cfg.source)
    hf = load_hub_dataset(source, split=split, streaming=data_cfg.streaming, cache_dir=data_cfg.cache_dir)
    paths = data_cfg.allow_local_paths or hub_download_folder(data_cfg.cache_dir)  # path cells: datasets' downloads
    if data_cfg.streaming:
        if data_cfg.max_images:
            hf = hf.take(data_cfg.max_images)
        if train and data_cfg.shuffle_buffer > 1:
            hf = hf.shuffle(seed=0, buffer_size=data_cfg.shuffle_buffer)
        return dataset_from_hf(hf, transform, data_cfg.image_column, name=f"{source}/{split}", local_paths=paths)
    if data_cfg.max_images:
        hf = hf.select(range(min(data_cfg.max_images, len(hf))))
    repeats = repeats_for(len(hf), train)
    return dataset_from_hf(hf, transform, data_cfg.image_column, repeats, name=f"{source}/{split}", local_paths=paths)


def hub_eval_images(source: str, split: str, num_images: int | None, skipped: SkipLog
                    ) -> list[tuple[str, Image.Image]]:
    """The first `num_images` readable images of a hub dataset's `split` (streamed when `num_images` is set) as
    (name, image); unreadable ones go to `skipped`."""
    named: list[tuple[str, Image.Image]] = []
    hf = load_hub_dataset(source, split=split, streaming=num_images is not None, option="--data")
    if num_images is not None:
        hf = hf.take(num_images)
    column = find_image_column(hf.features, None) if hf.features else "image"
    for index, row in enumerate(_undecoded(hf, column)):
        name = f"{source}/{split}[{index}]"
        try:
            named.append((name, decode_hub_value(row[column], name, local_paths=hub_download_folder())))
        except BadImageError as err:
            skipped.add(err.path, err.reason)
    if not named:
        raise ValueError(f"no readable images in dataset {source!r} split {split!r}")
    return named
