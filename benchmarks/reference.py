"""The reference a peer would benchmark against: diffusers `AutoencoderKL` + `lpips.LPIPS` + `torch.optim.AdamW`.

Written plainly, the way the diffusers training example does it, with no speed tricks: default (contiguous) memory
format, fp32, eager mode, the default AdamW implementation, `zero_grad()` with its defaults. The LPIPS network is
frozen (`requires_grad_(False)`), as any sensible peer would, so the comparison is not won by skipping VGG weight
gradients that nobody needs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def with_block_types(architecture: dict[str, Any]) -> dict[str, Any]:
    """The architecture with one down/up block type per level, as diffusers' AutoencoderKL needs them spelt out."""
    levels = len(architecture.get("block_out_channels", [64]))
    return {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            **architecture}


def build_reference_vae(architecture: dict[str, Any]):
    """A diffusers AutoencoderKL with the given config (random init; load weights with `load_state_dict`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**architecture)


def build_reference_lpips(net: str = "vgg") -> torch.nn.Module:
    """lpips.LPIPS with a random backbone (offline) and the calibrated linear heads, frozen, in eval mode."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False)


def reference_training_step(vae, lpips_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            pixel_values: torch.Tensor, kl_weight: float = 1e-6, perceptual_weight: float = 1.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """One step: encode, sample, decode, L1 + LPIPS + KL, backward, AdamW step, zero_grad. Returns the loss."""
    posterior = vae.encode(pixel_values).latent_dist
    z = posterior.sample(generator=generator)
    reconstruction = vae.decode(z).sample
    rec_loss = torch.nn.functional.l1_loss(reconstruction, pixel_values)
    kl = posterior.kl().mean()
    loss = rec_loss + kl_weight * kl
    if perceptual_weight > 0:
        loss = loss + perceptual_weight * lpips_model(reconstruction, pixel_values).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def reference_gan_training_step(vae, lpips_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                discriminator: torch.nn.Module, d_optimizer: torch.optim.Optimizer,
                                pixel_values: torch.Tensor, kl_weight: float = 1e-6, perceptual_weight: float = 1.0,
                                disc_weight: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """One step past disc_start, as LDM / the diffusers example's GAN phase: the plain step's loss + the generator's
    hinge term -mean(D(x_hat)) scaled by LDM's adaptive weight (gradient norms at the decoder's last conv), AdamW step;
    then the discriminator's hinge loss on (x, detached x_hat) and its own optimizer's step, on the same batch.
    Returns the autoencoder's loss."""
    posterior = vae.encode(pixel_values).latent_dist
    z = posterior.sample(generator=generator)
    reconstruction = vae.decode(z).sample
    rec_loss = torch.nn.functional.l1_loss(reconstruction, pixel_values)
    if perceptual_weight > 0:
        rec_loss = rec_loss + perceptual_weight * lpips_model(reconstruction, pixel_values).mean()
    # The generator's pass leaves no gradient in the discriminator (Lightning's toggle_optimizer does the same in LDM).
    discriminator.requires_grad_(False)
    g_loss = -discriminator(reconstruction).mean()
    discriminator.requires_grad_(True)
    last_layer = vae.decoder.conv_out.weight
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
    loss = rec_loss + kl_weight * posterior.kl().mean() + disc_weight * d_weight * g_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    logits_real = discriminator(pixel_values)
    logits_fake = discriminator(reconstruction.detach())
    d_loss = 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
    d_loss.backward()
    d_optimizer.step()
    d_optimizer.zero_grad()
    return loss.detach()


@torch.no_grad()
def reference_encode(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Posterior mode (the latent a diffusion pipeline would cache)."""
    return vae.encode(pixel_values).latent_dist.mode()


@torch.no_grad()
def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents).sample


@torch.no_grad()
def reference_decode_tiled(vae, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' own tiling (tiles of `sample_size` pixels, 25% overlap); switched off again afterwards."""
    vae.enable_tiling()
    try:
        return vae.decode(latents).sample
    finally:
        vae.disable_tiling()
