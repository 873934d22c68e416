"""Shared fixtures: tiny model configs (CPU-sized) and an offline environment for every test."""

import os

import pytest
import torch

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
