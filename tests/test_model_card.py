"""Every export carries a model card (README.md): what it is, its latent fields and how they were set, how it was
trained, its evaluation figures once an evaluation wrote them, how to load it. diffusers loads the folder without a
warning, `convert` carries the card along, a user's README.md is never taken for ours; and `convert` to a single file
says when front-ends cannot load the layout or will scale the latents by another family's factor."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.cli import main
from kl_autoencoder.config import load_config
from kl_autoencoder.durable import is_previous_export
from kl_autoencoder.presets import PRESETS, front_end_notes
from kl_autoencoder.trainer import train
from tests.conftest import TINY_TRAINING, tiny_config


@pytest.fixture(scope="module")
def export(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("card") / "run"
    cfg = load_config(None, TINY_TRAINING + [f"train.output_dir={out}", "train.max_steps=2", "train.scaling_images=8",
                                             "data.source=sample", "train.checkpoint_every=0"])
    return train(cfg)


def test_the_export_carries_a_card_saying_how_its_latent_fields_were_set(export):
    card = (export / "README.md").read_text()
    config = json.loads((export / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: diffusers\ntags: [kl-autoencoder,")
    assert f"| scaling_factor | {config['scaling_factor']} |" in card
    assert "measured on 8 un-augmented training crops at 32 px" in card
    assert "- data: sample" in card and "- steps: 2 x batch 4 per process x 1 process(es)" in card
    assert "AutoencoderKL.from_pretrained" in card and "kl-autoencoder convert" in card
    assert is_previous_export(export)  # a second run's export may replace the folder, card and all


def test_diffusers_loads_the_folder_without_a_warning(export, caplog):
    from diffusers import AutoencoderKL

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            AutoencoderKL.from_pretrained(export)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_convert_carries_the_card_and_evaluate_adds_its_figures(export, tmp_path):
    copy = tmp_path / "copy"
    assert main(["convert", str(export), str(copy)]) == 0
    assert (copy / "README.md").read_text() == (export / "README.md").read_text()
    assert main(["evaluate", "--model", str(copy), "--data", "sample", "--resolution", "32", "--num-images", "2",
                 "--out", str(tmp_path / "eval"), "--write-config", "--force", "--no-progress"]) == 0
    card = (copy / "README.md").read_text()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    psnr = next(iter(metrics["models"].values()))["splits"]["held-out"]["psnr"]["mean"]
    config = json.loads((copy / "config.json").read_text())
    assert "## Evaluation" in card and f"PSNR {psnr:.4g} dB" in card and "2 held-out images of `sample`" in card
    assert card.index("## Evaluation") < card.index("## Use") and card.count("## Latent space") == 1
    assert f"| scaling_factor | {config['scaling_factor']} |" in card and "measured by `evaluate --write-config`" in card


def test_a_users_readme_is_never_taken_for_a_card(tmp_path):
    model = KLAutoencoder(tiny_config())
    folder = model.save_pretrained(tmp_path / "vae")
    (folder / "README.md").write_text("# my notes on this VAE\n")
    assert not is_previous_export(folder)  # replacing the folder now needs --overwrite
    assert main(["convert", str(folder), str(tmp_path / "copy")]) == 0
    assert not (tmp_path / "copy" / "README.md").exists()


def test_single_files_say_what_front_ends_cannot_take(tmp_path, capsys):
    small = KLAutoencoder(tiny_config(scaling_factor=0.5))
    small.save_pretrained(tmp_path / "small")
    assert main(["convert", str(tmp_path / "small"), str(tmp_path / "small.safetensors")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and "will not load this one" in notes[0] and "match none" in notes[1]

    sdxl = PRESETS["sdxl"].architecture()
    assert front_end_notes(sdxl) == []  # SDXL's layout and factor: front-ends take it as it is
    assert front_end_notes({**sdxl, "scaling_factor": 0.2}) == [front_end_notes({**sdxl, "scaling_factor": 0.2})[0]]
    assert "match none" in front_end_notes({**sdxl, "scaling_factor": 0.2})[0]
    flux = PRESETS["flux"].architecture()
    assert front_end_notes(flux) == [] and len(front_end_notes({**flux, "shift_factor": None})) == 1
