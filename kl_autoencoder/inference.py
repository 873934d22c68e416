"""Inference helpers: prior sampling, latent interpolation, and folder encode / decode / reconstruct.

Latents written to disk are *diffusion latents*: `model.to_diffusion_latents(z)` = (z - shift) * scale, the
tensors a latent diffusion model trains on. `decode_latents` inverts that before `model.decode`.

Shard format (`latents-00000.safetensors`, ...): one tensor per image keyed by its global index ("0", "1", ...),
each of shape [C, h, w] (float32), plus safetensors metadata "images": a JSON list of
{"index", "name", "original_size": [H, W], "padded_size": [H, W]}, and "scaling_factor"/"shift_factor".
Images whose sides are not multiples of the downsampling factor are reflect-padded on the bottom/right before
encoding and cropped back to `original_size` after decoding.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

SHARD_PATTERN = "latents-{:05d}.safetensors"


class LatentFormatError(ValueError):
    """A latents file that does not fit the model (wrong channel count, missing metadata, ...)."""


# ----------------------------------------------------------------------------------------------------------------------
# prior sampling and interpolation


def sample_prior(
    shape: Sequence[int],
    truncation: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """z ~ N(0, I) of `shape`; with `truncation`, entries with |z| > truncation are redrawn until all lie within.

    Rejection keeps each entry an exact truncated normal (unlike clamping, which piles mass on the bound).
    """
    if truncation is not None and truncation <= 0:
        raise ValueError(f"truncation must be > 0, got {truncation}")
    z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if truncation is None:
        return z
    outside = z.abs() > truncation
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator, device=device, dtype=dtype)
        outside = z.abs() > truncation
    return z


def _interpolation_weights(steps: int, like: torch.Tensor) -> torch.Tensor:
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both endpoints are included), got {steps}")
    return torch.linspace(0.0, 1.0, steps, device=like.device, dtype=torch.float64)


def lerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear interpolation from a to b, endpoints included: [steps, *a.shape]."""
    if a.shape != b.shape:
        raise ValueError(f"lerp endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    t = _interpolation_weights(steps, a).to(a.dtype).view(-1, *([1] * a.dim()))
    return a.unsqueeze(0) * (1 - t) + b.unsqueeze(0) * t


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation on the flattened vectors, endpoints included: [steps, *a.shape].

    Under a Gaussian prior, lerp midpoints have a smaller norm than typical samples; slerp follows the great
    circle (scaling the norm linearly between |a| and |b|). Nearly parallel endpoints fall back to lerp.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if torch.sin(omega).abs() < eps:
        return lerp(a, b, steps)
    t = _interpolation_weights(steps, a).unsqueeze(1)
    out = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    return out.to(a.dtype).view(steps, *a.shape)


# ----------------------------------------------------------------------------------------------------------------------
# precision and batching


def autocast_for(device: torch.device) -> torch.autocast | nullcontext:
    """bf16 autocast on CUDA (the conv stacks), nothing on CPU where fp32 is both faster and exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_batch(model, x: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None,
                 tile_size: int | None = None, tile_overlap: int = 0):
    """Posterior of a pixel batch in [-1, 1] (fp32 mean/logvar), taken as its mean or a sample."""
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    device = model_device(model)
    with autocast_for(device):
        if tile_size:
            from kl_autoencoder.tiling import encode_tiled
            posterior = encode_tiled(model, x, tile_size, tile_overlap)
        else:
            posterior = model.encode(x)
    posterior = posterior.to(torch.float32)  # logvar -> std is where bf16 loses the most
    return posterior.mode() if mode == "mean" else posterior.sample(generator=generator)


@torch.no_grad()
def decode_sliced(model, z: torch.Tensor, slice_size: int | None = None, tile_size: int | None = None,
                  tile_overlap: int = 0) -> torch.Tensor:
    """Decode raw latents `z` [B, C, h, w] `slice_size` samples at a time (bounds activation memory by the slice)."""
    device = model_device(model)
    slice_size = slice_size or z.shape[0]
    outputs = []
    for start in range(0, z.shape[0], slice_size):
        chunk = z[start:start + slice_size].to(device)
        with autocast_for(device):
            if tile_size:
                from kl_autoencoder.tiling import decode_tiled
                out = decode_tiled(model, chunk, tile_size, tile_overlap)
            else:
                out = model.decode(chunk)
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
# folders of images <-> shards of latents


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
    def from_json(cls, data: dict) -> "ImageRecord":
        return cls(int(data["index"]), str(data["name"]), tuple(data["original_size"]), tuple(data["padded_size"]))


@dataclass
class FolderResult:
    """What a folder command did: images processed, files written, corrupt inputs skipped."""

    records: list[ImageRecord] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def summary(self) -> str:
        text = f"{len(self.records)} images, {len(self.written)} files written"
        if self.skipped:
            names = ", ".join(name for name, _ in self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            text += f"; skipped {len(self.skipped)} unreadable images: {names}"
        return text


def _iter_image_batches(input_folder: str | Path, batch_size: int, factor: int, result: FolderResult
                        ) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    """Read the folder in sorted order, grouping images of the same size into batches of padded tensors.

    Only one partly filled batch per distinct size is held in memory. Unreadable files are recorded in `result.skipped`.
    """
    from kl_autoencoder.data import BadImageError, image_to_tensor, iter_image_folder, load_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(input_folder)
    pending: dict[tuple[int, int], list[tuple[ImageRecord, torch.Tensor]]] = defaultdict(list)
    index = 0
    paths = [root] if root.is_file() else iter_image_folder(root)
    for path in paths:
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        try:
            pixels = image_to_tensor(load_image(path))
        except BadImageError as err:
            result.skipped.append((name, getattr(err, "reason", str(err))))
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


def _write_shard(path: Path, latents: dict[int, torch.Tensor], records: list[ImageRecord], model) -> Path:
    from safetensors.torch import save_file

    from kl_autoencoder.durable import atomic_write

    metadata = {
        "images": json.dumps([r.to_json() for r in sorted(records, key=lambda r: r.index)]),
        "scaling_factor": json.dumps(model.config.scaling_factor),
        "shift_factor": json.dumps(model.config.shift_factor),
        "latent_channels": str(model.config.latent_channels),
        "downsampling_factor": str(model.config.downsampling_factor),
    }
    tensors = {str(i): t.contiguous() for i, t in latents.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def encode_folder(model, input_folder: str | Path, out: str | Path, batch_size: int = 8, mode: str = "mean",
                  tile_size: int | None = None, tile_overlap: int = 64, shard_size: int = 1024,
                  generator: torch.Generator | None = None) -> FolderResult:
    """Encode every image under `input_folder` into diffusion latents, written to `out/latents-00000.safetensors`, ...

    Each image becomes one float32 tensor [C, h, w] keyed by its index; sizes that are not multiples of the
    downsampling factor are reflect-padded (and recorded, so `decode_latents` crops back).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = FolderResult()
    device = model_device(model)
    buffer: dict[int, torch.Tensor] = {}
    buffer_records: list[ImageRecord] = []

    def flush() -> None:
        if buffer:
            result.written.append(_write_shard(out / SHARD_PATTERN.format(len(result.written)), buffer, buffer_records, model))
            buffer.clear()
            buffer_records.clear()

    with tqdm(desc="encoding", unit="img") as progress:  # `with`: the bar ends its line even on an error
        for records, pixels in _iter_image_batches(input_folder, batch_size, model.config.downsampling_factor, result):
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


def latent_shards(latents_path: str | Path) -> list[Path]:
    """A single shard file, or every `latents-*.safetensors` in a folder (sorted)."""
    path = Path(latents_path)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("latents-*.safetensors")) if path.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"no latents found at {path} (expected a latents-*.safetensors file or a folder of them)")
    return shards


