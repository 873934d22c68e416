"""Diffusability: how easy a VAE's latents are for a diffusion model to learn, and the EQ-VAE objective.

Reconstruction is half of a pre-compressor's job; the other half is how well a diffusion model learns its latents.
Three measures and one training objective:

* Spectrum. `power_spectrum_2d` / `radial_power_spectrum`: the radially averaged power spectrum of [B, C, H, W]
  maps (each map's mean removed, averaged over batch and channels; frequency in cycles per pixel of the map's own
  grid, so Nyquist is 0.5 for latents and images alike). `high_frequency_share`: the share of the energy above
  `cutoff` = 0.25 cycles/pixel (half the Nyquist frequency), radially. Latents with more high-frequency energy than
  their images are harder to diffuse ("Improving the diffusability of autoencoders", Skorokhodov et al. 2025).
* Equivariance. `Transform` (downscale by an integer factor with area averaging, quarter turns, flips) applied alike
  to the image x and its latent z; `equivariance_loss(model, x, z, T)` = pixel_loss(decode(T(z)), T(x)) is EQ-VAE's
  objective (Kouzelis et al. 2025), differentiable; `equivariance_psnr` is the same comparison as PSNR in dB.
* Probe. `diffusability_probe` (diffusion_probe.py, re-exported here): train a small latent diffusion model on the
  VAE's latents for a fixed budget and report its held-out denoising loss. Lower is easier to diffuse.

`diffusability_metrics` gathers the cheap measures (spectra and equivariance) for the evaluation report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from kl_autoencoder.diffusion_probe import (  # noqa: F401  (re-exported: their public home until now)
    ProbeConfig, build_probe_unet, denoising_loss, diffusability_probe, encode_means, probe_pixels, random_crops,
    sample_photo_crops, train_denoiser,
)
from kl_autoencoder.losses import pixel_loss
from kl_autoencoder.metrics import psnr, summarize, to_unit_range

HIGH_FREQUENCY_CUTOFF = 0.25  # cycles/pixel: half the Nyquist frequency

# --------------------------------------------------------------------------------------------------------------------
# Spectrum.


def _check_maps(x: torch.Tensor, what: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a batch of maps [B, C, H, W], got shape {tuple(x.shape)}")


def frequency_radius(height: int, width: int) -> torch.Tensor:
    """|f| in cycles per pixel for each entry of an unshifted [H, W] FFT (0 at DC, 0.5 at Nyquist on an axis)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def power_spectrum_2d(x: torch.Tensor) -> torch.Tensor:
    """Power per 2-D frequency of [B, C, H, W] maps, averaged over batch and channels: [H, W], float64, unshifted.

    Each map's own mean is removed first (no DC energy). Normalised by Parseval so the entries of one map sum to its
    population variance: the result sums to the mean variance of the maps.
    """
    _check_maps(x)
    x = x.detach().double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    height, width = x.shape[-2:]
    power = torch.fft.fft2(x).abs().pow(2) / (height * width) ** 2
    return power.mean(dim=(0, 1))


