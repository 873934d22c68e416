"""Every shipped recipe (configs/*.yaml) rehearsed as the README runs it, then its export checked against its promises.

    python benchmarks/rehearse.py                          # the fast part: the cheap recipes, 64² crops, few steps
    python benchmarks/rehearse.py --full                   # every recipe at its own resolution
    python benchmarks/rehearse.py --recipes kl-f8 fp16-fix --out outputs/rehearsal

Each recipe runs in its own process exactly as its README (or config comment) line launches it: `accelerate launch`
with the README's `--config_file` (2 processes, DDP over gloo on a CPU, for the recipes meant for several GPUs),
`python training/train.py`, or `kl-autoencoder distill`, on the full architecture and the built-in `sample` photos,
shrunk only in steps, batch and data (`train.max_steps`, `train.batch_size`, `train.scaling_images`; the fast part
also lowers `data.resolution`). bf16 recipes keep bf16 where the CPU has native bf16 (avx512_bf16 / amx_bf16), else
run fp32. Fine-tunes start from a released VAE's layout built at full size with random weights (SD for
finetune-decoder and eq-finetune, SDXL for fp16-fix) and LPIPS uses a random VGG (no download).

What each export must be is read from the recipe's config (`promises`), independently of the trainer's own decision:
- trained from scratch: `scaling_factor` measured (the scaled latents of held-out crops, encoded by diffusers, have
  a std within 2x of 1), `shift_factor` measured at >= 16 latent channels (SD3/FLUX) and absent below,
  `sample_size` = the training resolution, `force_upcast` = the config's (default true);
- encoder fine-tuned: factors re-measured, `sample_size` / `force_upcast` the source's, `latents_mean/std` dropped;
- encoder frozen: every latent field the source's;
- fp16 fix: every latent field the source's except `force_upcast: false` (pipelines run it in fp16);
- distillation: a diffusers `AutoencoderTiny` with `scaling_factor` 1 and `shift_factor` 0;
and for every recipe: diffusers loads the export without a warning (beyond what it says of a folder it saved
itself), a pipeline's decode step (latents / scaling_factor + shift_factor, `vae.decode`,
`VaeImageProcessor.postprocess`) turns its latents into finite images, every logged value is finite, and the loss
falls where at least 20 steps ran. A check listed in KNOWN is a promise known not to hold yet: reported as `known`
(or `fixed` once it holds), it does not fail the run. Writes rehearsal[-full].json and .md (to --out, else
benchmarks/results/); exits 1 when any other check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import harness  # benchmarks/harness.py, first: this checkout on sys.path
from harness import RESULTS, ROOT, command_line, read_jsonl, write_json

from kl_autoencoder.config import TrainConfig, load_config
from kl_autoencoder.data import load_eval_images
from kl_autoencoder.durable import atomic_write_text
from kl_autoencoder.formats import WEIGHTS_NAME, diffusers_config
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
from kl_autoencoder.presets import LATENT_FIELDS, LATENT_SCALE_KEY, PRESETS

SINGLE = ["--config_file", "configs/accelerate/single-process.yaml"]
MULTI = ["--config_file", "configs/accelerate/multi-gpu.yaml", "--num_processes", "2"]
FAST_RECIPES = ("quickstart", "kl-f8", "kl-f8-c16", "finetune-decoder")
FALL_STEPS = 20  # the loss must fall over a run of at least this many steps
NO_VGG = ("loss.perceptual_pretrained=false",)  # no download: LPIPS on a random VGG


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One shipped config as its README line runs it. `launch`: accelerate (`SINGLE` / `MULTI` --config_file
    arguments), "python" (training/train.py) or "distill" (the CLI); `source`: the released layout it fine-tunes
    (a PRESETS name), or "quickstart" for the distillation teacher; steps / batch for the fast and the full run."""

    name: str
    launch: list[str] | str
    source: str | None = None
    extra: tuple[str, ...] = ()
    fast_resolution: int | None = None
    steps: tuple[int, int] = (1, 2)
    batch: tuple[int, int] = (1, 1)


