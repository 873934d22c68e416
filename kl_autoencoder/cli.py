"""The `kl-autoencoder` command: convert, info, encode, decode, reconstruct, sample, interpolate, distill, evaluate,
sample-photos.

Tile flags (`--tile-size`, `--tile-overlap`) are in pixels for every command (see tiling.py); the default
`--tile-size auto` tiles only images over a pixel budget (tiling costs time, see `resolve_tile_size`). Latents written by
`encode` are diffusion latents ((z - shift_factor) * scaling_factor); `sample` draws from the VAE prior N(0, I) on
the raw latent z, which is what the KL term pulls the posterior towards.

Exit status: 0 done; 2 a user mistake (bad paths, bad flags, files that do not fit the model, an output folder that
would overwrite inputs); 1 the system failed us (disk full, I/O error, an unwritable safetensors file); 143 / 130
stopped by SIGTERM / Ctrl-C. Each failure prints one `error: ...` line, no traceback. SIGTERM is turned into an
exception so the atomic writes' clean-ups run: no hidden temporary file is left behind, and every file already
written is complete; a command blocked where no handler can run stops all the same (signals.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from kl_autoencoder.signals import Terminated, sigterm_raises

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
STRIP_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # Pillow formats that take an 8-bit RGB image
MODEL_HELP = ("a KL VAE (AutoencoderKL: diffusers folder, pipeline folder, LDM .safetensors, hub id) or a tiny "
              "autoencoder (an AutoencoderTiny folder, e.g. from distill)")


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


def _load(path: str, device: str | None = None, kl_only: str | None = None, preset: str | None = None):
    """The model at `path` (AutoencoderKL or AutoencoderTiny, see loading.py) ready for inference; `kl_only` names
    the command when a tiny autoencoder cannot serve it; `preset` (presets.py) the release a KL VAE's file is."""
    from kl_autoencoder.fastpath import prepare_for_inference
    from kl_autoencoder.loading import class_name, load_any
    from kl_autoencoder.model import KLAutoencoder

    model = KLAutoencoder.from_pretrained(path, preset=preset) if preset else load_any(path)
    if kl_only and class_name(model) != "AutoencoderKL":
        raise UsageError(f"{path} is a tiny autoencoder (AutoencoderTiny): {kl_only}")
    return prepare_for_inference(model, _device(device))


def _local_sources(*paths: str | None) -> list[Path]:
    """The inputs that exist on disk (not hub ids): an output may never replace them or a folder holding them."""
    return [Path(p) for p in paths if p and Path(p).exists()]


def _add_overwrite(p: argparse.ArgumentParser, what: str = "DST") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} even when it holds more than a previous export (config.json + weights); "
                        "/, the home folder, the current directory and folders holding the source are never replaced")


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _report(result) -> None:
    """Each skipped file first, then the summary that counts them: the summary is the last line."""
    from kl_autoencoder.untrusted import MAX_ERROR_CHARS, shown

    for name, reason in result.skipped:
        print(f"skipped {shown(name)}: {shown(reason, MAX_ERROR_CHARS)}", file=sys.stderr)
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


def convert_format(dst: str, format: str | None) -> str:
    """The format `convert` writes to `dst`: as --format says, else read off the name (NAME.safetensors: an LDM
    single file; any other name: a diffusers folder). A name that says the other thing than --format is refused."""
    suffix = Path(dst).suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UsageError(f"{dst}: LDM single files are written as safetensors only (no pickle); name it "
                         f"{Path(dst).with_suffix('.safetensors')}")
    is_file_name = suffix == ".safetensors" and not dst.endswith(("/", "\\"))
    if format is None:
        return "ldm" if is_file_name else "diffusers"
    if format == "diffusers" and is_file_name:
        raise UsageError(f"{dst}: --format diffusers writes a folder, but the name is a .safetensors file; drop "
                         "--format for an LDM single file, or name a folder")
    if format == "ldm" and not is_file_name:
        raise UsageError(f"{dst}: --format ldm writes one file; name it NAME.safetensors")
    return format


