"""`ImageDataset`: the map-style base of every source that is not a stream (folder, sample photos, `datasets` tables).

It holds the item rule: an item is {"pixel_values", "path", "skipped"}, and an unreadable image is replaced by the
next readable one (up to `MAX_TRIES` reads), so batches keep their size (steady step shapes, no rank falling out of
step under DDP); the files skipped travel with the item, because a counter inside a DataLoader worker is never seen
by the main process. Small sources repeat their images until a training epoch holds `MIN_EPOCH_ITEMS` items.
"""

from __future__ import annotations

import math

from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from kl_autoencoder.data.images import BadImageError, SkipLog
from kl_autoencoder.data.transforms import ImageTransform


MIN_EPOCH_ITEMS = 256  # a training epoch over a small source repeats images up to at least this many items
MAX_TRIES = 8  # reads per item before giving up on finding a readable image


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


def repeats_for(num_images: int, train: bool) -> int:
    """How many times a source of `num_images` images is repeated in one epoch: enough for `MIN_EPOCH_ITEMS` items
    when training (so `drop_last` batching never yields an empty epoch), once otherwise."""
    return max(1, math.ceil(MIN_EPOCH_ITEMS / num_images)) if train else 1
