"""The released VAEs people fine-tune, and what their single files cannot say about themselves.

An original single file (`sdxl_vae.safetensors`, FLUX's `ae.safetensors`, the `first_stage_model.` part of an SD
checkpoint) holds weights only. Its shapes give the architecture, but the latent fields a diffusion pipeline needs
(`scaling_factor`, `shift_factor`) and the ones diffusers uses around it (`sample_size`: the tile size;
`force_upcast`: decode in fp32) leave no trace: SD 1.x and SDXL have identical shapes and differ only in their factor
(0.18215 vs 0.13025). A preset names the release and fills them:

    model.preset: sdxl          # train / distill (the teacher) config
    kl-autoencoder convert sdxl_vae.safetensors out/ --preset sdxl      # convert, info, encode, decode, ...
    python eval/evaluate.py --model sdxl_vae.safetensors --preset sdxl ...

Values are those of diffusers' `config.json` for each release (stable-diffusion-v1-5/vae, stable-diffusion-2-1/vae,
sdxl-vae, stable-diffusion-3-medium-diffusers/vae, FLUX.1-dev/vae; the factors also in the model cards / the sgm and
flux reference code). A preset also describes its release's architecture (`architecture`), so the full-size model
can be built with random weights, and a preset given for weights of another architecture is refused. A model that
carries its config (a diffusers folder, our exports) keeps that config's values: they may have been re-measured, and a
line warns where they differ from the preset's. Without a preset, a config-less file loads with SD 1.x's factor and a
one-line warning that says so (and SD 1.x's sample_size and force_upcast when its shapes are SD's).

The export's record of where its latent fields came from (`LATENT_SCALE_KEY` in config.json, a private key diffusers
ignores without a warning) is defined here too: `evaluate --write-config` reads it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from kl_autoencoder.formats import WeightsError

# The config fields that describe the latent space rather than the weights: a pretrained model takes them from its
# config, a preset, or model.architecture (never from the weights), and an export keeps or re-measures them.
LATENT_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "sample_size", "force_upcast")

# What a config-less file gets without a preset: diffusers' own default (LDM_VAE_DEFAULT_SCALING_FACTOR), SD 1.x's.
ASSUMED_SCALING_FACTOR = 0.18215

# config.json key recording how the export's latent fields were set: {"latent_scale": "kept" | "measured", ...}.
LATENT_SCALE_KEY = "_kl_autoencoder_latent_scale"


@dataclass(frozen=True)
class Preset:
    """One release: its latent fields and the architecture its weights have."""

    name: str
    release: str
    scaling_factor: float
    shift_factor: float | None
    sample_size: int
    force_upcast: bool
    latent_channels: int
    use_quant_conv: bool
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2

    def latent_fields(self) -> dict[str, Any]:
        """The fields a config-less single file cannot carry (no per-channel statistics in any of these releases)."""
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, "latents_mean": None,
                "latents_std": None, "sample_size": self.sample_size, "force_upcast": self.force_upcast}

    def shape_fields(self) -> dict[str, Any]:
        """The architecture fields the weights' shapes show, as the release has them."""
        return {"in_channels": 3, "out_channels": 3, "block_out_channels": list(self.block_out_channels),
                "layers_per_block": self.layers_per_block, "latent_channels": self.latent_channels,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_quant_conv,
                "mid_block_add_attention": True}

    def architecture(self) -> dict[str, Any]:
        """The release's whole diffusers config (an `AutoencoderConfig` dict): builds the full-size model."""
        levels = len(self.block_out_channels)
        return {**self.shape_fields(), "down_block_types": ["DownEncoderBlock2D"] * levels,
                "up_block_types": ["UpDecoderBlock2D"] * levels, "act_fn": "silu", "norm_num_groups": 32,
                **self.latent_fields()}


_KL_F8 = dict(latent_channels=4, use_quant_conv=True)
_F8_C16 = dict(latent_channels=16, use_quant_conv=False)  # SD3 and FLUX.1 dropped the 1x1 quant convs

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sd", "Stable Diffusion 1.x (kl-f8)", 0.18215, None, 512, True, **_KL_F8),
    Preset("sd2", "Stable Diffusion 2.x (kl-f8, 768 px)", 0.18215, None, 768, True, **_KL_F8),
    Preset("sdxl", "Stable Diffusion XL", 0.13025, None, 1024, True, **_KL_F8),
    Preset("sd3", "Stable Diffusion 3 / 3.5", 1.5305, 0.0609, 1024, True, **_F8_C16),
    Preset("flux", "FLUX.1", 0.3611, 0.1159, 1024, True, **_F8_C16),
)}


class PresetError(WeightsError):
    """An unknown preset, or one given for weights of another architecture; the message names both."""


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; choose one of: {describe_choices()}")
    return PRESETS[name]


