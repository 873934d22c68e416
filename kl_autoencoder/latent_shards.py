"""A dataset -> latent shards, across processes: `accelerate launch ... kl-autoencoder encode --resolution R ...`.

The input (an image folder, webdataset/parquet shards, a `datasets` save_to_disk folder) is cut into units fixed by
the input alone: one per input shard, or `shard_size` files / rows of a folder or saved dataset. Unit i becomes
`out/latent-shard-{i:05d}.safetensors`, written by process i mod N. Every image is centre-cropped to R x R (the
evaluation transform) and encoded; its diffusion latent ((z - shift) * scale, [C, R/f, R/f]) is stored under the
input's key (the tar sample's `__key__`, a parquet `key` column or row number, the folder-relative file name). With
`store_posterior` the shard holds the posterior mean under the key and its std under `KEY.std`, both in diffusion
units, so a trainer can draw z = mean + std * eps itself. Shard metadata: "format", "keys", "input", "skipped"
(`[name, reason]` of unreadable members), the factors and the resolution.

Resumable and safe to share:
  - a shard is written to a temporary file and published with a hard link that fails if the name exists: a shard is
    complete or absent (a kill leaves only a hidden `.latent-shard-*.tmp`, removed by the next run), and never
    replaces one another writer published;
  - a rerun skips every unit whose shard exists: finished shards are not redone, whatever the process count; a
    damaged shard (or a link, FIFO, ... named like one) is named with what to do, and `--overwrite` removes what an
    earlier encode wrote (shards, manifest, by name) and starts again;
  - the main process holds a lock on `out` (flock on the folder itself) for the whole run, so a second encode into
    the same folder fails at once instead of racing; `encode.json` records what the folder's shards were made from
    (model, its factors and a fingerprint of its weights, input, resolution, mode) and a rerun that differs is
    refused unless `overwrite`;
  - at the end the main process writes `manifest.json`: model, factors, resolution, count, skipped, shards.

How the input is cut into units is latent_shard_inputs.py's (below this module); the folder lock and exclusive
writes are durable.py's; the `encode` command's options are commands/encode.py's (above it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kl_autoencoder.data import BadImageError, build_transform
from kl_autoencoder.durable import (  # noqa: F401 (the folder lock and exclusive writes are re-exported)
    EncodeFolderBusy, atomic_write_json, check_regular_file, lock_folder, unlock_folder, write_exclusive,
)
from kl_autoencoder.latent_shard_inputs import (  # noqa: F401 (re-exported)
    DEFAULT_SHARD_SIZE, Unit, count_images, input_units, shard_size_for,
)
from kl_autoencoder.data import ShardError, is_url
from kl_autoencoder.untrusted import shown

FORMAT = "kl-autoencoder/latent-shard/1"
SHARD_NAME = "latent-shard-{:05d}.safetensors"
SHARD_GLOB = "latent-shard-*.safetensors"
TMP_GLOB = ".latent-shard-*.tmp"
IDENTITY_FILE, MANIFEST_FILE = "encode.json", "manifest.json"
STD_SUFFIX = ".std"


# --------------------------------------------------------------------------------------------- encoding


def model_identity(model: Any, model_path: str) -> dict:
    """What the latents depend on: the model's path, factors and a fingerprint of its encoder's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    config = model.config
    return {"path": str(model_path), "latent_channels": config.latent_channels,
            "downsampling_factor": config.downsampling_factor, "scaling_factor": config.scaling_factor,
            "shift_factor": config.shift_factor, "encoder_sha256": digest.hexdigest()}


@dataclass
class EncodeResult:
    """What this process did: shards written, shards already there, images encoded, unreadable ones skipped."""

    written: list[Path] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)
    count: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest: dict | None = None
    seconds: float = 0.0  # reading + encoding + writing this process's shards (no start-up, no model load)

    def summary(self) -> str:
        text = (f"{self.count} image(s) encoded into {len(self.written)} new shard(s) in {self.seconds:.2f} s, "
                f"{len(self.existing)} shard(s) already done")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable image(s)"
        if self.manifest is not None:
            text += f"; the folder holds {self.manifest['count']} latents in {len(self.manifest['shards'])} shard(s)"
        return text