RECIPES = {r.name: r for r in (
    Recipe("quickstart", SINGLE, steps=(30, 60), batch=(8, 8)),
    Recipe("kl-f8", MULTI, extra=NO_VGG, fast_resolution=64),
    Recipe("kl-f8-c16", MULTI, extra=NO_VGG, fast_resolution=64),
    Recipe("finetune-decoder", SINGLE, source="sd", extra=NO_VGG, fast_resolution=64),
    Recipe("fp16-fix", "python", source="sdxl", fast_resolution=64),
    Recipe("eq-finetune", "python", source="sd", extra=NO_VGG, fast_resolution=64),
    Recipe("distill", "distill", source="quickstart", steps=(2, 30), batch=(2, 8)),
)}

# (recipe, check) -> why: promises known not to hold yet (reported as "known", or "fixed" once they hold)
KNOWN: dict[tuple[str, str], str] = {}


def native_bf16() -> bool:
    """Whether bf16 autocast runs natively here: any CUDA device, or a CPU with avx512_bf16 / amx_bf16."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_source(name: str, root: Path) -> Path:
    """A released VAE's diffusers folder (its config.json as the release ships it) at full size, random weights."""
    folder = root / name
    if not folder.exists():
        torch.manual_seed(0)
        model = KLAutoencoder(AutoencoderConfig.from_dict(PRESETS[name].architecture()))
        folder.mkdir(parents=True)
        save_file(model.state_dict(), folder / WEIGHTS_NAME)
        (folder / "config.json").write_text(json.dumps(diffusers_config(PRESETS[name].architecture())))
    return folder


def overrides_for(recipe: Recipe, full: bool, out: Path, source: Path | None, steps: int | None,
                  batch: int | None) -> list[str]:
    """The README line's overrides plus the shrinking ones: steps, batch, crops measured, (fast) resolution."""
    args = [f"train.max_steps={steps or recipe.steps[full]}", f"train.batch_size={batch or recipe.batch[full]}",
            "train.log_every=1", "train.image_every=0", "train.scaling_images=16", *recipe.extra]
    if not full and recipe.fast_resolution:
        args.append(f"data.resolution={recipe.fast_resolution}")
    if source is not None and recipe.launch != "distill":
        args.append(f"model.pretrained={source}")
    config = load_config(ROOT / "configs" / f"{recipe.name}.yaml", args)
    if config.train.mixed_precision == "bf16" and not native_bf16():
        args.append("train.mixed_precision=no")
    return args + [f"train.output_dir={out}"]


def command(recipe: Recipe, overrides: list[str], source: Path | None, out: Path) -> tuple[list[str], dict]:
    """The argv and environment of the README's line for `recipe`."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's package, whatever is installed
    config = f"configs/{recipe.name}.yaml"
    if recipe.launch == "distill":
        return ([sys.executable, "-m", "kl_autoencoder.cli", "distill", "--teacher", str(source), "--data", "sample",
                 "--out", str(out), *[o for o in overrides if not o.startswith("train.output_dir=")]], env)
    if recipe.launch == "python":
        return [sys.executable, "training/train.py", "--config", config, *overrides], env
    if recipe.launch == MULTI and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo: 2 CPU processes stand for the GPUs
    return ([sys.executable, "-m", "accelerate.commands.launch", *recipe.launch, "-q", "training/train.py",
             "--config", config, *overrides], env)


def shown(argv: list[str], env: dict) -> str:
    """`argv` as the README writes it (accelerate launch, kl-autoencoder, python)."""
    names = {"accelerate.commands.launch": "accelerate launch", "kl_autoencoder.cli": "kl-autoencoder"}
    words = [names[argv[2]], *argv[3:]] if argv[1] == "-m" else ["python", *argv[1:]]
    return ("ACCELERATE_USE_CPU=true " if env.get("ACCELERATE_USE_CPU") else "") + " ".join(words)


# ----------------------------------------------------------------------------------------------- promises


def source_config(source: Path | None) -> dict[str, Any] | None:
    """The source's stored config.json over the model defaults (what a field it leaves out means)."""
    if source is None:
        return None
    return AutoencoderConfig().to_dict() | json.loads((source / "config.json").read_text())


