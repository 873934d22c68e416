"""Sharded sources and latent shards (kl_autoencoder/data/, latent_shards.py): WebDataset tars built here from the
sample photos (a corrupt JPEG, a sample without an image and a truncated tar included), parquet files, save_to_disk
folders; per-rank / per-worker shares, exact streaming resume, and `encode` across processes, resumable and locked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader

from kl_autoencoder.config import ConfigError, DataConfig, load_config
from kl_autoencoder.data import build_dataset, sample_images
from kl_autoencoder.latent_shards import (
    EncodeFolderBusy, encode_dataset, load_latent_shards, lock_folder, read_latent_shard, write_exclusive,
)
from kl_autoencoder.shards import ShardError, ShardStream, count_tar_samples, expand_data_files, tar_samples

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "assets" / "trained-f8"  # a tiny trained f8 VAE (4 latent channels)

pytestmark = pytest.mark.usefixtures("one_thread")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    """3 img2dataset-style shards of the 12 sample photos (64 px): shard 1 holds a corrupt JPEG, shard 2 a sample with
    only a caption and ends truncated inside its last photo. 10 readable images, 3 bad samples."""
    folder = tmp_path_factory.mktemp("photo_shards")
    photos = [(name, image.resize((96, 64))) for name, image in sample_images("all")]
    samples = [(f"{i:06d}", {"jpg": jpeg(image), "txt": name.encode()}) for i, (name, image) in enumerate(photos)]
    write_tar(folder / "00000.tar", samples[:4])
    write_tar(folder / "00001.tar", samples[4:7] + [("000100", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"x"})])
    last = ("000010", {"txt": b"caption", "jpg": samples[10][1]["jpg"]})
    write_tar(folder / "00002.tar", samples[7:10] + [("000101", {"txt": b"caption, no image"}), last])
    with tarfile.open(folder / "00002.tar") as tar:
        member = tar.getmember("000010.jpg")
    data = (folder / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(data[:member.offset_data + member.size // 2])  # the last JPEG cut short
    return folder


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    """8 shards x 5 tiny PNGs, keyed 0..39."""
    folder = tmp_path_factory.mktemp("numbered")
    for shard in range(8):
        samples = []
        for i in range(shard * 5, shard * 5 + 5):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buffer, format="PNG")
            samples.append((f"{i:04d}", {"png": buffer.getvalue()}))
        write_tar(folder / f"{shard:05d}.tar", samples)
    return folder


def stream_of(folder: Path, train: bool = True, resolution: int = 8) -> ShardStream:
    cfg = DataConfig(source="webdataset", data_files=str(folder / "{00000..00007}.tar"), resolution=resolution,
                     random_crop=False, random_flip=False)
    return build_dataset(cfg, train=train)


# --------------------------------------------------------------------------------------------- sources


def test_brace_glob_list_and_missing_shards(photo_shards, tmp_path):
    braces = expand_data_files(str(photo_shards / "{00000..00002}.tar"))
    assert [Path(p).name for p in braces] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_data_files(str(photo_shards / "*.tar")) == braces
    assert expand_data_files([braces[2], braces[0]]) == [braces[2], braces[0]]
    with pytest.raises(ShardError, match="00003.tar does not exist"):
        expand_data_files(str(photo_shards / "{00000..00003}.tar"))
    with pytest.raises(ShardError, match="no shard file matches"):
        expand_data_files(str(tmp_path / "*.tar"))
    (tmp_path / "00000.tar").write_bytes(b"this is no tar file")
    with pytest.raises(ShardError, match=r"cannot open shard .*00000\.tar"):
        list(tar_samples(str(tmp_path / "00000.tar")))


def test_config_names_shards_plainly(photo_shards):
    cfg = load_config(None, ["data.source=webdataset", f"data.data_files={photo_shards}/{{00000..00002}}.tar"])
    assert cfg.data.data_files.endswith("{00000..00002}.tar")
    with pytest.raises(ConfigError, match="data.data_files"):
        load_config(None, ["data.source=webdataset"])
    with pytest.raises(ConfigError, match="data.data_files"):
        load_config(None, ["data.source=sample", "data.data_files=a.tar"])


def test_bad_members_are_skipped_and_counted(photo_shards):
    cfg = DataConfig(source="webdataset", data_files=str(photo_shards / "*.tar"), resolution=32)
    stream = build_dataset(cfg, train=False)  # one pass, centre crops
    items = list(stream)
    good = [item for item in items if item["pixel_values"] is not None]
    bad = [pair for item in items for pair in item["skipped"]]
    assert len(good) == 10 and all(item["pixel_values"].shape == (3, 32, 32) for item in good)
    reasons = {path.rsplit("#", 1)[1]: reason for path, reason in bad}
    assert set(reasons) == {"000100", "000101", "000010"}, reasons
    assert "UnidentifiedImageError" in reasons["000100"]
    assert "no image member" in reasons["000101"]
    assert "truncated" in reasons["000010"]
    assert stream.skipped.count == 3  # counted in the main process like a folder's bad files
    last = str(photo_shards / "00002.tar")
    assert count_tar_samples(last) == 5 == len(list(tar_samples(last)))  # counted from headers as read


def test_parquet_streamed_and_map_style_and_save_to_disk(tmp_path):
    import datasets

    photos = [image.resize((48, 32)) for _, image in sample_images("train")][:6]
    features = datasets.Features({"image": datasets.Image(), "key": datasets.Value("string")})
    rows = {"image": [{"bytes": jpeg(p), "path": None} for p in photos[:5]] + [{"bytes": b"broken", "path": None}],
            "key": [f"k{i}" for i in range(6)]}
    table = datasets.Dataset.from_dict(rows, features=features)
    table.select(range(3)).to_parquet(str(tmp_path / "part-0.parquet"))
    table.select(range(3, 6)).to_parquet(str(tmp_path / "part-1.parquet"))
    common = dict(data_files=str(tmp_path / "part-*.parquet"), resolution=16, random_crop=False, random_flip=False)
    streamed = list(build_dataset(DataConfig(source="parquet", streaming=True, **common), train=False))
    assert sorted(item["key"] for item in streamed) == [f"k{i}" for i in range(6)]
    assert [item["key"] for item in streamed if item["pixel_values"] is None] == ["k5"]
    mapped = build_dataset(DataConfig(source="parquet", **common), train=False)
    assert len(mapped) == 6 and mapped[0]["pixel_values"].shape == (3, 16, 16)
    assert [path for path, _ in mapped[5]["skipped"]] == ["parquet[2][5]"]  # map-style: replaced by the next readable
    table.save_to_disk(str(tmp_path / "saved"))
    saved = build_dataset(DataConfig(source=str(tmp_path / "saved"), resolution=16), train=False)
    assert len(saved) == 6 and saved[1]["pixel_values"].shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------- shares and resume


def keys_of(loader) -> list[tuple[int, str]]:
    return [(item["epoch"], item["key"]) for batch in loader for item in batch]


def test_two_ranks_two_workers_read_each_image_once_per_epoch(numbered):
    """40 numbered images in 8 shards: ranks 0 and 1, each with 2 DataLoader worker processes, over two epochs."""
    stream = stream_of(numbered)
    stream.epochs = 2
    seen = []
    for rank in (0, 1):
        share = stream.at(rank, 2, workers=2, batch_size=3, batches_seen=0)
        seen += keys_of(DataLoader(share, batch_size=3, num_workers=2, collate_fn=list))
    for epoch in (0, 1):
        keys = sorted(key for e, key in seen if e == epoch)
        assert keys == [f"{i:04d}" for i in range(40)], (epoch, keys)  # every image once: none twice, none missed
    assert len(seen) == 80


def take(stream: ShardStream, batches: int, workers: int) -> list[list[str]]:
    loader = iter(DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=list))
    return [[item["key"] for item in next(loader)] for _ in range(batches)]


def test_resumed_stream_continues_exactly_without_rereading(numbered, monkeypatch):
    stream = stream_of(numbered)
    straight = take(stream.at(1, 2, workers=2, batch_size=3, batches_seen=0), 13, workers=2)  # past an epoch
    resumed = take(stream.at(1, 2, workers=2, batch_size=3, batches_seen=7), 6, workers=2)
    assert resumed == straight[7:]
    # no image before the resume position is decoded again (main process, so the calls can be counted)
    from kl_autoencoder.data import stream as shard_stream  # where ShardStream finds decode_sample

    decoded, real = [], shard_stream.decode_sample
    monkeypatch.setattr(shard_stream, "decode_sample", lambda sample, *a: decoded.append(sample.key) or real(sample, *a))
    one = take(stream.at(0, 1, workers=0, batch_size=4, batches_seen=0), 5, workers=0)
    decoded.clear()
    again = take(stream.at(0, 1, workers=0, batch_size=4, batches_seen=3), 2, workers=0)
    assert again == one[3:] and decoded == [key for batch in one[3:] for key in batch]


def test_streaming_training_resumes_exactly(photo_shards, tmp_path):
    """The trainer on webdataset shards: 4 steps straight == 2 steps, stop, resume, 2 more (same losses, weights)."""
    from kl_autoencoder.trainer import train

    tiny = ["model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
            "model.architecture.layers_per_block=1", "model.architecture.mid_block_add_attention=false",
            "data.resolution=32", "data.num_workers=0", "loss.perceptual_weight=0", "train.batch_size=3",
            "train.log_every=1", "train.image_every=0", "train.checkpoint_every=2", "train.scaling_images=6",
            "data.source=webdataset",
            f"data.data_files={photo_shards}/{{00000..00002}}.tar"]
    train(load_config(None, tiny + [f"train.output_dir={tmp_path / 'a'}", "train.max_steps=4"]))
    train(load_config(None, tiny + [f"train.output_dir={tmp_path / 'b'}", "train.max_steps=2"]))
    train(load_config(None, tiny + [f"train.output_dir={tmp_path / 'b'}", "train.max_steps=4", "train.resume=latest"]))

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines)}

    a, b = losses("a"), losses("b")
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-5)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["skipped_images"] >= 1


# --------------------------------------------------------------------------------------------- encode


@pytest.fixture(scope="module")
def model():
    from kl_autoencoder.model import KLAutoencoder

    return KLAutoencoder.from_pretrained(MODEL).eval()


def shard_keys(out: Path) -> list[str]:
    return [key for path in sorted(out.glob("latent-shard-*.safetensors")) for key in read_latent_shard(path)[1]]


def test_two_processes_encode_every_input_exactly_once(model, photo_shards, tmp_path):
    out = tmp_path / "latents"
    files = str(photo_shards / "{00000..00002}.tar")
    barrier, results = threading.Barrier(2), {}

    def rank(index: int) -> None:  # as under `accelerate launch`: same code, barrier = wait_for_everyone
        results[index] = encode_dataset(model, str(MODEL), "webdataset", out, 32, files, batch_size=4, rank=index,
                                        world=2, barrier=barrier.wait, progress=False)

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [len(results[i].written) for i in (0, 1)] == [2, 1]  # shards 0, 2 on rank 0; shard 1 on rank 1
    keys = shard_keys(out)
    assert sorted(keys) == [f"{i:06d}" for i in range(10)]  # every readable input once, in one shard
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 10 and manifest["complete"] and len(manifest["shards"]) == 3
    assert manifest["resolution"] == 32 and manifest["model"]["scaling_factor"] == model.config.scaling_factor
    assert len(manifest["skipped"]) == 3


def test_encode_resumes_and_stores_the_posterior(model, photo_shards, tmp_path):
    out = tmp_path / "latents"
    files = str(photo_shards / "*.tar")
    encode_dataset(model, str(MODEL), "webdataset", out, 32, files, store_posterior=True, progress=False)
    kept = out / "latent-shard-00000.safetensors"
    before = kept.stat().st_mtime_ns
    (out / "latent-shard-00001.safetensors").unlink()  # as if killed while writing shard 1 ...
    (out / ".latent-shard-00001.safetensors.abc123.tmp").write_bytes(b"half a shard")  # ... leaving its temporary
    again = encode_dataset(model, str(MODEL), "webdataset", out, 32, files, store_posterior=True, progress=False)
    assert [p.name for p in again.written] == ["latent-shard-00001.safetensors"] and len(again.existing) == 2
    assert kept.stat().st_mtime_ns == before and not list(out.glob(".*.tmp"))
    assert sorted(shard_keys(out)) == [f"{i:06d}" for i in range(10)]
    # mean and std are the model's posterior of the centre crop, in diffusion units
    from kl_autoencoder.data import build_transform, decode_image

    latents, manifest = load_latent_shards(out, with_std=True)
    photo = dict(sample_images("all"))["astronaut"].resize((96, 64))  # key 000000
    x = build_transform(32, False, False)(decode_image(jpeg(photo), "x", min_side=32))  # JPEG decoded at 1/2 scale
    with torch.no_grad():
        posterior = model.encode(x[None])
    mean, std = latents["000000"]
    assert torch.allclose(mean, model.to_diffusion_latents(posterior.mean)[0], atol=1e-4)
    assert torch.allclose(std, posterior.std[0] * model.config.scaling_factor, atol=1e-4)
    assert manifest["store_posterior"] is True


def test_encode_a_saved_dataset_in_row_shards(model, tmp_path):
    import datasets

    photos = [image.resize((40, 32)) for _, image in sample_images("heldout")]
    rows = {"image": [{"bytes": jpeg(p), "path": None} for p in photos] + [{"bytes": b"broken", "path": None}]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(tmp_path / "saved"))
    out = tmp_path / "latents"
    result = encode_dataset(model, str(MODEL), str(tmp_path / "saved"), out, 32, shard_size=2, progress=False)
    assert sorted(shard_keys(out)) == ["0", "1", "2"] and len(result.written) == 2
    assert result.manifest["count"] == 3 and [name for name, _ in result.manifest["skipped"]] == [f"{tmp_path}/saved[3]"]


def test_concurrent_encodes_into_one_folder_are_refused(model, photo_shards, tmp_path):
    """A second encode into an --out another encode is writing fails at once, and a shard is never
    published over one another writer published."""
    from kl_autoencoder.inference import encode_folder

    out = tmp_path / "latents"
    lock = lock_folder(out)  # another encode, running
    try:
        with pytest.raises(EncodeFolderBusy, match="another encode is writing"):
            encode_dataset(model, str(MODEL), "webdataset", out, 32, str(photo_shards / "*.tar"), progress=False)
        folder = tmp_path / "images"
        folder.mkdir()
        sample_images("heldout")[0][1].resize((32, 32)).save(folder / "a.png")
        with pytest.raises(EncodeFolderBusy):
            encode_folder(model, folder, out)
    finally:
        os.close(lock)
    assert not list(out.glob("latent*"))
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"the other writer's shard")
    with pytest.raises(FileExistsError):
        write_exclusive(target, lambda tmp: tmp.write_bytes(b"ours"))
    assert target.read_bytes() == b"the other writer's shard" and not list(tmp_path.glob(".x.*"))


def test_encode_refuses_a_folder_of_another_encode(model, photo_shards, tmp_path):
    out = tmp_path / "latents"
    files = str(photo_shards / "00000.tar")
    encode_dataset(model, str(MODEL), "webdataset", out, 32, files, progress=False)
    with pytest.raises(ShardError, match="resolution differ"):
        encode_dataset(model, str(MODEL), "webdataset", out, 64, files, progress=False)
    encode_dataset(model, str(MODEL), "webdataset", out, 64, files, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["resolution"] == 64


def test_encode_names_a_shard_it_cannot_open_and_leaves_nothing(model, tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"not a tar file")
    with pytest.raises(ShardError, match=r"cannot open shard .*00000\.tar: not a readable tar file") as err:
        encode_dataset(model, str(MODEL), "webdataset", tmp_path / "out", 32, str(tmp_path / "00000.tar"),
                       progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_accelerate_launch_two_processes_encode_a_folder_and_train_a_ldm_on_it(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, (name, image) in enumerate(sample_images("all")):
        image.resize((48, 40)).save(folder / ("sub" if i % 2 else "") / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "latents"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    from tests.test_trainer import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "kl_autoencoder.cli", "encode",  # the README's line
           "--model", str(MODEL), "--input", str(folder), "--out", str(out), "--resolution", "32",
           "--shard-size", "3", "--store-posterior", "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[process 0/2]" in result.stdout and "[process 1/2]" in result.stdout
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg") if p.name != "broken.jpg")
    assert sorted(shard_keys(out)) == names  # the union of both processes' shards: every input exactly once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["shards"]) == 5 and manifest["skipped"][0][0].endswith("broken.jpg")
    with safe_open(str(out / "latent-shard-00000.safetensors"), framework="pt") as f:
        assert f.get_tensor(names[0]).shape == (4, 4, 4)

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import latent_diffusion
    finally:
        sys.path.pop(0)
    png = tmp_path / "samples.png"
    assert latent_diffusion.main(["--vae", str(MODEL), "--latents", str(out), "--quick", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0


# --------------------------------------------------------------------------------------------- shuffle buffer


def buffered(folder: Path, size: int, seed: int = 0) -> ShardStream:
    cfg = DataConfig(source="webdataset", data_files=str(folder / "{00000..00007}.tar"), resolution=8,
                     random_crop=False, random_flip=False, shuffle_buffer=size)
    stream = build_dataset(cfg, train=True)
    stream.seed = seed
    return stream


def test_shuffle_buffer_mixes_shards_written_in_order_and_resumes_exactly(numbered):
    """Shards written in class order (here each shard is a class of 5): batches of 5 from one worker were each a
    single shard; a 10-sample buffer mixes them, the same way for the same seed, and a resume continues exactly."""
    def shard_of(batch: list[str]) -> set[int]:
        return {int(key) // 5 for key in batch}

    straight = take(buffered(numbered, 10).at(0, 1, workers=0, batch_size=5, batches_seen=0), 12, workers=0)
    assert sum(len(shard_of(batch)) > 1 for batch in straight) >= 9, straight  # read order: 0 of 12 batches
    keys = [key for batch in straight[:8] for key in batch]
    assert len(set(keys)) >= 30  # a shuffle, not a repetition: 8 batches (one epoch's worth) hold most images
    assert take(buffered(numbered, 10).at(0, 1, 0, 5, 0), 12, workers=0) == straight  # deterministic per seed
    assert take(buffered(numbered, 10, seed=1).at(0, 1, 0, 5, 0), 12, workers=0) != straight
    for seen in (3, 9):  # mid-epoch, and past the first epoch
        assert take(buffered(numbered, 10).at(0, 1, 0, 5, seen), 12 - seen, workers=0) == straight[seen:]
    # two ranks, two worker processes each: a resumed rank replays the batches of the uninterrupted one
    whole = take(buffered(numbered, 7).at(1, 2, workers=2, batch_size=3, batches_seen=0), 11, workers=2)
    assert take(buffered(numbered, 7).at(1, 2, workers=2, batch_size=3, batches_seen=5), 6, workers=2) == whole[5:]
    assert buffered(numbered, 0).shuffle_buffer == 0  # 0 = read order
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        load_config(None, ["data.shuffle_buffer=-1"])


def test_buffer_position_is_computed_without_reading():
    """`buffer_after` (what a resume reads again) against running the buffer on plain numbers."""
    from kl_autoencoder import shards

    size, key, outputs = 5, (3, 0, 1), 40
    buffer, taken, slots = list(range(size)), [], shards.shuffle_slots(key, size, 0)
    for t in range(outputs):
        taken.append(buffer[slots[t]])
        buffer[slots[t]] = size + t
        assert sorted(shards.buffer_after(t + 1, size, key).tolist()) == sorted(buffer)
    assert sorted(taken + buffer) == list(range(outputs + size))  # every input exactly once, none lost


def pipe_shards(folder: Path, log: Path, shards: int = 8, per_shard: int = 3, side: int = 32) -> list[str]:
    """Remote-style shards `pipe:echo "$SHARD_PHASE N" >> LOG && cat FILE`: each opening of shard N appends N to LOG
    (after the opening process's SHARD_PHASE, when set)."""
    rng = np.random.default_rng(0)
    urls = []
    for shard in range(shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            samples.append((f"{i:04d}", {"jpg": jpeg(Image.fromarray(pixels))}))
        path = write_tar(folder / f"{shard:05d}.tar", samples)
        urls.append(f'pipe:echo "$SHARD_PHASE {shard}" >> {log} && cat {path}')
    return urls


def opened(log: Path, phase: str | None = None) -> list[int]:
    lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return [int(words[-1]) for words in lines if phase is None or words[0] == phase]


def test_resume_on_remote_shards_reads_no_consumed_shard(tmp_path):
    """Resuming on `pipe:` shards (as http/s3 ones): the checkpoint holds each consumed shard's sample count, so the
    resumed run opens only the shards it still reads, and continues exactly (same losses as an uninterrupted run)."""
    from kl_autoencoder.trainer import train
    from tests.conftest import TINY_TRAINING

    log = tmp_path / "opened.log"
    urls = pipe_shards(tmp_path, log)  # 8 shards x 3 samples
    common = TINY_TRAINING + ["data.source=webdataset", f"data.data_files={json.dumps(urls)}", "data.num_workers=0",
                              "data.shuffle_buffer=0", "train.batch_size=2", "train.log_every=1",
                              "train.checkpoint_every=2", "data.random_crop=false", "data.random_flip=false",
                              "train.remeasure_latent_scale=false"]  # the export reads no data
    train(load_config(None, common + [f"train.output_dir={tmp_path / 'a'}", "train.max_steps=4"]))
    straight, _ = opened(log), log.unlink()
    train(load_config(None, common + [f"train.output_dir={tmp_path / 'b'}", "train.max_steps=2"]))
    first = opened(log)
    log.unlink()
    train(load_config(None, common + [f"train.output_dir={tmp_path / 'b'}", "train.max_steps=4",
                                      "train.resume=latest"]))
    # 4 samples before the checkpoint: the first shard (3) consumed, the second begun; 8 samples read in all
    assert straight == first + straight[2:] and len(straight) == 3
    assert opened(log) == straight[1:]  # the consumed shard is not opened again, not even to count it
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["shard_counts"][urls[straight[0]]] == 3 and state["processes"] == 1 and state["data_workers"] == 1

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines)}

    assert [losses("b")[s] for s in (3, 4)] == pytest.approx([losses("a")[s] for s in (3, 4)], rel=1e-5)


