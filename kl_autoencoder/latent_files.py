"""The latent files of one folder encode: `latents-00000.safetensors`, ... as `kl-autoencoder encode` writes them
without --resolution, and `decode` reads them back.

Latents written to disk are *diffusion latents*: `model.to_diffusion_latents(z)` = (z - shift) * scale, the
tensors a latent diffusion model trains on.

Shard format: one tensor per image keyed by its global index ("0", "1", ...), each of shape [C, h, w] (float32), plus
safetensors metadata "images": a JSON list of {"index", "name", "original_size": [H, W], "padded_size": [H, W]}, and
"scaling_factor"/"shift_factor". Images whose sides are not multiples of the downsampling factor are reflect-padded
on the bottom/right before encoding and cropped back to `original_size` after decoding.

A shard is trusted for nothing: every record of every shard must be well formed, with a plain relative name
(`output_names.name_problem`) unique across the shards, else a LatentFormatError names the shard and the record.
Shards are published exclusively (`durable.write_exclusive`): never replacing one another run wrote.

The dataset encode across processes (`latent-shard-*.safetensors` keyed by input key, with a manifest) is another
format, in latent_shards.py. This module sits below inference.py, which encodes and decodes with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from kl_autoencoder.durable import check_regular_file, write_exclusive
from kl_autoencoder.output_names import name_problem, short_repr
from kl_autoencoder.outputs import check_output

SHARD_PATTERN = "latents-{:05d}.safetensors"
SHARD_GLOB = "latents-*.safetensors"


class LatentFormatError(ValueError):
    """A latents file that does not fit the model (wrong channel count, missing metadata, ...)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ImageRecord:
    index: int
    name: str  # path relative to the input folder, POSIX separators
    original_size: tuple[int, int]  # (H, W) of the image file
    padded_size: tuple[int, int]  # (H, W) fed to the encoder

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "original_size": list(self.original_size),
                "padded_size": list(self.padded_size)}

    @classmethod
    def from_json(cls, data: object) -> "ImageRecord":
        """One entry of a shard's "images" metadata; ValueError naming the field that is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object with index, name, original_size, padded_size; got {short_repr(data)}")
        missing = [key for key in ("index", "name", "original_size", "padded_size") if key not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        index, name = data["index"], data["name"]
        if not _is_int(index) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {short_repr(index)}")
        problem = name_problem(name)
        if problem:
            raise ValueError(f"name {short_repr(name)} {problem}")
        sizes = []
        for key in ("original_size", "padded_size"):
            size = data[key]
            if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
                raise ValueError(f"{key} must be [height, width], two positive integers; got {short_repr(size)}")
            sizes.append((size[0], size[1]))
        return cls(index, name, sizes[0], sizes[1])


def write_shard(path: Path, latents: dict[int, torch.Tensor], records: list[ImageRecord], model) -> Path:
    """One shard of `latents` (index -> diffusion latent) and their records, published exclusively (FileExistsError
    rather than replace another's shard)."""
    metadata = {
        "images": json.dumps([r.to_json() for r in sorted(records, key=lambda r: r.index)]),
        "scaling_factor": json.dumps(model.config.scaling_factor),
        "shift_factor": json.dumps(model.config.shift_factor),
        "latent_channels": str(model.config.latent_channels),
        "downsampling_factor": str(model.config.downsampling_factor),
    }
    tensors = {str(i): t.contiguous() for i, t in latents.items()}
    return write_exclusive(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _shards_in(folder: Path) -> list[Path]:
    """The shard files in `folder`; one that is not a regular file (a FIFO would block the read forever) is refused."""
    shards = sorted(folder.glob(SHARD_GLOB)) if folder.is_dir() else []
    for path in shards:
        check_regular_file(path, "latent shard", LatentFormatError)
        if not path.is_file():
            raise LatentFormatError(f"{path} is not a regular file (a FIFO, socket, folder or broken link?); "
                                    "refusing to read it")
    return shards


def check_shard_folder(out: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> list[Path]:
    """The shards an earlier encode left in `out`: refused (OutputLocationError) unless `overwrite`, since a decode of
    the folder would mix them with the new ones (and `out` may not be, or be inside, an `inputs` folder). Returns them,
    for the caller to delete once it has shards to write."""
    return check_output(out, "encode", inputs, earlier=[SHARD_GLOB], overwrite=overwrite, noun="latent shard",
                        why="a decode of the folder would mix them with the new ones")


def latent_shards(latents_path: str | Path) -> list[Path]:
    """A single shard file, or every `latents-*.safetensors` in a folder (sorted)."""
    path = Path(latents_path)
    if path.is_file():
        return [path]
    shards = _shards_in(path)
    if not shards:
        raise FileNotFoundError(f"no latents found at {path} (expected a latents-*.safetensors file or a folder of them)")
    return shards


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names a latent may have


@dataclass
class ShardHeader:
    """A shard's records and latent shapes, read and checked from its header alone (no tensor data)."""

    path: Path
    records: list[ImageRecord]
    shapes: dict[int, tuple[int, ...]]  # record index -> latent shape [C, h, w]


def _read_header(path: Path) -> tuple[list, dict[str, tuple[str, tuple[int, ...]]]]:
    """One shard's "images" entries (parsed, not yet checked) and each tensor's (dtype, shape), from its header."""
    check_regular_file(path, "latent shard", LatentFormatError)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            info = {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in keys}
    except Exception as err:  # safetensors raises its own error types for truncated / foreign files
        raise LatentFormatError(f"{path}: not a readable safetensors latents file ({err})") from err
    if "images" not in metadata:
        raise LatentFormatError(f"{path}: no 'images' metadata (was it written by `kl-autoencoder encode`?)")
    try:
        entries = json.loads(metadata["images"])
    except RecursionError:
        raise LatentFormatError(f"{path}: the 'images' metadata is nested too deeply") from None
    except json.JSONDecodeError as err:
        raise LatentFormatError(f"{path}: the 'images' metadata is not valid JSON ({err})") from err
    if not isinstance(entries, list):
        raise LatentFormatError(f"{path}: the 'images' metadata must be a list of records, got {type(entries).__name__}")
    return entries, info


def read_shard_header(path: str | Path, latent_channels: int | None = None,
                      factor: int | None = None) -> ShardHeader:
    """Check every record of one shard: well-formed metadata, a plain unique name, a float [C, h, w] tensor with
    `latent_channels` channels, and (given the downsampling `factor`) an original size the latent covers.

    Any problem is a LatentFormatError naming the shard and the record."""

    path = Path(path)
    entries, info = _read_header(path)
    records, shapes, names = [], {}, {}
    for position, entry in enumerate(entries):
        where = f"{path}: record {position}"
        try:
            record = ImageRecord.from_json(entry)
        except ValueError as err:
            raise LatentFormatError(f"{where}: {err}") from err
        where = f"{where} ({short_repr(record.name)})"
        if record.index in shapes:
            raise LatentFormatError(f"{where}: index {record.index} is listed twice")
        if record.name in names:
            raise LatentFormatError(f"{where}: the name is listed twice (records {names[record.name]} and {position})")
        key = str(record.index)
        if key not in info:
            raise LatentFormatError(f"{path}: metadata lists image {record.index} ({record.name}) but has no tensor for it")
        dtype, shape = info[key]
        if len(shape) != 3:
            raise LatentFormatError(f"{path}: latent {record.index} has shape {shape}, expected [C, h, w]")
        if dtype not in FLOAT_DTYPES:
            raise LatentFormatError(f"{where}: latent {record.index} has dtype {dtype}, expected a float type")
        if latent_channels is not None and shape[0] != latent_channels:
            raise LatentFormatError(
                f"{path}: latents have {shape[0]} channels but the model expects {latent_channels} "
                f"(latent {record.index}, {record.name})"
            )
        if factor is not None and any(o > s * factor for o, s in zip(record.original_size, shape[1:])):
            raise LatentFormatError(f"{where}: original_size {list(record.original_size)} is larger than its latent "
                                    f"{list(shape[1:])} decodes to ({shape[1] * factor}x{shape[2] * factor})")
        limit = Image.MAX_IMAGE_PIXELS  # the decompression-bomb limit readers obey (--max-image-pixels), for writing
        if factor is not None and limit and shape[1] * shape[2] * factor * factor > limit:
            raise LatentFormatError(f"{where}: latent {list(shape[1:])} decodes to {shape[1] * factor}x"
                                    f"{shape[2] * factor} pixels, over the limit of {limit} (raise it with "
                                    "--max-image-pixels for trusted files)")
        records.append(record)
        shapes[record.index] = shape
        names[record.name] = position
    return ShardHeader(path, records, shapes)


def read_shards(latents_path: str | Path, latent_channels: int | None = None,
                factor: int | None = None) -> list[ShardHeader]:
    """Every shard's checked header (see `read_shard_header`), and no name twice across shards."""
    headers = [read_shard_header(path, latent_channels, factor) for path in latent_shards(latents_path)]
    first: dict[str, Path] = {}
    for header in headers:
        for record in header.records:
            other = first.setdefault(record.name, header.path)
            if other != header.path:
                raise LatentFormatError(f"{header.path}: record {short_repr(record.name)} is also in {other}; "
                                        "were two encodes written into one folder?")
    return headers


def read_shard(path: str | Path, latent_channels: int | None = None) -> list[tuple[ImageRecord, torch.Tensor]]:
    """(record, diffusion latent [C, h, w]) pairs of one shard, checked as `read_shard_header` checks them."""
    return load_latents(read_shard_header(path, latent_channels))


def load_latents(header: ShardHeader) -> list[tuple[ImageRecord, torch.Tensor]]:
    """(record, latent) pairs of a shard whose header was checked; LatentFormatError when its tensors cannot be read."""
    try:
        with safe_open(str(header.path), framework="pt") as f:
            return [(record, f.get_tensor(str(record.index)).float()) for record in header.records]
    except Exception as err:  # changed or truncated since its header was read
        raise LatentFormatError(f"{header.path}: cannot read its tensors ({err})") from err
