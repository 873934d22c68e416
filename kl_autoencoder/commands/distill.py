"""`kl-autoencoder distill`: a tiny autoencoder (diffusers AutoencoderTiny) trained from a KL VAE."""

from __future__ import annotations

import json
import signal
import sys

from kl_autoencoder.commands.common import UsageError, add_preset


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


def add_parser(sub) -> None:
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
    add_preset(p, "the release the teacher is (model.preset)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. distill.width=64 optim.lr=1e-3")
    p.set_defaults(func=cmd_distill)
