"""The trainer end to end on tiny models: learning, exact resume, two processes, GAN, decoder-only fine-tuning,
non-finite steps, SIGTERM, bad images, and the diffusers export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage.metrics import peak_signal_noise_ratio

from kl_autoencoder.config import load_config
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.run_folder import list_checkpoints
from kl_autoencoder.trainer import NonFiniteLossError, build_model, train

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = [
    "model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
    "model.architecture.layers_per_block=1", "model.architecture.mid_block_add_attention=false",
    "data.resolution=32", "data.num_workers=0", "loss.perceptual_weight=0", "loss.perceptual_pretrained=false",
    "train.batch_size=4", "train.log_every=1", "train.image_every=0", "train.checkpoint_every=0",
    "optim.lr=2e-3", "optim.betas=[0.9, 0.99]",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(out: Path, *overrides: str):
    return load_config(None, TINY + [f"train.output_dir={out}", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def heldout_psnr(model: KLAutoencoder) -> float:
    """Mean PSNR (skimage's) of posterior-mode reconstructions of the held-out sample photos."""
    from kl_autoencoder.data import load_eval_images

    _, x = load_eval_images("sample:heldout", 32)
    with torch.no_grad():
        r = model.eval()(x, sample=False)[0].clamp(-1, 1)
    a, b = ((x + 1) / 2).numpy(), ((r + 1) / 2).numpy()
    return float(np.mean([peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(len(a))]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained for 60 steps on the sample photos (shared: export, fine-tuning, diffusers load)."""
    out = tmp_path_factory.mktemp("trained")
    export = train(tiny_config(out, "train.max_steps=60", "train.log_every=5", "train.image_every=30"))
    return export


def test_short_run_learns_and_exports(trained):
    out = trained.parent
    logged = metrics(out)
    assert {"step", "loss", "pixel", "kl", "images_per_second", "lr"} <= set(logged[0])
    first, last = np.mean([m["loss"] for m in logged[:2]]), np.mean([m["loss"] for m in logged[-2:]])
    assert last < 0.7 * first, (first, last)
    untrained = build_model(tiny_config(out / "unused").model)
    torch.manual_seed(0)
    before, after = heldout_psnr(untrained), heldout_psnr(KLAutoencoder.from_pretrained(trained))
    assert after > before + 3.0, (before, after)
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").glob("events.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["nonfinite_steps"] == 0


def test_export_loads_in_diffusers_with_measured_scaling(trained):
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(trained).eval()
    ours = KLAutoencoder.from_pretrained(trained).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference.decode(reference.encode(x).latent_dist.mode()).sample
        got = ours.decode(ours.encode(x).mode())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    config = json.loads((trained / "config.json").read_text())
    assert config["scaling_factor"] != 0.18215 and config["scaling_factor"] > 0
    assert config["shift_factor"] is None  # 4 latent channels: no shift by default
    # the exported factor gives unit-std latents on crops the estimator never saw
    from kl_autoencoder.config import DataConfig
    from kl_autoencoder.data import build_dataset, training_batches

    crops = build_dataset(DataConfig(source="sample", split="train", resolution=32), train=True)
    x = next(training_batches(crops, 128, seed=123, num_workers=0))["pixel_values"]
    with torch.no_grad():
        z = ours.encode(x).sample(torch.Generator().manual_seed(0)) * config["scaling_factor"]
    assert z.std().item() == pytest.approx(1.0, rel=0.05)


def test_resume_is_exact_including_data_position(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 steps (random crops/flips on, EMA on)."""
    common = ["train.checkpoint_every=3", "train.ema.enabled=true", "train.ema.decay=0.9", "data.random_crop=true",
              "data.random_flip=true", "optim.warmup_steps=5"]  # warm-up spans the resume
    straight = tmp_path / "straight"
    train(tiny_config(straight, "train.max_steps=6", *common))
    split = tmp_path / "split"
    train(tiny_config(split, "train.max_steps=3", *common))
    train(tiny_config(split, "train.max_steps=6", "train.resume=latest", *common))
    a = load_file(straight / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(split / "checkpoints" / "step_0000006" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # data position: the same losses at the same steps after the resume
    la = {m["step"]: m["loss"] for m in metrics(straight)}
    lb = {m["step"]: m["loss"] for m in metrics(split)}
    for step in (4, 5, 6):
        assert lb[step] == pytest.approx(la[step], rel=1e-5)
    ea = load_file(straight / "vae" / WEIGHTS)  # EMA export
    eb = load_file(split / "vae" / WEIGHTS)
    assert max((ea[k] - eb[k]).abs().max().item() for k in ea) < 1e-5
    assert (ea["decoder.conv_out.weight"] - a["decoder.conv_out.weight"]).abs().max() > 0  # EMA != raw weights


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_export(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "training" / "train.py"), *TINY, "train.max_steps=3", f"train.output_dir={out}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("training on 2 process(es)") == 1, result.stdout  # two ranks, said once
    assert result.stdout.count("exported ") == 1, result.stdout
    assert KLAutoencoder.from_pretrained(out / "vae") is not None
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert logged[-1]["images_per_second"] > 0


def test_two_processes_stop_together_soon_after_one_is_signalled(tmp_path):
    """SIGTERM reaching one rank stops both at the same step, within two steps of the signal (not at the next log
    step, 50 here), with one checkpoint, of that step."""
    out = tmp_path / "stop"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(ROOT / "tests" / "stop_ddp_train.py"), "3", *TINY, "train.max_steps=20",
           "train.log_every=50", "train.checkpoint_every=0", f"train.output_dir={out}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] and 4 <= ranks[0]["step"] <= 5, ranks
    assert ranks[1]["signal"] == "SIGTERM"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step_{ranks[0]['step']:07d}"]


def test_gan_with_adaptive_weight_stays_finite(tmp_path):
    out = tmp_path / "gan"
    train(tiny_config(out, "train.max_steps=4", "loss.gan.enabled=true", "loss.gan.disc_start=1",
                      "loss.gan.disc_channels=8", "loss.gan.disc_layers=2", "loss.perceptual_weight=0.5",
                      "loss.perceptual_net=alex", "loss.learned_logvar=true", "train.ema.enabled=true"))
    logged = metrics(out)
    assert "g_loss" not in logged[0]  # step 1 is before disc_start (0-based step index 0 < 1)
    for m in logged[1:]:
        for key in ("loss", "g_loss", "d_weight", "d_loss", "logits_real", "logits_fake", "perceptual", "logvar"):
            assert np.isfinite(m[key]), (key, m)
        assert m["d_weight"] > 0
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert (ckpt / "discriminator.safetensors").is_file()  # the discriminator is checkpointed


def test_decoder_finetuning_keeps_encoder_bit_identical(trained, tmp_path):
    out = tmp_path / "ft"
    export = train(tiny_config(out, f"model.pretrained={trained}", "model.freeze_encoder=true", "train.max_steps=3",
                               "loss.pixel=l2"))
    before, after = load_file(trained / WEIGHTS), load_file(export / WEIGHTS)
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, nan_at_steps):
    out = tmp_path / "nan"
    nan_at_steps({2})
    train(tiny_config(out, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1
    assert [m["nonfinite_steps"] for m in metrics(out)] == [0, 1, 1]
    w1 = load_file(out / "checkpoints" / "step_0000001" / "model.safetensors")
    w2 = load_file(out / "checkpoints" / "step_0000002" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the NaN step left the weights alone
    assert all(torch.isfinite(v).all() for v in load_file(out / "vae" / WEIGHTS).values())

    nan_at_steps({2, 3, 4})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive.*step 4.*loss"):
        train(tiny_config(tmp_path / "nan2", "train.max_steps=8", "train.max_nonfinite_steps=3"))


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), *TINY, "train.max_steps=100000",
           f"train.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # poll for the first logged step: the loop (and its signal handler) is running
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]  # 128 + SIGTERM: `train && evaluate` must not carry on
    assert "train.resume=latest" in stdout
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and (out / "checkpoints" / "latest").read_text().strip() == ckpts[-1].name
    step = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 100000


def test_bad_images_are_skipped_and_reported(tmp_path):
    from skimage import data as skdata

    folder = tmp_path / "images"
    folder.mkdir()
    photo = Image.fromarray(skdata.astronaut())
    for i in range(4):
        photo.rotate(90 * i).resize((64, 64)).save(folder / f"good_{i}.png")
    photo.convert("L").resize((48, 40)).save(folder / "gray.png")
    photo.convert("RGBA").resize((40, 48)).save(folder / "rgba.png")
    photo.resize((6, 5)).save(folder / "tiny.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "bad"
    train(tiny_config(out, f"data.source={folder}", "train.max_steps=3"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 2
    assert sorted(Path(f).name for f in summary["skipped_files"]) == ["corrupt.jpg", "empty.png"]
    assert metrics(out)[-1]["skipped_images"] == 2


def test_incomplete_checkpoints_are_ignored(tmp_path):
    out = tmp_path / "inc"
    train(tiny_config(out, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1"))
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_0000002"]  # keep_checkpoints=1 pruned step 1
    (root / "step_0000009").mkdir()  # a crash mid-write leaves no trainer_state.json
    (root / "latest").write_text("step_0000009\n")
    with pytest.warns(UserWarning, match="incomplete"):
        train(tiny_config(out, "train.max_steps=3", "train.resume=latest"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_bf16_run_keeps_fp32_weights_and_finite_losses(tmp_path):
    out = tmp_path / "bf16"
    export = train(tiny_config(out, "train.max_steps=2", "train.mixed_precision=bf16"))
    assert all(np.isfinite(m["loss"]) for m in metrics(out))
    weights = load_file(list_checkpoints(out / "checkpoints")[-1] / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}  # autocast only; master weights stay fp32
    assert KLAutoencoder.from_pretrained(export) is not None


def test_checkpoint_without_disk_space_fails_clearly(tmp_path, monkeypatch):
    import shutil

    from kl_autoencoder import run_folder

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(OSError, match="not enough disk space.*MiB free"):
        train(tiny_config(tmp_path / "full", "train.max_steps=1"))


def test_training_step_matches_closed_form():
    """L1 + w * KL from hand-written formulas (reparameterized sample with the same noise)."""
    from kl_autoencoder.losses import LossWeights, autoencoder_loss

    torch.manual_seed(0)
    model = KLAutoencoder(block_out_channels=(8, 16), norm_num_groups=4, mid_block_add_attention=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    weights = LossWeights(pixel="l1", perceptual_weight=0.0, kl_weight=0.5)
    loss, logs, _ = autoencoder_loss(model, x, weights, generator=torch.Generator().manual_seed(7))
    moments = model.quant_conv(model.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    reconstruction = model.decode(mean + torch.exp(0.5 * logvar) * eps)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    expected = (reconstruction - x).abs().sum() / x.shape[0] + 0.5 * kl  # LDM: sum over C, H, W, mean over batch
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["kl"], kl.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_ema_keeps_its_decay_warm_up_across_a_state_dict_load():
    """The EMA's host-side update count (no .item() per step) follows a loaded num_updates."""
    from kl_autoencoder.trainer import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    straight, resumed = EMA(model, 0.999), EMA(model, 0.999)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        straight.update(model)
    resumed.load_state_dict(straight.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    straight.update(model)
    resumed.update(model)  # decay of update 5, (1 + 5) / (10 + 5), not of update 0
    for a, b in zip(straight.shadows(), resumed.shadows()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(resumed.num_updates) == 6
    weight = model.weight.detach() - 6.0  # the initial weight; update n saw it + n + 1
    shadow = weight.clone()
    for n in range(6):
        decay = min(0.999, (1 + n) / (10 + n))
        shadow = decay * shadow + (1 - decay) * (weight + n + 1)
    torch.testing.assert_close(straight.shadows()[0], shadow)
