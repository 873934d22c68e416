"""Shared fixtures: tiny model configs (CPU-sized) and an offline environment for every test."""

import os

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
