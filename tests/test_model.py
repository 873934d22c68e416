"""The model against diffusers' AutoencoderKL (independent reference) and the posterior against closed forms."""

import math

import pytest
import torch
from diffusers import AutoencoderKL

from kl_autoencoder import AutoencoderConfig, DiagonalGaussian, KLAutoencoder

CONFIGS = {
    "f4-c4-attn-g4": dict(block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=4),
    "f8-c16-noattn-g8": dict(block_out_channels=(8, 16, 16, 32), norm_num_groups=8, latent_channels=16,
                             mid_block_add_attention=False),
    "f8-c4-attn-g32-2layers": dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=32, layers_per_block=2),
    "f4-c16-attn-g8-noquant": dict(block_out_channels=(16, 16, 32), norm_num_groups=8, latent_channels=16,
                                   use_quant_conv=False, use_post_quant_conv=False),
}


def diffusers_vae(**kwargs) -> AutoencoderKL:
    levels = len(kwargs["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, **kwargs).eval()


def randomize_norms(module: torch.nn.Module) -> None:
    """GroupNorm starts at weight 1 / bias 0; random affine params make the comparison cover them too."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("direction", ["diffusers_to_ours", "ours_to_diffusers"])
def test_matches_diffusers(name, direction):
    kwargs = CONFIGS[name]
    torch.manual_seed(0)
    ref = diffusers_vae(**kwargs)
    ours = KLAutoencoder(**kwargs).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    if direction == "diffusers_to_ours":
        randomize_norms(ref)
        ours.load_state_dict(ref.state_dict(), strict=True)
    else:
        randomize_norms(ours)
        ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x)
        assert mine.mean.shape == (2, kwargs.get("latent_channels", 4), *([32 // ours.downsampling_factor] * 2))
        torch.testing.assert_close(mine.mean, theirs.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.logvar, theirs.logvar, atol=1e-5, rtol=0)
        z = torch.randn_like(mine.mean)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_config_matches_diffusers_fields_and_defaults():
    ref = AutoencoderKL()
    ours = AutoencoderConfig().to_dict()
    ref_config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert set(ours) == set(ref_config)
    for key, value in ref_config.items():
        expected = list(value) if isinstance(value, tuple) else value
        assert ours[key] == expected, key


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="norm_num_groups=32 does not divide.*48"):
        AutoencoderConfig(block_out_channels=(64, 48))
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderConfig(act_fn="tanh")
    with pytest.raises(ValueError, match="latents_mean has 3 entries"):
        AutoencoderConfig(latents_mean=(0.0, 0.0, 0.0))


@pytest.mark.parametrize("field, value, match", [
    ("block_out_channels", (100000,), r"each an integer in \[1, 2048\]"),
    ("block_out_channels", (8,) * 9, "1 to 8 channel counts"),
    ("block_out_channels", (8, 16.0), "block_out_channels"),
    ("block_out_channels", "abc", "block_out_channels"),
    ("latent_channels", 10**9, r"latent_channels must be an integer in \[1, 256\]"),
    ("latent_channels", True, "latent_channels"),
    ("layers_per_block", 10**7, r"\[1, 8\]"),
    ("in_channels", 0, "in_channels"),
    ("norm_num_groups", 2.0, "norm_num_groups"),
    ("sample_size", 0, "sample_size"),
    ("sample_size", (64, 64, 64), "sample_size"),
    ("scaling_factor", "abc", "scaling_factor must be a finite number > 0, got 'abc'"),
    ("scaling_factor", float("nan"), "scaling_factor"),
    ("scaling_factor", -0.18215, "scaling_factor"),
    ("shift_factor", float("inf"), "shift_factor must be a finite number"),
    ("latents_mean", (0.0, float("nan"), 0.0, 0.0), "latents_mean"),
    ("force_upcast", "true", "force_upcast must be true or false"),
    ("down_block_types", ("DownEncoderBlock2D", "CrossAttnDownBlock2D"), "CrossAttnDownBlock2D"),
])
def test_config_types_and_bounds_fail_before_building(field, value, match, monkeypatch):
    from kl_autoencoder.model import AutoencoderConfigError

    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built before the config was checked")

    monkeypatch.setattr(torch.nn.Conv2d, "__init__", no_layers)
    values = dict(block_out_channels=(8, 16), norm_num_groups=4)
    values[field] = value
    with pytest.raises(AutoencoderConfigError, match=match) as info:
        KLAutoencoder(**values)
    assert info.value.field in (field, "norm_num_groups")
    assert len(str(info.value)) < 400


def test_config_accepts_what_diffusers_accepts():
    config = AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4, sample_size=[64, 48], scaling_factor=1,
                               latents_mean=[0, 0.5, 0, 0], latents_std=[1, 1, 1, 1])
    assert config.sample_size == (64, 48) and config.to_dict()["sample_size"] == [64, 48]
    ref = AutoencoderKL(**{k: v for k, v in config.to_dict().items()}).eval()
    assert list(ref.config.sample_size) == [64, 48]


def test_validate_catches_values_set_after_construction():
    config = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)
    config.scaling_factor = float("nan")
    with pytest.raises(ValueError, match="scaling_factor"):
        config.validate()


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean = torch.randn(2, 3, 4, 4) * 0.5
    logvar = torch.randn(2, 3, 4, 4) * 0.3
    posterior = DiagonalGaussian(mean=mean, logvar=logvar)
    # log q(z) - log p(z), averaged over many reparameterized samples
    samples = torch.stack([posterior.sample() for _ in range(20000)])
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + (samples - mean) ** 2 / logvar.exp())
    log_p = -0.5 * (math.log(2 * math.pi) + samples ** 2)
    monte_carlo = (log_q - log_p).flatten(2).sum(-1).mean(0)
    closed = posterior.kl()
    torch.testing.assert_close(closed, monte_carlo, rtol=0.05, atol=0.3)
    torch.testing.assert_close(posterior.kl_per_channel().sum(1), closed)
    # nll of x under the posterior matches torch.distributions
    x = torch.randn_like(mean)
    ref = -torch.distributions.Normal(mean, posterior.std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(posterior.nll(x), ref, rtol=1e-5, atol=1e-4)


def test_sample_is_reparameterized_and_mode_deterministic():
    mean = torch.zeros(1, 2, 2, 2, requires_grad=True)
    logvar = torch.zeros(1, 2, 2, 2, requires_grad=True)
    posterior = DiagonalGaussian(mean=mean, logvar=logvar)
    posterior.sample().sum().backward()
    assert mean.grad is not None and torch.all(mean.grad == 1)
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0
    assert torch.equal(posterior.mode(), posterior.mode())
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(posterior.sample(g1), posterior.sample(g2))


def test_logvar_clamped_like_ldm():
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], dim=1))
    assert posterior.logvar.item() == 20.0


def test_forward_and_diffusion_latent_helpers(tiny_model):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    recon, posterior = tiny_model(x, sample=False)
    assert recon.shape == x.shape
    tiny_model.config.shift_factor = 0.25
    z = posterior.mode()
    latents = tiny_model.to_diffusion_latents(z)
    torch.testing.assert_close(latents, (z - 0.25) * tiny_model.config.scaling_factor)
    torch.testing.assert_close(tiny_model.from_diffusion_latents(latents), z)


def test_gradient_checkpointing_same_gradients(tiny_model):
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def grads():
        tiny_model.zero_grad()
        recon, _ = tiny_model(x, sample=False)
        recon.square().mean().backward()
        return [p.grad.clone() for p in tiny_model.parameters()]

    plain = grads()
    tiny_model.enable_gradient_checkpointing()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
