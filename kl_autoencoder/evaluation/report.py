"""report.md and metrics.json of an evaluation: the report is a list of sections, each a function of the
metrics.json content (as Python values) returning its markdown lines; metrics.json is strict JSON (inf -> "inf").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from kl_autoencoder import diffusability as D
from kl_autoencoder import fp16 as F16
from kl_autoencoder import metrics as M
from kl_autoencoder.durable import atomic_write_text

HELD_OUT, TRAINING, ALL = "held-out", "training", "all"  # split names, in report order


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


def headline_scope(result: dict[str, Any]) -> str:
    """The images the headline covers: its split and count, and the source's count when --num-images kept fewer."""
    headline = result["headline"]
    count, total = headline["num_images"], result["num_images"]
    scope = f"{_split_title(headline['split'])} ({count}" + (f" of {total})" if count != total else ")")
    available = result.get("available_images")
    if available is not None and available > total:
        scope += f", the first {total} of the {available} in `{result['data']}` (--num-images {total})"
    return scope


def headline_section(result: dict[str, Any]) -> list[str]:
    headline = result["headline"]
    parts = [f"`{m}` PSNR {_fmt(v['psnr'])} dB, SSIM {_fmt(v['ssim'])}, colour error {_fmt(v['colour_error'])}, "
             f"ΔE2000 {_fmt(v['delta_e'], 3)}, hue error {_fmt(v['hue_error'], 3)}°"
             for m, v in headline["models"].items()]
    scope = headline_scope(result)
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
                       ("colour error (0-1) ↓", "colour_error"), ("ΔE2000 (mean per pixel) ↓", "delta_e"),
                       ("hue error (degrees, saturated pixels) ↓", "hue_error")):
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
            ("scaling_factor (its config.json)", lambda e: "n/a (tiny)" if e["latents"] is None else
             f"{e['configured']['scaling_factor']:.5g}" if e.get("configured") else "n/a"),
            ("scaling_factor measured (1 / std)", latent(lambda s: f"{s['scaling_factor']:.5g}")),
            ("shift_factor measured", latent(lambda s: "none" if s["shift_factor"] is None else f"{s['shift_factor']:.4g}")),
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
    lines.append("- scaling_factor measured: 1 / std of posterior samples z over these images, what `--write-config` "
                 "would store (the model's own is its config.json's); shift_factor: their mean, only for models with "
                 ">= 16 latent channels unless `--shift-factor` says otherwise (metrics.py).")
    if result.get("skipped_sections"):
        lines.append(f"- left out (--skip): {', '.join(result['skipped_sections'])}.")
    lines.append("- colour error: |mean RGB of the reconstruction - of the original| (global); ΔE2000: CIEDE2000 in CIE "
                 "Lab (D65) per pixel, averaged per image (about 1 is just noticeable, local: a leaf turning brown in "
                 f"patches shows); hue error: HSV hue difference in degrees over the pixels of saturation above "
                 f"{M.HUE_MIN_SATURATION} in the original (images without such pixels left out).")
    return lines + [""]


def worst_colour_line(entry: dict[str, Any], names: list[str]) -> list[str]:
    """The model's image with the largest ΔE2000, with its colour measures."""
    worst = entry.get("worst_colour")
    if not worst:
        return []
    hue = "n/a (no saturated pixel)" if worst["hue_error"] is None else f"{worst['hue_error']:.1f}°"
    return [f"Worst colour: `{Path(names[worst['index']]).name}` ({worst['split']}): ΔE2000 {worst['delta_e']:.2f}, "
            f"hue error {hue}, colour error {worst['colour_error']:.3f}.", ""]


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
        lines += worst_colour_line(entry, names)
        lines += [f"![{kind}]({path})" for kind, path in entry["pictures"].items()] + [""]
    return lines


def diffusability_section(result: dict[str, Any]) -> list[str]:
    return D.report_lines(result["models"], picture=result.get("diffusability_picture"))


def fp16_section(result: dict[str, Any]) -> list[str]:
    return F16.report_lines(result["models"])  # peaks vs 65504, fp16 encode/decode vs fp32


ReportSection = Callable[[dict[str, Any]], list[str]]
REPORT_SECTIONS: list[ReportSection] = [
    headline_section, image_metrics_section, teacher_section, whole_set_section, notes_section, skipped_section,
    diffusability_section, fp16_section, model_sections,
]


def render_report(result: dict[str, Any], sections: list[ReportSection] | None = None) -> str:
    """report.md from the metrics.json content: the lines of each section in turn (default REPORT_SECTIONS)."""
    return "\n".join(line for section in (sections or REPORT_SECTIONS) for line in section(result))
