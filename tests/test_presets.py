"""Presets and what an export keeps, on CPU-sized models (the full-size releases: test_released_vaes.py).

The preset values are checked against diffusers' own: its single-file loader's default factor and sample sizes.
"""

from __future__ import annotations

import json

import pytest
import torch

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.config import ConfigError, ModelSection, load_config, resolved_architecture
from kl_autoencoder.evaluation import EvaluationError, check_request, write_latent_config
from kl_autoencoder.metrics import estimate_latent_scale
from kl_autoencoder.presets import ASSUMED_SCALING_FACTOR, LATENT_SCALE_KEY, PRESETS
from kl_autoencoder.trainer import build_model, remeasure_latent_scale, train
from tests.conftest import TINY_TRAINING, tiny_config

TINY = TINY_TRAINING[4:] + ["train.log_every=1", "train.checkpoint_every=0", "train.scaling_images=8",
                            "train.max_steps=1"]


def test_presets_agree_with_diffusers_single_file_loader():
    from diffusers.loaders import single_file_utils as sf

    assert ASSUMED_SCALING_FACTOR == sf.LDM_VAE_DEFAULT_SCALING_FACTOR == PRESETS["sd"].scaling_factor
    sizes = sf.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP
    assert (PRESETS["sd"].sample_size, PRESETS["sd2"].sample_size, PRESETS["sdxl"].sample_size) == (
        sizes["v1"], sizes["v2"], sizes["xl_base"])
    for preset in PRESETS.values():  # every release: the 4-level kl-f8 body, 2 blocks per level, 32 groups
        config = preset.architecture()
        assert config["block_out_channels"] == [128, 256, 512, 512] and config["norm_num_groups"] == 32
    assert (PRESETS["sdxl"].scaling_factor, PRESETS["sd3"].scaling_factor, PRESETS["flux"].scaling_factor) == (
        0.13025, 1.5305, 0.3611)
    assert (PRESETS["sd3"].shift_factor, PRESETS["flux"].shift_factor) == (0.0609, 0.1159)


@pytest.fixture
def pretrained(tmp_path):
    """A small trained-model stand-in with every latent field set to something distinctive."""
    torch.manual_seed(0)
    path = tmp_path / "pretrained"
    KLAutoencoder(tiny_config(mid_block_add_attention=False, scaling_factor=0.37, shift_factor=0.05, sample_size=96,
                              latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 1.1, 1.2, 1.3],
                              force_upcast=False)).save_pretrained(path)
    return path


def latent_fields(export) -> dict:
    config = json.loads((export / "config.json").read_text())
    return {k: config[k] for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "sample_size",
                                   "force_upcast")} | {"record": config.get(LATENT_SCALE_KEY)}


def test_decoder_only_keeps_every_latent_field_and_full_fine_tune_remeasures(pretrained, tmp_path, one_thread):
    source = latent_fields(pretrained) | {"record": None}
    kept = latent_fields(train(load_config(None, TINY + [f"model.pretrained={pretrained}", "model.freeze_encoder=true",
                                                         f"train.output_dir={tmp_path / 'dec'}"])))
    assert kept | {"record": None} == source and kept["record"]["latent_scale"] == "kept"
    full = latent_fields(train(load_config(None, TINY + [f"model.pretrained={pretrained}",
                                                         f"train.output_dir={tmp_path / 'full'}"])))
    assert full["record"]["latent_scale"] == "measured" and full["scaling_factor"] != 0.37
    assert full["shift_factor"] is None  # 4 channels: no shift by convention (train.export_shift_factor)
    assert full["sample_size"] == 96 and full["force_upcast"] is False  # the tile size is not data.resolution (32)
    assert full["latents_mean"] is None and full["latents_std"] is None  # the old latent space's statistics


def test_user_latent_fields_on_a_pretrained_model_are_applied_and_kept_when_asked(pretrained, tmp_path, one_thread):
    user = [f"model.pretrained={pretrained}", "model.architecture.scaling_factor=0.5",
            "model.architecture.shift_factor=0.1", "model.architecture.sample_size=512"]
    kept = latent_fields(train(load_config(None, TINY + user + [
        "train.remeasure_latent_scale=false", f"train.output_dir={tmp_path / 'kept'}"])))  # encoder trains
    assert (kept["scaling_factor"], kept["shift_factor"], kept["sample_size"]) == (0.5, 0.1, 512)
    assert kept["record"]["latent_scale"] == "kept"
    # by default a factor set for a trained encoder is a starting value: re-measured; the user's sample_size stays
    measured = latent_fields(train(load_config(None, TINY + user + [f"train.output_dir={tmp_path / 'measured'}"])))
    assert measured["record"]["latent_scale"] == "measured" and measured["scaling_factor"] != 0.5
    assert measured["sample_size"] == 512
    with pytest.raises(ConfigError, match="block_out_channels.*contradicts.*only scaling_factor"):
        build_model(load_config(None, [f"model.pretrained={pretrained}",
                                       "model.architecture.block_out_channels=[8, 32]"]).model)
    with pytest.raises(ConfigError, match="latents_mean has 2 entries but latent_channels is 4"):
        build_model(load_config(None, [f"model.pretrained={pretrained}",
                                       "model.architecture.latents_mean=[0.0, 1.0]"]).model)


