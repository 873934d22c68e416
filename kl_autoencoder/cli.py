"""The `kl-autoencoder` command: convert, info, encode, decode, reconstruct, sample, interpolate, distill, evaluate.

Tile flags (`--tile-size`, `--tile-overlap`) are in pixels for every command (see tiling.py); the default
`--tile-size auto` tiles only images over a pixel budget (tiling costs time, see `resolve_tile_size`). Latents written by
`encode` are diffusion latents ((z - shift_factor) * scaling_factor); `sample` draws from the VAE prior N(0, I) on
the raw latent z, which is what the KL term pulls the posterior towards.

Exit status: 0 done; 2 a user mistake (bad paths, bad flags, files that do not fit the model, an output folder that
would overwrite inputs); 1 the system failed us (disk full, I/O error, an unwritable safetensors file); 143 / 130
stopped by SIGTERM / Ctrl-C. Each failure prints one `error: ...` line, no traceback. SIGTERM is turned into an
exception so the atomic writes' clean-ups run: no hidden temporary file is left behind, and every file already
written is complete.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


class UsageError(ValueError):
    """A mistake in what the user asked for; printed as one line."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread. A BaseException (like KeyboardInterrupt), so no `except Exception` on the
    way swallows it, while every `finally` (temporary-file clean-up) runs."""


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
    """Each skipped file first, then the summary that counts them: the summary is the last line."""
    for name, reason in result.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    sys.stderr.flush()
    print(result.summary())


def _tiling(args) -> dict:
    return {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap}


def _check_tiling_args(args, model) -> None:
    from kl_autoencoder.tiling import check_tile_option

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_tile_option(args.tile_size, args.tile_overlap, model.config.downsampling_factor)


# ----------------------------------------------------------------------------------------------------------------------
# commands


def cmd_convert(args) -> int:
    from kl_autoencoder.formats import read_config
    from kl_autoencoder.model import KLAutoencoder

    if args.config and Path(args.config).name != "config.json":
        raise UsageError(f"--config must point to a config.json, got {args.config}")
    config = read_config(Path(args.config).parent) if args.config else None
    model = KLAutoencoder.from_pretrained(args.src, config=config)
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


def _image_folder_command(run, args, **options) -> int:
    """encode / reconstruct: a folder of images through `run(model, input, out, ...)`, then the report."""
    model = _load(args.model, args.device)
    generator = _generator(args.seed, next(model.parameters()).device)
    _report(run(model, args.input, args.out, batch_size=args.batch_size, mode=args.mode, generator=generator,
                **_tiling(args), **options))
    return 0


def cmd_encode(args) -> int:
    from kl_autoencoder.inference import check_shard_folder, encode_folder

    check_shard_folder(args.out, args.overwrite)  # before the model loads: no work for a run that must stop
    return _image_folder_command(encode_folder, args, overwrite=args.overwrite)


def cmd_decode(args) -> int:
    from kl_autoencoder.inference import check_output_folder, decode_latents

    check_output_folder(args.out, args.latents, kind="latents")
    model = _load(args.model, args.device)
    _report(decode_latents(model, args.latents, args.out, batch_size=args.batch_size, **_tiling(args)))
    return 0


def cmd_reconstruct(args) -> int:
    from kl_autoencoder.inference import check_output_folder, reconstruct_folder

    check_output_folder(args.out, args.input)
    return _image_folder_command(reconstruct_folder, args)


def cmd_sample(args) -> int:
    from tqdm.auto import tqdm

    from kl_autoencoder.inference import decode_sliced, sample_prior, save_png

    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    model = _load(args.model, args.device)
    _check_tiling_args(args, model)
    device = next(model.parameters()).device
    shape = (args.num, *model.config.latent_shape(args.image_size, args.image_size))
    z = sample_prior(shape, args.truncation, torch.Generator().manual_seed(args.seed)).to(device)
    out = Path(args.out)
    with tqdm(total=args.num, desc="sampling", unit="img") as progress:
        for start in range(0, args.num, args.batch_size):
            images = decode_sliced(model, z[start:start + args.batch_size], None, **_tiling(args))
            for i, image in enumerate(images, start):
                save_png(image, out / f"sample-{i:05d}.png")
            progress.update(len(images))
    print(f"wrote {args.num} sample{'s' if args.num != 1 else ''} to {out}")
    return 0


def _load_square(path: str, size: int) -> torch.Tensor:
    """An image resized (shorter side) and centre-cropped to size x size, as [3, size, size] in [-1, 1]."""
    from PIL import Image, ImageOps

    from kl_autoencoder.data import image_to_tensor, load_image

    return image_to_tensor(ImageOps.fit(load_image(path), (size, size), Image.Resampling.BICUBIC))


def cmd_interpolate(args) -> int:
    from kl_autoencoder.inference import decode_sliced, encode_batch, lerp, refuse_overwriting_inputs, save_png, slerp

    out = Path(args.out)
    refuse_overwriting_inputs([out], [Path(args.image_a), Path(args.image_b)])
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
    save_png(strip, out)
    print(f"wrote {out} ({args.steps} steps, {'slerp' if args.slerp else 'lerp'})")
    return 0


def cmd_distill(args) -> int:
    from kl_autoencoder.config import load_config
    from kl_autoencoder.distill import RECIPE, build_distillation
    from kl_autoencoder.losses import PerceptualWeightsError
    from kl_autoencoder.run_folder import RunFolderError
    from kl_autoencoder.trainer import NonFiniteLossError, TrainingInterrupted, train

    config = args.config
    if config is None:
        if RECIPE.is_file():
            config = RECIPE
        else:
            print(f"note: {RECIPE} is not installed with the package; using the built-in config defaults (pass "
                  "--config)", file=sys.stderr)
    flags = [f"distill.teacher={json.dumps(args.teacher)}", f"data.source={json.dumps(args.data)}",
             f"train.output_dir={json.dumps(args.out)}"]  # JSON strings are YAML strings: any path reads back as is
    flags += [f"train.max_steps={args.steps}"] if args.steps is not None else []
    flags += [f"data.resolution={args.resolution}"] if args.resolution is not None else []
    cfg = load_config(config, flags + args.overrides)  # the overrides win over the flags
    try:
        export = train(cfg, build=build_distillation)
    except (RunFolderError, PerceptualWeightsError) as err:  # found before training: nothing was written
        raise UsageError(str(err)) from err
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(f"{stop.signal_name or 'stop signal'}: stopped after step {stop.step}; checkpoint: {stop.checkpoint}\n"
              f"resume with the same command plus train.resume=latest", file=sys.stderr)
        return 128 + getattr(signal, stop.signal_name or "SIGINT", signal.SIGINT)
    print(f"wrote {export}: AutoencoderTiny folder (diffusers.AutoencoderTiny.from_pretrained) with the single files "
          "tiny_encoder.safetensors / tiny_decoder.safetensors")
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
        _add_image_limit(p)
    if needs_latents:
        p.add_argument("--latents", required=True, help="a latents-*.safetensors shard or a folder of them")
    p.add_argument("--out", required=True, help="output folder (not the input folder nor inside it)")
    if has_mode:
        p.add_argument("--mode", choices=("mean", "sample"), default="mean",
                       help="use the posterior mean or a sample of it (default: mean)")
        p.add_argument("--seed", type=int, default=None, help="seed for --mode sample")
    p.add_argument("--batch-size", type=int, default=8)
    _add_tiling(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _tile_size(text: str) -> int | str | None:
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


def _add_tiling(p: argparse.ArgumentParser) -> None:
    from kl_autoencoder.tiling import AUTO_TILE_PIXELS, AUTO_TILE_SIZE

    p.add_argument("--tile-size", type=_tile_size, default="auto",
                   help=f"'auto' (default): one untiled pass unless an image has more than "
                        f"{AUTO_TILE_PIXELS / 1e6:.1f} megapixels, then {AUTO_TILE_SIZE}-px tiles; N: always tile "
                        "with N-px tiles (a multiple of the "
                        "downsampling factor), less memory for ~2-3x the time; 'off': never tile")
    p.add_argument("--tile-overlap", type=int, default=64, help="overlap between tiles in pixels (default: 64)")


def _add_image_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than this as possible decompression bombs (default: "
                        "Pillow's limit, about 89 million; 0: no limit, for trusted files only)")


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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the latent shards --out already holds (refused otherwise: a decode would mix them)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latent shards -> PNGs with the original names and sizes")
    _add_model_io(p, needs_input=False, needs_latents=True, has_mode=False)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="images -> reconstructions in one pass")
    _add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser(
        "sample", help="decode draws from the prior N(0, I)",
        description="Decode latents drawn from the VAE prior N(0, I) into PNGs (sample-00000.png, ...). A KL-VAE's "
                    "prior samples look like texture, not photos: its KL weight is tiny, so the latents carry the image "
                    "and the prior is only loosely matched. For real generation, train a diffusion model on the "
                    "latents: examples/latent_diffusion.py.")
    p.add_argument("--model", required=True, help="diffusers folder, pipeline folder, LDM .safetensors or hub id")
    p.add_argument("--num", type=int, default=8, help="how many images to draw and decode (default: 8)")
    p.add_argument("--truncation", type=float, default=None,
                   help="redraw latent entries with |z| above this (default: no truncation)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the latent draws: the same seed, model and sizes give the same images (default: 0)")
    p.add_argument("--image-size", type=int, default=256,
                   help="side of the square images in pixels; the latent is image-size / downsampling factor, "
                        "rounded up (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="images decoded at once (default: 8)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
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
    p.add_argument("--out", required=True, help="output PNG (not one of the two inputs)")
    p.add_argument("--device", default=None)
    _add_image_limit(p)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser(
        "distill", help="distil a tiny autoencoder (diffusers AutoencoderTiny) from a KL VAE",
        description="Train a tiny encoder and decoder (TAESD's architecture, loadable by diffusers' AutoencoderTiny) "
                    "to reproduce a KL VAE's diffusion latents and decodes, in the training loop (checkpoints, "
                    "resume with train.resume=latest, EMA, logs). Writes OUT/vae/.")
    p.add_argument("--teacher", required=True, help="the KL VAE: diffusers folder, pipeline folder, LDM file or hub id")
    p.add_argument("--data", required=True, help='"sample" (built-in photos), an image folder, or a hub dataset')
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, the export in vae/)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (train.max_steps; default: the config's)")
    p.add_argument("--resolution", type=int, default=None, help="training crop size (data.resolution)")
    p.add_argument("--config", default=None,
                   help="YAML config (default: configs/distill.yaml, the CPU-sized recipe)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. distill.width=64 optim.lr=1e-3")
    p.set_defaults(func=cmd_distill)

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


def _system_errors() -> tuple[type[BaseException], ...]:
    """Errors of the machine, not of the request: disk full, I/O errors, safetensors failing to write or read."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated` in the main thread (a second SIGTERM during the clean-up is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _image_pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit for the duration of one command (None: keep it; 0: no limit)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        if limit < 0:
            raise UsageError(f"--max-image-pixels must be >= 0 (0: no limit), got {limit}")
        Image.MAX_IMAGE_PIXELS = limit or None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        with _sigterm_raises():
            args = build_parser(with_evaluate=command == "evaluate").parse_args(argv)
            with _image_pixel_limit(getattr(args, "max_image_pixels", None)):
                return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except _system_errors() as err:
        print(f"error: {command} failed: {err}", file=sys.stderr)
        return 1
    except Terminated:
        print("error: stopped by SIGTERM; temporary files were removed, files already written are complete",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted; temporary files were removed, files already written are complete", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
