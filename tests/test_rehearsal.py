"""The shipped recipes rehearsed as the README runs them (benchmarks/rehearse.py, its fast part): each launched in its
own process(es) on the full architecture, then its export checked against what its config promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kl_autoencoder.config import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import rehearse  # noqa: E402  (benchmarks/rehearse.py)

pytestmark = pytest.mark.rehearsal


def test_promises_are_read_from_the_config():
    """From scratch the factors are measured (the shift at 16 channels) and sample_size is the training resolution,
    whatever a factor the config starts from; a frozen encoder keeps its source's fields."""
    c16 = load_config(ROOT / "configs" / "kl-f8-c16.yaml", ["model.architecture.scaling_factor=1.0"])
    assert rehearse.promises(c16, None) == {
        "latent_scale": "measured", "scaling_factor": "measured", "shift_factor": "measured", "sample_size": 256,
        "force_upcast": True, "latents_mean": None, "latents_std": None}
    kl_f8 = load_config(ROOT / "configs" / "kl-f8.yaml", ["data.resolution=64"])
    assert rehearse.promises(kl_f8, None)["shift_factor"] is None and rehearse.promises(kl_f8, None)["sample_size"] == 64
    source = {"scaling_factor": 0.13025, "shift_factor": None, "latents_mean": None, "latents_std": None,
              "sample_size": 1024, "force_upcast": True, "latent_channels": 4}
    finetune = load_config(None)
    finetune.model.pretrained, finetune.model.freeze_encoder = "released", True  # promises open no file
    kept = rehearse.promises(finetune, source)
    assert kept["latent_scale"] == "kept" and kept["sample_size"] == 1024 and kept["scaling_factor"] == 0.13025


# the fast part (about 2 minutes on 2 cores); `python benchmarks/rehearse.py --full` runs every recipe at full size
@pytest.mark.parametrize("recipe", rehearse.FAST_RECIPES)
def test_recipe_runs_as_the_readme_says_and_exports_what_it_promises(recipe, tmp_path):
    result = rehearse.main(["--recipes", recipe, "--out", str(tmp_path)])
    (row,) = result["rows"]
    failed = [c for c in row["checks"] if c["status"] == "FAIL"]
    assert not failed, json.dumps(failed, default=str) + "\n" + row.get("log_tail", "")
    checked = {c["check"] for c in row["checks"]}
    assert {"latent_scale", "sample_size", "force_upcast", "diffusers loads quietly", "pipeline decode",
            "logged values finite"} <= checked
    if recipe == "finetune-decoder":  # a frozen encoder: every latent field of the SD layout it started from
        assert row["export"]["_kl_autoencoder_latent_scale"]["latent_scale"] == "kept"
        assert (row["export"]["scaling_factor"], row["export"]["sample_size"]) == (0.18215, 512)
    else:  # trained from scratch: measured, and checked on held-out crops
        assert {"held-out scaled latent std", "scaling_factor"} <= checked
        assert row["export"]["sample_size"] == row["resolution"]
    if recipe in ("quickstart", "kl-f8-c16"):  # 16 channels: a measured shift
        assert "held-out scaled latent mean" in checked and row["export"]["shift_factor"] is not None
    if recipe == "quickstart":
        assert "loss falls" in checked
    assert (tmp_path / "rehearsal.json").is_file() and (tmp_path / "rehearsal.md").is_file()
