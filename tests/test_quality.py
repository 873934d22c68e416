"""Quality of what the main job trains: colour carried through the latent to a palette never trained on, and the
bookkeeping of the data-speed and held-out-stats benchmarks (quality.py: test_quality_race.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kl_autoencoder.config import load_config
from kl_autoencoder.data import sample_images
from kl_autoencoder.model import KLAutoencoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ colour through the latent

# The main job's recipe (configs/quickstart.yaml) on a tiny model, and the recipe before this fix (PyTorch's init, no
# hue turns, the old per-source crop scales): the same tiny model, data, steps and learning rate otherwise.
TINY_MODEL = ["model.architecture.block_out_channels=[16,16,32]", "data.resolution=32", "data.num_workers=0", "train.batch_size=8", "train.log_every=50",
              "train.image_every=0", "train.checkpoint_every=0", "train.scaling_images=16"]
STEPS = 300
# the quickstart before its colour fix (and before its 16 channels and chroma term)
OLD_RECIPE = ["model.init=default", "data.random_hue=0", "data.max_crop_scale=null", "loss.pixel=l1",
              "model.architecture.latent_channels=4", "loss.chroma_weight=0"]


def write_warm_photos(folder: Path) -> None:
    """Training photos with no green or blue in them: astronaut, retina and the motorcycle shop, each cropped to
    its warm part (the astronaut's suit, the retina, the red motorcycle)."""
    folder.mkdir(parents=True)
    photos = dict(sample_images("train"))
    crops = {"astronaut": (40, 230, 340, 512), "retina": (300, 300, 1100, 1100), "motorcycle": (150, 150, 550, 450)}
    for name, box in crops.items():
        photos[name].crop(box).save(folder / f"{name}.png")


def hue_family(image: np.ndarray) -> np.ndarray:
    """Per pixel of an [H, W, 3] array in [0, 1]: True where green or blue beats red by a clear margin."""
    return np.maximum(image[..., 1], image[..., 2]) > image[..., 0] + 0.05


def colour_on_unseen_palette(tmp_path: Path, recipe: list[str], steps: int) -> dict[str, float]:
    """Train the quickstart recipe (tiny model) on warm photos only; reconstruct the held-out flower (a peach
    dahlia on dark teal leaves) and measure how much of its teal survives."""
    from kl_autoencoder.data import build_transform
    from kl_autoencoder.trainer import train

    folder = tmp_path / "warm"
    write_warm_photos(folder)
    train_pixels = np.concatenate([np.asarray(Image.open(p)).reshape(-1, 3) / 255 for p in sorted(folder.iterdir())])
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      TINY_MODEL + recipe + [f"data.source={folder}", f"train.max_steps={steps}",
                                             f"train.output_dir={tmp_path / 'run'}"])
    model = KLAutoencoder.from_pretrained(train(cfg)).eval()
    flower = dict(sample_images("heldout"))["flower"]
    x = build_transform(64, random_crop=False, random_flip=False)(flower)[None]
    with torch.no_grad():
        y = model.decode(model.encode(x).mode()).clamp(-1, 1)
    original = ((x[0] + 1) / 2).permute(1, 2, 0).numpy()
    recon = ((y[0] + 1) / 2).permute(1, 2, 0).numpy()
    teal = hue_family(original)
    assert teal.mean() > 0.5 and hue_family(train_pixels[None]).mean() < 0.05  # a palette the model never saw
    return {"teal_kept": float(hue_family(recon)[teal].mean()),
            "chroma_error": float(np.abs(mean_chroma(original) - mean_chroma(recon)).mean())}


def mean_chroma(image: np.ndarray) -> np.ndarray:
    """The mean colour of an [H, W, 3] image with its brightness taken out: mean RGB minus its grey level."""
    rgb = image.reshape(-1, 3).mean(0)
    return rgb - rgb.mean()


def test_short_run_carries_colour_it_never_saw_and_the_old_recipe_does_not(tmp_path):
    """The flower's teal is in none of the training photos; the main job's recipe still brings it back, the recipe
    before the colour fix (PyTorch's init, no hue turns) returns it grey-brown."""
    # the warm folder stands in for the sample photos: the quickstart turns hues of those only (`random_hue: null`)
    new = colour_on_unseen_palette(tmp_path / "new", ["data.random_hue=0.5"], steps=STEPS)
    old = colour_on_unseen_palette(tmp_path / "old", OLD_RECIPE, steps=STEPS)
    assert new["teal_kept"] > 0.6 and new["chroma_error"] < 0.02, new
    assert old["teal_kept"] < 0.4, old  # the test can fail: this is what the quickstart did before


# ------------------------------------------------------------------ the benchmarks' bookkeeping


def test_data_speed_benchmark_tiny_reports_every_row(tmp_path):
    import data_speed

    result = data_speed.main(["--tiny", "--json", str(tmp_path / "speed.json")])
    names = [row["name"] for row in result["rows"]]
    assert len(names) == 5 and sum("4K" in n for n in names) == 2 and sum("small" in n for n in names) == 2
    assert all(row["images_per_second"] > 0 for row in result["rows"])
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == result["rows"]


def test_heldout_stats_measures_only_the_named_held_out_photos(tmp_path):
    import heldout_stats

    from tests.conftest import tiny_config

    KLAutoencoder(tiny_config()).save_pretrained(tmp_path / "vae")
    both = heldout_stats.main([str(tmp_path / "vae"), "--resolution", "32"])
    one = heldout_stats.main([str(tmp_path / "vae"), "--resolution", "32", "--only", "coffee"])
    assert both["names"] == ["chelsea", "coffee", "flower"] and one["names"] == ["coffee"]
    assert one["psnr"] != both["psnr"] and all(np.isfinite(both[k]) for k in ("psnr", "ssim", "colour_error"))
