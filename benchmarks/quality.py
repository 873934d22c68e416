"""Quality at equal compute: our training recipe against the peer's, on the same data and architecture.

    python benchmarks/quality.py                                    # budgets 1, 2, 4, 8 min; peer lr sweep at 2 min
    python benchmarks/quality.py --budgets 0.5,1 --peer-lrs 1e-3 --out outputs/quality
    python benchmarks/quality.py --peer-data own                    # the peer also gets its own transform (see below)
    python benchmarks/quality.py --tiny --out /tmp/q                 # harness self-test: seconds, numbers meaningless

Ours: the config's recipe (default configs/quickstart.yaml) run by the trainer itself: `build_training` / `train_step`
(loss, optimizer, fast path), the config's warm-up then its schedule laid over the wall-clock budget (the schedule's
end is the budget's end), EMA when the config has it, the crops of `data.build_dataset`, and `export_model` (EMA
weights, latent scale measured by the one estimator).

Peer: diffusers `AutoencoderKL` trained as diffusers' examples/research_projects/autoencoderkl/train_autoencoderkl.py
does, written plainly: posterior sample, decode, L2 + perceptual_scale * LPIPS (computed under no_grad, as the script
does) summed per image over the batch, + kl_scale (1e-6) * KL summed over the batch; AdamW (betas 0.9/0.999, weight
decay 1e-2, eps 1e-8) at a constant learning rate (the script's default scheduler), gradients clipped to norm 1.0,
no EMA, no fast path (contiguous fp32, eager). L2 is the script's `--rec_loss` default and the quickstart's loss
too, so the pixel loss is not what differs (issue 15's text says L1: the quickstart used it before). The discriminator is off in both (the script starts it at step 50001; its
unused discriminator forward and gradient-norm probes before that step are left out, which only helps the peer).
Its learning rate: the script's default 4.5e-6 and a few others, swept at one budget, the best held-out PSNR kept
(`--peer-lrs`, `--sweep-budget`).

Same data: by default the peer reads the very batches ours reads (`--peer-data same`); `own` adds a peer that uses
the script's transform instead (resize the shorter side, centre crop: one fixed view per training photo).
Same architecture; each side initialised by its own recipe (ours: the config's `model.init`; the peer: diffusers'
default, PyTorch's), from the same seed.

Equal compute: every side trains in one process, interleaved step by step (the side with the least training time
so far goes next), so machine load falls on all sides alike; a side's time is the sum of its own steps (its data
loading included); evaluation and export are not counted.

LPIPS: no pretrained VGG weights can be downloaded here, so both sides run with perceptual weight 0 unless
`--perceptual-weight` is given (then both use the same random-backbone lpips.LPIPS, and the table says so).

Measured on the held-out sample photos (`data.sample_images("heldout")`, never trained on), centre crops at
`--eval-resolution` (256), posterior mode: PSNR, SSIM, mean colour error (|mean RGB of the reconstruction - mean RGB
of the original|, averaged over channels and images, 0-1 scale) and the std of the scaled latents
(`(z - shift) * scaling_factor` of posterior samples, each side's exported factor: ours measured at export, the
peer's the config default 0.18215 its script leaves in place). Writes quality.json, quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import reference as ref  # noqa: E402  (benchmarks/reference.py)
from run import machine_line, with_block_types  # noqa: E402  (benchmarks/run.py)

TINY_ARCHITECTURE = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                         mid_block_add_attention=False)
PEER_DEFAULT_LR = 4.5e-6  # train_autoencoderkl.py --learning_rate default
PEER_KL_SCALE = 1e-6  # --kl_scale default


# ------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def held_out_quality(encode: Callable, decode: Callable, scale: Callable[[torch.Tensor], torch.Tensor],
                     images: torch.Tensor, seed: int = 0, per_image: bool = False) -> dict[str, Any]:
    """PSNR, SSIM, colour error (means over images) and scaled-latent std of one model on [N, 3, H, W] in [-1, 1];
    with `per_image`, also each image's PSNR and colour error ("psnr_each", "colour_error_each").

    `encode(x)` gives a posterior with `.mode()` and `.sample(generator)`; `scale(z)` the diffusion latents."""
    from kl_autoencoder.metrics import colour_error, psnr, ssim

    posterior = encode(images)
    reconstruction = decode(posterior.mode()).float().clamp(-1, 1)
    a, b = (images.float() + 1) / 2, (reconstruction + 1) / 2
    latents = scale(posterior.sample(torch.Generator().manual_seed(seed)))
    each = {"psnr": psnr(a, b), "colour_error": colour_error(a, b)}
    result = {"psnr": float(each["psnr"].mean()), "ssim": float(ssim(a, b).mean()),
              "colour_error": float(each["colour_error"].mean()), "latent_std": float(latents.float().std())}
    if per_image:
        result.update({f"{key}_each": values.tolist() for key, values in each.items()})
    return result


# ------------------------------------------------------------------------------------------------ the two recipes


@dataclass
class Side:
    """One training run under the clock: `step(progress)` trains one step, `evaluate()` measures the result."""
    name: str
    step: Callable[[float], None]
    evaluate: Callable[[], dict[str, float]]
    seconds: float = 0.0
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def budget_lr_factor(step: int, progress: float, warmup_steps: int, schedule: str) -> float:
    """Our schedule over a wall-clock budget: the config's warm-up in steps, then its decay over the elapsed
    fraction of the budget (`trainer.lr_factor` on a 10,000-tick clock), ending at the budget's end."""
    from kl_autoencoder.trainer import lr_factor

    if step < warmup_steps:
        return lr_factor(step, warmup_steps, warmup_steps + 1, schedule)
    ticks = 10_000
    return lr_factor(warmup_steps + int(min(progress, 1.0) * (ticks - warmup_steps)), warmup_steps, ticks, schedule)


