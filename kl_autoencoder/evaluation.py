"""Evaluate one or more autoencoders on the same images: metrics.json, report.md and pictures.

Every model is loaded and checked before any work, so a bad path fails before a picture is written. Then, per
model: reconstruct each image (posterior mode, or a sample with `sample=True`), score it (PSNR, SSIM, MS-SSIM,
LPIPS, rFID; colour: the mean-RGB error, ΔE2000 per pixel and the hue error on saturated pixels; see metrics.py),
stream the latent statistics a diffusion model needs (the recommended scaling /
shift factors from metrics' one latent-scale estimator, per-channel moments and KL, active units) and time encode
and decode.

Images come in splits, reported separately and held-out first: the built-in `sample` source is its held-out
photos, then its training photos (data.SAMPLE_HELDOUT / SAMPLE_TRAIN); any other source is one split, "all".
The headline (report.md's first line, metrics.json's "headline") is the first split: the held-out one when there
is one.

    metrics.json                  "headline", "splits" (image names per split), "skipped_images" / "skipped_files",
                                  "models": {name: per-model dict}; strict JSON (inf -> "inf"). A per-model dict
                                  holds psnr / ssim / ms_ssim / lpips / colour_error / delta_e / hue_error / rfid
                                  over all images, "splits": the image metrics per split, "latents", "speed",
                                  "worst" (lowest PSNR), "worst_colour" (largest ΔE2000), "warnings", "pictures"
    report.md                     the sections of REPORT_SECTIONS, in order
    <model>/reconstructions.png   original | reconstruction | error, for the first images
    <model>/worst.png             the same for the images with the lowest PSNR
    <model>/latent_histograms.png per-channel histogram of diffusion-scaled latents against the N(0, 1) pdf
    <model>/latent_channels.png   posterior-mean channels of the first images
    spectra.png                   latent vs image power spectra of every model (diffusability)

Diffusability (kl_autoencoder/diffusability.py), per model under "diffusability": the high-frequency share of the
latent and image spectra and the equivariance PSNR, always; with `diffusability_probe=True` the probe's held-out
denoising loss too (it trains a small UNet: about a minute per quickstart-size VAE on a CPU).

`write_config=True` stores the measured scaling_factor / shift_factor (and with `write_latent_stats` the
per-channel latents_mean / latents_std) into the model folder's config.json.

Tiny autoencoders (a diffusers `AutoencoderTiny` folder, e.g. from `kl-autoencoder distill`) are evaluated beside
KL VAEs: the same image metrics (encode then decode) and speed; latent statistics and diffusability do not apply (its
encoder outputs the teacher's diffusion latents directly, there is no posterior). With its teacher among the models
(or `teacher=`), its entry's "teacher" holds PSNR / SSIM against the teacher's decodes (`compare_with_teacher`) and
report.md a section for it.

This module measures (`evaluate_model`: one pass per model) and writes config.json; report.md / metrics.json are
written by evaluation_report.py, the pictures drawn by evaluation_pictures.py (their names stay importable here).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kl_autoencoder import diffusability as D
from kl_autoencoder import metrics as M
from kl_autoencoder.fp16 import fp16_entry
from kl_autoencoder.data import (SAMPLE_HELDOUT, SAMPLE_TRAIN, SkipLog, is_local_path, iter_image_folder,
                                  load_eval_images)
from kl_autoencoder.spelling import check_source_spelling
from kl_autoencoder.durable import atomic_write_text
from kl_autoencoder.model_card import add_evaluation, evaluation_lines
from kl_autoencoder.evaluation_pictures import (  # noqa: F401  (re-exported: their public home until now)
    ImageRecord, image_labels, plot_latent_channels, plot_latent_histograms, plot_reconstructions, save_figure,
    write_pictures,
)
from kl_autoencoder.evaluation_report import (  # noqa: F401  (re-exported)
    ALL, HELD_OUT, REPORT_SECTIONS, TRAINING, ReportSection, channel_table, headline_scope, headline_section,
    image_metrics_section, model_sections, notes_section, render_report, skipped_section, teacher_section,
    whole_set_section, write_json, _fmt, _plural,
)
from kl_autoencoder.fastpath import FastPath, autocast as fast_autocast, prepare_for_inference
from kl_autoencoder.formats import CONFIG_NAME, find_config_json
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.presets import LATENT_SCALE_KEY, PRESETS
from kl_autoencoder.outputs import check_output
from kl_autoencoder.tiny import TinyAutoencoder
from kl_autoencoder.untrusted import shown

GRID_IMAGES = 4        # first images shown in reconstructions.png
LATENT_IMAGES = 2      # images whose latent channels are drawn
KEPT_LATENTS = 20_000  # latent values per channel kept for the histograms
IMAGE_METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "colour_error", "delta_e", "hue_error")  # per image, per split
SHIFT_CHOICES = {"auto": None, "on": True, "off": False}
SKIPPABLE = ("diffusability", "fp16")  # sections `--skip` leaves out (each seconds to minutes per full-size VAE)


class EvaluationError(ValueError):
    """Bad evaluation input (model path, data source, flags); the message names the offending value."""


# --------------------------------------------------------------------------------------------------------------------
# Command line.


# What marks a folder as holding an earlier evaluation (the pictures sit in per-model folders beside them).
EVALUATION_FILES = ("metrics.json", "report.md")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", nargs="+", required=True, metavar="PATH",
                        help="diffusers / pipeline folder, LDM single file or hub id (several: side by side)")
    parser.add_argument("--data", default=None,
                        help=f'an image folder (e.g. photos held out of your fine-tune), a hub dataset, or "sample" '
                             f'(the default: the built-in photos, {len(SAMPLE_HELDOUT)} held out of the sample '
                             f'source\'s training runs, {len(SAMPLE_TRAIN)} trained on)')
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json, report.md, pictures")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier evaluation in --out (refused otherwise)")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size in pixels (default 256)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="evaluate at most this many images (held-out ones first)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="decode z ~ q(z|x) instead of the posterior mode")
    parser.add_argument("--write-config", action="store_true",
                        help="store the measured scaling_factor / shift_factor in the model folder's config.json")
    parser.add_argument("--write-latent-stats", action="store_true",
                        help="with --write-config: also store per-channel latents_mean / latents_std")
    parser.add_argument("--force", action="store_true",
                        help="with --write-config: also replace the factors of a model whose training run kept "
                             "them (a decoder-only fine-tune keeps its source's latent space; refused otherwise)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the release a config-less single file is (its scaling_factor / shift_factor)")
    parser.add_argument("--shift-factor", choices=sorted(SHIFT_CHOICES), default="auto",
                        help="whether the measured latent scale has a shift_factor; auto: only models with >= 16 "
                             "latent channels (the SD3/FLUX convention)")
    parser.add_argument("--lpips-net", choices=sorted(M.TORCHVISION_BACKBONE_FILES), default="alex")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for posterior samples")
    parser.add_argument("--worst-k", type=int, default=4, help="worst images (by PSNR) shown in the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (a line per step still says "
                                                                    "what runs)")
    parser.add_argument("--skip", type=skip_sections, default=(), metavar="SECTIONS",
                        help=f"leave out these sections, comma-separated: {', '.join(SKIPPABLE)}")
    parser.add_argument("--diffusability-probe", action="store_true",
                        help="also train the diffusability probe on crops of the sample photos (~1 min per VAE)")
    parser.add_argument("--teacher", default=None, metavar="PATH",
                        help="the KL VAE the tiny autoencoder(s) among --model were distilled from: evaluated "
                             "too, each tiny model compared with its decodes (default: the only KL VAE in --model)")
    return parser


def skip_sections(text: str) -> tuple[str, ...]:
    """`--skip diffusability,fp16`: the named sections, each one of SKIPPABLE."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SKIPPABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(SKIPPABLE)} (comma-separated)")
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `evaluate` from parsed arguments and print the headline and where the results went."""
    data = args.data or "sample"
    check_source_spelling(data, "--data")  # a typo is said at once, not after a wait for the hub
    if args.write_latent_stats and not args.write_config:
        raise EvaluationError("--write-latent-stats only makes sense together with --write-config")
    check_output(args.out, "evaluate", [data, *args.model, *([args.teacher] if args.teacher else [])],
                 earlier=EVALUATION_FILES, overwrite=getattr(args, "overwrite", False), noun="result file")
    if args.data is None:
        status("--data not given: evaluating on the built-in sample photos")
    result = evaluate(
        args.model, data, args.out, resolution=args.resolution, num_images=args.num_images,
        batch_size=args.batch_size, sample=args.sample, write_config=args.write_config,
        write_latent_stats=args.write_latent_stats, shift=SHIFT_CHOICES[args.shift_factor], lpips_net=args.lpips_net,
        device=args.device, seed=args.seed, worst_k=args.worst_k, progress=not args.no_progress,
        diffusability_probe=args.diffusability_probe, teacher=args.teacher, force=args.force, preset=args.preset,
        skip=getattr(args, "skip", ()),
    )
    headline = result["headline"]
    for name, values in headline["models"].items():
        entry = result["models"][name]
        print(f"{name}: {headline_scope(result)}: PSNR {_fmt(values['psnr'])} dB, "
              f"SSIM {_fmt(values['ssim'])}, colour error {_fmt(values['colour_error'])}, ΔE2000 "
              f"{_fmt(values['delta_e'], 3)}, hue error {_fmt(values['hue_error'], 3)}°; "
              + latent_detail(entry, headline))
    if result["skipped_images"]:
        print(f"skipped {_plural(result['skipped_images'], 'unreadable image')}: "
              + ", ".join(shown(name) for name in result["skipped_files"][:20])
              + (" ..." if len(result["skipped_files"]) > 20 else ""))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    return result


def latent_detail(entry: dict[str, Any], headline: dict[str, Any]) -> str:
    """The console's word on a model's latent scale: its own (config.json) and the one measured here."""
    if entry["latents"] is not None:
        configured = entry.get("configured", {}).get("scaling_factor")
        own = "" if configured is None else f"scaling_factor {configured:.5g} (its config), "
        return f"{own}measured 1/std of its latents {entry['latents']['scaling_factor']:.5g}"
    if entry.get("teacher"):
        return f"vs teacher {_fmt(entry['teacher']['decode']['splits'][headline['split']]['psnr'])} dB (decode)"
    return "tiny autoencoder"


# --------------------------------------------------------------------------------------------------------------------
# The images, in splits.


@dataclass
class EvalImages:
    """The evaluation images and where they come from."""
    names: list[str]
    images: torch.Tensor              # [N, 3, R, R] in [-1, 1]
    splits: dict[str, list[int]]      # split name -> image indices, in report order (held-out first)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> reason
    available: int | None = None      # images the source has (None: a hub dataset, not counted)


def split_sources(data: str) -> list[tuple[str, str]]:
    """(split name, `load_eval_images` source) in report order: the built-in sample's held-out photos first."""
    if data in ("sample", "sample:all"):
        return [(HELD_OUT, "sample:heldout"), (TRAINING, "sample:train")]
    if data == "sample:heldout":
        return [(HELD_OUT, data)]
    if data == "sample:train":
        return [(TRAINING, data)]
    return [(ALL, data)]


