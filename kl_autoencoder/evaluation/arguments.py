"""`kl-autoencoder evaluate`'s command-line arguments (and eval/evaluate.py's): the flags and their choices.

Plain argparse, below orchestration.py, whose `run` turns the parsed flags into an `evaluate` call.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kl_autoencoder import metrics as M
from kl_autoencoder.data import SAMPLE_HELDOUT, SAMPLE_TRAIN
from kl_autoencoder.presets import PRESETS


SHIFT_CHOICES = {"auto": None, "on": True, "off": False}
SKIPPABLE = ("diffusability", "fp16")  # sections `--skip` leaves out (each seconds to minutes per full-size VAE)


# What marks a folder as holding an earlier evaluation (the pictures sit in per-model folders beside them).
EVALUATION_FILES = ("metrics.json", "report.md")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", nargs="+", required=True, metavar="PATH",
                        help="diffusers / pipeline folder, LDM single file or hub id (several: side by side)")
    parser.add_argument("--data", default=None,
                        help=f'an image folder (e.g. photos held out of your fine-tune), a hub dataset, or "sample" '
                             f'(the default: the built-in photos, {len(SAMPLE_HELDOUT)} held out of the sample '
                             f'source\'s training runs, {len(SAMPLE_TRAIN)} trained on)')
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json, report.md, pictures")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier evaluation in --out (refused otherwise)")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size in pixels (default 256)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="evaluate at most this many images (held-out ones first)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="decode z ~ q(z|x) instead of the posterior mode")
    parser.add_argument("--write-config", action="store_true",
                        help="store the measured scaling_factor / shift_factor in the model folder's config.json")
    parser.add_argument("--write-latent-stats", action="store_true",
                        help="with --write-config: also store per-channel latents_mean / latents_std")
    parser.add_argument("--force", action="store_true",
                        help="with --write-config: also replace the factors of a model whose training run kept "
                             "them (a decoder-only fine-tune keeps its source's latent space; refused otherwise)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the release a config-less single file is (its scaling_factor / shift_factor)")
    parser.add_argument("--shift-factor", choices=sorted(SHIFT_CHOICES), default="auto",
                        help="whether the measured latent scale has a shift_factor; auto: only models with >= 16 "
                             "latent channels (the SD3/FLUX convention)")
    parser.add_argument("--lpips-net", choices=sorted(M.TORCHVISION_BACKBONE_FILES), default="alex")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for posterior samples")
    parser.add_argument("--worst-k", type=int, default=4, help="worst images (by PSNR) shown in the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (a line per step still says "
                                                                    "what runs)")
    parser.add_argument("--skip", type=skip_sections, default=(), metavar="SECTIONS",
                        help=f"leave out these sections, comma-separated: {', '.join(SKIPPABLE)}")
    parser.add_argument("--diffusability-probe", action="store_true",
                        help="also train the diffusability probe on crops of the sample photos (~1 min per VAE)")
    parser.add_argument("--teacher", default=None, metavar="PATH",
                        help="the KL VAE the tiny autoencoder(s) among --model were distilled from: evaluated "
                             "too, each tiny model compared with its decodes (default: the only KL VAE in --model)")
    return parser


def skip_sections(text: str) -> tuple[str, ...]:
    """`--skip diffusability,fp16`: the named sections, each one of SKIPPABLE."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SKIPPABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(SKIPPABLE)} (comma-separated)")
    return names
