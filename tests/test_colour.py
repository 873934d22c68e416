"""Local colour measures (metrics.srgb_to_lab, delta_e2000, delta_e, hue_saturation, hue_error) against
scikit-image's colour module and Sharma, Wu and Dalal's published CIEDE2000 test pairs; and evaluation's
per-image, per-split colour report built on them."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kl_autoencoder import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

color = pytest.importorskip("skimage.color")


def random_pair(seed: int = 0, shape=(2, 3, 13, 17), noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    a[0, :, 0, :3] = [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]  # black, white, a pure hue: the edges
    return a, np.clip(a + rng.normal(0, noise, shape), 0, 1)


def hwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def test_lab_is_scikit_images_rgb2lab():
    a, _ = random_pair()
    assert np.abs(hwc(M.srgb_to_lab(torch.from_numpy(a)).numpy()) - color.rgb2lab(hwc(a))).max() < 1e-9


# Sharma, Wu, Dalal (2005), "The CIEDE2000 color-difference formula", table 1: pairs 1, 7, 13-16 (the hue-mean
# branches around 180 degrees) and 17.
SHARMA_PAIRS = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
                ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792), ((50, 2.49, -0.001), (50, -2.49, 0.0010), 7.1792),
                ((50, 2.49, -0.001), (50, -2.49, 0.0011), 7.2195), ((50, 2.49, -0.001), (50, -2.49, 0.0012), 7.2195),
                ((50, 2.5, 0), (73, 25, -18), 27.1492)]


@pytest.mark.parametrize("lab1, lab2, expected", SHARMA_PAIRS)
def test_delta_e2000_matches_the_published_test_pairs(lab1, lab2, expected):
    as_image = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)  # noqa: E731
    assert float(M.delta_e2000(as_image(lab1), as_image(lab2))) == pytest.approx(expected, abs=5e-5)
    assert float(M.delta_e2000(as_image(lab2), as_image(lab1))) == pytest.approx(expected, abs=5e-5)  # symmetric


def test_delta_e_per_pixel_and_per_image_match_scikit_image():
    a, b = random_pair(1)
    lab_a, lab_b = color.rgb2lab(hwc(a)), color.rgb2lab(hwc(b))
    ours = M.delta_e2000(M.srgb_to_lab(torch.from_numpy(a)), M.srgb_to_lab(torch.from_numpy(b))).numpy()
    assert np.abs(ours - color.deltaE_ciede2000(lab_a, lab_b)).max() < 1e-8
    ours76 = M.delta_e76(M.srgb_to_lab(torch.from_numpy(a)), M.srgb_to_lab(torch.from_numpy(b))).numpy()
    assert np.abs(ours76 - color.deltaE_cie76(lab_a, lab_b)).max() < 1e-8
    per_image = M.delta_e(torch.from_numpy(b).float(), torch.from_numpy(a).float())
    expected = color.deltaE_ciede2000(color.rgb2lab(hwc(b.astype(np.float32))),
                                      color.rgb2lab(hwc(a.astype(np.float32)))).mean(axis=(1, 2))
    assert per_image.numpy() == pytest.approx(expected, rel=1e-4)
    assert M.delta_e(torch.from_numpy(a).float(), torch.from_numpy(a).float()).abs().max() == 0


def test_hue_and_saturation_are_scikit_images_hsv():
    a, _ = random_pair(2)
    a[1, :, 1, :] = 0.5  # grey pixels: hue 0, saturation 0, as rgb2hsv says
    hue, saturation = M.hue_saturation(torch.from_numpy(a))
    hsv = color.rgb2hsv(hwc(a))
    assert np.abs(hue.numpy() / 360 - hsv[..., 0]).max() < 1e-12
    assert np.abs(saturation.numpy() - hsv[..., 1]).max() < 1e-12


def hue_turned(images: np.ndarray, degrees: float) -> np.ndarray:
    hsv = color.rgb2hsv(hwc(images))
    hsv[..., 0] = (hsv[..., 0] + degrees / 360) % 1
    return np.moveaxis(color.hsv2rgb(hsv), -1, 1)


def test_hue_error_is_the_turn_on_saturated_pixels_only():
    rng = np.random.default_rng(3)
    hsv = np.stack([rng.random((2, 16, 16)), rng.uniform(0.5, 1, (2, 16, 16)), rng.uniform(0.3, 1, (2, 16, 16))], -1)
    hsv[1, :8, :, 1] = 0.1  # half of image 1 is nearly grey: not scored
    original = np.moveaxis(color.hsv2rgb(hsv), -1, 1)
    for degrees in (10, 60, 150, -100):
        turned = hue_turned(original, degrees)
        error = M.hue_error(torch.from_numpy(turned), torch.from_numpy(original))
        assert error.numpy() == pytest.approx([abs(degrees)] * 2, abs=1e-3), degrees  # around the circle: <= 180
    # only the saturated half of image 1 counts: greying the other half changes nothing
    greyed = original.copy()
    greyed[1, :, :8] = greyed[1, :, :8].mean(axis=0, keepdims=True)
    assert float(M.hue_error(torch.from_numpy(greyed), torch.from_numpy(original))[1]) == pytest.approx(0, abs=1e-9)
    # an image without saturated pixels has no hue error (NaN), not a made-up 0
    grey = torch.full((1, 3, 8, 8), 0.4)
    assert math.isnan(float(M.hue_error(grey, grey)))


def test_a_latent_with_one_chroma_axis_shows_in_hue_error_and_delta_e_not_in_mean_colour():
    """What the 4-channel recipe did: lightness and one chroma axis kept (a*, green-red), the other flattened (b*, blue-yellow):
    the hue bars lose their hue while the global mean colour barely moves; the local measures say it."""
    hues = np.linspace(0, 1, 12, endpoint=False)
    bars = np.repeat(hues, 8)[None, :].repeat(32, 0)
    original = color.hsv2rgb(np.stack([bars, np.full_like(bars, 0.9), np.full_like(bars, 0.9)], -1))
    lab = color.rgb2lab(original)
    lab[..., 2] = lab[..., 2].mean()  # one chroma axis of two
    one_axis = np.clip(color.lab2rgb(lab), 0, 1)
    a = torch.from_numpy(np.moveaxis(one_axis, -1, 0)[None]).float()
    b = torch.from_numpy(np.moveaxis(original, -1, 0)[None]).float()
    assert float(M.hue_error(a, b)) > 30
    assert float(M.delta_e(a, b)) > 15
    assert float(M.colour_error(a, b)) < 0.06


def test_evaluation_reports_colour_per_image_per_split_and_the_worst_image(tmp_path):
    from kl_autoencoder.evaluation import evaluate_model
    from tests.test_evaluate import informative_model

    model = informative_model()
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    images[4] = images[4].mean(0, keepdim=True)  # a grey image: no hue to score
    splits = {"held-out": [0, 1], "training": [2, 3, 4]}
    run = evaluate_model(model, "m", images, batch_size=2, autocast=False, progress=False, splits=splits)
    with torch.no_grad():
        recon = M.to_unit_range(model.decode(model.encode(images).mode())).double().numpy()
    original = M.to_unit_range(images).double().numpy()
    delta_e = color.deltaE_ciede2000(color.rgb2lab(hwc(recon)), color.rgb2lab(hwc(original))).mean(axis=(1, 2))
    hue_r, hue_o = color.rgb2hsv(hwc(recon))[..., 0] * 360, color.rgb2hsv(hwc(original))
    difference = np.abs(hue_r - hue_o[..., 0] * 360)
    difference = np.minimum(difference, 360 - difference)
    hue = [difference[i][hue_o[i, ..., 1] > 0.3].mean() if (hue_o[i, ..., 1] > 0.3).any() else np.nan
           for i in range(5)]
    entry = run.metrics
    for split, indices in splits.items():
        assert entry["splits"][split]["delta_e"]["mean"] == pytest.approx(delta_e[indices].mean(), rel=1e-4)
    assert entry["splits"]["held-out"]["hue_error"]["mean"] == pytest.approx(np.mean(hue[:2]), rel=1e-4)
    training_hue = entry["splits"]["training"]["hue_error"]
    assert training_hue["mean"] == pytest.approx(np.mean(hue[2:4]), rel=1e-4) and training_hue["num_images"] == 2
    assert "1 of 3 images" in training_hue["note"]
    worst = entry["worst_colour"]
    assert worst["index"] == int(np.argmax(delta_e)) and worst["delta_e"] == pytest.approx(delta_e.max(), rel=1e-4)
    assert worst["split"] == ("held-out" if worst["index"] < 2 else "training")

    from kl_autoencoder.evaluation.report import image_metrics_section, model_sections

    result = {"num_images": 5, "data": "x", "resolution": 32, "sample_posterior": False,
              "splits": {s: [f"{i}.png" for i in ix] for s, ix in splits.items()},
              "image_names": [f"{i}.png" for i in range(5)],
              "models": {"m": {**entry, "path": "m", "pictures": {}}}}
    table = "\n".join(image_metrics_section(result))
    assert "| ΔE2000 (mean per pixel) ↓ |" in table and "| hue error (degrees, saturated pixels) ↓ |" in table
    assert f"Worst colour: `{worst['index']}.png`" in "\n".join(model_sections(result))


# ---------------------------------------------------------------------------------------------- data.random_hue


def test_the_quickstart_turns_hues_of_the_sample_photos_only(tmp_path):
    """A user pointing the quickstart at their own folder inherited `random_hue: 0.5`, an augmentation
    meant for nine built-in photos; `null` now means 0.5 for the sample source and 0 elsewhere."""
    from pathlib import Path

    from PIL import Image

    from kl_autoencoder.config import load_config
    from kl_autoencoder.data import SAMPLE_RANDOM_HUE, build_dataset

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(folder / "red.png")

    def mean_colours(overrides: list[str], items: int = 24) -> torch.Tensor:
        cfg = load_config(str(quickstart), [f"data.source={folder}", "data.num_workers=0", *overrides])
        dataset = build_dataset(cfg.data, split="train")
        torch.manual_seed(0)
        return torch.stack([dataset[i]["pixel_values"].mean(dim=(1, 2)) for i in range(items)])

    own = mean_colours([])
    assert (own[:, 0] > 0.6).all() and (own[:, 1:] < -0.6).all(), own  # every crop still red: no hue turned
    explicit = mean_colours(["data.random_hue=0.5"])  # a number still applies to any source
    assert (explicit[:, 1:] > -0.6).any()
    cfg = load_config(str(quickstart), ["data.num_workers=0"])
    assert cfg.data.source == "sample" and cfg.data.random_hue is None
    assert build_dataset(cfg.data, split="train").transform.random_hue == SAMPLE_RANDOM_HUE == 0.5
    assert build_dataset(cfg.data, split="heldout").transform.random_hue == 0.0  # evaluation crops: never turned


def test_the_hue_chart_is_twelve_saturated_hsv_bars():
    from colour_axes import hue_chart

    chart = hue_chart(96).double()
    columns = torch.arange(96)
    hue = (columns * 12 // 96) * 30 / 360
    value = np.linspace(0.95, 0.55, 96)[:, None].repeat(96, 1)
    expected = color.hsv2rgb(np.stack([np.broadcast_to(hue.numpy(), (96, 96)), np.full((96, 96), 0.85), value], -1))
    assert np.abs(hwc(chart[None].numpy())[0] - expected).max() < 1e-6
    measured_hue, saturation = M.hue_saturation(chart[None])
    assert (saturation > M.HUE_MIN_SATURATION).all()
    assert sorted(set(measured_hue.round().int().flatten().tolist())) == list(range(0, 360, 30))
    assert float(M.hue_error(chart[None], chart[None])) == 0


# ---------------------------------------------------------------------------------------------- the quickstart recipe


def test_the_quickstart_recipe_carries_every_hue(tmp_path):
    """The quickstart's latent once kept brightness and one chroma axis of two (hue error 44 and 46
    degrees on the colour wheel and the hue chart, BENCHMARKS.md). Its recipe, here on a 600-step schedule instead of
    the main job's 1500, brings every hue back within 15 degrees on both (measured: 5.3 and 6.3; 300 steps are too few,
    37 and 28; the full run 3-5)."""
    from colour_axes import colour_wheel, hue_chart, measure
    from kl_autoencoder.config import load_config
    from kl_autoencoder.model import KLAutoencoder
    from kl_autoencoder.trainer import train

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(str(quickstart), [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=600",
                                        "train.image_every=0", "train.checkpoint_every=0"])
    model = KLAutoencoder.from_pretrained(train(cfg)).eval()
    for name, image in (("colorwheel", colour_wheel(256)), ("hue_chart", hue_chart(256))):
        with torch.no_grad():
            hue_error = measure(model, image[None], [name])["mean"]["hue_error"]
        assert hue_error <= 15, (name, hue_error)
