"""kl_autoencoder/evaluation/ and eval/evaluate.py end to end on tiny models and the built-in sample photos at 32 px."""

import json
from pathlib import Path

import pytest
import torch

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.evaluation import EvaluationError, evaluate, write_latent_config
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "lpips", "rfid")
LATENT_KEYS = ("scaling_factor", "shift_factor", "channel_mean", "channel_std", "latents_mean", "latents_std",
               "kl_per_channel", "active_units", "collapsed_channels")


def informative_model() -> KLAutoencoder:
    """Random weights, but the posterior mean clearly depends on the image (every channel well above threshold)."""
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config())
    with torch.no_grad():
        model.encoder.conv_out.weight.mul_(4)
    return model.eval()


def collapsed_model() -> KLAutoencoder:
    """Encoder output independent of the input: conv_out weight zero, so mean and logvar are the bias everywhere."""
    torch.manual_seed(1)
    model = KLAutoencoder(tiny_config())
    with torch.no_grad():
        model.encoder.conv_out.weight.zero_()
    return model.eval()


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


class PooledFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_evaluate_two_models_side_by_side(tmp_path):
    lpips = pytest.importorskip("lpips")
    informative_model().save_pretrained(tmp_path / "good")
    collapsed_model().save_pretrained(tmp_path / "collapsed")
    out = tmp_path / "eval"
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="posterior collapse in 'collapsed'"):
        result = evaluate([str(tmp_path / "good"), str(tmp_path / "collapsed")], "sample", out, resolution=32,
                          num_images=6, batch_size=4, progress=False,
                          lpips_network=lpips.LPIPS(net="alex", pnet_rand=True, verbose=False),
                          fid_feature=PooledFeatures())

    written = strict_json(out / "metrics.json")
    assert written["num_images"] == 6 and written["resolution"] == 32 and len(written["image_names"]) == 6
    assert list(written["models"]) == ["good", "collapsed"]
    for name, entry in written["models"].items():
        for key in METRIC_KEYS:
            assert set(entry[key]) >= {"mean", "std"}, (name, key)
        for key in LATENT_KEYS:
            assert key in entry["latents"], (name, key)
        assert len(entry["latents"]["kl_per_channel"]) == 4
        assert entry["num_images"] == 6 and entry["speed"]["encode_images_per_s"] > 0
        assert entry["speed"]["decode_images_per_s"] > 0
        assert entry["ms_ssim"]["scales"] == 2
        assert [w["psnr"] for w in entry["worst"]] == sorted(w["psnr"] for w in entry["worst"])
        for picture in ("reconstructions", "worst", "latent_histograms", "latent_channels"):
            path = out / entry["pictures"][picture]
            assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["models"]["good"]["psnr"]["mean"] == pytest.approx(written["models"]["good"]["psnr"]["mean"])
    # the worst image is the lowest PSNR of all six
    good = written["models"]["good"]
    assert good["worst"][0]["psnr"] <= good["psnr"]["mean"]

    # collapse: flagged for the constant encoder only
    assert written["models"]["collapsed"]["latents"]["active_units"] == 0
    assert written["models"]["collapsed"]["latents"]["collapsed_channels"] == [0, 1, 2, 3]
    assert written["models"]["collapsed"]["warnings"]
    assert good["latents"]["active_units"] == 4 and good["warnings"] == []

    report = (out / "report.md").read_text()
    assert "`good`" in report and "`collapsed`" in report and "posterior collapse in 'collapsed'" in report
    assert "good/reconstructions.png" in report and "Lowest PSNR" in report
    assert report.count("| PSNR (dB)") == 1  # one table row, both models side by side
    assert report.count("| ΔE2000 (mean per pixel) ↓ |") == 1 and "Worst colour: `" in report
    for entry in written["models"].values():
        assert entry["worst_colour"]["delta_e"] >= entry["delta_e"]["mean"] and "hue_error" in entry["worst_colour"]
        assert set(entry["splits"]["held-out"]["hue_error"]) >= {"mean", "std"}


