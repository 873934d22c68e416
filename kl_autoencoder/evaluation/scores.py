"""Per-image scores of one model's reconstructions: the image metrics per split, the worst images, rFID's entry.

`ImageScores` gathers IMAGE_METRICS batch by batch (metrics.py's functions); the summaries are per split, over the
images where a metric is defined. Shared by the evaluation pass and the training run's validation, below both.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch

from kl_autoencoder import metrics as M
from kl_autoencoder.evaluation.pictures import ImageRecord

IMAGE_METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "colour_error", "delta_e", "hue_error")  # per image, per split


def split_summaries(per_image: dict[str, torch.Tensor], splits: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """{split: {"num_images", metric: summary or None}} for the per-image metrics that were measured."""
    out: dict[str, dict[str, Any]] = {}
    for split, indices in splits.items():
        index = torch.tensor(indices, dtype=torch.long)
        out[split] = {"num_images": len(indices)}
        for key in IMAGE_METRICS:
            out[split][key] = summarize_defined(per_image[key][index]) if key in per_image else None
    return out


def summarize_defined(values: torch.Tensor) -> dict[str, Any] | None:
    """`metrics.summarize` over the images where the metric is defined (NaN: the hue error of an image without
    saturated pixels), saying how many were left out; None when it is defined on none."""
    defined = values[~torch.isnan(values)]
    if defined.numel() == 0:
        return None
    out = M.summarize(defined)
    if defined.numel() < values.numel():
        out["num_images"] = int(defined.numel())
        out["note"] = (f"{values.numel() - defined.numel()} of {values.numel()} images have no pixel of saturation "
                       f"above {M.HUE_MIN_SATURATION}: left out")
    return out


class ImageScores:
    """The per-image metrics of the batches seen so far (IMAGE_METRICS), and rFID's running features.

    MS-SSIM stops, keeping its reason, when the image size cannot hold it; LPIPS / rFID only when available."""

    def __init__(self, lpips_metric: M.LPIPSMetric | None = None, fid_metric: M.FIDMetric | None = None) -> None:
        self.lpips_metric, self.fid_metric = lpips_metric, fid_metric
        self.values: dict[str, list[torch.Tensor]] = {key: [] for key in IMAGE_METRICS}
        self.ms_ssim_error: str | None = None

    def add(self, recon01: torch.Tensor, original01: torch.Tensor) -> torch.Tensor:
        """Score one batch (images in 0..1); returns its per-image PSNR on the CPU."""
        psnr = M.psnr(recon01, original01).cpu()
        self.values["psnr"].append(psnr)
        self.values["ssim"].append(M.ssim(recon01, original01).cpu())
        self.values["colour_error"].append(M.colour_error(recon01, original01).cpu())
        self.values["delta_e"].append(M.delta_e(recon01, original01).cpu())
        self.values["hue_error"].append(M.hue_error(recon01, original01).cpu())
        if self.ms_ssim_error is None:
            try:
                self.values["ms_ssim"].append(M.ms_ssim(recon01, original01).cpu())
            except ValueError as err:
                self.ms_ssim_error = str(err)
        if self.lpips_metric is not None and self.lpips_metric.available:
            self.values["lpips"].append(self.lpips_metric(recon01, original01))
        if self.fid_metric is not None and self.fid_metric.available:
            self.fid_metric.update(original01, recon01)
        return psnr

    def measured(self) -> dict[str, torch.Tensor]:
        """{metric: [N] per-image values} for the metrics measured on every image."""
        out = {key: torch.cat(values) for key, values in self.values.items() if values}
        if self.ms_ssim_error is not None:
            out.pop("ms_ssim", None)
        return out

    def entries(self, image_shape: tuple[int, int]) -> dict[str, Any]:
        """The optional metrics' metrics.json entries: a summary, or None and a "<metric>_reason"."""
        measured, out = self.measured(), {}
        if "ms_ssim" in measured:
            out["ms_ssim"] = {**M.summarize(measured["ms_ssim"]), "scales": M.ms_ssim_scales(*image_shape)}
        else:
            out["ms_ssim"], out["ms_ssim_reason"] = None, self.ms_ssim_error
        if "lpips" in measured:
            out["lpips"] = {**M.summarize(measured["lpips"]), "net": self.lpips_metric.net}
        else:
            out["lpips"] = None
            out["lpips_reason"] = self.lpips_metric.reason if self.lpips_metric is not None else "LPIPS not requested"
        return out


class LowestPSNR:
    """The k images with the lowest PSNR seen so far (ties: the earlier image), for worst.png."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int, ImageRecord]] = []  # max-heap on PSNR via negation

    def offer(self, record: ImageRecord) -> None:
        entry = (-record.psnr, -record.index, record)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, entry)
        elif self.k and entry > self.heap[0]:
            heapq.heapreplace(self.heap, entry)

    def records(self) -> list[ImageRecord]:
        return [record for _, _, record in sorted(self.heap, key=lambda e: (e[2].psnr, e[2].index))]


def worst_colour(measured: dict[str, torch.Tensor], split_of: dict[int, str]) -> dict[str, Any]:
    """The image with the largest mean ΔE2000, with its colour measures (hue error None: no saturated pixel)."""
    index = int(measured["delta_e"].argmax())
    hue = float(measured["hue_error"][index])
    return {"index": index, "split": split_of.get(index), "delta_e": float(measured["delta_e"][index]),
            "hue_error": None if math.isnan(hue) else hue, "colour_error": float(measured["colour_error"][index])}


def rfid_entry(fid_metric: M.FIDMetric | None, num_images: int) -> dict[str, Any]:
    if fid_metric is None:
        return {"rfid": None, "rfid_reason": "rFID not requested"}
    if not fid_metric.available:
        return {"rfid": None, "rfid_reason": fid_metric.reason}
    if num_images < 2:
        return {"rfid": None, "rfid_reason": "rFID needs at least 2 images"}
    note = "one value for the whole image set, all splits (no std)"
    if num_images < 2048:
        note += f"; only {num_images} images (< 2048 Inception features): biased high, compare on the same set only"
    return {"rfid": {"mean": fid_metric.compute(), "std": None, "note": note}}
