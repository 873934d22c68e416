"""Quality at equal compute, as a fair race: our training recipe against the peer's, with spreads over seeds, the
peer tuned on a validation set, and an ablation that trades each difference between the two recipes.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --val VAL_DIR --heldout sample --our-trials N  # full race, ~75 min
    python benchmarks/quality.py --val VAL_DIR --heldout sample --heldout OTHER_DIR --peer-warmup-steps 20
    python benchmarks/quality.py --val VAL_DIR --budget 0.5 --seeds 0 --peer-trials 2 --cells ours,peer
    python benchmarks/quality.py --tiny --out /tmp/q                 # harness self-test: seconds, numbers meaningless

The sides. Ours: the config's recipe (default configs/quickstart.yaml; `--override` applies to it) run by the trainer
itself: `build_training` / `train_step` (loss, optimizer, fast path), the config's warm-up then its schedule laid over
the wall-clock budget (the schedule's end is the budget's end), EMA when the config has it, the crops of
`data.build_dataset`, and `export_model` (EMA weights, latent scale measured by the one estimator).
Peer: diffusers `AutoencoderKL` trained as diffusers' examples/research_projects/autoencoderkl/train_autoencoderkl.py
does, written plainly: posterior sample, decode, L2 + perceptual_scale * LPIPS (under no_grad, as the script does)
summed per image over the batch, + kl_scale (1e-6) * KL summed over the batch; AdamW (betas 0.9/0.999, weight decay
1e-2, eps 1e-8), gradients clipped to norm 1.0, contiguous fp32, eager; PyTorch's default init. The discriminator is
off in both (the script starts it at step 50001; its unused discriminator forward before then is left out, which
only helps the peer). Same data: the peer reads the very batches ours reads (the config's crops, same seed); same
architecture (the config's); same seed for each pair.

The peer's options, tuned: the script's own knobs, `--learning_rate`, `--lr_scheduler` (diffusers `get_scheduler`:
constant, constant_with_warmup, cosine, linear; its cosine_with_restarts at the script's num_cycles 1 is the cosine,
its polynomial at power 1 the linear) with `--lr_warmup_steps` (`--peer-warmup-steps`, the script's 500), and
`--use_ema` (diffusers `EMAModel` with the script's arguments: decay 0.9999, its (1 + n) / (10 + n) warm-up, on the
parameters, the exported weights the averaged ones). A step-based schedule is laid over the budget as ours is: the
warm-up in steps, then the decay over the elapsed fraction of the budget (the script's user would set
--max_train_steps to what fits). `--peer-trials N` trials (default `--our-trials`, the number of trials our recipe was
chosen from) of the grid `--peer-lrs` x `--peer-schedulers` x `--peer-ema`, in a fixed order: trial k takes the
learning rate k mod L (in the order given: a spread, centre first) and the (scheduler, EMA) pair (k + k div
lcm(L, S)) mod S (schedulers in the order given, EMA off/on alternating), so the first L trials cover every rate,
the first S every pair, and no trial repeats; each trial is one run on the first seed at the race budget, all
trials interleaved in one race.
The trial with the best mean PSNR over the `--val` sets is the tuned peer ("peer"). The held-out sets never tune.

The cells (`--cells`, all at the race budget, every seed): ours; peer (tuned); the peer given each of our changes in
turn: peer+init (the config's `model.init`, e.g. zero_residual: the diffusers model starts from the very weights our
`build_model` gives at that seed; the keys are shared), peer+schedule (the config's warm-up and schedule over the
budget, at the peer's tuned rate), peer+ema (our trainer's EMA at the config's decay in place of the peer's); ours
given each of the peer's defaults: ours-init (`model.init=default`, PyTorch's), ours-schedule (constant rate, no
warm-up: the script's default scheduler), ours-ema (`train.ema.enabled=false`); and peer-default (the script's
defaults: lr 4.5e-6, constant, no EMA; not in the default list). A change the tuned peer already has shows as
about 0: both EMAs follow the decay warm-up (1 + n) / (10 + n), which stays under either cap (ours 0.999 in the
quickstart, the script's 0.9999) for the first ~9,000 steps, so below that peer+ema differs from the script's
--use_ema only in its first update; likewise peer+schedule against a tuned cosine differs only in the warm-up.

Equal compute: all cells of one seed train in one process, interleaved step by step (the side with the least
training time so far goes next), so machine load falls on all sides alike; a side's time is the sum of its own steps
(its data loading included); evaluation and export are not counted. `--budget` is minutes per side; steps are recorded.

Image sets: `--val DIR` and `--heldout DIR`, each repeatable, each reported on its own (named by its folder);
`--heldout sample` is the built-in held-out photos (the default when no --heldout is given). Centre crops at
`--eval-resolution` (256), posterior mode: PSNR, SSIM, mean colour error (|mean RGB difference|, 0-1), CIEDE2000
(delta E), hue error (degrees, saturated pixels) and the std of the scaled latents (each side's exported factor).

LPIPS: no pretrained VGG weights can be downloaded here, so both sides run with perceptual weight 0 unless
`--perceptual-weight` is given (then both use the same random-backbone lpips.LPIPS, and the header says so).

Writes quality.json (every trial, every cell on every seed and set, the summaries; strict JSON, null for a NaN
such as the std of one seed), quality.md: (a) the race, cell x set, mean +- sample std over seeds and min-max; (b) the
ablation: each change against its base, paired by seed (the same race), mean +- std and min-max of the differences,
and per set on how many seeds ours beat the tuned peer; (c) the peer's tuning trials; and quality.png (PSNR per cell
and set, min-max whiskers). `--tiny`: a tiny model, the budget in seconds (default 0.5), the built-in training
photos as the validation set when no --val is given.
Cost: (peer trials + cells x seeds) x budget of training time, run one after another, plus evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import harness  # benchmarks/harness.py, first: this checkout on sys.path
import reference as ref  # benchmarks/reference.py
from harness import ROOT, TINY_ARCHITECTURE, header, markdown_table as table, write_json
from reference import with_block_types

from kl_autoencoder.losses import chroma_error_sum

PEER_DEFAULT_LR = 4.5e-6  # train_autoencoderkl.py --learning_rate default
PEER_KL_SCALE = 1e-6  # --kl_scale default
PEER_WARMUP_STEPS = 500  # --lr_warmup_steps default
PEER_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
SCHEDULE_TICKS = 10_000  # the clock a step-based schedule is laid over (the budget's elapsed fraction)

# Our recipe given each of the peer's defaults: config overrides on top of --config / --override.
OUR_CELLS = {"ours": [], "ours-init": ["model.init=default"],
             "ours-schedule": ["optim.schedule=constant", "optim.warmup_steps=0"],
             "ours-ema": ["train.ema.enabled=false"], "ours-chroma": ["loss.chroma_weight=0"]}
# The tuned peer given each of our changes: PeerOptions fields replaced ("peer-default" is the script's defaults).
PEER_CELLS = {"peer": {}, "peer+init": {"init": "ours"}, "peer+schedule": {"scheduler": "ours"},
              "peer+ema": {"ema": "ours"}, "peer+chroma": {"chroma": True}, "peer-default": None}
DEFAULT_CELLS = ("ours", "peer", "peer+init", "peer+schedule", "peer+ema", "peer+chroma", "ours-init", "ours-schedule",
                 "ours-ema", "ours-chroma")
# (cell, its base, what the cell changes): each row of the ablation table, the race itself first.
ABLATIONS = (("ours", "peer", "the whole recipe: ours against the tuned peer"),
             ("peer+init", "peer", "peer + our init (the config's model.init)"),
             ("peer+schedule", "peer", "peer + our schedule (the config's warm-up and schedule over the budget)"),
             ("peer+ema", "peer", "peer + our EMA (trainer.EMA at the config's decay)"),
             ("ours-init", "ours", "ours with PyTorch's default init (the peer's)"),
             ("ours-schedule", "ours", "ours with a constant rate, no warm-up (the peer's default scheduler)"),
             ("ours-ema", "ours", "ours without EMA (the peer's default)"),
             ("peer+chroma", "peer", "peer + our chroma term (the config's loss.chroma_weight and chroma_scale)"),
             ("ours-chroma", "ours", "ours without the chroma term (loss.chroma_weight=0: the peer's loss)"),
             ("peer", "peer-default", "the peer's tuning: tuned options against the script's defaults"),
             ("ours", "peer-default", "ours against the script's defaults (untuned)"))
METRICS = ("psnr", "ssim", "colour_error", "delta_e", "hue_error", "latent_std")


# ------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def held_out_quality(encode: Callable, decode: Callable, scale: Callable[[torch.Tensor], torch.Tensor],
                     images: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """PSNR, SSIM, colour error, CIEDE2000, hue error (means over images) and scaled-latent std of one model on
    [N, 3, H, W] in [-1, 1].

    `encode(x)` gives a posterior with `.mode()` and `.sample(generator)`; `scale(z)` the diffusion latents."""
    from kl_autoencoder.metrics import colour_error, delta_e, hue_error, psnr, ssim

    posterior = encode(images)
    reconstruction = decode(posterior.mode()).float().clamp(-1, 1)
    a, b = (images.float() + 1) / 2, (reconstruction + 1) / 2
    latents = scale(posterior.sample(torch.Generator().manual_seed(seed)))
    return {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean()),
            "colour_error": float(colour_error(a, b).mean()), "delta_e": float(delta_e(a, b).mean()),
            # NaN-mean: an image with no saturated pixel has no hue to get wrong
            "hue_error": float(hue_error(b, a).nanmean()), "latent_std": float(latents.float().std())}


def quality_on_sets(encode: Callable, decode: Callable, scale: Callable, sets: dict[str, torch.Tensor],
                    scaling_factor: float) -> dict[str, dict[str, float]]:
    """`held_out_quality` on each named image set, with the model's latent scale recorded."""
    return {name: {**held_out_quality(encode, decode, scale, images), "scaling_factor": scaling_factor}
            for name, images in sets.items()}


