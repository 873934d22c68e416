"""Images/s of the training input pipeline on a folder of small photos and on a folder of 4K photos.

    python benchmarks/data_speed.py                       # the quickstart's data section, 8 photos per folder
    python benchmarks/data_speed.py --config configs/kl-f8.yaml --batches 20
    python benchmarks/data_speed.py --tiny                # harness self-test

Two folders are written to a temporary directory from the built-in training photos: "small" (each photo as a JPEG at
its native size, 370-1411 px) and "4K" (each photo upscaled to 3840 px on its longer side, 3840x2560 for a 3:2
photo, JPEG quality 90). Each is read by the trainer's own pipeline (`data.build_dataset` with the config's data
section, source replaced by the folder; `data.training_batches` in the main process, as on a 2-core machine) and,
for comparison, by the same pipeline decoding every file whole for every crop (what the loader did before reduced
decoding and the per-file cache). The clock runs from a fresh dataset, so every file's first decode is included.
The last row is the config's model training rate (`trainer.train_step`, images/s), the rate the loader must keep up
with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kl_autoencoder.data import ImageFolderDataset, build_dataset, load_image, sample_images, training_batches  # noqa: E402


class WholeDecodeFolder(ImageFolderDataset):
    """The loader as it was: every crop decodes its file whole (no reduced decoding, no cache)."""

    def load(self, index: int) -> Image.Image:
        return load_image(self.paths[index])


def write_folders(root: Path, count: int, long_side: int) -> dict[str, Path]:
    """root/small: the training photos as JPEGs at native size; root/4k: the same upscaled to `long_side` px."""
    folders = {"small": root / "small", "4K": root / "4k"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    photos = sample_images("train")
    for i in range(count):
        name, image = photos[i % len(photos)]
        image.save(folders["small"] / f"{i:03d}_{name}.jpg", quality=90)
        scale = long_side / max(image.size)
        big = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        big.save(folders["4K"] / f"{i:03d}_{name}.jpg", quality=90)
    return folders


def images_per_second(dataset: Any, batch_size: int, batches: int) -> float:
    """Images/s of `batches` batches from a fresh dataset (first decodes included), main process only."""
    stream = training_batches(dataset, batch_size, seed=0, num_workers=0)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)["pixel_values"].shape[0]
    return images / (time.perf_counter() - start)


def training_rate(cfg: Any, steps: int) -> float:
    """Images/s of the config's training step on a fixed batch (one warm-up step excluded)."""
    from kl_autoencoder.trainer import build_training, train_step

    t = build_training(cfg)
    x = torch.rand(cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    train_step(t, x, 0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        train_step(t, x, step)
    return steps * x.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--photos", type=int, default=8, help="files per folder")
    p.add_argument("--batches", type=int, default=40, help="batches timed per row")
    p.add_argument("--long-side", type=int, default=3840, help="longer side of the large photos, px")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="2 photos, 2 batches, 512 px: a harness self-test")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from kl_autoencoder.config import load_config

    if args.tiny:
        args.photos, args.batches, args.long_side = 2, 2, 512
    cfg = load_config(args.config)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_folders(Path(tmp), args.photos, args.long_side)
        for label, folder in folders.items():
            cfg.data.source = str(folder)
            ours = build_dataset(cfg.data, split="train")
            whole = WholeDecodeFolder(ours.paths, ours.transform, ours.repeats)
            rows.append((f"{label} photos, whole decode per crop (before)",
                         images_per_second(whole, cfg.train.batch_size, args.batches)))
            rows.append((f"{label} photos, reduced decode + cache (now)",
                         images_per_second(ours, cfg.train.batch_size, args.batches)))
    rows.append(("training step of the config (for reference)", training_rate(cfg, 2 if args.tiny else 10)))
    from run import machine_line  # benchmarks/run.py

    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {machine_line(torch.device('cpu'))}\n"
              f"command: python benchmarks/data_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"{args.photos} photos per folder ({args.long_side} px longer side for 4K), {Path(args.config).name} "
              f"data section: {cfg.data.resolution}x{cfg.data.resolution} crops, max_crop_scale "
              f"{cfg.data.max_crop_scale}, batch {cfg.train.batch_size}, {args.batches} batches per row from a "
              "fresh dataset, main process")
    table = "\n".join(["| pipeline | images/s |", "| --- | --- |"] + [f"| {name} | {value:.1f} |" for name, value in rows])
    print(header, table, sep="\n", flush=True)
    result = {"header": header, "rows": [{"name": n, "images_per_second": v} for n, v in rows]}
    if args.json:
        from kl_autoencoder.durable import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
