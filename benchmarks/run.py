"""Ours vs the diffusers reference, side by side in one process, on identical architecture, weights, data and batch.

    python benchmarks/run.py                                   # CPU, configs/quickstart.yaml, 3 repeats
    python benchmarks/run.py --device cuda --resolution 256 --batch-size 8 --repeats 5 --json out.json
    python benchmarks/run.py --checkpointing                   # + gradient-checkpointing memory study
    python benchmarks/run.py --fast channels_last=true         # one fast-path switch flipped (before/after)
    python benchmarks/run.py --only train --breakdown          # + the step without LPIPS, and LPIPS alone
    python benchmarks/run.py --only train --gan                # the step past disc_start, both sides with a PatchGAN
    python benchmarks/run.py --only model --resolution 128     # the model as loaded on the plain step, vs diffusers
    python benchmarks/run.py --device cuda --config configs/kl-f8.yaml --only encode --tiled-size 4096 --tile-size 512

Measured (warm-up excluded; ours and reference INTERLEAVED round by round, alternating who goes first; medians):
  train    forward + L1 + LPIPS + KL + backward + AdamW step; ours = trainer.train_step on trainer.build_training of
           the config (exactly what train() runs: accelerate, clipping, non-finite skip, fast path), reference =
           benchmarks/reference.py (plain diffusers + lpips). --gan: both sides past disc_start (ours: loss.gan on,
           disc_start 0, hinge, adaptive weight; reference: reference_gan_training_step), the same PatchDiscriminator
           (ours, with the config's channels / layers / norm, weights copied) on both sides, so it costs the same
  model    the model as loaded (KLAutoencoder.from_pretrained of the reference's export: no fast path, lean pair
           off), and the same with the lean pair on, against diffusers, on the same plain step (L1 + KL, backward,
           AdamW step, no LPIPS), written alike for both
  encode   posterior mode under inference_mode;  decode: latents -> images
  tiled    decode of a latent 4x the training resolution per side, ours tiling.decode_tiled vs diffusers
           enable_tiling() with the same tile (config sample_size = resolution) and 25% overlap
  data     kl_autoencoder.data build_dataset/build_dataloader images/s on the sample source (ours only)
Peak memory (benchmarks/measure.py `peak_memory_bytes`): CUDA: max_memory_allocated above the pre-step baseline.
CPU: the torch.profiler memory timeline of one warm step: the high-water mark of the running sum of tensors created
minus destroyed (weights, optimizer state and batch that existed before it are excluded, identically for both sides).
FLOPs per image from torch.utils.flop_counter on one eager step; MFU (GPU only) = FLOPs/s / --peak-flops.
The ratio column is ours / reference computed from the medians shown (speed: higher is better; memory: lower).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path
import reference as ref  # benchmarks/reference.py
from harness import (TINY_ARCHITECTURE, add_config, add_device, add_json, check_repeats, checked_device, format_value,
                     header, markdown_table as table, printed_ratio, write_json)
from measure import flops_of, images_per_second, interleaved_times, median, peak_memory_bytes
from reference import with_block_types

from kl_autoencoder.fastpath import FastPath, apply_fast_path, autocast, to_model_input
from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    device: torch.device
    architecture: dict[str, Any]
    resolution: int
    batch_size: int
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    lpips_net: str = "vgg"
    base_config: Any = None  # the TrainConfig the training benchmark starts from
    fast: FastPath = field(default_factory=FastPath)  # inference (encode/decode/tiled)
    train_fast: FastPath = field(default_factory=FastPath)  # the training step
    gan: bool = False  # --gan: the training step past disc_start on both sides


def load_setup(args: argparse.Namespace) -> Setup:
    """Architecture, resolution and batch from the config (command-line values win)."""
    from kl_autoencoder.config import load_config

    architecture: dict[str, Any] = dict(TINY_ARCHITECTURE)
    resolution, batch_size, kl_weight = 32, 2, 1e-6
    cfg = load_config(None if args.tiny else args.config)
    if not args.tiny:
        architecture = dict(cfg.model.architecture)
        resolution, batch_size, kl_weight = cfg.data.resolution, cfg.train.batch_size, cfg.loss.kl_weight
    architecture = with_block_types(architecture)
    device = checked_device(args.device)
    overrides = dict(fast_override(item) for item in args.fast)
    if args.no_compile:
        overrides["compile"] = False
    if args.compile:
        overrides["compile"] = True
    return Setup(device=device, architecture=architecture, resolution=args.resolution or resolution,
                 batch_size=args.batch_size or batch_size, kl_weight=kl_weight,
                 lpips_net=args.lpips_net or ("alex" if args.tiny else "vgg"), base_config=cfg,
                 fast=FastPath.for_device(device, **overrides),
                 train_fast=FastPath.for_device(device, training=True, **overrides), gan=args.gan)


def fast_override(item: str) -> tuple[str, Any]:
    """'channels_last=false' -> ('channels_last', False): one FastPath field for --fast (measure a switch on/off)."""
    key, sep, text = item.partition("=")
    fields = FastPath.__dataclass_fields__
    if not sep or key not in fields:
        raise SystemExit(f"--fast {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
    lowered = text.strip().lower()
    if key == "autocast_dtype":
        if lowered in ("none", "null", "fp32", "float32"):
            return key, None
        if not hasattr(torch, lowered) or not isinstance(getattr(torch, lowered), torch.dtype):
            raise SystemExit(f"--fast {item!r}: not a torch dtype (bfloat16, float16, none)")
        return key, getattr(torch, lowered)
    if key == "compile_mode":
        return key, None if lowered in ("none", "null") else text
    if key == "lean_norm_act_bytes":
        if lowered in ("none", "null"):
            return key, None
        if lowered.isdigit():
            return key, int(lowered)
        raise SystemExit(f"--fast {item!r}: {key} takes a byte count or none")
    if lowered in ("1", "true", "yes", "on"):
        return key, True
    if lowered in ("0", "false", "no", "off"):
        return key, False
    raise SystemExit(f"--fast {item!r}: {key} takes true or false")


def sample_batch(resolution: int, batch_size: int, tiny: bool) -> torch.Tensor:
    """A real batch of the built-in photos (random noise for --tiny, which must not depend on the data module)."""
    if tiny:
        return torch.rand(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from kl_autoencoder.config import DataConfig
    from kl_autoencoder.data import build_dataloader, build_dataset

    dataset = build_dataset(DataConfig(source="sample", resolution=resolution), split="train")
    loader = build_dataloader(dataset, batch_size, shuffle=True, seed=0, num_workers=0)
    return next(iter(loader))["pixel_values"]


def copy_lpips_weights(source: torch.nn.Module, perceptual: torch.nn.Module) -> None:
    """Give our PerceptualLoss exactly the reference lpips weights (ours holds them as non-persistent buffers)."""
    values = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    with torch.no_grad():
        for name, buffer in perceptual.lpips.named_buffers():
            buffer.copy_(values[name])


# ------------------------------------------------------------------------------------------------ benchmarks


@dataclass
class Row:
    name: str
    unit: str
    ours: float
    reference: float | None
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """ours / reference from the values as printed, so the table's arithmetic checks out by eye."""
        return printed_ratio(self.ours, self.reference)


