"""A distilled tiny autoencoder (kl_autoencoder.tiny, diffusers' AutoencoderTiny) against its teacher: speed and memory.

    python benchmarks/tiny.py                                          # kl-f8 teacher vs its TAESD-sized student, 512^2
    python benchmarks/tiny.py --resolution 512 --repeats 1 --warmup 0 --memory-resolution 256   # ~3 min on 2 cores
    python benchmarks/tiny.py --device cuda --batch-size 8 --repeats 10

Teacher: a KLAutoencoder with the architecture of --config (default configs/kl-f8.yaml: the Stable Diffusion VAE,
83.7 M parameters); student: `build_student(teacher.config)` (TAESD for an f8 teacher). Random weights: speed and
memory do not depend on the values. Both run as the library runs inference (`fastpath.prepare_for_inference`: eval,
NHWC, under inference_mode).
  decode   teacher: latents z -> image;  student: teacher.to_diffusion_latents(z) -> image (what a pipeline hands it)
  encode   teacher: posterior mean;      student: its latents
Times: teacher and student interleaved round by round (benchmarks/measure.py `interleaved_times`), medians, images/s.
Peak memory: benchmarks/measure.py `peak_memory_bytes` (CUDA: max_memory_allocated above the baseline; CPU: the profiler's
high-water mark of tensors the call creates), at --memory-resolution (default: the resolution).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from harness import format_value, header, printed_ratio, write_json
from measure import interleaved_times, median, peak_memory_bytes

from kl_autoencoder.fastpath import FastPath, prepare_for_inference, to_model_input
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.tiny import TinyAutoencoder, build_student


def build_pair(config_path: str, device: torch.device) -> tuple[KLAutoencoder, TinyAutoencoder]:
    from kl_autoencoder.config import load_config

    torch.manual_seed(0)
    teacher = KLAutoencoder(AutoencoderConfig.from_dict(dict(load_config(config_path).model.architecture)))
    student = build_student(teacher.config)
    return prepare_for_inference(teacher, device), prepare_for_inference(student, device)


def calls(teacher: KLAutoencoder, student: TinyAutoencoder, resolution: int, batch_size: int, device: torch.device
          ) -> dict[str, dict[str, Callable[[], Any]]]:
    """{'decode': {'teacher': fn, 'student': fn}, 'encode': {...}} on one random batch, in the inference layout."""
    fast = FastPath.for_device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1
    z = torch.randn(batch_size, *teacher.config.latent_shape(resolution, resolution), generator=generator)
    x, z = (to_model_input(t.to(device), fast) for t in (x, z))
    latents = to_model_input(teacher.to_diffusion_latents(z), fast)

    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> None:
            with torch.inference_mode():
                fn()
        return call

    return {"decode": {"teacher": run(lambda: teacher.decode(z)), "student": run(lambda: student.decode(latents))},
            "encode": {"teacher": run(lambda: teacher.encode(x).mode()), "student": run(lambda: student.encode(x))}}


def markdown_table(rows: list[tuple[str, str, float, float]]) -> str:
    """student / teacher from the numbers as printed."""
    def ratio(student: float, teacher: float) -> str:
        value = printed_ratio(student, teacher)
        return "-" if value is None else f"{value:.3g}x"

    return harness.markdown_table(["measurement", "unit", "student", "teacher", "student / teacher"],
                                  [[name, unit, format_value(student), format_value(teacher), ratio(student, teacher)]
                                   for name, unit, student, teacher in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    harness.add_device(p)
    harness.add_config(p, "kl-f8", help="the teacher's architecture")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side before the rounds")
    p.add_argument("--memory-resolution", type=int, default=None, help="resolution of the peak-memory rows")
    p.add_argument("--no-memory", action="store_true")
    harness.add_json(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    harness.check_repeats(args.repeats)
    device = harness.checked_device(args.device)
    teacher, student = build_pair(args.config, device)
    f = teacher.config.downsampling_factor
    if args.resolution % f:
        raise SystemExit(f"--resolution {args.resolution} is not a multiple of the teacher's factor {f}")
    rows: list[tuple[str, str, float, float]] = [
        ("parameters", "M", student.num_parameters() / 1e6, teacher.num_parameters() / 1e6)]
    seconds: dict[str, Any] = {}
    b = args.batch_size
    for job, fns in calls(teacher, student, args.resolution, b, device).items():
        times = interleaved_times(fns, args.repeats, device, warmup=args.warmup)
        rows.append((f"{job} {args.resolution}^2", "images/s", b / median(times["student"]),
                     b / median(times["teacher"])))
        seconds[job] = times
    if not args.no_memory:
        size = args.memory_resolution or args.resolution
        for job, fns in calls(teacher, student, size, b, device).items():
            rows.append((f"{job} {size}^2 peak memory", "MiB", peak_memory_bytes(fns["student"], device) / 2**20,
                         peak_memory_bytes(fns["teacher"], device) / 2**20))
    text = (f"{header('tiny.py', argv, device)}\n"
            f"teacher {Path(args.config).name} {list(teacher.config.block_out_channels)}, student "
            f"{list(student.config.num_encoder_blocks)}/{list(student.config.num_decoder_blocks)} x "
            f"{student.config.encoder_block_out_channels[0]}, batch {b}, repeats {args.repeats}, "
            f"warm-up {args.warmup}")
    print(text, markdown_table(rows), sep="\n", flush=True)
    result = {"header": text, "rows": [dict(name=n, unit=u, student=s, teacher=t) for n, u, s, t in rows],
              "seconds": seconds}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
