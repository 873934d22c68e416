"""`sample-photos OUT --set validation`: the validation crops from a Debian wallpaper package, read from a .deb built
here (an `ar` archive around a data.tar.xz), so the test needs no download."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kl_autoencoder import validation_photos as vp
from kl_autoencoder.cli import main


def _tar_bytes(files: dict[str, bytes], links: dict[str, str], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += [header, data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    files, links = {"./usr/share/doc/plasma-workspace-wallpapers/copyright": b"Files: *\nLicense: LGPL-3\n"}, {}
    for i, name in enumerate(vp.PHOTOS):
        folder = f"./usr/share/wallpapers/{name}/contents/images"
        files[f"{folder}/600x400.png"] = _png(_photo(i, (600, 400)))
        files[f"{folder}/300x200.png"] = _png(_photo(100 + i, (300, 200)))  # the smaller size is not taken
        links[f"{folder}/1200x800.png"] = "600x400.png"  # links are never followed
    path = tmp_path_factory.mktemp("deb") / "plasma-workspace-wallpapers_1_all.deb"
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.gz": _tar_bytes({}, {}, "w:gz"),
                          "data.tar.xz": _tar_bytes(files, links, "w:xz")}))
    return path


def test_the_validation_set_is_two_centre_crops_of_the_largest_image_of_each_photo(deb, tmp_path):
    assert main(["sample-photos", str(tmp_path / "val"), "--set", "validation", "--deb", str(deb)]) == 0
    written = sorted(p.name for p in (tmp_path / "val").iterdir())
    assert len(written) == 2 * len(vp.PHOTOS) + 1 and "COPYRIGHT-plasma-workspace-wallpapers.txt" in written
    assert "LGPL-3" in (tmp_path / "val" / "COPYRIGHT-plasma-workspace-wallpapers.txt").read_text()
    for i, name in enumerate(vp.PHOTOS):
        resized = np.asarray(_photo(i, (600, 400)).resize((768, 512), Image.BICUBIC))  # 512 on the short side
        left = np.asarray(Image.open(tmp_path / "val" / f"{name}_0.png"))
        right = np.asarray(Image.open(tmp_path / "val" / f"{name}_1.png"))
        assert left.shape == right.shape == (256, 256, 3)
        assert np.array_equal(left, resized[128:384, 128:384]) and np.array_equal(right, resized[128:384, 384:640])


def test_a_file_that_is_not_a_deb_is_one_line_and_writes_nothing(tmp_path, capsys):
    fake = tmp_path / "x.deb"
    fake.write_bytes(b"PK\x03\x04 not an ar archive")
    assert main(["sample-photos", str(tmp_path / "val"), "--set", "validation", "--deb", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a .deb" in err and str(fake) in err
    assert not (tmp_path / "val").exists()


def test_a_package_without_the_photos_names_them(tmp_path):
    path = tmp_path / "other.deb"
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "data.tar.xz": _tar_bytes({"./usr/x": b"1"}, {}, "w:xz")}))
    with pytest.raises(vp.PhotoSetError, match="BytheWater"):
        vp.package_photos(path)


def test_without_apt_get_the_message_says_to_pass_the_deb(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on PATH
    with pytest.raises(vp.PhotoSetError, match="--deb FILE"):
        vp.download_package(tmp_path)
