"""The teacher comparison: a tiny autoencoder against the KL VAE it was distilled from, and which model that is.

`find_teacher` picks the teacher among the models (or the one `--teacher` names) before any work;
`compare_with_teacher` measures the student's decodes against the teacher's. Below orchestration.py.
"""

from __future__ import annotations

from typing import Any

import torch

from kl_autoencoder import metrics as M
from kl_autoencoder.evaluation.errors import EvaluationError
from kl_autoencoder.evaluation.models import same_model_path
from kl_autoencoder.evaluation.report import ALL
from kl_autoencoder.evaluation.scores import split_summaries
from kl_autoencoder.fastpath import FastPath, autocast as fast_autocast
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiny import TinyAutoencoder


@torch.no_grad()
def compare_with_teacher(student: TinyAutoencoder, teacher: KLAutoencoder, teacher_name: str, images: torch.Tensor,
                         batch_size: int = 8, device: torch.device | str = "cpu",
                         splits: dict[str, list[int]] | None = None, autocast: bool = True) -> dict[str, Any]:
    """A tiny autoencoder against the KL VAE it was distilled from, on `images` ([N, 3, R, R] in [-1, 1]).

    With z the teacher's posterior mode and L = teacher.to_diffusion_latents(z) (what a diffusion model samples):
      "decode":      PSNR / SSIM of student.decode(L) against teacher.decode(z): the decoder alone, i.e. a preview
                     of a diffusion model's latents against the full decode;
      "round_trip":  student.decode(student.encode(x)) against teacher.decode(z): both halves;
      "latent_rmse": per image, the RMS of student.encode(x) - L (L has about unit spread).
    Each over all images and per split (`splits`, default one split "all"), decodes clamped to the image range.
    """
    device = torch.device(device)
    splits = splits if splits is not None else {ALL: list(range(len(images)))}
    policy = FastPath.for_device(device) if autocast else FastPath()
    per_image: dict[str, dict[str, list[torch.Tensor]]] = {"decode": {"psnr": [], "ssim": []},
                                                           "round_trip": {"psnr": [], "ssim": []}}
    rmse = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        with fast_autocast(device, policy):
            z = teacher.encode(x).mode()
            target = M.to_unit_range(teacher.decode(z))
            latents = teacher.to_diffusion_latents(z).float()
            encoded = student.encode(x).float()
            outputs = {"decode": M.to_unit_range(student.decode(latents)),
                       "round_trip": M.to_unit_range(student.decode(encoded))}
        for kind, output in outputs.items():
            per_image[kind]["psnr"].append(M.psnr(output, target).cpu())
            per_image[kind]["ssim"].append(M.ssim(output, target).cpu())
        rmse.append((encoded - latents).pow(2).flatten(1).mean(1).sqrt().cpu())
    result: dict[str, Any] = {"teacher": teacher_name}
    for kind, values in per_image.items():
        measured = {key: torch.cat(parts) for key, parts in values.items()}
        result[kind] = {"psnr": M.summarize(measured["psnr"]), "ssim": M.summarize(measured["ssim"]),
                        "splits": split_summaries(measured, splits)}
    result["latent_rmse"] = M.summarize(torch.cat(rmse))
    return result


def find_teacher(paths: list[str], models: list[Any], teacher: str | None) -> int | None:
    """Index in `paths` of the KL VAE the tiny autoencoders are compared with: `teacher`'s, else the only KL VAE
    among the models; None when there is no tiny model or no KL VAE. Mismatches are EvaluationErrors, before work."""
    tiny = [isinstance(m, TinyAutoencoder) for m in models]
    if not any(tiny):
        if teacher is not None:
            raise EvaluationError(f"--teacher {teacher!r} is for tiny autoencoders (AutoencoderTiny folders); none "
                                  "is among the models")
        return None
    if teacher is not None:
        index = next(i for i, p in enumerate(paths) if same_model_path(p, teacher))
        if tiny[index]:
            raise EvaluationError(f"--teacher {teacher!r} is a tiny autoencoder; name the KL VAE it was distilled from")
    else:
        candidates = [i for i, is_tiny in enumerate(tiny) if not is_tiny]
        if not candidates:
            return None
        if len(candidates) > 1:
            raise EvaluationError("several KL VAEs are among the models (" + ", ".join(paths[i] for i in candidates)
                                  + "): say which one the tiny autoencoder was distilled from with --teacher")
        index = candidates[0]
    for path, model in zip(paths, models):
        if isinstance(model, TinyAutoencoder) and (
                model.config.latent_channels != models[index].config.latent_channels
                or model.downsampling_factor != models[index].config.downsampling_factor):
            raise EvaluationError(
                f"the tiny autoencoder {path!r} ({model.config.latent_channels} latent channels, factor "
                f"{model.downsampling_factor}) cannot be a student of {paths[index]!r} "
                f"({models[index].config.latent_channels} channels, factor {models[index].config.downsampling_factor})")
    return index
