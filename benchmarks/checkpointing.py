"""Peak memory of one training forward+backward with and without gradient checkpointing, per resolution.

    python benchmarks/checkpointing.py [--resolutions 256 512 1024] [--channels 32 64 128 128] [--layers 2]

Each measurement runs in a fresh subprocess and reports the growth of the process's peak resident memory
(ru_maxrss) over its value after the model, batch and warm-up are in place: on CPU torch has no allocator
statistics, and at these sizes activations (hundreds of MiB) dwarf RSS noise. On CUDA use benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from measure import peak_rss_bytes, run_child

from kl_autoencoder import KLAutoencoder


def measure(resolution: int, channels: list[int], layers: int, checkpointing: bool) -> dict:

    torch.manual_seed(0)
    model = KLAutoencoder(block_out_channels=tuple(channels), layers_per_block=layers, norm_num_groups=32)
    model.enable_gradient_checkpointing(checkpointing)
    x = torch.rand(1, 3, resolution, resolution) * 2 - 1
    for p in model.parameters():  # gradients allocated up front, so they do not count as activations
        p.grad = torch.zeros_like(p)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    recon, posterior = model(x)
    (recon - x).abs().mean().add(1e-6 * posterior.kl().mean()).backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"resolution": resolution, "checkpointing": checkpointing, "peak_mib": (peak - baseline) / 2**20,
            "seconds": seconds}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 128])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        res, ckpt = args.child.split(",")
        print(json.dumps(measure(int(res), args.channels, args.layers, ckpt == "1")))
        return
    print(f"channels {args.channels}, {args.layers} layers per block, batch 1, fp32, fwd+bwd")
    print("| resolution | plain peak MiB | checkpointed peak MiB | ratio | plain s | checkpointed s |")
    print("|---|---|---|---|---|---|")
    for res in args.resolutions:
        rows = []
        for ckpt in ("0", "1"):
            cmd = [sys.executable, __file__, "--child", f"{res},{ckpt}", "--channels", *map(str, args.channels),
                   "--layers", str(args.layers)]
            rows.append(run_child(cmd, f"{res} px, checkpointing {ckpt}"))
        plain, ck = rows
        print(f"| {res} | {plain['peak_mib']:.0f} | {ck['peak_mib']:.0f} | {ck['peak_mib'] / plain['peak_mib']:.2f}x "
              f"| {plain['seconds']:.1f} | {ck['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
