"""Each fast-path switch changes speed or memory, never the math: same outputs and gradients as the plain path."""

import copy
import warnings

import pytest
import torch

from kl_autoencoder.fastpath import (CompiledWithFallback, FastPath, apply_fast_path, autocast, compile_with_fallback,
                                     make_adamw, prepare_loss_network, to_model_input)
from kl_autoencoder.model import KLAutoencoder
from tests.conftest import tiny_config


def make_pair(**fast_kwargs):
    """(plain model, fast model, fast callable) with identical weights."""
    torch.manual_seed(0)
    plain = KLAutoencoder(tiny_config(mid_block_add_attention=True))
    fast_model = copy.deepcopy(plain)
    fast = FastPath(**fast_kwargs)
    return plain, fast_model, apply_fast_path(fast_model, fast, "cpu"), fast


def outputs_and_grads(model, call, x):
    model.zero_grad(set_to_none=True)
    recon, posterior = call(x, sample=False)
    loss = (recon.float() - x).abs().mean() + 1e-3 * posterior.kl().mean()
    loss.backward()
    return recon.detach().float(), posterior.mean.detach(), [p.grad.clone() for p in model.parameters()]


def assert_rel_close(actual, expected, rtol):
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() / scale <= rtol, f"relative error above {rtol}"


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("switch", [{"channels_last": True}, {"gradient_checkpointing": True},
                                    {"channels_last": True, "gradient_checkpointing": True},
                                    {"lean_norm_act_bytes": 0}, {"lean_norm_act_bytes": 0, "channels_last": True},
                                    {"lean_norm_act_bytes": 0, "gradient_checkpointing": True}])
def test_switch_gives_same_outputs_and_gradients_fp32(switch):
    plain, fast_model, call, fast = make_pair(**switch)
    expected = outputs_and_grads(plain, plain, X)
    actual = outputs_and_grads(fast_model, call, to_model_input(X, fast))
    if fast.channels_last:
        assert fast_model.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(actual[:2], expected[:2]):
        assert_rel_close(a, e, 1e-4)
    # All gradients as one vector: conv biases right before a GroupNorm have gradients that are exactly 0 in math
    # (~1e-10 in float), which a per-tensor relative test would compare noise to noise.
    assert_rel_close(flat(actual[2]), flat(expected[2]), 1e-4)


def test_bf16_autocast_close_to_fp32_and_posterior_stays_fp32():
    plain, fast_model, call, fast = make_pair(autocast_dtype=torch.bfloat16)
    with torch.no_grad():
        expected, expected_posterior = plain(X, sample=False)
        with autocast("cpu", fast):
            actual, posterior = call(X, sample=False)
    assert posterior.mean.dtype == torch.float32 and posterior.logvar.dtype == torch.float32
    assert actual.dtype == torch.bfloat16  # the decoder really ran in bf16

    def rel(a, e):  # in norm: bf16 keeps 8 mantissa bits, elements near 0 carry the largest element-wise error
        return ((a.float() - e).norm() / e.norm()).item()

    assert rel(posterior.mean, expected_posterior.mean) <= 2e-2
    # Encoder + decoder stacked (~20 bf16 layers of a random-init net) measure ~2.5e-2 here: bound at 4e-2.
    assert rel(actual, expected) <= 4e-2


def test_plain_switches_are_no_ops():
    plain, fast_model, call, _ = make_pair()
    assert call is fast_model
    assert fast_model.decoder.conv_out.weight.is_contiguous()
    assert to_model_input(X, FastPath()) is X  # no redundant batch copy on the plain path