def promises(cfg: TrainConfig, source: dict[str, Any] | None) -> dict[str, Any]:
    """What the recipe's export promises, from its config (and its source's) alone: {"latent_scale": measured|kept,
    field: value or "measured"}."""
    arch = cfg.model.architecture
    kept = {k: source[k] for k in LATENT_FIELDS} if source else {}
    if cfg.fp16_fix.enabled:
        return {"latent_scale": "kept", **kept, "force_upcast": False}
    if source and cfg.model.freeze_encoder:
        return {"latent_scale": "kept", **kept}
    channels = (source or arch).get("latent_channels", AutoencoderConfig().latent_channels)
    wants_shift = cfg.train.export_shift_factor
    shift = "measured" if (channels >= 16 if wants_shift is None else wants_shift) else None
    measured = {"latent_scale": "measured", "scaling_factor": "measured", "shift_factor": shift,
                "latents_mean": None, "latents_std": None}
    if source:
        return measured | {"sample_size": source["sample_size"], "force_upcast": source["force_upcast"]}
    return measured | {"sample_size": arch.get("sample_size", cfg.data.resolution),
                       "force_upcast": arch.get("force_upcast", True)}


# ----------------------------------------------------------------------------------------------- checks


class Collected(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_quietly(cls, path: Path):
    """diffusers' `cls.from_pretrained(path)` and every warning it logged or raised."""
    handler, logger = Collected(), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = cls.from_pretrained(path).eval()
    finally:
        logger.removeHandler(handler)
    return model, handler.messages + [str(w.message) for w in caught]


def own_save_warnings(cls, config) -> list[str]:
    """What diffusers says loading a folder it saved itself from `config`: the baseline an export is held to
    (AutoencoderTiny records a `block_out_channels`, which pipelines read, that its own loader then calls unexpected)."""
    with tempfile.TemporaryDirectory() as folder:
        cls.from_config(config).save_pretrained(folder)
        return load_quietly(cls, Path(folder))[1]


def pipeline_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """A diffusers pipeline's last step (SD / SDXL / SD3 / FLUX): unscale, decode, postprocess to [0, 1] images."""
    from diffusers.image_processor import VaeImageProcessor

    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + shift).sample
    return VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="pt")


def latent_checks(fields: dict[str, Any], promised: dict[str, Any], record: dict | None) -> list[dict]:
    checks = [{"check": "latent_scale", "expected": promised["latent_scale"],
               "got": (record or {}).get("latent_scale")}]
    for key in LATENT_FIELDS:
        if key not in promised:
            continue
        want, got = promised[key], fields.get(key)
        if want == "measured":
            checks.append({"check": key, "expected": "measured", "got": got,
                           "ok": isinstance(got, (int, float)) and math.isfinite(got)})
        else:
            checks.append({"check": key, "expected": want, "got": got})
    return checks


