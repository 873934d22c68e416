"""The evaluation run: every model loaded and checked first, then one pass per model over the same images, then
metrics.json, report.md and the pictures (`evaluate`), and `run` for the command line. Each step's work lives in
its sibling room; this module only joins them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from kl_autoencoder import diffusability as D
from kl_autoencoder import metrics as M
from kl_autoencoder.evaluation.arguments import EVALUATION_FILES, SHIFT_CHOICES
from kl_autoencoder.evaluation.errors import EvaluationError
from kl_autoencoder.evaluation.latent_config import check_latent_scale_writable, config_json_for, write_latent_config
from kl_autoencoder.evaluation.models import is_tiny_autoencoder, load_models, model_names, same_model_path
from kl_autoencoder.evaluation.one_pass import evaluate_model
from kl_autoencoder.evaluation.pictures import image_labels, write_pictures
from kl_autoencoder.evaluation.report import headline_scope, _fmt, _plural
from kl_autoencoder.evaluation.results import result_header, write_results
from kl_autoencoder.evaluation.splits import EvalImages, describe_images, heldout_warnings, load_split_images
from kl_autoencoder.evaluation.teacher import compare_with_teacher, find_teacher
from kl_autoencoder.fastpath import prepare_for_inference
from kl_autoencoder.fp16 import fp16_entry
from kl_autoencoder.model_card import add_evaluation, evaluation_lines
from kl_autoencoder.outputs import check_output
from kl_autoencoder.spelling import check_source_spelling
from kl_autoencoder.tiny import TinyAutoencoder
from kl_autoencoder.untrusted import shown


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
# The whole evaluation.


def check_request(models: list[str] | str, teacher: str | None, batch_size: int, num_images: int | None,
                  write_config: bool, force: bool = False) -> list[str]:
    """The model paths to evaluate (the teacher added when not among them), after checking every flag and
    --write-config target: an EvaluationError before any work."""
    if isinstance(models, str):
        models = [models]
    if not models:
        raise EvaluationError("no model given to evaluate")
    if teacher is not None and not any(same_model_path(path, teacher) for path in models):
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
        for message in heldout_warnings(path, name, images):
            status(message)
            entry["warnings"].append(message)
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
