"""Nothing written outside where the user said, nothing of theirs overwritten, nothing half-written left behind.

Crafted latent shards (path traversal, malformed metadata), colliding output names, symlinks at output paths,
output folders inside input folders, stale shards, decompression bombs, SIGTERM and a full disk (issues 16 and 20).
"""

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from kl_autoencoder.cli import main
from kl_autoencoder.data import image_to_tensor, tensor_to_image
from kl_autoencoder.inference import (
    LatentFormatError,
    OutputLocationError,
    decode_latents,
    encode_folder,
    name_problem,
    output_names,
    pad_to_multiple,
    reconstruct_folder,
)

ROOT = Path(__file__).resolve().parents[1]


def _record(index, name, size=(8, 8)):
    return {"index": index, "name": name, "original_size": list(size), "padded_size": list(size)}


def _shard(path, records, tensors=None, images_json=None):
    """A latents file with the given records (tensors [4, 4, 4] for a tiny f=2 model unless given)."""
    tensors = tensors if tensors is not None else {
        str(r["index"]): torch.randn(4, 4, 4) for r in records if isinstance(r, dict) and "index" in r}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"images": images_json if images_json is not None else json.dumps(records)}
    save_file(tensors or {"unused": torch.zeros(1)}, str(path), metadata=metadata)
    return path


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def _one_error_line(err):
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def exported(tmp_path, tiny_model):
    return tiny_model.save_pretrained(tmp_path / "vae")


# ------------------------------------------------------------------------------------------- crafted shard names


@pytest.mark.parametrize("bad_name,reason", [
    ("/ABS/victim.png", "absolute path"),
    ("../../victim.png", "'..' path component"),
    ("sub/../../victim.png", "'..' path component"),
    ("a\x00b.png", "NUL"),
    ("x" * 300 + ".png", "bytes (at most"),
    ("sub\\victim.png", "backslash"),
    ("", "empty"),
])
def test_decode_refuses_unsafe_names_before_writing_anything(tiny_model, tmp_path, bad_name, reason):
    victim = tmp_path / "victim.png"
    victim.write_text("keep me")
    bad_name = bad_name.replace("/ABS", str(tmp_path))
    shards = tmp_path / "deep" / "lat"
    _shard(shards / "latents-00000.safetensors", [_record(0, "good.png")])  # a good record first, in another shard
    _shard(shards / "latents-00001.safetensors", [_record(1, "also-good.png"), _record(2, bad_name)])
    out = tmp_path / "deep" / "out"
    with pytest.raises(LatentFormatError) as caught:
        decode_latents(tiny_model, shards, out)
    message = str(caught.value)
    assert "latents-00001.safetensors" in message and "record 1" in message and reason in message
    assert len(message) < 400  # a 300-character name is cut short in the message
    assert _files(out) == [] and victim.read_text() == "keep me"
    assert [p for p in _files(tmp_path) if p.endswith(".png")] == ["victim.png"]  # no PNG anywhere else


@pytest.mark.parametrize("name", ["a.png", "sub/b.png", "deep/er/c.jpg", ".hidden.png", "spaces and ünïcode.png"])
def test_plain_relative_names_are_accepted(name):
    assert name_problem(name) is None


def test_duplicate_names_are_refused_within_and_across_shards(tiny_model, tmp_path):
    one = _shard(tmp_path / "dup1" / "latents-00000.safetensors", [_record(0, "x.png"), _record(1, "x.png")])
    with pytest.raises(LatentFormatError, match=r"latents-00000.safetensors: record 1 \('x.png'\).*listed twice"):
        decode_latents(tiny_model, one, tmp_path / "out1")
    _shard(tmp_path / "dup2" / "latents-00000.safetensors", [_record(0, "x.png")])
    _shard(tmp_path / "dup2" / "latents-00001.safetensors", [_record(1, "x.png")])
    with pytest.raises(LatentFormatError, match=r"latents-00001.safetensors: record 'x.png' is also in .*latents-00000"):
        decode_latents(tiny_model, tmp_path / "dup2", tmp_path / "out2")
    assert _files(tmp_path / "out1") == [] and _files(tmp_path / "out2") == []


