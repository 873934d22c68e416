"""Peak memory and time of one tiled decode of a large image: ours (default and plain blend) vs diffusers' tiling.

    python benchmarks/tiled_memory.py --config configs/kl-f8.yaml --sizes 1024 2048 --tile 512
    python benchmarks/tiled_memory.py --device cuda --config configs/kl-f8.yaml --sizes 4096 --tile 512   # the GPU target

Each measurement runs in a fresh subprocess, with the model's random weights (memory and time do not depend on them)
and a random latent for an image of SIZE x SIZE pixels. Overlap is a quarter of the tile (diffusers' fixed split).
Peak memory: on CUDA `max_memory_allocated` above the memory held before the decode (weights, latent), under the
inference precision (bf16 autocast); on CPU the growth of the process's peak resident memory (ru_maxrss) over its
value once model and latent are in place, fp32 (torch has no CPU allocator statistics; at these sizes activations
are hundreds of MiB). The output image itself (SIZE^2 x 3 x 4 bytes in fp32) is part of every peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from harness import write_json
from measure import peak_rss_bytes, run_child
from reference import build_reference_vae, with_block_types

METHODS = ("ours", "ours-plain", "diffusers")


def measure(config: str, size: int, tile: int, method: str, device_name: str) -> dict:
    from kl_autoencoder.config import load_config
    from kl_autoencoder.fastpath import prepare_for_inference
    from kl_autoencoder.inference import autocast_for
    from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
    from kl_autoencoder.tiling import decode_tiled

    device = torch.device(device_name)
    architecture = with_block_types(dict(load_config(config).model.architecture))
    torch.manual_seed(0)
    if method == "diffusers":
        model = build_reference_vae(architecture).to(device).eval()
        f = 2 ** (len(model.config.block_out_channels) - 1)
        model.enable_tiling()
        model.tile_sample_min_size, model.tile_latent_min_size = tile, tile // f
        channels = model.config.latent_channels
    else:
        model = prepare_for_inference(KLAutoencoder(AutoencoderConfig.from_dict(architecture)), device)
        f, channels = model.config.downsampling_factor, model.config.latent_channels
    z = torch.randn(1, channels, size // f, size // f, device=device)
    overlap = tile // 4 // f * f
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = peak_rss_bytes()
    start = time.perf_counter()
    with torch.inference_mode(), autocast_for(device):
        if method == "diffusers":
            image = model.decode(z).sample
        else:
            image = decode_tiled(model, z, tile, overlap, norm_passes=1 if method == "ours" else 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = peak_rss_bytes() - baseline
    seconds = time.perf_counter() - start
    assert image.shape[-2:] == (size, size), image.shape
    return {"method": method, "size": size, "tile": tile, "device": device_name, "peak_mib": peak / 2**20,
            "seconds": seconds}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    harness.add_config(p, "kl-f8")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    harness.add_device(p, default="cpu")
    harness.add_json(p)
    p.add_argument("--one", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)  # the subprocess side
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.config, int(args.one[0]), args.tile, args.one[1], args.device)))
        return []
    results = []
    print("| size | method | peak MiB | seconds |\n|---|---|---|---|", flush=True)
    for size in args.sizes:
        for method in args.methods:
            command = [sys.executable, __file__, "--config", args.config, "--tile", str(args.tile), "--device",
                       args.device, "--one", str(size), method]
            result = run_child(command, f"{size} {method}")
            results.append(result)
            print(f"| {size}x{size} | {method} | {result['peak_mib']:.0f} | {result['seconds']:.1f} |", flush=True)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
