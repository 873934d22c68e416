"""The one chooser: which kind of source a `data.source` is, and the dataset (or evaluation images) it gives.

    data.source: sample | sample:train | sample:heldout    the built-in photos (samples.py)
    data.source: webdataset | parquet, data.data_files: ..  shards of that format (webdataset.py, parquet.py)
    data.source: path/to/saved                             a `datasets` save_to_disk folder (saved.py)
    data.source: path/to/folder                            an image folder (folder.py)
    data.source: user/name                                 a hub dataset, map-style or streamed (hub.py)

Each kind is one room below this module, built on the shared image pieces (images.py, transforms.py, cells.py) and
holding its builder `(data_cfg, transform, split, train) -> dataset`. A new format is one new room and one line here:
in `FORMATS` when data.source names it (its files in data.data_files), else in `SOURCES` and `source_kind`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch.utils.data import Dataset

from kl_autoencoder.data.folder import folder_dataset, folder_eval_images
from kl_autoencoder.data.hub import hub_dataset, hub_eval_images
from kl_autoencoder.data.images import SkipLog
from kl_autoencoder.data.parquet import parquet_dataset
from kl_autoencoder.data.samples import SAMPLE_RANDOM_HUE, is_sample_source, sample_dataset, sample_images
from kl_autoencoder.data.saved import is_saved_dataset, saved_dataset
from kl_autoencoder.data.transforms import ImageTransform, build_transform
from kl_autoencoder.data.webdataset import webdataset_dataset
from kl_autoencoder.formats import is_local_path

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig

Builder = Callable[["DataConfig", ImageTransform, str, bool], Dataset]

FORMATS: dict[str, Builder] = {  # data.source values that name a format; data.data_files lists its files
    "webdataset": webdataset_dataset,
    "parquet": parquet_dataset,
}
SOURCES: dict[str, Builder] = {  # every kind of source, as `source_kind` names it
    "sample": sample_dataset,
    **FORMATS,
    "saved": saved_dataset,
    "folder": folder_dataset,
    "hub": hub_dataset,
}
SHARD_SOURCES = tuple(FORMATS)


def source_kind(source: str) -> str:
    """Which kind of source `data.source` is (a key of `SOURCES`): the built-in photos, a format named with its files
    in data.data_files, a path on this machine (a save_to_disk folder, else an image folder), else a hub dataset."""
    if is_sample_source(source):
        return "sample"
    if source in FORMATS:
        return source
    if is_local_path(source):
        return "saved" if is_saved_dataset(source) else "folder"
    return "hub"


def source_random_hue(random_hue: float | None, is_sample: bool) -> float:
    """data.random_hue for a source: a number applies to any source; None means SAMPLE_RANDOM_HUE for the built-in
    sample photos (nine photos need every hue shown) and 0 for any other source (real data has its own colours)."""
    if random_hue is not None:
        return random_hue
    return SAMPLE_RANDOM_HUE if is_sample else 0.0


def build_dataset(data_cfg: DataConfig, split: str | None = None, train: bool | None = None) -> Dataset:
    """The torch dataset described by `data_cfg`; items hold `pixel_values` [3, R, R] in [-1, 1].

    `split` defaults to `data_cfg.split` ("train"/"heldout"/"all" for "sample", the hub split for hub
    datasets, ignored for folders). `train` (default: split starts with "train") turns on random
    crop/flip per `data_cfg` and the virtual epoch length; otherwise centre crops, one pass.
    """
    split = split or data_cfg.split
    train = split.startswith("train") if train is None else train
    random_crop, random_flip = (data_cfg.random_crop, data_cfg.random_flip) if train else (False, False)
    kind = source_kind(str(data_cfg.source))
    random_hue = source_random_hue(data_cfg.random_hue, kind == "sample") if train else 0.0
    max_scale = data_cfg.max_crop_scale
    if max_scale is None:  # per source: native-pixel crops give variety from a few sample photos; LDM's whole-photo
        max_scale = None if kind == "sample" else 1.0  # crops elsewhere
    transform = build_transform(data_cfg.resolution, random_crop, random_flip, max_scale, random_hue)
    return SOURCES[kind](data_cfg, transform, split, train)


def load_eval_images(
    source: str, resolution: int, num_images: int | None = None, split: str = "train",
    skipped: SkipLog | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Centre-cropped evaluation images: (names, [N, 3, R, R] in [-1, 1]).

    `source`: "sample" (all 12 built-in photos: reconstruction quality is not judged on held-out data
    alone; "sample:heldout" / "sample:train" pick one part), an image folder (unreadable files are skipped
    with a warning, and recorded in `skipped` when given) or a hub dataset name (`split`, streamed when
    `num_images` is set).
    """
    skipped = SkipLog() if skipped is None else skipped
    transform = build_transform(resolution, random_crop=False, random_flip=False)
    named: list[tuple[str, Image.Image]]
    if is_sample_source(source):
        named = sample_images(source.partition(":")[2] or "all")[:num_images]
    elif is_local_path(source):
        named = folder_eval_images(source, num_images, skipped)
    else:
        named = hub_eval_images(source, split, num_images, skipped)
    return [name for name, _ in named], torch.stack([transform(image) for _, image in named])

