"""The run folder keeps users' files safe: one run at a time, no fresh run over someone else's files, no system roots,
pruning never drops the new checkpoint, and resuming loads no pickle (a planted one is refused, not run)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from kl_autoencoder.config import load_config
from kl_autoencoder.run_folder import STATE_FILE, RunFolder, RunFolderError, TrainingState, list_checkpoints
from kl_autoencoder.trainer import train
from tests.conftest import TINY_TRAINING

TINY = TINY_TRAINING + ["train.log_every=1", "train.scaling_images=16"]


def tiny(out: Path, *overrides: str):
    return load_config(None, TINY + [f"train.output_dir={out}", *overrides])


def test_a_second_run_on_a_held_folder_fails_at_once(tmp_path):
    out = tmp_path / "run"
    holder = RunFolder(out)
    holder.claim(resuming=False)
    try:
        with pytest.raises(RunFolderError, match="another training run is writing to"):
            train(tiny(out, "train.max_steps=1"))
    finally:
        holder.release()
    assert not (out / "metrics.jsonl").exists()  # the second run wrote nothing
    train(tiny(out, "train.max_steps=1"))  # released: the folder is usable again


def test_fresh_run_refuses_a_non_empty_folder_and_overwrite_keeps_foreign_files(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=5"))
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RunFolderError, match=r"not empty.*train.resume=latest.*train.overwrite=true"):
        train(tiny(out, "train.max_steps=1"))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted, nothing clobbered
    assert len(list_checkpoints(out / "checkpoints")) == 2
    train(tiny(out, "train.max_steps=1", "train.overwrite=true"))
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000001"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("folder", ["/", "/tmp", str(Path.home())])
def test_system_roots_are_refused(folder):
    with pytest.raises(RunFolderError, match="refusing to train into"):
        RunFolder(folder).claim(resuming=False)


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.claim(resuming=False)
    try:
        older = folder.checkpoints / "step_0000100"  # e.g. left by an older, longer run
        older.mkdir(parents=True)
        (older / STATE_FILE).write_text(json.dumps({"step": 100}))
        module = torch.nn.Linear(2, 2)
        written = folder.save_checkpoint(TrainingState(step=5), {"model": module}, {}, keep=1, needed_bytes=0)
        assert written.is_dir() and (folder.checkpoints / "latest").read_text().strip() == written.name
        assert not older.exists()
    finally:
        folder.release()


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_resume_refuses_a_planted_pickle_without_running_it(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2", "train.checkpoint_every=1"))
    checkpoint = list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(RunFolderError, match=r"random_states_0\.pkl.*loads no pickle"):
        train(tiny(out, "train.max_steps=4", "train.resume=latest"))
    assert not marker.exists()


def test_checkpoints_hold_only_safetensors_and_json_and_resume(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2", "train.checkpoint_every=1", "train.ema.enabled=true",
               "loss.learned_logvar=true"))
    checkpoint = list_checkpoints(out / "checkpoints")[-1]
    assert {p.suffix for p in checkpoint.iterdir()} == {".safetensors", ".json"}
    assert {p.name for p in checkpoint.iterdir()} == {
        "model.safetensors", "ema.safetensors", "logvar.safetensors", "optimizer.safetensors", "optimizer.json",
        STATE_FILE}
    train(tiny(out, "train.max_steps=3", "train.checkpoint_every=1", "train.ema.enabled=true",
               "loss.learned_logvar=true", "train.resume=latest"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_resuming_a_finished_run_says_so_and_leaves_the_export(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2"))
    export = out / "vae" / "diffusion_pytorch_model.safetensors"
    stamp = export.stat().st_mtime_ns
    capsys.readouterr()
    train(tiny(out, "train.max_steps=2", "train.resume=latest"))
    said = capsys.readouterr().out
    assert "already complete" in said and "nothing trained" in said, said
    assert export.stat().st_mtime_ns == stamp  # not re-exported
