"""Evaluate one or more autoencoders on the same images: metrics.json, report.md and pictures.

Every model is loaded and checked before any work, so a bad path fails before a picture is written. Then, per
model: reconstruct each image (posterior mode, or a sample with `sample=True`), score it (PSNR, SSIM, MS-SSIM,
LPIPS, rFID; see metrics.py), stream the latent statistics a diffusion model needs (the recommended scaling /
shift factors from metrics' one latent-scale estimator, per-channel moments and KL, active units) and time encode
and decode.

Images come in splits, reported separately and held-out first: the built-in `sample` source is its 2 held-out
photos, then its 12 training photos (data.SAMPLE_HELDOUT / SAMPLE_TRAIN); any other source is one split, "all".
The headline (report.md's first line, metrics.json's "headline") is the first split: the held-out one when there
is one.

    metrics.json                  "headline", "splits" (image names per split), "skipped_images" / "skipped_files",
                                  "models": {name: per-model dict}; strict JSON (inf -> "inf"). A per-model dict
                                  holds psnr / ssim / ms_ssim / lpips / rfid over all images, "splits": the image
                                  metrics per split, "latents", "speed", "worst", "warnings", "pictures"
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
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from kl_autoencoder import diffusability as D
from kl_autoencoder import metrics as M
from kl_autoencoder.data import SkipLog, load_eval_images
from kl_autoencoder.durable import atomic_write, atomic_write_text
from kl_autoencoder.fastpath import FastPath, autocast as fast_autocast, prepare_for_inference
from kl_autoencoder.formats import CONFIG_NAME, find_config_json
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiny import TinyAutoencoder

GRID_IMAGES = 4        # first images shown in reconstructions.png
LATENT_IMAGES = 2      # images whose latent channels are drawn
KEPT_LATENTS = 20_000  # latent values per channel kept for the histograms
HELD_OUT, TRAINING, ALL = "held-out", "training", "all"
IMAGE_METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "colour_error")  # per image, so reported per split
SHIFT_CHOICES = {"auto": None, "on": True, "off": False}


class EvaluationError(ValueError):
    """Bad evaluation input (model path, data source, flags); the message names the offending value."""


# --------------------------------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", nargs="+", required=True, metavar="PATH",
                        help="diffusers / pipeline folder, LDM single file or hub id (several: side by side)")
    parser.add_argument("--data", default="sample",
                        help='"sample" (built-in photos: 2 held-out, 12 training), an image folder, or a hub dataset')
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json, report.md, pictures")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size in pixels (default 256)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="evaluate at most this many images (held-out ones first)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="decode z ~ q(z|x) instead of the posterior mode")
    parser.add_argument("--write-config", action="store_true",
                        help="store the measured scaling_factor / shift_factor in the model folder's config.json")
    parser.add_argument("--write-latent-stats", action="store_true",
                        help="with --write-config: also store per-channel latents_mean / latents_std")
    parser.add_argument("--shift-factor", choices=sorted(SHIFT_CHOICES), default="auto",
                        help="whether the measured latent scale has a shift_factor; auto: only models with >= 16 "
                             "latent channels (the SD3/FLUX convention)")
    parser.add_argument("--lpips-net", choices=sorted(M.TORCHVISION_BACKBONE_FILES), default="alex")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for posterior samples")
    parser.add_argument("--worst-k", type=int, default=4, help="worst images (by PSNR) shown in the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--diffusability-probe", action="store_true",
                        help="also train the diffusability probe on crops of the sample photos (~1 min per VAE)")
    parser.add_argument("--teacher", default=None, metavar="PATH",
                        help="the KL VAE the tiny autoencoder(s) among --model were distilled from: evaluated "
                             "too, each tiny model compared with its decodes (default: the only KL VAE in --model)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `evaluate` from parsed arguments and print the headline and where the results went."""
    if args.write_latent_stats and not args.write_config:
        raise EvaluationError("--write-latent-stats only makes sense together with --write-config")
    result = evaluate(
        args.model, args.data, args.out, resolution=args.resolution, num_images=args.num_images,
        batch_size=args.batch_size, sample=args.sample, write_config=args.write_config,
        write_latent_stats=args.write_latent_stats, shift=SHIFT_CHOICES[args.shift_factor], lpips_net=args.lpips_net,
        device=args.device, seed=args.seed, worst_k=args.worst_k, progress=not args.no_progress,
        diffusability_probe=args.diffusability_probe, teacher=args.teacher,
    )
    headline = result["headline"]
    for name, values in headline["models"].items():
        entry = result["models"][name]
        detail = (f"scaling_factor {entry['latents']['scaling_factor']:.5g}" if entry["latents"] is not None else
                  f"vs teacher {_fmt(entry['teacher']['decode']['splits'][headline['split']]['psnr'])} dB (decode)"
                  if entry.get("teacher") else "tiny autoencoder")
        print(f"{name}: {headline['split']} images ({headline['num_images']}): PSNR {_fmt(values['psnr'])} dB, "
              f"SSIM {_fmt(values['ssim'])}, colour error {_fmt(values['colour_error'])}; {detail}")
    if result["skipped_images"]:
        print(f"skipped {_plural(result['skipped_images'], 'unreadable image')}: "
              + ", ".join(result["skipped_files"]))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    return result