def describe_choices() -> str:
    return ", ".join(f"{p.name} ({p.release})" for p in PRESETS.values())


def check_fits(preset: Preset, config: dict[str, Any], source: str) -> None:
    """Refuse a preset whose release has another architecture than the weights at `source` (config: theirs)."""
    differs = [f"{k} {config[k]!r} (preset: {v!r})" for k, v in preset.shape_fields().items()
               if k in config and _plain(config[k]) != v]
    if differs:
        close = [p.name for p in PRESETS.values() if p.latent_channels == config.get("latent_channels")]
        hint = f"; presets for {config.get('latent_channels')}-channel VAEs: {', '.join(close)}" if close else ""
        raise PresetError(f"preset {preset.name!r} ({preset.release}) does not fit {source}: its weights have "
                          + ", ".join(differs) + hint)


def apply_preset(config: dict[str, Any], name: str, source: str, stored: bool) -> dict[str, Any]:
    """`config`, a model's config dict, with preset `name`'s latent fields where the file carries none (`stored`
    False: read off the shapes), after checking the architecture. A stored config (a diffusers folder, an export
    that re-measured its factors) keeps its own values: a line warns where they differ from the preset's."""
    preset = get_preset(name)
    check_fits(preset, config, source)
    if not stored:
        return {**config, **preset.latent_fields()}
    differs = [f"{k} {config[k]!r} (preset: {v!r})" for k, v in preset.latent_fields().items()
               if k in config and _plain(config[k]) != v]
    if differs:
        warnings.warn(f"{source}: its stored config is used, which differs from preset {name!r}: {', '.join(differs)}",
                      stacklevel=4)
    return config


def assume_release(config: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """A config-less file loaded without a preset: `config` (read off its shapes) with SD 1.x's latent fields when
    the shapes are SD's kl-f8 (as diffusers assumes of a single file), else with only diffusers' default factor;
    and the one-line warning that says which."""
    try:
        check_fits(PRESETS["sd"], config, source)
    except PresetError:
        return config, assumed_scale_message(source, f"scaling_factor {ASSUMED_SCALING_FACTOR} and no shift_factor")
    sd = PRESETS["sd"]
    assumed = (f"SD 1.x: scaling_factor {sd.scaling_factor}, no shift_factor, sample_size {sd.sample_size}, "
               f"force_upcast {str(sd.force_upcast).lower()}")
    return {**config, **sd.latent_fields()}, assumed_scale_message(source, assumed)


def assumed_scale_message(source: str, assumed: str) -> str:
    """The one-line warning for a config-less file loaded without a preset."""
    return (f"{source} carries no config: assuming {assumed}; for another release choose a preset "
            f"({', '.join(PRESETS)}: model.preset=NAME or --preset NAME) or set model.architecture.scaling_factor / "
            "shift_factor")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def front_end_notes(config: dict[str, Any]) -> list[str]:
    """What front-ends that load an LDM single file (ComfyUI, A1111, CompVis' ldm) will not take from this model's
    config, one line each: they assume a released VAE's layout, and take the latent scale from the diffusion model's
    family, never from the file."""
    config = {k: _plain(v) for k, v in config.items()}
    notes = []
    layouts = [p for p in PRESETS.values() if all(config.get(k) == v for k, v in p.shape_fields().items())]
    if not layouts or config.get("norm_num_groups") != 32 or config.get("act_fn", "silu") != "silu":
        shape = ", ".join(f"{k} {config.get(k)!r}" for k in ("block_out_channels", "layers_per_block",
                                                                "norm_num_groups", "mid_block_add_attention"))
        notes.append(f"front-ends (ComfyUI, A1111) assume a released VAE's layout ([128, 256, 512, 512], 2 layers, 32 "
                     f"groups, mid attention) and will not load this one ({shape}); diffusers loads either form")
    shift = config.get("shift_factor") or 0.0
    families = [p for p in PRESETS.values() if p.latent_channels == config.get("latent_channels")
                and abs(p.scaling_factor - config.get("scaling_factor", 0)) <= 1e-4 * p.scaling_factor
                and abs((p.shift_factor or 0.0) - shift) <= 1e-4]
    if not families:
        known = ", ".join(f"{p.name} {p.scaling_factor}" + (f" + shift {p.shift_factor}" if p.shift_factor else "")
                          for p in PRESETS.values())
        notes.append(f"front-ends take the latent scale from the diffusion model's family ({known}), not from the "
                     f"file: this VAE's scaling_factor {config.get('scaling_factor'):.5g} and shift_factor "
                     f"{shift:.5g} match none, so they will scale its latents differently than diffusers does")
    return notes
