"""The `kl-autoencoder` command: convert | info | encode | decode | reconstruct | sample | interpolate | evaluate.

Tile flags (`--tile-size`, `--tile-overlap`) are in pixels for every command (see tiling.py). Latents written by
`encode` are diffusion latents ((z - shift_factor) * scaling_factor); `sample` draws from the VAE prior N(0, I) on
the raw latent z, which is what the KL term pulls the posterior towards. User mistakes (bad paths, bad flags, files
that do not fit the model) print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


class UsageError(ValueError):
    """A mistake in what the user asked for; printed as one line."""


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load(path: str, device: str | None = None):
    from kl_autoencoder.fastpath import prepare_for_inference
    from kl_autoencoder.model import KLAutoencoder

    return prepare_for_inference(KLAutoencoder.from_pretrained(path), _device(device))


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _report(result) -> None:
    print(result.summary())
    for name, reason in result.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)


def _tiling(args) -> dict:
    return {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap}


# ----------------------------------------------------------------------------------------------------------------------
# commands


def cmd_convert(args) -> int:
    from kl_autoencoder.formats import load_model, read_config

    if args.config and Path(args.config).name != "config.json":
        raise UsageError(f"--config must point to a config.json, got {args.config}")
    config = read_config(Path(args.config).parent) if args.config else None
    model = load_model(args.src, config=config)
    if args.scaling_factor is not None:
        model.config.scaling_factor = args.scaling_factor
    if args.shift_factor is not None:
        model.config.shift_factor = args.shift_factor
    written = model.save_pretrained(args.dst, format=args.format, dtype=args.dtype)
    print(f"wrote {written} ({args.format}, {args.dtype or 'fp32'})")
    return 0


def model_info(model, image_size: int) -> dict:
    config = model.config
    return {
        "config": config.to_dict(),
        "parameters": {"encoder": model.num_parameters("encoder") + _count(model.quant_conv),
                       "decoder": model.num_parameters("decoder") + _count(model.post_quant_conv),
                       "total": model.num_parameters()},
        "downsampling_factor": config.downsampling_factor,
        "image_size": image_size,
        "latent_shape": list(config.latent_shape(image_size, image_size)),
    }


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def cmd_info(args) -> int:
    info = model_info(_load(args.path, "cpu"), args.image_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"model: {args.path}")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    print(f"parameters: encoder {p['encoder']:,}  decoder {p['decoder']:,}  total {p['total']:,}")
    print(f"downsampling factor: {info['downsampling_factor']}")
    c, h, w = info["latent_shape"]
    print(f"latent shape for {args.image_size}x{args.image_size}: [{c}, {h}, {w}]")
    return 0


def _image_folder_command(run, args) -> int:
    """encode / reconstruct: a folder of images through `run(model, input, out, ...)`, then the report."""
    model = _load(args.model, args.device)
    generator = _generator(args.seed, next(model.parameters()).device)
    _report(run(model, args.input, args.out, batch_size=args.batch_size, mode=args.mode, generator=generator,
                **_tiling(args)))
    return 0


def cmd_encode(args) -> int:
    from kl_autoencoder.inference import encode_folder

    return _image_folder_command(encode_folder, args)


def cmd_decode(args) -> int:
    from kl_autoencoder.inference import decode_latents

    model = _load(args.model, args.device)
    _report(decode_latents(model, args.latents, args.out, batch_size=args.batch_size, **_tiling(args)))
    return 0


def cmd_reconstruct(args) -> int:
    from kl_autoencoder.inference import reconstruct_folder

    return _image_folder_command(reconstruct_folder, args)


def cmd_sample(args) -> int:
    from kl_autoencoder.data import tensor_to_image
    from kl_autoencoder.inference import decode_sliced, sample_prior

    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    model = _load(args.model, args.device)
    device = next(model.parameters()).device
    shape = (args.num, *model.config.latent_shape(args.image_size, args.image_size))
    z = sample_prior(shape, args.truncation, torch.Generator().manual_seed(args.seed)).to(device)
    images = decode_sliced(model, z, args.batch_size, **_tiling(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        tensor_to_image(image.cpu()).save(out / f"sample-{i:05d}.png")
    print(f"wrote {args.num} samples to {out}")
    return 0


def _load_square(path: str, size: int) -> torch.Tensor:
    """An image resized (shorter side) and centre-cropped to size x size, as [3, size, size] in [-1, 1]."""
    from PIL import Image, ImageOps

    from kl_autoencoder.data import image_to_tensor, load_image

    return image_to_tensor(ImageOps.fit(load_image(path), (size, size), Image.Resampling.BICUBIC))


def cmd_interpolate(args) -> int:
    from kl_autoencoder.data import tensor_to_image
    from kl_autoencoder.inference import decode_sliced, encode_batch, lerp, slerp

    model = _load(args.model, args.device)
    device = next(model.parameters()).device
    f = model.config.downsampling_factor
    if args.image_size % f:
        raise UsageError(f"--image-size {args.image_size} must be a multiple of the downsampling factor {f}")
    pixels = torch.stack([_load_square(args.image_a, args.image_size), _load_square(args.image_b, args.image_size)])
    z = encode_batch(model, pixels.to(device), "mean")
    path = (slerp if args.slerp else lerp)(z[0], z[1], args.steps)
    images = decode_sliced(model, path, args.batch_size).clamp(-1, 1)
    strip = torch.cat(list(images.cpu()), dim=-1)  # [3, S, steps * S], left to right
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_image(strip).save(out)
    print(f"wrote {out} ({args.steps} steps, {'slerp' if args.slerp else 'lerp'})")
    return 0


def cmd_evaluate(args) -> int:
    from kl_autoencoder import evaluation

    evaluation.run(args)  # writes metrics.json / report.md; errors surface as ValueError -> one-line message
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# argument parsing


def _add_model_io(p: argparse.ArgumentParser, needs_input: bool, needs_latents: bool, has_mode: bool) -> None:
    p.add_argument("--model", required=True, help="diffusers folder, pipeline folder, LDM .safetensors or hub id")
    if needs_input:
        p.add_argument("--input", required=True, help="folder of images (searched recursively) or one image")
    if needs_latents:
        p.add_argument("--latents", required=True, help="a latents-*.safetensors shard or a folder of them")
    p.add_argument("--out", required=True, help="output folder")
    if has_mode:
        p.add_argument("--mode", choices=("mean", "sample"), default="mean",
                       help="use the posterior mean or a sample of it (default: mean)")
        p.add_argument("--seed", type=int, default=None, help="seed for --mode sample")
    p.add_argument("--batch-size", type=int, default=8)
    _add_tiling(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_tiling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile side in pixels (a multiple of the downsampling factor); off by default")
    p.add_argument("--tile-overlap", type=int, default=64, help="overlap between tiles in pixels (default: 64)")


def build_parser(with_evaluate: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-autoencoder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert between diffusers folders and LDM single files")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=("diffusers", "ldm"), default="diffusers")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the weights (default: keep fp32)")
    p.add_argument("--config", default=None, help="config.json to use for an LDM single file (which has none)")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the config's scaling_factor")
    p.add_argument("--shift-factor", type=float, default=None, help="override the config's shift_factor")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="config, parameter counts, latent shape")
    p.add_argument("path")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encode", help="images -> diffusion latents (safetensors shards)")
    _add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latent shards -> PNGs with the original names and sizes")
    _add_model_io(p, needs_input=False, needs_latents=True, has_mode=False)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="images -> reconstructions in one pass")
    _add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("sample", help="decode draws from the prior N(0, I)")
    p.add_argument("--model", required=True)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--truncation", type=float, default=None, help="redraw latent entries with |z| above this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None)
    _add_tiling(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("interpolate", help="decode a latent path between two images into a strip")
    p.add_argument("--model", required=True)
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--image-size", type=int, default=256, help="both images are resized and centre-cropped to this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("evaluate", help="reconstruction metrics, latent statistics, report")
    if with_evaluate:  # evaluation pulls in lpips / torchmetrics: only import it when it is the command
        try:
            from kl_autoencoder import evaluation
        except ImportError as err:
            raise UsageError(f"the evaluate command is unavailable: {err}") from err
        evaluation.add_arguments(p)
        p.set_defaults(func=cmd_evaluate)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The project's error types that mean "bad input", not "bug"."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                         PermissionError]
    try:
        from kl_autoencoder.data import BadImageError
        errors.append(BadImageError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(with_evaluate=command == "evaluate").parse_args(argv)
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
