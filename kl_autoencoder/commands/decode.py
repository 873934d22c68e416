"""`kl-autoencoder decode`: the latent files of a folder encode back to PNGs with the original names and sizes."""

from __future__ import annotations

from kl_autoencoder.commands.common import add_image_limit, add_model_io, add_replace, load_model, report, tiling


def cmd_decode(args) -> int:
    from kl_autoencoder.inference import PNG_OUTPUTS, decode_latents
    from kl_autoencoder.outputs import check_output

    check_output(args.out, "decode", [args.latents], PNG_OUTPUTS, args.overwrite, noun="PNG", kind="latents")
    model = load_model(args.model, args.device, preset=args.preset)
    report(decode_latents(model, args.latents, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                           **tiling(args)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="latent shards -> PNGs with the original names and sizes")
    add_model_io(p, needs_input=False, needs_latents=True, has_mode=False)
    add_image_limit(p)
    add_replace(p, "PNGs --out already holds (same-named ones are replaced, others kept)")
    p.set_defaults(func=cmd_decode)
