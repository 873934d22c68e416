"""An image folder (`data.source: path/to/folder`): a sorted recursive file list, each file read on its own.

We do not use `datasets`' "imagefolder" builder here: it decodes eagerly inside Arrow and one corrupt file aborts
the whole run, while a file list lets each read fail on its own, be counted, and be skipped. Large files are cheap:
a file is decoded once at the size its crops can use (JPEG decodes at 1/2-1/8 scale via Pillow's draft mode,
anything larger is shrunk) and kept in a `ReducedImageCache` (1 GiB by default), so a folder of 4K photos is not
decoded again for every crop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from kl_autoencoder.data.cache import DEFAULT_CACHE_BYTES, ReducedImageCache
from kl_autoencoder.data.images import IMAGE_EXTENSIONS, BadImageError, SkipLog, load_image
from kl_autoencoder.data.items import ImageDataset, repeats_for
from kl_autoencoder.data.transforms import ImageTransform

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


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


def folder_dataset(data_cfg: DataConfig, transform: ImageTransform, split: str, train: bool) -> ImageFolderDataset:
    """The images of the folder data.source names (at most data.max_images; `split` does not apply to folders)."""
    paths = iter_image_folder(str(data_cfg.source))[: data_cfg.max_images]
    return ImageFolderDataset(paths, transform, repeats=repeats_for(len(paths), train))


def folder_eval_images(folder: str, num_images: int | None, skipped: SkipLog) -> list[tuple[str, Image.Image]]:
    """The first `num_images` readable images of `folder` as (path, image); unreadable files go to `skipped`."""
    named: list[tuple[str, Image.Image]] = []
    for path in iter_image_folder(folder):
        if num_images is not None and len(named) >= num_images:
            break
        try:
            named.append((str(path), load_image(path)))
        except BadImageError as err:
            skipped.add(err.path, err.reason)
    if not named:
        raise FileNotFoundError(f"no readable images in {folder!r}")
    return named
