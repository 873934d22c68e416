"""Recipes transfer from LDM: the loss convention against LDM's published formula, the shipped configs, EMA warm-up,
the latent scale a fine-tune keeps, no silent random LPIPS, and FSDP refused clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.losses import LossWeights, PatchDiscriminator, PerceptualLoss, autoencoder_loss
from kl_autoencoder.trainer import build_model, make_accelerator, train
from tests.conftest import TINY_TRAINING, tiny_config

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = TINY_TRAINING + ["train.log_every=10", "train.checkpoint_every=0", "train.scaling_images=32", "optim.lr=2e-3",
                        "optim.betas=[0.9, 0.99]"]


def ldm_loss(model, x, eps, lpips_net, perceptual_weight, kl_weight, logvar, disc, disc_weight, tau=None):
    """CompVis LDM's LPIPSWithDiscriminator (contperceptual.py) generator loss, written from the paper's code
    independently of ours: per-pixel |x - x_hat| plus the per-image LPIPS broadcast to every pixel, the NLL with a
    scalar logvar, everything summed and divided by the batch; the adaptive weight on the NLL. With `tau` (a pair of
    maps for latents and images), EQ-VAE's pair: x_hat = decode(tau_z(z)) against tau_x(x)."""
    moments = model.quant_conv(model.encoder(x))
    mean, log_variance = moments.chunk(2, dim=1)
    log_variance = log_variance.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * log_variance) * eps
    if tau is not None:
        z, x = tau[0](z), tau[1](x)
    x_hat = model.decode(z)
    rec = (x.contiguous() - x_hat.contiguous()).abs()
    rec = rec + perceptual_weight * lpips_net(x_hat, x)  # [B, 1, 1, 1] broadcast over C, H, W
    nll = rec / torch.exp(logvar) + logvar
    nll = torch.sum(nll) / nll.shape[0]
    kl = 0.5 * torch.sum(mean.pow(2) + log_variance.exp() - 1.0 - log_variance, dim=[1, 2, 3])
    kl = torch.sum(kl) / kl.shape[0]
    g_loss = -torch.mean(disc(x_hat))
    last = model.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = (torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight
    return nll + kl_weight * kl + d_weight * g_loss, nll, kl


def test_autoencoder_loss_is_ldms_formula():
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(mid_block_add_attention=False))
    perceptual = PerceptualLoss("alex", pretrained=False)
    disc = PatchDiscriminator(3, 8, 1, norm="none")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logvar = torch.tensor(0.3, requires_grad=True)
    weights = LossWeights(pixel="l1", perceptual_weight=0.7, kl_weight=1e-3, gan_weight=0.5, gan_loss="hinge")
    loss, logs, _ = autoencoder_loss(model, x, weights, perceptual, disc, logvar, model.last_decoder_layer,
                                     generator=torch.Generator().manual_seed(5))
    eps = torch.randn(model.quant_conv(model.encoder(x)).chunk(2, dim=1)[0].shape,
                      generator=torch.Generator().manual_seed(5))
    expected, nll, kl = ldm_loss(model, x, eps, perceptual.lpips, 0.7, 1e-3, logvar, disc, 0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(logs["rec"], nll.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(logs["kl"], kl.detach(), rtol=1e-5, atol=1e-4)
    # the scale is LDM's: per-image sums, not means (a mean convention would be ~3 * 32 * 32 times smaller)
    assert logs["rec"] > 100 * logs["pixel"]


def test_shipped_recipes_mean_what_ldm_means():
    kl_f8 = load_config(ROOT / "configs" / "kl-f8.yaml")
    assert kl_f8.loss.kl_weight == 1e-6 and kl_f8.loss.perceptual_weight == 1.0
    assert kl_f8.loss.gan.disc_start == 50001 and kl_f8.loss.gan.disc_weight == 0.5
    assert kl_f8.optim.lr == 4.5e-6 and kl_f8.optim.scale_lr and tuple(kl_f8.optim.betas) == (0.5, 0.9)
    assert kl_f8.optim.grad_clip is None and kl_f8.optim.warmup_steps == 0
    pretrained = [f"model.pretrained={ROOT / 'tests' / 'assets' / 'trained-f8'}"]
    for name, overrides in (("kl-f8", []), ("kl-f8-c16", []), ("finetune-decoder", pretrained)):
        # real recipes never fall back to a random VGG
        assert load_config(ROOT / "configs" / f"{name}.yaml", overrides).loss.perceptual_pretrained is True, name
    assert load_config(None).optim.grad_clip is None


def test_real_recipe_without_vgg_weights_fails_at_start_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "kl-f8.yaml", TINY + [f"train.output_dir={out}", "loss.perceptual_weight=1",
                                                              "loss.perceptual_pretrained=true", "train.max_steps=1",
                                                              "train.mixed_precision=no"])
    from kl_autoencoder.losses import PerceptualWeightsError

    with pytest.raises(PerceptualWeightsError, match=r"vgg16-.*\.pth"):
        train(cfg)
    assert not out.exists()


def test_summary_records_which_perceptual_weights_were_used(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, TINY + [f"train.output_dir={out}", "train.max_steps=2", "loss.perceptual_weight=1",
                                    "loss.perceptual_net=alex", "loss.perceptual_pretrained=false"]))
    assert json.loads((out / "summary.json").read_text())["perceptual_weights"] == "random"
    out0 = tmp_path / "none"
    train(load_config(None, TINY + [f"train.output_dir={out0}", "train.max_steps=1"]))
    assert json.loads((out0 / "summary.json").read_text())["perceptual_weights"] == "none"


