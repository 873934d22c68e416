"""A `datasets` save_to_disk folder (`data.source: path/to/saved`): memory-mapped Arrow, read map-style."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kl_autoencoder.data.hub import HFImageDataset, dataset_from_hf
from kl_autoencoder.data.items import repeats_for
from kl_autoencoder.data.sharding import ShardError
from kl_autoencoder.data.transforms import ImageTransform
from kl_autoencoder.durable import check_regular_file

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A `datasets` save_to_disk folder (a Dataset's state.json, or a DatasetDict's dataset_dict.json)."""
    root = Path(path).expanduser()
    return (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()


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


def saved_dataset(data_cfg: DataConfig, transform: ImageTransform, split: str, train: bool) -> HFImageDataset:
    """The saved dataset data.source names (a DatasetDict gives data.split), its first data.max_images rows."""
    source = str(data_cfg.source)
    hf = load_saved_dataset(source, data_cfg.split)
    if data_cfg.max_images:
        hf = hf.select(range(min(data_cfg.max_images, len(hf))))
    return dataset_from_hf(hf, transform, data_cfg.image_column, repeats_for(len(hf), train), name=source,
                           local_paths=data_cfg.allow_local_paths)
