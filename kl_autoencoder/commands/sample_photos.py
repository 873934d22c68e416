"""`kl-autoencoder sample-photos`: the built-in photos (or the validation crops) written as PNGs."""

from __future__ import annotations

from pathlib import Path

from kl_autoencoder.commands.common import UsageError


def cmd_sample_photos(args) -> int:
    """The built-in photos (or the validation crops) as PNGs in a folder: something to try encode, reconstruct and
    interpolate on, or to choose a recipe on."""
    from kl_autoencoder.data import greyscale_images, sample_images
    from kl_autoencoder.durable import atomic_write
    from kl_autoencoder.outputs import check_output
    from kl_autoencoder import validation_photos

    out, licence = Path(args.out), None
    if args.set == "validation":
        try:
            photos, licence = validation_photos.validation_photos(Path(args.deb) if args.deb else None)
        except (OSError, validation_photos.PhotoSetError) as err:
            raise UsageError(str(err)) from err
    else:
        photos = greyscale_images() if args.set == "greyscale" else sample_images(args.set)
    names = [f"{name}.png" for name, _ in photos] + ([validation_photos.LICENCE_FILE] if licence else [])
    check_output(out, "sample-photos", earlier=names, overwrite=args.overwrite, noun="photo")
    for name, image in photos:
        atomic_write(out / f"{name}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
    if licence:
        atomic_write(out / validation_photos.LICENCE_FILE, lambda tmp: Path(tmp).write_text(licence, encoding="utf-8"))
    print(f"wrote {len(photos)} photos to {out} ({args.set}: {', '.join(name for name, _ in photos)})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample-photos", help="write the built-in sample photos (or the validation crops) as PNGs",
        description="Write the photos that ship with scikit-image, scikit-learn and matplotlib (nothing is "
                    "downloaded) into OUT as NAME.png. The sets are the training data's: 'heldout' (chelsea, coffee, "
                    "flower) were never trained on; 'greyscale' are 8 greyscale scikit-image photos in no set. "
                    "'validation' fetches Debian's plasma-workspace-wallpapers package (94 MB, apt-get download, or "
                    "--deb FILE) and writes 26 crops of its 13 photographs with the package's copyright file: the "
                    "photos recipes are chosen on.")
    p.add_argument("out", help="output folder")
    p.add_argument("--set", choices=("all", "train", "heldout", "greyscale", "validation"), default="all",
                   help="all: the 12 colour photos (default); train: the 9 the quickstart trains on; heldout: the 3 "
                        "it never sees; greyscale: camera, moon, coins, brick, grass, gravel, page, cell; validation: "
                        "26 crops of 13 wallpaper photographs (downloads one Debian package)")
    p.add_argument("--deb", metavar="FILE", help="with --set validation: read this plasma-workspace-wallpapers .deb "
                                                 "instead of running apt-get download")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.png files OUT already holds")
    p.set_defaults(func=cmd_sample_photos)