def test_resume_with_another_layout_is_refused_before_anything_is_written(numbered, tmp_path):
    """The data position is exact only for the processes, stream workers and batch size that wrote it: another count
    is refused in one line naming the value to set, and the run folder is left as it was."""
    from kl_autoencoder.run_folder import RunFolderError
    from kl_autoencoder.trainer import train
    from tests.conftest import TINY_TRAINING

    out = tmp_path / "run"
    common = TINY_TRAINING + ["data.source=webdataset", f"data.data_files={numbered}/*.tar", "data.resolution=8",
                              "train.batch_size=2", "train.checkpoint_every=2", "data.shuffle_buffer=4",
                              "train.remeasure_latent_scale=false", f"train.output_dir={out}"]
    train(load_config(None, common + ["train.max_steps=2", "data.num_workers=2"]))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    resume = common + ["train.max_steps=4", "train.resume=latest"]
    with pytest.raises(RunFolderError, match=r"2 DataLoader worker\(s\) per process and this run would use 1: set "
                                             r"data.num_workers=2") as err:
        train(load_config(None, resume + ["data.num_workers=1"]))
    assert "\n" not in str(err.value)
    with pytest.raises(RunFolderError, match=r"batches of 2 images per process and this run uses 4: set "
                                             r"train.batch_size=2"):
        train(load_config(None, resume + ["data.num_workers=2", "train.batch_size=4"]))
    state_file = out / "checkpoints" / "step_0000002" / "trainer_state.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    assert (state["processes"], state["data_workers"], state["batch_size"]) == (1, 2, 2)
    state_file.write_text(json.dumps({**state, "processes": 2}))  # as if written by 2 processes
    with pytest.raises(RunFolderError, match=r"written by 2 process\(es\) and this run has 1: .*--num_processes 2"):
        train(load_config(None, resume + ["data.num_workers=2"]))
    state_file.write_text(saved)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_two_processes_resume_remote_shards_reading_no_consumed_shard(tmp_path):
    """2 ranks (DDP over gloo, `accelerate launch` as the README runs it) on `pipe:` shards: the checkpoint holds the
    sample counts both ranks found, and the resumed run opens neither rank's consumed shard. (That the resumed batches
    are the uninterrupted run's, per rank and worker, is tested above on the stream and the trainer.)"""
    from kl_autoencoder.shards import epoch_shards
    from tests.conftest import TINY_TRAINING
    from tests.test_trainer import free_port

    log = tmp_path / "opened.log"
    urls = pipe_shards(tmp_path, log)  # 8 shards x 3 samples: 4 shards per rank

    def launch(phase: str, *overrides: str) -> None:
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "SHARD_PHASE": phase}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "training" / "train.py"),
               *TINY_TRAINING, "data.source=webdataset", f"data.data_files={json.dumps(urls)}", "data.num_workers=0",
               "data.shuffle_buffer=0", "train.batch_size=2", "train.checkpoint_every=2", "train.seed=0",
               "train.remeasure_latent_scale=false", f"train.output_dir={tmp_path / 'run'}", *overrides]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    launch("first", "train.max_steps=2")
    launch("resumed", "train.max_steps=4", "train.resume=latest")
    consumed = {epoch_shards(8, 0, 0, rank, 2, 0, 1)[0] for rank in (0, 1)}  # 4 samples per rank: 1 shard of 3 each
    assert sorted(opened(log, "first")) == sorted(consumed | {epoch_shards(8, 0, 0, r, 2, 0, 1)[1] for r in (0, 1)})
    resumed = opened(log, "resumed")
    assert len(resumed) == 4 and not consumed & set(resumed)  # shards 2 and 3 of each rank's 4
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert {urls[i] for i in consumed} <= set(state["shard_counts"]) and state["processes"] == 2
