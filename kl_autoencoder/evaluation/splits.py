"""The evaluation images in splits, held-out first, and which images are held out of which model's training.

The built-in `sample` source is its held-out photos, then its training photos (data.SAMPLE_HELDOUT / SAMPLE_TRAIN);
any other source is one split, "all". The sample's photos are held out of sample-source runs only:
`heldout_warnings` says so for a model trained on another source. Below orchestration.py, which loads the images once
for every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kl_autoencoder.data import (SAMPLE_HELDOUT, SAMPLE_TRAIN, SkipLog, is_local_path, iter_image_folder,
                                 load_eval_images)
from kl_autoencoder.evaluation.errors import EvaluationError
from kl_autoencoder.evaluation.report import ALL, HELD_OUT, TRAINING


@dataclass
class EvalImages:
    """The evaluation images and where they come from."""
    names: list[str]
    images: torch.Tensor              # [N, 3, R, R] in [-1, 1]
    splits: dict[str, list[int]]      # split name -> image indices, in report order (held-out first)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> reason
    available: int | None = None      # images the source has (None: a hub dataset, not counted)


def split_sources(data: str) -> list[tuple[str, str]]:
    """(split name, `load_eval_images` source) in report order: the built-in sample's held-out photos first."""
    if data in ("sample", "sample:all"):
        return [(HELD_OUT, "sample:heldout"), (TRAINING, "sample:train")]
    if data == "sample:heldout":
        return [(HELD_OUT, data)]
    if data == "sample:train":
        return [(TRAINING, data)]
    return [(ALL, data)]


def load_split_images(data: str, resolution: int, num_images: int | None = None) -> EvalImages:
    """The images of `data`, split by `split_sources`; `num_images` counts from the first split."""
    skipped = SkipLog()
    names: list[str] = []
    parts: list[torch.Tensor] = []
    splits: dict[str, list[int]] = {}
    for split, source in split_sources(data):
        remaining = None if num_images is None else num_images - len(names)
        if remaining == 0:
            break
        try:
            part_names, part = load_eval_images(source, resolution, remaining, skipped=skipped)
        except (OSError, ValueError, RuntimeError) as err:
            raise EvaluationError(f"could not load evaluation images from {data!r}: {err}") from err
        splits[split] = list(range(len(names), len(names) + len(part_names)))
        names += part_names
        parts.append(part)
    if not names:
        raise EvaluationError(f"no images in {data!r}")
    return EvalImages(names, torch.cat(parts), splits, skipped.reasons, available_images(data))


def available_images(data: str) -> int | None:
    """How many images `data` holds, whatever --num-images keeps: the sample's photos, a folder's image files."""
    if data.startswith("sample"):
        return sum(len(SAMPLE_HELDOUT if s == HELD_OUT else SAMPLE_TRAIN) for s, _ in split_sources(data))
    return len(iter_image_folder(data)) if is_local_path(data) else None


def describe_images(data: str, images: EvalImages) -> str:
    """What is evaluated, in words: the count, the source, and what its splits mean."""
    count = len(images.names)
    if data.startswith("sample"):
        words = {HELD_OUT: "held out of the sample source's training", TRAINING: "its training photos"}
        parts = [f"{len(indices)} {words[split]}" for split, indices in images.splits.items()]
        return f"the built-in sample photos ({', '.join(parts)})"
    first = f"the first {count} of {images.available}" if (images.available or 0) > count else f"{count}"
    return f"{first} images of {data} (one split, all: none known to be held out)"


def trained_on(model_path: str) -> str | None:
    """The data.source of the training run that exported `model_path` (RUN/vae beside RUN/config.yaml), if any."""
    import yaml

    config = Path(model_path).expanduser().parent / "config.yaml"
    try:
        source = (yaml.safe_load(config.read_text(encoding="utf-8")) or {})["data"]["source"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None
    return source if isinstance(source, str) else None


def heldout_warnings(model_path: str, name: str, images: EvalImages) -> list[str]:
    """The sample's held-out photos are held out of sample-source runs only: said for a model trained on another
    source (a fine-tune on your folder may have seen them). `evaluate` also says each on stderr."""
    source = trained_on(model_path)
    if HELD_OUT not in images.splits or source is None or source.startswith("sample"):
        return []
    message = (f"{name} was trained on {source}, not on the sample source: its 'held-out' photos are held out of the "
               "sample source's training only; evaluate on photos held out of your own (--data FOLDER)")
    return [message]
