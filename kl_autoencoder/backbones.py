"""Pretrained backbones: the one place their weights are read (LPIPS' torchvision ImageNet networks, rFID's Inception).

torch.hub's `load_state_dict_from_url` checks a file's hash only while downloading it, and torchvision (under lpips)
and torch-fidelity unpickle a cached file with `weights_only=False`: a file planted in `$TORCH_HOME/hub/checkpoints`
would run code. Here every file is read with `torch.load(weights_only=True)` and must hold nothing but tensors; a
missing file is downloaded (hash-checked) where the caller allows it, and every failure is one line naming the file.
Callers build their networks without pretrained weights and load what `load_pretrained_state` returns.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from kl_autoencoder.durable import check_regular_file

# The torchvision ImageNet weights lpips builds its backbones from.
TORCHVISION_WEIGHTS = {
    "vgg": "VGG16_Weights.IMAGENET1K_V1",
    "alex": "AlexNet_Weights.IMAGENET1K_V1",
    "squeeze": "SqueezeNet1_1_Weights.IMAGENET1K_V1",
}
# torch-fidelity's FID Inception (a port of the TensorFlow graph), the network torchmetrics' FID runs.
INCEPTION_FID_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                     "weights-inception-2015-12-05-6726825d.pth")


class BackboneWeightsError(ValueError):
    """A pretrained backbone's weights could not be read; the message names the file and what to do."""


def hub_checkpoint(filename: str) -> Path:
    """Where torch.hub (and so torchvision / torch-fidelity) caches a downloaded checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def checkpoint_for(url: str) -> Path:
    """The torch hub cache path of the file at `url`."""
    return hub_checkpoint(os.path.basename(urlparse(url).path))


def backbone_checkpoint(net: str) -> tuple[str, Path]:
    """(url, local path) of the ImageNet backbone weights for LPIPS `net`: where torchvision caches the download."""
    if net not in TORCHVISION_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {tuple(TORCHVISION_WEIGHTS)}, got {net!r}")
    import torchvision

    url = torchvision.models.get_weight(TORCHVISION_WEIGHTS[net]).url
    return url, checkpoint_for(url)


def _download(url: str, path: Path) -> None:
    """Fetch `url` to `path`, checked against the hash prefix in its name (torch.hub's convention)."""
    match = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None,
                                       progress=False)
    except Exception as error:  # offline, a proxy, a hash mismatch: all mean "put the file there yourself"
        raise BackboneWeightsError(
            f"could not download {url} ({type(error).__name__}: {error}); without internet, download it elsewhere "
            f"and place it at {path} (that is $TORCH_HOME/hub/checkpoints/{path.name})") from error


def load_pretrained_state(url: str, path: Path | None = None, download: bool = True) -> dict[str, torch.Tensor]:
    """The state dict cached at `path` (default: torch hub's cache path for `url`), read with weights_only=True.

    A missing file is downloaded when `download` (else `BackboneWeightsError`); a file that is not plain tensors
    (a pickle that would run code, a damaged download) is refused, never executed.
    """
    path = checkpoint_for(url) if path is None else Path(path)
    check_regular_file(path, error=BackboneWeightsError)
    if not path.is_file():
        if not download:
            raise BackboneWeightsError(f"{path} is missing: download {url} on a machine with internet access and "
                                       "copy it there")
        _download(url, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise BackboneWeightsError(
            f"{path}: refused, not a plain weights file (torch.load(weights_only=True): {first}); delete it and "
            f"download {url} again") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{path}: refused, it does not hold a state dict of tensors; delete it and "
                                   f"download {url} again")
    return state


def load_lpips_backbone(lpips_model: nn.Module, net: str, download: bool = True) -> None:
    """Load torchvision's ImageNet weights into lpips' sliced backbone (`sliceK.<i>.*` <- `features.<i>.*`).

    Build the `lpips.LPIPS` with `pnet_rand=True` (its backbone untouched by torchvision's loader), then call this.
    """
    url, path = backbone_checkpoint(net)
    state = load_pretrained_state(url, path, download=download)
    backbone = lpips_model.net
    mapped = {}
    for name in backbone.state_dict():
        _, index, rest = name.split(".", 2)
        source = f"features.{index}.{rest}"
        if source not in state:
            raise BackboneWeightsError(f"{path}: key {source!r} missing; is this the torchvision {net} ImageNet "
                                       f"checkpoint? Expected the file from {url}")
        needed = backbone.state_dict()[name].shape
        if state[source].shape != needed:
            raise BackboneWeightsError(f"{path}: {source} has shape {tuple(state[source].shape)}, the {net} backbone "
                                       f"needs {tuple(needed)}; expected the file from {url}")
        mapped[name] = state[source]
    backbone.load_state_dict(mapped, strict=True)


def inception_weights_copy(folder: Path, download: bool = False) -> Path:
    """torch-fidelity's Inception weights, read here with weights_only=True and re-saved in `folder` as plain tensors.

    torch-fidelity reads its weights file with weights_only=False; it is handed this copy, written by us from tensors
    only, instead of the cached file (which might be a planted pickle).
    """
    state = load_pretrained_state(INCEPTION_FID_URL, download=download)
    copy = Path(folder) / "inception-weights.pth"
    torch.save(state, copy)
    return copy
