"""One model's pass over the evaluation images: reconstruct (encode and decode timed), score, stream the latent
statistics, keep what the pictures show; `evaluate_model` returns it all as a `ModelRun`.

Below orchestration.py (which runs one pass per model) and shared with validation (`_reconstruct`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from kl_autoencoder import metrics as M
from kl_autoencoder.evaluation.pictures import ImageRecord
from kl_autoencoder.evaluation.report import ALL
from kl_autoencoder.evaluation.models import check_resolution
from kl_autoencoder.evaluation.scores import (ImageScores, LowestPSNR, rfid_entry, split_summaries, summarize_defined,
                                              worst_colour)
from kl_autoencoder.fastpath import FastPath, autocast as fast_autocast
from kl_autoencoder.tiny import TinyAutoencoder


GRID_IMAGES = 4        # first images shown in reconstructions.png
LATENT_IMAGES = 2      # images whose latent channels are drawn
KEPT_LATENTS = 20_000  # latent values per channel kept for the histograms


@dataclass
class ModelRun:
    """Everything measured for one model; `metrics` is its metrics.json entry."""
    name: str
    metrics: dict[str, Any]
    first: list[ImageRecord] = field(default_factory=list)
    worst: list[ImageRecord] = field(default_factory=list)
    latent_means: torch.Tensor | None = None    # [LATENT_IMAGES, C, h, w] posterior means
    scaled_latents: torch.Tensor | None = None  # [K, C] kept diffusion-scaled latents


def _to_uint8(images01: torch.Tensor) -> torch.Tensor:
    return (images01 * 255).round().to(torch.uint8).cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds spent encoding and decoding, and over how many images."""
    encode_s: float = 0.0
    decode_s: float = 0.0
    images: int = 0

    def entry(self, device: torch.device, batch_size: int) -> dict[str, Any]:
        return {"device": str(device),
                "encode_images_per_s": self.images / self.encode_s if self.encode_s > 0 else None,
                "decode_images_per_s": self.images / self.decode_s if self.decode_s > 0 else None,
                "batch_size": batch_size, "timed_images": self.images}


def _reconstruct(model, x: torch.Tensor, sample: bool, generator: torch.Generator, policy: FastPath,
                 timing: Timing | None) -> tuple[Any, torch.Tensor | None, torch.Tensor]:
    """(posterior, z sample or None, reconstruction) of one batch; encode / decode time added to `timing`.

    A tiny autoencoder's `encode` is the latents themselves (no posterior, no sample). The sample is drawn either
    way for a KL VAE: the latent statistics measure it."""
    device = x.device
    _sync(device)
    t0 = time.perf_counter()
    with fast_autocast(device, policy):
        posterior = model.encode(x)
        _sync(device)
        t1 = time.perf_counter()
        if isinstance(model, TinyAutoencoder):
            z_sample, z = None, posterior
        else:
            z_sample = posterior.sample(generator)
            z = z_sample if sample else posterior.mode()
        t2 = time.perf_counter()
        reconstruction = model.decode(z)
        _sync(device)
        t3 = time.perf_counter()
    if timing is not None:
        timing.encode_s, timing.decode_s, timing.images = (timing.encode_s + t1 - t0, timing.decode_s + t3 - t2,
                                                           timing.images + len(x))
    return posterior, z_sample, reconstruction


def _keep_pictures(run: ModelRun, lowest: LowestPSNR, start: int, psnr: torch.Tensor, original01: torch.Tensor,
                   recon01: torch.Tensor) -> None:
    """The batch's images that the pictures show: the first GRID_IMAGES, and candidates for the lowest PSNR."""
    original8, recon8 = _to_uint8(original01), _to_uint8(recon01)
    for offset, value in enumerate(psnr.tolist()):
        record = ImageRecord(start + offset, value, original8[offset], recon8[offset])
        if record.index < GRID_IMAGES:
            run.first.append(record)
        lowest.offer(record)


def collapse_warning(name: str, latents: dict[str, Any], num_images: int) -> str | None:
    """The posterior-collapse warning for a KL VAE's latent statistics, or None (one image has no variance across
    images to measure)."""
    if not latents["collapsed_channels"] or num_images < 2:
        return None
    return (f"posterior collapse in {name!r}: {len(latents['collapsed_channels'])} of "
            f"{len(latents['unit_activity'])} latent channels are inactive (activity <= "
            f"{latents['activity_threshold']}): channels {latents['collapsed_channels']}")


