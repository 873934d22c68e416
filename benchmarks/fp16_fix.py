"""fp16-safe VAEs: drive a full-size SDXL-architecture VAE past fp16's range, then fix it with configs/fp16-fix.yaml.

    python benchmarks/fp16_fix.py --out /tmp/fp16-fix --resolution 32 --steps 40

1. Build SDXL's VAE architecture (diffusers' kl-f8 config: block_out_channels 128, 256, 512, 512, 4 latent channels,
   83.7 M parameters) with random weights (seeded): the original.
2. Drive its activations past 65504 without changing its fp32 function (`drive_`): every layer that writes into the
   decoder's last residual-stream segment (the last up block's conv2s and its 1x1 shortcut) and into the encoder's
   (the last downsampler, the last down block's and the mid block's conv2s, the mid attention's output projection)
   gets its weight and bias multiplied by --drive. That stream is only read by GroupNorms (scale invariant) and by
   the residual additions (all scaled alike), so the fp32 model computes what the original does; in fp16 the stream
   overflows.
3. Run the recipe through the real entry: `python training/train.py --config configs/fp16-fix.yaml
   model.pretrained=<driven> data.resolution=R train.max_steps=N ...` on the built-in sample photos.
4. Measure before and after on the 2 held-out sample photos (never trained on): activation peaks, the fp16
   (emulated on CPU, real on CUDA: kl_autoencoder/fp16.py) decode against the ORIGINAL's fp32 decode of the original
   latents, and the fp16 encoder's posterior mean against the original's (PSNR; latents: their peak-to-peak range).

Writes <out>/fp16_fix.json and prints a markdown table; BENCHMARKS.md "fp16-safe VAEs" holds a measured run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from kl_autoencoder.evaluation import load_split_images  # noqa: E402
from kl_autoencoder.fp16 import FP16_MAX, activation_peaks, encode_decode, fp16_check, image_psnr, latent_psnr  # noqa: E402
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder  # noqa: E402

# diffusers' AutoencoderKL config of stabilityai/sdxl-vae (the kl-f8 architecture of SD 1.x/2.x, SDXL's factor)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)


def _segment_start(first: nn.Module, previous: nn.Module) -> nn.Module:
    """What writes a segment's first value: the first ResNet block's 1x1 shortcut when it has one, else the layer
    before the block (a down/upsampler conv), whose output the identity shortcut carries on."""
    return first.conv_shortcut if first.conv_shortcut is not None else previous


def decoder_stream_layers(model: KLAutoencoder) -> list[nn.Module]:
    """The layers writing the decoder's last residual stream: read only by GroupNorms and the residual adds."""
    dec = model.decoder
    last = dec.up_blocks[-1]
    return [_segment_start(last.resnets[0], dec.up_blocks[-2].upsamplers[0].conv)] + [r.conv2 for r in last.resnets]


def encoder_stream_layers(model: KLAutoencoder) -> list[nn.Module]:
    """The layers writing the encoder's last residual stream (after the last downsampler, up to conv_norm_out)."""
    enc = model.encoder
    last = enc.down_blocks[-1]
    layers = [_segment_start(last.resnets[0], enc.down_blocks[-2].downsamplers[0].conv)]
    layers += [r.conv2 for r in last.resnets] + [r.conv2 for r in enc.mid_block.resnets]
    if enc.mid_block.attentions is not None:
        layers.append(enc.mid_block.attentions[0].to_out[0])
    return layers


@torch.no_grad()
def drive_(layers: list[nn.Module], factor: float) -> None:
    """Multiply each layer's weight and bias by `factor`, in place."""
    for layer in layers:
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)