def training_config(s: Setup, base: Any) -> Any:
    """The production TrainConfig the benchmark trains with: the setup's architecture, batch and KL weight, LPIPS with
    a random backbone (offline; the same cost), no EMA/log-variance, no GAN unless --gan (then on from step 0 with the
    hinge loss and the adaptive weight, as the reference's GAN step), and this run's fast-path switches."""
    cfg = copy.deepcopy(base)
    cfg.model.architecture = dict(s.architecture)
    cfg.model.pretrained, cfg.model.freeze_encoder = None, False
    cfg.model.channels_last, cfg.model.compile = s.train_fast.channels_last, s.train_fast.compile
    cfg.data.resolution, cfg.train.batch_size = s.resolution, s.batch_size
    cfg.train.mixed_precision = PRECISION[s.train_fast.autocast_dtype]
    cfg.train.grad_accum_steps, cfg.train.ema.enabled = 1, False
    cfg.loss.pixel, cfg.loss.learned_logvar, cfg.loss.gan.enabled = "l1", False, s.gan
    if s.gan:
        cfg.loss.gan.disc_start, cfg.loss.gan.disc_loss, cfg.loss.gan.adaptive_weight = 0, "hinge", True
    cfg.loss.kl_weight, cfg.loss.kl_warmup_steps, cfg.loss.free_bits = s.kl_weight, 0, 0.0
    cfg.loss.perceptual_weight, cfg.loss.perceptual_net = s.perceptual_weight, s.lpips_net
    cfg.loss.perceptual_pretrained = False
    cfg.optim.lr, cfg.optim.fused = 1e-4, s.train_fast.fused_adamw
    return cfg