# ------------------------------------------------------------------------------------------------ the two recipes


@dataclass
class Side:
    """One training run under the clock: `step(progress)` trains one step, `evaluate(sets)` measures the result
    on each named image set."""
    name: str
    step: Callable[[float], None]
    evaluate: Callable[[dict[str, torch.Tensor]], dict[str, dict[str, float]]]
    seconds: float = 0.0
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def budget_lr_factor(step: int, progress: float, warmup_steps: int, schedule: str) -> float:
    """Our schedule over a wall-clock budget: the config's warm-up in steps, then its decay over the elapsed
    fraction of the budget (`trainer.lr_factor` on a 10,000-tick clock), ending at the budget's end."""
    from kl_autoencoder.trainer import lr_factor

    if step < warmup_steps:
        return lr_factor(step, warmup_steps, warmup_steps + 1, schedule)
    ticks = SCHEDULE_TICKS
    return lr_factor(warmup_steps + int(min(progress, 1.0) * (ticks - warmup_steps)), warmup_steps, ticks, schedule)


def peer_lr_factor(scheduler: str, warmup_steps: int) -> Callable[[int, float], float]:
    """The script's scheduler, `diffusers.optimization.get_scheduler(name, num_warmup_steps, num_training_steps,
    num_cycles=1, power=1.0)`, its own lambda, laid over the budget as ours is: warm-up in steps, then the decay
    over the budget's elapsed fraction. The optimizer step numbered n runs at lambda(n), as in the script (its
    scheduler steps after the optimizer): with a warm-up the first step runs at rate 0."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_scheduler(scheduler, dummy, num_warmup_steps=warmup_steps, num_training_steps=SCHEDULE_TICKS,
                             num_cycles=1, power=1.0).lr_lambdas[0]

    def factor(step: int, progress: float) -> float:
        if step < warmup_steps:
            return schedule(step)
        return schedule(warmup_steps + int(min(progress, 1.0) * (SCHEDULE_TICKS - warmup_steps)))

    return factor


def crop_stream(cfg: Any, seed: int) -> Iterator[torch.Tensor]:
    """The training batches the config's data section gives (the trainer's own order), pixel values only."""
    from kl_autoencoder.data import build_dataset, training_batches

    dataset = build_dataset(cfg.data, split=cfg.data.split)
    for batch in training_batches(dataset, cfg.train.batch_size, seed, num_workers=0):
        yield batch["pixel_values"]


def make_ours(name: str, cfg: Any, workdir: Path) -> Side:
    """Our recipe on `cfg` (seeded by cfg.train.seed), run by the trainer's own build_training / train_step."""
    from kl_autoencoder.model import KLAutoencoder
    from kl_autoencoder.trainer import base_learning_rate, build_training, export_model, train_step

    torch.manual_seed(cfg.train.seed)
    t = build_training(cfg)
    batches = crop_stream(cfg, cfg.train.seed)
    side = Side(name, step=lambda progress: None, evaluate=lambda sets: {})
    rates = ((t.optimizer, base_learning_rate(cfg, 1)),
             (t.d_optimizer, base_learning_rate(cfg, 1, cfg.loss.gan.disc_lr or cfg.optim.lr)))

    def step(progress: float) -> None:
        x = next(batches).to(t.device)
        factor = budget_lr_factor(side.steps, progress, cfg.optim.warmup_steps, cfg.optim.schedule)
        for optimizer, rate in rates:  # both optimizers on the one schedule, as the trainer's loop does
            for group in (optimizer.param_groups if optimizer is not None else ()):
                group["lr"] = rate * factor
        train_step(t, x, side.steps)
        if t.ema is not None:
            t.ema.update(t.raw_model)

    def evaluate(sets: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        path = export_model(t, workdir / f"{name}-seed{cfg.train.seed}")
        model = KLAutoencoder.from_pretrained(path).eval()
        return quality_on_sets(model.encode, model.decode, model.to_diffusion_latents, sets,
                               float(model.config.scaling_factor))

    side.step, side.evaluate = step, evaluate
    return side


def peer_step(vae: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, perceptual: torch.nn.Module | None,
              perceptual_weight: float, generator: torch.Generator, rec_loss: str = "l2",
              chroma: tuple[float, int] | None = None) -> torch.Tensor:
    """One generator step of train_autoencoderkl.py before its discriminator starts, written plainly; `chroma`
    (weight, scale) adds our low-resolution colour term (`losses.chroma_error_sum`) to its summed NLL."""
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    pixel_loss = F.mse_loss if rec_loss == "l2" else F.l1_loss
    rec_loss = pixel_loss(reconstruction.float(), x.float(), reduction="none")
    if perceptual is not None and perceptual_weight > 0:
        with torch.no_grad():  # as the script does: the LPIPS term then sends no gradient
            rec_loss = rec_loss + perceptual_weight * perceptual(reconstruction, x)
    nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]
    if chroma is not None:
        nll_loss = nll_loss + chroma[0] * chroma_error_sum(reconstruction, x, chroma[1]) / x.shape[0]
    kl_loss = posterior.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    loss = nll_loss + PEER_KL_SCALE * kl_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


