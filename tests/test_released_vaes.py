"""The VAEs people fine-tune, at full size: SD 1.x/2.x and SDXL (kl-f8, 4 channels, 83.65M parameters), SD3 and
FLUX.1 (16 channels, no quant convs), with random weights (no released weights exist offline) in each release's
naming: a diffusers folder (its config.json as diffusers ships it) and an original single file (LDM keys, no config).

For each release x form, a decoder-only fine-tune and a full fine-tune of one step at 32 px (batch 1, LPIPS off),
then: diffusers loads the export without a warning, every latent field is what the export promises (kept for a
frozen encoder; factors re-measured, sample_size / force_upcast kept, per-channel stats dropped otherwise),
`to_diffusion_latents` is (z - shift) * scale with the exported factors, and one photo encodes and decodes to finite
values, the same through diffusers and through us.

Sharing keeps the matrix inside its time budget: each architecture is built once per module; SD and SDXL (SD3 and
FLUX) share one weights file (hard-linked into each release's folder) and one single file, which is exactly how the
releases differ (same shapes, different config); the final training checkpoint (1 GB of weights and AdamW moments) is
skipped, since checkpoints are tested elsewhere and these runs test the export.
"""

from __future__ import annotations

import json
import os
import sys
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from kl_autoencoder import trainer
from kl_autoencoder.config import load_config
from kl_autoencoder.data import build_transform, sample_images
from kl_autoencoder.formats import WEIGHTS_NAME, diffusers_config, diffusers_to_ldm
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.presets import LATENT_FIELDS, LATENT_SCALE_KEY, PRESETS, PresetError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from rehearse import load_quietly  # noqa: E402  (benchmarks/rehearse.py: the rehearsal loads each export alike)

pytestmark = pytest.mark.full_size

ARCHITECTURES = {"kl-f8": ("sd", "sdxl"), "f8-c16": ("sd3", "flux")}
RELEASES = [r for releases in ARCHITECTURES.values() for r in releases]
FORMS = ("folder", "single_file")
MODES = ("decoder_only", "full")


@pytest.fixture(scope="module")
def released(tmp_path_factory, one_thread):
    """release -> {"folder": diffusers folder, "single_file": config-less LDM file}, each architecture built once."""
    root = tmp_path_factory.mktemp("released")
    paths = {}
    for arch, releases in ARCHITECTURES.items():
        torch.manual_seed(0)
        state = KLAutoencoder(AutoencoderConfig.from_dict(PRESETS[releases[0]].architecture())).state_dict()
        weights = root / f"{arch}.{WEIGHTS_NAME}"
        save_file(state, weights)
        single = root / f"{arch}.safetensors"  # as sdxl_vae.safetensors / FLUX's ae.safetensors: LDM keys, no config
        save_file(diffusers_to_ldm(state), single, metadata={"format": "pt"})
        for release in releases:
            folder = root / release
            folder.mkdir()
            os.link(weights, folder / WEIGHTS_NAME)
            (folder / "config.json").write_text(json.dumps(diffusers_config(PRESETS[release].architecture())))
            paths[release] = {"folder": folder, "single_file": single}
    return paths


@pytest.fixture(scope="module")
def photo():
    """One real photo, centre-cropped to 32 px, [1, 3, 32, 32] in [-1, 1]."""
    _, image = sample_images("heldout")[0]
    return build_transform(32, random_crop=False, random_flip=False)(image)[None]


def fine_tune(pretrained, out, release: str | None, decoder_only: bool):
    overrides = [f"model.pretrained={pretrained}", f"model.freeze_encoder={str(decoder_only).lower()}",
                 "data.resolution=32", "data.num_workers=0", "loss.perceptual_weight=0", "loss.kl_weight=1e-6",
                 "train.batch_size=1", "train.max_steps=1", "train.image_every=0", "train.log_every=1",
                 "train.scaling_images=2", f"train.output_dir={out}"]
    if release is not None:
        overrides.append(f"model.preset={release}")
    return trainer.train(load_config(None, overrides))


@pytest.fixture
def no_final_checkpoint(monkeypatch):
    monkeypatch.setattr(trainer, "save_checkpoint", lambda t, run, state: run.checkpoints / "not-written")


def load_with_diffusers(path):
    """diffusers' AutoencoderKL of `path`, and every warning diffusers logged while loading it."""
    from diffusers import AutoencoderKL

    return load_quietly(AutoencoderKL, path)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("release", RELEASES)
