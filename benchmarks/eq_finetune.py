"""An equivariance (EQ-VAE) fine-tune against an equally long plain fine-tune of a trained VAE.

    OMP_NUM_THREADS=1 python benchmarks/eq_finetune.py [--model PATH] [--steps 200] [--probe-seeds 0 1]
    python benchmarks/eq_finetune.py --tiny --out /tmp/eq     # seconds: bookkeeping only, the numbers mean nothing

Start: --model, default outputs/quickstart/vae when it exists and is newer than tests/assets/trained-f8, else that
asset (a quickstart-size f8 VAE trained on the sample photos). Two fine-tunes through the production loop,
`train(load_config("configs/eq-finetune.yaml", overrides))`, identical but for EQ-VAE's objective: same steps, seed,
data (the built-in sample photos, training split, random 64-px crops at random scales as the quickstart trained),
optimizer, learning rate and EMA;
  plain: loss.equivariance.probability=0 and low_res_probability=0
  EQ:    loss.equivariance as shipped (on a share --eq-probability of the steps, the pair is the decode of the latent
         downscaled by s in [0.25, 1) and turned 1-3 quarter turns, against the same transform of the image; on a
         quarter of the other steps, EQ-VAE's p_prior_s, the plain pair at a resolution lowered by such an s).
CPU settings on both sides: mixed_precision=no, perceptual_weight=0 (no VGG weights offline; the start model was
trained without LPIPS too), the GAN off (the start model was trained without one; a fresh discriminator would be a
third difference), no gradient accumulation, and --lr as the per-step rate (optim.scale_lr=false) in place of the
shipped 4.5e-6 x total batch (EQ-VAE's 7.2e-4 at 160 images a step; --batch-size images a step here).

Measured for the start model, plain and EQ, all on held-out data (the two photos the training split leaves out):
  - high-frequency share of the latent (posterior mean) and of the image, and equivariance PSNR of decode(T(mu))
    against T(x) (x1/2, x1/4, rot90, and a flip, which neither fine-tune trains), on the probe's held-out crops
    (ProbeConfig: random 128-px crops at native resolution);
  - the probe's held-out denoising loss (`diffusability_probe`, the same ProbeConfig and seeds for every model;
    standardised latents), one probe per --probe-seeds seed;
  - held-out PSNR of the posterior-mode reconstruction on the same crops and on the two whole photos
    (`load_eval_images("sample:heldout", --photo-resolution)`).
Writes OUT/eq_finetune.json and OUT/eq_finetune.md (a table with the differences last) and prints the table.
Cost with --probe-seeds 0 1 (2026-11-26, shared 2-core CPU, 1 thread): 511 s CPU, 707 s wall (each fine-tune ~110 s,
each probe 55-90 s); one probe seed saves about a third.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from harness import ROOT, command_line, read_jsonl, write_json

from kl_autoencoder import diffusability as D
from kl_autoencoder.config import load_config
from kl_autoencoder.data import load_eval_images
from kl_autoencoder.durable import atomic_write_text
from kl_autoencoder.metrics import psnr, to_unit_range
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.trainer import train

RECIPE = ROOT / "configs" / "eq-finetune.yaml"
ASSET = ROOT / "tests" / "assets" / "trained-f8"
QUICKSTART = ROOT / "outputs" / "quickstart" / "vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
MODELS = ("original", "plain", "EQ")
# The tiny mode's budget: enough to run every code path once, in seconds.
TINY_PROBE = D.ProbeConfig(resolution=32, train_crops=8, heldout_crops=4, steps=2, batch_size=4, width=8,
                           eval_timesteps=(100, 500))


def default_model() -> tuple[Path, str]:
    """(start model, why): the quickstart export when it exists and is newer than the test asset, else the asset."""
    if (QUICKSTART / WEIGHTS).is_file() and (QUICKSTART / WEIGHTS).stat().st_mtime > (ASSET / WEIGHTS).stat().st_mtime:
        return QUICKSTART, "the quickstart export (newer than tests/assets/trained-f8)"
    return ASSET, "tests/assets/trained-f8 (no newer outputs/quickstart/vae)"


def finetune_overrides(args: argparse.Namespace, model: Path, output_dir: Path, eq: bool) -> list[str]:
    """configs/eq-finetune.yaml overrides for one run; the two runs differ only in EQ-VAE's objective
    (loss.equivariance.probability, and the low-resolution branch, which plain turns off)."""
    return [
        f"model.pretrained={model}", f"train.output_dir={output_dir}", "train.overwrite=true",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.seed={args.seed}",
        "train.mixed_precision=no", "train.checkpoint_every=0", "train.keep_checkpoints=1", "train.image_every=0",
        f"train.log_every={max(1, args.steps // 10)}", f"train.scaling_images={args.scaling_images}",
        "data.source=sample", "data.split=train", f"data.resolution={args.resolution}", "data.num_workers=0",
        "loss.perceptual_weight=0", "loss.gan.enabled=false", f"optim.lr={args.lr}", "optim.scale_lr=false",
        "train.grad_accum_steps=1", f"loss.equivariance.probability={args.eq_probability if eq else 0}",
    ] + ([] if eq else ["loss.equivariance.low_res_probability=0"])


def finetune(args: argparse.Namespace, model: Path, output_dir: Path, eq: bool) -> dict[str, Any]:
    """One fine-tune through the production loop; returns its export path, overrides, time and training log."""
    overrides = finetune_overrides(args, model, output_dir, eq)
    started = time.perf_counter()
    export = train(load_config(RECIPE, overrides))
    seconds = time.perf_counter() - started
    summary = json.loads((output_dir / "summary.json").read_text())
    return {"export": str(export), "overrides": overrides, "seconds": seconds, "steps": summary["steps"],
            "perceptual_weights": summary["perceptual_weights"], "log": read_jsonl(output_dir / "metrics.jsonl")}


@torch.no_grad()
def reconstruction_psnr(model: KLAutoencoder, images: torch.Tensor, batch_size: int = 16) -> float:
    """Mean PSNR (dB) of decode(posterior mode) against `images` ([N, 3, H, W] in [-1, 1])."""
    scores = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        scores.append(psnr(to_unit_range(model.decode(model.encode(x).mode())), to_unit_range(x)))
    return float(torch.cat(scores).mean())


def measure(model: KLAutoencoder, crops: torch.Tensor, photos: torch.Tensor, probes: list[D.ProbeConfig]
            ) -> dict[str, Any]:
    """Every measure of the table for one model (see the module docstring)."""
    model.eval()
    started = time.perf_counter()
    cheap = D.diffusability_metrics(model, crops)
    result: dict[str, Any] = {
        "hf_share_latent": cheap["spectrum"]["latent"]["high_frequency_share"],
        "hf_share_image": cheap["spectrum"]["image"]["high_frequency_share"],
        "equivariance_psnr": {name: s["mean"] for name, s in cheap["equivariance_psnr"].items()},
        "equivariance_skipped": cheap["equivariance_skipped"],
        "psnr_heldout_crops": reconstruction_psnr(model, crops),
        "psnr_heldout_photos": reconstruction_psnr(model, photos),
        "scaling_factor": model.config.scaling_factor,
    }
    result["cheap_seconds"] = time.perf_counter() - started
    result["probes"] = []
    for config in probes:
        run = D.diffusability_probe(model, config)
        result["probes"].append({key: run[key] for key in ("heldout_loss", "heldout_loss_mean", "train_loss_mean",
                                                           "final_training_loss", "latent_std", "seconds",
                                                           "warnings")} | {"seed": config.seed})
    result["probe_loss_mean"] = sum(p["heldout_loss_mean"] for p in result["probes"]) / len(probes)
    return result


def table_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, float]]]:
    """(measure, better direction, {model: value}) in table order."""
    def column(value) -> dict[str, float]:
        return {m: value(r) for m, r in results.items()}

    def seed_mean(r: dict[str, Any], t: str) -> float:
        return sum(p["heldout_loss"][t] for p in r["probes"]) / len(r["probes"])

    first = results[MODELS[0]]
    rows = [("HF share, latent", "↓", column(lambda r: r["hf_share_latent"])),
            ("HF share, image", "", column(lambda r: r["hf_share_image"]))]
    rows += [(f"equivariance PSNR {name} (dB)", "↑", column(lambda r, name=name: r["equivariance_psnr"][name]))
             for name in first["equivariance_psnr"]]
    rows += [(f"probe held-out loss, seed {probe['seed']}", "↓",
              column(lambda r, i=i: r["probes"][i]["heldout_loss_mean"])) for i, probe in enumerate(first["probes"])]
    if len(first["probes"]) > 1:
        rows.append(("probe held-out loss, mean of seeds", "↓", column(lambda r: r["probe_loss_mean"])))
    rows += [(f"probe held-out loss at t = {t}, mean of seeds", "↓", column(lambda r, t=t: seed_mean(r, t)))
             for t in first["probes"][0]["heldout_loss"]]
    rows += [("PSNR held-out crops (dB)", "↑", column(lambda r: r["psnr_heldout_crops"])),
             ("PSNR held-out photos (dB)", "↑", column(lambda r: r["psnr_heldout_photos"]))]
    return rows


def differences(values: dict[str, float]) -> dict[str, float]:
    return {"plain - original": values["plain"] - values["original"], "EQ - plain": values["EQ"] - values["plain"]}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| measure | original | plain | EQ | plain − original | EQ − plain |", "|---|---|---|---|---|---|"]
    for name, better, values in table_rows(results):
        digits = 2 if "dB" in name else 4
        diff = differences(values)
        cells = [f"{values[m]:.{digits}f}" for m in MODELS] + [f"{v:+.{digits}f}" for v in diff.values()]
        lines.append(f"| {name} {better}".rstrip() + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict[str, dict[str, Any]], max_psnr_cost: float = 0.5) -> dict[str, Any]:
    """The issue's target, EQ against plain: lower probe loss and latent HF share at <= 0.5 dB held-out PSNR cost."""
    eq, plain = results["EQ"], results["plain"]
    checks = {
        "probe_loss_lower": eq["probe_loss_mean"] < plain["probe_loss_mean"],
        "hf_share_lower": eq["hf_share_latent"] < plain["hf_share_latent"],
        "psnr_cost_within": plain["psnr_heldout_crops"] - eq["psnr_heldout_crops"] <= max_psnr_cost
        and plain["psnr_heldout_photos"] - eq["psnr_heldout_photos"] <= max_psnr_cost,
    }
    return checks | {"met": all(checks.values())}


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system): on a shared CPU, wall time says more about the neighbours."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--model", type=Path, default=None, help="start VAE (default: see the module docstring)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "eq_finetune", help="runs, JSON and table")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each fine-tune")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64, help="training crop size (the quickstart's)")
    p.add_argument("--lr", type=float, default=2e-4, help="both runs, per step (the recipe: 4.5e-6 x total batch)")
    p.add_argument("--eq-probability", type=float, default=0.5, help="the EQ run's loss.equivariance.probability")
    p.add_argument("--seed", type=int, default=0, help="train.seed of both runs")
    p.add_argument("--scaling-images", type=int, default=256, help="crops that set each export's scaling_factor")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=[0], help="one probe per seed, every model")
    p.add_argument("--probe-steps", type=int, default=D.ProbeConfig().steps)
    p.add_argument("--photo-resolution", type=int, default=256, help="size of the two whole held-out photos")
    p.add_argument("--tiny", action="store_true", help="seconds-long run for tests: 2 steps, 32 px, a 2-step probe")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.resolution, args.scaling_images = 2, 2, 32, 4
        args.photo_resolution = 32
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    model_path, why = (args.model, "--model") if args.model is not None else default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {"plain": finetune(args, model_path, args.out / "plain", eq=False),
            "EQ": finetune(args, model_path, args.out / "eq", eq=True)}
    probe_base = TINY_PROBE if args.tiny else D.ProbeConfig(steps=args.probe_steps)
    probes = [dataclasses.replace(probe_base, seed=seed, latent_scale="measured") for seed in args.probe_seeds]
    _, crops = D.probe_pixels(probes[0])  # the probe's held-out crops (seed of the first probe), for every model
    _, photos = load_eval_images("sample:heldout", args.photo_resolution)
    paths = {"original": model_path, "plain": Path(runs["plain"]["export"]), "EQ": Path(runs["EQ"]["export"])}
    results = {}
    for name in MODELS:
        print(f"measuring {name} ({paths[name]})", flush=True)
        results[name] = measure(KLAutoencoder.from_pretrained(paths[name]), crops, photos, probes)
    table = markdown_table(results)
    command = "OMP_NUM_THREADS=1 " + command_line("eq_finetune.py", argv)
    report = {
        "date": datetime.date.today().isoformat(), "command": command.strip(), "machine": platform.platform(),
        "threads": torch.get_num_threads(), "start_model": str(model_path), "start_model_why": why,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "probe_configs": [dataclasses.asdict(p) for p in probes], "runs": runs, "results": results,
        "differences": {name: differences(values) for name, _, values in table_rows(results)},
        "target": verdict(results), "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds(),
    }
    write_json(args.out / "eq_finetune.json", report, indent=1)
    header = (f"Start: {why}. {args.steps} steps each, lr {args.lr}, batch {args.batch_size} x {args.resolution} px; "
              f"EQ probability {args.eq_probability}; probe seeds {args.probe_seeds}, "
              f"{probes[0].steps} steps. Total {report['seconds']:.0f} s wall, {report['cpu_seconds']:.0f} s CPU "
              f"({torch.get_num_threads()} thread(s)).")
    atomic_write_text(args.out / "eq_finetune.md", f"{header}\n\n{table}\n")
    print(f"{header}\n\n{table}\n\ntarget (EQ vs plain): {report['target']}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
