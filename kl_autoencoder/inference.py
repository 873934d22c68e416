"""Encode, decode and reconstruct with a model: batches (`encode_batch`, `decode_sliced`) and whole folders.

Latents written to disk are *diffusion latents*: `model.to_diffusion_latents(z)` = (z - shift) * scale, the
tensors a latent diffusion model trains on. `decode_latents` inverts that before `model.decode`. Their file format
(`latents-00000.safetensors`, ...) is latent_files.py's; where outputs go and how their names are checked is
output_names.py's; prior sampling and interpolation are sampling.py's. All three are re-exported here.

What the folder jobs promise about their outputs (all checked before the first file is written):
  - a shard is trusted for nothing: every record of every shard must be well formed, with a plain relative name
    (`name_problem`) unique across the shards, else a LatentFormatError names the shard and the record;
  - outputs never collide: `photo.jpg` -> `photo.png`, but a folder with both photo.jpg and photo.png gives
    `photo.png` and `photo.jpg.png` (`output_names`), and the count reported is the count of files written;
  - outputs stay inside the output folder, which may not be (or be inside) the input / latents folder, and each is
    written atomically (`save_png`: a symlink at the path is replaced, never written through), its folders re-checked
    for symlinks at write time (`outputs.safe_parent`);
  - names are bounded (length, depth, no control characters) and may not need one output as another's folder;
  - a folder already holding this command's earlier outputs (shards for `encode_folder`, PNGs for decode and
    reconstruct) is refused unless told to replace them (`overwrite=True`): the one rule of `outputs.check_output`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kl_autoencoder.data import BadImageError, image_to_tensor, iter_image_folder, load_image
from kl_autoencoder.durable import lock_folder, unlock_folder
from kl_autoencoder.fastpath import FastPath, autocast, autocast_for, model_device  # noqa: F401
from kl_autoencoder.latent_files import (  # noqa: F401 (re-exported)
    FLOAT_DTYPES, SHARD_GLOB, SHARD_PATTERN, ImageRecord, LatentFormatError, ShardHeader, check_shard_folder,
    latent_shards, load_latents, read_shard, read_shard_header, read_shards, write_shard,
)
from kl_autoencoder.output_names import (  # noqa: F401 (re-exported)
    MAX_DEPTH, MAX_NAME_BYTES, MAX_PATH_BYTES, check_output_folder, name_problem, output_names, output_paths,
    refuse_overwriting_inputs, save_png,
)
from kl_autoencoder.outputs import OutputLocationError, check_output, resolve, safe_parent  # noqa: F401 (re-exported)
from kl_autoencoder.sampling import lerp, sample_prior, slerp  # noqa: F401 (re-exported)
from kl_autoencoder.tiling import check_tile_option, decode_tiled, encode_tiled, resolve_tile_size


# ----------------------------------------------------------------------------------------------------------------------
# precision and batching


def _check_mode(mode: str) -> None:
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")


@torch.no_grad()
def encode_batch(model, x: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None,
                 tile_size: int | str | None = None, tile_overlap: int = 0):
    """Posterior of a pixel batch in [-1, 1] (fp32 mean/logvar), taken as its mean or a sample.

    `tile_size`: None (one pass), pixels (tiled), or "auto" (tiled only over the pixel budget, see tiling.py)."""

    _check_mode(mode)
    tile = resolve_tile_size(tile_size, *x.shape[-2:])
    device = model_device(model)
    with autocast_for(device):
        posterior = encode_tiled(model, x, tile, tile_overlap) if tile else model.encode(x)
    posterior = posterior.to(torch.float32)  # logvar -> std is where bf16 loses the most
    return posterior.mode() if mode == "mean" else posterior.sample(generator=generator)


@torch.no_grad()
def decode_sliced(model, z: torch.Tensor, slice_size: int | None = None, tile_size: int | str | None = None,
                  tile_overlap: int = 0) -> torch.Tensor:
    """Decode raw latents `z` [B, C, h, w] `slice_size` samples at a time (bounds activation memory by the slice)."""

    device = model_device(model)
    f = model.config.downsampling_factor
    tile = resolve_tile_size(tile_size, z.shape[-2] * f, z.shape[-1] * f)
    slice_size = slice_size or z.shape[0]
    outputs = []
    for start in range(0, z.shape[0], slice_size):
        chunk = z[start:start + slice_size].to(device)
        with autocast_for(device):
            out = decode_tiled(model, chunk, tile, tile_overlap) if tile else model.decode(chunk)
        outputs.append(out.float())
    return torch.cat(outputs)


# ----------------------------------------------------------------------------------------------------------------------
# padding to the latent grid


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad [B, C, H, W] on the bottom/right up to multiples of `factor`: reflect, or replicate where the image is too
    small to reflect (reflect needs the pad to be shorter than the side)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


# ----------------------------------------------------------------------------------------------------------------------
# folder jobs: encode, decode, reconstruct


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


@dataclass
class FolderResult:
    """What a folder command did: images processed, files written, corrupt inputs skipped."""

    records: list[ImageRecord] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def summary(self) -> str:
        text = f"{_plural(len(self.records), 'image')}, {_plural(len(self.written), 'file')} written"
        if self.skipped:
            names = ", ".join(name for name, _ in self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            text += f"; skipped {len(self.skipped)} unreadable images: {names}"
        return text


def _input_images(input_path: str | Path) -> list[tuple[str, Path]]:
    """(name, path) of every image to read: one file, or a folder's images (sorted), named relative to it.

    Names are checked like shard names, so an input whose output could not be written fails before any work."""

    root = Path(input_path).expanduser()
    items = [(root.name, root)] if root.is_file() else [(p.relative_to(root).as_posix(), p)
                                                         for p in iter_image_folder(root)]
    for name, path in items:
        problem = name_problem(name)
        if problem:
            raise OutputLocationError(f"input {path}: its name {problem}")
    return items


def _iter_image_batches(items: Sequence[tuple[str, Path]], batch_size: int, factor: int, result: FolderResult,
                        progress: tqdm) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    """Read the images in order, grouping images of the same size into batches of padded tensors.

    Only one partly filled batch per distinct size is held in memory. Unreadable files are recorded in
    `result.skipped` (and counted on `progress` at once; readable ones are counted by the caller once processed).
    """

    pending: dict[tuple[int, int], list[tuple[ImageRecord, torch.Tensor]]] = defaultdict(list)
    index = 0
    for name, path in items:
        try:
            pixels = image_to_tensor(load_image(path))
        except BadImageError as err:
            result.skipped.append((name, getattr(err, "reason", str(err))))
            progress.update(1)
            continue
        size = tuple(pixels.shape[-2:])
        padded = pad_to_multiple(pixels.unsqueeze(0), factor)
        record = ImageRecord(index, name, size, tuple(padded.shape[-2:]))
        index += 1
        pending[size].append((record, padded[0]))
        if len(pending[size]) == batch_size:
            group = pending.pop(size)
            yield [r for r, _ in group], torch.stack([t for _, t in group])
    for group in pending.values():
        yield [r for r, _ in group], torch.stack([t for _, t in group])


def _check_folder_args(model, batch_size: int, tile_size: int | str | None, tile_overlap: int) -> None:
    """Argument errors a folder command can detect before it reads anything (so before any progress bar)."""

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_tile_option(tile_size, tile_overlap, model.config.downsampling_factor)


def encode_folder(model, input_folder: str | Path, out: str | Path, batch_size: int = 8, mode: str = "mean",
                  tile_size: int | str | None = None, tile_overlap: int = 64, shard_size: int = 1024,
                  generator: torch.Generator | None = None, overwrite: bool = False) -> FolderResult:
    """Encode every image under `input_folder` into diffusion latents, written to `out/latents-00000.safetensors`, ...

    Each image becomes one float32 tensor [C, h, w] keyed by its index; sizes that are not multiples of the
    downsampling factor are reflect-padded (and recorded, so `decode_latents` crops back). A folder that already
    holds shards is refused (a later decode would mix old and new), unless `overwrite`: then the old shards are
    deleted just before the first new one is written. The run locks `out` (flock): a second encode into the same
    folder fails at once, and each shard is published exclusively (never replacing one it did not write).
    """
    check_shard_folder(Path(out), overwrite, inputs=[input_folder])  # refused before the folder is even created
    created = not Path(out).exists()
    lock = lock_folder(Path(out))
    try:
        return _encode_folder(model, input_folder, out, batch_size, mode, tile_size, tile_overlap, shard_size,
                              generator, overwrite)
    finally:
        unlock_folder(Path(out), lock, created)


def _encode_folder(model, input_folder: str | Path, out: str | Path, batch_size: int, mode: str,
                   tile_size: int | str | None, tile_overlap: int, shard_size: int,
                   generator: torch.Generator | None, overwrite: bool) -> FolderResult:
    _check_mode(mode)
    _check_folder_args(model, batch_size, tile_size, tile_overlap)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    items = _input_images(input_folder)
    out = Path(out)
    stale = check_shard_folder(out, overwrite, inputs=[input_folder])
    out.mkdir(parents=True, exist_ok=True)
    result = FolderResult()
    device = model_device(model)
    buffer: dict[int, torch.Tensor] = {}
    buffer_records: list[ImageRecord] = []

    def flush() -> None:
        if not buffer:
            return
        if not result.written:  # about to write the first new shard: the old ones go now, not before
            for path in stale:
                path.unlink(missing_ok=True)
        result.written.append(write_shard(out / SHARD_PATTERN.format(len(result.written)), buffer, buffer_records, model))
        buffer.clear()
        buffer_records.clear()

    # `with`: the bar ends its line even on an error
    with tqdm(total=len(items), desc="encoding", unit="img") as progress:
        for records, pixels in _iter_image_batches(items, batch_size, model.config.downsampling_factor, result,
                                                   progress):
            z = encode_batch(model, pixels.to(device), mode, generator, tile_size, tile_overlap)
            latents = model.to_diffusion_latents(z).float().cpu()
            for record, latent in zip(records, latents):
                buffer[record.index] = latent
                buffer_records.append(record)
                result.records.append(record)
                if len(buffer) >= shard_size:
                    flush()
            progress.update(len(records))
        flush()
    result.records.sort(key=lambda r: r.index)
    if not result.records:
        raise ValueError(f"no readable images in {input_folder} ({len(result.skipped)} unreadable)")
    return result


def _decode_shards(model, headers: Sequence[ShardHeader], batch_size: int, tile_size: int | str | None,
                   tile_overlap: int) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    device = model_device(model)
    for header in headers:
        by_shape: dict[tuple[int, ...], list[tuple[ImageRecord, torch.Tensor]]] = defaultdict(list)
        for record, latent in load_latents(header):
            by_shape[tuple(latent.shape)].append((record, latent))
        for group in by_shape.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                z = model.from_diffusion_latents(torch.stack([t for _, t in chunk]).to(device))
                yield [r for r, _ in chunk], decode_sliced(model, z, batch_size, tile_size, tile_overlap)


def iter_decoded(model, latents_path: str | Path, batch_size: int = 8, tile_size: int | str | None = None,
                 tile_overlap: int = 64) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    """Decode shards batch by batch, grouping latents of one shape: (records, padded images [B, 3, H, W] in ~[-1, 1]).

    Every shard's header is checked first (LatentFormatError naming the file and record), then decoding starts."""
    _check_folder_args(model, batch_size, tile_size, tile_overlap)
    headers = read_shards(latents_path, model.config.latent_channels, model.config.downsampling_factor)
    yield from _decode_shards(model, headers, batch_size, tile_size, tile_overlap)