def test_fused_adamw_matches_default_adamw():
    plain, fast_model, _, _ = make_pair()
    optimizers = [make_adamw(plain.parameters(), lr=1e-2, fused=False, weight_decay=0.01),
                  make_adamw(fast_model.parameters(), lr=1e-2, fused=True, weight_decay=0.01)]
    assert optimizers[1].defaults.get("fused") is True
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in plain.parameters()]
        for model, optimizer in zip((plain, fast_model), optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(plain.parameters(), fast_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in fast_model.parameters())  # set_to_none


@pytest.mark.parametrize("model_channels_last", [True, False], ids=["model-nhwc", "model-nchw"])
def test_whole_training_step_same_loss_and_gradients_with_fast_path(model_channels_last):
    from kl_autoencoder.losses import PerceptualLoss
    from kl_autoencoder.losses import LossWeights, autoencoder_loss

    torch.manual_seed(0)
    perceptual = PerceptualLoss("alex", pretrained=False)  # same code path as vgg, a fraction of the time
    weights = LossWeights(perceptual_weight=1.0, kl_weight=1e-3)
    perceptual_fast = prepare_loss_network(copy.deepcopy(perceptual), FastPath(loss_channels_last=True))
    conv_weights = [b for b in perceptual_fast.buffers() if b.dim() == 4]
    assert conv_weights and all(b.is_contiguous(memory_format=torch.channels_last) for b in conv_weights)
    # model-nchw is the CPU training default: an NCHW reconstruction into the NHWC loss network.
    plain, fast_model, call, fast = make_pair(channels_last=model_channels_last, loss_channels_last=True)
    results = []
    for model, fn, x, lpips in ((plain, plain, X, perceptual),
                                (fast_model, call, to_model_input(X, fast), perceptual_fast)):
        loss, logs, _ = autoencoder_loss(fn, x, weights, lpips, generator=torch.Generator().manual_seed(3))
        model.zero_grad(set_to_none=True)
        loss.backward()
        results.append((loss.detach(), logs["perceptual"], [p.grad for p in model.parameters()]))
    (loss_a, lp_a, grads_a), (loss_b, lp_b, grads_b) = results
    assert_rel_close(loss_b, loss_a, 1e-4)
    assert_rel_close(lp_b, lp_a, 1e-4)
    assert_rel_close(flat(grads_b), flat(grads_a), 1e-4)


def test_compile_falls_back_to_eager_with_a_warning():
    plain, fast_model, _, _ = make_pair()

    def broken_compiled(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    wrapped = CompiledWithFallback(fast_model, broken_compiled)
    with pytest.warns(RuntimeWarning, match="running eager"):
        recon, _ = wrapped(X, sample=False)
    torch.testing.assert_close(recon, plain(X, sample=False)[0])
    assert wrapped.config is fast_model.config  # attributes of the model pass through
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then plain eager
        wrapped(X, sample=False)


def test_compile_unavailable_returns_model_unchanged(monkeypatch):
    import kl_autoencoder.fastpath as fastpath

    monkeypatch.setattr(fastpath, "compiler_available", lambda device: False)
    plain, _, _, _ = make_pair()
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert compile_with_fallback(plain, "cpu") is plain


def test_device_defaults():
    cpu = FastPath.for_device("cpu")
    assert cpu.channels_last and cpu.loss_channels_last and cpu.autocast_dtype is None and not cpu.compile
    # Training on CPU keeps the VAE NCHW (GroupNorm's NHWC backward is slow there) and LPIPS' VGG NHWC.
    cpu_train = FastPath.for_device("cpu", training=True)
    assert not cpu_train.channels_last and cpu_train.loss_channels_last
    assert cpu_train.lean_norm_act_bytes == 8 * 2**20  # the measured crossover (BENCHMARKS.md)
    for training in (False, True):
        gpu = FastPath.for_device("cuda", training=training, compile=False)
        assert gpu.autocast_dtype == torch.bfloat16 and gpu.tf32 and gpu.channels_last and not gpu.compile
        assert gpu.loss_channels_last


def test_prepare_for_inference_same_outputs_in_the_inference_layout():
    from kl_autoencoder.fastpath import prepare_for_inference

    plain, fast_model, _, _ = make_pair()
    plain.eval()
    fast_model.train()
    assert prepare_for_inference(fast_model, "cpu") is fast_model
    assert not fast_model.training
    assert fast_model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = plain.decode(plain.encode(X).mode())
        actual = fast_model.decode(fast_model.encode(X).mode())  # NCHW input: the first conv converts it
    assert_rel_close(actual, expected, 1e-4)
