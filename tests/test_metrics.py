"""metrics.py against independent references: skimage.metrics, torchmetrics, lpips, numpy / scipy closed forms."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kl_autoencoder import metrics as M
from kl_autoencoder.model import DiagonalGaussian, KLAutoencoder
from tests.conftest import tiny_config


def photo_batch(size: int, noise: tuple[float, ...] = (0.02, 0.05, 0.1)) -> tuple[np.ndarray, np.ndarray]:
    """Real photos (centre crops, [N, H, W, 3] float64 in [0, 1]) and noisy, clipped copies of them."""
    rng = np.random.default_rng(0)
    photos = []
    for image in (skdata.astronaut(), skdata.coffee(), skdata.chelsea()):
        h, w = image.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        photos.append(image[top:top + size, left:left + size] / 255.0)
    clean = np.stack(photos)
    noisy = np.stack([np.clip(p + rng.normal(0, s, p.shape), 0, 1) for p, s in zip(clean, noise)])
    return clean, noisy


def to_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0)


# ---------------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_and_ssim_match_skimage_on_noisy_photos():
    clean, noisy = photo_batch(96)
    a, b = to_torch(clean), to_torch(noisy)
    # skimage sees the same float32 values our tensors hold
    clean32, noisy32 = a.permute(0, 2, 3, 1).double().numpy(), b.permute(0, 2, 3, 1).double().numpy()
    expected_psnr = [peak_signal_noise_ratio(c, n, data_range=1.0) for c, n in zip(clean32, noisy32)]
    expected_ssim = [skimage_ssim(c, n) for c, n in zip(clean32, noisy32)]
    np.testing.assert_allclose(M.psnr(a, b).numpy(), expected_psnr, rtol=1e-5)
    np.testing.assert_allclose(M.ssim(a, b).numpy(), expected_ssim, atol=1e-5)
    # more noise, lower scores: the three photos got increasing noise
    assert np.all(np.diff(expected_psnr) < 0)


def test_psnr_and_ms_ssim_match_torchmetrics():
    tmf = pytest.importorskip("torchmetrics.functional.image")
    clean, noisy = photo_batch(192)  # 192 px: all five MS-SSIM scales (the coarsest is 12 px)
    a, b = to_torch(clean), to_torch(noisy)
    expected = tmf.peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(M.psnr(b, a), expected.float(), rtol=1e-5, atol=1e-4)
    # torchmetrics also scores the reflect-padded border that Wang et al.'s "valid" filtering (ours, skimage's)
    # leaves out; at the 12-pixel coarsest scale that moves the result by a few 1e-4.
    expected = tmf.multiscale_structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
    torch.testing.assert_close(M.ms_ssim(b, a), expected.float(), atol=1e-3, rtol=0)
    # one scale with weight 1 is plain SSIM: exact agreement with skimage
    expected_ssim = [skimage_ssim(x, y) for x, y in zip(b.permute(0, 2, 3, 1).double().numpy(),
                                                       a.permute(0, 2, 3, 1).double().numpy())]
    np.testing.assert_allclose(M.ms_ssim(b, a, weights=(1.0,)).numpy(), expected_ssim, atol=1e-5)


def skimage_ms_ssim(a: np.ndarray, b: np.ndarray, weights: tuple[float, ...]) -> float:
    """MS-SSIM of two [H, W, 3] images from skimage's SSIM: with K1 huge the luminance term is 1, leaving the
    contrast-structure term; 2x2 mean pooling between scales; weights renormalized to sum to 1."""
    w = np.asarray(weights) / np.sum(weights)
    value = 1.0
    for scale, weight in enumerate(w):
        last = scale == len(w) - 1
        kwargs = dict(channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
        term = structural_similarity(a, b, **kwargs) if last else structural_similarity(a, b, K1=1e4, **kwargs)
        value *= max(term, 0.0) ** weight
        h, w_ = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a, b = (x[:h, :w_].reshape(h // 2, 2, w_ // 2, 2, 3).mean(axis=(1, 3)) for x in (a, b))
    return value


@pytest.mark.parametrize("size, scales", [(64, 3), (192, 5)])
def test_ms_ssim_matches_a_skimage_built_reference(size, scales):
    clean, noisy = photo_batch(size)
    a, b = to_torch(clean), to_torch(noisy)
    assert M.ms_ssim_scales(size, size) == scales
    a64, b64 = (x.permute(0, 2, 3, 1).double().numpy() for x in (a, b))
    expected = [skimage_ms_ssim(x, y, M.MS_SSIM_WEIGHTS[:scales]) for x, y in zip(b64, a64)]
    np.testing.assert_allclose(M.ms_ssim(b, a).numpy(), expected, atol=1e-5)


def test_ms_ssim_scale_rule_and_small_image_error():
    assert M.ms_ssim_scales(256, 256) == 5 and M.ms_ssim_scales(32, 32) == 2 and M.ms_ssim_scales(11, 40) == 1
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ms_ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    clean, noisy = photo_batch(48)
    a = to_torch(clean)
    assert torch.isinf(M.psnr(a, a)).all() and (M.psnr(a, a) > 0).all()
    torch.testing.assert_close(M.ssim(a, a), torch.ones(3))
    torch.testing.assert_close(M.ms_ssim(a, a), torch.ones(3))
    mixed = M.summarize(M.psnr(a, torch.cat([a[:1], to_torch(noisy)[1:]])))
    assert mixed["num_infinite"] == 1 and np.isfinite(mixed["mean"]) and np.isfinite(mixed["std"])
    assert "excluded" in mixed["note"]
    exact = M.summarize(M.psnr(a, a))
    assert exact["mean"] == float("inf") and exact["std"] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        M.summarize([1.0, float("nan")])


def test_image_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 8))


# ---------------------------------------------------------------------------------------------------- unit activity


def test_unit_activity_is_variance_across_images_averaged_over_positions():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(50, 3, 4, 4, generator=g) * torch.tensor([0.0, 0.05, 1.0]).view(1, 3, 1, 1)
    means = means + torch.tensor([5.0, -2.0, 0.3]).view(1, 3, 1, 1)  # offsets must not count as activity
    expected = means.double().numpy().var(axis=0).mean(axis=(1, 2))
    np.testing.assert_allclose(M.unit_activity(means).numpy(), expected, rtol=1e-10)
    assert M.active_units(means) == 1  # variances 0, 0.0025, 1 against threshold 0.01
    assert M.active_units(means, threshold=0.001) == 2
    flat = torch.randn(30, 5, generator=g)  # [N, D]: one unit per dimension
    np.testing.assert_allclose(M.unit_activity(flat).numpy(), flat.double().numpy().var(axis=0), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------- latent statistics


def test_streamed_latent_statistics_match_one_shot_and_numpy():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(24, 4, 3, 5, generator=g) * 2 + 0.5
    logvars = torch.randn(24, 4, 3, 5, generator=g) * 0.3 - 1
    latents = means + torch.exp(0.5 * logvars) * torch.randn(means.shape, generator=g)
    stats = M.LatentStatistics(shift=True)
    for rows in (slice(0, 5), slice(5, 6), slice(6, 24)):  # uneven batches
        stats.update(DiagonalGaussian(mean=means[rows], logvar=logvars[rows]), latents[rows])
    streamed, one_shot = stats.result(), M.latent_statistics(means, logvars, latents=latents, shift=True)
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "kl_per_channel", "unit_activity"):
        np.testing.assert_allclose(streamed[key], one_shot[key], rtol=1e-9)
    z = latents.double().numpy()
    assert streamed["shift_factor"] == pytest.approx(z.mean(), rel=1e-9)
    assert streamed["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-9)
    np.testing.assert_allclose(streamed["latents_mean"], z.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(streamed["latents_std"], z.std(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(streamed["channel_std"], means.double().numpy().std(axis=(0, 2, 3)), rtol=1e-9)
    # per-channel KL: the model's own closed form, averaged over images
    kl = DiagonalGaussian(mean=means, logvar=logvars).kl_per_channel().double().mean(0)
    np.testing.assert_allclose(streamed["kl_per_channel"], kl.numpy(), rtol=1e-5)
    assert streamed["num_images"] == 24 and streamed["active_units"] == 4 and streamed["collapsed_channels"] == []
    # the kept histogram sample: `keep` latent vectors drawn from every batch, scaled like diffusion latents
    kept_stats = M.LatentStatistics(keep=100)
    for rows in (slice(0, 12), slice(12, 24)):
        kept_stats.update(DiagonalGaussian(mean=means[rows], logvar=logvars[rows]), latents[rows])
    flat = latents.movedim(1, -1).reshape(-1, 4)
    kept = kept_stats.kept_latents(2.0, 0.5) / 2.0 + 0.5
    assert kept.shape == (100, 4)
    rows = [int(torch.nonzero((flat - k).abs().max(dim=1).values < 1e-5)[0]) for k in kept]
    assert len(set(rows)) == 100 and min(rows) < len(flat) // 2 <= max(rows)
    with pytest.raises(ValueError, match="shape changed"):
        stats.update(DiagonalGaussian(mean=means[:, :, :2], logvar=logvars[:, :, :2]))


def test_measured_scaling_and_shift_normalize_a_models_latents():
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config()).eval()
    with torch.no_grad():
        model.encoder.conv_out.weight.mul_(4)  # spread the posterior means so z is far from N(0, 1) before scaling
        model.encoder.conv_out.bias.add_(0.7)
        images = torch.rand(12, 3, 32, 32) * 2 - 1
        posterior = model.encode(images)
    stats = M.LatentStatistics(seed=0, shift=True)
    stats.update(posterior)
    result = stats.result()
    model.config.scaling_factor, model.config.shift_factor = result["scaling_factor"], result["shift_factor"]
    raw = posterior.sample(torch.Generator().manual_seed(123))  # fresh samples, not the ones measured
    assert abs(raw.mean()) > 0.2 or abs(raw.std() - 1) > 0.2  # the check below is not trivially true
    scaled = model.to_diffusion_latents(raw)
    assert abs(float(scaled.mean())) < 0.05
    assert abs(float(scaled.std()) - 1) < 0.05


def test_latent_statistics_recommend_the_one_estimators_scale():
    """LatentStatistics' scaling/shift are the LatentScaleEstimator's on the same samples, convention included."""
    g = torch.Generator().manual_seed(2)
    means, logvars = torch.randn(10, 4, 3, 3, generator=g) + 1.5, torch.full((10, 4, 3, 3), -2.0)
    latents = means + 0.3 * torch.randn(means.shape, generator=g)
    by_convention = M.latent_statistics(means, logvars, latents=latents)  # 4 channels: no shift
    estimator = M.LatentScaleEstimator(shift=False)
    estimator.update(latents)
    assert by_convention["shift_factor"] is None
    assert by_convention["scaling_factor"] == estimator.result().scaling_factor


# ---------------------------------------------------------------------------------------------------- latent scale


def constructed_latents(std: float, mean: float, channels: int = 4, n: int = 40, seed: int = 0) -> torch.Tensor:
    """Latents [n, C, 6, 5] with per-channel offsets around `mean` (so pooling matters), overall std about `std`."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-0.5, 0.5, channels).view(1, channels, 1, 1) * std
    return mean + offsets + std * torch.randn(n, channels, 6, 5, generator=g)


