"""Shared fixtures: tiny model configs (CPU-sized) and an offline environment for every test."""

import os
from pathlib import Path

# One thread per process: on a 2-core machine two OpenMP threads spin against each other (and against the
# subprocesses some tests start) and make small tensor work many times slower. Set before torch is imported so
# subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Nothing may reach the network during tests; libraries that would try fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process training runs (restored after), whatever OMP_NUM_THREADS says:
    on a small shared CPU two OpenMP threads spinning against other processes made tiny steps ~15x slower, and one
    thread keeps a short run's floating-point order, hence its outcome, the same from machine to machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Overrides that make a training run CPU-sized: a 2-level model on 32 px crops, no LPIPS, small batches.
TINY_TRAINING = [
    "model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
    "model.architecture.layers_per_block=1", "model.architecture.mid_block_add_attention=false",
    "data.resolution=32", "data.num_workers=0", "loss.perceptual_weight=0", "loss.perceptual_pretrained=false",
    "train.batch_size=4", "train.image_every=0",
]


def tiny_config(**overrides):
    from kl_autoencoder import AutoencoderConfig

    values = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4)
    values.update(overrides)
    return AutoencoderConfig(**values)


@pytest.fixture
def tiny_model():
    from kl_autoencoder import KLAutoencoder

    torch.manual_seed(0)
    return KLAutoencoder(tiny_config()).eval()


@pytest.fixture
def nan_at_steps(monkeypatch):
    """`nan_at_steps({3, 5})` makes the autoencoder loss NaN at those optimizer steps (1-based) of in-process runs."""
    from kl_autoencoder import losses, trainer

    def install(steps: set[int]) -> None:
        current = {"step": None}
        real_step, real_loss = trainer.train_step, losses.autoencoder_loss

        def train_step(t, x, step, micro=0):
            current["step"] = step
            return real_step(t, x, step, micro)

        def autoencoder_loss(*args, **kwargs):
            loss, logs, reconstruction = real_loss(*args, **kwargs)
            if current["step"] is not None and current["step"] + 1 in steps:
                loss = loss * float("nan")
                logs["loss"] = loss.detach()
            return loss, logs, reconstruction

        monkeypatch.setattr(trainer, "train_step", train_step)
        monkeypatch.setattr(losses, "autoencoder_loss", autoencoder_loss)

    return install


# The slowest test files, slowest first (`python -m pytest -q --durations=60`, summed per file). Under `-n 2 --dist
# loadfile` (the README's test command) whole files go to whichever worker is free, in collection order: handing out
# the long ones first keeps both workers busy to the end instead of one finishing a long file alone.
SLOWEST_FIRST = ("test_colour", "test_released_vaes", "test_rehearsal", "test_reliability", "test_finetune_journey",
                 "test_quality", "test_benchmarks", "test_evaluate", "test_attacks_blocking", "test_examples",
                 "test_newcomer", "test_pipeline", "test_validation", "test_fp16", "test_gan_ddp", "test_shards")


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # only xdist's workers: a plain run keeps the files' order
        return
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.nodeid.split("::")[0]).stem, len(rank)))  # stable: files stay whole
