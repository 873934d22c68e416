"""Writing a measured latent scale into a model folder's config.json (`evaluate --write-config`).

scaling_factor / shift_factor, optionally the per-channel latents_mean / latents_std; refused for the factors a
training run kept (a decoder-only fine-tune's latent space is its source's) unless forced. Below orchestration.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kl_autoencoder.evaluation.errors import EvaluationError
from kl_autoencoder.evaluation.report import write_json
from kl_autoencoder.formats import CONFIG_NAME, find_config_json
from kl_autoencoder.presets import LATENT_SCALE_KEY
from kl_autoencoder.untrusted import shown


def config_json_for(model_path: str) -> Path:
    """The config.json that --write-config would update: a diffusers folder's, or a pipeline folder's vae/."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"--write-config needs a diffusers model folder with config.json; {model_path!r} is "
                              "not a local folder (convert it with `kl-autoencoder convert` first)")
    config = find_config_json(path)
    if config is None:
        raise EvaluationError(f"--write-config: {path} has no {CONFIG_NAME} (nor vae/{CONFIG_NAME})")
    return config


def check_latent_scale_writable(config_path: Path, force: bool) -> None:
    """Refuse (unless `force`) to replace the factors a training run kept: a decoder-only fine-tune's latent space
    is its source's, and every diffusion model trained on that needs the source's factors, not a new estimate."""
    try:
        record = json.loads(config_path.read_text(encoding="utf-8")).get(LATENT_SCALE_KEY)
    except (OSError, ValueError, AttributeError):
        return  # unreadable: write_latent_config reports it, naming the file
    if isinstance(record, dict) and record.get("latent_scale") == "kept" and not force:
        raise EvaluationError(f"--write-config: {config_path} holds the latent factors its training run kept from "
                              f"{shown(record.get('source'))} (the encoder was frozen, so diffusion models trained on "
                              "that latent space need them); refusing to replace them with this evaluation's estimate. "
                              "Add --force to write anyway")


def write_latent_config(model_path: str, latents: dict[str, Any], latent_stats: bool = False) -> Path:
    """Store scaling_factor / shift_factor (None: no shift) and optionally per-channel latents_mean / latents_std
    in a diffusers config.json."""
    config_path = config_json_for(model_path)
    if not math.isfinite(latents["scaling_factor"]):
        raise EvaluationError(f"--write-config: the measured scaling_factor is {latents['scaling_factor']}; "
                              f"{config_path} left unchanged")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvaluationError(f"--write-config: {config_path} is not valid JSON: {err}") from err
    config["scaling_factor"] = latents["scaling_factor"]
    config["shift_factor"] = latents["shift_factor"]
    if LATENT_SCALE_KEY in config:  # a training run's record: the factors are now this evaluation's
        config[LATENT_SCALE_KEY] = {"latent_scale": "measured", "by": "evaluate --write-config"}
    if latent_stats:
        config["latents_mean"] = latents["latents_mean"]
        config["latents_std"] = latents["latents_std"]
    write_json(config_path, config)
    return config_path
