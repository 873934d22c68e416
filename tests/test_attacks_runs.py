"""Attacks on run folders and command outputs.

Each test performs the attack as a user or a planted file would, and checks that nothing the toolkit did not write
is deleted, replaced or written through, and that each refusal is one clear line before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kl_autoencoder.cli import main
from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.inference import LatentFormatError, OutputLocationError, decode_latents
from kl_autoencoder.run_folder import STATE_FILE, RunFolder, RunFolderError, TrainingState
from kl_autoencoder.trainer import train
from tests.conftest import TINY_TRAINING
from tests.test_output_safety import _files, _one_error_line, _record, _shard, images  # noqa: F401 (fixture)
from tests.test_reliability import train_main

TINY = TINY_TRAINING + ["train.log_every=1", "train.scaling_images=16"]
RUN_MARKER = ".kl-autoencoder-run"  # run_folder.RUN_MARKER, spelt out: the file is part of the folder's format


def tiny(out: Path, *overrides: str):
    return load_config(None, TINY + [f"train.output_dir={out}", *overrides])


def _user_folder(root: Path) -> dict[str, str]:
    """A folder of the user's that happens to use run-artefact names; returns what must survive."""
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "model.bin").write_text("the user's own model")
    (root / "config.yaml").write_text("the user's own config")
    return {"vae/model.bin": "the user's own model", "config.yaml": "the user's own config"}


def _intact(root: Path, files: dict[str, str]) -> bool:
    return all((root / name).is_file() and (root / name).read_text() == text for name, text in files.items())


# ----------------------------------------------------------------------------------------------- 5: overwrite, resume


def test_overwrite_deletes_nothing_without_evidence_of_our_run(tmp_path):
    out = tmp_path / "mine"
    files = _user_folder(out)
    with pytest.raises(RunFolderError, match=r"nothing shows a kl-autoencoder run wrote them"):
        RunFolder(out).claim(resuming=False, overwrite=True)
    assert _intact(out, files)


