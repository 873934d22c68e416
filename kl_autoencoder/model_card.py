"""The model card an export carries: `README.md` beside `config.json`, as diffusers' and the hub's convention has it.

It says what the folder is (architecture, parameters), what its latent fields are and how each was set (kept from the
source or measured, on what), how it was trained (data source, steps, batch, resolution, objective, starting point),
its evaluation figures when an evaluation ran, and how to load it (diffusers, the LDM single file for ComfyUI/A1111).
The trainer writes it with every export, `convert` carries it along, `evaluate --write-config` adds its figures.
A card this toolkit wrote has `durable.CARD_TAG` in its YAML front matter, so it is never confused with a user's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kl_autoencoder.durable import CARD_TAG, atomic_write_text, is_toolkit_card
from kl_autoencoder.formats import CARD_NAME, CONFIG_NAME
from kl_autoencoder.presets import LATENT_SCALE_KEY

EVALUATION_HEADING = "## Evaluation"


def _architecture(config: dict[str, Any], parameters: int | None) -> list[str]:
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    rows = [("block_out_channels", config["block_out_channels"]), ("layers_per_block", config["layers_per_block"]),
            ("latent_channels", config["latent_channels"]), ("downsampling factor", factor),
            ("norm_num_groups", config["norm_num_groups"]),
            ("mid-block attention", config.get("mid_block_add_attention", True))]
    if parameters is not None:
        rows.append(("parameters", f"{parameters / 1e6:.2f} M"))
    return ["## Architecture", "", "| field | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]


def _latent_fields(config: dict[str, Any], record: dict[str, Any] | None) -> list[str]:
    record = record or {}
    if record.get("by"):
        how = f"measured by `{record['by']}` on its images"
    elif record.get("latent_scale") == "measured":
        how = (f"measured on {record.get('images', '?')} un-augmented training crops at {record.get('resolution', '?')}"
               " px (1/std of posterior samples; the shift their mean)")
    elif record.get("latent_scale") == "kept":
        how = f"kept from {record.get('source', 'the source')} (its latent space did not change)"
    else:
        how = "as the model's config sets them"
    lines = ["## Latent space", "", f"Diffusion latents are `(z - shift_factor) * scaling_factor`; the factors are {how}.",
             "", "| field | value |", "| --- | --- |"]
    for key in ("scaling_factor", "shift_factor", "sample_size", "force_upcast"):
        lines.append(f"| {key} | {config.get(key)} |")
    stats = "per-channel values" if config.get("latents_mean") is not None else "none"
    lines += [f"| latents_mean / latents_std | {stats} |", ""]
    return lines


def _training(training: dict[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    lines += [f"- {key}: {value}" for key, value in training.items() if value is not None]
    return lines + [""]


def _usage(config: dict[str, Any]) -> list[str]:
    return ["## Use", "", "```python", "from diffusers import AutoencoderKL", "",
            'vae = AutoencoderKL.from_pretrained("PATH_TO_THIS_FOLDER")',
            "z = vae.encode(images).latent_dist.sample()                 # images in [-1, 1], NCHW",
            "latents = (z - (vae.config.shift_factor or 0)) * vae.config.scaling_factor",
            "images = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0)).sample",
            "```", "",
            "In a pipeline: `StableDiffusionXLPipeline.from_pretrained(..., vae=vae)` (or SD, SD3, FLUX of the same "
            f"latent width, {config['latent_channels']} channels). For ComfyUI / A1111: "
            "`kl-autoencoder convert PATH_TO_THIS_FOLDER vae.safetensors` writes the LDM single file; it prints a "
            "note when those front-ends cannot load this layout or will scale its latents by their family's factor "
            "instead of this one.", ""]


def model_card(config: dict[str, Any], *, record: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
               parameters: int | None = None, evaluation: list[str] | None = None) -> str:
    """The card's text for a KL VAE export: `config` its diffusers config, `record` the latent-scale record
    (presets.LATENT_SCALE_KEY), `training` what to say of the run, `evaluation` lines of figures."""
    lines = ["---", "library_name: diffusers", f"{CARD_TAG} autoencoder, vae]", "---", "",
             "# A KL-regularized VAE (diffusers AutoencoderKL)", "",
             "Trained with kl-autoencoder: the convolutional, KL-regularized VAE latent diffusion runs on.", ""]
    lines += _architecture(config, parameters) + _latent_fields(config, record)
    if training:
        lines += _training(training)
    if evaluation:
        lines += [EVALUATION_HEADING, "", *evaluation, ""]
    return "\n".join(lines + _usage(config)) + "\n"


def _replace_section(card: str, heading: str, lines: list[str], before: str = "## Use") -> str:
    """`card` with the section under `heading` replaced by `lines` (or inserted before the `before` section)."""
    sections = card.split("\n## ")
    body = "\n".join(lines).rstrip("\n").removeprefix("## ")
    for i, section in enumerate(sections):
        if section.startswith(heading.removeprefix("## ") + "\n"):
            sections[i] = body + "\n"
            return "\n## ".join(sections)
    at = next(i for i, section in enumerate(sections) if section.startswith(before.removeprefix("## ")))
    return "\n## ".join(sections[:at] + [body + "\n"] + sections[at:])


def with_evaluation(card: str, evaluation: list[str], config: dict[str, Any]) -> str:
    """`card` with its evaluation section set to `evaluation`'s lines and its latent section to `config`'s values,
    which `evaluate --write-config` has just measured."""
    record = config.get(LATENT_SCALE_KEY) or {"latent_scale": "measured", "by": "evaluate --write-config"}
    card = _replace_section(card, "## Latent space", _latent_fields(config, record))
    return _replace_section(card, EVALUATION_HEADING, [EVALUATION_HEADING, "", *evaluation, ""])


def run_description(cfg: Any, processes: int) -> dict[str, Any]:
    """What the card says of a training run, from its `TrainConfig`."""
    loss, gan = cfg.loss, cfg.loss.gan
    objective = f"{loss.pixel.upper()} x {loss.pixel_weight}"
    if loss.perceptual_weight:
        objective += f" + LPIPS-{loss.perceptual_net} x {loss.perceptual_weight}"
    objective += f" + KL x {loss.kl_weight:g}"
    if gan.enabled:
        objective += f" + PatchGAN ({gan.disc_loss}) x {gan.disc_weight} from step {gan.disc_start}"
    if loss.equivariance.probability:
        objective += f"; EQ-VAE pairs on {loss.equivariance.probability:.0%} of the steps"
    start = cfg.model.pretrained or f"random weights ({cfg.model.init} init)"
    return {"started from": start, "trained": "the decoder (encoder frozen)" if cfg.model.freeze_encoder else None,
            "data": cfg.data.source + (f" ({cfg.data.data_files})" if cfg.data.data_files else ""),
            "resolution": f"{cfg.data.resolution} px crops",
            "steps": f"{cfg.train.max_steps} x batch {cfg.train.batch_size} per process x {processes} process(es)"
                     + (f" x {cfg.train.grad_accum_steps} accumulated" if cfg.train.grad_accum_steps > 1 else ""),
            "objective (LDM's convention)": objective,
            "optimizer": f"AdamW lr {cfg.optim.lr:g}" + (" x total batch" if cfg.optim.scale_lr else "")
                         + f", betas {tuple(cfg.optim.betas)}, {cfg.optim.schedule} schedule",
            "EMA": f"decay {cfg.train.ema.decay}" if cfg.train.ema.enabled else None,
            "seed": cfg.train.seed, "full config": "config.yaml in the run folder"}


def evaluation_lines(entry: dict[str, Any], data: str, resolution: int, counts: dict[str, int]) -> list[str]:
    """An evaluation's figures (one model's metrics.json entry) as the card's lines, a split each (`counts`: its
    number of images)."""
    lines = []
    for split, metrics in entry["splits"].items():
        shown = []
        for key, name in (("psnr", "PSNR {} dB"), ("ssim", "SSIM {}"), ("lpips", "LPIPS {}"),
                          ("colour_error", "colour error {}")):
            summary = metrics.get(key)
            if summary is not None:
                shown.append(name.format(f"{summary['mean']:.4g}"))
        scope = f"{counts.get(split, '?')} {split} images of `{data}`"
        lines.append(f"- {scope} at {resolution} px: " + ", ".join(shown))
    return lines


def add_evaluation(model_path: str | Path, lines: list[str]) -> Path | None:
    """Put `lines` into the card of the export at `model_path` (a folder with a card this toolkit wrote); None when
    there is no such card (a user's README.md is never touched)."""
    path = Path(model_path) / CARD_NAME
    if not path.is_file() or path.is_symlink():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if not is_toolkit_card(text):
        return None
    config = json.loads((Path(model_path) / CONFIG_NAME).read_text(encoding="utf-8"))
    return atomic_write_text(path, with_evaluation(text, lines, config))
