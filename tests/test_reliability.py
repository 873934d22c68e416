"""Crash safety and bad input, each through real processes and real files: SIGKILL at random points (one inside
a checkpoint write) then `resume=latest` reaches the weights of an uninterrupted run; SIGINT; non-finite steps;
a corpus of broken images; bad configs and bad pretrained files refused before any work."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kl_autoencoder.config import load_config
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.data import EpochSampler
from kl_autoencoder.run_folder import STATE_FILE, is_complete_checkpoint, list_checkpoints
from kl_autoencoder.trainer import NonFiniteLossError, train
from tests.slow_checkpoint_train import PAUSE_MARK

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = str(ROOT / "training" / "train.py")
WEIGHTS = "diffusion_pytorch_model.safetensors"
ARCH = ["model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
        "model.architecture.layers_per_block=1", "model.architecture.mid_block_add_attention=false"]
TINY = ARCH + [
    "data.resolution=32", "data.num_workers=0", "loss.perceptual_weight=0", "loss.perceptual_pretrained=false",
    "train.batch_size=4", "train.log_every=1", "train.image_every=0",
    "optim.lr=2e-3", "optim.betas=[0.9, 0.99]",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def launch(*overrides: str, env: dict | None = None, script: str = TRAIN_PY) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**ENV, **(env or {})})


def last_logged_step(out: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 if none); lines repeat after a resume."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().split("\n")[:-1] if line.strip()]  # drop a half-written tail
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue
    return 0


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll `condition()` while `proc` runs; True once it holds, False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("condition not reached in time")


def kill9(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    return stderr


def assert_consistent_after_kill(root: Path) -> None:
    """What a kill may leave: `latest` (if any) names a complete checkpoint, and every folder marked complete
    (state file present) holds readable, finite weights and the other state files."""
    pointer = root / "latest"
    if pointer.exists():
        assert is_complete_checkpoint(root / pointer.read_text().strip()), pointer.read_text()
    for path in root.glob("step_*"):
        if is_complete_checkpoint(path):
            assert all(torch.isfinite(v).all() for v in load_file(path / "model.safetensors").values())
            assert (path / "optimizer.safetensors").is_file() and (path / "optimizer.json").is_file()
            assert (path / "ema.safetensors").is_file()


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------- SIGKILL


def test_sigkill_anywhere_then_resume_latest_matches_uninterrupted_run(tmp_path):
    """Kill -9 three times (random steps from a seeded RNG, and once inside a checkpoint write), resume each time
    with train.resume=latest, finish: the final weights equal a straight run's; every complete checkpoint loads."""
    run = ["train.max_steps=12", "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.ema.enabled=true",
           "train.ema.decay=0.9", "optim.warmup_steps=4", "data.random_crop=true", "data.random_flip=true"]
    reference = tmp_path / "straight"
    train(load_config(None, TINY + run + [f"train.output_dir={reference}"]))

    out = tmp_path / "killed"
    root = out / "checkpoints"
    args = TINY + run + [f"train.output_dir={out}", "train.resume=latest"]
    rng = random.Random(20240611)
    done_steps = []

    # 1: a random step in the first half (before or after the first checkpoint)
    target = rng.randint(1, 5)
    proc = launch(*args)
    assert wait_until(lambda: last_logged_step(out) >= target, proc), proc.communicate()
    kill9(proc)
    assert_consistent_after_kill(root)
    done_steps.append(last_logged_step(out))

    # 2: inside a checkpoint write: the temp folder is fully written (state file included) but not yet renamed
    proc = launch(*args, script=str(ROOT / "tests" / "slow_checkpoint_train.py"))
    for line in proc.stdout:  # the wrapper announces its pause once everything before the rename is done
        if line.startswith(PAUSE_MARK):
            break
    else:
        raise AssertionError(f"the run ended without pausing in a checkpoint: {proc.communicate()}")
    assert any((p / STATE_FILE).is_file() for p in root.glob(".tmp-step_*"))
    kill9(proc)
    assert_consistent_after_kill(root)
    leftover = [p.name for p in root.glob(".tmp-step_*")]
    assert leftover, "the kill should have left the temp checkpoint folder"
    assert all(p.name not in leftover for p in list_checkpoints(root, warn=False))  # never taken as a checkpoint
    done_steps.append(last_logged_step(out))

    # 3: a random step in the second half, plus a random extra delay (the kill lands mid-step or mid-write)
    target = rng.randint(7, 11)
    delay = rng.uniform(0.0, 0.2)
    proc = launch(*args)
    assert wait_until(lambda: last_logged_step(out) >= target, proc), proc.communicate()
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        pass
    stderr = kill9(proc)
    assert f"ignoring incomplete checkpoint folder {root / leftover[0]}" in stderr, stderr[-3000:]  # warned
    assert_consistent_after_kill(root)
    done_steps.append(last_logged_step(out))

    # finish
    proc = launch(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert not list(root.glob(".tmp-*")), "leftover temp folders are cleaned at the next checkpoint"

    straight = load_file(reference / "checkpoints" / "step_0000012" / "model.safetensors")
    resumed = load_file(root / "step_0000012" / "model.safetensors")
    assert max_abs_diff(straight, resumed) < 1e-5, done_steps
    assert max_abs_diff(load_file(reference / "vae" / WEIGHTS), load_file(out / "vae" / WEIGHTS)) < 1e-5  # EMA
    # metrics.jsonl is one clean history (partial lines and re-trained steps dropped at resume), same losses
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 13))
    assert [m["loss"] for m in logged] == pytest.approx([m["loss"] for m in expected], rel=1e-5)

    # every folder that looks complete is complete: weights fit the model, are finite, and accelerate resumes it
    complete = list_checkpoints(root)
    assert [p.name for p in complete] == ["step_0000009", "step_0000012"]  # keep_checkpoints=2 pruned the rest
    for path in complete:
        weights = load_file(path / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values())
        model = KLAutoencoder.from_pretrained(reference / "vae")
        model.load_state_dict(weights, strict=True)
        step = json.loads((path / STATE_FILE).read_text())["step"]
        assert path.name == f"step_{step:07d}"
        verify = tmp_path / f"verify_{step}"  # loads the whole state (optimizer, scheduler, RNG, EMA) and exports
        train(load_config(None, TINY + run + [f"train.output_dir={verify}", f"train.resume={path}",
                                              f"train.max_steps={step}"]))
        assert json.loads((verify / "summary.json").read_text())["steps"] == step


