"""The fine-tune journey a new user takes: a released SDXL VAE's config-less single file, fine-tuned on a folder of
their own photos, compared with the original on held-out photos of theirs, exported both ways, encoded to latents on
two CPU processes, dropped into an SDXL pipeline. One test per stumble on the way (precision on a CPU, a stop in a
long step, the resume line, the two-process encode, what evaluate says and skips, messages a user can type), then the
whole journey at full size (`test_the_whole_journey_at_full_size`, about a minute on two CPU cores)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kl_autoencoder import trainer
from kl_autoencoder.config import load_config
from kl_autoencoder.trainer import TrainingInterrupted, make_accelerator, train
from tests.conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "training" / "train.py"


def tiny_run(out: Path, *overrides: str):
    return load_config(None, TINY_TRAINING + ["train.batch_size=2", "train.log_every=1", f"train.output_dir={out}",
                                              *overrides])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------- 1. precision follows the device


@pytest.mark.parametrize("recipe", ["finetune-decoder", "kl-f8", "kl-f8-c16", "eq-finetune"])
def test_recipes_train_in_fp32_on_a_cpu(recipe):
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", ["model.pretrained=unused"])
    accelerator = make_accelerator(cfg)
    assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"


def test_auto_precision_is_said_once_at_start(tmp_path, capsys):
    train(tiny_run(tmp_path / "run", "train.max_steps=1", "train.mixed_precision=auto"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "mixed precision" in line]
    assert len(lines) == 1 and "mixed precision: no" in lines[0] and "fp32 is faster" in lines[0], lines


def test_bf16_asked_for_on_a_cpu_is_kept_with_a_word():
    from kl_autoencoder.fastpath import mixed_precision_for

    assert mixed_precision_for("bf16", cpu=True)[0] == "bf16"
    assert "slower" in mixed_precision_for("bf16", cpu=True)[1]
    assert mixed_precision_for("no", cpu=True) == ("no", "mixed precision: no")
    assert mixed_precision_for("auto", cpu=True)[0] == "no"


# ------------------------------------------------------------------------------------- 1. a stop inside a long step


def stop_inside_step(monkeypatch, step: int) -> None:
    """SIGTERM to ourselves from inside the decoder's forward pass of optimizer step `step` (0-based)."""
    real = trainer.train_step

    def train_step(t, x, at, micro=0):
        if at != step:
            return real(t, x, at, micro)
        decoder = t.raw_model.decoder
        handle = decoder.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            return real(t, x, at, micro)
        finally:
            handle.remove()

    monkeypatch.setattr(trainer, "train_step", train_step)


def test_a_stop_mid_step_drops_that_step_and_the_resume_replays_it(tmp_path, monkeypatch):
    straight = train(tiny_run(tmp_path / "straight", "train.max_steps=3"))
    stop_inside_step(monkeypatch, step=1)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_run(tmp_path / "stopped", "train.max_steps=3"))
    # the step in flight was dropped at once (not finished): the checkpoint is step 1's, the data position too
    assert stopped.value.step == 1 and stopped.value.signal_name == "SIGTERM"
    state = json.loads((stopped.value.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["batches_seen"] == 1
    monkeypatch.undo()
    resumed = train(tiny_run(tmp_path / "stopped", "train.max_steps=3", "train.resume=latest"))
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the dropped step replayed exactly


# ------------------------------------------------------------------------------------- 2. the printed resume line


def test_the_printed_resume_line_resumes_as_printed(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(TRAIN_PY.parent))
    try:
        import train as train_py
    finally:
        sys.path.remove(str(TRAIN_PY.parent))
    out = tmp_path / "run"
    stop_inside_step(monkeypatch, step=1)
    overrides = TINY_TRAINING + ["train.batch_size=2", f"train.output_dir={out}", "train.max_steps=2"]
    assert train_py.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides]) == 143
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("resume with: "))
    command = shlex.split(line.removeprefix("resume with: "))
    assert command[0] == "python" and "train.output_dir" not in line  # the run's own config.yaml says it all
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and json.loads((out / "summary.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------- 3. two CPU processes, no flags


def photo_folder(folder: Path, count: int, size: tuple[int, int] = (48, 40)) -> Path:
    """`count` photos of the built-in set (each a different crop when more are asked for than there are photos)."""
    from kl_autoencoder.data import sample_images

    folder.mkdir(parents=True)
    photos = sample_images("all")
    for i in range(count):
        name, image = photos[i % len(photos)]
        image.crop((i, i, image.width - i, image.height - i)).resize(size).save(folder / f"{i:02d}-{name}.png")
    return folder


def launch_encode(model: Path, folder: Path, out: Path, resolution: int, *extra: str) -> subprocess.CompletedProcess:
    """The README's two-process encode on a CPU machine, as a user types it: no --device, no --shard-size."""
    from tests.test_trainer import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "kl_autoencoder.cli", "encode", "--model", str(model),
           "--input", str(folder), "--out", str(out), "--resolution", str(resolution), *extra]
    return subprocess.run(cmd, env={**env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_two_cpu_processes_encode_a_small_folder_each_its_share(tmp_path, tiny_model):
    model = tiny_model.save_pretrained(tmp_path / "vae")
    folder = photo_folder(tmp_path / "photos", 16)
    out = tmp_path / "latents"
    done = launch_encode(model, folder, out, 32)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):  # each process knows its rank and encoded a share: 16 images, 2 shards of 8
        assert f"[process {rank}/2] 8 image(s) encoded into 1 new shard(s)" in done.stdout, done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 16 and len(manifest["shards"]) == 2
