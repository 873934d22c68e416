"""The diffusability probe: a small latent diffusion model trained on a VAE's latents for a fixed budget.

`diffusability_probe`: encode a fixed set of crops, train a small diffusers `UNet2DModel` (DDPM, epsilon prediction)
on the training latents for a fixed budget with fixed seeds, report its denoising MSE on held-out latents at fixed
noise levels with fixed noise. Lower is easier to diffuse. Same `ProbeConfig` for every VAE compared, so the numbers
compare VAEs, not runs. Its pieces (crops, `build_probe_unet`, `train_denoiser`) also serve the latent diffusion
example.

Its own room: it trains a model, where diffusability.py's other measures (spectra, equivariance) only look at one;
diffusability.py re-exports every name.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's fixed budget. Compare VAEs only under the same ProbeConfig (and the same downsampling factor).

    `latent_scale`: "measured" (default) standardises the posterior means mu with the training latents' global mean
    and std, so a badly set scaling_factor does not decide the comparison (a random-init VAE with a trained model's
    scaling_factor has latents of std ~0.1, and small latents are trivially "easy" to denoise); "config" diffuses
    model.to_diffusion_latents(mu) (the model's scaling_factor / shift_factor, as a pipeline would) and warns when
    their std is outside [0.5, 2]. For an export whose scaling_factor was measured the two agree closely.
    """

    resolution: int = 128             # pixel crops: 16x16 latents at f8
    train_crops: int = 160            # random crops of the 12 training photos, encoded once
    heldout_crops: int = 64           # random crops of the 2 held-out photos
    steps: int = 150                  # ~1 min of CPU time for a quickstart-size VAE (UNet ~0.3 s/step, 1 thread)
    batch_size: int = 32
    width: int = 32                   # UNet channels (width, 2 * width)
    lr: float = 1e-3
    num_train_timesteps: int = 1000   # DDPM linear beta schedule (diffusers' default betas)
    eval_timesteps: tuple[int, ...] = (100, 250, 500, 750)
    latent_scale: str = "measured"
    seed: int = 0
    encode_batch_size: int = 32

    def __post_init__(self) -> None:
        for key in ("resolution", "train_crops", "heldout_crops", "steps", "batch_size", "width", "encode_batch_size",
                    "num_train_timesteps"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"ProbeConfig.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.latent_scale not in ("config", "measured"):
            raise ValueError(f"ProbeConfig.latent_scale must be 'config' or 'measured', got {self.latent_scale!r}")
        bad = [t for t in self.eval_timesteps if not 0 <= t < self.num_train_timesteps]
        if not self.eval_timesteps or bad:
            raise ValueError(f"ProbeConfig.eval_timesteps must be non-empty and in [0, {self.num_train_timesteps}), "
                             f"got {self.eval_timesteps!r}")


def random_crops(photos: Sequence[torch.Tensor], num: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`num` size x size crops at native resolution (half of them mirrored) of [3, H, W] photos: [num, 3, size, size].

    Photos smaller than `size` on a side are rejected with their shape.
    """
    for photo in photos:
        if photo.shape[-2] < size or photo.shape[-1] < size:
            raise ValueError(f"random_crops: a photo of shape {tuple(photo.shape)} is smaller than the crop {size}")
    crops = []
    for _ in range(num):
        photo = photos[int(torch.randint(len(photos), (), generator=generator))]
        top = int(torch.randint(photo.shape[-2] - size + 1, (), generator=generator))
        left = int(torch.randint(photo.shape[-1] - size + 1, (), generator=generator))
        crop = photo[:, top:top + size, left:left + size]
        crops.append(crop.flip(-1) if torch.rand((), generator=generator) < 0.5 else crop)
    return torch.stack(crops)


def sample_photo_crops(split: str, num: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the built-in sample photos of `split` ("train" or "heldout"), in [-1, 1]."""
    from kl_autoencoder.data import image_to_tensor, sample_images

    return random_crops([image_to_tensor(image) for _, image in sample_images(split)], num, size, generator)


def probe_pixels(config: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's default images: (training crops of the 12 training photos, held-out crops of the other 2)."""
    generator = torch.Generator().manual_seed(config.seed)
    train = sample_photo_crops("train", config.train_crops, config.resolution, generator)
    return train, sample_photo_crops("heldout", config.heldout_crops, config.resolution, generator)


@torch.no_grad()
def encode_means(model, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Posterior means of `pixels` ([N, 3, H, W] in [-1, 1]), batch by batch, on the model's device, back on CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(pixels[i:i + batch_size].to(device)).mode().float().cpu()
                      for i in range(0, len(pixels), batch_size)])


def build_probe_unet(latent_channels: int, latent_size: int, width: int = 32):
    """A small two-level diffusers UNet2DModel (no attention) for [C, size, size] latents."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                       layers_per_block=1, block_out_channels=(width, 2 * width), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def train_denoiser(unet, scheduler, latents: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator,
                   lr: float = 1e-3, progress: str | None = None) -> list[float]:
    """The DDPM objective: predict the noise added at a uniformly drawn timestep. Returns the loss per step.

    `progress`: a tqdm bar with this description and the current loss (None: silent, as the probe runs).
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    losses = []
    unet.train()
    bar = tqdm(range(steps), desc=progress, unit="step", disable=progress is None)
    for _ in bar:
        x0 = latents[torch.randint(len(latents), (batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return losses


@torch.no_grad()
def denoising_loss(unet, scheduler, latents: torch.Tensor, timesteps: Sequence[int], generator: torch.Generator,
                   batch_size: int = 64) -> dict[str, float]:
    """Epsilon-prediction MSE on `latents` at each of `timesteps`, with one fixed noise draw: {str(t): mse}."""
    unet.eval()
    noise = torch.randn(latents.shape, generator=generator)
    result = {}
    for t in timesteps:
        total = 0.0
        for i in range(0, len(latents), batch_size):
            x0, eps = latents[i:i + batch_size], noise[i:i + batch_size]
            step = torch.full((len(x0),), int(t), dtype=torch.long)
            total += F.mse_loss(unet(scheduler.add_noise(x0, eps, step), step).sample, eps, reduction="sum").item()
        result[str(int(t))] = total / latents.numel()
    return result


def diffusability_probe(model, config: ProbeConfig = ProbeConfig(), train_pixels: torch.Tensor | None = None,
                        heldout_pixels: torch.Tensor | None = None) -> dict[str, Any]:
    """Train the probe UNet on `model`'s latents and report its held-out denoising loss (see the module docstring).

    `train_pixels` / `heldout_pixels` ([N, 3, H, W] in [-1, 1]) default to `config`'s random crops of the sample
    photos (training vs held-out photos). Deterministic for a fixed `config.seed` on one machine and thread count;
    torch's global RNG is left as it was.
    """
    from diffusers import DDPMScheduler

    started = time.perf_counter()
    if train_pixels is None or heldout_pixels is None:
        default_train, default_heldout = probe_pixels(config)
        train_pixels = default_train if train_pixels is None else train_pixels
        heldout_pixels = default_heldout if heldout_pixels is None else heldout_pixels
    model.eval()
    train_mu = encode_means(model, train_pixels, config.encode_batch_size)
    heldout_mu = encode_means(model, heldout_pixels, config.encode_batch_size)
    if config.latent_scale == "config":
        train_latents, heldout_latents = model.to_diffusion_latents(train_mu), model.to_diffusion_latents(heldout_mu)
    else:
        shift, std = train_mu.mean(), train_mu.std(correction=0)
        if std <= 0:
            raise ValueError("diffusability_probe: the training latents are constant; nothing to standardise")
        train_latents, heldout_latents = (train_mu - shift) / std, (heldout_mu - shift) / std
    latent_std = float(train_latents.std(correction=0))

    scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = build_probe_unet(train_latents.shape[1], train_latents.shape[-1], config.width)
    losses = train_denoiser(unet, scheduler, train_latents, config.steps, config.batch_size,
                            torch.Generator().manual_seed(config.seed + 1), config.lr)
    heldout = denoising_loss(unet, scheduler, heldout_latents, config.eval_timesteps,
                             torch.Generator().manual_seed(config.seed + 2))
    train = denoising_loss(unet, scheduler, train_latents[:len(heldout_latents)], config.eval_timesteps,
                           torch.Generator().manual_seed(config.seed + 2))
    window = max(1, len(losses) // 10)
    result = {
        "heldout_loss": heldout,
        "heldout_loss_mean": sum(heldout.values()) / len(heldout),
        "train_loss": train,
        "train_loss_mean": sum(train.values()) / len(train),
        "final_training_loss": sum(losses[-window:]) / window,
        "latent_shape": list(train_latents.shape[1:]),
        "latent_std": latent_std,
        "config": asdict(config),
        "seconds": time.perf_counter() - started,
        "warnings": [],
    }
    if not 0.5 <= latent_std <= 2.0:
        message = (f"the probe's training latents have std {latent_std:.3g} (the model's scaling_factor "
                   f"{model.config.scaling_factor:.5g}); denoising losses depend on the latent scale, so this number "
                   "does not compare with other VAEs: set scaling_factor (evaluate --write-config) or use "
                   "latent_scale='measured'")
        result["warnings"].append(message)
        warnings.warn(message, stacklevel=2)
    if not all(math.isfinite(v) for v in heldout.values()):
        result["warnings"].append("non-finite held-out loss: the probe diverged")
    return result
