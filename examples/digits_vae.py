"""The small MLP (V)AE on scikit-learn's 8x8 digits that every lecture example trains.

One model class covers the lecture's variants (plain AE, VAE, conditional VAE, VAE with an autoregressive decoder)
and one `train` function fits them all with the library's own pieces: `DiagonalGaussian` for the posterior and the
reparameterized sample, `losses.pixel_loss` for the reconstruction term, `losses.kl_loss` for the closed-form KL
(with free bits) and `losses.kl_weight_at` for the KL schedule. `evaluate` reads the latent with
`metrics.unit_activity` / `metrics.active_units`, the same statistics the production evaluation reports.

The decoder is a Gaussian with a fixed standard deviation `sigma` per pixel, so the negative ELBO in nats is
    sum_pixels (x - x_hat)^2 / (2 sigma^2)  +  beta * KL(q(z|x) || N(0, I))     (constants dropped).
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # examples only ever write files; never open a window
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from kl_autoencoder.losses import kl_loss, kl_weight_at, pixel_loss
from kl_autoencoder.metrics import active_units, unit_activity
from kl_autoencoder.model import DiagonalGaussian

NUM_PIXELS = 64
NUM_CLASSES = 10

# ----------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Digits:
    """sklearn's 1797 digits as flat [N, 64] float tensors in [0, 1], split once into train and held-out."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digit_splits(heldout: int = 300, split_seed: int = 0) -> Digits:
    """The split is fixed by `split_seed` (not the training seed) so every run compares on the same held-out digits."""
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    test, train = order[:heldout], order[heldout:]
    return Digits(x[train], y[train], x[test], y[test])


def one_hot(y: torch.Tensor | None) -> torch.Tensor | None:
    return None if y is None else F.one_hot(y, NUM_CLASSES).float()


# ----------------------------------------------------------------------------------------------------------------------
# model


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class AutoregressiveDecoder(nn.Module):
    """p(x | z) = prod_i p(x_i | x_<i, z) in raster order: a MADE over the pixels with z added to its hidden layer.

    It can model a digit from its own earlier pixels alone, which is exactly what lets a VAE ignore its latent.
    """

    def __init__(self, cond_dim: int, hidden: int):
        super().__init__()
        pixel_degree = torch.arange(1, NUM_PIXELS + 1)
        hidden_degree = torch.arange(hidden) % (NUM_PIXELS - 1) + 1
        # Hidden unit k sees pixels 1..deg(k); output pixel d sees hidden units of degree < d: strictly autoregressive.
        self.pixels_in = MaskedLinear(hidden_degree[:, None] >= pixel_degree[None, :])
        self.cond_in = nn.Linear(cond_dim, hidden)
        self.pixels_out = MaskedLinear(pixel_degree[:, None] > hidden_degree[None, :])
        self.skip = MaskedLinear(pixel_degree[:, None] > pixel_degree[None, :])  # linear in x_<i, needs no training

    def forward(self, cond: torch.Tensor, previous_pixels: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.pixels_in(previous_pixels) + self.cond_in(cond))
        return torch.sigmoid(self.pixels_out(hidden) + self.skip(previous_pixels))

    @torch.no_grad()
    def generate(self, cond: torch.Tensor) -> torch.Tensor:
        """Pixel by pixel, each set to its predicted mean given the ones before."""
        x = cond.new_zeros(cond.shape[0], NUM_PIXELS)
        for i in range(NUM_PIXELS):
            x[:, i] = self(cond, x)[:, i]
        return x


