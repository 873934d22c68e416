"""Evaluate one or more autoencoders on the same images: metrics.json, report.md and pictures.

For every model: reconstruct each image (posterior mode, or a sample with `sample=True`), score it (PSNR, SSIM,
MS-SSIM, LPIPS, rFID; see metrics.py), stream the latent statistics a diffusion model needs (scaling / shift
factors, per-channel moments and KL, active units) and time encode and decode. Output folder:

    metrics.json                  every number, per model ("models": {name: {...}}); strict JSON (inf -> "inf")
    report.md                     models side by side, latent statistics, worst images, warnings
    <model>/reconstructions.png   original | reconstruction | error, for the first images
    <model>/worst.png             the same for the images with the lowest PSNR
    <model>/latent_histograms.png per-channel histogram of diffusion-scaled latents against the N(0, 1) pdf
    <model>/latent_channels.png   posterior-mean channels of the first images

`write_config=True` stores the measured scaling_factor / shift_factor (and with `write_latent_stats` the
per-channel latents_mean / latents_std) into the model folder's config.json.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from kl_autoencoder import metrics as M
from kl_autoencoder.fastpath import prepare_for_inference
from kl_autoencoder.durable import atomic_write, atomic_write_text

GRID_IMAGES = 4        # first images shown in reconstructions.png
LATENT_IMAGES = 2      # images whose latent channels are drawn
KEPT_LATENTS = 20_000  # latent values per channel kept for the histograms


class EvaluationError(ValueError):
    """Bad evaluation input (model path, data source, flags); the message names the offending value."""


# --------------------------------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", nargs="+", required=True, metavar="PATH",
                        help="diffusers / pipeline folder, LDM single file or hub id (several: side by side)")
    parser.add_argument("--data", default="sample",
                        help='"sample" (built-in photos), an image folder, or a hub dataset name')
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json, report.md, pictures")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size in pixels (default 256)")
    parser.add_argument("--num-images", type=int, default=None, help="evaluate at most this many images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="decode z ~ q(z|x) instead of the posterior mode")
    parser.add_argument("--write-config", action="store_true",
                        help="store the measured scaling_factor / shift_factor in the model folder's config.json")
    parser.add_argument("--write-latent-stats", action="store_true",
                        help="with --write-config: also store per-channel latents_mean / latents_std")
    parser.add_argument("--lpips-net", choices=sorted(M.TORCHVISION_BACKBONE_FILES), default="alex")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for posterior samples")
    parser.add_argument("--worst-k", type=int, default=4, help="worst images (by PSNR) shown in the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `evaluate` from parsed arguments and print where the results went."""
    if args.write_latent_stats and not args.write_config:
        raise EvaluationError("--write-latent-stats only makes sense together with --write-config")
    result = evaluate(
        args.model, args.data, args.out, resolution=args.resolution, num_images=args.num_images,
        batch_size=args.batch_size, sample=args.sample, write_config=args.write_config,
        write_latent_stats=args.write_latent_stats, lpips_net=args.lpips_net, device=args.device, seed=args.seed,
        worst_k=args.worst_k, progress=not args.no_progress,
    )
    for name, entry in result["models"].items():
        print(f"{name}: PSNR {_fmt(entry['psnr'])} dB, SSIM {_fmt(entry['ssim'])}, "
              f"scaling_factor {entry['latents']['scaling_factor']:.5g}")
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    return result


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


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def load_model_for_eval(path: str, device: torch.device):
    from kl_autoencoder.model import KLAutoencoder

    try:
        model = KLAutoencoder.from_pretrained(path)
    except Exception as err:  # any failure to load is the user's path, said with the reason
        raise EvaluationError(f"could not load model {path!r}: {err}") from err
    return prepare_for_inference(model, device)


