"""Tests for kl_autoencoder.losses against torch.nn.functional, torch.distributions, lpips and hand-computed values."""

import math
import os
import urllib.error
import warnings

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.distributions import Normal, kl_divergence

from kl_autoencoder.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    backbone_checkpoint,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    kl_weight_at,
    non_saturating_d_loss,
    pixel_loss,
)
from kl_autoencoder.model import DiagonalGaussian


def _pair(shape=(2, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1


# -- pixel ----------------------------------------------------------------------------------------------------------


def test_pixel_loss_matches_torch_references():
    x_hat, x = _pair()
    torch.testing.assert_close(pixel_loss(x_hat, x, "l1"), F.l1_loss(x_hat, x))
    torch.testing.assert_close(pixel_loss(x_hat, x, "l2"), F.mse_loss(x_hat, x))
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        pixel_loss(x_hat, x, "l3")
    with pytest.raises(ValueError, match="shape"):
        pixel_loss(x_hat, x[:1], "l1")


def test_pixel_nll_form_and_its_optimal_logvar():
    x_hat, x = _pair()
    logvar = torch.tensor(0.7, requires_grad=True)
    mean_abs = (x_hat - x).abs().mean().item()
    loss = pixel_loss(x_hat, x, "l1", logvar=logvar)
    assert loss.item() == pytest.approx(mean_abs * math.exp(-0.7) + 0.7, rel=1e-6)
    # d/dlogvar [e * exp(-s) + s] = 1 - e * exp(-s): zero at s = log(e), the maximum-likelihood scale.
    loss.backward()
    assert logvar.grad.item() == pytest.approx(1 - mean_abs * math.exp(-0.7), rel=1e-5)
    optimal = torch.tensor(math.log(mean_abs), requires_grad=True)
    pixel_loss(x_hat, x, "l1", logvar=optimal).backward()
    assert abs(optimal.grad.item()) < 1e-5


# -- KL -------------------------------------------------------------------------------------------------------------


def _posterior(shape=(2, 3, 2, 2), seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mean = (torch.rand(shape, generator=g) * 2 - 1).requires_grad_(requires_grad)
    logvar = (torch.rand(shape, generator=g) * 2 - 1).requires_grad_(requires_grad)
    return mean, logvar


def test_kl_loss_matches_closed_form_and_monte_carlo():
    mean, logvar = _posterior()
    loss = kl_loss(DiagonalGaussian(mean=mean, logvar=logvar))
    std = torch.exp(0.5 * logvar)
    closed = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss, closed)
    # Monte-Carlo: E_q[log q(z) - log p(z)].
    g = torch.Generator().manual_seed(1)
    z = mean + std * torch.randn((40000, *mean.shape), generator=g)
    log_ratio = Normal(mean, std).log_prob(z) - Normal(0.0, 1.0).log_prob(z)
    estimate = log_ratio.flatten(2).sum(2).mean()
    assert loss.item() == pytest.approx(estimate.item(), rel=0.02)


def test_kl_loss_for_mlp_posterior():
    mean, logvar = _posterior(shape=(4, 5))
    closed = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1).mean()
    posterior = DiagonalGaussian(mean=mean, logvar=logvar)
    torch.testing.assert_close(kl_loss(posterior), closed)
    # A budget below every dimension's KL changes nothing.
    torch.testing.assert_close(kl_loss(posterior, free_bits=1e-6), closed)


def test_free_bits_stop_gradient_below_budget_only():
    # logvar = 0, so channel c's KL is 0.5 * sum(mean_c^2): channel 0 ~ 0.5 * 4 * 4 = 8 nats, channel 1 ~ 0.02 nats.
    mean = torch.zeros(2, 2, 2, 2)
    mean[:, 0] = 2.0
    mean[:, 1] = 0.1
    mean.requires_grad_(True)
    logvar = torch.zeros_like(mean, requires_grad=True)
    loss = kl_loss(DiagonalGaussian(mean=mean, logvar=logvar), free_bits=1.0)
    assert loss.item() == pytest.approx(8.0 + 1.0)
    loss.backward()
    assert torch.all(mean.grad[:, 0] != 0)
    assert torch.all(mean.grad[:, 1] == 0) and torch.all(logvar.grad[:, 1] == 0)
    with pytest.raises(ValueError, match="free_bits"):
        kl_loss(DiagonalGaussian(mean=mean, logvar=logvar), free_bits=-1.0)


def test_kl_weight_schedules():
    assert [kl_weight_at(s, 1e-6, 100) for s in (0, 50, 100, 1000)] == pytest.approx([0, 5e-7, 1e-6, 1e-6])
    assert kl_weight_at(0, 0.5) == 0.5  # linear without warm-up
    assert kl_weight_at(7, 0.5, schedule="constant") == 0.5
    cyc = [kl_weight_at(s, 1.0, schedule="cyclical", cycle_steps=100) for s in (0, 25, 50, 99, 100, 125, 250)]
    assert cyc == pytest.approx([0, 0.5, 1, 1, 0, 0.5, 1])
    assert kl_weight_at(110, 1.0, 20, schedule="cyclical", cycle_steps=100) == pytest.approx(0.5)
    for kwargs, match in [
        (dict(schedule="cosine"), "schedule"),
        (dict(schedule="cyclical"), "cycle_steps"),
        (dict(schedule="cyclical", cycle_steps=10, warmup_steps=20), "exceeds"),
        (dict(schedule="linear", cycle_steps=10), "cycle_steps"),
        (dict(schedule="constant", warmup_steps=5), "constant"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl_weight_at(3, 1.0, **kwargs)
    with pytest.raises(ValueError, match="step"):
        kl_weight_at(-1, 1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        kl_weight_at(0, float("nan"))


# -- perceptual -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_vgg():
    return PerceptualLoss(net="vgg", pretrained=False)


def test_perceptual_matches_lpips_with_same_backbone(random_vgg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained is deprecated', from inside lpips
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    # Our module keeps lpips' names (as non-persistent buffers): copy every tensor over, strictly.
    reference.load_state_dict(dict(random_vgg.lpips.named_buffers(remove_duplicate=False)), strict=True)
    x_hat, x = _pair((2, 3, 32, 32))
    with torch.no_grad():
        expected = reference(x_hat, x).mean()
    torch.testing.assert_close(random_vgg(x_hat, x), expected)
    # The heads are the calibrated ones shipped in lpips, not random.
    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"),
                         map_location="cpu", weights_only=True)
    for name, tensor in shipped.items():
        torch.testing.assert_close(random_vgg.lpips.get_buffer(name), tensor)
    assert random_vgg.pretrained_loaded is False


def test_perceptual_is_frozen_and_differentiable_wrt_input(random_vgg):
    assert list(random_vgg.parameters()) == [] and random_vgg.state_dict() == {}
    random_vgg.train()
    assert not any(m.training for m in random_vgg.modules())
    x_hat, x = _pair((1, 3, 32, 32))
    x_hat.requires_grad_(True)
    random_vgg(x_hat, x).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_perceptual_runs_in_float32_under_autocast(random_vgg):
    x_hat, x = _pair((1, 3, 32, 32))
    full = random_vgg(x_hat, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = random_vgg(x_hat.bfloat16(), x.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, random_vgg(x_hat.bfloat16().float(), x.bfloat16().float()))
    assert mixed.item() == pytest.approx(full.item(), rel=0.05)
    with pytest.raises(RuntimeError, match="float32"):
        PerceptualLoss(net="squeeze", pretrained=False).to(torch.bfloat16)(x_hat, x)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty torch hub cache and a network that refuses (the download would otherwise fetch ~500 MB)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return tmp_path


def test_pretrained_offline_names_file_and_url(offline_hub):
    url, path = backbone_checkpoint("vgg")
    assert path == offline_hub / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    # squeeze: the same code path as vgg, without building VGG16's 138M-parameter classifier once more.
    url, path = backbone_checkpoint("squeeze")
    with pytest.raises(RuntimeError) as info:
        PerceptualLoss(net="squeeze", pretrained=True)
    assert str(path) in str(info.value) and url in str(info.value)
    assert path.name == "squeezenet1_1-b8a52dc0.pth" and not path.exists()


def test_auto_warns_and_falls_back_to_random(offline_hub, caplog):
    with pytest.warns(RuntimeWarning, match="RANDOM squeeze BACKBONE"):
        loss = PerceptualLoss(net="squeeze", pretrained="auto")
    assert loss.pretrained_loaded is False
    assert "squeezenet1_1-b8a52dc0.pth" in caplog.text


def test_pretrained_loads_placed_file_like_lpips(offline_hub):
    # A (randomly initialised) torchvision squeezenet saved where torchvision caches the ImageNet weights.
    _, path = backbone_checkpoint("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    ours = PerceptualLoss(net="squeeze", pretrained=True)
    assert ours.pretrained_loaded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="squeeze", pnet_rand=False, verbose=False)  # lpips' own loading of the same file
    x_hat, x = _pair((2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x_hat, x), reference(x_hat, x).mean())
    torch.save({"unrelated": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="features.0.weight"):
        PerceptualLoss(net="squeeze", pretrained=True)


def test_perceptual_rejects_bad_arguments():
    with pytest.raises(ValueError, match="net"):
        PerceptualLoss(net="resnet", pretrained=False)
    with pytest.raises(ValueError, match="pretrained"):
        PerceptualLoss(net="vgg", pretrained="yes")


# -- adversarial ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, logits", [(32, 2), (64, 6), (256, 30)])
def test_patch_discriminator_logit_map_shape(size, logits):
    disc = PatchDiscriminator(channels=8)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, logits, logits)


def test_patch_discriminator_layout_init_and_norms():
    disc = PatchDiscriminator(channels=64, num_layers=3)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    # pix2pix / LDM NLayerDiscriminator: 3->64 s2, 64->128 s2, 128->256 s2, 256->512 s1, 512->1 s1, all 4x4.
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    for norm in ("group", "none"):
        assert PatchDiscriminator(channels=8, norm=norm)(torch.randn(1, 3, 32, 32)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="smaller than 24px"):
        PatchDiscriminator(channels=8)(torch.randn(1, 3, 16, 16))


def test_adversarial_losses_against_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.0])
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1.3, 2].
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.3 / 3))

    def softplus(v):
        return math.log1p(math.exp(v))

    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert generator_loss(fake, "hinge").item() == pytest.approx(-(-2.0 + 0.3 + 1.0) / 3)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(
        sum(softplus(-f) for f in fake.tolist()) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        generator_loss(fake, "wgan")


def test_adaptive_gan_weight_matches_hand_ratio():
    g = torch.Generator().manual_seed(0)
    x, target, c = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    weight = torch.randn(2, 3, generator=g, requires_grad=True)  # the "last layer": y = x @ W^T
    y = x @ weight.T
    rec = (y - target).pow(2).mean()
    gan = -(c * y).mean()
    # By hand: d rec / dW = 2/(5*2) (y - t)^T x ; d gan / dW = -1/(5*2) c^T x.
    rec_grad = 2.0 / 10 * (y.detach() - target).T @ x
    gan_grad = -1.0 / 10 * c.T @ x
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    w = adaptive_gan_weight(rec, gan, weight)
    assert torch.isfinite(w) and not w.requires_grad
    torch.testing.assert_close(w, expected)
    assert adaptive_gan_weight(rec, gan, weight, max_weight=0.01).item() == pytest.approx(0.01)
    (rec + w * gan).backward()  # graphs were retained for the real backward
    assert weight.grad is not None

    unrelated = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not depend on last_layer"):
        adaptive_gan_weight((x @ weight.detach().T).sum() * unrelated.sum(), -(x @ weight.T).mean(), weight)
    with pytest.raises(RuntimeError, match="does not require grad"):
        adaptive_gan_weight(rec, gan, weight.detach())


# -- the GAN at full strength -------------------------------------------------------------------------------------------


def test_adaptive_gan_weight_through_the_output_is_the_same_ratio():
    g = torch.Generator().manual_seed(0)
    x, target, c = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    weight = torch.randn(2, 3, generator=g, requires_grad=True)
    y = x @ weight.T
    rec, gan = (y - target).pow(2).mean(), -(c * y).mean()
    expected = (2.0 / 10 * (y.detach() - target).T @ x).norm() / ((-1.0 / 10 * c.T @ x).norm() + 1e-4)
    torch.testing.assert_close(adaptive_gan_weight(rec, gan, weight, output=y), expected)


def test_adaptive_gan_weight_under_fp16_autocast_equals_fp32():
    """A discriminator whose generator gradient is below fp16's range: the weight under fp16 autocast is the fp32
    one (before: the gradient underflowed to 0 and the weight came out 1.5x too large, or pinned at its clamp)."""
    from kl_autoencoder import KLAutoencoder
    from kl_autoencoder.losses import LossWeights, autoencoder_loss
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(mid_block_add_attention=False))
    disc = PatchDiscriminator(3, 8, 2)
    with torch.no_grad():  # logits ~1e-3 of the default: per-pixel generator gradients under fp16's smallest
        disc.main[-1].weight.mul_(1e-3)
        disc.main[-1].bias.mul_(1e-3)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    logvar = torch.tensor(math.log(1e5), requires_grad=True)  # keeps the weight under its 1e4 clamp
    weights = LossWeights(perceptual_weight=0.0, gan_weight=0.5)
    d_weight = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            _, logs, _ = autoencoder_loss(model, x, weights, None, disc, logvar, model.last_decoder_layer,
                                          generator=torch.Generator().manual_seed(1))
        d_weight[autocast] = logs["d_weight"].item()
    assert 100 < d_weight[False] < 1e4  # not clamped: the comparison means something
    assert d_weight[True] == pytest.approx(d_weight[False], rel=2e-2)


