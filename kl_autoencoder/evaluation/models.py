"""Loading the models to evaluate: KL VAE or tiny autoencoder by its config, short unique names, checks.

Every model is loaded on the CPU and checked against the resolution before any evaluation work, so a bad path fails
before a picture is written. Below orchestration.py and the teacher comparison, which both compare model paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kl_autoencoder.evaluation.errors import EvaluationError
from kl_autoencoder.formats import find_config_json
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiny import TinyAutoencoder


def model_names(paths: list[str]) -> list[str]:
    """Short unique names for model paths (folder or file stem; `-2`, `-3` ... on clashes), safe as folder names."""
    names: list[str] = []
    for path in paths:
        p = Path(path.rstrip("/"))
        base = re.sub(r"[^\w.-]+", "_", (p.parent.name if p.name == "vae" else p.stem) or "model")
        base = "model" if base.strip(".") == "" else base  # "x/.." has the stem "..": a folder above --out
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_models(paths: list[str], resolution: int, preset: str | None = None) -> list[KLAutoencoder]:
    """Every model, loaded on the CPU and checked against the resolution, before any evaluation work."""
    models = []
    for path, name in zip(paths, model_names(paths)):
        model = load_model_for_eval(path, preset)
        check_resolution(model, name, resolution, resolution)
        models.append(model)
    return models


def is_tiny_autoencoder(path: str) -> bool:
    """Whether `path` is a local diffusers (or pipeline) folder whose config.json names an AutoencoderTiny."""
    config = find_config_json(path) if Path(path).expanduser().is_dir() else None
    if config is None:
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError, AttributeError, RecursionError):  # unreadable: the KL loader reports it
        return False


def load_model_for_eval(path: str, preset: str | None = None) -> KLAutoencoder | TinyAutoencoder:
    """The model at `path` on the CPU (a tiny autoencoder by its config's class name; a KL VAE with `preset`'s
    latent fields); any failure is an EvaluationError naming the path."""
    try:
        if is_tiny_autoencoder(path):
            return TinyAutoencoder.from_pretrained(path)
        return KLAutoencoder.from_pretrained(path, preset=preset)
    except Exception as err:  # any failure to load is the user's path, said with the reason
        raise EvaluationError(f"could not load model {path!r}: {err}") from err


def check_resolution(model: KLAutoencoder, name: str, height: int, width: int) -> None:
    factor = model.config.downsampling_factor
    if height % factor or width % factor:
        raise EvaluationError(f"resolution {(height, width)} is not divisible by the model's downsampling "
                              f"factor {factor} (model {name!r})")


def same_model_path(a: str, b: str) -> bool:
    if Path(a).expanduser().exists() and Path(b).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a.rstrip("/") == b.rstrip("/")
