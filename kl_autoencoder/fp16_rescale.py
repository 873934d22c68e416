"""Function-preserving rescales of a KL VAE: shrink the activations that overflow fp16 without changing what the fp32
model computes.

A *unit* is a set of activations that can all be multiplied by one factor f > 0 while every activation outside it
stays exactly as it is, by changing parameters only:
  - writers, the layers whose outputs make up the unit: weight and bias x f;
  - readers, the layers that read the unit directly (not through a GroupNorm): weight x 1 / f, bias kept, so what
    they write is unchanged.
GroupNorm is invariant to its input's scale (up to its eps: a relative change of about eps / (f^2 variance), 1e-14
for the activations worth shrinking), zero padding and nearest upsampling commute with a factor, and a residual
addition adds two tensors of the same unit. The units of a KL VAE (diffusers' AutoencoderKL layout):
  - each residual-stream segment, from the layer that starts it (conv_in, a down/upsampler's conv, the first ResNet
    block's 1x1 conv_shortcut where the width changes) through every block adding into it: writers are the starting
    layer and every residual branch's last layer (ResNet conv2, attention to_out.0); readers are the layers that end
    it (the next down/upsampler's conv, or the next conv_shortcut);
  - each ResNet block's conv1 (read only by norm2);
  - each attention's values: writer to_v, reader to_out.0 (attention averages values: linear in them);
  - post_quant_conv, read by the decoder's conv_in.
A layer can write one unit and read another (an upsampler's conv reads one segment and starts the next): its weight
gets f_new / f_old, its bias f_new. What no unit covers (a GroupNorm's or activation's output, queries / keys, the
final conv_out of either half) no rescale can shrink without changing the function; `uncovered` names it.

    units = rescale_units(model)
    with module_peaks(model) as peaks: model.decode(model.encode(x).mode())   # kl_autoencoder.fp16
    factors = shrink_factors(units, peaks, limit=16384, target=2048); apply_factors_(model, units, factors)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kl_autoencoder.fp16 import part_of


@dataclass
class Unit:
    """One rescalable set of activations: module names (as `model.named_modules()` gives them)."""

    name: str
    writers: list[str]  # weight and bias x f
    readers: list[str] = field(default_factory=list)  # weight x 1 / f
    members: list[str] = field(default_factory=list)  # modules whose output is in the unit (scales by f)


class _Walk:
    """Builds the units in the order the forward pass meets them; `segment` is the residual stream being written."""

    def __init__(self) -> None:
        self.units: list[Unit] = []
        self.segment: Unit | None = None

    def begin(self, writer: str, *members: str) -> None:
        self.segment = Unit(f"stream from {writer}", [writer], [], [writer, *members])
        self.units.append(self.segment)

    def resnet(self, name: str, block: nn.Module) -> None:
        self.units.append(Unit(f"{name}.conv1", [f"{name}.conv1"], [], [f"{name}.conv1"]))
        if block.conv_shortcut is not None:  # the block's input ends here; its output starts a new segment
            self.segment.readers.append(f"{name}.conv_shortcut")
            self.begin(f"{name}.conv_shortcut")
        self.segment.writers.append(f"{name}.conv2")
        self.segment.members += [f"{name}.conv2", name]

    def attention(self, name: str) -> None:
        self.units.append(Unit(f"{name}.to_v", [f"{name}.to_v"], [f"{name}.to_out.0"], [f"{name}.to_v"]))
        self.segment.writers.append(f"{name}.to_out.0")
        self.segment.members += [f"{name}.to_out.0", name]

    def sampler(self, name: str) -> None:
        self.segment.readers.append(f"{name}.conv")
        self.begin(f"{name}.conv", name)

    def mid(self, name: str, block: nn.Module) -> None:
        self.resnet(f"{name}.resnets.0", block.resnets[0])
        if block.attentions is not None:
            self.attention(f"{name}.attentions.0")
        self.resnet(f"{name}.resnets.1", block.resnets[1])
        self.segment.members.append(name)


def rescale_units(model: nn.Module) -> list[Unit]:
    """Every unit of a `KLAutoencoder` (diffusers' layout), encoder first, in forward order."""
    walk = _Walk()
    walk.begin("encoder.conv_in")
    for i, block in enumerate(model.encoder.down_blocks):
        for j, resnet in enumerate(block.resnets):
            walk.resnet(f"encoder.down_blocks.{i}.resnets.{j}", resnet)
        if block.downsamplers is not None:
            walk.sampler(f"encoder.down_blocks.{i}.downsamplers.0")
    walk.mid("encoder.mid_block", model.encoder.mid_block)
    if model.post_quant_conv is not None:
        walk.units.append(Unit("post_quant_conv", ["post_quant_conv"], ["decoder.conv_in"], ["post_quant_conv"]))
    walk.begin("decoder.conv_in")
    walk.mid("decoder.mid_block", model.decoder.mid_block)
    for i, block in enumerate(model.decoder.up_blocks):
        for j, resnet in enumerate(block.resnets):
            walk.resnet(f"decoder.up_blocks.{i}.resnets.{j}", resnet)
        if block.upsamplers is not None:
            walk.sampler(f"decoder.up_blocks.{i}.upsamplers.0")
    return walk.units


def unit_peaks(units: list[Unit], peaks: dict[str, float]) -> list[float]:
    """Each unit's largest |activation| among `peaks` (0 where none of its members ran)."""
    return [max((peaks.get(m, 0.0) for m in u.members), default=0.0) for u in units]


def shrink_factors(units: list[Unit], peaks: dict[str, float], limit: float, target: float | None = None
                   ) -> list[float]:
    """The factor bringing each unit whose peak passed `limit` down to `target` (default: the limit itself); 1.0
    for the others (nothing grows)."""
    target = limit if target is None else target
    return [target / p if p > limit else 1.0 for p in unit_peaks(units, peaks)]


def layer_scales(units: list[Unit], factors: list[float]) -> dict[str, tuple[float, float]]:
    """Module name -> (weight factor, bias factor) that the units' `factors` compose to."""
    scales: dict[str, tuple[float, float]] = {}
    for unit, f in zip(units, factors):
        if f == 1.0:
            continue
        for name in unit.writers:
            w, b = scales.get(name, (1.0, 1.0))
            scales[name] = (w * f, b * f)
        for name in unit.readers:
            w, b = scales.get(name, (1.0, 1.0))
            scales[name] = (w / f, b)
    return scales


@torch.no_grad()
def apply_factors_(model: nn.Module, units: list[Unit], factors: list[float],
                   optimizer: torch.optim.Optimizer | None = None) -> int:
    """Rescale `model` in place by `factors` (one per unit); returns how many layers changed. An AdamW's moments
    of the changed parameters are rescaled with them (a parameter x g has gradients / g)."""
    modules = dict(model.named_modules())
    scales = layer_scales(units, factors)
    for name, (w, b) in scales.items():
        layer = modules[name]
        for param, g in ((layer.weight, w), (layer.bias, b)):
            if param is None or g == 1.0:
                continue
            param.mul_(g)
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            if "exp_avg" in state:
                state["exp_avg"].div_(g)
                state["exp_avg_sq"].div_(g * g)
    return len(scales)


def units_of(units: list[Unit], part: str) -> list[Unit]:
    """The units inside one half ("encoder" / "decoder", post_quant_conv with the decoder)."""
    return [u for u in units if all(part_of(n) == part for n in u.writers)]


def uncovered(units: list[Unit], names: list[str]) -> list[str]:
    """Which of `names` (modules) no unit rescales: their outputs stay what they are."""
    members = {m for u in units for m in u.members}
    return [n for n in names if n not in members]