def test_a_from_scratch_factor_in_the_config_is_a_starting_value(tmp_path, one_thread):
    """As configs/kl-f8(-c16).yaml: a scaling_factor in model.architecture does not stop the export measuring the
    factors (and, at 16 channels, the shift), nor keep diffusers' default tile size."""
    base = TINY_TRAINING + TINY[-4:]
    for channels, factor in ((4, 0.18215), (16, 1.0)):
        fields = latent_fields(train(load_config(None, base + [
            f"model.architecture.latent_channels={channels}", f"model.architecture.scaling_factor={factor}",
            f"train.output_dir={tmp_path / str(channels)}"])))
        assert fields["record"]["latent_scale"] == "measured" and fields["scaling_factor"] != factor, channels
        assert (fields["shift_factor"] is not None) == (channels == 16) and fields["sample_size"] == 32, channels
        assert fields["force_upcast"] is True  # the default: the config does not say otherwise
    kept = latent_fields(train(load_config(None, base + [
        "model.architecture.scaling_factor=0.18215", "train.remeasure_latent_scale=false",
        f"train.output_dir={tmp_path / 'kept'}"])))
    assert kept["record"]["latent_scale"] == "kept" and kept["scaling_factor"] == 0.18215
    assert kept["sample_size"] == 32  # a from-scratch export tiles at its training resolution either way


def test_from_scratch_export_takes_the_training_resolution_as_sample_size(tmp_path, one_thread):
    fields = latent_fields(train(load_config(None, TINY_TRAINING + TINY[-4:] + [f"train.output_dir={tmp_path}"])))
    assert fields["sample_size"] == 32 and fields["record"]["latent_scale"] == "measured"


def test_latent_scale_is_measured_on_unaugmented_crops(one_thread):
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(mid_block_add_attention=False)).eval()
    plain = load_config(None, TINY_TRAINING + ["train.scaling_images=8", "data.random_hue=0.0"])
    hued = load_config(None, TINY_TRAINING + ["train.scaling_images=8", "data.random_hue=1.0"])
    remeasure_latent_scale(model, hued, torch.device("cpu"))
    with_hue_config = model.config.scaling_factor
    remeasure_latent_scale(model, plain, torch.device("cpu"))
    assert with_hue_config == model.config.scaling_factor
    # and the hue turn would have changed it: the same crops, turned, give another estimate
    from kl_autoencoder.data import build_dataset, training_batches

    def scale_on(cfg):
        torch.manual_seed(0)
        crops = build_dataset(cfg.data, split="train", train=True)
        batches = training_batches(crops, 4, cfg.train.seed + 1, num_workers=0)
        return estimate_latent_scale(model, (b["pixel_values"] for b in batches), num_images=8,
                                     generator=torch.Generator().manual_seed(0)).scaling_factor
    assert scale_on(hued) != scale_on(plain)


def test_write_config_refuses_a_kept_scale_unless_forced(pretrained, tmp_path, one_thread):
    export = train(load_config(None, TINY + [f"model.pretrained={pretrained}", "model.freeze_encoder=true",
                                             f"train.output_dir={tmp_path / 'dec'}"]))
    with pytest.raises(EvaluationError, match=r"kept from .*pretrained.*--force"):
        check_request([str(export)], None, 1, None, write_config=True)
    assert check_request([str(export)], None, 1, None, write_config=True, force=True) == [str(export)]
    write_latent_config(str(export), {"scaling_factor": 0.9, "shift_factor": None})
    config = json.loads((export / "config.json").read_text())
    assert config["scaling_factor"] == 0.9 and config[LATENT_SCALE_KEY]["latent_scale"] == "measured"
    check_request([str(export)], None, 1, None, write_config=True)  # the record now says measured: no refusal


def test_preset_is_validated_with_the_config(pretrained):
    with pytest.raises(ConfigError, match="'model.preset' = 'sdx'.*unknown preset.*sdxl"):
        load_config(None, ["model.preset=sdx"])
    with pytest.raises(ConfigError, match="'model.preset' = 'flux'.*latent_channels 4.*sd, sd2, sdxl"):
        load_config(None, [f"model.pretrained={pretrained}", "model.preset=flux"])
    flux = resolved_architecture(ModelSection(preset="flux"))  # from scratch: the release's architecture
    assert flux["latent_channels"] == 16 and flux["use_quant_conv"] is False and flux["scaling_factor"] == 0.3611
