"""Evaluate autoencoders: metrics.json, report.md and pictures in one folder.

    python eval/evaluate.py --model PATH [PATH ...] --data SOURCE --out DIR [--resolution 256] [--num-images N]
                            [--batch-size B] [--sample] [--write-config [--write-latent-stats]]
                            [--shift-factor auto|on|off] [--skip diffusability,fp16] [--no-progress]

The same as `kl-autoencoder evaluate`; kl_autoencoder/evaluation/ runs it (its rooms are listed in its `__init__`). Every
model is checked before any work; a bad one exits with status 2 and a one-line message, writing nothing.
"""

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from kl_autoencoder.cli import one_line_warnings  # noqa: E402  (warnings as one line each)

from kl_autoencoder import evaluation  # noqa: E402
from kl_autoencoder.untrusted import error_line  # noqa: E402
from kl_autoencoder.signals import Terminated, sigterm_raises  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = evaluation.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        with sigterm_raises():  # SIGTERM / Ctrl-C stop it with 143 / 130, also while blocked
            evaluation.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as stop:
        print(f"error: stopped by {'SIGTERM' if isinstance(stop, Terminated) else 'SIGINT'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    with one_line_warnings():
        sys.exit(main())
