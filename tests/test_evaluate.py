"""evaluation.py / eval/evaluate.py end to end on tiny models and the built-in sample photos at 32 px."""

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

    code = main(["--model", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: could not load evaluation images") and str(tmp_path) in err
