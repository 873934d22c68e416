"""Inference helpers: prior sampling, latent interpolation, and folder encode / decode / reconstruct.

Latents written to disk are *diffusion latents*: `model.to_diffusion_latents(z)` = (z - shift) * scale, the
tensors a latent diffusion model trains on. `decode_latents` inverts that before `model.decode`.

Shard format (`latents-00000.safetensors`, ...): one tensor per image keyed by its global index ("0", "1", ...),
each of shape [C, h, w] (float32), plus safetensors metadata "images": a JSON list of
{"index", "name", "original_size": [H, W], "padded_size": [H, W]}, and "scaling_factor"/"shift_factor".
Images whose sides are not multiples of the downsampling factor are reflect-padded on the bottom/right before
encoding and cropped back to `original_size` after decoding.

What the folder helpers promise about their outputs (all checked before the first file is written):
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

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kl_autoencoder.data import BadImageError, image_to_tensor, iter_image_folder, load_image, tensor_to_image
from kl_autoencoder.durable import atomic_write, check_regular_file
from kl_autoencoder.fastpath import FastPath, autocast, autocast_for, model_device  # noqa: F401
from kl_autoencoder.outputs import OutputLocationError, check_output, resolve, safe_parent  # noqa: F401 (re-exported)
from kl_autoencoder.tiling import check_tile_option, decode_tiled, encode_tiled, resolve_tile_size

SHARD_PATTERN = "latents-{:05d}.safetensors"
SHARD_GLOB = "latents-*.safetensors"


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
# where outputs go: names, folders, atomic writes

# Longest path component accepted in a name: the usual 255-byte file-name limit, less the 14 bytes atomic_write's
# temporary name adds (".NAME.xxxxxxxx.tmp") and a ".png" the output name may gain.
MAX_NAME_BYTES = 255 - 14 - 4
# A whole name (all its components) and its depth: far above any real photo tree, far below what makes a path too long
# to create (PATH_MAX is 4096 on Linux) or nests folders without end.
MAX_PATH_BYTES = 1024
MAX_DEPTH = 32




def _short(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: names in error messages come from files and may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a path relative to an output folder, or None when it can.

    Accepted: a relative POSIX path whose every component is a plain file name (what `encode` records for images
    in subfolders, e.g. "sub/b.png"). Refused: non-strings, empty names, absolute paths, "." / ".." / empty
    components, backslashes, NUL bytes and other control characters, components longer than MAX_NAME_BYTES bytes,
    names longer than MAX_PATH_BYTES or more than MAX_DEPTH components deep.
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):  # newlines and escapes garble listings and terminals
        return "contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    if name.count("/") >= MAX_DEPTH:
        return f"is nested {name.count('/') + 1} folders deep (at most {MAX_DEPTH})"
    if "\\" in name:
        return "contains a backslash (a path separator on Windows)"
    if name.startswith("/"):
        return "is an absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"has a {part or 'empty'!r} path component (names must stay inside the output folder)"
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > MAX_NAME_BYTES:
            return f"has a component of {size} bytes (at most {MAX_NAME_BYTES})"
    return None


def output_names(names: Sequence[str]) -> list[str]:
    """The PNG name (relative path) each input name is written to; all distinct, in the order given.

    `dir/photo.jpg` -> `dir/photo.png`. When several inputs would share that name (photo.jpg and photo.png), the
    one already named so keeps it and the others keep their extension in front of ".png": `photo.jpg.png`. Names are
    compared case-insensitively (as macOS and Windows file systems do); a clash this rule cannot separate is an
    OutputLocationError naming both inputs, raised before anything is written.
    """
    plain = [str(PurePosixPath(name).with_suffix(".png")) for name in names]
    claims = Counter(p.casefold() for p in plain)
    planned = [p if claims[p.casefold()] == 1 or p == name else f"{name}.png" for name, p in zip(names, plain)]
    owner: dict[str, str] = {}
    for name, out in zip(names, planned):
        other = owner.setdefault(out.casefold(), name)
        if other != name:
            raise OutputLocationError(f"inputs {_short(other)} and {_short(name)} would both be written to "
                                      f"{_short(out)}; rename one of them")
    return planned


def output_paths(out: Path, names: Sequence[str]) -> list[Path]:
    """`out / name` for each name, refusing (before anything is written) any whose folder resolves outside `out`
    (e.g. a symlinked subfolder), a name that another needs as a folder (`a.png` and `a.png/b.png`, compared
    case-insensitively), and a name whose path on disk is already a folder or passes through a file."""
    root = resolve(out, "output folder")
    folders = {str(parent).casefold() for name in names for parent in PurePosixPath(name).parents}
    paths = []
    for name in names:
        if name.casefold() in folders:
            raise OutputLocationError(f"{_short(name)} would be both a file and the folder of another output; rename "
                                      "one of them")
        target = out / name
        folder = resolve(target.parent, "output")
        if folder != root and not folder.is_relative_to(root):
            raise OutputLocationError(f"{_short(name)} would be written into {folder}, outside the output folder "
                                      f"{out} (a symlinked subfolder?)")
        _refuse_blocked(out, name)
        paths.append(target)
    return paths


def _refuse_blocked(out: Path, name: str) -> None:
    """Refuse `out/name` when it is already a folder, or one of its folders below `out` is already a file."""
    folder = out
    for part in PurePosixPath(name).parts[:-1]:
        folder = folder / part
        if folder.exists() and not folder.is_dir():
            raise OutputLocationError(f"{_short(name)} cannot be written: {folder} is a file, not a folder")
    if (out / name).is_dir():
        raise OutputLocationError(f"{_short(name)} cannot be written: {out / name} is a folder")


def check_output_folder(out: str | Path, *inputs: str | Path, kind: str = "input") -> None:
    """Refuse an output folder that is, or lies inside, one of the `inputs` folders, or is the folder holding an input
    file (see outputs.check_output): its outputs would overwrite the inputs, or be read back as inputs by the next
    run. `kind` names the inputs in the error."""
    check_output(out, "", inputs, kind=kind)


def refuse_overwriting_inputs(targets: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Refuse any output path that is (or resolves to) one of the input files."""
    sources = {path.resolve(): path for path in inputs}
    for target in targets:
        source = sources.get(target.resolve())
        if source is not None:
            raise OutputLocationError(f"output {target} is the input file {source}; choose another output folder")


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write an image tensor [3, H, W] in [-1, 1] to `path` as PNG, atomically: the file is complete or absent, and a
    symlink at `path` is replaced by the file, never written through."""

    picture = tensor_to_image(image.cpu())
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------------------------------
# folders of images <-> shards of latents


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
            raise ValueError(f"expected an object with index, name, original_size, padded_size; got {_short(data)}")
        missing = [key for key in ("index", "name", "original_size", "padded_size") if key not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        index, name = data["index"], data["name"]
        if not _is_int(index) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {_short(index)}")
        problem = name_problem(name)
        if problem:
            raise ValueError(f"name {_short(name)} {problem}")
        sizes = []
        for key in ("original_size", "padded_size"):
            size = data[key]
            if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
                raise ValueError(f"{key} must be [height, width], two positive integers; got {_short(size)}")
            sizes.append((size[0], size[1]))
        return cls(index, name, sizes[0], sizes[1])


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


def _write_shard(path: Path, latents: dict[int, torch.Tensor], records: list[ImageRecord], model) -> Path:


    metadata = {
        "images": json.dumps([r.to_json() for r in sorted(records, key=lambda r: r.index)]),
        "scaling_factor": json.dumps(model.config.scaling_factor),
        "shift_factor": json.dumps(model.config.shift_factor),
        "latent_channels": str(model.config.latent_channels),
        "downsampling_factor": str(model.config.downsampling_factor),
    }
    tensors = {str(i): t.contiguous() for i, t in latents.items()}
    from kl_autoencoder.latent_shards import write_exclusive  # FileExistsError rather than replace another's shard

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
    from kl_autoencoder.latent_shards import lock_folder, unlock_folder

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
        result.written.append(_write_shard(out / SHARD_PATTERN.format(len(result.written)), buffer, buffer_records, model))
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


def read_shard_header(path: str | Path, latent_channels: int | None = None,
                      factor: int | None = None) -> ShardHeader:
    """Check every record of one shard: well-formed metadata, a plain unique name, a float [C, h, w] tensor with
    `latent_channels` channels, and (given the downsampling `factor`) an original size the latent covers.

    Any problem is a LatentFormatError naming the shard and the record."""

    path = Path(path)
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
    records, shapes, names = [], {}, {}
    for position, entry in enumerate(entries):
        where = f"{path}: record {position}"
        try:
            record = ImageRecord.from_json(entry)
        except ValueError as err:
            raise LatentFormatError(f"{where}: {err}") from err
        where = f"{where} ({_short(record.name)})"
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
                raise LatentFormatError(f"{header.path}: record {_short(record.name)} is also in {other}; "
                                        "were two encodes written into one folder?")
    return headers


def read_shard(path: str | Path, latent_channels: int | None = None) -> list[tuple[ImageRecord, torch.Tensor]]:
    """(record, diffusion latent [C, h, w]) pairs of one shard, checked as `read_shard_header` checks them."""
    return _load_latents(read_shard_header(path, latent_channels))


def _load_latents(header: ShardHeader) -> list[tuple[ImageRecord, torch.Tensor]]:

    try:
        with safe_open(str(header.path), framework="pt") as f:
            return [(record, f.get_tensor(str(record.index)).float()) for record in header.records]
    except Exception as err:  # changed or truncated since its header was read
        raise LatentFormatError(f"{header.path}: cannot read its tensors ({err})") from err


def _decode_shards(model, headers: Sequence[ShardHeader], batch_size: int, tile_size: int | str | None,
                   tile_overlap: int) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    device = model_device(model)
    for header in headers:
        by_shape: dict[tuple[int, ...], list[tuple[ImageRecord, torch.Tensor]]] = defaultdict(list)
        for record, latent in _load_latents(header):
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
