"""The batch order of training (data.training_batches): each rank reads and decodes only its own share of a stream,
and a resumed position replays the same batches."""

from __future__ import annotations

import io

import datasets
import numpy as np
import torch
from PIL import Image

from kl_autoencoder import data as D
from kl_autoencoder.data import batches, hub


def stream(num_rows: int = 8, num_shards: int = 2):
    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = {"image": [{"bytes": png(10 * i), "path": None} for i in range(num_rows)]}
    hf = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    return D.dataset_from_hf(hf.to_iterable_dataset(num_shards=num_shards), D.build_transform(8, False, False))


def first_epoch_values(dataset, rank: int, world: int, batch_size: int = 2) -> list[int]:
    batches = D.training_batches(dataset, batch_size, seed=0, rank=rank, world=world, num_workers=0)
    per_rank = 8 // world // batch_size
    values = []
    for _ in range(per_rank):
        pixels = next(batches)["pixel_values"]
        values += [round((float(p.mean()) + 1) / 2 * 255) for p in pixels]
    return values


def test_each_rank_decodes_only_its_own_share_of_a_stream(monkeypatch):
    decoded = []
    real = hub.decode_hub_value
    monkeypatch.setattr(hub, "decode_hub_value", lambda value, name, *rest: decoded.append(name) or real(value, name, *rest))
    rank0 = first_epoch_values(stream(), rank=0, world=2)
    decoded_by_rank0 = len(decoded)
    rank1 = first_epoch_values(stream(), rank=1, world=2)
    assert sorted(rank0 + rank1) == [10 * i for i in range(8)]  # every row once, no row twice
    assert not set(rank0) & set(rank1)
    assert decoded_by_rank0 == 4 and len(decoded) == 8  # rank 0 decoded its 4 rows, not the 8 of the stream


def test_resuming_a_map_style_order_replays_the_same_batches():
    dataset = D.PhotoListDataset([(f"p{i}", Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)))
                                  for i in range(10)], D.build_transform(8, True, True), repeats=3)
    straight = D.training_batches(dataset, 4, seed=3, rank=1, world=2, num_workers=0)
    seen = [next(straight)["pixel_values"] for _ in range(7)]  # crosses an epoch boundary (3 batches per epoch)
    resumed = D.training_batches(dataset, 4, seed=3, rank=1, world=2, batches_seen=4, num_workers=0)
    for expected in seen[4:]:
        assert torch.equal(next(resumed)["pixel_values"], expected)


def test_resuming_a_stream_decodes_no_skipped_batch(monkeypatch):
    """A resumed hub stream passes the rows of the batches it skips without decoding them, and yields the batches an
    uninterrupted run yields (in the main process and across DataLoader worker processes)."""
    decoded = []
    real = hub.decode_hub_value
    monkeypatch.setattr(hub, "decode_hub_value", lambda value, name, *rest: decoded.append(name) or real(value, name, *rest))

    def values(batches, count: int) -> list[list[int]]:
        return [[round((float(p.mean()) + 1) / 2 * 255) for p in next(batches)["pixel_values"]] for _ in range(count)]

    straight = values(D.training_batches(stream(), 2, seed=0, num_workers=0), 7)  # 4 batches an epoch
    decoded.clear()
    resumed = values(D.training_batches(stream(), 2, seed=0, batches_seen=5, num_workers=0), 2)
    assert resumed == straight[5:]
    assert len(decoded) == 4  # the 2 batches taken, not the 5 skipped before them
    with_workers = values(D.training_batches(stream(num_shards=4), 2, seed=0, num_workers=2), 7)
    assert values(D.training_batches(stream(num_shards=4), 2, seed=0, batches_seen=3, num_workers=2), 4) == \
        with_workers[3:]


def test_default_workers_share_the_node_between_its_processes(monkeypatch):
    """8 processes on a 16-core node (LOCAL_WORLD_SIZE, set by torchrun / accelerate launch) get 16 / 8 = 2 cores
    each: no worker processes, not 8 each (64 workers fighting over 16 cores)."""
    monkeypatch.setattr(batches.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert D.default_num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert D.default_num_workers() == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.default_num_workers() == 7
