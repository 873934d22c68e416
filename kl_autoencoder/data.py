"""Images in, `[3, R, R]` tensors in [-1, 1] out: dataset sources, transforms and bad-image skipping.

Sources (``DataConfig.source``):
  - ``"sample"``: 12 real colour photos shipped inside installed packages (scikit-image, scikit-learn, matplotlib;
    nothing to download). Fixed split (`SAMPLE_TRAIN` / `SAMPLE_HELDOUT`): ``chelsea``, ``coffee`` and ``flower``
    are held out and never trained on, the other 9 train. Training draws random crops at random scales
    (``data.max_crop_scale``; for this source by default from the whole photo down to native pixels), so a handful
    of photos still gives varied batches; ``data.random_hue`` turns crops' hues so that colour cannot be guessed
    from content (``null``, as configs/quickstart.yaml has it: `SAMPLE_RANDOM_HUE` for this source only, so a
    recipe pointed at your own folder does not inherit an augmentation meant for nine photos).
  - an image folder: a plain sorted file list (recursive, by extension). We do not use `datasets`'
    "imagefolder" builder here: it decodes eagerly inside Arrow and one corrupt file aborts the whole
    run, while a file list lets each read fail on its own, be counted, and be skipped.
  - a hub dataset name: ``datasets.load_dataset(name, split=..., streaming=...)``; the image column is the
    first column of feature type `Image`, else one named image/img/pixel_values, or ``image_column``.
    Decoding is switched off in `datasets` (``Image(decode=False)``) so that we decode, and skip, ourselves.
  - sharded sources (``"webdataset"`` / ``"parquet"`` with ``data_files``, a `datasets` save_to_disk folder): see
    `kl_autoencoder/shards.py`; `build_dataset` and `training_batches` hand them over there.

Large files are cheap: a folder's image is decoded once at the size its crops can use (JPEG decodes at 1/2-1/8 scale
via Pillow's draft mode, anything larger is shrunk) and kept in a per-process LRU cache of decoded pixels
(`ReducedImageCache`, 1 GiB by default), so a folder of 4K photos is not decoded again for every crop.

Small sources need many crops per epoch: training datasets repeat their images until an epoch holds at
least ``MIN_EPOCH_ITEMS`` (256) items, so ``drop_last`` batching never yields an empty epoch.

Bad images (corrupt, empty, truncated, not an image, decompression bombs): `load_image` raises
`BadImageError`. A dataset item whose image is bad is *replaced* by the next readable image (up to
``MAX_TRIES`` reads), so batches keep their size (steady step shapes, no rank falling out of step under
DDP). Each item carries the files it skipped; `collate_images` puts them in ``batch["skipped_files"]`` /
``batch["num_skipped"]``, because with DataLoader workers a counter inside the dataset lives in a worker
process and the main process never sees it. The main process aggregates with
``dataset.skipped.record_batch(batch)`` (a `SkipLog` counts distinct files, so recording the same skip
twice is harmless). If no readable image is found, the item is dropped; a batch of only such items has
``pixel_values`` of shape ``[0, 3, R, R]``: the trainer skips it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from kl_autoencoder.formats import is_local_path
from kl_autoencoder.untrusted import (
    MAX_ERROR_CHARS, arrow_cell_problem, array_problem, nested_shape, shown, too_many_pixels,
)

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)
SAMPLE_RANDOM_HUE = 0.5  # data.random_hue null: the share of the sample source's crops whose hues turn (0 elsewhere)
MIN_EPOCH_ITEMS = 256  # a training epoch over a small source repeats images up to at least this many items
MAX_TRIES = 8  # reads per item before giving up on finding a readable image
DEFAULT_CACHE_BYTES = 1 << 30  # decoded (reduced) folder images kept in memory per process, split among its workers
IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")

# The built-in sample photos: real colour photographs shipped inside installed packages (scikit-image, scikit-learn,
# matplotlib), so nothing is downloaded. name -> (package, what to load). The split is fixed: the held-out photos are
# never trained on, and their palettes (a tabby cat, a red cup on wood, a peach flower on dark teal leaves) are not
# those of any training photo. `colorwheel` is the one synthetic image: every hue at every saturation.
SAMPLE_PHOTOS = {
    "astronaut": ("skimage", "astronaut"),
    "rocket": ("skimage", "rocket"),
    "motorcycle": ("skimage", "stereo_motorcycle"),  # the left view; the right one is near-identical
    "china": ("sklearn", "china.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
    "immunohistochemistry": ("skimage", "immunohistochemistry"),
    "retina": ("skimage", "retina"),
    "hubble_deep_field": ("skimage", "hubble_deep_field"),
    "colorwheel": ("skimage", "colorwheel"),
    "chelsea": ("skimage", "chelsea"),
    "coffee": ("skimage", "coffee"),
    "flower": ("sklearn", "flower.jpg"),
}
SAMPLE_TRAIN = (
    "astronaut", "rocket", "motorcycle", "china", "grace_hopper", "immunohistochemistry", "retina",
    "hubble_deep_field", "colorwheel",
)
SAMPLE_HELDOUT = ("chelsea", "coffee", "flower")
# scikit-image's greyscale photos: in no sample split (never trained on), for trying a model on other real photos.
GREYSCALE_PHOTOS = ("camera", "moon", "coins", "brick", "grass", "gravel", "page", "cell")


class BadImageError(ValueError):
    """An image file that cannot be decoded; `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class DatasetUnavailableError(RuntimeError):
    """A hub dataset that could not be downloaded or opened."""


# --------------------------------------------------------------------------------------------- decoding


def _rescale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth or float pixels to 0..255 by their range, never by clipping at 255."""
    array = array.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = array / 257.0  # 65535 -> 255
    elif mode == "F":
        lo, hi = float(array.min()), float(array.max())
        # Floats in [0, 1] are intensities; anything else (HDR, depth) is stretched to its own range.
        scaled = array * 255.0 if lo >= 0.0 and hi <= 1.0 else (array - lo) / max(hi - lo, 1e-12) * 255.0
    else:  # "I": 32-bit ints, most often a 16-bit file that Pillow widened
        lo, hi = float(array.min()), float(array.max())
        if lo >= 0 and hi <= 255:
            scaled = array
        elif lo >= 0 and hi <= 65535:
            scaled = array / 257.0
        else:
            scaled = (array - lo) / max(hi - lo, 1.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_rescale_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def decode_image(source: str | os.PathLike | bytes, name: str | None = None, min_side: int | None = None
                 ) -> Image.Image:
    """Decode a file path or encoded bytes to an upright RGB image; any failure is a `BadImageError`.

    `min_side`: the caller needs no more than this many pixels on the shorter side, so a JPEG may be decoded at
    1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's `draft`), never below `min_side`. Only JPEG
    decodes reduced; the result is not resized here (see `reduce_to_side`).
    """
    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(name, "empty (0 bytes)")
        stream: Any = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise BadImageError(name, "empty file (0 bytes)")
        except OSError as err:
            raise BadImageError(name, f"{type(err).__name__}: {err}") from err
        stream = source
    import warnings

    try:
        with warnings.catch_warnings():
            # Between 1x and 2x its pixel limit Pillow only warns, then decodes anyway: treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                if min_side is not None and image.format == "JPEG":
                    image.draft(image.mode, (min_side, min_side))  # both sides stay >= min_side (any EXIF rotation)
                image.load()  # decode everything now: truncated data fails here, not halfway through a transform
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(name, f"{type(err).__name__}: {err} If the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS "
                                  "(kl-autoencoder: --max-image-pixels N, 0 for no limit).") from err
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ...)
        raise BadImageError(name, f"{type(err).__name__}: {err}") from err


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Read an image file as upright 8-bit RGB (EXIF orientation applied, alpha on white).

    `min_side`: return the image shrunk so that its shorter side is `min_side` (never enlarged; JPEGs decode
    reduced, see `decode_image`), for callers that never need more pixels than that.

    Raises `BadImageError(path, reason)` for missing, empty, truncated, undecodable files and for
    decompression bombs: anything over Pillow's `Image.MAX_IMAGE_PIXELS` (where Pillow itself only warns below
    twice the limit).
    """
    image = decode_image(path, str(path), min_side)
    return image if min_side is None else reduce_to_side(image, min_side)


def reduce_to_side(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk (antialiased) so that its shorter side is `side`; returned as it is when already that small."""
    width, height = image.size
    shorter = min(width, height)
    if shorter <= side:
        return image
    size = (max(1, round(width * side / shorter)), max(1, round(height * side / shorter)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


class ReducedImageCache:
    """Decoded images kept in memory, least recently used dropped first, up to `max_bytes` of pixels.

    A folder of large photos would otherwise decode every file again for every crop (a 3840x2560 JPEG: ~0.2 s,
    reduced decoding ~0.05 s, a crop of the cached copy well under 1 ms). Each DataLoader worker holds its own
    cache (the dataset is copied into the worker), so the budget is split between the workers.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0

    def _budget(self) -> int:
        worker = get_worker_info()
        return self.max_bytes // (worker.num_workers if worker is not None else 1)

    def get(self, key: str, load: Callable[[], Image.Image]) -> Image.Image:
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            return image
        image = load()
        size = image.width * image.height * len(image.getbands())
        budget = self._budget()
        if size <= budget:
            while self._images and self._bytes + size > budget:
                _, old = self._images.popitem(last=False)
                self._bytes -= old.width * old.height * len(old.getbands())
            self._images[key] = image
            self._bytes += size
        return image

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        return self._bytes


# --------------------------------------------------------------------------------------------- tensors


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [3, H, W] in [-1, 1]."""
    # The arithmetic is done in numpy, single-threaded: torch's intra-op threads cost far more than they
    # save on one image (~10x the CPU time on a busy 2-core machine, measured).
    array = np.asarray(to_rgb(image), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    array /= 127.5
    array -= 1.0
    return torch.from_numpy(array)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] (or [1, 3, H, W]) in [-1, 1] -> 8-bit RGB PIL image (values clamped)."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3, H, W] or [1, 3, H, W], got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return Image.fromarray(tensor.permute(1, 2, 0).numpy(), mode="RGB")


def rotate_hue(pixels: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the colours of [3, H, W] pixels in [-1, 1] by `angle` radians about the grey axis (R = G = B).

    Brightness (the mean of R, G, B) and saturation are kept and hue turns: an orange photo becomes green, then
    blue. Colours pushed past the RGB cube are clipped to [-1, 1].
    """
    c, s = math.cos(angle), math.sin(angle)
    a, b = (1 - c) / 3, s / math.sqrt(3)
    # Rodrigues' rotation about the unit axis (1, 1, 1) / sqrt(3): circulant, rows sum to 1.
    rotation = torch.tensor([[c + a, a - b, a + b], [a + b, c + a, a - b], [a - b, a + b, c + a]], dtype=pixels.dtype)
    return torch.einsum("ij,jhw->ihw", rotation, pixels).clamp_(-1.0, 1.0)


class ImageTransform:
    """Resize the shorter side to `resolution` and crop a `resolution` square; optional flip and hue turn; to [-1, 1].

    Smaller images are resized up. With `max_scale` > 1 (random crops only) the shorter side is instead
    resized to `resolution * s`, s log-uniform in [1, max_scale] but never past the native size
    (`max_scale=None`: up to the native size): crops then range from the whole photo to native pixels.
    Resize and crop happen in one `Image.resize(box=...)` call, so large photos are never resized whole.
    `random_hue`: the probability of turning a crop's hues by a uniform random angle (`rotate_hue`), so that no
    colour is tied to the content it was seen with (a few training photos otherwise teach "cat texture ->
    orange" instead of passing colour through the latent).
    Randomness comes from torch's RNG, which DataLoader seeds per worker.
    """

    def __init__(self, resolution: int, random_crop: bool, random_flip: bool, max_scale: float | None = 1.0,
                 random_hue: float = 0.0):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if max_scale is not None and max_scale < 1.0:
            raise ValueError(f"max_scale must be >= 1 or None, got {max_scale!r}")
        if not 0.0 <= random_hue <= 1.0:
            raise ValueError(f"random_hue is a probability in [0, 1], got {random_hue!r}")
        self.resolution = int(resolution)
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.max_scale = max_scale
        self.random_hue = random_hue

    @property
    def source_side(self) -> int | None:
        """The most pixels the shorter side of a source image can contribute (None: all of them, native crops).
        An image reduced to this shorter side gives the same crops as the original."""
        if not self.random_crop or self.max_scale == 1.0:
            return self.resolution
        return None if self.max_scale is None else math.ceil(self.resolution * self.max_scale)

    def _shorter_side_target(self, shorter: int) -> float:
        if not self.random_crop or self.max_scale == 1.0:
            return float(self.resolution)
        upper = float(max(shorter, self.resolution))
        if self.max_scale is not None:
            upper = min(upper, self.resolution * self.max_scale)
        u = torch.rand(()).item()
        return math.exp(math.log(self.resolution) + u * (math.log(upper) - math.log(self.resolution)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        width, height = image.size
        shorter = min(width, height)
        # never past the image: exp(log(64)) is 63.99999999999998, so a 64-px photo asked for a 64.00000000000003 crop
        crop = min(shorter * self.resolution / self._shorter_side_target(shorter), shorter)
        if self.random_crop:
            left = torch.rand(()).item() * (width - crop)
            top = torch.rand(()).item() * (height - crop)
        else:
            left, top = (width - crop) / 2, (height - crop) / 2
        size = (self.resolution, self.resolution)
        image = image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop))
        if self.random_flip and torch.rand(()).item() < 0.5:
            image = ImageOps.mirror(image)
        pixels = image_to_tensor(image)
        if self.random_hue and torch.rand(()).item() < self.random_hue:
            pixels = rotate_hue(pixels, 2 * math.pi * torch.rand(()).item())
        return pixels


def build_transform(
    resolution: int, random_crop: bool, random_flip: bool, max_scale: float | None = 1.0, random_hue: float = 0.0
) -> ImageTransform:
    """The training (random crop/flip/hue) or evaluation (centre crop) transform: PIL -> [3, R, R] in [-1, 1]."""
    return ImageTransform(resolution, random_crop, random_flip, max_scale, random_hue)


# --------------------------------------------------------------------------------------------- sources


@lru_cache(maxsize=None)
def _sample_array(name: str) -> np.ndarray:
    package, what = SAMPLE_PHOTOS[name]
    if package == "skimage":
        import skimage.data

        array = getattr(skimage.data, what)()
        return array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(what)
    import matplotlib

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / what) as image:
        return np.asarray(image.convert("RGB"))


def sample_images(split: str = "train") -> list[tuple[str, Image.Image]]:
    """The built-in photos as (name, RGB image): split "train" (9), "heldout" (3) or "all" (12)."""
    names = {"train": SAMPLE_TRAIN, "heldout": SAMPLE_HELDOUT, "all": SAMPLE_TRAIN + SAMPLE_HELDOUT}.get(split)
    if names is None:
        raise ValueError(f"unknown sample split {split!r}; expected 'train', 'heldout' or 'all'")
    return [(name, to_rgb(Image.fromarray(_sample_array(name)))) for name in names]


def greyscale_images() -> list[tuple[str, Image.Image]]:
    """scikit-image's 8 greyscale photos (`GREYSCALE_PHOTOS`) as (name, mode "L" image), in that order."""
    import skimage.data

    return [(name, Image.fromarray(getattr(skimage.data, name)())) for name in GREYSCALE_PHOTOS]


def iter_image_folder(folder: str | os.PathLike) -> list[Path]:
    """All image files under `folder` (recursive, extension matched case-insensitively), sorted."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(
            f"no image files in {str(root)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def load_hub_dataset(name: str, split: str = "train", streaming: bool = False, cache_dir: str | None = None,
                     option: str = "data.source"):
    """`datasets.load_dataset` with a clear error when the dataset cannot be fetched (offline, typo, split); `option`
    is how the command in use names the source (data.source in a training config, --data for evaluate)."""
    import datasets

    given = (lambda value: f"{option} {value}") if option.startswith("-") else (lambda value: f"{option}={value}")

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown name, unknown split: all surface as different types
        raise DatasetUnavailableError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {err}\n"
            "If this machine is offline the dataset could not be downloaded: download it where there is a "
            "network (it is then read from the cache), or put the images in a local folder and pass "
            f"{given('FOLDER')} (or {given('sample')} for the built-in photos)."
        ) from err


def find_image_column(features: Any, image_column: str | None = None) -> str:
    """The image column of a `datasets` feature dict: `image_column` if given, else the first `Image`
    feature, else the first of image/img/pixel_values. A clear error lists the columns otherwise."""
    import datasets

    columns = list(features or {})
    if image_column is not None:
        if image_column not in columns:
            raise KeyError(f"image column {image_column!r} not in the dataset; its columns are {columns}")
        return image_column
    for column in columns:
        if isinstance(features[column], datasets.Image):
            return column
    for column in IMAGE_COLUMN_NAMES:
        if column in columns:
            return column
    raise KeyError(
        f"no image column found (no column of type Image, none named {', '.join(IMAGE_COLUMN_NAMES)}); "
        f"the dataset's columns are {columns}: set data.image_column"
    )


def decode_hub_value(value: Any, name: str, local_paths: bool | str = False) -> Image.Image:
    """One image-column value of a `datasets` row -> RGB image: undecoded {"bytes", "path"}, PIL, or array.

    A value that names a file instead of holding the image (a path, or {"bytes": None, "path": ...}) is read only
    with `local_paths` True, or when it lies inside the folder `local_paths` names (a dataset from someone else could
    name any file of this machine); every form is held to the pixel limit before it is decoded or converted."""
    if isinstance(value, Image.Image):
        problem = too_many_pixels(*value.size)
        if problem:
            raise BadImageError(name, problem)
        return to_rgb(ImageOps.exif_transpose(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"], value.get("path") or name)
        if value.get("path"):
            return decode_image(local_image_path(value["path"], name, local_paths))
        raise BadImageError(name, "image entry has neither bytes nor path")
    if isinstance(value, str):
        return decode_image(local_image_path(value, name, local_paths), name)
    if isinstance(value, bytes):
        return decode_image(value, name)
    problem = array_problem(nested_shape(value))
    if problem:
        raise BadImageError(name, problem)
    try:
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = _rescale_to_uint8(array, "F")
        return to_rgb(Image.fromarray(array))
    except Exception as err:
        raise BadImageError(name, f"cannot interpret value of type {type(value).__name__} as an image: {err}") from err


def local_image_path(path: str, name: str, allowed: bool | str) -> str:
    """`path`, a file a dataset cell names, when following such names is `allowed` (True, or a folder it lies in);
    else a `BadImageError` that says nothing of the file (not even whether it exists)."""
    if isinstance(allowed, str):
        root = os.path.realpath(os.path.expanduser(allowed))
        allowed = os.path.realpath(os.path.expanduser(path)).startswith(root.rstrip(os.sep) + os.sep)
    if not allowed:
        raise BadImageError(name, f"the cell names a local file ({shown(path, 80)}) instead of holding the image; "
                                  "not followed (set data.allow_local_paths=true, or encode --allow-local-paths, if "
                                  "you trust the dataset)")
    return path


def hub_download_folder(cache_dir: str | None = None) -> str:
    """Where `datasets` keeps what it downloads and extracts: the only files a hub dataset's path cells may name
    (unless data.allow_local_paths)."""
    import datasets

    return str(cache_dir or datasets.config.HF_DATASETS_CACHE)


def checked_cell(arrow_rows: Any, index: int, column: str, name: str) -> Any:
    """Row `index`'s `column` of a `datasets.Dataset` in Arrow format, as Python, once its size is checked
    (`untrusted.arrow_cell_problem`): a hostile cell fails before it becomes gigabytes of Python objects."""
    cell = arrow_rows[index].column(column).combine_chunks()
    problem = arrow_cell_problem(cell)
    if problem:
        raise BadImageError(name, problem)
    return cell.to_pylist()[0]


def _is_encoded_image(value: Any) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, dict) and ("bytes" in value or "path" in value))


def _undecoded(hf_dataset: Any, column: str) -> Any:
    """Switch off `datasets`' own decoding of an Image column so a corrupt file is ours to skip."""
    import datasets

    features = hf_dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image):
        return hf_dataset.cast_column(column, datasets.Image(decode=False))
    return hf_dataset


# --------------------------------------------------------------------------------------------- datasets


class SkipLog:
    """Distinct files skipped as unreadable, with the reason; safe to share between threads."""

    def __init__(self):
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            if path not in self._reasons:
                logger.warning("skipping unreadable image %s (%s)", shown(path), shown(reason, MAX_ERROR_CHARS))
            self._reasons[path] = reason

    def record_batch(self, batch: dict) -> None:
        """Aggregate a collated batch's skips in the main process (they happened in a worker)."""
        for path, reason in zip(batch.get("skipped_files", ()), batch.get("skip_reasons", ())):
            self.add(path, reason)

    @property
    def files(self) -> list[str]:
        with self._lock:
            return sorted(self._reasons)

    @property
    def reasons(self) -> dict[str, str]:
        with self._lock:
            return dict(self._reasons)

    @property
    def count(self) -> int:
        return len(self._reasons)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SkipLog(count={self.count})"


class ImageDataset(Dataset):
    """Map-style dataset of `num_images` images repeated `repeats` times; subclasses implement `load`.

    Items are {"pixel_values": [3, R, R], "path": name, "skipped": [(name, reason), ...]}; an unreadable
    image is replaced by the next one (see the module docstring); `pixel_values` is None if none was found.
    """

    def __init__(self, transform: ImageTransform, repeats: int = 1):
        self.transform = transform
        self.resolution = transform.resolution
        self.repeats = max(1, int(repeats))
        self.skipped = SkipLog()

    @property
    def num_images(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_images * self.repeats

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        skipped = []
        for offset in range(min(MAX_TRIES, self.num_images)):
            image_index = (index + offset) % self.num_images
            try:
                image = self.load(image_index)
            except BadImageError as err:
                skipped.append((err.path, err.reason))
                if get_worker_info() is None:  # in a worker this copy of the log is lost: the batch carries it
                    self.skipped.add(err.path, err.reason)
                continue
            return {"pixel_values": self.transform(image), "path": self.name(image_index), "skipped": skipped}
        return {"pixel_values": None, "path": None, "skipped": skipped}


class ImageFolderDataset(ImageDataset):
    """Image files read lazily from disk, each read able to fail on its own.

    Each file is decoded once at the size the transform can use (`ImageTransform.source_side`: JPEGs decode
    reduced, anything larger is shrunk) and kept in a `ReducedImageCache` of `cache_bytes` (0: no cache), so a
    folder of 4K photos trains as fast as one of small photos once every file has been read.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: ImageTransform, repeats: int = 1,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(transform, repeats)
        if not paths:
            raise ValueError("ImageFolderDataset needs at least one image path")
        self.paths = [str(p) for p in paths]
        self.cache = ReducedImageCache(cache_bytes)

    @property
    def num_images(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        return self.cache.get(path, partial(load_image, path, self.transform.source_side))


class PhotoListDataset(ImageDataset):
    """Images already in memory (the built-in sample photos)."""

    def __init__(self, photos: Sequence[tuple[str, Image.Image]], transform: ImageTransform, repeats: int = 1):
        super().__init__(transform, repeats)
        if not photos:
            raise ValueError("PhotoListDataset needs at least one photo")
        self.photos = list(photos)

    @property
    def num_images(self) -> int:
        return len(self.photos)

    def name(self, index: int) -> str:
        return self.photos[index][0]

    def load(self, index: int) -> Image.Image:
        return self.photos[index][1]


class HFImageDataset(ImageDataset):
    """A map-style `datasets.Dataset`, image column decoded by us."""

    def __init__(self, hf_dataset: Any, column: str, transform: ImageTransform, repeats: int = 1, prefix: str = "",
                 local_paths: bool | str = False):
        super().__init__(transform, repeats)
        if len(hf_dataset) == 0:
            raise ValueError(f"dataset {prefix or '(in memory)'} has no rows")
        self.hf_dataset = _undecoded(hf_dataset.select_columns([column]), column)
        self.arrow_rows = self.hf_dataset.with_format("arrow")  # cells checked before they become Python objects
        self.column = column
        self.prefix = prefix
        self.local_paths = local_paths

    @property
    def num_images(self) -> int:
        return len(self.hf_dataset)

    def name(self, index: int) -> str:
        return f"{self.prefix}[{index}]"

    def load(self, index: int) -> Image.Image:
        name = self.name(index)
        return decode_hub_value(checked_cell(self.arrow_rows, index, self.column, name), name, self.local_paths)


class HFIterableImageDataset(IterableDataset):
    """A streaming `datasets.IterableDataset`, image column decoded by us.

    Inside DataLoader workers `datasets` hands each worker its own shards (found via `get_worker_info`),
    so each example comes out once; workers beyond `num_shards` stay idle. Across processes (DDP), `for_rank`
    gives each rank its own share.
    """

    def __init__(self, hf_dataset: Any, transform: ImageTransform, image_column: str | None = None, prefix: str = "",
                 local_paths: bool | str = False):
        super().__init__()
        self.local_paths = local_paths
        # Streams may not know their features before the first row: then the column is found on it.
        self.column = find_image_column(hf_dataset.features, image_column) if hf_dataset.features else None
        self.hf_dataset = _undecoded(hf_dataset, self.column) if self.column else hf_dataset
        self.image_column = image_column
        self.transform = transform
        self.resolution = transform.resolution
        self.prefix = prefix
        self.skipped = SkipLog()

    def for_rank(self, rank: int, world: int) -> "HFIterableImageDataset":
        """This process's share of the stream (whole shards where they divide evenly, else every world-th row)."""
        from datasets.distributed import split_dataset_by_node

        share = HFIterableImageDataset.__new__(HFIterableImageDataset)
        share.__dict__.update(self.__dict__)
        share.hf_dataset = split_dataset_by_node(self.hf_dataset, rank=rank, world_size=world)
        share.prefix = f"{self.prefix}{{rank {rank}/{world}}}"
        return share

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a shuffled stream differently each epoch."""
        if hasattr(self.hf_dataset, "set_epoch"):
            self.hf_dataset.set_epoch(epoch)

    def _column_of(self, example: dict) -> str:
        if self.column is None:  # features unknown until the first row: infer them from its values
            import datasets

            inferred = {key: datasets.Image() if _is_encoded_image(value) else None for key, value in example.items()}
            self.column = find_image_column(inferred, self.image_column)
        return self.column

    def pass_undecoded(self, batches: int, batch_size: int) -> None:
        """Let the next pass leave undecoded the rows of its first `batches` batches (a resume skips them)."""
        self.undecoded = (batches, batch_size)

    def _undecoded_rows(self, worker: Any) -> int:
        """Rows of this worker that surely fall in the skipped batches: the DataLoader takes batches from its workers
        in turn, so worker w's j-th batch is among the first j * W + w + 1 (sooner when another worker runs dry)."""
        batches, batch_size = getattr(self, "undecoded", (0, 0))
        workers, index = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return len(range(index, batches, workers)) * batch_size

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        tag = f"w{worker.id}:" if worker is not None else ""
        undecoded = self._undecoded_rows(worker)
        for position, example in enumerate(self.hf_dataset):
            if position < undecoded:  # in a batch the resume skips: read, never decoded
                yield {"pixel_values": None, "path": None, "skipped": []}
                continue
            name = f"{self.prefix}[{tag}{position}]"
            try:
                image = decode_hub_value(example[self._column_of(example)], name, self.local_paths)
            except BadImageError as err:
                if worker is None:
                    self.skipped.add(err.path, err.reason)
                yield {"pixel_values": None, "path": None, "skipped": [(err.path, err.reason)]}
                continue
            yield {"pixel_values": self.transform(image), "path": name, "skipped": []}


def dataset_from_hf(
    hf_dataset: Any,
    transform: ImageTransform,
    image_column: str | None = None,
    repeats: int = 1,
    name: str = "",
    local_paths: bool | str = False,
) -> HFImageDataset | HFIterableImageDataset:
    """Wrap a `datasets.Dataset` (map-style) or `datasets.IterableDataset` (streaming) as a torch dataset;
    `local_paths`: follow cells that name a local file, or those inside this folder (see `decode_hub_value`)."""
    import datasets

    if isinstance(hf_dataset, datasets.IterableDataset):
        return HFIterableImageDataset(hf_dataset, transform, image_column, prefix=name, local_paths=local_paths)
    column = find_image_column(hf_dataset.features, image_column)
    return HFImageDataset(hf_dataset, column, transform, repeats=repeats, prefix=name, local_paths=local_paths)


def _repeats_for(num_images: int, train: bool) -> int:
    return max(1, math.ceil(MIN_EPOCH_ITEMS / num_images)) if train else 1


def source_random_hue(random_hue: float | None, is_sample: bool) -> float:
    """data.random_hue for a source: a number applies to any source; None means SAMPLE_RANDOM_HUE for the built-in
    sample photos (nine photos need every hue shown) and 0 for any other source (real data has its own colours)."""
    if random_hue is not None:
        return random_hue
    return SAMPLE_RANDOM_HUE if is_sample else 0.0


def build_dataset(
    data_cfg: DataConfig, split: str | None = None, train: bool | None = None
) -> ImageDataset | HFIterableImageDataset:
    """The torch dataset described by `data_cfg`; items hold `pixel_values` [3, R, R] in [-1, 1].

    `split` defaults to `data_cfg.split` ("train"/"heldout"/"all" for "sample", the hub split for hub
    datasets, ignored for folders). `train` (default: split starts with "train") turns on random
    crop/flip per `data_cfg` and the virtual epoch length; otherwise centre crops, one pass.
    """
    split = split or data_cfg.split
    train = split.startswith("train") if train is None else train
    resolution = data_cfg.resolution
    random_crop, random_flip = (data_cfg.random_crop, data_cfg.random_flip) if train else (False, False)
    source = str(data_cfg.source)
    is_sample = source == "sample" or source.startswith("sample:")
    random_hue = source_random_hue(data_cfg.random_hue, is_sample) if train else 0.0
    max_scale = data_cfg.max_crop_scale
    if max_scale is None:  # per source: native-pixel crops give variety from a few sample photos; LDM's whole-photo
        max_scale = None if is_sample else 1.0  # crops elsewhere
    transform = build_transform(resolution, random_crop, random_flip, max_scale, random_hue)

    if is_sample:
        photos = sample_images(source.partition(":")[2] or split)[: data_cfg.max_images]
        return PhotoListDataset(photos, transform, repeats=_repeats_for(len(photos), train))

    from kl_autoencoder.shards import SHARD_SOURCES, build_shard_dataset, is_saved_dataset

    if source in SHARD_SOURCES or (is_local_path(source) and is_saved_dataset(source)):
        return build_shard_dataset(data_cfg, transform, train, _repeats_for)

    if is_local_path(source):
        paths = iter_image_folder(source)[: data_cfg.max_images]
        return ImageFolderDataset(paths, transform, repeats=_repeats_for(len(paths), train))

    hf = load_hub_dataset(source, split=split, streaming=data_cfg.streaming, cache_dir=data_cfg.cache_dir)
    paths = data_cfg.allow_local_paths or hub_download_folder(data_cfg.cache_dir)  # path cells: datasets' downloads
    if data_cfg.streaming:
        if data_cfg.max_images:
            hf = hf.take(data_cfg.max_images)
        if train and data_cfg.shuffle_buffer > 1:
            hf = hf.shuffle(seed=0, buffer_size=data_cfg.shuffle_buffer)
        return dataset_from_hf(hf, transform, data_cfg.image_column, name=f"{source}/{split}", local_paths=paths)
    if data_cfg.max_images:
        hf = hf.select(range(min(data_cfg.max_images, len(hf))))
    repeats = _repeats_for(len(hf), train)
    return dataset_from_hf(hf, transform, data_cfg.image_column, repeats, name=f"{source}/{split}", local_paths=paths)


# --------------------------------------------------------------------------------------------- loading


def collate_images(items: Sequence[dict], resolution: int | None = None) -> dict:
    """Stack readable items; report the files skipped while building them.

    Returns {"pixel_values": [B, 3, R, R], "paths", "num_skipped", "skipped_files", "skip_reasons"};
    B may be 0 when no item was readable (then the trainer skips the batch).
    """
    good = [item for item in items if item["pixel_values"] is not None]
    skipped = [pair for item in items for pair in item["skipped"]]
    if good:
        pixel_values = torch.stack([item["pixel_values"] for item in good])
    else:
        side = resolution or 0
        pixel_values = torch.zeros(0, 3, side, side)
    batch = {
        "pixel_values": pixel_values,
        "paths": [item["path"] for item in good],
        "num_skipped": len(skipped),
        "skipped_files": [path for path, _ in skipped],
        "skip_reasons": [reason for _, reason in skipped],
    }
    counts = {url: n for item in items for url, n in item.get("shard_counts", {}).items()}
    if counts:  # shard sample counts a stream's worker found: the main process records them (shards.ShardSet)
        batch["shard_counts"] = counts
    return batch


def default_num_workers() -> int:
    """DataLoader workers for this process: its share of the node's cores (cores / the processes launched on the node,
    LOCAL_WORLD_SIZE as torchrun and `accelerate launch` set it), none on a share of 1-2 cores (a worker would fight
    the training step for the only other core), else one per core of the share but one, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    share = cores // local_processes
    return 0 if share <= 2 else min(share - 1, 8)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader with the skip-aware collate; seeded shuffling; `drop_last` defaults to `shuffle`
    (training). Streaming datasets are not shuffled here (their stream is, in `build_dataset`)."""
    workers = default_num_workers() if num_workers is None else int(num_workers)
    iterable = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        collate_fn=partial(collate_images, resolution=getattr(dataset, "resolution", None)),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=shuffle if drop_last is None else drop_last,
    )


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
    named: list[tuple[str, Image.Image]] = []
    if source == "sample" or source.startswith("sample:"):
        named = sample_images(source.partition(":")[2] or "all")[:num_images]
    elif is_local_path(source):
        for path in iter_image_folder(source):
            if num_images is not None and len(named) >= num_images:
                break
            try:
                named.append((str(path), load_image(path)))
            except BadImageError as err:
                skipped.add(err.path, err.reason)
        if not named:
            raise FileNotFoundError(f"no readable images in {source!r}")
    else:
        hf = load_hub_dataset(source, split=split, streaming=num_images is not None, option="--data")
        if num_images is not None:
            hf = hf.take(num_images)
        column = find_image_column(hf.features, None) if hf.features else "image"
        for index, row in enumerate(_undecoded(hf, column)):
            name = f"{source}/{split}[{index}]"
            try:
                named.append((name, decode_hub_value(row[column], name, local_paths=hub_download_folder())))
            except BadImageError as err:
                skipped.add(err.path, err.reason)
        if not named:
            raise ValueError(f"no readable images in dataset {source!r} split {split!r}")
    return [name for name, _ in named], torch.stack([transform(image) for _, image in named])


# --------------------------------------------------------------------------------------------- training batches
#
# The data order is a pure function of (seed, epoch, rank) and every item's crop/flip of (seed, epoch, position), so a
# resumed run replays exactly the batches a straight run would have seen, with or without DataLoader workers; the
# resume position is one number, the micro-batches this rank has consumed.


class EpochSampler(Sampler):
    """This rank's items of one epoch: a permutation seeded by (seed, epoch), every `world`-th item, from `start`.

    Yields (index, item_seed) pairs: `SeededItems` seeds torch's RNG with item_seed before building the item, so
    random crops/flips are the same in a resumed run, in the main process or in any DataLoader worker.
    """

    def __init__(self, length: int, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True, start: int = 0):
        self.length, self.seed, self.epoch = length, seed, epoch
        self.rank, self.world, self.shuffle, self.start = rank, world, shuffle, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        per_rank = self.length // self.world  # equal shares keep the ranks in step
        mine = order[self.rank::self.world][:per_rank].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for position in range(self.start, len(mine)):
            yield mine[position], (base + position * self.world + self.rank) % (2**63)

    def __len__(self) -> int:
        return max(0, self.length // self.world - self.start)


class SeededItems(Dataset):
    """Dataset view that takes (index, seed) and builds the item under that seed (global RNG restored)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, rank: int, world: int, start_batch: int,
                  num_workers: int) -> DataLoader:
    collate = partial(collate_images, resolution=getattr(dataset, "resolution", None))
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=True)
    sampler = EpochSampler(len(dataset), seed, epoch, rank, world, start=start_batch * batch_size)
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=True, pin_memory=torch.cuda.is_available())


def order_workers(dataset: Dataset, world: int, workers: int) -> int:
    """The DataLoader workers per process a stream's batch order depends on; 0 for map-style data, whose order
    depends on the seed and the processes only (workers build the items the sampler picks)."""
    if hasattr(dataset, "at"):  # shards.ShardStream: as many as get a shard
        from kl_autoencoder.shards import usable_workers

        return usable_workers(len(dataset.shards), world, workers)
    return max(1, workers) if isinstance(dataset, IterableDataset) else 0


def training_batches(dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                     batches_seen: int = 0, num_workers: int | None = None) -> Iterator[dict]:
    """Endless collated batches for this rank, resuming after `batches_seen` of its batches (epochs included).

    Map-style datasets: each rank draws its own share of every epoch's permutation. Streams: each rank reads its own
    share of the stream (`datasets.distributed.split_dataset_by_node`), so no rank decodes another rank's images;
    a resumed stream passes the batches already seen without decoding them (`HFIterableImageDataset.pass_undecoded`).
    """
    workers = default_num_workers() if num_workers is None else num_workers
    if hasattr(dataset, "at"):  # shards.ShardStream: its position is a function of batches_seen (see shards.py)
        stream = dataset.at(rank, world, workers, batch_size, batches_seen, seed)
        collate = partial(collate_images, resolution=stream.resolution)
        for batch in DataLoader(stream, batch_size=batch_size, num_workers=stream.workers if workers else 0,
                                collate_fn=collate, pin_memory=torch.cuda.is_available()):
            dataset.shards.record(batch.get("shard_counts"))  # saved with the next checkpoint
            yield batch
        return
    if isinstance(dataset, IterableDataset):
        if world > 1:
            dataset = dataset.for_rank(rank, world)
        epoch, skip = 0, batches_seen
        while True:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            if hasattr(dataset, "pass_undecoded"):
                dataset.pass_undecoded(skip, batch_size)
            yielded = 0
            for batch in _epoch_loader(dataset, batch_size, seed, epoch, rank, world, 0, workers):
                if skip:
                    skip -= 1
                    continue
                yielded += 1
                yield batch
            if yielded == 0 and skip == 0:
                raise ValueError("the streaming dataset yielded no batch for this process")
            epoch += 1
    per_epoch = (len(dataset) // world) // batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} items: too few for train.batch_size={batch_size} on "
                         f"{world} process(es)")
    epoch, start = divmod(batches_seen, per_epoch)
    while True:
        yield from _epoch_loader(dataset, batch_size, seed, epoch, rank, world, start, workers)
        epoch, start = epoch + 1, 0
