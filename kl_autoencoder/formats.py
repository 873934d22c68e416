"""Weights files in and out: diffusers folders, original-LDM (CompVis) single files, hub repos.

This module knows state dicts, config dicts and files; it builds no model. `KLAutoencoder.from_pretrained` /
`save_pretrained` (model.py) turn what it reads into a model and hand it what to write.

Our state dict *is* diffusers' `AutoencoderKL` layout, so a diffusers folder loads with no renaming. LDM checkpoints
(`encoder.down.0.block.0.norm1.weight`, attention as 1x1 convs, decoder levels numbered from the bottom) are mapped by
`ldm_to_diffusers` / `diffusers_to_ldm` (checkpoint_keys.py, re-exported here). The key maps work on meta tensors
too, so a safetensors file's header (names, shapes, dtypes) is checked against the config before a single weight is
read. Exports are written to a temporary
path, read back and checked there, and only then renamed over the previous export.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kl_autoencoder.checkpoint_keys import (  # noqa: F401  (re-exported: their public home until now)
    diffusers_to_ldm, infer_architecture, ldm_to_diffusers, select_vae_keys, to_diffusers_state_dict,
)
from kl_autoencoder.durable import atomic_write, atomic_write_dir, check_regular_file, check_replaceable_file
from kl_autoencoder.weights_error import WeightsError  # noqa: F401  (re-exported)

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"  # the model card (kl_autoencoder/model_card.py), as diffusers and the hub name it
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHTS_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# safetensors header dtype names -> torch dtypes (for meta tensors; nothing is read).
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def capped_repr(value: Any, limit: int = 120) -> str:
    """`repr(value)` cut to `limit` characters: error messages never print an unbounded value."""
    text = _SHORT_REPR.repr(value)  # stops early inside huge (or alias-expanded) containers, never formats them whole
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 4
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 16
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 200


def _head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------------------------
# Where a model is: a local path or a hub id; a diffusers folder or a pipeline folder's vae/

_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")


def is_hub_id(text: str) -> bool:
    """Spelled as a Hugging Face Hub id: 'name' or 'owner/name' (letters, digits, '.', '-', '_'; no leading '.')."""
    return _HUB_ID.fullmatch(text) is not None and not text.startswith(".")


def is_local_path(text: str) -> bool:
    """The one rule for "a path on this machine, not a hub id": it exists, or it cannot be spelled as a hub id."""
    return os.path.exists(os.path.expanduser(text)) or not is_hub_id(text)


def find_config_json(path: str | Path) -> Path | None:
    """The config.json of a diffusers model folder, else of a pipeline folder's `vae/`; None when neither exists."""
    path = Path(path).expanduser()
    for candidate in (path / CONFIG_NAME, path / "vae" / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def model_folder(path: Path) -> Path:
    """A diffusers model folder, or the `vae/` folder of a pipeline folder."""
    config = find_config_json(path)
    if config is None:
        raise WeightsError(f"{path} is a folder without {CONFIG_NAME} (nor vae/{CONFIG_NAME}): "
                           "not a diffusers model folder")
    return config.parent


# --------------------------------------------------------------------------------------------------------------------
# Reading state dicts


def read_state_dict(path: str | Path, meta: bool = False, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file, or a pickle checkpoint through `torch.load(weights_only=True)` only.

    `meta=True` reads only a safetensors header (names, shapes, dtypes as meta tensors: nothing allocated); a pickle
    can only be read whole, so its real tensors come back either way, after `check_pickle_zip` bounded what it unpacks
    to (`max_bytes`: what the caller's config allows, when it knows one).
    """
    path = Path(path)
    check_regular_file(path, "weights file", WeightsError)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return _safetensors_header(path) if meta else load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise _invalid_safetensors(path, err) from err
    if path.suffix in PICKLE_SUFFIXES:
        check_pickle_zip(path, max_bytes)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise WeightsError(
                f"refusing to load {path}: it is not a plain tensor checkpoint loadable with "
                f"torch.load(weights_only=True) ({type(err).__name__}: {capped_repr(first_line, 300)}). "
                "Arbitrary pickles can run code; convert it to safetensors in a trusted environment."
            ) from err
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise WeightsError(f"{path} does not hold a state dict of tensors")
        return data
    raise WeightsError(f"unsupported weights file {path}: expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")


def check_pickle_zip(path: Path, max_bytes: int | None = None) -> None:
    """Refuse a torch zip checkpoint that would unpack to more than it holds, before anything is unpickled.

    torch writes every entry STORED, so a checkpoint's tensors take about its size on disk; a DEFLATE-compressed
    entry (1 MB on disk -> 1 GiB in memory), sizes beyond the file's own, or more than `max_bytes` in all, are refused.
    Files that are not zip archives (torch's pre-1.6 format) are left to torch.load.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise WeightsError(f"refusing to load {path}: its zip directory is damaged ({err})") from err
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise WeightsError(f"refusing to load {path}: {len(packed)} entr{'y is' if len(packed) == 1 else 'ies are'} "
                           f"compressed ({_head(packed)}); torch writes checkpoints uncompressed, so this file could "
                           "unpack to far more memory than its size")
    total, size = sum(e.file_size for e in entries), path.stat().st_size
    if total > size:
        raise WeightsError(f"refusing to load {path}: its zip directory claims {total:,} bytes in a {size:,}-byte file")
    if max_bytes is not None and total > max_bytes:
        raise WeightsError(f"refusing to load {path}: it unpacks to {total:,} bytes, more than the {max_bytes:,} the "
                           "config's weights can take")


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise WeightsError(f"{path}: tensor {key!r} has dtype {piece.get_dtype()}, which this loader does not read")
            out[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    return out


def _invalid_safetensors(path: Path, err: Exception) -> WeightsError:
    hint = " It looks like a PyTorch pickle: name it .ckpt or .pt." if _looks_like_pickle(path) else ""
    return WeightsError(f"{path} is not a valid safetensors file ({err}).{hint}")


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol marker, or torch's zip container


def embedded_config(path: Path) -> dict | None:
    """The config our LDM export stores in the safetensors header, if this file has one."""
    if path.suffix != ".safetensors":
        return None
    check_regular_file(path, "weights file", WeightsError)
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("kl_autoencoder_config")
    except (SafetensorError, OSError) as err:
        raise _invalid_safetensors(path, err) from err
    if not text:
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise WeightsError(f"{path}: the kl_autoencoder_config in its header is not valid JSON "
                           f"({'nested too deeply' if isinstance(err, RecursionError) else err})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: the kl_autoencoder_config in its header is not a JSON object")
    return data


def read_config(folder: Path, class_name: str = "AutoencoderKL") -> dict[str, Any]:
    """A diffusers `config.json` as a dict, checked to describe a `class_name` (a missing `_class_name` is taken as
    that class)."""
    config_path = Path(folder) / CONFIG_NAME
    check_regular_file(config_path, error=WeightsError)
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_path} is not valid JSON: {err}") from err
    except RecursionError:
        raise WeightsError(f"{config_path} is nested too deeply to be a model config") from None
    except OSError as err:
        raise WeightsError(f"cannot read {config_path}: {err}") from err
    if not isinstance(data, dict):
        raise WeightsError(f"{config_path} must hold a JSON object, got {type(data).__name__}")
    found = data.get("_class_name", class_name)
    if not isinstance(found, str):
        raise WeightsError(f"{config_path}: _class_name must be a string such as {class_name!r}, got "
                           f"{capped_repr(found)}")
    if found != class_name:
        hint = {"AutoencoderKL": "KLAutoencoder.from_pretrained", "AutoencoderTiny": "TinyAutoencoder.from_pretrained"}
        raise WeightsError(f"{config_path} describes a {capped_repr(found)}, not an {class_name}"
                           + (f" (load it with {hint[found]})" if found in hint else ""))
    return data


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


@dataclass
class ModelFiles:
    """What a model reference points at: one weights file and the config found with it (None: infer from shapes)."""

    weights: Path
    config: dict[str, Any] | None
    config_source: str  # where `config` came from, for error messages


def locate_model(path: str | Path, subfolder: str | None = None) -> ModelFiles:
    """Resolve a diffusers folder, a pipeline folder, a single weights file or a hub id ('owner/name') to files."""
    text = str(path)
    local = Path(text).expanduser()
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        folder = model_folder(local)
        return ModelFiles(_folder_weights(folder), read_config(folder), str(folder / CONFIG_NAME))
    if local.is_file():
        if local.name == WEIGHTS_NAME and (local.parent / CONFIG_NAME).is_file():
            return ModelFiles(local, read_config(local.parent), str(local.parent / CONFIG_NAME))
        return ModelFiles(local, embedded_config(local), f"the header of {local}")
    if not is_local_path(text) and "/" in text and not text.endswith(WEIGHTS_SUFFIXES):
        return locate_model(download_from_hub(text), subfolder=subfolder)
    raise WeightsError(f"model path not found: {text} (expected a diffusers folder, a weights file or a hub repo id "
                       "'owner/name')")


# --------------------------------------------------------------------------------------------------------------------
# Checks on what was read: names and shapes against the config, dtypes, finiteness


def check_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the missing, unexpected and mis-shaped keys unless `state` fits `expected` exactly.

    Both may be meta tensors: this runs on a file's header against the config's shapes, before anything is allocated.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{name} {len(items)}: {_head(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        raise WeightsError(f"weights in {source} do not fit the config: " + "; ".join(parts))


def check_floating(state: dict[str, torch.Tensor], source: str) -> None:
    """Weights are floating point: a bool/int/uint8 tensor is a damaged or foreign file, not something to cast."""
    bad = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in state.items() if not v.dtype.is_floating_point]
    if bad:
        raise WeightsError(f"{source}: {len(bad)} tensor(s) are not floating point, so these are not model weights: "
                           f"{_head(bad)}")


def nonfinite_keys(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Key -> number of NaN/inf values, for the tensors that hold any."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.dtype.is_floating_point}
    return {k: n for k, n in counts.items() if n}


def warn_nonfinite(state: dict[str, torch.Tensor], source: str) -> None:
    """Loading NaN/inf weights is allowed (to inspect a diverged run) but never silent."""
    bad = nonfinite_keys(state)
    if bad:
        warnings.warn(f"{source}: {sum(bad.values())} NaN/inf values in {len(bad)} of {len(state)} tensors: "
                      f"{_head([f'{k} ({n})' for k, n in bad.items()])}", stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# Saving


def diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model's config dict as diffusers writes it (class name and version first)."""
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:  # diffusers is a dependency, but the file format does not need it at run time
        version = "0.30.0"
    return {"_class_name": "AutoencoderKL", "_diffusers_version": version, **config}


def save_weights(state: dict[str, torch.Tensor], config: dict[str, Any] | None, path: str | Path,
                 format: str = "diffusers", dtype: torch.dtype | str | None = None, *, overwrite: bool = False,
                 protect: Sequence[str | Path] = (), card: str | None = None) -> Path:
    """Export a diffusers-keyed state dict and its config (and, for a folder, the model card `card` as README.md);
    the previous export at `path` survives any failure.

    Refuses NaN/inf weights before writing; the written files are read back and compared in the temporary location,
    and only a verified export is renamed into place. An existing `path` is replaced only when it is a previous
    export or `overwrite` is given, and never when it is or holds `/`, home, the current directory or one of
    `protect` (the sources): see durable.check_replaceable_dir / check_replaceable_file. `config` None writes an
    LDM single file with weights only, as the released ones are (a loader then reads the architecture off the shapes
    and needs a preset for the latent fields).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if format not in ("diffusers", "ldm"):
        raise ValueError(f"unknown export format {format!r}; choose 'diffusers' or 'ldm'")
    if config is None and format != "ldm":
        raise ValueError("a diffusers folder needs its config.json: only an LDM single file can go without one")
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    bad = nonfinite_keys(state)
    if bad:
        cast = f" after the cast to {str(dtype).replace('torch.', '')}" if dtype is not None else ""
        raise WeightsError(f"refusing to export {path}: {sum(bad.values())} NaN/inf values{cast} in {len(bad)} "
                           f"tensors ({_head(list(bad))}); nothing was written")
    if format == "diffusers":
        def write(folder: Path) -> None:
            save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
            (folder / CONFIG_NAME).write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
            if card is not None:
                (folder / CARD_NAME).write_text(card, encoding="utf-8")

        def check(folder: Path) -> None:
            _verify_export(read_state_dict(folder / WEIGHTS_NAME), state, path)
            # every key written, the private ones (a run's record of its latent scale) included
            stamp = ("_class_name", "_diffusers_version")
            read_back = {k: v for k, v in read_config(folder).items() if k not in stamp}
            if read_back != {k: v for k, v in json.loads(json.dumps(config)).items() if k not in stamp}:
                raise WeightsError(f"export check failed: {path / CONFIG_NAME} does not read back as the model's config")

        return atomic_write_dir(path, write, check_fn=check, overwrite=overwrite, protect=protect)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors") if path.suffix else path / "vae.safetensors"
    check_replaceable_file(path, overwrite, protect)
    ldm_state = diffusers_to_ldm(state)
    # The config rides along in the header, so our loader rebuilds the exact model (others ignore it).
    metadata = {"format": "pt"} if config is None else {"format": "pt", "kl_autoencoder_config": json.dumps(config)}

    def write_checked(tmp: Path) -> None:
        save_file(ldm_state, tmp, metadata=metadata)
        _verify_export(to_diffusers_state_dict(load_file(tmp)), state, path)

    return atomic_write(path, write_checked)


def _verify_export(read_back: dict[str, torch.Tensor], written: dict[str, torch.Tensor], path: Path) -> None:
    if read_back.keys() != written.keys():
        raise WeightsError(f"export check failed: {path} holds different keys than were written")
    for key, value in written.items():
        if not torch.equal(read_back[key], value):
            raise WeightsError(f"export check failed: {path} key {key} differs from what was written")