def load_split_images(data: str, resolution: int, num_images: int | None = None) -> EvalImages:
    """The images of `data`, split by `split_sources`; `num_images` counts from the first split."""
    skipped = SkipLog()
    names: list[str] = []
    parts: list[torch.Tensor] = []
    splits: dict[str, list[int]] = {}
    for split, source in split_sources(data):
        remaining = None if num_images is None else num_images - len(names)
        if remaining == 0:
            break
        try:
            part_names, part = load_eval_images(source, resolution, remaining, skipped=skipped)
        except (OSError, ValueError, RuntimeError) as err:
            raise EvaluationError(f"could not load evaluation images from {data!r}: {err}") from err
        splits[split] = list(range(len(names), len(names) + len(part_names)))
        names += part_names
        parts.append(part)
    if not names:
        raise EvaluationError(f"no images in {data!r}")
    return EvalImages(names, torch.cat(parts), splits, skipped.reasons, available_images(data))


def available_images(data: str) -> int | None:
    """How many images `data` holds, whatever --num-images keeps: the sample's photos, a folder's image files."""
    if data.startswith("sample"):
        return sum(len(SAMPLE_HELDOUT if s == HELD_OUT else SAMPLE_TRAIN) for s, _ in split_sources(data))
    return len(iter_image_folder(data)) if is_local_path(data) else None


