"""The built-in sample photos (`data.source: sample`, or sample:train / sample:heldout / sample:all).

Real colour photos shipped inside installed packages (scikit-image, scikit-learn, matplotlib; nothing to download),
with a fixed split: `SAMPLE_HELDOUT` (chelsea, coffee, flower) is never trained on, the 9 of `SAMPLE_TRAIN` train.
Training draws random crops at random scales (`data.max_crop_scale`; for this source by default from the whole photo
down to native pixels), so a handful of photos still gives varied batches; `data.random_hue` null turns the hues of
`SAMPLE_RANDOM_HUE` of this source's crops (only this source's: a recipe pointed at your own folder does not inherit
an augmentation meant for nine photos). Also scikit-image's greyscale photos, for trying a model on other photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from kl_autoencoder.data.images import to_rgb
from kl_autoencoder.data.items import ImageDataset, repeats_for
from kl_autoencoder.data.transforms import ImageTransform

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


SAMPLE_RANDOM_HUE = 0.5  # data.random_hue null: the share of the sample source's crops whose hues turn (0 elsewhere)


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


def is_sample_source(source: str) -> bool:
    """Whether `data.source` names the built-in photos ("sample" or "sample:<split>")."""
    return source == "sample" or source.startswith("sample:")


def sample_dataset(data_cfg: DataConfig, transform: ImageTransform, split: str, train: bool) -> PhotoListDataset:
    """The sample photos of `split` (or of the split the source names after "sample:"), at most data.max_images."""
    photos = sample_images(str(data_cfg.source).partition(":")[2] or split)[: data_cfg.max_images]
    return PhotoListDataset(photos, transform, repeats=repeats_for(len(photos), train))