def check_kl_export(export: Path, resolution: int, promised: dict[str, Any]) -> tuple[list[dict], dict]:
    """The export's fields against the promises; diffusers loads it quietly, encodes held-out crops and decodes."""
    from diffusers import AutoencoderKL

    config = json.loads((export / "config.json").read_text())
    checks = latent_checks(config, promised, config.get(LATENT_SCALE_KEY))
    vae, messages = load_quietly(AutoencoderKL, export)
    checks.append({"check": "diffusers loads quietly", "expected": [], "got": messages})
    _, x = load_eval_images("sample:heldout", resolution)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    scaled = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    std, mean = float(scaled.std()), float(scaled.mean())
    if promised["latent_scale"] == "measured":
        checks.append({"check": "held-out scaled latent std", "expected": "0.5-2", "got": round(std, 3),
                       "ok": 0.5 <= std <= 2.0})
    if promised.get("shift_factor") == "measured":
        checks.append({"check": "held-out scaled latent mean", "expected": "|mean| < 0.5", "got": round(mean, 3),
                       "ok": abs(mean) < 0.5})
    images = pipeline_decode(vae, scaled)
    checks.append({"check": "pipeline decode", "expected": list(x.shape), "got": list(images.shape),
                   "ok": images.shape == x.shape and bool(torch.isfinite(images).all())})
    return checks, {"held_out_std": round(std, 3), "held_out_mean": round(mean, 3)}


