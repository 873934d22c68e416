"""The fair race of benchmarks/quality.py: validation and held-out sets each reported, every cell on every seed,
the peer tuned on the validation sets only, its schedules as diffusers' get_scheduler gives them, our init handed
to the diffusers model, and the summaries recomputed from the per-seed records."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402  (benchmarks/quality.py)

pytestmark = pytest.mark.usefixtures("one_thread")

CELLS = ["ours", "peer", "peer+init", "ours-ema"]


def write_val_folder(folder: Path) -> None:
    """Three small smooth colour pictures (gradients with a hue each), so PSNR differs between models."""
    folder.mkdir()
    ramp = np.linspace(0, 1, 40)
    for k, colour in enumerate([(1.0, 0.3, 0.1), (0.1, 0.8, 0.3), (0.2, 0.3, 1.0)]):
        picture = np.outer(ramp, ramp[::-1])[..., None] * np.array(colour) + 0.1 * k
        Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8)).save(folder / f"v{k}.png")


def test_tiny_race_reports_every_cell_seed_and_set_and_tunes_on_validation_only(tmp_path):
    val = tmp_path / "myval"
    write_val_folder(val)
    out = tmp_path / "out"
    result = quality.main(["--tiny", "--budget", "0.3", "--seeds", "0,1", "--peer-trials", "2", "--cells",
                           ",".join(CELLS), "--val", str(val), "--heldout", "sample", "--out", str(out)])
    saved = json.loads((out / "quality.json").read_text())
    sets = ["val/myval", "heldout/sample"]
    assert saved["sets"] == {"val": ["val/myval"], "heldout": ["heldout/sample"]}
    for cell in CELLS:
        assert set(saved["runs"][cell]) == {"0", "1"}
        for record in saved["runs"][cell].values():
            assert record["steps"] > 0 and record["seconds"] >= 0.3  # tiny: the budget is seconds
            assert set(record["sets"]) == set(sets)
            assert all(math.isfinite(record["sets"][s][m]) for s in sets for m in ("psnr", "ssim", "latent_std"))

    # tuning: two trials on seed 0, scored on the validation set alone; the best one is the "peer" cell
    tuning = saved["tuning"]
    assert len(tuning["trials"]) == 2 and all(set(t["sets"]) == {"val/myval"} for t in tuning["trials"])
    scores = [t["sets"]["val/myval"]["psnr"] for t in tuning["trials"]]
    assert tuning["chosen"] == int(np.argmax(scores)) and tuning["options"] == tuning["trials"][tuning["chosen"]][
        "options"]
    assert all(r["options"] == tuning["options"] for r in saved["runs"]["peer"].values())
    assert all(r["options"] == {**tuning["options"], "init": "ours"} for r in saved["runs"]["peer+init"].values())

    # the summaries, recomputed from the per-seed records
    psnr = [saved["runs"]["ours"][seed]["sets"]["heldout/sample"]["psnr"] for seed in ("0", "1")]
    stat = saved["summary"]["ours"]["sets"]["heldout/sample"]["psnr"]
    assert stat["mean"] == pytest.approx(statistics.fmean(psnr)) and stat["std"] == pytest.approx(
        statistics.stdev(psnr))
    row = next(r for r in saved["ablation"] if (r["cell"], r["base"]) == ("ours-ema", "ours"))
    deltas = [saved["runs"]["ours-ema"][seed]["sets"]["val/myval"]["psnr"]
              - saved["runs"]["ours"][seed]["sets"]["val/myval"]["psnr"] for seed in ("0", "1")]
    assert row["psnr_delta"]["val/myval"]["mean"] == pytest.approx(statistics.fmean(deltas))
    assert result["runs"] == saved["runs"]

    # the markdown: one race row per cell with mean ± std (min–max) for both sets, the tuning table
    text = (out / "quality.md").read_text()
    for cell in CELLS:
        line = next(line for line in text.splitlines() if line.startswith(f"| {cell} | "))
        assert len(re.findall(r"-?\d+\.\d\d ± \d+\.\d\d \(-?\d+\.\d\d–-?\d+\.\d\d\)", line)) == 2, line
    assert "### (c) The peer's tuning" in text and "**chosen**" in text
    with Image.open(out / "quality.png") as picture:
        assert picture.size[0] > 300


def test_peer_trials_walk_the_whole_grid_without_repeats_rates_first():
    lrs, schedulers, emas = [1e-3, 4e-3, 2.5e-4], ["constant", "cosine"], ["none", "peer"]
    trials = quality.peer_trials(lrs, schedulers, emas, 100)
    assert len(trials) == 12 and len(set(trials)) == 12  # capped at the grid, a bijection onto it
    assert [t.lr for t in trials[:3]] == lrs  # the first L trials cover every rate
    assert (trials[0].scheduler, trials[0].ema) == ("constant", "none")  # the script's defaults first
    assert len({(t.scheduler, t.ema) for t in trials[:4]}) == 4  # and the first S trials every pair
    assert quality.peer_trials(lrs, schedulers, emas, 2) == trials[:2]


def test_peer_schedules_are_diffusers_lambdas_laid_over_the_budget():
    warm = quality.peer_lr_factor("constant_with_warmup", 500)
    assert warm(0, 0.0) == 0.0 and warm(250, 0.9) == pytest.approx(0.5) and warm(600, 0.1) == 1.0
    assert quality.peer_lr_factor("constant", 500)(0, 0.0) == 1.0  # no warm-up in the constant scheduler
    cosine, linear = quality.peer_lr_factor("cosine", 0), quality.peer_lr_factor("linear", 0)
    for progress in (0.0, 0.25, 0.5, 1.0):  # the formulas, written out
        assert cosine(10, progress) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-3)
        assert linear(10, progress) == pytest.approx(1 - progress, abs=1e-3)


def test_peer_with_our_init_starts_from_the_weights_our_trainer_starts_from():
    from kl_autoencoder.config import load_config
    from kl_autoencoder.trainer import build_training

    args = quality.parse_args(["--tiny"])
    setup = quality.load_setup(args)
    extra = ["train.seed=3", "train.ema.enabled=false", "model.init=zero_residual"]
    cfg = load_config(args.config, setup.overrides + extra)
    torch.manual_seed(3)  # as make_ours seeds it
    ours = build_training(cfg).raw_model.state_dict()
    vae = quality.ref.build_reference_vae(setup.architecture)
    default = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.load_state_dict(quality.our_initial_weights(cfg))  # strict: the keys are shared
    assert all(torch.equal(vae.state_dict()[k], ours[k]) for k in ours)
    assert not all(torch.equal(default[k], ours[k]) for k in ours)
