"""Latent-space metrics of a KL autoencoder: unit activity, streamed latent statistics and the latent scale.

Latent statistics (`LatentStatistics`, `latent_statistics`) are streamed: running float64 moments, so an
evaluation over many images never keeps every latent.

The latent scale (the one estimator: `LatentScaleEstimator`, `estimate_latent_scale`; the trainer's export and
`evaluate --write-config` both use it). A diffusion model trains on `(z - shift_factor) * scaling_factor`
(`KLAutoencoder.to_diffusion_latents`), where z ~ q(z | x) are posterior *samples*, as latent diffusion draws them:

* `scaling_factor = 1 / std(z)`: the standard deviation around the mean, pooled over every image, channel and
  position, so the scaled latents have unit variance (Stable Diffusion's 0.18215 was measured so).
* `shift_factor = mean(z)`, pooled the same way, only where the convention asks for it: by default models with
  >= 16 latent channels (SD3's 1.5305 / 0.0609, FLUX's 0.3611 / 0.1159); 4-channel models (SD 1.x/2.x, SDXL) have
  none (`null` in config.json) and their scaled latents keep whatever small mean they have. `uses_shift` decides.

Its own room beside metrics.py (the image metrics): what is measured here is the posterior, not a picture. The
trainer's export, the evaluation and the examples read it; metrics.py re-exports every name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import torch

from kl_autoencoder.model import DiagonalGaussian


# --------------------------------------------------------------------------------------------------------------------
# Unit activity (Burda et al. 2016): a latent unit is active when its posterior mean changes with the input.


def unit_activity(means: torch.Tensor) -> torch.Tensor:
    """Per-channel activity of posterior means `means` [N, C, ...]: shape [C].

    Variance across the N images (population variance, ddof 0) of the posterior mean at each latent position,
    averaged over the spatial positions. For [N, D] inputs (an MLP VAE) each dimension is its own unit.
    """
    if means.dim() < 2:
        raise ValueError(f"expected posterior means [N, C, ...], got shape {tuple(means.shape)}")
    variance = means.double().var(dim=0, correction=0)  # [C, ...]
    return variance.flatten(1).mean(dim=1) if variance.dim() > 1 else variance


def active_units(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of units whose activity (see `unit_activity`) exceeds `threshold`."""
    return int((unit_activity(means) > threshold).sum())


# --------------------------------------------------------------------------------------------------------------------
# Streaming latent statistics.


class Posterior(Protocol):
    mean: torch.Tensor
    logvar: torch.Tensor


