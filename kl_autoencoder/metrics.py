"""Reconstruction metrics for a KL autoencoder (and, re-exported, its latent-space metrics).

Image metrics take batches in [0, 1] of shape [N, C, H, W] and return one value per image ([N]):

* `psnr`     10 log10(R^2 / MSE); exactly equal images give +inf (see `summarize` for how that is reported).
* `ssim`     Wang et al. 2004: 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances,
             computed per channel on the "valid" region and averaged over channels and pixels. This is
             skimage's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
             channel_axis=...)`.
* `ms_ssim`  Wang et al. 2003: contrast-structure at every scale, luminance only at the coarsest, 2x2 average
             pooling between scales, the standard five weights; negative terms clamped at 0 (as torchmetrics'
             default `normalize="relu"`), otherwise a fractional power of a negative number is NaN.

Perceptual and distribution metrics need pretrained networks that cannot be downloaded here, so they are
objects that either work or say why not: `LPIPSMetric` (the `lpips` package on top of torchvision's ImageNet
VGG16 / AlexNet) and `FIDMetric` (torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception). Neither
ever produces a number from random weights unless a test forces a network in.

The latent-space metrics (unit activity, the streamed `LatentStatistics`, the one latent-scale estimator and its
convention) live in latent_metrics.py; every name is importable from here too.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kl_autoencoder.backbones import hub_checkpoint, inception_weights_copy, load_lpips_backbone  # noqa: F401
from kl_autoencoder.latent_metrics import (  # noqa: F401  (re-exported: their public home until now)
    LATENT_STATISTICS_DOC, SHIFT_MIN_CHANNELS, LatentScale, LatentScaleEstimator, LatentStatistics, Posterior,
    PosteriorMoments, active_units, estimate_latent_scale, latent_statistics, unit_activity, uses_shift,
)

# --------------------------------------------------------------------------------------------------------------------
# PSNR, SSIM, MS-SSIM.

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected image batches [N, C, H, W], got shape {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: [N]. Identical images give +inf."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()  # mse == 0 -> +inf, by IEEE division


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian taps centred on the middle one (scipy's gaussian_filter with the same radius)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over H and W of [N, C, H, W], valid region only (no padding)."""
    c = x.shape[1]
    k = taps.to(x)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def _ssim_maps(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSIM map and the contrast-structure map, both over the valid region: [N, C, H - 10, W - 10]."""
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(a.shape[-2:])}")
    a, b = a.double(), b.double()
    taps = gaussian_window()
    mu_a, mu_b = _blur(a, taps), _blur(b, taps)
    var_a = _blur(a * a, taps) - mu_a**2
    var_b = _blur(b * b, taps) - mu_b**2
    cov = _blur(a * b, taps) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return luminance * cs, cs


def colour_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean colour error per image: |mean RGB of a - mean RGB of b|, averaged over the channels: [N].

    In the images' own range (0-1 for `to_unit_range` images). A compressor that drops colour keeps the shapes and
    scores a decent PSNR, but a green leaf comes back sepia: this is the number that shows it."""
    _check_pair(a, b)
    return (a.double().mean(dim=(2, 3)) - b.double().mean(dim=(2, 3))).abs().mean(dim=1).float()


# Local colour: CIE Lab ΔE per pixel and the hue error on saturated pixels. A leaf that turns brown in patches keeps a
# good mean RGB, and a latent that carries one chroma axis of two passes PSNR on photos along that axis: these see it.
# sRGB (IEC 61966-2-1, D65) -> XYZ -> CIE Lab with the D65 2° white, the constants scikit-image's rgb2lab uses.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)
HUE_MIN_SATURATION = 0.3  # pixels greyer than this have no hue worth scoring


def srgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """sRGB images in [0, 1], [N, 3, H, W] -> CIE Lab (L in 0..100), float64, [N, 3, H, W]."""
    rgb = images.double().clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64, device=images.device)
    white = torch.tensor(_D65_WHITE, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def delta_e76(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIE 1976 colour difference per pixel: the Euclidean distance in Lab, [N, 3, H, W] -> [N, H, W]."""
    return (lab1 - lab2).pow(2).sum(dim=1).sqrt()


def delta_e2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference per pixel (kL = kC = kH = 1), [N, 3, H, W] Lab -> [N, H, W].

    The formula as Sharma, Wu and Dalal (2005) state it; about 1 is a just-noticeable difference."""
    (l1, a1, b1), (l2, a2, b2) = lab1.double().unbind(1), lab2.double().unbind(1)
    c_bar7 = ((a1.hypot(b1) + a2.hypot(b2)) / 2) ** 7
    g = 0.5 * (1 - (c_bar7 / (c_bar7 + 25.0**7)).sqrt())
    a1, a2 = a1 * (1 + g), a2 * (1 + g)
    c1, c2 = a1.hypot(b1), a2.hypot(b2)
    h1, h2 = torch.atan2(b1, a1) % (2 * math.pi), torch.atan2(b2, a2) % (2 * math.pi)
    chroma_zero = (c1 * c2) == 0
    dh = h2 - h1
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(chroma_zero, torch.zeros_like(dh), dh)
    d_hue = 2 * (c1 * c2).sqrt() * torch.sin(dh / 2)
    h_sum = h1 + h2
    h_bar = torch.where((h1 - h2).abs() <= math.pi, h_sum / 2,
                        torch.where(h_sum < 2 * math.pi, (h_sum + 2 * math.pi) / 2, (h_sum - 2 * math.pi) / 2))
    h_bar = torch.where(chroma_zero, h_sum, h_bar)
    deg = math.pi / 180
    t = (1 - 0.17 * torch.cos(h_bar - 30 * deg) + 0.24 * torch.cos(2 * h_bar) + 0.32 * torch.cos(3 * h_bar + 6 * deg)
         - 0.20 * torch.cos(4 * h_bar - 63 * deg))
    l_bar50, c_bar = ((l1 + l2) / 2 - 50) ** 2, (c1 + c2) / 2
    s_l = 1 + 0.015 * l_bar50 / (20 + l_bar50).sqrt()
    s_c, s_h = 1 + 0.045 * c_bar, 1 + 0.015 * c_bar * t
    rotation = -torch.sin(2 * 30 * deg * torch.exp(-(((h_bar / deg - 275) / 25) ** 2))) * 2 * (
        c_bar**7 / (c_bar**7 + 25.0**7)).sqrt()
    dl, dc, dhh = (l2 - l1) / s_l, (c2 - c1) / s_c, d_hue / s_h
    return (dl**2 + dc**2 + dhh**2 + rotation * dc * dhh).clamp(min=0).sqrt()


def delta_e(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 difference per image between sRGB batches in [0, 1]: [N]. Local, unlike `colour_error`."""
    _check_pair(a, b)
    return delta_e2000(srgb_to_lab(a), srgb_to_lab(b)).flatten(1).mean(dim=1).float()


def hue_saturation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV hue (degrees, 0..360; 0 where the pixel is grey) and saturation (0..1) of [N, 3, H, W] in [0, 1]."""
    x = images.double().clamp(0, 1)
    r, g, b = x.unbind(1)
    high, low = x.max(dim=1).values, x.min(dim=1).values
    spread = high - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(spread > 0, hue * 60, torch.zeros_like(hue))
    saturation = torch.where(high > 0, spread / torch.where(high > 0, high, torch.ones_like(high)),
                             torch.zeros_like(high))
    return hue, saturation


def hue_error(a: torch.Tensor, b: torch.Tensor, min_saturation: float = HUE_MIN_SATURATION) -> torch.Tensor:
    """Mean hue difference per image (degrees, 0..180, around the circle) between `a` (reconstruction) and `b`
    (original), over the pixels whose saturation in `b` is above `min_saturation`: [N]; NaN for an image without
    such pixels. A latent that drops a chroma axis turns greens and blues orange or cyan: this is the number."""
    _check_pair(a, b)
    hue_a, _ = hue_saturation(a)
    hue_b, saturation = hue_saturation(b)
    difference = (hue_a - hue_b).abs()
    difference = torch.minimum(difference, 360 - difference)
    mask = (saturation > min_saturation).flatten(1)
    count = mask.sum(dim=1)
    total = (difference.flatten(1) * mask).sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan"))).float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, averaged over channels and pixels: [N]. Identical images give 1."""
    _check_pair(a, b)
    ssim_map, _ = _ssim_maps(a, b, data_range)
    return ssim_map.flatten(1).mean(dim=1).float()


def ms_ssim_scales(height: int, width: int, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales fit: the coarsest image (side // 2^(scales-1)) must still hold an 11-pixel window.

    256 px and up get the standard 5 scales (the coarsest is 16 px); 64 px gets 3; below 11 px it is an error.
    """
    side = min(height, width)
    if side < SSIM_WINDOW:
        raise ValueError(f"MS-SSIM needs images at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    scales = 1
    while scales < max_scales and side // 2**scales >= SSIM_WINDOW:
        scales += 1
    return scales


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0,
            weights: tuple[float, ...] = MS_SSIM_WEIGHTS) -> torch.Tensor:
    """Multi-scale SSIM per image: [N].

    Images too small for all scales (below 176 px for five) use the first `ms_ssim_scales(H, W)` weights,
    renormalized to sum to 1, so the value stays in [0, 1] and comparable in spirit; the report says so.
    """
    _check_pair(a, b)
    scales = ms_ssim_scales(*a.shape[-2:], max_scales=len(weights))
    w = torch.tensor(weights[:scales], dtype=torch.float64)
    w = w / w.sum()
    terms = []
    a, b = a.double(), b.double()
    for scale in range(scales):
        ssim_map, cs = _ssim_maps(a, b, data_range)
        value = ssim_map if scale == scales - 1 else cs
        terms.append(value.flatten(1).mean(dim=1).clamp_min(0.0))
        if scale < scales - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(terms, dim=1)  # [N, scales]
    return torch.prod(stacked ** w.to(stacked), dim=1).float()


def summarize(values: torch.Tensor | list[float]) -> dict[str, Any]:
    """{"mean", "std"} of per-image values, never NaN.

    Infinite values (PSNR of an exact reconstruction) are counted in "num_infinite" and left out of mean/std, with a
    note; if every value is infinite the mean is +inf. Standard deviation is the population one (ddof 0).
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("cannot summarize an empty list of values")
    if torch.isnan(v).any():
        raise ValueError(f"{int(torch.isnan(v).sum())} of {v.numel()} values are NaN")
    finite = v[torch.isfinite(v)]
    out: dict[str, Any] = {}
    if finite.numel():
        out["mean"] = float(finite.mean())
        out["std"] = float(finite.std(correction=0))
    else:
        out["mean"] = float(v[0])  # all +inf (or all -inf)
        out["std"] = 0.0
    infinite = v.numel() - finite.numel()
    if infinite:
        out["num_infinite"] = infinite
        out["note"] = (f"{infinite} of {v.numel()} values are infinite (exact reconstruction)"
                       + (", excluded from mean/std" if finite.numel() else ""))
    return out




# --------------------------------------------------------------------------------------------------------------------
# Pretrained-network metrics: they work offline only when the weights are already in the torch hub cache.

TORCHVISION_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
INCEPTION_FID_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception (TF port)
# Both are read through backbones.py (weights_only=True): a cached file that is not plain tensors is refused there.


class LPIPSMetric:
    """LPIPS distance per image with the `lpips` package on torchvision's ImageNet backbone.

    `available` is False, with `reason`, when the backbone weights are not cached (nothing is downloaded: a random
    backbone would give a meaningless number). `network` forces an `lpips.LPIPS` in; tests use that to compare
    against the package with `pnet_rand=True`.
    """

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", network: torch.nn.Module | None = None):
        if net not in TORCHVISION_BACKBONE_FILES:
            raise ValueError(f"LPIPS net must be one of {sorted(TORCHVISION_BACKBONE_FILES)}, got {net!r}")
        self.net = net
        self.network = network
        self.reason: str | None = None
        if network is None:
            weights = hub_checkpoint(TORCHVISION_BACKBONE_FILES[net])
            if not weights.is_file():
                self.reason = (f"LPIPS needs the pretrained torchvision {net} backbone: {weights} is missing "
                               f"(copy it there from a machine with internet access)")
                return
            import lpips

            # pnet_rand: lpips' own path unpickles the cached file with weights_only=False; backbones.py reads it
            # with weights_only=True and refuses (one line, BackboneWeightsError) a file that is not plain tensors.
            with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' notes from inside lpips
                warnings.simplefilter("ignore", UserWarning)
                self.network = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
            load_lpips_backbone(self.network, net, download=False)
        self.network = self.network.to(device).eval().requires_grad_(False)

    @property
    def available(self) -> bool:
        return self.network is not None

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image for images in [0, 1]: [N]."""
        if self.network is None:
            raise RuntimeError(f"LPIPS is unavailable: {self.reason}")
        _check_pair(a, b)
        device = next(self.network.parameters()).device
        a, b = a.to(device).float() * 2 - 1, b.to(device).float() * 2 - 1
        return self.network(a, b).flatten().cpu()


def _torch_fidelity_available() -> bool:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False
    return True


class FIDMetric:
    """Reconstruction FID (rFID): Frechet distance between Inception features of originals and reconstructions.

    Uses torchmetrics' FrechetInceptionDistance with torch-fidelity's FID Inception (the `[eval]` extra)
    and its weights from the torch hub cache; otherwise `available` is False with a `reason`. `feature` forces a
    feature extractor in (a module mapping [N, 3, H, W] floats in [0, 1] to [N, D]; tests only).
    With few images rFID is biased upwards and noisy: compare models on the same image set only.
    """

    def __init__(self, device: str | torch.device = "cpu", feature: torch.nn.Module | None = None):
        self.reason: str | None = None
        self.metric = None
        if feature is None:
            weights = hub_checkpoint(INCEPTION_FID_FILE)
            if not _torch_fidelity_available():
                self.reason = ("rFID needs torch-fidelity, which is not installed: install the project's eval extra "
                               "(pip install -e \".[eval]\" in the checkout: torchmetrics + torch-fidelity)")
                return
            if not weights.is_file():
                self.reason = (f"rFID needs torch-fidelity's Inception weights: {weights} is missing "
                               f"(copy it there from a machine with internet access)")
                return
        from torchmetrics.image.fid import FrechetInceptionDistance  # slow import: only when it will be used

        if feature is None:
            with tempfile.TemporaryDirectory() as folder:  # torch-fidelity unpickles this copy: tensors we wrote
                self.metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                                       feature_extractor_weights_path=str(inception_weights_copy(
                                                           Path(folder))))
        else:
            self.metric = FrechetInceptionDistance(feature=feature, normalize=True)
        self.metric = self.metric.to(device)

    @property
    def available(self) -> bool:
        return self.metric is not None

    @torch.no_grad()
    def update(self, real: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Add a batch of originals and their reconstructions, both in [0, 1]."""
        if self.metric is None:
            raise RuntimeError(f"rFID is unavailable: {self.reason}")
        device = self.metric.device
        self.metric.update(real.to(device).float(), real=True)
        self.metric.update(reconstruction.to(device).float(), real=False)

    def compute(self) -> float:
        if self.metric is None:
            raise RuntimeError(f"rFID is unavailable: {self.reason}")
        return float(self.metric.compute())


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] metric space, clamped (decoders overshoot a little)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


__all__ = [
    "psnr", "ssim", "ms_ssim", "ms_ssim_scales", "summarize", "unit_activity", "active_units",
    "LatentScale", "LatentScaleEstimator", "uses_shift", "estimate_latent_scale", "LatentStatistics", "latent_statistics", "LATENT_STATISTICS_DOC", "LPIPSMetric", "FIDMetric",
    "hub_checkpoint", "to_unit_range", "gaussian_window",
]
