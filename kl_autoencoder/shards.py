"""The sharded sources' names where they were first published; they now live in the `kl_autoencoder.data` package
(sharding.py, stream.py, webdataset.py, parquet.py, saved.py). Nothing inside that package imports this module."""

from kl_autoencoder.data import (  # noqa: F401  (re-exported)
    PARQUET_BATCH_ROWS, PARQUET_IMAGE_COLUMNS, SHARD_SOURCES, SHUFFLE_DRAWS, TAR_IMAGE_EXTENSIONS, Sample, ShardError,
    ShardSet, ShardStream, buffer_after, check_parquet_bounds, count_parquet_samples, count_tar_samples, decode_sample,
    describe, epoch_shards, expand_data_files, expand_pattern, is_saved_dataset, is_url, load_parquet_dataset,
    load_saved_dataset, parquet_image_column, parquet_samples, shuffle_slots, tar_samples, usable_workers,
)