def cmd_convert(args) -> int:
    from kl_autoencoder.formats import read_config
    from kl_autoencoder.model import KLAutoencoder

    if args.config and Path(args.config).name != "config.json":
        raise UsageError(f"--config must point to a config.json, got {args.config}")
    args.format = convert_format(args.dst, args.format)  # before the model loads: a refusal costs nothing
    if args.no_config and args.format != "ldm":
        raise UsageError(f"{args.dst}: --no-config writes an LDM single file (a diffusers folder needs its "
                         "config.json); name it NAME.safetensors")
    config = read_config(Path(args.config).parent) if args.config else None
    model = KLAutoencoder.from_pretrained(args.src, config=config, preset=args.preset)
    if args.scaling_factor is not None:
        model.config.scaling_factor = args.scaling_factor
    if args.shift_factor is not None:
        model.config.shift_factor = args.shift_factor
    protect = _local_sources(args.src, args.config)
    if args.no_config:  # weights only, as released single files are
        from kl_autoencoder.formats import save_weights

        written = save_weights(model.state_dict(), None, args.dst, format="ldm", dtype=args.dtype,
                               overwrite=args.overwrite, protect=protect)
    else:
        card = our_card(args.src) if args.format == "diffusers" else None
        written = model.save_pretrained(args.dst, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                                        protect=protect, card=card)
    print(f"wrote {written} ({args.format}{', no config' if args.no_config else ''}, {args.dtype or 'fp32'})")
    if args.format == "ldm":
        from kl_autoencoder.presets import front_end_notes

        for note in front_end_notes(model.config.to_dict()):
            print(f"note: {note}")
    return 0


def our_card(source: str) -> str | None:
    """The model card of a source folder this toolkit exported (convert carries it along), else None."""
    from kl_autoencoder.durable import is_toolkit_card
    from kl_autoencoder.formats import CARD_NAME

    path = Path(source) / CARD_NAME
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 2**20:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if is_toolkit_card(text) else None


