"""What validation costs the main job: a pass's time and a training step's, measured in the same run, on this machine.

    python benchmarks/validation_cost.py                      # configs/quickstart.yaml, 200 steps, a pass every 20
    python benchmarks/validation_cost.py --steps 300 --every 30 --config configs/quickstart.yaml

Trains the config for --steps steps with a validation pass every --every steps (the real loop, `train`), then reads
its metrics.jsonl: each pass's `val/seconds`, and the training step time from the log intervals that hold no pass
(log_every steps / the interval's wall time). Both come from the same process, interleaved, so a machine shared with
other work slows both alike. Prints one JSON line: the medians, and the main job's cost: the config's own passes
(train.max_steps / validation.every, and one at the last step when that is not a multiple) x the pass time, over
train.max_steps x the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from harness import ROOT, read_jsonl  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder.config import load_config
from kl_autoencoder.trainer import train


def measure(config: Path, steps: int, every: int, out: Path) -> dict:
    main_job = load_config(config)
    cfg = load_config(config, [f"train.max_steps={steps}", f"validation.every={every}", f"train.output_dir={out}",
                               "train.checkpoint_every=0"])
    train(cfg)
    lines = read_jsonl(out / "metrics.jsonl")
    passes = {m["step"]: m["val/seconds"] for m in lines if "val/seconds" in m}
    logged = [m for m in lines if "images_per_second" in m]
    per_step = []
    for before, after in zip(logged, logged[1:]):
        if before["step"] not in passes:  # a pass after the log at `before` falls into this interval
            images = (after["step"] - before["step"]) * cfg.train.batch_size
            per_step.append(images / after["images_per_second"] / (after["step"] - before["step"]))
    if not passes or not per_step:
        raise SystemExit(f"--steps {steps} --every {every}: the run needs at least one validation pass and one log "
                         f"interval without one (train.log_every is {cfg.train.log_every}); give more steps")
    pass_s, step_s = statistics.median(passes.values()), statistics.median(per_step)
    job_steps, job_every = main_job.train.max_steps, main_job.validation.every
    job_passes = (job_steps // job_every + (job_steps % job_every != 0)) if job_every else 0
    return {"config": str(config), "steps": steps, "every": every, "passes": len(passes),
            "pass_seconds_median": round(pass_s, 4), "step_seconds_median": round(step_s, 4),
            "pass_in_steps": round(pass_s / step_s, 2), "main_job_steps": job_steps, "main_job_passes": job_passes,
            "main_job_cost_percent": round(100 * job_passes * pass_s / (job_steps * step_s), 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(args.config, args.steps, args.every, Path(folder) / "run")))


if __name__ == "__main__":
    main()
