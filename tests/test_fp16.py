"""fp16 safety: the activation probe, emulated fp16, evaluate's fp16 entry and the fp16-fix recipe (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.fp16 import (FP16_MAX, activation_peaks, emulated_fp16, encode_decode, fp16_check, fp16_entry,
                                 image_psnr, latent_psnr, module_peaks, report_lines)
from kl_autoencoder.evaluation import load_split_images
from kl_autoencoder.fp16_fix import build_fp16_fix
from kl_autoencoder.fp16_rescale import apply_factors_, rescale_units, shrink_factors
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


def driven(model: KLAutoencoder, peak: float = 3 * FP16_MAX, x: torch.Tensor | None = None) -> KLAutoencoder:
    """A copy of `model` with benchmarks/fp16_fix.py's five drives pushed to `peak` on `x`: the same fp32 function."""
    copy = KLAutoencoder(model.config).to(next(model.parameters()).dtype)
    copy.load_state_dict(model.state_dict())
    bench.drive_(copy, images() if x is None else x, peak)
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


def test_config_refuses_what_the_fix_cannot_honour(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(ROOT / "configs" / "fp16-fix.yaml")
    folder = tiny().save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match="loss.gan.enabled"):
        load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}", "loss.gan.enabled=true"])
    with pytest.raises(ConfigError, match="fp16_fix.activation_limit"):
        load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}", "fp16_fix.activation_limit=1e6"])
    with pytest.raises(ConfigError, match="fp16_fix.shrink_to"):
        load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}", "fp16_fix.shrink_to=20000"])
    with pytest.raises(ConfigError, match="train.ema.enabled"):  # an average of rescaled weights is not a rescale
        load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}", "train.ema.enabled=true"])
    cfg = load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}"])
    assert cfg.fp16_fix.enabled and cfg.fp16_fix.activation_limit == 16384


def float64_outputs(model: KLAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's moments and the decode of a fixed latent, in float64 (no float32 posterior in between)."""
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(x))
        return moments, model.decode(moments[:, :4])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_unit_rescales_exactly_in_float64():
    """Random factors (1/150 .. 150) on every unit at once, GroupNorm eps 0 (the only inexact step): encode and decode
    equal before and after to 1e-12. The units include the cases a rescale of writers alone gets wrong: a stream whose
    start is an upsampler / downsampler conv (read directly, weight and bias scaled apart), a conv_shortcut reading a
    shrunk stream, attention values, post_quant_conv."""
    model, x = tiny().double(), images().double()
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.eps = 0.0
    units = rescale_units(model)
    readers = {r for u in units for r in u.readers}
    writers = {w for u in units for w in u.writers}
    assert {"decoder.up_blocks.0.upsamplers.0.conv", "encoder.down_blocks.0.downsamplers.0.conv"} <= readers & writers
    assert {"decoder.up_blocks.1.resnets.0.conv_shortcut", "decoder.conv_in",
            "encoder.mid_block.attentions.0.to_out.0"} <= readers & writers
    before = float64_outputs(model, x)
    g = torch.Generator().manual_seed(3)
    factors = torch.exp(torch.empty(len(units), dtype=torch.float64).uniform_(-5, 5, generator=g)).tolist()
    assert apply_factors_(model, units, factors) > 20
    after = float64_outputs(model, x)
    assert relative_error(after[0], before[0]) < 1e-12 and relative_error(after[1], before[1]) < 1e-12
    assert not torch.allclose(model.decoder.conv_in.weight, tiny().double().decoder.conv_in.weight)


def test_shrinking_the_driven_tensors_is_exact_and_brings_them_inside():
    """benchmarks/fp16_fix.py's five drives (a stream an upsampler reads, an upsampler's output a shortcut reads, a
    mid-decoder conv1, a downsampler's output, attention values), found from the data and shrunk to the limit, with
    GroupNorm's real eps: float64 outputs equal to 1e-10, every activation within the limit."""
    x = images(2, 32).double()
    model = driven(tiny().double(), x=x)
    assert activation_peaks(model, x)["decoder"] > FP16_MAX and activation_peaks(model, x)["encoder"] > FP16_MAX
    before = float64_outputs(model, x)
    units = rescale_units(model)
    with module_peaks(model) as peaks:
        model.decode(model.encode(x).mode())
    apply_factors_(model, units, shrink_factors(units, {k: v.item() for k, v in peaks.items()}, 16384))
    after = float64_outputs(model, x)
    assert relative_error(after[0], before[0]) < 1e-10 and relative_error(after[1], before[1]) < 1e-10
    found = activation_peaks(model, x)
    assert found["encoder"] <= 16384 * (1 + 1e-9) and found["decoder"] <= 16384 * (1 + 1e-9)


