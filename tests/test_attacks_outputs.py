"""Attacks on outputs that hold inputs, on what counts as a previous export, and on the export swap.

Each test performs the attack as a user or a concurrent process would, and checks that no input and no file the
toolkit did not write is deleted or replaced, and that each refusal is one clear line naming no flag that would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from kl_autoencoder import durable
from kl_autoencoder.cli import main
from kl_autoencoder.config import load_config
from kl_autoencoder.durable import OutputRefused, atomic_write_dir, is_previous_export
from kl_autoencoder.run_folder import RunFolder, RunFolderError
from kl_autoencoder.trainer import train
from tests.conftest import TINY_TRAINING
from tests.test_output_safety import _one_error_line, images  # noqa: F401 (fixture)
from tests.test_reliability import train_main

TINY = TINY_TRAINING + ["train.log_every=1", "train.scaling_images=4", "train.max_steps=1"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _previous_run(root: Path, tiny_model) -> Path:
    """A folder as a finished run leaves it: the run marker and its export in vae/."""
    folder = RunFolder(root)
    folder.claim(resuming=False)
    folder.release()
    return tiny_model.save_pretrained(root / "vae")


# ----------------------------------------------------------------------------------------------- 1: inputs in outputs


def test_fine_tuning_the_run_folders_own_export_with_overwrite_is_refused(tmp_path, tiny_model, capsys):
    run = tmp_path / "RUN2"
    vae = _previous_run(run, tiny_model)
    before = _digest(vae)
    code = train_main()(["--config", "configs/finetune-decoder.yaml", f"model.pretrained={vae}",
                         f"train.output_dir={run}", "train.overwrite=true", *TINY])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "model.pretrained" in line and "is inside train.output_dir" in line
    assert "overwrite" not in line  # no flag offered that would destroy the input
    assert _digest(vae) == before


def test_distilling_into_the_teachers_run_folder_with_overwrite_is_refused(tmp_path, tiny_model, images, capsys):
    run = tmp_path / "RUN2"
    teacher = _previous_run(run, tiny_model)
    before = _digest(teacher)
    code = main(["distill", "--teacher", str(teacher), "--data", str(images), "--out", str(run), "--steps", "1",
                 "--resolution", "32", "train.overwrite=true", "loss.perceptual_weight=0"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(teacher) in line and "overwrite" not in line
    assert _digest(teacher) == before


def test_a_run_folder_holding_its_data_is_refused(tmp_path, images):
    with pytest.raises(RunFolderError, match=r"data.source=.* is inside train.output_dir"):
        train(load_config(None, TINY + [f"data.source={images}", f"train.output_dir={tmp_path}"]))
    assert sorted(p.name for p in images.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("key,value", [("data.data_files", "RUN/shards/{00000..00003}.tar"),
                                       ("data.data_files", ["elsewhere.tar", "RUN/shards/*.tar"]),
                                       ("model.pretrained", "RUN/vae.safetensors"), ("distill.teacher", "RUN"),
                                       ("data.source", "RUN/..")])
def test_no_run_input_may_be_inside_or_hold_the_run_folder(tmp_path, key, value):
    from kl_autoencoder.run_folder import check_run_inputs

    run = tmp_path / "RUN"
    (run / "shards").mkdir(parents=True)
    (run / "vae.safetensors").write_bytes(b"weights")
    absolute = [str(tmp_path / v) for v in value] if isinstance(value, list) else str(tmp_path / value)
    with pytest.raises(RunFolderError, match=key.replace(".", r"\.")):
        check_run_inputs(run, {key: absolute})
    if key != "data.source":  # a sibling run folder is fine (under data.source=tmp_path it would lie inside it)
        check_run_inputs(tmp_path / "other-run", {key: absolute})
    check_run_inputs(run, {"data.source": "someuser/hub-dataset"})  # names not on disk are not inputs there


def test_an_overwrite_run_keeps_the_old_export_until_its_own_is_complete(tmp_path, monkeypatch, one_thread):
    from kl_autoencoder import trainer

    run = tmp_path / "run"
    train(load_config(None, TINY + [f"train.output_dir={run}"]))
    before = _digest(run / "vae")

    def fails(*args, **kwargs):
        raise RuntimeError("the machine failed mid-run")

    with monkeypatch.context() as patched:
        patched.setattr(trainer, "train_step", fails)
        with pytest.raises(RuntimeError, match="mid-run"):
            train(load_config(None, TINY + [f"train.output_dir={run}", "train.overwrite=true", "train.seed=1"]))
    assert _digest(run / "vae") == before  # a failed run leaves the previous export whole
    # a run that completes replaces it, and a resume of that run never mistakes the old export for its own
    train(load_config(None, TINY + [f"train.output_dir={run}", "train.overwrite=true", "train.seed=1"]))
    assert _digest(run / "vae") != before and (run / "summary.json").is_file()


def test_reconstruct_overwrite_never_deletes_inputs_inside_the_output_folder(tmp_path, tiny_model, images, capsys):
    model = tiny_model.save_pretrained(tmp_path / "vae")
    out = images.parent
    code = main(["reconstruct", "--model", str(model), "--input", str(images), "--out", str(out), "--overwrite"])
    assert code == 2 and "holds the input" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in images.iterdir()) == ["a.png", "b.png"]


# ----------------------------------------------------------------------------------------------- 9: previous exports


def test_convert_never_counts_a_users_bin_or_safetensors_as_a_previous_export(tmp_path, tiny_model, capsys):
    model = tiny_model.save_pretrained(tmp_path / "M")
    target = tmp_path / "D1"
    target.mkdir()
    (target / "config.json").write_text((model / "config.json").read_text())
    (target / "thesis.bin").write_text("four years of work")
    (target / "my-finetune-step50000.safetensors").write_bytes(b"weights of my own")
    code = main(["convert", str(model), str(target)])
    assert code == 2 and "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert (target / "thesis.bin").read_text() == "four years of work"
    assert (target / "my-finetune-step50000.safetensors").read_bytes() == b"weights of my own"


@pytest.mark.parametrize("name,ours", [("diffusion_pytorch_model.safetensors", True),
                                       ("diffusion_pytorch_model.fp16.safetensors", True),
                                       ("diffusion_pytorch_model-00001-of-00002.safetensors", True),
                                       ("diffusion_pytorch_model.safetensors.index.json", True),
                                       ("tiny_decoder.safetensors", True), ("model.bin", False),
                                       ("vae.safetensors", False), ("README.md", False)])
def test_a_previous_export_is_known_by_its_file_names(tmp_path, name, ours):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / name).write_bytes(b"x")
    assert is_previous_export(tmp_path) is ours


def _export_writer(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights")


def test_the_swap_keeps_a_file_created_after_its_last_check(tmp_path, monkeypatch):
    dest = tmp_path / "export"
    atomic_write_dir(dest, _export_writer)
    real_check = durable.check_replaceable_dir
    calls = []

    def check_then_a_writer_acts(path, *args):  # a concurrent writer, right after the check before the swap
        real_check(path, *args)
        calls.append(path)
        if len(calls) == 2:
            (Path(path) / "notes.txt").write_text("written during the swap")

    monkeypatch.setattr(durable, "check_replaceable_dir", check_then_a_writer_acts)
    with pytest.warns(UserWarning, match="kept in"):
        atomic_write_dir(dest, _export_writer)
    kept = [p for p in tmp_path.rglob("notes.txt")]
    assert len(kept) == 1 and kept[0].read_text() == "written during the swap"
    assert (dest / "diffusion_pytorch_model.safetensors").read_bytes() == b"new weights"


WRITER = """
import os, sys, time
dest, stop = sys.argv[1], sys.argv[2]
count = 0
while not os.path.exists(stop):
    try:
        fd = os.open(os.path.join(dest, f"user-{count}.txt"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        time.sleep(0.0005)
        continue
    os.write(fd, b"mine")
    os.close(fd)
    count += 1
    time.sleep(0.003)
print(count)
"""


def test_swaps_racing_a_concurrent_writer_lose_no_file(tmp_path):
    dest, stop, kept = tmp_path / "export", tmp_path / "stop", tmp_path / "kept"
    kept.mkdir()
    atomic_write_dir(dest, _export_writer)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), str(stop)], stdout=subprocess.PIPE, text=True)

    def harvest() -> None:  # move the writer's files out of the destination and any folder a swap set aside
        for path in tmp_path.glob("*/user-*.txt"):
            if path.parent != kept:
                os.replace(path, kept / path.name)

    try:
        swaps, deadline = 0, time.monotonic() + 4
        while time.monotonic() < deadline and swaps < 45:
            harvest()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "files created during the replacement were kept in ..."
                    atomic_write_dir(dest, _export_writer)
                swaps += 1
            except OutputRefused:
                pass  # the writer's file was there at the check: refused, nothing lost
    finally:
        stop.touch()
        written = int(writer.communicate(timeout=60)[0])
    harvest()
    assert swaps > 0 and written > 0
    assert len(list(kept.glob("user-*.txt"))) == written