def describe_images(data: str, images: EvalImages) -> str:
    """What is evaluated, in words: the count, the source, and what its splits mean."""
    count = len(images.names)
    if data.startswith("sample"):
        words = {HELD_OUT: "held out of the sample source's training", TRAINING: "its training photos"}
        parts = [f"{len(indices)} {words[split]}" for split, indices in images.splits.items()]
        return f"the built-in sample photos ({', '.join(parts)})"
    first = f"the first {count} of {images.available}" if (images.available or 0) > count else f"{count}"
    return f"{first} images of {data} (one split, all: none known to be held out)"


def trained_on(model_path: str) -> str | None:
    """The data.source of the training run that exported `model_path` (RUN/vae beside RUN/config.yaml), if any."""
    import yaml

    config = Path(model_path).expanduser().parent / "config.yaml"
    try:
        source = (yaml.safe_load(config.read_text(encoding="utf-8")) or {})["data"]["source"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None
    return source if isinstance(source, str) else None


def heldout_warnings(model_path: str, name: str, images: EvalImages) -> list[str]:
    """The sample's held-out photos are held out of sample-source runs only: said for a model trained on another
    source (a fine-tune on your folder may have seen them)."""
    source = trained_on(model_path)
    if HELD_OUT not in images.splits or source is None or source.startswith("sample"):
        return []
    message = (f"{name} was trained on {source}, not on the sample source: its 'held-out' photos are held out of the "
               "sample source's training only; evaluate on photos held out of your own (--data FOLDER)")
    status(message)
    return [message]


# --------------------------------------------------------------------------------------------------------------------
# Evaluating one model.


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


def is_tiny_autoencoder(path: str) -> bool:
    """Whether `path` is a local diffusers (or pipeline) folder whose config.json names an AutoencoderTiny."""
    config = find_config_json(path) if Path(path).expanduser().is_dir() else None
    if config is None:
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError, AttributeError, RecursionError):  # unreadable: the KL loader reports it
        return False