def crop_stream(cfg: Any, seed: int) -> Iterator[torch.Tensor]:
    """The training batches the config's data section gives (the trainer's own order), pixel values only."""
    from kl_autoencoder.data import build_dataset, training_batches

    dataset = build_dataset(cfg.data, split=cfg.data.split)
    for batch in training_batches(dataset, cfg.train.batch_size, seed, num_workers=0):
        yield batch["pixel_values"]


def peer_transform_stream(cfg: Any, seed: int) -> Iterator[torch.Tensor]:
    """The peer script's own data: each training photo resized (shorter side) and centre-cropped, shuffled."""
    from kl_autoencoder.data import PhotoListDataset, build_transform, sample_images, training_batches

    transform = build_transform(cfg.data.resolution, random_crop=False, random_flip=False)
    dataset = PhotoListDataset(sample_images(cfg.data.split), transform, repeats=64)
    for batch in training_batches(dataset, cfg.train.batch_size, seed, num_workers=0):
        yield batch["pixel_values"]


def make_ours(cfg: Any, heldout: torch.Tensor, workdir: Path) -> Side:
    """Our recipe on `cfg`, initialised as the config says (`model.init`)."""
    from kl_autoencoder.model import KLAutoencoder
    from kl_autoencoder.trainer import build_training, export_model, train_step

    torch.manual_seed(cfg.train.seed)
    t = build_training(cfg)
    batches = crop_stream(cfg, cfg.train.seed)
    side = Side("ours", step=lambda progress: None, evaluate=lambda: {})

    def step(progress: float) -> None:
        x = next(batches).to(t.device)
        factor = budget_lr_factor(side.steps, progress, cfg.optim.warmup_steps, cfg.optim.schedule)
        for group in t.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * factor
        train_step(t, x, side.steps)
        if t.ema is not None:
            t.ema.update(t.raw_model)

    def evaluate() -> dict[str, float]:
        path = export_model(t, workdir / "ours")
        model = KLAutoencoder.from_pretrained(path).eval()
        result = held_out_quality(model.encode, model.decode, model.to_diffusion_latents, heldout)
        result["scaling_factor"] = float(model.config.scaling_factor)
        return result

    side.step, side.evaluate = step, evaluate
    return side


