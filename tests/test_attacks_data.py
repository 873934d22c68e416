"""Attacks through datasets and shards: each test feeds a hostile shard or dataset to the installed code.

What a dataset or shard gives is bounded before it is read (tar members, parquet cells and their unpacked sizes,
pixel counts of every image form, brace patterns); cells naming local files are not followed unless allowed, and
say nothing of the file; store-posterior keys cannot clash; names and error lines from data are bounded and escaped.
Bombs are crafted small (a header claiming a size, a compressible member streamed as zeros, a monkeypatched limit)
so every test runs in seconds.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kl_autoencoder import untrusted
from kl_autoencoder.cli import main
from kl_autoencoder.config import DataConfig
from kl_autoencoder.data import BadImageError, build_dataset, decode_hub_value
from kl_autoencoder.shards import ShardError, expand_data_files, parquet_samples, tar_samples

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "assets" / "trained-f8"

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def png(side: int = 16, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read in chunks: a huge member written without holding it."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def encode(args: list[str], out: Path, capsys) -> tuple[int, str]:
    code = main(["encode", "--model", str(MODEL), "--out", str(out), "--resolution", "32", "--device", "cpu", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def low_pixel_limit(monkeypatch):
    """Pillow's pixel limit at 10,000: a 120 x 120 image is then a bomb (a 9500 x 9500 one is under the default)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)


# --------------------------------------------------------------------------------------------------------------------
# Tar members: bounded, and unused ones never read


def test_an_unused_compressed_member_is_never_read(tmp_path):
    """A .tar.gz of a few hundred kilobytes with a 192 MiB caption beside a small PNG: the caption is passed by its
    header (decompressed in small chunks while seeking), never held in memory."""
    import tracemalloc

    shard = tmp_path / "00000.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("000000.txt")
        info.size = 192 << 20
        tar.addfile(info, _Zeros(info.size))
        add_member(tar, "000000.png", png())
    assert shard.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        samples = list(tar_samples(str(shard)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(s.key, s.problem) for s in samples] == [("000000", None)] and samples[0].value == png()
    assert peak < 32 << 20, f"reading the shard held {peak / 2**20:.0f} MiB"


def test_an_image_member_over_the_size_limit_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(untrusted, "MAX_CELL_BYTES", 4096)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "000000.png", png())
        add_member(tar, "000001.png", png(256) + bytes(8192))  # a readable PNG, padded past the limit
    samples = list(tar_samples(str(shard)))
    assert samples[0].problem is None
    assert samples[1].value is None and "over the limit of 4,096" in samples[1].problem


def test_a_tar_claiming_a_terabyte_member_skips_that_sample_only(tmp_path, capsys):
    """A 1 KB-sized tar whose second member's header claims 1 TB: that sample is skipped, the encode goes on."""
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "000000.png", png())
        info = tarfile.TarInfo("000001.png")
        info.size = 10**12
        tar.addfile(info)  # the header alone
    code, err = encode(["--input", "webdataset", "--data-files", str(shard)], tmp_path / "latents", capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and "000001" in skipped[0] and "1,000,000,000,000 bytes" in skipped[0]
    assert json.loads((tmp_path / "latents" / "manifest.json").read_text())["count"] == 1


# --------------------------------------------------------------------------------------------------------------------
# Parquet: unpacked sizes bounded from the metadata, cells before they become Python objects


def _parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), compression="zstd", row_group_size=row_group_size)
    return path


