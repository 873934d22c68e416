"""Prior sampling and latent interpolation: z ~ N(0, I) (optionally truncated), lerp and slerp between latents.

Pure tensor functions with no model and no files, below every command that draws or blends latents (the CLI's
`sample` and `interpolate`, the examples)."""

from __future__ import annotations

from typing import Sequence

import torch


def sample_prior(
    shape: Sequence[int],
    truncation: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """z ~ N(0, I) of `shape`; with `truncation`, entries with |z| > truncation are redrawn until all lie within.

    Rejection keeps each entry an exact truncated normal (unlike clamping, which piles mass on the bound).
    """
    if truncation is not None and truncation <= 0:
        raise ValueError(f"truncation must be > 0, got {truncation}")
    z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if truncation is None:
        return z
    outside = z.abs() > truncation
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator, device=device, dtype=dtype)
        outside = z.abs() > truncation
    return z


def _interpolation_weights(steps: int, like: torch.Tensor) -> torch.Tensor:
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both endpoints are included), got {steps}")
    return torch.linspace(0.0, 1.0, steps, device=like.device, dtype=torch.float64)


def lerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear interpolation from a to b, endpoints included: [steps, *a.shape]."""
    if a.shape != b.shape:
        raise ValueError(f"lerp endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    t = _interpolation_weights(steps, a).to(a.dtype).view(-1, *([1] * a.dim()))
    return a.unsqueeze(0) * (1 - t) + b.unsqueeze(0) * t


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation on the flattened vectors, endpoints included: [steps, *a.shape].

    Under a Gaussian prior, lerp midpoints have a smaller norm than typical samples; slerp follows the great
    circle (scaling the norm linearly between |a| and |b|). Nearly parallel endpoints fall back to lerp.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if torch.sin(omega).abs() < eps:
        return lerp(a, b, steps)
    t = _interpolation_weights(steps, a).unsqueeze(1)
    out = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    return out.to(a.dtype).view(steps, *a.shape)