def radial_average(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially average an [H, W] power spectrum: (frequencies k / n, mean power per ring) for k = 1 .. n // 2.

    n = min(H, W); ring k holds the frequencies with round(|f| * n) = k. Corners beyond Nyquist (|f| > 0.5) are
    left out of the profile (they still count in `high_frequency_share`).
    """
    n = min(power.shape)
    if n < 2:
        raise ValueError(f"a radial spectrum needs maps of at least 2x2, got {tuple(power.shape)}")
    rings = torch.round(frequency_radius(*power.shape) * n).long().flatten()
    last = n // 2
    keep = rings <= last
    totals = torch.bincount(rings[keep], weights=power.flatten()[keep], minlength=last + 1)
    counts = torch.bincount(rings[keep], minlength=last + 1).clamp_min(1)
    frequencies = torch.arange(last + 1, dtype=torch.float64) / n
    return frequencies[1:], (totals / counts)[1:]


def radial_power_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequencies in cycles/pixel up to 0.5, radially averaged power) of [B, C, H, W] maps; see `radial_average`."""
    return radial_average(power_spectrum_2d(x))


def high_frequency_share_of(power: torch.Tensor, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> float:
    """Share of an [H, W] power spectrum's energy at |f| > `cutoff` cycles/pixel; 0.0 when there is no energy."""
    total = power.sum()
    if total <= 0:
        return 0.0  # constant maps: no structure at any frequency, none of it high
    return float(power[frequency_radius(*power.shape) > cutoff].sum() / total)


def high_frequency_share(x: torch.Tensor, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> float:
    """Share of the spectral energy of [B, C, H, W] maps above `cutoff` (default: half Nyquist), means removed.

    White noise gives about the area of the band |f| > cutoff in the unit frequency square (1 - pi/16 = 0.80 at 0.25);
    smooth maps give much less.
    """
    return high_frequency_share_of(power_spectrum_2d(x), cutoff)


def spectrum_summary(power: torch.Tensor, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> dict[str, Any]:
    """JSON-ready spectrum of an [H, W] power map: high-frequency share and the radial profile relative to white noise.

    `relative_power` is the ring's mean power times H * W over the total: white noise gives 1 in every ring, so
    profiles of maps of different sizes (a latent and its image) share one axis.
    """
    frequencies, ring_power = radial_average(power)
    total = float(power.sum())
    relative = ring_power * power.numel() / total if total > 0 else torch.zeros_like(ring_power)
    return {"high_frequency_share": high_frequency_share_of(power, cutoff), "cutoff": cutoff,
            "frequencies": frequencies.tolist(), "relative_power": relative.tolist()}


# --------------------------------------------------------------------------------------------------------------------
# Equivariance.

TRANSFORM_KINDS = ("scale", "rotate", "flip")


@dataclass(frozen=True)
class Transform:
    """One geometric transform of [B, C, H, W] maps, applied alike to images and latents.

    kind "scale": downscale by the integer `amount` with area averaging (an antialiasing box filter; exact for
    integer factors); "rotate": `amount` quarter turns counter-clockwise; "flip": `amount` -1 mirrors left-right,
    -2 top-bottom.
    """

    kind: str
    amount: int = 1

    def __post_init__(self) -> None:
        valid = {"scale": lambda a: a >= 2, "rotate": lambda a: a in (1, 2, 3), "flip": lambda a: a in (-1, -2)}
        if self.kind not in valid:
            raise ValueError(f"unknown transform kind {self.kind!r}; expected one of {', '.join(TRANSFORM_KINDS)}")
        if not isinstance(self.amount, int) or not valid[self.kind](self.amount):
            expected = {"scale": "an integer factor >= 2", "rotate": "1, 2 or 3 quarter turns",
                        "flip": "-1 (left-right) or -2 (top-bottom)"}[self.kind]
            raise ValueError(f"transform {self.kind!r}: amount must be {expected}, got {self.amount!r}")

    @property
    def name(self) -> str:
        if self.kind == "scale":
            return f"scale_1/{self.amount}"
        if self.kind == "rotate":
            return f"rotate_{90 * self.amount}"
        return "flip_lr" if self.amount == -1 else "flip_tb"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_maps(x, self.name)
        if self.kind == "scale":
            if x.shape[-2] % self.amount or x.shape[-1] % self.amount:
                raise ValueError(f"{self.name}: map size {tuple(x.shape[-2:])} is not divisible by {self.amount}")
            return F.avg_pool2d(x, self.amount)
        if self.kind == "rotate":
            return torch.rot90(x, self.amount, dims=(-2, -1))
        return torch.flip(x, dims=(self.amount,))


# What evaluation reports: the downscale x2 and 90-degree rotation, plus x4 and a flip.
EVAL_TRANSFORMS = (Transform("scale", 2), Transform("scale", 4), Transform("rotate", 1), Transform("flip", -1))


def random_transform(generator: torch.Generator, kinds: Sequence[str] = TRANSFORM_KINDS,
                     scales: Sequence[int] = (2, 4)) -> Transform:
    """A transform drawn with `generator`: a kind uniformly from `kinds`, then its amount uniformly (a factor from
    `scales`, 1-3 quarter turns, either flip axis)."""
    if not kinds:
        raise ValueError("random_transform: kinds is empty")
    for kind in kinds:
        if kind not in TRANSFORM_KINDS:
            raise ValueError(f"random_transform: unknown kind {kind!r}; expected some of {', '.join(TRANSFORM_KINDS)}")
    if "scale" in kinds and not scales:
        raise ValueError("random_transform: kind 'scale' needs at least one factor in scales")

    def pick(options: Sequence[Any]) -> Any:
        return options[int(torch.randint(len(options), (), generator=generator))]

    kind = pick(list(kinds))
    amount = {"scale": lambda: pick(list(scales)), "rotate": lambda: pick([1, 2, 3]),
              "flip": lambda: pick([-1, -2])}[kind]()
    return Transform(kind, int(amount))


def equivariance_loss(model, x: torch.Tensor, z: torch.Tensor, transform: Transform, kind: str = "l1"
                      ) -> torch.Tensor:
    """EQ-VAE's objective: pixel_loss(decode(T(z)), T(x)), differentiable in the decoder and in z.

    `x`: images in [-1, 1] [B, 3, H, W]; `z`: their latents [B, C, h, w] (a posterior sample or mean, unscaled,
    as the decoder takes them); `kind`: "l1" or "l2" (losses.pixel_loss).
    """
    return pixel_loss(model.decode(transform(z)), transform(x), kind=kind)


def equivariance_psnr(model, x: torch.Tensor, z: torch.Tensor, transform: Transform) -> torch.Tensor:
    """PSNR in dB per image ([B]) of decode(T(z)) against T(x), both mapped to [0, 1]."""
    with torch.no_grad():
        decoded = model.decode(transform(z))
    return psnr(to_unit_range(decoded), to_unit_range(transform(x))).cpu()


def transform_fits(transform: Transform, image_size: tuple[int, int], factor: int) -> bool:
    """Whether `transform` applies to images of `image_size` and to their latents (downsampling `factor`)."""
    if transform.kind != "scale":
        return True
    h, w = image_size
    return h % (factor * transform.amount) == 0 and w % (factor * transform.amount) == 0


@torch.no_grad()
def diffusability_metrics(model, images: torch.Tensor, batch_size: int = 8, device: torch.device | str = "cpu",
                          transforms: Sequence[Transform] = EVAL_TRANSFORMS,
                          cutoff: float = HIGH_FREQUENCY_CUTOFF) -> dict[str, Any]:
    """The cheap diffusability measures of `model` on `images` ([N, 3, H, W] in [-1, 1]), for metrics.json.

    "spectrum": the latent's (posterior mean) and the image's spectrum summaries side by side;
    "equivariance_psnr": {transform name: mean ± std over images} of decode(T(mu)) against T(x);
    "equivariance_skipped": {transform name: why} for transforms the image size does not allow.
    """
    device = torch.device(device)
    factor = model.config.downsampling_factor
    usable = [t for t in transforms if transform_fits(t, tuple(images.shape[-2:]), factor)]
    skipped = {t.name: f"image size {tuple(images.shape[-2:])} is not divisible by {factor} x {t.amount}"
               for t in transforms if t not in usable}
    latent_power = image_power = None
    scores: dict[str, list[torch.Tensor]] = {t.name: [] for t in usable}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float()
        z = model.encode(x).mode()
        weight = len(x) / len(images)
        latent_power = _accumulate(latent_power, power_spectrum_2d(z.float()) * weight)
        image_power = _accumulate(image_power, power_spectrum_2d(x) * weight)
        for t in usable:
            scores[t.name].append(equivariance_psnr(model, x, z, t))
    return {
        "spectrum": {"latent": spectrum_summary(latent_power.cpu(), cutoff),
                     "image": spectrum_summary(image_power.cpu(), cutoff)},
        "equivariance_psnr": {name: summarize(torch.cat(values)) for name, values in scores.items()},
        "equivariance_skipped": skipped,
    }


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def plot_spectra(entries: dict[str, dict[str, Any]], title: str = "radially averaged power spectra"):
    """One figure: each model's latent spectrum and the image spectrum, relative to white noise, log scale.

    `entries`: {model name: diffusability_metrics result}. The image curve is drawn once per distinct image set.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display: never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn_images = []
    for name, entry in entries.items():
        latent, image = entry["spectrum"]["latent"], entry["spectrum"]["image"]
        ax.plot(latent["frequencies"], latent["relative_power"], lw=1.5,
                label=f"{name} latent (HF share {latent['high_frequency_share']:.3f})")
        if image["relative_power"] not in drawn_images:
            drawn_images.append(image["relative_power"])
            ax.plot(image["frequencies"], image["relative_power"], "k--", lw=1,
                    label=f"image (HF share {image['high_frequency_share']:.3f})")
    cutoff = next(iter(entries.values()))["spectrum"]["latent"]["cutoff"]
    ax.axvline(cutoff, color="grey", lw=0.8, ls=":")
    ax.text(cutoff, 0.98, " half Nyquist", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="grey")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlim(0, 0.5)
    ax.set_xlabel("frequency (cycles per pixel of each grid; Nyquist 0.5)")
    ax.set_ylabel("power relative to white noise")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def report_lines(models: dict[str, dict[str, Any]], picture: str | None = None) -> list[str]:
    """report.md's diffusability section: {model name: metrics.json entry with a "diffusability" key}; `picture`:
    the spectra plot's path relative to the report."""
    names = [m for m in models if models[m].get("diffusability")]
    if not names:
        return []
    entries = {m: models[m]["diffusability"] for m in names}
    lines = ["## Diffusability", "",
             "How easy the latents are for a diffusion model (kl_autoencoder/diffusability.py). High-frequency share: "
             f"spectral energy above {HIGH_FREQUENCY_CUTOFF} cycles/pixel (half Nyquist) of the posterior mean and of "
             "the image, each on its own grid (white noise: 0.80). Equivariance: PSNR of decode(T(z)) against T(x).",
             "", "| measure | " + " | ".join(f"`{m}`" for m in names) + " |", "|---|" + "---|" * len(names)]
    for part in ("latent", "image"):
        lines.append(f"| high-frequency share, {part} ↓ | " + " | ".join(
            f"{entries[m]['spectrum'][part]['high_frequency_share']:.3f}" for m in names) + " |")
    transforms = list(dict.fromkeys(t for m in names for t in entries[m]["equivariance_psnr"]))
    for t in transforms:
        values = [entries[m]["equivariance_psnr"].get(t) for m in names]
        lines.append(f"| equivariance PSNR {t} (dB) ↑ | " + " | ".join(
            "n/a" if v is None else f"{v['mean']:.2f} ± {v['std']:.2g}" for v in values) + " |")
    probes = {m: entries[m].get("probe") for m in names}
    if any(probes.values()):
        timesteps = list(next(p for p in probes.values() if p)["heldout_loss"])
        lines.append("| probe held-out loss, mean ↓ | " + " | ".join(
            "n/a" if p is None else f"{p['heldout_loss_mean']:.4f}" for p in probes.values()) + " |")
        for t in timesteps:
            lines.append(f"| probe held-out loss, t = {t} ↓ | " + " | ".join(
                "n/a" if p is None else f"{p['heldout_loss'][t]:.4f}" for p in probes.values()) + " |")
        lines.append("| probe latent std | " + " | ".join(
            "n/a" if p is None else f"{p['latent_std']:.3g}" for p in probes.values()) + " |")
    lines.append("")
    for m in names:
        for transform, reason in entries[m]["equivariance_skipped"].items():
            lines.append(f"- `{m}`: {transform} not measured: {reason}")
        for message in (probes[m] or {}).get("warnings", []):
            lines.append(f"- `{m}` probe: {message}")
    if any(probes.values()):
        lines.append("- Probe: a small UNet2DModel trained on the VAE's posterior means of fixed crops of the sample "
                     "photos (standardised; with latent_scale 'config', scaled by the model's scaling_factor), with "
                     "fixed seeds and budget; epsilon-prediction MSE on held-out latents at fixed noise levels. "
                     "Compare VAEs only at the same budget and downsampling factor.")
    lines.append("")
    if picture:
        lines += [f"![spectra]({picture})", ""]
    return lines


__all__ = [
    "HIGH_FREQUENCY_CUTOFF", "frequency_radius", "power_spectrum_2d", "radial_average", "radial_power_spectrum",
    "high_frequency_share", "high_frequency_share_of", "spectrum_summary", "Transform", "TRANSFORM_KINDS",
    "EVAL_TRANSFORMS", "random_transform", "equivariance_loss", "equivariance_psnr", "transform_fits",
    "diffusability_metrics", "plot_spectra", "report_lines", "ProbeConfig", "random_crops", "sample_photo_crops",
    "probe_pixels", "encode_means", "build_probe_unet", "train_denoiser", "denoising_loss", "diffusability_probe",
]