def peer_step(vae: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, perceptual: torch.nn.Module | None,
              perceptual_weight: float, generator: torch.Generator, rec_loss: str = "l2") -> torch.Tensor:
    """One generator step of train_autoencoderkl.py before its discriminator starts, written plainly."""
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    pixel_loss = F.mse_loss if rec_loss == "l2" else F.l1_loss
    rec_loss = pixel_loss(reconstruction.float(), x.float(), reduction="none")
    if perceptual is not None and perceptual_weight > 0:
        with torch.no_grad():  # as the script does: the LPIPS term then sends no gradient
            rec_loss = rec_loss + perceptual_weight * perceptual(reconstruction, x)
    nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]
    kl_loss = posterior.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    loss = nll_loss + PEER_KL_SCALE * kl_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def make_peer(name: str, architecture: dict[str, Any], lr: float, batches: Iterator[torch.Tensor],
              heldout: torch.Tensor, perceptual: torch.nn.Module | None, perceptual_weight: float, seed: int) -> Side:
    """The peer's recipe: a diffusers AutoencoderKL with its own (PyTorch default) initialisation, seeded."""
    torch.manual_seed(seed)
    vae = ref.build_reference_vae(architecture)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    generator = torch.Generator().manual_seed(seed)
    side = Side(name, step=lambda progress: None, evaluate=lambda: {}, extra={"lr": lr})

    def step(progress: float) -> None:
        peer_step(vae, optimizer, next(batches), perceptual, perceptual_weight, generator)

    def evaluate() -> dict[str, float]:
        vae.eval()
        factor = vae.config.scaling_factor
        result = held_out_quality(lambda x: vae.encode(x).latent_dist, lambda z: vae.decode(z).sample,
                                  lambda z: z * factor, heldout)
        vae.train()
        result["scaling_factor"] = float(factor)
        return result

    side.step, side.evaluate = step, evaluate
    return side


def race(sides: list[Side], budget_s: float) -> None:
    """Train every side for `budget_s` seconds of its own time, interleaved: the side with the least time goes next."""
    while True:
        waiting = [s for s in sides if s.seconds < budget_s]
        if not waiting:
            return
        side = min(waiting, key=lambda s: s.seconds)
        start = time.perf_counter()
        side.step(side.seconds / budget_s)
        side.seconds += time.perf_counter() - start
        side.steps += 1


# ------------------------------------------------------------------------------------------------ the benchmark


@dataclass
class Setup:
    cfg: Any  # our TrainConfig
    architecture: dict[str, Any]  # with block types spelt out for diffusers
    heldout: torch.Tensor
    perceptual_weight: float
    perceptual: torch.nn.Module | None


def load_setup(args: argparse.Namespace) -> Setup:
    from kl_autoencoder.config import load_config
    from kl_autoencoder.data import load_eval_images

    overrides = list(args.override)
    if args.tiny:
        overrides += [f"model.architecture={json.dumps(TINY_ARCHITECTURE)}", "data.resolution=16",
                      "train.batch_size=2", "train.scaling_images=4"]
    if args.perceptual_weight is not None:
        overrides += [f"loss.perceptual_weight={args.perceptual_weight}", "loss.perceptual_pretrained=false"]
    cfg = load_config(args.config, overrides)
    cfg.train.ema.enabled = cfg.train.ema.enabled and not args.tiny
    cfg.data.num_workers = 0
    resolution = 32 if args.tiny else args.eval_resolution
    _, heldout = load_eval_images("sample:heldout", resolution)
    perceptual = None
    weight = cfg.loss.perceptual_weight
    if weight > 0:  # the same random-backbone LPIPS for the peer (ours builds its own from the config)
        perceptual = ref.build_reference_lpips(cfg.loss.perceptual_net)
    return Setup(cfg, with_block_types(dict(cfg.model.architecture)), heldout, weight, perceptual)