# ----------------------------------------------------------------------------------------------- SIGINT


def test_sigint_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path):
    out = tmp_path / "int"
    proc = launch(*TINY, "train.max_steps=100000", "train.checkpoint_every=0", f"train.output_dir={out}")
    assert wait_until(lambda: last_logged_step(out) >= 2, proc), proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]  # 128 + SIGINT: `train && evaluate` must not carry on
    assert "SIGINT" in stdout and "train.resume=latest" in stdout, stdout[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    step = json.loads((ckpt / STATE_FILE).read_text())["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert step >= last_logged_step(out) >= 2  # the step in flight was finished and logged, then saved
    assert all(torch.isfinite(v).all() for v in load_file(ckpt / "model.safetensors").values())


# ----------------------------------------------------------------------------------------------- non-finite


def test_consecutive_nonfinite_steps_stop_and_leave_last_checkpoint_intact(tmp_path, monkeypatch, nan_at_steps):
    out = tmp_path / "nan"
    nan_at_steps({3, 5, 6, 7})  # step 3 alone is skipped; 5, 6, 7 in a row stop the run
    cfg = load_config(None, TINY + [f"train.output_dir={out}", "train.max_steps=20", "train.checkpoint_every=2",
                                    "train.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive.*stopping at step 7.*loss terms.*'pixel'.*'kl'"):
        train(cfg)
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts][-1] == "step_0000006"  # written before the limit was reached
    state = json.loads((ckpts[-1] / STATE_FILE).read_text())
    assert state["nonfinite_total"] == 3 and state["nonfinite_run"] == 2
    w2, w4, w6 = (load_file(out / "checkpoints" / f"step_000000{s}" / "model.safetensors") for s in (2, 4, 6))
    assert all(torch.isfinite(v).all() for v in w6.values())
    assert max_abs_diff(w2, w4) > 0  # step 4 was a real update (step 3 skipped)
    assert max_abs_diff(w4, w6) == 0  # steps 5 and 6 were skipped: the last good weights are untouched...
    nan_at_steps(set())
    cfg = load_config(None, TINY + [f"train.output_dir={out}", "train.max_steps=8", "train.checkpoint_every=2",
                                    "train.resume=latest"])
    train(cfg)  # ...and the last good checkpoint resumes
    assert all(torch.isfinite(v).all() for v in load_file(out / "vae" / WEIGHTS).values())


def test_posterior_is_float32_under_autocast():
    torch.manual_seed(0)
    model = KLAutoencoder(block_out_channels=(8, 16), norm_num_groups=4, mid_block_add_attention=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = model.encode(x)
        assert model.encoder(x).dtype == torch.bfloat16  # autocast is really on
    assert posterior.mean.dtype == posterior.logvar.dtype == torch.float32
    assert torch.isfinite(posterior.kl()).all()


# ----------------------------------------------------------------------------------------------- bad images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A small, valid-looking PNG whose header claims width x height pixels (1.6 G px > 2 x Pillow's limit)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def make_corpus(folder: Path) -> list[str]:
    """Good images in every awkward mode plus bad files; returns the bad files' names."""
    from skimage import data as skdata

    folder.mkdir()
    photo = Image.fromarray(skdata.astronaut()).resize((64, 64))
    photo.save(folder / "good_rgb.png")
    photo.convert("RGBA").save(folder / "good_rgba.png")
    photo.convert("P").save(folder / "good_palette.png")
    photo.convert("CMYK").save(folder / "good_cmyk.jpg")
    Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30)).save(folder / "good_16bit.png")
    photo.resize((1, 1)).save(folder / "good_1x1.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    photo.crop((0, 0, 64, 40)).save(folder / "good_exif_rotated.jpg", exif=exif)
    png, jpg = (folder / "good_rgb.png").read_bytes(), (folder / "good_cmyk.jpg").read_bytes()
    bad = {
        "bad_empty.png": b"",
        "bad_truncated.png": png[: len(png) // 2],
        "bad_truncated.jpg": jpg[: len(jpg) // 2],
        "bad_text.jpg": b"this is a text file with an image extension\n" * 20,
        "bad_bomb.png": decompression_bomb_png(),
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return sorted(bad)


def test_awkward_images_convert_and_bomb_is_refused(tmp_path):
    from kl_autoencoder.data import BadImageError, load_image

    folder = tmp_path / "corpus"
    bad = make_corpus(folder)
    assert Image.open(folder / "good_16bit.png").mode.startswith("I")  # really a 16-bit file
    assert load_image(folder / "good_exif_rotated.jpg").size == (40, 64)  # EXIF rotation applied
    sixteen = np.asarray(load_image(folder / "good_16bit.png"))[..., 0].astype(float)
    expected = np.arange(48 * 40).reshape(40, 48) * 30 / 257.0  # 16-bit range mapped onto 0..255, not clipped
    assert np.abs(sixteen - expected).max() <= 0.5
    for name in bad:
        with pytest.raises(BadImageError, match=name):
            load_image(folder / name)
    with pytest.raises(BadImageError, match="(?i)decompression ?bomb"):
        load_image(folder / "bad_bomb.png")


def steps_to_visit_every_file(num_files: int, batch_size: int, seed: int) -> int:
    """Optimizer steps after which the trainer's sampler has drawn every file at least once (epoch 0)."""
    repeats = -(-256 // num_files)  # data.MIN_EPOCH_ITEMS
    seen = set()
    for position, (index, _) in enumerate(EpochSampler(num_files * repeats, seed, 0, 0, 1)):
        seen.add(index % num_files)
        if len(seen) == num_files:
            return position // batch_size + 1
    raise AssertionError("an epoch does not visit every file")


def test_training_over_a_broken_corpus_skips_and_names_every_bad_file(tmp_path):
    folder = tmp_path / "corpus"
    bad = make_corpus(folder)
    steps = steps_to_visit_every_file(len(list(folder.iterdir())), batch_size=4, seed=0)
    assert steps <= 20
    out = tmp_path / "run"
    proc = launch(*TINY, f"data.source={folder}", f"train.max_steps={steps}", f"train.output_dir={out}")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["skipped_images"] == len(bad)
    assert sorted(Path(f).name for f in summary["skipped_files"]) == bad
    log = stdout + stderr
    assert f"skipped {len(bad)} unreadable image(s)" in log
    for name in bad:
        assert name in log
    assert all(torch.isfinite(v).all() for v in load_file(out / "vae" / WEIGHTS).values())


# ----------------------------------------------------------------------------------------------- refused before work


def train_main():
    """training/train.py's `main(argv) -> exit code`, imported from the file (it is a script, not a module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def refused(args: list[str], capsys, subprocess_run: bool) -> tuple[int, str]:
    """(exit code, stderr) of the training entry point: a real process, or its `main` in this one (faster)."""
    if subprocess_run:
        result = subprocess.run([sys.executable, TRAIN_PY, *args], capture_output=True, text=True, cwd=ROOT,
                                env=ENV, timeout=300)
        return result.returncode, result.stderr
    capsys.readouterr()
    code = train_main()(args)
    return code, capsys.readouterr().err


def test_bad_configs_fail_before_any_output(tmp_path, capsys):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("model:\n  architecture:\n    block_out_channels: [8, 12]\n    norm_num_groups: 8\n")
    cases = [
        (["--config", str(yaml_file), "data.resolution=32"], "'model.architecture.norm_num_groups': norm_num_groups=8 does not divide"),
        (["optim.lrr=1e-4"], "did you mean 'lr'"),
        (["train.batch_size=four"], "'train.batch_size' must be int"),
        (["optim.lr=-0.001"], "'optim.lr' = -0.001: learning rate must be > 0"),
        (ARCH + ["data.resolution=33"], "'data.resolution' = 33: must be divisible by the downsampling factor 2"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, stderr = refused([*args, f"train.output_dir={out}"], capsys, subprocess_run=i == 0)
        assert code == 2, stderr[-2000:]
        assert message in stderr and "Traceback" not in stderr, stderr[-2000:]
        assert not out.exists()


class RunsCodeWhenUnpickled:
    """A pickle payload: full unpickling would create `marker`; weights_only=True must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_pretrained_files_are_refused_before_training(tmp_path, capsys):
    torch.manual_seed(0)
    other = KLAutoencoder(block_out_channels=(16, 32), norm_num_groups=4, mid_block_add_attention=False)
    # a diffusers folder whose config says (8, 16) but whose weights are (16, 32): shapes do not fit
    shapes = tmp_path / "shapes"
    KLAutoencoder(block_out_channels=(8, 16), norm_num_groups=4, mid_block_add_attention=False).save_pretrained(shapes)
    save_file(other.state_dict(), str(shapes / WEIGHTS))
    # the same folder with renamed keys: keys do not fit
    keys = tmp_path / "keys"
    KLAutoencoder(block_out_channels=(8, 16), norm_num_groups=4, mid_block_add_attention=False).save_pretrained(keys)
    state = load_file(keys / WEIGHTS)
    save_file({k.replace("decoder.", "dekoder."): v for k, v in state.items()}, str(keys / WEIGHTS))
    # a pickle that needs more than weights_only=True (it would run code)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**other.state_dict(), "payload": RunsCodeWhenUnpickled(marker)}}, evil)

    cases = [(evil, "weights_only=True"), (shapes, "do not fit"), (keys, "do not fit")]
    for i, (path, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        args = [*TINY, f"model.pretrained={path}", "train.max_steps=2", f"train.output_dir={out}"]
        code, stderr = refused(args, capsys, subprocess_run=i == 0)
        assert code == 2, (path, stderr[-2000:])
        assert message in stderr and str(path) in stderr, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-2000:]
        assert not out.exists()
    assert not marker.exists(), "the pickle's code ran"
