"""The training objective of the KL autoencoder, LDM's way: every term a small pure function, composed here.

    weights = loss_weights_at(cfg.loss, step)                    # KL warm-up and GAN switch-on for this step
    loss, logs, reconstruction = autoencoder_loss(model, x, weights, perceptual, discriminator, logvar, last_layer)
    d_loss, d_logs = discriminator_loss(discriminator, x, reconstruction, weights.gan_loss)

The convention is CompVis LDM's (`contperceptual.py`), which sgm and diffusers' train_autoencoderkl.py share, so
hyper-parameters from their configs mean the same here:

    nll  = sum over C, H, W of (pixel_weight * |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)) / exp(logvar) + logvar,
           divided by the batch size (`reconstruction_nll`; |.| or (.)^2; LPIPS, one number per image, is added at
           every pixel as LDM broadcasts it; logvar is 0 unless learned)
    kl   = KL(q(z|x) || N(0, I)) summed over latent dimensions, divided by the batch size (`kl_loss`)
    loss = nll + kl_weight * kl + gan_weight * adaptive_gan_weight(nll, g, last_layer) * generator_loss(D(x_hat))

EQ-VAE (Kouzelis et al. 2025): on the steps that draw a transform tau, the pair (x, x_hat) is (tau(x), decode(tau(z)))
and the same loss applies to it (`EquivarianceTransform`; the trainer draws tau with loss.equivariance.probability).

Both sums grow with the image area, so the balance of the terms does not change with the training resolution.
`loss.free_bits` is in nats per latent element (the per-channel budget is free_bits * latent H * W).
`pixel_loss` (a per-element mean) is what logs and the simpler examples report.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kl_autoencoder.backbones import (TORCHVISION_WEIGHTS, BackboneWeightsError,  # noqa: F401
                                  backbone_checkpoint, load_lpips_backbone)


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Pixel and KL terms.


def pixel_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1",
               logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 or L2 reconstruction error; with a learned scalar `logvar`, the LDM NLL form rec / exp(logvar) + logvar.

    The NLL form treats the error as the negative log-likelihood of a Laplace (l1) or Gaussian (l2) decoder whose
    scale is learned, so the balance between reconstruction and the other terms adapts during training.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"pixel_loss: reconstruction shape {tuple(reconstruction.shape)} != target shape "
                         f"{tuple(target.shape)}")
    diff = reconstruction.float() - target.float()
    if kind == "l1":
        error = diff.abs()
    elif kind == "l2":
        error = diff.pow(2)
    else:
        raise ValueError(f"pixel_loss: kind must be 'l1' or 'l2', got {kind!r}")
    if logvar is None:
        return error.mean()
    return (error / torch.exp(logvar) + logvar).mean()


def reconstruction_nll(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1",
                       pixel_weight: float = 1.0, perceptual: torch.Tensor | None = None,
                       perceptual_weight: float = 0.0, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """LDM's reconstruction NLL: sum over C, H, W of (pixel_weight * error + perceptual_weight * perceptual)
    / exp(logvar) + logvar, averaged over the batch.

    `perceptual` holds one distance per image ([B] or [B, 1, 1, 1], e.g. LPIPS), added at every pixel as LDM does.
    """
    error_sum = _pixel_error_sum(reconstruction, target, kind, "reconstruction_nll")
    return _nll_from_sums(error_sum, reconstruction[0].numel(), reconstruction.shape[0], pixel_weight, perceptual,
                          perceptual_weight, logvar)


def _pixel_error_sum(reconstruction: torch.Tensor, target: torch.Tensor, kind: str, caller: str) -> torch.Tensor:
    """Sum over every element of |x - x_hat| (l1) or (x - x_hat)^2 (l2), in fp32."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"{caller}: reconstruction shape {tuple(reconstruction.shape)} != target shape "
                         f"{tuple(target.shape)}")
    if kind not in ("l1", "l2"):
        raise ValueError(f"{caller}: kind must be 'l1' or 'l2', got {kind!r}")
    diff = reconstruction.float() - target.float()
    return (diff.abs() if kind == "l1" else diff.pow(2)).sum()


