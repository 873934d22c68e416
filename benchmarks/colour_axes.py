"""Does an export carry every colour axis? Hue error on saturated pixels, ΔE2000, PSNR on hue test images and photos.

    python benchmarks/colour_axes.py outputs/quickstart/vae [--folder DIR ...] [--resolution 256] [--json OUT]

Images, each a set reported on its own: `colorwheel` (scikit-image's, one of the sample source's training photos),
`hue_chart` (`hue_chart`: 12 saturated hue bars made here, never trained on), and every `--folder` (e.g. the 26
validation crops of `kl-autoencoder sample-photos OUT --set validation`), centre-cropped to the resolution. Per image
and per set: the mean hue error (degrees) over the pixels of saturation above 0.3 in the original
(`metrics.hue_error`), the mean CIEDE2000 ΔE (`metrics.delta_e`), PSNR and the mean-RGB colour error; the posterior
mode is decoded, in float32 on the CPU. A latent that keeps one chroma axis of two turns the chart's bars orange or
cyan: hue error in the tens of degrees while PSNR can stay decent.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder import metrics as M
from kl_autoencoder.data import build_transform, load_eval_images
from kl_autoencoder.model import KLAutoencoder

HUE_BARS = 12


def hue_chart(size: int = 256, bars: int = HUE_BARS) -> torch.Tensor:
    """[3, size, size] in [0, 1]: `bars` vertical bars of hues 0, 360/bars, ... degrees (HSV saturation 0.85), each
    darkening from value 0.95 at the top to 0.55 at the bottom, so every pixel is saturated (> 0.3) and a bar's
    hue is the same at every brightness."""
    column = torch.arange(size, dtype=torch.float64)
    hue = torch.floor(column * bars / size) * (360 / bars)              # [W] degrees
    value = torch.linspace(0.95, 0.55, size, dtype=torch.float64)[:, None].expand(size, size)  # [H, W]
    saturation = 0.85
    # HSV -> RGB, the closed form: channel k = v - v s max(0, min(n, 4 - n, 1)), n = (k + h / 60) mod 6
    rgb = []
    for k in (5, 3, 1):
        n = (k + hue / 60) % 6
        rgb.append(value - value * saturation * torch.clamp(torch.minimum(n, 4 - n), 0, 1))
    return torch.stack(rgb).float()


def colour_wheel(size: int) -> torch.Tensor:
    """scikit-image's `colorwheel`, centre-cropped like every evaluation image: [3, size, size] in [0, 1]."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.colorwheel()).convert("RGB")
    return (build_transform(size, random_crop=False, random_flip=False)(image) + 1) / 2


@torch.no_grad()
def measure(model: KLAutoencoder, images01: torch.Tensor, names: list[str], batch_size: int = 4) -> dict:
    """Per image and mean over the set: hue error (saturated pixels), ΔE2000, PSNR, colour error; over the set: the
    largest colour error and the std of the scaled latents (posterior samples with the export's own factor)."""
    rows, latents = [], []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(images01), batch_size):
        x = images01[start:start + batch_size]
        posterior = model.encode(x * 2 - 1)
        latents.append(model.to_diffusion_latents(posterior.sample(generator)))
        recon = M.to_unit_range(model.decode(posterior.mode()))
        for i, name in enumerate(names[start:start + batch_size]):
            a, b = recon[i:i + 1], x[i:i + 1]
            rows.append({"image": name, "hue_error": float(M.hue_error(a, b)), "delta_e": float(M.delta_e(a, b)),
                         "psnr": float(M.psnr(a, b)), "colour_error": float(M.colour_error(a, b))})
    keys = ("hue_error", "delta_e", "psnr", "colour_error")
    mean = {k: _mean([r[k] for r in rows]) for k in keys}
    worst = max(rows, key=lambda r: r["delta_e"])
    mean["max_colour_error"] = max(r["colour_error"] for r in rows)
    mean["scaled_latent_std"] = float(torch.cat(latents).std())
    return {"mean": mean, "worst_delta_e": worst, "images": rows}


def _mean(values: list[float]) -> float | None:
    defined = [v for v in values if not math.isnan(v)]  # hue error: images without saturated pixels have none
    return sum(defined) / len(defined) if defined else None


def image_sets(folders: list[str], size: int) -> dict[str, tuple[torch.Tensor, list[str]]]:
    sets = {"colorwheel": (colour_wheel(size)[None], ["colorwheel"]),
            "hue_chart": (hue_chart(size)[None], ["hue_chart"])}
    for folder in folders:
        names, images = load_eval_images(folder, size)
        sets[Path(folder).name or folder] = ((images + 1) / 2, [Path(n).name for n in names])
    return sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("model")
    p.add_argument("--folder", action="append", default=[], help="an image folder, reported as its own set")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="also write the per-image results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = KLAutoencoder.from_pretrained(args.model).eval()
    result = {"model": args.model, "resolution": args.resolution, "sets": {}}
    for name, (images, names) in image_sets(args.folder, args.resolution).items():
        result["sets"][name] = measure(model, images, names)
        m, w = result["sets"][name]["mean"], result["sets"][name]["worst_delta_e"]
        print(f"{name} ({len(names)}): hue error {_fmt(m['hue_error'])}°, ΔE2000 {_fmt(m['delta_e'])}, "
              f"PSNR {_fmt(m['psnr'])} dB, colour error {_fmt(m['colour_error'], 3)} (max "
              f"{m['max_colour_error']:.3f}), scaled latent std {m['scaled_latent_std']:.3f}; worst ΔE {w['image']} "
              f"({w['delta_e']:.1f}, hue {_fmt(w['hue_error'])}°, colour error {w['colour_error']:.3f})")
    if args.json:
        harness.write_json(args.json, result, indent=1)
    return result


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
