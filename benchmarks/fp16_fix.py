"""fp16-safe VAEs: drive a full-size SDXL-architecture VAE past fp16's range where the recipe cannot know in advance,
then fix it with configs/fp16-fix.yaml.

    python benchmarks/fp16_fix.py --out /tmp/fp16-fix --resolution 32 --steps 8

1. Build SDXL's VAE architecture (diffusers' kl-f8 config: block_out_channels 128, 256, 512, 512, 4 latent channels,
   83.7 M parameters) with random weights (seeded): the original.
2. Drive five places past 65504 (3x it on the calibration photos) without changing the fp32 function (`drive_`),
   each written out here by hand, not with the recipe's code: the decoder's first residual stream (conv_in, the mid
   block with its attention, the first up block) which an upsampler's conv reads directly, so its weight is divided
   back; an upsampler's output, read directly by the next block's 1x1 conv_shortcut; a ResNet conv1 in the middle of
   the decoder (read by its norm2); a downsampler's output, read by a conv_shortcut; the encoder's attention values
   (to_v up, to_out down).
3. Run the recipe through the real entry: `python training/train.py --config configs/fp16-fix.yaml
   model.pretrained=<driven> data.resolution=R train.max_steps=N ...` on the built-in sample photos' training split.
4. Measure before and after on the 3 held-out sample photos (never calibrated on): activation peaks, the fp16
   (emulated on CPU, real on CUDA: kl_autoencoder/fp16.py) decode against the ORIGINAL's fp32 decode of the original
   latents, the fp16 encoder's posterior mean against the original's (PSNR; latents: their peak-to-peak range), the
   same in fp32 (the rescale is exact: 100+ dB), and the export's force_upcast.

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

from harness import ROOT, write_json  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder.evaluation import load_split_images
from kl_autoencoder.fp16 import (FP16_MAX, activation_peaks, encode_decode, fp16_check, image_psnr, latent_psnr,
                                 recorded_peaks)
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder

# diffusers' AutoencoderKL config of stabilityai/sdxl-vae (the kl-f8 architecture of SD 1.x/2.x, SDXL's factor)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)


def _driven_sets(model: KLAutoencoder) -> list[tuple[str, str, list[nn.Module], list[nn.Module]]]:
    """(what, probe, writers, readers) for each drive: `probe` names a module whose output is the driven tensor;
    writers get weight and bias x k, readers (which read it directly, not through a GroupNorm) weight / k."""
    enc, dec = model.encoder, model.decoder
    up = next(i for i in range(len(dec.up_blocks) - 1) if dec.up_blocks[i + 1].resnets[0].conv_shortcut is not None)
    down = next(i for i in range(len(enc.down_blocks) - 1)
                if enc.down_blocks[i + 1].resnets[0].conv_shortcut is not None)
    first, mid = dec.up_blocks[0], dec.mid_block
    stream = [dec.conv_in] + [r.conv2 for r in mid.resnets] + [r.conv2 for r in first.resnets]
    stream += [mid.attentions[0].to_out[0]] if mid.attentions is not None else []
    inner = dec.up_blocks[len(dec.up_blocks) // 2].resnets[-1]
    attention = enc.mid_block.attentions[0]
    return [
        ("decoder's first stream (mid block and first up block), read by an upsampler's conv",
         f"decoder.up_blocks.0.resnets.{len(first.resnets) - 1}", stream, [first.upsamplers[0].conv]),
        ("an upsampler's output, read by a ResNet block's 1x1 shortcut", f"decoder.up_blocks.{up}.upsamplers.0",
         [dec.up_blocks[up].upsamplers[0].conv], [dec.up_blocks[up + 1].resnets[0].conv_shortcut]),
        ("a ResNet conv1 in the middle of the decoder", f"decoder.up_blocks.{len(dec.up_blocks) // 2}.resnets."
         f"{len(dec.up_blocks[len(dec.up_blocks) // 2].resnets) - 1}.conv1", [inner.conv1], []),
        ("a downsampler's output, read by a ResNet block's 1x1 shortcut", f"encoder.down_blocks.{down}.downsamplers.0",
         [enc.down_blocks[down].downsamplers[0].conv], [enc.down_blocks[down + 1].resnets[0].conv_shortcut]),
        ("the encoder's mid attention's values", "encoder.mid_block.attentions.0.to_v", [attention.to_v],
         [attention.to_out[0]]),
    ]


@torch.no_grad()
def drive_(model: KLAutoencoder, images: torch.Tensor, peak: float = 3 * FP16_MAX) -> dict[str, float]:
    """Push each `_driven_sets` tensor to `peak` on `images` without changing the fp32 function (GroupNorm reads
    them, or their direct readers are divided back); returns what -> factor."""
    with recorded_peaks(model) as found:
        model.decode(model.encode(images).mode())
    factors = {}
    for what, probe, writers, readers in _driven_sets(model):
        k = peak / found[probe]
        for layer in writers:
            layer.weight.mul_(k)
            layer.bias.mul_(k)
        for layer in readers:
            layer.weight.div_(k)
        factors[what] = k
    return factors


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


def table(original: dict, before: dict, after: dict) -> str:
    rows = [("encoder peak |activation|", "encoder_peak", "{:.4g}"), ("decoder peak |activation|", "decoder_peak", "{:.4g}"),
            ("fp32 latents vs original (dB)", "fp32_latent_psnr", "{:.1f}"),
            ("fp32 decode vs original (dB)", "fp32_decode_psnr", "{:.1f}"),
            ("fp16 encode finite", "fp16_encode_finite", "{}"), ("fp16 decode finite", "fp16_decode_finite", "{}"),
            ("fp16 latents vs original fp32 (dB)", "fp16_latent_psnr", "{:.1f}"),
            ("fp16 decode vs original fp32 (dB)", "fp16_decode_psnr", "{:.1f}")]
    lines = ["| | original | driven (before) | fixed (after) |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(original[key])} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--drive-to", type=float, default=3 * FP16_MAX, help="peak of each driven tensor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more section.key=value overrides for the recipe")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    original = KLAutoencoder(AutoencoderConfig.from_dict(dict(SDXL_VAE))).eval()
    images = load_split_images("sample", args.resolution)
    held_out = images.images[images.splits["held-out"]]
    reference = encode_decode(original, held_out)  # the original's fp32 latents and decode
    driven = KLAutoencoder(original.config)
    driven.load_state_dict(original.state_dict())
    train_split = images.images[images.splits["training"]]
    drives = drive_(driven, train_split, args.drive_to)
    args.out.mkdir(parents=True, exist_ok=True)
    driven.eval().save_pretrained(args.out / "driven")
    result = {"parameters_M": round(original.num_parameters() / 1e6, 2), "resolution": args.resolution,
              "steps": args.steps, "batch_size": args.batch_size, "drives": drives, "fp16_max": FP16_MAX,
              "threads": torch.get_num_threads(), "original": measure(original, held_out, reference),
              "before": measure(driven, held_out, reference)}
    print(json.dumps(result["before"], indent=1), flush=True)
    result["train_seconds"] = run_recipe(args.out / "driven", args.out / "run", args)
    fixed = KLAutoencoder.from_pretrained(args.out / "run" / "vae").eval()
    result["after"] = measure(fixed, held_out, reference)
    result["export_keeps"] = {k: [getattr(fixed.config, k), getattr(original.config, k)]
                              for k in ("scaling_factor", "shift_factor", "sample_size", "force_upcast")}
    write_json(args.out / "fp16_fix.json", result, indent=1, default=str)
    print(table(result["original"], result["before"], result["after"]))
    print(f"recipe: {args.steps} calibration batches x {args.batch_size} images at {args.resolution} px in "
          f"{result['train_seconds']:.0f} s; export keeps {result['export_keeps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
