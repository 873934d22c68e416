"""PIL image -> `[3, R, R]` tensor in [-1, 1]: the resize, crop, flip and hue turn every source's items go through."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageOps

from kl_autoencoder.data.images import image_to_tensor, to_rgb


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