def load_model_for_eval(path: str, preset: str | None = None) -> KLAutoencoder | TinyAutoencoder:
    """The model at `path` on the CPU (a tiny autoencoder by its config's class name; a KL VAE with `preset`'s
    latent fields); any failure is an EvaluationError naming the path."""
    try:
        if is_tiny_autoencoder(path):
            return TinyAutoencoder.from_pretrained(path)
        return KLAutoencoder.from_pretrained(path, preset=preset)
    except Exception as err:  # any failure to load is the user's path, said with the reason
        raise EvaluationError(f"could not load model {path!r}: {err}") from err


def check_resolution(model: KLAutoencoder, name: str, height: int, width: int) -> None:
    factor = model.config.downsampling_factor
    if height % factor or width % factor:
        raise EvaluationError(f"resolution {(height, width)} is not divisible by the model's downsampling "
                              f"factor {factor} (model {name!r})")


def _split_summaries(per_image: dict[str, torch.Tensor], splits: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
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
    run.metrics.update(_rfid_entry(fid_metric, len(images)))
    if tiny:
        run.metrics["latents_reason"] = TINY_LATENTS_REASON
    elif (message := collapse_warning(name, latents, len(images))) is not None:
        run.metrics["warnings"].append(message)
        warnings.warn(message, stacklevel=3)  # past the no_grad wrapper: the caller
    return run


def worst_colour(measured: dict[str, torch.Tensor], split_of: dict[int, str]) -> dict[str, Any]:
    """The image with the largest mean ΔE2000, with its colour measures (hue error None: no saturated pixel)."""
    index = int(measured["delta_e"].argmax())
    hue = float(measured["hue_error"][index])
    return {"index": index, "split": split_of.get(index), "delta_e": float(measured["delta_e"][index]),
            "hue_error": None if math.isnan(hue) else hue, "colour_error": float(measured["colour_error"][index])}


def _model_entry(scores: ImageScores, splits: dict[str, list[int]], latents: dict[str, Any] | None,
                 shape: torch.Size, sample_posterior: bool, speed: dict[str, Any],
                 worst: list[ImageRecord]) -> dict[str, Any]:
    """One model's metrics.json entry (without rFID, path and pictures) from what the pass measured."""
    measured = scores.measured()
    split_of = {index: split for split, indices in splits.items() for index in indices}
    entry = {key: summarize_defined(measured[key]) for key in ("psnr", "ssim", "colour_error", "delta_e", "hue_error")}
    entry.update(scores.entries(tuple(shape[-2:])))
    entry.update({
        "rfid": None, "splits": _split_summaries(measured, splits), "latents": latents, "num_images": shape[0],
        "resolution": shape[-1], "sample_posterior": sample_posterior, "speed": speed,
        "worst": [{"index": r.index, "split": split_of.get(r.index), "psnr": r.psnr} for r in worst],
        "worst_colour": worst_colour(measured, split_of),
        "warnings": [],
    })
    return entry


TINY_LATENTS_REASON = ("a tiny autoencoder has no posterior: its encoder outputs the teacher's diffusion latents "
                       "directly (scaling_factor 1, shift_factor 0 by construction), so latent statistics, the "
                       "recommended scale and diffusability do not apply to it")


@torch.no_grad()
def compare_with_teacher(student: TinyAutoencoder, teacher: KLAutoencoder, teacher_name: str, images: torch.Tensor,
                         batch_size: int = 8, device: torch.device | str = "cpu",
                         splits: dict[str, list[int]] | None = None, autocast: bool = True) -> dict[str, Any]:
    """A tiny autoencoder against the KL VAE it was distilled from, on `images` ([N, 3, R, R] in [-1, 1]).

    With z the teacher's posterior mode and L = teacher.to_diffusion_latents(z) (what a diffusion model samples):
      "decode":      PSNR / SSIM of student.decode(L) against teacher.decode(z): the decoder alone, i.e. a preview
                     of a diffusion model's latents against the full decode;
      "round_trip":  student.decode(student.encode(x)) against teacher.decode(z): both halves;
      "latent_rmse": per image, the RMS of student.encode(x) - L (L has about unit spread).
    Each over all images and per split (`splits`, default one split "all"), decodes clamped to the image range.
    """
    device = torch.device(device)
    splits = splits if splits is not None else {ALL: list(range(len(images)))}
    policy = FastPath.for_device(device) if autocast else FastPath()
    per_image: dict[str, dict[str, list[torch.Tensor]]] = {"decode": {"psnr": [], "ssim": []},
                                                           "round_trip": {"psnr": [], "ssim": []}}
    rmse = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        with fast_autocast(device, policy):
            z = teacher.encode(x).mode()
            target = M.to_unit_range(teacher.decode(z))
            latents = teacher.to_diffusion_latents(z).float()
            encoded = student.encode(x).float()
            outputs = {"decode": M.to_unit_range(student.decode(latents)),
                       "round_trip": M.to_unit_range(student.decode(encoded))}
        for kind, output in outputs.items():
            per_image[kind]["psnr"].append(M.psnr(output, target).cpu())
            per_image[kind]["ssim"].append(M.ssim(output, target).cpu())
        rmse.append((encoded - latents).pow(2).flatten(1).mean(1).sqrt().cpu())
    result: dict[str, Any] = {"teacher": teacher_name}
    for kind, values in per_image.items():
        measured = {key: torch.cat(parts) for key, parts in values.items()}
        result[kind] = {"psnr": M.summarize(measured["psnr"]), "ssim": M.summarize(measured["ssim"]),
                        "splits": _split_summaries(measured, splits)}
    result["latent_rmse"] = M.summarize(torch.cat(rmse))
    return result


def _same_model_path(a: str, b: str) -> bool:
    if Path(a).expanduser().exists() and Path(b).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a.rstrip("/") == b.rstrip("/")


def find_teacher(paths: list[str], models: list[Any], teacher: str | None) -> int | None:
    """Index in `paths` of the KL VAE the tiny autoencoders are compared with: `teacher`'s, else the only KL VAE
    among the models; None when there is no tiny model or no KL VAE. Mismatches are EvaluationErrors, before work."""
    tiny = [isinstance(m, TinyAutoencoder) for m in models]
    if not any(tiny):
        if teacher is not None:
            raise EvaluationError(f"--teacher {teacher!r} is for tiny autoencoders (AutoencoderTiny folders); none "
                                  "is among the models")
        return None
    if teacher is not None:
        index = next(i for i, p in enumerate(paths) if _same_model_path(p, teacher))
        if tiny[index]:
            raise EvaluationError(f"--teacher {teacher!r} is a tiny autoencoder; name the KL VAE it was distilled from")
    else:
        candidates = [i for i, is_tiny in enumerate(tiny) if not is_tiny]
        if not candidates:
            return None
        if len(candidates) > 1:
            raise EvaluationError("several KL VAEs are among the models (" + ", ".join(paths[i] for i in candidates)
                                  + "): say which one the tiny autoencoder was distilled from with --teacher")
        index = candidates[0]
    for path, model in zip(paths, models):
        if isinstance(model, TinyAutoencoder) and (
                model.config.latent_channels != models[index].config.latent_channels
                or model.downsampling_factor != models[index].config.downsampling_factor):
            raise EvaluationError(
                f"the tiny autoencoder {path!r} ({model.config.latent_channels} latent channels, factor "
                f"{model.downsampling_factor}) cannot be a student of {paths[index]!r} "
                f"({models[index].config.latent_channels} channels, factor {models[index].config.downsampling_factor})")
    return index


def _rfid_entry(fid_metric: M.FIDMetric | None, num_images: int) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------------------------
# Writing the measured latent statistics back into a model's config.json.


def config_json_for(model_path: str) -> Path:
    """The config.json that --write-config would update: a diffusers folder's, or a pipeline folder's vae/."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"--write-config needs a diffusers model folder with config.json; {model_path!r} is "
                              "not a local folder (convert it with `kl-autoencoder convert` first)")
    config = find_config_json(path)
    if config is None:
        raise EvaluationError(f"--write-config: {path} has no {CONFIG_NAME} (nor vae/{CONFIG_NAME})")
    return config


def check_latent_scale_writable(config_path: Path, force: bool) -> None:
    """Refuse (unless `force`) to replace the factors a training run kept: a decoder-only fine-tune's latent space
    is its source's, and every diffusion model trained on that needs the source's factors, not a new estimate."""
    try:
        record = json.loads(config_path.read_text(encoding="utf-8")).get(LATENT_SCALE_KEY)
    except (OSError, ValueError, AttributeError):
        return  # unreadable: write_latent_config reports it, naming the file
    if isinstance(record, dict) and record.get("latent_scale") == "kept" and not force:
        raise EvaluationError(f"--write-config: {config_path} holds the latent factors its training run kept from "
                              f"{shown(record.get('source'))} (the encoder was frozen, so diffusion models trained on "
                              "that latent space need them); refusing to replace them with this evaluation's estimate. "
                              "Add --force to write anyway")


def write_latent_config(model_path: str, latents: dict[str, Any], latent_stats: bool = False) -> Path:
    """Store scaling_factor / shift_factor (None: no shift) and optionally per-channel latents_mean / latents_std
    in a diffusers config.json."""
    config_path = config_json_for(model_path)
    if not math.isfinite(latents["scaling_factor"]):
        raise EvaluationError(f"--write-config: the measured scaling_factor is {latents['scaling_factor']}; "
                              f"{config_path} left unchanged")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvaluationError(f"--write-config: {config_path} is not valid JSON: {err}") from err
    config["scaling_factor"] = latents["scaling_factor"]
    config["shift_factor"] = latents["shift_factor"]
    if LATENT_SCALE_KEY in config:  # a training run's record: the factors are now this evaluation's
        config[LATENT_SCALE_KEY] = {"latent_scale": "measured", "by": "evaluate --write-config"}
    if latent_stats:
        config["latents_mean"] = latents["latents_mean"]
        config["latents_std"] = latents["latents_std"]
    write_json(config_path, config)
    return config_path


# --------------------------------------------------------------------------------------------------------------------
# The whole evaluation.


def model_names(paths: list[str]) -> list[str]:
    """Short unique names for model paths (folder or file stem; `-2`, `-3` ... on clashes), safe as folder names."""
    names: list[str] = []
    for path in paths:
        p = Path(path.rstrip("/"))
        base = re.sub(r"[^\w.-]+", "_", (p.parent.name if p.name == "vae" else p.stem) or "model")
        base = "model" if base.strip(".") == "" else base  # "x/.." has the stem "..": a folder above --out
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_models(paths: list[str], resolution: int, preset: str | None = None) -> list[KLAutoencoder]:
    """Every model, loaded on the CPU and checked against the resolution, before any evaluation work."""
    models = []
    for path, name in zip(paths, model_names(paths)):
        model = load_model_for_eval(path, preset)
        check_resolution(model, name, resolution, resolution)
        models.append(model)
    return models


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The first split's image metrics per model: the held-out images when the source has them."""
    split = next(iter(result["splits"]))
    return {"split": split, "num_images": len(result["splits"][split]),
            "models": {m: {k: e["splits"][split][k] for k in IMAGE_METRICS} for m, e in result["models"].items()}}


def check_request(models: list[str] | str, teacher: str | None, batch_size: int, num_images: int | None,
                  write_config: bool, force: bool = False) -> list[str]:
    """The model paths to evaluate (the teacher added when not among them), after checking every flag and
    --write-config target: an EvaluationError before any work."""
    if isinstance(models, str):
        models = [models]
    if not models:
        raise EvaluationError("no model given to evaluate")
    if teacher is not None and not any(_same_model_path(path, teacher) for path in models):
        models = [*models, teacher]
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if num_images is not None and num_images < 1:
        raise EvaluationError(f"num_images must be >= 1, got {num_images}")
    if write_config:
        for path in models:
            check_latent_scale_writable(config_json_for(path), force)
            if is_tiny_autoencoder(path):
                raise EvaluationError(f"--write-config: {path!r} is a tiny autoencoder, whose latent scale is 1 by "
                                      "construction (it outputs its teacher's diffusion latents); nothing to write")
    return list(models)


def diffusability_entry(model, images: EvalImages, batch_size: int, device: torch.device, probe: bool,
                        seed: int) -> dict[str, Any] | None:
    """A KL VAE's "diffusability": spectra and equivariance on the evaluation images, the probe (it trains) on
    request; None for a tiny autoencoder (no posterior: TINY_LATENTS_REASON)."""
    if isinstance(model, TinyAutoencoder):
        return None
    entry = D.diffusability_metrics(model, images.images, batch_size, device)
    if probe:
        entry["probe"] = D.diffusability_probe(model, D.ProbeConfig(seed=seed))
    return entry


def evaluate(models: list[str], data: str, out: str | Path, resolution: int = 256, num_images: int | None = None,
             batch_size: int = 8, sample: bool = False, write_config: bool = False, write_latent_stats: bool = False,
             shift: bool | None = None, lpips_net: str = "alex", device: str | torch.device | None = None,
             seed: int = 0, worst_k: int = 4, progress: bool = True, lpips_network: torch.nn.Module | None = None,
             fid_feature: torch.nn.Module | None = None, diffusability_probe: bool = False,
             teacher: str | None = None, force: bool = False, preset: str | None = None,
             skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate `models` on the same images from `data`; write metrics.json, report.md and pictures into `out`.

    Everything is checked (flags, --write-config targets, images, every model) before any work. `shift`: see
    `metrics.uses_shift`. `lpips_network` / `fid_feature` force networks in instead of the pretrained ones (tests
    only). `teacher`: the KL VAE the tiny autoencoders among `models` are compared with (`find_teacher`; added to
    the models when not among them). `skip`: sections of SKIPPABLE left out. A line on stderr says what runs next,
    progress bar or not. Returns the metrics.json content (as Python values, with float infinities).
    """
    models = check_request(models, teacher, batch_size, num_images, write_config, force)
    if diffusability_probe and "diffusability" in skip:
        raise EvaluationError("--diffusability-probe contradicts --skip diffusability")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    images = load_split_images(data, resolution, num_images)
    loaded = load_models(models, resolution, preset)
    names = model_names(models)
    teacher_index = find_teacher(models, loaded, teacher)
    teacher_model = loaded[teacher_index] if teacher_index is not None else None
    status(f"evaluating {_plural(len(models), 'model')} on {describe_images(data, images)} at {resolution} px")

    lpips_metric = M.LPIPSMetric(lpips_net, device=device, network=lpips_network)
    labels = image_labels(images.names, images.splits)
    result = result_header(data, resolution, images, sample, skip)
    for path, name in zip(models, names):
        model = prepare_for_inference(loaded.pop(0), device)
        fid_metric = M.FIDMetric(device=device, feature=fid_feature)
        status(f"{name}: reconstructing {_plural(len(images.names), 'image')}")
        run_ = evaluate_model(model, name, images.images, batch_size=batch_size, sample=sample, device=device,
                              seed=seed, lpips_metric=lpips_metric, fid_metric=fid_metric, worst_k=worst_k,
                              progress=progress, splits=images.splits, shift=shift)
        entry = run_.metrics
        entry["path"] = str(path)
        entry["warnings"] += heldout_warnings(path, name, images)
        status(f"{name}: drawing pictures into {out / name}")
        entry["pictures"] = write_pictures(run_, labels, out / name)
        if write_config:
            entry["config_written"] = str(write_latent_config(path, entry["latents"], write_latent_stats))
            counts = {split: len(names) for split, names in result["splits"].items()}
            add_evaluation(path, evaluation_lines(entry, data, resolution, counts))  # the card, if the folder has ours
        entry.update(model_sections_entry(model, name, images, batch_size, device, diffusability_probe, seed, skip))
        if isinstance(model, TinyAutoencoder) and teacher_model is not None:
            status(f"{name}: comparing with the teacher {names[teacher_index]}")
            entry["teacher"] = compare_with_teacher(model, prepare_for_inference(teacher_model, device),
                                                    names[teacher_index], images.images, batch_size, device,
                                                    images.splits)
        result["models"][name] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    status(f"writing {out / 'metrics.json'} and {out / 'report.md'}")
    return write_results(result, images.names, out)


def result_header(data: str, resolution: int, images: EvalImages, sample: bool, skip: tuple[str, ...]
                  ) -> dict[str, Any]:
    """metrics.json's fields about the evaluation itself; the models' entries go into its "models"."""
    return {
        "data": data, "resolution": resolution, "num_images": len(images.names), "sample_posterior": sample,
        "available_images": images.available, "skipped_sections": list(skip),
        "splits": {split: [images.names[i] for i in indices] for split, indices in images.splits.items()},
        "skipped_images": len(images.skipped), "skipped_files": sorted(images.skipped),
        "skip_reasons": images.skipped, "latent_definitions": M.LATENT_STATISTICS_DOC, "models": {},
    }


def model_sections_entry(model, name: str, images: EvalImages, batch_size: int, device: torch.device, probe: bool,
                         seed: int, skip: tuple[str, ...]) -> dict[str, Any]:
    """A KL VAE's own latent factors (config.json), "diffusability" and "fp16" (None for a tiny autoencoder, or
    when `skip` names them), each announced on stderr."""
    if isinstance(model, TinyAutoencoder):
        return {"diffusability": None, "fp16": None}
    entry: dict[str, Any] = {"configured": {k: getattr(model.config, k) for k in ("scaling_factor", "shift_factor")},
                             "diffusability": None, "fp16": None}
    if "diffusability" not in skip:
        status(f"{name}: diffusability (latent and image spectra, equivariance"
               + (", training the probe)" if probe else ")"))
        entry["diffusability"] = diffusability_entry(model, images, batch_size, device, probe, seed)
    if "fp16" not in skip:  # fp16 safety (kl_autoencoder/fp16.py): activation peaks vs 65504, fp16 vs fp32
        status(f"{name}: fp16 safety (activation peaks, an fp16 encode and decode)")
        entry["fp16"] = fp16_entry(model, images.images)
    return entry


def status(message: str) -> None:
    """One line on stderr saying what comes next (each part takes seconds to minutes on a CPU), with the progress
    bar or without it."""
    print(message + " ...", file=sys.stderr, flush=True)


def write_results(result: dict[str, Any], image_names: list[str], out: Path) -> dict[str, Any]:
    """Complete `result` (headline, image names, the spectra picture) and write metrics.json and report.md."""
    result["headline"] = headline(result)
    result["image_names"] = image_names
    spectra = {m: e["diffusability"] for m, e in result["models"].items() if e["diffusability"] is not None}
    if spectra:
        result["diffusability_picture"] = save_figure(D.plot_spectra(spectra), out / "spectra.png").name
    write_json(out / "metrics.json", result)
    atomic_write_text(out / "report.md", render_report(result))
    return result
