"""Tiled encode / decode with linearly blended seams, so memory is bounded by the tile instead of the image.

Units: `tile_size` and `tile_overlap` are in PIXELS for both directions (the CLI flags are the same), and must be
multiples of the model's downsampling factor f, so every tile starts on the latent grid; decode uses
tile_size / f latent positions per tile.

How tiles are placed: along each axis the tiles are all full-size and evenly spread from the first to the last
position (the last tile ends exactly at the border), so every pair of neighbours overlaps by at least
`tile_overlap`. Inputs smaller than a tile are one tile. How they are blended: each tile carries a weight that ramps
linearly from ~0 to 1 across the overlap it shares with each neighbour (and is 1 at the image border), and the output
is sum(weight * tile) / sum(weight). Where two tiles meet the ramps sum to 1: a linear cross-fade.

Tiles differ from the full pass because GroupNorm statistics and the mid-block attention see only the tile, and
because each tile lacks context at its edges; the blending hides the seams, it does not remove the difference.
`norm_passes` (default 1) first runs the tiles only to measure each GroupNorm's statistics over the whole image
(weighted by the blend weights, so memory stays bounded by the tile), then normalises every tile with those: one extra
pass of compute. It is exact where GroupNorm is the only non-local op (see the tests). On trained models it cuts the
error several-fold (benchmarks/seams.py, BENCHMARKS.md: quickstart decode max error 0.356 -> 0.064, below diffusers'
enable_tiling() 0.326); on random-init networks it can be worse, because later norms' statistics are estimated under
earlier tile-local ones. `norm_passes=0` is the plain per-tile blend that diffusers' enable_tiling() also does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from kl_autoencoder.model import DiagonalGaussian
from kl_autoencoder.norm_act import group_scale_shift


AUTO_TILE_SIZE = 512  # pixels: the tile `tile_size="auto"` uses once an image is over the budget
# The budget: images with more pixels than this are tiled under "auto". An untiled fp32 pass of the Stable
# Diffusion VAE on CPU peaks near 3 GiB per megapixel (decode; measured at 512x512), so 2 MP stays near 6 GiB.
AUTO_TILE_PIXELS = 2 * 1024 * 1024


def resolve_tile_size(tile_size: int | str | None, height: int, width: int) -> int | None:
    """The tile side for one pass over a height x width (pixel) image, or None for one untiled pass.

    `tile_size`: None (never tile), an int (always tile with it), or "auto": tile with AUTO_TILE_SIZE only when
    the image has more than AUTO_TILE_PIXELS pixels. Tiling trades time for memory: on a 1500x1100 image with
    512-px tiles it took 2.3x (decode) and 2.9x (encode) the time of one untiled pass for a 3.5x / 3.7x lower peak
    (quickstart model, CPU), so "auto" pays it only where an untiled pass would need a lot of memory.
    """
    if tile_size == "auto":
        return AUTO_TILE_SIZE if height * width > AUTO_TILE_PIXELS else None
    if tile_size is None or isinstance(tile_size, int):
        return tile_size or None
    raise ValueError(f"tile_size must be an int, None or 'auto', got {tile_size!r}")


def check_tile_option(tile_size: int | str | None, tile_overlap: int, factor: int) -> None:
    """`check_tiling` for every tile size `tile_size` may resolve to, so a bad value fails before any work."""
    size = AUTO_TILE_SIZE if tile_size == "auto" else resolve_tile_size(tile_size, 0, 0)
    if size is not None:
        check_tiling(size, tile_overlap, factor)


def check_tiling(tile_size: int, tile_overlap: int, factor: int) -> None:
    """Raise ValueError for tile parameters that cannot work, naming the values."""
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
    if tile_size <= tile_overlap:
        raise ValueError(f"tile_size ({tile_size}) must be larger than tile_overlap ({tile_overlap})")
    for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
        if value % factor:
            raise ValueError(f"{name} ({value}) must be a multiple of the model's downsampling factor {factor} (pixels)")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of full-size tiles covering [0, length), evenly spread, each neighbour overlap >= `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    span = length - tile
    return [round(i * span / (count - 1)) for i in range(count)]


def _axis_weights(starts: list[int], tile: int, length: int) -> list[torch.Tensor]:
    """1-D blend weight of each tile along one axis (all in output units): ramps across each shared overlap."""
    size = min(tile, length)
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:  # ramp up across the overlap with the previous tile
            ramp = starts[i - 1] + tile - start
            w[:ramp] = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
        if i < len(starts) - 1:  # ramp down across the overlap with the next tile
            ramp = start + tile - starts[i + 1]
            down = (torch.arange(ramp, 0, -1, dtype=torch.float64) - 0.5) / ramp
            w[size - ramp:] = torch.minimum(w[size - ramp:], down)
        weights.append(w)
    return weights


def _tile_grid(x: torch.Tensor, tile: int, overlap: int, unit: int, out_per_unit: int):
    """Tile windows of x and their blend weights (output units), normalised so they sum to 1 at every position.

    `tile`, `overlap` are in input positions; `unit` input positions become `out_per_unit` output positions
    (encode: unit=f, out_per_unit=1; decode: unit=1, out_per_unit=f). Tile starts are multiples of `unit`.
    Yields ((y0, x0) input offsets, (oy, ox) output offsets, weight [h_out, w_out]).
    """
    height, width = x.shape[-2:]
    starts_y = [s * unit for s in tile_starts(height // unit, tile // unit, overlap // unit)]
    starts_x = [s * unit for s in tile_starts(width // unit, tile // unit, overlap // unit)]

    def to_out(n: int) -> int:
        return n // unit * out_per_unit

    wy = _axis_weights([to_out(s) for s in starts_y], to_out(tile), to_out(height))
    wx = _axis_weights([to_out(s) for s in starts_x], to_out(tile), to_out(width))
    total = torch.zeros(to_out(height), to_out(width), dtype=torch.float64)
    grid = []
    for iy, y0 in enumerate(starts_y):
        for ix, x0 in enumerate(starts_x):
            w = wy[iy][:, None] * wx[ix][None, :]
            oy, ox = to_out(y0), to_out(x0)
            total[oy:oy + w.shape[0], ox:ox + w.shape[1]] += w
            grid.append(((y0, x0), (oy, ox), w))
    return [(src, dst, w / total[dst[0]:dst[0] + w.shape[0], dst[1]:dst[1] + w.shape[1]]) for src, dst, w in grid]


def _blend(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, unit: int,
           out_per_unit: int, norm: "_GlobalGroupNorm | None" = None) -> torch.Tensor:
    """Apply `fn` to each tile of x [B, C, H, W] and sum the outputs times their normalised blend weights."""
    grid = _tile_grid(x, tile, overlap, unit, out_per_unit)
    if norm is not None:  # passes that only measure GroupNorm statistics over the whole image
        for _ in range(norm.passes):
            norm.start_recording()
            for (y0, x0), _, w in grid:
                norm.weight = w
                fn(x[:, :, y0:y0 + tile, x0:x0 + tile])
            norm.finish_recording()
    out = None
    for (y0, x0), (oy, ox), w in grid:
        piece = fn(x[:, :, y0:y0 + tile, x0:x0 + tile]).float()
        if out is None:  # allocated lazily: the output channel count is only known after the first tile
            height, width = x.shape[-2:]
            out = torch.zeros(*piece.shape[:2], height // unit * out_per_unit, width // unit * out_per_unit,
                              device=piece.device)
        w = w.to(device=piece.device, dtype=torch.float32)
        out[:, :, oy:oy + w.shape[0], ox:ox + w.shape[1]] += piece * w
    return out


class _GlobalGroupNorm:
    """Make every GroupNorm of `module` use statistics of the whole image instead of the tile's own.

    Recording pass: each tile's GroupNorm inputs are summed per (sample, group), weighted by the tile's blend weight
    resized to that layer's resolution; as the weights sum to one over tiles, every image position counts once.
    Afterwards the layers normalise with the recorded mean / variance. Memory stays bounded by the tile (the
    statistics are [B, groups] per layer); each extra pass costs one more tiled forward. The first recording sees
    tile-local statistics in earlier layers; a second pass records with the first pass's estimates applied.

    The GroupNorms' forward is replaced while active (not hooked): with known statistics a GroupNorm is one
    per-(sample, channel) scale and shift, a single pass over the activation instead of a native GroupNorm whose
    output would be thrown away.
    """

    def __init__(self, module: torch.nn.Module, passes: int):
        self.passes = passes
        self.weight: torch.Tensor | None = None
        self.recording = False
        self.sums: dict[torch.nn.Module, list[torch.Tensor]] = {}
        self.stats: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]

    def __enter__(self) -> "_GlobalGroupNorm":
        for m in self.norms:
            m.forward = lambda x, m=m: self._forward(m, x)  # instance attribute: shadows GroupNorm.forward
        return self

    def __exit__(self, *exc) -> None:
        for m in self.norms:
            del m.forward

    def start_recording(self) -> None:
        self.recording, self.sums = True, {}

    def finish_recording(self) -> None:
        self.recording = False
        for m, (total, total_sq, count) in self.sums.items():
            mean = total / count
            self.stats[m] = (mean, (total_sq / count - mean.square()).clamp_min(0.0))

    def _record(self, m: torch.nn.GroupNorm, x: torch.Tensor) -> None:
        b, c, h, w = x.shape
        weight = self.weight.to(device=x.device, dtype=torch.float32)[None, None]
        mode = "area" if weight.shape[-1] > w else "nearest"
        weight = F.interpolate(weight, size=(h, w), mode=mode)[0, 0]
        x = x.float()
        # Weighted sums per (sample, channel), then per group.
        per_channel = [torch.einsum("bchw,hw->bc", x, weight), torch.einsum("bchw,hw->bc", x.square(), weight)]
        sums = [s.view(b, m.num_groups, -1).sum(-1) for s in per_channel] + [weight.sum() * (c // m.num_groups)]
        previous = self.sums.get(m)
        self.sums[m] = sums if previous is None else [p + s for p, s in zip(previous, sums)]

    def _forward(self, m: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self._record(m, x)
        if m not in self.stats:  # first recording pass: tile-local statistics
            return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        mean, var = self.stats[m]
        weight, bias = (m.weight.float(), m.bias.float()) if m.affine else (None, None)
        scale, shift = group_scale_shift(mean, torch.rsqrt(var + m.eps), weight, bias, x.shape[1] // m.num_groups)
        # fp32 like GroupNorm under autocast; the input's dtype otherwise (as GroupNorm itself).
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        return torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None]).to(dtype)


def _run_blended(fn, module, x, tile, overlap, unit, out_per_unit, norm_passes: int) -> torch.Tensor:
    if norm_passes < 0:
        raise ValueError(f"norm_passes must be >= 0, got {norm_passes}")
    if norm_passes == 0:
        return _blend(fn, x, tile, overlap, unit, out_per_unit)
    with _GlobalGroupNorm(module, norm_passes) as norm:
        return _blend(fn, x, tile, overlap, unit, out_per_unit, norm)


def encode_tiled(model, x: torch.Tensor, tile_size: int, tile_overlap: int, norm_passes: int = 1) -> DiagonalGaussian:
    """Posterior over the full latent of images x [B, C, H, W] in [-1, 1], encoded tile by tile (pixel units).

    The posterior moments (mean and log-variance, after quant_conv) are what is blended. `norm_passes` extra tiled
    passes estimate whole-image GroupNorm statistics (0: each tile normalises with its own, as diffusers does).
    """
    f = model.config.downsampling_factor
    check_tiling(tile_size, tile_overlap, f)
    height, width = x.shape[-2:]
    if height % f or width % f:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the downsampling factor {f}; pad it first "
            "(kl_autoencoder.inference.pad_to_multiple)"
        )

    def encode_moments(tile: torch.Tensor) -> torch.Tensor:
        posterior = model.encode(tile)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    moments = _run_blended(encode_moments, model.encoder, x, tile_size, tile_overlap, f, 1, norm_passes)
    return DiagonalGaussian(moments)


def decode_tiled(model, z: torch.Tensor, tile_size: int, tile_overlap: int, norm_passes: int = 1) -> torch.Tensor:
    """Decode raw latents z [B, C, h, w] tile by tile; tile_size / tile_overlap in pixels (multiples of f).

    `norm_passes`: as in `encode_tiled`."""
    f = model.config.downsampling_factor
    check_tiling(tile_size, tile_overlap, f)
    return _run_blended(model.decode, model.decoder, z, tile_size // f, tile_overlap // f, 1, f, norm_passes)