PRECISION = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def bench_training(s: Setup, x: torch.Tensor, repeats: int, rows: list[Row], extras: dict[str, Any]) -> None:
    """Ours is the trainer's own `train_step` on a `build_training` of the production config: what `train()` runs."""
    from kl_autoencoder.trainer import build_training, train_step

    torch.manual_seed(0)
    ref_vae = ref.build_reference_vae(s.architecture).to(s.device)
    ref_lpips = ref.build_reference_lpips(s.lpips_net).to(s.device)
    ours = build_training(training_config(s, s.base_config), s.train_fast)
    ours.raw_model.load_state_dict(ref_vae.state_dict())
    if ours.perceptual is not None:
        copy_lpips_weights(ref_lpips, ours.perceptual)
    ref_opt = torch.optim.AdamW(ref_vae.parameters(), lr=1e-4)
    ref_disc, ref_d_opt = reference_discriminator(ours) if s.gan else (None, None)
    x = x.to(s.device)
    ref_gen = torch.Generator(device=s.device).manual_seed(0)

    def steps(perceptual_weight: float) -> tuple[Callable[[], None], Callable[[], None]]:
        """(ours, reference) training steps at this perceptual weight (0: LPIPS is not computed at all)."""
        cfg = copy.deepcopy(ours.cfg)
        cfg.loss.perceptual_weight = perceptual_weight
        training = replace(ours, cfg=cfg, perceptual=ours.perceptual if perceptual_weight > 0 else None)

        def ours_step() -> None:
            train_step(training, x, step=0)

        def reference() -> None:
            if ref_disc is not None:
                ref.reference_gan_training_step(ref_vae, ref_lpips, ref_opt, ref_disc, ref_d_opt, x, s.kl_weight,
                                                perceptual_weight, cfg.loss.gan.disc_weight, ref_gen)
            else:
                ref.reference_training_step(ref_vae, ref_lpips, ref_opt, x, s.kl_weight, perceptual_weight, ref_gen)

        return ours_step, reference

    ours_step, ref_step = steps(s.perceptual_weight)

    warmup = 2 if s.train_fast.compile else 1
    cpu_times: dict[str, list[float]] = {}
    times = interleaved_times({"ours": ours_step, "reference": ref_step}, repeats, s.device, warmup, cpu_times)
    b = x.shape[0]
    rows.append(Row("train step", "images/s", b / median(times["ours"]), b / median(times["reference"])))
    extras["train_seconds"], extras["train_cpu_seconds"] = times, cpu_times  # CPU seconds: in --json only
    if not extras.get("skip_memory"):
        rows.append(Row("train step peak memory", "MiB", peak_memory_bytes(ours_step, s.device) / 2**20,
                        peak_memory_bytes(ref_step, s.device) / 2**20, higher_is_better=False))
    # FLOPs from the reference step (eager; same math as ours), counted once per image.
    flops = flops_of(ref_step) / b
    extras["train_flops_per_image"] = flops
    if s.device.type == "cuda":
        peak = extras["peak_flops"]
        step_row = next(r for r in rows if r.name == "train step")
        rows.append(Row("train MFU (bf16 peak)", "%", 100 * flops * step_row.ours / peak,
                        100 * flops * step_row.reference / peak))
    if extras.get("breakdown") and s.perceptual_weight > 0:
        bench_breakdown(s, x, steps, ours.perceptual, ref_lpips, repeats, warmup, rows, extras)
    del ref_opt, ref_d_opt, ours