@pytest.mark.parametrize("shift", [True, False])
def test_latent_scale_estimator_matches_numpy_on_uneven_batches(shift):
    z = constructed_latents(std=3.0, mean=-7.0)
    estimator = M.LatentScaleEstimator(shift=shift)
    for rows in (slice(0, 1), slice(1, 17), slice(17, 40)):
        estimator.update(z[rows])
    result = estimator.result()
    reference = z.double().numpy()
    assert result.num_images == 40
    # std around the mean (ddof 0) in both cases: the shift only decides whether the mean is reported
    assert result.scaling_factor == pytest.approx(1 / reference.std(), rel=1e-10)
    offsets = np.linspace(-0.5, 0.5, 4) * 3.0  # pooled std: sqrt(noise variance + variance of channel offsets)
    assert result.scaling_factor == pytest.approx(1 / np.sqrt(9.0 + offsets.var()), rel=0.05)
    if shift:
        assert result.shift_factor == pytest.approx(reference.mean(), rel=1e-10)
        assert result.shift_factor == pytest.approx(-7.0, abs=0.1)
    else:
        assert result.shift_factor is None
    assert isinstance(result, M.LatentScale)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.scaling_factor = 1.0


def test_latent_scale_estimator_is_exact_for_a_large_offset_and_rejects_bad_input():
    # mean 1e4, std 1e-2: a naive float64 sum of squares would lose the variance; the pooled update does not
    z = constructed_latents(std=1e-2, mean=1e4)
    estimator = M.LatentScaleEstimator(shift=True)
    estimator.update(z[:7].double())
    estimator.update(z[7:].double())
    assert estimator.result().scaling_factor == pytest.approx(1 / z.double().numpy().std(), rel=1e-6)
    with pytest.raises(ValueError, match="before any update"):
        M.LatentScaleEstimator(shift=False).result()
    with pytest.raises(ValueError, match="channels changed"):
        estimator.update(torch.zeros(2, 3, 6, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.LatentScaleEstimator(shift=False).update(torch.tensor([[[[float("nan")]]]]))
    constant = M.LatentScaleEstimator(shift=False)
    constant.update(torch.ones(2, 4, 3, 3))
    with pytest.raises(ValueError, match="all 72 latent values are equal"):
        constant.result()


def test_uses_shift_follows_the_sd3_flux_convention_unless_told():
    assert not M.uses_shift(4, None) and M.uses_shift(16, None) and M.uses_shift(32, None)
    assert M.uses_shift(4, True) and not M.uses_shift(16, False)


def scale_test_model() -> KLAutoencoder:
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config()).eval()
    with torch.no_grad():
        model.encoder.conv_out.weight.mul_(4)  # latents far from N(0, 1) before scaling
        model.encoder.conv_out.bias.add_(0.7)
    return model


def random_crops(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` random `size`-px crops of three photos, in [-1, 1]: one image distribution, any number of draws."""
    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - size), rng.integers(photo.shape[1] - size)
        crops.append(photo[top:top + size, left:left + size])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_estimate_latent_scale_equals_the_estimator_on_the_same_samples_and_stops_at_num_images():
    model = scale_test_model()
    images = random_crops(12, 32, seed=0)
    pulled = []

    def batches():
        for rows in (slice(0, 4), slice(4, 8), slice(8, 12)):
            pulled.append(rows)
            yield images[rows]

    model.train()
    result = M.estimate_latent_scale(model, batches(), num_images=6, generator=torch.Generator().manual_seed(3))
    assert model.training  # mode restored
    assert len(pulled) == 2 and result.num_images == 6  # the third batch was never read
    # reference: the same batches (4 + the first 2 of the next), the same generator, numpy statistics
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.eval()
        z = torch.cat([model.encode(images[:4]).sample(g), model.encode(images[4:6]).sample(g)]).double().numpy()
    assert result.scaling_factor == pytest.approx(1 / z.std(), rel=1e-6)
    assert result.shift_factor is None  # 4 channels: no shift by convention
    shifted = M.estimate_latent_scale(model, [images], shift=True, num_images=6,
                                      generator=torch.Generator().manual_seed(3))
    assert shifted.shift_factor == pytest.approx(float(z.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="no images"):
        M.estimate_latent_scale(model, [], num_images=4)
    with pytest.raises(TypeError, match="image tensors"):
        M.estimate_latent_scale(model, [{"pixel_values": images}])


@pytest.mark.parametrize("shift", [True, False])
def test_estimated_scale_gives_unit_std_on_held_out_images(shift):
    model = scale_test_model()
    measured_on = random_crops(64, 32, seed=1)
    held_out = random_crops(64, 32, seed=2)
    scale = M.estimate_latent_scale(model, measured_on.split(16), shift=shift,
                                    generator=torch.Generator().manual_seed(0))
    assert scale.num_images == 64
    model.config.scaling_factor = scale.scaling_factor
    model.config.shift_factor = scale.shift_factor
    with torch.no_grad():
        raw = model.encode(held_out).sample(torch.Generator().manual_seed(9))
    assert abs(float(raw.std()) - 1) > 0.2  # the check below is not trivially true
    scaled = model.to_diffusion_latents(raw)
    assert abs(float(scaled.std()) - 1) < 0.05
    if shift:
        assert abs(float(scaled.mean())) < 0.05


# ---------------------------------------------------------------------------------------------------- LPIPS, rFID


def test_lpips_metric_matches_lpips_package_on_same_weights():
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    network = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    reference = copy.deepcopy(network).eval()
    clean, noisy = photo_batch(64)
    a, b = to_torch(clean), to_torch(noisy)
    metric = M.LPIPSMetric("alex", network=network)
    assert metric.available and metric.reason is None
    distances = metric(a, b)
    with torch.no_grad():
        expected = reference(a * 2 - 1, b * 2 - 1).flatten()
    assert distances.shape == (3,)
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-6)
    assert float(metric(a, a).abs().max()) < 1e-6


def test_lpips_and_rfid_report_a_reason_instead_of_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    for net, filename in M.TORCHVISION_BACKBONE_FILES.items():
        metric = M.LPIPSMetric(net)
        assert not metric.available and filename in metric.reason and str(tmp_path) in metric.reason
        with pytest.raises(RuntimeError, match="unavailable"):
            metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    fid = M.FIDMetric()
    assert not fid.available
    assert "torch-fidelity" in fid.reason or M.INCEPTION_FID_FILE in fid.reason


class PooledFeatures(torch.nn.Module):
    """A fixed, tiny feature extractor: 2x2 average colour -> 12 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_rfid_with_injected_features_matches_closed_form():
    pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 16, 16, generator=g)
    fake = (real * 0.8 + 0.15 * torch.rand(40, 3, 16, 16, generator=g)).clamp(0, 1)
    fid = M.FIDMetric(feature=PooledFeatures())
    for rows in (slice(0, 16), slice(16, 40)):
        fid.update(real[rows], fake[rows])
    features = PooledFeatures()
    expected = frechet_distance(features(real).double().numpy(), features(fake).double().numpy())
    assert fid.compute() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert expected > 1e-3


def test_colour_error_is_the_mean_rgb_difference():
    from kl_autoencoder.metrics import colour_error

    rng = np.random.default_rng(3)
    a, b = rng.random((2, 3, 8, 6)), rng.random((2, 3, 8, 6))
    expected = [np.abs(a[i].reshape(3, -1).mean(1) - b[i].reshape(3, -1).mean(1)).mean() for i in range(2)]
    got = colour_error(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    # a pure colour cast: every pixel off by (0.1, 0, -0.05) gives 0.05; any rearrangement of pixels gives 0
    x = torch.rand(1, 3, 8, 8)
    cast = x + torch.tensor([0.1, 0.0, -0.05]).view(1, 3, 1, 1)
    assert colour_error(cast, x).item() == pytest.approx(0.05, abs=1e-6)
    assert colour_error(x.flip(-1).roll(3, -2), x).item() == pytest.approx(0.0, abs=1e-6)