# --------------------------------------------------------------------------------------------------------------------
# The images, in splits.


@dataclass
class EvalImages:
    """The evaluation images and where they come from."""
    names: list[str]
    images: torch.Tensor              # [N, 3, R, R] in [-1, 1]
    splits: dict[str, list[int]]      # split name -> image indices, in report order (held-out first)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> reason


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
    return EvalImages(names, torch.cat(parts), splits, skipped.reasons)


# --------------------------------------------------------------------------------------------------------------------
# Evaluating one model.


@dataclass
class ImageRecord:
    """What the pictures need of one image: its index, PSNR and uint8 original / reconstruction."""
    index: int
    psnr: float
    original: torch.Tensor
    reconstruction: torch.Tensor


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
    except (OSError, ValueError, AttributeError):  # unreadable: the KL loader reports it, naming the file
        return False


def load_model_for_eval(path: str) -> KLAutoencoder | TinyAutoencoder:
    """The model at `path` on the CPU (a tiny autoencoder by its config's class name); any failure is an
    EvaluationError naming the path."""
    try:
        return (TinyAutoencoder if is_tiny_autoencoder(path) else KLAutoencoder).from_pretrained(path)
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
            out[split][key] = M.summarize(per_image[key][index]) if key in per_image else None
    return out


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
    per_image: dict[str, list[torch.Tensor]] = {key: [] for key in IMAGE_METRICS}
    ms_ssim_error: str | None = None
    encode_s, decode_s, timed_images = 0.0, 0.0, 0
    run = ModelRun(name=name, metrics={})
    worst_heap: list[tuple[float, int, ImageRecord]] = []  # max-heap on PSNR via negation: keeps the k lowest
    starts = range(0, len(images), batch_size)

    for batch_index, start in enumerate(tqdm(starts, desc=name, unit="batch", disable=not progress)):
        rows = slice(start, min(start + batch_size, len(images)))
        x = images[rows].to(device)
        _sync(device)
        t0 = time.perf_counter()
        with fast_autocast(device, policy):
            posterior = model.encode(x)  # a tiny autoencoder's: the latents themselves
            _sync(device)
            t1 = time.perf_counter()
            if tiny:
                z = posterior
            else:
                z_sample = posterior.sample(generator)  # measured for the latent statistics either way
                z = z_sample if sample else posterior.mode()
            t2 = time.perf_counter()
            reconstruction = model.decode(z)
            _sync(device)
            t3 = time.perf_counter()
        if batch_index > 0 or len(starts) == 1:  # the first batch pays for kernel selection / warm-up
            encode_s, decode_s, timed_images = encode_s + t1 - t0, decode_s + t3 - t2, timed_images + len(x)

        if stats is not None:
            stats.update(posterior, z_sample)
        original01, recon01 = M.to_unit_range(x), M.to_unit_range(reconstruction)
        batch_psnr = M.psnr(recon01, original01).cpu()
        per_image["psnr"].append(batch_psnr)
        per_image["ssim"].append(M.ssim(recon01, original01).cpu())
        per_image["colour_error"].append(M.colour_error(recon01, original01).cpu())
        if ms_ssim_error is None:
            try:
                per_image["ms_ssim"].append(M.ms_ssim(recon01, original01).cpu())
            except ValueError as err:
                ms_ssim_error = str(err)
        if lpips_metric is not None and lpips_metric.available:
            per_image["lpips"].append(lpips_metric(recon01, original01))
        if fid_metric is not None and fid_metric.available:
            fid_metric.update(original01, recon01)

        original8, recon8 = _to_uint8(original01), _to_uint8(recon01)
        for offset, value in enumerate(batch_psnr.tolist()):
            index = rows.start + offset
            record = ImageRecord(index, value, original8[offset], recon8[offset])
            if index < GRID_IMAGES:
                run.first.append(record)
            entry = (-value, -index, record)  # ties: keep the earlier image
            if len(worst_heap) < worst_k:
                heapq.heappush(worst_heap, entry)
            elif worst_k and entry > worst_heap[0]:
                heapq.heapreplace(worst_heap, entry)
        if run.latent_means is None and not tiny:
            run.latent_means = posterior.mean[:LATENT_IMAGES].float().cpu()

    measured = {key: torch.cat(values) for key, values in per_image.items() if values}
    if ms_ssim_error is not None:
        measured.pop("ms_ssim", None)
    latents = stats.result() if stats is not None else None
    if latents is not None:
        run.scaled_latents = stats.kept_latents(latents["scaling_factor"], latents["shift_factor"])
    run.worst = [record for _, _, record in sorted(worst_heap, key=lambda e: (e[2].psnr, e[2].index))]
    split_of = {index: split for split, indices in splits.items() for index in indices}
    run.metrics = {
        "psnr": M.summarize(measured["psnr"]),
        "ssim": M.summarize(measured["ssim"]),
        "colour_error": M.summarize(measured["colour_error"]),
        "ms_ssim": None,
        "lpips": None,
        "rfid": None,
        "splits": _split_summaries(measured, splits),
        "latents": latents,
        "num_images": len(images),
        "resolution": images.shape[-1],
        "sample_posterior": sample and not tiny,
        "speed": {
            "device": str(device),
            "encode_images_per_s": timed_images / encode_s if encode_s > 0 else None,
            "decode_images_per_s": timed_images / decode_s if decode_s > 0 else None,
            "batch_size": batch_size,
            "timed_images": timed_images,
        },
        "worst": [{"index": r.index, "split": split_of.get(r.index), "psnr": r.psnr} for r in run.worst],
        "warnings": [],
    }
    if "ms_ssim" in measured:
        run.metrics["ms_ssim"] = M.summarize(measured["ms_ssim"])
        run.metrics["ms_ssim"]["scales"] = M.ms_ssim_scales(*images.shape[-2:])
    else:
        run.metrics["ms_ssim_reason"] = ms_ssim_error
    if "lpips" in measured:
        run.metrics["lpips"] = M.summarize(measured["lpips"])
        run.metrics["lpips"]["net"] = lpips_metric.net
    else:
        run.metrics["lpips_reason"] = lpips_metric.reason if lpips_metric is not None else "LPIPS not requested"
    run.metrics.update(_rfid_entry(fid_metric, len(images)))
    if tiny:
        run.metrics["latents_reason"] = TINY_LATENTS_REASON
    elif latents["collapsed_channels"] and len(images) > 1:  # one image has no variance across images to measure
        message = (f"posterior collapse in {name!r}: {len(latents['collapsed_channels'])} of "
                   f"{len(latents['unit_activity'])} latent channels are inactive (activity <= "
                   f"{latents['activity_threshold']}): channels {latents['collapsed_channels']}")
        run.metrics["warnings"].append(message)
        warnings.warn(message, stacklevel=3)  # past the no_grad wrapper: the caller
    return run


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
# Pictures.


