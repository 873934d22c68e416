"""Train or fine-tune a KL autoencoder from a YAML config plus dotted overrides.

    python training/train.py --config configs/quickstart.yaml train.max_steps=200
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config configs/kl-f8.yaml
    python training/train.py --config configs/quickstart.yaml train.resume=latest   # continue a stopped run
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from kl_autoencoder.cli import one_line_warnings  # noqa: E402  (warnings as one line each)

from kl_autoencoder.config import ConfigError, load_config  # noqa: E402
from kl_autoencoder.distill import build_distillation  # noqa: E402
from kl_autoencoder.fp16_fix import build_fp16_fix  # noqa: E402
from kl_autoencoder.formats import WeightsError  # noqa: E402
from kl_autoencoder.losses import PerceptualWeightsError  # noqa: E402
from kl_autoencoder.data import DatasetUnavailableError  # noqa: E402
from kl_autoencoder.run_folder import DiskSpaceError, RunFolderError  # noqa: E402
from kl_autoencoder.data import ShardError  # noqa: E402
from kl_autoencoder.trackers import TrackerError  # noqa: E402
from kl_autoencoder.signals import Terminated, sigterm_raises  # noqa: E402
from kl_autoencoder.trainer import NonFiniteLossError, TrainingInterrupted, train  # noqa: E402
from kl_autoencoder.untrusted import error_line  # noqa: E402

EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number: `train && evaluate` stops


def resume_command(output_dir: str) -> str:
    """The line that continues a stopped run: the run's own config.yaml holds every override it was started with."""
    script = Path(__file__).resolve()
    shown = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    launcher = "accelerate launch <the same launch options> " if launched else "python "
    return (f"{launcher}{shlex.quote(str(shown))} --config {shlex.quote(str(Path(output_dir) / 'config.yaml'))} "
            "train.resume=latest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 optim.lr=2e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        # a config naming a distillation teacher trains a tiny autoencoder in the same loop; fp16_fix.enabled
        # rescales model.pretrained to run in fp16, calibrated on the data (kl_autoencoder/fp16_fix.py)
        build = build_distillation if cfg.distill.teacher else build_fp16_fix if cfg.fp16_fix.enabled else None
        with sigterm_raises():  # outside the loop (start-up, export) too: SIGTERM/Ctrl-C stop with 143/130
            train(cfg, build=build)  # prints "exported <folder>" once
    except (ConfigError, WeightsError, RunFolderError, PerceptualWeightsError, ShardError) as e:  # nothing written
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except (DatasetUnavailableError, DiskSpaceError, TrackerError) as e:  # the machine or the network, not the request
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(f"\n{stop.signal_name or 'stop signal'}: stopped after step {stop.step}; checkpoint: {stop.checkpoint}\n"
              f"resume with: {resume_command(cfg.train.output_dir)}", flush=True)
        return EXIT_INTERRUPTED.get(stop.signal_name or "", 1)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Terminated, KeyboardInterrupt) as stop:  # outside the loop: nothing trained since the last checkpoint
        name = "SIGTERM" if isinstance(stop, Terminated) else "SIGINT"
        print(f"error: stopped by {name} outside the training loop", file=sys.stderr)
        return EXIT_INTERRUPTED[name]
    return 0


if __name__ == "__main__":
    with one_line_warnings():
        sys.exit(main())