def model_info(model, image_size: int) -> dict:
    from kl_autoencoder.loading import class_name

    config = model.config
    side = -(-image_size // config.downsampling_factor)  # padded up to the latent grid, as encode does
    return {
        "class": class_name(model),
        "config": config.to_dict(),
        "parameters": {"encoder": model.num_parameters("encoder") + _count(model.quant_conv),
                       "decoder": model.num_parameters("decoder") + _count(model.post_quant_conv),
                       "total": model.num_parameters()},
        "downsampling_factor": config.downsampling_factor,
        "image_size": image_size,
        "latent_shape": [config.latent_channels, side, side],
    }


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def cmd_info(args) -> int:
    info = model_info(_load(args.path, "cpu", preset=args.preset), args.image_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"model: {args.path} ({info['class']})")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    print(f"parameters: encoder {p['encoder']:,}  decoder {p['decoder']:,}  total {p['total']:,}")
    print(f"downsampling factor: {info['downsampling_factor']}")
    c, h, w = info["latent_shape"]
    print(f"latent shape for {args.image_size}x{args.image_size}: [{c}, {h}, {w}]")
    return 0


def _image_folder_command(run, args, **options) -> int:
    """encode / reconstruct: a folder of images through `run(model, input, out, ...)`, then the report."""
    model = _load(args.model, args.device, kl_only="it has no posterior to sample (use --mode mean)"
                  if args.mode == "sample" else None, preset=args.preset)
    generator = _generator(args.seed, next(model.parameters()).device)
    _report(run(model, args.input, args.out, batch_size=args.batch_size, mode=args.mode, generator=generator,
                **_tiling(args), **options))
    return 0


def cmd_encode(args) -> int:
    from kl_autoencoder.inference import check_shard_folder, encode_folder
    from kl_autoencoder.latent_shards import encode_command, wants_dataset_encode

    if wants_dataset_encode(args):  # shards in, shards out, across `accelerate launch` processes
        return encode_command(args, _load)
    # before the model loads: no work for a run that must stop
    check_shard_folder(args.out, args.overwrite, inputs=[args.input])
    return _image_folder_command(encode_folder, args, overwrite=args.overwrite)


def cmd_decode(args) -> int:
    from kl_autoencoder.inference import PNG_OUTPUTS, decode_latents
    from kl_autoencoder.outputs import check_output

    check_output(args.out, "decode", [args.latents], PNG_OUTPUTS, args.overwrite, noun="PNG", kind="latents")
    model = _load(args.model, args.device, preset=args.preset)
    _report(decode_latents(model, args.latents, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                           **_tiling(args)))
    return 0


def cmd_reconstruct(args) -> int:
    from kl_autoencoder.inference import PNG_OUTPUTS, reconstruct_folder
    from kl_autoencoder.outputs import check_output

    check_output(args.out, "reconstruct", [args.input], PNG_OUTPUTS, args.overwrite, noun="PNG")
    return _image_folder_command(reconstruct_folder, args, overwrite=args.overwrite)


def cmd_sample(args) -> int:
    from tqdm.auto import tqdm

    from kl_autoencoder.inference import decode_sliced, sample_prior, save_png
    from kl_autoencoder.outputs import check_output, remove_earlier, safe_parent

    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    earlier = check_output(args.out, "sample", earlier=["sample-*.png"], overwrite=args.overwrite, noun="sample",
                           why="new samples would replace some of them and leave the others")
    model = _load(args.model, args.device, kl_only="sample draws from a KL VAE's prior N(0, I), which a tiny "
                  "autoencoder does not have; sample with its teacher")
    _check_tiling_args(args, model)
    device = next(model.parameters()).device
    shape = (args.num, *model.config.latent_shape(args.image_size, args.image_size))
    z = sample_prior(shape, args.truncation, torch.Generator().manual_seed(args.seed)).to(device)
    out = Path(args.out)
    with tqdm(total=args.num, desc="sampling", unit="img") as progress:
        for start in range(0, args.num, args.batch_size):
            images = decode_sliced(model, z[start:start + args.batch_size], None, **_tiling(args))
            remove_earlier(earlier)  # --overwrite: the earlier samples go once there are new ones to write
            earlier = []
            for i, image in enumerate(images, start):
                save_png(image, safe_parent(out, out / f"sample-{i:05d}.png"))
            progress.update(len(images))
    print(f"wrote {args.num} sample{'s' if args.num != 1 else ''} to {out}")
    return 0


def _load_square(path: str, size: int) -> torch.Tensor:
    """An image resized (shorter side) and centre-cropped to size x size, as [3, size, size] in [-1, 1]."""
    from PIL import Image, ImageOps

    from kl_autoencoder.data import image_to_tensor, load_image

    return image_to_tensor(ImageOps.fit(load_image(path), (size, size), Image.Resampling.BICUBIC))


def interpolation_target(out: str, image_a: str, image_b: str) -> tuple[Path, str]:
    """(file, Pillow format) for `interpolate --out`: a folder (a trailing slash, or one that exists) gets
    A-to-B.png; a file name gets the format its extension names, and any other name is refused."""
    from PIL import Image

    if out.endswith(("/", "\\")) or Path(out).is_dir():
        return Path(out) / f"{Path(image_a).stem}-to-{Path(image_b).stem}.png", "PNG"
    suffix = Path(out).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format not in STRIP_FORMATS or image_format not in Image.SAVE:
        what = f"{suffix!r} is not an image format this command writes" if suffix else "it has no extension"
        raise UsageError(f"--out {out}: {what}; name an image file (strip.png, strip.jpg, strip.webp) or a folder "
                         "(end it with /)")
    return Path(out), image_format


def cmd_interpolate(args) -> int:
    from kl_autoencoder.data import tensor_to_image
    from kl_autoencoder.durable import atomic_write
    from kl_autoencoder.inference import decode_sliced, encode_batch, lerp, slerp
    from kl_autoencoder.outputs import check_output

    out, image_format = interpolation_target(args.out, args.image_a, args.image_b)
    check_output(out, "interpolate", [args.image_a, args.image_b], overwrite=args.overwrite, file_output=True)
    model = _load(args.model, args.device)
    device = next(model.parameters()).device
    f = model.config.downsampling_factor
    if args.image_size % f:
        raise UsageError(f"--image-size {args.image_size} must be a multiple of the downsampling factor {f}")
    pixels = torch.stack([_load_square(args.image_a, args.image_size), _load_square(args.image_b, args.image_size)])
    z = encode_batch(model, pixels.to(device), "mean")
    path = (slerp if args.slerp else lerp)(z[0], z[1], args.steps)
    images = decode_sliced(model, path, args.batch_size).clamp(-1, 1)
    strip = tensor_to_image(torch.cat(list(images.cpu()), dim=-1))  # [3, S, steps * S], left to right
    atomic_write(out, lambda tmp: strip.save(tmp, format=image_format))
    print(f"wrote {out} ({image_format}, {args.steps} steps, {'slerp' if args.slerp else 'lerp'})")
    return 0


def cmd_distill(args) -> int:
    from kl_autoencoder.config import load_config
    from kl_autoencoder.data import DatasetUnavailableError
    from kl_autoencoder.distill import RECIPE, build_distillation
    from kl_autoencoder.losses import PerceptualWeightsError
    from kl_autoencoder.outputs import check_output
    from kl_autoencoder.run_folder import RunFolderError
    from kl_autoencoder.spelling import check_source_spelling
    from kl_autoencoder.trainer import NonFiniteLossError, TrainingInterrupted, train

    check_source_spelling(args.data, "--data")
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
    flags += [f"model.preset={args.preset}"] if args.preset is not None else []
    cfg = load_config(config, flags + args.overrides)  # the overrides win over the flags
    # the run folder's own rules (earlier runs, resume, overwrite) are the trainer's; here: never among the inputs
    check_output(cfg.train.output_dir, "distill", [cfg.data.source, cfg.distill.teacher])
    try:
        export = train(cfg, build=build_distillation)
    except (RunFolderError, PerceptualWeightsError) as err:  # found before training: nothing was written
        raise UsageError(str(err)) from err
    except DatasetUnavailableError as err:  # opened before anything is written
        print(f"error: {err}", file=sys.stderr)
        return 1
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


def cmd_sample_photos(args) -> int:
    """The built-in photos (or the validation crops) as PNGs in a folder: something to try encode, reconstruct and
    interpolate on, or to choose a recipe on."""
    from kl_autoencoder.data import greyscale_images, sample_images
    from kl_autoencoder.durable import atomic_write
    from kl_autoencoder.outputs import check_output
    from kl_autoencoder import validation_photos

    out, licence = Path(args.out), None
    if args.set == "validation":
        try:
            photos, licence = validation_photos.validation_photos(Path(args.deb) if args.deb else None)
        except (OSError, validation_photos.PhotoSetError) as err:
            raise UsageError(str(err)) from err
    else:
        photos = greyscale_images() if args.set == "greyscale" else sample_images(args.set)
    names = [f"{name}.png" for name, _ in photos] + ([validation_photos.LICENCE_FILE] if licence else [])
    check_output(out, "sample-photos", earlier=names, overwrite=args.overwrite, noun="photo")
    for name, image in photos:
        atomic_write(out / f"{name}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
    if licence:
        atomic_write(out / validation_photos.LICENCE_FILE, lambda tmp: Path(tmp).write_text(licence, encoding="utf-8"))
    print(f"wrote {len(photos)} photos to {out} ({args.set}: {', '.join(name for name, _ in photos)})")
    return 0


def cmd_evaluate(args) -> int:
    from kl_autoencoder import evaluation

    evaluation.run(args)  # writes metrics.json / report.md; errors surface as ValueError -> one-line message
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# argument parsing


def _add_model_io(p: argparse.ArgumentParser, needs_input: bool, needs_latents: bool, has_mode: bool) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
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
    _add_preset(p)


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


def _add_replace(p: argparse.ArgumentParser, what: str) -> None:
    """--overwrite for a command's outputs: without it, earlier outputs of the command at --out are refused."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}; refused otherwise")


def _add_preset(p: argparse.ArgumentParser, what: str = "the release a config-less single file is") -> None:
    from kl_autoencoder.presets import PRESETS, describe_choices

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"{what}: sets its scaling_factor, shift_factor, sample_size, force_upcast ({describe_choices()})")


def _add_image_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than this as possible decompression bombs (default: "
                        "Pillow's limit, about 89 million; 0: no limit, for trusted files only)")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert between diffusers folders and LDM single files")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=("diffusers", "ldm"), default=None,
                   help="diffusers: a folder (config.json + diffusion_pytorch_model.safetensors) that "
                        "AutoencoderKL.from_pretrained loads; ldm: one CompVis-named .safetensors file (ComfyUI, "
                        "A1111), with the model's config in its safetensors header (our loader and `info` read it "
                        "back, other tools ignore it). Default: from DST, ldm for a .safetensors name, else diffusers")
    p.add_argument("--no-config", action="store_true",
                   help="an LDM single file with the weights only, as released VAEs are (loading it then needs "
                        "--preset for the latent fields)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the weights (default: keep fp32)")
    p.add_argument("--config", default=None, help="config.json to use for an LDM single file (which has none)")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the config's scaling_factor")
    p.add_argument("--shift-factor", type=float, default=None, help="override the config's shift_factor")
    _add_preset(p)
    _add_overwrite(p)
    p.set_defaults(func=cmd_convert)


def _add_sample_photos(sub) -> None:
    p = sub.add_parser(
        "sample-photos", help="write the built-in sample photos (or the validation crops) as PNGs",
        description="Write the photos that ship with scikit-image, scikit-learn and matplotlib (nothing is "
                    "downloaded) into OUT as NAME.png. The sets are the training data's: 'heldout' (chelsea, coffee, "
                    "flower) were never trained on; 'greyscale' are 8 greyscale scikit-image photos in no set. "
                    "'validation' fetches Debian's plasma-workspace-wallpapers package (94 MB, apt-get download, or "
                    "--deb FILE) and writes 26 crops of its 13 photographs with the package's copyright file: the "
                    "photos recipes are chosen on.")
    p.add_argument("out", help="output folder")
    p.add_argument("--set", choices=("all", "train", "heldout", "greyscale", "validation"), default="all",
                   help="all: the 12 colour photos (default); train: the 9 the quickstart trains on; heldout: the 3 "
                        "it never sees; greyscale: camera, moon, coins, brick, grass, gravel, page, cell; validation: "
                        "26 crops of 13 wallpaper photographs (downloads one Debian package)")
    p.add_argument("--deb", metavar="FILE", help="with --set validation: read this plasma-workspace-wallpapers .deb "
                                                 "instead of running apt-get download")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.png files OUT already holds")
    p.set_defaults(func=cmd_sample_photos)


def _add_sample(sub) -> None:
    """The sample command: decode draws from the prior."""
    p = sub.add_parser(
        "sample", help="decode draws from the prior N(0, I)",
        description="Decode latents drawn from the VAE prior N(0, I) into PNGs (sample-00000.png, ...). A KL-VAE's "
                    "prior samples look like texture, not photos: its KL weight is tiny, so the latents carry the image "
                    "and the prior is only loosely matched. For real generation, train a diffusion model on the "
                    "latents: examples/latent_diffusion.py.")
    p.add_argument("--model", required=True,
                   help="a KL VAE (AutoencoderKL: diffusers folder, pipeline folder, LDM .safetensors or hub id); "
                        "not a tiny autoencoder, which has no prior")
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
    _add_replace(p, "the samples --out already holds (all sample-*.png there are replaced)")
    p.set_defaults(func=cmd_sample)


def _add_interpolate(sub) -> None:
    """The interpolate command: a latent path between two images."""
    p = sub.add_parser("interpolate", help="decode a latent path between two images into a strip")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--image-size", type=int, default=256, help="both images are resized and centre-cropped to this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True,
                   help="the strip: an image file whose extension sets the format (strip.png, strip.jpg, ...), or a "
                        "folder (a trailing slash or an existing folder) to write A-to-B.png into; not an input")
    p.add_argument("--device", default=None)
    _add_image_limit(p)
    _add_replace(p, "the file at --out")
    p.set_defaults(func=cmd_interpolate)


def _add_distill(sub) -> None:
    """The distill command: a tiny autoencoder from a KL VAE."""
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
    _add_preset(p, "the release the teacher is (model.preset)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. distill.width=64 optim.lr=1e-3")
    p.set_defaults(func=cmd_distill)


def build_parser(with_evaluate: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-autoencoder", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)

    _add_convert(sub)

    p = sub.add_parser("info", help="config, parameter counts, latent shape")
    p.add_argument("path", help=MODEL_HELP)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _add_preset(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encode", help="images -> diffusion latents (safetensors shards)")
    _add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the latent shards --out already holds (refused otherwise: a decode would mix them)")
    from kl_autoencoder.latent_shards import add_encode_arguments

    add_encode_arguments(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latent shards -> PNGs with the original names and sizes")
    _add_model_io(p, needs_input=False, needs_latents=True, has_mode=False)
    _add_image_limit(p)
    _add_replace(p, "PNGs --out already holds (same-named ones are replaced, others kept)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="images -> reconstructions in one pass")
    _add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    _add_replace(p, "PNGs --out already holds (same-named ones are replaced, others kept)")
    p.set_defaults(func=cmd_reconstruct)

    _add_sample(sub)
    _add_interpolate(sub)
    _add_distill(sub)
    _add_sample_photos(sub)

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
def one_line_warnings() -> Iterator[None]:
    """Within: a warning prints as one `warning: ...` line on stderr (no file, line number or source line of ours)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


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
    from kl_autoencoder.untrusted import error_line

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        with sigterm_raises(), one_line_warnings():
            args = build_parser(with_evaluate=command == "evaluate").parse_args(argv)
            with _image_pixel_limit(getattr(args, "max_image_pixels", None)):
                return args.func(args)
    except _user_errors() as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except _system_errors() as err:
        print(f"error: {command} failed: {error_line(err)}", file=sys.stderr)
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