def _strict_json(value: Any) -> Any:
    """Non-finite floats -> "inf" / "-inf" / "nan" strings, so metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(_strict_json(data), indent=2, allow_nan=False) + "\n")


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.1))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display: never open a window
    import matplotlib.pyplot as plt

    return plt


RECONSTRUCTION_COLUMNS = ("original", "reconstruction", "|error|\n(mean RGB)")
MIN_COLUMN_INCHES = 1.6  # wide enough for the longest column label at 10 pt: small images are shown enlarged


def plot_reconstructions(records: list[ImageRecord], labels: list[str], title: str):
    """Rows of original | reconstruction | |error| (mean over RGB, one colour scale for all rows).

    `labels[i]` names image i (row labels). The rows are composed into one array and drawn on a single axes: many
    small axes are what makes matplotlib slow.
    """
    import matplotlib

    plt = _pyplot()
    errors = [(r.original.float() - r.reconstruction.float()).abs().mean(0) / 255 for r in records]
    vmax = max(float(e.max()) for e in errors) or 1.0
    cmap = matplotlib.colormaps["magma"]
    rows = []
    for record, error in zip(records, errors):
        error_rgb = torch.from_numpy(cmap((error / vmax).numpy())[..., :3]).float()
        rows.append(torch.cat([record.original.permute(1, 2, 0).float() / 255,
                               record.reconstruction.permute(1, 2, 0).float() / 255, error_rgb], dim=1))
    grid = torch.cat(rows, dim=0).numpy()
    size = records[0].original.shape[-1]
    dpi = 100  # about one screen pixel per image pixel from 160 px up, so artefacts stay visible
    column = max(size / dpi, MIN_COLUMN_INCHES)
    fig, ax = plt.subplots(figsize=(3 * column + 2.8, len(records) * column + 1.2), dpi=dpi, layout="constrained")
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([size * 0.5, size * 1.5, size * 2.5], RECONSTRUCTION_COLUMNS)
    ax.set_yticks([size * (i + 0.5) for i in range(len(records))],
                  [f"{labels[r.index][:28]}\n{r.psnr:.2f} dB" for r in records], fontsize=8)
    ax.tick_params(length=0)
    shown = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, vmax), cmap=cmap)
    fig.colorbar(shown, ax=ax, fraction=0.05, label="|error| (image range 0..1)")
    ax.set_title(title)
    return fig


def plot_latent_histograms(scaled: torch.Tensor, title: str):
    """Histogram of each channel's diffusion-scaled latents against the standard normal density."""
    plt = _pyplot()
    channels = scaled.shape[1]
    cols = min(channels, 4)
    rows = math.ceil(channels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    grid = torch.linspace(-4, 4, 200)
    pdf = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    for c, ax in enumerate(axes.flat):
        if c >= channels:
            ax.axis("off")
            continue
        values = scaled[:, c].numpy()
        ax.hist(values, bins=60, range=(-4, 4), density=True, alpha=0.6, label="latents")
        ax.plot(grid.numpy(), pdf.numpy(), "k--", lw=1, label="N(0, 1)")
        ax.set_title(f"channel {c}: mean {values.mean():+.2f} std {values.std():.2f}", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_latent_channels(means: torch.Tensor, labels: list[str], title: str):
    """Posterior-mean channels of a few images, one row per image, each channel with its own colour scale."""
    plt = _pyplot()
    n, channels = means.shape[:2]
    fig, axes = plt.subplots(n, channels, figsize=(2.2 * channels, 2.2 * n), squeeze=False)
    for i in range(n):
        for c in range(channels):
            ax = axes[i, c]
            ax.imshow(means[i, c].numpy(), cmap="RdBu_r")
            ax.set_title(f"{labels[i][:16]} c{c}", fontsize=7)
            ax.axis("off")
    fig.suptitle(title)
    return fig


def image_labels(names: list[str], splits: dict[str, list[int]]) -> list[str]:
    """Short per-image labels for pictures: the file name, with its split when there are several."""
    labels = [Path(name).name for name in names]
    if len(splits) > 1:
        for split, indices in splits.items():
            for i in indices:
                labels[i] = f"{labels[i]} ({split})"
    return labels


def write_pictures(run: ModelRun, labels: list[str], folder: Path) -> dict[str, str]:
    """The four pictures of one model; returns {kind: path relative to the output folder}."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {"reconstructions": plot_reconstructions(run.first, labels, f"{run.name}: first images")}
    if run.scaled_latents is not None:  # not for a tiny autoencoder (no posterior)
        pictures["latent_histograms"] = plot_latent_histograms(run.scaled_latents,
                                                               f"{run.name}: scaled latents vs N(0, 1)")
        pictures["latent_channels"] = plot_latent_channels(run.latent_means, labels, f"{run.name}: posterior means")
    if run.worst:
        pictures["worst"] = plot_reconstructions(run.worst, labels, f"{run.name}: lowest PSNR")
    written = {}
    for kind, fig in pictures.items():
        save_figure(fig, folder / f"{kind}.png")
        written[kind] = f"{folder.name}/{kind}.png"
    return written


# --------------------------------------------------------------------------------------------------------------------
# report.md: a list of sections, each a function of the metrics.json content returning its lines.


def _fmt(summary: dict[str, Any] | None, digits: int = 4) -> str:
    if summary is None:
        return "n/a"
    mean, std = summary["mean"], summary.get("std")
    text = f"{mean:.{digits}g}" if math.isfinite(mean) else "inf"
    if std is not None:
        text += f" ± {std:.2g}"
    if summary.get("num_infinite"):
        text += f" ({summary['num_infinite']} exact)"
    return text


def _speed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _split_title(split: str) -> str:
    return {HELD_OUT: "held-out images", TRAINING: "training images", ALL: "all images"}.get(split, split)


def headline_section(result: dict[str, Any]) -> list[str]:
    headline = result["headline"]
    parts = [f"`{m}` PSNR {_fmt(v['psnr'])} dB, SSIM {_fmt(v['ssim'])}, colour error {_fmt(v['colour_error'])}"
             for m, v in headline["models"].items()]
    scope = f"{_split_title(headline['split'])} ({headline['num_images']} of {result['num_images']})"
    if headline["split"] != HELD_OUT:
        scope += ", no held-out images in this evaluation"
    return ["# Autoencoder evaluation", "", f"**Headline, {scope}:** " + "; ".join(parts) + ".", ""]


def image_metrics_section(result: dict[str, Any]) -> list[str]:
    """One table: a column per (split, model), held-out split first, the models side by side within a split."""
    models, splits = result["models"], result["splits"]
    columns = [(split, m) for split in splits for m in models]
    lines = [
        f"{result['num_images']} images from `{result['data']}` at {result['resolution']} px; reconstructions from "
        f"the posterior {'sample' if result['sample_posterior'] else 'mode'}. Image metrics: mean ± std over the "
        "images of a split. All numbers: `metrics.json`.", "",
        "| metric | " + " | ".join(f"{_split_title(s)} ({len(splits[s])}): `{m}`" for s, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, key in (("PSNR (dB) ↑", "psnr"), ("SSIM ↑", "ssim"), ("MS-SSIM ↑", "ms_ssim"), ("LPIPS ↓", "lpips"),
                       ("colour error (0-1) ↓", "colour_error")):
        lines.append(f"| {label} | " + " | ".join(_fmt(models[m]["splits"][s][key]) for s, m in columns) + " |")
    return lines + [""]


def teacher_section(result: dict[str, Any]) -> list[str]:
    """Each tiny autoencoder against its teacher's decodes, split by split, and its speed relative to the teacher."""
    models = result["models"]
    tiny = [m for m, e in models.items() if e.get("teacher")]
    if not tiny:
        return []
    lines = ["## Tiny autoencoders against their teacher", "",
             "decode: the student decoding the teacher's diffusion latents (of the posterior mode) against the "
             "teacher's decode of them, what a preview shows; round trip: the student's encode + decode against the "
             "same; latent RMSE: student encode vs the teacher's diffusion latents.", "",
             "| | " + " | ".join(f"`{m}` vs `{models[m]['teacher']['teacher']}`" for m in tiny) + " |",
             "|---|" + "---|" * len(tiny)]
    for split in result["splits"]:
        for kind, label in (("decode", "decode"), ("round_trip", "round trip")):
            for key, unit in (("psnr", " (dB) ↑"), ("ssim", " ↑")):
                lines.append(f"| {label} {key.upper()}{unit}, {_split_title(split)} | " + " | ".join(
                    _fmt(models[m]["teacher"][kind]["splits"][split][key]) for m in tiny) + " |")
    lines.append("| latent RMSE ↓ | " + " | ".join(_fmt(models[m]["teacher"]["latent_rmse"]) for m in tiny) + " |")
    for kind in ("encode", "decode"):
        def ratio(m: str) -> str:
            ours, theirs = (models[name]["speed"][f"{kind}_images_per_s"]
                            for name in (m, models[m]["teacher"]["teacher"]))
            return "n/a" if not ours or not theirs else f"{ours / theirs:.3g}x"
        lines.append(f"| {kind} speed vs teacher | " + " | ".join(ratio(m) for m in tiny) + " |")
    return lines + [""]


def whole_set_section(result: dict[str, Any]) -> list[str]:
    """rFID, the latent scale and statistics, speed: measured over all images of every split."""
    models = result["models"]
    header = list(models)
    lines = [f"Over all {result['num_images']} images:", "",
             "| | " + " | ".join(f"`{m}`" for m in header) + " |", "|---|" + "---|" * len(header)]
    def latent(text: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
        return lambda e: "n/a (tiny)" if e["latents"] is None else text(e["latents"])

    rows = [("rFID ↓", lambda e: _fmt(e["rfid"])),
            ("scaling_factor", latent(lambda s: f"{s['scaling_factor']:.5g}")),
            ("shift_factor", latent(lambda s: "none" if s["shift_factor"] is None else f"{s['shift_factor']:.4g}")),
            ("active channels", latent(lambda s: f"{s['active_units']} / {len(s['unit_activity'])}")),
            ("KL per image (nats)", latent(lambda s: f"{s['kl_total']:.4g}")),
            ("encode images/s", lambda e: _speed(e["speed"]["encode_images_per_s"])),
            ("decode images/s", lambda e: _speed(e["speed"]["decode_images_per_s"]))]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(models[m]) for m in header) + " |")
    return lines + [""]


def notes_section(result: dict[str, Any]) -> list[str]:
    models = result["models"]
    lines = []
    reasons = sorted({(k[: -len("_reason")], v) for e in models.values() for k, v in e.items() if k.endswith("_reason")})
    for metric, reason in reasons:
        lines.append(f"- {metric} not reported: {reason}")
    if any(e["ms_ssim"] and e["ms_ssim"]["scales"] < len(M.MS_SSIM_WEIGHTS) for e in models.values()):
        lines.append(f"- MS-SSIM at {result['resolution']} px uses fewer than 5 scales (coarsest side must hold the "
                     f"11-pixel window); the used weights are renormalized to sum to 1.")
    lines.append("- scaling_factor: 1 / std of posterior samples z; shift_factor: their mean, only for models with "
                 ">= 16 latent channels unless `--shift-factor` says otherwise (metrics.py).")
    return lines + [""]


def skipped_section(result: dict[str, Any]) -> list[str]:
    if not result["skipped_images"]:
        return []
    lines = [f"**Skipped {_plural(result['skipped_images'], 'unreadable image')}** (not evaluated):", ""]
    lines += [f"- `{path}`: {reason}" for path, reason in result["skip_reasons"].items()]
    return lines + [""]


def channel_table(latents: dict[str, Any]) -> list[str]:
    """A KL VAE's per-channel latent statistics as a table, with its legend."""
    lines = ["| channel | mean z | std z | mean μ | std μ | mean σ | KL (nats) | activity |",
             "|---|---|---|---|---|---|---|---|"]
    for c in range(len(latents["latents_mean"])):
        flag = " (collapsed)" if c in latents["collapsed_channels"] else ""
        lines.append(
            f"| {c}{flag} | {latents['latents_mean'][c]:.4g} | {latents['latents_std'][c]:.4g} | "
            f"{latents['channel_mean'][c]:.4g} | {latents['channel_std'][c]:.4g} | "
            f"{latents['posterior_std'][c]:.4g} | {latents['kl_per_channel'][c]:.4g} | "
            f"{latents['unit_activity'][c]:.4g} |")
    return lines + ["", "z ~ q(z|x); μ, σ: posterior mean and std; KL summed over a channel's positions, averaged over "
                    "images; activity: variance of μ across images (threshold "
                    f"{latents['activity_threshold']}).", ""]


def model_sections(result: dict[str, Any]) -> list[str]:
    """Per model: warnings, per-channel latent statistics, worst images, pictures."""
    names, lines = result["image_names"], []
    for m, entry in result["models"].items():
        latents = entry["latents"]
        lines += [f"## `{m}`", "", f"Model: `{entry['path']}`", ""]
        for message in entry["warnings"]:
            lines += [f"> **Warning:** {message}", ""]
        if latents is None:  # a tiny autoencoder
            lines += [f"Latent statistics: n/a ({entry.get('latents_reason', 'not measured')}).", ""]
        else:
            lines += channel_table(latents)
        if entry["worst"]:
            lines += ["Lowest PSNR: " + ", ".join(
                f"`{Path(names[w['index']]).name}` ({w['split']}, {w['psnr']:.2f} dB)" for w in entry["worst"]), ""]
        lines += [f"![{kind}]({path})" for kind, path in entry["pictures"].items()] + [""]
    return lines


def diffusability_section(result: dict[str, Any]) -> list[str]:
    return D.report_lines(result["models"], picture=result.get("diffusability_picture"))


ReportSection = Callable[[dict[str, Any]], list[str]]
REPORT_SECTIONS: list[ReportSection] = [
    headline_section, image_metrics_section, teacher_section, whole_set_section, notes_section, skipped_section,
    diffusability_section, model_sections,
]


def render_report(result: dict[str, Any], sections: list[ReportSection] | None = None) -> str:
    """report.md from the metrics.json content: the lines of each section in turn (default REPORT_SECTIONS)."""
    return "\n".join(line for section in (sections or REPORT_SECTIONS) for line in section(result))


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
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_models(paths: list[str], resolution: int) -> list[KLAutoencoder]:
    """Every model, loaded on the CPU and checked against the resolution, before any evaluation work."""
    models = []
    for path, name in zip(paths, model_names(paths)):
        model = load_model_for_eval(path)
        check_resolution(model, name, resolution, resolution)
        models.append(model)
    return models


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The first split's image metrics per model: the held-out images when the source has them."""
    split = next(iter(result["splits"]))
    return {"split": split, "num_images": len(result["splits"][split]),
            "models": {m: {k: e["splits"][split][k] for k in IMAGE_METRICS} for m, e in result["models"].items()}}


def evaluate(models: list[str], data: str, out: str | Path, resolution: int = 256, num_images: int | None = None,
             batch_size: int = 8, sample: bool = False, write_config: bool = False, write_latent_stats: bool = False,
             shift: bool | None = None, lpips_net: str = "alex", device: str | torch.device | None = None,
             seed: int = 0, worst_k: int = 4, progress: bool = True, lpips_network: torch.nn.Module | None = None,
             fid_feature: torch.nn.Module | None = None, diffusability_probe: bool = False,
             teacher: str | None = None) -> dict[str, Any]:
    """Evaluate `models` on the same images from `data`; write metrics.json, report.md and pictures into `out`.

    Everything is checked (flags, --write-config targets, images, every model) before any work. `shift`: see
    `metrics.uses_shift`. `lpips_network` / `fid_feature` force networks in instead of the pretrained ones (tests
    only). `teacher`: the KL VAE the tiny autoencoders among `models` are compared with (`find_teacher`; added to
    the models when not among them). Returns the metrics.json content (as Python values, with float infinities).
    """
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
            config_json_for(path)
            if is_tiny_autoencoder(path):
                raise EvaluationError(f"--write-config: {path!r} is a tiny autoencoder, whose latent scale is 1 by "
                                      "construction (it outputs its teacher's diffusion latents); nothing to write")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    images = load_split_images(data, resolution, num_images)
    loaded = load_models(models, resolution)
    teacher_index = find_teacher(models, loaded, teacher)
    teacher_model = loaded[teacher_index] if teacher_index is not None else None

    lpips_metric = M.LPIPSMetric(lpips_net, device=device, network=lpips_network)
    labels = image_labels(images.names, images.splits)
    result: dict[str, Any] = {
        "data": data, "resolution": resolution, "num_images": len(images.names), "sample_posterior": sample,
        "splits": {split: [images.names[i] for i in indices] for split, indices in images.splits.items()},
        "skipped_images": len(images.skipped), "skipped_files": sorted(images.skipped),
        "skip_reasons": images.skipped, "latent_definitions": M.LATENT_STATISTICS_DOC, "models": {},
    }
    for path, name in zip(models, model_names(models)):
        model = prepare_for_inference(loaded.pop(0), device)
        fid_metric = M.FIDMetric(device=device, feature=fid_feature)
        run_ = evaluate_model(model, name, images.images, batch_size=batch_size, sample=sample, device=device,
                              seed=seed, lpips_metric=lpips_metric, fid_metric=fid_metric, worst_k=worst_k,
                              progress=progress, splits=images.splits, shift=shift)
        run_.metrics["path"] = str(path)
        run_.metrics["pictures"] = write_pictures(run_, labels, out / name)
        if write_config:
            written = write_latent_config(path, run_.metrics["latents"], write_latent_stats)
            run_.metrics["config_written"] = str(written)
        if isinstance(model, TinyAutoencoder):  # no posterior: no diffusability (TINY_LATENTS_REASON)
            run_.metrics["diffusability"] = None
            if teacher_model is not None:
                run_.metrics["teacher"] = compare_with_teacher(
                    model, prepare_for_inference(teacher_model, device), model_names(models)[teacher_index],
                    images.images, batch_size, device, images.splits)
        else:
            # Diffusability: spectra and equivariance on the evaluation images; the probe (it trains) on request.
            run_.metrics["diffusability"] = D.diffusability_metrics(model, images.images, batch_size, device)
            if diffusability_probe:
                run_.metrics["diffusability"]["probe"] = D.diffusability_probe(model, D.ProbeConfig(seed=seed))
        result["models"][name] = run_.metrics
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["headline"] = headline(result)
    result["image_names"] = images.names
    spectra = {m: e["diffusability"] for m, e in result["models"].items() if e["diffusability"] is not None}
    if spectra:
        result["diffusability_picture"] = save_figure(D.plot_spectra(spectra), out / "spectra.png").name
    write_json(out / "metrics.json", result)
    atomic_write_text(out / "report.md", render_report(result))
    return result
