"""Diffusability probe: how easily a small diffusion model learns each VAE's latents, under one fixed budget.

    python eval/diffusability.py --model outputs/quickstart/vae other/vae [--out diffusability.json]
                                 [--steps 150] [--seed 0] [--latent-scale measured|config]

For every model: encode the same random crops of the sample photos (training photos vs held-out photos), train a
small diffusers UNet2DModel (DDPM, epsilon prediction) on the training latents with fixed seeds, and report its
denoising MSE on the held-out latents at fixed noise levels (lower: easier to diffuse). Beside it, on the held-out
crops: the high-frequency share of the latent and image spectra and the equivariance PSNR (see
kl_autoencoder/diffusability.py). Numbers compare VAEs only under the same options and downsampling factor. The
probe trains (about a minute per quickstart-size VAE on one CPU thread; OMP_NUM_THREADS=1 on a busy small CPU).
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kl_autoencoder import diffusability as D  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = D.ProbeConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", required=True, metavar="PATH", help="VAE folders / files / hub ids")
    p.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--steps", type=int, default=defaults.steps, help="UNet training steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--train-crops", type=int, default=defaults.train_crops)
    p.add_argument("--heldout-crops", type=int, default=defaults.heldout_crops)
    p.add_argument("--resolution", type=int, default=defaults.resolution, help="crop size in pixels")
    p.add_argument("--width", type=int, default=defaults.width, help="UNet channels (width, 2 x width)")
    p.add_argument("--latent-scale", choices=("config", "measured"), default=defaults.latent_scale,
                   help="measured: standardise the latents (compares VAEs whatever their scaling_factor); config: "
                        "the model's scaling_factor / shift_factor, as a pipeline would")
    p.add_argument("--seed", type=int, default=defaults.seed)
    return p.parse_args(argv)


def probe_config(args: argparse.Namespace) -> D.ProbeConfig:
    return D.ProbeConfig(resolution=args.resolution, train_crops=args.train_crops, heldout_crops=args.heldout_crops,
                         steps=args.steps, batch_size=args.batch_size, width=args.width,
                         latent_scale=args.latent_scale, seed=args.seed)


def measure(model, config: D.ProbeConfig, train_pixels, heldout_pixels) -> dict:
    """The probe and, on the held-out crops, the cheap measures: one JSON entry."""
    entry = {"probe": D.diffusability_probe(model, config, train_pixels, heldout_pixels)}
    entry.update(D.diffusability_metrics(model, heldout_pixels))
    return entry


def format_row(name: str, entry: dict) -> str:
    probe, spectrum = entry["probe"], entry["spectrum"]
    losses = " ".join(f"{v:.4f}" for v in probe["heldout_loss"].values())
    psnrs = " ".join(f"{v['mean']:.2f}" for v in entry["equivariance_psnr"].values())
    return (f"{name}: held-out loss {probe['heldout_loss_mean']:.4f} (t = {', '.join(probe['heldout_loss'])}: "
            f"{losses}); high-frequency share latent {spectrum['latent']['high_frequency_share']:.3f} / image "
            f"{spectrum['image']['high_frequency_share']:.3f}; equivariance PSNR dB "
            f"({', '.join(entry['equivariance_psnr'])}): {psnrs}; {probe['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kl_autoencoder.evaluation import model_names, write_json
    from kl_autoencoder.model import KLAutoencoder

    try:
        config = probe_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    models = {}
    for path, name in zip(args.model, model_names(args.model)):
        try:
            models[name] = (path, KLAutoencoder.from_pretrained(path).eval())
        except Exception as err:  # any failure to load is the user's path, said with the reason
            print(f"error: could not load model {path!r}: {err}", file=sys.stderr)
            return 2
    train_pixels, heldout_pixels = D.probe_pixels(config)
    result = {"config": asdict(config), "models": {}}
    for name, (path, model) in models.items():
        entry = measure(model, config, train_pixels, heldout_pixels)
        entry["path"] = str(path)
        result["models"][name] = entry
        print(format_row(name, entry), flush=True)
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