def test_discriminator_is_batch_independent_and_refuses_a_batchnorm_state():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8)  # the default norm: GroupNorm
    assert any(isinstance(m, torch.nn.GroupNorm) for m in disc.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32) * 5
    torch.testing.assert_close(disc(torch.cat([x, other]))[:2], disc(x))  # a sample's logits ignore its batch mates
    old = PatchDiscriminator(channels=8, norm="batch")  # what runs before GroupNorm saved
    with pytest.raises(RuntimeError, match="disc_norm=batch"):
        disc.load_state_dict(old.state_dict())
    with pytest.raises(RuntimeError, match="disc_norm=group"):
        old.load_state_dict(disc.state_dict())
    PatchDiscriminator(channels=8, norm="batch").load_state_dict(old.state_dict())  # like for like still loads


# -- the faster loss computes the same numbers ------------------------------------------------------------------------


def _lpips_package_copy(ours: PerceptualLoss, net: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(dict(ours.lpips.named_buffers(remove_duplicate=False)), strict=True)
    return reference


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_perceptual_distances_and_gradients_equal_the_lpips_package(random_vgg, layout):
    import copy

    ours = random_vgg if layout == "nchw" else copy.deepcopy(random_vgg).to(memory_format=torch.channels_last)
    reference = _lpips_package_copy(random_vgg, "vgg")
    if layout == "nhwc":  # the package in the same layout: oneDNN's NHWC convs alone differ from NCHW by up to 1e-3
        reference.to(memory_format=torch.channels_last)
    x_hat, x = _pair((3, 3, 32, 32), seed=4)
    weights = torch.tensor([1.0, -2.0, 3.0])  # a different upstream gradient per image
    for target_grad in (False, True):  # a target that needs a gradient gets one, as from lpips
        a, b = x_hat.clone().requires_grad_(True), x.clone().requires_grad_(target_grad)
        ra, rb = x_hat.clone().requires_grad_(True), x.clone().requires_grad_(target_grad)
        ours_d, ref_d = ours.distances(a, b), reference(ra, rb).reshape(-1)
        torch.testing.assert_close(ours_d, ref_d, rtol=1e-5, atol=1e-7)
        (ours_d * weights).sum().backward()
        (ref_d * weights).sum().backward()
        # Relative to the gradient's size (single elements near 0 differ by 1e-9).
        assert (a.grad - ra.grad).norm() <= 1e-5 * ra.grad.norm()
        if target_grad:
            assert (b.grad - rb.grad).norm() <= 1e-5 * rb.grad.norm()


def _ldm_nll(reconstruction, target, kind, pixel_weight, perceptual, perceptual_weight, logvar):
    """contperceptual.py's form, written out: the whole per-pixel tensor, summed, over the batch."""
    error = pixel_weight * ((reconstruction - target).abs() if kind == "l1" else (reconstruction - target) ** 2)
    if perceptual is not None:
        error = error + perceptual_weight * perceptual.reshape(-1, 1, 1, 1)
    if logvar is not None:
        error = error / torch.exp(logvar) + logvar
    return error.sum() / error.shape[0]


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("with_logvar", [False, True])
@pytest.mark.parametrize("perceptual_shape", [None, (3,), (3, 1, 1, 1), (1,)])
def test_reconstruction_nll_equals_the_ldm_broadcast_form(kind, with_logvar, perceptual_shape):
    from kl_autoencoder.losses import reconstruction_nll

    x_hat, x = _pair((3, 3, 8, 8), seed=5)
    g = torch.Generator().manual_seed(6)
    perceptual = None if perceptual_shape is None else torch.rand(perceptual_shape, generator=g)
    values = []
    for fn in (reconstruction_nll, _ldm_nll):
        r = x_hat.clone().requires_grad_(True)
        p = None if perceptual is None else perceptual.clone().requires_grad_(True)
        lv = torch.tensor(0.7, requires_grad=True) if with_logvar else None
        loss = fn(r, x, kind, 0.5, p, 0.8, lv)
        loss.backward()
        values.append((loss.detach(), r.grad, None if p is None else p.grad, None if lv is None else lv.grad))
    for ours, expected in zip(*values):
        if expected is not None:
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_autoencoder_loss_is_the_ldm_objective_and_logs_the_pixel_mean(random_vgg):
    from kl_autoencoder.losses import LossWeights, autoencoder_loss
    from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder

    torch.manual_seed(0)
    model = KLAutoencoder(AutoencoderConfig(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                                            latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2))
    x = _pair((2, 3, 32, 32), seed=7)[0]
    weights = LossWeights(pixel="l1", pixel_weight=1.0, perceptual_weight=0.7, kl_weight=1e-3)
    lv = torch.tensor(0.3, requires_grad=True)
    loss, logs, reconstruction = autoencoder_loss(model, x, weights, random_vgg, logvar=lv,
                                                  generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(loss, [lv, *model.parameters()])
    # Independently: the same posterior sample, lpips' own distance, the broadcast LDM form.
    recon, posterior = model(x, sample=True, generator=torch.Generator().manual_seed(3))
    distance = _lpips_package_copy(random_vgg, "vgg")(recon, x).reshape(-1)
    expected = _ldm_nll(recon, x, "l1", 1.0, distance, 0.7, lv) + 1e-3 * posterior.kl().mean()
    expected_grads = torch.autograd.grad(expected, [lv, *model.parameters()])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logs["pixel"], pixel_loss(recon.detach(), x), rtol=1e-5, atol=1e-7)
    ours_flat = torch.cat([g.reshape(-1) for g in grads])  # relative to the gradient's size: sums in another order
    expected_flat = torch.cat([g.reshape(-1) for g in expected_grads])
    assert (ours_flat - expected_flat).norm() <= 1e-5 * expected_flat.norm()
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=0)  # the log-variance's own