@torch.no_grad()
def evaluate_model(model, name: str, images: torch.Tensor, batch_size: int = 8, sample: bool = False,
                   device: torch.device | str = "cpu", seed: int = 0, lpips_metric: M.LPIPSMetric | None = None,
                   fid_metric: M.FIDMetric | None = None, worst_k: int = 4, autocast: bool = True,
                   progress: bool = True) -> ModelRun:
    """Reconstruct `images` ([N, 3, R, R] in [-1, 1]) with `model` and measure everything for one metrics.json entry."""
    device = torch.device(device)
    factor = model.config.downsampling_factor
    resolution = images.shape[-1]
    if images.shape[-2] % factor or images.shape[-1] % factor:
        raise EvaluationError(f"resolution {tuple(images.shape[-2:])} is not divisible by the model's downsampling "
                              f"factor {factor} (model {name!r})")
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = M.LatentStatistics(seed=seed, keep=KEPT_LATENTS)
    per_image: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "ms_ssim": [], "lpips": []}
    ms_ssim_error: str | None = None
    encode_s, decode_s, timed_images = 0.0, 0.0, 0
    run = ModelRun(name=name, metrics={})
    worst_heap: list[tuple[float, int, ImageRecord]] = []  # max-heap on PSNR via negation: keeps the k lowest
    batches = list(_batches(len(images), batch_size))

    for batch_index, rows in enumerate(tqdm(batches, desc=name, unit="batch", disable=not progress)):
        x = images[rows].to(device)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, autocast):
            posterior = model.encode(x)
            _sync(device)
            t1 = time.perf_counter()
            z = posterior.sample(generator) if sample else posterior.mode()
            reconstruction = model.decode(z)
            _sync(device)
            t2 = time.perf_counter()
        if batch_index > 0 or len(batches) == 1:  # the first batch pays for kernel selection / warm-up
            encode_s, decode_s, timed_images = encode_s + t1 - t0, decode_s + t2 - t1, timed_images + len(x)

        stats.update(posterior)
        original01, recon01 = M.to_unit_range(x), M.to_unit_range(reconstruction)
        batch_psnr = M.psnr(recon01, original01).cpu()
        per_image["psnr"].append(batch_psnr)
        per_image["ssim"].append(M.ssim(recon01, original01).cpu())
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
        if run.latent_means is None:
            run.latent_means = posterior.mean[:LATENT_IMAGES].float().cpu()

    latents = stats.result()
    run.scaled_latents = stats.kept_latents(latents["scaling_factor"], latents["shift_factor"])
    run.worst = [record for _, _, record in sorted(worst_heap, key=lambda e: (e[2].psnr, e[2].index))]
    run.metrics = {
        "psnr": M.summarize(torch.cat(per_image["psnr"])),
        "ssim": M.summarize(torch.cat(per_image["ssim"])),
        "ms_ssim": None,
        "lpips": None,
        "rfid": None,
        "latents": latents,
        "num_images": len(images),
        "resolution": resolution,
        "sample_posterior": sample,
        "speed": {
            "device": str(device),
            "encode_images_per_s": timed_images / encode_s if encode_s > 0 else None,
            "decode_images_per_s": timed_images / decode_s if decode_s > 0 else None,
            "batch_size": batch_size,
            "timed_images": timed_images,
        },
        "worst": [{"index": r.index, "psnr": r.psnr} for r in run.worst],
        "warnings": [],
    }
    if ms_ssim_error is None:
        run.metrics["ms_ssim"] = M.summarize(torch.cat(per_image["ms_ssim"]))
        run.metrics["ms_ssim"]["scales"] = M.ms_ssim_scales(resolution, resolution)
    else:
        run.metrics["ms_ssim_reason"] = ms_ssim_error
    if lpips_metric is not None and lpips_metric.available:
        run.metrics["lpips"] = M.summarize(torch.cat(per_image["lpips"]))
        run.metrics["lpips"]["net"] = lpips_metric.net
    else:
        run.metrics["lpips_reason"] = lpips_metric.reason if lpips_metric is not None else "LPIPS not requested"
    run.metrics.update(_rfid_entry(fid_metric, len(images)))
    if latents["collapsed_channels"]:
        message = (f"posterior collapse in {name!r}: {len(latents['collapsed_channels'])} of "
                   f"{len(latents['unit_activity'])} latent channels are inactive (activity <= "
                   f"{latents['activity_threshold']}): channels {latents['collapsed_channels']}")
        run.metrics["warnings"].append(message)
        warnings.warn(message, stacklevel=3)  # past the no_grad wrapper: the caller
    return run


def _rfid_entry(fid_metric: M.FIDMetric | None, num_images: int) -> dict[str, Any]:
    if fid_metric is None:
        return {"rfid": None, "rfid_reason": "rFID not requested"}
    if not fid_metric.available:
        return {"rfid": None, "rfid_reason": fid_metric.reason}
    if num_images < 2:
        return {"rfid": None, "rfid_reason": "rFID needs at least 2 images"}
    note = "one value for the whole image set (no std)"
    if num_images < 2048:
        note += f"; only {num_images} images (< 2048 Inception features): biased high, compare on the same set only"
    return {"rfid": {"mean": fid_metric.compute(), "std": None, "note": note}}