def bench_model_step(s: Setup, x: torch.Tensor, repeats: int, rows: list[Row], extras: dict[str, Any]) -> None:
    """The model as a user loads it vs diffusers on one plain training step (see the module docstring)."""
    import tempfile

    from kl_autoencoder.fastpath import LEAN_NORM_ACT_CPU_BYTES

    torch.manual_seed(0)
    ref_vae = ref.build_reference_vae(s.architecture).to(s.device).train()
    with tempfile.TemporaryDirectory() as folder:
        ref_vae.save_pretrained(folder)
        plain, lean = (KLAutoencoder.from_pretrained(folder).to(s.device).train() for _ in range(2))
    lean.set_lean_norm_act(LEAN_NORM_ACT_CPU_BYTES)
    x = x.to(s.device)
    generator = torch.Generator(device=s.device).manual_seed(0)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def call() -> None:  # reference.reference_training_step without LPIPS, in our model's API
            posterior = model.encode(x)
            reconstruction = model.decode(posterior.sample(generator))
            loss = torch.nn.functional.l1_loss(reconstruction, x) + s.kl_weight * posterior.kl().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return call

    ref_opt = torch.optim.AdamW(ref_vae.parameters(), lr=1e-4)
    fns = {"ours": step(plain, torch.optim.AdamW(plain.parameters(), lr=1e-4)),
           "ours_lean": step(lean, torch.optim.AdamW(lean.parameters(), lr=1e-4)),
           "reference": lambda: ref.reference_training_step(ref_vae, None, ref_opt, x, s.kl_weight, 0.0, generator)}
    cpu_times: dict[str, list[float]] = {}
    times = interleaved_times(fns, repeats, s.device, cpu=cpu_times)
    b = x.shape[0]
    for label, key in (("model step as loaded", "ours"), ("model step, lean pair on", "ours_lean")):
        rows.append(Row(label, "images/s", b / median(times[key]), b / median(times["reference"])))
    extras["model_step_seconds"], extras["model_step_cpu_seconds"] = times, cpu_times  # CPU seconds: --json only


def bench_breakdown(s: Setup, x: torch.Tensor, steps: Callable[[float], tuple[Callable[[], None], Callable[[], None]]],
                    perceptual: torch.nn.Module, ref_lpips: torch.nn.Module, repeats: int, warmup: int,
                    rows: list[Row], extras: dict[str, Any]) -> None:
    """Where the step's time goes: the same step without LPIPS, and LPIPS alone (forward + backward to the
    reconstruction), each side in its own layout. Explains how far the whole-step ratio can move."""
    ours_vae_step, ref_vae_step = steps(0.0)
    b = x.shape[0]

    def lpips_call(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], image: torch.Tensor
                   ) -> Callable[[], None]:
        def call() -> None:
            reconstruction = image.detach().clone().requires_grad_(True)
            loss_fn(reconstruction, x).backward()
        return call

    parts = {"vae_ours": ours_vae_step, "vae_reference": ref_vae_step,
             "lpips_ours": lpips_call(perceptual, to_model_input(x, s.train_fast)),
             "lpips_reference": lpips_call(lambda a, b: ref_lpips(a, b).mean(), x)}
    part_times = interleaved_times(parts, repeats, s.device, warmup)
    for label, key in (("train step without LPIPS", "vae"), ("LPIPS forward + backward", "lpips")):
        rows.append(Row(label, "images/s", b / median(part_times[f"{key}_ours"]),
                        b / median(part_times[f"{key}_reference"])))
    extras["breakdown_seconds"] = part_times


