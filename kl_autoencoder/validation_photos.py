"""Real camera photographs to choose recipes on: the validation set behind the README's and BENCHMARKS' figures.

Thirteen photographs (boats at dusk, a fallen leaf, a forest path, a pier in fog, moss, cups, sky, sea, the night sky,
...) from Debian's `plasma-workspace-wallpapers` package, each resized to 512 px on its short side and cut into two
256x256 crops, left and right of centre: 26 PNGs named `NAME_0.png` / `NAME_1.png`, written beside the package's
copyright file (KDE artists' wallpapers under LGPL-3 / CC-BY-SA licences; read it before you publish a crop).

    kl-autoencoder sample-photos VAL --set validation            # fetches the package with `apt-get download`
    kl-autoencoder sample-photos VAL --set validation --deb F.deb  # any OS: the .deb you downloaded yourself

Use them to choose a recipe, never to train on: the held-out built-in photos (chelsea, coffee, flower) give the
figure a recipe is reported with. The .deb (94 MB) is read in memory, member by member, without running or
installing anything from it; only the wallpapers named in `PHOTOS` and the copyright file are read, each under a
size bound.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

PACKAGE = "plasma-workspace-wallpapers"
PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
          "MilkyWay", "OneStandsOut", "Path", "Volna", "summer_1am")  # the package's photographs (the rest are drawings)
SHORT_SIDE, CROP = 512, 256
LICENCE_FILE = f"COPYRIGHT-{PACKAGE}.txt"
MAX_MEMBER_BYTES = 64 * 2**20  # the largest wallpaper in the package is ~12 MB


class PhotoSetError(ValueError):
    """The validation photos could not be had; the message says what to do."""


def download_package(folder: Path, package: str = PACKAGE) -> Path:
    """`apt-get download PACKAGE` into `folder` (a Debian or Ubuntu machine; refreshes the package lists once if the
    first try fails); the .deb's path."""
    if shutil.which("apt-get") is None:
        raise PhotoSetError(f"apt-get not found: download {package}'s .deb from packages.debian.org and pass it "
                            "with --deb FILE")
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if done.returncode == 0 and debs:
            return debs[-1]
        if attempt == 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    reason = (done.stderr.strip().splitlines() or ["no .deb written"])[-1][:200]
    raise PhotoSetError(f"apt-get download {package} failed ({reason}); download the .deb yourself and pass --deb FILE")


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The `data.tar.*` member of a .deb (an `ar` archive), opened for streaming reads."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise PhotoSetError(f"{deb}: not a .deb (no ar archive header)")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset:offset + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii", "replace").strip() or 0)
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(raw[offset + 60:offset + 60 + size]), mode="r:*")
        offset += 60 + size + (size % 2)  # members are 2-byte aligned
    raise PhotoSetError(f"{deb}: no data.tar member (not a Debian package?)")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if not member.isfile() or member.size > MAX_MEMBER_BYTES:
        raise PhotoSetError(f"{member.name}: not a regular file under {MAX_MEMBER_BYTES // 2**20} MiB")
    return archive.extractfile(member).read()


def package_photos(deb: Path, names: tuple[str, ...] = PHOTOS) -> tuple[dict[str, Image.Image], str]:
    """The largest image of each named wallpaper in the .deb (RGB) and the package's copyright text."""
    largest: dict[str, tuple[int, Image.Image]] = {}
    copyright_text = ""
    with deb_data_tar(deb) as archive:
        for member in archive:
            parts = member.name.lstrip("./").split("/")
            if parts[:3] == ["usr", "share", "wallpapers"] and len(parts) == 7 and parts[3] in names \
                    and parts[4:6] == ["contents", "images"] and member.isfile():  # other sizes are links
                image = Image.open(io.BytesIO(_read_member(archive, member)))  # reads the header only
                pixels = image.size[0] * image.size[1]
                if pixels > largest.get(parts[3], (0, None))[0]:
                    largest[parts[3]] = (pixels, image)
            elif parts == ["usr", "share", "doc", PACKAGE, "copyright"]:
                copyright_text = _read_member(archive, member).decode("utf-8", "replace")
    missing = [name for name in names if name not in largest]
    if missing:
        raise PhotoSetError(f"{deb}: no wallpaper images for {', '.join(missing)} (another package version?)")
    return {name: image.convert("RGB") for name, (_, image) in largest.items()}, copyright_text


def centre_crops(image: Image.Image) -> list[Image.Image]:
    """Resize to SHORT_SIDE on the short side (bicubic), then the two CROP squares left and right of centre."""
    scale = SHORT_SIDE / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    cx, cy, half = image.width // 2, image.height // 2, CROP // 2
    return [image.crop((x0, cy - half, x0 + CROP, cy + half)) for x0 in (cx - CROP, cx)]


def validation_photos(deb: Path | None = None) -> tuple[list[tuple[str, Image.Image]], str]:
    """The 26 validation crops as (name, RGB image) and the licence text, from `deb` or a fresh `apt-get download`."""
    with tempfile.TemporaryDirectory() as tmp:
        photos, licence = package_photos(deb if deb is not None else download_package(Path(tmp)))
    crops = [(f"{name}_{i}", crop) for name in PHOTOS for i, crop in enumerate(centre_crops(photos[name]))]
    return crops, licence