def test_ema_warm_up_gives_a_sensible_export_after_a_short_run(tmp_path):
    out = tmp_path / "ema"
    train(load_config(None, TINY + [f"train.output_dir={out}", "train.max_steps=50", "train.ema.enabled=true",
                                    "train.ema.decay=0.9999", "train.checkpoint_every=50"]))
    torch.manual_seed(0)  # train() seeds the initial weights with train.seed=0
    initial = build_model(load_config(None, TINY).model).state_dict()
    raw = load_file(out / "checkpoints" / "step_0000050" / "model.safetensors")
    exported = load_file(out / "vae" / WEIGHTS)
    keys = [k for k in raw if k.endswith("weight")]
    moved = sum((raw[k] - initial[k]).norm() for k in keys)
    ema_moved = sum((exported[k] - initial[k]).norm() for k in keys)
    # without warm-up, decay 0.9999 over 50 steps keeps 99.5% of the initial weights (ema_moved ~ 0.005 * moved)
    assert ema_moved > 0.5 * moved, (float(ema_moved), float(moved))


def test_decoder_finetune_keeps_the_pretrained_latent_scale(tmp_path):
    torch.manual_seed(0)
    pretrained = tmp_path / "sd-like"
    KLAutoencoder(tiny_config(mid_block_add_attention=False, scaling_factor=0.18215, sample_size=512)
                  ).save_pretrained(pretrained)
    finetune = TINY[4:] + [f"model.pretrained={pretrained}", "model.freeze_encoder=true", "train.max_steps=3"]
    export = train(load_config(ROOT / "configs" / "finetune-decoder.yaml",
                               finetune + [f"train.output_dir={tmp_path / 'ft'}", "loss.perceptual_pretrained=false"]))
    config = json.loads((export / "config.json").read_text())
    assert config["scaling_factor"] == 0.18215 and config["sample_size"] == 512 and config["shift_factor"] is None
    remeasured = train(load_config(ROOT / "configs" / "finetune-decoder.yaml",
                                   finetune + [f"train.output_dir={tmp_path / 'ft2'}", "loss.perceptual_pretrained=false",
                                               "train.remeasure_latent_scale=true"]))
    assert json.loads((remeasured / "config.json").read_text())["scaling_factor"] != 0.18215


def test_scale_lr_multiplies_by_the_total_batch():
    from kl_autoencoder.trainer import base_learning_rate

    cfg = load_config(None, ["optim.lr=4.5e-6", "optim.scale_lr=true", "train.batch_size=8", "train.grad_accum_steps=2"])
    assert base_learning_rate(cfg, world=4) == pytest.approx(4.5e-6 * 8 * 2 * 4)
    assert base_learning_rate(load_config(None, ["optim.lr=1e-4"]), world=4) == 1e-4


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_fsdp_and_deepspeed_are_refused_clearly(engine, monkeypatch, tmp_path):
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    with pytest.raises(ConfigError, match=f"{engine}.*not support.*--multi_gpu"):
        make_accelerator(load_config(None, [f"train.output_dir={tmp_path}"]))


