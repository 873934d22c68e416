"""Images in, `[3, R, R]` tensors in [-1, 1] out: the data sources, one family under one chooser.

    sources.py     the one chooser: which kind a `data.source` is (`source_kind`), `build_dataset`, `load_eval_images`
    samples.py     "sample": the built-in photos (fixed train / held-out split)
    folder.py      an image folder (a sorted file list, each file read on its own, decoded reduced and cached)
    hub.py         a hub dataset, map-style or streamed; torch datasets over any `datasets` table
    saved.py       a `datasets` save_to_disk folder
    webdataset.py  "webdataset": tar shards, streamed
    parquet.py     "parquet": parquet files, streamed or map-style
  shared by the sources, below them:
    images.py      decoding to RGB, tensors <-> images, `BadImageError` and `SkipLog` (the bad-image rule)
    transforms.py  resize / crop / flip / hue turn to [-1, 1]
    cache.py       decoded images kept in memory
    cells.py       the image cells of `datasets` tables
    items.py       `ImageDataset`, the map-style base (an unreadable image is replaced by the next readable one)
    sharding.py    shard patterns, samples, `ShardSet` and the `ShardReader` each shard format implements
    stream.py      `ShardStream`: sharded sources streamed, resumable from the batches seen
    batches.py     collate, DataLoader workers, the seeded epoch order, `training_batches`

Each source composes the same steps, as webdataset does: a source yields encoded images, `images` / `cells` decode
them (or raise `BadImageError`), `transforms` makes the tensor. No room imports the chooser or this package; every
name lives in one room and is re-exported here, so `from kl_autoencoder.data import X` is the public way in.
"""

from kl_autoencoder.data.batches import (
    EpochSampler, SeededItems, _epoch_loader, build_dataloader, collate_images, default_num_workers, order_workers,
    training_batches,
)
from kl_autoencoder.data.cache import DEFAULT_CACHE_BYTES, ReducedImageCache
from kl_autoencoder.data.cells import (
    IMAGE_COLUMN_NAMES, _is_encoded_image, _undecoded, checked_cell, decode_hub_value, find_image_column,
    local_image_path,
)
from kl_autoencoder.data.folder import ImageFolderDataset, iter_image_folder
from kl_autoencoder.data.hub import (
    DatasetUnavailableError, HFImageDataset, HFIterableImageDataset, dataset_from_hf, hub_download_folder,
    load_hub_dataset,
)
from kl_autoencoder.data.images import (
    IMAGE_EXTENSIONS, BadImageError, SkipLog, _rescale_to_uint8, decode_image, image_to_tensor, load_image,
    reduce_to_side, tensor_to_image, to_rgb,
)
from kl_autoencoder.data.items import MAX_TRIES, MIN_EPOCH_ITEMS, ImageDataset, repeats_for
from kl_autoencoder.data.parquet import (
    PARQUET_BATCH_ROWS, PARQUET_IMAGE_COLUMNS, ParquetShards, check_parquet_bounds, count_parquet_samples,
    load_parquet_dataset, parquet_image_column, parquet_samples,
)
from kl_autoencoder.data.samples import (
    GREYSCALE_PHOTOS, SAMPLE_HELDOUT, SAMPLE_PHOTOS, SAMPLE_RANDOM_HUE, SAMPLE_TRAIN, PhotoListDataset,
    _sample_array, greyscale_images, is_sample_source, sample_images,
)
from kl_autoencoder.data.saved import is_saved_dataset, load_saved_dataset
from kl_autoencoder.data.sharding import (
    Sample, ShardError, ShardReader, ShardSet, decode_sample, describe, expand_data_files, expand_pattern, is_url,
)
from kl_autoencoder.data.sources import (
    FORMATS, SHARD_SOURCES, SOURCES, build_dataset, load_eval_images, source_kind, source_random_hue,
)
from kl_autoencoder.data.stream import (
    SHUFFLE_DRAWS, ShardStream, buffer_after, epoch_shards, shuffle_buffer, shuffle_slots, usable_workers,
)
from kl_autoencoder.data.transforms import ImageTransform, build_transform, rotate_hue
from kl_autoencoder.data.webdataset import TAR_IMAGE_EXTENSIONS, TarShards, count_tar_samples, tar_samples
from kl_autoencoder.formats import is_local_path

_repeats_for = repeats_for  # its name before the package was split into rooms

__all__ = [
    "DEFAULT_CACHE_BYTES", "FORMATS", "GREYSCALE_PHOTOS", "IMAGE_COLUMN_NAMES", "IMAGE_EXTENSIONS", "MAX_TRIES",
    "MIN_EPOCH_ITEMS", "PARQUET_BATCH_ROWS", "PARQUET_IMAGE_COLUMNS", "SAMPLE_HELDOUT", "SAMPLE_PHOTOS",
    "SAMPLE_RANDOM_HUE", "SAMPLE_TRAIN", "SHARD_SOURCES", "SHUFFLE_DRAWS", "SOURCES", "TAR_IMAGE_EXTENSIONS",
    "BadImageError", "DatasetUnavailableError", "EpochSampler", "HFImageDataset", "HFIterableImageDataset",
    "ImageDataset", "ImageFolderDataset", "ImageTransform", "ParquetShards", "PhotoListDataset", "ReducedImageCache",
    "Sample", "SeededItems", "ShardError", "ShardReader", "ShardSet", "ShardStream", "SkipLog", "TarShards",
    "buffer_after", "build_dataloader", "build_dataset", "build_transform", "check_parquet_bounds", "checked_cell",
    "collate_images", "count_parquet_samples", "count_tar_samples", "dataset_from_hf", "decode_hub_value",
    "decode_image", "decode_sample", "default_num_workers", "describe", "epoch_shards", "expand_data_files",
    "expand_pattern", "find_image_column", "greyscale_images", "hub_download_folder", "image_to_tensor",
    "is_local_path", "is_sample_source", "is_saved_dataset", "is_url", "iter_image_folder", "load_eval_images",
    "load_hub_dataset", "load_image", "load_parquet_dataset", "load_saved_dataset", "local_image_path",
    "order_workers", "parquet_image_column", "parquet_samples", "reduce_to_side", "repeats_for", "rotate_hue",
    "sample_images", "shuffle_buffer", "shuffle_slots", "source_kind", "source_random_hue", "tar_samples",
    "tensor_to_image", "to_rgb", "training_batches", "usable_workers",
    "_epoch_loader", "_is_encoded_image", "_rescale_to_uint8", "_sample_array", "_undecoded",
]
