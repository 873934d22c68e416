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
Times: teacher and student interleaved round by round (benchmarks/run.py `interleaved_times`), medians, images/s.
Peak memory: benchmarks/run.py `peak_memory_bytes` (CUDA: max_memory_allocated above the baseline; CPU: the profiler's
high-water mark of tensors the call creates), at --memory-resolution (default: the resolution).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kl_autoencoder.fastpath import FastPath, prepare_for_inference, to_model_input  # noqa: E402
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder  # noqa: E402
from kl_autoencoder.tiny import TinyAutoencoder, build_student  # noqa: E402

from run import format_value, interleaved_times, machine_line, median, peak_memory_bytes  # noqa: E402


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
    lines = ["| measurement | unit | student | teacher | student / teacher |", "|---|---|---|---|---|"]
    for name, unit, student, teacher in rows:
        ratio = float(format_value(student)) / float(format_value(teacher))
        lines.append(f"| {name} | {unit} | {format_value(student)} | {format_value(teacher)} | {ratio:.3g}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default=str(ROOT / "configs" / "kl-f8.yaml"), help="the teacher's architecture")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side before the rounds")
    p.add_argument("--memory-resolution", type=int, default=None, help="resolution of the peak-memory rows")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
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
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {machine_line(device)}\n"
              f"command: python benchmarks/tiny.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"teacher {Path(args.config).name} {list(teacher.config.block_out_channels)}, student "
              f"{list(student.config.num_encoder_blocks)}/{list(student.config.num_decoder_blocks)} x "
              f"{student.config.encoder_block_out_channels[0]}, batch {b}, repeats {args.repeats}, "
              f"warm-up {args.warmup}")
    table = markdown_table(rows)
    print(header, table, sep="\n", flush=True)
    result = {"header": header, "rows": [dict(name=n, unit=u, student=s, teacher=t) for n, u, s, t in rows],
              "seconds": seconds}
    if args.json:
        from kl_autoencoder.durable import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