def measure(model: KLAutoencoder, images: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Peaks, the fp32 model against the original (fp32) and the fp16 model against the original."""
    peaks = activation_peaks(model, images)
    latents, decode = encode_decode(model, images)
    fp16 = fp16_check(model, images, reference=reference)
    return {"encoder_peak": peaks["encoder"], "encoder_peak_module": peaks["encoder_module"],
            "decoder_peak": peaks["decoder"], "decoder_peak_module": peaks["decoder_module"],
            "fp32_latent_psnr": latent_psnr(latents, reference[0]), "fp32_decode_psnr": image_psnr(decode, reference[1]),
            "fp16": fp16["fp16"], "fp16_encode_finite": fp16["encode_finite"], "fp16_decode_finite": fp16["decode_finite"],
            "fp16_latent_psnr": fp16["latent_psnr"], "fp16_decode_psnr": fp16["decode_psnr"]}


def run_recipe(driven: Path, out: Path, args: argparse.Namespace) -> float:
    """configs/fp16-fix.yaml through training/train.py; returns the wall time in seconds."""
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(ROOT / "configs" / "fp16-fix.yaml"),
               f"model.pretrained={driven}", f"data.resolution={args.resolution}", f"train.max_steps={args.steps}",
               f"train.batch_size={args.batch_size}", f"train.output_dir={out}", f"train.seed={args.seed}",
               "train.checkpoint_every=0", "train.log_every=5", "data.num_workers=0", *args.overrides]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def table(before: dict, after: dict) -> str:
    rows = [("encoder peak |activation|", "encoder_peak", "{:.4g}"), ("decoder peak |activation|", "decoder_peak", "{:.4g}"),
            ("fp32 latents vs original (dB)", "fp32_latent_psnr", "{:.1f}"),
            ("fp32 decode vs original (dB)", "fp32_decode_psnr", "{:.1f}"),
            ("fp16 encode finite", "fp16_encode_finite", "{}"), ("fp16 decode finite", "fp16_decode_finite", "{}"),
            ("fp16 latents vs original fp32 (dB)", "fp16_latent_psnr", "{:.1f}"),
            ("fp16 decode vs original fp32 (dB)", "fp16_decode_psnr", "{:.1f}")]
    lines = ["| | driven (before) | fixed (after) |", "|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--drive", type=float, default=4e4, help="factor on the stream-writing layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more section.key=value overrides for the recipe")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    original = KLAutoencoder(AutoencoderConfig.from_dict(dict(SDXL_VAE))).eval()
    images = load_split_images("sample", args.resolution)
    held_out = images.images[images.splits[next(iter(images.splits))]]
    reference = encode_decode(original, held_out)  # the original's fp32 latents and decode
    driven = KLAutoencoder(original.config)
    driven.load_state_dict(original.state_dict())
    drive_(decoder_stream_layers(driven) + encoder_stream_layers(driven), args.drive)
    args.out.mkdir(parents=True, exist_ok=True)
    driven.eval().save_pretrained(args.out / "driven")
    result = {"parameters_M": round(original.num_parameters() / 1e6, 2), "resolution": args.resolution,
              "steps": args.steps, "batch_size": args.batch_size, "drive": args.drive, "fp16_max": FP16_MAX,
              "threads": torch.get_num_threads(), "original": measure(original, held_out, reference),
              "before": measure(driven, held_out, reference)}
    print(json.dumps(result["before"], indent=1), flush=True)
    result["train_seconds"] = run_recipe(args.out / "driven", args.out / "run", args)
    fixed = KLAutoencoder.from_pretrained(args.out / "run" / "vae").eval()
    result["after"] = measure(fixed, held_out, reference)
    result["export_keeps"] = {k: [getattr(fixed.config, k), getattr(original.config, k)]
                              for k in ("scaling_factor", "shift_factor", "sample_size", "force_upcast")}
    (args.out / "fp16_fix.json").write_text(json.dumps(result, indent=1, default=str))
    print(table(result["before"], result["after"]))
    print(f"recipe: {args.steps} steps x {args.batch_size} images at {args.resolution} px in "
          f"{result['train_seconds']:.0f} s; export keeps {result['export_keeps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