@dataclass(frozen=True)
class PeerOptions:
    """One way to run the peer: its script's options, or one of ours swapped in."""
    lr: float
    scheduler: str = "constant"  # the script's --lr_scheduler, or "ours" (the config's warm-up and schedule)
    ema: str = "none"  # "none", "peer" (--use_ema: diffusers EMAModel) or "ours" (trainer.EMA, the config's decay)
    init: str = "default"  # "default" (PyTorch's, as the script) or "ours" (the config's model.init)
    chroma: bool = False  # add our chroma term at the config's loss.chroma_weight / chroma_scale

    def label(self) -> str:
        ema = {"none": "no EMA", "peer": "its EMA (EMAModel 0.9999)", "ours": "our EMA"}[self.ema]
        scheduler = "our schedule" if self.scheduler == "ours" else self.scheduler
        chroma = ", our chroma term" if self.chroma else ""
        return f"lr {self.lr:g}, {scheduler}, {ema}, {'our' if self.init == 'ours' else 'PyTorch'} init{chroma}"


def our_initial_weights(cfg: Any) -> dict[str, torch.Tensor]:
    """The weights our trainer starts from at cfg.train.seed (`build_model` under the same seed as make_ours)."""
    from kl_autoencoder.trainer import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model).state_dict()


def make_peer(name: str, options: PeerOptions, s: "Setup", cfg: Any, warmup_steps: int) -> Side:
    """The peer's recipe with `options`, on the batches ours reads, seeded by cfg.train.seed."""
    from diffusers.training_utils import EMAModel

    from kl_autoencoder.trainer import EMA

    seed = cfg.train.seed
    torch.manual_seed(seed)
    vae = ref.build_reference_vae(s.architecture)
    if options.init == "ours":
        vae.load_state_dict(our_initial_weights(cfg))
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=options.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if options.scheduler == "ours":
        factor = lambda step, progress: budget_lr_factor(step, progress, cfg.optim.warmup_steps,  # noqa: E731
                                                         cfg.optim.schedule)
    else:
        factor = peer_lr_factor(options.scheduler, warmup_steps)
    ema = {"none": None, "ours": lambda: EMA(vae, cfg.train.ema.decay),
           "peer": lambda: EMAModel(vae.parameters(), model_cls=type(vae), model_config=vae.config)}[options.ema]
    ema = ema() if ema is not None else None
    batches, generator = crop_stream(cfg, seed), torch.Generator().manual_seed(seed)
    chroma = (cfg.loss.chroma_weight, cfg.loss.chroma_scale) if options.chroma else None
    side = Side(name, step=lambda progress: None, evaluate=lambda sets: {}, extra={"options": asdict(options)})

    def step(progress: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = options.lr * factor(side.steps, progress)
        peer_step(vae, optimizer, next(batches), s.perceptual, s.perceptual_weight, generator, chroma=chroma)
        if isinstance(ema, EMA):
            ema.update(vae)
        elif ema is not None:
            ema.step(vae.parameters())

    def evaluate(sets: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        model = copy.deepcopy(vae).eval()  # the exported weights: the averaged ones under EMA, as the script saves
        if isinstance(ema, EMA):
            model.load_state_dict(ema.averaged_state_dict(model))
        elif ema is not None:
            ema.copy_to(model.parameters())
        factor_ = model.config.scaling_factor  # the script leaves diffusers' default in place
        return quality_on_sets(lambda x: model.encode(x).latent_dist, lambda z: model.decode(z).sample,
                               lambda z: z * factor_, sets, float(factor_))

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
    config: str  # our recipe's YAML
    overrides: list[str]  # --override (and --tiny's, --perceptual-weight's), for every config of ours
    cfg: Any  # our TrainConfig with the overrides (seeds and cells add theirs)
    architecture: dict[str, Any]  # with block types spelt out for diffusers
    val: dict[str, torch.Tensor]  # "val/<folder>": images; tuning reads only these
    heldout: dict[str, torch.Tensor]  # "heldout/<folder>": images; only reported
    perceptual_weight: float
    perceptual: torch.nn.Module | None


def config_for(s: Setup, seed: int, extra: list[str] = ()) -> Any:
    """Our config with the setup's overrides, a cell's `extra` ones and the seed; validated by load_config."""
    from kl_autoencoder.config import load_config

    cfg = load_config(s.config, [*s.overrides, *extra, f"train.seed={seed}"])
    cfg.data.num_workers = 0
    return cfg


def load_sets(sources: list[str], role: str, resolution: int) -> dict[str, torch.Tensor]:
    """Each source's centre crops, named "<role>/<folder name>" ("sample" for the built-in held-out photos)."""
    from kl_autoencoder.data import load_eval_images

    sets = {}
    for source in sources:
        builtin = role == "heldout" and source == "sample"
        name = f"{role}/{'sample' if builtin else Path(source).name}"
        name = name if name not in sets else f"{name}#{len(sets) + 1}"
        sets[name] = load_eval_images("sample:heldout" if builtin else source, resolution)[1]
    return sets


def load_setup(args: argparse.Namespace) -> Setup:
    overrides = list(args.override)
    if args.tiny:
        overrides += [f"model.architecture={json.dumps(TINY_ARCHITECTURE)}", "data.resolution=16",
                      "train.batch_size=2", "train.scaling_images=4"]
    if args.perceptual_weight is not None:
        overrides += [f"loss.perceptual_weight={args.perceptual_weight}", "loss.perceptual_pretrained=false"]
    resolution = 32 if args.tiny else args.eval_resolution
    # --tiny without --val: the training photos stand in, so the self-test runs with no folder at all
    val_sources = args.val or (["sample:train"] if args.tiny else [])
    s = Setup(args.config, overrides, None, {}, load_sets(val_sources, "val", resolution),
              load_sets(args.heldout or ["sample"], "heldout", resolution), 0.0, None)
    s.cfg = config_for(s, args.seed_list[0])
    s.architecture = with_block_types(dict(s.cfg.model.architecture))
    s.perceptual_weight = s.cfg.loss.perceptual_weight
    if s.perceptual_weight > 0:  # the same random-backbone LPIPS for the peer (ours builds its own from the config)
        s.perceptual = ref.build_reference_lpips(s.cfg.loss.perceptual_net)
    return s


def peer_trials(lrs: list[float], schedulers: list[str], emas: list[str], count: int) -> list[PeerOptions]:
    """The first `count` trials of the grid lrs x schedulers x emas in the documented order: trial k takes rate
    k mod L and (scheduler, EMA) pair (k + k div lcm(L, S)) mod S, the pairs listed scheduler by scheduler with the
    EMA choices alternating in direction. The first L trials cover every rate, the first S every pair, and the
    whole order is a bijection onto the grid (by the Chinese remainder theorem), so no trial repeats."""
    pairs = [(scheduler, ema) for i, scheduler in enumerate(schedulers)
             for ema in (emas if i % 2 == 0 else emas[::-1])]
    count, cycle = min(count, len(lrs) * len(pairs)), math.lcm(len(lrs), len(pairs))
    trials = []
    for k in range(count):
        scheduler, ema = pairs[(k + k // cycle) % len(pairs)]
        trials.append(PeerOptions(lrs[k % len(lrs)], scheduler, ema))
    return trials


def mean_psnr(sets: dict[str, dict[str, float]]) -> float:
    """The mean of the sets' PSNRs (each set's own mean over its images): the tuning score; -inf if not finite."""
    value = statistics.fmean(result["psnr"] for result in sets.values())
    return value if math.isfinite(value) else -math.inf


def tune_peer(s: Setup, trials: list[PeerOptions], seed: int, budget_s: float, warmup_steps: int
              ) -> dict[str, Any]:
    """Every trial trained for `budget_s` on `seed`, interleaved in one race; scored on the --val sets only."""
    cfg = config_for(s, seed)
    sides = [make_peer(f"trial {k}", options, s, cfg, warmup_steps) for k, options in enumerate(trials)]
    race(sides, budget_s)
    records = []
    for side in sides:
        sets = side.evaluate(s.val)
        records.append({**side.extra, "steps": side.steps, "seconds": round(side.seconds, 2), "sets": sets,
                        "val_psnr": mean_psnr(sets)})
        print(f"tuning {side.name} ({side.extra['options']}): {records[-1]['val_psnr']:.2f} dB", flush=True)
    chosen = max(range(len(records)), key=lambda k: records[k]["val_psnr"])
    return {"seed": seed, "trials": records, "chosen": chosen, "options": records[chosen]["options"]}


def cell_side(cell: str, s: Setup, seed: int, tuned: PeerOptions | None, warmup_steps: int, workdir: Path) -> Side:
    """The side that trains `cell` on `seed`."""
    if cell in OUR_CELLS:
        side = make_ours(cell, config_for(s, seed, OUR_CELLS[cell]), workdir)
        side.extra["overrides"] = OUR_CELLS[cell]
        return side
    change = PEER_CELLS[cell]
    options = PeerOptions(PEER_DEFAULT_LR) if change is None else replace(tuned, **change)
    return make_peer(cell, options, s, config_for(s, seed), warmup_steps)


def run_seed(s: Setup, cells: list[str], seed: int, tuned: PeerOptions | None, budget_s: float,
             warmup_steps: int, workdir: Path) -> dict[str, Any]:
    """All cells on one seed, interleaved in one race; each measured on every set (validation and held-out)."""
    sides = [cell_side(cell, s, seed, tuned, warmup_steps, workdir) for cell in cells]
    race(sides, budget_s)
    return {side.name: {**side.extra, "steps": side.steps, "seconds": round(side.seconds, 2),
                        "sets": side.evaluate({**s.val, **s.heldout})} for side in sides}


# ------------------------------------------------------------------------------------------------ summaries


def spread(values: list[float]) -> dict[str, float | int]:
    """Mean, sample std (NaN for one value), min and max of the finite values, and how many there were."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return {"mean": statistics.fmean(finite), "std": std, "min": min(finite), "max": max(finite), "n": len(finite)}


def summarise(runs: dict[str, dict[str, Any]], set_names: list[str]) -> dict[str, Any]:
    """Per cell: steps over seeds, and per set each metric over seeds."""
    summary = {}
    for cell, by_seed in runs.items():
        seeds = list(by_seed.values())
        summary[cell] = {"steps": spread([r["steps"] for r in seeds]),
                         "sets": {name: {m: spread([r["sets"][name][m] for r in seeds]) for m in METRICS}
                                  for name in set_names}}
    return summary


def ablations(runs: dict[str, dict[str, Any]], set_names: list[str]) -> list[dict[str, Any]]:
    """Each ABLATIONS row whose two cells both ran: PSNR of the cell minus its base, paired by seed (one race)."""
    rows = []
    for cell, base, change in ABLATIONS:
        if cell not in runs or base not in runs:
            continue
        seeds = [seed for seed in runs[cell] if seed in runs[base]]
        deltas = {name: {seed: runs[cell][seed]["sets"][name]["psnr"] - runs[base][seed]["sets"][name]["psnr"]
                         for seed in seeds} for name in set_names}
        rows.append({"cell": cell, "base": base, "change": change, "psnr_delta_by_seed": deltas,
                     "psnr_delta": {name: spread(list(d.values())) for name, d in deltas.items()}})
    return rows


def fmt_spread(stat: dict[str, float], digits: int = 2, signed: bool = False) -> str:
    """"21.50 ± 0.42 (20.95–21.98)"; one seed: "21.50 (n=1)"."""
    if stat["n"] == 0:
        return "n/a"
    number = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = number.format(stat["mean"])
    if stat["n"] == 1:
        return f"{text} (n=1)"
    return f"{text} ± {stat['std']:.{digits}f} ({number.format(stat['min'])}–{number.format(stat['max'])})"


def race_tables(summary: dict[str, Any], set_names: list[str], cells_text: dict[str, str]) -> str:
    """(a) PSNR per cell and set; then the other metrics, means over seeds."""
    psnr = table(["cell", "recipe", "steps"] + [f"{name} PSNR dB" for name in set_names],
                 [[cell, cells_text[cell], fmt_spread(row["steps"], 0)]
                  + [fmt_spread(row["sets"][name]["psnr"]) for name in set_names] for cell, row in summary.items()])

    def others(sets: dict[str, Any]) -> str:
        return (f"SSIM {sets['ssim']['mean']:.3f}, colour {sets['colour_error']['mean']:.3f}, "
                f"ΔE {sets['delta_e']['mean']:.2f}, hue {sets['hue_error']['mean']:.1f}°, "
                f"σ {sets['latent_std']['mean']:.2f}")

    rest = table(["cell"] + set_names, [[cell] + [others(row["sets"][name]) for name in set_names]
                                        for cell, row in summary.items()])
    return (f"### (a) The race: PSNR, mean ± sample std over seeds (min–max)\n\n{psnr}\n\n"
            f"Other metrics, means over seeds (colour error 0-1, ΔE CIEDE2000, hue error in degrees, σ the "
            f"scaled-latent std):\n\n{rest}")


def ablation_table(rows: list[dict[str, Any]], set_names: list[str]) -> str:
    """(b) What each change buys: PSNR of the cell minus its base, paired by seed."""
    body = [[row["change"], f"{row['cell']} − {row['base']}"]
            + [fmt_spread(row["psnr_delta"][name], signed=True) for name in set_names] for row in rows]
    return ("### (b) Ablation: PSNR dB of the cell minus its base, paired by seed (same race), mean ± std "
            "(min–max)\n\n" + table(["change", "cells"] + set_names, body))


def tuning_table(tuning: dict[str, Any], val_names: list[str]) -> str:
    """(c) Every tuning trial, its steps and validation PSNR; the chosen one marked."""
    rows = []
    for k, trial in enumerate(tuning["trials"]):
        o = trial["options"]
        rows.append([str(k), f"{o['lr']:g}", o["scheduler"], o["ema"], str(trial["steps"])]
                    + [f"{trial['sets'][name]['psnr']:.2f}" for name in val_names]
                    + [f"{trial['val_psnr']:.2f}", "**chosen**" if k == tuning["chosen"] else ""])
    head = ["trial", "lr", "scheduler", "EMA", "steps"] + [f"{name} PSNR" for name in val_names] + ["val mean", ""]
    return (f"### (c) The peer's tuning: seed {tuning['seed']}, the race budget, scored on the --val sets only\n\n"
            + table(head, rows))


def claim_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Ours against the tuned peer on each set, no larger than the seeds allow."""
    lines = []
    for row in rows:
        if (row["cell"], row["base"]) != ("ours", "peer"):
            continue
        for name, deltas in row["psnr_delta_by_seed"].items():
            stat, ahead = row["psnr_delta"][name], sum(d > 0 for d in deltas.values())
            verdict = ("ahead on every seed" if ahead == len(deltas) else
                       "behind on every seed" if ahead == 0 else "no consistent winner")
            lines.append(f"- {name}: ours − peer {fmt_spread(stat, signed=True)} dB; ours ahead on {ahead} of "
                         f"{len(deltas)} seeds: {verdict}")
    return lines


# ------------------------------------------------------------------------------------------------ command line


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{what} {text!r}: expected comma-separated numbers, e.g. 1e-3,4e-3") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise SystemExit(f"{what} {text!r}: every value must be a positive number")
    return values


def parse_choices(text: str, what: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in allowed]
    if not values or unknown or len(set(values)) != len(values):
        raise SystemExit(f"{what} {text!r}: expected distinct values from {', '.join(allowed)}")
    return values


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seeds {text!r}: expected distinct integers >= 0")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    harness.add_config(p, help="our recipe")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--val", action="append", default=[], metavar="DIR",
                   help="validation image folder (repeatable): the peer's options are chosen on these only")
    p.add_argument("--heldout", action="append", default=[], metavar="DIR",
                   help="held-out image folder, or 'sample' for the built-in held-out photos (repeatable; default "
                        "sample): only reported")
    p.add_argument("--budget", type=float, default=None,
                   help="training minutes per side and per trial (default 2; --tiny: seconds, default 0.5)")
    p.add_argument("--seeds", default="0,1,2", help="every cell runs on each seed (comma-separated)")
    p.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                   help=f"comma list of {', '.join([*OUR_CELLS, *PEER_CELLS])}")
    p.add_argument("--our-trials", type=int, default=8, help="how many trials our recipe was chosen from")
    p.add_argument("--peer-trials", type=int, default=None, help="the peer's tuning trials (default --our-trials)")
    p.add_argument("--peer-lrs", default="1e-3,4e-3,2.5e-4,2e-3,5e-4,1e-4",
                   help="the peer's learning rates, in trial order (the script's default 4.5e-6 scored 11.9 dB "
                        "against 16.8 at 1e-3 in the previous sweep: add it to spend a trial on it)")
    p.add_argument("--peer-schedulers", default="constant,cosine,constant_with_warmup,linear",
                   help=f"the script's --lr_scheduler choices to try, in trial order ({', '.join(PEER_SCHEDULERS)})")
    p.add_argument("--peer-ema", default="none,peer", help="none (the script's default), peer (--use_ema)")
    p.add_argument("--peer-warmup-steps", type=int, default=PEER_WARMUP_STEPS, help="the script's --lr_warmup_steps")
    p.add_argument("--eval-resolution", type=int, default=256)
    p.add_argument("--perceptual-weight", type=float, default=None,
                   help="LPIPS weight for both sides (random VGG backbone: none can be downloaded); default: the "
                        "config's (0 in the quickstart)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "quality"))
    p.add_argument("--tiny", action="store_true", help="a tiny model, budget in seconds (harness self-test)")
    return check_args(p.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    args.seed_list = parse_seeds(args.seeds)
    args.cell_list = parse_choices(args.cells, "--cells", [*OUR_CELLS, *PEER_CELLS])
    args.lr_list = parse_floats(args.peer_lrs, "--peer-lrs")
    args.scheduler_list = parse_choices(args.peer_schedulers, "--peer-schedulers", PEER_SCHEDULERS)
    args.ema_list = parse_choices(args.peer_ema, "--peer-ema", ("none", "peer"))
    args.peer_trials = args.our_trials if args.peer_trials is None else args.peer_trials
    args.budget = (0.5 if args.tiny else 2.0) if args.budget is None else args.budget
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise SystemExit(f"--budget must be > 0 minutes, got {args.budget}")
    if args.our_trials < 1 or args.peer_trials < 1:
        raise SystemExit("--our-trials and --peer-trials must be >= 1")
    if not 0 <= args.peer_warmup_steps < SCHEDULE_TICKS:
        raise SystemExit(f"--peer-warmup-steps must be in [0, {SCHEDULE_TICKS})")
    args.needs_tuning = any(c in PEER_CELLS and PEER_CELLS[c] is not None for c in args.cell_list)
    if args.needs_tuning and not args.val and not args.tiny:
        raise SystemExit("give --val DIR: the peer's options are tuned on validation images (never the held-out)")
    return args


# ------------------------------------------------------------------------------------------------ the run


def cell_recipes(cells: list[str], tuned: PeerOptions | None) -> dict[str, str]:
    """What each cell trains, in words, for the race table."""
    text = {}
    for cell in cells:
        if cell in OUR_CELLS:
            text[cell] = "config" + "".join(f" {o}" for o in OUR_CELLS[cell])
        else:
            change = PEER_CELLS[cell]
            text[cell] = (PeerOptions(PEER_DEFAULT_LR) if change is None else replace(tuned, **change)).label()
    return text


def header_text(args: argparse.Namespace, argv: list[str] | None, s: Setup, trials: int) -> str:
    lpips_note = ("perceptual weight 0 on both sides (no pretrained VGG offline)" if s.perceptual_weight == 0 else
                  f"perceptual weight {s.perceptual_weight:g} on both sides with the SAME RANDOM-backbone LPIPS "
                  "(not perceptual; no pretrained VGG offline)")
    shapes = ", ".join(f"{name} ({len(images)} images)" for name, images in {**s.val, **s.heldout}.items())
    text = (f"{header('quality.py', argv, torch.device('cpu'))}\n"
            f"ours: {Path(args.config).name}; budget {args.budget:g} {'s' if args.tiny else 'min'} per side; seeds "
            f"{args.seeds}; peer tuned with {trials} trials (ours chosen from {args.our_trials}); peer warm-up "
            f"{args.peer_warmup_steps} steps\narchitecture {s.cfg.model.architecture}, training crops "
            f"{s.cfg.data.resolution}x{s.cfg.data.resolution} batch {s.cfg.train.batch_size}; sets at "
            f"{next(iter(s.heldout.values())).shape[-1]} px: {shapes}; {lpips_note}")
    return text + ("\n--tiny: budget in seconds, a tiny model; the numbers mean nothing" if args.tiny else "")


def markdown(header: str, result: dict[str, Any], set_names: list[str], val_names: list[str], recipes: dict) -> str:
    parts = [header, race_tables(result["summary"], set_names, recipes),
             ablation_table(result["ablation"], set_names)]
    claims = claim_lines(result["ablation"])
    if claims:
        parts.append("Ours against the tuned peer, per set:\n\n" + "\n".join(claims))
    if result["tuning"] is not None:
        parts.append(tuning_table(result["tuning"], val_names))
    return "\n\n".join(parts) + "\n"


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None (strict JSON; a std of one seed, a hue with no colour)."""
    if isinstance(value, dict):
        return {key: finite_or_none(v) for key, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot(summary: dict[str, Any], set_names: list[str], path: Path) -> None:
    """PSNR per cell, one bar per set: the mean over seeds, the whiskers the min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, width = list(summary), 0.8 / len(set_names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cells)), 4))
    for i, name in enumerate(set_names):
        stats = [summary[cell]["sets"][name]["psnr"] for cell in cells]
        means = [st["mean"] for st in stats]
        whiskers = [[st["mean"] - st["min"] for st in stats], [st["max"] - st["mean"] for st in stats]]
        ax.bar([c + (i - (len(set_names) - 1) / 2) * width for c in range(len(cells))], means, width,
               yerr=whiskers, capsize=3, label=name)
    ax.set_xticks(range(len(cells)), cells, rotation=30, ha="right")
    ax.set(ylabel="PSNR (dB), mean over seeds, min-max")
    ax.set_ylim(bottom=min(st["min"] for row in summary.values() for st in
                           (row["sets"][n]["psnr"] for n in set_names) if math.isfinite(st["min"])) - 2)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    s = load_setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_s = args.budget * (1.0 if args.tiny else 60.0)  # --tiny: the budget is read as seconds
    trials = peer_trials(args.lr_list, args.scheduler_list, args.ema_list, args.peer_trials)
    tuning, tuned = None, None
    if args.needs_tuning:
        tuning = tune_peer(s, trials, args.seed_list[0], budget_s, args.peer_warmup_steps)
        tuned = PeerOptions(**tuning["options"])
    runs: dict[str, dict[str, Any]] = {cell: {} for cell in args.cell_list}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seed_list:
            for cell, record in run_seed(s, args.cell_list, seed, tuned, budget_s, args.peer_warmup_steps,
                                         Path(tmp)).items():
                runs[cell][str(seed)] = record
                print(f"seed {seed} {cell}: {record['steps']} steps, " + ", ".join(
                    f"{name} {r['psnr']:.2f} dB" for name, r in record["sets"].items()), flush=True)
    set_names, val_names = [*s.val, *s.heldout], list(s.val)
    header = header_text(args, argv, s, len(trials) if tuning else 0)
    result = {"header": header, "budget": args.budget, "budget_unit": "s" if args.tiny else "min",
              "seeds": args.seed_list, "cells": args.cell_list, "sets": {"val": val_names, "heldout": list(s.heldout)},
              "our_trials": args.our_trials, "tuning": tuning, "runs": runs, "summary": summarise(runs, set_names),
              "perceptual_weight": s.perceptual_weight, "tiny": args.tiny}
    result["ablation"] = ablations(runs, set_names)
    text = markdown(header, result, set_names, val_names, cell_recipes(args.cell_list, tuned))
    text += "\n![PSNR per cell and set](quality.png)\n"
    print(text, flush=True)
    from kl_autoencoder.durable import atomic_write_text

    plot(result["summary"], set_names, out / "quality.png")
    result = finite_or_none(result)
    write_json(out / "quality.json", result, allow_nan=False)
    atomic_write_text(out / "quality.md", text)
    return result


if __name__ == "__main__":
    main()
