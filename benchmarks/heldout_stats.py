"""Held-out numbers of one export, measured independently of `evaluate` (skimage's PSNR and SSIM).

    python benchmarks/heldout_stats.py outputs/quickstart/vae [--resolution 256] [--only chelsea,coffee]

Centre crops of the held-out sample photos (`data.SAMPLE_HELDOUT`, never trained on) at the resolution; PSNR and SSIM
of the posterior mode's reconstruction (scikit-image), mean colour error (|mean RGB of reconstruction - of original|,
0-1 scale), and the std of the scaled latents `to_diffusion_latents(posterior.sample())` with the export's own
`scaling_factor` / `shift_factor`. Prints one JSON line. BENCHMARKS.md's quickstart before/after rows use it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import harness  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.data import load_eval_images


def heldout_stats(model_path: str, resolution: int = 256, only: list[str] | None = None) -> dict:
    model = KLAutoencoder.from_pretrained(model_path).eval()
    names, x = load_eval_images("sample:heldout", resolution)
    keep = [i for i, name in enumerate(names) if only is None or name in only]
    names, x = [names[i] for i in keep], x[keep]
    with torch.no_grad():
        posterior = model.encode(x)
        reconstruction = model.decode(posterior.mode()).clamp(-1, 1)
        latents = model.to_diffusion_latents(posterior.sample(torch.Generator().manual_seed(0)))
    a, b = ((x + 1) / 2).numpy(), ((reconstruction + 1) / 2).numpy()
    psnr = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(len(a))]
    ssim = [structural_similarity(a[i], b[i], data_range=1.0, channel_axis=0) for i in range(len(a))]
    colour = [float(np.abs(a[i].mean(axis=(1, 2)) - b[i].mean(axis=(1, 2))).mean()) for i in range(len(a))]
    return {"model": model_path, "names": names, "resolution": resolution, "psnr": round(float(np.mean(psnr)), 2),
            "ssim": round(float(np.mean(ssim)), 3), "colour_error": round(float(np.mean(colour)), 3),
            "scaled_latent_std": round(float(latents.std()), 3), "scaling_factor": model.config.scaling_factor}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("model")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--only", default=None, help="comma list of held-out photo names")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = heldout_stats(args.model, args.resolution, args.only.split(",") if args.only else None)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
