"""What every benchmark script shares, so each script holds only what it measures: this checkout on `sys.path`, the
common flags, the header every report starts with (date, machine, the command that reproduces it), markdown tables
and result files.

A script runs as `python benchmarks/NAME.py`, which puts this folder on `sys.path`; `import harness` before any
`kl_autoencoder` import then puts the checkout first, so a benchmark measures the code beside it, not an installed
copy. How a benchmark times and measures memory is in `measure.py`; the reference it races in `reference.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

# The harness self-tests' model (--tiny): two levels, a few channels, no attention; seconds on a CPU.
TINY_ARCHITECTURE = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                         mid_block_add_attention=False)


# ------------------------------------------------------------------------------------------------ flags


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--device cpu|cuda, by default CUDA when there is one."""
    p.add_argument("--device", default=default or ("cuda" if torch.cuda.is_available() else "cpu"),
                   choices=["cpu", "cuda"])


def add_config(p: argparse.ArgumentParser, name: str = "quickstart", help: str | None = None) -> None:
    """--config, by default configs/NAME.yaml of this checkout."""
    p.add_argument("--config", default=str(ROOT / "configs" / f"{name}.yaml"), help=help)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the results here")


def checked_device(name: str) -> torch.device:
    """The --device as a torch.device; a clear stop when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {repeats}")


# ------------------------------------------------------------------------------------------------ header


def machine_line(device: torch.device) -> str:
    """The GPU's name, or the CPU, its cores and torch's threads; the load average; torch's version."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.1f/%.1f/%.1f" % os.getloadavg()
    return f"{what}{load}; torch {torch.__version__}"


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/SCRIPT ARGS...`: the line that reproduces this run (argv, else the process's own)."""
    return f"python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}"


def header(script: str, argv: list[str] | None, device: torch.device) -> str:
    """A report's first two lines: the UTC time and the machine, then the command that reproduces it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y-%m-%d %H:%M} UTC | {machine_line(device)}\ncommand: {command_line(script, argv)}"


# ------------------------------------------------------------------------------------------------ tables and files


def format_value(value: float | None) -> str:
    """Three significant digits below 100, whole numbers above; "-" for no value."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def printed_ratio(value: float, base: float | None) -> float | None:
    """value / base from the numbers as `format_value` prints them, so a table's arithmetic checks out by eye."""
    if base is None or float(format_value(base)) == 0:
        return None
    return float(format_value(value)) / float(format_value(base))


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def rate_table(what: str, rows: list[tuple[str, float]]) -> str:
    """One row per measured path: its name and images/s."""
    return markdown_table([what, "images/s"], [[name, f"{value:.1f}"] for name, value in rows])


def write_json(path: str | Path, result: Any, indent: int = 2, **dumps: Any) -> None:
    """`result` as JSON at `path`, written atomically (a reader never sees half a file)."""
    from kl_autoencoder.durable import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=indent, **dumps))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One dict per non-empty line (a run's metrics.jsonl); [] when there is no file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