class DigitsVAE(nn.Module):
    """MLP encoder -> DiagonalGaussian posterior over `latent_dim` units -> MLP or autoregressive decoder.

    variational=False gives the plain autoencoder: the encoder outputs only a mean and the posterior is a point mass.
    num_classes > 0 gives the conditional VAE: the one-hot label is fed to both encoder and decoder.
    """

    def __init__(self, latent_dim: int = 8, hidden: int = 256, variational: bool = True, num_classes: int = 0,
                 decoder: str = "mlp", decoder_hidden: int | None = None):
        super().__init__()
        if decoder not in ("mlp", "autoregressive"):
            raise ValueError(f"decoder must be 'mlp' or 'autoregressive', got {decoder!r}")
        self.latent_dim, self.variational, self.num_classes = latent_dim, variational, num_classes
        self.encoder = mlp(NUM_PIXELS + num_classes, hidden, hidden, (2 if variational else 1) * latent_dim)
        decoder_hidden = decoder_hidden or hidden
        cond_dim = latent_dim + num_classes
        if decoder == "autoregressive":
            self.decoder: nn.Module = AutoregressiveDecoder(cond_dim, decoder_hidden)
        else:
            self.decoder = mlp(cond_dim, decoder_hidden, decoder_hidden, NUM_PIXELS)
        self.autoregressive = decoder == "autoregressive"

    def _condition(self, v: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.num_classes == 0:
            return v
        if y is None:
            raise ValueError("this is a conditional model: pass the labels y")
        return torch.cat([v, one_hot(y)], dim=1)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        h = self.encoder(self._condition(x, y))
        if self.variational:
            return DiagonalGaussian(h)  # moments [B, 2D] -> mean, logvar
        return DiagonalGaussian(mean=h, logvar=torch.full_like(h, -30.0))  # a point mass: the AE's code

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None,
               target: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel means in [0, 1]. The autoregressive decoder reads `target`'s pixels (teacher forcing) or generates."""
        cond = self._condition(z, y)
        if self.autoregressive:
            return self.decoder(cond, target) if target is not None else self.decoder.generate(cond)
        return torch.sigmoid(self.decoder(cond))

    def latent(self, posterior: DiagonalGaussian, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reparameterized sample z = mean + std * eps for a VAE; the code itself for an AE."""
        return posterior.sample(generator) if self.variational else posterior.mode()


# ----------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    kl_weight: float = 1.0  # beta
    warmup_steps: int = 0
    kl_schedule: str = "linear"
    free_bits: float = 0.0  # nats per latent unit
    sigma: float = 0.1  # decoder standard deviation: sets how much a nat of KL costs in squared pixel error
    seed: int = 0


def reconstruction_nll(reconstruction: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian -log p(x | z) with fixed sigma, summed over pixels and averaged over the batch (constants dropped)."""
    return 0.5 * target[0].numel() * pixel_loss(reconstruction, target, kind="l2") / sigma**2


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny matmuls on one thread (restored after): on a busy CPU, syncing threads costs far more than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@single_thread()
def train(model: DigitsVAE, x: torch.Tensor, y: torch.Tensor | None, cfg: TrainConfig,
          log_every: int = 100) -> list[dict[str, float]]:
    """Adam on the negative ELBO  rec + beta(step) * KL  over shuffled mini-batches; returns the logged history."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict[str, float]] = []
    model.train()
    order, cursor = torch.randperm(len(x), generator=generator), 0
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        xb, yb = x[idx], (y[idx] if model.num_classes else None)

        posterior = model.encode(xb, yb)
        z = model.latent(posterior, generator)
        rec = reconstruction_nll(model.decode(z, yb, target=xb), xb, cfg.sigma)
        beta = kl_weight_at(step, cfg.kl_weight, warmup_steps=cfg.warmup_steps, schedule=cfg.kl_schedule)
        loss = (rec + beta * kl_loss(posterior, free_bits=cfg.free_bits)) if model.variational else rec
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            kl_value = posterior.kl().mean().item() if model.variational else float("nan")
            history.append({"step": step, "rec": rec.item(), "kl": kl_value, "beta": beta})
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: DigitsVAE, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 8) -> dict:
    """Held-out reconstruction error, KL per unit, and the active units of the latent.

    rec_mse decodes the posterior mean; distortion is the ELBO's view, the error of decodes of z ~ q(z|x)
    (averaged over `num_samples` draws), which also counts the noise a wider posterior adds.
    """
    y = y if model.num_classes else None
    posterior = model.encode(x, y)
    reconstruction = model.decode(posterior.mode(), y, target=x)
    generator = torch.Generator().manual_seed(0)
    distortion = sum(F.mse_loss(model.decode(model.latent(posterior, generator), y, target=x), x).item()
                     for _ in range(num_samples)) / num_samples
    kl_per_unit = posterior.kl_per_channel().mean(0) if model.variational else torch.zeros(model.latent_dim)
    return {
        "rec_mse": F.mse_loss(reconstruction, x).item(),
        "distortion": distortion,
        "kl": kl_per_unit.sum().item(),
        "kl_per_unit": kl_per_unit,
        "unit_activity": unit_activity(posterior.mean),
        "active_units": int(active_units(posterior.mean)),
        "means": posterior.mean,
    }


def mean_nearest_neighbour_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Average over samples of the L2 distance to the closest reference image: how data-like the samples are."""
    return torch.cdist(samples, reference).min(dim=1).values.mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# command line and plots


def example_parser(name: str, description: str, steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join("outputs", "examples", name), help="folder for the plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps, help="training steps per model")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a fraction of the steps (for tests / a first look)")
    return parser


def parse_example_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = max(200, args.steps // 4)
    os.makedirs(args.out, exist_ok=True)
    return args


def image_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """[N, 64] images in [0, 1] -> one [rows*9-1, nrow*9-1] array, 1-pixel gaps between digits."""
    images = images.detach().clamp(0, 1).reshape(-1, 8, 8).cpu().numpy()
    rows = -(-len(images) // nrow)
    grid = np.zeros((rows * 9 - 1, nrow * 9 - 1), dtype=np.float32)  # blank (white) gaps
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = image
    return grid


def show_grid(ax: plt.Axes, images: torch.Tensor, nrow: int, title: str) -> None:
    ax.imshow(image_grid(images, nrow), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def save_figure(fig: plt.Figure, out: str, filename: str) -> str:
    path = os.path.join(out, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
