"""How a distilled tiny autoencoder approaches its teacher with steps: one `kl-autoencoder distill` run, evaluated
at several of its checkpoints.

    python benchmarks/distill.py --teacher tests/assets/trained-f8 --steps 200 500 1000 --out /tmp/distill-bench

Trains with configs/distill.yaml (plus any `section.key=value` overrides) for max(--steps) steps, checkpointing at
each of --steps; then, per checkpoint, writes the student as an AutoencoderTiny folder and runs the project's
`evaluate` on it beside the teacher (built-in sample photos at --resolution, held-out photos first). Prints a
markdown table: decode PSNR / SSIM against the teacher's decode (the student decoding the teacher's latents), round
trip against the teacher, PSNR against the originals for student and teacher, and the wall time of training. The
checkpoints are points of one run on the recipe's schedule (cosine over max(--steps)), not separate shorter runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safetensors.torch import load_file

from harness import ROOT, write_json  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder.config import load_config
from kl_autoencoder.distill import build_distillation
from kl_autoencoder.evaluation import evaluate
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiny import build_student
from kl_autoencoder.trainer import train


def checkpoint_every(steps: list[int]) -> int:
    """The largest interval that lands on every requested step."""
    from math import gcd

    interval = 0
    for step in steps:
        interval = gcd(interval, step)
    return interval


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(ROOT / "tests" / "assets" / "trained-f8"))
    p.add_argument("--config", default=str(ROOT / "configs" / "distill.yaml"))
    p.add_argument("--steps", type=int, nargs="+", default=[200, 500, 1000])
    p.add_argument("--resolution", type=int, default=128, help="evaluation crop (default 128)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. distill.width=32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = sorted(set(args.steps))
    run_dir = args.out / "run"
    cfg = load_config(args.config, [f"distill.teacher={json.dumps(args.teacher)}", f"train.output_dir={run_dir}",
                                    f"train.max_steps={steps[-1]}", f"train.checkpoint_every={checkpoint_every(steps)}",
                                    f"train.keep_checkpoints={steps[-1] // checkpoint_every(steps)}",
                                    "train.image_every=0", *args.overrides])
    start = time.perf_counter()
    train(cfg, build=build_distillation)
    train_seconds = time.perf_counter() - start

    teacher_config = KLAutoencoder.from_pretrained(args.teacher).config
    rows = []
    for step in steps:
        student = build_student(teacher_config, cfg.distill.width, cfg.distill.encoder_blocks,
                                cfg.distill.decoder_blocks)
        student.load_state_dict(load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
        folder = student.save_pretrained(args.out / f"student-{step}")
        result = evaluate([str(folder), args.teacher], "sample", args.out / f"eval-{step}", resolution=args.resolution,
                          progress=False)
        student_name, teacher_name = list(result["models"])
        entry, teacher = result["models"][student_name], result["models"][teacher_name]
        for split in result["splits"]:
            rows.append({
                "step": step, "split": split, "num_images": len(result["splits"][split]),
                "decode_psnr": entry["teacher"]["decode"]["splits"][split]["psnr"]["mean"],
                "decode_ssim": entry["teacher"]["decode"]["splits"][split]["ssim"]["mean"],
                "round_trip_psnr": entry["teacher"]["round_trip"]["splits"][split]["psnr"]["mean"],
                "student_vs_originals_psnr": entry["splits"][split]["psnr"]["mean"],
                "teacher_vs_originals_psnr": teacher["splits"][split]["psnr"]["mean"],
            })
    summary = {"teacher": args.teacher, "config": args.config, "overrides": args.overrides,
               "resolution": args.resolution, "train_seconds": train_seconds, "rows": rows}
    write_json(args.out / "distill_benchmark.json", summary)
    print(f"training: {steps[-1]} steps in {train_seconds:.0f} s")
    print("| step | images | decode PSNR vs teacher (dB) | decode SSIM vs teacher | round trip PSNR vs teacher (dB) "
          "| student PSNR vs originals (dB) | teacher PSNR vs originals (dB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['split']} ({r['num_images']}) | {r['decode_psnr']:.2f} | {r['decode_ssim']:.3f} | "
              f"{r['round_trip_psnr']:.2f} | {r['student_vs_originals_psnr']:.2f} | "
              f"{r['teacher_vs_originals_psnr']:.2f} |")
    return summary


if __name__ == "__main__":
    main()