def check_tiny_export(export: Path, teacher: Path, resolution: int) -> tuple[list[dict], dict]:
    """The distilled AutoencoderTiny: scale 1 and shift 0, loads quietly, decodes the teacher's diffusion latents."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    config = json.loads((export / "config.json").read_text())
    checks = [{"check": "scaling_factor", "expected": 1.0, "got": config.get("scaling_factor")},
              {"check": "shift_factor", "expected": 0.0, "got": config.get("shift_factor")}]
    tiny, messages = load_quietly(AutoencoderTiny, export)
    checks.append({"check": "diffusers loads quietly", "expected": own_save_warnings(AutoencoderTiny, tiny.config),
                   "got": messages})
    kl = AutoencoderKL.from_pretrained(teacher).eval()
    _, x = load_eval_images("sample:heldout", resolution)
    with torch.no_grad():
        z = kl.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    scaled = (z - (kl.config.shift_factor or 0.0)) * kl.config.scaling_factor
    images = pipeline_decode(tiny, scaled)
    checks.append({"check": "pipeline decode", "expected": list(x.shape), "got": list(images.shape),
                   "ok": images.shape == x.shape and bool(torch.isfinite(images).all())})
    return checks, {}


def loss_checks(run: Path) -> tuple[list[dict], dict]:
    """Every logged number finite; the loss falls (mean of the last 5 logged steps below the first 5's) over a run of
    at least FALL_STEPS steps."""
    logged = read_jsonl(run / "metrics.jsonl")
    bad = sorted({k for m in logged for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)})
    checks = [{"check": "logged values finite", "expected": [], "got": bad},
              {"check": "steps logged", "expected": ">= 1", "got": len(logged), "ok": len(logged) >= 1}]
    losses = [m["loss"] for m in logged if "loss" in m]
    summary = {"steps": len(logged), "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None}
    if len(losses) >= FALL_STEPS:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        checks.append({"check": "loss falls", "expected": "last 5 < first 5", "got": [round(first, 4), round(last, 4)],
                       "ok": last < first})
    return checks, summary


def judge(name: str, checks: list[dict]) -> list[dict]:
    """Each check's status: pass / FAIL, or known / fixed for the KNOWN ones."""
    for c in checks:
        ok = c.pop("ok") if "ok" in c else c["got"] == c["expected"]
        why = KNOWN.get((name, c["check"]))
        c["status"] = ("fixed" if ok else "known") if why else ("pass" if ok else "FAIL")
        if why and not ok:
            c["known"] = why
    return checks


# ----------------------------------------------------------------------------------------------- running


def rehearse(recipe: Recipe, root: Path, sources: Path, full: bool, steps: int | None, batch: int | None,
             timeout: int) -> dict[str, Any]:
    """Run one recipe, then check its export; the result row."""
    out = root / recipe.name
    if recipe.source == "quickstart":
        source = root / "quickstart" / "vae"
    else:
        source = build_source(recipe.source, sources) if recipe.source else None
    overrides = overrides_for(recipe, full, out, source, steps, batch)
    argv, env = command(recipe, overrides, source, out)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    row: dict[str, Any] = {"recipe": recipe.name, "command": shown(argv, env).replace(str(root.parent), "OUT"),
                           "seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode}
    if done.returncode != 0 or not (out / "vae").is_dir():
        row["checks"] = judge(recipe.name, [{"check": "run", "expected": 0, "got": done.returncode}])
        row["log_tail"] = (done.stdout + done.stderr)[-3000:]
        return row
    cfg = load_config(out / "config.yaml")
    if recipe.launch == "distill":
        checks, extra = check_tiny_export(out / "vae", source, cfg.data.resolution)
    else:
        checks, extra = check_kl_export(out / "vae", cfg.data.resolution, promises(cfg, source_config(source)))
        row["export"] = {k: v for k, v in json.loads((out / "vae" / "config.json").read_text()).items()
                         if k in LATENT_FIELDS or k == LATENT_SCALE_KEY}
    more, losses = loss_checks(out)
    row.update({"resolution": cfg.data.resolution, "mixed_precision": cfg.train.mixed_precision, **extra, **losses,
                "checks": judge(recipe.name, checks + more)})
    return row


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: each export's latent fields, the held-out std, the loss and the verdict."""
    lines = ["| recipe | s | res | precision | scaling_factor | shift_factor | sample_size | force_upcast | "
             "held-out std | loss first → last | checks |", "|" + " --- |" * 11]
    for r in rows:
        e = r.get("export", {})
        failed = [c["check"] for c in r["checks"] if c["status"] == "FAIL"]
        known = [c["check"] for c in r["checks"] if c["status"] == "known"]
        verdict = ("FAIL: " + ", ".join(failed)) if failed else "pass"
        if known:
            verdict += " (known: " + ", ".join(known) + ")"
        scale = e.get(LATENT_SCALE_KEY, {}).get("latent_scale", "")

        def num(v):
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        loss = (f"{num(r.get('first_loss'))} → {num(r.get('last_loss'))}" if r.get("first_loss") is not None else "")
        lines.append(f"| {r['recipe']} | {r['seconds']} | {r.get('resolution', '')} | {r.get('mixed_precision', '')} "
                     f"| {num(e.get('scaling_factor', ''))} {scale} | {num(e.get('shift_factor', ''))} | "
                     f"{e.get('sample_size', '')} | {e.get('force_upcast', '')} | {r.get('held_out_std', '')} | "
                     f"{loss} | {verdict} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=None,
                   help=f"default: {' '.join(FAST_RECIPES)} (the fast part), every recipe with --full")
    p.add_argument("--full", action="store_true", help="each recipe at its own resolution (slow on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps for every recipe")
    p.add_argument("--batch", type=int, default=None, help="train.batch_size for every recipe (per process)")
    p.add_argument("--out", default=None, help="keep the runs and write the report here (default: the runs in a "
                                               "temporary folder, the report in benchmarks/results/)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per recipe")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = args.recipes or (list(RECIPES) if args.full else list(FAST_RECIPES))
    if "distill" in names and "quickstart" not in names:
        names = ["quickstart", *names]  # the README distils the quickstart export
    names.sort(key=list(RECIPES).index)
    report_dir = Path(args.out) if args.out else RESULTS
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for name in names:
            rows.append(rehearse(RECIPES[name], work / "runs", work / "sources", args.full, args.steps, args.batch,
                                 args.timeout))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "full": args.full,
              "command": command_line("rehearse.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}, native bf16: {native_bf16()}",
              "rows": rows, "failed": [r["recipe"] for r in rows if any(c["status"] == "FAIL" for c in r["checks"])]}
    stem = report_dir / ("rehearsal-full" if args.full else "rehearsal")
    write_json(stem.with_suffix(".json"), result, indent=1, default=str)
    atomic_write_text(stem.with_suffix(".md"), f"{result['command']} ({result['date']}, {result['machine']})\n\n"
                      + table(rows))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
