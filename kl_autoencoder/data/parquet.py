"""Parquet files with an image column (`data.source: parquet`, `data.data_files: ...`): streamed with pyarrow (the
engine under `datasets`), or with `data.streaming: false` loaded through `datasets` as one map-style table.

The image column is `data.image_column`, else a `datasets` Image feature, else a usual name (img2dataset writes
"jpg"); cells hold encoded bytes or {"bytes", "path"}. A file may come from someone else: unpacked sizes are bounded
before anything is read (untrusted.py), a row group over the bound is counted as bad rows, and a damaged page loses
the rest of that file only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kl_autoencoder.data.cells import find_image_column
from kl_autoencoder.data.hub import HFImageDataset, dataset_from_hf
from kl_autoencoder.data.items import repeats_for
from kl_autoencoder.data.sharding import Sample, ShardError, ShardReader, is_url, shard_files
from kl_autoencoder.data.stream import ShardStream, shard_stream
from kl_autoencoder.data.transforms import ImageTransform
from kl_autoencoder.durable import check_regular_file
from kl_autoencoder.untrusted import arrow_cell_problem, parquet_file_problem, parquet_row_group_problem, shown

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


PARQUET_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")  # img2dataset writes "jpg"
PARQUET_BATCH_ROWS = 64


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


def load_parquet_dataset(files: Sequence[str], image_column: str | None, cache_dir: str | None = None) -> Any:
    """Parquet files as one map-style `datasets.Dataset` (each file opened first, so a bad one is named)."""
    import datasets

    for url in files:
        check_parquet_bounds(_parquet_file(url), url)
    try:
        return datasets.load_dataset("parquet", data_files=list(files), split="train", cache_dir=cache_dir)
    except Exception as err:
        raise ShardError(f"cannot load the parquet files {list(files)[:3]}...: {type(err).__name__}: {err}") from err


class ParquetShards(ShardReader):
    """Parquet files: a count is in the file's footer, cheap, never recorded."""

    kind = "parquet"

    def samples(self, url: str, start: int = 0, image_column: str | None = None) -> Iterator[Sample]:
        return parquet_samples(url, start, image_column)

    def count(self, url: str) -> int:
        return count_parquet_samples(url)


def parquet_dataset(data_cfg: DataConfig, transform: ImageTransform, split: str, train: bool
                    ) -> ShardStream | HFImageDataset:
    """The parquet files data.data_files names: streamed, or with data.streaming false one map-style table (its first
    data.max_images rows). `split` does not apply: the files are the split."""
    files = shard_files(data_cfg)
    if data_cfg.streaming:
        return shard_stream(ParquetShards.kind, files, data_cfg, transform, train)
    hf = load_parquet_dataset(files, data_cfg.image_column, data_cfg.cache_dir)
    if data_cfg.max_images:
        hf = hf.select(range(min(data_cfg.max_images, len(hf))))
    column = parquet_image_column(hf.data.schema, data_cfg.image_column, files[0])
    return dataset_from_hf(hf, transform, column, repeats_for(len(hf), train), name=f"parquet[{len(files)}]",
                           local_paths=data_cfg.allow_local_paths)
