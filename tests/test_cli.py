"""The `kl-autoencoder` command, run in-process through `main([...])` and once as a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.cli import main
from kl_autoencoder.data import image_to_tensor
from kl_autoencoder.inference import pad_to_multiple, read_shard
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exported(tmp_path, tiny_model):
    tiny_model.config.scaling_factor = 0.37
    return tiny_model.save_pretrained(tmp_path / "vae")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(skdata.astronaut()[:32, :32]).save(folder / "a.png")
    Image.fromarray(skdata.coffee()[:17, :26]).save(folder / "b.jpg", quality=95)
    return folder


def test_encode_then_decode_commands_reproduce_the_in_memory_pass(exported, images, tmp_path):
    assert main(["encode", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "lat"),
                 "--batch-size", "2"]) == 0
    assert main(["decode", "--model", str(exported), "--latents", str(tmp_path / "lat"), "--out",
                 str(tmp_path / "dec")]) == 0
    model = KLAutoencoder.from_pretrained(exported)
    pairs = {record.name: (record, latent) for record, latent in read_shard(tmp_path / "lat" / "latents-00000.safetensors", 4)}
    for name in ("a.png", "b.jpg"):
        x = image_to_tensor(Image.open(images / name).convert("RGB"))[None]
        height, width = x.shape[-2:]
        with torch.no_grad():
            z = model.encode(pad_to_multiple(x, 2)).mode()
            reference = model.decode(z)[..., :height, :width]
        record, latent = pairs[name]
        assert record.original_size == (height, width)
        torch.testing.assert_close(latent, z[0] * 0.37, rtol=0, atol=1e-6)  # scaled on the way out ...
        with torch.no_grad():  # ... and unscaled on the way back: the decoded pixels are the in-memory ones
            roundtrip = model.decode(model.from_diffusion_latents(latent[None]))[..., :height, :width]
        torch.testing.assert_close(roundtrip, reference, rtol=0, atol=1e-5)
        png = np.asarray(Image.open(tmp_path / "dec" / Path(name).with_suffix(".png"))).astype(int)
        expected = reference[0].clamp(-1, 1).add(1).mul(127.5).round().permute(1, 2, 0).numpy().astype(int)
        assert png.shape == (height, width, 3)
        assert np.abs(png - expected).max() <= 1 and (png == expected).mean() > 0.999


def test_console_module_runs_as_a_subprocess(exported):
    result = subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", "info", str(exported), "--image-size", "64",
                             "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["latent_shape"] == [4, 32, 32] and info["downsampling_factor"] == 2
    model = KLAutoencoder.from_pretrained(exported)
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["parameters"]["encoder"] + info["parameters"]["decoder"] == info["parameters"]["total"]


def test_info_text_prints_latent_shape(exported, capsys):
    assert main(["info", str(exported), "--image-size", "100"]) == 0
    assert "latent shape for 100x100: [4, 50, 50]" in capsys.readouterr().out


def test_reconstruct_command_with_tiles_and_a_corrupt_file(exported, images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    assert main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "rec"),
                 "--tile-size", "16", "--tile-overlap", "4"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable images: broken.png" in captured.out and "broken.png" in captured.err
    assert Image.open(tmp_path / "rec" / "b.png").size == (26, 17)


@pytest.mark.parametrize("argv,message", [
    (["decode", "--latents", "LAT8", "--out", "OUT"], "8 channels but the model expects 4"),
    (["reconstruct", "--input", "IMAGES", "--out", "OUT", "--tile-size", "8", "--tile-overlap", "8"],
     "tile_size (8) must be larger than tile_overlap (8)"),
    (["encode", "--input", "MISSING", "--out", "OUT"], "does not exist"),
])
def test_user_mistakes_give_one_line_errors(argv, message, exported, images, tmp_path, capsys):
    wide = KLAutoencoder(tiny_config(latent_channels=8)).eval()
    from kl_autoencoder.inference import encode_folder

    encode_folder(wide, images, tmp_path / "lat8")
    subs = {"LAT8": str(tmp_path / "lat8"), "OUT": str(tmp_path / "out"), "IMAGES": str(images),
            "MISSING": str(tmp_path / "missing")}
    assert main([argv[0], "--model", str(exported), *[subs.get(a, a) for a in argv[1:]]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "model path not found" in capsys.readouterr().err


def test_sample_command_shapes_and_range(exported, tmp_path):
    assert main(["sample", "--model", str(exported), "--num", "3", "--truncation", "0.5", "--image-size", "24",
                 "--seed", "1", "--out", str(tmp_path / "s")]) == 0
    files = sorted((tmp_path / "s").glob("*.png"))
    assert [f.name for f in files] == ["sample-00000.png", "sample-00001.png", "sample-00002.png"]
    arrays = [np.asarray(Image.open(f)) for f in files]
    assert all(a.shape == (24, 24, 3) and a.dtype == np.uint8 for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])


@pytest.mark.parametrize("flag", [[], ["--slerp"]])
def test_interpolate_command_writes_a_strip_with_the_endpoints(exported, images, tmp_path, flag):
    out = tmp_path / "strip.png"
    assert main(["interpolate", "--model", str(exported), str(images / "a.png"), str(images / "b.jpg"),
                 "--steps", "4", "--image-size", "16", "--out", str(out), *flag]) == 0
    strip = np.asarray(Image.open(out))
    assert strip.shape == (16, 64, 3)
    # The first frame is the reconstruction of image A (a 32x32 crop resized to 16x16).
    model = KLAutoencoder.from_pretrained(exported)
    from PIL import ImageOps

    a = image_to_tensor(ImageOps.fit(Image.open(images / "a.png").convert("RGB"), (16, 16), Image.Resampling.BICUBIC))
    with torch.no_grad():
        first = model.decode(model.encode(a[None]).mode())[0].clamp(-1, 1).add(1).mul(127.5).round()
    assert np.abs(strip[:, :16].astype(int) - first.permute(1, 2, 0).numpy().astype(int)).max() <= 1


def test_convert_round_trip_diffusers_ldm_diffusers(exported, tmp_path):
    ldm = tmp_path / "vae.safetensors"
    assert main(["convert", str(exported), str(ldm), "--format", "ldm"]) == 0
    assert any(k.startswith("encoder.down.") for k in load_file(ldm))  # really the LDM layout
    assert main(["convert", str(ldm), str(tmp_path / "back"), "--format", "diffusers",
                 "--config", str(exported / "config.json")]) == 0
    original, back = load_file(exported / "diffusion_pytorch_model.safetensors"), load_file(
        tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((exported / "config.json").read_text())


def test_convert_dtype(exported, tmp_path):
    assert main(["convert", str(exported), str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    weights = load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values())
