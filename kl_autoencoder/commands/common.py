"""What every `kl-autoencoder` command shares: the usage error, loading the model onto a device, the report of a
folder job, and the options several commands take (--model/--input/--out, tiling, --preset, --overwrite, the image
pixel limit). Each command's own code is in its module beside this one; cli.py builds the parser from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
MODEL_HELP = ("a KL VAE (AutoencoderKL: diffusers folder, pipeline folder, LDM .safetensors, hub id) or a tiny "
              "autoencoder (an AutoencoderTiny folder, e.g. from distill)")


class UsageError(ValueError):
    """A mistake in what the user asked for; printed as one line."""


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_model(path: str, device: str | None = None, kl_only: str | None = None, preset: str | None = None):
    """The model at `path` (AutoencoderKL or AutoencoderTiny, see loading.py) ready for inference; `kl_only` names
    the command when a tiny autoencoder cannot serve it; `preset` (presets.py) the release a KL VAE's file is."""
    from kl_autoencoder.fastpath import prepare_for_inference
    from kl_autoencoder.loading import class_name, load_any
    from kl_autoencoder.model import KLAutoencoder

    model = KLAutoencoder.from_pretrained(path, preset=preset) if preset else load_any(path)
    if kl_only and class_name(model) != "AutoencoderKL":
        raise UsageError(f"{path} is a tiny autoencoder (AutoencoderTiny): {kl_only}")
    return prepare_for_inference(model, pick_device(device))


def local_sources(*paths: str | None) -> list[Path]:
    """The inputs that exist on disk (not hub ids): an output may never replace them or a folder holding them."""
    return [Path(p) for p in paths if p and Path(p).exists()]


def add_overwrite(p: argparse.ArgumentParser, what: str = "DST") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} even when it holds more than a previous export (config.json + weights); "
                        "/, the home folder, the current directory and folders holding the source are never replaced")


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def report(result) -> None:
    """Each skipped file first, then the summary that counts them: the summary is the last line."""
    from kl_autoencoder.untrusted import MAX_ERROR_CHARS, shown

    for name, reason in result.skipped:
        print(f"skipped {shown(name)}: {shown(reason, MAX_ERROR_CHARS)}", file=sys.stderr)
    sys.stderr.flush()
    print(result.summary())


def tiling(args) -> dict:
    return {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap}


def check_tiling_args(args, model) -> None:
    from kl_autoencoder.tiling import check_tile_option

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_tile_option(args.tile_size, args.tile_overlap, model.config.downsampling_factor)


def image_folder_command(run, args, **options) -> int:
    """encode / reconstruct: a folder of images through `run(model, input, out, ...)`, then the report."""
    model = load_model(args.model, args.device, kl_only="it has no posterior to sample (use --mode mean)"
                  if args.mode == "sample" else None, preset=args.preset)
    generator = seeded_generator(args.seed, next(model.parameters()).device)
    report(run(model, args.input, args.out, batch_size=args.batch_size, mode=args.mode, generator=generator,
                **tiling(args), **options))
    return 0


def add_model_io(p: argparse.ArgumentParser, needs_input: bool, needs_latents: bool, has_mode: bool) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    if needs_input:
        p.add_argument("--input", required=True, help="folder of images (searched recursively) or one image")
        add_image_limit(p)
    if needs_latents:
        p.add_argument("--latents", required=True, help="a latents-*.safetensors shard or a folder of them")
    p.add_argument("--out", required=True, help="output folder (not the input folder nor inside it)")
    if has_mode:
        p.add_argument("--mode", choices=("mean", "sample"), default="mean",
                       help="use the posterior mean or a sample of it (default: mean)")
        p.add_argument("--seed", type=int, default=None, help="seed for --mode sample")
    p.add_argument("--batch-size", type=int, default=8)
    add_tiling(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_preset(p)


def tile_size_arg(text: str) -> int | str | None:
    """--tile-size: 'auto', 'off', or a number of pixels."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'off' or a tile side in pixels, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a tile side must be >= 1 pixel, got {value} (use 'off' for no tiling)")
    return value


def add_tiling(p: argparse.ArgumentParser) -> None:
    from kl_autoencoder.tiling import AUTO_TILE_PIXELS, AUTO_TILE_SIZE

    p.add_argument("--tile-size", type=tile_size_arg, default="auto",
                   help=f"'auto' (default): one untiled pass unless an image has more than "
                        f"{AUTO_TILE_PIXELS / 1e6:.1f} megapixels, then {AUTO_TILE_SIZE}-px tiles; N: always tile "
                        "with N-px tiles (a multiple of the "
                        "downsampling factor), less memory for ~2-3x the time; 'off': never tile")
    p.add_argument("--tile-overlap", type=int, default=64, help="overlap between tiles in pixels (default: 64)")


def add_replace(p: argparse.ArgumentParser, what: str) -> None:
    """--overwrite for a command's outputs: without it, earlier outputs of the command at --out are refused."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}; refused otherwise")


def add_preset(p: argparse.ArgumentParser, what: str = "the release a config-less single file is") -> None:
    from kl_autoencoder.presets import PRESETS, describe_choices

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"{what}: sets its scaling_factor, shift_factor, sample_size, force_upcast ({describe_choices()})")


def add_image_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than this as possible decompression bombs (default: "
                        "Pillow's limit, about 89 million; 0: no limit, for trusted files only)")
