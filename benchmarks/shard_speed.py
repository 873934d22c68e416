"""Sharded data: the training stream from WebDataset shards per DataLoader worker count, and `encode` throughput
with 1 and 2 processes (`accelerate launch`), against the config's training step.

    python benchmarks/shard_speed.py                     # quickstart config, 8 shards x 16 photos
    python benchmarks/shard_speed.py --config configs/kl-f8.yaml --workers 0 1 2 4
    python benchmarks/shard_speed.py --tiny              # harness self-test
    python benchmarks/shard_speed.py --data-only --shuffle-buffer 0     # the stream in read order (default: 1000)

The shards are written to a temporary directory: the 9 built-in training photos at native size (370-1411 px), JPEG
quality 90, as img2dataset writes them (`000123.jpg` + `000123.txt`). The data rows read them through the trainer's
own path (`data.build_dataset` with the config's data section, source webdataset; `data.training_batches` with N
DataLoader workers), timing `--batches` batches after the first (worker start-up excluded). The encode rows run
`kl-autoencoder encode --input webdataset ... --resolution R` under `accelerate launch --num_processes P` (CPU) with a
randomly initialised model of the config's architecture, and report images / the slowest process's encode time (the
time each process prints: reading, encoding and writing its shards; interpreter start-up and model load excluded).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from harness import ROOT, header, rate_table, write_json
from measure import images_per_second, training_rate

from kl_autoencoder.data import build_dataset, sample_images, training_batches


def write_shards(folder: Path, shards: int, per_shard: int) -> str:
    """`shards` tars of `per_shard` samples (the training photos, cycled); returns the brace pattern."""
    photos = sample_images("train")
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                name, image = photos[i % len(photos)]
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("txt", name.encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def stream_rate(cfg: Any, workers: int, batches: int) -> float:
    """Images/s of the training stream with `workers` DataLoader workers (first batch excluded)."""
    stream = training_batches(build_dataset(cfg.data, split="train"), cfg.train.batch_size, seed=0,
                              num_workers=workers)
    next(stream)
    return images_per_second(stream, batches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_rate(model: Path, pattern: str, out: Path, processes: int, resolution: int, batch_size: int) -> float:
    """Images/s of `encode` on `processes` CPU processes: images / the slowest process's encode time."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())] + (["--multi_gpu"] if processes > 1 else [])
    cmd = launch + [str(ROOT / "kl_autoencoder" / "cli.py"), "encode", "--model", str(model), "--input", "webdataset",
                    "--data-files", pattern, "--out", str(out), "--resolution", str(resolution),
                    "--batch-size", str(batch_size), "--device", "cpu", "--num-workers", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    found = re.findall(r"(\d+) image\(s\) encoded into \d+ new shard\(s\) in ([\d.]+) s", result.stdout)
    if len(found) != processes:
        raise RuntimeError(f"expected {processes} summaries, got: {result.stdout[-2000:]}")
    return sum(int(n) for n, _ in found) / max(float(s) for _, s in found)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    harness.add_config(p)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=16, help="photos per shard")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=20, help="batches timed per data row")
    p.add_argument("--encode-resolution", type=int, default=256)
    harness.add_json(p)
    p.add_argument("--shuffle-buffer", type=int, default=None, help="data.shuffle_buffer (default: the config's)")
    p.add_argument("--data-only", action="store_true", help="the stream rows only (no training step, no encode)")
    p.add_argument("--tiny", action="store_true", help="2 shards x 4 photos, 2 batches: a harness self-test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from kl_autoencoder.config import load_config, resolved_architecture
    from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder

    if args.tiny:
        args.shards, args.per_shard, args.batches, args.workers, args.encode_resolution = 2, 4, 2, [0, 1], 64
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), args.shards, args.per_shard)
        buffer = [] if args.shuffle_buffer is None else [f"data.shuffle_buffer={args.shuffle_buffer}"]
        cfg = load_config(args.config, ["data.source=webdataset", f"data.data_files={pattern}", *buffer])
        for workers in args.workers:
            rows.append((f"training stream from shards, {workers} DataLoader worker(s), shuffle buffer "
                         f"{cfg.data.shuffle_buffer}", stream_rate(cfg, workers, args.batches)))
        if args.data_only:
            print(rate_table("path", rows))
            return {"rows": [{"name": n, "images_per_second": v} for n, v in rows]}
        rows.append(("training step of the config (for reference)", training_rate(cfg, 2 if args.tiny else 10)))
        torch.manual_seed(0)
        model = Path(tmp) / "vae"
        KLAutoencoder(AutoencoderConfig(**resolved_architecture(cfg.model))).save_pretrained(model)
        rates = {}
        for processes in (1, 2):
            rates[processes] = encode_rate(model, pattern, Path(tmp) / f"latents{processes}", processes,
                                           args.encode_resolution, 8)
            rows.append((f"encode {args.encode_resolution}px, {processes} process(es)", rates[processes]))
    text = (f"{header('shard_speed.py', argv, torch.device('cpu'))}\n"
            f"{args.shards} shards x {args.per_shard} photos; {Path(args.config).name} data section: "
            f"{cfg.data.resolution}x{cfg.data.resolution} crops, batch {cfg.train.batch_size}, "
            f"{args.batches} batches per data row; encode ratio 2 / 1 processes: {rates[2] / rates[1]:.2f}")
    print(text, rate_table("path", rows), sep="\n", flush=True)
    result = {"header": text, "rows": [{"name": n, "images_per_second": v} for n, v in rows],
              "encode_ratio": rates[2] / rates[1]}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
