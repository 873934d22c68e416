"""`kl-autoencoder interpolate`: a latent path (lerp or slerp) between two images, decoded into one strip."""

from __future__ import annotations

from pathlib import Path

import torch

from kl_autoencoder.commands.common import MODEL_HELP, UsageError, add_image_limit, add_replace, load_model

STRIP_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # Pillow formats that take an 8-bit RGB image


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
    from kl_autoencoder.inference import decode_sliced, encode_batch
    from kl_autoencoder.outputs import check_output
    from kl_autoencoder.sampling import lerp, slerp

    out, image_format = interpolation_target(args.out, args.image_a, args.image_b)
    check_output(out, "interpolate", [args.image_a, args.image_b], overwrite=args.overwrite, file_output=True)
    model = load_model(args.model, args.device)
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


def add_parser(sub) -> None:
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
    add_image_limit(p)
    add_replace(p, "the file at --out")
    p.set_defaults(func=cmd_interpolate)
