"""A tiny autoencoder (TAESD's architecture) distilled from a KL VAE: diffusers' `AutoencoderTiny`, weight for weight.

    student = build_student(teacher.config)                    # latent channels and downsampling of the teacher
    targets = distillation_targets(teacher, x, generator)      # (teacher's diffusion latents, teacher's decode)
    loss, logs = distillation_loss(student, targets, x, pixel_weight=1.0, perceptual=lpips, perceptual_weight=0.1)
    student.save_pretrained("tiny")                            # AutoencoderTiny.from_pretrained("tiny") loads it
    student.save_single_files("previews", name="taemy")        # taemy_encoder/decoder.safetensors (TAESD layout)

The model: an encoder of plain 3x3 convs and residual blocks (conv-act-conv-act-conv + skip, ReLU), one stride-2
conv per stage; a decoder that mirrors it with nearest upsampling. No norms, no attention: ~1 M parameters per half.
`state_dict()` keys are exactly diffusers' (`encoder.layers.N...`, `decoder.layers.N...`: the parameter-free layers
(activations, upsampling) keep their positions in the `nn.Sequential` so the indices line up).

Image convention (diffusers'): `encode` takes images in [-1, 1], `decode` returns images in [-1, 1] (unclamped).
The layers inside work in TAESD's [0, 1]; the two maps are the first and last lines of the halves' `forward`.

Latent convention. The student lives in the teacher's *diffusion* latents, the space a diffusion model samples in:
    latents = teacher.to_diffusion_latents(z) = (z - shift_factor) * scaling_factor
Its decoder maps those latents straight to the teacher's decode of z, its encoder maps images straight to them.
Diffusers pipelines undo the VAE's scale before decoding and apply it after encoding, reading the factors from the
*VAE they are given*:
    SD / SDXL style (4 channels, scaling only):  vae.decode(latents / scaling_factor)
                                                 vae.encode(x) * scaling_factor
    SD3 / FLUX style (16 channels, + shift):     vae.decode(latents / scaling_factor + shift_factor)
                                                 (vae.encode(x) - shift_factor) * scaling_factor
(both factors read from vae.config)
For `AutoencoderTiny` as the pipeline's `vae` to see exactly the pipeline's latents, both maps must be the identity,
so the export carries scaling_factor = 1.0 and shift_factor = 0.0 whatever the teacher's factors: the teacher's
scale and shift are baked into the student's weights, once, by distillation. (TAESD's own convention: "TAESD
directly converts SD(XL) latents into RGB images ... set [scaling_factor] to 1.0", madebyollin/taesd#3; diffusers
added shift_factor, default 0.0, to AutoencoderTiny for SD3's pipeline, huggingface/diffusers#8618; ComfyUI applies
the teacher's factors outside the tiny model.) latent_magnitude = 3 and latent_shift = 0.5 stay at diffusers' defaults: they
only map latents to [0, 1] for 8-bit storage (`scale_latents`), and 3 matches the decoder's fixed input clamp
tanh(x / 3) * 3, right for unit-variance diffusion latents. Per-channel `latents_mean` / `latents_std` (which some
SDXL-style pipelines apply when the VAE config has them) are not part of `to_diffusion_latents`; `build_student`
warns when a teacher carries them.

Downsampling: AutoencoderTiny has one stride-2 stage per entry after the first of `num_encoder_blocks`, and the
decoder one upsampling by `upsampling_scaling_factor` per stage but the last. An f8 teacher gets 4 stages, as
TAESD; `build_student` gives an f4 teacher 3 stages and an f16 teacher 5 (f = 2 ** (stages - 1)), so the student's
latent grid is the teacher's. Pipelines read the factor as 2 ** (len(vae.config.block_out_channels) - 1), and
AutoencoderTiny records block_out_channels = decoder_block_out_channels, so they get it right for every depth.

The config (`TinyConfig`, diffusers' fields and their checks) is tiny_config.py's, importable from here as well.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kl_autoencoder.durable import atomic_write, atomic_write_dir, check_replaceable_file
from kl_autoencoder.formats import (CONFIG_NAME, DTYPES, WEIGHTS_NAME, WeightsError, _verify_export,
                                    check_fits, check_floating, model_folder, nonfinite_keys, read_config,
                                    read_state_dict, warn_nonfinite)
from kl_autoencoder.losses import pixel_loss
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.tiny_config import (ACTIVATIONS, MAX_RESAMPLING_FACTOR, MAX_TINY_BLOCKS,  # noqa: F401
                                        MAX_TINY_PARAMETERS, MAX_UPSAMPLING_SCALE, TinyConfig)

# --------------------------------------------------------------------------------------------------------------------
# The model. Layer positions are the state-dict keys: parameter-free layers hold their index in the Sequential.


def conv(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """x -> ReLU(conv-act-conv-act-conv(x) + x): the residual unit of both halves (widths never change inside)."""

    def __init__(self, channels: int, act_fn: str):
        super().__init__()
        act = ACTIVATIONS[act_fn]
        self.conv = nn.Sequential(conv(channels, channels), act(), conv(channels, channels), act(),
                                  conv(channels, channels))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class TinyEncoder(nn.Module):
    """[-1, 1] image -> latents. Stage 0: conv; stage i > 0: stride-2 conv (no bias); each: `blocks[i]` Blocks."""

    def __init__(self, c: TinyConfig):
        super().__init__()
        width = c.encoder_block_out_channels[0]
        layers: list[nn.Module] = []
        for stage, blocks in enumerate(c.num_encoder_blocks):
            layers.append(conv(c.in_channels, width) if stage == 0 else conv(width, width, stride=2, bias=False))
            layers += [Block(width, c.act_fn) for _ in range(blocks)]
        layers.append(conv(width, c.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # TAESD's layers see images in [0, 1]


class TinyDecoder(nn.Module):
    """Latents -> [-1, 1] image. conv + act; per stage: Blocks, then (all but the last) upsample + conv (no bias)."""

    def __init__(self, c: TinyConfig):
        super().__init__()
        width = c.decoder_block_out_channels[0]
        layers: list[nn.Module] = [conv(c.latent_channels, width), ACTIVATIONS[c.act_fn]()]
        for stage, blocks in enumerate(c.num_decoder_blocks):
            layers += [Block(width, c.act_fn) for _ in range(blocks)]
            if stage < len(c.num_decoder_blocks) - 1:
                layers += [nn.Upsample(scale_factor=c.upsampling_scaling_factor, mode=c.upsample_fn),
                           conv(width, width, bias=False)]
        layers.append(conv(width, c.out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = torch.tanh(latents / 3) * 3  # soft clamp to [-3, 3]: out-of-range latents cannot blow up
        return self.layers(latents).mul(2).sub(1)


class TinyAutoencoder(nn.Module):
    """encode: image [-1, 1] -> diffusion latents; decode: latents -> image [-1, 1]. AutoencoderTiny's state dict."""

    def __init__(self, config: TinyConfig | dict | None = None, **config_kwargs: Any):
        super().__init__()
        if isinstance(config, dict):
            config = TinyConfig.from_dict(config)
        self.config = config if config is not None else TinyConfig(**config_kwargs)
        self.encoder = TinyEncoder(self.config)
        self.decoder = TinyDecoder(self.config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def forward(self, x: torch.Tensor | None = None, latents: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(encode(x), decode(latents)), None for a missing input: both halves of a distillation step in one call,
        so a DDP wrapper sees a single forward. (diffusers' forward is a quantized round trip; use encode/decode.)"""
        return (None if x is None else self.encode(x)), (None if latents is None else self.decode(latents))

    # The 8-bit storage convention (TAESD's): latents in [-magnitude, magnitude] <-> [0, 1].
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (where the adaptive GAN weight balances the decoder's losses)."""
        return self.decoder.layers[-1].weight

    def num_parameters(self, part: str | None = None) -> int:
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())

    # -- files --------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> "TinyAutoencoder":
        """Load a diffusers AutoencoderTiny folder (or a pipeline folder whose `vae/` is one)."""
        return load_tiny(path, dtype=dtype)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | str | None = None, *,
                        overwrite: bool = False) -> Path:
        """config.json + diffusion_pytorch_model.safetensors that AutoencoderTiny.from_pretrained loads; atomic.
        An existing folder is replaced only when it is a previous export, or with `overwrite=True` (durable.py)."""
        return save_tiny(self, path, dtype=dtype, overwrite=overwrite)

    @classmethod
    def from_single_files(cls, encoder_path: str | Path, decoder_path: str | Path,
                          config: TinyConfig | dict | None = None) -> "TinyAutoencoder":
        """Load TAESD-layout `*_encoder` / `*_decoder` files (.safetensors, or .pth via weights_only)."""
        return load_single_files(encoder_path, decoder_path, config=config)

    def save_single_files(self, folder: str | Path, name: str = "taesd", dtype: torch.dtype | str | None = None,
                          overwrite: bool = False) -> tuple[Path, Path]:
        """Write `<name>_encoder.safetensors` and `<name>_decoder.safetensors` (TAESD layout); atomic, verified.
        An existing file of those names is replaced only when it is a safetensors file or `overwrite` is given."""
        return save_single_files(self, folder, name=name, dtype=dtype, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------------------------
# The student for a teacher, and the distillation objective (pure functions: the training loop calls these).


def build_student(teacher_config: AutoencoderConfig, width: int = 64,
                  encoder_blocks: int = 3, decoder_blocks: int = 3) -> TinyAutoencoder:
    """AutoencoderTiny for `teacher_config`: its channels and latent channels, one stage per factor of 2 plus one.

    f8 (the SD/SDXL/SD3/FLUX VAEs): TAESD exactly, num_encoder_blocks (1, 3, 3, 3), num_decoder_blocks (3, 3, 3, 1).
    f4 -> 3 stages (1, 3, 3) / (3, 3, 1); f16 -> 5 stages (1, 3, 3, 3, 3) / (3, 3, 3, 3, 1); f1 -> one stage.
    """
    if teacher_config.latents_mean is not None or teacher_config.latents_std is not None:
        warnings.warn("the teacher's config has latents_mean/latents_std: the student learns the latents "
                      "(z - shift_factor) * scaling_factor, not the per-channel normalization some pipelines apply "
                      "with them", stacklevel=2)
    stages = int(math.log2(teacher_config.downsampling_factor)) + 1
    return TinyAutoencoder(TinyConfig(
        in_channels=teacher_config.in_channels, out_channels=teacher_config.out_channels,
        latent_channels=teacher_config.latent_channels,
        encoder_block_out_channels=(width,) * stages, decoder_block_out_channels=(width,) * stages,
        num_encoder_blocks=(1,) + (encoder_blocks,) * (stages - 1),
        num_decoder_blocks=(decoder_blocks,) * (stages - 1) + (1,),
        scaling_factor=1.0, shift_factor=0.0,  # identity in pipelines: see the module docstring
    ))


class DistillationTargets(NamedTuple):
    latents: torch.Tensor  # the teacher's diffusion latents of x: (z - shift) * scaling, fp32
    decoded: torch.Tensor  # the teacher's decode of the same z, clamped to [-1, 1], fp32


@torch.no_grad()
def distillation_targets(teacher: KLAutoencoder, x: torch.Tensor, generator: torch.Generator | None = None,
                         sample: bool = True) -> DistillationTargets:
    """What the student learns from, for a batch of images x in [-1, 1]: (diffusion latents, teacher's decode).

    z is a posterior sample (its mean with sample=False). The decode is clamped to the image range: that is what
    any viewer shows, and the student's capacity is not spent on overshoot.
    """
    posterior = teacher.encode(x)
    z = posterior.sample(generator) if sample else posterior.mode()
    decoded = teacher.decode(z).float().clamp(-1, 1)
    return DistillationTargets(teacher.to_diffusion_latents(z).float(), decoded)


def distillation_loss(student: nn.Module, targets: DistillationTargets, x: torch.Tensor, pixel_weight: float = 1.0,
                      perceptual: nn.Module | None = None, perceptual_weight: float = 0.0, latent_weight: float = 1.0,
                      pixel: str = "l1") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoder: pixel (+ LPIPS) of student.decode(teacher latents) vs targets.decoded; encoder: latent MSE.

    loss = pixel_weight * pixel_loss + perceptual_weight * LPIPS + latent_weight * MSE(student.encode(x), latents)
    `student` is called once, `student(x, latents)`, so it may be a DDP / Accelerate wrapper. A half whose weights
    are all 0 is not run (decoder-only or encoder-only distillation; under DDP freeze the idle half or set
    find_unused_parameters). Logs are detached fp32 scalars; nothing here syncs with the host.
    """
    loss, logs, _ = distillation_terms(student, targets, x, pixel_weight, perceptual, perceptual_weight,
                                       latent_weight, pixel)
    return loss, logs


def distillation_terms(student: nn.Module, targets: DistillationTargets, x: torch.Tensor, pixel_weight: float = 1.0,
                       perceptual: nn.Module | None = None, perceptual_weight: float = 0.0, latent_weight: float = 1.0,
                       pixel: str = "l1") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """`distillation_loss` and the student's decode of the teacher's latents (fp32, with its graph; None when the
    decoder did not run), for a term on that decode (the adversarial one)."""
    run_decoder = pixel_weight > 0 or (perceptual is not None and perceptual_weight > 0)
    encoded, decoded = student(x if latent_weight > 0 else None, targets.latents if run_decoder else None)
    loss = torch.zeros((), device=x.device)
    logs: dict[str, torch.Tensor] = {}
    if decoded is not None:
        decoded = decoded.float()
        pixel_term = pixel_loss(decoded, targets.decoded, kind=pixel)
        loss = loss + pixel_weight * pixel_term
        logs["pixel"] = pixel_term.detach()
        if perceptual is not None and perceptual_weight > 0:
            lpips_term = perceptual(decoded, targets.decoded)
            loss = loss + perceptual_weight * lpips_term
            logs["perceptual"] = lpips_term.detach()
    if encoded is not None:
        latent_term = F.mse_loss(encoded.float(), targets.latents)
        loss = loss + latent_weight * latent_term
        logs["latent"] = latent_term.detach()
    logs["loss"] = loss.detach()
    return loss, logs, decoded


# --------------------------------------------------------------------------------------------------------------------
# Files: the diffusers folder, and TAESD's two single files.


def load_state(model: TinyAutoencoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, after the file's names, shapes and dtypes were checked (never a partial load)."""
    check_fits(state, model.state_dict(), source)
    check_floating(state, source)
    warn_nonfinite(state, source)
    model.load_state_dict(state, strict=True)


def read_tiny_config(folder: Path) -> TinyConfig:
    data = read_config(folder, class_name="AutoencoderTiny")
    try:
        return TinyConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{folder / CONFIG_NAME}: {err}") from err


def load_tiny(path: str | Path, dtype: torch.dtype | None = None) -> TinyAutoencoder:
    path = Path(path).expanduser()
    if path.is_file():
        raise WeightsError(f"{path} is a file: load TAESD single files with TinyAutoencoder.from_single_files")
    folder = model_folder(path)
    config = read_tiny_config(folder)
    candidates = [folder / name for name in (WEIGHTS_NAME, "diffusion_pytorch_model.bin")]  # .bin: pickle, weights_only
    weights = next((c for c in candidates if c.is_file()), None)
    if weights is None:
        raise WeightsError(f"{folder} has {CONFIG_NAME} but no weights file ({WEIGHTS_NAME})")
    with torch.device("meta"):  # the config's shapes, nothing allocated: a file that cannot fit costs no memory
        expected = TinyAutoencoder(config).state_dict()
    if weights.suffix == ".safetensors":
        check_fits(read_state_dict(weights, meta=True), expected, str(weights))
    # a pickle cannot be read in part: bound what it may unpack to by the config (fp64 at most, plus the pickle)
    state = read_state_dict(weights, max_bytes=8 * config.num_parameters() + (1 << 20))
    model = TinyAutoencoder(config)
    load_state(model, state, str(weights))
    return (model.to(dtype) if dtype is not None else model).eval()


def _export_state(model: nn.Module, dtype: torch.dtype | str | None, path: Path) -> dict[str, torch.Tensor]:
    """The weights to write (cast to `dtype`, on CPU); NaN/inf weights are refused before anything is written."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    bad = nonfinite_keys(state)
    if bad:
        raise WeightsError(f"refusing to export {path}: NaN/inf values in {len(bad)} tensors "
                           f"({', '.join(list(bad)[:5])}); nothing was written")
    return state


def save_tiny(model: TinyAutoencoder, path: str | Path, dtype: torch.dtype | str | None = None, *,
              overwrite: bool = False) -> Path:
    state = _export_state(model, dtype, Path(path))

    def write(folder: Path) -> None:
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_diffusers_dict(), indent=2) + "\n")

    def check(folder: Path) -> None:  # before the swap: a bad export never replaces a good one
        _verify_export(load_file(folder / WEIGHTS_NAME), state, folder)
        if read_tiny_config(folder) != model.config:
            raise WeightsError(f"export check failed: {folder / CONFIG_NAME} does not read back as the config")

    return atomic_write_dir(path, write, check_fn=check, overwrite=overwrite)


# TAESD's files hold the halves' nn.Sequential state dicts. Its encoder Sequential is diffusers' `encoder.layers`;
# its decoder Sequential starts with the input clamp (a layer there, a line of forward here), so every decoder
# index is one higher than diffusers' (the rule of diffusers' scripts/convert_tiny_autoencoder_to_diffusers.py).
_DECODER_OFFSET = 1


def to_single_file_state_dicts(state: dict[str, torch.Tensor]
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """diffusers AutoencoderTiny keys -> (TAESD encoder state, TAESD decoder state)."""
    encoder, decoder = {}, {}
    for key, value in state.items():
        match = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if match is None:
            raise WeightsError(f"key {key!r} is not an AutoencoderTiny key (encoder.layers.N... / decoder.layers.N...)")
        if match[1] == "encoder":
            encoder[f"{match[2]}.{match[3]}"] = value
        else:
            decoder[f"{int(match[2]) + _DECODER_OFFSET}.{match[3]}"] = value
    return encoder, decoder


def from_single_file_state_dicts(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor],
                                 source: str = "the single files") -> dict[str, torch.Tensor]:
    """(TAESD encoder state, TAESD decoder state) -> diffusers AutoencoderTiny keys."""
    state = {}
    for half, part, offset in (("encoder", encoder, 0), ("decoder", decoder, _DECODER_OFFSET)):
        for key, value in part.items():
            match = re.fullmatch(r"(\d+)\.(.+)", key)
            if match is None or int(match[1]) < offset:
                raise WeightsError(f"{source}: {half} key {key!r} is not a TAESD {half} key (N.weight, N.conv.K.weight"
                                   f"{', N >= 1' if offset else ''})")
            state[f"{half}.layers.{int(match[1]) - offset}.{match[2]}"] = value
    return state


def infer_tiny_config(state: dict[str, torch.Tensor], **overrides: Any) -> TinyConfig:
    """Read the architecture off AutoencoderTiny keys: stages are delimited by the bias-free convs.

    act_fn, upsample_fn and upsampling_scaling_factor leave no trace in the weights (the defaults are TAESD's:
    relu, nearest, 2); pass them as overrides when they differ.
    """
    def layers(half: str) -> list[tuple[int, str]]:
        """(index, 'conv' | 'conv_nobias' | 'block') for each layer of the half that holds weights, in order."""
        found: dict[int, str] = {}
        for key in state:
            match = re.fullmatch(rf"{half}\.layers\.(\d+)\.(.+)", key)
            if match:
                kind = "block" if match[2].startswith("conv.") else "conv"
                if kind == "conv" and f"{half}.layers.{match[1]}.bias" not in state:
                    kind = "conv_nobias"
                found[int(match[1])] = kind
        if not found:
            raise WeightsError(f"cannot infer the architecture: no {half}.layers.N keys")
        return sorted(found.items())

    def stage_blocks(kinds: list[str]) -> list[int]:
        counts = [0]
        for kind in kinds:
            if kind == "conv_nobias":
                counts.append(0)
            elif kind == "block":
                counts[-1] += 1
        return counts

    enc, dec = layers("encoder"), layers("decoder")
    first_enc, last_enc = state[f"encoder.layers.{enc[0][0]}.weight"], state[f"encoder.layers.{enc[-1][0]}.weight"]
    first_dec, last_dec = state[f"decoder.layers.{dec[0][0]}.weight"], state[f"decoder.layers.{dec[-1][0]}.weight"]
    enc_blocks = stage_blocks([kind for _, kind in enc[1:-1]])
    dec_blocks = stage_blocks([kind for _, kind in dec[1:-1]])
    if last_enc.shape[0] != first_dec.shape[1]:
        raise WeightsError(f"the encoder outputs {last_enc.shape[0]} latent channels but the decoder takes "
                           f"{first_dec.shape[1]}: these halves do not belong together")
    values: dict[str, Any] = dict(
        in_channels=first_enc.shape[1], out_channels=last_dec.shape[0], latent_channels=last_enc.shape[0],
        encoder_block_out_channels=(first_enc.shape[0],) * len(enc_blocks), num_encoder_blocks=tuple(enc_blocks),
        decoder_block_out_channels=(first_dec.shape[0],) * len(dec_blocks), num_decoder_blocks=tuple(dec_blocks),
    )
    values.update(overrides)
    return TinyConfig(**values)


def load_single_files(encoder_path: str | Path, decoder_path: str | Path,
                      config: TinyConfig | dict | None = None) -> TinyAutoencoder:
    """A TinyAutoencoder from TAESD's two files; the architecture is inferred from the keys unless `config` is given."""
    source = f"{encoder_path} + {decoder_path}"
    state = from_single_file_state_dicts(read_state_dict(encoder_path), read_state_dict(decoder_path), source)
    if isinstance(config, dict):
        config = TinyConfig.from_dict(config)
    model = TinyAutoencoder(config if config is not None else infer_tiny_config(state))
    load_state(model, state, source)
    return model.eval()


def save_single_files(model: TinyAutoencoder, folder: str | Path, name: str = "taesd",
                      dtype: torch.dtype | str | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    folder = Path(folder)
    for half in ("encoder", "decoder"):  # both checked before either is written
        check_replaceable_file(folder / f"{name}_{half}.safetensors", overwrite)
    encoder, decoder = to_single_file_state_dicts(_export_state(model, dtype, folder))
    paths = []
    for half, state in (("encoder", encoder), ("decoder", decoder)):
        path = folder / f"{name}_{half}.safetensors"
        atomic_write(path, lambda tmp, state=state: save_file(state, tmp, metadata={"format": "pt"}))
        _verify_export(load_file(path), state, path)
        paths.append(path)
    return paths[0], paths[1]