def _nll_from_sums(error_sum: torch.Tensor, per_image: int, batch: int, pixel_weight: float,
                   perceptual: torch.Tensor | None, perceptual_weight: float, logvar: torch.Tensor | None,
                   weighted_chroma_sum: torch.Tensor | None = None) -> torch.Tensor:
    """reconstruction_nll from the summed pixel error. LDM adds each image's perceptual distance at each of its
    `per_image` elements and divides every element by exp(logvar): summed, that is per_image * distance and one
    division of the total, so the image-sized tensor of LDM's form is never built (same value up to float rounding).
    """
    total = pixel_weight * error_sum
    if weighted_chroma_sum is not None:  # a pixel-level error like the pixel term, so it shares its likelihood
        total = total + weighted_chroma_sum
    if perceptual is not None and perceptual_weight > 0:
        total = total + perceptual_weight * per_image * perceptual.float().reshape(-1).expand(batch).sum()
    if logvar is not None:
        total = total / torch.exp(logvar) + (batch * per_image) * logvar
    return total / batch


# BT.601's Cb and Cr rows: the two opponent colour axes (blue-yellow, red-cyan) of gamma-encoded RGB, brightness out.
CHROMA_AXES = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def chroma_error_sum(reconstruction: torch.Tensor, target: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """Squared error of the two chroma axes (`CHROMA_AXES`) of scale x scale block means, summed and counted once per
    pixel it covers (x scale^2), so it adds to the pixel term's sum on the same footing.

    Why: under a plain pixel loss the colour that varies least in the training photos is the cheapest thing for a
    small latent to drop (the green-magenta axis went first); colour at 1/8 of the resolution is nearly all a
    viewer sees of it, and costs the latent little. Block means are linear, so this is the chroma of the pooled error.
    """
    diff = reconstruction.float() - target.float()
    if scale > 1:
        diff = F.avg_pool2d(diff, scale)
    axes = torch.tensor(CHROMA_AXES, dtype=diff.dtype, device=diff.device)
    chroma = torch.einsum("kc,bchw->bkhw", axes, diff)
    return chroma.pow(2).sum() * (scale * scale)


def kl_loss(posterior, free_bits: float = 0.0) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) in nats per sample, summed over latent dimensions and averaged over the batch.

    With `free_bits` > 0, each channel's KL (summed over H, W and averaged over the batch) is clamped below at
    `free_bits` nats before summing over channels (Kingma et al. 2016, "Improving VI with IAF"): a channel under its
    budget gets no gradient, so the optimizer stops squeezing it into the prior and it is not driven to collapse.
    For [B, D] posteriors each dimension is a channel.
    """
    if not (math.isfinite(free_bits) and free_bits >= 0.0):
        raise ValueError(f"kl_loss: free_bits must be a finite number >= 0, got {free_bits!r}")
    if free_bits == 0.0:
        return posterior.kl().mean()
    per_channel = posterior.kl_per_channel().mean(dim=0)
    return per_channel.clamp(min=free_bits).sum()


KL_SCHEDULES = ("linear", "cyclical", "constant")


def kl_weight_at(step: int, kl_weight: float, warmup_steps: int = 0, schedule: str = "linear",
                 cycle_steps: int | None = None) -> float:
    """The KL weight at optimizer step `step`.

    linear:    ramps 0 -> kl_weight over `warmup_steps`, then holds (no ramp when warmup_steps == 0).
    cyclical:  Fu et al. 2019: in each cycle of `cycle_steps`, ramps 0 -> kl_weight over `warmup_steps`
               (default: the first half of the cycle), then holds for the rest of the cycle.
    constant:  kl_weight at every step.
    """
    if schedule not in KL_SCHEDULES:
        raise ValueError(f"kl_weight_at: schedule must be one of {KL_SCHEDULES}, got {schedule!r}")
    if step < 0:
        raise ValueError(f"kl_weight_at: step must be >= 0, got {step}")
    if not (math.isfinite(kl_weight) and kl_weight >= 0.0):
        raise ValueError(f"kl_weight_at: kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if warmup_steps < 0:
        raise ValueError(f"kl_weight_at: warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "cyclical" and cycle_steps is not None:
        raise ValueError(f"kl_weight_at: cycle_steps={cycle_steps} is only used by schedule='cyclical', "
                         f"not {schedule!r}")

    if schedule == "constant":
        if warmup_steps:
            raise ValueError(f"kl_weight_at: schedule='constant' has no warm-up, got warmup_steps={warmup_steps}; "
                             "use schedule='linear'")
        return float(kl_weight)
    if schedule == "linear":
        ramp, position = warmup_steps, step
    else:
        if cycle_steps is None or cycle_steps < 2:
            raise ValueError(f"kl_weight_at: schedule='cyclical' needs cycle_steps >= 2, got {cycle_steps!r}")
        ramp = warmup_steps if warmup_steps else cycle_steps // 2
        if ramp > cycle_steps:
            raise ValueError(f"kl_weight_at: warmup_steps={warmup_steps} exceeds cycle_steps={cycle_steps}")
        position = step % cycle_steps
    if ramp == 0:
        return float(kl_weight)
    return float(kl_weight) * min(1.0, position / ramp)


# --------------------------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS).

# The backbone's weights are read in backbones.py only (weights_only=True; never torchvision's own pickle loader).
_TORCHVISION_WEIGHTS = TORCHVISION_WEIGHTS


class PerceptualWeightsError(BackboneWeightsError, RuntimeError):
    """The pretrained LPIPS backbone could not be loaded; the message names the file and where to put it."""


def _load_backbone(lpips_model: nn.Module, net: str) -> None:
    """torchvision's ImageNet weights into lpips' backbone (downloaded when missing), or a clear error."""
    try:
        load_lpips_backbone(lpips_model, net, download=True)
    except BackboneWeightsError as error:
        raise PerceptualWeightsError(f"Could not load the pretrained {net} backbone for LPIPS: {error}; or train "
                                     "without it: loss.perceptual_weight=0 (no perceptual term) or "
                                     f"loss.perceptual_pretrained=false (a random {net}: the term is not "
                                     "perceptual)") from error


def _freeze_as_buffers(module: nn.Module) -> None:
    """Turn every parameter and buffer into a non-persistent buffer.

    A frozen loss network then has no parameters (nothing for an optimizer, DDP or a grad-norm to pick up) and an
    empty state_dict (the ~59 MB of VGG16 features never land in a checkpoint), while `.to(device)` still moves it.
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach(), persistent=False)
        for name, buffer in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(name, buffer, persistent=False)


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance between images in [-1, 1], differentiable w.r.t. its inputs, with a frozen network.

    pretrained: True loads the ImageNet backbone (torchvision's file in torch.hub's cache; downloaded if missing, a
    clear error offline); False uses a random backbone (tests); "auto" tries True and falls back to random with a
    loud warning. The linear heads are always the calibrated LPIPS v0.1 ones that ship in the lpips package.

    The module is frozen and stays in eval mode (`.train()` is a no-op). It holds no parameters and an empty
    state_dict: move it with `.to(device)`, but do not pass it to `accelerator.prepare` (DDP refuses a module
    without trainable parameters, and there is nothing to synchronize).
    """

    def __init__(self, net: str = "vgg", pretrained: bool | str = "auto"):
        super().__init__()
        if pretrained not in (True, False, "auto"):
            raise ValueError(f"PerceptualLoss: pretrained must be True, False or 'auto', got {pretrained!r}")
        if net not in _TORCHVISION_WEIGHTS:
            raise ValueError(f"PerceptualLoss: net must be one of {tuple(_TORCHVISION_WEIGHTS)}, got {net!r}")
        import lpips

        with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' notes from inside lpips
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: we load the backbone ourselves, for a clear offline error and a weights_only load.
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self.net = net
        self.pretrained_loaded = False
        if pretrained is True:
            _load_backbone(self.lpips, net)
            self.pretrained_loaded = True
        elif pretrained == "auto":
            try:
                _load_backbone(self.lpips, net)
                self.pretrained_loaded = True
            except PerceptualWeightsError as error:
                message = (f"PerceptualLoss: FALLING BACK TO A RANDOM {net} BACKBONE; the LPIPS loss will not be "
                           f"perceptual. {error}")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                logger.warning(message)
        _freeze_as_buffers(self)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # Always eval: lpips' heads carry dropout, and a frozen metric must not change with the trainer's mode.
        return super().train(False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance over the batch."""
        return self.distances(reconstruction, target).mean()

    def distances(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of each image pair, [B]."""
        # float32 with autocast off: LPIPS divides each feature vector by its L2 norm (eps 1e-10) and compares
        # nearly equal unit vectors; in fp16 the squared VGG activations overflow and eps underflows (inf/NaN), in
        # bf16 the 8-bit mantissa turns the small differences of a good reconstruction into rounding noise.
        # Not under no_grad: the gradient must reach `reconstruction` (the diffusers example's bug).
        if self.lpips.scaling_layer.shift.dtype != torch.float32:
            raise RuntimeError("PerceptualLoss runs in float32; move it with .to(device) only, not .to(dtype)/.half()")
        with torch.autocast(device_type=reconstruction.device.type, enabled=False):
            return lpips_distances(self.lpips, reconstruction.float(), target.float())


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """lpips.normalize_tensor: each feature vector over channels divided by (its L2 norm + eps); one reciprocal on
    the [B, 1, H, W] norms and a multiply, not a division over the whole feature map."""
    return features * (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps).reciprocal()


def lpips_distances(model: nn.Module, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """lpips.LPIPS(version 0.1, eval, not spatial)(reconstruction, target) as a [B] tensor, with less work per call.

    Same math (float tolerance; tests/test_losses.py compares it with the lpips package): the target's features are
    computed without autograd when it needs no gradient, the unit-normalisation multiplies by one reciprocal per
    position, and each head is its bare 1x1 conv (dropout is off in eval). The conv head is kept on purpose: in NHWC
    its backward hands VGG a gradient in VGG's own layout; a spatial mean first, then a dot product with the head's
    weights (fewer FLOPs) measured 1.2x slower on CPU for that reason (BENCHMARKS.md).
    """
    if model.version != "0.1" or model.spatial or not model.lpips or model.training:
        raise ValueError("lpips_distances: needs an lpips.LPIPS of version 0.1 with lpips=True, spatial=False, in "
                         "eval mode")
    scale = model.scaling_layer
    with torch.no_grad() if not target.requires_grad else nullcontext():
        targets = [_unit_channels(f) for f in model.net((target - scale.shift) / scale.scale)]
    features = model.net((reconstruction - scale.shift) / scale.scale)
    total = None
    for head, feature, goal in zip(model.lins, features, targets):
        distance = F.conv2d((_unit_channels(feature) - goal).pow(2), head.model[-1].weight).mean(dim=(2, 3))
        total = distance if total is None else total + distance
    return total.reshape(-1)


# --------------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator and adversarial terms.


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """The pix2pix / LDM N-layer PatchGAN: a map of real/fake logits, one per overlapping patch.

    `num_layers` stride-2 4x4 convs, a stride-1 conv, then a 1-channel 4x4 conv; a 256px input gives 30x30 logits,
    each seeing a 70x70 patch (num_layers=3). `norm`:
      "group" (default): GroupNorm, batch-independent, so the discriminator is the same function on any number of
              devices and for any batch; real and reconstructed batches, which the step passes separately, are not
              told apart by their batch statistics.
      "batch": LDM's BatchNorm. Its statistics are per call and per device: under DDP each rank normalises its own
              small real-only and fake-only batches, and the generator's pass moves the running statistics.
      "none":  no normalization (convs get biases).
    A state saved with one norm does not load into another (BatchNorm carries running statistics): the error says
    which `loss.gan.disc_norm` the checkpoint needs.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"PatchDiscriminator: norm must be 'batch', 'group' or 'none', got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"PatchDiscriminator: num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        bias = norm == "none"  # a norm layer right after the conv makes its bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, num_layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=bias), _norm_layer(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.norm = norm
        self.apply(_init_weights)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # Runs before LDM's default (BatchNorm) was replaced by GroupNorm saved running statistics; say so plainly
        # instead of listing unexpected keys.
        saved = "batch" if any(k.endswith("running_mean") for k in state_dict) else None
        if saved is None and self.norm == "batch":
            saved = "group or none"
        if saved is not None and saved != self.norm and strict:
            raise RuntimeError(f"the saved discriminator uses norm {saved!r} but this one uses {self.norm!r}: resume "
                               f"with loss.gan.disc_norm={saved.split()[0]} (runs before GroupNorm became the default "
                               "used BatchNorm), or start a fresh run")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # num_layers halvings, then two 4x4 stride-1 convs that each remove one pixel.
        min_size = 3 * 2 ** self.num_layers
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"PatchDiscriminator: input {tuple(x.shape[-2:])} is smaller than {min_size}px "
                             f"(num_layers={self.num_layers}); use fewer layers or larger images")
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """LDM / DCGAN init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def non_saturating_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator binary cross-entropy on logits: 0.5 * (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(x_hat)))])."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator (decoder) adversarial loss: hinge -E[D(x_hat)] (as LDM), non_saturating E[-log sigmoid(D(x_hat))]."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"generator_loss: kind must be 'hinge' or 'non_saturating', got {kind!r}")


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, output: torch.Tensor | None = None) -> torch.Tensor:
    """LDM / VQGAN adaptive weight ||d rec / d W|| / (||d gan / d W|| + 1e-4), clamped to [0, max_weight], detached.

    W is the decoder's last layer weight (pass the parameter tensor itself, e.g. `model.last_decoder_layer` of the
    unwrapped model: under DDP it is the same tensor). Both graphs are retained for the backward pass that follows.
    Under DDP each rank computes its own (local) weight, as LDM does.

    `output` (the decoder's output that both losses were computed from, as an fp32 tensor) keeps the weight exact
    under fp16 autocast: the gradients w.r.t. `output` are fp32 (the losses are), and the last step back to W, which
    autocast runs in fp16, is taken on each gradient divided by its norm, then scaled back in fp32. A small
    generator gradient would otherwise underflow to 0 there, pinning the weight at `max_weight`, and a large one
    overflow. The norm is linear in the gradient, so the result is the same. (autoencoder_loss also runs the
    generator's discriminator pass in fp32, so the gradient w.r.t. `output` never passes through fp16.)
    """
    if not last_layer.requires_grad:
        raise RuntimeError("adaptive_gan_weight: last_layer does not require grad (is the decoder frozen?); "
                           "disable the adaptive weight or unfreeze the decoder's last layer")
    for name, loss in (("rec_loss", rec_loss), ("gan_loss", gan_loss)):
        if not loss.requires_grad:
            raise RuntimeError(f"adaptive_gan_weight: {name} has no graph (computed under no_grad?)")
    norms = []
    for name, loss in (("rec_loss", rec_loss), ("gan_loss", gan_loss)):
        grad = _last_layer_grad_norm(loss, last_layer, output)
        if grad is None:
            raise RuntimeError(f"adaptive_gan_weight: {name} does not depend on last_layer; pass the weight of the "
                               "decoder's output conv (model.last_decoder_layer) used to produce the reconstruction")
        norms.append(grad)
    weight = norms[0] / (norms[1] + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _last_layer_grad_norm(loss: torch.Tensor, last_layer: torch.Tensor, output: torch.Tensor | None
                          ) -> torch.Tensor | None:
    """||d loss / d last_layer|| in fp32 (None when the loss does not reach last_layer); see adaptive_gan_weight."""
    if output is None:
        grad = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0]
        return None if grad is None else grad.float().norm()
    upstream = torch.autograd.grad(loss, output, retain_graph=True, allow_unused=True)[0]
    if upstream is None:
        return None
    size = upstream.float().norm()
    unit = upstream / size.clamp(min=torch.finfo(torch.float32).tiny)
    grad = torch.autograd.grad(output, last_layer, grad_outputs=unit, retain_graph=True, allow_unused=True)[0]
    return None if grad is None else grad.float().norm() * size


# --------------------------------------------------------------------------------------------------------------------
# The composition: the loss mix at a step, the autoencoder's loss, the discriminator's loss.


class LearnedLogVar(nn.Module):
    """LDM's learned scalar log-variance of the reconstruction likelihood (a module so it is checkpointed)."""

    def __init__(self, initial: float = 0.0):
        super().__init__()
        self.value = nn.Parameter(torch.full((), float(initial)))


@dataclass
class LossWeights:
    """The loss mix at one step (the KL and GAN weights already scheduled for that step)."""

    pixel: str = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    free_bits: float = 0.0
    chroma_weight: float = 0.0
    chroma_scale: int = 8
    gan_weight: float = 0.0  # 0 = no adversarial term at this step
    train_discriminator: bool = False  # the discriminator learns at this step (from disc_start, warm-up included)
    gan_loss: str = "hinge"
    adaptive_gan_weight: bool = True


def loss_weights_at(loss_cfg: Any, step: int) -> LossWeights:
    """The loss mix of a `LossConfig` at optimizer step `step` (0-based): KL schedule, the GAN switch-on at
    disc_start and its warm-up (the generator's weight linear from 0 at disc_start to disc_weight
    disc_warmup_steps later; the discriminator trains throughout)."""
    gan = loss_cfg.gan
    gan_on = gan.enabled and step >= gan.disc_start
    ramp = min(1.0, (step - gan.disc_start) / gan.disc_warmup_steps) if gan.disc_warmup_steps else 1.0
    cycle = loss_cfg.kl_cycle_steps if loss_cfg.kl_schedule == "cyclical" else None
    return LossWeights(
        pixel=loss_cfg.pixel,
        pixel_weight=loss_cfg.pixel_weight,
        perceptual_weight=loss_cfg.perceptual_weight,
        kl_weight=kl_weight_at(step, loss_cfg.kl_weight, loss_cfg.kl_warmup_steps, loss_cfg.kl_schedule, cycle),
        free_bits=loss_cfg.free_bits,
        chroma_weight=loss_cfg.chroma_weight,
        chroma_scale=loss_cfg.chroma_scale,
        gan_weight=gan.disc_weight * ramp if gan_on else 0.0,
        train_discriminator=gan_on,
        gan_loss=loss_cfg.gan.disc_loss,
        adaptive_gan_weight=loss_cfg.gan.adaptive_weight,
    )


@dataclass(frozen=True)
class EquivarianceTransform:
    """EQ-VAE's tau for one step, the same map for the latent and the image: resize to `latent_size` (the image to
    `latent_size` x `factor`, the downsampling factor; bilinear, align_corners=False, as EQ-VAE's code), then turn
    by `quarter_turns` x 90 degrees. So decode(tau(z)) and tau(x) have the same shape.

    `on_input` (EQ-VAE's low-resolution prior preservation, p_prior_s): the model encodes and decodes tau(x) itself,
    the plain pair at a lower resolution; no latent is transformed."""

    latent_size: tuple[int, int] | None  # (h, w) after the downscale; None = no downscale
    quarter_turns: int = 0  # 0-3
    factor: int = 8
    on_input: bool = False

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        return self._apply(z, self.latent_size)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        size = None if self.latent_size is None else (self.latent_size[0] * self.factor,
                                                      self.latent_size[1] * self.factor)
        return self._apply(x, size)

    def _apply(self, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        if size is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.rot90(x, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns % 4 else x


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily turn off requires_grad of a module's parameters (restored afterwards)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def autoencoder_loss(
    model: nn.Module,
    pixel_values: torch.Tensor,
    weights: LossWeights,
    perceptual: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    logvar: torch.Tensor | None = None,
    last_layer: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    transform: EquivarianceTransform | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Forward + the whole autoencoder objective. Returns (loss, logs of detached fp32 scalars, reconstruction).

    `model` is whatever the caller trains through (a DDP wrapper included); `discriminator` is the bare module (its
    parameters are frozen for this pass, so the generator's loss leaves no gradient in it); `last_layer` is the
    decoder's output weight, needed for the adaptive GAN weight. The reconstruction and every term are fp32 whatever
    the autocast dtype. Nothing here syncs with the host.

    `transform` (EQ-VAE): the training pair (x, decode(z)) is replaced by (tau(x), decode(tau(z))), z the plain
    image's posterior sample, and the whole loss (pixel, perceptual, GAN; KL of the plain posterior) applies to it.
    The reconstruction returned is then decode(tau(z)); its target, for the discriminator, is transform.image(x).
    A transform `on_input` replaces x by tau(x) and the pair is the plain one: (tau(x), decode(encode(tau(x)))).
    """
    if transform is not None and transform.on_input:
        pixel_values, transform = transform.image(pixel_values), None
    extra = {} if transform is None else {"latent_transform": transform.latent}
    reconstruction, posterior = model(pixel_values, sample=True, generator=generator, **extra)
    reconstruction = reconstruction.float()
    target = pixel_values.float() if transform is None else transform.image(pixel_values.float())
    # One pass over the pixels for the loss and its log (the log is pixel_loss's mean of the same error).
    error_sum = _pixel_error_sum(reconstruction, target, weights.pixel, "autoencoder_loss")
    logs: dict[str, torch.Tensor] = {"pixel": error_sum.detach() / reconstruction.numel()}
    chroma_sum = None
    if weights.chroma_weight > 0:
        chroma_sum = weights.chroma_weight * chroma_error_sum(reconstruction, target, weights.chroma_scale)
        logs["chroma"] = chroma_sum.detach() / reconstruction.numel()
    distances = None
    if perceptual is not None and weights.perceptual_weight > 0:
        distances = perceptual.distances(reconstruction, target)
        logs["perceptual"] = distances.detach().mean()
    rec = _nll_from_sums(error_sum, reconstruction[0].numel(), reconstruction.shape[0], weights.pixel_weight,
                         distances, weights.perceptual_weight, logvar, chroma_sum)
    latent_positions = posterior.mean[0, 0].numel() if posterior.mean.dim() == 4 else 1
    kl = kl_loss(posterior, free_bits=weights.free_bits * latent_positions)
    loss = rec + weights.kl_weight * kl
    logs.update(kl=kl.detach(), rec=rec.detach())
    if logvar is not None:
        logs["logvar"] = logvar.detach().float()
    if discriminator is not None and weights.gan_weight > 0:
        term, gan_logs = adversarial_term(reconstruction, rec, weights, discriminator, last_layer)
        loss = loss + term
        logs.update(gan_logs)
    logs["loss"] = loss.detach()
    return loss, logs, reconstruction


def adversarial_term(reconstruction: torch.Tensor, rec: torch.Tensor, weights: LossWeights, discriminator: nn.Module,
                     last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's adversarial term, gan_weight x d_weight x generator_loss(D(reconstruction)), and its logs.

    `rec` is the reconstruction loss the adaptive weight balances against (at `last_layer`, the decoder's output
    weight); `discriminator` the bare module, frozen for this pass so the term leaves no gradient in it.
    """
    # fp32 whatever the autocast dtype: the generator's gradient comes back through the discriminator, and in
    # fp16 it can underflow before it reaches the decoder (and the adaptive weight with it).
    with frozen(discriminator), torch.autocast(device_type=reconstruction.device.type, enabled=False):
        g_loss = generator_loss(discriminator(reconstruction).float(), kind=weights.gan_loss)
    if weights.adaptive_gan_weight:
        if last_layer is None:
            raise ValueError("the adaptive GAN weight needs last_layer, the decoder's output weight "
                             "(model.last_decoder_layer)")
        d_weight = adaptive_gan_weight(rec, g_loss, last_layer, output=reconstruction)
    else:
        d_weight = torch.ones((), device=reconstruction.device)
    return weights.gan_weight * d_weight * g_loss, {"g_loss": g_loss.detach(), "d_weight": d_weight.detach()}


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on detached real and reconstructed images."""
    logits_real = discriminator(real.detach()).float()
    logits_fake = discriminator(fake.detach()).float()
    loss_fn = hinge_d_loss if kind == "hinge" else non_saturating_d_loss
    loss = loss_fn(logits_real, logits_fake)
    return loss, {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                  "logits_fake": logits_fake.detach().mean()}
