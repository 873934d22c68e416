"""A training run (the production `train`) in which rank 1 alone is sent SIGTERM after step STEP, as a scheduler's
preemption may reach one process first; every rank writes where it stopped: OUT/rank<r>.json.
For tests/test_trainer.py, launched with `accelerate launch --num_processes 2`. Arguments: STEP, dotted overrides."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kl_autoencoder.config import load_config  # noqa: E402
from kl_autoencoder.trainer import Training, TrainingInterrupted, build_training, train, train_step  # noqa: E402


def main(signal_after: int, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    built: dict[str, Training] = {}

    def step_then_signal(t: Training, x, step: int, micro: int = 0):
        result = train_step(t, x, step, micro)
        if step + 1 == signal_after and t.accelerator.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def build(config):
        built["t"] = t = build_training(config)
        t.step_fn = step_then_signal
        return t

    try:
        train(cfg, build=build)
        stopped = {"step": None}
    except TrainingInterrupted as stop:
        stopped = {"step": stop.step, "signal": stop.signal_name, "checkpoint": str(stop.checkpoint)}
    rank = built["t"].accelerator.process_index
    (Path(cfg.train.output_dir) / f"rank{rank}.json").write_text(json.dumps(stopped))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