# What decode and reconstruct call an earlier output of theirs in an output folder: any PNG below it.
PNG_OUTPUTS = ("**/*.png",)


def _crop_and_save(images: torch.Tensor, records: list[ImageRecord], targets: dict[int, Path],
                   result: FolderResult, root: Path) -> None:
    for image, record in zip(images, records):
        height, width = record.original_size
        target = safe_parent(root, targets[record.index])  # its folders re-checked now, at write time
        result.written.append(save_png(image[:, :height, :width], target))
        result.records.append(record)


def decode_latents(model, latents_path: str | Path, out_folder: str | Path, batch_size: int = 8,
                   tile_size: int | str | None = None, tile_overlap: int = 64, overwrite: bool = False) -> FolderResult:
    """Decode shards written by `encode_folder` into PNGs with the original names and sizes (names per
    `output_names`: photo.jpg -> photo.png unless that clashes).

    Before anything is written: every record of every shard is checked (`read_shards`), the output folder must not
    be the latents folder or inside it nor hold PNGs of an earlier run (unless `overwrite`: then same-named ones are
    replaced), and every output must land inside `out_folder`."""
    _check_folder_args(model, batch_size, tile_size, tile_overlap)
    headers = read_shards(latents_path, model.config.latent_channels, model.config.downsampling_factor)
    check_output(out_folder, "decode", [latents_path], PNG_OUTPUTS, overwrite, noun="PNG", kind="latents")
    out_folder = Path(out_folder)
    records = [record for header in headers for record in header.records]
    try:
        paths = output_paths(out_folder, output_names([record.name for record in records]))
    except OutputLocationError as err:
        raise OutputLocationError(f"latents {latents_path}: {err}") from err
    targets = {record.index: path for record, path in zip(records, paths)}
    result = FolderResult()
    with tqdm(total=len(records), desc="decoding", unit="img") as progress:
        for batch, images in _decode_shards(model, headers, batch_size, tile_size, tile_overlap):
            _crop_and_save(images, batch, targets, result, out_folder)
            progress.update(len(batch))
    return result