# --------------------------------------------------------------------------------------------------------------------
# Writing results.


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
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display: never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_reconstructions(records: list[ImageRecord], names: list[str], title: str):
    """Rows of original | reconstruction | |error| (mean over RGB, one colour scale for all rows).

    The rows are composed into one array and drawn on a single axes: many small axes are what makes matplotlib slow.
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
    dpi = 100  # about one screen pixel per image pixel up to 256 px, so artefacts stay visible
    fig, ax = plt.subplots(figsize=(max(6.0, 3 * size / dpi + 2), max(2.0, len(records) * size / dpi) + 0.8), dpi=dpi)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([size * 0.5, size * 1.5, size * 2.5], ["original", "reconstruction", "|error| (mean RGB)"])
    ax.set_yticks([size * (i + 0.5) for i in range(len(records))],
                  [f"{Path(names[r.index]).name[:24]}\n{r.psnr:.2f} dB" for r in records], fontsize=8)
    ax.tick_params(length=0)
    shown = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, vmax), cmap=cmap)
    fig.colorbar(shown, ax=ax, fraction=0.03, label="|error| (image range 0..1)")
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


def plot_latent_channels(means: torch.Tensor, names: list[str], title: str):
    """Posterior-mean channels of a few images, one row per image, each channel with its own colour scale."""
    plt = _pyplot()
    n, channels = means.shape[:2]
    fig, axes = plt.subplots(n, channels, figsize=(2.2 * channels, 2.2 * n), squeeze=False)
    for i in range(n):
        for c in range(channels):
            ax = axes[i, c]
            ax.imshow(means[i, c].numpy(), cmap="RdBu_r")
            ax.set_title(f"{Path(names[i]).name[:16]} c{c}", fontsize=7)
            ax.axis("off")
    fig.suptitle(title)
    return fig


def write_pictures(run: ModelRun, names: list[str], folder: Path) -> dict[str, str]:
    """The four pictures of one model; returns {kind: path relative to the output folder}."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {
        "reconstructions": plot_reconstructions(run.first, names, f"{run.name}: first images"),
        "latent_histograms": plot_latent_histograms(run.scaled_latents, f"{run.name}: scaled latents vs N(0, 1)"),
        "latent_channels": plot_latent_channels(run.latent_means, names, f"{run.name}: posterior means"),
    }
    if run.worst:
        pictures["worst"] = plot_reconstructions(run.worst, names, f"{run.name}: lowest PSNR")
    written = {}
    for kind, fig in pictures.items():
        save_figure(fig, folder / f"{kind}.png")
        written[kind] = f"{folder.name}/{kind}.png"
    return written


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


