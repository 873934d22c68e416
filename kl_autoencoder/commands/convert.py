"""`kl-autoencoder convert`: between a diffusers folder and an LDM single file (with or without its config)."""

from __future__ import annotations

from pathlib import Path

from kl_autoencoder.commands.common import DTYPE_CHOICES, UsageError, add_overwrite, add_preset, local_sources


def convert_format(dst: str, format: str | None) -> str:
    """The format `convert` writes to `dst`: as --format says, else read off the name (NAME.safetensors: an LDM
    single file; any other name: a diffusers folder). A name that says the other thing than --format is refused."""
    suffix = Path(dst).suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UsageError(f"{dst}: LDM single files are written as safetensors only (no pickle); name it "
                         f"{Path(dst).with_suffix('.safetensors')}")
    is_file_name = suffix == ".safetensors" and not dst.endswith(("/", "\\"))
    if format is None:
        return "ldm" if is_file_name else "diffusers"
    if format == "diffusers" and is_file_name:
        raise UsageError(f"{dst}: --format diffusers writes a folder, but the name is a .safetensors file; drop "
                         "--format for an LDM single file, or name a folder")
    if format == "ldm" and not is_file_name:
        raise UsageError(f"{dst}: --format ldm writes one file; name it NAME.safetensors")
    return format


def cmd_convert(args) -> int:
    from kl_autoencoder.formats import read_config
    from kl_autoencoder.model import KLAutoencoder

    if args.config and Path(args.config).name != "config.json":
        raise UsageError(f"--config must point to a config.json, got {args.config}")
    args.format = convert_format(args.dst, args.format)  # before the model loads: a refusal costs nothing
    if args.no_config and args.format != "ldm":
        raise UsageError(f"{args.dst}: --no-config writes an LDM single file (a diffusers folder needs its "
                         "config.json); name it NAME.safetensors")
    config = read_config(Path(args.config).parent) if args.config else None
    model = KLAutoencoder.from_pretrained(args.src, config=config, preset=args.preset)
    if args.scaling_factor is not None:
        model.config.scaling_factor = args.scaling_factor
    if args.shift_factor is not None:
        model.config.shift_factor = args.shift_factor
    protect = local_sources(args.src, args.config)
    if args.no_config:  # weights only, as released single files are
        from kl_autoencoder.formats import save_weights

        written = save_weights(model.state_dict(), None, args.dst, format="ldm", dtype=args.dtype,
                               overwrite=args.overwrite, protect=protect)
    else:
        card = our_card(args.src) if args.format == "diffusers" else None
        written = model.save_pretrained(args.dst, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                                        protect=protect, card=card)
    print(f"wrote {written} ({args.format}{', no config' if args.no_config else ''}, {args.dtype or 'fp32'})")
    if args.format == "ldm":
        from kl_autoencoder.presets import front_end_notes

        for note in front_end_notes(model.config.to_dict()):
            print(f"note: {note}")
    return 0


def our_card(source: str) -> str | None:
    """The model card of a source folder this toolkit exported (convert carries it along), else None."""
    from kl_autoencoder.durable import is_toolkit_card
    from kl_autoencoder.formats import CARD_NAME

    path = Path(source) / CARD_NAME
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 2**20:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if is_toolkit_card(text) else None


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert between diffusers folders and LDM single files")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=("diffusers", "ldm"), default=None,
                   help="diffusers: a folder (config.json + diffusion_pytorch_model.safetensors) that "
                        "AutoencoderKL.from_pretrained loads; ldm: one CompVis-named .safetensors file (ComfyUI, "
                        "A1111), with the model's config in its safetensors header (our loader and `info` read it "
                        "back, other tools ignore it). Default: from DST, ldm for a .safetensors name, else diffusers")
    p.add_argument("--no-config", action="store_true",
                   help="an LDM single file with the weights only, as released VAEs are (loading it then needs "
                        "--preset for the latent fields)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the weights (default: keep fp32)")
    p.add_argument("--config", default=None, help="config.json to use for an LDM single file (which has none)")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the config's scaling_factor")
    p.add_argument("--shift-factor", type=float, default=None, help="override the config's shift_factor")
    add_preset(p)
    add_overwrite(p)
    p.set_defaults(func=cmd_convert)
