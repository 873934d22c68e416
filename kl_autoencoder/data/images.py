"""Images in, upright 8-bit RGB out; RGB as `[3, H, W]` tensors in [-1, 1] and back; the bad-image rule.

Every source is built on these pieces. `decode_image` / `load_image` turn a file or encoded bytes into RGB (EXIF
orientation applied, alpha on white, high bit depths rescaled) or raise `BadImageError` naming the file: corrupt,
empty, truncated, not an image, or a decompression bomb. A source that meets a bad image records it in a `SkipLog`
(distinct files, with the reason) and replaces the item (`items.ImageDataset`), so batches keep their size.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from kl_autoencoder.untrusted import MAX_ERROR_CHARS, shown

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)


class BadImageError(ValueError):
    """An image file that cannot be decoded; `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


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
