"""The building blocks of the KL autoencoder, shared by its encoder and decoder: ResNet block, self-attention,
down/up-sampling, the down/up/mid blocks, and the encoder and decoder built from them, as diffusers keeps them in
`models/autoencoders/vae.py` below its per-model files. model.py ties them into `KLAutoencoder`.

Module names are diffusers' (`norm1`, `to_q`, `down_blocks.0.resnets.1`, ...), so the state dict has exactly the keys
of diffusers' `AutoencoderKL`. Every norm is GroupNorm with eps 1e-6, as in LDM and diffusers' VAE.

The GroupNorm+SiLU pairs are the plain modules, called as diffusers calls them, until `KLAutoencoder.set_lean_norm_act`
turns the lean pair on (norm_act.py): each block holds the choice in `lean_from_bytes` and branches once on it, so
the plain path runs no check per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kl_autoencoder.autoencoder_config import ACTIVATIONS, AutoencoderConfig
from kl_autoencoder.norm_act import norm_act

NORM_EPS = 1e-6


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu"):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = ACTIVATIONS[act_fn]()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.lean_from_bytes: int | None = None  # None: the plain modules; set by KLAutoencoder.set_lean_norm_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = self.lean_from_bytes
        if lean is None:  # the plain path: diffusers' ResnetBlock2D, module calls only
            h = self.conv1(self.act(self.norm1(x)))
            h = self.conv2(self.act(self.norm2(h)))
        else:
            h = self.conv1(norm_act(self.norm1, self.act, x, lean))
            h = self.conv2(norm_act(self.norm2, self.act, h, lean))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection.

    Linear q/k/v/out projections named as diffusers names them (`to_q`, ..., `to_out.0`); the attention itself is
    PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels where the device has them).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # a channels-last view, no copy
        # `out + x` (not `x + out`) keeps the result channels-last like diffusers, so later layers match it bitwise.
        return out + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv. LDM pads only right and bottom, so the output grid aligns with the input's top-left."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no transposed conv, so no checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None


class MidBlock(nn.Module):
    """ResNet block, optional self-attention, ResNet block: the only place the VAE sees the whole image at once."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)]) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _norm_out(half: "Encoder | Decoder", h: torch.Tensor) -> torch.Tensor:
    """The closing GroupNorm+SiLU of the encoder or decoder, plain or lean as `half.lean_from_bytes` says."""
    if half.lean_from_bytes is None:
        return half.conv_act(half.conv_norm_out(h))
    return norm_act(half.conv_norm_out, half.conv_act, h, half.lean_from_bytes)


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run one block, recomputing its activations in backward when gradient checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> posterior moments [B, 2 * latent, H / f, W / f] (mean and log-variance stacked)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups, act = config.block_out_channels, config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, act, downsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, act, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.lean_from_bytes: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = _run(resnet, h, ckpt)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
        h = _run(self.mid_block, h, ckpt)
        return self.conv_out(_norm_out(self, h))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, out, h * f, w * f]; the mirror of the encoder with one extra ResNet per level."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups, act = tuple(reversed(config.block_out_channels)), config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, act, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, act, upsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.lean_from_bytes: int | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = _run(self.mid_block, self.conv_in(z), ckpt)
        for block in self.up_blocks:
            for resnet in block.resnets:
                h = _run(resnet, h, ckpt)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h)
        return self.conv_out(_norm_out(self, h))
