"""Checkpoint key names: original-LDM (CompVis) <-> diffusers, legacy diffusers, a full SD checkpoint's VAE keys,
and the architecture read off the keys of a checkpoint that came without a config.

Pure functions of state dicts (they work on meta tensors too, so a file's header is checked before a weight is read).
Below formats.py, which reads and writes the files and re-exports every name here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from kl_autoencoder.weights_error import WeightsError


def _ldm_level_map(state: dict[str, torch.Tensor]) -> int:
    """Number of resolution levels in an LDM state dict (decoder `up.N` are numbered from the lowest resolution)."""
    levels = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    if not levels:
        raise WeightsError("no 'encoder.down.N.' keys: this is not an LDM autoencoder checkpoint")
    return max(levels) + 1


_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_LDM_TO_DIFFUSERS = {"nin_shortcut": "conv_shortcut"}


def _ldm_key_to_diffusers(key: str, levels: int) -> str:
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid\.block_(\d)\.(.*)", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"),
        (r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)",
         lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS.get(m[2], m[2])}.{m[3]}"),
        (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
    ]
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            key = build(match)
            break
    for old, new in _RESNET_LDM_TO_DIFFUSERS.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LDM keys to diffusers keys; attention 1x1 conv weights become linear weights."""
    levels = _ldm_level_map(state)
    out = {}
    for key, value in state.items():
        new_key = _ldm_key_to_diffusers(key, levels)
        if ".attentions.0." in new_key and new_key.endswith("weight") and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new_key] = value
    return out


def diffusers_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `ldm_to_diffusers`: CompVis names, attention as 1x1 conv weights (ComfyUI / A1111 layout)."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    attn = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
         lambda m: f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
    ]
    out = {}
    for key, value in state.items():
        new_key = key
        for pattern, build in rules:
            match = re.fullmatch(pattern, key)
            if match:
                new_key = build(match)
                break
        new_key = new_key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in new_key and new_key.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[new_key] = value.contiguous()
    return out


# Older diffusers releases (< 0.14) named the attention projections differently.
_LEGACY_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", key)
        out[f"{match[1]}{_LEGACY_DIFFUSERS_ATTN[match[2]]}.{match[3]}" if match else key] = value
    return out


def select_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the autoencoder's keys: a full SD checkpoint nests them under `first_stage_model.`."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # LDM autoencoder training checkpoints also carry the LPIPS and discriminator weights under `loss.`.
    keep = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout (diffusers, legacy diffusers, LDM, full SD checkpoint) -> diffusers keys."""
    state = select_vae_keys(state)
    if not state:
        raise WeightsError("no autoencoder weights found (expected keys starting with encoder. / decoder.)")
    if any(k.startswith("encoder.down.") for k in state):
        return ldm_to_diffusers(state)
    return _rename_legacy_diffusers(state)


def infer_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture fields off a diffusers-keyed state dict (for single files that come without a config).

    `scaling_factor` / `shift_factor` and the group count leave no trace in the weights: the defaults apply (SD 1.x's
    0.18215, with a warning; a preset, presets.py, gives SDXL's, SD3's or FLUX's), and the group count is 32, what
    every released LDM/SD/FLUX VAE uses, where it divides the channels.
    """
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise WeightsError(f"cannot infer the architecture: key {key!r} is missing")
        return state[key].shape

    def count(pattern: str) -> int:
        found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
        if not found:
            raise WeightsError(f"cannot infer the architecture: no key matches {pattern!r}")
        return 1 + max(found)

    levels = count(r"encoder\.down_blocks\.(\d+)\.")
    block_out = [int(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]) for i in range(levels)]
    return dict(
        in_channels=int(shape("encoder.conv_in.weight")[1]),
        out_channels=int(shape("decoder.conv_out.weight")[0]),
        block_out_channels=block_out,
        layers_per_block=count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=int(shape("decoder.conv_in.weight")[1]),
        mid_block_add_attention=any(".mid_block.attentions." in k for k in state),
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        norm_num_groups=32 if all(c % 32 == 0 for c in block_out) else _largest_common_group(block_out),
    )


def _largest_common_group(channels: list[int]) -> int:
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))
