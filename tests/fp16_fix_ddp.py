"""configs/fp16-fix.yaml's rescale on every rank of a multi-process run in which only rank 1's images overflow (rank
0's are blanked): each rank writes its rescaled weights, OUT/rank<r>.safetensors, and OUT/rank<r>.json (world size,
force_upcast decision). For tests/test_fp16.py, launched with `accelerate launch --num_processes 2`. Arguments:
dotted overrides of configs/fp16-fix.yaml."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from kl_autoencoder.config import load_config  # noqa: E402
from kl_autoencoder.fp16_fix import build_fp16_fix  # noqa: E402
from kl_autoencoder.trainer import Training, train  # noqa: E402


def main(overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "fp16-fix.yaml", overrides)
    built: dict[str, Training] = {}

    def build(config):
        t = build_fp16_fix(config)
        step, rank = t.step_fn, t.accelerator.process_index

        def blank_on_rank_0(t, x, s, micro=0):
            return step(t, x * 0 if rank == 0 else x, s, micro)

        t.step_fn, built["t"] = blank_on_rank_0, t
        return t

    train(cfg, build=build)
    t = built["t"]
    rank, out = t.accelerator.process_index, Path(cfg.train.output_dir)
    weights = {k: v.detach().contiguous() for k, v in t.raw_model.state_dict().items()}
    save_file(weights, out / f"rank{rank}.safetensors")
    calibration = getattr(built["t"].export_fn, "calibration", None)
    decision = calibration.force_upcast() if calibration is not None else None
    (out / f"rank{rank}.json").write_text(json.dumps({"world": t.accelerator.num_processes, "force_upcast": decision}))


if __name__ == "__main__":
    main(sys.argv[1:])
