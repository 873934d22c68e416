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

Each command's code is in kl_autoencoder/commands/ under its name (convert.py, encode.py, ...), the options and helpers
they share in commands/common.py; this module builds the parser from them and runs one command with its errors
reported as one line.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Sequence

from kl_autoencoder.commands import (
    convert, decode, distill, encode, evaluate, info, interpolate, reconstruct, sample, sample_photos,
)
from kl_autoencoder.commands.common import DTYPE_CHOICES, MODEL_HELP, UsageError  # noqa: F401 (re-exported)
from kl_autoencoder.commands.convert import cmd_convert, convert_format, our_card  # noqa: F401 (re-exported)
from kl_autoencoder.commands.decode import cmd_decode  # noqa: F401 (re-exported)
from kl_autoencoder.commands.distill import cmd_distill  # noqa: F401 (re-exported)
from kl_autoencoder.commands.encode import cmd_encode  # noqa: F401 (re-exported)
from kl_autoencoder.commands.evaluate import cmd_evaluate  # noqa: F401 (re-exported)
from kl_autoencoder.commands.info import cmd_info, model_info  # noqa: F401 (re-exported)
from kl_autoencoder.commands.interpolate import STRIP_FORMATS, cmd_interpolate, interpolation_target  # noqa: F401
from kl_autoencoder.commands.reconstruct import cmd_reconstruct  # noqa: F401 (re-exported)
from kl_autoencoder.commands.sample import cmd_sample  # noqa: F401 (re-exported)
from kl_autoencoder.commands.sample_photos import cmd_sample_photos  # noqa: F401 (re-exported)
from kl_autoencoder.signals import Terminated, sigterm_raises

# In the order `kl-autoencoder --help` lists them.
COMMANDS = (convert, info, encode, decode, reconstruct, sample, interpolate, distill, sample_photos)


def build_parser(with_evaluate: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-autoencoder", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    evaluate.add_parser(sub, with_evaluate)
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
