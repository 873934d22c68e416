"""The low-resolution colour term (`losses.chroma_error_sum`, `loss.chroma_weight`) against scikit-image's YCbCr and
block means written out with numpy."""

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr

from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.losses import LossWeights, autoencoder_loss, chroma_error_sum, loss_weights_at
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder


def _images(seed: int, shape=(2, 3, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def _skimage_chroma_error_sum(reconstruction: torch.Tensor, target: torch.Tensor, scale: int) -> float:
    """Cb and Cr from scikit-image (BT.601, 8-bit studio range: 224 steps per unit of [0, 1] RGB), each image's
    scale x scale block means by reshaping, squared differences summed, each block counted scale^2 times."""
    total = 0.0
    for rec, tgt in zip(reconstruction, target):
        chroma = [rgb2ycbcr(((img.numpy().transpose(1, 2, 0) + 1) / 2))[..., 1:] / 224 * 2 for img in (rec, tgt)]
        diff = chroma[0] - chroma[1]  # the offsets cancel; x2: our images span [-1, 1]
        h, w, _ = diff.shape
        blocks = diff.reshape(h // scale, scale, w // scale, scale, 2).mean(axis=(1, 3))
        total += float((blocks ** 2).sum()) * scale * scale
    return total


@pytest.mark.parametrize("scale", [1, 4, 8])
def test_chroma_error_sum_equals_scikit_image_ycbcr_block_means(scale):
    reconstruction, target = _images(0), _images(1)
    ours = chroma_error_sum(reconstruction, target, scale)
    assert ours.item() == pytest.approx(_skimage_chroma_error_sum(reconstruction, target, scale), rel=1e-4)


def test_brightness_alone_costs_nothing_and_a_green_shift_does():
    target = _images(2)
    assert chroma_error_sum(target + 0.2, target, 8).item() == pytest.approx(0.0, abs=1e-10)
    greener = target.clone()
    greener[:, 1] += 0.1
    # Cb and Cr rows' green weights: (0.331264^2 + 0.418688^2) * 0.1^2 at every pixel
    expected = (0.331264 ** 2 + 0.418688 ** 2) * 0.01 * target[:, 0].numel()
    assert chroma_error_sum(greener, target, 8).item() == pytest.approx(expected, rel=1e-5)  # fp32 sums


def test_the_term_joins_the_objective_only_when_weighted():
    torch.manual_seed(0)
    model = KLAutoencoder(AutoencoderConfig(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                                            latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2))
    x = _images(3, (2, 3, 32, 32)).float()

    def loss_with(chroma_weight: float):
        weights = LossWeights(pixel="l2", perceptual_weight=0.0, kl_weight=1e-6, chroma_weight=chroma_weight,
                              chroma_scale=8)
        return autoencoder_loss(model, x, weights, generator=torch.Generator().manual_seed(1))

    plain, plain_logs, reconstruction = loss_with(0.0)
    weighted, logs, _ = loss_with(5.0)
    assert "chroma" not in plain_logs
    chroma_sum = chroma_error_sum(reconstruction.detach(), x, 8)
    # LDM's convention: a sum over the image, divided by the batch size
    torch.testing.assert_close(weighted - plain, 5.0 * chroma_sum / x.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["chroma"], 5.0 * chroma_sum / reconstruction.numel(), rtol=1e-4, atol=1e-8)


def test_config_fields_reach_the_loss_weights_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  chroma_weight: 4.0\n  chroma_scale: 4\n")
    weights = loss_weights_at(load_config(path).loss, 0)
    assert (weights.chroma_weight, weights.chroma_scale) == (4.0, 4)
    for bad in ("loss.chroma_weight=-1", "loss.chroma_scale=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(path, [bad])