def test_eq_vae_pair_gets_the_whole_loss():
    """EQ-VAE: with a transform the loss is the whole of LDM's loss (L1, LPIPS, KL of the plain posterior, the GAN
    with its adaptive weight) on (tau(x), decode(tau(z))), tau written here with torch's own resize and rot90."""
    import torch.nn.functional as F

    from kl_autoencoder.losses import EquivarianceTransform

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(mid_block_add_attention=False))  # f2
    perceptual = PerceptualLoss("alex", pretrained=False)
    disc = PatchDiscriminator(3, 8, 1, norm="none")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    logvar = torch.tensor(0.3, requires_grad=True)
    weights = LossWeights(pixel="l1", perceptual_weight=0.7, kl_weight=1e-3, gan_weight=0.5, gan_loss="hinge")
    transform = EquivarianceTransform((24, 20), quarter_turns=3, factor=2)
    loss, logs, reconstruction = autoencoder_loss(model, x, weights, perceptual, disc, logvar, model.last_decoder_layer,
                                                  generator=torch.Generator().manual_seed(5), transform=transform)
    assert reconstruction.shape == (2, 3, 40, 48)  # 20 x 24 latents, turned, x2
    eps = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    tau = (lambda z: torch.rot90(F.interpolate(z, size=(24, 20), mode="bilinear"), 3, dims=(2, 3)),
           lambda im: torch.rot90(F.interpolate(im, size=(48, 40), mode="bilinear"), 3, dims=(2, 3)))
    expected, nll, kl = ldm_loss(model, x, eps, perceptual.lpips, 0.7, 1e-3, logvar, disc, 0.5, tau=tau)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(logs["rec"], nll.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(logs["kl"], kl.detach(), rtol=1e-5, atol=1e-4)
    plain, _, _ = autoencoder_loss(model, x, weights, perceptual, disc, logvar, model.last_decoder_layer,
                                   generator=torch.Generator().manual_seed(5))
    assert abs(plain.item() - loss.item()) > 1e-2  # the transformed pair replaced the plain one


def test_eq_transform_draw_is_eq_vaes():
    """p = 1: every step transformed; scales m / h cover EQ-VAE's {8..31}/32 at h = 32, turns 1-3; p = 0.5: half."""
    from types import SimpleNamespace

    from kl_autoencoder.trainer import equivariance_transform

    eq = SimpleNamespace(probability=1.0, transforms=["scale", "rotate"], min_scale=0.25, low_res_probability=0.0)
    draws = [equivariance_transform(eq, seed, (32, 32), 8) for seed in range(2000)]
    assert all(d is not None for d in draws)
    assert {d.latent_size[0] for d in draws} == set(range(8, 32))
    assert all(d.latent_size[0] == d.latent_size[1] for d in draws)
    assert {d.quarter_turns for d in draws} == {1, 2, 3}
    assert draws[0] == equivariance_transform(eq, 0, (32, 32), 8)  # seeded by the step
    x = torch.randn(1, 3, 256, 256)
    assert draws[0].image(x).shape[-1] == draws[0].latent(torch.randn(1, 4, 32, 32)).shape[-1] * 8
    # the PatchGAN's smallest input bounds the downscale; p = 0.5 transforms about half of the steps
    assert min(equivariance_transform(eq, s, (4, 4), 8, min_image=24).latent_size[0] for s in range(200)) == 3
    half = SimpleNamespace(probability=0.5, transforms=["rotate"], min_scale=0.25, low_res_probability=0.0)
    share = sum(equivariance_transform(half, s, (4, 4), 8) is not None for s in range(2000)) / 2000
    assert 0.45 < share < 0.55
    assert equivariance_transform(SimpleNamespace(probability=0.0, low_res_probability=0.0), 0, (4, 4), 8) is None
    for old in ("loss.equivariance.weight=1", "loss.equivariance.scales=[2, 4]"):  # the old term's keys, explained
        with pytest.raises(ConfigError, match="was removed: .*(probability|min_scale)"):
            load_config(None, [old])


def test_eq_finetune_recipe_trains_with_the_term(tmp_path):
    pretrained = ROOT / "tests" / "assets" / "trained-f8"
    out = tmp_path / "eq"
    train(load_config(ROOT / "configs" / "eq-finetune.yaml", TINY[4:] + [
        f"model.pretrained={pretrained}", f"train.output_dir={out}", "train.max_steps=4", "train.log_every=1",
        "loss.equivariance.probability=1.0", "train.mixed_precision=no", "train.ema.enabled=false",
        "loss.gan.disc_channels=8", "loss.gan.disc_layers=2", "train.image_every=2"]))  # grid of T(x) vs its decode
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["eq_pair"] == 1.0 and m["eq_low_res"] == 0.0 for m in logged)  # p = 1: every step transformed
    # the discriminator warms up from step 0; the generator's term starts at weight 0 and is on from the next step
    assert "g_loss" not in logged[0] and math.isfinite(logged[0]["d_loss"])
    assert all(all(math.isfinite(m[k]) for k in ("loss", "g_loss", "d_loss", "d_weight")) for m in logged[1:])
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["scaling_factor"] != json.loads((pretrained / "config.json").read_text())["scaling_factor"]


