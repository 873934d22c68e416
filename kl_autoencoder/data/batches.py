"""How items become batches: the skip-aware collate, DataLoader workers, and the training order.

`collate_images` stacks the readable items and puts the files skipped while building them in the batch
(`skipped_files` / `num_skipped`): with DataLoader workers a counter inside the dataset lives in a worker process and
the main process never sees it, so it aggregates with `dataset.skipped.record_batch(batch)`. A batch of only
unreadable items has `pixel_values` of shape [0, 3, R, R]: the trainer skips it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from kl_autoencoder.data.stream import usable_workers


def collate_images(items: Sequence[dict], resolution: int | None = None) -> dict:
    """Stack readable items; report the files skipped while building them.

    Returns {"pixel_values": [B, 3, R, R], "paths", "num_skipped", "skipped_files", "skip_reasons"};
    B may be 0 when no item was readable (then the trainer skips the batch).
    """
    good = [item for item in items if item["pixel_values"] is not None]
    skipped = [pair for item in items for pair in item["skipped"]]
    if good:
        pixel_values = torch.stack([item["pixel_values"] for item in good])
    else:
        side = resolution or 0
        pixel_values = torch.zeros(0, 3, side, side)
    batch = {
        "pixel_values": pixel_values,
        "paths": [item["path"] for item in good],
        "num_skipped": len(skipped),
        "skipped_files": [path for path, _ in skipped],
        "skip_reasons": [reason for _, reason in skipped],
    }
    counts = {url: n for item in items for url, n in item.get("shard_counts", {}).items()}
    if counts:  # shard sample counts a stream's worker found: the main process records them (sharding.ShardSet)
        batch["shard_counts"] = counts
    return batch


def default_num_workers() -> int:
    """DataLoader workers for this process: its share of the node's cores (cores / the processes launched on the node,
    LOCAL_WORLD_SIZE as torchrun and `accelerate launch` set it), none on a share of 1-2 cores (a worker would fight
    the training step for the only other core), else one per core of the share but one, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    share = cores // local_processes
    return 0 if share <= 2 else min(share - 1, 8)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader with the skip-aware collate; seeded shuffling; `drop_last` defaults to `shuffle`
    (training). Streaming datasets are not shuffled here (their stream is, in `build_dataset`)."""
    workers = default_num_workers() if num_workers is None else int(num_workers)
    iterable = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        collate_fn=partial(collate_images, resolution=getattr(dataset, "resolution", None)),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=shuffle if drop_last is None else drop_last,
    )


# --------------------------------------------------------------------------------------------- training batches
#
# The data order is a pure function of (seed, epoch, rank) and every item's crop/flip of (seed, epoch, position), so a
# resumed run replays exactly the batches a straight run would have seen, with or without DataLoader workers; the
# resume position is one number, the micro-batches this rank has consumed.


class EpochSampler(Sampler):
    """This rank's items of one epoch: a permutation seeded by (seed, epoch), every `world`-th item, from `start`.

    Yields (index, item_seed) pairs: `SeededItems` seeds torch's RNG with item_seed before building the item, so
    random crops/flips are the same in a resumed run, in the main process or in any DataLoader worker.
    """

    def __init__(self, length: int, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True, start: int = 0):
        self.length, self.seed, self.epoch = length, seed, epoch
        self.rank, self.world, self.shuffle, self.start = rank, world, shuffle, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        per_rank = self.length // self.world  # equal shares keep the ranks in step
        mine = order[self.rank::self.world][:per_rank].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for position in range(self.start, len(mine)):
            yield mine[position], (base + position * self.world + self.rank) % (2**63)

    def __len__(self) -> int:
        return max(0, self.length // self.world - self.start)


class SeededItems(Dataset):
    """Dataset view that takes (index, seed) and builds the item under that seed (global RNG restored)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, rank: int, world: int, start_batch: int,
                  num_workers: int) -> DataLoader:
    collate = partial(collate_images, resolution=getattr(dataset, "resolution", None))
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=True)
    sampler = EpochSampler(len(dataset), seed, epoch, rank, world, start=start_batch * batch_size)
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=True, pin_memory=torch.cuda.is_available())


def order_workers(dataset: Dataset, world: int, workers: int) -> int:
    """The DataLoader workers per process a stream's batch order depends on; 0 for map-style data, whose order
    depends on the seed and the processes only (workers build the items the sampler picks)."""
    if hasattr(dataset, "at"):  # stream.ShardStream: as many as get a shard
        return usable_workers(len(dataset.shards), world, workers)
    return max(1, workers) if isinstance(dataset, IterableDataset) else 0


def training_batches(dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                     batches_seen: int = 0, num_workers: int | None = None) -> Iterator[dict]:
    """Endless collated batches for this rank, resuming after `batches_seen` of its batches (epochs included).

    Map-style datasets: each rank draws its own share of every epoch's permutation. Streams: each rank reads its own
    share of the stream (`datasets.distributed.split_dataset_by_node`), so no rank decodes another rank's images;
    a resumed stream passes the batches already seen without decoding them (`HFIterableImageDataset.pass_undecoded`).
    """
    workers = default_num_workers() if num_workers is None else num_workers
    if hasattr(dataset, "at"):  # stream.ShardStream: its position is a function of batches_seen (see stream.py)
        stream = dataset.at(rank, world, workers, batch_size, batches_seen, seed)
        collate = partial(collate_images, resolution=stream.resolution)
        for batch in DataLoader(stream, batch_size=batch_size, num_workers=stream.workers if workers else 0,
                                collate_fn=collate, pin_memory=torch.cuda.is_available()):
            dataset.shards.record(batch.get("shard_counts"))  # saved with the next checkpoint
            yield batch
        return
    if isinstance(dataset, IterableDataset):
        if world > 1:
            dataset = dataset.for_rank(rank, world)
        epoch, skip = 0, batches_seen
        while True:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            if hasattr(dataset, "pass_undecoded"):
                dataset.pass_undecoded(skip, batch_size)
            yielded = 0
            for batch in _epoch_loader(dataset, batch_size, seed, epoch, rank, world, 0, workers):
                if skip:
                    skip -= 1
                    continue
                yielded += 1
                yield batch
            if yielded == 0 and skip == 0:
                raise ValueError("the streaming dataset yielded no batch for this process")
            epoch += 1
    per_epoch = (len(dataset) // world) // batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} items: too few for train.batch_size={batch_size} on "
                         f"{world} process(es)")
    epoch, start = divmod(batches_seen, per_epoch)
    while True:
        yield from _epoch_loader(dataset, batch_size, seed, epoch, rank, world, start, workers)
        epoch, start = epoch + 1, 0
