"""Prior sampling, interpolation, padding, and the folder encode / decode / reconstruct helpers."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from scipy.stats import truncnorm
from skimage import data as skdata

from kl_autoencoder.data import image_to_tensor, tensor_to_image
from kl_autoencoder.inference import (
    LatentFormatError,
    decode_latents,
    decode_sliced,
    encode_folder,
    iter_decoded,
    lerp,
    pad_to_multiple,
    read_shard,
    reconstruct_folder,
    sample_prior,
    slerp,
)


# ---------------------------------------------------------------------------------------------------- prior


def test_sample_prior_is_standard_normal():
    z = sample_prior((200_000,), generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


@pytest.mark.parametrize("bound", [0.5, 1.0, 2.0])
def test_truncated_prior_matches_scipy_truncnorm(bound):
    z = sample_prior((2, 4, 64, 64), truncation=bound, generator=torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 64, 64)
    assert z.abs().max().item() <= bound
    # Rejection sampling gives the exact truncated normal: compare its std and a quantile with scipy's.
    assert z.std().item() == pytest.approx(truncnorm.std(-bound, bound), rel=0.01)
    q90 = torch.quantile(z.abs().flatten(), 0.9).item()
    assert q90 == pytest.approx(truncnorm.ppf(0.95, -bound, bound), rel=0.02)


def test_sample_prior_rejects_bad_truncation():
    with pytest.raises(ValueError, match="truncation"):
        sample_prior((3,), truncation=0.0)


def test_sample_prior_seeded_is_reproducible():
    a = sample_prior((4, 8), 1.5, torch.Generator().manual_seed(3))
    b = sample_prior((4, 8), 1.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- interpolation


def test_lerp_endpoints_and_midpoint():
    a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    path = lerp(a, b, 5)
    assert path.shape == (5, 4, 3, 5)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path[2], (a + b) / 2)


def test_slerp_follows_the_great_circle():
    # Orthogonal unit vectors: slerp at t is cos(t pi/2) a + sin(t pi/2) b, with unit norm all along.
    a, b = torch.zeros(2, 2), torch.zeros(2, 2)
    a[0, 0], b[1, 1] = 1.0, 1.0
    path = slerp(a, b, 7)
    t = torch.linspace(0, 1, 7)
    expected = torch.cos(t * math.pi / 2)[:, None, None] * a + torch.sin(t * math.pi / 2)[:, None, None] * b
    torch.testing.assert_close(path, expected)
    torch.testing.assert_close(path.flatten(1).norm(dim=1), torch.ones(7))


def test_slerp_keeps_gaussian_norm_lerp_does_not():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    mid_slerp, mid_lerp = slerp(a, b, 3)[1], lerp(a, b, 3)[1]
    typical = math.sqrt(a.numel())
    assert abs(mid_slerp.norm().item() / typical - 1) < 0.1
    assert mid_lerp.norm().item() / typical < 0.8  # the lerp midpoint falls inside the Gaussian shell


def test_slerp_parallel_falls_back_to_lerp():
    a = torch.randn(3, 4)
    torch.testing.assert_close(slerp(a, 2 * a, 4), lerp(a, 2 * a, 4))


def test_interpolation_rejects_bad_input():
    with pytest.raises(ValueError, match="steps"):
        lerp(torch.zeros(2), torch.ones(2), 1)
    with pytest.raises(ValueError, match="shape"):
        slerp(torch.zeros(2), torch.ones(3), 4)


# ---------------------------------------------------------------------------------------------- padding


def test_pad_to_multiple_reflects_like_numpy():
    x = torch.randn(1, 3, 13, 10)
    padded = pad_to_multiple(x, 8)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (0, 6)), mode="reflect")
    assert padded.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(padded.numpy(), expected)
    assert pad_to_multiple(x[..., :8, :8], 8).shape == (1, 3, 8, 8)
    # Too small to reflect: replicate instead of failing.
    assert pad_to_multiple(torch.randn(1, 3, 3, 3), 8).shape == (1, 3, 8, 8)


# ---------------------------------------------------------------------------------------------- folders


def _photo(name, height, width):
    return Image.fromarray(getattr(skdata, name)()[:height, :width])


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    _photo("astronaut", 32, 32).save(folder / "a.png")
    _photo("coffee", 32, 32).save(folder / "sub" / "b.png")
    _photo("chelsea", 21, 30).save(folder / "odd.png")  # not a multiple of the downsampling factor
    return folder


def _reference(model, path):
    """The in-memory pass the folder helpers must reproduce: decode(encode(x).mode()), cropped back."""
    x = image_to_tensor(Image.open(path).convert("RGB"))[None]
    height, width = x.shape[-2:]
    with torch.no_grad():
        z = model.encode(pad_to_multiple(x, model.config.downsampling_factor)).mode()
        return z, model.decode(z)[..., :height, :width]


def test_encode_decode_folder_reproduces_the_in_memory_pass(tiny_model, image_folder, tmp_path):
    tiny_model.config.scaling_factor = 0.37  # distinctive, so a missing scale or a missing unscale shows
    tiny_model.config.shift_factor = 0.11
    result = encode_folder(tiny_model, image_folder, tmp_path / "latents", batch_size=4, shard_size=2)
    assert [r.name for r in result.records] == ["a.png", "odd.png", "sub/b.png"]
    assert [p.name for p in result.written] == ["latents-00000.safetensors", "latents-00001.safetensors"]

    pairs = [pair for shard in result.written for pair in read_shard(shard, 4)]
    by_name = {record.name: (record, latent) for record, latent in pairs}
    record, latent = by_name["odd.png"]
    assert record.original_size == (21, 30) and record.padded_size == (22, 30)
    for name, (record, latent) in by_name.items():
        z, _ = _reference(tiny_model, image_folder / name)
        torch.testing.assert_close(latent, tiny_model.to_diffusion_latents(z)[0], rtol=0, atol=1e-6)

    decoded = {r.name: img for records, images in iter_decoded(tiny_model, tmp_path / "latents")
               for r, img in zip(records, images)}
    out = decode_latents(tiny_model, tmp_path / "latents", tmp_path / "decoded")
    assert sorted(p.relative_to(tmp_path / "decoded").as_posix() for p in out.written) == ["a.png", "odd.png", "sub/b.png"]
    for name in by_name:
        _, reference = _reference(tiny_model, image_folder / name)
        height, width = reference.shape[-2:]
        torch.testing.assert_close(decoded[name][None, :, :height, :width], reference, rtol=0, atol=1e-5)
        png = np.asarray(Image.open(tmp_path / "decoded" / name))
        assert png.shape == (height, width, 3)
        np.testing.assert_array_equal(png, np.asarray(tensor_to_image(decoded[name][:, :height, :width])))


def test_shard_metadata_holds_names_and_sizes(tiny_model, image_folder, tmp_path):
    result = encode_folder(tiny_model, image_folder, tmp_path / "lat", batch_size=2)
    with safe_open(str(result.written[0]), framework="pt") as f:
        meta = f.metadata()
        keys = sorted(f.keys())
    images = json.loads(meta["images"])
    assert keys == ["0", "1", "2"]
    assert [(d["name"], d["original_size"], d["padded_size"]) for d in images] == [
        ("a.png", [32, 32], [32, 32]), ("odd.png", [21, 30], [22, 30]), ("sub/b.png", [32, 32], [32, 32])]
    assert json.loads(meta["scaling_factor"]) == tiny_model.config.scaling_factor


def test_sample_mode_is_seeded_and_differs_from_mean(tiny_model, image_folder, tmp_path):
    runs = [encode_folder(tiny_model, image_folder, tmp_path / name, mode="sample",
                          generator=torch.Generator().manual_seed(0)) for name in ("s1", "s2")]
    mean = encode_folder(tiny_model, image_folder, tmp_path / "m")
    a, b, m = (read_shard(r.written[0])[0][1] for r in (*runs, mean))
    assert torch.equal(a, b) and not torch.allclose(a, m)


def test_corrupt_images_are_skipped_and_reported(tiny_model, image_folder, tmp_path):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (image_folder / "empty.jpg").write_bytes(b"")
    result = reconstruct_folder(tiny_model, image_folder, tmp_path / "rec")
    assert sorted(name for name, _ in result.skipped) == ["broken.png", "empty.jpg"]
    assert "skipped 2 unreadable images" in result.summary() and "broken.png" in result.summary()
    assert len(result.written) == 3
    assert Image.open(tmp_path / "rec" / "odd.png").size == (30, 21)


def test_reconstruct_folder_matches_in_memory(tiny_model, image_folder, tmp_path):
    reconstruct_folder(tiny_model, image_folder, tmp_path / "rec")
    _, reference = _reference(tiny_model, image_folder / "odd.png")
    png = np.asarray(Image.open(tmp_path / "rec" / "odd.png")).astype(int)
    expected = np.asarray(tensor_to_image(reference[0])).astype(int)
    assert np.abs(png - expected).max() <= 1  # same pass; at most a rounding flip at a .5 boundary


def test_wrong_channel_count_names_file_and_counts(tiny_model, image_folder, tmp_path):
    from kl_autoencoder import KLAutoencoder
    from tests.conftest import tiny_config

    wide = KLAutoencoder(tiny_config(latent_channels=8)).eval()
    result = encode_folder(wide, image_folder, tmp_path / "lat8")
    with pytest.raises(LatentFormatError, match=r"latents-00000.safetensors.*8 channels.*expects 4"):
        decode_latents(tiny_model, tmp_path / "lat8", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no latents"):
        decode_latents(tiny_model, tmp_path / "nothing", tmp_path / "out")
    assert result.written


def test_decode_sliced_matches_one_pass(tiny_model):
    z = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        full = tiny_model.decode(z)
    torch.testing.assert_close(decode_sliced(tiny_model, z, slice_size=2), full, rtol=0, atol=1e-5)