def test_decode_refuses_a_symlinked_subfolder_that_leaves_the_output(tiny_model, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    shard = _shard(tmp_path / "lat" / "latents-00000.safetensors", [_record(0, "sub/x.png")])
    with pytest.raises(OutputLocationError, match="outside the output folder"):
        decode_latents(tiny_model, shard, out)
    assert _files(elsewhere) == []


@pytest.mark.parametrize("images_json,tensors,message", [
    ("not json", None, "not valid JSON"),
    ('{"index": 0}', None, "must be a list of records"),
    ("[42]", None, "record 0: expected an object"),
    ('[{"index": 0, "name": "a.png"}]', None, "record 0: missing original_size, padded_size"),
    ('[{"index": "0", "name": "a.png", "original_size": [8, 8], "padded_size": [8, 8]}]', None,
     "index must be a non-negative integer"),
    ('[{"index": 0, "name": 7, "original_size": [8, 8], "padded_size": [8, 8]}]', None, "is a int, not a string"),
    ('[{"index": 0, "name": "a.png", "original_size": "big", "padded_size": [8, 8]}]', None,
     "original_size must be [height, width]"),
    ('[{"index": 0, "name": "a.png", "original_size": [800, 8], "padded_size": [8, 8]}]', None,
     "larger than its latent"),
    ('[{"index": 0, "name": "a.png", "original_size": [8, 8], "padded_size": [8, 8]}]',
     {"0": torch.zeros(4, 4, 4, dtype=torch.int32)}, "dtype I32"),
])
def test_malformed_metadata_is_a_clear_error_naming_the_shard(exported, tmp_path, capsys, images_json, tensors,
                                                               message):
    shard = _shard(tmp_path / "lat" / "latents-00000.safetensors", [], tensors=tensors or {"0": torch.zeros(4, 4, 4)},
                   images_json=images_json)
    assert main(["decode", "--model", str(exported), "--latents", str(shard.parent), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "latents-00000.safetensors" in line and message in line
    assert _files(tmp_path / "o") == []


# ------------------------------------------------------------------------------------------- colliding outputs


def _photo(name, height=16, width=16):
    return Image.fromarray(getattr(skdata, name)()[:height, :width])


def _reconstruction(model, path):
    x = image_to_tensor(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        y = model.decode(model.encode(pad_to_multiple(x, model.config.downsampling_factor)).mode())
    return np.asarray(tensor_to_image(y[0, :, :x.shape[-2], :x.shape[-1]])).astype(int)


def test_output_names_keep_the_extension_only_when_stems_collide():
    assert output_names(["a.jpg", "b.png", "sub/c.tif"]) == ["a.png", "b.png", "sub/c.png"]
    assert output_names(["coffee.jpg", "coffee.png", "coffee.tiff"]) == ["coffee.jpg.png", "coffee.png",
                                                                         "coffee.tiff.png"]
    assert output_names(["Coffee.PNG", "coffee.jpg"]) == ["Coffee.PNG.png", "coffee.jpg.png"]  # case-insensitive
    with pytest.raises(OutputLocationError, match="'a.jpg' and 'a.jpg.png' would both be written to 'a.jpg.png'"):
        output_names(["a.jpg", "a.png", "a.jpg.png"])


def test_reconstruct_and_decode_never_collide_on_the_stem(tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _photo("astronaut").save(images / "coffee.png")
    _photo("chelsea").save(images / "coffee.jpg", quality=95)  # a different picture behind the same stem
    result = reconstruct_folder(tiny_model, images, tmp_path / "rec")
    assert _files(tmp_path / "rec") == ["coffee.jpg.png", "coffee.png"]
    assert len(result.written) == 2 and result.summary().startswith("2 images, 2 files written")
    for name in ("coffee.jpg", "coffee.png"):  # each output is the reconstruction of its own input
        out = tmp_path / "rec" / ("coffee.png" if name == "coffee.png" else "coffee.jpg.png")
        assert np.abs(np.asarray(Image.open(out)).astype(int) - _reconstruction(tiny_model, images / name)).max() <= 1

    encode_folder(tiny_model, images, tmp_path / "lat")
    decoded = decode_latents(tiny_model, tmp_path / "lat", tmp_path / "dec")
    assert _files(tmp_path / "dec") == ["coffee.jpg.png", "coffee.png"] and len(decoded.written) == 2


def test_summary_counts_in_the_singular(tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _photo("coffee").save(images / "one.png")
    assert reconstruct_folder(tiny_model, images, tmp_path / "rec").summary() == "1 image, 1 file written"


# ------------------------------------------------------------------------------------------- symlinks and inputs


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _photo("astronaut").save(folder / "a.png")
    _photo("coffee", 12, 14).save(folder / "b.png")
    return folder


def _planted_link(path, tmp_path):
    """A symlink at an output path, pointing at a file of the user's that must survive."""
    victim = tmp_path / f"victim-{path.name}.txt"
    victim.write_text("precious")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim)
    return victim


def _replaced(path, victim):
    return not path.is_symlink() and Image.open(path).format == "PNG" and victim.read_text() == "precious"


@pytest.mark.parametrize("command", ["reconstruct", "decode", "sample", "interpolate"])
def test_a_symlink_at_an_output_path_is_replaced_not_followed(command, exported, images, tmp_path):
    model = ["--model", str(exported)]
    out = tmp_path / "out"
    if command == "reconstruct":
        target, argv = out / "a.png", ["reconstruct", *model, "--input", str(images), "--out", str(out)]
    elif command == "decode":
        assert main(["encode", *model, "--input", str(images), "--out", str(tmp_path / "lat")]) == 0
        target, argv = out / "a.png", ["decode", *model, "--latents", str(tmp_path / "lat"), "--out", str(out)]
    elif command == "sample":
        target = out / "sample-00000.png"
        argv = ["sample", *model, "--num", "2", "--image-size", "8", "--out", str(out)]
    else:
        target = tmp_path / "strip.png"
        argv = ["interpolate", *model, str(images / "a.png"), str(images / "b.png"), "--steps", "2", "--image-size",
                "8", "--out", str(target)]
    victim = _planted_link(target, tmp_path)
    assert main(argv) == 2  # an earlier output (here a planted link) at an output path: refused by default
    assert main([*argv, "--overwrite"]) == 0  # told to replace it: the link is replaced, never written through
    assert _replaced(target, victim)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_reconstruct_refuses_an_output_folder_in_the_input_folder(where, exported, images, tmp_path, capsys):
    before = {p: p.read_bytes() for p in images.iterdir()}
    out = images if where == "same" else images / "recon"
    assert main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert f"output folder {out}" in line and "input folder" in line
    assert "reconstructing" not in err  # refused before any work
    assert {p: p.read_bytes() for p in images.iterdir()} == before


def test_no_output_may_be_an_input_file(tiny_model, exported, images, capsys):
    before = (images / "a.png").read_bytes()
    with pytest.raises(OutputLocationError, match="is the folder holding the input"):
        reconstruct_folder(tiny_model, images / "a.png", images)  # one file in, its own folder out
    assert main(["interpolate", "--model", str(exported), str(images / "a.png"), str(images / "b.png"), "--out",
                 str(images / "a.png")]) == 2
    assert "is the input file" in _one_error_line(capsys.readouterr().err)
    assert (images / "a.png").read_bytes() == before


def test_decode_refuses_an_output_folder_inside_the_latents_folder(exported, images, tmp_path, capsys):
    assert main(["encode", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "lat")]) == 0
    capsys.readouterr()
    assert main(["decode", "--model", str(exported), "--latents", str(tmp_path / "lat"), "--out",
                 str(tmp_path / "lat" / "png")]) == 2
    assert "is inside the latents folder" in _one_error_line(capsys.readouterr().err)
    assert _files(tmp_path / "lat") == ["latents-00000.safetensors"]


# ------------------------------------------------------------------------------------------- stale shards


def test_encode_refuses_a_folder_with_older_shards_and_replaces_them_when_told(tiny_model, images, tmp_path, capsys):
    lat = tmp_path / "lat"
    encode_folder(tiny_model, images, lat, shard_size=1)  # two shards
    other = tmp_path / "other"
    other.mkdir()
    _photo("rocket").save(other / "r.png")
    with pytest.raises(OutputLocationError, match=r"already holds 2 latent shards.*--overwrite"):
        encode_folder(tiny_model, other, lat)
    assert _files(lat) == ["latents-00000.safetensors", "latents-00001.safetensors"]  # untouched

    result = encode_folder(tiny_model, other, lat, overwrite=True)
    assert _files(lat) == ["latents-00000.safetensors"] and [r.name for r in result.records] == ["r.png"]
    decoded = decode_latents(tiny_model, lat, tmp_path / "dec")
    assert _files(tmp_path / "dec") == ["r.png"] and len(decoded.written) == 1


def test_encode_command_refuses_stale_shards_before_loading_the_model(images, tmp_path, capsys):
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "latents-00000.safetensors").write_bytes(b"old")
    # The model path does not exist: a refusal that came after loading it would say so instead.
    assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(images), "--out",
                 str(tmp_path / "lat")]) == 2
    assert "already holds 1 latent shard " in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- decompression bombs


def test_images_between_one_and_two_times_the_pixel_limit_are_refused(exported, images, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # a.png has 256 pixels: over the limit, under twice it
    assert main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "r1")]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable images: a.png" in captured.out
    assert "skipped a.png" in captured.err and "exceeds limit of 200 pixels" in captured.err
    assert "--max-image-pixels" in captured.err
    assert _files(tmp_path / "r1") == ["b.png"]

    assert main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "r2"),
                 "--max-image-pixels", "300"]) == 0
    assert _files(tmp_path / "r2") == ["a.png", "b.png"]
    assert Image.MAX_IMAGE_PIXELS == 200  # the option holds for the one command only


