"""Many short production training runs at once, for choosing a recipe by its spread over seeds, not one lucky run.

    python benchmarks/recipe_sweep.py benchmarks/results/recipe_sweep_jobs.json --config \\
        benchmarks/results/recipe_sweep_base.yaml --workers 15 --out results.jsonl

Each job ({"name", "seed", "overrides"}) is `trainer.train` of the config with its overrides (the real loop, data
pipeline and export), in its own process on one CPU thread (the GPU, when there is one, is shared by all workers),
then the export is measured on the held-out and the training sample photos at 256x256 (posterior mode; PSNR, SSIM,
mean colour error; scaled-latent std of a posterior sample). One JSON line per job, written as each finishes.
BENCHMARKS.md ("What makes the quickstart carry colour") was made with this on an H200 machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def measure(model: Any, split: str) -> dict[str, Any]:
    """Held-out or training sample photos at 256x256 through `model`: per-image and mean quality."""
    from kl_autoencoder.data import load_eval_images
    from quality import held_out_quality  # benchmarks/quality.py

    _, x = load_eval_images(f"sample:{split}", 256)
    q = held_out_quality(model.encode, model.decode, model.to_diffusion_latents, x, per_image=True)
    return {"psnr": round(q["psnr"], 2), "psnr_each": [round(v, 2) for v in q["psnr_each"]],
            "ssim": round(q["ssim"], 3), "colour": round(q["colour_error"], 4),
            "colour_each": [round(v, 3) for v in q["colour_error_each"]], "latent_std": round(q["latent_std"], 3)}


def run_job(args: tuple[dict[str, Any], str, str]) -> dict[str, Any]:
    job, config, workdir = args
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from kl_autoencoder.config import load_config
    from kl_autoencoder.model import KLAutoencoder
    from kl_autoencoder.trainer import train

    out = Path(workdir) / f"{job['name']}_s{job['seed']}"
    overrides = list(job["overrides"]) + [f"train.seed={job['seed']}", f"train.output_dir={out}", "train.overwrite=true",
                                          "train.image_every=0", "train.checkpoint_every=0", "train.log_every=100",
                                          "data.num_workers=0"]
    start = time.time()
    result: dict[str, Any] = {"name": job["name"], "seed": job["seed"]}
    try:
        model = KLAutoencoder.from_pretrained(train(load_config(config, overrides))).eval()
        result["train_s"] = round(time.time() - start, 1)
        result.update(heldout=measure(model, "heldout"), train=measure(model, "train"),
                      scaling_factor=float(model.config.scaling_factor))
    except Exception as err:  # one bad job must not end the sweep: its error is its result line
        result.update(error=repr(err), traceback=traceback.format_exc()[-1500:])
    result["total_s"] = round(time.time() - start, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jobs", help="JSON list of {name, seed, overrides}")
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--out", default="recipe_sweep.jsonl", help="appended to, one line per job")
    args = p.parse_args(argv)
    jobs = json.loads(Path(args.jobs).read_text())
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir, open(args.out, "a") as out, \
            mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(run_job, [(job, args.config, workdir) for job in jobs]):
            result["at_s"] = round(time.time() - start, 1)
            out.write(json.dumps(result) + "\n")
            out.flush()
            held = result.get("heldout", {})
            print(result["name"], result["seed"], held.get("psnr"), held.get("colour"), result.get("error", ""),
                  flush=True)


if __name__ == "__main__":
    main()
