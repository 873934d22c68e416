"""WebDataset tar shards (`data.source: webdataset`, `data.data_files: shards/{00000..00127}.tar`), streamed.

    data.source: webdataset                     # img2dataset-style tars: 000123.jpg, 000123.txt, ...
    data.data_files: shards/{00000..00127}.tar  # brace pattern, glob, or a list of either; local paths or URLs

Why our own thin reader over `datasets`' webdataset builder: (1) `datasets` reads a tar in one piece, so a shard
truncated at its end aborts the whole stream, and we want it skipped and counted like a corrupt JPEG; (2) its
resumable state (`IterableDataset.state_dict()`) lives in each DataLoader worker and needs torchdata's
StatefulDataLoader (not a dependency) plus a per-rank gather into the checkpoint; our stream (stream.py) resumes from
the number the trainer already saves. We use the `webdataset` library for what it standardises: its pattern syntax
(sharding.py), `gopen` (http://, pipe:, s3 via pipe) for remote shards, and its sample grouping rule (`__key__` = the
member name up to the first dot of its base name). Only the member a sample uses is read, its size bounded first
(untrusted.py); a shard that ends mid-member yields its last sample as bad and stops.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kl_autoencoder.data.images import IMAGE_EXTENSIONS
from kl_autoencoder.data.sharding import Sample, ShardError, ShardReader, is_url, shard_files
from kl_autoencoder.data.stream import ShardStream, shard_stream
from kl_autoencoder.data.transforms import ImageTransform
from kl_autoencoder.durable import check_regular_file
from kl_autoencoder.untrusted import shown, too_many_bytes

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig

logger = logging.getLogger(__name__)


TAR_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # member extensions read as the image


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


class TarShards(ShardReader):
    """WebDataset tar shards: counting one reads its headers to the end, so counts are learned and recorded."""

    kind = "webdataset"
    counted_by_reading = True

    def samples(self, url: str, start: int = 0, image_column: str | None = None) -> Iterator[Sample]:
        return tar_samples(url, start, image_column)

    def count(self, url: str) -> int:
        return count_tar_samples(url)

    def walk(self, url: str, start: int = 0, image_column: str | None = None) -> Iterator[Sample | None]:
        return _walk_tar(url, start, image_column)


def webdataset_dataset(data_cfg: DataConfig, transform: ImageTransform, split: str, train: bool) -> ShardStream:
    """The stream over the tar shards data.data_files names (`split` does not apply: the files are the split)."""
    return shard_stream(TarShards.kind, shard_files(data_cfg), data_cfg, transform, train)
