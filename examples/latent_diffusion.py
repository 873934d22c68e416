"""Latent diffusion on our autoencoder: train a tiny DDPM in the VAE's latent space, sample, decode to a PNG grid.

The diffusion model never sees pixels: random crops of the built-in sample photos are encoded once into diffusion
latents ((z - shift) * scaling_factor, unit variance by design), a small UNet learns to predict the noise added to
them, and ancestral DDPM sampling produces latents that the VAE decoder turns into images. The crops, the UNet and
its training loop are the diffusability probe's (kl_autoencoder/diffusability.py), with a progress bar.

    python examples/latent_diffusion.py --vae outputs/quickstart/vae            # a few hundred steps
    python examples/latent_diffusion.py --vae outputs/quickstart/vae --quick    # ~20 s smoke run

From latent shards written by `kl-autoencoder encode --resolution R` (any number of processes; see the README's
"Sharded datasets" section) the UNet trains on those latents instead, drawing one posterior sample per latent when
the shards hold the posterior's std (--store-posterior):

    kl-autoencoder encode --model outputs/quickstart/vae --input webdataset --data-files 'shards/{00000..00003}.tar' \
        --resolution 64 --out outputs/latents
    python examples/latent_diffusion.py --vae outputs/quickstart/vae --latents outputs/latents
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae", default="outputs/quickstart/vae", help="exported VAE folder (diffusers format)")
    p.add_argument("--steps", type=int, default=400, help="training steps of the diffusion UNet")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: few steps, small crops, few samples")
    p.add_argument("--latents", default=None, help="train on the latent shards of `kl-autoencoder encode` in this "
                   "folder (its manifest.json) instead of encoding crops of the sample photos")
    p.add_argument("--resolution", type=int, default=64, help="pixel size of the training crops")
    p.add_argument("--num-crops", type=int, default=512, help="random crops encoded once before training")
    p.add_argument("--batch-size", type=int, default=32, help="latents per UNet training step")
    p.add_argument("--num-samples", type=int, default=16, help="images sampled and decoded into the grid")
    p.add_argument("--out", default="outputs/latent_diffusion/samples.png", help="where the PNG grid is written")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops, the training and the sampling")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.resolution, args.num_crops, args.num_samples = min(args.steps, 20), 32, 64, 4
        args.batch_size = min(args.batch_size, 16)
    return args


@torch.no_grad()
def sample(unet, scheduler, shape: tuple[int, ...], num_steps: int, generator: torch.Generator) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=generator)
    for t in tqdm(scheduler.timesteps, desc="sampling", unit="step"):
        x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return x


def shard_latents(folder: str, vae, generator: torch.Generator) -> torch.Tensor:
    """Every latent of an encoded folder as one [N, C, h, w] tensor (a posterior sample where the std is stored)."""
    from kl_autoencoder.latent_shards import load_latent_shards

    _, manifest = load_latent_shards(folder)
    stored = manifest["store_posterior"]
    latents, _ = load_latent_shards(folder, with_std=stored)
    if manifest["model"]["latent_channels"] != vae.config.latent_channels:
        raise SystemExit(f"error: {folder} holds {manifest['model']['latent_channels']}-channel latents; the VAE "
                         f"decodes {vae.config.latent_channels}")
    values = [latents[key] for key in sorted(latents)]
    if stored:  # z = mean + std * eps, in diffusion units
        values = [mean + std * torch.randn(mean.shape, generator=generator) for mean, std in values]
    return torch.stack(values)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.vae).exists():
        print(f"error: no VAE at {args.vae}: run the README main command first (it exports outputs/quickstart/vae), "
              "or pass --vae PATH", file=sys.stderr)
        return 2
    from diffusers import DDPMScheduler
    from torchvision.utils import make_grid

    from kl_autoencoder import KLAutoencoder
    from kl_autoencoder.data import tensor_to_image
    from kl_autoencoder.diffusability import build_probe_unet, encode_means, sample_photo_crops, train_denoiser

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vae = KLAutoencoder.from_pretrained(args.vae).eval()
    if args.latents:
        latents = shard_latents(args.latents, vae, generator)
    else:
        crops = sample_photo_crops("train", args.num_crops, args.resolution, torch.Generator().manual_seed(args.seed))
        latents = vae.to_diffusion_latents(encode_means(vae, crops))
    print(f"{len(latents)} training latents of shape {tuple(latents.shape[1:])}, std {latents.std():.3f}")

    scheduler = DDPMScheduler(num_train_timesteps=100 if args.quick else 1000, clip_sample=False)
    unet = build_probe_unet(latents.shape[1], latents.shape[-1], width=16 if args.quick else 32)
    losses = train_denoiser(unet, scheduler, latents, args.steps, args.batch_size, generator,
                            progress="training the UNet")
    window = max(1, len(losses) // 10)
    print(f"loss_first={sum(losses[:window]) / window:.4f}")
    print(f"loss_last={sum(losses[-window:]) / window:.4f}")

    unet.eval()
    z = sample(unet, scheduler, (args.num_samples, *latents.shape[1:]), 10 if args.quick else 50, generator)
    with torch.no_grad():
        images = vae.decode(vae.from_diffusion_latents(z)).clamp(-1, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_image(make_grid(images, nrow=int(len(images) ** 0.5), padding=2, pad_value=1.0)).save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
