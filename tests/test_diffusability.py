"""Diffusability measures: spectra on inputs with known spectra, equivariance on models equivariant by construction,
the probe's determinism."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.diffusability import (
    EVAL_TRANSFORMS, ProbeConfig, Transform, diffusability_metrics, plot_spectra, report_lines, diffusability_probe, equivariance_loss,
    equivariance_psnr, frequency_radius, high_frequency_share, power_spectrum_2d, radial_power_spectrum,
    random_crops, random_transform, spectrum_summary,
)
from tests.conftest import tiny_config

ALL_TRANSFORMS = [Transform("scale", 2), Transform("scale", 4), Transform("rotate", 1), Transform("rotate", 2),
                  Transform("rotate", 3), Transform("flip", -1), Transform("flip", -2)]


def plane_wave(size: int, ky: int, kx: int) -> torch.Tensor:
    """cos(2 pi (ky y + kx x) / size) on a size x size grid: all its energy at |f| = sqrt(ky^2 + kx^2) / size."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    return torch.cos(2 * math.pi * (ky * y + kx * x) / size)[None, None]


# --------------------------------------------------------------------------------------------------------------------
# Spectrum.


def test_constant_maps_have_no_energy_and_zero_share():
    x = torch.full((2, 3, 16, 16), 0.7)
    assert power_spectrum_2d(x).abs().max() == 0
    assert high_frequency_share(x) == 0.0


def test_power_sums_to_the_variance_of_the_maps_parseval():
    x = torch.randn(3, 2, 12, 20, generator=torch.Generator().manual_seed(0)) * 3 + 1
    expected = x.double().var(dim=(-2, -1), correction=0).mean()
    assert torch.allclose(power_spectrum_2d(x).sum(), expected, rtol=1e-10)


@pytest.mark.parametrize("ky, kx, ring", [(0, 3, 3), (3, 4, 5), (6, 8, 10), (0, 16, 16)])
def test_a_plane_wave_lands_in_its_ring(ky, kx, ring):
    frequencies, power = radial_power_spectrum(plane_wave(32, ky, kx))
    assert frequencies[int(power.argmax())] == pytest.approx(ring / 32)
    assert power.sum() == pytest.approx(float(power.max()), rel=1e-12)  # no leakage into other rings
    share = high_frequency_share(plane_wave(32, ky, kx))
    assert share == pytest.approx(1.0 if ring / 32 > 0.25 else 0.0, abs=1e-12)


def test_frequencies_are_in_cycles_per_pixel_up_to_nyquist():
    frequencies, _ = radial_power_spectrum(torch.randn(1, 1, 16, 24))
    assert frequencies[0] == pytest.approx(1 / 16) and frequencies[-1] == pytest.approx(0.5)
    assert frequency_radius(8, 8)[0, 4] == 0.5 and frequency_radius(8, 8)[4, 4] == pytest.approx(0.5 * math.sqrt(2))


