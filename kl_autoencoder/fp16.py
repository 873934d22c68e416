"""Is a VAE safe in fp16? Activation peaks against fp16's largest finite value, and an fp16 encode/decode.

    from kl_autoencoder.fp16 import activation_peaks, fp16_check
    activation_peaks(vae, images)   # {"encoder": 6.1, "decoder": 131072.0, "decoder_module": "decoder.up_blocks...", ...}
    fp16_check(vae, images)         # {"decode_finite": False, "decode_psnr": nan, "latent_psnr": 61.2, ...}

fp16 overflows above 65504 (`FP16_MAX`): one activation past it becomes inf, the next GroupNorm turns it into NaN, and
the image comes out black or NaN: SDXL's VAE in fp16 is the well-known case. `activation_peaks` runs the fp32 model
with forward hooks on every submodule (every conv, linear, norm and activation, plus each ResNet / attention block,
whose output is the residual stream after its addition) and keeps the largest |output| per module.

`fp16_check` compares an fp16 encode (posterior mean) and decode with the fp32 ones. On CUDA it runs the model in
real fp16. On CPU it emulates fp16 by default (`emulated_fp16`): weights and buffers rounded to fp16, and every
submodule's inputs and outputs rounded to fp16 (and back to fp32) by hooks, so a value past 65504 becomes inf exactly
where an fp16 kernel would write it, and every layer's output carries fp16's rounding. The arithmetic inside a layer
stays fp32, as fp16 kernels accumulate in fp32 anyway. Why emulate: this CPU build of torch does run fp16
convolutions (`native=True`), but about 13x slower than fp32; tests/test_fp16.py checks the two agree.

`fp16_rescale.py` shrinks what overflows without changing the fp32 function; `fp16_fix.py` is the recipe around it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max


def part_of(name: str) -> str | None:
    """Which half of the VAE a submodule belongs to (quant_conv goes with the encoder, post_quant_conv the decoder)."""
    if name.startswith(("encoder.", "quant_conv")) or name == "encoder":
        return "encoder"
    if name.startswith(("decoder.", "post_quant_conv")) or name == "decoder":
        return "decoder"
    return None


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


@contextmanager
def module_peaks(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the largest |output| of each named submodule (a device scalar, no host sync; NaN kept)."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            for t in _tensors(output):
                if t.numel():
                    peak = t.detach().abs().amax().float()
                    old = peaks.get(name)
                    peaks[name] = peak if old is None else torch.maximum(old, peak)  # maximum keeps NaN
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        yield peaks
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recorded_peaks(model: nn.Module) -> Iterator[dict[str, float]]:
    """`module_peaks` as host floats, filled in when the block ends (one sync per module, then)."""
    floats: dict[str, float] = {}
    with module_peaks(model) as found:
        try:
            yield floats
        finally:
            floats.update({name: peak.item() for name, peak in found.items()})


@torch.no_grad()
def activation_peaks(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Largest |activation| of the fp32 encode (posterior mean) and decode of `images` ([-1, 1], NCHW), per half.

    Returns encoder / decoder (the peaks), encoder_module / decoder_module (where), fp16_max and the headroom of each
    half (fp16_max / peak: below 1 means an fp16 run overflows there).
    """
    with recorded_peaks(model) as peaks:
        latents = model.encode(images).mode()
        model.decode(latents)
    result: dict[str, Any] = {"fp16_max": FP16_MAX}
    for part in ("encoder", "decoder"):
        mine = {k: v for k, v in peaks.items() if part_of(k) == part}
        name = max(mine, key=lambda k: (mine[k] != mine[k], mine[k])) if mine else None
        peak = mine[name] if name is not None else 0.0
        result[part], result[f"{part}_module"] = peak, name
        result[f"{part}_headroom"] = FP16_MAX / peak if peak > 0 else float("inf")
    return result


def _round_fp16(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.float16).to(torch.float32)
    if isinstance(value, tuple):
        return tuple(_round_fp16(v) for v in value)
    if isinstance(value, list):
        return [_round_fp16(v) for v in value]
    return value


@contextmanager
def emulated_fp16(model: nn.Module) -> Iterator[nn.Module]:
    """`model` (fp32) behaving as an fp16 model: weights/buffers rounded to fp16, every submodule's inputs and outputs
    rounded to fp16 and back. Overflow (> 65504) becomes inf as in fp16. The weights are restored on exit."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    handles = []
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.to(torch.float16).to(torch.float32))
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, args: _round_fp16(args)))
        handles.append(module.register_forward_hook(lambda m, args, out: _round_fp16(out)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(saved)


def psnr_db(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """10 log10(range^2 / MSE) over all elements; nan when either is non-finite, inf when identical."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    mse = (a - b).square().mean().item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range ** 2 / mse)).item()


@torch.no_grad()
def encode_decode(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior mean, decode of it), both returned as fp32."""
    latents = model.encode(images).mode()
    return latents.float(), model.decode(latents.to(images.dtype)).float()


def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of latents against reference latents, the reference's peak-to-peak range as the data range (the
    latents' analogue of an image's [-1, 1])."""
    return psnr_db(latents, reference, float(reference.max() - reference.min()))