# ------------------------------------------------------------------------------------------- signals and full disks


def test_sigterm_during_convert_leaves_no_temporary_files(exported, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import kl_autoencoder.durable as durable
        real_fsync = os.fsync
        def fsync_then_sigterm(fd):  # the export's files are on disk, the rename has not happened yet
            real_fsync(fd)
            os.kill(os.getpid(), signal.SIGTERM)
        os.fsync = fsync_then_sigterm
        from kl_autoencoder.cli import main
        sys.exit(main(["convert", {str(exported)!r}, {str(tmp_path / "dst" / "copy")!r}]))
    """)
    (tmp_path / "dst").mkdir()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 143, (done.returncode, done.stderr[-2000:])
    assert _files(tmp_path / "dst") == []  # neither the hidden temporary folder nor a half export
    assert "SIGTERM" in _one_error_line(done.stderr)


def _disk_full(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["convert", "reconstruct", "encode"])
def test_a_full_disk_is_one_clear_line(command, exported, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = {"convert": ["convert", str(exported), str(out / "vae")],
            "reconstruct": ["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(out)],
            "encode": ["encode", "--model", str(exported), "--input", str(images), "--out", str(out)]}[command]
    out.mkdir()
    monkeypatch.setattr(os, "fsync", _disk_full)
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and command in line
    assert [p for p in _files(out) if p.startswith(".")] == []  # the temporary files went with the error


# ------------------------------------------------------------------------------------------- messages


def test_skipped_files_come_before_the_summary_that_counts_them(exported, images, tmp_path, monkeypatch):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    both = io.StringIO()  # stdout and stderr in one stream, in the order they were written
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    assert main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "r")]) == 0
    lines = [line for line in both.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "2 images, 2 files written; skipped 1 unreadable images: broken.png"
    assert any(line.startswith("skipped broken.png: ") for line in lines[:-1])
    assert any("3/3" in line for line in lines)  # the progress bar knows its total (files read, skipped included)


def test_an_invalid_tile_size_fails_before_any_progress_bar(exported, images, tmp_path, capsys):
    assert main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(tmp_path / "r"),
                 "--tile-size", "8", "--tile-overlap", "8"]) == 2
    err = capsys.readouterr().err
    assert "tile_size (8) must be larger than tile_overlap (8)" in _one_error_line(err)
    assert "reconstructing" not in err and _files(tmp_path / "r") == []


def test_sample_help_describes_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--num NUM how many images" in text
    assert "--seed SEED seed of the latent draws" in text
    assert "--image-size IMAGE_SIZE side of the square images in pixels" in text
    assert "examples/latent_diffusion.py" in text  # where real generation is


def test_latent_diffusion_example_help_shows_defaults():
    done = subprocess.run([sys.executable, "examples/latent_diffusion.py", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "(default: 400)" in text and "(default: outputs/quickstart/vae)" in text
