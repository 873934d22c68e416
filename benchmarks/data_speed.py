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
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from harness import header, rate_table, write_json
from measure import images_per_second, training_rate

from kl_autoencoder.data import ImageFolderDataset, build_dataset, load_image, sample_images, training_batches


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


def fresh_rate(dataset: Any, batch_size: int, batches: int) -> float:
    """Images/s of `batches` batches from a fresh dataset (first decodes included), main process only."""
    return images_per_second(training_batches(dataset, batch_size, seed=0, num_workers=0), batches)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    harness.add_config(p)
    p.add_argument("--photos", type=int, default=8, help="files per folder")
    p.add_argument("--batches", type=int, default=40, help="batches timed per row")
    p.add_argument("--long-side", type=int, default=3840, help="longer side of the large photos, px")
    harness.add_json(p)
    p.add_argument("--tiny", action="store_true", help="2 photos, 2 batches, 512 px: a harness self-test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
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
                         fresh_rate(whole, cfg.train.batch_size, args.batches)))
            rows.append((f"{label} photos, reduced decode + cache (now)",
                         fresh_rate(ours, cfg.train.batch_size, args.batches)))
    rows.append(("training step of the config (for reference)", training_rate(cfg, 2 if args.tiny else 10)))
    text = (f"{header('data_speed.py', argv, torch.device('cpu'))}\n"
            f"{args.photos} photos per folder ({args.long_side} px longer side for 4K), {Path(args.config).name} "
            f"data section: {cfg.data.resolution}x{cfg.data.resolution} crops, max_crop_scale "
            f"{cfg.data.max_crop_scale}, batch {cfg.train.batch_size}, {args.batches} batches per row from a "
            "fresh dataset, main process")
    print(text, rate_table("pipeline", rows), sep="\n", flush=True)
    result = {"header": text, "rows": [{"name": n, "images_per_second": v} for n, v in rows]}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
