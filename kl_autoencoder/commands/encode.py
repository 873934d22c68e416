"""`kl-autoencoder encode`: a folder of images into latent files (inference.encode_folder), or, with --resolution,
webdataset / parquet / saved-dataset inputs or several `accelerate launch` processes, into resumable latent shards
(latent_shards.encode_dataset)."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from kl_autoencoder.commands.common import add_model_io, image_folder_command, load_model
from kl_autoencoder.latent_shards import DEFAULT_SHARD_SIZE, count_images, encode_dataset, shard_size_for
from kl_autoencoder.data import SHARD_SOURCES, is_saved_dataset
from kl_autoencoder.untrusted import MAX_ERROR_CHARS, shown


def cmd_encode(args) -> int:
    from kl_autoencoder.inference import encode_folder
    from kl_autoencoder.latent_files import check_shard_folder

    if wants_dataset_encode(args):  # shards in, shards out, across `accelerate launch` processes
        return encode_command(args, load_model)
    # before the model loads: no work for a run that must stop
    check_shard_folder(args.out, args.overwrite, inputs=[args.input])
    return image_folder_command(encode_folder, args, overwrite=args.overwrite)


def add_encode_arguments(p: Any) -> None:
    """The `encode` options of the sharded, multi-process path."""
    p.add_argument("--resolution", type=int, default=None,
                   help="centre-crop every image to R x R and write resumable latent shards "
                        "(latent-shard-*.safetensors + manifest.json), one per input shard; needed for "
                        "webdataset/parquet/saved-dataset inputs and "
                        "under `accelerate launch` with more than one process")
    p.add_argument("--data-files", nargs="+", default=None,
                   help="with --input webdataset or --input parquet: the shards (brace pattern, glob, or several)")
    p.add_argument("--image-column", default=None, help="image column / tar member extension (default: found)")
    p.add_argument("--split", default="train", help="the split of a saved DatasetDict (default: train)")
    p.add_argument("--store-posterior", action="store_true",
                   help="store the posterior mean (KEY) and std (KEY.std) in diffusion units, to sample later")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"images per shard for a folder or saved dataset (default: {DEFAULT_SHARD_SIZE}, fewer when "
                        "there are too few images for every process to get a shard)")
    p.add_argument("--num-workers", type=int, default=2, help="image-decoding threads per process (default: 2)")
    p.add_argument("--allow-local-paths", action="store_true",
                   help="read the local files that parquet / saved-dataset cells name instead of holding the image "
                        "(refused otherwise: a dataset from someone else could name any file of this machine)")


def wants_dataset_encode(args: Any) -> bool:
    """The sharded path: asked for (--resolution), needed by the input, or launched on several processes."""
    return (args.resolution is not None or args.input in SHARD_SOURCES or bool(args.data_files)
            or is_saved_dataset(args.input) or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def encode_command(args: Any, load: Callable[..., Any]) -> int:
    """`kl-autoencoder encode --resolution R ...` in this process, one of `accelerate launch`'s N."""
    import sys

    from accelerate import PartialState

    from kl_autoencoder.fastpath import stays_on_cpu

    if args.resolution is None:
        raise ValueError("--resolution R is needed to encode webdataset/parquet/saved-dataset inputs or across "
                         "processes (every image is centre-cropped to R x R)")
    state = PartialState(cpu=stays_on_cpu(args.device))  # else a process without a GPU is "process 0 of 1"
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise ValueError(f"launched as {launched} processes but accelerate sees {state.num_processes}; on a machine "
                         "without GPUs pass --cpu to accelerate launch")
    args.shard_size = shard_size_for(count_images(args.input, args.split), state.num_processes, args.shard_size)
    device = args.device or str(state.device)
    model = load(args.model, device, kl_only="the sharded encode stores posterior latents (an AutoencoderKL)",
                 preset=getattr(args, "preset", None))
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed + state.process_index)
    model_path = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    result = encode_dataset(model, model_path, args.input, args.out, args.resolution, args.data_files,
                            args.batch_size, args.mode, args.store_posterior, args.shard_size, args.image_column,
                            args.split, args.num_workers, args.overwrite, state.process_index, state.num_processes,
                            state.wait_for_everyone, generator, allow_local_paths=args.allow_local_paths)
    for name, reason in result.skipped:
        print(f"skipped {shown(name)}: {shown(reason, MAX_ERROR_CHARS)}", file=sys.stderr)
    sys.stderr.flush()
    prefix = f"[process {state.process_index}/{state.num_processes}] " if state.num_processes > 1 else ""
    if not result.written and not result.existing:
        prefix += "no shard fell to this process (fewer input shards than processes): "
    print(prefix + result.summary())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("encode", help="images -> diffusion latents (safetensors shards)")
    add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the latent shards --out already holds (refused otherwise: a decode would mix them)")
    add_encode_arguments(p)
    p.set_defaults(func=cmd_encode)
