"""`model.init: zero_residual`: every residual branch starts at zero (each block is its shortcut) and convolutions keep
their input's variance; opt-in for models trained from scratch only."""

from __future__ import annotations

import pytest
import torch

from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.model import KLAutoencoder, ResnetBlock, zero_residual_init_
from kl_autoencoder.trainer import build_model
from tests.conftest import tiny_config


def test_every_residual_block_starts_as_its_shortcut():
    torch.manual_seed(0)
    model = zero_residual_init_(KLAutoencoder(tiny_config()))
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    assert blocks
    for block in blocks:
        channels = block.conv1.in_channels
        x = torch.randn(2, channels, 8, 8)
        shortcut = x if block.conv_shortcut is None else block.conv_shortcut(x)
        torch.testing.assert_close(block(x), shortcut)
    conv = model.encoder.conv_in
    assert conv.weight.std().item() == pytest.approx(conv.weight[0].numel() ** -0.5, rel=0.2)


def test_init_is_chosen_by_config_and_refused_for_pretrained_models(tmp_path):
    torch.manual_seed(0)
    arch = ["model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4"]
    plain = build_model(load_config(None, arch).model)
    zeroed = build_model(load_config(None, arch + ["model.init=zero_residual"]).model)
    assert plain.encoder.down_blocks[0].resnets[0].conv2.weight.abs().sum() > 0
    assert zeroed.encoder.down_blocks[0].resnets[0].conv2.weight.abs().sum() == 0
    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, ["model.init=zero_residual", "model.pretrained=tests/assets/trained-f8"])