def test_a_parquet_bomb_is_skipped_from_its_metadata_with_little_memory(tmp_path):
    """A ~10 KB zstd parquet whose second row group holds one 80 MiB cell: that row is skipped before a page is
    read, the others are read; measured in a fresh process (peak RSS)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bomb = tmp_path / "bomb.parquet"
    zeros = pa.py_buffer(np.zeros(80 << 20, np.uint8))  # untouched pages: no 80 MiB copy in this process
    cell = pa.Array.from_buffers(pa.binary(), 1, [None, pa.py_buffer(np.array([0, zeros.size], np.int32)), zeros])
    with pq.ParquetWriter(str(bomb), pa.schema([("image", pa.binary())]), compression="zstd",
                          use_dictionary=False) as writer:
        for column in (pa.array([png()], pa.binary()), cell, pa.array([png()], pa.binary())):
            writer.write_table(pa.table({"image": column}))  # one row group each
    assert bomb.stat().st_size < 64 << 10
    script = textwrap.dedent(f"""
        import resource, sys
        from kl_autoencoder.shards import parquet_samples
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        samples = list(parquet_samples({str(bomb)!r}))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"ok": [s.problem is None for s in samples], "grown_mb": grown // 1024,
                          "problem": samples[1].problem}}))
    """)
    run = subprocess.run([sys.executable, "-c", "import json" + script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["ok"] == [True, False, True], result
    assert result["grown_mb"] < 64, f"the bomb grew the process by {result['grown_mb']} MB"
    assert "possible decompression bomb" in result["problem"]


def test_a_map_style_parquet_bomb_is_refused_before_any_cache_is_written(tmp_path, monkeypatch):
    import pyarrow as pa

    monkeypatch.setattr(untrusted, "EXPANSION_FLOOR", 1 << 20)
    files = _parquet(tmp_path / "bomb.parquet", {"image": pa.array([png(), bytes(8 << 20)], pa.binary())})
    cache = tmp_path / "cache"
    cfg = DataConfig(source="parquet", data_files=str(files), streaming=False, cache_dir=str(cache), resolution=16)
    with pytest.raises(ShardError, match=r"bomb\.parquet, row group 0: column image unpacks from") as err:
        build_dataset(cfg, train=False)
    assert "\n" not in str(err.value)
    many = _parquet(tmp_path / "many.parquet", {"image": pa.array([bytes(900 << 10)] * 3, pa.binary())},
                    row_group_size=1)  # each row group under the floor, the file over it
    cfg = DataConfig(source="parquet", data_files=str(many), streaming=False, cache_dir=str(cache), resolution=16)
    with pytest.raises(ShardError, match=r"many\.parquet: its columns unpack from"):
        build_dataset(cfg, train=False)
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_array_cells_are_held_to_the_pixel_limit_in_every_form(tmp_path, low_pixel_limit):
    """A 120 x 120 array (14,400 pixels, over a 10,000-pixel limit) in a parquet list cell, a save_to_disk Array2D
    cell, nested lists, a numpy array and a PIL image: refused before decoding; 64 x 64 arrays still decode."""
    import datasets
    import pyarrow as pa

    big, small = np.zeros((120, 120), np.uint8), np.full((64, 64), 200, np.uint8)
    nested = pa.array([small.tolist(), big.tolist()], pa.list_(pa.list_(pa.uint8())))
    samples = list(parquet_samples(str(_parquet(tmp_path / "arrays.parquet", {"image": nested}))))
    assert samples[0].problem is None and "120x120 = 14,400 pixels" in samples[1].problem
    features = datasets.Features({"image": datasets.Array2D((120, 120), "uint8")})
    datasets.Dataset.from_dict({"image": [big]}, features=features).save_to_disk(str(tmp_path / "saved"))
    item = build_dataset(DataConfig(source=str(tmp_path / "saved"), resolution=16), train=False)[0]
    assert item["pixel_values"] is None and "DecompressionBombError" in item["skipped"][0][1]
    for value in (big.tolist(), big, np.zeros((3, 120, 120), np.uint8), Image.new("RGB", (120, 120))):
        with pytest.raises(BadImageError, match="14,400 pixels"):
            decode_hub_value(value, "cell")
    assert decode_hub_value(small.tolist(), "cell").size == (64, 64)


# --------------------------------------------------------------------------------------------------------------------
# Cells naming local files


@pytest.fixture
def path_cells(tmp_path):
    """A 'secret' image on this machine and a parquet whose cells name it ({"bytes": None, "path"} and a plain
    string), and one that names a file that does not exist. The two sit in a short folder of their own: the skip
    message cuts a long path, and under a longer pytest temp root (xdist's popen-gwN) the cut fell inside the names."""
    import pyarrow as pa

    home = Path(tempfile.mkdtemp(prefix="home-"))
    secret, missing = home / "secret.png", home / "missing.png"
    secret.write_bytes(png(32, 7))
    struct = pa.array([{"bytes": None, "path": str(secret)}, {"bytes": None, "path": str(missing)}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    _parquet(tmp_path / "struct.parquet", {"image": struct, "key": ["secret", "missing"]})
    _parquet(tmp_path / "plain.parquet", {"image": [str(secret), str(missing)], "key": ["secret", "missing"]})
    yield tmp_path
    shutil.rmtree(home)


@pytest.mark.parametrize("kind", ["struct", "plain"])
def test_path_cells_are_not_followed_unless_allowed(path_cells, kind, capsys):
    files = str(path_cells / f"{kind}.parquet")
    code, err = encode(["--input", "parquet", "--data-files", files], path_cells / "refused", capsys)
    assert code == 0, err
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped "))
    assert len(skipped) == 2
    assert json.loads((path_cells / "refused" / "manifest.json").read_text())["count"] == 0
    # the two messages differ only in the path they quote: nothing says whether either file exists
    assert skipped[0].replace("missing", "X") == skipped[1].replace("secret", "X")
    code, err = encode(["--input", "parquet", "--data-files", files, "--allow-local-paths"], path_cells / "allowed",
                       capsys)
    assert code == 0 and json.loads((path_cells / "allowed" / "manifest.json").read_text())["count"] == 1


def test_path_cells_in_training_sources_need_the_config_key(path_cells):
    import datasets

    files = str(path_cells / "struct.parquet")
    table = datasets.Dataset.from_parquet(files, cache_dir=str(path_cells / "hf"))
    table.save_to_disk(str(path_cells / "saved"))
    for source, extra in (("parquet", {"data_files": files, "streaming": True}), (str(path_cells / "saved"), {})):
        refused = list(build_dataset(DataConfig(source=source, resolution=16, **extra), train=False)) \
            if source == "parquet" else [build_dataset(DataConfig(source=source, resolution=16), train=False)[0]]
        assert all(item["pixel_values"] is None for item in refused[:1])
        assert "not followed" in refused[0]["skipped"][0][1]
        cfg = DataConfig(source=source, resolution=16, allow_local_paths=True, **extra)
        allowed = build_dataset(cfg, train=False)
        first = next(iter(allowed)) if source == "parquet" else allowed[0]
        assert first["pixel_values"] is not None


def test_hub_path_cells_are_followed_only_inside_the_datasets_download_folder(tmp_path):
    """A hub dataset's path cells are the files `datasets` downloaded: anything outside that folder (or a link out of
    it) is refused like a parquet's."""
    downloads, home = tmp_path / "hf" / "downloads", tmp_path / "home"
    downloads.mkdir(parents=True)
    home.mkdir()
    (downloads / "0.png").write_bytes(png(32, 50))
    (home / "secret.png").write_bytes(png(32, 7))
    (downloads / "link.png").symlink_to(home / "secret.png")
    root = str(tmp_path / "hf")
    assert decode_hub_value({"bytes": None, "path": str(downloads / "0.png")}, "row", root).size == (32, 32)
    for path in (home / "secret.png", downloads / "link.png", downloads / ".." / ".." / "home" / "secret.png"):
        with pytest.raises(BadImageError, match="not followed"):
            decode_hub_value({"bytes": None, "path": str(path)}, "row", root)
    assert decode_hub_value(str(home / "secret.png"), "row", True).size == (32, 32)


# --------------------------------------------------------------------------------------------------------------------
# Brace patterns and variables


def test_a_huge_brace_pattern_is_refused_before_it_is_expanded(tmp_path):
    script = (f"from kl_autoencoder.shards import expand_data_files, ShardError\n"
              f"try:\n    expand_data_files({str(tmp_path / 'x{0..99999999}.tar')!r})\n"
              f"except ShardError as err:\n    print(err)\n")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and time.perf_counter() - start < 30, run.stderr[-2000:]
    assert "expands to 100,000,000 shard names, more than 1,000,000" in run.stdout


def test_variables_in_data_files_are_named_when_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"WDS_SHARDS is not set"):
        expand_data_files(str(tmp_path / "${SHARDS}.tar"))
    monkeypatch.setenv("WDS_SHARDS", "00000")
    assert expand_data_files(str(tmp_path / "${SHARDS}.tar")) == [str(tmp_path / "00000.tar")]
    monkeypatch.delenv("WDS_SHARDS")
    code, err = encode(["--input", "webdataset", "--data-files", str(tmp_path / "${SHARDS}.tar")], tmp_path / "o",
                       capsys)
    assert code == 2 and "WDS_SHARDS" in _one_error_line(err)


def test_train_names_a_missing_shard_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["data.source=webdataset", f"data.data_files={tmp_path / 'missing.tar'}",
                        f"train.output_dir={tmp_path / 'run'}", "data.resolution=32", "loss.perceptual_weight=0"])
    assert code == 2 and "missing.tar does not exist" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------------------
# --store-posterior keys


def test_store_posterior_refuses_keys_that_clash(tmp_path, capsys):
    _parquet(tmp_path / "keys.parquet", {"image": [png(32, 10), png(32, 200)], "key": ["a.std", "a"]})
    code, err = encode(["--input", "parquet", "--data-files", str(tmp_path / "keys.parquet"), "--store-posterior"],
                       tmp_path / "latents", capsys)
    line = _one_error_line(err)
    assert code == 2 and "keys a and a.std clash under --store-posterior" in line
    code, err = encode(["--input", "parquet", "--data-files", str(tmp_path / "keys.parquet")], tmp_path / "plain",
                       capsys)
    assert code == 0, err  # without --store-posterior both keys are plain latents


# --------------------------------------------------------------------------------------------------------------------
# Printed names and error lines


def test_names_from_data_are_escaped_and_bounded_when_printed(tmp_path, capsys):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "\x1b]0;pwned\x07\x1b[2J" + "k" * 5000 + ".png", b"not a png")
    code, err = encode(["--input", "webdataset", "--data-files", str(shard)], tmp_path / "latents", capsys)
    assert code == 0 and "\x1b" not in err and "\x07" not in err
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and "\\x1b]0;pwned" in skipped[0] and len(skipped[0]) < 3000


