"""Weights in and out: diffusers folders, original-LDM (CompVis) single files, hub repos.

Our state dict *is* diffusers' `AutoencoderKL` layout, so a diffusers folder loads with no renaming. LDM checkpoints
(`encoder.down.0.block.0.norm1.weight`, attention as 1x1 convs, decoder levels numbered from the bottom) are mapped by
`ldm_to_diffusers` / `diffusers_to_ldm`. Every write goes to a temporary path first and is renamed into place, and
every export is read back and compared before the function returns.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kl_autoencoder.durable import atomic_write, atomic_write_dir
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded as asked; the message names the path and the problem."""


# --------------------------------------------------------------------------------------------------------------------
# Reading state dicts


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file, or a pickle checkpoint through `torch.load(weights_only=True)` only."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            hint = " It looks like a PyTorch pickle: name it .ckpt or .pt." if _looks_like_pickle(path) else ""
            raise WeightsError(f"{path} is not a valid safetensors file ({err}).{hint}") from err
    if path.suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
            raise WeightsError(
                f"refusing to load {path}: it is not a plain tensor checkpoint loadable with "
                f"torch.load(weights_only=True) ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                "Arbitrary pickles can run code; convert it to safetensors in a trusted environment."
            ) from err
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise WeightsError(f"{path} does not hold a state dict of tensors")
        return data
    raise WeightsError(f"unsupported weights file {path}: expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol marker, or torch's zip container


# --------------------------------------------------------------------------------------------------------------------
# LDM <-> diffusers key names


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


def infer_config(state: dict[str, torch.Tensor], **overrides: Any) -> AutoencoderConfig:
    """Read the architecture off a diffusers-keyed state dict (for single files that come without a config)."""
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise WeightsError(f"cannot infer the architecture: key {key!r} is missing")
        return state[key].shape

    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    block_out = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    latent = shape("decoder.conv_in.weight")[1]
    values: dict[str, Any] = dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=block_out,
        layers_per_block=layers,
        latent_channels=latent,
        mid_block_add_attention=any(".mid_block.attentions." in k for k in state),
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        # The group count leaves no trace in the weights; 32 is what every released LDM/SD/FLUX VAE uses.
        norm_num_groups=32 if all(c % 32 == 0 for c in block_out) else _largest_common_group(block_out),
    )
    # scaling_factor / shift_factor leave no trace either: the defaults are SD 1.x's; pass the right ones as overrides
    # (SDXL 0.13025; SD3 1.5305 / 0.0609; FLUX 0.3611 / 0.1159).
    values.update(overrides)
    return AutoencoderConfig(**values)


def _largest_common_group(channels: tuple[int, ...]) -> int:
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_state_dict_into(model: KLAutoencoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a readable report of missing, unexpected and mis-shaped keys (never a partial load)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = [f"{name} {len(items)}: {head(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        raise WeightsError(f"weights in {source} do not fit the config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def resolve_folder(path: Path) -> Path:
    """A diffusers model folder, or the `vae/` folder of a pipeline folder."""
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "vae" / CONFIG_NAME).is_file():
        return path / "vae"
    raise WeightsError(f"{path} is a folder without {CONFIG_NAME} (nor vae/{CONFIG_NAME}): not a diffusers model folder")


def read_config(folder: Path) -> AutoencoderConfig:
    config_path = folder / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_path} is not valid JSON: {err}") from err
    class_name = data.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise WeightsError(f"{config_path} describes a {class_name}, not an AutoencoderKL")
    try:
        return AutoencoderConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: {err}") from err


def _folder_weights(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder} has {CONFIG_NAME} but no weights file ({WEIGHTS_NAME})")


def download_from_hub(repo_id: str, subfolder: str | None = None) -> Path:
    """Fetch a hub repo's VAE files (config + safetensors) into the local cache; a clear error when offline."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "vae/config.json", "vae/*.safetensors"]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        raise WeightsError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, download the folder elsewhere and pass its local path."
        ) from err
    return local / subfolder if subfolder else local


def load_model(path: str | Path, dtype: torch.dtype | None = None, config: AutoencoderConfig | dict | None = None,
               subfolder: str | None = None) -> KLAutoencoder:
    """Build a KLAutoencoder from a diffusers folder, a pipeline folder, an LDM single file, or a hub repo id."""
    path_str = str(path)
    local = Path(path_str).expanduser()
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        folder = resolve_folder(local)
        model_config = read_config(folder)
        weights_path = _folder_weights(folder)
        state = to_diffusers_state_dict(read_state_dict(weights_path))
    elif local.is_file():
        weights_path = local
        state = to_diffusers_state_dict(read_state_dict(local))
        if config is None and (local.parent / CONFIG_NAME).is_file() and local.name == WEIGHTS_NAME:
            config = read_config(local.parent)
        if config is None:
            config = _embedded_config(local)
        if isinstance(config, dict):
            config = AutoencoderConfig.from_dict(config)
        model_config = config if config is not None else infer_config(state)
    elif _looks_like_repo_id(path_str) and not local.suffix:
        return load_model(download_from_hub(path_str), dtype=dtype, config=config, subfolder=subfolder)
    else:
        raise WeightsError(f"model path not found: {path_str} (expected a diffusers folder, a weights file or a hub repo id)")
    model = KLAutoencoder(model_config)
    load_state_dict_into(model, state, str(weights_path))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _embedded_config(path: Path) -> dict | None:
    """The config our LDM export stores in the safetensors header, if this file has one."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get("kl_autoencoder_config")
    return json.loads(text) if text else None


def _looks_like_repo_id(text: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith((".", "/"))


# --------------------------------------------------------------------------------------------------------------------
# Saving


def _diffusers_config(config: AutoencoderConfig) -> dict[str, Any]:
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:  # diffusers is a dependency, but the file format does not need it at run time
        version = "0.30.0"
    return {"_class_name": "AutoencoderKL", "_diffusers_version": version, **config.to_dict()}


def _export_state(model: KLAutoencoder, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: KLAutoencoder, path: str | Path, format: str = "diffusers",
               dtype: torch.dtype | str | None = None) -> Path:
    """Export atomically, then read the export back and check it holds exactly what was written."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    state = _export_state(model, dtype)
    path = Path(path)
    if format == "diffusers":
        def write(folder: Path) -> None:
            save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
            (folder / CONFIG_NAME).write_text(json.dumps(_diffusers_config(model.config), indent=2) + "\n")

        atomic_write_dir(path, write)
        _verify_export(load_file(path / WEIGHTS_NAME), state, path)
        if read_config(path) != model.config:
            raise WeightsError(f"export check failed: {path / CONFIG_NAME} does not read back as the model's config")
        return path
    if format == "ldm":
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors") if path.suffix else path / "vae.safetensors"
        ldm_state = diffusers_to_ldm(state)
        # The config rides along in the header, so our loader rebuilds the exact model (others ignore it).
        metadata = {"format": "pt", "kl_autoencoder_config": json.dumps(model.config.to_dict())}
        atomic_write(path, lambda tmp: save_file(ldm_state, tmp, metadata=metadata))
        _verify_export(to_diffusers_state_dict(load_file(path)), state, path)
        return path
    raise ValueError(f"unknown export format {format!r}; choose 'diffusers' or 'ldm'")


def _verify_export(read_back: dict[str, torch.Tensor], written: dict[str, torch.Tensor], path: Path) -> None:
    if read_back.keys() != written.keys():
        raise WeightsError(f"export check failed: {path} holds different keys than were written")
    for key, value in written.items():
        if not torch.equal(read_back[key], value):
            raise WeightsError(f"export check failed: {path} key {key} differs from what was written")