def run_fix(tmp_path: Path, model: KLAutoencoder, *overrides: str) -> Path:
    """configs/fp16-fix.yaml through training/train.py's main on `model`; returns the run folder."""
    sys.path.insert(0, str(ROOT / "training"))
    import train as train_py  # training/train.py

    folder = model.save_pretrained(tmp_path / "source")
    code = train_py.main(["--config", str(ROOT / "configs" / "fp16-fix.yaml"), f"model.pretrained={folder}",
                          "data.resolution=32", "train.batch_size=3", "data.num_workers=0",
                          f"train.output_dir={tmp_path / 'run'}", "train.log_every=1", *overrides])
    assert code == 0
    return tmp_path / "run"


def test_fix_recipe_through_train_py_makes_a_driven_model_fp16_safe(tmp_path):
    """The recipe on a model driven where it cannot know in advance: the export computes what the original does in
    fp32 (100+ dB), runs in fp16 as close to the original's fp32 as the original itself does in fp16, and says
    force_upcast false; the latent fields are the source's."""
    original = tiny()
    calibration = load_split_images("sample", 32)
    x = calibration.images[calibration.splits["training"]]
    hot = driven(original, x=x)
    held_out = calibration.images[calibration.splits["held-out"]]
    reference = encode_decode(original, held_out)
    assert not fp16_check(hot, held_out, reference=reference)["decode_finite"]
    run = run_fix(tmp_path, hot, "train.max_steps=3")
    fixed = KLAutoencoder.from_pretrained(run / "vae").eval()
    latents, decode = encode_decode(fixed, held_out)
    assert latent_psnr(latents, reference[0]) > 100 and image_psnr(decode, reference[1]) > 100
    peaks = activation_peaks(fixed, held_out)
    assert peaks["encoder"] < FP16_MAX / 2 and peaks["decoder"] < FP16_MAX / 2
    check, own = fp16_check(fixed, held_out, reference=reference), fp16_check(original, held_out, reference=reference)
    assert check["encode_finite"] and check["decode_finite"]
    assert check["decode_psnr"] > own["decode_psnr"] - 2 and check["latent_psnr"] > own["latent_psnr"] - 2  # as good
    config = json.loads((run / "vae" / "config.json").read_text())
    assert config["force_upcast"] is False and config["scaling_factor"] == 0.5 and config["sample_size"] == 32
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["activation_peak"] > FP16_MAX and metrics[0]["rescaled_layers"] > 0
    assert metrics[-1]["activation_peak"] <= 16384 and metrics[-1]["decode_mse"] < 1e-10


def test_force_upcast_stays_true_when_no_rescale_covers_the_overflow(tmp_path, capsys):
    """A GroupNorm's output past the limit (its gain x 1e5): no function-preserving rescale reaches it, so the export
    keeps force_upcast true and says where in one line."""
    model = tiny()
    with torch.no_grad():
        model.decoder.conv_norm_out.weight.mul_(1e5)
    model.config.force_upcast = False
    run = run_fix(tmp_path, model, "train.max_steps=1")
    assert json.loads((run / "vae" / "config.json").read_text())["force_upcast"] is True
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "force_upcast kept true" in ln)
    assert "decoder.conv_norm_out" in line and "16384" in line


def test_a_non_finite_batch_moves_nothing(tmp_path):
    """A batch with a NaN is skipped: no weight changes; the next finite batch rescales."""
    hot = driven(tiny())
    folder = hot.save_pretrained(tmp_path / "hot")
    cfg = load_config(ROOT / "configs" / "fp16-fix.yaml", [f"model.pretrained={folder}",
                                                             f"train.output_dir={tmp_path / 'run'}"])
    t = build_fp16_fix(cfg)
    before = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    x = images(2, 32)
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    result = t.step_fn(t, bad, 0)
    assert bool(result.skipped) and all(torch.equal(before[k], v) for k, v in t.raw_model.state_dict().items())
    result = t.step_fn(t, x, 1)
    assert not bool(result.skipped) and result.logs["rescaled_layers"].item() > 0
    assert not torch.equal(before["decoder.conv_in.weight"], t.raw_model.decoder.conv_in.weight)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_rescale_identically(tmp_path):
    """2 ranks (DDP over gloo); only rank 1's images overflow (rank 0's are blank, and the encoder's first conv is
    x 1e5 with no bias): the peaks are all-reduced, so both ranks shrink the same layers by the same factors and
    decide force_upcast alike."""
    model = tiny()
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(1e5)
        model.encoder.conv_in.bias.zero_()
    folder = model.save_pretrained(tmp_path / "source")
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "fp16_fix_ddp.py"),
           f"model.pretrained={folder}", "data.resolution=32", "train.batch_size=2", "train.max_steps=2",
           "data.num_workers=0", f"train.output_dir={out}", "train.log_every=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["force_upcast"] == ranks[1]["force_upcast"]
    a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["encoder.conv_in.weight"].abs().max() < model.encoder.conv_in.weight.abs().max() / 2  # rank 1's overflow