def run_budget(s: Setup, budget_s: float, peer_lr: float, peer_data: list[str], workdir: Path) -> dict[str, Any]:
    """Fresh runs of ours and each peer variant for one budget; their held-out quality."""
    cfg = copy.deepcopy(s.cfg)
    sides = [make_ours(cfg, s.heldout, workdir)]
    for data in peer_data:
        batches = crop_stream(cfg, cfg.train.seed) if data == "same" else peer_transform_stream(cfg, cfg.train.seed)
        sides.append(make_peer(f"peer ({data} data)", s.architecture, peer_lr, batches, s.heldout, s.perceptual,
                               s.perceptual_weight, cfg.train.seed))
    race(sides, budget_s)
    result = {}
    for side in sides:
        result[side.name] = {**side.evaluate(), "steps": side.steps, "seconds": round(side.seconds, 1), **side.extra}
    return result


def sweep_peer_lr(s: Setup, lrs: list[float], budget_s: float, workdir: Path) -> tuple[float, dict[str, Any]]:
    """The peer's learning rate: each of `lrs` trained for `budget_s` (interleaved), the best held-out PSNR wins."""
    cfg = copy.deepcopy(s.cfg)
    sides = [make_peer(f"lr {lr:g}", s.architecture, lr, crop_stream(cfg, cfg.train.seed), s.heldout, s.perceptual,
                       s.perceptual_weight, cfg.train.seed) for lr in lrs]
    race(sides, budget_s)
    results = {side.name: {**side.evaluate(), "steps": side.steps, **side.extra} for side in sides}
    best = max(results.values(), key=lambda r: r["psnr"] if math.isfinite(r["psnr"]) else -math.inf)
    return best["lr"], results