def reference_discriminator(ours: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The reference's discriminator and its plain AdamW: our PatchDiscriminator class with the config's channels,
    layers and norm and our initial weights, so the discriminator's own cost is identical on both sides and the
    comparison is about the step around it (taming's NLayerDiscriminator, the diffusers example's, is LDM's with
    BatchNorm; it is not installed here)."""
    from kl_autoencoder.fastpath import unwrap
    from kl_autoencoder.losses import PatchDiscriminator

    gan = ours.cfg.loss.gan
    source = unwrap(ours.discriminator)
    discriminator = PatchDiscriminator(3, gan.disc_channels, gan.disc_layers, gan.disc_norm)
    discriminator.load_state_dict(source.state_dict())
    discriminator.to(next(source.parameters()).device).train()
    return discriminator, torch.optim.AdamW(discriminator.parameters(), lr=1e-4)


def bench_inference(s: Setup, x: torch.Tensor, repeats: int, rows: list[Row], extras: dict[str, Any],
                    tiled: bool = True, tiled_size: int | None = None, tile_size: int | None = None) -> None:
    """Encode and decode of the batch, ours (the inference layout) vs diffusers, then the tiled decode."""
    torch.manual_seed(0)
    architecture = dict(s.architecture, sample_size=s.resolution)  # diffusers tiles by config sample_size
    ref_vae = ref.build_reference_vae(architecture).to(s.device).eval()
    ours = KLAutoencoder(AutoencoderConfig.from_dict(architecture))
    ours.load_state_dict(ref_vae.state_dict())
    ours.to(s.device).eval()
    apply_fast_path(ours, replace(s.fast, compile=False, gradient_checkpointing=False), s.device)
    x = x.to(s.device)
    x_ours = to_model_input(x, s.fast)
    with torch.inference_mode():
        z = ref.reference_encode(ref_vae, x)
    z_ours = to_model_input(z, s.fast)

    def ours_encode() -> None:
        with torch.inference_mode(), autocast(s.device, s.fast):
            ours.encode(x_ours).mode()

    def ours_decode() -> None:
        with torch.inference_mode(), autocast(s.device, s.fast):
            ours.decode(z_ours)

    b = x.shape[0]
    for name, ours_fn, ref_fn in (("encode", ours_encode, lambda: ref.reference_encode(ref_vae, x)),
                                  ("decode", ours_decode, lambda: ref.reference_decode(ref_vae, z))):
        times = interleaved_times({"ours": ours_fn, "reference": ref_fn}, repeats, s.device, min_seconds=0.2)
        rows.append(Row(name, "images/s", b / median(times["ours"]), b / median(times["reference"])))
        extras[f"{name}_seconds"] = times
        if not extras.get("skip_memory"):
            rows.append(Row(f"{name} peak memory", "MiB", peak_memory_bytes(ours_fn, s.device) / 2**20,
                            peak_memory_bytes(ref_fn, s.device) / 2**20, higher_is_better=False))
    if tiled:
        bench_tiled(s, ours, ref_vae, repeats, rows, extras, tiled_size, tile_size)


def bench_tiled(s: Setup, ours: KLAutoencoder, ref_vae: torch.nn.Module, repeats: int, rows: list[Row],
                extras: dict[str, Any], tiled_size: int | None = None, tile_size: int | None = None) -> None:
    """Tiled decode of one large latent: ours with per-tile and with whole-image GroupNorm statistics vs
    diffusers' enable_tiling()."""
    from kl_autoencoder.tiling import decode_tiled

    # One large image (default 4x the resolution per side), tiles of `tile` pixels (default the resolution) with
    # 25% overlap: diffusers' split, where the tile is the config's sample_size.
    f = ours.config.downsampling_factor
    side = tiled_size or 4 * s.resolution
    tile = tile_size or s.resolution
    if side % f or tile % f:
        raise SystemExit(f"--tiled-size {side} and --tile-size {tile} must be multiples of the downsampling factor {f}")
    big = torch.randn(1, ours.config.latent_channels, side // f, side // f,
                      generator=torch.Generator().manual_seed(1)).to(s.device)
    big_ours = to_model_input(big, s.fast)
    overlap = tile // 4 // f * f
    ref_vae.tile_sample_min_size = tile  # diffusers: the tile is the config sample_size unless set like this
    ref_vae.tile_latent_min_size = tile // f

    def ours_tiled() -> None:  # the same work as enable_tiling(): per-tile statistics, linear blend
        with torch.inference_mode(), autocast(s.device, s.fast):
            decode_tiled(ours, big_ours, tile, overlap, norm_passes=0)

    def ours_tiled_global() -> None:  # the default: + one pass measuring whole-image GroupNorm statistics
        with torch.inference_mode(), autocast(s.device, s.fast):
            decode_tiled(ours, big_ours, tile, overlap)

    def ref_tiled() -> None:
        ref.reference_decode_tiled(ref_vae, big)

    times = interleaved_times({"ours": ours_tiled, "ours_global": ours_tiled_global, "reference": ref_tiled},
                              repeats, s.device)
    label = f"tiled decode {side}x{side}" + (f" (tile {tile})" if tile_size else "")
    rows.append(Row(label, "images/s", 1 / median(times["ours"]), 1 / median(times["reference"])))
    rows.append(Row(f"{label}, global norms (default)", "images/s",
                    1 / median(times["ours_global"]), 1 / median(times["reference"])))
    extras["tiled_seconds"] = times
    if not extras.get("skip_memory"):
        ref_peak = peak_memory_bytes(ref_tiled, s.device) / 2**20
        rows.append(Row(f"{label} peak memory", "MiB", peak_memory_bytes(ours_tiled, s.device) / 2**20, ref_peak,
                        higher_is_better=False))
        rows.append(Row(f"{label}, global norms (default) peak memory", "MiB",
                        peak_memory_bytes(ours_tiled_global, s.device) / 2**20, ref_peak, higher_is_better=False))


def bench_data(s: Setup, batches: int, rows: list[Row]) -> None:
    """Images/s of the training input pipeline alone (decode, crop, flip, collate) with the default workers."""
    from kl_autoencoder.config import DataConfig
    from kl_autoencoder.data import build_dataloader, build_dataset

    dataset = build_dataset(DataConfig(source="sample", resolution=s.resolution), split="train")
    loader = build_dataloader(dataset, s.batch_size, shuffle=True, seed=0)
    iterator = iter(loader)
    next(iterator)  # worker start-up excluded
    rows.append(Row("data pipeline", "images/s", images_per_second(iterator, batches), None))


def bench_checkpointing(device: torch.device, rows: list[Row], sizes: tuple[int, ...] = (512, 1024),
                        channels: tuple[int, ...] = (16, 32, 64, 64)) -> None:
    """Forward + backward peak memory at batch 1, plain vs gradient checkpointing (ratio = checkpointed / plain)."""
    arch = AutoencoderConfig(block_out_channels=channels, norm_num_groups=8, layers_per_block=2,
                             down_block_types=("DownEncoderBlock2D",) * len(channels),
                             up_block_types=("UpDecoderBlock2D",) * len(channels))
    for size in sizes:
        torch.manual_seed(0)
        model = KLAutoencoder(arch).to(device)
        x = torch.rand(1, 3, size, size, device=device) * 2 - 1

        def step() -> None:
            recon, posterior = model(x)
            ((recon - x).abs().mean() + 1e-6 * posterior.kl().mean()).backward()
            model.zero_grad(set_to_none=True)

        plain = peak_memory_bytes(step, device)
        start = time.perf_counter()
        step()
        plain_time = time.perf_counter() - start
        model.enable_gradient_checkpointing(True)
        checkpointed = peak_memory_bytes(step, device)
        start = time.perf_counter()
        step()
        ckpt_time = time.perf_counter() - start
        label = f"fwd+bwd {size}x{size} b1, {list(channels)} x2 layers"
        rows.append(Row(f"{label}: checkpointed vs plain peak memory", "MiB", checkpointed / 2**20, plain / 2**20,
                        higher_is_better=False))
        rows.append(Row(f"{label}: checkpointed vs plain time", "s", ckpt_time, plain_time, higher_is_better=False))


# ------------------------------------------------------------------------------------------------ report


def markdown_table(rows: list[Row]) -> str:
    """One line per measurement: ours, reference and ours/reference from exactly the numbers shown."""
    return table(["measurement", "unit", "ours", "reference", "ours / reference"],
                 [[row.name, row.unit, format_value(row.ours), format_value(row.reference),
                   "-" if row.ratio is None else f"{row.ratio:.2f}x"] for row in rows])


def ratio_line(rows: list[Row]) -> str:
    parts = [f"{row.name}: {row.ratio:.2f}x" for row in rows if row.ratio is not None]
    return "ratio ours/reference (speed: higher is better; memory: lower is better) -- " + ", ".join(parts)


def gan_note(s: Setup) -> str:
    """The header's words for --gan: both sides run the step past disc_start with this discriminator."""
    if not s.gan:
        return ""
    gan = s.base_config.loss.gan
    return (f", GAN on both sides past disc_start (hinge, adaptive weight, PatchGAN {gan.disc_channels} ch "
            f"x {gan.disc_layers} layers, norm {gan.disc_norm})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    add_device(p)
    add_config(p)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    add_json(p)
    p.add_argument("--tiny", action="store_true", help="a tiny model on noise (harness self-test)")
    p.add_argument("--only", default="train,encode,data", help="comma list of: train, model, encode (encode/decode/tiled), data")
    p.add_argument("--lpips-net", default=None, choices=["vgg", "alex", "squeeze"],
                   help="LPIPS backbone (default vgg; alex with --tiny)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-tiled", action="store_true")
    p.add_argument("--tiled-size", type=int, default=None,
                   help="side of the tiled-decode image in pixels (default 4x the resolution), e.g. 4096")
    p.add_argument("--tile-size", type=int, default=None, help="tile side in pixels (default the resolution)")
    p.add_argument("--fast", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one FastPath switch, e.g. --fast channels_last=true (repeatable)")
    p.add_argument("--compile", action="store_true", help="force torch.compile on")
    p.add_argument("--no-compile", action="store_true", help="force torch.compile off")
    p.add_argument("--checkpointing", action="store_true", help="add the gradient-checkpointing memory study")
    p.add_argument("--breakdown", action="store_true",
                   help="add the train step without LPIPS and LPIPS alone, both sides (where the time goes)")
    p.add_argument("--gan", action="store_true",
                   help="train step past disc_start: ours with loss.gan on, the reference with the same PatchGAN")
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 peak for MFU (H100 SXM: 989e12)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    check_repeats(args.repeats)
    s = load_setup(args)
    x = sample_batch(s.resolution, s.batch_size, args.tiny)
    rows: list[Row] = []
    extras: dict[str, Any] = {"skip_memory": args.no_memory, "peak_flops": args.peak_flops,
                              "breakdown": args.breakdown}
    sections = {part.strip() for part in args.only.split(",") if part.strip()}
    if "train" in sections:
        bench_training(s, x, args.repeats, rows, extras)
    if "model" in sections:
        bench_model_step(s, x, args.repeats, rows, extras)
    if "encode" in sections:
        bench_inference(s, x, args.repeats, rows, extras, tiled=not args.no_tiled, tiled_size=args.tiled_size,
                        tile_size=args.tile_size)
    if "data" in sections:
        bench_data(s, 2 if args.tiny else 10, rows)
    if args.checkpointing:
        bench_checkpointing(s.device, rows)
    text = (f"{header('run.py', argv, s.device)}\n"
            f"architecture {s.architecture['block_out_channels']}, {s.resolution}x{s.resolution}, batch "
            f"{s.batch_size}, LPIPS {s.lpips_net}, repeats {args.repeats}{gan_note(s)}"
            f"\nfast path, training: {s.train_fast}"
            f"\nfast path, inference: {s.fast}")
    flops = extras.get("train_flops_per_image")
    if flops:
        text += f"\ntrain FLOPs per image: {flops / 1e9:.3g} GFLOP"
        if s.device.type != "cuda":
            text += " (MFU reported on GPU only)"
    print(text, markdown_table(rows), "", ratio_line(rows), sep="\n", flush=True)
    result = {
        "header": text,
        "rows": [dict(name=r.name, unit=r.unit, ours=r.ours, reference=r.reference, ratio=r.ratio) for r in rows],
        "seconds": {k: v for k, v in extras.items() if k.endswith("_seconds")},
        "train_flops_per_image": flops,
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