def reconstruct_folder(model, input_folder: str | Path, out_folder: str | Path, batch_size: int = 8,
                       mode: str = "mean", tile_size: int | str | None = None, tile_overlap: int = 64,
                       generator: torch.Generator | None = None, overwrite: bool = False) -> FolderResult:
    """Encode and decode every image in one pass (no scaling round trip), writing PNG reconstructions named per
    `output_names`. The output folder may not be the input folder or inside it, nor hold PNGs of an earlier run
    (unless `overwrite`), and no output may be an input."""
    _check_mode(mode)
    _check_folder_args(model, batch_size, tile_size, tile_overlap)
    items = _input_images(input_folder)
    check_output(out_folder, "reconstruct", [input_folder], PNG_OUTPUTS, overwrite, noun="PNG")
    out_folder = Path(out_folder)
    paths = output_paths(out_folder, output_names([name for name, _ in items]))
    refuse_overwriting_inputs(paths, [path for _, path in items])
    by_name = {name: path for (name, _), path in zip(items, paths)}
    result = FolderResult()
    device = model_device(model)
    with tqdm(total=len(items), desc="reconstructing", unit="img") as progress:
        for records, pixels in _iter_image_batches(items, batch_size, model.config.downsampling_factor, result,
                                                   progress):
            z = encode_batch(model, pixels.to(device), mode, generator, tile_size, tile_overlap)
            targets = {record.index: by_name[record.name] for record in records}
            _crop_and_save(decode_sliced(model, z, batch_size, tile_size, tile_overlap), records, targets, result,
                           out_folder)
            progress.update(len(records))
    if not result.records:
        raise ValueError(f"no readable images in {input_folder} ({len(result.skipped)} unreadable)")
    return result
