"""`kl-autoencoder reconstruct`: a folder of images encoded and decoded in one pass, as PNGs."""

from __future__ import annotations

from kl_autoencoder.commands.common import add_model_io, add_replace, image_folder_command


def cmd_reconstruct(args) -> int:
    from kl_autoencoder.inference import PNG_OUTPUTS, reconstruct_folder
    from kl_autoencoder.outputs import check_output

    check_output(args.out, "reconstruct", [args.input], PNG_OUTPUTS, args.overwrite, noun="PNG")
    return image_folder_command(reconstruct_folder, args, overwrite=args.overwrite)


def add_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="images -> reconstructions in one pass")
    add_model_io(p, needs_input=True, needs_latents=False, has_mode=True)
    add_replace(p, "PNGs --out already holds (same-named ones are replaced, others kept)")
    p.set_defaults(func=cmd_reconstruct)