def test_offline_metrics_are_null_with_reason_and_write_config_is_read_by_diffusers(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached backbones
    model_dir = tmp_path / "model"
    informative_model().save_pretrained(model_dir)
    out = tmp_path / "eval"
    from eval.evaluate import main

    code = main(["--model", str(model_dir), "--data", "sample", "--out", str(out), "--resolution", "32",
                 "--num-images", "4", "--batch-size", "4", "--write-config", "--write-latent-stats", "--no-progress"])
    assert code == 0
    entry = strict_json(out / "metrics.json")["models"]["model"]
    assert entry["lpips"] is None and "alexnet-owt-7be5be79.pth" in entry["lpips_reason"]
    assert entry["rfid"] is None and entry["rfid_reason"]
    assert "lpips not reported" in (out / "report.md").read_text()

    latents = entry["latents"]
    assert entry["config_written"] == str(model_dir / "config.json")
    vae = diffusers.AutoencoderKL.from_pretrained(model_dir)
    assert vae.config.scaling_factor == pytest.approx(latents["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(latents["shift_factor"])
    assert list(vae.config.latents_mean) == pytest.approx(latents["latents_mean"])
    assert list(vae.config.latents_std) == pytest.approx(latents["latents_std"])
    assert latents["scaling_factor"] != pytest.approx(0.18215)  # the default was really overwritten
    ours = KLAutoencoder.from_pretrained(model_dir)
    assert ours.config.scaling_factor == pytest.approx(latents["scaling_factor"])


def test_write_config_refuses_a_single_file(tmp_path):
    weights = informative_model().save_pretrained(tmp_path / "vae.safetensors", format="ldm")
    with pytest.raises(EvaluationError, match="needs a diffusers model folder"):
        write_latent_config(str(weights), {"scaling_factor": 1.0, "shift_factor": 0.0})
    with pytest.raises(EvaluationError, match="no config.json"):
        write_latent_config(str(tmp_path), {"scaling_factor": 1.0, "shift_factor": 0.0})
    with pytest.raises(EvaluationError, match="needs a diffusers model folder"):  # before any evaluation work
        evaluate([str(weights)], "sample", tmp_path / "out", resolution=32, write_config=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_model_path_and_empty_data_folder_give_clear_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EvaluationError, match="could not load model .*no-such-model"):
        evaluate([str(missing)], "sample", tmp_path / "out", resolution=32, num_images=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError, match=f"could not load evaluation images from .*{empty.name}"):
        evaluate([str(missing)], str(empty), tmp_path / "out", resolution=32, progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_command_line_reports_errors_as_one_line(tmp_path, capsys):
    from eval.evaluate import main

    (tmp_path / "photos").mkdir()  # no images in it (and --out outside it: an output inside an input is refused)
    code = main(["--model", str(tmp_path / "nope"), "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: could not load evaluation images") and str(tmp_path) in err


# ----------------------------------------------------------------------------------------------------------


def reference_psnr(model: KLAutoencoder, source: str) -> list[float]:
    """Per-image PSNR of `model`'s posterior-mode reconstructions, computed with skimage (independent of metrics.py)."""
    from skimage.metrics import peak_signal_noise_ratio

    from kl_autoencoder.data import load_eval_images

    _, x = load_eval_images(source, 32)
    with torch.no_grad():
        recon = model.decode(model.encode(x).mode())
    to01 = lambda t: ((t.double() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # noqa: E731
    return [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(to01(x), to01(recon))]


def test_sample_evaluation_reports_held_out_first_and_headlines_it(tmp_path):
    model = informative_model()
    model.save_pretrained(tmp_path / "good")
    out = tmp_path / "eval"
    result = evaluate([str(tmp_path / "good")], "sample", out, resolution=32, num_images=5, batch_size=4,
                      progress=False, worst_k=0)
    written = strict_json(out / "metrics.json")
    # held-out photos first (so --num-images keeps them), then training photos, each named per split
    from kl_autoencoder.data import SAMPLE_HELDOUT, SAMPLE_TRAIN

    n_held, n_train = len(SAMPLE_HELDOUT), 5 - len(SAMPLE_HELDOUT)
    assert list(written["splits"]) == ["held-out", "training"]
    assert written["splits"]["held-out"] == list(SAMPLE_HELDOUT)
    assert written["splits"]["training"] == list(SAMPLE_TRAIN[:n_train])
    assert written["image_names"] == list(SAMPLE_HELDOUT + SAMPLE_TRAIN[:n_train])
    entry = written["models"]["good"]
    held_out, training = entry["splits"]["held-out"], entry["splits"]["training"]
    assert held_out["num_images"] == n_held and training["num_images"] == n_train
    expected_held_out = reference_psnr(model, "sample:heldout")
    expected_training = reference_psnr(model, "sample:train")[:n_train]
    assert held_out["psnr"]["mean"] == pytest.approx(sum(expected_held_out) / n_held, rel=1e-4)
    assert training["psnr"]["mean"] == pytest.approx(sum(expected_training) / n_train, rel=1e-4)
    assert entry["psnr"]["mean"] == pytest.approx(sum(expected_held_out + expected_training) / 5, rel=1e-4)
    for key in ("ssim", "ms_ssim"):
        assert set(held_out[key]) >= {"mean", "std"} and set(training[key]) >= {"mean", "std"}
    # the headline is the held-out split, not the pooled average
    headline = written["headline"]
    assert headline["split"] == "held-out" and headline["num_images"] == n_held
    assert headline["models"]["good"]["psnr"] == held_out["psnr"]
    assert headline["models"]["good"]["psnr"]["mean"] != pytest.approx(entry["psnr"]["mean"], rel=1e-3)
    assert result["headline"]["models"]["good"]["ssim"]["mean"] == pytest.approx(held_out["ssim"]["mean"])
    report = (out / "report.md").read_text()
    first_line = next(line for line in report.splitlines()[1:] if line.strip())
    assert (first_line.startswith(f"**Headline, held-out images ({n_held} of 5)")
            and f"{held_out['psnr']['mean']:.4g}" in first_line)
    header = next(line for line in report.splitlines() if line.startswith("| metric |"))
    assert header.index(f"held-out images ({n_held})") < header.index(f"training images ({n_train})")


def test_only_the_available_splits_are_reported(tmp_path):
    informative_model().save_pretrained(tmp_path / "good")
    result = evaluate([str(tmp_path / "good")], "sample", tmp_path / "one", resolution=32, num_images=1,
                      progress=False, worst_k=0)
    from kl_autoencoder.data import SAMPLE_HELDOUT

    assert result["splits"] == {"held-out": [SAMPLE_HELDOUT[0]]} and result["headline"]["split"] == "held-out"
    result = evaluate([str(tmp_path / "good")], "sample:train", tmp_path / "train", resolution=32, num_images=2,
                      progress=False, worst_k=0)
    assert list(result["splits"]) == ["training"] and result["headline"]["split"] == "training"
    assert "no held-out images in this evaluation" in (tmp_path / "train" / "report.md").read_text()


def save_photo_crops(folder: Path, names: list[str], size: int = 40) -> None:
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(getattr(skdata, name)()[:size, :size]).save(folder / f"{name}.png")


def test_skipped_unreadable_images_are_recorded_in_metrics_and_report(tmp_path, capsys):
    photos = tmp_path / "photos"
    save_photo_crops(photos, ["astronaut", "coffee"])
    (photos / "broken.png").write_bytes(b"not a png at all")
    informative_model().save_pretrained(tmp_path / "good")
    out = tmp_path / "eval"
    from eval.evaluate import main

    code = main(["--model", str(tmp_path / "good"), "--data", str(photos), "--out", str(out), "--resolution", "32",
                 "--no-progress", "--worst-k", "0"])
    assert code == 0
    written = strict_json(out / "metrics.json")
    assert written["skipped_images"] == 1 and written["skipped_files"] == [str(photos / "broken.png")]
    assert list(written["skip_reasons"]) == [str(photos / "broken.png")] and written["skip_reasons"][str(photos / "broken.png")]
    assert written["num_images"] == 2 and list(written["splits"]) == ["all"]
    assert written["headline"]["split"] == "all"
    report = (out / "report.md").read_text()
    assert "Skipped 1 unreadable image**" in report and f"`{photos / 'broken.png'}`" in report
    assert "no held-out images in this evaluation" in report
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image: " in printed and "broken.png" in printed
    # nothing skipped: zero and empty, and no report section
    result = evaluate([str(tmp_path / "good")], "sample", tmp_path / "clean", resolution=32, num_images=2,
                      progress=False, worst_k=0)
    assert result["skipped_images"] == 0 and result["skipped_files"] == []
    assert "Skipped" not in (tmp_path / "clean" / "report.md").read_text()


def test_every_model_is_validated_before_any_work(tmp_path, capsys):
    informative_model().save_pretrained(tmp_path / "good")
    torch.manual_seed(0)
    KLAutoencoder(tiny_config(block_out_channels=(8, 16, 16))).save_pretrained(tmp_path / "f4")  # factor 4
    out = tmp_path / "eval"
    # a missing second model: nothing at all is written, the message names it
    with pytest.raises(EvaluationError, match="could not load model .*no-such-model"):
        evaluate([str(tmp_path / "good"), str(tmp_path / "no-such-model")], "sample", out, resolution=32,
                 num_images=2, progress=False)
    assert not out.exists()
    # a second model whose downsampling factor does not divide the resolution: the same, before any picture
    with pytest.raises(EvaluationError, match="not divisible by the model's downsampling factor 4 .*'f4'"):
        evaluate([str(tmp_path / "good"), str(tmp_path / "f4")], "sample", out, resolution=34, num_images=2,
                 progress=False)
    assert not out.exists()
    from eval.evaluate import main

    code = main(["--model", str(tmp_path / "good"), str(tmp_path / "missing-too"), "--data", "sample", "--out",
                 str(out), "--resolution", "32", "--num-images", "2", "--no-progress"])
    assert code == 2 and "missing-too" in capsys.readouterr().err
    assert not out.exists()


def test_reconstruction_column_labels_do_not_overlap():
    from kl_autoencoder.evaluation import ImageRecord, plot_reconstructions

    for size in (16, 32, 128, 256):
        images = torch.randint(0, 256, (2, 2, 3, size, size), dtype=torch.uint8)
        records = [ImageRecord(i, 20.0, images[0, i], images[1, i]) for i in range(2)]
        fig = plot_reconstructions(records, ["a.png", "b.png"], "title")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [label.get_window_extent(renderer) for label in fig.axes[0].get_xticklabels()]
        assert [label.get_text() for label in fig.axes[0].get_xticklabels()][:2] == ["original", "reconstruction"]
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, (size, left, right)
        width = fig.get_size_inches()[0] * fig.dpi
        assert all(0 <= box.x0 and box.x1 <= width for box in boxes), size  # not cut off either
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_recommended_scale_is_the_one_estimators_on_the_same_samples(tmp_path):
    from kl_autoencoder import metrics as M
    from kl_autoencoder.data import SAMPLE_HELDOUT, load_eval_images

    model = informative_model()
    model.save_pretrained(tmp_path / "good")
    result = evaluate([str(tmp_path / "good")], "sample", tmp_path / "auto", resolution=32, num_images=5,
                      batch_size=2, seed=7, progress=False, worst_k=0)
    latents = result["models"]["good"]["latents"]
    # the same batches in the same order (held-out first), the same seeded generator
    x = torch.cat([load_eval_images("sample:heldout", 32)[1],
                   load_eval_images("sample:train", 32, 5 - len(SAMPLE_HELDOUT))[1]])
    expected = M.estimate_latent_scale(model, x.split(2), generator=torch.Generator().manual_seed(7))
    assert latents["scaling_factor"] == pytest.approx(expected.scaling_factor, rel=1e-5)
    assert latents["shift_factor"] is None and expected.shift_factor is None  # 4 channels: no shift by convention
    shifted = evaluate([str(tmp_path / "good")], "sample", tmp_path / "on", resolution=32, num_images=5, batch_size=2,
                       seed=7, shift=True, progress=False, worst_k=0)["models"]["good"]["latents"]
    expected = M.estimate_latent_scale(model, x.split(2), shift=True, generator=torch.Generator().manual_seed(7))
    assert shifted["shift_factor"] == pytest.approx(expected.shift_factor, rel=1e-5)
    assert shifted["scaling_factor"] == pytest.approx(latents["scaling_factor"], rel=1e-9)


def test_latent_channel_pictures_name_each_image_whole_and_fit(tmp_path):
    """Titles used to be cut to 16 characters ("chelsea.png (hel c0"); now the row label is the whole image label
    and every text lies inside the saved figure without overlapping another."""
    import matplotlib.pyplot as plt

    from kl_autoencoder.evaluation import plot_latent_channels

    labels = ["chelsea.png (held-out)", "a_long_photo_name_0123.jpg (training)"]
    fig = plot_latent_channels(torch.randn(2, 4, 8, 8), labels, "model: posterior means")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(match=lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
             if t.get_text() and t.get_visible()]
    joined = " ".join(t.get_text().replace("\n", " ") for t in texts)
    assert all(label in joined for label in labels), joined
    width, height = fig.get_size_inches() * fig.dpi
    boxes = [t.get_window_extent(renderer) for t in texts]
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, box
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_error_maps_colour_scale_ends_at_the_99th_percentile_and_says_so():
    """One bad pixel used to set the scale, so the rest of every error map looked black."""
    import matplotlib.pyplot as plt
    import numpy as np

    from kl_autoencoder.evaluation import ImageRecord, plot_reconstructions

    torch.manual_seed(0)
    original = torch.randint(40, 200, (2, 3, 32, 32), dtype=torch.uint8)
    noise = torch.randint(-12, 13, original.shape)
    reconstruction = (original.int() + noise).clamp(0, 255).to(torch.uint8)
    reconstruction[0, :, 5, 5] = 255 - original[0, :, 5, 5]  # one outlier pixel
    records = [ImageRecord(i, 20.0, original[i], reconstruction[i]) for i in range(2)]
    fig = plot_reconstructions(records, ["a.png", "b.png"], "title")
    errors = (original.double() - reconstruction.double()).abs().mean(1) / 255
    expected = float(np.percentile(errors.numpy(), 99))
    colorbar = fig.axes[1]
    upper = colorbar.get_ylim()[1]
    assert upper == pytest.approx(expected, rel=1e-6)
    assert upper < 0.5 * float(errors.max())  # the outlier no longer sets the scale
    label = colorbar.get_ylabel()
    assert f"{expected:.3g}" in label and "99th percentile" in label and f"{float(errors.max()):.3g}" in label
    plt.close(fig)


def test_evaluation_says_what_it_does_after_its_progress_bar(tmp_path, capsys):
    """The pictures and diffusability take seconds after the bar: each step is announced (without the bar too: a
    long evaluation never goes quiet)."""
    informative_model().save_pretrained(tmp_path / "good")
    evaluate([str(tmp_path / "good")], "sample", tmp_path / "out", resolution=32, num_images=2, progress=True,
             lpips_net="alex")
    err = capsys.readouterr().err
    steps = ["good: drawing pictures into", "good: diffusability (latent and image spectra, equivariance)",
             f"writing {tmp_path / 'out' / 'metrics.json'}"]
    positions = [err.find(step) for step in steps]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), err
    evaluate([str(tmp_path / "good")], "sample", tmp_path / "quiet", resolution=32, num_images=2, progress=False)
    err = capsys.readouterr().err
    assert "good: reconstructing 2 images" in err and "good: drawing pictures into" in err