@torch.no_grad()
def _encode(model: Any, pixels: torch.Tensor, store_posterior: bool, mode: str,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    from kl_autoencoder.fastpath import autocast_for, model_device

    device = model_device(model)
    with autocast_for(device):
        posterior = model.encode(pixels.to(device))
    mean, std = posterior.mean.float(), posterior.std.float()
    if mode == "sample" and not store_posterior:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        mean = mean + std * eps
    latents = model.to_diffusion_latents(mean).cpu()
    return latents, (std * model.config.scaling_factor).cpu() if store_posterior else None


def encode_unit(model: Any, unit: Unit, path: Path, resolution: int, batch_size: int, store_posterior: bool,
                mode: str, generator: torch.Generator | None, threads: int, meta: dict) -> tuple[int, list]:
    """Encode one unit into the shard `path` (published exclusively); returns (images, skipped)."""
    transform = build_transform(resolution, random_crop=False, random_flip=False)
    tensors: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []

    def load(item: tuple[str, Callable]) -> tuple[str, torch.Tensor | BadImageError]:
        key, read = item
        try:
            return key, transform(read())
        except BadImageError as err:
            return key, err

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        latents, std = _encode(model, torch.stack([t for _, t in batch]), store_posterior, mode, generator)
        for i, (key, _) in enumerate(batch):
            if key in tensors:
                raise ShardError(f"{shown(unit.name)}: the key {shown(key)} occurs twice")
            if std is not None:
                check_posterior_keys(key, tensors, unit.name)
            tensors[key] = latents[i].contiguous()
            if std is not None:
                tensors[key + STD_SUFFIX] = std[i].contiguous()
            keys.append(key)

    batch: list[tuple[str, torch.Tensor]] = []
    items = unit.read()
    with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes outside the GIL
        # `map` takes its whole input at once: feed it a few batches at a time so memory stays bounded
        while chunk := list(itertools.islice(items, batch_size * max(2, threads))):
            for key, value in pool.map(load, chunk):
                if isinstance(value, BadImageError):
                    skipped.append((value.path, value.reason))
                    continue
                batch.append((key, value))
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)
    metadata = {**meta, "format": FORMAT, "input": unit.name, "keys": json.dumps(keys), "skipped": json.dumps(skipped)}
    write_exclusive(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return len(keys), skipped


def check_posterior_keys(key: str, tensors: dict[str, Any], where: str) -> None:
    """With --store-posterior KEY.std holds KEY's std: an input key that is another's KEY.std (`a` and `a.std`)
    would be overwritten or read as a std, so the pair is refused, naming both."""
    pair = (key, key + STD_SUFFIX) if key + STD_SUFFIX in tensors else None
    if pair is None and key.endswith(STD_SUFFIX) and key[:-len(STD_SUFFIX)] in tensors:
        pair = (key[:-len(STD_SUFFIX)], key)
    if pair is not None:
        raise ShardError(f"{shown(where)}: the input keys {shown(pair[0])} and {shown(pair[1])} clash under "
                         f"--store-posterior (KEY{STD_SUFFIX} holds KEY's std): rename one, or encode without "
                         "--store-posterior")


def read_latent_shard(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """(metadata, keys) of a shard written by `encode_dataset`; ShardError when it is not one."""
    check_regular_file(path, "latent shard", ShardError)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        keys = json.loads(metadata["keys"])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("'keys' is not a list of strings")
    except Exception as err:
        raise ShardError(f"{path}: not a latent shard of `kl-autoencoder encode` "
                         f"({type(err).__name__}: {err})") from err
    return metadata, keys


def load_latent_shards(folder: str | Path, with_std: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Every latent of an encoded folder (key -> [C, h, w]; with `with_std`, key -> (mean, std)) and its manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    check_regular_file(manifest_path, error=ShardError)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST_FILE}: not a finished `kl-autoencoder encode` output")
    manifest = json.loads(manifest_path.read_text())
    latents: dict[str, Any] = {}
    for entry in manifest["shards"]:
        path = folder / Path(entry["file"]).name
        _, keys = read_latent_shard(path)
        with safe_open(str(path), framework="pt") as f:
            for key in keys:
                mean = f.get_tensor(key)
                latents[key] = (mean, f.get_tensor(key + STD_SUFFIX)) if with_std else mean
    return latents, manifest


# --------------------------------------------------------------------------------------------- the run


def _damage(path: Path) -> str | None:
    """Why `path`, named like a shard, is not a complete shard of an encode (None: it is one)."""
    if path.is_symlink():  # shards are published as hard links of regular files, never as symlinks
        return f"it is a symlink (to {os.readlink(path)}), not a shard an encode wrote"
    if not path.is_file():  # checked before any read: opening a FIFO blocks
        return "not a regular file: a FIFO, device, socket or folder"
    try:
        read_latent_shard(path)
    except ShardError as err:
        return str(err).removeprefix(f"{path}: ")
    return None


def _clear(out: Path, ours: Sequence[Path]) -> None:
    """--overwrite: remove what an earlier encode wrote here, by name (shards, manifest), links themselves."""
    for path in ours:
        if path.is_dir() and not path.is_symlink():
            raise ShardError(f"{path} is a folder, not something an encode wrote; move it out of {out}")
        path.unlink(missing_ok=True)


def _claim(out: Path, identity: dict, overwrite: bool) -> None:
    """Main process, lock held: check (or record) what the folder's shards are made from; clear temporaries.

    `overwrite` removes the shards and manifest an earlier encode left (and nothing else) and starts again;
    otherwise every shard there must be a complete one of this same encode (a damaged one is named, with what to
    do, instead of blocking each rerun)."""
    recorded_path = out / IDENTITY_FILE
    shards = sorted(out.glob(SHARD_GLOB))
    ours = shards + [p for p in (out / MANIFEST_FILE,) if p.exists() or p.is_symlink()]
    if overwrite:
        _clear(out, ours)
    elif recorded_path.is_file() or ours:
        try:  # is_file: never open a FIFO
            recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else None
        except (OSError, ValueError):
            recorded = None
        if recorded != identity:
            what = "an unknown encode" if recorded is None else \
                ", ".join(f"{k}" for k in identity if recorded.get(k) != identity.get(k)) + " differ"
            raise ShardError(f"{out} holds latent shards of another encode ({what}); choose another --out, or "
                             "replace them (--overwrite)")
        for path in shards:
            reason = _damage(path)
            if reason is not None:
                raise ShardError(f"{path} is damaged or not a shard ({reason}); rerun with --overwrite to remove the "
                                 f"shards and manifest an encode wrote in {out} (nothing else) and encode again, or "
                                 f"delete {path.name} to redo only its part")
    for tmp in out.glob(TMP_GLOB):  # a killed run's half-written shard (the lock makes us the only writer)
        tmp.unlink(missing_ok=True)
    atomic_write_json(recorded_path, identity)


def write_manifest(out: Path, identity: dict, num_units: int) -> dict:
    """Read every shard's header (no tensors) and write `manifest.json`; a key in two shards is an error."""
    shards, owner, skipped, count = [], {}, [], 0
    for index in range(num_units):
        path = out / SHARD_NAME.format(index)
        if not path.is_file():
            continue
        metadata, keys = read_latent_shard(path)
        for key in keys:
            if owner.setdefault(key, path.name) != path.name:
                raise ShardError(f"the key {shown(key)} is in {owner[key]} and {path.name}: input keys must be unique")
        skipped.extend(json.loads(metadata.get("skipped", "[]")))
        shards.append({"file": path.name, "input": metadata.get("input"), "count": len(keys)})
        count += len(keys)
    manifest = {"format": FORMAT, "model": identity["model"], "resolution": identity["resolution"],
                "store_posterior": identity["store_posterior"], "mode": identity["mode"],
                "input": identity["input"], "count": count, "skipped": skipped,
                "complete": len(shards) == num_units, "shards": shards}
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def encode_dataset(model: Any, model_path: str, source: str, out: str | Path, resolution: int,
                   data_files: str | Sequence[str] | None = None, batch_size: int = 8, mode: str = "mean",
                   store_posterior: bool = False, shard_size: int = 256, image_column: str | None = None,
                   split: str | None = "train", threads: int = 2, overwrite: bool = False,
                   rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                   generator: torch.Generator | None = None, progress: bool = True,
                   allow_local_paths: bool = False) -> EncodeResult:
    """Encode this process's units of `source` into `out` (see the module docstring); rank 0 claims the folder,
    writes the manifest once every rank is done (`barrier` is Accelerate's `wait_for_everyone`);
    `allow_local_paths`: follow parquet / saved-dataset cells that name a local file."""
    from kl_autoencoder.outputs import check_output

    factor = model.config.downsampling_factor
    if resolution < 1 or resolution % factor:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of the downsampling factor {factor}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    out = Path(out).expanduser()
    units, described = input_units(source, data_files, image_column, split, shard_size, resolution,
                                   allow_local_paths)
    local_inputs = [p for p in described.get("files", [described["source"]]) if not is_url(str(p))]
    check_output(out, "encode", local_inputs)
    identity = {"model": model_identity(model, model_path), "input": described, "resolution": resolution,
                "mode": mode, "store_posterior": store_posterior}
    meta = {"resolution": str(resolution), "scaling_factor": json.dumps(model.config.scaling_factor),
            "shift_factor": json.dumps(model.config.shift_factor), "store_posterior": json.dumps(store_posterior)}
    created = not out.exists()
    lock = lock_folder(out) if rank == 0 else None
    try:
        if rank == 0:
            _claim(out, identity, overwrite)
        barrier()
        result = _encode_units(model, units[rank::world], out, resolution, batch_size, store_posterior, mode,
                               generator, threads, meta, progress and rank == 0)
        barrier()
        if rank == 0:
            result.manifest = write_manifest(out, identity, len(units))
        return result
    finally:
        if lock is not None:
            unlock_folder(out, lock, created, leftovers=(IDENTITY_FILE,))


def _encode_units(model: Any, units: Sequence[Unit], out: Path, resolution: int, batch_size: int,
                  store_posterior: bool, mode: str, generator: torch.Generator | None, threads: int, meta: dict,
                  progress: bool) -> EncodeResult:
    from tqdm.auto import tqdm

    result, start = EncodeResult(), time.perf_counter()
    for unit in tqdm(units, desc="encoding shards", unit="shard", disable=not progress):
        path = out / SHARD_NAME.format(unit.index)
        if path.exists():
            read_latent_shard(path)  # a shard of ours, complete (published atomically): not redone
            result.existing.append(path)
            continue
        count, skipped = encode_unit(model, unit, path, resolution, batch_size, store_posterior, mode, generator,
                                     threads, meta)
        result.written.append(path)
        result.count += count
        result.skipped.extend(skipped)
    result.seconds = time.perf_counter() - start
    return result