def markdown_table(budgets: list[float], runs: dict[str, Any]) -> str:
    """One row per budget: each metric as "ours / peer[ / peer ...]", the PSNR difference ours - peer last."""
    first = runs[f"{budgets[0]:g}"]
    names = ["ours"] + [name for name in first if name != "ours"]
    metrics = [("steps", "steps", "{}"), ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
               ("colour_error", "colour error", "{:.3f}"), ("latent_std", "scaled-latent std", "{:.2f}")]
    head = ["budget (min)"] + [f"{label} ({' / '.join(names)})" for _, label, _ in metrics]
    head += [f"PSNR ours - {name}" for name in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for budget in budgets:
        run = runs[f"{budget:g}"]
        cells = [f"{budget:g}"] + [" / ".join(fmt.format(run[n][key]) for n in names) for key, _, fmt in metrics]
        cells += [f"{run['ours']['psnr'] - run[n]['psnr']:+.2f}" for n in names[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(budgets: list[float], runs: dict[str, Any], path: Path) -> None:
    """Held-out PSNR and colour error against training minutes, one line per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs[f"{budgets[0]:g}"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        for ax, key in zip(axes, ("psnr", "colour_error")):
            ax.plot(budgets, [runs[f"{b:g}"][name][key] for b in budgets], marker="o", label=name)
    axes[0].set(xlabel="training minutes (each side's own time)", ylabel="held-out PSNR (dB)", xscale="log")
    axes[1].set(xlabel="training minutes (each side's own time)", ylabel="held-out mean colour error (0-1)",
                xscale="log")
    for ax in axes:
        ax.minorticks_off()  # log axis: only the budgets are labelled
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{what} {text!r}: expected comma-separated numbers, e.g. 1,2,4,8") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise SystemExit(f"{what} {text!r}: every value must be a positive number")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"), help="our recipe")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--budgets", default="1,2,4,8", help="training minutes per side, comma-separated")
    p.add_argument("--peer-lrs", default="4.5e-6,1e-4,1e-3,4e-3", help="the peer's learning rates to sweep")
    p.add_argument("--sweep-budget", type=float, default=2.0, help="minutes per learning rate in the sweep")
    p.add_argument("--peer-data", default="same", help="comma list: same (our batches), own (its resize+centre crop)")
    p.add_argument("--eval-resolution", type=int, default=256)
    p.add_argument("--perceptual-weight", type=float, default=None,
                   help="LPIPS weight for both sides (random VGG backbone: none can be downloaded); default: the "
                        "config's (0 in the quickstart)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "quality"))
    p.add_argument("--tiny", action="store_true", help="a tiny model for seconds (harness self-test)")
    args = p.parse_args(argv)
    args.budget_list = parse_floats(args.budgets, "--budgets")
    args.lr_list = parse_floats(args.peer_lrs, "--peer-lrs")
    args.peer_data_list = [d.strip() for d in args.peer_data.split(",") if d.strip()]
    unknown = set(args.peer_data_list) - {"same", "own"}
    if unknown or not args.peer_data_list:
        raise SystemExit(f"--peer-data {args.peer_data!r}: expected a comma list of same, own")
    if args.sweep_budget <= 0:
        raise SystemExit(f"--sweep-budget must be > 0 minutes, got {args.sweep_budget}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    s = load_setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minutes = 1 / 60 if args.tiny else 1.0  # --tiny: budgets are read as seconds
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if len(args.lr_list) > 1:
            peer_lr, sweep = sweep_peer_lr(s, args.lr_list, args.sweep_budget * 60 * minutes, workdir)
        else:
            peer_lr, sweep = args.lr_list[0], {}
        runs = {}
        for budget in args.budget_list:
            runs[f"{budget:g}"] = run_budget(s, budget * 60 * minutes, peer_lr, args.peer_data_list, workdir)
            print(f"budget {budget:g}: " + json.dumps(runs[f"{budget:g}"]), flush=True)
    table = markdown_table(args.budget_list, runs)
    lpips_note = ("perceptual weight 0 on both sides (no pretrained VGG offline)" if s.perceptual_weight == 0 else
                  f"perceptual weight {s.perceptual_weight:g} on both sides with the SAME RANDOM-backbone LPIPS "
                  "(not perceptual; no pretrained VGG offline)")
    sweep_line = ", ".join(f"{name}: {r['psnr']:.2f} dB ({r['steps']} steps)" for name, r in sweep.items())
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {machine_line(torch.device('cpu'))}\n"
              f"command: python benchmarks/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"ours: {Path(args.config).name}; peer: train_autoencoderkl.py recipe at lr {peer_lr:g}"
              + (f" (best of the sweep at {args.sweep_budget:g} min: {sweep_line})" if sweep else "") +
              f"\narchitecture {s.cfg.model.architecture}, training crops {s.cfg.data.resolution}x"
              f"{s.cfg.data.resolution} batch {s.cfg.train.batch_size}; held-out photos at "
              f"{tuple(s.heldout.shape[-2:])}; {lpips_note}")
    if args.tiny:
        header += "\n--tiny: budgets in seconds, a tiny model; the numbers mean nothing"
    print(header, table, sep="\n", flush=True)
    result = {"header": header, "budgets_minutes": args.budget_list, "peer_lr": peer_lr, "sweep": sweep,
              "runs": runs, "perceptual_weight": s.perceptual_weight, "tiny": args.tiny}
    from kl_autoencoder.durable import atomic_write_text

    atomic_write_text(out / "quality.json", json.dumps(result, indent=2))
    atomic_write_text(out / "quality.md", header + "\n\n" + table + "\n\n![quality vs time](quality.png)\n")
    plot(args.budget_list, runs, out / "quality.png")
    return result


if __name__ == "__main__":
    main()