def image_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of decodes clamped to [-1, 1] (data range 2: the same dB as [0, 1] images); nan if non-finite."""
    if not torch.isfinite(images).all():
        return float("nan")
    return psnr_db(images.clamp(-1, 1), reference.clamp(-1, 1), 2.0)


@torch.no_grad()
def fp16_check(model: nn.Module, images: torch.Tensor, native: bool | None = None,
               reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """An fp16 encode (posterior mean) and decode of `images`, against the fp32 ones (or `reference`: (latents,
    decode) of another model, e.g. the original a fixed model must match).

    native: run real fp16 weights (default: on CUDA) or emulate (default on CPU; see the module docstring).
    Returns encode_finite, decode_finite, latent_psnr, decode_psnr (nan when non-finite) and how fp16 was run.
    """
    model_device = next(model.parameters()).device
    images = images.to(model_device, torch.float32)
    native = model_device.type == "cuda" if native is None else native
    ref_latents, ref_decode = reference if reference is not None else encode_decode(model, images)
    if native:
        half = copy.deepcopy(model).half()
        latents, decode = encode_decode(half, images.half())
    else:
        with emulated_fp16(model):
            latents, decode = encode_decode(model, images)
    return {"fp16": "native" if native else "emulated", "encode_finite": bool(torch.isfinite(latents).all()),
            "decode_finite": bool(torch.isfinite(decode).all()),
            "latent_psnr": latent_psnr(latents, ref_latents.to(latents.device)),
            "decode_psnr": image_psnr(decode, ref_decode.to(decode.device))}


FP16_CHECK_IMAGES = 4  # evaluation checks fp16 on this many images: enough to see an overflow, cheap when emulated


def fp16_entry(model: nn.Module, images: torch.Tensor, batch_size: int = 4,
               max_images: int = FP16_CHECK_IMAGES) -> dict[str, Any]:
    """evaluate's "fp16" entry for a KL VAE: `activation_peaks` and `fp16_check` on the first `max_images` images
    ([0, 1] or [-1, 1]: evaluation passes [-1, 1]), plus `safe` (both halves' peaks inside FP16_MAX and the fp16
    encode and decode finite)."""
    device = next(model.parameters()).device
    x = images[:max_images].to(device, torch.float32)
    peaks: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size]
        found = activation_peaks(model, batch)
        for part in ("encoder", "decoder"):
            if part not in peaks or not found[part] <= peaks[part]:
                peaks[part], peaks[f"{part}_module"] = found[part], found[f"{part}_module"]
        checks.append(fp16_check(model, batch))
    entry: dict[str, Any] = {"fp16_max": FP16_MAX, "images": int(x.shape[0]), "fp16": checks[0]["fp16"], **peaks}
    entry["encode_finite"] = all(c["encode_finite"] for c in checks)
    entry["decode_finite"] = all(c["decode_finite"] for c in checks)
    for key in ("latent_psnr", "decode_psnr"):  # the worst batch speaks for the model
        entry[key] = min((c[key] for c in checks), key=lambda v: (v == v, v))
    entry["safe"] = bool(entry["encoder"] <= FP16_MAX and entry["decoder"] <= FP16_MAX and entry["encode_finite"]
                         and entry["decode_finite"])
    return entry


def report_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """report.md's "fp16" table from the models' "fp16" entries (tiny autoencoders, entry None, are left out)."""
    rows = [(name, e["fp16"]) for name, e in models.items() if e.get("fp16")]
    if not rows:
        return []

    def db(value: float) -> str:
        return "non-finite" if value != value else ("identical" if value == float("inf") else f"{value:.1f} dB")

    lines = ["## fp16", "", f"Largest |activation| of an fp32 encode / decode against fp16's {FP16_MAX:.0f}, and an "
             "fp16 encode (posterior mean) / decode against the fp32 ones (PSNR; latents: their peak-to-peak range "
             "as the data range).", "",
             "| model | encoder peak | decoder peak | fp16 encode | fp16 decode | fp16 | safe |", "|---|---|---|---|---|---|---|"]
    for name, e in rows:
        lines.append(f"| `{name}` | {e['encoder']:.4g} | {e['decoder']:.4g} | {db(e['latent_psnr'])} | "
                     f"{db(e['decode_psnr'])} | {e['fp16']}, {e['images']} images | {'yes' if e['safe'] else 'NO'} |")
    unsafe = [(name, e) for name, e in rows if not e["safe"]]
    for name, e in unsafe:
        worst = "decoder" if e["decoder"] >= e["encoder"] else "encoder"
        lines += ["", f"> `{name}` overflows fp16 (peak {e[worst]:.4g} at `{e[f'{worst}_module']}`): run it in fp32 "
                  "or bf16, or rescale it with configs/fp16-fix.yaml."]
    return lines + [""]