def test_fine_tune_of_a_released_vae_exports_what_its_pipeline_needs(release, form, mode, released, photo, tmp_path,
                                                                    no_final_checkpoint, one_thread):
    preset, source = PRESETS[release], released[release][form]
    decoder_only = mode == "decoder_only"
    # a single file cannot say which release it is: the preset does; a folder's config.json says it itself
    export = fine_tune(source, tmp_path / "run", release if form == "single_file" else None, decoder_only)
    config = json.loads((export / "config.json").read_text())
    promised = preset.latent_fields()
    if decoder_only:  # the latent space is the source's: every latent field kept
        assert {k: config[k] for k in LATENT_FIELDS} == promised
        assert config[LATENT_SCALE_KEY]["latent_scale"] == "kept"
        exported, original = load_file(export / WEIGHTS_NAME), load_file(released[release]["folder"] / WEIGHTS_NAME)
        assert torch.equal(exported["encoder.conv_in.weight"], original["encoder.conv_in.weight"])
    else:  # the encoder trained: factors re-measured; tile size and upcast kept; old per-channel stats not carried
        assert config[LATENT_SCALE_KEY]["latent_scale"] == "measured"
        assert config["scaling_factor"] > 0 and config["scaling_factor"] != promised["scaling_factor"]
        assert (config["shift_factor"] is None) == (preset.shift_factor is None)
        assert config["sample_size"] == preset.sample_size and config["force_upcast"] == preset.force_upcast
        assert config["latents_mean"] is None and config["latents_std"] is None

    vae, logged = load_with_diffusers(export)
    assert not logged, logged
    for key in LATENT_FIELDS:
        assert vae.config[key] == config[key], key
    ours = KLAutoencoder.from_pretrained(export)
    assert ours.num_parameters() == sum(p.numel() for p in vae.parameters())
    assert ours.config.latent_channels == preset.latent_channels

    z = torch.randn(1, preset.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    shift, scale = config["shift_factor"] or 0.0, config["scaling_factor"]
    latents = ours.to_diffusion_latents(z)
    torch.testing.assert_close(latents, (z - shift) * scale)
    torch.testing.assert_close(ours.from_diffusion_latents(latents), z)

    with torch.no_grad():
        mean = vae.encode(photo).latent_dist.mean
        decoded = vae.decode(mean).sample
        our_mean = ours.encode(photo).mean
        our_decoded = ours.decode(our_mean)
    assert torch.isfinite(mean).all() and torch.isfinite(decoded).all() and decoded.shape == photo.shape
    torch.testing.assert_close(our_mean, mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_decoded, decoded, rtol=1e-4, atol=1e-4)
    shutil.rmtree(tmp_path / "run")  # 335 MB per export: free it before the next case


def test_config_less_file_without_a_preset_warns_once_naming_the_assumed_factor(released):
    single = released["sdxl"]["single_file"]
    with pytest.warns(UserWarning) as caught:
        model = KLAutoencoder.from_pretrained(single)
    assumed = [str(w.message) for w in caught if "carries no config" in str(w.message)]
    assert len(assumed) == 1 and "\n" not in assumed[0]
    assert "scaling_factor 0.18215" in assumed[0] and "--preset" in assumed[0] and "model.preset" in assumed[0]
    assert model.config.scaling_factor == 0.18215
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a preset: nothing assumed, nothing said
        sdxl = KLAutoencoder.from_pretrained(single, preset="sdxl")
    assert {k: getattr(sdxl.config, k) for k in LATENT_FIELDS} == {**PRESETS["sdxl"].latent_fields()}


def test_a_stored_config_keeps_its_values_and_says_where_the_preset_differs(released):
    with pytest.warns(UserWarning, match=r"stored config is used, which differs from preset 'sd': scaling_factor "
                                         r"0.13025 \(preset: 0.18215\), sample_size 1024 \(preset: 512\)"):
        model = KLAutoencoder.from_pretrained(released["sdxl"]["folder"], preset="sd")
    assert (model.config.scaling_factor, model.config.sample_size) == (0.13025, 1024)


def test_a_preset_for_another_architecture_is_refused_before_the_weights_are_read(released):
    with pytest.raises(PresetError, match=r"preset 'sdxl'.*latent_channels 16.*presets for 16-channel VAEs: sd3, "
                                          r"flux"):
        KLAutoencoder.from_pretrained(released["flux"]["single_file"], preset="sdxl")
    with pytest.raises(PresetError, match="unknown preset 'sdxl2'.*sdxl"):
        KLAutoencoder.from_pretrained(released["flux"]["single_file"], preset="sdxl2")


def test_cli_info_and_convert_take_a_preset(released, tmp_path, capsys):
    from kl_autoencoder.cli import main

    single = str(released["flux"]["single_file"])
    assert main(["info", single, "--preset", "flux", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["scaling_factor"] == 0.3611 and info["config"]["shift_factor"] == 0.1159
    assert info["parameters"]["total"] == sum(t.numel() for t in load_file(single).values())
    assert main(["convert", single, str(tmp_path / "flux"), "--preset", "flux"]) == 0
    vae, logged = load_with_diffusers(tmp_path / "flux")
    assert not logged and (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert vae.config.sample_size == 1024 and not vae.config.use_quant_conv
