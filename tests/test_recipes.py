"""Recipes transfer from LDM: the loss convention against LDM's published formula, the shipped configs, EMA warm-up,
the latent scale a fine-tune keeps, no silent random LPIPS, and FSDP refused clearly."""

from __future__ import annotations

import json
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


def ldm_loss(model, x, eps, lpips_net, perceptual_weight, kl_weight, logvar, disc, disc_weight):
    """CompVis LDM's LPIPSWithDiscriminator (contperceptual.py) generator loss, written from the paper's code
    independently of ours: per-pixel |x - x_hat| plus the per-image LPIPS broadcast to every pixel, the NLL with a
    scalar logvar, everything summed and divided by the batch; the adaptive weight on the NLL."""
    moments = model.quant_conv(model.encoder(x))
    mean, log_variance = moments.chunk(2, dim=1)
    log_variance = log_variance.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * log_variance) * eps
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


def test_equivariance_term_is_eq_vaes_objective():
    from kl_autoencoder.diffusability import Transform

    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(mid_block_add_attention=False))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    weights = LossWeights(pixel="l1", perceptual_weight=0.0, kl_weight=1e-3, equivariance_weight=0.5)
    rotate = Transform("rotate", 1)
    plain, _, _ = autoencoder_loss(model, x, weights, generator=torch.Generator().manual_seed(3))
    loss, logs, _ = autoencoder_loss(model, x, weights, generator=torch.Generator().manual_seed(3), transform=rotate)
    generator = torch.Generator().manual_seed(3)
    mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    torch.randn(mean.shape, generator=generator)  # the reconstruction's sample
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    expected = (model.decode(torch.rot90(z, 1, dims=(-2, -1))) - torch.rot90(x, 1, dims=(-2, -1))).abs().sum() / 2
    torch.testing.assert_close(loss - plain, 0.5 * expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(logs["equivariance"], expected.detach(), rtol=1e-4, atol=1e-3)


def test_eq_finetune_recipe_trains_with_the_term(tmp_path):
    pretrained = ROOT / "tests" / "assets" / "trained-f8"
    out = tmp_path / "eq"
    train(load_config(ROOT / "configs" / "eq-finetune.yaml", TINY[4:] + [
        f"model.pretrained={pretrained}", f"train.output_dir={out}", "train.max_steps=4", "train.log_every=1",
        "loss.equivariance.probability=1.0", "train.mixed_precision=no", "train.ema.enabled=false"]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("equivariance" in m and m["equivariance"] > 0 for m in logged)
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["scaling_factor"] != json.loads((pretrained / "config.json").read_text())["scaling_factor"]