def test_white_noise_share_is_the_area_of_the_high_band_and_its_profile_is_flat():
    x = torch.randn(32, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    radius = frequency_radius(32, 32)
    expected = float((radius > 0.25).sum()) / (32 * 32 - 1)  # every frequency but DC (removed with the mean)
    assert high_frequency_share(x) == pytest.approx(expected, abs=0.01)
    assert expected == pytest.approx(1 - math.pi / 16, abs=0.01)  # the continuous band area
    relative = torch.tensor(spectrum_summary(power_spectrum_2d(x))["relative_power"])
    assert relative[2:].min() > 0.8 and relative[2:].max() < 1.2  # flat (the lowest rings hold few frequencies)


@pytest.mark.parametrize("sigma, at_most", [(0.04, 1e-3), (0.12, 0.2)])
def test_gaussian_random_field_share_matches_its_spectrum(sigma, at_most):
    """White noise filtered to the power spectrum S(f) = exp(-|f|^2 / (2 sigma^2)): the share is S's mass above 0.25."""
    radius = frequency_radius(64, 64)
    target = torch.exp(-radius**2 / (2 * sigma**2))
    noise = torch.randn(16, 4, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    field = torch.fft.ifft2(torch.fft.fft2(noise) * target.sqrt()).real
    target[0, 0] = 0  # the mean is removed
    expected = float(target[radius > 0.25].sum() / target.sum())
    share = high_frequency_share(field)
    assert share == pytest.approx(expected, rel=0.1, abs=1e-6)
    assert share < at_most  # smooth fields: a small share
    relative = spectrum_summary(power_spectrum_2d(field))["relative_power"]
    assert relative[0] > 10 * relative[-1]  # falls with frequency


def test_spectrum_rejects_non_batches():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        power_spectrum_2d(torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------------------------------------------------
# Transforms.


def test_transforms_match_independent_references():
    x = torch.randn(2, 3, 8, 8)
    a = x.numpy()
    assert np.array_equal(Transform("rotate", 1)(x).numpy(), np.rot90(a, 1, axes=(-2, -1)))
    assert np.array_equal(Transform("rotate", 3)(x).numpy(), np.rot90(a, 3, axes=(-2, -1)))
    assert np.array_equal(Transform("flip", -1)(x).numpy(), a[..., ::-1])
    assert np.array_equal(Transform("flip", -2)(x).numpy(), a[..., ::-1, :])
    expected = a.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))  # the mean of each 2x2 block
    assert np.allclose(Transform("scale", 2)(x).numpy(), expected, atol=1e-6)
    assert torch.allclose(Transform("scale", 4)(x), F.interpolate(x, scale_factor=0.25, mode="area"))


def test_bad_transforms_are_refused_by_name():
    with pytest.raises(ValueError, match="'zoom'"):
        Transform("zoom", 2)
    with pytest.raises(ValueError, match="quarter turns"):
        Transform("rotate", 4)
    with pytest.raises(ValueError, match="integer factor"):
        Transform("scale", 1)
    with pytest.raises(ValueError, match="not divisible by 4"):
        Transform("scale", 4)(torch.zeros(1, 1, 6, 8))
    with pytest.raises(ValueError, match="'shear'"):
        random_transform(torch.Generator(), kinds=["shear"])


def test_random_transform_is_seeded_and_covers_what_was_asked():
    draw = lambda seed, **kw: [random_transform(g, **kw) for g in [torch.Generator().manual_seed(seed)] for _ in range(200)]  # noqa: E731
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert {t.name for t in draw(0)} == {t.name for t in ALL_TRANSFORMS}
    assert {t.name for t in draw(0, kinds=["scale"], scales=[2])} == {"scale_1/2"}
    assert {t.kind for t in draw(3, kinds=["rotate", "flip"])} == {"rotate", "flip"}


# --------------------------------------------------------------------------------------------------------------------
# Equivariance loss.


class PointwiseAutoencoder(torch.nn.Module):
    """1x1-conv encoder A (3 -> 4) and decoder B = pinv(A): B A = I, and a per-pixel linear map commutes with every
    geometric transform and with area averaging. Exactly equivariant for any image."""

    def __init__(self):
        super().__init__()
        self.A = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.B = torch.linalg.pinv(self.A)

    def encode_mean(self, x):
        return torch.einsum("oc,bchw->bohw", self.A, x)

    def decode(self, z):
        return torch.einsum("co,bohw->bchw", self.B, z)


class BlockAutoencoder(torch.nn.Module):
    """Average-pool by 8 / nearest-upsample by 8: exact on images constant on aligned 8x8 blocks; downscaling by s
    stays exact on images constant on (8 s)-blocks."""

    def encode_mean(self, x):
        return F.avg_pool2d(x, 8)

    def decode(self, z):
        return F.interpolate(z, scale_factor=8, mode="nearest")


def blocky_image(size: int, block: int, seed: int = 0) -> torch.Tensor:
    # Multiples of 1/8: block averages are exact in binary floating point, so "exact" can mean == 0.
    coarse = torch.randint(-8, 9, (2, 3, size // block, size // block), generator=torch.Generator().manual_seed(seed)) / 8
    return F.interpolate(coarse, scale_factor=block, mode="nearest")


@pytest.mark.parametrize("transform", ALL_TRANSFORMS, ids=lambda t: t.name)
def test_loss_is_zero_for_models_equivariant_by_construction(transform):
    pointwise, x = PointwiseAutoencoder(), torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    assert equivariance_loss(pointwise, x, pointwise.encode_mean(x), transform) < 1e-12
    block, x = BlockAutoencoder(), blocky_image(64, 32)  # 32-blocks: exact for scale 1/4 as well
    assert equivariance_loss(block, x, block.encode_mean(x), transform, kind="l2") == 0
    assert equivariance_psnr(block, x, block.encode_mean(x), transform).isinf().all()


@pytest.mark.parametrize("transform", ALL_TRANSFORMS, ids=lambda t: t.name)
def test_loss_is_positive_when_the_model_is_not_equivariant(transform):
    block, x = BlockAutoencoder(), torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert equivariance_loss(block, x, block.encode_mean(x), transform) > 0.1  # fine detail is lost by the encoder


def test_loss_of_a_random_kl_autoencoder_is_positive_and_trains_encoder_and_decoder():
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config())  # downsampling factor 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for transform in ALL_TRANSFORMS:
        model.zero_grad()
        z = model.encode(x).sample(torch.Generator().manual_seed(0))
        loss = equivariance_loss(model, x, z, transform)
        assert loss > 0.01, transform.name
        loss.backward()
        assert model.decoder.conv_out.weight.grad.abs().sum() > 0, transform.name
        assert model.encoder.conv_in.weight.grad.abs().sum() > 0, transform.name


def test_psnr_matches_the_loss_in_l2():
    block, x = BlockAutoencoder(), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.8 - 0.4
    transform = Transform("rotate", 1)
    mse01 = equivariance_loss(block, x[:1], block.encode_mean(x[:1]), transform, kind="l2") / 4  # [-1,1] -> [0,1]
    assert equivariance_psnr(block, x, block.encode_mean(x), transform)[0] == pytest.approx(
        float(-10 * torch.log10(mse01)), rel=1e-5)


def test_diffusability_metrics_report_both_spectra_and_skip_what_does_not_fit(tiny_model):
    images = torch.rand(3, 3, 12, 12) * 2 - 1  # factor 2: 12 is divisible by 2 x 2 but not by 2 x 4
    result = diffusability_metrics(tiny_model, images, batch_size=2)
    assert set(result["spectrum"]) == {"latent", "image"}
    assert result["spectrum"]["image"]["high_frequency_share"] == pytest.approx(high_frequency_share(images))
    assert result["spectrum"]["latent"]["frequencies"][-1] == 0.5
    assert set(result["equivariance_psnr"]) == {t.name for t in EVAL_TRANSFORMS} - {"scale_1/4"}
    assert "not divisible" in result["equivariance_skipped"]["scale_1/4"]
    assert all(math.isfinite(v["mean"]) for v in result["equivariance_psnr"].values())


def test_report_section_and_plot_show_every_model(tiny_model):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    entries = {"a": diffusability_metrics(tiny_model, images), "b": diffusability_metrics(tiny_model, images[:1])}
    entries["b"]["probe"] = {"heldout_loss": {"100": 0.25, "750": 0.03}, "heldout_loss_mean": 0.14, "latent_std": 0.9,
                             "warnings": ["scale is off"]}
    text = "\n".join(report_lines({m: {"diffusability": e} for m, e in entries.items()}, picture="spectra.png"))
    share = entries["a"]["spectrum"]["latent"]["high_frequency_share"]
    assert f"| high-frequency share, latent ↓ | {share:.3f} |" in text
    assert "| probe held-out loss, t = 750 ↓ | n/a | 0.0300 |" in text
    assert "`b` probe: scale is off" in text and "![spectra](spectra.png)" in text
    assert report_lines({"a": {"diffusability": None}}) == []
    axes = plot_spectra(entries).axes[0]
    labels = [line.get_label() for line in axes.get_lines() if not line.get_label().startswith("_")]
    assert len(labels) == 4 and labels[0].startswith("a latent")  # two latents, two distinct image sets


# --------------------------------------------------------------------------------------------------------------------
# Probe.

TINY_PROBE = dict(resolution=16, train_crops=12, heldout_crops=4, steps=3, batch_size=4, width=8,
                  num_train_timesteps=100, eval_timesteps=(10, 50, 90), latent_scale="measured")


def probe_pixels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of two synthetic photos (the sample photos take seconds to decode the first time)."""
    photos = list(torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    generator = torch.Generator().manual_seed(seed)
    return random_crops(photos, 12, 16, generator), random_crops(photos, 4, 16, generator)


def test_probe_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(tiny_model):
    train, heldout = probe_pixels(0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = diffusability_probe(tiny_model, ProbeConfig(**TINY_PROBE), train, heldout)
    assert torch.rand(1) == before
    second = diffusability_probe(tiny_model, ProbeConfig(**TINY_PROBE), train, heldout)
    other_seed = diffusability_probe(tiny_model, ProbeConfig(**TINY_PROBE, seed=1), train, heldout)
    for result in (first, second, other_seed):
        result.pop("seconds")
    assert first == second
    assert first["heldout_loss"] != other_seed["heldout_loss"]
    assert set(first["heldout_loss"]) == {"10", "50", "90"}
    assert first["latent_shape"] == [4, 8, 8] and first["latent_std"] == pytest.approx(1.0)
    assert all(0 < v < 10 for v in first["heldout_loss"].values())


def test_probe_warns_when_the_configured_scale_leaves_latents_far_from_unit_variance(tiny_model):
    tiny_model.config.scaling_factor = 1e-3
    config = ProbeConfig(**{**TINY_PROBE, "latent_scale": "config", "steps": 1})
    with pytest.warns(UserWarning, match="latent scale"):
        result = diffusability_probe(tiny_model, config, *probe_pixels(0))
    assert result["latent_std"] < 0.5 and result["warnings"]


def test_random_crops_are_seeded_windows_of_the_photos():
    photo = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12)
    crops = random_crops([photo], 20, 4, torch.Generator().manual_seed(0))
    assert torch.equal(crops, random_crops([photo], 20, 4, torch.Generator().manual_seed(0)))
    for crop in crops:
        crop = crop if crop[0, 0, 1] > crop[0, 0, 0] else crop.flip(-1)  # mirrored crops run backwards
        top, left = divmod(int(crop[0, 0, 0]), 12)
        assert torch.equal(crop, photo[:, top:top + 4, left:left + 4])
    assert len({tuple(c[0, 0, :2].tolist()) for c in crops}) > 5


def test_probe_config_and_crops_refuse_bad_values():
    with pytest.raises(ValueError, match="latent_scale"):
        ProbeConfig(latent_scale="auto")
    with pytest.raises(ValueError, match="eval_timesteps"):
        ProbeConfig(eval_timesteps=(1000,))
    with pytest.raises(ValueError, match="steps"):
        ProbeConfig(steps=0)
    with pytest.raises(ValueError, match=r"\(3, 8, 8\) is smaller than the crop 16"):
        random_crops([torch.zeros(3, 8, 8)], 1, 16, torch.Generator())


def test_command_line_probe_writes_json_and_reports_errors(tmp_path, tiny_model, monkeypatch, capsys):
    import json

    from eval import diffusability as script
    from kl_autoencoder import diffusability as D

    monkeypatch.setattr(D, "probe_pixels", lambda config: probe_pixels(config.seed))  # skip decoding the photos
    tiny_model.save_pretrained(tmp_path / "my-vae")
    out = tmp_path / "probe.json"
    args = ["--model", str(tmp_path / "my-vae"), "--steps", "2", "--batch-size", "4", "--width", "8",
            "--resolution", "16", "--latent-scale", "measured", "--out", str(out)]
    assert script.main(args) == 0
    entry = json.loads(out.read_text())["models"]["my-vae"]
    assert set(entry["probe"]["heldout_loss"]) == {"100", "250", "500", "750"}
    assert entry["spectrum"]["latent"]["high_frequency_share"] > 0
    assert "my-vae: held-out loss" in capsys.readouterr().out
    assert script.main(["--model", str(tmp_path / "missing")]) == 2
    assert script.main(["--model", str(tmp_path / "my-vae"), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_evaluate_reports_diffusability_and_runs_the_probe_on_request(tmp_path, tiny_model, monkeypatch):
    import functools
    import json

    from kl_autoencoder import diffusability as D
    from kl_autoencoder import diffusion_probe
    from kl_autoencoder.data import tensor_to_image
    from kl_autoencoder.evaluation import evaluate

    tiny_model.save_pretrained(tmp_path / "tiny")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        tensor = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1
        tensor_to_image(tensor).save(folder / f"{i}.png")
    monkeypatch.setattr(diffusion_probe, "probe_pixels", lambda config: probe_pixels(config.seed))
    monkeypatch.setattr(D, "ProbeConfig", functools.partial(ProbeConfig, **{**TINY_PROBE, "eval_timesteps": (10,)}))
    result = evaluate([str(tmp_path / "tiny")], str(folder), tmp_path / "eval", resolution=16, progress=False,
                      diffusability_probe=True)
    entry = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]["tiny"]["diffusability"]
    assert entry == json.loads(json.dumps(result["models"]["tiny"]["diffusability"]))
    assert set(entry["equivariance_psnr"]) == {t.name for t in EVAL_TRANSFORMS}
    assert set(entry["probe"]["heldout_loss"]) == {"10"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Diffusability" in report and "probe held-out loss, t = 10" in report
    assert "![spectra](spectra.png)" in report and (tmp_path / "eval" / "spectra.png").stat().st_size > 0


def test_eq_finetune_benchmark_bookkeeping(tmp_path, tiny_model, monkeypatch):
    """benchmarks/eq_finetune.py --tiny: two equally long fine-tunes that differ only in the EQ probability, every model
    measured alike, differences computed from the reported values. No claim about the numbers."""
    import json
    import sys
    from pathlib import Path

    from kl_autoencoder import diffusability as D
    from kl_autoencoder import diffusion_probe

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import eq_finetune

    # Random pixels instead of decoded photos for the measures (the fine-tunes still read the sample photos).
    monkeypatch.setattr(D, "probe_pixels", lambda config: probe_pixels(config.seed))  # the benchmark's own call
    monkeypatch.setattr(diffusion_probe, "probe_pixels", lambda config: probe_pixels(config.seed))  # the probe's
    monkeypatch.setattr(eq_finetune, "load_eval_images", lambda source, size: (["a", "b"], probe_pixels(0)[1][:2]))
    tiny_model.save_pretrained(tmp_path / "start")
    out = tmp_path / "out"
    report = eq_finetune.main(["--tiny", "--model", str(tmp_path / "start"), "--out", str(out),
                               "--probe-seeds", "0", "1", "--eq-probability", "0.7"])
    assert json.loads((out / "eq_finetune.json").read_text()) == json.loads(json.dumps(report))
    plain, eq = report["runs"]["plain"]["overrides"], report["runs"]["EQ"]["overrides"]
    assert set(plain) - set(eq) == {"loss.equivariance.probability=0", "loss.equivariance.low_res_probability=0",
                                    f"train.output_dir={out / 'plain'}"}
    assert set(eq) - set(plain) == {"loss.equivariance.probability=0.7", f"train.output_dir={out / 'eq'}"}
    assert report["runs"]["plain"]["steps"] == report["runs"]["EQ"]["steps"] == 2
    assert report["start_model"] == str(tmp_path / "start")
    results = report["results"]
    assert list(results) == ["original", "plain", "EQ"]
    assert all([p["seed"] for p in r["probes"]] == [0, 1] for r in results.values())
    for name, diff in report["differences"].items():  # a row's differences are its own columns subtracted
        row = next(values for label, _, values in eq_finetune.table_rows(results) if label == name)
        assert diff == {"plain - original": row["plain"] - row["original"], "EQ - plain": row["EQ"] - row["plain"]}
    table = (out / "eq_finetune.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(report["differences"]) and all(line.count("|") == 7 for line in rows)
    assert any("probe held-out loss, mean of seeds" in line for line in rows)
    assert report["target"]["met"] == all(v for k, v in report["target"].items() if k != "met")
