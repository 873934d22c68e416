"""The lean GroupNorm+SiLU (norm_act.py): the same math as the two modules, less memory kept for backward, the
plain modules wherever a caller watches or replaces them, and nothing of it on the plain path."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kl_autoencoder
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.norm_act import GroupNormSiLU, norm_act
from tests.conftest import tiny_config


def pair(channels=8, groups=4, dtype=torch.float32):
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, channels, eps=1e-6).to(dtype)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    return norm, nn.SiLU()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradients_match_autograd_of_the_closed_form_in_float64(channels_last):
    norm, _ = pair(dtype=torch.float64)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: GroupNormSiLU.apply(x, w, b, 4, 1e-6), (x, norm.weight, norm.bias))


def test_forward_is_bitwise_the_modules_and_backward_matches_them():
    norm, act = pair()
    x = torch.randn(2, 8, 16, 16) * 3 + 1
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain, lean = act(norm(a)), norm_act(norm, act, b, lean_from_bytes=0)
    assert type(lean.grad_fn).__name__ == "GroupNormSiLUBackward"
    assert torch.equal(plain, lean)
    grad = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, [a, norm.weight, norm.bias], grad)
    actual = torch.autograd.grad(lean, [b, norm.weight, norm.bias], grad)
    for e, g in zip(expected, actual):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_only_inputs_from_the_threshold_take_the_lean_path():
    norm, act = pair()
    x = torch.randn(1, 8, 4, 4, requires_grad=True)  # 512 bytes
    assert type(norm_act(norm, act, x, 512).grad_fn).__name__ == "GroupNormSiLUBackward"
    assert type(norm_act(norm, act, x, 513).grad_fn).__name__ == "SiluBackward0"
    assert type(norm_act(norm, act, x, None).grad_fn).__name__ == "SiluBackward0"


def test_without_autograd_the_silu_runs_in_place_with_the_same_bits():
    norm, act = pair()
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(norm_act(norm, act, x), act(norm(x)))


def test_hooked_or_replaced_modules_are_called_as_modules():
    norm, act = pair()
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    seen = []
    handle = act.register_forward_hook(lambda m, args, out: seen.append(out))
    out = norm_act(norm, act, x, 0)
    handle.remove()
    assert len(seen) == 1 and type(out.grad_fn).__name__ != "GroupNormSiLUBackward"
    norm.forward = lambda t: torch.zeros_like(t)  # as tiling's whole-image GroupNorm replaces it
    with torch.no_grad():
        assert torch.equal(norm_act(norm, act, x, 0), torch.zeros_like(x))
    del norm.forward
    gelu = nn.GELU()
    assert type(norm_act(norm, gelu, x, 0).grad_fn).__name__ == "GeluBackward0"


def saved_bytes(model, x):
    """Bytes of distinct storages autograd keeps for backward over one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, sample=False)[0].sum()
    return sum(storages.values())


def test_the_model_keeps_less_for_backward_with_the_same_gradients():
    torch.manual_seed(0)
    plain = KLAutoencoder(tiny_config())
    lean = copy.deepcopy(plain)
    lean.set_lean_norm_act(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    plain_bytes, lean_bytes = saved_bytes(plain, x), saved_bytes(lean, x)
    assert lean_bytes < 0.8 * plain_bytes, (lean_bytes, plain_bytes)
    outputs = [m(x, sample=False)[0] for m in (plain, lean)]
    assert torch.equal(outputs[0], outputs[1])
    for out in outputs:
        out.square().mean().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (plain, lean)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_frozen_weights_and_input_without_grad():
    norm, act = pair()
    norm.requires_grad_(False)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    out = norm_act(norm, act, x, 0)
    (grad,) = torch.autograd.grad(out.sum(), [x])
    (expected,) = torch.autograd.grad(act(norm(x)).sum(), [x])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_the_trainer_and_apply_fast_path_set_the_device_threshold():
    from kl_autoencoder.config import load_config
    from kl_autoencoder.fastpath import FastPath, apply_fast_path
    from kl_autoencoder.trainer import build_training

    cfg = load_config(None, ["loss.perceptual_weight=0", "train.ema.enabled=false"])
    model = build_training(cfg).raw_model
    expected = FastPath.for_device("cpu", training=True).lean_norm_act_bytes
    assert expected is not None
    assert {m.lean_from_bytes for m in model.modules() if hasattr(m, "lean_from_bytes")} == {expected}
    apply_fast_path(model, FastPath(lean_norm_act_bytes=5), "cpu")
    assert model.decoder.up_blocks[0].resnets[0].lean_from_bytes == 5 and model.encoder.lean_from_bytes == 5


def python_calls(fn):
    """The package's files whose Python functions `fn` runs."""
    files, package = set(), str(Path(kl_autoencoder.__file__).parent)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            files.add(Path(frame.f_code.co_filename).name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files


def test_the_plain_path_runs_the_modules_and_nothing_else():
    """As built or loaded (lean pair off) a training step and an inference pass run the blocks' forwards and torch's
    modules, and no check of norm_act.py per pair: the plain path costs what the modules cost."""
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config())
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def step():
        model(x, sample=False)[0].square().mean().backward()

    def inference():
        with torch.no_grad():
            model.decode(model.encode(x).mode())

    for fn in (step, inference):
        assert python_calls(fn) <= {"vae_blocks.py", "model.py"}, python_calls(fn)
    model.set_lean_norm_act(2**40)  # on, but no input reaches the threshold: the pairs ask norm_act
    assert "norm_act.py" in python_calls(step)
    model.set_lean_norm_act(None)
    assert "norm_act.py" not in python_calls(step) | python_calls(inference)


def test_inference_preparation_turns_the_lean_pair_on_on_cpu():
    from kl_autoencoder.fastpath import prepare_for_inference

    model = prepare_for_inference(KLAutoencoder(tiny_config()), "cpu")
    assert {m.lean_from_bytes for m in model.modules() if hasattr(m, "lean_from_bytes")} == {8 * 2**20}