def test_eq_finetune_recipe_is_eq_vaes_published_run():
    """EQ-VAE's train_eqvae config on 8 processes: Adam(0.5, 0.9) at 4.5e-6 x (10 x 2 x 8) = 7.2e-4, L1 + LPIPS 1.0,
    KL 1e-6, hinge GAN 0.5 x adaptive from step 0 (warmed up: ours is fresh, EQ-VAE's resumed LDM's), p_prior 0.5,
    p_prior_s 0.25, s in {8..31}/32; and the comment's image count is the config's."""
    from kl_autoencoder.trainer import base_learning_rate

    cfg = load_config(ROOT / "configs" / "eq-finetune.yaml")
    assert base_learning_rate(cfg, world=8) == pytest.approx(7.2e-4)
    assert tuple(cfg.optim.betas) == (0.5, 0.9) and cfg.optim.schedule == "constant" and cfg.optim.weight_decay == 0
    loss = cfg.loss
    assert (loss.pixel, loss.perceptual_weight, loss.kl_weight) == ("l1", 1.0, 1e-6)
    assert loss.gan.enabled and loss.gan.disc_start == 0 and loss.gan.disc_weight == 0.5 and loss.gan.adaptive_weight
    assert 0 < loss.gan.disc_warmup_steps <= cfg.train.max_steps // 10
    eq = loss.equivariance
    assert (eq.probability, eq.low_res_probability, eq.min_scale) == (0.5, 0.25, 0.25)
    images = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum_steps * 8
    assert images == 6_400_000 and round(images / 1_281_167) == 5  # "6.4 M images: 5 epochs of ImageNet-1k"
    text = (ROOT / "configs" / "eq-finetune.yaml").read_text()
    assert "6.4 M images" in text and "7.2e-4" in text


def test_discriminator_warms_up_before_the_generator_feels_it():
    """loss.gan.disc_warmup_steps: from disc_start the discriminator trains; the generator's adversarial weight rises
    linearly from 0 at disc_start to disc_weight disc_warmup_steps later (0: LDM's switch, full weight at once)."""
    from kl_autoencoder.losses import loss_weights_at

    cfg = load_config(None, ["loss.gan.enabled=true", "loss.gan.disc_start=10", "loss.gan.disc_warmup_steps=4",
                             "loss.gan.disc_weight=0.5"])
    weights = {step: loss_weights_at(cfg.loss, step) for step in (9, 10, 11, 13, 14, 100)}
    assert [weights[s].gan_weight for s in weights] == [0.0, 0.0, 0.125, 0.375, 0.5, 0.5]
    assert [weights[s].train_discriminator for s in weights] == [False, True, True, True, True, True]
    ldm = load_config(None, ["loss.gan.enabled=true", "loss.gan.disc_start=10"])
    assert loss_weights_at(ldm.loss, 10).gan_weight == 0.5 and not loss_weights_at(ldm.loss, 9).train_discriminator
    with pytest.raises(ConfigError, match="loss.gan.disc_warmup_steps"):
        load_config(None, ["loss.gan.disc_warmup_steps=-1"])


def test_low_resolution_branch_is_eq_vaes_p_prior_s():
    """loss.equivariance.low_res_probability (EQ-VAE's p_prior_s): drawn only on the steps that draw no transform, it
    downscales the input image by s in {8..31}/32 (no turn) and the plain pair at that size takes the whole loss."""
    import torch.nn.functional as F

    from kl_autoencoder.trainer import equivariance_transform

    eq = load_config(None, ["loss.equivariance.probability=0.5", "loss.equivariance.low_res_probability=0.25"]
                     ).loss.equivariance
    draws = [equivariance_transform(eq, seed, (32, 32), 8) for seed in range(4000)]
    low = [d for d in draws if d is not None and d.on_input]
    turned = [d for d in draws if d is not None and not d.on_input]
    assert 0.47 < len(turned) / 4000 < 0.53 and 0.10 < len(low) / 4000 < 0.15  # 0.5 and 0.5 x 0.25
    assert {d.latent_size[0] for d in low} == set(range(8, 32)) and all(d.quarter_turns == 0 for d in low)
    only_low = load_config(None, ["loss.equivariance.low_res_probability=1"]).loss.equivariance
    assert all(equivariance_transform(only_low, s, (32, 32), 8).on_input for s in range(20))
    with pytest.raises(ConfigError, match="loss.equivariance.low_res_probability"):
        load_config(None, ["loss.equivariance.low_res_probability=1.5"])

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(mid_block_add_attention=False))  # f2
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    transform = low[0].__class__((20, 20), 0, 2, on_input=True)
    weights = LossWeights(pixel="l1", perceptual_weight=0.0, kl_weight=1e-3)
    loss, logs, reconstruction = autoencoder_loss(model, x, weights, generator=torch.Generator().manual_seed(3),
                                                  transform=transform)
    small = F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False)
    expected, expected_logs, expected_reconstruction = autoencoder_loss(
        model, small, weights, generator=torch.Generator().manual_seed(3))
    assert reconstruction.shape == (2, 3, 40, 40)
    torch.testing.assert_close(reconstruction, expected_reconstruction)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["kl"], expected_logs["kl"])
