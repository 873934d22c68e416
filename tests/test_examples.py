"""The lecture examples run end to end with reduced settings and show what they claim to show."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from kl_autoencoder.data import image_to_tensor, sample_images

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Import examples/NAME.py as a module (the scripts import their shared `digits_vae` from their own folder)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"lecture_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_plots_written(results: dict, out: Path) -> None:
    assert results["plots"], "no plots reported"
    for path in results["plots"]:
        assert Path(path).parent == out and Path(path).stat().st_size > 5_000, path


SMALL = ["--hidden", "128", "--seed", "0"]


def test_vae_prior_samples_are_closer_to_heldout_digits_than_ae_samples(tmp_path):
    results = load_example("ae_vs_vae").main(["--steps", "500", "--num-samples", "300", "--out", str(tmp_path), *SMALL])
    ae, vae = results["AE"], results["VAE"]
    # Both reconstruct; only the VAE's decodes of N(0, I) look like data.
    assert ae["rec_mse"] < 0.03 and vae["rec_mse"] < 0.03
    assert vae["prior_sample_nn_distance"] < ae["prior_sample_nn_distance"] - 0.1
    assert_plots_written(results, tmp_path)


def test_higher_beta_gives_lower_kl_and_higher_reconstruction_error(tmp_path):
    results = load_example("beta_vae").main(["--steps", "400", "--betas", "0.5", "1", "4", "--out", str(tmp_path),
                                             *SMALL])
    kl, distortion, rec = results["kl"], results["distortion"], results["rec_mse"]
    assert kl[0] > kl[1] > kl[2], kl
    assert distortion[0] < distortion[1] < distortion[2], distortion
    assert rec[2] > rec[0] + 0.002, rec  # the mean decode too, clearly between the ends
    assert results["active_units"][0] >= results["active_units"][2]
    # The per-unit KL bars add up to the total.
    assert sum(results["kl_per_unit"][1]) == pytest.approx(kl[1], rel=1e-5)
    assert_plots_written(results, tmp_path)


def test_warmup_and_free_bits_bring_back_a_collapsed_latent(tmp_path):
    results = load_example("posterior_collapse").main(["--steps", "500", "--skip-reference", "--out", str(tmp_path),
                                                       *SMALL])
    collapsed, cured = results["runs"].values()
    assert collapsed["active_units"] <= 2, collapsed
    assert cured["active_units"] >= collapsed["active_units"] + 3, (collapsed, cured)
    assert cured["kl"] > collapsed["kl"]
    assert_plots_written(results, tmp_path)


def test_conditional_vae_generates_the_requested_digit(tmp_path):
    results = load_example("conditional_vae").main(["--steps", "500", "--samples-per-class", "30", "--out",
                                                    str(tmp_path), *SMALL])
    assert results["classifier_heldout_accuracy"] > 0.9  # the judge itself is good
    assert results["generated_accuracy"] > 0.6  # chance is 0.1
    assert_plots_written(results, tmp_path)


def test_digits_interpolation_and_truncated_sampling(tmp_path):
    results = load_example("interpolate").main(["--steps", "400", "--steps-between", "6", "--num-samples", "300",
                                                "--out", str(tmp_path), *SMALL])
    lerp_norms, slerp_norms = results["path_norms"]["lerp"], results["path_norms"]["slerp"]
    assert lerp_norms[0] == pytest.approx(slerp_norms[0]) and lerp_norms[-1] == pytest.approx(slerp_norms[-1])
    # Slerp keeps the norm between the endpoints' norms; lerp sags below it in the middle.
    assert slerp_norms[3] > lerp_norms[3]
    diversity = results["diversity"]
    assert diversity[1.0] < diversity[None] - 0.05  # truncation trades variety for typicality
    assert_plots_written(results, tmp_path)


def test_photo_interpolation_on_an_exported_model(tmp_path, tiny_model):
    model_dir = tmp_path / "vae"
    tiny_model.save_pretrained(str(model_dir))
    out = tmp_path / "plots"
    results = load_example("interpolate").main(["--model", str(model_dir), "--image-size", "32", "--steps-between", "4",
                                                "--out", str(out)])
    lerp_strip = results["strips"]["lerp"]
    assert lerp_strip.shape == (4, 3, 32, 32)
    assert len(results["photos"]) == 2
    # Recomputed by hand from the model: decodes of the lerp between the two photos' posterior means.
    photos = [image_to_tensor(ImageOps.fit(image, (32, 32), Image.Resampling.BICUBIC))
              for _, image in sample_images("heldout")[:2]]
    with torch.no_grad():
        means = tiny_model.encode(torch.stack(photos)).mean
        t = torch.linspace(0, 1, 4).view(-1, 1, 1, 1)
        expected = tiny_model.decode((1 - t) * means[0] + t * means[1])
    torch.testing.assert_close(lerp_strip, expected, atol=1e-4, rtol=1e-4)
    assert_plots_written(results, out)
