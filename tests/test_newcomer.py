"""What a newcomer trips over: commands that do what their paths say, both kinds of model everywhere a model
is read, typos said at once, sample photos to try things on, a progress bar that reads per element, no lock left."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.cli import build_parser, main
from kl_autoencoder.data import image_to_tensor
from kl_autoencoder.tiny import build_student
from tests.conftest import TINY_TRAINING, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exported(tmp_path, tiny_model):
    return tiny_model.save_pretrained(tmp_path / "vae")


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(1)
    student = build_student(tiny_config(), width=8, encoder_blocks=1, decoder_blocks=1)
    return student.save_pretrained(tmp_path / "tiny")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(skdata.astronaut()[:32, :32]).save(folder / "a.png")
    Image.fromarray(skdata.coffee()[100:116, 200:224]).save(folder / "b.png")
    return folder


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------------------- convert


def test_convert_reads_the_format_off_the_destination(exported, tmp_path):
    assert main(["convert", str(exported), str(tmp_path / "x.safetensors")]) == 0
    single = tmp_path / "x.safetensors"
    assert single.is_file()  # one LDM file, not a folder named x.safetensors
    with safe_open(str(single), framework="pt") as f:
        assert any(k.startswith("encoder.down.") for k in f.keys())  # CompVis names
    assert main(["convert", str(single), str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "config.json").is_file()
    back = KLAutoencoder.from_pretrained(tmp_path / "folder").state_dict()
    original = KLAutoencoder.from_pretrained(exported).state_dict()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("dst,flags,message", [
    ("x.safetensors", ["--format", "diffusers"], "--format diffusers writes a folder"),
    ("x.ckpt", [], "safetensors only"),
    ("x.pt", ["--format", "ldm"], "safetensors only"),
    ("plain", ["--format", "ldm"], "--format ldm writes one file"),
])
def test_convert_refuses_a_name_that_says_otherwise(exported, tmp_path, capsys, dst, flags, message):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(exported), str(out / dst), *flags]) == 2
    assert message in one_error(capsys)
    assert listing(out) == []


def test_convert_format_has_help():
    convert = build_parser(with_evaluate=False)._subparsers._group_actions[0].choices["convert"]
    action = next(a for a in convert._actions if "--format" in a.option_strings)
    assert action.default is None and "ldm" in action.help and ".safetensors" in action.help


# ------------------------------------------------------------------------------------------------------ interpolate


@pytest.mark.parametrize("make_folder", [False, True])
def test_interpolate_into_a_folder(exported, images, tmp_path, make_folder):
    out = tmp_path / "strips"
    if make_folder:
        out.mkdir()
    given = str(out) if make_folder else str(out) + "/"
    assert main(["interpolate", "--model", str(exported), str(images / "a.png"), str(images / "b.png"),
                 "--steps", "3", "--image-size", "16", "--out", given]) == 0
    strip = out / "a-to-b.png"
    assert listing(out) == ["a-to-b.png"]
    with Image.open(strip) as image:
        assert image.format == "PNG" and image.size == (48, 16)


def test_interpolate_writes_the_format_its_extension_names(exported, images, tmp_path):
    png, jpg = tmp_path / "strip.png", tmp_path / "strip.jpg"
    for out in (png, jpg):
        assert main(["interpolate", "--model", str(exported), str(images / "a.png"), str(images / "b.png"),
                     "--steps", "2", "--image-size", "16", "--out", str(out)]) == 0
    with Image.open(jpg) as image:
        assert image.format == "JPEG" and image.size == (32, 16)
        decoded = np.asarray(image.convert("RGB"))
    with Image.open(png) as image:
        assert image.format == "PNG"
        image.save(tmp_path / "reference.jpg", format="JPEG")  # the same strip through Pillow's JPEG encoder
    assert np.array_equal(decoded, np.asarray(Image.open(tmp_path / "reference.jpg").convert("RGB")))


@pytest.mark.parametrize("name", ["strip.txt", "strip"])
def test_interpolate_refuses_a_name_that_is_no_image_format(exported, images, tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["interpolate", "--model", str(exported), str(images / "a.png"), str(images / "b.png"),
                 "--steps", "2", "--image-size", "16", "--out", str(out / name)]) == 2
    assert "--out" in one_error(capsys)
    assert listing(out) == []


# ---------------------------------------------------------------------------------------------------- tiny models


def diffusers_tiny(folder: Path):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(folder).eval()


def test_info_takes_a_tiny_autoencoder(tiny_folder, capsys):
    assert main(["info", str(tiny_folder), "--image-size", "20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    reference = diffusers_tiny(tiny_folder)
    assert info["class"] == "AutoencoderTiny"
    assert info["parameters"]["total"] == sum(p.numel() for p in reference.parameters())
    assert info["parameters"]["encoder"] == sum(p.numel() for p in reference.encoder.parameters())
    with torch.no_grad():
        latent = reference.encode(torch.zeros(1, 3, 20, 20)).latents
    assert info["latent_shape"] == list(latent.shape[1:])
    assert main(["info", str(tiny_folder)]) == 0
    assert "(AutoencoderTiny)" in capsys.readouterr().out


def test_reconstruct_with_a_tiny_autoencoder_matches_diffusers(tiny_folder, images, tmp_path):
    assert main(["reconstruct", "--model", str(tiny_folder), "--input", str(images), "--out", str(tmp_path / "rec"),
                 "--device", "cpu"]) == 0
    reference = diffusers_tiny(tiny_folder)
    x = image_to_tensor(Image.open(images / "a.png").convert("RGB"))[None]
    with torch.no_grad():
        expected = reference.decode(reference.encode(x).latents).sample[0]
    expected = expected.clamp(-1, 1).add(1).mul(127.5).round().permute(1, 2, 0).numpy().astype(int)
    png = np.asarray(Image.open(tmp_path / "rec" / "a.png")).astype(int)
    assert png.shape == expected.shape and np.abs(png - expected).max() <= 1


def test_a_teachers_latents_decode_with_its_tiny_student(exported, tiny_folder, images, tmp_path):
    assert main(["encode", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "lat")]) == 0
    assert main(["decode", "--model", str(tiny_folder), "--latents", str(tmp_path / "lat"),
                 "--out", str(tmp_path / "dec"), "--device", "cpu"]) == 0
    from kl_autoencoder.inference import read_shard

    reference = diffusers_tiny(tiny_folder)
    for record, latent in read_shard(tmp_path / "lat" / "latents-00000.safetensors"):
        with torch.no_grad():  # the shard holds diffusion latents: the tiny decoder's input as they are
            expected = reference.decode(latent[None]).sample[0]
        height, width = record.original_size
        expected = expected[:, :height, :width].clamp(-1, 1).add(1).mul(127.5).round().permute(1, 2, 0).numpy()
        png = np.asarray(Image.open(tmp_path / "dec" / Path(record.name).with_suffix(".png"))).astype(int)
        assert np.abs(png - expected.astype(int)).max() <= 1


def test_interpolate_takes_a_tiny_autoencoder(tiny_folder, images, tmp_path):
    out = tmp_path / "strip.png"
    assert main(["interpolate", "--model", str(tiny_folder), str(images / "a.png"), str(images / "b.png"),
                 "--steps", "3", "--image-size", "16", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (48, 16)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--num", "1", "--out", "OUT"], "prior"),
    (["reconstruct", "--input", "IMAGES", "--out", "OUT", "--mode", "sample"], "--mode mean"),
])
def test_what_a_tiny_autoencoder_cannot_do_is_said(tiny_folder, images, tmp_path, capsys, argv, message):
    subs = {"OUT": str(tmp_path / "out"), "IMAGES": str(images)}
    assert main([argv[0], "--model", str(tiny_folder), *[subs.get(a, a) for a in argv[1:]]]) == 2
    error = one_error(capsys)
    assert "AutoencoderTiny" in error and message in error
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_every_model_reading_command_says_which_models_it_takes():
    parser = build_parser(with_evaluate=False)
    commands = parser._subparsers._group_actions[0].choices
    for name in ("info", "encode", "decode", "reconstruct", "interpolate", "sample"):
        helps = " ".join(a.help or "" for a in commands[name]._actions if a.dest in ("model", "path"))
        assert "AutoencoderKL" in helps, name
        assert ("AutoencoderTiny" in helps) != (name == "sample"), name


# ------------------------------------------------------------------------------------------------- data source typos


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub for a dataset."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked for a dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_evaluate_says_did_you_mean_for_a_builtin_name_at_once(exported, tmp_path, capsys, no_hub):
    start = time.perf_counter()
    assert main(["evaluate", "--model", str(exported), "--data", "smaple", "--out", str(tmp_path / "eval")]) == 2
    assert time.perf_counter() - start < 10
    error = one_error(capsys)
    assert "--data 'smaple'" in error and "did you mean 'sample'?" in error and "data.source" not in error
    assert not (tmp_path / "eval").exists()


def test_a_near_miss_of_a_local_folder_is_named(images, exported, tmp_path, capsys, no_hub):
    typo = str(images)[:-1] + "z/"  # .../imagez/
    assert main(["evaluate", "--model", str(exported), "--data", typo, "--out", str(tmp_path / "eval")]) == 2
    assert f"did you mean '{images}/'?" in one_error(capsys)
    assert main(["distill", "--teacher", str(exported), "--data", "sampel", "--out", str(tmp_path / "d")]) == 2
    assert "--data 'sampel'" in one_error(capsys) and not (tmp_path / "d").exists()


def test_a_training_config_names_data_source(no_hub):
    from kl_autoencoder.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'data.source' = 'smaple'.*did you mean 'sample'"):
        load_config(None, TINY_TRAINING + ["data.source=smaple"])
    with pytest.raises(ConfigError, match="did you mean 'sample:heldout'"):
        load_config(None, TINY_TRAINING + ["data.source=sample:heldot"])
    load_config(None, TINY_TRAINING + ["data.source=sample:heldout"])  # the right names pass


def test_a_hub_failure_names_the_option_of_the_command(monkeypatch):
    import datasets

    from kl_autoencoder.data import DatasetUnavailableError, load_eval_images, load_hub_dataset

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError) as evaluate_error:
        load_eval_images("someone/some-set", 32)
    assert "--data FOLDER" in str(evaluate_error.value) and "data.source" not in str(evaluate_error.value)
    with pytest.raises(DatasetUnavailableError, match="data.source=FOLDER"):
        load_hub_dataset("someone/some-set")


# ------------------------------------------------------------------------------------------------------ sample photos


def test_sample_photos_writes_the_builtin_photos(tmp_path, capsys):
    from kl_autoencoder.data import SAMPLE_HELDOUT, SAMPLE_TRAIN, sample_images

    out = tmp_path / "photos"
    assert main(["sample-photos", str(out)]) == 0
    assert listing(out) == sorted(f"{name}.png" for name in SAMPLE_TRAIN + SAMPLE_HELDOUT)
    for name, image in sample_images("all"):
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), np.asarray(image)), name
    assert main(["sample-photos", str(tmp_path / "grey"), "--set", "greyscale"]) == 0
    for name in ("camera", "coins", "cell"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "grey" / f"{name}.png")), getattr(skdata, name)())
    assert len(listing(tmp_path / "grey")) == 8
    before = (out / "coffee.png").stat().st_mtime_ns
    assert main(["sample-photos", str(out), "--set", "heldout"]) == 2  # earlier photos are not replaced unasked
    assert "--overwrite" in one_error(capsys) and (out / "coffee.png").stat().st_mtime_ns == before
    assert main(["sample-photos", str(out), "--set", "heldout", "--overwrite"]) == 0


def test_sample_photos_feed_the_folder_commands(exported, tmp_path):
    photos = tmp_path / "photos"
    assert main(["sample-photos", str(photos), "--set", "heldout"]) == 0
    assert main(["interpolate", "--model", str(exported), str(photos / "chelsea.png"), str(photos / "coffee.png"),
                 "--steps", "2", "--image-size", "16", "--out", str(tmp_path / "strip.png")]) == 0


# ------------------------------------------------------------------------------------- training: bar, lock, exit code


def test_the_progress_bar_shows_loss_and_kl_per_element():
    from kl_autoencoder.losses import LossWeights, autoencoder_loss
    from kl_autoencoder.trainer import bar_figures

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config()).eval()
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    weights = LossWeights(pixel="l1", perceptual_weight=0.0, kl_weight=0.0)
    _, logs, reconstruction = autoencoder_loss(model, x, weights, generator=torch.Generator().manual_seed(0))
    figures = bar_figures({k: float(v) for k, v in logs.items() if v.numel() == 1} | {"loss": float(logs["rec"])},
                          x.shape[-3:], model)
    # L1 alone: the per-pixel loss is the mean absolute error, whatever LDM's sum made of it
    assert float(figures["loss/px"]) == pytest.approx(float((reconstruction.detach() - x).abs().mean()), rel=1e-3)
    with torch.no_grad():
        posterior = model.encode(x)
    closed_form = 0.5 * (posterior.mean ** 2 + posterior.logvar.exp() - 1 - posterior.logvar)
    assert float(figures["kl/z"]) == pytest.approx(float(closed_form.mean()), rel=1e-3)
    assert "kl" not in figures and "loss" not in figures


def test_a_finished_run_leaves_no_lock_file(tmp_path, one_thread):
    from kl_autoencoder.config import load_config
    from kl_autoencoder.trainer import train

    out = tmp_path / "run"
    train(load_config(None, TINY_TRAINING + [f"train.output_dir={out}", "train.max_steps=2"]))
    assert (out / "vae" / "config.json").is_file() and not (out / ".lock").exists()


def test_release_removes_only_its_own_lock_file(tmp_path):
    from kl_autoencoder.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.claim(resuming=False)
    (tmp_path / "run" / ".lock").unlink()
    (tmp_path / "run" / ".lock").write_text("someone else's")  # not the file this run locked
    folder.release()
    assert (tmp_path / "run" / ".lock").read_text() == "someone else's"
    second = RunFolder(tmp_path / "run")  # and the folder can be claimed again
    second.claim(resuming=True)
    second.release()


def test_a_refused_folder_fails_the_same_way_under_accelerate_and_python(tmp_path, capsys):
    """python exits 2 (a refused request), accelerate launch 1 (it reports every failure of its script as 1):
    the README says so; both print the same error line and write nothing."""
    import importlib.util

    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    flags = [f"train.output_dir={out}", *TINY_TRAINING]
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "training" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(flags) == 2
    python_errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "configs/accelerate/single-process.yaml", "-q", "training/train.py"]
    result = subprocess.run(launcher + flags, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    launched_errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert python_errors == launched_errors and len(python_errors) == 1 and "is not empty" in python_errors[0]
    assert "had defaults used instead" not in result.stderr and "Traceback" not in result.stderr
    assert listing(out) == ["mine.txt"]
