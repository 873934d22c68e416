"""Tiled encode / decode: exact blending, whole-image GroupNorm statistics, seam error vs diffusers, bounded memory."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kl_autoencoder.model import DiagonalGaussian
from kl_autoencoder.tiling import decode_tiled, encode_tiled, tile_starts
from tests.conftest import tiny_config


class LocalAutoencoder(nn.Module):
    """A stand-in whose only non-local op is an optional GroupNorm: encode = 2x2 average pool, decode = 2x nearest.

    Without GroupNorm, each output depends only on its own input cell, so blended tiles must equal the full pass
    exactly for any tiling; with GroupNorm, they must once the statistics are the whole image's.
    """

    def __init__(self, group_norm: bool):
        super().__init__()
        self.config = SimpleNamespace(downsampling_factor=2)
        self.encoder = nn.GroupNorm(1, 3) if group_norm else nn.Identity()
        self.decoder = nn.GroupNorm(1, 3) if group_norm else nn.Identity()

    def encode(self, x):
        mean = F.avg_pool2d(self.encoder(x), 2)
        return DiagonalGaussian(mean=mean, logvar=mean.square() - 1)

    def decode(self, z):
        return F.interpolate(self.decoder(z), scale_factor=2.0, mode="nearest")


@pytest.mark.parametrize("size,tile,overlap", [
    ((24, 40), 16, 8), ((24, 40), 32, 8), ((24, 40), 24, 0), ((24, 40), 8, 6), ((24, 40), 128, 8), ((18, 50), 10, 4)])
def test_blending_is_exact_for_local_ops(size, tile, overlap):
    model = LocalAutoencoder(group_norm=False)
    x = torch.randn(2, 3, *size)
    posterior = encode_tiled(model, x, tile, overlap, norm_passes=0)
    full = model.encode(x)
    torch.testing.assert_close(posterior.mean, full.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(posterior.logvar, full.logvar, rtol=0, atol=1e-5)
    torch.testing.assert_close(decode_tiled(model, x, tile, overlap), model.decode(x), rtol=0, atol=1e-6)


def test_whole_image_group_norm_statistics_make_tiles_exact():
    torch.manual_seed(0)
    model = LocalAutoencoder(group_norm=True)
    x = torch.randn(1, 3, 48, 64) * torch.linspace(0.2, 3, 64)  # statistics differ from tile to tile
    full_mean = model.encode(x).mean
    local = encode_tiled(model, x, 16, 4, norm_passes=0).mean
    tiled = encode_tiled(model, x, 16, 4, norm_passes=1).mean
    assert (local - full_mean).abs().max() > 0.1
    torch.testing.assert_close(tiled, full_mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(decode_tiled(model, x, 16, 4, norm_passes=1), model.decode(x), rtol=0, atol=1e-4)
    assert "forward" not in model.encoder.__dict__  # GroupNorm's own forward is back after tiling


@pytest.mark.parametrize("affine", [True, False])
def test_global_statistics_under_bf16_autocast_and_in_channels_last(affine):
    torch.manual_seed(0)
    model = LocalAutoencoder(group_norm=True)
    if not affine:
        model.decoder = nn.GroupNorm(1, 3, affine=False)
    else:
        with torch.no_grad():
            model.decoder.weight.uniform_(0.5, 2.0)
            model.decoder.bias.uniform_(-1.0, 1.0)
    z = (torch.randn(1, 3, 48, 64) * torch.linspace(0.2, 3, 64)).contiguous(memory_format=torch.channels_last)
    full = model.decode(z)
    torch.testing.assert_close(decode_tiled(model, z, 16, 4, norm_passes=1), full, rtol=0, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiled = decode_tiled(model, z.bfloat16(), 16, 4, norm_passes=1)
    assert tiled.dtype == torch.float32
    assert (tiled - full).abs().max() / full.abs().max() < 2e-2


@pytest.mark.parametrize("length", [1, 7, 32, 33, 64, 100, 257])
@pytest.mark.parametrize("tile,overlap", [(32, 8), (32, 0), (16, 15), (64, 16)])
def test_tile_starts_cover_with_full_tiles_and_enough_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + tile, length) == length  # the last tile reaches the border
    if length > tile:
        assert all(0 <= s <= length - tile for s in starts)  # every tile is full-size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap >= requested


def test_bad_tile_parameters_give_clear_errors(tiny_model):
    z = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"tile_size \(16\) must be larger than tile_overlap \(16\)"):
        decode_tiled(tiny_model, z, 16, 16)
    with pytest.raises(ValueError, match=r"tile_size \(15\) must be a multiple of the model's downsampling factor 2"):
        decode_tiled(tiny_model, z, 15, 4)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        encode_tiled(tiny_model, torch.randn(1, 3, 33, 32), 16, 4)
    with pytest.raises(ValueError, match="tile_overlap must be >= 0"):
        encode_tiled(tiny_model, torch.randn(1, 3, 32, 32), 16, -2)


def _diffusers_tiled(model, tmp_path, tile, overlap):
    from diffusers import AutoencoderKL

    model.save_pretrained(tmp_path / "vae")
    reference = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    reference.enable_tiling()
    reference.tile_sample_min_size = tile
    reference.tile_latent_min_size = tile // model.config.downsampling_factor
    reference.tile_overlap_factor = overlap / tile
    return reference


# Mean abs error of a 512x512 tiled decode (tile 256, overlap 64) on the seeded tiny random model of this test:
# measured 0.0558 (diffusers 0.0578; max 2.12 vs 1.77: a random decoder's error is GroupNorm statistics everywhere,
# not seams). The bound leaves room for BLAS differences.
DECODE_512_MEAN_BOUND = 0.065


def test_tiled_decode_512_matches_full_pass_and_beats_diffusers(tmp_path):
    from kl_autoencoder import KLAutoencoder
    from skimage import data

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(block_out_channels=(4, 8), mid_block_add_attention=False)).eval()
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    reference = _diffusers_tiled(model, tmp_path, 256, 64)
    with torch.no_grad():
        z = model.encode(x).mean
        full = model.decode(z)
        ours = decode_tiled(model, z, 256, 64, norm_passes=0)  # the plain blend, as diffusers does it
        theirs = reference.decode(z).sample
    ours_err, theirs_err = (ours - full).abs(), (theirs - full).abs()
    assert ours.shape == full.shape == (1, 3, 512, 512)
    assert ours_err.mean() < DECODE_512_MEAN_BOUND
    assert ours_err.mean() < theirs_err.mean()


def test_tiled_encode_beats_diffusers(tmp_path):
    from kl_autoencoder import KLAutoencoder
    from skimage import data

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(block_out_channels=(8, 16, 16))).eval()
    x = torch.from_numpy(data.astronaut()[::2, ::2].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # 256x256
    reference = _diffusers_tiled(model, tmp_path, 128, 32)
    with torch.no_grad():
        full = model.encode(x).mean
        ours = encode_tiled(model, x, 128, 32, norm_passes=0).mean
        global_norm = encode_tiled(model, x, 128, 32, norm_passes=1).mean
        theirs = reference.encode(x).latent_dist.mean
    assert ours.shape == full.shape == (1, 4, 64, 64)
    ours_err, theirs_err = (ours - full).abs(), (theirs - full).abs()
    # measured: ours max 1.28 / mean 0.062, diffusers 1.47 / 0.067, whole-image norms 0.54 / 0.031
    assert ours_err.mean() < theirs_err.mean() and ours_err.max() < theirs_err.max()
    assert (global_norm - full).abs().mean() < 0.75 * ours_err.mean()


ASSETS = Path(__file__).parent / "assets"


@pytest.mark.parametrize("name", ["trained-f8", "trained-f8-attn"])
def test_trained_model_tiling_beats_diffusers_on_max_and_mean(name, tmp_path):
    """Quickstart-architecture models trained by our trainer (900 steps without / 300 with mid attention).

    Measured (benchmarks/seams.py): decode max/mean 0.064/0.016 (diffusers 0.326/0.065) without attention,
    0.156/0.022 (0.339/0.041) with; encode 0.93/0.13 (4.21/0.39) and 0.43/0.10 (2.46/0.34).
    """
    from kl_autoencoder import KLAutoencoder
    from skimage import data

    model = KLAutoencoder.from_pretrained(ASSETS / name)
    assert model.config.mid_block_add_attention == name.endswith("attn")
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    reference = _diffusers_tiled(model, tmp_path, 256, 64)
    with torch.no_grad():
        z = model.encode(x).mean
        full = model.decode(z)
        results = {
            "decode": ((decode_tiled(model, z, 256, 64) - full).abs(), (reference.decode(z).sample - full).abs()),
            "encode": ((encode_tiled(model, x, 256, 64).mean - z).abs(),
                       (reference.encode(x).latent_dist.mean - z).abs()),
        }
    for direction, (ours, theirs) in results.items():
        assert ours.max() < 0.6 * theirs.max(), direction
        assert ours.mean() < 0.75 * theirs.mean(), direction


def _largest_activation(model, fn) -> int:
    """Largest tensor any module returns during fn(): deterministic, unlike RSS or allocator statistics on CPU
    (the one image-sized buffer of tiled decode, its output canvas, is written in place and is not a module output)."""
    largest = 0

    def hook(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return largest


def test_tiled_decode_memory_grows_with_the_tile_not_the_image(tiny_model):
    peaks_tiled, peaks_full = [], []
    for side in (16, 32):  # latent sides; the tile is 32 pixels = 16 latent positions
        z = torch.randn(1, 4, side, side)
        peaks_tiled.append(_largest_activation(tiny_model, lambda: decode_tiled(tiny_model, z, 32, 8)))
        peaks_full.append(_largest_activation(tiny_model, lambda: tiny_model.decode(z)))
    assert peaks_tiled[0] == peaks_tiled[1] == peaks_full[0]  # one tile-sized decode at most
    assert peaks_full[1] == 4 * peaks_full[0]


# ---------------------------------------------------------------------------------------- tile only when it must


def test_auto_tiles_only_over_the_pixel_budget():
    from kl_autoencoder.tiling import AUTO_TILE_PIXELS, AUTO_TILE_SIZE, check_tile_option, resolve_tile_size

    assert resolve_tile_size("auto", 1100, 1500) is None  # 1.65 MP: one untiled pass (2.3-2.9x faster)
    assert resolve_tile_size("auto", 1, AUTO_TILE_PIXELS) is None
    assert resolve_tile_size("auto", 1, AUTO_TILE_PIXELS + 1) == AUTO_TILE_SIZE
    assert resolve_tile_size(64, 8, 8) == 64  # an explicit size always tiles
    assert resolve_tile_size(None, 10**5, 10**5) is None
    with pytest.raises(ValueError, match="tile_size must be an int, None or 'auto'"):
        resolve_tile_size("big", 8, 8)
    with pytest.raises(ValueError, match=rf"tile_size \({AUTO_TILE_SIZE}\) must be larger than tile_overlap"):
        check_tile_option("auto", AUTO_TILE_SIZE, 8)  # caught before any image is read, not at the first big one


def test_auto_in_the_folder_helpers_matches_the_untiled_or_the_tiled_pass(tiny_model, monkeypatch):
    import kl_autoencoder.tiling as tiling
    from kl_autoencoder.inference import decode_sliced, encode_batch

    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        full_z = tiny_model.encode(x).mode()
        full_image = tiny_model.decode(full_z)
    torch.testing.assert_close(encode_batch(tiny_model, x, tile_size="auto", tile_overlap=4), full_z, rtol=0, atol=0)
    torch.testing.assert_close(decode_sliced(tiny_model, full_z, tile_size="auto", tile_overlap=4), full_image,
                               rtol=0, atol=0)
    monkeypatch.setattr(tiling, "AUTO_TILE_PIXELS", 32 * 48 - 1)  # one pixel over budget
    monkeypatch.setattr(tiling, "AUTO_TILE_SIZE", 16)
    with torch.no_grad():
        tiled_z = encode_tiled(tiny_model, x, 16, 4).mode()
        tiled_image = decode_tiled(tiny_model, full_z, 16, 4)
    assert (tiled_z - full_z).abs().max() > 1e-4  # the two passes differ, so the comparisons below tell them apart
    torch.testing.assert_close(encode_batch(tiny_model, x, tile_size="auto", tile_overlap=4), tiled_z)
    torch.testing.assert_close(decode_sliced(tiny_model, full_z, tile_size="auto", tile_overlap=4), tiled_image)


def test_cli_tiles_automatically_by_default():
    from kl_autoencoder.cli import build_parser

    parser = build_parser(with_evaluate=False)
    base = ["reconstruct", "--model", "m", "--input", "i", "--out", "o"]
    assert parser.parse_args(base).tile_size == "auto"
    assert parser.parse_args(base + ["--tile-size", "off"]).tile_size is None
    assert parser.parse_args(base + ["--tile-size", "256"]).tile_size == 256
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--tile-size", "huge"])
