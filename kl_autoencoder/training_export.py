"""The end of training: the diffusers export of the trained (EMA) weights, with the latent scale kept from the
pretrained model or re-measured on training crops by the one estimator (metrics.estimate_latent_scale).

Below the loop, which calls `export_model` unless the training brings its own `export_fn`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from kl_autoencoder.config import TrainConfig, keeps_pretrained_latent_scale
from kl_autoencoder.data import build_dataset, training_batches
from kl_autoencoder.metrics import estimate_latent_scale
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.model_card import model_card, run_description
from kl_autoencoder.presets import LATENT_SCALE_KEY
from kl_autoencoder.training_step import Training


def export_model(t: Training, path: Path) -> Path:
    """Write the diffusers export (EMA weights when EMA is on). Its factors are kept (`keeps_pretrained_latent_
    scale`) or re-measured (`remeasure_latent_scale`); config.json records which (LATENT_SCALE_KEY). A model trained
    from scratch gets `data.resolution` as `sample_size` (diffusers' tile size) unless model.architecture sets one."""
    with torch.device("meta"):  # no random init of weights the strict load below overwrites (seconds at full size)
        export = KLAutoencoder(AutoencoderConfig.from_dict(t.raw_model.config.to_dict()))
    export = export.to_empty(device=t.device)
    export.load_state_dict(t.ema.averaged_state_dict(t.raw_model) if t.ema is not None else t.raw_model.state_dict())
    export.eval()
    cfg = t.cfg
    if not cfg.model.pretrained and "sample_size" not in cfg.model.architecture:
        export.config.sample_size = cfg.data.resolution
    if keeps_pretrained_latent_scale(cfg):
        record = {"latent_scale": "kept", "source": cfg.model.pretrained or "model.architecture"}
    else:
        record = remeasure_latent_scale(export, cfg, t.device)
    card = model_card(export.config.to_dict(), record=record, parameters=export.num_parameters(),
                      training=run_description(cfg, t.accelerator.num_processes))
    # train.overwrite=true kept the previous run's vae/ until now: replaced only by this complete export
    export.cpu().save_pretrained(path, private={LATENT_SCALE_KEY: record}, overwrite=cfg.train.overwrite,
                                 protect=[p for p in (cfg.model.pretrained,) if p], card=card)
    return path


def remeasure_latent_scale(model: KLAutoencoder, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Set `model`'s factors by `metrics.estimate_latent_scale` on `train.scaling_images` random training crops,
    un-augmented (no hue turn or flip: the latents a diffusion model will see), say so once, return the record.
    Per-channel `latents_mean` / `latents_std` described the old latent space: dropped."""
    data = dataclasses.replace(cfg.data, random_hue=0.0, random_flip=False)
    crops = build_dataset(data, split=data.split, train=True)
    batches = training_batches(crops, min(cfg.train.batch_size, 32), cfg.train.seed + 1, num_workers=0)
    scale = estimate_latent_scale(model, (batch["pixel_values"] for batch in batches),
                                  shift=cfg.train.export_shift_factor, num_images=cfg.train.scaling_images,
                                  generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    config, before = model.config, model.config.to_dict()
    config.scaling_factor, config.shift_factor = scale.scaling_factor, scale.shift_factor
    dropped = config.latents_mean is not None or config.latents_std is not None
    config.latents_mean = config.latents_std = None
    shift = "none" if scale.shift_factor is None else f"{scale.shift_factor:.5g}"
    why = ("train.remeasure_latent_scale=true" if cfg.model.freeze_encoder
           else "the encoder was trained" if cfg.model.pretrained else "trained from scratch")
    print(f"latent scale measured on {scale.num_images} un-augmented training crops ({why}): "
          f"scaling_factor {scale.scaling_factor:.5g} (was {before['scaling_factor']:.5g}), shift_factor {shift}"
          + ("; the source's latents_mean/latents_std dropped" if dropped else ""), flush=True)
    return {"latent_scale": "measured", "images": scale.num_images, "resolution": data.resolution}