@torch.no_grad()
def evaluate_model(model, name: str, images: torch.Tensor, batch_size: int = 8, sample: bool = False,
                   device: torch.device | str = "cpu", seed: int = 0, lpips_metric: M.LPIPSMetric | None = None,
                   fid_metric: M.FIDMetric | None = None, worst_k: int = 4, autocast: bool = True,
                   progress: bool = True, splits: dict[str, list[int]] | None = None,
                   shift: bool | None = None) -> ModelRun:
    """Reconstruct `images` ([N, 3, R, R] in [-1, 1]) with `model` and measure everything for one metrics.json entry.

    `splits` (name -> image indices) get their own image-metric summaries (default: one split "all"); `autocast`
    follows the library's inference policy (fastpath); `shift`: see `metrics.uses_shift`. A TinyAutoencoder's
    encoder is deterministic (no posterior): no latent statistics, `sample` does not apply.
    """
    device = torch.device(device)
    check_resolution(model, name, *images.shape[-2:])
    splits = splits if splits is not None else {ALL: list(range(len(images)))}
    policy = FastPath.for_device(device) if autocast else FastPath()
    generator = torch.Generator(device=device).manual_seed(seed)
    tiny = isinstance(model, TinyAutoencoder)
    stats = None if tiny else M.LatentStatistics(seed=seed, keep=KEPT_LATENTS, shift=shift)
    scores, timing, lowest = ImageScores(lpips_metric, fid_metric), Timing(), LowestPSNR(worst_k)
    run = ModelRun(name=name, metrics={})
    starts = range(0, len(images), batch_size)

    # One pass over the images: reconstruct, score, stream the latent statistics, keep what the pictures show.
    for batch_index, start in enumerate(tqdm(starts, desc=name, unit="batch", disable=not progress)):
        x = images[start:start + batch_size].to(device)
        timed = batch_index > 0 or len(starts) == 1  # the first batch pays for kernel selection / warm-up
        posterior, z_sample, reconstruction = _reconstruct(model, x, sample, generator, policy,
                                                           timing if timed else None)
        if stats is not None:
            stats.update(posterior, z_sample)
            if run.latent_means is None:
                run.latent_means = posterior.mean[:LATENT_IMAGES].float().cpu()
        original01, recon01 = M.to_unit_range(x), M.to_unit_range(reconstruction)
        psnr = scores.add(recon01, original01)
        _keep_pictures(run, lowest, start, psnr, original01, recon01)

    latents = stats.result() if stats is not None else None
    if latents is not None:
        run.scaled_latents = stats.kept_latents(latents["scaling_factor"], latents["shift_factor"])
    run.worst = lowest.records()
    run.metrics = _model_entry(scores, splits, latents, images.shape, sample and not tiny,
                               timing.entry(device, batch_size), run.worst)
    run.metrics.update(rfid_entry(fid_metric, len(images)))
    if tiny:
        run.metrics["latents_reason"] = TINY_LATENTS_REASON
    elif (message := collapse_warning(name, latents, len(images))) is not None:
        run.metrics["warnings"].append(message)
        warnings.warn(message, stacklevel=3)  # past the no_grad wrapper: the caller
    return run


def _model_entry(scores: ImageScores, splits: dict[str, list[int]], latents: dict[str, Any] | None,
                 shape: torch.Size, sample_posterior: bool, speed: dict[str, Any],
                 worst: list[ImageRecord]) -> dict[str, Any]:
    """One model's metrics.json entry (without rFID, path and pictures) from what the pass measured."""
    measured = scores.measured()
    split_of = {index: split for split, indices in splits.items() for index in indices}
    entry = {key: summarize_defined(measured[key]) for key in ("psnr", "ssim", "colour_error", "delta_e", "hue_error")}
    entry.update(scores.entries(tuple(shape[-2:])))
    entry.update({
        "rfid": None, "splits": split_summaries(measured, splits), "latents": latents, "num_images": shape[0],
        "resolution": shape[-1], "sample_posterior": sample_posterior, "speed": speed,
        "worst": [{"index": r.index, "split": split_of.get(r.index), "psnr": r.psnr} for r in worst],
        "worst_colour": worst_colour(measured, split_of),
        "warnings": [],
    })
    return entry


TINY_LATENTS_REASON = ("a tiny autoencoder has no posterior: its encoder outputs the teacher's diffusion latents "
                       "directly (scaling_factor 1, shift_factor 0 by construction), so latent statistics, the "
                       "recommended scale and diffusability do not apply to it")