class _Moments:
    """Running count / mean / sum of squared deviations (Chan et al.'s parallel update) over dim 0, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        n = x.shape[0]
        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        if batch_mean.shape != self.mean.shape:
            raise ValueError(f"latent shape changed during accumulation: {tuple(self.mean.shape)} then "
                             f"{tuple(batch_mean.shape)} (evaluate all images at one resolution)")
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / self.count


# --------------------------------------------------------------------------------------------------------------------
# The latent scale: the one estimator (convention in the module docstring).

SHIFT_MIN_CHANNELS = 16  # the SD3 / FLUX convention: a shift_factor for models with at least this many channels


@dataclass(frozen=True)
class LatentScale:
    """What `to_diffusion_latents` needs: `scaling_factor`, `shift_factor` (None: no shift), measured on
    `num_images` images."""
    scaling_factor: float
    shift_factor: float | None
    num_images: int


def uses_shift(latent_channels: int, shift: bool | None) -> bool:
    """Whether the latent scale includes a shift_factor: `shift` when given, else the SD3/FLUX convention
    (`latent_channels >= 16`)."""
    return latent_channels >= SHIFT_MIN_CHANNELS if shift is None else bool(shift)


class LatentScaleEstimator:
    """Streams posterior samples z (unscaled, [B, C, H, W]) and gives their `LatentScale`.

    Pooled count / mean / sum of squared deviations in float64 (Chan et al.'s parallel update), so batches of any
    size combine exactly and nothing but three numbers is kept.
    """

    def __init__(self, shift: bool):
        self.shift = bool(shift)
        self.num_images = 0
        self.channels: int | None = None
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def update(self, latents: torch.Tensor) -> None:
        if latents.dim() < 2 or latents.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch of latents [B, C, ...], got shape {tuple(latents.shape)}")
        if self.channels is not None and latents.shape[1] != self.channels:
            raise ValueError(f"latent channels changed during accumulation: {self.channels} then {latents.shape[1]}")
        z = latents.detach().double()
        batch_mean = z.mean()
        batch_m2 = float((z - batch_mean).pow(2).sum())
        batch_mean = float(batch_mean)
        if not (math.isfinite(batch_mean) and math.isfinite(batch_m2)):
            raise ValueError(f"latents contain NaN or infinite values (batch of {latents.shape[0]} images)")
        self._add(z.numel(), batch_mean, batch_m2, latents.shape[0])
        self.channels = latents.shape[1]

    def _add(self, n: int, batch_mean: float, batch_m2: float, images: int) -> None:
        if n == 0:
            return
        total = self._count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self._count * n / total
        self._count = total
        self.num_images += images

    def moments(self) -> list[float]:
        """[count, mean, sum of squared deviations, images]: what `pooled` combines (e.g. across processes)."""
        return [float(self._count), self._mean, self._m2, float(self.num_images)]

    @classmethod
    def pooled(cls, shift: bool, moments: Iterable[Sequence[float]]) -> "LatentScaleEstimator":
        """One estimator from several estimators' `moments()`: the same figures as one stream of all their latents."""
        estimator = cls(shift)
        for count, mean, m2, images in moments:
            estimator._add(int(count), float(mean), float(m2), int(images))
        return estimator

    def result(self) -> LatentScale:
        if self._count == 0:
            raise ValueError("LatentScaleEstimator.result() called before any update()")
        std = math.sqrt(self._m2 / self._count)
        if std == 0.0:
            raise ValueError(f"all {self._count} latent values are equal ({self._mean}): no scaling factor")
        return LatentScale(scaling_factor=1.0 / std, shift_factor=self._mean if self.shift else None,
                           num_images=self.num_images)


@torch.no_grad()
def estimate_latent_scale(model: torch.nn.Module, images: Iterable[torch.Tensor], shift: bool | None = None,
                          num_images: int = 256, generator: torch.Generator | None = None) -> LatentScale:
    """The `LatentScale` of `model` on posterior samples of up to `num_images` images.

    `images` yields batches [B, 3, H, W] in [-1, 1] (at the resolution the diffusion model will see); no batch is
    read after the `num_images`-th image. Encodes in eval mode (restored afterwards) without gradients;
    `generator` (on the model's device) makes the samples reproducible. `shift`: see `uses_shift`.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    estimator = LatentScaleEstimator(uses_shift(model.config.latent_channels, shift))
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        for batch in images:
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"estimate_latent_scale expects image tensors [B, 3, H, W], got {type(batch).__name__}")
            batch = batch[: num_images - estimator.num_images].to(parameter.device, parameter.dtype)
            if batch.shape[0]:
                estimator.update(model.encode(batch).sample(generator))
            if estimator.num_images >= num_images:
                break
    finally:
        model.train(was_training)
    if estimator.num_images == 0:
        raise ValueError("cannot estimate the latent scale: no images")
    return estimator.result()


class LatentStatistics:
    """Streams posteriors and reports what a diffusion model trained on these latents needs to know.

    `update(posterior)` takes anything with `.mean` and `.logvar` of shape [B, C, ...]. The latent values whose
    moments give `latents_mean` / `latents_std` are samples z ~ q(z | x) (what latent diffusion trains on), drawn
    with a seeded generator, or the `latents` passed in; the same samples feed a `LatentScaleEstimator`, whose
    result is the recommended `scaling_factor` / `shift_factor` (`shift`: see `uses_shift`). `keep` > 0 keeps a
    uniform random sample of up to `keep` latent vectors (all channels of one position) for histograms.
    """

    def __init__(self, threshold: float = 0.01, seed: int = 0, keep: int = 0, shift: bool | None = None):
        self.threshold = threshold
        self.keep = keep
        self.shift = shift
        self.scale: LatentScaleEstimator | None = None  # made at the first update, when the channel count is known
        self.generator = torch.Generator().manual_seed(seed)  # posterior samples
        self.key_generator = torch.Generator().manual_seed(seed + 1)  # which latents are kept: independent of the above
        self.mean_moments = _Moments()    # posterior means per latent position [C, ...]: unit activity
        self.latent_moments = _Moments()  # z per channel, every position and image pooled: [C]
        self.std_sum: torch.Tensor | None = None  # sum over images of the per-channel average posterior std
        self.kl_sum: torch.Tensor | None = None   # sum over images of per-channel KL (summed over positions)
        self.mean_channel_moments = _Moments()  # posterior means per channel, pooled: [C]
        self.kept = torch.empty(0)       # [<= keep, C] latent vectors: the ones with the smallest random keys,
        self.kept_keys = torch.empty(0)  # which makes them a uniform sample of everything seen (bottom-k sampling)

    @staticmethod
    def _channels_last(x: torch.Tensor) -> torch.Tensor:
        """[B, C, ...] -> [B * positions, C] so per-channel moments pool images and positions alike."""
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    def update(self, posterior: Posterior, latents: torch.Tensor | None = None) -> None:
        mean = posterior.mean.detach().float().cpu()
        logvar = posterior.logvar.detach().float().cpu()
        if latents is None:
            noise = torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * noise
        latents = latents.detach().float().cpu()
        if self.scale is None:
            self.scale = LatentScaleEstimator(uses_shift(latents.shape[1], self.shift))
        self.scale.update(latents)
        self.mean_moments.update(mean)
        self.mean_channel_moments.update(self._channels_last(mean))
        self.latent_moments.update(self._channels_last(latents))
        spatial = tuple(range(2, mean.dim()))
        kl = DiagonalGaussian(mean=mean.double(), logvar=logvar.double()).kl_per_channel()  # [B, C]
        std = torch.exp(0.5 * logvar.double())
        std = std.mean(dim=spatial) if spatial else std
        self.kl_sum = kl.sum(0) if self.kl_sum is None else self.kl_sum + kl.sum(0)
        self.std_sum = std.sum(0) if self.std_sum is None else self.std_sum + std.sum(0)
        if self.keep:
            flat = self._channels_last(latents)
            keys = torch.cat([self.kept_keys, torch.rand(flat.shape[0], generator=self.key_generator)])
            values = torch.cat([self.kept.view(-1, flat.shape[1]), flat])
            order = torch.argsort(keys)[: self.keep]
            self.kept, self.kept_keys = values[order], keys[order]

    @property
    def num_images(self) -> int:
        return self.mean_moments.count

    def kept_latents(self, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
        """The kept latent vectors mapped to diffusion scale, (z - shift) * scale: [K, C]."""
        if not self.kept.numel():
            raise ValueError("no latents were kept: build LatentStatistics(keep=...) with keep > 0")
        return (self.kept - (shift_factor or 0.0)) * scaling_factor

    def result(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-ready) of the statistics so far; see the module docstring for definitions."""
        if self.num_images == 0:
            raise ValueError("LatentStatistics.result() called before any update()")
        z = self.latent_moments
        channel_mean, channel_var = z.mean, z.variance
        scale = self.scale.result()
        activity = self.mean_moments.variance
        activity = activity.flatten(1).mean(dim=1) if activity.dim() > 1 else activity
        collapsed = [int(c) for c in torch.nonzero(activity <= self.threshold).flatten()]
        kl_per_channel = self.kl_sum / self.num_images
        return {
            "num_images": self.num_images,
            "scaling_factor": scale.scaling_factor,
            "shift_factor": scale.shift_factor,
            "latents_mean": channel_mean.tolist(),
            "latents_std": channel_var.sqrt().tolist(),
            "channel_mean": self.mean_channel_moments.mean.tolist(),
            "channel_std": self.mean_channel_moments.variance.sqrt().tolist(),
            "posterior_std": (self.std_sum / self.num_images).tolist(),
            "kl_per_channel": kl_per_channel.tolist(),
            "kl_total": float(kl_per_channel.sum()),
            "unit_activity": activity.tolist(),
            "active_units": len(activity) - len(collapsed),
            "activity_threshold": self.threshold,
            "collapsed_channels": collapsed,
        }


LATENT_STATISTICS_DOC = {
    "scaling_factor": "1 / std (around the mean) of all latent values z ~ q(z|x): every image, channel, position",
    "shift_factor": "mean of all latent values z ~ q(z|x), or null: only models with >= 16 latent channels get a "
                    "shift unless asked otherwise (the SD3/FLUX convention)",
    "latents_mean": "per-channel mean of z ~ q(z|x)",
    "latents_std": "per-channel std of z ~ q(z|x)",
    "channel_mean": "per-channel mean of the posterior means mu(x)",
    "channel_std": "per-channel std of the posterior means mu(x)",
    "posterior_std": "per-channel average posterior std sigma(x)",
    "kl_per_channel": "nats: KL(q || N(0, I)) summed over a channel's positions, averaged over images",
    "kl_total": "nats per image: the sum of kl_per_channel",
    "unit_activity": "per channel: variance across images of mu(x) at each position, averaged over positions",
    "active_units": "channels with unit_activity > activity_threshold",
}


@dataclass
class PosteriorMoments:
    mean: torch.Tensor
    logvar: torch.Tensor


def latent_statistics(means: torch.Tensor, logvars: torch.Tensor, threshold: float = 0.01,
                      latents: torch.Tensor | None = None, seed: int = 0, shift: bool | None = None) -> dict[str, Any]:
    """`LatentStatistics` over one batch of posterior moments [N, C, ...] (see `LATENT_STATISTICS_DOC`)."""
    stats = LatentStatistics(threshold=threshold, seed=seed, shift=shift)
    stats.update(PosteriorMoments(means, logvars), latents)
    return stats.result()
