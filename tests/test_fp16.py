"""fp16 safety: the activation probe, emulated fp16, evaluate's fp16 entry and the fp16-fix recipe (tiny models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.fp16 import (FP16_MAX, ActivationPenalty, activation_peaks, emulated_fp16, encode_decode,
                                 fp16_check, fp16_entry, image_psnr, latent_psnr, report_lines)
from kl_autoencoder.fp16_fix import LayerScaleAdamW, layer_groups
from kl_autoencoder.model import KLAutoencoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fp16_fix as bench  # noqa: E402  (benchmarks/fp16_fix.py: the stream-driving used on the SDXL architecture)

TINY = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
            scaling_factor=0.5, sample_size=32)


def tiny(seed: int = 0) -> KLAutoencoder:
    torch.manual_seed(seed)
    return KLAutoencoder(dict(TINY)).eval()


def images(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def driven(model: KLAutoencoder, factor: float = 1e6) -> KLAutoencoder:
    copy = KLAutoencoder(model.config)
    copy.load_state_dict(model.state_dict())
    bench.drive_(bench.decoder_stream_layers(copy) + bench.encoder_stream_layers(copy), factor)
    return copy.eval()


def test_probe_finds_a_planted_overflow_where_it_is():
    model, x = tiny(), images()
    clean = activation_peaks(model, x)
    assert clean["encoder"] < 100 and clean["decoder"] < 100
    # attention values x 1e6, the output projection / 1e6: the same fp32 function, values far past fp16's range
    with torch.no_grad():
        attn = model.decoder.mid_block.attentions[0]
        attn.to_v.weight.mul_(1e6), attn.to_v.bias.mul_(1e6), attn.to_out[0].weight.div_(1e6)
    planted = activation_peaks(model, x)
    assert planted["decoder"] > FP16_MAX and planted["decoder_module"] == "decoder.mid_block.attentions.0.to_v"
    assert planted["encoder"] == pytest.approx(clean["encoder"])  # the encoder is untouched
    assert planted["decoder_headroom"] < 1 <= planted["encoder_headroom"]


def test_driving_keeps_the_fp32_function_and_overflows_fp16():
    model, x = tiny(), images()
    reference = encode_decode(model, x)
    hot = driven(model)
    latents, decode = encode_decode(hot, x)
    assert latent_psnr(latents, reference[0]) > 80 and image_psnr(decode, reference[1]) > 80
    peaks = activation_peaks(hot, x)
    assert peaks["encoder"] > FP16_MAX and peaks["decoder"] > FP16_MAX
    check = fp16_check(hot, x)
    assert not check["encode_finite"] and not check["decode_finite"]
    clean = fp16_check(model, x)
    assert clean["encode_finite"] and clean["decode_finite"] and clean["decode_psnr"] > 45


def test_emulated_fp16_agrees_with_native_cpu_fp16():
    model, x = tiny(), images()
    emulated, native = fp16_check(model, x, native=False), fp16_check(model, x, native=True)
    assert emulated["fp16"] == "emulated" and native["fp16"] == "native"
    assert emulated["decode_finite"] and native["decode_finite"]
    assert abs(emulated["decode_psnr"] - native["decode_psnr"]) < 6  # both are fp16 rounding, ~50-60 dB from fp32
    with emulated_fp16(model):
        _, a = encode_decode(model, x)
    half = KLAutoencoder(model.config).half()
    half.load_state_dict(model.state_dict())
    _, b = encode_decode(half, x.half())
    assert image_psnr(a, b) > 45
    hot = driven(model)
    assert not fp16_check(hot, x, native=True)["decode_finite"] and not fp16_check(hot, x)["decode_finite"]


def test_emulation_restores_the_weights():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with emulated_fp16(model):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model.decoder.conv_in._forward_pre_hooks


def test_fp16_entry_and_report_lines():
    x = images(3)
    safe, hot = fp16_entry(tiny(), x, batch_size=2), fp16_entry(driven(tiny()), x, batch_size=2)
    assert safe["safe"] and safe["images"] == 3 and safe["decode_psnr"] > 40
    assert not hot["safe"] and hot["decoder"] > FP16_MAX and hot["decode_psnr"] != hot["decode_psnr"]  # nan
    lines = "\n".join(report_lines({"a": {"fp16": safe}, "b": {"fp16": hot}, "tiny": {"fp16": None}}))
    assert "| `a` |" in lines and "| `b` |" in lines and "non-finite" in lines and "`tiny`" not in lines
    assert "configs/fp16-fix.yaml" in lines and hot["decoder_module"] in lines


def test_penalty_is_zero_inside_the_limit_and_marks_the_hot_layers():
    model, x = tiny(), images()
    with ActivationPenalty(model, 1e4) as penalty:
        model.decode(model.encode(x).mode())
    assert penalty.value().item() == 0 and not penalty.over
    hot = driven(model, 1e4)
    with ActivationPenalty(hot, 1e3) as penalty:
        hot.decode(hot.encode(x).mode())
    assert penalty.value().item() > 0 and penalty.peak.item() > 1e3
    marked = {id(m) for m in penalty.over}
    stream = bench.decoder_stream_layers(hot) + bench.encoder_stream_layers(hot)
    assert all(id(m) in marked for m in stream) and penalty.hot_parts == {"encoder", "decoder"}
    assert not hot._forward_hooks and not hot.decoder.conv_out._forward_hooks  # hooks removed on exit


def test_layer_scale_step_rescales_only_marked_layers_uniformly():
    model = tiny()
    opt = LayerScaleAdamW(layer_groups(model), lr=0.0, scale_lr=0.1)
    layer = model.decoder.up_blocks[-1].resnets[0].conv2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.decoder.up_blocks[-1].resnets[0].conv2(torch.randn(1, 8, 4, 4))
    out.square().mean().backward()  # shrinking this layer lowers the loss
    opt.mark_over_limit({id(layer.weight)})
    opt.activate({id(p) for p in model.parameters()})
    opt.step()
    ratio = (layer.weight / before["decoder.up_blocks.1.resnets.0.conv2.weight"]).detach()
    factor = ratio.flatten()[0].item()
    assert torch.allclose(ratio, torch.full_like(ratio, factor)) and factor == pytest.approx(0.904837, rel=1e-4)  # e^-0.1
    assert torch.allclose(layer.bias, before["decoder.up_blocks.1.resnets.0.conv2.bias"] * factor)
    others = [k for k in before if not k.startswith("decoder.up_blocks.1.resnets.0.conv2")]
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in others)  # lr 0, unmarked: untouched


def test_config_refuses_what_the_fix_cannot_honour(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(ROOT / "configs" / "fp16-fix.yaml")
    folder = tiny().save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match="loss.gan.enabled"):
        load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}", "loss.gan.enabled=true"])
    with pytest.raises(ConfigError, match="fp16_fix.activation_limit"):
        load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}", "fp16_fix.activation_limit=1e6"])
    cfg = load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}"])
    assert cfg.fp16_fix.enabled and cfg.fp16_fix.activation_limit == 16384


def test_fix_recipe_through_train_py_makes_a_driven_model_fp16_safe(tmp_path):
    """configs/fp16-fix.yaml via training/train.py's main on a driven tiny model: before, fp16 is non-finite; after,
    every activation is inside the limit, fp16 is finite and the decode / latents match the original's fp32 ones."""
    sys.path.insert(0, str(ROOT / "training"))
    import train as train_py  # training/train.py

    original = tiny()
    x = images(2, 32, seed=5)
    clean = activation_peaks(original, x)
    hot = driven(original, 3 * FP16_MAX / max(clean["encoder"], clean["decoder"]))  # peaks ~2-3x past fp16's range
    folder = hot.save_pretrained(tmp_path / "driven")
    reference = encode_decode(original, x)
    assert not fp16_check(hot, x, reference=reference)["decode_finite"]
    code = train_py.main(["--config", str(ROOT / "configs" / "fp16-fix.yaml"), f"model.pretrained={folder}",
                          "data.resolution=32", "train.max_steps=60", "train.batch_size=4", "data.num_workers=0",
                          f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=0", "train.log_every=10"])
    assert code == 0
    fixed = KLAutoencoder.from_pretrained(tmp_path / "run" / "vae").eval()
    peaks = activation_peaks(fixed, x)
    assert peaks["encoder"] < FP16_MAX / 2 and peaks["decoder"] < FP16_MAX / 2  # well inside, not just under
    check = fp16_check(fixed, x, reference=reference)
    assert check["encode_finite"] and check["decode_finite"]
    assert check["decode_psnr"] > 35 and check["latent_psnr"] > 35
    config = json.loads((tmp_path / "run" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 0.5 and config["sample_size"] == 32  # the source's latent fields, kept
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["activation_penalty"] == 0 or metrics[-1]["activation_peak"] < metrics[0]["activation_peak"]
