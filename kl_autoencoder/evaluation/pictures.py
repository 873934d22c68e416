"""The evaluation pictures of one model: reconstructions / worst (original | reconstruction | error), latent
histograms against N(0, 1) and posterior-mean channels. Plain functions of what orchestration.py measured; matplotlib
only draws (Agg, never a window), and every file is written atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from kl_autoencoder.durable import atomic_write


@dataclass
class ImageRecord:
    """What the pictures need of one image: its index, PSNR and uint8 original / reconstruction."""
    index: int
    psnr: float
    original: torch.Tensor
    reconstruction: torch.Tensor


class PictureSource(Protocol):
    """What `write_pictures` reads of one model's run (one_pass.ModelRun)."""
    name: str
    first: list[ImageRecord]
    worst: list[ImageRecord]
    latent_means: torch.Tensor | None
    scaled_latents: torch.Tensor | None


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.1))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display: never open a window
    import matplotlib.pyplot as plt

    return plt


RECONSTRUCTION_COLUMNS = ("original", "reconstruction", "|error|\n(mean RGB)")
MIN_COLUMN_INCHES = 1.6  # wide enough for the longest column label at 10 pt: small images are shown enlarged
ERROR_PERCENTILE = 99.0  # the error maps' colour scale ends here: at the worst pixel most maps would look black


def error_scale(errors: list[torch.Tensor], percentile: float = ERROR_PERCENTILE) -> tuple[float, float]:
    """(upper limit of the error colour scale, largest error): the `percentile`-th percentile of every pixel's error
    of every row, so a few bad pixels do not turn the rest black; the largest error where that is 0, else 1."""
    values = torch.cat([e.flatten() for e in errors]).double()
    largest = float(values.max())
    limit = float(torch.quantile(values, percentile / 100)) if values.numel() <= 16_000_000 else largest
    return (limit or largest or 1.0), largest


def plot_reconstructions(records: list[ImageRecord], labels: list[str], title: str):
    """Rows of original | reconstruction | |error| (mean over RGB, one colour scale for all rows).

    The error's colour scale ends at the 99th percentile of all shown pixels (`error_scale`), said on the colour
    bar with the largest error; brighter pixels saturate. `labels[i]` names image i (row labels). The rows are
    composed into one array and drawn on a single axes: many small axes are what makes matplotlib slow.
    """
    import matplotlib

    plt = _pyplot()
    errors = [(r.original.float() - r.reconstruction.float()).abs().mean(0) / 255 for r in records]
    vmax, largest = error_scale(errors)
    cmap = matplotlib.colormaps["magma"]
    rows = []
    for record, error in zip(records, errors):
        error_rgb = torch.from_numpy(cmap((error / vmax).clamp(max=1).numpy())[..., :3]).float()
        rows.append(torch.cat([record.original.permute(1, 2, 0).float() / 255,
                               record.reconstruction.permute(1, 2, 0).float() / 255, error_rgb], dim=1))
    grid = torch.cat(rows, dim=0).numpy()
    size = records[0].original.shape[-1]
    dpi = 100  # about one screen pixel per image pixel from 160 px up, so artefacts stay visible
    column = max(size / dpi, MIN_COLUMN_INCHES)
    fig, ax = plt.subplots(figsize=(3 * column + 2.8, len(records) * column + 1.2), dpi=dpi, layout="constrained")
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([size * 0.5, size * 1.5, size * 2.5], RECONSTRUCTION_COLUMNS)
    ax.set_yticks([size * (i + 0.5) for i in range(len(records))],
                  [f"{labels[r.index][:28]}\n{r.psnr:.2f} dB" for r in records], fontsize=8)
    ax.tick_params(length=0)
    shown = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, vmax), cmap=cmap)
    fig.colorbar(shown, ax=ax, fraction=0.05, extend="max" if largest > vmax else "neither",
                 label=f"|error| (0..1); scale ends at the {ERROR_PERCENTILE:g}th percentile, {vmax:.3g}\n"
                       f"(largest {largest:.3g}: brighter pixels saturate)")
    ax.set_title(title)
    return fig


def plot_latent_histograms(scaled: torch.Tensor, title: str):
    """Histogram of each channel's diffusion-scaled latents against the standard normal density."""
    plt = _pyplot()
    channels = scaled.shape[1]
    cols = min(channels, 4)
    rows = math.ceil(channels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    grid = torch.linspace(-4, 4, 200)
    pdf = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    for c, ax in enumerate(axes.flat):
        if c >= channels:
            ax.axis("off")
            continue
        values = scaled[:, c].numpy()
        ax.hist(values, bins=60, range=(-4, 4), density=True, alpha=0.6, label="latents")
        ax.plot(grid.numpy(), pdf.numpy(), "k--", lw=1, label="N(0, 1)")
        ax.set_title(f"channel {c}: mean {values.mean():+.2f} std {values.std():.2f}", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_latent_channels(means: torch.Tensor, labels: list[str], title: str):
    """Posterior-mean channels of a few images, one row per image, each channel with its own colour scale.

    The image's label names its row (whole, on two lines: name and split) and "channel c" its column, so no title
    has to share a 2-inch panel with another."""
    plt = _pyplot()
    n, channels = means.shape[:2]
    fig, axes = plt.subplots(n, channels, figsize=(1.8 * channels + 1.4, 1.8 * n + 0.8), squeeze=False,
                             layout="constrained")
    for i in range(n):
        for c in range(channels):
            ax = axes[i, c]
            ax.imshow(means[i, c].numpy(), cmap="RdBu_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"channel {c}", fontsize=8)
        label = labels[i] if len(labels[i]) <= 40 else labels[i][:39] + "…"
        axes[i, 0].set_ylabel(label.replace(" (", "\n("), fontsize=8)
    fig.suptitle(title)
    return fig


def image_labels(names: list[str], splits: dict[str, list[int]]) -> list[str]:
    """Short per-image labels for pictures: the file name, with its split when there are several."""
    labels = [Path(name).name for name in names]
    if len(splits) > 1:
        for split, indices in splits.items():
            for i in indices:
                labels[i] = f"{labels[i]} ({split})"
    return labels


def write_pictures(run: PictureSource, labels: list[str], folder: Path) -> dict[str, str]:
    """The four pictures of one model; returns {kind: path relative to the output folder}."""
    from kl_autoencoder.outputs import safe_parent

    safe_parent(folder.parent, folder / "reconstructions.png")  # at write time: never through a planted symlink
    pictures = {"reconstructions": plot_reconstructions(run.first, labels, f"{run.name}: first images")}
    if run.scaled_latents is not None:  # not for a tiny autoencoder (no posterior)
        pictures["latent_histograms"] = plot_latent_histograms(run.scaled_latents,
                                                               f"{run.name}: scaled latents vs N(0, 1)")
        pictures["latent_channels"] = plot_latent_channels(run.latent_means, labels, f"{run.name}: posterior means")
    if run.worst:
        pictures["worst"] = plot_reconstructions(run.worst, labels, f"{run.name}: lowest PSNR")
    written = {}
    for kind, fig in pictures.items():
        save_figure(fig, folder / f"{kind}.png")
        written[kind] = f"{folder.name}/{kind}.png"
    return written
