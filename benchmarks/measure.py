"""How the benchmarks measure, in one place so every table means the same thing by "time" and "peak memory".

- Time: `interleaved_times` runs the sides round by round, alternating who goes first, warm-up excluded; a table
  shows the `median`. `images_per_second` times batches drawn from a stream; `training_rate` a config's step.
- Peak memory in-process (`peak_memory_bytes`): on CUDA `max_memory_allocated` above the pre-call baseline; on a
  CPU, torch has no allocator statistics, so the profiler's memory timeline: the high-water mark of the running sum
  of tensors the call creates minus those it destroys (weights, optimizer state and batch that existed before it
  are excluded, identically for every side).
- Peak memory of a fresh process (`peak_rss_bytes`, `run_child`): the growth of the process's peak resident memory,
  each measurement in its own subprocess, for sizes where activations dwarf the noise of RSS.
- FLOPs (`flops_of`): torch.utils.flop_counter over one eager call.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1,
                      cpu: dict[str, list[float]] | None = None, min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin (the order alternates each round); warm-up calls excluded.
    `cpu`, when given, also gets each call's process CPU seconds (far less disturbed by a loaded machine).
    `min_seconds`: each sample times the same number of back-to-back calls for every fn, enough that the fastest
    warm-up call repeated lasts this long (a 5 ms encode timed once is mostly timer and scheduler noise)."""
    warm: list[float] = []
    for fn in fns.values():
        for _ in range(warmup):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            warm.append(time.perf_counter() - start)
    calls = 1
    if min_seconds > 0 and warm:
        calls = max(1, math.ceil(min_seconds / max(min(warm), 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls)
            if cpu is not None:
                cpu.setdefault(name, []).append((time.process_time() - cpu_start) / calls)
    return times


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes held by tensors the call allocates, at their high-water mark (see the module docstring)."""
    fn()  # warm: optimizer state, caches and lazy buffers exist before we measure
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    running = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda event: event[0]):
        if action == Action.CREATE:  # PREEXISTING tensors (weights, optimizer state, the batch) are not counted
            running += size
        elif action == Action.DESTROY:
            running -= size
        peak = max(peak, running)
    return peak


def flops_of(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(command: list[str], what: str) -> dict[str, Any]:
    """Run one measurement in a fresh process; its result is the JSON object on its last line of output."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def images_per_second(stream: Iterator[dict[str, torch.Tensor]], batches: int) -> float:
    """Images/s of the next `batches` batches of a stream (its "pixel_values"); what came before is not timed."""
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)["pixel_values"].shape[0]
    return images / (time.perf_counter() - start)


def training_rate(cfg: Any, steps: int) -> float:
    """Images/s of the config's training step (`trainer.train_step`) on a fixed batch, one warm-up step excluded."""
    from kl_autoencoder.trainer import build_training, train_step

    t = build_training(cfg)
    x = torch.rand(cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    train_step(t, x, 0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        train_step(t, x, step)
    return steps * x.shape[0] / (time.perf_counter() - start)
