"""The GAN at full strength and scale: the discriminator's learning rate scaled and scheduled as the
autoencoder's, and two processes (DDP over gloo on the CPU) training with the GAN past disc_start, and EQ-VAE's
transformed pairs, in lockstep."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kl_autoencoder.config import load_config
from kl_autoencoder.trainer import learning_rates, train
from tests.conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parent.parent
GAN = ["loss.gan.enabled=true", "loss.gan.disc_start=1", "loss.gan.disc_channels=8", "loss.gan.disc_layers=2",
       "train.log_every=1", "train.checkpoint_every=0", "train.scaling_images=8", "optim.betas=[0.9, 0.99]"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_discriminator_lr_is_scaled_like_ldms_at_batch_4():
    """configs/kl-f8.yaml at batch 4: LDM scales both optimizers, 4.5e-6 x 4 = 1.8e-5 (before: 4.5e-6 for D)."""
    cfg = load_config(ROOT / "configs" / "kl-f8.yaml", ["train.batch_size=4", "loss.perceptual_pretrained=false"])
    assert learning_rates(cfg, 1, 0) == pytest.approx((1.8e-5, 1.8e-5))
    assert learning_rates(cfg, 2, 100) == pytest.approx((3.6e-5, 3.6e-5))  # x processes


def test_discriminator_lr_follows_the_scaling_and_schedule_in_training(tmp_path):
    """The rates the loop sets: disc_lr / lr in every step, both scaled by the batch and warmed up alike."""
    out = tmp_path / "run"
    train(load_config(None, TINY_TRAINING + GAN + [
        f"train.output_dir={out}", "train.max_steps=3", "optim.lr=1e-4", "loss.gan.disc_lr=3e-4",
        "optim.scale_lr=true", "optim.warmup_steps=2", "optim.schedule=linear"]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    factors = [0.5, 1.0, 1.0]  # warm-up (step + 1) / 2, then linear decay from step 2 of 3
    for m, factor in zip(logged, factors):
        assert m["lr"] == pytest.approx(1e-4 * 4 * factor)
        assert m["d_lr"] == pytest.approx(3e-4 * 4 * factor)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_gan_in_lockstep(tmp_path):
    """2 ranks, GAN from step 1 of 4 (and EQ-VAE's pairs on half the steps, drawn per rank): both ranks end with the
    same autoencoder and discriminator weights, and every loss on both is finite."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "gan_ddp_train.py"),
           *TINY_TRAINING, *GAN, "train.max_steps=4", "optim.lr=2e-3", "loss.equivariance.probability=0.5",
           f"train.output_dir={out}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert [s["step"] for s in r["steps"]] == [0, 1, 2, 3]
        assert "g_loss" not in r["steps"][0] and all("g_loss" in s and "d_loss" in s for s in r["steps"][1:])
        assert all(math.isfinite(v) for s in r["steps"] for v in s.values())
    # EQ-VAE's draw is per rank: the ranks trained on different pairs at least once, and still agree below
    assert any(a["eq_pair"] != b["eq_pair"] or a["pixel"] != b["pixel"]
               for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]))
    a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("disc.") for k in a)
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    disc = [k for k in a if k.startswith("disc.")]
    assert disc and all((a[k] - a[f"initial_{k}"]).abs().max() > 0 for k in disc)  # the discriminator trained
