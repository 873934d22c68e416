"""A training run (the production `train` and `train_step`) that, on every rank, records each step's loss terms and
at the end writes that rank's autoencoder and discriminator weights: OUT/rank<r>.safetensors and OUT/rank<r>.json.
For tests/test_gan_ddp.py, launched with `accelerate launch --num_processes 2`. Arguments: dotted overrides."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from kl_autoencoder.config import load_config  # noqa: E402
from kl_autoencoder.fastpath import unwrap  # noqa: E402
from kl_autoencoder.trainer import Training, build_training, train, train_step  # noqa: E402


def main(overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    built: dict[str, Training] = {}
    steps: list[dict[str, float]] = []

    def recorded_step(t: Training, x, step: int, micro: int = 0):
        result = train_step(t, x, step, micro)
        steps.append({"step": step, **{k: float(v.float().mean()) for k, v in result.logs.items()}})
        return result

    def build(config):
        t = build_training(config)
        t.step_fn = recorded_step
        built["t"] = t
        built["initial"] = {k: v.detach().clone() for k, v in unwrap(t.discriminator).state_dict().items()}
        return t

    train(cfg, build=build)
    t = built["t"]
    rank = t.accelerator.process_index
    state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in t.raw_model.state_dict().items()}
    state |= {f"disc.{k}": v.detach().cpu().contiguous() for k, v in unwrap(t.discriminator).state_dict().items()}
    state |= {f"initial_disc.{k}": v.cpu().contiguous() for k, v in built["initial"].items()}
    out = Path(cfg.train.output_dir)
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world": t.accelerator.num_processes, "steps": steps}))


if __name__ == "__main__":
    main(sys.argv[1:])
