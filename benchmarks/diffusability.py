"""Diffusability of trained VAEs against a random-init VAE of the same architecture.

    OMP_NUM_THREADS=1 python benchmarks/diffusability.py [MODEL_PATH ...] [--seeds 0 1] [--steps 150]

Default model: tests/assets/trained-f8. For each model and its random-init twin (torch seed 0): the cheap measures
on the 14 sample photos at 128 px (centre crops; what `evaluate` reports) and the probe's held-out denoising loss
with standardised latents (latent_scale="measured": a random-init model has no meaningful scaling_factor), one probe
per seed. Prints a markdown table for BENCHMARKS.md.
"""

import argparse
import sys
import time

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder import diffusability as D
from kl_autoencoder.data import load_eval_images
from kl_autoencoder.model import KLAutoencoder


def measure(model, images: torch.Tensor, seeds: list[int], steps: int) -> dict:
    cheap = D.diffusability_metrics(model, images)
    probes = []
    for seed in seeds:
        config = D.ProbeConfig(steps=steps, seed=seed, latent_scale="measured")
        probes.append(D.diffusability_probe(model, config))
    return {"cheap": cheap, "probes": probes}


def row(name: str, m: dict) -> str:
    cheap, probes = m["cheap"], m["probes"]
    eq = " / ".join(f"{v['mean']:.2f}" for v in cheap["equivariance_psnr"].values())
    loss = " / ".join(f"{p['heldout_loss_mean']:.4f}" for p in probes)
    per_t = " / ".join(f"{v:.3f}" for v in probes[0]["heldout_loss"].values())
    return (f"| {name} | {cheap['spectrum']['latent']['high_frequency_share']:.3f} | "
            f"{cheap['spectrum']['image']['high_frequency_share']:.3f} | {eq} | {loss} | {per_t} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("models", nargs="*", default=["tests/assets/trained-f8"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=D.ProbeConfig().steps)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, images = load_eval_images("sample", 128)
    names = ", ".join(t.name for t in D.EVAL_TRANSFORMS)
    print(f"| model | HF share latent | HF share image | equivariance PSNR dB ({names}) | probe held-out loss "
          f"(seeds {', '.join(map(str, args.seeds))}) | per t {D.ProbeConfig().eval_timesteps} (first seed) |")
    print("|---|---|---|---|---|---|")
    for path in args.models:
        trained = KLAutoencoder.from_pretrained(path).eval()
        torch.manual_seed(0)
        twin = KLAutoencoder(trained.config).eval()
        for name, model in ((path, trained), (f"{path} random init", twin)):
            started = time.perf_counter()
            text = row(name, measure(model, images, args.seeds, args.steps))
            print(f"{text} <!-- {time.perf_counter() - started:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