def read_shard(path: str | Path, latent_channels: int | None = None) -> list[tuple[ImageRecord, torch.Tensor]]:
    """(record, diffusion latent [C, h, w]) pairs of one shard, checked against the model's channel count."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated / foreign files
        raise LatentFormatError(f"{path}: not a readable safetensors latents file ({err})") from err
    if "images" not in metadata:
        raise LatentFormatError(f"{path}: no 'images' metadata (was it written by `kl-autoencoder encode`?)")
    records = [ImageRecord.from_json(d) for d in json.loads(metadata["images"])]
    pairs = []
    for record in records:
        latent = tensors.get(str(record.index))
        if latent is None:
            raise LatentFormatError(f"{path}: metadata lists image {record.index} ({record.name}) but has no tensor for it")
        if latent.dim() != 3:
            raise LatentFormatError(f"{path}: latent {record.index} has shape {tuple(latent.shape)}, expected [C, h, w]")
        if latent_channels is not None and latent.shape[0] != latent_channels:
            raise LatentFormatError(
                f"{path}: latents have {latent.shape[0]} channels but the model expects {latent_channels} "
                f"(latent {record.index}, {record.name})"
            )
        pairs.append((record, latent))
    return pairs


def _png_name(name: str) -> str:
    return str(Path(name).with_suffix(".png"))


def _crop_and_save(images: torch.Tensor, records: list[ImageRecord], out_folder: Path, result: FolderResult) -> None:
    from kl_autoencoder.data import tensor_to_image

    for image, record in zip(images, records):
        height, width = record.original_size
        target = out_folder / _png_name(record.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tensor_to_image(image[:, :height, :width].cpu()).save(target)
        result.written.append(target)
        result.records.append(record)


def iter_decoded(model, latents_path: str | Path, batch_size: int = 8, tile_size: int | None = None,
                 tile_overlap: int = 64) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    """Decode shards batch by batch, grouping latents of one shape: (records, padded images [B, 3, H, W] in ~[-1, 1]).

    Raises LatentFormatError naming the file when a shard's channel count is not the model's."""
    channels = model.config.latent_channels
    device = model_device(model)
    for shard in latent_shards(latents_path):
        pairs = read_shard(shard, channels)
        by_shape: dict[tuple[int, ...], list[tuple[ImageRecord, torch.Tensor]]] = defaultdict(list)
        for record, latent in pairs:
            by_shape[tuple(latent.shape)].append((record, latent))
        for group in by_shape.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                z = model.from_diffusion_latents(torch.stack([t for _, t in chunk]).to(device))
                yield [r for r, _ in chunk], decode_sliced(model, z, batch_size, tile_size, tile_overlap)


def decode_latents(model, latents_path: str | Path, out_folder: str | Path, batch_size: int = 8,
                   tile_size: int | None = None, tile_overlap: int = 64) -> FolderResult:
    """Decode shards written by `encode_folder` into PNGs with the original names (suffix .png) and sizes."""
    out_folder = Path(out_folder)
    result = FolderResult()
    with tqdm(desc="decoding", unit="img") as progress:
        for records, images in iter_decoded(model, latents_path, batch_size, tile_size, tile_overlap):
            _crop_and_save(images, records, out_folder, result)
            progress.update(len(records))
    return result


def reconstruct_folder(model, input_folder: str | Path, out_folder: str | Path, batch_size: int = 8,
                       mode: str = "mean", tile_size: int | None = None, tile_overlap: int = 64,
                       generator: torch.Generator | None = None) -> FolderResult:
    """Encode and decode every image in one pass (no scaling round trip), writing PNG reconstructions."""
    out_folder = Path(out_folder)
    result = FolderResult()
    device = model_device(model)
    with tqdm(desc="reconstructing", unit="img") as progress:
        for records, pixels in _iter_image_batches(input_folder, batch_size, model.config.downsampling_factor, result):
            z = encode_batch(model, pixels.to(device), mode, generator, tile_size, tile_overlap)
            _crop_and_save(decode_sliced(model, z, batch_size, tile_size, tile_overlap), records, out_folder, result)
            progress.update(len(records))
    if not result.records:
        raise ValueError(f"no readable images in {input_folder} ({len(result.skipped)} unreadable)")
    return result