def test_a_parquet_of_twenty_thousand_columns_gives_a_short_error(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({f"column_{i:05d}": pa.array([i], pa.int32()) for i in range(20_000)}),
                   str(tmp_path / "wide.parquet"))
    code, err = encode(["--input", "parquet", "--data-files", str(tmp_path / "wide.parquet")], tmp_path / "o", capsys)
    line = _one_error_line(err)
    assert code == 2 and "no image column" in line and "(20000 columns)" in line and len(line) < 3000


def test_a_forged_latent_scale_record_gives_a_short_escaped_error(tmp_path):
    from kl_autoencoder.evaluation import check_latent_scale_writable
    from kl_autoencoder.presets import LATENT_SCALE_KEY

    config = tmp_path / "config.json"
    config.write_text(json.dumps({LATENT_SCALE_KEY: {"latent_scale": "kept", "source": "\x1b[31m" + "A" * 200_000}}))
    with pytest.raises(ValueError) as err:
        check_latent_scale_writable(config, force=False)
    assert len(str(err.value)) < 3000 and "\x1b" not in str(err.value)


def test_shown_escapes_control_characters_and_bounds_length():
    assert untrusted.shown("a\x1b[2Jb\nc\u202ed") == "a\\x1b[2Jb\\x0ac\\u202ed"
    assert untrusted.shown("x" * 500, 10) == "xxxxxxxxxx... (490 more characters)"
    assert untrusted.error_line("one\ntwo") == "one two"