def render_report(result: dict[str, Any], names: list[str], pictures: dict[str, dict[str, str]]) -> str:
    """report.md: models side by side, then latent statistics, worst images and warnings per model."""
    models = result["models"]
    header = list(models)
    lines = [
        "# Autoencoder evaluation", "",
        f"{result['num_images']} images from `{result['data']}` at {result['resolution']} px; reconstructions from "
        f"the posterior {'sample' if result['sample_posterior'] else 'mode'}. Image metrics: mean ± std over images. "
        "All numbers: `metrics.json`.", "",
        "| metric | " + " | ".join(f"`{m}`" for m in header) + " |",
        "|---|" + "---|" * len(header),
    ]
    rows = [("PSNR (dB) ↑", "psnr"), ("SSIM ↑", "ssim"), ("MS-SSIM ↑", "ms_ssim"), ("LPIPS ↓", "lpips"),
            ("rFID ↓", "rfid")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(models[m][key]) for m in header) + " |")
    latent_rows = [("scaling_factor", lambda e: f"{e['latents']['scaling_factor']:.5g}"),
                   ("shift_factor", lambda e: f"{e['latents']['shift_factor']:.4g}"),
                   ("active channels",
                    lambda e: f"{e['latents']['active_units']} / {len(e['latents']['unit_activity'])}"),
                   ("KL per image (nats)", lambda e: f"{e['latents']['kl_total']:.4g}"),
                   ("encode images/s", lambda e: _speed(e["speed"]["encode_images_per_s"])),
                   ("decode images/s", lambda e: _speed(e["speed"]["decode_images_per_s"]))]
    for label, get in latent_rows:
        lines.append(f"| {label} | " + " | ".join(get(models[m]) for m in header) + " |")
    lines.append("")
    reasons = sorted({(k[: -len("_reason")], v) for m in header for k, v in models[m].items() if k.endswith("_reason")})
    for metric, reason in reasons:
        lines.append(f"- {metric} not reported: {reason}")
    if any(models[m]["ms_ssim"] and models[m]["ms_ssim"]["scales"] < len(M.MS_SSIM_WEIGHTS) for m in header):
        lines.append(f"- MS-SSIM at {result['resolution']} px uses fewer than 5 scales (coarsest side must hold the "
                     f"11-pixel window); the used weights are renormalized to sum to 1.")
    lines.append("")
    for m in header:
        entry, latents = models[m], models[m]["latents"]
        lines += [f"## `{m}`", "", f"Model: `{entry['path']}`", ""]
        for message in entry["warnings"]:
            lines += [f"> **Warning:** {message}", ""]
        lines += ["| channel | mean z | std z | mean μ | std μ | mean σ | KL (nats) | activity |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in range(len(latents["latents_mean"])):
            flag = " (collapsed)" if c in latents["collapsed_channels"] else ""
            lines.append(
                f"| {c}{flag} | {latents['latents_mean'][c]:.4g} | {latents['latents_std'][c]:.4g} | "
                f"{latents['channel_mean'][c]:.4g} | {latents['channel_std'][c]:.4g} | "
                f"{latents['posterior_std'][c]:.4g} | {latents['kl_per_channel'][c]:.4g} | "
                f"{latents['unit_activity'][c]:.4g} |")
        lines += ["", "z ~ q(z|x); μ, σ: posterior mean and std; KL summed over a channel's positions, averaged over "
                  "images; activity: variance of μ across images (threshold "
                  f"{latents['activity_threshold']}).", ""]
        if entry["worst"]:
            lines += ["Lowest PSNR: " + ", ".join(
                f"`{Path(names[w['index']]).name}` ({w['psnr']:.2f} dB)" for w in entry["worst"]), ""]
        lines += [f"![{kind}]({path})" for kind, path in pictures[m].items()] + [""]
    return "\n".join(lines)


def _speed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# --------------------------------------------------------------------------------------------------------------------
# Writing the measured latent statistics back into a model's config.json.


def config_json_for(model_path: str) -> Path:
    """The config.json that --write-config would update: a diffusers folder's, or a pipeline folder's vae/."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"--write-config needs a diffusers model folder with config.json; {model_path!r} is "
                              "not a local folder (convert it with `kl-autoencoder convert` first)")
    for candidate in (path / "config.json", path / "vae" / "config.json"):
        if candidate.is_file():
            return candidate
    raise EvaluationError(f"--write-config: {path} has no config.json (nor vae/config.json)")


def write_latent_config(model_path: str, latents: dict[str, Any], latent_stats: bool = False) -> Path:
    """Store scaling_factor / shift_factor (and per-channel latents_mean / latents_std) in a diffusers config.json."""
    config_path = config_json_for(model_path)
    if not math.isfinite(latents["scaling_factor"]):
        raise EvaluationError(f"--write-config: the measured scaling_factor is {latents['scaling_factor']} "
                              f"(all latents equal); {config_path} left unchanged")
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


def evaluate(models: list[str], data: str, out: str | Path, resolution: int = 256, num_images: int | None = None,
             batch_size: int = 8, sample: bool = False, write_config: bool = False, write_latent_stats: bool = False,
             lpips_net: str = "alex", device: str | torch.device | None = None, seed: int = 0, worst_k: int = 4,
             progress: bool = True, lpips_network: torch.nn.Module | None = None,
             fid_feature: torch.nn.Module | None = None) -> dict[str, Any]:
    """Evaluate `models` on the same images from `data`; write metrics.json, report.md and pictures into `out`.

    `lpips_network` / `fid_feature` force networks in instead of the pretrained ones (tests only). Returns the
    metrics.json content (as Python values, with float infinities).
    """
    from kl_autoencoder.data import load_eval_images

    if isinstance(models, str):
        models = [models]
    if not models:
        raise EvaluationError("no model given to evaluate")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if num_images is not None and num_images < 1:
        raise EvaluationError(f"num_images must be >= 1, got {num_images}")
    if write_config:  # refuse before spending time on the evaluation
        for path in models:
            config_json_for(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    try:
        names, images = load_eval_images(data, resolution, num_images)
    except (OSError, ValueError, RuntimeError) as err:
        raise EvaluationError(f"could not load evaluation images from {data!r}: {err}") from err
    if len(images) == 0:
        raise EvaluationError(f"no images in {data!r}")

    lpips_metric = M.LPIPSMetric(lpips_net, device=device, network=lpips_network)
    result: dict[str, Any] = {"data": data, "resolution": resolution, "num_images": len(images),
                              "sample_posterior": sample, "latent_definitions": M.LATENT_STATISTICS_DOC, "models": {}}
    pictures: dict[str, dict[str, str]] = {}
    for path, name in zip(models, model_names(models)):
        model = load_model_for_eval(path, device)
        fid_metric = M.FIDMetric(device=device, feature=fid_feature)
        run_ = evaluate_model(model, name, images, batch_size=batch_size, sample=sample, device=device, seed=seed,
                              lpips_metric=lpips_metric, fid_metric=fid_metric, worst_k=worst_k, progress=progress)
        run_.metrics["path"] = str(path)
        pictures[name] = write_pictures(run_, names, out / name)
        run_.metrics["pictures"] = pictures[name]
        if write_config:
            written = write_latent_config(path, run_.metrics["latents"], write_latent_stats)
            run_.metrics["config_written"] = str(written)
        result["models"][name] = run_.metrics
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["image_names"] = names
    write_json(out / "metrics.json", result)
    atomic_write_text(out / "report.md", render_report(result, names, pictures))
    return result