def test_overwrite_replaces_a_previous_run_marked_as_ours(tmp_path):
    out = tmp_path / "run"
    first = RunFolder(out)
    first.claim(resuming=False)
    first.release()
    assert (out / RUN_MARKER).is_file()
    (out / "vae").mkdir()
    (out / "vae" / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    second = RunFolder(out)
    second.claim(resuming=False, overwrite=True)
    second.release()
    # the old export stays until the new run's export replaces it (a run that fails leaves it whole)
    assert (out / "vae" / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"


def test_resume_latest_without_a_checkpoint_never_trains_over_a_users_folder(tmp_path):
    out = tmp_path / "mine"
    files = _user_folder(out)
    with pytest.raises(RunFolderError, match=r"train.resume=latest found no complete checkpoint.*not empty"):
        train(tiny(out, "train.max_steps=1", "train.resume=latest"))
    assert _intact(out, files) and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- 6: symlinks in a run


def _resumable(out: Path) -> RunFolder:
    folder = RunFolder(out)
    folder.claim(resuming=False)
    folder.release()
    return folder


def test_a_symlinked_metrics_file_is_replaced_not_appended_through(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside" / "appended.jsonl"
    outside.parent.mkdir()
    folder = _resumable(out)
    folder.metrics_file.symlink_to(outside)  # does not exist yet: appending through the link would create it
    folder.claim(resuming=True)
    try:
        folder.start_metrics(0)
        folder.log_metrics(1, {"loss": 1.0})
    finally:
        folder.release()
    assert not outside.exists()
    assert not folder.metrics_file.is_symlink() and json.loads(folder.metrics_file.read_text())["step"] == 1


def test_a_symlinked_lock_creates_nothing_outside(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside" / "lockfile"
    outside.parent.mkdir()
    folder = _resumable(out)
    (out / ".lock").unlink(missing_ok=True)  # a finished run removes its lock file
    (out / ".lock").symlink_to(outside)
    folder.claim(resuming=True)
    folder.release()
    assert not outside.exists() and not (out / ".lock").is_symlink()


def test_a_symlinked_tensorboard_folder_is_replaced(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    folder = _resumable(out)
    (out / "tensorboard").symlink_to(outside, target_is_directory=True)
    with pytest.warns(UserWarning, match="replacing the link"):
        folder.claim(resuming=True)
    folder.release()
    assert not (out / "tensorboard").is_symlink() and (outside / "keep.txt").read_text() == "mine"


def _checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_a_symlinked_checkpoints_folder_is_refused_before_anything_is_pruned(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "other-run-checkpoints"
    precious = _checkpoint(outside, 7)
    _resumable(out)
    (out / "checkpoints").symlink_to(outside, target_is_directory=True)
    folder = RunFolder(out)
    with pytest.raises(RunFolderError, match="checkpoints is a symlink"):
        folder.resolve_resume("latest")
    with pytest.raises(RunFolderError, match="checkpoints is a symlink"):
        folder.claim(resuming=True)
    assert precious.is_dir() and (precious / STATE_FILE).is_file()


# ----------------------------------------------------------------------------------------------- 8: checkpoint files


@pytest.mark.parametrize("pointer", ["../../victim", "ABSOLUTE"])
def test_latest_may_not_point_outside_the_checkpoints_folder(tmp_path, pointer):
    out = tmp_path / "a" / "run"
    victim = _checkpoint(tmp_path / "a", 0).rename(tmp_path / "victim")  # a complete-looking folder outside
    _checkpoint(out / "checkpoints", 1)
    text = str(victim) if pointer == "ABSOLUTE" else pointer
    (out / "checkpoints" / "latest").write_text(text + "\n")
    with pytest.raises(RunFolderError, match="not a checkpoint folder inside"):
        RunFolder(out).resolve_resume("latest")


def _saved_optimizer(tmp_path: Path) -> tuple[RunFolder, Path, torch.nn.Module]:
    folder = RunFolder(tmp_path / "run")
    folder.claim(resuming=False)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = folder.save_checkpoint(TrainingState(step=1), {"model": module}, {"optimizer": optimizer}, keep=2,
                                  needed_bytes=0)
    folder.release()
    return folder, path, module


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_checkpoint_hyper_parameters_never_override_the_config(tmp_path):
    folder, path, module = _saved_optimizer(tmp_path)

    def hostile(data):
        data["param_groups"][0].update(maximize=True, weight_decay=float("nan"), lr=1e9, betas=[2.0, -1.0])

    _edit_json(path / "optimizer.json", hostile)
    fresh = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    state = folder.load_checkpoint(path, {"model": module}, {"optimizer": fresh})
    group = fresh.param_groups[0]
    assert state.step == 1 and not group["maximize"] and group["weight_decay"] == 0.01
    assert group["betas"] == (0.9, 0.999) and group["lr"] == 1e-3
    assert int(fresh.state[module.weight]["step"]) == 1  # the state itself was loaded


@pytest.mark.parametrize("file,edit,message", [
    ("optimizer.json", lambda d: d.update(param_groups=5), "'param_groups' list"),
    ("optimizer.json", lambda d: d.update(scalars="abc"), "'scalars' object"),
    ("optimizer.json", lambda d: d["scalars"].update({"0.step": "abc"}), "optimizer state '0.step'"),
    ("optimizer.json", lambda d: d["scalars"].update({"9.exp_avg": 1.0}), "optimizer state '9.exp_avg'"),
    ("optimizer.json", lambda d: d["param_groups"][0].update(params=[0, 1, 2, 3]), "parameter groups do not match"),
    (STATE_FILE, lambda d: d.update(step="x"), "step = 'x' must be a non-negative integer"),
    (STATE_FILE, lambda d: d.update(step=-3), "must be a non-negative integer"),
    (STATE_FILE, lambda d: d.update(rng="pickle"), "unknown entry 'rng'"),
])
def test_malformed_checkpoint_json_is_one_clear_error(tmp_path, file, edit, message):
    folder, path, module = _saved_optimizer(tmp_path)
    _edit_json(path / file, edit)
    fresh = torch.optim.AdamW(module.parameters())
    with pytest.raises(RunFolderError, match=message):
        folder.load_checkpoint(path, {"model": module}, {"optimizer": fresh})


def test_non_finite_optimizer_moments_are_refused(tmp_path):
    folder, path, module = _saved_optimizer(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    tensors["0.exp_avg_sq"] = torch.full_like(tensors["0.exp_avg_sq"], float("nan"))
    save_file(tensors, str(path / "optimizer.safetensors"))
    with pytest.raises(RunFolderError, match="optimizer state '0.exp_avg_sq'"):
        folder.load_checkpoint(path, {"model": module}, {"optimizer": torch.optim.AdamW(module.parameters())})


def test_a_corrupt_trainer_state_ends_the_training_command_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=1"))
    checkpoint = out / "checkpoints" / "step_0000001"
    _edit_json(checkpoint / STATE_FILE, lambda d: d.update(step=[1]))
    capsys.readouterr()
    code = train_main()([*TINY, f"train.output_dir={out}", "train.max_steps=2", "train.resume=latest"])
    err = capsys.readouterr().err
    assert code == 2 and "step = [1] must be a non-negative integer" in _one_error_line(err)


# ----------------------------------------------------------------------------------------------- decode: crafted names


@pytest.fixture
def exported(tmp_path, tiny_model):
    return tiny_model.save_pretrained(tmp_path / "vae")


def _decode_refused(tiny_model, tmp_path, records, match, error=OutputLocationError):
    lat = _shard(tmp_path / "lat" / "latents-00000.safetensors", records)
    out = tmp_path / "dec"
    with pytest.raises(error, match=match):
        decode_latents(tiny_model, lat.parent, out)
    assert _files(out) == []  # refused before the first write


def test_decode_refuses_a_name_that_another_needs_as_a_folder(tiny_model, tmp_path):
    _decode_refused(tiny_model, tmp_path, [_record(0, "a.png"), _record(1, "a.png/b.png")],
                    "both a file and the folder of another output")


def test_decode_refuses_a_path_too_long_to_create(tiny_model, tmp_path):
    deep = "/".join(["d" * 200] * 25) + "/x.png"  # every component fine, the whole path over PATH_MAX
    _decode_refused(tiny_model, tmp_path, [_record(0, "ok.png"), _record(1, deep)], "longer than 1024 bytes",
                    LatentFormatError)


def test_decode_refuses_names_nested_without_end(tiny_model, tmp_path):
    _decode_refused(tiny_model, tmp_path, [_record(0, "a/" * 40 + "x.png")], "nested 41 folders deep",
                    LatentFormatError)


@pytest.mark.parametrize("name", ["line\nbreak.png", "esc\x1b[31m.png", "del\x7f.png"])
def test_decode_refuses_control_characters_in_names(tiny_model, tmp_path, name):
    _decode_refused(tiny_model, tmp_path, [_record(0, name)], "control character", LatentFormatError)


def test_decode_refuses_a_fifo_named_like_a_shard_instead_of_hanging(exported, tmp_path):
    lat = _shard(tmp_path / "lat" / "latents-00000.safetensors", [_record(0, "a.png")]).parent
    os.mkfifo(lat / "latents-00001.safetensors")
    # A process of its own: a read blocked on a FIFO inside safetensors holds the GIL, no thread could time it out.
    try:
        result = subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", "decode", "--model", str(exported),
                                 "--latents", str(lat), "--out", str(tmp_path / "dec")],
                                capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("decode blocked on a FIFO named like a shard")
    assert result.returncode == 2 and "not a regular file" in _one_error_line(result.stderr)
    assert _files(tmp_path / "dec") == []


def test_decode_caps_output_pixels_like_max_image_pixels(exported, tmp_path, capsys):
    lat = _shard(tmp_path / "lat" / "latents-00000.safetensors", [_record(0, "big.png", (8, 8))])
    out = tmp_path / "dec"
    # a [4, 4, 4] latent of the f=2 model decodes to 8x8 = 64 pixels
    code = main(["decode", "--model", str(exported), "--latents", str(lat.parent), "--out", str(out),
                 "--max-image-pixels", "32"])
    assert code == 2 and "over the limit of 32" in _one_error_line(capsys.readouterr().err)
    assert _files(out) == []


def test_decode_rechecks_output_folders_for_symlinks_at_write_time(tiny_model, tmp_path, monkeypatch):
    from kl_autoencoder import inference

    lat = _shard(tmp_path / "lat" / "latents-00000.safetensors", [_record(0, "sub/a.png")]).parent
    out, outside = tmp_path / "dec", tmp_path / "outside"
    outside.mkdir()
    real = inference._decode_shards

    def swap_then_decode(*args, **kwargs):  # after every check, before the first write: sub/ becomes a link
        out.mkdir(exist_ok=True)
        (out / "sub").symlink_to(outside, target_is_directory=True)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(inference, "_decode_shards", swap_then_decode)
    with pytest.raises(OutputLocationError, match="is a symlink"):
        decode_latents(tiny_model, lat, out)
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------------------------- one output rule



@pytest.mark.parametrize("where", ["same", "inside"])
def test_encode_refuses_an_output_folder_in_its_input(exported, images, capsys, where):
    out = images if where == "same" else images / "latents"
    code = main(["encode", "--model", str(exported), "--input", str(images), "--out", str(out)])
    assert code == 2 and "input folder" in _one_error_line(capsys.readouterr().err)
    assert _files(images) == ["a.png", "b.png"]


def test_decode_refuses_the_folder_of_a_latents_file(exported, images, tmp_path, capsys):
    lat = tmp_path / "lat"
    assert main(["encode", "--model", str(exported), "--input", str(images), "--out", str(lat)]) == 0
    capsys.readouterr()
    shard = next(lat.glob("latents-*.safetensors"))
    code = main(["decode", "--model", str(exported), "--latents", str(shard), "--out", str(lat)])
    assert code == 2 and "folder holding the latents" in _one_error_line(capsys.readouterr().err)
    assert not list(lat.glob("*.png"))


def _argv(command: str, exported: Path, images: Path, tmp_path: Path, num: int = 2) -> tuple[list[str], Path]:
    model = ["--model", str(exported)]
    out = tmp_path / f"{command}-out"
    if command == "sample":
        return ["sample", *model, "--num", str(num), "--image-size", "8", "--out", str(out)], out
    if command == "reconstruct":
        return ["reconstruct", *model, "--input", str(images), "--out", str(out)], out
    if command == "decode":
        lat = tmp_path / "lat"
        if not lat.exists():
            assert main(["encode", *model, "--input", str(images), "--out", str(lat)]) == 0
        return ["decode", *model, "--latents", str(lat), "--out", str(out)], out
    out = tmp_path / "strip.png"
    return ["interpolate", *model, str(images / "a.png"), str(images / "b.png"), "--steps", "2", "--image-size", "8",
            "--out", str(out)], out


@pytest.mark.parametrize("command", ["sample", "reconstruct", "decode", "interpolate"])
def test_a_second_run_into_earlier_outputs_is_refused_unless_told(command, exported, images, tmp_path, capsys):
    argv, out = _argv(command, exported, images, tmp_path)
    assert main(argv) == 0
    before = _files(out) if out.is_dir() else [out.read_bytes()]
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"from an earlier {command}" in line and "--overwrite" in line
    assert (_files(out) if out.is_dir() else [out.read_bytes()]) == before
    assert main([*argv, "--overwrite"]) == 0


def test_sample_overwrite_leaves_no_stale_samples(exported, images, tmp_path):
    argv, out = _argv("sample", exported, images, tmp_path, num=3)
    assert main(argv) == 0
    argv, out = _argv("sample", exported, images, tmp_path, num=1)
    assert main([*argv, "--overwrite"]) == 0
    assert _files(out) == ["sample-00000.png"]  # not 00001 and 00002 of the earlier run beside the new one


def test_evaluate_refuses_a_folder_holding_an_earlier_evaluation(exported, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"earlier": true}')
    code = main(["evaluate", "--model", str(exported), "--data", "sample", "--out", str(out), "--resolution", "32"])
    assert code == 2 and "from an earlier evaluate" in _one_error_line(capsys.readouterr().err)
    assert _files(out) == ["metrics.json"]


def test_evaluate_model_names_stay_inside_the_output_folder():
    from kl_autoencoder.evaluation import model_names

    for name in model_names(["x/..", ".", "...", "a/vae"]):
        assert name.strip(".") and "/" not in name


def test_distill_refuses_a_run_folder_inside_its_data(exported, images, capsys):
    out = images / "run"
    code = main(["distill", "--teacher", str(exported), "--data", str(images), "--out", str(out), "--steps", "1",
                 "--resolution", "32"])
    assert code == 2 and "inside the input folder" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- one-line errors


def test_a_kl_config_too_large_to_build_is_refused_on_the_meta_device():
    huge = [f"model.architecture.block_out_channels=[{', '.join(['2048'] * 8)}]",
            "model.architecture.layers_per_block=8",
            f"model.architecture.down_block_types=[{', '.join(['DownEncoderBlock2D'] * 8)}]",
            f"model.architecture.up_block_types=[{', '.join(['UpDecoderBlock2D'] * 8)}]"]
    with pytest.raises(ConfigError, match=r"builds 11,\d{3},\d{3},\d{3} parameters .* over the limit"):
        load_config(None, huge)


def test_deeply_nested_configs_are_one_line_errors(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    for text, message in [('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
                          ('{"_class_name": ["AutoencoderKL"]}', "_class_name must be a string")]:
        (folder / "config.json").write_text(text)
        assert main(["info", str(folder)]) == 2
        assert message in _one_error_line(capsys.readouterr().err)


def test_an_output_symlink_loop_is_one_line(exported, images, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    code = main(["reconstruct", "--model", str(exported), "--input", str(images), "--out", str(loop / "x")])
    assert code == 2 and "symlink loop" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(RunFolderError, match="cannot be resolved"):
        RunFolder(loop).claim(resuming=False)


def test_an_unreachable_hub_dataset_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main()([*TINY, f"train.output_dir={out}", "data.source=someuser/no-such-dataset"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "could not load dataset" in err
    assert not out.exists()  # no config.yaml left to block the rerun


def test_too_little_disk_at_start_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    code = train_main()([*TINY, f"train.output_dir={out}", "train.max_steps=1"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "not enough disk space" in line
    assert not out.exists()


def test_evaluate_never_writes_its_pictures_through_a_planted_symlink(exported, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "eval"
    out.mkdir()
    from kl_autoencoder.evaluation import model_names

    name = model_names([str(exported)])[0]
    (out / name).symlink_to(outside, target_is_directory=True)  # where this model's pictures go
    code = main(["evaluate", "--model", str(exported), "--data", "sample", "--out", str(out), "--resolution", "32"])
    assert code == 2 and "symlink" in _one_error_line(capsys.readouterr().err)
    assert list(outside.iterdir()) == []
